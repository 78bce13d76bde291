#pragma once
// The online-softmax arithmetic (Milakov & Gimelshein 2018, "Online normalizer calculation for
// softmax", Algorithm 3 and the ⊕ operator of section 3.1), written once. OnlineSoftmax
// (softmax.hpp), the attention kernels and the state merge all go through these functions, so the
// special cases (−inf, +inf, NaN) are decided in one place.

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include <blockattn/detail/exp.hpp>
#include <blockattn/detail/finite.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

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

/// The fused sweep over one score tile, row by row (i < rows), in two passes over the row:
///   1. m_new = running_max(m[i], scale·max_j s[i, j])        (NaN scores ignored, −inf allowed)
///   2. s[i, j] ← p = exp(scale·s[i, j] − exp_origin(m_new)) for j < n_keys  (one fma, then
///      simd_exp), l_new = Σ_j p;
/// then α = rescale_factor(m[i], m_new), l[i] = α·l[i] + l_new, m[i] = m_new, and acc[i, c] *= α
/// for c < d_v when α != 1. A masked score is −inf and gives p = 0; a fully masked row keeps
/// m = −inf, l = 0 and acc unchanged. A row whose max is +inf goes through the scalar
/// softmax_weight (the +inf keys share the weight). max(scale·s) = scale·max(s) because rounding
/// is monotonic, so pass 1 does not multiply.
/// Preconditions: scale > 0 and finite; m, l: `rows` entries (start at −inf and 0); acc: rows ×
/// d_v with row stride ld_acc (start at 0); s: row stride ld_s >= n_keys.
template <class T>
inline void softmax_tile_update(T* s, Index ld_s, Index rows, Index n_keys, T scale, T* m, T* l,
                                T* acc, Index ld_acc, Index d_v) {
  using S = simd::Simd<T>;
  using V = typename S::V;
  constexpr Index kLanes = S::kLanes;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const Index full = n_keys / kLanes * kLanes;
  const int rest = static_cast<int>(n_keys - full);
  const V vscale = S::set1(scale);
  for (Index i = 0; i < rows; ++i) {
    T* row = s + i * ld_s;
    // Pass 1: the row max. Two accumulators hide the max latency.
    V vmax0 = S::set1(-kInf);
    V vmax1 = S::set1(-kInf);
    Index j = 0;
    for (; j + 2 * kLanes <= full; j += 2 * kLanes) {
      vmax0 = S::max(S::load(row + j), vmax0);
      vmax1 = S::max(S::load(row + j + kLanes), vmax1);
    }
    if (j < full) vmax0 = S::max(S::load(row + j), vmax0);
    if (rest > 0) vmax1 = S::max(S::load_partial(row + full, rest, -kInf), vmax1);
    const T row_max = S::reduce_max(S::max(vmax0, vmax1));
    const T m_old = m[i];
    const T m_new = running_max(m_old, row_max * scale);
    T row_sum = T(0);
    if (m_new == kInf) {
      for (Index jj = 0; jj < n_keys; ++jj) {
        row[jj] = softmax_weight(row[jj] * scale, m_new);
        row_sum += row[jj];
      }
    } else {
      // Pass 2: p = exp(scale·s − origin), in place, summed.
      const V neg_origin = S::set1(-exp_origin(m_new));
      V sum0 = S::zero();
      V sum1 = S::zero();
      j = 0;
      for (; j + 2 * kLanes <= full; j += 2 * kLanes) {
        const V p0 = simd_exp<T>(S::fma(S::load(row + j), vscale, neg_origin));
        const V p1 = simd_exp<T>(S::fma(S::load(row + j + kLanes), vscale, neg_origin));
        S::store(row + j, p0);
        S::store(row + j + kLanes, p1);
        sum0 = S::add(sum0, p0);
        sum1 = S::add(sum1, p1);
      }
      if (j < full) {
        const V p0 = simd_exp<T>(S::fma(S::load(row + j), vscale, neg_origin));
        S::store(row + j, p0);
        sum0 = S::add(sum0, p0);
      }
      if (rest > 0) {
        const V p1 =
            simd_exp<T>(S::fma(S::load_partial(row + full, rest, -kInf), vscale, neg_origin));
        S::store_partial(row + full, rest, p1);
        sum1 = S::add(sum1, p1);
      }
      row_sum = S::reduce_add(S::add(sum0, sum1));
    }
    const T alpha = rescale_factor(m_old, m_new);
    l[i] = alpha * l[i] + row_sum;
    m[i] = m_new;
    if (alpha != T(1)) {
      // Whole vectors explicitly: GCC -O2 does not vectorise a loop of unknown count.
      T* acc_row = acc + i * ld_acc;
      const V valpha = S::set1(alpha);
      const Index acc_full = d_v / kLanes * kLanes;
      for (Index c = 0; c < acc_full; c += kLanes) {
        S::store(acc_row + c, S::mul(S::load(acc_row + c), valpha));
      }
      for (Index c = acc_full; c < d_v; ++c) acc_row[c] *= alpha;
    }
  }
}

/// x as rounded to T, through an opaque copy: the compiler cannot fuse the product that made x
/// into a following addition (a contracted a·x + b·y rounds one product only, so merging state A
/// into B and B into A would differ in the last bit).
template <class T>
inline T rounded(T x) {
#if defined(__GNUC__) || defined(__clang__)
  __asm__("" : "+m"(x));
#endif
  return x;
}

/// The one merge rule (the ⊕ of Milakov & Gimelshein, section 3.1, extended to the output): the
/// state (m_a, l_a, acc_a) of one row becomes the state of the union of its keys and the disjoint
/// keys of (m_b, l_b, acc_b): m = max(m_a, m_b), l = α·l_a + β·l_b, acc = α·acc_a + β·acc_b with
/// α = exp(m_a − m), β = exp(m_b − m) (rescale_factor: an empty side, m = −inf, gets factor 0).
/// A side whose factor is 0 is skipped only when it is finite (l and acc); otherwise the full
/// formula runs, so that a NaN it holds — a NaN value seen with an underflowed weight, or a row
/// whose scores there were all NaN (m −inf, l NaN) — reaches the merged row (0·NaN = NaN).
/// acc_a and acc_b hold d_v values each (d_v = 0: the softmax state alone, acc unused); they may
/// be of another floating type than T (the output's), converted on the way. O(d_v).
/// OnlineSoftmax::merge, RowBlockState::merge and merge_attention_states all call this.
template <class T, class AccA, class AccB>
void merge_row(T& m_a, T& l_a, AccA* acc_a, T m_b, T l_b, const AccB* acc_b, Index d_v) {
  const T m_new = running_max(m_a, m_b);
  const T alpha = rescale_factor(m_a, m_new);
  const T beta = rescale_factor(m_b, m_new);
  const auto finite = [d_v](T l, const auto* acc) {
    return std::isfinite(l) && (d_v == 0 || row_is_finite(acc, d_v));
  };
  if (beta == T(0) && finite(l_b, acc_b)) {
    if (alpha != T(1)) {
      for (Index c = 0; c < d_v; ++c)
        acc_a[c] = static_cast<AccA>(alpha * static_cast<T>(acc_a[c]));
    }
    l_a *= alpha;
  } else if (alpha == T(0) && finite(l_a, acc_a)) {
    for (Index c = 0; c < d_v; ++c) acc_a[c] = static_cast<AccA>(beta * static_cast<T>(acc_b[c]));
    l_a = beta * l_b;
  } else {
    for (Index c = 0; c < d_v; ++c) {
      acc_a[c] =
          static_cast<AccA>(alpha * static_cast<T>(acc_a[c]) + beta * static_cast<T>(acc_b[c]));
    }
    l_a = rounded(alpha * l_a) + rounded(beta * l_b);  // commutative, even where FMA contracts
  }
  m_a = m_new;
}

/// Folds an attention sink into a finished row's state: the sink is one more term exp(sink) of the
/// denominator that carries no value, i.e. merge_row() with the state (m = sink, l = 1, acc = 0),
/// written out so that no row of zeros is needed. sink = −inf is no sink (nothing changes). An
/// empty row (m = −inf, l = 0) becomes m = sink, l = 1, acc 0: out 0 and lse = sink. A NaN the
/// row holds stays (NaN · 0 = NaN). O(d_v).
template <class T>
void fold_sink(T& m, T& l, T* acc, Index d_v, T sink) {
  if (sink == kNegativeInfinity<T>) return;
  const T m_new = running_max(m, sink);
  const T alpha = rescale_factor(m, m_new);
  const T beta = rescale_factor(sink, m_new);
  if (alpha != T(1)) {
    for (Index c = 0; c < d_v; ++c) acc[c] *= alpha;
  }
  l = rounded(alpha * l) + beta;
  m = m_new;
}

/// The output and log-sum-exp of a finished state: out = acc / l, lse = m + log(l); a state with
/// l = 0 (no visible key) gives out 0 and lse −inf, never NaN.
template <class T, class Acc, class Out>
void finalize_row(T m, T l, const Acc* acc, Out* out, Index d_v, T* lse) {
  if (l == T(0)) {
    for (Index c = 0; c < d_v; ++c) out[c] = Out(0);
    if (lse != nullptr) *lse = kNegativeInfinity<T>;
    return;
  }
  if constexpr (std::is_same_v<Acc, T> && std::is_same_v<Out, T>) {
    // Eigen's own vectorised quotient: GCC -O2 does not vectorise a loop of unknown count.
    Eigen::Map<RowVector<T>>(out, d_v) = Eigen::Map<const RowVector<T>>(acc, d_v) / l;
  } else {
    for (Index c = 0; c < d_v; ++c) out[c] = static_cast<Out>(static_cast<T>(acc[c]) / l);
  }
  if (lse != nullptr) *lse = m + std::log(l);
}

/// The online-softmax state of a block of query rows (Rabe & Staats 2021, section 3; the deferred
/// normalisation of Milakov & Gimelshein's Algorithm 3 applied to the output). Non-owning: m, l
/// and acc live in the caller's workspace (acc row-major with row stride ld_acc >= d_v). After
/// folding in the key tiles seen so far, for each row r:
///   m_r = max_j s_rj,  l_r = Σ_j exp(s_rj − exp_origin(m_r)),  acc_r = Σ_j exp(s_rj − …)·v_j.
/// A masked score is −inf and contributes exactly 0; a row that has seen only −inf keeps
/// m = −inf, l = 0, acc = 0 and finishes as output 0, lse −inf. The tile update is
/// softmax_tile_update() above (the one fused sweep), the combination of two states over disjoint
/// keys is merge() (the one merge rule).
template <class T>
class RowBlockState {
 public:
  RowBlockState(T* m, T* l, T* acc, Index rows, Index d_v, Index ld_acc)
      : m_(m), l_(l), acc_(acc), rows_(rows), d_v_(d_v), ld_acc_(ld_acc) {}

  /// Forgets every key: m = −inf, l = 0, acc = 0 (padding columns included).
  void reset() {
    std::fill(m_, m_ + rows_, kNegativeInfinity<T>);
    std::fill(l_, l_ + rows_, T(0));
    std::fill(acc_, acc_ + rows_ * ld_acc_, T(0));
  }

  /// Folds the scores s of rows [first, first + count) (row stride ld_s, n_keys columns, masked
  /// entries −inf, already scaled) into the state and overwrites them with the weights p; the
  /// caller then adds p·v into acc(first). See softmax_tile_update().
  void update_scores(T* s, Index ld_s, Index first, Index count, Index n_keys) {
    softmax_tile_update(s, ld_s, count, n_keys, T(1), m_ + first, l_ + first, acc(first), ld_acc_,
                        d_v_);
  }

  /// this ⊕ other for two states of the same rows over disjoint key sets: merge_row() on every
  /// row. O(rows·d_v).
  void merge(const RowBlockState& other) {
    for (Index r = 0; r < rows_; ++r) {
      merge_row(m_[r], l_[r], acc(r), other.m_[r], other.l_[r], other.acc(r), d_v_);
    }
  }

  /// Folds the sink logit into the finished rows [first, first + count) (fold_sink() on each),
  /// before finalize(). O(count·d_v).
  void fold_sink(Index first, Index count, T sink) {
    for (Index r = first; r < first + count; ++r)
      detail::fold_sink(m_[r], l_[r], acc(r), d_v_, sink);
  }

  /// Running max of row r (the tile update's rule: NaN scores are not counted).
  T max(Index r) const { return m_[r]; }

  /// Row r of the running output (d_v entries, then padding up to ld_acc()).
  T* acc(Index r) const { return acc_ + r * ld_acc_; }
  Index ld_acc() const { return ld_acc_; }

  /// Writes out = acc / l and lse = m + log(l) (lse may be null) for the state's rows
  /// [first, first + count) into out [count, d_v]. A row with l = 0 (no visible key) gets out = 0
  /// and lse = −inf, never NaN.
  template <class Out>
  void finalize(Index first, Index count, Out&& out, T* lse) const {
    for (Index r = 0; r < count; ++r) {
      const Index row = first + r;
      finalize_row(m_[row], l_[row], acc(row), out.row(r).data(), d_v_,
                   lse != nullptr ? lse + r : nullptr);
    }
  }

 private:
  T* m_;
  T* l_;
  T* acc_;
  Index rows_;
  Index d_v_;
  Index ld_acc_;
};

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
