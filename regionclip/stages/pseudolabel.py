"""`make pseudolabel`: label image–text shards with teacher region concepts, offline and resumable.

RegionCLIP recomputes proposals and teacher labels in every training step; here they are computed
once and stored (:mod:`regionclip.data.pseudo_labels`), one output shard per input shard, by the
labeler of :mod:`regionclip.labeling.labeler`. Beside each shard, ``<stem>.manifest.json``
records the counts, the concept-pool hash, teacher and RPN identities and the config hash; a shard
whose manifest matches the current run is not recomputed. Process ``r`` of ``n`` labels input
shards ``r, r+n, …`` and batches never span shards, so the union of a multi-process run's shards
equals a one-process run's byte for byte (at the same per-process thread count: CPU convolutions
split their sums by thread, which moves the last float bits; torchrun starts workers with
``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from regionclip.config import ClipModelConfig, PseudoLabelConfig, section_hash, to_dict
from regionclip.data.images import load_rgb
from regionclip.data.pseudo_labels import (
    FORMAT,
    FORMAT_VERSION,
    NamedShard,
    encode,
    manifest_path,
    output_name,
)
from regionclip.data.sample_errors import ERROR_FIELD, SampleErrors, error_record
from regionclip.data.shards import expand_urls, image_text_pipeline
from regionclip.engine.run_cache import finished, read_record, run_hash
from regionclip.errors import InputError, ProposalError
from regionclip.labeling.labeler import LabelInput, PseudoLabeler, build_labeler
from regionclip.labeling.modes import LabelMode
from regionclip.models.rpn import CONFIG_FILE as RPN_CONFIG_FILE
from regionclip.models.rpn import WEIGHTS_FILE as RPN_WEIGHTS_FILE
from regionclip.text import names_sha256
from regionclip.utils import atomic_write_json, is_stale_temp, require_writable, sha256_file

log = logging.getLogger(__name__)


@dataclass
class StageStats:
    """Counts of one process's part of the stage (summed over processes for the summary)."""

    images: int = 0
    regions_proposed: int = 0
    regions_kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # images without regions, by reason
    shards_done: int = 0
    shards_reused: int = 0
    shards_busy: int = 0  # locked by another process labelling the same folder
    errors: SampleErrors = field(default_factory=SampleErrors)
    images_this_run: int = 0

    def add_counts(self, counts: dict[str, Any]) -> None:
        self.images += counts["images"]
        self.regions_proposed += counts["regions_proposed"]
        self.regions_kept += counts["regions_kept"]
        self.dropped.update(counts["regions_dropped"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "regions_proposed": self.regions_proposed,
            "regions_kept": self.regions_kept,
            "dropped": dict(self.dropped),
            "shards_done": self.shards_done,
            "shards_reused": self.shards_reused,
            "shards_busy": self.shards_busy,
            "images_this_run": self.images_this_run,
            "skipped": dict(self.errors.counts),
            "report": self.errors.report_lines() if self.errors.counts else [],
            "unreadable_shards": list(self.errors.unreadable_shards),
        }


def merge_stats(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum :meth:`StageStats.to_dict` results of several processes."""
    total: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            if isinstance(v, dict):
                c = total.setdefault(k, Counter())
                c.update(v)
            elif isinstance(v, list):
                total.setdefault(k, []).extend(v)
            else:
                total[k] = total.get(k, 0) + v
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in total.items()}


@dataclass
class RunIdentity:
    """What makes two runs' output shards interchangeable (recorded in every manifest)."""

    config: dict[str, Any]
    config_hash: str
    concept_pool: dict[str, Any]
    teacher: dict[str, str]
    rpn: dict[str, Any]

    def run_hash(self, url: str) -> str:
        return run_hash(self.config_hash, self.concept_pool["sha256"], self.teacher, self.rpn, url)


def label_settings(cfg: PseudoLabelConfig, mode: LabelMode) -> PseudoLabelConfig:
    """The settings that change the labels. Locations are blanked (moving data changes nothing;
    the concept pool and the input shard are identified by hash and URL in the manifest); the
    caption-phrases entry carries what the mode's own inputs are (their content hash)."""
    return replace(cfg, input_shards="", out_dir="", concepts="", caption_phrases=mode.identity())


def rpn_identity(rpn_dir: str, precomputed: str = "") -> dict[str, Any]:
    """What identifies the proposals: the precomputed file's hash, or the RPN's weights and config."""
    if precomputed:
        return {"kind": "precomputed", "path": str(precomputed), "sha256": sha256_file(precomputed)}
    meta = read_record(Path(rpn_dir) / RPN_CONFIG_FILE) or {}
    return {
        "kind": "network",
        "sha256": sha256_file(Path(rpn_dir) / RPN_WEIGHTS_FILE),
        "config_hash": meta.get("config_hash", ""),
    }


def concept_pool_identity(
    path: str | os.PathLike, names: Sequence[str], metadata: dict[str, str]
) -> dict[str, Any]:
    return {
        "path": str(Path(path).resolve()),
        "sha256": sha256_file(path),
        "count": len(names),
        "names_sha256": names_sha256(names),
        "embedded_with": metadata.get("weights_id", ""),
    }


def is_finished(out_path: Path, expected: str) -> bool:
    """An output shard counts as done when it and its manifest exist, the manifest matches and the
    shard is byte for byte the one the manifest recorded (size, then sha256)."""
    manifest = finished(manifest_path(out_path), expected) if out_path.is_file() else None
    return (
        manifest is not None
        and manifest.get("shard_bytes") == out_path.stat().st_size
        and manifest.get("shard_sha256") == sha256_file(out_path)
    )


def remove_stale_temps(out_path: Path) -> None:
    """Temp files a killed run of this host left for this shard (ShardWriter's and
    atomic_output's); a live process's temps are its own."""
    for pattern in (f".{out_path.name}.tmp*", f".{manifest_path(out_path).name}.tmp*"):
        for stale in out_path.parent.glob(pattern):
            if is_stale_temp(stale):
                stale.unlink(missing_ok=True)


@contextmanager
def shard_lock(out_path: Path) -> Iterator[bool]:
    """Hold ``.<shard>.lock`` (an advisory lock, released when the process ends, also by a kill);
    yields False when another process holds it, i.e. is labelling this shard now. The holder
    removes the file when done, so a finished folder keeps no lock files."""
    lock = out_path.with_name(f".{out_path.name}.lock")
    while True:
        handle = open(lock, "a")  # noqa: SIM115 - closed below on every path
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            yield False
            return
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            break
        # the previous holder removed the file between our open and our lock: lock the new one
        handle.close()
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)  # before unlocking, so no one locks the removed file
        handle.close()


def _decoded(raw: dict[str, Any]) -> dict[str, Any]:
    """Reader sample (image bytes not decoded) → + ``image`` PIL, or an error record."""
    try:
        image = load_rgb(raw["image"])
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt data
        return error_record("bad_image", raw["__key__"], raw["__url__"], f"{type(e).__name__}: {e}")
    return {
        **raw,
        "image_bytes": raw["image"],
        "image": image,
        "width": image.width,
        "height": image.height,
    }


def label_shard(
    labeler: PseudoLabeler,
    url: str,
    out_path: Path,
    identity: RunIdentity,
    progress: Callable[[int], None] = lambda n: None,
) -> tuple[dict[str, Any] | None, SampleErrors]:
    """Label one input shard into ``out_path`` + manifest; returns ``(manifest, errors)``.

    Bad samples are skipped and counted. When the input shard cannot be read to its end, or
    labelling it fails, nothing is written (manifest None) and the shard is reported unreadable,
    so that the other shards are still labelled and a later run retries this one.
    """
    cfg = labeler.cfg
    errors = SampleErrors()
    counts = {"images": 0, "regions_proposed": 0, "regions_kept": 0, "regions_dropped": Counter()}
    pipeline = image_text_pipeline(url, decode_image=False, split_by_node=False, split_by_worker=False)
    writer = NamedShard(out_path)

    def flush(batch: list[dict[str, Any]]) -> None:
        labels = labeler.label_batch(
            [LabelInput(s["__key__"], s["image"], s["captions"], s["meta"]) for s in batch]
        )
        for rec, src in zip(labels, batch, strict=True):
            writer.write(encode(rec, (src["image_ext"], src["image_bytes"]) if cfg.store_image else None))
            counts["images"] += 1
            counts["regions_proposed"] += rec.num_proposals
            counts["regions_kept"] += rec.num_kept
            if rec.drop_reason:
                counts["regions_dropped"][rec.drop_reason] += 1
        progress(len(batch))

    try:
        batch: list[dict[str, Any]] = []
        for item in pipeline:
            sample = item if ERROR_FIELD in item else _decoded(item)
            if ERROR_FIELD in sample:
                errors.add(sample)
                continue
            batch.append(sample)
            if len(batch) == cfg.batch_size:
                flush(batch)
                batch = []
        flush(batch)
    except Exception as e:  # noqa: BLE001 - one shard's failure must not stop the others
        writer.abort()
        errors.add(error_record("unreadable_shard", "", url, f"labelling stopped: {type(e).__name__}: {e}"))
        log.error(
            "pseudolabel: %s: labelling stopped: %s: %s (nothing written for it)", url, type(e).__name__, e
        )
        return None, errors
    except BaseException:  # interrupted: leave no partial shard behind
        writer.abort()
        raise
    if errors.unreadable_shards:
        writer.abort()
        return None, errors
    writer.finish()
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "input_url": url,
        "shard": out_path.name,
        "shard_bytes": out_path.stat().st_size,
        "shard_sha256": sha256_file(out_path),
        "counts": {**counts, "regions_dropped": dict(counts["regions_dropped"])},
        "skipped": dict(errors.counts),
        "concept_pool": identity.concept_pool,
        "teacher": identity.teacher,
        "rpn": identity.rpn,
        "mode": cfg.mode,
        "config": identity.config,
        "config_hash": identity.config_hash,
        "run_hash": identity.run_hash(url),
    }
    atomic_write_json(manifest_path(out_path), manifest)
    return manifest, errors


def assign_shards(urls: Sequence[str], rank: int, world: int) -> list[str]:
    """This process's input shards: every ``world``-th, starting at ``rank``."""
    return list(urls[rank::world])


def plan_outputs(cfg: PseudoLabelConfig) -> list[tuple[str, Path]]:
    """``(input url, output path)`` of every input shard; two inputs with one name are an error."""
    urls = expand_urls(cfg.input_shards)
    if not urls:
        raise InputError(f"pseudolabel.input_shards={cfg.input_shards!r} names no shards")
    out_dir = Path(cfg.out_dir)
    seen: dict[str, str] = {}
    plan = []
    for url in urls:
        try:
            name = output_name(url)
        except ValueError as e:
            raise InputError(f"pseudolabel.input_shards: {e}") from None
        if name in seen:
            raise InputError(
                f"input shards {seen[name]} and {url} would both write {out_dir / name}; rename one"
            )
        seen[name] = url
        plan.append((url, out_dir / name))
    return plan


def run_shards(
    labeler: PseudoLabeler,
    plan: Sequence[tuple[str, Path]],
    identity: RunIdentity,
    progress: Callable[[int], None] = lambda n: None,
) -> StageStats:
    """Label every ``(url, out_path)`` of ``plan`` that is not finished yet; finished ones are reused."""
    stats = StageStats()
    for url, out_path in plan:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with shard_lock(out_path) as mine:
            if not mine:
                log.warning("pseudolabel: %s is being labelled by another process; left to it", out_path)
                stats.shards_busy += 1
                continue
            remove_stale_temps(out_path)
            if is_finished(out_path, identity.run_hash(url)):
                manifest = read_record(manifest_path(out_path)) or {}
                stats.add_counts(manifest["counts"])
                stats.errors.counts.update(manifest["skipped"])
                stats.shards_reused += 1
                continue
            manifest, errors = label_shard(labeler, url, out_path, identity, progress)
        stats.errors.update(errors)
        if manifest is not None:
            stats.add_counts(manifest["counts"])
            stats.images_this_run += manifest["counts"]["images"]
            stats.shards_done += 1
    return stats


def prepare_run(
    pl: PseudoLabelConfig, teacher: ClipModelConfig, rpn_dir: str, precomputed: str, device: torch.device
) -> tuple[PseudoLabeler, RunIdentity]:
    """The labeler of ``pl`` (the ``teacher`` model, the proposals of ``rpn_dir`` or the
    ``precomputed`` file) and the identity its shards are recorded with."""
    require_writable(pl.out_dir, "pseudolabel.out_dir")
    try:
        labeler, loaded, names, metadata = build_labeler(pl, teacher, rpn_dir, precomputed, device)
    except ProposalError as e:
        raise InputError(str(e)) from None
    settings = label_settings(pl, labeler.mode)
    identity = RunIdentity(
        config=to_dict(settings),
        config_hash=section_hash(settings),
        concept_pool=concept_pool_identity(pl.concepts, names, metadata),
        teacher=dict(loaded.identity),
        rpn=rpn_identity(rpn_dir, precomputed),
    )
    return labeler, identity
