#pragma once
// Finiteness checks and the "non-finite → 0" copies of the attention kernels' NaN slow paths
// (README, "Numerical conventions"; the forward's and the backward's rules are spelled out in
// detail/non_finite_values.hpp and detail/attention_backward_kernel.hpp). block_is_finite() is the
// one check on the fast path (once per chunk or tile, SIMD); the rest is plain scalar code for
// what is rare: a chunk or tile that failed that check, a merged row whose weight is 0.

#include <cmath>

#include <blockattn/detail/convert.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

/// True when every entry of the rows × cols block x (row stride ld) is finite: x·0 is ±0 for a
/// finite x and NaN for ±inf or NaN, so the sum of the products is 0 exactly when all are finite.
/// X may be a 16-bit storage format: widened (exactly; ±inf and NaN stay non-finite) as loaded.
template <class X>
bool block_is_finite(const X* x, Index ld, Index rows, Index cols) {
  using Io = StorageIo<X>;
  using T = typename Io::E;
  using S = simd::Simd<T>;
  using V = typename S::V;
  constexpr Index kLanes = S::kLanes;
  const Index full = cols / kLanes * kLanes;
  const int rest = static_cast<int>(cols - full);
  const V zero = S::zero();
  V probe0 = S::zero();
  V probe1 = S::zero();
  for (Index r = 0; r < rows; ++r) {
    const X* row = x + r * ld;
    Index c = 0;
    for (; c + 2 * kLanes <= full; c += 2 * kLanes) {
      probe0 = S::fma(Io::load(row + c), zero, probe0);
      probe1 = S::fma(Io::load(row + c + kLanes), zero, probe1);
    }
    if (c < full) probe0 = S::fma(Io::load(row + c), zero, probe0);
    if (rest > 0) probe1 = S::fma(Io::load_partial(row + full, rest, T(0)), zero, probe1);
  }
  return S::reduce_add(S::add(probe0, probe1)) == T(0);
}

/// x when it is finite, 0 when it is ±inf or NaN.
template <class T>
T finite_or_zero(T x) {
  return std::isfinite(x) ? x : T(0);
}

/// Whether every one of the n entries of x is finite (x of any storage type).
template <class T>
bool row_is_finite(const T* x, Index n) {
  for (Index c = 0; c < n; ++c) {
    if (!std::isfinite(to_compute(x[c]))) return false;
  }
  return true;
}

/// dst = src with every non-finite entry replaced by 0, for a rows × cols block (row strides
/// ld_src and ld_dst; dst must not overlap src). src may hold a 16-bit format S, widened to T.
template <class S, class T>
void copy_finite(const S* src, Index ld_src, Index rows, Index cols, T* dst, Index ld_dst) {
  for (Index r = 0; r < rows; ++r) {
    const S* from = src + r * ld_src;
    T* to = dst + r * ld_dst;
    for (Index c = 0; c < cols; ++c) to[c] = finite_or_zero(static_cast<T>(from[c]));
  }
}

/// dst = src with every non-finite entry replaced by 0, for Eigen blocks of the same shape; dst
/// may be src itself (an expression evaluated entry by entry). Kept an Eigen expression: the
/// pointer loop above costs the backward kernel more (docs/tuning.md#copy-finite-expression).
template <class Src, class Dst>
void copy_finite(const Src& src, Dst& dst) {
  using T = typename Dst::Scalar;
  dst = src.unaryExpr([](T x) { return finite_or_zero(x); });
}

/// Replaces every non-finite entry of x[0..n) by 0 in place (a packed buffer as one row). Stores
/// only what it changes, which is cheaper on finite input (docs/tuning.md#zero-non-finite-store).
template <class T>
void zero_non_finite(T* x, Index n) {
  for (Index e = 0; e < n; ++e) {
    if (!std::isfinite(x[e])) x[e] = T(0);
  }
}

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
