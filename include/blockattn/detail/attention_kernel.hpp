#pragma once
// The chunked attention forward pass (Rabe & Staats 2021, "Self-attention does not need O(n²)
// memory", Algorithm 1 with the deferred normalisation of section 3): queries × keys in tiles,
// each tile's scores a small matrix product in the thread's workspace, folded into the rows'
// online-softmax state, normalised once at the end. No argument checking here: attention.hpp
// validates first.
//
// The per-tile work sits behind attend_tile(); the loop, the masks and the merge never look
// inside it, so a packed SIMD micro-kernel can replace it alone.

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
// on the heap otherwise. Default tiles keep the packed k and v blocks (key_chunk × max(d, d_v))
// within 64 KiB and the left operands q_blk (query_chunk × d) and p (query_chunk × key_chunk)
// within 128 KiB, so the tile loop never allocates for d <= 1024
// (tests/attention_no_malloc_test.cpp checks it). 128 × 256 beat 64 × 256 by 3-15% at n = 512…2048,
// d = 64, float, one thread (/tmp/exp-style timing loop, best of 7, loaded 2-core host): 0.545 vs
// 0.565 ms at n = 512, 8.6 vs 9.1-10.5 ms at n = 2048.
inline constexpr Index kPackedBlockBytes = 64 * 1024;
inline constexpr Index kWeightBlockBytes = 128 * 1024;

constexpr Index ceil_div(Index a, Index b) { return (a + b - 1) / b; }

/// The largest divisor of `block` that is at most `limit` (at least 1).
constexpr Index largest_divisor_at_most(Index block, Index limit) {
  for (Index c = std::min(block, limit); c > 1; --c) {
    if (block % c == 0) return c;
  }
  return 1;
}

/// Tile sizes for one call: the options' chunks, or defaults (as many keys as keep a packed
/// key_chunk × max(d, d_v) block within 64 KiB, at most 256; as many queries as keep q_blk and the
/// weights within 128 KiB, at most 128; aligned with a block-sparse
/// layout's blocks so that its tiles are exactly empty or full). Clamped to [1, n].
template <class T>
TileShape choose_tile_shape(const AttentionOptions& options, Index n_q, Index n_k, Index d,
                            Index d_v) {
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
        std::clamp<Index>(kWeightBlockBytes / (lhs_width * static_cast<Index>(sizeof(T))) / 16 * 16,
                          16, kMaxDefaultQueryChunk);
    if (options.block_sparse != nullptr) {
      qc = largest_divisor_at_most(options.block_sparse->query_block_size(), qc);
    }
  }
  shape.query_chunk = std::max<Index>(1, std::min(qc, n_q));
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

/// One tile: s = q_blk·k_blkᵀ (q_blk already scaled), modifiers, mask, then the online update
/// of the rows' state with v_blk. s is the workspace tile [rows, cols], overwritten.
template <class T, class MaskMod, class ScoreMod, class QBlock, class KBlock, class VBlock>
void attend_tile(const QBlock& q_blk, const KBlock& k_blk, const VBlock& v_blk,
                 Eigen::Map<Matrix<T>>& s, RowBlockState<T>& state, const TileMask& tile,
                 const TileMasker<MaskMod>& masker, const ScoreModifier<T, ScoreMod>& modifier,
                 Index q0, Index k0) {
  s.noalias() = q_blk * k_blk.transpose();
  if (modifier.active()) modifier.apply(q0, k0, s);
  masker.apply(tile, q0, k0, s, kNegativeInfinity<T>);
  // A score_mod may return −inf anywhere: exact (scalar) weights then. Otherwise the vectorised
  // exp, and masked entries of a partial tile are zeroed again by the same mask.
  state.exponentiate(s, /*exact=*/kHasScoreMod<ScoreMod>);
  if constexpr (!kHasScoreMod<ScoreMod>) masker.apply(tile, q0, k0, s, T(0));
  state.accumulate(s, v_blk);
}

/// Chunked attention over every (batch, query head, query chunk), in parallel. Arguments are
/// valid (attention.hpp checked them); lse is [batch, q.heads, n_q] or null.
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
  const Index group = heads / k.heads;  // query heads per kv head (GQA)
  if (q.batch == 0 || heads == 0 || n_q == 0) return;
  const TileShape shape = choose_tile_shape<T>(options, n_q, n_k, d, d_v);
  const T scale = resolve_scale<T>(options, d);
  const Index query_chunks = ceil_div(n_q, shape.query_chunk);
  const Index tasks = q.batch * heads * query_chunks;
  const int threads = resolve_threads(options.threads, tasks);
  Workspace<T> workspace(threads, shape);
  [[maybe_unused]] const NoMallocScope
      no_malloc;  // the tile loop below never allocates (checked in test builds)

  parallel_for(tasks, threads, [&](Index task, int slot) {
    const Index chunk = task % query_chunks;
    const Index h = (task / query_chunks) % heads;
    const Index b = task / (query_chunks * heads);
    const Index q0 = chunk * shape.query_chunk;
    const Index rows = std::min(shape.query_chunk, n_q - q0);
    const Index q_end = q0 + rows;

    const WorkspaceSlice<T> ws = workspace.slice(slot);
    Eigen::Map<Matrix<T>> q_blk(ws.queries, rows, d);
    q_blk.noalias() = head_slice(q, b, h).middleRows(q0, rows) * scale;
    RowBlockState<T> state(ws.m, ws.l, ws.acc, rows, d_v);
    state.reset();

    const auto k_head = head_slice(k, b, h / group);
    const auto v_head = head_slice(v, b, h / group);
    const TileMasker<MaskMod> masker(options, n_q, n_k, b, h, mask_mod);
    const ScoreModifier<T, ScoreMod> modifier(options, n_q, n_k, b, h, score_mod);
    const auto [k_first, k_last] = masker.key_range(q0, q_end);
    // Tiles stay on the key_chunk grid so that every query chunk sees the same key tiles.
    for (Index k0 = k_first / shape.key_chunk * shape.key_chunk; k0 < k_last;
         k0 += shape.key_chunk) {
      const Index k_end = std::min(k0 + shape.key_chunk, k_last);
      const TileMask tile = masker.classify(q0, q_end, k0, k_end);
      if (tile.visibility == BlockVisibility::Empty) continue;
      Eigen::Map<Matrix<T>> s(ws.scores, rows, k_end - k0);
      attend_tile(q_blk, k_head.middleRows(k0, k_end - k0), v_head.middleRows(k0, k_end - k0), s,
                  state, tile, masker, modifier, q0, k0);
    }
    T* lse_rows = lse != nullptr ? lse + (b * heads + h) * n_q + q0 : nullptr;
    state.finalize(mutable_head_slice(out, b, h).middleRows(q0, rows), lse_rows);
  });
}

}  // namespace blockattn::detail
