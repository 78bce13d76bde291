// Next-token sampling in miniature: a vocabulary of logits, its softmax, and the k most likely
// tokens. Milakov & Gimelshein's point: the softmax normaliser Σ exp(x − max) does not need the
// max first. One pass can keep a running (max, sum) and rescale the sum whenever the max grows
// (OnlineSoftmax), and the same pass can keep the k largest logits, so softmax + top-k reads the
// logits once (softmax_topk) instead of four or five times (softmax, then a sort).
//
//   softmax_topk [vocabulary size] [k]      (defaults: 50000 5)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <blockattn/blockattn.hpp>

int main(int argc, char** argv) {
  const blockattn::Index vocabulary = argc > 1 ? std::atol(argv[1]) : 50000;
  const blockattn::Index k = argc > 2 ? std::atol(argv[2]) : 5;
  if (vocabulary < 1 || k < 1) return 2;

  // Logits as a language model might produce them: mostly noise, a few clear favourites.
  std::mt19937 rng(42);
  std::normal_distribution<float> noise(0.0F, 2.0F);
  blockattn::RowVector<float> logits(vocabulary);
  for (auto& logit : logits) logit = noise(rng);
  logits(vocabulary / 3) = 12.0F;  // the favourite
  logits(vocabulary / 7) = 11.5F;  // the runner-up

  // 1. The normaliser in one pass. The state is (max, sum); it can also be built in pieces
  //    (say, one per thread) and merged: merge() is the paper's associative ⊕.
  blockattn::OnlineSoftmax<float> first_half, second_half;
  first_half.update(logits.data(), vocabulary / 2);
  second_half.update(logits.data() + vocabulary / 2, vocabulary - vocabulary / 2);
  first_half.merge(second_half);
  std::printf("max logit %.3f, log-sum-exp %.4f\n", static_cast<double>(first_half.max),
              static_cast<double>(first_half.log_sum_exp()));

  // 2. The full softmax, row-wise over a matrix (here one row); Online is the default algorithm.
  blockattn::Matrix<float> probabilities(1, vocabulary);
  blockattn::softmax(blockattn::Matrix<float>(logits), probabilities);

  // 3. Fused softmax + top-k: one read of the logits. Results come in descending order, ties by
  //    lower index; k larger than the vocabulary would simply return all of it.
  blockattn::RowVector<float> top_probability(k);
  blockattn::RowVector<blockattn::Index> top_token(k);
  const blockattn::Index found = blockattn::softmax_topk(logits, k, top_probability, top_token);

  // 4. The same on plain arrays: Spans carry each array's length, so a buffer too short for
  //    min(k, vocabulary) entries is a std::invalid_argument naming it, not an overflow.
  std::vector<float> span_probability(static_cast<std::size_t>(k));
  std::vector<blockattn::Index> span_token(static_cast<std::size_t>(k));
  blockattn::softmax_topk(blockattn::Span(logits.data(), vocabulary), k,
                          blockattn::Span(span_probability), blockattn::Span(span_token));

  int mismatches = 0;
  for (blockattn::Index i = 0; i < found; ++i) {
    const auto slot = static_cast<std::size_t>(i);
    if (span_token[slot] != top_token(i) || span_probability[slot] != top_probability(i)) {
      ++mismatches;  // the two forms run the same kernel: bitwise equal
    }
    const float full = probabilities(0, top_token(i));
    std::printf("  #%ld  token %6ld  p = %.6f  (full softmax: %.6f)\n", static_cast<long>(i + 1),
                static_cast<long>(top_token(i)), static_cast<double>(top_probability(i)),
                static_cast<double>(full));
    // Both are within a few hundred ulp of the exact value at this size.
    if (std::fabs(full - top_probability(i)) > 1e-4F * full) ++mismatches;
  }
  const bool favourite_first = found > 0 && top_token(0) == vocabulary / 3;
  return mismatches == 0 && favourite_first ? 0 : 1;
}
