#pragma once
// Decode: the forward pass for at most kDirectRows query rows per kv head (one new token, or a
// few, against a KV cache). K and V are read in place, never packed (score_rows_direct,
// accumulate_pv_direct of detail/microkernel.hpp: each K / V row is loaded once for all the rows,
// with software prefetch ahead when the rows are contiguous). With at most kDecodePipelineRows
// rows per kv head and contiguous rows (AttentionPlan::pipelined), each chunk's P·V is deferred
// and interleaved with the next chunk's scores, so that K and V stream together. The keys are
// split into fixed segments (Flash-Decoding, AttentionPlan::segments) whose partial states
// attention_forward() merges in order; a long cache with several interleaved kv heads runs every
// head in one task, chunk by chunk (ForwardPath::DecodeInterleaved).

#include <algorithm>

#include <blockattn/detail/attention_plan.hpp>
#include <blockattn/detail/attention_problem.hpp>
#include <blockattn/detail/kv_source.hpp>
#include <blockattn/detail/microkernel.hpp>
#include <blockattn/detail/non_finite_values.hpp>
#include <blockattn/detail/online_state.hpp>
#include <blockattn/detail/workspace.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

// Decode: how far ahead (bytes of K or V rows) the direct kernels prefetch, so that memory keeps
// streaming across the softmax between the K and V phases. 4 KiB: best of 2–16 KiB; contiguous
// rows only, strided rows do better with the hardware prefetchers (docs/tuning.md#decode-prefetch).
inline constexpr Index kDecodePrefetchBytes = 4096;
// Decode: keys per step of the interleaved scores / P·V loop (scores_with_pending_values): two
// streams read in alternation beat one only when they alternate often; 16 keys is 4 KiB at
// d = 64 float and a multiple of score_rows_direct's key blocks
// (docs/tuning.md#decode-interleave-keys).
inline constexpr Index kDecodeInterleaveKeys = 16;

/// Rows of K or V (elements of type T, the storage) that the direct kernels prefetch ahead:
/// kDecodePrefetchBytes of rows when the rows are contiguous (row stride ld == row_elements);
/// when they are strided, none for float and double (see kDecodePrefetchBytes) but the same for
/// a 16-bit cache, whose widening loads leave the hardware prefetchers behind: on the
/// interleaved-heads decode (8 kv heads, [seq, heads, dim], d = 64, one thread) prefetching
/// measured 1.4x the tokens/s of not prefetching (same run, a loaded machine).
template <class T>
Index decode_prefetch_rows(Index row_elements, Index ld) {
  if (ld != row_elements && sizeof(T) > 2) return 0;
  return std::max<Index>(
      1, kDecodePrefetchBytes / (std::max<Index>(1, row_elements) * static_cast<Index>(sizeof(T))));
}

/// Decode: the scores s[rows, keys] = q·Kᵀ of one unit (one kv head's rows × one key chunk), K
/// rows from k (storage S: T or a 16-bit format), of which keys_left may be prefetched (the task's
/// rest of this head).
template <class T, class S = T>
struct ScoreUnit {
  const T* q = nullptr;  ///< [rows, d]: the scaled queries
  Index rows = 0;
  Index d = 0;
  StridedRows<S> k;
  Index keys = 0;
  Index keys_left = 0;
  T* s = nullptr;  ///< [rows, keys], row stride ld_s
  Index ld_s = 0;
  RowScales k_scales{};  ///< the rows' scales (int8 K), from k's first row
};

/// Decode: a unit whose weights p are ready and whose P·V product is deferred, so that its V rows
/// stream from memory together with the next unit's K rows (see scores_with_pending_values).
/// p == nullptr: nothing pending. V rows in storage S.
template <class T, class S = T>
struct PendingValues {
  const T* p = nullptr;  ///< [rows, keys], row stride ld_p: the weights
  Index ld_p = 0;
  Index rows = 0;
  Index keys = 0;
  StridedRows<S> v;     ///< the unit's V rows
  Index keys_left = 0;  ///< V rows from v that may be prefetched (the task's rest of this head)
  T* acc = nullptr;     ///< the unit's first row of the running output, row stride ld_acc
  Index ld_acc = 0;
  Index d_v = 0;
  RowScales v_scales{};  ///< the rows' scales (int8 V), from v's first row
};

/// Decode: acc += the pending unit's P·V over its keys [j, j + count) (accumulate_pv_direct),
/// prefetching v_ahead V rows ahead within the task's rest of the head.
template <class T, class S>
void pending_values_step(const PendingValues<T, S>& pending, Index j, Index count, Index v_ahead) {
  accumulate_pv_direct(pending.p + j, pending.ld_p, pending.rows, count, pending.v.row(j),
                       pending.v.ld, pending.d_v, pending.acc, pending.ld_acc,
                       RowPrefetch{v_ahead, pending.keys_left - j}, pending.v_scales.from(j));
}

/// Decode: the scores of `next` (score_rows_direct) and the pending unit's acc += P·V
/// (accumulate_pv_direct), taken kDecodeInterleaveKeys keys at a time from each, so that K and V
/// stream from memory together; nothing is pending afterwards. next.keys = 0 only flushes the
/// pending unit. The results are bitwise those of the two kernels called one after the other
/// (the same operations in the same order for every score and every accumulator).
template <class T, class S>
void scores_with_pending_values(const ScoreUnit<T, S>& next, PendingValues<T, S>& pending) {
  const Index keys = next.keys;
  const Index pv_keys = pending.p != nullptr ? pending.keys : 0;
  // One stream alone (nothing pending, or a flush) takes one step.
  const Index step = keys > 0 && pv_keys > 0 ? kDecodeInterleaveKeys : std::max(keys, pv_keys);
  const Index k_ahead = decode_prefetch_rows<S>(next.d, next.k.ld);
  const Index v_ahead = decode_prefetch_rows<S>(pending.d_v, pending.v.ld);
  for (Index j = 0; j < std::max(keys, pv_keys); j += step) {
    if (j < keys) {
      score_rows_direct(next.q, next.d, next.rows, next.d, next.k.row(j), next.k.ld,
                        std::min(step, keys - j), next.s + j, next.ld_s,
                        RowPrefetch{k_ahead, next.keys_left - j}, next.k_scales.from(j));
    }
    if (j < pv_keys) pending_values_step(pending, j, std::min(step, pv_keys - j), v_ahead);
  }
  pending.p = nullptr;
}

/// Decode: runs the pending unit's P·V alone (scores_with_pending_values without scores).
template <class T, class S>
void flush_pending_values(PendingValues<T, S>& pending) {
  scores_with_pending_values<T, S>(ScoreUnit<T, S>{}, pending);
}

/// One decode task's running buffers: its scaled queries, its online state, the two score
/// buffers (the pending unit's weights and the next unit's scores) and the unit whose P·V is
/// pending. K/V rows in storage S.
template <class T, class S = T>
struct DecodeStream {
  const T* queries;  ///< [task rows, d]: the task's scaled queries, in state row order
  RowBlockState<T>& state;
  T* scores[2];  ///< two [rows of one kv head, ld_s] buffers
  Index ld_s;    ///< row stride of the score buffers
  /// [key_chunk, d_v]: the slow path's finite copy of a chunk's values; int4 (whose values are
  /// finite, no slow path): a run of dequantized values (decode_chunk_dequantized)
  T* finite_values;
  bool pipelined;  ///< leave each chunk's P·V pending (AttentionPlan::pipelined)
  /// [rows of one kv head, d + 1]: per-channel int8 keys only (kChannelKeys), one key block's
  /// scaled queries then their zero-point terms (decode_chunk_channel_keys); int4 only
  /// (kDequantizesRows): [min(key_chunk, kDecodeDequantizeKeys), d], a run of dequantized keys
  T* block_queries = nullptr;
  PendingValues<T, S> pending{};

  /// The score buffer the pending unit does not use.
  T* free_scores() const { return scores[pending.p == scores[0] ? 1 : 0]; }
};

/// Keys [k0, k0 + keys) of one unit, and keys_left: the task's remaining keys of its kv head
/// from k0 on, which the kernels may prefetch.
struct KeyChunk {
  Index k0 = 0;
  Index keys = 0;
  Index keys_left = 0;
};

/// One run of K or V rows that one kernel call of decode_chunk_in_runs reads: the rows (one
/// stride), their scales (int8 rows; else empty) and how many rows ahead the kernel may prefetch
/// (0: none).
template <class S>
struct RowRun {
  StridedRows<S> rows;
  RowScales scales{};
  Index prefetch = 0;
};

/// Decode: decode_chunk() for a source whose rows are read in runs, not pipelined (a pending unit
/// is flushed first and the chunk's P·V runs at once). key_runs(f) and value_runs(f) call
/// f(j, run, RowRun) for runs of the chunk's keys [k0 + j, k0 + j + run) that cover it in key
/// order: a paged cache's page runs (decode_chunk_split_rows), or an int4 cache's rows
/// dequantized into an L1 buffer (decode_chunk_dequantized). Splitting a chunk's reads changes no
/// bit: every score is one dot product whatever the key blocking (score_rows_direct), and
/// accumulate_pv_direct adds the keys' products to acc in key order, stored and reloaded exactly
/// between calls. The chunk grid, the masks and the softmax update are decode_chunk's.
template <class T, class MaskMod, class ScoreMod, class Source, class KeyRuns, class ValueRuns>
void decode_chunk_in_runs(const AttentionProblem<T, MaskMod, ScoreMod>& problem, const Source& kv,
                          const TileRows& t, Index first, const KeyChunk& chunk,
                          DecodeStream<T, typename Source::Storage>& stream,
                          const KeyRuns& key_runs, const ValueRuns& value_runs) {
  using S = typename Source::Storage;
  const Index rows = t.rows();
  const Index keys = chunk.keys;
  const Index d = problem.d;
  const Index d_v = problem.d_v;
  const Index ld_s = stream.ld_s;
  RowBlockState<T>& state = stream.state;
  flush_pending_values(stream.pending);
  T* const s = stream.free_scores();
  if (!problem.mask_rows(s, ld_s, 0, rows, keys, t, chunk.k0, /*dry_run=*/true)) return;
  const T* const q = stream.queries + first * d;
  key_runs([&](Index j, Index run, const RowRun<S>& k) {
    score_rows_direct(q, d, rows, d, k.rows.data, k.rows.ld, run, s + j, ld_s,
                      RowPrefetch{k.prefetch, run}, k.scales);
  });
  problem.mask_rows(s, ld_s, 0, rows, keys, t, chunk.k0, /*dry_run=*/false);
  if constexpr (!Source::kValuesFinite) {
    if (tile_has_hidden_key(s, ld_s, rows, keys) &&
        !kv.values_finite(chunk.k0, keys)) {  // the NaN slow path
      poison_underflowed_value_rows(
          s, ld_s, first, rows, keys, [&](Index j) { return kv.value_row(chunk.k0 + j); }, d_v,
          state);
      kv.copy_finite_values(chunk.k0, keys, stream.finite_values);
      state.update_scores(s, ld_s, first, rows, keys);
      accumulate_pv_direct(s, ld_s, rows, keys, stream.finite_values, d_v, d_v, state.acc(first),
                           state.ld_acc());
      value_runs([&](Index j, Index run, const RowRun<S>& v) {
        add_non_finite_values(s + j, ld_s, rows, run, v.rows.data, v.rows.ld, d_v, state.acc(first),
                              state.ld_acc());
      });
      return;
    }
  }
  state.update_scores(s, ld_s, first, rows, keys);
  value_runs([&](Index j, Index run, const RowRun<S>& v) {
    accumulate_pv_direct(s + j, ld_s, rows, run, v.rows.data, v.rows.ld, d_v, state.acc(first),
                         state.ld_acc(), RowPrefetch{v.prefetch, run}, v.scales);
  });
}

/// Decode: decode_chunk() for a source whose rows lie on several strides (a paged cache,
/// kSplitsRows): decode_chunk_in_runs over its page runs (contiguous_keys), each kernel call one
/// run of rows that share a stride. A paged call is thus bitwise the call on the gathered cache.
template <class T, class MaskMod, class ScoreMod, class Source>
void decode_chunk_split_rows(const AttentionProblem<T, MaskMod, ScoreMod>& problem,
                             const Source& kv, const TileRows& t, Index first,
                             const KeyChunk& chunk,
                             DecodeStream<T, typename Source::Storage>& stream) {
  using S = typename Source::Storage;
  const Index k0 = chunk.k0;
  decode_chunk_in_runs(
      problem, kv, t, first, chunk, stream,
      [&](auto&& f) {
        kv.for_each_page_run(k0, chunk.keys, [&](Index j, Index run) {
          const StridedRows<S> k = kv.keys(k0 + j);
          f(j, run, RowRun<S>{k, kv.key_scales(k0 + j), decode_prefetch_rows<S>(problem.d, k.ld)});
        });
      },
      [&](auto&& f) {
        kv.for_each_page_run(k0, chunk.keys, [&](Index j, Index run) {
          const StridedRows<S> v = kv.values(k0 + j);
          f(j, run,
            RowRun<S>{v, kv.value_scales(k0 + j), decode_prefetch_rows<S>(problem.d_v, v.ld)});
        });
      });
}

/// The row scale of a raw int8 row: 1 for every row (ld 0), an exact multiply.
inline constexpr float kUnitScale = 1.0f;

/// Decode: decode_chunk() for int8 keys quantized per channel in blocks (kChannelKeys). Within a
/// block, key j's features are scale[c]·(k8[j, c] − zero[c]), so a score is
/// Σ_c (q_c·scale[c])·k8[j, c] − Σ_c (q_c·scale[c])·zero[c]: the queries are scaled once per block
/// (block_queries: rows·d multiplies and rows·d FMAs for the bias, against the block's
/// keys·rows·d FMAs), the int8 rows stream through score_rows_direct converted in registers (times
/// a unit row scale, exact), and one subtraction per score applies the block's bias. The chunk is
/// cut at block boundaries (a chunk need not start on one); the masks, the softmax update and
/// P·V (per-row value scales, as QuantizedKVSource) are decode_chunk's. Pipelined as
/// decode_chunk: after each block run's scores, as many keys of the pending unit's P·V (so K and
/// V stream together; split in key order, so the same bits as one call), and the chunk's own P·V
/// is left pending when the stream is pipelined. A paged source (kSplitsRows: a block never
/// straddles a page) reads each block run's keys from its page and runs the chunk's P·V at once,
/// page run by page run (nothing pending), which are the same bits as above.
template <class T, class MaskMod, class ScoreMod, class Source>
void decode_chunk_channel_keys(const AttentionProblem<T, MaskMod, ScoreMod>& problem,
                               const Source& kv, const TileRows& t, Index first,
                               const KeyChunk& chunk,
                               DecodeStream<T, typename Source::Storage>& stream) {
  using S = typename Source::Storage;
  const Index rows = t.rows();
  const Index keys = chunk.keys;
  const Index d = problem.d;
  const Index d_v = problem.d_v;
  const Index ld_s = stream.ld_s;
  RowBlockState<T>& state = stream.state;
  T* const s = stream.free_scores();
  if (!problem.mask_rows(s, ld_s, 0, rows, keys, t, chunk.k0, /*dry_run=*/true)) return;
  T* const qs = stream.block_queries;
  T* const bias = qs + rows * d;
  const Index block = kv.key_block();
  const Index k_ahead = decode_prefetch_rows<S>(d, kv.keys(chunk.k0).ld);
  PendingValues<T, S>& pending = stream.pending;
  const Index pv_keys = pending.p != nullptr ? pending.keys : 0;
  const Index v_ahead = decode_prefetch_rows<S>(pending.d_v, pending.v.ld);
  Index pv_done = 0;
  for (Index j = 0; j < keys;) {
    const Index run = std::min(keys - j, block - (chunk.k0 + j) % block);
    kv.block_queries(chunk.k0 + j, stream.queries + first * d, rows, qs, bias);
    // A paged source's rows end with the page: prefetch none beyond the run.
    const Index k_limit = kSplitsRows<Source> ? run : chunk.keys_left - j;
    const StridedRows<S> k = kv.keys(chunk.k0 + j);
    score_rows_direct(qs, d, rows, d, k.data, k.ld, run, s + j, ld_s, RowPrefetch{k_ahead, k_limit},
                      RowScales{&kUnitScale, 0});
    for (Index r = 0; r < rows; ++r) {
      T* sr = s + r * ld_s + j;
      for (Index jj = 0; jj < run; ++jj) sr[jj] -= bias[r];
    }
    // acc += the pending unit's P·V over as many of its keys (all of them before this chunk's
    // softmax update, which may rescale the same rows).
    if (pv_done < pv_keys) {
      const Index count = std::min(run, pv_keys - pv_done);
      pending_values_step(pending, pv_done, count, v_ahead);
      pv_done += count;
    }
    j += run;
  }
  if (pv_done < pv_keys) pending_values_step(pending, pv_done, pv_keys - pv_done, v_ahead);
  pending.p = nullptr;
  problem.mask_rows(s, ld_s, 0, rows, keys, t, chunk.k0, /*dry_run=*/false);
  state.update_scores(s, ld_s, first, rows, keys);
  if constexpr (kSplitsRows<Source>) {
    kv.for_each_page_run(chunk.k0, keys, [&](Index j, Index run) {
      const StridedRows<S> v = kv.values(chunk.k0 + j);
      accumulate_pv_direct(s + j, ld_s, rows, run, v.data, v.ld, d_v, state.acc(first),
                           state.ld_acc(), RowPrefetch{decode_prefetch_rows<S>(d_v, v.ld), run},
                           kv.value_scales(chunk.k0 + j));
    });
  } else {
    pending = PendingValues<T, S>{s,
                                  ld_s,
                                  rows,
                                  keys,
                                  kv.values(chunk.k0),
                                  chunk.keys_left,
                                  state.acc(first),
                                  state.ld_acc(),
                                  d_v,
                                  kv.value_scales(chunk.k0)};
    if (!stream.pipelined) flush_pending_values(pending);  // its own phase
  }
}

/// Decode: rows that decode_chunk_dequantized converts at a time: 32 rows of d = 128 floats are
/// 16 KiB, so the converted rows are still in L1 when the float kernel reads them.
inline constexpr Index kDecodeDequantizeKeys = 32;

/// Decode: decode_chunk() for a source that dequantizes runs of rows (kDequantizesRows: int4):
/// decode_chunk_in_runs over runs of kDecodeDequantizeKeys keys, each converted just before its
/// kernel call, keys into the stream's block_queries buffer and values (after the masks and the
/// softmax update) into finite_values (unused otherwise: int4 values are finite). The rows are
/// the float cache's rows, so the call is bitwise the float call on the dequantized cache. Not
/// pipelined (a pending unit would need its converted values kept beside the next chunk's keys).
template <class T, class MaskMod, class ScoreMod, class Source>
void decode_chunk_dequantized(const AttentionProblem<T, MaskMod, ScoreMod>& problem,
                              const Source& kv, const TileRows& t, Index first,
                              const KeyChunk& chunk,
                              DecodeStream<T, typename Source::Storage>& stream) {
  // f(j, run, the run's rows) for each run, after dequantize(k0 + j, run, buffer).
  const auto runs = [&](auto&& f, T* buffer, Index width, auto&& dequantize) {
    for (Index j = 0; j < chunk.keys; j += kDecodeDequantizeKeys) {
      const Index run = std::min(kDecodeDequantizeKeys, chunk.keys - j);
      dequantize(chunk.k0 + j, run, buffer);
      f(j, run, RowRun<T>{StridedRows<T>{buffer, width}});
    }
  };
  decode_chunk_in_runs(
      problem, kv, t, first, chunk, stream,
      [&](auto&& f) {
        runs(f, stream.block_queries, problem.d,
             [&](Index k0, Index n, T* dst) { kv.dequantize_keys(k0, n, dst); });
      },
      [&](auto&& f) {
        runs(f, stream.finite_values, problem.d_v,
             [&](Index k0, Index n, T* dst) { kv.dequantize_values(k0, n, dst); });
      });
}

/// Decode: folds one key chunk of one kv head (source `kv`) into rows [first, first + t.rows())
/// of the stream's state, where `t` holds that kv head's query rows. The chunk's scores are
/// computed together with the pending unit's P·V; when the stream is pipelined, the chunk's own
/// P·V is left pending (flush_pending_values runs it at the end of the task), otherwise it runs
/// at once.
template <class T, class MaskMod, class ScoreMod, class Source>
void decode_chunk(const AttentionProblem<T, MaskMod, ScoreMod>& problem, const Source& kv,
                  const TileRows& t, Index first, const KeyChunk& chunk,
                  DecodeStream<T, typename Source::Storage>& stream) {
  // A paged, per-channel or int4 source goes its own way, chosen at compile time: for the
  // strided sources those branches are discarded and the last is the same text as before paging,
  // so GCC -O2 makes the same inlining decisions in the hot loop (tests/optlevel compares -O2
  // with -O3).
  if constexpr (kChannelKeys<Source>) {  // paged or not
    decode_chunk_channel_keys(problem, kv, t, first, chunk, stream);
    return;
  } else if constexpr (kDequantizesRows<Source>) {  // paged or not
    decode_chunk_dequantized(problem, kv, t, first, chunk, stream);
    return;
  } else if constexpr (kSplitsRows<Source>) {
    decode_chunk_split_rows(problem, kv, t, first, chunk, stream);
    return;
  } else {
    using S = typename Source::Storage;
    const Index rows = t.rows();
    const Index keys = chunk.keys;
    const Index d_v = problem.d_v;
    const Index ld_s = stream.ld_s;
    RowBlockState<T>& state = stream.state;
    T* const s = stream.free_scores();
    if (!problem.mask_rows(s, ld_s, 0, rows, keys, t, chunk.k0, /*dry_run=*/true)) return;
    const ScoreUnit<T, S> unit{stream.queries + first * problem.d,
                               rows,
                               problem.d,
                               kv.keys(chunk.k0),
                               keys,
                               chunk.keys_left,
                               s,
                               ld_s,
                               kv.key_scales(chunk.k0)};
    scores_with_pending_values(unit, stream.pending);
    problem.mask_rows(s, ld_s, 0, rows, keys, t, chunk.k0, /*dry_run=*/false);
    const auto v = kv.values(chunk.k0);
    if constexpr (!Source::kValuesFinite) {
      if (tile_has_hidden_key(s, ld_s, rows, keys) &&
          !kv.values_finite(chunk.k0, keys)) {  // the NaN slow path, not pipelined
        poison_underflowed_values(s, ld_s, first, rows, keys, v.data, v.ld, d_v, state);
        kv.copy_finite_values(chunk.k0, keys, stream.finite_values);
        state.update_scores(s, ld_s, first, rows, keys);
        accumulate_pv_direct(s, ld_s, rows, keys, stream.finite_values, d_v, d_v, state.acc(first),
                             state.ld_acc());
        add_non_finite_values(s, ld_s, rows, keys, v.data, v.ld, d_v, state.acc(first),
                              state.ld_acc());
        return;
      }
    }
    state.update_scores(s, ld_s, first, rows, keys);
    stream.pending = PendingValues<T, S>{s,
                                         ld_s,
                                         rows,
                                         keys,
                                         v,
                                         chunk.keys_left,
                                         state.acc(first),
                                         state.ld_acc(),
                                         d_v,
                                         kv.value_scales(chunk.k0)};
    if (!stream.pipelined) flush_pending_values(stream.pending);  // its own phase
  }
}

/// Decode: one task, keys `range` of the query rows `t` (every query head of plan.task_heads kv
/// heads from t.h0 / group on), chunk by chunk on the key_chunk grid and, within a chunk, kv
/// head after kv head (so that a run of keys of interleaved heads is read in one window).
template <class T, class MaskMod, class ScoreMod, class Sources>
void decode_task(const AttentionProblem<T, MaskMod, ScoreMod>& problem, const AttentionPlan& plan,
                 const Sources& sources, const TileRows& t, KeyRange range,
                 DecodeStream<T, typename Sources::Source::Storage>& stream) {
  const Index group = problem.shape.group;
  const Index kv_h = t.h0 / group;
  const Index head_rows = group * t.rows_per_head;
  const Index key_chunk = problem.shape.key_chunk;
  for (Index k0 = range.begin; k0 < range.end; k0 += key_chunk) {
    const KeyChunk chunk{k0, std::min(k0 + key_chunk, range.end) - k0, range.end - k0};
    for (Index h = 0; h < plan.task_heads; ++h) {
      TileRows head = t;
      head.h0 = t.h0 + h * group;
      head.group = group;
      decode_chunk(problem, sources.head(t.b, kv_h + h), head, h * head_rows, chunk, stream);
    }
  }
  flush_pending_values(stream.pending);
}

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
