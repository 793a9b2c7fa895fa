"""Resumable training state without pickle, behind one interface (:class:`Checkpointer`).

- :class:`StateFileCheckpointer` (the RPN and the detector transfer, one process): a folder with
  ``step-NNNNNNNN.safetensors`` (model weights, SGD momentum buffers, RNG state) and
  ``latest.json`` (step, file, resume hash, progress counters); only the newest step is kept.
- :class:`AccelerateCheckpointer` (the student, one to many processes):
  ``checkpoints/checkpoint_<step>/`` with Accelerate's ``save_state`` files (model safetensors,
  optimizer and per-process RNG states, read back with ``weights_only=True``), the caller's extra
  per-process files (the data position) and ``state.json``. Written to a temporary folder and
  renamed when complete; folders are named by step (Accelerate's own counter restarts at 0 after
  ``load_state``); the newest ``keep`` are kept.

Both record a *resume hash* of the settings that shape the training trajectory and refuse to
resume from a checkpoint written under other settings, naming the folder to delete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch
from torch import nn

from regionclip.engine.run_cache import read_record
from regionclip.errors import InputError
from regionclip.utils import apply_umask, atomic_output, atomic_write_json

FORMAT = "regionclip.sgd-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")


class Checkpointer(Protocol):
    def load(self) -> tuple[int, dict[str, Any]]:
        """Restore the newest checkpoint; ``(step, progress)``, or ``(0, {})`` when there is none."""
        ...

    def save(self, step: int, progress: dict[str, Any]) -> None: ...


class StateFileCheckpointer:
    """Model + SGD momentum + CPU/CUDA RNG in one safetensors file per step (see the module doc).

    ``what`` names the settings in the refusal message; ``error`` is the stage's error type.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        resume_hash: str,
        what: str,
        error: type[InputError] = InputError,
    ):
        self.folder, self.model, self.optimizer = Path(folder), model, optimizer
        self.resume_hash, self.what, self.error = resume_hash, what, error

    def save(self, step: int, progress: dict[str, Any]) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        for p, state in self.optimizer.state.items():
            if state.get("momentum_buffer") is not None:
                tensors[f"momentum.{names[id(p)]}"] = state["momentum_buffer"].detach().cpu().contiguous()
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        name = f"step-{step:08d}.safetensors"
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.folder / name) as tmp:
            safetensors.torch.save_file(tensors, str(tmp))
        atomic_write_json(
            self.folder / "latest.json",
            {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "file": name,
             "resume_hash": self.resume_hash, **progress},
        )  # fmt: skip
        for old in self.folder.glob("step-*.safetensors"):
            if old.name != name:
                old.unlink()

    def load(self) -> tuple[int, dict[str, Any]]:
        latest = self.folder / "latest.json"
        if not latest.is_file():
            return 0, {}
        try:
            meta = json.loads(latest.read_text(encoding="utf-8"))
            tensors = safetensors.torch.load_file(str(self.folder / meta["file"]))
        except Exception as e:  # any unreadable checkpoint: say which and how to recover
            raise self.error(f"cannot resume from {latest}: {e}; delete {self.folder} to start over") from e
        if meta.get("format") != FORMAT or meta.get("resume_hash") != self.resume_hash:
            raise self.error(
                f"checkpoint {latest} was written with a different {self.what}; restore it or delete "
                f"{self.folder} to start over"
            )
        device = next(self.model.parameters()).device
        self.model.load_state_dict(
            {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        )
        params = dict(self.model.named_parameters())
        for key, value in tensors.items():
            if key.startswith("momentum."):
                self.optimizer.state[params[key[len("momentum.") :]]]["momentum_buffer"] = value.to(device)
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        progress = {
            k: v for k, v in meta.items() if k not in ("format", "version", "step", "file", "resume_hash")
        }
        return int(meta["step"]), progress

    def clear(self) -> None:
        """Remove the folder (the run finished: its final weights are the result)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def accelerate_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    found = []
    for d in root.glob("checkpoint_*") if root.is_dir() else []:
        m = CHECKPOINT_RE.match(d.name)
        if m and (d / "state.json").is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


class AccelerateCheckpointer:
    """Accelerate's ``save_state`` per step under ``<out_dir>/checkpoints`` (see the module doc).

    ``save_extra(folder)`` / ``load_extra(folder)`` write and read each process's own files (the
    data position); ``what`` names the settings of ``resume_hash`` in the refusal message.
    """

    def __init__(
        self,
        accelerator: Any,
        out_dir: str | os.PathLike,
        resume_hash: str,
        what: str,
        keep: int = 0,
        save_extra: Callable[[Path], None] = lambda folder: None,
        load_extra: Callable[[Path], None] = lambda folder: None,
    ):
        self.acc, self.out_dir, self.keep = accelerator, Path(out_dir), keep
        self.resume_hash, self.what = resume_hash, what
        self.save_extra, self.load_extra = save_extra, load_extra

    def load(self) -> tuple[int, dict[str, Any]]:
        found = accelerate_checkpoints(self.out_dir)
        if not found:
            return 0, {}
        step, folder = found[-1]
        state = read_record(folder / "state.json")
        if state is None:
            raise InputError(
                f"cannot resume from {folder}: state.json is unreadable; delete {folder} to start over"
            )
        if state.get("resume_hash") != self.resume_hash:
            raise InputError(
                f"checkpoint {folder} was written with a different {self.what}; restore the config, or "
                f"delete {self.out_dir / 'checkpoints'} to start over"
            )
        try:
            self.load_extra(folder)
            self.acc.load_state(str(folder))
        except Exception as e:  # a truncated or foreign file: name the folder and the way out
            raise InputError(
                f"cannot resume from {folder}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                f"delete {folder} to resume from the checkpoint before it"
            ) from e
        return step, state

    def save(self, step: int, progress: dict[str, Any]) -> None:
        acc = self.acc
        root = self.out_dir / "checkpoints"
        final, tmp = root / f"checkpoint_{step}", root / f".checkpoint_{step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        self.save_extra(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(tmp / "state.json", {"step": step, "resume_hash": self.resume_hash, **progress})
            apply_umask(tmp)  # Accelerate writes model.safetensors owner-only
            if final.exists():  # a rerun after a crash between this rename and the next step
                shutil.rmtree(final)
            os.replace(tmp, final)
            if self.keep > 0:
                for _, old in accelerate_checkpoints(self.out_dir)[: -self.keep]:
                    shutil.rmtree(old)
        acc.wait_for_everyone()
