// The machine's own limits, so that every attention figure can be read as a fraction of what is
// possible, and a prototype of the forward pass built only from the detail/ micro-kernels:
//   BM_FmaPeak<T>/threads        independent FMA chains in registers: the arithmetic ceiling
//   BM_Bf16DotPeak/threads       the same with vdpbf16ps (AVX512_BF16): the bf16 ceiling, FLOP
//                                counted as 2 per bf16 pair (64 per instruction); skipped
//                                without __AVX512BF16__
//   BM_EigenGemm_QK<T>/n          Eigen GEMM S = Q·Kᵀ, [n, 64]·[64, n]   (2·n²·64 FLOP)
//   BM_EigenGemm_PV<T>/n          Eigen GEMM O = P·V,  [n, n]·[n, 64]    (2·n²·64 FLOP)
//   BM_StreamRead / BM_StreamCopy  bandwidth over a buffer far beyond the last-level cache
//   BM_TileAttention<T>/n/d/qb/kb tile_attention_forward: 4·n²·d FLOP per call (FlashAttention's
//                                  convention), plus peak_fraction = FLOP/s ÷ single-core peak
//                                  (the best of 10 calibration runs, so a loaded machine reads low)
//   BM_TileDecode<T>/n_k          one query row through the unpacked (decode) kernels, K + V
//   bytes/s BM_TileStep<T>/step/d         the tile step's parts one by one (96×256 tile)
// Built with -march=native (blockattn_native). Single-thread unless the name says threads.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#include <blockattn/detail/microkernel.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/types.hpp>

#include "support/heap_tracker.hpp"
#include "support/stream_read.hpp"
#include "support/tile_attention.hpp"

namespace {

using blockattn::Index;
using blockattn::Matrix;
using blockattn::detail::simd::Simd;

// ---------------------------------------------------------------------------------------------
// FMA peak

/// Independent accumulator chains. Zen 5 issues two 512-bit FMAs per cycle with a latency of 4
/// cycles, so at least 8 chains are needed; 16 leaves slack for the loop overhead. 16 chains were
/// within 1% of 24 and 32 (measured with `machine_bench --benchmark_filter=FmaPeak` while
/// editing kChains), and 8 gave 87% of 16.
constexpr int kChains = 16;
constexpr int kFmaSteps = 1 << 16;

/// Runs kFmaSteps rounds of kChains FMAs on registers; returns the chains' sum so that nothing is
/// dead.
template <class T>
BLOCKATTN_NOINLINE T fma_chains(T seed) {
  using S = Simd<T>;
  using V = typename S::V;
  V acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = S::set1(seed + T(c));
  // Multiplier just below 1 and addend tiny: the values stay finite and normal for ever.
  const V a = S::set1(T(0.999999));
  const V b = S::set1(T(1e-7));
  for (int step = 0; step < kFmaSteps; ++step) {
    for (int c = 0; c < kChains; ++c) acc[c] = S::fma(acc[c], a, b);
  }
  V total = acc[0];
  for (int c = 1; c < kChains; ++c) total = S::add(total, acc[c]);
  return S::reduce_add(total);
}

template <class T>
constexpr double fma_flops_per_call() {
  return 2.0 * kChains * Simd<T>::kLanes * kFmaSteps;
}

template <class T>
void BM_FmaPeak(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
    {
      T r = fma_chains<T>(static_cast<T>(omp_get_thread_num()));
      benchmark::DoNotOptimize(r);
    }
#else
    T r = fma_chains<T>(T(1));
    benchmark::DoNotOptimize(r);
#endif
  }
  state.counters["FLOP/s"] = benchmark::Counter(fma_flops_per_call<T>() * threads,
                                                benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(std::string(Simd<T>::kName) + ", " + std::to_string(kChains) + " chains");
}
// One thread on CPU time, like every single-thread figure here (the other core is shared with
// other jobs); two threads on wall-clock time.
BENCHMARK_TEMPLATE(BM_FmaPeak, float)->ArgName("threads")->Arg(1);
BENCHMARK_TEMPLATE(BM_FmaPeak, double)->ArgName("threads")->Arg(1);
#if defined(_OPENMP)
BENCHMARK_TEMPLATE(BM_FmaPeak, float)->ArgName("threads")->Arg(2)->UseRealTime();
BENCHMARK_TEMPLATE(BM_FmaPeak, double)->ArgName("threads")->Arg(2)->UseRealTime();
#endif

// ---------------------------------------------------------------------------------------------
// bf16 dot-product peak

/// vdpbf16ps: each float lane adds the products of one pair of bf16 values, 2 multiplies and
/// 2 adds, so 16 lanes × 4 = 64 FLOP per 512-bit instruction (the convention that makes a bf16
/// GEMM's 2·m·n·k FLOP comparable with the FMA peak's). Same chains and steps as fma_chains.
constexpr double bf16_dot_flops_per_call() { return 64.0 * kChains * kFmaSteps; }

#if defined(__AVX512BF16__)
/// Runs kFmaSteps rounds of kChains vdpbf16ps on registers; returns the lanes' sum.
BLOCKATTN_NOINLINE float bf16_dot_chains(float seed) {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(seed + static_cast<float>(c));
  // Pairs of 0.01 (bf16): each step adds 2e-4 a lane, ~13 over the run: finite and normal.
  const __m512 x = _mm512_set1_ps(0.01f);
  const __m512bh a = _mm512_cvtne2ps_pbh(x, x);
  const __m512bh b = _mm512_cvtne2ps_pbh(x, x);
  for (int step = 0; step < kFmaSteps; ++step) {
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  }
  __m512 sum = acc[0];
  for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[c]);
  return _mm512_reduce_add_ps(sum);
}
#endif

void BM_Bf16DotPeak(benchmark::State& state) {
#if defined(__AVX512BF16__)
  const int threads = static_cast<int>(state.range(0));
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
    {
      float r = bf16_dot_chains(static_cast<float>(omp_get_thread_num()));
      benchmark::DoNotOptimize(r);
    }
#else
    float r = bf16_dot_chains(1.0f);
    benchmark::DoNotOptimize(r);
#endif
  }
  state.counters["FLOP/s"] = benchmark::Counter(bf16_dot_flops_per_call() * threads,
                                                benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel("avx512_bf16 vdpbf16ps, " + std::to_string(kChains) + " chains");
#else
  state.SkipWithError(
      "skipped: built without __AVX512BF16__ (e.g. -march=native on a CPU with "
      "AVX512_BF16, -march=znver4, -march=sapphirerapids)");
#endif
}
// Timed like BM_FmaPeak, beside it: one thread on CPU time, two on wall-clock time.
BENCHMARK(BM_Bf16DotPeak)->ArgName("threads")->Arg(1);
#if defined(_OPENMP)
BENCHMARK(BM_Bf16DotPeak)->ArgName("threads")->Arg(2)->UseRealTime();
#endif

/// CPU time of the calling thread, in seconds: the same clock as Google Benchmark's CPU time.
double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

/// The single-core FMA peak in FLOP/s, measured once on thread CPU time (the best of 10 runs of
/// about 0.2 ms) for the peak_fraction counters of the attention benchmarks: a calibration with
/// the same clock as those benchmarks' CPU time, not a benchmark of its own.
template <class T>
double single_core_peak() {
  static const double peak = [] {
    double best = 0;
    for (int run = 0; run < 10; ++run) {
      const double start = thread_cpu_seconds();
      T r = fma_chains<T>(T(1));
      benchmark::DoNotOptimize(r);
      best = std::max(best, fma_flops_per_call<T>() / (thread_cpu_seconds() - start));
    }
    return best;
  }();
  return peak;
}

// ---------------------------------------------------------------------------------------------
// Eigen GEMM at the attention shapes (head dim 64)

constexpr Index kGemmHeadDim = 64;

template <class T>
void BM_EigenGemm_QK(benchmark::State& state) {
  const Index n = state.range(0);
  Eigen::setNbThreads(1);
  const Matrix<T> q = Matrix<T>::Random(n, kGemmHeadDim);
  const Matrix<T> k = Matrix<T>::Random(n, kGemmHeadDim);
  Matrix<T> s(n, n);
  s.setZero();
  for (auto _ : state) {
    s.noalias() = q * k.transpose();
    benchmark::DoNotOptimize(s.data());
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * double(n) * double(n) * kGemmHeadDim,
                                                benchmark::Counter::kIsIterationInvariantRate);
}

template <class T>
void BM_EigenGemm_PV(benchmark::State& state) {
  const Index n = state.range(0);
  Eigen::setNbThreads(1);
  const Matrix<T> p = Matrix<T>::Random(n, n);
  const Matrix<T> v = Matrix<T>::Random(n, kGemmHeadDim);
  Matrix<T> out(n, kGemmHeadDim);
  out.setZero();
  for (auto _ : state) {
    out.noalias() = p * v;
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * double(n) * double(n) * kGemmHeadDim,
                                                benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK_TEMPLATE(BM_EigenGemm_QK, float)
    ->ArgName("n")
    ->Arg(1024)
    ->Arg(2048)
    ->Arg(4096)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_EigenGemm_PV, float)
    ->ArgName("n")
    ->Arg(1024)
    ->Arg(2048)
    ->Arg(4096)
    ->Unit(benchmark::kMillisecond);

// ---------------------------------------------------------------------------------------------
// Streaming bandwidth

/// 1 GiB per buffer: the VM reports a 508 MiB "L3" (the host's total; a Zen 5 CCD has 32 MiB),
/// so this is at least twice any cache level either way. Touched once before timing, so page
/// faults (~1.3 GB/s here) are not in the figures.
constexpr std::size_t kStreamBytes = std::size_t(1) << 30;

std::vector<float>& stream_buffer(int which) {
  static std::vector<float> buffers[2];
  std::vector<float>& b = buffers[which];
  if (b.empty()) b.assign(kStreamBytes / sizeof(float), 1.0f);
  return b;
}

void BM_StreamRead(benchmark::State& state) {
  const std::vector<float>& buffer = stream_buffer(0);
  for (auto _ : state) {
    float total =
        blockattn::bench::sum_streams<1>(buffer.data(), static_cast<Index>(buffer.size()));
    benchmark::DoNotOptimize(total);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(kStreamBytes));
}
BENCHMARK(BM_StreamRead)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_StreamCopy(benchmark::State& state) {
  const std::vector<float>& src = stream_buffer(0);
  std::vector<float>& dst = stream_buffer(1);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), kStreamBytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  // Bytes read + bytes written (a write-allocate cache adds a hidden read of dst on top).
  state.SetBytesProcessed(2 * static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(kStreamBytes));
}
BENCHMARK(BM_StreamCopy)->Unit(benchmark::kMillisecond)->UseRealTime();

// ---------------------------------------------------------------------------------------------
// Prototype tile attention from the micro-kernels

template <class T>
void BM_TileAttention(benchmark::State& state) {
  const Index n = state.range(0);
  const Index d = state.range(1);
  const Index query_block = state.range(2);
  const Index key_block = state.range(3);
  Eigen::setNbThreads(1);
  const Matrix<T> q = Matrix<T>::Random(n, d);
  const Matrix<T> k = Matrix<T>::Random(n, d);
  const Matrix<T> v = Matrix<T>::Random(n, d);
  Matrix<T> out(n, d);
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
  std::size_t peak = 0;
  for (auto _ : state) {
    peak = blockattn::bench::measure_extra_heap([&] {
      // The workspace is allocated per call, as attention() would: O(blocks), not O(n).
      std::vector<T> workspace(static_cast<std::size_t>(
          blockattn::bench::tile_attention_workspace_size<T>(query_block, key_block, d, d)));
      blockattn::bench::tile_attention_forward(q.data(), d, k.data(), d, v.data(), d, n, n, d, d,
                                               scale, out.data(), d, query_block, key_block,
                                               workspace.data());
    });
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double flops = 4.0 * double(n) * double(n) * double(d);
  state.counters["FLOP/s"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_fraction"] = benchmark::Counter(
      flops / single_core_peak<T>(), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_heap"] = benchmark::Counter(
      static_cast<double>(peak), benchmark::Counter::kDefaults, benchmark::Counter::OneK::kIs1024);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(4 * n * d * Index(sizeof(T))));
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * n);
}
BENCHMARK_TEMPLATE(BM_TileAttention, float)
    ->ArgNames({"n", "d", "qb", "kb"})
    ->ArgsProduct({{2048, 4096}, {64, 128}, {96, 768}, {256}})
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_TileAttention, double)
    ->ArgNames({"n", "d", "qb", "kb"})
    ->ArgsProduct({{2048}, {64, 128}, {768}, {256}})
    ->Unit(benchmark::kMillisecond);

/// Decode: one query row against n_k keys, d = d_v = 64, chunks of 256 keys, through the direct
/// (unpacked) kernels and the fused sweep. bytes_per_second counts K and V (read once), to be read
/// against BM_StreamRead.
template <class T>
void BM_TileDecode(benchmark::State& state) {
  const Index n_k = state.range(0);
  constexpr Index kD = 64;
  constexpr Index kChunk = 256;
  const Matrix<T> q = Matrix<T>::Random(1, kD);
  const Matrix<T> k = Matrix<T>::Random(n_k, kD);
  const Matrix<T> v = Matrix<T>::Random(n_k, kD);
  std::vector<T> s(kChunk);
  std::vector<T> acc(kD);
  T m = 0;
  T l = 0;
  const T scale = T(0.125);
  for (auto _ : state) {
    m = blockattn::detail::kNegativeInfinity<T>;
    l = T(0);
    std::fill(acc.begin(), acc.end(), T(0));
    for (Index k0 = 0; k0 < n_k; k0 += kChunk) {
      const Index keys = std::min(kChunk, n_k - k0);
      blockattn::detail::score_rows_direct(q.data(), kD, 1, kD, k.data() + k0 * kD, kD, keys,
                                           s.data(), kChunk);
      blockattn::detail::softmax_tile_update(s.data(), kChunk, 1, keys, scale, &m, &l, acc.data(),
                                             kD, kD);
      blockattn::detail::accumulate_pv_direct(s.data(), kChunk, 1, keys, v.data() + k0 * kD, kD, kD,
                                              acc.data(), kD);
    }
    benchmark::DoNotOptimize(acc.data());
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] =
      benchmark::Counter(4.0 * double(n_k) * kD, benchmark::Counter::kIsIterationInvariantRate);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * 2 * n_k * kD *
                          static_cast<std::int64_t>(sizeof(T)));
}
BENCHMARK_TEMPLATE(BM_TileDecode, float)
    ->ArgName("n_k")
    ->Arg(262144)
    ->Arg(2097152)  // K + V = 1 GiB: beyond any cache, like BM_StreamRead
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

/// The three steps of one tile separately (query_block = 96 rows, key_block = 256 keys, data in
/// L1/L2): 0 = score_tile, 1 = softmax_tile_update, 2 = accumulate_pv, 3 = pack_k, 4 = pack_v.
/// FLOP/s counts 2·96·256·d for the products and 0 for the others; ns_per_score is the time per
/// score element of the tile (for the packs: per element of the tile they serve).
template <class T>
void BM_TileStep(benchmark::State& state) {
  const Index step = state.range(0);
  const Index d = state.range(1);
  constexpr Index kRows = 96;
  constexpr Index kKeys = 256;
  const Matrix<T> q = Matrix<T>::Random(kRows, d);
  const Matrix<T> k = Matrix<T>::Random(kKeys, d);
  const Matrix<T> v = Matrix<T>::Random(kKeys, d);
  std::vector<T> packed_k(static_cast<std::size_t>(blockattn::detail::packed_k_size<T>(kKeys, d)));
  std::vector<T> packed_v(static_cast<std::size_t>(blockattn::detail::packed_v_size<T>(kKeys, d)));
  blockattn::detail::pack_k(k.data(), d, kKeys, d, packed_k.data());
  blockattn::detail::pack_v(v.data(), d, kKeys, d, packed_v.data());
  const Index ld_s = blockattn::detail::padded_stride<T>(kKeys);
  std::vector<T> s(static_cast<std::size_t>(kRows * ld_s));
  std::vector<T> acc(static_cast<std::size_t>(kRows * d), T(0));
  std::vector<T> m(kRows, T(0));
  std::vector<T> l(kRows, T(0));
  blockattn::detail::score_tile(q.data(), d, kRows, d, packed_k.data(), kKeys, s.data(), ld_s);
  // The sweep runs in place, so from the second iteration on it sees its own output p in [0, 1]:
  // the same instructions (exp has no data-dependent path), α = 1 after the first call.
  for (auto _ : state) {
    if (step == 0) {
      blockattn::detail::score_tile(q.data(), d, kRows, d, packed_k.data(), kKeys, s.data(), ld_s);
    } else if (step == 1) {
      blockattn::detail::softmax_tile_update(s.data(), ld_s, kRows, kKeys, T(0.125), m.data(),
                                             l.data(), acc.data(), d, d);
    } else if (step == 3) {
      blockattn::detail::pack_k(k.data(), d, kKeys, d, packed_k.data());
    } else if (step == 4) {
      blockattn::detail::pack_v(v.data(), d, kKeys, d, packed_v.data());
    } else {
      blockattn::detail::accumulate_pv(s.data(), ld_s, kRows, kKeys, packed_v.data(), d, acc.data(),
                                       d);
    }
    benchmark::DoNotOptimize(s.data());
    benchmark::DoNotOptimize(acc.data());
    benchmark::ClobberMemory();
  }
  const double flops = step == 0 || step == 2 ? 2.0 * kRows * kKeys * double(d) : 0.0;
  state.counters["FLOP/s"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_fraction"] = benchmark::Counter(
      flops / single_core_peak<T>(), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["ns_per_score"] =
      benchmark::Counter(1e9 / (kRows * kKeys), benchmark::Counter::kIsIterationInvariantRate |
                                                    benchmark::Counter::kInvert);
}
BENCHMARK_TEMPLATE(BM_TileStep, float)
    ->ArgNames({"step", "d"})
    ->ArgsProduct({{0, 1, 2, 3, 4}, {64, 128}});
BENCHMARK_TEMPLATE(BM_TileStep, double)->ArgNames({"step", "d"})->ArgsProduct({{0, 1, 2}, {64}});
}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::AddCustomContext("blockattn_simd", Simd<float>::kName);
  benchmark::AddCustomContext("threads", "1 unless the benchmark name says threads");
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
