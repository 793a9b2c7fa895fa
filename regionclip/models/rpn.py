"""The class-agnostic region proposal network (torchvision pieces), its weights file and its loading.

RegionCLIP pretrains on regions proposed by an RPN trained on *base-class* boxes without their
labels. Here the RPN is torchvision's (ResNet-FPN backbone, ``AnchorGenerator``, ``RPNHead``,
``RegionProposalNetwork``, ``GeneralizedRCNNTransform``); no Detectron2 is needed.

- :class:`ProposalNetwork` maps images in [0, 1] to boxes in *original* image pixels
  (x0, y0, x1, y1) with their objectness, plus the RPN losses in train mode.
- :func:`build_proposal_network` from the ``rpn`` config section; :func:`save_rpn` /
  :func:`load_rpn`: ``rpn.safetensors`` + ``rpn.json`` (config, format version).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import clip_boxes_to_image
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from regionclip.config import RPNConfig, section_hash, to_dict
from regionclip.errors import ProposalError
from regionclip.utils import atomic_output, atomic_write_json

FORMAT = "regionclip.rpn"
FORMAT_VERSION = 1
WEIGHTS_FILE = "rpn.safetensors"
CONFIG_FILE = "rpn.json"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
NORM_LAYERS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


class _ScoredRPN(RegionProposalNetwork):
    """torchvision's RPN, returning the objectness of each proposal next to its box.

    ``filter_proposals`` already computes the final scores (sigmoid of the objectness logit after
    per-level top-k, clipping and NMS); the parent's ``forward`` drops them. This is that
    ``forward`` with the scores kept.
    """

    def forward(  # type: ignore[override]
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        feature_list = list(features.values())
        objectness, pred_bbox_deltas = self.head(feature_list)
        anchors = self.anchor_generator(images, feature_list)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, scores = self.filter_proposals(
            proposals, objectness, images.image_sizes, num_anchors_per_level
        )
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("the RPN needs targets in train mode")
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_box = self.compute_loss(
                objectness, pred_bbox_deltas, labels, regression_targets
            )
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}
        return boxes, scores, losses


class ProposalNetwork(nn.Module):
    """Resize + normalise → ResNet-FPN → RPN → boxes back in the original image coordinates."""

    def __init__(self, transform: GeneralizedRCNNTransform, backbone: nn.Module, rpn: _ScoredRPN):
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """Propose class-agnostic boxes.

        Args:
            images: ``[3, H_i, W_i]`` float tensors in [0, 1], any sizes.
            targets: train mode only: ``{"boxes": [N_i, 4]}`` per image, x0y0x1y1 original pixels.

        Returns:
            boxes ``[R_i, 4]`` (original pixels, clipped to the image, highest objectness first),
            objectness ``[R_i]`` in (0, 1), and the losses (``loss_objectness``,
            ``loss_rpn_box_reg``; empty in eval mode). ``R_i`` ≤ the post-NMS top-n of the mode.
        """
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        images = [pad_thin_image(img, self.transform.max_size) for img in images]
        padded_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        boxes, scores, losses = self.rpn(image_list, features, targets)
        boxes = [
            clip_boxes_to_image(resize_boxes(b, resized, padded), original)
            for b, resized, padded, original in zip(
                boxes, image_list.image_sizes, padded_sizes, original_sizes, strict=True
            )
        ]
        return boxes, scores, losses


MIN_RESIZED_SIDE = 8  # px: the short side of a very thin image after resizing, at least


def pad_thin_image(image: Tensor, max_size: int) -> Tensor:
    """``[C, H, W]`` zero-padded at the bottom / right so that resizing the long side to
    ``max_size`` leaves the short side at least :data:`MIN_RESIZED_SIDE` pixels (a 1 x 4000 image
    would otherwise resize to 0 rows). Coordinates of the original pixels do not change."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    min_side = math.ceil(max(h, w) * MIN_RESIZED_SIDE / max_size)
    if min(h, w) >= min_side:
        return image
    return torch.nn.functional.pad(image, (0, max(w, min_side) - w, 0, max(h, min_side) - h))


def _resnet_fpn(cfg: RPNConfig) -> BackboneWithFPN:
    """torchvision's ``resnet_fpn_backbone`` (same freezing, extra max-pool level) with the FPN
    width and the ResNet stages feeding it configurable: a narrow FPN without the stride-4 level
    is what makes CPU training affordable."""
    levels = sorted(set(cfg.fpn_levels))
    if not levels or levels[0] < 1 or levels[-1] > 4:
        raise ProposalError(f"rpn.fpn_levels={list(cfg.fpn_levels)}: expected ResNet stages among 1, 2, 3, 4")
    if not 0 <= cfg.trainable_layers <= 5:
        raise ProposalError(f"rpn.trainable_layers={cfg.trainable_layers}: expected 0 to 5")
    resnet = getattr(tv_resnet, cfg.backbone)(weights=None, norm_layer=NORM_LAYERS[cfg.norm])
    if cfg.backbone_weights:
        load_backbone_weights(resnet, cfg.backbone_weights)
    t = cfg.trainable_layers
    trained = ("layer4", "layer3", "layer2", "layer1", "conv1", "bn1")[: t + (t == 5)]
    for name, parameter in resnet.named_parameters():
        if not name.startswith(trained):
            parameter.requires_grad_(False)
    c2 = resnet.inplanes // 8  # channels of layer1's output
    return BackboneWithFPN(
        resnet,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(levels)},
        in_channels_list=[c2 * 2 ** (k - 1) for k in levels],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def rpn_module(
    cls: type[RegionProposalNetwork],
    anchors: AnchorGenerator,
    channels: int,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    batch_size_per_image: int,
    positive_fraction: float,
    pre_nms_top_n: tuple[int, int],
    post_nms_top_n: tuple[int, int],
    nms_thresh: float,
) -> RegionProposalNetwork:
    """torchvision's RPN (``cls``: it or a subclass) with an ``RPNHead`` on ``channels``-wide
    features; the top-n pairs are (training, testing)."""
    return cls(
        anchors,
        RPNHead(channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=fg_iou_thresh,
        bg_iou_thresh=bg_iou_thresh,
        batch_size_per_image=batch_size_per_image,
        positive_fraction=positive_fraction,
        pre_nms_top_n={"training": pre_nms_top_n[0], "testing": pre_nms_top_n[1]},
        post_nms_top_n={"training": post_nms_top_n[0], "testing": post_nms_top_n[1]},
        nms_thresh=nms_thresh,
    )


def build_proposal_network(cfg: RPNConfig) -> ProposalNetwork:
    """A ResNet-FPN RPN from ``cfg`` (random init; ``cfg.backbone_weights`` loads the ResNet)."""
    if cfg.norm not in NORM_LAYERS:
        raise ProposalError(f"rpn.norm={cfg.norm!r}: expected one of {sorted(NORM_LAYERS)}")
    if not (
        cfg.backbone.startswith(("resnet", "resnext", "wide_resnet")) and hasattr(tv_resnet, cfg.backbone)
    ):
        raise ProposalError(
            f"rpn.backbone={cfg.backbone!r}: expected a torchvision ResNet name such as resnet50"
        )
    n_levels = len(set(cfg.fpn_levels)) + 1
    if len(cfg.anchor_sizes) != n_levels:
        raise ProposalError(
            f"rpn.anchor_sizes={list(cfg.anchor_sizes)}: need one size per FPN level "
            f"({n_levels}: rpn.fpn_levels {list(cfg.fpn_levels)} + a max-pooled level)"
        )
    backbone = _resnet_fpn(cfg)
    anchors = AnchorGenerator(
        sizes=tuple((int(s),) for s in cfg.anchor_sizes),
        aspect_ratios=(tuple(float(a) for a in cfg.aspect_ratios),) * n_levels,
    )
    rpn = rpn_module(
        _ScoredRPN, anchors, backbone.out_channels, cfg.fg_iou_thresh, cfg.bg_iou_thresh, cfg.batch_size_per_image,
        cfg.positive_fraction, (cfg.pre_nms_top_n_train, cfg.pre_nms_top_n_test),
        (cfg.post_nms_top_n_train, cfg.post_nms_top_n_test), cfg.nms_thresh,
    )  # fmt: skip
    transform = GeneralizedRCNNTransform(cfg.min_size, cfg.max_size, IMAGENET_MEAN, IMAGENET_STD)
    return ProposalNetwork(transform, backbone, rpn)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from safetensors or ``torch.load(weights_only=True)``; never unpickles."""
    if not path.is_file():
        raise ProposalError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state: Any = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors / torch raise assorted types for corrupt files
        raise ProposalError(f"cannot read weights file {path}: {e}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ProposalError(f"weights file {path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(resnet: nn.Module, path: str | Path) -> None:
    """Load a torchvision ResNet state dict (``conv1.weight``, ``layer1.0...``; ``fc.*`` is ignored)."""
    # the classifier is not part of the detector (and may have any number of classes)
    state = {k: v for k, v in _read_state_dict(Path(path)).items() if not k.startswith("fc.")}
    try:
        result = resnet.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ProposalError(f"backbone weights {path} do not fit rpn.backbone: {e}") from None
    missing = [
        k for k in result.missing_keys if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    ]
    if missing or result.unexpected_keys:
        raise ProposalError(
            f"backbone weights {path} do not fit rpn.backbone: missing {missing[:5]} "
            f"({len(missing)}), unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})"
        )


def save_rpn(
    model: ProposalNetwork, cfg: RPNConfig, out_dir: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``rpn.safetensors`` then ``rpn.json`` (the completion marker), each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(out / WEIGHTS_FILE) as tmp:
        safetensors.torch.save_file(
            state, str(tmp), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)}
        )
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": to_dict(cfg),
        "config_hash": section_hash(cfg),
        **(extra or {}),
    }
    atomic_write_json(out / CONFIG_FILE, meta)
    return out / WEIGHTS_FILE


def _config_from_dict(data: Any, source: str) -> RPNConfig:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RPNConfig), data))
    except OmegaConfBaseException as e:
        raise ProposalError(f"{source}: invalid rpn config: {str(e).splitlines()[0]}") from None


def load_rpn(path: str | Path, device: str | torch.device = "cpu") -> ProposalNetwork:
    """Load a network written by :func:`save_rpn` (its folder or its ``rpn.safetensors``), in eval mode."""
    path = Path(path)
    if not path.exists():
        raise ProposalError(f"no RPN at {path}: no such folder or file (train one with `make rpn`)")
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    meta_file = weights.with_suffix(".json")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProposalError(
            f"no RPN at {path}: {meta_file} does not exist (train one with `make rpn`)"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise ProposalError(f"cannot read {meta_file}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise ProposalError(f"{meta_file} is not a regionclip RPN description (format {FORMAT!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise ProposalError(
            f"{meta_file}: format version {meta.get('version')} is not supported ({FORMAT_VERSION})"
        )
    # The weights file holds the whole network; the body's initial weights are not needed.
    cfg = replace(_config_from_dict(meta["config"], str(meta_file)), backbone_weights="")
    model = build_proposal_network(cfg)
    try:
        model.load_state_dict(_read_state_dict(weights), strict=True)
    except RuntimeError as e:
        raise ProposalError(f"{weights} does not match the network described in {meta_file}: {e}") from e
    return model.to(device).eval()
