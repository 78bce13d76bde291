#pragma once
// Prefill: the forward pass for query blocks of more than kDirectRows rows. For each key chunk on
// the key_chunk grid, the K/V source packs K and V once (detail/kv_source.hpp), then every
// kTileRows-row sub-tile of the block runs score_tile → modifiers and masks (only on Partial
// tiles; sub-tiles every mask hides are skipped) → softmax_tile_update (scale, max, exp, row sum
// in one sweep) → accumulate_pv, all in the thread's workspace.

#include <algorithm>
#include <type_traits>

#include <blockattn/detail/attention_plan.hpp>
#include <blockattn/detail/attention_problem.hpp>
#include <blockattn/detail/bf16_dot.hpp>
#include <blockattn/detail/finite.hpp>
#include <blockattn/detail/kv_source.hpp>
#include <blockattn/detail/microkernel.hpp>
#include <blockattn/detail/non_finite_values.hpp>
#include <blockattn/detail/online_state.hpp>
#include <blockattn/detail/workspace.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

/// Prefill: folds keys `range` (on the key_chunk grid) of the source `kv` into `state`, the
/// online state of the query rows `t`, whose scaled queries are ws.queries [t.rows(), d]. K and V
/// chunks are packed once per chunk and shared by the block's kTileRows-row sub-tiles; ws.scores
/// holds one sub-tile's scores (row stride ld_s).
template <class T, class MaskMod, class ScoreMod, class Source>
void prefill_keys(const AttentionProblem<T, MaskMod, ScoreMod>& problem, const Source& kv,
                  const WorkspaceSlice<T>& ws, Index ld_s, const TileRows& t, KeyRange range,
                  RowBlockState<T>& state) {
  const Index rows = t.rows();
  const Index d = problem.d;
  const Index d_v = problem.d_v;
  const Index key_chunk = problem.shape.key_chunk;
  for (Index k0 = range.begin; k0 < range.end; k0 += key_chunk) {
    const Index keys = std::min(k0 + key_chunk, range.end) - k0;
    bool packed = false;
    bool values_finite = true;
    for (Index r0 = 0; r0 < rows; r0 += kTileRows) {
      const Index count = std::min(kTileRows, rows - r0);
      if (!problem.mask_rows(ws.scores, ld_s, r0, count, keys, t, k0, /*dry_run=*/true)) {
        continue;  // every mask hides this sub-tile: no FLOPs
      }
      if (!packed) {  // K and V are packed once per chunk, for every sub-tile
        kv.pack_k(k0, keys, ws.packed_k);
        kv.pack_v(k0, keys, ws.packed_v);
        values_finite = kv.values_finite(k0, keys);
        if (!values_finite) zero_non_finite(ws.packed_v, packed_v_size<T>(keys, d_v));
        packed = true;
      }
      score_tile(ws.queries + r0 * d, d, count, d, ws.packed_k, keys, ws.scores, ld_s);
      problem.mask_rows(ws.scores, ld_s, r0, count, keys, t, k0, /*dry_run=*/false);
      if constexpr (!Source::kValuesFinite) {
        if (!values_finite) {                   // the slow path of detail/non_finite_values.hpp
          if constexpr (kSplitsRows<Source>) {  // a paged cache: rows on several strides
            poison_underflowed_value_rows(
                ws.scores, ld_s, r0, count, keys, [&](Index j) { return kv.value_row(k0 + j); },
                d_v, state);
          } else {
            const auto v = kv.values(k0);
            poison_underflowed_values(ws.scores, ld_s, r0, count, keys, v.data, v.ld, d_v, state);
          }
        }
      }
      state.update_scores(ws.scores, ld_s, r0, count, keys);
      accumulate_pv(ws.scores, ld_s, count, keys, ws.packed_v, d_v, state.acc(r0), state.ld_acc());
      if constexpr (!Source::kValuesFinite) {
        if (!values_finite) {
          if constexpr (kSplitsRows<Source>) {  // one call per page run: keys add in order
            for (Index j = 0; j < keys;) {
              const Index run = std::min(keys - j, kv.contiguous_keys(k0 + j));
              const auto v = kv.values(k0 + j);
              add_non_finite_values(ws.scores + j, ld_s, count, run, v.data, v.ld, d_v,
                                    state.acc(r0), state.ld_acc());
              j += run;
            }
          } else {
            const auto v = kv.values(k0);
            add_non_finite_values(ws.scores, ld_s, count, keys, v.data, v.ld, d_v, state.acc(r0),
                                  state.ld_acc());
          }
        }
      }
    }
  }
}

#if defined(BLOCKATTN_BF16_DOT)
/// prefill_keys for an all-bf16 prefill on an AVX512_BF16 build (detail/bf16_dot.hpp): the same
/// loop, but ws.queries holds the block's unscaled queries as bf16 pairs (pack_q_bf16_pairs), K
/// and V are packed as pairs (pack_k_pairs, pack_v_pairs), the scores come from score_tile_bf16
/// (scale applied after the dot product) and, after the float softmax update, P is rounded to
/// bf16 in place and P·V runs on pairs (accumulate_pv_bf16); a chunk with a non-finite value
/// packs V in float and keeps prefill_keys' float P·V and NaN slow path. A separate
/// function, chosen by run_forward_task, rather than a flag through prefill_keys: the float path's
/// functions stay what they were, so GCC's inlining decisions for them (which the optlevel test
/// watches at -O2) do not move.
template <class T, class MaskMod, class ScoreMod, class Source>
void prefill_keys_bf16(const AttentionProblem<T, MaskMod, ScoreMod>& problem, const Source& kv,
                       const WorkspaceSlice<T>& ws, Index ld_s, const TileRows& t, KeyRange range,
                       RowBlockState<T>& state) {
  static_assert(
      std::is_same_v<T, float> && std::is_same_v<typename Source::Storage, Eigen::bfloat16>,
      "blockattn: the bf16 dot path takes bf16 K computed in float");
  const Index rows = t.rows();
  const Index d = problem.d;
  const Index d_v = problem.d_v;
  const Index pairs = bf16_pairs(d);
  const Index key_chunk = problem.shape.key_chunk;
  for (Index k0 = range.begin; k0 < range.end; k0 += key_chunk) {
    const Index keys = std::min(k0 + key_chunk, range.end) - k0;
    bool packed = false;
    bool values_finite = true;
    for (Index r0 = 0; r0 < rows; r0 += kTileRows) {
      const Index count = std::min(kTileRows, rows - r0);
      if (!problem.mask_rows(ws.scores, ld_s, r0, count, keys, t, k0, /*dry_run=*/true)) {
        continue;  // every mask hides this sub-tile: no FLOPs
      }
      if (!packed) {  // K and V are packed once per chunk, for every sub-tile
        kv.pack_k_pairs(k0, keys, ws.packed_k);
        values_finite = kv.values_finite(k0, keys);
        if (values_finite) {
          kv.pack_v_pairs(k0, keys, ws.packed_v);
        } else {  // the NaN slow path needs float P and V: this chunk's P·V stays in float
          kv.pack_v(k0, keys, ws.packed_v);
          zero_non_finite(ws.packed_v, packed_v_size<T>(keys, d_v));
        }
        packed = true;
      }
      // Rows of `pairs` 32-bit words: one float slot per word of the float queries buffer.
      score_tile_bf16(ws.queries + r0 * pairs, count, d, ws.packed_k, keys, problem.scale,
                      ws.scores, ld_s);
      problem.mask_rows(ws.scores, ld_s, r0, count, keys, t, k0, /*dry_run=*/false);
      if (!values_finite) {  // the slow path of detail/non_finite_values.hpp
        const auto v = kv.values(k0);
        poison_underflowed_values(ws.scores, ld_s, r0, count, keys, v.data, v.ld, d_v, state);
      }
      state.update_scores(ws.scores, ld_s, r0, count, keys);
      if (values_finite) {  // P rounded to bf16 (l keeps the float sum), P·V on pairs
        round_p_bf16_pairs(ws.scores, ld_s, count, keys);
        accumulate_pv_bf16(ws.scores, ld_s, count, keys, ws.packed_v, d_v, state.acc(r0),
                           state.ld_acc());
      } else {
        accumulate_pv(ws.scores, ld_s, count, keys, ws.packed_v, d_v, state.acc(r0),
                      state.ld_acc());
        const auto v = kv.values(k0);
        add_non_finite_values(ws.scores, ld_s, count, keys, v.data, v.ld, d_v, state.acc(r0),
                              state.ld_acc());
      }
    }
  }
}
#endif  // BLOCKATTN_BF16_DOT

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
