// attention_varlen(): packed variable-length batches (cu_seqlens_q / cu_seqlens_k). Oracles:
//   1. attention() on each sequence alone (its rows of the packed buffers as a [1, n, H, d] view):
//      bitwise equal, out and lse — every test shape here keeps each sequence's plan (the varlen
//      balance rule only touches prefill sequences of more than 8192 keys), so the same tiles
//      run in the same order;
//   2. blockattn::reference in long double on the same inputs, within the float tolerance of
//      support/tolerance.hpp (E = the largest |score modifier| of the case);
//   3. 1 and 2 threads: bitwise equal;
//   4. the plan of 1 long + 63 short sequences (100,000 keys; planned, not run) keeps 2, 4 and 8
//      threads busy under the loop's dynamic schedule, simulated from the plan's task costs.
// Mutations tried (each fails here): keys read from cu_seqlens_q's offsets instead of
// cu_seqlens_k's (MatchesEachSequenceAlone), the balance rule off (kVarlenBalanceTasks loop
// skipped: BalancedPlanKeepsEveryThreadBusy at 8 threads), the monotonicity check off
// (BadInputThrowsBeforeWriting).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <queue>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <blockattn/attention_varlen.hpp>
#include <blockattn/reference.hpp>

#include "support/bits.hpp"
#include "support/random.hpp"
#include "support/tolerance.hpp"

namespace attention_varlen_test {
namespace {
using blockattn::test::count;
using blockattn::test::same_bits;

using blockattn::AttentionOptions;
using blockattn::Index;
using blockattn::TensorView;
using blockattn::test::make_rng;
using blockattn::test::seed_trace;

constexpr float kInf = std::numeric_limits<float>::infinity();

/// A packed batch in float: sequence s has lengths[s] = {n_q, n_k}; q [1, total_q, H, d], k
/// [1, total_k, H_kv, d], v [1, total_k, H_kv, d_v], contiguous.
struct Batch {
  Index heads = 1, kv_heads = 1, d = 1, d_v = 1;
  std::vector<std::int32_t> cu_q{0}, cu_k{0};
  std::vector<float> q, k, v;

  Batch(Index heads_, Index kv_heads_, Index d_, Index d_v_,
        const std::vector<std::pair<Index, Index>>& lengths, std::mt19937_64& rng)
      : heads(heads_), kv_heads(kv_heads_), d(d_), d_v(d_v_) {
    for (const auto& [n_q, n_k] : lengths) {
      cu_q.push_back(static_cast<std::int32_t>(cu_q.back() + n_q));
      cu_k.push_back(static_cast<std::int32_t>(cu_k.back() + n_k));
    }
    const auto fill = [&](std::vector<float>& x, Index n) {
      x.resize(count(n));
      for (float& e : x) e = blockattn::test::random_value<float>(rng, -2.0, 2.0);
    };
    fill(q, total_q() * heads * d);
    fill(k, total_k() * kv_heads * d);
    fill(v, total_k() * kv_heads * d_v);
  }
  Index batch() const { return static_cast<Index>(cu_q.size()) - 1; }
  Index total_q() const { return cu_q.back(); }
  Index total_k() const { return cu_k.back(); }
  Index n_q(Index s) const { return cu_q[count(s) + 1] - cu_q[count(s)]; }
  Index n_k(Index s) const { return cu_k[count(s) + 1] - cu_k[count(s)]; }

  /// The varlen call; out [total_q, H, d_v] and lse [H, total_q] are resized and overwritten.
  template <class MaskMod = blockattn::NoMaskMod, class ScoreMod = blockattn::NoScoreMod>
  void run(const AttentionOptions& options, std::vector<float>& out, std::vector<float>& lse,
           const MaskMod& mask_mod = {}, const ScoreMod& score_mod = {}) const {
    out.assign(count(total_q() * heads * d_v), -1.0f);
    lse.assign(count(heads * total_q()), -1.0f);
    blockattn::attention_varlen(blockattn::make_tensor_view(q.data(), 1, total_q(), heads, d),
                                blockattn::make_tensor_view(k.data(), 1, total_k(), kv_heads, d),
                                blockattn::make_tensor_view(v.data(), 1, total_k(), kv_heads, d_v),
                                blockattn::make_tensor_view(out.data(), 1, total_q(), heads, d_v),
                                cu_q, cu_k, options, blockattn::Span<float>(lse), mask_mod,
                                score_mod);
  }
};

/// mask_mod of sequence `s` called alone (batch index 0) as in the packed call.
template <class F>
struct ShiftedMask {
  F f;
  Index s;
  bool operator()(Index, Index h, Index i, Index j) const { return f(s, h, i, j); }
};

/// score_mod of sequence `s` called alone, likewise.
template <class F>
struct ShiftedScore {
  F f;
  Index s;
  template <class S>
  S operator()(S x, Index, Index h, Index i, Index j) const {
    return f(x, s, h, i, j);
  }
};

template <class F>
auto shift_mask(const F& f, Index s) {
  if constexpr (std::is_same_v<F, blockattn::NoMaskMod>) {
    return f;
  } else {
    return ShiftedMask<F>{f, s};
  }
}

template <class F>
auto shift_score(const F& f, Index s) {
  if constexpr (std::is_same_v<F, blockattn::NoScoreMod>) {
    return f;
  } else {
    return ShiftedScore<F>{f, s};
  }
}

/// The varlen call (1 and 2 threads: bitwise equal) against attention() on each sequence alone
/// (bitwise) and the long double reference (tolerance). `extra`: E of attention_tolerance.
template <class MaskMod = blockattn::NoMaskMod, class ScoreMod = blockattn::NoScoreMod>
void check(const Batch& p, AttentionOptions options, double extra = 0, const MaskMod& mask_mod = {},
           const ScoreMod& score_mod = {}) {
  using Real = long double;
  std::vector<float> out, lse, out2, lse2;
  options.threads = 1;
  p.run(options, out, lse, mask_mod, score_mod);
  options.threads = 2;
  p.run(options, out2, lse2, mask_mod, score_mod);
  EXPECT_TRUE(same_bits(out, out2)) << "the thread count changed out";
  EXPECT_TRUE(same_bits(lse, lse2)) << "the thread count changed lse";
  const Index H = p.heads;
  const double scale = options.scale != 0 ? options.scale : 1 / std::sqrt(double(p.d));
  const std::vector<Index> all_lengths(options.key_lengths.begin(), options.key_lengths.end());
  for (Index s = 0; s < p.batch(); ++s) {
    SCOPED_TRACE("sequence " + std::to_string(s) + ": n_q=" + std::to_string(p.n_q(s)) +
                 " n_k=" + std::to_string(p.n_k(s)));
    const Index n_q = p.n_q(s);
    const Index n_k = p.n_k(s);
    if (n_q == 0) continue;
    AttentionOptions one = options;
    std::vector<Index> length;
    if (!all_lengths.empty()) {
      length.push_back(all_lengths[count(s)]);
      one.key_lengths = length;
    }
    const float* q = p.q.data() + p.cu_q[count(s)] * H * p.d;
    const float* k = p.k.data() + p.cu_k[count(s)] * p.kv_heads * p.d;
    const float* v = p.v.data() + p.cu_k[count(s)] * p.kv_heads * p.d_v;
    std::vector<float> alone(count(n_q * H * p.d_v)), alone_lse(count(H * n_q));
    const auto qv = blockattn::make_tensor_view(q, 1, n_q, H, p.d);
    const auto kv = blockattn::make_tensor_view(k, 1, n_k, p.kv_heads, p.d);
    const auto vv = blockattn::make_tensor_view(v, 1, n_k, p.kv_heads, p.d_v);
    blockattn::attention(qv, kv, vv, blockattn::make_tensor_view(alone.data(), 1, n_q, H, p.d_v),
                         one, blockattn::Span<float>(alone_lse), shift_mask(mask_mod, s),
                         shift_score(score_mod, s));
    const std::vector<Real> ql(q, q + n_q * H * p.d), kl(k, k + n_k * p.kv_heads * p.d),
        vl(v, v + n_k * p.kv_heads * p.d_v);
    std::vector<Real> ref(alone.size()), ref_lse(alone_lse.size());
    blockattn::reference::attention(
        blockattn::make_tensor_view(ql.data(), 1, n_q, H, p.d),
        blockattn::make_tensor_view(kl.data(), 1, n_k, p.kv_heads, p.d),
        blockattn::make_tensor_view(vl.data(), 1, n_k, p.kv_heads, p.d_v),
        blockattn::make_tensor_view(ref.data(), 1, n_q, H, p.d_v), one,
        blockattn::Span<Real>(ref_lse), shift_mask(mask_mod, s), shift_score(score_mod, s));
    const Index group = H / p.kv_heads;
    for (Index h = 0; h < H; ++h) {
      using blockattn::detail::head_slice;
      const blockattn::Matrix<Real> qm =
          head_slice(blockattn::make_tensor_view(ql.data(), 1, n_q, H, p.d), 0, h);
      const blockattn::Matrix<Real> km =
          head_slice(blockattn::make_tensor_view(kl.data(), 1, n_k, p.kv_heads, p.d), 0, h / group);
      const blockattn::Matrix<Real> vm = head_slice(
          blockattn::make_tensor_view(vl.data(), 1, n_k, p.kv_heads, p.d_v), 0, h / group);
      const std::vector<double> tol =
          blockattn::test::attention_tolerance<float>(qm, km, vm, scale, extra);
      const std::vector<double> lse_tol =
          blockattn::test::lse_tolerance<float>(qm, km, scale, extra);
      for (Index i = 0; i < n_q; ++i) {
        SCOPED_TRACE("h=" + std::to_string(h) + " i=" + std::to_string(i));
        const Index row = p.cu_q[count(s)] + i;
        const float got_lse = lse[count(h * p.total_q() + row)];
        const float alone_l = alone_lse[count(h * n_q + i)];
        EXPECT_EQ(std::memcmp(&got_lse, &alone_l, sizeof(float)), 0) << got_lse << " " << alone_l;
        for (Index c = 0; c < p.d_v; ++c) {
          const float got = out[count((row * H + h) * p.d_v + c)];
          const float want = alone[count((i * H + h) * p.d_v + c)];
          ASSERT_EQ(std::memcmp(&got, &want, sizeof(float)), 0)
              << "c=" << c << ": " << got << " vs alone " << want;
          const Real exact = ref[count((i * H + h) * p.d_v + c)];
          if (std::isinf(ref_lse[count(h * n_q + i)])) {
            ASSERT_EQ(got, 0.0f) << "a row with no visible key";
          } else {
            ASSERT_LE(std::abs(double(got) - double(exact)), tol[count(i)]) << "c=" << c;
          }
        }
        if (std::isinf(ref_lse[count(h * n_q + i)])) {
          EXPECT_EQ(got_lse, -kInf);
        } else {
          EXPECT_LE(std::abs(double(got_lse) - double(ref_lse[count(h * n_q + i)])),
                    lse_tol[count(i)]);
        }
      }
    }
  }
}

// Prefill and decode sequences side by side, empty sequences (no queries; queries and no keys:
// out 0, lse −inf), one token, n_q ≠ n_k both ways, ragged chunks, d = 1, d_v ≠ d, GQA and MQA,
// causal (bottom-right per sequence: n_q > n_k leaves the first rows with no key), windows,
// softcap, ALiBi, sinks, key lengths, key segments (a 9000-key decode sequence; short prefill
// split for kMinPrefillBlocks), and user functors that see the sequence index.
TEST(AttentionVarlenTest, MatchesEachSequenceAlone) {
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(1818);
  {
    SCOPED_TRACE("GQA causal, ragged chunks, empty sequences");
    const Batch p(4, 2, 16, 16, {{37, 53}, {0, 0}, {1, 1}, {0, 5}, {5, 0}, {64, 64}, {20, 10}},
                  rng);
    AttentionOptions options;
    options.causal = true;
    options.query_chunk = 16;
    options.key_chunk = 20;
    check(p, options);
  }
  {
    SCOPED_TRACE("MQA, d = 1, d_v = 3, window, key segments");
    const Batch p(2, 1, 1, 3, {{9, 130}, {13, 13}, {1, 300}, {7, 7}}, rng);
    AttentionOptions options;
    options.window_left = 7;
    options.key_chunk = 32;
    check(p, options);
  }
  {
    SCOPED_TRACE("batched decode: n_q = 1, a cache length each, sinks, ALiBi");
    const Batch p(8, 2, 32, 32, {{1, 1}, {1, 17}, {1, 300}, {1, 0}, {1, 129}, {1, 9000}}, rng);
    const std::vector<double> sinks = {0.5, -3.0, 2.0, 12.0, -kInf, -0.25, 4.0, 1.0};
    const std::vector<double> slopes = {0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0, 0.01, 0.002};
    AttentionOptions options;
    options.sinks = sinks;
    options.alibi_slopes = slopes;
    check(p, options, 12.0 + 0.5 * 9000);
  }
  {
    SCOPED_TRACE("causal sliding window, softcap, key lengths, fully masked rows");
    const Batch p(2, 2, 8, 8, {{20, 10}, {7, 30}, {3, 3}, {40, 41}}, rng);
    const std::vector<Index> lengths = {10, 25, 0, 33};
    AttentionOptions options;
    options.causal = true;
    options.window_left = 3;
    options.window_right = 0;
    options.softcap = 5.0;
    options.key_lengths = lengths;
    check(p, options, 5.0);
  }
  {
    SCOPED_TRACE("mask_mod and score_mod see the sequence index");
    const Batch p(2, 1, 8, 4, {{11, 11}, {6, 19}, {15, 4}}, rng);
    const auto mask = [](Index b, Index, Index i, Index j) { return (i + j + b) % 3 != 0; };
    const auto score = [](auto x, Index b, Index h, Index, Index j) {
      using S = decltype(x);
      return x + static_cast<S>((b + h + j) % 4) / S(8);
    };
    check(p, AttentionOptions{}, 0.5, mask, score);
  }
}

/// The makespan of the plan's tasks, in order, under `threads` threads that each take the next
/// task when free (the loop's dynamic schedule), and the tasks each thread got.
std::pair<Index, std::vector<Index>> simulate(const blockattn::detail::VarlenPlan& plan,
                                              int threads) {
  using Slot = std::pair<Index, int>;  // (busy until, thread)
  std::priority_queue<Slot, std::vector<Slot>, std::greater<>> idle;
  for (int t = 0; t < threads; ++t) idle.push({0, t});
  std::vector<Index> taken(count(threads));
  Index makespan = 0;
  for (const auto& task : plan.tasks) {
    auto [until, t] = idle.top();
    idle.pop();
    until += task.cost;
    ++taken[count(t)];
    makespan = std::max(makespan, until);
    idle.push({until, t});
  }
  return {makespan, taken};
}

// One 100,000-token sequence beside 63 short ones (planned only: nothing runs): decode (n_q = 1
// over a cache each) and a short prefill (64 new tokens after a 100,000-token cache; 63 short
// prompts). Every thread of 2, 4 and 8 gets tasks, and the simulated makespan is within 10% of
// the ideal total / threads — which one call per sequence, with its own threads, cannot reach:
// the long sequence's tasks run while the short ones fill in.
TEST(AttentionVarlenTest, BalancedPlanKeepsEveryThreadBusy) {
  const Index long_n = 100000;
  struct Case {
    const char* name;
    Index heads, kv_heads, n_q;
    bool causal;
  };
  for (const Case& c :
       {Case{"decode, 8 heads on 8", 8, 8, 1, false}, Case{"decode, 8 heads on 2", 8, 2, 1, false},
        Case{"prefill of 64, one head", 1, 1, 64, true},
        Case{"prefill of 64, 8 heads on 2", 8, 2, 64, true}}) {
    SCOPED_TRACE(c.name);
    std::vector<std::int32_t> cu_q{0}, cu_k{0};
    for (Index s = 0; s < 64; ++s) {
      const Index n_k = s == 0 ? long_n + c.n_q : 64 + 7 * s;
      const Index n_q = c.n_q == 1 ? 1 : std::min(n_k, c.n_q + 3 * s);
      cu_q.push_back(static_cast<std::int32_t>(cu_q.back() + n_q));
      cu_k.push_back(static_cast<std::int32_t>(cu_k.back() + n_k));
    }
    blockattn::detail::AttentionShapes shapes;
    shapes.heads = c.heads;
    shapes.kv_heads = c.kv_heads;
    shapes.d = shapes.d_v = 128;
    shapes.k_rows_interleave = shapes.v_rows_interleave = true;  // packed [total, H_kv, d]
    AttentionOptions options;
    options.causal = c.causal;
    const auto plan = blockattn::detail::plan_attention_varlen<float>(cu_q, cu_k, shapes, options);
    ASSERT_EQ(plan.sequences.size(), 64u);
    Index total = 0;
    for (const auto& task : plan.tasks) total += task.cost;
    EXPECT_EQ(total, plan.total_cost);
    for (const int threads : {2, 4, 8}) {
      SCOPED_TRACE(std::to_string(threads) + " threads");
      const auto [makespan, taken] = simulate(plan, threads);
      for (const Index n : taken) EXPECT_GT(n, 0);
      EXPECT_LE(double(makespan), 1.1 * double(total) / threads)
          << "tasks " << plan.tasks.size() << ", largest " << plan.tasks.front().cost;
    }
  }
}

// Bad input: std::invalid_argument naming the argument and the sizes, out and lse untouched.
TEST(AttentionVarlenTest, BadInputThrowsBeforeWriting) {
  auto rng = make_rng(1819);
  const Batch p(2, 1, 4, 4, {{3, 5}, {2, 2}}, rng);  // total_q 5, total_k 7
  struct Case {
    std::vector<std::int32_t> cu_q, cu_k;
    std::vector<std::string> message;
    Index lse_size = -1;
    Index key_length = -1;
  };
  const Case cases[] = {
      {{1, 3, 5}, {0, 5, 7}, {"cu_seqlens_q[0] is 1", "must be 0"}},
      {{0, 3, 5}, {0, 8, 7}, {"cu_seqlens_k[2] is 7", "cu_seqlens_k[1] is 8", "not decrease"}},
      {{0, 3, 6}, {0, 5, 7}, {"cu_seqlens_q[2] is 6", "q.seq (total_q) is 5"}},
      {{0, 3, 5}, {0, 5, 6}, {"cu_seqlens_k[2] is 6", "k.seq (total_k) is 7"}},
      {{}, {}, {"cu_seqlens_q.size() is 0"}},
      {{0, 3, 5}, {0, 7}, {"cu_seqlens_k.size() is 2", "cu_seqlens_q.size() is 3"}},
      {{0, 3, 5}, {0, 5, 7}, {"lse.size() is 9", "is 10"}, 9},
      {{0, 3, 5}, {0, 5, 7}, {"options.key_lengths[1] is 3", "sequence 1 has 2 keys"}, -1, 3},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.message.front());
    std::vector<float> out(count(p.total_q() * p.heads * p.d_v), std::nanf(""));
    std::vector<float> lse(count(c.lse_size >= 0 ? c.lse_size : p.heads * p.total_q()),
                           std::nanf(""));
    AttentionOptions options;
    const std::vector<Index> lengths = {3, c.key_length};
    if (c.key_length >= 0) options.key_lengths = lengths;
    std::vector<testing::Matcher<const std::string&>> parts;
    for (const std::string& m : c.message) parts.push_back(testing::HasSubstr(m));
    EXPECT_THAT(
        [&] {
          blockattn::attention_varlen(
              blockattn::make_tensor_view(p.q.data(), 1, p.total_q(), p.heads, p.d),
              blockattn::make_tensor_view(p.k.data(), 1, p.total_k(), p.kv_heads, p.d),
              blockattn::make_tensor_view(p.v.data(), 1, p.total_k(), p.kv_heads, p.d_v),
              blockattn::make_tensor_view(out.data(), 1, p.total_q(), p.heads, p.d_v), c.cu_q,
              c.cu_k, options, blockattn::Span<float>(lse));
        },
        testing::ThrowsMessage<std::invalid_argument>(testing::AllOfArray(parts)));
    for (const float x : out) ASSERT_TRUE(std::isnan(x)) << "out was written";
    for (const float x : lse) ASSERT_TRUE(std::isnan(x)) << "lse was written";
  }
  // A view with batch != 1.
  std::vector<float> out(count(p.total_q() * p.heads * p.d_v));
  EXPECT_THAT(
      [&] {
        blockattn::attention_varlen(
            blockattn::make_tensor_view(p.q.data(), 5, 1, p.heads, p.d),
            blockattn::make_tensor_view(p.k.data(), 1, p.total_k(), p.kv_heads, p.d),
            blockattn::make_tensor_view(p.v.data(), 1, p.total_k(), p.kv_heads, p.d_v),
            blockattn::make_tensor_view(out.data(), 1, p.total_q(), p.heads, p.d_v), p.cu_q,
            p.cu_k);
      },
      testing::ThrowsMessage<std::invalid_argument>(testing::HasSubstr("q.batch is 5")));
}

}  // namespace

}  // namespace attention_varlen_test
