// blockattn::dispatch (dispatch.hpp): the variant it picks under each BLOCKATTN_MAX_ISA cap, its
// results against the header-only attention() of this translation unit, and its errors.
// tests/CMakeLists.txt builds this file once per x86-64 ISA (sse2, avx2, avx512, avx512_bf16: the
// library's variant flags) and runs each executable under every cap. Where the dispatched variant
// is this executable's own ISA, dispatch and header call compile the same code with the same
// flags and run it on the same data, so they must be bitwise equal: that checks that every
// argument, option and element type crosses the plain-struct boundary intact. Under the other
// caps the two differ only in rounding (vector width; bf16 dot products against widened float),
// within the tolerances at expect_dispatch_matches_header. Every element-type pair attention()
// takes is checked: float, double, bfloat16, half, and float q/out over bfloat16 or half K/V.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>

#include <blockattn/attention.hpp>
#include <blockattn/detail/bf16_dot.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/dispatch.hpp>

#include "support/random.hpp"
#include "support/tolerance.hpp"

namespace dispatch_test {
namespace {

using blockattn::AttentionOptions;
using blockattn::BlockSparseLayout;
using blockattn::Index;
using blockattn::Span;
using blockattn::TensorView;
using blockattn::test::make_rng;
using blockattn::test::random_value;
using blockattn::test::seed_trace;

/// The cap the environment sets ("" when unset).
std::string cap() {
  const char* value = std::getenv("BLOCKATTN_MAX_ISA");  // NOLINT(concurrency-mt-unsafe)
  return value == nullptr ? std::string() : std::string(value);
}

bool known_cap(const std::string& value) {
  return value.empty() || value == "sse2" || value == "avx2" || value == "avx512" ||
         value == "avx512_bf16";
}

/// The variant the dispatcher must pick: the CPU's best (from the compiler's CPU-feature
/// builtins, independent of the dispatcher's own CPUID code) under the cap.
std::string expected_variant() {
  __builtin_cpu_init();
  int best = 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
  if (best == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    best = 2;
  }
  if (best == 2 && __builtin_cpu_supports("avx512bf16")) best = 3;
  const std::string limit = cap();
  const int capped = limit == "sse2" ? 0 : limit == "avx2" ? 1 : limit == "avx512" ? 2 : 3;
  const char* names[] = {"sse2", "avx2+fma", "avx512", "avx512_bf16"};
  return names[std::min(best, capped)];
}

/// This executable's own variant, named as dispatch::isa() names them.
const char* own_variant() {
#if defined(BLOCKATTN_BF16_DOT)
  return "avx512_bf16";
#else
  return blockattn::detail::simd::Simd<float>::kName;
#endif
}

TEST(DispatchTest, PicksTheBestVariantUnderTheCap) {
  if (!known_cap(cap())) GTEST_SKIP() << "BLOCKATTN_MAX_ISA=" << cap() << ": see UnknownCap";
  std::printf("dispatch runs %s (cap \"%s\"); this executable's own variant is %s\n",
              blockattn::dispatch::isa(), cap().c_str(), own_variant());
  EXPECT_STREQ(blockattn::dispatch::isa(), expected_variant().c_str());
}

TEST(DispatchTest, UnknownCapIsRejectedWithItsName) {
  if (known_cap(cap())) GTEST_SKIP() << "run with BLOCKATTN_MAX_ISA set to an unknown value";
  try {
    (void)blockattn::dispatch::isa();
    FAIL() << "BLOCKATTN_MAX_ISA=" << cap() << " was accepted";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("BLOCKATTN_MAX_ISA"), std::string::npos)
        << error.what();
    EXPECT_NE(std::string(error.what()).find(cap()), std::string::npos) << error.what();
  }
}

/// One random batched problem in BSHD layout with random options (every mask kind at random); q
/// and out of element type T, k and v of KT.
template <class T, class KT = T>
struct Problem {
  Index batch, n_q, n_k, heads, kv_heads, d, d_v;
  std::vector<T> q;
  std::vector<KT> k, v;
  std::vector<Index> key_lengths;
  std::vector<double> slopes;
  std::vector<double> sinks;
  BlockSparseLayout sparse;
  AttentionOptions options;
  std::string description;

  TensorView<const T> q_view() const { return view(q.data(), n_q, heads, d); }
  TensorView<const KT> k_view() const { return view(k.data(), n_k, kv_heads, d); }
  TensorView<const KT> v_view() const { return view(v.data(), n_k, kv_heads, d_v); }
  template <class P>
  TensorView<P> view(P* data, Index seq, Index h, Index dim) const {
    return blockattn::make_tensor_view(data, batch, seq, h, dim);
  }
  std::size_t out_size() const { return static_cast<std::size_t>(batch * n_q * heads * d_v); }
  std::size_t lse_size() const { return static_cast<std::size_t>(batch * heads * n_q); }
};

template <class T, class KT>
Problem<T, KT> random_problem(std::mt19937_64& rng) {
  const auto pick = [&](std::initializer_list<Index> values) {
    std::uniform_int_distribution<std::size_t> at(0, values.size() - 1);
    return *(values.begin() + at(rng));
  };
  const auto coin = [&] { return std::bernoulli_distribution(0.5)(rng); };
  Problem<T, KT> p;
  p.batch = pick({1, 2});
  p.n_q = pick({1, 7, 33});
  p.n_k = pick({1, 19, 70});
  p.d = pick({1, 8, 17, 64});
  p.d_v = pick({1, 5, 16});
  p.kv_heads = pick({1, 2});
  p.heads = p.kv_heads * pick({1, 2});
  // Multiples of 1/64 in [-1, 1]: exact in every element type, bfloat16 included.
  const auto fill = [&](auto& data, Index seq, Index h, Index dim) {
    using E = typename std::decay_t<decltype(data)>::value_type;
    data.resize(static_cast<std::size_t>(p.batch * seq * h * dim));
    for (E& x : data) x = random_value<E>(rng);
  };
  fill(p.q, p.n_q, p.heads, p.d);
  fill(p.k, p.n_k, p.kv_heads, p.d);
  fill(p.v, p.n_k, p.kv_heads, p.d_v);
  AttentionOptions& o = p.options;
  o.query_chunk = pick({0, 5, 16});
  o.key_chunk = pick({0, 6, 32});
  o.causal = coin();
  if (coin()) o.window_left = pick({0, 3, 20});
  if (coin()) {
    for (Index b = 0; b < p.batch; ++b) p.key_lengths.push_back(pick({0, 1, p.n_k}));
    o.key_lengths = p.key_lengths;
  }
  if (coin()) {
    for (Index h = 0; h < p.heads; ++h) p.slopes.push_back(0.5 / static_cast<double>(h + 1));
    o.alibi_slopes = p.slopes;
  }
  if (coin()) o.softcap = 5;
  if (coin()) {
    for (Index h = 0; h < p.heads; ++h) p.sinks.push_back(h % 2 == 0 ? 0.5 : 2.0);
    o.sinks = p.sinks;
  }
  if (coin()) {
    const Index block = 8;
    const Index qb = (p.n_q + block - 1) / block;
    const Index kb = (p.n_k + block - 1) / block;
    p.sparse = BlockSparseLayout(p.heads, qb, kb, block, block);
    for (Index h = 0; h < p.heads; ++h) {
      for (Index i = 0; i < qb; ++i) {
        for (Index j = 0; j < kb; ++j) {
          if (coin()) p.sparse.set(h, i, j);
        }
      }
    }
    o.block_sparse = &p.sparse;
  }
  p.description =
      "batch=" + std::to_string(p.batch) + " n_q=" + std::to_string(p.n_q) +
      " n_k=" + std::to_string(p.n_k) + " heads=" + std::to_string(p.heads) + "/" +
      std::to_string(p.kv_heads) + " d=" + std::to_string(p.d) + " d_v=" + std::to_string(p.d_v) +
      (o.causal ? " causal" : "") + (o.window_left >= 0 ? " window" : "") +
      (p.key_lengths.empty() ? "" : " key_lengths") + (p.slopes.empty() ? "" : " alibi") +
      (o.softcap > 0 ? " softcap" : "") + (p.sinks.empty() ? "" : " sinks") +
      (o.block_sparse != nullptr ? " block_sparse" : "") + " " + seed_trace();
  return p;
}

/// Dispatched and header-only results of the same problems (q and out of T, k and v of KT):
/// bitwise equal when the dispatched variant is this executable's; otherwise within
///   tol = 2·4·u·(d·A + E + n_k + 8)·max|v|   (u of the compute type: float for 16-bit storage)
/// i.e. twice attention()'s bound (tests/support/tolerance.hpp), each result being within one
/// bound of the exact one, with A <= scale·d since |q|, |k| <= 1, E the ALiBi, soft-cap and sink
/// magnitude, max|v| <= 1. The bf16 dot-product scores of the avx512_bf16 variant (all-bfloat16
/// calls) are sums of exact bf16 products rounded once per addition and scaled once at the end,
/// against the widened path's FMA chain over scale·q: both within d·u·Σ|q||k| (+ u·|s|) of the
/// exact score, which the bound's d·A term covers (the factor 2 takes the scale's rounding).
/// 16-bit out adds, in the tolerance of out only: each result's one rounding to T, u_T·|out| <=
/// u_T per side (|out| <= max|v| <= 1), so 2·u_T; and for bfloat16, the dot path's P rounded to
/// bf16 before P·V, which moves out by at most u_bf16·Σ p·|v| / l <= u_bf16 = 2^-8. lse (float
/// or double, never rounded to 16 bits) keeps tol; a −inf lse (no visible key) must match exactly.
template <class T, class KT = T>
void expect_dispatch_matches_header(std::uint64_t salt) {
  using A = blockattn::accumulator_t<T>;
  const bool same_code = std::strcmp(blockattn::dispatch::isa(), own_variant()) == 0;
  auto rng = make_rng(salt);
  for (int trial = 0; trial < 40; ++trial) {
    const Problem<T, KT> p = random_problem<T, KT>(rng);
    SCOPED_TRACE(p.description);
    std::vector<T> out(p.out_size(), std::numeric_limits<T>::quiet_NaN());
    std::vector<A> lse(p.lse_size(), std::numeric_limits<A>::quiet_NaN());
    std::vector<T> expected = out;
    std::vector<A> expected_lse = lse;
    blockattn::dispatch::attention(p.q_view(), p.k_view(), p.v_view(),
                                   p.view(out.data(), p.n_q, p.heads, p.d_v), p.options,
                                   Span<A>(lse.data(), static_cast<Index>(lse.size())));
    blockattn::attention(p.q_view(), p.k_view(), p.v_view(),
                         p.view(expected.data(), p.n_q, p.heads, p.d_v), p.options,
                         Span<A>(expected_lse.data(), static_cast<Index>(expected_lse.size())));
    if (same_code) {
      ASSERT_EQ(0, std::memcmp(out.data(), expected.data(), out.size() * sizeof(T)));
      ASSERT_EQ(0, std::memcmp(lse.data(), expected_lse.data(), lse.size() * sizeof(A)));
      continue;
    }
    const double u = static_cast<double>(blockattn::test::unit_roundoff<A>());
    const double scale = 1 / std::sqrt(static_cast<double>(p.d));
    const double extra = p.options.softcap +
                         (p.slopes.empty() ? 0.0 : 0.5 * double(p.n_q + p.n_k)) +
                         (p.sinks.empty() ? 0.0 : 2.0);  // the sink's exp argument
    const double tol = 2 * 4 * u *
                       (static_cast<double>(p.d) * scale * static_cast<double>(p.d) + extra +
                        static_cast<double>(p.n_k) + 8);
    double out_tol = tol;
    if constexpr (!std::is_same_v<T, A>) {
      out_tol += 2 * std::ldexp(1.0, -std::numeric_limits<T>::digits);  // 2·u_T
      if constexpr (std::is_same_v<T, Eigen::bfloat16>) out_tol += std::ldexp(1.0, -8);
    }
    for (std::size_t i = 0; i < out.size(); ++i) {
      ASSERT_NEAR(static_cast<double>(out[i]), static_cast<double>(expected[i]), out_tol)
          << "out " << i;
    }
    for (std::size_t i = 0; i < lse.size(); ++i) {
      if (std::isinf(expected_lse[i])) {
        ASSERT_EQ(lse[i], expected_lse[i]) << "lse " << i;
      } else {
        ASSERT_NEAR(static_cast<double>(lse[i]), static_cast<double>(expected_lse[i]), tol)
            << "lse " << i;
      }
    }
  }
}

TEST(DispatchTest, FloatMatchesTheHeaderCall) {
  if (!known_cap(cap())) GTEST_SKIP();
  expect_dispatch_matches_header<float>(1);
}

TEST(DispatchTest, DoubleMatchesTheHeaderCall) {
  if (!known_cap(cap())) GTEST_SKIP();
  expect_dispatch_matches_header<double>(2);
}

TEST(DispatchTest, Bfloat16MatchesTheHeaderCall) {
  if (!known_cap(cap())) GTEST_SKIP();
  expect_dispatch_matches_header<Eigen::bfloat16>(3);
}

TEST(DispatchTest, HalfMatchesTheHeaderCall) {
  if (!known_cap(cap())) GTEST_SKIP();
  expect_dispatch_matches_header<Eigen::half>(4);
}

TEST(DispatchTest, FloatOverBfloat16CacheMatchesTheHeaderCall) {
  if (!known_cap(cap())) GTEST_SKIP();
  expect_dispatch_matches_header<float, Eigen::bfloat16>(5);
}

TEST(DispatchTest, FloatOverHalfCacheMatchesTheHeaderCall) {
  if (!known_cap(cap())) GTEST_SKIP();
  expect_dispatch_matches_header<float, Eigen::half>(6);
}

// The plain-data entry point rejects a pair of element types attention() does not take (the
// typed entry point cannot form one: it is a compile-time error there), naming both, before
// writing anything.
TEST(DispatchTest, UnknownElementPairIsRejected) {
  if (!known_cap(cap())) GTEST_SKIP();
  std::vector<float> q(8, 0.5F);
  std::vector<double> kv(8, 0.5);
  std::vector<float> out(8, -1.0F);
  blockattn_dispatch::AttentionCall call;
  call.q = {q.data(), 1, 1, 1, 8, 8, 8, 8};
  call.k = {kv.data(), 1, 1, 1, 8, 8, 8, 8};
  call.v = call.k;
  call.out = {out.data(), 1, 1, 1, 8, 8, 8, 8};
  call.q_type = blockattn_dispatch::Element::kFloat;
  call.kv_type = blockattn_dispatch::Element::kDouble;
  try {
    blockattn_dispatch::attention(call);
    FAIL() << "float q over double k/v was accepted";
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("float"), std::string::npos) << message;
    EXPECT_NE(message.find("double"), std::string::npos) << message;
  }
  for (const float x : out) EXPECT_EQ(x, -1.0F);
}

// A validation error inside the variant reaches the caller as attention()'s own
// std::invalid_argument, and nothing is written.
TEST(DispatchTest, BadArgumentsThrowBeforeWriting) {
  if (!known_cap(cap())) GTEST_SKIP();
  std::vector<float> q(2 * 8, 0.5F);
  std::vector<float> k(3 * 7, 0.5F);  // d = 7 against q's 8
  std::vector<float> v(3 * 4, 0.5F);
  std::vector<float> out(2 * 4, -1.0F);
  try {
    blockattn::dispatch::attention(blockattn::make_tensor_view<const float>(q.data(), 1, 2, 1, 8),
                                   blockattn::make_tensor_view<const float>(k.data(), 1, 3, 1, 7),
                                   blockattn::make_tensor_view<const float>(v.data(), 1, 3, 1, 4),
                                   blockattn::make_tensor_view(out.data(), 1, 2, 1, 4));
    FAIL() << "a q/k feature mismatch was accepted";
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("attention"), std::string::npos) << message;
    EXPECT_NE(message.find('8'), std::string::npos) << message;
    EXPECT_NE(message.find('7'), std::string::npos) << message;
  }
  for (const float x : out) EXPECT_EQ(x, -1.0F);
}

}  // namespace

}  // namespace dispatch_test
