// attention(), reference::attention() and merge_attention_states(): against the naive reference
// in long double on the same rounded inputs, over awkward shapes, every mask, GQA/MQA, and the
// properties the design promises (chunk and thread invariance, permutation invariance, merge).
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <blockattn/attention.hpp>
#include <blockattn/detail/attention_plan.hpp>
#include <blockattn/reference.hpp>

#include "support/random.hpp"
#include "support/scalar_types.hpp"
#include "support/shapes.hpp"
#include "support/tolerance.hpp"

namespace attention_test {
namespace {

using blockattn::AttentionOptions;
using blockattn::BlockSparseLayout;
using blockattn::BlockVisibility;
using blockattn::Index;
using blockattn::Matrix;
using blockattn::TensorView;
using blockattn::test::describe;
using blockattn::test::effective_scale;
using blockattn::test::make_rng;
using blockattn::test::modifier_magnitude;
using blockattn::test::random_matrix;
using blockattn::test::seed_trace;
using blockattn::test::Shape;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

using Long = long double;

template <class T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// Runs attention<T> and reference::attention<long double> on the same inputs and checks every
// output row against attention_tolerance, and lse against lse_tolerance (exactly −inf when the
// reference's is).
template <class T, class MaskMod = blockattn::NoMaskMod, class ScoreMod = blockattn::NoScoreMod>
void expect_matches_reference(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v,
                              const AttentionOptions& options, const MaskMod& mask_mod = {},
                              const ScoreMod& score_mod = {}, double extra = 0) {
  Matrix<T> out(q.rows(), v.cols());
  std::vector<T> lse(static_cast<std::size_t>(q.rows()));
  blockattn::attention(q, k, v, out, options, lse, mask_mod, score_mod);

  const Matrix<Long> q_l = q.template cast<Long>();
  const Matrix<Long> k_l = k.template cast<Long>();
  const Matrix<Long> v_l = v.template cast<Long>();
  Matrix<Long> expected(q.rows(), v.cols());
  std::vector<Long> expected_lse(static_cast<std::size_t>(q.rows()));
  blockattn::reference::attention(q_l, k_l, v_l, expected, options, expected_lse, mask_mod,
                                  score_mod);

  const double scale = effective_scale(options, q.cols());
  extra += modifier_magnitude(options, q.rows(), k.rows());
  const auto tol = blockattn::test::attention_tolerance<T>(q, k, v, scale, extra);
  const auto lse_tol = blockattn::test::lse_tolerance<T>(q, k, scale, extra);
  for (Index i = 0; i < q.rows(); ++i) {
    const auto row = static_cast<std::size_t>(i);
    for (Index c = 0; c < v.cols(); ++c) {
      ASSERT_NEAR(static_cast<double>(out(i, c)), static_cast<double>(expected(i, c)), tol[row])
          << "row " << i << " column " << c;
    }
    if (std::isinf(expected_lse[row]) && expected_lse[row] < 0) {
      ASSERT_EQ(lse[row], -kInf<T>) << "row " << i << " has no visible key";
    } else {
      ASSERT_NEAR(static_cast<double>(lse[row]), static_cast<double>(expected_lse[row]),
                  lse_tol[row])
          << "lse of row " << i;
    }
  }
}

/// expect_matches_reference(), then the same bits from each of `thread_counts` threads as from one.
template <class T>
void expect_matches_reference_for_any_threads(const Matrix<T>& q, const Matrix<T>& k,
                                              const Matrix<T>& v, AttentionOptions options,
                                              std::initializer_list<int> thread_counts) {
  expect_matches_reference(q, k, v, options);
  Matrix<T> one(q.rows(), v.cols());
  Matrix<T> many(q.rows(), v.cols());
  options.threads = 1;
  blockattn::attention(q, k, v, one, options);
  for (const int threads : thread_counts) {
    options.threads = threads;
    blockattn::attention(q, k, v, many, options);
    ASSERT_TRUE(one == many) << "threads=" << threads;
  }
}

template <class T>
class AttentionTest : public ::testing::Test {};
TYPED_TEST_SUITE(AttentionTest, blockattn::test::Scalars, );

// n = 1, d = 1, primes, n_q ≠ n_k both ways, d_v ≠ d, chunk = 1, chunk ± 1 around n, chunk > n.
const std::vector<Shape> kAwkwardShapes = {
    {1, 1, 1, 1, 0, 0},       {1, 7, 3, 5, 0, 0},       {7, 1, 4, 4, 0, 0},
    {13, 13, 1, 1, 1, 1},     {13, 17, 8, 3, 3, 5},     {17, 13, 8, 3, 4, 4},
    {64, 64, 16, 16, 63, 65}, {65, 63, 16, 16, 64, 64}, {127, 131, 32, 24, 16, 16},
    {31, 97, 5, 11, 200, 7},  {100, 100, 64, 64, 0, 0}, {129, 257, 64, 32, 32, 0},
    {3, 300, 12, 12, 1, 299}, {257, 3, 7, 9, 300, 1},
};

TYPED_TEST(AttentionTest, MatchesReferenceOnAwkwardShapes) {
  using T = TypeParam;
  auto rng = make_rng(1);
  for (const Shape& s : kAwkwardShapes) {
    for (const bool causal : {false, true}) {
      SCOPED_TRACE(describe(s, causal ? "causal" : "full"));
      const auto in = blockattn::test::random_attention_inputs<T>(rng, s);
      AttentionOptions options;
      options.causal = causal;
      options.query_chunk = s.query_chunk;
      options.key_chunk = s.key_chunk;
      expect_matches_reference(in.q, in.k, in.v, options);
    }
  }
}

// One named mask configuration; `setup` may point options at storage owned by the case.
struct MaskCase {
  std::string name;
  AttentionOptions options;
};

// Every built-in mask alone and a few combinations, on shapes that cut tiles in all ways.
TYPED_TEST(AttentionTest, EveryBuiltInMaskAloneAndCombined) {
  using T = TypeParam;
  auto rng = make_rng(2);
  const Index n_q = 45;
  const Index n_k = 61;
  BlockSparseLayout layout(/*heads=*/1, /*query_blocks=*/6, /*key_blocks=*/8, 8, 8);
  for (Index qb = 0; qb < 6; ++qb) {
    layout.set(0, qb, qb);
    layout.set(0, qb, (qb * 3 + 1) % 8);
  }
  const Index key_length = 37;
  const double slope = 0.25;
  std::vector<MaskCase> cases;
  const auto add = [&](std::string name, auto&& edit) {
    MaskCase c{std::move(name), AttentionOptions{}};
    edit(c.options);
    cases.push_back(c);
  };
  add("none", [](AttentionOptions&) {});
  add("causal", [](AttentionOptions& o) { o.causal = true; });
  add("window_left", [](AttentionOptions& o) { o.window_left = 5; });
  add("window_right", [](AttentionOptions& o) { o.window_right = 3; });
  add("window_both", [](AttentionOptions& o) { o.window_left = 4, o.window_right = 2; });
  add("window_zero", [](AttentionOptions& o) { o.window_left = 0, o.window_right = 0; });
  add("key_lengths", [&](AttentionOptions& o) { o.key_lengths = {&key_length, 1}; });
  add("block_sparse", [&](AttentionOptions& o) { o.block_sparse = &layout; });
  add("alibi", [&](AttentionOptions& o) { o.alibi_slopes = {&slope, 1}; });
  add("softcap", [](AttentionOptions& o) { o.softcap = 0.75, o.scale = 4.0; });
  add("scale", [](AttentionOptions& o) { o.scale = -0.5; });
  add("causal+window", [](AttentionOptions& o) { o.causal = true, o.window_left = 6; });
  add("causal+key_lengths", [&](AttentionOptions& o) {
    o.causal = true, o.key_lengths = {&key_length, 1};
  });
  add("causal+block_sparse+alibi", [&](AttentionOptions& o) {
    o.causal = true, o.block_sparse = &layout, o.alibi_slopes = {&slope, 1};
  });
  add("all", [&](AttentionOptions& o) {
    o.causal = true, o.window_left = 20, o.key_lengths = {&key_length, 1}, o.block_sparse = &layout,
    o.alibi_slopes = {&slope, 1}, o.softcap = 2.0;
  });
  const Matrix<T> q = random_matrix<T>(rng, n_q, 16);
  const Matrix<T> k = random_matrix<T>(rng, n_k, 16);
  const Matrix<T> v = random_matrix<T>(rng, n_k, 12);
  for (const MaskCase& c : cases) {
    for (const auto& [qc, kc] :
         std::vector<std::pair<Index, Index>>{{0, 0}, {8, 8}, {5, 7}, {1, 64}}) {
      AttentionOptions options = c.options;
      options.query_chunk = qc;
      options.key_chunk = kc;
      SCOPED_TRACE(describe({n_q, n_k, 16, 12, qc, kc}, c.name));
      expect_matches_reference(q, k, v, options);
    }
  }
}

// A layout over n_q × n_k with blocks of qb × kb: about 40% of the blocks set by a fixed hash,
// query block 1 with no block at all (its rows must come out 0 with lse = −inf).
BlockSparseLayout hashed_layout(Index n_q, Index n_k, Index qb, Index kb) {
  BlockSparseLayout layout(1, (n_q + qb - 1) / qb, (n_k + kb - 1) / kb, qb, kb);
  for (Index i = 0; i < layout.query_blocks(); ++i) {
    for (Index j = 0; j < layout.key_blocks(); ++j) {
      if (i != 1 && (i * 7 + j * 13 + (i * j) % 5) % 5 < 2) layout.set(0, i, j);
    }
  }
  return layout;
}

// Block sizes with no divisor near the default chunks (primes, 2·prime): the kernel keeps its
// default chunks and masks the blocks that straddle a tile, instead of 1-row or 1-key tiles.
// Checked against the reference on lengths that are not multiples of the block sizes, with the
// default chunks and with chunks that cut every block, and the chosen tiles are checked too.
TYPED_TEST(AttentionTest, PrimeBlockSizesMatchReference) {
  using T = TypeParam;
  auto rng = make_rng(22);
  struct Blocks {
    Index query, key;
  };
  const Index d = 16;
  const Index d_v = 12;
  const Index n_q = 150;  // 2.2 blocks of 67, 1.5 of 97, 11.5 of 13
  const Index n_k = 300;  // 4.5 blocks of 67, 3.1 of 97, 1.2 of 257
  for (const Blocks& b : {Blocks{67, 97}, Blocks{97, 67}, Blocks{13, 257}}) {
    const BlockSparseLayout layout = hashed_layout(n_q, n_k, b.query, b.key);
    const Matrix<T> q = random_matrix<T>(rng, n_q, d);
    const Matrix<T> k = random_matrix<T>(rng, n_k, d);
    const Matrix<T> v = random_matrix<T>(rng, n_k, d_v);
    for (const bool causal : {false, true}) {
      for (const auto& [qc, kc] :
           std::vector<std::pair<Index, Index>>{{0, 0}, {b.query + 1, b.key - 1}}) {
        AttentionOptions options;
        options.block_sparse = &layout;
        options.causal = causal;
        options.query_chunk = qc;
        options.key_chunk = kc;
        SCOPED_TRACE(describe({n_q, n_k, d, d_v, qc, kc}, "blocks " + std::to_string(b.query) +
                                                              "x" + std::to_string(b.key) +
                                                              (causal ? " causal" : "")));
        expect_matches_reference(q, k, v, options);
      }
    }
  }
  // The tiles: aligned with the blocks when a divisor at least half the default exists (67 <=
  // 256 itself, 300 → 150, 512 → 256), the default chunk otherwise (257, 514 = 2·257, 769 are
  // larger than their default with no such divisor). Float, d = d_v = 16: 256 keys, 768 rows.
  const auto tiles = [](Index query_block, Index key_block) {
    const BlockSparseLayout layout(1, 1, 1, query_block, key_block);
    AttentionOptions options;
    options.block_sparse = &layout;
    blockattn::detail::AttentionShapes shapes;
    shapes.n_q = shapes.n_k = 4096;
    shapes.d = shapes.d_v = 16;
    return blockattn::detail::plan_attention<float>(shapes, options).shape;
  };
  EXPECT_EQ(tiles(67, 67).query_chunk, 67);
  EXPECT_EQ(tiles(67, 67).key_chunk, 67);
  EXPECT_EQ(tiles(769, 300).query_chunk, 768);
  EXPECT_EQ(tiles(769, 300).key_chunk, 150);
  EXPECT_EQ(tiles(384, 257).query_chunk, 384);
  EXPECT_EQ(tiles(384, 257).key_chunk, 256);
  EXPECT_EQ(tiles(1536, 514).query_chunk, 768);
  EXPECT_EQ(tiles(1536, 514).key_chunk, 256);
  EXPECT_EQ(tiles(64, 512).key_chunk, 256);
}

// mask_mod and score_mod functors, with and without a block classifier, alone and composed with
// the built-in masks.
TYPED_TEST(AttentionTest, UserFunctorsMatchReference) {
  using T = TypeParam;
  auto rng = make_rng(3);
  const Index n_q = 50;
  const Index n_k = 70;
  const Matrix<T> q = random_matrix<T>(rng, n_q, 8);
  const Matrix<T> k = random_matrix<T>(rng, n_k, 8);
  const Matrix<T> v = random_matrix<T>(rng, n_k, 6);
  // A "prefix-LM" mask: the first 20 keys are visible to everyone, the rest causally.
  const auto prefix = [](Index, Index, Index i, Index j) { return j < 20 || j <= i + 20; };
  const auto prefix_blocks = [](Index, Index, Index q0, Index q_end, Index k0, Index k_end) {
    static_cast<void>(q_end);
    if (k_end <= 20 || k_end - 1 <= q0 + 20) return BlockVisibility::Full;
    if (k0 >= 20 && k0 > q_end - 1 + 20) return BlockVisibility::Empty;
    return BlockVisibility::Partial;
  };
  const auto classified = blockattn::classified_mask_mod(prefix, prefix_blocks);
  // Generic, so that the long double reference runs the same modifier in long double.
  const auto bias = [](auto s, Index, Index, Index i, Index j) {
    using S = decltype(s);
    return s + static_cast<S>((i + j) % 5) / S(8);
  };
  for (const bool causal : {false, true}) {
    for (const Index chunk : {Index{0}, Index{7}, Index{16}}) {
      AttentionOptions options;
      options.causal = causal;
      options.query_chunk = chunk;
      options.key_chunk = chunk;
      SCOPED_TRACE(describe({n_q, n_k, 8, 6, chunk, chunk}, causal ? "causal" : "full"));
      expect_matches_reference(q, k, v, options, prefix);
      expect_matches_reference(q, k, v, options, classified);
      expect_matches_reference(q, k, v, options, blockattn::NoMaskMod{}, bias, /*extra=*/1.0);
      expect_matches_reference(q, k, v, options, classified, bias, /*extra=*/1.0);
    }
  }
}

/// Head h of batch entry b of a multi-head result against the long-double reference: every output
/// entry within tol[i] of its row i, every lse within lse_tol[i]. lse is [batch, heads, n_q].
template <class Out, class Expected, class T, class Long>
void expect_head_matches(const Out& out, const Expected& expected, const std::vector<T>& lse,
                         const std::vector<Long>& expected_lse, Index b, Index h, Index heads,
                         Index n_q, Index d_v, const std::vector<double>& tol,
                         const std::vector<double>& lse_tol) {
  for (Index i = 0; i < n_q; ++i) {
    for (Index c = 0; c < d_v; ++c) {
      ASSERT_NEAR(static_cast<double>(out.at(b, i, h)[c]),
                  static_cast<double>(expected.at(b, i, h)[c]), tol[static_cast<std::size_t>(i)])
          << "b=" << b << " h=" << h << " i=" << i << " c=" << c;
    }
    const auto at = static_cast<std::size_t>((b * heads + h) * n_q + i);
    ASSERT_NEAR(static_cast<double>(lse[at]), static_cast<double>(expected_lse[at]),
                lse_tol[static_cast<std::size_t>(i)])
        << "lse b=" << b << " h=" << h << " i=" << i;
  }
}

/// Every (batch, head) of attention()'s out and lse against reference::attention in long double
/// on the same inputs, options and mask. q, k, v hold [batch, seq, heads, dim] tensors whose
/// layout `view(data, seq, heads, dim)` gives; each head gets its own attention_tolerance and
/// lse_tolerance, with extra(h) the bound on head h's added score terms (0 when none).
template <class T, class View, class MaskMod, class Extra>
void expect_heads_match_reference(const View& view, const Matrix<T>& q, const Matrix<T>& k,
                                  const Matrix<T>& v, Index batch, Index n_q, Index n_k,
                                  Index heads, Index kv_heads, const AttentionOptions& options,
                                  const MaskMod& mask, const std::vector<T>& out,
                                  const std::vector<T>& lse, const Extra& extra) {
  const Index d = q.cols();
  const Index d_v = v.cols();
  const Matrix<Long> q_l = q.template cast<Long>();
  const Matrix<Long> k_l = k.template cast<Long>();
  const Matrix<Long> v_l = v.template cast<Long>();
  std::vector<Long> expected(out.size());
  std::vector<Long> expected_lse(lse.size());
  blockattn::reference::attention(
      view(q_l.data(), n_q, heads, d), view(k_l.data(), n_k, kv_heads, d),
      view(v_l.data(), n_k, kv_heads, d_v), view(expected.data(), n_q, heads, d_v), options,
      expected_lse, mask);
  const auto out_view = view(out.data(), n_q, heads, d_v);
  const auto expected_view = view(expected.data(), n_q, heads, d_v);
  for (Index b = 0; b < batch; ++b) {
    for (Index h = 0; h < heads; ++h) {
      const Index kv_h = h / (heads / kv_heads);
      const auto q_head =
          blockattn::detail::head_slice(TensorView<const T>(view(q.data(), n_q, heads, d)), b, h);
      const auto k_head = blockattn::detail::head_slice(
          TensorView<const T>(view(k.data(), n_k, kv_heads, d)), b, kv_h);
      const auto v_head = blockattn::detail::head_slice(
          TensorView<const T>(view(v.data(), n_k, kv_heads, d_v)), b, kv_h);
      const double scale = effective_scale(options, d);
      const auto tol =
          blockattn::test::attention_tolerance<T>(q_head, k_head, v_head, scale, extra(h));
      const auto lse_tol = blockattn::test::lse_tolerance<T>(q_head, k_head, scale, extra(h));
      ASSERT_NO_FATAL_FAILURE(expect_head_matches(out_view, expected_view, lse, expected_lse, b, h,
                                                  heads, n_q, d_v, tol, lse_tol));
    }
  }
}

// GQA (4 query heads on 2 kv heads), MQA (on 1), plain multi-head, batch 2 with padding, in both
// the BSHD and the BHSD layout, against the TensorView reference.
TYPED_TEST(AttentionTest, MultiHeadGqaAndMqaMatchReference) {
  using T = TypeParam;
  auto rng = make_rng(4);
  const Index batch = 2;
  const Index n_q = 23;
  const Index n_k = 29;
  const Index d = 8;
  const Index d_v = 5;
  const Index key_lengths[batch] = {29, 11};
  const double slopes[4] = {0.5, 0.25, 0.125, 0.0625};
  for (const auto& [heads, kv_heads] :
       std::vector<std::pair<Index, Index>>{{3, 3}, {4, 2}, {4, 1}}) {
    for (const bool bhsd : {false, true}) {
      for (const bool masked : {false, true}) {
        SCOPED_TRACE("heads=" + std::to_string(heads) + " kv_heads=" + std::to_string(kv_heads) +
                     (bhsd ? " BHSD" : " BSHD") + (masked ? " causal+padding+alibi" : "") + " " +
                     seed_trace());
        const auto make = [&](Index seq, Index h, Index dim) {
          return random_matrix<T>(rng, batch * seq * h, dim);  // rows reinterpreted below
        };
        const Matrix<T> q = make(n_q, heads, d);
        const Matrix<T> k = make(n_k, kv_heads, d);
        const Matrix<T> v = make(n_k, kv_heads, d_v);
        const auto view = [&](auto* data, Index seq, Index h, Index dim) {
          return bhsd ? blockattn::make_tensor_view_bhsd(data, batch, seq, h, dim)
                      : blockattn::make_tensor_view(data, batch, seq, h, dim);
        };
        AttentionOptions options;
        options.query_chunk = 5;
        options.key_chunk = 6;
        if (masked) {
          options.causal = true;
          options.key_lengths = key_lengths;
          options.alibi_slopes = slopes;
        }
        std::vector<T> out(static_cast<std::size_t>(batch * n_q * heads * d_v));
        std::vector<T> lse(static_cast<std::size_t>(batch * heads * n_q));
        blockattn::attention(view(q.data(), n_q, heads, d), view(k.data(), n_k, kv_heads, d),
                             view(v.data(), n_k, kv_heads, d_v), view(out.data(), n_q, heads, d_v),
                             options, lse);
        // ALiBi adds at most slope·(n_q + n_k) in magnitude to a score of head h.
        const auto extra = [&](Index h) {
          return masked ? slopes[h] * static_cast<double>(n_q + n_k) : 0.0;
        };
        ASSERT_NO_FATAL_FAILURE(
            expect_heads_match_reference(view, q, k, v, batch, n_q, n_k, heads, kv_heads, options,
                                         blockattn::NoMaskMod{}, out, lse, extra));
      }
    }
  }
}

// Heads stacked into one tile (GQA) keep their own masks: a per-head block-sparse layout, a
// head-dependent mask_mod and score_mod, compared head by head with the single-head reference.
TYPED_TEST(AttentionTest, GroupedHeadsKeepTheirOwnMasks) {
  using T = TypeParam;
  auto rng = make_rng(15);
  const Index heads = 4;
  const Index n = 37;
  const Index d = 8;
  const Matrix<T> q = random_matrix<T>(rng, n * heads, d);  // [1, n, 4, d] BSHD
  const Matrix<T> kv = random_matrix<T>(rng, n, 2 * d);     // k and v of one kv head, fused
  BlockSparseLayout layout(heads, 5, 5, 8, 8);
  for (Index h = 0; h < heads; ++h) {
    for (Index b = 0; b < 5; ++b) {
      layout.set(h, b, (b + h) % 5);
      layout.set(h, b, b);
    }
  }
  layout.set(3, 4, 0, false);
  layout.set(3, 4, 4, false);  // head 3's last query block sees nothing
  const auto mask = [](Index, Index h, Index i, Index j) { return h != 1 || (i + j) % 4 != 0; };
  const auto score = [](auto s, Index, Index h, Index, Index j) {
    using S = decltype(s);
    return s + static_cast<S>(h * ((j % 3) - 1)) / S(4);
  };
  AttentionOptions options;
  options.block_sparse = &layout;
  options.causal = true;
  options.query_chunk = 6;
  options.key_chunk = 8;
  std::vector<T> out(static_cast<std::size_t>(n * heads * d));
  std::vector<T> lse(static_cast<std::size_t>(heads * n));
  const TensorView<const T> k_view(kv.data(), 1, n, 1, d, 0, 2 * d, 0);
  const TensorView<const T> v_view(kv.data() + d, 1, n, 1, d, 0, 2 * d, 0);
  blockattn::attention(blockattn::make_tensor_view(q.data(), 1, n, heads, d), k_view, v_view,
                       blockattn::make_tensor_view(out.data(), 1, n, heads, d), options, lse, mask,
                       score);
  for (Index h = 0; h < heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h) + " " + seed_trace());
    const Matrix<T> q_h = blockattn::detail::head_slice(
        TensorView<const T>(blockattn::make_tensor_view(q.data(), 1, n, heads, d)), 0, h);
    const Matrix<T> k_h = kv.leftCols(d);
    const Matrix<T> v_h = kv.rightCols(d);
    // The single-head reference of head h: its layout grid, and the functors called with h.
    BlockSparseLayout one(1, 5, 5, 8, 8);
    for (Index qb = 0; qb < 5; ++qb) {
      for (Index kb = 0; kb < 5; ++kb) one.set(0, qb, kb, layout.visible(h, qb, kb));
    }
    AttentionOptions single = options;
    single.block_sparse = &one;
    const auto mask_h = [&](Index b, Index, Index i, Index j) { return mask(b, h, i, j); };
    const auto score_h = [&](auto s, Index b, Index, Index i, Index j) {
      return score(s, b, h, i, j);
    };
    Matrix<Long> expected(n, d);
    std::vector<Long> expected_lse(static_cast<std::size_t>(n));
    blockattn::reference::attention(q_h.template cast<Long>(), k_h.template cast<Long>(),
                                    v_h.template cast<Long>(), expected, single, expected_lse,
                                    mask_h, score_h);
    const auto tol =
        blockattn::test::attention_tolerance<T>(q_h, k_h, v_h, 1.0 / std::sqrt(8.0), /*extra=*/1.0);
    const auto lse_tol = blockattn::test::lse_tolerance<T>(q_h, k_h, 1.0 / std::sqrt(8.0), 1.0);
    const auto out_view = blockattn::make_tensor_view(out.data(), 1, n, heads, d);
    for (Index i = 0; i < n; ++i) {
      for (Index c = 0; c < d; ++c) {
        ASSERT_NEAR(static_cast<double>(out_view.at(0, i, h)[c]),
                    static_cast<double>(expected(i, c)), tol[static_cast<std::size_t>(i)])
            << "i=" << i << " c=" << c;
      }
      const Long e = expected_lse[static_cast<std::size_t>(i)];
      const T got = lse[static_cast<std::size_t>(h * n + i)];
      if (std::isinf(e)) {
        ASSERT_EQ(got, -kInf<T>) << "i=" << i;
      } else {
        ASSERT_NEAR(static_cast<double>(got), static_cast<double>(e),
                    lse_tol[static_cast<std::size_t>(i)])
            << "lse i=" << i;
      }
    }
  }
}

// A query with no visible key: output exactly 0 and lse exactly −inf, never NaN — from causal
// alignment with n_q > n_k, a zero key length, a window outside the keys, an empty layout row and
// a mask_mod that hides everything.
TYPED_TEST(AttentionTest, FullyMaskedRowsAreZeroWithLseMinusInfinity) {
  using T = TypeParam;
  auto rng = make_rng(5);
  const Matrix<T> q = random_matrix<T>(rng, 20, 4);
  const Matrix<T> k = random_matrix<T>(rng, 6, 4);
  const Matrix<T> v = random_matrix<T>(rng, 6, 3, 5.0, 9.0);  // no output can be 0 by chance
  const auto count_empty_rows = [&](const AttentionOptions& options, auto mask_mod) {
    Matrix<T> out = Matrix<T>::Constant(20, 3, std::numeric_limits<T>::quiet_NaN());
    std::vector<T> lse(20, std::numeric_limits<T>::quiet_NaN());
    blockattn::attention(q, k, v, out, options, lse, mask_mod);
    Index empty = 0;
    for (Index i = 0; i < 20; ++i) {
      EXPECT_FALSE(out.row(i).hasNaN()) << "row " << i;
      EXPECT_FALSE(std::isnan(lse[static_cast<std::size_t>(i)])) << "row " << i;
      if (lse[static_cast<std::size_t>(i)] == -kInf<T>) {
        EXPECT_TRUE(out.row(i).isZero(0)) << "row " << i;
        ++empty;
      } else {
        EXPECT_GE(out.row(i).minCoeff(), T(5)) << "row " << i;
      }
    }
    return empty;
  };
  const auto nothing = [](Index, Index, Index, Index) { return false; };
  const auto everything = [](Index, Index, Index, Index) { return true; };
  AttentionOptions causal;
  causal.causal = true;
  causal.query_chunk = 3;
  causal.key_chunk = 2;
  EXPECT_EQ(count_empty_rows(causal, everything), 14);  // query i sees keys j <= i − 14
  const Index zero = 0;
  AttentionOptions padded;
  padded.key_lengths = {&zero, 1};
  EXPECT_EQ(count_empty_rows(padded, everything), 20);
  AttentionOptions window;
  window.window_left = 0;
  window.window_right = 0;
  EXPECT_EQ(count_empty_rows(window, everything), 14);  // only the aligned key, if it exists
  BlockSparseLayout layout(1, 4, 2, 5, 3);
  layout.set(0, 0, 0);
  layout.set(0, 2, 1);
  AttentionOptions sparse;
  sparse.block_sparse = &layout;
  EXPECT_EQ(count_empty_rows(sparse, everything), 10);
  EXPECT_EQ(count_empty_rows(AttentionOptions{}, nothing), 20);
  // n_k = 0: every row is empty.
  Matrix<T> out(20, 3);
  std::vector<T> lse(20);
  blockattn::attention(q, Matrix<T>(0, 4), Matrix<T>(0, 3), out, {}, lse);
  EXPECT_TRUE(out.isZero(0));
  EXPECT_TRUE(std::all_of(lse.begin(), lse.end(), [](T x) { return x == -kInf<T>; }));
}

// Logits of size ~1e3 (far past exp's range) stay finite and match the reference.
TYPED_TEST(AttentionTest, HugeLogitsStayFiniteAndMatch) {
  using T = TypeParam;
  auto rng = make_rng(6);
  const Matrix<T> q = random_matrix<T>(rng, 33, 16, -8.0, 8.0);
  const Matrix<T> k = random_matrix<T>(rng, 41, 16, -8.0, 8.0);
  const Matrix<T> v = random_matrix<T>(rng, 41, 7);
  AttentionOptions options;
  options.scale = 2.0;  // |s| up to 2·16·64 ≈ 2e3
  options.query_chunk = 8;
  options.key_chunk = 8;
  for (const bool causal : {false, true}) {
    options.causal = causal;
    SCOPED_TRACE(std::string(causal ? "causal " : "full ") + seed_trace());
    Matrix<T> out(33, 7);
    blockattn::attention(q, k, v, out, options);
    EXPECT_TRUE(out.allFinite());
    expect_matches_reference(q, k, v, options);
  }
}

// Chunk sizes change rounding only: every pair of chunkings agrees within twice the tolerance.
TYPED_TEST(AttentionTest, ChunkSizesChangeRoundingOnly) {
  using T = TypeParam;
  auto rng = make_rng(7);
  const Index n = 97;
  const Matrix<T> q = random_matrix<T>(rng, n, 24);
  const Matrix<T> k = random_matrix<T>(rng, n, 24);
  const Matrix<T> v = random_matrix<T>(rng, n, 16);
  const auto tol = blockattn::test::attention_tolerance<T>(q, k, v, 1.0 / std::sqrt(24.0));
  for (const bool causal : {false, true}) {
    AttentionOptions options;
    options.causal = causal;
    Matrix<T> first(n, 16);
    blockattn::attention(q, k, v, first, options);
    for (const Index qc : {1, 3, 16, 96, 97, 98, 500}) {
      for (const Index kc : {1, 16, 97, 500}) {
        SCOPED_TRACE(describe({n, n, 24, 16, qc, kc}, causal ? "causal" : "full"));
        options.query_chunk = qc;
        options.key_chunk = kc;
        Matrix<T> out(n, 16);
        blockattn::attention(q, k, v, out, options);
        for (Index i = 0; i < n; ++i) {
          for (Index c = 0; c < 16; ++c) {
            ASSERT_NEAR(out(i, c), first(i, c), 2 * tol[static_cast<std::size_t>(i)]);
          }
        }
      }
    }
  }
}

// Any thread count gives bit-identical output and lse (each row is reduced in a fixed order).
TYPED_TEST(AttentionTest, ThreadCountDoesNotChangeOneBit) {
  using T = TypeParam;
  auto rng = make_rng(8);
  const Index batch = 2;
  const Index n = 150;
  const Index heads = 3;
  const Index d = 32;
  const Matrix<T> q = random_matrix<T>(rng, batch * n * heads, d);
  const Matrix<T> k = random_matrix<T>(rng, batch * n * heads, d);
  const Matrix<T> v = random_matrix<T>(rng, batch * n * heads, d);
  const auto run = [&](int threads) {
    AttentionOptions options;
    options.causal = true;
    options.threads = threads;
    options.query_chunk = 16;
    std::vector<T> out(static_cast<std::size_t>(batch * n * heads * d));
    std::vector<T> lse(static_cast<std::size_t>(batch * heads * n));
    blockattn::attention(blockattn::make_tensor_view(q.data(), batch, n, heads, d),
                         blockattn::make_tensor_view(k.data(), batch, n, heads, d),
                         blockattn::make_tensor_view(v.data(), batch, n, heads, d),
                         blockattn::make_tensor_view(out.data(), batch, n, heads, d), options, lse);
    out.insert(out.end(), lse.begin(), lse.end());
    return out;
  };
  const std::vector<T> one = run(1);
  for (const int threads : {2, 3, 7, 0}) {
    SCOPED_TRACE("threads=" + std::to_string(threads));
    const std::vector<T> many = run(threads);
    ASSERT_EQ(many.size(), one.size());
    for (std::size_t at = 0; at < one.size(); ++at) ASSERT_EQ(many[at], one[at]) << "at " << at;
  }
}

// Decode (a few query rows, many keys) takes the unpacked kernels and, past one key segment
// (8192 keys), the key split with its merge: checked against the long double reference with
// every interval mask (a window that starts in the second segment, key lengths that end inside
// the last one, a fully masked row), and bitwise equal for any thread count (the segments do not
// depend on it).
TYPED_TEST(AttentionTest, DecodeKeySplitMatchesReferenceAndIgnoresThreads) {
  using T = TypeParam;
  auto rng = make_rng(10);
  const Index n_k = 8192 * 2 + 777;
  for (const Index n_q : {Index{1}, Index{3}}) {
    for (const int mask : {0, 1, 2}) {
      SCOPED_TRACE("n_q=" + std::to_string(n_q) + " mask=" + std::to_string(mask) + " " +
                   seed_trace());
      const Matrix<T> q = random_matrix<T>(rng, n_q, 16);
      const Matrix<T> k = random_matrix<T>(rng, n_k, 16);
      const Matrix<T> v = random_matrix<T>(rng, n_k, 5);
      AttentionOptions options;
      options.causal = mask != 0;
      if (mask == 1) options.window_left = 9000;  // keys from ~7.9k on: segments 0 and 1 partial
      const Index length = n_k - 500;
      if (mask == 2) options.key_lengths = {&length, 1};
      expect_matches_reference_for_any_threads(q, k, v, options, {2});
    }
  }
  // A row that sees nothing in any segment: out 0, lse −inf, also through the merge.
  const Matrix<T> q = random_matrix<T>(rng, 1, 4);
  const Matrix<T> k = random_matrix<T>(rng, n_k, 4);
  const Matrix<T> v = random_matrix<T>(rng, n_k, 4);
  const Index none = 0;
  AttentionOptions options;
  options.key_lengths = {&none, 1};
  Matrix<T> out = Matrix<T>::Constant(1, 4, std::numeric_limits<T>::quiet_NaN());
  T lse = 0;
  blockattn::attention(q, k, v, out, options, {&lse, 1});
  EXPECT_TRUE(out.isZero(0));
  EXPECT_EQ(lse, -kInf<T>);
}

// Prefill with fewer than four query blocks splits its keys into segments merged like decode's,
// so that two threads have work: one head, one query block at the default chunks (768-row query
// blocks, 256-key chunks at d = 16 in float and double) and three at explicit small ones (the same
// split, a fifth of the long double reference's cost, which qemu-aarch64 runs in software), key
// counts that end inside a chunk, every interval mask (causal rows that see nothing of the later
// segments) — against the long double reference, and bitwise equal for any thread count (the
// split depends on the shape only).
TYPED_TEST(AttentionTest, ShortPrefillKeySplitMatchesReferenceAndIgnoresThreads) {
  using T = TypeParam;
  auto rng = make_rng(12);
  struct Case {
    Index n_q, n_k, query_chunk, key_chunk, window, length;
  };
  // Segments: 3 of 256 keys; 2 of 168 (7 chunks of 24). length ends inside the last segment but
  // one, and inside a chunk.
  for (const Case& c : {Case{300, 700, 0, 0, 300, 467}, Case{200, 301, 72, 24, 90, 151}}) {
    for (const int mask : {0, 1, 2, 3}) {
      SCOPED_TRACE("n_q=" + std::to_string(c.n_q) + " n_k=" + std::to_string(c.n_k) +
                   " mask=" + std::to_string(mask) + " " + seed_trace());
      const Matrix<T> q = random_matrix<T>(rng, c.n_q, 16);
      const Matrix<T> k = random_matrix<T>(rng, c.n_k, 16);
      const Matrix<T> v = random_matrix<T>(rng, c.n_k, 16);
      AttentionOptions options;
      options.query_chunk = c.query_chunk;
      options.key_chunk = c.key_chunk;
      options.causal = mask == 1 || mask == 2;
      if (mask == 2) options.window_left = c.window;  // each row sees some segments only
      if (mask == 3) options.key_lengths = {&c.length, 1};
      expect_matches_reference_for_any_threads(q, k, v, options, {2, 3});
    }
  }
}

// Decode over a long cache with several kv heads runs every kv head in one task, chunk by chunk
// (past one key segment): MHA and GQA, BSHD and BHSD, batch 2 with padding that ends in an early
// segment, n_q 1 and 2, and a head-dependent mask_mod — each head against the long double
// reference (attention_tolerance per head), and bitwise equal for 1 and 2 threads.
TYPED_TEST(AttentionTest, MultiHeadDecodeOverLongCacheMatchesReferenceAndIgnoresThreads) {
  using T = TypeParam;
  auto rng = make_rng(11);
  const Index batch = 2;
  const Index n_k = 8192 + 301;
  const Index d = 8;
  const Index d_v = 5;
  const Index key_lengths[batch] = {n_k, 1500};
  const auto mask = [](Index, Index h, Index, Index j) { return h != 1 || j % 2 == 0; };
  for (const auto& head_counts : std::vector<std::pair<Index, Index>>{{3, 3}, {4, 2}}) {
    // Plain locals, not a structured binding: the lambdas below capture them, which C++17 (and
    // so clang) does not allow for bindings.
    const Index heads = head_counts.first;
    const Index kv_heads = head_counts.second;
    for (const Index n_q : {Index{1}, Index{2}}) {
      for (const bool bhsd : {false, true}) {
        SCOPED_TRACE("heads=" + std::to_string(heads) + " kv_heads=" + std::to_string(kv_heads) +
                     " n_q=" + std::to_string(n_q) + (bhsd ? " BHSD " : " BSHD ") + seed_trace());
        const Matrix<T> q = random_matrix<T>(rng, batch * n_q * heads, d);
        const Matrix<T> k = random_matrix<T>(rng, batch * n_k * kv_heads, d);
        const Matrix<T> v = random_matrix<T>(rng, batch * n_k * kv_heads, d_v);
        const auto view = [&](auto* data, Index seq, Index h, Index dim) {
          return bhsd ? blockattn::make_tensor_view_bhsd(data, batch, seq, h, dim)
                      : blockattn::make_tensor_view(data, batch, seq, h, dim);
        };
        AttentionOptions options;
        options.key_lengths = key_lengths;
        options.causal = n_q > 1;
        const auto run = [&](int threads, std::vector<T>& out, std::vector<T>& lse) {
          out.assign(static_cast<std::size_t>(batch * n_q * heads * d_v), T(0));
          lse.assign(static_cast<std::size_t>(batch * heads * n_q), T(0));
          AttentionOptions o = options;
          o.threads = threads;
          blockattn::attention(view(q.data(), n_q, heads, d), view(k.data(), n_k, kv_heads, d),
                               view(v.data(), n_k, kv_heads, d_v),
                               view(out.data(), n_q, heads, d_v), o, lse, mask);
        };
        std::vector<T> out;
        std::vector<T> lse;
        run(1, out, lse);
        std::vector<T> out2;
        std::vector<T> lse2;
        run(2, out2, lse2);
        ASSERT_TRUE(out == out2);
        ASSERT_TRUE(lse == lse2);
        ASSERT_NO_FATAL_FAILURE(expect_heads_match_reference(view, q, k, v, batch, n_q, n_k, heads,
                                                             kv_heads, options, mask, out, lse,
                                                             [](Index) { return 0.0; }));
      }
    }
  }
}

// --- the plan of a forward call (detail/attention_plan.hpp), alone -------------------------------

using blockattn::detail::AttentionPlan;
using blockattn::detail::AttentionShapes;
using blockattn::detail::ForwardPath;
using blockattn::detail::plan_attention;

AttentionShapes make_shapes(Index batch, Index heads, Index kv_heads, Index n_q, Index n_k, Index d,
                            bool rows_interleave) {
  AttentionShapes x;
  x.batch = batch;
  x.heads = heads;
  x.kv_heads = kv_heads;
  x.n_q = n_q;
  x.n_k = n_k;
  x.d = x.d_v = d;
  x.k_rows_interleave = x.v_rows_interleave = rows_interleave;
  return x;
}

// Every field that the kernels read, for comparing two plans.
std::vector<Index> plan_fields(const AttentionPlan& p) {
  return {static_cast<Index>(p.path),
          p.pipelined,
          p.shape.query_chunk,
          p.shape.group,
          p.shape.key_chunk,
          p.task_heads,
          p.query_chunks,
          p.blocks,
          p.segment_keys,
          p.segments,
          p.tasks};
}

// Every (batch, query head, query) lies in exactly one block's rows, and the segments of a block
// cover every key exactly once, whatever the plan.
void expect_plan_covers_the_call(const AttentionShapes& x, const AttentionPlan& plan) {
  std::vector<int> seen(static_cast<std::size_t>(x.batch * x.heads * x.n_q), 0);
  for (Index block = 0; block < plan.blocks; ++block) {
    const auto t = plan.block_rows(block);
    EXPECT_EQ(t.group, plan.shape.group * plan.task_heads);
    EXPECT_EQ(t.h0 % (plan.shape.group * plan.task_heads), 0);  // whole kv heads per block
    for (Index g = 0; g < t.group; ++g) {
      for (Index i = t.q0; i < t.q0 + t.rows_per_head; ++i) {
        ++seen[static_cast<std::size_t>((t.b * x.heads + t.h0 + g) * x.n_q + i)];
      }
    }
  }
  EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }));
  Index next = 0;
  for (Index segment = 0; segment < plan.segments; ++segment) {
    const auto keys = plan.task_keys(segment, {0, x.n_k});
    EXPECT_EQ(keys.begin, next);
    EXPECT_EQ(keys.begin % plan.shape.key_chunk, 0);
    next = std::max(keys.begin, keys.end);
  }
  EXPECT_EQ(next, x.n_k);
}

// Decode splits the keys into segments of fixed size: kDecodeSegmentKeys keys per task over one
// kv head ([heads, seq, dim]: pipelined when at most four rows per kv head), kDecodeSegmentKeys /
// kv_heads over interleaved heads ([seq, heads, dim]: one task reads every kv head), and MQA's
// eight stacked rows are too many to pipeline. No field depends on options.threads.
TEST(AttentionPlanTest, DecodeSplitsKeysIntoFixedSegmentsIndependentOfThreads) {
  constexpr Index kSegment = blockattn::detail::kDecodeSegmentKeys;
  const Index n_k = 262144;
  AttentionOptions options;
  const auto contiguous = plan_attention<float>(make_shapes(1, 8, 8, 1, n_k, 64, false), options);
  EXPECT_EQ(contiguous.path, ForwardPath::Decode);
  EXPECT_TRUE(contiguous.pipelined);
  EXPECT_EQ(contiguous.task_heads, 1);
  EXPECT_EQ(contiguous.segment_keys, kSegment);
  EXPECT_EQ(contiguous.segments, n_k / kSegment);
  EXPECT_EQ(contiguous.tasks, 8 * n_k / kSegment);

  const auto interleaved = plan_attention<float>(make_shapes(1, 8, 8, 1, n_k, 64, true), options);
  EXPECT_EQ(interleaved.path, ForwardPath::DecodeInterleaved);
  EXPECT_FALSE(interleaved.pipelined);
  EXPECT_EQ(interleaved.task_heads, 8);
  EXPECT_EQ(interleaved.blocks, 1);
  EXPECT_EQ(interleaved.segment_keys, kSegment / 8);
  EXPECT_EQ(interleaved.tasks, n_k / (kSegment / 8));

  const auto mqa = plan_attention<float>(make_shapes(1, 8, 1, 1, n_k, 128, false), options);
  EXPECT_EQ(mqa.path, ForwardPath::Decode);
  EXPECT_FALSE(mqa.pipelined);  // 8 rows on one kv head: compute-bound, see kDecodePipelineRows
  EXPECT_EQ(mqa.shape.group, 8);
  EXPECT_EQ(mqa.blocks, 1);
  EXPECT_EQ(mqa.tasks, n_k / kSegment);

  // A short cache keeps one task per kv head even over interleaved rows.
  EXPECT_EQ(plan_attention<float>(make_shapes(1, 8, 8, 1, kSegment, 64, true), options).path,
            ForwardPath::Decode);

  for (const auto& x :
       {make_shapes(1, 8, 8, 1, n_k, 64, false), make_shapes(1, 8, 8, 1, n_k, 64, true),
        make_shapes(2, 8, 2, 3, 9000, 64, true), make_shapes(1, 1, 1, 512, 512, 64, false)}) {
    const auto reference = plan_fields(plan_attention<double>(x, options));
    for (const int threads : {1, 2, 3, 64}) {
      AttentionOptions o = options;
      o.threads = threads;
      EXPECT_EQ(plan_fields(plan_attention<double>(x, o)), reference) << threads << " threads";
    }
    expect_plan_covers_the_call(x, plan_attention<double>(x, options));
  }
}

// Prefill with fewer than kMinPrefillBlocks query blocks splits its keys so that the call has at
// least that many tasks when it has enough key chunks (n = 512 at d = 64: two 256-key chunks, two
// tasks); with enough query blocks the keys stay whole.
TEST(AttentionPlanTest, ShortPrefillSplitsKeysIntoEnoughTasks) {
  constexpr Index kMin = blockattn::detail::kMinPrefillBlocks;
  const AttentionOptions options;
  for (const Index n : {Index{512}, Index{1000}, Index{2048}, Index{2304}}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    const auto x = make_shapes(1, 1, 1, n, n, 64, false);
    const auto plan = plan_attention<float>(x, options);
    EXPECT_EQ(plan.path, ForwardPath::Prefill);
    const Index key_chunks = (n + plan.shape.key_chunk - 1) / plan.shape.key_chunk;
    EXPECT_GE(plan.tasks, std::min(kMin, key_chunks));
    EXPECT_GT(plan.segments, 1);
    expect_plan_covers_the_call(x, plan);
  }
  const auto many = plan_attention<float>(make_shapes(1, 8, 8, 4096, 4096, 64, false), options);
  EXPECT_EQ(many.segments, 1);
  EXPECT_EQ(many.tasks, many.blocks);
  EXPECT_EQ(many.blocks, 8 * many.query_chunks);
}

// GQA: a block stacks the query heads of one kv head (query_chunk shrinks so the rows still fit
// the default block), and decode vs prefill is decided on the stacked rows (kDirectRows = 8).
TEST(AttentionPlanTest, GqaStacksTheGroupsHeadsIntoOneBlock) {
  const AttentionOptions options;
  const auto x = make_shapes(2, 8, 2, 1000, 1000, 64, false);
  const auto plan = plan_attention<float>(x, options);
  EXPECT_EQ(plan.path, ForwardPath::Prefill);
  EXPECT_EQ(plan.shape.group, 4);
  EXPECT_EQ(plan.shape.query_chunk, 768 / 4);
  EXPECT_EQ(plan.blocks, 2 * 2 * plan.query_chunks);
  const auto last = plan.block_rows(plan.blocks - 1);
  EXPECT_EQ(last.b, 1);
  EXPECT_EQ(last.h0, 4);
  EXPECT_EQ(last.q0 + last.rows_per_head, 1000);
  expect_plan_covers_the_call(x, plan);
  EXPECT_EQ(plan_attention<float>(make_shapes(1, 4, 1, 2, 5000, 64, false), options).path,
            ForwardPath::Decode);  // 4 heads × 2 queries = 8 rows
  EXPECT_EQ(plan_attention<float>(make_shapes(1, 4, 1, 3, 5000, 64, false), options).path,
            ForwardPath::Prefill);  // 12 rows
  // Nothing to compute: no tasks.
  EXPECT_EQ(plan_attention<float>(make_shapes(0, 4, 1, 3, 50, 64, false), options).tasks, 0);
  EXPECT_EQ(plan_attention<float>(make_shapes(1, 4, 1, 0, 50, 64, false), options).tasks, 0);
}

// Several user threads calling attention() at once get the same answers as one at a time.
TYPED_TEST(AttentionTest, ConcurrentCallsAreIndependent) {
  using T = TypeParam;
  auto rng = make_rng(9);
  const Matrix<T> q = random_matrix<T>(rng, 70, 16);
  const Matrix<T> k = random_matrix<T>(rng, 90, 16);
  const Matrix<T> v = random_matrix<T>(rng, 90, 16);
  AttentionOptions options;
  options.causal = true;
  options.threads = 2;
  Matrix<T> expected(70, 16);
  blockattn::attention(q, k, v, expected, options);
  std::vector<Matrix<T>> outs(4, Matrix<T>(70, 16));
  std::vector<std::thread> callers;
  for (auto& out : outs) {
    callers.emplace_back([&] { blockattn::attention(q, k, v, out, options); });
  }
  for (auto& caller : callers) caller.join();
  for (const auto& out : outs) EXPECT_EQ(out, expected);
}

// Permuting the keys (and the values alike) permutes nothing in the output.
TYPED_TEST(AttentionTest, KeyPermutationDoesNotChangeTheResult) {
  using T = TypeParam;
  auto rng = make_rng(10);
  const Index n_k = 83;
  const Matrix<T> q = random_matrix<T>(rng, 40, 12);
  const Matrix<T> k = random_matrix<T>(rng, n_k, 12);
  const Matrix<T> v = random_matrix<T>(rng, n_k, 9);
  std::vector<Index> order(static_cast<std::size_t>(n_k));
  std::iota(order.begin(), order.end(), Index{0});
  std::shuffle(order.begin(), order.end(), rng);
  Matrix<T> k_perm(n_k, 12);
  Matrix<T> v_perm(n_k, 9);
  for (Index j = 0; j < n_k; ++j) {
    k_perm.row(j) = k.row(order[static_cast<std::size_t>(j)]);
    v_perm.row(j) = v.row(order[static_cast<std::size_t>(j)]);
  }
  AttentionOptions options;
  options.query_chunk = 7;
  options.key_chunk = 10;
  Matrix<T> out(40, 9);
  Matrix<T> out_perm(40, 9);
  blockattn::attention(q, k, v, out, options);
  blockattn::attention(q, k_perm, v_perm, out_perm, options);
  const auto tol = blockattn::test::attention_tolerance<T>(q, k, v, 1.0 / std::sqrt(12.0));
  for (Index i = 0; i < 40; ++i) {
    for (Index c = 0; c < 9; ++c) {
      ASSERT_NEAR(out(i, c), out_perm(i, c), 2 * tol[static_cast<std::size_t>(i)]);
    }
  }
}

// Each output entry is a convex combination of its column of v: inside [min v, max v].
TYPED_TEST(AttentionTest, OutputsLieInsideEachColumnsRange) {
  using T = TypeParam;
  auto rng = make_rng(11);
  const Matrix<T> q = random_matrix<T>(rng, 60, 8, -3.0, 3.0);
  const Matrix<T> k = random_matrix<T>(rng, 75, 8, -3.0, 3.0);
  const Matrix<T> v = random_matrix<T>(rng, 75, 10, -4.0, 2.0);
  for (const bool causal : {false, true}) {
    AttentionOptions options;
    options.causal = causal;
    Matrix<T> out(60, 10);
    blockattn::attention(q, k, v, out, options);
    // Rounding can step outside by the tolerance at most; with u-scale errors and values that are
    // multiples of 1/64, an extra 2·n_k·u·max|v| is ample.
    const T slack = T(2 * 75) * blockattn::test::unit_roundoff<T>() * T(4);
    for (Index c = 0; c < 10; ++c) {
      EXPECT_GE(out.col(c).minCoeff(), v.col(c).minCoeff() - slack) << "column " << c;
      EXPECT_LE(out.col(c).maxCoeff(), v.col(c).maxCoeff() + slack) << "column " << c;
    }
  }
}

// Split the keys at random points, attend to each part, merge: the whole, within tolerance. Also:
// merging with an empty part (lse −inf) is the identity, and merge works in place.
TYPED_TEST(AttentionTest, MergeOfRandomKeySplitsEqualsTheWhole) {
  using T = TypeParam;
  auto rng = make_rng(12);
  const Index n_q = 31;
  const Index n_k = 77;
  const Matrix<T> q = random_matrix<T>(rng, n_q, 16);
  const Matrix<T> k = random_matrix<T>(rng, n_k, 16);
  const Matrix<T> v = random_matrix<T>(rng, n_k, 8);
  const auto tol = blockattn::test::attention_tolerance<T>(q, k, v, 0.25);
  const auto lse_tol = blockattn::test::lse_tolerance<T>(q, k, 0.25);
  AttentionOptions options;
  Matrix<T> whole(n_q, 8);
  std::vector<T> whole_lse(n_q);
  blockattn::attention(q, k, v, whole, options, whole_lse);
  std::uniform_int_distribution<Index> split_at(0, n_k);
  for (int trial = 0; trial < 8; ++trial) {
    const Index split = trial == 0 ? 0 : split_at(rng);
    SCOPED_TRACE("split=" + std::to_string(split) + " " + seed_trace());
    Matrix<T> a(n_q, 8);
    Matrix<T> b(n_q, 8);
    std::vector<T> lse_a(n_q);
    std::vector<T> lse_b(n_q);
    blockattn::attention(q, k.topRows(split), v.topRows(split), a, options, lse_a);
    blockattn::attention(q, k.bottomRows(n_k - split), v.bottomRows(n_k - split), b, options,
                         lse_b);
    Matrix<T> merged(n_q, 8);
    std::vector<T> merged_lse(n_q);
    blockattn::merge_attention_states(a, lse_a, b, lse_b, merged, merged_lse);
    for (Index i = 0; i < n_q; ++i) {
      const auto row = static_cast<std::size_t>(i);
      for (Index c = 0; c < 8; ++c) ASSERT_NEAR(merged(i, c), whole(i, c), 3 * tol[row]);
      ASSERT_NEAR(merged_lse[row], whole_lse[row], 3 * lse_tol[row]);
    }
    // In place: out is out_a, lse is lse_a.
    blockattn::merge_attention_states(a, lse_a, b, lse_b, a, lse_a);
    EXPECT_EQ(a, merged);
    EXPECT_EQ(lse_a, merged_lse);
  }
  // The empty state (lse −inf, out arbitrary) is the identity, on either side.
  Matrix<T> junk = Matrix<T>::Constant(n_q, 8, std::numeric_limits<T>::quiet_NaN());
  std::vector<T> empty_lse(n_q, -kInf<T>);
  Matrix<T> merged(n_q, 8);
  std::vector<T> merged_lse(n_q);
  blockattn::merge_attention_states(whole, whole_lse, junk, empty_lse, merged, merged_lse);
  EXPECT_EQ(merged, whole);
  EXPECT_EQ(merged_lse, whole_lse);
  blockattn::merge_attention_states(junk, empty_lse, whole, whole_lse, merged, merged_lse);
  EXPECT_EQ(merged, whole);
  blockattn::merge_attention_states(junk, empty_lse, junk, empty_lse, merged, merged_lse);
  EXPECT_TRUE(merged.isZero(0));
  EXPECT_EQ(merged_lse, empty_lse);
}

// The N-way merge: the keys split into five segments (one of them empty), each attended with its
// lse, merged in one call — the whole within tolerance; grouped as (0 1) (2 3 4) and merged again
// — the same up to rounding (associativity); bitwise the same for 1 and 2 threads; an extra empty
// part (lse −inf, out NaN junk) changes no bit; N = 1 is a copy; a NaN lse poisons its row only;
// a part of the wrong shape throws naming it.
TYPED_TEST(AttentionTest, MergeOfManyPartsIsAssociativeAndIgnoresThreads) {
  using T = TypeParam;
  using State = blockattn::AttentionState<T>;
  auto rng = make_rng(15);
  const Index n_q = 23;
  const Index n_k = 90;
  const Matrix<T> q = random_matrix<T>(rng, n_q, 8);
  const Matrix<T> k = random_matrix<T>(rng, n_k, 8);
  const Matrix<T> v = random_matrix<T>(rng, n_k, 5);
  const auto tol = blockattn::test::attention_tolerance<T>(q, k, v, 0.25);
  const auto lse_tol = blockattn::test::lse_tolerance<T>(q, k, 0.25);
  Matrix<T> whole(n_q, 5);
  std::vector<T> whole_lse(n_q);
  blockattn::attention(q, k, v, whole, {}, whole_lse);
  const std::vector<Index> cuts = {0, 17, 17, 40, 71, n_k};  // segment 1 is empty
  std::vector<Matrix<T>> outs;
  std::vector<std::vector<T>> lses;
  for (std::size_t s = 0; s + 1 < cuts.size(); ++s) {
    const Index n = cuts[s + 1] - cuts[s];
    outs.emplace_back(n_q, 5);
    lses.emplace_back(static_cast<std::size_t>(n_q));
    blockattn::attention(q, k.middleRows(cuts[s], n), v.middleRows(cuts[s], n), outs.back(), {},
                         lses.back());
  }
  const auto parts_of = [&](std::initializer_list<std::size_t> which) {
    std::vector<State> parts;
    for (const std::size_t s : which) parts.push_back(State{outs[s], lses[s]});
    return parts;
  };
  Matrix<T> merged(n_q, 5);
  std::vector<T> merged_lse(n_q);
  blockattn::merge_attention_states(parts_of({0, 1, 2, 3, 4}), merged, merged_lse, 1);
  for (Index i = 0; i < n_q; ++i) {
    const auto row = static_cast<std::size_t>(i);
    for (Index c = 0; c < 5; ++c) ASSERT_NEAR(merged(i, c), whole(i, c), 3 * tol[row]);
    ASSERT_NEAR(merged_lse[row], whole_lse[row], 3 * lse_tol[row]);
  }
  // Associativity: ((0 1) (2 3 4)) against (0 1 2 3 4), a few rounding steps apart.
  Matrix<T> left(n_q, 5);
  Matrix<T> right(n_q, 5);
  std::vector<T> left_lse(n_q);
  std::vector<T> right_lse(n_q);
  blockattn::merge_attention_states(parts_of({0, 1}), left, left_lse);
  blockattn::merge_attention_states(parts_of({2, 3, 4}), right, right_lse);
  Matrix<T> grouped(n_q, 5);
  std::vector<T> grouped_lse(n_q);
  blockattn::merge_attention_states(left, left_lse, right, right_lse, grouped, grouped_lse);
  for (Index i = 0; i < n_q; ++i) {
    const auto row = static_cast<std::size_t>(i);
    for (Index c = 0; c < 5; ++c) ASSERT_NEAR(grouped(i, c), merged(i, c), tol[row]);
    ASSERT_NEAR(grouped_lse[row], merged_lse[row], lse_tol[row]);
  }
  // Threads: rows are independent, so the bits do not depend on the count.
  Matrix<T> threaded(n_q, 5);
  std::vector<T> threaded_lse(n_q);
  blockattn::merge_attention_states(parts_of({0, 1, 2, 3, 4}), threaded, threaded_lse, 2);
  EXPECT_EQ(threaded, merged);
  EXPECT_EQ(threaded_lse, merged_lse);
  // An empty part anywhere is the identity, whatever its out holds.
  const Matrix<T> junk = Matrix<T>::Constant(n_q, 5, std::numeric_limits<T>::quiet_NaN());
  const std::vector<T> empty_lse(n_q, -kInf<T>);
  std::vector<State> with_empty = parts_of({0});  // (AttentionState holds Refs: append only)
  with_empty.push_back(State{junk, empty_lse});
  for (const State& part : parts_of({1, 2, 3, 4})) with_empty.push_back(part);
  blockattn::merge_attention_states(with_empty, threaded, threaded_lse);
  EXPECT_EQ(threaded, merged);
  EXPECT_EQ(threaded_lse, merged_lse);
  // N = 1: the part itself.
  blockattn::merge_attention_states(parts_of({3}), threaded, threaded_lse);
  EXPECT_EQ(threaded, outs[3]);
  EXPECT_EQ(threaded_lse, lses[3]);
  // A NaN lse makes its row NaN (out and lse) and leaves the others alone.
  lses[2][4] = std::numeric_limits<T>::quiet_NaN();
  blockattn::merge_attention_states(parts_of({0, 1, 2, 3, 4}), threaded, threaded_lse);
  EXPECT_TRUE(threaded.row(4).array().isNaN().all());
  EXPECT_TRUE(std::isnan(threaded_lse[4]));
  for (const Index i : {Index(0), Index(3), Index(5), n_q - 1}) {
    EXPECT_EQ(threaded.row(i), merged.row(i)) << "row " << i;
  }
  // Shapes are checked part by part.
  const Matrix<T> short_out(n_q - 1, 5);
  std::vector<State> bad = parts_of({0, 1});
  bad.push_back(State{short_out, lses[2]});
  EXPECT_THAT([&] { blockattn::merge_attention_states(bad, threaded); },
              ThrowsMessage<std::invalid_argument>(
                  HasSubstr("parts[2].out.rows() is 22 but parts[0].out.rows() is 23")));
  EXPECT_THAT([&] { blockattn::merge_attention_states(std::vector<State>{}, threaded); },
              ThrowsMessage<std::invalid_argument>(HasSubstr("parts is empty")));
}

// The multi-head merge: three key segments of a GQA problem (batch 2, 4 query heads over 2 kv
// heads), merged per (batch, head) and row — the whole within tolerance, bitwise the same for 1
// and 2 threads, and in place into the first part.
TYPED_TEST(AttentionTest, TensorMergeOfKeySegmentsEqualsTheWhole) {
  using T = TypeParam;
  using State = blockattn::TensorAttentionState<T>;
  auto rng = make_rng(16);
  const Index batch = 2, heads = 4, kv_heads = 2, n_q = 9, n_k = 50, d = 8, d_v = 6;
  const Matrix<T> q = random_matrix<T>(rng, batch * n_q * heads, d);
  const Matrix<T> k = random_matrix<T>(rng, batch * n_k * kv_heads, d);
  const Matrix<T> v = random_matrix<T>(rng, batch * n_k * kv_heads, d_v);
  const auto kv_segment = [&](const Matrix<T>& x, Index first, Index count, Index dim) {
    TensorView<const T> t = blockattn::make_tensor_view(x.data(), batch, n_k, kv_heads, dim);
    t.data = t.at(0, first, 0);
    t.seq = count;
    return t;
  };
  const auto q_view = blockattn::make_tensor_view(q.data(), batch, n_q, heads, d);
  const auto count = static_cast<std::size_t>(batch * heads * n_q);
  Matrix<T> whole(batch * n_q * heads, d_v);
  std::vector<T> whole_lse(count);
  blockattn::attention(q_view, kv_segment(k, 0, n_k, d), kv_segment(v, 0, n_k, d_v),
                       blockattn::make_tensor_view(whole.data(), batch, n_q, heads, d_v), {},
                       whole_lse);
  const std::vector<Index> cuts = {0, 13, 31, n_k};
  std::vector<Matrix<T>> outs;
  std::vector<std::vector<T>> lses;
  std::vector<State> parts;
  for (std::size_t s = 0; s + 1 < cuts.size(); ++s) {
    outs.emplace_back(batch * n_q * heads, d_v);
    lses.emplace_back(count);
  }
  for (std::size_t s = 0; s + 1 < cuts.size(); ++s) {
    const Index n = cuts[s + 1] - cuts[s];
    const auto out = blockattn::make_tensor_view(outs[s].data(), batch, n_q, heads, d_v);
    blockattn::attention(q_view, kv_segment(k, cuts[s], n, d), kv_segment(v, cuts[s], n, d_v), out,
                         {}, lses[s]);
    parts.push_back(State{out, lses[s]});
  }
  Matrix<T> merged(batch * n_q * heads, d_v);
  std::vector<T> merged_lse(count);
  const auto merged_view = blockattn::make_tensor_view(merged.data(), batch, n_q, heads, d_v);
  blockattn::merge_attention_states(parts, merged_view, merged_lse, 1);
  double worst = 0;
  double worst_lse = 0;
  for (Index r = 0; r < merged.rows(); ++r) {
    worst =
        std::max(worst, static_cast<double>((merged.row(r) - whole.row(r)).cwiseAbs().maxCoeff()));
  }
  for (std::size_t i = 0; i < count; ++i) {
    worst_lse = std::max(worst_lse, std::abs(static_cast<double>(merged_lse[i] - whole_lse[i])));
  }
  // Inputs in [-1, 1], d = 8: per-row tolerances of the single-head test are ~1e3·eps here.
  const double eps = static_cast<double>(std::numeric_limits<T>::epsilon());
  EXPECT_LT(worst, 1e3 * eps);
  EXPECT_LT(worst_lse, 1e3 * eps);
  Matrix<T> threaded(batch * n_q * heads, d_v);
  std::vector<T> threaded_lse(count);
  blockattn::merge_attention_states(
      parts, blockattn::make_tensor_view(threaded.data(), batch, n_q, heads, d_v), threaded_lse, 2);
  EXPECT_EQ(threaded, merged);
  EXPECT_EQ(threaded_lse, merged_lse);
  // In place into part 0 (out and lse): the same bits.
  blockattn::merge_attention_states(
      parts, blockattn::make_tensor_view(outs[0].data(), batch, n_q, heads, d_v), lses[0]);
  EXPECT_EQ(outs[0], merged);
  EXPECT_EQ(lses[0], merged_lse);
}

// FlashInfer keeps log2 Σ exp(s); the helpers convert both ways, leaving −inf and NaN alone.
TEST(LseBase2Test, ConvertsBothWays) {
  EXPECT_DOUBLE_EQ(blockattn::lse_to_base2(std::log(8.0)), 3.0);
  EXPECT_DOUBLE_EQ(blockattn::lse_from_base2(3.0), std::log(8.0));
  EXPECT_EQ(blockattn::lse_to_base2(-kInf<float>), -kInf<float>);
  EXPECT_TRUE(std::isnan(blockattn::lse_from_base2(std::numeric_limits<float>::quiet_NaN())));
  std::vector<float> lse = {0.0F, 1.0F, -kInf<float>};
  blockattn::lse_to_base2(blockattn::Span<float>(lse));
  blockattn::lse_from_base2(blockattn::Span<float>(lse));
  EXPECT_NEAR(lse[1], 1.0F, 1e-6F);
  EXPECT_EQ(lse[2], -kInf<float>);
}

// Plain Matrix arguments compile without spelling T, as do head slices (middleCols of a packed
// [n, H·d] buffer); both forms give the same bits.
TYPED_TEST(AttentionTest, BothCallFormsAndHeadSlicesAgree) {
  using T = TypeParam;
  auto rng = make_rng(13);
  const Matrix<T> qkv = random_matrix<T>(rng, 40, 3 * 16);
  Matrix<T> out(40, 16);
  Matrix<T> out_explicit(40, 16);
  std::vector<T> lse(40);
  blockattn::attention(qkv.middleCols(0, 16), qkv.middleCols(16, 16), qkv.middleCols(32, 16), out);
  blockattn::attention(qkv.middleCols(0, 16), qkv.middleCols(16, 16), qkv.middleCols(32, 16),
                       out_explicit, {}, lse);
  EXPECT_EQ(out, out_explicit);
  // The same heads as strided TensorViews into the packed buffer: same kernel, same bits.
  const T* base = qkv.data();
  Matrix<T> tensor_out(40, 16);
  blockattn::attention(TensorView<const T>(base, 1, 40, 1, 16, 0, 48, 0),
                       TensorView<const T>(base + 16, 1, 40, 1, 16, 0, 48, 0),
                       TensorView<const T>(base + 32, 1, 40, 1, 16, 0, 48, 0),
                       blockattn::make_tensor_view(tensor_out.data(), 1, 40, 1, 16));
  EXPECT_EQ(tensor_out, out);
  // The reference and the functor overload in the plain form compile and agree.
  Matrix<T> ref(40, 16);
  blockattn::reference::attention(qkv.middleCols(0, 16), qkv.middleCols(16, 16),
                                  qkv.middleCols(32, 16), ref);
  const auto tol = blockattn::test::attention_tolerance<T>(
      qkv.middleCols(0, 16), qkv.middleCols(16, 16), qkv.middleCols(32, 16), 0.25);
  for (Index i = 0; i < 40; ++i) {
    for (Index c = 0; c < 16; ++c)
      ASSERT_NEAR(ref(i, c), out(i, c), tol[static_cast<std::size_t>(i)]);
  }
  // A mask_mod that shows everything: per pair it costs rounding only (the exact-masking path);
  // classified as Full it takes the very same path as no mask, bit for bit.
  const auto everything = [](Index, Index, Index, Index) { return true; };
  const auto full = [](Index, Index, Index, Index, Index, Index) { return BlockVisibility::Full; };
  Matrix<T> masked(40, 16);
  blockattn::attention(qkv.middleCols(0, 16), qkv.middleCols(16, 16), qkv.middleCols(32, 16),
                       masked, {}, {}, everything);
  for (Index i = 0; i < 40; ++i) {
    for (Index c = 0; c < 16; ++c) {
      ASSERT_NEAR(masked(i, c), out(i, c), 2 * tol[static_cast<std::size_t>(i)]);
    }
  }
  blockattn::attention(qkv.middleCols(0, 16), qkv.middleCols(16, 16), qkv.middleCols(32, 16),
                       masked, {}, {}, blockattn::classified_mask_mod(everything, full));
  EXPECT_EQ(masked, out);
}

// ---- errors: every bad argument is named with its sizes, and nothing is written -------------

template <class T>
class AttentionErrorTest : public ::testing::Test {};
TYPED_TEST_SUITE(AttentionErrorTest, blockattn::test::Scalars, );

TYPED_TEST(AttentionErrorTest, BadArgumentsThrowNamingSizesAndWriteNothing) {
  using T = TypeParam;
  auto rng = make_rng(14);
  const Matrix<T> q = random_matrix<T>(rng, 10, 64);
  const Matrix<T> k = random_matrix<T>(rng, 12, 64);
  const Matrix<T> v = random_matrix<T>(rng, 12, 8);
  const Matrix<T> k_bad = random_matrix<T>(rng, 12, 63);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  Matrix<T> out = Matrix<T>::Constant(10, 8, nan);
  std::vector<T> lse(10, nan);
  const auto untouched = [&] {
    EXPECT_TRUE(out.array().isNaN().all());
    EXPECT_TRUE(std::all_of(lse.begin(), lse.end(), [](T x) { return std::isnan(x); }));
  };
  const auto throws = [&](auto&& call, std::vector<std::string> parts) {
    try {
      call();
      ADD_FAILURE() << "no exception; expected one mentioning " << parts.front();
    } catch (const std::invalid_argument& e) {
      const std::string message = e.what();
      EXPECT_THAT(message, HasSubstr("blockattn::attention: "));
      for (const auto& part : parts) EXPECT_THAT(message, HasSubstr(part)) << message;
    }
    untouched();
  };
  throws([&] { blockattn::attention(q, k_bad, v, out, {}, lse); },
         {"k.cols() is 63 but q.cols() is 64 (head dimensions must match)"});
  throws([&] { blockattn::attention(q, k, v.topRows(11), out, {}, lse); },
         {"v.rows() is 11 but k.rows() is 12"});
  Matrix<T> out_short = Matrix<T>::Constant(9, 8, nan);
  throws([&] { blockattn::attention(q, k, v, out_short, {}, lse); },
         {"out.rows() is 9 but q.rows() is 10"});
  Matrix<T> out_narrow = Matrix<T>::Constant(10, 7, nan);
  throws([&] { blockattn::attention(q, k, v, out_narrow, {}, lse); },
         {"out.cols() is 7 but v.cols() is 8"});
  AttentionOptions bad;
  bad.query_chunk = -1;
  throws([&] { blockattn::attention(q, k, v, out, bad, lse); }, {"options.query_chunk is -1"});
  bad = {};
  bad.key_chunk = -3;
  throws([&] { blockattn::attention(q, k, v, out, bad, lse); }, {"options.key_chunk is -3"});
  bad = {};
  bad.window_left = -2;
  throws([&] { blockattn::attention(q, k, v, out, bad, lse); }, {"options.window_left is -2"});
  bad = {};
  bad.window_right = -5;
  throws([&] { blockattn::attention(q, k, v, out, bad, lse); }, {"options.window_right is -5"});
  bad = {};
  bad.threads = -1;
  throws([&] { blockattn::attention(q, k, v, out, bad, lse); }, {"options.threads is -1"});
  bad = {};
  bad.softcap = -1;
  throws([&] { blockattn::attention(q, k, v, out, bad, lse); }, {"options.softcap is -1"});
  const Index too_long = 13;
  bad = {};
  bad.key_lengths = {&too_long, 1};
  throws([&] { blockattn::attention(q, k, v, out, bad, lse); },
         {"options.key_lengths[0] is 13", "[0, 12]"});
  const BlockSparseLayout small(1, 1, 2, 8, 8);
  bad = {};
  bad.block_sparse = &small;
  throws([&] { blockattn::attention(q, k, v, out, bad, lse); }, {"covers 8 queries but n_q is 10"});
  // out aliasing an input; lse aliasing out.
  Matrix<T> qv = random_matrix<T>(rng, 10, 64 + 8);
  throws([&] { blockattn::attention(qv.leftCols(64), k, v, qv.rightCols(8), {}, lse); },
         {"out overlaps the memory of q"});
  Matrix<T> kv = random_matrix<T>(rng, 12, 64);
  throws(
      [&] {
        blockattn::attention(q, kv, v, out, {}, {kv.data(), 10});
      },
      {"lse overlaps the memory of k"});

  // TensorView: heads that do not divide, shape mismatches.
  std::vector<T> q4(static_cast<std::size_t>(2 * 10 * 3 * 64));
  std::vector<T> k4(static_cast<std::size_t>(2 * 12 * 2 * 64));
  std::vector<T> v4(static_cast<std::size_t>(2 * 12 * 2 * 8));
  std::vector<T> out4(static_cast<std::size_t>(2 * 10 * 3 * 8), nan);
  const auto tensor_throws = [&](auto&& call, const std::string& part) {
    EXPECT_THAT(call, ThrowsMessage<std::invalid_argument>(
                          AllOf(HasSubstr("blockattn::attention: "), HasSubstr(part))));
    EXPECT_TRUE(std::all_of(out4.begin(), out4.end(), [](T x) { return std::isnan(x); }));
  };
  tensor_throws(
      [&] {
        blockattn::attention(blockattn::make_tensor_view(q4.data(), 2, 10, 3, 64),
                             blockattn::make_tensor_view(k4.data(), 2, 12, 2, 64),
                             blockattn::make_tensor_view(v4.data(), 2, 12, 2, 8),
                             blockattn::make_tensor_view(out4.data(), 2, 10, 3, 8));
      },
      "q.heads is 3 but k.heads is 2");
  tensor_throws(
      [&] {
        blockattn::attention(blockattn::make_tensor_view(q4.data(), 2, 10, 2, 64),
                             blockattn::make_tensor_view(k4.data(), 2, 12, 2, 64),
                             blockattn::make_tensor_view(v4.data(), 1, 12, 2, 8),
                             blockattn::make_tensor_view(out4.data(), 2, 10, 2, 8));
      },
      "v.batch is 1 but q.batch is 2");
  tensor_throws(
      [&] {
        blockattn::attention(blockattn::make_tensor_view(q4.data(), 2, 10, 2, 64),
                             blockattn::make_tensor_view(k4.data(), 2, 12, 2, 64),
                             blockattn::make_tensor_view(v4.data(), 2, 11, 2, 8),
                             blockattn::make_tensor_view(out4.data(), 2, 10, 2, 8));
      },
      "v.seq is 11 but k.seq is 12");
  const Index lengths[2] = {12, -1};
  AttentionOptions padded;
  padded.key_lengths = lengths;
  tensor_throws(
      [&] {
        blockattn::attention(blockattn::make_tensor_view(q4.data(), 2, 10, 2, 64),
                             blockattn::make_tensor_view(k4.data(), 2, 12, 2, 64),
                             blockattn::make_tensor_view(v4.data(), 2, 12, 2, 8),
                             blockattn::make_tensor_view(out4.data(), 2, 10, 2, 8), padded);
      },
      "options.key_lengths[1] is -1");

  // merge_attention_states: sizes and missing lse.
  Matrix<T> a(10, 8);
  Matrix<T> b(9, 8);
  EXPECT_THAT([&] { blockattn::merge_attention_states(a, lse, b, lse, out); },
              ThrowsMessage<std::invalid_argument>(
                  AllOf(HasSubstr("blockattn::merge_attention_states: parts[1].out.rows() is 9 but "
                                  "parts[0].out.rows() is 10"))));
  EXPECT_THAT([&] { blockattn::merge_attention_states(a, {}, a, lse, out); },
              ThrowsMessage<std::invalid_argument>(
                  HasSubstr("parts[0].lse is empty but parts[0].out.rows() is 10")));
  untouched();
}

}  // namespace

}  // namespace attention_test
