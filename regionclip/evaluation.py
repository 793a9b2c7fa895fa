"""Evaluation: COCO AP per category split, zero-shot region recognition and zero-shot detection.

- :func:`coco_ap_by_split`: AP as RegionCLIP's COCOEvaluator (regionclip-facts §6): pycocotools
  COCOeval on boxes, split numbers read from ``eval['precision']`` at IoU 0.5, area "all", 100
  detections, averaged over the split's categories that have ground truth; fractions in [0, 1].
- :func:`region_accuracy`: GT boxes classified by their RoI-pooled region embeddings (top-1/top-5).
- :func:`zero_shot_detection` / :func:`detect`: RPN proposals classified the same way, no box
  regression, per-class NMS (RegionCLIP zero-shot inference, regionclip-facts §4.5).
- :func:`class_embeddings_for`: any class-name list → prompt-ensembled embeddings, cached on disk.

Class index i always means the json's i-th category (file order), as RegionCLIP's
``NUM_CLASSES`` must equal the embedding count.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import batched_nms
from tqdm import tqdm

from regionclip.data.shards import SampleErrors, error_record
from regionclip.models.loading import LoadedClip
from regionclip.models.preprocess import pil_to_tensor
from regionclip.models.region import encode_regions
from regionclip.proposals import ProposalNetwork
from regionclip.text import (
    embed_class_names,
    embedding_metadata,
    load_embeddings,
    names_sha256,
    save_embeddings,
)

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------
# COCO AP by category split
# --------------------------------------------------------------------------------------------


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
            try:
                dataset = json.loads(Path(gt).read_text(encoding="utf-8"))
            except OSError as e:
                raise ValueError(f"{where}: cannot read COCO json: {e.strerror}") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e}") from None
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


# --------------------------------------------------------------------------------------------
# Evaluation data: a COCO-format json with its images
# --------------------------------------------------------------------------------------------


@dataclass
class EvalImage:
    """One json image: its file, GT boxes (x0 y0 x1 y1 original pixels) and class indices."""

    image_id: int
    file_name: str
    path: Path
    boxes: torch.Tensor  # [N, 4] float32
    labels: torch.Tensor  # [N] int64, index into EvalSet.categories


@dataclass
class EvalSet:
    json_path: str
    images: list[EvalImage]
    categories: list[dict[str, Any]]  # in file order; class index i <-> categories[i]
    raw: dict[str, Any]  # the parsed json

    def head(self, n: int) -> EvalSet:
        """The first ``n`` images (all when ``n`` <= 0)."""
        return self if n <= 0 else replace(self, images=self.images[:n])

    def coco_gt(self) -> dict[str, Any]:
        """The json restricted to this set's images (what detections on them are scored against)."""
        ids = {im.image_id for im in self.images}
        return {
            **self.raw,
            "images": [im for im in self.raw["images"] if int(im["id"]) in ids],
            "annotations": [a for a in self.raw.get("annotations", []) if int(a["image_id"]) in ids],
        }

    @property
    def category_ids(self) -> list[int]:
        return [int(c["id"]) for c in self.categories]

    @property
    def names(self) -> list[str]:
        return [str(c["name"]) for c in self.categories]


def load_eval_set(json_path: str | os.PathLike, image_root: str | os.PathLike) -> EvalSet:
    """Read a COCO-format json and check that every image file exists under ``image_root``.

    Crowd and zero-area boxes are left out (COCOeval ignores them too).

    Raises:
        ValueError: unreadable json, missing fields, annotations of unknown images/categories,
            or missing image files (the first few are named).
    """
    json_path = str(json_path)
    root = Path(image_root)
    try:
        data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read eval json {json_path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise ValueError(f"{json_path}: not a COCO json (needs 'images' and 'categories' lists)")
    categories = data["categories"]
    if not categories:
        raise ValueError(f"{json_path}: no categories")
    cat_index = {}
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
            raise ValueError(f"{json_path}: categories[{i}] needs 'id' and 'name'")
        cat_index[int(c["id"])] = i
    images: dict[int, EvalImage] = {}
    raw_boxes: dict[int, list[list[float]]] = {}
    raw_labels: dict[int, list[int]] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise ValueError(f"{json_path}: images[{i}] needs 'id' and 'file_name'")
        iid = int(img["id"])
        images[iid] = EvalImage(
            iid, img["file_name"], root / img["file_name"], torch.empty(0), torch.empty(0)
        )
        raw_boxes[iid], raw_labels[iid] = [], []
    missing = [im.file_name for im in images.values() if not im.path.is_file()]
    if missing:
        raise ValueError(
            f"{json_path}: {len(missing)} of {len(images)} image files are missing under {root}, "
            f"e.g. {missing[:3]}"
        )
    for i, ann in enumerate(data.get("annotations", [])):
        iid = ann.get("image_id") if isinstance(ann, dict) else None
        if iid not in images:
            raise ValueError(f"{json_path}: annotations[{i}] refers to image_id {iid!r}, not in 'images'")
        if int(ann.get("category_id", -1)) not in cat_index:
            raise ValueError(
                f"{json_path}: annotations[{i}] has category_id {ann.get('category_id')!r}, not in 'categories'"
            )
        x, y, w, h = (float(v) for v in ann["bbox"])
        if ann.get("iscrowd", 0) or w <= 0 or h <= 0:
            continue
        raw_boxes[iid].append([x, y, x + w, y + h])
        raw_labels[iid].append(cat_index[int(ann["category_id"])])
    for iid, im in images.items():
        im.boxes = torch.tensor(raw_boxes[iid], dtype=torch.float32).reshape(-1, 4)
        im.labels = torch.tensor(raw_labels[iid], dtype=torch.int64)
    return EvalSet(json_path, list(images.values()), list(categories), data)


def category_splits(
    categories: Sequence[Mapping[str, Any]], novel: Sequence[str] = ()
) -> dict[str, list[int]]:
    """``{"base": ids, "novel": ids}`` from the categories' own ``split`` field, else from the
    ``novel`` names (the rest is base); ``{}`` when neither is available."""
    if all(c.get("split") in ("base", "novel") for c in categories):
        return {s: [int(c["id"]) for c in categories if c["split"] == s] for s in ("base", "novel")}
    if novel:
        names = {str(c["name"]) for c in categories}
        unknown = sorted(set(novel) - names)
        if unknown:
            raise ValueError(f"novel class names {unknown[:5]} are not categories of the eval json")
        return {
            "base": [int(c["id"]) for c in categories if c["name"] not in novel],
            "novel": [int(c["id"]) for c in categories if c["name"] in novel],
        }
    return {}


def _read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def read_images(
    paths: Sequence[Path], errors: SampleErrors | None = None, source: str = ""
) -> tuple[list[int], list[Image.Image]]:
    """Open images as RGB; unreadable ones are skipped with a warning (counted in ``errors``).

    Returns the indices of the images that could be read and the images.
    """
    kept, images = [], []
    for i, path in enumerate(paths):
        try:
            images.append(_read_rgb(path))
            kept.append(i)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.warning("skipping unreadable image %s: %s", path, e)
            if errors is not None:
                errors.add(error_record("unreadable_image", path.name, source, str(e)))
    return kept, images


# --------------------------------------------------------------------------------------------
# Class vocabularies
# --------------------------------------------------------------------------------------------


def read_names_file(path: str | os.PathLike) -> list[str]:
    """Class names, one per line; blank lines are skipped, whitespace collapsed, duplicates dropped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read vocabulary file {path}: {e.strerror}") from None
    names: list[str] = []
    for line in lines:
        name = " ".join(line.split())
        if name and name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"vocabulary file {path} holds no class names")
    return names


def class_embeddings_for(
    loaded: LoadedClip,
    names: Sequence[str],
    template_set: str = "ensemble",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Prompt-ensembled class embeddings [C, D] (un-normalised) of ``names`` for ``loaded``.

    With ``cache_dir`` the result is kept in a file keyed by (model weights identity, names,
    template set) and read back on later calls.
    """
    names = list(names)
    if not names:
        raise ValueError("class_embeddings_for: empty list of class names")
    path = None
    if cache_dir:
        key = hashlib.sha256(
            json.dumps([loaded.weights_id, names_sha256(names), template_set]).encode()
        ).hexdigest()[:16]
        path = Path(cache_dir) / f"classes-{key}.safetensors"
        if path.is_file():
            try:
                emb, cached_names, _ = load_embeddings(path)
                if cached_names == names:
                    return emb
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable class-embedding cache %s: %s", path, e)
    emb = embed_class_names(loaded, names, template_set, batch_size)
    if path is not None:
        save_embeddings(path, emb, names, embedding_metadata(loaded, template_set))
    return emb


def check_class_embeddings(
    embeddings: torch.Tensor, embed_dim: int, num_classes: int, source: str, target: str
) -> None:
    """Fail clearly when ``embeddings`` [C, D] do not fit the model (D) or the class list (C).

    ``source`` names where the embeddings came from, ``target`` the class list (e.g. the json).
    """
    if embeddings.ndim != 2:
        raise ValueError(f"{source}: class embeddings must be [C, D], got shape {tuple(embeddings.shape)}")
    if embeddings.shape[1] != embed_dim:
        raise ValueError(
            f"{source}: class embeddings have dimension {embeddings.shape[1]} but the model embeds "
            f"to {embed_dim}; make them with the same model"
        )
    if embeddings.shape[0] != num_classes:
        raise ValueError(
            f"{source}: {embeddings.shape[0]} class embeddings but {target} has {num_classes} categories"
        )


# --------------------------------------------------------------------------------------------
# Zero-shot region recognition on GT boxes
# --------------------------------------------------------------------------------------------


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [R]: whether ``labels`` [R] is among the ``k`` largest of ``logits`` [R, C] per row."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


@torch.no_grad()
def region_accuracy(
    model: LoadedClip,
    coco_json: str | os.PathLike | EvalSet,
    image_root: str | os.PathLike,
    class_embeddings: torch.Tensor,
    splits: Mapping[str, Sequence[int]] | None = None,
    short_side: int = 800,
    max_side: int = 1333,
    batch_size: int = 8,
    errors: SampleErrors | None = None,
) -> dict[str, dict[str, Any]]:
    """Zero-shot classification of the json's GT boxes by their region embeddings.

    Each image goes through the model whole (detection size), GT boxes are RoI-pooled
    (:func:`regionclip.models.region.encode_regions`) and classified by cosine similarity with
    ``class_embeddings`` [C, D] (row i = the json's i-th category; normalised here).

    Args:
        splits: split name -> category ids; None = the json's ``split`` fields (if any).
            ``"all"`` is always reported.
        errors: collects unreadable images (skipped with a warning).

    Returns:
        ``{split: {"top1", "top5" (fractions; None without boxes), "n" (boxes)}}``.
    """
    data = coco_json if isinstance(coco_json, EvalSet) else load_eval_set(coco_json, image_root)
    check_class_embeddings(
        class_embeddings, model.embed_dim, len(data.categories), "class embeddings", data.json_path
    )
    if splits is None:
        splits = category_splits(data.categories)
    cls = F.normalize(class_embeddings.float(), dim=-1).to(next(model.model.parameters()).device)
    images = [im for im in data.images if len(im.boxes)]
    labels, top1, top5 = [], [], []
    for start in tqdm(range(0, len(images), batch_size), desc="region accuracy", unit="batch"):
        batch = images[start : start + batch_size]
        kept, pil = read_images([im.path for im in batch], errors, data.json_path)
        if not kept:
            continue
        emb = encode_regions(
            model.model, pil, [batch[i].boxes for i in kept], short_side, max_side, batch_size=len(pil)
        )
        logits = F.normalize(torch.cat(emb).float(), dim=-1) @ cls.T
        y = torch.cat([batch[i].labels for i in kept]).to(logits.device)
        labels.append(y.cpu())
        top1.append(topk_hits(logits, y, 1).cpu())
        top5.append(topk_hits(logits, y, 5).cpu())
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    hit1 = torch.cat(top1) if top1 else torch.zeros(0, dtype=torch.bool)
    hit5 = torch.cat(top5) if top5 else torch.zeros(0, dtype=torch.bool)
    ids = torch.tensor(data.category_ids)
    box_cat = ids[y] if len(y) else torch.zeros(0, dtype=torch.int64)
    result = {}
    for name, cat_ids in {"all": data.category_ids, **dict(splits)}.items():
        mask = torch.isin(box_cat, torch.tensor(list(cat_ids), dtype=torch.int64))
        n = int(mask.sum())
        result[name] = {
            "top1": float(hit1[mask].float().mean()) if n else None,
            "top5": float(hit5[mask].float().mean()) if n else None,
            "n": n,
        }
    return result


# --------------------------------------------------------------------------------------------
# Zero-shot detection with RPN boxes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionParams:
    """Zero-shot detection settings (RegionCLIP's zero-shot inference, regionclip-facts §4.5)."""

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
        scores = (scores * objectness.float().to(scores.device)[:, None].clamp(0, 1)).sqrt()
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


@torch.no_grad()
def detect(
    model: LoadedClip,
    rpn: ProposalNetwork,
    images: Sequence[Image.Image],
    class_embeddings: torch.Tensor,
    params: DetectionParams,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Zero-shot detection on PIL images: RPN proposals → region embeddings → class scores.

    ``rpn`` should be configured with :func:`configure_rpn_for_inference`. Returns per image
    ``(boxes [N, 4] in original pixels, scores [N], class indices [N])`` on the CPU.
    """
    if not images:
        return []
    rpn_device = next(rpn.parameters()).device
    proposals, objectness, _ = rpn([pil_to_tensor(im).to(rpn_device) for im in images])
    emb = encode_regions(
        model.model,
        images,
        [p.cpu() for p in proposals],
        params.short_side,
        params.max_side,
        batch_size=len(images),
    )
    cls = class_embeddings.to(emb[0].device)
    out = []
    for boxes, obj, e in zip(proposals, objectness, emb, strict=True):
        b, s, lab = detections_from_regions(boxes, e, cls, obj, params)
        out.append((b.cpu(), s.cpu(), lab.cpu()))
    return out


def to_coco_results(
    image_id: int,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    category_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """Detections of one image as COCO results (``bbox`` = [x, y, w, h], rounded to 0.01 px)."""
    out = []
    for (x0, y0, x1, y1), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True):
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_ids[label]),
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "score": round(float(score), 5),
            }
        )
    return out


def zero_shot_detection(
    model: LoadedClip,
    rpn: ProposalNetwork,
    coco_json: str | os.PathLike | EvalSet,
    image_root: str | os.PathLike,
    class_embeddings: torch.Tensor,
    splits: Mapping[str, Sequence[int]] | None = None,
    params: DetectionParams = DetectionParams(),
    batch_size: int = 8,
    errors: SampleErrors | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Zero-shot detection on every json image, scored with :func:`coco_ap_by_split`.

    Returns ``(ap, results)``: the AP dict and the COCO detection results.
    """
    data = coco_json if isinstance(coco_json, EvalSet) else load_eval_set(coco_json, image_root)
    check_class_embeddings(
        class_embeddings, model.embed_dim, len(data.categories), "class embeddings", data.json_path
    )
    if splits is None:
        splits = category_splits(data.categories)
    configure_rpn_for_inference(rpn, params)
    results: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(data.images), batch_size), desc="zero-shot detection", unit="batch"):
        batch = data.images[start : start + batch_size]
        kept, pil = read_images([im.path for im in batch], errors, data.json_path)
        for i, (boxes, scores, labels) in zip(
            kept, detect(model, rpn, pil, class_embeddings, params), strict=True
        ):
            results.extend(to_coco_results(batch[i].image_id, boxes, scores, labels, data.category_ids))
    return coco_ap_by_split(data.coco_gt(), results, splits), results
