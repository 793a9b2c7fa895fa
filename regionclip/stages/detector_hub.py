"""A shareable detector folder: a detector of ``make transfer`` with everything it runs on.

The folder holds ``model.safetensors`` + ``model.json`` (the detector and its record, which names
the parts below relative to the folder), ``init/`` (the CLIP the detector was trained from, in the
open_clip ``local-dir:`` layout: its text tower embeds any class names), ``rpn/`` (the frozen
proposal network; absent for a detector with its own trainable RPN), ``metrics.json`` and a
``README.md`` model card. ``RegionCLIP.from_pretrained(folder)`` loads it anywhere, and it
uploads to the Hub as it is.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from regionclip.config import to_dict
from regionclip.errors import TransferError
from regionclip.models.hub import CARD_FILE, card_header, card_markdown, figures_of
from regionclip.models.loading import model_config_for, weights_id_of
from regionclip.models.rpn import CONFIG_FILE as RPN_CONFIG_FILE
from regionclip.models.rpn import WEIGHTS_FILE as RPN_WEIGHTS_FILE
from regionclip.stages.transfer import METRICS_FILE, MODEL_FILE, MODEL_JSON, load_detector
from regionclip.utils import atomic_folder, read_json

INIT_DIR = "init"
RPN_DIR = "rpn"


def export_detector_hub(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    reports: Sequence[str | os.PathLike] = (),
    datasets: Sequence[str] = (),
    base_model: str = "",
) -> Path:
    """Write the self-contained folder of the detector in ``folder`` to ``out_dir`` (atomically).

    The detector is loaded first, so an export exists only of a detector that runs: its init
    weights unchanged and its RPN in place. ``reports``: further eval / transfer json files whose
    figures go into the card (the detector's own ``metrics.json`` always does).

    Raises:
        TransferError: not a detector folder, or its init CLIP or RPN is gone or changed.
        ValueError: a report is unreadable.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    detector = load_detector(folder, torch.device("cpu"))
    record = read_json(folder / MODEL_JSON, "detector record", TransferError)
    cfg = detector.cfg
    frozen_rpn = cfg.proposals == "frozen"
    sources = ([folder / METRICS_FILE] if (folder / METRICS_FILE).is_file() else []) + [
        Path(r) for r in reports
    ]
    figures = {p.name: figures_of(read_json(p, "report")) for p in sources}
    init_id = detector.text_model.weights_id
    header = card_header("regionclip", base_model or init_id, datasets)
    intro = (
        f"An open-vocabulary Faster R-CNN (CLIP C4 backbone, `{detector.text_model.identity['model']}`) "
        f"trained on {len(record['train_categories'])} base classes from `{init_id}`, made with "
        "regionclip. It detects any names: they are embedded by the text tower in `init/`. "
        "The training config below names the paths of the machine it was trained on."
    )
    usage = [
        "from PIL import Image",
        "from regionclip import RegionCLIP",
        "",
        f"detector = RegionCLIP.from_pretrained('{out_dir.name}')",
        "detector(Image.open('scene.jpg'), candidate_labels=['cat', 'red umbrella'], threshold=0.3)",
    ]
    card = card_markdown(header, out_dir.name, intro, usage, figures, to_dict(cfg))

    with atomic_folder(out_dir) as tmp:
        detector.text_model.save(tmp / INIT_DIR)
        init_cfg = model_config_for(str(tmp / INIT_DIR))
        config = to_dict(cfg)
        config["init"] = {
            **config["init"],
            "model": init_cfg.model,
            "pretrained": INIT_DIR,
            "model_config": "",
        }
        bundled = {"init": INIT_DIR, "rpn": RPN_DIR if frozen_rpn else None}
        if frozen_rpn:
            (tmp / RPN_DIR).mkdir()
            for name in (RPN_CONFIG_FILE, RPN_WEIGHTS_FILE):
                shutil.copyfile(Path(cfg.rpn_dir) / name, tmp / RPN_DIR / name)
            config["rpn_dir"] = RPN_DIR
        exported = {
            **record,
            "config": config,
            "bundled": bundled,
            # the saved init has its own weights id (a file hash); the original is kept beside it
            "init": {
                **record["init"],
                "weights_id": weights_id_of(init_cfg),
                "exported_from": record["init"],
            },
        }
        shutil.copyfile(folder / MODEL_FILE, tmp / MODEL_FILE)
        (tmp / MODEL_JSON).write_text(json.dumps(exported, indent=2) + "\n", encoding="utf-8")
        if (folder / METRICS_FILE).is_file():
            shutil.copyfile(folder / METRICS_FILE, tmp / METRICS_FILE)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    return out_dir
