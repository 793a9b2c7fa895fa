"""Data converters: COCO captions/instances and generic tables → shards + OVD jsons; the shared CLI."""

from __future__ import annotations

import csv
import io
import json
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.coco import convert_coco
from data_prep.coco import main as coco_main
from data_prep.generic import DataPrepError, convert_generic, sniff_image_ext
from pipelines.data import main as data_main
from regionclip.cli import config_from_argv
from regionclip.config import load_config
from regionclip.data.sample_errors import SampleErrors
from regionclip.data.shards import iter_image_text


def save_image(path: Path, fmt: str, size=(12, 8), color=(200, 30, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path.read_bytes()


def read_shards(out: Path, prefix: str = "train") -> list[dict]:
    errors = SampleErrors()
    samples = list(iter_image_text(sorted(str(p) for p in out.glob(f"{prefix}-*.tar")), errors))
    assert errors.total == 0 and not errors.unreadable_shards
    return samples


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------


@pytest.fixture
def coco(tmp_path: Path) -> dict:
    """Images 1 (jpg), 2 (PNG bytes named .jpg), 3 (missing), 4 (corrupt), 5 (no captions)."""
    img = tmp_path / "images"
    raw = {
        1: save_image(img / "000000000001.jpg", "JPEG", (12, 8)),
        2: save_image(img / "000000000002.jpg", "PNG", (10, 6)),
        5: save_image(img / "000000000005.jpg", "JPEG", (4, 4)),
    }
    (img / "000000000004.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    sizes = {1: (12, 8), 2: (10, 6), 3: (7, 7), 4: (9, 9), 5: (4, 4)}
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h} for i, (w, h) in sizes.items()]
    captions = {
        "images": images,
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A man riding a bike."},
            {"id": 11, "image_id": 2, "caption": "A cat on a bicycle."},
            {"id": 12, "image_id": 1, "caption": " Someone cycling. "},
            {"id": 13, "image_id": 3, "caption": "Missing image."},
            {"id": 14, "image_id": 4, "caption": "Corrupt image."},
        ],
    }
    categories = [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 2, "name": "bicycle", "supercategory": "vehicle"},
        {"id": 17, "name": "cat", "supercategory": "animal"},
        {"id": 18, "name": "dog", "supercategory": "animal"},
        {"id": 89, "name": "hair drier", "supercategory": "indoor"},
    ]

    def box(ann_id, image_id, cat):
        return {
            "id": ann_id,
            "image_id": image_id,
            "category_id": cat,
            "bbox": [1, 1, 2, 2],
            "area": 4,
            "iscrowd": 0,
        }

    instances = {
        "info": {"description": "toy"},
        "images": images,
        "annotations": [
            box(100, 1, 1),
            box(101, 1, 17),
            box(102, 2, 2),
            box(103, 2, 89),
            box(104, 3, 1),
            box(105, 5, 18),
        ],
        "categories": categories,
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    overrides = [
        f"data_prep.coco.captions_json={tmp_path / 'captions.json'}",
        f"data_prep.coco.instances_json={tmp_path / 'instances.json'}",
        f"data_prep.coco.image_dir={img}",
        "data_prep.coco.base_classes=[person,bicycle]",
        "data_prep.coco.novel_classes=[cat,dog]",
        "data_prep.coco.split_name=toy",
        f"data_prep.out_dir={tmp_path / 'out'}",
        "shards.maxcount=1",
    ]
    return {"out": tmp_path / "out", "overrides": overrides, "raw": raw}


def test_coco_shards(coco):
    stats = convert_coco(load_config(None, coco["overrides"]))
    samples = read_shards(coco["out"])
    assert [s["__key__"] for s in samples] == ["000000000001", "000000000002"]
    assert [Path(s.path).name for s in stats.shards] == ["train-000000.tar", "train-000001.tar"]
    first, second = samples
    assert first["captions"] == ["A man riding a bike.", "Someone cycling."]
    assert first["meta"] == {
        "width": 12,
        "height": 8,
        "source_id": 1,
        "file_name": "000000000001.jpg",
        "captions": ["A man riding a bike.", "Someone cycling."],
    }
    # PNG bytes behind a .jpg name: extension from the magic bytes, bytes copied unchanged.
    assert second["image_ext"] == "png" and first["image_ext"] == "jpg"
    raw = read_shards_raw(coco["out"] / "train-000001.tar")
    assert raw["000000000002.png"] == coco["raw"][2]
    assert (stats.images, stats.captions) == (2, 3)
    assert dict(stats.errors.counts) == {"missing_file": 1, "bad_image": 1, "no_caption": 1}
    skipped = [json.loads(line) for line in stats.skipped_path.read_text().splitlines()]
    assert [(r["error"], r["key"]) for r in skipped] == [
        ("missing_file", "000000000003"),
        ("bad_image", "000000000004"),
        ("no_caption", "000000000005"),
    ]
    assert "000000000003.jpg" in skipped[0]["detail"]


def read_shards_raw(path: Path) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_coco_box_jsons(coco):
    stats = convert_coco(load_config(None, coco["overrides"]))
    base = json.loads((coco["out"] / "instances_toy_base.json").read_text())
    full = json.loads((coco["out"] / "instances_toy_all.json").read_text())
    # Images 3 and 4 (missing / corrupt file) leave the box jsons; 5 (no caption, file fine) stays.
    assert [im["id"] for im in base["images"]] == [1, 2, 5] == [im["id"] for im in full["images"]]
    assert sorted(a["id"] for a in base["annotations"]) == [100, 102]  # no novel, no 'hair drier'
    assert sorted(a["id"] for a in full["annotations"]) == [100, 101, 102, 105]
    assert [(c["id"], c["name"], c["split"]) for c in base["categories"]] == [
        (1, "person", "base"),
        (2, "bicycle", "base"),
    ]
    assert [(c["id"], c["split"]) for c in full["categories"]] == [
        (1, "base"),
        (2, "base"),
        (17, "novel"),
        (18, "novel"),
    ]
    assert full["categories"][2]["supercategory"] == "animal" and base["info"] == {"description": "toy"}
    cats = json.loads((coco["out"] / "categories.json").read_text())
    assert cats == [
        {"id": 1, "name": "person", "split": "base"},
        {"id": 2, "name": "bicycle", "split": "base"},
        {"id": 17, "name": "cat", "split": "novel"},
        {"id": 18, "name": "dog", "split": "novel"},
    ]
    assert "boxes base 2 / novel 2" in stats.summary_line()
    assert not list(coco["out"].glob(".*.tmp"))


def test_coco_unknown_class(coco, capsys):
    overrides = coco["overrides"] + ["data_prep.coco.novel_classes=[cat,unicorn]"]
    with pytest.raises(DataPrepError, match=r"novel_classes: unknown class 'unicorn'.*instances.json"):
        convert_coco(load_config(None, overrides))
    assert not coco["out"].exists()  # validated before any output
    # The entry point turns it into one error line and exit status 1.
    assert coco_main(overrides) == 1
    assert "unknown class 'unicorn'" in capsys.readouterr().err


def test_coco_default_split_needs_all_65_classes(coco):
    overrides = [o for o in coco["overrides"] if "_classes=" not in o]
    with pytest.raises(DataPrepError, match="base_classes: unknown class 'car'"):
        convert_coco(load_config(None, overrides))


def test_coco_instances_alone_write_box_files(coco):
    # e.g. the val split for evaluation: boxes only, no caption shards, and that is not an error
    overrides = [o for o in coco["overrides"] if "captions_json=" not in o]
    assert coco_main(overrides) == 0
    assert json.loads((coco["out"] / "instances_toy_all.json").read_text())["annotations"]
    assert not list(coco["out"].glob("*.tar"))


def test_coco_main_summary(coco, capsys):
    assert coco_main(coco["overrides"]) == 0
    out = capsys.readouterr().out
    assert "coco: wrote 2 images (3 captions) to 2 shards" in out
    assert "missing_file: 1" in out and "bad_image: 1" in out


# --------------------------------------------------------------------------------------------
# Generic
# --------------------------------------------------------------------------------------------

ROWS = [  # (path, caption, expected skip reason or None)
    ("a.jpg", "a red square", None),
    ("b.png", 'a "quoted" word, and a comma', None),
    ("missing.jpg", "gone", "missing_file"),
    ("corrupt.jpg", "broken", "bad_image"),
    ("sub/c.jpg", "   ", "empty_caption"),
    ("d.bmp", "a bitmap", None),
    ("ABS", "absolute path", None),
]


@pytest.fixture
def folder(tmp_path: Path) -> dict:
    img = tmp_path / "imgs"
    raw = {
        "a.jpg": save_image(img / "a.jpg", "JPEG"),
        "b.png": save_image(img / "b.png", "PNG", (5, 3)),
        "sub/c.jpg": save_image(img / "sub" / "c.jpg", "JPEG"),
        "d.bmp": save_image(img / "d.bmp", "BMP", (6, 2)),
    }
    save_image(tmp_path / "elsewhere" / "e.webp", "WEBP", (3, 3))
    (img / "corrupt.jpg").write_bytes(b"garbage")
    rows = [(str(tmp_path / "elsewhere" / "e.webp") if p == "ABS" else p, c, r) for p, c, r in ROWS]
    return {"img": img, "rows": rows, "raw": raw, "out": tmp_path / "out"}


def generic_cfg(folder, table: str | Path = "", **extra):
    overrides = [f"data_prep.generic.image_dir={folder['img']}", f"data_prep.out_dir={folder['out']}"]
    overrides += [f"data_prep.generic.table={table}"] if table else []
    overrides += [f"data_prep.generic.{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def check_generic(folder, stats, extra_errors=None):
    samples = {s["__key__"]: s for s in read_shards(folder["out"])}
    good = [i for i, (_, _, reason) in enumerate(folder["rows"]) if reason is None]
    assert sorted(samples) == [f"{i:09d}" for i in good]
    for i in good:
        path, caption, _ = folder["rows"][i]
        sample = samples[f"{i:09d}"]
        assert sample["caption"] == caption.strip()
        assert sample["meta"]["source_id"] == i and sample["meta"]["file_name"] == path
    assert samples["000000000"]["image_ext"] == "jpg"
    assert samples["000000005"]["image_ext"] == "png"  # BMP re-encoded
    assert samples["000000005"]["image"].size == (6, 2)
    assert samples["000000006"]["image_ext"] == "webp"
    assert (stats.images, stats.reencoded) == (4, 1)
    expected = {"missing_file": 1, "bad_image": 1, "empty_caption": 1, **(extra_errors or {})}
    assert dict(stats.errors.counts) == expected


def test_generic_jsonl(folder):
    lines = [json.dumps({"path": p, "caption": c}) for p, c, _ in folder["rows"]]
    lines[1] = json.dumps({"path": "b.png", "caption": ["", folder["rows"][1][1], " second "]})
    lines += ["", "{not json", json.dumps({"path": "a.jpg"})]  # blank (ignored), malformed, no caption
    (folder["img"] / "captions.jsonl").write_text("\n".join(lines) + "\n")
    stats = convert_generic(generic_cfg(folder))
    folder["rows"][1] = ("b.png", folder["rows"][1][1], None)
    samples = {s["__key__"]: s for s in read_shards(folder["out"])}
    assert samples["000000001"]["captions"] == [folder["rows"][1][1], "second"]
    check_generic(folder, stats, {"bad_line": 1, "missing_field": 1})
    bad = [r for r in stats.skipped if r["error"] == "bad_line"]
    assert bad[0]["url"].endswith("captions.jsonl line 9") and bad[0]["key"] == "000000008"
    raw = read_shards_raw(folder["out"] / "train-000000.tar")
    assert raw["000000000.jpg"] == folder["raw"]["a.jpg"]  # copied, not re-encoded


def write_table(path: Path, columns: list[str], rows: list[tuple[str, str]]) -> None:
    if path.suffix == ".parquet":
        pq.write_table(pa.table({name: [r[k] for r in rows] for k, name in enumerate(columns)}), path)
    elif path.suffix == ".tsv":  # CC3M style: no quoting at all
        path.write_text("".join("\t".join(r) + "\n" for r in [tuple(columns), *rows]))
    else:
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([columns, *rows])


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_generic_tables(folder, tmp_path, fmt):
    table = tmp_path / f"captions.{fmt}"
    write_table(table, ["file", "text"], [(p, c) for p, c, _ in folder["rows"]])
    stats = convert_generic(generic_cfg(folder, table, path_column="file", caption_column="text"))
    check_generic(folder, stats)


def test_generic_csv_bad_lines(folder, tmp_path):
    table = tmp_path / "t.csv"
    lines = [b"path,caption", b"a.jpg,one", b"b.png,two,three", b"sub/c.jpg", b"d.bmp,\xff not utf-8"]
    table.write_bytes(b"\n".join(lines) + b'\nb.png,"two\nlines"\n')
    stats = convert_generic(generic_cfg(folder, table, csv_multiline="true"))
    samples = read_shards(folder["out"])
    # keys are record numbers, bad records included: the quoted two-line caption is record 4
    assert [(s["__key__"], s["caption"]) for s in samples] == [
        ("000000000", "one"),
        ("000000004", "two\nlines"),
    ]
    assert dict(stats.errors.counts) == {"bad_line": 3}
    assert sorted(r["url"] for r in stats.skipped) == [f"{table} line {n}" for n in (3, 4, 5)]
    assert sorted(r["key"] for r in stats.skipped) == ["000000001", "000000002", "000000003"]


def test_generic_csv_unterminated_quote_costs_its_own_line_only(folder, tmp_path):
    table = tmp_path / "t.csv"
    table.write_bytes(b'path,caption\na.jpg,"one\nb.png,two\nsub/c.jpg,"three, quoted"\n')
    stats = convert_generic(generic_cfg(folder, table))
    samples = read_shards(folder["out"])
    assert [(s["__key__"], s["caption"]) for s in samples] == [
        ("000000001", "two"),
        ("000000002", "three, quoted"),
    ]
    (bad,) = stats.skipped
    assert (
        bad["key"] == "000000000"
        and bad["url"] == f"{table} line 2"
        and "unterminated quote" in bad["detail"]
    )


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_generic_missing_column(folder, tmp_path, fmt):
    table = tmp_path / f"t.{fmt}"
    if fmt == "jsonl":
        table.write_text(json.dumps({"path": "a.jpg", "text": "x"}) + "\n")
    else:
        write_table(table, ["path", "text"], [("a.jpg", "x")])
    with pytest.raises(DataPrepError, match=rf"t\.{fmt}: no column 'caption' \(found: path, text\)"):
        convert_generic(generic_cfg(folder, table))


def test_generic_unsupported_table(folder, tmp_path):
    with pytest.raises(DataPrepError, match=r"t\.xlsx: unsupported table format"):
        convert_generic(generic_cfg(folder, tmp_path / "t.xlsx"))


def test_sniff_image_ext():
    def enc(fmt):
        buf = io.BytesIO()
        Image.new("RGB", (2, 2)).save(buf, format=fmt)
        return buf.getvalue()

    assert [sniff_image_ext(enc(f)) for f in ("JPEG", "PNG", "WEBP", "BMP", "GIF")] == [
        "jpg",
        "png",
        "webp",
        None,
        None,
    ]


# --------------------------------------------------------------------------------------------
# CLI and dispatch
# --------------------------------------------------------------------------------------------


def test_config_from_argv(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: toy\nshards:\n  maxcount: 7\n")

    def flags(parser):
        parser.add_argument("--dry-run", action="store_true")

    cfg, args = config_from_argv(
        ["shards.maxsize=99", "--config", str(cfg_file), "--dry-run", "seed=3"], "d", flags
    )
    assert (cfg.name, cfg.shards.maxcount, cfg.shards.maxsize, cfg.seed, args.dry_run) == (
        "toy",
        7,
        99,
        3,
        True,
    )
    with pytest.raises(SystemExit) as exit_info:
        config_from_argv(["--config", str(cfg_file), "shards.nope=1"], "d")
    assert exit_info.value.code == 2
    assert "shards.nope" in capsys.readouterr().err


def test_pipeline_dispatch(folder, capsys):
    (folder["img"] / "captions.jsonl").write_text(json.dumps({"path": "a.jpg", "caption": "hello"}) + "\n")
    argv = [f"data_prep.generic.image_dir={folder['img']}", f"data_prep.out_dir={folder['out']}"]
    assert data_main(["data_prep.source=generic", *argv]) == 0
    assert "generic: wrote 1 images (1 captions)" in capsys.readouterr().out
    assert [s["caption"] for s in read_shards(folder["out"])] == ["hello"]
    assert data_main(["data_prep.source=laion", *argv]) == 2
    assert "data_prep.source='laion'" in capsys.readouterr().err


def test_pipeline_dispatch_emojiworld(monkeypatch):
    """EmojiWorld goes through its own entry point with the same arguments (flags included)."""
    import pipelines.data

    calls = []
    fake = types.ModuleType("data_prep.emojiworld")
    fake.main = calls.append
    monkeypatch.setattr(pipelines.data, "emojiworld", fake)
    argv = ["--force", "data_prep.source=emojiworld", "emojiworld.n_val=3"]
    assert data_main(argv) == 0
    assert calls == [argv]


def test_coco_threads_give_identical_shards(coco, tmp_path):
    """Samples come out in input order whatever the thread count: shards are byte-identical."""
    outputs = []
    for workers in (1, 3):
        out = tmp_path / f"out{workers}"
        convert_coco(
            load_config(
                None, coco["overrides"] + [f"data_prep.out_dir={out}", f"data_prep.workers={workers}"]
            )
        )
        outputs.append({p.name: p.read_bytes() for p in out.glob("train-*.tar")})
    assert len(outputs[0]) == 2 and outputs[0] == outputs[1]
