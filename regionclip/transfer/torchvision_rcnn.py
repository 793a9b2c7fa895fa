"""Open-vocabulary Faster R-CNN (C4) on a CLIP ResNet, built from torchvision pieces.

RegionCLIP's ``CLIPFastRCNN``, written out explicitly:

- backbone: the CLIP ``ModifiedResNet`` stem → layer1..layer3 (C4, stride 16), every BatchNorm
  frozen (``FrozenBatchNorm2d``), the first ``freeze_at`` stages frozen (2 = stem + layer1);
- proposals: given by the caller (the project's frozen class-agnostic RPN, as RegionCLIP) or a
  trainable torchvision ``RegionProposalNetwork`` on C4;
- box head: RoIAlign (aligned, 2 × attention-pool grid) → the same CLIP ``layer4`` → attention
  pool (shared with the CLIP weights and trained) → [R, D] region embeddings;
- :class:`~regionclip.transfer.classifier.TextClassifier` (frozen text embeddings, background
  logit 0, / temperature) and a class-agnostic box regressor ``Linear(D, 4)``.

Training samples RoIs per image (GT appended, IoU matching, fixed foreground fraction) with
torchvision's ``Matcher`` / ``BalancedPositiveNegativeSampler`` / ``BoxCoder``; inference does
per-class NMS with ``batched_nms``. Boxes are in the pixel frame of the (resized) input batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.utils import freeze_batch_norm_2d
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from regionclip.config import TransferConfig
from regionclip.evaluation.zero_shot import rpn_weighted_scores
from regionclip.models.region import RegionEncoder
from regionclip.models.rpn import rpn_module
from regionclip.models.towers import freeze_stages, require_resnet
from regionclip.transfer.classifier import TextClassifier, ov_classification_loss

# torchvision's Fast R-CNN box-delta weights and clamp (Detectron2 uses the same values)
BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
SMOOTH_L1_BETA = 1.0 / 9


class OpenVocabFasterRCNN(nn.Module):
    """CLIP-C4 Faster R-CNN whose classifier is a swappable text vocabulary.

    Args:
        visual: an open_clip ``ModifiedResNet`` (``model.visual``); converted to FrozenBN in place.
        classifier: the text classifier (its dim must be the attention pool's output size).
        rpn: a trainable torchvision RPN on C4, or None when proposals come from outside.
    """

    def __init__(
        self,
        visual: ModifiedResNet,
        classifier: TextClassifier,
        rpn: RegionProposalNetwork | None = None,
        pooler_resolution: int = 0,
        freeze_at: int = 2,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        fg_iou_thresh: float = 0.5,
        bg_weight: float = 0.2,
        focal_gamma: float = 0.5,
        score_thresh: float = 0.001,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
    ):
        super().__init__()
        visual = freeze_batch_norm_2d(require_resnet(visual, "the C4 detector"))
        freeze_stages(visual, freeze_at)
        self.encoder = RegionEncoder(visual, pooler_resolution or None)
        dim = self.encoder.output_dim
        if classifier.dim != dim:
            raise ValueError(
                f"classifier dimension {classifier.dim} does not match the region embedding dimension {dim}"
            )
        self.classifier = classifier
        self.box_regressor = nn.Linear(dim, 4)
        nn.init.normal_(self.box_regressor.weight, std=0.001)  # Detectron2's init of bbox_pred
        nn.init.zeros_(self.box_regressor.bias)
        self.rpn = rpn
        self.matcher = det_utils.Matcher(fg_iou_thresh, fg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_coder = det_utils.BoxCoder(BBOX_REG_WEIGHTS)
        self.bg_weight, self.focal_gamma = bg_weight, focal_gamma
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_image = detections_per_image

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def _proposals(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        features: Tensor,
        proposals: Sequence[Tensor] | None,
        targets: Sequence[dict[str, Tensor]] | None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        if self.rpn is None:
            if proposals is None or len(proposals) != len(image_sizes):
                raise ValueError("without a trainable RPN the detector needs one proposal tensor per image")
            return [p.to(features.device, torch.float32) for p in proposals], {}
        rpn_targets = [{"boxes": t["boxes"]} for t in targets] if self.training and targets else None
        boxes, losses = self.rpn(ImageList(images, list(image_sizes)), {"0": features}, rpn_targets)
        return [b.detach() for b in boxes], losses

    def forward(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        proposals: Sequence[Tensor] | None = None,
        targets: Sequence[dict[str, Tensor]] | None = None,
        objectness: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Train mode: losses; eval mode: detections.

        Args:
            images: ``[B, 3, H, W]`` CLIP-normalised, zero-padded (see ``batch_images``).
            image_sizes: ``(h_i, w_i)`` of each image inside the padded batch.
            proposals: ``[R_i, 4]`` x0y0x1y1 in batch pixels (ignored with a trainable RPN).
            targets: train mode: ``{"boxes": [G_i, 4], "labels": int64 [G_i] in 0..C-1}``.
            objectness: eval mode, optional: ``[R_i]`` in [0, 1] per proposal; class scores become
                ``sqrt(score * objectness)`` (RegionCLIP's MULTIPLY_RPN_SCORE).

        Returns:
            train: ``{"loss_cls", "loss_box_reg"}`` (+ ``loss_objectness``, ``loss_rpn_box_reg``
            with a trainable RPN); eval: per image ``{"boxes" [K, 4], "scores" [K], "labels" [K]}``,
            labels in 0..C-1, at most ``detections_per_image``.
        """
        if self.training and targets is None:
            raise ValueError("the detector needs targets in train mode")
        features = self.encoder.dense_features(images)
        boxes, losses = self._proposals(images, image_sizes, features, proposals, targets)
        if self.training:
            boxes, labels, regression_targets = self.sample_rois(boxes, targets)
        embeddings = self.encoder.pool_regions(features, boxes)
        logits = self.classifier(embeddings)
        deltas = self.box_regressor(embeddings).float()
        if self.training:
            labels_all, targets_all = torch.cat(labels), torch.cat(regression_targets)
            losses["loss_cls"] = ov_classification_loss(logits, labels_all, self.bg_weight, self.focal_gamma)
            losses["loss_box_reg"] = box_regression_loss(deltas, targets_all, labels_all, self.num_classes)
            return losses
        return self.postprocess(logits, deltas, boxes, image_sizes, objectness)

    @torch.no_grad()
    def sample_rois(
        self, proposals: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """GT appended → IoU matching → balanced sampling, per image.

        Returns per image: sampled boxes ``[S_i, 4]``, labels ``[S_i]`` (class, or C for
        background) and box-delta targets ``[S_i, 4]`` (meaningful for foreground rows only).
        """
        background = self.num_classes
        boxes_out, labels_out, matched_out, binary = [], [], [], []
        for props, target in zip(proposals, targets, strict=True):
            gt, gt_labels = target["boxes"].to(props), target["labels"].to(props.device)
            if (gt_labels >= background).any() or (gt_labels < 0).any():
                raise ValueError(f"target labels must be in 0..{background - 1}, got {gt_labels.tolist()}")
            props = torch.cat([props, gt])
            if len(gt):
                matched = self.matcher(box_iou(gt, props))
                labels = gt_labels[matched.clamp(min=0)].clone()
                labels[matched < 0] = background
                matched_boxes = gt[matched.clamp(min=0)]
            else:  # an image without boxes: every RoI is background
                labels = torch.full((len(props),), background, dtype=torch.int64, device=props.device)
                matched_boxes = props
            boxes_out.append(props)
            labels_out.append(labels)
            matched_out.append(matched_boxes)
            # the sampler's convention: 1 foreground, 0 background
            binary.append((labels != background).to(torch.int64))
        pos, neg = self.sampler(binary)
        sampled_boxes, sampled_labels, deltas = [], [], []
        for props, labels, matched_boxes, p, n in zip(
            boxes_out, labels_out, matched_out, pos, neg, strict=True
        ):
            keep = (p | n).nonzero().squeeze(1)
            sampled_boxes.append(props[keep])
            sampled_labels.append(labels[keep])
            deltas.append(self.box_coder.encode_single(matched_boxes[keep], props[keep]))
        return sampled_boxes, sampled_labels, deltas

    def postprocess(
        self,
        logits: Tensor,
        deltas: Tensor,
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        objectness: Sequence[Tensor] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Softmax over classes + background (times the proposals' ``objectness`` under a square
        root when given) → per-class boxes above ``score_thresh`` → per-class NMS → the
        ``detections_per_image`` best. All classes share the one regressed box of a RoI."""
        counts = [len(p) for p in proposals]
        probs = F.softmax(logits.float(), dim=-1)[:, :-1]
        if objectness is not None:
            probs = rpn_weighted_scores(probs, torch.cat([o.float() for o in objectness]))
        out = []
        for prob, delta, props, size in zip(
            probs.split(counts), deltas.split(counts), proposals, image_sizes, strict=True
        ):
            n, c = prob.shape
            boxes = clip_boxes_to_image(self.box_coder.decode_single(delta, props.to(delta)), size)
            boxes = boxes[:, None, :].expand(n, c, 4).reshape(-1, 4)
            scores = prob.reshape(-1)
            labels = torch.arange(c, device=prob.device).repeat(n)
            keep = (scores > self.score_thresh).nonzero().squeeze(1)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = remove_small_boxes(boxes, 1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_image]
            out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return out


def box_regression_loss(deltas: Tensor, targets: Tensor, labels: Tensor, background: int) -> Tensor:
    """Class-agnostic smooth-L1 (β = 1/9) on foreground RoIs, summed and divided by all N sampled
    RoIs (torchvision's ``fastrcnn_loss``, which itself assumes class-specific deltas).

    Args:
        deltas, targets: ``[N, 4]``; labels: ``[N]`` with ``background`` for background RoIs.
    """
    fg = labels != background
    if labels.numel() == 0:
        return deltas.sum() * 0.0
    return F.smooth_l1_loss(deltas[fg], targets[fg], beta=SMOOTH_L1_BETA, reduction="sum") / labels.numel()


def build_c4_rpn(visual: ModifiedResNet, cfg: TransferConfig) -> RegionProposalNetwork:
    """A trainable torchvision RPN on the C4 map: one feature level, every anchor size on it."""
    channels = visual.layer4[0].conv1.in_channels
    anchors = AnchorGenerator(
        sizes=(tuple(int(s) for s in cfg.rpn_anchor_sizes),),
        aspect_ratios=(tuple(float(a) for a in cfg.rpn_aspect_ratios),),
    )
    # Detectron2's RPN defaults: IoU 0.7 / 0.3, 256 anchors per image, half positive
    return rpn_module(
        RegionProposalNetwork, anchors, channels, 0.7, 0.3, 256, 0.5,
        (cfg.rpn_pre_nms_top_n_train, cfg.rpn_pre_nms_top_n_test),
        (cfg.rpn_post_nms_top_n_train, cfg.rpn_post_nms_top_n_test), cfg.rpn_nms_thresh,
    )  # fmt: skip


def build_detector(visual: ModifiedResNet, embeddings: Tensor, cfg: TransferConfig) -> OpenVocabFasterRCNN:
    """The detector of ``cfg`` on ``visual`` with ``embeddings`` [C, D] (the training vocabulary)."""
    if cfg.proposals not in ("frozen", "trainable"):
        raise ValueError(f"transfer.proposals={cfg.proposals!r}: expected 'frozen' or 'trainable'")
    dim = require_resnet(visual, "transfer").attnpool.c_proj.out_features
    classifier = TextClassifier(dim, embeddings, cfg.temperature)
    rpn = build_c4_rpn(visual, cfg) if cfg.proposals == "trainable" else None
    return OpenVocabFasterRCNN(
        visual,
        classifier,
        rpn,
        pooler_resolution=cfg.pooler_resolution,
        freeze_at=cfg.freeze_at,
        batch_size_per_image=cfg.batch_size_per_image,
        positive_fraction=cfg.positive_fraction,
        fg_iou_thresh=cfg.fg_iou_thresh,
        bg_weight=cfg.bg_weight,
        focal_gamma=cfg.focal_gamma,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_image=cfg.detections_per_image,
    )
