"""Any captioned image collection → image–text shards.

    python -m data_prep.generic --config FILE [key=value ...]

Input (``data_prep.generic``): a table of image path + caption, either

- ``captions.jsonl``: one JSON object per line, ``{"path": "a/b.jpg", "caption": "..." | ["...", ...]}``
  (field names from ``path_column`` / ``caption_column``); ``table`` empty = ``<image_dir>/captions.jsonl``;
- a ``.csv`` / ``.tsv`` (optionally ``.gz``/``.bz2``/``.zst`` compressed; TSV fields are never
  quoted, so captions may contain ``"``; a quoted CSV field spans lines only with
  ``csv_multiline``) or ``.parquet`` file with a header naming the two columns.

Paths are relative to ``image_dir`` (empty = the table's folder) unless absolute. Each row becomes
one sample with key = its zero-padded row number (unique; bad rows keep theirs, so keys stay put) and
meta ``{width, height, source_id: row, file_name: path as given}``. JPEG/PNG/WebP bytes are copied
as they are; other formats Pillow can read are re-encoded to PNG. Bad rows (missing or undecodable
image, empty caption, malformed line) are skipped, counted by reason and reported; a missing
column is an error naming it and the file.

Also home of the helpers the COCO converter shares: image probing, atomic JSON writes, stats.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image
from tqdm import tqdm

from regionclip.cli import config_from_argv
from regionclip.config import ExperimentConfig
from regionclip.data.shards import (
    ERROR_FIELD,
    SampleErrors,
    ShardInfo,
    ShardWriter,
    encode_image,
    error_record,
    image_text_sample,
)

KEY_DIGITS = 9


class DataPrepError(ValueError):
    """Unusable converter input (missing file, column or class); the message names the file."""


class SkipSample(Exception):
    """One sample cannot be converted: ``reason`` is the count bucket, ``detail`` the explanation."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


# --------------------------------------------------------------------------------------------
# Shared helpers (also used by data_prep.coco)
# --------------------------------------------------------------------------------------------


def sniff_image_ext(data: bytes) -> str | None:
    """Shard extension of encoded image bytes by their magic number: jpg, png, webp or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


@dataclass
class ImageFile:
    data: bytes  # encoded image as it goes into the shard
    ext: str  # jpg | png | webp
    width: int
    height: int
    reencoded: bool  # the source format was not jpg/png/webp


def load_image_file(path: Path) -> ImageFile:
    """Read an image file and check that it decodes; JPEG/PNG/WebP bytes are kept unchanged.

    Raises:
        SkipSample: missing_file, unreadable_file or bad_image.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SkipSample("missing_file", f"{path}: file not found") from None
    except OSError as e:
        raise SkipSample("unreadable_file", f"{path}: {e.strerror or e}") from None
    ext = sniff_image_ext(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if im.format == "JPEG":
                # Decode at 1/8 scale: still reads the whole entropy-coded stream (so truncation is
                # caught) at a fraction of the cost of a full decode.
                im.draft("RGB", (1, 1))
            im.load()
            if ext is None:
                rgb = im.convert("RGBA" if _has_alpha(im) else "RGB")
                return ImageFile(encode_image(rgb, "png"), "png", width, height, True)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt data
        raise SkipSample("bad_image", f"{path}: cannot decode image: {type(e).__name__}: {e}") from None
    return ImageFile(data, ext, width, height, False)


def _has_alpha(im: Image.Image) -> bool:
    return "A" in im.getbands() or "transparency" in im.info


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text to a temp file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False))


def shard_pattern(shards: Sequence[ShardInfo]) -> str:
    """Webdataset brace pattern naming the written shards (for ``data.pretrain_shards``)."""
    if not shards:
        return "(none)"
    first, last = shards[0].path, shards[-1].path
    if len(shards) == 1:
        return first
    stem, start = first[: -len("000000.tar")], first[-len("000000.tar") : -len(".tar")]
    return f"{stem}{{{start}..{last[-len('000000.tar') : -len('.tar')]}}}.tar"


def stale_shards(out_dir: str | os.PathLike, prefix: str, next_index: int) -> list[Path]:
    """Shards of an earlier, longer run under the same prefix that this run did not overwrite."""
    out = []
    for p in Path(out_dir).glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if int(p.stem[-6:]) >= next_index:
            out.append(p)
    return sorted(out)


@dataclass
class ConversionStats:
    """What a converter wrote and skipped."""

    source: str
    out_dir: str
    prefix: str
    images: int = 0
    captions: int = 0
    reencoded: int = 0
    seconds: float = 0.0
    errors: SampleErrors = field(default_factory=SampleErrors)
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # every error record, not just examples
    extra: str = ""  # source-specific tail of the summary line
    wants_images: bool = True  # False when only box files were asked for (COCO instances alone)

    @property
    def skipped_path(self) -> Path:
        return Path(self.out_dir) / f"{self.prefix}-skipped.jsonl"

    def skip_summary(self) -> str:
        if not self.errors.counts:
            return "skipped 0"
        parts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.errors.counts.items()))
        return f"skipped {sum(self.errors.counts.values())} ({parts})"

    def summary_line(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        line = (
            f"{self.source}: wrote {self.images} images ({self.captions} captions) to {len(self.shards)} shards "
            f"{shard_pattern(self.shards)} in {self.seconds:.1f} s ({rate:.1f} images/s); "
            f"{self.skip_summary()}"
        )
        if self.skipped:
            line += f" (list: {self.skipped_path})"
        if self.reencoded:
            line += f"; {self.reencoded} re-encoded to PNG"
        return line + (f"; {self.extra}" if self.extra else "")

    def report(self) -> None:
        """Summary line to stdout; the skipped-sample examples and warnings to stderr."""
        for line in self.errors.report_lines()[1:]:
            print(line, file=sys.stderr)
        next_index = int(Path(self.shards[-1].path).stem[-6:]) + 1 if self.shards else 0
        stale = stale_shards(self.out_dir, self.prefix, next_index)
        if stale:
            print(
                f"warning: {len(stale)} older shards from a previous run remain after this run's last shard "
                f"(first: {stale[0]}); delete them if a glob picks up '{self.prefix}-*.tar'",
                file=sys.stderr,
            )
        print(self.summary_line())


def _ordered_map(fn: Callable[[Any], Any], items: Iterator[Any], workers: int) -> Iterator[Any]:
    """``map(fn, items)`` on a thread pool, in order, with at most ``4 * workers`` items in flight.

    Threads pay off because file reads and Pillow's decoding release the GIL; the bounded window
    keeps memory flat however long ``items`` is.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        window: deque[Future] = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def write_shards(
    items: Iterator[Any],
    make_sample: Callable[[Any], tuple[dict[str, Any], bool]],
    stats: ConversionStats,
    cfg: ExperimentConfig,
    total: int | None = None,
) -> None:
    """Shared loop: item → ``make_sample`` → shard, in input order; counts go into ``stats``.

    ``make_sample`` returns ``(sample, reencoded)`` or raises SkipSample; it runs on
    ``data_prep.workers`` threads. Items may also be error records (dicts with ``__error__``),
    which are counted and skipped. All skipped samples are listed in ``stats.skipped_path`` (JSON
    lines), written only when there are any.
    """

    def process(item: Any) -> dict[str, Any] | tuple[dict[str, Any], bool]:
        if isinstance(item, dict) and ERROR_FIELD in item:
            return item
        try:
            return make_sample(item)
        except SkipSample as e:
            return error_record(e.reason, getattr(item, "key", ""), getattr(item, "where", ""), e.detail)

    workers = cfg.data_prep.workers or os.cpu_count() or 1
    start = time.perf_counter()
    with ShardWriter(stats.out_dir, stats.prefix, cfg.shards.maxcount, cfg.shards.maxsize) as writer:
        results = _ordered_map(process, items, workers)
        for result in tqdm(results, desc=stats.source, unit="img", total=total, dynamic_ncols=True):
            if isinstance(result, dict):
                stats.errors.add(result)
                stats.skipped.append({k.strip("_"): v for k, v in result.items()})
                continue
            sample, reencoded = result
            writer.write(sample)
            stats.images += 1
            stats.reencoded += reencoded
            meta = sample["json"]
            stats.captions += len(meta["captions"]) if "captions" in meta else 1
    stats.shards = writer.shards
    stats.seconds = time.perf_counter() - start
    stats.skipped_path.unlink(missing_ok=True)  # an old list would describe another run
    if stats.skipped:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in stats.skipped)
        write_text_atomic(stats.skipped_path, lines)


# --------------------------------------------------------------------------------------------
# Reading the table
# --------------------------------------------------------------------------------------------


class Row(NamedTuple):
    key: str
    where: str  # "file line N" / "file row N", for messages
    path: Any
    caption: Any


def _key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def _table_format(table: Path) -> str:
    suffixes = [s.lower() for s in table.suffixes]
    compressed = len(suffixes) > 1 and suffixes[-1] in (".gz", ".bz2", ".zst")
    kind = suffixes[-2 if compressed else -1].lstrip(".") if suffixes else ""
    if kind in ("csv", "tsv") or (kind in ("jsonl", "parquet") and not compressed):
        return kind
    raise DataPrepError(
        f"{table}: unsupported table format; use .jsonl, .csv, .tsv (optionally .gz/.bz2/.zst) or .parquet"
    )


def iter_rows(
    table: str | os.PathLike, path_column: str, caption_column: str, csv_multiline: bool = False
) -> Iterator[Row | dict]:
    """Rows of a jsonl/csv/tsv/parquet table; malformed rows come out as error records.

    Checks that the file is readable and has both columns before returning.

    Raises:
        DataPrepError: unreadable table, unsupported extension or missing column.
    """
    table = Path(table)
    kind = _table_format(table)
    if not table.is_file():
        raise DataPrepError(f"caption table {table} does not exist (set data_prep.generic.table / image_dir)")
    if kind == "jsonl":
        return _jsonl_rows(table, path_column, caption_column)
    if kind == "parquet":
        return _parquet_rows(table, path_column, caption_column)
    return _csv_rows(table, path_column, caption_column, "\t" if kind == "tsv" else ",", csv_multiline)


def _missing_column(table: Path, column: str, found: Sequence[str], setting: str) -> DataPrepError:
    return DataPrepError(
        f"{table}: no column '{column}' (found: {', '.join(map(str, found)) or 'none'}); "
        f"set data_prep.generic.{setting} to the right name"
    )


def _check_columns(table: Path, columns: Sequence[str], path_column: str, caption_column: str) -> None:
    for column, setting in ((path_column, "path_column"), (caption_column, "caption_column")):
        if column not in columns:
            raise _missing_column(table, column, columns, setting)


def _jsonl_rows(table: Path, path_column: str, caption_column: str) -> Iterator[Row | dict]:
    checked = False
    with open(table, "rb") as f:
        for index, raw in enumerate(f):
            where = f"{table} line {index + 1}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield error_record("bad_line", _key(index), where, f"not valid JSON: {e}")
                continue
            if not isinstance(record, dict):
                yield error_record(
                    "bad_line", _key(index), where, f"expected an object, got {type(record).__name__}"
                )
                continue
            if not checked:
                # A first record without the fields means a wrong column setting, not a bad row.
                _check_columns(table, list(record), path_column, caption_column)
                checked = True
            missing = [c for c in (path_column, caption_column) if c not in record]
            if missing:
                yield error_record("missing_field", _key(index), where, f"no field {missing[0]!r}")
                continue
            yield Row(_key(index), where, record[path_column], record[caption_column])


def _csv_records(stream: Iterator[bytes], quoted: bool, multiline: bool) -> Iterator[tuple[int, bytes, str]]:
    """Records of a CSV/TSV byte stream as ``(first line number, bytes, problem)``; blank lines are
    not records. A quoted CSV field may span lines only when ``multiline``: otherwise a line with an
    unbalanced quote is a bad record of its own, instead of swallowing the rows after it."""
    pending, start = b"", 0
    for lineno, line in enumerate(stream, 1):
        if not pending and not line.strip():
            continue
        pending, start = pending + line, start or lineno
        if quoted and pending.count(b'"') % 2:
            if multiline:
                continue
            yield (
                start,
                pending,
                "unterminated quote (set data_prep.generic.csv_multiline=true for fields over lines)",
            )
        else:
            yield start, pending, ""
        pending, start = b"", 0
    if pending:
        yield start, pending, "unterminated quote at the end of the file"


def _csv_rows(
    table: Path, path_column: str, caption_column: str, sep: str, multiline: bool
) -> Iterator[Row | dict]:
    """Rows of a CSV (quoted) or TSV (never quoted: CC3M style, a '"' is just a character) table.
    A row's key is its record number after the header, bad records included, so keys stay put
    when other rows are skipped."""
    import pyarrow as pa

    quoted = sep == ","
    try:
        stream = io.BufferedReader(pa.input_stream(str(table), compression="detect"))
        records = _csv_records(iter(stream), quoted, multiline)
        header = next(records, None)
    except (pa.ArrowException, OSError) as e:
        raise DataPrepError(f"{table}: cannot read table: {e}") from None
    dialect = {"delimiter": sep, "strict": True}
    dialect.update({"quotechar": '"'} if quoted else {"quoting": csv.QUOTE_NONE})

    def fields(record: bytes) -> list[str]:
        text = record.decode("utf-8").rstrip("\r\n")
        return next(csv.reader(io.StringIO(text, newline=""), **dialect), [])

    try:
        columns = fields(header[1]) if header is not None and not header[2] else []
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataPrepError(f"{table}: cannot read the header line: {e}") from None
    columns = [c.lstrip("\ufeff") for c in columns]
    _check_columns(table, columns, path_column, caption_column)
    path_at, caption_at = columns.index(path_column), columns.index(caption_column)

    def rows() -> Iterator[Row | dict]:
        with stream:
            for index, (lineno, record, problem) in enumerate(records):
                key, where = _key(index), f"{table} line {lineno}"
                if problem:
                    yield error_record("bad_line", key, where, f"{problem}: {record[:200]!r}")
                    continue
                try:
                    values = fields(record)
                except UnicodeDecodeError as e:
                    yield error_record("bad_line", key, where, f"invalid UTF-8: {e}")
                    continue
                except csv.Error as e:
                    yield error_record("bad_line", key, where, f"{e}: {record[:200]!r}")
                    continue
                if len(values) != len(columns):
                    detail = f"expected {len(columns)} fields, got {len(values)}: {record[:200]!r}"
                    yield error_record("bad_line", key, where, detail)
                    continue
                yield Row(key, where, values[path_at], values[caption_at])

    return rows()


def _parquet_rows(table: Path, path_column: str, caption_column: str) -> Iterator[Row | dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(table)
    except Exception as e:  # noqa: BLE001 - arrow raises several types for a bad file
        raise DataPrepError(f"{table}: cannot read parquet file: {type(e).__name__}: {e}") from None
    _check_columns(table, pf.schema_arrow.names, path_column, caption_column)
    return _parquet_iter(pf, table, path_column, caption_column)


def _parquet_iter(pf, table: Path, path_column: str, caption_column: str) -> Iterator[Row]:
    index = 0
    for batch in pf.iter_batches(batch_size=4096, columns=[path_column, caption_column]):
        columns = batch.to_pydict()
        for path, caption in zip(columns[path_column], columns[caption_column], strict=True):
            yield Row(_key(index), f"{table} row {index}", path, caption)
            index += 1


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def clean_captions(caption: Any) -> str | list[str]:
    """A caption string, or a list of them, stripped; raises SkipSample when nothing is left."""
    if isinstance(caption, str):
        if not caption.strip():
            raise SkipSample("empty_caption", "caption is empty")
        return caption.strip()
    if isinstance(caption, list | tuple) and all(isinstance(c, str) for c in caption):
        captions = [c.strip() for c in caption if c.strip()]
        if not captions:
            raise SkipSample("empty_caption", "all captions are empty")
        return captions
    if caption is None:
        raise SkipSample("empty_caption", "caption is missing")
    raise SkipSample(
        "bad_caption", f"caption must be a string or a list of strings, got {type(caption).__name__}"
    )


def resolve_inputs(cfg: ExperimentConfig) -> tuple[Path, Path]:
    """(table, image_dir) from ``data_prep.generic``."""
    g = cfg.data_prep.generic
    if not g.table and not g.image_dir:
        raise DataPrepError("data_prep.generic: set image_dir (with captions.jsonl inside) or table")
    table = Path(g.table) if g.table else Path(g.image_dir) / "captions.jsonl"
    image_dir = Path(g.image_dir) if g.image_dir else table.parent
    if not image_dir.is_dir():
        raise DataPrepError(f"image folder {image_dir} does not exist (data_prep.generic.image_dir)")
    return table, image_dir


def convert_generic(cfg: ExperimentConfig) -> ConversionStats:
    """Convert the table of ``data_prep.generic`` into shards; see the module docstring."""
    table, image_dir = resolve_inputs(cfg)
    g = cfg.data_prep.generic
    rows = iter_rows(table, g.path_column, g.caption_column, g.csv_multiline)
    stats = ConversionStats("generic", cfg.data_prep.out_dir, cfg.data_prep.prefix)

    def make_sample(row: Row) -> tuple[dict[str, Any], bool]:
        if not isinstance(row.path, str) or not row.path.strip():
            raise SkipSample("missing_path", f"image path is empty or not a string: {row.path!r}")
        caption = clean_captions(row.caption)
        path = Path(row.path)
        image = load_image_file(path if path.is_absolute() else image_dir / path)
        meta = {
            "width": image.width,
            "height": image.height,
            "source_id": int(row.key),
            "file_name": row.path,
        }
        return image_text_sample(row.key, image.data, image.ext, caption, meta), image.reencoded

    write_shards(rows, make_sample, stats, cfg)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = config_from_argv(argv, "Convert an image folder / caption table into image-text shards.")
    return run_converter(convert_generic, cfg)


def run_converter(convert: Callable[[ExperimentConfig], ConversionStats], cfg: ExperimentConfig) -> int:
    """Run a converter for an entry point: report, and turn input errors into one stderr line."""
    try:
        stats = convert(cfg)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stats.report()
    if stats.wants_images and stats.images == 0:
        print(f"error: {stats.source}: no sample could be converted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
