"""Image–text webdataset shards: sample schema, atomic writer, error-tolerant reader.

Sample schema (DESIGN §3): ``__key__`` (unique, no dots), one image (``jpg``/``png``/``webp``),
the caption as ``txt`` (UTF-8) or as ``captions: [...]`` inside ``json``, and ``json`` metadata
(``width``, ``height``, ``source_id``).

The reader never unpickles: it only decodes images with Pillow, text as UTF-8 and JSON. A bad
sample does not stop a run: it travels down the pipeline as an *error record* (a dict with
``__error__``) so that it can be counted in the main process even when decoding happens in
DataLoader workers; :func:`drop_errors` turns the records into counts by reason.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
ERROR_FIELD = "__error__"


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key (webdataset splits file names at the first dot)."""
    if not key or "." in key or "/" in key or key.startswith("__"):
        raise ValueError(f"invalid sample key {key!r}: keys must be non-empty, without '.', '/' or a leading '__'")
    return key


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def encode_value(ext: str, value: Any) -> bytes:
    """Encode one field by its extension: bytes pass through, ``json`` dumps, text is UTF-8."""
    if isinstance(value, bytes):
        return value
    if ext == "json" or ext.endswith(".json"):
        return json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"field '{ext}': cannot encode {type(value).__name__}; pass bytes, str or (for json) a dict")


def encode_image(image: Image.Image, fmt: str = "jpg", quality: int = 90) -> bytes:
    """Encode a PIL image deterministically (no timestamps or random metadata)."""
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        image.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    elif fmt == "png":
        image.save(buf, format="PNG", optimize=False)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unsupported image format {fmt!r}; use one of {IMAGE_EXTS}")
    return buf.getvalue()


def image_text_sample(
    key: str, image: bytes, image_ext: str, caption: str | list[str], meta: dict[str, Any]
) -> dict[str, Any]:
    """Build a schema-conforming sample; a list of captions goes into ``json.captions``."""
    check_key(key)
    if image_ext not in IMAGE_EXTS:
        raise ValueError(f"sample {key}: image extension {image_ext!r} not in {IMAGE_EXTS}")
    meta = dict(meta)
    sample: dict[str, Any] = {"__key__": key, image_ext: image}
    if isinstance(caption, str):
        sample["txt"] = caption
    else:
        meta["captions"] = list(caption)
    sample["json"] = meta
    return sample


@dataclass
class ShardInfo:
    """What a closed shard holds; passed to the writer's ``on_close`` callback."""

    path: str
    count: int
    size: int
    keys_first: str
    keys_last: str


class ShardWriter:
    """Write samples to ``<out_dir>/<prefix>-%06d.tar`` with a max sample count and byte size.

    Each shard is written to a temporary file and renamed into place when it is complete, so a
    crash never leaves a truncated shard under a final name. Tar headers carry fixed metadata
    (mtime 0, uid 0), so the same samples give byte-identical shards.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str,
        maxcount: int = 1000,
        maxsize: int = 1_000_000_000,
        start_shard: int = 0,
        on_close: Callable[[ShardInfo], None] | None = None,
    ):
        if maxcount < 1 or maxsize < 1:
            raise ValueError(f"maxcount and maxsize must be positive, got {maxcount}, {maxsize}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.maxcount, self.maxsize = prefix, maxcount, maxsize
        self.on_close = on_close
        self.shard_index = start_shard
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = self._size = 0
        self._first = self._last = ""

    def shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def write(self, sample: dict[str, Any]) -> None:
        key = check_key(sample["__key__"])
        if self._tar is not None and (self._count >= self.maxcount or self._size >= self.maxsize):
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        for ext in sorted(k for k in sample if not k.startswith("__")):
            data = encode_value(ext, sample[ext])
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            self._size += 512 + (len(data) + 511) // 512 * 512
        self._first = self._first or key
        self._last = key
        self._count += 1

    def _open_shard(self) -> None:
        final = self.shard_path(self.shard_index)
        self._tmp = final.with_name(f".{final.name}.tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = self._size = 0
        self._first = self._last = ""

    def _close_shard(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        final = self.shard_path(self.shard_index)
        os.replace(self._tmp, final)
        info = ShardInfo(str(final), self._count, final.stat().st_size, self._first, self._last)
        self.shards.append(info)
        if self.on_close is not None:
            self.on_close(info)
        self._tar = self._tmp = None
        self.shard_index += 1

    def close(self) -> None:
        if self._tar is not None:
            self._close_shard()

    def abort(self) -> None:
        """Drop the shard in progress (its temp file); finished shards stay."""
        if self._tar is not None:
            self._tar.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)
            self._tar = self._tmp = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def error_record(reason: str, key: str = "", url: str = "", detail: str = "") -> dict[str, str]:
    return {ERROR_FIELD: reason, "__key__": key, "__url__": url, "detail": detail}


def expand_shards(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Pipeline stage: ``{"url": …}`` items → raw samples (``{"__key__", "__url__", ext: bytes}``).

    An unopenable or corrupt (e.g. truncated) shard yields one ``unreadable_shard`` error record;
    the complete samples read from it before the damage are kept.
    """
    for item in src:
        url = item["url"]
        try:
            stream = wds.gopen(url)
        except Exception as e:  # noqa: BLE001 - any opener failure is reported per shard
            yield error_record("unreadable_shard", url=url, detail=f"{type(e).__name__}: {e}")
            continue
        try:
            files = (dict(f, __url__=url) for f in tar_file_iterator(stream))
            yield from group_by_keys(files)
        except Exception as e:  # noqa: BLE001 - truncated/corrupt tar, duplicate names, ...
            yield error_record("unreadable_shard", url=url, detail=f"{type(e).__name__}: {e}")
        finally:
            stream.close()


def _decode_caption(raw: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """Captions of a sample; raises ValueError(reason) when missing/undecodable/empty."""
    if "txt" in raw:
        try:
            captions = [raw["txt"].decode("utf-8")]
        except UnicodeDecodeError as e:
            raise ValueError("bad_caption_encoding", str(e)) from None
    elif "captions" in meta:
        captions = meta["captions"]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError("bad_json", "'captions' must be a list of strings")
    else:
        raise ValueError("missing_caption", f"no 'txt' and no json 'captions' (fields: {_fields(raw)})")
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        raise ValueError("empty_caption", "caption is empty or whitespace")
    return captions


def _fields(raw: dict[str, Any]) -> list[str]:
    return sorted(k for k in raw if not k.startswith("__"))


def decode_image_text(raw: dict[str, Any], decode_image: bool = True) -> dict[str, Any]:
    """Raw tar sample → decoded sample, or an error record naming the reason.

    Decoded sample: ``__key__``, ``__url__``, ``image`` (RGB PIL image, or the encoded bytes when
    ``decode_image`` is False), ``image_ext``, ``caption`` (first caption), ``captions``, ``meta``.
    """
    key, url = raw.get("__key__", ""), raw.get("__url__", "")
    if any("." in ext for ext in _fields(raw)):
        # webdataset cut the file name at the key's dot: "a.b.jpg" became key "a", field "b.jpg"
        return error_record("key_with_dot", key, url, f"fields {_fields(raw)}: sample keys must not contain '.'")
    image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if image_ext is None:
        return error_record("missing_image", key, url, f"no image field among {_fields(raw)}")
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return error_record("bad_json", key, url, str(e))
        if not isinstance(meta, dict):
            return error_record("bad_json", key, url, f"json must be an object, got {type(meta).__name__}")
    try:
        captions = _decode_caption(raw, meta)
    except ValueError as e:
        return error_record(e.args[0], key, url, e.args[1])
    image: Any = raw[image_ext]
    if decode_image:
        try:
            with Image.open(io.BytesIO(image)) as im:
                image = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt data
            return error_record("bad_image", key, url, f"{type(e).__name__}: {e}")
    return {
        "__key__": key,
        "__url__": url,
        "image": image,
        "image_ext": image_ext,
        "caption": captions[0],
        "captions": captions,
        "meta": meta,
    }


def image_text_pipeline(
    urls: str | list[str],
    *,
    decode_image: bool = True,
    shuffle_buffer: int = 0,
    resampled: bool = False,
    seed: int = 0,
    split_by_node: bool = True,
    split_by_worker: bool = True,
) -> wds.DataPipeline:
    """An iterable over decoded samples and error records of image–text shards.

    Args:
        urls: anything webdataset accepts: paths, brace patterns, ``pipe:`` commands, fsspec URLs,
            or a list of them.
        resampled: draw shards with replacement forever (bound it with ``.with_epoch(n)``); every
            rank/worker draws independently, so no splitting is applied.
        split_by_node / split_by_worker: give each rank / DataLoader worker its own slice of the
            shard list (ignored when ``resampled``).
    """
    if resampled:
        stages: list[Any] = [wds.ResampledShards(urls, seed=seed)]
    else:
        stages = [wds.SimpleShardList(urls)]
        if split_by_node:
            stages.append(wds.split_by_node)
        if split_by_worker:
            stages.append(wds.split_by_worker)
    stages.append(expand_shards)
    if shuffle_buffer > 0:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed))
    stages.append(wds.filters.pipelinefilter(_decode_stage)(decode_image))
    return wds.DataPipeline(*stages)


def _decode_stage(src: Iterable[dict[str, Any]], decode_image: bool) -> Iterator[dict[str, Any]]:
    for raw in src:
        yield raw if ERROR_FIELD in raw else decode_image_text(raw, decode_image)


@dataclass
class SampleErrors:
    """Counts of skipped samples by reason, with the first few offending keys for the report."""

    counts: Counter = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)
    unreadable_shards: list[str] = field(default_factory=list)
    max_examples: int = 20

    def add(self, record: dict[str, str]) -> None:
        reason = record[ERROR_FIELD]
        self.counts[reason] += 1
        if reason == "unreadable_shard":
            self.unreadable_shards.append(record["__url__"])
        if len(self.examples) < self.max_examples:
            self.examples.append({k.strip("_"): v for k, v in record.items()})

    @property
    def total(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "unreadable_shard")

    def summary(self) -> str:
        if not self.counts:
            return "no bad samples"
        parts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.total} bad samples ({parts})"

    def report_lines(self) -> list[str]:
        lines = [self.summary()]
        for ex in self.examples:
            where = f"sample '{ex['key']}' in {ex['url']}" if ex["key"] else ex["url"]
            lines.append(f"  {ex['error']}: {where}: {ex['detail']}")
        return lines


def drop_errors(samples: Iterable[dict[str, Any]], errors: SampleErrors) -> Iterator[dict[str, Any]]:
    """Yield the good samples; count the error records into ``errors``."""
    for sample in samples:
        if ERROR_FIELD in sample:
            errors.add(sample)
        else:
            yield sample


def iter_image_text(urls: str | list[str], errors: SampleErrors, **pipeline_kwargs: Any) -> Iterator[dict[str, Any]]:
    """Convenience: decoded good samples of ``urls`` in one process, bad ones counted in ``errors``."""
    kwargs = {"split_by_node": False, "split_by_worker": False, **pipeline_kwargs}
    return drop_errors(image_text_pipeline(urls, **kwargs), errors)
