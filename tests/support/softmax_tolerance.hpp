#pragma once
// What softmax_test and softmax_16bit_test share: the algorithms they sweep, their names, and the
// relative error bound of each algorithm's float or double path.
//
// Test inputs are multiples of 1/64 with magnitude < 2^14, so every difference x − m is exact in
// float and double and the only errors are those of exp, sums and the final scaling. u = eps/2.

#include <blockattn/softmax.hpp>
#include <blockattn/types.hpp>

#include "tolerance.hpp"

namespace blockattn::test {

/// Every softmax algorithm, for sweeps.
inline constexpr SoftmaxAlgorithm kAlgorithms[] = {SoftmaxAlgorithm::Naive, SoftmaxAlgorithm::Safe,
                                                   SoftmaxAlgorithm::Online};

/// The algorithm's name, for traces.
inline const char* name_of(SoftmaxAlgorithm algorithm) {
  switch (algorithm) {
    case SoftmaxAlgorithm::Naive:
      return "Naive";
    case SoftmaxAlgorithm::Safe:
      return "Safe";
    case SoftmaxAlgorithm::Online:
      return "Online";
  }
  return "?";
}

// kExpError: relative error of the exp the kernels use, in units of u. The vectorised kernels use
// the library's simd_exp (detail/exp.hpp), whose error simd_test asserts to be <= 2 ulp on every
// build (measured 0.87 ulp with FMA, 1.18 ulp on SSE2 and scalar); one ulp of a normal result e
// is at most eps·|e| = 2u·|e|, so 2 ulp <= 4u relative. glibc's exp (the scalar paths: long
// double, rescale_factor, softmax_weight) is within 1 ulp = 2u. Hence 4u. softmax_test's
// ExpKernelIsWithin... test re-checks the bound through the softmax kernel itself on every build.
inline constexpr long double kExpError = 4;

/// The unit roundoff of T, in long double.
template <class T>
long double u() {
  return static_cast<long double>(unit_roundoff<T>());
}

// Naive and Safe: y_j = e_j · (1/l). e_j carries kExpError·u; l sums n such terms, (n − 1)u more
// to first order in any summation order; the reciprocal and the product add u each:
// |y − p| ≤ (2·kExpError + n + 1)·u·p. One more u for the second-order terms.
template <class T>
long double two_pass_tolerance(Index n) {
  return (2 * kExpError + static_cast<long double>(n) + 2) * u<T>();
}

// Online: each L1 tile's sum is a two-pass sum; merging the tiles with ⊕ multiplies a tile's sum
// by at most one rescale factor per later tile whose max is larger, each with kExpError·u from
// exp, u from the product and u from the addition: + tiles·(kExpError + 2)·u.
template <class T>
long double online_tolerance(Index n) {
  const Index tile = detail::softmax_kernel::kTile<T>;
  const Index tiles = (n + tile - 1) / tile;
  return two_pass_tolerance<T>(n) + static_cast<long double>(tiles) * (kExpError + 2) * u<T>();
}

/// The relative error bound of `algorithm` on a row of n values of T (float or double).
template <class T>
long double tolerance_for(SoftmaxAlgorithm algorithm, Index n) {
  return algorithm == SoftmaxAlgorithm::Online ? online_tolerance<T>(n) : two_pass_tolerance<T>(n);
}

}  // namespace blockattn::test
