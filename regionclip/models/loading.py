"""Load and save open_clip CLIP models (teacher, student init, text encoder).

A :class:`~regionclip.config.ClipModelConfig` names an open_clip architecture (``model``), an
optional JSON registering a custom architecture (``model_config``) and the weights
(``pretrained``), which may be

- empty: random initialisation;
- an open_clip pretrained tag (``RN50`` + ``openai``), downloaded by open_clip;
- a local ``.pt``/``.pth``/``.bin``/``.safetensors`` file: a state dict (plain, under
  ``state_dict``, with ``module.`` prefixes), read with ``torch.load(weights_only=True)`` or
  safetensors; or an OpenAI TorchScript archive (``RN50.pt``), read with ``torch.jit.load``;
- a checkpoint folder written by :func:`save_clip_checkpoint` (open_clip's ``local-dir`` format).

Every load returns an ``identity`` (model name, weights source, sha256 of the weights file)
that downstream artifacts record so that stages can refuse mismatched inputs.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import safetensors.torch
import torch

from regionclip.config import ClipModelConfig
from regionclip.utils import atomic_folder, read_json, resolve_device, sha256_file

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Entries OpenAI's TorchScript archives keep next to the weights (see open_clip.openai).
_TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass
class LoadedClip:
    """An open_clip model in eval mode with its tokenizer and where its weights came from.

    ``identity`` holds strings only (it goes into safetensors metadata and manifests):
    ``model``, ``pretrained``, ``source`` (random | tag | file | torchscript | checkpoint_dir),
    ``sha256`` (of the weights file, empty for tags) and a short ``weights_id``.
    """

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    identity: dict[str, str]
    model_cfg: dict[str, Any]  # open_clip architecture dict, as save_clip_checkpoint needs it
    precision: str = "fp32"

    @property
    def weights_id(self) -> str:
        return self.identity["weights_id"]

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    def save(self, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Save as a checkpoint folder, recording the model name and the weights it came from."""
        meta = {"model": self.identity["model"], "init_weights_id": self.weights_id, **(extra or {})}
        return save_clip_checkpoint(self.model, self.model_cfg, out_dir, meta)


# --------------------------------------------------------------------------------------------
# Resolving the config
# --------------------------------------------------------------------------------------------


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript zip (it has ``constants.pkl``; ``torch.save`` archives do not)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in zf.namelist())


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    return bool(path) and (Path(path) / CONFIG_FILE).is_file()


def _source_kind(cfg: ClipModelConfig) -> str:
    """Classify ``cfg.pretrained``: random | checkpoint_dir | torchscript | file | tag."""
    pretrained = cfg.pretrained
    if not pretrained:
        return "random"
    if os.path.isdir(pretrained):
        if not is_checkpoint_dir(pretrained):
            raise ValueError(
                f"{cfg.pretrained}: folder has no {CONFIG_FILE}; not a checkpoint written by regionclip"
            )
        return "checkpoint_dir"
    if os.path.isfile(pretrained):
        return "torchscript" if is_torchscript_archive(pretrained) else "file"
    tags = open_clip.list_pretrained_tags_by_model(cfg.model)
    if open_clip.is_pretrained_cfg(cfg.model, pretrained):
        return "tag"
    raise ValueError(
        f"pretrained={pretrained!r} is neither an existing file/folder nor an open_clip pretrained tag "
        f"for model {cfg.model!r} (known tags: {tags or 'none'})"
    )


def register_model_config(cfg: ClipModelConfig) -> None:
    """Register ``cfg.model_config`` (a JSON architecture) with open_clip under ``cfg.model``.

    open_clip keys its registry by file stem, so the file must be named ``<model>.json``.
    """
    if not cfg.model_config:
        return
    path = Path(cfg.model_config)
    arch = read_json(path, "model_config")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in arch]
    if missing:
        raise ValueError(
            f"model_config {path}: missing keys {missing}; an open_clip config needs embed_dim, vision_cfg, text_cfg"
        )
    if path.stem != cfg.model:
        raise ValueError(
            f"model_config {path} registers architecture {path.stem!r} but model is {cfg.model!r}; name the file {cfg.model}.json"
        )
    if open_clip.get_model_config(cfg.model) != arch:  # re-registering rescans every config file
        open_clip.add_model_config(path)


def get_model_config(cfg: ClipModelConfig) -> dict[str, Any]:
    """The open_clip architecture dict the model of ``cfg`` is built from (what a checkpoint saves)."""
    kind = _source_kind(cfg)
    if kind == "checkpoint_dir":
        return _read_dir_config(Path(cfg.pretrained))["model_cfg"]
    register_model_config(cfg)
    arch = open_clip.get_model_config(cfg.model)
    if arch is None:
        raise ValueError(
            f"unknown open_clip architecture {cfg.model!r}; pass model_config=FILE.json for a custom one "
            f"(known: {', '.join(open_clip.list_models())})"
        )
    if _needs_quick_gelu(cfg, kind):
        arch["quick_gelu"] = True
    return copy.deepcopy(arch)


QUICK_GELU_SUFFIX = "-quickgelu"


def _without_quick_gelu(name: str) -> str:
    return name.removesuffix(QUICK_GELU_SUFFIX)


def recorded_model_name(name: str, model_cfg: dict[str, Any]) -> str:
    """The name to record for a model built from ``model_cfg``: open_clip's QuickGELU name
    (``RN50-quickgelu``) where it applies, since loading by the plain name (``open_clip.create_model(
    "RN50", pretrained=<weights>)``) would silently build ``nn.GELU``."""
    if model_cfg.get("quick_gelu") and not name.endswith(QUICK_GELU_SUFFIX):
        return name + QUICK_GELU_SUFFIX
    return name


def _needs_quick_gelu(cfg: ClipModelConfig, kind: str) -> bool:
    # OpenAI's weights were trained with QuickGELU; open_clip's plain "RN50" config uses nn.GELU.
    if kind == "torchscript":
        return True
    if kind == "tag":
        return bool(open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained).get("quick_gelu", False))
    return False


def _read_dir_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    conf = read_json(path, "checkpoint config")
    if not isinstance(conf, dict) or "model_cfg" not in conf:
        raise ValueError(f"{path}: missing 'model_cfg'; not an open_clip checkpoint config")
    return conf


def weights_id_of(cfg: ClipModelConfig) -> str | None:
    """The ``weights_id`` :func:`load_clip` would give ``cfg``, without building the model; None for
    a random init (only building it, under the same seed, tells that one)."""
    kind = _source_kind(cfg)
    if kind == "random":
        return None
    if kind == "tag":
        return f"{cfg.model}@{cfg.pretrained}"
    weights = Path(cfg.pretrained) / WEIGHTS_FILE if kind == "checkpoint_dir" else Path(cfg.pretrained)
    return f"{cfg.model}@{sha256_file(weights)[:12]}"


def model_config_for(model: str, model_config: str = "", pretrained: str = "") -> ClipModelConfig:
    """The :class:`ClipModelConfig` of a command line's ``--model`` (an open_clip name, a checkpoint
    folder written by this project, or a weights file with ``--model-config``)."""
    path = Path(model)
    if is_checkpoint_dir(path):
        name = _read_dir_config(path).get("regionclip", {}).get("model")
        name = name or (Path(model_config).stem if model_config else path.name)
        return ClipModelConfig(model=name, pretrained=str(path), model_config=model_config)
    if path.is_file():
        if not model_config:
            raise ValueError(
                f"--model {model} is a weights file: pass its architecture as --model-config JSON"
            )
        return ClipModelConfig(model=Path(model_config).stem, pretrained=str(path), model_config=model_config)
    return ClipModelConfig(model=model, pretrained=pretrained, model_config=model_config)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_clip(cfg: ClipModelConfig, device: str | torch.device = "cpu") -> LoadedClip:
    """Build the open_clip model of ``cfg``, load its weights, put it in eval mode on ``device``.

    Raises:
        ValueError: unknown architecture or tag, unreadable/corrupt weights (the message names
            the file), weights that do not fit the architecture, bad precision.
    """
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision {cfg.precision!r} not in {sorted(PRECISIONS)}")
    device = resolve_device(device) if isinstance(device, str) else device
    kind = _source_kind(cfg)
    model_cfg = get_model_config(cfg)
    name = cfg.model
    sha = ""

    quick_gelu = _needs_quick_gelu(cfg, kind)
    if kind == "checkpoint_dir":
        folder = Path(cfg.pretrained)
        saved_name = _read_dir_config(folder).get("regionclip", {}).get("model")
        if saved_name and _without_quick_gelu(saved_name) != _without_quick_gelu(cfg.model):
            raise ValueError(
                f"{folder}: checkpoint holds model {saved_name!r} but the config says {cfg.model!r}; set model={saved_name}"
            )
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise ValueError(f"{folder}: checkpoint folder has no {WEIGHTS_FILE}")
        model = _create_with_weights(f"local-dir:{folder}", None, weights, name)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        sha = sha256_file(weights)
    elif kind == "tag":
        try:
            model = _create(name, pretrained=cfg.pretrained, force_quick_gelu=quick_gelu)
        except RuntimeError as e:
            raise ValueError(
                f"could not load open_clip weights {name}/{cfg.pretrained} (a download is needed): {e}"
            ) from e
        tokenizer = open_clip.get_tokenizer(name)
    else:
        tokenizer = open_clip.get_tokenizer(name)
        if kind == "file":
            model = _create_with_weights(name, cfg.pretrained, Path(cfg.pretrained), name)
            sha = sha256_file(cfg.pretrained)
        elif kind == "torchscript":
            with _quiet_random_init_warning():  # the weights are loaded right after
                model = _create(name, pretrained=None, force_quick_gelu=quick_gelu)
            _load_torchscript(model, Path(cfg.pretrained), name)
            sha = sha256_file(cfg.pretrained)
        else:
            model = _create(name, pretrained=None)

    if kind == "tag":
        weights_id = f"{name}@{cfg.pretrained}"
    elif kind == "random":
        weights_id = f"{name}@random-{state_dict_sha256(model)[:12]}"
    else:
        weights_id = f"{name}@{sha[:12]}"
    identity = {
        "model": name,
        "pretrained": cfg.pretrained,
        "source": kind,
        "sha256": sha,
        "weights_id": weights_id,
    }

    precision = cfg.precision
    if precision != "fp32" and device.type != "cuda":
        log.warning(
            "precision %s requested on %s: keeping fp32 (low precision is used on GPU only)",
            precision,
            device,
        )
        precision = "fp32"
    model = model.to(device=device, dtype=PRECISIONS[precision]).eval()
    return LoadedClip(
        model=model, tokenizer=tokenizer, identity=identity, model_cfg=model_cfg, precision=precision
    )


def _create(name: str, pretrained: str | None, **kwargs: Any) -> torch.nn.Module:
    return open_clip.create_model(name, pretrained=pretrained, precision="fp32", device="cpu", **kwargs)


def _short(e: BaseException, limit: int = 600) -> str:
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def _create_with_weights(
    model_name: str, pretrained: str | None, weights: Path, name: str
) -> torch.nn.Module:
    """open_clip builds the model and loads a state-dict file: ``torch.load(weights_only=True)`` or
    safetensors, unwrapping ``state_dict`` and ``module.``; every failure names the file."""
    try:
        return _create(model_name, pretrained=pretrained)
    except Exception as e:  # torch/safetensors raise many types for corrupt or foreign files
        raise ValueError(
            f"{weights}: cannot load CLIP weights into open_clip model {name!r}: {_short(e)}"
        ) from e


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    root = logging.getLogger()
    filt = _DropRandomInitWarning()
    root.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)


def _load_torchscript(model: torch.nn.Module, path: Path, name: str) -> None:
    """OpenAI TorchScript archive → its state dict → ``model`` (built with QuickGELU)."""
    try:
        with (
            warnings.catch_warnings()
        ):  # torch marks TorchScript deprecated; OpenAI's files remain TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as e:
        raise ValueError(f"{path}: cannot read TorchScript archive: {_short(e)}") from e
    for key in _TORCHSCRIPT_EXTRA_KEYS:
        state_dict.pop(key, None)
    try:
        model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    except Exception as e:
        raise ValueError(
            f"{path}: TorchScript weights do not fit open_clip model {name!r}: {_short(e)}"
        ) from e


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hash of a model's parameters and buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_clip_checkpoint(
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    out_dir: str | os.PathLike,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an open_clip ``local-dir`` checkpoint folder, atomically.

    The folder holds ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg`` and our
    ``regionclip`` metadata = ``extra``; put the model name under ``extra["model"]`` so that
    :func:`load_clip` can check it) and ``open_clip_model.safetensors`` in fp32. It is
    written to a temporary sibling folder and moved into place, so a reader sees either the
    old checkpoint or the new one. ``open_clip.create_model('local-dir:<out_dir>')`` loads it.
    """
    out_dir = Path(out_dir)
    preprocess_cfg = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in open_clip.get_model_preprocess_cfg(model).items()
    }
    extra = dict(extra or {})
    if "model" in extra:
        extra["model"] = recorded_model_name(extra["model"], model_cfg)
    conf = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg, "regionclip": extra}
    state = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }

    with atomic_folder(out_dir) as tmp:
        safetensors.torch.save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir
