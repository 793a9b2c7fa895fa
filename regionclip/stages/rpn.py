"""`make rpn`: train the class-agnostic RPN on base-class boxes, save it, measure its recall.

Seeded SGD through the one training loop (:class:`~regionclip.engine.loop.Trainer`) with warm-up
and step decay, horizontal flips and resumable checkpoints in ``<out_dir>/checkpoint/``; at the
end ``rpn.safetensors`` + ``rpn.json`` (:func:`~regionclip.models.rpn.save_rpn`), then proposal
recall of base and novel val boxes in ``summary.json``. A finished network of the same config is
not trained again.

Training images without any box are skipped by default (``keep_empty``): in a base-only box json
such an image may show novel objects, and training on it as a pure negative would teach the RPN
to suppress exactly the objects open-vocabulary detection is about.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from regionclip.config import RPNConfig, section_hash
from regionclip.data.coco import CocoImage, read_coco
from regionclip.data.detection import BoxImages, StepSampler
from regionclip.data.sample_errors import SampleErrors, drop_errors
from regionclip.engine.checkpoint import StateFileCheckpointer
from regionclip.engine.loop import StepOutput, Trainer
from regionclip.engine.run_cache import finished, read_record
from regionclip.engine.schedule import Schedule
from regionclip.errors import ProposalError
from regionclip.evaluation.recall import evaluate_recall
from regionclip.models.preprocess import pil_to_tensor
from regionclip.models.rpn import CONFIG_FILE, WEIGHTS_FILE, build_proposal_network, save_rpn
from regionclip.precision import autocast, resolve_precision
from regionclip.utils import atomic_write_json, require_writable

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoint"


def rpn_schedule(cfg: RPNConfig) -> Schedule:
    return Schedule(
        cfg.lr, cfg.steps, cfg.warmup_steps, 0.001, "multistep", cfg.lr_decay_at, cfg.lr_decay_factor
    )


def make_optimizer(model: nn.Module, cfg: RPNConfig) -> torch.optim.SGD:
    """SGD; normalisation weights get no weight decay (Detectron2's WEIGHT_DECAY_NORM = 0)."""
    norm_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        for p in m.parameters()
    }
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in norm_params], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if id(p) in norm_params], "weight_decay": 0.0},
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum)


def resume_hash(cfg: RPNConfig) -> str:
    """Hash of the fields that shape the training trajectory (not workers, checkpoints or eval)."""
    return section_hash(replace(cfg, out_dir="", val_json="", num_workers=0, checkpoint_every=0,
                                eval_batch_size=0, recall_at=[], recall_iou=0.0))  # fmt: skip


def log_skips(errors: SampleErrors, source: str | Path) -> None:
    """One line of counts by reason, then the first few offending files of each real error."""
    if errors.counts:
        log.info(
            "rpn: left out of %s: %s", source, ", ".join(f"{n} {r}" for r, n in sorted(errors.counts.items()))
        )
        for line in errors.report_lines()[1:]:
            log.info("rpn: %s", line)


def is_trained(cfg: RPNConfig) -> bool:
    """``out_dir`` holds a finished network trained with exactly this config."""
    out = Path(cfg.out_dir)
    return (out / WEIGHTS_FILE).is_file() and finished(
        out / CONFIG_FILE, section_hash(cfg), "config_hash"
    ) is not None


def _rpn_sample(image, boxes, labels, flipped, short_side, rec: CocoImage) -> dict[str, Any]:
    return {"image": pil_to_tensor(image), "boxes": boxes}


def train_rpn(
    cfg: RPNConfig, device: str | torch.device = "cpu", stop_after: int | None = None
) -> dict[str, Any]:
    """Train (or resume) the RPN on ``cfg.train_json``, save it, then measure recall on ``cfg.val_json``.

    Args:
        stop_after: run at most this many steps in this call, then checkpoint and return
            (``summary["finished"]`` is False); a later call resumes exactly.

    Returns:
        The summary also written to ``<out_dir>/summary.json`` when training finished.
    """
    out, device = Path(cfg.out_dir), torch.device(device)
    if is_trained(cfg):
        log.info("rpn: %s already holds a network trained with this config; skipping", out)
        return read_record(out / SUMMARY_FILE) or {"finished": True}
    require_writable(out, "rpn.out_dir", ProposalError)
    precision = resolve_precision(cfg.precision, device, "rpn.precision")
    data = read_coco(cfg.train_json, cfg.image_root, require_images=False, keep_empty=cfg.keep_empty,
                     require_categories=False, error=ProposalError)  # fmt: skip
    if not data.images:
        raise ProposalError(f"{cfg.train_json}: no image with boxes to train on ({data.skipped.summary()})")
    torch.manual_seed(cfg.seed)
    model = build_proposal_network(cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    checkpointer = StateFileCheckpointer(
        out / CHECKPOINT_DIR, model, optimizer, resume_hash(cfg), "rpn config", ProposalError
    )
    trainer = Trainer(model, optimizer, rpn_schedule(cfg), checkpointer=checkpointer,
                      checkpoint_every=cfg.checkpoint_every, desc="rpn", lr_key="rpn.lr")  # fmt: skip
    start = trainer.resume()
    stop = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    skipped = trainer.progress.skipped
    loader = DataLoader(
        BoxImages(data.images, _rpn_sample),
        batch_sampler=StepSampler(len(data.images), cfg.batch_size, cfg.seed, cfg.hflip_prob, start, stop),
        num_workers=cfg.num_workers,
        collate_fn=list,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched
        persistent_workers=False,
    )
    if start:
        log.info("rpn: resuming at step %d from %s", start, checkpointer.folder)

    def step(batch: list[dict[str, Any]]) -> StepOutput | None:
        good = list(drop_errors(batch, skipped))
        if not good:
            return None
        images = [s["image"].to(device) for s in good]
        targets = [{"boxes": s["boxes"].to(device)} for s in good]
        with autocast(precision, device):
            _, _, losses = model(images, targets)
        return StepOutput({k: v.float() for k, v in losses.items()}, len(good))

    model.train()
    progress = trainer.fit(iter(loader), step, stop)
    final_losses = trainer.bar.running_means()
    total_skipped = SampleErrors()
    for errors in (data.skipped, skipped):
        total_skipped.update(errors)
    train_summary = {
        "images": progress.images,
        "steps": trainer.step,
        "seconds": round(progress.seconds, 2),
        "images_per_s": round(progress.images / max(progress.seconds, 1e-9), 2),
        "final_losses": final_losses,  # mean of the last (up to) 20 steps of this call
        "train_images": len(data.images),
        "skipped": dict(total_skipped.counts),
        "precision": precision,
    }
    losses_text = ", ".join(f"{k} {v:.3f}" for k, v in final_losses.items())
    if trainer.step < cfg.steps:
        log.info(
            "rpn: stopped at step %d of %d (checkpoint in %s); %s",
            trainer.step,
            cfg.steps,
            checkpointer.folder,
            losses_text,
        )
        return {"finished": False, "train": train_summary}
    log_skips(total_skipped, cfg.train_json)
    log.info(
        "rpn: trained %d steps on %d images (%d seen) in %.1f s, %.1f images/s in %s; %s",
        trainer.step, len(data.images), progress.images, progress.seconds,
        progress.images / max(progress.seconds, 1e-9), precision, losses_text,
    )  # fmt: skip
    save_rpn(model, cfg, out, extra={"train": train_summary})
    checkpointer.clear()
    summary: dict[str, Any] = {"finished": True, "config_hash": section_hash(cfg), "train": train_summary}
    if cfg.val_json:
        summary["recall"] = evaluate_recall(
            model.eval(), cfg.val_json, cfg.image_root, cfg.train_json, cfg.recall_at, cfg.recall_iou,
            cfg.eval_batch_size, device,
        )  # fmt: skip
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary
