"""`python -m pipelines.bench`: merging results, BENCHMARKS.md rendering, usage errors (no timings)."""

from __future__ import annotations

import json

import pytest

from pipelines.bench import BENCHMARKS, main
from regionclip.benchmarks import REPO, render_markdown, run_in_subprocess
from regionclip.benchmarks.pretrain import bench_pretrain
from regionclip.benchmarks.pseudolabel import SIZES as PSEUDOLABEL_SIZES
from regionclip.benchmarks.pseudolabel import bench_pseudolabel

MACHINE = {
    "cpu": "Test CPU",
    "cores": 4,
    "usable_cores": 2,
    "memory_gib": 8.0,
    "torch_threads": 2,
    "python": "3.11.0",
    "torch": "2.0",
    "platform": "Linux",
    "gpu": None,
}


def entry(date: str, value: float, machine: dict = MACHINE) -> dict:
    return {
        "date": date,
        "command": "python -m pipelines.bench --out runs/bench --only x",
        "description": "What x measures.",
        "machine": machine,
        "figures": {"x_per_s": {"value": value, "unit": "things/s", "description": "x speed"}},
        "details": {"params": {"n": 3}},
        "load_before": 1.5,
    }


def test_render_markdown_tables_and_machine_lines():
    other = dict(MACHINE, cpu="Old CPU")
    md = render_markdown(
        {"benchmarks": {"x": entry("2024-01-02", 1234.56), "y": entry("2024-01-01", 0.5, other)}}, "b.json"
    )
    assert (
        "Machine (latest run): Test CPU, 2 usable of 4 cores, 8.0 GiB RAM, no GPU; Python 3.11.0, torch 2.0 (2 threads); Linux."
        in md
    )
    assert (
        "| x speed (`x_per_s`) | 1,234.6 | things/s | `python -m pipelines.bench --out runs/bench --only x` |"
        in md
    )
    assert "| x speed (`x_per_s`) | 0.5 | things/s |" in md
    assert (
        "## x\n\nWhat x measures.\n\nMeasured 2024-01-02 (1-min load average 1.5 at start). Parameters: n=3."
        in md
    )
    assert "Measured 2024-01-01 on Old CPU," in md  # differs from the header machine
    assert md.index("## x") < md.index("## y")
    assert "No results yet" in render_markdown({"benchmarks": {}}, "b.json")


def test_reader_bench_run_merges_with_earlier_results(tmp_path, capsys):
    # a fresh clone: the tracked results file holds other benchmarks, the scratch folder is empty
    out, md, results = tmp_path / "bench", tmp_path / "BENCH.md", tmp_path / "tracked" / "bench.json"
    results.parent.mkdir()
    results.write_text(json.dumps({"benchmarks": {"concepts": entry("2024-01-01", 7.0)}}))
    argv = ["--out", str(out), "--results", str(results), "--markdown", str(md), "--only", "reader"]
    assert main([*argv, "reader.n_samples=8", "reader.shard_size=4", "reader.repeats=1"]) == 0
    data = json.loads(results.read_text())
    assert json.loads((out / "bench.json").read_text()) == data  # the run's copy
    assert set(data["benchmarks"]) == {"concepts", "reader"}
    assert data["benchmarks"]["concepts"]["figures"]["x_per_s"]["value"] == 7.0  # kept, not re-run
    reader = data["benchmarks"]["reader"]
    assert set(reader["figures"]) == {
        "reader_images_per_s",
        "reader_images_per_s_workers2",
        "reader_peak_rss_gib",
    }
    assert reader["figures"]["reader_peak_rss_gib"]["unit"] == "GiB"
    # a Python process with torch imported holds more than 50 MiB; no machine has 1 TiB here
    assert 0.05 < reader["figures"]["reader_peak_rss_gib"]["value"] < 1024
    assert all(
        f["value"] > 0 and f["unit"] == "images/s" for k, f in reader["figures"].items() if "rss" not in k
    )
    assert [r["mode"] for r in reader["details"]["runs"]] == ["one_process", "workers2"]
    assert reader["details"]["params"]["n_samples"] == 8
    assert reader["command"].endswith("--only reader reader.n_samples=8 reader.shard_size=4 reader.repeats=1")
    text = md.read_text()
    assert "## concepts" in text and "## reader" in text and "`reader_images_per_s_workers2`" in text
    assert f"from `{results}`" in text
    assert "reader: reader_images_per_s=" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--only", "nope"], ["reader"], ["nope.x=1"], ["reader.n_samples"]])
def test_usage_errors(argv, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), *argv])
    assert e.value.code == 2


HOLDER = """
def hold_mib(mib):
    if mib < 0:
        raise ValueError("negative size")
    block = b"x" * (mib * 2**20)  # written, so resident
    return {"held": len(block) // 2**20}
"""


def test_subprocess_runner_reports_child_peak_and_errors(tmp_path, monkeypatch):
    # 200 MiB held by the child show in its own peak RSS (the test process's memory does not)
    (tmp_path / "holder.py").write_text(HOLDER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    small = run_in_subprocess("holder:hold_mib", {"mib": 0}, tmp_path, "small")
    big = run_in_subprocess("holder:hold_mib", {"mib": 200}, tmp_path, "big")
    assert small["held"] == 0 and big["held"] == 200
    assert 150 / 1024 < big["peak_rss_gib"] - small["peak_rss_gib"] < 250 / 1024
    assert json.loads((tmp_path / "big.job.json").read_text())["kwargs"] == {"mib": 200}
    with pytest.raises(RuntimeError, match="holder:hold_mib failed in its subprocess"):
        run_in_subprocess("holder:hold_mib", {"mib": -1}, tmp_path, "bad")


def test_pretrain_bench_toy_size(tmp_path):
    """RN50 size replaced by a toy one: its figures are there and positive, one batch in both modes."""
    tiny = {
        "config": str(REPO / "configs" / "tiny.yaml"),
        "image_wh": [48, 40],
        "concepts": 8,
        "overrides": [
            "teacher.model=RN-emoji",
            f"teacher.model_config={REPO / 'configs' / 'models' / 'RN-emoji.json'}",
            "pretrain.batch_size=2",
            "pretrain.short_side=48",
            "pretrain.max_side=48",
            "pseudolabel.short_side=48",
            "pseudolabel.max_side=48",
            "pseudolabel.num_regions=3",
            "pseudolabel.proposal_pool=10",
            "rpn.fpn_channels=16",
            "rpn.pre_nms_top_n_test=30",
            "rpn.post_nms_top_n_test=10",
        ],
    }
    result = bench_pretrain(tmp_path, repeats=1, warmup=0, device="cpu", sizes={"rn50": tiny}, only="rn50")
    figures = [k for k in BENCHMARKS["pretrain"].figures if k.startswith("rn50_")]
    assert len(figures) == 13 and all(result[k] > 0 for k in figures), {k: result.get(k) for k in figures}
    assert not any("demo" in k for k in result)  # only the size asked for
    setup = result["rn50_setup"]
    assert setup["regions_per_image"] == [3, 3] and setup["regions_per_step"] == 6
    assert result["rn50_runs"]["first_loss_abs_diff"] < 1e-4  # same batch, same student in both modes
    assert result["rn50_online_fp32_over_offline_bf16"] == pytest.approx(
        result["rn50_online_step_s_fp32"] / result["rn50_offline_step_s_bf16"], rel=0.05
    )
    floor = setup["floor_s"]["fp32"]
    assert floor == pytest.approx(result["rn50_step_gflop"] / setup["gemm_gflop_per_s"]["fp32"], rel=0.01)
    (table,) = result["tables"].values()
    assert table[0].startswith("| operator |") and len(table) == 2 + 12
    with pytest.raises(ValueError, match="only='rn101'"):
        bench_pretrain(tmp_path, only="rn101")


def test_pseudolabel_bench_toy_size(tmp_path):
    """Both precisions at toy size: every per-precision figure is there, the headline is fp32's."""
    toy = {**PSEUDOLABEL_SIZES["demo"], "image_wh": (48, 40), "short_side": 48, "max_side": 48,
           "concepts": 8, "batch_size": 2}  # fmt: skip
    toy["rpn"] = {**toy["rpn"], "backbone": "resnet18", "min_size": 48, "max_size": 48, "fpn_channels": 16}
    result = bench_pseudolabel(
        tmp_path, rn50_images=2, demo_images=2, repeats=1, sizes={"rn50": toy, "demo": toy}
    )
    for size in ("rn50", "demo"):
        for precision in ("fp32", "bf16"):
            tag = f"{size}_{precision}"
            assert result[f"{tag}_stage_images_per_s"] > 0 and result[f"{tag}_floor_images_per_s"] > 0
            assert len(result[f"{tag}_runs"]["stage_s"]) == 1
    assert result["pseudolabel_floor_ratio"] == result["rn50_fp32_floor_ratio"]
    assert result["rn50_pseudolabel_bf16_speedup"] == pytest.approx(
        result["rn50_bf16_stage_images_per_s"] / result["rn50_fp32_stage_images_per_s"], rel=0.01
    )
    assert set(BENCHMARKS["pseudolabel"].figures) - set(result) == {
        "pseudolabel_peak_rss_gib"
    }  # the runner adds it
