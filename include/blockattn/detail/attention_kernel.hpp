#pragma once
// The chunked attention forward pass (Rabe & Staats 2021, "Self-attention does not need O(n²)
// memory", Algorithm 1 with the deferred normalisation of section 3). The pieces:
//   detail/attention_plan.hpp     the call's plan: path, tile shape, tasks, key segments (pure)
//   detail/attention_problem.hpp  the call's constants and masks, shared by every tile step
//   detail/kv_source.hpp          how K and V are read: packed per tile, or rows in place
//   detail/prefill_kernel.hpp     packed K/V tiles for query blocks of more than kDirectRows rows
//   detail/decode_kernel.hpp      K/V read in place for at most kDirectRows rows per kv head
//   detail/non_finite_values.hpp  the slow path of a key chunk whose values are not all finite
// One task = one (batch, kv head(s), query block, key segment) with the query heads that share
// the kv head (GQA) stacked into its rows; segments are merged in order after the parallel loop.
// Normalised once at the end. No argument checking here: attention.hpp validates first.

#include <type_traits>
#ifdef EIGEN_RUNTIME_NO_MALLOC
#include <mutex>
#endif

#include <Eigen/Core>

#include <blockattn/detail/attention_plan.hpp>
#include <blockattn/detail/attention_problem.hpp>
#include <blockattn/detail/bf16_dot.hpp>
#include <blockattn/detail/convert.hpp>
#include <blockattn/detail/decode_kernel.hpp>
#include <blockattn/detail/kv_source.hpp>
#include <blockattn/detail/online_state.hpp>
#include <blockattn/detail/parallel.hpp>
#include <blockattn/detail/prefill_kernel.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/detail/workspace.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

/// Forbids Eigen heap allocation for its lifetime when the translation unit defines
/// EIGEN_RUNTIME_NO_MALLOC (tests/attention_no_malloc_test.cpp); otherwise does nothing. Eigen's
/// flag is process-wide, so this is a test instrument, not a production mode. Scopes may overlap
/// across threads (attention() called from transformer_block()'s parallel loop): a count under a
/// mutex makes the first scope save the flag and the last one restore it, whatever the order.
class NoMallocScope {
 public:
#ifdef EIGEN_RUNTIME_NO_MALLOC
  NoMallocScope() {
    const std::lock_guard<std::mutex> lock(state().mutex);
    if (state().depth++ == 0) state().was_allowed = Eigen::internal::is_malloc_allowed();
    Eigen::internal::set_is_malloc_allowed(false);
  }
  ~NoMallocScope() {
    const std::lock_guard<std::mutex> lock(state().mutex);
    if (--state().depth == 0) Eigen::internal::set_is_malloc_allowed(state().was_allowed);
  }

 private:
  struct State {
    std::mutex mutex;
    int depth = 0;
    bool was_allowed = true;
  };
  static State& state() {
    static State s;
    return s;
  }

 public:
#else
  NoMallocScope() = default;
#endif
  NoMallocScope(const NoMallocScope&) = delete;
  NoMallocScope& operator=(const NoMallocScope&) = delete;
};

/// Where a forward call writes: out [batch, n_q, heads, d_v] (storage O: T, or a 16-bit format,
/// rounded once from the normalised float row) and lse [batch, heads, n_q] of T (or null); sinks
/// (options.sinks: one logit per query head, or null) join each row's denominator here, once,
/// after every key and segment is merged. A packed varlen sequence writes head h's lse at
/// lse + h·lse_head_stride instead ([heads, total_q], lse pointing at the sequence's first row).
template <class T, class O = T>
struct ForwardOutput {
  TensorView<O> out;
  T* lse;
  const double* sinks = nullptr;
  Index lse_head_stride = 0;  ///< 0: the [batch, heads, n_q] layout

  /// Normalises the finished state of the rows `t` into out and lse (folding in the sinks first).
  void finalize(RowBlockState<T>& state, const TileRows& t) const {
    for (Index g = 0; g < t.group; ++g) {
      const Index h = t.h0 + g;
      if (sinks != nullptr) {
        state.fold_sink(g * t.rows_per_head, t.rows_per_head, static_cast<T>(sinks[h]));
      }
      const Index lse_row =
          lse_head_stride != 0 ? h * lse_head_stride : (t.b * out.heads + h) * out.seq;
      T* lse_rows = lse != nullptr ? lse + lse_row + t.q0 : nullptr;
      state.finalize(g * t.rows_per_head, t.rows_per_head,
                     mutable_head_slice(out, t.b, h).middleRows(t.q0, t.rows_per_head), lse_rows);
    }
  }
};

/// Copies the queries of the rows `t` into `queries` [t.rows(), d], multiplied by the scale. q may
/// hold a 16-bit storage format QS: widened here (exactly), once per query block, into the
/// workspace, so the kernels see what a float q of the widened values gives them.
template <class T, class QS>
void gather_scaled_queries(const TensorView<const QS>& q, const TileRows& t, T scale, T* queries) {
  using S = simd::Simd<T>;
  using Io = StorageIo<QS>;
  static_assert(std::is_same_v<typename Io::E, T>, "blockattn: q widens to the compute type");
  const typename S::V factor = S::set1(scale);
  const Index d = q.dim;
  for (Index g = 0; g < t.group; ++g) {
    const auto q_head = head_slice(q, t.b, t.h0 + g);
    for (Index r = 0; r < t.rows_per_head; ++r) {
      T* dst = queries + (g * t.rows_per_head + r) * d;
      const QS* src = q_head.data() + (t.q0 + r) * q_head.outerStride();
      // Whole vectors explicitly: GCC -O2 does not vectorise a loop of unknown count.
      Index c = 0;
      for (; c + S::kLanes <= d; c += S::kLanes)
        S::store(dst + c, S::mul(Io::load(src + c), factor));
      for (; c < d; ++c) dst[c] = static_cast<T>(src[c]) * scale;
    }
  }
}

#if defined(BLOCKATTN_BF16_DOT)
/// The bf16 dot path's gather (detail/bf16_dot.hpp): the queries of the rows `t` into `queries`
/// as rows of bf16_pairs(d) words, unscaled (the score kernel applies the scale), once per query
/// block.
inline void gather_query_pairs(const TensorView<const Eigen::bfloat16>& q, const TileRows& t,
                               void* queries) {
  const Index pairs = bf16_pairs(q.dim);
  auto* bytes = static_cast<unsigned char*>(queries);
  for (Index g = 0; g < t.group; ++g) {
    const auto q_head = head_slice(q, t.b, t.h0 + g);
    pack_q_bf16_pairs(q_head.data() + t.q0 * q_head.outerStride(), q_head.outerStride(),
                      t.rows_per_head, q.dim, bytes + 4 * g * t.rows_per_head * pairs);
  }
}
#endif

/// Runs key segment `segment` of the query rows `t` (a block of `plan`) in workspace slice
/// `slot`: its online state lives in the slice (one segment: finalized into `output` here) or in
/// `*partial` (the plan has segments: merged later by merge_partials()).
template <class T, class MaskMod, class ScoreMod, class QS, class Sources, class O>
void run_forward_rows(const AttentionProblem<T, MaskMod, ScoreMod>& problem,
                      const AttentionPlan& plan, const TensorView<const QS>& q,
                      const Sources& sources, const AttentionWorkspace<T>& workspace, int slot,
                      const TileRows& t, Index segment, const PartialState<T>* partial,
                      const ForwardOutput<T, O>& output) {
  const WorkspaceSlice<T> ws = workspace.slice(slot);
  // bf16 q and K on an AVX512_BF16 build: the prefill runs on bf16 pairs (bf16_dot.hpp), for
  // sources that pack pairs (contiguous and strided caches; pages widen to float for now). In
  // every other build kBf16DotScores is false and the pair branches below are discarded.
  constexpr bool kPairs = kBf16DotScores<QS, typename Sources::Source::Storage> &&
                          kPacksPairs<typename Sources::Source>;
  if constexpr (kPairs) {
    if (!plan.decode()) {
      gather_query_pairs(q, t, ws.queries);
    } else {
      gather_scaled_queries(q, t, problem.scale, ws.queries);
    }
  } else {
    gather_scaled_queries(q, t, problem.scale, ws.queries);
  }
  const PartialState<T> own = partial != nullptr ? *partial : PartialState<T>{ws.m, ws.l, ws.acc};
  RowBlockState<T> state(own.m, own.l, own.acc, t.rows(), problem.d_v, workspace.ld_acc());
  state.reset();
  const KeyRange keys = plan.task_keys(segment, problem.visible_keys(t));
  if (!plan.decode()) {
    if constexpr (kPairs) {
      prefill_keys_bf16(problem, sources.head(t.b, t.h0 / problem.shape.group), ws,
                        workspace.ld_s(), t, keys, state);
    } else {
      prefill_keys(problem, sources.head(t.b, t.h0 / problem.shape.group), ws, workspace.ld_s(), t,
                   keys, state);
    }
  } else {
    const Index head_rows = problem.shape.group * t.rows_per_head;
    DecodeStream<T, typename Sources::Source::Storage> stream{
        ws.queries,       state,       {ws.scores, ws.scores + head_rows * workspace.ld_s()},
        workspace.ld_s(), ws.packed_v, plan.pipelined,
        ws.packed_k};
    decode_task(problem, plan, sources, t, keys, stream);
  }
  if (partial == nullptr) output.finalize(state, t);
}

/// Runs task `task` of the plan in workspace slice `slot` (run_forward_rows() of its block and
/// segment; partial state `task` of the workspace when the plan has segments).
template <class T, class MaskMod, class ScoreMod, class QS, class Sources, class O>
void run_forward_task(const AttentionProblem<T, MaskMod, ScoreMod>& problem,
                      const AttentionPlan& plan, const TensorView<const QS>& q,
                      const Sources& sources, const AttentionWorkspace<T>& workspace, int slot,
                      Index task, const ForwardOutput<T, O>& output) {
  const PartialState<T> partial =
      plan.segments > 1 ? workspace.partial(task) : PartialState<T>{nullptr, nullptr, nullptr};
  run_forward_rows(problem, plan, q, sources, workspace, slot,
                   plan.block_rows(task / plan.segments), task % plan.segments,
                   plan.segments > 1 ? &partial : nullptr, output);
}

/// Flash-Decoding merge of the rows `t`: the states part(0), ..., part(segments − 1) (each a
/// PartialState<T> of t.rows() rows, acc stride ld_acc) folded into part(0)'s, in segment order,
/// then finalized into `output`.
template <class T, class Part, class O>
void merge_partials(const TileRows& t, Index d_v, Index ld_acc, Index segments, const Part& part,
                    const ForwardOutput<T, O>& output) {
  const PartialState<T> first = part(Index(0));
  RowBlockState<T> state(first.m, first.l, first.acc, t.rows(), d_v, ld_acc);
  for (Index segment = 1; segment < segments; ++segment) {
    const PartialState<T> next = part(segment);
    state.merge(RowBlockState<T>(next.m, next.l, next.acc, t.rows(), d_v, ld_acc));
  }
  output.finalize(state, t);
}

/// merge_partials() of query block `block` of the plan (its tasks' partial states).
template <class T, class O>
void merge_segments(const AttentionPlan& plan, const AttentionWorkspace<T>& workspace, Index block,
                    const ForwardOutput<T, O>& output) {
  merge_partials(
      plan.block_rows(block), plan.shape.d_v, workspace.ld_acc(), plan.segments,
      [&](Index segment) { return workspace.partial(block * plan.segments + segment); }, output);
}

/// attention_forward() (below) on any K/V source family (detail/kv_source.hpp) whose call shapes
/// are `shapes` (shapes_of the K/V views); the int8 cache's entry point comes in here.
template <class QS, class Sources, class MaskMod, class ScoreMod>
void attention_forward_sources(const TensorView<const QS>& q, const AttentionShapes& shapes,
                               const Sources& sources, const TensorView<QS>& out,
                               const AttentionOptions& options, accumulator_t<QS>* lse,
                               const MaskMod& mask_mod, const ScoreMod& score_mod,
                               Workspace& storage) {
  using T = accumulator_t<QS>;
  static_assert(std::is_same_v<typename Sources::Source::Element, T>,
                "blockattn: the K/V source computes in q's accumulator type");
  const AttentionPlan plan = plan_attention<T>(shapes, options);
  if (plan.tasks == 0) return;
  const auto problem = make_attention_problem<T>(plan, options, mask_mod, score_mod);
  const ForwardOutput<T, QS> output{
      out, lse, options.sinks.empty() ? nullptr : options.sinks.data(), /*lse_head_stride=*/0};
  const int threads = resolve_threads(options.threads, plan.tasks);
  const AttentionWorkspace<T> workspace(storage, threads, plan.task_shape(),
                                        plan.segments > 1 ? plan.tasks : 0);
  // The loops below never allocate (checked in test builds).
  [[maybe_unused]] const NoMallocScope no_malloc;
  parallel_for(plan.tasks, threads, [&](Index task, int slot) {
    run_forward_task(problem, plan, q, sources, workspace, slot, task, output);
  });
  if (plan.segments == 1) return;
  parallel_for(plan.blocks, resolve_threads(options.threads, plan.blocks),
               [&](Index block, int) { merge_segments(plan, workspace, block, output); });
}

/// Chunked attention over every task of the call's plan (plan_attention), in parallel, then the
/// merge of key segments. Arguments are valid (attention.hpp checked them); lse is
/// [batch, q.heads, n_q] or null; `storage` is the caller's workspace (grown here if too small,
/// before the loops). Storage types: q and out QS (float, double, or a 16-bit format computed in
/// float), k and v KS (QS, or a 16-bit format under a float q). Everything is computed in
/// T = accumulator_t<QS> with the plan of a T call (tile sizes from sizeof(T)), so a call on
/// 16-bit storage runs exactly the arithmetic of the T call on the widened values, and out is
/// rounded once at the end.
template <class QS, class KS, class MaskMod, class ScoreMod>
void attention_forward(const TensorView<const QS>& q, const TensorView<const KS>& k,
                       const TensorView<const KS>& v, const TensorView<QS>& out,
                       const AttentionOptions& options, accumulator_t<QS>* lse,
                       const MaskMod& mask_mod, const ScoreMod& score_mod, Workspace& storage) {
  using T = accumulator_t<QS>;
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "blockattn: attention() runs on float and double (the SIMD micro-kernels); "
                "reference::attention is the long double path");
  static_assert(std::is_same_v<accumulator_t<KS>, T>,
                "blockattn: K/V storage must compute in q's accumulator type");
  attention_forward_sources(q, shapes_of(q, k, v), StridedKVHeads<T, KS>(k, v), out, options, lse,
                            mask_mod, score_mod, storage);
}

/// attention_forward() with a workspace of its own (allocated once, before the loops).
template <class QS, class KS, class MaskMod, class ScoreMod>
void attention_forward(const TensorView<const QS>& q, const TensorView<const KS>& k,
                       const TensorView<const KS>& v, const TensorView<QS>& out,
                       const AttentionOptions& options, accumulator_t<QS>* lse,
                       const MaskMod& mask_mod, const ScoreMod& score_mod) {
  Workspace storage;
  attention_forward(q, k, v, out, options, lse, mask_mod, score_mod, storage);
}

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
