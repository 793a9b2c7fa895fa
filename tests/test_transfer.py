"""Open-vocabulary detector: classifier maths, RoI sampling, bad input, a tiny end-to-end transfer."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

from data_prep import emojiworld
from pipelines import transfer as transfer_pipeline
from regionclip.config import TransferConfig
from regionclip.errors import TransferError
from regionclip.models.preprocess import batch_images
from regionclip.stages.transfer import Prepared, prepare, proposals_for
from regionclip.text import save_embeddings
from regionclip.transfer import TextClassifier, ov_classification_loss
from regionclip.transfer.torchvision_rcnn import build_detector
from regionclip.transfer.vocabulary import select_embeddings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------
# Classifier and loss, by hand
# --------------------------------------------------------------------------------------------

# 2 classes in 2-d; the rows are scaled to check that the classifier normalises them
EMB = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
X = torch.tensor([[5.0, 0.0], [1.0, 1.0]])  # cos = [1, 0] and [0.7071, 0.7071]


def test_logits_are_cosines_over_temperature_with_background_zero_last():
    logits = TextClassifier(2, EMB, temperature=0.5)(X)
    s = math.sqrt(0.5) / 0.5
    expected = torch.tensor([[2.0, 0.0, 0.0], [s, s, 0.0]])
    assert torch.allclose(logits, expected, atol=1e-6)


def test_focal_scaled_loss_with_background_weight_by_hand():
    logits = TextClassifier(2, EMB, temperature=0.5)(X)
    labels = torch.tensor([0, 2])  # RoI 1: class 0; RoI 2: background (last index)
    # RoI 1: logits (2, 0, 0)
    p1 = math.exp(2) / (math.exp(2) + 2)
    loss1 = -math.log(p1) * (1 - p1) ** 0.5
    # RoI 2: logits (a, a, 0), a = sqrt(2); background probability 1 / (2 e^a + 1), weight 0.2
    p2 = 1 / (2 * math.exp(math.sqrt(2)) + 1)
    loss2 = -math.log(p2) * (1 - p2) ** 0.5 * 0.2
    got = ov_classification_loss(logits, labels, bg_weight=0.2, focal_gamma=0.5)
    assert got.item() == pytest.approx((loss1 + loss2) / 2, rel=1e-5)  # mean over RoIs, not weights
    # gamma 0: background-weighted cross-entropy, still divided by the number of RoIs
    plain = ov_classification_loss(logits, labels, bg_weight=0.2, focal_gamma=0.0)
    assert plain.item() == pytest.approx((-math.log(p1) - 0.2 * math.log(p2)) / 2, rel=1e-5)


def test_background_logit_is_a_constant_without_gradient():
    clf = TextClassifier(2, EMB)
    assert list(clf.parameters()) == []  # nothing in the classifier trains
    x = X.clone().requires_grad_(True)
    logits = clf(x)
    logits.retain_grad()
    ov_classification_loss(logits, torch.tensor([1, 2])).backward()
    assert (logits[:, -1] == 0).all()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert "weight" not in clf.state_dict()  # the vocabulary is not part of checkpoints


def test_confident_rois_at_temperature_001_give_finite_gradients():
    # p_t rounds to 1 in fp32 (logit gap 100): (1 - p_t)^0.5 must not turn the gradient into NaN
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    logits = TextClassifier(2, EMB, temperature=0.01)(x)
    loss = ov_classification_loss(logits, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() < 1e-20
    assert torch.isfinite(x.grad).all()


def test_empty_batch_loss_is_zero_and_connected():
    logits = torch.zeros(0, 3, requires_grad=True)
    loss = ov_classification_loss(logits, torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert loss.item() == 0.0


def test_swapping_the_vocabulary_changes_the_number_of_outputs():
    clf = TextClassifier(2, EMB)
    assert clf(X).shape == (2, 3)
    clf.set_embeddings(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]))
    logits = clf(X)
    assert logits.shape == (2, 5)
    assert logits[1, 2].item() == pytest.approx(100.0, rel=1e-5)  # x2 and class 2 point the same way


def test_embedding_dimension_mismatch_names_both_dimensions():
    with pytest.raises(ValueError, match=r"dimension 3 does not match .* dimension 2"):
        TextClassifier(2, torch.ones(4, 3))
    clf = TextClassifier(2, EMB)
    with pytest.raises(ValueError, match=r"dimension 5 does not match .* dimension 2"):
        clf.set_embeddings(torch.ones(4, 5))


def test_class_count_mismatch_names_the_missing_categories():
    emb = torch.eye(3)
    got = select_embeddings(emb, ["a", "b", "c"], ["c", "a"], "emb.safetensors", "val.json")
    assert torch.equal(got, emb[[2, 0]])
    with pytest.raises(TransferError, match=r"val.json has 3 categories .* emb.safetensors .* \['d'\]"):
        select_embeddings(emb, ["a", "b", "c"], ["a", "b", "d"], "emb.safetensors", "val.json")


# --------------------------------------------------------------------------------------------
# Detector pieces
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def detector(tiny_clip):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip[0])
    cfg = TransferConfig(batch_size_per_image=8, positive_fraction=0.5)
    return build_detector(model.visual, torch.randn(3, 64), cfg)


def test_backbone_is_frozen_bn_and_freeze_at_2(detector):
    from torchvision.ops.misc import FrozenBatchNorm2d

    visual = detector.encoder.visual
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in visual.modules())
    assert isinstance(visual.bn1, FrozenBatchNorm2d)
    trainable = {n.split(".")[0] for n, p in visual.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4", "attnpool"}


def test_rois_sampled_with_gt_appended_and_background_last(detector):
    detector.train()
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    proposals = [torch.tensor([[10.0, 10.0, 30.0, 32.0], [40.0, 40.0, 60.0, 60.0]])]  # IoU 0.91 and 0
    boxes, labels, deltas = detector.sample_rois(proposals, [{"boxes": gt, "labels": torch.tensor([2])}])
    order = boxes[0][:, 3].argsort()  # the sampler shuffles: sort by y1 (30 = GT, 32, 60)
    assert torch.equal(boxes[0][order], torch.cat([gt, proposals[0]]))
    assert labels[0][order].tolist() == [2, 2, 3]  # class 2, class 2, background = C = 3
    assert torch.allclose(deltas[0][order][0], torch.zeros(4), atol=1e-6)  # the GT box itself
    # height 22 -> 20: dh = 5 * log(20 / 22) with torchvision's weights (10, 10, 5, 5)
    assert deltas[0][order][1, 3].item() == pytest.approx(5 * math.log(20 / 22), rel=1e-5)


def test_eval_mode_returns_at_most_the_per_image_limit(detector):
    detector.eval()
    detector.detections_per_image = 5
    images = torch.randn(2, 3, 64, 64)
    proposals = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 60.0, 60.0]]), torch.zeros(0, 4)]
    with torch.no_grad():
        out = detector(images, [(64, 64), (64, 64)], proposals)
    assert len(out[0]["boxes"]) <= 5 and len(out[1]["boxes"]) == 0
    assert out[0]["labels"].max() < 3 and (out[0]["scores"] > 0.001).all()


def test_objectness_turns_class_scores_into_their_geometric_mean(detector):
    detector.eval()
    images = torch.randn(1, 3, 64, 64)
    proposals = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 60.0, 60.0]])]
    with torch.no_grad():
        plain = detector(images, [(64, 64)], proposals)[0]
        certain = detector(images, [(64, 64)], proposals, objectness=[torch.ones(2)])[0]
        rejected = detector(images, [(64, 64)], proposals, objectness=[torch.zeros(2)])[0]
    # sqrt(score * 1) is monotonic: the same detections, scores square-rooted
    n = min(len(plain["scores"]), len(certain["scores"]))
    assert n > 0
    top_plain = plain["scores"].sort(descending=True).values[:n]
    assert torch.allclose(certain["scores"].sort(descending=True).values[:n], top_plain.sqrt(), atol=1e-6)
    assert len(rejected["scores"]) == 0  # sqrt(score * 0) is below every threshold


# --------------------------------------------------------------------------------------------
# End to end on EmojiWorld `tiny`
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_clip, tiny_rpn_dir: Path) -> dict:
    """EmojiWorld tiny (16 det-train / 16 val images at 64 px), a tiny random RPN and teacher."""
    root = tmp_path_factory.mktemp("transfer")
    assert emojiworld.main(["--config", "configs/tiny.yaml", f"output_dir={root}"]) == 0
    name, model_config = tiny_clip
    argv = [
        "--config", "configs/tiny.yaml", f"output_dir={root}", "device=cpu",
        f"teacher.model={name}", f"teacher.model_config={model_config}", f"rpn.out_dir={tiny_rpn_dir}",
        "transfer.train_short_sides=[64]", "transfer.test_short_side=64", "transfer.max_side=64",
        "transfer.templates=single", "transfer.batch_size=4", "transfer.steps=3",
        "transfer.batch_size_per_image=16", "transfer.eval_batch_size=8",
        # near-uniform class scores keep every class above the score threshold: the test can then
        # see that the test-time vocabulary (base + novel) replaced the training one (base)
        "transfer.temperature=1", "transfer.detections_per_image=1000",
    ]  # fmt: skip
    return {"root": root, "argv": argv}


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_tiny_transfer_end_to_end(world: dict, capsys):
    assert transfer_pipeline.main(world["argv"]) == 0
    out = world["root"] / "transfer" / "clip"
    metrics = _metrics(out)
    for split in ("all", "base", "novel"):
        assert 0.0 <= metrics[f"AP50_{split}"] <= 1.0
    assert metrics["classes_with_boxes"]["base"] > 0 and metrics["classes_with_boxes"]["novel"] > 0
    assert set(metrics["coco"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}
    assert metrics["train"]["steps"] == 3 and metrics["eval"]["images"] == 16
    detections = json.loads((out / "detections.json").read_text())
    val = json.loads((world["root"] / "emojiworld" / "val.json").read_text())
    assert {d["category_id"] for d in detections} <= {c["id"] for c in val["categories"]}
    novel = {c["id"] for c in val["categories"] if c["split"] == "novel"}
    assert novel & {d["category_id"] for d in detections}  # the test vocabulary includes novel classes
    assert len(detections) <= 16 * 1000
    assert "AP50 all" in capsys.readouterr().out
    # same config again: nothing is recomputed
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert transfer_pipeline.main(world["argv"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_resume_after_stop_gives_the_same_model(world: dict):
    full = world["root"] / "transfer" / "clip" / "model.safetensors"
    if not full.is_file():
        assert transfer_pipeline.main(world["argv"]) == 0
    argv = [*world["argv"], "transfer.tag=resumed"]
    assert transfer_pipeline.main([*argv, "--stop-after", "2"]) == 0
    out = world["root"] / "transfer" / "resumed"
    assert json.loads((out / "checkpoint" / "latest.json").read_text())["step"] == 2
    assert not (out / "metrics.json").exists()
    assert transfer_pipeline.main(argv) == 0
    a, b = safetensors.torch.load_file(str(full)), safetensors.torch.load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_evaluation_only_change_reuses_the_trained_detector(world: dict):
    out = world["root"] / "transfer" / "clip"
    if not (out / "model.safetensors").is_file():
        assert transfer_pipeline.main(world["argv"]) == 0
    model_time = (out / "model.safetensors").stat().st_mtime_ns
    before = _metrics(out)
    scores_before = [d["score"] for d in json.loads((out / "detections.json").read_text())]
    # tiny.yaml inherits demo.yaml's multiply_rpn_score: true
    assert transfer_pipeline.main([*world["argv"], "transfer.multiply_rpn_score=false"]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == model_time  # not trained again
    after = _metrics(out)
    assert after["train"] == before["train"] and after["run_hash"] != before["run_hash"]
    scores_after = [d["score"] for d in json.loads((out / "detections.json").read_text())]
    assert scores_after != scores_before  # evaluated again, without objectness in the scores
    assert transfer_pipeline.main(world["argv"]) == 0  # and back, for the tests that follow


def test_a_test_vocabulary_of_its_own_reuses_the_detector_and_scores_by_name(world: dict, tmp_path: Path):
    out = world["root"] / "transfer" / "clip"
    if not (out / "model.safetensors").is_file():
        assert transfer_pipeline.main(world["argv"]) == 0
    model_time = (out / "model.safetensors").stat().st_mtime_ns
    val = json.loads((world["root"] / "emojiworld" / "val.json").read_text())
    kept = val["categories"][:2]  # two categories of the json, in reverse order, and a distractor
    names = tmp_path / "names.txt"
    names.write_text(f"{kept[1]['name']}\nflying saucer\n{kept[0]['name']}\n")
    assert transfer_pipeline.main([*world["argv"], f"transfer.vocabulary={names}"]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == model_time  # evaluation only
    found = {d["category_id"] for d in json.loads((out / "detections.json").read_text())}
    assert found and found <= {kept[0]["id"], kept[1]["id"]}
    metrics = _metrics(out)
    assert set(metrics["AP50_per_class"]) <= {str(c["id"]) for c in val["categories"]}
    names.write_text("flying saucer\n")
    assert transfer_pipeline.main([*world["argv"], f"transfer.vocabulary={names}"]) == 1
    assert transfer_pipeline.main(world["argv"]) == 0  # and back, for the tests that follow


def test_an_lvis_val_json_is_scored_by_lvis_ap(world: dict, tmp_path: Path, capsys):
    from data_prep import lvis_format

    out, ew = world["root"] / "transfer" / "clip", world["root"] / "emojiworld"
    if not (out / "model.safetensors").is_file():
        assert transfer_pipeline.main(world["argv"]) == 0
    model_time = (out / "model.safetensors").stat().st_mtime_ns
    lvis_json = tmp_path / "val_lvis.json"
    assert lvis_format.main(["--json", str(ew / "val.json"), "--train-json", str(ew / "det_train.json"),
                             "--out", str(lvis_json)]) == 0  # fmt: skip
    capsys.readouterr()
    assert transfer_pipeline.main([*world["argv"], f"transfer.val_json={lvis_json}"]) == 0
    assert "LVIS AP/APr/APc/APf" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == model_time  # evaluation only
    metrics = _metrics(out)
    assert {"AP", "APr", "APc", "APf"} <= set(metrics["lvis"]) and "coco" not in metrics
    assert transfer_pipeline.main(world["argv"]) == 0  # and back, for the tests that follow


def test_bring_your_own_proposals_replace_the_rpn(world: dict, tmp_path: Path, capsys):
    ew = world["root"] / "emojiworld"
    table = {}
    for name in ("det_train.json", "val.json"):
        data = json.loads((ew / name).read_text())
        for im in data["images"]:  # two boxes per image: the whole image and its top-left quarter
            w, h = im["width"], im["height"]
            table[im["file_name"]] = {"boxes": [[0, 0, w, h], [0, 0, w / 2, h / 2]], "scores": [0.9, 0.5]}
    proposals = tmp_path / "proposals.json"
    proposals.write_text(json.dumps(table))
    argv = [*world["argv"], "transfer.tag=byo", f"transfer.precomputed={proposals}", "transfer.steps=1"]
    assert transfer_pipeline.main(argv) == 0
    out = world["root"] / "transfer" / "byo"
    boxes = {tuple(d["bbox"]) for d in json.loads((out / "detections.json").read_text())}
    assert 0 < len(boxes) <= 2 * 16  # at most the two given boxes per val image (moved by box regression)
    some_val_image = json.loads((ew / "val.json").read_text())["images"][0]["file_name"]
    del table[some_val_image]
    proposals.write_text(json.dumps(table))
    assert transfer_pipeline.main([*argv, "transfer.tag=byo-short"]) == 1  # refused before training
    assert (
        f"no proposals for 1 images of {ew / 'val.json'}, e.g. ['{some_val_image}']"
        in capsys.readouterr().err
    )
    assert not (world["root"] / "transfer" / "byo-short" / "checkpoint").exists()


def test_a_detector_folder_in_the_python_api_detects_as_the_stage_did(world: dict):
    from regionclip import RegionCLIP

    out = world["root"] / "transfer" / "clip"
    if not (out / "model.safetensors").is_file():
        assert transfer_pipeline.main(world["argv"]) == 0
    val = json.loads((world["root"] / "emojiworld" / "val.json").read_text())
    first = val["images"][0]
    stage = sorted((d for d in json.loads((out / "detections.json").read_text()) if d["image_id"] == first["id"]),
                   key=lambda d: -d["score"])  # fmt: skip
    api = RegionCLIP.from_pretrained(out, device="cpu", templates="single")
    image = Image.open(world["root"] / "emojiworld" / "images" / first["file_name"])
    found = api(image, candidate_labels=[c["name"] for c in val["categories"]], threshold=0.0, top_k=5)
    names = {c["id"]: c["name"] for c in val["categories"]}
    assert [d["label"] for d in found] == [names[d["category_id"]] for d in stage[:5]]
    assert [d["score"] for d in found] == pytest.approx([d["score"] for d in stage[:5]], abs=1e-4)
    assert [d["box"]["xmin"] for d in found] == [int(d["bbox"][0] + 1e-3) for d in stage[:5]]
    few = api(image, candidate_labels=[names[stage[0]["category_id"]], "flying saucer"], threshold=0.0)
    assert {d["label"] for d in few} <= {names[stage[0]["category_id"]], "flying saucer"}


def test_region_features_of_a_detector_folder_are_what_its_classifier_scores(world: dict):
    from regionclip import RegionCLIP
    from regionclip.models.region import encode_regions

    out = world["root"] / "transfer" / "clip"
    if not (out / "model.safetensors").is_file():
        assert transfer_pipeline.main(world["argv"]) == 0
    val = json.loads((world["root"] / "emojiworld" / "val.json").read_text())
    first = val["images"][0]
    x, y, w, h = next(a["bbox"] for a in val["annotations"] if a["image_id"] == first["id"])
    box = torch.tensor([[x, y, x + w, y + h]])
    image = Image.open(world["root"] / "emojiworld" / "images" / first["file_name"]).convert("RGB")
    api = RegionCLIP.from_pretrained(out, device="cpu", templates="single")
    emb = api.encode_regions(image, box)
    assert emb.shape == (1, api.model.embed_dim) and emb.norm(dim=-1).item() == pytest.approx(1.0, abs=1e-5)
    # the detector's trained weights, not the init CLIP's region embedding of the same box (the old
    # behaviour: identical); the tiny run trains a few steps at a small lr, so they differ a little
    (init,) = encode_regions(api.model.model, [image], [box], api.detector.cfg.test_short_side,
                             api.detector.cfg.max_side, normalize=True)  # fmt: skip
    assert (emb - init.detach().float()).abs().max() > 1e-4
    # the best class probability of the box as the detector's only proposal (no objectness) is the
    # softmax of [cos(emb, class) / T, 0] computed here
    names = [c["name"] for c in val["categories"]]
    text = torch.nn.functional.normalize(api.class_embeddings(names), dim=-1)
    classifier = api.detector.model.classifier
    logits = torch.cat([emb @ text.T, torch.zeros(1, 1)], dim=1) / classifier.temperature
    expected = torch.softmax(logits, dim=1)[0, :-1].max()
    detector, cfg = api.detector.model, api.detector.cfg
    detector.score_thresh = 0.0
    classifier.set_embeddings(text)
    prep = prepare(image, cfg.test_short_side, cfg.max_side, False)
    tensor, sizes = batch_images([prep.image])
    with torch.no_grad():
        (det,) = detector(tensor, sizes, [box * prep.scale])
    assert det["scores"].max().item() == pytest.approx(expected.item(), rel=1e-3)


def test_a_detector_exported_for_the_hub_runs_without_its_training_folders(
    world: dict, tiny_rpn_dir: Path, tmp_path: Path, capsys
):
    import yaml

    from pipelines import export_hub
    from regionclip import RegionCLIP

    trained = world["root"] / "transfer" / "clip"
    if not (trained / "model.safetensors").is_file():
        assert transfer_pipeline.main(world["argv"]) == 0
    # a copy of the detector whose RPN folder is removed after the export
    detector, rpn = tmp_path / "detector", tmp_path / "rpn"
    shutil.copytree(trained, detector)
    shutil.copytree(tiny_rpn_dir, rpn)
    record = json.loads((detector / "model.json").read_text())
    record["config"]["rpn_dir"] = str(rpn)
    (detector / "model.json").write_text(json.dumps(record))
    out = tmp_path / "hub" / "regionclip-tiny-detector"
    assert export_hub.main(["--model", str(detector), "--out", str(out), "--dataset", "emojiworld"]) == 0
    assert "detector with its init CLIP and RPN" in capsys.readouterr().out
    shutil.rmtree(rpn)
    moved = tmp_path / "elsewhere"
    out.rename(moved)  # the record's paths are relative to the folder
    assert sorted(p.name for p in moved.iterdir()) == ["README.md", "init", "metrics.json", "model.json",
                                                      "model.safetensors", "rpn"]  # fmt: skip
    header = yaml.safe_load((moved / "README.md").read_text().split("---")[1])
    assert header["pipeline_tag"] == "zero-shot-object-detection" and header["datasets"] == ["emojiworld"]
    assert "| metrics.json | detector AP50 (all) |" in (moved / "README.md").read_text()

    val = json.loads((world["root"] / "emojiworld" / "val.json").read_text())
    image = Image.open(world["root"] / "emojiworld" / "images" / val["images"][0]["file_name"])
    names = [c["name"] for c in val["categories"]]
    original = RegionCLIP.from_pretrained(trained, device="cpu", templates="single")
    exported = RegionCLIP.from_pretrained(moved, device="cpu", templates="single")
    assert exported(image, names, threshold=0.0, top_k=5) == original(image, names, threshold=0.0, top_k=5)
    (moved / "init" / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(TransferError, match="init"):
        RegionCLIP.from_pretrained(moved, device="cpu")


def test_trainable_rpn_head_trains_and_evaluates(world: dict):
    argv = [*world["argv"], "transfer.tag=rpnhead", "transfer.proposals=trainable",
            "transfer.rpn_anchor_sizes=[16,32]", "transfer.rpn_post_nms_top_n_test=50", "transfer.steps=2"]  # fmt: skip
    assert transfer_pipeline.main(argv) == 0
    metrics = _metrics(world["root"] / "transfer" / "rpnhead")
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_cls"} <= set(metrics["train"]["final_losses"])


def test_ground_truth_boxes_as_proposals_diagnose_recognition(world: dict):
    argv = [*world["argv"], "transfer.tag=diagnosed", "transfer.diagnose_gt_boxes=true", "transfer.steps=1"]
    assert transfer_pipeline.main(argv) == 0
    metrics = _metrics(world["root"] / "transfer" / "diagnosed")
    gt = metrics["gt_boxes"]
    assert all(0.0 <= gt[f"AP50_{s}"] <= 1.0 for s in ("all", "base", "novel"))
    assert set(gt["AP50_per_class"]) == set(metrics["AP50_per_class"])
    trainable = [
        *argv,
        "transfer.proposals=trainable",
        "transfer.rpn_anchor_sizes=[16,32]",
        "transfer.tag=d2",
    ]
    assert transfer_pipeline.main(trainable) == 0
    assert "gt_boxes" not in _metrics(world["root"] / "transfer" / "d2")  # its RPN makes its own proposals


def test_missing_val_image_is_named(world: dict, tmp_path: Path, capsys):
    val = json.loads((world["root"] / "emojiworld" / "val.json").read_text())
    val["images"][3]["file_name"] = "val/not-there.jpg"
    (tmp_path / "val.json").write_text(json.dumps(val))
    argv = [*world["argv"], f"transfer.out_dir={tmp_path / 'run'}", f"transfer.val_json={tmp_path / 'val.json'}",
            "transfer.steps=1"]  # fmt: skip
    assert transfer_pipeline.main(argv) == 1
    err = capsys.readouterr().err
    assert "val.json: 1 of 16 image files do not exist" in err and "not-there.jpg" in err


def test_missing_train_image_is_skipped_and_counted(world: dict, tmp_path: Path):
    train = json.loads((world["root"] / "emojiworld" / "det_train.json").read_text())
    with_boxes = {a["image_id"] for a in train["annotations"]}
    victim = next(i for i in train["images"] if i["id"] in with_boxes)
    victim["file_name"] = "det_train/gone.jpg"
    (tmp_path / "train.json").write_text(json.dumps(train))
    argv = [*world["argv"], f"transfer.out_dir={tmp_path / 'run'}", f"transfer.train_json={tmp_path / 'train.json'}",
            "transfer.steps=1"]  # fmt: skip
    assert transfer_pipeline.main(argv) == 0
    assert _metrics(tmp_path / "run")["train"]["skipped"]["missing_image"] == 1


def test_missing_or_truncated_init_weights_are_one_line(world: dict, tmp_path: Path, capsys):
    argv = [*world["argv"], f"transfer.out_dir={tmp_path / 'run'}", "transfer.steps=1"]
    assert transfer_pipeline.main([*argv, f"transfer.init.pretrained={tmp_path / 'nope.safetensors'}"]) == 1
    assert "error: transfer.init: pretrained=" in capsys.readouterr().err
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a header promised, never written
    assert transfer_pipeline.main([*argv, f"transfer.init.pretrained={cut}"]) == 1
    assert "error: transfer.init: " in capsys.readouterr().err


def test_bad_vocabulary_files_are_refused(world: dict, tmp_path: Path, capsys):
    val = json.loads((world["root"] / "emojiworld" / "val.json").read_text())
    names = [c["name"] for c in val["categories"]]
    save_embeddings(tmp_path / "wide.safetensors", torch.randn(len(names), 32), names, {})
    argv = [*world["argv"], f"transfer.out_dir={tmp_path / 'run'}", "transfer.steps=1"]
    assert transfer_pipeline.main([*argv, f"transfer.class_embeddings={tmp_path / 'wide.safetensors'}"]) == 1
    assert "dimension 32 does not match the model's region embedding dimension 64" in capsys.readouterr().err
    save_embeddings(tmp_path / "short.safetensors", F.normalize(torch.randn(4, 64)), names[:4], {})
    assert transfer_pipeline.main([*argv, f"transfer.class_embeddings={tmp_path / 'short.safetensors'}"]) == 1
    err = capsys.readouterr().err
    assert "class-count mismatch" in err and "holds 4 class embeddings" in err
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def test_frozen_rpn_boxes_are_cut_to_the_top_k_and_scaled():
    def rpn(keys, images):  # highest objectness first, original pixels
        boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 4.0, 8.0], [1.0, 1.0, 3.0, 3.0]])
        return [boxes], [torch.tensor([0.9, 0.5, 0.1])]

    prep = Prepared(torch.zeros(3, 20, 20), torch.zeros(3, 10, 10), scale=2.0)
    boxes, objectness = proposals_for(rpn, ["k"], [prep], 2, torch.device("cpu"))
    assert torch.equal(boxes[0], torch.tensor([[0.0, 0.0, 20.0, 20.0], [4.0, 4.0, 8.0, 16.0]]))
    assert objectness[0].tolist() == pytest.approx([0.9, 0.5])
    assert len(proposals_for(rpn, ["k"], [prep], 0, torch.device("cpu"))[0][0]) == 3
    assert proposals_for(None, ["k"], [prep], 2, torch.device("cpu")) == (None, None)
