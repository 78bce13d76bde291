#pragma once
// The online-softmax arithmetic (Milakov & Gimelshein 2018, "Online normalizer calculation for
// softmax", Algorithm 3 and the ⊕ operator of section 3.1), written once. OnlineSoftmax
// (softmax.hpp), the attention kernels and the state merge all go through these functions, so the
// special cases (−inf, +inf, NaN) are decided in one place.

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include <Eigen/Core>

#include <blockattn/types.hpp>

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

/// The online-softmax state of a block of query rows (Rabe & Staats 2021, section 3; the deferred
/// normalisation of Milakov & Gimelshein's Algorithm 3 applied to the output). Non-owning: m, l
/// and acc live in the caller's workspace. After folding in the key tiles seen so far, for each
/// row r:  m_r = max_j s_rj,  l_r = Σ_j exp(s_rj − m_r),  acc_r = Σ_j exp(s_rj − m_r)·v_j.
/// A masked score is −inf and contributes exactly 0; a row that has seen only −inf keeps
/// m = −inf, l = 0, acc = 0 and finishes as output 0, lse −inf.
template <class T>
class RowBlockState {
 public:
  using Block = Eigen::Map<Matrix<T>>;

  RowBlockState(T* m, T* l, T* acc, Index rows, Index d_v)
      : m_(m), l_(l), acc_(acc, rows, d_v), rows_(rows) {}

  /// Forgets every key: m = −inf, l = 0, acc = 0.
  void reset() {
    for (Index r = 0; r < rows_; ++r) {
      m_[r] = kNegativeInfinity<T>;
      l_[r] = T(0);
    }
    acc_.setZero();
  }

  /// Folds in one tile: p = exp(s − m_new) overwrites the scores s [rows, cols] (masked entries
  /// −inf), then acc = acc·exp(m_old − m_new) + p·v_blk with v_blk [cols, d_v]. A −inf score gets
  /// weight exactly 0. O(rows·cols·(d_v + 1)); no allocation for chunk sizes whose GEMM packing
  /// fits Eigen's stack buffers.
  template <class VBlock>
  void update(Block& s, const VBlock& v_blk) {
    exponentiate(s, /*exact=*/true);
    accumulate(s, v_blk);
  }

  /// Step 1 of update(): moves each row to its new running max m_new = max(m, max_c s) —
  /// rescaling l and acc by exp(m_old − m_new) — and replaces the scores by exp(s − m_new).
  /// exact = true: a −inf score gives exactly 0 (scalar exp where a −inf may occur). exact =
  /// false: the vectorised exp, which gives a tiny positive value (≈ exp(−88) in float) for −inf,
  /// so the caller must zero masked entries itself before accumulate() (TileMasker::apply with 0
  /// does). Rows still at m = −inf (nothing visible yet) get weights exactly 0 either way.
  void exponentiate(Block& s, bool exact) {
    const Index cols = s.cols();
    for (Index r = 0; r < rows_; ++r) {
      T* row = s.data() + r * cols;
      const T tile_max = cols > 0 ? s.row(r).maxCoeff() : kNegativeInfinity<T>;
      const T m_new = running_max(m_[r], tile_max);
      const T alpha = rescale_factor(m_[r], m_new);
      m_[r] = m_new;
      if (alpha != T(1)) {
        l_[r] *= alpha;
        acc_.row(r) *= alpha;
      }
      if (m_new == kNegativeInfinity<T>) {  // every key so far masked: weights are exactly 0
        s.row(r).setZero();
      } else if (!exact && std::isfinite(m_new)) {
        s.row(r) = (s.row(r).array() - m_new).exp().matrix();
      } else {
        for (Index c = 0; c < cols; ++c) row[c] = softmax_weight(row[c], m_new);
      }
    }
  }

  /// Step 2 of update(): l += Σ_c p_rc per row and acc += p·v_blk, for weights p [rows, cols]
  /// from exponentiate() (masked entries exactly 0) and v_blk [cols, d_v].
  template <class VBlock>
  void accumulate(const Block& p, const VBlock& v_blk) {
    for (Index r = 0; r < rows_; ++r) l_[r] += p.row(r).sum();
    acc_.noalias() += p * v_blk;
  }

  /// The running output of rows [0, rows) (for kernels that add p·v themselves).
  Block& acc() { return acc_; }

  /// Writes out = acc / l and lse = m + log(l) (lse may be null) for the state's rows
  /// [first, first + count) into out [count, d_v]. A row with l = 0 (no visible key) gets out = 0
  /// and lse = −inf, never NaN.
  template <class Out>
  void finalize(Index first, Index count, Out&& out, T* lse) const {
    for (Index r = 0; r < count; ++r) {
      const Index row = first + r;
      if (l_[row] == T(0)) {
        out.row(r).setZero();
        if (lse != nullptr) lse[r] = kNegativeInfinity<T>;
        continue;
      }
      out.row(r) = acc_.row(row) / l_[row];
      if (lse != nullptr) lse[r] = m_[row] + std::log(l_[row]);
    }
  }

  /// finalize() for every row.
  template <class Out>
  void finalize(Out&& out, T* lse) const {
    finalize(0, rows_, std::forward<Out>(out), lse);
  }

 private:
  T* m_;
  T* l_;
  Block acc_;
  Index rows_;
};

}  // namespace blockattn::detail
