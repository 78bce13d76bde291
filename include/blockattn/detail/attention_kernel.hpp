#pragma once
// The chunked attention forward pass (Rabe & Staats 2021, "Self-attention does not need O(n²)
// memory", Algorithm 1 with the deferred normalisation of section 3): queries × keys in tiles,
// each tile's scores a small matrix product in the thread's workspace, folded into the rows'
// online-softmax state, normalised once at the end. No argument checking here: attention.hpp
// validates first.
//
// The arithmetic of a tile sits in three calls — tile_scores() (s = q·kᵀ), then
// RowBlockState::exponentiate() and accumulate() (online update, acc += p·v) — around which
// attend_tile() applies modifiers and masks; a packed SIMD micro-kernel replaces those three
// without touching the loop, the masks or the merge.

#include <algorithm>
#include <cmath>

#include <Eigen/Core>

#include <blockattn/detail/online_state.hpp>
#include <blockattn/detail/parallel.hpp>
#include <blockattn/detail/workspace.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

namespace blockattn::detail {

inline constexpr Index kMaxDefaultQueryChunk = 128;
inline constexpr Index kMaxDefaultKeyChunk = 256;
// Eigen packs a GEMM operand on the stack when it fits EIGEN_STACK_ALLOCATION_LIMIT (128 KiB) and
// on the heap otherwise. Default tiles keep every packed operand — k and v blocks
// (key_chunk × max(d, d_v)), q_blk (query_chunk × d) and the weights p (query_chunk × key_chunk) —
// within 128 KiB, so the tile loop never allocates for d <= 1024
// (tests/attention_no_malloc_test.cpp checks it). Measured (CPU time, best of 7, one thread,
// loaded 2-core AVX-512 host): at d = 64, 128 × 256 tiles beat 64 × 256 by 3-15% (0.545 vs
// 0.565 ms at n = 512; 8.6 vs 9.1 ms at n = 2048); at d = 128, n = 512, 128 × 256 took 1.08 ms
// against 1.15 ms for 128 × 128.
inline constexpr Index kPackedBlockBytes = 128 * 1024;

constexpr Index ceil_div(Index a, Index b) { return (a + b - 1) / b; }

/// The largest divisor of `block` that is at most `limit` (at least 1).
constexpr Index largest_divisor_at_most(Index block, Index limit) {
  for (Index c = std::min(block, limit); c > 1; --c) {
    if (block % c == 0) return c;
  }
  return 1;
}

/// Tile sizes for one call: the options' chunks, or defaults (as many keys as keep a packed
/// key_chunk × max(d, d_v) block within 128 KiB, at most 256; as many queries as keep q_blk and the
/// weights within 128 KiB, at most 128; aligned with a block-sparse
/// layout's blocks so that its tiles are exactly empty or full). Clamped to [1, n].
template <class T>
TileShape choose_tile_shape(const AttentionOptions& options, Index n_q, Index n_k, Index d,
                            Index d_v, Index group = 1) {
  TileShape shape;
  shape.d = d;
  shape.d_v = d_v;
  Index qc = options.query_chunk;
  Index kc = options.key_chunk;
  const Index width = std::max<Index>(1, std::max(d, d_v));
  const Index key_default =
      std::clamp<Index>(kPackedBlockBytes / (width * static_cast<Index>(sizeof(T))) / 16 * 16, 16,
                        kMaxDefaultKeyChunk);
  if (kc == 0) {
    kc = key_default;
    if (options.block_sparse != nullptr) {
      kc = largest_divisor_at_most(options.block_sparse->key_block_size(), key_default);
    }
  }
  if (qc == 0) {
    // The packed left operands are q_blk [qc, d] and p [qc, key_tile].
    const Index lhs_width = std::max(std::max<Index>(1, std::min(kc, n_k)), d);
    qc =
        std::clamp<Index>(kPackedBlockBytes / (lhs_width * static_cast<Index>(sizeof(T))) / 16 * 16,
                          16, kMaxDefaultQueryChunk);
    qc = std::max<Index>(1, qc / group);  // a tile stacks the group's heads
    if (options.block_sparse != nullptr) {
      qc = largest_divisor_at_most(options.block_sparse->query_block_size(), qc);
    }
  }
  shape.query_chunk = std::max<Index>(1, std::min(qc, n_q));
  shape.group = group;
  shape.key_chunk = std::max<Index>(1, std::min(kc, n_k));
  return shape;
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

/// s = q_blk·k_blkᵀ into the workspace tile (q_blk already scaled): the score micro-kernel.
template <class T, class QBlock, class KBlock>
void tile_scores(const QBlock& q_blk, const KBlock& k_blk, Eigen::Map<Matrix<T>>& s) {
  s.noalias() = q_blk * k_blk.transpose();
}

/// One tile: scores, modifiers and masks per head, then the online update of the rows' state
/// with v_blk. s is the workspace tile [group·rows_per_head, cols], overwritten.
template <class T, class MaskMod, class ScoreMod, class QBlock, class KBlock, class VBlock>
void attend_tile(const QBlock& q_blk, const KBlock& k_blk, const VBlock& v_blk,
                 Eigen::Map<Matrix<T>>& s, RowBlockState<T>& state, const TileRows& t, Index k0,
                 const AttentionOptions& options, Index n_q, Index n_k, const MaskMod& mask_mod,
                 const ScoreMod& score_mod) {
  using Rows = Eigen::Map<Matrix<T>>;  // one head's rows of the tile (contiguous)
  const Index k_end = k0 + s.cols();
  tile_scores<T>(q_blk, k_blk, s);
  for (Index g = 0; g < t.group; ++g) {
    const Index h = t.h0 + g;
    Rows rows(s.data() + g * t.rows_per_head * s.cols(), t.rows_per_head, s.cols());
    const ScoreModifier<T, ScoreMod> modifier(options, n_q, n_k, t.b, h, score_mod);
    if (modifier.active()) modifier.apply(t.q0, k0, rows);
    const TileMasker<MaskMod> masker(options, n_q, n_k, t.b, h, mask_mod);
    const TileMask tile = masker.classify(t.q0, t.q0 + t.rows_per_head, k0, k_end);
    if (tile.visibility == BlockVisibility::Empty) {
      rows.setConstant(kNegativeInfinity<T>);
    } else {
      masker.apply(tile, t.q0, k0, rows, kNegativeInfinity<T>);
    }
  }
  // A score_mod may return −inf anywhere: exact (scalar) weights then. Otherwise the vectorised
  // exp, and the masked entries are zeroed again by the same masks.
  state.exponentiate(s, /*exact=*/kHasScoreMod<ScoreMod>);
  if constexpr (!kHasScoreMod<ScoreMod>) {
    for (Index g = 0; g < t.group; ++g) {
      Rows rows(s.data() + g * t.rows_per_head * s.cols(), t.rows_per_head, s.cols());
      const TileMasker<MaskMod> masker(options, n_q, n_k, t.b, t.h0 + g, mask_mod);
      const TileMask tile = masker.classify(t.q0, t.q0 + t.rows_per_head, k0, k_end);
      if (tile.visibility == BlockVisibility::Empty) {
        rows.setZero();
      } else {
        masker.apply(tile, t.q0, k0, rows, T(0));
      }
    }
  }
  state.accumulate(s, v_blk);
}

/// Chunked attention over every (batch, kv head, query chunk), in parallel; each task handles the
/// query heads that share the kv head. Arguments are valid (attention.hpp checked them); lse is
/// [batch, q.heads, n_q] or null.
template <class T, class MaskMod, class ScoreMod>
void attention_forward(const TensorView<const T>& q, const TensorView<const T>& k,
                       const TensorView<const T>& v, const TensorView<T>& out,
                       const AttentionOptions& options, T* lse, const MaskMod& mask_mod,
                       const ScoreMod& score_mod) {
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
  const Index tasks = q.batch * kv_heads * query_chunks;
  const int threads = resolve_threads(options.threads, tasks);
  Workspace<T> workspace(threads, shape);
  // The tile loop below never allocates (checked in test builds).
  [[maybe_unused]] const NoMallocScope no_malloc;

  parallel_for(tasks, threads, [&](Index task, int slot) {
    TileRows t;
    const Index chunk = task % query_chunks;
    const Index kv_h = (task / query_chunks) % kv_heads;
    t.b = task / (query_chunks * kv_heads);
    t.h0 = kv_h * group;
    t.group = group;
    t.q0 = chunk * shape.query_chunk;
    t.rows_per_head = std::min(shape.query_chunk, n_q - t.q0);
    const Index rows = group * t.rows_per_head;
    const Index q_end = t.q0 + t.rows_per_head;

    const WorkspaceSlice<T> ws = workspace.slice(slot);
    Eigen::Map<Matrix<T>> q_blk(ws.queries, rows, d);
    for (Index g = 0; g < group; ++g) {
      q_blk.middleRows(g * t.rows_per_head, t.rows_per_head).noalias() =
          head_slice(q, t.b, t.h0 + g).middleRows(t.q0, t.rows_per_head) * scale;
    }
    RowBlockState<T> state(ws.m, ws.l, ws.acc, rows, d_v);
    state.reset();

    const auto k_head = head_slice(k, t.b, kv_h);
    const auto v_head = head_slice(v, t.b, kv_h);
    // Causal, window and key length do not depend on the head: one key range for the group.
    const TileMasker<MaskMod> first_head(options, n_q, n_k, t.b, t.h0, mask_mod);
    const auto [k_first, k_last] = first_head.key_range(t.q0, q_end);
    // Tiles stay on the key_chunk grid so that every query chunk sees the same key tiles.
    for (Index k0 = k_first / shape.key_chunk * shape.key_chunk; k0 < k_last;
         k0 += shape.key_chunk) {
      const Index k_end = std::min(k0 + shape.key_chunk, k_last);
      bool any_visible = false;
      for (Index g = 0; g < group && !any_visible; ++g) {
        const TileMasker<MaskMod> masker(options, n_q, n_k, t.b, t.h0 + g, mask_mod);
        any_visible = masker.classify(t.q0, q_end, k0, k_end).visibility != BlockVisibility::Empty;
      }
      if (!any_visible) continue;  // no FLOPs for a tile every mask hides
      Eigen::Map<Matrix<T>> s(ws.scores, rows, k_end - k0);
      attend_tile(q_blk, k_head.middleRows(k0, k_end - k0), v_head.middleRows(k0, k_end - k0), s,
                  state, t, k0, options, n_q, n_k, mask_mod, score_mod);
    }
    for (Index g = 0; g < group; ++g) {
      const Index h = t.h0 + g;
      T* lse_rows = lse != nullptr ? lse + (t.b * heads + h) * n_q + t.q0 : nullptr;
      state.finalize(g * t.rows_per_head, t.rows_per_head,
                     mutable_head_slice(out, t.b, h).middleRows(t.q0, t.rows_per_head), lse_rows);
    }
  });
}

}  // namespace blockattn::detail
