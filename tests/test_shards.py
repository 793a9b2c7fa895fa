"""Shard writer/reader: limits, atomicity, determinism, the bad-sample policy, splitting, loaders."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from regionclip.data.shards import (
    SampleErrors,
    ShardWriter,
    drop_errors,
    encode_image,
    error_record,
    image_text_pipeline,
    image_text_sample,
    iter_image_text,
    make_loader,
)


def jpeg(i: int = 0, size: tuple[int, int] = (8, 6)) -> bytes:
    return encode_image(Image.new("RGB", size, (10 * i % 256, 100, 200)))


def good(i: int) -> dict:
    return image_text_sample(f"s{i:06d}", jpeg(i), "jpg", f"caption {i}", {"width": 8, "height": 6})


def write_shards(out: Path, n: int, maxcount: int = 4, prefix: str = "train") -> list[str]:
    with ShardWriter(out, prefix, maxcount=maxcount) as w:
        for i in range(n):
            w.write(good(i))
    return [s.path for s in w.shards]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A tar built by hand, for contents ShardWriter refuses to write."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def read_all(urls, **kwargs) -> tuple[list[dict], SampleErrors]:
    errors = SampleErrors()
    return list(iter_image_text(urls, errors, **kwargs)), errors


def keys(samples) -> list[str]:
    return [s["__key__"] for s in samples]


def error_keys(errors: SampleErrors, reason: str) -> list[str]:
    return [ex["key"] for ex in errors.examples.get(reason, [])]


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def test_round_trip_over_shards_with_count_limit(tmp_path):
    paths = write_shards(tmp_path, 10, maxcount=4)
    assert [Path(p).name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(p).name for p in paths]  # no temp files
    samples, errors = read_all(str(tmp_path / "train-{000000..000002}.tar"))
    assert errors.counts == {}
    assert keys(samples) == [f"s{i:06d}" for i in range(10)]
    assert [s["caption"] for s in samples] == [f"caption {i}" for i in range(10)]
    assert samples[3]["image"].size == (8, 6) and samples[3]["image"].mode == "RGB"
    assert samples[3]["image"].getpixel((0, 0)) == pytest.approx((30, 100, 200), abs=3)
    assert samples[3]["meta"] == {"width": 8, "height": 6}
    counts = [len(tarfile.open(p).getnames()) // 3 for p in paths]
    assert counts == [4, 4, 2]


def test_byte_limit(tmp_path):
    # one sample = 512 header + 5000 bytes padded to 5120 = 5632 bytes; a tar adds 1024 end bytes
    # and is padded to 10240-byte records: 3 samples -> 17920 -> 20480 bytes fit, 4 -> 30720 do not.
    with ShardWriter(tmp_path, "b", maxsize=20480) as w:
        for i in range(7):
            w.write({"__key__": f"k{i}", "bin": b"x" * 5000})
    assert [(s.count, s.size) for s in w.shards] == [(3, 20480), (3, 20480), (1, 10240)]
    assert [Path(s.path).stat().st_size for s in w.shards] == [20480, 20480, 10240]


def test_sample_larger_than_maxsize_gets_its_own_shard(tmp_path):
    with ShardWriter(tmp_path, "b", maxsize=1000) as w:
        for i in range(2):
            w.write({"__key__": f"k{i}", "bin": b"x" * 5000})
    assert [s.count for s in w.shards] == [1, 1]


def test_identical_bytes_when_written_twice(tmp_path):
    a = write_shards(tmp_path / "a", 6, maxcount=4)
    b = write_shards(tmp_path / "b", 6, maxcount=4)
    assert [Path(p).read_bytes() for p in a] == [Path(p).read_bytes() for p in b]


def test_writer_refuses_bad_keys(tmp_path):
    with ShardWriter(tmp_path, "x") as w:
        for key in ("a.b", "", "__x", "d/__x", "/a", "a//b", "a/"):  # "a/b" (a folder) is a fine key
            with pytest.raises(ValueError, match="invalid sample key"):
                w.write({"__key__": key, "txt": "t"})
    assert list(tmp_path.iterdir()) == []  # nothing was opened


def test_abort_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, "t", maxcount=3) as w:
            for i in range(5):
                w.write(good(i))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-000000.tar"]
    samples, errors = read_all(str(tmp_path / "t-000000.tar"))
    assert keys(samples) == ["s000000", "s000001", "s000002"] and errors.counts == {}


def test_unencodable_field_writes_nothing_of_the_sample(tmp_path):
    with ShardWriter(tmp_path, "t") as w:
        w.write(good(0))
        with pytest.raises(TypeError, match="field 'zzz'"):
            w.write({"__key__": "bad", "jpg": jpeg(), "zzz": 123})
        w.write(good(1))
    names = tarfile.open(w.shards[0].path).getnames()
    assert not any(n.startswith("bad.") for n in names)
    assert keys(read_all(w.shards[0].path)[0]) == ["s000000", "s000001"]


# --------------------------------------------------------------------------------------------
# Reader: captions and the bad-sample policy
# --------------------------------------------------------------------------------------------


def test_txt_caption_and_json_captions_list(tmp_path):
    with ShardWriter(tmp_path, "c") as w:
        w.write(image_text_sample("a", jpeg(), "jpg", "  a red dog \n", {"source_id": 7}))
        w.write(
            image_text_sample("b", encode_image(Image.new("L", (4, 4)), "png"), "png", ["x y", " ", "z"], {})
        )
    samples, errors = read_all(w.shards[0].path)
    assert errors.counts == {}
    a, b = samples
    assert (a["caption"], a["captions"], a["meta"]) == ("a red dog", ["a red dog"], {"source_id": 7})
    assert (b["caption"], b["captions"], b["image_ext"]) == ("x y", ["x y", "z"], "png")
    assert b["image"].mode == "RGB"  # grayscale PNG converted


def test_bad_samples_are_skipped_and_counted_with_key(tmp_path):
    ok = jpeg()
    shard = write_tar(
        tmp_path / "bad-000000.tar",
        [
            ("good0.jpg", ok), ("good0.txt", b"first"),
            ("corrupt.jpg", b"\xff\xd8 not really a jpeg"), ("corrupt.txt", b"c"),
            ("empty.jpg", ok), ("empty.txt", b""),
            ("space.jpg", ok), ("space.txt", b"  \n\t "),
            ("noimage.txt", b"caption only"),
            ("good1.jpg", ok), ("good1.json", b'{"captions": ["second"]}'),
            ("dot.x.jpg", ok), ("dot.x.txt", b"d"),
            ("dot.y.jpg", ok), ("dot.y.txt", b"d"),
            ("badjson.jpg", ok), ("badjson.json", b"{not json"), ("badjson.txt", b"j"),
            ("latin.jpg", ok), ("latin.txt", "café".encode("latin-1")),
            ("nocap.jpg", ok),
            ("good2.png", encode_image(Image.new("RGB", (3, 3)), "png")), ("good2.txt", b"third"),
        ],
    )  # fmt: skip
    samples, errors = read_all(shard)
    assert keys(samples) == ["good0", "good1", "good2"]
    assert [s["caption"] for s in samples] == ["first", "second", "third"]
    assert errors.counts == {
        "bad_image": 1,
        "empty_caption": 2,
        "missing_image": 1,
        "key_with_dot": 2,
        "bad_json": 1,
        "bad_caption_encoding": 1,
        "missing_caption": 1,
    }
    assert error_keys(errors, "bad_image") == ["corrupt"]
    assert error_keys(errors, "empty_caption") == ["empty", "space"]
    assert error_keys(errors, "missing_image") == ["noimage"]
    assert error_keys(errors, "key_with_dot") == ["dot.x", "dot.y"]
    assert error_keys(errors, "bad_json") == ["badjson"]
    assert error_keys(errors, "bad_caption_encoding") == ["latin"]
    assert error_keys(errors, "missing_caption") == ["nocap"]
    assert errors.total == 9 and errors.unreadable_shards == []
    assert all(ex["url"] == shard for exs in errors.examples.values() for ex in exs)


def test_truncated_shard_keeps_complete_samples(tmp_path):
    paths = write_shards(tmp_path, 12, maxcount=4)  # s0-3 | s4-7 | s8-11
    with tarfile.open(paths[1]) as tar:
        cut = tar.getmember("s000006.jpg").offset_data + 10
    data = Path(paths[1]).read_bytes()
    Path(paths[1]).write_bytes(data[:cut])
    samples, errors = read_all(paths)
    # s5 is complete (s6 had started); s6 is cut and s7 never arrives
    assert keys(samples) == [f"s{i:06d}" for i in range(12) if i not in (6, 7)]
    assert errors.counts == {"unreadable_shard": 1}
    assert errors.unreadable_shards == [paths[1]]
    assert "after 2 complete samples" in errors.examples["unreadable_shard"][0]["detail"]


def test_missing_shard_is_reported_and_others_read(tmp_path):
    paths = write_shards(tmp_path, 8, maxcount=4)
    missing = str(tmp_path / "nope-000000.tar")
    samples, errors = read_all([paths[0], missing, paths[1]])
    assert keys(samples) == [f"s{i:06d}" for i in range(8)]
    assert errors.counts == {"unreadable_shard": 1} and errors.unreadable_shards == [missing]
    assert "FileNotFoundError" in errors.examples["unreadable_shard"][0]["detail"]
    assert errors.total == 0


def test_pipe_url(tmp_path):
    (path,) = write_shards(tmp_path, 3)
    samples, errors = read_all(f"pipe:cat {path}")
    assert keys(samples) == ["s000000", "s000001", "s000002"] and errors.counts == {}


def test_duplicate_field_is_a_bad_sample(tmp_path):
    ok = jpeg()
    shard = write_tar(
        tmp_path / "d.tar", [("a.jpg", ok), ("a.txt", b"x"), ("a.txt", b"y"), ("b.jpg", ok), ("b.txt", b"z")]
    )
    samples, errors = read_all(shard)
    assert keys(samples) == ["b"] and errors.counts == {"duplicate_field": 1}
    assert error_keys(errors, "duplicate_field") == ["a"]


def test_no_shards_is_an_error():
    with pytest.raises(ValueError, match="no shards"):
        image_text_pipeline([])


# --------------------------------------------------------------------------------------------
# Splitting, shuffling, resampling, loaders
# --------------------------------------------------------------------------------------------


def test_split_by_node_gives_disjoint_ranks(tmp_path, monkeypatch):
    write_shards(tmp_path, 16, maxcount=4)  # 4 shards
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        errors = SampleErrors()
        seen[rank] = keys(
            drop_errors(image_text_pipeline(str(tmp_path / "train-{000000..000003}.tar")), errors)
        )
    # rank r reads shards r, r + 2
    assert seen[0] == [f"s{i:06d}" for i in (0, 1, 2, 3, 8, 9, 10, 11)]
    assert seen[1] == [f"s{i:06d}" for i in (4, 5, 6, 7, 12, 13, 14, 15)]


def test_shuffle_buffer_is_a_seeded_permutation(tmp_path):
    write_shards(tmp_path, 12, maxcount=4)
    url = str(tmp_path / "train-{000000..000002}.tar")
    a = keys(read_all(url, shuffle_buffer=5, seed=3, decode_image=False)[0])
    b = keys(read_all(url, shuffle_buffer=5, seed=3, decode_image=False)[0])
    assert a == b
    assert sorted(a) == [f"s{i:06d}" for i in range(12)] and a != sorted(a)


def test_resampled_with_epoch_is_bounded_and_seeded(tmp_path):
    write_shards(tmp_path, 12, maxcount=4)
    url = str(tmp_path / "train-{000000..000002}.tar")

    def draw(seed: int) -> list[str]:
        pipe = image_text_pipeline(url, resampled=True, seed=seed, decode_image=False).with_epoch(40)
        return keys(drop_errors(pipe, SampleErrors()))

    a, b, c = draw(1), draw(1), draw(2)
    assert len(a) == 40 and a == b and a != c
    assert set(a) <= {f"s{i:06d}" for i in range(12)}
    # shards come whole: each run of 4 is one shard's samples in order
    ids = [int(k[1:]) for k in a]
    assert all(ids[j : j + 4] == list(range(ids[j], ids[j] + 4)) and ids[j] % 4 == 0 for j in range(0, 40, 4))
    pipe = image_text_pipeline(url, resampled=True, seed=1, decode_image=False).with_epoch(40)
    assert keys(pipe) == a and keys(pipe) != a  # the next epoch draws other shards


def test_loader_with_two_workers_keeps_errors_and_every_good_sample(tmp_path):
    paths = write_shards(tmp_path, 8, maxcount=4)
    bad = write_tar(
        tmp_path / "bad.tar", [("x.jpg", b"junk"), ("x.txt", b"t"), ("y.jpg", jpeg()), ("y.txt", b"ok")]
    )
    urls = [paths[0], bad, str(tmp_path / "missing.tar"), paths[1]]
    loader = make_loader(
        image_text_pipeline(urls), num_workers=2, transform=lambda s: {**s, "size": s["image"].size}
    )
    errors = SampleErrors()
    samples = list(drop_errors(loader, errors))
    assert sorted(keys(samples)) == sorted([f"s{i:06d}" for i in range(8)] + ["y"])
    assert {s["size"] for s in samples} == {(8, 6)}
    assert errors.counts == {"bad_image": 1, "unreadable_shard": 1}
    assert error_keys(errors, "bad_image") == ["x"]


def test_loader_with_more_workers_than_shards(tmp_path):
    paths = write_shards(tmp_path, 3, maxcount=3)  # 1 shard, 2 workers: one worker gets nothing
    errors = SampleErrors()
    loader = make_loader(image_text_pipeline(paths, decode_image=False), num_workers=2)
    assert keys(drop_errors(loader, errors)) == ["s000000", "s000001", "s000002"]
    assert errors.counts == {}


def test_sample_errors_summary_merge_and_report():
    a = SampleErrors(max_examples=1)
    a.add(error_record("bad_image", "k1", "u.tar", "junk"))
    a.add(error_record("bad_image", "k2", "u.tar", "junk"))
    assert a.summary() == "skipped 2 bad samples (bad_image: 2)"
    b = SampleErrors()
    b.add(error_record("unreadable_shard", url="v.tar", detail="gone"))
    a.update(b)
    assert a.total == 2 and a.unreadable_shards == ["v.tar"]
    assert a.report_lines() == [
        "skipped 2 bad samples, 1 unreadable shards (bad_image: 2, unreadable_shard: 1)",
        "  bad_image: 2",
        "    sample 'k1' in u.tar: junk",
        "  unreadable_shard: 1",
        "    v.tar: gone",
    ]
    assert SampleErrors().summary() == "no bad samples"


# --------------------------------------------------------------------------------------------
# Hostile and damaged shards
# --------------------------------------------------------------------------------------------


def test_every_cut_of_a_shard_is_reported_or_loses_nothing(tmp_path):
    """A shard cut anywhere (also inside a header or at a member boundary) is either reported as
    unreadable or still holds every sample; never a quietly short shard."""
    (path,) = write_shards(tmp_path / "src", 16, maxcount=16)
    data = Path(path).read_bytes()
    quiet_losses, reported = [], 0
    for cut in range(0, len(data), 37):
        shard = tmp_path / "cut.tar"
        shard.write_bytes(data[:cut])
        samples, errors = read_all(str(shard))
        if errors.unreadable_shards:
            reported += 1
        elif len(samples) < 16:
            quiet_losses.append((cut, len(samples)))
    assert quiet_losses == []
    assert reported > 0.9 * (len(data) // 37)  # only cuts inside the end-of-archive padding read whole


def test_keys_with_folders_are_read_and_reserved_or_non_utf8_names_counted(tmp_path):
    ok = jpeg()
    shard = write_tar(
        tmp_path / "k.tar",
        [("dir/a.jpg", ok), ("dir/a.txt", b"one"), ("__meta__.jpg", ok), ("__meta__.txt", b"x"),
         ("b\udcff.jpg", ok), ("b\udcff.txt", b"two"), ("c.jpg", ok), ("c.txt", b"three")],
    )  # fmt: skip
    samples, errors = read_all(shard)
    assert keys(samples) == ["dir/a", "c"]
    assert errors.counts == {"bad_key": 2}
    assert sorted(ex["detail"] for ex in errors.examples["bad_key"]) == [
        "names starting with '__' are reserved for webdataset's own fields",
        "the member name is not UTF-8",
    ]


def test_a_key_seen_again_later_in_the_shard_is_counted_and_the_first_kept(tmp_path):
    ok = jpeg()
    shard = write_tar(
        tmp_path / "dup.tar",
        [("a.jpg", ok), ("a.txt", b"first"), ("b.jpg", ok), ("b.txt", b"b"), ("a.jpg", ok), ("a.txt", b"again")],
    )  # fmt: skip
    samples, errors = read_all(shard)
    assert [(s["__key__"], s["caption"]) for s in samples] == [("a", "first"), ("b", "b")]
    assert errors.counts == {"duplicate_key": 1} and error_keys(errors, "duplicate_key") == ["a"]


@pytest.mark.parametrize("payload", [b"[" * 200_000, b'{"n": ' + b"9" * 5000 + b"}"])
def test_hostile_json_is_one_bad_sample(tmp_path, payload):
    ok = jpeg()
    shard = write_tar(
        tmp_path / "j.tar",
        [("a.jpg", ok), ("a.txt", b"x"), ("a.json", payload), ("b.jpg", ok), ("b.txt", b"fine")],
    )
    samples, errors = read_all(shard)
    assert keys(samples) == ["b"] and errors.counts == {"bad_json": 1}


def test_writer_accepts_folder_keys_and_syncs_before_renaming(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    with ShardWriter(tmp_path, "f", maxcount=10) as w:
        w.write(image_text_sample("sub/x", jpeg(), "jpg", "caption", {}))
    assert synced  # the shard's data reached the disk before its final name appeared
    samples, errors = read_all(str(tmp_path / "f-000000.tar"))
    assert keys(samples) == ["sub/x"] and errors.counts == {}
    assert not list(tmp_path.glob(".*tmp*"))
