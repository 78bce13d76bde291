// attention() over an int8 cache whose keys are quantized per channel over blocks of 32 tokens
// with a zero point (ChannelQuantizedKV), and its quantize_kv() / dequantize_kv(). Oracles:
//   1. prefill (more than 8 query rows per kv head): bitwise the float call on dequantize_kv()'s
//      K and V (out and lse), 1 and 2 threads, since the packed K tile holds exactly
//      dequantize_kv()'s floats;
//   2. every call (prefill and decode): blockattn::reference in long double on the dequantized
//      values within attention_tolerance<float> computed with |k| replaced by
//      scale_c·(|k8_c| + |zero_c|). Decode computes a score as (q∘scale)·k8 − q·(scale∘zero): d
//      products and sums of terms each at most |q_c|·scale_c·(|k8_c| + |zero_c|), so its rounding
//      error is γ_{d+2} times Σ_c of those terms (not of |q_c·k_c|, which cancellation can make
//      much smaller); the tolerance's d·A term with that A covers it, and since
//      |k_c| <= scale_c·(|k8_c| + |zero_c|) it also covers prefill.
// Keys have per-channel means and a few outlier channels (what this format is for), so scales
// and zero points differ per channel and block.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <blockattn/quantized_kv.hpp>
#include <blockattn/reference.hpp>

#include "support/bits.hpp"
#include "support/random.hpp"
#include "support/requires_malloc_guard.hpp"
#include "support/tolerance.hpp"

namespace attention_int8_channel_test {
namespace {
using blockattn::test::count;
using blockattn::test::same_bits;

using blockattn::AttentionOptions;
using blockattn::ChannelQuantizedKV;
using blockattn::Index;
using blockattn::TensorView;
using blockattn::test::make_rng;
using blockattn::test::seed_trace;

constexpr Index blocks_of(Index n) { return (n + 31) / 32; }

/// A [1, rows, 1, dim] view (one sequence, one head).
template <class T>
TensorView<T> one_head(T* data, Index rows, Index dim) {
  return blockattn::make_tensor_view(data, 1, rows, 1, dim);
}

struct Shape {
  Index batch = 1;
  Index n_q = 1;
  Index n_k = 1;
  Index heads = 1;
  Index kv_heads = 1;
  Index d = 1;
  Index d_v = 1;
  bool bhsd = false;
};

template <class T>
TensorView<T> view_of(T* data, Index batch, Index seq, Index heads, Index dim, bool bhsd) {
  if (!bhsd) return blockattn::make_tensor_view(data, batch, seq, heads, dim);
  return TensorView<T>(data, batch, seq, heads, dim, seq * heads * dim, dim, seq * dim);
}

/// Keys [n, heads, d] per batch entry (BSHD, flat): channel c has mean N(0, 2)-ish and channels
/// c % 16 == 3 have 15× the spread (KIVI's outlier channels).
std::vector<float> outlier_keys(Index rows, Index d, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> mean(count(d));
  for (float& m : mean) m = 2.0f * normal(rng);
  std::vector<float> k(count(rows * d));
  for (Index r = 0; r < rows; ++r) {
    for (Index c = 0; c < d; ++c) {
      const float spread = c % 16 == 3 ? 15.0f : 1.0f;
      k[count(r * d + c)] = mean[count(c)] + spread * normal(rng);
    }
  }
  return k;
}

/// One shape's float q, its per-channel int8 cache (quantize_kv from float keys in one call,
/// values per token) and the cache's dequantized floats.
struct Problem {
  Shape s;
  std::vector<float> q, kf, vf;  // kf, vf: dequantize_kv of the int8 cache
  std::vector<std::int8_t> k8, v8;
  std::vector<float> k_scale, k_zero, v_scale;

  Problem(const Shape& shape, std::mt19937_64& rng) : s(shape) {
    std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
    q.resize(count(s.batch * s.n_q * s.heads * s.d));
    for (float& e : q) e = dist(rng);
    const std::vector<float> k = outlier_keys(s.batch * s.n_k * s.kv_heads, s.d, rng);
    std::vector<float> v(count(s.batch * s.n_k * s.kv_heads * s.d_v));
    for (float& e : v) e = dist(rng);
    k8.resize(k.size());
    v8.resize(v.size());
    k_scale.resize(count(s.batch * blocks_of(s.n_k) * s.kv_heads * s.d));
    k_zero.resize(k_scale.size());
    v_scale.resize(count(s.batch * s.n_k * s.kv_heads));
    blockattn::quantize_kv(kv(k.data(), s.d), 0, kv(k8.data(), s.d), blocks(k_scale.data()),
                           blocks(k_zero.data()));
    blockattn::quantize_kv(kv(v.data(), s.d_v), kv(v8.data(), s.d_v), kv(v_scale.data(), 1));
    kf.resize(k.size());
    vf.resize(v.size());
    const ChannelQuantizedKV c = cache();
    blockattn::dequantize_kv(c.k, c.k_scale, c.k_zero, kv(kf.data(), s.d));
    blockattn::dequantize_kv(c.v, c.v_scale, kv(vf.data(), s.d_v));
  }
  /// A [batch, n_k, kv_heads, dim] view in the shape's layout.
  template <class T>
  TensorView<T> kv(T* data, Index dim) const {
    return view_of<T>(data, s.batch, s.n_k, s.kv_heads, dim, s.bhsd);
  }
  /// A [batch, blocks, kv_heads, d] view of key block parameters in the shape's layout.
  template <class T>
  TensorView<T> blocks(T* data) const {
    return view_of<T>(data, s.batch, blocks_of(s.n_k), s.kv_heads, s.d, s.bhsd);
  }
  TensorView<const float> qv() const {
    return view_of<const float>(q.data(), s.batch, s.n_q, s.heads, s.d, s.bhsd);
  }
  TensorView<float> outv(std::vector<float>& x) const {
    return view_of<float>(x.data(), s.batch, s.n_q, s.heads, s.d_v, s.bhsd);
  }
  ChannelQuantizedKV cache() const {
    return {kv<const std::int8_t>(k8.data(), s.d), blocks<const float>(k_scale.data()),
            blocks<const float>(k_zero.data()), kv<const std::int8_t>(v8.data(), s.d_v),
            kv<const float>(v_scale.data(), 1)};
  }
  /// |k| as decode's rounding sees it: scale_c·(|k8_c| + |zero_c|), [batch, n_k, kv_heads, d].
  std::vector<float> key_magnitudes() const {
    std::vector<float> m(kf.size());
    const auto k = kv<const std::int8_t>(k8.data(), s.d);
    const auto sc = blocks<const float>(k_scale.data());
    const auto zp = blocks<const float>(k_zero.data());
    const auto out = kv<float>(m.data(), s.d);
    for (Index b = 0; b < s.batch; ++b) {
      for (Index j = 0; j < s.n_k; ++j) {
        for (Index h = 0; h < s.kv_heads; ++h) {
          for (Index c = 0; c < s.d; ++c) {
            out.at(b, j, h)[c] = sc.at(b, j / 32, h)[c] * (std::abs(float(k.at(b, j, h)[c])) +
                                                           std::abs(zp.at(b, j / 32, h)[c]));
          }
        }
      }
    }
    return m;
  }
  std::size_t out_size() const { return count(s.batch * s.n_q * s.heads * s.d_v); }
  std::size_t lse_size() const { return count(s.batch * s.heads * s.n_q); }
};

/// The channel call with 1 and 2 threads (the second with a Workspace): the same bits both
/// times; on prefill also the float call's bits on the dequantized cache. Returns the output.
void run(const Problem& p, AttentionOptions options, bool prefill, std::vector<float>* out,
         std::vector<float>* lse) {
  std::vector<float> out_f(p.out_size());
  std::vector<float> lse_f(p.lse_size());
  options.threads = 1;
  blockattn::attention(p.qv(), p.kv<const float>(p.kf.data(), p.s.d),
                       p.kv<const float>(p.vf.data(), p.s.d_v), p.outv(out_f), options, lse_f);
  blockattn::Workspace workspace;
  for (const int threads : {1, 2}) {
    SCOPED_TRACE("threads=" + std::to_string(threads));
    options.threads = threads;
    options.workspace = threads == 2 ? &workspace : nullptr;
    std::vector<float> out8(p.out_size());
    std::vector<float> lse8(p.lse_size());
    blockattn::attention(p.qv(), p.cache(), p.outv(out8), options, lse8);
    if (prefill) {
      EXPECT_TRUE(same_bits(out8, out_f)) << "prefill out is not the float call's";
      EXPECT_TRUE(same_bits(lse8, lse_f)) << "prefill lse is not the float call's";
    }
    if (threads == 1) {
      *out = out8;
      *lse = lse8;
    } else {
      EXPECT_TRUE(same_bits(out8, *out)) << "the thread count changed the result";
    }
  }
}

/// The long double reference on the dequantized values against `out8`, within the tolerance of
/// the top of this file.
void check_reference(const Problem& p, const AttentionOptions& options,
                     const std::vector<float>& out8, const std::vector<float>& lse8) {
  using Real = long double;
  const auto to_real = [](const std::vector<float>& x) {
    return std::vector<Real>(x.begin(), x.end());
  };
  const std::vector<Real> q = to_real(p.q), k = to_real(p.kf), v = to_real(p.vf);
  const std::vector<Real> km = to_real(p.key_magnitudes());
  std::vector<Real> ref(p.out_size());
  std::vector<Real> ref_lse(p.lse_size());
  const Shape& s = p.s;
  const auto rv = [&](const std::vector<Real>& x, Index seq, Index heads, Index dim) {
    return view_of<const Real>(x.data(), s.batch, seq, heads, dim, s.bhsd);
  };
  blockattn::reference::attention(
      rv(q, s.n_q, s.heads, s.d), rv(k, s.n_k, s.kv_heads, s.d), rv(v, s.n_k, s.kv_heads, s.d_v),
      view_of<Real>(ref.data(), s.batch, s.n_q, s.heads, s.d_v, s.bhsd), options, ref_lse);
  const double scale = 1 / std::sqrt(double(s.d));
  const Index group = s.heads / s.kv_heads;
  const auto out_view = view_of<const float>(out8.data(), s.batch, s.n_q, s.heads, s.d_v, s.bhsd);
  const auto ref_view = view_of<const Real>(ref.data(), s.batch, s.n_q, s.heads, s.d_v, s.bhsd);
  using blockattn::detail::head_slice;
  for (Index b = 0; b < s.batch; ++b) {
    for (Index h = 0; h < s.heads; ++h) {
      const blockattn::Matrix<Real> qm = head_slice(rv(q, s.n_q, s.heads, s.d), b, h);
      const blockattn::Matrix<Real> mm = head_slice(rv(km, s.n_k, s.kv_heads, s.d), b, h / group);
      const blockattn::Matrix<Real> vm = head_slice(rv(v, s.n_k, s.kv_heads, s.d_v), b, h / group);
      const std::vector<double> tol =
          blockattn::test::attention_tolerance<float>(qm, mm, vm, scale);
      const std::vector<double> lse_tol = blockattn::test::lse_tolerance<float>(qm, mm, scale);
      const auto got = head_slice(out_view, b, h);
      const auto want = head_slice(ref_view, b, h);
      for (Index i = 0; i < s.n_q; ++i) {
        const auto at = count((b * s.heads + h) * s.n_q + i);
        if (std::isinf(ref_lse[at])) {  // no visible key: out 0, lse −inf
          EXPECT_EQ(lse8[at], -std::numeric_limits<float>::infinity());
          EXPECT_TRUE(got.row(i).isZero(0));
          continue;
        }
        for (Index c = 0; c < s.d_v; ++c) {
          const double err = std::abs(double(got(i, c)) - double(want(i, c)));
          ASSERT_LE(err, tol[count(i)]) << "b=" << b << " h=" << h << " i=" << i << " c=" << c;
        }
        EXPECT_LE(std::abs(double(lse8[at]) - double(ref_lse[at])), lse_tol[count(i)]);
      }
    }
  }
}

// Awkward shapes over both paths: n_k not a multiple of 32, one token, d = 1, d not a multiple of
// the vector width, GQA and MQA, BSHD and BHSD, causal and window masks, key lengths, sinks, key
// chunks that start inside a 32-key block (20), key segments (n_k > 8192).
TEST(AttentionInt8ChannelTest, PrefillIsBitwiseAndEveryCallMatchesTheReference) {
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(1821);
  struct Case {
    Shape shape;
    bool prefill = false;
    bool causal = false;
    Index window = -1;
    Index key_chunk = 0;
    bool lengths = false;
    bool sinks = false;
  };
  const Case cases[] = {
      {{1, 37, 53, 1, 1, 24, 40}, true, false, -1, 20},             // prefill, ragged chunks
      {{2, 45, 45, 4, 2, 16, 16}, true, true},                      // GQA causal
      {{1, 20, 70, 2, 2, 1, 3, true}, true, true, 10},              // d = 1, window, BHSD
      {{3, 20, 77, 6, 3, 19, 21}, true, false, -1, 0, true, true},  // lengths, sinks, odd d
      {{1, 1, 1, 1, 1, 1, 1}},                                      // one token, d = 1
      {{1, 1, 300, 8, 8, 64, 64}, false, false, -1, 20},            // decode, chunks inside blocks
      {{1, 1, 300, 8, 1, 64, 64, true}},                            // decode MQA, BHSD
      {{2, 3, 200, 4, 2, 33, 17}, false, true, -1, 0, true, true},  // decode, lengths, sinks
      {{1, 1, 9000, 4, 2, 16, 16}},                                 // key segments
      {{1, 2, 9001, 2, 1, 8, 8, true}, false, true},                // segments, causal
  };
  for (const Case& c : cases) {
    const Shape& s = c.shape;
    SCOPED_TRACE("batch=" + std::to_string(s.batch) + " n_q=" + std::to_string(s.n_q) +
                 " n_k=" + std::to_string(s.n_k) + " heads=" + std::to_string(s.heads) + "/" +
                 std::to_string(s.kv_heads) + " d=" + std::to_string(s.d) + "/" +
                 std::to_string(s.d_v) + (s.bhsd ? " BHSD" : " BSHD"));
    const Problem p(s, rng);
    AttentionOptions options;
    options.causal = c.causal;
    options.window_left = c.window;
    options.key_chunk = c.key_chunk;
    std::vector<Index> lengths;
    if (c.lengths) {
      for (Index b = 0; b < s.batch; ++b) lengths.push_back(b == 0 ? 0 : s.n_k - 5 - b);
      options.key_lengths = lengths;
    }
    std::vector<double> sinks;
    if (c.sinks) {
      // Head 0 has no sink (−inf), the others a logit of 0.5·h.
      sinks.push_back(-std::numeric_limits<double>::infinity());
      for (Index h = 1; h < s.heads; ++h) sinks.push_back(0.5 * double(h));
      options.sinks = sinks;
    }
    std::vector<float> out, lse;
    run(p, options, c.prefill, &out, &lse);
    check_reference(p, options, out, lse);
  }
}

/// Per element of a [rows, d] key block written by quantize_kv: |x − dequantized| / scale.
double worst_steps(const std::vector<float>& x, const std::vector<float>& back,
                   const std::vector<float>& scale, Index rows, Index d) {
  double worst = 0;
  for (Index j = 0; j < rows; ++j) {
    for (Index c = 0; c < d; ++c) {
      const auto sc = double(scale[count(j / 32 * d + c)]);
      const double err = std::abs(double(x[count(j * d + c)]) - double(back[count(j * d + c)]));
      worst = std::max(worst, sc > 0 ? err / sc : err == 0 ? 0 : 1e300);
    }
  }
  return worst;
}

// quantize_kv in one call: |x − dequantized| <= scale/2 plus the float roundings of the
// difference and the product (2^-23 relative of a value <= max|x| + scale), and nothing clamps;
// a constant channel is exact up to those roundings; from bfloat16 it equals quantizing the
// widened floats. Appending token by token (the open block re-quantized when its range grows):
// every element within (number of re-quantizations + 1)·scale/2 <= 16·scale, the bits of a
// block's earlier tokens untouched by a token inside its range, and the measured RMS against the
// one-call cache printed (docs/quantized_kv.md quotes it).
TEST(AttentionInt8ChannelTest, QuantizeAndAppendInPlace) {
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(1822);
  const Index n = 75, d = 37;  // two whole blocks and an open one
  std::vector<float> x = outlier_keys(n, d, rng);
  for (Index j = 0; j < n; ++j) x[count(j * d + 5)] = 0.25f;  // a constant channel
  std::vector<std::int8_t> k8(count(n * d));
  std::vector<float> sc(count(blocks_of(n) * d)), zp(sc.size()), back(x.size());
  blockattn::quantize_kv(one_head(x.data(), n, d), 0, one_head(k8.data(), n, d),
                         one_head(sc.data(), 3, d), one_head(zp.data(), 3, d));
  blockattn::dequantize_kv(one_head<const std::int8_t>(k8.data(), n, d),
                           one_head<const float>(sc.data(), 3, d),
                           one_head<const float>(zp.data(), 3, d), one_head(back.data(), n, d));
  double max_x = 0;
  for (const float e : x) max_x = std::max(max_x, std::abs(double(e)));
  for (Index j = 0; j < n; ++j) {
    for (Index c = 0; c < d; ++c) {
      const std::size_t i = count(j * d + c);
      const auto s = double(sc[count(j / 32 * d + c)]);
      ASSERT_LE(
          std::abs(double(x[i]) - double(back[i])),
          s / 2 + std::ldexp(max_x + s, -23) * (1 + std::abs(double(zp[count(j / 32 * d + c)]))))
          << "token " << j << " channel " << c;
      ASSERT_EQ(zp[count(j / 32 * d + c)], std::nearbyint(zp[count(j / 32 * d + c)]));
    }
  }
  EXPECT_EQ(zp[5], 0.0f);
  EXPECT_EQ(sc[5], 0.25f / 127.0f);
  // bfloat16: the same as quantizing its float values.
  std::vector<Eigen::bfloat16> xb(x.size());
  std::vector<float> xbf(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    xb[i] = static_cast<Eigen::bfloat16>(x[i]);
    xbf[i] = static_cast<float>(xb[i]);
  }
  std::vector<std::int8_t> qb(k8.size()), qf(k8.size());
  std::vector<float> sb(sc.size()), sf(sc.size()), zb(sc.size()), zf(sc.size());
  blockattn::quantize_kv(one_head(xb.data(), n, d), 0, one_head(qb.data(), n, d),
                         one_head(sb.data(), 3, d), one_head(zb.data(), 3, d));
  blockattn::quantize_kv(one_head(xbf.data(), n, d), 0, one_head(qf.data(), n, d),
                         one_head(sf.data(), 3, d), one_head(zf.data(), 3, d));
  EXPECT_EQ(qb, qf);
  EXPECT_EQ(sb, sf);
  EXPECT_EQ(zb, zf);
  // Token by token into a cache of capacity 80: the same sizes of error bound, per block.
  const Index capacity = 80;
  std::vector<std::int8_t> a8(count(capacity * d), 0);
  std::vector<float> as(count(blocks_of(capacity) * d), 0.0f), az(as.size(), 0.0f);
  for (Index j = 0; j < n; ++j) {
    blockattn::quantize_kv(
        one_head<const float>(x.data() + j * d, 1, d), j, one_head(a8.data(), capacity, d),
        one_head(as.data(), blocks_of(capacity), d), one_head(az.data(), blocks_of(capacity), d));
  }
  std::vector<float> a_back(x.size());
  blockattn::dequantize_kv(one_head<const std::int8_t>(a8.data(), n, d),
                           one_head<const float>(as.data(), 3, d),
                           one_head<const float>(az.data(), 3, d), one_head(a_back.data(), n, d));
  const double worst = worst_steps(x, a_back, as, n, d);
  EXPECT_LE(worst, 16.0) << "appended keys drifted beyond 32 re-quantizations' half steps";
  double rms_once = 0, rms_append = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double once = double(x[i]) - double(back[i]);
    const double append = double(x[i]) - double(a_back[i]);
    rms_once += once * once;
    rms_append += append * append;
  }
  rms_once = std::sqrt(rms_once / double(x.size()));
  rms_append = std::sqrt(rms_append / double(x.size()));
  std::printf("key RMS error, one call %.3e, token by token %.3e (%.2fx); worst %.2f steps\n",
              rms_once, rms_append, rms_append / rms_once, worst);
  EXPECT_LE(rms_append, 4 * rms_once);
  // A token inside the open block's range leaves the block's earlier bits alone.
  const std::vector<std::int8_t> before = a8;
  const std::vector<float> before_s = as, before_z = az;
  std::vector<float> inside(count(d));
  for (Index c = 0; c < d; ++c) inside[count(c)] = a_back[count((n - 1) * d + c)];
  blockattn::quantize_kv(
      one_head<const float>(inside.data(), 1, d), n, one_head(a8.data(), capacity, d),
      one_head(as.data(), blocks_of(capacity), d), one_head(az.data(), blocks_of(capacity), d));
  EXPECT_EQ(as, before_s);
  EXPECT_EQ(az, before_z);
  for (Index c = 0; c < d; ++c) EXPECT_EQ(a8[count(n * d + c)], a8[count((n - 1) * d + c)]);
  EXPECT_TRUE(std::equal(a8.begin(), a8.begin() + n * d, before.begin()));
}

// Bad input: std::invalid_argument naming the argument and the sizes (or the bad value), and
// nothing written.
TEST(AttentionInt8ChannelTest, ValidationNamesTheArgument) {
  auto rng = make_rng(1823);
  const Problem p({1, 2, 40, 2, 1, 8, 8}, rng);
  const auto expect_error = [&](const ChannelQuantizedKV& kv, const std::string& message) {
    std::vector<float> out(p.out_size(), 3.0f);
    EXPECT_THAT([&] { blockattn::attention(p.qv(), kv, p.outv(out)); },
                ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr(message)));
    for (const float e : out) ASSERT_EQ(e, 3.0f);
  };
  ChannelQuantizedKV kv = p.cache();
  kv.k_scale.seq = 1;
  expect_error(kv, "k_scale.seq is 1 but ceil(k.seq / 32) is 2");
  kv = p.cache();
  kv.k_zero.dim = 4;
  expect_error(kv, "k_zero.dim is 4 but k.dim is 8");
  kv = p.cache();
  kv.k_zero.data = nullptr;
  expect_error(kv, "k_zero.data is null");
  kv = p.cache();
  kv.v_scale.seq = 39;
  expect_error(kv, "v_scale.seq is 39 but v.seq is 40");
  std::vector<float> bad = p.k_zero;
  bad[8 + 3] = std::numeric_limits<float>::quiet_NaN();
  kv = p.cache();
  kv.k_zero.data = bad.data();
  expect_error(kv, "k_zero[0, 1, 0, 3] is nan");
  bad = p.k_scale;
  bad[2] = std::numeric_limits<float>::infinity();
  kv = p.cache();
  kv.k_scale.data = bad.data();
  expect_error(kv, "k_scale[0, 0, 0, 2] is inf");
  bad[2] = std::numeric_limits<float>::max() / 64;  // finite, but ·(127 − zero) overflows
  expect_error(kv, "k_scale[0, 0, 0, 2] is");
  // quantize_kv: sizes, position, non-finite input, a non-finite open block; nothing written.
  std::vector<float> x(16, 1.0f);
  std::vector<std::int8_t> q(40, 5);
  std::vector<float> s(2, 7.0f), z(2, 0.0f);
  const auto append = [&](Index position, Index cache_tokens, Index blocks) {
    blockattn::quantize_kv(blockattn::make_tensor_view(x.data(), 1, 16, 1, 1), position,
                           blockattn::make_tensor_view(q.data(), 1, cache_tokens, 1, 1),
                           blockattn::make_tensor_view(s.data(), 1, blocks, 1, 1),
                           blockattn::make_tensor_view(z.data(), 1, blocks, 1, 1));
  };
  using ::testing::HasSubstr;
  using ::testing::ThrowsMessage;
  EXPECT_THAT([&] { append(30, 40, 2); }, ThrowsMessage<std::invalid_argument>(
                                              HasSubstr("k.seq is 40 but position + x.seq is 46")));
  EXPECT_THAT([&] { append(20, 40, 1); },
              ThrowsMessage<std::invalid_argument>(
                  HasSubstr("k_scale.seq is 1 but ceil((position + x.seq) / 32) is 2")));
  EXPECT_THAT([&] { append(-1, 40, 2); },
              ThrowsMessage<std::invalid_argument>(HasSubstr("position is -1")));
  s[0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THAT([&] { append(20, 40, 2); },
              ThrowsMessage<std::invalid_argument>(HasSubstr("k_scale[0, 0, 0, 0] is nan")));
  s[0] = 7.0f;
  x[12] = std::numeric_limits<float>::infinity();
  EXPECT_THAT([&] { append(0, 40, 2); },
              ThrowsMessage<std::invalid_argument>(HasSubstr("x[0, 12, 0, 0] is inf")));
  EXPECT_EQ(q, std::vector<std::int8_t>(40, 5));
  EXPECT_EQ(s, std::vector<float>(2, 7.0f));
  EXPECT_EQ(z, std::vector<float>(2, 0.0f));
  // dequantize_kv: block sizes.
  std::vector<float> out(40, 3.0f);
  EXPECT_THAT(
      [&] {
        blockattn::dequantize_kv(
            blockattn::make_tensor_view<const std::int8_t>(q.data(), 1, 40, 1, 1),
            blockattn::make_tensor_view<const float>(s.data(), 1, 1, 1, 1),
            blockattn::make_tensor_view<const float>(z.data(), 1, 1, 1, 1),
            blockattn::make_tensor_view(out.data(), 1, 40, 1, 1));
      },
      ThrowsMessage<std::invalid_argument>(
          HasSubstr("k_scale.seq is 1 but ceil(k.seq / 32) is 2")));
  EXPECT_EQ(out, std::vector<float>(40, 3.0f));
}

// With a caller's Workspace, a second decode call and a prefill call allocate nothing
// (validation's scale scan, the per-block queries, the loops and the merge).
TEST(AttentionInt8ChannelTest, SecondCallWithAWorkspaceAllocatesNothing) {
  auto rng = make_rng(1824);
  const Problem decode({1, 1, 9000, 4, 2, 64, 64}, rng);
  const Problem prefill({1, 100, 300, 4, 2, 64, 64}, rng);
  blockattn::Workspace workspace;
  AttentionOptions options;
  options.threads = 1;
  options.workspace = &workspace;
  std::vector<float> out_d(decode.out_size()), out_p(prefill.out_size());
  blockattn::attention(decode.qv(), decode.cache(), decode.outv(out_d), options);
  blockattn::attention(prefill.qv(), prefill.cache(), prefill.outv(out_p), options);
  const std::vector<float> first_d = out_d, first_p = out_p;
  {
    const blockattn::detail::NoMallocScope no_malloc;  // aborts on an allocation
    blockattn::attention(decode.qv(), decode.cache(), decode.outv(out_d), options);
    blockattn::attention(prefill.qv(), prefill.cache(), prefill.outv(out_p), options);
  }
  EXPECT_TRUE(same_bits(out_d, first_d));
  EXPECT_TRUE(same_bits(out_p, first_p));
}

}  // namespace

}  // namespace attention_int8_channel_test
