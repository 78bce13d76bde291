#pragma once
// The plan of one packed variable-length call (attention_varlen): one AttentionPlan per sequence
// — the plan attention() makes for that sequence alone, so that its result is the same bits —
// and ONE list of the tasks of every sequence, (sequence, kv head(s), query block, key segment),
// ordered by decreasing cost for the one parallel loop of the call. With the loop's dynamic
// schedule that is longest-processing-time-first list scheduling: a 100,000-key sequence's
// segments start first and the short sequences fill the gaps, so no thread idles while another
// works through one long sequence. Like plan_attention(), a pure function of the shapes and
// options: nothing depends on the thread count, so results are bitwise the same for any number
// of threads.

#include <algorithm>
#include <cstdint>
#include <vector>

#include <blockattn/detail/attention_plan.hpp>
#include <blockattn/detail/microkernel.hpp>
#include <blockattn/detail/workspace.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

// Varlen balance: a prefill sequence whose query blocks each cost more than the call's total
// cost / kVarlenBalanceTasks (one long prompt with few blocks beside many short ones) has its
// keys split into more segments, never shorter than kDecodeSegmentKeys keys, so that the long
// blocks do not end the call on one thread. Fixed, not derived from the thread count. Below
// kDecodeSegmentKeys keys nothing changes, and a sequence's plan is attention()'s.
inline constexpr Index kVarlenBalanceTasks = 64;

/// One task of a varlen call: task `task` of sequence `sequence`'s plan, and its estimated cost
/// (rows × keys it computes, plus rows: a task with no visible key still finalizes its rows).
struct VarlenTask {
  Index sequence = 0;
  Index task = 0;
  Index cost = 0;
};

/// One query block of a varlen call whose key segments are merged after the parallel loop.
struct VarlenMerge {
  Index sequence = 0;
  Index block = 0;
};

/// The plan of a varlen call (see the top of this file).
struct VarlenPlan {
  std::vector<AttentionPlan> sequences;  ///< per sequence: its own plan (batch 1)
  std::vector<Index> partial_offset;     ///< per sequence: its partial states' first element
  std::vector<Index> partial_size;       ///< per sequence: elements of one partial state
  std::vector<VarlenTask> tasks;         ///< every sequence's tasks, by decreasing cost
  std::vector<VarlenMerge> merges;       ///< the blocks with more than one key segment
  TileShape shape;  ///< a workspace slice that fits every task (group 1: rows in query_chunk)
  Index partial_elements = 0;  ///< elements of all partial states
  Index total_cost = 0;        ///< Σ tasks' cost
};

/// The cost estimate of task `task` of sequence `s`'s plan (causal, windows and key lengths
/// counted; block-sparse layouts and mask_mod not: they only hide more).
inline Index varlen_task_cost(const AttentionPlan& plan, const AttentionOptions& options, Index s,
                              Index task) {
  const TileRows t = plan.block_rows(task / plan.segments);
  const NoMaskMod none{};
  const auto [first, last] = TileMasker<NoMaskMod>(options, plan.n_q, plan.n_k, s, t.h0, none)
                                 .key_range(t.q0, t.q0 + t.rows_per_head);
  const KeyRange keys = plan.task_keys(task % plan.segments, {first, last});
  return t.rows() * (std::max<Index>(0, keys.end - keys.begin) + 1);
}

/// Plans a varlen call of element type T: sequence s has queries [cu_q[s], cu_q[s+1]) and keys
/// [cu_k[s], cu_k[s+1]) (valid offsets: attention_varlen checked them); `x` gives heads, kv
/// heads, d, d_v and the row interleaving of the packed views (its batch, n_q, n_k are unused).
/// Time O(batch + tasks·log tasks); memory O(batch + tasks).
template <class T>
VarlenPlan plan_attention_varlen(Span<const std::int32_t> cu_q, Span<const std::int32_t> cu_k,
                                 const AttentionShapes& x, const AttentionOptions& options) {
  VarlenPlan plan;
  const Index batch = cu_q.size() - 1;
  plan.sequences.reserve(static_cast<std::size_t>(batch));
  Index block_tasks = 0;
  for (Index s = 0; s < batch; ++s) {
    AttentionShapes one = x;
    one.batch = 1;
    one.n_q = cu_q[s + 1] - cu_q[s];
    one.n_k = cu_k[s + 1] - cu_k[s];
    plan.sequences.push_back(plan_attention<T>(one, options));
    block_tasks += plan.sequences.back().tasks;
  }
  // The balance rule (kVarlenBalanceTasks), on the cost of the plans as attention() makes them.
  const auto total_of = [&] {
    Index total = 0;
    for (Index s = 0; s < batch; ++s) {
      const AttentionPlan& p = plan.sequences[static_cast<std::size_t>(s)];
      for (Index task = 0; task < p.tasks; ++task) total += varlen_task_cost(p, options, s, task);
    }
    return total;
  };
  const Index cap = std::max<Index>(1, total_of() / kVarlenBalanceTasks);
  for (AttentionPlan& p : plan.sequences) {
    if (p.tasks == 0 || p.decode() || p.n_k <= kDecodeSegmentKeys) continue;
    const Index block_cost = p.task_shape().group * p.shape.query_chunk * p.n_k;
    const Index wanted = std::min(ceil_div(block_cost, cap), ceil_div(p.n_k, kDecodeSegmentKeys));
    if (wanted <= p.segments) continue;
    const Index key_chunks = ceil_div(p.n_k, p.shape.key_chunk);
    const Index segment_chunks = ceil_div(key_chunks, wanted);
    p.segment_keys = segment_chunks * p.shape.key_chunk;
    p.segments = ceil_div(key_chunks, segment_chunks);
    p.tasks = p.blocks * p.segments;
  }
  // The workspace: slices that fit the largest task; partial states sized per sequence.
  plan.shape.group = 1;
  plan.shape.d = x.d;
  plan.shape.d_v = x.d_v;
  const Index ld_acc = padded_stride<T>(x.d_v);
  plan.tasks.reserve(static_cast<std::size_t>(block_tasks));
  for (Index s = 0; s < batch; ++s) {
    const AttentionPlan& p = plan.sequences[static_cast<std::size_t>(s)];
    const Index rows = p.task_shape().group * p.shape.query_chunk;
    plan.partial_offset.push_back(plan.partial_elements);
    plan.partial_size.push_back(SliceLayout<T>::padded(rows * (ld_acc + 2)));
    if (p.tasks == 0) continue;
    plan.shape.query_chunk = std::max(plan.shape.query_chunk, rows);
    plan.shape.key_chunk = std::max(plan.shape.key_chunk, p.shape.key_chunk);
    if (p.segments > 1) {
      plan.partial_elements += p.tasks * plan.partial_size.back();
      for (Index block = 0; block < p.blocks; ++block) plan.merges.push_back({s, block});
    }
    for (Index task = 0; task < p.tasks; ++task) {
      const Index cost = varlen_task_cost(p, options, s, task);
      plan.tasks.push_back({s, task, cost});
      plan.total_cost += cost;
    }
  }
  // Longest first; ties keep (sequence, task) order, so the order is a function of the shapes.
  std::stable_sort(plan.tasks.begin(), plan.tasks.end(),
                   [](const VarlenTask& a, const VarlenTask& b) { return a.cost > b.cost; });
  return plan;
}

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
