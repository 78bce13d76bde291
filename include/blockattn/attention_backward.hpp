#pragma once
// attention_backward(): the gradients dQ, dK, dV of attention(), recomputed tile by tile from the
// forward's output and log-sum-exp, never forming the n_q×n_k matrices (FlashAttention-2's
// backward; Rabe & Staats 2021, section 4). Single-head views and batched multi-head tensors
// (GQA/MQA), with every mask and built-in modifier of mask.hpp.
//
// User score_mod functors are forward-only: their derivative is unknown, so attention_backward()
// has no score_mod parameter, and passing one is a compile-time error. Masks (mask_mod) need no
// derivative and are supported.

#include <array>
#include <cstddef>
#include <initializer_list>
#include <iterator>
#include <string>
#include <utility>

#include <Eigen/Core>

#include <blockattn/attention.hpp>
#include <blockattn/detail/attention_backward_kernel.hpp>
#include <blockattn/detail/check.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

namespace blockattn {

namespace detail {

/// Every output range must be disjoint from every input range and from the other outputs.
inline void require_disjoint_outputs(
    const char* function, std::initializer_list<std::pair<const char*, AddressRange>> outputs,
    std::initializer_list<std::pair<const char*, AddressRange>> inputs) {
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    for (const auto& input : inputs) {
      require_disjoint(function, o->first, o->second, input.first, input.second);
    }
    for (auto other = std::next(o); other != outputs.end(); ++other) {
      require_disjoint(function, o->first, o->second, other->first, other->second);
    }
  }
}

/// Checks every argument of the single-head attention_backward() before anything is written:
/// the forward's checks on q, k, v, out, lse and the options, then dout, dq, dk, dv, a required
/// lse, and no output overlapping an input or another output.
template <class T>
void validate_attention_backward(const char* function, const ConstMatrixView<T>& q,
                                 const ConstMatrixView<T>& k, const ConstMatrixView<T>& v,
                                 const ConstMatrixView<T>& out, const T* lse,
                                 const ConstMatrixView<T>& dout, const MatrixView<T>& dq,
                                 const MatrixView<T>& dk, const MatrixView<T>& dv,
                                 const AttentionOptions& options) {
  // The forward's validation only reads `out`; it takes a writable view, so give it one.
  Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>> out_view(
      const_cast<T*>(out.data()), out.rows(), out.cols(), Eigen::OuterStride<>(out.outerStride()));
  validate_attention<T>(function, q, k, v, MatrixView<T>(out_view), options, lse);
  require(q.rows() == 0 || lse != nullptr, function, "lse is null but q has ", q.rows(),
          " rows (the backward pass needs the forward's log-sum-exp, one per query)");
  require_size(function, "dout.rows()", dout.rows(), "out.rows()", out.rows(),
               "one output gradient per output row");
  require_size(function, "dout.cols()", dout.cols(), "out.cols()", out.cols(),
               "the output gradient has the output's shape");
  require_size(function, "dq.rows()", dq.rows(), "q.rows()", q.rows(), "dq has q's shape");
  require_size(function, "dq.cols()", dq.cols(), "q.cols()", q.cols(), "dq has q's shape");
  require_size(function, "dk.rows()", dk.rows(), "k.rows()", k.rows(), "dk has k's shape");
  require_size(function, "dk.cols()", dk.cols(), "k.cols()", k.cols(), "dk has k's shape");
  require_size(function, "dv.rows()", dv.rows(), "v.rows()", v.rows(), "dv has v's shape");
  require_size(function, "dv.cols()", dv.cols(), "v.cols()", v.cols(), "dv has v's shape");
  const Index n_q = q.rows();
  require_disjoint_outputs(function,
                           {{"dq", view_range(dq)}, {"dk", view_range(dk)}, {"dv", view_range(dv)}},
                           {{"q", view_range(q)},
                            {"k", view_range(k)},
                            {"v", view_range(v)},
                            {"out", view_range(out)},
                            {"dout", view_range(dout)},
                            {"lse", address_range(lse, 1, n_q, n_q)}});
}

/// Checks every argument of the TensorView attention_backward() before anything is written.
template <class T>
void validate_attention_backward(const char* function, const TensorView<const T>& q,
                                 const TensorView<const T>& k, const TensorView<const T>& v,
                                 const TensorView<const T>& out, const T* lse,
                                 const TensorView<const T>& dout, const TensorView<T>& dq,
                                 const TensorView<T>& dk, const TensorView<T>& dv,
                                 const AttentionOptions& options) {
  const TensorView<T> out_view(const_cast<T*>(out.data), out.batch, out.seq, out.heads, out.dim,
                               out.batch_stride, out.seq_stride, out.head_stride);
  validate_attention<T>(function, q, k, v, out_view, options, lse);
  const Index count = q.batch * q.heads * q.seq;
  require(count == 0 || lse != nullptr, function, "lse is null but q has ", count,
          " query rows (the backward pass needs the forward's log-sum-exp, [batch, heads, n_q])");
  const auto sizes = [](const auto& t) {
    return std::array<Index, 4>{t.batch, t.seq, t.heads, t.dim};
  };
  const char* const axes[4] = {"batch", "seq", "heads", "dim"};
  const auto check_like = [&](const char* name, const std::array<Index, 4>& actual,
                              const char* like, const std::array<Index, 4>& expected,
                              const char* why) {
    for (std::size_t a = 0; a < 4; ++a) {
      const std::string what = std::string(name) + "." + axes[a];
      const std::string expected_what = std::string(like) + "." + axes[a];
      require_size(function, what.c_str(), actual[a], expected_what.c_str(), expected[a], why);
    }
  };
  check_like("dout", sizes(dout), "out", sizes(out), "the output gradient has the output's shape");
  check_like("dq", sizes(dq), "q", sizes(q), "dq has q's shape");
  check_like("dk", sizes(dk), "k", sizes(k), "dk has k's shape");
  check_like("dv", sizes(dv), "v", sizes(v), "dv has v's shape");
  const bool empty = count == 0;
  require(empty || (dout.data != nullptr && dq.data != nullptr), function,
          "dout.data or dq.data is null for a non-empty problem");
  require(q.batch == 0 || k.seq == 0 || (dk.data != nullptr && dv.data != nullptr), function,
          "dk.data or dv.data is null for a non-empty problem");
  require_disjoint_outputs(
      function, {{"dq", tensor_range(dq)}, {"dk", tensor_range(dk)}, {"dv", tensor_range(dv)}},
      {{"q", tensor_range(q)},
       {"k", tensor_range(k)},
       {"v", tensor_range(v)},
       {"out", tensor_range(out)},
       {"dout", tensor_range(dout)},
       {"lse", address_range(lse, 1, count, count)}});
}

template <class ScoreMod>
constexpr void check_backward_score_mod() {
  static_assert(!kHasScoreMod<ScoreMod>,
                "blockattn: attention_backward does not support a user score_mod (its derivative "
                "is unknown; user score mods are forward-only). Soft-capping and ALiBi are built "
                "into AttentionOptions and are supported.");
}

}  // namespace detail

// --- single head -------------------------------------------------------------------------------

/// Gradients of the single-head attention(): given the forward's q, k, v, its output `out` and
/// log-sum-exp `lse` (attention()'s optional last output — required here), and dout = ∂L/∂out,
/// writes dq = ∂L/∂q, dk = ∂L/∂k, dv = ∂L/∂v. Recomputes each tile's probabilities from lse
/// (FlashAttention-2's backward), so nothing n_q×n_k is ever stored. Same options, masks,
/// soft-capping (∂ = 1 − tanh²) and ALiBi as the forward, and the same mask_mod(b, h, i, j) with
/// b = h = 0; a user score_mod is forward-only and rejected at compile time. A query with no
/// visible key (lse = −inf) gets dq = 0 and contributes nothing to dk, dv: never NaN.
/// Shapes: q [n_q, d], k [n_k, d], v [n_k, d_v], out and dout [n_q, d_v], lse [n_q]; dq, dk, dv
/// have the shapes of q, k, v and are overwritten entirely.
/// Time O(n_q·n_k·(d + d_v)) for the visible tiles (5 tile products against the forward's 2);
/// extra memory O(threads·query_chunk·(d + 3·key_chunk)) plus one integer per query chunk,
/// independent of n otherwise.
/// Throws std::invalid_argument naming the argument and both sizes (bad shapes, null lse, an
/// output overlapping an input or another output), before writing anything.
/// Deterministic: bitwise identical for any thread count (dk, dv: one owner per key chunk; dq:
/// summed in key-chunk order); chunk sizes change rounding only.
template <class T, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention_backward(ConstMatrixView<T> q, ConstMatrixView<T> k, ConstMatrixView<T> v,
                        ConstMatrixView<T> out, const T* lse, ConstMatrixView<T> dout,
                        MatrixView<T> dq, MatrixView<T> dk, MatrixView<T> dv,
                        const AttentionOptions& options = {}, const MaskMod& mask_mod = {},
                        const ScoreMod& /*score_mod*/ = {}) {
  static_assert(detail::kIsSupportedScalar<T>, "blockattn: T must be float, double or long double");
  detail::check_mods<T, MaskMod, NoScoreMod>();
  detail::check_backward_score_mod<ScoreMod>();
  detail::validate_attention_backward<T>("attention_backward", q, k, v, out, lse, dout, dq, dk, dv,
                                         options);
  detail::attention_backward_kernel<T>(
      detail::as_tensor<const T>(q), detail::as_tensor<const T>(k), detail::as_tensor<const T>(v),
      detail::as_tensor<const T>(out), lse, detail::as_tensor<const T>(dout),
      detail::as_tensor<T>(dq), detail::as_tensor<T>(dk), detail::as_tensor<T>(dv), options,
      mask_mod);
}

// float/double overloads: `template <int = 0>`, instantiated only where called (detail/config.hpp).
/// attention_backward() on float arguments without spelling T (see STYLE §2.3).
template <int = 0>
inline void attention_backward(ConstMatrixView<float> q, ConstMatrixView<float> k,
                               ConstMatrixView<float> v, ConstMatrixView<float> out,
                               const float* lse, ConstMatrixView<float> dout, MatrixView<float> dq,
                               MatrixView<float> dk, MatrixView<float> dv,
                               const AttentionOptions& options = {}) {
  attention_backward<float>(q, k, v, out, lse, dout, dq, dk, dv, options);
}

/// attention_backward() on double arguments without spelling T.
template <int = 0>
inline void attention_backward(ConstMatrixView<double> q, ConstMatrixView<double> k,
                               ConstMatrixView<double> v, ConstMatrixView<double> out,
                               const double* lse, ConstMatrixView<double> dout,
                               MatrixView<double> dq, MatrixView<double> dk, MatrixView<double> dv,
                               const AttentionOptions& options = {}) {
  attention_backward<double>(q, k, v, out, lse, dout, dq, dk, dv, options);
}

/// attention_backward() with a user mask on float arguments without spelling T.
template <class MaskMod>
void attention_backward(ConstMatrixView<float> q, ConstMatrixView<float> k,
                        ConstMatrixView<float> v, ConstMatrixView<float> out, const float* lse,
                        ConstMatrixView<float> dout, MatrixView<float> dq, MatrixView<float> dk,
                        MatrixView<float> dv, const AttentionOptions& options,
                        const MaskMod& mask_mod) {
  attention_backward<float, MaskMod>(q, k, v, out, lse, dout, dq, dk, dv, options, mask_mod);
}

/// attention_backward() with a user mask on double arguments without spelling T.
template <class MaskMod>
void attention_backward(ConstMatrixView<double> q, ConstMatrixView<double> k,
                        ConstMatrixView<double> v, ConstMatrixView<double> out, const double* lse,
                        ConstMatrixView<double> dout, MatrixView<double> dq, MatrixView<double> dk,
                        MatrixView<double> dv, const AttentionOptions& options,
                        const MaskMod& mask_mod) {
  attention_backward<double, MaskMod>(q, k, v, out, lse, dout, dq, dk, dv, options, mask_mod);
}

// --- multi-head, batched -----------------------------------------------------------------------

/// Gradients of the batched multi-head attention() on strided [batch, seq, heads, dim] views.
/// GQA/MQA: query head h read kv head h / (q.heads / k.heads), so dk and dv of a kv head are the
/// sums over the query heads that share it — accumulated in place, without copies, in a fixed
/// order. options.key_lengths, alibi_slopes, block_sparse and mask_mod(b, h, i, j) as in the
/// forward.
/// Shapes: q, dq [B, n_q, H, d]; k, dk [B, n_k, H_kv, d]; v, dv [B, n_k, H_kv, d_v];
/// out, dout [B, n_q, H, d_v]; lse [B, H, n_q] contiguous (the forward's). Otherwise as the
/// single-head attention_backward(): same cost per head, extra memory, errors and guarantees.
template <class T, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention_backward(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v,
                        TensorView<const T> out, const T* lse, TensorView<const T> dout,
                        TensorView<T> dq, TensorView<T> dk, TensorView<T> dv,
                        const AttentionOptions& options = {}, const MaskMod& mask_mod = {},
                        const ScoreMod& /*score_mod*/ = {}) {
  static_assert(detail::kIsSupportedScalar<T>, "blockattn: T must be float, double or long double");
  detail::check_mods<T, MaskMod, NoScoreMod>();
  detail::check_backward_score_mod<ScoreMod>();
  detail::validate_attention_backward<T>("attention_backward", q, k, v, out, lse, dout, dq, dk, dv,
                                         options);
  detail::attention_backward_kernel<T>(q, k, v, out, lse, dout, dq, dk, dv, options, mask_mod);
}

/// TensorView attention_backward() on float arguments without spelling T.
template <int = 0>
inline void attention_backward(TensorView<const float> q, TensorView<const float> k,
                               TensorView<const float> v, TensorView<const float> out,
                               const float* lse, TensorView<const float> dout, TensorView<float> dq,
                               TensorView<float> dk, TensorView<float> dv,
                               const AttentionOptions& options = {}) {
  attention_backward<float>(q, k, v, out, lse, dout, dq, dk, dv, options);
}

/// TensorView attention_backward() on double arguments without spelling T.
template <int = 0>
inline void attention_backward(TensorView<const double> q, TensorView<const double> k,
                               TensorView<const double> v, TensorView<const double> out,
                               const double* lse, TensorView<const double> dout,
                               TensorView<double> dq, TensorView<double> dk, TensorView<double> dv,
                               const AttentionOptions& options = {}) {
  attention_backward<double>(q, k, v, out, lse, dout, dq, dk, dv, options);
}

/// TensorView attention_backward() with a user mask on float arguments without spelling T.
template <class MaskMod>
void attention_backward(TensorView<const float> q, TensorView<const float> k,
                        TensorView<const float> v, TensorView<const float> out, const float* lse,
                        TensorView<const float> dout, TensorView<float> dq, TensorView<float> dk,
                        TensorView<float> dv, const AttentionOptions& options,
                        const MaskMod& mask_mod) {
  attention_backward<float, MaskMod>(q, k, v, out, lse, dout, dq, dk, dv, options, mask_mod);
}

/// TensorView attention_backward() with a user mask on double arguments without spelling T.
template <class MaskMod>
void attention_backward(TensorView<const double> q, TensorView<const double> k,
                        TensorView<const double> v, TensorView<const double> out, const double* lse,
                        TensorView<const double> dout, TensorView<double> dq, TensorView<double> dk,
                        TensorView<double> dv, const AttentionOptions& options,
                        const MaskMod& mask_mod) {
  attention_backward<double, MaskMod>(q, k, v, out, lse, dout, dq, dk, dv, options, mask_mod);
}

}  // namespace blockattn
