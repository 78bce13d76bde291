// blockattn against ggml's CPU flash attention (ggml_flash_attn_ext), side by side in one binary,
// on the same inputs: both read the very same q, k, v buffers, and each ggml run first checks
// that its output matches blockattn's (counter max_abs_diff).
//
// ggml is not a build dependency. Its shared libraries are loaded at run time from the folder in
// BLOCKATTN_GGML_DIR, e.g. the prebuilt llama.cpp binaries of the npm package
// @node-llama-cpp/linux-x64 (bench/fetch_ggml.sh). Of the CPU variants there
// (libggml-cpu-<arch>.so) the one whose ggml_backend_score() rates this CPU highest is used, as
// ggml's own loader does. Without the libraries every ggml benchmark is skipped with a message.
//
// Shapes: ggml's natural layout, q [heads, n_q, d] and k, v [kv_heads, n_k, d] (BHSD), float,
// d = 64; blockattn reads them through make_tensor_view_bhsd. Output [n_q, heads, d] for both.
// ggml computes with K/V in float (kv:f32) or in half precision (kv:f16, llama.cpp's default KV
// cache; K/V are rounded to half once, and blockattn is not run on those rows), with
// GGML_PREC_F32 accumulation. Each runs with a persistent thread pool (ggml_threadpool_new),
// as llama.cpp does, so no thread is created inside the timed loop.
//
//   export BLOCKATTN_GGML_DIR=build/ggml/package/bins/linux-x64
//   build/bench/bench/compare_ggml_bench --benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true --benchmark_enable_random_interleaving=true
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include <blockattn/attention.hpp>

#include "support/counters.hpp"
#include "support/heap_tracker.hpp"

#include <dlfcn.h>

namespace {

using blockattn::AttentionOptions;
using blockattn::Index;
using blockattn::bench::AttentionShape;

// ---------------------------------------------------------------------------------------------
// The part of ggml's C API this benchmark calls, declared from its documented signatures.

extern "C" {
struct ggml_context;
struct ggml_tensor;
struct ggml_cgraph;
struct ggml_threadpool;
struct ggml_backend;
struct ggml_init_params {
  std::size_t mem_size;
  void* mem_buffer;
  bool no_alloc;
};
}

constexpr int kGgmlTypeF32 = 0;
constexpr int kGgmlTypeF16 = 1;
constexpr int kGgmlPrecF32 = 10;
constexpr std::uint16_t kHalfMinusInfinity = 0xFC00;

/// ggml's entry points, resolved once from the base library and the best CPU variant.
struct Ggml {
  ggml_context* (*init)(ggml_init_params) = nullptr;
  void (*free)(ggml_context*) = nullptr;
  ggml_tensor* (*new_tensor_4d)(ggml_context*, int, std::int64_t, std::int64_t, std::int64_t,
                                std::int64_t) = nullptr;
  void* (*get_data)(const ggml_tensor*) = nullptr;
  ggml_tensor* (*flash_attn_ext)(ggml_context*, ggml_tensor*, ggml_tensor*, ggml_tensor*,
                                 ggml_tensor*, float, float, float) = nullptr;
  void (*flash_attn_ext_set_prec)(ggml_tensor*, int) = nullptr;
  ggml_cgraph* (*new_graph)(ggml_context*) = nullptr;
  void (*build_forward_expand)(ggml_cgraph*, ggml_tensor*) = nullptr;
  std::size_t (*tensor_overhead)() = nullptr;
  std::size_t (*graph_overhead)() = nullptr;
  std::uint16_t (*fp32_to_fp16)(float) = nullptr;
  int (*backend_graph_compute)(ggml_backend*, ggml_cgraph*) = nullptr;
  void (*backend_free)(ggml_backend*) = nullptr;
  void (*threadpool_params_init)(void*, int) = nullptr;
  const char* (*version)() = nullptr;
  // From the CPU variant.
  void (*cpu_init)() = nullptr;
  ggml_backend* (*backend_cpu_init)() = nullptr;
  void (*backend_cpu_set_n_threads)(ggml_backend*, int) = nullptr;
  void (*backend_cpu_set_threadpool)(ggml_backend*, ggml_threadpool*) = nullptr;
  ggml_threadpool* (*threadpool_new)(void*) = nullptr;
  void (*threadpool_free)(ggml_threadpool*) = nullptr;

  std::string cpu_variant;  ///< file name of the CPU library in use
  std::string error;        ///< why ggml is unavailable; empty when loaded
};

template <class F>
bool resolve(void* library, const char* name, F& function, std::string& error) {
  function = reinterpret_cast<F>(dlsym(library, name));
  if (function == nullptr && error.empty()) error = std::string("ggml: missing symbol ") + name;
  return function != nullptr;
}

Ggml load_ggml() {
  Ggml g;
  const char* dir = std::getenv("BLOCKATTN_GGML_DIR");
  if (dir == nullptr) {
    g.error = "ggml: set BLOCKATTN_GGML_DIR to a folder with libggml-base.so (bench/fetch_ggml.sh)";
    return g;
  }
  const std::filesystem::path folder(dir);
  void* base = dlopen((folder / "libggml-base.so").c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (base == nullptr) {
    g.error = std::string("ggml: ") + dlerror();
    return g;
  }
  // The CPU variant that rates this CPU highest; a variant built for instructions the CPU lacks
  // scores 0.
  void* cpu = nullptr;
  int best_score = 0;
  std::error_code ignored;
  for (const auto& entry : std::filesystem::directory_iterator(folder, ignored)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("libggml-cpu-", 0) != 0) continue;
    void* candidate = dlopen(entry.path().c_str(), RTLD_NOW | RTLD_LOCAL);
    if (candidate == nullptr) continue;
    auto score = reinterpret_cast<int (*)()>(dlsym(candidate, "ggml_backend_score"));
    const int s = score != nullptr ? score() : 0;
    if (s > best_score) {
      best_score = s;
      cpu = candidate;
      g.cpu_variant = name;
    }
  }
  if (cpu == nullptr) {
    g.error = "ggml: no libggml-cpu-*.so in BLOCKATTN_GGML_DIR runs on this CPU";
    return g;
  }
  std::string& e = g.error;
  resolve(base, "ggml_init", g.init, e);
  resolve(base, "ggml_free", g.free, e);
  resolve(base, "ggml_new_tensor_4d", g.new_tensor_4d, e);
  resolve(base, "ggml_get_data", g.get_data, e);
  resolve(base, "ggml_flash_attn_ext", g.flash_attn_ext, e);
  resolve(base, "ggml_flash_attn_ext_set_prec", g.flash_attn_ext_set_prec, e);
  resolve(base, "ggml_new_graph", g.new_graph, e);
  resolve(base, "ggml_build_forward_expand", g.build_forward_expand, e);
  resolve(base, "ggml_tensor_overhead", g.tensor_overhead, e);
  resolve(base, "ggml_graph_overhead", g.graph_overhead, e);
  resolve(base, "ggml_fp32_to_fp16", g.fp32_to_fp16, e);
  resolve(base, "ggml_backend_graph_compute", g.backend_graph_compute, e);
  resolve(base, "ggml_backend_free", g.backend_free, e);
  resolve(base, "ggml_threadpool_params_init", g.threadpool_params_init, e);
  resolve(base, "ggml_version", g.version, e);
  resolve(cpu, "ggml_cpu_init", g.cpu_init, e);
  resolve(cpu, "ggml_backend_cpu_init", g.backend_cpu_init, e);
  resolve(cpu, "ggml_backend_cpu_set_n_threads", g.backend_cpu_set_n_threads, e);
  resolve(cpu, "ggml_backend_cpu_set_threadpool", g.backend_cpu_set_threadpool, e);
  resolve(cpu, "ggml_threadpool_new", g.threadpool_new, e);
  resolve(cpu, "ggml_threadpool_free", g.threadpool_free, e);
  if (e.empty()) g.cpu_init();
  return g;
}

const Ggml& ggml() {
  static const Ggml g = load_ggml();
  return g;
}

// ---------------------------------------------------------------------------------------------
// One attention problem in ggml's tensors, its graph, and a CPU backend with its thread pool.

/// Arguments of every benchmark here: n_q, n_k, heads, kv_heads, causal, threads, kv_f16.
struct Problem {
  AttentionShape shape;
  int threads = 1;
  bool kv_f16 = false;

  explicit Problem(const benchmark::State& state)
      : shape{1,  state.range(2),     state.range(3), state.range(0), state.range(1), 64,
              64, state.range(4) != 0},
        threads(static_cast<int>(state.range(5))),
        kv_f16(state.range(6) != 0) {}
};

class GgmlAttention {
 public:
  explicit GgmlAttention(const Problem& p) : g_(ggml()), p_(p) {
    const AttentionShape& s = p.shape;
    const int kv_type = p.kv_f16 ? kGgmlTypeF16 : kGgmlTypeF32;
    const std::size_t kv_bytes = p.kv_f16 ? 2 : 4;
    const Index mask_rows = (s.n_q + 63) / 64 * 64;  // ggml wants the mask's rows padded to 64
    const std::size_t bytes =
        sizeof(float) * static_cast<std::size_t>(s.heads * s.n_q * (s.d + s.d_v)) +
        kv_bytes * static_cast<std::size_t>(s.kv_heads * s.n_k * (s.d + s.d_v)) +
        2 * static_cast<std::size_t>(s.n_k * mask_rows) + 8 * g_.tensor_overhead() +
        g_.graph_overhead() + (1u << 20);
    context_ = g_.init({bytes, nullptr, false});
    q_ = g_.new_tensor_4d(context_, kGgmlTypeF32, s.d, s.n_q, s.heads, 1);
    k_ = g_.new_tensor_4d(context_, kv_type, s.d, s.n_k, s.kv_heads, 1);
    v_ = g_.new_tensor_4d(context_, kv_type, s.d_v, s.n_k, s.kv_heads, 1);
    ggml_tensor* mask = nullptr;
    if (s.causal) {
      // Bottom-right aligned causal mask, as blockattn's: query i sees keys j <= i + n_k − n_q.
      mask = g_.new_tensor_4d(context_, kGgmlTypeF16, s.n_k, mask_rows, 1, 1);
      auto* m = static_cast<std::uint16_t*>(g_.get_data(mask));
      for (Index i = 0; i < mask_rows; ++i) {
        for (Index j = 0; j < s.n_k; ++j) {
          m[i * s.n_k + j] = j <= i + s.n_k - s.n_q ? std::uint16_t{0} : kHalfMinusInfinity;
        }
      }
    }
    out_ = g_.flash_attn_ext(context_, q_, k_, v_, mask, 1.0f / std::sqrt(float(s.d)), 0.0f, 0.0f);
    g_.flash_attn_ext_set_prec(out_, kGgmlPrecF32);
    graph_ = g_.new_graph(context_);
    g_.build_forward_expand(graph_, out_);

    g_.threadpool_params_init(pool_params_, p.threads);
    pool_ = g_.threadpool_new(pool_params_);
    backend_ = g_.backend_cpu_init();
    g_.backend_cpu_set_n_threads(backend_, p.threads);
    g_.backend_cpu_set_threadpool(backend_, pool_);
  }
  GgmlAttention(const GgmlAttention&) = delete;
  GgmlAttention& operator=(const GgmlAttention&) = delete;
  ~GgmlAttention() {
    g_.backend_free(backend_);
    g_.threadpool_free(pool_);
    g_.free(context_);
  }

  float* q() { return static_cast<float*>(g_.get_data(q_)); }
  float* out() { return static_cast<float*>(g_.get_data(out_)); }
  /// Fills K or V (float, or rounded to half) from `values` [kv_heads, n_k, dim].
  void set_kv(bool keys, const std::vector<float>& values) {
    ggml_tensor* t = keys ? k_ : v_;
    if (!p_.kv_f16) {
      std::memcpy(g_.get_data(t), values.data(), values.size() * sizeof(float));
      return;
    }
    auto* h = static_cast<std::uint16_t*>(g_.get_data(t));
    for (std::size_t i = 0; i < values.size(); ++i) h[i] = g_.fp32_to_fp16(values[i]);
  }
  bool compute() { return g_.backend_graph_compute(backend_, graph_) == 0; }

 private:
  const Ggml& g_;
  Problem p_;
  ggml_context* context_ = nullptr;
  ggml_tensor* q_ = nullptr;
  ggml_tensor* k_ = nullptr;
  ggml_tensor* v_ = nullptr;
  ggml_tensor* out_ = nullptr;
  ggml_cgraph* graph_ = nullptr;
  ggml_threadpool* pool_ = nullptr;
  ggml_backend* backend_ = nullptr;
  alignas(64) unsigned char pool_params_[8192];  // a ggml_threadpool_params (about 530 bytes)
};

std::vector<float> random_values(Index count, unsigned seed) {
  std::vector<float> x(static_cast<std::size_t>(count));
  std::uint64_t state = seed * 0x9E3779B97F4A7C15u + 1;
  for (float& value : x) {
    state = state * 6364136223846793005u + 1442695040888963407u;
    value = static_cast<float>(static_cast<std::int64_t>(state >> 40) - (1 << 23)) * 0x1p-23f;
  }
  return x;
}

/// The inputs of one problem, in ggml's layout, shared by the ggml and blockattn benchmarks.
struct Inputs {
  std::vector<float> q, k, v;
  explicit Inputs(const AttentionShape& s)
      : q(random_values(s.heads * s.n_q * s.d, 1)),
        k(random_values(s.kv_heads * s.n_k * s.d, 2)),
        v(random_values(s.kv_heads * s.n_k * s.d_v, 3)) {}
};

AttentionOptions options_for(const Problem& p) {
  AttentionOptions options;
  options.causal = p.shape.causal;
  options.threads = p.threads;
  return options;
}

/// blockattn on ggml's layout: q, k, v BHSD; out [n_q, heads, d_v].
void run_blockattn(const Problem& p, const float* q, const float* k, const float* v, float* out) {
  const AttentionShape& s = p.shape;
  blockattn::attention(blockattn::make_tensor_view_bhsd(q, 1, s.n_q, s.heads, s.d),
                       blockattn::make_tensor_view_bhsd(k, 1, s.n_k, s.kv_heads, s.d),
                       blockattn::make_tensor_view_bhsd(v, 1, s.n_k, s.kv_heads, s.d_v),
                       blockattn::make_tensor_view(out, 1, s.n_q, s.heads, s.d_v), options_for(p));
}

void set_label(benchmark::State& state, const Problem& p, const std::string& prefix) {
  state.SetLabel(prefix + "threads=" + std::to_string(p.threads) +
                 (p.kv_f16 ? " kv=f16" : " kv=f32"));
}

void BM_Ggml_FlashAttnExt(benchmark::State& state) {
  const Problem p(state);
  if (!ggml().error.empty()) {
    state.SkipWithError(ggml().error.c_str());
    return;
  }
  const Inputs in(p.shape);
  GgmlAttention attention(p);
  std::memcpy(attention.q(), in.q.data(), in.q.size() * sizeof(float));
  attention.set_kv(true, in.k);
  attention.set_kv(false, in.v);
  bool computed = false;
  const std::size_t peak =
      blockattn::bench::measure_extra_heap([&] { computed = attention.compute(); });
  if (!computed) {
    state.SkipWithError("ggml_backend_graph_compute failed");
    return;
  }
  // The check: ggml's output against blockattn's on the same float inputs (kv:f32 only; with
  // half K/V the difference is the rounding of K and V, not an error).
  if (!p.kv_f16) {
    std::vector<float> expected(
        static_cast<std::size_t>(p.shape.n_q * p.shape.heads * p.shape.d_v));
    run_blockattn(p, in.q.data(), in.k.data(), in.v.data(), expected.data());
    double worst = 0;
    for (std::size_t i = 0; i < expected.size(); ++i) {
      worst = std::max(worst, std::abs(double(expected[i]) - double(attention.out()[i])));
    }
    state.counters["max_abs_diff"] = worst;
  }
  for (auto _ : state) {
    if (!attention.compute()) {
      state.SkipWithError("ggml_backend_graph_compute failed");
      return;
    }
    benchmark::ClobberMemory();
  }
  blockattn::bench::set_attention_counters<float>(state, p.shape, peak);
  set_label(state, p, "ggml " + std::string(ggml().version()) + " " + ggml().cpu_variant + " ");
}

void BM_Blockattn(benchmark::State& state) {
  const Problem p(state);  // float K/V only: shapes(b, /*with_f16=*/false)
  const Inputs in(p.shape);
  std::vector<float> out(static_cast<std::size_t>(p.shape.n_q * p.shape.heads * p.shape.d_v));
  const std::size_t peak = blockattn::bench::measure_extra_heap(
      [&] { run_blockattn(p, in.q.data(), in.k.data(), in.v.data(), out.data()); });
  for (auto _ : state) {
    run_blockattn(p, in.q.data(), in.k.data(), in.v.data(), out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  blockattn::bench::set_attention_counters<float>(state, p.shape, peak);
  set_label(state, p, "");
}

// Prefill: the shapes of compare_pytorch.py (n = 512 … 4096, 1 and 8 heads, non-causal), the
// causal case of the thread target (n = 4096, 8 heads), each at 1 and 2 threads; ggml also with
// half K/V. Decode: one query token per head over a 32K and a 256K-token cache, 8 kv heads.
void shapes(benchmark::internal::Benchmark* b, bool with_f16) {
  b->ArgNames({"n_q", "n_k", "heads", "kv_heads", "causal", "threads", "kv_f16"});
  const std::vector<std::int64_t> kv_types =
      with_f16 ? std::vector<std::int64_t>{0, 1} : std::vector<std::int64_t>{0};
  for (std::int64_t kv : kv_types) {
    for (std::int64_t threads : {1, 2}) {
      for (std::int64_t n : {512, 1024, 2048, 4096}) {
        for (std::int64_t heads : {1, 8}) b->Args({n, n, heads, heads, 0, threads, kv});
      }
      b->Args({4096, 4096, 8, 8, 1, threads, kv});
      for (std::int64_t n_k : {32768, 262144}) b->Args({1, n_k, 8, 8, 0, threads, kv});
    }
  }
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Ggml_FlashAttnExt)->Apply([](auto* b) { shapes(b, true); });
BENCHMARK(BM_Blockattn)->Apply([](auto* b) { shapes(b, false); });

}  // namespace

BENCHMARK_MAIN();
