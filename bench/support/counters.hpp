#pragma once
// The counters every attention benchmark reports (STYLE §2.11). Which are formulas and which are
// measured is said at each one.

#include <cstddef>

#include <benchmark/benchmark.h>

#include <blockattn/types.hpp>

namespace blockattn::bench {

/// The problem one benchmark call solves.
struct AttentionShape {
  Index batch = 1;
  Index heads = 1;     ///< query heads
  Index kv_heads = 1;  ///< key/value heads
  Index n_q = 0;
  Index n_k = 0;
  Index d = 0;
  Index d_v = 0;
  bool causal = false;  ///< bottom-right aligned
};

/// Query-key pairs a causal (bottom-right aligned) or full attention actually scores, per head.
inline double visible_pairs(const AttentionShape& s) {
  const auto n_q = static_cast<double>(s.n_q);
  const auto n_k = static_cast<double>(s.n_k);
  if (!s.causal) return n_q * n_k;
  // Query i sees keys j <= i + (n_k − n_q): min(n_k, max(0, i + n_k − n_q + 1)) keys.
  double pairs = 0;
  for (Index i = 0; i < s.n_q; ++i) {
    const Index seen = i + s.n_k - s.n_q + 1;
    pairs += static_cast<double>(seen < 0 ? 0 : (seen > s.n_k ? s.n_k : seen));
  }
  return pairs;
}

/// Sets FLOP/s (formula: 2·(d + d_v) FLOPs per visible pair and head — 4·n_q·n_k·d for full
/// attention with d_v = d, FlashAttention's convention — divided by the measured time),
/// bytes_per_second (formula: compulsory bytes sizeof(T)·(q + k + v + out) per call),
/// items_per_second (query tokens per second) and peak_heap (measured: the extra heap
/// high-water mark of one call, bench/support/heap_tracker).
template <class T>
void set_attention_counters(benchmark::State& state, const AttentionShape& s,
                            std::size_t peak_heap_bytes) {
  const double heads = static_cast<double>(s.batch * s.heads);
  const double flops = 2.0 * static_cast<double>(s.d + s.d_v) * visible_pairs(s) * heads;
  state.counters["FLOP/s"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  const double elements =
      static_cast<double>(s.batch) * (static_cast<double>(s.n_q * s.heads * (s.d + s.d_v)) +
                                      static_cast<double>(s.n_k * s.kv_heads * (s.d + s.d_v)));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(elements * sizeof(T)));
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * s.batch * s.n_q);
  state.counters["peak_heap"] =
      benchmark::Counter(static_cast<double>(peak_heap_bytes), benchmark::Counter::kDefaults,
                         benchmark::Counter::OneK::kIs1024);
}

}  // namespace blockattn::bench
