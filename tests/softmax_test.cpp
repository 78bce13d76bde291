// softmax.hpp: the three softmax algorithms, the OnlineSoftmax state and its merge, and the fused
// softmax + top-k, against blockattn::reference evaluated in long double on the same inputs.
//
// This file also proves the "no allocation per call" contract: Eigen's runtime malloc check is
// on, and the calls on row-major views run with set_is_malloc_allowed(false).

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <blockattn/reference.hpp>
#include <blockattn/softmax.hpp>

#include "../bench/support/softmax_topk_unfused.hpp"
#include "support/random.hpp"
#include "support/requires_assertions.hpp"
#include "support/requires_malloc_guard.hpp"
#include "support/scalar_types.hpp"
#include "support/softmax_tolerance.hpp"
#include "support/tolerance.hpp"

namespace softmax_test {
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
using blockattn::test::online_tolerance;
using blockattn::test::random_matrix;
using blockattn::test::seed_trace;
using blockattn::test::tolerance_for;
using blockattn::test::two_pass_tolerance;
using blockattn::test::u;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

using Real = long double;

// Lengths around every SIMD width in use (2, 4, 8, 16 lanes, unrolled 4×), primes, and n = 1.
const std::vector<Index> kLengths = {1,  2,  3,  4,  5,  7,  8,   9,   13,  15,  16,  17,  31,
                                     32, 33, 63, 64, 65, 97, 127, 128, 129, 255, 257, 511, 512};

// Lengths around the online kernel's tile (16 KiB): one tile ± 1, several tiles and a partial
// one. Larger than the n ≤ 512 of the other tests because the tile boundary is the code path.
template <class T>
std::vector<Index> tile_lengths() {
  const Index tile = blockattn::detail::softmax_kernel::kTile<T>;
  return {tile - 1, tile, tile + 1, 2 * tile, 3 * tile + 37};
}

template <class T>
std::vector<Index> all_lengths() {
  std::vector<Index> lengths = kLengths;
  for (const Index n : tile_lengths<T>()) lengths.push_back(n);
  return lengths;
}

// --- tolerances ---------------------------------------------------------------------------------
//
// kExpError, u, two_pass_tolerance (Naive, Safe), online_tolerance and tolerance_for are derived
// in support/softmax_tolerance.hpp.

// OnlineSoftmax::update(x), one value at a time: every term can be rescaled once per later
// increase of the max, at most n times, each with (kExpError + 1)·u. Worst case, not typical.
template <class T>
Real scalar_update_tolerance(Index n) {
  return two_pass_tolerance<T>(n) + static_cast<Real>(n) * (kExpError + 1) * u<T>();
}

// Where exp(x − m) or the probability falls below the smallest normal number the kernels produce
// a denormal (simd_exp rounds those correctly, and so do the products), whose error is absolute
// — a denormal ulp per rounding, a few denorm_min() — not relative. min() bounds it with room to
// spare and is far below any probability a masking or indexing bug would disturb.
template <class T>
Real underflow_error() {
  return static_cast<Real>(std::numeric_limits<T>::min());
}

// --- helpers ----------------------------------------------------------------------------------

template <class T>
Matrix<T> nan_matrix(Index rows, Index cols) {
  return Matrix<T>::Constant(rows, cols, std::numeric_limits<T>::quiet_NaN());
}

template <class T>
bool all_nan(const Matrix<T>& m) {
  return m.array().isNaN().all();
}

// Expects y ≈ reference softmax of x (long double) elementwise within rel·p + underflow_error.
template <class T>
void expect_matches_reference(const Matrix<T>& x, const Matrix<T>& y, Real rel) {
  const Matrix<Real> expected = blockattn::reference::softmax<Real>(x.template cast<Real>());
  for (Index i = 0; i < x.rows(); ++i) {
    for (Index j = 0; j < x.cols(); ++j) {
      const Real p = expected(i, j);
      const Real got = static_cast<Real>(y(i, j));
      ASSERT_LE(std::fabs(got - p), rel * p + underflow_error<T>())
          << "at (" << i << ", " << j << "), expected " << static_cast<double>(p) << " got "
          << static_cast<double>(got);
    }
  }
}

// Σ exp(x − max x) in long double: the exact OnlineSoftmax sum of finite x.
template <class T>
Real exact_sum(const T* x, Index n, T m) {
  Real sum = 0;
  for (Index j = 0; j < n; ++j) sum += std::exp(static_cast<Real>(x[j]) - static_cast<Real>(m));
  return sum;
}

template <class T>
class SoftmaxTest : public ::testing::Test {};
TYPED_TEST_SUITE(SoftmaxTest, blockattn::test::Scalars, );

// --- the exp kernel ---------------------------------------------------------------------------

TYPED_TEST(SoftmaxTest, ExpKernelIsWithinItsStatedBound) {
  using T = TypeParam;
  // Arguments that are the differences x − m the kernels see: [log(min), 0], on a fine grid
  // (below log(min) the results are denormals: underflow_error).
  const T lo = std::log(std::numeric_limits<T>::min());
  const Index n = 4099;
  Matrix<T> x(1, n);
  for (Index j = 0; j < n; ++j) x(0, j) = lo * static_cast<T>(j) / static_cast<T>(n - 1);
  x(0, 0) = T(0);  // the max, so that origin = 0 and y_j = exp(x_j)·(1/l)
  // sum_exp and write_scaled_exp with origin 0 and scale 1 give exp(x_j) itself.
  Matrix<T> y(1, n);
  blockattn::detail::softmax_kernel::write_scaled_exp(x.data(), n, T(0), T(1), y.data());
  Real worst = 0;
  for (Index j = 0; j < n; ++j) {
    const Real e = std::exp(static_cast<Real>(x(0, j)));
    if (e < static_cast<Real>(std::numeric_limits<T>::min())) continue;
    worst = std::max(worst, std::fabs(static_cast<Real>(y(0, j)) - e) / e / u<T>());
  }
  EXPECT_LE(worst, kExpError) << "worst relative error of exp, in units of u";
  ::testing::Test::RecordProperty("worst_exp_error_in_u",
                                  std::to_string(static_cast<double>(worst)));
}

// --- softmax against the reference -------------------------------------------------------------

TYPED_TEST(SoftmaxTest, MatchesLongDoubleReferenceForEveryAlgorithmAndLength) {
  using T = TypeParam;
  auto rng = make_rng(1);
  for (const Index n : all_lengths<T>()) {
    const Matrix<T> x = random_matrix<T>(rng, 3, n, -8.0, 8.0);
    for (const SoftmaxAlgorithm algorithm : kAlgorithms) {
      SCOPED_TRACE(std::string(name_of(algorithm)) + " n=" + std::to_string(n) + " " +
                   seed_trace());
      Matrix<T> y = nan_matrix<T>(3, n);
      {
        Eigen::internal::set_is_malloc_allowed(false);
        blockattn::softmax(x, y, algorithm);  // the non-template float/double overload
        Eigen::internal::set_is_malloc_allowed(true);
      }
      expect_matches_reference(x, y, tolerance_for<T>(algorithm, n));
      // The template called with T spelled out gives the same bits.
      Matrix<T> y_template = nan_matrix<T>(3, n);
      blockattn::softmax(x, y_template, algorithm);
      EXPECT_EQ(y, y_template);
    }
  }
}

TYPED_TEST(SoftmaxTest, RowsSumToOne) {
  using T = TypeParam;
  auto rng = make_rng(2);
  for (const Index n : {Index(1), Index(17), Index(250), Index(512)}) {
    const Matrix<T> x = random_matrix<T>(rng, 4, n, -4.0, 4.0);
    for (const SoftmaxAlgorithm algorithm : kAlgorithms) {
      SCOPED_TRACE(std::string(name_of(algorithm)) + " n=" + std::to_string(n) + " " +
                   seed_trace());
      Matrix<T> y(4, n);
      blockattn::softmax(x, y, algorithm);
      // Σ_j y_j = Σ_j p_j (1 + δ_j) with |δ_j| ≤ tol and Σ p_j = 1: |Σ y − 1| ≤ tol.
      for (Index i = 0; i < 4; ++i) {
        EXPECT_LE(std::fabs(y.row(i).template cast<Real>().sum() - 1),
                  tolerance_for<T>(algorithm, n));
      }
    }
  }
}

TYPED_TEST(SoftmaxTest, StridedViewsReadAndWriteOnlyTheirColumns) {
  using T = TypeParam;
  auto rng = make_rng(3);
  const Index n = 37;
  const Matrix<T> storage = random_matrix<T>(rng, 5, n + 7, -3.0, 3.0);
  Matrix<T> out = nan_matrix<T>(5, n + 9);
  const Matrix<T> x = storage.middleCols(2, n);
  for (const SoftmaxAlgorithm algorithm : kAlgorithms) {
    SCOPED_TRACE(name_of(algorithm));
    out.setConstant(std::numeric_limits<T>::quiet_NaN());
    Eigen::internal::set_is_malloc_allowed(false);
    blockattn::softmax(storage.middleCols(2, n), out.middleCols(4, n), algorithm);
    Eigen::internal::set_is_malloc_allowed(true);
    EXPECT_TRUE(all_nan<T>(out.leftCols(4)));
    EXPECT_TRUE(all_nan<T>(out.rightCols(5)));
    Matrix<T> direct(5, n);
    blockattn::softmax(x, direct, algorithm);
    EXPECT_EQ(Matrix<T>(out.middleCols(4, n)), direct);
  }
}

TYPED_TEST(SoftmaxTest, InPlaceEqualsOutOfPlace) {
  using T = TypeParam;
  auto rng = make_rng(4);
  for (const SoftmaxAlgorithm algorithm : kAlgorithms) {
    SCOPED_TRACE(name_of(algorithm));
    const Matrix<T> x = random_matrix<T>(rng, 3, 70, -5.0, 5.0);
    Matrix<T> y(3, 70);
    blockattn::softmax(x, y, algorithm);
    Matrix<T> in_place = x;
    blockattn::softmax(in_place, in_place, algorithm);
    EXPECT_EQ(in_place, y);
    RowVector<T> row = x.row(1);
    blockattn::softmax(row.data(), row.size(), row.data(), algorithm);
    EXPECT_EQ(row, y.row(1));
  }
}

TYPED_TEST(SoftmaxTest, VectorFormEqualsMatrixForm) {
  using T = TypeParam;
  auto rng = make_rng(5);
  for (const Index n : all_lengths<T>()) {
    const Matrix<T> x = random_matrix<T>(rng, 1, n, -6.0, 6.0);
    for (const SoftmaxAlgorithm algorithm : kAlgorithms) {
      Matrix<T> from_matrix(1, n);
      blockattn::softmax(x, from_matrix, algorithm);
      std::vector<T> from_pointer(static_cast<std::size_t>(n));
      blockattn::softmax(x.data(), n, from_pointer.data(), algorithm);
      for (Index j = 0; j < n; ++j) {
        EXPECT_EQ(from_pointer[static_cast<std::size_t>(j)], from_matrix(0, j))
            << name_of(algorithm) << " n=" << n << " j=" << j;
      }
    }
  }
}

TYPED_TEST(SoftmaxTest, EqualInputsGiveEqualOutputsWherheverTheyAreInTheRow) {
  using T = TypeParam;
  // Every element, tail included, goes through the same exp: the output depends on the value and
  // the row's (max, sum) only, not on the position (lane, unrolled block or padded tail).
  const Index n = 83;
  Matrix<T> x(1, n);
  for (Index j = 0; j < n; ++j) x(0, j) = static_cast<T>(j % 5) / T(4);
  for (const SoftmaxAlgorithm algorithm : kAlgorithms) {
    Matrix<T> y(1, n);
    blockattn::softmax(x, y, algorithm);
    for (Index j = 5; j < n; ++j) EXPECT_EQ(y(0, j), y(0, j % 5)) << name_of(algorithm) << j;
  }
}

// --- special values ---------------------------------------------------------------------------

TYPED_TEST(SoftmaxTest, NegativeInfinityEntriesGetExactlyZero) {
  using T = TypeParam;
  const T ninf = -std::numeric_limits<T>::infinity();
  auto rng = make_rng(6);
  for (const Index n : {Index(2), Index(9), Index(33), Index(130)}) {
    Matrix<T> x = random_matrix<T>(rng, 2, n, -3.0, 3.0);
    for (Index j = 0; j < n; j += 3) x(0, j) = ninf;
    x(1, n - 1) = ninf;
    for (const SoftmaxAlgorithm algorithm : kAlgorithms) {
      SCOPED_TRACE(std::string(name_of(algorithm)) + " n=" + std::to_string(n));
      Matrix<T> y(2, n);
      blockattn::softmax(x, y, algorithm);
      for (Index j = 0; j < n; j += 3) EXPECT_EQ(y(0, j), T(0));
      EXPECT_EQ(y(1, n - 1), T(0));
      expect_matches_reference(x, y, tolerance_for<T>(algorithm, n));
    }
  }
}

TYPED_TEST(SoftmaxTest, RowOfOnlyNegativeInfinityIsAllZeros) {
  using T = TypeParam;
  for (const Index n : {Index(1), Index(3), Index(16), Index(67)}) {
    const Matrix<T> x = Matrix<T>::Constant(2, n, -std::numeric_limits<T>::infinity());
    for (const SoftmaxAlgorithm algorithm : kAlgorithms) {
      Matrix<T> y = nan_matrix<T>(2, n);
      blockattn::softmax(x, y, algorithm);
      EXPECT_EQ(y, Matrix<T>::Zero(2, n)) << name_of(algorithm) << " n=" << n;
    }
  }
}

TYPED_TEST(SoftmaxTest, PositiveInfinityEntriesShareTheProbability) {
  using T = TypeParam;
  const T inf = std::numeric_limits<T>::infinity();
  auto rng = make_rng(7);
  for (const Index n : {Index(1), Index(5), Index(40), Index(101)}) {
    Matrix<T> x = random_matrix<T>(rng, 2, n, -3.0, 3.0);
    x(0, n / 2) = inf;  // row 0: one +inf
    Index count = 0;    // row 1: every third +inf, a −inf too
    for (Index j = 0; j < n; j += 3, ++count) x(1, j) = inf;
    if (n > 1) x(1, 1) = -inf;
    for (const SoftmaxAlgorithm algorithm : {SoftmaxAlgorithm::Safe, SoftmaxAlgorithm::Online}) {
      SCOPED_TRACE(std::string(name_of(algorithm)) + " n=" + std::to_string(n));
      Matrix<T> y(2, n);
      blockattn::softmax(x, y, algorithm);
      for (Index j = 0; j < n; ++j) {
        EXPECT_EQ(y(0, j), j == n / 2 ? T(1) : T(0));
        // 1/c computed as 1·(1/c): exact or one rounding.
        EXPECT_EQ(y(1, j), j % 3 == 0 ? T(1) / static_cast<T>(count) : T(0));
      }
    }
  }
}

TYPED_TEST(SoftmaxTest, NanMakesTheWholeRowNan) {
  using T = TypeParam;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  auto rng = make_rng(8);
  for (const Index n : {Index(1), Index(6), Index(64), Index(99)}) {
    Matrix<T> x = random_matrix<T>(rng, 4, n, -3.0, 3.0);
    x(0, n - 1) = nan;          // last element (the tail)
    x(1, 0) = nan;              // first element
    x.row(2).setConstant(nan);  // all NaN
    x(3, n / 2) = nan;          // NaN next to ±inf
    x(3, 0) = n > 1 ? std::numeric_limits<T>::infinity() : nan;
    for (const SoftmaxAlgorithm algorithm : kAlgorithms) {
      Matrix<T> y(4, n);
      blockattn::softmax(x, y, algorithm);
      EXPECT_TRUE(all_nan<T>(y)) << name_of(algorithm) << " n=" << n << "\n" << y;
    }
  }
}

TYPED_TEST(SoftmaxTest, HugeOffsetsChangeNothingForSafeAndOnline) {
  using T = TypeParam;
  auto rng = make_rng(9);
  for (const Index n : {Index(1), Index(7), Index(64), Index(200)}) {
    const Matrix<T> x = random_matrix<T>(rng, 2, n, -8.0, 8.0);
    for (const T offset : {T(1e4), T(-1e4)}) {
      // x + 1e4 is exact (a multiple of 1/64 below 2^14 fits in 20 bits), and so is every
      // difference the kernels take, so the outputs are bitwise those of the unshifted row.
      const Matrix<T> shifted = (x.array() + offset).matrix();
      for (const SoftmaxAlgorithm algorithm : {SoftmaxAlgorithm::Safe, SoftmaxAlgorithm::Online}) {
        SCOPED_TRACE(std::string(name_of(algorithm)) + " n=" + std::to_string(n) +
                     " offset=" + std::to_string(static_cast<double>(offset)));
        Matrix<T> y(2, n), y_shifted(2, n);
        blockattn::softmax(x, y, algorithm);
        blockattn::softmax(shifted, y_shifted, algorithm);
        EXPECT_EQ(y_shifted, y);
        expect_matches_reference(shifted, y_shifted, tolerance_for<T>(algorithm, n));
      }
    }
  }
}

TYPED_TEST(SoftmaxTest, NaiveOverflowsAsDocumented) {
  using T = TypeParam;
  // Not a wish, a documented limit: exp(1e4) is +inf in float and double.
  Matrix<T> x(1, 3);
  x << T(1e4), T(1e4 + 1), T(1e4 - 1);
  Matrix<T> y(1, 3);
  blockattn::softmax(x, y, SoftmaxAlgorithm::Naive);
  EXPECT_FALSE(y.allFinite());
  blockattn::softmax(x, y, SoftmaxAlgorithm::Safe);
  EXPECT_TRUE(y.allFinite());
}

TYPED_TEST(SoftmaxTest, LengthOneIsOne) {
  using T = TypeParam;
  for (const T value : {T(0), T(-7.5), T(1e4), -std::numeric_limits<T>::max()}) {
    for (const SoftmaxAlgorithm algorithm : {SoftmaxAlgorithm::Safe, SoftmaxAlgorithm::Online}) {
      Matrix<T> x(1, 1), y(1, 1);
      x(0, 0) = value;
      blockattn::softmax(x, y, algorithm);
      EXPECT_EQ(y(0, 0), T(1)) << name_of(algorithm) << " " << value;
    }
  }
}

TYPED_TEST(SoftmaxTest, EmptyShapesAreFine) {
  using T = TypeParam;
  Matrix<T> x(0, 5), y(0, 5);
  EXPECT_NO_THROW(blockattn::softmax(x, y));
  Matrix<T> a(3, 0), b(3, 0);
  EXPECT_NO_THROW(blockattn::softmax(a, b));
  EXPECT_NO_THROW(blockattn::softmax(static_cast<const T*>(nullptr), 0, static_cast<T*>(nullptr)));
}

// --- bad input --------------------------------------------------------------------------------

TYPED_TEST(SoftmaxTest, ShapeMismatchThrowsBeforeWriting) {
  using T = TypeParam;
  const Matrix<T> x = Matrix<T>::Zero(4, 6);
  Matrix<T> wrong_cols = nan_matrix<T>(4, 5);
  EXPECT_THAT([&] { blockattn::softmax(x, wrong_cols); },
              ThrowsMessage<std::invalid_argument>(AllOf(HasSubstr("blockattn::softmax"),
                                                         HasSubstr("y.cols() is 5"),
                                                         HasSubstr("x.cols() is 6"))));
  EXPECT_TRUE(all_nan<T>(wrong_cols));
  Matrix<T> wrong_rows = nan_matrix<T>(3, 6);
  EXPECT_THAT([&] { blockattn::softmax(x, wrong_rows); },
              ThrowsMessage<std::invalid_argument>(
                  AllOf(HasSubstr("y.rows() is 3"), HasSubstr("x.rows() is 4"))));
  EXPECT_TRUE(all_nan<T>(wrong_rows));
}

TYPED_TEST(SoftmaxTest, PartialOverlapThrowsBeforeWriting) {
  using T = TypeParam;
  Matrix<T> storage = nan_matrix<T>(4, 10);
  // y is x shifted by one column: same shape, overlapping, not the same.
  EXPECT_THAT([&] { blockattn::softmax(storage.leftCols(8), storage.middleCols(1, 8)); },
              ThrowsMessage<std::invalid_argument>(AllOf(HasSubstr("y overlaps the memory of x"))));
  // Same data pointer but a different row stride is not "the same" either.
  Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>> squeezed(storage.data(), 4, 5,
                                                          Eigen::OuterStride<>(5));
  EXPECT_THROW(blockattn::softmax(storage.leftCols(5), squeezed), std::invalid_argument);
  std::vector<T> buffer(8, std::numeric_limits<T>::quiet_NaN());
  EXPECT_THROW(blockattn::softmax(buffer.data(), 6, buffer.data() + 1), std::invalid_argument);
  EXPECT_TRUE(all_nan<T>(storage));
  for (const T v : buffer) EXPECT_TRUE(std::isnan(v));
}

TYPED_TEST(SoftmaxTest, BadVectorArgumentsThrow) {
  using T = TypeParam;
  std::vector<T> x(4, T(0)), y(4, T(0));
  EXPECT_THAT([&] { blockattn::softmax(x.data(), -1, y.data()); },
              ThrowsMessage<std::invalid_argument>(HasSubstr("n is -1")));
  EXPECT_THROW(blockattn::softmax(x.data(), 4, static_cast<T*>(nullptr)), std::invalid_argument);
  EXPECT_THAT([&] { blockattn::softmax(x.data(), 4, y.data(), static_cast<SoftmaxAlgorithm>(7)); },
              ThrowsMessage<std::invalid_argument>(HasSubstr("algorithm is 7")));
}

// --- OnlineSoftmax ----------------------------------------------------------------------------

TYPED_TEST(SoftmaxTest, OnlineStateMatchesReferenceScalarAndVectorised) {
  using T = TypeParam;
  auto rng = make_rng(10);
  for (const Index n : all_lengths<T>()) {
    SCOPED_TRACE("n=" + std::to_string(n) + " " + seed_trace());
    const Matrix<T> x = random_matrix<T>(rng, 1, n, -8.0, 8.0);
    OnlineSoftmax<T> scalar;
    for (Index j = 0; j < n; ++j) scalar.update(x(0, j));
    OnlineSoftmax<T> vectorised;
    Eigen::internal::set_is_malloc_allowed(false);
    vectorised.update(x.data(), n);
    OnlineSoftmax<T> from_row;
    from_row.update(x.row(0));  // a row of a row-major matrix binds without a copy
    Eigen::internal::set_is_malloc_allowed(true);
    const T m = x.maxCoeff();
    EXPECT_EQ(scalar.max, m);
    EXPECT_EQ(vectorised.max, m);
    EXPECT_EQ(from_row.max, vectorised.max);
    EXPECT_EQ(from_row.sum, vectorised.sum);
    const Real exact = exact_sum(x.data(), n, m);
    // The sum is the normaliser: its relative error is bounded like the outputs'.
    EXPECT_LE(std::fabs(static_cast<Real>(scalar.sum) - exact),
              scalar_update_tolerance<T>(n) * exact);
    EXPECT_LE(std::fabs(static_cast<Real>(vectorised.sum) - exact), online_tolerance<T>(n) * exact);
    // lse = m + log(l): the absolute error of log(l) is l's relative error, plus the rounding of
    // log and of the sum, u each relative to |lse| (and to |log l| ≤ |lse| + |m|).
    const Real lse = static_cast<Real>(m) + std::log(exact);
    EXPECT_LE(std::fabs(static_cast<Real>(vectorised.log_sum_exp()) - lse),
              online_tolerance<T>(n) + 2 * u<T>() * (std::fabs(lse) + std::fabs(Real(m)) + 1));
  }
}

TYPED_TEST(SoftmaxTest, OnlineStateFindsTheMaxWhereverItIs) {
  using T = TypeParam;
  // A unique maximum at every position of three tiles (step 3 reaches every residue modulo any
  // power-of-two packet or unroll width): no lane, unrolled slot or tile boundary is skipped.
  const Index n = 2 * blockattn::detail::softmax_kernel::kTile<T> + 37;
  auto rng = make_rng(16);
  Matrix<T> x = random_matrix<T>(rng, 1, n, -1.0, 1.0);
  for (Index p = 0; p < n; p += 3) {
    const T saved = x(0, p);
    x(0, p) = T(5);
    OnlineSoftmax<T> state;
    state.update(x.data(), n);
    ASSERT_EQ(state.max, T(5)) << "max at " << p;
    x(0, p) = saved;
  }
}

TYPED_TEST(SoftmaxTest, RandomSplitsMergedInRandomOrderEqualOnePass) {
  using T = TypeParam;
  auto rng = make_rng(11);
  const Index tile = blockattn::detail::softmax_kernel::kTile<T>;
  for (const Index n : {Index(1), Index(7), Index(64), Index(301), Index(512), 3 * tile + 37}) {
    const Matrix<T> x = random_matrix<T>(rng, 1, n, -8.0, 8.0);
    OnlineSoftmax<T> one_pass;
    one_pass.update(x.data(), n);
    const Real exact = exact_sum(x.data(), n, x.maxCoeff());
    for (int trial = 0; trial < 25; ++trial) {
      const Index pieces = std::uniform_int_distribution<Index>(1, 64)(rng);
      SCOPED_TRACE("n=" + std::to_string(n) + " pieces=" + std::to_string(pieces) + " " +
                   seed_trace());
      // pieces − 1 random cut points (repeats allowed: some pieces are empty).
      std::vector<Index> cuts = {0, n};
      for (Index c = 1; c < pieces; ++c) {
        cuts.push_back(std::uniform_int_distribution<Index>(0, n)(rng));
      }
      std::sort(cuts.begin(), cuts.end());
      std::vector<OnlineSoftmax<T>> states;
      for (std::size_t c = 0; c + 1 < cuts.size(); ++c) {
        OnlineSoftmax<T> piece;
        piece.update(x.data() + cuts[c], cuts[c + 1] - cuts[c]);
        states.push_back(piece);
      }
      std::shuffle(states.begin(), states.end(), rng);
      OnlineSoftmax<T> merged;
      for (const auto& state : states) merged.merge(state);
      EXPECT_EQ(merged.max, one_pass.max);
      // Each piece is within online_tolerance(n) of its exact sum; each of the ≤ 64 merges
      // adds at most (kExpError + 2)·u (rescale factor, product, sum).
      const Real bound = online_tolerance<T>(n) + 64 * (kExpError + 2) * u<T>();
      EXPECT_LE(std::fabs(static_cast<Real>(merged.sum) - exact), bound * exact);
    }
  }
}

TYPED_TEST(SoftmaxTest, MergeIsAssociativeCommutativeWithIdentity) {
  using T = TypeParam;
  auto rng = make_rng(12);
  for (int trial = 0; trial < 50; ++trial) {
    OnlineSoftmax<T> a, b, c;
    const Matrix<T> x = random_matrix<T>(rng, 3, 20, -30.0, 30.0);
    a.update(x.data(), 20);
    b.update(x.data() + 20, 20);
    c.update(x.data() + 40, 20);
    OnlineSoftmax<T> left = a;
    left.merge(b).merge(c);
    OnlineSoftmax<T> bc = b;
    bc.merge(c);
    OnlineSoftmax<T> right = a;
    right.merge(bc);
    EXPECT_EQ(left.max, right.max);
    // Each side is two merges of the same three states, each merge within (kExpError + 2)·u.
    EXPECT_LE(std::fabs(static_cast<Real>(left.sum) - static_cast<Real>(right.sum)),
              4 * (kExpError + 2) * u<T>() * static_cast<Real>(left.sum));
    OnlineSoftmax<T> ab = a, ba = b;
    ab.merge(b);
    ba.merge(a);
    EXPECT_EQ(ab.max, ba.max);
    EXPECT_EQ(ab.sum, ba.sum);  // commutative bitwise: the same two products, summed
    OnlineSoftmax<T> with_identity = a, identity_with = OnlineSoftmax<T>{};
    with_identity.merge(OnlineSoftmax<T>{});
    identity_with.merge(a);
    EXPECT_EQ(with_identity.max, a.max);
    EXPECT_EQ(with_identity.sum, a.sum);
    EXPECT_EQ(identity_with.max, a.max);
    EXPECT_EQ(identity_with.sum, a.sum);
  }
}

TYPED_TEST(SoftmaxTest, NegativeInfinityStatesMergeWithoutNan) {
  using T = TypeParam;
  const T ninf = -std::numeric_limits<T>::infinity();
  OnlineSoftmax<T> empty, also_empty;
  empty.merge(also_empty);
  EXPECT_EQ(empty.max, ninf);
  EXPECT_EQ(empty.sum, T(0));
  EXPECT_EQ(empty.log_sum_exp(), ninf);
  // A state that has seen only −inf is the empty state (sum 0, not 1): this is the
  // softmax_weight(−inf, −inf) = 0 rule of detail/online_state.hpp.
  OnlineSoftmax<T> masked;
  masked.update(ninf);
  masked.update(ninf);
  EXPECT_EQ(masked.max, ninf);
  EXPECT_EQ(masked.sum, T(0));
  const std::vector<T> row(37, ninf);
  OnlineSoftmax<T> masked_row;
  masked_row.update(row.data(), 37);
  EXPECT_EQ(masked_row.max, ninf);
  EXPECT_EQ(masked_row.sum, T(0));
  masked.merge(masked_row);
  EXPECT_EQ(masked.sum, T(0));
  OnlineSoftmax<T> finite;
  finite.update(T(2));
  masked.merge(finite);
  EXPECT_EQ(masked.max, T(2));
  EXPECT_EQ(masked.sum, T(1));
  EXPECT_EQ(blockattn::detail::softmax_weight(ninf, ninf), T(0));
  EXPECT_EQ(blockattn::detail::softmax_weight(std::numeric_limits<T>::infinity(),
                                              std::numeric_limits<T>::infinity()),
            T(1));
}

TYPED_TEST(SoftmaxTest, OnlineStateWithPositiveInfinityAndNan) {
  using T = TypeParam;
  const T inf = std::numeric_limits<T>::infinity();
  std::vector<T> x(45, T(1));
  x[3] = inf;
  x[40] = inf;
  OnlineSoftmax<T> state;
  state.update(x.data(), 45);
  EXPECT_EQ(state.max, inf);
  EXPECT_EQ(state.sum, T(2));  // the +inf entries count 1 each, everything else 0
  EXPECT_EQ(state.log_sum_exp(), inf);
  x[7] = std::numeric_limits<T>::quiet_NaN();
  OnlineSoftmax<T> with_nan;
  with_nan.update(x.data(), 45);
  EXPECT_TRUE(std::isnan(with_nan.log_sum_exp()));
  EXPECT_THROW(state.update(x.data(), -2), std::invalid_argument);
}

// --- softmax_topk -----------------------------------------------------------------------------

template <class T>
void expect_topk_matches_reference(const RowVector<T>& x, Index k) {
  const Index n = x.size();
  const Index kept = std::min(k, n);
  RowVector<T> values = RowVector<T>::Constant(kept + 2, std::numeric_limits<T>::quiet_NaN());
  RowVector<Index> indices = RowVector<Index>::Constant(kept + 2, -7);
  Eigen::internal::set_is_malloc_allowed(false);
  const Index written = blockattn::softmax_topk(x, k, values, indices);
  Eigen::internal::set_is_malloc_allowed(true);
  ASSERT_EQ(written, kept);
  RowVector<Real> expected_values;
  RowVector<Index> expected_indices;
  blockattn::reference::softmax_topk<Real>(x.template cast<Real>(), k, expected_values,
                                           expected_indices);
  ASSERT_EQ(expected_indices.size(), kept);
  EXPECT_EQ(indices.head(kept), expected_indices);
  for (Index i = 0; i < kept; ++i) {
    // exp of an exact difference (glibc, ≤ 2u), over the online normaliser, one division.
    const Real p = expected_values(i);
    EXPECT_LE(std::fabs(static_cast<Real>(values(i)) - p),
              online_tolerance<T>(n) * p + underflow_error<T>())
        << "i=" << i;
  }
  // Entries past min(k, n) are untouched.
  EXPECT_TRUE(std::isnan(values(kept)));
  EXPECT_EQ(indices(kept + 1), -7);
  // The Span form and the Eigen form give the same bits.
  std::vector<T> raw_values(static_cast<std::size_t>(kept + 1));
  std::vector<Index> raw_indices(static_cast<std::size_t>(kept + 1));
  EXPECT_EQ(blockattn::softmax_topk(blockattn::Span(x.data(), n), k, blockattn::Span(raw_values),
                                    blockattn::Span(raw_indices)),
            kept);
  RowVector<T> template_values(kept);
  RowVector<Index> template_indices(kept);
  blockattn::softmax_topk(x, k, template_values, template_indices);
  for (Index i = 0; i < kept; ++i) {
    EXPECT_EQ(raw_values[static_cast<std::size_t>(i)], values(i));
    EXPECT_EQ(raw_indices[static_cast<std::size_t>(i)], indices(i));
    EXPECT_EQ(template_values(i), values(i));
    EXPECT_EQ(template_indices(i), indices(i));
  }
}

TYPED_TEST(SoftmaxTest, TopKMatchesReferenceWithTiesByLowerIndex) {
  using T = TypeParam;
  auto rng = make_rng(13);
  for (const Index n : {Index(1), Index(7), Index(16), Index(17), Index(100), Index(257)}) {
    // Values in [−1, 1] on the 1/64 grid: 129 possible values, so ties are everywhere.
    const RowVector<T> x = random_matrix<T>(rng, 1, n, -1.0, 1.0);
    for (const Index k : {Index(1), Index(3), Index(5), Index(16), n - 1, n, n + 3}) {
      if (k <= 0) continue;
      SCOPED_TRACE("n=" + std::to_string(n) + " k=" + std::to_string(k) + " " + seed_trace());
      expect_topk_matches_reference(x, k);
    }
  }
}

TYPED_TEST(SoftmaxTest, TopKAcrossTiles) {
  using T = TypeParam;
  auto rng = make_rng(15);
  for (const Index n : tile_lengths<T>()) {
    const RowVector<T> x = random_matrix<T>(rng, 1, n, -4.0, 4.0);
    for (const Index k : {Index(1), Index(5), Index(16), Index(100)}) {
      SCOPED_TRACE("n=" + std::to_string(n) + " k=" + std::to_string(k) + " " + seed_trace());
      expect_topk_matches_reference(x, k);
    }
  }
}

TYPED_TEST(SoftmaxTest, TopKWorstCaseAscendingAndDescendingInput) {
  using T = TypeParam;
  const Index n = 300;
  RowVector<T> ascending(n), descending(n);
  for (Index j = 0; j < n; ++j) {
    ascending(j) = static_cast<T>(j) / T(64);
    descending(j) = static_cast<T>(n - j) / T(64);
  }
  for (const Index k : {Index(1), Index(5), Index(16), Index(299)}) {
    SCOPED_TRACE("k=" + std::to_string(k));
    expect_topk_matches_reference(ascending, k);
    expect_topk_matches_reference(descending, k);
  }
}

TYPED_TEST(SoftmaxTest, TopKZeroAndLargerThanLength) {
  using T = TypeParam;
  const RowVector<T> x = RowVector<T>::LinSpaced(9, T(-1), T(1));
  RowVector<T> values = RowVector<T>::Constant(12, std::numeric_limits<T>::quiet_NaN());
  RowVector<Index> indices = RowVector<Index>::Constant(12, -1);
  EXPECT_EQ(blockattn::softmax_topk(x, 0, values, indices), 0);
  EXPECT_TRUE(values.array().isNaN().all());
  EXPECT_TRUE((indices.array() == -1).all());
  RowVector<T> none(0);
  RowVector<Index> no_indices(0);
  EXPECT_EQ(blockattn::softmax_topk(x, 0, none, no_indices), 0);  // k = 0 needs no room
  EXPECT_EQ(blockattn::softmax_topk(x, 12, values, indices), 9);  // k > n: all n, sorted
  for (Index i = 0; i < 9; ++i) EXPECT_EQ(indices(i), 8 - i);
  EXPECT_TRUE(std::isnan(values(9)));
  const RowVector<T> empty(0);
  EXPECT_EQ(blockattn::softmax_topk(empty, 3, values, indices), 0);
}

TYPED_TEST(SoftmaxTest, TopKSpecialValues) {
  using T = TypeParam;
  const T inf = std::numeric_limits<T>::infinity();
  RowVector<T> values(6);
  RowVector<Index> indices(6);
  // −inf entries come last, with probability 0, in index order.
  RowVector<T> x(5);
  x << -inf, T(0.5), -inf, T(0.25), -inf;
  ASSERT_EQ(blockattn::softmax_topk(x, 5, values, indices), 5);
  EXPECT_EQ(indices.head(5), (RowVector<Index>(5) << 1, 3, 0, 2, 4).finished());
  EXPECT_EQ(values(2), T(0));
  EXPECT_EQ(values(4), T(0));
  // All −inf: zeros, indices in order.
  x.setConstant(-inf);
  ASSERT_EQ(blockattn::softmax_topk(x, 3, values, indices), 3);
  EXPECT_EQ(values.head(3), RowVector<T>::Zero(3));
  EXPECT_EQ(indices.head(3), (RowVector<Index>(3) << 0, 1, 2).finished());
  // Two +inf entries share the probability.
  x << T(1), inf, T(3), inf, T(2);
  ASSERT_EQ(blockattn::softmax_topk(x, 3, values, indices), 3);
  EXPECT_EQ(values.head(3), (RowVector<T>(3) << T(0.5), T(0.5), T(0)).finished());
  EXPECT_EQ(indices.head(3), (RowVector<Index>(3) << 1, 3, 2).finished());
  // NaN: every value NaN, indices distinct and in range.
  RowVector<T> long_row = RowVector<T>::LinSpaced(70, T(0), T(1));
  long_row(33) = std::numeric_limits<T>::quiet_NaN();
  ASSERT_EQ(blockattn::softmax_topk(long_row, 4, values, indices), 4);
  EXPECT_TRUE(values.head(4).array().isNaN().all());
  std::vector<Index> seen(indices.data(), indices.data() + 4);
  std::sort(seen.begin(), seen.end());
  EXPECT_EQ(std::unique(seen.begin(), seen.end()), seen.end());
  for (const Index j : seen) EXPECT_TRUE(j >= 0 && j < 70);
}

TYPED_TEST(SoftmaxTest, UnfusedBaselineAgreesWithFused) {
  using T = TypeParam;
  auto rng = make_rng(14);
  for (const Index n : {Index(1), Index(31), Index(200), Index(509)}) {
    // Distinct values (a permutation of the 1/64 grid), so probabilities do not tie.
    std::vector<Index> permutation(static_cast<std::size_t>(n));
    std::iota(permutation.begin(), permutation.end(), Index(0));
    std::shuffle(permutation.begin(), permutation.end(), rng);
    RowVector<T> x(n);
    for (Index j = 0; j < n; ++j) {
      x(j) = static_cast<T>(permutation[static_cast<std::size_t>(j)] - n / 2) / T(64);
    }
    for (const Index k : {Index(1), Index(5), Index(16)}) {
      SCOPED_TRACE("n=" + std::to_string(n) + " k=" + std::to_string(k) + " " + seed_trace());
      const Index kept = std::min(k, n);
      RowVector<T> fused(kept), unfused(kept);
      RowVector<Index> fused_indices(kept), unfused_indices(kept);
      ASSERT_EQ(blockattn::softmax_topk(x, k, fused, fused_indices), kept);
      ASSERT_EQ(blockattn::bench::softmax_topk_unfused<T>(x, k, unfused, unfused_indices), kept);
      RowVector<T> unfused_template(kept);
      RowVector<Index> unfused_template_indices(kept);
      blockattn::bench::softmax_topk_unfused<T>(x, k, unfused_template, unfused_template_indices);
      EXPECT_EQ(unfused_template, unfused);
      EXPECT_EQ(unfused_indices, fused_indices);
      for (Index i = 0; i < kept; ++i) {
        // Both are within their tolerance of the same exact probability p ≥ the fused value's.
        const Real p = static_cast<Real>(fused(i));
        EXPECT_LE(
            std::fabs(static_cast<Real>(unfused(i)) - p),
            (online_tolerance<T>(n) + two_pass_tolerance<T>(n)) * p + 2 * underflow_error<T>());
      }
    }
  }
}

TYPED_TEST(SoftmaxTest, TopKBadArgumentsThrowBeforeWriting) {
  using T = TypeParam;
  const RowVector<T> x = RowVector<T>::LinSpaced(10, T(0), T(1));
  RowVector<T> values = RowVector<T>::Constant(4, std::numeric_limits<T>::quiet_NaN());
  RowVector<Index> indices = RowVector<Index>::Constant(4, -1);
  EXPECT_THAT([&] { blockattn::softmax_topk(x, -1, values, indices); },
              ThrowsMessage<std::invalid_argument>(
                  AllOf(HasSubstr("blockattn::softmax_topk"), HasSubstr("k is -1"))));
  EXPECT_THAT([&] { blockattn::softmax_topk(x, 5, values, indices); },
              ThrowsMessage<std::invalid_argument>(
                  AllOf(HasSubstr("values.size() is 4"), HasSubstr("min(k, x.size()) is 5"))));
  RowVector<T> enough(5);
  EXPECT_THAT([&] { blockattn::softmax_topk(x, 5, enough, indices); },
              ThrowsMessage<std::invalid_argument>(
                  AllOf(HasSubstr("indices.size() is 4"), HasSubstr("is 5"))));
  EXPECT_THAT(
      [&] { blockattn::bench::softmax_topk_unfused<T>(x, 5, values, indices); },
      ThrowsMessage<std::invalid_argument>(HasSubstr("blockattn::bench::softmax_topk_unfused")));
  EXPECT_TRUE(values.array().isNaN().all());
  EXPECT_TRUE((indices.array() == -1).all());
  // The Span form: lengths checked, both sizes named; overlaps and null data rejected.
  std::vector<T> buffer(12, T(0));
  std::vector<Index> raw_indices(4, -1);
  const blockattn::Span<const T> xs(buffer.data(), 10);
  EXPECT_THAT(
      [&] {
        blockattn::softmax_topk(xs, 3, blockattn::Span(buffer.data() + 10, 2),
                                blockattn::Span(raw_indices));
      },
      ThrowsMessage<std::invalid_argument>(AllOf(HasSubstr("blockattn::softmax_topk"),
                                                 HasSubstr("values.size() is 2"),
                                                 HasSubstr("min(k, x.size()) is 3"))));
  EXPECT_THAT(
      [&] {
        blockattn::softmax_topk(xs, 5, blockattn::Span(buffer.data() + 10, 2),
                                blockattn::Span(raw_indices));
      },
      ThrowsMessage<std::invalid_argument>(HasSubstr("values.size() is 2")));
  EXPECT_THAT(
      [&] {
        blockattn::softmax_topk(xs, 3, blockattn::Span(buffer.data() + 8, 3),
                                blockattn::Span(raw_indices));
      },
      ThrowsMessage<std::invalid_argument>(HasSubstr("values overlaps the memory of x")));
  EXPECT_THAT(
      [&] {
        blockattn::softmax_topk(xs, 3, blockattn::Span(static_cast<T*>(nullptr), 3),
                                blockattn::Span(raw_indices));
      },
      ThrowsMessage<std::invalid_argument>(HasSubstr("values.data() or indices.data() is null")));
  EXPECT_THAT(
      [&] {
        blockattn::softmax_topk(blockattn::Span(buffer.data(), -3), 3,
                                blockattn::Span(buffer.data(), 3), blockattn::Span(raw_indices));
      },
      ThrowsMessage<std::invalid_argument>(HasSubstr("x.size() is -3")));
  EXPECT_TRUE(std::all_of(buffer.begin(), buffer.end(), [](T b) { return b == T(0); }));
  EXPECT_EQ(raw_indices, std::vector<Index>(4, -1));
}

}  // namespace

namespace {

TEST(SoftmaxLongDoubleTest, OnlineStateTakesTheScalarPath) {
  // long double has no SIMD packets: OnlineSoftmax<long double> takes the scalar loop. softmax()
  // and softmax_topk() reject long double at compile time (tests/compile_fail); the reference
  // takes it.
  auto rng = make_rng(17);
  for (const Index n : {Index(1), Index(13), Index(1500)}) {
    const Matrix<Real> x = random_matrix<Real>(rng, 2, n, -8.0, 8.0);
    OnlineSoftmax<Real> state;
    state.update(x.data(), n);
    const Real exact = exact_sum(x.data(), n, x.row(0).maxCoeff());
    EXPECT_LE(std::fabs(state.sum - exact), online_tolerance<Real>(n) * exact);
  }
}

}  // namespace

}  // namespace softmax_test
