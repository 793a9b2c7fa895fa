"""End-to-end smoke run of the whole demo chain at toy size (configs/tiny.yaml + tiny-teacher.yaml)
through `python -m pipelines.demo`: data, teacher, RPN, concepts, pseudo-labels (both modes),
student, eval of both, transfer from both, report; then a re-run that must skip every stage."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from pipelines import demo
from regionclip.data.sample_errors import SampleErrors
from regionclip.data.shards import iter_image_text
from regionclip.models.rpn import load_rpn
from regionclip.stages.demo_report import flatten
from regionclip.utils import process_umask

pytestmark = pytest.mark.slow

REPORT_FILES = {"results.json", "RESULTS.md", "pseudolabels.png", "detections.png", "loss_curves.png"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    # test-speed settings on top of the preset: one prompt template, 20 detector proposals per image
    argv = [
        "--config",
        "configs/tiny.yaml",
        f"output_dir={out}",
        "device=cpu",
        "concepts.templates=single",
        "transfer.templates=single",
        "transfer.max_proposals=20",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a busy 2-core machine are several times slower than 1
    try:
        assert demo.main(argv) == 0
        yield out, argv
    finally:
        torch.set_num_threads(threads)
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_every_stage_writes_well_formed_outputs(tiny_run):
    out, _ = tiny_run
    world = out / "emojiworld"
    manifest = json.loads((world / "manifest.json").read_text())
    errors = SampleErrors()
    samples = list(iter_image_text(str(world / manifest["pretrain_shards"]), errors, decode_image=False))
    assert len(samples) == manifest["counts"]["pretrain_images"] == 48
    assert errors.total == 0
    for name in ("det_train.json", "val.json", "categories.json", "preview.png"):
        assert (world / name).stat().st_size > 0

    for run, mode in (("teacher", "image_text"), ("student", "regions"), ("control", "image_text")):
        summary = json.loads((out / run / "summary.json").read_text())
        assert summary["mode"] == mode and summary["steps"] == 3
        assert (out / run / "final" / "open_clip_model.safetensors").is_file()
        logged = [json.loads(line) for line in (out / run / "losses.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logged] == [1, 2, 3]

    assert load_rpn(out / "rpn").training is False

    pool = (out / "concepts" / "concepts.txt").read_text().split("\n")
    pool = [c for c in pool if c]
    with safe_open(str(out / "concepts" / "concept_embeddings.safetensors"), "pt") as f:
        assert f.get_tensor("embeddings").shape[0] == len(pool) > 0
    summary = json.loads((out / "concepts" / "summary.json").read_text())
    assert summary["concepts"] == len(pool)
    assert summary["teacher"]["pretrained"] == str(out / "teacher" / "final")  # the trained teacher

    labelled = sorted((out / "pseudolabels").glob("*.tar"))
    assert len(labelled) == 3  # one output shard per input shard
    for shard in labelled:
        shard_manifest = json.loads(shard.with_name(shard.name.replace(".tar", ".manifest.json")).read_text())
        assert shard_manifest["counts"]["images"] == 16
        assert shard_manifest["mode"] == "pool"
    caption = sorted((out / "pseudolabels-caption-first-shard").glob("*.manifest.json"))
    assert [json.loads(m.read_text())["mode"] for m in caption] == ["caption"]  # the first shard only

    for tag in ("teacher", "control", "student"):
        report = json.loads((out / "eval" / f"{tag}.json").read_text())
        assert report["region_accuracy"]["all"]["n"] > 0
    for tag in ("clip", "control", "regionclip"):
        metrics = json.loads((out / "transfer" / tag / "metrics.json").read_text())
        assert metrics["finished"] and metrics["tag"] == tag
    regionclip_init = json.loads((out / "transfer" / "regionclip" / "metrics.json").read_text())["init"]
    assert regionclip_init["pretrained"] == str(out / "student" / "final")


def test_every_output_has_the_mode_the_umask_gives(tiny_run):
    """Colleagues on a shared machine can read a student, an RPN or a concept pool as the umask says."""
    out, _ = tiny_run
    mask = process_umask()
    modes = {p: p.stat().st_mode & 0o777 for p in out.rglob("*")}
    wrong = {
        str(p.relative_to(out)): oct(m)
        for p, m in modes.items()
        if m != (0o777 if p.is_dir() else 0o666) & ~mask
    }
    assert wrong == {}
    assert any(p.suffix == ".safetensors" for p in modes)


def test_results_have_every_figure(tiny_run, tiny_demo_stages):
    out, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    flat = flatten(results)
    fractions = [
        *(f"region_acc.{m}.{s}" for m in ("teacher", "control", "student") for s in ("all", "base", "novel")),
        *(
            f"zero_shot_ap50.{m}.{s}"
            for m in ("teacher", "control", "student")
            for s in ("all", "base", "novel")
        ),
        *(
            f"ovd_ap50.{m}.{s}"
            for m in ("clip_init", "control_init", "regionclip_init")
            for s in ("all", "base", "novel")
        ),
        "detections_picture.score_threshold",
        "detections_picture.f1",
        "pseudolabel.precision.pool",
        "pseudolabel.precision.caption",
        "concepts.category_recall",
    ]
    for key in fractions:
        assert isinstance(flat[key], float) and 0.0 <= flat[key] <= 1.0, key
    for s in ("all", "base", "novel"):
        d = flat[f"region_acc.student_minus_teacher.{s}"]
        assert d == pytest.approx(flat[f"region_acc.student.{s}"] - flat[f"region_acc.teacher.{s}"])
        d = flat[f"zero_shot_ap50.student_minus_control.{s}"]
        assert d == pytest.approx(flat[f"zero_shot_ap50.student.{s}"] - flat[f"zero_shot_ap50.control.{s}"])
    if "detectron2_regionclip" in tiny_demo_stages:
        assert all(
            0.0 <= flat[f"ovd_ap50.detectron2_student_init.{s}"] <= 1.0 for s in ("all", "base", "novel")
        )
    seconds = results["seconds_per_stage"]
    assert set(seconds) == {*tiny_demo_stages, "total"}
    assert all(math.isfinite(v) and v >= 0 for v in seconds.values())
    assert seconds["total"] == pytest.approx(sum(seconds[s] for s in tiny_demo_stages))
    assert results["seed"] == 0 and results["config"]["name"] == "tiny"
    assert results["skipped_stages"] == []
    assert "first input shard only" in results["pseudolabel"]["scope"]["caption"]

    md = (out / "RESULTS.md").read_text()
    teacher_row = f"| region top-1, teacher | {100 * flat['region_acc.teacher.all']:.1f} |"
    assert teacher_row in md and "| transfer_regionclip |" in md
    for name in ("pseudolabels.png", "detections.png", "loss_curves.png"):
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG" and im.width >= 256 and im.height >= 256


def test_rerun_skips_every_stage(tiny_run, tiny_demo_stages, capsys):
    out, argv = tiny_run
    stage_files = {
        p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name not in REPORT_FILES
    }
    capsys.readouterr()
    assert demo.main(argv) == 0
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name not in REPORT_FILES}
    assert after == stage_files
    assert json.loads((out / "results.json").read_text())["skipped_stages"] == tiny_demo_stages
    n = len(tiny_demo_stages)
    assert f"{n} stages (0 run, {n} up to date)" in capsys.readouterr().out
