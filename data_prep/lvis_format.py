"""A COCO json in LVIS format, so that evaluation reports LVIS AP (AP, APr, APc, APf).

    python -m data_prep.lvis_format --json val.json --train-json train.json --out val_lvis.json

Each category gets LVIS's ``frequency`` from the number of training images with a box of it
(``image_count``): rare up to ``--rare-max`` (LVIS: 10), common up to ``--common-max`` (LVIS: 100),
frequent above; a category without training boxes (a novel class) is rare, as in LVIS
open-vocabulary detection. Every image is exhaustively annotated (COCO's promise): its negatives
are all categories without a box in it, none is "not exhaustive". Exit status: 0 done, 1 bad
input, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from regionclip.errors import InputError
from regionclip.utils import atomic_write_json, read_json


def frequency(image_count: int, rare_max: int = 10, common_max: int = 100) -> str:
    """LVIS's frequency group of a category with training boxes in ``image_count`` images."""
    return "r" if image_count <= rare_max else "c" if image_count <= common_max else "f"


def to_lvis_format(
    coco: Mapping[str, Any], train: Mapping[str, Any], rare_max: int = 10, common_max: int = 100
) -> dict[str, Any]:
    """``coco`` (a parsed COCO json) with LVIS's category and image fields added (see the module
    docstring); ``train`` is the json whose boxes count the training images per category."""
    images_of: dict[int, set[int]] = {}
    for ann in train.get("annotations", []):
        images_of.setdefault(int(ann["category_id"]), set()).add(int(ann["image_id"]))
    categories = [
        {**c, "image_count": len(images_of.get(int(c["id"]), ())),
         "frequency": frequency(len(images_of.get(int(c["id"]), ())), rare_max, common_max)}
        for c in coco["categories"]
    ]  # fmt: skip
    present: dict[int, set[int]] = {}
    for ann in coco.get("annotations", []):
        present.setdefault(int(ann["image_id"]), set()).add(int(ann["category_id"]))
    all_ids = [int(c["id"]) for c in coco["categories"]]
    images = [
        {**im, "neg_category_ids": [c for c in all_ids if c not in present.get(int(im["id"]), set())],
         "not_exhaustive_category_ids": []}
        for im in coco["images"]
    ]  # fmt: skip
    return {**coco, "categories": categories, "images": images}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.lvis_format", description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="COCO json to convert (e.g. the val json with all boxes)")
    p.add_argument("--train-json", required=True, help="COCO json whose boxes count images per category")
    p.add_argument("--out", required=True, help="LVIS-format json to write")
    p.add_argument("--rare-max", type=int, default=10, help="rare: at most this many training images")
    p.add_argument("--common-max", type=int, default=100, help="common: at most this many; frequent above")
    args = p.parse_args(argv)
    if not 0 <= args.rare_max < args.common_max:
        p.error(f"need 0 <= --rare-max < --common-max, got {args.rare_max} and {args.common_max}")
    try:
        coco, train = read_json(args.json, "--json"), read_json(args.train_json, "--train-json")
        for name, data in (("--json", coco), ("--train-json", train)):
            if not isinstance(data, dict) or "categories" not in data or "images" not in data:
                raise InputError(f"{name} {getattr(args, name[2:].replace('-', '_'))}: not a COCO json")
        out = to_lvis_format(coco, train, args.rare_max, args.common_max)
    except (ValueError, OSError, KeyError) as e:  # InputError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    atomic_write_json(args.out, out)
    groups = {g: sum(c["frequency"] == g for c in out["categories"]) for g in ("r", "c", "f")}
    print(f"lvis_format: {len(out['images'])} images, categories rare/common/frequent "
          f"{groups['r']}/{groups['c']}/{groups['f']} -> {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
