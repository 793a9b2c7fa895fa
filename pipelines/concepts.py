"""`make concepts`: parse captions into the concept pool and embed it with the teacher's text tower.

    python -m pipelines.concepts --config configs/demo.yaml [concepts.min_count=20 ...] [--force]

Writes ``concepts.txt``, ``concept_counts.json``, ``caption_phrases.jsonl``,
``concept_embeddings.safetensors`` and ``summary.json`` to ``concepts.out_dir``; a finished run
with the same config and inputs is skipped unless ``--force``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from regionclip.cli import config_from_argv, console_logging, device_from_config
from regionclip.stages.concepts import build_concepts


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = config_from_argv(
        argv,
        "Concept pool from captions (spaCy noun chunks) + concept text embeddings.",
        extra_flags=lambda p: p.add_argument(
            "--force", action="store_true", help="re-run even if up to date"
        ),
    )
    console_logging(logging.WARNING, "%(levelname)s %(name)s: %(message)s")
    logging.getLogger("regionclip").setLevel(logging.INFO)
    try:
        summary = build_concepts(cfg.concepts, cfg.teacher, device_from_config(cfg.device), force=args.force)
    except (ValueError, FileNotFoundError) as e:
        print(f"concepts: error: {e}", file=sys.stderr)
        return 1
    out = cfg.concepts.out_dir
    if summary.get("skipped_run"):
        print(f"concepts: {out} is up to date ({summary['concepts']} concepts); use --force to re-run")
        return 0
    skipped = sum(summary["skipped"].values())
    recall = summary["category_recall"]
    print(
        f"concepts: {summary['captions_parsed']} captions parsed ({skipped} skipped"
        f"{': ' + str(summary['skipped']) if skipped else ''}), {summary['distinct_concepts']} distinct concepts "
        f"-> {summary['concepts']} in the pool, {summary['captions_per_s']:.0f} captions/s"
        + (f", category recall {recall['recall']}" if recall else "")
        + f"; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
