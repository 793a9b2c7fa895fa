"""The pretraining student (RegionCLIP's student: same architecture as the teacher, initialised
from it).

- :func:`build_student`: an open_clip CLIP with every BatchNorm frozen (``FrozenBatchNorm2d``,
  statistics and affine kept), the first ``freeze_at`` stages of the image tower frozen, and the
  text tower frozen and always in eval mode.
- :class:`StudentModel`: one backbone pass per batch; each image's whole-image box and its kept
  regions go through the region path (RoIAlign -> layer4 -> attention pool for ResNets) together.
- :func:`compute_losses`: forward + :class:`~regionclip.losses.RegionCLIPLoss`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from open_clip.utils import freeze_batch_norm_2d
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from regionclip.config import ClipModelConfig
from regionclip.data.batches import PretrainBatch
from regionclip.losses import RegionCLIPLoss
from regionclip.models.loading import load_clip, save_clip_checkpoint
from regionclip.models.preprocess import CLIP_MEAN, CLIP_STD
from regionclip.models.region import RegionEncoder
from regionclip.models.towers import freeze_stages
from regionclip.text import encode_text_trimmed

Tokenizer = Callable[[list[str]], Tensor]


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
        # train_text: a CLIP trained from scratch (the demo teacher) needs its text tower to learn;
        # the logit scale stays fixed (the losses use a configured temperature)
        self.train_text = train_text
        for name, p in clip.named_parameters():
            p.requires_grad_(name.startswith("visual.") or (train_text and not name.startswith("logit_")))
        self._frozen_modules: list[nn.Module] = (
            [] if train_text else [c for n, c in clip.named_children() if n != "visual"]
        )
        self._frozen_modules += freeze_stages(clip.visual, freeze_at)
        self.freeze_at = freeze_at
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
