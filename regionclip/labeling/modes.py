"""Pseudo-label modes, registered by name (``pseudolabel.mode``): which concepts a region may get.

- ``pool`` (RegionCLIP): the softmax runs over the whole concept pool;
- ``caption`` (GLIP-style grounding): only the concepts and phrases of the image's own caption.

A mode gives, per batch of samples, the candidate concept ids of each sample
(:meth:`LabelMode.candidates`; None = the whole pool) and what of its inputs identifies the labels
(:meth:`LabelMode.identity`, hashed into the shard manifests). A new mode is one class here and one
entry in :data:`MODES`; the labeler, the stage and the demo take it from the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from regionclip.concepts import CaptionParser
from regionclip.config import PseudoLabelConfig
from regionclip.errors import InputError
from regionclip.utils import parse_json, sha256_file


class LabelMode(Protocol):
    name: str

    def candidates(
        self, keys: Sequence[str], captions: Sequence[Sequence[str]]
    ) -> list[Tensor | None] | None:
        """Per sample, a sorted LongTensor of the pool ids it may be labelled with (None: its
        caption could not be looked up), or None for the whole pool for every sample."""
        ...

    def identity(self) -> str:
        """What besides the config decides the labels (a file's content hash), or ''."""
        ...


class PoolMode:
    """RegionCLIP: every region is scored against the whole concept pool."""

    name = "pool"

    def candidates(self, keys: Sequence[str], captions: Sequence[Sequence[str]]) -> None:
        return None

    def identity(self) -> str:
        return ""


class CaptionMode:
    """Pool ids of the concepts and phrases named by a sample's captions (GLIP-style grounding).

    ``phrases_file``: JSONL of ``{"key", "phrases", "concepts"}`` as the concepts stage writes it;
    empty = parse the captions here with spaCy (the same noun-chunk rules, :mod:`regionclip.concepts`).
    """

    name = "caption"

    def __init__(self, names: Sequence[str], phrases_file: str = "", spacy_model: str = ""):
        self.name_to_id = {n: i for i, n in enumerate(names)}
        self.phrases_file = phrases_file
        self.table: dict[str, list[str]] | None = None
        self.parser = None
        if phrases_file:
            self.table = read_phrases(Path(phrases_file))
        else:  # spaCy loads here, in caption mode only
            self.parser = CaptionParser(spacy_model, batch_size=64)

    def identity(self) -> str:
        return f"sha256:{sha256_file(self.phrases_file)}" if self.phrases_file else "parsed here"

    def candidates(self, keys: Sequence[str], captions: Sequence[Sequence[str]]) -> list[Tensor | None]:
        if self.table is not None:
            texts = [self.table.get(k) for k in keys]
        else:
            assert self.parser is not None
            flat = [c for caps in captions for c in caps]
            parses = iter(list(self.parser.parse(flat)))
            texts = []
            for caps in captions:
                words: list[str] = []
                for _ in caps:
                    p = next(parses)
                    words += [*p.phrases, *p.concepts]
                texts.append(words)
        return [
            None
            if words is None
            else torch.tensor(
                sorted({self.name_to_id[w] for w in words if w in self.name_to_id}), dtype=torch.long
            )
            for words in texts
        ]


def read_phrases(path: Path) -> dict[str, list[str]]:
    """``{key: phrases + concepts}`` of a caption-phrases JSONL file."""
    table: dict[str, list[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"cannot read caption phrases {path}: {e.strerror}") from e
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = parse_json(line)
        except ValueError as e:
            raise InputError(f"{path}:{lineno}: invalid JSON: {getattr(e, 'msg', e)}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise InputError(f"{path}:{lineno}: expected an object with a string 'key'")
        words = [*entry.get("phrases", []), *entry.get("concepts", [])]
        if not all(isinstance(w, str) for w in words):
            raise InputError(f"{path}:{lineno}: 'phrases' and 'concepts' must be lists of strings")
        table.setdefault(entry["key"], []).extend(words)
    return table


MODES: dict[str, Callable[[Sequence[str], PseudoLabelConfig], LabelMode]] = {
    "pool": lambda names, cfg: PoolMode(),
    "caption": lambda names, cfg: CaptionMode(names, cfg.caption_phrases, cfg.spacy_model),
}


def check_mode(name: str) -> None:
    if name not in MODES:
        raise InputError(f"pseudolabel.mode={name!r}: expected one of {tuple(MODES)}")


def build_mode(names: Sequence[str], cfg: PseudoLabelConfig) -> LabelMode:
    """The mode ``cfg.mode`` over the concept pool ``names``."""
    check_mode(cfg.mode)
    return MODES[cfg.mode](names, cfg)


def other_mode(mode: str) -> str:
    """The mode compared with ``mode`` (the demo labels a shard with it too): the first other one."""
    return next(m for m in MODES if m != mode)
