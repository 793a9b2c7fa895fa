"""The one reader of COCO-format box jsons, and the one base/novel split.

Every stage that reads a COCO json reads it here: RPN training and its recall, the detector
transfer (training boxes, evaluation images, vocabularies), zero-shot evaluation, the Detectron2
plugin and the concept pool's category report. So every stage agrees on which boxes count, which
class index a category has (its position in the json's ``categories``, file order) and which
classes are novel (:func:`category_splits`).

Boxes come back as ``x0 y0 x1 y1`` in original image pixels. Crowd, malformed and degenerate boxes
are skipped and counted by reason (``CocoSet.skipped``), as COCOeval ignores them too; an
annotation naming an image or category the json does not list is an error.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from regionclip.data.sample_errors import SampleErrors, error_record
from regionclip.errors import InputError
from regionclip.utils import read_json

SPLITS = ("base", "novel")

# The COCO open-vocabulary split of OVR-CNN and RegionCLIP: 48 base and 17 novel classes.
COCO_OVD_BASE: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse",
    "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite",
    "surfboard", "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "pizza", "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse", "remote",
    "microwave", "oven", "toaster", "refrigerator", "book", "clock", "vase", "toothbrush",
)  # fmt: skip
COCO_OVD_NOVEL: tuple[str, ...] = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard",
    "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors",
)  # fmt: skip


@dataclass
class CocoImage:
    """One image of the json with its usable boxes."""

    id: Any  # the json's image id (int in COCO; kept as written)
    file_name: str
    path: Path  # image_root / file_name
    boxes: Tensor  # [N, 4] float32, x0 y0 x1 y1 original pixels
    category_ids: list[int]  # [N]
    labels: Tensor  # [N] int64 class index (position in CocoSet.categories); -1 without categories


@dataclass
class CocoSet:
    """A read COCO json: its images (see :func:`read_coco` for which), categories and what was skipped."""

    json_path: str
    image_root: Path
    images: list[CocoImage]
    categories: list[dict[str, Any]]  # file order: class index i <-> categories[i]
    raw: dict[str, Any]  # the parsed json
    skipped: SampleErrors = field(default_factory=SampleErrors)

    @property
    def names(self) -> list[str]:
        return [str(c["name"]) for c in self.categories]

    @property
    def category_ids(self) -> list[int]:
        return [int(c["id"]) for c in self.categories]

    def head(self, n: int) -> CocoSet:
        """The first ``n`` images (all when ``n`` <= 0)."""
        return self if n <= 0 else replace(self, images=self.images[:n])

    def coco_gt(self) -> dict[str, Any]:
        """The json restricted to this set's images (what detections on them are scored against)."""
        ids = {im.id for im in self.images}
        return {
            **self.raw,
            "images": [im for im in self.raw["images"] if im["id"] in ids],
            "annotations": [a for a in self.raw.get("annotations", []) if a.get("image_id") in ids],
        }


def check_categories(cats: Any, where: str, error: type[InputError] = InputError) -> list[dict[str, Any]]:
    """``cats`` as a non-empty list of ``{"id": int, "name": str, ...}`` with unique names."""
    if not isinstance(cats, list) or not cats:
        raise error(f"{where}: no 'categories' list; class names are needed")
    for i, c in enumerate(cats):
        if not (isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)):
            raise error(f"{where}: categories[{i}] needs an integer 'id' and a 'name'")
    names = [c["name"] for c in cats]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise error(f"{where}: category names must be unique, repeated: {dupes[:5]}")
    return cats


def read_categories(path: str | os.PathLike, error: type[InputError] = InputError) -> list[dict[str, Any]]:
    """The categories (file order) of a COCO json, or of a JSON file that is just that list."""
    data = read_json(path, "categories file", error)
    return check_categories(data.get("categories") if isinstance(data, dict) else data, str(path), error)


def _box(
    ann: dict[str, Any], i: int, file_name: str, json_path: str, skipped: SampleErrors
) -> list[float] | None:
    """``x0 y0 x1 y1`` of annotation ``i``, or None (counted in ``skipped``) when it is unusable."""
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        reason, detail = "malformed_box", f"annotations[{i}].bbox = {bbox!r}"
    elif ann.get("iscrowd", 0):
        reason, detail = "crowd_box", f"annotations[{i}]"
    elif not (bbox[2] > 0 and bbox[3] > 0 and all(math.isfinite(v) for v in bbox)):
        reason, detail = "degenerate_box", f"annotations[{i}].bbox = {bbox}"
    else:
        x, y, w, h = (float(v) for v in bbox)
        return [x, y, x + w, y + h]
    skipped.add(error_record(reason, file_name, json_path, detail))
    return None


def read_coco(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    require_images: bool = True,
    keep_empty: bool = True,
    require_categories: bool = True,
    error: type[InputError] = InputError,
) -> CocoSet:
    """Read a COCO-format json and check its image files under ``image_root``.

    Args:
        require_images: every image file must exist (evaluation: a score over a silently smaller
            set would be wrong); False skips and counts missing files (training), and only all of
            them missing is an error.
        keep_empty: keep images without a usable box (False: counted as ``no_boxes``).
        require_categories: the json must have a valid ``categories`` list; without one (a
            class-agnostic box json for the RPN) labels are -1.
        error: the exception type raised (the calling stage's own).

    Raises:
        ``error``: unreadable json, missing fields, annotations of unlisted images or categories,
        missing image files (the first few named).
    """
    json_path, root = str(json_path), Path(image_root)
    data = read_json(json_path, "COCO json", error)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise error(f"{json_path}: not a COCO json (no 'images' list)")
    categories: list[dict[str, Any]] = []
    if require_categories or data.get("categories"):
        categories = check_categories(data.get("categories"), json_path, error)
    class_index = {c["id"]: k for k, c in enumerate(categories)}
    skipped = SampleErrors()
    by_id: dict[Any, tuple[dict[str, Any], list[list[float]], list[int]]] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise error(f"{json_path}: images[{i}] needs 'id' and 'file_name'")
        by_id[img["id"]] = (img, [], [])
    for i, ann in enumerate(data.get("annotations", [])):
        entry = by_id.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if entry is None:
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            raise error(f"{json_path}: annotations[{i}] refers to image_id {image_id!r}, not in 'images'")
        category = ann.get("category_id", -1)
        if categories and category not in class_index:
            raise error(f"{json_path}: annotations[{i}] has category_id {category!r}, not in 'categories'")
        box = _box(ann, i, entry[0]["file_name"], json_path, skipped)
        if box is not None:
            entry[1].append(box)
            entry[2].append(int(category))
    images, missing = [], []
    for img, boxes, cats in by_id.values():
        path = root / img["file_name"]
        if not path.is_file():
            missing.append(img["file_name"])
            skipped.add(error_record("missing_image", img["file_name"], json_path, f"{path} does not exist"))
        elif boxes or keep_empty:
            labels = [class_index.get(c, -1) for c in cats]
            images.append(CocoImage(img["id"], img["file_name"], path, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                    cats, torch.tensor(labels, dtype=torch.int64)))  # fmt: skip
        else:
            skipped.counts["no_boxes"] += 1  # expected in a base-only json; not an error worth examples
    if missing and require_images:
        raise error(
            f"{json_path}: {len(missing)} of {len(by_id)} image files do not exist under {root}: {missing[:5]}"
        )
    if missing and len(missing) == len(by_id):
        raise error(f"{json_path}: none of its {len(by_id)} image files exist under {root}")
    return CocoSet(json_path, root, images, categories, data, skipped)


# --------------------------------------------------------------------------------------------
# Base and novel classes
# --------------------------------------------------------------------------------------------


def category_splits(
    categories: Sequence[Mapping[str, Any]],
    novel: Sequence[str] = (),
    train_json: str | os.PathLike | None = None,
    error: type[InputError] = InputError,
) -> dict[str, list[int]]:
    """``{"base": ids, "novel": ids}`` of ``categories``, from the first source that has it:

    1. every category's own ``split`` field (``data_prep.coco`` and EmojiWorld write it);
    2. ``novel``: the novel class names (the rest is base);
    3. ``train_json``: base = the categories it has boxes of (a base-only training json).

    ``{}`` when none is given: no base/novel report.
    """
    if all(c.get("split") in SPLITS for c in categories):
        return {s: [int(c["id"]) for c in categories if c["split"] == s] for s in SPLITS}
    if novel:
        unknown = sorted(set(novel) - {str(c["name"]) for c in categories})
        if unknown:
            raise error(f"novel class names {unknown[:5]} are not among the categories")
        return {
            "base": [int(c["id"]) for c in categories if c["name"] not in novel],
            "novel": [int(c["id"]) for c in categories if c["name"] in novel],
        }
    if train_json:
        data = read_json(train_json, "training json (to tell base from novel categories)", error)
        anns = data.get("annotations", []) if isinstance(data, dict) else []
        trained = {a["category_id"] for a in anns if isinstance(a, dict) and "category_id" in a}
        return {
            "base": [int(c["id"]) for c in categories if c["id"] in trained],
            "novel": [int(c["id"]) for c in categories if c["id"] not in trained],
        }
    return {}
