"""Benchmarks: measured figures for BENCHMARKS.md (``make bench`` / ``python -m pipelines.bench``).

A benchmark is a function ``fn(workdir, **params) -> dict`` whose result holds its figures (plain
numbers, medians over repeated runs) and any details (per-run timings, parameters). Each one runs
in a fresh Python process (:func:`run_in_subprocess`), so that the peak RSS recorded for it is its
own. Results are kept in a JSON file; :func:`render_markdown` turns that file into BENCHMARKS.md.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from regionclip.utils import atomic_write_json

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Benchmark:
    """A registered benchmark: its function and, for each figure it returns, (unit, what it is)."""

    fn: str  # "module:function", imported only when run (benchmarks pull in heavy libraries)
    figures: dict[str, tuple[str, str]]
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # defaults passed to fn

    def load(self) -> Callable[..., dict[str, Any]]:
        return load_function(self.fn)


def load_function(spec: str) -> Callable[..., Any]:
    """The function named by ``"module:function"``."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, in GiB: ``VmHWM`` of /proc/self/status (its
    own address space; ``ru_maxrss`` would also count the parent it was forked from), else
    ``ru_maxrss`` (KiB on Linux)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 2**20, 3)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def children_peak_rss_gib() -> float:
    """Peak RSS of the largest finished child process (DataLoader workers, nested runs), in GiB; a
    forked child's figure includes what it shared with this process at the fork."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3)


_CHILD = "import sys; from regionclip.benchmarks import child_main; child_main(sys.argv[1])"


def child_main(job_file: str) -> None:
    """Body of a :func:`run_in_subprocess` child: run the job, write its result (JSON, atomic)."""
    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    result = load_function(job["fn"])(**job["kwargs"])
    result.update(peak_rss_gib=peak_rss_gib(), children_peak_rss_gib=children_peak_rss_gib())
    atomic_write_json(job["result"], result)


def run_in_subprocess(fn: str, kwargs: dict[str, Any], workdir: str | Path, tag: str) -> dict[str, Any]:
    """``fn(**kwargs)`` (``fn`` = ``"module:function"``, JSON-serialisable arguments and result) in
    a fresh Python process; its output goes to this process's stdout/stderr.

    Returns the function's result plus ``peak_rss_gib`` (the child's own peak RSS, measured at its
    end) and ``children_peak_rss_gib`` (its largest child's). Job and result files are
    ``<workdir>/<tag>.{job,result}.json``. Raises RuntimeError when the child fails.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    job_file, result_file = workdir / f"{tag}.job.json", workdir / f"{tag}.result.json"
    result_file.unlink(missing_ok=True)
    atomic_write_json(job_file, {"fn": fn, "kwargs": kwargs, "result": str(result_file)})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    rc = subprocess.run([sys.executable, "-c", _CHILD, str(job_file)], env=env, check=False).returncode
    if rc != 0 or not result_file.exists():
        raise RuntimeError(f"{fn} failed in its subprocess (exit status {rc}; its error is printed above)")
    return json.loads(result_file.read_text(encoding="utf-8"))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """Where figures were measured: CPU, cores, memory, Python and torch versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": _mem_total_gib(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def describe_machine(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return (
        f"{m['cpu']}, {m['usable_cores']} usable of {m['cores']} cores, {m['memory_gib']} GiB RAM{gpu}; "
        f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads); {m['platform']}"
    )


def _format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def render_markdown(data: dict[str, Any], source: str) -> str:
    """BENCHMARKS.md from the results file ``data`` (``{"benchmarks": {name: entry}}``)."""
    entries = data.get("benchmarks", {})
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python -m pipelines.bench` from `{source}`; do not edit by hand. Re-run the",
        "command in a row to update its figures (other benchmarks' results are kept). Figures are medians",
        "over repeated runs; ratios are measured side by side in one run.",
        "",
    ]
    if not entries:
        return "\n".join([*lines, "No results yet: run `make bench`.", ""])
    latest = max(entries.values(), key=lambda e: e["date"])
    lines += [f"Machine (latest run): {describe_machine(latest['machine'])}.", ""]
    for name in sorted(entries):
        entry = entries[name]
        lines += [f"## {name}", ""]
        if entry.get("description"):
            lines += [entry["description"], ""]
        where = "" if entry["machine"] == latest["machine"] else f" on {describe_machine(entry['machine'])}"
        params = entry.get("details", {}).get("params")
        setup = f" Parameters: {', '.join(f'{k}={v}' for k, v in params.items())}." if params else ""
        load = f" (1-min load average {entry['load_before']} at start)" if "load_before" in entry else ""
        lines += [f"Measured {entry['date']}{where}{load}.{setup}", ""]
        lines += ["| figure | value | unit | command |", "|---|---:|---|---|"]
        for key, fig in entry["figures"].items():
            value = _format_value(fig["value"])
            lines.append(
                f"| {fig['description']} (`{key}`) | {value} | {fig['unit']} | `{entry['command']}` |"
            )
        lines.append("")
        for title, table in entry.get("details", {}).get("tables", {}).items():
            lines += [f"{title}:", "", *table, ""]
    return "\n".join(lines)
