"""RegionCLIP's open-vocabulary C4 detector on Detectron2's registries.

Importing this module registers:

- ``BACKBONE_REGISTRY["build_clip_resnet_c4_backbone"]``: :class:`CLIPResNetC4`, the open_clip
  ``ModifiedResNet`` (all BatchNorm frozen, ``MODEL.BACKBONE.FREEZE_AT``) giving ``res4``
  (stride 16). Its ``layer4`` + attention pool stay in the backbone, as in RegionCLIP's
  checkpoints, and serve as the box head (:meth:`CLIPResNetC4.box_head`).
- ``ROI_HEADS_REGISTRY["CLIPRes5ROIHeads"]``: ROIAlignV2 → layer4 → attention pool →
  :class:`TextEmbeddingOutputLayers` (frozen text embeddings, background logit 0, / temperature,
  focal-scaled CE with background weight — :mod:`regionclip.transfer.classifier` — and
  class-agnostic box regression).
- ``META_ARCH_REGISTRY["RegionCLIPRCNN"]``: :class:`RegionCLIPRCNN`, whose proposals come from
  the project's frozen RPN (``MODEL.CLIP.RPN_DIR``) or, without one, from a trainable Detectron2
  RPN on res4.

Why the frozen RPN is the project's own network, loaded by :func:`regionclip.models.rpn.load_rpn`
and kept out of the state dict (:class:`OfflineProposals`): RegionCLIP loads its RPN as a second
checkpoint into the same model, and a second load can reset every CLIP FrozenBN missing from it
to identity statistics. Here checkpoints hold only the recognition branch, so
loading one can neither overwrite nor reset the RPN, and the RPN is always exactly the file the
config names. The RPN runs on the un-normalised image (it normalises and resizes itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import open_clip
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, cat
from detectron2.modeling import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    ROI_HEADS_REGISTRY,
    Backbone,
    GeneralizedRCNN,
    build_backbone,
    build_proposal_generator,
    build_roi_heads,
)
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import ROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, _log_classification_stats
from detectron2.structures import Boxes, ImageList, Instances
from open_clip.model import CLIPVisionCfg
from open_clip.modified_resnet import ModifiedResNet
from torch import Tensor, nn

from regionclip.errors import ProposalError, TransferError
from regionclip.evaluation.zero_shot import rpn_weighted_scores
from regionclip.models.resnet_path import region_head, stage, stem
from regionclip.models.rpn import ProposalNetwork, load_rpn
from regionclip.models.towers import freeze_stages
from regionclip.text import load_embeddings, read_names_file
from regionclip.transfer.classifier import TextClassifier, ov_classification_loss
from regionclip.transfer.detectron2.export import ARCH_SUFFIX, read_arch, sidecar
from regionclip.transfer.vocabulary import select_embeddings

C4_STRIDE = 16

# --------------------------------------------------------------------------------------------
# Architecture and vocabulary from the config
# --------------------------------------------------------------------------------------------


def clip_arch(cfg) -> dict:
    """The open_clip architecture dict of ``MODEL.CLIP`` (a JSON file, else a registered name)."""
    clip = cfg.MODEL.CLIP
    if clip.OPENCLIP_MODEL_CONFIG:
        try:
            return read_arch(clip.OPENCLIP_MODEL_CONFIG)
        except ValueError as e:
            raise TransferError(f"MODEL.CLIP.OPENCLIP_MODEL_CONFIG: {e}") from None
    arch = open_clip.get_model_config(clip.OPENCLIP_MODEL)
    if arch is None:
        written = (
            str(sidecar(cfg.MODEL.WEIGHTS, ARCH_SUFFIX))
            if cfg.MODEL.WEIGHTS
            else f"<weights stem>{ARCH_SUFFIX}"
        )
        raise TransferError(
            f"MODEL.CLIP.OPENCLIP_MODEL={clip.OPENCLIP_MODEL!r} is not an open_clip architecture: set "
            f"MODEL.CLIP.OPENCLIP_MODEL_CONFIG to its JSON file (the exporter writes {written})"
        )
    return arch


def build_clip_resnet(arch: dict) -> ModifiedResNet:
    """A randomly initialised open_clip ``ModifiedResNet`` of ``arch`` (weights come from MODEL.WEIGHTS)."""
    vision = CLIPVisionCfg(**arch["vision_cfg"])
    if not isinstance(vision.layers, (list, tuple)):
        raise ValueError(
            f"the C4 detector needs a CLIP ResNet (vision_cfg.layers = 4 stage depths), got layers={vision.layers!r}"
        )
    return ModifiedResNet(
        layers=list(vision.layers),
        output_dim=int(arch["embed_dim"]),
        heads=vision.width * 32 // vision.head_width,  # as open_clip's _build_vision_tower
        image_size=vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0],
        width=vision.width,
    )


def dataset_classes(name: str) -> list[str]:
    """``thing_classes`` of a registered dataset (see :func:`register_datasets`)."""
    classes = MetadataCatalog.get(name).get("thing_classes")
    if not classes:
        raise TransferError(
            f"dataset {name!r} has no thing_classes: list it in DATASETS.REGISTER_COCO "
            "(regionclip.transfer.detectron2.register_datasets) before building the model"
        )
    return list(classes)


def vocabulary(
    embeddings_file: str,
    dataset: str,
    key: str = "MODEL.CLIP.TEXT_EMB_PATH",
    names: Sequence[str] | None = None,
) -> Tensor:
    """``[C, D]`` rows of ``embeddings_file`` (the value of config ``key``) for the classes of
    ``dataset`` in its contiguous order, or for ``names`` when given."""
    if not embeddings_file:
        raise TransferError(
            f"{key} is empty: write class embeddings with "
            "`python -m pipelines.export_detectron2 ... --class-json JSON`"
        )
    try:
        emb, emb_names, _ = load_embeddings(embeddings_file)
    except (OSError, ValueError) as e:
        raise TransferError(f"{key}: {e}") from None
    source = MetadataCatalog.get(dataset).get("json_file") or f"dataset {dataset!r}"
    wanted = dataset_classes(dataset) if names is None else list(names)
    return select_embeddings(
        emb, emb_names, wanted, embeddings_file, source if names is None else "the vocabulary"
    )


def test_vocabulary_names(cfg) -> list[str] | None:
    """The names of ``MODEL.CLIP.TEST_VOCABULARY``, or None (each test dataset's own classes)."""
    path = cfg.MODEL.CLIP.TEST_VOCABULARY
    if not path:
        return None
    try:
        return read_names_file(path)
    except ValueError as e:
        raise TransferError(f"MODEL.CLIP.TEST_VOCABULARY: {e}") from None


def test_vocabulary(cfg, dataset: str) -> Tensor:
    """The inference vocabulary for ``dataset``: the rows of ``OPENSET_TEST_TEXT_EMB_PATH`` (or
    ``TEXT_EMB_PATH``) for its classes, or for the names of ``TEST_VOCABULARY``."""
    clip = cfg.MODEL.CLIP
    names = test_vocabulary_names(cfg)
    if clip.OPENSET_TEST_TEXT_EMB_PATH:
        return vocabulary(
            clip.OPENSET_TEST_TEXT_EMB_PATH, dataset, "MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH", names
        )
    return vocabulary(clip.TEXT_EMB_PATH, dataset, names=names)


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------


class CLIPResNetC4(Backbone):
    """CLIP ``ModifiedResNet`` as a Detectron2 backbone: ``res4`` = stem → layer1..3 (stride 16).

    The tower's modules become this module's children under their open_clip names, so the
    checkpoint keys are ``backbone.conv1.weight`` ... ``backbone.attnpool.c_proj.bias``
    (RegionCLIP's layout). Every BatchNorm is Detectron2's ``FrozenBatchNorm2d``; the first
    ``freeze_at`` stages (1 = stem, 2 = + layer1, ...) get no gradient.
    """

    def __init__(self, visual: ModifiedResNet, freeze_at: int = 2):
        super().__init__()
        visual = FrozenBatchNorm2d.convert_frozen_batchnorm(visual)
        for m in visual.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.num_batches_tracked = None  # a frozen BN has no counter: keep it out of checkpoints
        freeze_stages(visual, freeze_at)
        for name, child in visual.named_children():
            self.add_module(name, child)
        self.output_dim = visual.attnpool.c_proj.out_features
        self._out_features = ["res4"]
        self._out_feature_channels = {"res4": visual.layer4[0].conv1.in_channels}
        self._out_feature_strides = {"res4": C4_STRIDE}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Normalised images ``[B, 3, H, W]`` → ``{"res4": [B, C4, ceil(H/2)//8, ceil(W/2)//8]}``."""
        x = stem(self, x)
        for layer in (self.layer1, self.layer2, self.layer3):
            x = stage(layer, x)
        return {"res4": x}

    def box_head(self, pooled: Tensor) -> Tensor:
        """RoI features ``[R, C4, s, s]`` → region embeddings ``[R, D]`` (layer4 → attention pool)."""
        if pooled.shape[0] == 0:
            return pooled.new_zeros(0, self.output_dim)
        return region_head(self, pooled)


@BACKBONE_REGISTRY.register()
def build_clip_resnet_c4_backbone(cfg, input_shape: ShapeSpec) -> CLIPResNetC4:
    """``MODEL.BACKBONE.NAME: build_clip_resnet_c4_backbone``."""
    if input_shape.channels != 3:
        raise ValueError(f"CLIP ResNets take 3-channel images, got {input_shape.channels}")
    if list(cfg.MODEL.RESNETS.OUT_FEATURES) != ["res4"]:
        raise ValueError(
            f"MODEL.RESNETS.OUT_FEATURES={list(cfg.MODEL.RESNETS.OUT_FEATURES)}: the CLIP C4 backbone gives ['res4']"
        )
    return CLIPResNetC4(build_clip_resnet(clip_arch(cfg)), cfg.MODEL.BACKBONE.FREEZE_AT)


# --------------------------------------------------------------------------------------------
# Box predictor and ROI heads
# --------------------------------------------------------------------------------------------


class TextEmbeddingOutputLayers(FastRCNNOutputLayers):
    """``FastRCNNOutputLayers`` whose classifier is a frozen text vocabulary.

    ``cls_score`` is the training vocabulary, ``test_cls_score`` (when given) replaces it in
    eval mode, as RegionCLIP's ``OPENSET_TEST_TEXT_EMB_PATH``. Neither has parameters or
    persistent buffers: checkpoints never carry a vocabulary, so the embedding files of the run
    always decide it. Box regression is class-agnostic (one box per RoI, whatever the vocabulary).
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        train_embeddings: Tensor,
        test_embeddings: Tensor | None = None,
        temperature: float = 0.01,
        bg_weight: float = 0.2,
        focal_gamma: float = 0.5,
        multiply_rpn_score: bool = False,
        **kwargs,
    ):
        if not kwargs.get("cls_agnostic_bbox_reg", False):
            raise ValueError(
                "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG must be True: the test vocabulary differs from the training one"
            )
        if kwargs.get("use_sigmoid_ce") or kwargs.get("use_fed_loss"):
            raise ValueError(
                "the text-embedding classifier uses softmax CE: disable USE_SIGMOID_CE / USE_FED_LOSS"
            )
        kwargs["num_classes"] = len(train_embeddings)
        super().__init__(input_shape, **kwargs)
        self.cls_score = TextClassifier(input_shape.channels, train_embeddings, temperature)
        self.test_cls_score = (
            TextClassifier(input_shape.channels, test_embeddings, temperature)
            if test_embeddings is not None
            else None
        )
        self.bg_weight, self.focal_gamma = float(bg_weight), float(focal_gamma)
        self.multiply_rpn_score = bool(multiply_rpn_score)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        clip = cfg.MODEL.CLIP
        if not cfg.DATASETS.TRAIN and not cfg.DATASETS.TEST:
            raise TransferError("DATASETS.TRAIN and DATASETS.TEST are empty: no dataset names the classes")
        train_set = (cfg.DATASETS.TRAIN or cfg.DATASETS.TEST)[0]
        test_set = (cfg.DATASETS.TEST or cfg.DATASETS.TRAIN)[0]
        train = vocabulary(clip.TEXT_EMB_PATH, train_set)
        if cfg.MODEL.ROI_HEADS.NUM_CLASSES not in (0, len(train)):  # 0: whatever the dataset has
            raise TransferError(
                f"class-count mismatch: MODEL.ROI_HEADS.NUM_CLASSES={cfg.MODEL.ROI_HEADS.NUM_CLASSES} but "
                f"dataset {train_set!r} has {len(train)} classes"
            )
        del ret["num_classes"]
        ret.update(
            train_embeddings=train,
            test_embeddings=test_vocabulary(cfg, test_set),
            temperature=clip.CLSS_TEMP,
            bg_weight=clip.BG_CLS_LOSS_WEIGHT,
            focal_gamma=clip.FOCAL_SCALED_LOSS,
            multiply_rpn_score=clip.MULTIPLY_RPN_SCORE,
        )
        return ret

    def set_test_embeddings(self, embeddings: Tensor) -> None:
        """Swap the inference vocabulary (``[C', D]``); outputs become ``C' + 1`` scores."""
        if self.test_cls_score is None:
            self.test_cls_score = TextClassifier(self.cls_score.dim, embeddings, self.cls_score.temperature)
        else:
            self.test_cls_score.set_embeddings(embeddings)
        self.test_cls_score.to(self.bbox_pred.weight.device)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Region embeddings ``[R, D]`` → (logits ``[R, C + 1]``, background last; deltas ``[R, 4]``)."""
        classifier = self.cls_score if self.training or self.test_cls_score is None else self.test_cls_score
        return classifier(x), self.bbox_pred(x)

    def predict_probs(self, predictions, proposals: Sequence[Instances]) -> tuple[Tensor, ...]:
        """Per image ``[R_i, C + 1]`` softmax scores; with ``multiply_rpn_score`` the class columns
        become ``sqrt(score * sigmoid(objectness_logits))`` (the background column is unused)."""
        probs = super().predict_probs(predictions, proposals)
        if not self.multiply_rpn_score:
            return probs
        weighted = []
        for p, image_probs in zip(proposals, probs, strict=True):
            if not p.has("objectness_logits"):
                raise ValueError("MODEL.CLIP.MULTIPLY_RPN_SCORE needs proposals with objectness_logits")
            objectness = torch.sigmoid(p.objectness_logits.float())
            weighted.append(
                torch.cat([rpn_weighted_scores(image_probs[:, :-1], objectness), image_probs[:, -1:]], 1)
            )
        return tuple(weighted)

    def losses(self, predictions, proposals: Sequence[Instances]) -> dict[str, Tensor]:
        """``loss_cls`` (focal-scaled, background-weighted CE) and ``loss_box_reg`` (Detectron2's)."""
        scores, deltas = predictions
        if len(proposals):
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            # proposals without a matched GT are all background: their gt box is never used
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals]
            )
        else:
            gt_classes = torch.empty(0, dtype=torch.int64, device=deltas.device)
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=deltas.device)
        _log_classification_stats(scores, gt_classes)
        losses = {
            "loss_cls": ov_classification_loss(scores, gt_classes, self.bg_weight, self.focal_gamma),
            "loss_box_reg": self.box_reg_loss(proposal_boxes, gt_boxes, deltas, gt_classes),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}


BoxHead = Callable[[Tensor], Tensor]


@ROI_HEADS_REGISTRY.register()
class CLIPRes5ROIHeads(ROIHeads):
    """RegionCLIP's ``CLIPRes5ROIHeads``: ROIAlign on res4 → the backbone's layer4 + attention pool
    (passed in as ``box_head``, so its weights live once, under ``backbone.``) → text classifier."""

    @configurable
    def __init__(self, *, in_features: list[str], pooler: ROIPooler, box_predictor: nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.in_features = in_features
        self.pooler = pooler
        self.box_predictor = box_predictor

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg)
        in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        if len(in_features) != 1:
            raise ValueError(f"MODEL.ROI_HEADS.IN_FEATURES={in_features}: the C4 heads pool one feature map")
        ret["in_features"] = in_features
        ret["pooler"] = ROIPooler(
            output_size=cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
            scales=(1.0 / input_shape[in_features[0]].stride,),
            sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
        )
        predictor = TextEmbeddingOutputLayers(cfg, ShapeSpec(channels=int(clip_arch(cfg)["embed_dim"])))
        ret["box_predictor"] = predictor
        ret["num_classes"] = predictor.num_classes
        return ret

    def region_embeddings(
        self, features: dict[str, Tensor], boxes: Sequence[Boxes], box_head: BoxHead
    ) -> Tensor:
        """Per-image boxes (image pixels of the batch) → ``[sum R_i, D]``, image 0's regions first."""
        return box_head(self.pooler([features[f] for f in self.in_features], list(boxes)))

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        proposals: list[Instances],
        targets: list[Instances] | None = None,
        box_head: BoxHead | None = None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """Train: ``([], losses)`` on proposals sampled against ``targets``; eval: (detections, {})."""
        del images
        if box_head is None:
            raise ValueError("CLIPRes5ROIHeads needs the backbone's box_head (layer4 + attention pool)")
        if self.training:
            if not targets:
                raise ValueError("CLIPRes5ROIHeads needs targets in training")
            proposals = self.label_and_sample_proposals(proposals, targets)
        embeddings = self.region_embeddings(features, [p.proposal_boxes for p in proposals], box_head)
        predictions = self.box_predictor(embeddings)
        if self.training:
            return [], self.box_predictor.losses(predictions, proposals)
        detections, _ = self.box_predictor.inference(predictions, proposals)
        return detections, {}


# --------------------------------------------------------------------------------------------
# Frozen proposals and the meta-architecture
# --------------------------------------------------------------------------------------------


class OfflineProposals(nn.Module):
    """The project's frozen RPN as a Detectron2 proposal source, outside the model's state dict.

    The network is held as a plain attribute: it has no entry in ``state_dict()`` or
    ``parameters()`` (no optimiser, no checkpoint, no DDP broadcast), yet moves with the model
    (``_apply``) and always runs in eval mode without gradients.
    """

    def __init__(self, network: ProposalNetwork, max_proposals: int = 0, input_format: str = "RGB"):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT={input_format!r}: the frozen RPN takes RGB or BGR images")
        if max_proposals < 0:
            raise ValueError(f"MODEL.CLIP.MAX_PROPOSALS must be >= 0, got {max_proposals}")
        self.__dict__["network"] = network.eval().requires_grad_(False)
        self.max_proposals = int(max_proposals)
        self.bgr = input_format == "BGR"

    def _apply(self, fn, recurse=True):
        self.network._apply(fn)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def forward(self, images: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[Instances]:
        """Mapper images ``[3, h, w]`` (0-255, INPUT.FORMAT) → ``Instances(proposal_boxes,
        objectness_logits)`` of size ``(h, w)``, highest objectness first."""
        device = next(self.network.parameters()).device
        batch = [(img.flip(0) if self.bgr else img).to(device, torch.float32) / 255.0 for img in images]
        self.network.eval()
        boxes, scores, _ = self.network(batch)
        k = self.max_proposals or None
        out = []
        for b, s, size in zip(boxes, scores, image_sizes, strict=True):
            inst = Instances(tuple(size))
            inst.proposal_boxes = Boxes(b[:k])
            inst.objectness_logits = torch.logit(s[:k], eps=1e-6)
            out.append(inst)
        return out


@META_ARCH_REGISTRY.register()
class RegionCLIPRCNN(GeneralizedRCNN):
    """RegionCLIP's ``CLIPFastRCNN``: CLIP C4 backbone + :class:`CLIPRes5ROIHeads`, proposals from
    :class:`OfflineProposals` (``MODEL.CLIP.RPN_DIR``) or a trainable Detectron2 RPN."""

    @configurable
    def __init__(self, *, offline_proposals: OfflineProposals | None = None, **kwargs):
        super().__init__(**kwargs)
        if (offline_proposals is None) == (self.proposal_generator is None):
            raise ValueError("RegionCLIPRCNN needs exactly one of a frozen RPN and a proposal generator")
        if not isinstance(self.backbone, CLIPResNetC4):
            raise TypeError(
                f"RegionCLIPRCNN needs MODEL.BACKBONE.NAME build_clip_resnet_c4_backbone, got {type(self.backbone).__name__}"
            )
        self.offline_proposals = offline_proposals

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        clip = cfg.MODEL.CLIP
        offline = None
        if clip.RPN_DIR:
            try:
                rpn = load_rpn(clip.RPN_DIR)
            except ProposalError as e:
                raise TransferError(f"MODEL.CLIP.RPN_DIR: {e}") from None
            offline = OfflineProposals(rpn, clip.MAX_PROPOSALS, cfg.INPUT.FORMAT)
        return {
            "backbone": backbone,
            "proposal_generator": None if offline else build_proposal_generator(cfg, backbone.output_shape()),
            "offline_proposals": offline,
            "roi_heads": build_roi_heads(cfg, backbone.output_shape()),
            "input_format": cfg.INPUT.FORMAT,
            "vis_period": cfg.VIS_PERIOD,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    def set_test_vocabulary(self, embeddings: Tensor) -> None:
        """Class embeddings ``[C', D]`` used in eval mode (rows in the test dataset's class order)."""
        self.roi_heads.box_predictor.set_test_embeddings(embeddings)

    def _proposals(
        self, batched_inputs, images: ImageList, features: dict[str, Tensor], gt: list[Instances] | None
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        if self.offline_proposals is not None:
            return self.offline_proposals([x["image"] for x in batched_inputs], images.image_sizes), {}
        return self.proposal_generator(images, features, gt)

    def forward(self, batched_inputs: list[dict]):
        """Detectron2's model interface: losses in training, ``[{"instances": ...}]`` in eval."""
        if not self.training:
            return self.inference(batched_inputs)
        if "instances" not in batched_inputs[0]:
            raise ValueError("training inputs need 'instances' (the dataset mapper must keep annotations)")
        images = self.preprocess_image(batched_inputs)
        gt = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        proposals, losses = self._proposals(batched_inputs, images, features, gt)
        _, detector_losses = self.roi_heads(images, features, proposals, gt, box_head=self.backbone.box_head)
        losses.update(detector_losses)
        return losses

    def inference(self, batched_inputs: list[dict], detected_instances=None, do_postprocess: bool = True):
        """Detections per image (rescaled to each input's ``height``/``width`` when post-processing).
        ``detected_instances`` are returned as given: this detector has no mask or keypoint head."""
        if self.training:
            raise RuntimeError("inference needs eval mode")
        images = self.preprocess_image(batched_inputs)
        if detected_instances is None:
            features = self.backbone(images.tensor)
            proposals, _ = self._proposals(batched_inputs, images, features, None)
            results, _ = self.roi_heads(images, features, proposals, None, box_head=self.backbone.box_head)
        else:
            results = [x.to(self.device) for x in detected_instances]
        if do_postprocess:
            return GeneralizedRCNN._postprocess(results, batched_inputs, images.image_sizes)
        return results
