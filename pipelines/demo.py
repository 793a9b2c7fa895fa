"""`make demo`: the whole pipeline on the generated EmojiWorld, end to end, measured.

    python -m pipelines.demo --config configs/demo.yaml [--seeds 0 1 2] [key=value ...]
    make demo            make demo SEEDS="0 1 2"

Per seed, in order (:mod:`regionclip.demo`): EmojiWorld data, the image-level teacher
(``pretrain.py`` with ``--teacher-config``, default ``<config stem>-teacher.yaml`` beside the
config), RPN, concepts, pseudo-labels (plus the other labelling mode on the first input shard, for
its precision), the student, zero-shot eval of teacher and student, and transfer from each. Every
stage runs in this process through its entry point's ``main`` and skips itself when its outputs
match its config, so a re-run is cheap and an interrupted demo resumes.

``key=value`` overrides reach every stage, except ``pretrain.*`` keys, which go to the student
only; ``--teacher-set key=value`` changes the teacher run. One seed writes to ``output_dir``
(``runs/demo``); several write to ``<output_dir>/seed<N>`` each, share one EmojiWorld, and add
the mean ± std over seeds in ``<output_dir>``. Outputs: ``results.json``, ``RESULTS.md``,
``pseudolabels.png``, ``detections.png``, ``loss_curves.png``. Exit status: 0 done, 1 a stage
or the report failed, 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from regionclip.cli import config_from_argv
from regionclip.config import ConfigError
from regionclip.demo import (
    SeedPlan,
    Stage,
    aggregate,
    build_results,
    draw_loss_curves,
    image_grid,
    plan_seed,
    read_loss_log,
    results_markdown,
    snapshot,
)
from regionclip.utils import atomic_output, atomic_write_json, atomic_write_text

GRID_IMAGES = 16
DETECTION_MIN_SCORE = 0.3
DETECTIONS_PER_IMAGE = 6
CELL = 256


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the config's)")
    parser.add_argument(
        "--teacher-config", metavar="FILE", help="teacher recipe (default: <config stem>-teacher.yaml)"
    )
    parser.add_argument(
        "--teacher-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for the teacher run only (repeatable), e.g. pretrain.max_steps=100",
    )


def split_seeds(argv: Sequence[str]) -> tuple[list[int] | None, list[str]]:
    """Take ``--seeds N [N ...]`` out of ``argv`` (argparse would read a following ``key=value``
    override as one more seed); returns (seeds or None, the other arguments)."""
    seeds: list[int] | None = None
    rest: list[str] = []
    taking = False
    for arg in argv:
        if arg == "--seeds":
            seeds, taking = seeds or [], True
        elif taking and arg.lstrip("-").isdigit():
            seeds.append(int(arg))
        else:
            taking = False
            rest.append(arg)
    return seeds, rest


def run_stage(stage: Stage, index: int, count: int, label: str) -> tuple[int, float, bool]:
    """Run one stage in this process; returns (exit status, seconds, whether it was up to date)."""
    print(f"\n=== demo{label} [{index}/{count}] {stage.name}: {stage.command()}", flush=True)
    before = snapshot(stage.outputs)
    start = time.perf_counter()
    try:
        code = importlib.import_module(stage.module).main(stage.argv)
    except SystemExit as e:  # argparse / config errors of the entry point
        code = e.code if isinstance(e.code, int) else 1
    seconds = time.perf_counter() - start
    gc.collect()  # the stage's models and data go before the next one loads its own
    up_to_date = code == 0 and snapshot(stage.outputs) == before
    state = "failed" if code else ("up to date" if up_to_date else "done")
    print(f"=== demo{label} {stage.name}: {state} in {seconds:.1f} s", flush=True)
    return code, seconds, up_to_date


def pseudolabel_png(plan: SeedPlan, out: Path) -> None:
    """A grid of the training pseudo-labels (pipelines/visualize.py's drawing)."""
    from pipelines.visualize import draw_sample
    from regionclip.pseudolabel import iter_pseudo_labels

    names = Path(plan.files["concept_names"]).read_text(encoding="utf-8").splitlines()
    cells = []
    for sample in iter_pseudo_labels(plan.files["pseudolabels"]):
        cells.append(draw_sample(sample, names, CELL, min_score=0.0, max_boxes=6))
        if len(cells) == GRID_IMAGES:
            break
    _save_png(image_grid(cells), out)


def detections_png(plan: SeedPlan, out: Path) -> None:
    """A grid of val images with the student-initialised detector's detections (score >=
    DETECTION_MIN_SCORE, best DETECTIONS_PER_IMAGE), drawn as pipelines/detect.py draws them."""
    import torch

    from pipelines.detect import draw_detections

    val = json.loads(Path(plan.files["val_json"]).read_text(encoding="utf-8"))
    dets = json.loads(
        (Path(plan.files["transfer_regionclip"]) / "detections.json").read_text(encoding="utf-8")
    )
    cat_index = {c["id"]: k for k, c in enumerate(val["categories"])}
    names = [c["name"] for c in val["categories"]]
    cells = []
    for image in val["images"][:GRID_IMAGES]:
        mine = sorted(
            (d for d in dets if d["image_id"] == image["id"] and d["score"] >= DETECTION_MIN_SCORE),
            key=lambda d: -d["score"],
        )[:DETECTIONS_PER_IMAGE]
        with Image.open(Path(plan.files["image_root"]) / image["file_name"]) as im:
            scale = CELL / max(im.size)
            pic = im.convert("RGB").resize((round(im.width * scale), round(im.height * scale)))
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)]).reshape(
            -1, 4
        )
        cell = Image.new("RGB", (CELL, CELL), (255, 255, 255))
        cell.paste(
            draw_detections(
                pic,
                boxes * scale,
                torch.tensor([d["score"] for d in mine]),
                torch.tensor([cat_index[d["category_id"]] for d in mine]),
                names,
            )
        )
        cells.append(cell)
    _save_png(image_grid(cells), out)


def _save_png(image: Image.Image, out: Path) -> None:
    with atomic_output(out) as tmp:
        image.save(tmp, format="PNG")


def write_seed_report(plan: SeedPlan, seconds: dict[str, float], skipped: list[str]) -> dict:
    results = build_results(plan, seconds, skipped)
    out = plan.out_dir
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "RESULTS.md", results_markdown(results))
    pseudolabel_png(plan, out / "pseudolabels.png")
    detections_png(plan, out / "detections.png")
    panels = []
    for name in ("teacher", "student"):
        log = Path(plan.files[f"{name}_losses"])
        panels.append((f"{name} training losses", read_loss_log(log) if log.is_file() else {}))
    _save_png(draw_loss_curves(panels), out / "loss_curves.png")
    return results


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
    several = len(seeds) > 1
    start = time.perf_counter()
    per_seed, ran, skipped_total = {}, 0, 0
    for seed in seeds:
        label = f" seed {seed}" if several else ""
        try:
            plan = plan_seed(args.config, teacher_config, args.overrides, args.teacher_set, seed, several)
        except (ConfigError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        seconds, skipped = {}, []
        for i, stage in enumerate(plan.stages, 1):
            code, secs, up_to_date = run_stage(stage, i, len(plan.stages), label)
            if code != 0:
                print(
                    f"error: demo stage {stage.name} failed (exit status {code}); fix it and re-run: "
                    "finished stages are skipped",
                    file=sys.stderr,
                )
                return 1
            seconds[stage.name] = round(secs, 2)
            skipped += [stage.name] if up_to_date else []
        ran += len(plan.stages) - len(skipped)
        skipped_total += len(skipped)
        print(f"\n=== demo{label} report -> {plan.out_dir}", flush=True)
        try:
            per_seed[seed] = write_seed_report(plan, seconds, skipped)
        except (ValueError, OSError, KeyError) as e:
            print(f"error: demo report of {plan.out_dir}: {e}", file=sys.stderr)
            return 1
    final = per_seed[seeds[0]]
    out = plan.out_dir
    if several:
        final = aggregate(per_seed)
        out = Path(base_cfg.output_dir)
        atomic_write_json(out / "results.json", final)
        atomic_write_text(out / "RESULTS.md", results_markdown(final))
    print()
    print(results_markdown(final))
    print(
        f"demo: {len(seeds)} seed(s), {ran + skipped_total} stages ({ran} run, {skipped_total} up to date) "
        f"in {time.perf_counter() - start:.1f} s; results in {out / 'results.json'} and {out / 'RESULTS.md'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
