#pragma once
// Threading, in one place: the only file that mentions OpenMP. Without OpenMP everything runs on
// the calling thread.

#include <algorithm>

#include <Eigen/Core>

#include <blockattn/detail/config.hpp>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

/// The number of threads that `requested` (0 = all) means, never more than `tasks`, at least 1.
inline int resolve_threads(int requested, Eigen::Index tasks) {
#ifdef _OPENMP
  const int available = requested > 0 ? requested : omp_get_max_threads();
#else
  const int available = 1;
  static_cast<void>(requested);
#endif
  return static_cast<int>(std::max<Eigen::Index>(1, std::min<Eigen::Index>(available, tasks)));
}

/// Runs body(task, slot) for every task in [0, tasks) on `threads` threads; `slot` in
/// [0, threads) names the calling thread's workspace slice. Tasks are independent, so the
/// result does not depend on which thread runs which task. body must not throw.
/// Inside the region each thread's nthreads ICV is 1, so Eigen's own GEMM parallelisation stays
/// off (it would otherwise start nested teams when threads == 1) and each product runs serially.
template <class Body>
void parallel_for(Eigen::Index tasks, int threads, Body&& body) {
#ifdef _OPENMP
  if (tasks <= 0) return;
#pragma omp parallel num_threads(threads)
  {
    omp_set_num_threads(1);
    const int slot = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
    for (Eigen::Index task = 0; task < tasks; ++task) body(task, slot);
  }
#else
  static_cast<void>(threads);
  for (Eigen::Index task = 0; task < tasks; ++task) body(task, 0);
#endif
}

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
