"""Proposal recall: which ground-truth boxes the first ``k`` proposals cover, for base and novel
classes apart (the RPN is trained on base boxes only; novel recall is what open vocabulary needs)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_iou
from tqdm import tqdm

from regionclip.data.coco import category_splits, read_coco
from regionclip.data.images import UNREADABLE, load_rgb
from regionclip.data.sample_errors import error_record
from regionclip.errors import ProposalError
from regionclip.labeling.proposals import NetworkProposals
from regionclip.models.preprocess import pil_to_tensor
from regionclip.models.rpn import ProposalNetwork

log = logging.getLogger(__name__)


def recalled(proposals: Tensor, gt_boxes: Tensor, ks: Sequence[int], iou_thresh: float) -> Tensor:
    """Which ground-truth boxes the first ``k`` proposals cover (IoU ≥ ``iou_thresh``).

    Args:
        proposals: ``[R, 4]``, highest objectness first; gt_boxes: ``[G, 4]``; both x0y0x1y1.

    Returns:
        bool ``[len(ks), G]``.
    """
    out = torch.zeros(len(ks), len(gt_boxes), dtype=torch.bool)
    if len(proposals) and len(gt_boxes):
        iou = box_iou(gt_boxes.float(), proposals.float()).cpu()
        for i, k in enumerate(ks):
            out[i] = iou[:, :k].max(dim=1).values >= iou_thresh
    return out


@torch.no_grad()
def evaluate_recall(
    model: ProposalNetwork,
    val_json: str | Path,
    image_root: str | Path,
    train_json: str | Path | None,
    ks: Sequence[int] = (100, 300),
    iou_thresh: float = 0.5,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Proposal recall@k of the val boxes, for base and novel categories separately and overall.

    Returns ``{"base"|"novel"|"all": {"boxes": G, "recall@k": r, ...}, "images": n, "skipped": {...}}``.
    """
    data = read_coco(val_json, image_root, require_images=False, keep_empty=False, error=ProposalError)
    novel = set(category_splits(data.categories, train_json=train_json, error=ProposalError).get("novel", []))
    source = NetworkProposals(model, device)
    hits: dict[str, list[Tensor]] = {"base": [], "novel": []}
    n_images = 0
    for i in tqdm(range(0, len(data.images), batch_size), desc="rpn recall", unit="batch"):
        batch, images = [], []
        for rec in data.images[i : i + batch_size]:
            try:
                images.append(pil_to_tensor(load_rgb(rec.path)))
                batch.append(rec)
            except UNREADABLE as e:
                data.skipped.add(error_record("unreadable_image", rec.file_name, str(val_json), str(e)))
        if not batch:
            continue
        boxes, _ = source([r.file_name for r in batch], images)
        for rec, props in zip(batch, boxes, strict=True):
            got = recalled(props, rec.boxes, ks, iou_thresh)
            is_novel = torch.tensor([c in novel for c in rec.category_ids], dtype=torch.bool)
            hits["base"].append(got[:, ~is_novel])
            hits["novel"].append(got[:, is_novel])
        n_images += len(batch)
    if data.skipped.counts:
        log.info("rpn recall: left out of %s: %s", val_json, data.skipped.summary())
    result: dict[str, Any] = {"images": n_images, "iou": iou_thresh, "skipped": dict(data.skipped.counts)}
    cat = {
        name: torch.cat(h, 1) if h else torch.zeros(len(ks), 0, dtype=torch.bool) for name, h in hits.items()
    }
    cat["all"] = torch.cat([cat["base"], cat["novel"]], 1)
    for name, h in cat.items():
        entry: dict[str, Any] = {"boxes": h.shape[1]}
        for j, k in enumerate(ks):
            entry[f"recall@{k}"] = round(h[j].float().mean().item(), 4) if h.shape[1] else None
        result[name] = entry
    log.info(
        "rpn recall (IoU %.2f, %d images): %s", iou_thresh, n_images,
        "; ".join(f"{name} ({result[name]['boxes']} boxes) " + ", ".join(f"@{k} {result[name][f'recall@{k}']}" for k in ks)
                  for name in ("base", "novel", "all")),
    )  # fmt: skip
    return result
