"""The pseudo-label contract between labelling and training: one typed record, one writer, one reader.

:class:`PseudoLabels` is one image's labels. The labeler (offline shards and the online step
alike) makes it, :func:`encode` writes it as a shard sample and :func:`decode` reads it back;
training, label precision and pictures read only the record.

Shard sample (``<input shard name>`` in ``pseudolabel.out_dir``): ``__key__`` (source key),
``txt`` (first caption), ``json`` (key, image size, counts, drop reason, concept-pool hash, every
caption, the source sample's metadata), the image bytes (``store_image``) and per kept region, as
``.npy`` (never pickle): ``boxes`` float32 [R, 4] (x0 y0 x1 y1, original pixels), ``objectness``
float32 [R], ``concept`` int32 [R] (hard label), ``score`` float32 [R] (top probability),
``topk_ids`` int32 [R, k] and ``topk_logits`` [R, k] (cos / temperature; in caption mode entries
past the caption's candidates are id -1, logit -inf), optionally ``emb`` float16 [R, D]. Beside
each shard, ``<stem>.manifest.json`` records counts and identities (the pseudolabel stage).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from regionclip.data.images import load_rgb
from regionclip.data.sample_errors import ERROR_FIELD
from regionclip.data.shards import IMAGE_EXTS, ShardWriter, expand_shards, expand_urls
from regionclip.utils import parse_json

TAR_NAME = re.compile(r"\.tar(\.(gz|bz2|xz|zst|lz4))?$")
FORMAT = "regionclip.pseudolabels"
FORMAT_VERSION = 1
REGION_FIELDS = ("boxes", "objectness", "concept", "score", "topk_ids", "topk_logits")
# why a labelled image ends up with no regions (the image itself is still written)
DROP_REASONS = ("no_proposals", "caption_not_parsed", "no_caption_candidates")


@dataclass
class PseudoLabels:
    """One image's pseudo-labels (see the module doc for the arrays' shapes and types)."""

    key: str
    captions: list[str]
    width: int
    height: int
    boxes: np.ndarray
    objectness: np.ndarray
    concept: np.ndarray
    score: np.ndarray
    topk_ids: np.ndarray
    topk_logits: np.ndarray
    emb: np.ndarray | None = None
    num_proposals: int = 0  # regions the teacher looked at (before the keep threshold)
    drop_reason: str = ""  # '' or one of DROP_REASONS
    concept_pool_sha256: str = ""
    source_meta: dict[str, Any] = field(default_factory=dict)
    image: Image.Image | None = None  # decoded RGB image; None when not stored or not decoded

    @property
    def num_kept(self) -> int:
        return len(self.boxes)

    def check(self) -> None:
        """Raise ValueError naming the sample when the region arrays disagree in shape."""
        r = len(self.boxes)
        ids, logits = np.asarray(self.topk_ids), np.asarray(self.topk_logits)
        if (
            np.asarray(self.boxes).shape != (r, 4)
            or len(self.concept) != r
            or ids.ndim != 2
            or ids.shape != logits.shape
            or len(ids) != r
            or (self.emb is not None and len(self.emb) != r)
        ):
            raise ValueError(
                f"sample {self.key!r}: region fields disagree: boxes {np.shape(self.boxes)}, concept "
                f"{np.shape(self.concept)}, topk_ids {ids.shape}, topk_logits {logits.shape}"
            )


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{where}: not a plain .npy array: {e}") from None


def encode(labels: PseudoLabels, image: tuple[str, bytes] | None = None) -> dict[str, Any]:
    """The shard sample of ``labels``; ``image`` = (extension, the source's encoded bytes) to store."""
    meta = {
        "key": labels.key,
        "width": labels.width,
        "height": labels.height,
        "concept_pool_sha256": labels.concept_pool_sha256,
        "num_proposals": labels.num_proposals,
        "num_kept": labels.num_kept,
        "drop_reason": labels.drop_reason,
        "captions": labels.captions,
        "source_meta": labels.source_meta,
    }
    sample: dict[str, Any] = {"__key__": labels.key, "txt": labels.captions[0], "json": meta}
    for name in REGION_FIELDS:
        sample[f"{name}.npy"] = npy_bytes(getattr(labels, name))
    if labels.emb is not None:
        sample["emb.npy"] = npy_bytes(labels.emb)
    if image is not None:
        sample[image[0]] = image[1]
    return sample


def decode(raw: dict[str, Any], decode_image: bool = True) -> PseudoLabels:
    """A raw tar sample of a pseudo-label shard → :class:`PseudoLabels` (``image`` None when not
    stored or not ``decode_image``). Raises ValueError naming the sample on malformed fields."""
    where = f"sample {raw.get('__key__')!r} in {raw.get('__url__', '?')}"
    if ERROR_FIELD in raw:
        raise ValueError(f"{raw.get('__url__', '?')}: {raw[ERROR_FIELD]}: {raw.get('detail', '')}")
    try:
        meta = parse_json(raw["json"])
        caption = raw["txt"].decode("utf-8")
        if not isinstance(meta, dict):
            raise TypeError("json is not an object")
        captions = list(meta.get("captions") or [caption])
        width, height = int(meta.get("width", 0)), int(meta.get("height", 0))
    except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{where}: bad or missing json/txt: {e}") from None
    arrays = {}
    for name in REGION_FIELDS:
        if f"{name}.npy" not in raw:
            raise ValueError(f"{where}: missing field {name}.npy")
        arrays[name] = load_npy(raw[f"{name}.npy"], f"{where} field {name}.npy")
    emb = load_npy(raw["emb.npy"], f"{where} field emb.npy") if "emb.npy" in raw else None
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    image = None if ext is None or not decode_image else load_rgb(raw[ext])
    labels = PseudoLabels(
        key=raw["__key__"], captions=captions, width=width, height=height, emb=emb,
        num_proposals=int(meta.get("num_proposals", 0)), drop_reason=str(meta.get("drop_reason", "")),
        concept_pool_sha256=str(meta.get("concept_pool_sha256", "")), source_meta=meta.get("source_meta") or {},
        image=image, **arrays,
    )  # fmt: skip
    labels.check()
    return labels


def iter_pseudo_labels(urls: str | list[str], decode_image: bool = True) -> Iterator[PseudoLabels]:
    """The records of pseudo-label shards, in file order."""
    for raw in expand_shards({"url": u} for u in expand_urls(urls)):
        yield decode(raw, decode_image)


def output_name(url: str) -> str:
    """Output shard file name of an input shard URL: its base name (``pretrain-000003.tar``); for a
    ``pipe:`` command, that of the last ``.tar`` file it names (``pipe:aws s3 cp s3://b/x.tar -``,
    ``pipe:cat x.tar.gz | zcat``). Outputs are plain tars: ``.tar.gz`` becomes ``.tar``.

    Raises:
        ValueError: a ``pipe:`` command that names no ``.tar`` file.
    """
    target = url
    if url.startswith("pipe:"):
        shards = [t for t in url[len("pipe:") :].split() if TAR_NAME.search(t.split("?", 1)[0])]
        if not shards:
            raise ValueError(
                f"{url}: names no .tar file, so the output shard has no name; name one in the command"
            )
        target = shards[-1]
    name = target.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    name = TAR_NAME.sub(".tar", name)
    return name if name.endswith(".tar") else f"{name}.tar"


def manifest_path(shard: str | os.PathLike) -> Path:
    shard = Path(shard)
    return shard.with_name(shard.name.removesuffix(".tar") + ".manifest.json")


class NamedShard(ShardWriter):
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
