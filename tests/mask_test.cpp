// The mask machinery every kernel shares (detail::TileMasker): its tile classification and its
// per-pair masking agree with the pair-by-pair definition (reference::detail::attention_visible)
// on random combinations of every built-in mask and a user mask; and BlockSparseLayout.
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <blockattn/mask.hpp>
#include <blockattn/reference.hpp>

#include "support/random.hpp"

namespace mask_test {
namespace {

using blockattn::AttentionOptions;
using blockattn::BlockSparseLayout;
using blockattn::BlockVisibility;
using blockattn::Index;
using blockattn::Matrix;
using blockattn::test::make_rng;
using blockattn::test::seed_trace;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

// Checks every tile of a (query_chunk × key_chunk) grid: Empty tiles hold no visible pair, Full
// tiles no hidden one, and apply() hides exactly the hidden pairs of a Partial tile; key_range()
// covers every visible key of its rows.
template <class MaskMod>
void expect_tiles_agree(const AttentionOptions& options, Index n_q, Index n_k, Index qc, Index kc,
                        Index b, Index h, const MaskMod& mask_mod, Index* skipped = nullptr) {
  const blockattn::detail::TileMasker<MaskMod> masker(options, n_q, n_k, b, h, mask_mod);
  const auto visible = [&](Index i, Index j) {
    return blockattn::reference::detail::attention_visible(options, n_q, n_k, b, h, i, j, mask_mod);
  };
  const double inf = std::numeric_limits<double>::infinity();
  for (Index q0 = 0; q0 < n_q; q0 += qc) {
    const Index q_end = std::min(q0 + qc, n_q);
    const auto [first, last] = masker.key_range(q0, q_end);
    ASSERT_LE(0, first);
    ASSERT_LE(first, last);
    ASSERT_LE(last, n_k);
    for (Index i = q0; i < q_end; ++i) {
      for (Index j = 0; j < n_k; ++j) {
        if (visible(i, j)) {
          ASSERT_TRUE(first <= j && j < last) << "key_range misses " << i << "," << j;
        }
      }
    }
    for (Index k0 = 0; k0 < n_k; k0 += kc) {
      const Index k_end = std::min(k0 + kc, n_k);
      SCOPED_TRACE("tile q[" + std::to_string(q0) + "," + std::to_string(q_end) + ") k[" +
                   std::to_string(k0) + "," + std::to_string(k_end) + ")");
      const blockattn::detail::TileMask tile = masker.classify(q0, q_end, k0, k_end);
      Matrix<double> s = Matrix<double>::Zero(q_end - q0, k_end - k0);
      masker.apply(tile, q0, k0, s, -inf);
      for (Index i = q0; i < q_end; ++i) {
        for (Index j = k0; j < k_end; ++j) {
          const bool v = visible(i, j);
          if (tile.visibility == BlockVisibility::Empty) {
            ASSERT_FALSE(v) << "an Empty tile hides visible pair " << i << "," << j;
          } else {
            if (tile.visibility == BlockVisibility::Full) {
              ASSERT_TRUE(v) << "a Full tile shows hidden pair " << i << "," << j;
            }
            ASSERT_EQ(s(i - q0, j - k0) == 0, v) << "apply() disagrees at " << i << "," << j;
          }
        }
      }
      if (skipped != nullptr && tile.visibility == BlockVisibility::Empty) ++*skipped;
    }
  }
}

TEST(TileMaskerTest, RandomCombinationsAgreeWithThePairwiseDefinition) {
  auto rng = make_rng(21);
  std::uniform_int_distribution<Index> size(1, 40);
  std::uniform_int_distribution<Index> chunk(1, 12);
  std::uniform_int_distribution<Index> window(-1, 9);
  std::bernoulli_distribution coin(0.5);
  for (int trial = 0; trial < 300; ++trial) {
    const Index n_q = size(rng);
    const Index n_k = size(rng);
    AttentionOptions options;
    options.causal = coin(rng);
    options.window_left = window(rng);
    options.window_right = window(rng);
    const Index key_length = std::uniform_int_distribution<Index>(0, n_k)(rng);
    if (coin(rng)) options.key_lengths = {&key_length, 1};
    const Index qb = chunk(rng);
    const Index kb = chunk(rng);
    BlockSparseLayout layout(2, (n_q + qb - 1) / qb, (n_k + kb - 1) / kb, qb, kb);
    for (Index h = 0; h < 2; ++h) {
      for (Index i = 0; i < layout.query_blocks(); ++i) {
        for (Index j = 0; j < layout.key_blocks(); ++j) layout.set(h, i, j, coin(rng));
      }
    }
    if (coin(rng)) options.block_sparse = &layout;
    const Index qc = chunk(rng);
    const Index kc = chunk(rng);
    SCOPED_TRACE("trial " + std::to_string(trial) + " n_q=" + std::to_string(n_q) +
                 " n_k=" + std::to_string(n_k) + " chunks " + std::to_string(qc) + "x" +
                 std::to_string(kc) + " " + seed_trace());
    expect_tiles_agree(options, n_q, n_k, qc, kc, /*b=*/0, /*h=*/1, blockattn::NoMaskMod{});
    const auto stripes = [](Index, Index, Index i, Index j) { return (i + 2 * j) % 3 != 0; };
    expect_tiles_agree(options, n_q, n_k, qc, kc, 0, 1, stripes);
    if (HasFatalFailure()) return;
  }
}

// A causal mask skips the tiles strictly above the diagonal: about half of them.
TEST(TileMaskerTest, CausalSkipsTilesAboveTheDiagonal) {
  AttentionOptions options;
  options.causal = true;
  Index skipped = 0;
  expect_tiles_agree(options, 64, 64, 8, 8, 0, 0, blockattn::NoMaskMod{}, &skipped);
  EXPECT_EQ(skipped, 8 * 7 / 2);
}

// A user classifier's Empty and Full are trusted: Empty tiles are skipped without calling the
// mask, Full tiles are not checked pair by pair.
TEST(TileMaskerTest, UserBlockClassificationIsTrusted) {
  int calls = 0;
  const auto mask = [&calls](Index, Index, Index, Index j) {
    ++calls;
    return j < 16;
  };
  const auto classify = [](Index, Index, Index, Index, Index k0, Index k_end) {
    if (k_end <= 16) return BlockVisibility::Full;
    if (k0 >= 16) return BlockVisibility::Empty;
    return BlockVisibility::Partial;
  };
  const auto classified = blockattn::classified_mask_mod(mask, classify);
  const blockattn::detail::TileMasker<decltype(classified)> masker(AttentionOptions{}, 8, 32, 0, 0,
                                                                   classified);
  EXPECT_EQ(masker.classify(0, 8, 0, 8).visibility, BlockVisibility::Full);
  EXPECT_EQ(masker.classify(0, 8, 16, 24).visibility, BlockVisibility::Empty);
  EXPECT_EQ(masker.classify(0, 8, 12, 20).visibility, BlockVisibility::Partial);
  Matrix<double> s = Matrix<double>::Zero(8, 8);
  masker.apply(masker.classify(0, 8, 0, 8), 0, 0, s, -1.0);
  EXPECT_EQ(calls, 0);
  EXPECT_TRUE(s.isZero(0));
  masker.apply(masker.classify(0, 8, 12, 20), 0, 12, s, -1.0);
  EXPECT_EQ(calls, 64);
  EXPECT_EQ((s.array() == -1.0).count(), 8 * 4);
}

TEST(BlockSparseLayoutTest, PermutationsSetOneKeyBlockPerQueryBlock) {
  const auto layout = BlockSparseLayout::from_permutations({{0, 1, 2}, {2, 0, 1}}, 16);
  EXPECT_EQ(layout.heads(), 2);
  EXPECT_EQ(layout.query_blocks(), 3);
  EXPECT_EQ(layout.key_block_size(), 16);
  for (Index qb = 0; qb < 3; ++qb) {
    for (Index kb = 0; kb < 3; ++kb) {
      EXPECT_EQ(layout.visible(0, qb, kb), kb == qb);
      EXPECT_EQ(layout.visible(1, qb, kb), kb == (qb + 2) % 3);
    }
  }
}

TEST(BlockSparseLayoutTest, BadArgumentsThrowNamingTheValues) {
  EXPECT_THAT([] { BlockSparseLayout(1, 0, 2, 8, 8); },
              ThrowsMessage<std::invalid_argument>(HasSubstr("blockattn::BlockSparseLayout")));
  EXPECT_THAT([] { BlockSparseLayout(1, 2, 2, 0, 8); },
              ThrowsMessage<std::invalid_argument>(HasSubstr("block sizes must be positive")));
  BlockSparseLayout layout(1, 2, 3, 8, 8);
  EXPECT_THAT([&] { layout.set(0, 2, 0); },
              ThrowsMessage<std::invalid_argument>(HasSubstr("block (0, 2, 0) is outside")));
  EXPECT_THAT(
      [] {
        BlockSparseLayout::from_permutations({{0, 1}, {1}}, 8);
      },
      ThrowsMessage<std::invalid_argument>(HasSubstr("a permutation's size is 1")));
  EXPECT_THAT(
      [] {
        BlockSparseLayout::from_permutations({{0, 5}}, 8);
      },
      ThrowsMessage<std::invalid_argument>(HasSubstr("block index 5 is outside [0, 2)")));
}

}  // namespace

}  // namespace mask_test
