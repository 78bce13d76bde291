#pragma once
// The streaming-read loop behind the bandwidth ceilings that machine_bench and attention_bench
// report (BM_StreamRead, BM_StreamReadTwoStreams).

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

}  // namespace blockattn::bench
