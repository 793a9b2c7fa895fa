"""Detectron2 ``DefaultTrainer`` for the open-vocabulary detector (``pipelines.detectron2_train``).

Differs from ``DefaultTrainer`` in the data (bicubic resizing), the evaluator
(:class:`~regionclip.transfer.detectron2.data.OVDEvaluator`) and in :meth:`test`, which sets
each test dataset's own vocabulary (its ``thing_classes``) before evaluating it.
:func:`check_inputs` and :func:`run` are what the entry point calls before and inside
Detectron2's ``launch``.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import (
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from regionclip.errors import TransferError
from regionclip.transfer.detectron2.config import add_regionclip_config
from regionclip.transfer.detectron2.data import OVDEvaluator, clip_augmentations, register_datasets
from regionclip.transfer.detectron2.modeling import clip_arch, test_vocabulary


def setup_cfg(config_file: str, opts: list[str]):
    """Detectron2 defaults + the plugin's keys + ``config_file`` + ``opts`` (KEY VALUE ...), frozen."""
    cfg = add_regionclip_config(get_cfg())
    if config_file:
        if not Path(config_file).is_file():
            raise TransferError(f"--config-file {config_file}: no such file")
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


def check_inputs(cfg, eval_only: bool, resume: bool) -> None:
    """Fail before any process starts when the weights file or the architecture is missing.

    Raises:
        TransferError: naming the config key (``MODEL.WEIGHTS``, ``MODEL.CLIP.OPENCLIP_MODEL*``).
    """
    weights = cfg.MODEL.WEIGHTS
    resuming = resume and (Path(cfg.OUTPUT_DIR) / "last_checkpoint").is_file()
    if eval_only and not weights:
        raise TransferError("--eval-only needs MODEL.WEIGHTS: the checkpoint to evaluate")
    if weights and "://" not in weights and not resuming and not Path(weights).is_file():
        raise TransferError(
            f"MODEL.WEIGHTS={weights}: no such file (write one with `python -m pipelines.export_detectron2`, "
            "or pass a trained model_final.pth)"
        )
    clip_arch(cfg)


def log_to_output_dir(output_dir: str) -> None:
    """The project's own messages (the evaluator's summary line) in the console and ``log.txt``,
    beside Detectron2's: its ``default_setup`` configures only its own loggers."""
    logger = logging.getLogger("regionclip")
    for handler in list(logger.handlers):  # an earlier run in this process logged elsewhere
        logger.removeHandler(handler)
    setup_logger(output_dir, distributed_rank=comm.get_rank(), name="regionclip", abbrev_name="rc",
                 enable_propagation=True)  # fmt: skip


def run(args):
    """One process's work (``launch`` calls it in every worker), from Detectron2's
    ``default_argument_parser`` arguments: train, or with ``--eval-only`` evaluate every
    ``DATASETS.TEST`` with its own vocabulary."""
    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    log_to_output_dir(cfg.OUTPUT_DIR)
    register_datasets(cfg)
    if args.eval_only:
        model = RegionCLIPTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return RegionCLIPTrainer.test(cfg, model)
    trainer = RegionCLIPTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


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
