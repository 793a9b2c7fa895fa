"""Open-vocabulary box classifier: frozen class text embeddings, background logit fixed at 0.

RegionCLIP's ``FastRCNNOutputLayers`` with ``USE_TEXT_EMB_CLASSIFIER``:
logits = cat(cos(x, w_c) for the C classes, 0 for background) / temperature. The class weights
are normalised text embeddings held as a buffer, so nothing of the classifier trains and the
vocabulary can be swapped at test time (train on base classes, test on base + novel).

Index convention (as Detectron2 / RegionCLIP): classes are ``0 .. C-1`` and **background is
the last index, C**. The detector's labels and :func:`ov_classification_loss` follow it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TextClassifier(nn.Module):
    """Region embeddings ``[N, D]`` → logits ``[N, C + 1]`` (background last, always 0 before scaling).

    Args:
        dim: D, the region embedding size of the model; embeddings of another size are refused.
        embeddings: ``[C, D]`` class text embeddings (normalised here).
        temperature: logits are cosine similarities divided by this (RegionCLIP: 0.01).

    The embeddings buffer is not persistent: checkpoints hold the network, the vocabulary comes
    from the embeddings file of the run.
    """

    def __init__(self, dim: int, embeddings: Tensor, temperature: float = 0.01):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.dim = int(dim)
        self.temperature = float(temperature)
        self.register_buffer("weight", torch.empty(0, self.dim), persistent=False)
        self.set_embeddings(embeddings)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def set_embeddings(self, embeddings: Tensor) -> None:
        """Replace the vocabulary with ``[C', D]`` embeddings; the output becomes ``[N, C' + 1]``."""
        embeddings = torch.as_tensor(embeddings)
        if embeddings.dim() != 2 or embeddings.shape[0] == 0:
            raise ValueError(
                f"class embeddings must have shape [C, D] with C > 0, got {tuple(embeddings.shape)}"
            )
        if embeddings.shape[1] != self.dim:
            raise ValueError(
                f"class embedding dimension {embeddings.shape[1]} does not match the model's region "
                f"embedding dimension {self.dim}; embed the class names with the same CLIP model"
            )
        if not torch.isfinite(embeddings).all():
            raise ValueError("class embeddings contain NaN or inf")
        self.weight = F.normalize(embeddings.detach().float(), dim=-1).to(self.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [N, D] → logits [N, C + 1]: ``cat(cos(x, W), 0) / temperature``, in fp32 also under
        autocast (at temperature 0.01 a bf16 cosine would move a logit by up to 0.4)."""
        with torch.autocast(x.device.type, enabled=False):
            cos = F.normalize(x.float(), dim=-1) @ self.weight.t()
        background = cos.new_zeros(cos.shape[0], 1)  # a constant: no parameter, no gradient
        return torch.cat([cos, background], dim=1) / self.temperature


def ov_classification_loss(
    logits: Tensor, labels: Tensor, bg_weight: float = 0.2, focal_gamma: float = 0.5
) -> Tensor:
    """RegionCLIP's classification loss on sampled RoIs (``FOCAL_SCALED_LOSS`` + ``BG_CLS_LOSS_WEIGHT``).

    ``loss_i = CE_i · (1 − p_t,i)^γ · w_i`` with ``w_i = bg_weight`` for background RoIs (label C,
    the last column) and 1 otherwise, averaged over **all** RoIs (divided by N, not by the sum of
    weights — as RegionCLIP's ``focal_loss(reduction="mean")``). ``γ = 0`` is weighted plain CE.

    Computed in log space (CE from log-softmax, ``1 − p_t = −expm1(−CE)``), so logits at
    temperature 0.01 (±100) cannot underflow. As in RegionCLIP, ``p_t`` is not detached; it is
    clamped away from 1 so that the gradient of ``(1 − p_t)^γ`` stays finite.

    Args:
        logits: ``[N, C + 1]``; labels: int64 ``[N]`` in ``0 .. C`` (C = background).

    Returns:
        scalar; 0 (connected to the graph) when N = 0.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [N, C+1] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if labels.numel() == 0:
        return logits.sum() * 0.0
    background = logits.shape[1] - 1
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    if focal_gamma:
        one_minus_pt = (-torch.expm1(-ce)).clamp(min=1e-12)
        ce = ce * one_minus_pt**focal_gamma
    weight = torch.where(labels == background, ce.new_tensor(bg_weight), ce.new_tensor(1.0))
    return (ce * weight).mean()
