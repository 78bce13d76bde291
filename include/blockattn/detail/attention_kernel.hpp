#pragma once
// The chunked attention forward pass (Rabe & Staats 2021, "Self-attention does not need O(n²)
// memory", Algorithm 1 with the deferred normalisation of section 3), on the register-blocked
// micro-kernels of detail/microkernel.hpp. One task = one (batch, kv head, query block) with the
// query heads that share the kv head (GQA) stacked into its rows. For each key chunk on a fixed
// grid:
//   prefill (rows > kDirectRows): K and V chunks are packed once, then every kTileRows-row
//     sub-tile of the block runs score_tile → modifiers and masks (only on Partial tiles; Empty
//     sub-tiles are skipped) → softmax_tile_update (scale, max, exp, row sum in one sweep) →
//     accumulate_pv, all in the thread's workspace (a call with fewer than kMinPrefillBlocks
//     query blocks also splits its keys into segments, as decode does);
//   decode (rows <= kDirectRows): the same steps on unpacked K / V (score_rows_direct,
//     accumulate_pv_direct: each K / V row is loaded once for all the rows, with software
//     prefetch ahead when the rows are contiguous; with at most kDecodePipelineRows rows per kv
//     head and contiguous rows, each chunk's P·V is deferred and interleaved with the next
//     chunk's scores, so that K and V stream together), and the keys are split into fixed
//     segments (Flash-Decoding) whose partial states are merged in segment order, so the result
//     does not depend on the threads. Long caches with several kv heads run all heads in one
//     task, chunk by chunk.
// Normalised once at the end. No argument checking here: attention.hpp validates first.

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include <Eigen/Core>

#include <blockattn/detail/finite.hpp>
#include <blockattn/detail/microkernel.hpp>
#include <blockattn/detail/online_state.hpp>
#include <blockattn/detail/parallel.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/detail/workspace.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

namespace blockattn::detail {

// Default tile sizes, from the cache hierarchy and the measurements of bench/machine_bench.cpp
// (BM_TileAttention; AVX-512 host, 48 KiB L1d, 1 MiB L2 per core):
// - Key chunk: the packed K and V chunks (2·key_chunk·d elements) are re-read by every sub-tile of
//   the query block, so they must stay in L2 next to the block's queries and running output:
//   kPackedBlockBytes = 128 KiB per packed operand, at most 256 keys (d = 64 float: 64 KiB each).
//   Packing K is a scalar transpose costing ~35% of one 96×256×64 score tile, so one packed chunk
//   must serve several hundred query rows.
// - Query block: as many rows as keep q and acc (rows·(d + d_v) elements) within
//   kQueryBlockBytes = 384 KiB of L2, at most 768 rows (d = 64 float: 768 rows, 75–80% of the
//   FMA peak in the prototype against ~55% at 96 rows, where packing is not amortised).
// - Sub-tile: kTileRows = 96 rows × key_chunk scores (96 KiB float at 256 keys) is produced and
//   consumed (exp in place, then P·V) while it is still in L1/L2.
inline constexpr Index kMaxDefaultKeyChunk = 256;
inline constexpr Index kPackedBlockBytes = 128 * 1024;
inline constexpr Index kMaxDefaultQueryRows = 768;
inline constexpr Index kQueryBlockBytes = 384 * 1024;
// Decode key segments: a decode task covers at most this many keys (rounded to whole key
// chunks); segments run in parallel and are merged in order. Fixed, not derived from the thread
// count, so the result is bitwise the same for any number of threads. 8192 keys × 64 dims ×
// 4 bytes = 2 MiB of K per segment: the merge (O(rows·d_v) per segment) is negligible.
inline constexpr Index kDecodeSegmentKeys = 8192;
// Decode: how far ahead (bytes of K or V rows) the direct kernels prefetch, so that memory keeps
// streaming while the rows are being computed on and across the softmax between the K and V
// phases. Measured (8 query heads on one kv head, n_k = 262,144, d = 64, one thread, CPU time,
// loaded machine): no prefetch 11.8 GB/s, 2 KiB 17.0, 4 KiB 17.3, 8 and 16 KiB 16.9–17.5.
// Only contiguous rows are prefetched: over strided rows ([seq, heads, dim] K and V, 8 kv heads,
// rows 2 KiB apart) the hardware's stride prefetchers do better alone, 56.2 → 44.5 ms a call
// without the software prefetch (one thread; 28.1 → 24.1 ms on two; medians of 8 alternating
// runs of two builds); a scratch read loop in the same order read 20.2–20.4 GB/s with it,
// 21.5–22.1 without.
inline constexpr Index kDecodePrefetchBytes = 4096;
// Decode: keys per step of the interleaved scores / P·V loop (scores_with_pending_values). Two
// streams read in alternation reach more bandwidth than one, but only when they alternate often:
// a scratch read loop over 1 GiB, one thread, medians of 5, read 23.2 GB/s from one stream, 28.2
// from two in turns of 256 bytes (attention_bench's BM_StreamReadTwoStreams), 27.1 in turns of
// 4 KiB, and 17.9 in turns of 64 KiB (one 256-key chunk of K, then of V, at d = 64). 16 keys is
// 4 KiB of K or V at d = 64 float, and a multiple of the key blocks of score_rows_direct.
inline constexpr Index kDecodeInterleaveKeys = 16;
// Decode: the interleaved schedule is used for at most this many rows per kv head. A/B builds
// of this constant (0: never, 8: always), [heads, seq, dim] K and V, 8 query heads, n_k = 262,144,
// d = 64, one thread, ns per key and kv head, medians of 5 alternating runs: 1 row 19.7 → 18.9,
// 2 rows 24.2 → 22.6, 4 rows 28.7 → 26.2, but 8 rows (MQA) 27.9 → 39.0. At 8 rows the loop is
// bound by compute, not memory: in cache, a step of scores and P·V costs ~26 ns a key against
// ~22 for the two phases apart, while two streams deliver a key's K and V rows in ~18 ns.
inline constexpr Index kDecodePipelineRows = 4;
// Prefill: a call with fewer query blocks than this (batch × kv heads × query chunks) also splits
// the keys into segments, merged like decode's, so that short single-head calls still have tasks
// for two or more threads (n = 512, one head, was one task). Fixed, so results do not depend on
// the thread count; the partial states cost at most 2·kMinPrefillBlocks query blocks' output.
inline constexpr Index kMinPrefillBlocks = 4;

constexpr Index ceil_div(Index a, Index b) { return (a + b - 1) / b; }

/// The largest divisor of `block` that is at most `limit` (at least 1).
constexpr Index largest_divisor_at_most(Index block, Index limit) {
  for (Index c = std::min(block, limit); c > 1; --c) {
    if (block % c == 0) return c;
  }
  return 1;
}

/// The chunk for a block-sparse layout's blocks of `block` rows or keys, given the default
/// chunk `limit`: the largest divisor of `block` up to `limit`, so that every tile lies inside
/// one block and is exactly empty or full — unless that divisor is under half of min(block,
/// limit), which only happens for a block larger than `limit` with no divisor near it (a prime
/// such as 257 gave 1-key tiles: 169 ms against 8.7 ms for block 256 at the same density, n =
/// 4096, attention_bench BM_Attention_BlockSparse; 17 ms now). Then the default chunk is kept and
/// the tiles that straddle two blocks are masked (TileMasker); a tile of `limit` <= block elements
/// straddles at most one block boundary, so whole tiles are still skipped inside unset blocks.
constexpr Index block_aligned_chunk(Index block, Index limit) {
  const Index divisor = largest_divisor_at_most(block, limit);
  return 2 * divisor >= std::min(block, limit) ? divisor : limit;
}

/// Tile sizes for one call: the options' chunks, or the defaults above (aligned with a
/// block-sparse layout's blocks where block_aligned_chunk() allows). Clamped to [1, n].
template <class T>
TileShape choose_tile_shape(const AttentionOptions& options, Index n_q, Index n_k, Index d,
                            Index d_v, Index group = 1) {
  TileShape shape;
  shape.d = d;
  shape.d_v = d_v;
  Index qc = options.query_chunk;
  Index kc = options.key_chunk;
  const auto size = static_cast<Index>(sizeof(T));
  const Index width = std::max<Index>(1, std::max(d, d_v));
  const Index key_default =
      std::clamp<Index>(kPackedBlockBytes / (width * size) / 16 * 16, 16, kMaxDefaultKeyChunk);
  if (kc == 0) {
    kc = key_default;
    if (options.block_sparse != nullptr) {
      kc = block_aligned_chunk(options.block_sparse->key_block_size(), key_default);
    }
  }
  if (qc == 0) {
    const Index rows =
        std::clamp<Index>(kQueryBlockBytes / ((d + d_v) * size) / kTileRows * kTileRows, kTileRows,
                          kMaxDefaultQueryRows);
    qc = std::max<Index>(1, rows / group);  // a block stacks the group's heads
    if (options.block_sparse != nullptr) {
      qc = block_aligned_chunk(options.block_sparse->query_block_size(), qc);
    }
  }
  shape.query_chunk = std::max<Index>(1, std::min(qc, n_q));
  shape.group = group;
  shape.key_chunk = std::max<Index>(1, std::min(kc, n_k));
  return shape;
}

/// Whether the forward pass computes a call's scores with the decode kernel (score_rows_direct:
/// one FMA chain per lane along d, then a horizontal sum) rather than the prefill one (score_tile
/// on packed K: one FMA chain along d per score). The two round differently; the backward pass
/// recomputes the scores with the same kernel, so that they are the forward's bit for bit.
template <class T>
bool forward_scores_direct(const AttentionOptions& options, Index n_q, Index n_k, Index d,
                           Index d_v, Index group) {
  const TileShape shape = choose_tile_shape<T>(options, n_q, n_k, d, d_v, group);
  return group * shape.query_chunk <= kDirectRows;
}

/// The scale that multiplies q·k: options.scale, or 1/sqrt(d) when it is 0.
template <class T>
T resolve_scale(const AttentionOptions& options, Index d) {
  const double scale = options.scale != 0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(d));
  return static_cast<T>(scale);
}

/// Forbids Eigen heap allocation for its lifetime when the translation unit defines
/// EIGEN_RUNTIME_NO_MALLOC (tests/attention_no_malloc_test.cpp); otherwise does nothing. Eigen's
/// flag is process-wide, so this is a test instrument, not a production mode.
class NoMallocScope {
 public:
#ifdef EIGEN_RUNTIME_NO_MALLOC
  NoMallocScope() : was_allowed_(Eigen::internal::is_malloc_allowed()) {
    Eigen::internal::set_is_malloc_allowed(false);
  }
  ~NoMallocScope() { Eigen::internal::set_is_malloc_allowed(was_allowed_); }

 private:
  bool was_allowed_;
#else
  NoMallocScope() = default;
#endif
  NoMallocScope(const NoMallocScope&) = delete;
  NoMallocScope& operator=(const NoMallocScope&) = delete;
};

/// The query heads that share one key/value head (GQA) and one chunk of their queries, stacked
/// into one tile: rows [g·rows_per_head, (g+1)·rows_per_head) hold head h0 + g's queries
/// [q0, q0 + rows_per_head). K and V are then read once for the whole group (decode with 8 query
/// heads on one kv head reads the cache once, not 8 times).
struct TileRows {
  Index b = 0;              ///< batch index
  Index h0 = 0;             ///< first query head of the group
  Index group = 1;          ///< query heads in the tile
  Index q0 = 0;             ///< first query of each head's rows
  Index rows_per_head = 0;  ///< queries per head in the tile
};

/// Applies the score modifiers and the masks to the scores of block rows [r0, r0 + count)
/// (s: row stride ld_s, `cols` keys from k0; row r0 of s is block row r0) — per head of the GQA
/// group, since rows [g·rows_per_head, (g+1)·rows_per_head) belong to head h0 + g. Masks write
/// −inf; Full tiles are left alone. Returns false when every row is hidden (the caller skips the
/// sub-tile: no FLOPs); scores are not read then, so call it once with `dry_run` before
/// computing them.
template <class T, class MaskMod, class ScoreMod>
bool mask_rows(T* s, Index ld_s, Index r0, Index count, Index cols, const TileRows& t, Index k0,
               const AttentionOptions& options, Index n_q, Index n_k, const MaskMod& mask_mod,
               const ScoreMod& score_mod, bool dry_run) {
  using Rows = Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>>;
  bool any_visible = false;
  const Index r_end = r0 + count;
  for (Index g = r0 / t.rows_per_head; g * t.rows_per_head < r_end; ++g) {
    const Index a = std::max(r0, g * t.rows_per_head);
    const Index b = std::min(r_end, (g + 1) * t.rows_per_head);
    const Index i0 = t.q0 + (a - g * t.rows_per_head);
    const Index h = t.h0 + g;
    const TileMasker<MaskMod> masker(options, n_q, n_k, t.b, h, mask_mod);
    const TileMask tile = masker.classify(i0, i0 + (b - a), k0, k0 + cols);
    const bool empty = tile.visibility == BlockVisibility::Empty;
    any_visible = any_visible || !empty;
    if (dry_run) continue;
    Rows rows(s + (a - r0) * ld_s, b - a, cols, Eigen::OuterStride<>(ld_s));
    if (empty) {
      rows.setConstant(kNegativeInfinity<T>);
      continue;
    }
    const ScoreModifier<T, ScoreMod> modifier(options, n_q, n_k, t.b, h, score_mod);
    if (modifier.active()) modifier.apply(i0, k0, rows);
    masker.apply(tile, i0, k0, rows, kNegativeInfinity<T>);
  }
  return any_visible;
}

// NaN and a hidden key's value (README, "Numerical conventions"). A masked score is −inf and its
// weight p is exactly 0, but the P·V micro-kernels multiply every weight of a tile by every value
// row, so 0·NaN = NaN (and 0·inf = NaN) would leak a hidden key's non-finite value into the rows
// that do not see it. Rows that do see the key must get it, even when their weight underflowed
// to 0. The fast path stays as it is; a key chunk whose values are not all finite (checked once
// per chunk, off the hot loop) takes this slow path instead:
//   1. before the tile update, a visible key (score not −inf) with a non-finite value whose weight
//      will underflow to 0 poisons its row now: acc = NaN in that value's columns (0·v = NaN);
//   2. the tile update and P·V run as usual on a copy of the chunk's values with every non-finite
//      entry replaced by 0 — exact for every finite term, and the rows no NaN reaches come out
//      bit-identical to a run without it;
//   3. after P·V, each weight p > 0 (visible) adds p·v for the non-finite entries of its key.
// Decode (the direct path, no packing) checks a chunk's values only when its score tile holds a
// −inf score, which keeps the per-chunk check off unmasked decode. Cost of the checks, measured
// as instructions (valgrind --tool=callgrind, one thread, float unless noted, -O3 with -mavx2
// -mfma / plain SSE2): prefill n = 512, d = 64, causal +0.13% / +0.14%, non-causal +0.11% /
// +0.12%, double causal +0.23% / +0.26%; decode n_q = 1, n_k = 16384, d = 128 +0.09% / +0.15%.

/// True when some score of the rows × cols tile s (row stride ld_s) is −inf (a hidden key): the
/// lane-wise minimum (NaN scores are skipped by min's rule), then −max(−min) across lanes.
template <class T>
bool tile_has_hidden_key(const T* s, Index ld_s, Index rows, Index cols) {
  using S = simd::Simd<T>;
  using V = typename S::V;
  constexpr Index kLanes = S::kLanes;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const Index full = cols / kLanes * kLanes;
  const int rest = static_cast<int>(cols - full);
  V low = S::set1(kInf);
  for (Index i = 0; i < rows; ++i) {
    const T* row = s + i * ld_s;
    for (Index j = 0; j < full; j += kLanes) low = S::min(S::load(row + j), low);
    if (rest > 0) low = S::min(S::load_partial(row + full, rest, kInf), low);
  }
  return S::reduce_max(S::sub(S::zero(), low)) == kInf;
}

/// Slow path step 1, before the tile update of block rows [first, first + rows): for each visible
/// score x (not −inf, not NaN) whose weight under the row's coming maximum underflows to 0 and
/// whose key has a non-finite value, sets acc = NaN in those columns (0·NaN and 0·inf are NaN; the
/// later rescale keeps NaN). Reads the running max from `state`; s: row stride ld_s, `keys`
/// columns, already scaled and masked; v: the chunk's values, row stride ld_v.
template <class T>
void poison_underflowed_values(const T* s, Index ld_s, Index first, Index rows, Index keys,
                               const T* v, Index ld_v, Index d_v, const RowBlockState<T>& state) {
  // exp(x) > 0 certainly while x >= log(smallest normal): cheaper than calling exp per score.
  const T surely_positive = std::log(std::numeric_limits<T>::min());
  for (Index i = 0; i < rows; ++i) {
    const T* row = s + i * ld_s;
    T row_max = kNegativeInfinity<T>;
    for (Index j = 0; j < keys; ++j) row_max = running_max(row_max, row[j]);
    const T m_new = running_max(state.max(first + i), row_max);
    const T origin = exp_origin(m_new);
    T* acc = state.acc(first + i);
    for (Index j = 0; j < keys; ++j) {
      const T x = row[j];
      if (x == kNegativeInfinity<T> || !(x - origin < surely_positive)) continue;
      if (softmax_weight(x, m_new) != T(0)) continue;
      const T* vj = v + j * ld_v;
      for (Index c = 0; c < d_v; ++c) {
        if (!std::isfinite(vj[c])) acc[c] = std::numeric_limits<T>::quiet_NaN();
      }
    }
  }
}

/// Slow path step 3, after P·V on the finite copy: acc[i, c] += p[i, j]·v[j, c] for every weight
/// p > 0 (a visible key) and every non-finite v[j, c]. p: rows × keys, row stride ld_p.
template <class T>
void add_non_finite_values(const T* p, Index ld_p, Index rows, Index keys, const T* v, Index ld_v,
                           Index d_v, T* acc, Index ld_acc) {
  for (Index j = 0; j < keys; ++j) {
    const T* vj = v + j * ld_v;
    if (row_is_finite(vj, d_v)) continue;
    for (Index i = 0; i < rows; ++i) {
      const T w = p[i * ld_p + j];
      if (!(w > T(0))) continue;
      for (Index c = 0; c < d_v; ++c) {
        if (!std::isfinite(vj[c])) acc[i * ld_acc + c] += w * vj[c];
      }
    }
  }
}

/// Rows of K or V that the direct kernels prefetch ahead: kDecodePrefetchBytes of rows when the
/// rows are contiguous (row stride ld == row_elements), none when they are strided (see
/// kDecodePrefetchBytes).
template <class T>
Index decode_prefetch_rows(Index row_elements, Index ld) {
  if (ld != row_elements) return 0;
  return std::max<Index>(
      1, kDecodePrefetchBytes / (std::max<Index>(1, row_elements) * static_cast<Index>(sizeof(T))));
}

/// Decode: a unit (one kv head's rows × one key chunk) whose weights p are ready and whose P·V
/// product is deferred, so that its V rows stream from memory together with the next unit's K
/// rows (see scores_with_pending_values). p == nullptr: nothing pending.
template <class T>
struct PendingValues {
  const T* p = nullptr;  ///< [rows, keys], row stride ld_s: the weights
  Index rows = 0;
  Index keys = 0;
  const T* v = nullptr;  ///< the unit's first V row
  Index ld_v = 0;
  Index keys_left = 0;  ///< V rows from v that may be prefetched (the task's rest of this head)
  T* acc = nullptr;     ///< the unit's first row of the running output
};

/// Decode: the scores s[rows, keys] = q_blk·Kᵀ of one unit (score_rows_direct, K rows from k_rows,
/// prefetching up to keys_left rows) and the pending unit's acc += P·V (accumulate_pv_direct),
/// taken kDecodeInterleaveKeys keys at a time from each, so that K and V stream from memory
/// together; nothing is pending afterwards. keys = 0 only flushes the pending unit. The results
/// are bitwise those of the two kernels called one after the other (the same operations in the
/// same order for every score and every accumulator).
template <class T>
void scores_with_pending_values(const T* q_blk, Index rows, Index d, const T* k_rows, Index ld_k,
                                Index keys, Index keys_left, T* s, Index ld_s,
                                PendingValues<T>& pending, Index d_v, Index ld_acc) {
  const Index pv_keys = pending.p != nullptr ? pending.keys : 0;
  // One stream alone (nothing pending, or a flush) takes one step.
  const Index step = keys > 0 && pv_keys > 0 ? kDecodeInterleaveKeys : std::max(keys, pv_keys);
  const Index k_ahead = decode_prefetch_rows<T>(d, ld_k);
  const Index v_ahead = decode_prefetch_rows<T>(d_v, pending.ld_v);
  for (Index j = 0; j < std::max(keys, pv_keys); j += step) {
    if (j < keys) {
      score_rows_direct(q_blk, d, rows, d, k_rows + j * ld_k, ld_k, std::min(step, keys - j), s + j,
                        ld_s, RowPrefetch{k_ahead, keys_left - j});
    }
    if (j < pv_keys) {
      accumulate_pv_direct(pending.p + j, ld_s, pending.rows, std::min(step, pv_keys - j),
                           pending.v + j * pending.ld_v, pending.ld_v, d_v, pending.acc, ld_acc,
                           RowPrefetch{v_ahead, pending.keys_left - j});
    }
  }
  pending.p = nullptr;
}

/// Decode: runs the pending unit's P·V alone (scores_with_pending_values without scores).
template <class T>
void flush_pending_values(PendingValues<T>& pending, Index ld_s, Index d_v, Index ld_acc) {
  scores_with_pending_values<T>(nullptr, 0, 0, nullptr, 0, 0, 0, nullptr, ld_s, pending, d_v,
                                ld_acc);
}

/// Decode: folds one key chunk [k0, k0 + keys) into rows [first, first + rows) of `state` (one
/// kv head's query rows; q_blk [rows, d] their scaled queries), reading K and V in place
/// (k_rows, v_rows: the chunk's first rows; keys_left: the task's remaining keys of this head,
/// which the kernels may prefetch). The chunk's scores are computed together with the pending
/// unit's P·V; when `pipelined`, its own P·V is left pending (flush_pending_values runs it at the
/// end of the task), otherwise it runs at once. s: a score buffer the pending unit does not use.
template <class T, class MaskMod, class ScoreMod>
void attend_chunk_direct(const WorkspaceSlice<T>& ws, T* s, Index ld_s, const T* q_blk, Index rows,
                         Index d, Index d_v, const T* k_rows, Index ld_k, const T* v_rows,
                         Index ld_v, Index k0, Index keys, Index keys_left, RowBlockState<T>& state,
                         Index first, const TileRows& t, const AttentionOptions& options, Index n_q,
                         Index n_k, const MaskMod& mask_mod, const ScoreMod& score_mod,
                         bool pipelined, PendingValues<T>& pending) {
  if (!mask_rows<T>(s, ld_s, 0, rows, keys, t, k0, options, n_q, n_k, mask_mod, score_mod,
                    /*dry_run=*/true)) {
    return;
  }
  scores_with_pending_values(q_blk, rows, d, k_rows, ld_k, keys, keys_left, s, ld_s, pending, d_v,
                             state.ld_acc());
  mask_rows<T>(s, ld_s, 0, rows, keys, t, k0, options, n_q, n_k, mask_mod, score_mod,
               /*dry_run=*/false);
  if (tile_has_hidden_key(s, ld_s, rows, keys) &&
      !block_is_finite(v_rows, ld_v, keys, d_v)) {  // the NaN slow path above, not pipelined
    poison_underflowed_values(s, ld_s, first, rows, keys, v_rows, ld_v, d_v, state);
    copy_finite(v_rows, ld_v, keys, d_v, ws.packed_v, d_v);
    state.update_scores(s, ld_s, first, rows, keys);
    accumulate_pv_direct(s, ld_s, rows, keys, ws.packed_v, d_v, d_v, state.acc(first),
                         state.ld_acc());
    add_non_finite_values(s, ld_s, rows, keys, v_rows, ld_v, d_v, state.acc(first), state.ld_acc());
    return;
  }
  state.update_scores(s, ld_s, first, rows, keys);
  pending = PendingValues<T>{s, rows, keys, v_rows, ld_v, keys_left, state.acc(first)};
  if (!pipelined) flush_pending_values(pending, ld_s, d_v, state.ld_acc());  // its own phase
}

/// Prefill: folds keys [k_begin, k_end) (on the key_chunk grid) into the state of one task's
/// block: q_blk [rows, d] holds the scaled queries; k_head / v_head the kv head's keys and values.
/// K and V chunks are packed once per chunk and shared by the block's kTileRows-row sub-tiles.
template <class T, class MaskMod, class ScoreMod, class KHead, class VHead>
void attend_keys(const WorkspaceSlice<T>& ws, Index ld_s, const T* q_blk, Index rows, Index d,
                 Index d_v, const KHead& k_head, const VHead& v_head, Index k_begin, Index k_end,
                 Index key_chunk, RowBlockState<T>& state, const TileRows& t,
                 const AttentionOptions& options, Index n_q, Index n_k, const MaskMod& mask_mod,
                 const ScoreMod& score_mod) {
  const Index ld_k = k_head.outerStride();
  const Index ld_v = v_head.outerStride();
  for (Index k0 = k_begin; k0 < k_end; k0 += key_chunk) {
    const Index keys = std::min(k0 + key_chunk, k_end) - k0;
    const T* k_rows = k_head.data() + k0 * ld_k;
    const T* v_rows = v_head.data() + k0 * ld_v;
    bool packed = false;
    bool values_finite = true;
    for (Index r0 = 0; r0 < rows; r0 += kTileRows) {
      const Index count = std::min(kTileRows, rows - r0);
      if (!mask_rows<T>(ws.scores, ld_s, r0, count, keys, t, k0, options, n_q, n_k, mask_mod,
                        score_mod, /*dry_run=*/true)) {
        continue;  // every mask hides this sub-tile: no FLOPs
      }
      if (!packed) {  // K and V are packed once per chunk, for every sub-tile
        pack_k(k_rows, ld_k, keys, d, ws.packed_k);
        pack_v(v_rows, ld_v, keys, d_v, ws.packed_v);
        values_finite = block_is_finite(v_rows, ld_v, keys, d_v);
        if (!values_finite) zero_non_finite(ws.packed_v, packed_v_size<T>(keys, d_v));
        packed = true;
      }
      score_tile(q_blk + r0 * d, d, count, d, ws.packed_k, keys, ws.scores, ld_s);
      mask_rows<T>(ws.scores, ld_s, r0, count, keys, t, k0, options, n_q, n_k, mask_mod, score_mod,
                   /*dry_run=*/false);
      if (!values_finite) {  // the slow path above
        poison_underflowed_values(ws.scores, ld_s, r0, count, keys, v_rows, ld_v, d_v, state);
      }
      state.update_scores(ws.scores, ld_s, r0, count, keys);
      accumulate_pv(ws.scores, ld_s, count, keys, ws.packed_v, d_v, state.acc(r0), state.ld_acc());
      if (!values_finite) {
        add_non_finite_values(ws.scores, ld_s, count, keys, v_rows, ld_v, d_v, state.acc(r0),
                              state.ld_acc());
      }
    }
  }
}

/// Chunked attention over every (batch, kv head, query block), in parallel; each task handles the
/// query heads that share the kv head. Decode blocks (rows <= kDirectRows), and prefill calls
/// with fewer than kMinPrefillBlocks blocks, are further split into key segments of a size fixed
/// by the problem, merged in order after the parallel loop. Arguments are
/// valid (attention.hpp checked them); lse is [batch, q.heads, n_q] or null; `storage` is the
/// caller's workspace (grown here if too small, before the loops).
template <class T, class MaskMod, class ScoreMod>
void attention_forward(const TensorView<const T>& q, const TensorView<const T>& k,
                       const TensorView<const T>& v, const TensorView<T>& out,
                       const AttentionOptions& options, T* lse, const MaskMod& mask_mod,
                       const ScoreMod& score_mod, Workspace& storage) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "blockattn: attention() runs on float and double (the SIMD micro-kernels); "
                "reference::attention is the long double path");
  const Index n_q = q.seq;
  const Index n_k = k.seq;
  const Index d = q.dim;
  const Index d_v = v.dim;
  const Index heads = q.heads;
  if (q.batch == 0 || heads == 0 || n_q == 0) return;
  const Index kv_heads = k.heads;
  const Index group = heads / kv_heads;  // query heads per kv head (GQA)
  const TileShape shape = choose_tile_shape<T>(options, n_q, n_k, d, d_v, group);
  const T scale = resolve_scale<T>(options, d);
  const Index query_chunks = ceil_div(n_q, shape.query_chunk);
  const bool direct = forward_scores_direct<T>(options, n_q, n_k, d, d_v, group);
  // Long decode with several kv heads whose rows interleave in memory ([seq, heads, dim]: one
  // head's rows are strided): one task covers every kv head of its batch entry and key segment,
  // head after head within each key chunk, so that a run of keys is read from memory in one
  // window (head by head over the whole cache measured ~10 GB/s against ~20 GB/s interleaved,
  // n_k = 262,144, 8 kv heads, d = 64, one thread). Segments then hold kDecodeSegmentKeys /
  // kv_heads keys, so a task still covers about kDecodeSegmentKeys keys. When each head's rows
  // are contiguous ([heads, seq, dim]) a task reads one head: two streams, not 2·kv_heads (16
  // streams measured 11–15 GB/s against ~20 GB/s for two). Short caches keep one task per head
  // (more tasks to share between threads). No choice depends on the thread count.
  const auto rows_interleave = [](const TensorView<const T>& x) {
    return std::abs(x.head_stride) < std::abs(x.seq_stride);
  };
  const bool interleave_heads = direct && kv_heads > 1 && n_k > kDecodeSegmentKeys &&
                                rows_interleave(k) && rows_interleave(v);
  const Index task_heads = interleave_heads ? kv_heads : 1;  // kv heads per task
  // Decode over contiguous rows (each head's K and V rows adjacent) with few rows per kv head
  // defers each chunk's P·V to stream with the next chunk's K (kDecodePipelineRows).
  const bool pipelined = direct && !rows_interleave(k) && !rows_interleave(v) &&
                         group * shape.query_chunk <= kDecodePipelineRows;
  const Index blocks = q.batch * (kv_heads / task_heads) * query_chunks;
  TileShape task_shape = shape;
  task_shape.group = group * task_heads;  // the task's rows: all its query heads
  // Decode: split the keys into segments of whole key chunks (independent of the thread count).
  // Prefill with fewer than kMinPrefillBlocks query blocks (one short head) splits them too, into
  // as many segments as make that many tasks, so that even n = 512 keeps two threads busy.
  const Index key_chunks = ceil_div(n_k, shape.key_chunk);
  Index segment_chunks = std::max<Index>(1, key_chunks);
  if (direct) {
    segment_chunks = ceil_div(std::max<Index>(kDecodeSegmentKeys / task_heads, shape.key_chunk),
                              shape.key_chunk);
  } else if (blocks < kMinPrefillBlocks && key_chunks > 1) {
    segment_chunks =
        ceil_div(key_chunks, std::min(ceil_div(kMinPrefillBlocks, blocks), key_chunks));
  }
  const Index segment_keys = segment_chunks * shape.key_chunk;
  const Index segments = std::max<Index>(1, ceil_div(key_chunks, segment_chunks));
  const Index tasks = blocks * segments;
  const int threads = resolve_threads(options.threads, tasks);
  const AttentionWorkspace<T> workspace(storage, threads, task_shape, segments > 1 ? tasks : 0);
  // The loops below never allocate (checked in test builds).
  [[maybe_unused]] const NoMallocScope no_malloc;

  const auto block_rows = [&](Index block) {
    TileRows t;
    const Index chunk = block % query_chunks;
    const Index kv_blocks = kv_heads / task_heads;
    const Index kv_h = (block / query_chunks) % kv_blocks * task_heads;
    t.b = block / (query_chunks * kv_blocks);
    t.h0 = kv_h * group;
    t.group = task_shape.group;
    t.q0 = chunk * shape.query_chunk;
    t.rows_per_head = std::min(shape.query_chunk, n_q - t.q0);
    return t;
  };
  const auto finalize = [&](const RowBlockState<T>& state, const TileRows& t) {
    for (Index g = 0; g < t.group; ++g) {
      const Index h = t.h0 + g;
      T* lse_rows = lse != nullptr ? lse + (t.b * heads + h) * n_q + t.q0 : nullptr;
      state.finalize(g * t.rows_per_head, t.rows_per_head,
                     mutable_head_slice(out, t.b, h).middleRows(t.q0, t.rows_per_head), lse_rows);
    }
  };

  parallel_for(tasks, threads, [&](Index task, int slot) {
    const Index block = task / segments;
    const Index segment = task % segments;
    const TileRows t = block_rows(block);
    const Index rows = t.group * t.rows_per_head;
    const Index kv_h = t.h0 / group;

    const WorkspaceSlice<T> ws = workspace.slice(slot);
    for (Index g = 0; g < t.group; ++g) {
      const auto q_head = head_slice(q, t.b, t.h0 + g);
      for (Index r = 0; r < t.rows_per_head; ++r) {
        T* dst = ws.queries + (g * t.rows_per_head + r) * d;
        const T* src = q_head.data() + (t.q0 + r) * q_head.outerStride();
        for (Index c = 0; c < d; ++c) dst[c] = src[c] * scale;
      }
    }
    T* m = ws.m;
    T* l = ws.l;
    T* acc = ws.acc;
    if (segments > 1) {
      const PartialState<T> partial = workspace.partial(task);
      m = partial.m;
      l = partial.l;
      acc = partial.acc;
    }
    RowBlockState<T> state(m, l, acc, rows, d_v, workspace.ld_acc());
    state.reset();

    // Causal, window and key length do not depend on the head: one key range for the group.
    const TileMasker<MaskMod> first_head(options, n_q, n_k, t.b, t.h0, mask_mod);
    const auto [k_first, k_last] = first_head.key_range(t.q0, t.q0 + t.rows_per_head);
    // Tiles stay on the key_chunk grid so that every query block sees the same key tiles.
    Index k_begin = k_first / shape.key_chunk * shape.key_chunk;
    Index k_end = k_last;
    if (segments > 1) {
      k_begin = std::max(k_begin, segment * segment_keys);
      k_end = std::min(k_end, (segment + 1) * segment_keys);
    }
    if (!direct) {
      attend_keys<T>(ws, workspace.ld_s(), ws.queries, rows, d, d_v, head_slice(k, t.b, kv_h),
                     head_slice(v, t.b, kv_h), k_begin, k_end, shape.key_chunk, state, t, options,
                     n_q, n_k, mask_mod, score_mod);
    } else {
      const Index head_rows = group * t.rows_per_head;
      const Index ld_s = workspace.ld_s();
      // Two score buffers: the pending unit's weights and the next unit's scores.
      T* const buffers[2] = {ws.scores, ws.scores + head_rows * ld_s};
      PendingValues<T> pending;
      for (Index k0 = k_begin; k0 < k_end; k0 += shape.key_chunk) {
        const Index keys = std::min(k0 + shape.key_chunk, k_end) - k0;
        for (Index h = 0; h < task_heads; ++h) {
          const auto k_head = head_slice(k, t.b, kv_h + h);
          const auto v_head = head_slice(v, t.b, kv_h + h);
          TileRows head = t;
          head.h0 = t.h0 + h * group;
          head.group = group;
          attend_chunk_direct<T>(ws, buffers[pending.p == buffers[0] ? 1 : 0], ld_s,
                                 ws.queries + h * head_rows * d, head_rows, d, d_v,
                                 k_head.data() + k0 * k_head.outerStride(), k_head.outerStride(),
                                 v_head.data() + k0 * v_head.outerStride(), v_head.outerStride(),
                                 k0, keys, k_end - k0, state, h * head_rows, head, options, n_q,
                                 n_k, mask_mod, score_mod, pipelined, pending);
        }
      }
      flush_pending_values(pending, ld_s, d_v, state.ld_acc());
    }
    if (segments == 1) finalize(state, t);
  });
  if (segments == 1) return;

  // Flash-Decoding merge: segment states folded into segment 0's, in segment order.
  parallel_for(blocks, resolve_threads(options.threads, blocks), [&](Index block, int) {
    const TileRows t = block_rows(block);
    const Index rows = t.group * t.rows_per_head;
    const PartialState<T> first = workspace.partial(block * segments);
    RowBlockState<T> state(first.m, first.l, first.acc, rows, d_v, workspace.ld_acc());
    for (Index segment = 1; segment < segments; ++segment) {
      const PartialState<T> part = workspace.partial(block * segments + segment);
      state.merge(RowBlockState<T>(part.m, part.l, part.acc, rows, d_v, workspace.ld_acc()));
    }
    finalize(state, t);
  });
}

/// attention_forward() with a workspace of its own (allocated once, before the loops).
template <class T, class MaskMod, class ScoreMod>
void attention_forward(const TensorView<const T>& q, const TensorView<const T>& k,
                       const TensorView<const T>& v, const TensorView<T>& out,
                       const AttentionOptions& options, T* lse, const MaskMod& mask_mod,
                       const ScoreMod& score_mod) {
  Workspace storage;
  attention_forward<T>(q, k, v, out, options, lse, mask_mod, score_mod, storage);
}

}  // namespace blockattn::detail
