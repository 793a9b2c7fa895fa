"""Export a student (or any checkpoint folder) as a shareable open_clip Hub folder with a model card.

    python -m pipelines.export_hub --model runs/demo/student/final --out hub/regionclip-emojiworld \\
        --report runs/demo/eval/student.json --report runs/demo/transfer/regionclip/metrics.json \\
        --dataset emojiworld

The folder loads with ``open_clip.create_model_and_transforms('local-dir:<out>')`` and uploads as
it is (``huggingface-cli upload <user>/<name> <out>``). Exit status: 0 done, 1 bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from regionclip.models.hub import CARD_FILE, export_hub


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.export_hub", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (open_clip_config.json + weights)")
    p.add_argument("--out", required=True, help="the Hub folder to write")
    p.add_argument(
        "--report", action="append", default=[], help="eval or transfer json whose figures go in the card"
    )
    p.add_argument(
        "--dataset", action="append", default=[], help="training dataset name for the card's header"
    )
    p.add_argument("--base-model", default="", help="the card's base_model (default: the init weights id)")
    args = p.parse_args(argv)
    try:
        out = export_hub(args.model, args.out, args.report, args.dataset, args.base_model)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"export_hub: {args.model} -> {out} (open_clip local-dir layout, model card {out / CARD_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
