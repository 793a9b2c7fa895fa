"""`make demo`: the plan of the whole pipeline on EmojiWorld, per seed, and its run.

The plan (:func:`plan_seed`) lists every stage of one seed as an entry-point call:

    data -> teacher -> rpn -> concepts -> pseudolabel -> pseudolabel of the other mode(s) (first
    input shard only, for their label precision) -> student -> control -> eval of teacher, control
    and student -> transfer from the teacher (tag clip), the control (tag control) and the student
    (tag regionclip)

The control is the student's exact recipe (same init, images, steps, optimiser, freezing) with the
image–text loss alone (``pretrain.mode=image_text`` on the pseudo-label stage's input shards): the
student's gain over it is what region supervision adds, not what more training adds.

Every stage after the teacher loads the teacher that the demo trained (``teacher.pretrained`` =
the teacher run's ``final`` folder). ``key=value`` overrides reach every stage, except that
``pretrain.*`` keys go to the student only: the teacher's ``pretrain`` section is its own config
file's (``teacher_overrides`` change it). Each stage skips itself when its outputs match its config
(:func:`run_stage` tells from the outputs' sizes and times). The entry points themselves are given
by the caller (``pipelines.demo``), so the library names no entry-point module.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regionclip.config import ExperimentConfig, TransferConfig, load_config
from regionclip.labeling.modes import check_mode, other_mode
from regionclip.stages.demo_report import aggregate, results_markdown, write_seed_report
from regionclip.stages.pseudolabel import plan_outputs
from regionclip.utils import atomic_write_json, atomic_write_text

# the entry points a plan calls (``pipelines.demo`` maps each to its ``main``)
ENTRIES = ("data", "pretrain", "rpn", "concepts", "pseudolabel", "eval", "transfer")
# and, for the Detectron2 route, these two (only when Detectron2 is importable)
DETECTRON2_ENTRIES = ("export_detectron2", "detectron2_train")
# the dataset names the Detectron2 stage registers its jsons under
DETECTRON2_TRAIN_SET, DETECTRON2_VAL_SET = "demo_det_train", "demo_val"


@dataclass
class Stage:
    """One entry-point call: the entry point named ``entry`` (see :data:`ENTRIES`) with ``argv``."""

    name: str
    entry: str
    argv: list[str]
    outputs: list[str]  # files/folders it writes: unchanged after the call = it was up to date


@dataclass
class SeedPlan:
    """The stages of one seed and the files its report reads."""

    seed: int
    out_dir: Path
    cfg: ExperimentConfig  # the config of the stages after the teacher
    stages: list[Stage]
    files: dict[str, Any] = field(default_factory=dict)


def seed_dir(base: str | Path, seed: int, several: bool) -> Path:
    """One seed runs in ``base``; several run in ``base/seed<N>`` each."""
    return Path(base) / f"seed{seed}" if several else Path(base)


def seed_overrides(base_cfg: ExperimentConfig, seed: int, several: bool) -> list[str]:
    """``seed=N``, and with several seeds their own output dir around one shared EmojiWorld."""
    if not several:
        return [f"seed={seed}"]
    out = seed_dir(base_cfg.output_dir, seed, True)
    return [f"seed={seed}", f"output_dir={out}", f"emojiworld.out_dir={base_cfg.emojiworld.out_dir}"]


def plan_seed(
    config: str,
    teacher_config: str,
    overrides: Sequence[str],
    teacher_overrides: Sequence[str],
    seed: int,
    several: bool,
    detectron2: bool = False,
) -> SeedPlan:
    """Every stage of one seed, in order, with the argv each entry point gets; ``detectron2``:
    add the Detectron2 transfer of the student (when ``transfer.detectron2_config`` names one).

    Raises:
        ConfigError: a config file or override is invalid.
        ValueError: the pseudo-label input shards name nothing.
    """
    base_cfg = load_config(config, list(overrides))
    common = [o for o in overrides if not o.strip().startswith("pretrain.")]
    per_seed = seed_overrides(base_cfg, seed, several)
    teacher_ov = [*common, *per_seed, *teacher_overrides]
    tcfg = load_config(teacher_config, teacher_ov)
    teacher_final = str(Path(tcfg.pretrain.out_dir) / "final")
    ov = [*overrides, *per_seed, f"teacher.pretrained={teacher_final}"]
    cfg = load_config(config, ov)
    student_final = str(Path(cfg.pretrain.out_dir) / "final")
    control_ov = [
        *ov,
        "pretrain.mode=image_text",
        f"pretrain.shards={cfg.pseudolabel.input_shards}",
        f"pretrain.out_dir={Path(cfg.output_dir) / 'control'}",
    ]
    control_cfg = load_config(config, control_ov)
    control_final = str(Path(control_cfg.pretrain.out_dir) / "final")
    check_mode(cfg.pseudolabel.mode)
    other = other_mode(cfg.pseudolabel.mode)
    first_shard = plan_outputs(cfg.pseudolabel)[0][0]
    other_ov = [
        f"pseudolabel.mode={other}",
        f"pseudolabel.input_shards={first_shard}",
        f"pseudolabel.out_dir={Path(cfg.output_dir) / f'pseudolabels-{other}-first-shard'}",
    ]
    evals = {
        "teacher": [],
        "control": [f"eval.model.pretrained={control_final}"],
        "student": [f"eval.model.pretrained={student_final}"],
    }
    transfers = {
        "clip": [],
        "control": [f"transfer.init.pretrained={control_final}"],
        "regionclip": [f"transfer.init.pretrained={student_final}"],
    }

    def args(cfg_file: str, extra: list[str]) -> list[str]:
        return ["--config", cfg_file, *extra]

    stages = [
        Stage("data", "data", args(config, ov), [cfg.emojiworld.out_dir]),
        Stage("teacher", "pretrain", args(teacher_config, teacher_ov), [tcfg.pretrain.out_dir]),
        Stage("rpn", "rpn", args(config, ov), [cfg.rpn.out_dir]),
        Stage("concepts", "concepts", args(config, ov), [cfg.concepts.out_dir]),
        Stage("pseudolabel", "pseudolabel", args(config, ov), [cfg.pseudolabel.out_dir]),
    ]
    other_cfg = load_config(config, [*ov, *other_ov])
    stages.append(
        Stage(
            f"pseudolabel_{other}",
            "pseudolabel",
            args(config, [*ov, *other_ov]),
            [other_cfg.pseudolabel.out_dir],
        )
    )
    stages.append(Stage("student", "pretrain", args(config, ov), [cfg.pretrain.out_dir]))
    stages.append(Stage("control", "pretrain", args(config, control_ov), [control_cfg.pretrain.out_dir]))
    files: dict[str, Any] = {}
    for tag, extra in evals.items():
        stage_ov = [*ov, *extra, f"eval.tag={tag}"]
        out = Path(load_config(config, stage_ov).eval.out_dir)
        files[f"eval_{tag}"] = str(out / f"{tag}.json")
        outputs = [files[f"eval_{tag}"], str(out / f"{tag}.detections.json")]
        stages.append(Stage(f"eval_{tag}", "eval", args(config, stage_ov), outputs))
    for tag, extra in transfers.items():
        stage_ov = [*ov, *extra, f"transfer.tag={tag}"]
        out = load_config(config, stage_ov).transfer.out_dir
        files[f"transfer_{tag}"] = out
        stages.append(Stage(f"transfer_{tag}", "transfer", args(config, stage_ov), [out]))
    if detectron2 and cfg.transfer.detectron2_config:
        stages += detectron2_stages(cfg, student_final, seed, files)
    files.update(
        config=config,
        teacher_config=teacher_config,
        mode=cfg.pseudolabel.mode,
        other_mode=other,
        pseudolabels=[str(p) for _, p in plan_outputs(cfg.pseudolabel)],
        other_pseudolabels=[str(p) for _, p in plan_outputs(other_cfg.pseudolabel)],
        concept_names=str(Path(cfg.pseudolabel.concepts).with_suffix(".txt")),
        concepts_summary=str(Path(cfg.concepts.out_dir) / "summary.json"),
        teacher_losses=str(Path(tcfg.pretrain.out_dir) / "losses.jsonl"),
        student_losses=str(Path(cfg.pretrain.out_dir) / "losses.jsonl"),
        control_losses=str(Path(control_cfg.pretrain.out_dir) / "losses.jsonl"),
        val_json=cfg.data.val_json,
        image_root=cfg.data.image_root,
    )
    return SeedPlan(seed, Path(cfg.output_dir), cfg, stages, files)


def detectron2_recipe(t: TransferConfig) -> dict[str, str]:
    """``transfer``'s training and test recipe as Detectron2 config options (KEY: VALUE text), so
    both routes train the same way; ``MODEL.ROI_HEADS.NUM_CLASSES`` 0 takes the train json's count."""
    recipe = {
        "MODEL.BACKBONE.FREEZE_AT": t.freeze_at,
        "MODEL.CLIP.MAX_PROPOSALS": t.max_proposals,
        "MODEL.CLIP.MULTIPLY_RPN_SCORE": t.multiply_rpn_score,
        "MODEL.CLIP.CLSS_TEMP": t.temperature,
        "MODEL.CLIP.BG_CLS_LOSS_WEIGHT": t.bg_weight,
        "MODEL.CLIP.FOCAL_SCALED_LOSS": t.focal_gamma,
        "MODEL.ROI_HEADS.NUM_CLASSES": 0,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": t.batch_size_per_image,
        "MODEL.ROI_HEADS.POSITIVE_FRACTION": t.positive_fraction,
        "MODEL.ROI_HEADS.IOU_THRESHOLDS": [t.fg_iou_thresh],
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": t.score_thresh,
        "MODEL.ROI_HEADS.NMS_THRESH_TEST": t.nms_thresh,
        "TEST.DETECTIONS_PER_IMAGE": t.detections_per_image,
        "INPUT.MIN_SIZE_TRAIN": tuple(t.train_short_sides),
        "INPUT.MAX_SIZE_TRAIN": t.max_side,
        "INPUT.MIN_SIZE_TEST": t.test_short_side,
        "INPUT.MAX_SIZE_TEST": t.max_side,
        "INPUT.RANDOM_FLIP": "horizontal" if t.hflip_prob > 0 else "none",  # Detectron2 flips at p = 0.5
        "SOLVER.IMS_PER_BATCH": t.batch_size,
        "SOLVER.BASE_LR": t.lr,
        "SOLVER.MOMENTUM": t.momentum,
        "SOLVER.WEIGHT_DECAY": t.weight_decay,
        "SOLVER.MAX_ITER": t.steps,
        "SOLVER.WARMUP_ITERS": t.warmup_steps,
        # Detectron2 needs increasing milestones: two decays on one step (a toy run) become one
        "SOLVER.STEPS": tuple(sorted({int(t.steps * f) for f in t.lr_decay_at} - {0})),
        "SOLVER.GAMMA": t.lr_decay_factor,
        "DATALOADER.NUM_WORKERS": t.num_workers,
    }
    if t.pooler_resolution > 0:
        recipe["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION"] = t.pooler_resolution
    return {k: v if isinstance(v, str) else repr(v) for k, v in recipe.items()}


def detectron2_stages(
    cfg: ExperimentConfig, student_final: str, seed: int, files: dict[str, Any]
) -> list[Stage]:
    """The student exported for Detectron2, then Detectron2's transfer of it: the architecture of
    ``transfer.detectron2_config``, this config's ``transfer`` recipe and paths; ``files["detectron2_metrics"]`` is where
    its val metrics land."""
    t = cfg.transfer
    d2 = Path(cfg.output_dir) / "detectron2"
    weights = d2 / "student.pth"
    exported = [
        str(weights),
        str(d2 / "student.open_clip.json"),
        str(d2 / "student.class_embeddings.safetensors"),
    ]
    out = d2 / "regionclip"
    datasets = [
        [DETECTRON2_TRAIN_SET, t.train_json, t.image_root],
        [DETECTRON2_VAL_SET, t.val_json, t.image_root],
    ]
    opts = {
        **detectron2_recipe(t),
        "MODEL.WEIGHTS": str(weights),
        "MODEL.CLIP.OPENCLIP_MODEL": cfg.teacher.model,
        "MODEL.CLIP.OPENCLIP_MODEL_CONFIG": exported[1],
        "MODEL.CLIP.TEXT_EMB_PATH": exported[2],
        "MODEL.CLIP.RPN_DIR": t.rpn_dir,
        "DATASETS.REGISTER_COCO": repr(datasets),
        "DATASETS.TRAIN": repr((DETECTRON2_TRAIN_SET,)),
        "DATASETS.TEST": repr((DETECTRON2_VAL_SET,)),
        "OUTPUT_DIR": str(out),
        "SEED": str(seed),
    }
    train_argv = ["--config-file", t.detectron2_config, "--resume"]
    for key, value in opts.items():
        train_argv += [key, value]
    files["detectron2_metrics"] = str(out / "inference" / DETECTRON2_VAL_SET / "metrics.json")
    export_argv = ["--student", student_final, "--out", str(weights), "--class-json", t.val_json]
    return [
        Stage("detectron2_export", "export_detectron2", export_argv, exported),
        Stage("detectron2_regionclip", "detectron2_train", train_argv, [str(out)]),
    ]


def snapshot(paths: Sequence[str | os.PathLike]) -> dict[str, tuple[int, int]]:
    """``{file: (size, mtime_ns)}`` of every file in ``paths`` (files or folders, missing = none)."""
    found: dict[str, tuple[int, int]] = {}
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            found[str(f)] = (st.st_size, st.st_mtime_ns)
    return found


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


EntryPoint = Callable[[list[str]], int]


def run_stage(
    stage: Stage, main: EntryPoint, command: str, index: int, count: int, label: str
) -> tuple[int, float, bool]:
    """Run one stage in this process; returns (exit status, seconds, whether it was up to date)."""
    print(f"\n=== demo{label} [{index}/{count}] {stage.name}: {command}", flush=True)
    before = snapshot(stage.outputs)
    start = time.perf_counter()
    try:
        code = main(stage.argv)
    except SystemExit as e:  # argparse / config errors of the entry point
        code = e.code if isinstance(e.code, int) else 1
    seconds = time.perf_counter() - start
    gc.collect()  # the stage's models and data go before the next one loads its own
    up_to_date = code == 0 and snapshot(stage.outputs) == before
    state = "failed" if code else ("up to date" if up_to_date else "done")
    print(f"=== demo{label} {stage.name}: {state} in {seconds:.1f} s", flush=True)
    return code, seconds, up_to_date


def run_seed(
    plan: SeedPlan, entries: dict[str, tuple[EntryPoint, str]], label: str = ""
) -> tuple[dict[str, float], list[str]] | None:
    """Every stage of ``plan`` in order, ``entries[stage.entry]`` = (main, command prefix); returns
    the seconds per stage and the stages that were up to date, or None after a failed stage."""
    seconds, skipped = {}, []
    for i, stage in enumerate(plan.stages, 1):
        main, prog = entries[stage.entry]
        code, secs, up_to_date = run_stage(
            stage, main, " ".join([prog, *stage.argv]), i, len(plan.stages), label
        )
        if code != 0:
            print(f"error: demo stage {stage.name} failed (exit status {code}); fix it and re-run: "
                  "finished stages are skipped")  # fmt: skip
            return None
        seconds[stage.name] = round(secs, 2)
        skipped += [stage.name] if up_to_date else []
    return seconds, skipped


def run_demo(
    config: str,
    teacher_config: str,
    overrides: Sequence[str],
    teacher_overrides: Sequence[str],
    seeds: Sequence[int],
    entries: dict[str, tuple[EntryPoint, str]],
) -> int:
    """Every seed's stages and report; with several seeds the mean ± std in ``output_dir``.
    Returns the exit status (1 when a stage or a report failed)."""
    several = len(seeds) > 1
    start = time.perf_counter()
    per_seed, ran, skipped_total = {}, 0, 0
    for seed in seeds:
        label = f" seed {seed}" if several else ""
        plan = plan_seed(
            config, teacher_config, overrides, teacher_overrides, seed, several,
            detectron2=all(e in entries for e in DETECTRON2_ENTRIES),
        )  # fmt: skip
        outcome = run_seed(plan, entries, label)
        if outcome is None:
            return 1
        seconds, skipped = outcome
        ran += len(plan.stages) - len(skipped)
        skipped_total += len(skipped)
        print(f"\n=== demo{label} report -> {plan.out_dir}", flush=True)
        try:
            per_seed[seed] = write_seed_report(plan, seconds, skipped)
        except (ValueError, OSError, KeyError) as e:
            print(f"error: demo report of {plan.out_dir}: {e}")
            return 1
    final, out = per_seed[seeds[0]], plan.out_dir
    if several:
        final, out = aggregate(per_seed), Path(load_config(config, list(overrides)).output_dir)
        atomic_write_json(out / "results.json", final)
        atomic_write_text(out / "RESULTS.md", results_markdown(final))
    print()
    print(results_markdown(final))
    print(
        f"demo: {len(seeds)} seed(s), {ran + skipped_total} stages ({ran} run, {skipped_total} up to date) "
        f"in {time.perf_counter() - start:.1f} s; results in {out / 'results.json'} and {out / 'RESULTS.md'}"
    )
    return 0
