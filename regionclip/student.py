"""The pretraining student and its batches (DESIGN §4 "Student", "Losses"; facts §3.2-3.4).

- :func:`build_student`: an open_clip CLIP (by default the teacher's weights) with every BatchNorm
  frozen (``FrozenBatchNorm2d``, statistics and affine kept), the first ``freeze_at`` stages of the
  image tower frozen, and the text tower frozen and always in eval mode.
- :class:`StudentModel`: one backbone pass per batch; each image's whole-image box and its kept
  regions go through the region path (RoIAlign -> layer4 -> attention pool for ResNets) together.
- :class:`PretrainBatch`, :func:`collate_pretrain`, :func:`collate_image_text`: decoded samples ->
  padded, normalised detection-size images, boxes in resized pixels, caption tokens, pseudo labels.
- :func:`compute_losses`: forward + :class:`~regionclip.losses.RegionCLIPLoss`.
- :class:`OnlineLabels`: RegionCLIP's original design (RPN + teacher inside the step), producing the
  same sample dicts as the offline pseudo-label shards, so both go through identical code.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from open_clip.utils import freeze_batch_norm_2d
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from regionclip.config import ClipModelConfig
from regionclip.losses import RegionCLIPLoss
from regionclip.models.loading import load_clip, save_clip_checkpoint
from regionclip.models.preprocess import CLIP_MEAN, CLIP_STD, batch_images, resize_for_detection
from regionclip.models.region import RegionEncoder
from regionclip.text import encode_text_trimmed

Tokenizer = Callable[[list[str]], Tensor]


# --------------------------------------------------------------------------------------------
# Freezing
# --------------------------------------------------------------------------------------------


def visual_stages(visual: nn.Module) -> list[list[str]]:
    """Names (relative to ``visual``) of the modules/parameters of each freezable stage, in order.

    ResNet (Detectron2's ``FREEZE_AT``): stage 1 = stem (conv1-3, bn1-3, avgpool), stages 2-5 =
    layer1-layer4; the attention pool always trains (freeze_at <= 5).
    ViT: stage 1 = patch embedding (conv1, class token, positional embedding, ln_pre), stage
    1 + i = transformer block i; ``ln_post`` / ``proj`` always train (freeze_at <= 1 + blocks).
    """
    if isinstance(visual, ModifiedResNet):
        stem = [n for n, _ in visual.named_children() if not n.startswith(("layer", "attnpool"))]
        return [stem, ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    if isinstance(visual, VisionTransformer):
        embed = ["conv1", "class_embedding", "positional_embedding", "ln_pre"]
        return [embed] + [[f"transformer.resblocks.{i}"] for i in range(len(visual.transformer.resblocks))]
    raise TypeError(
        f"student image tower must be an open_clip ModifiedResNet or VisionTransformer, got {type(visual).__name__}"
    )


def unfreeze_batch_norm_2d(module: nn.Module) -> nn.Module:
    """Inverse of ``open_clip.utils.freeze_batch_norm_2d`` on a module tree, in place: every
    ``FrozenBatchNorm2d`` becomes an eval-equivalent ``nn.BatchNorm2d`` (same weight, bias, running
    statistics and eps; ``num_batches_tracked`` 0), so the state dict fits an unfrozen open_clip model."""
    if isinstance(module, FrozenBatchNorm2d):
        bn = nn.BatchNorm2d(module.weight.shape[0], eps=module.eps).to(module.weight.device)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(module, name))
        return bn.eval()
    for name, child in module.named_children():
        new = unfreeze_batch_norm_2d(child)
        if new is not child:
            module.add_module(name, new)
    return module


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class StudentModel(nn.Module):
    """The student CLIP: trainable image tower (region path), frozen text tower.

    Attributes: ``clip`` (the open_clip model; its state dict is this module's, under ``clip.``),
    ``region_encoder`` (a :class:`RegionEncoder` over ``clip.visual``, not a registered submodule so
    that no weight appears twice in the state dict), ``tokenizer``, ``identity`` (of the init
    weights), ``model_cfg`` (open_clip architecture dict), ``freeze_at``.

    ``per_image_features``: False (RegionCLIP, fastest) runs the backbone once on the padded canvas;
    True computes each image's features on its own pixels (results independent of the batch, one
    backbone pass per distinct image size).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Tokenizer,
        identity: dict[str, str],
        model_cfg: dict[str, Any],
        freeze_at: int = 2,
        pooler_resolution: int | None = None,
        per_image_features: bool = False,
        train_text: bool = False,
        freeze_bn: bool = True,
    ):
        super().__init__()
        if freeze_bn:  # off only for an image tower trained from scratch (the demo teacher)
            clip.visual = freeze_batch_norm_2d(clip.visual)
        self.clip = clip
        object.__setattr__(self, "_region_encoder", RegionEncoder(clip.visual, pooler_resolution))
        self.tokenizer = tokenizer
        self.identity = dict(identity)
        self.model_cfg = model_cfg
        self.per_image_features = per_image_features
        stages = visual_stages(clip.visual)
        if not 0 <= freeze_at <= len(stages):
            raise ValueError(
                f"freeze_at={freeze_at} out of range for a {type(clip.visual).__name__} image tower "
                f"(0 = only BatchNorm frozen ... {len(stages)} = all {len(stages)} stages frozen)"
            )
        self.freeze_at = freeze_at
        # train_text: a CLIP trained from scratch (the demo teacher) needs its text tower to learn;
        # the logit scale stays fixed (the losses use a configured temperature)
        self.train_text = train_text
        for name, p in clip.named_parameters():
            p.requires_grad_(name.startswith("visual.") or (train_text and not name.startswith("logit_")))
        self._frozen_modules: list[nn.Module] = (
            [] if train_text else [c for n, c in clip.named_children() if n != "visual"]
        )
        for name in (n for stage in stages[:freeze_at] for n in stage):
            target = clip.visual.get_submodule(name) if _is_module(clip.visual, name) else None
            if target is not None:
                target.requires_grad_(False)
                self._frozen_modules.append(target)
            else:  # a bare parameter (ViT class token, positional embedding)
                getattr(clip.visual, name).requires_grad_(False)
        self.train(False)

    @property
    def region_encoder(self) -> RegionEncoder:
        return self._region_encoder

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(getattr(self.clip.visual, "image_mean", None) or CLIP_MEAN)

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(getattr(self.clip.visual, "image_std", None) or CLIP_STD)

    @property
    def embed_dim(self) -> int:
        return self.region_encoder.output_dim

    def train(self, mode: bool = True) -> StudentModel:
        """Train mode for the trainable part only: the text tower and frozen stages stay in eval."""
        super().train(mode)
        for m in self._frozen_modules:
            m.eval()
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter that trains (for the optimiser's groups)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Text tower: tokens [B, L] -> un-normalised caption embeddings [B, D] (no grad unless train_text)."""
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            return encode_text_trimmed(self.clip, tokens)

    def forward(self, batch: PretrainBatch, need_regions: bool = True) -> dict[str, Tensor]:
        """Embeddings of one batch (nothing normalised; the losses normalise).

        Returns ``image_emb`` [B, D]: each image's whole-image box ``(0, 0, w_i, h_i)`` in its own
        resized size through the region path (RegionCLIP's global box covers the padded canvas;
        the image's own box keeps padding out of what is matched to the caption); ``text_emb``
        [B, D] (frozen, no grad); with ``need_regions``, ``region_emb`` [N, D], the kept regions of
        all images in batch order. Global boxes and regions share one backbone and one head pass.
        """
        sizes = batch.image_sizes if self.per_image_features else None
        feats = self.region_encoder.dense_features(batch.images, sizes)
        boxes, counts = [], []
        for i, (h, w) in enumerate(batch.image_sizes):
            whole = torch.tensor([[0.0, 0.0, float(w), float(h)]], device=feats.device)
            regions = batch.region_boxes[i].to(feats.device, torch.float32) if need_regions else whole[:0]
            boxes.append(torch.cat([whole, regions]))
            counts.append(1 + len(regions))
        emb = self.region_encoder.pool_regions(feats, boxes, sizes)
        is_global = torch.zeros(emb.shape[0], dtype=torch.bool, device=emb.device)
        is_global[torch.tensor([0, *counts[:-1]], device=emb.device).cumsum(0)] = True
        out = {"image_emb": emb[is_global], "text_emb": self.encode_text(batch.text_tokens)}
        if need_regions:
            out["region_emb"] = emb[~is_global]
        return out

    def export(self, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write the student as an open_clip ``local-dir`` checkpoint folder (atomic): frozen
        BatchNorms are saved as plain BatchNorm2d entries, so ``open_clip.create_model(
        'local-dir:<out_dir>')`` and :func:`~regionclip.models.loading.load_clip` read it."""
        plain = copy.deepcopy(self.clip).cpu()
        plain.visual = unfreeze_batch_norm_2d(plain.visual)
        meta = {
            "model": self.identity["model"],
            "init_weights_id": self.identity["weights_id"],
            **(extra or {}),
        }
        return save_clip_checkpoint(plain, self.model_cfg, out_dir, meta)


def _is_module(parent: nn.Module, name: str) -> bool:
    try:
        parent.get_submodule(name)
    except AttributeError:
        return False
    return True


def build_student(
    init: ClipModelConfig,
    freeze_at: int = 2,
    device: str | torch.device = "cpu",
    pooler_resolution: int | None = None,
    per_image_features: bool = False,
    train_text: bool = False,
    freeze_bn: bool = True,
) -> StudentModel:
    """The student: ``init`` loaded with :func:`~regionclip.models.loading.load_clip` (the trainer
    passes the teacher's config: RegionCLIP initialises the student from the teacher), then frozen
    as :class:`StudentModel` describes. Returned in eval mode; call ``.train()`` to train."""
    loaded = load_clip(init, device)
    if loaded.precision != "fp32":
        raise ValueError(
            f"the student trains in fp32 weights (autocast handles bf16), got precision={init.precision!r}"
        )
    return StudentModel(
        loaded.model,
        loaded.tokenizer,
        loaded.identity,
        loaded.model_cfg,
        freeze_at,
        pooler_resolution,
        per_image_features,
        train_text,
        freeze_bn,
    )


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


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


def _load_image(sample: dict[str, Any], key: str, settings: PreprocessSettings, rng: torch.Generator | None):
    """PIL image -> (normalised tensor [3, h, w], scale, flipped)."""
    image = sample.get("image")
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


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Boxes [R, 4] (x0 y0 x1 y1, continuous pixel coordinates) of an image ``width`` wide, mirrored
    left-right: x -> width - x, so (x0, x1) -> (width - x1, width - x0)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def _array(sample: dict[str, Any], name: str, key: str, shape_tail: tuple[int, ...] | None) -> np.ndarray:
    if name not in sample:
        raise ValueError(f"sample {key!r}: pseudo-label field {name!r} is missing")
    a = np.asarray(sample[name])
    if shape_tail is not None and (a.ndim != 1 + len(shape_tail) or a.shape[1:] != shape_tail):
        raise ValueError(
            f"sample {key!r}: field {name!r} has shape {a.shape}, expected [R, {', '.join(map(str, shape_tail))}]"
        )
    return a


def collate_pretrain(
    samples: Sequence[dict[str, Any]],
    preprocess: PreprocessSettings,
    tokenizer: Tokenizer,
    rng: torch.Generator | None = None,
) -> PretrainBatch:
    """Decoded pseudo-label samples -> :class:`PretrainBatch`.

    ``samples``: dicts as :func:`regionclip.pseudolabel.decode_pseudo_sample` yields them (only
    kept regions are stored): ``key``, ``caption``, ``meta`` (``captions``), ``image`` (PIL),
    ``boxes`` [R, 4] in original pixels, ``concept`` [R], ``topk_ids`` / ``topk_logits`` [R, k],
    optional ``emb`` [R, D]. Per sample, in order, ``rng`` draws the flip (when
    ``preprocess.hflip``) and then, for several captions, which caption to use.
    Raises ValueError naming the sample on a missing image or inconsistent fields.
    """
    if not samples:
        raise ValueError("collate_pretrain needs at least one sample")
    keys, tensors, captions, flips = [], [], [], []
    boxes, targets, topk_ids, topk_logits, embs = [], [], [], [], []
    k = None
    for s in samples:
        key = str(s.get("key", s.get("__key__", "?")))
        tensor, scale, flip = _load_image(s, key, preprocess, rng)
        b = torch.from_numpy(_array(s, "boxes", key, (4,)).astype(np.float32)) * scale
        if flip:
            b = flip_boxes(b, tensor.shape[-1])
        r = len(b)
        concept = _array(s, "concept", key, ())
        ids = _array(s, "topk_ids", key, None)
        logits = _array(s, "topk_logits", key, None)
        if ids.ndim != 2 or ids.shape != logits.shape or len(concept) != r or len(ids) != r:
            raise ValueError(
                f"sample {key!r}: region fields disagree: boxes {tuple(b.shape)}, concept {concept.shape}, "
                f"topk_ids {ids.shape}, topk_logits {logits.shape}"
            )
        if k is not None and ids.shape[1] != k:
            raise ValueError(f"sample {key!r}: top-k width {ids.shape[1]} differs from the batch's {k}")
        k = ids.shape[1]
        keys.append(key)
        tensors.append(tensor)
        flips.append(flip)
        captions.append(_pick_caption(s.get("meta", {}).get("captions") or [s["caption"]], rng))
        boxes.append(b)
        targets.append(torch.from_numpy(concept.astype(np.int64)))
        topk_ids.append(torch.from_numpy(ids.astype(np.int64)))
        topk_logits.append(torch.from_numpy(logits.astype(np.float32)))
        embs.append(None if s.get("emb") is None else torch.from_numpy(np.asarray(s["emb"])))
    images, sizes = batch_images(tensors, preprocess.size_divisibility)
    teacher_emb = torch.cat(embs) if all(e is not None for e in embs) else None
    if teacher_emb is not None and teacher_emb.shape[0] != sum(len(b) for b in boxes):
        raise ValueError(f"batch {keys}: stored teacher embeddings do not match the region count")
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
        tensor, _, flip = _load_image(s, key, preprocess, rng)
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


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def compute_losses(
    model: nn.Module,
    batch: PretrainBatch,
    loss: RegionCLIPLoss,
    concept_emb: Tensor | None,
    teacher_concept_emb: Tensor | None = None,
) -> dict[str, Tensor]:
    """Forward ``batch`` through ``model`` (a :class:`StudentModel`, possibly DDP-wrapped) and apply
    ``loss``; returns its dict (``loss`` = weighted total, plus the active terms).

    ``concept_emb`` [K, D]: the concept pool in the student's space (None is allowed when both
    region weights are 0: image–text-only mode runs no region path at all). The teacher
    distribution is rebuilt from ``batch.teacher_emb`` when present (against ``teacher_concept_emb``
    when the teacher's pool differs), else from the stored top-k.
    """
    need_regions = bool(loss.weights["distill"] or loss.weights["contrastive"])
    out = model(batch, need_regions=need_regions)
    inputs: dict[str, Tensor] = {"image_emb": out["image_emb"], "text_emb": out["text_emb"]}
    if need_regions:
        if concept_emb is None:
            raise ValueError(
                "region losses are on (distill/contrastive weight > 0) but no concept embeddings were given"
            )
        inputs.update(region_emb=out["region_emb"], target_ids=batch.target_ids, concept_emb=concept_emb)
        if batch.teacher_emb is not None:
            inputs["teacher_emb"] = batch.teacher_emb
            if teacher_concept_emb is not None:
                inputs["teacher_concept_emb"] = teacher_concept_emb
        elif batch.topk_ids is not None and batch.topk_logits is not None:
            inputs.update(topk_ids=batch.topk_ids, topk_logits=batch.topk_logits)
    return loss(inputs)


# --------------------------------------------------------------------------------------------
# Online pseudo-labels (RegionCLIP's original step)
# --------------------------------------------------------------------------------------------


class OnlineLabels:
    """RPN + frozen teacher inside the training step: decoded image–text samples -> pseudo-label
    sample dicts in exactly the format :func:`collate_pretrain` takes from offline shards.

    Wraps a :class:`~regionclip.pseudolabel.PseudoLabeler`; build it with :meth:`from_config`
    (the ``teacher``, ``rpn`` and ``pseudolabel`` sections, as the offline stage reads them).
    """

    def __init__(self, labeler: Any):
        self.labeler = labeler

    @classmethod
    def from_config(cls, cfg: Any, device: str | torch.device = "cpu") -> OnlineLabels:
        from regionclip.pseudolabel import build_labeler

        device = torch.device(device) if isinstance(device, str) else device
        labeler, _, _ = build_labeler(cfg, device)
        return cls(labeler)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """``samples``: ``__key__``, ``image`` (PIL), ``captions``, optional ``meta``."""
        from regionclip.pseudolabel import REGION_FIELDS, LabelInput

        records = self.labeler.label_batch(
            [LabelInput(s["__key__"], s["image"], list(s["captions"])) for s in samples]
        )
        out = []
        for rec, s in zip(records, samples, strict=True):
            meta = {
                "key": rec["key"],
                "width": s["image"].width,
                "height": s["image"].height,
                "num_proposals": rec["num_proposals"],
                "num_kept": rec["num_kept"],
                "drop_reason": rec["drop_reason"],
                "captions": list(s["captions"]),
                "source_meta": s.get("meta", {}),
            }
            item = {"key": rec["key"], "caption": s["captions"][0], "meta": meta, "image": s["image"]}
            item.update({name: rec[name] for name in (*REGION_FIELDS, "emb") if name in rec})
            out.append(item)
        return out
