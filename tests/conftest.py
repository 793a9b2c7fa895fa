"""Shared fixtures: tiny random open_clip architectures and a tiny random RPN (no downloads)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import open_clip
import pytest
import safetensors.torch
import torch

from regionclip.config import load_config
from regionclip.models.rpn import build_proposal_network, save_rpn

TINY_TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
# ModifiedResNet (CLIP RN50 layout) at toy size: 64 px input, attnpool grid 2x2.
TINY_RN_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": TINY_TEXT_CFG,
}
TINY_VIT_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": TINY_TEXT_CFG,
}


def _register(directory: Path, name: str, arch: dict) -> tuple[str, str]:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(arch), encoding="utf-8")
    open_clip.add_model_config(path)
    return name, str(path)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """``(model_name, config_path)`` of a tiny ResNet CLIP registered with open_clip.

    Use as ``ClipModelConfig(model=name, model_config=path)`` or
    ``open_clip.create_model(name)``; embed_dim 64, image 64 px, text context 16.
    """
    return _register(tmp_path_factory.mktemp("tiny_clip"), "RN-tiny-test", TINY_RN_CFG)


@pytest.fixture(scope="session")
def tiny_vit_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """``(model_name, config_path)`` of a tiny ViT CLIP (patch 16 → 4x4 tokens at 64 px)."""
    return _register(tmp_path_factory.mktemp("tiny_vit_clip"), "ViT-tiny-test", TINY_VIT_CFG)


# The tiny preset's demo plan, in order (pool mode trains; caption mode is labelled for comparison).
TINY_DEMO_STAGES = [
    "data", "teacher", "rpn", "concepts", "pseudolabel", "pseudolabel_caption", "student", "control",
    "eval_teacher", "eval_control", "eval_student", "transfer_clip", "transfer_control", "transfer_regionclip",
]  # fmt: skip
# with Detectron2 installed (CI), the demo also runs its route on the student
if importlib.util.find_spec("detectron2") is not None:
    TINY_DEMO_STAGES += ["detectron2_export", "detectron2_regionclip"]


@pytest.fixture
def tiny_demo_stages() -> list[str]:
    return list(TINY_DEMO_STAGES)


@pytest.fixture
def one_torch_thread():
    """One thread: fastest at toy size, and the numerics of a torchrun worker (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them so each test builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_rpn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ResNet-18 FPN RPN for 64 px images, saved as `make rpn` would."""
    root = tmp_path_factory.mktemp("rpn")
    overrides = {
        "output_dir": str(root),
        "rpn.backbone": "resnet18",
        "rpn.norm": "bn",
        "rpn.fpn_channels": 16,
        "rpn.fpn_levels": "[2,3,4]",
        "rpn.anchor_sizes": "[8,16,32,64]",
        "rpn.min_size": 64,
        "rpn.max_size": 64,
        "rpn.pre_nms_top_n_test": 100,
        "rpn.post_nms_top_n_test": 20,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()]).rpn
    torch.manual_seed(0)
    save_rpn(build_proposal_network(cfg).eval(), cfg, root / "rpn")
    return root / "rpn"


@pytest.fixture(scope="session")
def tiny_labelling_world(tiny_clip):
    """``make(root, max_size)``: a random tiny teacher (``root/teacher.safetensors``) and a random small
    ResNet-18 RPN (``root/rpn``) for images up to ``max_size`` px; returns a config (as a dict, for
    a JSON/YAML file) with ``output_dir`` = ``root/runs``, the CPU, and the ``teacher`` and ``rpn``
    sections that name them."""
    name, model_config = tiny_clip

    def make(root: Path, max_size: int) -> dict:
        torch.manual_seed(0)
        teacher = open_clip.create_model(name)
        weights = root / "teacher.safetensors"
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights)
        )
        rpn = {
            "out_dir": str(root / "rpn"), "backbone": "resnet18", "norm": "bn", "fpn_levels": [3, 4],
            "fpn_channels": 16, "min_size": 64, "max_size": max_size, "anchor_sizes": [16, 32, 64],
            "pre_nms_top_n_test": 100, "post_nms_top_n_test": 30,
        }  # fmt: skip
        cfg = load_config(None, [f"rpn.{k}={v}".replace(" ", "") for k, v in rpn.items()]).rpn
        torch.manual_seed(0)
        save_rpn(build_proposal_network(cfg), cfg, cfg.out_dir)
        return {
            "teacher": {"model": name, "model_config": model_config, "pretrained": str(weights)},
            "rpn": rpn,
        }

    return make
