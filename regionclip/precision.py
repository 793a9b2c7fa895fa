"""The one compute-precision setting of every stage that runs a model (``<stage>.precision``).

``auto`` | ``fp32`` | ``bf16`` | ``fp16`` (CUDA only). ``auto`` is bf16 where the hardware has it
(a CPU with AVX-512 BF16 or AMX, a bf16-capable GPU) and fp32 elsewhere. Low precision means
autocast: weights stay fp32 (and train in fp32), matrix products and convolutions run in the low
precision, and what must stay exact stays fp32 — losses, box coordinates and RoIAlign sampling
positions.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from regionclip.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_has_bf16() -> bool:
    """The CPU computes bf16 natively (AVX-512 BF16 or AMX), as ``/proc/cpuinfo`` reports."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device, key: str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for setting ``name`` of config ``key`` on ``device``.

    Raises:
        ConfigError: an unknown setting, or fp16 off a GPU (both naming ``key``).
    """
    if name not in PRECISIONS:
        raise ConfigError(f"{key}={name!r}: expected one of {PRECISIONS}")
    cuda = device.type == "cuda"
    if name == "auto":
        supported = torch.cuda.is_bf16_supported() if cuda else cpu_has_bf16()
        return "bf16" if supported else "fp32"
    if name == "fp16" and not cuda:
        raise ConfigError(f"{key}=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return name


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a resolved low precision, a no-op for fp32."""
    if precision not in DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """fp32 inside, also under an enclosing autocast (proposal boxes, losses)."""
    return torch.autocast(device.type, enabled=False)
