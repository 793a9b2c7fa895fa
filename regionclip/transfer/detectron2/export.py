"""Write a CLIP ResNet (student, teacher or any open_clip checkpoint) as a Detectron2 checkpoint.

The file is a plain ``{"model": {name: tensor}, "regionclip": {...strings}}`` saved with
``torch.save``: Detectron2's ``DetectionCheckpointer`` reads ``.pth`` files with ``torch.load``
and this one loads with ``weights_only=True`` (nothing to unpickle). Keys follow RegionCLIP's
layout, which is also the one :class:`~regionclip.transfer.detectron2.modeling.CLIPResNetC4`
registers: ``backbone.{conv1..3, bn1..3, layer1..4, attnpool}.*``.

BatchNorm statistics: Detectron2's ``FrozenBatchNorm2d`` fills in
``running_mean = 0`` / ``running_var = 1`` for every FrozenBN whose statistics are *absent*
from a checkpoint without version metadata (a plain dict, as here) — silently, without
reporting them missing. Every BatchNorm's ``running_mean`` and ``running_var`` is therefore
written explicitly (and checked below); ``num_batches_tracked`` is dropped because a FrozenBN
has no such buffer.

No Detectron2 import here: exporting works where Detectron2 is not installed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from regionclip.config import ClipModelConfig, to_dict
from regionclip.data.coco import read_categories
from regionclip.engine.run_cache import file_digest, finished, run_hash
from regionclip.errors import TransferError
from regionclip.models.loading import WEIGHTS_FILE, load_clip
from regionclip.models.towers import require_resnet
from regionclip.text import embed_class_names, embedding_metadata, read_names_file, save_embeddings
from regionclip.utils import atomic_output, atomic_write_json, read_json

FORMAT = "regionclip.detectron2"
FORMAT_VERSION = 1
PREFIX = "backbone."
ARCH_SUFFIX = ".open_clip.json"
EMBEDDINGS_SUFFIX = ".class_embeddings.safetensors"
RECORD_SUFFIX = ".export.json"  # the run-cache record: an export of the same inputs is skipped


def sidecar(out: str | os.PathLike, suffix: str) -> Path:
    """``model.pth`` → ``model<suffix>`` next to it."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(out.suffix) + suffix)


def backbone_state_dict(visual: nn.Module) -> dict[str, Tensor]:
    """``backbone.*`` tensors of a CLIP ResNet tower, fp32, with every BatchNorm's statistics.

    Raises:
        TypeError: ``visual`` is not an open_clip ``ModifiedResNet``.
    """
    require_resnet(visual, "the Detectron2 C4 detector")
    state = {
        PREFIX + k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in visual.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    for name, module in visual.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            for stat in ("running_mean", "running_var"):
                if f"{PREFIX}{name}.{stat}" not in state:
                    raise ValueError(
                        f"BatchNorm {name} has no {stat}: its statistics would be reset on loading"
                    )
    return state


def class_names(jsons: Sequence[str | os.PathLike]) -> list[str]:
    """Category names of COCO jsons, in file order, each once."""
    return list(dict.fromkeys(c["name"] for path in jsons for c in read_categories(path, TransferError)))


def export_student(
    source: ClipModelConfig,
    out: str | os.PathLike,
    class_jsons: Sequence[str | os.PathLike] = (),
    templates: str = "ensemble",
    names_files: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Export ``source`` (a checkpoint folder, state-dict file, tag, or random init) to ``out``.

    Writes, each atomically:

    - ``out`` (``model.pth``): the Detectron2 checkpoint (image tower only);
    - ``model.open_clip.json``: the open_clip architecture, for ``MODEL.CLIP.OPENCLIP_MODEL_CONFIG``;
    - with ``class_jsons`` or ``names_files``: ``model.class_embeddings.safetensors`` (+ ``.txt``),
      the prompt-ensembled embeddings of every category name of those jsons and every name of
      those files (one per line) from the model's own text tower, for ``MODEL.CLIP.TEXT_EMB_PATH``
      (and the names of ``MODEL.CLIP.TEST_VOCABULARY``).

    Returns a summary: paths, tensor / BatchNorm counts and the weights identity (``skipped``:
    these outputs already held an export of the same weights, jsons and templates).

    Raises:
        ValueError: unreadable weights, not a ResNet tower, unreadable json (the message names it).
    """
    out = Path(out)
    weights = Path(source.pretrained) if source.pretrained else None
    if weights is not None and weights.is_dir():
        weights = weights / WEIGHTS_FILE
    this_run = run_hash(
        FORMAT_VERSION, to_dict(source), file_digest(weights), file_digest(source.model_config),
        [file_digest(j) for j in class_jsons], templates, [file_digest(f) for f in names_files],
    )  # fmt: skip
    record_file = sidecar(out, RECORD_SUFFIX)
    record = finished(record_file, this_run)
    if record is not None and all(Path(p).is_file() for p in record["outputs"]):
        return {**record["summary"], "skipped": True}
    loaded = load_clip(source, "cpu")
    try:
        state = backbone_state_dict(loaded.model.visual)
    except TypeError as e:
        raise TransferError(f"{loaded.weights_id}: {e}") from None
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION), **loaded.identity}
    with atomic_output(out) as tmp:
        torch.save({"model": state, "regionclip": meta}, tmp)
    arch_file = sidecar(out, ARCH_SUFFIX)
    atomic_write_json(arch_file, loaded.model_cfg)
    summary: dict[str, Any] = {
        "out": str(out),
        "arch": str(arch_file),
        "tensors": len(state),
        "batchnorms": sum(k.endswith(".running_var") for k in state),
        "weights_id": loaded.weights_id,
    }
    if class_jsons or names_files:
        names = list(
            dict.fromkeys([*class_names(class_jsons), *(n for f in names_files for n in read_names_file(f))])
        )
        emb_file = sidecar(out, EMBEDDINGS_SUFFIX)
        emb = embed_class_names(loaded, names, templates)
        save_embeddings(emb_file, emb, names, embedding_metadata(loaded, templates))
        summary.update(embeddings=str(emb_file), classes=len(names))
    outputs = [str(out), str(arch_file), *([summary["embeddings"]] if "embeddings" in summary else [])]
    atomic_write_json(record_file, {"run_hash": this_run, "outputs": outputs, "summary": summary})
    return {**summary, "skipped": False}


def read_arch(path: str | os.PathLike) -> dict[str, Any]:
    """An open_clip architecture dict from a JSON file: the sidecar written by :func:`export_student`,
    an open_clip model config, or a checkpoint folder's ``open_clip_config.json`` (``model_cfg``)."""
    data = read_json(path, "open_clip architecture", TransferError)
    if isinstance(data, dict) and isinstance(data.get("model_cfg"), dict):
        data = data["model_cfg"]
    if not isinstance(data, dict) or not isinstance(data.get("vision_cfg"), dict) or "embed_dim" not in data:
        raise ValueError(f"open_clip architecture {path}: needs 'embed_dim' and a 'vision_cfg' object")
    return data
