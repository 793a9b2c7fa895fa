"""The one optimisation loop: the RPN, the detector transfer and the student all train here.

:class:`Trainer` runs optimizer steps ``start .. stop-1``. Per step it sets the learning rate from
the :class:`~regionclip.engine.schedule.Schedule`, runs ``grad_accum`` micro-batches through the
stage's ``step_fn`` (batch → :class:`StepOutput`: named loss terms, image count), stops the run on
a non-finite loss (naming the step, the terms and the batch), back-propagates, clips the gradient
norm when asked, steps the optimizer, and calls its hooks: the progress bar with running loss means
and images/s, periodic checkpoints, and whatever the stage adds (loss logs). The loop itself draws
no random numbers, so a resumed run continues bit for bit.

With an Accelerate ``accelerator`` (the student) backward, gradient accumulation and clipping go
through it, and every micro-step all processes sum their loss terms (one small all-reduce): that
gives the logged mean and lets every process stop together on a non-finite loss.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from regionclip.data.sample_errors import SampleErrors
from regionclip.engine.checkpoint import Checkpointer
from regionclip.engine.schedule import Schedule
from regionclip.errors import TrainingError

RUNNING_WINDOW = 20  # steps averaged in the progress-bar losses


@dataclass
class StepOutput:
    """What ``step_fn`` returns for one micro-batch.

    ``losses``: named scalar terms; the total is ``losses["loss"]`` when present, else their sum.
    ``images``: images that went into them. ``detail``: what names the batch in an error.
    """

    losses: dict[str, Tensor]
    images: int
    detail: str = ""

    def total(self) -> Tensor:
        return self.losses["loss"] if "loss" in self.losses else sum(self.losses.values())


@dataclass
class StepRecord:
    """One finished optimizer step, as hooks see it (loss terms averaged over processes)."""

    step: int  # 1-based: steps done
    losses: dict[str, float]
    lr: float
    grad_norm: float
    images: int


class Hook:
    """Called by :class:`Trainer`; override what you need."""

    def before_train(self, trainer: Trainer) -> None: ...

    def after_backward(self, trainer: Trainer, step: int) -> None:
        """Gradients of step ``step`` (0-based) are complete and not yet clipped."""

    def after_step(self, trainer: Trainer, record: StepRecord) -> None: ...

    def after_train(self, trainer: Trainer) -> None: ...


@dataclass
class Progress:
    """Counters that survive a resume (stored in checkpoints): images trained on, seconds, and the
    bad samples the stage's ``step_fn`` skipped (it adds them to ``skipped``)."""

    images: int = 0
    seconds: float = 0.0
    skipped: SampleErrors = field(default_factory=SampleErrors)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "seconds": self.seconds,
            "skipped": dict(self.skipped.counts),
            **self.extra,
        }


class Trainer:
    """Steps ``model`` with ``optimizer`` on ``schedule`` (see the module doc).

    Args:
        params: the trained parameters (for clipping); default all with ``requires_grad``.
        grad_clip: max global gradient norm; 0 = no clipping.
        measure_grad_norm: compute the norm for the logs even without clipping.
        checkpointer / checkpoint_every: save every N steps (0 = never) while steps remain, and
            when stopped before ``schedule.steps``.
        lr_key: the config key named in the non-finite-loss message.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        *,
        params: Sequence[torch.nn.Parameter] | None = None,
        grad_clip: float = 0.0,
        measure_grad_norm: bool = False,
        grad_accum: int = 1,
        accelerator: Any = None,
        checkpointer: Checkpointer | None = None,
        checkpoint_every: int = 0,
        hooks: Sequence[Hook] = (),
        desc: str = "train",
        lr_key: str = "lr",
        show_progress: bool = True,
    ):
        if grad_accum > 1 and accelerator is None:
            raise ValueError("gradient accumulation needs an accelerator")
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.params = (
            list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        )
        self.grad_clip, self.measure_grad_norm, self.grad_accum = grad_clip, measure_grad_norm, grad_accum
        self.acc = accelerator
        self.checkpointer, self.checkpoint_every = checkpointer, checkpoint_every
        self.bar = ProgressBar(desc, enabled=show_progress)
        self.hooks: list[Hook] = [self.bar, *hooks]
        self.lr_key = lr_key
        self.progress = Progress()
        self.step = 0

    def resume(self) -> int:
        """Restore the newest checkpoint (if any); returns the step to start at."""
        if self.checkpointer is None:
            return 0
        self.step, saved = self.checkpointer.load()
        images, seconds = int(saved.pop("images", 0)), float(saved.pop("seconds", 0.0))
        self.progress = Progress(images, seconds, extra=saved)
        self.progress.skipped.counts.update(saved.pop("skipped", {}))
        return self.step

    def save(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.save(self.step, self.progress.to_dict())

    def _sum_over_processes(self, local: Tensor) -> Tensor:
        if self.acc is None or self.acc.num_processes == 1:
            return local
        return self.acc.reduce(local.to(self.acc.device), "sum").cpu()

    def _check_finite(self, out: StepOutput, names: list[str], local: Tensor, total: Tensor) -> None:
        if torch.isfinite(total).all():
            return
        where = "" if torch.isfinite(local).all() else " on this process"
        if not where and self.acc is not None and self.acc.num_processes > 1:
            where = " on another process"
        values = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, local.tolist(), strict=True))
        detail = f"; {out.detail}" if out.detail else ""
        raise TrainingError(
            f"non-finite loss at step {self.step + 1}{where} ({values}){detail}; lower {self.lr_key}"
        )

    def _backward(self, loss: Tensor) -> None:
        if self.acc is not None:
            self.acc.backward(loss)
        else:
            loss.backward()

    def _clip(self) -> float:
        if not (self.grad_clip > 0 or self.measure_grad_norm):
            return 0.0
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        clip = self.acc.clip_grad_norm_ if self.acc is not None else torch.nn.utils.clip_grad_norm_
        return float(clip(self.params, max_norm))

    def _micro_step(
        self, batch: Any, step_fn: Callable[[Any], StepOutput | None], lr: float
    ) -> tuple[StepOutput | None, Tensor | None, float]:
        """One micro-batch: forward, finite check, backward and (at a sync point) the update."""
        accumulate = self.acc.accumulate(self.model) if self.acc is not None else contextlib.nullcontext()
        grad_norm = 0.0
        with accumulate:
            out = step_fn(batch)
            if out is None:  # no usable sample in this batch
                return None, None, grad_norm
            names = list(out.losses)
            local = torch.stack([out.losses[n].detach().double().cpu() for n in names])
            total = self._sum_over_processes(local)
            self._check_finite(out, names, local, total)
            self._backward(out.total())
            if self.acc is None or self.acc.sync_gradients:
                for hook in self.hooks:
                    hook.after_backward(self, self.step)
                grad_norm = self._clip()
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return out, total, grad_norm

    def fit(self, batches: Iterator[Any], step_fn: Callable[[Any], StepOutput | None], stop: int) -> Progress:
        """Train from the current step to ``stop``; ``batches`` yields ``grad_accum`` items per step.

        Returns the progress counters (also in the checkpoints).
        """
        world = 1 if self.acc is None else self.acc.num_processes
        for hook in self.hooks:
            hook.before_train(self)
        t0, seconds0 = time.perf_counter(), self.progress.seconds
        try:
            while self.step < stop:
                lr = self.schedule.lr_at(self.step)
                sums: dict[str, float] = {}
                images, grad_norm, ran = 0, 0.0, 0
                for _ in range(self.grad_accum):
                    out, total, norm = self._micro_step(next(batches), step_fn, lr)
                    if out is None:
                        continue
                    ran += 1
                    grad_norm = max(grad_norm, norm)
                    images += out.images * world
                    for name, value in zip(out.losses, (total / world).tolist(), strict=True):
                        sums[name] = sums.get(name, 0.0) + value
                self.step += 1
                self.progress.images += images
                self.progress.seconds = seconds0 + time.perf_counter() - t0
                record = StepRecord(
                    self.step, {k: v / max(ran, 1) for k, v in sums.items()}, lr, grad_norm, images
                )
                for hook in self.hooks:
                    hook.after_step(self, record)
                if (
                    self.checkpoint_every > 0
                    and self.step % self.checkpoint_every == 0
                    and self.step < self.schedule.steps
                ):
                    self.save()
        finally:
            for hook in self.hooks:
                hook.after_train(self)
        if self.step < self.schedule.steps:
            self.save()
        return self.progress


class ProgressBar(Hook):
    """tqdm over the steps of this run: running means of the loss terms and images/s."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc, self.enabled = desc, enabled
        self.bar: tqdm | None = None
        self.recent: dict[str, list[float]] = {}
        self.last: dict[str, float] = {}
        self.window: list[tuple[float, int]] = []

    def before_train(self, trainer: Trainer) -> None:
        total = trainer.schedule.steps
        enabled = self.enabled and (trainer.acc is None or trainer.acc.is_main_process)
        self.bar = tqdm(total=total, initial=trainer.step, desc=self.desc, unit="step", disable=not enabled)

    def running_means(self) -> dict[str, float]:
        """Mean of each loss term over the last (up to) RUNNING_WINDOW steps of this run."""
        return {k: float(np.mean(v)) for k, v in self.recent.items()}

    def last_losses(self) -> dict[str, float]:
        """The loss terms of the last step."""
        return dict(self.last)

    def after_step(self, trainer: Trainer, record: StepRecord) -> None:
        assert self.bar is not None
        self.last = dict(record.losses)
        for k, v in record.losses.items():
            self.recent[k] = (self.recent.get(k, []) + [v])[-RUNNING_WINDOW:]
        self.window = (self.window + [(time.perf_counter(), record.images)])[-RUNNING_WINDOW:]
        postfix = {k.removeprefix("loss_"): f"{v:.3f}" for k, v in self.running_means().items()}
        if len(self.window) > 1:
            dt = self.window[-1][0] - self.window[0][0]
            postfix["img_s"] = f"{sum(n for _, n in self.window[1:]) / max(dt, 1e-9):.1f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def after_train(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
