#!/usr/bin/env python3
"""blockattn against ONNX Runtime's CPU attention operators, side by side, rounds interleaved.

For each shape (float, batch 1, 8 heads; prefill n = 512 ... 4096, d = 64 and 128, causal and
not; decode n_q = 1 over n_k = 32768 and 262144, d = 64; 1 and 2 threads) it alternates rounds
of blockattn (attention_bench filtered to that one benchmark, one repetition, JSON) and of ONNX
Runtime (bench/compare_ort.mjs, kept running for the shape, its sessions built once): each
round times every ORT operator over at least --min-time seconds of calls. Medians of --rounds.

ORT operators (see compare_ort.mjs): com.microsoft MultiHeadAttention on [1, S, heads·d]
tensors (causal: its unidirectional attribute), the ONNX Attention operator of opset 23 on
[1, heads, S, d] (causal: is_causal), and for decode also MultiHeadAttention with K and V as
[1, heads, n_k, d]. CPU provider, intra-op threads = the thread count, inter-op 1, all graph
optimisations. Both sides read the same inputs (bench/support/hash_inputs.hpp, which the Node
script reproduces exactly; attention_bench's decode rows use their own random inputs of the same
distribution); every ORT call's output is compared with blockattn's (ort_reference_dump), and a
difference above --tolerance is reported as a MISMATCH (exit status 1).

Prefill rows give GFLOP/s (4·n_q·n_k·d per head, the visible pairs for causal), decode rows GB/s
of K and V read; "ratio" is blockattn over the best ORT operator of the row.

Usage (from the repository):
  bash bench/fetch_ort.sh     # npm install --ignore-scripts onnxruntime-node into build/ort
  cmake --preset bench && cmake --build --preset bench --target attention_bench ort_reference_dump
  python3 bench/compare_ort.py [--shapes REGEX] [--rounds 5] [--json out.json]
Exits 0 with a message when node or onnxruntime-node is missing (BLOCKATTN_ORT_DIR unset and
build/ort/node_modules absent).
"""
import argparse
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADS = 8
OPS = [("mha", "ORT MHA"), ("attention", "ORT Attention"), ("mha_bhsd_kv", "ORT MHA, K/V BHSD")]


def shapes():
    """(n_q, n_k, d, causal, threads) in table order: prefill, then decode."""
    for threads in (1, 2):
        for causal in (0, 1):
            for d in (64, 128):
                for n in (512, 1024, 2048, 4096):
                    yield (n, n, d, causal, threads)
    for threads in (1, 2):
        for n_k in (32768, 262144):
            yield (1, n_k, 64, 0, threads)


def shape_name(shape):
    n_q, n_k, d, causal, threads = shape
    return f"n_q:{n_q}/n_k:{n_k}/heads:{HEADS}/d:{d}/causal:{causal}/threads:{threads}"


def blockattn_benchmark(shape):
    """attention_bench's name for the shape (one benchmark; '<' and '>' are literal in its
    POSIX regex)."""
    n_q, n_k, d, causal, threads = shape
    if n_q == 1:
        return (f"BM_Attention_Decode<float>/n_k:{n_k}/kv_heads:{HEADS}/d:{d}/threads:{threads}"
                "/bhsd:0/real_time")
    return (f"Large/CompareOrt/BM_Attention_Prefill<float>/n:{n_q}/heads:{HEADS}/d:{d}"
            f"/causal:{causal}/threads:{threads}/real_time")


def visible_pairs(n_q, n_k, causal):
    if not causal:
        return n_q * n_k
    return sum(min(n_k, max(0, i + n_k - n_q + 1)) for i in range(n_q))


def rate(shape, seconds):
    """GFLOP/s (prefill) or GB/s of K and V (decode) of one call taking `seconds`."""
    n_q, n_k, d, causal, _ = shape
    if n_q == 1:
        return 4.0 * n_k * HEADS * 2 * d / seconds * 1e-9
    return 4.0 * d * visible_pairs(n_q, n_k, causal) * HEADS / seconds * 1e-9


def run_blockattn(binary, shape):
    out = subprocess.run([binary, f"--benchmark_filter=^{blockattn_benchmark(shape)}$",
                          "--benchmark_format=json"],
                         check=True, capture_output=True, text=True).stdout
    runs = [b for b in json.loads(out)["benchmarks"] if not b.get("error_occurred")]
    if len(runs) != 1:
        raise RuntimeError(f"attention_bench ran {len(runs)} benchmarks for {shape_name(shape)}")
    key = "kv_bytes_per_second" if shape[0] == 1 else "FLOP/s"
    return runs[0][key] * 1e-9


class OrtProcess:
    """compare_ort.mjs for one shape: built once, then one round per call of round()."""

    def __init__(self, shape, reference, env, min_time):
        n_q, n_k, d, causal, threads = shape
        self.process = subprocess.Popen(
            ["node", str(ROOT / "bench/compare_ort.mjs"), "--n-q", str(n_q), "--n-k", str(n_k),
             "--heads", str(HEADS), "--d", str(d), "--causal", str(causal), "--threads",
             str(threads), "--reference", reference, "--min-time", str(min_time)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._read()

    def _read(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("compare_ort.mjs ended without an answer")
        message = json.loads(line)
        if message["event"] == "error":
            raise RuntimeError(f"compare_ort.mjs: {message['message']}")
        return message

    def round(self):
        self.process.stdin.write("round\n")
        self.process.stdin.flush()
        return self._read()["results"]

    def close(self):
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.process.wait()


def find_ort(env):
    if shutil.which("node") is None:
        return "node is not installed"
    folder = env.get("BLOCKATTN_ORT_DIR") or str(ROOT / "build/ort/node_modules")
    if not (pathlib.Path(folder) / "onnxruntime-node" / "package.json").is_file():
        return f"no onnxruntime-node in {folder} (run bash bench/fetch_ort.sh)"
    env["BLOCKATTN_ORT_DIR"] = folder
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    build = ROOT / "build/bench/bench"
    parser.add_argument("--bench", default=str(build / "attention_bench"))
    parser.add_argument("--dump", default=str(build / "ort_reference_dump"))
    parser.add_argument("--shapes", default=".", help="regex over names like "
                        "n_q:512/n_k:512/heads:8/d:64/causal:0/threads:1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.5,
                        help="seconds of ORT calls per operator and round")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted |ORT - blockattn| of an output element")
    parser.add_argument("--json", help="write every round's figures here")
    args = parser.parse_args()

    env = dict(os.environ)
    missing = find_ort(env)
    if missing:
        print(f"compare_ort: {missing}; skipped")
        return 0
    for binary in (args.bench, args.dump):
        if not os.path.exists(binary):
            print(f"compare_ort: {binary} not found; build it (cmake --preset bench && cmake "
                  "--build --preset bench --target attention_bench ort_reference_dump)")
            return 1

    selected = [s for s in shapes() if re.search(args.shapes, shape_name(s))]
    load_before = os.getloadavg()[0]
    records = []
    errors = {}
    version = ""
    for shape in selected:
        with tempfile.NamedTemporaryFile(suffix=".bin") as reference:
            n_q, n_k, d, causal, _ = shape
            subprocess.run([args.dump, str(n_q), str(n_k), str(HEADS), str(d), str(causal),
                            reference.name], check=True)
            ort = OrtProcess(shape, reference.name, env, args.min_time)
            version = ort.ready["ort_version"]
            errors.update(ort.ready["errors"])
            record = {"shape": shape_name(shape), "blockattn": [], "first": ort.ready["first"]}
            for op, _ in OPS:
                record[op] = []
            for r in range(args.rounds):
                # Alternate which side runs first, so that a drift in load hits both alike.
                sides = ["blockattn", "ort"] if r % 2 == 0 else ["ort", "blockattn"]
                for side in sides:
                    if side == "blockattn":
                        record["blockattn"].append(run_blockattn(args.bench, shape))
                        continue
                    for op, result in ort.round().items():
                        record[op].append({"rate": rate(shape, result["seconds"]), **result})
            ort.close()
        records.append(record)
        print_row(shape, record, args.tolerance, header=len(records) == 1, version=version,
                  rounds=args.rounds)

    load_after = os.getloadavg()[0]
    for op, error in sorted(errors.items()):
        print(f"ORT rejected {op}: {error}")
    print(f"load average {load_before:.2f} before, {load_after:.2f} after")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"ort_version": version, "rounds": args.rounds, "errors": errors,
             "load_average": [load_before, load_after], "records": records}, indent=1))
    mismatches = [r["shape"] for r in records if worst_diff(r) > args.tolerance]
    if mismatches:
        print(f"MISMATCH: ORT's output differs from blockattn's by more than {args.tolerance:g} "
              f"on {', '.join(mismatches)}", file=sys.stderr)
        return 1
    return 0


def worst_diff(record):
    diffs = [r["max_abs_diff"] for op, _ in OPS for r in record[op]]
    diffs += [f["max_abs_diff"] for f in record["first"].values()]
    return max(diffs, default=0.0)


def print_row(shape, record, tolerance, header, version, rounds):
    if header:
        print(f"onnxruntime-node {version}; {HEADS} heads, float; medians of {rounds} "
              "interleaved rounds")
        print("| n_q | n_k | d | causal | threads | unit | blockattn | "
              + " | ".join(label for _, label in OPS) + " | ratio | max_abs_diff |")
        print("| --- " * (9 + len(OPS)) + "|")
    n_q, n_k, d, causal, threads = shape
    ours = statistics.median(record["blockattn"])
    theirs = {op: statistics.median(r["rate"] for r in record[op]) for op, _ in OPS if record[op]}
    best = max(theirs.values(), default=None)
    diff = worst_diff(record)
    flag = " MISMATCH" if diff > tolerance else ""
    cells = " | ".join(f"{theirs[op]:.1f}" if op in theirs else "-" for op, _ in OPS)
    print(f"| {n_q} | {n_k} | {d} | {causal} | {threads} | {'GB/s' if n_q == 1 else 'GFLOP/s'} "
          f"| {ours:.1f} | {cells} | {f'{ours / best:.2f}x' if best else ''} "
          f"| {diff:.1e}{flag} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
