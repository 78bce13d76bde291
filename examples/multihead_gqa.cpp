// Multi-head attention as a model runs it. A batch of sequences lives in one [batch, seq, heads,
// dim] buffer (BSHD); blockattn reads it through a strided TensorView, so nothing is copied or
// transposed. Grouped-query attention (GQA): 16 query heads share 4 key/value heads, so the KV
// cache is 4× smaller and query head h simply reads kv head h / 4. Causal, and padded: the
// sequences have different lengths, and options.key_lengths[b] says where sequence b's real keys
// end (keys past it are padding and get no weight).
//   multihead_gqa [batch] [seq] [query heads] [kv heads] [head dim]   (defaults: 4 1024 16 4 64)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <blockattn/blockattn.hpp>

int main(int argc, char** argv) {
  using blockattn::Index;
  const Index batch = argc > 1 ? std::atol(argv[1]) : 4, seq = argc > 2 ? std::atol(argv[2]) : 1024;
  const Index heads = argc > 3 ? std::atol(argv[3]) : 16,
              kv_heads = argc > 4 ? std::atol(argv[4]) : 4;
  const Index dim = argc > 5 ? std::atol(argv[5]) : 64;
  if (batch < 1 || seq < 1 || dim < 1 || kv_heads < 1 || heads < 1 || heads % kv_heads != 0) {
    std::fprintf(
        stderr,
        "usage: multihead_gqa [batch] [seq] [heads] [kv_heads] [dim], kv_heads dividing heads\n");
    return 2;
  }
  // Plain contiguous buffers, as a framework hands them over. Values uniform in [-1, 1].
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> uniform(-1.0F, 1.0F);
  std::vector<float> q(batch * seq * heads * dim);
  std::vector<float> k(batch * seq * kv_heads * dim), v(k.size());
  for (auto* buffer : {&q, &k, &v})
    std::generate(buffer->begin(), buffer->end(), [&] { return uniform(rng); });
  std::vector<float> out(q.size()), naive(q.size());

  // Sequence b has lengths[b] real tokens (1024, 768, 512, 256 by default); the rest is padding
  // (whose query rows are computed too, and ignored by a model).
  std::vector<Index> lengths(batch);
  for (Index b = 0; b < batch; ++b) lengths[b] = std::max<Index>(1, seq - b * seq / batch);
  blockattn::AttentionOptions options;
  options.causal = true;
  options.key_lengths = lengths;

  // make_tensor_view: a contiguous BSHD buffer (make_tensor_view_bhsd for [batch, heads, seq, dim];
  // any other strides via the TensorView constructor). The kv views have fewer heads: that is GQA.
  const auto q_view = blockattn::make_tensor_view<const float>(q.data(), batch, seq, heads, dim);
  const auto k_view = blockattn::make_tensor_view<const float>(k.data(), batch, seq, kv_heads, dim);
  const auto v_view = blockattn::make_tensor_view<const float>(v.data(), batch, seq, kv_heads, dim);
  const auto start = std::chrono::steady_clock::now();
  blockattn::attention(q_view, k_view, v_view,
                       blockattn::make_tensor_view(out.data(), batch, seq, heads, dim), options);
  const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;

  // Visible (query, key) pairs: query i of sequence b sees keys 0..min(i, lengths[b] − 1).
  double pairs = 0;
  for (Index b = 0; b < batch; ++b) {
    for (Index i = 0; i < seq; ++i) pairs += static_cast<double>(std::min(i + 1, lengths[b]));
  }
  const double flops = 4.0 * pairs * static_cast<double>(heads * dim);  // q·k and p·v, 2 each
  const double kv_mib = 2.0 * static_cast<double>(k.size()) * sizeof(float) / (1024.0 * 1024.0);
  std::printf("batch %ld x seq %ld, %ld query heads on %ld kv heads, d = %ld, causal, key lengths",
              static_cast<long>(batch), static_cast<long>(seq), static_cast<long>(heads),
              static_cast<long>(kv_heads), static_cast<long>(dim));
  for (const Index length : lengths) std::printf(" %ld", static_cast<long>(length));
  std::printf("\ntime %.1f ms, %.1f GFLOP/s over the visible pairs\n", seconds.count() * 1e3,
              flops / seconds.count() * 1e-9);
  std::printf("K and V: %.1f MiB (without GQA: %.1f MiB)\n", kv_mib,
              kv_mib * static_cast<double>(heads / kv_heads));

  // The naive O(n²) reference with the same views and options.
  blockattn::reference::attention(q_view, k_view, v_view,
                                  blockattn::make_tensor_view(naive.data(), batch, seq, heads, dim),
                                  options);
  float error = 0;
  for (std::size_t i = 0; i < out.size(); ++i) error = std::max(error, std::abs(out[i] - naive[i]));
  // Each side is within 4u·(d·√d + n + 8) of the exact result for |q|, |k|, |v| <= 1, u = 2^-24
  // (the bound of tests/support/tolerance.hpp); a head- or padding-indexing bug would be ~0.1.
  const double tolerance = 2 * 4 * 0x1p-24 *
                           (static_cast<double>(dim) * std::sqrt(static_cast<double>(dim)) +
                            static_cast<double>(seq) + 8);
  std::printf("max |blockattn - reference| = %.2g (tolerance %.2g)\n", static_cast<double>(error),
              tolerance);
  return static_cast<double>(error) <= tolerance ? 0 : 1;
}
