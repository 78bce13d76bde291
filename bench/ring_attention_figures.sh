#!/usr/bin/env bash
# The figures of docs/ring_attention.md ("Speed and memory"): ring forward scaling over P = 1, 2, 4
# ranks against one process with 1 and 2 threads, the overlap of communication with compute (on
# shared memory and, with --netns, over TCP between two network namespaces), link bandwidth and
# per-rank peak memory (/usr/bin/time -v). Rounds interleave the configurations so that the
# machine's load drifts across all of them alike; each line is one run, the docs quote medians.
#   bench/ring_attention_figures.sh <build dir> [n] [heads] [rounds] [--netns]
# Runs as root in CI-like containers: Open MPI needs its allow-run-as-root variables.
set -euo pipefail
build=$1
n=${2:-32768}
heads=${3:-1}
rounds=${4:-5}
netns=${5:-}
bench=$build/bench/ring_attention_bench
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
common=(--n "$n" --heads "$heads" --dim 64 --causal 1 --layout zigzag --reps 1)
echo "== $(date -u) load: $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$rounds"); do
  echo "== round $round"
  OMP_NUM_THREADS=1 mpirun -np 1 "$bench" --mode single --threads 1 "${common[@]}" | grep -v '^ring'
  OMP_NUM_THREADS=2 mpirun -np 1 --bind-to none "$bench" --mode single --threads 2 "${common[@]}" |
    grep -v '^ring'
  for p in 1 2 4; do
    flags=()
    ((p > 2)) && flags=(--oversubscribe --bind-to none)  # 4 ranks on 2 cores
    echo "-- P=$p"
    mpirun -np "$p" "${flags[@]}" "$bench" --mode both "${common[@]}" | grep -v '^ring'
  done
done
echo "== link bandwidth, shared memory (vader) and TCP loopback"
mpirun -np 2 "$bench" --mode link --link-mib 256 --reps 5
mpirun -np 2 --mca btl self,tcp "$bench" --mode link --link-mib 256 --reps 5
echo "== per-rank peak resident memory (/usr/bin/time -v), ring only, one call"
for p in 1 2 4; do
  flags=()
  ((p > 2)) && flags=(--oversubscribe --bind-to none)
  echo "-- P=$p"
  mpirun -np "$p" "${flags[@]}" /usr/bin/time -v "$bench" --mode ring "${common[@]}" 2>&1 |
    grep -E 'rank [0-9]+:|Maximum resident'
done
if [[ $netns == --netns ]]; then
  here=$(cd "$(dirname "$0")" && pwd)
  echo "== two network namespaces, veth, TCP: link bandwidth and overlap"
  for round in $(seq "$rounds"); do
    "$here/../tests/ring_netns_test.sh" "$(command -v mpirun)" 2 "$bench" --mode both \
      "${common[@]}" | grep -E 'ring forward|compute-only|overlap|veth'
  done
  "$here/../tests/ring_netns_test.sh" "$(command -v mpirun)" 2 "$bench" --mode link \
    --link-mib 256 --reps 5 | grep -E 'link|veth'
fi
echo "== $(date -u) load: $(cut -d' ' -f1-3 /proc/loadavg)"
