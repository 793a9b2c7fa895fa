"""COCO captions + instances → image–text shards and open-vocabulary (OVD) box jsons.

    python -m data_prep.coco --config FILE [key=value ...]

Reads ``data_prep.coco``: ``captions_json`` (captions_*.json), ``instances_json``
(instances_*.json) and ``image_dir``; either json may be left empty to skip its output. Writes
into ``data_prep.out_dir``:

- ``<prefix>-%06d.tar`` shards: one sample per captioned image, key = the 12-digit zero-padded
  image id, all captions in ``json.captions``, meta ``{width, height, source_id, file_name}``;
  the image bytes are copied unchanged with the extension of their real format (magic bytes).
- ``instances_<split>_base.json``: COCO format, base-class boxes only, every image kept;
- ``instances_<split>_all.json``: base + novel boxes;
- ``categories.json``: ``[{id, name, split}]``.

Category ids stay as in COCO; categories carry ``"split": "base" | "novel"``. Images whose file
is missing or corrupt are skipped, counted and reported, and left out of the box jsons too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.generic import (
    ConversionStats,
    DataPrepError,
    SkipSample,
    load_image_file,
    run_converter,
    write_json_atomic,
    write_shards,
)
from regionclip.cli import config_from_argv
from regionclip.config import ExperimentConfig
from regionclip.data.shards import error_record, image_text_sample

# Skip reasons that mean the image file itself is unusable: such images leave the box jsons too.
BAD_FILE_REASONS = frozenset({"missing_file", "unreadable_file", "bad_image", "size_mismatch"})


def read_json(path: str, what: str) -> dict[str, Any]:
    """A COCO-style json object; DataPrepError naming ``what`` and the file when unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise DataPrepError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataPrepError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataPrepError(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    for section in ("images", "annotations"):
        if not isinstance(data.get(section), list):
            raise DataPrepError(f"{what} {path}: missing or invalid '{section}' list (not a COCO json?)")
    return data


# --------------------------------------------------------------------------------------------
# OVD categories and box jsons
# --------------------------------------------------------------------------------------------


def ovd_categories(
    instances: dict[str, Any], path: str, base: Sequence[str], novel: Sequence[str]
) -> list[dict[str, Any]]:
    """The OVD classes as ``[{id, name, split}]`` in COCO id order.

    Raises:
        DataPrepError: a configured class is not a category of ``path``, or is both base and novel.
    """
    if not isinstance(instances.get("categories"), list):
        raise DataPrepError(f"instances json {path}: missing or invalid 'categories' list")
    by_name = {c["name"]: c for c in instances["categories"]}
    both = sorted(set(base) & set(novel))
    if both:
        raise DataPrepError(f"classes {both} are in both data_prep.coco.base_classes and novel_classes")
    for names, setting in ((base, "base_classes"), (novel, "novel_classes")):
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise DataPrepError(
                f"data_prep.coco.{setting}: unknown class {unknown[0]!r} ({len(unknown)} unknown in all: "
                f"{', '.join(map(repr, unknown))}): not a category of {path}"
            )
    split = {**{n: "base" for n in base}, **{n: "novel" for n in novel}}
    cats = [{"id": by_name[n]["id"], "name": n, "split": s} for n, s in split.items()]
    return sorted(cats, key=lambda c: c["id"])


@dataclass
class BoxJsons:
    base: dict[str, Any]
    all: dict[str, Any]
    boxes_base: int
    boxes_novel: int
    dropped_images: int  # left out because their file was missing or corrupt


def ovd_box_jsons(
    instances: dict[str, Any], categories: list[dict[str, Any]], bad_image_ids: set[int]
) -> BoxJsons:
    """COCO jsons restricted to the OVD classes: base boxes only, and base + novel boxes.

    Every image is kept (also those left without boxes) except ``bad_image_ids``; annotations keep
    all their COCO fields.
    """
    split_of = {c["id"]: c["split"] for c in categories}
    images = [im for im in instances["images"] if im.get("id") not in bad_image_ids]
    anns = [
        a
        for a in instances["annotations"]
        if a["category_id"] in split_of and a["image_id"] not in bad_image_ids
    ]
    base_anns = [a for a in anns if split_of[a["category_id"]] == "base"]
    head = {k: instances[k] for k in ("info", "licenses") if k in instances}
    base_cats = [c for c in categories if c["split"] == "base"]
    return BoxJsons(
        base={
            **head,
            "images": images,
            "annotations": base_anns,
            "categories": _coco_cats(instances, base_cats),
        },
        all={**head, "images": images, "annotations": anns, "categories": _coco_cats(instances, categories)},
        boxes_base=len(base_anns),
        boxes_novel=len(anns) - len(base_anns),
        dropped_images=len(instances["images"]) - len(images),
    )


def _coco_cats(instances: dict[str, Any], categories: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Original COCO category entries (supercategory etc.) with the OVD ``split`` added."""
    by_id = {c["id"]: c for c in instances["categories"]}
    return [{**by_id[c["id"]], "split": c["split"]} for c in categories]


# --------------------------------------------------------------------------------------------
# Captions → shards
# --------------------------------------------------------------------------------------------


@dataclass
class CocoImage:
    key: str
    where: str  # the captions json, for messages
    image_id: int
    file_name: str
    width: Any  # as in the json (may be absent)
    height: Any
    captions: list[str] = field(default_factory=list)


def caption_images(captions: dict[str, Any], path: str) -> list[CocoImage | dict]:
    """Images of a captions json with their captions, in image-id order; bad entries as error records."""
    items: list[CocoImage | dict] = []
    by_id: dict[int, CocoImage] = {}
    for i, im in enumerate(captions["images"]):
        image_id, file_name = (im.get("id"), im.get("file_name")) if isinstance(im, dict) else (None, None)
        if (
            not isinstance(image_id, int)
            or isinstance(image_id, bool)
            or image_id < 0
            or not isinstance(file_name, str)
        ):
            detail = f"images[{i}] needs an integer 'id' >= 0 and a 'file_name': {str(im)[:200]}"
            items.append(error_record("bad_entry", "", path, detail))
            continue
        if image_id in by_id:
            items.append(
                error_record("duplicate_id", f"{image_id:012d}", path, f"images[{i}]: id {image_id} repeated")
            )
            continue
        by_id[image_id] = CocoImage(
            f"{image_id:012d}", path, image_id, file_name, im.get("width"), im.get("height")
        )
    for ann in captions["annotations"]:
        image = by_id.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if image is not None and isinstance(ann.get("caption"), str) and ann["caption"].strip():
            image.captions.append(ann["caption"].strip())
    return items + [by_id[i] for i in sorted(by_id)]


def _make_sample(image: CocoImage, image_dir: Path) -> tuple[dict[str, Any], bool]:
    if not image.captions:
        raise SkipSample("no_caption", f"image {image.image_id} has no non-empty caption")
    loaded = load_image_file(image_dir / image.file_name)
    size, json_size = (loaded.width, loaded.height), (image.width, image.height)
    if json_size != (None, None) and json_size != size:
        raise SkipSample(
            "size_mismatch", f"file is {size[0]}x{size[1]} but the json says {json_size[0]}x{json_size[1]}"
        )
    meta = {"width": size[0], "height": size[1], "source_id": image.image_id, "file_name": image.file_name}
    return image_text_sample(image.key, loaded.data, loaded.ext, image.captions, meta), loaded.reencoded


def convert_coco(cfg: ExperimentConfig) -> ConversionStats:
    """Write the shards and OVD jsons described in the module docstring; returns the counts."""
    c, out_dir = cfg.data_prep.coco, Path(cfg.data_prep.out_dir)
    if not c.captions_json and not c.instances_json:
        raise DataPrepError("data_prep.coco: set captions_json and/or instances_json")
    # Validate everything cheap before the long image pass.
    instances = categories = None
    if c.instances_json:
        instances = read_json(c.instances_json, "instances json")
        categories = ovd_categories(instances, c.instances_json, c.base_classes, c.novel_classes)
    stats = ConversionStats("coco", str(out_dir), cfg.data_prep.prefix, wants_images=bool(c.captions_json))
    if c.captions_json:
        image_dir = Path(c.image_dir)
        if not image_dir.is_dir():
            raise DataPrepError(f"image folder {c.image_dir!r} does not exist (data_prep.coco.image_dir)")
        items = caption_images(read_json(c.captions_json, "captions json"), c.captions_json)
        write_shards(iter(items), lambda im: _make_sample(im, image_dir), stats, cfg, total=len(items))
    if instances is not None and categories is not None:
        bad_ids = {int(r["key"]) for r in stats.skipped if r["error"] in BAD_FILE_REASONS}
        boxes = ovd_box_jsons(instances, categories, bad_ids)
        split = c.split_name
        write_json_atomic(out_dir / f"instances_{split}_base.json", boxes.base)
        write_json_atomic(out_dir / f"instances_{split}_all.json", boxes.all)
        write_json_atomic(out_dir / "categories.json", categories)
        stats.extra = (
            f"boxes base {boxes.boxes_base} / novel {boxes.boxes_novel} on {len(boxes.all['images'])} images "
            f"({boxes.dropped_images} dropped: bad file) -> {out_dir}/instances_{split}_{{base,all}}.json"
        )
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = config_from_argv(argv, "Convert COCO captions + instances into shards and OVD box jsons.")
    return run_converter(convert_coco, cfg)


if __name__ == "__main__":
    sys.exit(main())
