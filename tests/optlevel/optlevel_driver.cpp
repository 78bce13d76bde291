// One kernel call per run, for the optimisation-level test (check_optlevel.sh) and for reading
// the kernels' code at different -O levels: the same source is built at -O2 and at -O3, each run
// under callgrind, and the instruction counts of the calls compared. Only the timed calls are
// instrumented (CALLGRIND_START_INSTRUMENTATION / STOP, with valgrind --instr-atstart=no), so the
// input set-up and the first call (which allocates) do not count.
//
//   optlevel_driver <case> [size] [calls]
//     prefill64, prefill128   one head, n_q = n_k = size (default 1024), d = 64 / 128
//     decode                  one token, 8 query heads on 8 kv heads ([seq, heads, dim]), d = 64,
//                             n_k = size (default 16384)
//     softmax                 online softmax of one row of size floats (default 1 << 20)
// Prints a hash of the output, so that two builds can be checked for bitwise equal results.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <blockattn/attention.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/softmax.hpp>

#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#else
#define CALLGRIND_START_INSTRUMENTATION
#define CALLGRIND_STOP_INSTRUMENTATION
#endif

namespace {

using blockattn::Index;

/// Deterministic inputs in [-1, 1) (a 64-bit LCG: the same on every platform).
std::vector<float> random_floats(Index count, std::uint64_t seed) {
  std::vector<float> x(static_cast<std::size_t>(count));
  std::uint64_t state = seed * 6364136223846793005u + 1442695040888963407u;
  for (float& value : x) {
    state = state * 6364136223846793005u + 1442695040888963407u;
    value = static_cast<float>(static_cast<double>(state >> 40) / double(1u << 23) - 1.0);
  }
  return x;
}

/// FNV-1a of the bytes of x.
std::uint64_t hash(const std::vector<float>& x) {
  std::uint64_t h = 14695981039346656037u;
  for (const float value : x) {
    unsigned char bytes[sizeof value];
    std::memcpy(bytes, &value, sizeof value);
    for (const unsigned char byte : bytes) h = (h ^ byte) * 1099511628211u;
  }
  return h;
}

/// Runs `call` once uninstrumented (first-call allocations), then `calls` times instrumented.
template <class F>
void measure(int calls, F&& call) {
  call();
  CALLGRIND_START_INSTRUMENTATION;
  for (int i = 0; i < calls; ++i) call();
  CALLGRIND_STOP_INSTRUMENTATION;
}

/// attention() of one batch entry: heads query heads on kv_heads key/value heads, [seq, heads,
/// dim] layout, one thread.
std::vector<float> run_attention(Index heads, Index kv_heads, Index n_q, Index n_k, Index d,
                                 int calls) {
  const std::vector<float> q = random_floats(n_q * heads * d, 1);
  const std::vector<float> k = random_floats(n_k * kv_heads * d, 2);
  const std::vector<float> v = random_floats(n_k * kv_heads * d, 3);
  std::vector<float> out(static_cast<std::size_t>(n_q * heads * d));
  blockattn::AttentionOptions options;
  options.threads = 1;
  measure(calls, [&] {
    blockattn::attention(blockattn::make_tensor_view<const float>(q.data(), 1, n_q, heads, d),
                         blockattn::make_tensor_view<const float>(k.data(), 1, n_k, kv_heads, d),
                         blockattn::make_tensor_view<const float>(v.data(), 1, n_k, kv_heads, d),
                         blockattn::make_tensor_view<float>(out.data(), 1, n_q, heads, d), options);
  });
  return out;
}

std::vector<float> run_softmax(Index n, int calls) {
  const std::vector<float> x = random_floats(n, 4);
  std::vector<float> y(static_cast<std::size_t>(n));
  measure(calls,
          [&] { blockattn::softmax(x.data(), n, y.data(), blockattn::SoftmaxAlgorithm::Online); });
  return y;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s prefill64|prefill128|decode|softmax [size] [calls]\n", argv[0]);
    return 2;
  }
  const std::string name = argv[1];
  const Index size = argc > 2 ? std::atol(argv[2]) : 0;
  const int calls = argc > 3 ? std::atoi(argv[3]) : 1;
  std::vector<float> out;
  if (name == "prefill64" || name == "prefill128") {
    const Index n = size > 0 ? size : 1024;
    out = run_attention(1, 1, n, n, name == "prefill64" ? 64 : 128, calls);
  } else if (name == "decode") {
    out = run_attention(8, 8, 1, size > 0 ? size : 16384, 64, calls);
  } else if (name == "softmax") {
    out = run_softmax(size > 0 ? size : Index(1) << 20, calls);
  } else {
    std::fprintf(stderr, "unknown case '%s'\n", name.c_str());
    return 2;
  }
  std::printf("%s isa %s output hash %016llx\n", name.c_str(),
              blockattn::detail::simd::Simd<float>::kName,
              static_cast<unsigned long long>(hash(out)));
  return 0;
}
