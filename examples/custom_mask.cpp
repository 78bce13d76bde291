// Document masking for packed sequences. To avoid padding, training packs several documents into
// one long sequence; a token must then attend only to earlier tokens of its OWN document. That is
// a user mask functor, mask(b, h, i, j) -> bool, AND-ed with options.causal. Called per pair it is
// correct but does not save work; paired with a block classifier (classified_mask_mod) that says
// when a whole (query block, key block) tile lies across two documents (Empty: skipped, no FLOPs)
// or inside one (Full: no per-pair calls), the kernel only pays for the diagonal blocks. A score
// functor, score_mod(s, b, h, i, j) -> s, adds a bonus to each document's first token.
//   custom_mask [n tokens] [head dim]      (defaults: 4096 64)
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <blockattn/blockattn.hpp>

using blockattn::BlockVisibility;
using blockattn::Index;

int main(int argc, char** argv) {
  const Index n = argc > 1 ? std::atol(argv[1]) : 4096, d = argc > 2 ? std::atol(argv[2]) : 64;
  if (n < 1 || d < 1) return 2;
  // Documents of random lengths in [n/16, n/4], packed back to back: doc[i] is token i's document.
  std::mt19937 rng(3);
  std::uniform_int_distribution<Index> length(std::max<Index>(1, n / 16),
                                              std::max<Index>(1, n / 4));
  std::vector<Index> doc(n), first(n);  // and first[i]: the position of its first token
  for (Index start = 0, id = 0; start < n; ++id) {
    const Index end = std::min(n, start + length(rng));
    for (Index i = start; i < end; ++i) doc[i] = id, first[i] = start;
    start = end;
  }

  auto same_document = [&](Index, Index, Index i, Index j) { return doc[i] == doc[j]; };
  // Documents are contiguous, so a tile's queries span documents doc[q0]..doc[q_end−1] and its
  // keys doc[k0]..doc[k_end−1]: disjoint ranges → Empty; one single document → Full. (Partial is
  // always a correct answer; Empty and Full must be exact.) The counters are for the printout.
  std::atomic<long> tiles[3] = {{0}, {0}, {0}};
  auto classify = [&](Index, Index, Index q0, Index q_end, Index k0, Index k_end) {
    const Index q_lo = doc[q0], q_hi = doc[q_end - 1], k_lo = doc[k0], k_hi = doc[k_end - 1];
    BlockVisibility answer = BlockVisibility::Partial;
    if (q_hi < k_lo || k_hi < q_lo) answer = BlockVisibility::Empty;
    if (q_lo == q_hi && k_lo == k_hi && q_lo == k_lo) answer = BlockVisibility::Full;
    tiles[static_cast<int>(answer)].fetch_add(1, std::memory_order_relaxed);
    return answer;
  };
  auto first_token_bonus = [&](float s, Index, Index, Index, Index j) {
    return j == first[j] ? s + 1 : s;
  };

  using Mat = blockattn::Matrix<float>;
  const Mat q = Mat::Random(n, d), k = Mat::Random(n, d), v = Mat::Random(n, d);
  Mat plain(n, d), classified(n, d), naive(n, d);
  blockattn::AttentionOptions options;
  options.causal = true;  // within a document, token i sees tokens up to i
  auto time_ms = [&](Mat& out, const auto& mask) {
    const auto start = std::chrono::steady_clock::now();
    blockattn::attention(q, k, v, out, options, {}, mask, first_token_bonus);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3;
  };
  // (The classified run goes first, so it also pays for starting the threads.)
  const double fast_ms =
      time_ms(classified, blockattn::classified_mask_mod(same_document, classify));
  const double plain_ms = time_ms(plain, same_document);
  blockattn::reference::attention(q, k, v, naive, options, {}, same_document, first_token_bonus);

  double visible = 0;  // pairs the mask lets through, against n(n+1)/2 for plain causal
  for (Index i = 0; i < n; ++i) visible += static_cast<double>(i - first[i] + 1);
  std::printf("%ld tokens in %ld documents, d = %ld: %.1f%% of the causal pairs are visible\n",
              static_cast<long>(n), static_cast<long>(doc[n - 1] + 1), static_cast<long>(d),
              100 * visible / (0.5 * static_cast<double>(n) * static_cast<double>(n + 1)));
  std::printf("tiles the classifier saw: %ld skipped, %ld full, %ld partial\n", tiles[0].load(),
              tiles[2].load(), tiles[1].load());
  std::printf("mask per pair: %.1f ms; with the classifier: %.1f ms (%.1fx)\n", plain_ms, fast_ms,
              plain_ms / fast_ms);
  const float error =
      std::max((plain - naive).cwiseAbs().maxCoeff(), (classified - naive).cwiseAbs().maxCoeff());
  // Each side is within 4u·(d·√d + E + n + 8) of the exact result for |q|, |k|, |v| <= 1, u =
  // 2^-24, E = 1 the bonus (tests/support/tolerance.hpp); a wrongly skipped tile moves rows by
  // ~0.1.
  const double dd = static_cast<double>(d),
               tolerance = 8 * 0x1p-24 * (dd * std::sqrt(dd) + 1 + static_cast<double>(n) + 8);
  std::printf("max |blockattn - reference| = %.2g (tolerance %.2g)\n", static_cast<double>(error),
              tolerance);
  return static_cast<double>(error) <= tolerance ? 0 : 1;
}
