"""Student model, pretraining batches, loss glue, export round trip, online == offline labels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import safetensors.torch
import torch
from PIL import Image

from regionclip.config import ClipModelConfig, load_config
from regionclip.data.batches import PreprocessSettings, collate_image_text, collate_pretrain
from regionclip.data.pseudo_labels import PseudoLabels, iter_pseudo_labels
from regionclip.data.sample_errors import SampleErrors
from regionclip.data.shards import ShardWriter, encode_image, image_text_sample, iter_image_text
from regionclip.labeling.labeler import OnlineLabels, build_labeler
from regionclip.losses import RegionCLIPLoss
from regionclip.models.loading import load_clip
from regionclip.models.rpn import build_proposal_network, save_rpn
from regionclip.models.student import build_student, compute_losses
from regionclip.stages.pseudolabel import plan_outputs, prepare_run, run_shards
from regionclip.text import save_embeddings

RED = (255, 0, 0)
GREY = (128, 128, 128)


@pytest.fixture
def rn(tiny_clip) -> ClipModelConfig:
    name, path = tiny_clip
    return ClipModelConfig(model=name, model_config=path)


def _student(cfg: ClipModelConfig, freeze_at: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return build_student(cfg, freeze_at)


def _image(w: int, h: int, red_box: tuple[int, int, int, int] | None = None) -> Image.Image:
    im = Image.new("RGB", (w, h), GREY)
    if red_box is not None:
        im.paste(RED, red_box)
    return im


def _pseudo(key: str, image: Image.Image, boxes, concept, topk_ids, topk_logits, emb=None, captions=None):
    w, h = image.size if image is not None else (8, 8)
    return PseudoLabels(
        key=key,
        captions=captions or [f"caption of {key}"],
        width=w,
        height=h,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        objectness=np.ones(len(concept), np.float32),
        concept=np.asarray(concept, np.int32),
        score=np.ones(len(concept), np.float32),
        topk_ids=np.asarray(topk_ids, np.int32).reshape(len(concept), -1),
        topk_logits=np.asarray(topk_logits, np.float32).reshape(len(concept), -1),
        emb=None if emb is None else np.asarray(emb, np.float16),
        image=image,
    )


# --------------------------------------------------------------------------------------------
# Freezing
# --------------------------------------------------------------------------------------------


def _trainable_prefixes(student) -> set[str]:
    return {n.split(".")[2] for n, _ in student.trainable_parameters()}


def test_freeze_at_selects_trainable_stages(rn):
    # the stem's convs (conv1-3) are its only parameters: BN is frozen everywhere (buffers)
    assert _trainable_prefixes(_student(rn, 0)) == {
        "conv1", "conv2", "conv3", "layer1", "layer2", "layer3", "layer4", "attnpool"
    }  # fmt: skip
    assert _trainable_prefixes(_student(rn, 1)) == {"layer1", "layer2", "layer3", "layer4", "attnpool"}
    assert _trainable_prefixes(_student(rn, 2)) == {"layer2", "layer3", "layer4", "attnpool"}
    assert _trainable_prefixes(_student(rn, 5)) == {"attnpool"}
    student = _student(rn, 2)
    assert all(n.startswith("clip.visual.") for n, _ in student.trainable_parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in student.modules())
    with pytest.raises(ValueError, match="freeze_at=6 out of range"):
        _student(rn, 6)


def test_vit_freeze_at_two_is_patch_embedding_and_first_block(tiny_vit_clip):
    name, path = tiny_vit_clip
    student = _student(ClipModelConfig(model=name, model_config=path), 2)
    trainable = {n.removeprefix("clip.visual.") for n, _ in student.trainable_parameters()}
    assert {"conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight"}.isdisjoint(trainable)
    assert not any(n.startswith("transformer.resblocks.0.") for n in trainable)
    assert any(n.startswith("transformer.resblocks.1.") for n in trainable)
    assert {"ln_post.weight", "proj"} <= trainable
    with pytest.raises(ValueError, match="out of range"):
        _student(ClipModelConfig(model=name, model_config=path), 4)  # 1 + 2 blocks at most


def _batch(student, hflip=False, seed=0):
    samples = [
        _pseudo("a", _image(40, 20, (2, 4, 10, 12)), [[2, 4, 10, 12], [20, 0, 40, 20]], [1, 3], [[1, 0], [3, 2]], [[9, 1], [8, 2]]),
        _pseudo("b", _image(20, 40), [[0, 0, 20, 20]], [1], [[1, 4]], [[7, 6]]),
    ]  # fmt: skip
    settings = PreprocessSettings(short_side=32, max_side=64, hflip=hflip)
    return collate_pretrain(samples, settings, student.tokenizer, torch.Generator().manual_seed(seed))


def test_train_step_updates_only_trainable_stages(rn):
    student = _student(rn, 2)
    student.train()
    assert student.clip.visual.layer2.training and not student.clip.transformer.training
    assert not student.clip.visual.layer1.training  # frozen stage stays in eval
    before = {k: v.clone() for k, v in student.state_dict().items()}
    batch = _batch(student)
    loss = RegionCLIPLoss()
    out = compute_losses(student, batch, loss, torch.randn(6, 64))
    out["loss"].backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    for stage in ("layer2", "layer3", "layer4", "attnpool"):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if f".{stage}." in n), stage
    for n, g in grads.items():
        if n.startswith(("clip.visual.conv", "clip.visual.layer1.")) or not n.startswith("clip.visual."):
            assert g is None, n
    torch.optim.SGD([p for _, p in student.trainable_parameters()], lr=0.1, momentum=0.9).step()
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(
        k.startswith(
            ("clip.visual.layer2", "clip.visual.layer3", "clip.visual.layer4", "clip.visual.attnpool")
        )
        for k in changed
    )
    # BN statistics and affine (FrozenBatchNorm2d buffers) are untouched even in trainable stages
    assert not any(k.endswith(("running_mean", "running_var")) or ".bn" in k for k in changed)
    assert not any(
        k.startswith(("clip.transformer", "clip.token_embedding", "clip.ln_final", "clip.text_projection"))
        for k in changed
    )


# --------------------------------------------------------------------------------------------
# Collate
# --------------------------------------------------------------------------------------------


def test_collate_shapes_scaling_and_flip(rn):
    student = _student(rn)
    batch = _batch(student, hflip=True, seed=0)  # seed 0 draws: flip a, keep b
    assert batch.flipped == [True, False]
    # a: 40x20 -> short side 32: scale 1.6, 64x32; b: 20x40 -> 32x64; padded to 64x64
    assert batch.images.shape == (2, 3, 64, 64) and batch.image_sizes == [(32, 64), (64, 32)]
    # a's box (2, 4, 10, 12) * 1.6 = (3.2, 6.4, 16, 19.2), mirrored in width 64 -> (48, 6.4, 60.8, 19.2)
    # the right-half box (20, 0, 40, 20) * 1.6 = (32, 0, 64, 32) mirrors to the left half
    expected = torch.tensor([[48, 6.4, 60.8, 19.2], [0, 0, 32, 32]])
    torch.testing.assert_close(batch.region_boxes[0], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.region_boxes[1], torch.tensor([[0.0, 0, 32, 32]]))
    # the red patch moved with its box: red (high R, low G after normalisation) at x 50..58, not at 5..14
    img = batch.images[0]
    assert img[0, 9:17, 50:59].mean() > 1.5 and img[1, 9:17, 50:59].mean() < -1.0
    assert img[0, 9:17, 5:14].mean() < 0.5
    assert batch.target_ids.tolist() == [1, 3, 1] and batch.topk_ids.tolist() == [[1, 0], [3, 2], [1, 4]]
    assert batch.topk_logits.dtype == torch.float32 and batch.teacher_emb is None
    assert batch.text_tokens.shape == (2, 16) and batch.keys == ["a", "b"]
    unflipped = _batch(student, hflip=False)
    assert unflipped.region_boxes[0][0].tolist() == pytest.approx([3.2, 6.4, 16, 19.2], abs=1e-4)
    assert torch.equal(unflipped.images[0, :, :32].flip(-1), batch.images[0, :, :32])


def test_collate_errors_name_the_sample(rn):
    student = _student(rn)
    s = _pseudo("nopix", None, [[0, 0, 1, 1]], [0], [[0]], [[1.0]])
    with pytest.raises(ValueError, match="'nopix'.*store_image"):
        collate_pretrain([s], PreprocessSettings(32, 64), student.tokenizer)
    s = _pseudo("bad", _image(8, 8), [[0, 0, 1, 1]], [0, 1], [[0], [1]], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="'bad': region fields disagree"):
        collate_pretrain([s], PreprocessSettings(32, 64), student.tokenizer)


def test_image_text_only_collate_and_losses(rn):
    student = _student(rn)
    samples = [
        {"__key__": "x", "image": _image(30, 30), "caption": "one", "captions": ["one", "two", "three"]},
        {"__key__": "y", "image": _image(32, 48), "caption": "four", "captions": ["four"]},
    ]
    gen = torch.Generator().manual_seed(3)
    batch = collate_image_text(
        samples, PreprocessSettings(32, 64, size_divisibility=16), student.tokenizer, gen
    )
    g = torch.Generator().manual_seed(3)
    flip_x = float(torch.rand((), generator=g)) < 0.5
    pick = int(torch.randint(3, (), generator=g))
    assert batch.flipped[0] == flip_x
    assert torch.equal(batch.text_tokens[0], student.tokenizer([["one", "two", "three"][pick]])[0])
    assert batch.images.shape == (2, 3, 48, 32) and batch.image_sizes == [(32, 32), (48, 32)]
    assert batch.num_regions == 0 and [b.shape for b in batch.region_boxes] == [(0, 4), (0, 4)]
    out = compute_losses(student, batch, RegionCLIPLoss(distill_weight=0, contrastive_weight=0), None)
    assert set(out) == {"image_text", "loss"} and torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="no concept embeddings"):
        compute_losses(student, batch, RegionCLIPLoss(), None)


# --------------------------------------------------------------------------------------------
# Forward and losses
# --------------------------------------------------------------------------------------------


def test_forward_shapes_and_global_box(rn):
    student = _student(rn)
    batch = _batch(student)
    with torch.no_grad():
        out = student(batch)
        enc = student.region_encoder
        whole = [torch.tensor([[0.0, 0.0, 64.0, 32.0]]), torch.tensor([[0.0, 0.0, 32.0, 64.0]])]
        expected_global = enc(batch.images, whole)
        expected_regions = enc(batch.images, batch.region_boxes)
        text = open_clip.CLIP.encode_text(student.clip, batch.text_tokens)
    assert out["image_emb"].shape == (2, 64) and out["region_emb"].shape == (3, 64)
    torch.testing.assert_close(out["image_emb"], expected_global, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["region_emb"], expected_regions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["text_emb"], text, atol=1e-5, rtol=1e-5)
    assert not out["text_emb"].requires_grad
    assert "region_emb" not in student(batch, need_regions=False)


def test_topk_padding_and_teacher_embeddings_reach_the_loss(rn):
    student = _student(rn)
    concepts = torch.randn(5, 64)
    # caption-mode row: one candidate (concept 2) then padding -> teacher probability 1 on concept 2
    samples = [
        _pseudo("p", _image(32, 32), [[0, 0, 16, 16], [8, 8, 32, 32]], [2, 0], [[2, -1], [0, 1]], [[3.0, -math.inf], [1.0, 0.0]])
    ]  # fmt: skip
    batch = collate_pretrain(samples, PreprocessSettings(32, 64, hflip=False), student.tokenizer)
    out = compute_losses(student, batch, RegionCLIPLoss(image_text_weight=0, contrastive_weight=0), concepts)
    with torch.no_grad():
        reg = student(batch)["region_emb"]
    log_q = torch.log_softmax(
        torch.nn.functional.normalize(reg, dim=-1) @ torch.nn.functional.normalize(concepts, dim=-1).T / 0.01,
        1,
    )
    p1 = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    kl1 = (p1 * (p1.log() - log_q[1, :2])).sum()
    expected = (-log_q[0, 2] + kl1) / 2
    assert out["distill"].item() == pytest.approx(expected.item(), rel=1e-5)
    samples[0].topk_logits[0, 1] = 0.5  # padding must carry -inf
    bad = collate_pretrain(samples, PreprocessSettings(32, 64, hflip=False), student.tokenizer)
    with pytest.raises(ValueError, match="padding"):
        compute_losses(student, bad, RegionCLIPLoss(image_text_weight=0, contrastive_weight=0), concepts)
    samples[0].topk_logits[0, 1] = -math.inf
    # with stored teacher embeddings (every sample has them) the exact rebuild is used instead
    samples[0].emb = concepts[[1, 1]].numpy().astype(np.float16) * 3
    batch = collate_pretrain(samples, PreprocessSettings(32, 64, hflip=False), student.tokenizer)
    assert batch.teacher_emb.dtype == torch.float16 and batch.teacher_emb.shape == (2, 64)
    out = compute_losses(student, batch, RegionCLIPLoss(image_text_weight=0, contrastive_weight=0), concepts)
    t = torch.log_softmax(
        torch.nn.functional.normalize(batch.teacher_emb.float(), dim=-1)
        @ torch.nn.functional.normalize(concepts, dim=-1).T
        / 0.01,
        1,
    )
    expected = (t.exp() * (t - log_q)).sum() / 2
    assert out["distill"].item() == pytest.approx(expected.item(), rel=1e-4)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def test_export_round_trip(rn, tmp_path: Path):
    student = _student(rn)
    with torch.no_grad():  # move the weights away from init, BN stats included
        for p in student.clip.visual.parameters():
            p.add_(0.01 * torch.randn_like(p))
        student.clip.visual.layer3[0].bn1.running_mean.add_(0.5)
    out_dir = student.export(tmp_path / "student", {"step": 7})
    conf = json.loads((out_dir / "open_clip_config.json").read_text())
    assert conf["regionclip"]["step"] == 7 and conf["regionclip"]["model"] == rn.model
    keys = set(safetensors.torch.load_file(str(out_dir / "open_clip_model.safetensors")))
    assert "visual.bn1.num_batches_tracked" in keys and "visual.bn1.running_var" in keys
    loaded = load_clip(ClipModelConfig(model=rn.model, model_config=rn.model_config, pretrained=str(out_dir)))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model.encode_image(images), student.clip.encode_image(images), atol=1e-5, rtol=1e-4
        )
    direct = open_clip.create_model(f"local-dir:{out_dir}")
    assert isinstance(direct.visual.bn1, torch.nn.BatchNorm2d)


# --------------------------------------------------------------------------------------------
# Online == offline
# --------------------------------------------------------------------------------------------

CONCEPTS = ["dog", "cat", "red umbrella", "umbrella", "tree", "car"]


def test_online_labels_equal_offline_shards(tiny_clip, tmp_path: Path):
    name, model_config = tiny_clip
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "in", "train", maxcount=10) as writer:
        for i, (w, h) in enumerate([(64, 48), (48, 64), (64, 64)]):
            image = encode_image(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), "jpg")
            writer.write(
                image_text_sample(f"k{i}", image, "jpg", f"a {CONCEPTS[i]}", {"width": w, "height": h})
            )
    torch.manual_seed(0)
    teacher = open_clip.create_model(name)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "teacher.safetensors")
    )
    save_embeddings(tmp_path / "concepts.safetensors", torch.randn(6, 64), CONCEPTS, {"model": name})
    rpn = {
        "out_dir": tmp_path / "rpn", "backbone": "resnet18", "norm": "bn", "fpn_levels": "[3,4]",
        "fpn_channels": 16, "min_size": 64, "max_size": 96, "anchor_sizes": "[16,32,64]",
        "pre_nms_top_n_test": 100, "post_nms_top_n_test": 30,
    }  # fmt: skip
    overrides = [f"rpn.{k}={v}" for k, v in rpn.items()] + [
        "device=cpu",
        f"teacher.model={name}",
        f"teacher.model_config={model_config}",
        f"teacher.pretrained={tmp_path / 'teacher.safetensors'}",
        f"pseudolabel.input_shards={tmp_path / 'in' / 'train-000000.tar'}",
        f"pseudolabel.out_dir={tmp_path / 'out'}",
        f"pseudolabel.concepts={tmp_path / 'concepts.safetensors'}",
        "pseudolabel.short_side=64",
        "pseudolabel.max_side=96",
        "pseudolabel.num_regions=6",
        "pseudolabel.proposal_pool=20",
        "pseudolabel.topk=4",
        "pseudolabel.batch_size=3",  # one teacher batch, as the online step (RPN padding is per batch)
        "pseudolabel.store_embeddings=true",
    ]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    save_rpn(build_proposal_network(cfg.rpn), cfg.rpn, cfg.rpn.out_dir)
    labeler, identity = prepare_run(
        cfg.pseudolabel, cfg.teacher, cfg.rpn.out_dir, cfg.rpn.precomputed, torch.device("cpu")
    )
    run_shards(labeler, plan_outputs(cfg.pseudolabel), identity)
    offline = list(iter_pseudo_labels(str(tmp_path / "out" / "train-000000.tar")))

    errors = SampleErrors()
    raw = list(iter_image_text(cfg.pseudolabel.input_shards, errors))
    online = OnlineLabels(
        build_labeler(cfg.pseudolabel, cfg.teacher, cfg.rpn.out_dir, cfg.rpn.precomputed, "cpu")[0]
    )(raw)
    assert [s.key for s in online] == [s.key for s in offline] == ["k0", "k1", "k2"]
    assert sum(len(s.boxes) for s in offline) > 0

    student = _student(ClipModelConfig(model=name, model_config=model_config))
    settings = PreprocessSettings(48, 96)
    a = collate_pretrain(offline, settings, student.tokenizer, torch.Generator().manual_seed(1))
    b = collate_pretrain(online, settings, student.tokenizer, torch.Generator().manual_seed(1))
    assert a.keys == b.keys and a.image_sizes == b.image_sizes and a.flipped == b.flipped
    assert torch.equal(a.images, b.images) and torch.equal(a.text_tokens, b.text_tokens)
    assert torch.equal(a.target_ids, b.target_ids) and torch.equal(a.topk_ids, b.topk_ids)
    for x, y in zip(a.region_boxes, b.region_boxes, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.topk_logits, b.topk_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.teacher_emb, b.teacher_emb, atol=1e-3, rtol=0)  # fp16 storage
