"""`make bench`: run the registered benchmarks, merge results, rewrite BENCHMARKS.md.

    python -m pipelines.bench --out runs/bench [--only reader,concepts] [reader.n_samples=500 ...]

Results are merged into ``--results`` (default ``benchmarks/bench.json``, tracked in git: the
source of BENCHMARKS.md, so that a partial run on a fresh clone keeps the other benchmarks'
sections); a copy goes to ``<out>/bench.json`` beside the scratch data. Each benchmark runs in its
own Python process; ``<name>_peak_rss_gib`` is that process's peak RSS. ``NAME.PARAM=VALUE``
arguments override a benchmark's parameters (the values are YAML) and become part of the command
recorded next to its figures. Exit status: 0 done, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from regionclip.benchmarks import machine_info, render_markdown
from regionclip.benchmarks.suite import BENCHMARKS, load_results, run_one
from regionclip.utils import atomic_write_json, atomic_write_text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default="runs/bench", help="folder for scratch data and a copy of the results"
    )
    parser.add_argument(
        "--results", default="benchmarks/bench.json", help="results file (merged; the source of the Markdown)"
    )
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--markdown", default="BENCHMARKS.md", help="the Markdown file to rewrite")
    parser.add_argument("overrides", nargs="*", metavar="NAME.PARAM=VALUE", help="benchmark parameters")
    args = parser.parse_intermixed_args(argv)
    args.names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    args.params = {name: {} for name in BENCHMARKS}
    for item in args.overrides:
        key, eq, value = item.partition("=")
        name, dot, param = key.partition(".")
        if not eq or not dot or name not in BENCHMARKS:
            parser.error(
                f"override {item!r}: expected NAME.PARAM=VALUE with NAME one of {', '.join(BENCHMARKS)}"
            )
        args.params[name][param] = yaml.safe_load(value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    results_path = Path(args.results)
    data = load_results(results_path)
    machine = machine_info()
    start = time.perf_counter()
    for name in args.names:
        t0 = time.perf_counter()
        entry = run_one(name, BENCHMARKS[name], out, args.params[name], machine)
        data["benchmarks"][name] = entry
        atomic_write_json(results_path, data)  # a later failing benchmark loses nothing
        atomic_write_json(out / "bench.json", data)
        figures = ", ".join(f"{k}={v['value']:.4g} {v['unit']}" for k, v in entry["figures"].items())
        print(f"{name}: {figures} ({time.perf_counter() - t0:.0f} s)", flush=True)
    atomic_write_text(args.markdown, render_markdown(data, str(results_path)))
    print(
        f"ran {len(args.names)} benchmark(s) in {time.perf_counter() - start:.0f} s; "
        f"results in {results_path}, table in {args.markdown}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
