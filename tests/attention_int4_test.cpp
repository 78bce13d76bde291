// attention() over an int4 cache (Int4QuantizedKV: keys per channel over 32-token blocks with a
// zero point, values per token in groups of 32 channels, two 4-bit values per byte), and its
// quantize_kv() / dequantize_kv(). Oracles:
//   1. every call, prefill and decode: bitwise the float call on dequantize_kv()'s K and V (out
//      and lse), 1 and 2 threads. Prefill packs exactly dequantize_kv()'s floats into the panels;
//      decode converts runs of 32 rows into those floats and runs the float kernels on them,
//      whose results do not depend on how a chunk's keys are split (one dot product per score,
//      P·V added in key order);
//   2. every call: blockattn::reference in long double on the dequantized values within
//      attention_tolerance<float> (the float kernels' bound: the format adds no rounding of its
//      own once dequantized), so a wrong float call could not hide behind oracle 1.
// Keys have per-channel means and a few outlier channels (what the per-channel key format is
// for), so scales and zero points differ per channel and block.

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

#include <blockattn/int4_kv.hpp>
#include <blockattn/reference.hpp>

#include "support/bits.hpp"
#include "support/random.hpp"
#include "support/requires_malloc_guard.hpp"
#include "support/tolerance.hpp"

namespace attention_int4_test {
namespace {
using blockattn::test::count;
using blockattn::test::same_bits;

using blockattn::AttentionOptions;
using blockattn::Index;
using blockattn::Int4QuantizedKV;
using blockattn::TensorView;
using blockattn::test::make_rng;
using blockattn::test::seed_trace;

constexpr Index blocks_of(Index n) { return (n + 31) / 32; }
constexpr Index groups_of(Index d) { return (d + 31) / 32; }
constexpr Index bytes_of(Index d) { return (d + 1) / 2; }

/// A [1, rows, 1, dim] view (one sequence, one head).
template <class T>
TensorView<T> one_head(T* data, Index rows, Index dim) {
  return blockattn::make_tensor_view(data, 1, rows, 1, dim);
}

/// A [1, rows, 1, dim] view of 4-bit values.
template <class T>
TensorView<T> one_head4(T* data, Index rows, Index dim) {
  return blockattn::make_int4_tensor_view(data, 1, rows, 1, dim);
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

/// A float view in BSHD or BHSD.
template <class T>
TensorView<T> view_of(T* data, Index batch, Index seq, Index heads, Index dim, bool bhsd) {
  if (!bhsd) return blockattn::make_tensor_view(data, batch, seq, heads, dim);
  return TensorView<T>(data, batch, seq, heads, dim, seq * heads * dim, dim, seq * dim);
}

/// A view of 4-bit values (rows of ceil(dim / 2) bytes) in BSHD or BHSD.
template <class T>
TensorView<T> view4_of(T* data, Index batch, Index seq, Index heads, Index dim, bool bhsd) {
  if (!bhsd) return blockattn::make_int4_tensor_view(data, batch, seq, heads, dim);
  const Index row = bytes_of(dim);
  return TensorView<T>(data, batch, seq, heads, dim, seq * heads * row, row, seq * row);
}

/// Keys [rows, d] (flat): channel c has mean N(0, 2)-ish and channels c % 16 == 3 have 15× the
/// spread (KIVI's outlier channels).
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

/// One shape's float q, its int4 cache (quantize_kv from float keys and values in one call each)
/// and the cache's dequantized floats.
struct Problem {
  Shape s;
  std::vector<float> q, kf, vf;  // kf, vf: dequantize_kv of the int4 cache
  std::vector<std::uint8_t> k4, v4;
  std::vector<float> k_scale, k_zero, v_scale;

  Problem(const Shape& shape, std::mt19937_64& rng) : s(shape) {
    std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
    q.resize(count(s.batch * s.n_q * s.heads * s.d));
    for (float& e : q) e = dist(rng);
    const std::vector<float> k = outlier_keys(s.batch * s.n_k * s.kv_heads, s.d, rng);
    std::vector<float> v(count(s.batch * s.n_k * s.kv_heads * s.d_v));
    for (float& e : v) e = dist(rng);
    k4.resize(count(s.batch * s.n_k * s.kv_heads * bytes_of(s.d)));
    v4.resize(count(s.batch * s.n_k * s.kv_heads * bytes_of(s.d_v)));
    k_scale.resize(count(s.batch * blocks_of(s.n_k) * s.kv_heads * s.d));
    k_zero.resize(k_scale.size());
    v_scale.resize(count(s.batch * s.n_k * s.kv_heads * groups_of(s.d_v)));
    blockattn::quantize_kv(kv<const float>(k.data(), s.d), 0, kv4(k4.data(), s.d),
                           blocks(k_scale.data()), blocks(k_zero.data()));
    blockattn::quantize_kv(kv<const float>(v.data(), s.d_v), kv4(v4.data(), s.d_v),
                           kv(v_scale.data(), groups_of(s.d_v)));
    kf.resize(k.size());
    vf.resize(v.size());
    const Int4QuantizedKV c = cache();
    blockattn::dequantize_kv(c.k, c.k_scale, c.k_zero, kv(kf.data(), s.d));
    blockattn::dequantize_kv(c.v, c.v_scale, kv(vf.data(), s.d_v));
  }
  /// A [batch, n_k, kv_heads, dim] float view in the shape's layout.
  template <class T>
  TensorView<T> kv(T* data, Index dim) const {
    return view_of<T>(data, s.batch, s.n_k, s.kv_heads, dim, s.bhsd);
  }
  /// A [batch, n_k, kv_heads, dim] view of 4-bit values in the shape's layout.
  template <class T>
  TensorView<T> kv4(T* data, Index dim) const {
    return view4_of<T>(data, s.batch, s.n_k, s.kv_heads, dim, s.bhsd);
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
  Int4QuantizedKV cache() const {
    return {kv4<const std::uint8_t>(k4.data(), s.d), blocks<const float>(k_scale.data()),
            blocks<const float>(k_zero.data()), kv4<const std::uint8_t>(v4.data(), s.d_v),
            kv<const float>(v_scale.data(), groups_of(s.d_v))};
  }
  std::size_t out_size() const { return count(s.batch * s.n_q * s.heads * s.d_v); }
  std::size_t lse_size() const { return count(s.batch * s.heads * s.n_q); }
};

/// The int4 call with 1 and 2 threads (the second with a Workspace): each time the float call's
/// bits on the dequantized cache. Returns the output.
void run(const Problem& p, AttentionOptions options, std::vector<float>* out,
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
    std::vector<float> out4(p.out_size());
    std::vector<float> lse4(p.lse_size());
    blockattn::attention(p.qv(), p.cache(), p.outv(out4), options, lse4);
    EXPECT_TRUE(same_bits(out4, out_f)) << "out is not the float call's";
    EXPECT_TRUE(same_bits(lse4, lse_f)) << "lse is not the float call's";
    if (threads == 1) {
      *out = out4;
      *lse = lse4;
    }
  }
}

/// The long double reference on the dequantized values against `out4`, within
/// attention_tolerance<float> (see the top of this file).
void check_reference(const Problem& p, const AttentionOptions& options,
                     const std::vector<float>& out4, const std::vector<float>& lse4) {
  using Real = long double;
  const auto to_real = [](const std::vector<float>& x) {
    return std::vector<Real>(x.begin(), x.end());
  };
  const std::vector<Real> q = to_real(p.q), k = to_real(p.kf), v = to_real(p.vf);
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
  const auto out_view = view_of<const float>(out4.data(), s.batch, s.n_q, s.heads, s.d_v, s.bhsd);
  const auto ref_view = view_of<const Real>(ref.data(), s.batch, s.n_q, s.heads, s.d_v, s.bhsd);
  using blockattn::detail::head_slice;
  Index masked_rows = 0;
  for (Index b = 0; b < s.batch; ++b) {
    for (Index h = 0; h < s.heads; ++h) {
      const blockattn::Matrix<Real> qm = head_slice(rv(q, s.n_q, s.heads, s.d), b, h);
      const blockattn::Matrix<Real> km = head_slice(rv(k, s.n_k, s.kv_heads, s.d), b, h / group);
      const blockattn::Matrix<Real> vm = head_slice(rv(v, s.n_k, s.kv_heads, s.d_v), b, h / group);
      const std::vector<double> tol =
          blockattn::test::attention_tolerance<float>(qm, km, vm, scale);
      const std::vector<double> lse_tol = blockattn::test::lse_tolerance<float>(qm, km, scale);
      const auto got = head_slice(out_view, b, h);
      const auto want = head_slice(ref_view, b, h);
      for (Index i = 0; i < s.n_q; ++i) {
        const auto at = count((b * s.heads + h) * s.n_q + i);
        if (std::isinf(ref_lse[at])) {  // no visible key: out 0, lse −inf
          EXPECT_EQ(lse4[at], -std::numeric_limits<float>::infinity());
          EXPECT_TRUE(got.row(i).isZero(0));
          ++masked_rows;
          continue;
        }
        for (Index c = 0; c < s.d_v; ++c) {
          const double err = std::abs(double(got(i, c)) - double(want(i, c)));
          ASSERT_LE(err, tol[count(i)]) << "b=" << b << " h=" << h << " i=" << i << " c=" << c;
        }
        EXPECT_LE(std::abs(double(lse4[at]) - double(ref_lse[at])), lse_tol[count(i)]);
      }
    }
  }
  if (!options.key_lengths.empty() && options.key_lengths[0] == 0) {
    EXPECT_GT(masked_rows, 0) << "the fully masked rows were not exercised";
  }
}

// Awkward shapes over both paths: n_k not a multiple of 32 nor of the key chunk, one token,
// d = 1, d = 33 (a one-value last group), d not a multiple of the vector width, n_q != n_k, GQA
// and MQA, BSHD and BHSD, causal and window masks, key lengths (batch entry 0 has none: fully
// masked rows), sinks, key chunks that start inside a 32-key block (20), key segments
// (n_k > 8192, the split-KV path).
TEST(AttentionInt4Test, EveryCallIsBitwiseTheFloatCallAndMatchesTheReference) {
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(1841);
  struct Case {
    Shape shape;
    bool causal = false;
    Index window = -1;
    Index key_chunk = 0;
    bool lengths = false;
    bool sinks = false;
  };
  const Case cases[] = {
      {{1, 37, 53, 1, 1, 24, 40}, false, -1, 20},             // prefill, ragged chunks
      {{2, 45, 45, 4, 2, 16, 16}, true},                      // prefill, GQA causal
      {{1, 20, 70, 2, 2, 1, 3, true}, true, 10},              // d = 1, window, BHSD
      {{3, 20, 77, 6, 3, 33, 33}, false, -1, 0, true, true},  // d = 33, lengths, sinks
      {{1, 40, 130, 2, 1, 64, 70}, true},                     // prefill, MQA, n_q != n_k
      {{1, 1, 1, 1, 1, 1, 1}},                                // one token, d = 1
      {{1, 1, 300, 8, 8, 64, 64}, false, -1, 20},             // decode, chunks inside blocks
      {{1, 1, 300, 8, 1, 64, 64, true}},                      // decode MQA, BHSD
      {{2, 3, 200, 4, 2, 33, 17}, false, -1, 0, true, true},  // decode, lengths, sinks
      {{1, 2, 77, 4, 4, 128, 128}, true, 30},                 // decode, causal window, d = 128
      {{1, 1, 9000, 4, 2, 16, 16}},                           // key segments
      {{1, 2, 9001, 2, 1, 8, 8, true}, true},                 // segments, causal
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
    run(p, options, &out, &lse);
    check_reference(p, options, out, lse);
  }
}

// A mask_mod and a score_mod (soft-capping) go through the int4 source like any other: decode
// and prefill stay bitwise the float call.
TEST(AttentionInt4Test, ModsAndSoftcapAreTheFloatCalls) {
  auto rng = make_rng(1845);
  for (const Index n_q : {1, 24}) {
    const Problem p({1, n_q, 100, 4, 2, 32, 32}, rng);
    AttentionOptions options;
    options.softcap = 5.0;
    options.threads = 1;
    const auto mask = [](Index, Index, Index i, Index j) { return (i + j) % 3 != 1; };
    const auto bias = [](float s, Index, Index h, Index, Index j) {
      return s - 0.01f * float(h) * float(j % 7);
    };
    std::vector<float> out_f(p.out_size()), out4(p.out_size());
    blockattn::attention(p.qv(), p.kv<const float>(p.kf.data(), p.s.d),
                         p.kv<const float>(p.vf.data(), p.s.d_v), p.outv(out_f), options, {}, mask,
                         bias);
    blockattn::attention(p.qv(), p.cache(), p.outv(out4), options, {}, mask, bias);
    EXPECT_TRUE(same_bits(out4, out_f)) << "n_q=" << n_q;
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

// Values (q4_0 groups): the byte layout (value i low and i + 16 high in byte i of a group, a
// short last group of its own), the bound |x − scale·q| <= |scale|/2 (|scale| at +|m|'s side,
// where 8 clamps to 7) up to one rounding, the largest value exact (−8 steps), a zero group
// scale 0, bfloat16 input equal to its widened floats, and one token at a time equal to one call.
TEST(AttentionInt4Test, ValuesQuantizeByGroupsAndAppendTokenByToken) {
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(1842);
  const Index n = 7, d = 33;  // a whole group and a one-value group
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(count(n * d));
  for (float& e : x) e = normal(rng);
  for (Index c = 0; c < 32; ++c) x[count(2 * d + c)] = 0.0f;  // token 2's first group: zeros
  std::vector<std::uint8_t> v4(count(n * bytes_of(d)), 0xAB);
  std::vector<float> sc(count(n * groups_of(d))), back(x.size());
  blockattn::quantize_kv(one_head<const float>(x.data(), n, d), one_head4(v4.data(), n, d),
                         one_head(sc.data(), n, groups_of(d)));
  blockattn::dequantize_kv(one_head4<const std::uint8_t>(v4.data(), n, d),
                           one_head<const float>(sc.data(), n, groups_of(d)),
                           one_head(back.data(), n, d));
  for (Index j = 0; j < n; ++j) {
    for (Index g = 0; g < groups_of(d); ++g) {
      const double s = std::abs(double(sc[count(j * groups_of(d) + g)]));
      double amax = 0;
      for (Index c = g * 32; c < std::min(d, g * 32 + 32); ++c) {
        amax = std::max(amax, std::abs(double(x[count(j * d + c)])));
      }
      EXPECT_EQ(s, amax / 8) << "token " << j << " group " << g;
      for (Index c = g * 32; c < std::min(d, g * 32 + 32); ++c) {
        const std::size_t i = count(j * d + c);
        const double err = std::abs(double(x[i]) - double(back[i]));
        ASSERT_LE(err, s + std::ldexp(amax, -23)) << "token " << j << " channel " << c;
        if (double(x[i]) * double(sc[count(j * groups_of(d) + g)]) <= 0) {  // not the clamped side
          ASSERT_LE(err, s / 2 + std::ldexp(amax, -23)) << "token " << j << " channel " << c;
        }
        if (std::abs(double(x[i])) == amax &&
            double(x[i]) * double(sc[count(j * groups_of(d) + g)]) < 0) {
          EXPECT_EQ(back[i], x[i]) << "the group's largest value is -8 steps exactly";
        }
      }
    }
    // The layout: value c of the first group in byte c % 16's low (c < 16) or high nibble, value
    // 32 (the one-value group) in byte 16's low nibble with the high nibble 0.
    const std::uint8_t* row = v4.data() + j * bytes_of(d);
    for (Index c = 0; c < 32; ++c) {
      const int u = c < 16 ? (row[c] & 15) : (row[c - 16] >> 4);
      EXPECT_EQ(float(u - 8) * sc[count(j * groups_of(d))], back[count(j * d + c)]);
    }
    EXPECT_EQ(float((row[16] & 15) - 8) * sc[count(j * groups_of(d) + 1)], back[count(j * d + 32)]);
    EXPECT_EQ(row[16] >> 4, 0);
  }
  EXPECT_EQ(sc[count(2 * groups_of(d))], 0.0f);
  // bfloat16: the same as quantizing its float values.
  std::vector<Eigen::bfloat16> xb(x.size());
  std::vector<float> xbf(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    xb[i] = static_cast<Eigen::bfloat16>(x[i]);
    xbf[i] = static_cast<float>(xb[i]);
  }
  std::vector<std::uint8_t> qb(v4.size()), qf(v4.size());
  std::vector<float> sb(sc.size()), sf(sc.size());
  blockattn::quantize_kv(one_head(xb.data(), n, d), one_head4(qb.data(), n, d),
                         one_head(sb.data(), n, groups_of(d)));
  blockattn::quantize_kv(one_head(xbf.data(), n, d), one_head4(qf.data(), n, d),
                         one_head(sf.data(), n, groups_of(d)));
  EXPECT_EQ(qb, qf);
  EXPECT_EQ(sb, sf);
  // Token by token into a larger cache: the same bytes and scales as one call.
  const Index capacity = 10;
  std::vector<std::uint8_t> a4(count(capacity * bytes_of(d)), 0x5C);
  std::vector<float> as(count(capacity * groups_of(d)), 9.0f);
  for (Index j = 0; j < n; ++j) {
    blockattn::quantize_kv(one_head<const float>(x.data() + j * d, 1, d),
                           one_head4(a4.data() + j * bytes_of(d), 1, d),
                           one_head(as.data() + j * groups_of(d), 1, groups_of(d)));
  }
  EXPECT_TRUE(std::equal(v4.begin(), v4.end(), a4.begin()));
  EXPECT_TRUE(std::equal(sc.begin(), sc.end(), as.begin()));
  EXPECT_EQ(a4[count(n * bytes_of(d))], 0x5C) << "wrote past the appended token";
}

// Keys (per channel over 32-token blocks, zero point): in one call |x − dequantized| <= scale/2
// plus the float roundings of the difference and the product (2^-23 relative of a value <=
// max|x| + scale·(8 + |zero|)); a constant channel is symmetric (|x|/7, zero 0) and exact up to
// rounding; bfloat16 equals its widened floats. Appending whole 32-token blocks is bitwise the
// one call; appending token by token (the open block re-quantized when its range grows) keeps
// every element within (re-quantizations + 1)·scale/2 <= 16·scale, leaves the bits of a block's
// earlier tokens alone for a token inside its range, and its RMS against the one-call cache is
// printed (docs/quantized_kv.md quotes it).
TEST(AttentionInt4Test, KeysQuantizePerChannelAndAppendInPlace) {
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(1843);
  const Index n = 75, d = 37;  // two whole blocks and an open one; groups of 32 and 5
  std::vector<float> x = outlier_keys(n, d, rng);
  for (Index j = 0; j < n; ++j) x[count(j * d + 5)] = 0.25f;  // a constant channel
  const Index row = bytes_of(d);
  std::vector<std::uint8_t> k4(count(n * row));
  std::vector<float> sc(count(blocks_of(n) * d)), zp(sc.size()), back(x.size());
  blockattn::quantize_kv(one_head<const float>(x.data(), n, d), 0, one_head4(k4.data(), n, d),
                         one_head(sc.data(), 3, d), one_head(zp.data(), 3, d));
  blockattn::dequantize_kv(one_head4<const std::uint8_t>(k4.data(), n, d),
                           one_head<const float>(sc.data(), 3, d),
                           one_head<const float>(zp.data(), 3, d), one_head(back.data(), n, d));
  double max_x = 0;
  for (const float e : x) max_x = std::max(max_x, std::abs(double(e)));
  for (Index j = 0; j < n; ++j) {
    for (Index c = 0; c < d; ++c) {
      const std::size_t i = count(j * d + c);
      const auto s = double(sc[count(j / 32 * d + c)]);
      const auto z = std::abs(double(zp[count(j / 32 * d + c)]));
      ASSERT_LE(std::abs(double(x[i]) - double(back[i])),
                s / 2 + std::ldexp(max_x + s * (8 + z), -23) * 2)
          << "token " << j << " channel " << c;
    }
  }
  EXPECT_EQ(zp[5], 0.0f);
  EXPECT_EQ(sc[5], 0.25f / 7.0f);
  // bfloat16: the same as quantizing its float values.
  std::vector<Eigen::bfloat16> xb(x.size());
  std::vector<float> xbf(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    xb[i] = static_cast<Eigen::bfloat16>(x[i]);
    xbf[i] = static_cast<float>(xb[i]);
  }
  std::vector<std::uint8_t> qb(k4.size()), qf(k4.size());
  std::vector<float> sb(sc.size()), sf(sc.size()), zb(sc.size()), zf(sc.size());
  blockattn::quantize_kv(one_head(xb.data(), n, d), 0, one_head4(qb.data(), n, d),
                         one_head(sb.data(), 3, d), one_head(zb.data(), 3, d));
  blockattn::quantize_kv(one_head(xbf.data(), n, d), 0, one_head4(qf.data(), n, d),
                         one_head(sf.data(), 3, d), one_head(zf.data(), 3, d));
  EXPECT_EQ(qb, qf);
  EXPECT_EQ(sb, sf);
  EXPECT_EQ(zb, zf);
  const Index capacity = 80;
  // Whole blocks (32, 32, then the last 11): bitwise the one call.
  {
    std::vector<std::uint8_t> b4(count(capacity * row), 0x77);
    std::vector<float> bs(count(blocks_of(capacity) * d), 1.0f), bz(bs.size(), 1.0f);
    for (Index j0 = 0; j0 < n; j0 += 32) {
      const Index m = std::min<Index>(32, n - j0);
      blockattn::quantize_kv(
          one_head<const float>(x.data() + j0 * d, m, d), j0, one_head4(b4.data(), capacity, d),
          one_head(bs.data(), blocks_of(capacity), d), one_head(bz.data(), blocks_of(capacity), d));
    }
    EXPECT_TRUE(std::equal(k4.begin(), k4.end(), b4.begin()));
    EXPECT_TRUE(std::equal(sc.begin(), sc.end(), bs.begin()));
    EXPECT_TRUE(std::equal(zp.begin(), zp.end(), bz.begin()));
  }
  // Token by token.
  std::vector<std::uint8_t> a4(count(capacity * row), 0);
  std::vector<float> as(count(blocks_of(capacity) * d), 0.0f), az(as.size(), 0.0f);
  for (Index j = 0; j < n; ++j) {
    blockattn::quantize_kv(
        one_head<const float>(x.data() + j * d, 1, d), j, one_head4(a4.data(), capacity, d),
        one_head(as.data(), blocks_of(capacity), d), one_head(az.data(), blocks_of(capacity), d));
  }
  std::vector<float> a_back(x.size());
  blockattn::dequantize_kv(one_head4<const std::uint8_t>(a4.data(), n, d),
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
  std::printf("int4 key RMS error, one call %.3e, token by token %.3e (%.2fx); worst %.2f steps\n",
              rms_once, rms_append, rms_append / rms_once, worst);
  EXPECT_LE(rms_append, 4 * rms_once);
  // A token inside the open block's range leaves the block's earlier bits alone.
  const std::vector<std::uint8_t> before = a4;
  const std::vector<float> before_s = as, before_z = az;
  std::vector<float> inside(count(d));
  for (Index c = 0; c < d; ++c) inside[count(c)] = a_back[count((n - 1) * d + c)];
  blockattn::quantize_kv(
      one_head<const float>(inside.data(), 1, d), n, one_head4(a4.data(), capacity, d),
      one_head(as.data(), blocks_of(capacity), d), one_head(az.data(), blocks_of(capacity), d));
  EXPECT_EQ(as, before_s);
  EXPECT_EQ(az, before_z);
  EXPECT_TRUE(
      std::equal(a4.begin() + n * row, a4.begin() + (n + 1) * row, a4.begin() + (n - 1) * row));
  EXPECT_TRUE(std::equal(a4.begin(), a4.begin() + n * row, before.begin()));
}

// Bad input: std::invalid_argument naming the argument and the sizes (or the bad value), and
// nothing written.
TEST(AttentionInt4Test, ValidationNamesTheArgument) {
  auto rng = make_rng(1844);
  const Problem p({1, 2, 40, 2, 1, 8, 33}, rng);
  const auto expect_error = [&](const Int4QuantizedKV& kv, const std::string& message) {
    std::vector<float> out(p.out_size(), 3.0f);
    EXPECT_THAT([&] { blockattn::attention(p.qv(), kv, p.outv(out)); },
                ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr(message)));
    for (const float e : out) ASSERT_EQ(e, 3.0f);
  };
  std::vector<float> bad_k_scale = p.k_scale, bad_k_zero = p.k_zero, bad_v_scale = p.v_scale;
  bad_k_zero[8 + 3] = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> inf_k_scale = p.k_scale, big_k_scale = p.k_scale;
  inf_k_scale[2] = std::numeric_limits<float>::infinity();
  big_k_scale[2] = std::numeric_limits<float>::max() / 2;  // finite, but ·(7 − zero) overflows
  std::vector<float> nan_v_scale = p.v_scale, big_v_scale = p.v_scale;
  nan_v_scale[2 * 2 + 1] = std::numeric_limits<float>::quiet_NaN();
  big_v_scale[3] = std::numeric_limits<float>::max() / 4;  // ·8 overflows
  struct Bad {
    void (*edit)(Int4QuantizedKV&, const void*);
    const void* arg;
    const char* message;
  };
  const Bad table[] = {
      {[](Int4QuantizedKV& kv, const void*) { kv.k.dim = 7; }, nullptr,
       "k.dim is 7 but q.dim is 8"},
      {[](Int4QuantizedKV& kv, const void*) { kv.v.seq = 39; }, nullptr,
       "v.seq is 39 but k.seq is 40"},
      {[](Int4QuantizedKV& kv, const void*) { kv.k_scale.seq = 1; }, nullptr,
       "k_scale.seq is 1 but ceil(k.seq / 32) is 2"},
      {[](Int4QuantizedKV& kv, const void*) { kv.k_zero.dim = 4; }, nullptr,
       "k_zero.dim is 4 but k.dim is 8"},
      {[](Int4QuantizedKV& kv, const void*) { kv.k_zero.data = nullptr; }, nullptr,
       "k_zero.data is null"},
      {[](Int4QuantizedKV& kv, const void*) { kv.v_scale.dim = 1; }, nullptr,
       "v_scale.dim is 1 but ceil(v.dim / 32) is 2"},
      {[](Int4QuantizedKV& kv, const void*) { kv.v_scale.seq = 39; }, nullptr,
       "v_scale.seq is 39 but v.seq is 40"},
      {[](Int4QuantizedKV& kv, const void*) { kv.v_scale.data = nullptr; }, nullptr,
       "v_scale.data is null"},
      {[](Int4QuantizedKV& kv, const void* a) { kv.k_zero.data = static_cast<const float*>(a); },
       bad_k_zero.data(), "k_zero[0, 1, 0, 3] is nan"},
      {[](Int4QuantizedKV& kv, const void* a) { kv.k_scale.data = static_cast<const float*>(a); },
       inf_k_scale.data(), "k_scale[0, 0, 0, 2] is inf"},
      {[](Int4QuantizedKV& kv, const void* a) { kv.k_scale.data = static_cast<const float*>(a); },
       big_k_scale.data(), "k_scale[0, 0, 0, 2] is"},
      {[](Int4QuantizedKV& kv, const void* a) { kv.v_scale.data = static_cast<const float*>(a); },
       nan_v_scale.data(), "v_scale[0, 2, 0, 1] is nan"},
      {[](Int4QuantizedKV& kv, const void* a) { kv.v_scale.data = static_cast<const float*>(a); },
       big_v_scale.data(), "v_scale[0, 1, 0, 1] is"},
  };
  for (const Bad& b : table) {
    SCOPED_TRACE(b.message);
    Int4QuantizedKV kv = p.cache();
    b.edit(kv, b.arg);
    expect_error(kv, b.message);
  }
  using ::testing::HasSubstr;
  using ::testing::ThrowsMessage;
  // quantize_kv for keys: sizes, position, non-finite input, a non-finite open block.
  std::vector<float> x(16, 1.0f);
  std::vector<std::uint8_t> q(40, 5);
  std::vector<float> s(2, 7.0f), z(2, 0.0f);
  const auto append = [&](Index position, Index cache_tokens, Index blocks) {
    blockattn::quantize_kv(blockattn::make_tensor_view(x.data(), 1, 16, 1, 1), position,
                           blockattn::make_int4_tensor_view(q.data(), 1, cache_tokens, 1, 1),
                           blockattn::make_tensor_view(s.data(), 1, blocks, 1, 1),
                           blockattn::make_tensor_view(z.data(), 1, blocks, 1, 1));
  };
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
  EXPECT_EQ(q, std::vector<std::uint8_t>(40, 5));
  EXPECT_EQ(s, std::vector<float>(2, 7.0f));
  EXPECT_EQ(z, std::vector<float>(2, 0.0f));
  // quantize_kv for values: group scale sizes, 4-bit view sizes, non-finite input.
  std::vector<float> vx(2 * 33, 1.0f);
  std::vector<std::uint8_t> vq(2 * 17, 5);
  std::vector<float> vs(4, 7.0f);
  const auto values = [&](Index groups, Index dim) {
    blockattn::quantize_kv(blockattn::make_tensor_view(vx.data(), 1, 2, 1, 33),
                           blockattn::make_int4_tensor_view(vq.data(), 1, 2, 1, dim),
                           blockattn::make_tensor_view(vs.data(), 1, 2, 1, groups));
  };
  EXPECT_THAT([&] { values(1, 33); }, ThrowsMessage<std::invalid_argument>(
                                          HasSubstr("v_scale.dim is 1 but ceil(x.dim / 32) is 2")));
  EXPECT_THAT([&] { values(2, 32); },
              ThrowsMessage<std::invalid_argument>(HasSubstr("v.dim is 32 but x.dim is 33")));
  vx[40] = -std::numeric_limits<float>::infinity();
  EXPECT_THAT([&] { values(2, 33); },
              ThrowsMessage<std::invalid_argument>(HasSubstr("x[0, 1, 0, 7] is -inf")));
  EXPECT_EQ(vq, std::vector<std::uint8_t>(2 * 17, 5));
  EXPECT_EQ(vs, std::vector<float>(4, 7.0f));
  // dequantize_kv: sizes.
  std::vector<float> out(40, 3.0f);
  EXPECT_THAT(
      [&] {
        blockattn::dequantize_kv(
            blockattn::make_int4_tensor_view<const std::uint8_t>(q.data(), 1, 40, 1, 1),
            blockattn::make_tensor_view<const float>(s.data(), 1, 1, 1, 1),
            blockattn::make_tensor_view<const float>(z.data(), 1, 1, 1, 1),
            blockattn::make_tensor_view(out.data(), 1, 40, 1, 1));
      },
      ThrowsMessage<std::invalid_argument>(
          HasSubstr("k_scale.seq is 1 but ceil(k.seq / 32) is 2")));
  EXPECT_THAT(
      [&] {
        blockattn::dequantize_kv(
            blockattn::make_int4_tensor_view<const std::uint8_t>(vq.data(), 1, 2, 1, 33),
            blockattn::make_tensor_view<const float>(vs.data(), 1, 2, 1, 1),
            blockattn::make_tensor_view(out.data(), 1, 2, 1, 20));
      },
      ThrowsMessage<std::invalid_argument>(HasSubstr("out.dim is 20 but v.dim is 33")));
  EXPECT_EQ(out, std::vector<float>(40, 3.0f));
}

// With a caller's Workspace, a second decode call and a prefill call allocate nothing
// (validation's scale scan, the dequantized runs, the loops and the merge).
// The alias check reads k's and v's rows as the ceil(dim / 2) bytes they hold: an out that
// starts right after k's last byte in the same buffer is no alias (the check once counted dim
// bytes a row and rejected it whenever the allocator put the two side by side), and one that
// starts on k's last byte still is.
TEST(AttentionInt4Test, OutRightAfterThePackedKeysIsNoAlias) {
  auto rng = make_rng(1845);
  const Problem p({1, 3, 40, 2, 1, 9, 7}, rng);
  std::vector<float> expected(p.out_size());
  blockattn::attention(p.qv(), p.cache(), p.outv(expected));
  const std::size_t key_bytes = p.k4.size();  // 40 rows of ceil(9 / 2) = 5 bytes
  const std::size_t out_floats = p.out_size();
  // One float buffer holds k's bytes (rounded up to whole floats) and then out.
  const std::size_t key_floats = (key_bytes + sizeof(float) - 1) / sizeof(float);
  ASSERT_EQ(key_bytes % sizeof(float), 0u) << "out must start exactly at k's end";
  std::vector<float> buffer(key_floats + out_floats, 3.0f);
  std::memcpy(buffer.data(), p.k4.data(), key_bytes);
  Int4QuantizedKV kv = p.cache();
  kv.k = p.kv4<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(buffer.data()), p.s.d);
  float* out = buffer.data() + key_floats;
  blockattn::attention(p.qv(), kv, view_of<float>(out, 1, p.s.n_q, p.s.heads, p.s.d_v, false));
  EXPECT_TRUE(same_bits(std::vector<float>(out, out + out_floats), expected));
  float* overlapping = out - 1;  // its first float is k's last 4 bytes
  EXPECT_THAT(
      [&] {
        blockattn::attention(p.qv(), kv,
                             view_of<float>(overlapping, 1, p.s.n_q, p.s.heads, p.s.d_v, false));
      },
      ::testing::ThrowsMessage<std::invalid_argument>(
          ::testing::HasSubstr("out overlaps the memory of k")));
}

TEST(AttentionInt4Test, SecondCallWithAWorkspaceAllocatesNothing) {
  auto rng = make_rng(1846);
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

}  // namespace attention_int4_test
