#pragma once
// A benchmark baseline, not library API: softmax + top-k without fusion (Safe softmax of the whole
// row into a buffer, then std::partial_sort of all n indices), against which softmax_bench and
// softmax_test measure and check the fused softmax_topk().

#include <algorithm>
#include <numeric>
#include <vector>

#include <Eigen/Core>

#include <blockattn/softmax.hpp>
#include <blockattn/types.hpp>

namespace blockattn::bench {

/// The unfused baseline of softmax_topk(): same outputs and validation, except that entries whose
/// probabilities round to the same value are ordered by index rather than by x. O(n log k) time,
/// O(n) extra memory (two allocations per call).
template <class T>
Index softmax_topk_unfused(Eigen::Ref<const RowVector<T>> x, Index k,
                           Eigen::Ref<RowVector<T>> values, Eigen::Ref<RowVector<Index>> indices) {
  const Index kept = detail::softmax_kernel::require_topk_views("bench::softmax_topk_unfused", x, k,
                                                                values, indices);
  if (kept == 0) return 0;
  const Index n = x.size();
  std::vector<T> probabilities(static_cast<std::size_t>(n));
  detail::softmax_kernel::softmax_row(x.data(), n, probabilities.data(), SoftmaxAlgorithm::Safe);
  std::vector<Index> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), Index(0));
  const auto probability = [&](Index j) { return probabilities[static_cast<std::size_t>(j)]; };
  std::partial_sort(order.begin(), order.begin() + kept, order.end(), [&](Index a, Index b) {
    return probability(a) > probability(b) || (probability(a) == probability(b) && a < b);
  });
  for (Index i = 0; i < kept; ++i) {
    indices[i] = order[static_cast<std::size_t>(i)];
    values[i] = probability(indices[i]);
  }
  return kept;
}

}  // namespace blockattn::bench
