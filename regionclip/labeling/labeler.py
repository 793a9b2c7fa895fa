"""The labeler: proposals → frozen teacher region embeddings → concepts, for batches of images.

- proposals: the source's top ``proposal_pool``, of which ``num_regions`` are drawn uniformly
  with a generator seeded by ``(seed, sample key)``, so a sample's regions do not depend on
  batching, process count or resumption;
- teacher: the whole image at detection size → RoIAlign on the dense features → region
  embeddings (:class:`~regionclip.models.region.RegionEncoder`), frozen, under ``pseudolabel.precision``;
- assignment (:func:`~regionclip.labeling.assignment.assign_concepts`) over the candidates the
  mode gives (:mod:`regionclip.labeling.modes`).

The offline stage and the online training step (:class:`OnlineLabels`) both call
:meth:`PseudoLabeler.label_batch`, so both produce the same
:class:`~regionclip.data.pseudo_labels.PseudoLabels`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from regionclip.config import ClipModelConfig, PseudoLabelConfig
from regionclip.data.pseudo_labels import PseudoLabels
from regionclip.errors import InputError, ProposalError
from regionclip.labeling.assignment import assign_concepts, sample_generator
from regionclip.labeling.modes import LabelMode, build_mode
from regionclip.labeling.proposals import ProposalSource, build_proposal_source, sample_proposals
from regionclip.models.loading import LoadedClip, load_clip
from regionclip.models.preprocess import pil_to_tensor
from regionclip.models.region import RegionEncoder, encode_regions
from regionclip.precision import autocast, resolve_precision
from regionclip.text import load_embeddings
from regionclip.utils import sha256_file

log = logging.getLogger(__name__)

LOGITS_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class LabelInput:
    """One decoded source sample."""

    key: str
    image: Image.Image
    captions: list[str]
    meta: dict[str, Any] = field(default_factory=dict)  # the source sample's json, kept in the labels


class PseudoLabeler:
    """Label batches of images (see the module doc).

    Args:
        encoder: the teacher's :class:`RegionEncoder`; frozen and put in eval mode here.
        proposals: a :class:`~regionclip.labeling.proposals.ProposalSource` (original pixels).
        concept_emb: [K, D] concept embeddings (normalised here); ``pool_sha256`` identifies them.
        cfg: the ``pseudolabel`` config section.
        mode: the :class:`~regionclip.labeling.modes.LabelMode` of ``cfg.mode``.
        precision: the teacher's compute precision (resolved: fp32, bf16 or fp16); embeddings and
            the assignment are fp32.
    """

    def __init__(
        self,
        encoder: RegionEncoder,
        proposals: ProposalSource,
        concept_emb: Tensor,
        cfg: PseudoLabelConfig,
        mode: LabelMode,
        pool_sha256: str = "",
        precision: str = "fp32",
    ):
        if mode.name != cfg.mode:
            raise ValueError(f"the {mode.name!r} mode object was given for pseudolabel.mode={cfg.mode!r}")
        if cfg.logits_dtype not in LOGITS_DTYPES:
            raise InputError(
                f"pseudolabel.logits_dtype={cfg.logits_dtype!r}: expected one of {sorted(LOGITS_DTYPES)}"
            )
        if concept_emb.dim() != 2 or concept_emb.shape[1] != encoder.output_dim:
            raise InputError(
                f"concept embeddings of shape {tuple(concept_emb.shape)} do not fit the teacher's "
                f"{encoder.output_dim}-d region embeddings (embed the pool with the teacher's text tower)"
            )
        self.encoder = encoder.eval().requires_grad_(False)
        self.device = next(encoder.parameters()).device
        self.proposals = proposals
        self.concepts = F.normalize(concept_emb.float(), dim=-1).to(self.device)
        self.cfg, self.mode, self.pool_sha256, self.precision = cfg, mode, pool_sha256, precision

    def _proposals(self, keys: list[str], images: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        try:
            return self.proposals(keys, images)
        except ProposalError:  # a precomputed table without some keys: those samples get none
            all_boxes, all_scores = [], []
            for key, image in zip(keys, images, strict=True):
                try:
                    (b,), (sc,) = self.proposals([key], [image])
                except ProposalError:
                    b, sc = torch.zeros(0, 4), torch.zeros(0)
                all_boxes.append(b)
                all_scores.append(sc)
            return all_boxes, all_scores

    @torch.no_grad()
    def label_batch(self, samples: Sequence[LabelInput]) -> list[PseudoLabels]:
        """One :class:`PseudoLabels` per sample, with its kept regions."""
        cfg = self.cfg
        if not samples:
            return []
        keys = [s.key for s in samples]
        all_boxes, all_scores = self._proposals(keys, [pil_to_tensor(s.image) for s in samples])
        boxes, objectness = [], []
        for key, b, sc in zip(keys, all_boxes, all_scores, strict=True):
            idx = sample_proposals(
                b.cpu(), sc.cpu(), cfg.num_regions, sample_generator(cfg.seed, key), cfg.proposal_pool
            )
            boxes.append(b.cpu()[idx].float())
            objectness.append(sc.cpu()[idx].float())
        cands = self.mode.candidates(keys, [s.captions for s in samples])
        teacher_boxes = boxes
        if cands is not None:
            # regions of a caption without pool concepts get no label: skip their teacher work
            teacher_boxes = [
                b if c is not None and c.numel() else b[:0] for b, c in zip(boxes, cands, strict=True)
            ]
        with autocast(self.precision, self.device):
            embs = encode_regions(
                self.encoder, [s.image for s in samples], teacher_boxes, cfg.short_side, cfg.max_side,
                batch_size=len(samples),
            )  # fmt: skip
        return [
            self._labels(s, b, o, e.float(), cands is not None, None if cands is None else cands[i])
            for i, (s, b, o, e) in enumerate(zip(samples, boxes, objectness, embs, strict=True))
        ]

    def _labels(
        self,
        sample: LabelInput,
        boxes: Tensor,
        objectness: Tensor,
        emb: Tensor,
        grounded: bool,
        cand: Tensor | None,
    ) -> PseudoLabels:
        cfg = self.cfg
        drop = ""
        num_proposals = len(boxes)
        if len(boxes) == 0:
            drop = "no_proposals"
        elif grounded and (cand is None or cand.numel() == 0):
            # no entry in the phrases file (other shards than `make concepts` read), or no pool concept
            drop = "caption_not_parsed" if cand is None else "no_caption_candidates"
        if drop:
            boxes, objectness, emb = boxes[:0], objectness[:0], emb[:0]
        out = assign_concepts(
            emb, self.concepts, cfg.temperature, cfg.threshold, cfg.topk,
            None if cand is None else cand.to(self.device), cfg.keep_all_if_none,
        )  # fmt: skip
        keep = out["keep"].cpu()
        return PseudoLabels(
            key=sample.key,
            captions=list(sample.captions),
            width=sample.image.width,
            height=sample.image.height,
            boxes=boxes[keep].numpy().astype(np.float32),
            objectness=objectness[keep].numpy().astype(np.float32),
            concept=out["hard"].cpu()[keep].numpy().astype(np.int32),
            score=out["score"].cpu()[keep].numpy().astype(np.float32),
            topk_ids=out["topk_ids"].cpu()[keep].numpy().astype(np.int32),
            topk_logits=out["topk_logits"].cpu()[keep].numpy().astype(LOGITS_DTYPES[cfg.logits_dtype]),
            emb=emb.cpu()[keep].numpy().astype(np.float16) if cfg.store_embeddings else None,
            num_proposals=num_proposals,
            drop_reason=drop,
            concept_pool_sha256=self.pool_sha256,
            source_meta=sample.meta,
            image=sample.image,
        )


def build_labeler(
    cfg: PseudoLabelConfig,
    teacher: ClipModelConfig,
    rpn_dir: str,
    precomputed: str = "",
    device: torch.device | str = "cpu",
) -> tuple[PseudoLabeler, LoadedClip, list[str], dict[str, str]]:
    """The labeler of ``cfg``: the ``teacher`` model, the RPN in ``rpn_dir`` (or the ``precomputed``
    proposals file) and the concept pool ``cfg.concepts``.

    Returns ``(labeler, the loaded teacher, the pool's names, the pool file's metadata)``.
    """
    concept_emb, names, metadata = load_embeddings(cfg.concepts)
    # a random-init teacher (tests, smoke runs) must be the same in every process and every run
    torch.manual_seed(cfg.seed)
    loaded = load_clip(teacher, device)
    encoder = RegionEncoder(loaded.model.visual, cfg.pooler_resolution or None)
    if metadata.get("weights_id") and metadata["weights_id"] != loaded.weights_id:
        log.warning("concept embeddings %s were made with %s, the teacher is %s",
                    cfg.concepts, metadata["weights_id"], loaded.weights_id)  # fmt: skip
    precision = resolve_precision(cfg.precision, torch.device(device), "pseudolabel.precision")
    proposals = build_proposal_source(rpn_dir, precomputed, device)
    mode = build_mode(names, cfg)
    labeler = PseudoLabeler(encoder, proposals, concept_emb, cfg, mode, sha256_file(cfg.concepts), precision)
    return labeler, loaded, names, metadata


class OnlineLabels:
    """RegionCLIP's original design, RPN + teacher inside the training step: decoded image–text
    samples (``__key__``, ``image``, ``captions``, optional ``meta``) → the same
    :class:`PseudoLabels` that offline shards hold, so both go through identical training code."""

    def __init__(self, labeler: PseudoLabeler):
        self.labeler = labeler

    def __call__(self, samples: Sequence[dict[str, Any]]) -> list[PseudoLabels]:
        return self.labeler.label_batch(
            [LabelInput(s["__key__"], s["image"], list(s["captions"]), s.get("meta", {})) for s in samples]
        )
