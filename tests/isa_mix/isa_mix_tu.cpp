// Compiled once per ISA (tests/isa_mix/CMakeLists.txt), each copy with its own flags and
// -DISA_MIX_TU=<name>: runs blockattn::attention on fixed inputs and reports which SIMD path ran.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <blockattn/attention.hpp>

#include "isa_mix.hpp"

#define ISA_MIX_CAT_(a, b) a##b
#define ISA_MIX_CAT(a, b) ISA_MIX_CAT_(a, b)

IsaMixResult ISA_MIX_CAT(isa_mix_run_, ISA_MIX_TU)() {
  // n_k = 53 keys (not a multiple of any lane count: the partial-vector tails run too), d = 64.
  constexpr int kQueries = 37, kKeys = 53, kDim = 64;
  blockattn::Matrix<float> q(kQueries, kDim), k(kKeys, kDim), v(kKeys, kDim), out(kQueries, kDim);
  std::uint32_t state = 12345;  // the same inputs in every TU
  auto next = [&state] {
    state = state * 1664525U + 1013904223U;
    return static_cast<float>(state >> 8) / static_cast<float>(1U << 24) * 2.0F - 1.0F;
  };
  for (blockattn::Index i = 0; i < q.size(); ++i) q.data()[i] = next();
  for (blockattn::Index i = 0; i < k.size(); ++i) k.data()[i] = next();
  for (blockattn::Index i = 0; i < v.size(); ++i) v.data()[i] = next();
  blockattn::AttentionOptions options;
  options.threads = 1;
  blockattn::attention(q, k, v, out, options);

  // The exact result, in double, with plain loops (no blockattn code).
  double max_error = 0;
  const double scale = 1.0 / std::sqrt(double{kDim});
  std::vector<double> p(kKeys);
  for (int i = 0; i < kQueries; ++i) {
    double m = -std::numeric_limits<double>::infinity();
    for (int j = 0; j < kKeys; ++j) {
      double s = 0;
      for (int c = 0; c < kDim; ++c)
        s += static_cast<double>(q(i, c)) * static_cast<double>(k(j, c));
      p[static_cast<std::size_t>(j)] = s * scale;
      m = std::fmax(m, s * scale);
    }
    double l = 0;
    for (double& x : p) l += (x = std::exp(x - m));
    for (int c = 0; c < kDim; ++c) {
      double o = 0;
      for (int j = 0; j < kKeys; ++j)
        o += p[static_cast<std::size_t>(j)] * static_cast<double>(v(j, c));
      max_error = std::fmax(max_error, std::fabs(o / l - static_cast<double>(out(i, c))));
    }
  }
  std::uint64_t hash = 14695981039346656037ULL;
  for (blockattn::Index i = 0; i < out.size(); ++i) {
    std::uint32_t bits = 0;
    std::memcpy(&bits, out.data() + i, sizeof bits);
    hash = (hash ^ bits) * 1099511628211ULL;
  }
  return {blockattn::detail::simd::Simd<float>::kName, BLOCKATTN_ISA_NAMESPACE_NAME,
          blockattn::simd_isa(), max_error, hash};
}
