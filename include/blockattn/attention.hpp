#pragma once
// attention(): exact chunked attention (Rabe & Staats 2021) on single-head Eigen views and on
// batched multi-head strided tensors (GQA/MQA), with every mask of mask.hpp, the optional
// log-sum-exp, and merge_attention_states() for results over disjoint key sets.

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <type_traits>

#include <Eigen/Core>

#include <blockattn/detail/attention_kernel.hpp>
#include <blockattn/detail/check.hpp>
#include <blockattn/detail/online_state.hpp>
#include <blockattn/detail/workspace.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

namespace blockattn {

namespace detail {

/// Address range of a strided 4-D view (any stride signs).
template <class T>
AddressRange tensor_range(const TensorView<T>& t) {
  if (t.data == nullptr || t.batch <= 0 || t.seq <= 0 || t.heads <= 0 || t.dim <= 0) return {};
  Index lo = 0;
  Index hi = 0;
  for (const Index extent : {(t.batch - 1) * t.batch_stride, (t.seq - 1) * t.seq_stride,
                             (t.heads - 1) * t.head_stride}) {
    (extent < 0 ? lo : hi) += extent;
  }
  return {t.data + lo, t.data + hi + t.dim};
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
  if (options.key_lengths != nullptr) {
    for (Index b = 0; b < batch; ++b) {
      const Index length = options.key_lengths[b];
      require(length >= 0 && length <= n_k, function, "options.key_lengths[", b, "] is ", length,
              " but must be in [0, ", n_k, "] (n_k, the keys' sequence length)");
    }
  }
  if (options.alibi_slopes != nullptr) {
    for (Index h = 0; h < q_heads; ++h) {
      require(std::isfinite(options.alibi_slopes[h]), function, "options.alibi_slopes[", h, "] is ",
              options.alibi_slopes[h], " but must be finite");
    }
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

/// Checks every argument of the single-head attention() before anything is written.
template <class T>
void validate_attention(const char* function, const ConstMatrixView<T>& q,
                        const ConstMatrixView<T>& k, const ConstMatrixView<T>& v,
                        const MatrixView<T>& out, const AttentionOptions& options, const T* lse) {
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
  if (lse != nullptr) {
    const AddressRange lse_range = address_range(lse, 1, q.rows(), q.rows());
    require_disjoint(function, "lse", lse_range, "q", view_range(q));
    require_disjoint(function, "lse", lse_range, "k", view_range(k));
    require_disjoint(function, "lse", lse_range, "v", view_range(v));
    require_disjoint(function, "lse", lse_range, "out", out_range);
  }
}

/// Checks every argument of the TensorView attention() before anything is written.
template <class T>
void validate_attention(const char* function, const TensorView<const T>& q,
                        const TensorView<const T>& k, const TensorView<const T>& v,
                        const TensorView<T>& out, const AttentionOptions& options, const T* lse) {
  for (const auto& [name, t] :
       {std::pair<const char*, const TensorView<const T>*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    require(t->batch >= 0 && t->seq >= 0 && t->heads >= 0 && t->dim >= 0, function, name,
            " has a negative size [", t->batch, ", ", t->seq, ", ", t->heads, ", ", t->dim, "]");
  }
  require(q.dim > 0, function, "q.dim is 0 (the head dimension must be positive)");
  require_size(function, "k.dim", k.dim, "q.dim", q.dim, "head dimensions must match");
  require_size(function, "k.batch", k.batch, "q.batch", q.batch, "one key set per sequence");
  require_size(function, "v.batch", v.batch, "q.batch", q.batch, "one value set per sequence");
  require_size(function, "v.seq", v.seq, "k.seq", k.seq, "every key needs one value");
  require_size(function, "v.heads", v.heads, "k.heads", k.heads,
               "keys and values have the same heads");
  require(k.heads > 0, function, "k.heads is 0 (at least one key/value head)");
  require(q.heads % k.heads == 0, function, "q.heads is ", q.heads, " but k.heads is ", k.heads,
          " (the number of query heads must be a multiple of the key/value heads)");
  require_size(function, "out.batch", out.batch, "q.batch", q.batch, "one output per sequence");
  require_size(function, "out.seq", out.seq, "q.seq", q.seq, "one output row per query");
  require_size(function, "out.heads", out.heads, "q.heads", q.heads, "one output per query head");
  require_size(function, "out.dim", out.dim, "v.dim", v.dim,
               "the output has the values' head dimension");
  const bool empty = q.batch == 0 || q.seq == 0 || q.heads == 0;
  require(empty || (q.data != nullptr && out.data != nullptr), function,
          "q.data or out.data is null for a non-empty problem");
  require(empty || k.seq == 0 || (k.data != nullptr && v.data != nullptr), function,
          "k.data or v.data is null for a non-empty problem");
  require(empty || elements_distinct(out), function, "out's strides [", out.batch_stride, ", ",
          out.seq_stride, ", ", out.head_stride, "] make elements of out [", out.batch, ", ",
          out.seq, ", ", out.heads, ", ", out.dim,
          "] share memory (every output element needs its own address)");
  validate_attention_options(function, options, q.batch, q.heads, q.seq, k.seq);
  const AddressRange out_range = tensor_range(out);
  require_disjoint(function, "out", out_range, "q", tensor_range(q));
  require_disjoint(function, "out", out_range, "k", tensor_range(k));
  require_disjoint(function, "out", out_range, "v", tensor_range(v));
  if (lse != nullptr) {
    const Index count = q.batch * q.heads * q.seq;
    const AddressRange lse_range = address_range(lse, 1, count, count);
    require_disjoint(function, "lse", lse_range, "q", tensor_range(q));
    require_disjoint(function, "lse", lse_range, "k", tensor_range(k));
    require_disjoint(function, "lse", lse_range, "v", tensor_range(v));
    require_disjoint(function, "lse", lse_range, "out", out_range);
  }
}

/// A single-head view as a [1, rows, 1, cols] tensor (no copy).
template <class T, class View>
TensorView<T> as_tensor(const View& x) {
  return TensorView<T>(const_cast<T*>(x.data()), 1, x.rows(), 1, x.cols(), /*batch_stride=*/0,
                       x.outerStride(), /*head_stride=*/0);
}

}  // namespace detail

// --- single head -------------------------------------------------------------------------------

/// Exact single-head attention, out = softmax(scale·q·kᵀ + modifiers, masked)·v, never forming
/// the n_q×n_k scores (Rabe & Staats 2021): query chunks × key chunks, each tile's scores a small
/// matrix product, merged through the online-softmax state, normalised once at the end. Every
/// mask and modifier of AttentionOptions applies (see mask.hpp for their exact meaning); the
/// optional mask_mod(b, h, i, j) -> bool and score_mod(s, b, h, i, j) -> s are called with
/// b = h = 0. Tiles the masks hide entirely cost nothing.
/// Shapes: q [n_q, d], k [n_k, d], v [n_k, d_v], out [n_q, d_v], lse (optional) [n_q] receives
/// log Σ_j exp(s_ij) over the visible keys. A query with no visible key gets out = 0, lse = −inf.
/// Time O(n_q·n_k·(d + d_v)) for the visible tiles; extra memory
/// O(threads·query_chunk·(key_chunk + d + d_v)), independent of n, plus for decode (at most 8
/// query rows per kv head) O(n_k/8192·rows·d_v) partial states, and for prefill with under 4
/// query blocks at most 8 blocks' partial outputs, O(query_chunk·d_v) (an input that does not bind
/// to ConstMatrixView without a copy — column-major, an expression — costs a copy; see types.hpp).
/// Throws std::invalid_argument naming the argument and both sizes, before writing anything.
/// out and lse must not alias q, k, v or each other. Bitwise identical for any thread count;
/// chunk sizes change rounding only. Safe to call concurrently (no shared state). mask_mod and
/// score_mod are called from several threads at once and must not throw; a mask_mod that also
/// has classify_block() (see classified_mask_mod) lets whole tiles be skipped or left unchecked.
template <class T, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention(ConstMatrixView<T> q, ConstMatrixView<T> k, ConstMatrixView<T> v, MatrixView<T> out,
               const AttentionOptions& options = {}, T* lse = nullptr, const MaskMod& mask_mod = {},
               const ScoreMod& score_mod = {}) {
  Workspace workspace;
  attention<T, MaskMod, ScoreMod>(workspace, q, k, v, out, options, lse, mask_mod, score_mod);
}

/// attention() with a caller-supplied blockattn::Workspace (detail/workspace.hpp): the same result,
/// bitwise; the tile buffers come from `workspace`, which grows to fit on the first call (or when a
/// call needs more) and is reused afterwards, so repeated calls of the same shape — decode, one
/// token at a time — allocate nothing. One Workspace per concurrent call.
template <class T, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention(Workspace& workspace, ConstMatrixView<T> q, ConstMatrixView<T> k,
               ConstMatrixView<T> v, MatrixView<T> out, const AttentionOptions& options = {},
               T* lse = nullptr, const MaskMod& mask_mod = {}, const ScoreMod& score_mod = {}) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "blockattn: attention() runs on float and double (its SIMD micro-kernels); use "
                "reference::attention for long double");
  detail::check_mods<T, MaskMod, ScoreMod>();
  detail::validate_attention<T>("attention", q, k, v, out, options, lse);
  detail::attention_forward<T>(detail::as_tensor<const T>(q), detail::as_tensor<const T>(k),
                               detail::as_tensor<const T>(v), detail::as_tensor<T>(out), options,
                               lse, mask_mod, score_mod, workspace);
}

// float/double overloads: `template <int = 0>`, instantiated only where called (detail/config.hpp).
/// attention() with a Workspace on float arguments without spelling T.
template <int = 0>
inline void attention(Workspace& workspace, ConstMatrixView<float> q, ConstMatrixView<float> k,
                      ConstMatrixView<float> v, MatrixView<float> out,
                      const AttentionOptions& options = {}, float* lse = nullptr) {
  attention<float>(workspace, q, k, v, out, options, lse);
}

/// attention() with a Workspace on double arguments without spelling T.
template <int = 0>
inline void attention(Workspace& workspace, ConstMatrixView<double> q, ConstMatrixView<double> k,
                      ConstMatrixView<double> v, MatrixView<double> out,
                      const AttentionOptions& options = {}, double* lse = nullptr) {
  attention<double>(workspace, q, k, v, out, options, lse);
}

/// attention() on float arguments without spelling T (see STYLE §2.3).
template <int = 0>
inline void attention(ConstMatrixView<float> q, ConstMatrixView<float> k, ConstMatrixView<float> v,
                      MatrixView<float> out, const AttentionOptions& options = {},
                      float* lse = nullptr) {
  attention<float>(q, k, v, out, options, lse);
}

/// attention() on double arguments without spelling T.
template <int = 0>
inline void attention(ConstMatrixView<double> q, ConstMatrixView<double> k,
                      ConstMatrixView<double> v, MatrixView<double> out,
                      const AttentionOptions& options = {}, double* lse = nullptr) {
  attention<double>(q, k, v, out, options, lse);
}

/// attention() with user functors on float arguments without spelling T.
template <class MaskMod, class ScoreMod = NoScoreMod>
void attention(ConstMatrixView<float> q, ConstMatrixView<float> k, ConstMatrixView<float> v,
               MatrixView<float> out, const AttentionOptions& options, float* lse,
               const MaskMod& mask_mod, const ScoreMod& score_mod = {}) {
  attention<float, MaskMod, ScoreMod>(q, k, v, out, options, lse, mask_mod, score_mod);
}

/// attention() with user functors on double arguments without spelling T.
template <class MaskMod, class ScoreMod = NoScoreMod>
void attention(ConstMatrixView<double> q, ConstMatrixView<double> k, ConstMatrixView<double> v,
               MatrixView<double> out, const AttentionOptions& options, double* lse,
               const MaskMod& mask_mod, const ScoreMod& score_mod = {}) {
  attention<double, MaskMod, ScoreMod>(q, k, v, out, options, lse, mask_mod, score_mod);
}

// --- multi-head, batched -----------------------------------------------------------------------

/// Batched multi-head attention on strided [batch, seq, heads, dim] views (BSHD, BHSD or a slice
/// of a fused QKV buffer: strides are free). Query head h reads key/value head
/// h / (q.heads / k.heads) (GQA; MQA when k.heads == 1), without copies. options.key_lengths
/// ([batch]) marks padding; options.alibi_slopes is [q.heads]; mask_mod / score_mod receive the
/// batch index and the query head. Work is split over batch × heads × query chunks.
/// Shapes: q [B, n_q, H, d], k [B, n_k, H_kv, d], v [B, n_k, H_kv, d_v], out [B, n_q, H, d_v],
/// lse (optional) [B, H, n_q] contiguous. Otherwise as the single-head attention(): same cost per
/// head, same extra memory, same errors (also: H not a multiple of H_kv), same guarantees.
template <class T, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v,
               TensorView<T> out, const AttentionOptions& options = {}, T* lse = nullptr,
               const MaskMod& mask_mod = {}, const ScoreMod& score_mod = {}) {
  Workspace workspace;
  attention<T, MaskMod, ScoreMod>(workspace, q, k, v, out, options, lse, mask_mod, score_mod);
}

/// TensorView attention() with a caller-supplied Workspace (reused across calls; see the
/// single-head overload).
template <class T, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention(Workspace& workspace, TensorView<const T> q, TensorView<const T> k,
               TensorView<const T> v, TensorView<T> out, const AttentionOptions& options = {},
               T* lse = nullptr, const MaskMod& mask_mod = {}, const ScoreMod& score_mod = {}) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "blockattn: attention() runs on float and double (its SIMD micro-kernels); use "
                "reference::attention for long double");
  detail::check_mods<T, MaskMod, ScoreMod>();
  detail::validate_attention<T>("attention", q, k, v, out, options, lse);
  detail::attention_forward<T>(q, k, v, out, options, lse, mask_mod, score_mod, workspace);
}

/// TensorView attention() with a Workspace on float arguments without spelling T.
template <int = 0>
inline void attention(Workspace& workspace, TensorView<const float> q, TensorView<const float> k,
                      TensorView<const float> v, TensorView<float> out,
                      const AttentionOptions& options = {}, float* lse = nullptr) {
  attention<float>(workspace, q, k, v, out, options, lse);
}

/// TensorView attention() with a Workspace on double arguments without spelling T.
template <int = 0>
inline void attention(Workspace& workspace, TensorView<const double> q, TensorView<const double> k,
                      TensorView<const double> v, TensorView<double> out,
                      const AttentionOptions& options = {}, double* lse = nullptr) {
  attention<double>(workspace, q, k, v, out, options, lse);
}

/// TensorView attention() on float arguments without spelling T.
template <int = 0>
inline void attention(TensorView<const float> q, TensorView<const float> k,
                      TensorView<const float> v, TensorView<float> out,
                      const AttentionOptions& options = {}, float* lse = nullptr) {
  attention<float>(q, k, v, out, options, lse);
}

/// TensorView attention() on double arguments without spelling T.
template <int = 0>
inline void attention(TensorView<const double> q, TensorView<const double> k,
                      TensorView<const double> v, TensorView<double> out,
                      const AttentionOptions& options = {}, double* lse = nullptr) {
  attention<double>(q, k, v, out, options, lse);
}

/// TensorView attention() with user functors on float arguments without spelling T.
template <class MaskMod, class ScoreMod = NoScoreMod>
void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
               TensorView<float> out, const AttentionOptions& options, float* lse,
               const MaskMod& mask_mod, const ScoreMod& score_mod = {}) {
  attention<float, MaskMod, ScoreMod>(q, k, v, out, options, lse, mask_mod, score_mod);
}

/// TensorView attention() with user functors on double arguments without spelling T.
template <class MaskMod, class ScoreMod = NoScoreMod>
void attention(TensorView<const double> q, TensorView<const double> k, TensorView<const double> v,
               TensorView<double> out, const AttentionOptions& options, double* lse,
               const MaskMod& mask_mod, const ScoreMod& score_mod = {}) {
  attention<double, MaskMod, ScoreMod>(q, k, v, out, options, lse, mask_mod, score_mod);
}

// --- merging partial results -------------------------------------------------------------------

/// Exact merge of two attention results over disjoint key sets A and B of the same queries:
/// (out_a, lse_a) and (out_b, lse_b) give the (out, lse) of attention over A ∪ B, as
/// w_a = exp(lse_a − lse), w_b = exp(lse_b − lse), out = w_a·out_a + w_b·out_b,
/// lse = log(exp(lse_a) + exp(lse_b)). A side with lse −inf (no visible key) contributes nothing;
/// both −inf gives out 0, lse −inf. NaN follows the README's policy: a NaN lse_a[i] or lse_b[i]
/// gives a NaN row i (out and lse), and a NaN in out_a or out_b reaches out even when its side's
/// weight underflows to 0. The basis of split-KV decode and of distributed attention.
/// Shapes: out_a, out_b, out [n_q, d_v]; lse_a, lse_b [n_q] (required); lse [n_q] or null.
/// Time O(n_q·d_v), no extra memory. Throws std::invalid_argument on a shape mismatch or a null
/// lse_a / lse_b, before writing. out may be exactly out_a or out_b (same data and stride) and lse
/// exactly lse_a or lse_b; any other overlap is rejected.
template <class T>
void merge_attention_states(ConstMatrixView<T> out_a, const T* lse_a, ConstMatrixView<T> out_b,
                            const T* lse_b, MatrixView<T> out, T* lse = nullptr) {
  static_assert(detail::kIsSupportedScalar<T>, "blockattn: T must be float, double or long double");
  const char* function = "merge_attention_states";
  detail::require_size(function, "out_b.rows()", out_b.rows(), "out_a.rows()", out_a.rows(),
                       "both parts hold the same queries");
  detail::require_size(function, "out_b.cols()", out_b.cols(), "out_a.cols()", out_a.cols(),
                       "both parts have the same head dimension");
  detail::require_size(function, "out.rows()", out.rows(), "out_a.rows()", out_a.rows(),
                       "one output row per query");
  detail::require_size(function, "out.cols()", out.cols(), "out_a.cols()", out_a.cols(),
                       "the same head dimension");
  const Index n_q = out.rows();
  detail::require(n_q == 0 || (lse_a != nullptr && lse_b != nullptr), function,
                  "lse_a and lse_b are required (", n_q, " entries each)");
  const auto same_view = [&](const ConstMatrixView<T>& x) {
    return x.data() == out.data() && (x.outerStride() == out.outerStride() || x.rows() <= 1);
  };
  const detail::AddressRange out_range = detail::view_range(out);
  if (!same_view(out_a)) {
    detail::require_disjoint(function, "out", out_range, "out_a", detail::view_range(out_a));
  }
  if (!same_view(out_b)) {
    detail::require_disjoint(function, "out", out_range, "out_b", detail::view_range(out_b));
  }
  if (lse != nullptr) {
    const detail::AddressRange lse_range = detail::address_range(lse, 1, n_q, n_q);
    if (lse != lse_a) {
      detail::require_disjoint(function, "lse", lse_range, "lse_a",
                               detail::address_range(lse_a, 1, n_q, n_q));
    }
    if (lse != lse_b) {
      detail::require_disjoint(function, "lse", lse_range, "lse_b",
                               detail::address_range(lse_b, 1, n_q, n_q));
    }
    detail::require_disjoint(function, "lse", lse_range, "out", out_range);
  }
  constexpr T kEmpty = detail::kNegativeInfinity<T>;
  for (Index i = 0; i < n_q; ++i) {
    if (std::isnan(lse_a[i]) || std::isnan(lse_b[i])) {  // a NaN row stays NaN (README policy)
      out.row(i).setConstant(std::numeric_limits<T>::quiet_NaN());
      if (lse != nullptr) lse[i] = std::numeric_limits<T>::quiet_NaN();
      continue;
    }
    const T m = detail::running_max(lse_a[i], lse_b[i]);
    const T w_a = detail::rescale_factor(lse_a[i], m);  // exp(lse_a − m); 0 for an empty side
    const T w_b = detail::rescale_factor(lse_b[i], m);
    const T sum = w_a + w_b;
    if (sum == T(0) || m == kEmpty) {
      out.row(i).setZero();
      if (lse != nullptr) lse[i] = kEmpty;
      continue;
    }
    // An empty side (lse −inf) may hold anything (even NaN from a caller's buffer): skip it, do
    // not scale it. A side whose weight merely underflows to 0 is skipped only when its row is
    // finite, so that a NaN in it still reaches the merged row (0·NaN = NaN).
    if (lse_b[i] == kEmpty || (w_b == T(0) && out_b.row(i).allFinite())) {
      out.row(i) = out_a.row(i) * (w_a / sum);
    } else if (lse_a[i] == kEmpty || (w_a == T(0) && out_a.row(i).allFinite())) {
      out.row(i) = out_b.row(i) * (w_b / sum);
    } else {
      out.row(i) = (out_a.row(i) * w_a + out_b.row(i) * w_b) / sum;
    }
    if (lse != nullptr) lse[i] = m + std::log(sum);
  }
}

/// merge_attention_states() on float arguments without spelling T.
template <int = 0>
inline void merge_attention_states(ConstMatrixView<float> out_a, const float* lse_a,
                                   ConstMatrixView<float> out_b, const float* lse_b,
                                   MatrixView<float> out, float* lse = nullptr) {
  merge_attention_states<float>(out_a, lse_a, out_b, lse_b, out, lse);
}

/// merge_attention_states() on double arguments without spelling T.
template <int = 0>
inline void merge_attention_states(ConstMatrixView<double> out_a, const double* lse_a,
                                   ConstMatrixView<double> out_b, const double* lse_b,
                                   MatrixView<double> out, double* lse = nullptr) {
  merge_attention_states<double>(out_a, lse_a, out_b, lse_b, out, lse);
}

}  // namespace blockattn
