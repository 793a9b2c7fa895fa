"""The config keys of the Detectron2 plugin (``MODEL.CLIP.*``, ``DATASETS.REGISTER_COCO``).

Names follow RegionCLIP's fork where it had the same knob (``TEXT_EMB_PATH``,
``OPENSET_TEST_TEXT_EMB_PATH``, ``CLSS_TEMP``, ``BG_CLS_LOSS_WEIGHT``, ``FOCAL_SCALED_LOSS``).
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN

# building a model from this config needs the plugin's classes in Detectron2's registries
import regionclip.transfer.detectron2.modeling  # noqa: F401

# CLIP's normalisation in Detectron2's 0-255 pixel scale, RGB (regionclip.models.preprocess)
CLIP_PIXEL_MEAN = [122.7709383, 116.7460125, 104.09373615]
CLIP_PIXEL_STD = [68.5005327, 66.6321579, 70.32316305]


def add_regionclip_config(cfg: CN) -> CN:
    """Add the plugin's keys with their defaults to a Detectron2 ``cfg`` (in place; returns it)."""
    cfg.MODEL.CLIP = CN()
    # The image tower: an open_clip architecture name, or a JSON architecture file (the exporter's
    # model.open_clip.json, an open_clip model config, or a checkpoint's open_clip_config.json).
    cfg.MODEL.CLIP.OPENCLIP_MODEL = "RN50"
    cfg.MODEL.CLIP.OPENCLIP_MODEL_CONFIG = ""
    # Class text embeddings (regionclip.text format: .safetensors + .txt names). Rows are picked
    # by the thing_classes of DATASETS.TRAIN[0] (training) and of each test dataset (inference).
    cfg.MODEL.CLIP.TEXT_EMB_PATH = ""
    cfg.MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH = ""  # empty = TEXT_EMB_PATH
    # Test-time names (a file, one per line; empty = each test dataset's own classes): matched to a
    # test dataset's categories by name, the others are distractors whose detections are left out.
    # Their rows come from OPENSET_TEST_TEXT_EMB_PATH (or TEXT_EMB_PATH).
    cfg.MODEL.CLIP.TEST_VOCABULARY = ""
    cfg.MODEL.CLIP.CLSS_TEMP = 0.01  # logits = cosine / temperature
    cfg.MODEL.CLIP.BG_CLS_LOSS_WEIGHT = 0.2
    cfg.MODEL.CLIP.FOCAL_SCALED_LOSS = 0.5  # gamma of CE * (1 - p_t)^gamma; 0 = plain CE
    # The frozen class-agnostic RPN: a folder written by `make rpn` (rpn.safetensors + rpn.json).
    # Empty = a trainable Detectron2 RPN on res4 (MODEL.RPN.*, MODEL.PROPOSAL_GENERATOR.*).
    cfg.MODEL.CLIP.RPN_DIR = ""
    cfg.MODEL.CLIP.MAX_PROPOSALS = 0  # frozen RPN: top-k by objectness per image (0 = all it returns)
    # inference: class score = sqrt(class score * sigmoid(objectness logit)), as RegionCLIP on RPN boxes
    cfg.MODEL.CLIP.MULTIPLY_RPN_SCORE = False
    # COCO-format datasets to register: [[name, json_file, image_root], ...]
    cfg.DATASETS.REGISTER_COCO = []
    return cfg
