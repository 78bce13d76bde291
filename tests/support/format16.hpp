#pragma once
// The 16-bit storage formats in tests: their unit roundoff and random inputs rounded to them.

#include <cmath>
#include <random>
#include <type_traits>

#include <blockattn/types.hpp>

namespace blockattn::test {

/// The format's unit roundoff: 2^-8 (bfloat16: 8 significant bits), 2^-11 (half: 11).
template <class S>
double format_u() {
  return std::is_same_v<S, Eigen::bfloat16> ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
}

/// rows × cols values uniform in [lo, hi], rounded to S (not on a grid: the inputs' rounding to
/// the format is part of what runs).
template <class S>
Matrix<S> random16(std::mt19937_64& rng, Index rows, Index cols, double lo = -1, double hi = 1) {
  std::uniform_real_distribution<double> dist(lo, hi);
  Matrix<S> m(rows, cols);
  for (Index r = 0; r < rows; ++r) {
    for (Index c = 0; c < cols; ++c) m(r, c) = static_cast<S>(static_cast<float>(dist(rng)));
  }
  return m;
}

}  // namespace blockattn::test
