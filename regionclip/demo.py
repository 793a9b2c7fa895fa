"""`make demo`: the plan of the whole pipeline on EmojiWorld, per seed, and its report.

The plan (:func:`plan_seed`) lists every stage of one seed as an entry point and its argv:

    data -> teacher -> rpn -> concepts -> pseudolabel -> pseudolabel of the other mode (first
    input shard only, for its label precision) -> student -> eval teacher -> eval student ->
    transfer from the teacher (tag clip) -> transfer from the student (tag regionclip)

Every stage after the teacher loads the teacher that the demo trained (``teacher.pretrained`` =
the teacher run's ``final`` folder). ``key=value`` overrides reach every stage, except that
``pretrain.*`` keys go to the student only: the teacher's ``pretrain`` section is its own config
file's (``teacher_overrides`` change it). Each stage skips itself when its outputs match its config.

The report reads the stages' outputs into ``results.json`` (:func:`build_results`), averages
seeds (:func:`aggregate`: mean and sample standard deviation of every figure), and renders
``RESULTS.md`` (:func:`results_markdown`) and the loss curves (:func:`draw_loss_curves`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from regionclip.config import ExperimentConfig, load_config, section_hash

SPLITS = ("all", "base", "novel")
OTHER_MODE = {"pool": "caption", "caption": "pool"}
# results.json figures that are fractions in [0, 1] (shown as %)
FRACTION_PREFIXES = ("region_acc.", "ovd_ap50.", "pseudolabel.precision", "concepts.category_recall")


@dataclass
class Stage:
    """One entry point call: ``importlib.import_module(module).main(argv)``."""

    name: str
    module: str
    argv: list[str]
    outputs: list[str]  # files/folders it writes: unchanged after the call = it was up to date

    def command(self) -> str:
        prog = f"python {self.module}.py" if self.module == "pretrain" else f"python -m {self.module}"
        return " ".join([prog, *self.argv])


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
) -> SeedPlan:
    """Every stage of one seed, in order, with the argv each entry point gets.

    Raises:
        ConfigError: a config file or override is invalid.
        ValueError: the pseudo-label input shards name nothing.
    """
    from regionclip.pseudolabel import plan_outputs

    base_cfg = load_config(config, list(overrides))
    common = [o for o in overrides if not o.strip().startswith("pretrain.")]
    per_seed = seed_overrides(base_cfg, seed, several)
    teacher_ov = [*common, *per_seed, *teacher_overrides]
    tcfg = load_config(teacher_config, teacher_ov)
    teacher_final = str(Path(tcfg.pretrain.out_dir) / "final")
    ov = [*overrides, *per_seed, f"teacher.pretrained={teacher_final}"]
    cfg = load_config(config, ov)
    student_final = str(Path(cfg.pretrain.out_dir) / "final")
    other = OTHER_MODE.get(cfg.pseudolabel.mode)
    if other is None:
        raise ValueError(f"pseudolabel.mode={cfg.pseudolabel.mode!r}: expected one of {sorted(OTHER_MODE)}")
    first_shard = plan_outputs(cfg.pseudolabel)[0][0]
    other_ov = [
        f"pseudolabel.mode={other}",
        f"pseudolabel.input_shards={first_shard}",
        f"pseudolabel.out_dir={Path(cfg.output_dir) / f'pseudolabels-{other}-first-shard'}",
    ]
    evals = {"teacher": [], "student": [f"eval.model.pretrained={student_final}"]}
    transfers = {"clip": [], "regionclip": [f"transfer.init.pretrained={student_final}"]}

    def args(cfg_file: str, extra: list[str]) -> list[str]:
        return ["--config", cfg_file, *extra]

    stages = [
        Stage("data", "data_prep.emojiworld", args(config, ov), [cfg.emojiworld.out_dir]),
        Stage("teacher", "pretrain", args(teacher_config, teacher_ov), [tcfg.pretrain.out_dir]),
        Stage("rpn", "pipelines.rpn", args(config, ov), [cfg.rpn.out_dir]),
        Stage("concepts", "pipelines.concepts", args(config, ov), [cfg.concepts.out_dir]),
        Stage("pseudolabel", "pipelines.pseudolabel", args(config, ov), [cfg.pseudolabel.out_dir]),
    ]
    other_cfg = load_config(config, [*ov, *other_ov])
    stages.append(
        Stage(
            f"pseudolabel_{other}",
            "pipelines.pseudolabel",
            args(config, [*ov, *other_ov]),
            [other_cfg.pseudolabel.out_dir],
        )
    )
    stages.append(Stage("student", "pretrain", args(config, ov), [cfg.pretrain.out_dir]))
    files: dict[str, Any] = {}
    for tag, extra in evals.items():
        stage_ov = [*ov, *extra, f"eval.tag={tag}"]
        out = Path(load_config(config, stage_ov).eval.out_dir)
        files[f"eval_{tag}"] = str(out / f"{tag}.json")
        outputs = [files[f"eval_{tag}"], str(out / f"{tag}.detections.json")]
        stages.append(Stage(f"eval_{tag}", "pipelines.eval", args(config, stage_ov), outputs))
    for tag, extra in transfers.items():
        stage_ov = [*ov, *extra, f"transfer.tag={tag}"]
        out = load_config(config, stage_ov).transfer.out_dir
        files[f"transfer_{tag}"] = out
        stages.append(Stage(f"transfer_{tag}", "pipelines.transfer", args(config, stage_ov), [out]))
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
        val_json=cfg.data.val_json,
        image_root=cfg.data.image_root,
    )
    return SeedPlan(seed, Path(cfg.output_dir), cfg, stages, files)


def snapshot(paths: Sequence[str | os.PathLike]) -> dict[str, tuple[int, int]]:
    """``{file: (size, mtime_ns)}`` of every file in ``paths`` (files or folders, missing = none)."""
    found: dict[str, tuple[int, int]] = {}
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            found[str(f)] = (st.st_size, st.st_mtime_ns)
    return found


# --------------------------------------------------------------------------------------------
# Results of one seed
# --------------------------------------------------------------------------------------------


def _read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror} (did its stage run?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None


def region_top1(eval_report: dict[str, Any]) -> dict[str, float | None]:
    """``{split: top-1}`` of an eval report (``pipelines.eval``'s ``<tag>.json``)."""
    acc = eval_report["region_accuracy"]
    return {s: acc.get(s, {}).get("top1") for s in SPLITS}


def transfer_ap50(metrics: dict[str, Any]) -> dict[str, float | None]:
    """``{split: AP50}`` of a transfer run's ``metrics.json``."""
    return {s: metrics.get(f"AP50_{s}") for s in SPLITS}


def difference(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, float | None]:
    """``b - a`` per split; None where either is missing."""
    return {s: b[s] - a[s] if _is_number(a.get(s)) and _is_number(b.get(s)) else None for s in SPLITS}


def build_results(plan: SeedPlan, seconds: dict[str, float], skipped: Sequence[str]) -> dict[str, Any]:
    """``results.json`` of one seed from its stages' outputs; label precision is measured here.

    ``seconds`` is the wall time per stage name (``total`` is added); ``skipped`` names the stages
    that found their outputs up to date.
    """
    from regionclip.pseudolabel import label_precision

    f = plan.files
    names = Path(f["concept_names"]).read_text(encoding="utf-8").splitlines()
    mode, other = f["mode"], f["other_mode"]
    trained = label_precision(f["pseudolabels"], names)
    trained_first = label_precision(f["pseudolabels"][:1], names)
    other_first = label_precision(f["other_pseudolabels"], names)
    recall = _read_json(f["concepts_summary"]).get("category_recall") or {}
    region = {
        "teacher": region_top1(_read_json(f["eval_teacher"])),
        "student": region_top1(_read_json(f["eval_student"])),
    }
    ap50 = {
        "clip_init": transfer_ap50(_read_json(Path(f["transfer_clip"]) / "metrics.json")),
        "regionclip_init": transfer_ap50(_read_json(Path(f["transfer_regionclip"]) / "metrics.json")),
    }
    return {
        "config": {
            "name": plan.cfg.name,
            "file": f["config"],
            "teacher_file": f["teacher_config"],
            "hash": section_hash(plan.cfg),
        },
        "seed": plan.seed,
        "region_acc": {**region, "student_minus_teacher": difference(region["teacher"], region["student"])},
        "ovd_ap50": {
            **ap50,
            "regionclip_minus_clip": difference(ap50["clip_init"], ap50["regionclip_init"]),
        },
        "pseudolabel": {
            "precision": {mode: trained["precision"], other: other_first["precision"]},
            "precision_first_shard": {mode: trained_first["precision"], other: other_first["precision"]},
            "regions_kept": {mode: trained["kept"], other: other_first["kept"]},
            "trained_on": mode,
            "scope": {
                mode: f"the training labels: {len(f['pseudolabels'])} shards, {trained['images']} images",
                other: f"a separate labelling run on the first input shard only: {other_first['images']} images",
            },
        },
        "concepts": {"category_recall": recall.get("recall")},
        "seconds_per_stage": {**seconds, "total": sum(seconds.values())},
        "skipped_stages": list(skipped),
    }


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Results over seeds: every number that all seeds report becomes its mean (same key as in one
    seed's results), with the sample standard deviation under ``std`` and each seed's results
    under ``per_seed``. ``seed`` itself becomes ``seeds``."""
    seeds = sorted(per_seed)
    flats = [flatten(per_seed[s]) for s in seeds]
    means: dict[str, Any] = {}
    stds: dict[str, float] = {}
    for key, first in flats[0].items():
        if key == "seed":
            continue
        values = [f.get(key) for f in flats]
        if all(_is_number(v) for v in values):
            means[key], stds[key] = mean_std(values)
        elif all(v == first for v in values):
            means[key] = first
    means["skipped_stages"] = sorted({s for f in flats for s in f.get("skipped_stages", [])})
    return {
        **unflatten(means),
        "seeds": seeds,
        "std": unflatten(stds),
        "per_seed": {str(s): per_seed[s] for s in seeds},
    }


# --------------------------------------------------------------------------------------------
# RESULTS.md
# --------------------------------------------------------------------------------------------


def _cell(flat: dict[str, Any], std: dict[str, Any], key: str) -> str:
    """``12.3`` or ``12.3 ± 0.4``; fractions (and their differences) in %, seconds as they are."""
    value = flat.get(key)
    if not _is_number(value):
        return "n/a"
    scale = 100.0 if key.startswith(FRACTION_PREFIXES) else 1.0
    text = f"{scale * value:.1f}"
    if _is_number(std.get(key)):
        text += f" ± {scale * std[key]:.1f}"
    return text


def results_markdown(results: dict[str, Any]) -> str:
    """RESULTS.md of one seed's results or of :func:`aggregate`'s (mean ± std, then per seed)."""
    flat = flatten({k: v for k, v in results.items() if k not in ("std", "per_seed")})
    std = flatten(results.get("std", {}))
    several = "per_seed" in results
    seeds = results.get("seeds", [results.get("seed")])
    cfg = results.get("config", {})
    lines = [
        f"# Demo results: {cfg.get('name', '?')}",
        "",
        f"Config `{cfg.get('file', '?')}` (teacher `{cfg.get('teacher_file', '?')}`), seed"
        + (f"s {', '.join(map(str, seeds))}: mean ± sample std over seeds" if several else f" {seeds[0]}")
        + ". Fractions in %.",
        "",
        "| figure | all | base | novel |",
        "|---|---|---|---|",
    ]
    rows = [
        ("region top-1, teacher", "region_acc.teacher"),
        ("region top-1, student", "region_acc.student"),
        ("student − teacher (points)", "region_acc.student_minus_teacher"),
        ("OVD AP50, teacher init (CLIP)", "ovd_ap50.clip_init"),
        ("OVD AP50, student init (RegionCLIP)", "ovd_ap50.regionclip_init"),
        ("RegionCLIP − CLIP (points)", "ovd_ap50.regionclip_minus_clip"),
    ]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(flat, std, f"{key}.{s}") for s in SPLITS) + " |")
    lines += ["", "| pseudo-labels and concepts | value |", "|---|---|"]
    pl = results.get("pseudolabel", {})
    trained = pl.get("trained_on", "pool")
    for mode in (trained, OTHER_MODE.get(trained, "caption")):
        scope = pl.get("scope", {}).get(mode, "")
        lines.append(
            f"| label precision, {mode} mode ({scope}) | {_cell(flat, std, f'pseudolabel.precision.{mode}')} |"
        )
    lines.append(
        f"| label precision, {trained} mode, first input shard only (the images of the {OTHER_MODE.get(trained)} row) | "
        f"{_cell(flat, std, f'pseudolabel.precision_first_shard.{trained}')} |"
    )
    lines.append(
        f"| concept pool recall of category names | {_cell(flat, std, 'concepts.category_recall')} |"
    )
    lines += ["", "| stage | seconds |", "|---|---|"]
    stage_keys = [k for k in flat if k.startswith("seconds_per_stage.")]
    for key in stage_keys:
        lines.append(f"| {key.split('.', 1)[1]} | {_cell(flat, std, key)} |")
    skipped = results.get("skipped_stages", [])
    lines += ["", f"Stages found up to date (skipped): {', '.join(skipped) if skipped else 'none'}."]
    if several:
        per = {int(s): flatten(r) for s, r in results["per_seed"].items()}
        keys = [k for k in flatten(results["per_seed"][str(seeds[0])]) if k.startswith(FRACTION_PREFIXES)]
        keys.append("seconds_per_stage.total")
        lines += [
            "",
            "## Per seed",
            "",
            "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---|" + "---|" * len(seeds),
        ]
        for key in keys:
            lines.append(f"| {key} | " + " | ".join(_cell(per[s], {}, key) for s in seeds) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------

CURVE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
LOSS_TERMS = ("loss", "image_text", "distill", "contrastive")


def read_loss_log(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{term: [(step, value), ...]}`` of a ``losses.jsonl`` written by the training loop, sorted
    by step; a step logged twice (a resume re-runs the steps after its checkpoint) keeps its last
    line. Unparsable lines (a killed run's last, half-written one) are ignored."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            by_step[int(rec["step"])] = rec
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    series: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for term in LOSS_TERMS:
            value = by_step[step].get(term)
            if _is_number(value):
                series.setdefault(term, []).append((step, float(value)))
    return series


def _panel(title: str, series: dict[str, list[tuple[int, float]]], size: tuple[int, int]) -> Image.Image:
    w, h = size
    left, right, top, bottom = 56, 12, 24, 30
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 5), title, fill=(0, 0, 0), font=font)
    points = [pt for s in series.values() for pt in s]
    x0, y0, x1, y1 = left, top, w - right, h - bottom
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    if not points:
        draw.text((x0 + 8, y0 + 8), "no losses logged", fill=(0, 0, 0), font=font)
        return img
    smin, smax = min(p[0] for p in points), max(p[0] for p in points)
    vmin, vmax = min(p[1] for p in points), max(p[1] for p in points)
    smax, vmax = (smax if smax > smin else smin + 1), (vmax if vmax > vmin else vmin + 1)

    def xy(step: int, value: float) -> tuple[float, float]:
        return (
            x0 + (x1 - x0) * (step - smin) / (smax - smin),
            y1 - (y1 - y0) * (value - vmin) / (vmax - vmin),
        )

    for k, (term, pts) in enumerate(series.items()):
        colour = CURVE_COLOURS[k % len(CURVE_COLOURS)]
        coords = [xy(s, v) for s, v in pts]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        else:
            cx, cy = coords[0]
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
        draw.text((x1 - 90, y0 + 4 + 12 * k), term, fill=colour, font=font)
    draw.text((4, y0 - 4), f"{vmax:.3g}", fill=(0, 0, 0), font=font)
    draw.text((4, y1 - 8), f"{vmin:.3g}", fill=(0, 0, 0), font=font)
    draw.text((x0, y1 + 4), f"step {smin}", fill=(0, 0, 0), font=font)
    draw.text((x1 - 60, y1 + 4), f"step {smax}", fill=(0, 0, 0), font=font)
    return img


def draw_loss_curves(
    panels: Sequence[tuple[str, dict[str, list[tuple[int, float]]]]], size: tuple[int, int] = (480, 300)
) -> Image.Image:
    """One panel per training run (title, :func:`read_loss_log` series) side by side; each panel
    has its own axes (the teacher's and the student's losses have different scales)."""
    cells = [_panel(title, series, size) for title, series in panels]
    return image_grid(cells, cols=len(cells))


def image_grid(cells: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Cells (the size of the first) in rows of ``cols`` (default: a square-ish grid), white gaps."""
    if not cells:
        raise ValueError("no images for the grid")
    cols = cols or math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / cols)
    cw, ch = cells[0].size
    grid = Image.new("RGB", (cols * cw, rows * ch), (255, 255, 255))
    for i, cell in enumerate(cells):
        grid.paste(cell, ((i % cols) * cw, (i // cols) * ch))
    return grid
