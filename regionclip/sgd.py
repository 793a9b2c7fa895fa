"""Pieces shared by the small SGD loops (RPN, detector transfer): one optimizer step, running
loss means for the progress bar, and resumable training state without pickle.

A checkpoint folder holds ``step-NNNNNNNN.safetensors`` (model weights, SGD momentum buffers, RNG
states) and ``latest.json`` (step, file, a ``resume_hash`` of the settings that shape the training
trajectory, and progress counters). Only the newest step file is kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

from regionclip.utils import atomic_output, atomic_write_json

FORMAT = "regionclip.sgd-checkpoint"
FORMAT_VERSION = 1
PROGRESS_KEYS = ("images", "seconds", "skipped")
RUNNING_WINDOW = 20  # steps averaged in the progress-bar losses


def optimizer_step(
    losses: dict[str, Tensor], optimizer: torch.optim.Optimizer, where: str, lr_key: str
) -> None:
    """Backward + step on the summed ``losses``; a non-finite total stops the run naming ``where``."""
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{where}: non-finite loss { ({k: float(v) for k, v in losses.items()}) }; lower {lr_key}"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def update_running(recent: dict[str, list[float]], losses: dict[str, Tensor]) -> dict[str, str]:
    """Append this step's losses to ``recent`` (last RUNNING_WINDOW kept); the progress-bar postfix."""
    for k, v in losses.items():
        recent[k] = (recent.get(k, []) + [v.item()])[-RUNNING_WINDOW:]
    return {k.removeprefix("loss_"): f"{np.mean(v):.3f}" for k, v in recent.items()}


def save_checkpoint(
    ckpt_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    resume_hash: str,
    progress: dict,
) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for p, state in optimizer.state.items():
        if state.get("momentum_buffer") is not None:
            tensors[f"momentum.{names[id(p)]}"] = state["momentum_buffer"].detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    name = f"step-{step:08d}.safetensors"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(ckpt_dir / name) as tmp:
        safetensors.torch.save_file(tensors, str(tmp))
    atomic_write_json(
        ckpt_dir / "latest.json",
        {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "file": name,
         "resume_hash": resume_hash, **progress},
    )  # fmt: skip
    for old in ckpt_dir.glob("step-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(
    ckpt_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    resume_hash: str,
    what: str,
    error: type[Exception] = ValueError,
) -> tuple[int, dict[str, Any]]:
    """Restore the latest checkpoint into ``model``/``optimizer``/RNG; ``(step, progress)`` or ``(0, {})``.

    Raises:
        error: unreadable checkpoint, or one written with other settings (``what`` names them).
    """
    latest = ckpt_dir / "latest.json"
    if not latest.is_file():
        return 0, {}
    try:
        meta = json.loads(latest.read_text(encoding="utf-8"))
        tensors = safetensors.torch.load_file(str(ckpt_dir / meta["file"]))
    except Exception as e:  # any unreadable checkpoint: say which and how to recover
        raise error(f"cannot resume from {latest}: {e}; delete {ckpt_dir} to start over") from e
    if meta.get("format") != FORMAT or meta.get("resume_hash") != resume_hash:
        raise error(
            f"checkpoint {latest} was written with a different {what}; restore it or delete {ckpt_dir} to start over"
        )
    device = next(model.parameters()).device
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key.startswith("momentum."):
            optimizer.state[params[key[len("momentum.") :]]]["momentum_buffer"] = value.to(device)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"]), {k: meta[k] for k in PROGRESS_KEYS if k in meta}
