"""Own data end to end, as docs/custom-data.md walks it: real photos with captions and a few COCO
boxes -> shards -> concepts -> RPN -> pseudo-labels -> student -> transfer -> detect (CLI and
Python API), at toy size with the tiny preset's settings."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
import torch
from PIL import Image, ImageOps

import pretrain
from data_prep import generic
from pipelines import concepts, detect, pseudolabel, rpn, transfer
from regionclip import RegionCLIP

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")]
PHOTO = (
    Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
)  # 512 x 600, ships with matplotlib
CAPTIONS = [
    "a woman in a navy uniform",
    "portrait of a woman in uniform",
    "an officer with a flag behind her",
    "a woman smiling next to a flag",
    "an old photo of a woman",
    "a navy officer in uniform",
    "a woman in a dark uniform",
    "a portrait of an officer",
]
CATEGORIES = [{"id": 1, "name": "face", "split": "base"}, {"id": 2, "name": "uniform", "split": "novel"}]


def _photos(root: Path) -> list[dict]:
    """8 real photos (crops of one portrait, some mirrored) and their face / uniform boxes."""
    root.mkdir(parents=True)
    source = Image.open(PHOTO).convert("RGB")
    images = []
    for i in range(len(CAPTIONS)):
        x0, y0 = 16 * i, 8 * (i % 4)
        photo = source.crop((x0, y0, x0 + 320, y0 + 400)).resize((64, 80))
        if i % 2:
            photo = ImageOps.mirror(photo)
        name = f"photo{i}.jpg"
        photo.save(root / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": 64, "height": 80})
    return images


def _coco(images: list[dict], with_novel: bool) -> dict:
    annotations = []
    for im in images:
        annotations.append(
            {"id": len(annotations) + 1, "image_id": im["id"], "category_id": 1, "bbox": [18, 6, 28, 30]}
        )
        if with_novel:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": im["id"], "category_id": 2, "bbox": [4, 44, 56, 34]}
            )
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def test_own_photos_to_a_detector(tmp_path, capsys):
    photos = tmp_path / "photos"
    images = _photos(photos)
    with open(photos / "captions.jsonl", "w") as f:
        for im, caption in zip(images, CAPTIONS, strict=True):
            f.write(json.dumps({"path": im["file_name"], "caption": caption}) + "\n")
    (tmp_path / "boxes_base.json").write_text(json.dumps(_coco(images, with_novel=False)))
    (tmp_path / "val_all.json").write_text(json.dumps(_coco(images[:4], with_novel=True)))
    runs = tmp_path / "runs"
    config = tmp_path / "mine.yaml"
    config.write_text(f"""
inherit: {Path("configs/tiny.yaml").resolve()}
name: mine
output_dir: {runs}
device: cpu
data_prep:
  source: generic
  generic:
    image_dir: {photos}
data:
  pretrain_shards: {runs}/data/train-000000.tar
  det_train_json: {tmp_path}/boxes_base.json
  val_json: {tmp_path}/val_all.json
  image_root: {photos}
concepts:
  templates: single
  categories_json: {tmp_path}/val_all.json
transfer:
  tag: regionclip
  templates: single
  max_proposals: 20
  init:
    pretrained: {runs}/student/final
""")
    argv = ["--config", str(config)]
    assert generic.main(argv) == 0
    assert concepts.main(argv) == 0
    summary = json.loads((runs / "concepts" / "summary.json").read_text())
    assert (
        summary["concepts"] > 0 and summary["category_recall"]["in_pool"] >= 1
    )  # "uniform" is named 4 times
    assert rpn.main(argv) == 0
    assert pseudolabel.main(argv) == 0
    manifest = json.loads((runs / "pseudolabels" / "train-000000.manifest.json").read_text())
    assert manifest["counts"]["images"] == len(CAPTIONS)
    assert pretrain.main(argv) == 0
    assert (runs / "student" / "final" / "open_clip_model.safetensors").is_file()
    assert transfer.main(argv) == 0
    metrics = json.loads((runs / "transfer" / "regionclip" / "metrics.json").read_text())
    assert {"AP50_all", "AP50_base", "AP50_novel"} <= set(metrics)
    assert metrics["classes_with_boxes"] == {"all": 2, "base": 1, "novel": 1}

    out = tmp_path / "detections"
    model = ["--model", str(runs / "student" / "final"), "--rpn", str(runs / "rpn")]
    sizes = ["--short-side", "64", "--max-side", "80", "--templates", "single", "--device", "cpu"]
    assert detect.main([*model, *sizes, "--prompt", "face. uniform. flag.", "--score-thresh", "0.05",
                        "--out", str(out), str(photos / "photo0.jpg")]) == 0  # fmt: skip
    assert isinstance(json.loads((out / "detections.json").read_text()), list)
    capsys.readouterr()

    torch.manual_seed(0)
    api = RegionCLIP.from_pretrained(runs / "student" / "final", rpn=runs / "rpn", device="cpu",
                                     templates="single", short_side=64, max_side=80)  # fmt: skip
    found = api(
        Image.open(photos / "photo0.jpg"),
        candidate_labels=["face", "uniform", "flag"],
        threshold=0.05,
        top_k=3,
    )
    assert found and all(d["label"] in ("face", "uniform", "flag") for d in found)
