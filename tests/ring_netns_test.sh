#!/usr/bin/env bash
# ring_netns_test.sh <mpiexec> <ranks> <program> [args...]: runs an MPI program across two
# network namespaces joined by a veth pair, so that ring messages cross a real network stack
# (Open MPI's TCP transport), as between two hosts:
#   namespace A (192.0.2.1) runs mpirun and ranks 0 … ranks/2 − 1;
#   namespace B (192.0.2.2) runs an orted that mpirun starts through a launch agent standing in
#   for ssh (`ip netns exec B sh -c …`), and the other ranks;
#   mpirun --hostfile (the two addresses) --mca pml ob1 --mca btl tcp,self
#          --mca btl_tcp_if_include 192.0.2.0/24 --mca oob_tcp_if_include 192.0.2.0/24.
# Ranks cannot simply be wrapped in `ip netns exec`: an Open MPI 4.1 process reaches its local
# daemon's PMIx server over TCP loopback, which a namespace does not share; one daemon per
# namespace is how multi-host jobs work anyway. 192.0.2.0/24 is TEST-NET-1 (RFC 5737, never a
# real network), and only inside the two namespaces. Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and
# iproute2: without them it prints why and exits 77, which ctest reports as skipped. Passes when
# the program succeeds and the veth carried traffic both ways (at least <min bytes> each way,
# default 10000: more than one K/V shard of the ring tests).
set -uo pipefail
mpiexec=$1
ranks=$2
shift 2
min_bytes=${BLOCKATTN_NETNS_MIN_BYTES:-10000}

skip() {
  echo "ring_netns_test.sh: SKIPPED: $*"
  exit 77
}
fail() {
  echo "ring_netns_test.sh: FAILED: $*"
  exit 1
}

command -v ip >/dev/null || skip "iproute2's ip is not installed (apt-get install iproute2)"
# Namespaces left by a run that was killed (their creator is gone).
for stale in $(ip netns list 2>/dev/null | awk '/^blockattn-ring-/ { print $1 }'); do
  owner=${stale#blockattn-ring-}
  owner=${owner%-*}
  kill -0 "$owner" 2>/dev/null || ip netns del "$stale" 2>/dev/null
done

a=blockattn-ring-$$-a
b=blockattn-ring-$$-b
dir=$(mktemp -d)
cleanup() {
  ip netns del "$a" 2>/dev/null
  ip netns del "$b" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
error=$(ip netns add "$a" 2>&1) ||
  skip "cannot create a network namespace (needs root with CAP_SYS_ADMIN): $error"
error=$(ip netns add "$b" 2>&1) || skip "cannot create a second network namespace: $error"
error=$(ip link add "veth$$a" type veth peer name "veth$$b" 2>&1) ||
  skip "cannot create a veth pair (needs CAP_NET_ADMIN and veth support): $error"
ip link set "veth$$a" netns "$a" &&
  ip link set "veth$$b" netns "$b" &&
  ip -n "$a" addr add 192.0.2.1/24 dev "veth$$a" &&
  ip -n "$b" addr add 192.0.2.2/24 dev "veth$$b" &&
  ip -n "$a" link set lo up && ip -n "$b" link set lo up &&
  ip -n "$a" link set "veth$$a" up && ip -n "$b" link set "veth$$b" up ||
  fail "could not configure the veth pair"

# The launch agent: mpirun calls it as `agent <host> <daemon command line>`, as it would ssh.
cat >"$dir/agent" <<AGENT
#!/bin/sh
[ "\$1" = 192.0.2.2 ] || { echo "ring_netns_test.sh agent: unknown host \$1" >&2; exit 1; }
shift
exec ip netns exec $b /bin/sh -c "\$*"
AGENT
chmod +x "$dir/agent"
slots=$(((ranks + 1) / 2))
printf '192.0.2.1 slots=%d\n192.0.2.2 slots=%d\n' "$slots" "$slots" >"$dir/hosts"

# bytes <rx|tx>: what the veth end in namespace A has received or sent so far.
bytes() {
  ip netns exec "$a" cat "/sys/class/net/veth$$a/statistics/$1_bytes"
}
rx0=$(bytes rx)
tx0=$(bytes tx)
ip netns exec "$a" "$mpiexec" -np "$ranks" --hostfile "$dir/hosts" --bind-to none \
  --mca plm_rsh_agent "$dir/agent" --mca pml ob1 --mca btl tcp,self \
  --mca btl_tcp_if_include 192.0.2.0/24 --mca oob_tcp_if_include 192.0.2.0/24 "$@"
status=$?
rx=$(($(bytes rx) - rx0))
tx=$(($(bytes tx) - tx0))
echo "ring_netns_test.sh: $ranks ranks in namespaces $a and $b; the veth carried $tx bytes A→B" \
  "and $rx bytes B→A"
((status == 0)) || fail "the MPI program failed (exit status $status)"
((rx >= min_bytes && tx >= min_bytes)) ||
  fail "less than $min_bytes bytes each way crossed the veth: the ranks did not talk over it"
echo "ring_netns_test.sh: passed"
