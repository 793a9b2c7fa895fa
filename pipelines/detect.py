"""`detect`: zero-shot open-vocabulary detection on image files with a GLIP-style prompt.

    python -m pipelines.detect --model RN50 --pretrained openai --rpn runs/demo/rpn --prompt "person. dog." a.jpg

``--model``: an open_clip name, a checkpoint folder of this project, or a weights file with
``--model-config``. Writes ``<out>/detections.json`` (COCO results), ``images.json`` and one PNG
per image. Exit status: 0 done, 1 no image could be read or bad model/RPN, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from regionclip.cli import console_logging
from regionclip.evaluation.zero_shot import DetectionParams
from regionclip.models.loading import model_config_for
from regionclip.precision import PRECISIONS, resolve_precision
from regionclip.prompts import TEMPLATE_SETS, parse_prompt
from regionclip.stages.detect import run_detect
from regionclip.text import read_names_file
from regionclip.utils import resolve_device

NUMBER_FLAGS = [  # (flag, default, help): :class:`DetectionParams` and batching
    ("--score-thresh", 0.3, "lowest score kept"), ("--nms", 0.5, "per-class NMS IoU"),
    ("--max-dets", 100, "detections per image"), ("--temperature", 0.01, "logits = cosine / temperature"),
    ("--rpn-nms", 0.9, "proposal NMS IoU"), ("--rpn-topk", 1000, "proposals per image (0 = the RPN's own)"),
    ("--short-side", 800, "image short side"), ("--max-side", 1333, "image long side at most"),
    ("--batch-size", 4, "images per forward")]  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.detect", description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--model", required=True, help="open_clip name, checkpoint folder or weights file")
    p.add_argument("--model-config", default="", metavar="JSON", help="custom open_clip architecture")
    p.add_argument("--pretrained", default="", help="open_clip tag or weights file for a named model")
    p.add_argument("--rpn", required=True, metavar="DIR", help="RPN folder written by `make rpn`")
    vocab = p.add_mutually_exclusive_group(required=True)
    vocab.add_argument(
        "--prompt",
        help="class names separated by '.', e.g. 'person. bicycle.'; '\\.' is a dot in a name: 'st\\. bernard.'",
    )
    vocab.add_argument("--vocab", metavar="FILE", help="class names, one per line")
    p.add_argument("--out", default="detections", metavar="DIR", help="output folder (default: %(default)s)")
    for flag, default, text in NUMBER_FLAGS:
        p.add_argument(flag, type=type(default), default=default, help=text)
    p.add_argument("--rpn-score", action=argparse.BooleanOptionalAction, default=True, help="score x objectness")  # fmt: skip
    p.add_argument("--templates", default="ensemble", choices=sorted(TEMPLATE_SETS))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")  # fmt: skip
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="compute precision (autocast)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    console_logging()
    try:
        names = parse_prompt(args.prompt) if args.prompt is not None else read_names_file(args.vocab)
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device, "--precision")
    except ValueError as e:
        parser.error(str(e))
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    params = DetectionParams(args.temperature, args.score_thresh, args.nms, args.max_dets, args.rpn_score,
                             args.rpn_nms, args.rpn_topk, args.short_side, args.max_side, precision)  # fmt: skip
    try:
        spec = model_config_for(args.model, args.model_config, args.pretrained)
        summary = run_detect(spec, args.rpn, list(map(Path, args.images)), names, params, Path(args.out),
                             args.templates, args.batch_size, device)  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary["line"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
