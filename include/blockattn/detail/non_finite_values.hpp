#pragma once
// The forward kernels' slow path for a key chunk whose values are not all finite, shared by
// detail/prefill_kernel.hpp and detail/decode_kernel.hpp; the rules are below.

#include <cmath>
#include <limits>

#include <blockattn/detail/finite.hpp>
#include <blockattn/detail/online_state.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

// NaN and a hidden key's value (README, "Numerical conventions"). A masked score is −inf and its
// weight p is exactly 0, but the P·V micro-kernels multiply every weight of a tile by every value
// row, so 0·NaN = NaN (and 0·inf = NaN) would leak a hidden key's non-finite value into the rows
// that do not see it. Rows that do see the key must get it, even when their weight underflowed
// to 0. The fast path stays as it is; a key chunk whose values are not all finite (checked once
// per chunk, off the hot loop) takes this slow path instead:
//   1. before the tile update, a visible key (score not −inf) with a non-finite value whose weight
//      will underflow to 0 poisons its row now: acc = NaN in that value's columns (0·v = NaN);
//   2. the tile update and P·V run as usual on a copy of the chunk's values with every non-finite
//      entry replaced by 0 — exact for every finite term, and the rows no NaN reaches come out
//      bit-identical to a run without it;
//   3. after P·V, each weight p > 0 (visible) adds p·v for the non-finite entries of its key.
// Decode (the direct path, no packing) checks a chunk's values only when its score tile holds a
// −inf score, which keeps the per-chunk check off unmasked decode. The checks cost well under 1%
// of the instructions (docs/tuning.md#non-finite-checks).

/// True when some score of the rows × cols tile s (row stride ld_s) is −inf (a hidden key): the
/// lane-wise minimum (NaN scores are skipped by min's rule), then −max(−min) across lanes.
template <class T>
bool tile_has_hidden_key(const T* s, Index ld_s, Index rows, Index cols) {
  using S = simd::Simd<T>;
  using V = typename S::V;
  constexpr Index kLanes = S::kLanes;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const Index full = cols / kLanes * kLanes;
  const int rest = static_cast<int>(cols - full);
  V low = S::set1(kInf);
  for (Index i = 0; i < rows; ++i) {
    const T* row = s + i * ld_s;
    for (Index j = 0; j < full; j += kLanes) low = S::min(S::load(row + j), low);
    if (rest > 0) low = S::min(S::load_partial(row + full, rest, kInf), low);
  }
  return S::reduce_max(S::sub(S::zero(), low)) == kInf;
}

/// Slow path step 1, before the tile update of block rows [first, first + rows): for each visible
/// score x (not −inf, not NaN) whose weight under the row's coming maximum underflows to 0 and
/// whose key has a non-finite value, sets acc = NaN in those columns (0·NaN and 0·inf are NaN; the
/// later rescale keeps NaN). Reads the running max from `state`; s: row stride ld_s, `keys`
/// columns, already scaled and masked; value_row(j): the values of the chunk's key j (T or a
/// 16-bit storage format), any layout (a paged cache's rows are not one stride apart).
template <class T, class ValueRow>
void poison_underflowed_value_rows(const T* s, Index ld_s, Index first, Index rows, Index keys,
                                   const ValueRow& value_row, Index d_v,
                                   const RowBlockState<T>& state) {
  // exp(x) > 0 certainly while x >= log(smallest normal): cheaper than calling exp per score.
  const T surely_positive = std::log(std::numeric_limits<T>::min());
  for (Index i = 0; i < rows; ++i) {
    const T* row = s + i * ld_s;
    T row_max = kNegativeInfinity<T>;
    for (Index j = 0; j < keys; ++j) row_max = running_max(row_max, row[j]);
    const T m_new = running_max(state.max(first + i), row_max);
    const T origin = exp_origin(m_new);
    T* acc = state.acc(first + i);
    for (Index j = 0; j < keys; ++j) {
      const T x = row[j];
      if (x == kNegativeInfinity<T> || !(x - origin < surely_positive)) continue;
      if (softmax_weight(x, m_new) != T(0)) continue;
      const auto* vj = value_row(j);
      for (Index c = 0; c < d_v; ++c) {
        if (!std::isfinite(static_cast<T>(vj[c]))) acc[c] = std::numeric_limits<T>::quiet_NaN();
      }
    }
  }
}

/// poison_underflowed_value_rows() on values v (T or a 16-bit storage format VS), row stride ld_v.
template <class T, class VS>
void poison_underflowed_values(const T* s, Index ld_s, Index first, Index rows, Index keys,
                               const VS* v, Index ld_v, Index d_v, const RowBlockState<T>& state) {
  poison_underflowed_value_rows(
      s, ld_s, first, rows, keys, [v, ld_v](Index j) { return v + j * ld_v; }, d_v, state);
}

/// Slow path step 3, after P·V on the finite copy: acc[i, c] += p[i, j]·v[j, c] for every weight
/// p > 0 (a visible key) and every non-finite v[j, c]. p: rows × keys, row stride ld_p; v: T or a
/// 16-bit storage format VS.
template <class T, class VS>
void add_non_finite_values(const T* p, Index ld_p, Index rows, Index keys, const VS* v, Index ld_v,
                           Index d_v, T* acc, Index ld_acc) {
  for (Index j = 0; j < keys; ++j) {
    const VS* vj = v + j * ld_v;
    if (row_is_finite(vj, d_v)) continue;
    for (Index i = 0; i < rows; ++i) {
      const T w = p[i * ld_p + j];
      if (!(w > T(0))) continue;
      for (Index c = 0; c < d_v; ++c) {
        const T x = static_cast<T>(vj[c]);
        if (!std::isfinite(x)) acc[i * ld_acc + c] += w * x;
      }
    }
  }
}

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
