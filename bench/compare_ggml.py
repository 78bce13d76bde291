#!/usr/bin/env python3
"""blockattn against ggml's CPU flash attention: runs compare_ggml_bench (both sides in one binary,
repetitions interleaved at random so that load drifts hit both alike) and prints one table.

Usage (from the repository, after `cmake --preset bench && cmake --build --preset bench` and
`bash bench/fetch_ggml.sh`):
  python3 bench/compare_ggml.py [--bench build/bench/bench/compare_ggml_bench] [--json out.json]
      [--filter REGEX]
One row per shape, thread count and K/V format (kv: f32, f16, q8_0, q4_0 for ggml against
blockattn's float, half, int8 and int4 caches), the two sides of a row on the same inputs.
Prefill rows give GFLOP/s (4·n_q·n_k·d per head, the visible half for causal), decode rows the
GB/s of K/V each side reads in its own format (values, scales and zero points). "ratio" is
ggml's time over blockattn's (> 1: blockattn is faster). The max_abs_diff columns are each
side's largest difference from a double-precision reference on the unquantized inputs, and
"ref max" the reference's largest |out| (compare_ggml_bench.cpp says what to expect per format).
The streaming-read ceiling of the same run (BM_StreamReadTwoStreams) is printed below the table
when the filter selects it. Exits 0 with a message when the ggml libraries are missing
(BLOCKATTN_GGML_DIR unset and build/ggml absent).
"""
import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

from gbench_json import medians, run_fields

ROOT = pathlib.Path(__file__).resolve().parent.parent
FORMATS = {0: "f32 / float", 1: "f16 / half", 2: "q8_0 / int8", 3: "q4_0 / int4"}


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

    table = {}  # (kv, n_q, n_k, heads, d, causal, threads) -> {side: row}
    ceilings = {}  # threads -> GB/s of BM_StreamReadTwoStreams
    for row in medians(out):
        name = row["run_name"]
        f = run_fields(name)
        if name.startswith("BM_StreamReadTwoStreams"):
            ceilings[f["threads"]] = row["bytes_per_second"] * 1e-9
            continue
        side = "blockattn" if name.startswith("BM_Blockattn") else "ggml"
        key = (f["kv"], f["n_q"], f["n_k"], f["heads"], f["d"], f["causal"], f["threads"])
        table.setdefault(key, {})[side] = row
    label = next((r["label"] for s in table.values() for k, r in s.items() if k == "ggml"), "")
    print(f"ggml: {label.split(' threads=')[0]}; medians of {args.repetitions}")
    print("| K/V (ggml / blockattn) | n_q | n_k | heads | d | causal | threads | unit | blockattn "
          "| ggml | ratio | max_abs_diff blockattn | max_abs_diff ggml | ref max |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, sides in sorted(table.items(), key=lambda kv: (kv[0][1] == 1, kv[0])):
        kv, n_q, n_k, heads, d, causal, threads = key
        decode = n_q == 1
        unit, counter = ("K/V GB/s", "kv_bytes_per_second") if decode else ("GFLOP/s", "FLOP/s")
        value = {s: r[counter] * 1e-9 for s, r in sides.items() if counter in r}
        ratio = (f'{sides["ggml"]["real_time"] / sides["blockattn"]["real_time"]:.2f}x'
                 if "blockattn" in sides and "ggml" in sides else "")
        cell = lambda s: f"{value[s]:.1f}" if s in value else "-"
        diff = lambda s: (f'{sides[s]["max_abs_diff"]:.1e}'
                          if "max_abs_diff" in sides.get(s, {}) else "-")
        ref = next((r["ref_max_abs"] for r in sides.values() if "ref_max_abs" in r), None)
        print(f"| {FORMATS.get(kv, kv)} | {n_q} | {n_k} | {heads} | {d} | {causal} | {threads} "
              f"| {unit} | {cell('blockattn')} | {cell('ggml')} | {ratio} | {diff('blockattn')} "
              f"| {diff('ggml')} | {'-' if ref is None else f'{ref:.1e}'} |")
    for threads, gbs in sorted(ceilings.items()):
        print(f"Streaming-read ceiling (two streams), {threads} thread(s): {gbs:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
