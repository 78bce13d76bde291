#!/bin/sh
# Usage: check_optlevel.sh <valgrind or empty> <tolerance %> <driver -O2> <driver -O3> <case> [size]
# Runs one case of optlevel_driver built at -O2 and at -O3 under callgrind, counting only the
# kernel calls, and fails when the -O2 build executes more than <tolerance> percent more
# instructions than the -O3 build, or when the two builds' outputs differ in any bit. Exit 77
# (ctest SKIP_RETURN_CODE) when valgrind is not available.
set -eu
valgrind=$1 tolerance=$2 o2=$3 o3=$4 name=$5 size=${6:-}
if [ -z "$valgrind" ] || ! "$valgrind" --version >/dev/null 2>&1; then
  echo "optlevel: valgrind not found, skipped"
  exit 77
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for level in O2 O3; do
  if [ $level = O2 ]; then driver=$o2; else driver=$o3; fi
  # --instr-atstart=no: only the region between CALLGRIND_START/STOP_INSTRUMENTATION counts.
  "$valgrind" --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/$level.out" \
    "$driver" "$name" $size >"$work/$level.txt" 2>"$work/$level.log" || {
    cat "$work/$level.log"
    echo "optlevel: $driver failed under valgrind"
    exit 1
  }
  awk '/^totals:/ { print $2 }' "$work/$level.out" >"$work/$level.count"
done
o2_count=$(cat "$work/O2.count") o3_count=$(cat "$work/O3.count")
echo "-O2: $(cat "$work/O2.txt"), $o2_count instructions"
echo "-O3: $(cat "$work/O3.txt"), $o3_count instructions"
if [ -z "$o2_count" ] || [ -z "$o3_count" ] || [ "$o3_count" -eq 0 ]; then
  echo "optlevel: no instruction count (was the callgrind client request compiled in?)"
  exit 1
fi
if ! cmp -s "$work/O2.txt" "$work/O3.txt"; then
  echo "optlevel: the -O2 and -O3 builds give different results (must be bitwise equal)"
  exit 1
fi
awk -v a="$o2_count" -v b="$o3_count" -v t="$tolerance" 'BEGIN {
  r = a / b
  printf "optlevel: -O2 / -O3 instructions = %.4f (fails above %.4f)\n", r, 1 + t / 100
  exit r > 1 + t / 100
}'
