"""Outputs get the mode the process's umask gives a plain ``open`` (0644 under umask 022), also
where the writer itself makes owner-only files (safetensors: 0600, ``mkdtemp``: 0700)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import safetensors.torch
import torch

from regionclip.config import ClipModelConfig
from regionclip.models.loading import load_clip
from regionclip.text import save_embeddings
from regionclip.utils import atomic_output, process_umask


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_process_umask_reads_without_changing_it(umask_027):
    assert process_umask() == 0o027
    assert process_umask() == 0o027


def test_safetensors_through_atomic_output_gets_the_umask_mode(tmp_path: Path, umask_027):
    raw = tmp_path / "raw.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(raw))
    assert _mode(raw) == 0o600  # why the fix exists: the writer ignores the umask
    with atomic_output(tmp_path / "out.safetensors") as tmp:
        safetensors.torch.save_file({"x": torch.zeros(2)}, str(tmp))
    assert _mode(tmp_path / "out.safetensors") == 0o640  # 0666 & ~027


def test_concept_embeddings_and_checkpoint_folders_get_the_umask_mode(tmp_path: Path, tiny_clip, umask_027):
    save_embeddings(tmp_path / "emb.safetensors", torch.randn(3, 4), ["a", "b", "c"], {})
    assert _mode(tmp_path / "emb.safetensors") == 0o640
    assert _mode(tmp_path / "emb.txt") == 0o640

    name, arch = tiny_clip
    out = load_clip(ClipModelConfig(model=name, model_config=arch)).save(tmp_path / "ckpt")
    assert _mode(out) == 0o750  # 0777 & ~027, not mkdtemp's 0700
    assert {p.name: _mode(p) for p in out.iterdir()} == {
        "open_clip_config.json": 0o640,
        "open_clip_model.safetensors": 0o640,
    }
