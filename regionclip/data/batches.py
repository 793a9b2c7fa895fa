"""Pretraining batches: pseudo-labels or image–text samples -> padded, normalised detection-size
images, boxes in resized pixels, caption tokens and the teacher's labels (:class:`PretrainBatch`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from regionclip.data.detection import flip_boxes
from regionclip.data.pseudo_labels import PseudoLabels
from regionclip.models.preprocess import CLIP_MEAN, CLIP_STD, batch_images, resize_for_detection

Tokenizer = Callable[[list[str]], Tensor]


@dataclass
class PreprocessSettings:
    """Student input: detection-size resize (bicubic), normalisation, padding, random h-flip."""

    short_side: int = 800
    max_side: int = 1333
    size_divisibility: int = 0  # pad the batch to a multiple of this (0 = none)
    hflip: bool = True  # flip each image (and its boxes) with probability 0.5, as RegionCLIP
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD


@dataclass
class PretrainBatch:
    """One pretraining batch of B images and N kept regions.

    ``images`` [B, 3, H, W] normalised, zero-padded (image at the top left); ``image_sizes`` the
    resized (h, w) of each; ``region_boxes`` B tensors [R_i, 4] (x0 y0 x1 y1 in resized pixels,
    after any flip); ``target_ids`` [N] int64 hard concept ids (N = sum R_i, batch order);
    ``topk_ids`` [N, k] int64 / ``topk_logits`` [N, k] fp32 (id -1 / logit -inf = padding in
    caption mode) and, when every sample stored it, ``teacher_emb`` [N, D_t] (fp16, exact teacher
    rebuild; preferred by :func:`compute_losses`); ``text_tokens`` [B, L] int64; ``flipped`` [B].
    Image–text batches have N = 0 and no teacher fields.
    """

    keys: list[str]
    images: Tensor
    image_sizes: list[tuple[int, int]]
    region_boxes: list[Tensor]
    target_ids: Tensor
    text_tokens: Tensor
    teacher_emb: Tensor | None = None
    topk_ids: Tensor | None = None
    topk_logits: Tensor | None = None
    flipped: list[bool] | None = None

    @property
    def num_regions(self) -> int:
        return int(self.target_ids.shape[0])

    def to(self, device: str | torch.device, non_blocking: bool = False) -> PretrainBatch:
        """A copy with every tensor on ``device``."""

        def move(v: Any) -> Any:
            if isinstance(v, Tensor):
                return v.to(device, non_blocking=non_blocking)
            if isinstance(v, list) and v and isinstance(v[0], Tensor):
                return [t.to(device, non_blocking=non_blocking) for t in v]
            return v

        return PretrainBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


def _uniform(rng: torch.Generator | None) -> float:
    return float(torch.rand((), generator=rng))


def _load_image(
    image: Image.Image | None, key: str, settings: PreprocessSettings, rng: torch.Generator | None
):
    """PIL image -> (normalised tensor [3, h, w], scale, flipped)."""
    if image is None:
        raise ValueError(
            f"sample {key!r}: no decoded image (pseudo-label shards written with store_image=false "
            "carry no image; re-run the pseudolabel stage with pseudolabel.store_image=true)"
        )
    tensor, scale = resize_for_detection(
        image, settings.short_side, settings.max_side, mean=settings.mean, std=settings.std
    )
    flip = settings.hflip and _uniform(rng) < 0.5
    if flip:
        tensor = tensor.flip(-1)
    return tensor, scale, flip


def _pick_caption(captions: Sequence[str], rng: torch.Generator | None) -> str:
    if len(captions) == 1:
        return captions[0]
    return captions[int(torch.randint(len(captions), (), generator=rng))]


def collate_pretrain(
    samples: Sequence[PseudoLabels],
    preprocess: PreprocessSettings,
    tokenizer: Tokenizer,
    rng: torch.Generator | None = None,
) -> PretrainBatch:
    """Pseudo-labels (offline shards or the online step; kept regions only) -> :class:`PretrainBatch`.

    Per sample, in order, ``rng`` draws the flip (when ``preprocess.hflip``) and then, for several
    captions, which caption to use. Raises ValueError naming the sample on a missing image or
    inconsistent fields.
    """
    if not samples:
        raise ValueError("collate_pretrain needs at least one sample")
    keys, tensors, captions, flips = [], [], [], []
    boxes, targets, topk_ids, topk_logits, embs = [], [], [], [], []
    k = None
    for s in samples:
        s.check()
        tensor, scale, flip = _load_image(s.image, s.key, preprocess, rng)
        b = torch.from_numpy(np.asarray(s.boxes, dtype=np.float32)) * scale
        if flip:
            b = flip_boxes(b, tensor.shape[-1])
        ids = np.asarray(s.topk_ids)
        if k is not None and ids.shape[1] != k:
            raise ValueError(f"sample {s.key!r}: top-k width {ids.shape[1]} differs from the batch's {k}")
        k = ids.shape[1]
        keys.append(s.key)
        tensors.append(tensor)
        flips.append(flip)
        captions.append(_pick_caption(s.captions, rng))
        boxes.append(b)
        targets.append(torch.from_numpy(np.asarray(s.concept).astype(np.int64)))
        topk_ids.append(torch.from_numpy(ids.astype(np.int64)))
        topk_logits.append(torch.from_numpy(np.asarray(s.topk_logits).astype(np.float32)))
        embs.append(None if s.emb is None else torch.from_numpy(np.asarray(s.emb)))
    images, sizes = batch_images(tensors, preprocess.size_divisibility)
    teacher_emb = torch.cat(embs) if all(e is not None for e in embs) else None
    return PretrainBatch(
        keys=keys,
        images=images,
        image_sizes=sizes,
        region_boxes=boxes,
        target_ids=torch.cat(targets),
        text_tokens=tokenizer(captions),
        teacher_emb=teacher_emb,
        topk_ids=torch.cat(topk_ids),
        topk_logits=torch.cat(topk_logits),
        flipped=flips,
    )


def collate_image_text(
    samples: Sequence[dict[str, Any]],
    preprocess: PreprocessSettings,
    tokenizer: Tokenizer,
    rng: torch.Generator | None = None,
) -> PretrainBatch:
    """Decoded image–text samples (:func:`regionclip.data.shards.image_text_pipeline`: ``__key__``,
    ``image``, ``captions``) -> a :class:`PretrainBatch` without regions (image–text-only mode).
    ``rng`` draws the flip, then the caption when there are several, per sample."""
    if not samples:
        raise ValueError("collate_image_text needs at least one sample")
    keys, tensors, captions, flips = [], [], [], []
    for s in samples:
        key = str(s.get("__key__", s.get("key", "?")))
        tensor, _, flip = _load_image(s.get("image"), key, preprocess, rng)
        keys.append(key)
        tensors.append(tensor)
        flips.append(flip)
        captions.append(_pick_caption(s.get("captions") or [s["caption"]], rng))
    images, sizes = batch_images(tensors, preprocess.size_divisibility)
    return PretrainBatch(
        keys=keys,
        images=images,
        image_sizes=sizes,
        region_boxes=[torch.zeros(0, 4) for _ in keys],
        target_ids=torch.zeros(0, dtype=torch.long),
        text_tokens=tokenizer(captions),
        flipped=flips,
    )
