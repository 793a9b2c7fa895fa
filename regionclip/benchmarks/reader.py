"""Shard reader throughput: decoded images/s of EmojiWorld-sized JPEG samples.

Two ways of reading the same shards, alternated within each repeat so that both see the same
machine load: :func:`iter_image_text` in one process, and :func:`make_loader` with DataLoader
workers (worker start-up included, as a training epoch pays it).
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from regionclip.data.shards import (
    SampleErrors,
    ShardWriter,
    drop_errors,
    encode_image,
    image_text_pipeline,
    image_text_sample,
    iter_image_text,
    make_loader,
)


def smooth_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A random smooth RGB image with fine texture: JPEG sizes close to EmojiWorld scenes, unlike
    pure noise (which compresses badly and would measure the entropy decoder)."""
    base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (size, size), Image.BICUBIC
    )
    grain = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(base, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def write_bench_shards(
    out_dir: Path, n_samples: int, image_size: int, shard_size: int, seed: int
) -> tuple[str, int]:
    """Write the benchmark shards; returns (brace pattern, total JPEG bytes)."""
    rng = np.random.default_rng(seed)
    jpeg_bytes = 0
    with ShardWriter(out_dir, "bench", maxcount=shard_size) as writer:
        for i in range(n_samples):
            jpg = encode_image(smooth_image(rng, image_size), "jpg", quality=90)
            jpeg_bytes += len(jpg)
            meta = {"width": image_size, "height": image_size, "source_id": i}
            writer.write(image_text_sample(f"{i:08d}", jpg, "jpg", f"a photo of thing {i % 97}", meta))
    last = len(writer.shards) - 1
    return str(out_dir / f"bench-{{000000..{last:06d}}}.tar"), jpeg_bytes


def bench_reader(
    workdir: str | Path,
    n_samples: int = 2000,
    image_size: int = 128,
    shard_size: int = 250,
    repeats: int = 5,
    num_workers: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Median decoded images/s over ``repeats`` runs, one process and ``num_workers`` workers.

    Returns ``{"reader_images_per_s", "reader_images_per_s_workers<N>", "runs", "params",
    "jpeg_bytes_mean"}``; raises RuntimeError if a run loses or rejects a sample.
    """
    workdir = Path(workdir)
    shard_dir = workdir / "reader_shards"
    shutil.rmtree(shard_dir, ignore_errors=True)
    urls, jpeg_bytes = write_bench_shards(shard_dir, n_samples, image_size, shard_size, seed)

    def one_process(errors: SampleErrors) -> int:
        return sum(1 for _ in iter_image_text(urls, errors))

    def with_workers(errors: SampleErrors) -> int:
        loader = make_loader(image_text_pipeline(urls, split_by_node=False), num_workers=num_workers)
        return sum(1 for _ in drop_errors(loader, errors))

    modes = {"one_process": one_process, f"workers{num_workers}": with_workers}
    runs = []
    for rep in tqdm(range(repeats), desc="reader bench", unit="repeat"):
        for mode, fn in modes.items():
            start = time.perf_counter()
            errors = SampleErrors()
            n = fn(errors)
            seconds = time.perf_counter() - start
            if n != n_samples or errors.counts:
                raise RuntimeError(
                    f"reader bench ({mode}): decoded {n} of {n_samples} samples; {errors.summary()}"
                )
            runs.append({"repeat": rep, "mode": mode, "seconds": seconds, "images_per_s": n / seconds})

    def median(mode: str) -> float:
        return statistics.median(r["images_per_s"] for r in runs if r["mode"] == mode)

    return {
        "reader_images_per_s": median("one_process"),
        f"reader_images_per_s_workers{num_workers}": median(f"workers{num_workers}"),
        "jpeg_bytes_mean": jpeg_bytes / n_samples,
        "params": {
            "n_samples": n_samples,
            "image_size": image_size,
            "shard_size": shard_size,
            "repeats": repeats,
            "num_workers": num_workers,
            "seed": seed,
        },
        "runs": runs,
    }
