"""The Python API (regionclip.RegionCLIP): tiny random CLIP + tiny random RPN, on generated images
and on a real photo."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from regionclip import RegionCLIP
from regionclip.api import hf_detections
from regionclip.evaluation.zero_shot import detect
from regionclip.models import save_clip_checkpoint
from regionclip.models.region import encode_regions

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = {"short_side": 64, "max_side": 96, "rpn_post_nms_top_n": 10, "multiply_rpn_score": True}
# A real photo that ships with matplotlib (a dependency of pycocotools): 512 x 600 px
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture
def model(tiny_clip, tiny_rpn_dir) -> RegionCLIP:
    name, config = tiny_clip
    torch.manual_seed(0)
    return RegionCLIP.from_pretrained(
        name, rpn=tiny_rpn_dir, model_config=config, device="cpu", templates="single", **SMALL
    )


def test_hf_format_by_hand():
    boxes = torch.tensor([[1.7, 2.2, 10.9, 20.5], [0.0, 0.0, 5.0, 5.0], [3.0, 3.0, 4.0, 4.0]])
    scores, labels = torch.tensor([0.2, 0.9, 0.5]), torch.tensor([1, 0, 1])
    assert hf_detections(boxes, scores, labels, ["cat", "dog"], top_k=2) == [
        {"score": pytest.approx(0.9), "label": "cat", "box": {"xmin": 0, "ymin": 0, "xmax": 5, "ymax": 5}},
        {"score": pytest.approx(0.5), "label": "dog", "box": {"xmin": 3, "ymin": 3, "xmax": 4, "ymax": 4}},
    ]
    assert [d["box"] for d in hf_detections(boxes, scores, labels, ["cat", "dog"], None)][2] == {
        "xmin": 1, "ymin": 2, "xmax": 10, "ymax": 20,
    }  # fmt: skip


def test_detection_on_a_real_photo_matches_the_detect_function(model):
    photo = Image.open(PHOTO)
    found = model(photo, candidate_labels=["woman", "uniform", "flag"], threshold=0.05, top_k=4)
    assert 0 < len(found) <= 4
    assert [d["score"] for d in found] == sorted((d["score"] for d in found), reverse=True)
    for d in found:
        assert set(d) == {"score", "label", "box"} and d["label"] in ("woman", "uniform", "flag")
        assert d["score"] > 0.05 and all(isinstance(v, int) for v in d["box"].values())
        assert 0 <= d["box"]["xmin"] <= d["box"]["xmax"] <= photo.width
        assert 0 <= d["box"]["ymin"] <= d["box"]["ymax"] <= photo.height
    params = dataclasses.replace(model.params, score_thresh=0.05)
    ((boxes, scores, labels),) = detect(model.model, model.rpn, [photo.convert("RGB")], model.class_embeddings(
        ["woman", "uniform", "flag"]), params)  # fmt: skip
    best = int(torch.argmax(scores))
    assert found[0]["score"] == pytest.approx(float(scores[best]))
    assert found[0]["box"]["xmin"] == int(boxes[best, 0])


def test_a_list_of_images_gives_a_list_per_image(model):
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(64, 64), (48, 80)]
    ]
    both = model(images, candidate_labels=["cat", "dog"], threshold=0.0, top_k=3)
    alone = model(images[1], candidate_labels=["cat", "dog"], threshold=0.0, top_k=3)
    assert len(both) == 2 and [(d["label"], d["box"]) for d in both[1]] == [
        (d["label"], d["box"]) for d in alone
    ]
    # a padded batch of two sizes moves scores in the 7th digit only
    assert [d["score"] for d in both[1]] == pytest.approx([d["score"] for d in alone], abs=1e-5)


def test_bad_calls_say_what_is_wrong(tiny_clip, model):
    name, config = tiny_clip
    image = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="candidate_labels is empty"):
        model(image, candidate_labels=[])
    with pytest.raises(ValueError, match="top_k"):
        model(image, candidate_labels=["cat"], top_k=0)
    no_rpn = RegionCLIP.from_pretrained(name, model_config=config, device="cpu")
    with pytest.raises(ValueError, match="no RPN"):
        no_rpn(image, candidate_labels=["cat"])


def test_region_features_of_a_checkpoint_folder(model, tmp_path):
    folder = save_clip_checkpoint(model.model.model, model.model.model_cfg, tmp_path / "student",
                                  {"model": model.model.identity["model"]})  # fmt: skip
    reloaded = RegionCLIP.from_pretrained(folder, device="cpu", short_side=64, max_side=96)
    photo = Image.open(PHOTO).convert("RGB")
    boxes = [[0, 0, photo.width, photo.height], [100.5, 50, 300, 400]]
    features = reloaded.encode_regions(photo, boxes)
    assert features.shape == (2, model.model.embed_dim)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2))
    (expected,) = encode_regions(model.model.model, [photo], [torch.tensor(boxes)], 64, 96, normalize=True)
    assert torch.allclose(features, expected, atol=1e-6)
