"""Look at pseudo-labels: a PNG grid of images with their kept boxes and concept names.

    python -m pipelines.visualize --shards 'runs/demo/pseudolabels/pretrain-{000000..000007}.tar' \\
        --out grid.png [--n 16] [--min-score 0.5] [--concepts FILE] [--max-boxes 8]

Concept names come from ``--concepts`` (the embeddings file, or its names ``.txt``) or else from
the concept-pool path recorded in the first shard's manifest. Shards written without their
images (``pseudolabel.store_image=false``) are drawn on a grey canvas of the image's size.
Exit status: 0 written, 1 bad input, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from regionclip.data.pseudo_labels import iter_pseudo_labels, manifest_path
from regionclip.data.shards import expand_urls
from regionclip.viz import draw_pseudo_labels, image_grid, save_png


def concept_names(concepts: str, first_shard: str) -> list[str]:
    """Names from ``concepts`` (embeddings file or names .txt), else from the shard's manifest."""
    if not concepts:
        mpath = manifest_path(first_shard)
        try:
            concepts = json.loads(mpath.read_text(encoding="utf-8"))["concept_pool"]["path"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"no concept names: pass --concepts (cannot read {mpath}: {e})") from None
    txt = Path(concepts).with_suffix(".txt")
    try:
        return txt.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read concept names {txt}: {e.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.visualize", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="pseudo-label shards (paths, brace patterns, URLs)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--n", type=int, default=16, help="images in the grid")
    parser.add_argument("--min-score", type=float, default=0.5, help="draw boxes with at least this score")
    parser.add_argument("--max-boxes", type=int, default=8, help="at most this many boxes per image")
    parser.add_argument("--cell", type=int, default=256, help="grid cell size in pixels")
    parser.add_argument("--concepts", default="", help="concept embeddings file or names .txt")
    args = parser.parse_args(argv)
    if args.n < 1 or args.cell < 32:
        parser.error("--n must be >= 1 and --cell >= 32")
    try:
        urls = expand_urls(args.shards)
        if not urls:
            raise ValueError(f"no shards in {args.shards!r}")
        names = concept_names(args.concepts, urls[0])
        cells = []
        for sample in iter_pseudo_labels(urls):
            cells.append(draw_pseudo_labels(sample, names, args.cell, args.min_score, args.max_boxes))
            if len(cells) == args.n:
                break
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not cells:
        print(f"error: no samples in {args.shards}", file=sys.stderr)
        return 1
    save_png(image_grid(cells), args.out)
    print(f"visualize: {len(cells)} images -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
