"""Export a student (or any checkpoint folder) or a detector as a shareable Hub folder with a model card.

    python -m pipelines.export_hub --model runs/demo/student/final --out hub/regionclip-emojiworld \\
        --report runs/demo/eval/student.json --report runs/demo/transfer/regionclip/metrics.json \\
        --dataset emojiworld
    python -m pipelines.export_hub --model runs/demo/transfer/regionclip --out hub/regionclip-emojiworld-detector

A checkpoint folder becomes the open_clip layout (``open_clip.create_model_and_transforms(
'local-dir:<out>')`` loads it); a detector folder of ``make transfer`` becomes a folder with its
init CLIP and RPN inside (``RegionCLIP.from_pretrained('<out>')`` loads it). Both upload as they
are (``huggingface-cli upload <user>/<name> <out>``). Exit status: 0 done, 1 bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from regionclip.models.hub import CARD_FILE, export_hub
from regionclip.stages.detector_hub import export_detector_hub
from regionclip.stages.transfer import MODEL_JSON as DETECTOR_RECORD


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.export_hub", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint folder (open_clip_config.json + weights) or detector folder",
    )
    p.add_argument("--out", required=True, help="the Hub folder to write")
    p.add_argument(
        "--report", action="append", default=[], help="eval or transfer json whose figures go in the card"
    )
    p.add_argument(
        "--dataset", action="append", default=[], help="training dataset name for the card's header"
    )
    p.add_argument("--base-model", default="", help="the card's base_model (default: the init weights id)")
    args = p.parse_args(argv)
    detector = (Path(args.model) / DETECTOR_RECORD).is_file()
    export = export_detector_hub if detector else export_hub
    try:
        out = export(args.model, args.out, args.report, args.dataset, args.base_model)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    layout = "detector with its init CLIP and RPN" if detector else "open_clip local-dir layout"
    print(f"export_hub: {args.model} -> {out} ({layout}, model card {out / CARD_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
