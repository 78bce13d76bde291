// The numerical policy of attention() (README, "Numerical conventions"), case by case: which
// output rows a NaN reaches, ±inf scores, huge logits, denormal inputs and fully masked rows.

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <blockattn/attention.hpp>
#include <blockattn/attention_backward.hpp>
#include <blockattn/detail/attention_kernel.hpp>
#include <blockattn/reference.hpp>

#include "support/backward.hpp"
#include "support/random.hpp"
#include "support/scalar_types.hpp"
#include "support/tolerance.hpp"

namespace numerics_test {
namespace {

using blockattn::AttentionOptions;
using blockattn::Index;
using blockattn::Matrix;
using blockattn::test::make_rng;
using blockattn::test::random_matrix;
using blockattn::test::seed_trace;

template <class T>
class NumericsTest : public ::testing::Test {
 public:
  static constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
  static constexpr T kInf = std::numeric_limits<T>::infinity();

  /// out (and lse) of attention() on q [n_q, d], k [n_k, d], v [n_k, d_v].
  static Matrix<T> run(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v,
                       const AttentionOptions& o, std::vector<T>* lse = nullptr) {
    Matrix<T> out(q.rows(), v.cols());
    if (lse != nullptr) lse->assign(static_cast<std::size_t>(q.rows()), T(0));
    blockattn::attention(q, k, v, out, o,
                         lse != nullptr ? blockattn::Span<T>(*lse) : blockattn::Span<T>());
    return out;
  }

  static bool row_is_nan(const Matrix<T>& m, Index i) { return m.row(i).array().isNaN().all(); }
  static bool row_equal(const Matrix<T>& a, const Matrix<T>& b, Index i) {
    return std::memcmp(a.row(i).data(), b.row(i).data(),
                       static_cast<std::size_t>(a.cols()) * sizeof(T)) == 0;
  }
};
TYPED_TEST_SUITE(NumericsTest, blockattn::test::Scalars, );

/// Chunkings that put the poisoned row or key inside a partially masked tile and across tiles.
const std::vector<std::pair<Index, Index>> kChunkings = {{0, 0}, {4, 4}, {3, 5}, {16, 16}};

// A NaN in q row i reaches row i only: every other row is bit-identical to the clean run.
TYPED_TEST(NumericsTest, NaNInAQueryRowReachesThatRowOnly) {
  using T = TypeParam;
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(1);
  const Matrix<T> q = random_matrix<T>(rng, 13, 8);
  const Matrix<T> k = random_matrix<T>(rng, 17, 8);
  const Matrix<T> v = random_matrix<T>(rng, 17, 5);
  for (const auto& [qc, kc] : kChunkings) {
    for (const bool causal : {false, true}) {
      SCOPED_TRACE("chunks " + std::to_string(qc) + "x" + std::to_string(kc));
      AttentionOptions o;
      o.causal = causal;
      o.query_chunk = qc;
      o.key_chunk = kc;
      const Matrix<T> clean = this->run(q, k, v, o);
      Matrix<T> poisoned_q = q;
      poisoned_q(6, 3) = this->kNaN;
      const Matrix<T> got = this->run(poisoned_q, k, v, o);
      for (Index i = 0; i < q.rows(); ++i) {
        SCOPED_TRACE("row " + std::to_string(i));
        if (i == 6) {
          EXPECT_TRUE(this->row_is_nan(got, i));
        } else {
          EXPECT_TRUE(this->row_equal(got, clean, i));
        }
      }
    }
  }
}

/// Where a NaN is planted in the NaN-in-a-key tests: key j's k (whole score) or one entry of its v.
enum class Poisoned { Key, Value };

/// A NaN in key j's k (column 0) or v (column 2) reaches exactly the queries that see key j
/// (causal, bottom-right aligned: i + n_k − n_q >= j): a poisoned k makes their whole row NaN, a
/// poisoned v their column 2. Every other row is bit-identical to the clean run. Shapes: a
/// prefill block with chunkings that put key j inside a partially masked tile (the P·V of a tile
/// multiplies every weight, also a masked key's 0, by every value: 0·NaN must not leak), decode
/// (n_q <= kDirectRows: K and V read in place) and a key-split decode (n_k > kDecodeSegmentKeys:
/// per-segment states merged), each with a key that some rows see and others do not.
template <class T>
void expect_nan_reaches_the_queries_that_see_it(Poisoned where) {
  SCOPED_TRACE(seed_trace());
  struct Case {
    Index n_q, n_k, j;
  };
  const Index split = blockattn::detail::kDecodeSegmentKeys + 40;
  for (const Case& shape : {Case{13, 13, 7}, Case{3, 13, 11}, Case{2, split, split - 1}}) {
    auto rng = make_rng(2);
    const Matrix<T> q = random_matrix<T>(rng, shape.n_q, 8);
    const Matrix<T> k = random_matrix<T>(rng, shape.n_k, 8);
    const Matrix<T> v = random_matrix<T>(rng, shape.n_k, 5);
    const Index j = shape.j;
    for (const auto& [qc, kc] : kChunkings) {
      SCOPED_TRACE("n_q " + std::to_string(shape.n_q) + ", n_k " + std::to_string(shape.n_k) +
                   ", chunks " + std::to_string(qc) + "x" + std::to_string(kc));
      AttentionOptions o;
      o.causal = true;
      o.query_chunk = qc;
      o.key_chunk = kc;
      const Matrix<T> clean = NumericsTest<T>::run(q, k, v, o);
      Matrix<T> poisoned_k = k;
      Matrix<T> poisoned_v = v;
      (where == Poisoned::Key ? poisoned_k(j, 0) : poisoned_v(j, 2)) = NumericsTest<T>::kNaN;
      const Matrix<T> got = NumericsTest<T>::run(q, poisoned_k, poisoned_v, o);
      for (Index i = 0; i < shape.n_q; ++i) {
        SCOPED_TRACE("row " + std::to_string(i));
        if (i + shape.n_k - shape.n_q >= j) {
          EXPECT_TRUE(where == Poisoned::Key ? NumericsTest<T>::row_is_nan(got, i)
                                             : std::isnan(got(i, 2)));
        } else {
          EXPECT_TRUE(NumericsTest<T>::row_equal(got, clean, i));
        }
      }
    }
  }
}

TYPED_TEST(NumericsTest, NaNInAKeyReachesTheQueriesThatSeeIt) {
  expect_nan_reaches_the_queries_that_see_it<TypeParam>(Poisoned::Key);
}

TYPED_TEST(NumericsTest, NaNInAValueReachesTheQueriesThatSeeIt) {
  expect_nan_reaches_the_queries_that_see_it<TypeParam>(Poisoned::Value);
}

// A NaN value reaches a row that sees its key even when the key's weight underflows to exactly 0
// there (exp(−1000) in float and double): the weight is positive in exact arithmetic, and a
// rounded 0 must not act as a mask. Key 0 has score 1000 and takes all the weight; key j (score 0)
// carries v(j, 0) = NaN. Rows that see key j: column 0 NaN, the others v(0, ·) exactly; rows that
// do not: v(0, ·) exactly. Covers the underflow inside one tile, across key chunks (the running
// state) and across key segments of a split decode (the merge, where key j's segment has weight
// exp(0 − 1000) = 0).
TYPED_TEST(NumericsTest, NaNValueWithAnUnderflowedWeightReachesTheRow) {
  using T = TypeParam;
  const Index split = blockattn::detail::kDecodeSegmentKeys + 40;
  struct Case {
    Index n_q, n_k, j;
  };
  for (const Case& shape : {Case{13, 13, 7}, Case{2, split, split - 1}}) {
    Matrix<T> q = Matrix<T>::Ones(shape.n_q, 1);
    Matrix<T> k = Matrix<T>::Zero(shape.n_k, 1);
    k(0, 0) = T(1000);
    Matrix<T> v = Matrix<T>::Constant(shape.n_k, 3, T(2));
    v.row(0) << T(1), T(-1), T(3);
    v(shape.j, 0) = this->kNaN;
    for (const auto& [qc, kc] : kChunkings) {
      SCOPED_TRACE("n_q " + std::to_string(shape.n_q) + ", chunks " + std::to_string(qc) + "x" +
                   std::to_string(kc));
      AttentionOptions o;
      o.scale = 1;
      o.causal = true;
      o.query_chunk = qc;
      o.key_chunk = kc;
      const Matrix<T> got = this->run(q, k, v, o);
      for (Index i = 0; i < shape.n_q; ++i) {
        SCOPED_TRACE("row " + std::to_string(i));
        const bool sees = i + shape.n_k - shape.n_q >= shape.j;
        if (sees) {
          EXPECT_TRUE(std::isnan(got(i, 0)));
        } else {
          EXPECT_EQ(got(i, 0), v(0, 0));
        }
        EXPECT_EQ(got(i, 1), v(0, 1));
        EXPECT_EQ(got(i, 2), v(0, 2));
      }
    }
  }
}

// A row whose every visible score is NaN (a NaN in its q row, or NaN in every key it sees) is
// NaN, out and lse, not "no visible key" (the running max does not count NaN, so such a row has
// m = −inf like an empty one; its sum l is NaN, which finalize and every merge must keep). Also
// when the NaN scores are only those of one key segment of a split decode (its state: m = −inf,
// l = NaN, merged with a finite one), and through merge_attention_states with an empty part.
TYPED_TEST(NumericsTest, ARowOfOnlyNaNScoresIsNaN) {
  using T = TypeParam;
  for (const bool in_q : {true, false}) {
    SCOPED_TRACE(in_q ? "NaN in q row 1" : "NaN in every key");
    Matrix<T> q = Matrix<T>::Ones(3, 2);
    Matrix<T> k = Matrix<T>::Ones(4, 2);
    if (in_q) {
      q(1, 0) = this->kNaN;
    } else {
      k.col(1).setConstant(this->kNaN);
    }
    const Matrix<T> v = Matrix<T>::Ones(4, 1);
    std::vector<T> lse;
    const Matrix<T> got = this->run(q, k, v, {}, &lse);
    for (Index i = in_q ? 1 : 0; i < (in_q ? 2 : 3); ++i) {
      EXPECT_TRUE(std::isnan(got(i, 0)));
      EXPECT_TRUE(std::isnan(lse[static_cast<std::size_t>(i)]));
    }
    // Merged with a part that has no visible key (lse −inf), either side first.
    const Matrix<T> empty = Matrix<T>::Zero(3, 1);
    const std::vector<T> empty_lse(3, -this->kInf);
    Matrix<T> merged(3, 1);
    std::vector<T> merged_lse(3);
    for (const bool nan_first : {true, false}) {
      SCOPED_TRACE(nan_first ? "merge(NaN part, empty part)" : "merge(empty part, NaN part)");
      blockattn::merge_attention_states(nan_first ? got : empty, nan_first ? lse : empty_lse,
                                        nan_first ? empty : got, nan_first ? empty_lse : lse,
                                        merged, merged_lse);
      EXPECT_TRUE(std::isnan(merged(1, 0)));
      EXPECT_TRUE(std::isnan(merged_lse[1]));
      if (in_q) {
        EXPECT_EQ(merged(0, 0), got(0, 0));
        EXPECT_EQ(merged_lse[0], lse[0]);
      }
    }
  }
  // Key-split decode: the second segment's keys all NaN, the first segment finite.
  const Index n_k = blockattn::detail::kDecodeSegmentKeys + 40;
  const Matrix<T> q = Matrix<T>::Ones(1, 2);
  Matrix<T> k = Matrix<T>::Ones(n_k, 2);
  k.bottomRows(n_k - blockattn::detail::kDecodeSegmentKeys).col(1).setConstant(this->kNaN);
  const Matrix<T> v = Matrix<T>::Ones(n_k, 1);
  std::vector<T> lse;
  const Matrix<T> got = this->run(q, k, v, {}, &lse);
  EXPECT_TRUE(std::isnan(got(0, 0)));
  EXPECT_TRUE(std::isnan(lse[0]));
}

/// Which input of attention_backward() holds the NaN.
enum class BackwardPoison { Query, Key, Value, OutputGradient };

// The backward pass follows the same rule: a NaN reaches the gradient rows it affects and leaves
// every other row bit-identical to the clean run. Causal, n = 13, query i0 = 4, key j0 = 7. With
// A = the queries whose output the NaN reaches ({i0} for q and dO, {i : i >= j0} for k and v),
// the affected rows are dQ rows of A, and dK / dV rows of the keys that some query of A sees —
// except dV, which does not depend on V (so a NaN value leaves dV clean). The forward's out and
// lse are those of the poisoned input, as in training. Chunkings put the NaN inside partially
// masked tiles (the products there multiply a masked pair's 0 by every row: 0·NaN must not leak).
TYPED_TEST(NumericsTest, NaNInTheBackwardReachesTheAffectedGradientRowsOnly) {
  using T = TypeParam;
  SCOPED_TRACE(seed_trace());
  const Index n = 13;
  const Index i0 = 4;
  const Index j0 = 7;
  auto rng = make_rng(6);
  const Matrix<T> q = random_matrix<T>(rng, n, 6);
  const Matrix<T> k = random_matrix<T>(rng, n, 6);
  const Matrix<T> v = random_matrix<T>(rng, n, 5);
  const Matrix<T> dout = random_matrix<T>(rng, n, 5);
  struct Grads {
    Matrix<T> dq, dk, dv;
  };
  const auto backward = [&](const Matrix<T>& q_in, const Matrix<T>& k_in, const Matrix<T>& v_in,
                            const Matrix<T>& dout_in, const AttentionOptions& o) {
    std::vector<T> lse;
    const Matrix<T> out = this->run(q_in, k_in, v_in, o, &lse);
    Grads g{Matrix<T>(n, 6), Matrix<T>(n, 6), Matrix<T>(n, 5)};
    blockattn::test::backward(q_in, k_in, v_in, out, lse, dout_in, g.dq, g.dk, g.dv, o);
    return g;
  };
  const auto expect_rows = [&](const Matrix<T>& got, const Matrix<T>& clean, auto reached,
                               const char* name) {
    for (Index r = 0; r < got.rows(); ++r) {
      SCOPED_TRACE(std::string(name) + " row " + std::to_string(r));
      if (reached(r)) {
        EXPECT_TRUE(got.row(r).array().isNaN().any());
      } else {
        EXPECT_TRUE(this->row_equal(got, clean, r));
      }
    }
  };
  for (const auto& [qc, kc] : kChunkings) {
    AttentionOptions o;
    o.causal = true;
    o.query_chunk = qc;
    o.key_chunk = kc;
    const Grads clean = backward(q, k, v, dout, o);
    for (const BackwardPoison where : {BackwardPoison::Query, BackwardPoison::Key,
                                       BackwardPoison::Value, BackwardPoison::OutputGradient}) {
      SCOPED_TRACE("chunks " + std::to_string(qc) + "x" + std::to_string(kc) + ", poison " +
                   std::to_string(static_cast<int>(where)));
      Matrix<T> pq = q, pk = k, pv = v, pdout = dout;
      const bool row_poison =
          where == BackwardPoison::Query || where == BackwardPoison::OutputGradient;
      if (where == BackwardPoison::Query) pq(i0, 1) = this->kNaN;
      if (where == BackwardPoison::Key) pk(j0, 1) = this->kNaN;
      if (where == BackwardPoison::Value) pv(j0, 1) = this->kNaN;
      if (where == BackwardPoison::OutputGradient) pdout(i0, 1) = this->kNaN;
      const Grads got = backward(pq, pk, pv, pdout, o);
      // A = reached queries; causal with n_q = n_k: query i sees keys j <= i.
      const auto in_a = [&](Index i) { return row_poison ? i == i0 : i >= j0; };
      const Index a_last = row_poison ? i0 : n - 1;  // keys seen by some query of A: j <= a_last
      expect_rows(got.dq, clean.dq, in_a, "dq");
      expect_rows(
          got.dk, clean.dk, [&](Index j) { return j <= a_last; }, "dk");
      expect_rows(
          got.dv, clean.dv, [&](Index j) { return where != BackwardPoison::Value && j <= a_last; },
          "dv");
    }
  }
}

// A +inf score: the keys with +inf share the row's weight equally, every other key gets 0 (the
// limit, as softmax() does); a −inf score is a key with weight 0, like a masked one.
TYPED_TEST(NumericsTest, InfiniteScores) {
  using T = TypeParam;
  const Matrix<T> q = Matrix<T>::Ones(3, 2);
  Matrix<T> v(5, 1);
  v << 1, 2, 4, 8, 16;
  for (const auto& [qc, kc] : kChunkings) {
    SCOPED_TRACE("chunks " + std::to_string(qc) + "x" + std::to_string(kc));
    AttentionOptions o;
    o.query_chunk = qc;
    o.key_chunk = kc;
    Matrix<T> k = Matrix<T>::Zero(5, 2);
    k(1, 0) = this->kInf;
    k(3, 1) = this->kInf;
    const Matrix<T> plus = this->run(q, k, v, o);
    for (Index i = 0; i < 3; ++i) EXPECT_EQ(plus(i, 0), T(5));  // (2 + 8) / 2, exact
    k.setZero();
    k(2, 0) = -this->kInf;  // key 2 drops out; the others have equal scores: (1 + 2 + 8 + 16) / 4
    std::vector<T> lse;
    const Matrix<T> minus = this->run(q, k, v, o, &lse);
    for (Index i = 0; i < 3; ++i) {
      EXPECT_EQ(minus(i, 0), T(27) / T(4));
      EXPECT_EQ(lse[static_cast<std::size_t>(i)], std::log(T(4)));
    }
  }
}

// Logits far beyond exp's range (±1e4·j, and 1e30 in double) give the exact limit, not inf/NaN:
// the largest score takes all the weight. Exact because exp(−1000) underflows to 0 in T.
TYPED_TEST(NumericsTest, HugeLogitsDoNotOverflow) {
  using T = TypeParam;
  Matrix<T> v(6, 2);
  v << 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6;
  Matrix<T> k(6, 1);
  k << 0, 1, 2, 5, 3, 4;  // the largest key is row 3
  for (const double big : {1e4, 1e30}) {
    if (static_cast<T>(big) * T(5) == this->kInf) continue;
    for (const double sign : {1.0, -1.0}) {
      SCOPED_TRACE("logit step " + std::to_string(sign * big));
      const Matrix<T> q = Matrix<T>::Constant(2, 1, static_cast<T>(sign * big));
      AttentionOptions o;
      o.scale = 1;
      o.key_chunk = 2;
      std::vector<T> lse;
      const Matrix<T> got = this->run(q, k, v, o, &lse);
      const Index winner = sign > 0 ? 3 : 0;
      for (Index i = 0; i < 2; ++i) {
        EXPECT_EQ(got(i, 0), v(winner, 0));
        EXPECT_EQ(got(i, 1), v(winner, 1));
        EXPECT_EQ(lse[static_cast<std::size_t>(i)], static_cast<T>(sign * big) * k(winner, 0));
      }
    }
  }
}

// Denormal inputs are ordinary numbers: no NaN, no flush surprises beyond the tolerance. With
// denormal q·k the scores round to 0 (uniform weights), so out is the mean of v, within the
// house tolerance (tolerance.hpp) against the long double reference on the same inputs.
TYPED_TEST(NumericsTest, DenormalInputs) {
  using T = TypeParam;
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(4);
  const T tiny = std::numeric_limits<T>::denorm_min() * T(7);
  Matrix<T> q = random_matrix<T>(rng, 9, 4) * tiny;
  Matrix<T> k = random_matrix<T>(rng, 11, 4);
  Matrix<T> v = random_matrix<T>(rng, 11, 3);
  v.row(4).setConstant(tiny);  // denormal values too
  AttentionOptions o;
  o.key_chunk = 4;
  const Matrix<T> got = this->run(q, k, v, o);
  using LD = long double;
  Matrix<LD> want(9, 3);
  blockattn::reference::attention(q.template cast<LD>(), k.template cast<LD>(),
                                  v.template cast<LD>(), want);
  const auto tol = blockattn::test::attention_tolerance<T>(q, k, v, 0.5);
  for (Index i = 0; i < 9; ++i) {
    for (Index c = 0; c < 3; ++c) {
      ASSERT_TRUE(std::isfinite(got(i, c)));
      EXPECT_NEAR(static_cast<double>(got(i, c)), static_cast<double>(want(i, c)),
                  tol[static_cast<std::size_t>(i)]);
    }
  }
}

// A query with no visible key (key length 0, a window past the keys, an empty block-sparse row)
// gets out = 0 exactly and lse = −inf, even if the hidden keys hold NaN or inf.
TYPED_TEST(NumericsTest, FullyMaskedRowsAreZeroWithMinusInfinityLse) {
  using T = TypeParam;
  auto rng = make_rng(5);
  const Matrix<T> q = random_matrix<T>(rng, 6, 4);
  Matrix<T> k = random_matrix<T>(rng, 8, 4);
  Matrix<T> v = random_matrix<T>(rng, 8, 3);
  k(7, 0) = this->kNaN;
  v(7, 1) = this->kInf;
  const Index zero = 0;
  blockattn::BlockSparseLayout empty_layout(1, 2, 2, 4, 4);
  for (int which = 0; which < 3; ++which) {
    SCOPED_TRACE("mask " + std::to_string(which));
    AttentionOptions o;
    if (which == 0) o.key_lengths = {&zero, 1};
    if (which == 1) {
      o.window_left = 0;
      o.window_right = 0;
      o.causal = true;
      o.key_lengths = {&zero, 1};
    }
    if (which == 2) o.block_sparse = &empty_layout;
    std::vector<T> lse;
    const Matrix<T> got = this->run(q, k, v, o, &lse);
    EXPECT_TRUE((got.array() == T(0)).all());
    for (const T x : lse) EXPECT_EQ(x, -this->kInf);
  }
}

}  // namespace

}  // namespace numerics_test
