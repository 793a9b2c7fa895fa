"""The one learning-rate schedule of the RPN, the detector transfer and the student, by hand,
built from each stage's own config keys."""

from __future__ import annotations

from dataclasses import replace

import pytest

from regionclip.config import load_config
from regionclip.engine.schedule import Schedule
from regionclip.stages.pretrain import pretrain_schedule
from regionclip.stages.rpn import rpn_schedule
from regionclip.stages.transfer import transfer_schedule


def test_multistep_with_warm_up_from_the_rpn_keys():
    cfg = load_config(None, ["rpn.steps=90", "rpn.warmup_steps=10", "rpn.lr=0.02"]).rpn
    s = rpn_schedule(cfg)
    assert s.lr_at(0) == pytest.approx(0.02 * 0.001)
    assert s.lr_at(5) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert s.lr_at(10) == pytest.approx(0.02)
    assert s.lr_at(60) == pytest.approx(0.002)  # int(0.667 * 90) = 60
    assert s.lr_at(80) == pytest.approx(0.0002)  # int(0.889 * 90) = 80


def test_milestones_round_down_like_detectron2_step_numbers():
    s = Schedule(lr=1.0, steps=40, milestones=(0.667, 0.889), gamma=0.1)
    assert s.lr_at(25) == 1.0 and s.lr_at(26) == pytest.approx(0.1)  # int(26.68) = 26
    assert s.lr_at(34) == pytest.approx(0.1) and s.lr_at(35) == pytest.approx(0.01)  # int(35.56) = 35
    transfer = transfer_schedule(load_config(None, ["transfer.steps=40", "transfer.warmup_steps=0"]).transfer)
    assert [transfer.lr_at(i) / transfer.lr for i in (25, 26, 35)] == pytest.approx([1.0, 0.1, 0.01])


def test_pretrain_multistep_and_cosine():
    p = load_config(
        None,
        [
            "pretrain.lr=0.1",
            "pretrain.warmup_steps=10",
            "pretrain.max_steps=100",
            "pretrain.milestones=[0.5,0.75]",
        ],
    ).pretrain
    s = pretrain_schedule(p)
    assert s.lr_at(0) == pytest.approx(0.1 * 0.001)
    assert s.lr_at(5) == pytest.approx(0.1 * (0.001 * 0.5 + 0.5))  # linear warm-up
    assert s.lr_at(10) == pytest.approx(0.1)
    assert s.lr_at(49) == pytest.approx(0.1)
    assert s.lr_at(50) == pytest.approx(0.01)
    assert s.lr_at(75) == pytest.approx(0.001)
    s = pretrain_schedule(replace(p, schedule="cosine", warmup_steps=0))
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(50) == pytest.approx(0.05)
    assert s.lr_at(100) == pytest.approx(0.0, abs=1e-12)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="schedule 'linear'"):
        Schedule(lr=1.0, steps=10, kind="linear")
