// The memory contract of attention() (STYLE §2.10 a): with Eigen's runtime allocation check on,
// the tile loop — every score product, modifier, mask, online update and the final
// normalisation — runs without one heap allocation for the default chunk sizes. No hidden
// temporaries, no Ref copies of the K/V blocks. A death test shows the check does fire.
#undef NDEBUG
#define EIGEN_RUNTIME_NO_MALLOC

#include <vector>

#include <gtest/gtest.h>

#include <blockattn/attention.hpp>

#include "support/random.hpp"
#include "support/scalar_types.hpp"

namespace {

using blockattn::AttentionOptions;
using blockattn::Index;
using blockattn::Matrix;
using blockattn::test::make_rng;
using blockattn::test::random_matrix;

template <class T>
class AttentionNoMallocTest : public ::testing::Test {};
TYPED_TEST_SUITE(AttentionNoMallocTest, blockattn::test::Scalars, );

TYPED_TEST(AttentionNoMallocTest, TileLoopNeverAllocates) {
  using T = TypeParam;
  auto rng = make_rng(31);
  for (const Index d : {Index{1}, Index{64}, Index{128}, Index{256}}) {
    for (const bool causal : {false, true}) {
      SCOPED_TRACE("d=" + std::to_string(d) + (causal ? " causal" : " full"));
      const Matrix<T> q = random_matrix<T>(rng, 300, d);
      const Matrix<T> k = random_matrix<T>(rng, 333, d);
      const Matrix<T> v = random_matrix<T>(rng, 333, d);
      Matrix<T> out(300, d);
      std::vector<T> lse(300);
      AttentionOptions options;
      options.causal = causal;
      options.window_left = causal ? 100 : -1;
      options.softcap = 30;
      blockattn::attention<T>(q, k, v, out, options, lse.data());  // aborts on an allocation
      EXPECT_TRUE(out.allFinite());
      const auto user_mask = [](Index, Index, Index i, Index j) { return (i ^ j) % 7 != 0; };
      blockattn::attention<T>(q, k, v, out, options, lse.data(), user_mask);
      EXPECT_TRUE(out.allFinite());
    }
  }
  // Multi-head GQA on strided views.
  const Matrix<T> q = random_matrix<T>(rng, 2 * 100 * 4, 32);
  const Matrix<T> kv = random_matrix<T>(rng, 2 * 120 * 2, 64);
  Matrix<T> out(2 * 100 * 4, 32);
  blockattn::attention<T>(
      blockattn::make_tensor_view(q.data(), 2, 100, 4, 32),
      blockattn::TensorView<const T>(kv.data(), 2, 120, 2, 32, 120 * 2 * 64, 2 * 64, 64),
      blockattn::TensorView<const T>(kv.data() + 32, 2, 120, 2, 32, 120 * 2 * 64, 2 * 64, 64),
      blockattn::make_tensor_view(out.data(), 2, 100, 4, 32));
  EXPECT_TRUE(out.allFinite());
}

// The instrument works: a key chunk whose packed GEMM block exceeds Eigen's stack buffer
// (4096 keys × 64 dims × 4 bytes = 1 MiB > 128 KiB) makes Eigen allocate inside the loop, and
// the check aborts.
TEST(AttentionNoMallocDeathTest, OversizedKeyChunkAllocatesAndIsCaught) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto rng = make_rng(32);
  const Matrix<float> q = random_matrix<float>(rng, 64, 64);
  const Matrix<float> k = random_matrix<float>(rng, 4096, 64);
  const Matrix<float> v = random_matrix<float>(rng, 4096, 64);
  Matrix<float> out(64, 64);
  AttentionOptions options;
  options.key_chunk = 4096;
  options.threads = 1;
  EXPECT_DEATH(blockattn::attention(q, k, v, out, options), "");
}

}  // namespace
