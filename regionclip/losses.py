"""RegionCLIP pretraining losses (docs/design.md).

Pure functions on embeddings; every one L2-normalises its inputs, divides cosines by a fixed
temperature (default 0.01, so logits span ±100) and works in log space (``log_softmax`` /
``logsumexp``), never taking the log of a probability that can underflow. Inputs in fp16/bf16 are
upcast to fp32 and autocast is switched off inside, since bf16 cannot resolve logits near ±100.

- :func:`region_concept_contrastive`: multi-instance CE of each kept region against the pseudo
  concepts of the kept regions in the local batch (same concept = positive, probabilities summed).
- :func:`distillation_kl`: KL(teacher ‖ student) over the whole concept pool, ``batchmean``;
  the teacher distribution comes from :func:`teacher_log_probs_from_embeddings` (exact, from the
  stored fp16 teacher region embeddings) or :func:`teacher_log_probs_from_topk` (renormalised over
  the stored top-k logits).
- :func:`image_text_contrastive`: symmetric CE over the batch gathered across processes with
  gradient -- open_clip's ``ClipLoss`` as is (see its docstring for the gradient scaling).
- :class:`RegionCLIPLoss`: the weighted sum; terms with weight 0 are not computed at all, so
  ``image_text_weight=1`` alone is a plain CLIP loss.

Region losses run per process on the local kept regions (as in RegionCLIP); the caller passes
only kept regions. An empty set gives a zero that stays connected to the inputs' graph, so every
parameter still receives a (zero) gradient and DDP's gradient all-reduce does not wait forever.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor, nn

DEFAULT_TEMPERATURE = 0.01


@contextlib.contextmanager
def _full_precision(x: Tensor) -> Iterator[None]:
    """Run the body with autocast off on ``x``'s device type."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        yield


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_temperature(temperature: float, name: str = "temperature") -> float:
    if not temperature > 0:
        raise ValueError(f"{name} must be > 0, got {temperature}")
    return float(temperature)


def _check_2d(x: Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(x.shape)}")


def _zero_with_grad(*tensors: Tensor) -> Tensor:
    """0 connected to the graph of ``tensors`` (all empty, so their sums are exactly 0, never NaN)."""
    return sum(t.sum() for t in tensors) * 0.0


def cosine_logits(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """``normalize(a) @ normalize(b).T / temperature``: a [N, D], b [M, D] → [N, M] (fp32 or wider)."""
    return F.normalize(_upcast(a), dim=-1) @ F.normalize(_upcast(b), dim=-1).T / temperature


def mil_cross_entropy(logits: Tensor, positives: Tensor) -> Tensor:
    """Multi-instance CE: mean over rows of ``-log sum_{j in pos_i} softmax(logits_i)_j``.

    logits [N, M], positives [N, M] bool; every row needs at least one positive. Computed as
    ``logsumexp(logits_i) - logsumexp(logits_i[pos_i])`` (RegionCLIP's ``MILCrossEntropy`` with
    summed positive probabilities, in log space). Returns a scalar.
    """
    masked = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)).mean()


def region_concept_contrastive(
    region_emb: Tensor,
    target_ids: Tensor,
    concept_emb: Tensor | None = None,
    *,
    target_emb: Tensor | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
) -> Tensor:
    """RegionCLIP's region–concept contrastive loss over the kept regions of the local batch.

    region_emb [N, D]: student embeddings of the kept regions. target_ids [N] (int): their pseudo
    concept ids. The concept side is either ``concept_emb`` [K, D], the pool (rows
    ``target_ids`` are used), or ``target_emb`` [N, D], the targets' embeddings already gathered
    (row i belongs to region i). Exactly one of the two must be given.

    logits = normalize(region) @ normalize(target).T / temperature → [N, N]; column j is a
    positive for row i when ``target_ids[j] == target_ids[i]`` (duplicates of one concept are all
    positives, their probabilities summed); loss = mean_i(logsumexp(logits_i) -
    logsumexp(logits_i[pos_i])). Negatives are only the other kept regions' concepts.

    N == 0 (no kept region in this batch) returns 0 connected to ``region_emb``'s graph.
    """
    temperature = _check_temperature(temperature)
    _check_2d(region_emb, "region_emb")
    if (concept_emb is None) == (target_emb is None):
        raise ValueError("give exactly one of concept_emb [K, D] (with target_ids) or target_emb [N, D]")
    if target_ids.dim() != 1 or target_ids.shape[0] != region_emb.shape[0]:
        raise ValueError(
            f"target_ids must be [N] with N = {region_emb.shape[0]} regions, got shape {tuple(target_ids.shape)}"
        )
    if target_ids.dtype.is_floating_point:
        raise ValueError(f"target_ids must be integer concept ids, got {target_ids.dtype}")
    if target_emb is None:
        _check_2d(concept_emb, "concept_emb")
        target_emb = concept_emb[target_ids]
    else:
        _check_2d(target_emb, "target_emb")
        if target_emb.shape[0] != region_emb.shape[0]:
            raise ValueError(
                f"target_emb has {target_emb.shape[0]} rows but region_emb has {region_emb.shape[0]}"
            )
    if region_emb.shape[1] != target_emb.shape[1]:
        raise ValueError(
            f"embedding dims differ: regions {region_emb.shape[1]}, concepts {target_emb.shape[1]}"
        )
    if region_emb.shape[0] == 0:
        return _zero_with_grad(region_emb, target_emb)
    with _full_precision(region_emb):
        logits = cosine_logits(region_emb, target_emb, temperature)
        return mil_cross_entropy(logits, target_ids[:, None] == target_ids[None, :])


def teacher_log_probs_from_embeddings(
    teacher_emb: Tensor, concept_emb: Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> Tensor:
    """Exact teacher distribution: ``log_softmax(normalize(t) @ normalize(c).T / T)``.

    teacher_emb [N, D] (e.g. the fp16 region embeddings stored in pseudo-label shards),
    concept_emb [K, D] (the teacher's concept pool) → [N, K] fp32 log-probabilities.
    """
    temperature = _check_temperature(temperature)
    _check_2d(teacher_emb, "teacher_emb")
    _check_2d(concept_emb, "concept_emb")
    if teacher_emb.shape[1] != concept_emb.shape[1]:
        raise ValueError(
            f"embedding dims differ: teacher regions {teacher_emb.shape[1]}, concepts {concept_emb.shape[1]}"
        )
    with _full_precision(teacher_emb):
        return torch.log_softmax(cosine_logits(teacher_emb, concept_emb, temperature), dim=1)


def teacher_log_probs_from_topk(topk_ids: Tensor, topk_logits: Tensor, num_concepts: int) -> Tensor:
    """Teacher distribution renormalised over its stored top-k concepts.

    topk_ids [N, k] (distinct ids in [0, K) per row), topk_logits [N, k] (the teacher's logits as
    stored, i.e. already divided by its temperature) → [N, K] fp32 log-probabilities:
    ``log_softmax`` over the k stored logits at their ids, ``-inf`` everywhere else. Id -1 with
    logit -inf is padding (caption-mode rows with fewer than k candidates) and is ignored; every
    row needs at least one real id.
    """
    _check_2d(topk_ids, "topk_ids")
    if topk_logits.shape != topk_ids.shape:
        raise ValueError(
            f"topk_logits shape {tuple(topk_logits.shape)} != topk_ids shape {tuple(topk_ids.shape)}"
        )
    if topk_ids.dtype.is_floating_point:
        raise ValueError(f"topk_ids must be integer concept ids, got {topk_ids.dtype}")
    n, k = topk_ids.shape
    if k == 0 or k > num_concepts:
        raise ValueError(f"top-k width must be in [1, K={num_concepts}], got {k}")
    pad = topk_ids == -1
    if n and (topk_ids.min() < -1 or topk_ids.max() >= num_concepts):
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        raise ValueError(
            f"topk_ids must lie in [0, {num_concepts}) (-1 = padding), got values in [{lo}, {hi}]"
        )
    if (pad & (topk_logits != float("-inf"))).any() or pad.all(dim=1).any():
        raise ValueError("topk_ids padding (-1) must carry logit -inf and leave at least one real id per row")
    ids_sorted = topk_ids.sort(dim=1).values
    if ((ids_sorted[:, 1:] == ids_sorted[:, :-1]) & (ids_sorted[:, 1:] >= 0)).any():
        raise ValueError("topk_ids repeat a concept within a row; the teacher top-k must be distinct ids")
    with _full_precision(topk_logits):
        log_probs = torch.log_softmax(_upcast(topk_logits), dim=1)
        # padding scatters into an extra column K that is dropped
        full = log_probs.new_full((n, num_concepts + 1), float("-inf"))
        ids = topk_ids.long().masked_fill(pad, num_concepts)
        return full.scatter(1, ids, log_probs)[:, :num_concepts]


def distillation_kl(
    student_region_emb: Tensor,
    concept_emb: Tensor,
    teacher_log_probs: Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
) -> Tensor:
    """KL(teacher ‖ student) over the full concept pool, ``batchmean``.

    student_region_emb [N, D] (kept regions), concept_emb [K, D], teacher_log_probs [N, K]
    (log-probabilities; ``-inf`` allowed) → scalar
    ``(1/N) sum_i sum_k p_ik (log p_ik - log q_ik)`` with ``q_i = softmax(normalize(s_i) @
    normalize(C).T / temperature)``. Terms with ``p_ik == 0`` contribute exactly 0 (also to the
    gradient), so a top-k teacher with ``-inf`` entries gives a finite loss.

    N == 0 returns 0 connected to ``student_region_emb``'s graph.
    """
    temperature = _check_temperature(temperature)
    _check_2d(student_region_emb, "student_region_emb")
    _check_2d(concept_emb, "concept_emb")
    _check_2d(teacher_log_probs, "teacher_log_probs")
    n, k = student_region_emb.shape[0], concept_emb.shape[0]
    if teacher_log_probs.shape != (n, k):
        raise ValueError(
            f"teacher_log_probs must be [N={n}, K={k}] (kept regions x concept pool), got {tuple(teacher_log_probs.shape)}"
        )
    if student_region_emb.shape[1] != concept_emb.shape[1]:
        raise ValueError(
            f"embedding dims differ: regions {student_region_emb.shape[1]}, concepts {concept_emb.shape[1]}"
        )
    if n == 0:
        return _zero_with_grad(student_region_emb)
    with _full_precision(student_region_emb):
        student = torch.log_softmax(cosine_logits(student_region_emb, concept_emb, temperature), dim=1)
        teacher = _upcast(teacher_log_probs)
        p = teacher.exp()
        # p == 0 (log p = -inf or underflow): 0 * (0 - log q) = 0 instead of 0 * inf = NaN.
        terms = p * (teacher.masked_fill(p == 0, 0.0) - student)
        return terms.sum() / n


def image_text_contrastive(
    image_emb: Tensor,
    text_emb: Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    *,
    gather_with_grad: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Tensor:
    """Symmetric image–text CE over the global batch (RegionCLIP ``loss_img_txt_level``).

    image_emb [B, D], text_emb [B, D] (this process's pairs; every process must hold the same B)
    → scalar ``(CE(S, arange) + CE(S.T, arange)) / 2`` with ``S = normalize(I) @ normalize(T).T /
    temperature`` over the batch gathered from all ``world_size`` processes.

    This is open_clip 3.3.0's ``ClipLoss(local_loss=False, gather_with_grad, rank, world_size)``
    with ``logit_scale = 1 / temperature`` on L2-normalised inputs (ClipLoss does not normalise);
    with ``world_size == 1`` nothing is gathered. With ``gather_with_grad`` the gather is
    ``torch.distributed.nn.all_gather``, whose backward sums the gradients of all ranks: every rank
    computes the same global loss L, so the gradient on a rank's local rows is ``world_size *
    dL/d(rows)``, and DDP's average over ranks gives exactly the single-process gradient of L on the
    global batch. Without it, only the local rows carry gradient (``1 * dL/d(rows)``), so after
    DDP's average the gradient is ``1 / world_size`` of the single-process one.
    """
    temperature = _check_temperature(temperature)
    _check_2d(image_emb, "image_emb")
    _check_2d(text_emb, "text_emb")
    if image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} must match"
        )
    if image_emb.shape[0] == 0:
        raise ValueError("image_text_contrastive needs at least one image-text pair per process")
    loss = ClipLoss(local_loss=False, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)
    with _full_precision(image_emb):
        return loss(
            F.normalize(_upcast(image_emb), dim=-1), F.normalize(_upcast(text_emb), dim=-1), 1.0 / temperature
        )


class RegionCLIPLoss(nn.Module):
    """Weighted sum of the three RegionCLIP losses (each weight 1, temperature 0.01 by default).

    ``forward(inputs)`` takes a mapping of tensors and returns ``{"image_text", "distill",
    "contrastive"}`` (the unweighted terms whose weight is non-zero; the others are not computed)
    plus ``"loss"``, the weighted total. Keys read per term:

    - image_text: ``image_emb`` [B, D], ``text_emb`` [B, D];
    - contrastive: ``region_emb`` [N, D] (kept regions only), ``target_ids`` [N], ``concept_emb`` [K, D];
    - distill: ``region_emb``, ``concept_emb`` and the teacher as one of ``teacher_log_probs``
      [N, K]; ``teacher_emb`` [N, D'] (with ``teacher_concept_emb`` [K, D'] when the teacher's pool
      differs from ``concept_emb``; rebuilt at ``teacher_temperature``); or ``topk_ids`` +
      ``topk_logits`` [N, k].

    ``RegionCLIPLoss(distill_weight=0, contrastive_weight=0)`` is a plain CLIP loss.
    """

    def __init__(
        self,
        image_text_weight: float = 1.0,
        distill_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        image_text_temperature: float = DEFAULT_TEMPERATURE,
        distill_temperature: float = DEFAULT_TEMPERATURE,
        contrastive_temperature: float = DEFAULT_TEMPERATURE,
        teacher_temperature: float = DEFAULT_TEMPERATURE,
        gather_with_grad: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.weights = {
            "image_text": image_text_weight,
            "distill": distill_weight,
            "contrastive": contrastive_weight,
        }
        for name, w in self.weights.items():
            if w < 0:
                raise ValueError(f"{name} loss weight must be >= 0, got {w}")
        if not any(self.weights.values()):
            raise ValueError("all loss weights are 0; at least one term must be on")
        self.image_text_temperature = _check_temperature(image_text_temperature, "image_text_temperature")
        self.distill_temperature = _check_temperature(distill_temperature, "distill_temperature")
        self.contrastive_temperature = _check_temperature(contrastive_temperature, "contrastive_temperature")
        self.teacher_temperature = _check_temperature(teacher_temperature, "teacher_temperature")
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    @staticmethod
    def _get(inputs: Mapping[str, Tensor], key: str, term: str) -> Tensor:
        if key not in inputs:
            raise KeyError(f"{term} loss needs input {key!r}; got keys {sorted(inputs)}")
        return inputs[key]

    def teacher_log_probs(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """[N, K] teacher log-probabilities from whichever teacher form ``inputs`` carries."""
        if "teacher_log_probs" in inputs:
            return inputs["teacher_log_probs"]
        concepts = self._get(inputs, "concept_emb", "distill")
        if "teacher_emb" in inputs:
            pool = inputs.get("teacher_concept_emb", concepts)
            return teacher_log_probs_from_embeddings(inputs["teacher_emb"], pool, self.teacher_temperature)
        if "topk_ids" in inputs and "topk_logits" in inputs:
            return teacher_log_probs_from_topk(inputs["topk_ids"], inputs["topk_logits"], concepts.shape[0])
        raise KeyError(
            "distill loss needs 'teacher_log_probs', 'teacher_emb' or 'topk_ids' + 'topk_logits'; "
            f"got keys {sorted(inputs)}"
        )

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.weights["image_text"]:
            out["image_text"] = image_text_contrastive(
                self._get(inputs, "image_emb", "image_text"),
                self._get(inputs, "text_emb", "image_text"),
                self.image_text_temperature,
                gather_with_grad=self.gather_with_grad,
                rank=self.rank,
                world_size=self.world_size,
            )
        if self.weights["distill"]:
            out["distill"] = distillation_kl(
                self._get(inputs, "region_emb", "distill"),
                self._get(inputs, "concept_emb", "distill"),
                self.teacher_log_probs(inputs),
                self.distill_temperature,
            )
        if self.weights["contrastive"]:
            out["contrastive"] = region_concept_contrastive(
                self._get(inputs, "region_emb", "contrastive"),
                self._get(inputs, "target_ids", "contrastive"),
                self._get(inputs, "concept_emb", "contrastive"),
                temperature=self.contrastive_temperature,
            )
        out["loss"] = sum(self.weights[name] * value for name, value in out.items())
        return out
