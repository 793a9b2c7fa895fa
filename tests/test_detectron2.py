"""Detectron2 plugin: export → load (no missing backbone keys, BN statistics kept), the box head
against RegionEncoder, vocabulary handling, one-line errors, the EmojiWorld recipe learning, and
2 training iterations + evaluation on EmojiWorld. Skipped without Detectron2, except under
REGIONCLIP_REQUIRE_DETECTRON2=1 (CI), where a missing Detectron2 is an error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from data_prep import emojiworld
from pipelines import export_detectron2 as export_cli
from regionclip.config import ClipModelConfig
from regionclip.errors import TransferError
from regionclip.models.loading import load_clip
from regionclip.models.region import RegionEncoder
from regionclip.text import save_embeddings

if os.environ.get("REGIONCLIP_REQUIRE_DETECTRON2") == "1":
    import detectron2  # noqa: F401  (CI installs it: there a skip would hide the plugin's failures)
else:
    pytest.importorskip("detectron2", reason="Detectron2 is not installed: make install-detectron2")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from pipelines import detectron2_train  # noqa: E402
from regionclip.transfer.detectron2 import RegionCLIPTrainer, register_datasets, setup_cfg  # noqa: E402

CONFIG = "configs/detectron2/EmojiWorld-C4.yaml"
# RN-emoji: 3 stem BNs + 4 stages x 1 Bottleneck x (bn1, bn2, bn3, downsample BN)
RN_EMOJI_BATCHNORMS = 3 + 4 * 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_rpn_dir: Path) -> dict:
    """EmojiWorld tiny (64 px, 12 base / 4 novel), a tiny random RPN, and an RN-emoji "student"
    with random BatchNorm statistics, exported with the CLI (weights + class embeddings)."""
    root = tmp_path_factory.mktemp("d2")
    assert emojiworld.main(["--config", "configs/tiny.yaml", f"output_dir={root}"]) == 0

    loaded = load_clip(ClipModelConfig(model="RN-emoji", model_config="configs/models/RN-emoji.json"))
    gen = torch.Generator().manual_seed(1)
    for m in loaded.model.visual.modules():  # statistics that an identity reset would destroy
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    loaded.save(root / "student")
    ew = root / "emojiworld"
    out = root / "export" / "student.pth"
    assert export_cli.main(["--student", str(root / "student"), "--out", str(out),
                            "--class-json", str(ew / "val.json"), "--templates", "single"]) == 0  # fmt: skip
    return {"root": root, "ew": ew, "rpn": tiny_rpn_dir, "student": loaded.model, "ckpt": out}


def _opts(world: dict, out_dir: Path, **extra) -> list[str]:
    ew = world["ew"]
    datasets = [
        ["rc_emoji_train", str(ew / "det_train.json"), str(ew / "images")],
        ["rc_emoji_val", str(ew / "val.json"), str(ew / "images")],
    ]
    opts = {
        "MODEL.WEIGHTS": str(world["ckpt"]),
        "MODEL.CLIP.TEXT_EMB_PATH": str(world["ckpt"]).replace(".pth", ".class_embeddings.safetensors"),
        "MODEL.CLIP.RPN_DIR": str(world["rpn"]),
        "MODEL.ROI_HEADS.NUM_CLASSES": "12",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "16",
        "DATASETS.REGISTER_COCO": repr(datasets),
        "DATASETS.TRAIN": "('rc_emoji_train',)",
        "DATASETS.TEST": "('rc_emoji_val',)",
        "INPUT.MIN_SIZE_TRAIN": "(64,)",
        "INPUT.MAX_SIZE_TRAIN": "64",
        "INPUT.MIN_SIZE_TEST": "64",
        "INPUT.MAX_SIZE_TEST": "64",
        "OUTPUT_DIR": str(out_dir),
        **extra,
    }
    return [x for kv in opts.items() for x in kv]


def _model(world: dict, tmp_path: Path, **extra):
    cfg = setup_cfg(CONFIG, _opts(world, tmp_path, **extra))
    register_datasets(cfg)
    return cfg, build_model(cfg)


def _load(model, path) -> tuple[list[str], list[str]]:
    """DetectionCheckpointer.load, returning the missing and unexpected keys it reports."""
    checkpointer = DetectionCheckpointer(model)
    seen = {}
    load_model = checkpointer._load_model

    def spy(checkpoint):
        seen["keys"] = load_model(checkpoint)
        return seen["keys"]

    checkpointer._load_model = spy
    checkpointer.load(str(path))
    return seen["keys"].missing_keys, seen["keys"].unexpected_keys


def _batchnorms(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))}


# --------------------------------------------------------------------------------------------
# Export and loading
# --------------------------------------------------------------------------------------------


def test_export_is_a_plain_tensor_dict_with_every_batchnorm_statistic(world: dict):
    ckpt = torch.load(world["ckpt"], map_location="cpu", weights_only=True)
    state = ckpt["model"]
    assert all(k.startswith("backbone.") and isinstance(v, torch.Tensor) for k, v in state.items())
    assert not any(k.endswith("num_batches_tracked") for k in state)
    assert sum(k.endswith(".running_var") for k in state) == RN_EMOJI_BATCHNORMS
    assert sum(k.endswith(".running_mean") for k in state) == RN_EMOJI_BATCHNORMS
    assert "backbone.attnpool.positional_embedding" in state and "backbone.layer4.0.bn3.weight" in state
    assert ckpt["regionclip"]["model"] == "RN-emoji"
    arch = json.loads(world["ckpt"].with_name("student.open_clip.json").read_text())
    assert arch["vision_cfg"]["layers"] == [1, 1, 1, 1]
    names = world["ckpt"].with_name("student.class_embeddings.txt").read_text().splitlines()
    assert len(names) == 16  # every category of val.json (12 base + 4 novel)


def test_an_export_of_the_same_inputs_is_skipped_and_new_inputs_export_again(
    world: dict, tmp_path: Path, capsys
):
    ew = world["ew"]
    out = tmp_path / "student.pth"
    argv = ["--student", str(world["root"] / "student"), "--out", str(out), "--class-json", str(ew / "val.json"),
            "--templates", "single"]  # fmt: skip
    assert export_cli.main(argv) == 0
    written = out.stat().st_mtime_ns
    capsys.readouterr()
    assert export_cli.main(argv) == 0
    assert "already holds this export; skipping" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == written
    assert export_cli.main([*argv[:-1], "ensemble"]) == 0  # other templates: other embeddings
    assert "skipping" not in capsys.readouterr().out


def test_checkpoint_loads_without_missing_backbone_keys_and_keeps_bn_statistics(world: dict, tmp_path: Path):
    _, model = _model(world, tmp_path)
    missing, unexpected = _load(model, world["ckpt"])
    # only the new box regressor is not in a pretrained CLIP; the RPN and the vocabulary are not in the state dict
    assert sorted(missing) == [
        "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
    ]
    assert unexpected == []
    student_bns, model_bns = _batchnorms(world["student"].visual), _batchnorms(model.backbone)
    assert student_bns.keys() == model_bns.keys() and len(model_bns) == RN_EMOJI_BATCHNORMS
    for name, bn in student_bns.items():
        assert isinstance(model_bns[name], FrozenBatchNorm2d)
        assert torch.equal(model_bns[name].running_mean, bn.running_mean), name
        assert torch.equal(model_bns[name].running_var, bn.running_var), name
        assert torch.equal(model_bns[name].weight, bn.weight.detach()), name


def test_a_checkpoint_without_bn_statistics_is_silently_reset_to_identity(world: dict, tmp_path: Path):
    """Why the exporter writes every statistic: Detectron2 fills absent FrozenBN
    statistics with 0 / 1 and does not even report them missing."""
    ckpt = torch.load(world["ckpt"], map_location="cpu", weights_only=True)
    ckpt["model"] = {
        k: v for k, v in ckpt["model"].items() if not k.endswith(("running_mean", "running_var"))
    }
    torch.save(ckpt, tmp_path / "no_stats.pth")
    _, model = _model(world, tmp_path)
    missing, _ = _load(model, tmp_path / "no_stats.pth")
    assert not [k for k in missing if k.startswith("backbone.")]
    assert torch.equal(model.backbone.bn1.running_mean, torch.zeros_like(model.backbone.bn1.running_mean))
    assert torch.equal(model.backbone.bn1.running_var, torch.ones_like(model.backbone.bn1.running_var))


def test_backbone_freezing_and_the_rpn_outside_the_state_dict(world: dict, tmp_path: Path):
    _, model = _model(world, tmp_path)
    trainable = {".".join(n.split(".")[:2]) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"backbone.layer2", "backbone.layer3", "backbone.layer4", "backbone.attnpool",
                         "roi_heads.box_predictor"}  # fmt: skip
    assert [n for n, p in model.named_parameters() if n.startswith("roi_heads")] == [
        "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"
    ]  # fmt: skip
    assert not [k for k in model.state_dict() if not k.startswith(("backbone.", "roi_heads."))]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    rpn = model.offline_proposals.network
    assert not rpn.training and not any(p.requires_grad for p in rpn.parameters())
    model.train()
    assert not rpn.training  # the RPN stays in eval mode


def test_box_head_region_embeddings_equal_region_encoder(world: dict, tmp_path: Path):
    _, model = _model(world, tmp_path)
    _load(model, world["ckpt"])
    model.eval()
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 80)
    boxes = [
        torch.tensor([[0.0, 0.0, 80.0, 64.0], [10.5, 4.0, 40.0, 30.25]]),
        torch.tensor([[20.0, 8.0, 60.0, 60.0]]),
    ]
    student = world["student"].eval()
    with torch.no_grad():
        features = model.backbone(images)
        got = model.roi_heads.region_embeddings(features, [Boxes(b) for b in boxes], model.backbone.box_head)
        expected = RegionEncoder(student.visual, pooler_resolution=8)(images, boxes)
    assert got.shape == (3, 128)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_without_an_rpn_folder_a_trainable_detectron2_rpn_proposes(world: dict, tmp_path: Path):
    _, model = _model(
        world, tmp_path, **{"MODEL.CLIP.RPN_DIR": "", "MODEL.ANCHOR_GENERATOR.SIZES": "[[16, 32, 64]]"}
    )
    assert model.offline_proposals is None and model.proposal_generator is not None
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]]))
    inst.gt_classes = torch.tensor([3])
    inputs = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), "instances": inst}]
    model.train()
    with EventStorage():
        losses = model(inputs)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


def test_train_and_test_vocabularies(world: dict, tmp_path: Path):
    _, model = _model(world, tmp_path)
    predictor = model.roi_heads.box_predictor
    x = torch.randn(5, 128)
    predictor.train()
    assert predictor(x)[0].shape == (5, 13)  # 12 base classes + background
    predictor.eval()
    scores, deltas = predictor(x)
    assert scores.shape == (5, 17) and deltas.shape == (5, 4)  # 16 val classes + background; one box
    assert (scores[:, -1] == 0).all()  # background logit fixed at 0
    predictor.set_test_embeddings(torch.randn(3, 128))
    assert predictor(x)[0].shape == (5, 4)


def test_multiply_rpn_score_takes_the_geometric_mean_with_objectness(world: dict, tmp_path: Path):
    proposals = Instances((64, 64), proposal_boxes=Boxes(torch.zeros(1, 4)))
    proposals.objectness_logits = torch.logit(torch.tensor([0.25]))
    # log-probabilities: the softmax gives back 0.64, 0.16 and 0.2 (background)
    predictions = (torch.tensor([[0.64, 0.16, 0.2]]).log(), torch.zeros(1, 4))
    for flag, expected in (("True", [0.4, 0.2, 0.2]), ("False", [0.64, 0.16, 0.2])):
        _, model = _model(world, tmp_path, **{"MODEL.CLIP.MULTIPLY_RPN_SCORE": flag})
        (probs,) = model.roi_heads.box_predictor.predict_probs(predictions, [proposals])
        assert probs[0].tolist() == pytest.approx(expected)  # sqrt(0.64 * 0.25), sqrt(0.16 * 0.25)


def test_class_count_and_dimension_mismatches_are_named(world: dict, tmp_path: Path):
    with pytest.raises(
        TransferError, match=r"class-count mismatch: MODEL.ROI_HEADS.NUM_CLASSES=48 .* has 12 classes"
    ):
        _model(world, tmp_path, **{"MODEL.ROI_HEADS.NUM_CLASSES": "48"})
    names = (world["ew"] / "val.json").read_text()
    names = [c["name"] for c in json.loads(names)["categories"]]
    save_embeddings(tmp_path / "wide.safetensors", torch.randn(len(names), 32), names, {})
    with pytest.raises(
        ValueError, match="dimension 32 does not match the model's region embedding dimension 128"
    ):
        _model(world, tmp_path, **{"MODEL.CLIP.TEXT_EMB_PATH": str(tmp_path / "wide.safetensors")})
    save_embeddings(tmp_path / "few.safetensors", torch.randn(3, 128), names[:3], {})
    with pytest.raises(
        TransferError, match=r"det_train.json has 12 categories but .*few.safetensors holds 3"
    ):
        _model(world, tmp_path, **{"MODEL.CLIP.TEXT_EMB_PATH": str(tmp_path / "few.safetensors")})


def test_missing_images_are_named_at_registration(world: dict, tmp_path: Path):
    val = json.loads((world["ew"] / "val.json").read_text())
    val["images"][2]["file_name"] = "val/not-there.jpg"
    (tmp_path / "val.json").write_text(json.dumps(val))
    cfg = setup_cfg(
        CONFIG,
        [
            "DATASETS.REGISTER_COCO",
            repr([["rc_bad", str(tmp_path / "val.json"), str(world["ew"] / "images")]]),
        ],
    )
    with pytest.raises(TransferError, match=r"val.json: 1 of 16 image files do not exist .*not-there.jpg"):
        register_datasets(cfg)


def _main_error(argv: list[str], capsys) -> str:
    """``detectron2_train.main(argv)`` must fail with exit 1 and one ``error:`` line, no traceback."""
    capsys.readouterr()
    assert detectron2_train.main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith("error: ")]) == 1 and "Traceback" not in err, err
    return next(line for line in lines if line.startswith("error: "))


def test_bad_weights_architecture_and_rpn_are_one_line_naming_the_key(world: dict, tmp_path: Path, capsys):
    def argv(**extra):
        return ["--config-file", CONFIG, *_opts(world, tmp_path, **extra)]

    err = _main_error(argv(**{"MODEL.WEIGHTS": str(tmp_path / "nope.pth")}), capsys)
    assert f"MODEL.WEIGHTS={tmp_path / 'nope.pth'}: no such file" in err
    err = _main_error(
        argv(**{"MODEL.CLIP.OPENCLIP_MODEL": "RN-unregistered", "MODEL.CLIP.OPENCLIP_MODEL_CONFIG": ""}),
        capsys,
    )
    assert "MODEL.CLIP.OPENCLIP_MODEL='RN-unregistered' is not an open_clip architecture" in err
    assert str(world["ckpt"].with_name("student.open_clip.json")) in err  # the file the exporter wrote
    err = _main_error(argv(**{"MODEL.CLIP.RPN_DIR": str(tmp_path / "no_rpn")}), capsys)
    assert f"MODEL.CLIP.RPN_DIR: no RPN at {tmp_path / 'no_rpn'}: no such folder" in err
    err = _main_error(argv(**{"MODEL.CLIP.TEXT_EMB_PATH": str(tmp_path / "none.safetensors")}), capsys)
    assert "MODEL.CLIP.TEXT_EMB_PATH: " in err and "none.safetensors" in err
    err = _main_error(["--config-file", str(tmp_path / "missing.yaml")], capsys)
    assert f"--config-file {tmp_path / 'missing.yaml'}: no such file" in err


def test_emojiworld_recipe_loss_falls_and_detections_come_out(world: dict, tmp_path: Path):
    """The yaml's own recipe (temperature 0.2, 16 RoIs, 30 proposals): 12 seeded iterations.
    RegionCLIP's 0.01 on this CLIP made the loss jump tenfold and left 0 detections."""
    cfg = setup_cfg(CONFIG, _opts(world, tmp_path, **{
        "SEED": "0", "SOLVER.IMS_PER_BATCH": "4", "SOLVER.MAX_ITER": "12", "SOLVER.STEPS": "()",
        "TEST.EVAL_PERIOD": "0", "SOLVER.CHECKPOINT_PERIOD": "1000",
    }))  # fmt: skip
    assert cfg.MODEL.CLIP.CLSS_TEMP == pytest.approx(0.2) and cfg.MODEL.CLIP.MAX_PROPOSALS == 30
    register_datasets(cfg)
    trainer = RegionCLIPTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 12
    assert max(losses) <= 1.1 * losses[0], losses  # no blow-up
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses  # falling
    metrics = json.loads((tmp_path / "inference" / "rc_emoji_val" / "metrics.json").read_text())
    assert metrics["eval"]["images"] == 16 and metrics["eval"]["detections"] > 0


# --------------------------------------------------------------------------------------------
# Training and evaluation, end to end
# --------------------------------------------------------------------------------------------


def test_two_iterations_then_eval_only_from_the_saved_model(world: dict, tmp_path: Path, capsys):
    # near-uniform class scores keep every class above the score threshold: the detections then
    # show that the test vocabulary (base + novel) replaced the training one (base)
    common = {"MODEL.CLIP.CLSS_TEMP": "1.0", "TEST.DETECTIONS_PER_IMAGE": "1000", "SOLVER.IMS_PER_BATCH": "2",
              "SOLVER.MAX_ITER": "2", "SOLVER.STEPS": "()", "SOLVER.WARMUP_ITERS": "1",
              "SOLVER.CHECKPOINT_PERIOD": "1000", "TEST.EVAL_PERIOD": "0"}  # fmt: skip
    argv = ["--config-file", CONFIG, *_opts(world, tmp_path / "train", **common)]
    capsys.readouterr()
    assert detectron2_train.main(argv) == 0
    # the evaluator's summary line reaches the console and log.txt, beside Detectron2's own lines
    summary = "rc_emoji_val: 16 images, "
    assert summary in capsys.readouterr().out
    assert summary in (tmp_path / "train" / "log.txt").read_text()
    out = tmp_path / "train" / "inference" / "rc_emoji_val"
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("all", "base", "novel"):
        assert 0.0 <= metrics[f"AP50_{split}"] <= 1.0
    assert metrics["eval"]["images"] == 16
    assert set(metrics["coco"]) >= {"AP", "AP50", "AP75", "AR100"}
    val = json.loads((world["ew"] / "val.json").read_text())
    novel = {c["id"] for c in val["categories"] if c["split"] == "novel"}
    found = {d["category_id"] for d in json.loads((out / "detections.json").read_text())}
    assert found <= {c["id"] for c in val["categories"]} and found & novel
    final = tmp_path / "train" / "model_final.pth"
    assert final.is_file()

    trained = torch.load(final, map_location="cpu", weights_only=True)["model"]
    eval_opts = _opts(world, tmp_path / "eval", **{**common, "MODEL.WEIGHTS": str(final)})
    assert detectron2_train.main(["--config-file", CONFIG, "--eval-only", *eval_opts]) == 0
    again = json.loads((tmp_path / "eval" / "inference" / "rc_emoji_val" / "metrics.json").read_text())
    assert again["AP50_all"] == pytest.approx(metrics["AP50_all"]) and again["eval"] == metrics["eval"]
    assert not torch.equal(trained["backbone.layer4.0.conv1.weight"],
                           torch.load(world["ckpt"], weights_only=True)["model"]["backbone.layer4.0.conv1.weight"])  # fmt: skip


def test_eval_only_on_an_lvis_json_with_a_vocabulary_of_its_own(world: dict, tmp_path: Path, capsys):
    from data_prep import lvis_format

    ew = world["ew"]
    lvis_json = tmp_path / "val_lvis.json"
    assert lvis_format.main(["--json", str(ew / "val.json"), "--train-json", str(ew / "det_train.json"),
                             "--out", str(lvis_json)]) == 0  # fmt: skip
    val = json.loads((ew / "val.json").read_text())
    novel = next(c for c in val["categories"] if c["split"] == "novel")
    base = next(c for c in val["categories"] if c["split"] == "base")
    names = tmp_path / "names.txt"
    names.write_text(f"{novel['name']}\nflying saucer\n{base['name']}\n")
    ckpt = tmp_path / "export" / "student.pth"  # its embeddings hold the vocabulary's names
    assert export_cli.main(["--student", str(world["root"] / "student"), "--out", str(ckpt),
                            "--names", str(names), "--templates", "single"]) == 0  # fmt: skip
    datasets = [
        ["rc_emoji_train", str(ew / "det_train.json"), str(ew / "images")],
        ["rc_emoji_val_lvis", str(lvis_json), str(ew / "images")],
    ]
    opts = _opts(world, tmp_path / "eval", **{
        "DATASETS.REGISTER_COCO": repr(datasets), "DATASETS.TEST": "('rc_emoji_val_lvis',)",
        "MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH": str(ckpt).replace(".pth", ".class_embeddings.safetensors"),
        "MODEL.CLIP.TEST_VOCABULARY": str(names), "MODEL.CLIP.CLSS_TEMP": "1.0", "TEST.DETECTIONS_PER_IMAGE": "300",
    })  # fmt: skip
    capsys.readouterr()
    assert detectron2_train.main(["--config-file", CONFIG, "--eval-only", *opts]) == 0
    assert "LVIS AP/APr/APc/APf" in capsys.readouterr().out
    out = tmp_path / "eval" / "inference" / "rc_emoji_val_lvis"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"AP", "APr", "APc", "APf"} <= set(metrics["lvis"]) and "coco" not in metrics
    assert metrics["vocabulary"]["distractors"] == ["flying saucer"]
    assert len(metrics["vocabulary"]["categories_missing"]) == len(val["categories"]) - 2
    # near-uniform scores: every name is detected, and the distractor's detections are left out
    found = {d["category_id"] for d in json.loads((out / "detections.json").read_text())}
    assert found == {novel["id"], base["id"]}
