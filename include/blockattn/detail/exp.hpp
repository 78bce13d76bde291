#pragma once
// A vectorised exp on the SIMD layer (detail/simd.hpp), for float and double.
//
// Method: x = n·ln2 + r with n = round(x·log2 e) and |r| <= ln2/2 (plus rounding), the reduction
// done in two steps with ln2 split as ln2_hi + ln2_lo (Cody & Waite): n·ln2_hi is exact (ln2_hi
// has 9 significant bits in float, 32 in double, and |n| <= 1076), so r carries only the
// rounding error of the ln2_lo step. exp(r) is the Taylor polynomial of degree 7 (float) / 13
// (double), evaluated by Horner; its truncation error is |r|^8/8! / e^-|r| <= 7.4e-9 = 0.06 ulp
// (float) and |r|^14/14! / e^-|r| <= 6e-18 = 0.03 ulp (double) at |r| = ln2/2. The result is
// Simd::ldexp(exp(r), n): rounded once (vscalef on AVX-512; exp(r)·2^n1·2^n2 with n1 = round(n/2)
// elsewhere, both factors normal), so gradual underflow (denormal results) comes out correctly
// rounded from the polynomial value and overflow comes out as +inf.
//
// Special values, exact: exp(−inf) = 0, exp(+inf) = +inf, exp(NaN) = NaN, x below
// ln(denorm_min/2) gives +0, x above ln(max) gives +inf. Arguments are clamped to
// [kLow, kHigh] first (the clamp passes NaN through: see the NaN rule of Simd::max and min).
//
// Error bound, measured (tests/simd_test.cpp, ExpTest.*): the largest error against long double
// std::exp, in ulps of the exact result (denormal ulps below the normal range), over every 997th
// float by bit pattern in [−104, 89] plus 2'001 consecutive values around each boundary (overflow,
// the normal/denormal edge, the last nonzero result, 0, the clamps), 2.26 million arguments; for
// double, 10^6 random arguments (half in [−746, 710], half in [−1, 1]) plus the boundaries:
//   float : 0.866 ulp (AVX-512, AVX2+FMA), 1.180 ulp (SSE2 and scalar: no FMA)   asserted ≤ 2
//   double: 0.863 ulp (AVX-512, AVX2+FMA), 1.127 ulp (SSE2 and scalar)           asserted ≤ 2
// (`simd_test --gtest_filter='ExpTest*'` prints the figures; g++ 12, x86-64.)

#include <cstddef>
#include <cstdint>
#include <limits>

#include <blockattn/detail/config.hpp>
#include <blockattn/detail/simd.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

template <class T>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f;              // 355/512, 9 significant bits
  static constexpr float kLn2Lo = -2.12194440054690583e-4f;  // ln2 − kLn2Hi
  // exp(−104) < denorm_min/2 (rounds to +0), exp(89) > FLT_MAX: clamping there changes nothing.
  static constexpr float kLow = -104.0f;
  static constexpr float kHigh = 89.0f;
  static constexpr int kDegree = 7;
};

template <>
struct ExpConstants<double> {
  static constexpr double kLog2e = 1.4426950408889634;
  static constexpr double kLn2Hi = 0.6931471806019545;       // ln2 rounded to a multiple of 2^-32
  static constexpr double kLn2Lo = -4.2009150726810846e-11;  // ln2 − kLn2Hi
  // exp(−746) < denorm_min/2, exp(710) > DBL_MAX.
  static constexpr double kLow = -746.0;
  static constexpr double kHigh = 710.0;
  static constexpr int kDegree = 13;
};

/// k! for 0 <= k <= 20, exact.
constexpr std::int64_t factorial(int k) { return k <= 1 ? 1 : k * factorial(k - 1); }

/// The Taylor coefficients c[k] = 1/k!, k <= kDegree: each one correctly rounded division of
/// exact integers (14! < 2^63). A table built at compile time, because a loop that computes them
/// is folded only where the optimiser unrolls it (not at GCC -O2: there every vector paid for
/// factorial() and a scalar division per coefficient).
template <class T>
struct ExpCoefficients {
  static constexpr int kDegree = ExpConstants<T>::kDegree;
  T c[kDegree + 1];
  constexpr ExpCoefficients() : c() {
    for (int k = 0; k <= kDegree; ++k) c[k] = T(1) / static_cast<T>(factorial(k));
  }
};
template <class T>
inline constexpr ExpCoefficients<T> kExpCoefficients{};

/// exp of every lane of `x`; the error bound and special values are documented at the top of
/// this header. Pure register arithmetic: no tables, no memory access, no branches.
template <class T>
inline typename simd::Simd<T>::V simd_exp(typename simd::Simd<T>::V x) {
  using S = simd::Simd<T>;
  using C = ExpConstants<T>;
  using V = typename S::V;
  // max(a, b) returns b when either is NaN, so x goes second to carry a NaN through both clamps.
  x = S::max(S::set1(C::kLow), x);
  x = S::min(S::set1(C::kHigh), x);
  const V n = S::round_to_int(S::mul(x, S::set1(C::kLog2e)));
  V r = S::fma(n, S::set1(-C::kLn2Hi), x);
  r = S::fma(n, S::set1(-C::kLn2Lo), r);
  // Horner on the Taylor coefficients 1/k!, highest degree first.
  static_assert(C::kDegree <= 16, "blockattn: BLOCKATTN_UNROLL(16) must cover the degree");
  constexpr const T* kC = kExpCoefficients<T>.c;
  V p = S::set1(kC[C::kDegree]);
  BLOCKATTN_UNROLL(16)  // unrolled, so the coefficients are constants at -O2 too
  for (int k = C::kDegree - 1; k >= 0; --k) p = S::fma(p, r, S::set1(kC[k]));
  return S::ldexp(p, n);
}

/// y[i] = exp(x[i]) for i < count, through simd_exp (the tail with a partial vector). x and y may
/// be the same array.
template <class T>
inline void exp_array(const T* x, T* y, std::ptrdiff_t count) {
  using S = simd::Simd<T>;
  std::ptrdiff_t i = 0;
  for (; i + S::kLanes <= count; i += S::kLanes) S::store(y + i, simd_exp<T>(S::load(x + i)));
  if (i < count) {
    const int rest = static_cast<int>(count - i);
    S::store_partial(y + i, rest, simd_exp<T>(S::load_partial(x + i, rest, T(0))));
  }
}

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
