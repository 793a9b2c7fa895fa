"""The benchmark suite of ``make bench``: the registered benchmarks, and running one of them in its
own process into a results entry (figures, command, machine, load average)."""

from __future__ import annotations

import json
import os
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from regionclip.benchmarks import Benchmark, run_in_subprocess


def _step_figures(size: str, label: str) -> dict[str, tuple[str, str]]:
    """The pretrain benchmark's figures of one size (``rn50`` or ``demo``)."""
    return {
        f"{size}_offline_step_s_fp32": ("s", f"{label}: offline step (stored pseudo-labels), fp32"),
        f"{size}_offline_step_s_bf16": ("s", f"{label}: offline step, bf16 autocast"),
        f"{size}_step_over_floor_fp32": (
            "x",
            f"{label}: fp32 step / (its FLOPs / this run's fp32 GEMM rate)",
        ),
        f"{size}_step_over_floor_bf16": (
            "x",
            f"{label}: bf16 step / (its FLOPs / this run's bf16 GEMM rate)",
        ),
        f"{size}_online_step_s_fp32": (
            "s",
            f"{label}: online step (RPN + teacher inside, RegionCLIP's design), fp32",
        ),
        f"{size}_online_fp32_over_offline_bf16": (
            "x",
            f"{label}: RegionCLIP's design in fp32 / our offline bf16 step, same batch",
        ),
        f"{size}_step_gflop": (
            "GFLOP",
            f"{label}: FLOPs of one offline step (forward + backward, FlopCounterMode)",
        ),
        f"{size}_offline_images_per_s_bf16": ("images/s", f"{label}: offline bf16 throughput"),
        **{
            f"{size}_gemm_gflop_per_s_{p}": (
                "GFLOP/s",
                f"{label}: 2048^3 {p} matrix product, measured beside its steps",
            )
            for p in ("fp32", "bf16")
        },
        f"{size}_offline_fp32_peak_rss_gib": ("GiB", f"{label}: peak RSS, offline fp32 process"),
        f"{size}_offline_bf16_peak_rss_gib": ("GiB", f"{label}: peak RSS, offline bf16 process"),
        f"{size}_online_fp32_peak_rss_gib": (
            "GiB",
            f"{label}: peak RSS, online fp32 process (+ teacher, RPN)",
        ),
    }


BENCHMARKS: dict[str, Benchmark] = {
    "reader": Benchmark(
        "regionclip.benchmarks.reader:bench_reader",
        {
            "reader_images_per_s": (
                "images/s",
                "decoded 128x128 JPEG samples, `iter_image_text`, one process",
            ),
            "reader_images_per_s_workers2": (
                "images/s",
                "the same through `make_loader`, 2 DataLoader workers",
            ),
            "reader_peak_rss_gib": (
                "GiB",
                "peak RSS of the benchmark process (shard writing + one-process reading; "
                "each DataLoader worker's own peak is `children_peak_rss_gib` in bench.json)",
            ),
        },
        "Shard reading of EmojiWorld-sized samples (smooth random 128 px JPEG q90 + caption + json), "
        "decoded to RGB PIL images with the bad-sample checks on; DataLoader worker start-up included.",
    ),
    "concepts": Benchmark(
        "regionclip.benchmarks.concepts:bench_concepts",
        {
            "concepts_parse_speedup": (
                "x",
                "concept parsing speed-up of `CaptionParser` over a naive spaCy loop",
            ),
            "concepts_naive_captions_per_s": ("captions/s", "naive loop: `nlp(caption)` per caption"),
            "concepts_fast_captions_per_s": ("captions/s", "`CaptionParser` (batched, cached)"),
            "concepts_peak_rss_gib": (
                "GiB",
                "peak RSS of the benchmark process (both spaCy pipelines loaded)",
            ),
        },
        "Concept parsing on synthetic EmojiWorld-like captions; both paths must give identical counts.",
    ),
    "pseudolabel": Benchmark(
        "regionclip.benchmarks.pseudolabel:bench_pseudolabel",
        {
            "pseudolabel_floor_ratio": (
                "x",
                "RN50 size, fp32: stage images/s / forward-only floor (RN50 teacher + R50-FPN RPN, 800 px)",
            ),
            "rn50_fp32_stage_images_per_s": ("images/s", "RN50 size: `label_shard` end to end, fp32"),
            "rn50_bf16_stage_images_per_s": ("images/s", "RN50 size: `label_shard` end to end, bf16 teacher"),
            "rn50_pseudolabel_bf16_speedup": ("x", "RN50 size: bf16 stage images/s / fp32 stage images/s"),
            "pseudolabel_demo_floor_ratio": (
                "x",
                "demo size, fp32: stage / floor (RN-emoji + R18-FPN, 128 px)",
            ),
            "demo_fp32_stage_images_per_s": ("images/s", "demo size: `label_shard` end to end, fp32"),
            "demo_bf16_stage_images_per_s": ("images/s", "demo size: `label_shard` end to end, bf16 teacher"),
            "pseudolabel_peak_rss_gib": (
                "GiB",
                "peak RSS of the benchmark process (RN50 size dominates: RN50 teacher + R50-FPN RPN at 800 px)",
            ),
        },
        "Pseudo-label stage (read, decode, RPN, 100 sampled regions, teacher, assignment, shard "
        "writing) against the RPN + teacher forwards alone on pre-decoded in-memory images, same "
        "batches and boxes; random weights, medians of alternating repeats.",
    ),
    "pretrain": Benchmark(
        "regionclip.benchmarks.pretrain:bench_pretrain",
        {**_step_figures("rn50", "RN50 size"), **_step_figures("demo", "demo size")},
        "One full training step (collate, forward, RegionCLIP's three losses, backward, grad-norm clip, "
        "SGD step; Accelerate as in `pretrain.py`) on the same in-memory batch and the same random "
        "student: offline from stored pseudo-labels vs online (RPN, 100 of 300 proposals, teacher and "
        "assignment inside the step). RN50 size: RN50 student and teacher, R50-FPN RPN, batch 2 at "
        "800x1066, 100 regions per image (keep threshold 0), 4,764 concepts, 2 threads; demo "
        "size: `configs/demo.yaml` as it stands (model, RPN, image size, regions, batch, optimizer; pool "
        "mode, 100 concepts). Offline in fp32 and under bf16 autocast, online in fp32; each in its own "
        "process; medians of `repeats` timed steps after `warmup` steps. The floor is the step's FLOPs "
        "over the GEMM rate measured in the same run.",
    ),
}


def load_results(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"benchmarks": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"cannot read earlier results {path}: {e}; move it away to start afresh") from None
    data.setdefault("benchmarks", {})
    return data


def _shell_value(v: Any) -> str:
    """A parameter as typed on the command line: scalars as they are, lists and mappings as quoted JSON."""
    return shlex.quote(json.dumps(v)) if isinstance(v, (list, dict)) else str(v)


def run_one(name: str, bench: Benchmark, out: Path, params: dict[str, Any], machine: dict) -> dict[str, Any]:
    workdir = out / name
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]  # other work on the machine makes figures noisy: record it
    # a fresh process per benchmark: its peak RSS is the stage's own, not what ran before it
    result = run_in_subprocess(
        bench.fn, {"workdir": str(workdir), **bench.params, **params}, workdir, "bench"
    )
    result[f"{name}_peak_rss_gib"] = result.pop("peak_rss_gib")
    figures = {k: v for k, v in bench.figures.items() if k in result}
    if not figures:
        raise RuntimeError(f"benchmark {name} returned none of its figures; it returned {sorted(result)}")
    if len(figures) < len(bench.figures):  # a subset asked for by its parameters (e.g. pretrain.only)
        print(f"{name}: not measured: {', '.join(k for k in bench.figures if k not in figures)}")
    command = " ".join(
        [
            "python -m pipelines.bench",
            f"--out {out}",
            f"--only {name}",
            *(f"{name}.{k}={_shell_value(v)}" for k, v in params.items()),
        ]
    )
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "description": bench.description,
        "machine": machine,
        "load_before": round(load_before, 2),
        "figures": {k: {"value": result[k], "unit": u, "description": d} for k, (u, d) in figures.items()},
        "details": {k: v for k, v in result.items() if k not in bench.figures},
    }
