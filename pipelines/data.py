"""`make data`: build the image–text shards of ``data_prep.source``.

    python -m pipelines.data --config FILE [key=value ...]

``data_prep.source`` picks the converter: ``emojiworld`` (generate the synthetic dataset, same as
``python -m data_prep.emojiworld``), ``coco`` (:mod:`data_prep.coco`) or ``generic``
(:mod:`data_prep.generic`). Exit status: 0 done, 1 bad input, 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from data_prep import emojiworld
from data_prep.coco import convert_coco
from data_prep.generic import convert_generic, run_converter
from regionclip.cli import config_from_argv

SOURCES = ("emojiworld", "coco", "generic")


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="emojiworld: regenerate even when up to date (converters always rewrite)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, _ = config_from_argv(
        argv, "Convert or generate image-text shards (data_prep.source picks the source).", _flags
    )
    source = cfg.data_prep.source
    if source == "coco":
        return run_converter(convert_coco, cfg)
    if source == "generic":
        return run_converter(convert_generic, cfg)
    if source == "emojiworld":
        # Its own entry point: same flags, messages and up-to-date check as `make demo-data`.
        return emojiworld.main(argv) or 0
    print(f"error: data_prep.source={source!r}: expected one of {', '.join(SOURCES)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
