"""Check image–text shards: decode every sample (images included) and report what is wrong.

    python -m data_prep.validate data/train-{000000..000009}.tar other/extra.tar

Prints one line per shard (good / bad samples, errors by reason), the totals, and for each error
reason a few example keys. Exit status: 0 when every shard could be read to its end, even if some
samples are bad (they are reported; training skips them the same way); 1 when any shard is
unreadable (missing, truncated, corrupt tar); 2 on usage errors.
"""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from regionclip.data.shards import SampleErrors, expand_urls, iter_image_text

EXIT_OK, EXIT_UNREADABLE, EXIT_USAGE = 0, 1, 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.validate",
        description="Decode every sample of image-text webdataset shards (images too) and report "
        "per-shard counts, totals and bad samples by reason with example keys.",
        epilog="Exit status: 0 = every shard was read to its end (bad samples alone do not fail the "
        "check: they are reported and skipped, as training skips them); 1 = at least one shard is "
        "unreadable (missing, truncated or not a tar); 2 = usage error.",
    )
    parser.add_argument(
        "shards",
        nargs="+",
        metavar="SHARDS",
        help="shard path, brace pattern (data/train-{000000..000009}.tar), pipe: command or URL",
    )
    parser.add_argument("--examples", type=int, default=5, help="example keys shown per error reason")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        urls = expand_urls(args.shards)
    except ValueError as e:  # malformed brace pattern
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    total = SampleErrors(max_examples=args.examples)
    n_good = 0
    start = time.perf_counter()
    bar = tqdm(total=len(urls), unit="shard", desc="validate", file=sys.stderr)
    for url in urls:
        errors = SampleErrors(max_examples=args.examples)
        good = sum(1 for _ in iter_image_text(url, errors))
        n_good += good
        total.update(errors)
        bar.update(1)
        status = "UNREADABLE " if errors.unreadable_shards else ""
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(errors.counts.items()) if r != "unreadable_shard")
        tqdm.write(f"{status}{url}: {good} good, {errors.total} bad" + (f" ({reasons})" if reasons else ""))
    bar.close()
    elapsed = time.perf_counter() - start
    for line in total.report_lines():
        print(line)
    n_unreadable = len(total.unreadable_shards)
    print(
        f"validated {len(urls)} shards ({n_unreadable} unreadable): {n_good} good samples, "
        f"{total.total} bad, in {elapsed:.1f} s ({(n_good + total.total) / max(elapsed, 1e-9):.0f} samples/s)"
    )
    return EXIT_UNREADABLE if n_unreadable else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
