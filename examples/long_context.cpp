// Causal single-head attention over a long context (default n = 131,072 tokens, d = 64). The
// naive way needs an n×n score matrix (64 GiB in float); the chunked kernel needs a few hundred
// KiB of workspace. Even q, k, v and out together would be 128 MiB here, so this program does
// what a long-context prefill does: k and v stay resident, and the queries are processed in
// slices of 4096 — with the bottom-right causal alignment, query slice [q0, q1) against keys
// [0, q1) is exactly rows q0..q1−1 of the full causal attention — each slice's output consumed
// (here: checked) before the next. Prints the time and the peak resident set.
//   long_context [n] [d]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include <blockattn/blockattn.hpp>

namespace {

// Peak resident set size (VmHWM) of this process in bytes, from /proc (Linux); 0 if unknown.
double peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr) * 1024.0;
  }
  return 0;
}

constexpr double kMiB = 1024.0 * 1024.0;
constexpr blockattn::Index kSlice = 4096;  // queries per slice

}  // namespace

int main(int argc, char** argv) {
  const blockattn::Index n = argc > 1 ? std::atol(argv[1]) : 131072;
  const blockattn::Index d = argc > 2 ? std::atol(argv[2]) : 64;
  if (n <= 0 || d <= 0) {
    std::fprintf(stderr, "usage: long_context [n > 0] [d > 0]\n");
    return 2;
  }
  const blockattn::Matrix<float> k = blockattn::Matrix<float>::Random(n, d);
  const blockattn::Matrix<float> v = blockattn::Matrix<float>::Random(n, d);
  blockattn::Matrix<float> q(std::min(n, kSlice), d);
  blockattn::Matrix<float> out(std::min(n, kSlice), d);
  blockattn::AttentionOptions options;
  options.causal = true;

  bool ok = true;
  double seconds = 0;
  for (blockattn::Index q0 = 0; q0 < n; q0 += kSlice) {
    const blockattn::Index rows = std::min(kSlice, n - q0);
    q.topRows(rows).setRandom();  // the next slice of queries arrives
    const auto start = std::chrono::steady_clock::now();
    blockattn::attention(q.topRows(rows), k.topRows(q0 + rows), v.topRows(q0 + rows),
                         out.topRows(rows), options);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    // Every output row is a convex combination of rows of v (uniform in [-1, 1]): a cheap check
    // that holds for any correct kernel.
    ok = ok && out.topRows(rows).allFinite() && out.topRows(rows).cwiseAbs().maxCoeff() <= 1.0F;
  }

  const double kv_bytes = 2.0 * static_cast<double>(n * d) * sizeof(float);
  const double naive_scores = static_cast<double>(n) * static_cast<double>(n) * sizeof(float);
  const double pairs = static_cast<double>(n) * static_cast<double>(n + 1) / 2;
  std::printf("causal attention, n = %ld, d = %ld, float, queries in slices of %ld\n",
              static_cast<long>(n), static_cast<long>(d), static_cast<long>(kSlice));
  std::printf("time                 %.2f s (%.1f GFLOP/s over the visible pairs)\n", seconds,
              4.0 * pairs * static_cast<double>(d) / seconds * 1e-9);
  std::printf("peak RSS             %.1f MiB (k and v themselves: %.1f MiB)\n",
              peak_rss_bytes() / kMiB, kv_bytes / kMiB);
  std::printf("naive would need     %.1f MiB for the n x n scores alone\n", naive_scores / kMiB);
  return ok ? 0 : 1;
}
