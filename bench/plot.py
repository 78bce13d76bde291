#!/usr/bin/env python3
"""Turns Google Benchmark JSON into the figures under docs/.

Usage: python3 bench/plot.py RESULTS.json [MORE.json ...] --out docs/
Needs matplotlib (Debian: python3-matplotlib).

For every benchmark family (the name before the first '/'), it plots a counter against the
argument `n` (or `n_k`), one line per family and per other argument combination (d, causal, ...):
  memory.svg   peak_heap (measured extra heap bytes), log-log
  gflops.svg   FLOP/s as GFLOP/s, log-x
Only median aggregates are used when the run had repetitions; plain runs otherwise.
"""
import argparse
import collections
import pathlib
import re

from gbench_json import medians

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SIZE_ARGS = ("n", "n_k", "len", "cols")


def parse_name(name):
    """'BM_X<float>/n:4096/d:64_median' -> ('BM_X<float>', {'n': 4096, 'd': 64})."""
    name = re.sub(r"_(mean|median|stddev|cv)$", "", name)
    name = re.sub(r"^(Large/)?(Compare/)?", "", name)  # registration groups, not families
    family, *parts = name.split("/")
    args = {}
    for part in parts:
        if ":" in part:
            key, value = part.split(":", 1)
            try:
                args[key] = int(value)
            except ValueError:
                args[key] = value
        else:
            args.setdefault("_", []).append(part)
    args.pop("_", None)
    return family, args


def load(paths):
    rows = []
    for path in paths:
        for bench in medians(path):
            family, args = parse_name(bench["name"])
            size_key = next((k for k in SIZE_ARGS if k in args), None)
            if size_key is None:
                continue
            size = args.pop(size_key)
            label = family + "".join(f" {k}={v}" for k, v in sorted(args.items()))
            rows.append((label, size_key, size, bench))
    return rows


def plot(rows, counter, scale, ylabel, title, path, logy, lines=()):
    series = collections.defaultdict(list)
    size_keys = set()
    for label, size_key, size, bench in rows:
        if counter in bench:
            series[label].append((size, bench[counter] * scale))
            size_keys.add(size_key)
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    for value, label in lines:  # reference levels, e.g. the machine's measured FMA peak
        ax.axhline(value, linestyle="--", color="gray")
        ax.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), va="bottom",
                    fontsize="small", color="gray")
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log", base=2)
    ax.set_xlabel(" / ".join(sorted(size_keys)))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("results", nargs="+", help="Google Benchmark JSON (--benchmark_out=...)")
    parser.add_argument("--out", default="docs", help="output folder")
    parser.add_argument("--prefix", default="", help="prefix for the figure file names")
    parser.add_argument("--format", default="svg", choices=["svg", "png"])
    parser.add_argument("--figure", default="both", choices=["both", "memory", "gflops"],
                        help="which figure to write (both by default)")
    parser.add_argument("--peak", type=float, action="append", default=[], metavar="GFLOPS",
                        help="a measured GFLOP/s level to draw as a dashed line (repeatable)")
    parser.add_argument("--peak-label", action="append", default=[],
                        help="the label of each --peak line, in order")
    options = parser.parse_args()
    out = pathlib.Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load(options.results)
    stem = options.prefix
    if options.figure in ("both", "memory"):
        plot(rows, "peak_heap", 1 / 2**20, "measured extra heap (MiB)", "Peak memory vs sequence length",
             out / f"{stem}memory.{options.format}", logy=True)
    if options.figure in ("both", "gflops"):
        plot(rows, "FLOP/s", 1e-9, "GFLOP/s", "Throughput vs sequence length",
             out / f"{stem}gflops.{options.format}", logy=False,
             lines=list(zip(options.peak, options.peak_label + [""] * len(options.peak))))


if __name__ == "__main__":
    main()
