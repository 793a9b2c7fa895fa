"""`make eval`: zero-shot region recognition and zero-shot detection of a CLIP model.

Classifies the GT boxes of ``eval.json`` by region embeddings (top-1/top-5 for all/base/novel)
and, with ``eval.rpn`` (or ``eval.precomputed``, proposals of your own keyed by file name) set,
detects with those proposals and no box regression (COCO or LVIS AP and AP50 per split). Writes
``<eval.out_dir>/<tag>.json`` and the detections as COCO results in ``<tag>.detections.json``; a re-run whose ``<tag>.json`` holds the same run hash (the ``eval``
section and the model, RPN, json and vocabulary files it names) is skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from regionclip.config import ClipModelConfig, EvalConfig, section_hash, to_dict
from regionclip.data.coco import category_splits, read_coco
from regionclip.data.sample_errors import SampleErrors
from regionclip.engine.run_cache import file_digest, finished, run_hash
from regionclip.evaluation.evaluator import vocabulary_classes, vocabulary_coverage
from regionclip.evaluation.zero_shot import (
    DetectionParams,
    region_accuracy,
    zero_shot_detection,
)
from regionclip.labeling.proposals import PrecomputedProposals
from regionclip.models.loading import WEIGHTS_FILE, load_clip
from regionclip.models.rpn import WEIGHTS_FILE as RPN_WEIGHTS_FILE
from regionclip.models.rpn import load_rpn
from regionclip.precision import resolve_precision
from regionclip.text import check_class_embeddings, class_embeddings_for, load_embeddings, read_names_file
from regionclip.utils import atomic_write_json, require_writable

log = logging.getLogger(__name__)


def default_tag(model: ClipModelConfig) -> str:
    """``<model>-<weights>``: the pretrained tag, the checkpoint folder/file name, or ``random``."""
    if not model.pretrained:
        weights = "random"
    elif Path(model.pretrained).exists():
        weights = Path(model.pretrained.rstrip("/")).stem
    else:
        weights = model.pretrained
    return f"{model.model}-{weights}".replace("/", "_")


def eval_run_hash(ev: EvalConfig) -> str:
    """Hash of the ``eval`` section and the contents of the files it names: the model weights, the
    RPN weights or proposals file, the eval json and the vocabulary or class embeddings file."""
    weights = Path(ev.model.pretrained) if ev.model.pretrained else None
    if weights is not None and weights.is_dir():
        weights = weights / WEIGHTS_FILE
    files = [weights, Path(ev.rpn) / RPN_WEIGHTS_FILE if ev.rpn else None, Path(ev.json)]
    files += [Path(f) if f else None for f in (ev.vocabulary, ev.class_embeddings, ev.precomputed)]
    return run_hash(section_hash(ev), [file_digest(f) if f is not None else "None" for f in files])


def result_path(ev: EvalConfig) -> Path:
    return Path(ev.out_dir) / f"{ev.tag or default_tag(ev.model)}.json"


def run_eval(ev: EvalConfig, device: torch.device) -> dict[str, Any] | None:
    """Evaluate ``ev.model``; returns the report (also in :func:`result_path`), or None when the
    report of this run hash is already there.

    Raises:
        ValueError / OSError: bad json, images, vocabulary, weights or RPN (named in the message).
    """
    tag = ev.tag or default_tag(ev.model)
    out = result_path(ev)
    run = eval_run_hash(ev)
    if finished(out, run) is not None:
        return None
    require_writable(out.parent, "eval.out_dir")
    start = time.perf_counter()
    precision = resolve_precision(ev.precision, device, "eval.precision")
    errors = SampleErrors()
    data = read_coco(ev.json, ev.image_root).head(ev.max_images)
    splits = category_splits(data.categories, novel=ev.novel)
    loaded = load_clip(ev.model, device)
    if ev.class_embeddings:
        embeddings, names, _ = load_embeddings(ev.class_embeddings)
        vocab_source = ev.class_embeddings
    else:
        names = read_names_file(ev.vocabulary) if ev.vocabulary else data.names
        vocab_source = ev.vocabulary or f"category names of {ev.json}"
        embeddings = class_embeddings_for(loaded, names, ev.templates, ev.cache_dir or None)
    check_class_embeddings(embeddings, loaded.embed_dim, len(names), vocab_source, vocab_source)
    # a vocabulary of its own is matched to the json's categories by name; other names are distractors
    vocabulary = None if list(names) == data.names else list(names)
    coverage = vocabulary_coverage(names, vocabulary_classes(names, data.names, ev.json), data.names)
    missing = coverage["categories_missing"]
    if missing:
        log.warning("eval: %d categories of %s are not in the vocabulary (their boxes count as misses): %s",
                    len(missing), ev.json, ", ".join(missing[:10]))  # fmt: skip
    accuracy = region_accuracy(
        loaded,
        data,
        ev.image_root,
        embeddings,
        splits,
        ev.short_side,
        ev.max_side,
        ev.batch_size,
        errors,
        precision,
        vocabulary,
    )
    detection = None
    if ev.rpn or ev.precomputed:
        params = DetectionParams(
            temperature=ev.temperature, score_thresh=ev.score_thresh, nms_thresh=ev.nms, max_dets=ev.max_dets,
            multiply_rpn_score=ev.multiply_rpn_score, rpn_nms_thresh=ev.rpn_nms, rpn_post_nms_top_n=ev.rpn_topk,
            short_side=ev.short_side, max_side=ev.max_side, precision=precision,
        )  # fmt: skip
        proposals = (
            PrecomputedProposals.from_file(ev.precomputed) if ev.precomputed else load_rpn(ev.rpn, device)
        )
        ap, results = zero_shot_detection(
            loaded,
            proposals,
            data,
            ev.image_root,
            embeddings,
            splits,
            params,
            ev.batch_size,
            errors,
            vocabulary,
        )
        det_file = Path(ev.out_dir) / f"{tag}.detections.json"
        atomic_write_json(det_file, results)
        source = {"precomputed": ev.precomputed} if ev.precomputed else {"rpn": ev.rpn}
        detection = {**ap, **source, "params": asdict(params), "detections_file": str(det_file)}
    report = {
        "tag": tag,
        "model": loaded.identity,
        "json": ev.json,
        "images": len(data.images),
        "vocabulary": {
            "source": vocab_source,
            "names": list(names),
            "templates": ev.templates,
            **coverage,
        },
        "splits": {name: len(ids) for name, ids in splits.items()},
        "region_accuracy": accuracy,
        "zero_shot_detection": detection,
        "precision": precision,
        "skipped": dict(errors.counts),
        "skipped_report": errors.report_lines() if errors.counts else [],
        "seconds": round(time.perf_counter() - start, 2),
        "config": to_dict(ev),
        "run_hash": run,
    }
    atomic_write_json(out, report)
    return report
