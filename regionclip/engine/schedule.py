"""The one learning-rate schedule of every training loop (RPN, detector transfer, student).

Detectron2's ``WarmupMultiStepLR`` / ``WarmupCosineLR`` as a pure function of the step, so that a
resumed run needs no scheduler state: linear warm-up from ``lr * warmup_factor`` over
``warmup_steps``, then either ×``gamma`` at each milestone (fractions of ``steps``; milestone
``m`` starts at step ``int(m * steps)``, rounded down as Detectron2's configs write step numbers)
or a cosine from ``lr`` to 0 at ``steps``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("multistep", "cosine")


@dataclass(frozen=True)
class Schedule:
    lr: float
    steps: int
    warmup_steps: int = 0
    warmup_factor: float = 0.001
    kind: str = "multistep"
    milestones: Sequence[float] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"schedule {self.kind!r}: expected one of {KINDS}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        warm = 1.0
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            warm = self.warmup_factor * (1 - alpha) + alpha
        if self.kind == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * min(step, self.steps) / self.steps))
        else:
            decay = self.gamma ** sum(step >= int(m * self.steps) for m in self.milestones)
        return self.lr * warm * decay
