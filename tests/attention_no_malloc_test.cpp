// The memory contract of attention() (STYLE §2.10 a): with Eigen's runtime allocation check on,
// the tile loop — every score product, modifier, mask, online update and the final
// normalisation — runs without one heap allocation for the default chunk sizes. No hidden
// temporaries, no Ref copies of the K/V blocks. A death test shows the check does fire.

#include <vector>

#include <gtest/gtest.h>

#include <blockattn/attention.hpp>
#include <blockattn/attention_backward.hpp>
#include <blockattn/transformer_block.hpp>

#include "support/random.hpp"
#include "support/requires_assertions.hpp"
#include "support/requires_malloc_guard.hpp"
#include "support/scalar_types.hpp"

namespace attention_no_malloc_test {
namespace {

using blockattn::AttentionOptions;
using blockattn::Index;
using blockattn::Matrix;
using blockattn::test::make_rng;
using blockattn::test::random_matrix;

template <class T>
class AttentionNoMallocTest : public ::testing::Test {};
TYPED_TEST_SUITE(AttentionNoMallocTest, blockattn::test::Scalars, );

TYPED_TEST(AttentionNoMallocTest, TileLoopNeverAllocates) {
  using T = TypeParam;
  auto rng = make_rng(31);
  for (const Index d : {Index{1}, Index{64}, Index{128}, Index{256}}) {
    for (const bool causal : {false, true}) {
      SCOPED_TRACE("d=" + std::to_string(d) + (causal ? " causal" : " full"));
      const Matrix<T> q = random_matrix<T>(rng, 300, d);
      const Matrix<T> k = random_matrix<T>(rng, 333, d);
      const Matrix<T> v = random_matrix<T>(rng, 333, d);
      Matrix<T> out(300, d);
      std::vector<T> lse(300);
      AttentionOptions options;
      options.causal = causal;
      options.window_left = causal ? 100 : -1;
      options.softcap = 30;
      blockattn::attention(q, k, v, out, options, lse);  // aborts on an allocation
      EXPECT_TRUE(out.allFinite());
      const auto user_mask = [](Index, Index, Index i, Index j) { return (i ^ j) % 7 != 0; };
      blockattn::attention(q, k, v, out, options, lse, user_mask);
      EXPECT_TRUE(out.allFinite());
    }
  }
  // Multi-head GQA on strided views.
  const Matrix<T> q = random_matrix<T>(rng, 2 * 100 * 4, 32);
  const Matrix<T> kv = random_matrix<T>(rng, 2 * 120 * 2, 64);
  Matrix<T> out(2 * 100 * 4, 32);
  blockattn::attention(
      blockattn::make_tensor_view(q.data(), 2, 100, 4, 32),
      blockattn::TensorView<const T>(kv.data(), 2, 120, 2, 32, 120 * 2 * 64, 2 * 64, 64),
      blockattn::TensorView<const T>(kv.data() + 32, 2, 120, 2, 32, 120 * 2 * 64, 2 * 64, 64),
      blockattn::make_tensor_view(out.data(), 2, 100, 4, 32));
  EXPECT_TRUE(out.allFinite());
}

// The 16-bit formats (q, k, v, out all bfloat16 or half) and the mixed KV-cache form (float q and
// out over 16-bit K/V): the tile loops never allocate (q is widened per query block into the
// workspace, K/V converted per packed tile or in registers, never copied), and with a caller's
// Workspace the second prefill and decode calls allocate nothing at all.
template <class S>
class AttentionNoMalloc16BitTest : public ::testing::Test {};
using Formats16 = ::testing::Types<Eigen::bfloat16, Eigen::half>;
TYPED_TEST_SUITE(AttentionNoMalloc16BitTest, Formats16, );

TYPED_TEST(AttentionNoMalloc16BitTest, TileLoopAndSecondCallNeverAllocate) {
  using S = TypeParam;
  auto rng = make_rng(37);
  const Index heads = 4;
  const Index d = 64;
  const Index n_k = 20000;  // > one decode segment: the key split and its merge run
  const Matrix<S> q = random_matrix<float>(rng, 300, d).template cast<S>();
  const Matrix<S> k = random_matrix<float>(rng, n_k * heads, d).template cast<S>();
  const Matrix<S> v = random_matrix<float>(rng, n_k * heads, d).template cast<S>();
  const Matrix<float> qf = q.template cast<float>();
  Matrix<S> out(300, d);
  Matrix<float> out_f(300, d);
  std::vector<float> lse(300);
  AttentionOptions options;
  options.causal = true;
  options.window_left = 100;
  blockattn::attention(q, k.topRows(333), v.topRows(333), out, options, lse);  // aborts on one
  EXPECT_TRUE(out.template cast<float>().allFinite());
  blockattn::attention(qf, k.topRows(333), v.topRows(333), out_f, options, lse);
  EXPECT_TRUE(out_f.allFinite());
  const auto view = [&](const auto& x, Index seq) {
    return blockattn::make_tensor_view(x.data(), 1, seq, heads, d);
  };
  blockattn::Workspace workspace;
  AttentionOptions reused;
  reused.threads = 1;
  reused.workspace = &workspace;
  Matrix<S> out1(heads, d);
  Matrix<float> out1_f(heads, d);
  const auto decode = [&] {
    blockattn::attention(view(q, 1), view(k, n_k), view(v, n_k),
                         blockattn::make_tensor_view(out1.data(), 1, 1, heads, d), reused, lse);
    blockattn::attention(view(qf, 1), view(k, n_k), view(v, n_k),
                         blockattn::make_tensor_view(out1_f.data(), 1, 1, heads, d), reused, lse);
  };
  decode();
  blockattn::attention(q.topRows(100), k.topRows(300), v.topRows(300), out.topRows(100), reused);
  {
    const blockattn::detail::NoMallocScope no_malloc;  // aborts on an allocation
    decode();
    blockattn::attention(q.topRows(100), k.topRows(300), v.topRows(300), out.topRows(100), reused);
    blockattn::attention(qf.topRows(100), k.topRows(300), v.topRows(300), out_f.topRows(100),
                         reused);
  }
  EXPECT_TRUE(out1.template cast<float>().allFinite());
  EXPECT_TRUE(out1_f.allFinite());
}

// The instrument works: an Eigen allocation, and a Workspace growing, inside the scope that
// attention() opens around its loops both abort.
TEST(AttentionNoMallocDeathTest, AnAllocationInsideTheScopeIsCaught) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        const blockattn::detail::NoMallocScope scope;
        Matrix<float> big(512, 512);
        big.setZero();
      },
      "");
  EXPECT_DEATH(
      {
        const blockattn::detail::NoMallocScope scope;
        blockattn::Workspace workspace;
        static_cast<void>(workspace.reserve(1024));
      },
      "");
}

// A caller-supplied Workspace makes repeated calls allocation-free: the second decode call (and
// prefill / decode calls after the workspace has grown to fit both) runs whole — validation,
// workspace sizing, the loops and the key-split merge — inside Eigen's no-malloc scope, which also
// covers Workspace's own allocator (see the death test above), and gives bitwise the output of a
// call with a fresh workspace.
TYPED_TEST(AttentionNoMallocTest, SecondCallWithAWorkspaceAllocatesNothing) {
  using T = TypeParam;
  auto rng = make_rng(33);
  const Index heads = 4;
  const Index n_k = 20000;  // > one decode segment: the key split and its merge run
  const Index d = 64;
  const Matrix<T> q = random_matrix<T>(rng, heads, d);
  const Matrix<T> k = random_matrix<T>(rng, n_k * heads, d);
  const Matrix<T> v = random_matrix<T>(rng, n_k * heads, d);
  Matrix<T> out(heads, d);
  Matrix<T> expected(heads, d);
  std::vector<T> lse(heads);
  const auto view = [&](const Matrix<T>& x, Index seq) {
    return blockattn::make_tensor_view(x.data(), 1, seq, heads, d);
  };
  AttentionOptions options;
  options.threads = 1;
  blockattn::attention(view(q, 1), view(k, n_k), view(v, n_k),
                       blockattn::make_tensor_view(expected.data(), 1, 1, heads, d), options);
  blockattn::Workspace workspace;
  AttentionOptions reused = options;  // the same options, with the caller's workspace
  reused.workspace = &workspace;
  blockattn::attention(view(q, 1), view(k, n_k), view(v, n_k),
                       blockattn::make_tensor_view(out.data(), 1, 1, heads, d), reused, lse);
  EXPECT_GT(workspace.capacity(), 0u);
  {
    const blockattn::detail::NoMallocScope no_malloc;  // aborts on an allocation
    blockattn::attention(view(q, 1), view(k, n_k), view(v, n_k),
                         blockattn::make_tensor_view(out.data(), 1, 1, heads, d), reused, lse);
  }
  EXPECT_TRUE(out == expected);
  // A prefill call grows the workspace once; afterwards prefill and decode both fit.
  Matrix<T> out_prefill(100, d);
  const Matrix<T> q_prefill = random_matrix<T>(rng, 100, d);
  blockattn::attention(q_prefill, k.topRows(300), v.topRows(300), out_prefill, reused);
  {
    const blockattn::detail::NoMallocScope no_malloc;
    blockattn::attention(q_prefill, k.topRows(300), v.topRows(300), out_prefill, reused);
    blockattn::attention(view(q, 1), view(k, n_k), view(v, n_k),
                         blockattn::make_tensor_view(out.data(), 1, 1, heads, d), reused, lse);
  }
  EXPECT_TRUE(out == expected);
  EXPECT_TRUE(out_prefill.allFinite());
}

// transformer_block() with a caller's TransformerBlockWorkspace: the first call sizes it (K, V,
// every thread's buffers and attention workspace, before the loops); a second call of the same
// shapes then runs whole inside Eigen's no-malloc scope (which also covers Workspace's
// allocator), holds exactly the same capacity and thread slots (the slot vector is the one
// allocation Eigen's check cannot see), and gives the bits of a call without a workspace.
TYPED_TEST(AttentionNoMallocTest, SecondTransformerBlockCallAllocatesNothing) {
  using T = TypeParam;
  auto rng = make_rng(35);
  const Index n = 70;
  const Index model = 32;
  const Index ffn = 48;
  for (const bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "causal" : "full");
    auto w = blockattn::make_transformer_block_weights<T>(model, 4, ffn, 2);
    const auto fill = [&](auto& m) { m = random_matrix<T>(rng, m.rows(), m.cols()); };
    for (Matrix<T>* m : {&w.wq, &w.wk, &w.wv, &w.wo, &w.w1, &w.w2}) fill(*m);
    const Matrix<T> x = random_matrix<T>(rng, n, model);
    blockattn::BlockOptions options;
    options.causal = causal;
    options.query_block = 16;
    options.ffn_chunk = 20;
    options.threads = 2;
    Matrix<T> expected(n, model);
    blockattn::transformer_block(w, x, expected, options);
    blockattn::TransformerBlockWorkspace workspace;
    options.workspace = &workspace;
    Matrix<T> y(n, model);
    blockattn::transformer_block(w, x, y, options);
    const std::size_t capacity = workspace.capacity();
    const std::size_t slots = workspace.slots();
    EXPECT_GT(capacity, 0u);
    y.setZero();
    {
      const blockattn::detail::NoMallocScope no_malloc;  // aborts on an allocation
      blockattn::transformer_block(w, x, y, options);
    }
    EXPECT_EQ(workspace.capacity(), capacity);
    EXPECT_EQ(workspace.slots(), slots);
    EXPECT_TRUE(y == expected);
  }
}

// attention_backward() with a caller's Workspace: the first call sizes it (every thread's slice
// and the dQ tokens); a second call of the same shapes then runs whole inside Eigen's no-malloc
// scope (Workspace allocates through Eigen, so a call that grew it would abort), keeps the same
// capacity, and gives the bits of a call without a workspace. The same Workspace then also
// serves the forward call: one buffer for a training step.
TYPED_TEST(AttentionNoMallocTest, SecondBackwardCallWithAWorkspaceAllocatesNothing) {
  using T = TypeParam;
  auto rng = make_rng(37);
  const Index n_q = 150;
  const Index n_k = 260;
  const Index d = 32;
  const Matrix<T> q = random_matrix<T>(rng, n_q, d);
  const Matrix<T> k = random_matrix<T>(rng, n_k, d);
  const Matrix<T> v = random_matrix<T>(rng, n_k, d);
  const Matrix<T> dout = random_matrix<T>(rng, n_q, d);
  for (const bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "causal" : "full");
    AttentionOptions options;
    options.causal = causal;
    options.threads = 2;
    Matrix<T> out(n_q, d);
    std::vector<T> lse(static_cast<std::size_t>(n_q));
    blockattn::attention(q, k, v, out, options, lse);
    blockattn::AttentionBackwardInputs<T> in;
    in.q = q;
    in.k = k;
    in.v = v;
    in.out = out;
    in.lse = lse;
    in.dout = dout;
    Matrix<T> dq_expected(n_q, d), dk_expected(n_k, d), dv_expected(n_k, d);
    blockattn::AttentionGradients<T> expected;
    expected.dq = dq_expected;
    expected.dk = dk_expected;
    expected.dv = dv_expected;
    blockattn::attention_backward(in, expected, options);  // a workspace of its own
    blockattn::Workspace workspace;
    AttentionOptions reused = options;
    reused.workspace = &workspace;
    Matrix<T> dq(n_q, d), dk(n_k, d), dv(n_k, d);
    blockattn::AttentionGradients<T> grads;
    grads.dq = dq;
    grads.dk = dk;
    grads.dv = dv;
    blockattn::attention_backward(in, grads, reused);  // sizes the caller's workspace
    EXPECT_GT(workspace.capacity(), 0u);  // the backward's scratch lives in the caller's workspace
    blockattn::attention(q, k, v, out, reused, lse);  // the forward may grow it further
    const std::size_t capacity = workspace.capacity();
    dq.setZero();
    dk.setZero();
    dv.setZero();
    {
      const blockattn::detail::NoMallocScope no_malloc;  // aborts on an allocation
      blockattn::attention(q, k, v, out, reused, lse);
      blockattn::attention_backward(in, grads, reused);
    }
    EXPECT_EQ(workspace.capacity(), capacity);
    EXPECT_TRUE(dq == dq_expected);
    EXPECT_TRUE(dk == dk_expected);
    EXPECT_TRUE(dv == dv_expected);
  }
}

// The 16-bit backward and BPT layer with a caller's workspace: the first call sizes it (the
// backward's widened tiles, float dK/dV per slice and float dQ accumulator; the layer's widened
// weights and buffers), the second runs whole inside the no-malloc scope with the same capacity
// and gives the same bits.
TYPED_TEST(AttentionNoMalloc16BitTest, SecondBackwardAndBlockCallsAllocateNothing) {
  using S = TypeParam;
  auto rng = make_rng(39);
  const Index n_q = 90;
  const Index n_k = 130;
  const Index d = 32;
  const auto random16 = [&](Index rows, Index cols) {
    return Matrix<S>(random_matrix<float>(rng, rows, cols).template cast<S>());
  };
  const Matrix<S> q = random16(n_q, d), k = random16(n_k, d), v = random16(n_k, d);
  const Matrix<S> dout = random16(n_q, d);
  Matrix<S> out(n_q, d);
  std::vector<float> lse(static_cast<std::size_t>(n_q));
  AttentionOptions options;
  options.causal = true;
  options.threads = 2;
  options.key_chunk = 48;
  blockattn::attention(q, k, v, out, options, lse);
  blockattn::AttentionBackwardInputs<S> in;
  in.q = q;
  in.k = k;
  in.v = v;
  in.out = out;
  in.lse = lse;
  in.dout = dout;
  Matrix<S> dq(n_q, d), dk(n_k, d), dv(n_k, d);
  blockattn::AttentionGradients<S> grads;
  grads.dq = dq;
  grads.dk = dk;
  grads.dv = dv;
  blockattn::Workspace workspace;
  options.workspace = &workspace;
  blockattn::attention_backward(in, grads, options);
  const Matrix<S> dq_first = dq, dk_first = dk, dv_first = dv;
  const std::size_t capacity = workspace.capacity();

  auto w = blockattn::make_transformer_block_weights<S>(32, 4, 48, 2);
  for (Matrix<S>* m : {&w.wq, &w.wk, &w.wv, &w.wo, &w.w1, &w.w2}) {
    *m = random16(m->rows(), m->cols());
  }
  const Matrix<S> x = random16(70, 32);
  blockattn::TransformerBlockWorkspace block_workspace;
  blockattn::BlockOptions block_options;
  block_options.causal = true;
  block_options.query_block = 16;
  block_options.ffn_chunk = 20;
  block_options.threads = 2;
  block_options.workspace = &block_workspace;
  Matrix<S> y(70, 32), y_first(70, 32);
  blockattn::transformer_block(w, x, y_first, block_options);
  const std::size_t block_capacity = block_workspace.capacity();
  {
    const blockattn::detail::NoMallocScope no_malloc;  // aborts on an allocation
    blockattn::attention_backward(in, grads, options);
    blockattn::transformer_block(w, x, y, block_options);
  }
  EXPECT_EQ(workspace.capacity(), capacity);
  EXPECT_EQ(block_workspace.capacity(), block_capacity);
  EXPECT_TRUE(dq.template cast<float>() == dq_first.template cast<float>());
  EXPECT_TRUE(dk.template cast<float>() == dk_first.template cast<float>());
  EXPECT_TRUE(dv.template cast<float>() == dv_first.template cast<float>());
  EXPECT_TRUE(y.template cast<float>() == y_first.template cast<float>());
}

}  // namespace

}  // namespace attention_no_malloc_test
