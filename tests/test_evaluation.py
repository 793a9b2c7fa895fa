"""COCO AP by split, zero-shot region recognition and detection, vocabulary checks."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from data_prep import lvis_format
from pipelines import eval as eval_pipeline
from regionclip.config import ClipModelConfig
from regionclip.data.coco import CocoImage, category_splits, read_coco
from regionclip.evaluation.coco_ap import COCO_STAT_NAMES, coco_ap_by_split
from regionclip.evaluation.evaluator import COCOEvaluator, LVISEvaluator, evaluator_for, vocabulary_classes
from regionclip.evaluation.lvis_ap import is_lvis_format, lvis_ap_by_split
from regionclip.evaluation.thresholds import best_f1_threshold
from regionclip.evaluation.zero_shot import (
    DetectionParams,
    detections_from_regions,
    region_accuracy,
    zero_shot_detection,
)
from regionclip.labeling.proposals import PrecomputedProposals
from regionclip.models.loading import load_clip
from regionclip.models.region import encode_regions
from regionclip.models.rpn import load_rpn
from regionclip.text import class_embeddings_for, load_embeddings, save_embeddings

# Two 100x100 images. Categories 1, 2 are base, 3 novel, 4 has no box anywhere.
GT = {
    "images": [
        {"id": 1, "file_name": "a.png", "width": 100, "height": 100},
        {"id": 2, "file_name": "b.png", "width": 100, "height": 100},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [50, 50, 20, 20]},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [10, 10, 30, 30]},
        {"id": 4, "image_id": 2, "category_id": 2, "bbox": [60, 60, 20, 20]},
    ],
    "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3, 4)],
}
SPLITS = {"base": [1, 2], "novel": [3], "empty": [4]}


def _det(image_id: int, cat: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


def _perfect(cats=(1, 2, 3)) -> list[dict]:
    return [
        _det(a["image_id"], a["category_id"], a["bbox"], 0.9)
        for a in GT["annotations"]
        if a["category_id"] in cats
    ]


def test_perfect_detections_give_one(tmp_path: Path) -> None:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(GT))
    out = coco_ap_by_split(path, _perfect(), SPLITS)
    assert out["AP50"] == pytest.approx({"base": 1.0, "novel": 1.0, "empty": None, "all": 1.0})
    assert out["AP"]["all"] == pytest.approx(1.0)
    assert list(out["coco"]) == list(COCO_STAT_NAMES)
    assert out["coco"]["AP50"] == pytest.approx(1.0)
    assert out["coco"]["APl"] == -1.0  # every GT box is small: undefined, pycocotools' -1
    assert out["num_detections"] == 4


def test_split_without_detections_is_zero() -> None:
    out = coco_ap_by_split(GT, _perfect(cats=(1, 2)), SPLITS)
    assert out["AP50"]["base"] == pytest.approx(1.0)
    assert out["AP50"]["novel"] == 0.0
    # "all" averages the three categories with GT: (1 + 1 + 0) / 3
    assert out["AP50"]["all"] == pytest.approx(2 / 3)
    assert out["per_category_AP50"] == pytest.approx({1: 1.0, 2: 1.0, 3: 0.0})


def test_false_positive_between_true_positives() -> None:
    # Category 1 (2 GT boxes): TP 0.9, FP 0.8 (empty corner), TP 0.7.
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> interpolated 1 up to recall 0.5, then 2/3.
    # 101 recall points: 0.00..0.50 (51 points) at 1, 0.51..1.00 (50 points) at 2/3.
    dets = [
        _det(1, 1, [10, 10, 20, 20], 0.9),
        _det(1, 1, [75, 0, 20, 20], 0.8),
        _det(2, 1, [10, 10, 30, 30], 0.7),
    ]
    out = coco_ap_by_split(GT, dets, {"base": [1], "novel": [3]})
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    assert out["per_category_AP50"][1] == pytest.approx(expected)
    assert out["AP50"]["base"] == pytest.approx(expected)
    assert out["AP50"]["novel"] == 0.0
    assert out["AP50"]["all"] == pytest.approx(expected / 3)  # categories 2 and 3 score 0


def test_low_iou_detection_is_not_a_hit() -> None:
    # IoU of [10,10,20,20] with [20,10,20,20] is 200 / 600 = 1/3 < 0.5
    out = coco_ap_by_split(GT, [_det(1, 3, [40, 50, 20, 20], 0.9)], {"novel": [3]})
    assert out["AP50"]["novel"] == 0.0


def test_empty_results_give_zeros() -> None:
    out = coco_ap_by_split(GT, [], SPLITS)
    assert out["AP50"] == {"base": 0.0, "novel": 0.0, "empty": None, "all": 0.0}
    assert all(v == 0.0 for v in out["coco"].values())
    assert out["num_detections"] == 0


def test_unknown_image_id_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="image_id 7 is not in the ground truth"):
        coco_ap_by_split(GT, [_det(7, 1, [0, 0, 5, 5], 0.5)], SPLITS)


def test_results_are_not_mutated() -> None:
    dets = _perfect()
    before = json.dumps(dets)
    coco_ap_by_split(GT, dets, SPLITS)
    assert json.dumps(dets) == before


# --------------------------------------------------------------------------------------------
# Region recognition, vocabularies, zero-shot detection (tiny random models)
# --------------------------------------------------------------------------------------------

# Each category has exactly one box, so embedding a category as its own box's region embedding
# must classify every box correctly (cosine 1 with itself, < 1 with the other boxes).
TINY_CATS = [
    {"id": 10, "name": "red square", "split": "base"},
    {"id": 20, "name": "green bar", "split": "base"},
    {"id": 30, "name": "blue blob", "split": "novel"},
]
TINY_IMAGES = {
    "p.png": [(4, 6, 24, 20, 10), (36, 30, 22, 26, 30)],
    "q.png": [(20, 12, 30, 18, 20)],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_tiny_set(root: Path) -> Path:
    """Two 64x64 PNGs with coloured rectangles and their COCO json; returns the json path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    coco = {"images": [], "annotations": [], "categories": TINY_CATS}
    colours = {10: (220, 30, 30), 20: (30, 200, 40), 30: (40, 60, 230)}
    for i, (name, objects) in enumerate(TINY_IMAGES.items(), 1):
        image = Image.fromarray(rng.integers(100, 160, size=(64, 64, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for x, y, w, h, cat in objects:
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colours[cat])
            coco["annotations"].append(
                {"id": len(coco["annotations"]) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, w, h]}
            )
        image.save(root / "images" / name)
        coco["images"].append({"id": i, "file_name": name, "width": 64, "height": 64})
    path = root / "val.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny_clip):
    name, config = tiny_clip
    torch.manual_seed(0)
    return load_clip(ClipModelConfig(model=name, model_config=config))


def _gt_region_embeddings(model, json_path: Path) -> torch.Tensor:
    """The region embedding of each category's single GT box, rows in category order."""
    data = read_coco(json_path, json_path.parent / "images")
    rows = {}
    with torch.no_grad():
        for im in data.images:
            (emb,) = encode_regions(model.model, [Image.open(im.path)], [im.boxes], 64, 64)
            for label, e in zip(im.labels.tolist(), emb, strict=True):
                rows[label] = e
    return torch.stack([rows[i] for i in range(len(TINY_CATS))])


def test_region_accuracy_with_the_boxes_own_embeddings(tmp_path: Path, tiny_model) -> None:
    json_path = write_tiny_set(tmp_path)
    emb = _gt_region_embeddings(tiny_model, json_path)
    acc = region_accuracy(tiny_model, json_path, tmp_path / "images", emb, None, 64, 64, batch_size=1)
    assert acc["all"] == {"top1": 1.0, "top5": 1.0, "n": 3}
    assert acc["base"] == {"top1": 1.0, "top5": 1.0, "n": 2}
    assert acc["novel"] == {"top1": 1.0, "top5": 1.0, "n": 1}
    # Swap the two base classes: both base boxes are now wrong, the novel one still right.
    swapped = emb[[1, 0, 2]]
    acc = region_accuracy(tiny_model, json_path, tmp_path / "images", swapped, None, 64, 64, batch_size=2)
    assert acc["base"]["top1"] == 0.0
    assert acc["novel"]["top1"] == 1.0
    assert acc["all"]["top1"] == pytest.approx(1 / 3)
    assert acc["all"]["top5"] == 1.0  # 3 classes: every label is within the top 5


def test_vocabulary_errors_name_the_problem(tmp_path: Path, tiny_model) -> None:
    json_path = write_tiny_set(tmp_path)
    root = tmp_path / "images"
    with pytest.raises(ValueError, match=r"dimension 32 but the model embeds to 64"):
        region_accuracy(tiny_model, json_path, root, torch.randn(3, 32), None, 64, 64)
    with pytest.raises(ValueError, match=r"2 class embeddings but .*val\.json has 3 categories"):
        region_accuracy(tiny_model, json_path, root, torch.randn(2, 64), None, 64, 64)
    (root / "q.png").unlink()
    with pytest.raises(ValueError, match=r"val\.json: 1 of 2 image files do not exist .*'q\.png'"):
        read_coco(json_path, root)


def test_splits_from_names_when_json_has_none() -> None:
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    assert category_splits(cats, novel=["c"]) == {"base": [1, 2], "novel": [3]}
    assert category_splits(cats) == {}
    assert category_splits(TINY_CATS) == {"base": [10, 20], "novel": [30]}
    with pytest.raises(ValueError, match="'zebra'"):
        category_splits(cats, novel=["zebra"])


def test_class_embeddings_are_cached_per_vocabulary(tmp_path: Path, tiny_model) -> None:
    first = class_embeddings_for(tiny_model, ["cat", "dog"], "single", tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and first.shape == (2, 64)
    cached, names, meta = load_embeddings(files[0])
    assert names == ["cat", "dog"] and meta["template_set"] == "single"
    assert torch.equal(class_embeddings_for(tiny_model, ["cat", "dog"], "single", tmp_path), first)
    other = class_embeddings_for(tiny_model, ["dog", "cat"], "single", tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert torch.allclose(other, first[[1, 0]], atol=1e-5)


def test_detections_from_regions_by_hand() -> None:
    e = torch.eye(2)
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9]])
    regions = torch.stack([e[0], 3 * e[1], e[0]])  # the third box overlaps the first (IoU 0.9)
    objectness = torch.tensor([0.25, 0.64, 0.16])
    p = DetectionParams(score_thresh=0.3, multiply_rpn_score=True)
    b, s, lab = detections_from_regions(boxes, regions, e, objectness, p)
    # probability ~1 for the matching class (the other gets e^-100); sqrt(1 * objectness)
    assert lab.tolist() == [1, 0]
    assert s.tolist() == pytest.approx([0.8, 0.5])
    assert torch.equal(b, boxes[[1, 0]])  # the third box lost the per-class NMS to the first
    # Temperature 1, no objectness: softmax([1, 0]) = [e/(e+1), 1/(e+1)] = [0.731, 0.269]
    p = DetectionParams(temperature=1.0, score_thresh=0.2, nms_thresh=0.5, multiply_rpn_score=False)
    b, s, lab = detections_from_regions(boxes[:1], regions[:1], e, None, p)
    assert lab.tolist() == [0, 1]
    assert s.tolist() == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)])
    p = DetectionParams(temperature=1.0, score_thresh=0.2, max_dets=1, multiply_rpn_score=False)
    assert len(detections_from_regions(boxes[:1], regions[:1], e, None, p)[0]) == 1


def _eval_argv(tmp_path: Path, tiny_clip, json_path: Path, *extra: str) -> list[str]:
    """``pipelines.eval`` arguments for the tiny set with the tiny CLIP, plus ``extra``."""
    name, config = tiny_clip
    return [
        f"output_dir={tmp_path}",
        "device=cpu",
        f"eval.model.model={name}",
        f"eval.model.model_config={config}",
        f"eval.json={json_path}",
        f"eval.image_root={tmp_path / 'images'}",
        *extra,
    ]


def test_zero_shot_detection_and_eval_pipeline(tmp_path: Path, tiny_model, tiny_clip, tiny_rpn_dir) -> None:
    json_path = write_tiny_set(tmp_path)
    rpn_dir = tiny_rpn_dir
    emb = _gt_region_embeddings(tiny_model, json_path)
    params = DetectionParams(rpn_post_nms_top_n=10, short_side=64, max_side=64)
    ap, results = zero_shot_detection(
        tiny_model, load_rpn(rpn_dir), json_path, tmp_path / "images", emb, None, params, batch_size=2
    )
    assert set(ap["AP50"]) == {"base", "novel", "all"}
    assert 0 < len(results) <= 2 * params.max_dets
    assert {r["image_id"] for r in results} <= {1, 2}
    assert {r["category_id"] for r in results} <= {10, 20, 30}
    assert all(0 < r["score"] <= 1 and len(r["bbox"]) == 4 for r in results)

    out = tmp_path / "eval"
    code = eval_pipeline.main(
        _eval_argv(
            tmp_path,
            tiny_clip,
            json_path,
            f"eval.rpn={rpn_dir}",
            f"eval.out_dir={out}",
            "eval.templates=single",
            "eval.rpn_topk=10",
            "eval.short_side=64",
            "eval.max_side=64",
            "eval.tag=tiny",
        )  # fmt: skip
    )
    assert code == 0
    report = json.loads((out / "tiny.json").read_text())
    assert report["tag"] == "tiny" and report["images"] == 2
    assert report["region_accuracy"]["all"]["n"] == 3
    assert report["region_accuracy"]["novel"]["n"] == 1
    assert set(report["zero_shot_detection"]["AP50"]) == {"base", "novel", "all"}
    assert len(report["zero_shot_detection"]["coco"]) == 12
    assert isinstance(json.loads((out / "tiny.detections.json").read_text()), list)
    assert len(list((tmp_path / "eval" / "cache").glob("*.safetensors"))) == 1


def test_zero_shot_detection_on_your_own_proposals(tmp_path: Path, tiny_model, tiny_clip, capsys) -> None:
    json_path = write_tiny_set(tmp_path)
    emb = _gt_region_embeddings(tiny_model, json_path)  # each GT box is its own category's embedding
    gt = {"p.png": [[4, 6, 28, 26], [36, 30, 58, 56]], "q.png": [[20, 12, 50, 30]]}
    table = {
        "p.png": (torch.tensor([*gt["p.png"], [0, 0, 10, 60]], dtype=torch.float32), torch.tensor([0.9, 0.8, 0.3])),
        "q.png": (torch.tensor(gt["q.png"], dtype=torch.float32), torch.tensor([0.7])),
    }  # fmt: skip
    # a temperature this low makes each GT box certain of its own category (the tiny CLIP's region
    # embeddings differ by little), so every detection ranks as computed by hand
    params = DetectionParams(temperature=1e-5, short_side=64, max_side=64, rpn_post_nms_top_n=3)
    ap, results = zero_shot_detection(tiny_model, PrecomputedProposals(table), json_path, tmp_path / "images",
                                      emb, None, params)  # fmt: skip
    assert ap["AP50"] == pytest.approx({"base": 1.0, "novel": 1.0, "all": 1.0})
    # only the best-scoring proposal of p.png: its blue blob (the novel class) has no box left
    params = dataclasses.replace(params, rpn_post_nms_top_n=1)
    ap, _ = zero_shot_detection(tiny_model, PrecomputedProposals(table), json_path, tmp_path / "images",
                                emb, None, params)  # fmt: skip
    assert ap["AP50"]["base"] == pytest.approx(1.0) and ap["AP50"]["novel"] == 0.0

    proposals = tmp_path / "proposals.json"
    proposals.write_text(json.dumps({"p.png": {"boxes": gt["p.png"]}}))
    out = tmp_path / "eval"
    argv = _eval_argv(tmp_path, tiny_clip, json_path, f"eval.precomputed={proposals}", "eval.rpn=",
                      f"eval.out_dir={out}", "eval.templates=single", "eval.short_side=64", "eval.max_side=64",
                      "eval.tag=own")  # fmt: skip
    assert eval_pipeline.main(argv) == 1
    err = capsys.readouterr().err
    assert str(proposals) in err and "1 images" in err and "q.png" in err
    proposals.write_text(json.dumps({k: {"boxes": v} for k, v in gt.items()}))
    assert eval_pipeline.main(argv) == 0
    detection = json.loads((out / "own.json").read_text())["zero_shot_detection"]
    assert detection["precomputed"] == str(proposals) and "rpn" not in detection
    assert set(detection["AP50"]) == {"base", "novel", "all"}


def test_eval_pipeline_reports_bad_embeddings_file(tmp_path: Path, tiny_model, tiny_clip, capsys) -> None:
    json_path = write_tiny_set(tmp_path)
    bad = tmp_path / "emb.safetensors"
    save_embeddings(bad, torch.randn(3, 16), [c["name"] for c in TINY_CATS], {})
    code = eval_pipeline.main(
        _eval_argv(tmp_path, tiny_clip, json_path, f"eval.class_embeddings={bad}", "eval.rpn=")
    )
    assert code == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "dimension 16" in err and "64" in err


def test_eval_pipeline_skips_a_finished_run_of_the_same_config(tmp_path: Path, tiny_clip, capsys) -> None:
    json_path = write_tiny_set(tmp_path)
    argv = _eval_argv(tmp_path, tiny_clip, json_path, f"eval.out_dir={tmp_path / 'eval'}", "eval.cache_dir=",
                      "eval.templates=single", "eval.short_side=64", "eval.max_side=64", "eval.rpn=", "eval.tag=t")  # fmt: skip
    report = tmp_path / "eval" / "t.json"
    assert eval_pipeline.main(argv) == 0
    first = report.stat().st_mtime_ns
    capsys.readouterr()
    assert eval_pipeline.main(argv) == 0
    assert "holds the results of this config; skipping" in capsys.readouterr().out
    assert report.stat().st_mtime_ns == first
    assert eval_pipeline.main([*argv, "eval.temperature=0.02"]) == 0  # another config: evaluated again
    assert "skipping" not in capsys.readouterr().out
    assert json.loads(report.read_text())["config"]["temperature"] == 0.02
    data = json.loads(json_path.read_text())
    data["annotations"] = data["annotations"][:-1]
    json_path.write_text(json.dumps(data))  # same path, other boxes: evaluated again
    assert eval_pipeline.main([*argv, "eval.temperature=0.02"]) == 0
    assert json.loads(report.read_text())["region_accuracy"]["all"]["n"] == 2


def _gt_image(image_id, boxes, cats):
    return CocoImage(
        image_id, f"{image_id}.png", Path(f"{image_id}.png"), torch.tensor(boxes, dtype=torch.float32), cats,
        torch.zeros(len(cats), dtype=torch.int64),
    )  # fmt: skip


def test_f1_threshold_by_hand() -> None:
    """Image 1: a dog at (0,0,10,10), a cat at (20,20,30,30); image 2: a dog at (0,0,10,10).
    In score order: 0.9 dog hit, 0.8 cat on the dog box (wrong class: miss), 0.7 second dog on
    the matched dog box (duplicate: miss), 0.6 image-2 dog hit, 0.2 cat hit.
    F1 = 2PR/(P+R) after each: 2(1)(1/3)/(4/3) = 0.5, 2(1/2)(1/3)/(5/6) = 0.4, 1/3,
    2(2/4)(2/3)/(7/6) = 4/7, 2(3/5)(1)/(8/5) = 0.75 -> threshold 0.2."""
    images = [_gt_image(1, [[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2]), _gt_image(2, [[0, 0, 10, 10]], [1])]

    def det(image_id, cat, box, score):
        return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}

    dets = [
        det(1, 1, [0, 0, 10, 10], 0.9),
        det(1, 2, [0, 0, 10, 10], 0.8),
        det(1, 1, [1, 1, 10, 10], 0.7),
        det(2, 1, [0, 0, 10, 10], 0.6),
        det(1, 2, [20, 20, 10, 10], 0.2),
    ]
    point = best_f1_threshold(images, dets)
    assert point.threshold == 0.2 and point.detections == 5 and point.ground_truth == 3
    assert point.precision == pytest.approx(0.6) and point.recall == 1.0 and point.f1 == pytest.approx(0.75)
    # without the late cat the best point is after the image-2 dog
    point = best_f1_threshold(images, dets[:4])
    assert point.threshold == 0.6 and point.f1 == pytest.approx(4 / 7)
    assert best_f1_threshold(images, []).threshold == 1.0


# GT in LVIS format: 1 frequent, 2 common, 3 and 4 rare; image 2 says nothing about category 3
LVIS_GT = {
    **GT,
    "categories": [
        {"id": c, "name": f"c{c}", "frequency": f} for c, f in ((1, "f"), (2, "c"), (3, "r"), (4, "r"))
    ],
    "images": [
        {**GT["images"][0], "neg_category_ids": [2, 4], "not_exhaustive_category_ids": []},
        {**GT["images"][1], "neg_category_ids": [4], "not_exhaustive_category_ids": []},
    ],
}


def test_lvis_ap_by_hand() -> None:
    out = lvis_ap_by_split(LVIS_GT, _perfect(), SPLITS)
    assert out["AP50"] == pytest.approx({"base": 1.0, "novel": 1.0, "empty": None, "all": 1.0})
    assert out["lvis"]["APr"] == pytest.approx(1.0) and out["lvis"]["APc"] == pytest.approx(1.0)
    assert out["lvis"]["APf"] == pytest.approx(1.0) and out["lvis"]["APl"] is None  # no large box
    # federated: a category-3 box in image 2, which neither has one nor lists 3 as absent, is not counted
    stray = _det(2, 3, [0, 0, 20, 20], 0.95)
    assert lvis_ap_by_split(LVIS_GT, [*_perfect(), stray], SPLITS)["per_category_AP50"][3] == pytest.approx(
        1.0
    )
    # where image 2 lists 3 as absent it is a false positive above the one true positive:
    # precision 1/2 at every recall point
    negative = {
        **LVIS_GT,
        "images": [LVIS_GT["images"][0], {**LVIS_GT["images"][1], "neg_category_ids": [3, 4]}],
    }
    out = lvis_ap_by_split(negative, [*_perfect(), stray], SPLITS)
    assert out["per_category_AP50"][3] == pytest.approx(0.5) and out["lvis"]["APr"] < 1.0
    # at most max_dets per image: image 1 keeps its 0.9 box of category 1, drops the 0.8 one of 3
    dets = [_det(1, 1, [10, 10, 20, 20], 0.9), _det(1, 3, [50, 50, 20, 20], 0.8)]
    assert lvis_ap_by_split(LVIS_GT, dets, SPLITS, max_dets=1)["per_category_AP50"][3] == 0.0
    assert lvis_ap_by_split(LVIS_GT, [], SPLITS)["AP50"]["novel"] == 0.0


def test_the_json_format_picks_the_evaluator(tmp_path: Path) -> None:
    assert type(evaluator_for(GT, [1, 2, 3, 4], SPLITS)) is COCOEvaluator
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(LVIS_GT))
    evaluator = evaluator_for(path, [1, 2, 3, 4], SPLITS)
    assert type(evaluator) is LVISEvaluator
    for a in GT["annotations"]:
        x, y, w, h = a["bbox"]
        evaluator.process(a["image_id"], torch.tensor([[x, y, x + w, y + h]]), torch.tensor([0.9]),
                          torch.tensor([a["category_id"] - 1]))  # fmt: skip
    assert evaluator.evaluate()["lvis"]["AP50"] == pytest.approx(1.0)


def test_lvis_converter_tags_frequency_by_training_images(tmp_path: Path) -> None:
    train = {"images": [{"id": i} for i in range(1, 13)], "categories": GT["categories"],
             "annotations": [{"image_id": i, "category_id": 1, "bbox": [0, 0, 1, 1]} for i in range(1, 13)]
             + [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1]}] * 3}  # fmt: skip
    for name, data in (("val.json", GT), ("train.json", train)):
        (tmp_path / name).write_text(json.dumps(data))
    argv = ["--json", str(tmp_path / "val.json"), "--train-json", str(tmp_path / "train.json"),
            "--out", str(tmp_path / "lvis.json"), "--rare-max", "0", "--common-max", "10"]  # fmt: skip
    assert lvis_format.main(argv) == 0
    out = json.loads((tmp_path / "lvis.json").read_text())
    # category 1: 12 training images > 10 -> frequent; 2: one image -> common; 3, 4: none -> rare
    assert [(c["image_count"], c["frequency"]) for c in out["categories"]] == [
        (12, "f"),
        (1, "c"),
        (0, "r"),
        (0, "r"),
    ]
    assert [im["neg_category_ids"] for im in out["images"]] == [[2, 4], [3, 4]]
    assert is_lvis_format(out) and not is_lvis_format(GT)


def test_eval_pipeline_reports_lvis_ap_on_an_lvis_json(
    tmp_path: Path, tiny_model, tiny_clip, tiny_rpn_dir
) -> None:
    coco_path = write_tiny_set(tmp_path)
    coco = json.loads(coco_path.read_text())
    lvis_path = tmp_path / "val_lvis.json"
    lvis_path.write_text(json.dumps(lvis_format.to_lvis_format(coco, coco)))
    out = tmp_path / "eval"
    code = eval_pipeline.main(
        _eval_argv(
            tmp_path,
            tiny_clip,
            lvis_path,
            f"eval.rpn={tiny_rpn_dir}",
            f"eval.out_dir={out}",
            "eval.templates=single",
            "eval.rpn_topk=10",
            "eval.short_side=64",
            "eval.max_side=64",
            "eval.tag=lvis",
        )  # fmt: skip
    )
    assert code == 0
    det = json.loads((out / "lvis.json").read_text())["zero_shot_detection"]
    assert set(det["lvis"]) >= {"AP", "APr", "APc", "APf"} and "coco" not in det
    assert 0.0 <= det["lvis"]["AP"] <= 1.0


def test_vocabulary_classes_by_hand() -> None:
    cats = ["red square", "green bar", "blue blob"]
    assert vocabulary_classes(["Blue  Blob", "zebra", "red square"], cats, "val.json").tolist() == [2, -1, 0]
    with pytest.raises(ValueError, match="'Zebra' appears twice"):
        vocabulary_classes(["zebra", "Zebra", "red square"], cats, "val.json")
    with pytest.raises(ValueError, match="none of its 1 names is a category of val.json"):
        vocabulary_classes(["zebra"], cats, "val.json")


def test_any_vocabulary_with_distractors_and_a_missing_category(tmp_path: Path, tiny_model, tiny_clip,
                                                                tiny_rpn_dir) -> None:  # fmt: skip
    json_path = write_tiny_set(tmp_path)
    emb = _gt_region_embeddings(tiny_model, json_path)  # rows: red square, green bar, blue blob
    # "zebra" carries the green bar's own embedding, so the green bar's box is taken for a zebra
    vocabulary = ["blue blob", "zebra", "red square"]
    acc = region_accuracy(tiny_model, json_path, tmp_path / "images", emb[[2, 1, 0]], None, 64, 64,
                          vocabulary=vocabulary)  # fmt: skip
    assert acc["all"]["top1"] == pytest.approx(2 / 3) and acc["all"]["top5"] == pytest.approx(2 / 3)
    assert {n: r["top1"] for n, r in acc["per_name"].items()} == {
        "red square": 1.0,
        "green bar": 0.0,
        "blue blob": 1.0,
    }
    assert acc["top1_predictions"] == {"blue blob": 1, "zebra": 1, "red square": 1}

    names = tmp_path / "vocab.txt"
    names.write_text("red square\nblue blob\nzebra\n")  # 3 names for a json of 3, one not in it
    out = tmp_path / "eval"
    argv = _eval_argv(tmp_path, tiny_clip, json_path, f"eval.vocabulary={names}", f"eval.rpn={tiny_rpn_dir}",
                      f"eval.out_dir={out}", "eval.templates=single", "eval.rpn_topk=10", "eval.short_side=64",
                      "eval.max_side=64", "eval.tag=vocab", "eval.score_thresh=0.0")  # fmt: skip
    assert eval_pipeline.main(argv) == 0
    report = json.loads((out / "vocab.json").read_text())
    assert report["vocabulary"]["distractors"] == ["zebra"]
    assert report["vocabulary"]["categories_missing"] == ["green bar"]
    assert set(report["region_accuracy"]["per_name"]) == {"red square", "green bar", "blue blob"}
    found = {d["category_id"] for d in json.loads((out / "vocab.detections.json").read_text())}
    assert found and found <= {10, 30}  # no detection is given to a distractor or a missing category
