"""The demo's report: ``results.json`` of a seed (:func:`build_results`), the mean ± std over seeds
(:func:`aggregate`), ``RESULTS.md`` (:func:`results_markdown`) and the three pictures."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from regionclip.config import section_hash
from regionclip.data.coco import read_coco
from regionclip.data.images import load_rgb
from regionclip.data.pseudo_labels import iter_pseudo_labels
from regionclip.evaluation.label_precision import label_precision
from regionclip.evaluation.thresholds import OperatingPoint, best_f1_threshold
from regionclip.labeling.modes import other_mode
from regionclip.utils import atomic_write_json, atomic_write_text
from regionclip.viz import draw_detections, draw_loss_curves, draw_pseudo_labels, image_grid, save_png

if TYPE_CHECKING:
    from regionclip.stages.demo import SeedPlan

SPLITS = ("all", "base", "novel")
# results.json figures that are fractions in [0, 1] (shown as %)
FRACTION_PREFIXES = (
    "region_acc.",
    "ovd_ap50.",
    "ovd_ap50_gt_boxes.",
    "zero_shot_ap50.",
    "pseudolabel.precision",
    "concepts.category_recall",
    "detections_picture.precision",
    "detections_picture.recall",
    "detections_picture.f1",
)
MODELS = ("teacher", "control", "student")
LOSS_TERMS = ("loss", "image_text", "distill", "contrastive")
GRID_IMAGES = 16
DETECTIONS_PER_IMAGE = 6
CELL = 256


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


def zero_shot_ap50(eval_report: dict[str, Any]) -> dict[str, float | None]:
    """``{split: AP50}`` of an eval report's detection on RPN boxes (None without ``eval.rpn``)."""
    detection = eval_report.get("zero_shot_detection") or {}
    return {s: detection.get("AP50", {}).get(s) for s in SPLITS}


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
    f = plan.files
    names = Path(f["concept_names"]).read_text(encoding="utf-8").splitlines()
    mode, other = f["mode"], f["other_mode"]
    trained = label_precision(f["pseudolabels"], names)
    trained_first = label_precision(f["pseudolabels"][:1], names)
    other_first = label_precision(f["other_pseudolabels"], names)
    recall = _read_json(f["concepts_summary"]).get("category_recall") or {}
    evals = {m: _read_json(f[f"eval_{m}"]) for m in MODELS}
    region = {m: region_top1(evals[m]) for m in MODELS}
    zero_shot = {m: zero_shot_ap50(evals[m]) for m in MODELS}
    metrics = {
        f"{tag}_init": _read_json(Path(f[f"transfer_{tag}"]) / "metrics.json")
        for tag in ("clip", "control", "regionclip")
    }
    ap50 = {init: transfer_ap50(m) for init, m in metrics.items()}
    # the same student through Detectron2 (absent when the plan had no Detectron2 stage)
    d2 = f.get("detectron2_metrics")
    ap50["detectron2_student_init"] = transfer_ap50(_read_json(d2) if d2 else {})
    # the same detectors with the val boxes as proposals (transfer.diagnose_gt_boxes): recognition alone
    gt_boxes_ap50 = {init: transfer_ap50(m.get("gt_boxes", {})) for init, m in metrics.items()}
    return {
        "config": {
            "name": plan.cfg.name,
            "file": f["config"],
            "teacher_file": f["teacher_config"],
            "hash": section_hash(plan.cfg),
        },
        "seed": plan.seed,
        "region_acc": {
            **region,
            "student_minus_teacher": difference(region["teacher"], region["student"]),
            "student_minus_control": difference(region["control"], region["student"]),
        },
        "zero_shot_ap50": {
            **zero_shot,
            "student_minus_teacher": difference(zero_shot["teacher"], zero_shot["student"]),
            "student_minus_control": difference(zero_shot["control"], zero_shot["student"]),
        },
        "ovd_ap50": {
            **ap50,
            "regionclip_minus_clip": difference(ap50["clip_init"], ap50["regionclip_init"]),
            "regionclip_minus_control": difference(ap50["control_init"], ap50["regionclip_init"]),
        },
        "ovd_ap50_gt_boxes": gt_boxes_ap50,
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
        ("region top-1, control (image–text loss only)", "region_acc.control"),
        ("region top-1, student", "region_acc.student"),
        ("student − teacher (points)", "region_acc.student_minus_teacher"),
        ("student − control (points)", "region_acc.student_minus_control"),
        ("zero-shot AP50 on RPN boxes, teacher", "zero_shot_ap50.teacher"),
        ("zero-shot AP50 on RPN boxes, control", "zero_shot_ap50.control"),
        ("zero-shot AP50 on RPN boxes, student", "zero_shot_ap50.student"),
        ("zero-shot student − control (points)", "zero_shot_ap50.student_minus_control"),
        ("OVD AP50, teacher init (CLIP)", "ovd_ap50.clip_init"),
        ("OVD AP50, control init", "ovd_ap50.control_init"),
        ("OVD AP50, student init (RegionCLIP)", "ovd_ap50.regionclip_init"),
        ("OVD AP50, student init, Detectron2 transfer", "ovd_ap50.detectron2_student_init"),
        ("RegionCLIP − CLIP (points)", "ovd_ap50.regionclip_minus_clip"),
        ("RegionCLIP − control (points)", "ovd_ap50.regionclip_minus_control"),
        ("OVD AP50 with val boxes as proposals, teacher init", "ovd_ap50_gt_boxes.clip_init"),
        ("OVD AP50 with val boxes as proposals, control init", "ovd_ap50_gt_boxes.control_init"),
        ("OVD AP50 with val boxes as proposals, student init", "ovd_ap50_gt_boxes.regionclip_init"),
    ]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(flat, std, f"{key}.{s}") for s in SPLITS) + " |")
    lines += ["", "| pseudo-labels and concepts | value |", "|---|---|"]
    pl = results.get("pseudolabel", {})
    trained = pl.get("trained_on", "pool")
    for mode in (trained, other_mode(trained)):
        scope = pl.get("scope", {}).get(mode, "")
        lines.append(
            f"| label precision, {mode} mode ({scope}) | {_cell(flat, std, f'pseudolabel.precision.{mode}')} |"
        )
    lines.append(
        f"| label precision, {trained} mode, first input shard only (the images of the {other_mode(trained)} row) | "
        f"{_cell(flat, std, f'pseudolabel.precision_first_shard.{trained}')} |"
    )
    lines.append(
        f"| concept pool recall of category names | {_cell(flat, std, 'concepts.category_recall')} |"
    )
    threshold = flat.get("detections_picture.score_threshold")
    if _is_number(threshold):
        lines.append(
            f"| detections.png score threshold {threshold:.3f}: F1-optimal on val (precision "
            f"{_cell(flat, std, 'detections_picture.precision')}, recall "
            f"{_cell(flat, std, 'detections_picture.recall')}) | {_cell(flat, std, 'detections_picture.f1')} |"
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


def pseudolabel_png(plan: SeedPlan, out: Path) -> None:
    """A grid of the training pseudo-labels."""
    names = Path(plan.files["concept_names"]).read_text(encoding="utf-8").splitlines()
    cells = []
    for labels in iter_pseudo_labels(plan.files["pseudolabels"]):
        cells.append(draw_pseudo_labels(labels, names, CELL, min_score=0.0, max_boxes=6))
        if len(cells) == GRID_IMAGES:
            break
    save_png(image_grid(cells), out)


def detections_png(plan: SeedPlan, out: Path) -> OperatingPoint:
    """A grid of val images with the student-initialised detector's detections (its best
    DETECTIONS_PER_IMAGE at or above its F1-optimal score threshold on val); returns that point."""
    val = read_coco(plan.files["val_json"], plan.files["image_root"])
    dets = _read_json(Path(plan.files["transfer_regionclip"]) / "detections.json")
    point = best_f1_threshold(val.images, dets)
    cat_index = {cid: k for k, cid in enumerate(val.category_ids)}
    cells = []
    for image in val.images[:GRID_IMAGES]:
        mine = sorted(
            (d for d in dets if d["image_id"] == image.id and d["score"] >= point.threshold),
            key=lambda d: -d["score"],
        )[:DETECTIONS_PER_IMAGE]
        im = load_rgb(image.path)
        scale = CELL / max(im.size)
        pic = im.resize((round(im.width * scale), round(im.height * scale)))
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)]).reshape(
            -1, 4
        )
        cell = Image.new("RGB", (CELL, CELL), (255, 255, 255))
        scores = torch.tensor([d["score"] for d in mine])
        labels = torch.tensor([cat_index[d["category_id"]] for d in mine])
        cell.paste(draw_detections(pic, boxes * scale, scores, labels, val.names))
        cells.append(cell)
    save_png(image_grid(cells), out)
    return point


def write_seed_report(plan: SeedPlan, seconds: dict[str, float], skipped: list[str]) -> dict[str, Any]:
    """``results.json``, ``RESULTS.md`` and the three PNGs of one seed in its folder; returns the results."""
    results = build_results(plan, seconds, skipped)
    out = plan.out_dir
    point = detections_png(plan, out / "detections.png")
    results["detections_picture"] = {
        "score_threshold": point.threshold,
        "precision": point.precision,
        "recall": point.recall,
        "f1": point.f1,
        "chosen_by": "maximal F1 at IoU 0.5 of the student-initialised detector on val",
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "RESULTS.md", results_markdown(results))
    pseudolabel_png(plan, out / "pseudolabels.png")
    panels = []
    for name in MODELS:
        log = Path(plan.files[f"{name}_losses"])
        panels.append((f"{name} training losses", read_loss_log(log) if log.is_file() else {}))
    save_png(draw_loss_curves(panels), out / "loss_curves.png")
    return results
