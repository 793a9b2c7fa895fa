"""Prompt templates, GLIP-style prompt parsing, text embeddings and their files."""

from __future__ import annotations

import open_clip
import pytest
import torch

from regionclip.config import ClipModelConfig
from regionclip.models import load_clip
from regionclip.prompts import TEMPLATE_SETS, fill, get_templates, parse_prompt
from regionclip.text import (
    embed_class_names,
    embed_texts,
    embedding_metadata,
    encode_text_trimmed,
    load_embeddings,
    save_embeddings,
)

NAMES = ["dog", "red umbrella", "salt+pepper, ground"]


@pytest.fixture
def loaded(tiny_clip):
    torch.manual_seed(0)
    return load_clip(ClipModelConfig(model=tiny_clip[0], model_config=tiny_clip[1]))


# ---------------------------------------------------------------------------------------------
# Templates and prompts
# ---------------------------------------------------------------------------------------------


def test_template_sets():
    ensemble = get_templates("ensemble")
    assert len(ensemble) == 81
    assert ensemble[0] == "{}."
    assert ensemble[1] == "a bad photo of a {}."
    assert ensemble[-1] == "a tattoo of the {}."
    assert list(ensemble[1:]) == [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert len(set(ensemble)) == 81
    assert get_templates("single") == ("a photo of a {}.",)
    assert all("{}" in t for ts in TEMPLATE_SETS.values() for t in ts)
    with pytest.raises(ValueError, match="unknown template set 'fancy'"):
        get_templates("fancy")


def test_fill_substitution():
    assert fill("a photo of a {}.", "dog") == "a photo of a dog."
    assert fill("{}.", "salt+pepper, ground") == "salt pepper ground."  # RegionCLIP: drop ',' and '+' -> ' '
    assert fill("a {} in a video game.", "hot+dog") == "a hot dog in a video game."
    assert fill("{}.", "set {x}") == "set {x}."  # braces in names are text, not format fields
    with pytest.raises(ValueError, match="no '{}' placeholder"):
        fill("a photo.", "dog")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("person. bicycle. red umbrella.", ["person", "bicycle", "red umbrella"]),
        ("person. bicycle. red umbrella", ["person", "bicycle", "red umbrella"]),  # no final dot
        ("  person ..  bicycle...  ", ["person", "bicycle"]),  # extra dots and spaces
        ("red   umbrella .\tdog\n.", ["red umbrella", "dog"]),  # inner whitespace collapsed
        ("dog. cat. dog. cat .bird", ["dog", "cat", "bird"]),  # duplicates: first kept
        ("dog", ["dog"]),
        ("st\\. bernard. dog.", ["st. bernard", "dog"]),  # an escaped dot stays in the name
    ],
)
def test_parse_prompt(prompt, expected):
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize("prompt", ["", "   ", ". . ..", "\n.\t."])
def test_parse_prompt_without_names(prompt):
    with pytest.raises(ValueError, match="no class names"):
        parse_prompt(prompt)


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


def test_embed_texts_is_mean_of_unnormalised_prompt_embeddings(loaded):
    templates = get_templates("ensemble")
    got = embed_texts(loaded.model, loaded.tokenizer, NAMES, templates, batch_size=7)  # batches span names
    with torch.no_grad():
        expected = torch.stack(
            [
                loaded.model.encode_text(
                    loaded.tokenizer([fill(t, n) for t in templates]), normalize=False
                ).mean(0)
                for n in NAMES
            ]
        )
    assert got.dtype == torch.float32 and got.shape == (3, 64)
    # rtol 1e-6: float32 rounding of other batch/sequence shapes in the matmuls (values ~1-10).
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # Not normalised, neither per prompt nor per row.
    assert (got.norm(dim=1) - 1).abs().min() > 0.5


def test_embed_texts_single_template_and_batching(loaded):
    with torch.no_grad():
        expected = loaded.model.encode_text(loaded.tokenizer(["a photo of a dog.", "a photo of a cat."]))
    got = embed_class_names(loaded, ["dog", "cat"], template_set="single", batch_size=1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_clip", "tiny_vit_clip"])
def test_trimmed_text_encoding_matches_encode_text(fixture, request):
    name, config_path = request.getfixturevalue(fixture)
    loaded = load_clip(ClipModelConfig(model=name, model_config=config_path))
    # Different lengths in one batch, and one prompt cut at the context length (EOT forced last).
    tokens = loaded.tokenizer(["dog", "a photo of a red umbrella.", "a " * 30])
    assert tokens[2, -1] == tokens.max()
    with torch.no_grad():
        expected = loaded.model.encode_text(tokens, normalize=False)
        torch.testing.assert_close(encode_text_trimmed(loaded.model, tokens), expected, atol=1e-6, rtol=1e-6)
        short = tokens[:2]
        assert int(short.argmax(-1).max()) + 1 < short.shape[1]  # the trimmed path really trims
        torch.testing.assert_close(
            encode_text_trimmed(loaded.model, short), expected[:2], atol=1e-6, rtol=1e-6
        )


def test_embed_texts_rejects_empty_input(loaded):
    with pytest.raises(ValueError, match="empty list of names"):
        embed_texts(loaded.model, loaded.tokenizer, [], ["{}."])
    with pytest.raises(ValueError, match="empty list of templates"):
        embed_texts(loaded.model, loaded.tokenizer, ["dog"], [])


def test_save_load_round_trip(loaded, tmp_path):
    emb = embed_class_names(loaded, NAMES, "single")
    meta = {**embedding_metadata(loaded, "single"), "min_count": 100}
    path = tmp_path / "concepts" / "concept_emb.safetensors"
    save_embeddings(path, emb, NAMES, meta)

    assert (
        tmp_path / "concepts" / "concept_emb.txt"
    ).read_text() == "dog\nred umbrella\nsalt+pepper, ground\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["concept_emb.safetensors", "concept_emb.txt"]
    got, names, got_meta = load_embeddings(path)
    assert torch.equal(got, emb)
    assert names == NAMES
    assert got_meta["model"] == "RN-tiny-test"
    assert got_meta["weights_id"] == loaded.weights_id
    assert got_meta["template_set"] == "single"
    assert got_meta["num_templates"] == "1"
    assert got_meta["normalized"] == "false"
    assert got_meta["count"] == "3" and got_meta["dim"] == "64"
    assert got_meta["min_count"] == "100"  # non-strings stored as JSON


def test_load_rejects_names_that_do_not_match(loaded, tmp_path):
    path = tmp_path / "emb.safetensors"
    save_embeddings(path, torch.zeros(3, 4), ["a", "b", "c"], {"model": "x"})
    txt = tmp_path / "emb.txt"

    txt.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"emb\.txt has 2 names but the embeddings have shape \(3, 4\)"):
        load_embeddings(path)
    txt.write_text("a\nc\nb\n")  # right count, wrong list
    with pytest.raises(ValueError, match="not the names list"):
        load_embeddings(path)
    txt.unlink()
    with pytest.raises(FileNotFoundError, match=r"names file .*emb\.txt is missing"):
        load_embeddings(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_embeddings(tmp_path / "nope.safetensors")


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(2, 4\) do not match 3 names"):
        save_embeddings(tmp_path / "e.safetensors", torch.zeros(2, 4), ["a", "b", "c"], {})
    with pytest.raises(ValueError, match="single lines"):
        save_embeddings(tmp_path / "e.safetensors", torch.zeros(2, 4), ["a", "b\nc"], {})
    assert list(tmp_path.iterdir()) == []
