// One pre-LN transformer layer with random weights, run two ways: fused blockwise (BPT) and the
// vanilla unfused reference. Prints y's checksum, time and the peak resident memory each added.
// Usage: transformer_block [n=4096] [model=512] [heads=8] [ffn=2048] [causal=1]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>

#include <blockattn/blockattn.hpp>

namespace {

// Resident-set high-water mark in bytes (Linux VmHWM); reset_peak() restarts it at the current RSS.
long peak_rss() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::atol(line.c_str() + 6) * 1024;
  }
  return 0;
}
long current_rss() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmRSS:", 0) == 0) return std::atol(line.c_str() + 6) * 1024;
  }
  return 0;
}
void reset_peak() { std::ofstream("/proc/self/clear_refs") << "5"; }

template <class Run>
void measure(const char* label, const blockattn::Matrix<float>& y, Run run) {
  reset_peak();
  const long before = current_rss();
  const auto start = std::chrono::steady_clock::now();
  run();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%-8s checksum %+.6e  time %8.3f s  peak extra RSS %8.1f MiB\n", label,
              static_cast<double>(y.sum()), seconds,
              static_cast<double>(peak_rss() - before) / 1048576.0);
}

}  // namespace

int main(int argc, char** argv) {
  const auto arg = [&](int i, long fallback) { return argc > i ? std::atol(argv[i]) : fallback; };
  const blockattn::Index n = arg(1, 4096), model = arg(2, 512), heads = arg(3, 8),
                         ffn = arg(4, 2048);
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0F, 1.0F);
  auto w = blockattn::make_transformer_block_weights<float>(model, heads, ffn);
  const auto fill = [&](auto& m, float scale) {
    for (blockattn::Index i = 0; i < m.size(); ++i) m.data()[i] = scale * normal(rng);
  };
  const float s_model = 1.0F / std::sqrt(static_cast<float>(model));
  for (auto* m : {&w.wq, &w.wk, &w.wv, &w.wo, &w.w1}) fill(*m, s_model);
  fill(w.w2, 1.0F / std::sqrt(static_cast<float>(ffn)));
  blockattn::Matrix<float> x(n, model), y_bpt(n, model), y_ref(n, model);
  fill(x, 1.0F);
  blockattn::BlockOptions options;
  options.causal = arg(5, 1) != 0;

  std::printf("n=%ld model=%ld heads=%ld ffn=%ld causal=%d; K+V = %.1f MiB\n", static_cast<long>(n),
              static_cast<long>(model), static_cast<long>(heads), static_cast<long>(ffn),
              options.causal, 2.0 * static_cast<double>(n * model) * sizeof(float) / 1048576.0);
  measure("BPT", y_bpt, [&] { blockattn::transformer_block(w, x, y_bpt, options); });
  measure("vanilla", y_ref, [&] { blockattn::reference::transformer_block(w, x, y_ref, options); });
  const double diff = static_cast<double>((y_bpt - y_ref).cwiseAbs().maxCoeff());
  std::printf("max |y_bpt - y_vanilla| = %.3e\n", diff);
  return diff < 1e-3 ? 0 : 1;  // float rounding of O(1) outputs is ~1e-5; a bug is O(1)
}
