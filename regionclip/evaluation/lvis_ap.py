"""LVIS box AP (AP, APr, APc, APf) through the ``lvis`` package, per category split like
:func:`~regionclip.evaluation.coco_ap.coco_ap_by_split`.

LVIS is federated: a detection of a category neither annotated in its image nor in the image's
``neg_category_ids`` is not counted, and false positives of ``not_exhaustive_category_ids`` are
ignored; at most 300 detections per image count. A json is in LVIS format when every category
has a ``frequency`` (``r``/``c``/``f``) and every image ``neg_category_ids`` and
``not_exhaustive_category_ids``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from regionclip.evaluation.coco_ap import _split_ap

LVIS_MAX_DETS = 300
LVIS_AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
FREQUENCIES = ("r", "c", "f")


def is_lvis_format(dataset: Mapping[str, Any]) -> bool:
    """Whether a parsed json carries what LVIS evaluation needs (see the module docstring)."""
    cats, images = dataset.get("categories") or [], dataset.get("images") or []
    return (
        bool(cats)
        and all(c.get("frequency") in FREQUENCIES for c in cats)
        and all("neg_category_ids" in im and "not_exhaustive_category_ids" in im for im in images)
    )


@contextlib.contextmanager
def _numpy_float_alias() -> Iterator[None]:
    # lvis 0.5.3, its last release, calls np.float, which NumPy 1.24 removed
    added = not hasattr(np, "float")
    if added:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.float  # type: ignore[attr-defined]


def _undefined_as_none(value: float) -> float | None:
    return None if value < 0 else float(value)  # the lvis package's -1: no ground truth


def lvis_ap_by_split(
    gt: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    splits: Mapping[str, Sequence[int]],
    max_dets: int = LVIS_MAX_DETS,
) -> dict[str, Any]:
    """LVIS box AP of ``results`` (COCO results format) against the LVIS-format ``gt`` dict.

    Returns ``{"AP50": {split: value}, "AP": {split: value}, "lvis": {AP, AP50, AP75, APs, APm,
    APl, APr, APc, APf, AR@300}, "per_category_AP50": {category id: value}, "num_detections": N}``,
    fractions in [0, 1]; None where a split or frequency group has no ground truth. An ``"all"``
    split is added unless given.
    """
    logging.getLogger("lvis").setLevel(logging.ERROR)  # INFO lines per step, a WARNING per call
    from lvis import LVIS, LVISEval, LVISResults

    splits = dict(splits)
    splits.setdefault("all", sorted(int(c["id"]) for c in gt["categories"]))
    with_boxes = sorted({int(a["category_id"]) for a in gt.get("annotations", [])})
    if not results:  # LVISResults cannot take an empty list
        zero = {
            name: (0.0 if set(with_boxes) & {int(c) for c in ids} else None) for name, ids in splits.items()
        }
        return {"AP50": zero, "AP": dict(zero), "lvis": dict.fromkeys((*LVIS_AP_NAMES, f"AR@{max_dets}"), 0.0),
                "per_category_AP50": dict.fromkeys(with_boxes, 0.0), "num_detections": 0}  # fmt: skip
    dets = [
        {"image_id": int(r["image_id"]), "category_id": int(r["category_id"]),
         "bbox": [float(v) for v in r["bbox"]], "score": float(r["score"])}
        for r in results
    ]  # fmt: skip
    # the lvis package needs every box's area; hand-written files often leave it out
    annotations = [
        {**a, "area": a.get("area", float(a["bbox"][2]) * float(a["bbox"][3]))}
        for a in gt.get("annotations", [])
    ]
    with tempfile.TemporaryDirectory() as tmp:  # LVIS reads its ground truth from a file only
        path = Path(tmp) / "gt.json"
        path.write_text(json.dumps({**gt, "annotations": annotations}), encoding="utf-8")
        lvis_gt = LVIS(str(path))
    with warnings.catch_warnings(), _numpy_float_alias():
        warnings.simplefilter("ignore", DeprecationWarning)  # the package's logger.warn calls
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, dets, max_dets=max_dets), "bbox")
        ev.params.max_dets = max_dets
        ev.run()
    # precision: [T iou thresholds, R recall points, K categories, A area ranges]
    all_areas = ev.eval["precision"][:, :, :, 0]
    cat_index = {int(c): k for k, c in enumerate(ev.params.cat_ids)}
    ap50 = all_areas[:1]
    per_cat = {c: v for c in with_boxes if (v := _split_ap(ap50, cat_index, [c])) is not None}
    return {
        "AP50": {name: _split_ap(ap50, cat_index, ids) for name, ids in splits.items()},
        "AP": {name: _split_ap(all_areas, cat_index, ids) for name, ids in splits.items()},
        "lvis": {name: _undefined_as_none(ev.results[name]) for name in (*LVIS_AP_NAMES, f"AR@{max_dets}")},
        "per_category_AP50": per_cat,
        "num_detections": len(dets),
    }
