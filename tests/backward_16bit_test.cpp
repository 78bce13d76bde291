// attention_backward() and transformer_block() on Eigen::bfloat16 and Eigen::half storage (issue
// 17, item 4): inputs, gradients, weights and activations 16-bit, everything computed in float,
// each result rounded once. Three oracles:
//   1. bitwise: the 16-bit backward widens its tiles exactly and runs the float kernel, with float
//      dQ, dK, dV accumulators for the whole pass, so its gradients must be exactly
//      round_S(float backward on the widened inputs, out and lse): any rounding inside the
//      accumulation (a 16-bit dQ between key chunks, a 16-bit dK between query heads) breaks it.
//      The float call runs on 1 thread and the 16-bit one on 2, so this is also the thread check.
//      Shapes keep every row 64-byte aligned (d, d_v multiples of 16), as the widened tiles are,
//      so that Eigen's alignment-dependent reductions take the same path in both calls.
//   2. blockattn::reference in long double on the stored (rounded) inputs, on awkward shapes, with
//      a derived tolerance (gradient_tolerance_16 below): the float path's bound
//      (support/gradient_tolerance.hpp, u = 2^-24), plus the stored out's rounding in
//      D = rowsum(dO ∘ O), plus one rounding of each gradient to the format (u_S = 2^-8 bfloat16,
//      2^-11 half).
//   3. float accumulation matters: against the long double reference, the normwise relative error
//      of every gradient stays below u_S, i.e. about one rounding to the format, at n = 32 (2 key
//      chunks) and at n = 512 (32 key chunks); a 16-bit accumulator would add one rounding per
//      chunk and grow with n. Tried: rounding dQ to the format after every key chunk fails
//      oracles 1 (every dq) and 3 (dq at n = 512: 1.71·u_S, against 0.42·u_S without it).
// Float gradients over 16-bit inputs (TensorGradients<float>, AttentionGradients<float>): oracle 1
// without its last rounding (rounded to S: the 16-bit gradients bit for bit; aligned shapes: the
// float backward's bits), oracle 2 without its u_S term, and the argument checks on float buffers.
// transformer_block: reference::transformer_block in long double on the stored weights and x,
// within the float layer's bound (support/layer_error_bound.hpp) plus one rounding of y; bitwise
// the same for 1 and 2 threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <blockattn/attention.hpp>
#include <blockattn/attention_backward.hpp>
#include <blockattn/reference.hpp>
#include <blockattn/transformer_block.hpp>

#include "support/format16.hpp"
#include "support/gradient_tolerance.hpp"
#include "support/layer_error_bound.hpp"
#include "support/random.hpp"
#include "support/shapes.hpp"
#include "support/tolerance.hpp"

namespace backward_16bit_test {
namespace {

using blockattn::AttentionOptions;
using blockattn::Index;
using blockattn::Matrix;
using blockattn::Span;
using blockattn::TensorView;
using blockattn::test::format_u;
using blockattn::test::GradientTolerance;
using blockattn::test::make_rng;
using blockattn::test::max_abs;
using blockattn::test::random16;
using blockattn::test::seed_trace;

using Real = long double;

template <class S>
class Backward16BitTest : public ::testing::Test {};
using Formats = ::testing::Types<Eigen::bfloat16, Eigen::half>;
TYPED_TEST_SUITE(Backward16BitTest, Formats, );

/// Every element of a 16-bit or float matrix as To (exact: each value is a float).
template <class To, class From>
Matrix<To> widen_to(const Matrix<From>& m) {
  return m.template cast<float>().template cast<To>();
}

/// One multi-head problem: tensors [batch, n, heads, dim] contiguous (BSHD), stored as matrices of
/// batch·n·heads rows.
struct Problem {
  std::string name;
  Index batch, n_q, n_k, heads, kv_heads, d, d_v;
  AttentionOptions options;
};

std::string describe(const Problem& p) {
  return p.name + " batch=" + std::to_string(p.batch) + " n_q=" + std::to_string(p.n_q) +
         " n_k=" + std::to_string(p.n_k) + " heads=" + std::to_string(p.heads) + "/" +
         std::to_string(p.kv_heads) + " d=" + std::to_string(p.d) +
         " d_v=" + std::to_string(p.d_v) + " " + seed_trace();
}

/// A problem's tensors in storage T: inputs, the forward's out and lse, the gradients.
template <class T>
struct Tensors {
  Matrix<T> q, k, v, dout, out, dq, dk, dv;
  std::vector<blockattn::accumulator_t<T>> lse;
};

template <class T>
TensorView<const T> view(const Matrix<T>& m, Index batch, Index seq, Index heads) {
  return blockattn::make_tensor_view(m.data(), batch, seq, heads, m.cols());
}
template <class T>
TensorView<T> view(Matrix<T>& m, Index batch, Index seq, Index heads) {
  return blockattn::make_tensor_view(m.data(), batch, seq, heads, m.cols());
}

/// attention_backward() on x's inputs, out and lse, into x's gradients (sized here);
/// reference::attention_backward() for T = long double.
template <class T>
void backward(const Problem& p, Tensors<T>& x, const AttentionOptions& options) {
  x.dq.resize(x.q.rows(), x.q.cols());
  x.dk.resize(x.k.rows(), x.k.cols());
  x.dv.resize(x.v.rows(), x.v.cols());
  blockattn::TensorBackwardInputs<T> in;
  in.q = view(x.q, p.batch, p.n_q, p.heads);
  in.k = view(x.k, p.batch, p.n_k, p.kv_heads);
  in.v = view(x.v, p.batch, p.n_k, p.kv_heads);
  in.out = view(x.out, p.batch, p.n_q, p.heads);
  in.dout = view(x.dout, p.batch, p.n_q, p.heads);
  in.lse = Span<const blockattn::accumulator_t<T>>(x.lse);
  blockattn::TensorGradients<T> grads;
  grads.dq = view(x.dq, p.batch, p.n_q, p.heads);
  grads.dk = view(x.dk, p.batch, p.n_k, p.kv_heads);
  grads.dv = view(x.dv, p.batch, p.n_k, p.kv_heads);
  if constexpr (std::is_same_v<T, Real>) {
    blockattn::reference::attention_backward(in, grads, options);
  } else {
    blockattn::attention_backward(in, grads, options);
  }
}

/// Random 16-bit inputs, the 16-bit forward (out rounded once, lse float), then the backward.
template <class S>
Tensors<S> run16(const Problem& p, std::uint64_t salt) {
  auto rng = make_rng(salt);
  Tensors<S> x;
  x.q = random16<S>(rng, p.batch * p.n_q * p.heads, p.d);
  x.k = random16<S>(rng, p.batch * p.n_k * p.kv_heads, p.d);
  x.v = random16<S>(rng, p.batch * p.n_k * p.kv_heads, p.d_v);
  x.dout = random16<S>(rng, p.batch * p.n_q * p.heads, p.d_v);
  x.out.resize(x.dout.rows(), p.d_v);
  x.lse.assign(static_cast<std::size_t>(p.batch * p.heads * p.n_q), 0.0F);
  blockattn::attention(view(x.q, p.batch, p.n_q, p.heads), view(x.k, p.batch, p.n_k, p.kv_heads),
                       view(x.v, p.batch, p.n_k, p.kv_heads), view(x.out, p.batch, p.n_q, p.heads),
                       p.options, Span<float>(x.lse));
  backward(p, x, p.options);
  return x;
}

/// Rows of (batch b, head h) of a [batch·n·heads, dim] matrix, in long double.
template <class T>
Matrix<Real> head_rows(const Matrix<T>& m, Index b, Index n, Index heads, Index h) {
  Matrix<Real> s(n, m.cols());
  for (Index i = 0; i < n; ++i) {
    for (Index c = 0; c < m.cols(); ++c) {
      const T value = m((b * n + i) * heads + h, c);
      if constexpr (std::is_same_v<T, Real>) {
        s(i, c) = value;
      } else {
        s(i, c) = static_cast<Real>(static_cast<float>(value));  // exact
      }
    }
  }
  return s;
}

/// Bound on |gradient_S − exact| per row, for one (batch, head) added into `tol` (dK, dV summed
/// over the query heads of a kv head, as the gradients are). With G = 2·d_v·M_dO·M_v (as in
/// backward_tolerance) and u_S the format's unit roundoff:
///  * the float computation on the stored inputs: backward_tolerance<float>;
///  * the stored out O enters D_i = dO_i·O_i (and the dominant key's dO_i·(v_r − O_i)): rounding O
///    to the format moves each entry by <= u_S·|O_ic| <= u_S·M_v, and the bf16 dot path's P in
///    bf16 moves it by <= u_S·Σ_j p_j·|v_jc| <= u_S·M_v more (bf16_dot.hpp), so D errs by
///    <= d_v·M_dO·2·u_S·M_v = u_S·G more, which dS_ij = P_ij·(dP_ij − D_i) carries as P_ij·u_S·G:
///    dQ_i gains 2·|scale|·M_k·Σ_j P_ij·u_S·G, dK_j gains 2·|scale|·M_q·Σ_i P_ij·u_S·G (doubled as
///    backward_tolerance doubles its terms); dV = Pᵀ·dO does not read O.
/// The final rounding, u_S·(|exact| + tol) per element, is added by expect_rows_within. A row
/// with no visible key has P = 0: tolerance 0, its gradients must be exactly 0.
void add_gradient_tolerance(const Matrix<Real>& q, const Matrix<Real>& k, const Matrix<Real>& v,
                            const Matrix<Real>& dout, const AttentionOptions& options, Index group,
                            double u_s, GradientTolerance& tol) {
  const Matrix<Real> identity = Matrix<Real>::Identity(k.rows(), k.rows());
  Matrix<Real> p(q.rows(), k.rows());
  blockattn::reference::attention(q, k, identity, p, options);  // P, every mask and modifier
  const Matrix<double> p_d = p.cast<double>();
  const double scale = blockattn::test::effective_scale(options, q.cols());
  const GradientTolerance f = blockattn::test::backward_tolerance<float>(
      q.cast<double>(), k.cast<double>(), v.cast<double>(), dout.cast<double>(), p_d, scale,
      blockattn::test::modifier_magnitude(options, q.rows(), k.rows()), group);
  const double g = 2 * static_cast<double>(v.cols()) * max_abs(dout) * max_abs(v);
  for (Index i = 0; i < q.rows(); ++i) {
    const auto si = static_cast<std::size_t>(i);
    tol.dq[si] += f.dq[si] + 2 * std::abs(scale) * max_abs(k) * p_d.row(i).sum() * u_s * g;
  }
  for (Index j = 0; j < k.rows(); ++j) {
    const auto sj = static_cast<std::size_t>(j);
    tol.dk[sj] += f.dk[sj] + 2 * std::abs(scale) * max_abs(q) * p_d.col(j).sum() * u_s * g;
    tol.dv[sj] += f.dv[sj];
  }
}

/// |got − want| <= tol_r + u_out·(|want| + tol_r) for every element of row r: the float bound, then
/// one rounding of a value within tol_r of want (u_out = u_S for 16-bit gradients, 0 for float
/// gradients, which are the accumulators unrounded).
void expect_rows_within(const Matrix<Real>& got, const Matrix<Real>& want,
                        const std::vector<double>& tol, const char* name, double u_out) {
  const double u_s = u_out;
  for (Index r = 0; r < got.rows(); ++r) {
    for (Index c = 0; c < got.cols(); ++c) {
      const auto g = static_cast<double>(got(r, c));
      const auto w = static_cast<double>(want(r, c));
      const double t = tol[static_cast<std::size_t>(r)];
      ASSERT_TRUE(std::isfinite(g)) << name << "(" << r << ", " << c << ") = " << g;
      ASSERT_LE(std::abs(g - w), t + u_s * (std::abs(w) + t))
          << name << "(" << r << ", " << c << "): got " << g << ", want " << w << ", float tol "
          << t;
    }
  }
}

/// Gradients of one type G.
template <class G>
struct Gradients {
  Matrix<G> dq, dk, dv;
};

/// attention_backward() of x's 16-bit inputs, out and lse into float gradients
/// (TensorGradients<float>: fp32 master gradients).
template <class S>
Gradients<float> float_gradients(const Problem& p, const Tensors<S>& x,
                                 const AttentionOptions& options) {
  Gradients<float> g{Matrix<float>(x.q.rows(), x.q.cols()), Matrix<float>(x.k.rows(), x.k.cols()),
                     Matrix<float>(x.v.rows(), x.v.cols())};
  blockattn::TensorBackwardInputs<S> in;
  in.q = view(x.q, p.batch, p.n_q, p.heads);
  in.k = view(x.k, p.batch, p.n_k, p.kv_heads);
  in.v = view(x.v, p.batch, p.n_k, p.kv_heads);
  in.out = view(x.out, p.batch, p.n_q, p.heads);
  in.dout = view(x.dout, p.batch, p.n_q, p.heads);
  in.lse = Span<const float>(x.lse);
  blockattn::TensorGradients<float> grads;
  grads.dq = view(g.dq, p.batch, p.n_q, p.heads);
  grads.dk = view(g.dk, p.batch, p.n_k, p.kv_heads);
  grads.dv = view(g.dv, p.batch, p.n_k, p.kv_heads);
  blockattn::attention_backward(in, grads, options);
  return g;
}

/// The 16-bit backward against reference::attention_backward in long double on the widened
/// inputs, per (batch, head), within add_gradient_tolerance + one rounding; with float_grads, the
/// float-gradient form on the same inputs within add_gradient_tolerance alone (no rounding).
template <class S>
void expect_matches_reference(const Problem& p, std::uint64_t salt, bool float_grads = false) {
  SCOPED_TRACE(describe(p) + (float_grads ? " float gradients" : " 16-bit gradients"));
  const Tensors<S> x = run16<S>(p, salt);
  Gradients<Real> got{widen_to<Real>(x.dq), widen_to<Real>(x.dk), widen_to<Real>(x.dv)};
  double u_out = format_u<S>();
  if (float_grads) {
    const Gradients<float> g = float_gradients(p, x, p.options);
    got = {widen_to<Real>(g.dq), widen_to<Real>(g.dk), widen_to<Real>(g.dv)};
    u_out = 0;
  }
  Tensors<Real> r;
  r.q = widen_to<Real>(x.q);
  r.k = widen_to<Real>(x.k);
  r.v = widen_to<Real>(x.v);
  r.dout = widen_to<Real>(x.dout);
  r.out = widen_to<Real>(x.out);  // validated, not read by the reference
  r.lse.assign(x.lse.begin(), x.lse.end());
  backward(p, r, p.options);
  const Index group = p.heads / p.kv_heads;
  for (Index b = 0; b < p.batch; ++b) {
    for (Index kvh = 0; kvh < p.kv_heads; ++kvh) {
      GradientTolerance tol{{},
                            std::vector<double>(static_cast<std::size_t>(p.n_k), 0.0),
                            std::vector<double>(static_cast<std::size_t>(p.n_k), 0.0)};
      const Matrix<Real> k = head_rows(r.k, b, p.n_k, p.kv_heads, kvh);
      const Matrix<Real> v = head_rows(r.v, b, p.n_k, p.kv_heads, kvh);
      for (Index h = kvh * group; h < (kvh + 1) * group; ++h) {
        tol.dq.assign(static_cast<std::size_t>(p.n_q), 0.0);
        const Matrix<Real> q = head_rows(r.q, b, p.n_q, p.heads, h);
        add_gradient_tolerance(q, k, v, head_rows(r.dout, b, p.n_q, p.heads, h), p.options, group,
                               format_u<S>(), tol);
        expect_rows_within(head_rows(got.dq, b, p.n_q, p.heads, h),
                           head_rows(r.dq, b, p.n_q, p.heads, h), tol.dq, "dq", u_out);
      }
      expect_rows_within(head_rows(got.dk, b, p.n_k, p.kv_heads, kvh),
                         head_rows(r.dk, b, p.n_k, p.kv_heads, kvh), tol.dk, "dk", u_out);
      expect_rows_within(head_rows(got.dv, b, p.n_k, p.kv_heads, kvh),
                         head_rows(r.dv, b, p.n_k, p.kv_heads, kvh), tol.dv, "dv", u_out);
    }
  }
}

/// Awkward problems: one token with d = d_v = 1; n_q ≠ n_k with chunks dividing neither and
/// d, d_v odd; causal with n_q > n_k (bottom-right aligned: the first 30 query rows see no key);
/// soft-capping with ALiBi; GQA over a batch of 2 on 2 threads; d = 1 with a sliding window.
std::vector<Problem> awkward_problems() {
  std::vector<Problem> problems;
  const auto add = [&](const char* name, Index batch, Index n_q, Index n_k, Index heads,
                       Index kv_heads, Index d, Index d_v) -> AttentionOptions& {
    problems.push_back({name, batch, n_q, n_k, heads, kv_heads, d, d_v, {}});
    return problems.back().options;
  };
  add("one token", 1, 1, 1, 1, 1, 1, 1);
  AttentionOptions& chunks = add("odd chunks", 1, 37, 53, 1, 1, 5, 3);
  chunks.query_chunk = 7;
  chunks.key_chunk = 16;
  add("causal, masked rows", 1, 100, 70, 1, 1, 64, 32).causal = true;
  AttentionOptions& mods = add("softcap + alibi", 1, 45, 45, 1, 1, 16, 24);
  mods.softcap = 5;
  mods.key_chunk = 13;
  static const double kSlope[] = {0.25};
  mods.alibi_slopes = kSlope;
  AttentionOptions& gqa = add("gqa", 2, 33, 29, 4, 2, 8, 12);
  gqa.causal = true;
  gqa.query_chunk = 5;
  gqa.key_chunk = 6;
  gqa.threads = 2;
  AttentionOptions& window = add("d = 1, window", 1, 130, 130, 1, 1, 1, 2);
  window.window_left = 20;
  window.key_chunk = 17;
  return problems;
}

TYPED_TEST(Backward16BitTest, MatchesLongDoubleReferenceOnAwkwardShapes) {
  std::uint64_t salt = 1600;
  for (const Problem& p : awkward_problems()) expect_matches_reference<TypeParam>(p, ++salt);
}

// Oracle 1: exactly round_S(float backward on the widened inputs, out and lse).
TYPED_TEST(Backward16BitTest, IsTheRoundedFloatBackwardBitForBit) {
  using S = TypeParam;
  std::vector<Problem> problems = {
      {"many key chunks", 1, 150, 300, 1, 1, 64, 32, {}},
      {"gqa causal", 2, 70, 90, 4, 2, 16, 48, {}},
  };
  problems[0].options.key_chunk = 16;
  problems[0].options.query_chunk = 48;
  problems[1].options.causal = true;
  problems[1].options.key_chunk = 32;
  std::uint64_t salt = 1700;
  for (Problem& p : problems) {
    SCOPED_TRACE(describe(p));
    p.options.threads = 2;
    const Tensors<S> x = run16<S>(p, ++salt);
    Tensors<float> f;
    f.q = widen_to<float>(x.q);
    f.k = widen_to<float>(x.k);
    f.v = widen_to<float>(x.v);
    f.dout = widen_to<float>(x.dout);
    f.out = widen_to<float>(x.out);
    f.lse = x.lse;
    AttentionOptions one_thread = p.options;
    one_thread.threads = 1;
    backward(p, f, one_thread);
    EXPECT_TRUE(widen_to<float>(x.dq) == widen_to<float>(Matrix<S>(f.dq.template cast<S>())));
    EXPECT_TRUE(widen_to<float>(x.dk) == widen_to<float>(Matrix<S>(f.dk.template cast<S>())));
    EXPECT_TRUE(widen_to<float>(x.dv) == widen_to<float>(Matrix<S>(f.dv.template cast<S>())));
  }
}

// Oracle 3: about one rounding to the format, at 2 and at 32 key chunks alike.
TYPED_TEST(Backward16BitTest, ErrorIsOneRoundingNotGrowingWithKeyChunks) {
  using S = TypeParam;
  const double u_s = format_u<S>();
  // Chunks of 8 rows and keys: n = 256 has 32 key chunks at a quarter of n = 512's long double
  // reference cost (qemu-aarch64 runs long double in software).
  for (const Index n : {Index{16}, Index{256}}) {
    Problem p{"accumulation", 1, n, n, 1, 1, 64, 64, {}};
    p.options.query_chunk = 8;
    p.options.key_chunk = 8;
    SCOPED_TRACE(describe(p));
    const Tensors<S> x = run16<S>(p, 1800 + static_cast<std::uint64_t>(n));
    Tensors<Real> r;
    r.q = widen_to<Real>(x.q);
    r.k = widen_to<Real>(x.k);
    r.v = widen_to<Real>(x.v);
    r.dout = widen_to<Real>(x.dout);
    r.out = widen_to<Real>(x.out);
    r.lse.assign(x.lse.begin(), x.lse.end());
    backward(p, r, p.options);
    const auto relative = [](const Matrix<S>& got, const Matrix<Real>& want) {
      return static_cast<double>((widen_to<Real>(got) - want).norm() / want.norm());
    };
    const double e_dq = relative(x.dq, r.dq);
    const double e_dk = relative(x.dk, r.dk);
    const double e_dv = relative(x.dv, r.dv);
    ::testing::Test::RecordProperty("relative_error_n" + std::to_string(n),
                                    std::to_string(e_dq / u_s) + " " + std::to_string(e_dk / u_s) +
                                        " " + std::to_string(e_dv / u_s));
    EXPECT_LE(e_dq, u_s) << "dq, in units of u_S: " << e_dq / u_s;
    EXPECT_LE(e_dk, u_s) << "dk, in units of u_S: " << e_dk / u_s;
    EXPECT_LE(e_dv, u_s) << "dv, in units of u_S: " << e_dv / u_s;
  }
}

// The single-head form takes the same storage types (AttentionBackwardInputs<S>).
TYPED_TEST(Backward16BitTest, SingleHeadFormAgreesWithTensorForm) {
  using S = TypeParam;
  const Problem p{"single head", 1, 40, 23, 1, 1, 16, 16, {}};
  const Tensors<S> x = run16<S>(p, 1900);
  blockattn::AttentionBackwardInputs<S> in;
  in.q = x.q;
  in.k = x.k;
  in.v = x.v;
  in.out = x.out;
  in.lse = Span<const float>(x.lse);
  in.dout = x.dout;
  Matrix<S> dq(x.q.rows(), x.q.cols()), dk(x.k.rows(), x.k.cols()), dv(x.v.rows(), x.v.cols());
  blockattn::AttentionGradients<S> grads;
  grads.dq = dq;
  grads.dk = dk;
  grads.dv = dv;
  blockattn::attention_backward(in, grads);
  EXPECT_TRUE(widen_to<float>(dq) == widen_to<float>(x.dq));
  EXPECT_TRUE(widen_to<float>(dk) == widen_to<float>(x.dk));
  EXPECT_TRUE(widen_to<float>(dv) == widen_to<float>(x.dv));
}

// --- float gradients over 16-bit inputs (fp32 master gradients) ---------------------------------

/// Every element of m rounded to S and widened back.
template <class S>
Matrix<float> rounded_to(const Matrix<float>& m) {
  return widen_to<float>(Matrix<S>(m.template cast<S>()));
}

// TensorGradients<float> over 16-bit inputs: the float accumulators of the 16-bit form, unrounded.
// Three checks, each able to fail: (a) rounded to S they are the 16-bit gradients bit for bit
// (anything but the final step differing breaks it); (b) they are not already S values (the final
// rounding really is skipped); (c) on shapes with 64-byte aligned rows they are the float
// backward's on the widened inputs bit for bit (oracle 1's float call), so no rounding to S
// happens inside the sum either — (a) alone would miss one shared by both forms. The awkward
// shape (odd d, d_v; chunks dividing nothing) checks (a) and (b) on unaligned rows. The float call
// runs on 1 thread and the 16-bit ones on 2.
TYPED_TEST(Backward16BitTest, FloatGradientsAreTheUnroundedAccumulators) {
  using S = TypeParam;
  std::vector<Problem> problems = {
      {"many key chunks", 1, 150, 300, 1, 1, 64, 32, {}},
      {"gqa causal", 2, 70, 90, 4, 2, 16, 48, {}},
      {"odd shape", 1, 37, 53, 1, 1, 5, 3, {}},
  };
  problems[0].options.key_chunk = 16;
  problems[0].options.query_chunk = 48;
  problems[1].options.causal = true;
  problems[1].options.key_chunk = 32;
  problems[2].options.query_chunk = 7;
  problems[2].options.key_chunk = 16;
  std::uint64_t salt = 2000;
  for (Problem& p : problems) {
    SCOPED_TRACE(describe(p));
    p.options.threads = 2;
    const Tensors<S> x = run16<S>(p, ++salt);
    const Gradients<float> g = float_gradients(p, x, p.options);
    EXPECT_TRUE(rounded_to<S>(g.dq) == widen_to<float>(x.dq));
    EXPECT_TRUE(rounded_to<S>(g.dk) == widen_to<float>(x.dk));
    EXPECT_TRUE(rounded_to<S>(g.dv) == widen_to<float>(x.dv));
    EXPECT_FALSE(rounded_to<S>(g.dq) == g.dq);
    EXPECT_FALSE(rounded_to<S>(g.dk) == g.dk);
    EXPECT_FALSE(rounded_to<S>(g.dv) == g.dv);
    if (p.d % 16 != 0 || p.d_v % 16 != 0) continue;
    Tensors<float> f;
    f.q = widen_to<float>(x.q);
    f.k = widen_to<float>(x.k);
    f.v = widen_to<float>(x.v);
    f.dout = widen_to<float>(x.dout);
    f.out = widen_to<float>(x.out);
    f.lse = x.lse;
    AttentionOptions one_thread = p.options;
    one_thread.threads = 1;
    backward(p, f, one_thread);
    EXPECT_TRUE(g.dq == f.dq);
    EXPECT_TRUE(g.dk == f.dk);
    EXPECT_TRUE(g.dv == f.dv);
  }
}

// Against the long double reference, float gradients are within add_gradient_tolerance alone: the
// float computation's bound (u = 2^-24) plus the stored out's rounding to S in D (an input, as in
// the 16-bit form), without the u_S·(|exact| + tol) of a final rounding to the format, which they
// skip. That term is the larger one wherever the gradient is not tiny, so a rounded float gradient
// fails this (tried: rounding the float gradients to half in store_rows fails this test and
// FloatGradientsAreTheUnroundedAccumulators, for both formats).
TYPED_TEST(Backward16BitTest, FloatGradientsMatchLongDoubleReferenceWithoutRounding) {
  std::uint64_t salt = 1600;
  for (const Problem& p : awkward_problems()) {
    expect_matches_reference<TypeParam>(p, ++salt, /*float_grads=*/true);
  }
}

// The single-head form takes AttentionGradients<float> too, with the tensor form's bits; bad
// float gradient shapes and aliases throw std::invalid_argument naming the argument and sizes,
// before anything is written. Aliasing compares bytes, across the element types.
TYPED_TEST(Backward16BitTest, FloatGradientsSingleHeadFormAndBadArguments) {
  using S = TypeParam;
  const Problem p{"single head", 1, 40, 23, 1, 1, 16, 16, {}};
  const Tensors<S> x = run16<S>(p, 1900);
  const Gradients<float> want = float_gradients(p, x, p.options);
  blockattn::AttentionBackwardInputs<S> in;
  in.q = x.q;
  in.k = x.k;
  in.v = x.v;
  in.out = x.out;
  in.lse = Span<const float>(x.lse);
  in.dout = x.dout;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Matrix<float> dq = Matrix<float>::Constant(x.q.rows(), x.q.cols(), nan);
  Matrix<float> dk = Matrix<float>::Constant(x.k.rows(), x.k.cols(), nan);
  Matrix<float> dv = Matrix<float>::Constant(x.v.rows(), x.v.cols(), nan);
  using Ref = blockattn::MatrixRef<float>;
  const auto call = [&](const Ref& dq_arg, const Ref& dk_arg, const Ref& dv_arg) {
    blockattn::AttentionGradients<float> grads;
    grads.dq = dq_arg;
    grads.dk = dk_arg;
    grads.dv = dv_arg;
    blockattn::attention_backward(in, grads);
  };
  const auto untouched = [&] {
    return dq.array().isNaN().all() && dk.array().isNaN().all() && dv.array().isNaN().all();
  };
  const auto throws = [&](auto&& bad_call, std::vector<std::string> parts) {
    std::string message;
    try {
      bad_call();
    } catch (const std::invalid_argument& e) {
      message = e.what();
    }
    EXPECT_NE(message.find("attention_backward"), std::string::npos) << message;
    for (const auto& part : parts) EXPECT_NE(message.find(part), std::string::npos) << message;
    EXPECT_TRUE(untouched());
  };
  Matrix<float> dq_bad = Matrix<float>::Constant(40, 17, nan);
  throws([&] { call(dq_bad, dk, dv); }, {"dq.cols()", "17", "16"});
  Matrix<float> dk_bad = Matrix<float>::Constant(22, 16, nan);
  throws([&] { call(dq, dk_bad, dv); }, {"dk.rows()", "22", "23"});
  Matrix<float> dv_bad = Matrix<float>::Constant(23, 15, nan);
  throws([&] { call(dq, dk, dv_bad); }, {"dv.cols()", "15", "16"});
  Matrix<float> shared = Matrix<float>::Constant(23, 16, nan);
  throws([&] { call(dq, shared, shared); }, {"dk overlaps the memory of dv"});
  // The 16-bit q stored in the bytes of a float dq.
  in.q = blockattn::MatrixRef<const S>(
      Eigen::Map<const Matrix<S>>(reinterpret_cast<const S*>(dq_bad.data()), 40, 16));
  throws([&] { call(dq_bad.leftCols(16), dk, dv); }, {"dq overlaps the memory of q"});
  in.q = x.q;
  // TensorView form: a float dk with the wrong head count.
  {
    blockattn::TensorBackwardInputs<S> tin;
    tin.q = view(x.q, 1, 40, 1);
    tin.k = view(x.k, 1, 23, 1);
    tin.v = view(x.v, 1, 23, 1);
    tin.out = view(x.out, 1, 40, 1);
    tin.dout = view(x.dout, 1, 40, 1);
    tin.lse = Span<const float>(x.lse);
    blockattn::TensorGradients<float> grads;
    grads.dq = view(dq, 1, 40, 1);
    grads.dk = blockattn::make_tensor_view(dk.data(), 1, 1, 23, 16);
    grads.dv = view(dv, 1, 23, 1);
    throws([&] { blockattn::attention_backward(tin, grads); }, {"dk.seq", "1", "23"});
  }
  call(dq, dk, dv);
  EXPECT_TRUE(dq == want.dq);
  EXPECT_TRUE(dk == want.dk);
  EXPECT_TRUE(dv == want.dv);
}

// --- transformer_block ---------------------------------------------------------------------------

/// Random weights rounded to S, scaled about 1/sqrt(fan-in) (activations stay O(1)); LayerNorm
/// gammas in [0.5, 1.5], betas in [-0.5, 0.5].
template <class S>
blockattn::TransformerBlockWeights<S> random_weights16(std::mt19937_64& rng, Index model,
                                                       Index heads, Index kv_heads, Index ffn,
                                                       blockattn::Activation activation) {
  auto w = blockattn::make_transformer_block_weights<S>(model, heads, ffn, kv_heads);
  const double a = 1.5 / std::sqrt(static_cast<double>(model));
  const double a_ffn = 1.5 / std::sqrt(static_cast<double>(ffn));
  for (Matrix<S>* m : {&w.wq, &w.wk, &w.wv, &w.wo, &w.w1}) {
    *m = random16<S>(rng, m->rows(), m->cols(), -a, a);
  }
  w.w2 = random16<S>(rng, ffn, model, -a_ffn, a_ffn);
  for (blockattn::RowVector<S>* b : {&w.bq, &w.bk, &w.bv, &w.bo, &w.b1, &w.b2}) {
    *b = random16<S>(rng, 1, b->size(), -0.25, 0.25);
  }
  w.ln1_gamma = random16<S>(rng, 1, model, 0.5, 1.5);
  w.ln2_gamma = random16<S>(rng, 1, model, 0.5, 1.5);
  w.ln1_beta = random16<S>(rng, 1, model, -0.5, 0.5);
  w.ln2_beta = random16<S>(rng, 1, model, -0.5, 0.5);
  w.activation = activation;
  return w;
}

// Against reference::transformer_block in long double on the stored weights and x: the float
// layer's bound (layer_error_bound<float>: the layer computed in float on those values, which is
// what the 16-bit layer does after widening them exactly) plus one rounding of y,
// u_S·(|exact| + bound). Shapes: one token; n not a multiple of the query block, with block sizes
// dividing nothing and an FFN chunk not dividing ffn; GQA with query block 1 and FFN chunk 1.
// Bitwise the same on 1 and 2 threads.
TYPED_TEST(Backward16BitTest, TransformerBlockMatchesLongDoubleReference) {
  using S = TypeParam;
  struct BlockCase {
    Index n, model, heads, kv_heads, ffn, query_block, key_block, ffn_chunk;
    bool causal;
    blockattn::Activation activation;
  };
  const BlockCase cases[] = {
      {1, 6, 2, 0, 10, 0, 0, 0, false, blockattn::Activation::GeluErf},
      {37, 30, 3, 0, 50, 8, 5, 7, true, blockattn::Activation::GeluTanh},
      {37, 30, 3, 0, 50, 8, 5, 7, false, blockattn::Activation::Relu},
      {13, 12, 4, 2, 24, 1, 3, 1, true, blockattn::Activation::GeluErf},
  };
  const double u_s = format_u<S>();
  std::uint64_t salt = 2000;
  for (const BlockCase& c : cases) {
    SCOPED_TRACE("n=" + std::to_string(c.n) + " model=" + std::to_string(c.model) +
                 " heads=" + std::to_string(c.heads) + "/" + std::to_string(c.kv_heads) +
                 " causal=" + std::to_string(c.causal) + " " + seed_trace());
    auto rng = make_rng(++salt);
    const auto w = random_weights16<S>(rng, c.model, c.heads, c.kv_heads, c.ffn, c.activation);
    const Matrix<S> x = random16<S>(rng, c.n, c.model);
    blockattn::BlockOptions options;
    options.causal = c.causal;
    options.query_block = c.query_block;
    options.key_block = c.key_block;
    options.ffn_chunk = c.ffn_chunk;
    options.threads = 2;
    Matrix<S> y(c.n, c.model);
    blockattn::transformer_block(w, x, y, options);
    options.threads = 1;
    Matrix<S> y1(c.n, c.model);
    blockattn::transformer_block(w, x, y1, options);
    EXPECT_TRUE(widen_to<float>(y) == widen_to<float>(y1)) << "1 and 2 threads differ";

    const auto w_long = blockattn::test::cast_weights<Real>(
        blockattn::test::cast_weights<float>(w));  // exact: every S value is a float
    const Matrix<Real> x_long = widen_to<Real>(x);
    Matrix<Real> exact(c.n, c.model);
    blockattn::reference::transformer_block(w_long, x_long, exact, options);
    const Matrix<Real> bound = blockattn::test::layer_error_bound<float>(w_long, x_long, c.causal);
    const Matrix<Real> got = widen_to<Real>(y);
    for (Index r = 0; r < c.n; ++r) {
      for (Index col = 0; col < c.model; ++col) {
        const auto diff = static_cast<double>(std::abs(got(r, col) - exact(r, col)));
        const auto t = static_cast<double>(bound(r, col));
        ASSERT_LE(diff, t + u_s * (std::abs(static_cast<double>(exact(r, col))) + t))
            << "y(" << r << ", " << col << ")";
      }
    }
  }
}

}  // namespace

}  // namespace backward_16bit_test
