"""The shareable Hub export: open_clip local-dir layout, model card header, QuickGELU recorded."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import yaml
from open_clip.transformer import QuickGELU

from pipelines import export_hub as cli
from regionclip.models import save_clip_checkpoint


def test_hub_folder_loads_with_open_clip_and_carries_a_card(tiny_clip, tmp_path, capsys):
    name, config = tiny_clip
    arch = {**json.loads(open(config).read()), "quick_gelu": True}  # an OpenAI-initialised student
    model = open_clip.create_model(name, force_quick_gelu=True)
    final = save_clip_checkpoint(model, arch, tmp_path / "student" / "final",
                                 {"model": name, "init_weights_id": "RN50@openai", "pretrain": {"mode": "regions"}})  # fmt: skip
    (tmp_path / "student" / "config.json").write_text(json.dumps({"lr": 0.002, "batch_size": 96}))
    report = tmp_path / "student.json"
    report.write_text(json.dumps({"region_accuracy": {"all": {"top1": 0.313, "top5": 0.6, "n": 10}},
                                  "zero_shot_detection": {"AP50": {"all": 0.064, "novel": None}}}))  # fmt: skip
    out = tmp_path / "hub" / "regionclip-tiny"
    argv = ["--model", str(final), "--out", str(out), "--report", str(report), "--dataset", "emojiworld"]
    assert cli.main(argv) == 0 and cli.main(argv) == 0  # a second export replaces the first
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "open_clip" and header["pipeline_tag"] == "zero-shot-object-detection"
    assert header["base_model"] == "RN50@openai" and header["datasets"] == ["emojiworld"]
    assert "| student.json | region top1 (all) | 31.3 |" in card
    assert "| student.json | zero-shot AP50 on RPN boxes (all) | 6.4 |" in card and "novel" not in card
    assert "batch_size: 96" in card and "QuickGELU" in card
    assert (
        json.loads((out / "open_clip_config.json").read_text())["regionclip"]["model"] == f"{name}-quickgelu"
    )
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert any(isinstance(m, QuickGELU) for m in loaded.modules())
    for (k, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_a_folder_that_is_no_checkpoint_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main([])
    assert cli.main(["--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "not a checkpoint folder" in capsys.readouterr().err
