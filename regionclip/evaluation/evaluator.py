"""The evaluator interface (Detectron2's ``DatasetEvaluator`` pattern) and its COCO implementation.

An evaluator is fed one image's detections at a time (:meth:`process`) and then reports
(:meth:`evaluate`). :class:`COCOEvaluator` keeps COCO results and scores them with COCO box AP per
category split, :class:`LVISEvaluator` with LVIS box AP (AP, APr, APc, APf); :func:`evaluator_for`
picks the one the json's format asks for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from regionclip.evaluation.coco_ap import coco_ap_by_split
from regionclip.evaluation.lvis_ap import LVIS_MAX_DETS, is_lvis_format, lvis_ap_by_split
from regionclip.utils import read_json


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


class LVISEvaluator(COCOEvaluator):
    """LVIS box AP (federated, at most ``max_dets`` detections per image) of the processed
    detections, overall and per split; ``gt`` in LVIS format (json path or parsed dict)."""

    def __init__(
        self,
        gt: str | os.PathLike | Mapping[str, Any],
        category_ids: Sequence[int],
        splits: Mapping[str, Sequence[int]],
        max_dets: int = LVIS_MAX_DETS,
    ):
        super().__init__(gt, category_ids, splits)
        self.max_dets = max_dets

    def evaluate(self) -> dict[str, Any]:
        """:func:`~regionclip.evaluation.lvis_ap.lvis_ap_by_split` of the results."""
        gt = self.gt if isinstance(self.gt, Mapping) else read_json(self.gt, "LVIS json")
        return lvis_ap_by_split(gt, self.results, self.splits, self.max_dets)


def evaluator_for(
    gt: str | os.PathLike | Mapping[str, Any],
    category_ids: Sequence[int],
    splits: Mapping[str, Sequence[int]],
) -> COCOEvaluator:
    """:class:`LVISEvaluator` for a json in LVIS format (categories with ``frequency``, images with
    ``neg_category_ids`` / ``not_exhaustive_category_ids``), else :class:`COCOEvaluator`."""
    dataset = gt if isinstance(gt, Mapping) else read_json(gt, "ground-truth json")
    kind = LVISEvaluator if is_lvis_format(dataset) else COCOEvaluator
    return kind(dataset, category_ids, splits)


def normalized_name(name: str) -> str:
    return " ".join(name.lower().split())


def vocabulary_classes(vocabulary: Sequence[str], categories: Sequence[str], where: str) -> torch.Tensor:
    """``[V]`` int64: the index in ``categories`` (a json's names) of each ``vocabulary`` name,
    -1 for a distractor (no category of that name). Names match ignoring case and repeated
    spaces; categories missing from the vocabulary cannot be predicted (their boxes count as
    misses).

    Raises:
        ValueError: a name repeated in the vocabulary, or no category of ``where`` in it.
    """
    index = {normalized_name(c): i for i, c in enumerate(categories)}
    seen: set[str] = set()
    for name in vocabulary:
        key = normalized_name(name)
        if key in seen:
            raise ValueError(f"vocabulary: {name!r} appears twice")
        seen.add(key)
    classes = torch.tensor([index.get(normalized_name(n), -1) for n in vocabulary], dtype=torch.int64)
    if not bool((classes >= 0).any()):
        raise ValueError(
            f"vocabulary: none of its {len(vocabulary)} names is a category of {where} "
            f"(e.g. {', '.join(list(categories)[:3])})"
        )
    return classes


def vocabulary_coverage(
    vocabulary: Sequence[str], vocab_classes: Tensor, categories: Sequence[str]
) -> dict[str, list[str]]:
    """What a vocabulary (with its :func:`vocabulary_classes`) leaves out of a json's
    ``categories``: ``{"distractors": names of no category, "categories_missing": categories of
    no name}``."""
    matched = set(vocab_classes.tolist())
    return {
        "distractors": [n for n, k in zip(vocabulary, vocab_classes.tolist(), strict=True) if k < 0],
        "categories_missing": [c for k, c in enumerate(categories) if k not in matched],
    }


class VocabularyMapped:
    """An evaluator fed class indices into a vocabulary of its own (:func:`vocabulary_classes`):
    labels become the json's class indices, detections of distractors are left out (no category
    is theirs; they have competed for every box already)."""

    def __init__(self, inner: COCOEvaluator, vocab_classes: Tensor):
        self.inner, self.vocab_classes = inner, vocab_classes

    @property
    def results(self) -> list[dict[str, Any]]:
        return self.inner.results

    def reset(self) -> None:
        self.inner.reset()

    def process(self, image_id: Any, boxes: Tensor, scores: Tensor, labels: Tensor) -> None:
        classes = self.vocab_classes.to(labels.device)[labels]
        keep = classes >= 0
        self.inner.process(image_id, boxes[keep], scores[keep], classes[keep])

    def evaluate(self) -> dict[str, Any]:
        return self.inner.evaluate()
