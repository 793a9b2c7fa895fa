"""`make concepts`: captions → concept pool, per-caption phrases and concept text embeddings.

Outputs in ``concepts.out_dir`` (each written atomically; ``summary.json`` last, so its presence
marks a finished run that a re-run with the same config and inputs skips):

- ``concepts.txt``: the pool, one concept per line, most frequent first;
- ``concept_counts.json``: ``{"pool": {concept: count}, "all": {concept: count}}`` (``all`` =
  every parsed concept before the filters, to re-filter without re-parsing);
- ``caption_phrases.jsonl``: per sample ``{"key", "phrases", "concepts"}``; ``concepts`` are the
  caption's own concepts that made it into the pool (GLIP-style caption grounding candidates);
- ``concept_embeddings.safetensors`` (+ ``concept_embeddings.txt``, the names): ``[K, D]``
  un-normalised prompt-ensemble embeddings of the teacher's text tower;
- ``summary.json``: counts, skipped captions by reason, timings, model identities, category recall.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from webdataset.shardlists import expand_urls

from regionclip.concepts.parse import CaptionParser, read_word_list, select_vocabulary
from regionclip.config import ClipModelConfig, ConceptsConfig, section_hash, to_dict
from regionclip.data.coco import read_categories
from regionclip.data.sample_errors import SampleErrors, error_record
from regionclip.data.shards import iter_image_text
from regionclip.engine.run_cache import file_stamp, read_record
from regionclip.errors import InputError
from regionclip.models.loading import WEIGHTS_FILE, load_clip
from regionclip.text import embed_class_names, embedding_metadata, save_embeddings
from regionclip.utils import atomic_output, atomic_write_json, atomic_write_text, require_writable

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
OUTPUTS = ("concepts.txt", "concept_counts.json", "caption_phrases.jsonl", "concept_embeddings.safetensors")


# --------------------------------------------------------------------------------------------
# Reading captions
# --------------------------------------------------------------------------------------------


def is_text_file(source: str) -> bool:
    return source.endswith(".txt")


def iter_text_file(path: str, errors: SampleErrors) -> Iterator[tuple[str, list[str]]]:
    """``(key, [caption])`` per line of a UTF-8 text file; key = the 1-based line number.

    Lines that are not valid UTF-8 are counted as ``bad_caption_encoding`` and skipped.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; binary so one bad line is not fatal
    except OSError as e:
        raise ValueError(f"cannot read captions file {path}: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.add(error_record("bad_caption_encoding", str(lineno), path, str(e)))
                continue
            yield str(lineno), [text.rstrip("\r\n")]


def iter_captions(source: str, errors: SampleErrors) -> Iterator[tuple[str, list[str]]]:
    """``(key, captions)`` from shards (anything webdataset opens) or a ``.txt`` file."""
    if is_text_file(source):
        return iter_text_file(source, errors)
    samples = iter_image_text(source, errors, decode_image=False)
    return ((s["__key__"], s["captions"]) for s in samples)


def clean_caption(text: str, max_chars: int, lowercase: bool) -> tuple[str | None, str]:
    """``(caption, "")`` ready to parse, or ``(None, reason)`` for empty / over-long captions."""
    text = text.strip()
    if not text:
        return None, "empty_caption"
    if len(text) > max_chars:
        return None, "caption_too_long"
    return (text.lower() if lowercase else text), ""


# --------------------------------------------------------------------------------------------
# Category recall (EmojiWorld or any target vocabulary)
# --------------------------------------------------------------------------------------------


def _plural_forms(name: str) -> list[str]:
    head, _, last = name.rpartition(" ")
    forms = {last, last + "s", last + "es"}
    if last.endswith("y"):
        forms.add(last[:-1] + "ies")
    return sorted(f"{head} {f}".strip() for f in forms)


class CategoryMentions:
    """Which category names a stream of captions mentions (whole words, singular or plural)."""

    def __init__(self, names: list[str]):
        self.names = names
        self._form_to_name = {form: n for n in names for form in _plural_forms(n.lower())}
        forms = sorted(self._form_to_name, key=len, reverse=True)  # longest first: "hot dogs" before "dog"
        self._regex = re.compile(r"\b(" + "|".join(map(re.escape, forms)) + r")\b") if forms else None
        self.mentioned: set[str] = set()

    def update(self, caption: str) -> None:
        if self._regex is not None:
            self.mentioned.update(self._form_to_name[m] for m in self._regex.findall(caption.lower()))

    def recall(self, pool: set[str]) -> dict[str, Any]:
        mentioned = sorted(self.mentioned)
        missing = [n for n in mentioned if n.lower() not in pool]
        return {
            "categories": len(self.names),
            "mentioned_in_captions": len(mentioned),
            "in_pool": len(mentioned) - len(missing),
            "recall": round((len(mentioned) - len(missing)) / len(mentioned), 4) if mentioned else None,
            "missing": missing,
        }


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def input_identity(c: ConceptsConfig, teacher: ClipModelConfig) -> list[dict[str, Any]]:
    """What the outputs depend on besides the config values: the caption and word-list files and
    the teacher's weights file (a retrained teacher at the same path needs new embeddings)."""
    sources = [c.captions] if is_text_file(c.captions) else expand_urls(c.captions)
    files = sources + [p for p in (c.stop_list, c.include, c.exclude, c.categories_json) if p]
    if teacher.pretrained:
        files.append(
            str(Path(teacher.pretrained) / WEIGHTS_FILE)
            if Path(teacher.pretrained).is_dir()
            else teacher.pretrained
        )
    return [file_stamp(p) for p in files]


def is_up_to_date(out_dir: Path, config_hash: str, inputs: list[dict[str, Any]]) -> bool:
    summary = read_record(out_dir / SUMMARY) or {}
    return (
        summary.get("config_hash") == config_hash
        and summary.get("inputs") == inputs
        and all((out_dir / name).is_file() for name in OUTPUTS)
    )


def parse_captions(c: ConceptsConfig, raw_phrases: Path) -> dict[str, Any]:
    """Parse every caption; write per-key phrases (all concepts, unfiltered) to ``raw_phrases``."""
    errors = SampleErrors()
    parser = CaptionParser(
        c.spacy_model, batch_size=c.batch_size, n_process=c.n_process, cache_size=c.cache_size
    )
    categories = (
        CategoryMentions([cat["name"] for cat in read_categories(c.categories_json)])
        if c.categories_json
        else None
    )
    counts: Counter = Counter()
    keys: deque[str] = deque()  # key of each caption handed to the parser, in order
    n_read = n_cleaned_out = 0  # captions decoded / dropped by clean_caption

    def texts() -> Iterator[str]:
        nonlocal n_read, n_cleaned_out
        for key, captions in iter_captions(c.captions, errors):
            for i, raw in enumerate(captions):
                n_read += 1
                text, reason = clean_caption(raw, c.max_caption_chars, c.lowercase)
                if text is None:
                    n_cleaned_out += 1
                    where = key if len(captions) == 1 else f"{key}[{i}]"
                    errors.add(error_record(reason, where, c.captions, f"{len(raw.strip())} characters"))
                    continue
                if categories is not None:
                    categories.update(text)
                keys.append(key)
                yield text

    start = time.perf_counter()
    n_parsed = 0
    with open(raw_phrases, "w", encoding="utf-8") as out, tqdm(unit="caption", desc="concepts: parse") as bar:
        current, phrases, concepts = None, [], []

        def flush() -> None:
            if current is not None:
                out.write(json.dumps({"key": current, "phrases": phrases, "concepts": concepts}) + "\n")

        for result in parser.parse(texts()):
            key = keys.popleft()
            if key != current:  # the captions of one sample arrive together
                flush()
                current, phrases, concepts = key, [], []
            counts.update(result.concepts)
            phrases += [p for p in result.phrases if p not in phrases]
            concepts += [x for x in dict.fromkeys(result.concepts) if x not in concepts]
            n_parsed += 1
            bar.update()
        flush()
    seconds = time.perf_counter() - start
    for line in errors.report_lines() if errors.counts else []:
        log.warning(line)
    if errors.unreadable_shards:  # a pool of part of the captions would pass for the whole one
        shards = ", ".join(errors.unreadable_shards[:5])
        raise InputError(
            f"concepts.captions: {len(errors.unreadable_shards)} shard(s) could not be read: {shards}"
        )
    return {
        "counts": counts,
        "categories": categories,
        "stats": {
            # decoded captions plus the samples / lines the reader already had to drop
            "captions_read": n_read + errors.total - n_cleaned_out,
            "captions_parsed": n_parsed,
            "captions_run_through_spacy": parser.parsed,
            "skipped": dict(sorted(errors.counts.items())),
            "skipped_examples": errors.examples,
            "concept_occurrences": sum(counts.values()),
            "distinct_concepts": len(counts),
            "parse_seconds": round(seconds, 3),
            "captions_per_s": round(n_parsed / max(seconds, 1e-9), 1),
        },
    }


def write_phrases(raw_phrases: Path, path: Path, pool: set[str]) -> int:
    """Copy the per-key records, keeping in ``concepts`` only those in the pool."""
    n = 0
    with (
        open(raw_phrases, encoding="utf-8") as src,
        atomic_output(path) as tmp,
        open(tmp, "w", encoding="utf-8") as dst,
    ):
        for line in src:
            record = json.loads(line)
            record["concepts"] = [x for x in record["concepts"] if x in pool]
            dst.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def build_concepts(
    c: ConceptsConfig, teacher: ClipModelConfig, device: torch.device, force: bool = False
) -> dict[str, Any]:
    """Run the stage with the ``teacher``'s text tower on ``device``; returns the summary (also
    written to ``<out_dir>/summary.json``)."""
    out_dir = Path(c.out_dir)
    config_hash = section_hash(c, teacher)
    inputs = input_identity(c, teacher)
    if not force and is_up_to_date(out_dir, config_hash, inputs):
        summary = json.loads((out_dir / SUMMARY).read_text(encoding="utf-8"))
        summary["skipped_run"] = True
        return summary
    if c.min_count < 1 or c.max_vocab < 0 or c.max_caption_chars < 1:
        raise ValueError(
            f"concepts: need min_count >= 1, max_vocab >= 0, max_caption_chars >= 1; got "
            f"{c.min_count}, {c.max_vocab}, {c.max_caption_chars}"
        )
    stop = read_word_list(c.stop_list) if c.stop_list else []
    include = read_word_list(c.include) if c.include else []
    exclude = read_word_list(c.exclude) if c.exclude else []
    require_writable(out_dir, "concepts.out_dir")
    timings: dict[str, float] = {}

    raw_phrases = out_dir / f".caption_phrases.raw-{os.getpid()}.jsonl"
    try:
        parsed = parse_captions(c, raw_phrases)
        stats, counts = parsed["stats"], parsed["counts"]
        timings["parse"] = stats["parse_seconds"]
        if stats["captions_parsed"] == 0:
            raise ValueError(f"{c.captions}: no usable captions (skipped: {stats['skipped'] or 'none read'})")

        t0 = time.perf_counter()
        vocab = select_vocabulary(counts, c.min_count, c.max_vocab, stop, include, exclude)
        if not vocab:
            top = ", ".join(f"{k} ({n})" for k, n in counts.most_common(5))
            raise ValueError(
                f"concepts: no concept reaches min_count={c.min_count} "
                f"({len(counts)} distinct; most frequent: {top}); lower concepts.min_count"
            )
        names = [name for name, _ in vocab]
        pool = set(names)
        atomic_write_text(out_dir / "concepts.txt", "".join(n + "\n" for n in names))
        atomic_write_json(
            out_dir / "concept_counts.json",
            {"pool": dict(vocab), "all": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))},
        )
        n_records = write_phrases(raw_phrases, out_dir / "caption_phrases.jsonl", pool)
        timings["vocabulary_and_phrases"] = round(time.perf_counter() - t0, 3)
    finally:
        raw_phrases.unlink(missing_ok=True)

    t0 = time.perf_counter()
    identity = embed_concepts(
        c, teacher, device, names, out_dir / "concept_embeddings.safetensors", config_hash
    )
    timings["embed"] = round(time.perf_counter() - t0, 3)

    import spacy  # loaded by the parser already; here for its version

    summary = {
        "config_hash": config_hash,
        "inputs": inputs,
        "config": {"concepts": to_dict(c), "teacher": to_dict(teacher)},
        **{k: v for k, v in stats.items() if k != "parse_seconds"},
        "concepts": len(names),
        "concepts_from_include_only": sum(1 for _, n in vocab if n < c.min_count),
        "caption_phrase_records": n_records,
        "top_concepts": vocab[:20],
        "seconds": timings,
        "spacy": {"model": c.spacy_model, "spacy_version": spacy.__version__},
        "teacher": identity,
        "category_recall": parsed["categories"].recall(pool) if parsed["categories"] is not None else None,
    }
    atomic_write_json(out_dir / SUMMARY, summary)
    return summary


def embed_concepts(
    c: ConceptsConfig,
    teacher: ClipModelConfig,
    device: torch.device,
    names: list[str],
    path: Path,
    config_hash: str,
) -> dict[str, str]:
    """Embed ``names`` with the teacher's text tower and the configured templates; returns its identity."""
    torch.manual_seed(c.seed)  # a random-init teacher is then the one pseudolabel builds (same seed)
    loaded = load_clip(teacher, device=device)
    embeddings = embed_class_names(loaded, names, c.templates, c.text_batch_size, device)
    meta = {**embedding_metadata(loaded, c.templates), "concepts_config_hash": config_hash}
    save_embeddings(path, embeddings, names, meta, normalized=False)
    return dict(loaded.identity)
