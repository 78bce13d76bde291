// detail/convert.hpp: the SIMD widening loads and rounding stores of bf16 and half agree bitwise
// with Eigen's scalar conversions, on every bit pattern (widening) and on the rounding cases that
// matter (ties, overflow, denormals, NaN, infinities) plus random floats (narrowing), through full
// vectors and tails.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include <blockattn/detail/convert.hpp>

namespace convert_test {
namespace {

using blockattn::Index;

template <class S>
S from_bits(std::uint16_t bits) {
  return Eigen::numext::bit_cast<S>(bits);
}

template <class S>
std::uint16_t bits_of(S s) {
  return Eigen::numext::bit_cast<std::uint16_t>(s);
}

std::uint32_t float_bits(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

template <class S>
class ConvertTest : public ::testing::Test {};
using StorageTypes = ::testing::Types<Eigen::bfloat16, Eigen::half>;
TYPED_TEST_SUITE(ConvertTest, StorageTypes, );

// Every one of the 65,536 patterns widens to exactly the float Eigen gives (a NaN to a NaN of the
// same sign). Lengths 65,536 and 65,535 run the full-vector loop and a tail.
TYPED_TEST(ConvertTest, WidenMatchesEigenOnEveryBitPattern) {
  using S = TypeParam;
  std::vector<S> src(65536);
  for (std::uint32_t b = 0; b < 65536; ++b) src[b] = from_bits<S>(static_cast<std::uint16_t>(b));
  for (std::size_t n : {65536u, 65535u, 1u, 0u}) {
    std::vector<float> dst(65536, -1.0f);
    blockattn::detail::widen(src.data(), static_cast<Index>(n), dst.data());
    for (std::size_t i = 0; i < n; ++i) {
      const float expected = static_cast<float>(src[i]);
      if (std::isnan(expected)) {
        ASSERT_TRUE(std::isnan(dst[i])) << "bits " << i;
        ASSERT_EQ(std::signbit(expected), std::signbit(dst[i])) << "bits " << i;
      } else {
        ASSERT_EQ(float_bits(expected), float_bits(dst[i])) << "bits " << i << ", n = " << n;
      }
    }
    for (std::size_t i = n; i < dst.size(); ++i)
      ASSERT_EQ(dst[i], -1.0f) << "written past n at " << i;
  }
}

// Narrowing rounds to nearest even exactly as Eigen's scalar constructor: the floats next to every
// rounding boundary of the format (each pattern's float, and the midpoints to its neighbour with
// one float ulp either side), the specials, and random floats of every magnitude.
TYPED_TEST(ConvertTest, NarrowMatchesEigenOnBoundariesAndRandomFloats) {
  using S = TypeParam;
  std::vector<float> src;
  for (std::uint32_t b = 0; b < 65536; b += 7) {
    const float x = static_cast<float>(from_bits<S>(static_cast<std::uint16_t>(b)));
    const float next = static_cast<float>(from_bits<S>(static_cast<std::uint16_t>(b + 1)));
    src.push_back(x);
    if (std::isfinite(x) && std::isfinite(next) && std::signbit(x) == std::signbit(next)) {
      const float mid = x + (next - x) / 2;  // exact: one more bit than the format
      src.push_back(mid);
      src.push_back(std::nextafter(mid, next));
      src.push_back(std::nextafter(mid, x));
    }
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (float x : {0.0f, -0.0f, inf, -inf, std::numeric_limits<float>::quiet_NaN(),
                  -std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::denorm_min(), 65504.0f, 65520.0f, 65519.99f}) {
    src.push_back(x);
  }
  std::mt19937 rng(17);
  std::uniform_int_distribution<std::uint32_t> bits(0, 0xffffffffu);
  for (int i = 0; i < 20000; ++i) {
    const std::uint32_t b = bits(rng);
    float x;
    std::memcpy(&x, &b, sizeof x);
    src.push_back(x);
  }
  for (std::size_t n : {src.size(), src.size() - 3}) {
    std::vector<S> dst(src.size(), from_bits<S>(0x1234));
    blockattn::detail::narrow(src.data(), static_cast<Index>(n), dst.data());
    for (std::size_t i = 0; i < n; ++i) {
      const S expected = static_cast<S>(src[i]);
      if (std::isnan(src[i])) {
        ASSERT_TRUE(std::isnan(static_cast<float>(dst[i]))) << "input " << src[i];
        ASSERT_EQ(std::signbit(src[i]), std::signbit(static_cast<float>(dst[i])));
      } else {
        ASSERT_EQ(bits_of(expected), bits_of(dst[i]))
            << "input " << src[i] << " (float bits " << std::hex << float_bits(src[i]) << ")";
      }
    }
    for (std::size_t i = n; i < src.size(); ++i) ASSERT_EQ(bits_of(dst[i]), 0x1234);
  }
}

}  // namespace

}  // namespace convert_test
