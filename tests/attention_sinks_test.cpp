// Attention sinks (options.sinks: one logit per query head that joins the softmax denominator only;
// the definition is at the top of mask.hpp). Oracles:
//   1. blockattn::reference in long double, which adds the sink to its own naive denominator,
//      within the float path's tolerance (support/tolerance.hpp) with E = |sink| (the sink's
//      exp(sink − m) is one more term whose argument is rounded once);
//   2. exact identities: a sink of −inf is no sink (bitwise), a row with no visible key gives out
//      0 and lse = sink exactly, the thread count changes no bit, and a 16-bit K/V call equals
//      the float call on the widened K/V bitwise (the sink is folded where every format meets).

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <blockattn/attention.hpp>
#include <blockattn/reference.hpp>

#include "support/bits.hpp"
#include "support/random.hpp"
#include "support/tolerance.hpp"

namespace attention_sinks_test {
namespace {
using blockattn::test::count;
using blockattn::test::same_bits;

using blockattn::AttentionOptions;
using blockattn::Index;
using blockattn::TensorView;
using blockattn::test::make_rng;
using blockattn::test::seed_trace;

constexpr float kInf = std::numeric_limits<float>::infinity();

struct Shape {
  Index batch = 1;
  Index n_q = 1;
  Index n_k = 1;
  Index heads = 1;
  Index kv_heads = 1;
  Index d = 1;
  Index d_v = 1;
};

/// One problem in float (BSHD), with a sink per query head.
struct Problem {
  Shape s;
  std::vector<float> q, k, v;
  std::vector<double> sinks;

  Problem(const Shape& shape, std::mt19937_64& rng) : s(shape) {
    std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
    const auto fill = [&](std::vector<float>& x, Index n) {
      x.resize(count(n));
      for (float& e : x) e = dist(rng);
    };
    fill(q, s.batch * s.n_q * s.heads * s.d);
    fill(k, s.batch * s.n_k * s.kv_heads * s.d);
    fill(v, s.batch * s.n_k * s.kv_heads * s.d_v);
    // Sinks below, near and far above the logits (|logit| <= 4·sqrt(d) here), and one head
    // without a sink.
    const double pattern[] = {0.5, -3.0, 2.0, 12.0, -kInf, -0.25, 40.0, 1.0};
    for (Index h = 0; h < s.heads; ++h) sinks.push_back(pattern[h % 8]);
  }
  template <class T>
  TensorView<T> view(T* data, Index seq, Index heads, Index dim) const {
    return blockattn::make_tensor_view(data, s.batch, seq, heads, dim);
  }
  std::size_t out_size() const { return count(s.batch * s.n_q * s.heads * s.d_v); }
  std::size_t lse_size() const { return count(s.batch * s.heads * s.n_q); }

  /// The float call; out and lse are resized and overwritten.
  void run(AttentionOptions options, std::vector<float>& out, std::vector<float>& lse) const {
    out.assign(out_size(), -1.0f);
    lse.assign(lse_size(), -1.0f);
    blockattn::attention(view<const float>(q.data(), s.n_q, s.heads, s.d),
                         view<const float>(k.data(), s.n_k, s.kv_heads, s.d),
                         view<const float>(v.data(), s.n_k, s.kv_heads, s.d_v),
                         view<float>(out.data(), s.n_q, s.heads, s.d_v), options,
                         blockattn::Span<float>(lse));
  }
};

/// The float call (1 and 2 threads: bitwise equal) against the long double reference.
void check_against_reference(const Problem& p, AttentionOptions options) {
  using Real = long double;
  const Shape& s = p.s;
  std::vector<float> out, lse, out2, lse2;
  options.threads = 1;
  p.run(options, out, lse);
  options.threads = 2;
  p.run(options, out2, lse2);
  EXPECT_TRUE(same_bits(out, out2)) << "the thread count changed out";
  EXPECT_TRUE(same_bits(lse, lse2)) << "the thread count changed lse";

  const std::vector<Real> q(p.q.begin(), p.q.end()), k(p.k.begin(), p.k.end()),
      v(p.v.begin(), p.v.end());
  std::vector<Real> ref(p.out_size()), ref_lse(p.lse_size());
  blockattn::reference::attention(p.view<const Real>(q.data(), s.n_q, s.heads, s.d),
                                  p.view<const Real>(k.data(), s.n_k, s.kv_heads, s.d),
                                  p.view<const Real>(v.data(), s.n_k, s.kv_heads, s.d_v),
                                  p.view<Real>(ref.data(), s.n_q, s.heads, s.d_v), options,
                                  blockattn::Span<Real>(ref_lse));
  const double scale = options.scale != 0 ? options.scale : 1 / std::sqrt(double(s.d));
  const Index group = s.heads / s.kv_heads;
  using blockattn::detail::head_slice;
  const auto qv = p.view<const Real>(q.data(), s.n_q, s.heads, s.d);
  const auto kv = p.view<const Real>(k.data(), s.n_k, s.kv_heads, s.d);
  const auto vv = p.view<const Real>(v.data(), s.n_k, s.kv_heads, s.d_v);
  const auto out_view = p.view<const float>(out.data(), s.n_q, s.heads, s.d_v);
  const auto ref_view = p.view<const Real>(ref.data(), s.n_q, s.heads, s.d_v);
  for (Index b = 0; b < s.batch; ++b) {
    for (Index h = 0; h < s.heads; ++h) {
      const blockattn::Matrix<Real> qm = head_slice(qv, b, h);
      const blockattn::Matrix<Real> km = head_slice(kv, b, h / group);
      const blockattn::Matrix<Real> vm = head_slice(vv, b, h / group);
      const double sink = options.sinks.empty() ? 0.0 : std::abs(options.sinks[h]);
      const double extra = std::isinf(sink) ? 0.0 : sink;
      const std::vector<double> tol =
          blockattn::test::attention_tolerance<float>(qm, km, vm, scale, extra);
      const std::vector<double> lse_tol =
          blockattn::test::lse_tolerance<float>(qm, km, scale, extra);
      const auto got = head_slice(out_view, b, h);
      const auto want = head_slice(ref_view, b, h);
      for (Index i = 0; i < s.n_q; ++i) {
        SCOPED_TRACE("b=" + std::to_string(b) + " h=" + std::to_string(h) +
                     " i=" + std::to_string(i));
        const auto at = count((b * s.heads + h) * s.n_q + i);
        if (std::isinf(ref_lse[at])) {  // no visible key and no sink
          EXPECT_EQ(lse[at], -kInf);
          EXPECT_TRUE(got.row(i).isZero(0));
          continue;
        }
        for (Index c = 0; c < s.d_v; ++c) {
          ASSERT_LE(std::abs(double(got(i, c)) - double(want(i, c))), tol[count(i)]) << "c=" << c;
        }
        EXPECT_LE(std::abs(double(lse[at]) - double(ref_lse[at])), lse_tol[count(i)]);
      }
    }
  }
}

// Both paths (prefill; decode with at most 8 rows per kv head, and over key segments when
// n_k > 8192), GQA and MQA, ragged chunks, n_q ≠ n_k, d = 1, every mask, padding with empty
// sequences (the sink alone: out 0, lse = sink), and a softcap that the sink must not go through.
TEST(AttentionSinksTest, MatchesTheReference) {
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(1804);
  struct Case {
    Shape shape;
    bool causal = false;
    Index window = -1;
    Index query_chunk = 0;
    Index key_chunk = 0;
    bool padding = false;
    double softcap = 0;
  };
  const Case cases[] = {
      {{1, 37, 53, 1, 1, 24, 40}, false, -1, 16, 20},        // prefill, ragged chunks
      {{2, 45, 45, 4, 2, 16, 16}, true, -1, 0, 0, true},     // GQA causal, padding
      {{1, 1, 1, 1, 1, 1, 1}},                               // one token, d = 1
      {{1, 9, 130, 8, 1, 1, 3}, false, 7, 4, 32, false, 3},  // window, MQA, softcap
      {{2, 1, 300, 8, 2, 64, 64}, false, -1, 0, 0, true},    // decode, padding
      {{1, 3, 9000, 4, 2, 16, 16}, true},                    // decode over key segments
      {{1, 100, 70, 2, 2, 32, 32}, true, 10, 0, 0},          // causal window, n_q > n_k
  };
  for (const Case& c : cases) {
    const Shape& s = c.shape;
    SCOPED_TRACE("n_q=" + std::to_string(s.n_q) + " n_k=" + std::to_string(s.n_k) +
                 " heads=" + std::to_string(s.heads) + "/" + std::to_string(s.kv_heads));
    const Problem p(s, rng);
    AttentionOptions options;
    options.causal = c.causal;
    options.window_left = c.window;
    options.query_chunk = c.query_chunk;
    options.key_chunk = c.key_chunk;
    options.softcap = c.softcap;
    options.sinks = p.sinks;
    std::vector<Index> lengths;
    if (c.padding) {
      for (Index b = 0; b < s.batch; ++b) lengths.push_back(b == 0 ? 0 : s.n_k - 5);
      options.key_lengths = lengths;
    }
    check_against_reference(p, options);
  }
}

// A sink of −inf for every head is no sink: bitwise the call without sinks (out and lse).
TEST(AttentionSinksTest, NegativeInfinityIsNoSink) {
  auto rng = make_rng(1805);
  for (const Shape& s : {Shape{1, 33, 40, 4, 2, 16, 16}, Shape{1, 1, 9000, 4, 1, 16, 16}}) {
    const Problem p(s, rng);
    AttentionOptions options;
    options.causal = true;
    std::vector<float> out, lse, out_sink, lse_sink;
    p.run(options, out, lse);
    const std::vector<double> none(count(s.heads), -kInf);
    options.sinks = none;
    p.run(options, out_sink, lse_sink);
    EXPECT_TRUE(same_bits(out, out_sink));
    EXPECT_TRUE(same_bits(lse, lse_sink));
  }
}

// A row that sees no key has only the sink in its denominator: out exactly 0 and lse exactly the
// sink (rounded to float), on both paths, whether the keys are padding or there are none.
TEST(AttentionSinksTest, ARowWithNoVisibleKeyGivesZeroAndTheSink) {
  auto rng = make_rng(1806);
  for (const Shape& s :
       {Shape{1, 20, 30, 2, 1, 8, 8}, Shape{1, 1, 30, 2, 1, 8, 8}, Shape{1, 4, 0, 2, 2, 8, 8}}) {
    const Problem p(s, rng);
    AttentionOptions options;
    const std::vector<Index> lengths{0};
    options.key_lengths = lengths;
    options.sinks = p.sinks;
    std::vector<float> out, lse;
    p.run(options, out, lse);
    for (float x : out) EXPECT_EQ(x, 0.0f);
    for (Index h = 0; h < s.heads; ++h) {
      for (Index i = 0; i < s.n_q; ++i) {
        EXPECT_EQ(lse[count(h * s.n_q + i)], static_cast<float>(p.sinks[count(h)]));
      }
    }
  }
}

// bf16 K/V under float q: bitwise the float call on the widened K/V, sinks included (the sink is
// folded in the one finalisation every storage format goes through).
TEST(AttentionSinksTest, SixteenBitCacheEqualsTheFloatCallOnItsValues) {
  auto rng = make_rng(1807);
  for (const Shape& s : {Shape{1, 20, 50, 4, 2, 16, 16}, Shape{1, 1, 500, 4, 2, 16, 16}}) {
    Problem p(s, rng);
    std::vector<Eigen::bfloat16> k16(p.k.size()), v16(p.v.size());
    for (std::size_t i = 0; i < k16.size(); ++i) k16[i] = Eigen::bfloat16(p.k[i]);
    for (std::size_t i = 0; i < v16.size(); ++i) v16[i] = Eigen::bfloat16(p.v[i]);
    for (std::size_t i = 0; i < k16.size(); ++i) p.k[i] = static_cast<float>(k16[i]);
    for (std::size_t i = 0; i < v16.size(); ++i) p.v[i] = static_cast<float>(v16[i]);
    AttentionOptions options;
    options.sinks = p.sinks;
    std::vector<float> out, lse;
    p.run(options, out, lse);
    std::vector<float> out16(p.out_size()), lse16(p.lse_size());
    blockattn::attention(p.view<const float>(p.q.data(), s.n_q, s.heads, s.d),
                         p.view<const Eigen::bfloat16>(k16.data(), s.n_k, s.kv_heads, s.d),
                         p.view<const Eigen::bfloat16>(v16.data(), s.n_k, s.kv_heads, s.d_v),
                         p.view<float>(out16.data(), s.n_q, s.heads, s.d_v), options,
                         blockattn::Span<float>(lse16));
    EXPECT_TRUE(same_bits(out, out16));
    EXPECT_TRUE(same_bits(lse, lse16));
  }
}

// Bad sinks: wrong length, NaN, +inf. Each throws std::invalid_argument naming options.sinks and
// the sizes or the entry, and writes nothing.
TEST(AttentionSinksTest, BadSinksThrowNamingTheArgumentAndWriteNothing) {
  auto rng = make_rng(1808);
  const Problem p(Shape{1, 4, 6, 3, 1, 8, 8}, rng);
  struct Bad {
    std::vector<double> sinks;
    std::string expected;
  };
  const Bad cases[] = {
      {{0.5, 0.5}, "options.sinks.size() is 2 but the number of query heads is 3"},
      {{0.5, std::nan(""), 0.5}, "options.sinks[1] is nan"},
      {{0.5, 0.5, std::numeric_limits<double>::infinity()}, "options.sinks[2] is inf"},
  };
  for (const Bad& bad : cases) {
    AttentionOptions options;
    options.sinks = bad.sinks;
    std::vector<float> out(p.out_size(), 7.0f), lse(p.lse_size(), 7.0f);
    try {
      blockattn::attention(p.view<const float>(p.q.data(), p.s.n_q, p.s.heads, p.s.d),
                           p.view<const float>(p.k.data(), p.s.n_k, p.s.kv_heads, p.s.d),
                           p.view<const float>(p.v.data(), p.s.n_k, p.s.kv_heads, p.s.d_v),
                           p.view<float>(out.data(), p.s.n_q, p.s.heads, p.s.d_v), options,
                           blockattn::Span<float>(lse));
      ADD_FAILURE() << "no exception for " << bad.expected;
    } catch (const std::invalid_argument& e) {
      EXPECT_THAT(e.what(), ::testing::HasSubstr(bad.expected));
    }
    for (float x : out) EXPECT_EQ(x, 7.0f);
    for (float x : lse) EXPECT_EQ(x, 7.0f);
  }
}

}  // namespace

}  // namespace attention_sinks_test
