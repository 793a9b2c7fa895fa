"""Concept assignment of teacher region embeddings (pure tensor maths; RegionCLIP's labelling).

``softmax(cos(region, concept) / temperature)`` over the concept pool (or over a sample's own
candidates), keep regions whose top probability passes a threshold; the per-sample generator that
makes a sample's region draw independent of batching and process count.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor


def assign_concepts(
    region_emb: Tensor,
    concept_emb: Tensor,
    temperature: float = 0.01,
    threshold: float = 0.1,
    topk: int = 20,
    candidates: Tensor | None = None,
    keep_all_if_none: bool = True,
) -> dict[str, Tensor]:
    """Assign each region to concepts by ``softmax(cos(region, concept) / temperature)``.

    Args:
        region_emb: [R, D] teacher region embeddings (any scale; rows are L2-normalised here).
        concept_emb: [K, D] concept embeddings (rows L2-normalised here).
        threshold: keep a region when its top probability is > ``threshold``.
        topk: concept ids and logits returned per region (``k = min(topk, K)``).
        candidates: LongTensor [C] of concept ids the softmax runs over (caption mode); None = all
            K. An empty tensor keeps no region.
        keep_all_if_none: RegionCLIP's fallback: when no region passes the threshold, keep all.

    Returns:
        ``keep`` bool [R]; ``hard`` int64 [R] (argmax concept id, -1 without candidates);
        ``score`` float32 [R] (top probability); ``topk_ids`` int64 [R, k] and ``topk_logits``
        float32 [R, k] (cos / temperature, best first; id -1 and logit -inf past the candidates).
        Probabilities come from ``log_softmax`` (at temperature 0.01 logits span ±100, where a
        plain softmax would underflow).
    """
    if region_emb.dim() != 2 or concept_emb.dim() != 2 or region_emb.shape[1] != concept_emb.shape[1]:
        raise ValueError(
            f"expected region_emb [R, D] and concept_emb [K, D], got {tuple(region_emb.shape)} "
            f"and {tuple(concept_emb.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n_regions, n_concepts = region_emb.shape[0], concept_emb.shape[0]
    k = min(topk, n_concepts)
    device = region_emb.device
    logits = (
        F.normalize(region_emb.float(), dim=-1) @ F.normalize(concept_emb.float(), dim=-1).T / temperature
    )
    if candidates is not None:
        candidates = torch.as_tensor(candidates, dtype=torch.long, device=device)
        if candidates.numel() and (candidates.min() < 0 or candidates.max() >= n_concepts):
            raise ValueError(
                f"candidate concept ids must lie in [0, {n_concepts}), got {candidates.tolist()}"
            )
        allowed = torch.zeros(n_concepts, dtype=torch.bool, device=device)
        allowed[candidates] = True
        logits = logits.masked_fill(~allowed, float("-inf"))
        if not allowed.any():
            return {
                "keep": torch.zeros(n_regions, dtype=torch.bool, device=device),
                "hard": torch.full((n_regions,), -1, dtype=torch.long, device=device),
                "score": torch.zeros(n_regions, device=device),
                "topk_ids": torch.full((n_regions, k), -1, dtype=torch.long, device=device),
                "topk_logits": torch.full((n_regions, k), float("-inf"), device=device),
            }
    top_logp, hard = F.log_softmax(logits, dim=-1).max(dim=-1)
    score = top_logp.exp()
    keep = score > threshold
    if keep_all_if_none and not keep.any():
        keep = torch.ones_like(keep)
    topk_logits, topk_ids = logits.topk(k, dim=-1)
    topk_ids = topk_ids.masked_fill(torch.isinf(topk_logits), -1)
    return {"keep": keep, "hard": hard, "score": score, "topk_ids": topk_ids, "topk_logits": topk_logits}


def sample_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator seeded by ``(seed, key)``: a sample's draw is the same in any batch or process."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
