"""The `detect` CLI: tiny random CLIP + tiny random RPN on generated images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipelines import detect as detect_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = [tmp_path / "one.png", tmp_path / "sub" / "two.jpg"]
    paths[1].parent.mkdir()
    for path, (h, w) in zip(paths, [(64, 64), (48, 80)], strict=True):
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(path)
    return paths


def _args(tiny_clip, tiny_rpn_dir: Path, out: Path, *extra: str) -> list[str]:
    name, config = tiny_clip
    return [
        "--model",
        name,
        "--model-config",
        config,
        "--rpn",
        str(tiny_rpn_dir),
        "--out",
        str(out),
        "--short-side",
        "64",
        "--max-side",
        "96",
        "--templates",
        "single",
        "--device",
        "cpu",
        "--rpn-topk",
        "10",
        *extra,
    ]


def test_detect_writes_json_and_pngs(tmp_path, tiny_clip, tiny_rpn_dir, images, caplog) -> None:
    out = tmp_path / "out"
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    code = detect_cli.main(
        _args(
            tiny_clip,
            tiny_rpn_dir,
            out,
            "--prompt",
            "cat.. dog. cat.",
            "--batch-size",
            "2",
            "--score-thresh",
            "0.1",
        )
        + [str(images[0]), str(bad), str(images[1])]
    )
    assert code == 0
    assert any("broken.jpg" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    report = json.loads((out / "images.json").read_text())
    detections = json.loads((out / "detections.json").read_text())
    assert isinstance(detections, list)
    assert report["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert report["info"]["rpn"] == str(tiny_rpn_dir) and report["info"]["templates"] == "single"
    loaded = COCO(str(out / "images.json")).loadRes(str(out / "detections.json"))
    assert len(loaded.getAnnIds()) == len(detections)
    assert [im["file_name"] for im in report["images"]] == [str(images[0]), str(images[1])]
    assert [(im["width"], im["height"]) for im in report["images"]] == [(64, 64), (80, 48)]
    ids = {im["id"] for im in report["images"]}
    assert detections, "a random RPN with 2 classes at threshold 0.1 must detect something"
    for det in detections:
        assert det["image_id"] in ids and det["category_id"] in (1, 2)
        x, y, w, h = det["bbox"]
        assert w >= 0 and h >= 0 and 0.1 < det["score"] <= 1
    for im in report["images"]:
        with Image.open(out / im["visualization"]) as png:
            assert png.format == "PNG" and png.size == (im["width"], im["height"])
    assert sorted(p.name for p in out.glob("*.png")) == ["one.png", "two.png"]


def test_detect_vocab_file(tmp_path, tiny_clip, tiny_rpn_dir, images) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red umbrella\n\nbicycle\n")
    out = tmp_path / "out"
    assert detect_cli.main(_args(tiny_clip, tiny_rpn_dir, out, "--vocab", str(vocab), str(images[0]))) == 0
    report = json.loads((out / "images.json").read_text())
    assert [c["name"] for c in report["categories"]] == ["red umbrella", "bicycle"]


@pytest.mark.parametrize("prompt", ["", "...", " . . "])
def test_empty_prompt_is_a_usage_error(tmp_path, tiny_clip, tiny_rpn_dir, images, prompt, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        detect_cli.main(_args(tiny_clip, tiny_rpn_dir, tmp_path / "out", "--prompt", prompt, str(images[0])))
    assert exc.value.code == 2
    assert "has no class names" in capsys.readouterr().err


def test_no_readable_image_exits_1(tmp_path, tiny_clip, tiny_rpn_dir, capsys) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    missing = tmp_path / "missing.jpg"
    code = detect_cli.main(
        _args(tiny_clip, tiny_rpn_dir, tmp_path / "out", "--prompt", "cat.", str(bad), str(missing))
    )
    assert code == 1
    assert "none of the 2 images could be read" in capsys.readouterr().err


def test_missing_rpn_exits_1(tmp_path, tiny_clip, images, capsys) -> None:
    code = detect_cli.main(
        _args(tiny_clip, tmp_path / "nope", tmp_path / "out", "--prompt", "cat.", str(images[0]))
    )
    assert code == 1
    assert "no RPN at" in capsys.readouterr().err
