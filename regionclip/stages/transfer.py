"""`make transfer`: train the open-vocabulary detector on base boxes, evaluate AP50 base/novel/all.

One run lives in ``transfer.out_dir``:

- ``class_embeddings.safetensors`` (+ ``.txt``): prompt-ensembled text embeddings of every
  category name of the train and val jsons, from the init model's text tower (a cache; or the
  file given as ``transfer.class_embeddings``);
- ``checkpoint/``: ``step-N.safetensors`` (weights, SGD momentum, RNG) + ``latest.json``, removed
  once training finishes; a re-run resumes from it exactly (same images, flips and scales);
- ``model.safetensors`` + ``model.json``: the trained detector (without the frozen RPN and the
  vocabulary) with its config, init identity and training vocabulary;
- ``detections.json`` (COCO results) and ``metrics.json``: AP50 all/base/novel (fractions 0-1,
  as RegionCLIP's evaluator) + the 12 standard COCO metrics + per-class AP50.

A run whose ``metrics.json`` carries the same run hash (config, init weights, RPN) is skipped.

Bad input: training skips and counts images whose file is unreadable (the first few are named in
the log), like the RPN stage; evaluation refuses to start when an image of the val json is
missing and stops at an unreadable one, naming the file — AP over a silently reduced set would be
wrong.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from regionclip.config import TransferConfig, from_dict, section_hash, to_dict
from regionclip.data.coco import CocoImage, CocoSet, category_splits, read_categories, read_coco
from regionclip.data.detection import BoxImages, StepSampler
from regionclip.data.images import UNREADABLE, load_rgb
from regionclip.data.sample_errors import drop_errors
from regionclip.engine.checkpoint import StateFileCheckpointer
from regionclip.engine.loop import StepOutput, Trainer
from regionclip.engine.run_cache import file_digest, finished, run_hash
from regionclip.engine.schedule import Schedule
from regionclip.errors import TransferError
from regionclip.evaluation.coco_ap import ap_summary
from regionclip.evaluation.evaluator import (
    DetectionEvaluator,
    VocabularyMapped,
    evaluator_for,
    vocabulary_classes,
)
from regionclip.labeling.proposals import NetworkProposals, PrecomputedProposals, load_precomputed_proposals
from regionclip.models.loading import WEIGHTS_FILE as CLIP_WEIGHTS_FILE
from regionclip.models.loading import LoadedClip, load_clip
from regionclip.models.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    batch_images,
    pil_to_tensor,
    resize_for_detection,
)
from regionclip.models.rpn import CONFIG_FILE as RPN_CONFIG_FILE
from regionclip.models.rpn import load_rpn
from regionclip.models.towers import require_resnet
from regionclip.precision import autocast, resolve_precision
from regionclip.text import cached_class_embeddings, load_embeddings, read_names_file
from regionclip.transfer.torchvision_rcnn import OpenVocabFasterRCNN, build_detector
from regionclip.transfer.vocabulary import select_embeddings
from regionclip.utils import atomic_output, atomic_write_json, read_json, require_writable

log = logging.getLogger(__name__)

FORMAT = "regionclip.transfer"
FORMAT_VERSION = 1
EMBEDDINGS_FILE = "class_embeddings.safetensors"
MODEL_FILE = "model.safetensors"
MODEL_JSON = "model.json"
METRICS_FILE = "metrics.json"
DETECTIONS_FILE = "detections.json"
CHECKPOINT_DIR = "checkpoint"

ProposalFn = Callable[[Sequence[str], Sequence[Tensor]], tuple[list[Tensor], list[Tensor]]]


def class_embeddings(cfg: TransferConfig, loaded, names: Sequence[str]) -> tuple[Tensor, list[str], str]:
    """``(embeddings [K, D], their names, source)`` covering ``names``: ``cfg.class_embeddings``
    when set, else the init model's own embeddings, cached in ``out_dir``."""
    if cfg.class_embeddings:
        try:
            emb, file_names, _ = load_embeddings(cfg.class_embeddings)
        except (OSError, ValueError) as e:
            raise TransferError(str(e)) from e
        return emb, file_names, cfg.class_embeddings
    path = Path(cfg.out_dir) / EMBEDDINGS_FILE
    return cached_class_embeddings(loaded, names, cfg.templates, path), list(names), str(path)


@dataclass
class Prepared:
    image: Tensor  # [3, h, w] CLIP-normalised at detection size
    raw: Tensor | None  # [3, H, W] in [0, 1] at the original size (the frozen RPN's input)
    scale: float  # original pixels -> detection pixels


def prepare(pil: Image.Image, short_side: int, max_side: int, with_raw: bool) -> Prepared:
    tensor, scale = resize_for_detection(pil, short_side, max_side, mean=CLIP_MEAN, std=CLIP_STD)
    return Prepared(tensor, pil_to_tensor(pil) if with_raw else None, scale)


def proposals_for(
    rpn: ProposalFn | None,
    keys: Sequence[str],
    preps: Sequence[Prepared],
    max_proposals: int,
    device: torch.device,
) -> tuple[list[Tensor], list[Tensor]] | tuple[None, None]:
    """Frozen-RPN boxes (original pixels; highest objectness first, so ``max_proposals`` > 0 keeps
    the top-k) scaled into each image's detection frame, and their objectness; (None, None)
    without a frozen RPN."""
    if rpn is None:
        return None, None
    boxes, scores = rpn(keys, [p.raw for p in preps])
    k = max_proposals if max_proposals > 0 else None
    scaled = [(b[:k].float() * p.scale).to(device) for b, p in zip(boxes, preps, strict=True)]
    return scaled, [s[:k].float().to(device) for s in scores]


def transfer_schedule(cfg: TransferConfig) -> Schedule:
    return Schedule(
        cfg.lr, cfg.steps, cfg.warmup_steps, 0.001, "multistep", cfg.lr_decay_at, cfg.lr_decay_factor
    )


def resume_hash(cfg: TransferConfig, run_inputs: str) -> str:
    """Fields that shape the training trajectory (not paths, workers, checkpoints or evaluation)."""
    trajectory = replace(
        cfg, tag="", out_dir="", val_json="", num_workers=0, checkpoint_every=0, eval_batch_size=0,
        score_thresh=0.0, nms_thresh=0.0, detections_per_image=0, test_short_side=0,
        multiply_rpn_score=False, diagnose_gt_boxes=False, detectron2_config="", vocabulary="",
    )  # fmt: skip
    return run_hash(section_hash(trajectory), run_inputs)


def train_detector(
    model: OpenVocabFasterRCNN,
    rpn: ProposalFn | None,
    images: list[CocoImage],
    cfg: TransferConfig,
    device: torch.device,
    resume: str,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """SGD on the base boxes from the latest checkpoint to ``cfg.steps`` (or ``stop_after`` more).

    Returns the training summary; ``summary["finished"]`` is False when stopped early (the
    checkpoint then holds the state).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    checkpointer = StateFileCheckpointer(Path(cfg.out_dir) / CHECKPOINT_DIR, model, optimizer, resume,
                                         "transfer config, init model or RPN", TransferError)  # fmt: skip
    trainer = Trainer(model, optimizer, transfer_schedule(cfg), params=params, checkpointer=checkpointer,
                      checkpoint_every=cfg.checkpoint_every, desc="transfer", lr_key="transfer.lr")  # fmt: skip
    start = trainer.resume()
    stop = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    skipped = trainer.progress.skipped
    with_raw = rpn is not None

    def sample(image, boxes, labels, flipped, short_side, rec: CocoImage) -> dict[str, Any]:
        prep = prepare(image, short_side, cfg.max_side, with_raw)
        return {"key": rec.file_name, "prep": prep, "boxes": boxes * prep.scale, "labels": labels}

    loader = DataLoader(
        BoxImages(images, sample),
        batch_sampler=StepSampler(
            len(images), cfg.batch_size, cfg.seed, cfg.hflip_prob, start, stop, cfg.train_short_sides
        ),  # fmt: skip
        num_workers=cfg.num_workers,
        collate_fn=list,
        generator=torch.Generator().manual_seed(
            cfg.seed
        ),  # keeps the global RNG (restored on resume) untouched
    )
    if start:
        log.info("transfer: resuming at step %d from %s", start, checkpointer.folder)
    precision = resolve_precision(cfg.precision, device, "transfer.precision")

    def step(batch: list[dict[str, Any]]) -> StepOutput | None:
        good = list(drop_errors(batch, skipped))
        if not good:
            return None
        preps = [s["prep"] for s in good]
        tensor, sizes = batch_images([p.image for p in preps])
        proposals, _ = proposals_for(rpn, [s["key"] for s in good], preps, cfg.max_proposals, device)
        targets = [{"boxes": s["boxes"].to(device), "labels": s["labels"].to(device)} for s in good]
        with autocast(precision, device):
            losses = model(tensor.to(device), sizes, proposals, targets)
        return StepOutput({k: v.float() for k, v in losses.items()}, len(good))

    model.train()
    progress = trainer.fit(iter(loader), step, stop)
    for line in skipped.report_lines()[1:] if skipped.counts else []:
        log.info("transfer: %s", line)
    return {
        "finished": trainer.step >= cfg.steps,
        "steps": trainer.step,
        "images": progress.images,
        "seconds": round(progress.seconds, 2),
        "seconds_per_step": round(progress.seconds / max(trainer.step, 1), 4),
        "images_per_s": round(progress.images / max(progress.seconds, 1e-9), 2),
        "final_losses": trainer.bar.running_means(),  # last (up to) 20 steps of this call
        "skipped": dict(skipped.counts),
        "precision": precision,
    }


@torch.no_grad()
def detect_batch(
    model: OpenVocabFasterRCNN,
    rpn: ProposalFn | None,
    keys: Sequence[str],
    images: Sequence[Image.Image],
    cfg: TransferConfig,
    device: torch.device,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``(boxes [K, 4] in original pixels, clipped to the image, scores [K], class indices [K])``
    per RGB image (``keys``: what ``rpn`` knows them by), with the model's current vocabulary at the
    test settings of ``cfg``."""
    preps = [prepare(pil, cfg.test_short_side, cfg.max_side, rpn is not None) for pil in images]
    tensor, image_sizes = batch_images([p.image for p in preps])
    proposals, objectness = proposals_for(rpn, keys, preps, cfg.max_proposals, device)
    with autocast(resolve_precision(cfg.precision, device, "transfer.precision"), device):
        detections = model(
            tensor.to(device), image_sizes, proposals,
            objectness=objectness if cfg.multiply_rpn_score else None,
        )  # fmt: skip
    out = []
    for pil, prep, det in zip(images, preps, detections, strict=True):
        boxes = (det["boxes"].float().cpu() / prep.scale).clamp(min=0)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(max=pil.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(max=pil.height)
        out.append((boxes, det["scores"].float().cpu(), det["labels"].cpu()))
    return out


def detect_images(
    model: OpenVocabFasterRCNN,
    rpn: ProposalFn | None,
    images: Sequence[CocoImage],
    evaluator: DetectionEvaluator,
    cfg: TransferConfig,
    device: torch.device,
) -> None:
    """Detect with the model's current vocabulary and feed each image's boxes (original pixels,
    clipped to the image) to ``evaluator``."""
    model.eval()
    for start in tqdm(range(0, len(images), cfg.eval_batch_size), desc="transfer eval", unit="batch"):
        chunk = images[start : start + cfg.eval_batch_size]
        pils = []
        for img in chunk:
            try:
                pils.append(load_rgb(img.path))
            except UNREADABLE as e:
                raise TransferError(f"cannot read image {img.path}: {e}") from e
        found = detect_batch(model, rpn, [i.file_name for i in chunk], pils, cfg, device)
        for img, (boxes, scores, labels) in zip(chunk, found, strict=True):
            evaluator.process(img.id, boxes, scores, labels)


def run_inputs(cfg: TransferConfig) -> str:
    """Fingerprint of what the config names but does not contain: init weights and RPN files."""
    parts = []
    init = Path(cfg.init.pretrained) if cfg.init.pretrained else None
    if init is not None and (init.is_dir() or init.is_file()):
        parts.append(file_digest(init / CLIP_WEIGHTS_FILE if init.is_dir() else init))
    if cfg.proposals == "frozen" and cfg.precomputed:
        parts.append(file_digest(Path(cfg.precomputed)))
    elif cfg.proposals == "frozen":
        rpn_json = Path(cfg.rpn_dir) / RPN_CONFIG_FILE
        parts.append(file_digest(rpn_json) if rpn_json.is_file() else "no-rpn")
    return "|".join(parts)


def _train_set(cfg: TransferConfig) -> CocoSet:
    data = read_coco(
        cfg.train_json, cfg.image_root, require_images=False, keep_empty=False, error=TransferError
    )
    if not data.images:
        raise TransferError(f"{cfg.train_json}: no image with boxes to train on ({data.skipped.summary()})")
    for line in data.skipped.report_lines()[1:] if data.skipped.total else []:
        log.info("transfer: %s", line)
    return data


@dataclass
class TrainedDetector:
    """A detector folder written by ``make transfer``, ready for any vocabulary."""

    model: OpenVocabFasterRCNN  # eval mode
    text_model: LoadedClip  # the init CLIP: its text tower embeds new class names
    proposals: ProposalFn | None  # the frozen RPN (None: the detector's own trainable RPN)
    cfg: TransferConfig


def load_detector(folder: str | Path, device: torch.device) -> TrainedDetector:
    """Load the detector in ``folder`` (``model.json`` + ``model.safetensors``) with its init CLIP
    and the RPN folder it was trained with (inside ``folder`` for an export of
    :func:`~regionclip.stages.detector_hub.export_detector_hub`).

    Raises:
        TransferError: not a finished detector folder, or its inputs are gone.
    """
    folder = Path(folder)
    record = read_json(folder / MODEL_JSON, "detector record", TransferError)
    if not isinstance(record, dict) or record.get("format") != FORMAT or not (folder / MODEL_FILE).is_file():
        raise TransferError(
            f"{folder}: not a detector folder written by `make transfer` ({MODEL_JSON} + {MODEL_FILE})"
        )
    cfg = from_dict(TransferConfig, record["config"], f"{folder / MODEL_JSON} config")
    bundled = record.get("bundled")  # an exported folder: its init CLIP and RPN are inside it
    if isinstance(bundled, dict):
        cfg = replace(cfg, init=replace(cfg.init, pretrained=str(folder / bundled["init"])),
                      rpn_dir=str(folder / bundled["rpn"]) if bundled.get("rpn") else cfg.rpn_dir)  # fmt: skip
    if cfg.proposals == "frozen" and cfg.precomputed:
        raise TransferError(
            f"{folder}: trained on precomputed proposals ({cfg.precomputed}); new images need an RPN"
        )
    torch.manual_seed(cfg.seed)  # as run_transfer: a random init is then the same model
    try:
        loaded = load_clip(cfg.init, device)
    except (ValueError, OSError) as e:
        raise TransferError(f"{folder}: its init model: {e}") from None
    if loaded.weights_id != record.get("init", {}).get("weights_id"):
        raise TransferError(
            f"{folder}: trained from {record.get('init', {}).get('weights_id')} but {cfg.init.pretrained or 'its init'} "
            f"now holds {loaded.weights_id}; the text embeddings would not match the detector"
        )
    placeholder = torch.zeros(len(record["train_categories"]), loaded.embed_dim)  # replaced per call
    model = build_detector(loaded.model.visual, placeholder, cfg)
    model.load_state_dict(safetensors.torch.load_file(str(folder / MODEL_FILE), device=str(device)))
    proposals = NetworkProposals(load_rpn(cfg.rpn_dir, device), device) if cfg.proposals == "frozen" else None
    return TrainedDetector(model.to(device).eval(), loaded, proposals, cfg)


@torch.no_grad()
def detect_pil(
    detector: TrainedDetector, images: Sequence[Image.Image], class_embeddings: Tensor, device: torch.device
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``(boxes [K, 4] in original pixels, scores [K], class indices [K])`` per PIL image, for the
    vocabulary of ``class_embeddings`` [C, D], at the detector's own test settings."""
    detector.model.classifier.set_embeddings(class_embeddings.to(device))
    return [
        detect_batch(detector.model, detector.proposals, [""], [pil.convert("RGB")], detector.cfg, device)[0]
        for pil in images
    ]


@torch.no_grad()
def region_embeddings_pil(
    detector: TrainedDetector, image: Image.Image, boxes: Tensor, device: torch.device
) -> Tensor:
    """L2-normalised region embeddings ``[N, D]`` of ``boxes`` ``[N, 4]`` (x0 y0 x1 y1, original
    pixels) from the detector's own backbone and box head, as its classifier sees them (cosine with
    a class's text embedding, / temperature, is that class's logit), at its test image size."""
    cfg, encoder = detector.cfg, detector.model.encoder
    prep = prepare(image.convert("RGB"), cfg.test_short_side, cfg.max_side, with_raw=False)
    tensor, _ = batch_images([prep.image])
    with autocast(resolve_precision(cfg.precision, device, "transfer.precision"), device):
        features = encoder.dense_features(tensor.to(device))
        emb = encoder.pool_regions(features, [boxes.float() * prep.scale])
    return F.normalize(emb.float(), dim=-1).cpu()


def run_transfer(cfg: TransferConfig, device: torch.device, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) and evaluate the detector of ``cfg``; returns what ``metrics.json`` holds
    (``{"finished": False, ...}`` when ``stop_after`` stopped training early)."""
    out = Path(cfg.out_dir)
    inputs = run_inputs(cfg)
    vocabulary_file = file_digest(Path(cfg.vocabulary)) if cfg.vocabulary else ""
    this_run = run_hash(
        section_hash(replace(cfg, num_workers=0, checkpoint_every=0)), inputs + vocabulary_file
    )
    done = finished(out / METRICS_FILE, this_run)
    if done is not None:
        log.info("transfer: %s already holds results of this config; skipping", out)
        return done
    require_writable(out, "transfer.out_dir", TransferError)
    precision = resolve_precision(cfg.precision, device, "transfer.precision")
    if cfg.proposals not in ("frozen", "trainable"):
        raise TransferError(f"transfer.proposals={cfg.proposals!r}: expected 'frozen' or 'trainable'")
    if not cfg.train_short_sides:
        raise TransferError("transfer.train_short_sides is empty")

    train_cats = read_categories(cfg.train_json, TransferError)
    val_cats = read_categories(cfg.val_json, TransferError)
    # test vocabulary: the val json's categories, or a list of names matched to them by name
    test_names, vocab_classes = [c["name"] for c in val_cats], None
    if cfg.vocabulary:
        try:
            test_names = read_names_file(cfg.vocabulary)
            vocab_classes = vocabulary_classes(test_names, [c["name"] for c in val_cats], cfg.val_json)
        except (OSError, ValueError) as e:
            raise TransferError(f"transfer.vocabulary {cfg.vocabulary}: {e}") from None
    names = list(dict.fromkeys(test_names + [c["name"] for c in train_cats]))
    torch.manual_seed(cfg.seed)  # a random init (tests, the untrained demo teacher) is then reproducible
    random.seed(cfg.seed)
    try:
        loaded = load_clip(cfg.init, "cpu")
    except (ValueError, OSError) as e:  # a missing, truncated or foreign weights file: one line
        raise TransferError(f"transfer.init: {e}") from None
    try:
        require_resnet(loaded.model.visual, "the C4 detector of `make transfer`")
    except TypeError as e:
        raise TransferError(f"transfer.init {loaded.weights_id}: {e}") from None
    emb, emb_names, source = class_embeddings(cfg, loaded, names)
    train_emb = select_embeddings(emb, emb_names, [c["name"] for c in train_cats], source, cfg.train_json)
    val_emb = select_embeddings(emb, emb_names, test_names, source, cfg.vocabulary or cfg.val_json)
    try:
        model = build_detector(loaded.model.visual, train_emb, cfg)
    except ValueError as e:
        raise TransferError(f"init model {loaded.weights_id} with embeddings {source}: {e}") from e
    init_identity = dict(loaded.identity)
    del loaded  # the text tower is no longer needed
    model.to(device)
    rpn: ProposalFn | None = None
    if cfg.proposals == "frozen" and cfg.precomputed:
        table = load_precomputed_proposals(cfg.precomputed)
        rpn = PrecomputedProposals(table, f"transfer.precomputed {cfg.precomputed}")
        for json_path in (cfg.train_json, cfg.val_json):  # before training, not at the first missing image
            images = read_json(json_path, "COCO json", TransferError).get("images", [])
            rpn.require((im.get("file_name") for im in images), json_path)
    elif cfg.proposals == "frozen":
        rpn = NetworkProposals(load_rpn(cfg.rpn_dir, device), device)

    trajectory = resume_hash(cfg, inputs)  # a trained detector is reused when only evaluation changed
    trained = finished(out / MODEL_JSON, trajectory)
    if trained is not None and (out / MODEL_FILE).is_file():
        model.load_state_dict(safetensors.torch.load_file(str(out / MODEL_FILE), device=str(device)))
        train_summary = trained["train"]
        log.info("transfer: using the trained detector in %s", out)
    else:
        data = _train_set(cfg)
        train_summary = train_detector(model, rpn, data.images, cfg, device, trajectory, stop_after)
        train_summary["skipped"] = dict(data.skipped.counts + Counter(train_summary["skipped"]))
        if not train_summary["finished"]:
            log.info("transfer: stopped at step %d of %d (checkpoint in %s)", train_summary["steps"], cfg.steps,
                     out / CHECKPOINT_DIR)  # fmt: skip
            return {"finished": False, "train": train_summary}
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        with atomic_output(out / MODEL_FILE) as tmp:
            safetensors.torch.save_file(
                state, str(tmp), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)}
            )
        atomic_write_json(out / MODEL_JSON, {
            "format": FORMAT, "version": FORMAT_VERSION, "run_hash": trajectory, "config": to_dict(cfg),
            "init": init_identity, "train_categories": train_cats, "train": train_summary,
        })  # fmt: skip
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)

    # Test time: the whole vocabulary of the val json (base + novel), or transfer.vocabulary.
    model.classifier.set_embeddings(val_emb)
    val = read_coco(cfg.val_json, cfg.image_root, error=TransferError)
    if model.num_classes != len(test_names):
        raise TransferError(
            f"class-count mismatch: {len(test_names)} test classes for {model.num_classes} class embeddings"
        )
    splits = category_splits(val_cats, train_json=cfg.train_json, error=TransferError)

    def test_evaluator() -> DetectionEvaluator:
        evaluator = evaluator_for(val.raw, [c["id"] for c in val_cats], splits)
        return evaluator if vocab_classes is None else VocabularyMapped(evaluator, vocab_classes)

    evaluator = test_evaluator()
    t0 = time.perf_counter()
    detect_images(model, rpn, val.images, evaluator, cfg, device)
    eval_seconds = time.perf_counter() - t0
    results = evaluator.results
    atomic_write_json(out / DETECTIONS_FILE, results)
    gt_boxes = None
    if cfg.diagnose_gt_boxes and cfg.proposals != "frozen":
        log.warning("transfer: no ground-truth-box diagnosis: a trainable RPN makes its own proposals")
    elif cfg.diagnose_gt_boxes:
        table = {im.file_name: (im.boxes, torch.ones(len(im.boxes))) for im in val.images}
        gt_evaluator = test_evaluator()
        detect_images(model, PrecomputedProposals(table, "val boxes"), val.images, gt_evaluator, cfg, device)
        gt_summary = ap_summary(gt_evaluator.evaluate(), val_cats, splits)
        gt_boxes = {k: gt_summary[k] for k in ("AP50_all", "AP50_base", "AP50_novel", "AP50_per_class")}
    summary = {
        "finished": True,
        "run_hash": this_run,
        "tag": cfg.tag,
        "init": init_identity,
        **ap_summary(evaluator.evaluate(), val_cats, splits),
        "precision": precision,
        "eval": {"images": len(val.images), "detections": len(results), "seconds": round(eval_seconds, 2),
                 "images_per_s": round(len(val.images) / max(eval_seconds, 1e-9), 2)},
        "train": train_summary,
        **({"gt_boxes": gt_boxes} if gt_boxes is not None else {}),
    }  # fmt: skip
    atomic_write_json(out / METRICS_FILE, summary)
    return summary
