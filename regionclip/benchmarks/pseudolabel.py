"""Pseudo-label stage throughput against its forward-only floor.

The stage (:func:`regionclip.stages.pseudolabel.label_shard`: read + decode the shard, RPN, proposal
sampling, resize, teacher, assignment, .npy encoding, atomic shard + manifest) is timed against
the floor: the RPN and teacher forwards alone on the same images, pre-decoded and pre-resized in
memory, with the same batches and boxes. ``floor_ratio = stage images/s / floor images/s``
(1.0 = the stage adds nothing to the forwards). Both are measured alternately in each repeat,
side by side, and reported as medians, once in fp32 and once under bf16 autocast (the teacher's
``pseudolabel.precision``; proposals stay fp32 in both).

Two sizes, random weights (no downloads): RegionCLIP's (RN50 teacher, ResNet-50-FPN RPN, 640x480
images at short side 800, 300 → 100 regions, 4,764 concepts) and the CPU demo's (RN-emoji teacher,
ResNet-18-FPN RPN at EmojiWorld's native 128 px).
"""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

from regionclip.benchmarks.reader import smooth_image
from regionclip.config import load_config
from regionclip.data.shards import ShardWriter, encode_image, image_text_sample
from regionclip.labeling.assignment import sample_generator
from regionclip.labeling.labeler import PseudoLabeler
from regionclip.labeling.modes import PoolMode
from regionclip.labeling.proposals import NetworkProposals, sample_proposals
from regionclip.models.loading import register_model_config
from regionclip.models.preprocess import batch_images, pil_to_tensor, resize_for_detection, scale_boxes
from regionclip.models.region import CLIP_MEAN, CLIP_STD, RegionEncoder
from regionclip.models.rpn import build_proposal_network
from regionclip.precision import autocast
from regionclip.stages.pseudolabel import RunIdentity, label_shard

REPO = Path(__file__).resolve().parents[2]
SIZES: dict[str, dict[str, Any]] = {
    "rn50": {
        "teacher": "RN50",
        "model_config": "",
        "rpn": {"backbone": "resnet50", "min_size": 800, "max_size": 1333},
        "image_wh": (640, 480),
        "short_side": 800,
        "max_side": 1333,
        "concepts": 4764,
        "batch_size": 2,
    },
    "demo": {
        "teacher": "RN-emoji",
        "model_config": str(REPO / "configs" / "models" / "RN-emoji.json"),
        "rpn": {
            "backbone": "resnet18",
            "min_size": 128,
            "max_size": 128,
            "fpn_levels": [2, 3, 4],
            "fpn_channels": 64,
            "anchor_sizes": [16, 32, 64, 128],
        },
        "image_wh": (128, 128),
        "short_side": 128,
        "max_side": 128,
        "concepts": 64,
        "batch_size": 32,
    },
}


def _setup(
    workdir: Path, spec: dict[str, Any], n_images: int, seed: int, precision: str
) -> tuple[PseudoLabeler, str, list]:
    overrides = [f"rpn.{k}={v}".replace(" ", "") for k, v in spec["rpn"].items()]
    overrides += [
        f"teacher.model={spec['teacher']}",
        f"pseudolabel.short_side={spec['short_side']}",
        f"pseudolabel.max_side={spec['max_side']}",
        f"pseudolabel.batch_size={spec['batch_size']}",
    ]
    if spec["model_config"]:
        overrides.append(f"teacher.model_config={spec['model_config']}")
    cfg = load_config(None, overrides)
    torch.manual_seed(seed)
    register_model_config(cfg.teacher)
    teacher = open_clip.create_model(cfg.teacher.model).eval()
    encoder = RegionEncoder(teacher.visual)
    rpn = NetworkProposals(build_proposal_network(cfg.rpn).eval())
    concepts = torch.randn(spec["concepts"], encoder.output_dim)
    labeler = PseudoLabeler(encoder, rpn, concepts, cfg.pseudolabel, PoolMode(), precision=precision)

    rng = np.random.default_rng(seed)
    w, h = spec["image_wh"]
    images = []
    with ShardWriter(workdir, "input", maxcount=n_images) as writer:
        for i in range(n_images):
            image = smooth_image(rng, max(w, h)).resize((w, h))
            jpg = encode_image(image, "jpg", 90)
            images.append((f"{i:06d}", Image.open(io.BytesIO(jpg)).convert("RGB")))
            writer.write(image_text_sample(f"{i:06d}", jpg, "jpg", "a photo", {"width": w, "height": h}))
    return labeler, str(writer.shards[0].path), images


@torch.no_grad()
def floor_pass(labeler: PseudoLabeler, batches: list[dict[str, Any]]) -> None:
    """RPN + teacher forwards on pre-decoded, pre-resized in-memory batches."""
    cfg = labeler.cfg
    for b in batches:
        boxes, scores = labeler.proposals(b["keys"], b["rpn_images"])
        scaled = []
        for key, bx, sc, s in zip(b["keys"], boxes, scores, b["scales"], strict=True):
            idx = sample_proposals(
                bx, sc, cfg.num_regions, sample_generator(cfg.seed, key), cfg.proposal_pool
            )
            scaled.append(scale_boxes(bx[idx], s))
        with autocast(labeler.precision, labeler.device):
            labeler.encoder(b["batch"], scaled, b["sizes"])


def _prepare(labeler: PseudoLabeler, images: list) -> list[dict[str, Any]]:
    cfg = labeler.cfg
    batches = []
    for start in range(0, len(images), cfg.batch_size):
        part = images[start : start + cfg.batch_size]
        resized = [
            resize_for_detection(im, cfg.short_side, cfg.max_side, mean=CLIP_MEAN, std=CLIP_STD)
            for _, im in part
        ]
        batch, sizes = batch_images([t for t, _ in resized])
        batches.append(
            {
                "keys": [k for k, _ in part],
                "rpn_images": [pil_to_tensor(im) for _, im in part],
                "batch": batch,
                "sizes": sizes,
                "scales": [s for _, s in resized],
            }
        )
    return batches


def _measure(
    workdir: Path, name: str, spec: dict[str, Any], n_images: int, repeats: int, seed: int, precision: str
) -> dict[str, Any]:
    workdir = workdir / f"{name}-{precision}"
    labeler, url, images = _setup(workdir, spec, n_images, seed, precision)
    identity = RunIdentity({}, "bench", {"sha256": "bench"}, {}, {})
    batches = _prepare(labeler, images)
    floor_pass(labeler, batches[:1])  # warm-up (allocator, oneDNN kernels)
    stage_s, floor_s = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        manifest, _ = label_shard(labeler, url, workdir / f"out-{r}.tar", identity)
        stage_s.append(time.perf_counter() - t0)
        assert manifest is not None and manifest["counts"]["images"] == n_images
        t0 = time.perf_counter()
        floor_pass(labeler, batches)
        floor_s.append(time.perf_counter() - t0)
    stage, floor = statistics.median(stage_s), statistics.median(floor_s)
    tag = f"{name}_{precision}"
    return {
        f"{tag}_floor_ratio": round(floor / stage, 3),
        f"{tag}_stage_images_per_s": round(n_images / stage, 3),
        f"{tag}_floor_images_per_s": round(n_images / floor, 3),
        f"{tag}_runs": {
            "stage_s": [round(t, 3) for t in stage_s],
            "floor_s": [round(t, 3) for t in floor_s],
        },
        f"{name}_setup": {**{k: v for k, v in spec.items() if k != "model_config"}, "images": n_images},
    }


def bench_pseudolabel(
    workdir: str | Path,
    rn50_images: int = 2,
    demo_images: int = 32,
    repeats: int = 2,
    seed: int = 0,
    precisions: str = "fp32,bf16",
    sizes: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Stage vs forward-only floor at RN50 size and at demo size, per precision (CPU threads as the
    process has). The headline figures are fp32's floor ratios and each precision's RN50 images/s.
    ``sizes`` replaces :data:`SIZES` (tests run both names at toy size)."""
    workdir = Path(workdir)
    sizes = SIZES if sizes is None else sizes
    names = [p.strip() for p in precisions.split(",") if p.strip()]
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "repeats": repeats, "precisions": names}
    for precision in names:
        result.update(_measure(workdir, "demo", sizes["demo"], demo_images, repeats, seed, precision))
        result.update(_measure(workdir, "rn50", sizes["rn50"], rn50_images, repeats, seed, precision))
    first = names[0]
    result["pseudolabel_floor_ratio"] = result[f"rn50_{first}_floor_ratio"]
    result["pseudolabel_demo_floor_ratio"] = result[f"demo_{first}_floor_ratio"]
    if {"fp32", "bf16"} <= set(names):
        result["rn50_pseudolabel_bf16_speedup"] = round(
            result["rn50_bf16_stage_images_per_s"] / result["rn50_fp32_stage_images_per_s"], 3
        )
    return result
