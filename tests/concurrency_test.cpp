// Several std::threads call attention() at once, each with an OpenMP team inside, on different
// problems (GQA, masks, modifiers); every result must be bit-identical to a serial run of the
// same problem. Also built by the tsan preset (ThreadSanitizer with LLVM's Archer OpenMP tool),
// which checks that the calls share no state and that the OpenMP regions are race-free. It
// includes every header: the tsan suite is CI's one clang build of the tests, so the whole library
// also compiles there under clang's warnings with -Werror (g++ misses some, e.g. `&` on calls).

#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include <blockattn/blockattn.hpp>

#include "support/random.hpp"
#include "support/scalar_types.hpp"

namespace concurrency_test {
namespace {

using blockattn::AttentionOptions;
using blockattn::BlockSparseLayout;
using blockattn::Index;
using blockattn::Matrix;
using blockattn::test::make_rng;
using blockattn::test::random_matrix;
using blockattn::test::seed_trace;

/// One batched GQA problem: q [2, n_q, 4, 16], k/v [2, n_k, 2, 16/12]; options by `variant`.
template <class T>
struct Problem {
  Index n_q, n_k;
  Matrix<T> q, k, v;
  std::vector<Index> key_lengths;
  std::vector<double> slopes{0.25, 0.5, 0.125, 1.0};
  BlockSparseLayout layout{1, 4, 4, 16, 16};
  AttentionOptions options;

  Problem(int variant, std::uint64_t salt) : n_q(37 + 5 * variant), n_k(61 - 3 * variant) {
    auto rng = make_rng(salt);
    q = random_matrix<T>(rng, 2 * n_q, 4 * 16);
    k = random_matrix<T>(rng, 2 * n_k, 2 * 16);
    v = random_matrix<T>(rng, 2 * n_k, 2 * 12);
    key_lengths = {n_k, n_k - 9};
    options.causal = variant % 2 == 0;
    options.query_chunk = 8 + variant;
    options.key_chunk = 16 - variant;
    if (variant % 3 == 1) options.key_lengths = key_lengths;
    if (variant % 3 == 2) options.alibi_slopes = slopes;
    if (variant == 3) {
      for (Index i = 0; i < 4; ++i) {
        layout.set(0, i, i);
        layout.set(0, i, 0);
      }
      options.block_sparse = &layout;
      options.softcap = 5;
    }
  }

  /// out [2, n_q, 4, 12], computed with `threads` OpenMP threads.
  Matrix<T> run(int threads) const {
    Matrix<T> out(2 * n_q, 4 * 12);
    AttentionOptions o = options;
    o.threads = threads;
    blockattn::attention(blockattn::make_tensor_view(q.data(), 2, n_q, 4, 16),
                         blockattn::make_tensor_view(k.data(), 2, n_k, 2, 16),
                         blockattn::make_tensor_view(v.data(), 2, n_k, 2, 12),
                         blockattn::make_tensor_view(out.data(), 2, n_q, 4, 12), o);
    return out;
  }
};

template <class T>
class ConcurrencyTest : public ::testing::Test {};
TYPED_TEST_SUITE(ConcurrencyTest, blockattn::test::Scalars, );

// Four caller threads × two rounds, each caller with a 2-thread OpenMP team, all at once.
TYPED_TEST(ConcurrencyTest, ConcurrentCallersWithOpenMPTeamsMatchASerialRunBitwise) {
  using T = TypeParam;
  SCOPED_TRACE(seed_trace());
  constexpr int kCallers = 4;
  std::vector<Problem<T>> problems;
  std::vector<Matrix<T>> serial;
  for (int c = 0; c < kCallers; ++c) {
    problems.emplace_back(c, 100 + static_cast<std::uint64_t>(c));
    serial.push_back(problems.back().run(1));
  }
  std::vector<std::vector<Matrix<T>>> results(kCallers);
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      for (int round = 0; round < 2; ++round) {
        results[static_cast<std::size_t>(c)].push_back(
            problems[static_cast<std::size_t>(c)].run(2));
      }
    });
  }
  for (auto& caller : callers) caller.join();
  for (int c = 0; c < kCallers; ++c) {
    SCOPED_TRACE("caller " + std::to_string(c));
    for (const Matrix<T>& got : results[static_cast<std::size_t>(c)]) {
      ASSERT_EQ(got.rows(), serial[static_cast<std::size_t>(c)].rows());
      // Bitwise (NaN-free inputs): memcmp-equal, not just ==.
      EXPECT_EQ(0, std::memcmp(got.data(), serial[static_cast<std::size_t>(c)].data(),
                               static_cast<std::size_t>(got.size()) * sizeof(T)));
    }
  }
}

// One problem, every thread count, one caller: bit-identical (the thread-invariance promise).
TYPED_TEST(ConcurrencyTest, ThreadInvarianceOfOneCall) {
  using T = TypeParam;
  SCOPED_TRACE(seed_trace());
  for (int variant = 0; variant < 4; ++variant) {
    const Problem<T> problem(variant, 200 + static_cast<std::uint64_t>(variant));
    const Matrix<T> one = problem.run(1);
    for (const int threads : {2, 3, 4}) {
      SCOPED_TRACE("variant " + std::to_string(variant) + " threads " + std::to_string(threads));
      const Matrix<T> many = problem.run(threads);
      EXPECT_EQ(0, std::memcmp(one.data(), many.data(),
                               static_cast<std::size_t>(one.size()) * sizeof(T)));
    }
  }
}

}  // namespace

}  // namespace concurrency_test
