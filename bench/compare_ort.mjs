// ONNX Runtime's side of bench/compare_ort.py: one attention shape, two ORT operators, timed in
// rounds that the Python driver interleaves with blockattn's attention_bench runs.
//
// ORT is the npm package onnxruntime-node (its libonnxruntime.so is the CPU runtime), loaded at
// run time from BLOCKATTN_ORT_DIR (a node_modules folder, bench/fetch_ort.sh); nothing of it is
// part of blockattn. The two ONNX models are written here as protobuf bytes (a few fields of
// onnx.proto3: ModelProto, GraphProto, NodeProto, AttributeProto, ValueInfoProto), so no ONNX
// tooling is needed either:
//   mha        com.microsoft MultiHeadAttention: query, key, value [1, S, heads·d]; num_heads;
//              unidirectional = 1 when causal. Default scale 1/sqrt(d).
//   attention  ONNX Attention (opset 23): Q, K, V [1, heads, S, d]; is_causal = 1 when causal.
// Inputs: bench/support/hash_inputs.hpp's values, computed here bit for bit (Math.imul), so both
// sides read the same q, k, v; --reference is blockattn's output on them (ort_reference_dump),
// and every ORT call's output is compared with it (largest absolute difference per round).
//
// Usage: node bench/compare_ort.mjs --n-q N --n-k N --heads H --d D --causal 0|1 --threads T
//            --reference out.bin [--min-time 0.5]
// Protocol (one JSON object per stdout line): first {"event": "ready", ...} with each op's error
// when ORT rejects it; then, per "round" line read on stdin, {"event": "round", "results": {op:
// {"seconds": per call, "calls": n, "max_abs_diff": x}}}; "quit" ends the process.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';

function parseArgs(argv) {
  const args = { minTime: 0.5 };
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, '').replace(/-(.)/g, (_, c) => c.toUpperCase());
    args[name] = name === 'reference' ? argv[i + 1] : Number(argv[i + 1]);
  }
  for (const required of ['nQ', 'nK', 'heads', 'd', 'causal', 'threads', 'reference']) {
    if (args[required] === undefined || Number.isNaN(args[required])) {
      throw new Error(`compare_ort.mjs: missing --${required}`);
    }
  }
  return args;
}

// ---------------------------------------------------------------------------------------------
// Protobuf encoding: varints and length-delimited fields are all these messages need.

function varint(value) {
  const bytes = [];
  let v = BigInt(value);
  do {
    let byte = Number(v & 0x7fn);
    v >>= 7n;
    if (v !== 0n) byte |= 0x80;
    bytes.push(byte);
  } while (v !== 0n);
  return Uint8Array.from(bytes);
}
const concat = (parts) => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
};
const tag = (field, wire) => varint((field << 3) | wire);
const intField = (field, value) => concat([tag(field, 0), varint(value)]);
const bytesField = (field, bytes) => concat([tag(field, 2), varint(bytes.length), bytes]);
const stringField = (field, text) => bytesField(field, new TextEncoder().encode(text));

const kFloatType = 1;  // TensorProto.DataType.FLOAT
const kAttributeInt = 2;  // AttributeProto.AttributeType.INT

function intAttribute(name, value) {  // AttributeProto: name = 1, i = 3, type = 20
  return concat([stringField(1, name), intField(3, value), intField(20, kAttributeInt)]);
}

function floatTensorInfo(name, dims) {  // ValueInfoProto{name, TypeProto{Tensor{elem, shape}}}
  const shape = concat(dims.map((d) => bytesField(1, intField(1, d))));  // Dimension.dim_value
  const tensor = concat([intField(1, kFloatType), bytesField(2, shape)]);
  return concat([stringField(1, name), bytesField(2, bytesField(1, tensor))]);
}

/// A ModelProto with one node; `node` = {op, domain, inputs, output, attributes, dims, outDims}.
function oneNodeModel(node, opsets) {
  const nodeProto = concat([
    ...node.inputs.map((name) => stringField(1, name)),
    stringField(2, node.output),
    stringField(3, node.op),
    stringField(4, node.op),
    ...node.attributes.map((a) => bytesField(5, a)),
    ...(node.domain ? [stringField(7, node.domain)] : []),
  ]);
  const graph = concat([
    bytesField(1, nodeProto),
    stringField(2, 'blockattn_compare'),
    ...node.inputs.map((name) => bytesField(11, floatTensorInfo(name, node.dims[name]))),
    bytesField(12, floatTensorInfo(node.output, node.outDims)),
  ]);
  return concat([
    intField(1, 11),  // ir_version 11: ONNX 1.18, the release of opset 23
    stringField(2, 'blockattn bench/compare_ort.mjs'),
    bytesField(7, graph),
    ...opsets.map(([domain, version]) => bytesField(8, concat([stringField(1, domain),
                                                               intField(2, version)]))),
  ]);
}

// ---------------------------------------------------------------------------------------------
// Inputs: the hash of bench/support/hash_inputs.hpp, in 32-bit integer arithmetic.

function hashedValue(tensor, index) {
  let h = (Math.imul(index, 0x9e3779b1) + Math.imul(tensor, 0x85ebca77)) >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d) >>> 0;
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b) >>> 0;
  h ^= h >>> 16;
  return ((h >>> 8) - 8388608) * 2 ** -23;
}
const kQuery = 1;
const kKey = 2;
const kValue = 3;

/// Tensor `tensor` of logical shape [1, seq, heads, d], stored as BSHD (bhsd = false) or BHSD.
function hashedTensor(tensor, seq, heads, d, bhsd) {
  const x = new Float32Array(seq * heads * d);
  for (let s = 0; s < seq; ++s) {
    for (let h = 0; h < heads; ++h) {
      const from = (s * heads + h) * d;
      const to = bhsd ? (h * seq + s) * d : from;
      for (let j = 0; j < d; ++j) x[to + j] = hashedValue(tensor, from + j);
    }
  }
  return x;
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const ortDir = process.env.BLOCKATTN_ORT_DIR;
  const require = createRequire(import.meta.url);
  const ort = require(path.join(ortDir, 'onnxruntime-node'));
  const { nQ, nK, heads, d } = args;
  const causal = args.causal !== 0;
  const hidden = heads * d;
  const file = readFileSync(args.reference);  // small files share a pooled ArrayBuffer: copy out
  const reference = new Float32Array(file.buffer.slice(file.byteOffset,
                                                       file.byteOffset + file.byteLength));
  if (reference.length !== nQ * heads * d) throw new Error('reference: wrong size');

  const ops = {
    mha: {
      model: oneNodeModel({
        op: 'MultiHeadAttention',
        domain: 'com.microsoft',
        inputs: ['query', 'key', 'value'],
        output: 'output',
        attributes: [intAttribute('num_heads', heads),
                     ...(causal ? [intAttribute('unidirectional', 1)] : [])],
        dims: { query: [1, nQ, hidden], key: [1, nK, hidden], value: [1, nK, hidden] },
        outDims: [1, nQ, hidden],
      }, [['', 23], ['com.microsoft', 1]]),
      bhsd: false,
    },
    attention: {
      model: oneNodeModel({
        op: 'Attention',
        domain: '',
        inputs: ['Q', 'K', 'V'],
        output: 'Y',
        attributes: causal ? [intAttribute('is_causal', 1)] : [],
        dims: { Q: [1, heads, nQ, d], K: [1, heads, nK, d], V: [1, heads, nK, d] },
        outDims: [1, heads, nQ, d],
      }, [['', 23]]),
      bhsd: true,
    },
  };
  if (nQ === 1) {
    // Decode also as a KV-cache user calls MHA: key and value as [1, heads, n_k, d] (the
    // documented past_key/past_value layout), which spares the per-call transpose of the cache.
    ops.mha_bhsd_kv = {
      model: oneNodeModel({
        op: 'MultiHeadAttention',
        domain: 'com.microsoft',
        inputs: ['query', 'key', 'value'],
        output: 'output',
        attributes: [intAttribute('num_heads', heads)],
        dims: { query: [1, nQ, hidden], key: [1, heads, nK, d], value: [1, heads, nK, d] },
        outDims: [1, nQ, hidden],
      }, [['', 23], ['com.microsoft', 1]]),
      bhsd: false,
      kvBhsd: true,
    };
  }
  const options = {
    executionProviders: ['cpu'],
    intraOpNumThreads: args.threads,
    interOpNumThreads: 1,
    executionMode: 'sequential',
    graphOptimizationLevel: 'all',
  };

  // The largest difference between an ORT output (BSHD or BHSD) and blockattn's (BSHD).
  const maxAbsDiff = (out, bhsd) => {
    let worst = 0;
    for (let s = 0; s < nQ; ++s) {
      for (let h = 0; h < heads; ++h) {
        const at = (s * heads + h) * d;
        const from = bhsd ? (h * nQ + s) * d : at;
        for (let j = 0; j < d; ++j) {
          const diff = Math.abs(out[from + j] - reference[at + j]);
          if (Number.isNaN(diff)) return Infinity;  // a NaN is the worst possible difference
          if (diff > worst) worst = diff;
        }
      }
    }
    return worst;
  };

  const version = ort.env.versions?.node ?? '';
  const ready = { event: 'ready', ort_version: version, errors: {}, first: {} };
  for (const [name, op] of Object.entries(ops)) {
    try {
      op.session = await ort.InferenceSession.create(op.model, options);
      const names = op.session.inputNames;
      op.feeds = {};
      names.forEach((input, i) => {
        const [tensor, seq] = [[kQuery, nQ], [kKey, nK], [kValue, nK]][i];
        const bhsd = op.bhsd || (op.kvBhsd && tensor !== kQuery);
        const dims = bhsd ? [1, heads, seq, d] : [1, seq, hidden];
        op.feeds[input] = new ort.Tensor('float32', hashedTensor(tensor, seq, heads, d, bhsd),
                                         dims);
      });
      const start = process.hrtime.bigint();
      const result = await op.session.run(op.feeds);
      op.seconds = Number(process.hrtime.bigint() - start) * 1e-9;
      op.output = op.session.outputNames[0];
      ready.first[name] = { seconds: op.seconds,
                            max_abs_diff: maxAbsDiff(result[op.output].data, op.bhsd) };
    } catch (error) {
      ready.errors[name] = String(error.message ?? error).split('\n')[0];
      delete ops[name];
    }
  }
  console.log(JSON.stringify(ready));

  // Outputs are kept until the timed calls end and checked then, so checking costs no time
  // inside the loop; at most 1 GiB of them at once.
  const keepLimit = Math.max(1, Math.floor(2 ** 30 / (4 * nQ * hidden)));
  let round = 0;
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (line.trim() === 'quit') break;
    if (line.trim() !== 'round') continue;
    const results = {};
    const names = Object.keys(ops);
    if (round++ % 2 === 1) names.reverse();  // alternate which op runs first
    for (const name of names) {
      const op = ops[name];
      const calls = Math.min(keepLimit, Math.max(1, Math.ceil(args.minTime / op.seconds)));
      const outputs = [];
      const start = process.hrtime.bigint();
      for (let i = 0; i < calls; ++i) outputs.push((await op.session.run(op.feeds))[op.output]);
      const seconds = Number(process.hrtime.bigint() - start) * 1e-9 / calls;
      op.seconds = seconds;
      const worst = Math.max(...outputs.map((t) => maxAbsDiff(t.data, op.bhsd)));
      results[name] = { seconds, calls, max_abs_diff: worst };
    }
    console.log(JSON.stringify({ event: 'round', results }));
  }
  lines.close();
  process.exit(0);
}

main().catch((error) => {
  console.log(JSON.stringify({ event: 'error', message: String(error.message ?? error) }));
  process.exit(1);
});
