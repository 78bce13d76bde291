// Checks that the heap tracker sees Eigen's allocations: a dense n×n score buffer must show up as
// 4·n² bytes of peak heap. Also the baseline every other peak_heap counter is read against.
#include <benchmark/benchmark.h>

#include <blockattn/types.hpp>

#include "support/heap_tracker.hpp"

namespace {

void BM_HeapTracker_DenseScores(benchmark::State& state) {
  const blockattn::Index n = state.range(0);
  std::size_t peak = 0;
  for (auto _ : state) {
    peak = blockattn::bench::measure_extra_heap([&] {
      blockattn::Matrix<float> scores(n, n);
      scores.setZero();
      benchmark::DoNotOptimize(scores.data());
      benchmark::ClobberMemory();
    });
  }
  state.counters["peak_heap"] = benchmark::Counter(
      static_cast<double>(peak), benchmark::Counter::kDefaults, benchmark::Counter::OneK::kIs1024);
}
BENCHMARK(BM_HeapTracker_DenseScores)->ArgName("n")->Arg(256)->Arg(1024)->Arg(2048);

}  // namespace

BENCHMARK_MAIN();
