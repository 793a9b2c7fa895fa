"""How one experiment config connects the stages: each function here resolves, for one stage, the
outputs of the stages before it (paths, identities), so that a stage itself reads only its own
config section. Entry points call these; stages never read another stage's section."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from regionclip.config import ExperimentConfig
from regionclip.data.shards import expand_urls
from regionclip.errors import InputError
from regionclip.labeling.labeler import OnlineLabels, build_labeler
from regionclip.models.loading import weights_id_of
from regionclip.stages.pretrain import PretrainInputs
from regionclip.stages.pseudolabel import plan_outputs


def pretrain_inputs(cfg: ExperimentConfig) -> PretrainInputs:
    """Training shards of ``pretrain.shards`` (a folder of ``*.tar`` or webdataset URLs), or by
    default the pseudo-label shards the pseudolabel stage writes (regions mode), else the image–text
    shards of ``data.pretrain_shards``; the teacher identity the pseudo-labels must carry; the
    online labeler (RPN + teacher in the step) when ``pretrain.online``."""
    p = cfg.pretrain
    if p.shards and os.path.isdir(p.shards):
        urls = sorted(str(f) for f in Path(p.shards).glob("*.tar"))
        if not urls:
            raise InputError(f"pretrain.shards={p.shards}: folder holds no .tar shards")
    elif p.shards:
        urls = expand_urls(p.shards)
    elif p.mode == "regions" and not p.online:
        urls = [str(path) for _, path in plan_outputs(cfg.pseudolabel)]
    else:
        urls = expand_urls(cfg.data.pretrain_shards)
    if not urls:
        raise InputError(f"no training shards (pretrain.shards={p.shards!r})")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        hint = " (run `make pseudolabel` first)" if p.mode == "regions" and not p.shards else ""
        raise InputError(f"{len(missing)} training shard(s) missing{hint}: {', '.join(missing[:3])}")
    online = None
    if p.online:

        def online(device: torch.device) -> OnlineLabels:
            return OnlineLabels(
                build_labeler(cfg.pseudolabel, cfg.teacher, cfg.rpn.out_dir, cfg.rpn.precomputed, device)[0]
            )

    # Only stored pseudo-labels name a teacher; the other modes never touch ``cfg.teacher``'s weights.
    labelled = p.mode == "regions" and not p.online
    return PretrainInputs(urls, weights_id_of(cfg.teacher) if labelled else None, online)
