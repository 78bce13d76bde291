#pragma once
// blockattn::reference — the naive versions of everything, written for clarity, not speed: they
// materialise what the fast kernels avoid (the n_q×n_k scores, the n×ffn hidden layer). The tests
// check every kernel against them, evaluated in long double; users can do the same.

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include <Eigen/Core>

#include <blockattn/attention.hpp>
#include <blockattn/attention_backward.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/transformer_block.hpp>
#include <blockattn/types.hpp>

/// Naive O(n²) versions of every kernel, materialising the scores: for tests and for checking.
namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace reference {

// --- softmax ---------------------------------------------------------------------------------

/// Row-wise softmax written out case by case, one scalar at a time (instantiate with long double
/// for tests). Per row: a NaN anywhere gives a NaN row; otherwise with m = max x, m = −inf (only
/// −inf values) gives zeros, m = +inf gives 1/c to each of the c +inf entries and 0 elsewhere,
/// and a finite m gives exp(x − m) / Σ exp(x − m). Time O(rows·cols); the result is the only
/// allocation.
template <class T>
Matrix<T> softmax(const Matrix<T>& x) {
  const T infinity = std::numeric_limits<T>::infinity();
  Matrix<T> y(x.rows(), x.cols());
  for (Index i = 0; i < x.rows(); ++i) {
    bool has_nan = false;
    T m = -infinity;
    for (Index j = 0; j < x.cols(); ++j) {
      if (std::isnan(x(i, j))) has_nan = true;
      if (x(i, j) > m) m = x(i, j);
    }
    if (has_nan) {
      y.row(i).setConstant(std::numeric_limits<T>::quiet_NaN());
    } else if (m == -infinity) {
      y.row(i).setZero();
    } else if (m == infinity) {
      T count = 0;
      for (Index j = 0; j < x.cols(); ++j) count += x(i, j) == infinity ? T(1) : T(0);
      for (Index j = 0; j < x.cols(); ++j) y(i, j) = x(i, j) == infinity ? T(1) / count : T(0);
    } else {
      T sum = 0;
      for (Index j = 0; j < x.cols(); ++j) sum += std::exp(x(i, j) - m);
      for (Index j = 0; j < x.cols(); ++j) y(i, j) = std::exp(x(i, j) - m) / sum;
    }
  }
  return y;
}

/// The k largest softmax probabilities of the row x, by sorting all n indices: in descending
/// order of x (so of the exact probability), equal values by lower index; NaN values sort last.
/// Resizes values and indices to min(k, n) entries. Time O(n log n), O(n) extra memory.
template <class T>
void softmax_topk(const RowVector<T>& x, Index k, RowVector<T>& values, RowVector<Index>& indices) {
  const Index n = x.size();
  const Index kept = std::min(std::max(k, Index(0)), n);
  const Matrix<T> probabilities = softmax<T>(Matrix<T>(x));
  std::vector<Index> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), Index(0));
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) {
    if (std::isnan(x(a)) || std::isnan(x(b))) return !std::isnan(x(a)) && std::isnan(x(b));
    return x(a) > x(b);
  });
  values.resize(kept);
  indices.resize(kept);
  for (Index i = 0; i < kept; ++i) {
    indices(i) = order[static_cast<std::size_t>(i)];
    values(i) = probabilities(0, indices(i));
  }
}

// --- attention -------------------------------------------------------------------------------

namespace detail {

/// The compile-time checks of a reference entry point's Eigen arguments: one element type, the
/// outputs writable row-major storage (inputs may be anything: the reference copies them).
template <class T, class... Inputs>
constexpr void check_reference_arguments_of() {
  static_assert((std::is_same_v<typename Inputs::Scalar, T> && ...),
                "blockattn: every matrix argument must have the same element type");
}
template <class T, class Q, class K, class V, class O>
constexpr void check_reference_arguments() {
  check_reference_arguments_of<T, Q, K, V, O>();
  blockattn::detail::check_matrix_outputs<O>();
}

/// Whether query i of (batch b, head h) may see key j: the definition at the top of mask.hpp,
/// written out pair by pair (independently of the kernels' tile classification).
template <class MaskMod>
bool attention_visible(const AttentionOptions& o, Index n_q, Index n_k, Index b, Index h, Index i,
                       Index j, const MaskMod& mask_mod) {
  const Index aligned = i + (n_k - n_q);
  if (!o.key_lengths.empty() && j >= o.key_lengths[b]) return false;
  if (o.causal && j > aligned) return false;
  if (o.window_left >= 0 && j < aligned - o.window_left) return false;
  if (o.window_right >= 0 && j > aligned + o.window_right) return false;
  if (const BlockSparseLayout* layout = o.block_sparse) {
    const Index lh = layout->heads() == 1 ? 0 : h;
    if (!layout->visible(lh, i / layout->query_block_size(), j / layout->key_block_size())) {
      return false;
    }
  }
  if constexpr (blockattn::detail::kHasMaskMod<MaskMod>) {
    if (!mask_mod(b, h, i, j)) return false;
  }
  return true;
}

/// Naive attention of one (batch b, query head h): the n_q×n_k scores materialised.
template <class T, class MaskMod, class ScoreMod, class Q, class K, class V, class Out>
void attention_head(const Q& q, const K& k, const V& v, Out&& out, const AttentionOptions& o,
                    accumulator_t<T>* lse, const MaskMod& mask_mod, const ScoreMod& score_mod,
                    Index b, Index h) {
  const Index n_q = q.rows();
  const Index n_k = k.rows();
  const T scale =
      o.scale != 0 ? static_cast<T>(o.scale) : T(1) / std::sqrt(static_cast<T>(q.cols()));
  Matrix<T> s = (q * k.transpose()) * scale;
  const T inf = std::numeric_limits<T>::infinity();
  for (Index i = 0; i < n_q; ++i) {
    for (Index j = 0; j < n_k; ++j) {
      T x = s(i, j);
      if (o.softcap > 0) x = static_cast<T>(o.softcap) * std::tanh(x / static_cast<T>(o.softcap));
      if (!o.alibi_slopes.empty()) {
        x -= static_cast<T>(o.alibi_slopes[h]) * static_cast<T>(std::abs(i + (n_k - n_q) - j));
      }
      if constexpr (blockattn::detail::kHasScoreMod<ScoreMod>) x = score_mod(x, b, h, i, j);
      s(i, j) = attention_visible(o, n_q, n_k, b, h, i, j, mask_mod) ? x : -inf;
    }
  }
  // The sink (mask.hpp): one more term of the denominator, with no value.
  const T sink = o.sinks.empty() ? -inf : static_cast<T>(o.sinks[h]);
  for (Index i = 0; i < n_q; ++i) {
    const T row_max = n_k > 0 ? s.row(i).maxCoeff() : -inf;
    const T m = sink > row_max ? sink : row_max;
    if (m == -inf) {  // no visible key and no sink
      out.row(i).setZero();
      if (lse != nullptr) lse[i] = -inf;
      continue;
    }
    T l = sink == -inf ? T(0) : std::exp(sink - m);
    out.row(i).setZero();
    for (Index j = 0; j < n_k; ++j) {
      if (s(i, j) == -inf) continue;
      // exp(s − m), with +inf scores sharing the weight equally (the library's one rule, written
      // out here again so that the oracle does not share the kernels' code).
      const T p = s(i, j) == m ? T(1) : std::exp(s(i, j) - m);
      l += p;
      out.row(i) += p * v.row(j);
    }
    out.row(i) /= l;
    if (lse != nullptr) lse[i] = m + std::log(l);
  }
}

/// attention_head() on 16-bit storage (or float q over a 16-bit K/V): the stored values widened
/// exactly to long double, the attention computed there, out rounded to its type (through float:
/// the double rounding this adds is far below a 16-bit format's unit roundoff) and lse to float.
template <class MaskMod, class ScoreMod, class Q, class K, class V, class Out>
void attention_head_widened(const Q& q, const K& k, const V& v, Out&& out,
                            const AttentionOptions& o, float* lse, const MaskMod& mask_mod,
                            const ScoreMod& score_mod, Index b, Index h) {
  using L = long double;
  using OutScalar = typename std::remove_reference_t<Out>::Scalar;
  const Matrix<L> ql = q.template cast<float>().template cast<L>();
  const Matrix<L> kl = k.template cast<float>().template cast<L>();
  const Matrix<L> vl = v.template cast<float>().template cast<L>();
  Matrix<L> ol(q.rows(), v.cols());
  std::vector<L> lse_l(lse != nullptr ? static_cast<std::size_t>(q.rows()) : 0);
  attention_head<L>(ql, kl, vl, ol, o, lse != nullptr ? lse_l.data() : nullptr, mask_mod, score_mod,
                    b, h);
  out = ol.template cast<float>().template cast<OutScalar>();
  for (std::size_t i = 0; i < lse_l.size(); ++i) lse[i] = static_cast<float>(lse_l[i]);
}

/// Whether a reference call on these element types goes through attention_head_widened().
template <class Q, class K>
inline constexpr bool kWidenedReference =
    blockattn::detail::kIs16BitFloat<Q> || blockattn::detail::kIs16BitFloat<K>;

}  // namespace detail

/// Naive single-head attention with the semantics of blockattn::attention() (every option, mask
/// and functor): the n_q×n_k scores are materialised. Time O(n_q·n_k·(d + d_v)), extra memory
/// O(n_q·n_k). Same shapes, errors and aliasing rules as attention(). Element types: float,
/// double or long double, deduced from q (k, v, out must match; inputs may be expressions, which
/// are copied). For tests (instantiate with long double) and for users who want to check a result.
template <class Q, class K, class V, class O, class MaskMod = NoMaskMod,
          class ScoreMod = NoScoreMod>
void attention(const Eigen::MatrixBase<Q>& q, const Eigen::MatrixBase<K>& k,
               const Eigen::MatrixBase<V>& v, const Eigen::MatrixBase<O>& out,
               const AttentionOptions& options = {},
               Span<accumulator_t<typename Q::Scalar>> lse = {}, const MaskMod& mask_mod = {},
               const ScoreMod& score_mod = {}) {
  using T = typename Q::Scalar;
  using KT = typename K::Scalar;
  if constexpr (detail::kWidenedReference<T, KT>) {
    static_assert(blockattn::detail::kAttentionTypes<T, KT, typename V::Scalar, typename O::Scalar>,
                  BLOCKATTN_ATTENTION_TYPES_MESSAGE);
    detail::check_reference_arguments_of<T, Q, O>();
    detail::check_reference_arguments_of<KT, K, V>();
    blockattn::detail::check_matrix_outputs<O>();
    blockattn::detail::check_mods<long double, MaskMod, ScoreMod>();
    const ConstMatrixView<T> q_view(q.derived());
    const ConstMatrixView<KT> k_view(k.derived());
    const ConstMatrixView<KT> v_view(v.derived());
    MatrixView<T> out_view = blockattn::detail::writable_view(out);
    blockattn::detail::validate_attention<T>("reference::attention", q_view, k_view, v_view,
                                             out_view, options, lse);
    detail::attention_head_widened(q_view, k_view, v_view, out_view, options,
                                   blockattn::detail::data_or_null(lse), mask_mod, score_mod, 0, 0);
  } else {
    static_assert(blockattn::detail::kReferenceScalar<T>, BLOCKATTN_REFERENCE_SCALAR_MESSAGE);
    detail::check_reference_arguments<T, Q, K, V, O>();
    blockattn::detail::check_mods<T, MaskMod, ScoreMod>();
    const ConstMatrixView<T> q_view(q.derived());
    const ConstMatrixView<T> k_view(k.derived());
    const ConstMatrixView<T> v_view(v.derived());
    MatrixView<T> out_view = blockattn::detail::writable_view(out);
    blockattn::detail::validate_attention<T>("reference::attention", q_view, k_view, v_view,
                                             out_view, options, lse);
    detail::attention_head<T>(q_view, k_view, v_view, out_view, options,
                              blockattn::detail::data_or_null(lse), mask_mod, score_mod, 0, 0);
  }
}

/// Naive batched multi-head attention (GQA) with the semantics of the TensorView
/// blockattn::attention(); O(n_q·n_k) extra memory per head. Element types as the 2-D form.
template <class QT, class KT, class VT, class OT, class MaskMod = NoMaskMod,
          class ScoreMod = NoScoreMod>
void attention(TensorView<QT> q_, TensorView<KT> k_, TensorView<VT> v_, TensorView<OT> out,
               const AttentionOptions& options = {},
               Span<accumulator_t<std::remove_const_t<QT>>> lse = {}, const MaskMod& mask_mod = {},
               const ScoreMod& score_mod = {}) {
  using T = std::remove_const_t<QT>;
  using KS = std::remove_const_t<KT>;
  if constexpr (detail::kWidenedReference<T, KS>) {
    static_assert(
        blockattn::detail::kAttentionTypes<T, KS, std::remove_const_t<VT>, std::remove_const_t<OT>>,
        BLOCKATTN_ATTENTION_TYPES_MESSAGE);
    static_assert(!std::is_const_v<OT>, "blockattn: out must be a writable TensorView<T>");
    blockattn::detail::check_mods<long double, MaskMod, ScoreMod>();
    const TensorView<const T> q(q_);
    const TensorView<const KS> k(k_);
    const TensorView<const KS> v(v_);
    blockattn::detail::validate_attention<T>("reference::attention", q, k, v, out, options, lse);
    if (q.heads == 0) return;
    const Index group = q.heads / k.heads;
    for (Index b = 0; b < q.batch; ++b) {
      for (Index h = 0; h < q.heads; ++h) {
        float* lse_head = !lse.empty() ? lse.data() + (b * q.heads + h) * q.seq : nullptr;
        auto out_head = blockattn::detail::mutable_head_slice(out, b, h);
        detail::attention_head_widened(blockattn::detail::head_slice(q, b, h),
                                       blockattn::detail::head_slice(k, b, h / group),
                                       blockattn::detail::head_slice(v, b, h / group), out_head,
                                       options, lse_head, mask_mod, score_mod, b, h);
      }
    }
  } else {
    static_assert(blockattn::detail::kReferenceScalar<T>, BLOCKATTN_REFERENCE_SCALAR_MESSAGE);
    blockattn::detail::check_tensor_arguments<T, KT, VT, OT>();
    static_assert(!std::is_const_v<OT>, "blockattn: out must be a writable TensorView<T>");
    blockattn::detail::check_mods<T, MaskMod, ScoreMod>();
    const TensorView<const T> q(q_);
    const TensorView<const T> k(k_);
    const TensorView<const T> v(v_);
    blockattn::detail::validate_attention<T>("reference::attention", q, k, v, out, options, lse);
    if (q.heads == 0) return;
    const Index group = q.heads / k.heads;
    for (Index b = 0; b < q.batch; ++b) {
      for (Index h = 0; h < q.heads; ++h) {
        accumulator_t<T>* lse_head =
            !lse.empty() ? lse.data() + (b * q.heads + h) * q.seq : nullptr;
        detail::attention_head<T>(blockattn::detail::head_slice(q, b, h),
                                  blockattn::detail::head_slice(k, b, h / group),
                                  blockattn::detail::head_slice(v, b, h / group),
                                  blockattn::detail::mutable_head_slice(out, b, h), options,
                                  lse_head, mask_mod, score_mod, b, h);
      }
    }
  }
}

// --- transformer block ---------------------------------------------------------------------

namespace detail {

/// LayerNorm of every row, written plainly: mean, biased variance, normalise, scale, shift.
template <class T>
Matrix<T> layer_norm(const Matrix<T>& z, const RowVector<T>& gamma, const RowVector<T>& beta,
                     T eps) {
  Matrix<T> out(z.rows(), z.cols());
  for (Index r = 0; r < z.rows(); ++r) {
    const T mean = z.row(r).mean();
    const T var = (z.row(r).array() - mean).square().mean();
    out.row(r) = ((z.row(r).array() - mean) / std::sqrt(var + eps)) * gamma.array() + beta.array();
  }
  return out;
}

/// The activations' formulas, evaluated in T.
template <class T>
T activation_value(Activation activation, T x) {
  const T pi = std::acos(T(-1));
  switch (activation) {
    case Activation::GeluErf:
      return x * (T(1) + std::erf(x / std::sqrt(T(2)))) / T(2);
    case Activation::GeluTanh:
      // 0.044715L: T(0.044715) would round the decimal to double first, 1e-17 off in a 113-bit
      // long double (AArch64); for float and double both spellings give the same value.
      return x * (T(1) + std::tanh(std::sqrt(T(2) / pi) * (x + T(0.044715L) * x * x * x))) / T(2);
    case Activation::Relu:
      return std::max(x, T(0));
  }
  return x;
}

}  // namespace detail

/// The vanilla, unfused pre-LN layer with the semantics of blockattn::transformer_block(): LN1(x),
/// full Q, K and V [n, ·], every head's n×n score matrix at once ([heads, n, n], softmax in place,
/// as a batched multi-head implementation holds them), the attention output, h, LN2(h) and the
/// full n×ffn hidden layer. Only options.causal matters (blocks and threads are ignored).
/// Time O(n·model·(model + ffn) + n²·model); extra memory O(heads·n² + n·(model + ffn)).
/// Same shapes, errors and aliasing rules as transformer_block() (y may be exactly x).
template <class T, class X, class Y>
void transformer_block(const TransformerBlockWeights<T>& w, const Eigen::MatrixBase<X>& x_,
                       const Eigen::MatrixBase<Y>& y_, const BlockOptions& options = {}) {
  static_assert(blockattn::detail::kReferenceScalar<T>, BLOCKATTN_REFERENCE_SCALAR_MESSAGE);
  detail::check_reference_arguments_of<T, X, Y>();
  blockattn::detail::check_matrix_outputs<Y>();
  const ConstMatrixView<T> x(x_.derived());
  MatrixView<T> y = blockattn::detail::writable_view(y_);
  blockattn::detail::validate_transformer_block<T>("reference::transformer_block", w, x, y,
                                                   options);
  const Index n = x.rows();
  if (n == 0) return;
  const Index model = w.wq.rows();
  const Index head_dim = model / w.heads;
  const Index group = w.heads / w.resolved_kv_heads();
  const T eps = static_cast<T>(w.ln_eps);
  const T scale = T(1) / std::sqrt(static_cast<T>(head_dim));
  const T inf = std::numeric_limits<T>::infinity();

  const Matrix<T> x_copy = x;
  const Matrix<T> ln1 = detail::layer_norm<T>(x_copy, w.ln1_gamma, w.ln1_beta, eps);
  Matrix<T> q = ln1 * w.wq;
  q.rowwise() += w.bq;
  Matrix<T> k = ln1 * w.wk;
  k.rowwise() += w.bk;
  Matrix<T> v = ln1 * w.wv;
  v.rowwise() += w.bv;

  std::vector<Matrix<T>> probs;  // built one by one: no extra n×n prototype to copy from
  probs.reserve(static_cast<std::size_t>(w.heads));
  for (Index hd = 0; hd < w.heads; ++hd) probs.emplace_back(n, n);
  Matrix<T> attn(n, model);
  for (Index hd = 0; hd < w.heads; ++hd) {
    Matrix<T>& p = probs[static_cast<std::size_t>(hd)];
    const Index kv = hd / group;
    p.noalias() =
        q.middleCols(hd * head_dim, head_dim) * k.middleCols(kv * head_dim, head_dim).transpose();
    p *= scale;
    for (Index i = 0; i < n; ++i) {
      if (options.causal) p.row(i).tail(n - 1 - i).setConstant(-inf);
      const T m = p.row(i).maxCoeff();
      p.row(i) = (p.row(i).array() - m).exp();
      p.row(i) /= p.row(i).sum();
    }
  }
  for (Index hd = 0; hd < w.heads; ++hd) {
    attn.middleCols(hd * head_dim, head_dim).noalias() =
        probs[static_cast<std::size_t>(hd)] * v.middleCols(hd / group * head_dim, head_dim);
  }

  Matrix<T> h = x_copy;
  h.noalias() += attn * w.wo;
  h.rowwise() += w.bo;
  const Matrix<T> ln2 = detail::layer_norm<T>(h, w.ln2_gamma, w.ln2_beta, eps);
  Matrix<T> hidden = ln2 * w.w1;
  hidden.rowwise() += w.b1;
  hidden = hidden.unaryExpr([&](T z) { return detail::activation_value(w.activation, z); });
  Matrix<T> out = h;
  out.noalias() += hidden * w.w2;
  out.rowwise() += w.b2;
  y = out;
}

}  // namespace reference
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn

// --- attention backward ------------------------------------------------------------------------

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace reference {

namespace detail {

/// Naive gradients of one (batch b, query head h): the softmax P [n_q, n_k] materialised from the
/// scores (recomputed here, exactly as attention_head does; `out` and `lse` are not used), then
/// dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − rowsum(P ∘ dP)) ∘ ∂s/∂x, dQ = scale·dS·K,
/// dK += scale·dSᵀ·Q. dK and dV are added to (GQA sums over the query heads); dQ is assigned.
template <class T, class MaskMod, class Q, class K, class V, class DOut, class DQ, class DK,
          class DV>
void attention_backward_head(const Q& q, const K& k, const V& v, const DOut& dout, DQ&& dq, DK&& dk,
                             DV&& dv, const AttentionOptions& o, const MaskMod& mask_mod, Index b,
                             Index h) {
  const Index n_q = q.rows();
  const Index n_k = k.rows();
  const T scale =
      o.scale != 0 ? static_cast<T>(o.scale) : T(1) / std::sqrt(static_cast<T>(q.cols()));
  const T inf = std::numeric_limits<T>::infinity();
  Matrix<T> x = (q * k.transpose()) * scale;  // unmodified scores
  Matrix<T> p(n_q, n_k);                      // modified, masked scores, then probabilities
  Matrix<T> slope(n_q, n_k);                  // ∂s/∂x
  for (Index i = 0; i < n_q; ++i) {
    for (Index j = 0; j < n_k; ++j) {
      T s = x(i, j);
      slope(i, j) = 1;
      if (o.softcap > 0) {
        const T c = static_cast<T>(o.softcap);
        const T t = std::tanh(s / c);
        s = c * t;
        slope(i, j) = 1 - t * t;
      }
      if (!o.alibi_slopes.empty()) {
        s -= static_cast<T>(o.alibi_slopes[h]) * static_cast<T>(std::abs(i + (n_k - n_q) - j));
      }
      p(i, j) = attention_visible(o, n_q, n_k, b, h, i, j, mask_mod) ? s : -inf;
    }
  }
  // The sink joins the denominator only (mask.hpp): P's rows then sum to less than one, and
  // dS = P ∘ (dP − rowsum(P ∘ dP)) keeps its form (the sink is a constant of each row's sum).
  const T sink = o.sinks.empty() ? -inf : static_cast<T>(o.sinks[h]);
  for (Index i = 0; i < n_q; ++i) {
    const T row_max = n_k > 0 ? p.row(i).maxCoeff() : -inf;
    const T m = sink > row_max ? sink : row_max;
    if (row_max == -inf) {  // no visible key: P = 0
      p.row(i).setZero();
      continue;
    }
    T l = sink == -inf ? T(0) : std::exp(sink - m);
    for (Index j = 0; j < n_k; ++j) {
      p(i, j) = p(i, j) == -inf ? T(0) : std::exp(p(i, j) - m);
      l += p(i, j);
    }
    p.row(i) /= l;
  }
  dv += p.transpose() * dout;
  Matrix<T> ds = dout * v.transpose();  // dP
  for (Index i = 0; i < n_q; ++i) {
    const T delta = (p.row(i).array() * ds.row(i).array()).sum();  // = dO_i·O_i
    ds.row(i) = (p.row(i).array() * (ds.row(i).array() - delta) * slope.row(i).array()).matrix();
  }
  dq = (ds * k) * scale;
  dk += (ds.transpose() * q) * scale;
}

}  // namespace detail

/// Naive gradients of the single-head attention() with the semantics of
/// blockattn::attention_backward() (every option and mask; soft-capping and ALiBi; no user
/// score_mod): the softmax P [n_q, n_k] is materialised and recomputed from q and k, so `out` and
/// `lse` are validated but not read (D = rowsum(dO ∘ O) is taken as rowsum(P ∘ dP), the same
/// quantity). Time O(n_q·n_k·(d + d_v)), extra memory O(n_q·n_k). Same arguments (by name),
/// shapes, errors and aliasing rules as attention_backward(). Element types: float, double or
/// long double. For tests (instantiate with long double) and users.
template <class T, class MaskMod = NoMaskMod>
void attention_backward(const AttentionBackwardInputs<T>& in, const AttentionGradients<T>& grads,
                        const AttentionOptions& options = {}, const MaskMod& mask_mod = {}) {
  static_assert(blockattn::detail::kReferenceScalar<T>, BLOCKATTN_REFERENCE_SCALAR_MESSAGE);
  blockattn::detail::check_mods<T, MaskMod, NoScoreMod>();
  blockattn::detail::validate_attention_backward<T>("reference::attention_backward", in, grads,
                                                    options);
  auto dq = blockattn::detail::eigen_view(grads.dq);
  auto dk = blockattn::detail::eigen_view(grads.dk);
  auto dv = blockattn::detail::eigen_view(grads.dv);
  dk.setZero();
  dv.setZero();
  detail::attention_backward_head<T>(
      blockattn::detail::eigen_view(in.q), blockattn::detail::eigen_view(in.k),
      blockattn::detail::eigen_view(in.v), blockattn::detail::eigen_view(in.dout), dq, dk, dv,
      options, mask_mod, 0, 0);
}

/// Naive batched multi-head gradients (GQA: dk, dv summed over the query heads of a kv head) with
/// the semantics of the TensorView blockattn::attention_backward(); O(n_q·n_k) extra memory.
template <class T, class MaskMod = NoMaskMod>
void attention_backward(const TensorBackwardInputs<T>& in, const TensorGradients<T>& grads,
                        const AttentionOptions& options = {}, const MaskMod& mask_mod = {}) {
  static_assert(blockattn::detail::kReferenceScalar<T>, BLOCKATTN_REFERENCE_SCALAR_MESSAGE);
  blockattn::detail::check_mods<T, MaskMod, NoScoreMod>();
  const TensorView<const T>& q = in.q;
  const TensorView<const T>& k = in.k;
  blockattn::detail::validate_attention_backward<T>("reference::attention_backward", q, k, in.v,
                                                    in.out, in.lse, in.dout, grads.dq, grads.dk,
                                                    grads.dv, options);
  for (Index b = 0; b < k.batch; ++b) {
    for (Index h = 0; h < k.heads; ++h) {
      blockattn::detail::mutable_head_slice(grads.dk, b, h).setZero();
      blockattn::detail::mutable_head_slice(grads.dv, b, h).setZero();
    }
  }
  if (q.heads == 0) return;
  const Index group = q.heads / k.heads;
  for (Index b = 0; b < q.batch; ++b) {
    for (Index h = 0; h < q.heads; ++h) {
      detail::attention_backward_head<T>(
          blockattn::detail::head_slice(q, b, h), blockattn::detail::head_slice(k, b, h / group),
          blockattn::detail::head_slice(in.v, b, h / group),
          blockattn::detail::head_slice(in.dout, b, h),
          blockattn::detail::mutable_head_slice(grads.dq, b, h),
          blockattn::detail::mutable_head_slice(grads.dk, b, h / group),
          blockattn::detail::mutable_head_slice(grads.dv, b, h / group), options, mask_mod, b, h);
    }
  }
}

}  // namespace reference
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
