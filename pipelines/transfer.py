"""`make transfer`: train the open-vocabulary detector on base boxes, then evaluate AP50 base/novel/all.

    python -m pipelines.transfer --config FILE [key=value ...] [--stop-after N]

``transfer.init`` picks the weights: the teacher (CLIP baseline, default) or a student checkpoint
folder (RegionCLIP), e.g. ``transfer.init.pretrained=runs/demo/student/final transfer.tag=regionclip``.
Writes ``<transfer.out_dir>/model.safetensors``, ``detections.json`` and ``metrics.json``; resumes
from ``checkpoint/`` and skips a run already finished with the same config. Exit status: 0 done
(or stopped by --stop-after), 1 bad input, 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from regionclip.cli import config_from_argv, device_from_config
from regionclip.proposals import ProposalError
from regionclip.transfer.engine import TransferError, run_transfer


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="train at most N steps now, checkpoint and exit (re-run resumes)",
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = config_from_argv(argv, "Train and evaluate the open-vocabulary detector.", extra_flags=_flags)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = device_from_config(cfg.device)
    try:
        summary = run_transfer(cfg.transfer, device, stop_after=args.stop_after)
    except (TransferError, ProposalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary.get("finished"):
        train, ev = summary["train"], summary["eval"]
        print(
            f"transfer [{cfg.transfer.tag}]: {train['steps']} steps, {train['images_per_s']} train images/s; "
            f"{ev['images']} val images, {ev['detections']} detections, {ev['images_per_s']} images/s; "
            f"AP50 all {_fmt(summary['AP50_all'])} base {_fmt(summary['AP50_base'])} "
            f"novel {_fmt(summary['AP50_novel'])}; metrics in {cfg.transfer.out_dir}/metrics.json"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
