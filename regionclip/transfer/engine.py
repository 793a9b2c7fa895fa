"""`make transfer`: train the open-vocabulary detector on base boxes, evaluate AP50 base/novel/all.

One run lives in ``transfer.out_dir``:

- ``class_embeddings.safetensors`` (+ ``.txt``): prompt-ensembled text embeddings of every
  category name of the train and val jsons, from the init model's text tower (a cache; or the
  file given as ``transfer.class_embeddings``);
- ``checkpoint/``: ``step-N.safetensors`` (weights, SGD momentum, RNG) + ``latest.json``, removed
  once training finishes; a re-run resumes from it exactly (same images, flips and scales);
- ``model.safetensors`` + ``model.json``: the trained detector (without the frozen RPN and the
  vocabulary) with its config, init identity and training vocabulary;
- ``detections.json`` (COCO results) and ``metrics.json``: AP50 all/base/novel (fractions 0-1,
  as RegionCLIP's evaluator, via :func:`regionclip.evaluation.coco_ap_by_split`) + the 12
  standard COCO metrics + per-class AP50.

A run whose ``metrics.json`` carries the same run hash (config, init weights, RPN) is skipped.

Bad input: training skips and counts images whose file is missing or unreadable (the first few
are named in the log), like the RPN stage; evaluation refuses to start when an image of the val
json is missing and stops at an unreadable one, naming the file — AP over a silently reduced
set would be wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from regionclip.config import TransferConfig, section_hash, to_dict
from regionclip.data.shards import ERROR_FIELD, SampleErrors, error_record
from regionclip.evaluation import coco_ap_by_split
from regionclip.models.loading import WEIGHTS_FILE as CLIP_WEIGHTS_FILE
from regionclip.models.loading import LoadedClip, load_clip
from regionclip.models.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    batch_images,
    pil_to_tensor,
    resize_for_detection,
)
from regionclip.proposals import CONFIG_FILE as RPN_CONFIG_FILE
from regionclip.proposals import (
    BoxImage,
    NetworkProposals,
    ProposalError,
    category_splits,
    load_box_json,
    load_rpn,
)
from regionclip.sgd import load_checkpoint, optimizer_step, save_checkpoint, update_running
from regionclip.text import embed_class_names, embedding_metadata, load_embeddings, save_embeddings
from regionclip.transfer.torchvision_rcnn import OpenVocabFasterRCNN, build_detector
from regionclip.utils import atomic_output, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

FORMAT = "regionclip.transfer"
FORMAT_VERSION = 1
EMBEDDINGS_FILE = "class_embeddings.safetensors"
MODEL_FILE = "model.safetensors"
MODEL_JSON = "model.json"
METRICS_FILE = "metrics.json"
DETECTIONS_FILE = "detections.json"
CHECKPOINT_DIR = "checkpoint"

ProposalFn = Callable[[Sequence[str], Sequence[Tensor]], tuple[list[Tensor], list[Tensor]]]


class TransferError(ValueError):
    """Bad transfer input (json, images, embeddings, checkpoint); the message names the file."""


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


def read_categories(json_path: str | Path) -> list[dict[str, Any]]:
    """The ``categories`` of a COCO json (in file order), each with ``id`` and a unique ``name``."""
    try:
        data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except OSError as e:
        raise TransferError(f"cannot read {json_path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise TransferError(f"{json_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats:
        raise TransferError(f"{json_path}: no 'categories' list; the detector needs class names")
    for i, c in enumerate(cats):
        if not (isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)):
            raise TransferError(f"{json_path}: categories[{i}] needs an integer 'id' and a 'name'")
    names = [c["name"] for c in cats]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TransferError(f"{json_path}: category names must be unique, repeated: {dupes[:5]}")
    return cats


def select_embeddings(
    embeddings: Tensor, names: Sequence[str], wanted: Sequence[str], source: str, json_path: str | Path
) -> Tensor:
    """Rows of ``embeddings`` [K, D] (named ``names``) for the category names ``wanted``, in order.

    Raises:
        TransferError: some categories of ``json_path`` have no embedding in ``source``.
    """
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in wanted if n not in index]
    if missing:
        raise TransferError(
            f"class-count mismatch: {json_path} has {len(wanted)} categories but {source} holds "
            f"{len(names)} class embeddings without {len(missing)} of them: {missing[:5]}"
        )
    return embeddings[[index[n] for n in wanted]]


def class_embeddings(
    cfg: TransferConfig, loaded: LoadedClip, names: Sequence[str]
) -> tuple[Tensor, list[str], str]:
    """``(embeddings [K, D], their names, source)`` covering ``names``.

    ``cfg.class_embeddings`` when set; otherwise the cache in ``out_dir``, re-embedded with the
    init model's text tower when the model, template set or names differ.
    """
    if cfg.class_embeddings:
        try:
            emb, file_names, _ = load_embeddings(cfg.class_embeddings)
        except (OSError, ValueError) as e:
            raise TransferError(str(e)) from e
        return emb, file_names, cfg.class_embeddings
    path = Path(cfg.out_dir) / EMBEDDINGS_FILE
    meta = embedding_metadata(loaded, cfg.templates)
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            emb, cached, saved = load_embeddings(path)
            if cached == list(names) and all(saved.get(k) == v for k, v in meta.items()):
                return emb, cached, str(path)
    emb = embed_class_names(loaded, names, cfg.templates)
    save_embeddings(path, emb, names, meta)
    log.info("transfer: embedded %d class names with %s into %s", len(names), loaded.weights_id, path)
    return emb, list(names), str(path)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _load_image(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


@dataclass
class _Prepared:
    image: Tensor  # [3, h, w] CLIP-normalised at detection size
    raw: Tensor | None  # [3, H, W] in [0, 1] at the original size (the frozen RPN's input)
    scale: float  # original pixels -> detection pixels


def _prepare(pil: Image.Image, short_side: int, max_side: int, with_raw: bool) -> _Prepared:
    tensor, scale = resize_for_detection(pil, short_side, max_side, mean=CLIP_MEAN, std=CLIP_STD)
    return _Prepared(tensor, pil_to_tensor(pil) if with_raw else None, scale)


class _TrainImages(Dataset):
    """Items ``(index, flip, short_side)`` → image, boxes, labels; an error record if unreadable."""

    def __init__(self, images: list[BoxImage], labels: list[Tensor], max_side: int, with_raw: bool):
        self.images, self.labels, self.max_side, self.with_raw = images, labels, max_side, with_raw

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, bool, int]) -> dict[str, Any]:
        index, flip, short_side = item
        rec = self.images[index]
        try:
            pil = _load_image(rec.file)
        except (OSError, ValueError) as e:
            return error_record("unreadable_image", rec.file_name, str(rec.file), str(e))
        w, h = pil.size
        boxes = torch.tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = boxes[keep], self.labels[index][keep]
        if flip:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        prep = _prepare(pil, short_side, self.max_side, self.with_raw)
        return {"key": rec.file_name, "prep": prep, "boxes": boxes * prep.scale, "labels": labels}


class _StepBatches(Sampler):
    """Batches for steps ``start..stop-1``; step ``s`` always gets the same images, flips and scales.

    Sample position ``p = s * batch_size + j`` is entry ``p % N`` of epoch ``p // N``'s seeded
    draw, so resuming at any step needs no sampler state.
    """

    def __init__(self, n: int, cfg: TransferConfig, start: int, stop: int):
        self.n, self.cfg, self.start, self.stop = n, cfg, start, stop
        self._epoch = -1
        self._draw: tuple[Tensor, Tensor, Tensor] = (torch.empty(0),) * 3

    def __len__(self) -> int:
        return self.stop - self.start

    def _entry(self, p: int) -> tuple[int, bool, int]:
        epoch = p // self.n
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            flips = torch.rand(self.n, generator=g) < self.cfg.hflip_prob
            sides = torch.randint(len(self.cfg.train_short_sides), (self.n,), generator=g)
            self._epoch, self._draw = epoch, (perm, flips, sides)
        perm, flips, sides = self._draw
        i = p % self.n
        return int(perm[i]), bool(flips[i]), int(self.cfg.train_short_sides[int(sides[i])])

    def __iter__(self) -> Iterator[list[tuple[int, bool, int]]]:
        b = self.cfg.batch_size
        for step in range(self.start, self.stop):
            yield [self._entry(p) for p in range(step * b, (step + 1) * b)]


def _proposals_for(
    rpn: ProposalFn | None,
    keys: Sequence[str],
    preps: Sequence[_Prepared],
    max_proposals: int,
    device: torch.device,
) -> list[Tensor] | None:
    """Frozen-RPN boxes (original pixels; highest objectness first, so ``max_proposals`` > 0 keeps
    the top-k) scaled into each image's detection frame."""
    if rpn is None:
        return None
    boxes, _ = rpn(keys, [p.raw for p in preps])
    k = max_proposals if max_proposals > 0 else None
    return [(b[:k].float() * p.scale).to(device) for b, p in zip(boxes, preps, strict=True)]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TransferConfig) -> float:
    """Detectron2's WarmupMultiStepLR: linear warm-up from 0.1 %, ×``lr_decay_factor`` at each
    ``lr_decay_at`` fraction of ``steps``."""
    factor = 1.0
    if step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        factor = 0.001 * (1 - alpha) + alpha
    decays = sum(step >= int(f * cfg.steps) for f in cfg.lr_decay_at)
    return cfg.lr * factor * cfg.lr_decay_factor**decays


def _resume_hash(cfg: TransferConfig, run_inputs: str) -> str:
    """Fields that shape the training trajectory (not paths, workers, checkpoints or evaluation)."""
    trajectory = replace(
        cfg, tag="", out_dir="", val_json="", num_workers=0, checkpoint_every=0, eval_batch_size=0,
        score_thresh=0.0, nms_thresh=0.0, detections_per_image=0, test_short_side=0,
    )  # fmt: skip
    return hashlib.sha256(f"{section_hash(trajectory)}|{run_inputs}".encode()).hexdigest()[:16]


def train_detector(
    model: OpenVocabFasterRCNN,
    rpn: ProposalFn | None,
    images: list[BoxImage],
    labels: list[Tensor],
    cfg: TransferConfig,
    device: torch.device,
    resume_hash: str,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """SGD on the base boxes from the latest checkpoint to ``cfg.steps`` (or ``stop_after`` more).

    Returns the training summary; ``summary["finished"]`` is False when stopped early (the
    checkpoint then holds the state).
    """
    ckpt_dir = Path(cfg.out_dir) / CHECKPOINT_DIR
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start, progress = load_checkpoint(
        ckpt_dir, model, optimizer, resume_hash, "transfer config, init model or RPN", TransferError
    )
    stop = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    skipped = SampleErrors()
    skipped.counts.update(progress.get("skipped", {}))
    loader = DataLoader(
        _TrainImages(images, labels, cfg.max_side, with_raw=rpn is not None),
        batch_sampler=_StepBatches(len(images), cfg, start, stop),
        num_workers=cfg.num_workers,
        collate_fn=list,
        generator=torch.Generator().manual_seed(
            cfg.seed
        ),  # keeps the global RNG (restored on resume) untouched
    )
    if start:
        log.info("transfer: resuming at step %d from %s", start, ckpt_dir)
    autocast = cfg.precision == "bf16" and device.type == "cuda"
    model.train()
    seen, seconds = int(progress.get("images", 0)), float(progress.get("seconds", 0.0))
    recent: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    step = start
    bar = tqdm(loader, total=stop - start, desc=f"transfer steps {start}->{stop}", unit="step")
    for batch in bar:
        good = [s for s in batch if ERROR_FIELD not in s]
        for s in batch:
            if ERROR_FIELD in s:
                skipped.add(s)
        if good:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            preps = [s["prep"] for s in good]
            tensor, sizes = batch_images([p.image for p in preps])
            proposals = _proposals_for(rpn, [s["key"] for s in good], preps, cfg.max_proposals, device)
            targets = [{"boxes": s["boxes"].to(device), "labels": s["labels"].to(device)} for s in good]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                losses = model(tensor.to(device), sizes, proposals, targets)
            optimizer_step(losses, optimizer, f"transfer step {step}", "transfer.lr")
            seen += len(good)
            bar.set_postfix(update_running(recent, losses), refresh=False)
        step += 1
        if step < stop and cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt_dir, model, optimizer, step, resume_hash,
                             {"images": seen, "seconds": seconds + time.perf_counter() - t0,
                              "skipped": dict(skipped.counts)})  # fmt: skip
    bar.close()
    seconds += time.perf_counter() - t0
    summary = {
        "finished": step >= cfg.steps,
        "steps": step,
        "images": seen,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(step, 1), 4),
        "images_per_s": round(seen / max(seconds, 1e-9), 2),
        "final_losses": {
            k: float(np.mean(v)) for k, v in recent.items()
        },  # last (up to) 20 steps of this call
        "skipped": dict(skipped.counts),
    }
    if step < cfg.steps:
        save_checkpoint(ckpt_dir, model, optimizer, step, resume_hash,
                         {"images": seen, "seconds": seconds, "skipped": dict(skipped.counts)})  # fmt: skip
    for line in skipped.report_lines()[1:] if skipped.counts else []:
        log.info("transfer: %s", line)
    return summary


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def read_eval_images(json_path: str | Path, image_root: str | Path) -> list[dict[str, Any]]:
    """Images of a COCO json (``id``, ``file_name``, ``file``); every file must exist.

    Raises:
        TransferError: naming the json and the first missing files.
    """
    try:
        data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TransferError(f"cannot read {json_path}: {e}") from e
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise TransferError(f"{json_path}: not a COCO json (no 'images' list)")
    root, out, missing = Path(image_root), [], []
    for i, img in enumerate(images):
        if not (isinstance(img, dict) and "id" in img and isinstance(img.get("file_name"), str)):
            raise TransferError(f"{json_path}: images[{i}] needs 'id' and 'file_name'")
        file = root / img["file_name"]
        if not file.is_file():
            missing.append(str(file))
        out.append({"id": img["id"], "file_name": img["file_name"], "file": file})
    if missing:
        raise TransferError(
            f"{json_path}: {len(missing)} of {len(images)} image files do not exist (image_root {root}): "
            + ", ".join(missing[:5])
        )
    return out


@torch.no_grad()
def detect_images(
    model: OpenVocabFasterRCNN,
    rpn: ProposalFn | None,
    images: list[dict[str, Any]],
    category_ids: Sequence[int],
    cfg: TransferConfig,
    device: torch.device,
) -> list[dict[str, Any]]:
    """COCO results (``image_id``, ``category_id``, ``bbox`` xywh in original pixels, ``score``)
    for ``images`` with the model's current vocabulary (row k ↔ ``category_ids[k]``)."""
    if len(category_ids) != model.num_classes:
        raise TransferError(
            f"class-count mismatch: {len(category_ids)} category ids for {model.num_classes} class embeddings"
        )
    model.eval()
    results: list[dict[str, Any]] = []
    autocast = cfg.precision == "bf16" and device.type == "cuda"
    for start in tqdm(range(0, len(images), cfg.eval_batch_size), desc="transfer eval", unit="batch"):
        chunk = images[start : start + cfg.eval_batch_size]
        preps, sizes = [], []
        for img in chunk:
            try:
                pil = _load_image(img["file"])
            except (OSError, ValueError) as e:
                raise TransferError(f"cannot read image {img['file']}: {e}") from e
            sizes.append((pil.height, pil.width))
            preps.append(_prepare(pil, cfg.test_short_side, cfg.max_side, rpn is not None))
        tensor, image_sizes = batch_images([p.image for p in preps])
        proposals = _proposals_for(rpn, [i["file_name"] for i in chunk], preps, cfg.max_proposals, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            detections = model(tensor.to(device), image_sizes, proposals)
        for img, prep, (h, w), det in zip(chunk, preps, sizes, detections, strict=True):
            boxes = (det["boxes"].float().cpu() / prep.scale).clamp(min=0)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(max=w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(max=h)
            for box, score, label in zip(
                boxes.tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True
            ):
                x0, y0, x1, y1 = box
                results.append({
                    "image_id": img["id"],
                    "category_id": int(category_ids[label]),
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": round(float(score), 5),
                })  # fmt: skip
    return results


# --------------------------------------------------------------------------------------------
# The whole stage
# --------------------------------------------------------------------------------------------


def _run_inputs(cfg: TransferConfig) -> str:
    """Fingerprint of what the config names but does not contain: init weights and RPN files."""
    parts = []
    init = Path(cfg.init.pretrained) if cfg.init.pretrained else None
    if init is not None and init.is_dir():
        parts.append(sha256_file(init / CLIP_WEIGHTS_FILE))
    elif init is not None and init.is_file():
        parts.append(sha256_file(init))
    if cfg.proposals == "frozen":
        rpn_json = Path(cfg.rpn_dir) / RPN_CONFIG_FILE
        parts.append(sha256_file(rpn_json) if rpn_json.is_file() else "no-rpn")
    return "|".join(parts)


def _run_hash(cfg: TransferConfig, run_inputs: str) -> str:
    blob = f"{section_hash(replace(cfg, num_workers=0, checkpoint_every=0))}|{run_inputs}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _train_labels(
    data_images: list[BoxImage], categories: list[dict[str, Any]], json_path: str
) -> list[Tensor]:
    index = {c["id"]: k for k, c in enumerate(categories)}
    labels = []
    for rec in data_images:
        unknown = [c for c in rec.category_ids if c not in index]
        if unknown:
            raise TransferError(
                f"{json_path}: boxes of {rec.file_name} have category ids {unknown[:5]} not in 'categories'"
            )
        labels.append(torch.tensor([index[c] for c in rec.category_ids], dtype=torch.int64))
    return labels


def run_transfer(cfg: TransferConfig, device: torch.device, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) and evaluate the detector of ``cfg``; returns what ``metrics.json`` holds
    (``{"finished": False, ...}`` when ``stop_after`` stopped training early)."""
    out = Path(cfg.out_dir)
    run_inputs = _run_inputs(cfg)
    run_hash = _run_hash(cfg, run_inputs)
    done = _read_json(out / METRICS_FILE)
    if done is not None and done.get("run_hash") == run_hash:
        log.info("transfer: %s already holds results of this config; skipping", out)
        return done
    if cfg.precision not in ("fp32", "bf16"):
        raise TransferError(f"transfer.precision={cfg.precision!r}: expected fp32 or bf16")
    if not cfg.train_short_sides:
        raise TransferError("transfer.train_short_sides is empty")

    train_cats, val_cats = read_categories(cfg.train_json), read_categories(cfg.val_json)
    names = list(dict.fromkeys([c["name"] for c in val_cats] + [c["name"] for c in train_cats]))
    torch.manual_seed(cfg.seed)  # a random init (tests, the untrained demo teacher) is then reproducible
    random.seed(cfg.seed)
    loaded = load_clip(cfg.init, "cpu")
    emb, emb_names, source = class_embeddings(cfg, loaded, names)
    train_emb = select_embeddings(emb, emb_names, [c["name"] for c in train_cats], source, cfg.train_json)
    val_emb = select_embeddings(emb, emb_names, [c["name"] for c in val_cats], source, cfg.val_json)
    try:
        model = build_detector(loaded.model.visual, train_emb, cfg)
    except (TypeError, ValueError) as e:
        raise TransferError(f"init model {loaded.weights_id} with embeddings {source}: {e}") from e
    init_identity = dict(loaded.identity)
    del loaded  # the text tower is no longer needed
    model.to(device)
    rpn = NetworkProposals(load_rpn(cfg.rpn_dir, device), device) if cfg.proposals == "frozen" else None

    model_meta = _read_json(out / MODEL_JSON)
    if model_meta is not None and model_meta.get("run_hash") == run_hash and (out / MODEL_FILE).is_file():
        model.load_state_dict(safetensors.torch.load_file(str(out / MODEL_FILE), device=str(device)))
        train_summary = model_meta["train"]
        log.info("transfer: using the trained detector in %s", out)
    else:
        data = load_box_json(cfg.train_json, cfg.image_root, keep_empty=False)
        if not data.images:
            raise TransferError(
                f"{cfg.train_json}: no image with boxes to train on ({data.skipped.summary()})"
            )
        for line in data.skipped.report_lines()[1:] if data.skipped.total else []:
            log.info("transfer: %s", line)
        labels = _train_labels(data.images, train_cats, cfg.train_json)
        train_summary = train_detector(
            model, rpn, data.images, labels, cfg, device, _resume_hash(cfg, run_inputs), stop_after
        )
        train_summary["skipped"] = dict(data.skipped.counts + Counter(train_summary["skipped"]))
        if not train_summary["finished"]:
            log.info(
                "transfer: stopped at step %d of %d (checkpoint in %s)",
                train_summary["steps"],
                cfg.steps,
                out / CHECKPOINT_DIR,
            )
            return {"finished": False, "train": train_summary}
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        with atomic_output(out / MODEL_FILE) as tmp:
            safetensors.torch.save_file(
                state, str(tmp), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)}
            )
        atomic_write_json(out / MODEL_JSON, {
            "format": FORMAT, "version": FORMAT_VERSION, "run_hash": run_hash, "config": to_dict(cfg),
            "init": init_identity, "train_categories": train_cats, "train": train_summary,
        })  # fmt: skip
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)

    # Test time: the whole vocabulary of the val json (base + novel).
    model.classifier.set_embeddings(val_emb)
    images = read_eval_images(cfg.val_json, cfg.image_root)
    t0 = time.perf_counter()
    results = detect_images(model, rpn, images, [c["id"] for c in val_cats], cfg, device)
    eval_seconds = time.perf_counter() - t0
    atomic_write_json(out / DETECTIONS_FILE, results)
    try:
        split_of = category_splits(val_cats, cfg.train_json)
    except ProposalError as e:
        raise TransferError(str(e)) from e
    splits = {s: [c for c, v in split_of.items() if v == s] for s in ("base", "novel")}
    metrics = coco_ap_by_split(cfg.val_json, results, splits)
    with_gt = metrics["per_category_AP50"]
    summary = {
        "finished": True,
        "run_hash": run_hash,
        "tag": cfg.tag,
        "init": init_identity,
        **{f"AP50_{s}": metrics["AP50"].get(s) for s in ("all", "base", "novel")},
        "AP": metrics["AP"],
        "coco": metrics["coco"],
        "classes_with_boxes": {s: sum(c in with_gt for c in ids) for s, ids in [("all", list(split_of)), *splits.items()]},
        "AP50_per_class": {str(c): v for c, v in with_gt.items()},
        "eval": {"images": len(images), "detections": len(results), "seconds": round(eval_seconds, 2),
                 "images_per_s": round(len(images) / max(eval_seconds, 1e-9), 2)},
        "train": train_summary,
    }  # fmt: skip
    atomic_write_json(out / METRICS_FILE, summary)
    return summary
