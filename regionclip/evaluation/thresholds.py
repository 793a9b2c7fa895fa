"""A detector's operating point: the score threshold where its detections are most useful to see.

A picture drawn at a fixed score threshold says nothing about a detector whose scores live in
another range (a softmax over 64 classes at temperature 0.2 rarely passes 0.5). The threshold here
is the one that maximises F1 (IoU ≥ 0.5, class-aware, COCO's greedy matching in score order) on the
given set: the point where a person sees as many right boxes and as few wrong ones as the detector
allows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torchvision.ops import box_iou

from regionclip.data.coco import CocoImage


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float  # keep detections with score >= threshold
    precision: float
    recall: float
    f1: float
    detections: int  # kept at the threshold
    ground_truth: int


def best_f1_threshold(
    images: list[CocoImage], detections: list[dict], iou_thresh: float = 0.5
) -> OperatingPoint:
    """The score threshold of maximal F1 of COCO-results ``detections`` on ``images``.

    ``detections``: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` each (the files
    the eval and transfer stages write). In score order, a detection is a true positive when its
    best-IoU unmatched box of the same category in its image has IoU ≥ ``iou_thresh``. No detection
    or no ground truth gives threshold 1.0 (nothing worth drawing) and F1 0.
    """
    gt = {im.id: im for im in images}
    n_gt = sum(len(im.category_ids) for im in images)
    dets = sorted((d for d in detections if d["image_id"] in gt), key=lambda d: -float(d["score"]))
    if not dets or n_gt == 0:
        return OperatingPoint(1.0, 0.0, 0.0, 0.0, 0, n_gt)
    matched = {i: torch.zeros(len(im.category_ids), dtype=torch.bool) for i, im in gt.items()}
    by_image: dict[object, list[int]] = defaultdict(list)
    for k, d in enumerate(dets):
        by_image[d["image_id"]].append(k)
    hit = torch.zeros(len(dets), dtype=torch.bool)
    for image_id, ks in by_image.items():  # images are independent; score order within each
        im = gt[image_id]
        if not im.category_ids:
            continue
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (dets[k]["bbox"] for k in ks)])
        iou = box_iou(boxes.reshape(-1, 4).float(), im.boxes)
        cats = torch.tensor(im.category_ids)
        for row, k in enumerate(ks):
            cand = iou[row].clone()
            cand[(cats != int(dets[k]["category_id"])) | matched[image_id]] = -1.0
            best = int(cand.argmax())
            if cand[best] >= iou_thresh:
                matched[image_id][best] = True
                hit[k] = True
    true_pos = torch.cumsum(hit.double(), 0)
    kept = torch.arange(1, len(dets) + 1, dtype=torch.float64)
    precision, recall = true_pos / kept, true_pos / n_gt
    f1 = torch.where(true_pos > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(kept))
    best = int(f1.argmax())
    threshold = float(dets[best]["score"])
    n_kept = sum(1 for d in dets if float(d["score"]) >= threshold)  # ties at the threshold are kept too
    return OperatingPoint(
        threshold, float(precision[best]), float(recall[best]), float(f1[best]), n_kept, n_gt
    )
