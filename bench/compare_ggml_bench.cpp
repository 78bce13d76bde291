// blockattn against ggml's CPU flash attention (ggml_flash_attn_ext), side by side in one binary,
// on the same inputs, with the K/V cache in the same format on both sides (argument kv):
//
//   kv  ggml's K and V tensors             blockattn's K/V cache (float q and out on both sides)
//   0   GGML_TYPE_F32                      float (the TensorView attention())
//   1   GGML_TYPE_F16, llama.cpp's default Eigen::half (attention()'s 16-bit KV-cache call)
//   2   GGML_TYPE_Q8_0: int8, one half     QuantizedKV (quantized_kv.hpp): int8, one float scale
//       scale per 32 values of a row       per token and kv head
//   3   GGML_TYPE_Q4_0: int4, one half     Int4QuantizedKV (int4_kv.hpp): keys per channel over
//       scale per 32 values of a row       32-token blocks with a zero point, values in groups of
//                                          32 with a float scale
//
// Both sides start from the very same float q, k, v and each builds its cache from them once,
// outside the timed loop, its own way: ggml with the loaded library's own conversion
// (ggml_fp32_to_fp16_row, ggml_quantize_chunk), blockattn with Eigen::half's or quantize_kv().
// Both read K and V in ggml's layout [kv_heads, n_k, d] (blockattn through BHSD views, without a
// copy), q [heads, n_q, d] float, and write out [n_q, heads, d] float.
//
// ggml is not a build dependency. Its shared libraries are loaded at run time from the folder in
// BLOCKATTN_GGML_DIR, e.g. the prebuilt llama.cpp binaries of the npm package
// @node-llama-cpp/linux-x64 (bench/fetch_ggml.sh). Of the CPU variants there
// (libggml-cpu-<arch>.so) the one whose ggml_backend_score() rates this CPU highest is used, as
// ggml's own loader does. Without the libraries every ggml benchmark is skipped with a message.
// ggml runs with GGML_PREC_F32 and a persistent thread pool (ggml_threadpool_new), as llama.cpp
// does, so no thread is created inside the timed loop; blockattn with an AttentionOptions
// workspace sized by the first call, so no call in the loop allocates either.
//
// Accuracy (counters max_abs_diff and ref_max_abs): each side's output against a reference
// computed in double from the unquantized float q, k, v, on the same rows (every head, and up to 8
// query rows spread over n_q: all of them in decode); ref_max_abs is that reference's largest
// |out|. The formats round differently (and ggml also converts q to its K type's dot-product
// format: half for f16, q8_0 for q8_0 and q4_0), so the two sides are not asked to agree with
// each other, only each to stay within its format's error. The inputs lie in [-1, 1) and out is
// a convex combination of V rows, so rounding V moves out by at most V's largest rounding error,
// and rounding K moves the softmax weights by about scale·Σ_c |q_c|·|Δk_c|. Expected bounds on
// max_abs_diff:
//  - f32: float rounding, below 1e-6 (both compute the same attention in float);
//  - f16: half's rounding of K and V (at most 2^-12 here) gives below 1e-3 for blockattn, which
//    computes in float from there; ggml also rounds q to half and keeps the P·V sum in half (its
//    VKQ16), rounding it to 2^-11 of its size at each of the n_k keys, so it may exceed 1e-3;
//  - q8_0 / int8: steps of max|x|/127 over 32 values (ggml, also its q8_0 query) or over a row
//    (blockattn): V's rounding at most 1/254, below 1e-2 in all;
//  - q4_0 / int4: steps of max|x|/8 over 32 values (both sides' values, ggml's keys) or a key
//    block channel's range/15 (blockattn): V's rounding at most 1/16, below 1e-1 in all.
// These are worst cases: the softmax over random keys is nearly flat, so independent roundings of
// n_k rows average out and the differences come out one to two orders of magnitude smaller. A
// layout or indexing bug instead gives differences of the size of ref_max_abs (out itself).
//
// Counters: FLOP/s, items_per_second (query tokens/s), peak_heap and bytes_per_second from
// set_attention_counters<float> (float-equivalent bytes: the same for both sides of a pair, so
// their ratio is the time ratio), and kv_bytes_per_second: the bytes of the K/V cache as stored in
// its format (values, scales and zero points) read per call, per wall-clock second, to compare
// with the streaming-read ceiling BM_StreamReadTwoStreams of the same run.
//
// Shapes: kv 0 (f32) prefill n = 512 … 4,096 with 1 and 8 heads, causal n = 4,096 with 8 heads,
// and decode (n_q = 1, 8 heads on 8 kv heads) over n_k = 32,768 and 262,144, d = 64; kv 1 (f16)
// the same plus decode at d = 128; kv 2 and 3 (q8_0, q4_0) decode at d = 64 and 128. Each at 1 and
// 2 threads. Run names: BM_Ggml_FlashAttnExt/n_q:1/n_k:32768/heads:8/kv_heads:8/d:64/causal:0/
// threads:1/kv:2/real_time and BM_Blockattn/… with the same arguments.
//
//   export BLOCKATTN_GGML_DIR=build/ggml/package/bins/linux-x64
//   build/bench/bench/compare_ggml_bench --benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true --benchmark_enable_random_interleaving=true
//   (the decode pairs of issues 17 and 18 only:
//    --benchmark_filter='(n_q:1/.*/kv:[123]/|StreamRead)')
//   or python3 bench/compare_ggml.py [--filter …], which prints the pairs as one table.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

#include <blockattn/attention.hpp>
#include <blockattn/detail/parallel.hpp>
#include <blockattn/int4_kv.hpp>
#include <blockattn/quantized_kv.hpp>

#include "support/counters.hpp"
#include "support/heap_tracker.hpp"
#include "support/stream_read.hpp"

#include <dlfcn.h>

namespace {

using blockattn::AttentionOptions;
using blockattn::Index;
using blockattn::TensorView;
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

// enum ggml_type values (stable in ggml.h: removed types keep their numbers); load_ggml() checks
// each against ggml_type_name().
constexpr int kGgmlTypeF32 = 0;
constexpr int kGgmlTypeF16 = 1;
constexpr int kGgmlTypeQ4_0 = 2;
constexpr int kGgmlTypeQ8_0 = 8;
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
  const char* (*type_name)(int) = nullptr;
  std::size_t (*row_size)(int, std::int64_t) = nullptr;
  void (*fp32_to_fp16_row)(const float*, std::uint16_t*, std::int64_t) = nullptr;
  std::size_t (*quantize_chunk)(int, const float*, void*, std::int64_t, std::int64_t, std::int64_t,
                                const float*) = nullptr;
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
  resolve(base, "ggml_type_name", g.type_name, e);
  resolve(base, "ggml_row_size", g.row_size, e);
  resolve(base, "ggml_fp32_to_fp16_row", g.fp32_to_fp16_row, e);
  resolve(base, "ggml_quantize_chunk", g.quantize_chunk, e);
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
  if (!e.empty()) return g;
  const std::pair<int, const char*> types[] = {{kGgmlTypeF32, "f32"},
                                               {kGgmlTypeF16, "f16"},
                                               {kGgmlTypeQ4_0, "q4_0"},
                                               {kGgmlTypeQ8_0, "q8_0"}};
  for (const auto& [type, name] : types) {
    const char* actual = g.type_name(type);
    if (actual == nullptr || std::strcmp(actual, name) != 0) {
      e = "ggml: type " + std::to_string(type) + " is " + (actual ? actual : "null") + ", not " +
          name + " (enum ggml_type changed)";
      return g;
    }
  }
  g.cpu_init();
  return g;
}

const Ggml& ggml() {
  static const Ggml g = load_ggml();
  return g;
}

// ---------------------------------------------------------------------------------------------
// The problem of one run: shape, threads and K/V format.

/// The K/V format of a run (argument kv): a ggml tensor type and blockattn's counterpart.
enum class KvFormat : int { kF32 = 0, kF16 = 1, kQ8_0 = 2, kQ4_0 = 3 };

constexpr KvFormat kKvFormats[] = {KvFormat::kF32, KvFormat::kF16, KvFormat::kQ8_0,
                                   KvFormat::kQ4_0};

int ggml_type(KvFormat kv) {
  switch (kv) {
    case KvFormat::kF32:
      return kGgmlTypeF32;
    case KvFormat::kF16:
      return kGgmlTypeF16;
    case KvFormat::kQ8_0:
      return kGgmlTypeQ8_0;
    case KvFormat::kQ4_0:
      return kGgmlTypeQ4_0;
  }
  return kGgmlTypeF32;
}

const char* ggml_format_name(KvFormat kv) {
  const char* const names[] = {"f32", "f16", "q8_0", "q4_0"};
  return names[static_cast<int>(kv)];
}

const char* blockattn_format_name(KvFormat kv) {
  const char* const names[] = {"float", "half", "int8", "int4"};
  return names[static_cast<int>(kv)];
}

/// Arguments of every benchmark here: n_q, n_k, heads, kv_heads, d, causal, threads, kv.
struct Problem {
  AttentionShape shape;
  int threads = 1;
  KvFormat kv = KvFormat::kF32;

  explicit Problem(const benchmark::State& state)
      : shape{1,
              state.range(2),
              state.range(3),
              state.range(0),
              state.range(1),
              state.range(4),
              state.range(4),
              state.range(5) != 0},
        threads(static_cast<int>(state.range(6))),
        kv(static_cast<KvFormat>(state.range(7))) {}
};

std::size_t to_size(Index n) { return static_cast<std::size_t>(n); }

std::vector<float> random_values(Index count, unsigned seed) {
  std::vector<float> x(to_size(count));
  std::uint64_t state = seed * 0x9E3779B97F4A7C15u + 1;
  for (float& value : x) {
    state = state * 6364136223846793005u + 1442695040888963407u;
    value = static_cast<float>(static_cast<std::int64_t>(state >> 40) - (1 << 23)) * 0x1p-23f;
  }
  return x;
}

/// The float inputs of one problem, in ggml's layout (q [heads, n_q, d], k, v [kv_heads, n_k, d]),
/// from which both sides build their K/V caches.
struct Inputs {
  std::vector<float> q, k, v;
  explicit Inputs(const AttentionShape& s)
      : q(random_values(s.heads * s.n_q * s.d, 1)),
        k(random_values(s.kv_heads * s.n_k * s.d, 2)),
        v(random_values(s.kv_heads * s.n_k * s.d_v, 3)) {}
};

// ---------------------------------------------------------------------------------------------
// The accuracy check: a reference in double on a few rows, the same rows for every format.

/// out [i, h, :] in double from the float inputs for the checked query rows i of every head h:
/// the attention each K/V format approximates.
struct Reference {
  std::vector<Index> rows;  ///< query rows checked: all up to 8, else 8 spread over [0, n_q)
  std::vector<double> out;  ///< [rows, heads, d_v]
  double max_abs = 0;       ///< largest |out|
};

/// O(rows·heads·n_k·(d + d_v)) in double, O(n_k) extra memory.
Reference compute_reference(const AttentionShape& s, const Inputs& in) {
  Reference r;
  const Index count = std::min<Index>(s.n_q, 8);
  for (Index t = 0; t < count; ++t) {
    r.rows.push_back(count == 1 ? 0 : t * (s.n_q - 1) / (count - 1));
  }
  r.out.assign(r.rows.size() * to_size(s.heads * s.d_v), 0.0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.d));
  const Index group = s.heads / s.kv_heads;
  std::vector<double> p(to_size(s.n_k));
  for (std::size_t t = 0; t < r.rows.size(); ++t) {
    const Index i = r.rows[t];
    // Bottom-right aligned causal mask, as both sides': query i sees keys j <= i + n_k − n_q.
    const Index visible = s.causal ? std::clamp<Index>(i + s.n_k - s.n_q + 1, 0, s.n_k) : s.n_k;
    for (Index h = 0; h < s.heads; ++h) {
      const float* q = in.q.data() + (h * s.n_q + i) * s.d;
      const float* k = in.k.data() + (h / group) * s.n_k * s.d;
      const float* v = in.v.data() + (h / group) * s.n_k * s.d_v;
      double m = -std::numeric_limits<double>::infinity();
      for (Index j = 0; j < visible; ++j) {
        double dot = 0;
        for (Index c = 0; c < s.d; ++c)
          dot += static_cast<double>(q[c]) * static_cast<double>(k[j * s.d + c]);
        p[to_size(j)] = scale * dot;
        m = std::max(m, p[to_size(j)]);
      }
      double l = 0;
      double* o = r.out.data() + (t * to_size(s.heads) + to_size(h)) * to_size(s.d_v);
      for (Index j = 0; j < visible; ++j) {
        const double w = std::exp(p[to_size(j)] - m);
        l += w;
        for (Index c = 0; c < s.d_v; ++c) o[c] += w * static_cast<double>(v[j * s.d_v + c]);
      }
      for (Index c = 0; c < s.d_v; ++c) {
        o[c] = l > 0 ? o[c] / l : 0.0;
        r.max_abs = std::max(r.max_abs, std::abs(o[c]));
      }
    }
  }
  return r;
}

/// The reference of a shape, computed once per process (the inputs depend on the shape only).
const Reference& reference(const AttentionShape& s, const Inputs& in) {
  static std::map<std::tuple<Index, Index, Index, Index, Index, bool>, Reference> cache;
  const auto key = std::make_tuple(s.n_q, s.n_k, s.heads, s.kv_heads, s.d, s.causal);
  auto found = cache.find(key);
  if (found == cache.end()) found = cache.emplace(key, compute_reference(s, in)).first;
  return found->second;
}

/// Sets max_abs_diff (out [n_q, heads, d_v] against the reference on its rows) and ref_max_abs.
void set_accuracy_counters(benchmark::State& state, const AttentionShape& s, const Inputs& in,
                           const float* out) {
  const Reference& r = reference(s, in);
  double worst = 0;
  for (std::size_t t = 0; t < r.rows.size(); ++t) {
    const float* row = out + r.rows[t] * s.heads * s.d_v;
    const double* expected = r.out.data() + t * to_size(s.heads * s.d_v);
    for (Index c = 0; c < s.heads * s.d_v; ++c) {
      worst = std::max(worst, std::abs(static_cast<double>(row[c]) - expected[c]));
    }
  }
  state.counters["max_abs_diff"] = worst;
  state.counters["ref_max_abs"] = r.max_abs;
}

/// Sets kv_bytes_per_second: `bytes` of K/V cache read per call, per wall-clock second.
void set_kv_counter(benchmark::State& state, double bytes) {
  state.counters["kv_bytes_per_second"] = benchmark::Counter(
      bytes, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::OneK::kIs1000);
}

// ---------------------------------------------------------------------------------------------
// ggml: one attention problem in its tensors, its graph, and a CPU backend with its thread pool.

class GgmlAttention {
 public:
  explicit GgmlAttention(const Problem& p) : g_(ggml()), p_(p) {
    const AttentionShape& s = p.shape;
    const int kv_type = ggml_type(p.kv);
    const Index mask_rows = (s.n_q + 63) / 64 * 64;  // ggml wants the mask's rows padded to 64
    const std::size_t bytes = sizeof(float) * to_size(s.heads * s.n_q * (s.d + s.d_v)) +
                              static_cast<std::size_t>(kv_bytes()) +
                              2 * to_size(s.n_k * mask_rows) + 8 * g_.tensor_overhead() +
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
  /// Fills K or V from `values` [kv_heads, n_k, dim] float in the run's format, with ggml's own
  /// conversion (half rounding, or q8_0 / q4_0 quantization of each row).
  void set_kv(bool keys, const std::vector<float>& values) {
    ggml_tensor* t = keys ? k_ : v_;
    const Index dim = keys ? p_.shape.d : p_.shape.d_v;
    const Index rows = p_.shape.kv_heads * p_.shape.n_k;
    switch (p_.kv) {
      case KvFormat::kF32:
        std::memcpy(g_.get_data(t), values.data(), values.size() * sizeof(float));
        break;
      case KvFormat::kF16:
        g_.fp32_to_fp16_row(values.data(), static_cast<std::uint16_t*>(g_.get_data(t)), rows * dim);
        break;
      case KvFormat::kQ8_0:
      case KvFormat::kQ4_0:
        g_.quantize_chunk(ggml_type(p_.kv), values.data(), g_.get_data(t), 0, rows, dim, nullptr);
        break;
    }
  }
  /// Bytes of K and V as ggml stores them (q8_0: 34 per 32 values, q4_0: 18 per 32).
  double kv_bytes() const {
    const AttentionShape& s = p_.shape;
    const int type = ggml_type(p_.kv);
    return static_cast<double>(s.kv_heads * s.n_k) *
           static_cast<double>(g_.row_size(type, s.d) + g_.row_size(type, s.d_v));
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

// ---------------------------------------------------------------------------------------------
// blockattn: its K/V cache in the run's format over ggml's layout, and one attention call.

/// A BHSD view of 4-bit values [1, seq, heads, dim] stored [heads, seq, ceil(dim / 2) bytes]:
/// Int4QuantizedKV's views count values in dim and bytes in the strides.
template <class T>
TensorView<T> int4_view_bhsd(T* data, Index seq, Index heads, Index dim) {
  const Index row = (dim + 1) / 2;
  return TensorView<T>(data, 1, seq, heads, dim, /*batch_stride=*/heads * seq * row,
                       /*seq_stride=*/row, /*head_stride=*/seq * row);
}

/// x rounded to half by Eigen::half(float) (to nearest, ties to even).
std::vector<Eigen::half> to_half(const std::vector<float>& x) {
  std::vector<Eigen::half> h(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) h[i] = Eigen::half(x[i]);
  return h;
}

class BlockattnAttention {
 public:
  /// Builds the cache from in.k and in.v (read in place for f32: `in` must outlive this).
  BlockattnAttention(const Problem& p, const Inputs& in) : p_(p), in_(in) {
    const AttentionShape& s = p.shape;
    options_.causal = s.causal;
    options_.threads = p.threads;
    options_.workspace = &workspace_;
    const auto k = blockattn::make_tensor_view_bhsd(in.k.data(), 1, s.n_k, s.kv_heads, s.d);
    const auto v = blockattn::make_tensor_view_bhsd(in.v.data(), 1, s.n_k, s.kv_heads, s.d_v);
    switch (p.kv) {
      case KvFormat::kF32:
        break;
      case KvFormat::kF16:
        k16_ = to_half(in.k);
        v16_ = to_half(in.v);
        break;
      case KvFormat::kQ8_0:
        k8_.resize(in.k.size());
        v8_.resize(in.v.size());
        k_scale_.resize(to_size(s.n_k * s.kv_heads));
        v_scale_.resize(k_scale_.size());
        blockattn::quantize_kv(
            k, blockattn::make_tensor_view_bhsd(k8_.data(), 1, s.n_k, s.kv_heads, s.d),
            blockattn::make_tensor_view_bhsd(k_scale_.data(), 1, s.n_k, s.kv_heads, 1));
        blockattn::quantize_kv(
            v, blockattn::make_tensor_view_bhsd(v8_.data(), 1, s.n_k, s.kv_heads, s.d_v),
            blockattn::make_tensor_view_bhsd(v_scale_.data(), 1, s.n_k, s.kv_heads, 1));
        break;
      case KvFormat::kQ4_0: {
        k4_.resize(to_size(s.kv_heads * s.n_k * ((s.d + 1) / 2)));
        v4_.resize(to_size(s.kv_heads * s.n_k * ((s.d_v + 1) / 2)));
        k_scale_.resize(to_size(blocks() * s.kv_heads * s.d));
        k_zero_.resize(k_scale_.size());
        v_scale_.resize(to_size(s.n_k * s.kv_heads * groups()));
        blockattn::quantize_kv(
            k, /*position=*/0, int4_view_bhsd(k4_.data(), s.n_k, s.kv_heads, s.d),
            blockattn::make_tensor_view_bhsd(k_scale_.data(), 1, blocks(), s.kv_heads, s.d),
            blockattn::make_tensor_view_bhsd(k_zero_.data(), 1, blocks(), s.kv_heads, s.d));
        blockattn::quantize_kv(
            v, int4_view_bhsd(v4_.data(), s.n_k, s.kv_heads, s.d_v),
            blockattn::make_tensor_view_bhsd(v_scale_.data(), 1, s.n_k, s.kv_heads, groups()));
        break;
      }
    }
  }
  BlockattnAttention(const BlockattnAttention&) = delete;
  BlockattnAttention& operator=(const BlockattnAttention&) = delete;

  /// One call: q from the inputs, out [n_q, heads, d_v].
  void run(float* out) {
    const AttentionShape& s = p_.shape;
    const auto q = blockattn::make_tensor_view_bhsd(in_.q.data(), 1, s.n_q, s.heads, s.d);
    const auto o = blockattn::make_tensor_view(out, 1, s.n_q, s.heads, s.d_v);
    const auto bhsd = [&](const auto* data, Index seq, Index dim) {
      return blockattn::make_tensor_view_bhsd(data, 1, seq, s.kv_heads, dim);
    };
    switch (p_.kv) {
      case KvFormat::kF32:
        blockattn::attention(q, bhsd(in_.k.data(), s.n_k, s.d), bhsd(in_.v.data(), s.n_k, s.d_v), o,
                             options_);
        break;
      case KvFormat::kF16:
        blockattn::attention(q, bhsd(k16_.data(), s.n_k, s.d), bhsd(v16_.data(), s.n_k, s.d_v), o,
                             options_);
        break;
      case KvFormat::kQ8_0:
        blockattn::attention(
            q,
            blockattn::QuantizedKV{bhsd(k8_.data(), s.n_k, s.d), bhsd(k_scale_.data(), s.n_k, 1),
                                   bhsd(v8_.data(), s.n_k, s.d_v), bhsd(v_scale_.data(), s.n_k, 1)},
            o, options_);
        break;
      case KvFormat::kQ4_0:
        blockattn::attention(
            q,
            blockattn::Int4QuantizedKV{int4_view_bhsd(k4_.data(), s.n_k, s.kv_heads, s.d),
                                       bhsd(k_scale_.data(), blocks(), s.d),
                                       bhsd(k_zero_.data(), blocks(), s.d),
                                       int4_view_bhsd(v4_.data(), s.n_k, s.kv_heads, s.d_v),
                                       bhsd(v_scale_.data(), s.n_k, groups())},
            o, options_);
        break;
    }
  }

  /// Bytes of K and V as stored, with their scales and zero points: float 4 and half 2 per
  /// value; int8 one per value and a float scale per row; int4 half a byte per value, a float
  /// scale and zero point per key block of 32 tokens and channel, a float scale per value group.
  double kv_bytes() const {
    const AttentionShape& s = p_.shape;
    const auto rows = static_cast<double>(s.kv_heads * s.n_k);
    const auto dims = static_cast<double>(s.d + s.d_v);
    switch (p_.kv) {
      case KvFormat::kF32:
        return rows * dims * 4;
      case KvFormat::kF16:
        return rows * dims * 2;
      case KvFormat::kQ8_0:
        return rows * (dims + 8);
      case KvFormat::kQ4_0:
        return rows * static_cast<double>((s.d + 1) / 2 + (s.d_v + 1) / 2 + 4 * groups()) +
               static_cast<double>(blocks() * s.kv_heads * s.d * 8);
    }
    return 0;
  }

 private:
  Index blocks() const {
    return (p_.shape.n_k + blockattn::kKeyBlockTokens - 1) / blockattn::kKeyBlockTokens;
  }
  Index groups() const {
    return (p_.shape.d_v + blockattn::kInt4Group - 1) / blockattn::kInt4Group;
  }

  Problem p_;
  const Inputs& in_;
  AttentionOptions options_;
  blockattn::Workspace workspace_;
  std::vector<Eigen::half> k16_, v16_;
  std::vector<std::int8_t> k8_, v8_;
  std::vector<std::uint8_t> k4_, v4_;
  std::vector<float> k_scale_, k_zero_, v_scale_;
};

// ---------------------------------------------------------------------------------------------
// The benchmarks.

void BM_Ggml_FlashAttnExt(benchmark::State& state) {
  const Problem p(state);
  if (!ggml().error.empty()) {
    state.SkipWithError(ggml().error.c_str());
    return;
  }
  const Inputs in(p.shape);
  GgmlAttention attention(p);
  std::memcpy(attention.q(), in.q.data(), in.q.size() * sizeof(float));
  attention.set_kv(/*keys=*/true, in.k);
  attention.set_kv(/*keys=*/false, in.v);
  bool computed = false;
  const std::size_t peak =
      blockattn::bench::measure_extra_heap([&] { computed = attention.compute(); });
  if (!computed) {
    state.SkipWithError("ggml_backend_graph_compute failed");
    return;
  }
  set_accuracy_counters(state, p.shape, in, attention.out());
  for (auto _ : state) {
    if (!attention.compute()) {
      state.SkipWithError("ggml_backend_graph_compute failed");
      return;
    }
    benchmark::ClobberMemory();
  }
  blockattn::bench::set_attention_counters<float>(state, p.shape, peak);
  set_kv_counter(state, attention.kv_bytes());
  state.SetLabel("ggml " + std::string(ggml().version()) + " " + ggml().cpu_variant +
                 " threads=" + std::to_string(p.threads) + " kv=" + ggml_format_name(p.kv));
}

void BM_Blockattn(benchmark::State& state) {
  const Problem p(state);
  const Inputs in(p.shape);
  BlockattnAttention attention(p, in);
  std::vector<float> out(to_size(p.shape.n_q * p.shape.heads * p.shape.d_v));
  // The first call sizes the workspace: its heap is the peak.
  const std::size_t peak = blockattn::bench::measure_extra_heap([&] { attention.run(out.data()); });
  set_accuracy_counters(state, p.shape, in, out.data());
  for (auto _ : state) {
    attention.run(out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  blockattn::bench::set_attention_counters<float>(state, p.shape, peak);
  set_kv_counter(state, attention.kv_bytes());
  state.SetLabel("threads=" + std::to_string(p.threads) + " kv=" + blockattn_format_name(p.kv));
}

// Prefill (kv f32 and f16): the shapes of compare_pytorch.py (n = 512 … 4096, 1 and 8 heads,
// non-causal) and the causal case of the thread target (n = 4096, 8 heads), d = 64. Decode (every
// format): one query token per head over a 32K and a 256K-token cache, 8 heads on 8 kv heads,
// d = 64, and d = 128 for the 16-bit and quantized formats. Each at 1 and 2 threads.
void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n_q", "n_k", "heads", "kv_heads", "d", "causal", "threads", "kv"});
  for (KvFormat format : kKvFormats) {
    const auto kv = static_cast<std::int64_t>(format);
    const bool quantized = format == KvFormat::kQ8_0 || format == KvFormat::kQ4_0;
    const std::vector<std::int64_t> decode_dims = format == KvFormat::kF32
                                                      ? std::vector<std::int64_t>{64}
                                                      : std::vector<std::int64_t>{64, 128};
    for (std::int64_t threads : {1, 2}) {
      if (!quantized) {
        for (std::int64_t n : {512, 1024, 2048, 4096}) {
          for (std::int64_t heads : {1, 8}) b->Args({n, n, heads, heads, 64, 0, threads, kv});
        }
        b->Args({4096, 4096, 8, 8, 64, 1, threads, kv});
      }
      for (std::int64_t d : decode_dims) {
        for (std::int64_t n_k : {32768, 262144}) b->Args({1, n_k, 8, 8, d, 0, threads, kv});
      }
    }
  }
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Ggml_FlashAttnExt)->Apply(shapes);
BENCHMARK(BM_Blockattn)->Apply(shapes);

/// The two-stream read ceiling (bench/support/stream_read.hpp, decode's pattern of K and V rows)
/// in the same run, so that kv_bytes_per_second reads against it.
void BM_StreamReadTwoStreams(benchmark::State& state) { blockattn::bench::stream_read<2>(state); }
BENCHMARK(BM_StreamReadTwoStreams)
    ->ArgName("threads")
    ->Arg(1)
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
