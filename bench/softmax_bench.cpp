// Softmax throughput: Naive / Safe / Online on one long row (1K elements, in L1, up to 64M, far
// out of the last-level cache) and on rows × cols batches (4000 × 1000..32000, the paper's
// shapes); a streaming copy of the same sizes as the bandwidth reference; fused softmax + top-k
// against the unfused baseline. Single thread.
//
// Counters: bytes_per_second counts the memory traffic each algorithm makes by design
// (sizeof(T)·n·accesses: Naive 3, Safe 4, Online 3, copy 2 — the paper's accounting, a formula
// over the measured time); items_per_second is elements/s, the user-facing throughput (equal
// work for every algorithm); peak_heap is measured (heap_tracker) over one call.
//
//   build/release/bench/softmax_bench --benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true --benchmark_counters_tabular=true
#include <cstdint>
#include <cstring>
#include <vector>

#include <benchmark/benchmark.h>

#include <blockattn/softmax.hpp>

#include "support/heap_tracker.hpp"
#include "support/softmax_topk_unfused.hpp"

namespace {

using blockattn::Index;
using blockattn::SoftmaxAlgorithm;

/// One input and one output buffer per scalar type, grown to the largest size asked for and
/// shared by every benchmark, so a 64M-element row is filled once, not once per run.
template <class T>
struct Buffers {
  std::vector<T> x;
  std::vector<T> y;

  static Buffers& get(Index n) {
    static Buffers buffers;
    const auto size = static_cast<std::size_t>(n);
    if (buffers.x.size() < size) {
      buffers.x.resize(size);
      buffers.y.assign(size, T(0));
      // Values uniform in [−8, 8) in random order (xorshift: 64M values in a fraction of a
      // second), so the online max grows rarely, as with real logits.
      std::uint64_t state = 0x9E3779B97F4A7C15ULL;
      for (auto& v : buffers.x) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        v = static_cast<T>(static_cast<double>(state >> 11) * 0x1.0p-53 * 16.0 - 8.0);
      }
    }
    return buffers;
  }
};

constexpr int accesses(SoftmaxAlgorithm algorithm) {
  return algorithm == SoftmaxAlgorithm::Safe ? 4 : 3;
}

void add_context() {
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::AddCustomContext("threads", "1");
}

void set_counters(benchmark::State& state, Index elements, int accesses_per_element,
                  std::size_t element_size, std::size_t peak) {
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * elements);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * elements *
                          accesses_per_element * static_cast<std::int64_t>(element_size));
  state.counters["peak_heap"] = benchmark::Counter(
      static_cast<double>(peak), benchmark::Counter::kDefaults, benchmark::Counter::OneK::kIs1024);
}

// --- one long row -----------------------------------------------------------------------------

template <class T, SoftmaxAlgorithm Algorithm>
void BM_Softmax(benchmark::State& state) {
  const Index n = state.range(0);
  Buffers<T>& buffers = Buffers<T>::get(n);
  const T* x = buffers.x.data();
  T* y = buffers.y.data();
  const std::size_t peak =
      blockattn::bench::measure_extra_heap([&] { blockattn::softmax(x, n, y, Algorithm); });
  for (auto _ : state) {
    blockattn::softmax(x, n, y, Algorithm);
    benchmark::DoNotOptimize(y);
    benchmark::ClobberMemory();
  }
  set_counters(state, n, accesses(Algorithm), sizeof(T), peak);
}

/// The bandwidth reference: memcpy of the same n elements (one read, one write per element).
template <class T>
void BM_Copy(benchmark::State& state) {
  const Index n = state.range(0);
  Buffers<T>& buffers = Buffers<T>::get(n);
  for (auto _ : state) {
    std::memcpy(buffers.y.data(), buffers.x.data(), static_cast<std::size_t>(n) * sizeof(T));
    benchmark::DoNotOptimize(buffers.y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, n, 2, sizeof(T), 0);
}

// 1K (4 KiB of float: L1) … 1M (L2/L3) … 16M and 64M (64 and 256 MiB: far out of L3).
void row_sizes_float(benchmark::internal::Benchmark* b) {
  b->ArgName("n")->Unit(benchmark::kMicrosecond);
  for (const std::int64_t n : {1 << 10, 1 << 15, 1 << 20, 1 << 24, 1 << 26}) b->Arg(n);
}
void row_sizes_double(benchmark::internal::Benchmark* b) {
  b->ArgName("n")->Unit(benchmark::kMicrosecond);
  for (const std::int64_t n : {1 << 10, 1 << 20, 1 << 24}) b->Arg(n);
}

BENCHMARK_TEMPLATE(BM_Copy, float)->Apply(row_sizes_float);
BENCHMARK_TEMPLATE(BM_Softmax, float, SoftmaxAlgorithm::Naive)->Apply(row_sizes_float);
BENCHMARK_TEMPLATE(BM_Softmax, float, SoftmaxAlgorithm::Safe)->Apply(row_sizes_float);
BENCHMARK_TEMPLATE(BM_Softmax, float, SoftmaxAlgorithm::Online)->Apply(row_sizes_float);
BENCHMARK_TEMPLATE(BM_Copy, double)->Apply(row_sizes_double);
BENCHMARK_TEMPLATE(BM_Softmax, double, SoftmaxAlgorithm::Naive)->Apply(row_sizes_double);
BENCHMARK_TEMPLATE(BM_Softmax, double, SoftmaxAlgorithm::Safe)->Apply(row_sizes_double);
BENCHMARK_TEMPLATE(BM_Softmax, double, SoftmaxAlgorithm::Online)->Apply(row_sizes_double);

// --- rows × cols batches (the paper's 4000 × V) -----------------------------------------------

template <class T, SoftmaxAlgorithm Algorithm>
void BM_SoftmaxBatch(benchmark::State& state) {
  const Index rows = state.range(0);
  const Index cols = state.range(1);
  Buffers<T>& buffers = Buffers<T>::get(rows * cols);
  const Eigen::Map<const blockattn::Matrix<T>> x(buffers.x.data(), rows, cols);
  Eigen::Map<blockattn::Matrix<T>> y(buffers.y.data(), rows, cols);
  const std::size_t peak =
      blockattn::bench::measure_extra_heap([&] { blockattn::softmax(x, y, Algorithm); });
  for (auto _ : state) {
    blockattn::softmax(x, y, Algorithm);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, rows * cols, accesses(Algorithm), sizeof(T), peak);
}

template <class T>
void BM_CopyBatch(benchmark::State& state) {
  const Index elements = state.range(0) * state.range(1);
  Buffers<T>& buffers = Buffers<T>::get(elements);
  for (auto _ : state) {
    std::memcpy(buffers.y.data(), buffers.x.data(), static_cast<std::size_t>(elements) * sizeof(T));
    benchmark::DoNotOptimize(buffers.y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, elements, 2, sizeof(T), 0);
}

void batch_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"rows", "cols"})->Unit(benchmark::kMillisecond);
  for (const std::int64_t cols : {1000, 4000, 32000}) b->Args({4000, cols});
}

BENCHMARK_TEMPLATE(BM_CopyBatch, float)->Apply(batch_shapes);
BENCHMARK_TEMPLATE(BM_SoftmaxBatch, float, SoftmaxAlgorithm::Naive)->Apply(batch_shapes);
BENCHMARK_TEMPLATE(BM_SoftmaxBatch, float, SoftmaxAlgorithm::Safe)->Apply(batch_shapes);
BENCHMARK_TEMPLATE(BM_SoftmaxBatch, float, SoftmaxAlgorithm::Online)->Apply(batch_shapes);

// --- softmax + top-k ----------------------------------------------------------------------------

/// Fused (one read: Algorithm 4) or unfused (Safe softmax into a buffer, then partial sort).
template <class T, bool Fused>
void BM_TopK(benchmark::State& state) {
  const Index n = state.range(0);
  const Index k = state.range(1);
  Buffers<T>& buffers = Buffers<T>::get(n);
  const Eigen::Map<const blockattn::RowVector<T>> x(buffers.x.data(), n);
  blockattn::RowVector<T> values(k);
  blockattn::RowVector<Index> indices(k);
  const auto call = [&] {
    if constexpr (Fused) {
      blockattn::softmax_topk(x, k, values, indices);
    } else {
      blockattn::bench::softmax_topk_unfused<T>(x, k, values, indices);
    }
  };
  const std::size_t peak = blockattn::bench::measure_extra_heap(call);
  for (auto _ : state) {
    call();
    benchmark::DoNotOptimize(values.data());
    benchmark::DoNotOptimize(indices.data());
    benchmark::ClobberMemory();
  }
  // Traffic by design: one read (fused); 4 accesses for Safe plus a read of the probabilities
  // and one of the n indices (unfused).
  set_counters(state, n, Fused ? 1 : 5, sizeof(T), peak);
}

void topk_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "k"})->Unit(benchmark::kMicrosecond);
  for (const std::int64_t n : {25000, 250000, 4000000}) {
    for (const std::int64_t k : {1, 5, 16}) b->Args({n, k});
  }
}

BENCHMARK_TEMPLATE(BM_TopK, float, /*Fused=*/true)->Apply(topk_shapes);
BENCHMARK_TEMPLATE(BM_TopK, float, /*Fused=*/false)->Apply(topk_shapes);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  add_context();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
