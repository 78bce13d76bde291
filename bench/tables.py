#!/usr/bin/env python3
"""Prints Google Benchmark JSON as Markdown tables: the numbers behind docs/performance.md.

Usage: python3 bench/tables.py build/figures/*.json
One table per file: every benchmark (medians when the run had repetitions) with its time and the
counters it reports, in readable units: FLOP/s as GFLOP/s, bytes/s as GB/s (10^9), peak_heap as
KiB. Nothing is computed that the benchmark did not measure.
"""
import pathlib
import sys

from gbench_json import medians

UNITS = {  # counter -> (column title, scale)
    "FLOP/s": ("GFLOP/s", 1e-9),
    "bytes_per_second": ("GB/s", 1e-9),
    "kv_bytes_per_second": ("K+V GB/s", 1e-9),
    "items_per_second": ("Gitems/s", 1e-9),
    "peak_heap": ("peak heap KiB", 1 / 2**10),
    "peak_fraction": ("of peak", 1.0),
}


def main(paths):
    for path in paths:
        rows = list(medians(path))
        counters = [c for c in UNITS if any(c in r for r in rows)]
        print(f"\n### {pathlib.Path(path).name}\n")
        print("| benchmark | time | " + " | ".join(UNITS[c][0] for c in counters) + " |")
        print("| --- | --- |" + " --- |" * len(counters))
        for r in rows:
            name = r["name"].removesuffix("_median")
            time = f'{r["real_time"]:.4g} {r["time_unit"]}'
            cells = []
            for c in counters:
                cells.append(f"{r[c] * UNITS[c][1]:.4g}" if c in r else "")
            print(f"| {name} | {time} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
