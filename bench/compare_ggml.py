#!/usr/bin/env python3
"""blockattn against ggml's CPU flash attention: runs compare_ggml_bench (both sides in one binary,
repetitions interleaved at random so that load drifts hit both alike) and prints one table.

Usage (from the repository, after `cmake --preset bench && cmake --build --preset bench` and
`bash bench/fetch_ggml.sh`):
  python3 bench/compare_ggml.py [--bench build/bench/bench/compare_ggml_bench] [--json out.json]
Prefill rows give GFLOP/s (4·n_q·n_k·d per head, the visible half for causal), decode rows GB/s
of K and V read. "ratio" is blockattn over ggml with float K/V (the same inputs, the same
result: max_abs_diff is ggml's largest difference from blockattn's output); ggml with half K/V is
shown for reference (half the bytes, a rounded K and V). Exits 0 with a message when the ggml
libraries are missing (BLOCKATTN_GGML_DIR unset and build/ggml absent).
"""
import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

from gbench_json import medians, run_fields

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", default=str(ROOT / "build/bench/bench/compare_ggml_bench"))
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--json", help="keep the benchmark JSON here")
    parser.add_argument("--filter", default=".", help="--benchmark_filter for both sides")
    args = parser.parse_args()

    env = dict(os.environ)
    if "BLOCKATTN_GGML_DIR" not in env:
        default = ROOT / "build/ggml/package/bins/linux-x64"
        if not default.is_dir():
            print("compare_ggml: no ggml libraries (run bash bench/fetch_ggml.sh); skipped")
            return 0
        env["BLOCKATTN_GGML_DIR"] = str(default)
    out = args.json or tempfile.mkstemp(suffix=".json")[1]
    subprocess.run([args.bench, f"--benchmark_filter={args.filter}",
                    f"--benchmark_repetitions={args.repetitions}",
                    "--benchmark_report_aggregates_only=true",
                    "--benchmark_enable_random_interleaving=true",
                    f"--benchmark_out={out}", "--benchmark_out_format=json"],
                   check=True, env=env, stdout=subprocess.DEVNULL)

    table = {}  # (n_q, n_k, heads, causal, threads) -> {side: row}
    for row in medians(out):
        f = run_fields(row["run_name"])
        side = "blockattn" if row["run_name"].startswith("BM_Blockattn") else (
            "ggml_f16" if f["kv_f16"] else "ggml_f32")
        table.setdefault((f["n_q"], f["n_k"], f["heads"], f["causal"], f["threads"]), {})[side] = row
    label = next((r["label"] for s in table.values() for k, r in s.items() if k != "blockattn"), "")
    print(f"ggml: {label.split(' threads=')[0]}; medians of {args.repetitions}")
    print("| n_q | n_k | heads | causal | threads | unit | blockattn | ggml, f32 K/V | ratio "
          "| ggml, f16 K/V | max_abs_diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (n_q, n_k, heads, causal, threads), sides in sorted(table.items(),
                                                            key=lambda kv: (kv[0][0] == 1, kv[0])):
        decode = n_q == 1
        unit, key = ("GB/s", "bytes_per_second") if decode else ("GFLOP/s", "FLOP/s")
        value = {s: r[key] * 1e-9 for s, r in sides.items() if key in r}
        ratio = (f'{value["blockattn"] / value["ggml_f32"]:.2f}x'
                 if "blockattn" in value and "ggml_f32" in value else "")
        diff = sides.get("ggml_f32", {}).get("max_abs_diff")
        cell = lambda s: f"{value[s]:.1f}" if s in value else "-"
        print(f"| {n_q} | {n_k} | {heads} | {causal} | {threads} | {unit} | {cell('blockattn')} "
              f"| {cell('ggml_f32')} | {ratio} | {cell('ggml_f16')} "
              f"| {'' if diff is None else f'{diff:.1e}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
