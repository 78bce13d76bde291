// Runtime dispatch against a -march=native build, in one binary (issue 20 item 3's target: the
// dispatched binary within 3% of -march=native on prefill and decode). This TU is compiled for
// baseline x86-64 (the library's SSE2 variant flags, whatever CMAKE_CXX_FLAGS say) and calls
// blockattn::dispatch::attention, which runs the best variant this CPU has;
// dispatch_bench_native.cpp is compiled with -march=native and calls the header-only
// blockattn::attention. Each benchmark runs both (argument native: 0 dispatched, 1 native) on the
// same inputs; run them interleaved so that both see the same machine state, and compare the
// medians of each pair:
//   dispatch_bench --benchmark_enable_random_interleaving=true --benchmark_repetitions=10
//                  --benchmark_report_aggregates_only=true
// The label names the code that ran: the dispatched variant (dispatch::isa()) or the native TU's
// ISA tag. The library compiles each variant under names of its own (src/dispatch/CMakeLists.txt),
// so the native TU's kernels and the variant's stay separate copies even when both are built for
// the same ISA.
//
// Cases, one thread each (the shapes): prefill on [1, 4096, 8, d] q, k, v, out (d = 64,
// 128), all float or all bfloat16; decode of one query row over a cache of n_k = 262,144 tokens,
// 8 query heads on 8 K/V heads, d = 64, 128, float q and out over a float or bfloat16 cache.
// Counters: FLOP/s (formula: 4·n_q·n_k·d per head — 2·(d + d_v) FLOPs per pair with d_v = d —
// over the measured time) and, for decode, kv_bytes_per_second (formula: the cache's bytes,
// sizeof(KV)·n_k·kv_heads·2d, once per call) and tokens_per_second.
#include "dispatch_bench.hpp"

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include <benchmark/benchmark.h>

#include <blockattn/dispatch.hpp>

#include "support/hash_inputs.hpp"

namespace {

using blockattn::Index;
using blockattn::bench::HashedTensor;
using dispatch_bench::Case;

/// The bfloat16 bits of x, rounded to nearest even (x finite).
std::uint16_t bf16_bits(float x) {
  std::uint32_t bits = 0;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(bits >> 16);
}

/// `count` hashed values of `tensor` (bench/support/hash_inputs.hpp), as float or bfloat16 bits.
/// Bytes, so that neither TU's Eigen builds them: each reads them as its own element type.
std::vector<unsigned char> inputs(HashedTensor tensor, Index count, bool bf16) {
  std::vector<unsigned char> bytes(static_cast<std::size_t>(count) * (bf16 ? 2 : 4));
  for (Index i = 0; i < count; ++i) {
    const float x = blockattn::bench::hashed_value(tensor, static_cast<std::uint32_t>(i));
    if (bf16) {
      const std::uint16_t bits = bf16_bits(x);
      std::memcpy(bytes.data() + 2 * i, &bits, 2);
    } else {
      std::memcpy(bytes.data() + 4 * i, &x, 4);
    }
  }
  return bytes;
}

/// The dispatched call on the case (q and out of T, k and v of KT).
template <class T, class KT>
std::function<void()> dispatch_runner(const Case& c) {
  const auto q = blockattn::make_tensor_view(static_cast<const T*>(c.q), 1, c.n_q, c.heads, c.d);
  const auto k =
      blockattn::make_tensor_view(static_cast<const KT*>(c.k), 1, c.n_k, c.kv_heads, c.d);
  const auto v =
      blockattn::make_tensor_view(static_cast<const KT*>(c.v), 1, c.n_k, c.kv_heads, c.d);
  const auto out = blockattn::make_tensor_view(static_cast<T*>(c.out), 1, c.n_q, c.heads, c.d);
  blockattn::AttentionOptions options;
  options.threads = c.threads;
  return [q, k, v, out, options] { blockattn::dispatch::attention(q, k, v, out, options); };
}

/// Runs the case, dispatched (native == 0) or through the -march=native TU, and labels it.
void run(benchmark::State& state, Case c, bool native) {
  std::vector<unsigned char> q = inputs(HashedTensor::kQuery, c.n_q * c.heads * c.d, c.bf16_q);
  std::vector<unsigned char> k = inputs(HashedTensor::kKey, c.n_k * c.kv_heads * c.d, c.bf16_kv);
  std::vector<unsigned char> v = inputs(HashedTensor::kValue, c.n_k * c.kv_heads * c.d, c.bf16_kv);
  std::vector<unsigned char> out(q.size());
  c.q = q.data();
  c.k = k.data();
  c.v = v.data();
  c.out = out.data();
  using Bf16 = Eigen::bfloat16;
  std::function<void()> call;
  if (native) {
    call = dispatch_bench::native_runner(c);
    state.SetLabel(std::string("native ") + dispatch_bench::native_isa());
  } else {
    call = c.bf16_q    ? dispatch_runner<Bf16, Bf16>(c)
           : c.bf16_kv ? dispatch_runner<float, Bf16>(c)
                       : dispatch_runner<float, float>(c);
    state.SetLabel(std::string("dispatch ") + blockattn::dispatch::isa());
  }
  call();  // sizes the workspace; not timed
  for (auto _ : state) {
    call();
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double pairs = static_cast<double>(c.n_q) * static_cast<double>(c.n_k);
  state.counters["FLOP/s"] = benchmark::Counter(4.0 * pairs * static_cast<double>(c.d * c.heads),
                                                benchmark::Counter::kIsIterationInvariantRate);
}

/// Prefill: [1, n, 8, d], all of element type T (float or Eigen::bfloat16). Arguments n, d,
/// native.
template <class T>
void BM_DispatchPrefill(benchmark::State& state) {
  Case c;
  c.n_q = c.n_k = state.range(0);
  c.heads = c.kv_heads = 8;
  c.d = state.range(1);
  c.bf16_q = c.bf16_kv = std::is_same_v<T, Eigen::bfloat16>;
  run(state, c, state.range(2) != 0);
}

/// Decode: one query row, 8 heads over 8 K/V heads of n_k cached tokens, float q and out over a
/// cache of KV (float or Eigen::bfloat16). Arguments n_k, d, native.
template <class KV>
void BM_DispatchDecode(benchmark::State& state) {
  Case c;
  c.n_q = 1;
  c.n_k = state.range(0);
  c.heads = c.kv_heads = 8;
  c.d = state.range(1);
  c.bf16_kv = std::is_same_v<KV, Eigen::bfloat16>;
  run(state, c, state.range(2) != 0);
  state.counters["kv_bytes_per_second"] = benchmark::Counter(
      static_cast<double>(sizeof(KV)) * static_cast<double>(c.n_k * c.kv_heads * 2 * c.d),
      benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::OneK::kIs1000);
  state.counters["tokens_per_second"] =
      benchmark::Counter(1, benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK_TEMPLATE(BM_DispatchPrefill, float)
    ->ArgNames({"n", "d", "native"})
    ->ArgsProduct({{4096}, {64, 128}, {0, 1}})
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_DispatchPrefill, Eigen::bfloat16)
    ->ArgNames({"n", "d", "native"})
    ->ArgsProduct({{4096}, {64, 128}, {0, 1}})
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_DispatchDecode, float)
    ->ArgNames({"n_k", "d", "native"})
    ->ArgsProduct({{262144}, {64, 128}, {0, 1}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_DispatchDecode, Eigen::bfloat16)
    ->ArgNames({"n_k", "d", "native"})
    ->ArgsProduct({{262144}, {64, 128}, {0, 1}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
