"""`python -m data_prep.validate`: per-shard report, totals, exit status."""

from __future__ import annotations

import io
import tarfile

import pytest
from PIL import Image

from data_prep.validate import main
from regionclip.data.shards import ShardWriter, encode_image, image_text_sample


@pytest.fixture
def shards(tmp_path):
    jpg = encode_image(Image.new("RGB", (4, 4), (1, 2, 3)))
    with ShardWriter(tmp_path, "v", maxcount=3) as w:
        for i in range(5):
            w.write(image_text_sample(f"k{i}", jpg, "jpg", f"c {i}", {}))
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in [
            ("b0.jpg", b"junk"),
            ("b0.txt", b"x"),
            ("b1.jpg", jpg),
            ("b1.txt", b" "),
            ("b2.txt", b"t"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tmp_path


def test_bad_samples_are_reported_with_exit_0(shards, capsys):
    assert main([str(shards / "v-{000000..000001}.tar"), str(shards / "bad.tar")]) == 0
    out = capsys.readouterr().out
    assert f"{shards}/v-000000.tar: 3 good, 0 bad" in out
    assert f"{shards}/v-000001.tar: 2 good, 0 bad" in out
    assert f"{shards}/bad.tar: 0 good, 3 bad (bad_image: 1, empty_caption: 1, missing_image: 1)" in out
    assert f"sample 'b0' in {shards}/bad.tar" in out and "sample 'b1'" in out and "sample 'b2'" in out
    assert "validated 3 shards (0 unreadable): 5 good samples, 3 bad" in out


def test_unreadable_shard_exits_1(shards, capsys):
    data = (shards / "v-000000.tar").read_bytes()
    (shards / "v-000000.tar").write_bytes(data[:1000])  # cut inside the first sample's image
    assert main([str(shards / "v-{000000..000001}.tar"), str(shards / "missing.tar")]) == 1
    out = capsys.readouterr().out
    assert f"UNREADABLE {shards}/v-000000.tar: 0 good, 0 bad" in out
    assert f"UNREADABLE {shards}/missing.tar" in out
    assert "validated 3 shards (2 unreadable): 2 good samples, 0 bad" in out


def test_usage_errors_exit_2(capsys):
    assert main(["data/x-{000..001.tar"]) == 2
    assert "Unbalanced braces" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_help_documents_exit_status(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "bad samples alone do not fail" in text and "1 = at least one shard is unreadable" in text
