// BlockBERT (Qiu et al. 2019): cut the sequence into a few blocks and let each head attend from
// one query block to just one key block, chosen by a permutation. With 3 blocks the permutations
// are (0,1,2) — each block sees itself, local attention — and the cyclic shifts (1,2,0) and
// (2,0,1) — each block sees another one, long-range attention. Spread over the heads (here 8:2:2
// of 12 heads, one of the paper's mixes), every token still reaches every block through some
// head, yet each head computes only 1/3 of the score matrix. BlockSparseLayout holds the pattern;
// tiles outside it are skipped entirely, so the saving is in time, not just in masking. The
// kernel cuts each block into tiles that divide it: prefer a block size with a large divisor.
//   block_sparse [block size] [head dim]     (defaults: 512 64, i.e. n = 1536 tokens, 12 heads)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <blockattn/blockattn.hpp>

using blockattn::Index;

int main(int argc, char** argv) {
  const Index block = argc > 1 ? std::atol(argv[1]) : 512, d = argc > 2 ? std::atol(argv[2]) : 64;
  if (block < 1 || d < 1) return 2;
  const Index blocks = 3, heads = 12, n = blocks * block;
  // Head h uses permutation perms[h]: query block qb sees key block perms[h][qb].
  std::vector<std::vector<Index>> perms(heads, {0, 1, 2});
  for (Index h = 8; h < 10; ++h) perms[h] = {1, 2, 0};
  for (Index h = 10; h < 12; ++h) perms[h] = {2, 0, 1};
  const auto layout = blockattn::BlockSparseLayout::from_permutations(perms, block);

  // One sequence, [1, n, heads, d] (BSHD), values uniform in [-1, 1]. Bidirectional (no causal).
  const blockattn::Matrix<float> q = blockattn::Matrix<float>::Random(n, heads * d);
  const blockattn::Matrix<float> k = blockattn::Matrix<float>::Random(n, heads * d);
  const blockattn::Matrix<float> v = blockattn::Matrix<float>::Random(n, heads * d);
  blockattn::Matrix<float> dense(n, heads * d), sparse(n, heads * d), naive(n, heads * d);
  auto view = [&](const blockattn::Matrix<float>& m) {
    return blockattn::make_tensor_view(m.data(), 1, n, heads, d);
  };
  auto out_view = [&](blockattn::Matrix<float>& m) {
    return blockattn::make_tensor_view(m.data(), 1, n, heads, d);
  };

  blockattn::AttentionOptions dense_options, sparse_options;
  sparse_options.block_sparse = &layout;  // not owned: must outlive the call
  auto time_ms = [&](blockattn::Matrix<float>& out, const blockattn::AttentionOptions& options) {
    const auto start = std::chrono::steady_clock::now();
    blockattn::attention(view(q), view(k), view(v), out_view(out), options);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3;
  };
  const double dense_ms = time_ms(dense, dense_options),
               sparse_ms = time_ms(sparse, sparse_options);

  // FLOPs are 4·d per visible (query, key) pair (q·k and p·v): dense n² per head, BlockBERT
  // blocks·block² per head — a 1/blocks fraction.
  const double dense_flops =
      4.0 * static_cast<double>(heads * d) * static_cast<double>(n) * static_cast<double>(n);
  const double sparse_flops = dense_flops / static_cast<double>(blocks);
  std::printf("n = %ld tokens in %ld blocks of %ld, %ld heads (8 local, 2 + 2 shifted), d = %ld\n",
              static_cast<long>(n), static_cast<long>(blocks), static_cast<long>(block),
              static_cast<long>(heads), static_cast<long>(d));
  std::printf("dense      %8.2f GFLOP  %8.1f ms\n", dense_flops * 1e-9, dense_ms);
  std::printf("BlockBERT  %8.2f GFLOP  %8.1f ms  (%.0f%% of the FLOPs, %.1fx faster)\n",
              sparse_flops * 1e-9, sparse_ms, 100.0 * sparse_flops / dense_flops,
              dense_ms / sparse_ms);

  blockattn::reference::attention(view(q), view(k), view(v), out_view(naive), sparse_options);
  const float error = (sparse - naive).cwiseAbs().maxCoeff();
  // Each side is within 4u·(d·√d + n + 8) of the exact result for |q|, |k|, |v| <= 1, u = 2^-24
  // (tests/support/tolerance.hpp); a block attending to the wrong key block would be off by ~0.1.
  const double tolerance =
      2 * 4 * 0x1p-24 *
      (static_cast<double>(d) * std::sqrt(static_cast<double>(d)) + static_cast<double>(n) + 8);
  std::printf("max |BlockBERT - reference| = %.2g (tolerance %.2g)\n", static_cast<double>(error),
              tolerance);
  return static_cast<double>(error) <= tolerance ? 0 : 1;
}
