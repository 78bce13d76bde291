#pragma once
// attention(): exact chunked attention (Rabe & Staats 2021) on single-head Eigen views and on
// batched multi-head strided tensors (GQA/MQA), with every mask of mask.hpp, the optional
// log-sum-exp, and merge_attention_states() for results over disjoint key sets.

#include <algorithm>
#include <array>
#include <cmath>
#include <iterator>
#include <limits>
#include <string>
#include <type_traits>

#include <Eigen/Core>

#include <blockattn/detail/attention_kernel.hpp>
#include <blockattn/detail/check.hpp>
#include <blockattn/detail/convert.hpp>
#include <blockattn/detail/online_state.hpp>
#include <blockattn/detail/parallel.hpp>
#include <blockattn/detail/workspace.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {

namespace detail {

/// Address range of a strided 4-D view (any stride signs) whose rows each hold dim values,
/// values_per_element to an element (2: 4-bit values packed two per byte).
template <class T>
AddressRange tensor_range(const TensorView<T>& t, Index values_per_element = 1) {
  if (t.data == nullptr || t.batch <= 0 || t.seq <= 0 || t.heads <= 0 || t.dim <= 0) return {};
  Index lo = 0;
  Index hi = 0;
  for (const Index extent : {(t.batch - 1) * t.batch_stride, (t.seq - 1) * t.seq_stride,
                             (t.heads - 1) * t.head_stride}) {
    (extent < 0 ? lo : hi) += extent;
  }
  return {t.data + lo, t.data + hi + (t.dim + values_per_element - 1) / values_per_element};
}

/// True when every element of the 4-D view has its own address: with the dimensions of extent
/// > 1 sorted by |stride|, each stride must step over everything the smaller ones span (a nested
/// layout: BSHD, BHSD, fused QKV slices). Interleaved layouts that happen not to collide are
/// rejected too; an output that writes one address twice would race between threads.
template <class T>
bool elements_distinct(const TensorView<T>& t) {
  std::pair<Index, Index> dims[3] = {
      {t.batch_stride < 0 ? -t.batch_stride : t.batch_stride, t.batch},
      {t.seq_stride < 0 ? -t.seq_stride : t.seq_stride, t.seq},
      {t.head_stride < 0 ? -t.head_stride : t.head_stride, t.heads}};
  std::sort(std::begin(dims), std::end(dims));
  Index span = t.dim;
  for (const auto& [stride, extent] : dims) {
    if (extent <= 1) continue;
    if (stride < span) return false;
    span = stride * (extent - 1) + span;
  }
  return true;
}

/// Address range of a matrix view.
template <class View>
AddressRange view_range(const View& x) {
  return address_range(x.data(), x.rows(), x.cols(), x.outerStride());
}

/// Checks the options against the problem size (shared by every attention entry point and the
/// backward pass). `function` names the caller in messages.
inline void validate_attention_options(const char* function, const AttentionOptions& options,
                                       Index batch, Index q_heads, Index n_q, Index n_k) {
  require(options.query_chunk >= 0, function, "options.query_chunk is ", options.query_chunk,
          " but must be >= 0 (0 picks a default)");
  require(options.key_chunk >= 0, function, "options.key_chunk is ", options.key_chunk,
          " but must be >= 0 (0 picks a default)");
  require(options.window_left >= -1, function, "options.window_left is ", options.window_left,
          " but must be >= -1 (-1 means unbounded)");
  require(options.window_right >= -1, function, "options.window_right is ", options.window_right,
          " but must be >= -1 (-1 means unbounded)");
  require(options.threads >= 0, function, "options.threads is ", options.threads,
          " but must be >= 0 (0 means all)");
  require(std::isfinite(options.scale), function, "options.scale is ", options.scale,
          " but must be finite");
  require(std::isfinite(options.softcap) && options.softcap >= 0, function, "options.softcap is ",
          options.softcap, " but must be finite and >= 0 (0 turns it off)");
  require_span(function, "options.key_lengths", options.key_lengths, "the batch size", batch,
               "one key length per sequence", /*required=*/false);
  for (Index b = 0; b < (options.key_lengths.empty() ? 0 : batch); ++b) {
    const Index length = options.key_lengths[b];
    require(length >= 0 && length <= n_k, function, "options.key_lengths[", b, "] is ", length,
            " but must be in [0, ", n_k, "] (n_k, the keys' sequence length)");
  }
  require_span(function, "options.alibi_slopes", options.alibi_slopes, "the number of query heads",
               q_heads, "one slope per query head", /*required=*/false);
  for (Index h = 0; h < (options.alibi_slopes.empty() ? 0 : q_heads); ++h) {
    require(std::isfinite(options.alibi_slopes[h]), function, "options.alibi_slopes[", h, "] is ",
            options.alibi_slopes[h], " but must be finite");
  }
  require_span(function, "options.sinks", options.sinks, "the number of query heads", q_heads,
               "one sink logit per query head", /*required=*/false);
  for (Index h = 0; h < (options.sinks.empty() ? 0 : q_heads); ++h) {
    require(!std::isnan(options.sinks[h]) &&
                options.sinks[h] != std::numeric_limits<double>::infinity(),
            function, "options.sinks[", h, "] is ", options.sinks[h],
            " but must be finite or -inf (-inf: no sink for that head)");
  }
  if (const BlockSparseLayout* layout = options.block_sparse) {
    require(layout->heads() == 1 || layout->heads() == q_heads, function,
            "options.block_sparse->heads() is ", layout->heads(), " but q has ", q_heads,
            " heads (a layout has one grid for all heads or one per query head)");
    require(layout->query_blocks() * layout->query_block_size() >= n_q, function,
            "options.block_sparse covers ", layout->query_blocks() * layout->query_block_size(),
            " queries but n_q is ", n_q, " (the layout must cover every query)");
    require(layout->key_blocks() * layout->key_block_size() >= n_k, function,
            "options.block_sparse covers ", layout->key_blocks() * layout->key_block_size(),
            " keys but n_k is ", n_k, " (the layout must cover every key)");
  }
}

/// Checks every argument of the single-head attention() before anything is written. k and v may
/// have another element type than q and out (a 16-bit KV cache under float q).
template <class T, class KT, class OT, class L>
void validate_attention(const char* function, const ConstMatrixView<T>& q,
                        const ConstMatrixView<KT>& k, const ConstMatrixView<KT>& v,
                        const MatrixView<OT>& out, const AttentionOptions& options, Span<L> lse,
                        bool lse_required = false) {
  require(q.cols() > 0, function, "q.cols() is 0 (the head dimension must be positive)");
  require_size(function, "k.cols()", k.cols(), "q.cols()", q.cols(), "head dimensions must match");
  require_size(function, "v.rows()", v.rows(), "k.rows()", k.rows(), "every key needs one value");
  require_size(function, "out.rows()", out.rows(), "q.rows()", q.rows(),
               "one output row per query");
  require_size(function, "out.cols()", out.cols(), "v.cols()", v.cols(),
               "the output has the values' head dimension");
  require(out.rows() <= 1 || out.outerStride() >= out.cols(), function, "out.outerStride() is ",
          out.outerStride(), " but out.cols() is ", out.cols(),
          " (output rows must not overlap each other)");
  validate_attention_options(function, options, /*batch=*/1, /*q_heads=*/1, q.rows(), k.rows());
  const AddressRange out_range = view_range(out);
  require_disjoint(function, "out", out_range, "q", view_range(q));
  require_disjoint(function, "out", out_range, "k", view_range(k));
  require_disjoint(function, "out", out_range, "v", view_range(v));
  require_span(function, "lse", lse, "q.rows()", q.rows(), "one log-sum-exp per query",
               lse_required);
  if (!lse.empty()) {
    const AddressRange lse_range = address_range(lse.data(), 1, q.rows(), q.rows());
    require_disjoint(function, "lse", lse_range, "q", view_range(q));
    require_disjoint(function, "lse", lse_range, "k", view_range(k));
    require_disjoint(function, "lse", lse_range, "v", view_range(v));
    require_disjoint(function, "lse", lse_range, "out", out_range);
  }
}

/// The argument names of a call's keys and values in validate_query_kv_out's messages (string
/// literals): a cache's k and v, or a paged pool's k_pages and v_pages.
struct KVNames {
  const char* k;
  const char* v;
  const char* k_dim;
  const char* k_heads;
  const char* v_heads;
  const char* v_dim;
};
inline constexpr KVNames kCacheKVNames{"k", "v", "k.dim", "k.heads", "v.heads", "v.dim"};
inline constexpr KVNames kPoolKVNames{"k_pages",       "v_pages",       "k_pages.dim",
                                      "k_pages.heads", "v_pages.heads", "v_pages.dim"};

/// The checks of q, the heads and head dimensions of k and v, and out that a contiguous and a
/// paged call share (validate_attention, validate_paged_attention): no negative size, q.dim > 0
/// and k's equal, v's heads k's, q's heads a multiple of them, out [q.batch, q.seq, q.heads,
/// v.dim] with every element its own address, q and out data when the problem is not empty.
/// Returns whether it is empty (no query row).
template <class T, class KT, class OT>
bool validate_query_kv_out(const char* function, const KVNames& n, const TensorView<const T>& q,
                           const TensorView<const KT>& k, const TensorView<const KT>& v,
                           const TensorView<OT>& out) {
  const auto require_sizes = [&](const char* name, Index batch, Index seq, Index heads, Index dim) {
    require(batch >= 0 && seq >= 0 && heads >= 0 && dim >= 0, function, name,
            " has a negative size [", batch, ", ", seq, ", ", heads, ", ", dim, "]");
  };
  require_sizes("q", q.batch, q.seq, q.heads, q.dim);
  require_sizes(n.k, k.batch, k.seq, k.heads, k.dim);
  require_sizes(n.v, v.batch, v.seq, v.heads, v.dim);
  require(q.dim > 0, function, "q.dim is 0 (the head dimension must be positive)");
  require_size(function, n.k_dim, k.dim, "q.dim", q.dim, "head dimensions must match");
  require_size(function, n.v_heads, v.heads, n.k_heads, k.heads,
               "keys and values have the same heads");
  require(k.heads > 0, function, n.k_heads, " is 0 (at least one key/value head)");
  require(q.heads % k.heads == 0, function, "q.heads is ", q.heads, " but ", n.k_heads, " is ",
          k.heads, " (the number of query heads must be a multiple of the key/value heads)");
  require_size(function, "out.batch", out.batch, "q.batch", q.batch, "one output per sequence");
  require_size(function, "out.seq", out.seq, "q.seq", q.seq, "one output row per query");
  require_size(function, "out.heads", out.heads, "q.heads", q.heads, "one output per query head");
  require_size(function, "out.dim", out.dim, n.v_dim, v.dim,
               "the output has the values' head dimension");
  const bool empty = q.batch == 0 || q.seq == 0 || q.heads == 0;
  require(empty || (q.data != nullptr && out.data != nullptr), function,
          "q.data or out.data is null for a non-empty problem");
  require(empty || elements_distinct(out), function, "out's strides [", out.batch_stride, ", ",
          out.seq_stride, ", ", out.head_stride, "] make elements of out [", out.batch, ", ",
          out.seq, ", ", out.heads, ", ", out.dim,
          "] share memory (every output element needs its own address)");
  return empty;
}

/// Checks every argument of the TensorView attention() before anything is written. k and v may
/// have another element type than q and out (a 16-bit KV cache under float q) and hold
/// kv_values_per_element values to an element (2: an int4 cache's bytes).
template <class T, class KT, class OT, class L>
void validate_attention(const char* function, const TensorView<const T>& q,
                        const TensorView<const KT>& k, const TensorView<const KT>& v,
                        const TensorView<OT>& out, const AttentionOptions& options, Span<L> lse,
                        bool lse_required = false, Index kv_values_per_element = 1) {
  const bool empty = validate_query_kv_out(function, kCacheKVNames, q, k, v, out);
  require_size(function, "k.batch", k.batch, "q.batch", q.batch, "one key set per sequence");
  require_size(function, "v.batch", v.batch, "q.batch", q.batch, "one value set per sequence");
  require_size(function, "v.seq", v.seq, "k.seq", k.seq, "every key needs one value");
  require(empty || k.seq == 0 || (k.data != nullptr && v.data != nullptr), function,
          "k.data or v.data is null for a non-empty problem");
  validate_attention_options(function, options, q.batch, q.heads, q.seq, k.seq);
  const AddressRange out_range = tensor_range(out);
  const AddressRange k_range = tensor_range(k, kv_values_per_element);
  const AddressRange v_range = tensor_range(v, kv_values_per_element);
  require_disjoint(function, "out", out_range, "q", tensor_range(q));
  require_disjoint(function, "out", out_range, "k", k_range);
  require_disjoint(function, "out", out_range, "v", v_range);
  const Index count = q.batch * q.heads * q.seq;
  require_span(function, "lse", lse, "batch·heads·n_q", count,
               "one log-sum-exp per query row, [batch, heads, n_q]", lse_required);
  if (!lse.empty()) {
    const AddressRange lse_range = address_range(lse.data(), 1, count, count);
    require_disjoint(function, "lse", lse_range, "q", tensor_range(q));
    require_disjoint(function, "lse", lse_range, "k", k_range);
    require_disjoint(function, "lse", lse_range, "v", v_range);
    require_disjoint(function, "lse", lse_range, "out", out_range);
  }
}

/// The raw pointer of an optional array for the kernels: null when the Span is empty.
template <class T>
T* data_or_null(Span<T> s) {
  return s.empty() ? nullptr : s.data();
}

/// The compile-time check of attention()'s element types (q, k, v, out; const removed): each a
/// storage scalar, then the combinations of kAttentionTypes. One static_assert fires, at the call.
template <class QS, class KS, class VS, class OS>
constexpr void check_attention_types() {
  static_assert(kStorageScalar<QS>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
  static_assert(!kStorageScalar<QS> || kAttentionTypes<QS, KS, VS, OS>,
                BLOCKATTN_ATTENTION_TYPES_MESSAGE);
}

/// Compile-time checks of the TensorView forms: one element type (const or not), a writable out.
template <class T, class... Views>
constexpr void check_tensor_arguments() {
  static_assert((std::is_same_v<std::remove_const_t<Views>, T> && ...),
                "blockattn: every tensor argument must have the same element type");
}

/// A single-head view as a [1, rows, 1, cols] tensor (no copy).
template <class T, class View>
TensorView<T> as_tensor(const View& x) {
  return TensorView<T>(const_cast<T*>(x.data()), 1, x.rows(), 1, x.cols(), /*batch_stride=*/0,
                       x.outerStride(), /*head_stride=*/0);
}

/// The one body of both attention() forms, on ConstMatrixView/MatrixView or TensorView: validates,
/// then runs the kernel in options.workspace or a workspace of its own. T: the element type of q
/// and out, KT: that of k and v (check_attention_types() has checked the pair).
template <class T, class KT, class MaskMod, class ScoreMod, class In, class KIn, class Out>
void attention_impl(const In& q, const KIn& k, const KIn& v, const Out& out,
                    const AttentionOptions& options, Span<accumulator_t<T>> lse,
                    const MaskMod& mask_mod, const ScoreMod& score_mod) {
  check_mods<accumulator_t<T>, MaskMod, ScoreMod>();
  validate_attention<T>("attention", q, k, v, out, options, lse);
  Workspace own;
  Workspace& workspace = options.workspace != nullptr ? *options.workspace : own;
  if constexpr (std::is_same_v<In, TensorView<const T>>) {
    attention_forward(q, k, v, out, options, data_or_null(lse), mask_mod, score_mod, workspace);
  } else {
    attention_forward(as_tensor<const T>(q), as_tensor<const KT>(k), as_tensor<const KT>(v),
                      as_tensor<T>(out), options, data_or_null(lse), mask_mod, score_mod,
                      workspace);
  }
}

}  // namespace detail

// --- single head -------------------------------------------------------------------------------

/// Exact single-head attention, out = softmax(scale·q·kᵀ + modifiers, masked)·v, never forming
/// the n_q×n_k scores (Rabe & Staats 2021): query chunks × key chunks, each tile's scores a small
/// matrix product, merged through the online-softmax state, normalised once at the end. Every
/// mask and modifier of AttentionOptions applies (see mask.hpp for their exact meaning); the
/// optional mask_mod(b, h, i, j) -> bool and score_mod(s, b, h, i, j) -> s are called with
/// b = h = 0. Tiles the masks hide entirely cost nothing.
/// Element types: float, double, Eigen::bfloat16 or Eigen::half, deduced from q; out has q's type,
/// v has k's, and k is q's type or — under a float q and out — Eigen::bfloat16 or Eigen::half (a
/// 16-bit KV cache, read in place and widened in registers, never copied). 16-bit storage is
/// computed in float (scores, softmax state, accumulators; lse is float) and out is rounded once
/// at the end: the result is bitwise round(the float call on the widened inputs). Anything else
/// is a compile-time error (long double: use reference::attention). q, k, v and out must be
/// row-major storage with contiguous rows (a Matrix, its blocks, a Map with OuterStride<>), so that
/// nothing is copied; a column-major matrix or an expression is a compile-time error. out may be a
/// temporary block (out.middleRows(...)) but not a const object.
/// Shapes: q [n_q, d], k [n_k, d], v [n_k, d_v], out [n_q, d_v], lse (optional, empty = not
/// wanted) [n_q] receives log Σ_j exp(s_ij) over the visible keys. A query with no visible key
/// gets out = 0, lse = −inf.
/// Time O(n_q·n_k·(d + d_v)) for the visible tiles; extra memory
/// O(threads·query_chunk·(key_chunk + d + d_v)), independent of n, plus, when the keys are split
/// into segments (decode, short prefill), partial outputs of O(n_q·d_v) per fixed-size key
/// segment; taken from options.workspace when given (then repeated calls of one shape allocate
/// nothing).
/// Throws std::invalid_argument naming the argument and both sizes (also a too-short lse, key
/// lengths or slopes), before writing anything.
/// out and lse must not alias q, k, v or each other. Bitwise identical for any thread count;
/// chunk sizes change rounding only. Safe to call concurrently (no shared state; one Workspace
/// per concurrent call). mask_mod and score_mod are called from several threads at once and must
/// not throw; a mask_mod that also has classify_block() (see classified_mask_mod) lets whole
/// tiles be skipped or left unchecked.
template <class Q, class K, class V, class O, class MaskMod = NoMaskMod,
          class ScoreMod = NoScoreMod>
void attention(const Eigen::MatrixBase<Q>& q, const Eigen::MatrixBase<K>& k,
               const Eigen::MatrixBase<V>& v, const Eigen::MatrixBase<O>& out,
               const AttentionOptions& options = {},
               Span<accumulator_t<typename Q::Scalar>> lse = {}, const MaskMod& mask_mod = {},
               const ScoreMod& score_mod = {}) {
  using T = typename Q::Scalar;
  using KT = typename K::Scalar;
  detail::check_attention_types<T, KT, typename V::Scalar, typename O::Scalar>();
  detail::check_matrix_arguments<T, Q, O>();
  detail::check_matrix_arguments<KT, K, V>();
  detail::check_matrix_outputs<O>();
  detail::attention_impl<T, KT>(ConstMatrixView<T>(q.derived()), ConstMatrixView<KT>(k.derived()),
                                ConstMatrixView<KT>(v.derived()), detail::writable_view(out),
                                options, lse, mask_mod, score_mod);
}

// --- multi-head, batched -----------------------------------------------------------------------

/// Batched multi-head attention on strided [batch, seq, heads, dim] views (BSHD, BHSD or a slice
/// of a fused QKV buffer: strides are free). Query head h reads key/value head
/// h / (q.heads / k.heads) (GQA; MQA when k.heads == 1), without copies. options.key_lengths
/// ([batch]) marks padding; options.alibi_slopes is [q.heads]; mask_mod / score_mod receive the
/// batch index and the query head. Work is split over batch × heads × query chunks.
/// Element types as the single-head form, deduced (q, k, v may be TensorView<T> or
/// TensorView<const T>; out is TensorView<T>): float, double, Eigen::bfloat16 or Eigen::half, and
/// float q/out over a bfloat16 or half K/V cache.
/// Shapes: q [B, n_q, H, d], k [B, n_k, H_kv, d], v [B, n_k, H_kv, d_v], out [B, n_q, H, d_v],
/// lse (optional) [B, H, n_q] contiguous. Otherwise as the single-head attention(): same cost per
/// head, same extra memory, same errors (also: H not a multiple of H_kv), same guarantees.
template <class QT, class KT, class VT, class OT, class MaskMod = NoMaskMod,
          class ScoreMod = NoScoreMod>
void attention(TensorView<QT> q, TensorView<KT> k, TensorView<VT> v, TensorView<OT> out,
               const AttentionOptions& options = {},
               Span<accumulator_t<std::remove_const_t<QT>>> lse = {}, const MaskMod& mask_mod = {},
               const ScoreMod& score_mod = {}) {
  using T = std::remove_const_t<QT>;
  using KS = std::remove_const_t<KT>;
  detail::check_attention_types<T, KS, std::remove_const_t<VT>, std::remove_const_t<OT>>();
  static_assert(!std::is_const_v<OT>, "blockattn: out must be a writable TensorView<T>");
  detail::attention_impl<T, KS>(TensorView<const T>(q), TensorView<const KS>(k),
                                TensorView<const KS>(v), out, options, lse, mask_mod, score_mod);
}

// --- merging partial results -------------------------------------------------------------------

/// One partial attention result over a subset of the keys: the output rows `out` [n_q, d_v] and
/// their log-sum-exp `lse` [n_q] (natural log, attention()'s). The element type P of the parts
/// may differ from the merged output's (float partials for every storage type); lse is
/// accumulator_t<P>. A row with lse −inf (no visible key) is an empty part: its out is not read.
template <class P>
struct AttentionState {
  using value_type = P;              ///< the parts' element type
  ConstMatrixView<P> out;            ///< [n_q, d_v]
  Span<const accumulator_t<P>> lse;  ///< [n_q]
};

/// One partial multi-head result: out [batch, n_q, heads, d_v] and lse [batch, heads, n_q]
/// contiguous (the layouts of the TensorView attention()).
template <class P>
struct TensorAttentionState {
  using value_type = P;              ///< the parts' element type
  TensorView<const P> out;           ///< [batch, n_q, heads, d_v]
  Span<const accumulator_t<P>> lse;  ///< [batch, heads, n_q]
};

/// Natural-log log-sum-exp to base 2 (FlashInfer's convention: its merge_state and its lse
/// outputs hold log2 Σ exp(s)): lse / ln 2. −inf and NaN stay as they are. O(1).
template <class T>
constexpr T lse_to_base2(T lse) {
  return lse * T(1.44269504088896340735992468100189214L);  // log2(e)
}

/// Base-2 log-sum-exp (FlashInfer's) to the natural log that blockattn uses: lse2 · ln 2.
/// −inf and NaN stay as they are. O(1).
template <class T>
constexpr T lse_from_base2(T lse2) {
  return lse2 * T(0.693147180559945309417232121458176568L);  // ln 2
}

/// lse_to_base2() on every element of `lse`, in place. O(n), no extra memory.
template <class T>
void lse_to_base2(Span<T> lse) {
  for (T& x : lse) x = lse_to_base2(x);
}

/// lse_from_base2() on every element of `lse`, in place. O(n), no extra memory.
template <class T>
void lse_from_base2(Span<T> lse) {
  for (T& x : lse) x = lse_from_base2(x);
}

namespace detail {

/// A view of the parts of a merge (a std::vector, std::array or Span of AttentionState /
/// TensorAttentionState).
template <class Parts>
auto parts_span(const Parts& parts) {
  using Part = std::remove_cv_t<std::remove_reference_t<decltype(*parts.data())>>;
  return Span<const Part>(parts.data(), static_cast<Index>(parts.size()));
}

/// Merges row i of every part into out_row (d_v values of type O) and lse_out (may be null):
/// the state starts as part `first` (the one out aliases, if any, else 0) and takes the others in
/// order through merge_row(), then is finalised. `row(p)` gives part p's out row, `lse(p)` its
/// lse for this row. A part with lse −inf is the empty state (m −inf, l 0), a finite one is
/// (m = lse, l = 1, acc = out); NaN makes the row NaN. O(parts·d_v), no extra memory: the
/// running output lives in out_row.
template <class A, class O, class Row, class Lse>
void merge_parts_row(Index parts, Index first, const Row& row, const Lse& lse, O* out_row,
                     Index d_v, A* lse_out) {
  A m = kNegativeInfinity<A>;
  A l = A(0);
  // The first part: out_row := its out (nothing to copy when out aliases it).
  {
    const A part_lse = lse(first);
    const auto* src = row(first);
    if (part_lse == kNegativeInfinity<A>) {
      for (Index c = 0; c < d_v; ++c) out_row[c] = O(0);
    } else {
      if (static_cast<const void*>(src) != static_cast<const void*>(out_row)) {
        for (Index c = 0; c < d_v; ++c) out_row[c] = static_cast<O>(src[c]);
      }
      m = part_lse;
      l = std::isnan(part_lse) ? part_lse : A(1);
    }
  }
  for (Index p = 0; p < parts; ++p) {
    const A part_lse = lse(p);
    if (p == first || part_lse == kNegativeInfinity<A>) continue;  // empty: the identity
    merge_row(m, l, out_row, part_lse, A(1), row(p), d_v);
  }
  finalize_row(m, l, out_row, out_row, d_v, lse_out);
}

/// Columns per block of the float buffers of a merge that involves a 16-bit format (1 KiB each,
/// on the stack).
inline constexpr Index kMergeColumns = 256;

/// merge_parts_row() when the output O or the parts' P is bfloat16 or half (and A is float): the
/// merge runs kMergeColumns columns at a time in two stack buffers of A, the running output and
/// the current part's row block (a 16-bit part is widened into it with StorageIo; a float part is
/// read in place), so each column goes through exactly the float merge's arithmetic — the same
/// merge_row<A, A, A> as float parts into a float output — and out_row is written once per block
/// (a 16-bit O rounded once). Hence bitwise round(float merge of the widened parts). The finiteness
/// test that lets a part of weight 0 be skipped (merge_row) sees one block only: with d_v >
/// kMergeColumns that can change the sign of a zero in a row that holds inf or NaN, nothing else.
/// lse_out is written after the last block has read every part's lse (it may be one of them).
/// O(parts·d_v), no heap.
template <class A, class O, class Row, class Lse>
void merge_parts_row_blocked(Index parts, Index first, const Row& row, const Lse& lse, O* out_row,
                             Index d_v, A* lse_out) {
  static_assert(std::is_same_v<A, float>, "blockattn: 16-bit formats merge in float");
  A acc[kMergeColumns];
  A part[kMergeColumns];
  Index c0 = 0;
  do {
    const Index width = std::min(kMergeColumns, d_v - c0);
    const bool last = c0 + width >= d_v;
    const auto part_block = [&](Index p) -> const A* {
      const auto* src = row(p) + c0;
      if constexpr (std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(src)>>, A>) {
        return src;
      } else {
        widen(src, width, part);
        return part;
      }
    };
    merge_parts_row<A>(parts, first, part_block, lse, acc, width,
                       last ? lse_out : static_cast<A*>(nullptr));
    if constexpr (std::is_same_v<O, A>) {
      std::copy(acc, acc + width, out_row + c0);
    } else {
      narrow(acc, width, out_row + c0);
    }
    c0 += width;
  } while (c0 < d_v);
}

/// The merge of one row into an output of type O: in place in out_row when neither O nor the
/// parts are 16-bit (or O is double), else merge_parts_row_blocked().
template <class A, class O, class Row, class Lse>
void merge_row_into(Index parts, Index first, const Row& row, const Lse& lse, O* out_row, Index d_v,
                    A* lse_out) {
  using P = std::remove_cv_t<std::remove_pointer_t<decltype(row(Index(0)))>>;
  if constexpr ((kIs16BitFloat<O> || kIs16BitFloat<P>)&&std::is_same_v<A, float>) {
    merge_parts_row_blocked<A>(parts, first, row, lse, out_row, d_v, lse_out);
  } else {
    merge_parts_row<A>(parts, first, row, lse, out_row, d_v, lse_out);
  }
}

}  // namespace detail

/// Exact merge of N attention results over disjoint key sets of the same queries: the (out, lse)
/// of attention over the union of the keys. With m = max_p lse_p, out = Σ_p exp(lse_p − m)·out_p
/// / Σ_p exp(lse_p − m) and lse = m + log Σ_p exp(lse_p − m), computed part by part through the
/// one online-softmax merge rule (detail/online_state.hpp), so the result is independent of the
/// order of the parts up to rounding (associative and commutative). An empty part (lse −inf, out
/// anything: no visible key) is the identity; all parts empty gives out 0, lse −inf. NaN follows
/// the README's policy: a NaN lse_p[i] gives a NaN row i (out and lse), and a NaN in a part's out
/// reaches out even when that part's weight underflows to 0. The basis of split-KV decode and of
/// distributed attention. lse is natural-log (lse_to_base2 / lse_from_base2 convert FlashInfer's).
/// `parts`: a std::vector, std::array or Span of AttentionState<P>, at least one.
/// Element types: out float, double, Eigen::bfloat16 or Eigen::half, deduced; the parts' P any of
/// the four. The merge runs in accumulator_t of out's type (float for the 16-bit formats, with
/// float lse); a 16-bit out is rounded once at the end, bitwise round(the float merge).
/// Shapes: every parts[p].out [n_q, d_v], parts[p].lse [n_q] (required); out [n_q, d_v]; lse
/// [n_q] or empty. Time O(N·n_q·d_v) over `threads` threads (0: all; rows are independent, so
/// the result is bitwise the same for any count), no extra memory.
/// Throws std::invalid_argument naming the part, the argument and both sizes (shape mismatch, a
/// missing or too-short lse, no parts, an overlap), before writing. out may be exactly one part's
/// out (same data and stride; it then starts the merge), lse exactly one part's lse; any other
/// overlap is rejected.
template <class Parts, class O>
void merge_attention_states(const Parts& parts_, const Eigen::MatrixBase<O>& out_,
                            Span<accumulator_t<typename O::Scalar>> lse = {}, int threads = 0) {
  using T = typename O::Scalar;
  using A = accumulator_t<T>;
  const auto parts = detail::parts_span(parts_);
  using P = typename std::remove_const_t<typename decltype(parts)::element_type>::value_type;
  static_assert(detail::kStorageScalar<T>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
  static_assert(detail::kStorageScalar<P>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
  detail::check_matrix_arguments<T, O>();
  detail::check_matrix_outputs<O>();
  MatrixView<T> out = detail::writable_view(out_);
  const char* function = "merge_attention_states";
  detail::require(!parts.empty(), function, "parts is empty (at least one part to merge)");
  detail::require(threads >= 0, function, "threads is ", threads, " but must be >= 0 (0: all)");
  const Index n_q = parts[0].out.rows();
  const Index d_v = parts[0].out.cols();
  Index aliased = -1;
  const detail::AddressRange out_range = detail::view_range(out);
  for (Index p = 0; p < parts.size(); ++p) {
    const auto& part = parts[p];
    const std::string name = detail::concat("parts[", p, "]");
    detail::require_size(function, (name + ".out.rows()").c_str(), part.out.rows(),
                         "parts[0].out.rows()", n_q, "every part holds the same queries");
    detail::require_size(function, (name + ".out.cols()").c_str(), part.out.cols(),
                         "parts[0].out.cols()", d_v, "every part has the same head dimension");
    detail::require_span(function, (name + ".lse").c_str(), part.lse,
                         (name + ".out.rows()").c_str(), n_q, "one log-sum-exp per query",
                         /*required=*/true);
  }
  detail::require_size(function, "out.rows()", out.rows(), "parts[0].out.rows()", n_q,
                       "one output row per query");
  detail::require_size(function, "out.cols()", out.cols(), "parts[0].out.cols()", d_v,
                       "the parts' head dimension");
  detail::require_span(function, "lse", lse, "out.rows()", n_q, "one log-sum-exp per query",
                       /*required=*/false);
  for (Index p = 0; p < parts.size(); ++p) {
    const auto& part = parts[p];
    const std::string name = detail::concat("parts[", p, "].out");
    const bool same =
        static_cast<const void*>(part.out.data()) == static_cast<const void*>(out.data()) &&
        std::is_same_v<P, T> && (part.out.outerStride() == out.outerStride() || n_q <= 1);
    if (same && aliased < 0) {
      aliased = p;
    } else {
      detail::require_disjoint(function, "out", out_range, name.c_str(),
                               detail::view_range(part.out));
    }
    if (!lse.empty()) {
      const detail::AddressRange lse_range = detail::address_range(lse.data(), 1, n_q, n_q);
      const bool same_lse =
          static_cast<const void*>(part.lse.data()) == static_cast<const void*>(lse.data());
      if (!same_lse) {
        detail::require_disjoint(function, "lse", lse_range,
                                 detail::concat("parts[", p, "].lse").c_str(),
                                 detail::address_range(part.lse.data(), 1, n_q, n_q));
      }
      detail::require_disjoint(function, "lse", lse_range, name.c_str(),
                               detail::view_range(part.out));
    }
  }
  if (!lse.empty()) {
    detail::require_disjoint(function, "lse", detail::address_range(lse.data(), 1, n_q, n_q), "out",
                             out_range);
  }
  const Index first = aliased >= 0 ? aliased : 0;
  detail::parallel_for(n_q, detail::resolve_threads(threads, n_q), [&](Index i, int) {
    detail::merge_row_into<A>(
        parts.size(), first, [&](Index p) { return parts[p].out.row(i).data(); },
        [&](Index p) { return static_cast<A>(parts[p].lse[i]); }, out.row(i).data(), d_v,
        lse.empty() ? static_cast<A*>(nullptr) : lse.data() + i);
  });
}

/// merge_attention_states() of two parts: (out_a, lse_a) ⊕ (out_b, lse_b) → (out, lse), as
/// merge_attention_states({{out_a, lse_a}, {out_b, lse_b}}, out, lse) (messages name the parts
/// parts[0] and parts[1]). out may be exactly out_a or out_b, lse exactly lse_a or lse_b. Single
/// thread; O(n_q·d_v), no extra memory.
template <class A_, class B, class O>
void merge_attention_states(const Eigen::MatrixBase<A_>& out_a,
                            Span<const accumulator_t<typename A_::Scalar>> lse_a,
                            const Eigen::MatrixBase<B>& out_b,
                            Span<const accumulator_t<typename A_::Scalar>> lse_b,
                            const Eigen::MatrixBase<O>& out,
                            Span<accumulator_t<typename O::Scalar>> lse = {}) {
  using P = typename A_::Scalar;
  static_assert(detail::kStorageScalar<typename O::Scalar>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
  detail::check_matrix_arguments<P, A_, B>();
  const std::array<AttentionState<P>, 2> parts = {
      AttentionState<P>{ConstMatrixView<P>(out_a.derived()), lse_a},
      AttentionState<P>{ConstMatrixView<P>(out_b.derived()), lse_b}};
  merge_attention_states(parts, out, lse, /*threads=*/1);
}

/// Exact merge of N multi-head attention results over disjoint key sets (split-KV over segments,
/// threads or processes): merge_attention_states() applied to every (batch, head) and query row.
/// `parts`: a std::vector, std::array or Span of TensorAttentionState<P>, at least one.
/// Shapes: every parts[p].out [B, n_q, H, d_v] (any strides), parts[p].lse [B, H, n_q]
/// contiguous (required); out [B, n_q, H, d_v]; lse [B, H, n_q] or empty. Time O(N·B·H·n_q·d_v)
/// over `threads` threads (0: all), bitwise the same for any count; no extra memory. Same
/// rules as the single-head form otherwise (out may be exactly one part's out).
template <class Parts, class OT>
void merge_attention_states(const Parts& parts_, TensorView<OT> out,
                            Span<accumulator_t<OT>> lse = {}, int threads = 0) {
  using T = OT;
  using A = accumulator_t<T>;
  const auto parts = detail::parts_span(parts_);
  using P = typename std::remove_const_t<typename decltype(parts)::element_type>::value_type;
  static_assert(detail::kStorageScalar<std::remove_const_t<T>>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
  static_assert(!std::is_const_v<T>, "blockattn: out must be a writable TensorView<T>");
  static_assert(detail::kStorageScalar<P>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
  const char* function = "merge_attention_states";
  detail::require(!parts.empty(), function, "parts is empty (at least one part to merge)");
  detail::require(threads >= 0, function, "threads is ", threads, " but must be >= 0 (0: all)");
  const TensorView<const P>& first_out = parts[0].out;
  const std::array<Index, 4> dims = {first_out.batch, first_out.seq, first_out.heads,
                                     first_out.dim};
  const char* const axes[4] = {"batch", "seq", "heads", "dim"};
  const auto check_dims = [&](const std::string& name, const std::array<Index, 4>& actual) {
    for (std::size_t a = 0; a < 4; ++a) {
      detail::require(actual[a] >= 0, function, name, ".", axes[a], " is ", actual[a],
                      " but must be >= 0");
      detail::require_size(function, (name + "." + axes[a]).c_str(), actual[a],
                           (std::string("parts[0].out.") + axes[a]).c_str(), dims[a],
                           "every part and the output have the same shape");
    }
  };
  const Index count = dims[0] * dims[1] * dims[2];
  const bool empty = count == 0 || dims[3] == 0;
  const detail::AddressRange out_range = detail::tensor_range(out);
  check_dims("out", {out.batch, out.seq, out.heads, out.dim});
  detail::require(empty || out.data != nullptr, function, "out.data is null for a non-empty merge");
  detail::require(empty || detail::elements_distinct(out), function, "out's strides make ",
                  "elements of out share memory (every output element needs its own address)");
  detail::require_span(function, "lse", lse, "batch·heads·n_q", count,
                       "one log-sum-exp per query row, [batch, heads, n_q]", /*required=*/false);
  Index aliased = -1;
  for (Index p = 0; p < parts.size(); ++p) {
    const auto& part = parts[p];
    const std::string name = detail::concat("parts[", p, "]");
    check_dims(name + ".out", {part.out.batch, part.out.seq, part.out.heads, part.out.dim});
    detail::require(empty || part.out.data != nullptr, function, name,
                    ".out.data is null for a non-empty merge");
    detail::require_span(function, (name + ".lse").c_str(), part.lse, "batch·heads·n_q", count,
                         "one log-sum-exp per query row, [batch, heads, n_q]", /*required=*/true);
    const bool same =
        static_cast<const void*>(part.out.data) == static_cast<const void*>(out.data) &&
        std::is_same_v<P, T> && part.out.batch_stride == out.batch_stride &&
        part.out.seq_stride == out.seq_stride && part.out.head_stride == out.head_stride;
    if (same && aliased < 0) {
      aliased = p;
    } else {
      detail::require_disjoint(function, "out", out_range, (name + ".out").c_str(),
                               detail::tensor_range(part.out));
    }
    if (!lse.empty()) {
      const detail::AddressRange lse_range = detail::address_range(lse.data(), 1, count, count);
      if (static_cast<const void*>(part.lse.data()) != static_cast<const void*>(lse.data())) {
        detail::require_disjoint(function, "lse", lse_range, (name + ".lse").c_str(),
                                 detail::address_range(part.lse.data(), 1, count, count));
      }
      detail::require_disjoint(function, "lse", lse_range, (name + ".out").c_str(),
                               detail::tensor_range(part.out));
    }
  }
  if (!lse.empty()) {
    detail::require_disjoint(function, "lse", detail::address_range(lse.data(), 1, count, count),
                             "out", out_range);
  }
  if (empty) return;
  const Index first = aliased >= 0 ? aliased : 0;
  const Index heads = dims[2];
  const Index n_q = dims[1];
  const Index d_v = dims[3];
  const Index slices = dims[0] * heads;
  detail::parallel_for(slices, detail::resolve_threads(threads, slices), [&](Index bh, int) {
    const Index b = bh / heads;
    const Index h = bh % heads;
    for (Index i = 0; i < n_q; ++i) {
      const Index at = bh * n_q + i;  // lse index [b, h, i]
      detail::merge_row_into<A>(
          parts.size(), first, [&](Index p) { return parts[p].out.at(b, i, h); },
          [&](Index p) { return static_cast<A>(parts[p].lse[at]); }, out.at(b, i, h), d_v,
          lse.empty() ? static_cast<A*>(nullptr) : lse.data() + at);
    }
  });
}

}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
