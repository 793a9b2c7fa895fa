"""`accelerate launch pretrain.py`: student pretraining on one CPU, one GPU or many processes.

- modes: ``regions`` (pseudo-label shards → image–text + distillation + region–concept losses),
  ``regions`` with ``online`` (RPN + teacher inside the step on image–text shards, RegionCLIP's
  original design), ``image_text`` (image–text shards, image–text loss only: a plain CLIP trainer);
- SGD (RegionCLIP) or AdamW, the one schedule (:mod:`regionclip.engine.schedule`), gradient
  accumulation, grad-norm clipping, ``pretrain.precision`` (bf16/fp16 autocast through Accelerate,
  fp32 master weights), all through the one training loop
  (:class:`~regionclip.engine.loop.Trainer`) with an Accelerate backend;
- the image–text loss gathers embeddings of all processes *with gradient*; region losses stay
  per process (as in RegionCLIP).

Checkpoints (:class:`~regionclip.engine.checkpoint.AccelerateCheckpointer`):
``<out_dir>/checkpoints/checkpoint_<step>/`` with Accelerate's state, each process's data
position (``data_<rank>.json``, :mod:`regionclip.data.pretrain_data`) and ``state.json``. A run
with checkpoints resumes from the newest one exactly (weights, optimizer, RNG, step, data
position), and refuses one written under another trajectory (``pretrain.*`` settings that change
the training). At the end the student is exported to ``<out_dir>/final`` (open_clip-loadable) and
``summary.json`` carries the run hash (the ``pretrain`` section, the init weights and the training
shards): a re-run with the same hash returns it; a finished run of another config in the same
``out_dir`` is an error. TensorBoard logs go to ``<out_dir>/logs``, the same scalars to
``<out_dir>/losses.jsonl`` (after a resume, steps logged since the checkpoint appear again and the
later line counts).
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from regionclip.config import PretrainConfig, section_hash, to_dict
from regionclip.data.batches import PreprocessSettings, collate_image_text, collate_pretrain
from regionclip.data.pretrain_data import DECODERS, DataState, PretrainStream, make_loader
from regionclip.data.pseudo_labels import manifest_path
from regionclip.data.sample_errors import SampleErrors
from regionclip.data.shards import decode_image_text
from regionclip.engine.checkpoint import AccelerateCheckpointer
from regionclip.engine.loop import Hook, StepOutput, StepRecord, Trainer
from regionclip.engine.run_cache import file_digest, file_stamp, read_record, run_hash
from regionclip.engine.schedule import KINDS, Schedule
from regionclip.errors import InputError
from regionclip.labeling.labeler import OnlineLabels
from regionclip.losses import RegionCLIPLoss
from regionclip.models.loading import WEIGHTS_FILE
from regionclip.models.student import build_student, compute_losses
from regionclip.precision import PRECISIONS, autocast, resolve_precision
from regionclip.text import load_embeddings
from regionclip.utils import atomic_write_json, require_writable, resolve_device, sha256_file

log = logging.getLogger(__name__)

MODES = ("regions", "image_text")
OPTIMIZERS = ("sgd", "adamw")
TERMS = ("loss", "image_text", "distill", "contrastive")
SUMMARY_FILE = "summary.json"
LOSS_LOG_FILE = "losses.jsonl"


@dataclass
class PretrainInputs:
    """What the student trains on, resolved from the earlier stages' outputs.

    ``shards``: training shard URLs. ``teacher_id``: the weights id the pseudo-label manifests must
    name (None = not checked: a random-init teacher cannot be identified without building it).
    ``online``: builds the in-step labeler on a device (``pretrain.online``).
    """

    shards: list[str]
    teacher_id: str | None = None
    online: Callable[[torch.device], OnlineLabels] | None = None


def check_config(p: PretrainConfig) -> None:
    """Raise ValueError naming the ``pretrain.*`` key of an invalid setting."""
    choices = {"mode": MODES, "optimizer": OPTIMIZERS, "schedule": KINDS, "precision": PRECISIONS}
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


def pretrain_schedule(p: PretrainConfig) -> Schedule:
    return Schedule(p.lr, p.max_steps, p.warmup_steps, p.warmup_factor, p.schedule, p.milestones, p.gamma)


def check_manifests(p: PretrainConfig, inputs: PretrainInputs) -> None:
    """Refuse pseudo-label shards whose manifest records another concept pool or teacher.

    Compared: the shard's size with the manifest's ``shard_bytes``, the manifest's
    ``concept_pool.sha256`` with the sha256 of ``pretrain.concepts``, and its teacher
    ``weights_id`` with ``inputs.teacher_id``. ``pretrain.allow_mismatch`` turns
    refusals into warnings. Remote shards are not checked.
    """
    local = [u for u in inputs.shards if "://" not in u and not u.startswith("pipe:")]
    if len(local) < len(inputs.shards):
        log.warning("manifests of %d remote shard(s) are not checked", len(inputs.shards) - len(local))
    if not local:
        return
    pool_sha = sha256_file(p.concepts)
    problems = []
    for url in local:
        mpath = manifest_path(url)
        manifest = read_record(mpath)
        if manifest is None:
            problems.append(f"{url}: no readable manifest {mpath.name}")
            continue
        size, recorded = (
            Path(url).stat().st_size if Path(url).is_file() else None,
            manifest.get("shard_bytes"),
        )
        if size is not None and recorded is not None and size != recorded:
            problems.append(
                f"{url}: {size} bytes, but its manifest recorded {recorded} (a cut or changed shard)"
            )
        shard_pool = manifest.get("concept_pool", {}).get("sha256", "?")
        if shard_pool != pool_sha:
            problems.append(
                f"{url}: labelled with concept pool sha256 {shard_pool[:16]}, but pretrain.concepts="
                f"{p.concepts} has sha256 {pool_sha[:16]}"
            )
        shard_teacher = manifest.get("teacher", {}).get("weights_id", "?")
        if inputs.teacher_id is not None and shard_teacher != inputs.teacher_id:
            problems.append(
                f"{url}: labelled by teacher {shard_teacher}, but the configured teacher is {inputs.teacher_id}"
            )
    if problems:
        msg = "pseudo-label shards do not match the config:\n  " + "\n  ".join(problems[:10])
        if not p.allow_mismatch:
            raise InputError(
                msg + "\nre-run `make pseudolabel`, fix the config, or set pretrain.allow_mismatch=true"
            )
        log.warning("%s\n(pretrain.allow_mismatch=true: training anyway)", msg)


def pretrain_run_hash(p: PretrainConfig, urls: list[str]) -> str:
    """What a finished run's outputs depend on: the ``pretrain`` section, the init weights file
    (sha256) and the training shards and concept pool (size + mtime of local files)."""
    init = Path(p.init.pretrained) if p.init.pretrained else None
    weights = init / WEIGHTS_FILE if init is not None and init.is_dir() else init
    inputs = {
        "init": file_digest(weights) if weights is not None else "",
        "shards": [file_stamp(u) for u in urls],
        "concepts": file_stamp(p.concepts) if p.mode == "regions" else None,
    }
    return run_hash(section_hash(p), inputs)


def resume_hash(p: PretrainConfig) -> str:
    """The settings that shape the trajectory so far: not where it runs, how often it logs or
    checkpoints, the data-loading layout (the data position checks that itself) or ``max_steps``
    (a finished run may be continued for more steps)."""
    return section_hash(replace(p, out_dir="", checkpoint_every=0, keep_checkpoints=0, log_every=0, debug_dump="",
                                allow_mismatch=False, num_workers=0, max_steps=0))  # fmt: skip


def finished_summary(out_dir: str | Path, run: str) -> dict[str, Any] | None:
    """The summary of the finished run ``run`` in ``out_dir``, or None when there is none to reuse.

    Raises:
        InputError: ``out_dir`` holds a finished run of another config or other inputs.
    """
    out_dir = Path(out_dir)
    summary = read_record(out_dir / SUMMARY_FILE)
    if summary is None or "run_hash" not in summary or not (out_dir / "final").is_dir():
        return None
    if summary["run_hash"] != run:
        raise InputError(
            f"pretrain.out_dir={out_dir} holds a finished run of another config or other inputs (run hash "
            f"{summary['run_hash']}, this run {run}): delete the folder to train again, delete only its "
            f"{SUMMARY_FILE} to continue from its last checkpoint, or choose another pretrain.out_dir"
        )
    return summary


@dataclass
class _Collate:
    """Picklable collate of the stream: decoded samples + the batch generator → a batch."""

    kind: str  # regions | image_text | online (samples pass through; labelled in the step)
    preprocess: PreprocessSettings
    tokenizer: Any

    def __call__(self, samples: list[Any], gen: torch.Generator) -> Any:
        if self.kind == "regions":
            return collate_pretrain(samples, self.preprocess, self.tokenizer, gen)
        if self.kind == "image_text":
            return collate_image_text(samples, self.preprocess, self.tokenizer, gen)
        return {"samples": samples, "rng_state": gen.get_state()}


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


class LossLog(Hook):
    """Every ``log_every`` steps (and the last): TensorBoard scalars and a ``losses.jsonl`` line."""

    def __init__(self, out_dir: Path, log_every: int, last_step: int):
        self.out_dir, self.every, self.last = out_dir, max(1, log_every), last_step
        self.writer: SummaryWriter | None = None
        self.file = None
        self.images, self.window_start = 0, 0.0

    def before_train(self, trainer: Trainer) -> None:
        self.writer = SummaryWriter(str(self.out_dir / "logs"))
        self.file = open(self.out_dir / LOSS_LOG_FILE, "a", encoding="utf-8")
        self.window_start = time.perf_counter()

    def after_step(self, trainer: Trainer, record: StepRecord) -> None:
        self.images += record.images
        if record.step % self.every and record.step != self.last:
            return
        now = time.perf_counter()
        ips = self.images / max(now - self.window_start, 1e-9)
        self.window_start, self.images = now, 0
        assert self.writer is not None and self.file is not None
        for t, v in record.losses.items():
            self.writer.add_scalar(f"train/{t}", v, record.step)
        self.writer.add_scalar("train/lr", record.lr, record.step)
        self.writer.add_scalar("train/grad_norm", record.grad_norm, record.step)
        self.writer.add_scalar("train/images_per_s", ips, record.step)
        line = {
            "step": record.step,
            **record.losses,
            "lr": record.lr,
            "grad_norm": record.grad_norm,
            "images_per_s": ips,
        }
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def after_train(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


class DebugDump(Hook):
    """``pretrain.debug_dump``: per-step losses and the first step's gradient norms (tests)."""

    def __init__(self, model_fn: Callable[[], Any]):
        self.model_fn = model_fn
        self.data: dict[str, Any] = {"steps": [], "first_step_grads": {}}
        self.first: int | None = None

    def after_backward(self, trainer: Trainer, step: int) -> None:
        if self.first is None:
            self.first = step
            self.data["first_step_grads"] = {
                n: [float(q.grad.norm()), float(q.grad.sum())]
                for n, q in self.model_fn().trainable_parameters()
                if q.grad is not None
            }

    def after_step(self, trainer: Trainer, record: StepRecord) -> None:
        self.data["steps"].append(
            {"step": record.step, **record.losses, "lr": record.lr, "grad_norm": record.grad_norm}
        )


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train(p: PretrainConfig, inputs: PretrainInputs, device_name: str = "auto") -> dict[str, Any]:
    """Pretrain the student of ``p`` on ``inputs``; returns the summary (also in ``summary.json``).

    Raises:
        InputError / ValueError: bad config, mismatched shards, checkpoint of another layout.
        TrainingError: a non-finite loss (names the step and the batch keys).
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    check_config(p)
    urls = inputs.shards
    run = pretrain_run_hash(p, urls)
    done = finished_summary(p.out_dir, run)
    if done is not None:
        print(
            f"pretrain: {p.out_dir} holds the finished run of this config ({done['steps']} steps); skipping"
        )
        return done
    require_writable(p.out_dir, "pretrain.out_dir")
    device = resolve_device(device_name)
    precision = resolve_precision(p.precision, device, "pretrain.precision")
    # bf16 needs no loss scaling: our own autocast, so that runs of another precision can share a
    # process (Accelerate's state is process-wide); fp16 goes through Accelerate for its grad scaler
    acc = Accelerator(cpu=device.type == "cpu", gradient_accumulation_steps=p.grad_accum,
                      mixed_precision="fp16" if precision == "fp16" else "no")  # fmt: skip
    step_precision = "bf16" if precision == "bf16" else "fp32"
    rank, world = acc.process_index, acc.num_processes
    out_dir = Path(p.out_dir)
    kind = "online" if p.online else p.mode
    concept_emb = None
    if p.mode == "regions":
        concept_emb = load_embeddings(p.concepts)[0].float().to(acc.device)
        if not p.online:
            check_manifests(p, inputs)
    online = inputs.online(acc.device) if p.online and inputs.online is not None else None

    torch.manual_seed(p.seed)  # a random-init student is the same in every process and run
    student = build_student(p.init, p.freeze_at, acc.device, train_text=p.train_text, freeze_bn=p.freeze_bn)
    student.train()
    params = [q for _, q in student.trainable_parameters()]
    optimizer = build_optimizer(p, params)
    loss_fn = build_loss(p, rank, world)
    model, optimizer = acc.prepare(student, optimizer)

    num_streams = max(1, p.num_workers)
    data_state = DataState(world, num_streams)

    def load_position(folder: Path) -> None:
        nonlocal data_state
        data_state = DataState.load(folder / f"data_{rank}.json")
        data_state.check_layout(world, num_streams, str(folder))

    checkpointer = AccelerateCheckpointer(
        acc, out_dir, resume_hash(p), "pretrain config", p.keep_checkpoints,
        save_extra=lambda folder: data_state.save(folder / f"data_{rank}.json"), load_extra=load_position,
    )  # fmt: skip
    hooks: list[Hook] = []
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "config.json", to_dict(p))
        hooks.append(LossLog(out_dir, p.log_every, p.max_steps))
    dump = DebugDump(lambda: acc.unwrap_model(model)) if p.debug_dump else None
    if dump is not None:
        hooks.append(dump)
    trainer = Trainer(model, optimizer, pretrain_schedule(p), params=params, grad_clip=p.grad_clip,
                      measure_grad_norm=True, grad_accum=p.grad_accum, accelerator=acc, checkpointer=checkpointer,
                      checkpoint_every=p.checkpoint_every, hooks=hooks, desc="pretrain", lr_key="pretrain.lr")  # fmt: skip
    start_step = trainer.resume()
    resumed = start_step > 0
    images_before = trainer.progress.images
    if resumed and acc.is_main_process:
        log.info("resuming from %s (step %d)", out_dir / "checkpoints", start_step)

    preprocess = PreprocessSettings(short_side=p.short_side, max_side=p.max_side, hflip=p.hflip)
    stream = PretrainStream(
        urls, decode_image_text if p.online else DECODERS[p.mode], _Collate(kind, preprocess, student.tokenizer),
        p.batch_size, seed=p.seed, shuffle_buffer=p.shuffle_buffer, rank=rank, world_size=world,
        num_workers=p.num_workers, state=data_state,
    )  # fmt: skip
    errors = SampleErrors()

    def step(item: dict[str, Any]) -> StepOutput:
        data_state.update(item)
        for record in item["errors"]:
            errors.add(record)
        batch = item["batch"]
        if online is not None:
            gen = torch.Generator()
            gen.set_state(batch["rng_state"])
            batch = collate_pretrain(online(batch["samples"]), preprocess, student.tokenizer, gen)
        batch = batch.to(acc.device)
        with autocast(step_precision, acc.device):
            out = compute_losses(model, batch, loss_fn, concept_emb)
        return StepOutput(
            {t: out[t] for t in TERMS if t in out}, len(batch.keys), f"batch keys: {batch.keys}"
        )

    it: Iterator[dict[str, Any]] = iter(make_loader(stream, p.num_workers))
    t0 = time.perf_counter()
    progress = trainer.fit(it, step, p.max_steps)
    seconds = time.perf_counter() - t0
    if trainer.step != start_step or not resumed:
        trainer.save()  # the final state, for a later run with more steps
    all_errors = gather_object([dict(errors.counts)]) if world > 1 else [dict(errors.counts)]
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return {}
    skipped: dict[str, int] = {}
    for counts in all_errors:
        for k, v in counts.items():
            skipped[k] = skipped.get(k, 0) + v
    images_run = progress.images - images_before
    final_dir = acc.unwrap_model(model).export(
        out_dir / "final", {"pretrain": {"mode": kind, "steps": trainer.step, "config_hash": section_hash(p)}}
    )
    last = trainer.bar.last_losses()
    summary = {
        "mode": kind,
        "steps": trainer.step,
        "steps_this_run": trainer.step - start_step,
        "resumed_from": start_step if resumed else None,
        "images": progress.images,
        "images_this_run": images_run,
        "global_batch": p.batch_size * p.grad_accum * world,
        "processes": world,
        "seconds": seconds,
        "images_per_s": images_run / seconds if seconds > 0 else 0.0,
        "final_losses": last,
        "peak_memory_mb": _peak_memory_mb(acc.device),
        "precision": precision,
        "skipped_samples": skipped,
        "final": str(final_dir),
        "run_hash": run,
    }
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    if dump is not None:
        atomic_write_json(p.debug_dump, dump.data)
    for line in errors.report_lines() if errors.counts else []:
        log.warning(line)
    loss_txt = ", ".join(f"{k} {v:.4f}" for k, v in last.items()) or "no steps run"
    skipped_txt = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "none"
    print(
        f"pretrain ({kind}): {trainer.step} steps ({trainer.step - start_step} this run) x {summary['global_batch']} "
        f"images, {images_run} images in {seconds:.1f} s ({summary['images_per_s']:.1f} images/s on {world} "
        f"process(es), {precision}); final {loss_txt}; skipped samples: {skipped_txt}; student in {final_dir}"
    )
    acc.wait_for_everyone()
    return summary
