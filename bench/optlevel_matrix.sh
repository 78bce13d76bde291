#!/usr/bin/env bash
# The compiler x optimisation-level matrix of issue 20: the same kernels built by g++ and clang++
# at -O2 and -O3 (-march=native; the bench-{gcc,clang}-{O2,O3} presets), run in one session with
# the four builds in a new random order each repetition, so that the machine's drift hits every
# cell alike. Prints each benchmark's median time per cell and the -O2 speed as a fraction of -O3
# for each compiler. Needs a quiet machine (about 10 minutes at the default 7 repetitions).
#
# Usage: bash bench/optlevel_matrix.sh [repetitions]
#   after: for p in bench-gcc-O2 bench-gcc-O3 bench-clang-O2 bench-clang-O3; do
#            cmake --preset $p && cmake --build build/$p --target attention_bench softmax_bench
#          done
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-7}
out=build/optlevel-matrix
rm -rf "$out"
mkdir -p "$out"
cells=(gcc-O2 gcc-O3 clang-O2 clang-O3)
# Prefill (one head, n = 4096, d = 64 and 128, float; bfloat16 through its vdpbf16ps kernels where
# the CPU has them), decode (8 heads over n_k = 262,144 float keys, and a bfloat16 cache) and the
# online softmax in cache and from memory: the kernels the issue names.
attention_filter='^(BM_Attention_Chunked<float>/n:4096/d:(64|128)/causal:[01]|BM_Attention_Decode<float>/n_k:262144/kv_heads:8/d:64/threads:1/bhsd:0|BM_Attention_DecodeCache<Eigen::bfloat16>/n_k:262144/kv_heads:8/d:64/threads:1|Large/Format/BM_Attention_PrefillFormat<bfloat16>/n:2048/d:(64|128)/causal:0)(/real_time)?$'
softmax_filter='^BM_Softmax<float, SoftmaxAlgorithm::(Safe|Online)>/n:(32768|16777216)$'
for cell in "${cells[@]}"; do
  for binary in attention_bench softmax_bench; do
    [ -x "build/bench-$cell/bench/$binary" ] || { echo "missing build/bench-$cell/bench/$binary" >&2; exit 1; }
  done
done
uptime >"$out/load.txt"
for ((rep = 0; rep < reps; ++rep)); do
  for cell in $(printf '%s\n' "${cells[@]}" | shuf); do
    echo "repetition $rep: $cell" >&2
    "build/bench-$cell/bench/attention_bench" "--benchmark_filter=$attention_filter" \
      --benchmark_out="$out/$cell.attention.$rep.json" --benchmark_out_format=json >/dev/null
    "build/bench-$cell/bench/softmax_bench" "--benchmark_filter=$softmax_filter" \
      --benchmark_out="$out/$cell.softmax.$rep.json" --benchmark_out_format=json >/dev/null
  done
done
uptime >>"$out/load.txt"
/usr/bin/python3 - "$out" <<'PY'
import glob, json, statistics, sys
out = sys.argv[1]
times = {}  # (benchmark, cell) -> [real_time]
for path in glob.glob(f"{out}/*.json"):
    cell = path.split("/")[-1].split(".")[0]
    for b in json.load(open(path))["benchmarks"]:
        times.setdefault((b["name"], cell), []).append(b["real_time"])
names = sorted({name for name, _ in times})
print("| benchmark | gcc -O2 | gcc -O3 | clang -O2 | clang -O3 | gcc O2/O3 speed | clang O2/O3 speed |")
print("|---|---|---|---|---|---|---|")
for name in names:
    med = {cell: statistics.median(times[(name, cell)]) for cell in
           ("gcc-O2", "gcc-O3", "clang-O2", "clang-O3")}
    print(f"| {name} | " + " | ".join(f"{med[c]:.3f}" for c in med) +
          f" | {med['gcc-O3'] / med['gcc-O2']:.3f} | {med['clang-O3'] / med['clang-O2']:.3f} |")
print(f"(median time of {len(times[(names[0], 'gcc-O2')])} repetitions, in each benchmark's unit)")
PY
