"""Datasets, input augmentation and the open-vocabulary evaluator for the Detectron2 route.

- :func:`register_datasets`: the COCO-format jsons of ``DATASETS.REGISTER_COCO`` (the project's
  ``instances_<split>_{base,all}.json`` from ``data_prep.coco`` or EmojiWorld's
  ``det_train.json`` / ``val.json``) via ``register_coco_instances``, with ``thing_classes`` set
  at once, so the model can pick its vocabulary before any json is loaded;
- :func:`clip_augmentations`: Detectron2's resize + flip, with bicubic resizing as RegionCLIP;
- :class:`OVDEvaluator`: COCO results → AP50 all / base / novel + the 12 COCO metrics, or LVIS
  AP / APr / APc / APf for an LVIS-format json (:func:`regionclip.evaluation.evaluator.evaluator_for`,
  :func:`regionclip.evaluation.coco_ap.ap_summary`), written like ``make transfer``'s
  ``metrics.json`` / ``detections.json``; for a test vocabulary of its own, predictions are mapped
  to the dataset's categories by name and distractors' detections left out.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import detectron2.data.transforms as T
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from PIL import Image

from regionclip.data.coco import category_splits, read_categories, read_coco
from regionclip.errors import TransferError
from regionclip.evaluation.coco_ap import ap_summary
from regionclip.evaluation.evaluator import (
    evaluator_for,
    to_coco_results,
    vocabulary_classes,
    vocabulary_coverage,
)
from regionclip.utils import atomic_write_json

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
DETECTIONS_FILE = "detections.json"


def register_datasets(cfg) -> list[str]:
    """Register every ``[name, json_file, image_root]`` of ``cfg.DATASETS.REGISTER_COCO``.

    Checks up front that each json is readable, has unique category names and that every image
    file exists (a run would otherwise stop at the first missing file, hours in). Registering the
    same name again with the same json is a no-op. Returns the names.

    Raises:
        TransferError: a bad entry, json or missing images (named), or a name registered with
            another json.
    """
    names = []
    for entry in cfg.DATASETS.REGISTER_COCO:
        if not (
            isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(x, str) for x in entry)
        ):
            raise TransferError(
                f"DATASETS.REGISTER_COCO entries must be [name, json_file, image_root], got {entry!r}"
            )
        name, json_file, image_root = entry
        if name in DatasetCatalog.list():
            registered = MetadataCatalog.get(name).get("json_file")
            if registered != json_file:
                raise TransferError(
                    f"dataset {name!r} is already registered with {registered}, not {json_file}"
                )
            names.append(name)
            continue
        categories = sorted(
            read_categories(json_file, TransferError), key=lambda c: c["id"]
        )  # load_coco_json's order
        read_coco(json_file, image_root, error=TransferError)  # every image file exists
        register_coco_instances(name, {}, json_file, image_root)
        MetadataCatalog.get(name).set(
            thing_classes=[c["name"] for c in categories],
            thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)},
        )
        ids = [c["id"] for c in categories]
        if ids != list(range(1, len(ids) + 1)):
            log.info(
                "%s: its %d category ids (%d to %d) map to class indices 0-%d in id order; Detectron2 "
                "warns 'Category ids in annotations are not in [1, #categories]' about this expected mapping",
                name, len(ids), ids[0], ids[-1], len(ids) - 1,
            )  # fmt: skip
        names.append(name)
    return names


def clip_augmentations(cfg, is_train: bool) -> list[T.Augmentation]:
    """Shortest-edge resize (bicubic, as RegionCLIP and :mod:`regionclip.models.preprocess`) and,
    in training, ``INPUT.RANDOM_FLIP``; otherwise Detectron2's ``build_augmentation``."""
    if is_train:
        augs: list[T.Augmentation] = [
            T.ResizeShortestEdge(
                cfg.INPUT.MIN_SIZE_TRAIN,
                cfg.INPUT.MAX_SIZE_TRAIN,
                cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
                interp=Image.BICUBIC,
            )
        ]
        if cfg.INPUT.RANDOM_FLIP != "none":
            augs.append(
                T.RandomFlip(
                    horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                    vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
                )
            )
        return augs
    return [
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice", interp=Image.BICUBIC)
    ]


class OVDEvaluator(DatasetEvaluator):
    """AP50 on all / base / novel classes of a registered COCO- or LVIS-format dataset.

    Base/novel comes from the categories' ``split`` field, else from which categories have boxes
    in ``train_json``. ``vocabulary``: the test-time names the model predicts (None = the dataset's
    ``thing_classes``), matched to the categories by name; names of no category are distractors.
    With ``output_dir``, writes ``detections.json`` (COCO results) and ``metrics.json`` (fractions
    0-1, as ``make transfer``). Returns Detectron2's ``{"bbox": {metric: percent}}``.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: str | None = None,
        train_json: str = "",
        vocabulary: Sequence[str] | None = None,
    ):
        meta = MetadataCatalog.get(dataset_name)
        self.dataset_name = dataset_name
        self.json_file = meta.json_file
        contiguous = meta.thing_dataset_id_to_contiguous_id
        self.category_ids = [cid for cid, _ in sorted(contiguous.items(), key=lambda kv: kv[1])]
        self.vocabulary = None if vocabulary is None else list(vocabulary)
        classes = meta.thing_classes
        try:  # prediction index -> the dataset's contiguous class (-1: a distractor)
            self.vocab_classes = (
                torch.arange(len(classes)) if vocabulary is None else vocabulary_classes(vocabulary, classes, self.json_file)
            )  # fmt: skip
        except ValueError as e:
            raise TransferError(f"MODEL.CLIP.TEST_VOCABULARY: {e}") from None
        self.output_dir = Path(output_dir) if output_dir else None
        self.train_json = train_json
        self.reset()

    def reset(self) -> None:
        self._results: list[dict[str, Any]] = []
        self._images = 0

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs, strict=True):
            self._images += 1
            inst = out["instances"].to("cpu")
            classes = self.vocab_classes[inst.pred_classes]
            keep = classes >= 0
            self._results.extend(
                to_coco_results(
                    inp["image_id"], inst.pred_boxes.tensor[keep], inst.scores[keep], classes[keep], self.category_ids
                )
            )  # fmt: skip

    def evaluate(self) -> OrderedDict:
        results = list(itertools.chain(*comm.gather(self._results, dst=0)))
        images = sum(comm.gather(self._images, dst=0))
        if not comm.is_main_process():
            return OrderedDict()
        categories = read_categories(self.json_file, TransferError)
        splits = category_splits(categories, train_json=self.train_json or None, error=TransferError)
        scorer = evaluator_for(self.json_file, self.category_ids, splits)
        scorer.results = results
        summary = {
            "dataset": self.dataset_name,
            **ap_summary(scorer.evaluate(), categories, splits),
            "eval": {"images": images, "detections": len(results)},
        }
        if self.vocabulary is not None:
            classes = MetadataCatalog.get(self.dataset_name).thing_classes
            summary["vocabulary"] = {
                "names": self.vocabulary,
                **vocabulary_coverage(self.vocabulary, self.vocab_classes, classes),
            }
        if self.output_dir is not None:
            atomic_write_json(self.output_dir / DETECTIONS_FILE, results)
            atomic_write_json(self.output_dir / METRICS_FILE, summary)
        stats = summary.get("coco") or summary.get("lvis") or {}
        flat = {k: summary[k] for k in ("AP50_all", "AP50_base", "AP50_novel")} | stats
        log.info(
            "%s: %d images, %d detections; AP50 all %s base %s novel %s%s",
            self.dataset_name, images, len(results), *(_pct(summary[f"AP50_{s}"]) for s in ("all", "base", "novel")),
            "; LVIS AP/APr/APc/APf " + "/".join(_pct(stats.get(k)) for k in ("AP", "APr", "APc", "APf"))
            if "lvis" in summary else "",
        )  # fmt: skip
        # Detectron2 prints percentages; undefined values (None, pycocotools' -1) as nan
        return OrderedDict(
            bbox={k: float("nan") if v is None or v < 0 else 100.0 * v for k, v in flat.items()}
        )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"
