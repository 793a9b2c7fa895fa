"""`make transfer`: train the open-vocabulary detector on base boxes, then evaluate AP50 base/novel/all.

    python -m pipelines.transfer --config FILE [key=value ...] [--stop-after N]

``transfer.init`` picks the weights: the teacher (CLIP baseline, default) or a student checkpoint
folder (RegionCLIP), e.g. ``transfer.init.pretrained=runs/demo/student/final transfer.tag=regionclip``.
Writes ``<transfer.out_dir>/model.safetensors``, ``detections.json`` and ``metrics.json``; resumes
from ``checkpoint/`` and skips a run already finished with the same config. Exit status: 0 done
(or stopped by --stop-after), 1 bad input, 2 bad config or arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from regionclip.cli import reports_errors, stage_setup, stop_after_flag
from regionclip.errors import InputError, TrainingError
from regionclip.stages.transfer import run_transfer


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@reports_errors(InputError, TrainingError)
def main(argv: Sequence[str] | None = None) -> int:
    cfg, args, device = stage_setup(argv, "Train and evaluate the open-vocabulary detector.", stop_after_flag)
    summary = run_transfer(cfg.transfer, device, stop_after=args.stop_after)
    if summary.get("finished"):
        train, ev = summary["train"], summary["eval"]
        lvis = summary.get("lvis")  # an LVIS-format val json
        lvis_part = (
            "; LVIS AP/APr/APc/APf " + "/".join(_fmt(lvis[k]) for k in ("AP", "APr", "APc", "APf"))
            if lvis
            else ""
        )
        print(
            f"transfer [{cfg.transfer.tag}]: {train['steps']} steps, {train['images_per_s']} train images/s; "
            f"{ev['images']} val images, {ev['detections']} detections, {ev['images_per_s']} images/s; "
            f"AP50 all {_fmt(summary['AP50_all'])} base {_fmt(summary['AP50_base'])} "
            f"novel {_fmt(summary['AP50_novel'])}{lvis_part}; metrics in {cfg.transfer.out_dir}/metrics.json"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
