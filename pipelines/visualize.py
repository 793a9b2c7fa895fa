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
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from regionclip.data.shards import expand_urls
from regionclip.pseudolabel import iter_pseudo_labels, manifest_path
from regionclip.utils import atomic_output

COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


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


def draw_sample(
    sample: dict, names: Sequence[str], cell: int, min_score: float, max_boxes: int
) -> Image.Image:
    """One grid cell: the image scaled to fit ``cell`` pixels with its best kept boxes and labels."""
    meta = sample["meta"]
    w, h = meta["width"], meta["height"]
    image = sample["image"] if sample["image"] is not None else Image.new("RGB", (w, h), (128, 128, 128))
    scale = cell / max(w, h)
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (cell, cell + 14), (255, 255, 255))
    canvas.paste(image, (0, 14))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text(
        (2, 1), f"{sample['key']}: {meta['num_kept']}/{meta['num_proposals']} kept", fill=(0, 0, 0), font=font
    )
    order = sorted(range(len(sample["score"])), key=lambda i: -float(sample["score"][i]))
    shown = [i for i in order if sample["score"][i] >= min_score][:max_boxes]
    for n, i in enumerate(shown):
        colour = COLOURS[n % len(COLOURS)]
        x0, y0, x1, y1 = (float(v) * scale for v in sample["boxes"][i])
        draw.rectangle([x0, y0 + 14, x1, y1 + 14], outline=colour, width=2)
        cid = int(sample["concept"][i])
        label = f"{names[cid] if 0 <= cid < len(names) else cid} {float(sample['score'][i]):.2f}"
        tw = draw.textlength(label, font=font)
        draw.rectangle([x0, y0 + 14, x0 + tw + 2, y0 + 26], fill=colour)
        draw.text((x0 + 1, y0 + 14), label, fill=(0, 0, 0), font=font)
    return canvas


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
            cells.append(draw_sample(sample, names, args.cell, args.min_score, args.max_boxes))
            if len(cells) == args.n:
                break
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not cells:
        print(f"error: no samples in {args.shards}", file=sys.stderr)
        return 1
    cols = math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / cols)
    cw, ch = cells[0].size
    grid = Image.new("RGB", (cols * cw, rows * ch), (255, 255, 255))
    for i, c in enumerate(cells):
        grid.paste(c, ((i % cols) * cw, (i // cols) * ch))
    with atomic_output(args.out) as tmp:
        grid.save(tmp, format="PNG")
    print(f"visualize: {len(cells)} images -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
