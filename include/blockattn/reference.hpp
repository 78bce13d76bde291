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
#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

/// Naive O(n²) versions of every kernel, materialising the scores: for tests and for checking.
namespace blockattn::reference {

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

/// Whether query i of (batch b, head h) may see key j: the definition at the top of mask.hpp,
/// written out pair by pair (independently of the kernels' tile classification).
template <class MaskMod>
bool attention_visible(const AttentionOptions& o, Index n_q, Index n_k, Index b, Index h, Index i,
                       Index j, const MaskMod& mask_mod) {
  const Index aligned = i + (n_k - n_q);
  if (o.key_lengths != nullptr && j >= o.key_lengths[b]) return false;
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
                    T* lse, const MaskMod& mask_mod, const ScoreMod& score_mod, Index b, Index h) {
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
      if (o.alibi_slopes != nullptr) {
        x -= static_cast<T>(o.alibi_slopes[h]) * static_cast<T>(std::abs(i + (n_k - n_q) - j));
      }
      if constexpr (blockattn::detail::kHasScoreMod<ScoreMod>) x = score_mod(x, b, h, i, j);
      s(i, j) = attention_visible(o, n_q, n_k, b, h, i, j, mask_mod) ? x : -inf;
    }
  }
  for (Index i = 0; i < n_q; ++i) {
    const T m = n_k > 0 ? s.row(i).maxCoeff() : -inf;
    if (m == -inf) {  // no visible key
      out.row(i).setZero();
      if (lse != nullptr) lse[i] = -inf;
      continue;
    }
    T l = 0;
    out.row(i).setZero();
    for (Index j = 0; j < n_k; ++j) {
      if (s(i, j) == -inf) continue;
      const T p = std::exp(s(i, j) - m);
      l += p;
      out.row(i) += p * v.row(j);
    }
    out.row(i) /= l;
    if (lse != nullptr) lse[i] = m + std::log(l);
  }
}

}  // namespace detail

/// Naive single-head attention with the semantics of blockattn::attention() (every option, mask
/// and functor): the n_q×n_k scores are materialised. Time O(n_q·n_k·(d + d_v)), extra memory
/// O(n_q·n_k). Same shapes, errors and aliasing rules as attention(). For tests (instantiate with
/// long double) and for users who want to check a result.
template <class T, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention(ConstMatrixView<T> q, ConstMatrixView<T> k, ConstMatrixView<T> v, MatrixView<T> out,
               const AttentionOptions& options = {}, T* lse = nullptr, const MaskMod& mask_mod = {},
               const ScoreMod& score_mod = {}) {
  blockattn::detail::check_mods<T, MaskMod, ScoreMod>();
  blockattn::detail::validate_attention<T>("reference::attention", q, k, v, out, options, lse);
  detail::attention_head<T>(q, k, v, out, options, lse, mask_mod, score_mod, 0, 0);
}

/// reference::attention() on float arguments without spelling T.
inline void attention(ConstMatrixView<float> q, ConstMatrixView<float> k, ConstMatrixView<float> v,
                      MatrixView<float> out, const AttentionOptions& options = {},
                      float* lse = nullptr) {
  reference::attention<float>(q, k, v, out, options, lse);
}

/// reference::attention() on double arguments without spelling T.
inline void attention(ConstMatrixView<double> q, ConstMatrixView<double> k,
                      ConstMatrixView<double> v, MatrixView<double> out,
                      const AttentionOptions& options = {}, double* lse = nullptr) {
  reference::attention<double>(q, k, v, out, options, lse);
}

/// Naive batched multi-head attention (GQA) with the semantics of the TensorView
/// blockattn::attention(); O(n_q·n_k) extra memory per head.
template <class T, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v,
               TensorView<T> out, const AttentionOptions& options = {}, T* lse = nullptr,
               const MaskMod& mask_mod = {}, const ScoreMod& score_mod = {}) {
  blockattn::detail::check_mods<T, MaskMod, ScoreMod>();
  blockattn::detail::validate_attention<T>("reference::attention", q, k, v, out, options, lse);
  if (q.heads == 0) return;
  const Index group = q.heads / k.heads;
  for (Index b = 0; b < q.batch; ++b) {
    for (Index h = 0; h < q.heads; ++h) {
      T* lse_head = lse != nullptr ? lse + (b * q.heads + h) * q.seq : nullptr;
      detail::attention_head<T>(blockattn::detail::head_slice(q, b, h),
                                blockattn::detail::head_slice(k, b, h / group),
                                blockattn::detail::head_slice(v, b, h / group),
                                blockattn::detail::mutable_head_slice(out, b, h), options, lse_head,
                                mask_mod, score_mod, b, h);
    }
  }
}

/// TensorView reference::attention() on float arguments without spelling T.
inline void attention(TensorView<const float> q, TensorView<const float> k,
                      TensorView<const float> v, TensorView<float> out,
                      const AttentionOptions& options = {}, float* lse = nullptr) {
  reference::attention<float>(q, k, v, out, options, lse);
}

/// TensorView reference::attention() on double arguments without spelling T.
inline void attention(TensorView<const double> q, TensorView<const double> k,
                      TensorView<const double> v, TensorView<double> out,
                      const AttentionOptions& options = {}, double* lse = nullptr) {
  reference::attention<double>(q, k, v, out, options, lse);
}

}  // namespace blockattn::reference
