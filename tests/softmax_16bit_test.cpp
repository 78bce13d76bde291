// softmax.hpp on Eigen::bfloat16 and Eigen::half rows: softmax() (every algorithm, 16-bit or
// float output), OnlineSoftmax<float> fed 16-bit rows, and softmax_topk() with 16-bit or float
// values. Two oracles:
//   1. bitwise: a 16-bit row is widened in registers and takes the float path unchanged, so the
//      16-bit call must give exactly round(float call on the widened row) (and the float-output
//      form exactly the float call), on every ISA, special values included;
//   2. blockattn::reference in long double on the stored (rounded) inputs, with the float path's
//      tolerance plus one rounding of the output to the format.
// Eigen's runtime malloc check is on: every call on preallocated buffers runs with
// set_is_malloc_allowed(false) (the no-allocation contract for each format).

#include <cmath>
#include <cstdint>
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
#include <blockattn/softmax.hpp>

#include "support/random.hpp"
#include "support/requires_assertions.hpp"
#include "support/requires_malloc_guard.hpp"
#include "support/softmax_tolerance.hpp"
#include "support/tolerance.hpp"

namespace softmax_16bit_test {
namespace {

using blockattn::Index;
using blockattn::Matrix;
using blockattn::OnlineSoftmax;
using blockattn::RowVector;
using blockattn::SoftmaxAlgorithm;
using blockattn::test::kAlgorithms;
using blockattn::test::kExpError;
using blockattn::test::make_rng;
using blockattn::test::name_of;
using blockattn::test::random_matrix;
using blockattn::test::seed_trace;
using blockattn::test::u;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

using Real = long double;

template <class S>
constexpr const char* format_name() {
  return std::is_same_v<S, Eigen::bfloat16> ? "bfloat16" : "half";
}

// --- tolerances ---------------------------------------------------------------------------------
//
// Inputs are multiples of 1/64 of magnitude < 2^14 rounded to the format; rounding to fewer
// significant bits keeps a multiple of 1/64, so the stored values widen exactly to float and every
// difference x − m stays exact in float (<= 21 significant bits). The float computation therefore
// has exactly the float path's error (softmax_test.cpp derives it; restated here), and a 16-bit
// output adds one rounding: relative u_S = 2^-8 (bfloat16), 2^-11 (half).

/// Unit roundoff of the storage format: 2^-8 for bfloat16 (8 significant bits), 2^-11 for half.
template <class S>
Real format_u() {
  return std::is_same_v<S, Eigen::bfloat16> ? std::ldexp(Real(1), -8) : std::ldexp(Real(1), -11);
}

// The float path, relative: support/softmax_tolerance.hpp's bound for float rows.
Real float_tolerance(SoftmaxAlgorithm algorithm, Index n) {
  return blockattn::test::tolerance_for<float>(algorithm, n);
}

/// A 16-bit output: y = fl_S(y_f) with |y_f − p| <= t·p, so |y − p| <= (t + u_S·(1 + t))·p.
template <class S>
Real format_tolerance(SoftmaxAlgorithm algorithm, Index n) {
  const Real t = float_tolerance(algorithm, n);
  return t + format_u<S>() * (1 + t);
}

// Below the smallest normal number of the output format a probability is a denormal with absolute
// error up to half a denormal ulp per rounding: min() of the format bounds it with room to spare
// (float's min for a float output; half's 6.1e-5 is the larger one for half).
template <class Y>
Real underflow_error() {
  return static_cast<Real>(static_cast<float>(std::numeric_limits<Y>::min()));
}

// --- helpers ----------------------------------------------------------------------------------

template <class S>
S nan_of() {
  return static_cast<S>(std::numeric_limits<float>::quiet_NaN());
}

template <class S>
S inf_of() {
  return static_cast<S>(std::numeric_limits<float>::infinity());
}

/// The bits of a value (bfloat16 / half: 16, float: 32), for bitwise comparisons that hold for
/// NaN too.
template <class T>
auto bits_of(T x) {
  using U = std::conditional_t<sizeof(T) == 2, std::uint16_t, std::uint32_t>;
  U bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

template <class A, class B>
void expect_bitwise(const Matrix<A>& a, const Matrix<B>& b, const std::string& what) {
  static_assert(sizeof(A) == sizeof(B), "same width");
  ASSERT_EQ(a.rows(), b.rows());
  ASSERT_EQ(a.cols(), b.cols());
  for (Index i = 0; i < a.rows(); ++i) {
    for (Index j = 0; j < a.cols(); ++j) {
      ASSERT_EQ(bits_of(a(i, j)), bits_of(b(i, j)))
          << what << " at (" << i << ", " << j << "): " << static_cast<float>(a(i, j)) << " vs "
          << static_cast<float>(b(i, j));
    }
  }
}

template <class S>
Matrix<S> round_matrix(const Matrix<float>& m) {
  Matrix<S> r(m.rows(), m.cols());
  for (Index i = 0; i < m.size(); ++i) r.data()[i] = blockattn::detail::round_to<S>(m.data()[i]);
  return r;
}

template <class S>
Matrix<float> widen_matrix(const Matrix<S>& m) {
  Matrix<float> r(m.rows(), m.cols());
  for (Index i = 0; i < m.size(); ++i) r.data()[i] = static_cast<float>(m.data()[i]);
  return r;
}

/// Lengths around every SIMD width in use (1, 4, 8, 16 lanes, unrolled 2× and 4×), primes, and
/// the online kernel's tile boundary (counted in floats, so the same for 16-bit rows).
std::vector<Index> lengths() {
  const Index tile = blockattn::detail::softmax_kernel::kTile<Eigen::bfloat16>;
  return {1,  2,  3,  7,   8,   9,   15,  16,       17,   31,       33,
          63, 64, 65, 127, 129, 257, 511, tile - 1, tile, tile + 1, 2 * tile + 37};
}

/// Rows of `n` random values in [lo, hi] rounded to S, plus special rows when `specials`: one
/// with a few −inf, one all −inf, one with a NaN, one with two +inf, one with ±1e4 logits.
template <class S>
Matrix<S> test_rows(std::mt19937_64& rng, Index n, double lo, double hi, bool specials) {
  const Index rows = specials ? 7 : 2;
  Matrix<S> x = random_matrix<S>(rng, rows, n, lo, hi);
  if (!specials) return x;
  const S ninf = -inf_of<S>();
  for (Index j = 0; j < n; j += 3) x(2, j) = ninf;
  x.row(3).setConstant(ninf);
  x(4, n / 2) = nan_of<S>();
  x(5, n - 1) = inf_of<S>();
  x(5, 0) = inf_of<S>();
  for (Index j = 0; j < n; ++j) {
    x(6, j) = static_cast<S>((j % 2 == 0 ? 1e4 : -1e4) + static_cast<double>(x(6, j)));
  }
  return x;
}

template <class S>
class Softmax16Test : public ::testing::Test {};
using Formats = ::testing::Types<Eigen::bfloat16, Eigen::half>;
TYPED_TEST_SUITE(Softmax16Test, Formats, );

// --- the bitwise oracle -----------------------------------------------------------------------

TYPED_TEST(Softmax16Test, EqualsTheRoundedFloatCallOnTheWidenedRowBitwise) {
  using S = TypeParam;
  auto rng = make_rng(1601);
  for (const Index n : lengths()) {
    const Matrix<S> x = test_rows<S>(rng, n, -8.0, 8.0, /*specials=*/true);
    const Matrix<float> wide = widen_matrix(x);
    for (const SoftmaxAlgorithm algorithm : kAlgorithms) {
      SCOPED_TRACE(std::string(format_name<S>()) + " " + name_of(algorithm) +
                   " n=" + std::to_string(n) + " " + seed_trace());
      Matrix<float> expected(x.rows(), n);
      blockattn::softmax(wide, expected, algorithm);
      Matrix<S> y(x.rows(), n);
      Matrix<float> y_float(x.rows(), n);
      Eigen::internal::set_is_malloc_allowed(false);
      blockattn::softmax(x, y, algorithm);
      blockattn::softmax(x, y_float, algorithm);
      Eigen::internal::set_is_malloc_allowed(true);
      expect_bitwise(y, round_matrix<S>(expected), "16-bit output");
      expect_bitwise(y_float, expected, "float output");
      // The pointer form, out of place and in place, gives the same bits.
      Matrix<S> in_place = x.topRows(1);
      blockattn::softmax(in_place.data(), n, in_place.data(), algorithm);
      expect_bitwise(in_place, Matrix<S>(y.topRows(1)), "in place");
      Matrix<S> row_by_row(x.rows(), n);
      for (Index i = 0; i < x.rows(); ++i) {
        blockattn::softmax(x.row(i).data(), n, row_by_row.row(i).data(), algorithm);
      }
      expect_bitwise(row_by_row, y, "pointer form");
    }
  }
}

TYPED_TEST(Softmax16Test, MatrixInPlaceEqualsOutOfPlace) {
  using S = TypeParam;
  auto rng = make_rng(1602);
  const Matrix<S> x = test_rows<S>(rng, 70, -5.0, 5.0, /*specials=*/true);
  for (const SoftmaxAlgorithm algorithm : kAlgorithms) {
    SCOPED_TRACE(name_of(algorithm));
    Matrix<S> y(x.rows(), x.cols());
    blockattn::softmax(x, y, algorithm);
    Matrix<S> in_place = x;
    blockattn::softmax(in_place, in_place, algorithm);
    expect_bitwise(in_place, y, "in place");
  }
}

// --- against the long double reference ----------------------------------------------------------

template <class S, class Y>
void expect_matches_reference(const Matrix<S>& x, const Matrix<Y>& y, Real rel) {
  const Matrix<Real> expected =
      blockattn::reference::softmax<Real>(widen_matrix(x).template cast<Real>());
  for (Index i = 0; i < x.rows(); ++i) {
    for (Index j = 0; j < x.cols(); ++j) {
      const Real p = expected(i, j);
      const Real got = static_cast<Real>(static_cast<float>(y(i, j)));
      if (std::isnan(p)) {
        ASSERT_TRUE(std::isnan(got)) << "at (" << i << ", " << j << ")";
        continue;
      }
      ASSERT_LE(std::fabs(got - p), rel * p + underflow_error<Y>())
          << "at (" << i << ", " << j << "), expected " << static_cast<double>(p) << " got "
          << static_cast<double>(got);
    }
  }
}

TYPED_TEST(Softmax16Test, MatchesTheLongDoubleReferenceWithinOneRoundingOfTheFormat) {
  using S = TypeParam;
  auto rng = make_rng(1603);
  for (const Index n : lengths()) {
    const Matrix<S> x = test_rows<S>(rng, n, -8.0, 8.0, /*specials=*/true);
    for (const SoftmaxAlgorithm algorithm : kAlgorithms) {
      SCOPED_TRACE(std::string(format_name<S>()) + " " + name_of(algorithm) +
                   " n=" + std::to_string(n) + " " + seed_trace());
      Matrix<S> y(x.rows(), n);
      Matrix<float> y_float(x.rows(), n);
      blockattn::softmax(x, y, algorithm);
      blockattn::softmax(x, y_float, algorithm);
      // Naive gives NaN for +inf and overflows on the ±1e4 row by design (SoftmaxAlgorithm::Naive):
      // compare the other rows.
      const Index rows = algorithm == SoftmaxAlgorithm::Naive ? 5 : x.rows();
      expect_matches_reference<S>(x.topRows(rows), Matrix<S>(y.topRows(rows)),
                                  format_tolerance<S>(algorithm, n));
      expect_matches_reference<S>(x.topRows(rows), Matrix<float>(y_float.topRows(rows)),
                                  float_tolerance(algorithm, n));
    }
  }
}

TYPED_TEST(Softmax16Test, SpecialValuesFollowTheFloatRules) {
  using S = TypeParam;
  const Index n = 37;
  auto rng = make_rng(1604);
  const Matrix<S> x = test_rows<S>(rng, n, -3.0, 3.0, /*specials=*/true);
  for (const SoftmaxAlgorithm algorithm : {SoftmaxAlgorithm::Safe, SoftmaxAlgorithm::Online}) {
    SCOPED_TRACE(name_of(algorithm));
    Matrix<S> y(x.rows(), n);
    blockattn::softmax(x, y, algorithm);
    for (Index j = 0; j < n; j += 3) EXPECT_EQ(static_cast<float>(y(2, j)), 0.0f) << j;
    for (Index j = 0; j < n; ++j) {
      EXPECT_EQ(static_cast<float>(y(3, j)), 0.0f) << "all −inf row, j=" << j;
      EXPECT_TRUE(std::isnan(static_cast<float>(y(4, j)))) << "NaN row, j=" << j;
      const float expected_inf_share = j == 0 || j == n - 1 ? 0.5f : 0.0f;
      EXPECT_EQ(static_cast<float>(y(5, j)), expected_inf_share) << "+inf row, j=" << j;
      EXPECT_TRUE(std::isfinite(static_cast<float>(y(6, j)))) << "±1e4 row, j=" << j;
    }
  }
}

// --- OnlineSoftmax ------------------------------------------------------------------------------

TYPED_TEST(Softmax16Test, OnlineSoftmaxOfA16BitRowIsTheStateOfItsWidenedRow) {
  using S = TypeParam;
  auto rng = make_rng(1605);
  for (const Index n : lengths()) {
    const Matrix<S> x = test_rows<S>(rng, n, -8.0, 8.0, /*specials=*/true);
    const Matrix<float> wide = widen_matrix(x);
    for (Index i = 0; i < x.rows(); ++i) {
      SCOPED_TRACE(std::string(format_name<S>()) + " n=" + std::to_string(n) +
                   " row=" + std::to_string(i) + " " + seed_trace());
      OnlineSoftmax<float> expected;
      expected.update(wide.row(i).data(), n);
      OnlineSoftmax<float> from_pointer;
      OnlineSoftmax<float> from_row;
      OnlineSoftmax<float> from_vector;
      const RowVector<S> vector = x.row(i);
      Eigen::internal::set_is_malloc_allowed(false);
      from_pointer.update(x.row(i).data(), n);
      from_row.update(x.row(i));
      from_vector.update(vector);
      Eigen::internal::set_is_malloc_allowed(true);
      for (const OnlineSoftmax<float>* got : {&from_pointer, &from_row, &from_vector}) {
        EXPECT_EQ(bits_of(got->max), bits_of(expected.max));
        EXPECT_EQ(bits_of(got->sum), bits_of(expected.sum));
      }
    }
  }
}

TYPED_TEST(Softmax16Test, OnlineSoftmaxMergeOf16BitHalvesIsCommutativeAssociativeAndExact) {
  using S = TypeParam;
  auto rng = make_rng(1606);
  for (const Index n : {Index(3), Index(40), Index(301), Index(2 * 4096 + 5)}) {
    const Matrix<S> x = random_matrix<S>(rng, 1, n, -20.0, 20.0);
    SCOPED_TRACE(std::string(format_name<S>()) + " n=" + std::to_string(n) + " " + seed_trace());
    const Index a = n / 3;
    const Index b = n / 2;
    OnlineSoftmax<float> p, q, r;
    p.update(x.data(), a);
    q.update(x.data() + a, b - a);
    r.update(x.data() + b, n - b);
    OnlineSoftmax<float> pq = p, qp = q;
    pq.merge(q);
    qp.merge(p);
    // Commutative bitwise (merge_row's sum is commutative even where FMA contracts).
    EXPECT_EQ(bits_of(pq.max), bits_of(qp.max));
    EXPECT_EQ(bits_of(pq.sum), bits_of(qp.sum));
    OnlineSoftmax<float> left = pq, right = q;
    left.merge(r);
    right.merge(r);
    OnlineSoftmax<float> assoc = p;
    assoc.merge(right);
    // Associative up to rounding; both equal the whole row's state within the float bound.
    OnlineSoftmax<float> whole;
    whole.update(x.data(), n);
    EXPECT_EQ(left.max, whole.max);
    EXPECT_EQ(assoc.max, whole.max);
    Real exact = 0;
    for (Index j = 0; j < n; ++j) {
      exact +=
          std::exp(static_cast<Real>(static_cast<float>(x(0, j))) - static_cast<Real>(whole.max));
    }
    // Each part's sum: the Online bound; two merges add (kExpError + 2)·u each.
    const Real tol =
        float_tolerance(SoftmaxAlgorithm::Online, n) + 2 * (kExpError + 2) * u<float>();
    for (const OnlineSoftmax<float>* s : {&left, &assoc, &whole}) {
      EXPECT_LE(std::fabs(static_cast<Real>(s->sum) - exact), tol * exact);
    }
    // The empty state is the identity; a single 16-bit value converts exactly.
    OnlineSoftmax<float> with_empty = whole;
    with_empty.merge(OnlineSoftmax<float>{});
    EXPECT_EQ(bits_of(with_empty.sum), bits_of(whole.sum));
    OnlineSoftmax<float> one, one_wide;
    one.update(x(0, 0));
    one_wide.update(static_cast<float>(x(0, 0)));
    EXPECT_EQ(bits_of(one.max), bits_of(one_wide.max));
    EXPECT_EQ(bits_of(one.sum), bits_of(one_wide.sum));
  }
}

TYPED_TEST(Softmax16Test, OnlineSoftmaxSpecialValues) {
  using S = TypeParam;
  const S ninf = -inf_of<S>();
  std::vector<S> all_ninf(19, ninf);
  OnlineSoftmax<float> state;
  state.update(all_ninf.data(), static_cast<Index>(all_ninf.size()));
  EXPECT_EQ(state.max, -std::numeric_limits<float>::infinity());
  EXPECT_EQ(state.sum, 0.0f);
  EXPECT_EQ(state.log_sum_exp(), -std::numeric_limits<float>::infinity());
  std::vector<S> with_nan(19, S(1.0f));
  with_nan[11] = nan_of<S>();
  OnlineSoftmax<float> nan_state;
  nan_state.update(with_nan.data(), static_cast<Index>(with_nan.size()));
  EXPECT_TRUE(std::isnan(nan_state.log_sum_exp()));
}

// --- softmax_topk -------------------------------------------------------------------------------

TYPED_TEST(Softmax16Test, TopKIndicesAndValuesAreThoseOfTheWidenedRow) {
  using S = TypeParam;
  auto rng = make_rng(1607);
  for (const Index n : lengths()) {
    // A narrow range: bfloat16 rows then hold many equal values, so ties are exercised.
    const Matrix<S> x = test_rows<S>(rng, n, -2.0, 2.0, /*specials=*/true);
    const Matrix<float> wide = widen_matrix(x);
    // k > n (a full sort, O(n·k) insertions) only while n is small: the test must stay fast.
    for (const Index k : {Index(1), Index(5), Index(64), n <= 600 ? n + 3 : Index(300)}) {
      for (Index i = 0; i < x.rows(); ++i) {
        SCOPED_TRACE(std::string(format_name<S>()) + " n=" + std::to_string(n) +
                     " k=" + std::to_string(k) + " row=" + std::to_string(i) + " " + seed_trace());
        const Index kept = std::min(k, n);
        RowVector<float> expected_values(kept);
        RowVector<Index> expected_indices(kept);
        ASSERT_EQ(blockattn::softmax_topk(wide.row(i), k, expected_values, expected_indices), kept);
        RowVector<S> values(kept);
        RowVector<float> float_values(kept);
        RowVector<Index> indices(kept);
        RowVector<Index> float_indices(kept);
        Eigen::internal::set_is_malloc_allowed(false);
        ASSERT_EQ(blockattn::softmax_topk(x.row(i), k, values, indices), kept);
        ASSERT_EQ(blockattn::softmax_topk(x.row(i), k, float_values, float_indices), kept);
        Eigen::internal::set_is_malloc_allowed(true);
        EXPECT_EQ(indices, expected_indices);
        EXPECT_EQ(float_indices, expected_indices);
        expect_bitwise(Matrix<float>(float_values), Matrix<float>(expected_values), "float values");
        expect_bitwise(Matrix<S>(values), round_matrix<S>(expected_values), "16-bit values");
        // The Span form, 16-bit and float values.
        std::vector<S> span_values(static_cast<std::size_t>(kept));
        std::vector<float> span_float_values(static_cast<std::size_t>(kept));
        std::vector<Index> span_indices(static_cast<std::size_t>(kept));
        const blockattn::Span<const S> row(x.row(i).data(), n);
        ASSERT_EQ(blockattn::softmax_topk(row, k, blockattn::Span(span_values),
                                          blockattn::Span(span_indices)),
                  kept);
        EXPECT_EQ(RowVector<Index>::Map(span_indices.data(), kept), expected_indices);
        expect_bitwise(Matrix<S>(RowVector<S>::Map(span_values.data(), kept)), Matrix<S>(values),
                       "Span form");
        blockattn::softmax_topk(row, k, blockattn::Span(span_float_values),
                                blockattn::Span(span_indices));
        expect_bitwise(Matrix<float>(RowVector<float>::Map(span_float_values.data(), kept)),
                       Matrix<float>(float_values), "Span form, float values");
      }
    }
  }
}

TYPED_TEST(Softmax16Test, TopKMatchesTheReferenceTiesByLowerIndex) {
  using S = TypeParam;
  auto rng = make_rng(1608);
  for (const Index n : {Index(1), Index(17), Index(130), Index(4097)}) {
    const Matrix<S> x = random_matrix<S>(rng, 1, n, -1.0, 1.0);  // many exact ties in bfloat16
    const RowVector<Real> x_real = widen_matrix(x).template cast<Real>();
    for (const Index k : {Index(1), Index(7), Index(40)}) {
      SCOPED_TRACE(std::string(format_name<S>()) + " n=" + std::to_string(n) +
                   " k=" + std::to_string(k) + " " + seed_trace());
      RowVector<Real> expected_values;
      RowVector<Index> expected_indices;
      blockattn::reference::softmax_topk<Real>(x_real, k, expected_values, expected_indices);
      const Index kept = expected_indices.size();
      RowVector<S> values(kept);
      RowVector<Index> indices(kept);
      ASSERT_EQ(blockattn::softmax_topk(x.row(0), k, values, indices), kept);
      EXPECT_EQ(indices, expected_indices);
      const Real tol = format_tolerance<S>(SoftmaxAlgorithm::Online, n);
      for (Index t = 0; t < kept; ++t) {
        const Real p = expected_values(t);
        EXPECT_LE(std::fabs(static_cast<Real>(static_cast<float>(values(t))) - p),
                  tol * p + underflow_error<S>())
            << "t=" << t;
      }
    }
  }
}

// --- merge_attention_states
// -----------------------------------------------------------------------
//
// The merge is the online-softmax ⊕ on outputs: 16-bit outputs with float lse, merged in float,
// rounded once. Parts hold random outputs of the format (or float) and lse in [−6, 6]; some rows
// of some parts are empty (lse −inf, out junk).

/// N parts of n_q × d_v outputs of P with float lse; part p's row i is empty when (i + p) % 5 == 4.
template <class P>
struct Parts {
  std::vector<Matrix<P>> out;
  std::vector<std::vector<float>> lse;

  Parts(std::mt19937_64& rng, Index count, Index n_q, Index d_v) {
    std::uniform_real_distribution<double> lse_dist(-6.0, 6.0);
    for (Index p = 0; p < count; ++p) {
      out.push_back(random_matrix<P>(rng, n_q, d_v, -3.0, 3.0));
      std::vector<float> l(static_cast<std::size_t>(n_q));
      for (Index i = 0; i < n_q; ++i) {
        l[static_cast<std::size_t>(i)] =
            (i + p) % 5 == 4 ? -std::numeric_limits<float>::infinity()
                             : static_cast<float>(std::round(lse_dist(rng) * 64) / 64);
        if ((i + p) % 5 == 4) out.back().row(i).setConstant(nan_of<P>());  // never read
      }
      lse.push_back(std::move(l));
    }
  }

  template <class Q = P>
  std::vector<blockattn::AttentionState<Q>> states(const std::vector<Matrix<Q>>& outs) const {
    std::vector<blockattn::AttentionState<Q>> s;
    for (std::size_t p = 0; p < outs.size(); ++p) {
      s.push_back({blockattn::ConstMatrixView<Q>(outs[p]), blockattn::Span<const float>(lse[p])});
    }
    return s;
  }

  std::vector<Matrix<float>> widened() const {
    std::vector<Matrix<float>> w;
    for (const auto& o : out) w.push_back(widen_matrix(o));
    return w;
  }
};

TYPED_TEST(Softmax16Test, MergeIsTheRoundedFloatMergeBitwise) {
  using S = TypeParam;
  auto rng = make_rng(1609);
  for (const Index d_v : {Index(1), Index(7), Index(64), Index(256), Index(300), Index(600)}) {
    for (const Index count : {Index(1), Index(2), Index(5)}) {
      SCOPED_TRACE(std::string(format_name<S>()) + " d_v=" + std::to_string(d_v) +
                   " parts=" + std::to_string(count) + " " + seed_trace());
      const Index n_q = 11;
      Parts<S> parts(rng, count, n_q, d_v);
      const std::vector<Matrix<float>> wide = parts.widened();
      Matrix<float> expected(n_q, d_v);
      std::vector<float> expected_lse(static_cast<std::size_t>(n_q));
      blockattn::merge_attention_states(parts.states(wide), expected,
                                        blockattn::Span<float>(expected_lse));
      const auto states = parts.states(parts.out);
      Matrix<S> out(n_q, d_v);
      Matrix<float> out_float(n_q, d_v);
      std::vector<float> lse(static_cast<std::size_t>(n_q));
      std::vector<float> lse_float(static_cast<std::size_t>(n_q));
      Eigen::internal::set_is_malloc_allowed(false);
      blockattn::merge_attention_states(states, out, blockattn::Span<float>(lse), /*threads=*/1);
      blockattn::merge_attention_states(states, out_float, blockattn::Span<float>(lse_float), 1);
      Eigen::internal::set_is_malloc_allowed(true);
      expect_bitwise(out, round_matrix<S>(expected), "16-bit out");
      expect_bitwise(out_float, expected, "float out of 16-bit parts");
      EXPECT_EQ(lse, expected_lse);
      EXPECT_EQ(lse_float, expected_lse);
      // Float parts into a 16-bit out: the same bits again.
      Matrix<S> out_of_float(n_q, d_v);
      blockattn::merge_attention_states(parts.states(wide), out_of_float);
      expect_bitwise(out_of_float, out, "16-bit out of float parts");
      // Any thread count, bitwise (rows are independent; once per d_v: team changes are slow on
      // the loaded 2-core CI machine).
      if (count != 5) continue;
      for (const int threads : {0, 2, 3}) {
        Matrix<S> threaded(n_q, d_v);
        blockattn::merge_attention_states(states, threaded, {}, threads);
        expect_bitwise(threaded, out, "threads=" + std::to_string(threads));
      }
    }
  }
}

TYPED_TEST(Softmax16Test, MergeMatchesTheLongDoubleFormula) {
  using S = TypeParam;
  auto rng = make_rng(1610);
  const Index n_q = 9;
  for (const Index d_v : {Index(5), Index(64), Index(300)}) {
    const Index count = 4;
    SCOPED_TRACE(std::string(format_name<S>()) + " d_v=" + std::to_string(d_v) + " " +
                 seed_trace());
    Parts<S> parts(rng, count, n_q, d_v);
    Matrix<S> out(n_q, d_v);
    std::vector<float> lse(static_cast<std::size_t>(n_q));
    blockattn::merge_attention_states(parts.states(parts.out), out, blockattn::Span<float>(lse));
    // A double output merges the 16-bit parts in double (lse float, widened): within the float
    // bound below as well.
    Matrix<double> out_double(n_q, d_v);
    blockattn::merge_attention_states(parts.states(parts.out), out_double);
    // Tolerance. Every merge step (N − 1 of them) takes α, β from exp (glibc, <= 2u_f relative),
    // multiplies (u_f) and adds (u_f), and the normalisation divides by l (one more sum, one
    // division): the float result is within (4N + 8)·u_f·max_p|out_p| of the exact convex
    // combination; the 16-bit output adds u_S·|out|. lse = m + log l: log l carries l's relative
    // error (4N + 8)·u_f absolutely, the sum one rounding u_f·|lse|.
    const Real n_parts = static_cast<Real>(count);
    for (Index i = 0; i < n_q; ++i) {
      Real m = -std::numeric_limits<Real>::infinity();
      for (Index p = 0; p < count; ++p) {
        m = std::max(m, static_cast<Real>(
                            parts.lse[static_cast<std::size_t>(p)][static_cast<std::size_t>(i)]));
      }
      Real l = 0;
      Real max_out = 0;
      for (Index p = 0; p < count; ++p) {
        const Real lp =
            static_cast<Real>(parts.lse[static_cast<std::size_t>(p)][static_cast<std::size_t>(i)]);
        if (std::isinf(lp)) continue;
        l += std::exp(lp - m);
        for (Index c = 0; c < d_v; ++c) {
          max_out = std::max(max_out, std::fabs(static_cast<Real>(static_cast<float>(
                                          parts.out[static_cast<std::size_t>(p)](i, c)))));
        }
      }
      const Real lse_expected = m + std::log(l);
      EXPECT_LE(std::fabs(static_cast<Real>(lse[static_cast<std::size_t>(i)]) - lse_expected),
                (4 * n_parts + 8) * u<float>() + u<float>() * std::fabs(lse_expected))
          << "row " << i;
      for (Index c = 0; c < d_v; ++c) {
        Real expected = 0;
        for (Index p = 0; p < count; ++p) {
          const Real lp = static_cast<Real>(
              parts.lse[static_cast<std::size_t>(p)][static_cast<std::size_t>(i)]);
          if (std::isinf(lp)) continue;
          expected +=
              std::exp(lp - m) *
              static_cast<Real>(static_cast<float>(parts.out[static_cast<std::size_t>(p)](i, c)));
        }
        expected /= l;
        const Real tol =
            (4 * n_parts + 8) * u<float>() * max_out +
            format_u<S>() * (std::fabs(expected) + (4 * n_parts + 8) * u<float>() * max_out);
        ASSERT_LE(std::fabs(static_cast<Real>(static_cast<float>(out(i, c))) - expected), tol)
            << "at (" << i << ", " << c << ")";
        ASSERT_LE(std::fabs(static_cast<Real>(out_double(i, c)) - expected),
                  (4 * n_parts + 8) * u<float>() * max_out)
            << "double out at (" << i << ", " << c << ")";
      }
    }
  }
}

TYPED_TEST(Softmax16Test, MergeSpecialValuesAliasingAndTheTensorForm) {
  using S = TypeParam;
  auto rng = make_rng(1611);
  const Index n_q = 6;
  const Index d_v = 300;  // two column blocks of the float accumulator
  Parts<S> parts(rng, 3, n_q, d_v);
  // Row 0: every part empty → out 0, lse −inf. Row 1: a NaN lse → NaN row. Row 2: a NaN in one
  // part's out whose weight underflows to 0 → still reaches the row.
  for (auto& l : parts.lse) l[0] = -std::numeric_limits<float>::infinity();
  parts.lse[1][1] = std::numeric_limits<float>::quiet_NaN();
  parts.lse[0][2] = 0.0f;
  parts.lse[1][2] = -200.0f;
  parts.lse[2][2] = 1.0f;
  parts.out[2].row(2) = parts.out[0].row(2);  // part 2's row 2 was empty junk
  parts.out[1](2, 5) = nan_of<S>();
  parts.out[1](2, 280) = nan_of<S>();
  Matrix<S> out(n_q, d_v);
  std::vector<float> lse(static_cast<std::size_t>(n_q));
  blockattn::merge_attention_states(parts.states(parts.out), out, blockattn::Span<float>(lse));
  const Matrix<float> wide_out = widen_matrix(out);
  EXPECT_TRUE(wide_out.row(0).isZero(0));
  EXPECT_EQ(lse[0], -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(wide_out.row(1).array().isNaN().all());
  EXPECT_TRUE(std::isnan(lse[1]));
  EXPECT_TRUE(std::isnan(wide_out(2, 5)));
  EXPECT_TRUE(std::isnan(wide_out(2, 280)));
  EXPECT_TRUE(std::isfinite(wide_out(2, 6)));
  // In place: out is exactly part 1's out and lse part 1's lse (read by both column blocks before
  // it is written): the same bits.
  Parts<S> finite_parts(rng, 3, n_q, d_v);
  Matrix<S> merged(n_q, d_v);
  std::vector<float> merged_lse(static_cast<std::size_t>(n_q));
  blockattn::merge_attention_states(finite_parts.states(finite_parts.out), merged,
                                    blockattn::Span<float>(merged_lse));
  auto states = finite_parts.states(finite_parts.out);
  blockattn::merge_attention_states(states, finite_parts.out[1],
                                    blockattn::Span<float>(finite_parts.lse[1]));
  expect_bitwise(finite_parts.out[1], merged, "in place");
  EXPECT_EQ(finite_parts.lse[1], merged_lse);
  // The two-part form.
  Parts<S> two(rng, 2, n_q, 40);
  Matrix<S> pair(n_q, 40);
  Matrix<S> pair_n(n_q, 40);
  blockattn::merge_attention_states(two.out[0], blockattn::Span<const float>(two.lse[0]),
                                    two.out[1], blockattn::Span<const float>(two.lse[1]), pair);
  blockattn::merge_attention_states(two.states(two.out), pair_n);
  expect_bitwise(pair, pair_n, "two-part form");
  // The tensor form [batch 2, n_q 3, heads 2, d_v 5]: each (b, h) slice is the single-head merge.
  const Index batch = 2, heads = 2, seq = 3, dim = 5;
  std::vector<Matrix<S>> tensors;
  std::vector<std::vector<float>> tensor_lse;
  for (int p = 0; p < 3; ++p) {
    tensors.push_back(random_matrix<S>(rng, batch * seq, heads * dim, -2.0, 2.0));
    std::vector<float> l(static_cast<std::size_t>(batch * heads * seq));
    for (auto& x : l)
      x = static_cast<float>(std::uniform_int_distribution<int>(-256, 256)(rng)) / 64;
    tensor_lse.push_back(std::move(l));
  }
  std::vector<blockattn::TensorAttentionState<S>> tensor_states;
  for (int p = 0; p < 3; ++p) {
    tensor_states.push_back(
        {blockattn::make_tensor_view(
             static_cast<const S*>(tensors[static_cast<std::size_t>(p)].data()), batch, seq, heads,
             dim),
         blockattn::Span<const float>(tensor_lse[static_cast<std::size_t>(p)])});
  }
  Matrix<S> tensor_out(batch * seq, heads * dim);
  std::vector<float> tensor_out_lse(static_cast<std::size_t>(batch * heads * seq));
  blockattn::merge_attention_states(
      tensor_states, blockattn::make_tensor_view(tensor_out.data(), batch, seq, heads, dim),
      blockattn::Span<float>(tensor_out_lse), /*threads=*/2);
  for (Index b = 0; b < batch; ++b) {
    for (Index h = 0; h < heads; ++h) {
      std::vector<Matrix<S>> slices;
      std::vector<std::vector<float>> slice_lse;
      for (int p = 0; p < 3; ++p) {
        slices.push_back(tensors[static_cast<std::size_t>(p)].block(b * seq, h * dim, seq, dim));
        const auto* begin = tensor_lse[static_cast<std::size_t>(p)].data() + (b * heads + h) * seq;
        slice_lse.emplace_back(begin, begin + seq);
      }
      std::vector<blockattn::AttentionState<S>> slice_states;
      for (int p = 0; p < 3; ++p) {
        slice_states.push_back(
            {blockattn::ConstMatrixView<S>(slices[static_cast<std::size_t>(p)]),
             blockattn::Span<const float>(slice_lse[static_cast<std::size_t>(p)])});
      }
      Matrix<S> single(seq, dim);
      blockattn::merge_attention_states(slice_states, single);
      expect_bitwise(Matrix<S>(tensor_out.block(b * seq, h * dim, seq, dim)), single,
                     "tensor slice");
    }
  }
}

// --- validation ---------------------------------------------------------------------------------

TYPED_TEST(Softmax16Test, BadArgumentsThrowNamingTheArgumentAndWriteNothing) {
  using S = TypeParam;
  Matrix<S> x = Matrix<S>::Constant(3, 5, S(0.5f));
  Matrix<S> y = Matrix<S>::Constant(4, 5, nan_of<S>());
  EXPECT_THAT([&] { blockattn::softmax(x, y); },
              ThrowsMessage<std::invalid_argument>(AllOf(HasSubstr("blockattn::softmax"),
                                                         HasSubstr("y.rows() is 4"),
                                                         HasSubstr("x.rows() is 3"))));
  EXPECT_TRUE(widen_matrix(y).array().isNaN().all());
  // A float output over the 16-bit input's own memory: overlap, not in place.
  Matrix<float> backing(3, 5);
  auto* as_16 = reinterpret_cast<S*>(backing.data());
  EXPECT_THAT([&] { blockattn::softmax(as_16, 6, backing.data()); },
              ThrowsMessage<std::invalid_argument>(HasSubstr("y overlaps the memory of x")));
  RowVector<S> row = RowVector<S>::Constant(6, S(1.0f));
  RowVector<float> values(2);
  RowVector<Index> indices(3);
  EXPECT_THAT([&] { blockattn::softmax_topk(row, 3, values, indices); },
              ThrowsMessage<std::invalid_argument>(
                  HasSubstr("values.size() is 2 but min(k, x.size()) is 3")));
  OnlineSoftmax<float> state;
  EXPECT_THAT([&] { state.update(row.data(), -1); },
              ThrowsMessage<std::invalid_argument>(HasSubstr("n is -1")));
  // merge_attention_states with a 16-bit out: a part of the wrong width, a short lse; out keeps
  // its NaN sentinel.
  const Matrix<S> a = Matrix<S>::Constant(3, 4, S(1.0f));
  const Matrix<S> b = Matrix<S>::Constant(3, 5, S(1.0f));
  const std::vector<float> lse3(3, 0.0f);
  const std::vector<float> lse2(2, 0.0f);
  Matrix<S> out = Matrix<S>::Constant(3, 4, nan_of<S>());
  const auto merge = [&](const Matrix<S>& second, const std::vector<float>& second_lse) {
    const std::vector<blockattn::AttentionState<S>> parts = {
        {blockattn::ConstMatrixView<S>(a), blockattn::Span<const float>(lse3)},
        {blockattn::ConstMatrixView<S>(second), blockattn::Span<const float>(second_lse)}};
    blockattn::merge_attention_states(parts, out);
  };
  EXPECT_THAT([&] { merge(b, lse3); },
              ThrowsMessage<std::invalid_argument>(AllOf(
                  HasSubstr("blockattn::merge_attention_states"),
                  HasSubstr("parts[1].out.cols() is 5"), HasSubstr("parts[0].out.cols() is 4"))));
  EXPECT_THAT([&] { merge(a, lse2); },
              ThrowsMessage<std::invalid_argument>(HasSubstr("parts[1].lse.size() is 2")));
  EXPECT_TRUE(widen_matrix(out).array().isNaN().all());
}

}  // namespace

}  // namespace softmax_16bit_test
