#pragma once
// Softmax three ways (naive, safe, online) and the online-softmax state that every blockattn
// kernel merges through. Milakov & Gimelshein 2018, "Online normalizer calculation for softmax".

#include <cmath>

#include <Eigen/Core>

#include <blockattn/detail/online_state.hpp>
#include <blockattn/types.hpp>

namespace blockattn {

/// The running (max, sum) of an online softmax: after seeing x_1..x_n, max = max_j x_j and
/// sum = Σ_j exp(x_j − max). A default-constructed state has seen nothing (max = −inf, sum = 0)
/// and is the identity of merge(). merge() is the paper's ⊕: associative and commutative up to
/// rounding (each merge adds at most a few ulp of relative error to sum). O(1) space.
template <class T>
struct OnlineSoftmax {
  T max = detail::kNegativeInfinity<T>;  ///< largest value seen, −inf when none
  T sum = T(0);                          ///< Σ exp(x − max) over the values seen

  /// Adds one value. O(1).
  void update(T x) {
    const T new_max = detail::running_max(max, x);
    sum = sum * detail::rescale_factor(max, new_max) + detail::softmax_weight(x, new_max);
    max = new_max;
  }

  /// Adds `n` values in one pass (Algorithm 3 of the paper). O(n), no allocation.
  void update(const T* x, Index n) {
    for (Index j = 0; j < n; ++j) update(x[j]);
  }

  /// Combines with the state of a disjoint set of values: the state of their union. O(1).
  OnlineSoftmax& merge(const OnlineSoftmax& other) {
    const T new_max = detail::running_max(max, other.max);
    sum = sum * detail::rescale_factor(max, new_max) +
          other.sum * detail::rescale_factor(other.max, new_max);
    max = new_max;
    return *this;
  }

  /// log Σ exp(x) over the values seen: −inf when none (or all were −inf), NaN if any was NaN.
  T log_sum_exp() const { return max + std::log(sum); }
};

}  // namespace blockattn
