"""Detectron2 ``DefaultTrainer`` for the open-vocabulary detector (``pipelines.detectron2_train``).

Differs from ``DefaultTrainer`` in the data (bicubic resizing), the evaluator
(:class:`~regionclip.transfer.detectron2.data.OVDEvaluator`) and in :meth:`test`, which sets
each test dataset's own vocabulary (its ``thing_classes``) before evaluating it.
"""

from __future__ import annotations

import os
from collections import OrderedDict

from detectron2.config import get_cfg
from detectron2.data import (
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer

from regionclip.transfer.detectron2.config import add_regionclip_config
from regionclip.transfer.detectron2.data import OVDEvaluator, clip_augmentations
from regionclip.transfer.detectron2.modeling import test_vocabulary


def setup_cfg(config_file: str, opts: list[str]):
    """Detectron2 defaults + the plugin's keys + ``config_file`` + ``opts`` (KEY VALUE ...), frozen."""
    cfg = add_regionclip_config(get_cfg())
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


class RegionCLIPTrainer(DefaultTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(
            cfg, mapper=DatasetMapper(cfg, True, augmentations=clip_augmentations(cfg, True))
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=DatasetMapper(cfg, False, augmentations=clip_augmentations(cfg, False))
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        train_json = (
            MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("json_file", "") if cfg.DATASETS.TRAIN else ""
        )
        return OVDEvaluator(
            dataset_name, output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name), train_json
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """``DefaultTrainer.test``, one dataset at a time with that dataset's vocabulary."""
        if evaluators is not None and len(evaluators) != len(cfg.DATASETS.TEST):
            raise ValueError(f"{len(evaluators)} evaluators for {len(cfg.DATASETS.TEST)} test datasets")
        detector = getattr(model, "module", model)  # unwrap DistributedDataParallel
        results = OrderedDict()
        for i, name in enumerate(cfg.DATASETS.TEST):
            detector.set_test_vocabulary(test_vocabulary(cfg, name))
            one = cfg.clone()
            one.defrost()
            one.DATASETS.TEST = (name,)
            results[name] = super().test(one, model, None if evaluators is None else [evaluators[i]])
        return next(iter(results.values())) if len(results) == 1 else results
