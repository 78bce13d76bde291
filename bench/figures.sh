#!/usr/bin/env bash
# Regenerates every measured figure and plot of the README and docs/performance.md: the machine's
# limits, throughput vs n (chunked against the naive two-GEMM path), peak memory vs n, threads and
# decode, softmax, and the peer tables (PyTorch when /usr/bin/python3 can import torch, ggml when
# bench/fetch_ggml.sh has fetched it, ONNX Runtime when bench/fetch_ort.sh has). Needs a quiet
# machine (25-35 minutes on 2 cores). Results land in build/figures/: the JSON, tables.md (every
# benchmark as Markdown, bench/tables.py), pytorch.txt, ggml.txt and ort.txt (the README's peer
# tables); the plots in docs/. Figures are per
# machine: name the CPU, the date and load.txt beside any table taken from here.
#
# Usage: bash bench/figures.sh        (after: cmake --preset bench && cmake --build --preset bench)
# The plots need Debian's python3-matplotlib; PyTorch needs python3-torch and libopenblas0-pthread.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=build/bench/bench
out=build/figures
mkdir -p "$out" docs
reps=(--benchmark_repetitions=5 --benchmark_report_aggregates_only=true)
run() {  # run <binary> <json name> <filter> [more flags]: one JSON per figure, progress on stderr
  local binary=$1 name=$2 filter=$3
  shift 3
  echo "figures: $name" >&2
  "$bin/$binary" "--benchmark_filter=$filter" "--benchmark_out=$out/$name.json" \
    --benchmark_out_format=json "$@"
}
uptime >"$out/load.txt"

run machine_bench machine '.' "${reps[@]}"
run attention_bench throughput '^BM_Attention_(Naive|Chunked)<float>/n:[0-9]+/d:64/causal:[01]$' \
  "${reps[@]}"
run attention_bench throughput_d128 '^BM_Attention_(Naive|Chunked)<float>/n:(2048|4096)/d:128/causal:[01]$' \
  "${reps[@]}"
# One- and two-thread repetitions interleaved at random, so that the VM's drift hits both alike.
run attention_bench threads '^(BM_StreamRead|BM_Attention_(PrefillThreads|Decode)<float>/)' \
  "${reps[@]}" --benchmark_enable_random_interleaving=true
# Memory does not depend on load: one repetition. Naive stops at 16384 (its n×n scores are 1 GiB).
run attention_bench memory \
  '^(Large/)?BM_Attention_Chunked<float>/n:[0-9]+/d:64/causal:1$|^(Large/)?BM_Attention_Naive<float>/n:([0-9]{3,4}|8192|16384)/d:64/causal:1$' \
  --benchmark_min_time=0.01
run softmax_bench softmax '.' "${reps[@]}"
lscpu >"$out/cpu.txt" 2>/dev/null || true
# Every benchmark above as Markdown tables, for docs/performance.md.
/usr/bin/python3 bench/tables.py "$out"/machine.json "$out"/throughput*.json "$out"/threads.json \
  "$out"/memory.json "$out"/softmax.json >"$out/tables.md"

# The machine's measured limits, drawn as dashed lines on the throughput plot.
median() {  # median <json> <benchmark name>: its median FLOP/s in GFLOP/s
  /usr/bin/python3 -c 'import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    if b["name"] == sys.argv[2] + "_median": print(round(b["FLOP/s"] / 1e9, 1))' "$1" "$2"
}
peak=$(median "$out/machine.json" 'BM_FmaPeak<float>/threads:1')
gemm=$(median "$out/machine.json" 'BM_EigenGemm_QK<float>/n:4096')
/usr/bin/python3 bench/plot.py "$out/throughput.json" --out docs --prefix attention_ --figure gflops \
  --peak "$peak" --peak-label "FMA peak, one core (machine_bench)" \
  --peak "$gemm" --peak-label "Eigen sgemm, n = 4096 (machine_bench)"
/usr/bin/python3 bench/plot.py "$out/memory.json" --out docs --prefix attention_ --figure memory
# PyTorch (optional): Debian's python3-torch calls the system BLAS, which is the slow reference
# BLAS unless an optimised one is installed (apt-get install libopenblas0-pthread). Some machines
# here force OpenBLAS's core type through the environment; let it pick its own kernel.
if /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE /usr/bin/python3 bench/compare_pytorch.py \
    --bench "$bin/attention_bench" | tee "$out/pytorch.txt"
fi
# ggml (optional): its prebuilt CPU libraries, when bench/fetch_ggml.sh has fetched them.
python3 bench/compare_ggml.py --bench "$bin/compare_ggml_bench" --json "$out/ggml.json" \
  | tee "$out/ggml.txt"
# ONNX Runtime (optional): onnxruntime-node's CPU runtime, when bench/fetch_ort.sh has fetched it
# (compare_ort.py says "skipped" otherwise). The README's rows: 8 heads, d = 64, one thread.
python3 bench/compare_ort.py --bench "$bin/attention_bench" --dump "$bin/ort_reference_dump" \
  --shapes '^n_q:(1024|4096)/n_k:(1024|4096)/heads:8/d:64/causal:[01]/threads:1$|^n_q:1/n_k:32768/.*threads:1$' \
  --json "$out/ort.json" | tee "$out/ort.txt"
