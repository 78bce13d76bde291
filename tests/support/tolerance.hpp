#pragma once
// Error bounds, each derived where it is defined. No bare 1e-5 anywhere in the tests.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <blockattn/types.hpp>

namespace blockattn::test {

/// Unit roundoff u = eps/2: the relative error of one correctly rounded operation.
template <class T>
constexpr T unit_roundoff() {
  return std::numeric_limits<T>::epsilon() / 2;
}

/// Per-row absolute tolerance of attention() in T against the exact result (STYLE §2.10):
///   tol_i = 4·u·(d·A_i + E + n_k + 8)·max_j |v_j|,   u = eps(T)/2,
///   A_i = max_j scale·Σ_c |q_ic·k_jc|   (the size of the dot products behind row i's logits).
/// Derivation: a logit s_ij = scale·q_i·k_j is computed with absolute error <= γ_d·A_i ≈ d·u·A_i
/// (dot product of length d, plus one rounding for the scale); a modifier adds at most u·E more,
/// where E bounds the magnitude of what modifiers add (ALiBi terms, soft-cap values; 0 without).
/// exp() turns an absolute logit error δ into a relative weight error of about δ, and the
/// normalisation p/Σp cancels common factors, so the weights carry relative error
/// <= 2·(d·u·A_i + u·E) + (n_k + 4)·u (the last from the sum of n_k weights, the exp itself and
/// the division). The output Σ_j p_j·v_j / Σ p_j is a convex combination, so its absolute error is
/// that relative error times max |v_j| plus the n_k-term summation error of Σ p·v, again
/// <= n_k·u·max|v|. The factor 4 and the +8 absorb the constants (γ_k ≈ k·u·(1 + small)).
/// An indexing or masking bug moves the output by O(max|v|), far above this at n <= 512.
template <class T, class Q, class K, class V>
std::vector<double> attention_tolerance(const Q& q, const K& k, const V& v, double scale,
                                        double extra = 0) {
  const double u = static_cast<double>(unit_roundoff<T>());
  double v_max = 0;
  for (Index j = 0; j < v.rows(); ++j) {
    for (Index c = 0; c < v.cols(); ++c) {
      v_max = std::max(v_max, std::abs(static_cast<double>(v(j, c))));
    }
  }
  std::vector<double> tol(static_cast<std::size_t>(q.rows()));
  const auto d = static_cast<double>(q.cols());
  const auto n_k = static_cast<double>(k.rows());
  for (Index i = 0; i < q.rows(); ++i) {
    double a = 0;
    for (Index j = 0; j < k.rows(); ++j) {
      double sum = 0;
      for (Index c = 0; c < q.cols(); ++c) {
        sum += std::abs(static_cast<double>(q(i, c)) * static_cast<double>(k(j, c)));
      }
      a = std::max(a, std::abs(scale) * sum);
    }
    tol[static_cast<std::size_t>(i)] = 4 * u * (d * a + extra + n_k + 8) * std::max(v_max, 1e-30);
  }
  return tol;
}

/// Tolerance of one log-sum-exp entry: the weights' relative error above (without the output
/// summation) becomes an absolute error of log(Σ p): 4·u·(d·A_i + E + n_k + 8), the same formula
/// with max|v| replaced by 1 (a relative error ε of Σ p is an absolute error ≈ ε of its log).
template <class T, class Q, class K>
std::vector<double> lse_tolerance(const Q& q, const K& k, double scale, double extra = 0) {
  Matrix<double> ones = Matrix<double>::Ones(std::max<Index>(k.rows(), 1), 1);
  return attention_tolerance<T>(q, k, ones, scale, extra);
}

}  // namespace blockattn::test
