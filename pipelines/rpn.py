"""`make rpn`: train the class-agnostic RPN on base-class boxes, then measure its proposal recall.

    python -m pipelines.rpn --config FILE [key=value ...] [--stop-after N]

Writes ``<rpn.out_dir>/rpn.safetensors``, ``rpn.json`` and ``summary.json`` (training figures and
recall@k of base and novel val boxes). A run resumes from ``<rpn.out_dir>/checkpoint/`` and is
skipped when the same config already finished. With ``rpn.precomputed`` set there is nothing to
train: the file is validated instead. Exit status: 0 done (or stopped by --stop-after), 1 bad
input, 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from regionclip.cli import config_from_argv, device_from_config
from regionclip.proposals import ProposalError, load_precomputed_proposals, train_rpn


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="train at most N steps now, checkpoint and exit (re-run resumes)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = config_from_argv(
        argv, "Train the class-agnostic region proposal network.", extra_flags=_flags
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = device_from_config(cfg.device)
    try:
        if cfg.rpn.precomputed:
            table = load_precomputed_proposals(cfg.rpn.precomputed)
            n = sum(len(boxes) for boxes, _ in table.values())
            print(f"rpn: using precomputed proposals {cfg.rpn.precomputed}: {len(table)} samples, {n} boxes")
            return 0
        summary = train_rpn(cfg.rpn, device, stop_after=args.stop_after)
    except ProposalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary.get("finished"):
        print(f"rpn: done; network and summary in {cfg.rpn.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
