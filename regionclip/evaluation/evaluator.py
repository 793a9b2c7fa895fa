"""The evaluator interface (Detectron2's ``DatasetEvaluator`` pattern) and its COCO implementation.

An evaluator is fed one image's detections at a time (:meth:`process`) and then reports
(:meth:`evaluate`). :class:`COCOEvaluator` keeps COCO results and scores them with COCO box AP per
category split; an LVIS evaluator (AP, APr, APc, APf) fits the same interface.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from torch import Tensor

from regionclip.evaluation.coco_ap import coco_ap_by_split


def to_coco_results(
    image_id: Any, boxes: Tensor, scores: Tensor, labels: Tensor, category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """One image's detections (boxes ``[N, 4]`` x0y0x1y1, scores ``[N]``, class indices ``[N]``
    into ``category_ids``) as COCO results (``bbox`` = [x, y, w, h], rounded to 0.01 px)."""
    out = []
    for (x0, y0, x1, y1), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True):
        out.append({
            "image_id": int(image_id),
            "category_id": int(category_ids[int(label)]),
            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
            "score": round(float(score), 5),
        })  # fmt: skip
    return out


class DetectionEvaluator(Protocol):
    def reset(self) -> None: ...

    def process(self, image_id: Any, boxes: Tensor, scores: Tensor, labels: Tensor) -> None:
        """Detections of one image: boxes ``[N, 4]`` (x0y0x1y1, original pixels), scores ``[N]``,
        class indices ``[N]`` into the evaluator's vocabulary."""
        ...

    def evaluate(self) -> dict[str, Any]: ...


class COCOEvaluator:
    """COCO box AP of the processed detections, overall and per split (fractions in [0, 1]).

    Args:
        gt: COCO ground truth (json path or parsed dict) of the images that will be processed.
        category_ids: the category id of each class index.
        splits: ``{"base": ids, "novel": ids}`` (``{}`` = overall only).
    """

    def __init__(
        self,
        gt: str | os.PathLike | Mapping[str, Any],
        category_ids: Sequence[int],
        splits: Mapping[str, Sequence[int]],
    ):
        self.gt, self.category_ids, self.splits = gt, list(category_ids), dict(splits)
        self.results: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.results = []

    def process(self, image_id: Any, boxes: Tensor, scores: Tensor, labels: Tensor) -> None:
        self.results.extend(to_coco_results(image_id, boxes, scores, labels, self.category_ids))

    def evaluate(self) -> dict[str, Any]:
        """:func:`~regionclip.evaluation.coco_ap.coco_ap_by_split` of the results."""
        return coco_ap_by_split(self.gt, self.results, self.splits)
