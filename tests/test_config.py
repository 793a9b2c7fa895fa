"""Typed config: YAML + inherit + key=value overrides, and errors that name the key and its source."""

from __future__ import annotations

from pathlib import Path

import pytest

from regionclip.config import ConfigError, ExperimentConfig, load_config, section_hash, to_yaml


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_then_file_then_overrides(tmp_path):
    cfg_file = write(tmp_path / "a.yaml", "seed: 3\nshards:\n  maxcount: 10\n")
    cfg = load_config(cfg_file, ["seed=5"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.seed == 5  # override beats file
    assert cfg.shards.maxcount == 10  # file beats default
    assert cfg.shards.maxsize == 1_000_000_000  # default kept
    assert load_config().seed == 0


def test_override_value_may_contain_equals_and_lists(tmp_path):
    cfg = load_config(None, ["name=a=b", "emojiworld.novel=[cat,dog face]"])
    assert cfg.name == "a=b"
    assert cfg.emojiworld.novel == ["cat", "dog face"]


def test_empty_override_is_the_empty_string():
    cfg = load_config(None, ["rpn.val_json=", "emojiworld.font= "])
    assert cfg.rpn.val_json == ""
    assert cfg.emojiworld.font == ""
    with pytest.raises(ConfigError, match="emojiworld.seed"):
        load_config(None, ["emojiworld.seed="])


def test_inherit_chain_relative_to_each_file(tmp_path):
    write(tmp_path / "grand.yaml", "name: g\nseed: 1\nshards:\n  maxcount: 7\n")
    write(tmp_path / "parent.yaml", "inherit: grand.yaml\nseed: 2\nshards:\n  maxsize: 99\n")
    child = write(tmp_path / "sub" / "child.yaml", "inherit: ../parent.yaml\nname: c\n")
    cfg = load_config(child)
    assert (cfg.name, cfg.seed, cfg.shards.maxcount, cfg.shards.maxsize) == ("c", 2, 7, 99)
    assert cfg.output_dir == "runs/c"


def test_inherit_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "inherit: b.yaml\nseed: 1\n")
    write(tmp_path / "b.yaml", "inherit: a.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match="circular 'inherit'"):
        load_config(tmp_path / "a.yaml")


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    cfg_file = write(tmp_path / "bad.yaml", "shards:\n  maxcount: 3\n  bogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file)
    assert "shards.bogus" in str(e.value) and str(cfg_file) in str(e.value)


def test_unknown_key_in_inherited_file_is_reported(tmp_path):
    write(tmp_path / "base.yaml", "nosuchsection:\n  x: 1\n")
    child = write(tmp_path / "child.yaml", "inherit: base.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert "nosuchsection" in str(e.value) and str(child) in str(e.value)  # the file the user passed


def test_unknown_key_in_override_names_the_override():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["seed=1", "shards.nope=4"])
    assert "override 'shards.nope=4'" in str(e.value) and "shards.nope" in str(e.value)


def test_wrong_type_names_key(tmp_path):
    cfg_file = write(tmp_path / "t.yaml", "seed: abc\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file)
    assert "'seed'" in str(e.value) and str(cfg_file) in str(e.value)
    with pytest.raises(ConfigError, match=r"override 'shards.maxcount=many': key 'shards.maxcount'"):
        load_config(None, ["shards.maxcount=many"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="override 'seed': expected key=value"):
        load_config(None, ["seed"])


def test_nonexistent_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="cannot read config file .*missing.yaml"):
        load_config(missing)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path / "list.yaml", "- a\n- b\n"))


def test_interpolation_resolves():
    cfg = load_config(None, ["name=foo"])
    assert cfg.output_dir == "runs/foo"
    assert cfg.emojiworld.out_dir == "runs/foo/emojiworld"
    assert cfg.data.pretrain_shards == "runs/foo/emojiworld/pretrain/pretrain-{000000..000007}.tar"
    cfg = load_config(None, ["output_dir=/data/x"])
    assert cfg.concepts.out_dir == "/data/x/concepts"


def test_broken_interpolation_names_key():
    with pytest.raises(ConfigError, match=r"\(defaults \+ overrides\): key 'data.val_json'.*nope"):
        load_config(None, ["data.val_json=${nope}/v.json"])


def test_yaml_dump_round_trips_and_hash_tracks_changes(tmp_path):
    cfg = load_config(None, ["name=r", "shards.maxcount=5"])
    again = load_config(write(tmp_path / "dump.yaml", to_yaml(cfg)))
    assert again == cfg
    assert section_hash(cfg.shards) == section_hash(again.shards)
    assert section_hash(cfg.shards) != section_hash(load_config(None, ["shards.maxcount=6"]).shards)


def test_real_data_configs_load_without_data():
    root = Path(__file__).resolve().parents[1] / "configs"
    coco = load_config(root / "coco-rn50.yaml")
    assert (coco.teacher.model, coco.teacher.pretrained) == ("RN50", "openai")
    assert coco.pretrain.init == coco.teacher  # the student starts from the teacher
    assert coco.data_prep.source == "coco"
    assert coco.data.pretrain_shards == "runs/coco/data/train-{000000..000118}.tar"
    assert coco.pseudolabel.input_shards == coco.data.pretrain_shards
    assert coco.transfer.rpn_dir == "runs/coco/rpn"
    assert (coco.pretrain.lr, coco.pretrain.batch_size, coco.pseudolabel.temperature) == (0.002, 3, 0.01)
    cc3m = load_config(root / "cc3m-rn50.yaml")
    assert (cc3m.data_prep.source, cc3m.output_dir) == ("generic", "runs/cc3m")
    assert cc3m.teacher == coco.teacher
    assert cc3m.rpn.out_dir == "runs/coco/rpn"  # reuses the COCO base-class RPN
    assert cc3m.transfer.train_json == "runs/coco/data/instances_train_base.json"


def test_console_logging_drops_open_clip_info_lines_but_not_its_warnings(monkeypatch):
    import logging

    import open_clip

    from regionclip.cli import console_logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "filters", list(root.filters))  # the filter goes away with the test
    console_logging()
    console_logging()  # entry points may call it twice: one filter
    assert len(root.filters) == 1

    def record(level: int, pathname: str) -> logging.LogRecord:
        return logging.LogRecord("root", level, pathname, 1, "message", None, None)

    factory = str(Path(open_clip.__file__).parent / "factory.py")
    assert not root.filter(record(logging.INFO, factory))  # "Loaded RN50 model config."
    assert root.filter(record(logging.WARNING, factory))
    assert root.filter(record(logging.INFO, "/somewhere/regionclip/stages/rpn.py"))
