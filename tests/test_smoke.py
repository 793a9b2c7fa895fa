"""End-to-end smoke run of the pipeline at toy size (configs/tiny.yaml), through the entry points."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from data_prep import emojiworld
from pipelines import concepts, pseudolabel, rpn
from regionclip.data.shards import SampleErrors, iter_image_text
from regionclip.proposals import load_rpn

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    argv = ["--config", "configs/tiny.yaml", f"output_dir={out}"]
    for stage in (emojiworld, rpn, concepts, pseudolabel):
        assert stage.main(argv) == 0, f"{stage.__name__} failed"
    return out, argv


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

    assert load_rpn(out / "rpn").training is False

    pool = (out / "concepts" / "concepts.txt").read_text().split("\n")
    pool = [c for c in pool if c]
    with safe_open(str(out / "concepts" / "concept_embeddings.safetensors"), "pt") as f:
        assert f.get_tensor("embeddings").shape[0] == len(pool) > 0
    summary = json.loads((out / "concepts" / "summary.json").read_text())
    assert summary["concepts"] == len(pool)

    labelled = sorted((out / "pseudolabels").glob("*.tar"))
    assert len(labelled) == 3  # one output shard per input shard
    for shard in labelled:
        shard_manifest = json.loads(shard.with_name(shard.name.replace(".tar", ".manifest.json")).read_text())
        assert shard_manifest["counts"]["images"] == 16


def test_rerun_skips_finished_stages(tiny_run, capsys):
    out, argv = tiny_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    for stage in (emojiworld, rpn, concepts, pseudolabel):
        assert stage.main(argv) == 0
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before
