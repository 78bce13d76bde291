// The SIMD layer, the vectorised exp and the attention micro-kernels (detail/simd.hpp, exp.hpp,
// microkernel.hpp), against long double references. Built twice by the presets: without -march
// (SSE2 on x86-64) and with -march=native (AVX-512 here); both must pass.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <blockattn/detail/exp.hpp>
#include <blockattn/detail/microkernel.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/types.hpp>

#include "../bench/support/tile_attention.hpp"
#include "support/random.hpp"
#include "support/scalar_types.hpp"
#include "support/tolerance.hpp"

namespace simd_test {
namespace {

using blockattn::Index;
using blockattn::Matrix;
using blockattn::detail::simd::Simd;
using LongDouble = long double;

template <class T>
constexpr int kLanes = Simd<T>::kLanes;

std::string isa_trace() { return std::string("isa=") + Simd<float>::kName; }

// ---------------------------------------------------------------------------------------------
// exp

/// The spacing of T at the exact value `exact` >= 0: 2^(e − (digits − 1)) for a normal result,
/// denorm_min below the normal range. Errors are measured in these units ("ulp of the exact
/// result").
template <class T>
LongDouble ulp_at(LongDouble exact) {
  using Limits = std::numeric_limits<T>;
  if (exact < static_cast<LongDouble>(Limits::min())) return Limits::denorm_min();
  return std::ldexp(LongDouble(1), std::ilogb(exact) - (Limits::digits - 1));
}

/// Error of y against the exact `ref` in ulps of ref; 0 when both are the same special value,
/// +inf when only one of them is special (overflow expected but finite, NaN mismatch, …).
template <class T>
LongDouble ulp_error(T y, LongDouble ref) {
  constexpr LongDouble kInf = std::numeric_limits<LongDouble>::infinity();
  if (std::isnan(ref)) return std::isnan(y) ? 0 : kInf;
  const LongDouble max = std::numeric_limits<T>::max();
  // The correctly rounded result is +inf from max + ulp(max)/2 on.
  if (ref >= max + ulp_at<T>(max) / 2) return y == std::numeric_limits<T>::infinity() ? 0 : kInf;
  if (std::isnan(y) || std::isinf(y)) return kInf;
  return std::fabs(static_cast<LongDouble>(y) - ref) / ulp_at<T>(ref);
}

/// Largest ulp error of simd::exp over xs (evaluated in one exp_array call, so full vectors and
/// the partial tail both run); reports the worst argument through `worst`.
template <class T>
LongDouble max_exp_error(const std::vector<T>& xs, T* worst) {
  std::vector<T> ys(xs.size());
  blockattn::detail::exp_array(xs.data(), ys.data(), static_cast<std::ptrdiff_t>(xs.size()));
  LongDouble max_error = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const LongDouble error = ulp_error<T>(ys[i], std::exp(static_cast<LongDouble>(xs[i])));
    if (!(error <= max_error)) {
      max_error = error;
      *worst = xs[i];
    }
  }
  return max_error;
}

/// `count` consecutive representable values of T starting at x (upwards).
template <class T>
void append_neighbours(std::vector<T>& xs, T x, int count) {
  for (int t = 0; t < count; ++t) {
    xs.push_back(x);
    x = std::nextafter(x, std::numeric_limits<T>::infinity());
  }
}

/// The points where exp's behaviour changes: overflow, the normal/denormal boundary, the last
/// nonzero result, 0, and the clamp bounds; `count` neighbours on either side of each.
template <class T>
std::vector<T> boundary_points(int count) {
  using Limits = std::numeric_limits<T>;
  const T ln_max = static_cast<T>(std::log(static_cast<LongDouble>(Limits::max())));
  const T ln_min = static_cast<T>(std::log(static_cast<LongDouble>(Limits::min())));
  const T ln_half_denorm =
      static_cast<T>(std::log(static_cast<LongDouble>(Limits::denorm_min()) / 2));
  std::vector<T> xs;
  for (T centre : {ln_max, ln_min, ln_half_denorm, T(0), blockattn::detail::ExpConstants<T>::kLow,
                   blockattn::detail::ExpConstants<T>::kHigh}) {
    T start = centre;
    for (int t = 0; t < count; ++t) start = std::nextafter(start, -Limits::infinity());
    append_neighbours(xs, start, 2 * count + 1);
  }
  return xs;
}

TEST(ExpTest, FloatMaxUlpErrorAtMostTwoOverTheWholeRange) {
  SCOPED_TRACE(isa_trace());
  // Every 997th float by bit pattern in [−104, 89] (2.2 million arguments, every binade), plus
  // 2'001 consecutive floats around each boundary, plus the whole range past the clamps.
  std::vector<float> xs = boundary_points<float>(1000);
  const auto add_bit_range = [&xs](float from, float to) {  // from <= to, same sign
    std::uint32_t a = 0;
    std::uint32_t b = 0;
    std::memcpy(&a, &from, sizeof a);
    std::memcpy(&b, &to, sizeof b);
    if (a > b) std::swap(a, b);
    for (std::uint32_t bits = a; bits <= b; bits += 997) {
      float x = 0;
      std::memcpy(&x, &bits, sizeof x);
      xs.push_back(x);
    }
  };
  add_bit_range(0.0f, 89.0f);
  add_bit_range(-104.0f, -0.0f);
  for (float x = 89.0f; x < 3e38f; x *= 1.5f) xs.push_back(x);
  for (float x = -104.0f; x > -3e38f; x *= 1.5f) xs.push_back(x);
  float worst = 0;
  const LongDouble max_error = max_exp_error(xs, &worst);
  std::printf("exp<float> [%s]: max error %.3Lf ulp at x = %.9g over %zu arguments\n",
              Simd<float>::kName, max_error, static_cast<double>(worst), xs.size());
  EXPECT_LE(max_error, 2.0L) << "worst x = " << worst;
}

TEST(ExpTest, DoubleMaxUlpErrorAtMostTwoOverTheWholeRange) {
  SCOPED_TRACE(isa_trace() + " " + blockattn::test::seed_trace());
  // 500'000 uniform arguments in [−746, 710], 500'000 in [−1, 1] (where the reduction does not
  // act), plus 2'001 consecutive doubles around each boundary. long double (64-bit significand)
  // is exact enough: its own error is 2^-11 of a double ulp.
  std::vector<double> xs = boundary_points<double>(1000);
  auto rng = blockattn::test::make_rng(/*salt=*/11);
  std::uniform_real_distribution<double> wide(-746.0, 710.0);
  std::uniform_real_distribution<double> narrow(-1.0, 1.0);
  for (int t = 0; t < 500000; ++t) xs.push_back(wide(rng));
  for (int t = 0; t < 500000; ++t) xs.push_back(narrow(rng));
  double worst = 0;
  const LongDouble max_error = max_exp_error(xs, &worst);
  std::printf("exp<double> [%s]: max error %.3Lf ulp at x = %.17g over %zu arguments\n",
              Simd<double>::kName, max_error, worst, xs.size());
  EXPECT_LE(max_error, 2.0L) << "worst x = " << worst;
}

template <class T>
class ExpSpecialTest : public ::testing::Test {};
TYPED_TEST_SUITE(ExpSpecialTest, blockattn::test::Scalars, );

TYPED_TEST(ExpSpecialTest, SpecialValuesAreExact) {
  using T = TypeParam;
  using Limits = std::numeric_limits<T>;
  SCOPED_TRACE(isa_trace());
  const std::vector<T> xs = {-Limits::infinity(),
                             Limits::infinity(),
                             Limits::quiet_NaN(),
                             T(0),
                             -T(0),
                             Limits::denorm_min(),
                             -Limits::denorm_min(),
                             Limits::max(),
                             Limits::lowest(),
                             T(1e4),
                             T(-1e4)};
  std::vector<T> ys(xs.size());
  blockattn::detail::exp_array(xs.data(), ys.data(), static_cast<std::ptrdiff_t>(xs.size()));
  EXPECT_EQ(ys[0], T(0));
  EXPECT_FALSE(std::signbit(ys[0]));
  EXPECT_EQ(ys[1], Limits::infinity());
  EXPECT_TRUE(std::isnan(ys[2]));
  EXPECT_EQ(ys[3], T(1));
  EXPECT_EQ(ys[4], T(1));
  EXPECT_EQ(ys[5], T(1));
  EXPECT_EQ(ys[6], T(1));
  EXPECT_EQ(ys[7], Limits::infinity());
  EXPECT_EQ(ys[8], T(0));
  EXPECT_EQ(ys[9], Limits::infinity());
  EXPECT_EQ(ys[10], T(0));
}

TYPED_TEST(ExpSpecialTest, NanInAnyLaneStaysInItsLane) {
  using T = TypeParam;
  SCOPED_TRACE(isa_trace());
  for (int lane = 0; lane < kLanes<T>; ++lane) {
    std::vector<T> xs(static_cast<std::size_t>(kLanes<T>), T(0.5));
    xs[static_cast<std::size_t>(lane)] = std::numeric_limits<T>::quiet_NaN();
    std::vector<T> ys(xs.size());
    blockattn::detail::exp_array(xs.data(), ys.data(), static_cast<std::ptrdiff_t>(xs.size()));
    for (int t = 0; t < kLanes<T>; ++t) {
      EXPECT_EQ(std::isnan(ys[static_cast<std::size_t>(t)]), t == lane) << "lane " << t;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// SIMD layer: partial access never touches memory past n, max's NaN rule, reductions.

template <class T>
class SimdTest : public ::testing::Test {};
TYPED_TEST_SUITE(SimdTest, blockattn::test::Scalars, );

TYPED_TEST(SimdTest, PartialLoadAndStoreStayInsideTheirCount) {
  using T = TypeParam;
  using S = Simd<T>;
  SCOPED_TRACE(isa_trace());
  constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
  for (int n = 0; n < S::kLanes; ++n) {
    std::vector<T> src(static_cast<std::size_t>(S::kLanes), kNaN);
    for (int t = 0; t < n; ++t) src[static_cast<std::size_t>(t)] = T(t + 1);
    std::vector<T> out(static_cast<std::size_t>(S::kLanes));
    S::store(out.data(), S::load_partial(src.data(), n, T(-7)));
    for (int t = 0; t < S::kLanes; ++t) {
      EXPECT_EQ(out[static_cast<std::size_t>(t)], t < n ? T(t + 1) : T(-7)) << "n=" << n;
    }
    std::vector<T> dst(static_cast<std::size_t>(S::kLanes), kNaN);
    S::store_partial(dst.data(), n, S::set1(T(3)));
    for (int t = 0; t < S::kLanes; ++t) {
      if (t < n) {
        EXPECT_EQ(dst[static_cast<std::size_t>(t)], T(3));
      } else {
        EXPECT_TRUE(std::isnan(dst[static_cast<std::size_t>(t)])) << "n=" << n << " t=" << t;
      }
    }
  }
}

TYPED_TEST(SimdTest, MaxReturnsSecondArgumentOnNanAndReductionsCoverEveryLane) {
  using T = TypeParam;
  using S = Simd<T>;
  SCOPED_TRACE(isa_trace());
  constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> x(static_cast<std::size_t>(S::kLanes));
  for (int t = 0; t < S::kLanes; ++t) x[static_cast<std::size_t>(t)] = T(t + 1);
  EXPECT_EQ(S::reduce_add(S::load(x.data())), T(S::kLanes * (S::kLanes + 1) / 2));
  for (int lane = 0; lane < S::kLanes; ++lane) {
    std::vector<T> y(x);
    y[static_cast<std::size_t>(lane)] = T(100);
    EXPECT_EQ(S::reduce_max(S::load(y.data())), T(100)) << "lane " << lane;
  }
  EXPECT_EQ(S::reduce_max(S::max(S::set1(kNaN), S::set1(T(2)))), T(2));
  EXPECT_TRUE(std::isnan(S::reduce_add(S::max(S::set1(T(2)), S::set1(kNaN)))));
  EXPECT_EQ(S::reduce_max(S::round_to_int(S::set1(T(2.5)))), T(2));
  EXPECT_EQ(S::reduce_max(S::round_to_int(S::set1(T(-3.5)))), T(-4));
  EXPECT_EQ(S::reduce_max(S::pow2i(S::set1(T(-126)))), std::ldexp(T(1), -126));
  EXPECT_EQ(S::reduce_max(S::pow2i(S::set1(T(127)))), std::ldexp(T(1), 127));
}

TYPED_TEST(SimdTest, ReduceAddLanesIsReduceAddOfEachVectorBitwise) {
  using T = TypeParam;
  using S = Simd<T>;
  SCOPED_TRACE(isa_trace() + " " + blockattn::test::seed_trace());
  auto rng = blockattn::test::make_rng(/*salt=*/31);
  // Magnitudes over 2^±40 with both signs: the rounded sum depends on the order of every
  // addition, so any lane taken from the wrong vector or summed in another order differs.
  std::uniform_real_distribution<double> mantissa(-1.0, 1.0);
  std::uniform_int_distribution<int> exponent(-40, 40);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<T> x(static_cast<std::size_t>(S::kLanes * S::kLanes));
    for (T& e : x) e = static_cast<T>(std::ldexp(mantissa(rng), exponent(rng)));
    typename S::V v[S::kLanes];
    for (int i = 0; i < S::kLanes; ++i) v[i] = S::load(x.data() + i * S::kLanes);
    std::vector<T> sums(static_cast<std::size_t>(S::kLanes));
    S::store(sums.data(), S::reduce_add_lanes(v));
    for (int i = 0; i < S::kLanes; ++i) {
      const T expected = S::reduce_add(v[i]);
      ASSERT_EQ(std::memcmp(&sums[static_cast<std::size_t>(i)], &expected, sizeof(T)), 0)
          << "lane " << i << " trial " << trial << ": " << sums[static_cast<std::size_t>(i)]
          << " != " << expected;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Micro-kernels

template <class T>
class MicroKernelTest : public ::testing::Test {};
TYPED_TEST_SUITE(MicroKernelTest, blockattn::test::Scalars, );

/// Sizes around the register blocks: 1, 3, a lane count ±1, a panel ±1, a row block ±1, 67, and
/// d / d_v from 1 to 257.
template <class T>
std::vector<Index> awkward_key_counts() {
  using Shape = blockattn::detail::RegisterBlock<T>;
  return {1,
          3,
          kLanes<T> - 1 > 0 ? kLanes<T> - 1 : 2,
          kLanes<T> + 1,
          Shape::kKeyPanel - 1,
          Shape::kKeyPanel + 1,
          2 * Shape::kKeyPanel + 3,
          67};
}

template <class T>
std::vector<Index> awkward_row_counts() {
  using Shape = blockattn::detail::RegisterBlock<T>;
  return {1, Shape::kRows - 1 > 0 ? Shape::kRows - 1 : 2, Shape::kRows, Shape::kRows + 1,
          3 * Shape::kRows + 2};
}

const std::vector<Index> kFeatureCounts = {1, 3, 16, 64, 257};

TYPED_TEST(MicroKernelTest, ScoreTileIsExactOnDyadicInputsAndWritesOnlyItsColumns) {
  using T = TypeParam;
  constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
  auto rng = blockattn::test::make_rng(/*salt=*/21);
  for (Index rows : awkward_row_counts<T>()) {
    for (Index n_keys : awkward_key_counts<T>()) {
      for (Index d : kFeatureCounts) {
        SCOPED_TRACE("rows=" + std::to_string(rows) + " n_keys=" + std::to_string(n_keys) + " d=" +
                     std::to_string(d) + " " + isa_trace() + " " + blockattn::test::seed_trace());
        // Inputs are multiples of 1/64 in [−1, 1]: every product is a multiple of 2^-12 below
        // 1 in magnitude and every partial sum a multiple of 2^-12 below 257, i.e. at most 21
        // significant bits: the float (and double) computation is exact, in any order, fused or
        // not. So the tolerance is 0, and any indexing error shows.
        const Matrix<T> q = blockattn::test::random_matrix<T>(rng, rows, d + 2);  // ld_q = d + 2
        const Matrix<T> k = blockattn::test::random_matrix<T>(rng, n_keys, d + 1);
        std::vector<T> packed(
            static_cast<std::size_t>(blockattn::detail::packed_k_size<T>(n_keys, d)), kNaN);
        blockattn::detail::pack_k(k.data(), d + 1, n_keys, d, packed.data());
        const Index padded = blockattn::detail::padded_stride<T>(n_keys);
        const Index ld_s = padded + 3;
        std::vector<T> s(static_cast<std::size_t>((rows + 1) * ld_s), kNaN);
        blockattn::detail::score_tile(q.data(), d + 2, rows, d, packed.data(), n_keys, s.data(),
                                      ld_s);
        for (Index i = 0; i < rows + 1; ++i) {
          for (Index j = 0; j < ld_s; ++j) {
            const T got = s[static_cast<std::size_t>(i * ld_s + j)];
            if (i >= rows || j >= padded) {
              ASSERT_TRUE(std::isnan(got)) << "wrote outside the tile at " << i << "," << j;
            } else if (j >= n_keys) {
              ASSERT_EQ(got, T(0)) << "padding column " << j;
            } else {
              LongDouble ref = 0;
              for (Index c = 0; c < d; ++c) {
                ref += static_cast<LongDouble>(q(i, c)) * static_cast<LongDouble>(k(j, c));
              }
              ASSERT_EQ(static_cast<LongDouble>(got), ref) << "at " << i << "," << j;
            }
          }
        }
      }
    }
  }
}

TYPED_TEST(MicroKernelTest, AccumulatePvIsExactOnDyadicInputsAndWritesOnlyItsColumns) {
  using T = TypeParam;
  constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
  auto rng = blockattn::test::make_rng(/*salt=*/22);
  for (Index rows : awkward_row_counts<T>()) {
    for (Index n_keys : awkward_key_counts<T>()) {
      for (Index d_v : kFeatureCounts) {
        SCOPED_TRACE("rows=" + std::to_string(rows) + " n_keys=" + std::to_string(n_keys) +
                     " d_v=" + std::to_string(d_v) + " " + isa_trace() + " " +
                     blockattn::test::seed_trace());
        // p in [0, 1], v and acc in [−1, 1], all multiples of 1/64: the sums are multiples of
        // 2^-12 below 68 in magnitude, exact in float; tolerance 0 as for the scores.
        const Index ld_p = n_keys + 2;
        const Matrix<T> p = blockattn::test::random_matrix<T>(rng, rows, ld_p, 0.0, 1.0);
        const Matrix<T> v = blockattn::test::random_matrix<T>(rng, n_keys, d_v + 1);
        std::vector<T> packed(
            static_cast<std::size_t>(blockattn::detail::packed_v_size<T>(n_keys, d_v)), kNaN);
        blockattn::detail::pack_v(v.data(), d_v + 1, n_keys, d_v, packed.data());
        const Index padded = blockattn::detail::padded_stride<T>(d_v);
        const Index ld_acc = padded + 2;
        std::vector<T> acc(static_cast<std::size_t>((rows + 1) * ld_acc), kNaN);
        for (Index i = 0; i < rows; ++i) {
          for (Index c = 0; c < padded; ++c) {
            acc[static_cast<std::size_t>(i * ld_acc + c)] =
                c < d_v ? blockattn::test::random_value<T>(rng) : T(0);
          }
        }
        const std::vector<T> acc0 = acc;
        blockattn::detail::accumulate_pv(p.data(), ld_p, rows, n_keys, packed.data(), d_v,
                                         acc.data(), ld_acc);
        for (Index i = 0; i < rows + 1; ++i) {
          for (Index c = 0; c < ld_acc; ++c) {
            const auto at = static_cast<std::size_t>(i * ld_acc + c);
            if (i >= rows || c >= padded) {
              ASSERT_TRUE(std::isnan(acc[at])) << "wrote outside the tile at " << i << "," << c;
            } else if (c >= d_v) {
              ASSERT_EQ(acc[at], T(0)) << "padding column " << c;
            } else {
              LongDouble ref = acc0[at];
              for (Index j = 0; j < n_keys; ++j) {
                ref += static_cast<LongDouble>(p(i, j)) * static_cast<LongDouble>(v(j, c));
              }
              ASSERT_EQ(static_cast<LongDouble>(acc[at]), ref) << "at " << i << "," << c;
            }
          }
        }
      }
    }
  }
}

/// The online state of one row in long double, for the fused sweep's reference.
struct RowState {
  LongDouble m;
  LongDouble l;
  std::vector<LongDouble> acc;
};

TYPED_TEST(MicroKernelTest, SoftmaxTileUpdateMatchesTheScalarRecurrence) {
  using T = TypeParam;
  using Limits = std::numeric_limits<T>;
  constexpr T kInf = Limits::infinity();
  constexpr LongDouble u = blockattn::test::unit_roundoff<T>();
  auto rng = blockattn::test::make_rng(/*salt=*/23);
  for (Index n_keys : awkward_key_counts<T>()) {
    for (T scale : {T(0.125), T(0.3)}) {
      const Index rows = 9;
      const Index d_v = 5;
      const Index ld_s = blockattn::detail::padded_stride<T>(n_keys) + 1;
      const Index ld_acc = d_v + 3;
      SCOPED_TRACE("n_keys=" + std::to_string(n_keys) + " scale=" + std::to_string(scale) + " " +
                   isa_trace() + " " + blockattn::test::seed_trace());
      std::vector<T> m(rows, -kInf);
      std::vector<T> l(rows, T(0));
      std::vector<T> acc(static_cast<std::size_t>(rows * ld_acc), T(0));
      std::vector<RowState> ref(rows, RowState{-std::numeric_limits<LongDouble>::infinity(), 0,
                                               std::vector<LongDouble>(d_v, 0)});
      // Three tiles in a row: the second shifts some rows' maxima up by 40 (a rescale), the third
      // leaves them (α = 1). Row 0 is fully masked throughout, row 1 is masked in the first tile
      // only, row 2 gets a +inf in the second tile, row 3 a NaN in the third; the other rows
      // have random −inf holes.
      for (int tile = 0; tile < 3; ++tile) {
        std::vector<T> s(static_cast<std::size_t>(rows * ld_s), T(123));  // padding: ignored
        for (Index i = 0; i < rows; ++i) {
          for (Index j = 0; j < n_keys; ++j) {
            T x = blockattn::test::random_value<T>(rng, -8.0, 8.0);
            if (tile == 1 && i % 2 == 1) x += T(40);
            if (i >= 4 && rng() % 5 == 0) x = -kInf;
            if (i == 0 || (i == 1 && tile == 0)) x = -kInf;
            if (i == 2 && tile == 1 && j == n_keys / 2) x = kInf;
            if (i == 3 && tile == 2 && j == 0) x = Limits::quiet_NaN();
            s[static_cast<std::size_t>(i * ld_s + j)] = x;
          }
        }
        // acc gains something between tiles, as accumulate_pv would add, so the rescale shows.
        for (Index i = 0; i < rows; ++i) {
          for (Index c = 0; c < d_v; ++c) {
            const T add = blockattn::test::random_value<T>(rng);
            acc[static_cast<std::size_t>(i * ld_acc + c)] += add;
            ref[static_cast<std::size_t>(i)].acc[static_cast<std::size_t>(c)] =
                static_cast<LongDouble>(acc[static_cast<std::size_t>(i * ld_acc + c)]);
          }
          ref[static_cast<std::size_t>(i)].l = l[static_cast<std::size_t>(i)];
        }
        const std::vector<T> s_in = s;
        const std::vector<T> m_in = m;
        blockattn::detail::softmax_tile_update(s.data(), ld_s, rows, n_keys, scale, m.data(),
                                               l.data(), acc.data(), ld_acc, d_v);
        for (Index i = 0; i < rows; ++i) {
          SCOPED_TRACE("tile=" + std::to_string(tile) + " row=" + std::to_string(i));
          const auto iu = static_cast<std::size_t>(i);
          RowState& r = ref[iu];
          // m is specified exactly: running_max(m_old, fl(scale·max_j s)), NaN ignored.
          T row_max = -kInf;
          for (Index j = 0; j < n_keys; ++j) {
            row_max = blockattn::detail::running_max(row_max,
                                                     s_in[static_cast<std::size_t>(i * ld_s + j)]);
          }
          const T m_expected = blockattn::detail::running_max(m_in[iu], row_max * scale);
          ASSERT_EQ(m[iu], m_expected);
          // p_j against exp(scale·s_j − origin) in long double, origin = the kernel's m. The
          // kernel's argument fma(s, scale, −origin) is rounded once with FMA and twice without
          // (SSE2, scalar): absolute error ≤ u·(|scale·s| + |arg|), i.e. that relative error in
          // p; then exp's ≤ 2 ulp ≤ 4u·p; plus denorm_min for results in the denormal range.
          const LongDouble origin = blockattn::detail::exp_origin(static_cast<LongDouble>(m[iu]));
          LongDouble p_sum = 0;
          LongDouble p_tol_sum = 0;
          bool nan_row = false;
          for (Index j = 0; j < n_keys; ++j) {
            const T x = s_in[static_cast<std::size_t>(i * ld_s + j)];
            const T got = s[static_cast<std::size_t>(i * ld_s + j)];
            if (std::isnan(x)) {
              nan_row = true;
              ASSERT_TRUE(std::isnan(got));
              continue;
            }
            LongDouble expected;
            if (m[iu] == kInf) {
              expected = x == kInf ? 1 : 0;
            } else if (x == -kInf) {
              expected = 0;
              ASSERT_EQ(got, T(0)) << "masked j=" << j;
            } else {
              const LongDouble arg = static_cast<LongDouble>(x) * scale - origin;
              expected = std::exp(arg);
              const LongDouble tol =
                  expected * u *
                      (std::fabs(static_cast<LongDouble>(x) * scale) + std::fabs(arg) + 5) +
                  Limits::denorm_min();
              ASSERT_LE(std::fabs(static_cast<LongDouble>(got) - expected), tol) << "j=" << j;
              p_tol_sum += tol;
            }
            if (m[iu] == kInf) {
              ASSERT_EQ(static_cast<LongDouble>(got), expected) << "j=" << j;
            }
            p_sum += expected;
          }
          // α = exp(m_old − m_new) by std::exp: argument rounded once (u·|Δm|), exp ≤ 1 ulp.
          const LongDouble dm = static_cast<LongDouble>(m_in[iu]) - static_cast<LongDouble>(m[iu]);
          const LongDouble alpha = m_in[iu] == m[iu] ? 1 : std::exp(dm);
          // (α = 0 exactly when the old or the new max is infinite.)
          const LongDouble alpha_rel =
              m_in[iu] == m[iu] || std::isinf(dm) ? 0 : u * (std::fabs(dm) + 3);
          if (nan_row) {
            EXPECT_TRUE(std::isnan(l[iu]));
          } else {
            // l = α·l_old + Σp: the Σp terms' own errors, summation (n_keys + 1)·u of the total
            // (any order), α's relative error on α·l_old.
            const LongDouble l_ref = alpha * r.l + p_sum;
            const LongDouble l_tol = p_tol_sum + (static_cast<LongDouble>(n_keys) + 2) * u * l_ref +
                                     alpha * r.l * alpha_rel + Limits::denorm_min();
            EXPECT_LE(std::fabs(static_cast<LongDouble>(l[iu]) - l_ref), l_tol);
            r.l = l[iu];
          }
          if (i == 0) {
            EXPECT_EQ(m[iu], -kInf);
            EXPECT_EQ(l[iu], T(0));
          }
          for (Index c = 0; c < d_v; ++c) {
            const LongDouble a_ref = r.acc[static_cast<std::size_t>(c)] * alpha;
            const LongDouble got = acc[static_cast<std::size_t>(i * ld_acc + c)];
            EXPECT_LE(std::fabs(got - a_ref), std::fabs(a_ref) * (alpha_rel + u)) << "c=" << c;
          }
        }
      }
    }
  }
}

TYPED_TEST(MicroKernelTest, DirectKernelsAreExactOnDyadicInputsAndWriteOnlyTheirColumns) {
  using T = TypeParam;
  constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
  auto rng = blockattn::test::make_rng(/*salt=*/25);
  // rows 8 and 9: a full register block of rows (kDirectBlockRows) and one more.
  for (Index rows : {1, 2, 5, 8, 9}) {
    for (Index n_keys : {1, 3, 4, 5, 67}) {
      for (Index d : {Index(1), Index(3), Index(kLanes<T> + 1), Index(64), Index(257)}) {
        SCOPED_TRACE("rows=" + std::to_string(rows) + " n_keys=" + std::to_string(n_keys) + " d=" +
                     std::to_string(d) + " " + isa_trace() + " " + blockattn::test::seed_trace());
        // Dyadic inputs as in the packed tests: every sum is exact, in any order; tolerance 0.
        const Matrix<T> q = blockattn::test::random_matrix<T>(rng, rows, d + 1);
        const Matrix<T> k = blockattn::test::random_matrix<T>(rng, n_keys, d + 2);
        const Matrix<T> v = blockattn::test::random_matrix<T>(rng, n_keys, d + 3);
        const Index ld_s = n_keys + 2;
        std::vector<T> s(static_cast<std::size_t>(rows * ld_s), kNaN);
        blockattn::detail::score_rows_direct(q.data(), d + 1, rows, d, k.data(), d + 2, n_keys,
                                             s.data(), ld_s);
        const Index ld_acc = d + 1;  // here d_v = d
        std::vector<T> acc(static_cast<std::size_t>(rows * ld_acc), kNaN);
        for (Index i = 0; i < rows; ++i) {
          for (Index c = 0; c < d; ++c) {
            acc[static_cast<std::size_t>(i * ld_acc + c)] = blockattn::test::random_value<T>(rng);
          }
        }
        const std::vector<T> acc0 = acc;
        // p = the scores, which are dyadic too (multiples of 2^-12 below 257 in magnitude).
        blockattn::detail::accumulate_pv_direct(s.data(), ld_s, rows, n_keys, v.data(), d + 3, d,
                                                acc.data(), ld_acc);
        for (Index i = 0; i < rows; ++i) {
          for (Index j = 0; j < ld_s; ++j) {
            const T got = s[static_cast<std::size_t>(i * ld_s + j)];
            if (j >= n_keys) {
              ASSERT_TRUE(std::isnan(got)) << "wrote past n_keys at " << i << "," << j;
              continue;
            }
            LongDouble ref = 0;
            for (Index c = 0; c < d; ++c) ref += static_cast<LongDouble>(q(i, c)) * k(j, c);
            ASSERT_EQ(static_cast<LongDouble>(got), ref) << "s at " << i << "," << j;
          }
          for (Index c = 0; c < ld_acc; ++c) {
            const auto at = static_cast<std::size_t>(i * ld_acc + c);
            if (c >= d) {
              ASSERT_TRUE(std::isnan(acc[at])) << "wrote past d_v at " << i << "," << c;
              continue;
            }
            LongDouble ref = acc0[at];
            for (Index j = 0; j < n_keys; ++j) {
              ref += static_cast<LongDouble>(s[static_cast<std::size_t>(i * ld_s + j)]) * v(j, c);
            }
            // Terms are multiples of 2^-18 (s: 2^-12, v: 2^-6) below 2^15 in magnitude: 33 bits,
            // exact in double, not in float; the bound is the summation's (n_keys + 1)·u·Σ|terms|.
            LongDouble magnitude = std::fabs(static_cast<LongDouble>(acc0[at]));
            for (Index j = 0; j < n_keys; ++j) {
              magnitude += std::fabs(
                  static_cast<LongDouble>(s[static_cast<std::size_t>(i * ld_s + j)]) * v(j, c));
            }
            const LongDouble tol = (static_cast<LongDouble>(n_keys) + 1) *
                                   blockattn::test::unit_roundoff<T>() * magnitude;
            ASSERT_LE(std::fabs(static_cast<LongDouble>(acc[at]) - ref), tol)
                << "acc at " << i << "," << c;
          }
        }
      }
    }
  }
}

// A direct score does not depend on how the kernel blocks rows and keys: every score of a
// many-row, many-key call is bitwise the score of that row and key alone (one FMA chain, one
// reduce_add). Inputs with 24 significant bits and magnitudes over 2^±20, so that a different
// summation order would change the rounded result.
TYPED_TEST(MicroKernelTest, DirectScoresDoNotDependOnTheBlocking) {
  using T = TypeParam;
  auto rng = blockattn::test::make_rng(/*salt=*/32);
  std::uniform_real_distribution<double> mantissa(-1.0, 1.0);
  std::uniform_int_distribution<int> exponent(-20, 20);
  const auto fill = [&](Matrix<T>& m) {
    for (Index i = 0; i < m.size(); ++i) {
      m.data()[i] = static_cast<T>(std::ldexp(mantissa(rng), exponent(rng)));
    }
  };
  for (Index rows : {1, 2, 3, 8, 9}) {
    for (Index d : {Index(19), Index(64)}) {
      SCOPED_TRACE("rows=" + std::to_string(rows) + " d=" + std::to_string(d) + " " + isa_trace() +
                   " " + blockattn::test::seed_trace());
      const Index n_keys = 37;
      Matrix<T> q(rows, d);
      Matrix<T> k(n_keys, d);
      fill(q);
      fill(k);
      Matrix<T> s(rows, n_keys);
      blockattn::detail::score_rows_direct(q.data(), d, rows, d, k.data(), d, n_keys, s.data(),
                                           n_keys);
      for (Index i = 0; i < rows; ++i) {
        for (Index j = 0; j < n_keys; ++j) {
          T alone = 0;
          blockattn::detail::score_rows_direct(q.row(i).data(), d, 1, d, k.row(j).data(), d, 1,
                                               &alone, 1);
          ASSERT_EQ(std::memcmp(&alone, &s(i, j), sizeof(T)), 0)
              << "score " << i << "," << j << ": " << s(i, j) << " != " << alone;
        }
      }
    }
  }
}

TYPED_TEST(MicroKernelTest, TileAttentionForwardMatchesNaiveAttention) {
  using T = TypeParam;
  constexpr LongDouble u = blockattn::test::unit_roundoff<T>();
  auto rng = blockattn::test::make_rng(/*salt=*/24);
  struct Case {
    Index n_q, n_k, d, d_v, query_block, key_block;
  };
  const std::vector<Case> cases = {
      {1, 1, 1, 1, 1, 1},
      {7, 13, 3, 5, 3, 4},
      {13, 127, 64, 64, 6, 32},
      {31, 67, 16, 3, 8, 64},
      {20, 40, 257, 17, 7, 13},
      {5, 100, 64, 128, 64, 256},
      // query_block > kTileRows: several score tiles share one packed chunk, the last one short.
      {250, 70, 5, 7, 200, 32}};
  for (const Case& c : cases) {
    SCOPED_TRACE("n_q=" + std::to_string(c.n_q) + " n_k=" + std::to_string(c.n_k) +
                 " d=" + std::to_string(c.d) + " d_v=" + std::to_string(c.d_v) +
                 " qb=" + std::to_string(c.query_block) + " kb=" + std::to_string(c.key_block) +
                 " " + isa_trace() + " " + blockattn::test::seed_trace());
    const Matrix<T> q = blockattn::test::random_matrix<T>(rng, c.n_q, c.d, -2.0, 2.0);
    const Matrix<T> k = blockattn::test::random_matrix<T>(rng, c.n_k, c.d, -2.0, 2.0);
    const Matrix<T> v = blockattn::test::random_matrix<T>(rng, c.n_k, c.d_v);
    const T scale = T(1) / std::sqrt(static_cast<T>(c.d));
    Matrix<T> out(c.n_q, c.d_v);
    std::vector<T> workspace(
        static_cast<std::size_t>(blockattn::bench::tile_attention_workspace_size<T>(
            c.query_block, c.key_block, c.d, c.d_v)));
    blockattn::bench::tile_attention_forward(q.data(), c.d, k.data(), c.d, v.data(), c.d_v, c.n_q,
                                             c.n_k, c.d, c.d_v, scale, out.data(), c.d_v,
                                             c.query_block, c.key_block, workspace.data());
    for (Index i = 0; i < c.n_q; ++i) {
      std::vector<LongDouble> x(static_cast<std::size_t>(c.n_k));
      LongDouble a = 0;
      LongDouble mx = -std::numeric_limits<LongDouble>::infinity();
      for (Index j = 0; j < c.n_k; ++j) {
        LongDouble dot = 0;
        LongDouble abs_dot = 0;
        for (Index f = 0; f < c.d; ++f) {
          dot += static_cast<LongDouble>(q(i, f)) * k(j, f);
          abs_dot += std::fabs(static_cast<LongDouble>(q(i, f)) * k(j, f));
        }
        x[static_cast<std::size_t>(j)] = dot * static_cast<LongDouble>(scale);
        a = std::max(a, abs_dot * static_cast<LongDouble>(scale));
        mx = std::max(mx, x[static_cast<std::size_t>(j)]);
      }
      LongDouble sum = 0;
      for (LongDouble& xj : x) sum += (xj = std::exp(xj - mx));
      // The house tolerance (STYLE §2.10): 4·u·(d·A + n_k + 8)·max|v|, max|v| <= 1.
      const LongDouble tol =
          4 * u * (static_cast<LongDouble>(c.d) * a + static_cast<LongDouble>(c.n_k) + 8);
      for (Index col = 0; col < c.d_v; ++col) {
        LongDouble ref = 0;
        for (Index j = 0; j < c.n_k; ++j) ref += x[static_cast<std::size_t>(j)] * v(j, col);
        ASSERT_LE(std::fabs(static_cast<LongDouble>(out(i, col)) - ref / sum), tol)
            << "at " << i << "," << col;
      }
    }
  }
}

}  // namespace

}  // namespace simd_test
