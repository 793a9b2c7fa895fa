"""Export a student (or any CLIP ResNet) as a Detectron2 checkpoint for the Detectron2 route.

    python -m pipelines.export_detectron2 --student DIR --out model.pth [--class-json JSON ...]
        [--names FILE ...] [--model NAME] [--model-config JSON] [--templates ensemble|single]

``--student``: a checkpoint folder from pretraining (the model name is read from it), or a
state-dict file / open_clip pretrained tag together with ``--model`` (and ``--model-config`` for
a custom architecture). Writes ``model.pth`` (``{"model": {"backbone.*": tensor}}``, loadable
with ``torch.load(weights_only=True)``), ``model.open_clip.json`` (the architecture, for
``MODEL.CLIP.OPENCLIP_MODEL_CONFIG``) and, with ``--class-json``, the category names of those
COCO jsons (and with ``--names`` the names of those files, one per line, e.g. a test
vocabulary with distractors for ``MODEL.CLIP.TEST_VOCABULARY``) embedded by the model's text tower
(``model.class_embeddings.safetensors``, for ``MODEL.CLIP.TEXT_EMB_PATH``). Does not need
Detectron2. Exit status: 0 done, 1 bad input, 2 bad arguments. See docs/detectron2.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from regionclip.config import ClipModelConfig
from regionclip.models.loading import is_checkpoint_dir, model_config_for
from regionclip.transfer.detectron2.export import export_student


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.export_detectron2", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--student", required=True, help="checkpoint folder, state-dict file or open_clip tag"
    )
    parser.add_argument("--out", required=True, help="the Detectron2 checkpoint to write (model.pth)")
    parser.add_argument(
        "--model", help="open_clip architecture name (default: read from a checkpoint folder)"
    )
    parser.add_argument(
        "--model-config", default="", help="JSON registering a custom architecture as --model"
    )
    parser.add_argument(
        "--class-json",
        action="append",
        default=[],
        metavar="JSON",
        help="COCO json whose category names to embed (repeatable)",
    )
    parser.add_argument("--names", action="append", default=[], metavar="FILE",
                        help="file of further names to embed, one per line (repeatable)")  # fmt: skip
    parser.add_argument(
        "--templates", default="ensemble", help="prompt templates: ensemble (CLIP's 80 + '{}.') or single"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.model:
        source = ClipModelConfig(model=args.model, pretrained=args.student, model_config=args.model_config)
    elif is_checkpoint_dir(args.student):
        source = model_config_for(args.student, args.model_config)
    else:
        parser.error(f"--model is required: {args.student} is not a checkpoint folder that names its model")
    try:
        summary = export_student(source, args.out, args.class_json, args.templates, args.names)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    extra = (
        f"; {summary['classes']} class embeddings -> {summary['embeddings']}"
        if "embeddings" in summary
        else ""
    )
    if summary["skipped"]:
        print(f"export: {summary['out']} already holds this export; skipping")
        return 0
    print(
        f"export: {summary['weights_id']} -> {summary['out']} ({summary['tensors']} tensors, "
        f"{summary['batchnorms']} BatchNorms with statistics); architecture -> {summary['arch']}{extra}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
