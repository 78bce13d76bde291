#pragma once
// attention_varlen(): packed variable-length batches with flash_attn_varlen_func's semantics
// (cu_seqlens_q / cu_seqlens_k), no padding and no per-pair mask: sequence s attends only to its
// own keys. One plan for the whole batch (detail/varlen_plan.hpp): every sequence keeps the plan
// attention() would make for it alone, and all their tasks run in one parallel loop, longest
// first, so that one long sequence beside many short ones keeps every thread busy.

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <blockattn/attention.hpp>
#include <blockattn/detail/attention_kernel.hpp>
#include <blockattn/detail/check.hpp>
#include <blockattn/detail/kv_source.hpp>
#include <blockattn/detail/parallel.hpp>
#include <blockattn/detail/varlen_plan.hpp>
#include <blockattn/detail/workspace.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

/// Checks one cu_seqlens array named `name` against `batch` + 1 entries and `total` rows (the
/// packed view's seq, named `total_what`): starts at 0, never decreases, ends at total.
inline void validate_cu_seqlens(const char* function, const char* name, Span<const std::int32_t> cu,
                                const char* total_what, Index total) {
  require(cu.data() != nullptr || cu.empty(), function, name, ".data() is null but ", name,
          ".size() is ", cu.size());
  require(!cu.empty(), function, name,
          ".size() is 0 but must be batch + 1 >= 1 (0, then each sequence's end offset)");
  require(cu[0] == 0, function, name, "[0] is ", cu[0], " but must be 0");
  for (Index s = 1; s < cu.size(); ++s) {
    require(cu[s] >= cu[s - 1], function, name, "[", s, "] is ", cu[s], " but ", name, "[", s - 1,
            "] is ", cu[s - 1], " (offsets must not decrease)");
  }
  require(cu[cu.size() - 1] == total, function, name, "[", cu.size() - 1, "] is ",
          cu[cu.size() - 1], " but ", total_what, " is ", total,
          " (the last offset is the total number of rows)");
}

/// Checks every argument of attention_varlen() before anything is written.
template <class T, class KT, class OT, class L>
void validate_attention_varlen(const char* function, const TensorView<const T>& q,
                               const TensorView<const KT>& k, const TensorView<const KT>& v,
                               const TensorView<OT>& out, Span<const std::int32_t> cu_q,
                               Span<const std::int32_t> cu_k, const AttentionOptions& options,
                               Span<L> lse) {
  const auto require_packed = [&](const char* name, Index batch) {
    require(batch == 1, function, name, ".batch is ", batch,
            " but must be 1 (packed rows: [1, total, heads, dim])");
  };
  require_packed("q", q.batch);
  require_packed("k", k.batch);
  require_packed("v", v.batch);
  require_packed("out", out.batch);
  // Shapes, aliasing and lse ([1, heads, total_q] is [heads, total_q]) as attention() checks
  // them; the per-sequence options below.
  AttentionOptions packed = options;
  packed.key_lengths = {};
  packed.block_sparse = nullptr;
  validate_attention<T>(function, q, k, v, out, packed, lse);
  validate_cu_seqlens(function, "cu_seqlens_q", cu_q, "q.seq (total_q)", q.seq);
  require_size(function, "cu_seqlens_k.size()", cu_k.size(), "cu_seqlens_q.size()", cu_q.size(),
               "one key sequence per query sequence: batch + 1 entries each");
  validate_cu_seqlens(function, "cu_seqlens_k", cu_k, "k.seq (total_k)", k.seq);
  const Index batch = cu_q.size() - 1;
  Index max_q = 0;
  Index max_k = 0;
  for (Index s = 0; s < batch; ++s) {
    max_q = std::max<Index>(max_q, cu_q[s + 1] - cu_q[s]);
    max_k = std::max<Index>(max_k, cu_k[s + 1] - cu_k[s]);
  }
  validate_attention_options(function, options, batch, q.heads, max_q, max_k);
  for (Index s = 0; s < (options.key_lengths.empty() ? 0 : batch); ++s) {
    const Index n_k = cu_k[s + 1] - cu_k[s];
    require(options.key_lengths[s] <= n_k, function, "options.key_lengths[", s, "] is ",
            options.key_lengths[s], " but sequence ", s, " has ", n_k,
            " keys (cu_seqlens_k[s + 1] - cu_seqlens_k[s])");
  }
}

/// Runs a valid varlen call (validate_attention_varlen() passed): every task of the varlen plan
/// in one parallel loop, then the merges of the key-split blocks. lse is [heads, total_q] or
/// null; `storage` the caller's workspace or the call's own.
template <class QS, class KS, class MaskMod, class ScoreMod>
void attention_varlen_forward(const TensorView<const QS>& q, const TensorView<const KS>& k,
                              const TensorView<const KS>& v, const TensorView<QS>& out,
                              Span<const std::int32_t> cu_q, Span<const std::int32_t> cu_k,
                              const AttentionOptions& options, accumulator_t<QS>* lse,
                              const MaskMod& mask_mod, const ScoreMod& score_mod,
                              Workspace& storage) {
  using T = accumulator_t<QS>;
  const Index batch = cu_q.size() - 1;
  const VarlenPlan plan = plan_attention_varlen<T>(cu_q, cu_k, shapes_of(q, k, v), options);
  const auto tasks = static_cast<Index>(plan.tasks.size());
  if (tasks == 0) return;
  const VarlenKVHeads<T, KS> sources(k, v, cu_k.data());
  const double* sinks = options.sinks.empty() ? nullptr : options.sinks.data();
  // Sequence s as a batch of `batch` entries with batch stride 0, so that a tile's batch index
  // is the sequence's (masks, key lengths and mask_mod see b = s) and addresses its rows.
  const auto sequence_view = [batch](auto view, Index first, Index rows) {
    view.data = view.at(0, first, 0);
    view.batch = batch;
    view.seq = rows;
    view.batch_stride = 0;
    return view;
  };
  const auto output_of = [&](Index s) {
    const Index first = cu_q[s];
    return ForwardOutput<T, QS>{sequence_view(out, first, cu_q[s + 1] - first),
                                lse != nullptr ? lse + first : nullptr, sinks, q.seq};
  };
  const int threads = resolve_threads(options.threads, tasks);
  const AttentionWorkspace<T> workspace(storage, threads, plan.shape, 0, plan.partial_elements);
  const Index ld_acc = workspace.ld_acc();
  const auto partial = [&](Index s, Index task) {
    const auto at = static_cast<std::size_t>(s);
    const Index rows = plan.sequences[at].task_shape().group * plan.sequences[at].shape.query_chunk;
    T* base = workspace.extra() + plan.partial_offset[at] + task * plan.partial_size[at];
    return PartialState<T>{base, base + rows, base + 2 * rows};
  };
  // The loops below never allocate (checked in test builds).
  [[maybe_unused]] const NoMallocScope no_malloc;
  parallel_for(tasks, threads, [&](Index i, int slot) {
    const VarlenTask& task = plan.tasks[static_cast<std::size_t>(i)];
    const Index s = task.sequence;
    const AttentionPlan& p = plan.sequences[static_cast<std::size_t>(s)];
    const auto problem = make_attention_problem<T>(p, options, mask_mod, score_mod);
    TileRows t = p.block_rows(task.task / p.segments);
    t.b = s;
    const PartialState<T> own = p.segments > 1 ? partial(s, task.task) : PartialState<T>{};
    run_forward_rows(problem, p, sequence_view(q, cu_q[s], p.n_q), sources, workspace, slot, t,
                     task.task % p.segments, p.segments > 1 ? &own : nullptr, output_of(s));
  });
  const auto merges = static_cast<Index>(plan.merges.size());
  parallel_for(merges, resolve_threads(options.threads, merges), [&](Index i, int) {
    const VarlenMerge& merge = plan.merges[static_cast<std::size_t>(i)];
    const Index s = merge.sequence;
    const AttentionPlan& p = plan.sequences[static_cast<std::size_t>(s)];
    TileRows t = p.block_rows(merge.block);
    t.b = s;
    merge_partials(
        t, p.shape.d_v, ld_acc, p.segments,
        [&](Index segment) { return partial(s, merge.block * p.segments + segment); },
        output_of(s));
  });
}

}  // namespace detail

/// Exact attention over a packed batch of variable-length sequences (flash_attn_varlen_func's
/// semantics): sequence s has the queries q[cu_seqlens_q[s], cu_seqlens_q[s+1]) and attends only
/// to the keys and values [cu_seqlens_k[s], cu_seqlens_k[s+1]) — no padding, no per-pair mask.
/// Every sequence's result is bitwise that of attention() on the sequence alone (same plan, same
/// tiles), except a prefill sequence of more than 8192 keys whose query blocks each exceed 1/64 of
/// the call's work: its keys are split further (merged exactly, rounding differs only). Per
/// sequence, as attention(): causal is bottom-right (key j visible to query i iff j <= i + n_k −
/// n_q, flash-attn >= 2.1), windows, ALiBi, softcap, sinks, block-sparse layouts and the
/// functors mask_mod(s, h, i, j) / score_mod(x, s, h, i, j) see sequence s and positions i, j
/// within it; options.key_lengths (optional, [batch]) limits sequence s to its first
/// key_lengths[s] keys. Batched decode with a cache length per sequence is the n_q = 1 case.
/// Shapes: q [1, total_q, H, d], k [1, total_k, H_kv, d], v [1, total_k, H_kv, d_v], out
/// [1, total_q, H, d_v] (strided views, batch 1; H a multiple of H_kv: GQA), cu_seqlens_q and
/// cu_seqlens_k int32 [batch + 1], lse (optional) [H, total_q] contiguous — flash-attn's unpadded
/// layout: head h's row holds every packed query in order, so a sequence's lse is a contiguous
/// run of each head's row and no batch padding is needed.
/// Element types as the TensorView attention(). Time O(Σ_s n_q,s·n_k,s·(d + d_v)) over the
/// threads; extra memory O(threads·query_chunk·(key_chunk + d + d_v)) plus the partial outputs of
/// key-split blocks (decode: O(H·d_v) per 8192 keys), plus the plan's O(batch + tasks).
/// Throws std::invalid_argument naming the argument and the sizes, before writing: a view with
/// batch != 1, shape and aliasing errors as attention(), cu_seqlens empty, not starting at 0,
/// decreasing or not ending at total_q / total_k, cu_seqlens_k's size not cu_seqlens_q's.
/// out and lse must not alias q, k, v or each other. Bitwise identical for any thread count.
template <class QT, class KT, class VT, class OT, class MaskMod = NoMaskMod,
          class ScoreMod = NoScoreMod>
void attention_varlen(TensorView<QT> q, TensorView<KT> k, TensorView<VT> v, TensorView<OT> out,
                      Span<const std::int32_t> cu_seqlens_q, Span<const std::int32_t> cu_seqlens_k,
                      const AttentionOptions& options = {},
                      Span<accumulator_t<std::remove_const_t<QT>>> lse = {},
                      const MaskMod& mask_mod = {}, const ScoreMod& score_mod = {}) {
  using T = std::remove_const_t<QT>;
  using KS = std::remove_const_t<KT>;
  detail::check_attention_types<T, KS, std::remove_const_t<VT>, std::remove_const_t<OT>>();
  static_assert(!std::is_const_v<OT>, "blockattn: out must be a writable TensorView<T>");
  detail::check_mods<accumulator_t<T>, MaskMod, ScoreMod>();
  const TensorView<const T> q_c(q);
  const TensorView<const KS> k_c(k);
  const TensorView<const KS> v_c(v);
  detail::validate_attention_varlen<T>("attention_varlen", q_c, k_c, v_c, out, cu_seqlens_q,
                                       cu_seqlens_k, options, lse);
  Workspace own;
  Workspace& workspace = options.workspace != nullptr ? *options.workspace : own;
  detail::attention_varlen_forward(q_c, k_c, v_c, out, cu_seqlens_q, cu_seqlens_k, options,
                                   detail::data_or_null(lse), mask_mod, score_mod, workspace);
}

}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
