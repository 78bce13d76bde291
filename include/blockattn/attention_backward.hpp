#pragma once
// attention_backward(): the gradients dQ, dK, dV of attention(), recomputed tile by tile from the
// forward's output and log-sum-exp, never forming the n_q×n_k matrices (FlashAttention-2's
// backward; Rabe & Staats 2021, section 4). Single-head views and batched multi-head tensors
// (GQA/MQA), with every mask and built-in modifier of mask.hpp.
//
// User score_mod functors are forward-only: their derivative is unknown, so attention_backward()
// has no score_mod parameter, and passing one is a compile-time error. Masks (mask_mod) need no
// derivative and are supported.
//
// Element types: float, double, Eigen::bfloat16, Eigen::half; q, k, v, out and dout of one type T
// (the T of the inputs struct), and dq, dk, dv of T or, over 16-bit T, of float (the G of the
// gradients struct: fp32 master gradients). 16-bit storage is computed in float: the tiles are
// widened exactly as they are loaded, dQ, dK and dV accumulate in float over the whole pass and
// are each rounded once at the end (copied instead when G is float, so rounding a float gradient
// to T gives the T gradient bit for bit), and lse is float (the forward's). Anything else (long
// double: blockattn::reference; double gradients over float inputs) is a compile-time error.

#include <array>
#include <cstddef>
#include <initializer_list>
#include <iterator>
#include <string>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include <blockattn/attention.hpp>
#include <blockattn/detail/attention_backward_kernel.hpp>
#include <blockattn/detail/check.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {

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
/// G: the gradients' element type (T, or float over 16-bit T); ranges compare as bytes.
template <class T, class L, class G>
void validate_attention_backward(const char* function, const ConstMatrixView<T>& q,
                                 const ConstMatrixView<T>& k, const ConstMatrixView<T>& v,
                                 const ConstMatrixView<T>& out, Span<L> lse,
                                 const ConstMatrixView<T>& dout, const MatrixView<G>& dq,
                                 const MatrixView<G>& dk, const MatrixView<G>& dv,
                                 const AttentionOptions& options) {
  // The forward's validation only reads `out`; it takes a writable view, so give it one.
  Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>> out_view(
      const_cast<T*>(out.data()), out.rows(), out.cols(), Eigen::OuterStride<>(out.outerStride()));
  validate_attention<T>(function, q, k, v, MatrixView<T>(out_view), options, lse,
                        /*lse_required=*/true);
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
                            {"lse", address_range(lse.data(), 1, n_q, n_q)}});
}

/// Checks every argument of the TensorView attention_backward() before anything is written.
template <class T, class L, class G>
void validate_attention_backward(const char* function, const TensorView<const T>& q,
                                 const TensorView<const T>& k, const TensorView<const T>& v,
                                 const TensorView<const T>& out, Span<L> lse,
                                 const TensorView<const T>& dout, const TensorView<G>& dq,
                                 const TensorView<G>& dk, const TensorView<G>& dv,
                                 const AttentionOptions& options) {
  const TensorView<T> out_view(const_cast<T*>(out.data), out.batch, out.seq, out.heads, out.dim,
                               out.batch_stride, out.seq_stride, out.head_stride);
  validate_attention<T>(function, q, k, v, out_view, options, lse, /*lse_required=*/true);
  const Index count = q.batch * q.heads * q.seq;
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
       {"lse", address_range(lse.data(), 1, count, count)}});
}

/// The gradients dq, dk, dv are of the inputs' type T, or float over 16-bit T.
template <class T, class G>
inline constexpr bool kGradientScalar = std::is_same_v<G, T> ||
                                        (!std::is_same_v<T, accumulator_t<T>> &&
                                         std::is_same_v<G, accumulator_t<T>>);

template <class ScoreMod>
constexpr void check_backward_score_mod() {
  static_assert(!kHasScoreMod<ScoreMod>,
                "blockattn: attention_backward does not support a user score_mod (its derivative "
                "is unknown; user score mods are forward-only). Soft-capping and ALiBi are built "
                "into AttentionOptions and are supported.");
}

}  // namespace detail

// --- the arguments, by name ---------------------------------------------------------------------

/// The inputs of the single-head attention_backward(), set field by field:
///   blockattn::AttentionBackwardInputs<float> in;
///   in.q = q;  in.k = k;  in.v = v;  in.out = out;  in.lse = lse;  in.dout = dout;
/// There is no positional initialisation (the constructor is user-provided), so two views of the
/// same type cannot be swapped without the swap being spelled out.
template <class T>
struct AttentionBackwardInputs {
  MatrixRef<const T> q;              ///< [n_q, d]: the forward's queries
  MatrixRef<const T> k;              ///< [n_k, d]: its keys
  MatrixRef<const T> v;              ///< [n_k, d_v]: its values
  MatrixRef<const T> out;            ///< [n_q, d_v]: its output
  Span<const accumulator_t<T>> lse;  ///< [n_q]: its log-sum-exp (required)
  MatrixRef<const T> dout;           ///< [n_q, d_v]: the gradient ∂L/∂out

  AttentionBackwardInputs() {}  // NOLINT(modernize-use-equals-default): no aggregate init
};

/// The outputs of the single-head attention_backward(), set by name (grads.dq = dq; ...): dq, dk
/// and dv have the shapes of q, k and v and are overwritten entirely. G: the inputs' type T, or
/// float over bfloat16/half inputs (AttentionGradients<float> with 16-bit AttentionBackwardInputs).
template <class G>
struct AttentionGradients {
  MatrixRef<G> dq;  ///< [n_q, d]: the gradient ∂L/∂q
  MatrixRef<G> dk;  ///< [n_k, d]: the gradient ∂L/∂k
  MatrixRef<G> dv;  ///< [n_k, d_v]: the gradient ∂L/∂v

  AttentionGradients() {}  // NOLINT(modernize-use-equals-default): no aggregate init
};

/// The inputs of the multi-head attention_backward(), set by name as AttentionBackwardInputs.
template <class T>
struct TensorBackwardInputs {
  TensorView<const T> q;             ///< [B, n_q, H, d]
  TensorView<const T> k;             ///< [B, n_k, H_kv, d]
  TensorView<const T> v;             ///< [B, n_k, H_kv, d_v]
  TensorView<const T> out;           ///< [B, n_q, H, d_v]
  Span<const accumulator_t<T>> lse;  ///< [B, H, n_q] contiguous (required)
  TensorView<const T> dout;          ///< [B, n_q, H, d_v]

  TensorBackwardInputs() {}  // NOLINT(modernize-use-equals-default): no aggregate init
};

/// The outputs of the multi-head attention_backward(), set by name. G as AttentionGradients'.
template <class G>
struct TensorGradients {
  TensorView<G> dq;  ///< [B, n_q, H, d]
  TensorView<G> dk;  ///< [B, n_k, H_kv, d]: summed over the query heads of each kv head
  TensorView<G> dv;  ///< [B, n_k, H_kv, d_v]: summed likewise

  TensorGradients() {}  // NOLINT(modernize-use-equals-default): no aggregate init
};

namespace detail {

/// The Eigen view of a MatrixRef (no copy).
template <class T>
Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>> eigen_view(const MatrixRef<const T>& x) {
  return {x.data(), x.rows(), x.cols(), Eigen::OuterStride<>(std::max<Index>(x.outerStride(), 0))};
}
template <class T>
Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>> eigen_view(const MatrixRef<T>& x) {
  return {x.data(), x.rows(), x.cols(), Eigen::OuterStride<>(std::max<Index>(x.outerStride(), 0))};
}

/// The checks of the single-head form, on the structs.
template <class T, class G>
void validate_attention_backward(const char* function, const AttentionBackwardInputs<T>& in,
                                 const AttentionGradients<G>& grads,
                                 const AttentionOptions& options) {
  auto dq = eigen_view(grads.dq);
  auto dk = eigen_view(grads.dk);
  auto dv = eigen_view(grads.dv);
  validate_attention_backward<T>(
      function, ConstMatrixView<T>(eigen_view(in.q)), ConstMatrixView<T>(eigen_view(in.k)),
      ConstMatrixView<T>(eigen_view(in.v)), ConstMatrixView<T>(eigen_view(in.out)), in.lse,
      ConstMatrixView<T>(eigen_view(in.dout)), MatrixView<G>(dq), MatrixView<G>(dk),
      MatrixView<G>(dv), options);
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
/// Arguments by name: AttentionBackwardInputs<T> (q, k, v, out, lse, dout) and
/// AttentionGradients<G> (dq, dk, dv). Element types T: float, double, Eigen::bfloat16 or
/// Eigen::half; 16-bit storage computes in float and rounds each gradient once. G: T, or float
/// over 16-bit T: the float accumulators unrounded (same cost and workspace as G = T), whose
/// rounding to T is the G = T result bit for bit.
/// Shapes: q [n_q, d], k [n_k, d], v [n_k, d_v], out and dout [n_q, d_v], lse [n_q]; dq, dk, dv
/// have the shapes of q, k, v and are overwritten entirely.
/// Time O(n_q·n_k·(d + d_v)) for the visible tiles (5 tile products against the forward's 2);
/// extra memory O(threads·query_chunk·(d + 3·key_chunk)) plus one integer per query chunk,
/// independent of n otherwise; 16-bit storage adds O(threads·(query_chunk + key_chunk)·(d + d_v))
/// widened tiles and a float dQ accumulator of n_q·d values (the one part that grows with n);
/// taken from options.workspace when given (then a repeated call of one shape allocates nothing),
/// else allocated once per call before the loops.
/// Throws std::invalid_argument naming the argument and both sizes (bad shapes, an empty or
/// too-short lse, an output overlapping an input or another output), before writing anything.
/// Deterministic: bitwise identical for any thread count (dk, dv: one owner per key chunk; dq:
/// summed in key-chunk order); chunk sizes change rounding only.
template <class T, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod, class G = T>
void attention_backward(const AttentionBackwardInputs<T>& in, const AttentionGradients<G>& grads,
                        const AttentionOptions& options = {}, const MaskMod& mask_mod = {},
                        const ScoreMod& /*score_mod*/ = {}) {
  static_assert(detail::kStorageScalar<T>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
  static_assert(detail::kGradientScalar<T, G>, BLOCKATTN_GRADIENT_SCALAR_MESSAGE);
  detail::check_mods<T, MaskMod, NoScoreMod>();
  detail::check_backward_score_mod<ScoreMod>();
  detail::validate_attention_backward<T>("attention_backward", in, grads, options);
  detail::attention_backward_kernel<T>(
      detail::as_tensor<const T>(in.q), detail::as_tensor<const T>(in.k),
      detail::as_tensor<const T>(in.v), detail::as_tensor<const T>(in.out),
      detail::data_or_null(in.lse), detail::as_tensor<const T>(in.dout),
      detail::as_tensor<G>(grads.dq), detail::as_tensor<G>(grads.dk),
      detail::as_tensor<G>(grads.dv), options, mask_mod);
}

// --- multi-head, batched -----------------------------------------------------------------------

/// Gradients of the batched multi-head attention() on strided [batch, seq, heads, dim] views.
/// GQA/MQA: query head h read kv head h / (q.heads / k.heads), so dk and dv of a kv head are the
/// sums over the query heads that share it — accumulated in place, without copies, in a fixed
/// order. options.key_lengths, alibi_slopes, block_sparse and mask_mod(b, h, i, j) as in the
/// forward. Arguments by name: TensorBackwardInputs<T> and TensorGradients<G> (G: T, or float
/// over 16-bit T, as in the single-head form).
/// Shapes: q, dq [B, n_q, H, d]; k, dk [B, n_k, H_kv, d]; v, dv [B, n_k, H_kv, d_v];
/// out, dout [B, n_q, H, d_v]; lse [B, H, n_q] contiguous (the forward's). Otherwise as the
/// single-head attention_backward(): same cost per head, extra memory, errors and guarantees.
template <class T, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod, class G = T>
void attention_backward(const TensorBackwardInputs<T>& in, const TensorGradients<G>& grads,
                        const AttentionOptions& options = {}, const MaskMod& mask_mod = {},
                        const ScoreMod& /*score_mod*/ = {}) {
  static_assert(detail::kStorageScalar<T>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
  static_assert(detail::kGradientScalar<T, G>, BLOCKATTN_GRADIENT_SCALAR_MESSAGE);
  detail::check_mods<T, MaskMod, NoScoreMod>();
  detail::check_backward_score_mod<ScoreMod>();
  detail::validate_attention_backward<T>("attention_backward", in.q, in.k, in.v, in.out, in.lse,
                                         in.dout, grads.dq, grads.dk, grads.dv, options);
  detail::attention_backward_kernel<T>(in.q, in.k, in.v, in.out, detail::data_or_null(in.lse),
                                       in.dout, grads.dq, grads.dk, grads.dv, options, mask_mod);
}

}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
