"""`make eval`: zero-shot region recognition and zero-shot detection of a CLIP model.

    python -m pipelines.eval --config FILE [key=value ...]
    make eval CONFIG=configs/demo.yaml ARGS="eval.model.pretrained=runs/demo/student/final eval.tag=student"

Classifies the GT boxes of ``eval.json`` by region embeddings (top-1/top-5 for all/base/novel)
and, with ``eval.rpn`` set, detects with RPN proposals and no box regression (COCO AP and AP50
per split). Writes ``<eval.out_dir>/<tag>.json`` and the detections as COCO results in
``<tag>.detections.json``; a re-run whose ``<tag>.json`` holds the same run hash (the ``eval``
section and the model, RPN, json and vocabulary files it names) is skipped. Exit status: 0 done,
1 bad input, 2 bad config or arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from regionclip.cli import config_from_argv, device_from_config
from regionclip.config import ClipModelConfig, EvalConfig, section_hash, to_dict
from regionclip.data.shards import SampleErrors
from regionclip.evaluation import (
    DetectionParams,
    category_splits,
    check_class_embeddings,
    class_embeddings_for,
    load_eval_set,
    read_names_file,
    region_accuracy,
    zero_shot_detection,
)
from regionclip.models.loading import WEIGHTS_FILE, load_clip
from regionclip.proposals import WEIGHTS_FILE as RPN_WEIGHTS_FILE
from regionclip.proposals import load_rpn
from regionclip.text import load_embeddings
from regionclip.utils import atomic_write_json, sha256_file


def default_tag(model: ClipModelConfig) -> str:
    """``<model>-<weights>``: the pretrained tag, the checkpoint folder/file name, or ``random``."""
    if not model.pretrained:
        weights = "random"
    elif Path(model.pretrained).exists():
        weights = Path(model.pretrained.rstrip("/")).stem
    else:
        weights = model.pretrained
    return f"{model.model}-{weights}".replace("/", "_")


def run_hash(ev: EvalConfig) -> str:
    """Hash of the ``eval`` section and the contents of the files it names: the model weights, the
    RPN weights, the eval json and the vocabulary or class embeddings file."""
    weights = Path(ev.model.pretrained) if ev.model.pretrained else None
    if weights is not None and weights.is_dir():
        weights = weights / WEIGHTS_FILE
    files = [weights, Path(ev.rpn) / RPN_WEIGHTS_FILE if ev.rpn else None, Path(ev.json)]
    files += [Path(f) if f else None for f in (ev.vocabulary, ev.class_embeddings)]
    digests = [sha256_file(f) if f is not None and f.is_file() else str(f) for f in files]
    return hashlib.sha256(json.dumps([section_hash(ev), digests]).encode()).hexdigest()[:16]


def _finished(path: Path, run: str) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("run_hash") == run
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = config_from_argv(argv, "Zero-shot region recognition and detection of a CLIP model.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ev = cfg.eval
    tag = ev.tag or default_tag(ev.model)
    device = device_from_config(cfg.device)
    out = Path(ev.out_dir) / f"{tag}.json"
    run = run_hash(ev)
    if _finished(out, run):
        print(f"eval {tag}: {out} holds the results of this config; skipping")
        return 0
    start = time.perf_counter()
    errors = SampleErrors()
    try:
        data = load_eval_set(ev.json, ev.image_root).head(ev.max_images)
        splits = category_splits(data.categories, ev.novel)
        loaded = load_clip(ev.model, device)
        if ev.class_embeddings:
            embeddings, names, _ = load_embeddings(ev.class_embeddings)
            vocab_source = ev.class_embeddings
        else:
            names = read_names_file(ev.vocabulary) if ev.vocabulary else data.names
            vocab_source = ev.vocabulary or f"category names of {ev.json}"
            embeddings = class_embeddings_for(loaded, names, ev.templates, ev.cache_dir or None)
        check_class_embeddings(embeddings, loaded.embed_dim, len(data.categories), vocab_source, ev.json)
        accuracy = region_accuracy(
            loaded, data, ev.image_root, embeddings, splits, ev.short_side, ev.max_side, ev.batch_size, errors
        )
        detection = None
        if ev.rpn:
            params = DetectionParams(
                temperature=ev.temperature,
                score_thresh=ev.score_thresh,
                nms_thresh=ev.nms,
                max_dets=ev.max_dets,
                multiply_rpn_score=ev.multiply_rpn_score,
                rpn_nms_thresh=ev.rpn_nms,
                rpn_post_nms_top_n=ev.rpn_topk,
                short_side=ev.short_side,
                max_side=ev.max_side,
            )
            rpn = load_rpn(ev.rpn, device)
            ap, results = zero_shot_detection(
                loaded, rpn, data, ev.image_root, embeddings, splits, params, ev.batch_size, errors
            )
            det_file = Path(ev.out_dir) / f"{tag}.detections.json"
            atomic_write_json(det_file, results)
            detection = {**ap, "rpn": ev.rpn, "params": asdict(params), "detections_file": str(det_file)}
    except (ValueError, OSError) as e:  # bad json, images, vocabulary, weights or RPN: named in the message
        print(f"error: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    report = {
        "tag": tag,
        "model": loaded.identity,
        "json": ev.json,
        "images": len(data.images),
        "vocabulary": {"source": vocab_source, "names": list(names), "templates": ev.templates},
        "splits": {name: len(ids) for name, ids in splits.items()},
        "region_accuracy": accuracy,
        "zero_shot_detection": detection,
        "skipped": dict(errors.counts),
        "seconds": round(seconds, 2),
        "config": to_dict(ev),
        "run_hash": run,
    }
    atomic_write_json(out, report)
    if errors.counts:
        for line in errors.report_lines():
            print(line, file=sys.stderr)
    parts = [
        "region top-1 all/base/novel "
        + "/".join(_fmt(accuracy.get(s, {}).get("top1")) for s in ("all", "base", "novel"))
        + f" % ({accuracy['all']['n']} boxes)"
    ]
    if detection is not None:
        parts.append(
            "AP50 all/base/novel "
            + "/".join(_fmt(detection["AP50"].get(s)) for s in ("all", "base", "novel"))
        )
    print(
        f"eval {tag}: " + "; ".join(parts) + f"; {len(data.images)} images in {seconds:.1f} s "
        f"({len(data.images) / max(seconds, 1e-9):.1f} img/s) -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
