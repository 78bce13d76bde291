#!/usr/bin/env python3
"""Longest sequence each transformer-layer variant fits in a heap budget, from the measured
peak_heap of bench/transformer_block_bench (Google Benchmark JSON, one or more files).

Per variant, peak(n) is the curve of the form its allocations have through its largest measured
points: a + b*n through the last two for BPT and the middle variant (K, V and the n x ffn hidden
layer are linear in n), a + b*n + c*n^2 through the last three for vanilla (every head's n x n
scores). No dependency beyond the standard library. A budget's n is "measured" when a
measured point at or above it exists on both sides (interpolation between measured n), and
"extrapolated" otherwise. Usage: transformer_block_budget.py out.json [more.json ...]
"""
import json
import math
import re
import sys


GiB = 1 << 30
budgets = [1 * GiB, 4 * GiB]
points = {}
for path in sys.argv[1:]:
    for b in json.load(open(path))["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        m = re.match(r"BM_TransformerBlock_(\w+)<float>/n:(\d+)/causal:(\d)", b["name"])
        if not m or "peak_heap" not in b:
            continue
        points.setdefault((m.group(1), int(m.group(3))), {})[int(m.group(2))] = b["peak_heap"]



def fit(ns, peaks, degree):
    """Coefficients [c_degree, ..., c_0] of the polynomial through the last degree + 1 points."""
    xs, ys = ns[-(degree + 1):], peaks[-(degree + 1):]
    if degree == 1:
        b = (ys[1] - ys[0]) / (xs[1] - xs[0])
        return [b, ys[0] - b * xs[0]]
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    c = (d12 - d01) / (x2 - x0)
    b = d01 - c * (x0 + x1)
    return [c, b, y0 - b * x0 - c * x0 * x0]


def solve(coef, budget):
    if len(coef) == 2:
        return (budget - coef[1]) / coef[0]
    c, b, a = coef
    return (-b + math.sqrt(b * b - 4 * c * (a - budget))) / (2 * c)


results = {}
for (variant, causal), pts in sorted(points.items()):
    ns = sorted(pts)
    peaks = [float(pts[n]) for n in ns]
    degree = 2 if variant == "Vanilla" else 1
    if len(ns) < degree + 1:
        continue
    coef = fit(ns, peaks, degree)
    print(f"{variant} causal={causal}: measured " +
          ", ".join(f"n={n}: {p / 2**20:.1f} MiB" for n, p in zip(ns, peaks)))
    print("  fit peak(n) bytes = " +
          " + ".join(f"{c:.4g}*n^{degree - i}" for i, c in enumerate(coef)))
    for budget in budgets:
        n_max = solve(coef, budget)
        kind = "interpolated" if n_max <= ns[-1] else "extrapolated"
        results[(variant, causal, budget)] = n_max
        print(f"  budget {budget / GiB:.0f} GiB: n_max ~ {n_max:,.0f} ({kind}; measured up to "
              f"n={ns[-1]})")

for causal in (0, 1):
    for budget in budgets:
        bpt = results.get(("BPT", causal, budget))
        if bpt is None:
            continue
        for other in ("MemEffAttnUnfusedFfn", "Vanilla"):
            if (other, causal, budget) in results:
                print(f"causal={causal} {budget / GiB:.0f} GiB: BPT / {other} = "
                      f"{bpt / results[(other, causal, budget)]:.1f}x")
