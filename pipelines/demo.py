"""`make demo`: the whole pipeline on the generated EmojiWorld, end to end, measured.

    python -m pipelines.demo --config configs/demo.yaml [--seeds 0 1 2] [key=value ...]
    make demo            make demo SEEDS="0 1 2"

Per seed, every stage of :mod:`regionclip.stages.demo`'s plan (the Detectron2 transfer only when
Detectron2 is importable) runs in this process through its entry point's ``main`` (mapped below)
and skips itself when its outputs match its config, so a
re-run is cheap and an interrupted demo resumes. ``key=value`` overrides reach every stage except
``pretrain.*`` (the student only); ``--teacher-set key=value`` changes the teacher run. One seed
writes to ``output_dir``; several to ``<output_dir>/seed<N>`` each, sharing one EmojiWorld, with
the mean ± std in ``<output_dir>``: ``results.json``, ``RESULTS.md``, ``pseudolabels.png``,
``detections.png``, ``loss_curves.png``. Exit status: 0 done, 1 a stage or the report failed,
2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import pretrain
from data_prep import emojiworld
from pipelines import concepts, detectron2_train, eval, export_detectron2, pseudolabel, rpn, transfer
from regionclip.cli import config_from_argv
from regionclip.errors import ConfigError
from regionclip.stages.demo import run_demo, split_seeds

ENTRY_POINTS = {
    "data": (emojiworld.main, "python -m data_prep.emojiworld"),
    "pretrain": (pretrain.main, "python pretrain.py"),
    **{
        m.__name__.rsplit(".", 1)[1]: (m.main, f"python -m {m.__name__}")
        for m in (rpn, concepts, pseudolabel, eval, transfer)
    },
}
if importlib.util.find_spec("detectron2") is not None:  # the Detectron2 transfer of the student
    ENTRY_POINTS.update(
        {
            m.__name__.rsplit(".", 1)[1]: (m.main, f"python -m {m.__name__}")
            for m in (export_detectron2, detectron2_train)
        }
    )


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the config's)")
    parser.add_argument(
        "--teacher-config", metavar="FILE", help="teacher recipe (default: <config stem>-teacher.yaml)"
    )
    parser.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the teacher run only (repeatable), e.g. pretrain.max_steps=100")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    seeds, argv = split_seeds(sys.argv[1:] if argv is None else argv)
    base_cfg, args = config_from_argv(
        argv, "The whole pipeline on EmojiWorld, end to end.", extra_flags=_flags
    )
    if seeds == []:
        print("error: --seeds needs at least one integer", file=sys.stderr)
        return 2
    if args.config is None:
        print("error: --config is required (e.g. configs/demo.yaml)", file=sys.stderr)
        return 2
    teacher_config = args.teacher_config or str(
        Path(args.config).with_name(f"{Path(args.config).stem}-teacher.yaml")
    )
    if not Path(teacher_config).is_file():
        print(
            f"error: teacher config {teacher_config} does not exist (pass --teacher-config)", file=sys.stderr
        )
        return 2
    seeds = list(dict.fromkeys(seeds)) if seeds else [base_cfg.seed]
    try:
        return run_demo(args.config, teacher_config, args.overrides, args.teacher_set, seeds, ENTRY_POINTS)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
