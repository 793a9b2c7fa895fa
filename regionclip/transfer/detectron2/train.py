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
import sys
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
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

from regionclip.engine.run_cache import file_digest, finished, run_hash
from regionclip.errors import TransferError
from regionclip.transfer.detectron2.config import add_regionclip_config
from regionclip.transfer.detectron2.data import OVDEvaluator, clip_augmentations, register_datasets
from regionclip.transfer.detectron2.modeling import clip_arch, test_vocabulary, test_vocabulary_names
from regionclip.utils import atomic_write_json

# OUTPUT_DIR's run-cache record: a finished training of the same config and input files is skipped
RUN_RECORD = "regionclip_run.json"


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


@contextmanager
def log_to_output_dir(output_dir: str) -> Iterator[None]:
    """The project's own messages (the evaluator's summary line) in ``log.txt`` beside Detectron2's
    (its ``default_setup`` configures only its own loggers) and on the console, for the duration
    of a run: a later stage in the same process (``make demo``) must not write into this log."""
    logger = logging.getLogger("regionclip")
    handlers: list[logging.Handler] = []
    if comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        handlers += [
            logging.FileHandler(os.path.join(output_dir, "log.txt")),
            logging.StreamHandler(sys.stdout),
        ]
    for handler in handlers:
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s]: %(message)s", "%m/%d %H:%M:%S"))
        logger.addHandler(handler)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, like Detectron2's own lines
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.propagate = propagate
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


def training_identity(cfg) -> str:
    """Run hash of a training: the whole config and the content of every file it reads."""
    clip = cfg.MODEL.CLIP
    files = [
        cfg.MODEL.WEIGHTS,
        clip.OPENCLIP_MODEL_CONFIG,
        clip.TEXT_EMB_PATH,
        clip.OPENSET_TEST_TEXT_EMB_PATH,
        clip.TEST_VOCABULARY,
    ]
    files += (
        [os.path.join(clip.RPN_DIR, name) for name in ("rpn.json", "rpn.safetensors")] if clip.RPN_DIR else []
    )
    files += [json_file for _, json_file, _ in cfg.DATASETS.REGISTER_COCO]
    return run_hash(cfg.dump(), [file_digest(f) for f in files])


def run(args):
    """One process's work (``launch`` calls it in every worker), from Detectron2's
    ``default_argument_parser`` arguments: train, or with ``--eval-only`` evaluate every
    ``DATASETS.TEST`` with its own vocabulary. A training whose OUTPUT_DIR already holds the
    finished run of the same config and inputs is skipped (its metrics stay where they are)."""
    cfg = setup_cfg(args.config_file, args.opts)
    record_file = Path(cfg.OUTPUT_DIR) / RUN_RECORD
    identity = training_identity(cfg) if not args.eval_only else ""
    done = finished(record_file, identity) if identity else None
    if done is not None and (Path(cfg.OUTPUT_DIR) / "model_final.pth").is_file():
        if comm.is_main_process():
            print(f"detectron2_train: {cfg.OUTPUT_DIR} already holds this run; skipping")
        return None
    default_setup(cfg, args)
    with log_to_output_dir(cfg.OUTPUT_DIR):
        register_datasets(cfg)
        if args.eval_only:
            model = RegionCLIPTrainer.build_model(cfg)
            DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
                cfg.MODEL.WEIGHTS, resume=args.resume
            )
            return RegionCLIPTrainer.test(cfg, model)
        trainer = RegionCLIPTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    if comm.is_main_process():
        atomic_write_json(record_file, {"run_hash": identity})
    return results


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
            dataset_name, output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name), train_json,
            test_vocabulary_names(cfg),
        )  # fmt: skip

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
