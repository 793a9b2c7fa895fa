"""Where pseudo-labelling gets its regions: a :class:`ProposalSource` backed by the trained RPN
(:class:`NetworkProposals`) or by the user's own proposals file (:class:`PrecomputedProposals`),
and RegionCLIP's uniform draw of regions from the top proposals (:func:`sample_proposals`).

Bring-your-own proposals file (``rpn.precomputed``), boxes in original image pixels:

- ``.jsonl``: one ``{"key": sample key, "boxes": [[x0, y0, x1, y1], ...], "scores": [...]}`` per line;
- ``.json``: ``{sample key: {"boxes": [...], "scores": [...]}, ...}``.

``scores`` may be omitted (all 1); boxes must be finite with ``x1 >= x0`` and ``y1 >= y0``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from regionclip.errors import ProposalError
from regionclip.models.rpn import ProposalNetwork, load_rpn
from regionclip.precision import full_precision
from regionclip.utils import parse_json


def sample_proposals(
    boxes: Tensor, scores: Tensor, n: int, generator: torch.Generator, top_k: int | None = None
) -> Tensor:
    """Pick ``n`` proposals uniformly at random without replacement (RegionCLIP: 100 of the top 300).

    Args:
        boxes: ``[R, 4]``; scores: ``[R]``.
        n: how many to draw; all are kept when fewer are available.
        generator: a CPU ``torch.Generator``: the same state gives the same draw.
        top_k: first restrict to the ``top_k`` highest scores (None = all ``R``).

    Returns:
        int64 indices into ``boxes`` ``[min(n, R, top_k)]``, sorted ascending.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"expected boxes [R, 4] and scores [R], got {tuple(boxes.shape)} and {tuple(scores.shape)}"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    candidates = torch.arange(len(scores), device=scores.device)
    if top_k is not None and top_k < len(scores):
        candidates = scores.topk(top_k).indices
    draw = torch.randperm(len(candidates), generator=generator)[:n].to(candidates.device)
    return candidates[draw].sort().values


class ProposalSource(Protocol):
    """Boxes (original pixels, x0y0x1y1) and objectness for a batch of samples."""

    def __call__(
        self, keys: Sequence[str], images: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]: ...


class NetworkProposals:
    """A :class:`ProposalSource` running a trained :class:`ProposalNetwork` (eval, no grad).

    Always in fp32, whatever the stage's precision: proposals are box coordinates, and a bf16 RPN
    would rank and place them differently, so the regions would depend on the precision. Images
    are ``[3, H, W]`` floats in [0, 1] or uint8; results come back on the CPU.
    """

    def __init__(self, model: ProposalNetwork, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, keys: Sequence[str], images: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        self.model.eval()
        batch = [
            img.to(self.device, torch.float32) / (255.0 if img.dtype == torch.uint8 else 1.0)
            for img in images
        ]
        with full_precision(self.device):
            boxes, scores, _ = self.model(batch)
        return [b.cpu() for b in boxes], [s.cpu() for s in scores]


def _parse_proposals(entry: Any, where: str) -> tuple[Tensor, Tensor]:
    if not isinstance(entry, dict) or "boxes" not in entry:
        raise ProposalError(f"{where}: expected an object with 'boxes' (and 'scores')")
    try:
        boxes = np.asarray(entry["boxes"], dtype=np.float64)
        scores = np.asarray(entry["scores"] if "scores" in entry else np.ones(len(boxes)), dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise ProposalError(f"{where}: boxes and scores must be numbers: {e}") from None
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ProposalError(
            f"{where}: boxes must be a list of [x0, y0, x1, y1], got shape {list(boxes.shape)}"
        )
    if scores.shape != (len(boxes),):
        raise ProposalError(f"{where}: {len(boxes)} boxes but scores of shape {list(scores.shape)}")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise ProposalError(f"{where}: boxes and scores must be finite")
    bad = np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
    if len(bad):
        raise ProposalError(f"{where}: box {int(bad[0])} {boxes[bad[0]].tolist()} has x1 < x0 or y1 < y0")
    return torch.from_numpy(boxes).float(), torch.from_numpy(scores).float()


def load_precomputed_proposals(path: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """Read user proposals: ``{key: (boxes [N, 4], scores [N])}`` in original image pixels.

    Formats: ``.jsonl`` (one ``{"key", "boxes", "scores"}`` per line) or JSON
    (``{key: {"boxes": [[x0, y0, x1, y1], ...], "scores": [...]}}``). ``scores`` may be omitted
    (all 1). Malformed entries raise :class:`ProposalError` naming the file and the line or key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ProposalError(f"cannot read proposals file {path}: {e.strerror}") from e
    table: dict[str, tuple[Tensor, Tensor]] = {}
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                entry = parse_json(line)
            except ValueError as e:
                raise ProposalError(f"{where}: invalid JSON: {getattr(e, 'msg', e)}") from None
            key = entry.get("key") if isinstance(entry, dict) else None
            if not isinstance(key, str) or not key:
                raise ProposalError(f"{where}: expected a non-empty string 'key'")
            if key in table:
                raise ProposalError(f"{where}: duplicate key {key!r}")
            table[key] = _parse_proposals(entry, f"{where} (key {key!r})")
        return table
    try:
        data = parse_json(text)
    except json.JSONDecodeError as e:
        raise ProposalError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except ValueError as e:
        raise ProposalError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProposalError(f"{path}: expected an object mapping sample keys to proposals")
    for key, entry in data.items():
        table[key] = _parse_proposals(entry, f"{path}: key {key!r}")
    return table


class PrecomputedProposals:
    """A :class:`ProposalSource` reading a table of user proposals; images are not looked at."""

    def __init__(self, table: dict[str, tuple[Tensor, Tensor]], source: str = "precomputed proposals"):
        self.table, self.source = table, source

    @classmethod
    def from_file(cls, path: str | Path) -> PrecomputedProposals:
        return cls(load_precomputed_proposals(path), str(path))

    def require(self, keys: Iterable[str], where: str) -> None:
        """Refuse, before any work, a table without some of ``keys`` (the images of ``where``).

        Raises:
            ProposalError: naming how many are missing and a few of them.
        """
        missing = [k for k in keys if k not in self.table]
        if missing:
            raise ProposalError(
                f"{self.source}: no proposals for {len(missing)} images of {where}, e.g. {missing[:3]}"
            )

    def __call__(
        self, keys: Sequence[str], images: Sequence[Tensor] = ()
    ) -> tuple[list[Tensor], list[Tensor]]:
        missing = [k for k in keys if k not in self.table]
        if missing:
            raise ProposalError(f"{self.source}: no proposals for sample(s) {missing[:5]}")
        return [self.table[k][0] for k in keys], [self.table[k][1] for k in keys]


def build_proposal_source(
    rpn_dir: str | Path, precomputed: str = "", device: str | torch.device = "cpu"
) -> ProposalSource:
    """The ``precomputed`` proposals file when given, else the RPN trained into ``rpn_dir``."""
    if precomputed:
        return PrecomputedProposals.from_file(precomputed)
    return NetworkProposals(load_rpn(rpn_dir, device), device)
