// attention() over an int8 K/V cache (QuantizedKV: int8 values, one float scale per token and kv
// head for K and for V) under float q and out, and quantize_kv() / dequantize_kv(). Oracles:
//   1. bitwise: the kernels compute with scale·q rounded once in float, in the packed tile
//      (prefill) or in registers (decode), which is exactly what dequantize_kv() writes, so an
//      int8 call must equal the float call on dequantize_kv()'s K and V bit for bit (out and lse),
//      for 1 and 2 threads, over both paths, GQA, every mask, padding and key segments;
//   2. blockattn::reference in long double on the dequantized values, with the float path's
//      tolerance (support/tolerance.hpp): the int8 path adds no error of its own beyond the
//      quantization, which both sides share.
// quantize_kv's round trip: |x − dequantized| <= scale/2 (round to nearest) plus the roundings of
// x/scale and of scale·q (see QuantizeRoundTripError). EIGEN_RUNTIME_NO_MALLOC: the no-malloc
// check of the last test (detail::NoMallocScope watches Eigen's allocator and Workspace's).

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

#include <blockattn/quantized_kv.hpp>
#include <blockattn/reference.hpp>

#include "support/bits.hpp"
#include "support/random.hpp"
#include "support/requires_malloc_guard.hpp"
#include "support/tolerance.hpp"

namespace attention_int8_test {
namespace {
using blockattn::test::count;
using blockattn::test::same_bits;

using blockattn::AttentionOptions;
using blockattn::Index;
using blockattn::QuantizedKV;
using blockattn::TensorView;
using blockattn::test::make_rng;
using blockattn::test::seed_trace;

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

/// One shape's float q, its int8 cache (quantized from random floats by quantize_kv) and the
/// cache's dequantized floats.
struct Problem {
  Shape s;
  std::vector<float> q, kf, vf;  // kf, vf: dequantize_kv of the int8 cache
  std::vector<std::int8_t> k8, v8;
  std::vector<float> k_scale, v_scale;

  Problem(const Shape& shape, std::mt19937_64& rng) : s(shape) {
    std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
    const auto fill = [&](std::vector<float>& x, Index n) {
      x.resize(count(n));
      for (float& e : x) e = dist(rng);
    };
    fill(q, s.batch * s.n_q * s.heads * s.d);
    std::vector<float> k, v;
    fill(k, s.batch * s.n_k * s.kv_heads * s.d);
    fill(v, s.batch * s.n_k * s.kv_heads * s.d_v);
    // Rows of very different sizes, and one zero row (scale 0), so scales vary per row.
    for (std::size_t i = 0; i < k.size(); ++i) k[i] *= static_cast<float>(1 + (i / count(s.d)) % 5);
    if (!v.empty()) std::fill(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(s.d_v), 0.0f);
    k8.resize(k.size());
    v8.resize(v.size());
    k_scale.resize(count(s.batch * s.n_k * s.kv_heads));
    v_scale.resize(k_scale.size());
    blockattn::quantize_kv(kv(k.data(), s.d), kv(k8.data(), s.d), kv(k_scale.data(), 1));
    blockattn::quantize_kv(kv(v.data(), s.d_v), kv(v8.data(), s.d_v), kv(v_scale.data(), 1));
    kf.resize(k.size());
    vf.resize(v.size());
    blockattn::dequantize_kv(kv<const std::int8_t>(k8.data(), s.d),
                             kv<const float>(k_scale.data(), 1), kv(kf.data(), s.d));
    blockattn::dequantize_kv(kv<const std::int8_t>(v8.data(), s.d_v),
                             kv<const float>(v_scale.data(), 1), kv(vf.data(), s.d_v));
  }
  /// A [batch, n_k, kv_heads, dim] view in the shape's layout (scales: dim 1).
  template <class T>
  TensorView<T> kv(T* data, Index dim) const {
    return view_of<T>(data, s.batch, s.n_k, s.kv_heads, dim, s.bhsd);
  }
  TensorView<const float> qv() const {
    return view_of<const float>(q.data(), s.batch, s.n_q, s.heads, s.d, s.bhsd);
  }
  TensorView<float> outv(std::vector<float>& x) const {
    return view_of<float>(x.data(), s.batch, s.n_q, s.heads, s.d_v, s.bhsd);
  }
  QuantizedKV cache() const {
    return {kv<const std::int8_t>(k8.data(), s.d), kv<const float>(k_scale.data(), 1),
            kv<const std::int8_t>(v8.data(), s.d_v), kv<const float>(v_scale.data(), 1)};
  }
  std::size_t out_size() const { return count(s.batch * s.n_q * s.heads * s.d_v); }
  std::size_t lse_size() const { return count(s.batch * s.heads * s.n_q); }
};

/// The float call on the dequantized cache, then the int8 call with 1 and 2 threads (the second
/// with a Workspace): bitwise the same out and lse. Returns the float call's out and lse.
template <class MaskMod = blockattn::NoMaskMod>
void check_bitwise(const Problem& p, AttentionOptions options, std::vector<float>* out_result,
                   std::vector<float>* lse_result, const MaskMod& mask_mod = {}) {
  std::vector<float> out_f(p.out_size());
  std::vector<float> lse_f(p.lse_size());
  options.threads = 1;
  blockattn::attention(p.qv(), p.kv<const float>(p.kf.data(), p.s.d),
                       p.kv<const float>(p.vf.data(), p.s.d_v), p.outv(out_f), options, lse_f,
                       mask_mod);
  blockattn::Workspace workspace;
  for (const int threads : {1, 2}) {
    SCOPED_TRACE("threads=" + std::to_string(threads));
    options.threads = threads;
    options.workspace = threads == 2 ? &workspace : nullptr;
    std::vector<float> out8(p.out_size());
    std::vector<float> lse8(p.lse_size());
    blockattn::attention(p.qv(), p.cache(), p.outv(out8), options, lse8, mask_mod);
    EXPECT_TRUE(same_bits(out8, out_f)) << "int8 out is not the float call's on the dequantized";
    EXPECT_TRUE(same_bits(lse8, lse_f)) << "int8 lse is not the float call's on the dequantized";
  }
  *out_result = out_f;
  *lse_result = lse_f;
}

/// The long double reference on the dequantized values against the int8 call's output (bitwise
/// the float call's), within the float path's tolerance.
void check_reference(const Problem& p, const AttentionOptions& options,
                     const std::vector<float>& out8, const std::vector<float>& lse8) {
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
  const double scale = options.scale != 0 ? options.scale : 1 / std::sqrt(double(s.d));
  const Index group = s.heads / s.kv_heads;
  const auto out_view = view_of<const float>(out8.data(), s.batch, s.n_q, s.heads, s.d_v, s.bhsd);
  const auto ref_view = view_of<const Real>(ref.data(), s.batch, s.n_q, s.heads, s.d_v, s.bhsd);
  for (Index b = 0; b < s.batch; ++b) {
    for (Index h = 0; h < s.heads; ++h) {
      using blockattn::detail::head_slice;
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

// Awkward shapes over both paths (prefill: more than 8 rows per kv head, K/V dequantized once per
// tile; decode: at most 8, int8 rows read in place and scaled in registers): ragged chunks,
// n_q ≠ n_k, d = 1, d not a multiple of the vector width, GQA and MQA, BSHD and BHSD (pipelined
// decode), padding, key segments (n_k > 8192), causal and window masks.
TEST(AttentionInt8Test, EqualsTheFloatCallOnTheDequantizedCacheAndTheReference) {
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(1801);
  struct Case {
    Shape shape;
    bool causal = false;
    Index window = -1;
    Index query_chunk = 0;
    Index key_chunk = 0;
    bool padding = false;
  };
  const Case cases[] = {
      {{1, 37, 53, 1, 1, 24, 40}, false, -1, 16, 20},  // prefill, ragged chunks
      {{2, 45, 45, 4, 2, 16, 16}, true, -1, 0, 0},     // GQA causal, default chunks
      {{1, 1, 1, 1, 1, 1, 1}},                         // one token, d = 1
      {{1, 9, 130, 2, 1, 1, 3}, false, 7, 4, 32},      // d = 1, window, MQA
      {{1, 1, 300, 8, 8, 64, 64}},                     // decode, 8 heads
      {{1, 1, 300, 8, 1, 64, 64, true}},               // decode MQA, contiguous rows (pipelined)
      {{2, 3, 200, 4, 2, 33, 17, true}, true, -1, 0, 0, true},  // decode, padding, BHSD
      {{1, 1, 9000, 4, 2, 16, 16}},                  // decode over key segments, heads interleaved
      {{1, 2, 9000, 2, 1, 8, 8, true}, true},        // segments, pipelined, causal
      {{1, 100, 70, 2, 2, 32, 32}, true, 10, 0, 0},  // prefill causal window, n_q > n_k
      {{3, 20, 77, 6, 3, 19, 21}, false, -1, 0, 0, true},  // prefill GQA, padding, odd d
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
    options.query_chunk = c.query_chunk;
    options.key_chunk = c.key_chunk;
    std::vector<Index> lengths;
    if (c.padding) {
      for (Index b = 0; b < s.batch; ++b) lengths.push_back(b == 0 ? 0 : s.n_k - 5);
      options.key_lengths = lengths;
    }
    std::vector<float> out, lse;
    check_bitwise(p, options, &out, &lse);
    check_reference(p, options, out, lse);
  }
}

// A user mask_mod reaches the int8 call as it does the float call.
TEST(AttentionInt8Test, MaskMod) {
  auto rng = make_rng(1802);
  const Problem p({1, 12, 90, 4, 2, 32, 32}, rng);
  const auto mask_mod = [](Index, Index h, Index i, Index j) { return (i + j + h) % 5 != 0; };
  std::vector<float> out, lse;
  check_bitwise(p, AttentionOptions{}, &out, &lse, mask_mod);
  const Problem decode({1, 1, 90, 4, 2, 32, 32}, rng);
  check_bitwise(decode, AttentionOptions{}, &out, &lse, mask_mod);
}

// quantize_kv: per row scale = max|x|/127 and |x − scale·q| <= scale/2 (round to nearest) plus
// the float roundings of x/scale (relative 2^-24 of a quotient <= 127.5, so <= 2^-17 of scale)
// and of scale·q (2^-24 relative of a value <= max|x| + scale/2); a zero row has scale 0, q 0.
// Also from bfloat16, and one token appended in place through a one-token slice.
TEST(AttentionInt8Test, QuantizeRoundTripError) {
  auto rng = make_rng(1803);
  std::uniform_real_distribution<float> dist(-3.0f, 3.0f);
  const Index seq = 40, heads = 3, d = 37;
  std::vector<float> x(count(seq * heads * d));
  for (float& e : x) e = dist(rng) * static_cast<float>(1 + rng() % 100);
  std::fill(x.begin(), x.begin() + d, 0.0f);  // row 0: zero
  std::vector<std::int8_t> q(x.size());
  std::vector<float> scale(count(seq * heads));
  std::vector<float> back(x.size());
  const auto xv = blockattn::make_tensor_view(x.data(), 1, seq, heads, d);
  const auto qv = blockattn::make_tensor_view(q.data(), 1, seq, heads, d);
  const auto sv = blockattn::make_tensor_view(scale.data(), 1, seq, heads, 1);
  blockattn::quantize_kv(xv, qv, sv);
  blockattn::dequantize_kv(qv, sv, blockattn::make_tensor_view(back.data(), 1, seq, heads, d));
  EXPECT_EQ(scale[0], 0.0f);
  for (Index r = 0; r < seq * heads; ++r) {
    float amax = 0;
    for (Index c = 0; c < d; ++c) amax = std::max(amax, std::abs(x[count(r * d + c)]));
    EXPECT_EQ(scale[count(r)], amax / 127.0f);
    const auto sc = static_cast<double>(scale[count(r)]);
    for (Index c = 0; c < d; ++c) {
      const std::size_t i = count(r * d + c);
      const double bound = sc * (0.5 + std::ldexp(1.0, -16)) + std::ldexp(double(amax) + sc, -23);
      ASSERT_LE(std::abs(double(x[i]) - double(back[i])), bound) << "row " << r << " col " << c;
      ASSERT_LE(std::abs(int(q[i])), 127);
    }
  }
  // bfloat16 input: the same as quantizing its float values.
  std::vector<Eigen::bfloat16> xb(x.size());
  std::vector<float> xbf(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    xb[i] = static_cast<Eigen::bfloat16>(x[i]);
    xbf[i] = static_cast<float>(xb[i]);
  }
  std::vector<std::int8_t> qb(x.size()), qf(x.size());
  std::vector<float> sb(scale.size()), sf(scale.size());
  blockattn::quantize_kv(blockattn::make_tensor_view(xb.data(), 1, seq, heads, d),
                         blockattn::make_tensor_view(qb.data(), 1, seq, heads, d),
                         blockattn::make_tensor_view(sb.data(), 1, seq, heads, 1));
  blockattn::quantize_kv(blockattn::make_tensor_view(xbf.data(), 1, seq, heads, d),
                         blockattn::make_tensor_view(qf.data(), 1, seq, heads, d),
                         blockattn::make_tensor_view(sf.data(), 1, seq, heads, 1));
  EXPECT_EQ(qb, qf);
  EXPECT_EQ(sb, sf);
  // Append: token 7 rewritten through a one-token slice leaves the others untouched.
  std::vector<std::int8_t> q2 = q;
  std::vector<float> s2 = scale;
  std::vector<float> token(count(heads * d), 1.5f);
  blockattn::quantize_kv(blockattn::make_tensor_view(token.data(), 1, 1, heads, d),
                         blockattn::make_tensor_view(q2.data() + 7 * heads * d, 1, 1, heads, d),
                         blockattn::make_tensor_view(s2.data() + 7 * heads, 1, 1, heads, 1));
  for (Index r = 0; r < seq * heads; ++r) {
    const bool appended = r / heads == 7;
    EXPECT_EQ(s2[count(r)], appended ? 1.5f / 127.0f : scale[count(r)]);
    for (Index c = 0; c < d; ++c) {
      EXPECT_EQ(q2[count(r * d + c)], appended ? 127 : q[count(r * d + c)]);
    }
  }
}

// Bad caches: std::invalid_argument naming the argument and both sizes (or the bad scale), and
// out untouched.
TEST(AttentionInt8Test, ValidationNamesTheArgument) {
  auto rng = make_rng(1804);
  const Problem p({1, 2, 10, 2, 1, 8, 8}, rng);
  const auto expect_error = [&](const QuantizedKV& kv, const std::string& message) {
    std::vector<float> out(p.out_size(), 3.0f);
    EXPECT_THAT([&] { blockattn::attention(p.qv(), kv, p.outv(out)); },
                ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr(message)));
    for (const float e : out) ASSERT_EQ(e, 3.0f);
  };
  QuantizedKV kv = p.cache();
  kv.k_scale.seq = 9;
  expect_error(kv, "k_scale.seq is 9 but k.seq is 10");
  kv = p.cache();
  kv.v_scale.heads = 2;
  expect_error(kv, "v_scale.heads is 2 but v.heads is 1");
  kv = p.cache();
  kv.v_scale.dim = 4;
  expect_error(kv, "v_scale.dim is 4 but 1 is 1");
  kv = p.cache();
  kv.k_scale.data = nullptr;
  expect_error(kv, "k_scale.data is null");
  kv = p.cache();
  kv.k.dim = 7;
  expect_error(kv, "k.dim is 7 but q.dim is 8");
  std::vector<float> bad = p.v_scale;
  bad[3] = std::numeric_limits<float>::quiet_NaN();
  kv = p.cache();
  kv.v_scale.data = bad.data();
  expect_error(kv, "v_scale[0, 3, 0] is nan");
  bad[3] = std::numeric_limits<float>::max() / 64;
  expect_error(kv, "v_scale[0, 3, 0] is");
  // quantize_kv: sizes and non-finite input, nothing written.
  std::vector<float> x(16, 1.0f);
  std::vector<std::int8_t> q(16, 5);
  std::vector<float> s(2, 7.0f);
  EXPECT_THAT(
      [&] {
        blockattn::quantize_kv(blockattn::make_tensor_view(x.data(), 1, 2, 1, 8),
                               blockattn::make_tensor_view(q.data(), 1, 2, 1, 8),
                               blockattn::make_tensor_view(s.data(), 1, 1, 1, 1));
      },
      ::testing::ThrowsMessage<std::invalid_argument>(
          ::testing::HasSubstr("scale.seq is 1 but x.seq is 2")));
  x[12] = std::numeric_limits<float>::infinity();
  EXPECT_THAT(
      [&] {
        blockattn::quantize_kv(blockattn::make_tensor_view(x.data(), 1, 2, 1, 8),
                               blockattn::make_tensor_view(q.data(), 1, 2, 1, 8),
                               blockattn::make_tensor_view(s.data(), 1, 2, 1, 1));
      },
      ::testing::ThrowsMessage<std::invalid_argument>(
          ::testing::HasSubstr("x[0, 1, 0, 4] is inf")));
  EXPECT_EQ(q, std::vector<std::int8_t>(16, 5));
  EXPECT_EQ(s, std::vector<float>(2, 7.0f));
}

// With a caller's Workspace, a second int8 decode call and a prefill call (after the workspace
// grew to fit both) allocate nothing: validation (the scale scan too), the loops and the merge.
TEST(AttentionInt8Test, SecondCallWithAWorkspaceAllocatesNothing) {
  auto rng = make_rng(1805);
  const Problem decode({1, 1, 9000, 4, 2, 64, 64}, rng);
  const Problem prefill({1, 100, 300, 4, 2, 64, 64}, rng);
  blockattn::Workspace workspace;
  AttentionOptions options;
  options.threads = 1;
  options.workspace = &workspace;
  std::vector<float> out_d(decode.out_size()), out_p(prefill.out_size());
  std::vector<float> lse_d(decode.lse_size());
  blockattn::attention(decode.qv(), decode.cache(), decode.outv(out_d), options, lse_d);
  blockattn::attention(prefill.qv(), prefill.cache(), prefill.outv(out_p), options);
  const std::vector<float> first_d = out_d, first_p = out_p;
  {
    const blockattn::detail::NoMallocScope no_malloc;  // aborts on an allocation
    blockattn::attention(decode.qv(), decode.cache(), decode.outv(out_d), options, lse_d);
    blockattn::attention(prefill.qv(), prefill.cache(), prefill.outv(out_p), options);
  }
  EXPECT_TRUE(same_bits(out_d, first_d));
  EXPECT_TRUE(same_bits(out_p, first_p));
}

}  // namespace

}  // namespace attention_int8_test
