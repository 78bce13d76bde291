#pragma once
// The online-softmax arithmetic (Milakov & Gimelshein 2018, "Online normalizer calculation for
// softmax", Algorithm 3 and the ⊕ operator of section 3.1), written once. OnlineSoftmax
// (softmax.hpp), the attention kernels and the state merge all go through these functions, so the
// special cases (−inf, +inf, NaN) are decided in one place.

#include <algorithm>
#include <cmath>
#include <limits>

namespace blockattn::detail {

template <class T>
inline constexpr T kNegativeInfinity = -std::numeric_limits<T>::infinity();

/// The larger of two running maxima. A NaN argument is ignored here; it still reaches the sum
/// through exp(NaN − m) = NaN, so NaN propagates to the row's result.
template <class T>
constexpr T running_max(T m, T x) {
  return x > m ? x : m;
}

/// Factor that re-expresses a sum taken relative to max `m_old` relative to `m_new` >= `m_old`:
/// exp(m_old − m_new). The one guard against (±inf) − (±inf) = NaN: equal maxima give 1. An
/// empty state (m_old = −inf) gives 0, so its sum of 0 stays 0 even when m_new is very negative.
template <class T>
T rescale_factor(T m_old, T m_new) {
  if (m_old == m_new) return T(1);
  return std::exp(m_old - m_new);
}

/// The point that exponents are taken relative to for a row with running max `m`: m itself, or 0
/// while the row has seen only −inf, so that every masked score gives exp(−inf − 0) = 0, not NaN.
template <class T>
constexpr T exp_origin(T m) {
  return m == kNegativeInfinity<T> ? T(0) : m;
}

/// The unnormalised weight exp(x − m) of one score `x` under running max `m` >= x. Equal finite
/// or +inf values give 1, which makes +inf scores share the probability equally (the limit of the
/// finite case). A −inf score always gives 0, also when m is −inf (a row that has seen only −inf
/// has sum 0, the same state as an empty one, so a fully masked row comes out as zeros).
/// Vectorised kernels use exp(x − exp_origin(m)) and send rows whose max is +inf here.
template <class T>
T softmax_weight(T x, T m) {
  if (x == m && x != kNegativeInfinity<T>) return T(1);
  return std::exp(x - exp_origin(m));
}

}  // namespace blockattn::detail
