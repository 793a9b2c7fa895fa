"""`detect`: zero-shot open-vocabulary detection on image files with a GLIP-style prompt.

    python -m pipelines.detect --model RN50 --pretrained openai --rpn runs/demo/rpn \\
        --prompt "person. bicycle. red umbrella." photo1.jpg photo2.jpg --out detections/

``--model`` is an open_clip architecture name (with ``--pretrained`` tag/file and, for a custom
architecture, ``--model-config JSON``), a checkpoint folder written by this project, or a weights
file (its architecture from ``--model-config``). Proposals come from the project's RPN; each is
classified against the prompt's class names (no box regression, per-class NMS).

Writes ``<out>/detections.json`` (COCO results plus the image list and the prompt's categories)
and ``<out>/<image stem>.png`` with boxes, labels and scores drawn. Unreadable images are skipped
with a warning. Exit status: 0 done, 1 no image could be read or bad model/RPN, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from regionclip.config import ClipModelConfig
from regionclip.evaluation import (
    DetectionParams,
    class_embeddings_for,
    configure_rpn_for_inference,
    detect,
    read_images,
    read_names_file,
    to_coco_results,
)
from regionclip.models.loading import CONFIG_FILE, is_checkpoint_dir, load_clip
from regionclip.prompts import TEMPLATE_SETS, parse_prompt
from regionclip.proposals import load_rpn
from regionclip.utils import atomic_output, atomic_write_json, resolve_device

log = logging.getLogger("detect")
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
PALETTE += [(240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.detect",
        description="Zero-shot open-vocabulary detection with a CLIP region encoder and an RPN.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--model", required=True, help="open_clip name, checkpoint folder or weights file")
    p.add_argument("--model-config", default="", metavar="JSON", help="custom open_clip architecture")
    p.add_argument("--pretrained", default="", help="open_clip tag or weights file for a named model")
    p.add_argument("--rpn", required=True, metavar="DIR", help="RPN folder written by `make rpn`")
    vocab = p.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--prompt", help="class names separated by '.', e.g. 'person. bicycle.'")
    vocab.add_argument("--vocab", metavar="FILE", help="class names, one per line")
    p.add_argument("--out", default="detections", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.add_argument("--nms", type=float, default=0.5, help="per-class NMS IoU")
    p.add_argument("--max-dets", type=int, default=100, help="detections per image")
    p.add_argument("--temperature", type=float, default=0.01)
    p.add_argument("--rpn-nms", type=float, default=0.9)
    p.add_argument("--rpn-topk", type=int, default=1000, help="proposals per image (0 = the RPN's own)")
    p.add_argument(
        "--rpn-score",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score = sqrt(class probability x objectness), as RegionCLIP (default: on)",
    )
    p.add_argument("--short-side", type=int, default=800)
    p.add_argument("--max-side", type=int, default=1333)
    p.add_argument("--templates", default="ensemble", choices=sorted(TEMPLATE_SETS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    return p


def model_config(model: str, model_config: str, pretrained: str) -> ClipModelConfig:
    """The ClipModelConfig that ``--model/--model-config/--pretrained`` describe."""
    path = Path(model)
    if is_checkpoint_dir(path):
        saved = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("regionclip", {})
        name = saved.get("model") or (Path(model_config).stem if model_config else path.name)
        return ClipModelConfig(model=name, pretrained=str(path), model_config=model_config)
    if path.is_file():
        if not model_config:
            raise ValueError(
                f"--model {model} is a weights file: pass its architecture as --model-config JSON"
            )
        return ClipModelConfig(model=Path(model_config).stem, pretrained=str(path), model_config=model_config)
    return ClipModelConfig(model=model, pretrained=pretrained, model_config=model_config)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def draw_detections(
    image: Image.Image, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, names: Sequence[str]
) -> Image.Image:
    """A copy of ``image`` with each box, its class name and score drawn (lowest score first)."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = _font(max(10, min(out.size) // 40))
    width = max(1, min(out.size) // 200)
    for i in reversed(range(len(boxes))):
        x0, y0, x1, y1 = boxes[i].tolist()
        colour = PALETTE[int(labels[i]) % len(PALETTE)]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = f"{names[int(labels[i])]} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        ty = y0 - (bottom - top) if y0 - (bottom - top) >= 0 else y0
        draw.rectangle([x0, ty, x0 + right - left, ty + bottom - top], fill=colour)
        draw.text((x0, ty - (top - y0)), text, fill=(255, 255, 255), font=font)
    return out


def _png_names(paths: Sequence[Path]) -> list[str]:
    """``<stem>.png`` per image, made unique with ``-2``, ``-3``, ... when stems repeat."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        n = seen.get(p.stem, 0) + 1
        seen[p.stem] = n
        out.append(f"{p.stem}.png" if n == 1 else f"{p.stem}-{n}.png")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        names = parse_prompt(args.prompt) if args.prompt is not None else read_names_file(args.vocab)
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    params = DetectionParams(
        temperature=args.temperature,
        score_thresh=args.score_thresh,
        nms_thresh=args.nms,
        max_dets=args.max_dets,
        multiply_rpn_score=args.rpn_score,
        rpn_nms_thresh=args.rpn_nms,
        rpn_post_nms_top_n=args.rpn_topk,
        short_side=args.short_side,
        max_side=args.max_side,
    )
    try:
        loaded = load_clip(model_config(args.model, args.model_config, args.pretrained), device)
        rpn = configure_rpn_for_inference(load_rpn(args.rpn, device), params)
        embeddings = class_embeddings_for(loaded, names, args.templates)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in args.images]
    pngs = _png_names(paths)
    images_meta, results, skipped = [], [], 0
    start = time.perf_counter()
    for first in tqdm(range(0, len(paths), args.batch_size), desc="detect", unit="batch"):
        batch = paths[first : first + args.batch_size]
        kept, pil = read_images(batch)
        skipped += len(batch) - len(kept)
        for j, image, (boxes, scores, labels) in zip(
            kept, pil, detect(loaded, rpn, pil, embeddings, params), strict=True
        ):
            image_id = first + j + 1
            png = pngs[first + j]
            with atomic_output(out_dir / png) as tmp:
                draw_detections(image, boxes, scores, labels, names).save(tmp, format="PNG")
            images_meta.append(
                {
                    "id": image_id,
                    "file_name": str(batch[j]),
                    "width": image.width,
                    "height": image.height,
                    "visualization": png,
                }
            )
            results.extend(to_coco_results(image_id, boxes, scores, labels, range(1, len(names) + 1)))
    seconds = time.perf_counter() - start
    if not images_meta:
        print(f"error: none of the {len(paths)} images could be read", file=sys.stderr)
        return 1
    out_json = out_dir / "detections.json"
    atomic_write_json(
        out_json,
        {
            "images": images_meta,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
            "detections": results,
            "model": loaded.identity,
            "rpn": args.rpn,
            "params": asdict(params),
            "templates": args.templates,
        },
    )
    print(
        f"detect: {len(results)} detections of {len(names)} classes on {len(images_meta)} images "
        f"({skipped} unreadable) in {seconds:.1f} s ({len(images_meta) / max(seconds, 1e-9):.2f} img/s) "
        f"-> {out_json}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
