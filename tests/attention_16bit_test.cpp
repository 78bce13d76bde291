// attention() on Eigen::bfloat16 and Eigen::half storage: q, k, v, out all 16-bit, and float q/out
// over a 16-bit K/V cache (the KV-cache case), through every form (single-head views, TensorView,
// GQA, masks, functors, a Workspace, lse). Two oracles:
//   1. bitwise: a 16-bit input is widened exactly to float (in the workspace for q, in registers
//      or the packed tile for K/V) and the float kernels run unchanged, with the plan of a float
//      call, so a 16-bit call must give exactly round(float call on the widened inputs) — out
//      rounded once, lse the float call's — and a mixed call exactly the float call on the
//      widened K/V; bitwise the same for 1 and 2 threads; special values (NaN, ±inf in the cache,
//      fully masked rows) included. Except on the bf16 dot path (AVX512_BF16 builds, bf16 q and K,
//      prefill: detail/bf16_dot.hpp): there the scores come from vdpbf16ps, which sums in another
//      order and applies the scale after the dot product, and P is rounded to bf16 for P·V, so
//      an all-bf16 call is no longer bitwise round(float call); the bitwise comparison with the
//      float call is restricted to builds without that path (kDotPath below), and on the dot
//      path the all-bf16 call is checked by oracle 2 (the dot path's score error, like the FMA
//      chain's, is within d·u_float·Σ|q||k|; P's rounding adds the term below) and for bitwise
//      equality across thread counts. The mixed call (float q) never takes the dot path and
//      stays bitwise the float call;
//   2. blockattn::reference in long double on the stored (rounded) inputs, with the float path's
//      tolerance (support/tolerance.hpp) plus one rounding of the output to the format:
//      u_S·max|out| with u_S = 2^-8 (bfloat16: 8 significant bits) or 2^-11 (half: 11). On the
//      dot path, plus P's rounding to bf16 (each p_j within u_S relative, l the float sum):
//      u_S·Σ_j p_j·|v_jc| / Σ_j p_j, the reference on |v|.

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

#include <blockattn/attention.hpp>
#include <blockattn/reference.hpp>

#include "support/bits.hpp"
#include "support/format16.hpp"
#include "support/random.hpp"
#include "support/tolerance.hpp"

namespace attention_16bit_test {
namespace {
using blockattn::test::same_bits;

using blockattn::AttentionOptions;
using blockattn::Index;
using blockattn::Matrix;
using blockattn::TensorView;
using blockattn::test::format_u;
using blockattn::test::make_rng;
using blockattn::test::random16;
using blockattn::test::seed_trace;

using Real = long double;

template <class S>
class Attention16BitTest : public ::testing::Test {};
using Formats = ::testing::Types<Eigen::bfloat16, Eigen::half>;
TYPED_TEST_SUITE(Attention16BitTest, Formats, );

template <class S>
Matrix<float> widened(const Matrix<S>& m) {
  return m.template cast<float>();
}

template <class S>
Matrix<S> rounded(const Matrix<float>& m) {
  return m.template cast<S>();
}

/// Whether an all-S prefill computes its scores on bf16 pairs (this build has AVX512_BF16 and S
/// is bfloat16): then the all-16-bit call is not bitwise round(float call) (top of the file).
template <class S>
constexpr bool kDotPath = blockattn::detail::kBf16DotScores<S, S>;

/// Bitwise equality of two matrices of the same type (NaN payloads included).
template <class T>
bool same_bits(const Matrix<T>& a, const Matrix<T>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}

/// One call's shape: [batch, seq, heads, dim] tensors, BSHD (heads interleaved in a row) or BHSD
/// (each head's rows contiguous).
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

/// The inputs of one shape in S and their widened float copies, and the outputs of every call.
template <class S>
struct Problem {
  Shape s;
  Matrix<S> q, k, v;
  Matrix<float> qf, kf, vf;

  Problem(const Shape& shape, std::mt19937_64& rng) : s(shape) {
    q = random16<S>(rng, s.batch * s.n_q * s.heads, s.d, -2, 2);
    k = random16<S>(rng, s.batch * s.n_k * s.kv_heads, s.d, -2, 2);
    v = random16<S>(rng, s.batch * s.n_k * s.kv_heads, s.d_v);
    widen();
  }
  void widen() {
    qf = widened(q);
    kf = widened(k);
    vf = widened(v);
  }
  template <class T>
  TensorView<const T> qv(const Matrix<T>& x) const {
    return view_of<const T>(x.data(), s.batch, s.n_q, s.heads, s.d, s.bhsd);
  }
  template <class T>
  TensorView<const T> kv(const Matrix<T>& x, Index dim) const {
    return view_of<const T>(x.data(), s.batch, s.n_k, s.kv_heads, dim, s.bhsd);
  }
  template <class T>
  TensorView<T> outv(Matrix<T>& x) const {
    return view_of<T>(x.data(), s.batch, s.n_q, s.heads, s.d_v, s.bhsd);
  }
  Index rows() const { return s.batch * s.n_q * s.heads; }
  Index lse_size() const { return s.batch * s.heads * s.n_q; }
};

/// Runs the float call, the 16-bit call (threads 1 and 2) and the mixed call of one problem and
/// checks the bitwise oracle; returns the 16-bit output and lse for further checks.
template <class S, class MaskMod = blockattn::NoMaskMod, class ScoreMod = blockattn::NoScoreMod>
void check_bitwise(const Problem<S>& p, AttentionOptions options, Matrix<S>* out16_result = nullptr,
                   std::vector<float>* lse16_result = nullptr, const MaskMod& mask_mod = {},
                   const ScoreMod& score_mod = {}) {
  Matrix<float> out_f(p.rows(), p.s.d_v);
  std::vector<float> lse_f(static_cast<std::size_t>(p.lse_size()));
  options.threads = 1;
  blockattn::attention(p.qv(p.qf), p.kv(p.kf, p.s.d), p.kv(p.vf, p.s.d_v), p.outv(out_f), options,
                       lse_f, mask_mod, score_mod);
  const Matrix<S> expected = rounded<S>(out_f);
  blockattn::Workspace workspace;
  Matrix<S> out16_one;
  std::vector<float> lse16_one;
  for (const int threads : {1, 2}) {
    SCOPED_TRACE("threads=" + std::to_string(threads));
    options.threads = threads;
    options.workspace = threads == 2 ? &workspace : nullptr;
    Matrix<S> out16(p.rows(), p.s.d_v);
    std::vector<float> lse16(lse_f.size());
    blockattn::attention(p.qv(p.q), p.kv(p.k, p.s.d), p.kv(p.v, p.s.d_v), p.outv(out16), options,
                         lse16, mask_mod, score_mod);
    if constexpr (!kDotPath<S>) {
      EXPECT_TRUE(same_bits(out16, expected)) << "16-bit out is not round(float out)";
      EXPECT_TRUE(same_bits(lse16, lse_f)) << "16-bit lse is not the float call's";
    } else if (threads == 1) {
      out16_one = out16;
      lse16_one = lse16;
    } else {  // the dot path: the same bits for every thread count
      EXPECT_TRUE(same_bits(out16, out16_one)) << "16-bit out depends on the thread count";
      EXPECT_TRUE(same_bits(lse16, lse16_one)) << "16-bit lse depends on the thread count";
    }
    Matrix<float> out_m(p.rows(), p.s.d_v);
    std::vector<float> lse_m(lse_f.size());
    blockattn::attention(p.qv(p.qf), p.kv(p.k, p.s.d), p.kv(p.v, p.s.d_v), p.outv(out_m), options,
                         lse_m, mask_mod, score_mod);
    EXPECT_TRUE(same_bits(out_m, out_f)) << "mixed out is not the float call's";
    EXPECT_TRUE(same_bits(lse_m, lse_f)) << "mixed lse is not the float call's";
    if (threads == 1 && out16_result != nullptr) *out16_result = out16;
    if (threads == 1 && lse16_result != nullptr) *lse16_result = lse16;
  }
}

/// The long double reference on the stored values, compared with the 16-bit output within the
/// float path's tolerance plus one rounding to S (see the top of the file), and the lse within
/// the float path's lse tolerance; `extra` bounds what modifiers add to a logit (E of
/// support/tolerance.hpp). A row with no visible key must be out 0, lse −inf.
template <class S, class MaskMod = blockattn::NoMaskMod, class ScoreMod = blockattn::NoScoreMod>
void check_reference(const Problem<S>& p, const AttentionOptions& options, const Matrix<S>& out16,
                     const std::vector<float>& lse16, const MaskMod& mask_mod = {},
                     const ScoreMod& score_mod = {}, double extra = 0) {
  const Matrix<Real> q = p.qf.template cast<Real>();
  const Matrix<Real> k = p.kf.template cast<Real>();
  const Matrix<Real> v = p.vf.template cast<Real>();
  Matrix<Real> ref(p.rows(), p.s.d_v);
  std::vector<Real> ref_lse(static_cast<std::size_t>(p.lse_size()));
  blockattn::reference::attention(p.qv(q), p.kv(k, p.s.d), p.kv(v, p.s.d_v), p.outv(ref), options,
                                  ref_lse, mask_mod, score_mod);
  // The dot path also rounds each p_j to bf16 before P·V (l keeps the float sum): out[i, c] moves
  // by at most u_S·Σ_j p_j·|v_jc| / Σ_j p_j, the reference on |v|.
  Matrix<Real> ref_abs_v(p.rows(), p.s.d_v);
  if constexpr (kDotPath<S>) {
    const Matrix<Real> abs_v = v.cwiseAbs();
    std::vector<Real> abs_lse(static_cast<std::size_t>(p.lse_size()));
    blockattn::reference::attention(p.qv(q), p.kv(k, p.s.d), p.kv(abs_v, p.s.d_v),
                                    p.outv(ref_abs_v), options, abs_lse, mask_mod, score_mod);
  }
  const double scale = options.scale != 0 ? options.scale : 1 / std::sqrt(double(p.s.d));
  const double u_s = format_u<S>();
  const Index group = p.s.heads / p.s.kv_heads;
  double worst = 0;
  for (Index b = 0; b < p.s.batch; ++b) {
    for (Index h = 0; h < p.s.heads; ++h) {
      const auto qh = blockattn::detail::head_slice(p.qv(q), b, h);
      const auto kh = blockattn::detail::head_slice(p.kv(k, p.s.d), b, h / group);
      const auto vh = blockattn::detail::head_slice(p.kv(v, p.s.d_v), b, h / group);
      const Matrix<Real> qm = qh;
      const Matrix<Real> km = kh;
      const Matrix<Real> vm = vh;
      const std::vector<double> tol =
          blockattn::test::attention_tolerance<float>(qm, km, vm, scale, extra);
      const std::vector<double> lse_tol =
          blockattn::test::lse_tolerance<float>(qm, km, scale, extra);
      const auto got = blockattn::detail::head_slice(p.outv(const_cast<Matrix<S>&>(out16)), b, h);
      const auto want = blockattn::detail::head_slice(p.outv(ref), b, h);
      const auto abs_v_out = blockattn::detail::head_slice(p.outv(ref_abs_v), b, h);
      for (Index i = 0; i < p.s.n_q; ++i) {
        const auto at = static_cast<std::size_t>((b * p.s.heads + h) * p.s.n_q + i);
        const double bound = tol[static_cast<std::size_t>(i)] +
                             u_s * static_cast<double>(want.row(i).cwiseAbs().maxCoeff());
        if (std::isinf(ref_lse[at])) {  // no visible key: out 0, lse −inf
          EXPECT_EQ(lse16[at], -std::numeric_limits<float>::infinity()) << "b=" << b << " h=" << h;
          EXPECT_TRUE(got.row(i).template cast<float>().isZero(0)) << "b=" << b << " h=" << h;
          continue;
        }
        for (Index c = 0; c < p.s.d_v; ++c) {
          const double err =
              std::abs(static_cast<double>(static_cast<float>(got(i, c))) - double(want(i, c)));
          const double limit =
              bound + (kDotPath<S> ? u_s * static_cast<double>(abs_v_out(i, c)) : 0.0);
          worst = std::max(worst, err / limit);
          ASSERT_LE(err, limit) << "b=" << b << " h=" << h << " i=" << i << " c=" << c;
        }
        EXPECT_LE(std::abs(double(lse16[at]) - double(ref_lse[at])), lse_tol[std::size_t(i)]);
      }
    }
  }
  ::testing::Test::RecordProperty("worst_error_over_bound", std::to_string(worst));
}

// Awkward shapes over both paths (prefill: more than 8 rows per kv head; decode: at most 8):
// n not a multiple of the chunks, n_q ≠ n_k, d = 1, one token, GQA and MQA, BSHD and BHSD (the
// pipelined decode), a key split into segments (n_k > 8192 keys), and every mask.
TYPED_TEST(Attention16BitTest, EqualsTheRoundedFloatCallAndTheReference) {
  using S = TypeParam;
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(1601);
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
  };
  for (const Case& c : cases) {
    const Shape& s = c.shape;
    SCOPED_TRACE("batch=" + std::to_string(s.batch) + " n_q=" + std::to_string(s.n_q) +
                 " n_k=" + std::to_string(s.n_k) + " heads=" + std::to_string(s.heads) + "/" +
                 std::to_string(s.kv_heads) + " d=" + std::to_string(s.d) + "/" +
                 std::to_string(s.d_v) + (s.bhsd ? " BHSD" : " BSHD"));
    const Problem<S> p(s, rng);
    AttentionOptions options;
    options.causal = c.causal;
    options.window_left = c.window;
    options.query_chunk = c.query_chunk;
    options.key_chunk = c.key_chunk;
    std::vector<Index> lengths;
    if (c.padding) {
      for (Index b = 0; b < s.batch; ++b)
        lengths.push_back(b == 0 ? 0 : s.n_k - 5);  // b = 0: empty
      options.key_lengths = lengths;
    }
    Matrix<S> out16;
    std::vector<float> lse16;
    check_bitwise(p, options, &out16, &lse16);
    check_reference(p, options, out16, lse16);
  }
}

// User functors (a mask_mod and a score_mod, which receive float scores) and the built-in
// modifiers (soft-capping, ALiBi) through the 16-bit and mixed calls.
TYPED_TEST(Attention16BitTest, FunctorsAndModifiers) {
  using S = TypeParam;
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(1602);
  const auto mask_mod = [](Index, Index h, Index i, Index j) { return (i + j + h) % 5 != 0; };
  const auto score_mod = [](auto score, Index, Index h, Index i, Index j) {
    using T = decltype(score);
    return score + static_cast<T>(0.0625) * static_cast<T>((i + 2 * j + h) % 3);
  };
  for (const Index n_q : {Index{1}, Index{50}}) {
    SCOPED_TRACE("n_q=" + std::to_string(n_q));
    const Problem<S> p({1, n_q, 77, 4, 2, 20, 12}, rng);
    AttentionOptions options;
    options.causal = n_q > 1;
    Matrix<S> out16;
    std::vector<float> lse16;
    check_bitwise(p, options, &out16, &lse16, mask_mod, score_mod);
    // The score_mod adds at most 0.125 to a logit: E = 0.125 in the tolerance.
    check_reference(p, options, out16, lse16, mask_mod, score_mod, /*extra=*/0.125);
    const std::vector<double> slopes = {0.5, 0.25, 0.125, 0.0625};
    options.alibi_slopes = slopes;
    options.softcap = 5;
    check_bitwise(p, options);
  }
}

// The single-head Eigen forms: Matrix<S> views with lse, out a block of a larger matrix, and the
// mixed form with float q/out over 16-bit K/V, against the float call.
TYPED_TEST(Attention16BitTest, SingleHeadViews) {
  using S = TypeParam;
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(1603);
  for (const Index n_q : {Index{1}, Index{5}, Index{61}}) {
    SCOPED_TRACE("n_q=" + std::to_string(n_q));
    const Matrix<S> q = random16<S>(rng, n_q, 40, -2, 2);
    const Matrix<S> k = random16<S>(rng, 90, 40, -2, 2);
    const Matrix<S> v = random16<S>(rng, 90, 24);
    const Matrix<float> qf = widened(q), kf = widened(k), vf = widened(v);
    AttentionOptions options;
    options.causal = true;
    options.key_chunk = 32;
    Matrix<float> out_f(n_q, 24);
    std::vector<float> lse_f(static_cast<std::size_t>(n_q));
    blockattn::attention(qf, kf, vf, out_f, options, lse_f);
    Matrix<S> big(n_q + 2, 30);
    std::vector<float> lse16(lse_f.size());
    blockattn::attention(q, k, v, big.block(1, 3, n_q, 24), options, lse16);
    if constexpr (!kDotPath<S>) {  // the dot path: the reference check below only
      EXPECT_TRUE(same_bits(Matrix<S>(big.block(1, 3, n_q, 24)), rounded<S>(out_f)));
      EXPECT_TRUE(same_bits(lse16, lse_f));
    }
    Matrix<float> out_m(n_q, 24);
    std::vector<float> lse_m(lse_f.size());
    blockattn::attention(qf, k, v, out_m, options, lse_m);
    EXPECT_TRUE(same_bits(out_m, out_f));
    EXPECT_TRUE(same_bits(lse_m, lse_f));
    // reference::attention on the 16-bit storage (long double inside, out rounded to S).
    Matrix<S> ref16(n_q, 24);
    std::vector<float> ref_lse(lse_f.size());
    blockattn::reference::attention(q, k, v, ref16, options, ref_lse);
    for (Index i = 0; i < n_q; ++i) {
      for (Index c = 0; c < 24; ++c) {
        // Both are roundings of values within the float tolerance (≪ u_S) of each other: at most
        // one unit in the last place of S apart, i.e. 2·u_S relative (|out| <= 1 here).
        EXPECT_LE(std::abs(float(ref16(i, c)) - float(big(1 + i, 3 + c))),
                  2 * format_u<S>() * std::max(1.0, std::abs(double(ref16(i, c)))));
      }
    }
  }
}

// NaN and ±inf in a 16-bit cache follow the README's rules exactly as in float (bitwise the float
// call on the widened cache): a hidden key's non-finite value never reaches the rows that do not
// see it; a visible one reaches its columns. Checked on prefill and decode, with a causal mask.
TYPED_TEST(Attention16BitTest, NonFiniteValuesInTheCache) {
  using S = TypeParam;
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(1604);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (const Index n_q : {Index{1}, Index{3}, Index{40}}) {
    SCOPED_TRACE("n_q=" + std::to_string(n_q));
    const Index n_k = 40;
    Problem<S> p({1, n_q, n_k, 2, 1, 16, 16, true}, rng);
    const Index special = n_k - 4;  // seen by the last 4 queries of a causal n_k = n_q call
    p.v(special, 2) = static_cast<S>(nan);
    p.v(special, 3) = static_cast<S>(inf);
    p.v(special + 1, 5) = static_cast<S>(-inf);
    p.k(special + 2, 0) = static_cast<S>(nan);  // a NaN score
    p.widen();
    AttentionOptions options;
    options.causal = true;
    Matrix<S> out16;
    std::vector<float> lse16;
    check_bitwise(p, options, &out16, &lse16);
    // Rows that cannot see the special keys: finite, and within tolerance of the reference.
    const Index first_seeing = special - (n_k - n_q);  // query index that first sees `special`
    for (Index h = 0; h < 2; ++h) {
      const auto o = blockattn::detail::head_slice(p.outv(out16), 0, h);
      for (Index i = 0; i < n_q; ++i) {
        const bool sees = i >= first_seeing;
        const bool finite = o.row(i).template cast<float>().allFinite();
        EXPECT_EQ(finite, !sees) << "h=" << h << " i=" << i;
        if (sees) {
          EXPECT_TRUE(std::isnan(float(o(i, 2)))) << "h=" << h << " i=" << i;
        }
      }
    }
  }
}

// Validation applies to every form before anything is written: a shape error in a mixed call
// names the argument and both sizes.
TYPED_TEST(Attention16BitTest, ValidationNamesTheArgument) {
  using S = TypeParam;
  const Matrix<float> q = Matrix<float>::Zero(4, 8);
  const Matrix<S> k = Matrix<S>::Zero(6, 7);
  const Matrix<S> v = Matrix<S>::Zero(6, 8);
  Matrix<float> out = Matrix<float>::Constant(4, 8, 3.0f);
  EXPECT_THAT([&] { blockattn::attention(q, k, v, out); },
              ::testing::ThrowsMessage<std::invalid_argument>(
                  ::testing::HasSubstr("k.cols() is 7 but q.cols() is 8")));
  EXPECT_TRUE((out.array() == 3.0f).all());
  const Matrix<S> q16 = Matrix<S>::Zero(4, 8);
  Matrix<S> out16(4, 8);
  std::vector<float> lse(3);
  EXPECT_THAT([&] { blockattn::attention(q16, v, v, out16, {}, lse); },
              ::testing::ThrowsMessage<std::invalid_argument>(
                  ::testing::HasSubstr("lse.size() is 3 but q.rows() is 4")));
}

}  // namespace

}  // namespace attention_16bit_test
