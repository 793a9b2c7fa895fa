"""Zero-shot evaluation of a CLIP model: no detector training, only region embeddings.

- :func:`region_accuracy`: ground-truth boxes classified by their RoI-pooled region embeddings
  (top-1 / top-5 per category split);
- :func:`detect` / :func:`zero_shot_detection`: RPN proposals (or the user's own, a
  :class:`~regionclip.labeling.proposals.PrecomputedProposals` keyed by file name) classified the
  same way, no box regression, per-class NMS (RegionCLIP's zero-shot inference), scored by COCO or
  LVIS box AP (:func:`~regionclip.evaluation.evaluator.evaluator_for`).

Class index i always means the json's i-th category (file order).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import batched_nms
from tqdm import tqdm

from regionclip.data.coco import CocoSet, category_splits, read_coco
from regionclip.data.images import UNREADABLE, load_rgb
from regionclip.data.sample_errors import SampleErrors, error_record
from regionclip.evaluation.evaluator import VocabularyMapped, evaluator_for, vocabulary_classes
from regionclip.labeling.proposals import PrecomputedProposals
from regionclip.models.loading import LoadedClip
from regionclip.models.preprocess import pil_to_tensor
from regionclip.models.region import encode_regions
from regionclip.models.rpn import ProposalNetwork
from regionclip.precision import autocast
from regionclip.text import check_class_embeddings

log = logging.getLogger(__name__)


def read_images(
    paths: Sequence[Path], errors: SampleErrors | None = None, source: str = ""
) -> tuple[list[int], list[Image.Image]]:
    """Open images as RGB; unreadable ones are skipped with a warning (counted in ``errors``).

    Returns the indices of the images that could be read and the images.
    """
    kept, images = [], []
    for i, path in enumerate(paths):
        try:
            images.append(load_rgb(path))
            kept.append(i)
        except UNREADABLE as e:
            log.warning("skipping unreadable image %s: %s", path, e)
            if errors is not None:
                errors.add(error_record("unreadable_image", path.name, source, str(e)))
    return kept, images


def topk_hits(
    logits: torch.Tensor, labels: torch.Tensor, k: int, vocab_classes: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool [R]: whether ``labels`` [R] is among the ``k`` largest of ``logits`` [R, V] per row;
    with ``vocab_classes`` [V] (the class of each vocabulary entry, -1 = distractor) the top-k
    vocabulary entries are mapped to classes first."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    if vocab_classes is not None:
        top = vocab_classes.to(top.device)[top]
    return (top == labels[:, None]).any(dim=1)


@torch.no_grad()
def region_accuracy(
    model: LoadedClip,
    coco_json: str | os.PathLike | CocoSet,
    image_root: str | os.PathLike,
    class_embeddings: torch.Tensor,
    splits: Mapping[str, Sequence[int]] | None = None,
    short_side: int = 800,
    max_side: int = 1333,
    batch_size: int = 8,
    errors: SampleErrors | None = None,
    precision: str = "fp32",
    vocabulary: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Zero-shot classification of the json's GT boxes by their region embeddings.

    Each image goes through the model whole (detection size), GT boxes are RoI-pooled
    (:func:`regionclip.models.region.encode_regions`) and classified by cosine similarity with
    ``class_embeddings`` [V, D] (normalised here): row i = the json's i-th category, or with
    ``vocabulary`` (V names) any list of names, matched to the json's categories by name
    (:func:`vocabulary_classes`); names that are no category are distractors.

    Args:
        splits: split name -> category ids; None = the json's ``split`` fields (if any).
            ``"all"`` is always reported.
        errors: collects unreadable images (skipped with a warning).
        precision: the region path's resolved compute precision (autocast); logits are fp32.

    Returns:
        ``{split: {"top1", "top5" (fractions; None without boxes), "n" (boxes)}}`` and
        ``"per_name"``: ``{category name: {"top1", "top5", "n"}}``, and ``"top1_predictions"``:
        ``{vocabulary name: boxes whose top-1 it is}``.
    """
    data = coco_json if isinstance(coco_json, CocoSet) else read_coco(coco_json, image_root)
    vocab_classes = None if vocabulary is None else vocabulary_classes(vocabulary, data.names, data.json_path)
    rows = len(data.categories) if vocab_classes is None else len(vocab_classes)
    check_class_embeddings(class_embeddings, model.embed_dim, rows, "class embeddings",
                           data.json_path if vocab_classes is None else "the vocabulary")  # fmt: skip
    if splits is None:
        splits = category_splits(data.categories)
    device = next(model.model.parameters()).device
    cls = F.normalize(class_embeddings.float(), dim=-1).to(device)
    images = [im for im in data.images if len(im.boxes)]
    labels, top1, top5, predicted = [], [], [], []
    for start in tqdm(range(0, len(images), batch_size), desc="region accuracy", unit="batch"):
        batch = images[start : start + batch_size]
        kept, pil = read_images([im.path for im in batch], errors, data.json_path)
        if not kept:
            continue
        with autocast(precision, device):
            emb = encode_regions(
                model.model, pil, [batch[i].boxes for i in kept], short_side, max_side, batch_size=len(pil)
            )
        logits = F.normalize(torch.cat(emb).float(), dim=-1) @ cls.T
        y = torch.cat([batch[i].labels for i in kept]).to(logits.device)
        labels.append(y.cpu())
        top1.append(topk_hits(logits, y, 1, vocab_classes).cpu())
        top5.append(topk_hits(logits, y, 5, vocab_classes).cpu())
        predicted.append(logits.argmax(dim=1).cpu())
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    hit1 = torch.cat(top1) if top1 else torch.zeros(0, dtype=torch.bool)
    hit5 = torch.cat(top5) if top5 else torch.zeros(0, dtype=torch.bool)
    ids = torch.tensor(data.category_ids)
    box_cat = ids[y] if len(y) else torch.zeros(0, dtype=torch.int64)

    def rates(mask: torch.Tensor) -> dict[str, Any]:
        n = int(mask.sum())
        top1, top5 = (float(h[mask].float().mean()) if n else None for h in (hit1, hit5))
        return {"top1": top1, "top5": top5, "n": n}

    result: dict[str, Any] = {
        name: rates(torch.isin(box_cat, torch.tensor(list(cat_ids), dtype=torch.int64)))
        for name, cat_ids in {"all": data.category_ids, **dict(splits)}.items()
    }
    result["per_name"] = {cat: rates(y == k) for k, cat in enumerate(data.names)}
    top = torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.int64)
    names = data.names if vocabulary is None else list(vocabulary)
    counts = zip(*torch.unique(top, return_counts=True), strict=True)
    result["top1_predictions"] = {names[int(v)]: int(c) for v, c in counts}
    return result


@dataclass(frozen=True)
class DetectionParams:
    """Zero-shot detection settings (RegionCLIP's zero-shot inference)."""

    temperature: float = 0.01
    score_thresh: float = 0.001
    nms_thresh: float = 0.5  # per-class NMS
    max_dets: int = 100  # per image
    # RegionCLIP MULTIPLY_RPN_SCORE: score = sqrt(class probability * objectness). RegionCLIP
    # multiplied by the raw RPN logit, which gives NaN for negative logits (those proposals were
    # silently dropped); here objectness is the sigmoid of the logit, in (0, 1).
    multiply_rpn_score: bool = True
    rpn_nms_thresh: float = 0.9  # proposal NMS for zero-shot inference ("following ViLD")
    rpn_post_nms_top_n: int = 1000  # proposals per image; 0 = the RPN's own setting
    short_side: int = 800
    max_side: int = 1333
    precision: str = "fp32"  # resolved compute precision of the RPN and the region path


def rpn_weighted_scores(scores: torch.Tensor, objectness: torch.Tensor) -> torch.Tensor:
    """RegionCLIP's MULTIPLY_RPN_SCORE: ``sqrt(class score * objectness)``, [R, C] from scores
    [R, C] and objectness [R] in [0, 1] (sigmoid of the RPN logit)."""
    return (scores * objectness.float().to(scores.device)[:, None].clamp(0, 1)).sqrt()


def detections_from_regions(
    boxes: torch.Tensor,
    region_embeddings: torch.Tensor,
    class_embeddings: torch.Tensor,
    objectness: torch.Tensor | None,
    params: DetectionParams,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classify proposals and turn them into detections (no box regression).

    Args:
        boxes: [R, 4] proposals, x0 y0 x1 y1.
        region_embeddings: [R, D]; class_embeddings: [C, D] (both normalised here).
        objectness: [R] in [0, 1], used when ``params.multiply_rpn_score``.

    Returns:
        ``(boxes [N, 4], scores [N], labels [N])``, N ≤ ``params.max_dets``, highest score first:
        every (proposal, class) pair with score > ``score_thresh`` (score = softmax over classes
        of cos / temperature, times objectness under a square root when multiplying), then NMS
        per class.
    """
    logits = F.normalize(region_embeddings.float(), dim=-1) @ F.normalize(class_embeddings.float(), dim=-1).T
    scores = torch.softmax(logits / params.temperature, dim=1)
    if params.multiply_rpn_score:
        if objectness is None:
            raise ValueError("multiply_rpn_score needs the proposals' objectness")
        scores = rpn_weighted_scores(scores, objectness)
    region, label = torch.nonzero(scores > params.score_thresh, as_tuple=True)
    det_boxes = boxes.float().to(scores.device)[region]
    det_scores = scores[region, label]
    keep = batched_nms(det_boxes, det_scores, label, params.nms_thresh)[: params.max_dets]
    return det_boxes[keep], det_scores[keep], label[keep]


def configure_rpn_for_inference(rpn: ProposalNetwork, params: DetectionParams) -> ProposalNetwork:
    """Set the RPN's test-time proposal NMS and count (in place) and switch it to eval mode."""
    rpn.rpn.nms_thresh = params.rpn_nms_thresh
    if params.rpn_post_nms_top_n > 0:
        rpn.rpn._post_nms_top_n["testing"] = params.rpn_post_nms_top_n
        rpn.rpn._pre_nms_top_n["testing"] = max(rpn.rpn._pre_nms_top_n["testing"], params.rpn_post_nms_top_n)
    return rpn.eval()


def top_proposals(boxes: torch.Tensor, scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` highest-scoring of ``boxes`` [R, 4] / ``scores`` [R] (all when ``n <= 0``), highest first."""
    order = torch.argsort(scores, descending=True, stable=True)
    if n > 0:
        order = order[:n]
    return boxes[order], scores[order]


@torch.no_grad()
def detect(
    model: LoadedClip,
    rpn: ProposalNetwork | None,
    images: Sequence[Image.Image],
    class_embeddings: torch.Tensor,
    params: DetectionParams,
    proposals: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Zero-shot detection on PIL images: proposals → region embeddings → class scores.

    Proposals come from ``rpn`` (configured with :func:`configure_rpn_for_inference`) or, when
    given, from ``proposals``: per image ``(boxes [R, 4] in original pixels, objectness [R])``.
    Returns per image ``(boxes [N, 4] in original pixels, scores [N], class indices [N])`` on the CPU.
    """
    if not images:
        return []
    if proposals is not None:
        if len(proposals) != len(images):
            raise ValueError(f"{len(proposals)} proposal sets for {len(images)} images")
        boxes_per_image = [b.float() for b, _ in proposals]
        objectness = [o.float() for _, o in proposals]
    elif rpn is not None:
        rpn_device = next(rpn.parameters()).device
        with autocast(params.precision, rpn_device):
            boxes_per_image, objectness, _ = rpn([pil_to_tensor(im).to(rpn_device) for im in images])
        boxes_per_image, objectness = [p.float() for p in boxes_per_image], [o.float() for o in objectness]
    else:
        raise ValueError("detect needs an RPN or proposals")
    with autocast(params.precision, next(model.model.parameters()).device):
        emb = encode_regions(
            model.model, images, [p.cpu() for p in boxes_per_image], params.short_side, params.max_side,
            batch_size=len(images),
        )  # fmt: skip
    cls = class_embeddings.to(emb[0].device)
    out = []
    for boxes, obj, e in zip(boxes_per_image, objectness, emb, strict=True):
        b, s, lab = detections_from_regions(boxes, e, cls, obj, params)
        out.append((b.cpu(), s.cpu(), lab.cpu()))
    return out


def zero_shot_detection(
    model: LoadedClip,
    rpn: ProposalNetwork | PrecomputedProposals,
    coco_json: str | os.PathLike | CocoSet,
    image_root: str | os.PathLike,
    class_embeddings: torch.Tensor,
    splits: Mapping[str, Sequence[int]] | None = None,
    params: DetectionParams = DetectionParams(),
    batch_size: int = 8,
    errors: SampleErrors | None = None,
    vocabulary: Sequence[str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Zero-shot detection on every json image, scored by COCO or LVIS AP (:func:`evaluator_for`).

    ``class_embeddings`` [V, D]: the json's categories in order, or the names of ``vocabulary``
    (as in :func:`region_accuracy`): detections of a distractor name compete in the softmax and
    are then left out, as no category is theirs. ``rpn``: a proposal network, or the user's own
    proposals keyed by each image's ``file_name`` (the ``params.rpn_post_nms_top_n`` highest-scoring
    of each image are used; their scores are the objectness). Returns ``(ap, results)``: the AP dict
    and the COCO detection results.

    Raises:
        ValueError: precomputed proposals lack some images (named before any image is read).
    """
    data = coco_json if isinstance(coco_json, CocoSet) else read_coco(coco_json, image_root)
    vocab_classes = None if vocabulary is None else vocabulary_classes(vocabulary, data.names, data.json_path)
    rows = len(data.categories) if vocab_classes is None else len(vocab_classes)
    check_class_embeddings(class_embeddings, model.embed_dim, rows, "class embeddings",
                           data.json_path if vocab_classes is None else "the vocabulary")  # fmt: skip
    if splits is None:
        splits = category_splits(data.categories)
    if isinstance(rpn, PrecomputedProposals):
        rpn.require((im.file_name for im in data.images), str(data.json_path))
    else:
        configure_rpn_for_inference(rpn, params)
    evaluator = evaluator_for(data.coco_gt(), data.category_ids, splits)
    if vocab_classes is not None:
        evaluator = VocabularyMapped(evaluator, vocab_classes)
    for start in tqdm(range(0, len(data.images), batch_size), desc="zero-shot detection", unit="batch"):
        batch = data.images[start : start + batch_size]
        kept, pil = read_images([im.path for im in batch], errors, data.json_path)
        given = None
        if isinstance(rpn, PrecomputedProposals):
            boxes, scores = rpn([batch[i].file_name for i in kept])
            given = [
                top_proposals(b, s, params.rpn_post_nms_top_n) for b, s in zip(boxes, scores, strict=True)
            ]
        network = None if given is not None else rpn
        for i, (boxes, scores, labels) in zip(
            kept, detect(model, network, pil, class_embeddings, params, given), strict=True
        ):
            evaluator.process(batch[i].id, boxes, scores, labels)
    return evaluator.evaluate(), evaluator.results
