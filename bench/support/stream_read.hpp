#pragma once
// The streaming-read loop behind the bandwidth ceilings that machine_bench and attention_bench
// report (BM_StreamRead, BM_StreamReadTwoStreams).

#include <cstdint>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include <blockattn/detail/parallel.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/types.hpp>

namespace blockattn::bench {

/// Floats per visit to a stream: 256 bytes, one K or V row at d = 64 float.
inline constexpr Index kStreamTurn = 64;

/// Sums kStreams streams of per_stream floats each (stream s starts at base + s·per_stream; a
/// tail of fewer than kStreamTurn floats is not read), visiting them in turns of kStreamTurn
/// floats, as decode reads K and V. Four vector accumulators, so that the add latency does not
/// limit the loads. Returns the sum, so that the loads are not optimised away. Reads
/// kStreams·per_stream floats; no extra memory.
template <Index kStreams>
float sum_streams(const float* base, Index per_stream) {
  using S = detail::simd::Simd<float>;
  using V = S::V;
  V s0 = S::zero(), s1 = S::zero(), s2 = S::zero(), s3 = S::zero();
  for (Index i = 0; i + kStreamTurn <= per_stream; i += kStreamTurn) {
    for (Index stream = 0; stream < kStreams; ++stream) {
      const float* p = base + stream * per_stream + i;
      for (Index c = 0; c < kStreamTurn; c += 4 * S::kLanes) {
        s0 = S::add(s0, S::load(p + c));
        s1 = S::add(s1, S::load(p + c + S::kLanes));
        s2 = S::add(s2, S::load(p + c + 2 * S::kLanes));
        s3 = S::add(s3, S::load(p + c + 3 * S::kLanes));
      }
    }
  }
  return S::reduce_add(S::add(S::add(s0, s1), S::add(s2, s3)));
}

/// The benchmark body of BM_StreamRead (kStreams = 1) and BM_StreamReadTwoStreams (2): reads a
/// 1 GiB buffer (touched once before timing, so page faults are not in the figure) with
/// state.range(0) threads, each its contiguous part, as kStreams interleaved streams
/// (sum_streams). bytes_per_second = bytes per wall-clock second. The buffer is allocated once
/// per process and kept.
template <Index kStreams>
void stream_read(benchmark::State& state) {
  constexpr Index kBytes = Index(1) << 30;
  constexpr Index kCount = kBytes / Index(sizeof(float));
  const int threads = static_cast<int>(state.range(0));
  static std::vector<float> buffer;
  if (buffer.empty()) buffer.assign(static_cast<std::size_t>(kCount), 1.0f);
  const float* data = buffer.data();
  std::vector<float> totals(static_cast<std::size_t>(threads) * 16);  // a cache line per thread
  for (auto _ : state) {
    detail::parallel_for(threads, threads, [&](Index part, int) {
      const Index per_stream = kCount / threads / kStreams;
      totals[static_cast<std::size_t>(part) * 16] =
          sum_streams<kStreams>(data + part * per_stream * kStreams, per_stream);
    });
    benchmark::DoNotOptimize(totals.data());
    benchmark::ClobberMemory();
  }
  state.SetLabel("threads=" + std::to_string(threads));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * kBytes);
}

}  // namespace blockattn::bench
