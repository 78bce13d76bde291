#pragma once
// The per-call context of the forward kernels: what every tile step of one call needs and that
// does not change during the call (sizes, scale, tile shape, options, the user's functors). The
// prefill and decode kernels take it by reference instead of a dozen loose arguments.

#include <algorithm>

#include <Eigen/Core>

#include <blockattn/detail/attention_plan.hpp>
#include <blockattn/detail/workspace.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

/// Rows of a row-major matrix: row r starts at data + r·ld (ld in elements).
template <class T>
struct StridedRows {
  const T* data = nullptr;
  Index ld = 0;

  /// Row r.
  const T* row(Index r) const { return data + r * ld; }
  /// The rows from row r on.
  StridedRows from(Index r) const { return {data + r * ld, ld}; }
};

/// The masks and score modifiers of one (batch b, query head h).
template <class T, class MaskMod, class ScoreMod>
struct HeadMasks {
  TileMasker<MaskMod> masker;
  ScoreModifier<T, ScoreMod> modifier;
};

/// One forward call's constants: options, n_q, n_k, d, d_v, the resolved scale, the tile shape
/// (from the plan) and references to the user's mask_mod and score_mod. Holds references: lives
/// on the stack of attention_forward() for the duration of the call.
template <class T, class MaskMod, class ScoreMod>
struct AttentionProblem {
  const AttentionOptions& options;
  Index n_q;
  Index n_k;
  Index d;
  Index d_v;
  T scale;          ///< multiplies q·k
  TileShape shape;  ///< shape.group = query heads per kv head
  const MaskMod& mask_mod;
  const ScoreMod& score_mod;

  /// The masks of (batch b, query head h).
  TileMasker<MaskMod> masker(Index b, Index h) const {
    return TileMasker<MaskMod>(options, n_q, n_k, b, h, mask_mod);
  }
  /// The masks and score modifiers of (batch b, query head h).
  HeadMasks<T, MaskMod, ScoreMod> masks_for(Index b, Index h) const {
    return {masker(b, h), ScoreModifier<T, ScoreMod>(options, n_q, n_k, b, h, score_mod)};
  }

  /// The keys that the queries of `t` can see at all through causal, window and key length
  /// (these do not depend on the head: one range for the whole group).
  KeyRange visible_keys(const TileRows& t) const {
    const auto [first, last] = masker(t.b, t.h0).key_range(t.q0, t.q0 + t.rows_per_head);
    return {first, last};
  }

  /// Applies the score modifiers and the masks to the scores of block rows [r0, r0 + count) of
  /// the tile `t` (s: row stride ld_s, `cols` keys from k0; row r0 of s is block row r0) — per
  /// head of the GQA group, since rows [g·rows_per_head, (g+1)·rows_per_head) belong to head
  /// h0 + g. Masks write −inf; Full tiles are left alone. Returns false when every row is hidden
  /// (the caller skips the sub-tile: no FLOPs); scores are not read then, so call it once with
  /// `dry_run` before computing them.
  bool mask_rows(T* s, Index ld_s, Index r0, Index count, Index cols, const TileRows& t, Index k0,
                 bool dry_run) const {
    using Rows = Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>>;
    bool any_visible = false;
    const Index r_end = r0 + count;
    for (Index g = r0 / t.rows_per_head; g * t.rows_per_head < r_end; ++g) {
      const Index a = std::max(r0, g * t.rows_per_head);
      const Index b = std::min(r_end, (g + 1) * t.rows_per_head);
      const Index i0 = t.q0 + (a - g * t.rows_per_head);
      const Index h = t.h0 + g;
      const TileMasker<MaskMod> head_masker = masker(t.b, h);
      const TileMask tile = head_masker.classify(i0, i0 + (b - a), k0, k0 + cols);
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
      head_masker.apply(tile, i0, k0, rows, kNegativeInfinity<T>);
    }
    return any_visible;
  }
};

/// The AttentionProblem of a planned call.
template <class T, class MaskMod, class ScoreMod>
AttentionProblem<T, MaskMod, ScoreMod> make_attention_problem(const AttentionPlan& plan,
                                                              const AttentionOptions& options,
                                                              const MaskMod& mask_mod,
                                                              const ScoreMod& score_mod) {
  return {options,    plan.n_q, plan.n_k, plan.shape.d, plan.shape.d_v, static_cast<T>(plan.scale),
          plan.shape, mask_mod, score_mod};
}

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
