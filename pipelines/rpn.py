"""`make rpn`: train the class-agnostic RPN on base-class boxes, then measure its proposal recall.

    python -m pipelines.rpn --config FILE [key=value ...] [--stop-after N]

Writes ``<rpn.out_dir>/rpn.safetensors``, ``rpn.json`` and ``summary.json`` (training figures and
recall@k of base and novel val boxes). A run resumes from ``<rpn.out_dir>/checkpoint/`` and is
skipped when the same config already finished. With ``rpn.precomputed`` set there is nothing to
train: the file is validated instead. Exit status: 0 done (or stopped by --stop-after), 1 bad
input, 2 bad config or arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from regionclip.cli import reports_errors, stage_setup, stop_after_flag
from regionclip.errors import InputError, TrainingError
from regionclip.labeling.proposals import load_precomputed_proposals
from regionclip.stages.rpn import train_rpn


@reports_errors(InputError, TrainingError)
def main(argv: Sequence[str] | None = None) -> int:
    cfg, args, device = stage_setup(
        argv, "Train the class-agnostic region proposal network.", stop_after_flag
    )
    if cfg.rpn.precomputed:
        table = load_precomputed_proposals(cfg.rpn.precomputed)
        n = sum(len(boxes) for boxes, _ in table.values())
        print(f"rpn: using precomputed proposals {cfg.rpn.precomputed}: {len(table)} samples, {n} boxes")
        return 0
    summary = train_rpn(cfg.rpn, device, stop_after=args.stop_after)
    if summary.get("finished"):
        print(f"rpn: done; network and summary in {cfg.rpn.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
