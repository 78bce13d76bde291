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

#include <blockattn/types.hpp>

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

}  // namespace blockattn::reference
