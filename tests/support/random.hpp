#pragma once
// Seeded random inputs. The seed is BLOCKATTN_TEST_SEED when set (soak runs), a fixed default
// otherwise (reproducible CI); tests print it through seed_trace().

#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>

#include <blockattn/types.hpp>

namespace blockattn::test {

inline std::uint64_t test_seed() {
  if (const char* env = std::getenv("BLOCKATTN_TEST_SEED")) return std::strtoull(env, nullptr, 10);
  return 20261129;
}

/// "seed=<n>", for SCOPED_TRACE: a failure names the seed that reproduces it.
inline std::string seed_trace() { return "seed=" + std::to_string(test_seed()); }

/// A generator seeded from the test seed and a per-test salt, so tests do not share streams.
inline std::mt19937_64 make_rng(std::uint64_t salt = 0) {
  return std::mt19937_64(test_seed() * 0x9E3779B97F4A7C15ULL + salt);
}

/// A value uniform in [lo, hi], rounded to a multiple of 1/64 so that products and sums of a few
/// such values are exact in float and the long double reference sees exactly the same inputs.
template <class T>
T random_value(std::mt19937_64& rng, double lo = -1.0, double hi = 1.0) {
  std::uniform_real_distribution<double> dist(lo, hi);
  return static_cast<T>(std::round(dist(rng) * 64.0) / 64.0);
}

/// A rows×cols row-major matrix of random_value()s.
template <class T>
Matrix<T> random_matrix(std::mt19937_64& rng, Index rows, Index cols, double lo = -1.0,
                        double hi = 1.0) {
  Matrix<T> m(rows, cols);
  for (Index r = 0; r < rows; ++r) {
    for (Index c = 0; c < cols; ++c) m(r, c) = random_value<T>(rng, lo, hi);
  }
  return m;
}

/// The same matrix in another scalar type (the reference runs on the rounded inputs, cast up).
template <class To, class From>
Matrix<To> cast_matrix(const Matrix<From>& m) {
  return m.template cast<To>();
}

}  // namespace blockattn::test
