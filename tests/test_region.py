"""Detection-size preprocessing and RoI-pooled CLIP region embeddings (tiny random towers)."""

from __future__ import annotations

import copy
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from regionclip.models.pos_embed import interpolate_pos_embed
from regionclip.models.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    batch_images,
    detection_size,
    resize_for_detection,
    scale_boxes,
)
from regionclip.models.region import RegionEncoder, encode_regions
from regionclip.models.resnet_path import attention_pool

TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
CONFIGS = {
    "test-region-rn": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
        "text_cfg": TEXT_CFG,
    },
    # image 96 -> attnpool grid 3 -> pooler resolution 6 (the RN50x4 rule: 288 -> 9 -> 18)
    "test-region-rn96": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 96, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
        "text_cfg": TEXT_CFG,
    },
    "test-region-vit-avg": {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": 64,
            "layers": 2,
            "width": 64,
            "patch_size": 16,
            "head_width": 32,
            "pool_type": "avg",
        },
        "text_cfg": TEXT_CFG,
    },
    "test-region-vit-tok": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": TEXT_CFG,
    },
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("region_model_configs")
    out = {}
    for name, cfg in CONFIGS.items():
        path = folder / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
        torch.manual_seed(0)
        model = open_clip.create_model(name).eval()
        # open_clip's random ResNet (default conv init, zeroed last BN scale per bottleneck) shrinks
        # activations ~300x by layer3, leaving region embeddings nearly blind to content; a
        # variance-preserving init makes them depend on the region, as trained weights do.
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.uniform_(m.weight, 0.5, 1.5)
        out[name] = model
    return out


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return torch.allclose(a, b, rtol=0, atol=rel * max(1.0, b.abs().max().item()))


def _noise_image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------


def test_detection_size_short_side_and_max_side():
    assert detection_size(100, 150, 64, 1000) == (64, 96, 0.64)
    # the long side would be 256 > 128, so the long side decides: 128 / 400 = 0.32
    assert detection_size(100, 400, 64, 128) == (32, 128, 0.32)
    # RegionCLIP's default on a 480x640 COCO image: 800 / 480
    h, w, s = detection_size(480, 640)
    assert (h, w) == (800, 1067) and s == pytest.approx(800 / 480)
    with pytest.raises(ValueError, match="positive"):
        detection_size(0, 10)


def test_resize_for_detection_size_range_and_normalisation():
    img = Image.new("RGB", (150, 100), (255, 0, 128))
    raw, scale = resize_for_detection(img, 64, 1000, normalize=False)
    assert raw.shape == (3, 64, 96) and scale == 0.64
    # bicubic on a constant image stays constant
    assert torch.allclose(raw[:, 10, 10], torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-6)
    normed, _ = resize_for_detection(img, 64, 1000)
    expected = [
        (1.0 - CLIP_MEAN[0]) / CLIP_STD[0],
        (0.0 - CLIP_MEAN[1]) / CLIP_STD[1],
        (128 / 255 - CLIP_MEAN[2]) / CLIP_STD[2],
    ]
    assert torch.allclose(normed[:, 5, 7], torch.tensor(expected), atol=1e-5)
    gray, _ = resize_for_detection(Image.new("L", (20, 10), 0), 10, 100, normalize=False)
    assert gray.shape == (3, 10, 20) and gray.abs().max() == 0


def test_batch_images_pads_with_zeros_and_rounds_up():
    a = torch.ones(3, 3, 5)
    b = torch.full((3, 4, 2), 2.0)
    batch, sizes = batch_images([a, b], size_divisibility=4)
    assert batch.shape == (2, 3, 4, 8) and sizes == [(3, 5), (4, 2)]
    assert batch[0, :, :3, :5].eq(1).all() and batch[0, :, 3:].eq(0).all() and batch[0, :, :, 5:].eq(0).all()
    assert batch[1, :, :, :2].eq(2).all() and batch[1, :, :, 2:].eq(0).all()
    plain, _ = batch_images([a, b])
    assert plain.shape == (2, 3, 4, 5)
    with pytest.raises(ValueError, match="at least one"):
        batch_images([])


def test_scale_boxes_values_and_round_trip():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 150.0, 100.0]])
    resized = scale_boxes(boxes, 0.64)
    assert torch.allclose(resized, torch.tensor([[6.4, 12.8, 32.0, 38.4], [0.0, 0.0, 96.0, 64.0]]))
    assert torch.allclose(scale_boxes(resized, 1 / 0.64), boxes)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        scale_boxes(torch.zeros(4), 2.0)


# ---------------------------------------------------------------------------------------------
# region encoder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["test-region-rn", "test-region-vit-avg"])
def test_feature_size_matches_backbone(models, name):
    enc = RegionEncoder(models[name].visual)
    with torch.no_grad():
        for h, w in [(64, 64), (100, 150), (65, 97), (33, 47)]:
            feats = enc.dense_features(torch.zeros(1, 3, h, w))
            assert tuple(feats.shape[-2:]) == enc.feature_size(h, w), (h, w)


def test_pooler_resolution_follows_attnpool_grid(models):
    assert RegionEncoder(models["test-region-rn"].visual).pooler_resolution == 4  # 64 / 32 = 2 -> 4
    assert RegionEncoder(models["test-region-rn96"].visual).pooler_resolution == 6  # 96 / 32 = 3 -> 6
    assert RegionEncoder(models["test-region-vit-avg"].visual).pooler_resolution == 4  # 64 / 16


@pytest.mark.parametrize(
    ("name", "seed", "tol"),
    [
        # The 64 px image gives a 4x4 layer3 map. aligned=True shifts the box [0, 64] to [-0.5, 3.5]
        # in feature units; 4 bins of width 1 with one sample each (sampling_ratio=0 -> ceil(1)) land
        # on 0, 1, 2, 3: exactly the feature centres, so RoIAlign returns the map itself and layer4 +
        # attnpool see identical input. Measured difference: 0.0.
        ("test-region-rn", 1, 1e-6),
        # Same sampling argument on the 4x4 token grid; the mean of ln_post'd tokens @ proj is the
        # model's pool_type='avg' path. Measured difference ~2e-7 (summation order).
        ("test-region-vit-avg", 2, 1e-5),
    ],
)
def test_whole_image_box_equals_encode_image(models, name, seed, tol):
    model = models[name]
    enc = RegionEncoder(model.visual)
    torch.manual_seed(seed)
    img = torch.randn(2, 3, 64, 64)
    box = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        expected = model.encode_image(img)
        got = enc(img, [box, box])
    assert got.shape == (2, 64)
    assert _close(got, expected, tol)


def test_vit_class_token_model_uses_mean_of_projected_patch_tokens(models):
    model = models["test-region-vit-tok"]
    v = model.visual
    enc = RegionEncoder(v)
    torch.manual_seed(3)
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = enc(img, [torch.tensor([[0.0, 0.0, 64.0, 64.0]])])
        # open_clip's own dense path: last block's patch tokens with ln_post applied
        tokens = v.forward_intermediates(
            img, indices=1, normalize_intermediates=True, intermediates_only=True
        )
        expected = tokens["image_intermediates"][-1].mean(dim=(2, 3)) @ v.proj
        cls_embedding = model.encode_image(img)
    assert _close(got, expected, 1e-5)
    # documented difference: this is not the class-token embedding
    assert not torch.allclose(got, cls_embedding, atol=1e-3)


def test_interpolate_pos_embed():
    torch.manual_seed(4)
    pos = torch.randn(1 + 2 * 2, 8)
    assert interpolate_pos_embed(pos, (2, 2), (2, 2)) is pos
    const = torch.cat([torch.randn(1, 8), torch.full((4, 8), 0.25)])
    out = interpolate_pos_embed(const, (2, 2), (3, 5))
    assert out.shape == (1 + 3 * 5, 8)
    assert torch.equal(out[0], const[0])  # the class / global row is kept
    assert torch.allclose(out[1:], torch.full((15, 8), 0.25), atol=1e-6)  # bicubic keeps constants
    with pytest.raises(ValueError, match="rows"):
        interpolate_pos_embed(pos, (3, 3), (2, 2))


def test_attention_pool_other_grid_equals_attnpool_with_resized_embedding(models):
    ap = models["test-region-rn"].visual.attnpool  # grid 2
    torch.manual_seed(5)
    x = torch.randn(3, ap.k_proj.in_features, 3, 4)
    resized = copy.deepcopy(ap)
    resized.positional_embedding = torch.nn.Parameter(
        interpolate_pos_embed(ap.positional_embedding, (2, 2), (3, 4))
    )
    with torch.no_grad():
        assert _close(attention_pool(ap, x), resized(x), 1e-5)
        # at the training grid: open_clip's pool (all tokens as queries) up to rounding; only the
        # mean token's query is computed here
        x2 = torch.randn(3, ap.k_proj.in_features, 2, 2)
        assert _close(attention_pool(ap, x2), ap(x2), 1e-6)


@pytest.mark.parametrize("name", ["test-region-rn", "test-region-vit-avg"])
def test_non_default_pooler_resolution_and_size(models, name):
    enc = RegionEncoder(models[name].visual, pooler_resolution=6)
    with torch.no_grad():
        out = enc(
            torch.randn(1, 3, 96, 128), [torch.tensor([[0.0, 0.0, 128.0, 96.0], [8.0, 8.0, 40.0, 72.0]])]
        )
    assert out.shape == (2, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["test-region-rn", "test-region-vit-avg"])
def test_boxes_in_original_pixels_survive_resizing(models, name):
    model = models[name]
    enc = RegionEncoder(model.visual)
    img = _noise_image(100, 150, seed=6)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 150.0, 100.0], [75.0, 30.0, 149.0, 99.0]])
    with torch.no_grad():
        got = encode_regions(model, [img], [boxes], short_side=64, max_side=1000)[0]
        tensor, scale = resize_for_detection(img, 64, 1000)
        assert tensor.shape == (3, 64, 96) and scale == 0.64
        by_hand = enc(tensor[None], [boxes * 0.64])
    assert got.shape == (3, 64)
    assert _close(got, by_hand, 1e-6)
    # the embedding really depends on where the box is (so a missed box scaling would show)
    assert (got[0] - got[1]).norm() > 0.02 * got[1].norm()


@pytest.mark.parametrize("name", ["test-region-rn", "test-region-vit-avg"])
def test_padding_and_batching_do_not_change_region_embeddings(models, name):
    enc = RegionEncoder(models[name].visual)
    torch.manual_seed(7)
    im1, im2 = torch.randn(3, 100, 150), torch.randn(3, 64, 80)
    bx1 = torch.tensor([[0.0, 0.0, 150.0, 100.0], [10.0, 20.0, 90.0, 70.0]])
    bx2 = torch.tensor([[0.0, 0.0, 80.0, 64.0], [5.0, 5.0, 40.0, 30.0], [60.0, 40.0, 80.0, 64.0]])
    batch, sizes = batch_images([im1, im2], size_divisibility=32)
    assert batch.shape == (2, 3, 128, 160)
    with torch.no_grad():
        joint = enc(batch, [bx1, bx2], sizes)
        alone = torch.cat([enc(im1[None], [bx1]), enc(im2[None], [bx2])])
        # the split API gives the same as forward
        feats = enc.dense_features(batch, sizes)
        split = enc.pool_regions(feats, [bx1, bx2], sizes)
    assert joint.shape == (5, 64)
    assert _close(joint, alone, 1e-5)
    assert torch.equal(joint, split)
    pils = [_noise_image(100, 150, 8), _noise_image(70, 60, 9), _noise_image(100, 150, 10)]
    pboxes = [bx1, torch.tensor([[1.0, 2.0, 50.0, 60.0]]), bx1]
    with torch.no_grad():
        one = encode_regions(enc, pils, pboxes, short_side=64, max_side=200, batch_size=1)
        three = encode_regions(enc, pils, pboxes, short_side=64, max_side=200, batch_size=3)
    for a, b in zip(one, three, strict=True):
        assert _close(a, b, 1e-5)


@pytest.mark.parametrize("per_image", [False, True])
def test_images_without_boxes(models, per_image):
    enc = RegionEncoder(models["test-region-rn"].visual)
    batch = torch.randn(3, 3, 64, 64)
    sizes = [(64, 64), (48, 64), (64, 40)] if per_image else None
    with torch.no_grad():
        out = enc(
            batch, [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.zeros(0, 4)], sizes
        )
        none = enc(batch, [torch.zeros(0, 4)] * 3, sizes)
        one = enc(batch[1:2], [torch.tensor([[0.0, 0.0, 32.0, 32.0]])], None if sizes is None else sizes[1:2])
    assert out.shape == (1, 64) and none.shape == (0, 64)
    assert _close(out, one, 1e-6)
    with torch.no_grad():
        per_img = encode_regions(
            enc,
            [_noise_image(40, 50, 11), _noise_image(50, 40, 12)],
            [[], torch.tensor([[0, 0, 10, 10]])],
            64,
            100,
        )
    assert [tuple(t.shape) for t in per_img] == [(0, 64), (1, 64)]


@pytest.mark.parametrize("name", ["test-region-rn", "test-region-vit-avg"])
def test_region_embeddings_are_differentiable(models, name):
    model = copy.deepcopy(models[name])
    enc = RegionEncoder(model.visual)
    img = torch.randn(2, 3, 64, 80)
    boxes = [
        torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 5.0, 70.0, 60.0]]),
        torch.tensor([[20.0, 20.0, 60.0, 50.0]]),
    ]
    emb = enc(img, boxes, [(64, 80), (50, 70)])
    F.normalize(emb, dim=-1).sum().backward()
    late = model.visual.layer4 if name.endswith("rn") else model.visual.transformer.resblocks[-1]
    early = model.visual.layer2 if name.endswith("rn") else model.visual.conv1
    for module in (late, early):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("name", ["test-region-rn", "test-region-vit-avg"])
def test_bf16_autocast_matches_fp32(models, name):
    # the GPU path runs under bf16 autocast; boxes must stay fp32 (an 800 px coordinate in bf16
    # moves by up to 2 px) and the result must track fp32
    enc = RegionEncoder(models[name].visual)
    torch.manual_seed(13)
    img = torch.randn(2, 3, 96, 128)
    boxes = [
        torch.tensor([[3.3, 5.1, 100.7, 90.2], [0.0, 0.0, 128.0, 96.0]]),
        torch.tensor([[10.0, 10.0, 50.0, 50.0]]),
    ]
    sizes = [(96, 128), (80, 100)]
    with torch.no_grad():
        ref = enc(img, boxes, sizes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = enc(img, boxes, sizes)
    assert F.cosine_similarity(ref, amp.float()).min() > 0.999


def test_bad_input_gets_clear_errors(models):
    enc = RegionEncoder(models["test-region-rn"].visual)
    img = torch.randn(2, 3, 64, 64)
    good = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match=r"image 1: boxes must have shape \[N, 4\]"):
        enc(img, [good, torch.zeros(2, 5)])
    with pytest.raises(ValueError, match="image 0: boxes must be x0 y0 x1 y1"):
        enc(img, [torch.tensor([[10.0, 0.0, 5.0, 10.0]]), good])
    with pytest.raises(ValueError, match="1 box tensors for a batch of 2"):
        enc(img, [good])
    with pytest.raises(ValueError, match="does not fit"):
        enc(img, [good, good], [(64, 64), (65, 64)])
    with pytest.raises(ValueError, match="image 1: size 8x64 is smaller than the feature stride 16"):
        enc(img, [good, good], [(64, 64), (8, 64)])
    with pytest.raises(TypeError, match="Linear"):
        RegionEncoder(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_rn50_architecture_at_detection_size():
    torch.manual_seed(0)
    model = open_clip.create_model("RN50").eval()
    enc = RegionEncoder(model.visual)
    assert enc.pooler_resolution == 14  # 224 / 32 = 7 -> 14, RegionCLIP's POOLER_RESOLUTION
    boxes = torch.tensor(
        [[0, 0, 1066, 800], [10, 10, 200, 300], [500, 400, 900, 790], [0, 0, 16, 16], [100, 100, 101, 101],
         [300, 200, 600, 500], [50, 600, 400, 800], [900, 0, 1066, 200]],
        dtype=torch.float32,
    )  # fmt: skip
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 800, 1066), [boxes])
    assert out.shape == (8, 1024) and torch.isfinite(out).all()
