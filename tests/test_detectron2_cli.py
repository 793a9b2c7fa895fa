"""The Detectron2 entry point where Detectron2 is not installed: one line, not a traceback."""

from __future__ import annotations

import importlib.util

from pipelines import detectron2_train


def test_without_detectron2_the_entry_point_says_how_to_install_it(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "detectron2" else find_spec(name, *a)
    )
    assert detectron2_train.main(["--config-file", "configs/detectron2/EmojiWorld-C4.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs Detectron2" in err and "make install-detectron2" in err
