"""`detect`: zero-shot open-vocabulary detection on image files (RPN proposals classified against a
GLIP-style prompt's class names, no box regression, per-class NMS).

Writes ``<out>/detections.json`` (a COCO results array: ``image_id``, ``category_id``, ``bbox``
``[x, y, w, h]``, ``score``), beside it ``<out>/images.json`` (a COCO file without annotations: the
images and the prompt's categories the ids refer to, and under ``info`` the model, RPN and
parameters), and ``<out>/<image stem>.png`` with boxes, labels and scores drawn. Unreadable images
are skipped with a warning.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from regionclip.config import ClipModelConfig
from regionclip.evaluation.evaluator import to_coco_results
from regionclip.evaluation.zero_shot import DetectionParams, configure_rpn_for_inference, detect, read_images
from regionclip.models.loading import LoadedClip, load_clip
from regionclip.models.rpn import ProposalNetwork, load_rpn
from regionclip.text import class_embeddings_for
from regionclip.utils import atomic_write_json
from regionclip.viz import draw_detections, save_png

IMAGES_FILE = "images.json"


def png_names(paths: Sequence[Path]) -> list[str]:
    """``<stem>.png`` per image, made unique with ``-2``, ``-3``, ... when stems repeat."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        n = seen.get(p.stem, 0) + 1
        seen[p.stem] = n
        out.append(f"{p.stem}.png" if n == 1 else f"{p.stem}-{n}.png")
    return out


def detect_files(
    loaded: LoadedClip,
    rpn: ProposalNetwork,
    paths: Sequence[Path],
    names: Sequence[str],
    params: DetectionParams,
    out_dir: Path,
    templates: str = "ensemble",
    batch_size: int = 4,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Detect ``names`` in every image of ``paths``; returns a summary (``images``, ``detections``,
    ``unreadable``, ``seconds``, ``json``). ``source`` (model, RPN) goes into the json as it is."""
    rpn = configure_rpn_for_inference(rpn, params)
    embeddings = class_embeddings_for(loaded, names, templates)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = png_names(paths)
    images_meta, results, unreadable = [], [], 0
    start = time.perf_counter()
    for first in tqdm(range(0, len(paths), batch_size), desc="detect", unit="batch"):
        batch = paths[first : first + batch_size]
        kept, pil = read_images(batch)
        unreadable += len(batch) - len(kept)
        for j, image, (boxes, scores, labels) in zip(
            kept, pil, detect(loaded, rpn, pil, embeddings, params), strict=True
        ):
            image_id, png = first + j + 1, pngs[first + j]
            save_png(draw_detections(image, boxes, scores, labels, names), out_dir / png)
            images_meta.append({"id": image_id, "file_name": str(batch[j]), "width": image.width,
                                "height": image.height, "visualization": png})  # fmt: skip
            results.extend(to_coco_results(image_id, boxes, scores, labels, range(1, len(names) + 1)))
    seconds = time.perf_counter() - start
    summary = {"images": len(images_meta), "detections": len(results), "unreadable": unreadable,
               "seconds": seconds, "json": str(out_dir / "detections.json")}  # fmt: skip
    if images_meta:
        # COCO(images.json).loadRes(detections.json) then works as for any COCO results file
        atomic_write_json(out_dir / IMAGES_FILE, {
            "info": {**(source or {}), "params": asdict(params), "templates": templates},
            "images": images_meta,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
            "annotations": [],
        })  # fmt: skip
        atomic_write_json(out_dir / "detections.json", results)
    return summary


def run_detect(
    model: ClipModelConfig,
    rpn_dir: str,
    paths: Sequence[Path],
    names: Sequence[str],
    params: DetectionParams,
    out_dir: Path,
    templates: str,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """Load ``model`` and the RPN of ``rpn_dir``, then :func:`detect_files`; the summary gains
    ``line``, the one-line report.

    Raises:
        ValueError: bad model or RPN, or none of the images could be read.
    """
    loaded = load_clip(model, device)
    summary = detect_files(loaded, load_rpn(rpn_dir, device), paths, names, params, out_dir, templates, batch_size,
                           {"model": loaded.identity, "rpn": rpn_dir})  # fmt: skip
    if not summary["images"]:
        raise ValueError(f"none of the {len(paths)} images could be read")
    n, s = summary["images"], summary["seconds"]
    summary["line"] = (
        f"detect: {summary['detections']} detections of {len(names)} classes on {n} images "
        f"({summary['unreadable']} unreadable) in {s:.1f} s ({n / max(s, 1e-9):.2f} img/s, {params.precision}) "
        f"-> {summary['json']}"
    )
    return summary
