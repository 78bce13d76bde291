// transformer_block() (BPT, fused), reference::transformer_block() (vanilla) and
// reference::transformer_block_unfused_ffn() (memory-efficient attention + unfused FFN): against
// the vanilla reference in long double on the same rounded inputs, within a first-order running
// error bound of the whole layer (layer_error_bound below, derivation there); the reference itself
// against an independent definition written with explicit loops; block-size and thread
// invariance; in-place; validation.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <blockattn/reference.hpp>
#include <blockattn/transformer_block.hpp>

#include "../bench/support/transformer_block_unfused_ffn.hpp"
#include "support/layer_error_bound.hpp"
#include "support/random.hpp"
#include "support/scalar_types.hpp"
#include "support/tolerance.hpp"

namespace transformer_block_test {
namespace {

using blockattn::Activation;
using blockattn::BlockOptions;
using blockattn::Index;
using blockattn::Matrix;
using blockattn::RowVector;
using blockattn::TransformerBlockWeights;
using blockattn::test::cast_weights;
using blockattn::test::layer_error_bound;
using blockattn::test::make_rng;
using blockattn::test::random_matrix;
using blockattn::test::seed_trace;
using blockattn::test::unit_roundoff;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

using Long = long double;

constexpr Activation kActivations[] = {Activation::GeluErf, Activation::GeluTanh, Activation::Relu};

const char* name(Activation a) {
  switch (a) {
    case Activation::GeluErf:
      return "GeluErf";
    case Activation::GeluTanh:
      return "GeluTanh";
    case Activation::Relu:
      return "Relu";
  }
  return "?";
}

struct Shape {
  Index n, model, heads, kv_heads, ffn;
  BlockOptions options;
  Activation activation;
};

std::string describe(const Shape& s) {
  return "n=" + std::to_string(s.n) + " model=" + std::to_string(s.model) +
         " heads=" + std::to_string(s.heads) + " kv_heads=" + std::to_string(s.kv_heads) +
         " ffn=" + std::to_string(s.ffn) + " causal=" + std::to_string(s.options.causal) +
         " query_block=" + std::to_string(s.options.query_block) +
         " key_block=" + std::to_string(s.options.key_block) +
         " ffn_chunk=" + std::to_string(s.options.ffn_chunk) +
         " threads=" + std::to_string(s.options.threads) + " activation=" + name(s.activation) +
         " " + seed_trace();
}

template <class T>
RowVector<T> random_row(std::mt19937_64& rng, Index size, double lo, double hi) {
  return random_matrix<T>(rng, 1, size, lo, hi);
}

// Random weights, multiples of 1/64 (exact in float), scaled about 1/sqrt(fan-in) so that every
// activation stays O(1); LayerNorm gammas in [0.5, 1.5], betas in [-0.5, 0.5].
template <class T>
TransformerBlockWeights<T> random_weights(std::mt19937_64& rng, const Shape& s) {
  auto w = blockattn::make_transformer_block_weights<T>(s.model, s.heads, s.ffn, s.kv_heads);
  const Index kv_dim = w.wk.cols();
  const double a_model = std::max(2.0 / 64, 1.5 / std::sqrt(static_cast<double>(s.model)));
  const double a_ffn = std::max(2.0 / 64, 1.5 / std::sqrt(static_cast<double>(s.ffn)));
  w.wq = random_matrix<T>(rng, s.model, s.model, -a_model, a_model);
  w.wk = random_matrix<T>(rng, s.model, kv_dim, -a_model, a_model);
  w.wv = random_matrix<T>(rng, s.model, kv_dim, -a_model, a_model);
  w.wo = random_matrix<T>(rng, s.model, s.model, -a_model, a_model);
  w.w1 = random_matrix<T>(rng, s.model, s.ffn, -a_model, a_model);
  w.w2 = random_matrix<T>(rng, s.ffn, s.model, -a_ffn, a_ffn);
  w.bq = random_row<T>(rng, s.model, -0.25, 0.25);
  w.bk = random_row<T>(rng, kv_dim, -0.25, 0.25);
  w.bv = random_row<T>(rng, kv_dim, -0.25, 0.25);
  w.bo = random_row<T>(rng, s.model, -0.25, 0.25);
  w.b1 = random_row<T>(rng, s.ffn, -0.25, 0.25);
  w.b2 = random_row<T>(rng, s.model, -0.25, 0.25);
  w.ln1_gamma = random_row<T>(rng, s.model, 0.5, 1.5);
  w.ln1_beta = random_row<T>(rng, s.model, -0.5, 0.5);
  w.ln2_gamma = random_row<T>(rng, s.model, 0.5, 1.5);
  w.ln2_beta = random_row<T>(rng, s.model, -0.5, 0.5);
  w.activation = s.activation;
  return w;
}

// Expects |actual − expected| <= bound elementwise, naming the first few offenders.
template <class T>
void expect_within(const Matrix<T>& actual, const Matrix<Long>& expected, const Matrix<Long>& bound,
                   const std::string& what) {
  ASSERT_EQ(actual.rows(), expected.rows());
  ASSERT_EQ(actual.cols(), expected.cols());
  int failures = 0;
  for (Index r = 0; r < actual.rows(); ++r) {
    for (Index c = 0; c < actual.cols(); ++c) {
      const Long diff = std::abs(static_cast<Long>(actual(r, c)) - expected(r, c));
      if (!(diff <= bound(r, c)) && failures++ < 5) {
        ADD_FAILURE() << what << ": y(" << r << ", " << c << ") = " << actual(r, c) << ", expected "
                      << static_cast<double>(expected(r, c)) << ", |diff| "
                      << static_cast<double>(diff) << " > tol " << static_cast<double>(bound(r, c));
      }
    }
  }
}

template <class T>
struct Case {
  TransformerBlockWeights<T> weights;
  Matrix<T> x;
  Matrix<Long> exact;
  Matrix<Long> tol;
};

template <class T>
Case<T> make_case(const Shape& s, std::uint64_t salt) {
  auto rng = make_rng(salt);
  Case<T> c{random_weights<T>(rng, s), random_matrix<T>(rng, s.n, s.model), {}, {}};
  const auto w_long = cast_weights<Long>(c.weights);
  const Matrix<Long> x_long = c.x.template cast<Long>();
  c.exact.resize(s.n, s.model);
  blockattn::reference::transformer_block(w_long, x_long, c.exact, s.options);
  c.tol = layer_error_bound<T>(w_long, x_long, s.options.causal);
  return c;
}

// Checks the fused layer (and, with `all_variants`, the middle variant and the vanilla reference
// evaluated in T) against the long double reference within the bound.
template <class T>
void expect_matches_reference(const Shape& s, std::uint64_t salt, bool all_variants) {
  SCOPED_TRACE(describe(s));
  const Case<T> c = make_case<T>(s, salt);
  Matrix<T> y(s.n, s.model);
  blockattn::transformer_block(c.weights, c.x, y, s.options);
  expect_within(y, c.exact, c.tol, "transformer_block");
  if (!all_variants) return;
  blockattn::bench::transformer_block_unfused_ffn(c.weights, c.x, y, s.options);
  expect_within(y, c.exact, c.tol, "reference::transformer_block_unfused_ffn");
  blockattn::reference::transformer_block(c.weights, c.x, y, s.options);
  expect_within(y, c.exact, c.tol, "reference::transformer_block in T");
}

// Awkward fixed shapes: n = 1, n not a multiple of the block, block = 1, block = n, block > n,
// model not a power of two, head_dim = 1, GQA and MQA, ffn_chunk = 1 and not dividing ffn.
std::vector<Shape> fixed_shapes() {
  std::vector<Shape> shapes;
  const auto add = [&](Index n, Index model, Index heads, Index kv_heads, Index ffn, Index qb,
                       Index kb, Index fc) {
    for (const bool causal : {false, true}) {
      for (const Activation a : kActivations) {
        BlockOptions o;
        o.causal = causal;
        o.query_block = qb;
        o.key_block = kb;
        o.ffn_chunk = fc;
        o.threads = 2;
        shapes.push_back({n, model, heads, kv_heads, ffn, o, a});
      }
    }
  };
  add(1, 6, 2, 0, 10, 0, 0, 0);
  add(37, 30, 3, 0, 50, 8, 5, 7);
  add(13, 12, 4, 2, 24, 1, 3, 1);
  add(48, 20, 5, 1, 40, 48, 16, 40);
  add(40, 36, 6, 3, 72, 0, 0, 0);
  add(29, 7, 7, 0, 9, 30, 29, 10);
  return shapes;
}

template <class T>
class TransformerBlockTest : public ::testing::Test {};
TYPED_TEST_SUITE(TransformerBlockTest, blockattn::test::Scalars, );

// The fused layer, the middle variant and the vanilla reference in T all match.
TYPED_TEST(TransformerBlockTest, MatchesReferenceOnAwkwardShapes) {
  std::uint64_t salt = 100;
  for (const Shape& s : fixed_shapes()) expect_matches_reference<TypeParam>(s, ++salt, true);
}

TYPED_TEST(TransformerBlockTest, MatchesReferenceOnRandomShapes) {
  auto rng = make_rng(7);
  const auto pick = [&](Index lo, Index hi) {
    return std::uniform_int_distribution<Index>(lo, hi)(rng);
  };
  for (int trial = 0; trial < 12; ++trial) {
    Shape s;
    s.heads = pick(1, 4);
    Index head_dim = pick(1, 7);
    if (((s.heads * head_dim) & (s.heads * head_dim - 1)) == 0) ++head_dim;  // not a power of 2
    s.model = s.heads * head_dim;
    std::vector<Index> divisors;
    for (Index g = 1; g <= s.heads; ++g) {
      if (s.heads % g == 0) divisors.push_back(g);
    }
    s.kv_heads = divisors[static_cast<std::size_t>(pick(0, Index(divisors.size()) - 1))];
    s.n = pick(1, 70);
    s.ffn = pick(1, 60);
    s.options.causal = pick(0, 1) == 1;
    s.options.query_block = pick(0, s.n + 3);
    s.options.key_block = pick(0, s.n + 2);
    s.options.ffn_chunk = pick(0, s.ffn + 2);
    s.options.threads = static_cast<int>(pick(0, 3));
    s.activation = kActivations[pick(0, 2)];
    expect_matches_reference<TypeParam>(s, 1000 + static_cast<std::uint64_t>(trial), false);
  }
}

// Block sizes change rounding only: each result is within tol of the exact one, so two results
// are within 2·tol of each other.
TYPED_TEST(TransformerBlockTest, BlockSizesChangeRoundingOnly) {
  for (const bool causal : {false, true}) {
    Shape s{45, 21, 3, 0, 33, {}, Activation::GeluErf};
    s.options.causal = causal;
    SCOPED_TRACE(describe(s));
    const Case<TypeParam> c = make_case<TypeParam>(s, causal ? 11 : 12);
    Matrix<TypeParam> base(s.n, s.model);
    blockattn::transformer_block(c.weights, c.x, base, s.options);
    for (const Index qb : {1, 16, 44, 46}) {
      for (const Index kb : {1, 7, 64}) {
        for (const Index fc : {1, 10, 40}) {
          BlockOptions o = s.options;
          o.query_block = qb;
          o.key_block = kb;
          o.ffn_chunk = fc;
          Matrix<TypeParam> y(s.n, s.model);
          blockattn::transformer_block(c.weights, c.x, y, o);
          const Matrix<Long> twice = 2 * c.tol;
          expect_within(y, base.template cast<Long>(), twice,
                        "query_block=" + std::to_string(qb) + " key_block=" + std::to_string(kb) +
                            " ffn_chunk=" + std::to_string(fc));
        }
      }
    }
  }
}

// Any thread count gives bit-identical y: each query block is one task with its own buffers and
// a single-threaded attention() call, and the block partition does not depend on the threads.
TYPED_TEST(TransformerBlockTest, ThreadCountChangesNothing) {
  for (const bool causal : {false, true}) {
    Shape s{67, 30, 5, 0, 41, {}, Activation::GeluTanh};
    s.options.causal = causal;
    s.options.query_block = 9;
    s.options.key_block = 13;
    s.options.ffn_chunk = 16;
    auto rng = make_rng(causal ? 21 : 22);
    const auto w = random_weights<TypeParam>(rng, s);
    const Matrix<TypeParam> x = random_matrix<TypeParam>(rng, s.n, s.model);
    Matrix<TypeParam> one(s.n, s.model);
    s.options.threads = 1;
    blockattn::transformer_block(w, x, one, s.options);
    for (const int threads : {2, 3, 8, 0}) {
      s.options.threads = threads;
      SCOPED_TRACE(describe(s));
      Matrix<TypeParam> many(s.n, s.model);
      blockattn::transformer_block(w, x, many, s.options);
      for (Index r = 0; r < s.n; ++r) {
        for (Index c = 0; c < s.model; ++c) ASSERT_EQ(many(r, c), one(r, c)) << r << ", " << c;
      }
    }
  }
}

// y may be exactly x: each block reads its rows of x before writing them, and K and V are done
// first. Bit-identical to the out-of-place call.
TYPED_TEST(TransformerBlockTest, InPlaceMatchesOutOfPlace) {
  for (const bool causal : {false, true}) {
    Shape s{40, 18, 3, 0, 20, {}, Activation::Relu};
    s.options.causal = causal;
    s.options.query_block = 7;
    s.options.threads = 2;
    SCOPED_TRACE(describe(s));
    auto rng = make_rng(31);
    const auto w = random_weights<TypeParam>(rng, s);
    Matrix<TypeParam> x = random_matrix<TypeParam>(rng, s.n, s.model);
    Matrix<TypeParam> y(s.n, s.model);
    blockattn::transformer_block(w, x, y, s.options);
    Matrix<TypeParam> ref_y(s.n, s.model);
    blockattn::reference::transformer_block(w, x, ref_y, s.options);
    Matrix<TypeParam> ref_in_place = x;
    blockattn::reference::transformer_block(w, ref_in_place, ref_in_place, s.options);
    EXPECT_TRUE(ref_in_place == ref_y);
    blockattn::transformer_block(w, x, x, s.options);
    EXPECT_TRUE(x == y);
  }
}

// A caller's TransformerBlockWorkspace changes no bit: the same y as without one, on the first
// call (it grows), on a repeated call (reused as is), after a larger call and after a smaller one
// of other shapes, for any thread count.
TYPED_TEST(TransformerBlockTest, AWorkspaceChangesNoBit) {
  blockattn::TransformerBlockWorkspace workspace;
  for (const bool causal : {false, true}) {
    for (const Index n : {Index{40}, Index{67}, Index{23}}) {
      for (const int threads : {1, 2}) {
        Shape s{n, 30, 5, 0, 41, {}, Activation::GeluTanh};
        s.options.causal = causal;
        s.options.query_block = 9;
        s.options.key_block = 13;
        s.options.ffn_chunk = 16;
        s.options.threads = threads;
        SCOPED_TRACE(describe(s) + " threads=" + std::to_string(threads));
        auto rng = make_rng(static_cast<std::uint64_t>(n) + (causal ? 100 : 0));
        const auto w = random_weights<TypeParam>(rng, s);
        const Matrix<TypeParam> x = random_matrix<TypeParam>(rng, s.n, s.model);
        Matrix<TypeParam> expected(s.n, s.model);
        blockattn::transformer_block(w, x, expected, s.options);
        BlockOptions with = s.options;
        with.workspace = &workspace;
        for (int repeat = 0; repeat < 2; ++repeat) {
          Matrix<TypeParam> y(s.n, s.model);
          blockattn::transformer_block(w, x, y, with);
          EXPECT_TRUE(y == expected) << "repeat " << repeat;
        }
      }
    }
  }
  EXPECT_GT(workspace.capacity(), 0u);
  workspace.release();
  EXPECT_EQ(workspace.capacity(), 0u);
  EXPECT_EQ(workspace.slots(), 0u);
}

// The non-template overloads: plain Matrix<float> / Matrix<double> arguments, no T spelled.
TYPED_TEST(TransformerBlockTest, NonTemplateOverloadsCompileAndAgree) {
  Shape s{9, 8, 2, 0, 12, {}, Activation::GeluErf};
  auto rng = make_rng(41);
  const auto w = random_weights<TypeParam>(rng, s);
  const Matrix<TypeParam> x = random_matrix<TypeParam>(rng, s.n, s.model);
  Matrix<TypeParam> a(s.n, s.model), b(s.n, s.model), c(s.n, s.model), d(s.n, s.model);
  blockattn::transformer_block(w, x, a);
  blockattn::transformer_block(w, x, b, BlockOptions{});
  EXPECT_TRUE(a == b);
  blockattn::reference::transformer_block(w, x, c);
  blockattn::bench::transformer_block_unfused_ffn(w, x, d);
  const Matrix<Long> tol = Matrix<Long>::Constant(s.n, s.model, 1);  // both finite, same layer
  expect_within(c, a.template cast<Long>(), tol, "overloads");
  expect_within(d, a.template cast<Long>(), tol, "overloads");
}

TYPED_TEST(TransformerBlockTest, EmptySequenceIsANoOp) {
  Shape s{0, 8, 2, 0, 12, {}, Activation::GeluErf};
  auto rng = make_rng(51);
  const auto w = random_weights<TypeParam>(rng, s);
  Matrix<TypeParam> x(0, 8), y(0, 8);
  EXPECT_NO_THROW(blockattn::transformer_block(w, x, y));
  EXPECT_NO_THROW(blockattn::reference::transformer_block(w, x, y));
  EXPECT_NO_THROW(blockattn::bench::transformer_block_unfused_ffn(w, x, y));
}

// ---------------------------------------------------------------------------------------------
// The reference verified against an independent definition, in long double: LayerNorm from
// E[z²] − E[z]², GELU through erfc (x·Φ(x) with Φ(x) = erfc(−x/√2)/2) and tanh through exp,
// attention with explicit loops over the visible keys, every matrix product as a loop.
// Both sides are long double evaluations of the same function, each within the long double
// bound of layer_error_bound<long double>, so they agree within twice it (~1e-17 here); a wrong
// formula constant, mask or head mapping differs by O(1e-3..1).
// ---------------------------------------------------------------------------------------------

Long independent_activation(Activation a, Long x) {
  switch (a) {
    case Activation::GeluErf:
      return x * std::erfc(-x / std::sqrt(Long(2))) / 2;
    case Activation::GeluTanh: {
      // √(2/π) to 38 digits: a 16-digit constant is 4e-17 off, far outside the tolerance of a
      // 113-bit long double (AArch64).
      const Long t = 0.79788456080286535587989211986876373695L * (x + 0.044715L * x * x * x);
      const Long tanh_t = (std::exp(2 * t) - 1) / (std::exp(2 * t) + 1);
      return x / 2 + x * tanh_t / 2;
    }
    case Activation::Relu:
      return x < 0 ? Long(0) : x;
  }
  return x;
}

Matrix<Long> independent_layer(const TransformerBlockWeights<Long>& w, const Matrix<Long>& x,
                               bool causal) {
  const Index n = x.rows();
  const Index d = x.cols();
  const Index hd = d / w.heads;
  const Index group = w.heads / w.resolved_kv_heads();
  const auto layer_norm_loop = [&](const Matrix<Long>& z, const RowVector<Long>& g,
                                   const RowVector<Long>& b) {
    Matrix<Long> out(n, d);
    for (Index i = 0; i < n; ++i) {
      Long s1 = 0, s2 = 0;
      for (Index c = 0; c < d; ++c) {
        s1 += z(i, c);
        s2 += z(i, c) * z(i, c);
      }
      const Long mean = s1 / static_cast<Long>(d);
      const Long var = s2 / static_cast<Long>(d) - mean * mean;
      for (Index c = 0; c < d; ++c) {
        out(i, c) = g(c) * (z(i, c) - mean) / std::sqrt(var + static_cast<Long>(w.ln_eps)) + b(c);
      }
    }
    return out;
  };
  const auto linear_loop = [&](const Matrix<Long>& a, const Matrix<Long>& m,
                               const RowVector<Long>& b) {
    Matrix<Long> out(a.rows(), m.cols());
    for (Index i = 0; i < a.rows(); ++i) {
      for (Index o = 0; o < m.cols(); ++o) {
        Long sum = b(o);
        for (Index c = 0; c < a.cols(); ++c) sum += a(i, c) * m(c, o);
        out(i, o) = sum;
      }
    }
    return out;
  };
  const Matrix<Long> ln1 = layer_norm_loop(x, w.ln1_gamma, w.ln1_beta);
  const Matrix<Long> q = linear_loop(ln1, w.wq, w.bq);
  const Matrix<Long> k = linear_loop(ln1, w.wk, w.bk);
  const Matrix<Long> v = linear_loop(ln1, w.wv, w.bv);
  Matrix<Long> attn = Matrix<Long>::Zero(n, d);
  for (Index h = 0; h < w.heads; ++h) {
    const Index g = h / group;
    for (Index i = 0; i < n; ++i) {
      const Index last = causal ? i : n - 1;
      std::vector<Long> score;
      for (Index j = 0; j <= last; ++j) {
        Long dot = 0;
        for (Index c = 0; c < hd; ++c) dot += q(i, h * hd + c) * k(j, g * hd + c);
        score.push_back(dot / std::sqrt(static_cast<Long>(hd)));
      }
      const Long m = *std::max_element(score.begin(), score.end());
      Long total = 0;
      for (Long& s : score) total += (s = std::exp(s - m));
      for (Index j = 0; j <= last; ++j) {
        for (Index c = 0; c < hd; ++c) {
          attn(i, h * hd + c) += score[static_cast<std::size_t>(j)] / total * v(j, g * hd + c);
        }
      }
    }
  }
  Matrix<Long> h = linear_loop(attn, w.wo, w.bo) + x;
  const Matrix<Long> ln2 = layer_norm_loop(h, w.ln2_gamma, w.ln2_beta);
  Matrix<Long> hidden = linear_loop(ln2, w.w1, w.b1);
  for (Index i = 0; i < hidden.rows(); ++i) {
    for (Index c = 0; c < hidden.cols(); ++c) {
      hidden(i, c) = independent_activation(w.activation, hidden(i, c));
    }
  }
  return linear_loop(hidden, w.w2, w.b2) + h;
}

TEST(TransformerBlockReferenceTest, MatchesIndependentDefinition) {
  std::uint64_t salt = 500;
  for (const Shape& base : {Shape{1, 6, 2, 0, 10, {}, Activation::GeluErf},
                            Shape{23, 15, 3, 0, 19, {}, Activation::GeluErf},
                            Shape{17, 12, 4, 2, 30, {}, Activation::GeluErf},
                            Shape{20, 10, 5, 1, 11, {}, Activation::GeluErf}}) {
    for (const bool causal : {false, true}) {
      for (const Activation a : kActivations) {
        Shape s = base;
        s.options.causal = causal;
        s.activation = a;
        SCOPED_TRACE(describe(s));
        auto rng = make_rng(++salt);
        const auto w = random_weights<Long>(rng, s);
        const Matrix<Long> x = random_matrix<Long>(rng, s.n, s.model);
        Matrix<Long> y(s.n, s.model);
        blockattn::reference::transformer_block(w, x, y, s.options);
        const Matrix<Long> tol = 2 * layer_error_bound<Long>(w, x, causal);
        expect_within(y, independent_layer(w, x, causal), tol, "reference vs independent");
      }
    }
  }
}

// The activations at points whose values are known to 16 digits (x·Φ(x) from tables of the
// normal distribution, and both forms evaluated at 30 digits), through the fused path's and the
// reference's functions; double and within 4 ulp of the value (a libm erf/tanh is within 1-2).
TEST(TransformerBlockReferenceTest, ActivationsAtKnownPoints) {
  struct Point {
    Activation a;
    double x, y;
  };
  const Point points[] = {
      {Activation::GeluErf, 1.0, 0.8413447460685429},
      {Activation::GeluErf, -1.0, -0.15865525393145707},
      {Activation::GeluErf, 2.0, 1.9544997361036416},
      {Activation::GeluTanh, 1.0, 0.8411919906082768},
      {Activation::GeluTanh, -2.0, -0.045402305912224981},
      {Activation::GeluTanh, -1.0, -0.15880800939172330},
      {Activation::Relu, -0.5, 0.0},
      {Activation::Relu, 0.75, 0.75},
  };
  for (const Point& p : points) {
    SCOPED_TRACE(std::string(name(p.a)) + " x=" + std::to_string(p.x));
    // Absolute: 1 + erf or 1 + tanh cancels for negative x, so only absolute accuracy survives.
    const double tol = 4 * std::numeric_limits<double>::epsilon() * std::max(1.0, std::abs(p.y));
    EXPECT_NEAR(blockattn::detail::activate<double>(p.a, p.x), p.y, tol);
    EXPECT_NEAR(blockattn::reference::detail::activation_value<double>(p.a, p.x), p.y, tol);
  }
}

// ---------------------------------------------------------------------------------------------
// Validation: every weight's shape, heads, x and y, options, aliasing; y untouched on error.
// ---------------------------------------------------------------------------------------------

template <class T>
class TransformerBlockErrorTest : public ::testing::Test {};
TYPED_TEST_SUITE(TransformerBlockErrorTest, blockattn::test::Scalars, );

template <class T, class Mutate>
void expect_rejected(Mutate mutate, const std::vector<std::string>& parts, Index n = 5) {
  Shape s{n, 64, 4, 0, 96, {}, Activation::GeluErf};
  auto rng = make_rng(61);
  auto w = random_weights<T>(rng, s);
  Matrix<T> x = random_matrix<T>(rng, s.n, s.model);
  Matrix<T> y = Matrix<T>::Constant(s.n, s.model, std::numeric_limits<T>::quiet_NaN());
  BlockOptions options;
  mutate(w, x, y, options);
  const Matrix<T> y_before = y;
  const auto expect_message = [&](const char* prefix, auto&& call) {
    try {
      call();
      ADD_FAILURE() << prefix << " did not throw";
    } catch (const std::invalid_argument& e) {
      const std::string message = e.what();
      EXPECT_THAT(message, HasSubstr(prefix));
      for (const std::string& p : parts) EXPECT_THAT(message, HasSubstr(p));
    }
  };
  expect_message("blockattn::transformer_block: ",
                 [&] { blockattn::transformer_block(w, x, y, options); });
  expect_message("blockattn::reference::transformer_block: ",
                 [&] { blockattn::reference::transformer_block(w, x, y, options); });
  expect_message("blockattn::bench::transformer_block_unfused_ffn: ",
                 [&] { blockattn::bench::transformer_block_unfused_ffn(w, x, y, options); });
  // Nothing written: the NaN sentinel (or, for in-place mutations, the old contents) stays.
  for (Index r = 0; r < y.rows(); ++r) {
    for (Index c = 0; c < y.cols(); ++c) {
      const bool same =
          (std::isnan(y(r, c)) && std::isnan(y_before(r, c))) || y(r, c) == y_before(r, c);
      ASSERT_TRUE(same) << "y(" << r << ", " << c << ") was written";
    }
  }
}

TYPED_TEST(TransformerBlockErrorTest, EveryWeightShapeIsChecked) {
  using T = TypeParam;
  using W = TransformerBlockWeights<T>;
  using M = Matrix<T>;
  using O = BlockOptions;
  expect_rejected<T>([](W& w, M&, M&, O&) { w.wk.resize(64, 32); },
                     {"wk is 64x32, expected 64x64"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.wv.resize(63, 64); },
                     {"wv is 63x64, expected 64x64"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.wq.resize(64, 65); },
                     {"wq is 64x65, expected 64x64"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.wo.resize(64, 60); },
                     {"wo is 64x60, expected 64x64"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.w1.resize(60, 96); },
                     {"w1 is 60x96, expected 64x96"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.w2.resize(96, 65); },
                     {"w2 is 96x65, expected 96x64"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.w2.resize(95, 64); },
                     {"w2 is 95x64, expected 96x64"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.bq.resize(63); }, {"bq has 63 entries, expected 64"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.bk.resize(65); }, {"bk has 65 entries, expected 64"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.bv.resize(1); }, {"bv has 1 entries, expected 64"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.bo.resize(0); }, {"bo has 0 entries, expected 64"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.b1.resize(95); }, {"b1 has 95 entries, expected 96"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.b2.resize(96); }, {"b2 has 96 entries, expected 64"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.ln1_gamma.resize(63); },
                     {"ln1_gamma has 63 entries, expected 64"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.ln1_beta.resize(63); },
                     {"ln1_beta has 63 entries, expected 64"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.ln2_gamma.resize(65); },
                     {"ln2_gamma has 65 entries, expected 64"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.ln2_beta.resize(1); },
                     {"ln2_beta has 1 entries, expected 64"});
  // GQA: with kv_heads = 2 the key/value projections are [64, 2·16].
  expect_rejected<T>([](W& w, M&, M&, O&) { w.kv_heads = 2; }, {"wk is 64x64, expected 64x32"});
}

TYPED_TEST(TransformerBlockErrorTest, HeadsAndOptionsAreChecked) {
  using T = TypeParam;
  using W = TransformerBlockWeights<T>;
  using M = Matrix<T>;
  using O = BlockOptions;
  expect_rejected<T>([](W& w, M&, M&, O&) { w.heads = 5; },
                     {"model dimension 64", "multiple of heads 5"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.heads = 0; }, {"heads is 0"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.kv_heads = 3; },
                     {"heads 4 is not a multiple of kv_heads 3"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.kv_heads = -1; }, {"kv_heads is -1"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.ln_eps = 0; }, {"ln_eps is 0"});
  expect_rejected<T>([](W& w, M&, M&, O&) { w.activation = static_cast<Activation>(7); },
                     {"activation is 7"});
  expect_rejected<T>([](W&, M&, M&, O& o) { o.query_block = -1; }, {"options.query_block is -1"});
  expect_rejected<T>([](W&, M&, M&, O& o) { o.key_block = -2; }, {"options.key_block is -2"});
  expect_rejected<T>([](W&, M&, M&, O& o) { o.ffn_chunk = -3; }, {"options.ffn_chunk is -3"});
  expect_rejected<T>([](W&, M&, M&, O& o) { o.threads = -1; }, {"options.threads is -1"});
}

TYPED_TEST(TransformerBlockErrorTest, InputsOutputsAndAliasingAreChecked) {
  using T = TypeParam;
  using W = TransformerBlockWeights<T>;
  using M = Matrix<T>;
  using O = BlockOptions;
  expect_rejected<T>([](W&, M& x, M&, O&) { x.resize(5, 63); }, {"x.cols() is 63", "64"});
  expect_rejected<T>([](W&, M&, M& y, O&) { y.resize(4, 64); }, {"y.rows() is 4", "x.rows() is 5"});
  expect_rejected<T>([](W&, M&, M& y, O&) { y.resize(5, 65); }, {"y.cols() is 65", "64"});
  // y overlapping x at an offset of one row: not the supported exact in-place case.
  {
    Shape s{6, 64, 4, 0, 96, {}, Activation::GeluErf};
    auto rng = make_rng(71);
    const auto w = random_weights<T>(rng, s);
    Matrix<T> buffer = random_matrix<T>(rng, 7, 64);
    const Matrix<T> before = buffer;
    const auto call = [&] {
      blockattn::transformer_block(w, buffer.topRows(6), buffer.bottomRows(6));
    };
    EXPECT_THAT(call,
                ThrowsMessage<std::invalid_argument>(HasSubstr("y overlaps the memory of x")));
    EXPECT_TRUE(buffer == before);
  }
  // y inside a weight.
  {
    Shape s{2, 64, 4, 0, 96, {}, Activation::GeluErf};
    auto rng = make_rng(72);
    auto w = random_weights<T>(rng, s);
    const Matrix<T> x = random_matrix<T>(rng, 2, 64);
    Eigen::Map<Matrix<T>> y(w.w1.data(), 2, 64);
    EXPECT_THAT([&] { blockattn::transformer_block(w, x, y); },
                ThrowsMessage<std::invalid_argument>(HasSubstr("y overlaps the memory of w1")));
  }
}

}  // namespace

}  // namespace transformer_block_test
