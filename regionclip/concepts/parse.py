"""Caption → concepts with spaCy noun chunks (RegionCLIP ``tools/tsvfile_filtering.py``).

A *concept* is the lemma of a noun chunk's root with its ``compound`` modifiers in front
("two tennis rackets" → "tennis racket"); a *phrase* also keeps the adjectives ("two red
umbrellas" → "red umbrella") and is the candidate list of a GLIP-style caption-grounding mode.
Chunks rooted in pronouns, determiners, numbers, symbols or punctuation give nothing.

Speed (``make bench``): only the components the parse reads run (``ner`` is never loaded),
documents are batched with ``nlp.pipe``, identical captions are parsed once (an LRU cache), and
``n_process > 1`` parses batches in worker processes that send back the small parse results
instead of whole ``Doc`` objects.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

# Pronouns and symbols that noun chunks yield when the tagger slips (RegionCLIP's hand list plus
# the possessive/reflexive forms spaCy v3 lemmatises to).
BUILTIN_STOP = frozenset(
    """i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his
    himself she her hers herself it its itself they them their theirs themselves one ones this that
    these those what which who whom whose something anything nothing everything someone anyone
    everyone nobody somebody anybody everybody each other another all both some any none
    there here 's m s t""".split()
)

# spaCy components a noun-chunk parse reads: token vectors, tags → POS (attribute_ruler), the
# dependency parse and lemmas. Everything else (ner, senter, textcat, ...) is excluded at load.
PARSE_COMPONENTS = (
    "tok2vec",
    "transformer",
    "tagger",
    "morphologizer",
    "parser",
    "attribute_ruler",
    "lemmatizer",
)
_DROP_POS = frozenset({"PRON", "DET", "NUM", "PUNCT", "SYM", "SPACE", "X"})
_PHRASE_DROP_DEP = frozenset({"det", "predet", "nummod", "poss", "case", "punct", "quantmod"})


@dataclass(frozen=True)
class CaptionParse:
    """One caption's noun chunks: ``concepts`` in occurrence order (repeats kept, for counting)
    and ``phrases`` (concept with adjectives), both lower-case."""

    concepts: tuple[str, ...]
    phrases: tuple[str, ...]


@functools.cache
def load_nlp(model: str, full: bool = False):
    """Load a spaCy pipeline; unless ``full``, only the components in :data:`PARSE_COMPONENTS`.

    Loaded once per process (about a second each); callers only read the pipeline.
    """
    import spacy

    if full:
        return spacy.load(model)
    try:
        meta = spacy.util.get_model_meta(spacy.util.get_package_path(model))
    except (ImportError, ModuleNotFoundError, OSError):
        meta = None
    if meta is None:  # a model folder rather than an installed package
        nlp = spacy.load(model)
        for name in [n for n in nlp.component_names if n not in PARSE_COMPONENTS]:
            nlp.remove_pipe(name)
        return nlp
    names = set(meta.get("components", [])) | set(meta.get("pipeline", []))
    return spacy.load(model, exclude=sorted(names - set(PARSE_COMPONENTS)))


def _is_content(tok) -> bool:
    return tok.pos_ not in _DROP_POS and not tok.like_num and any(ch.isalpha() for ch in tok.text)


def _lemma(tok) -> str:
    return tok.lemma_


def _compounds(tok) -> list:
    """``tok``'s compound modifiers, recursively ("hot dog stand": stand ← dog ← hot)."""
    out = []
    for child in tok.children:
        if child.dep_ == "compound" and _is_content(child):
            out.extend(_compounds(child))
            out.append(child)
    return out


def chunk_concept(chunk, lemma: Callable = _lemma) -> str | None:
    """Concept of a noun chunk (spaCy ``Span``), or None for pronoun/number/symbol roots.

    ``lemma(token) -> str`` defaults to the token's lemma as the pipeline set it.
    """
    root = chunk.root
    if not _is_content(root):
        return None
    words = [lemma(t) for t in sorted(_compounds(root), key=lambda t: t.i)] + [lemma(root)]
    return " ".join(words).lower()


def chunk_phrase(chunk, lemma: Callable = _lemma) -> str | None:
    """The chunk with determiners, numbers, possessives and punctuation removed and the root
    lemmatised ("two red umbrellas" → "red umbrella"); None where :func:`chunk_concept` is None."""
    root = chunk.root
    if not _is_content(root):
        return None
    words = [
        lemma(t) if t.i == root.i else t.text
        for t in chunk
        if t.i == root.i or (t.dep_ not in _PHRASE_DROP_DEP and _is_content(t))
    ]
    return " ".join(words).lower()


def parse_doc(doc, lemma: Callable = _lemma) -> CaptionParse:
    """Concepts and phrases of a parsed spaCy ``Doc``."""
    concepts, phrases = [], []
    for chunk in doc.noun_chunks:
        concept = chunk_concept(chunk, lemma)
        if concept is None:
            continue
        concepts.append(concept)
        phrase = chunk_phrase(chunk, lemma)
        if phrase not in phrases:
            phrases.append(phrase)
    return CaptionParse(tuple(concepts), tuple(phrases))


# --------------------------------------------------------------------------------------------
# Batched / parallel parsing
# --------------------------------------------------------------------------------------------

_WORKER: CaptionParser | None = None


def _worker_init(model: str, batch_size: int) -> None:
    global _WORKER
    _WORKER = CaptionParser(model, batch_size=batch_size)


def _worker_parse(batch: list[str]) -> tuple[list[str], list[CaptionParse]]:
    assert _WORKER is not None
    return batch, [result for _, result in _WORKER._parse_local(batch)]


# Token attributes whose value a single token's text determines (plus TAG/DEP, part of the key).
_TEXT_ATTRS = frozenset(
    {"ORTH", "TEXT", "LOWER", "IS_SPACE", "IS_ALPHA", "IS_PUNCT", "IS_DIGIT", "LIKE_NUM", "SHAPE", "LENGTH"}
)
_LATE_COMPONENTS = ("attribute_ruler", "lemmatizer")


class _CachedAttributeRuler:
    """Exact stand-in for spaCy's ``attribute_ruler`` that runs its rules once per distinct
    ``(text, tag, dep)`` token instead of matching 179 patterns on every token.

    Single-token rules only see the token itself, so their effect is computed on a one-token
    ``Doc`` and cached; a document where any multi-token rule matches goes to the real ruler.
    """

    def __init__(self, nlp):
        from spacy.matcher import Matcher

        self.ruler = nlp.get_pipe("attribute_ruler")
        self.vocab = nlp.vocab
        self.multi = Matcher(nlp.vocab)
        for i, entry in enumerate(self.ruler.patterns):
            multi = [pattern for pattern in entry["patterns"] if len(pattern) > 1]
            if multi:
                self.multi.add(f"multi{i}", multi)
        self.cache: dict[tuple[int, int, int], tuple[tuple[str, int], ...]] = {}

    @classmethod
    def maybe(cls, nlp) -> _CachedAttributeRuler | None:
        """The cached ruler when the pipeline has the components and rules it can emulate, else None."""
        if not all(name in nlp.pipe_names for name in _LATE_COMPONENTS):
            return None
        if nlp.pipe_names[-2:] != list(_LATE_COMPONENTS):
            return None  # something after the ruler could read its output mid-pipe
        for entry in nlp.get_pipe("attribute_ruler").patterns:
            for pattern in entry["patterns"]:
                keys = {k for tok in pattern for k in tok}
                if not keys <= _TEXT_ATTRS | {"TAG", "DEP"}:
                    return None
        return cls(nlp)

    def _effect(self, tok) -> tuple[tuple[str, int], ...]:
        from spacy.tokens import Doc

        one = Doc(self.vocab, words=[tok.text], spaces=[False])
        one[0].tag, one[0].dep = tok.tag, tok.dep
        before = (one[0].tag, one[0].pos, one[0].morph.key, one[0].lemma, one[0].dep)
        self.ruler(one)
        after = (one[0].tag, one[0].pos, one[0].morph.key, one[0].lemma, one[0].dep)
        names = ("tag", "pos", "morph", "lemma", "dep")
        return tuple((n, a) for n, b, a in zip(names, before, after, strict=True) if a != b)

    def __call__(self, doc):
        if self.multi(doc):
            return self.ruler(doc)
        cache = self.cache
        for tok in doc:
            key = (tok.orth, tok.tag, tok.dep)
            effect = cache.get(key)
            if effect is None:
                effect = cache[key] = self._effect(tok)
            for name, value in effect:
                if name == "morph":
                    tok.set_morph(value)
                else:
                    setattr(tok, name, value)
        return doc


class _Slot:
    __slots__ = ("value",)

    def __init__(self, value: CaptionParse | None = None):
        self.value = value


class CaptionParser:
    """Parse a stream of captions into :class:`CaptionParse` results, in input order.

    Args:
        model: spaCy package name or path.
        batch_size: captions per ``nlp.pipe`` batch (and per worker task).
        n_process: > 1 parses in that many worker processes.
        cache_size: distinct captions remembered, so repeated captions are parsed once.
    """

    def __init__(self, model: str, batch_size: int = 1024, n_process: int = 1, cache_size: int = 100_000):
        if batch_size < 1 or n_process < 1:
            raise ValueError(f"batch_size and n_process must be >= 1, got {batch_size}, {n_process}")
        self.model, self.batch_size, self.n_process, self.cache_size = (
            model,
            batch_size,
            n_process,
            cache_size,
        )
        self.nlp = load_nlp(model) if n_process == 1 else None
        self._attributes = _CachedAttributeRuler.maybe(self.nlp) if self.nlp is not None else None
        self._cache: OrderedDict[str, CaptionParse] = OrderedDict()
        self.parsed = 0  # captions actually run through spaCy (the rest came from the cache)

    def _remember(self, text: str, result: CaptionParse) -> None:
        self._cache[text] = result
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def parse(self, texts: Iterable[str]) -> Iterator[CaptionParse]:
        """Yield one result per input text, in order (lazily: the input may be a stream)."""
        pending: deque[_Slot] = deque()
        inflight: dict[str, _Slot] = {}

        def new_texts() -> Iterator[str]:
            for text in texts:
                if text in self._cache:
                    self._cache.move_to_end(text)
                    pending.append(_Slot(self._cache[text]))
                elif text in inflight:
                    pending.append(inflight[text])
                else:
                    slot = inflight[text] = _Slot()
                    pending.append(slot)
                    yield text

        def drain() -> Iterator[CaptionParse]:
            while pending and pending[0].value is not None:
                yield pending.popleft().value

        for text, result in self._run(new_texts()):
            inflight.pop(text).value = result
            self._remember(text, result)
            self.parsed += 1
            yield from drain()
        yield from drain()
        assert not pending, "internal error: captions left unparsed"

    def _run(self, texts: Iterator[str]) -> Iterator[tuple[str, CaptionParse]]:
        if self.n_process == 1:
            yield from self._parse_local(texts)
            return
        ctx = mp.get_context("spawn")  # forking a process that may hold torch threads is unsafe
        with ctx.Pool(
            self.n_process, initializer=_worker_init, initargs=(self.model, self.batch_size)
        ) as pool:
            for batch, results in pool.imap(_worker_parse, _batched(texts, self.batch_size)):
                yield from zip(batch, results, strict=True)

    def _parse_local(self, texts: Iterable[str]) -> Iterator[tuple[str, CaptionParse]]:
        assert self.nlp is not None
        pairs = ((t, t) for t in texts)
        if self._attributes is None:
            for doc, text in self.nlp.pipe(pairs, as_tuples=True, batch_size=self.batch_size):
                yield text, parse_doc(doc)
            return
        lemmatizer = self.nlp.get_pipe("lemmatizer")
        lemmatize, overwrite = lemmatizer.lemmatize, lemmatizer.overwrite

        def lemma(tok) -> str:
            # what the lemmatizer component would have set, computed only for tokens we read;
            # its rule cache is keyed by (text, POS, morph), so the call order does not matter
            return lemmatize(tok)[0] if overwrite or tok.lemma == 0 else tok.lemma_

        docs = self.nlp.pipe(pairs, as_tuples=True, batch_size=self.batch_size, disable=_LATE_COMPONENTS)
        for doc, text in docs:
            yield text, parse_doc(self._attributes(doc), lemma)


def _batched(it: Iterator[str], n: int) -> Iterator[list[str]]:
    while batch := list(islice(it, n)):
        yield batch


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


def select_vocabulary(
    counts: Counter,
    min_count: int = 1,
    max_vocab: int = 0,
    stop: Iterable[str] = (),
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> list[tuple[str, int]]:
    """The concept pool as ``(concept, count)`` in frequency order (ties alphabetical).

    Counted concepts pass if ``count >= min_count`` and they are in neither the built-in stop
    list, ``stop`` nor ``exclude``; ``max_vocab`` (0 = no limit) keeps the most frequent. Then
    every ``include`` concept not excluded is added (count 0 if never seen), even below
    ``min_count`` or beyond ``max_vocab``.
    """
    dropped = BUILTIN_STOP | {s.lower() for s in stop} | {s.lower() for s in exclude}
    ranked = sorted(
        ((c, n) for c, n in counts.items() if n >= min_count and c not in dropped),
        key=lambda cn: (-cn[1], cn[0]),
    )
    if max_vocab > 0:
        ranked = ranked[:max_vocab]
    kept = {c for c, _ in ranked}
    extra = {c.lower() for c in include} - kept - {s.lower() for s in exclude}
    ranked += [(c, counts.get(c, 0)) for c in extra]
    return sorted(ranked, key=lambda cn: (-cn[1], cn[0]))


def read_word_list(path: str) -> list[str]:
    """One entry per line; blank lines and ``#`` comments ignored; a ``name,count`` line keeps the name."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read word list {path}: {e}") from None
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line.split(",", 1)[0].strip().lower())
    return out
