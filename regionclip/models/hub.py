"""A shareable model folder: the open_clip Hub layout plus a model card.

The folder holds ``open_clip_config.json`` and ``open_clip_model.safetensors`` (what
``open_clip.create_model_and_transforms('local-dir:<folder>')`` and ``hf-hub:`` load) and a
``README.md`` whose YAML header is the Hugging Face model-card metadata (``library_name``,
``pipeline_tag``, ``base_model``, ``datasets``, ``tags``, ``license``), followed by the training
config and the figures the model reached. The architecture records QuickGELU where the weights
need it (OpenAI-initialised models), so loading by ``local-dir:`` builds the right activation.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from regionclip.models.loading import CONFIG_FILE, WEIGHTS_FILE, is_checkpoint_dir, recorded_model_name
from regionclip.utils import atomic_folder, read_json

CARD_FILE = "README.md"
RUN_CONFIG_FILE = "config.json"  # what pretrain.py writes beside final/


def figures_of(report: Mapping[str, Any]) -> dict[str, float]:
    """The headline figures (%) of one of this project's reports: an eval ``<tag>.json`` (region
    top-1/top-5, zero-shot AP50, LVIS AP) or a transfer ``metrics.json`` (detector AP50)."""
    out: dict[str, float] = {}
    for split, acc in (report.get("region_accuracy") or {}).items():
        if isinstance(acc, Mapping) and "top1" in acc:
            for k in ("top1", "top5"):
                if acc.get(k) is not None:
                    out[f"region {k} ({split})"] = round(100 * acc[k], 1)
    detection = report.get("zero_shot_detection") or {}
    for split, v in (detection.get("AP50") or {}).items():
        if v is not None:
            out[f"zero-shot AP50 on RPN boxes ({split})"] = round(100 * v, 1)
    for k, v in (detection.get("lvis") or {}).items():
        if v is not None and k.startswith("AP"):
            out[f"zero-shot LVIS {k}"] = round(100 * v, 1)
    for split in ("all", "base", "novel"):
        v = report.get(f"AP50_{split}")
        if v is not None:
            out[f"detector AP50 ({split})"] = round(100 * v, 1)
    return out


def card_markdown(
    header: Mapping[str, Any],
    title: str,
    intro: str,
    usage: Sequence[str],
    figures: Mapping[str, Mapping[str, float]],
    run_config: Mapping[str, Any] | None,
) -> str:
    """A model card: the YAML ``header``, ``title``, ``intro``, the ``usage`` code lines, the
    figures per report and the training config."""
    lines = [
        "---",
        yaml.safe_dump(dict(header), sort_keys=False).strip(),
        "---",
        "",
        f"# {title}",
        "",
        intro,
        "",
    ]
    lines += ["```python", *usage, "```", ""]
    if figures:
        lines += ["## Figures", "", "| report | figure | % |", "|---|---|---|"]
        for source, values in figures.items():
            lines += [f"| {source} | {k} | {v:.1f} |" for k, v in values.items()]
        lines.append("")
    if run_config:
        lines += [
            "## Training config",
            "",
            "```yaml",
            yaml.safe_dump(dict(run_config), sort_keys=True).strip(),
            "```",
            "",
        ]
    return "\n".join(lines)


def card_header(
    library: str, base_model: str, datasets: Sequence[str], license_id: str = "mit"
) -> dict[str, Any]:
    """The Hugging Face model-card metadata of this project's exports."""
    return {
        "library_name": library,
        "pipeline_tag": "zero-shot-object-detection",
        "base_model": base_model,
        "datasets": list(datasets),
        "tags": ["regionclip", "clip", "open-vocabulary-detection", "region-text-pretraining"],
        "license": license_id,
    }


def model_card(
    name: str,
    open_clip_config: Mapping[str, Any],
    run_config: Mapping[str, Any] | None,
    figures: Mapping[str, Mapping[str, float]],
    datasets: Sequence[str],
    base_model: str,
    license_id: str = "mit",
) -> str:
    """The ``README.md`` text of a CLIP export: YAML header, how to load, figures, config."""
    meta = open_clip_config.get("regionclip", {})
    intro = (
        f"A region–text pretrained CLIP (architecture `{meta.get('model', '')}`"
        + (", QuickGELU" if open_clip_config.get("model_cfg", {}).get("quick_gelu") else "")
        + f", {meta.get('pretrain', {}).get('mode', 'unknown')} pretraining, initialised from "
        f"`{meta.get('init_weights_id', base_model)}`), made with regionclip."
    )
    usage = [
        "import open_clip",
        f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{name}')",
        "",
        "from regionclip import RegionCLIP  # detection and region features (needs an RPN folder)",
        f"detector = RegionCLIP.from_pretrained('{name}', rpn='path/to/rpn')",
    ]
    header = card_header("open_clip", base_model, datasets, license_id)
    return card_markdown(header, name, intro, usage, figures, run_config)


def export_hub(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    reports: Sequence[str | os.PathLike] = (),
    datasets: Sequence[str] = (),
    base_model: str = "",
) -> Path:
    """Write the Hub folder of the checkpoint folder ``model_dir`` to ``out_dir`` (atomically:
    a temporary sibling moved into place). ``reports``: eval / transfer json files whose figures
    go into the card; the training config is read from ``<model_dir>/../config.json`` if there.

    Raises:
        ValueError: ``model_dir`` is no checkpoint folder, or a report is unreadable.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not is_checkpoint_dir(model_dir) or not (model_dir / WEIGHTS_FILE).is_file():
        raise ValueError(f"{model_dir}: not a checkpoint folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
    config = read_json(model_dir / CONFIG_FILE, "checkpoint config")
    meta = config.setdefault("regionclip", {})
    if "model" in meta:  # a checkpoint saved before names recorded QuickGELU gets the name now
        meta["model"] = recorded_model_name(meta["model"], config.get("model_cfg", {}))
    run_config_path = model_dir.parent / RUN_CONFIG_FILE
    run_config = read_json(run_config_path, "training config") if run_config_path.is_file() else None
    figures = {Path(r).name: figures_of(read_json(r, "report")) for r in reports}
    base = base_model or config.get("regionclip", {}).get("init_weights_id", "")
    card = model_card(out_dir.name, config, run_config, figures, datasets, base)
    with atomic_folder(out_dir) as tmp:
        shutil.copyfile(model_dir / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    return out_dir
