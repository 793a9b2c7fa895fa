"""Pseudo-label precision against the objects a sample really shows (EmojiWorld records them).

Precision = the fraction of kept regions with IoU ≥ 0.5 to a ground-truth box of the category the
region was labelled with (concept name == category name).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.ops import box_iou

from regionclip.data.pseudo_labels import iter_pseudo_labels


def emojiworld_objects(meta: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """``(category name, [x0, y0, x1, y1])`` of the objects an EmojiWorld sample's json records."""
    return [(o["name"], [float(v) for v in o["box"]]) for o in meta.get("objects", [])]


def label_precision(
    pseudo_shards: str | list[str],
    concept_names: Sequence[str],
    gt_from_sample_json: Callable[[dict[str, Any]], list[tuple[str, list[float]]]] = emojiworld_objects,
    iou: float = 0.5,
) -> dict[str, float]:
    """Fraction of kept regions with IoU >= ``iou`` to a ground-truth box of the same category.

    ``gt_from_sample_json`` maps a source sample's json (the labels' ``source_meta``) to its
    objects. Returns ``precision``, ``correct``, ``kept``, ``images``.
    """
    correct = kept = images = 0
    for labels in iter_pseudo_labels(pseudo_shards, decode_image=False):
        images += 1
        gt = gt_from_sample_json(labels.source_meta)
        n = labels.num_kept
        kept += n
        if not n or not gt:
            continue
        gt_boxes = torch.tensor([b for _, b in gt], dtype=torch.float32)
        overlaps = box_iou(torch.from_numpy(labels.boxes).float(), gt_boxes)  # [R, G]
        same = torch.tensor(
            [[concept_names[c] == name for name, _ in gt] for c in labels.concept.tolist()], dtype=torch.bool
        )
        correct += int(((overlaps >= iou) & same).any(dim=1).sum())
    return {"precision": correct / kept if kept else 0.0, "correct": correct, "kept": kept, "images": images}
