"""The pretraining input stream: shards → decoded samples → collated batches, resumable exactly.

Every process reads ``W = max(1, num_workers)`` *streams*, one per DataLoader worker; stream ``s``
(``rank * W + worker``) of ``S = world_size * W`` takes every S-th draw, starting at ``s``, of one
global, infinite shard sequence: epoch ``e`` of that sequence is a permutation of all shards seeded
by ``(seed, e)``. So every shard is read once per epoch over all processes (without
replacement, like Detectron2's infinite TrainingSampler), no stream ever runs dry (each rank
yields as many batches as the loop asks for, which DDP requires), and shard counts need not
divide evenly. Inside a shard, samples are shuffled in blocks of ``shuffle_buffer`` consecutive
samples, by a permutation seeded by ``(seed, draw index, block)``.

Resume: a stream's position is ``(draw, offset)``: the ``draw``-th shard of the stream and the
raw samples already consumed in it (bad ones included). The stream is a pure function of its
start position, so a restart skips to any position at the cost of reading one partial shard (no
replay of earlier shards). Batches carry the position after them; the loop stores the last one of
each stream (:class:`DataState`, JSON) in its checkpoints. DataLoader workers are served round
robin, so after ``n`` batches the next one comes from worker ``n % W``: on resume, physical
worker ``p`` plays stream ``(p + n) % W``. A resume needs the same process count and
``num_workers`` (:meth:`DataState.check_layout`).

Because shard draws and block permutations do not depend on the process layout, 2 processes
with batch ``B`` over shards of exactly ``B`` samples see, together, the same global batches as
1 process with batch ``2B`` (the distributed-equality test uses this).

Bad samples (unreadable shards, undecodable fields) become error records that travel with the
next batch to the main process, where :class:`~regionclip.data.shards.SampleErrors` counts them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.utils import make_seed

from regionclip.data.pseudo_labels import PseudoLabels, decode
from regionclip.data.sample_errors import ERROR_FIELD, error_record
from regionclip.data.shards import IMAGE_EXTS, decode_image_text, expand_shards

Decoder = Callable[[dict[str, Any]], dict[str, Any]]
Collate = Callable[[list[dict[str, Any]], torch.Generator], Any]


# --------------------------------------------------------------------------------------------
# Decoding (explicit: never unpickles)
# --------------------------------------------------------------------------------------------


def decode_pseudo(raw: dict[str, Any]) -> PseudoLabels | dict[str, Any]:
    """Raw pseudo-label sample → :class:`~regionclip.data.pseudo_labels.PseudoLabels`, or an error
    record (``bad_pseudo_sample``, ``missing_image``, ``bad_image``)."""
    key, url = raw.get("__key__", ""), raw.get("__url__", "")
    if not any(e in raw for e in IMAGE_EXTS):
        return error_record(
            "missing_image", key, url, "pseudo-label sample without image (pseudolabel.store_image=false?)"
        )
    try:
        return decode(raw)
    except ValueError as e:
        return error_record("bad_pseudo_sample", key, url, str(e))
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt images
        return error_record("bad_image", key, url, f"{type(e).__name__}: {e}")


DECODERS: dict[str, Decoder] = {"regions": decode_pseudo, "image_text": decode_image_text}


# --------------------------------------------------------------------------------------------
# Deterministic shard sequence
# --------------------------------------------------------------------------------------------


def shard_at(urls: Sequence[str], index: int, seed: int) -> str:
    """Shard number ``index`` of the global sequence: epoch ``index // n`` is a seeded permutation."""
    n = len(urls)
    epoch, i = divmod(index, n)
    order = list(range(n))
    random.Random(make_seed(seed, epoch)).shuffle(order)
    return urls[order[i]]


def batch_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """The collate RNG (flips, caption choice) of a stream's ``index``-th batch: no state to save."""
    return torch.Generator().manual_seed(make_seed(seed, stream, index) & (2**63 - 1))


@dataclass
class StreamPosition:
    draw: int = 0  # the stream's draw number (global sequence index = stream + draw * S)
    offset: int = 0  # raw samples of that shard already consumed
    batches: int = 0  # batches this stream has delivered


@dataclass
class DataState:
    """Where each stream of one process stands; lives in checkpoints as JSON."""

    world_size: int = 1
    num_streams: int = 1
    batches: int = 0  # batches delivered to the loop by this process
    streams: list[StreamPosition] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.streams:
            self.streams = [StreamPosition() for _ in range(self.num_streams)]

    def update(self, item: dict[str, Any]) -> None:
        """Record a delivered batch (``item`` from :class:`PretrainStream`)."""
        draw, offset = item["position"]
        pos = self.streams[item["stream"]]
        pos.draw, pos.offset, pos.batches = draw, offset, pos.batches + 1
        self.batches += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "num_streams": self.num_streams,
            "batches": self.batches,
            "streams": [[p.draw, p.offset, p.batches] for p in self.streams],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataState:
        return cls(
            world_size=int(d["world_size"]),
            num_streams=int(d["num_streams"]),
            batches=int(d["batches"]),
            streams=[StreamPosition(*map(int, p)) for p in d["streams"]],
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> DataState:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: unreadable data position: {e}") from None

    def check_layout(self, world_size: int, num_streams: int, where: str) -> None:
        if (self.world_size, self.num_streams) != (world_size, num_streams):
            raise ValueError(
                f"{where} was written by {self.world_size} process(es) x {self.num_streams} data stream(s); "
                f"this run has {world_size} x {num_streams}. Resume with the same process count and "
                "pretrain.num_workers, or start a new pretrain.out_dir"
            )


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------


class PretrainStream(IterableDataset):
    """Infinite batches of one process; see the module docstring for the order.

    Yields dicts: ``batch`` (``collate(samples, generator)``), ``keys``, ``stream`` (logical
    worker), ``position`` ``(draw, offset)`` after this batch and ``errors`` (error records met
    since the previous batch of this stream).
    """

    def __init__(
        self,
        urls: Sequence[str],
        decode: Decoder,
        collate: Collate,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle_buffer: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        state: DataState | None = None,
    ):
        if not urls:
            raise ValueError("no shards to train on")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.urls = list(urls)
        self.decode, self.collate, self.batch_size = decode, collate, batch_size
        self.seed, self.block = seed, max(1, shuffle_buffer)
        self.rank, self.world_size = rank, world_size
        self.num_streams = max(1, num_workers)
        self.state = state or DataState(world_size, self.num_streams)
        self.state.check_layout(world_size, self.num_streams, "the data position")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.state.batches) % self.num_streams
        yield from self._batches(logical, self.state.streams[logical])

    def _batches(self, logical: int, start: StreamPosition) -> Iterator[dict[str, Any]]:
        stream = self.rank * self.num_streams + logical
        total_streams = self.world_size * self.num_streams
        samples: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        batches = start.batches
        draw, skip = start.draw, start.offset
        empty_draws = 0
        while True:
            index = stream + draw * total_streams
            url = shard_at(self.urls, index, self.seed)
            offset = skip
            good = 0
            for raw in self._shard_samples(url, index, skip):
                if ERROR_FIELD in raw:  # unreadable shard: not a sample position
                    errors.append(raw)
                    continue
                offset += 1
                sample = self.decode(raw)
                if isinstance(sample, dict) and ERROR_FIELD in sample:
                    errors.append(sample)
                    continue
                good += 1
                samples.append(sample)
                if len(samples) == self.batch_size:
                    gen = batch_generator(self.seed, stream, batches)
                    keys = [
                        s.key if isinstance(s, PseudoLabels) else str(s.get("__key__", "?")) for s in samples
                    ]
                    yield {
                        "batch": self.collate(samples, gen),
                        "keys": keys,
                        "stream": logical,
                        "position": (draw, offset),
                        "errors": errors,
                    }
                    batches += 1
                    samples, errors = [], []
            empty_draws = 0 if good else empty_draws + 1
            if empty_draws >= max(len(self.urls), 1) * 2:
                raise ValueError(
                    f"stream {stream}: no usable sample in {empty_draws} consecutive shard draws "
                    f"(e.g. {url}); errors: {[e.get(ERROR_FIELD) for e in errors[-5:]]}"
                )
            draw, skip = draw + 1, 0

    def _shard_samples(self, url: str, index: int, skip: int) -> Iterator[dict[str, Any]]:
        """Raw samples of ``url`` from position ``skip`` on, block-shuffled; earlier blocks are
        read but not decoded or permuted."""
        raws = expand_shards([{"url": url}])
        block_no, pos = 0, 0
        first_block = skip // self.block
        while True:
            block: list[dict[str, Any]] = []
            trailing: list[dict[str, Any]] = []
            for raw in raws:
                if ERROR_FIELD in raw:
                    trailing.append(raw)
                    break
                block.append(raw)
                if len(block) == self.block:
                    break
            if block_no >= first_block and block:
                if self.block > 1:
                    random.Random(make_seed(self.seed, index, block_no)).shuffle(block)
                start = skip - pos if block_no == first_block else 0
                yield from block[start:]
            pos += len(block)
            block_no += 1
            yield from trailing
            if trailing or len(block) < self.block:
                return


def make_loader(stream: PretrainStream, num_workers: int) -> DataLoader:
    """DataLoader over a :class:`PretrainStream`: items pass through as they are (batched already)."""
    return DataLoader(
        stream,
        batch_size=None,
        collate_fn=_as_is,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def _as_is(item: Any) -> Any:
    return item
