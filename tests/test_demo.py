"""The demo's plan and report: seeds and overrides per stage, results from stage outputs, mean ± std
over seeds, RESULTS.md, loss logs and pictures (hand-computed expectations, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from regionclip import viz
from regionclip.config import load_config
from regionclip.stages import demo
from regionclip.stages.demo import plan_seed, snapshot, split_seeds
from regionclip.stages.demo_report import (
    aggregate,
    build_results,
    flatten,
    mean_std,
    read_loss_log,
    results_markdown,
    unflatten,
)
from regionclip.viz import draw_loss_curves, image_grid


def _value(argv: list[str], key: str) -> str | None:
    """The last ``key=value`` of an argv (later overrides win), or None."""
    found = [a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")]
    return found[-1] if found else None


def test_plan_of_one_seed_of_several(tmp_path: Path, tiny_demo_stages):
    plan = plan_seed(
        "configs/tiny.yaml",
        "configs/tiny-teacher.yaml",
        [f"output_dir={tmp_path}", "pretrain.max_steps=7", "eval.rpn="],
        ["pretrain.lr=0.5"],
        seed=1,
        several=True,
        detectron2="detectron2_regionclip" in tiny_demo_stages,
    )
    assert [s.name for s in plan.stages] == tiny_demo_stages
    assert plan.out_dir == tmp_path / "seed1" and plan.cfg.seed == 1
    stages = {s.name: s for s in plan.stages}
    teacher_final = str(tmp_path / "seed1" / "teacher" / "final")
    student_final = str(tmp_path / "seed1" / "student" / "final")
    # the Detectron2 stages take Detectron2's arguments (their own test below)
    for stage in (s for s in plan.stages if not s.name.startswith("detectron2_")):
        assert _value(stage.argv, "seed") == "1"
        assert _value(stage.argv, "output_dir") == str(tmp_path / "seed1")
        assert _value(stage.argv, "emojiworld.out_dir") == str(tmp_path / "emojiworld")  # shared by seeds
        assert _value(stage.argv, "eval.rpn") == ""  # plain overrides reach every stage
        assert stage.argv[:2] == [
            "--config",
            "configs/tiny-teacher.yaml" if stage.name == "teacher" else "configs/tiny.yaml",
        ]
        if stage.name not in ("data", "teacher"):
            assert _value(stage.argv, "teacher.pretrained") == teacher_final
    # pretrain.* overrides go to the student only; --teacher-set to the teacher only
    assert _value(stages["teacher"].argv, "pretrain.max_steps") is None
    assert _value(stages["teacher"].argv, "pretrain.lr") == "0.5"
    assert _value(stages["student"].argv, "pretrain.max_steps") == "7"
    assert _value(stages["student"].argv, "pretrain.lr") is None
    assert stages["teacher"].outputs == [str(tmp_path / "seed1" / "teacher")]
    assert _value(stages["eval_student"].argv, "eval.model.pretrained") == student_final
    assert _value(stages["eval_teacher"].argv, "eval.model.pretrained") is None  # the teacher, by default
    assert _value(stages["transfer_regionclip"].argv, "transfer.init.pretrained") == student_final
    assert _value(stages["transfer_clip"].argv, "transfer.tag") == "clip"
    # the control: the student's recipe (its pretrain.* overrides too) with the image–text loss alone
    # on the images the student's pseudo-labels come from
    control = stages["control"].argv
    assert _value(control, "pretrain.max_steps") == "7"
    assert _value(control, "pretrain.mode") == "image_text"
    assert _value(control, "pretrain.shards") == plan.cfg.pseudolabel.input_shards
    assert stages["control"].outputs == [str(tmp_path / "seed1" / "control")]
    control_final = str(tmp_path / "seed1" / "control" / "final")
    assert _value(stages["eval_control"].argv, "eval.model.pretrained") == control_final
    assert _value(stages["transfer_control"].argv, "transfer.init.pretrained") == control_final
    other = stages["pseudolabel_caption"].argv
    assert _value(other, "pseudolabel.mode") == "caption"
    assert _value(other, "pseudolabel.input_shards") == str(
        tmp_path / "emojiworld/pretrain/pretrain-000000.tar"
    )
    assert plan.files["other_pseudolabels"] == [
        str(tmp_path / "seed1/pseudolabels-caption-first-shard/pretrain-000000.tar")
    ]
    assert len(plan.files["pseudolabels"]) == 3
    assert plan.files["transfer_regionclip"] == str(tmp_path / "seed1" / "transfer" / "regionclip")


def test_one_seed_runs_in_the_output_dir_and_caption_mode_measures_pool(tmp_path: Path):
    plan = plan_seed(
        "configs/tiny.yaml",
        "configs/tiny-teacher.yaml",
        [f"output_dir={tmp_path}", "pseudolabel.mode=caption"],
        [],
        seed=4,
        several=False,
    )
    assert plan.out_dir == tmp_path and plan.cfg.seed == 4
    assert _value(plan.stages[0].argv, "emojiworld.out_dir") is None
    assert plan.stages[5].name == "pseudolabel_pool"
    assert plan.files["mode"] == "caption" and plan.files["other_mode"] == "pool"


def test_detectron2_stages_export_the_student_and_train_on_this_configs_paths(tmp_path: Path):
    overrides = [f"output_dir={tmp_path}", "transfer.detectron2_config=configs/detectron2/EmojiWorld-C4.yaml"]
    without = plan_seed(
        "configs/tiny.yaml", "configs/tiny-teacher.yaml", overrides, [], seed=3, several=False
    )
    assert not any(s.name.startswith("detectron2") for s in without.stages)  # Detectron2 not importable
    assert "detectron2_metrics" not in without.files
    plan = plan_seed(
        "configs/tiny.yaml",
        "configs/tiny-teacher.yaml",
        overrides,
        [],
        seed=3,
        several=False,
        detectron2=True,
    )
    export, train = plan.stages[-2:]
    assert (export.name, export.entry, train.name, train.entry) == (
        "detectron2_export", "export_detectron2", "detectron2_regionclip", "detectron2_train"
    )  # fmt: skip
    d2 = tmp_path / "detectron2"
    assert export.argv == [
        "--student", str(tmp_path / "student" / "final"), "--out", str(d2 / "student.pth"),
        "--class-json", plan.cfg.transfer.val_json,
    ]  # fmt: skip
    assert train.argv[:3] == ["--config-file", "configs/detectron2/EmojiWorld-C4.yaml", "--resume"]
    opts = dict(zip(train.argv[3::2], train.argv[4::2], strict=True))
    assert opts["MODEL.WEIGHTS"] == str(d2 / "student.pth")
    assert opts["MODEL.CLIP.TEXT_EMB_PATH"] == str(d2 / "student.class_embeddings.safetensors")
    assert opts["MODEL.CLIP.OPENCLIP_MODEL_CONFIG"] == str(d2 / "student.open_clip.json")
    assert opts["MODEL.CLIP.RPN_DIR"] == plan.cfg.rpn.out_dir and opts["SEED"] == "3"
    assert eval(opts["DATASETS.REGISTER_COCO"]) == [
        ["demo_det_train", plan.cfg.data.det_train_json, plan.cfg.data.image_root],
        ["demo_val", plan.cfg.data.val_json, plan.cfg.data.image_root],
    ]
    assert plan.files["detectron2_metrics"] == str(
        d2 / "regionclip" / "inference" / "demo_val" / "metrics.json"
    )
    # the transfer section's recipe (tiny: 3 steps x 4 images at 64 px; demo.yaml's lr, RoIs, scores)
    recipe = {
        "SOLVER.MAX_ITER": "3", "SOLVER.IMS_PER_BATCH": "4", "SOLVER.BASE_LR": "0.001",
        "SOLVER.WARMUP_ITERS": "10", "SOLVER.STEPS": "(2,)",  # int(3 x 0.667) = int(3 x 0.889) = 2: once
        "INPUT.MIN_SIZE_TRAIN": "(64,)", "INPUT.MAX_SIZE_TRAIN": "64", "INPUT.MIN_SIZE_TEST": "64",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "16", "MODEL.CLIP.MAX_PROPOSALS": "30",
        "MODEL.CLIP.CLSS_TEMP": "0.2", "MODEL.CLIP.MULTIPLY_RPN_SCORE": "True",
        "MODEL.ROI_HEADS.NUM_CLASSES": "0", "MODEL.ROI_HEADS.IOU_THRESHOLDS": "[0.5]",
    }  # fmt: skip
    assert {k: opts[k] for k in recipe} == recipe


def test_split_seeds_leaves_overrides_alone():
    assert split_seeds(["--config", "c.yaml", "--seeds", "0", "1", "2", "eval.rpn=", "a=1"]) == (
        [0, 1, 2],
        ["--config", "c.yaml", "eval.rpn=", "a=1"],
    )
    assert split_seeds(["--seeds", "3", "--config", "c.yaml"]) == ([3], ["--config", "c.yaml"])
    assert split_seeds(["--config", "c.yaml"]) == (None, ["--config", "c.yaml"])


def test_mean_and_sample_std_by_hand():
    assert mean_std([0.2, 0.4, 0.6]) == pytest.approx((0.4, 0.2))  # var = (0.04 + 0 + 0.04) / 2
    assert mean_std([3.0]) == (3.0, 0.0)


def test_flatten_round_trip():
    tree = {"a": {"b": 1, "c": {"d": None}}, "e": [1, 2]}
    assert flatten(tree) == {"a.b": 1, "a.c.d": None, "e": [1, 2]}
    assert unflatten(flatten(tree)) == tree


def _results(seed: int, teacher_all: float, student_all: float, total: float, novel=0.1) -> dict:
    return {
        "config": {"name": "demo", "file": "configs/demo.yaml", "teacher_file": "t.yaml", "hash": "h"},
        "seed": seed,
        "region_acc": {
            "teacher": {"all": teacher_all, "base": 0.5, "novel": novel},
            "student": {"all": student_all, "base": 0.6, "novel": novel},
            "student_minus_teacher": {"all": student_all - teacher_all, "base": 0.1, "novel": 0.0},
        },
        "ovd_ap50": {"clip_init": {"all": 0.2, "base": 0.3, "novel": None}},
        "pseudolabel": {"precision": {"pool": 0.7}, "trained_on": "pool", "scope": {"pool": "all"}},
        "concepts": {"category_recall": 1.0},
        "seconds_per_stage": {"data": 1.0, "total": total},
        "skipped_stages": ["data"] if seed else [],
    }


def test_aggregate_over_seeds_by_hand():
    per_seed = {
        2: _results(2, 0.3, 0.5, 30.0),
        0: _results(0, 0.1, 0.2, 10.0),
        1: _results(1, 0.2, 0.2, 20.0),
    }
    agg = aggregate(per_seed)
    assert agg["seeds"] == [0, 1, 2] and "seed" not in agg
    assert agg["region_acc"]["teacher"]["all"] == pytest.approx(0.2)
    assert agg["std"]["region_acc"]["teacher"]["all"] == pytest.approx(0.1)  # (0.01 + 0 + 0.01) / 2
    assert agg["region_acc"]["student"]["all"] == pytest.approx(0.3)
    # differences 0.1, 0.0, 0.2: mean 0.1, std sqrt((0 + 0.01 + 0.01) / 2)
    assert agg["region_acc"]["student_minus_teacher"]["all"] == pytest.approx(0.1)
    assert agg["std"]["region_acc"]["student_minus_teacher"]["all"] == pytest.approx(0.1)
    assert agg["seconds_per_stage"]["total"] == pytest.approx(20.0)
    assert agg["std"]["seconds_per_stage"]["total"] == pytest.approx(10.0)
    assert agg["std"]["region_acc"]["teacher"]["base"] == 0.0
    assert agg["ovd_ap50"]["clip_init"]["novel"] is None  # None in every seed
    assert "novel" not in agg["std"]["ovd_ap50"]["clip_init"]
    per_seed[1]["ovd_ap50"]["clip_init"]["novel"] = 0.5
    assert "novel" not in aggregate(per_seed)["ovd_ap50"]["clip_init"]  # missing in some seeds: no mean
    assert agg["config"]["name"] == "demo" and agg["pseudolabel"]["trained_on"] == "pool"
    assert agg["skipped_stages"] == ["data"]
    assert agg["per_seed"]["2"]["region_acc"]["teacher"]["all"] == 0.3


def test_markdown_of_one_seed_and_of_several():
    one = results_markdown(_results(0, 0.25, 0.5, 12.34))
    assert "| region top-1, teacher | 25.0 | 50.0 | 10.0 |" in one
    assert "| student − teacher (points) | 25.0 | 10.0 | 0.0 |" in one
    assert "| OVD AP50, teacher init (CLIP) | 20.0 | 30.0 | n/a |" in one
    assert "| OVD AP50, student init (RegionCLIP) | n/a | n/a | n/a |" in one
    assert "| label precision, pool mode (all) | 70.0 |" in one
    assert "| total | 12.3 |" in one and "seed 0." in one
    agg = aggregate({0: _results(0, 0.1, 0.2, 10.0), 1: _results(1, 0.3, 0.4, 20.0)})
    several = results_markdown(agg)
    # teacher all: 0.1, 0.3 -> 20.0 ± 14.1 (sqrt(0.02)); seconds 15.0 ± 7.1
    assert "| region top-1, teacher | 20.0 ± 14.1 | 50.0 ± 0.0 | 10.0 ± 0.0 |" in several
    assert "| total | 15.0 ± 7.1 |" in several
    assert "## Per seed" in several and "| region_acc.teacher.all | 10.0 | 30.0 |" in several
    assert "| seconds_per_stage.total | 10.0 | 20.0 |" in several


def test_results_from_stage_outputs(tmp_path: Path, monkeypatch):
    def write(path: Path, obj) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))
        return str(path)

    def acc(a, b, n):
        return {
            "region_accuracy": {
                "all": {"top1": a, "n": 3},
                "base": {"top1": b, "n": 2},
                "novel": {"top1": n, "n": 1},
            }
        }

    (tmp_path / "names.txt").write_text("dog\ncat\n")
    files = {
        "config": "c.yaml",
        "teacher_config": "t.yaml",
        "mode": "pool",
        "other_mode": "caption",
        "pseudolabels": ["pl0.tar", "pl1.tar"],
        "other_pseudolabels": ["cap0.tar"],
        "concept_names": str(tmp_path / "names.txt"),
        "concepts_summary": write(tmp_path / "concepts.json", {"category_recall": {"recall": 0.75}}),
        "eval_teacher": write(tmp_path / "teacher.json", acc(0.5, 0.75, 0.0)),
        "eval_control": write(
            tmp_path / "control.json",
            {**acc(0.25, 0.5, 0.0), "zero_shot_detection": {"AP50": {"all": 0.1, "base": 0.2, "novel": 0.0}}},
        ),
        "eval_student": write(
            tmp_path / "student.json",
            {**acc(1.0, 1.0, 1.0), "zero_shot_detection": {"AP50": {"all": 0.4, "base": 0.2, "novel": 0.5}}},
        ),
        "transfer_clip": str(tmp_path / "clip"),
        "transfer_control": str(tmp_path / "control"),
        "transfer_regionclip": str(tmp_path / "rc"),
    }
    write(tmp_path / "clip" / "metrics.json", {"AP50_all": 0.25, "AP50_base": 0.5, "AP50_novel": 0.0})
    write(tmp_path / "control" / "metrics.json", {"AP50_all": 0.125, "AP50_base": 0.25, "AP50_novel": 0.0})
    write(tmp_path / "rc" / "metrics.json", {"AP50_all": 0.5, "AP50_base": 0.5, "AP50_novel": None})
    measured = {
        ("pl0.tar", "pl1.tar"): (0.6, 200, 10),
        ("pl0.tar",): (0.5, 100, 5),
        ("cap0.tar",): (0.9, 50, 5),
    }

    def fake_precision(shards, names):
        assert names == ["dog", "cat"]
        p, kept, images = measured[tuple(shards)]
        return {"precision": p, "kept": kept, "images": images, "correct": round(p * kept)}

    monkeypatch.setattr("regionclip.stages.demo_report.label_precision", fake_precision)
    plan = demo.SeedPlan(3, tmp_path, load_config("configs/tiny.yaml"), [], files)
    r = build_results(plan, {"a": 1.5, "b": 2.0}, ["a"])
    assert r["seed"] == 3 and r["config"]["name"] == "tiny" and r["config"]["file"] == "c.yaml"
    assert r["region_acc"]["teacher"] == {"all": 0.5, "base": 0.75, "novel": 0.0}
    assert r["region_acc"]["student_minus_teacher"] == {"all": 0.5, "base": 0.25, "novel": 1.0}
    assert r["ovd_ap50"]["regionclip_init"] == {"all": 0.5, "base": 0.5, "novel": None}
    assert r["ovd_ap50"]["regionclip_minus_clip"] == {"all": 0.25, "base": 0.0, "novel": None}
    assert r["region_acc"]["student_minus_control"] == {"all": 0.75, "base": 0.5, "novel": 1.0}
    assert r["ovd_ap50"]["regionclip_minus_control"] == {"all": 0.375, "base": 0.25, "novel": None}
    # the teacher's eval ran without eval.rpn: no zero-shot detection, no difference to it
    assert r["zero_shot_ap50"]["teacher"] == {"all": None, "base": None, "novel": None}
    assert r["zero_shot_ap50"]["student_minus_control"] == pytest.approx(
        {"all": 0.3, "base": 0.0, "novel": 0.5}
    )
    assert r["zero_shot_ap50"]["student_minus_teacher"] == {"all": None, "base": None, "novel": None}
    assert r["pseudolabel"]["precision"] == {"pool": 0.6, "caption": 0.9}
    assert r["pseudolabel"]["precision_first_shard"] == {"pool": 0.5, "caption": 0.9}
    assert r["pseudolabel"]["regions_kept"] == {"pool": 200, "caption": 50}
    assert "first input shard only: 5 images" in r["pseudolabel"]["scope"]["caption"]
    assert r["concepts"]["category_recall"] == 0.75
    assert r["seconds_per_stage"] == {"a": 1.5, "b": 2.0, "total": 3.5}
    assert r["skipped_stages"] == ["a"]
    assert r["ovd_ap50"]["detectron2_student_init"] == {"all": None, "base": None, "novel": None}  # no stage
    files["detectron2_metrics"] = write(
        tmp_path / "d2.json", {"AP50_all": 0.3, "AP50_base": 0.4, "AP50_novel": 0.1}
    )
    r = build_results(plan, {}, [])
    assert r["ovd_ap50"]["detectron2_student_init"] == {"all": 0.3, "base": 0.4, "novel": 0.1}
    (tmp_path / "rc" / "metrics.json").unlink()
    with pytest.raises(ValueError, match="rc/metrics.json.*did its stage run"):
        build_results(plan, {}, [])


def test_loss_log_keeps_the_last_line_of_a_step(tmp_path: Path):
    log = tmp_path / "losses.jsonl"
    lines = [
        {"step": 1, "loss": 3.0, "image_text": 3.0, "lr": 0.1},
        {"step": 2, "loss": 2.0, "image_text": 2.0},
        {"step": 2, "loss": 2.5, "image_text": 2.5},  # after a resume from step 1
        {"step": 3, "loss": float("nan")},
    ]
    log.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 4, "lo')  # killed mid-line
    series = read_loss_log(log)
    assert series == {"loss": [(1, 3.0), (2, 2.5)], "image_text": [(1, 3.0), (2, 2.5)]}


def test_loss_curves_and_grid_pictures():
    series = {"loss": [(1, 3.0), (2, 1.0)], "distill": [(1, 0.5), (2, 0.4)]}
    im = draw_loss_curves([("teacher", series), ("student", {})], size=(200, 120))
    assert im.size == (400, 120)
    colours = {c for _, c in im.getcolors(maxcolors=1 << 16)}
    assert viz.CURVE_COLOURS[0] in colours and viz.CURVE_COLOURS[1] in colours
    # the loss falls from the top left to the bottom right corner of the plot area
    assert im.getpixel((56, 24)) == viz.CURVE_COLOURS[0] or im.getpixel((57, 25)) == viz.CURVE_COLOURS[0]
    cells = [Image.new("RGB", (10, 10), (k, 0, 0)) for k in range(5)]
    grid = image_grid(cells)
    assert grid.size == (30, 20)  # ceil(sqrt(5)) = 3 columns, 2 rows
    assert grid.getpixel((25, 5)) == (2, 0, 0) and grid.getpixel((15, 15)) == (4, 0, 0)
    assert grid.getpixel((25, 15)) == (255, 255, 255)
    with pytest.raises(ValueError):
        image_grid([])


def test_snapshot_sees_changes(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("1")
    (tmp_path / "f").write_text("2")
    paths = [tmp_path / "d", tmp_path / "f", tmp_path / "missing"]
    before = snapshot(paths)
    assert set(before) == {str(tmp_path / "d" / "a"), str(tmp_path / "f")}
    assert snapshot(paths) == before
    (tmp_path / "d" / "b").write_text("3")
    assert snapshot(paths) != before
