#!/usr/bin/env bash
# ring_fault_test.sh <seconds> <regex> <command...>: runs the command (mpirun … ring_fault_test,
# in which one rank dies mid-ring) and passes when it ends with a non-zero status within
# <seconds>, the dying rank announced itself, and the output matches <regex> (the MPI runtime's
# notice naming the dead rank; empty = not checked, for runtimes whose wording we do not know).
# A hang is killed at <seconds> + 10 and reported as one.
set -uo pipefail
limit=$1
expect=$2
shift 2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s.%N)
timeout --kill-after=5 $((limit + 10)) "$@" >"$log" 2>&1
status=$?
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
cat "$log"
echo "ring_fault_test.sh: exit status $status after $elapsed s (limit $limit s)"
fail() {
  echo "ring_fault_test.sh: FAILED: $*"
  exit 1
}
((status == 124 || status == 137 && ${elapsed%.*} >= limit)) &&
  fail "the job hung (killed by timeout after $elapsed s)"
((status == 0)) && fail "the job reported success although a rank died"
awk -v e="$elapsed" -v l="$limit" 'BEGIN { exit !(e <= l) }' ||
  fail "the job took $elapsed s to end, more than $limit s"
grep -q "ring_fault_test: rank [0-9]* dies now" "$log" || fail "no rank announced its death"
grep -q "saw no failure" "$log" && fail "a rank finished its loop without noticing the failure"
if [[ -n $expect ]]; then
  grep -Eq -- "$expect" "$log" || fail "the output does not match /$expect/"
fi
echo "ring_fault_test.sh: passed (non-zero exit within $elapsed s)"
