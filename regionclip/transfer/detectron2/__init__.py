"""Detectron2 plugin: the open-vocabulary C4 detector on Detectron2 0.6's registries.

- :mod:`.export`: a CLIP ResNet (student / teacher) → Detectron2 checkpoint (no Detectron2 needed);
- :mod:`.config`: ``add_regionclip_config`` (``MODEL.CLIP.*``, ``DATASETS.REGISTER_COCO``);
- :mod:`.modeling`: backbone, ROI heads and meta-architecture, registered on import;
- :mod:`.data`: dataset registration, bicubic augmentation, the AP50 base/novel evaluator;
- :mod:`.train`: the ``DefaultTrainer`` used by ``python -m pipelines.detectron2_train``.

Detectron2 is imported only when one of its names below is first used (and then the modeling
module is imported first, so the registries are filled before any ``build_model``); exporting
works without it. See docs/detectron2.md.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from regionclip.transfer.detectron2.export import export_student

_LAZY = {
    "add_regionclip_config": "config",
    "CLIPResNetC4": "modeling",
    "CLIPRes5ROIHeads": "modeling",
    "OfflineProposals": "modeling",
    "RegionCLIPRCNN": "modeling",
    "TextEmbeddingOutputLayers": "modeling",
    "OVDEvaluator": "data",
    "clip_augmentations": "data",
    "register_datasets": "data",
    "RegionCLIPTrainer": "train",
    "setup_cfg": "train",
}

__all__ = ["export_student", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        importlib.import_module(f"{__name__}.modeling")  # fills Detectron2's registries
    except ImportError as e:
        if importlib.util.find_spec("detectron2") is not None:
            raise
        raise ImportError(
            f"{__name__}.{name} needs Detectron2, which is not installed: see docs/detectron2.md"
        ) from e
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
