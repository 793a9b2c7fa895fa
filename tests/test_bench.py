"""`python -m pipelines.bench`: merging results, BENCHMARKS.md rendering, usage errors (no timings)."""

from __future__ import annotations

import json

import pytest

from pipelines.bench import main
from regionclip.benchmarks import render_markdown

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
    out, md = tmp_path / "bench", tmp_path / "BENCH.md"
    out.mkdir()
    (out / "bench.json").write_text(json.dumps({"benchmarks": {"concepts": entry("2024-01-01", 7.0)}}))
    argv = ["--out", str(out), "--markdown", str(md), "--only", "reader"]
    assert main([*argv, "reader.n_samples=8", "reader.shard_size=4", "reader.repeats=1"]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert set(data["benchmarks"]) == {"concepts", "reader"}
    assert data["benchmarks"]["concepts"]["figures"]["x_per_s"]["value"] == 7.0  # kept, not re-run
    reader = data["benchmarks"]["reader"]
    assert set(reader["figures"]) == {"reader_images_per_s", "reader_images_per_s_workers2"}
    assert all(f["value"] > 0 and f["unit"] == "images/s" for f in reader["figures"].values())
    assert [r["mode"] for r in reader["details"]["runs"]] == ["one_process", "workers2"]
    assert reader["details"]["params"]["n_samples"] == 8
    assert reader["command"].endswith("--only reader reader.n_samples=8 reader.shard_size=4 reader.repeats=1")
    text = md.read_text()
    assert "## concepts" in text and "## reader" in text and "`reader_images_per_s_workers2`" in text
    assert "reader: reader_images_per_s=" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--only", "nope"], ["reader"], ["nope.x=1"], ["reader.n_samples"]])
def test_usage_errors(argv, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), *argv])
    assert e.value.code == 2
