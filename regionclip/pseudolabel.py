"""Offline pseudo-labels: proposals → frozen CLIP teacher → concepts (DESIGN §3-5, facts §2).

RegionCLIP recomputes proposals and teacher labels in every training step; here they are
computed once and stored, one output shard per input shard:

- proposals: the RPN's top ``proposal_pool`` (300 after NMS 0.5), of which ``num_regions`` (100)
  are drawn uniformly with a generator seeded by ``(seed, sample key)``, so a sample's regions do
  not depend on batching, process count or resumption;
- teacher: the whole image at detection size → RoIAlign on the dense features → region
  embeddings (:class:`~regionclip.models.region.RegionEncoder`), frozen, bf16 autocast on GPU;
- assignment (:func:`assign_concepts`): ``softmax(cos / 0.01)`` over the pool (``pool`` mode) or
  over the concepts of the sample's own caption (``caption`` mode, GLIP-style); keep regions whose
  top probability exceeds 0.1, all of them if none does (RegionCLIP's fallback).

Output sample (``<input shard name>`` in ``out_dir``): ``__key__`` (source key), ``txt`` (caption),
``json`` (source key, image size, counts, concept-pool hash, the source metadata), the image bytes
(``store_image``) and per kept region, as ``.npy`` (never pickle): ``boxes`` float32 [R, 4]
(x0 y0 x1 y1, original pixels), ``objectness`` float32 [R], ``concept`` int32 [R] (hard label),
``score`` float32 [R] (top probability), ``topk_ids`` int32 [R, k] and ``topk_logits`` [R, k]
(cos / temperature; in caption mode entries past the caption's candidates are id -1, logit -inf),
optionally ``emb`` float16 [R, D]. Beside each shard, ``<stem>.manifest.json`` records the counts,
the concept-pool hash, teacher and RPN identities and the config hash; a shard whose manifest
matches the current run is not recomputed. Process ``r`` of ``n`` labels input shards ``r, r+n, …``
and batches never span shards, so the union of a multi-process run's shards equals a one-process
run's byte for byte (at the same per-process thread count: CPU convolutions split their sums by
thread, which moves the last float bits; torchrun starts workers with ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.ops import box_iou

from regionclip.config import ExperimentConfig, PseudoLabelConfig, section_hash, to_dict
from regionclip.data.shards import (
    ERROR_FIELD,
    IMAGE_EXTS,
    SampleErrors,
    ShardWriter,
    error_record,
    expand_shards,
    expand_urls,
    image_text_pipeline,
)
from regionclip.models.preprocess import pil_to_tensor
from regionclip.models.region import RegionEncoder, encode_regions
from regionclip.proposals import ProposalError, ProposalSource, sample_proposals
from regionclip.utils import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

FORMAT = "regionclip.pseudolabels"
FORMAT_VERSION = 1
MODES = ("pool", "caption")
LOGITS_DTYPES = {"float32": np.float32, "float16": np.float16}
REGION_FIELDS = ("boxes", "objectness", "concept", "score", "topk_ids", "topk_logits")
# why a labelled image ends up with no regions (the image itself is still written)
DROP_REASONS = ("no_proposals", "caption_not_parsed", "no_caption_candidates")


# --------------------------------------------------------------------------------------------
# Assignment (pure tensor math)
# --------------------------------------------------------------------------------------------


def assign_concepts(
    region_emb: Tensor,
    concept_emb: Tensor,
    temperature: float = 0.01,
    threshold: float = 0.1,
    topk: int = 20,
    candidates: Tensor | None = None,
    keep_all_if_none: bool = True,
) -> dict[str, Tensor]:
    """Assign each region to concepts by ``softmax(cos(region, concept) / temperature)``.

    Args:
        region_emb: [R, D] teacher region embeddings (any scale; rows are L2-normalised here).
        concept_emb: [K, D] concept embeddings (rows L2-normalised here).
        threshold: keep a region when its top probability is > ``threshold``.
        topk: concept ids and logits returned per region (``k = min(topk, K)``).
        candidates: LongTensor [C] of concept ids the softmax runs over (caption mode); None = all
            K. An empty tensor keeps no region.
        keep_all_if_none: RegionCLIP's fallback: when no region passes the threshold, keep all.

    Returns:
        ``keep`` bool [R]; ``hard`` int64 [R] (argmax concept id, -1 without candidates);
        ``score`` float32 [R] (top probability); ``topk_ids`` int64 [R, k] and ``topk_logits``
        float32 [R, k] (cos / temperature, best first; id -1 and logit -inf past the candidates).
        Probabilities come from ``log_softmax`` (at temperature 0.01 logits span ±100, where a
        plain softmax would underflow).
    """
    if region_emb.dim() != 2 or concept_emb.dim() != 2 or region_emb.shape[1] != concept_emb.shape[1]:
        raise ValueError(
            f"expected region_emb [R, D] and concept_emb [K, D], got {tuple(region_emb.shape)} "
            f"and {tuple(concept_emb.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n_regions, n_concepts = region_emb.shape[0], concept_emb.shape[0]
    k = min(topk, n_concepts)
    device = region_emb.device
    logits = (
        F.normalize(region_emb.float(), dim=-1) @ F.normalize(concept_emb.float(), dim=-1).T / temperature
    )
    if candidates is not None:
        candidates = torch.as_tensor(candidates, dtype=torch.long, device=device)
        if candidates.numel() and (candidates.min() < 0 or candidates.max() >= n_concepts):
            raise ValueError(
                f"candidate concept ids must lie in [0, {n_concepts}), got {candidates.tolist()}"
            )
        allowed = torch.zeros(n_concepts, dtype=torch.bool, device=device)
        allowed[candidates] = True
        logits = logits.masked_fill(~allowed, float("-inf"))
        if not allowed.any():
            return {
                "keep": torch.zeros(n_regions, dtype=torch.bool, device=device),
                "hard": torch.full((n_regions,), -1, dtype=torch.long, device=device),
                "score": torch.zeros(n_regions, device=device),
                "topk_ids": torch.full((n_regions, k), -1, dtype=torch.long, device=device),
                "topk_logits": torch.full((n_regions, k), float("-inf"), device=device),
            }
    top_logp, hard = F.log_softmax(logits, dim=-1).max(dim=-1)
    score = top_logp.exp()
    keep = score > threshold
    if keep_all_if_none and not keep.any():
        keep = torch.ones_like(keep)
    topk_logits, topk_ids = logits.topk(k, dim=-1)
    topk_ids = topk_ids.masked_fill(torch.isinf(topk_logits), -1)
    return {"keep": keep, "hard": hard, "score": score, "topk_ids": topk_ids, "topk_logits": topk_logits}


def sample_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator seeded by ``(seed, key)``: a sample's draw is the same in any batch or process."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# --------------------------------------------------------------------------------------------
# Caption candidates (caption mode)
# --------------------------------------------------------------------------------------------


class CaptionCandidates:
    """Pool ids of the concepts and phrases named by a sample's captions (GLIP-style grounding).

    ``phrases_file``: JSONL of ``{"key", "phrases", "concepts"}`` as the concepts stage writes it;
    empty = parse the captions here with spaCy (the same noun-chunk rules, :mod:`regionclip.concepts`).
    """

    def __init__(self, names: Sequence[str], phrases_file: str = "", spacy_model: str = ""):
        self.name_to_id = {n: i for i, n in enumerate(names)}
        self.table: dict[str, list[str]] | None = None
        self.parser = None
        if phrases_file:
            self.table = _read_phrases(Path(phrases_file))
        else:
            from regionclip.concepts import CaptionParser  # spaCy loads only in caption mode

            self.parser = CaptionParser(spacy_model, batch_size=64)

    def __call__(self, keys: Sequence[str], captions: Sequence[Sequence[str]]) -> list[Tensor | None]:
        """One sorted LongTensor of pool ids per sample; None when its key is not in the phrases file."""
        if self.table is not None:
            texts = [self.table.get(k) for k in keys]
        else:
            assert self.parser is not None
            flat = [c for caps in captions for c in caps]
            parses = iter(list(self.parser.parse(flat)))
            texts = []
            for caps in captions:
                words: list[str] = []
                for _ in caps:
                    p = next(parses)
                    words += [*p.phrases, *p.concepts]
                texts.append(words)
        return [
            None
            if words is None
            else torch.tensor(
                sorted({self.name_to_id[w] for w in words if w in self.name_to_id}), dtype=torch.long
            )
            for words in texts
        ]


def _read_phrases(path: Path) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read caption phrases {path}: {e.strerror}") from e
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string 'key'")
        words = [*entry.get("phrases", []), *entry.get("concepts", [])]
        if not all(isinstance(w, str) for w in words):
            raise ValueError(f"{path}:{lineno}: 'phrases' and 'concepts' must be lists of strings")
        table.setdefault(entry["key"], []).extend(words)
    return table


# --------------------------------------------------------------------------------------------
# The labeler
# --------------------------------------------------------------------------------------------


@dataclass
class LabelInput:
    """One decoded source sample."""

    key: str
    image: Image.Image
    captions: list[str]


class PseudoLabeler:
    """Proposals → teacher region embeddings → concept assignment for batches of images.

    Args:
        encoder: the teacher's :class:`RegionEncoder`; frozen and put in eval mode here.
        proposals: a :class:`~regionclip.proposals.ProposalSource` (boxes in original pixels).
        concept_emb: [K, D] concept embeddings (normalised here).
        cfg: the ``pseudolabel`` config section.
        candidates: caption mode's :class:`CaptionCandidates` (required when ``cfg.mode == 'caption'``).
    """

    def __init__(
        self,
        encoder: RegionEncoder,
        proposals: ProposalSource,
        concept_emb: Tensor,
        cfg: PseudoLabelConfig,
        candidates: CaptionCandidates | None = None,
    ):
        if cfg.mode not in MODES:
            raise ValueError(f"pseudolabel.mode={cfg.mode!r}: expected one of {MODES}")
        if cfg.mode == "caption" and candidates is None:
            raise ValueError("caption mode needs the caption candidates")
        if cfg.logits_dtype not in LOGITS_DTYPES:
            raise ValueError(
                f"pseudolabel.logits_dtype={cfg.logits_dtype!r}: expected one of {sorted(LOGITS_DTYPES)}"
            )
        if concept_emb.dim() != 2 or concept_emb.shape[1] != encoder.output_dim:
            raise ValueError(
                f"concept embeddings of shape {tuple(concept_emb.shape)} do not fit the teacher's "
                f"{encoder.output_dim}-d region embeddings (embed the pool with the teacher's text tower)"
            )
        self.encoder = encoder.eval().requires_grad_(False)
        self.device = next(encoder.parameters()).device
        self.proposals = proposals
        self.concepts = F.normalize(concept_emb.float(), dim=-1).to(self.device)
        self.cfg = cfg
        self.candidates = candidates if cfg.mode == "caption" else None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def label_batch(self, samples: Sequence[LabelInput]) -> list[dict[str, Any]]:
        """Label a batch; one record per sample with the kept regions as NumPy arrays.

        Record: ``key``, ``num_proposals`` (regions sampled), ``num_kept``, ``drop_reason`` ('' or
        one of :data:`DROP_REASONS`) and the arrays named in :data:`REGION_FIELDS` (+ ``emb``).
        """
        cfg = self.cfg
        if not samples:
            return []
        keys = [s.key for s in samples]
        images = [pil_to_tensor(s.image) for s in samples]
        try:
            all_boxes, all_scores = self.proposals(keys, images)
        except ProposalError:  # a precomputed table without some keys: those samples get none
            all_boxes, all_scores = [], []
            for key, image in zip(keys, images, strict=True):
                try:
                    (b,), (sc,) = self.proposals([key], [image])
                except ProposalError:
                    b, sc = torch.zeros(0, 4), torch.zeros(0)
                all_boxes.append(b)
                all_scores.append(sc)
        boxes, objectness = [], []
        for key, b, sc in zip(keys, all_boxes, all_scores, strict=True):
            idx = sample_proposals(
                b.cpu(), sc.cpu(), cfg.num_regions, sample_generator(cfg.seed, key), cfg.proposal_pool
            )
            boxes.append(b.cpu()[idx].float())
            objectness.append(sc.cpu()[idx].float())
        cands: list[Tensor | None] = [None] * len(samples)
        teacher_boxes = boxes
        if self.candidates is not None:
            cands = self.candidates(keys, [s.captions for s in samples])
            # regions of a caption without pool concepts get no label: skip their teacher work
            teacher_boxes = [
                b if c is not None and c.numel() else b[:0] for b, c in zip(boxes, cands, strict=True)
            ]
        with self._autocast():
            embs = encode_regions(
                self.encoder,
                [s.image for s in samples],
                teacher_boxes,
                cfg.short_side,
                cfg.max_side,
                batch_size=len(samples),
            )
        return [
            self._record(key, b, o, e.float(), c)
            for key, b, o, e, c in zip(keys, boxes, objectness, embs, cands, strict=True)
        ]

    def _record(
        self, key: str, boxes: Tensor, objectness: Tensor, emb: Tensor, cand: Tensor | None
    ) -> dict[str, Any]:
        cfg = self.cfg
        drop = ""
        num_proposals = len(boxes)
        if len(boxes) == 0:
            drop = "no_proposals"
        elif self.candidates is not None and (cand is None or cand.numel() == 0):
            # no entry in the phrases file (other shards than `make concepts` read), or no pool concept
            drop = "caption_not_parsed" if cand is None else "no_caption_candidates"
        if drop:
            boxes, objectness, emb = boxes[:0], objectness[:0], emb[:0]
        out = assign_concepts(
            emb,
            self.concepts,
            cfg.temperature,
            cfg.threshold,
            cfg.topk,
            None if cand is None else cand.to(self.device),
            cfg.keep_all_if_none,
        )
        keep = out["keep"].cpu()
        record: dict[str, Any] = {
            "key": key,
            "num_proposals": num_proposals,
            "num_kept": int(keep.sum()),
            "drop_reason": drop,
            "boxes": boxes[keep].numpy().astype(np.float32),
            "objectness": objectness[keep].numpy().astype(np.float32),
            "concept": out["hard"].cpu()[keep].numpy().astype(np.int32),
            "score": out["score"].cpu()[keep].numpy().astype(np.float32),
            "topk_ids": out["topk_ids"].cpu()[keep].numpy().astype(np.int32),
            "topk_logits": out["topk_logits"].cpu()[keep].numpy().astype(LOGITS_DTYPES[cfg.logits_dtype]),
        }
        if cfg.store_embeddings:
            record["emb"] = emb.cpu()[keep].numpy().astype(np.float16)
        return record


# --------------------------------------------------------------------------------------------
# Shard format
# --------------------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{where}: not a plain .npy array: {e}") from None


def output_name(url: str) -> str:
    """Output shard file name of an input shard URL: its base name (``pretrain-000003.tar``)."""
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    if name.startswith("pipe:"):
        name = name.split()[-1]
    return name if name.endswith(".tar") else f"{name}.tar"


def manifest_path(shard: str | os.PathLike) -> Path:
    shard = Path(shard)
    return shard.with_name(shard.name.removesuffix(".tar") + ".manifest.json")


class _NamedShard(ShardWriter):
    """ShardWriter's atomic, byte-reproducible tar under one fixed file name."""

    def __init__(self, path: Path):
        super().__init__(path.parent, path.stem, maxcount=2**62, maxsize=2**62)
        self.path = path

    def shard_path(self, index: int) -> Path:
        return self.path

    def finish(self) -> None:
        """Close the shard; with no sample written, still leave a valid empty tar as the done marker."""
        if self._tar is None:
            self._open_shard()
        self.close()


def pseudo_sample(
    record: dict[str, Any], src: dict[str, Any], pool_sha256: str, store_image: bool
) -> dict[str, Any]:
    """A shard sample from a labeler record and its decoded source sample."""
    meta = {
        "key": record["key"],
        "width": src["width"],
        "height": src["height"],
        "concept_pool_sha256": pool_sha256,
        "num_proposals": record["num_proposals"],
        "num_kept": record["num_kept"],
        "drop_reason": record["drop_reason"],
        "captions": src["captions"],
        "source_meta": src["meta"],
    }
    sample: dict[str, Any] = {"__key__": record["key"], "txt": src["captions"][0], "json": meta}
    for name in (*REGION_FIELDS, "emb"):
        if name in record:
            sample[f"{name}.npy"] = npy_bytes(record[name])
    if store_image:
        sample[src["image_ext"]] = src["image_bytes"]
    return sample


def decode_pseudo_sample(raw: dict[str, Any], decode_image: bool = True) -> dict[str, Any]:
    """A raw tar sample of a pseudo-label shard → ``key``, ``caption``, ``meta``, arrays, ``image``
    (PIL; None when not stored or not ``decode_image``). Raises ValueError naming the sample on
    malformed fields."""
    where = f"sample {raw.get('__key__')!r} in {raw.get('__url__', '?')}"
    if ERROR_FIELD in raw:
        raise ValueError(f"{raw.get('__url__', '?')}: {raw[ERROR_FIELD]}: {raw.get('detail', '')}")
    out: dict[str, Any] = {"key": raw["__key__"]}
    try:
        out["meta"] = json.loads(raw["json"].decode("utf-8"))
        out["caption"] = raw["txt"].decode("utf-8")
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: bad or missing json/txt: {e}") from None
    for name in (*REGION_FIELDS, "emb"):
        if f"{name}.npy" in raw:
            out[name] = load_npy(raw[f"{name}.npy"], f"{where} field {name}.npy")
        elif name != "emb":
            raise ValueError(f"{where}: missing field {name}.npy")
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    out["image"] = (
        None if ext is None or not decode_image else Image.open(io.BytesIO(raw[ext])).convert("RGB")
    )
    return out


def iter_pseudo_labels(urls: str | list[str], decode_image: bool = True) -> Iterator[dict[str, Any]]:
    """Decoded samples of pseudo-label shards (see :func:`decode_pseudo_sample`), in file order."""
    for raw in expand_shards({"url": u} for u in expand_urls(urls)):
        yield decode_pseudo_sample(raw, decode_image)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


@dataclass
class StageStats:
    """Counts of one process's part of the stage (summed over processes for the summary)."""

    images: int = 0
    regions_proposed: int = 0
    regions_kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # images without regions, by reason
    shards_done: int = 0
    shards_reused: int = 0
    errors: SampleErrors = field(default_factory=SampleErrors)
    images_this_run: int = 0

    def add_counts(self, counts: dict[str, Any]) -> None:
        self.images += counts["images"]
        self.regions_proposed += counts["regions_proposed"]
        self.regions_kept += counts["regions_kept"]
        self.dropped.update(counts["regions_dropped"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "regions_proposed": self.regions_proposed,
            "regions_kept": self.regions_kept,
            "dropped": dict(self.dropped),
            "shards_done": self.shards_done,
            "shards_reused": self.shards_reused,
            "images_this_run": self.images_this_run,
            "skipped": dict(self.errors.counts),
            "report": self.errors.report_lines() if self.errors.counts else [],
            "unreadable_shards": list(self.errors.unreadable_shards),
        }


def merge_stats(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum :meth:`StageStats.to_dict` results of several processes."""
    total: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            if isinstance(v, dict):
                c = total.setdefault(k, Counter())
                c.update(v)
            elif isinstance(v, list):
                total.setdefault(k, []).extend(v)
            else:
                total[k] = total.get(k, 0) + v
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in total.items()}


@dataclass
class RunIdentity:
    """What makes two runs' output shards interchangeable (recorded in every manifest)."""

    config: dict[str, Any]
    config_hash: str
    concept_pool: dict[str, Any]
    teacher: dict[str, str]
    rpn: dict[str, Any]

    def run_hash(self, url: str) -> str:
        blob = json.dumps(
            [self.config_hash, self.concept_pool["sha256"], self.teacher, self.rpn, url], sort_keys=True
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def label_settings(cfg: PseudoLabelConfig) -> PseudoLabelConfig:
    """The settings that change the labels. Locations are blanked (moving data changes nothing;
    the concept pool and the input shard are identified by hash and URL in the manifest); in
    caption mode the phrases file is replaced by its content hash."""
    phrases = ""
    if cfg.mode == "caption":
        phrases = f"sha256:{sha256_file(cfg.caption_phrases)}" if cfg.caption_phrases else "parsed here"
    return replace(cfg, input_shards="", out_dir="", concepts="", caption_phrases=phrases)


def rpn_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    r = cfg.rpn
    if r.precomputed:
        return {"kind": "precomputed", "path": str(r.precomputed), "sha256": sha256_file(r.precomputed)}
    from regionclip.proposals import CONFIG_FILE, WEIGHTS_FILE

    meta = json.loads((Path(r.out_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    return {
        "kind": "network",
        "sha256": sha256_file(Path(r.out_dir) / WEIGHTS_FILE),
        "config_hash": meta.get("config_hash", ""),
    }


def concept_pool_identity(
    path: str | os.PathLike, names: Sequence[str], metadata: dict[str, str]
) -> dict[str, Any]:
    return {
        "path": str(Path(path).resolve()),
        "sha256": sha256_file(path),
        "count": len(names),
        "names_sha256": hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest(),
        "embedded_with": metadata.get("weights_id", ""),
    }


def is_finished(out_path: Path, run_hash: str) -> bool:
    """An output shard counts as done when it and its manifest exist and the manifest matches."""
    mpath = manifest_path(out_path)
    if not (out_path.is_file() and mpath.is_file()):
        return False
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return manifest.get("run_hash") == run_hash and manifest.get("shard_bytes") == out_path.stat().st_size


def remove_stale_temps(out_path: Path) -> None:
    """Temp files a killed run left for this shard (ShardWriter's and atomic_output's)."""
    for pattern in (f".{out_path.name}.tmp*", f".{manifest_path(out_path).name}.tmp*"):
        for stale in out_path.parent.glob(pattern):
            stale.unlink(missing_ok=True)


def _decoded(raw: dict[str, Any]) -> dict[str, Any]:
    """Reader sample (image bytes not decoded) → + ``image`` PIL, or an error record."""
    try:
        im = Image.open(io.BytesIO(raw["image"]))
        im.load()
        image = im if im.mode == "RGB" else im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt data
        return error_record("bad_image", raw["__key__"], raw["__url__"], f"{type(e).__name__}: {e}")
    return {
        **raw,
        "image_bytes": raw["image"],
        "image": image,
        "width": image.width,
        "height": image.height,
    }


def label_shard(
    labeler: PseudoLabeler,
    url: str,
    out_path: Path,
    identity: RunIdentity,
    progress: Callable[[int], None] = lambda n: None,
) -> tuple[dict[str, Any] | None, SampleErrors]:
    """Label one input shard into ``out_path`` + manifest; returns ``(manifest, errors)``.

    Bad samples are skipped and counted. When the input shard cannot be read to its end nothing
    is written (manifest None), so that a later run retries it.
    """
    cfg = labeler.cfg
    errors = SampleErrors()
    counts = {"images": 0, "regions_proposed": 0, "regions_kept": 0, "regions_dropped": Counter()}
    pipeline = image_text_pipeline(url, decode_image=False, split_by_node=False, split_by_worker=False)
    writer = _NamedShard(out_path)

    def flush(batch: list[dict[str, Any]]) -> None:
        records = labeler.label_batch([LabelInput(s["__key__"], s["image"], s["captions"]) for s in batch])
        for rec, src in zip(records, batch, strict=True):
            writer.write(pseudo_sample(rec, src, identity.concept_pool["sha256"], cfg.store_image))
            counts["images"] += 1
            counts["regions_proposed"] += rec["num_proposals"]
            counts["regions_kept"] += rec["num_kept"]
            if rec["drop_reason"]:
                counts["regions_dropped"][rec["drop_reason"]] += 1
        progress(len(batch))

    try:
        batch: list[dict[str, Any]] = []
        for item in pipeline:
            sample = item if ERROR_FIELD in item else _decoded(item)
            if ERROR_FIELD in sample:
                errors.add(sample)
                continue
            batch.append(sample)
            if len(batch) == cfg.batch_size:
                flush(batch)
                batch = []
        flush(batch)
    except BaseException:
        writer.abort()
        raise
    if errors.unreadable_shards:
        writer.abort()
        return None, errors
    writer.finish()
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "input_url": url,
        "shard": out_path.name,
        "shard_bytes": out_path.stat().st_size,
        "counts": {**counts, "regions_dropped": dict(counts["regions_dropped"])},
        "skipped": dict(errors.counts),
        "concept_pool": identity.concept_pool,
        "teacher": identity.teacher,
        "rpn": identity.rpn,
        "mode": cfg.mode,
        "config": identity.config,
        "config_hash": identity.config_hash,
        "run_hash": identity.run_hash(url),
    }
    atomic_write_json(manifest_path(out_path), manifest)
    return manifest, errors


def assign_shards(urls: Sequence[str], rank: int, world: int) -> list[str]:
    """This process's input shards: every ``world``-th, starting at ``rank``."""
    return list(urls[rank::world])


def plan_outputs(cfg: PseudoLabelConfig) -> list[tuple[str, Path]]:
    """``(input url, output path)`` of every input shard; two inputs with one name are an error."""
    urls = expand_urls(cfg.input_shards)
    if not urls:
        raise ValueError(f"pseudolabel.input_shards={cfg.input_shards!r} names no shards")
    out_dir = Path(cfg.out_dir)
    seen: dict[str, str] = {}
    plan = []
    for url in urls:
        name = output_name(url)
        if name in seen:
            raise ValueError(
                f"input shards {seen[name]} and {url} would both write {out_dir / name}; rename one"
            )
        seen[name] = url
        plan.append((url, out_dir / name))
    return plan


def run_shards(
    labeler: PseudoLabeler,
    plan: Sequence[tuple[str, Path]],
    identity: RunIdentity,
    progress: Callable[[int], None] = lambda n: None,
) -> StageStats:
    """Label every ``(url, out_path)`` of ``plan`` that is not finished yet; finished ones are reused."""
    stats = StageStats()
    for url, out_path in plan:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_path)
        if is_finished(out_path, identity.run_hash(url)):
            manifest = json.loads(manifest_path(out_path).read_text(encoding="utf-8"))
            stats.add_counts(manifest["counts"])
            stats.errors.counts.update(manifest["skipped"])
            stats.shards_reused += 1
            continue
        manifest, errors = label_shard(labeler, url, out_path, identity, progress)
        stats.errors.update(errors)
        if manifest is not None:
            stats.add_counts(manifest["counts"])
            stats.images_this_run += manifest["counts"]["images"]
            stats.shards_done += 1
    return stats


def build_labeler(
    cfg: ExperimentConfig, device: torch.device
) -> tuple[PseudoLabeler, RunIdentity, list[str]]:
    """Load teacher, proposal source and concept pool of ``cfg``; returns (labeler, identity, names)."""
    from regionclip.models.loading import load_clip
    from regionclip.proposals import build_proposal_source
    from regionclip.text import load_embeddings

    pl = cfg.pseudolabel
    concept_emb, names, metadata = load_embeddings(pl.concepts)
    # a random-init teacher (tests, smoke runs) must be the same in every process and every run
    torch.manual_seed(pl.seed)
    loaded = load_clip(cfg.teacher, device)
    encoder = RegionEncoder(loaded.model.visual, pl.pooler_resolution or None)
    if metadata.get("weights_id") and metadata["weights_id"] != loaded.weights_id:
        log.warning(
            "concept embeddings %s were made with %s, the teacher is %s",
            pl.concepts,
            metadata["weights_id"],
            loaded.weights_id,
        )
    try:
        proposals = build_proposal_source(cfg.rpn, device)
    except ProposalError as e:
        raise ValueError(str(e)) from None
    candidates = (
        CaptionCandidates(names, pl.caption_phrases, pl.spacy_model) if pl.mode == "caption" else None
    )
    labeler = PseudoLabeler(encoder, proposals, concept_emb, pl, candidates)
    settings = label_settings(pl)
    identity = RunIdentity(
        config=to_dict(settings),
        config_hash=section_hash(settings),
        concept_pool=concept_pool_identity(pl.concepts, names, metadata),
        teacher=dict(loaded.identity),
        rpn=rpn_identity(cfg),
    )
    return labeler, identity, names


# --------------------------------------------------------------------------------------------
# Label precision against drawn objects (EmojiWorld)
# --------------------------------------------------------------------------------------------


def emojiworld_objects(meta: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """``(category name, [x0, y0, x1, y1])`` of the objects an EmojiWorld sample's json records."""
    return [(o["name"], [float(v) for v in o["box"]]) for o in meta.get("objects", [])]


def label_precision(
    pseudo_shards: str | list[str],
    concept_names: Sequence[str],
    gt_from_sample_json: Callable[[dict[str, Any]], list[tuple[str, list[float]]]] = emojiworld_objects,
    iou: float = 0.5,
) -> dict[str, float]:
    """Fraction of kept regions with IoU >= ``iou`` to a ground-truth box of the same category.

    ``gt_from_sample_json`` maps a source sample's json (``source_meta`` of the pseudo sample) to
    its objects; concept name == category name. Returns ``precision``, ``correct``, ``kept``,
    ``images``.
    """
    correct = kept = images = 0
    for sample in iter_pseudo_labels(pseudo_shards, decode_image=False):
        images += 1
        gt = gt_from_sample_json(sample["meta"].get("source_meta", {}))
        n = len(sample["boxes"])
        kept += n
        if not n or not gt:
            continue
        gt_boxes = torch.tensor([b for _, b in gt], dtype=torch.float32)
        overlaps = box_iou(torch.from_numpy(sample["boxes"]).float(), gt_boxes)  # [R, G]
        same = torch.tensor(
            [[concept_names[c] == name for name, _ in gt] for c in sample["concept"].tolist()],
            dtype=torch.bool,
        )
        correct += int(((overlaps >= iou) & same).any(dim=1).sum())
    return {"precision": correct / kept if kept else 0.0, "correct": correct, "kept": kept, "images": images}
