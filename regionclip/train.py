"""Student pretraining loop (``pretrain.py``; DESIGN §4 "Optimiser", "Losses"; facts §3.5).

One function, :func:`train`, runs on one CPU, one GPU or many processes through Accelerate:

- modes: ``regions`` (pseudo-label shards → image–text + distillation + region–concept losses),
  ``regions`` with ``online`` (RPN + teacher inside the step on image–text shards, RegionCLIP's
  original design), ``image_text`` (image–text shards, image–text loss only: a plain CLIP trainer);
- SGD (RegionCLIP) or AdamW; the learning rate is set by hand before every optimizer step from
  :func:`lr_at` (linear warm-up, then multistep or cosine), so there is no scheduler state to save
  and nothing depends on how many times Accelerate would step a wrapped scheduler;
- gradient accumulation (``accelerator.accumulate``), grad-norm clipping, bf16 autocast on GPU;
- the image–text loss gathers embeddings of all processes *with gradient*; region losses stay
  per process (as in RegionCLIP);
- every micro-step all processes sum their loss terms (one small all-reduce): that gives the
  logged mean and lets every process stop together on a NaN/inf loss, whose error names the step
  and the batch keys.

Checkpoints: ``<out_dir>/checkpoints/checkpoint_<step>/`` holds ``accelerator.save_state``'s
files (model safetensors, optimizer and per-process RNG states saved by torch and read back by
Accelerate with ``weights_only=True``; no object is registered for checkpointing, since those
would be unpickled with ``weights_only=False``) plus our JSON: ``state.json`` (step, images,
layout) and ``data_<rank>.json`` (each data stream's position, see
:mod:`regionclip.data.pretrain_data`). A checkpoint is written to a temporary folder and renamed
when complete; folders are named by step, not by Accelerate's automatic counter (whose
``save_iteration`` restarts at 0 after ``load_state``), and the newest ``keep_checkpoints`` are
kept. A run with checkpoints in ``out_dir`` resumes from the newest one exactly: weights,
optimizer, RNG, step and data position.

At the end the student is exported with :meth:`StudentModel.export` to ``<out_dir>/final``
(open_clip-loadable) and ``<out_dir>/summary.json`` is written with the run hash (the
``pretrain`` section, the init weights and the training shards). A re-run whose run hash matches
a finished summary returns it without touching anything; a finished run of another config or
other inputs in the same ``out_dir`` is an error, never silently skipped or trained on.

TensorBoard logs go to ``<out_dir>/logs``; the same scalars go to ``<out_dir>/losses.jsonl``
(one JSON line per logged step; after a resume the steps logged since the checkpoint appear again
and the later line counts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from regionclip.config import ExperimentConfig, PretrainConfig, section_hash, to_dict
from regionclip.data.pretrain_data import (
    DECODERS,
    DataState,
    PretrainStream,
    make_loader,
)
from regionclip.data.shards import SampleErrors, decode_image_text, expand_urls
from regionclip.losses import RegionCLIPLoss
from regionclip.student import (
    PreprocessSettings,
    build_student,
    collate_image_text,
    collate_pretrain,
    compute_losses,
)
from regionclip.utils import apply_umask, atomic_write_json, resolve_device, sha256_file

log = logging.getLogger(__name__)

MODES = ("regions", "image_text")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine")
PRECISIONS = ("fp32", "bf16")
TERMS = ("loss", "image_text", "distill", "contrastive")
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")
SUMMARY_FILE = "summary.json"
LOSS_LOG_FILE = "losses.jsonl"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss); the message names the step and the batch."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def check_config(p: PretrainConfig) -> None:
    """Raise ValueError naming the ``pretrain.*`` key of an invalid setting."""
    choices = {"mode": MODES, "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": PRECISIONS}
    for key, allowed in choices.items():
        if getattr(p, key) not in allowed:
            raise ValueError(f"pretrain.{key}={getattr(p, key)!r}: expected one of {allowed}")
    for key in ("batch_size", "grad_accum", "max_steps"):
        if getattr(p, key) < 1:
            raise ValueError(f"pretrain.{key} must be >= 1, got {getattr(p, key)}")
    if p.online and p.mode != "regions":
        raise ValueError(
            "pretrain.online=true labels regions inside the step: it needs pretrain.mode=regions"
        )
    if not all(0 < m <= 1 for m in p.milestones):
        raise ValueError(f"pretrain.milestones are fractions of max_steps in (0, 1], got {p.milestones}")
    if p.lr <= 0 or p.warmup_steps < 0 or not 0 < p.warmup_factor <= 1:
        raise ValueError(
            f"need pretrain.lr > 0, warmup_steps >= 0, 0 < warmup_factor <= 1; got {p.lr}, "
            f"{p.warmup_steps}, {p.warmup_factor}"
        )


def lr_at(step: int, p: PretrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): Detectron2's linear warm-up from
    ``lr * warmup_factor`` over ``warmup_steps``, times the multistep (``gamma`` at each
    milestone fraction of ``max_steps``) or cosine (to 0 at ``max_steps``) decay."""
    warm = 1.0
    if step < p.warmup_steps:
        alpha = step / p.warmup_steps
        warm = p.warmup_factor * (1 - alpha) + alpha
    if p.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * min(step, p.max_steps) / p.max_steps))
    else:
        decay = p.gamma ** sum(step >= round(m * p.max_steps) for m in p.milestones)
    return p.lr * warm * decay


def resolve_shards(cfg: ExperimentConfig) -> list[str]:
    """Shard URLs of ``pretrain.shards``: a folder (its ``*.tar``), webdataset URLs, or by default
    the pseudo-label shards the pseudolabel stage writes for ``pseudolabel.input_shards`` (same
    file names, in ``pseudolabel.out_dir``) in regions mode, else ``data.pretrain_shards``."""
    p = cfg.pretrain
    if p.shards:
        if os.path.isdir(p.shards):
            urls = sorted(str(f) for f in Path(p.shards).glob("*.tar"))
            if not urls:
                raise ValueError(f"pretrain.shards={p.shards}: folder holds no .tar shards")
            return urls
        urls = expand_urls(p.shards)
    elif p.mode == "regions" and not p.online:
        from regionclip.pseudolabel import plan_outputs

        urls = [str(path) for _, path in plan_outputs(cfg.pseudolabel)]
    else:
        urls = expand_urls(cfg.data.pretrain_shards)
    if not urls:
        raise ValueError(f"no training shards (pretrain.shards={p.shards!r})")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        hint = " (run `make pseudolabel` first)" if p.mode == "regions" and not p.shards else ""
        raise ValueError(f"{len(missing)} training shard(s) missing{hint}: {', '.join(missing[:3])}")
    return urls


def check_manifests(cfg: ExperimentConfig, urls: list[str]) -> None:
    """Refuse pseudo-label shards whose manifest records another concept pool or teacher.

    Compared: the manifest's ``concept_pool.sha256`` with the sha256 of ``pretrain.concepts``, and
    its teacher ``weights_id`` with the configured teacher's (built as the pseudolabel stage builds
    it). ``pretrain.allow_mismatch`` turns refusals into warnings. Remote shards are not checked.
    """
    from regionclip.models.loading import load_clip
    from regionclip.pseudolabel import manifest_path

    p = cfg.pretrain
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if len(local) < len(urls):
        log.warning("manifests of %d remote shard(s) are not checked", len(urls) - len(local))
    if not local:
        return
    pool_sha = sha256_file(p.concepts)
    torch.manual_seed(cfg.pseudolabel.seed)  # a random-init teacher, exactly as the pseudolabel stage made it
    teacher_id = load_clip(cfg.teacher, "cpu").weights_id
    problems = []
    for url in local:
        mpath = manifest_path(url)
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            problems.append(f"{url}: no readable manifest {mpath.name} ({e})")
            continue
        shard_pool = manifest.get("concept_pool", {}).get("sha256", "?")
        if shard_pool != pool_sha:
            problems.append(
                f"{url}: labelled with concept pool sha256 {shard_pool[:16]}, but pretrain.concepts="
                f"{p.concepts} has sha256 {pool_sha[:16]}"
            )
        shard_teacher = manifest.get("teacher", {}).get("weights_id", "?")
        if shard_teacher != teacher_id:
            problems.append(
                f"{url}: labelled by teacher {shard_teacher}, but the configured teacher is {teacher_id}"
            )
    if problems:
        msg = "pseudo-label shards do not match the config:\n  " + "\n  ".join(problems[:10])
        if not p.allow_mismatch:
            raise ValueError(
                msg + "\nre-run `make pseudolabel`, fix the config, or set pretrain.allow_mismatch=true"
            )
        log.warning("%s\n(pretrain.allow_mismatch=true: training anyway)", msg)


def run_hash(cfg: ExperimentConfig, urls: list[str]) -> str:
    """What a finished run's outputs depend on: the ``pretrain`` section, the init weights file
    (sha256) and the training shards and concept pool (size + mtime of local files)."""
    from regionclip.models.loading import WEIGHTS_FILE

    p = cfg.pretrain

    def stamp(path: str) -> list[Any]:
        try:
            st = os.stat(path)
        except OSError:
            return [path]  # a URL / pipe: command; its name is all there is
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns]

    init = Path(p.init.pretrained) if p.init.pretrained else None
    weights = init / WEIGHTS_FILE if init is not None and init.is_dir() else init
    inputs = {
        "init": sha256_file(weights) if weights is not None and weights.is_file() else p.init.pretrained,
        "shards": [stamp(u) for u in urls],
        "concepts": stamp(p.concepts) if p.mode == "regions" else None,
    }
    blob = json.dumps([section_hash(p), inputs], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def finished_summary(out_dir: str | Path, run: str) -> dict[str, Any] | None:
    """The summary of the finished run ``run`` in ``out_dir``, or None when there is none to reuse
    (a summary without run hash, written before runs were hashed, is resumed as before).

    Raises:
        ValueError: ``out_dir`` holds a finished run of another config or other inputs.
    """
    out_dir = Path(out_dir)
    try:
        summary = json.loads((out_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if "run_hash" not in summary or not (out_dir / "final").is_dir():
        return None
    if summary["run_hash"] != run:
        raise ValueError(
            f"pretrain.out_dir={out_dir} holds a finished run of another config or other inputs (run hash "
            f"{summary['run_hash']}, this run {run}): delete the folder to train again, delete only its "
            f"{SUMMARY_FILE} to continue from its last checkpoint, or choose another pretrain.out_dir"
        )
    return summary


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class _Collate:
    """Picklable collate of the stream: decoded samples + the batch generator → a batch."""

    kind: str  # regions | image_text | online (samples pass through; labelled in the step)
    preprocess: PreprocessSettings
    tokenizer: Any

    def __call__(self, samples: list[dict[str, Any]], gen: torch.Generator) -> Any:
        if self.kind == "regions":
            return collate_pretrain(samples, self.preprocess, self.tokenizer, gen)
        if self.kind == "image_text":
            return collate_image_text(samples, self.preprocess, self.tokenizer, gen)
        return {"samples": samples, "rng_state": gen.get_state()}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    found = []
    for d in root.glob("checkpoint_*") if root.is_dir() else []:
        m = CHECKPOINT_RE.match(d.name)
        if m and (d / "state.json").is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def _save_checkpoint(
    acc: Any, out_dir: Path, step: int, state: dict[str, Any], data: DataState, keep: int
) -> Path:
    root = out_dir / "checkpoints"
    final = root / f"checkpoint_{step}"
    tmp = root / f".checkpoint_{step}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    data.save(tmp / f"data_{acc.process_index}.json")
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_write_json(tmp / "state.json", state)
        apply_umask(tmp)  # Accelerate writes model.safetensors owner-only
        if final.exists():  # a rerun after a crash between this rename and the next step
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for _, old in checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def build_optimizer(p: PretrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD or AdamW of ``pretrain.optimizer`` over ``params`` (the learning rate is set per step)."""
    if p.optimizer == "sgd":
        return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    return torch.optim.AdamW(params, lr=p.lr, betas=tuple(p.betas), weight_decay=p.weight_decay)


def build_loss(p: PretrainConfig, rank: int = 0, world_size: int = 1) -> RegionCLIPLoss:
    """The configured losses; the region terms are off in image_text mode."""
    region_losses = p.mode == "regions"
    return RegionCLIPLoss(
        image_text_weight=p.image_text_weight,
        distill_weight=p.distill_weight if region_losses else 0.0,
        contrastive_weight=p.contrastive_weight if region_losses else 0.0,
        image_text_temperature=p.image_text_temperature,
        distill_temperature=p.distill_temperature,
        contrastive_temperature=p.contrastive_temperature,
        teacher_temperature=p.teacher_temperature,
        gather_with_grad=True,
        rank=rank,
        world_size=world_size,
    )


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train(cfg: ExperimentConfig) -> dict[str, Any]:
    """Pretrain the student of ``cfg.pretrain``; returns the summary (also in ``summary.json``).

    Raises:
        ValueError: bad config, missing or mismatched shards, checkpoint of another layout.
        TrainingError: a non-finite loss (names the step and the batch keys).
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    p = cfg.pretrain
    check_config(p)
    urls = resolve_shards(cfg)
    run = run_hash(cfg, urls)
    done = finished_summary(p.out_dir, run)
    if done is not None:
        print(
            f"pretrain: {p.out_dir} holds the finished run of this config ({done['steps']} steps); skipping"
        )
        return done
    device = resolve_device(cfg.device)
    use_bf16 = p.precision == "bf16" and device.type == "cuda"
    if p.precision == "bf16" and not use_bf16:
        log.warning("pretrain.precision=bf16 autocasts on GPU only; training in fp32 on %s", device)
    acc = Accelerator(
        cpu=device.type == "cpu",
        gradient_accumulation_steps=p.grad_accum,
        mixed_precision="bf16" if use_bf16 else "no",
    )
    rank, world = acc.process_index, acc.num_processes
    out_dir = Path(p.out_dir)
    kind = "online" if p.online else p.mode
    region_losses = p.mode == "regions"

    concept_emb = None
    if region_losses:
        from regionclip.text import load_embeddings

        concept_emb = load_embeddings(p.concepts)[0].float().to(acc.device)
        if not p.online:
            check_manifests(cfg, urls)
    online = None
    if p.online:
        from regionclip.student import OnlineLabels

        online = OnlineLabels.from_config(cfg, acc.device)

    torch.manual_seed(p.seed)  # a random-init student is the same in every process and run
    student = build_student(p.init, p.freeze_at, acc.device, train_text=p.train_text, freeze_bn=p.freeze_bn)
    student.train()
    params = [q for _, q in student.trainable_parameters()]
    optimizer = build_optimizer(p, params)
    loss_fn = build_loss(p, rank, world)
    model, optimizer = acc.prepare(student, optimizer)

    # ---- resume
    num_streams = max(1, p.num_workers)
    step, images_before, data_state = 0, 0, DataState(world, num_streams)
    found = checkpoints(out_dir)
    if found:
        step, ckpt = found[-1]
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        data_state = DataState.load(ckpt / f"data_{rank}.json")
        data_state.check_layout(world, num_streams, str(ckpt))
        acc.load_state(str(ckpt))
        images_before = int(state["images"])
        if acc.is_main_process:
            log.info("resuming from %s (step %d)", ckpt, step)

    # ---- data
    preprocess = PreprocessSettings(short_side=p.short_side, max_side=p.max_side, hflip=p.hflip)
    decode = decode_image_text if p.online else DECODERS[p.mode]
    stream = PretrainStream(
        urls,
        decode,
        _Collate(kind, preprocess, student.tokenizer),
        p.batch_size,
        seed=p.seed,
        shuffle_buffer=p.shuffle_buffer,
        rank=rank,
        world_size=world,
        num_workers=p.num_workers,
        state=data_state,
    )
    loader = make_loader(stream, p.num_workers)
    errors = SampleErrors()
    global_batch = p.batch_size * p.grad_accum * world

    writer = loss_log = None
    if acc.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "logs"))
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "config.json", to_dict(cfg))
        loss_log = open(out_dir / LOSS_LOG_FILE, "a", encoding="utf-8")
    dump: dict[str, Any] = {"steps": [], "first_step_grads": {}}
    last: dict[str, float] = {}
    start_step = step
    start = time.perf_counter()
    window_start, window_images = start, 0
    saved_at = step if found else -1
    it: Iterator[dict[str, Any]] = iter(loader)
    bar = tqdm(total=p.max_steps, initial=step, desc="pretrain", unit="step", disable=not acc.is_main_process)
    try:
        while step < p.max_steps:
            sums = torch.zeros(len(TERMS), dtype=torch.float64)
            grad_norm, lr = 0.0, lr_at(step, p)
            for _ in range(p.grad_accum):
                item = next(it)
                data_state.update(item)
                for record in item["errors"]:
                    errors.add(record)
                batch = item["batch"]
                if online is not None:
                    gen = torch.Generator()
                    gen.set_state(batch["rng_state"])
                    batch = collate_pretrain(online(batch["samples"]), preprocess, student.tokenizer, gen)
                batch = batch.to(acc.device)
                with acc.accumulate(model):
                    out = compute_losses(model, batch, loss_fn, concept_emb)
                    local = torch.stack(
                        [
                            out[t].detach().double().cpu()
                            if t in out
                            else torch.zeros((), dtype=torch.float64)
                            for t in TERMS
                        ]
                    )
                    total = acc.reduce(local.to(acc.device), "sum").cpu() if world > 1 else local
                    if not torch.isfinite(total).all():
                        where = "" if torch.isfinite(local).all() else " on this process"
                        values = ", ".join(
                            f"{t}={v:.4g}" for t, v in zip(TERMS, local.tolist(), strict=True) if t in out
                        )
                        raise TrainingError(
                            f"non-finite loss at step {step + 1}{where or ' on another process'} "
                            f"({values}); batch keys: {batch.keys}"
                        )
                    acc.backward(out["loss"])
                    if acc.sync_gradients:
                        if p.debug_dump and step == start_step:
                            unwrapped = acc.unwrap_model(model)
                            dump["first_step_grads"] = {
                                n: [float(q.grad.norm()), float(q.grad.sum())]
                                for n, q in unwrapped.trainable_parameters()
                                if q.grad is not None
                            }
                        norm = acc.clip_grad_norm_(params, p.grad_clip if p.grad_clip > 0 else float("inf"))
                        grad_norm = float(norm)
                        for group in optimizer.param_groups:
                            group["lr"] = lr
                    optimizer.step()
                    optimizer.zero_grad()
                sums += total / world
            step += 1
            means = (sums / p.grad_accum).tolist()
            last = {t: v for t, v in zip(TERMS, means, strict=True) if t == "loss" or t in out}
            window_images += global_batch
            if p.debug_dump:
                dump["steps"].append({"step": step, **last, "lr": lr, "grad_norm": grad_norm})
            if step % max(1, p.log_every) == 0 or step == p.max_steps:
                now = time.perf_counter()
                ips = window_images / max(now - window_start, 1e-9)
                window_start, window_images = now, 0
                if writer is not None:
                    for t, v in last.items():
                        writer.add_scalar(f"train/{t}", v, step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/grad_norm", grad_norm, step)
                    writer.add_scalar("train/images_per_s", ips, step)
                if loss_log is not None:
                    line = {"step": step, **last, "lr": lr, "grad_norm": grad_norm, "images_per_s": ips}
                    loss_log.write(json.dumps(line) + "\n")
                    loss_log.flush()
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{ips:.1f}")
            bar.update(1)
            if p.checkpoint_every > 0 and step % p.checkpoint_every == 0 and step < p.max_steps:
                _save_checkpoint(
                    acc,
                    out_dir,
                    step,
                    _state(step, images_before, start_step, global_batch, world, p),
                    data_state,
                    p.keep_checkpoints,
                )
                saved_at = step
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if loss_log is not None:
            loss_log.close()
    if saved_at != step:
        _save_checkpoint(
            acc,
            out_dir,
            step,
            _state(step, images_before, start_step, global_batch, world, p),
            data_state,
            p.keep_checkpoints,
        )
    seconds = time.perf_counter() - start

    all_errors = gather_object([dict(errors.counts)]) if world > 1 else [dict(errors.counts)]
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return {}
    skipped: dict[str, int] = {}
    for counts in all_errors:
        for k, v in counts.items():
            skipped[k] = skipped.get(k, 0) + v
    images_run = (step - start_step) * global_batch
    final_dir = acc.unwrap_model(model).export(
        out_dir / "final", {"pretrain": {"mode": kind, "steps": step, "config_hash": section_hash(p)}}
    )
    summary = {
        "mode": kind,
        "steps": step,
        "steps_this_run": step - start_step,
        "resumed_from": start_step if found else None,
        "images": images_before + images_run,
        "images_this_run": images_run,
        "global_batch": global_batch,
        "processes": world,
        "seconds": seconds,
        "images_per_s": images_run / seconds if seconds > 0 else 0.0,
        "final_losses": last,
        "peak_memory_mb": _peak_memory_mb(acc.device),
        "skipped_samples": skipped,
        "final": str(final_dir),
        "run_hash": run,
    }
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    if p.debug_dump:
        atomic_write_json(p.debug_dump, dump)
    for line in errors.report_lines() if errors.counts else []:
        log.warning(line)
    loss_txt = ", ".join(f"{k} {v:.4f}" for k, v in last.items()) or "no steps run"
    skipped_txt = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "none"
    print(
        f"pretrain ({kind}): {step} steps ({step - start_step} this run) x {global_batch} images, "
        f"{images_run} images in {seconds:.1f} s ({summary['images_per_s']:.1f} images/s on {world} "
        f"process(es)); final {loss_txt}; skipped samples: {skipped_txt}; student in {final_dir}"
    )
    acc.wait_for_everyone()
    return summary


def _state(
    step: int, images_before: int, start_step: int, global_batch: int, world: int, p: PretrainConfig
) -> dict[str, Any]:
    return {
        "step": step,
        "images": images_before + (step - start_step) * global_batch,
        "processes": world,
        "num_workers": p.num_workers,
        "config_hash": section_hash(p),
    }
