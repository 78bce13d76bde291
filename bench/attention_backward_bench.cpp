// attention_backward() against attention() (time ratio, same binary and run) and against the naive
// reference::attention_backward (materialised P), with the measured peak heap of each call above
// its inputs, outputs and gradients.
//
// The default run is short (n = 1024 and 4096, single thread: the ≤ 2.5× target is read at 4096).
// The big sizes carry "Large" in their names and run only when a filter selects them:
//   attention_backward_bench --benchmark_filter=Large --benchmark_counters_tabular=true
// Model FLOPs (FlashAttention's convention): forward 4·n_q·n_k·d per head, backward 2.5× that.

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

#include <blockattn/attention.hpp>
#include <blockattn/attention_backward.hpp>
#include <blockattn/reference.hpp>

#include "support/heap_tracker.hpp"

namespace {

using blockattn::AttentionOptions;
using blockattn::Index;
using blockattn::Matrix;

// q, k, v, dout random in [-1, 1]; out and lse from the forward pass.
template <class T>
struct Problem {
  Matrix<T> q, k, v, out, dout, dq, dk, dv;
  std::vector<T> lse;

  Problem(Index n, Index d, const AttentionOptions& options)
      : q(Matrix<T>::Random(n, d)),
        k(Matrix<T>::Random(n, d)),
        v(Matrix<T>::Random(n, d)),
        out(n, d),
        dout(Matrix<T>::Random(n, d)),
        dq(n, d),
        dk(n, d),
        dv(n, d),
        lse(static_cast<std::size_t>(n)) {
    blockattn::attention(q, k, v, out, options, lse);
  }

  /// attention_backward()'s arguments, by name.
  std::pair<blockattn::AttentionBackwardInputs<T>, blockattn::AttentionGradients<T>>
  backward_args() {
    blockattn::AttentionBackwardInputs<T> in;
    in.q = q, in.k = k, in.v = v, in.out = out, in.lse = lse, in.dout = dout;
    blockattn::AttentionGradients<T> grads;
    grads.dq = dq, grads.dk = dk, grads.dv = dv;
    return {in, grads};
  }
};

AttentionOptions bench_options(benchmark::State& state) {
  AttentionOptions options;
  options.threads = static_cast<int>(state.range(2));
  Eigen::setNbThreads(options.threads);
  return options;
}

void add_context(benchmark::State& state, double flops, double bytes, std::size_t peak) {
  state.counters["FLOP/s"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.SetBytesProcessed(static_cast<int64_t>(static_cast<double>(state.iterations()) * bytes));
  state.SetItemsProcessed(state.iterations() * state.range(0));
  state.counters["peak_heap"] = benchmark::Counter(
      static_cast<double>(peak), benchmark::Counter::kDefaults, benchmark::Counter::OneK::kIs1024);
}

double model_flops(benchmark::State& state) {
  const auto n = static_cast<double>(state.range(0));
  return 4 * n * n * static_cast<double>(state.range(1));
}

template <class T>
void BM_AttentionForward(benchmark::State& state) {
  const AttentionOptions options = bench_options(state);
  Problem<T> p(state.range(0), state.range(1), options);
  const auto call = [&] { blockattn::attention(p.q, p.k, p.v, p.out, options, p.lse); };
  const std::size_t peak = blockattn::bench::measure_extra_heap(call);
  for (auto _ : state) {
    call();
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  }
  add_context(state, model_flops(state),
              static_cast<double>(sizeof(T) * 4 * static_cast<std::size_t>(p.q.size())), peak);
}

template <class T>
void BM_AttentionBackward(benchmark::State& state) {
  const AttentionOptions options = bench_options(state);
  Problem<T> p(state.range(0), state.range(1), options);
  const auto args = p.backward_args();
  const auto call = [&] { blockattn::attention_backward(args.first, args.second, options); };
  const std::size_t peak = blockattn::bench::measure_extra_heap(call);
  for (auto _ : state) {
    call();
    benchmark::DoNotOptimize(p.dq.data());
    benchmark::ClobberMemory();
  }
  add_context(state, 2.5 * model_flops(state),
              static_cast<double>(sizeof(T) * 8 * static_cast<std::size_t>(p.q.size())), peak);
}

template <class T>
void BM_AttentionBackwardNaive(benchmark::State& state) {
  const AttentionOptions options = bench_options(state);
  Problem<T> p(state.range(0), state.range(1), options);
  const auto args = p.backward_args();
  const auto call = [&] {
    blockattn::reference::attention_backward(args.first, args.second, options);
  };
  const std::size_t peak = blockattn::bench::measure_extra_heap(call);
  for (auto _ : state) {
    call();
    benchmark::DoNotOptimize(p.dq.data());
    benchmark::ClobberMemory();
  }
  add_context(state, 2.5 * model_flops(state),
              static_cast<double>(sizeof(T) * 8 * static_cast<std::size_t>(p.q.size())), peak);
}

// Default: single thread at n = 1024 and 4096 (forward and backward side by side).
void small_sizes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "d", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
  for (const Index n : {1024, 4096}) b->Args({n, 64, 1});
}
// Large: 16K to 64K on every thread (peak heap flat in n is the point; times are long).
void large_sizes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "d", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
  for (const Index n : {16384, 32768, 65536}) b->Args({n, 64, 0});
}

BENCHMARK_TEMPLATE(BM_AttentionForward, float)->Apply(small_sizes);
BENCHMARK_TEMPLATE(BM_AttentionBackward, float)->Apply(small_sizes);
// The naive reference materialises four n×n matrices: 64 MiB each at n = 4096 in float.
BENCHMARK_TEMPLATE(BM_AttentionBackwardNaive, float)
    ->ArgNames({"n", "d", "threads"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Args({1024, 64, 1})
    ->Args({2048, 64, 1});
BENCHMARK_TEMPLATE(BM_AttentionForward, float)
    ->Name("BM_AttentionForwardLarge<float>")
    ->Apply(large_sizes);
BENCHMARK_TEMPLATE(BM_AttentionBackward, float)
    ->Name("BM_AttentionBackwardLarge<float>")
    ->Apply(large_sizes);
BENCHMARK_TEMPLATE(BM_AttentionBackwardNaive, float)
    ->Name("BM_AttentionBackwardNaiveLarge<float>")
    ->ArgNames({"n", "d", "threads"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Args({4096, 64, 1});

}  // namespace

// Like BENCHMARK_MAIN(), but without an explicit --benchmark_filter the "Large" sizes are skipped.
int main(int argc, char** argv) {
  std::vector<char*> args(argv, argv + argc);
  bool filtered = false;
  for (int i = 1; i < argc; ++i) {
    filtered = filtered || std::strncmp(argv[i], "--benchmark_filter", 18) == 0;
  }
  std::string skip_large = "--benchmark_filter=-Large";
  if (!filtered) args.push_back(skip_large.data());
  int count = static_cast<int>(args.size());
  benchmark::Initialize(&count, args.data());
  if (benchmark::ReportUnrecognizedArguments(count, args.data())) return 1;
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::AddCustomContext("chunks", "library defaults (query 64, key 256 at d = 64 float)");
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
