"""`make eval`: zero-shot region recognition and zero-shot detection of a CLIP model.

    python -m pipelines.eval --config FILE [key=value ...]
    make eval CONFIG=configs/demo.yaml ARGS="eval.model.pretrained=runs/demo/student/final eval.tag=student"

Writes ``<eval.out_dir>/<tag>.json`` and ``<tag>.detections.json`` (:mod:`regionclip.stages.eval`);
a finished run of the same config and files is skipped. Exit status: 0 done, 1 bad input, 2 bad
config or arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from regionclip.cli import stage_setup
from regionclip.stages.eval import default_tag, result_path, run_eval


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _, device = stage_setup(argv, "Zero-shot region recognition and detection of a CLIP model.")
    ev = cfg.eval
    tag, out = ev.tag or default_tag(ev.model), result_path(ev)
    try:
        report = run_eval(ev, device)
    except (ValueError, OSError) as e:  # bad json, images, vocabulary, weights or RPN: named in the message
        print(f"error: {e}", file=sys.stderr)
        return 1
    if report is None:
        print(f"eval {tag}: {out} holds the results of this config; skipping")
        return 0
    for line in report["skipped_report"]:
        print(line, file=sys.stderr)
    acc, det = report["region_accuracy"], report["zero_shot_detection"]
    parts = [
        "region top-1/top-5 all/base/novel "
        + " ".join(
            f"{_fmt(acc.get(s, {}).get('top1'))}/{_fmt(acc.get(s, {}).get('top5'))}"
            for s in ("all", "base", "novel")
        )
        + f" % ({acc['all']['n']} boxes)"
    ]
    if det is not None:
        parts.append(
            "AP50 all/base/novel " + "/".join(_fmt(det["AP50"].get(s)) for s in ("all", "base", "novel"))
        )
        if "lvis" in det:
            parts.append(
                "LVIS AP/APr/APc/APf " + "/".join(_fmt(det["lvis"][k]) for k in ("AP", "APr", "APc", "APf"))
            )
    n, seconds = report["images"], report["seconds"]
    print(
        f"eval {tag}: "
        + "; ".join(parts)
        + f"; {n} images in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} img/s, {report['precision']}) -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
