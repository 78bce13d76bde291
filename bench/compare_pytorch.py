#!/usr/bin/python3
"""blockattn against PyTorch's CPU attention, side by side, in one run.

Runs blockattn's attention_bench (Google Benchmark, JSON output) on the compare shapes — float,
d = 64, [1, n, heads, 64] tensors, heads 1 and 8, n = 512 ... 4096, 1 and 2 threads, non-causal —
then times PyTorch on the same shapes: matmul-softmax-matmul, and scaled_dot_product_attention
(torch.nn.functional.scaled_dot_product_attention where it exists, else the private
torch.nn.functional._scaled_dot_product_attention of torch 1.13). Prints GFLOP/s (4·n²·d·heads
FLOP per call) and the ratio blockattn / best PyTorch. Medians of --repetitions runs each.

Usage (from the repository, after `cmake --preset bench && cmake --build --preset bench`):
  /usr/bin/python3 bench/compare_pytorch.py [--bench build/bench/bench/attention_bench]
Exits 0 with a message when torch cannot be imported (it is optional: Debian's python3-torch).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

from gbench_json import run_fields

SIZES = [512, 1024, 2048, 4096]
HEADS = [1, 8]
THREADS = [1, 2]
D = 64


def find_bench(explicit):
    if explicit:
        return explicit
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for preset in ("bench", "release"):
        path = os.path.join(root, "build", preset, "bench", "attention_bench")
        if os.path.exists(path):
            return path
    return None


def run_blockattn(binary, repetitions):
    out = subprocess.run(
        [binary, "--benchmark_filter=Large/Compare/", "--benchmark_format=json",
         f"--benchmark_repetitions={repetitions}", "--benchmark_report_aggregates_only=true"],
        check=True, capture_output=True, text=True).stdout
    results = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        # name: Large/Compare/BM_Attention_PrefillThreads<float>/n:512/heads:1/causal:0/threads:1/...
        fields = run_fields(b["run_name"])
        key = (fields["n"], fields["heads"], fields["threads"])
        results[key] = b["FLOP/s"] / 1e9
    return results


def time_torch(fn, repetitions, min_seconds=0.2):
    fn()  # warm-up (first-touch of the score buffers)
    samples = []
    for _ in range(repetitions):
        iterations = 0
        start = time.perf_counter()
        while True:
            fn()
            iterations += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        samples.append(elapsed / iterations)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", help="path to attention_bench")
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except Exception as error:  # noqa: BLE001 - any import failure means "skip"
        print(f"compare_pytorch.py: skipped, torch cannot be imported ({error})")
        return 0
    binary = find_bench(args.bench)
    if binary is None:
        print("compare_pytorch.py: attention_bench not found; build it "
              "(cmake --preset bench && cmake --build --preset bench) or pass --bench")
        return 1

    sdpa = getattr(F, "scaled_dot_product_attention", None)
    sdpa_name = "F.scaled_dot_product_attention"
    if sdpa is None and hasattr(F, "_scaled_dot_product_attention"):
        private = F._scaled_dot_product_attention
        sdpa = lambda q, k, v: private(q, k, v, None, 0.0, False, False)[0]  # noqa: E731
        sdpa_name = "F._scaled_dot_product_attention (1.13, private)"

    ours = run_blockattn(binary, args.repetitions)
    print(f"torch {torch.__version__}; sdpa = {sdpa_name if sdpa else 'absent'}; "
          f"load average {os.getloadavg()[0]:.2f}; medians of {args.repetitions}")
    header = (f"{'n':>5} {'heads':>5} {'thr':>3} | {'blockattn':>9} | {'torch mm':>8} "
              f"{'torch sdpa':>10} | {'ratio':>6}")
    print("GFLOP/s (4·n²·d·heads per call)")
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    for threads in THREADS:
        torch.set_num_threads(threads)
        for heads in HEADS:
            for n in SIZES:
                q, k, v = (torch.randn(1, heads, n, D) for _ in range(3))
                scale = 1.0 / math.sqrt(D)
                flops = 4.0 * n * n * D * heads

                def matmul_softmax_matmul():
                    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v

                with torch.no_grad():
                    mm = flops / time_torch(matmul_softmax_matmul, args.repetitions) / 1e9
                    sd = (flops / time_torch(lambda: sdpa(q, k, v), args.repetitions) / 1e9
                          if sdpa else float("nan"))
                best = max(mm, sd) if sdpa else mm
                mine = ours.get((n, heads, threads), float("nan"))
                print(f"{n:>5} {heads:>5} {threads:>3} | {mine:9.1f} | {mm:8.1f} {sd:10.1f} | "
                      f"{mine / best:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
