"""The Python API: zero-shot open-vocabulary detection and region features in a few lines.

    from PIL import Image
    from regionclip import RegionCLIP

    model = RegionCLIP.from_pretrained("runs/demo/student/final", rpn="runs/demo/rpn")
    image = Image.open("scene.jpg")
    model(image, candidate_labels=["cat", "red umbrella"], threshold=0.1, top_k=5)
    # [{"score": 0.41, "label": "cat", "box": {"xmin": 12, "ymin": 30, "xmax": 88, "ymax": 97}}, ...]
    model.encode_regions(image, [[12, 30, 88, 97]])  # [1, D], L2-normalised

Detection follows the Hugging Face ``zero-shot-object-detection`` pipeline's call and output:
``candidate_labels``, ``threshold``, ``top_k``, a list of ``{"score", "label", "box"}`` with integer
pixel boxes, highest score first. The model is any CLIP this project loads (an open_clip name with
``pretrained``, a checkpoint folder, a weights file with ``model_config``), with proposals from an
RPN folder written by ``make rpn``; or a detector folder written by ``make transfer``, which brings
its own RPN, box regression and test settings (names are embedded by the CLIP it was trained from).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from regionclip.evaluation.zero_shot import DetectionParams, configure_rpn_for_inference, detect
from regionclip.models.loading import LoadedClip, load_clip, model_config_for
from regionclip.models.region import encode_regions
from regionclip.models.rpn import ProposalNetwork, load_rpn
from regionclip.precision import resolve_precision
from regionclip.stages.transfer import MODEL_JSON as DETECTOR_RECORD
from regionclip.stages.transfer import TrainedDetector, detect_pil, load_detector, region_embeddings_pil
from regionclip.text import class_embeddings_for
from regionclip.utils import resolve_device


def hf_detections(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, names: Sequence[str], top_k: int | None
) -> list[dict[str, Any]]:
    """Detections (boxes ``[N, 4]`` x0y0x1y1, scores ``[N]``, class indices ``[N]``) in the Hugging
    Face pipeline's format, highest score first, at most ``top_k`` (None = all). Box corners are
    truncated to integer pixels as that pipeline does."""
    order = torch.argsort(scores, descending=True, stable=True)[:top_k]
    return [
        {
            "score": float(scores[i]),
            "label": names[int(labels[i])],
            "box": dict(
                zip(("xmin", "ymin", "xmax", "ymax"), (int(v) for v in boxes[i].tolist()), strict=True)
            ),
        }
        for i in order.tolist()
    ]


class RegionCLIP:
    """A region–text model with its proposal network.

    Args:
        model: the CLIP (student, teacher or any open_clip model) that recognises regions.
        rpn: proposals for detection; None allows :meth:`encode_regions` only.
        params: zero-shot detection settings (temperature, NMS, image size, precision, ...);
            ``score_thresh`` and ``max_dets`` are set per call from ``threshold`` and ``top_k``.
        templates: the prompt template set for class names.
    """

    def __init__(
        self,
        model: LoadedClip,
        rpn: ProposalNetwork | None = None,
        params: DetectionParams | None = None,
        templates: str = "ensemble",
    ):
        self.model, self.params, self.templates = model, params or DetectionParams(), templates
        self.rpn = configure_rpn_for_inference(rpn, self.params) if rpn is not None else None
        self.detector: TrainedDetector | None = None  # set by from_pretrained for a detector folder
        self._class_embeddings: dict[tuple[str, ...], torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        rpn: str | os.PathLike | None = None,
        *,
        pretrained: str = "",
        model_config: str = "",
        device: str | torch.device = "auto",
        templates: str = "ensemble",
        **params: Any,
    ) -> RegionCLIP:
        """Load ``model`` (open_clip name with ``pretrained``, checkpoint folder, or weights file
        with ``model_config``) and the RPN folder ``rpn``; ``params`` are :class:`DetectionParams`
        fields (e.g. ``short_side=128, max_side=213`` for small images)."""
        device = resolve_device(device) if isinstance(device, str) else device
        params["precision"] = resolve_precision(params.get("precision", "fp32"), device, "precision")
        if (Path(model) / DETECTOR_RECORD).is_file():  # a detector folder of `make transfer`
            detector = load_detector(model, device)
            out = cls(detector.text_model, None, DetectionParams(**params), templates)
            out.detector = detector
            return out
        loaded = load_clip(model_config_for(str(model), model_config, pretrained), device)
        network = load_rpn(rpn, device) if rpn is not None else None
        return cls(loaded, network, DetectionParams(**params), templates)

    def class_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """``[C, D]`` text embeddings of ``names`` (prompt-ensembled), kept for the next call."""
        key = tuple(names)
        if key not in self._class_embeddings:
            self._class_embeddings = {key: class_embeddings_for(self.model, list(key), self.templates)}
        return self._class_embeddings[key]

    def __call__(
        self,
        images: Image.Image | Sequence[Image.Image],
        candidate_labels: Sequence[str],
        threshold: float = 0.1,
        top_k: int | None = None,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Detect ``candidate_labels`` in one image (a list of detections) or in a list of images
        (a list per image). Scores are class probabilities over the candidate labels (times the
        RPN's objectness under a square root when ``multiply_rpn_score``)."""
        if self.rpn is None and self.detector is None:
            raise ValueError("this RegionCLIP has no RPN: load it with rpn=<folder written by `make rpn`>")
        names = [str(n) for n in candidate_labels]
        if not names:
            raise ValueError("candidate_labels is empty")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        single = isinstance(images, Image.Image)
        batch = [images] if single else list(images)
        params = dataclasses.replace(
            self.params, score_thresh=threshold, max_dets=max(self.params.max_dets, top_k or 0)
        )
        rgb = [im.convert("RGB") for im in batch]
        if self.detector is not None:  # its own test settings; threshold applies on top of its score_thresh
            device = next(self.detector.model.parameters()).device
            found = [(b[s > threshold], s[s > threshold], lab[s > threshold])
                     for b, s, lab in detect_pil(self.detector, rgb, self.class_embeddings(names), device)]  # fmt: skip
        else:
            found = detect(self.model, self.rpn, rgb, self.class_embeddings(names), params)
        out = [hf_detections(b, s, lab, names, top_k) for b, s, lab in found]
        return out[0] if single else out

    @torch.no_grad()
    def encode_regions(
        self, image: Image.Image, boxes: Sequence[Sequence[float]] | torch.Tensor
    ) -> torch.Tensor:
        """L2-normalised embeddings ``[N, D]`` of ``boxes`` (``[N, 4]`` x0 y0 x1 y1, image pixels),
        in the space of :meth:`class_embeddings` (cosine = region–text similarity); for a detector
        folder, from the detector's own backbone and box head (what its classifier scores)."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if self.detector is not None:
            device = next(self.detector.model.parameters()).device
            return region_embeddings_pil(self.detector, image, boxes, device)
        (emb,) = encode_regions(
            self.model.model, [image.convert("RGB")], [boxes], self.params.short_side, self.params.max_side,
            normalize=True,
        )  # fmt: skip
        return emb.float().cpu()
