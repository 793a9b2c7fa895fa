"""Image–text webdataset shards: sample schema, atomic writer, error-tolerant reader.

Sample schema (docs/design.md): ``__key__`` (unique, no dots), one image (``jpg``/``png``/``webp``),
the caption as ``txt`` (UTF-8) or as ``captions: [...]`` inside ``json``, and ``json`` metadata
(``width``, ``height``, ``source_id``).

The reader never unpickles: it reads tar members itself and decodes images with Pillow, text as
UTF-8 and JSON, nothing else. A bad sample does not stop a run: it travels down the pipeline as
an *error record* (a dict with ``__error__``) so that it can be counted in the main process even
when decoding happens in DataLoader workers; :func:`drop_errors` turns the records into counts.
Reasons: ``unreadable_shard`` (missing, truncated or corrupt tar, also one cut at a member
boundary; one record per shard), ``key_with_dot``, ``bad_key`` (reserved ``__`` name, non-UTF-8
member name, empty folder part), ``duplicate_key`` (a key again later in the shard; the first
sample is kept), ``duplicate_field``, ``missing_image``, ``bad_json``, ``missing_caption``,
``bad_caption_encoding``, ``empty_caption``, ``bad_image``.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from webdataset.shardlists import expand_urls as _wds_expand_urls
from webdataset.tariterators import base_plus_ext
from webdataset.utils import make_seed, pytorch_worker_info

from regionclip.data.images import load_rgb
from regionclip.data.sample_errors import ERROR_FIELD, SampleErrors, drop_errors, error_record
from regionclip.utils import apply_umask, parse_json, temp_path

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def key_problem(key: str) -> str:
    """Why ``key`` is not a valid sample key, or "" when it is.

    webdataset splits member names at the first dot of the basename, so keys have no dot; a key
    may hold folders (``a/b``: a tar made from a folder), but no empty or absolute part; names
    starting with ``__`` are webdataset's own fields; keys are UTF-8 text.
    """
    if not key:
        return "the key is empty"
    if "." in key:
        return "keys must not contain '.'"
    if key.startswith("/") or "//" in key or key.endswith("/"):
        return "keys must not start or end with '/' or hold an empty folder name"
    if key.rsplit("/", 1)[-1].startswith("__"):
        return "names starting with '__' are reserved for webdataset's own fields"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "the member name is not UTF-8"
    return ""


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key (:func:`key_problem`), else raise ValueError."""
    problem = key_problem(key)
    if problem:
        raise ValueError(f"invalid sample key {key!r}: {problem}")
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
    raise TypeError(
        f"field '{ext}': cannot encode {type(value).__name__}; pass bytes, str or (for json) a dict"
    )


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


def _tar_file_size(member_bytes: int) -> int:
    """Size on disk of a tar whose members take ``member_bytes``: + 2 end blocks, padded to records."""
    used = member_bytes + 2 * tarfile.BLOCKSIZE
    return -(-used // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardWriter:
    """Write samples to ``<out_dir>/<prefix>-%06d.tar`` with a max sample count and byte size.

    A shard holds at most ``maxcount`` samples and its file never exceeds ``maxsize`` bytes unless
    a single sample alone is larger (it then gets a shard of its own). Each shard is written to a
    temporary file and renamed into place when complete, so a crash never leaves a truncated shard
    under a final name. Tar headers carry fixed metadata (mtime 0, uid 0), so the same samples give
    byte-identical shards.
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
        self._file: Any = None
        self._tmp: Path | None = None
        self._count = self._size = 0
        self._first = self._last = ""

    def shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample; every field is encoded and checked before anything is written."""
        key = check_key(sample["__key__"])
        members = []
        for ext in sorted(k for k in sample if not k.startswith("__")):
            data = encode_value(ext, sample[ext])
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = ""
            try:
                info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
            except ValueError as e:
                raise ValueError(f"sample {key!r}: field {ext!r} cannot be stored in a tar: {e}") from None
            members.append((info, data))
        if not members:
            raise ValueError(f"sample {key!r} has no fields")
        nbytes = sum(
            tarfile.BLOCKSIZE + -(-len(d) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for _, d in members
        )
        if self._tar is not None and (
            self._count >= self.maxcount or _tar_file_size(self._size + nbytes) > self.maxsize
        ):
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        for info, data in members:
            self._tar.addfile(info, io.BytesIO(data))
        self._size += nbytes
        self._first = self._first or key
        self._last = key
        self._count += 1

    def _open_shard(self) -> None:
        final = self.shard_path(self.shard_index)
        self._tmp = temp_path(final)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in _close_shard / abort
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = self._size = 0
        self._first = self._last = ""

    def _close_shard(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # on disk before the rename makes it a finished shard
        self._file.close()
        apply_umask(self._tmp)
        final = self.shard_path(self.shard_index)
        os.replace(self._tmp, final)
        info = ShardInfo(str(final), self._count, final.stat().st_size, self._first, self._last)
        self.shards.append(info)
        self._tar = self._tmp = self._file = None
        self.shard_index += 1
        if self.on_close is not None:
            self.on_close(info)

    def close(self) -> None:
        if self._tar is not None:
            self._close_shard()

    def abort(self) -> None:
        """Drop the shard in progress (its temp file); finished shards stay."""
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)
            self._tar = self._tmp = self._file = None

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


def expand_urls(urls: str | Iterable[str]) -> list[str]:
    """Shard URLs of a string or list of strings: brace patterns expanded, ``::`` separates lists."""
    items = [urls] if isinstance(urls, str) else list(urls)
    return [url for item in items for url in _wds_expand_urls(item)]


class _StrictTarInfo(tarfile.TarInfo):
    """Tar headers read so that only the end-of-archive marker (a zero block) ends a shard.

    Python's stream-mode reader takes a header cut short, a missing header (a cut at a member
    boundary) or a damaged one as a quiet end of the archive, which would pass a truncated shard
    as a short, complete one.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            raise tarfile.ReadError(
                f"truncated or corrupt tar: no valid header or end marker at byte {tar.offset} ({e})"
            ) from None


def _tar_samples(stream: Any, url: str) -> Iterator[dict[str, Any]]:
    """Group the members of a tar stream into raw samples (webdataset's naming: key = name up to
    the first dot of the basename). Raises on a truncated or corrupt tar (also when it lacks its
    end marker); a sample is yielded only once the next one has started (or the tar has ended),
    so it is known to be complete."""
    current: dict[str, Any] | None = None
    seen: set[str] = set()  # keys of this shard so far: a key seen again later is a duplicate
    rejected: set[str] = set()
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
        for member in tar:
            tar.members = []  # stream mode keeps every header otherwise
            if not member.isreg():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:  # a file without an extension: not a sample field
                continue
            if current is not None and key == current["__key__"]:
                pass
            elif problem := key_problem(key) or ("duplicate_key" if key in seen else ""):
                if key not in rejected:  # one record per sample, not per field
                    rejected.add(key)
                    reason = "duplicate_key" if problem == "duplicate_key" else "bad_key"
                    detail = "the key appeared before in this shard" if reason == "duplicate_key" else problem
                    yield error_record(reason, key.encode("utf-8", "backslashreplace").decode(), url, detail)
                continue
            else:
                if current is not None:
                    yield current
                seen.add(key)
                current = {"__key__": key, "__url__": url}
            data = tar.extractfile(member).read()
            ext = ext.lower()
            if ext in current:
                current["__duplicate__"] = ext
            current[ext] = data
    if current is not None:
        yield current


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
        n = 0
        try:
            for sample in _tar_samples(stream, url):
                yield sample
                n += 1
        except Exception as e:  # noqa: BLE001 - truncated/corrupt tar, failing pipe: command, ...
            yield error_record(
                "unreadable_shard", url=url, detail=f"{type(e).__name__}: {e} (after {n} complete samples)"
            )
        finally:
            try:
                stream.close()
            except Exception:  # noqa: BLE001, S110 - a pipe: command's exit status after an early stop
                pass


def _decode_caption(raw: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """Captions of a sample; raises ValueError(reason, detail) when missing/undecodable/empty."""
    if "txt" in raw:
        try:
            captions = [raw["txt"].decode("utf-8")]
        except UnicodeDecodeError as e:
            raise ValueError("bad_caption_encoding", f"txt is not UTF-8: {e}") from None
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


def _dotted_keys(raw: dict[str, Any]) -> list[str]:
    """Original keys of samples whose key had a dot (``a.b.jpg`` was grouped as key ``a``, field
    ``b.jpg``). A sample with a top-level image is taken as a normal one with multi-part fields."""
    if any(e in raw for e in IMAGE_EXTS):
        return []
    subkeys = sorted({f.rsplit(".", 1)[0] for f in _fields(raw) if "." in f})
    return [f"{raw['__key__']}.{s}" for s in subkeys]


def decode_image_text(raw: dict[str, Any], decode_image: bool = True) -> dict[str, Any]:
    """Raw tar sample → decoded sample, or an error record naming the reason.

    Decoded sample: ``__key__``, ``__url__``, ``image`` (RGB PIL image, or the encoded bytes when
    ``decode_image`` is False), ``image_ext``, ``caption`` (first caption), ``captions``, ``meta``.
    """
    key, url = raw.get("__key__", ""), raw.get("__url__", "")
    dotted = _dotted_keys(raw)
    if dotted:
        return error_record("key_with_dot", ", ".join(dotted), url, "sample keys must not contain '.'")
    if "__duplicate__" in raw:
        return error_record("duplicate_field", key, url, f"field '{raw['__duplicate__']}' appears twice")
    image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if image_ext is None:
        return error_record("missing_image", key, url, f"no image field among {_fields(raw)}")
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = parse_json(raw["json"])
        except ValueError as e:
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
            image = load_rgb(image)
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


def _decode_stage(src: Iterable[dict[str, Any]], decode_image: bool) -> Iterator[dict[str, Any]]:
    for raw in src:
        if ERROR_FIELD in raw:
            yield raw
        elif dotted := _dotted_keys(raw):
            # several dotted keys can collapse into one group: count each original sample
            for key in dotted:
                yield error_record("key_with_dot", key, raw["__url__"], "sample keys must not contain '.'")
        else:
            yield decode_image_text(raw, decode_image)


class _EpochShuffle(wds.PipelineStage):
    """Sample shuffle buffer seeded by (seed, epoch, rank, worker): reproducible across runs,
    different in every epoch (with persistent DataLoader workers) and in every worker."""

    def __init__(self, bufsize: int, seed: int):
        self.bufsize, self.seed, self.epoch = bufsize, seed, -1

    def run(self, src: Iterable[Any]) -> Iterator[Any]:
        self.epoch += 1
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(make_seed(self.seed, self.epoch, rank, worker))
        return wds.shuffle(self.bufsize, min(self.bufsize, 100), rng=rng)(iter(src))


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
        shuffle_buffer: shuffle samples through a buffer of this size (0 = file order).
        resampled: draw shards with replacement forever, reproducibly from ``seed`` (each rank and
            worker draws its own sequence, so no splitting is applied). Bound it with
            ``.with_epoch(n)``: n items per iteration *per DataLoader worker*, error records included.
        split_by_node / split_by_worker: give each rank (env ``RANK``/``WORLD_SIZE``, else
            torch.distributed) / DataLoader worker its own slice of the shard list (ignored when
            ``resampled``). A worker or rank left without shards simply yields nothing.
    """
    url_list = expand_urls(urls)
    if not url_list:
        raise ValueError(f"no shards in {urls!r}")
    if resampled:
        stages: list[Any] = [wds.ResampledShards(url_list, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(url_list)]
        if split_by_node:
            stages.append(wds.split_by_node)
        if split_by_worker:
            stages.append(wds.split_by_worker)
    stages.append(expand_shards)
    if shuffle_buffer > 0:
        stages.append(_EpochShuffle(shuffle_buffer, seed))
    stages.append(wds.filters.pipelinefilter(_decode_stage)(decode_image))
    return wds.DataPipeline(*stages)


def make_loader(
    pipeline: wds.DataPipeline, num_workers: int = 0, transform: Callable[[dict], dict] | None = None
) -> wds.WebLoader:
    """A DataLoader over ``pipeline`` that passes samples one by one (``batch_size=None``).

    Error records travel through the workers unchanged, so ``drop_errors(loader, errors)`` in the
    main process still counts every bad sample. ``transform`` runs in the workers on good samples
    only. Workers are persistent so that shuffle/resampling seeds advance with each epoch.
    """
    if transform is not None:
        pipeline = pipeline.compose(wds.filters.pipelinefilter(_map_good)(transform))
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        collate_fn=_as_is,  # the default would turn tuples into lists and arrays into tensors
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def _as_is(sample: Any) -> Any:
    return sample


def _map_good(src: Iterable[dict[str, Any]], fn: Callable[[dict], dict]) -> Iterator[dict[str, Any]]:
    for sample in src:
        yield sample if ERROR_FIELD in sample else fn(sample)


def iter_image_text(
    urls: str | list[str], errors: SampleErrors, **pipeline_kwargs: Any
) -> Iterator[dict[str, Any]]:
    """Convenience: decoded good samples of ``urls`` in one process, bad ones counted in ``errors``."""
    kwargs = {"split_by_node": False, "split_by_worker": False, **pipeline_kwargs}
    return drop_errors(image_text_pipeline(urls, **kwargs), errors)
