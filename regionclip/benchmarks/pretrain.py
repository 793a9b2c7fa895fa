"""Pretraining step: offline pseudo-labels vs ``online`` (RegionCLIP's RPN + teacher in the step).

One full optimizer step as :func:`regionclip.stages.pretrain.train` runs it (Accelerate, bf16 autocast on
GPU), on the same batch and the same random-weight student in both modes, data already in memory:

- offline: stored pseudo-label samples (read back from a real pseudo-label shard) →
  :func:`collate_pretrain` → forward + losses → backward → grad-norm clip → SGD step;
- online: decoded image–text samples → :class:`OnlineLabels` (RPN, proposal sampling, teacher,
  assignment) → the same.

Each mode runs in its own process (:func:`run_in_subprocess`), so its peak RSS is its own: the
offline process holds the student only, the online one also the teacher and the RPN. Figures are
medians over ``repeats`` steps after ``warmup`` steps. The pseudo-labels both modes train on are
made once beforehand by the offline stage's code (:func:`run_shards`) with the same teacher, RPN
and concept pool the online process builds.

Two sizes: RegionCLIP's (RN50 student and teacher, ResNet-50-FPN RPN, batch 2 at
800x1066, 300 → 100 regions, 4,764 random unit concept vectors) and the CPU demo's (whatever
``configs/demo.yaml`` sets: model, RPN, image size, regions per image, batch, optimizer,
temperatures; 100 concepts, pool mode). Weights are random and the keep threshold is 0 at both
sizes: which regions would pass it with random weights is arbitrary, and every sampled region kept
gives the step its configured shapes.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from regionclip.benchmarks import REPO, run_in_subprocess
from regionclip.benchmarks.reader import smooth_image
from regionclip.config import ExperimentConfig, load_config
from regionclip.data.batches import PreprocessSettings, collate_pretrain
from regionclip.data.pseudo_labels import iter_pseudo_labels
from regionclip.data.sample_errors import SampleErrors
from regionclip.data.shards import ShardWriter, encode_image, image_text_sample, iter_image_text
from regionclip.labeling.labeler import OnlineLabels, build_labeler
from regionclip.models.loading import get_model_config
from regionclip.models.rpn import build_proposal_network, save_rpn
from regionclip.models.student import build_student, compute_losses
from regionclip.precision import autocast
from regionclip.stages.pretrain import build_loss, build_optimizer
from regionclip.stages.pseudolabel import plan_outputs, prepare_run, run_shards
from regionclip.text import load_embeddings, save_embeddings
from regionclip.utils import resolve_device

SIZES: dict[str, dict[str, Any]] = {
    "rn50": {
        "config": "",  # the built-in defaults are RegionCLIP's RN50 settings
        "overrides": ["teacher.model=RN50", "pretrain.batch_size=2"],
        "image_wh": [640, 480],  # short side 800 -> 800x1066
        "concepts": 4764,
    },
    "demo": {
        "config": str(REPO / "configs" / "demo.yaml"),
        "overrides": [f"teacher.model_config={REPO / 'configs' / 'models' / 'RN-emoji.json'}"],
        "image_wh": [128, 128],
        "concepts": 100,  # the demo's pool has about 100 concepts
    },
}
# RegionCLIP's original step on this machine kind (docs/design.md), for the record next to ours
REGIONCLIP_STEP_S = 44.2
REGIONCLIP_PEAK_RSS_GIB = 4.7


def size_overrides(base: list[str], workdir: Path, device: str, seed: int, extra: list[str]) -> list[str]:
    """Config overrides of one size: its own (``base``), the benchmark's files, the user's ``extra``."""
    files = [
        f"output_dir={workdir}",
        f"device={device}",
        f"seed={seed}",
        "teacher.pretrained=",  # random weights: nothing is downloaded
        f"rpn.out_dir={workdir / 'rpn'}",
        f"pseudolabel.input_shards={workdir / 'input' / 'train-000000.tar'}",
        f"pseudolabel.out_dir={workdir / 'labels'}",
        f"pseudolabel.concepts={workdir / 'concepts.safetensors'}",
        # pool mode: caption mode needs the captions' parsed concepts, which a random pool does not
        # have; the RPN + teacher work inside the step is the same
        "pseudolabel.mode=pool",
        "pseudolabel.threshold=0.0",
    ]
    return [*base, *files, *extra]


def _load(job: dict[str, Any]) -> ExperimentConfig:
    return load_config(job["config"] or None, job["overrides"])


def prepare(job: dict[str, Any], image_wh: tuple[int, int], n_concepts: int) -> dict[str, Any]:
    """Write the inputs of one size: a random concept pool, a random RPN, an image–text shard of one
    batch, and its pseudo-label shard (the offline stage). Returns region counts."""
    cfg = _load(job)
    n_images, seed = cfg.pretrain.batch_size, cfg.seed
    dim = get_model_config(cfg.teacher)["embed_dim"]
    gen = torch.Generator().manual_seed(seed)
    pool = torch.nn.functional.normalize(torch.randn(n_concepts, dim, generator=gen), dim=-1)
    names = [f"concept {i}" for i in range(n_concepts)]
    save_embeddings(cfg.pseudolabel.concepts, pool, names, {"model": cfg.teacher.model}, normalized=True)
    torch.manual_seed(seed)
    save_rpn(build_proposal_network(cfg.rpn).eval(), cfg.rpn, cfg.rpn.out_dir)
    rng = np.random.default_rng(seed)
    w, h = image_wh
    in_dir = Path(cfg.pseudolabel.input_shards).parent
    with ShardWriter(in_dir, "train", maxcount=n_images) as writer:
        for i in range(n_images):
            jpg = encode_image(smooth_image(rng, max(w, h)).resize((w, h)), "jpg", 90)
            meta = {"width": w, "height": h}
            writer.write(image_text_sample(f"{i:06d}", jpg, "jpg", f"a photo of thing {i}", meta))
    labeler, identity = prepare_run(
        cfg.pseudolabel, cfg.teacher, cfg.rpn.out_dir, cfg.rpn.precomputed, resolve_device(cfg.device)
    )
    plan = plan_outputs(cfg.pseudolabel)
    run_shards(labeler, plan, identity)
    regions = [s.num_kept for s in iter_pseudo_labels(str(plan[0][1]), decode_image=False)]
    if len(regions) != n_images:
        raise RuntimeError(f"pseudo-label shard {plan[0][1]} holds {len(regions)} of {n_images} images")
    return {"images": n_images, "regions_per_image": regions}


RUNS = (("offline", "fp32"), ("offline", "bf16"), ("online", "fp32"))


def gemm_rates(threads: int, n: int = 2048, repeats: int = 10) -> dict[str, float]:
    """GFLOP/s of an ``n``³ matrix product in fp32 and bf16 (median of ``repeats``, after warm-up)."""
    torch.set_num_threads(threads)
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        rates[name] = round(2 * n**3 / statistics.median(times) / 1e9, 1)
    return rates


def top_operators(prof: Any, n: int) -> list[str]:
    """A Markdown table of the ``n`` operators with the most self CPU time in ``prof``."""
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    lines = ["| operator | self CPU s | share | calls |", "|---|---:|---:|---:|"]
    for e in events:
        lines.append(
            f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.2f} | {100 * e.self_cpu_time_total / total:.0f} % | {e.count} |"
        )
    return lines


def measure_mode(
    job: dict[str, Any],
    mode: str,
    precision: str,
    warmup: int,
    repeats: int,
    threads: int,
    count: bool = False,
) -> dict[str, Any]:
    """Run and time ``warmup + repeats`` identical training steps of ``mode`` (offline | online) in
    ``precision`` (fp32 | bf16) in this process; returns per-step seconds (and, online, the
    labelling part of each step). With ``count``, one more step counts the FLOPs
    (``torch.utils.flop_counter``) and one more is profiled (the top operators by self time)."""
    from accelerate import Accelerator

    torch.set_num_threads(threads)
    cfg = _load(job)
    p = cfg.pretrain
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    acc = Accelerator(cpu=not cuda)
    if mode == "offline":
        samples = list(iter_pseudo_labels(str(plan_outputs(cfg.pseudolabel)[0][1])))
        online = None
    else:
        errors = SampleErrors()
        samples = list(iter_image_text(cfg.pseudolabel.input_shards, errors))
        if errors.counts:
            raise RuntimeError(f"{cfg.pseudolabel.input_shards}: {errors.summary()}")
        pl = replace(cfg.pseudolabel, precision=precision)
        online = OnlineLabels(
            build_labeler(pl, cfg.teacher, cfg.rpn.out_dir, cfg.rpn.precomputed, acc.device)[0]
        )
    concept_emb = load_embeddings(p.concepts)[0].float().to(acc.device)
    torch.manual_seed(p.seed)  # the same random student as train() builds, in both modes
    student = build_student(p.init, p.freeze_at, acc.device, train_text=p.train_text, freeze_bn=p.freeze_bn)
    student.train()
    params = [q for _, q in student.trainable_parameters()]
    model, optimizer = acc.prepare(student, build_optimizer(p, params))
    loss_fn = build_loss(p)
    preprocess = PreprocessSettings(short_side=p.short_side, max_side=p.max_side, hflip=p.hflip)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def one_step() -> tuple[float, float, int]:
        gen = torch.Generator().manual_seed(p.seed)  # same flips and captions every step, both modes
        sync()
        t0 = time.perf_counter()
        pseudo = samples if online is None else online(samples)
        sync()
        t_label = time.perf_counter() - t0
        batch = collate_pretrain(pseudo, preprocess, student.tokenizer, gen).to(acc.device)
        with autocast(precision, acc.device):
            loss = compute_step(acc, model, optimizer, params, batch, loss_fn, concept_emb, p.grad_clip)
        sync()
        return loss, t_label, batch.num_regions

    steps, label_s, losses, regions = [], [], [], 0
    for i in tqdm(range(warmup + repeats), desc=f"pretrain step ({mode}, {precision})", unit="step"):
        t0 = time.perf_counter()
        loss, t_label, regions = one_step()
        if i >= warmup:
            steps.append(time.perf_counter() - t0)
            label_s.append(t_label)
        losses.append(loss)
    extra: dict[str, Any] = {}
    if count:
        counter = FlopCounterMode(display=False)
        with counter:
            one_step()
        extra["gflop"] = counter.get_total_flops() / 1e9
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one_step()
        extra["profile"] = top_operators(prof, 12)
    result: dict[str, Any] = {
        "step_s": steps,
        "images": len(samples),
        "regions": regions,
        "losses": losses,
        "threads": torch.get_num_threads(),
        "device": str(acc.device),
        **extra,
    }
    if online is not None:
        result["label_s"] = label_s
    if cuda:
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return result


def compute_step(acc, model, optimizer, params, batch, loss_fn, concept_emb, grad_clip: float) -> float:
    """One optimizer step as :func:`regionclip.train.train` takes it (no accumulation); returns the loss."""
    out = compute_losses(model, batch, loss_fn, concept_emb)
    loss = float(out["loss"].detach())
    if not np.isfinite(loss):
        raise RuntimeError(f"non-finite benchmark loss {loss} on batch {batch.keys}")
    acc.backward(out["loss"])
    acc.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad()
    return loss


def _size(
    workdir: Path,
    name: str,
    spec: dict[str, Any],
    warmup: int,
    repeats: int,
    threads: int,
    device: str,
    seed: int,
) -> dict[str, Any]:
    sdir = workdir / name
    job = {"config": spec["config"], "overrides": spec["overrides"]}
    setup = prepare(job, tuple(spec["image_wh"]), int(spec["concepts"]))
    gemm = gemm_rates(threads)  # in this run, beside the steps they are the floor of
    runs, loads = {}, {}
    for mode, precision in RUNS:
        tag = f"{mode}_{precision}"
        loads[tag] = round(os.getloadavg()[0], 2)
        kwargs = {"job": job, "mode": mode, "precision": precision, "warmup": warmup, "repeats": repeats,
                  "threads": threads, "count": tag == "offline_fp32"}  # fmt: skip
        runs[tag] = run_in_subprocess("regionclip.benchmarks.pretrain:measure_mode", kwargs, sdir, tag)
    step = {tag: statistics.median(r["step_s"]) for tag, r in runs.items()}
    gflop = runs["offline_fp32"]["gflop"]
    floor = {prec: gflop / gemm[prec] for prec in ("fp32", "bf16")}
    n = setup["images"]
    result: dict[str, Any] = {
        f"{name}_step_gflop": float(f"{gflop:.4g}"),  # significant digits: toy sizes are < 0.1
        f"{name}_offline_step_s_fp32": round(step["offline_fp32"], 3),
        f"{name}_offline_step_s_bf16": round(step["offline_bf16"], 3),
        f"{name}_online_step_s_fp32": round(step["online_fp32"], 3),
        f"{name}_step_over_floor_fp32": round(step["offline_fp32"] / floor["fp32"], 3),
        f"{name}_step_over_floor_bf16": round(step["offline_bf16"] / floor["bf16"], 3),
        f"{name}_online_fp32_over_offline_bf16": round(step["online_fp32"] / step["offline_bf16"], 3),
        f"{name}_offline_images_per_s_bf16": round(n / step["offline_bf16"], 3),
        **{f"{name}_gemm_gflop_per_s_{prec}": gemm[prec] for prec in ("fp32", "bf16")},
        f"{name}_online_label_s_fp32": round(statistics.median(runs["online_fp32"]["label_s"]), 3),
        **{f"{name}_{tag}_peak_rss_gib": r["peak_rss_gib"] for tag, r in runs.items()},
        f"{name}_setup": {
            **spec,
            "batch_images": n,
            "regions_per_image": setup["regions_per_image"],
            "regions_per_step": runs["offline_fp32"]["regions"],
            "device": runs["offline_fp32"]["device"],
            "threads": runs["offline_fp32"]["threads"],
            "gemm_gflop_per_s": gemm,
            "floor_s": {k: float(f"{v:.4g}") for k, v in floor.items()},
        },
        f"{name}_runs": {
            tag: {
                "step_s": [round(t, 3) for t in r["step_s"]],
                **({"label_s": [round(t, 3) for t in r["label_s"]]} if "label_s" in r else {}),
                "losses": [round(v, 5) for v in r["losses"]],
                "load_before": loads[tag],
                **({"peak_gpu_gib": r["peak_gpu_gib"]} if "peak_gpu_gib" in r else {}),
            }
            for tag, r in runs.items()
        },
        "tables": {f"{name}: top operators of one offline fp32 step (torch.profiler, self CPU time)":
                   runs["offline_fp32"]["profile"]},
    }  # fmt: skip
    # same batch, same model: the first steps' losses agree (up to the online labels' float noise)
    result[f"{name}_runs"]["first_loss_abs_diff"] = abs(
        runs["offline_fp32"]["losses"][0] - runs["online_fp32"]["losses"][0]
    )
    if runs["offline_fp32"]["regions"] != runs["online_fp32"]["regions"]:
        raise RuntimeError(
            f"{name}: offline and online batches differ ({runs['offline_fp32']['regions']} vs "
            f"{runs['online_fp32']['regions']} regions); the comparison would not be on the same batch"
        )
    return result


def bench_pretrain(
    workdir: str | Path,
    repeats: int = 3,
    warmup: int = 1,
    threads: int = 2,
    device: str = "auto",
    seed: int = 0,
    sizes: dict[str, dict[str, Any]] | None = None,
    only: str = "demo,rn50",
) -> dict[str, Any]:
    """Offline vs online step at demo size, then RN50 size (each mode in its own process).

    ``sizes``: per size (``rn50``, ``demo``), keys replacing those of :data:`SIZES` — ``config``
    (YAML file), ``image_wh``, ``concepts`` (pool size) — and ``overrides`` (config ``key=value``
    applied after the size's own, e.g. ``pretrain.batch_size=4``). ``only``: the sizes to run
    (comma-separated); the headline ratios are those of the sizes run.
    """
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown or not names:
        raise ValueError(f"pretrain bench: only={only!r}: expected a comma-separated subset of {list(SIZES)}")
    workdir = Path(workdir)
    result: dict[str, Any] = {
        "params": {"repeats": repeats, "warmup": warmup, "threads": threads, "device": device, "seed": seed},
        "regionclip_reference": {"step_s": REGIONCLIP_STEP_S, "peak_rss_gib": REGIONCLIP_PEAK_RSS_GIB},
    }
    tables: dict[str, list[str]] = {}
    for name in names:
        user = (sizes or {}).get(name, {})
        spec = {**SIZES[name], **user}
        spec["overrides"] = size_overrides(
            SIZES[name]["overrides"], workdir / name, device, seed, list(user.get("overrides", []))
        )
        part = _size(workdir, name, spec, warmup, repeats, threads, device, seed)
        tables.update(part.pop("tables"))
        result.update(part)
    result["tables"] = tables
    return result
