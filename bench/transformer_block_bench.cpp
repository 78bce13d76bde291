// One pre-LN transformer layer (model 512, heads 8, ffn 2048, float) three ways, the comparison of
// the BPT paper (Liu & Abbeel 2023, section 4): vanilla (reference::transformer_block: full Q, K,
// V, every head's n×n scores, the n×ffn hidden layer), memory-efficient attention + unfused FFN
// (reference::transformer_block_unfused_ffn) and the fused blockwise layer (transformer_block).
// Counters: items_per_second = tokens/s (measured), FLOP/s (model FLOPs, formula below, over
// measured time), peak_heap (measured extra heap high-water mark of one call, heap_tracker),
// kv_bytes (formula: 2·n·model·sizeof(float), the K and V that BPT must keep).
//
// The default run is short (n <= 2048); long sequences go through a filter, e.g.
//   transformer_block_bench --benchmark_filter='n:(4096|8192|16384|32768|65536)/'
// Vanilla stops at n = 8192 (its scores alone are heads·n²·4 bytes = 2 GiB there) and the middle
// variant at 65,536 (~0.8 GiB); beyond that the benchmark reports SkipWithError.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include <blockattn/reference.hpp>
#include <blockattn/transformer_block.hpp>

#include "support/heap_tracker.hpp"
#include "support/transformer_block_unfused_ffn.hpp"

namespace {

using blockattn::Index;
using blockattn::Matrix;

constexpr Index kModel = 512;
constexpr Index kHeads = 8;
constexpr Index kFfn = 2048;

enum class Variant { Vanilla, Unfused, Bpt };

blockattn::TransformerBlockWeights<float> random_weights() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0F, 1.0F);
  auto w = blockattn::make_transformer_block_weights<float>(kModel, kHeads, kFfn);
  const auto fill = [&](auto& m, float scale) {
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = scale * normal(rng);
  };
  const float s_model = 1.0F / std::sqrt(static_cast<float>(kModel));
  for (auto* m : {&w.wq, &w.wk, &w.wv, &w.wo, &w.w1}) fill(*m, s_model);
  fill(w.w2, 1.0F / std::sqrt(static_cast<float>(kFfn)));
  for (auto* b : {&w.bq, &w.bk, &w.bv, &w.bo, &w.b2}) fill(*b, 0.1F);
  fill(w.b1, 0.1F);
  return w;
}

// Model FLOPs of one call: projections 2·n·model·(2·model + 2·kv_dim), FFN 4·n·model·ffn,
// attention 4·model per visible (query, key) pair (FlashAttention's convention, causal counts
// the visible pairs only). LayerNorm and the activation are O(n·(model + ffn)) and left out.
double layer_flops(Index n, bool causal) {
  const auto nd = static_cast<double>(n);
  const double pairs = causal ? nd * (nd + 1) / 2 : nd * nd;
  const double d = kModel;
  return nd * 2 * d * (4 * d) + nd * 4 * d * kFfn + 4 * d * pairs;
}

template <Variant V>
void BM_TransformerBlock(benchmark::State& state) {
  const Index n = state.range(0);
  const bool causal = state.range(1) != 0;
  const double cap = V == Variant::Vanilla ? 8192 : V == Variant::Unfused ? 65536 : 1 << 20;
  if (static_cast<double>(n) > cap) {
    state.SkipWithError("above this variant's memory cap (see the file's comment)");
    return;
  }
  const auto w = random_weights();
  Matrix<float> x(n, kModel);
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0F, 1.0F);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
  Matrix<float> y(n, kModel);
  blockattn::BlockOptions options;
  options.causal = causal;

  std::size_t peak = 0;
  for (auto _ : state) {
    const std::size_t call_peak = blockattn::bench::measure_extra_heap([&] {
      if constexpr (V == Variant::Vanilla) {
        blockattn::reference::transformer_block(w, x, y, options);
      } else if constexpr (V == Variant::Unfused) {
        blockattn::bench::transformer_block_unfused_ffn(w, x, y, options);
      } else {
        blockattn::transformer_block(w, x, y, options);
      }
    });
    peak = std::max(peak, call_peak);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * n);
  state.counters["FLOP/s"] =
      benchmark::Counter(layer_flops(n, causal), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_heap"] = benchmark::Counter(
      static_cast<double>(peak), benchmark::Counter::kDefaults, benchmark::Counter::OneK::kIs1024);
  state.counters["kv_bytes"] =
      benchmark::Counter(2.0 * static_cast<double>(n * kModel) * sizeof(float),
                         benchmark::Counter::kDefaults, benchmark::Counter::OneK::kIs1024);
}

void sequence_lengths(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "causal"});
  for (Index n = 512; n <= 65536; n *= 2) b->Args({n, 1});
  for (Index n = 512; n <= 65536; n *= 2) b->Args({n, 0});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK_TEMPLATE(BM_TransformerBlock, Variant::Vanilla)
    ->Name("BM_TransformerBlock_Vanilla<float>")
    ->Apply(sequence_lengths);
BENCHMARK_TEMPLATE(BM_TransformerBlock, Variant::Unfused)
    ->Name("BM_TransformerBlock_MemEffAttnUnfusedFfn<float>")
    ->Apply(sequence_lengths);
BENCHMARK_TEMPLATE(BM_TransformerBlock, Variant::Bpt)
    ->Name("BM_TransformerBlock_BPT<float>")
    ->Apply(sequence_lengths);

// BPT's block sizes at one n (tuning; not in the default run).
void BM_TransformerBlock_BPTBlocks(benchmark::State& state) {
  const Index n = state.range(0);
  const auto w = random_weights();
  const Matrix<float> x = Matrix<float>::Random(n, kModel);
  Matrix<float> y(n, kModel);
  blockattn::BlockOptions options;
  options.causal = true;
  options.query_block = state.range(1);
  options.ffn_chunk = state.range(2);
  std::size_t peak = 0;
  for (auto _ : state) {
    peak = std::max(peak, blockattn::bench::measure_extra_heap(
                              [&] { blockattn::transformer_block(w, x, y, options); }));
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * n);
  state.counters["peak_heap"] = benchmark::Counter(
      static_cast<double>(peak), benchmark::Counter::kDefaults, benchmark::Counter::OneK::kIs1024);
}
BENCHMARK(BM_TransformerBlock_BPTBlocks)
    ->ArgNames({"n", "query_block", "ffn_chunk"})
    ->ArgsProduct({{2048}, {32, 64, 128, 256}, {256, 512, 2048}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

// Without --benchmark_filter, run the short default: the three variants at n <= 2048.
int main(int argc, char** argv) {
  std::vector<char*> args(argv, argv + argc);
  bool filtered = false;
  for (int i = 1; i < argc; ++i) {
    filtered = filtered || std::strncmp(argv[i], "--benchmark_filter", 18) == 0;
  }
  std::string default_filter =
      "--benchmark_filter=^BM_TransformerBlock_[A-Za-z]+<float>/n:(512|1024|2048)/";
  if (!filtered) args.push_back(default_filter.data());
  int count = static_cast<int>(args.size());
  benchmark::Initialize(&count, args.data());
  if (benchmark::ReportUnrecognizedArguments(count, args.data())) return 1;
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::AddCustomContext("threads",
                              std::to_string(blockattn::detail::resolve_threads(0, 1 << 20)));
  benchmark::AddCustomContext("bpt_blocks", "query_block 128, ffn_chunk 512, key_block default");
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
