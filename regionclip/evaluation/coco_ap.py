"""COCO box AP per category split, as RegionCLIP's COCOEvaluator computes it.

pycocotools' COCOeval on boxes; split numbers are read from ``eval['precision']`` at IoU 0.5,
area "all", 100 detections, averaged over the split's categories that have ground truth; every
value is a fraction in [0, 1]. :func:`ap_summary` is the metrics block that ``make transfer``, the
Detectron2 evaluator and zero-shot detection write.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from regionclip.utils import read_json

# The 12 numbers of COCOeval.summarize() for boxes, in its order.
COCO_STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def _quiet_coco(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def load_coco_gt(gt: str | os.PathLike | Mapping[str, Any] | COCO) -> COCO:
    """A COCO ground-truth object from a json path, a parsed dict or an existing ``COCO``.

    Annotations lacking ``iscrowd`` or ``area`` (optional in hand-written files, required by
    COCOeval) get ``iscrowd = 0`` and ``area = w * h``.
    """
    if isinstance(gt, COCO):
        coco = gt
    else:
        if isinstance(gt, Mapping):
            dataset = copy.deepcopy(dict(gt))
            where = "ground-truth dict"
        else:
            where = str(gt)
            dataset = read_json(gt, "COCO json")
        missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
        if missing:
            raise ValueError(f"{where}: not a COCO json, missing {missing}")
        coco = _quiet_coco(dataset)
    for ann in coco.dataset.get("annotations", []):
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    return coco


def _split_ap(precision: np.ndarray, cat_index: Mapping[int, int], cat_ids: Sequence[int]) -> float | None:
    """Mean over ``cat_ids`` of each category's AP (mean of its precision entries > -1).

    ``precision``: [T, R, K] slice of ``COCOeval.eval['precision']`` (one area range, one maxDets).
    Categories with no entry > -1 (no ground truth) are left out; None when none is left.
    """
    aps = []
    for cid in cat_ids:
        k = cat_index.get(int(cid))
        if k is None:
            continue
        p = precision[:, :, k]
        p = p[p > -1]
        if p.size:
            aps.append(float(np.mean(p)))
    return float(np.mean(aps)) if aps else None


def coco_ap_by_split(
    gt: str | os.PathLike | Mapping[str, Any] | COCO,
    results: Sequence[Mapping[str, Any]],
    splits: Mapping[str, Sequence[int]],
) -> dict[str, Any]:
    """COCO box AP of ``results`` against ``gt``, overall and per category split.

    Args:
        gt: COCO ground truth (json path, dict or ``COCO``).
        results: COCO detection results ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.
        splits: split name -> category ids (e.g. ``{"base": [...], "novel": [...]}``); an ``"all"``
            split (every ground-truth category) is added unless given.

    Returns:
        ``{"AP50": {split: value}, "AP": {split: value}, "coco": {12 COCOeval stats},
        "per_category_AP50": {category id: value}, "num_detections": N}``. Values are fractions
        in [0, 1]; a split whose categories have no ground truth gets None. Empty ``results``
        give zeros (pycocotools cannot load an empty result list). COCO stats keep
        pycocotools' -1 for undefined entries (e.g. no small objects).

    Raises:
        ValueError: a result refers to an image id that is not in ``gt``, or lacks a field.
    """
    coco_gt = load_coco_gt(gt)
    splits = dict(splits)
    splits.setdefault("all", sorted(coco_gt.getCatIds()))
    gt_cats_with_boxes = {a["category_id"] for a in coco_gt.dataset["annotations"]}

    def empty_value(cat_ids: Sequence[int]) -> float | None:
        return 0.0 if gt_cats_with_boxes & {int(c) for c in cat_ids} else None

    if len(results) == 0:
        return {
            "AP50": {name: empty_value(ids) for name, ids in splits.items()},
            "AP": {name: empty_value(ids) for name, ids in splits.items()},
            "coco": dict.fromkeys(COCO_STAT_NAMES, 0.0),
            "per_category_AP50": {int(c): 0.0 for c in sorted(gt_cats_with_boxes)},
            "num_detections": 0,
        }

    image_ids = set(coco_gt.getImgIds())
    for i, r in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in r]
        if missing:
            raise ValueError(f"detection result {i}: missing {missing}")
        if r["image_id"] not in image_ids:
            raise ValueError(
                f"detection result {i}: image_id {r['image_id']!r} is not in the ground truth "
                f"({len(image_ids)} images)"
            )
    # loadRes adds fields to the dicts it gets: give it copies.
    dets = [
        {
            "image_id": int(r["image_id"]),
            "category_id": int(r["category_id"]),
            "bbox": [float(v) for v in r["bbox"]],
            "score": float(r["score"]),
        }
        for r in results
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # precision: [T iou thresholds, R recall points, K categories, A area ranges, M maxDets]
    precision = ev.eval["precision"]
    cat_index = {int(c): k for k, c in enumerate(ev.params.catIds)}
    all_areas_100 = precision[:, :, :, 0, -1]
    ap50 = all_areas_100[:1]
    per_cat = {}
    for cid in sorted(gt_cats_with_boxes):
        value = _split_ap(ap50, cat_index, [cid])
        if value is not None:
            per_cat[int(cid)] = value
    return {
        "AP50": {name: _split_ap(ap50, cat_index, ids) for name, ids in splits.items()},
        "AP": {name: _split_ap(all_areas_100, cat_index, ids) for name, ids in splits.items()},
        "coco": {name: float(v) for name, v in zip(COCO_STAT_NAMES, ev.stats, strict=True)},
        "per_category_AP50": per_cat,
        "num_detections": len(dets),
    }


def ap_summary(
    metrics: Mapping[str, Any], categories: Sequence[Mapping[str, Any]], splits: Mapping[str, Sequence[int]]
) -> dict[str, Any]:
    """The metrics block of a detector run from :func:`coco_ap_by_split`'s ``metrics``:
        ``AP50_{all,base,novel}``, ``AP`` per split, the 12 COCO stats, how many classes of each split
        have boxes, and per-class AP50 (fractions); LVIS metrics carry ``lvis`` (AP, APr, APc, APf, ...)
    instead of ``coco``."""
    with_gt = metrics["per_category_AP50"]
    groups = {
        "all": [int(c["id"]) for c in categories],
        **{s: list(splits.get(s, [])) for s in ("base", "novel")},
    }
    return {
        **{f"AP50_{s}": metrics["AP50"].get(s) for s in ("all", "base", "novel")},
        "AP": metrics["AP"],
        **{k: metrics[k] for k in ("coco", "lvis") if k in metrics},  # the evaluator's own stats
        "classes_with_boxes": {s: sum(c in with_gt for c in ids) for s, ids in groups.items()},
        "AP50_per_class": {str(c): v for c, v in with_gt.items()},
    }
