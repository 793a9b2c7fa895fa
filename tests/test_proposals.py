"""Class-agnostic RPN: model, save/load, sampling, precomputed proposals, training, recall."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image, ImageDraw

from pipelines import rpn as rpn_pipeline
from regionclip.config import load_config
from regionclip.data.coco import category_splits
from regionclip.data.images import load_rgb
from regionclip.errors import ProposalError
from regionclip.evaluation.recall import evaluate_recall, recalled
from regionclip.labeling.proposals import (
    PrecomputedProposals,
    build_proposal_source,
    load_precomputed_proposals,
    sample_proposals,
)
from regionclip.models.preprocess import pil_to_tensor
from regionclip.models.rpn import build_proposal_network, load_rpn, save_rpn
from regionclip.stages.rpn import train_rpn

# image -> [(x, y, w, h, category)]; category 1 is base, 2 is novel (absent from the train json)
TRAIN = {
    "a.png": [(6, 8, 24, 20, 1), (36, 34, 20, 24, 1)],
    "b.png": [(30, 6, 26, 26, 1)],
    "c.png": [(10, 30, 22, 22, 1)],
    "d.png": [(8, 8, 28, 16, 1), (40, 20, 16, 30, 1)],
}
VAL = {
    "v1.png": [(6, 6, 24, 24, 1), (36, 36, 22, 20, 2)],
    "v2.png": [(20, 10, 26, 26, 2)],
}
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 200, 20)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_set(root: Path, images: dict, json_path: Path, categories=(1, 2)) -> None:
    rng = np.random.default_rng(len(images))
    coco: dict = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c, "name": f"c{c}"} for c in categories],
    }
    for i, (name, objects) in enumerate(images.items()):
        pixels = rng.integers(110, 150, size=(64, 64, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for j, (x, y, w, h, cat) in enumerate(objects):
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLOURS[(i + j) % len(COLOURS)])
            coco["annotations"].append(
                {"id": len(coco["annotations"]) + 1, "image_id": i, "bbox": [x, y, w, h], "category_id": cat}
            )
        image.save(root / name)
        coco["images"].append({"id": i, "file_name": name, "width": 64, "height": 64})
    json_path.write_text(json.dumps(coco))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    _write_set(images, TRAIN, tmp_path / "train.json", categories=(1,))
    _write_set(images, VAL, tmp_path / "val.json")
    return tmp_path


def _overrides(root: Path, **extra) -> list[str]:
    values = {
        "output_dir": str(root / "out"),
        "rpn.train_json": str(root / "train.json"),
        "rpn.val_json": "''",
        "rpn.image_root": str(root / "images"),
        "rpn.backbone": "resnet18",
        "rpn.norm": "bn",
        "rpn.trainable_layers": 5,
        "rpn.fpn_channels": 64,
        "rpn.min_size": 64,
        "rpn.max_size": 128,
        "rpn.anchor_sizes": "[8,16,32,64,128]",
        "rpn.pre_nms_top_n_train": 200,
        "rpn.post_nms_top_n_train": 50,
        "rpn.pre_nms_top_n_test": 200,
        "rpn.post_nms_top_n_test": 20,
        "rpn.batch_size_per_image": 64,
        "rpn.batch_size": 2,
        "rpn.steps": 4,
        "rpn.lr": 0.01,
        "rpn.warmup_steps": 2,
        "rpn.checkpoint_every": 2,
        "rpn.num_workers": 0,
        "rpn.recall_at": "[5,20]",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _cfg(root: Path, **extra):
    return load_config(None, _overrides(root, **extra)).rpn


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def test_eval_boxes_are_in_original_coordinates(tmp_path: Path):
    torch.manual_seed(0)
    model = build_proposal_network(_cfg(tmp_path)).eval()
    image = _image(50, 80)  # short side 50 -> 64: resized to 64 x 102
    with torch.no_grad():
        boxes, scores, losses = model([image, _image(64, 64, 1)])
        image_list, _ = model.transform([image])
        raw, raw_scores, _ = model.rpn(image_list, model.backbone(image_list.tensors))
    assert losses == {}
    assert image_list.image_sizes[0] == (64, 102)
    assert all(len(b) <= 20 and len(b) == len(s) for b, s in zip(boxes, scores, strict=True))
    b, s = boxes[0], scores[0]
    assert len(b) > 0
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 80).all() and (b[:, 3] <= 50).all()
    assert ((s > 0) & (s < 1)).all() and torch.equal(s, s.sort(descending=True).values)
    scale = torch.tensor([80 / 102, 50 / 64, 80 / 102, 50 / 64])
    expected = raw[0] * scale
    expected[:, 0::2] = expected[:, 0::2].clamp(0, 80)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, 50)
    torch.testing.assert_close(b, expected)
    torch.testing.assert_close(s, raw_scores[0])


def test_train_mode_losses_are_finite(tmp_path: Path):
    torch.manual_seed(0)
    model = build_proposal_network(_cfg(tmp_path)).train()
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 28.0]])}, {"boxes": torch.zeros(0, 4)}]
    boxes, _, losses = model([_image(64, 64), _image(48, 64, 1)], targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    assert all(len(b) <= 50 for b in boxes)


def test_bad_model_config_is_named(tmp_path: Path):
    with pytest.raises(ProposalError, match="anchor_sizes"):
        build_proposal_network(_cfg(tmp_path, **{"rpn.anchor_sizes": "[8,16]"}))
    with pytest.raises(ProposalError, match="rpn.norm='group'"):
        build_proposal_network(_cfg(tmp_path, **{"rpn.norm": "group"}))


def test_save_load_round_trip_and_backbone_weights(tmp_path: Path):
    cfg = _cfg(tmp_path)
    torch.manual_seed(0)
    model = build_proposal_network(cfg).eval()
    images = [_image(50, 80), _image(64, 64, 1)]
    with torch.no_grad():
        before = model(images)[:2]
    weights = save_rpn(model, cfg, tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "rpn.json").read_text())
    assert (
        meta["format"] == "regionclip.rpn"
        and meta["version"] == 1
        and meta["config"]["backbone"] == "resnet18"
    )
    for path in (tmp_path / "saved", weights):
        loaded = load_rpn(path)
        assert not loaded.training
        with torch.no_grad():
            after = loaded(images)[:2]
        for x, y in zip(before, after, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(x, y, strict=True))
    with pytest.raises(ProposalError, match="make rpn"):
        load_rpn(tmp_path / "nothing")

    # a torchvision ResNet state dict (with its fc) initialises the body
    body = {k: v for k, v in model.backbone.body.state_dict().items()}
    body["fc.weight"] = torch.zeros(10, 512)
    torch.save({"state_dict": body}, tmp_path / "r18.pth")
    with_weights = build_proposal_network(
        _cfg(tmp_path, **{"rpn.backbone_weights": str(tmp_path / "r18.pth")})
    )
    assert torch.equal(with_weights.backbone.body.conv1.weight, model.backbone.body.conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ProposalError, match="bad.pth"):
        build_proposal_network(_cfg(tmp_path, **{"rpn.backbone_weights": str(tmp_path / "bad.pth")}))


# --------------------------------------------------------------------------------------------
# Sampling and precomputed proposals
# --------------------------------------------------------------------------------------------


def test_sample_proposals():
    boxes = torch.rand(10, 4)
    scores = torch.arange(10, 0, -1).float()  # index 0 scores highest
    idx = sample_proposals(boxes, scores, 4, torch.Generator().manual_seed(3))
    assert len(idx) == 4 and len(set(idx.tolist())) == 4 and torch.equal(idx, idx.sort().values)
    assert torch.equal(idx, sample_proposals(boxes, scores, 4, torch.Generator().manual_seed(3)))
    assert sample_proposals(boxes, scores, 20, torch.Generator()).tolist() == list(range(10))
    top = sample_proposals(boxes, scores, 3, torch.Generator().manual_seed(0), top_k=5)
    assert len(top) == 3 and top.max() < 5
    assert len(sample_proposals(boxes[:0], scores[:0], 5, torch.Generator())) == 0
    # uniform: each of 4 proposals drawn ~1/4 of 2000 single draws (binomial sd ~19)
    g = torch.Generator().manual_seed(0)
    counts = np.bincount(
        [int(sample_proposals(boxes[:4], scores[:4], 1, g)) for _ in range(2000)], minlength=4
    )
    assert counts.min() > 420 and counts.max() < 580
    with pytest.raises(ValueError, match="scores"):
        sample_proposals(boxes, scores[:3], 2, g)


def test_precomputed_json_and_jsonl(tmp_path: Path):
    entries = {"k1": {"boxes": [[0, 0, 10, 10], [5, 5, 20, 30]], "scores": [0.9, 0.5]}, "k2": {"boxes": []}}
    (tmp_path / "p.json").write_text(json.dumps(entries))
    lines = [json.dumps({"key": k, **v}) for k, v in entries.items()]
    (tmp_path / "p.jsonl").write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n")
    for name in ("p.json", "p.jsonl"):
        table = load_precomputed_proposals(tmp_path / name)
        assert sorted(table) == ["k1", "k2"]
        assert table["k1"][0].tolist() == [[0, 0, 10, 10], [5, 5, 20, 30]]
        assert table["k1"][1].tolist() == pytest.approx([0.9, 0.5])
        assert table["k2"][0].shape == (0, 4) and table["k2"][1].shape == (0,)
    source = build_proposal_source("", str(tmp_path / "p.jsonl"))
    boxes, scores = source(["k2", "k1"], [])
    assert boxes[1].shape == (2, 4) and scores[0].shape == (0,)
    with pytest.raises(ProposalError, match=r"p.jsonl: no proposals for sample\(s\) \['zz'\]"):
        source(["k1", "zz"], [])
    assert PrecomputedProposals.from_file(tmp_path / "p.json")(["k1"])[0][0].shape == (2, 4)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "a.jsonl",
            '{"key": "x", "boxes": [[0,0,1,1]]}\n{"key": "y", "boxes": [[0,0,1]]}\n',
            r"a.jsonl:2 \(key 'y'\)",
        ),
        ("b.jsonl", '{"key": "x", "boxes": []}\n{"key": "x", "boxes": []}\n', "b.jsonl:2: duplicate key 'x'"),
        ("c.jsonl", '{"key": "x", "boxes": []}\nnot json\n', "c.jsonl:2: invalid JSON"),
        ("d.jsonl", '{"boxes": []}\n', "d.jsonl:1: expected a non-empty string 'key'"),
        ("e.json", '{"x": {"boxes": [[5,0,1,1]]}}', "e.json: key 'x': box 0 .* x1 < x0"),
        ("f.json", '{"x": {"boxes": [[0,0,1,1]], "scores": [1, 2]}}', "f.json: key 'x': 1 boxes but scores"),
        ("g.json", '{"x": {"scores": []}}', "g.json: key 'x': expected an object with 'boxes'"),
        ("h.json", '{"x": {"boxes": [[0,0,"a",1]]}}', "h.json: key 'x': boxes and scores must be numbers"),
        ("i.json", "[1, 2]", "i.json: expected an object mapping sample keys"),
    ],
)
def test_precomputed_malformed(tmp_path: Path, name: str, text: str, message: str):
    (tmp_path / name).write_text(text)
    with pytest.raises(ProposalError, match=message):
        load_precomputed_proposals(tmp_path / name)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(out / "rpn.safetensors"))


def test_exact_resume(data: Path):
    straight = train_rpn(_cfg(data, output_dir=str(data / "straight")))
    assert straight["finished"] and straight["train"]["steps"] == 4

    cfg = _cfg(data, output_dir=str(data / "resumed"))
    first = train_rpn(cfg, stop_after=2)
    assert not first["finished"] and first["train"]["steps"] == 2
    assert (data / "resumed" / "rpn" / "checkpoint" / "latest.json").is_file()
    assert not (data / "resumed" / "rpn" / "rpn.safetensors").exists()
    second = train_rpn(cfg)
    assert second["finished"] and second["train"]["steps"] == 4 and second["train"]["images"] == 8
    assert not (data / "resumed" / "rpn" / "checkpoint").exists()

    a, b = _weights(data / "straight" / "rpn"), _weights(data / "resumed" / "rpn")
    assert a.keys() == b.keys()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6
    # a finished run with the same config is skipped, not retrained
    mtime = (data / "resumed" / "rpn" / "rpn.safetensors").stat().st_mtime_ns
    assert train_rpn(cfg)["train"] == second["train"]
    assert (data / "resumed" / "rpn" / "rpn.safetensors").stat().st_mtime_ns == mtime
    # a checkpoint from another trajectory is refused
    other = _cfg(data, output_dir=str(data / "resumed"), **{"rpn.lr": 0.5, "rpn.steps": 6})
    train_rpn(_cfg(data, output_dir=str(data / "resumed"), **{"rpn.steps": 6}), stop_after=1)
    with pytest.raises(ProposalError, match="different rpn config"):
        train_rpn(other)


def test_training_reduces_loss_and_skips_missing_images(data: Path):
    (data / "images" / "d.png").unlink()
    cfg = _cfg(
        data,
        **{
            "rpn.steps": 20,
            "rpn.lr": 0.02,
            "rpn.warmup_steps": 3,
            "rpn.checkpoint_every": 0,
            "rpn.val_json": str(data / "val.json"),
        },
    )
    torch.manual_seed(0)
    start_model = build_proposal_network(cfg).train()
    summary = train_rpn(cfg)
    train = summary["train"]
    assert train["train_images"] == 3 and train["skipped"] == {"missing_image": 1}
    assert train["images"] == 40 and train["steps"] == 20

    # the trained network fits the training boxes better than its own initialisation
    def loss_of(model) -> float:
        records = json.loads((data / "train.json").read_text())
        images, targets = [], []
        for img in records["images"][:3]:
            images.append(pil_to_tensor(load_rgb(data / "images" / img["file_name"])))
            boxes = [a["bbox"] for a in records["annotations"] if a["image_id"] == img["id"]]
            targets.append(
                {"boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes], dtype=torch.float)}
            )
        torch.manual_seed(1)
        with torch.no_grad():
            return float(sum(model(images, targets)[2].values()))

    trained = load_rpn(data / "out" / "rpn").train()
    assert loss_of(trained) < 0.5 * loss_of(start_model)  # measured: 0.72 -> 0.05

    recall = json.loads((data / "out" / "rpn" / "summary.json").read_text())["recall"]
    assert recall["images"] == 2 and recall["base"]["boxes"] == 1 and recall["novel"]["boxes"] == 2
    assert recall["all"]["boxes"] == 3
    for split in ("base", "novel", "all"):
        assert 0 <= recall[split]["recall@5"] <= recall[split]["recall@20"] <= 1


def test_all_images_missing_is_an_error(data: Path):
    for name in TRAIN:
        (data / "images" / name).unlink()
    with pytest.raises(ProposalError, match=r"train.json: none of its 4 image files exist"):
        train_rpn(_cfg(data))
    assert rpn_pipeline.main(_overrides(data)) == 1


def test_pipeline_with_precomputed(tmp_path: Path, capsys):
    (tmp_path / "p.json").write_text(json.dumps({"k": {"boxes": [[0, 0, 2, 2]], "scores": [1]}}))
    assert rpn_pipeline.main(_overrides(tmp_path, **{"rpn.precomputed": str(tmp_path / "p.json")})) == 0
    assert "1 samples, 1 boxes" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Recall
# --------------------------------------------------------------------------------------------


def test_recalled_by_hand():
    proposals = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    gt = torch.tensor([[0.0, 0, 10, 10], [21, 21, 31, 31], [50, 50, 60, 60]])
    # gt 1 vs proposal 1: intersection 9*9 = 81, union 100 + 100 - 81 = 119, IoU 0.68
    assert recalled(proposals, gt, [1, 2], 0.5).tolist() == [[True, False, False], [True, True, False]]
    assert recalled(proposals, gt, [2], 0.7).tolist() == [[True, False, False]]
    assert recalled(proposals[:0], gt, [1], 0.5).tolist() == [[False, False, False]]


def test_category_splits(data: Path):
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    assert category_splits(cats, train_json=data / "train.json") == {"base": [1], "novel": [2]}
    marked = [{"id": 1, "split": "novel"}, {"id": 2, "split": "base"}]
    assert category_splits(marked, train_json=data / "train.json") == {"base": [2], "novel": [1]}


def test_evaluate_recall_counts_hand_made_proposals(data: Path):
    """A model stand-in proposing exactly the base box of v1 recalls 1/1 base and 0/2 novel boxes."""

    class Fixed(torch.nn.Module):
        def forward(self, images, targets=None):
            return [torch.tensor([[6.0, 6, 30, 30]]) for _ in images], [torch.ones(1) for _ in images], {}

    result = evaluate_recall(Fixed(), data / "val.json", data / "images", data / "train.json", ks=[1])
    assert result["base"] == {"boxes": 1, "recall@1": 1.0}
    assert result["novel"] == {"boxes": 2, "recall@1": 0.0}
    assert result["all"] == {"boxes": 3, "recall@1": pytest.approx(0.3333, abs=1e-4)}
