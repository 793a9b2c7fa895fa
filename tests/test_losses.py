"""Losses against hand formulas and naive float64 loops on tiny inputs; a 2-process gloo check."""

from __future__ import annotations

import datetime
import math
import socket

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from regionclip.losses import (
    RegionCLIPLoss,
    distillation_kl,
    image_text_contrastive,
    region_concept_contrastive,
    teacher_log_probs_from_embeddings,
    teacher_log_probs_from_topk,
)

E = math.e


def _unit(rows: torch.Tensor) -> list[list[float]]:
    return [[v / math.sqrt(sum(x * x for x in r)) for v in r] for r in rows.tolist()]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _naive_contrastive(regions, target_emb, ids, t):
    r, c = _unit(regions), _unit(target_emb)
    total = 0.0
    for i in range(len(r)):
        ex = [math.exp(_dot(r[i], c[j]) / t) for j in range(len(c))]
        pos = sum(ex[j] for j in range(len(c)) if ids[j] == ids[i])
        total += -math.log(pos / sum(ex))
    return total / len(r)


def _naive_kl(student, concepts, teacher_probs, t):
    s, c = _unit(student), _unit(concepts)
    total = 0.0
    for i in range(len(s)):
        ex = [math.exp(_dot(s[i], ck) / t) for ck in c]
        z = sum(ex)
        for k, p in enumerate(teacher_probs[i]):
            if p > 0:
                total += p * (math.log(p) - math.log(ex[k] / z))
    return total / len(s)


def _naive_clip(images, texts, t):
    a, b = _unit(images), _unit(texts)
    n = len(a)
    s = [[_dot(a[i], b[j]) / t for j in range(n)] for i in range(n)]
    img = sum(-math.log(math.exp(s[i][i]) / sum(math.exp(x) for x in s[i])) for i in range(n)) / n
    txt = sum(-math.log(math.exp(s[j][j]) / sum(math.exp(s[i][j]) for i in range(n))) for j in range(n)) / n
    return (img + txt) / 2


# --------------------------------------------------------------------------------------------
# Region-concept contrastive
# --------------------------------------------------------------------------------------------


def test_contrastive_duplicates_hand_value():
    # r0 and r2 both carry concept 0, so in rows 0 and 2 columns 0 and 2 are positives (summed).
    regions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    concepts = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)  # normalised inside
    ids = torch.tensor([0, 1, 0])
    # logits rows: [1, 0, 1], [0, 1, 0], [1, 0, 1] at T = 1
    expected = (2 * math.log((2 * E + 1) / (2 * E)) + math.log((E + 2) / E)) / 3
    loss = region_concept_contrastive(regions, ids, concepts, temperature=1.0)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # same numbers when the targets' embeddings are passed already gathered
    loss2 = region_concept_contrastive(regions, ids, target_emb=concepts[ids], temperature=1.0)
    assert loss2.item() == pytest.approx(expected, abs=1e-12)
    # treating duplicates as negatives (plain CE on the diagonal) would give a larger value
    plain = (2 * math.log((2 * E + 1) / E) + math.log((E + 2) / E)) / 3
    assert plain - expected > 0.3


def test_contrastive_single_region_is_zero():
    region = torch.tensor([[0.3, -0.7, 0.2]], requires_grad=True)
    concepts = torch.randn(5, 3)
    loss = region_concept_contrastive(region, torch.tensor([4]), concepts)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(region.grad == 0)


def test_contrastive_matches_naive_float64_at_t001():
    g = torch.Generator().manual_seed(0)
    regions = torch.randn(7, 5, generator=g, dtype=torch.float64)
    concepts = torch.randn(4, 5, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 2, 2, 1, 2, 3, 0])
    expected = _naive_contrastive(regions, concepts[ids], ids.tolist(), 0.01)
    assert region_concept_contrastive(regions, ids, concepts).item() == pytest.approx(expected, rel=1e-10)
    # fp32 inputs compute the same thing at fp32 precision
    got32 = region_concept_contrastive(regions.float(), ids, concepts.float())
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(expected, rel=1e-4)


def test_no_kept_regions_gives_zero_connected_to_graph():
    all_regions = torch.randn(4, 3, requires_grad=True)
    keep = torch.zeros(4, dtype=torch.bool)
    concepts = torch.randn(6, 3)
    ids = torch.tensor([1, 2, 3, 4])
    kept = all_regions[keep]
    con = region_concept_contrastive(kept, ids[keep], concepts)
    kl = distillation_kl(kept, concepts, torch.zeros(0, 6))
    for loss in (con, kl):
        assert loss.item() == 0.0
        assert loss.grad_fn is not None
    (con + kl).backward()
    assert all_regions.grad is not None and torch.all(all_regions.grad == 0)


def test_contrastive_rejects_bad_shapes():
    with pytest.raises(ValueError, match="exactly one"):
        region_concept_contrastive(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target_ids"):
        region_concept_contrastive(torch.randn(2, 3), torch.tensor([0, 1, 1]), torch.randn(4, 3))
    with pytest.raises(ValueError, match="dims differ"):
        region_concept_contrastive(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(4, 5))
    with pytest.raises(ValueError, match="temperature"):
        region_concept_contrastive(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(4, 3), temperature=0)


# --------------------------------------------------------------------------------------------
# Distillation and teacher rebuilds
# --------------------------------------------------------------------------------------------


def test_kl_matches_naive_float64():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(3, 4, generator=g, dtype=torch.float64)
    concepts = torch.randn(5, 4, generator=g, dtype=torch.float64)
    teacher_lp = torch.log_softmax(torch.randn(3, 5, generator=g, dtype=torch.float64) * 3, dim=1)
    for t in (1.0, 0.01):
        expected = _naive_kl(student, concepts, teacher_lp.exp().tolist(), t)
        assert distillation_kl(student, concepts, teacher_lp, t).item() == pytest.approx(expected, rel=1e-10)


def test_kl_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(2)
    regions = torch.randn(4, 6, generator=g)
    concepts = torch.randn(9, 6, generator=g)
    teacher_lp = teacher_log_probs_from_embeddings(regions, concepts, 0.01)
    student = regions.clone().requires_grad_(True)
    loss = distillation_kl(student, concepts, teacher_lp, 0.01)
    loss.backward()
    assert abs(loss.item()) < 1e-5
    assert student.grad.abs().max().item() < 1e-3


def test_topk_rebuild_renormalises():
    ids = torch.tensor([[2, 0], [1, 3]])
    logits = torch.tensor([[1.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float16)
    lp = teacher_log_probs_from_topk(ids, logits, 4)
    assert lp.dtype == torch.float32 and lp.shape == (2, 4)
    p = lp.exp()
    expected = [[1 / (1 + E), 0.0, E / (1 + E), 0.0], [0.0, 0.75, 0.0, 0.25]]
    assert p.tolist() == pytest.approx([pytest.approx(r, abs=1e-3) for r in expected])
    assert torch.allclose(p.sum(1), torch.ones(2))
    assert lp[0, 1] == float("-inf") and lp[0, 3] == float("-inf") and lp[1, 0] == float("-inf")


def test_kl_with_topk_teacher_is_finite_and_matches_naive():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    concepts = torch.randn(5, 3, generator=g, dtype=torch.float64)
    lp = teacher_log_probs_from_topk(
        torch.tensor([[4, 1], [0, 2]]), torch.tensor([[2.0, 0.5], [0.0, 1.0]]), 5
    )
    loss = distillation_kl(student, concepts, lp.double(), 0.01)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(student.grad).all()
    expected = _naive_kl(student.detach(), concepts, lp.double().exp().tolist(), 0.01)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_topk_rejects_duplicate_and_out_of_range_ids():
    with pytest.raises(ValueError, match="repeat"):
        teacher_log_probs_from_topk(torch.tensor([[1, 1]]), torch.zeros(1, 2), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        teacher_log_probs_from_topk(torch.tensor([[1, 4]]), torch.zeros(1, 2), 4)


def test_embedding_rebuild_is_softmax_of_cosine_over_t():
    teacher = torch.tensor([[3.0, 0.0]], dtype=torch.float16)  # fp16 as stored in shards
    concepts = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    lp = teacher_log_probs_from_embeddings(teacher, concepts, 0.5)  # logits [2, 0, -2]
    assert lp.dtype == torch.float32
    z = E**2 + 1 + E**-2
    assert lp.exp()[0].tolist() == pytest.approx([E**2 / z, 1 / z, E**-2 / z], abs=1e-6)


def test_numerics_at_t001_with_cosines_of_plus_minus_one():
    # Row 0's only positive has cos -1 (logit -100) against a negative at +100: its probability
    # e^-200 underflows in fp32, a prob-space log would be inf; in log space the loss is 200.
    regions = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    loss = region_concept_contrastive(regions, torch.tensor([0, 1]), target_emb=targets, temperature=0.01)
    loss.backward()
    assert loss.item() == pytest.approx((200.0 + 0.0) / 2, rel=1e-6)
    assert torch.isfinite(regions.grad).all()
    # KL: the teacher puts all mass where the student's logit is -100 (q = e^-200 in exact math)
    student = torch.tensor([[1.0, 0.0]], requires_grad=True)
    concepts = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    teacher_lp = torch.tensor([[0.0, float("-inf")]])
    kl = distillation_kl(student, concepts, teacher_lp, 0.01)
    kl.backward()
    assert kl.item() == pytest.approx(200.0, rel=1e-6)
    assert torch.isfinite(student.grad).all()
    it = image_text_contrastive(regions, -targets.flip(0), 0.01)
    assert math.isfinite(it.item())


def test_low_precision_inputs_are_computed_in_fp32():
    g = torch.Generator().manual_seed(4)
    regions = torch.randn(5, 8, generator=g).bfloat16()
    concepts = torch.randn(3, 8, generator=g).bfloat16()
    ids = torch.tensor([0, 1, 1, 2, 0])
    got = region_concept_contrastive(regions, ids, concepts)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(
        region_concept_contrastive(regions.float(), ids, concepts.float()).item()
    )


def test_losses_ignore_autocast():
    # Under bf16 autocast a matmul would round logits near 100 to steps of 0.5; the losses switch
    # autocast off, so they equal the fp32 values.
    g = torch.Generator().manual_seed(8)
    regions = torch.randn(6, 16, generator=g)
    concepts = torch.randn(4, 16, generator=g)
    ids = torch.tensor([0, 1, 1, 2, 3, 0])
    teacher = torch.log_softmax(torch.randn(6, 4, generator=g), dim=1)
    fns = (
        lambda: region_concept_contrastive(regions, ids, concepts),
        lambda: distillation_kl(regions, concepts, teacher),
        lambda: image_text_contrastive(regions, regions.roll(1, dims=1)),
    )
    for fn in fns:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn()
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(fn().item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Image-text contrastive
# --------------------------------------------------------------------------------------------


def test_image_text_b2_hand_value():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    a = 1 / math.sqrt(2)
    # S = [[1, a], [0, a]] at T = 1
    img = (-math.log(E / (E + math.exp(a))) - math.log(math.exp(a) / (1 + math.exp(a)))) / 2
    txt = (-math.log(E / (E + 1)) + math.log(2)) / 2
    assert image_text_contrastive(images, texts, 1.0).item() == pytest.approx((img + txt) / 2, abs=1e-6)


def test_image_text_b3_matches_naive_at_t001():
    g = torch.Generator().manual_seed(5)
    images = torch.randn(3, 4, generator=g, dtype=torch.float64)
    texts = images + 0.8 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    expected = _naive_clip(images, texts, 0.01)
    assert image_text_contrastive(images, texts).item() == pytest.approx(expected, rel=1e-10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    images = torch.randn(6, 4, generator=g, dtype=torch.float64)
    return images, images + torch.randn(6, 4, generator=g, dtype=torch.float64)


def _gather_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        images, texts = _global_batch()
        rows = slice(rank * 3, (rank + 1) * 3)
        out = {}
        for gather_with_grad in (True, False):
            img = images[rows].clone().requires_grad_(True)
            txt = texts[rows].clone().requires_grad_(True)
            loss = image_text_contrastive(
                img, txt, 0.05, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size
            )
            loss.backward()
            tag = "grad" if gather_with_grad else "nograd"
            out.update(
                {f"{tag}_loss": loss.detach().reshape(1), f"{tag}_img": img.grad, f"{tag}_txt": txt.grad}
            )
        safetensors.torch.save_file(out, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_two_process_gather_with_grad_matches_single_process(tmp_path):
    images, texts = _global_batch()
    img, txt = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    full = image_text_contrastive(img, txt, 0.05)
    full.backward()
    # fork: the children inherit the imported modules instead of re-importing torch + open_clip
    mp.start_processes(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    for rank in range(2):
        got = safetensors.torch.load_file(tmp_path / f"rank{rank}.safetensors")
        rows = slice(rank * 3, (rank + 1) * 3)
        for tag in ("grad", "nograd"):
            assert got[f"{tag}_loss"].item() == pytest.approx(full.item(), abs=1e-12)
        # with gradient: backward of all_gather sums the ranks' identical dL/dx, so each rank holds
        # world_size x its rows of the 1-process gradient; DDP's mean over ranks undoes the factor.
        torch.testing.assert_close(got["grad_img"], 2 * img.grad[rows], atol=1e-6, rtol=0)
        torch.testing.assert_close(got["grad_txt"], 2 * txt.grad[rows], atol=1e-6, rtol=0)
        # without: only the local path, 1 x the rows (DDP's mean would then halve the gradient)
        torch.testing.assert_close(got["nograd_img"], img.grad[rows], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# Combined module
# --------------------------------------------------------------------------------------------


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "image_emb": torch.randn(2, 4, generator=g),
        "text_emb": torch.randn(2, 4, generator=g),
        "region_emb": torch.randn(3, 4, generator=g),
        "concept_emb": torch.randn(5, 4, generator=g),
        "target_ids": torch.tensor([1, 3, 1]),
        "teacher_emb": torch.randn(3, 4, generator=g).half(),
    }


def test_regionclip_loss_weighted_sum():
    x = _inputs()
    out = RegionCLIPLoss(image_text_weight=1.0, distill_weight=0.5, contrastive_weight=2.0)(x)
    it = image_text_contrastive(x["image_emb"], x["text_emb"])
    teacher = teacher_log_probs_from_embeddings(x["teacher_emb"], x["concept_emb"], 0.01)
    kd = distillation_kl(x["region_emb"], x["concept_emb"], teacher)
    con = region_concept_contrastive(x["region_emb"], x["target_ids"], x["concept_emb"])
    assert out["image_text"].item() == pytest.approx(it.item())
    assert out["distill"].item() == pytest.approx(kd.item())
    assert out["contrastive"].item() == pytest.approx(con.item())
    assert out["loss"].item() == pytest.approx(it.item() + 0.5 * kd.item() + 2.0 * con.item(), rel=1e-6)
    # the same teacher given as log-probs gives the same distillation term
    given = RegionCLIPLoss(image_text_weight=0, contrastive_weight=0)({**x, "teacher_log_probs": teacher})
    assert given["distill"].item() == pytest.approx(kd.item())


def test_regionclip_loss_image_text_only_needs_no_region_inputs():
    x = _inputs()
    loss = RegionCLIPLoss(distill_weight=0, contrastive_weight=0)
    out = loss({"image_emb": x["image_emb"], "text_emb": x["text_emb"]})
    assert set(out) == {"image_text", "loss"}
    assert out["loss"].item() == pytest.approx(image_text_contrastive(x["image_emb"], x["text_emb"]).item())


def test_regionclip_loss_errors():
    with pytest.raises(ValueError, match="all loss weights are 0"):
        RegionCLIPLoss(0, 0, 0)
    x = _inputs()
    del x["teacher_emb"]
    with pytest.raises(KeyError, match="teacher_log_probs"):
        RegionCLIPLoss()(x)
    with pytest.raises(KeyError, match="'text_emb'"):
        RegionCLIPLoss(distill_weight=0, contrastive_weight=0)({"image_emb": x["image_emb"]})
