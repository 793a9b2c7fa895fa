"""Class-agnostic region proposals (DESIGN §4 "Proposals"; reference regionclip-facts §2.1).

RegionCLIP pretrains on regions proposed by an RPN trained on *base-class* boxes without their
labels: 300 proposals per image after NMS 0.5, of which 100 are drawn uniformly at random. Here
the RPN is torchvision's (ResNet-FPN backbone, ``AnchorGenerator``, ``RPNHead``,
``RegionProposalNetwork``, ``GeneralizedRCNNTransform``); no Detectron2 is needed.

- :class:`ProposalNetwork` maps images in [0, 1] to boxes in *original* image pixels
  (x0, y0, x1, y1) with their objectness, plus the RPN losses in train mode.
- :func:`save_rpn` / :func:`load_rpn`: ``rpn.safetensors`` + ``rpn.json`` (config, format version).
- :func:`train_rpn`: seeded SGD with warm-up and step decay, horizontal flips, resumable
  checkpoints (safetensors + JSON), proposal recall of base and novel boxes on a val json.
- :class:`ProposalSource`: what the pseudo-label stage calls, backed by the network
  (:class:`NetworkProposals`) or by a user's precomputed table (:class:`PrecomputedProposals`).

Training images without any box are skipped by default (``keep_empty``): in a base-only box json
such an image may show novel objects, and training on it as a pure negative would teach the RPN
to suppress exactly the objects open-vocabulary detection is about.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import safetensors.torch
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import box_iou, clip_boxes_to_image
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from regionclip.config import RPNConfig, section_hash, to_dict
from regionclip.data.shards import ERROR_FIELD, SampleErrors, error_record
from regionclip.sgd import load_checkpoint, optimizer_step, save_checkpoint, update_running
from regionclip.utils import atomic_output, atomic_write_json

log = logging.getLogger(__name__)

FORMAT = "regionclip.rpn"
FORMAT_VERSION = 1
WEIGHTS_FILE = "rpn.safetensors"
CONFIG_FILE = "rpn.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoint"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
NORM_LAYERS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


class ProposalError(ValueError):
    """Bad RPN input (json, image folder, weights, proposals file); the message names the file."""


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


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
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        boxes, scores, losses = self.rpn(image_list, features, targets)
        boxes = [
            clip_boxes_to_image(resize_boxes(b, resized, original), original)
            for b, resized, original in zip(boxes, image_list.image_sizes, original_sizes, strict=True)
        ]
        return boxes, scores, losses


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
    head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0])
    rpn = _ScoredRPN(
        anchors,
        head,
        fg_iou_thresh=cfg.fg_iou_thresh,
        bg_iou_thresh=cfg.bg_iou_thresh,
        batch_size_per_image=cfg.batch_size_per_image,
        positive_fraction=cfg.positive_fraction,
        pre_nms_top_n={"training": cfg.pre_nms_top_n_train, "testing": cfg.pre_nms_top_n_test},
        post_nms_top_n={"training": cfg.post_nms_top_n_train, "testing": cfg.post_nms_top_n_test},
        nms_thresh=cfg.nms_thresh,
    )
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


# --------------------------------------------------------------------------------------------
# Proposal sources and sampling
# --------------------------------------------------------------------------------------------


def sample_proposals(
    boxes: Tensor, scores: Tensor, n: int, generator: torch.Generator, top_k: int | None = None
) -> Tensor:
    """Pick ``n`` proposals uniformly at random without replacement (RegionCLIP: 100 of the top 300).

    Args:
        boxes: ``[R, 4]``; scores: ``[R]``.
        n: how many to draw; all are kept when fewer are available.
        generator: a CPU ``torch.Generator``: the same state gives the same draw.
        top_k: first restrict to the ``top_k`` highest scores (None = all ``R``).

    Returns:
        int64 indices into ``boxes`` ``[min(n, R, top_k)]``, sorted ascending.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"expected boxes [R, 4] and scores [R], got {tuple(boxes.shape)} and {tuple(scores.shape)}"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    candidates = torch.arange(len(scores), device=scores.device)
    if top_k is not None and top_k < len(scores):
        candidates = scores.topk(top_k).indices
    draw = torch.randperm(len(candidates), generator=generator)[:n].to(candidates.device)
    return candidates[draw].sort().values


class ProposalSource(Protocol):
    """Boxes (original pixels, x0y0x1y1) and objectness for a batch of samples."""

    def __call__(
        self, keys: Sequence[str], images: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]: ...


class NetworkProposals:
    """A :class:`ProposalSource` running a trained :class:`ProposalNetwork` (eval, no grad).

    Images are ``[3, H, W]`` floats in [0, 1] or uint8; results come back on the CPU.
    """

    def __init__(self, model: ProposalNetwork, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, keys: Sequence[str], images: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        self.model.eval()
        batch = [
            img.to(self.device, torch.float32) / (255.0 if img.dtype == torch.uint8 else 1.0)
            for img in images
        ]
        boxes, scores, _ = self.model(batch)
        return [b.cpu() for b in boxes], [s.cpu() for s in scores]


def _parse_proposals(entry: Any, where: str) -> tuple[Tensor, Tensor]:
    if not isinstance(entry, dict) or "boxes" not in entry:
        raise ProposalError(f"{where}: expected an object with 'boxes' (and 'scores')")
    try:
        boxes = np.asarray(entry["boxes"], dtype=np.float64)
        scores = np.asarray(entry["scores"] if "scores" in entry else np.ones(len(boxes)), dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise ProposalError(f"{where}: boxes and scores must be numbers: {e}") from None
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ProposalError(
            f"{where}: boxes must be a list of [x0, y0, x1, y1], got shape {list(boxes.shape)}"
        )
    if scores.shape != (len(boxes),):
        raise ProposalError(f"{where}: {len(boxes)} boxes but scores of shape {list(scores.shape)}")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise ProposalError(f"{where}: boxes and scores must be finite")
    bad = np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
    if len(bad):
        raise ProposalError(f"{where}: box {int(bad[0])} {boxes[bad[0]].tolist()} has x1 < x0 or y1 < y0")
    return torch.from_numpy(boxes).float(), torch.from_numpy(scores).float()


def load_precomputed_proposals(path: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """Read user proposals: ``{key: (boxes [N, 4], scores [N])}`` in original image pixels.

    Formats: ``.jsonl`` (one ``{"key", "boxes", "scores"}`` per line) or JSON
    (``{key: {"boxes": [[x0, y0, x1, y1], ...], "scores": [...]}}``). ``scores`` may be omitted
    (all 1). Malformed entries raise :class:`ProposalError` naming the file and the line or key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ProposalError(f"cannot read proposals file {path}: {e.strerror}") from e
    table: dict[str, tuple[Tensor, Tensor]] = {}
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProposalError(f"{where}: invalid JSON: {e.msg}") from None
            key = entry.get("key") if isinstance(entry, dict) else None
            if not isinstance(key, str) or not key:
                raise ProposalError(f"{where}: expected a non-empty string 'key'")
            if key in table:
                raise ProposalError(f"{where}: duplicate key {key!r}")
            table[key] = _parse_proposals(entry, f"{where} (key {key!r})")
        return table
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProposalError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ProposalError(f"{path}: expected an object mapping sample keys to proposals")
    for key, entry in data.items():
        table[key] = _parse_proposals(entry, f"{path}: key {key!r}")
    return table


class PrecomputedProposals:
    """A :class:`ProposalSource` reading a table of user proposals; images are not looked at."""

    def __init__(self, table: dict[str, tuple[Tensor, Tensor]], source: str = "precomputed proposals"):
        self.table, self.source = table, source

    @classmethod
    def from_file(cls, path: str | Path) -> PrecomputedProposals:
        return cls(load_precomputed_proposals(path), str(path))

    def __call__(
        self, keys: Sequence[str], images: Sequence[Tensor] = ()
    ) -> tuple[list[Tensor], list[Tensor]]:
        missing = [k for k in keys if k not in self.table]
        if missing:
            raise ProposalError(f"{self.source}: no proposals for sample(s) {missing[:5]}")
        return [self.table[k][0] for k in keys], [self.table[k][1] for k in keys]


def build_proposal_source(cfg: RPNConfig, device: str | torch.device = "cpu") -> ProposalSource:
    """``cfg.precomputed`` when set, else the RPN trained into ``cfg.out_dir``."""
    if cfg.precomputed:
        return PrecomputedProposals.from_file(cfg.precomputed)
    return NetworkProposals(load_rpn(cfg.out_dir, device), device)


# --------------------------------------------------------------------------------------------
# Box json and images
# --------------------------------------------------------------------------------------------


@dataclass
class BoxImage:
    """One image of a COCO-format json with its usable boxes (x0y0x1y1 pixels)."""

    file: Path
    file_name: str
    boxes: list[list[float]]
    category_ids: list[int]


@dataclass
class BoxDataset:
    images: list[BoxImage]
    categories: list[dict[str, Any]]
    skipped: SampleErrors  # images and annotations left out, by reason


def _skip(errors: SampleErrors, reason: str, key: str, json_path: str, detail: str) -> None:
    errors.add(error_record(reason, key, json_path, detail))


def load_box_json(json_path: str | Path, image_root: str | Path, keep_empty: bool) -> BoxDataset:
    """Read a COCO-format json; skip (and count) crowd/degenerate boxes, missing files and, unless
    ``keep_empty``, images without boxes. All images missing is an error."""
    json_path, root = str(json_path), Path(image_root)
    try:
        data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ProposalError(f"cannot read box json {json_path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ProposalError(f"{json_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ProposalError(f"{json_path}: not a COCO json (no 'images' list)")
    errors = SampleErrors()
    by_id: dict[Any, BoxImage] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise ProposalError(f"{json_path}: images[{i}] needs 'id' and 'file_name'")
        by_id[img["id"]] = BoxImage(root / img["file_name"], img["file_name"], [], [])
    for i, ann in enumerate(data.get("annotations", [])):
        image = by_id.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if image is None:
            raise ProposalError(f"{json_path}: annotations[{i}] refers to no listed image")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            _skip(errors, "malformed_box", image.file_name, json_path, f"annotations[{i}].bbox = {bbox!r}")
        elif ann.get("iscrowd", 0):
            _skip(errors, "crowd_box", image.file_name, json_path, f"annotations[{i}]")
        elif not (bbox[2] > 0 and bbox[3] > 0 and all(math.isfinite(v) for v in bbox)):
            _skip(errors, "degenerate_box", image.file_name, json_path, f"annotations[{i}].bbox = {bbox}")
        else:
            x, y, w, h = (float(v) for v in bbox)
            image.boxes.append([x, y, x + w, y + h])
            image.category_ids.append(int(ann.get("category_id", -1)))
    images, n_missing = [], 0
    for image in by_id.values():
        if not image.file.is_file():
            n_missing += 1
            _skip(errors, "missing_image", image.file_name, json_path, f"{image.file} does not exist")
        elif image.boxes or keep_empty:
            images.append(image)
        else:
            errors.counts["no_boxes"] += 1  # expected in a base-only json; not an error worth examples
    if by_id and n_missing == len(by_id):
        raise ProposalError(f"{json_path}: none of its {len(by_id)} image files exist under {root}")
    return BoxDataset(images, list(data.get("categories", [])), errors)


def read_image(path: Path) -> Tensor:
    """``[3, H, W]`` float32 in [0, 1]; raises OSError/ValueError for unreadable files."""
    with Image.open(path) as im:
        return pil_to_tensor(im.convert("RGB")).float().div_(255)


class _BoxImages(Dataset):
    """Items ``(index, flip)`` → image + boxes, or an error record for an unreadable file."""

    def __init__(self, images: list[BoxImage]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, bool]) -> dict[str, Any]:
        index, flip = item
        rec = self.images[index]
        try:
            image = read_image(rec.file)
        except (OSError, ValueError) as e:
            return error_record("unreadable_image", rec.file_name, str(rec.file), str(e))
        h, w = image.shape[-2:]
        boxes = torch.tensor(rec.boxes, dtype=torch.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        if flip:
            image = image.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        return {"image": image, "boxes": boxes}


class _StepBatches(Sampler):
    """Batches for steps ``start..stop-1``; step ``s`` always gets the same images and flips.

    Sample position ``p = s * batch_size + j`` is entry ``p % N`` of epoch ``p // N``'s seeded
    permutation, so resuming at any step needs no sampler state.
    """

    def __init__(self, n: int, batch_size: int, seed: int, hflip_prob: float, start: int, stop: int):
        self.n, self.batch_size, self.seed, self.hflip_prob = n, batch_size, seed, hflip_prob
        self.start, self.stop = start, stop
        self._epoch, self._perm, self._flips = -1, torch.empty(0), torch.empty(0)

    def __len__(self) -> int:
        return self.stop - self.start

    def _epoch_draw(self, epoch: int) -> None:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
            self._flips = torch.rand(self.n, generator=g) < self.hflip_prob

    def batch(self, step: int) -> list[tuple[int, bool]]:
        out = []
        for p in range(step * self.batch_size, (step + 1) * self.batch_size):
            self._epoch_draw(p // self.n)
            out.append((int(self._perm[p % self.n]), bool(self._flips[p % self.n])))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for step in range(self.start, self.stop):
            yield self.batch(step)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def lr_at(step: int, cfg: RPNConfig) -> float:
    """Detectron2's WarmupMultiStepLR: linear warm-up from 0.1 % then ×``lr_decay_factor`` at each
    ``lr_decay_at`` fraction of ``steps``."""
    factor = 1.0
    if step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        factor = 0.001 * (1 - alpha) + alpha
    decays = sum(step >= int(f * cfg.steps) for f in cfg.lr_decay_at)
    return cfg.lr * factor * cfg.lr_decay_factor**decays


def _make_optimizer(model: nn.Module, cfg: RPNConfig) -> torch.optim.SGD:
    """SGD; normalisation weights get no weight decay (Detectron2's WEIGHT_DECAY_NORM = 0)."""
    norm_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        for p in m.parameters()
    }
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in norm_params], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if id(p) in norm_params], "weight_decay": 0.0},
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum)


def _resume_hash(cfg: RPNConfig) -> str:
    """Hash of the fields that shape the training trajectory (not workers, checkpoints or eval)."""
    return section_hash(
        replace(
            cfg,
            out_dir="",
            val_json="",
            num_workers=0,
            checkpoint_every=0,
            eval_batch_size=0,
            recall_at=[],
            recall_iou=0.0,
        )
    )


def _log_skips(errors: SampleErrors, source: str | Path) -> None:
    """One line of counts by reason, then the first few offending files of each real error."""
    if errors.counts:
        log.info(
            "rpn: left out of %s: %s", source, ", ".join(f"{n} {r}" for r, n in sorted(errors.counts.items()))
        )
        for line in errors.report_lines()[1:]:
            log.info("rpn: %s", line)


def is_trained(cfg: RPNConfig) -> bool:
    """``out_dir`` holds a finished network trained with exactly this config."""
    out = Path(cfg.out_dir)
    try:
        meta = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return (out / WEIGHTS_FILE).is_file() and meta.get("config_hash") == section_hash(cfg)


def train_rpn(
    cfg: RPNConfig, device: str | torch.device = "cpu", stop_after: int | None = None
) -> dict[str, Any]:
    """Train (or resume) the RPN on ``cfg.train_json``, save it, then measure recall on ``cfg.val_json``.

    Args:
        stop_after: run at most this many steps in this call, then checkpoint and return
            (``summary["finished"]`` is False); a later call resumes exactly.

    Returns:
        The summary also written to ``<out_dir>/summary.json`` when training finished.
    """
    out, device = Path(cfg.out_dir), torch.device(device)
    if is_trained(cfg):
        log.info("rpn: %s already holds a network trained with this config; skipping", out)
        summary_file = out / SUMMARY_FILE
        return (
            json.loads(summary_file.read_text(encoding="utf-8"))
            if summary_file.is_file()
            else {"finished": True}
        )
    if cfg.precision not in ("fp32", "bf16"):
        raise ProposalError(f"rpn.precision={cfg.precision!r}: expected fp32 or bf16")
    data = load_box_json(cfg.train_json, cfg.image_root, cfg.keep_empty)
    if not data.images:
        raise ProposalError(f"{cfg.train_json}: no image with boxes to train on ({data.skipped.summary()})")
    torch.manual_seed(cfg.seed)
    model = build_proposal_network(cfg).to(device)
    optimizer = _make_optimizer(model, cfg)
    ckpt_dir = out / CHECKPOINT_DIR
    start, progress = load_checkpoint(
        ckpt_dir, model, optimizer, _resume_hash(cfg), "rpn config", ProposalError
    )
    stop = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    skipped = SampleErrors()
    skipped.counts.update(progress.get("skipped", {}))
    sampler = _StepBatches(len(data.images), cfg.batch_size, cfg.seed, cfg.hflip_prob, start, stop)
    loader = DataLoader(
        _BoxImages(data.images),
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=list,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched
        persistent_workers=False,
    )
    if start:
        log.info("rpn: resuming at step %d from %s", start, ckpt_dir)
    model.train()
    images_seen, seconds = int(progress.get("images", 0)), float(progress.get("seconds", 0.0))
    recent: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    step = start
    bar = tqdm(loader, total=stop - start, initial=0, desc=f"rpn steps {start}->{stop}", unit="step")
    for batch in bar:
        good = [s for s in batch if ERROR_FIELD not in s]
        for s in batch:
            if ERROR_FIELD in s:
                skipped.add(s)
        if good:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = [s["image"].to(device) for s in good]
            targets = [{"boxes": s["boxes"].to(device)} for s in good]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                _, _, losses = model(images, targets)
            optimizer_step(losses, optimizer, f"rpn step {step}", "rpn.lr")
            images_seen += len(good)
            bar.set_postfix(update_running(recent, losses), refresh=False)
        step += 1
        if step < stop and cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0:
            elapsed = seconds + time.perf_counter() - t0
            save_checkpoint(ckpt_dir, model, optimizer, step, _resume_hash(cfg),
                             {"images": images_seen, "seconds": elapsed, "skipped": dict(skipped.counts)})  # fmt: skip
    bar.close()
    seconds += time.perf_counter() - t0
    final_losses = {k: float(np.mean(v)) for k, v in recent.items()}
    total_skipped = SampleErrors()
    for errors in (data.skipped, skipped):
        total_skipped.update(errors)
    train_summary = {
        "images": images_seen,
        "steps": step,
        "seconds": round(seconds, 2),
        "images_per_s": round(images_seen / max(seconds, 1e-9), 2),
        "final_losses": final_losses,  # mean of the last (up to) 20 steps of this call
        "train_images": len(data.images),
        "skipped": dict(total_skipped.counts),
    }
    losses_text = ", ".join(f"{k} {v:.3f}" for k, v in final_losses.items())
    if step < cfg.steps:
        save_checkpoint(ckpt_dir, model, optimizer, step, _resume_hash(cfg),
                         {"images": images_seen, "seconds": seconds, "skipped": dict(skipped.counts)})  # fmt: skip
        log.info(
            "rpn: stopped at step %d of %d (checkpoint in %s); %s", step, cfg.steps, ckpt_dir, losses_text
        )
        return {"finished": False, "train": train_summary}
    _log_skips(total_skipped, cfg.train_json)
    log.info(
        "rpn: trained %d steps on %d images (%d seen) in %.1f s, %.1f images/s; %s",
        step, len(data.images), images_seen, seconds, images_seen / max(seconds, 1e-9), losses_text,
    )  # fmt: skip
    save_rpn(model, cfg, out, extra={"train": train_summary})
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    summary: dict[str, Any] = {"finished": True, "config_hash": section_hash(cfg), "train": train_summary}
    if cfg.val_json:
        summary["recall"] = evaluate_recall(
            model.eval(), cfg.val_json, cfg.image_root, cfg.train_json, cfg.recall_at, cfg.recall_iou,
            cfg.eval_batch_size, device,
        )  # fmt: skip
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


# --------------------------------------------------------------------------------------------
# Recall
# --------------------------------------------------------------------------------------------


def recalled(proposals: Tensor, gt_boxes: Tensor, ks: Sequence[int], iou_thresh: float) -> Tensor:
    """Which ground-truth boxes the first ``k`` proposals cover (IoU ≥ ``iou_thresh``).

    Args:
        proposals: ``[R, 4]``, highest objectness first; gt_boxes: ``[G, 4]``; both x0y0x1y1.

    Returns:
        bool ``[len(ks), G]``.
    """
    out = torch.zeros(len(ks), len(gt_boxes), dtype=torch.bool)
    if len(proposals) and len(gt_boxes):
        iou = box_iou(gt_boxes.float(), proposals.float()).cpu()
        for i, k in enumerate(ks):
            out[i] = iou[:, :k].max(dim=1).values >= iou_thresh
    return out


def category_splits(categories: list[dict[str, Any]], train_json: str | Path | None) -> dict[int, str]:
    """Category id → ``base``/``novel``: a category's own ``split`` field when present, else
    ``base`` exactly when the training json has a box of it."""
    if all(c.get("split") in ("base", "novel") for c in categories):
        return {int(c["id"]): c["split"] for c in categories}
    trained: set[int] = set()
    if train_json:
        try:
            anns = json.loads(Path(train_json).read_text(encoding="utf-8")).get("annotations", [])
        except (OSError, json.JSONDecodeError) as e:
            raise ProposalError(f"cannot read {train_json} to tell base from novel categories: {e}") from e
        trained = {int(a["category_id"]) for a in anns if isinstance(a, dict) and "category_id" in a}
    return {int(c["id"]): "base" if int(c["id"]) in trained else "novel" for c in categories}


@torch.no_grad()
def evaluate_recall(
    model: ProposalNetwork,
    val_json: str | Path,
    image_root: str | Path,
    train_json: str | Path | None,
    ks: Sequence[int] = (100, 300),
    iou_thresh: float = 0.5,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Proposal recall@k of the val boxes, for base and novel categories separately and overall.

    Returns ``{"base"|"novel"|"all": {"boxes": G, "recall@k": r, ...}, "images": n, "skipped": {...}}``.
    """
    data = load_box_json(val_json, image_root, keep_empty=False)
    splits = category_splits(data.categories, train_json)
    source = NetworkProposals(model, device)
    hits: dict[str, list[Tensor]] = {"base": [], "novel": []}
    n_images = 0
    for i in tqdm(range(0, len(data.images), batch_size), desc="rpn recall", unit="batch"):
        batch, images = [], []
        for rec in data.images[i : i + batch_size]:
            try:
                images.append(read_image(rec.file))
                batch.append(rec)
            except (OSError, ValueError) as e:
                _skip(data.skipped, "unreadable_image", rec.file_name, str(val_json), str(e))
        if not batch:
            continue
        boxes, _ = source([r.file_name for r in batch], images)
        for rec, props in zip(batch, boxes, strict=True):
            got = recalled(props, torch.tensor(rec.boxes).reshape(-1, 4), ks, iou_thresh)
            split = torch.tensor([splits.get(c) == "novel" for c in rec.category_ids], dtype=torch.bool)
            hits["base"].append(got[:, ~split])
            hits["novel"].append(got[:, split])
        n_images += len(batch)
    _log_skips(data.skipped, val_json)
    result: dict[str, Any] = {"images": n_images, "iou": iou_thresh, "skipped": dict(data.skipped.counts)}
    cat = {
        name: torch.cat(h, 1) if h else torch.zeros(len(ks), 0, dtype=torch.bool) for name, h in hits.items()
    }
    cat["all"] = torch.cat([cat["base"], cat["novel"]], 1)
    for name, h in cat.items():
        entry: dict[str, Any] = {"boxes": h.shape[1]}
        for j, k in enumerate(ks):
            entry[f"recall@{k}"] = round(h[j].float().mean().item(), 4) if h.shape[1] else None
        result[name] = entry
    log.info(
        "rpn recall (IoU %.2f, %d images): %s",
        iou_thresh,
        n_images,
        "; ".join(
            f"{name} ({result[name]['boxes']} boxes) "
            + ", ".join(f"@{k} {result[name][f'recall@{k}']}" for k in ks)
            for name in ("base", "novel", "all")
        ),
    )
    return result
