"""`make pseudolabel`: label image–text shards with teacher region concepts, offline and resumable.

    python -m pipelines.pseudolabel --config FILE [key=value ...]
    accelerate launch -m pipelines.pseudolabel --config FILE ...             # GPUs
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m pipelines.pseudolabel --config FILE ...

Writes one shard per input shard into ``pseudolabel.out_dir`` with a ``<stem>.manifest.json``
beside it (:mod:`regionclip.stages.pseudolabel`). Process ``r`` of ``n`` takes input shards ``r, r+n, ...``;
finished shards are skipped on a re-run. Exit status: 0 done, 1 bad input or unreadable input
shards (a re-run retries them), 2 bad config or arguments.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from tqdm import tqdm

from regionclip.cli import stage_setup
from regionclip.stages.pseudolabel import assign_shards, merge_stats, plan_outputs, prepare_run, run_shards


def summary_line(total: dict, seconds: float, world: int, out_dir: str, precision: str) -> str:
    images = total["images"]
    kept, proposed = total["regions_kept"], total["regions_proposed"]
    dropped = ", ".join(f"{k}: {v}" for k, v in sorted(total["dropped"].items())) or "none"
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(total["skipped"].items())) or "none"
    rate = total["images_this_run"] / seconds if seconds > 0 else 0.0
    return (
        f"pseudolabel: {images} images in {total['shards_done'] + total['shards_reused']} shards "
        f"({total['shards_reused']} reused), {proposed} regions proposed, {kept} kept "
        f"({100 * kept / max(proposed, 1):.1f} %), images without regions: {dropped}; "
        f"skipped samples: {skipped}; {rate:.2f} images/s over {world} process(es) in {precision}; output in {out_dir}"
    )


def bar_options(rank: int, world: int) -> dict:
    """One progress line per process (each labels its own shards), rank 0 on top."""
    return {"desc": "pseudolabel" if world == 1 else f"pseudolabel [{rank}/{world}]", "position": rank}


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _, device = stage_setup(argv, "Pseudo-label image-text shards with teacher region concepts.")
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    acc = Accelerator(cpu=device.type == "cpu")
    try:
        plan = plan_outputs(cfg.pseudolabel)
        labeler, identity = prepare_run(
            cfg.pseudolabel, cfg.teacher, cfg.rpn.out_dir, cfg.rpn.precomputed, acc.device
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    mine = assign_shards(plan, acc.process_index, acc.num_processes)
    start = time.perf_counter()
    with tqdm(unit="img", mininterval=1.0, **bar_options(acc.process_index, acc.num_processes)) as bar:
        stats = run_shards(labeler, mine, identity, progress=bar.update)
    part = {**stats.to_dict(), "seconds": time.perf_counter() - start}
    parts = gather_object([part]) if acc.num_processes > 1 else [part]
    if not acc.is_main_process:
        return 0
    seconds = max(p.pop("seconds") for p in parts)  # processes run side by side
    total = merge_stats(parts)
    for line in total["report"]:
        print(line, file=sys.stderr)
    print(summary_line(total, seconds, acc.num_processes, cfg.pseudolabel.out_dir, labeler.precision))
    if total["unreadable_shards"]:
        print(
            f"error: {len(total['unreadable_shards'])} input shard(s) could not be read to the end and "
            f"were not written (a re-run retries them): {', '.join(total['unreadable_shards'][:5])}",
            file=sys.stderr,
        )
        return 1
    if total["shards_busy"]:
        print(
            f"pseudolabel: {total['shards_busy']} shard(s) were being labelled by another process on "
            "the same folder and were left to it; re-run after it ends to reuse or finish them",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
