"""load_clip / save_clip_checkpoint on tiny random open_clip models (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import safetensors.torch
import torch
from open_clip.transformer import QuickGELU

from regionclip.config import ClipModelConfig
from regionclip.models import get_model_config, load_clip, save_clip_checkpoint
from regionclip.models.loading import CONFIG_FILE, WEIGHTS_FILE, is_torchscript_archive, model_config_for
from regionclip.utils import sha256_file


@pytest.fixture
def tiny_cfg(tiny_clip) -> ClipModelConfig:
    name, path = tiny_clip
    return ClipModelConfig(model=name, model_config=path)


@pytest.fixture
def tiny_arch(tiny_clip) -> dict:
    return json.loads(Path(tiny_clip[1]).read_text())


@pytest.fixture
def reference(tiny_cfg):
    torch.manual_seed(0)
    return load_clip(tiny_cfg)


def _outputs(loaded_or_model, tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    model = getattr(loaded_or_model, "model", loaded_or_model)
    tokenizer = tokenizer or loaded_or_model.tokenizer
    images = torch.linspace(-1, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokenizer(["a dog", "a red umbrella"]))


def _assert_same(a, b) -> None:
    for x, y in zip(_outputs(a), _outputs(b), strict=True):
        assert torch.equal(x, y)


def test_random_init_identity_and_config(reference, tiny_cfg, tiny_arch):
    assert not reference.model.training
    assert reference.identity["source"] == "random"
    assert reference.identity["sha256"] == ""
    assert reference.weights_id.startswith("RN-tiny-test@random-")
    assert get_model_config(tiny_cfg) == tiny_arch
    assert reference.embed_dim == 64
    assert reference.tokenizer(["a dog"]).shape == (1, 16)  # context_length from the tiny config


def test_checkpoint_dir_round_trip(reference, tiny_cfg, tmp_path, tiny_arch):
    out = reference.save(tmp_path / "ckpt", extra={"step": 7})
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    conf = json.loads((out / CONFIG_FILE).read_text())
    assert conf["model_cfg"] == tiny_arch
    assert conf["preprocess_cfg"]["size"] == 64
    assert conf["regionclip"]["model"] == "RN-tiny-test" and conf["regionclip"]["step"] == 7

    loaded = load_clip(ClipModelConfig(model=tiny_cfg.model, pretrained=str(out)))
    _assert_same(reference, loaded)
    sha = sha256_file(out / WEIGHTS_FILE)
    assert loaded.identity["source"] == "checkpoint_dir"
    assert loaded.identity["sha256"] == sha
    assert loaded.weights_id == f"RN-tiny-test@{sha[:12]}"
    assert loaded.model_cfg == tiny_arch


def test_checkpoint_dir_loads_with_open_clip_local_dir(reference, tmp_path, tiny_arch):
    out = save_clip_checkpoint(reference.model, tiny_arch, tmp_path / "ckpt")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    for x, y in zip(_outputs(model, tokenizer), _outputs(reference), strict=True):
        assert torch.equal(x, y)
    assert preprocess.transforms[0].size == 64


def test_checkpoint_overwrite_replaces_and_leaves_no_temp(reference, tiny_cfg, tmp_path, tiny_arch):
    out = tmp_path / "ckpt"
    save_clip_checkpoint(reference.model, tiny_arch, out, {"model": "RN-tiny-test", "step": 1})
    save_clip_checkpoint(reference.model, tiny_arch, out, {"model": "RN-tiny-test", "step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert json.loads((out / CONFIG_FILE).read_text())["regionclip"]["step"] == 2


def test_a_quick_gelu_checkpoint_records_the_quickgelu_name(tiny_cfg, tmp_path, tiny_arch):
    arch = {**tiny_arch, "quick_gelu": True}  # as get_model_config gives OpenAI-tagged weights
    model = open_clip.create_model(tiny_cfg.model, force_quick_gelu=True)
    out = save_clip_checkpoint(model, arch, tmp_path / "ckpt", {"model": tiny_cfg.model})
    assert json.loads((out / CONFIG_FILE).read_text())["regionclip"]["model"] == "RN-tiny-test-quickgelu"
    for name in ("RN-tiny-test", "RN-tiny-test-quickgelu"):  # either name loads the folder
        loaded = load_clip(ClipModelConfig(model=name, pretrained=str(out)))
        assert any(isinstance(m, QuickGELU) for m in loaded.model.modules())
    assert model_config_for(str(out)).model == "RN-tiny-test-quickgelu"


def test_checkpoint_dir_model_name_mismatch(reference, tmp_path):
    out = reference.save(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="holds model 'RN-tiny-test' but the config says 'RN50'"):
        load_clip(ClipModelConfig(model="RN50", pretrained=str(out)))


def test_folder_without_config_is_rejected(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="has no open_clip_config.json"):
        load_clip(
            ClipModelConfig(
                model=tiny_cfg.model, model_config=tiny_cfg.model_config, pretrained=str(tmp_path)
            )
        )


@pytest.mark.parametrize("layout", ["plain.pt", "wrapped.pth", "weights.safetensors"])
def test_state_dict_files(reference, tiny_cfg, tmp_path, layout):
    state = reference.model.state_dict()
    path = tmp_path / layout
    if layout == "plain.pt":
        torch.save(state, path)
    elif layout == "wrapped.pth":  # DDP-style training checkpoint
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    cfg = ClipModelConfig(model=tiny_cfg.model, model_config=tiny_cfg.model_config, pretrained=str(path))
    loaded = load_clip(cfg)
    _assert_same(reference, loaded)
    assert loaded.identity["source"] == "file"
    assert loaded.identity["sha256"] == sha256_file(path)


class _OpenAIArchive(torch.nn.Module):
    """CLIP's parameters under OpenAI's names, plus the non-weight entries OpenAI's RN50.pt holds."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for key, value in {"input_resolution": 64, "context_length": 16, "vocab_size": 49408}.items():
            self.register_buffer(key, torch.tensor(value))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:'torch.load' received a zip file")
def test_torchscript_archive(tiny_cfg, tmp_path):
    register = load_clip(tiny_cfg)  # registers the tiny config
    torch.manual_seed(1)
    source = open_clip.create_model(register.identity["model"], force_quick_gelu=True).eval()
    traced = torch.jit.trace(_OpenAIArchive(source), torch.zeros(1, 16, dtype=torch.long))
    path = tmp_path / "RN-tiny.pt"
    torch.jit.save(traced, str(path))
    assert is_torchscript_archive(path)
    assert not is_torchscript_archive(Path(__file__))
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.load(path, weights_only=True)  # why this path exists

    cfg = ClipModelConfig(model=tiny_cfg.model, model_config=tiny_cfg.model_config, pretrained=str(path))
    loaded = load_clip(cfg)
    assert loaded.identity["source"] == "torchscript"
    assert loaded.identity["sha256"] == sha256_file(path)
    assert loaded.model_cfg["quick_gelu"] is True
    assert any(isinstance(m, QuickGELU) for m in loaded.model.modules())
    for x, y in zip(_outputs(source, loaded.tokenizer), _outputs(loaded), strict=True):
        assert torch.equal(x, y)


def test_corrupted_files_name_the_file(tiny_cfg, reference, tmp_path):
    garbage = tmp_path / "broken.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    truncated = tmp_path / "cut.safetensors"
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in reference.model.state_dict().items()}, str(truncated)
    )
    truncated.write_bytes(truncated.read_bytes()[:1000])
    for path in (garbage, truncated):
        cfg = ClipModelConfig(model=tiny_cfg.model, model_config=tiny_cfg.model_config, pretrained=str(path))
        with pytest.raises(ValueError, match=path.name):
            load_clip(cfg)


def test_weights_of_another_architecture(tiny_cfg, tiny_vit_clip, tmp_path):
    name, config_path = tiny_vit_clip
    vit = load_clip(ClipModelConfig(model=name, model_config=config_path))
    path = tmp_path / "vit.pt"
    torch.save(vit.model.state_dict(), path)
    cfg = ClipModelConfig(model=tiny_cfg.model, model_config=tiny_cfg.model_config, pretrained=str(path))
    with pytest.raises(
        ValueError, match=r"vit\.pt: cannot load CLIP weights into open_clip model 'RN-tiny-test'"
    ):
        load_clip(cfg)


def test_pretrained_tag_goes_through_open_clip(monkeypatch, tiny_clip):
    calls = []
    real_create = open_clip.create_model

    def fake_create(name, pretrained=None, **kwargs):
        calls.append((name, pretrained, kwargs.get("force_quick_gelu")))
        return real_create(tiny_clip[0])  # no download: a tiny stand-in

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    loaded = load_clip(ClipModelConfig(model="RN50", pretrained="openai"))
    assert calls == [("RN50", "openai", True)]  # OpenAI weights need QuickGELU
    assert loaded.identity == {
        "model": "RN50",
        "pretrained": "openai",
        "source": "tag",
        "sha256": "",
        "weights_id": "RN50@openai",
    }
    assert loaded.model_cfg["quick_gelu"] is True and loaded.model_cfg["embed_dim"] == 1024


def test_failed_tag_download_is_reported(monkeypatch):
    def offline(name, pretrained=None, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': no network")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(ValueError, match="RN50/openai .*no network"):
        load_clip(ClipModelConfig(model="RN50", pretrained="openai"))


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ValueError, match=r"'laion9b'.*known tags: \['openai', 'yfcc15m', 'cc12m'\]"):
        load_clip(ClipModelConfig(model="RN50", pretrained="laion9b"))


def test_config_errors(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip architecture 'RN-nope'"):
        load_clip(ClipModelConfig(model="RN-nope"))
    with pytest.raises(ValueError, match="name the file other.json"):
        load_clip(ClipModelConfig(model="other", model_config=tiny_cfg.model_config))
    bad = tmp_path / "RN-bad.json"
    bad.write_text('{"embed_dim": 8}')
    with pytest.raises(ValueError, match=r"RN-bad\.json: missing keys \['vision_cfg', 'text_cfg'\]"):
        load_clip(ClipModelConfig(model="RN-bad", model_config=str(bad)))
    with pytest.raises(ValueError, match="precision 'fp8'"):
        load_clip(ClipModelConfig(model=tiny_cfg.model, model_config=tiny_cfg.model_config, precision="fp8"))


def test_low_precision_is_gpu_only(tiny_cfg):
    cfg = ClipModelConfig(model=tiny_cfg.model, model_config=tiny_cfg.model_config, precision="bf16")
    loaded = load_clip(cfg, device="cpu")
    assert loaded.precision == "fp32"
    assert next(loaded.model.parameters()).dtype == torch.float32
