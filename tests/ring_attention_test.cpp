// Ring attention over MPI (distributed/ring_attention.hpp). Run by ctest under `mpirun -np P`
// for several P: every rank builds the same global problem from the test seed, takes its shard,
// runs the ring, and checks its own rows against
//   - blockattn::reference::attention in long double on the gathered sequence (the tolerance of
//     support/tolerance.hpp), and single-process blockattn::attention within twice that;
//   - bitwise, a serial emulation on one rank: the same local attention() calls on the same
//     shards, merged in ring order (owner r, r − 1, …). Equal bits show that the blocks travelled
//     intact and that the merge order is the fixed ring order, independent of message timing.

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <blockattn/attention.hpp>
#include <blockattn/distributed/ring_attention.hpp>
#include <blockattn/reference.hpp>

#include "support/backward.hpp"
#include "support/format16.hpp"
#include "support/gradient_tolerance.hpp"
#include "support/layer_error_bound.hpp"
#include "support/mpi_session.hpp"
#include "support/random.hpp"
#include "support/tolerance.hpp"

#include <mpi.h>

namespace {

using blockattn::AttentionOptions;
using blockattn::Index;
using blockattn::Matrix;
using blockattn::TensorView;
using blockattn::distributed::RingLayout;
using blockattn::distributed::ShardPositions;
using blockattn::test::world_rank;
using blockattn::test::world_size;

/// A contiguous [batch, seq, heads, dim] tensor.
template <class T>
struct Tensor {
  Index batch = 0, seq = 0, heads = 0, dim = 0;
  std::vector<T> data;

  Tensor(Index b, Index s, Index h, Index d)
      : batch(b), seq(s), heads(h), dim(d), data(static_cast<std::size_t>(b * s * h * d)) {}
  TensorView<T> view() { return blockattn::make_tensor_view(data.data(), batch, seq, heads, dim); }
  TensorView<const T> view() const {
    return blockattn::make_tensor_view(data.data(), batch, seq, heads, dim);
  }
  T& at(Index b, Index s, Index h, Index c) { return view().at(b, s, h)[c]; }
  T at(Index b, Index s, Index h, Index c) const { return view().at(b, s, h)[c]; }
  template <class U>
  Tensor<U> cast() const {
    Tensor<U> t(batch, seq, heads, dim);
    std::transform(data.begin(), data.end(), t.data.begin(), [](T x) { return U(x); });
    return t;
  }
  /// [seq, dim] of one (batch, head) in double, for the tolerance formulas.
  Matrix<double> head(Index b, Index h) const {
    Matrix<double> m(seq, dim);
    for (Index s = 0; s < seq; ++s) {
      for (Index c = 0; c < dim; ++c) m(s, c) = static_cast<double>(at(b, s, h, c));
    }
    return m;
  }
};

template <class T>
Tensor<T> random_tensor(std::mt19937_64& rng, Index b, Index s, Index h, Index d, double scale) {
  Tensor<T> t(b, s, h, d);
  for (T& x : t.data) x = blockattn::test::random_value<T>(rng, -scale, scale);
  return t;
}

/// The rows at `positions` of a global tensor, as a contiguous shard.
template <class T>
Tensor<T> take_rows(const Tensor<T>& global, const ShardPositions& positions) {
  Tensor<T> shard(global.batch, positions.size(), global.heads, global.dim);
  for (Index b = 0; b < global.batch; ++b) {
    for (Index i = 0; i < positions.size(); ++i) {
      for (Index h = 0; h < global.heads; ++h) {
        std::copy_n(global.view().at(b, positions[i], h), global.dim, shard.view().at(b, i, h));
      }
    }
  }
  return shard;
}

struct Case {
  const char* name;
  RingLayout layout = RingLayout::Contiguous;
  bool uneven = false;  ///< Contiguous only: shards of very different sizes, some empty
  Index batch = 2, n_q = 61, n_k = 61, heads = 4, kv_heads = 2, d = 16, d_v = 8;
  bool causal = false;
  Index window_left = -1, window_right = -1;
  bool key_lengths = false;
  bool alibi = false;
  double softcap = 0;
  bool sinks = false;  ///< a sink logit per query head (sink_pattern)
};

/// The sinks of query head h: near the logits, none (−inf), above every logit, below them.
double sink_pattern(Index h) {
  const double pattern[4] = {0.75, -std::numeric_limits<double>::infinity(), 6.0, -1.5};
  return pattern[h % 4];
}

/// Rank r's positions of n tokens: the layout's, or for `uneven` weights (r + 1) with every third
/// rank empty (rank 1, 4, 7, …), the remainder on the last rank.
ShardPositions positions_of(const Case& c, Index n, int ranks, int rank) {
  if (!c.uneven) return blockattn::distributed::shard_positions(c.layout, n, ranks, rank);
  std::vector<Index> sizes(static_cast<std::size_t>(ranks));
  Index weights = 0;
  for (int r = 0; r < ranks; ++r) weights += r % 3 == 1 ? 0 : r + 1;
  Index given = 0;
  for (int r = 0; r < ranks; ++r) {
    sizes[static_cast<std::size_t>(r)] = n * (r % 3 == 1 ? 0 : r + 1) / weights;
    given += sizes[static_cast<std::size_t>(r)];
  }
  sizes.back() += n - given;
  ShardPositions p;
  p.start[0] = std::accumulate(sizes.begin(), sizes.begin() + rank, Index{0});
  p.count[0] = sizes[static_cast<std::size_t>(rank)];
  return p;
}

/// Everything one case needs: the global problem and this rank's shards.
template <class T>
struct Problem {
  Case c;
  Tensor<T> q, k, v;
  std::vector<Index> key_lengths;
  std::vector<double> slopes;
  std::vector<double> sinks;
  AttentionOptions options;
  int ranks = world_size();
  int rank = world_rank();

  explicit Problem(const Case& c_)
      : c(c_),
        q(make(c_, 1, c_.n_q, c_.heads, c_.d, 2.0)),
        k(make(c_, 2, c_.n_k, c_.kv_heads, c_.d, 2.0)),
        v(make(c_, 3, c_.n_k, c_.kv_heads, c_.d_v, 1.0)) {
    options.causal = c.causal;
    options.window_left = c.window_left;
    options.window_right = c.window_right;
    options.softcap = c.softcap;
    options.query_chunk = 8;  // several tiles per shard: classify_block sees partial tiles
    options.key_chunk = 8;
    if (c.key_lengths) {
      for (Index b = 0; b < c.batch; ++b) key_lengths.push_back((c.n_k * (b + 1)) / (c.batch + 1));
      options.key_lengths = key_lengths;
    }
    if (c.alibi) {
      for (Index h = 0; h < c.heads; ++h) slopes.push_back(std::pow(2.0, -double(h + 1)));
      options.alibi_slopes = slopes;
    }
    if (c.sinks) {
      for (Index h = 0; h < c.heads; ++h) sinks.push_back(sink_pattern(h));
      options.sinks = sinks;
    }
  }
  static Tensor<T> make(const Case& c, std::uint64_t salt, Index s, Index h, Index d, double x) {
    std::mt19937_64 rng = blockattn::test::make_rng(salt);
    return random_tensor<T>(rng, c.batch, s, h, d, x);
  }
  ShardPositions query_positions(int r) const { return positions_of(c, c.n_q, ranks, r); }
  ShardPositions key_positions(int r) const { return positions_of(c, c.n_k, ranks, r); }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(c.d)); }
  /// E of tolerance.hpp: a bound on what modifiers add to a logit, and the largest finite |sink|
  /// (its exp(sink − m) is one more term whose argument is rounded once, attention_sinks_test).
  double extra() const {
    double e = c.softcap;
    if (c.alibi) e += slopes.front() * static_cast<double>(c.n_q + c.n_k);
    double sink = 0;
    for (const double x : sinks) sink = std::isinf(x) ? sink : std::max(sink, std::abs(x));
    return e + sink;
  }
};

/// This rank's shards of a Problem (its q rows, its k and v rows) and outputs of their shapes.
template <class T>
struct Shards {
  ShardPositions qp, kp;
  Tensor<T> q, k, v;

  explicit Shards(const Problem<T>& p)
      : qp(p.query_positions(p.rank)),
        kp(p.key_positions(p.rank)),
        q(take_rows(p.q, qp)),
        k(take_rows(p.k, kp)),
        v(take_rows(p.v, kp)) {}
  /// An out [B, n_q_r, H, d_v] (dim: d_v unless given).
  Tensor<T> out(Index dim = -1) const {
    return Tensor<T>(q.batch, q.seq, q.heads, dim < 0 ? v.dim : dim);
  }
  /// An lse [B, H, n_q_r] (rows: all of them unless given).
  std::vector<T> lse(Index rows = -1) const {
    return std::vector<T>(static_cast<std::size_t>(rows < 0 ? q.batch * q.heads * q.seq : rows));
  }
  /// ring_attention() of these shards into `out` (and `lse` unless empty).
  void ring(Tensor<T>& out, const AttentionOptions& options, blockattn::Span<T> lse = {},
            const blockattn::distributed::RingOptions& ring = {}) const {
    blockattn::distributed::ring_attention(MPI_COMM_WORLD, q.view(), k.view(), v.view(), out.view(),
                                           options, lse, ring);
  }
  /// The backward's inputs: these shards with the forward's out and lse, and dout.
  blockattn::TensorBackwardInputs<T> backward_inputs(const Tensor<T>& out,
                                                     blockattn::Span<const T> lse,
                                                     const Tensor<T>& dout) const {
    blockattn::TensorBackwardInputs<T> in;
    in.q = q.view();
    in.k = k.view();
    in.v = v.view();
    in.out = out.view();
    in.lse = lse;
    in.dout = dout.view();
    return in;
  }
};

/// dq, dk, dv of the shapes of a rank's q, k, v shards.
template <class T>
struct Gradients {
  Tensor<T> dq, dk, dv;

  explicit Gradients(const Shards<T>& s)
      : dq(s.q.batch, s.q.seq, s.q.heads, s.q.dim),
        dk(s.k.batch, s.k.seq, s.k.heads, s.k.dim),
        dv(s.v.batch, s.v.seq, s.v.heads, s.v.dim) {}
  blockattn::TensorGradients<T> views() {
    blockattn::TensorGradients<T> grads;
    grads.dq = dq.view();
    grads.dk = dk.view();
    grads.dv = dv.view();
    return grads;
  }
};

/// The serial emulation of the ring on this rank: the same local calls on the same shards,
/// merged in ring order, after the sinks' state (0, sinks[h]).
template <class T>
void emulate_ring(const Problem<T>& p, const Tensor<T>& q_shard, Tensor<T>& out,
                  std::vector<T>& lse) {
  namespace dd = blockattn::distributed::detail;
  const ShardPositions qp = p.query_positions(p.rank);
  std::fill(out.data.begin(), out.data.end(), T(0));
  for (Index bh = 0; bh < p.c.batch * p.c.heads; ++bh) {
    const T start = p.c.sinks ? static_cast<T>(sink_pattern(bh % p.c.heads))
                              : -std::numeric_limits<T>::infinity();
    std::fill_n(lse.begin() + bh * qp.size(), qp.size(), start);
  }
  Tensor<T> block(out.batch, out.seq, out.heads, out.dim);
  std::vector<T> block_lse(lse.size());
  blockattn::Workspace workspace;
  const AttentionOptions local = dd::local_options(p.options, &workspace);
  for (int s = 0; s < p.ranks; ++s) {
    const int owner = (p.rank - s + p.ranks) % p.ranks;
    const ShardPositions kp = p.key_positions(owner);
    if (qp.size() == 0 || kp.size() == 0) continue;
    dd::GlobalMask mask{qp,
                        kp,
                        p.c.n_k - p.c.n_q,
                        p.options.causal,
                        p.options.window_left,
                        p.options.window_right,
                        blockattn::detail::data_or_null(p.options.key_lengths)};
    if (!mask.any_visible(p.c.batch)) continue;
    const Tensor<T> k_shard = take_rows(p.k, kp);
    const Tensor<T> v_shard = take_rows(p.v, kp);
    if (p.c.alibi) {
      const dd::GlobalAlibi<T> alibi{qp, kp, mask.offset, p.options.alibi_slopes.data()};
      dd::local_attention<T>(q_shard.view(), k_shard.view(), v_shard.view(), block.view(), local,
                             blockattn::Span<T>(block_lse), mask, alibi);
    } else {
      dd::local_attention<T>(q_shard.view(), k_shard.view(), v_shard.view(), block.view(), local,
                             blockattn::Span<T>(block_lse), mask, blockattn::NoScoreMod{});
    }
    dd::merge_into<T>(out.view(), blockattn::Span<T>(lse), std::as_const(block).view(),
                      blockattn::Span<const T>(block_lse), p.options.threads);
  }
}

/// Fills a Workspace's memory with NaN bytes (0xFF: NaN in float and double).
void poison(blockattn::Workspace& workspace) {
  if (workspace.capacity() > 0) {
    std::memset(workspace.reserve(workspace.capacity()), 0xFF, workspace.capacity());
  }
}

/// Fills both parts of a RingWorkspace with NaN bytes (0xFF: NaN in float and double).
void poison(blockattn::distributed::RingWorkspace& workspace) {
  for (blockattn::Workspace* part : {&workspace.buffers, &workspace.steps}) poison(*part);
}

template <class T>
void check_forward(const Case& c) {
  SCOPED_TRACE(std::string(c.name) + " P=" + std::to_string(world_size()) +
               " rank=" + std::to_string(world_rank()) + " " + blockattn::test::seed_trace());
  const Problem<T> p(c);
  const Shards<T> shards(p);
  const ShardPositions& qp = shards.qp;
  Tensor<T> out = shards.out();
  std::vector<T> lse = shards.lse();
  shards.ring(out, p.options, lse, {c.layout});

  // One process, whole sequence: the library and the long double reference.
  Tensor<T> full(c.batch, c.n_q, c.heads, c.d_v);
  std::vector<T> full_lse(static_cast<std::size_t>(c.batch * c.heads * c.n_q));
  blockattn::attention(p.q.view(), p.k.view(), p.v.view(), full.view(), p.options, full_lse);
  const auto q_ld = p.q.template cast<long double>();
  const auto k_ld = p.k.template cast<long double>();
  const auto v_ld = p.v.template cast<long double>();
  Tensor<long double> ref(c.batch, c.n_q, c.heads, c.d_v);
  std::vector<long double> ref_lse(full_lse.size());
  blockattn::reference::attention(q_ld.view(), k_ld.view(), v_ld.view(), ref.view(), p.options,
                                  ref_lse);

  const Index group = c.heads / c.kv_heads;
  for (Index b = 0; b < c.batch; ++b) {
    for (Index h = 0; h < c.heads; ++h) {
      const Matrix<double> qh = p.q.head(b, h);
      const Matrix<double> kh = p.k.head(b, h / group);
      const Matrix<double> vh = p.v.head(b, h / group);
      const auto tol = blockattn::test::attention_tolerance<T>(qh, kh, vh, p.scale(), p.extra());
      const auto lse_tol = blockattn::test::lse_tolerance<T>(qh, kh, p.scale(), p.extra());
      for (Index i = 0; i < qp.size(); ++i) {
        const Index gi = qp[i];
        const auto row = static_cast<std::size_t>(gi);
        const long double want_lse =
            ref_lse[static_cast<std::size_t>((b * c.heads + h) * c.n_q + gi)];
        const T got_lse = lse[static_cast<std::size_t>((b * c.heads + h) * qp.size() + i)];
        if (std::isinf(want_lse)) {
          EXPECT_EQ(got_lse, -std::numeric_limits<T>::infinity())
              << "b=" << b << " h=" << h << " i=" << gi;
        } else {
          EXPECT_NEAR(static_cast<double>(got_lse), static_cast<double>(want_lse), lse_tol[row])
              << "b=" << b << " h=" << h << " i=" << gi;
        }
        for (Index col = 0; col < c.d_v; ++col) {
          const double got = static_cast<double>(out.at(b, i, h, col));
          EXPECT_NEAR(got, static_cast<double>(ref.at(b, gi, h, col)), tol[row])
              << "b=" << b << " h=" << h << " i=" << gi << " c=" << col;
          EXPECT_NEAR(got, static_cast<double>(full.at(b, gi, h, col)), 2 * tol[row])
              << "b=" << b << " h=" << h << " i=" << gi << " c=" << col;
        }
      }
    }
  }

  // Thread count: the same bits (attention() is thread-count invariant, the merge order fixed).
  AttentionOptions two_threads = p.options;
  two_threads.threads = 2;
  Tensor<T> out2 = shards.out();
  shards.ring(out2, two_threads, {}, {c.layout});
  EXPECT_EQ(out.data, out2.data) << "2 threads per rank changed the bits";
  // A reused RingWorkspace, poisoned with NaN between calls: the same bits (every buffer is
  // written before it is read), and the second call of the same shape allocates nothing.
  blockattn::distributed::RingWorkspace reused;
  for (int call = 0; call < 2; ++call) {
    Tensor<T> again = shards.out();
    std::vector<T> again_lse = shards.lse();
    const std::size_t before = reused.capacity();
    shards.ring(again, p.options, again_lse, {c.layout, &reused});
    EXPECT_EQ(out.data, again.data) << "call " << call << " with a RingWorkspace";
    EXPECT_EQ(lse, again_lse) << "call " << call << " with a RingWorkspace";
    if (call == 1) {
      EXPECT_EQ(reused.capacity(), before);
    }
    poison(reused);
  }
  // One rank: one attention() call with the masks as functors, the same bits as attention() —
  // except with a left window, where attention() starts each query block's key loop at its first
  // visible key (interval masks) and the functor mask cannot move the tile grid: other roundings.
  // Sinks: attention() folds the sink in after its keys, the ring starts from it (other roundings).
  if (p.ranks == 1 && c.window_left < 0 && !c.sinks) {
    EXPECT_EQ(out.data, full.data);
    EXPECT_EQ(lse, full_lse);
  }

  Tensor<T> emulated = shards.out();
  std::vector<T> emulated_lse = shards.lse();
  emulate_ring(p, shards.q, emulated, emulated_lse);
  EXPECT_EQ(out.data, emulated.data) << "the ring is not bitwise the serial merge in ring order";
  EXPECT_EQ(lse, emulated_lse);
}

template <class T>
class RingAttentionTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(RingAttentionTest, Scalars, );

TYPED_TEST(RingAttentionTest, Full) { check_forward<TypeParam>({"full"}); }

TYPED_TEST(RingAttentionTest, Causal) {
  Case c{"causal"};
  c.causal = true;
  check_forward<TypeParam>(c);
}

TYPED_TEST(RingAttentionTest, CausalUnevenShards) {
  Case c{"causal uneven"};
  c.causal = true;
  c.uneven = true;
  check_forward<TypeParam>(c);
}

TYPED_TEST(RingAttentionTest, CausalZigZag) {
  Case c{"causal zigzag", RingLayout::ZigZag};
  c.causal = true;
  check_forward<TypeParam>(c);
}

TYPED_TEST(RingAttentionTest, CausalStriped) {
  Case c{"causal striped", RingLayout::Striped};
  c.causal = true;
  check_forward<TypeParam>(c);
}

TYPED_TEST(RingAttentionTest, CausalWindowShorterThanAShard) {
  Case c{"causal window 4"};
  c.causal = true;
  c.window_left = 4;
  check_forward<TypeParam>(c);
}

TYPED_TEST(RingAttentionTest, TwoSidedWindowZigZag) {
  Case c{"window 9/5 zigzag", RingLayout::ZigZag};
  c.window_left = 9;
  c.window_right = 5;
  check_forward<TypeParam>(c);
}

TYPED_TEST(RingAttentionTest, KeyLengthsStriped) {
  Case c{"key lengths striped", RingLayout::Striped};
  c.causal = true;
  c.key_lengths = true;
  check_forward<TypeParam>(c);
}

TYPED_TEST(RingAttentionTest, AlibiSoftcapUneven) {
  Case c{"alibi softcap uneven"};
  c.causal = true;
  c.alibi = true;
  c.softcap = 5;
  c.uneven = true;
  check_forward<TypeParam>(c);
}

TYPED_TEST(RingAttentionTest, CrossAttentionBottomRight) {
  Case c{"n_q 29, n_k 61, causal"};
  c.n_q = 29;
  c.causal = true;
  check_forward<TypeParam>(c);
}

// Sinks join each query's denominator once: the plain causal case (every rank's queries see
// several shards: a sink per step would show), and queries that see no key at all (n_q > n_k,
// bottom-right: the first 32 rows), which get out 0 and lse = sink, as in attention().
TYPED_TEST(RingAttentionTest, SinksCausalZigZagGqa) {
  Case c{"sinks causal zigzag GQA", RingLayout::ZigZag};
  c.causal = true;
  c.sinks = true;
  check_forward<TypeParam>(c);
}

TYPED_TEST(RingAttentionTest, SinksRowsWithoutKeysUneven) {
  Case c{"sinks n_q 61, n_k 29, causal, uneven"};
  c.n_k = 29;
  c.causal = true;
  c.uneven = true;
  c.sinks = true;
  check_forward<TypeParam>(c);
}

TYPED_TEST(RingAttentionTest, MultiQueryStriped) {
  Case c{"MQA striped", RingLayout::Striped};
  c.kv_heads = 1;
  c.d = 8;
  c.d_v = 16;
  check_forward<TypeParam>(c);
}

// --- backward ------------------------------------------------------------------------------

/// The largest |x| over all ranks' shards of x, and of y − x (for the error table).
double world_max(double x) {
  double worst = 0;
  MPI_Allreduce(&x, &worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return worst;
}

template <class T>
void check_backward(const Case& c) {
  SCOPED_TRACE(std::string(c.name) + " P=" + std::to_string(world_size()) +
               " rank=" + std::to_string(world_rank()) + " " + blockattn::test::seed_trace());
  const Problem<T> p(c);
  const Shards<T> shards(p);
  const ShardPositions& qp = shards.qp;
  const ShardPositions& kp = shards.kp;
  const Tensor<T> dout = Problem<T>::make(c, 4, c.n_q, c.heads, c.d_v, 1.0);
  const Tensor<T> dout_shard = take_rows(dout, qp);
  Tensor<T> out = shards.out();
  std::vector<T> lse = shards.lse();
  shards.ring(out, p.options, lse, {c.layout});
  const blockattn::TensorBackwardInputs<T> in = shards.backward_inputs(out, lse, dout_shard);
  Gradients<T> grads(shards);
  blockattn::distributed::ring_attention_backward(MPI_COMM_WORLD, in, grads.views(), p.options,
                                                  {c.layout});
  const Tensor<T>& dq = grads.dq;
  const Tensor<T>& dk = grads.dk;
  const Tensor<T>& dv = grads.dv;
  // A reused RingWorkspace (and options.workspace for the steps' scratch), poisoned with NaN
  // between calls: the same bits, and the second call of the same shape allocates nothing.
  blockattn::distributed::RingWorkspace reused;
  blockattn::Workspace steps;
  AttentionOptions with_steps = p.options;
  with_steps.workspace = &steps;
  for (int call = 0; call < 4; ++call) {
    const AttentionOptions& options = call < 2 ? p.options : with_steps;
    Gradients<T> again(shards);
    const std::size_t before = reused.capacity() + steps.capacity();
    blockattn::distributed::ring_attention_backward(MPI_COMM_WORLD, in, again.views(), options,
                                                    {c.layout, &reused});
    EXPECT_EQ(dq.data, again.dq.data) << "call " << call << " with a RingWorkspace";
    EXPECT_EQ(dk.data, again.dk.data) << "call " << call << " with a RingWorkspace";
    EXPECT_EQ(dv.data, again.dv.data) << "call " << call << " with a RingWorkspace";
    if (call == 1 || call == 3) {
      EXPECT_EQ(reused.capacity() + steps.capacity(), before);
    }
    poison(reused);
    poison(steps);
  }

  // One process: the library's backward, and the long double reference.
  Tensor<T> full(c.batch, c.n_q, c.heads, c.d_v);
  std::vector<T> full_lse(static_cast<std::size_t>(c.batch * c.heads * c.n_q));
  blockattn::attention(p.q.view(), p.k.view(), p.v.view(), full.view(), p.options, full_lse);
  Tensor<T> dq1(c.batch, c.n_q, c.heads, c.d), dk1(c.batch, c.n_k, c.kv_heads, c.d),
      dv1(c.batch, c.n_k, c.kv_heads, c.d_v);
  blockattn::test::backward(p.q.view(), p.k.view(), p.v.view(), std::as_const(full).view(),
                            full_lse, dout.view(), dq1.view(), dk1.view(), dv1.view(), p.options);
  using Long = long double;
  const auto q_ld = p.q.template cast<Long>();
  const auto k_ld = p.k.template cast<Long>();
  const auto v_ld = p.v.template cast<Long>();
  const auto dout_ld = dout.template cast<Long>();
  Tensor<Long> ref(c.batch, c.n_q, c.heads, c.d_v);
  std::vector<Long> ref_lse(full_lse.size());
  blockattn::reference::attention(q_ld.view(), k_ld.view(), v_ld.view(), ref.view(), p.options,
                                  ref_lse);
  Tensor<Long> dq_ref(c.batch, c.n_q, c.heads, c.d), dk_ref(c.batch, c.n_k, c.kv_heads, c.d),
      dv_ref(c.batch, c.n_k, c.kv_heads, c.d_v);
  blockattn::test::reference_backward(q_ld.view(), k_ld.view(), v_ld.view(),
                                      std::as_const(ref).view(), ref_lse, dout_ld.view(),
                                      dq_ref.view(), dk_ref.view(), dv_ref.view(), p.options);

  // Tolerances (support/gradient_tolerance.hpp) from the exact probabilities of each head: the
  // reference's attention with v = I gives P itself. dK, dV of a kv head sum over its group.
  const Index group = c.heads / c.kv_heads;
  std::vector<double> tol_dq(static_cast<std::size_t>(c.batch * c.heads * c.n_q));
  std::vector<double> tol_dk(static_cast<std::size_t>(c.batch * c.kv_heads * c.n_k), 0.0);
  std::vector<double> tol_dv(tol_dk.size(), 0.0);
  const Matrix<Long> identity = Matrix<Long>::Identity(c.n_k, c.n_k);
  for (Index b = 0; b < c.batch; ++b) {
    AttentionOptions one = p.options;
    if (!p.options.key_lengths.empty()) {
      one.key_lengths = blockattn::Span<const Index>(p.options.key_lengths.data() + b, 1);
    }
    for (Index h = 0; h < c.heads; ++h) {
      const Matrix<Long> qh = p.q.head(b, h).template cast<Long>();
      const Matrix<Long> kh = p.k.head(b, h / group).template cast<Long>();
      Matrix<Long> prob(c.n_q, c.n_k);
      blockattn::reference::attention(qh, kh, identity, prob, one);
      const auto tol = blockattn::test::backward_tolerance<T>(
          p.q.head(b, h), p.k.head(b, h / group), p.v.head(b, h / group), dout.head(b, h),
          prob.template cast<double>(), p.scale(), p.extra(), group);
      for (Index i = 0; i < c.n_q; ++i) {
        tol_dq[static_cast<std::size_t>((b * c.heads + h) * c.n_q + i)] =
            tol.dq[static_cast<std::size_t>(i)];
      }
      for (Index j = 0; j < c.n_k; ++j) {
        const auto at = static_cast<std::size_t>((b * c.kv_heads + h / group) * c.n_k + j);
        tol_dk[at] += tol.dk[static_cast<std::size_t>(j)];
        tol_dv[at] += tol.dv[static_cast<std::size_t>(j)];
      }
    }
  }
  // Every element of this rank's shard against the reference (tol) and one process (2·tol).
  double err[3] = {0, 0, 0};
  double mag[3] = {0, 0, 0};
  const auto check = [&](const char* name, const Tensor<T>& got, const ShardPositions& pos,
                         const Tensor<T>& one_process, const Tensor<Long>& exact,
                         const std::vector<double>& tol, int slot) {
    for (Index b = 0; b < got.batch; ++b) {
      for (Index i = 0; i < got.seq; ++i) {
        for (Index h = 0; h < got.heads; ++h) {
          const double t = tol[static_cast<std::size_t>((b * got.heads + h) * exact.seq + pos[i])];
          for (Index col = 0; col < got.dim; ++col) {
            const auto g = static_cast<double>(got.at(b, i, h, col));
            const auto o = static_cast<double>(one_process.at(b, pos[i], h, col));
            EXPECT_NEAR(g, static_cast<double>(exact.at(b, pos[i], h, col)), t)
                << name << " b=" << b << " i=" << pos[i] << " h=" << h << " c=" << col;
            EXPECT_NEAR(g, o, 2 * t)
                << name << " b=" << b << " i=" << pos[i] << " h=" << h << " c=" << col;
            err[slot] = std::max(err[slot], std::abs(g - o));
            mag[slot] = std::max(mag[slot], std::abs(o));
          }
        }
      }
    }
  };
  check("dq", dq, qp, dq1, dq_ref, tol_dq, 0);
  check("dk", dk, kp, dk1, dk_ref, tol_dk, 1);
  check("dv", dv, kp, dv1, dv_ref, tol_dv, 2);
  double rel[3];
  for (int s = 0; s < 3; ++s) rel[s] = world_max(err[s]) / world_max(mag[s]);
  if (p.rank == 0) {
    std::printf(
        "[ error    ] %s P=%d %s: max|ring - one process| / max|grad|: dq %.2e, dk %.2e, dv %.2e\n",
        c.name, p.ranks, sizeof(T) == 4 ? "float" : "double", rel[0], rel[1], rel[2]);
  }
}

template <class T>
class RingAttentionBackwardTest : public ::testing::Test {};
TYPED_TEST_SUITE(RingAttentionBackwardTest, Scalars, );

TYPED_TEST(RingAttentionBackwardTest, CausalGqa) {
  Case c{"backward causal GQA"};
  c.causal = true;
  check_backward<TypeParam>(c);
}

TYPED_TEST(RingAttentionBackwardTest, CausalZigZagSoftcap) {
  Case c{"backward causal zigzag softcap", RingLayout::ZigZag};
  c.causal = true;
  c.softcap = 5;
  check_backward<TypeParam>(c);
}

TYPED_TEST(RingAttentionBackwardTest, WindowKeyLengthsStriped) {
  Case c{"backward window key lengths striped", RingLayout::Striped};
  c.window_left = 6;
  c.window_right = 2;
  c.key_lengths = true;
  check_backward<TypeParam>(c);
}

TYPED_TEST(RingAttentionBackwardTest, CausalWindowUnevenShortRing) {
  Case c{"backward causal window 4 uneven"};
  c.causal = true;
  c.window_left = 4;
  c.uneven = true;
  check_backward<TypeParam>(c);
}

// ALiBi on global positions in the backward: the kernel's score_mod path (∂ = 1), checked like
// every other case against the long double reference and the one-process attention_backward().
TYPED_TEST(RingAttentionBackwardTest, AlibiCausalZigZag) {
  Case c{"backward alibi causal zigzag", RingLayout::ZigZag};
  c.causal = true;
  c.alibi = true;
  check_backward<TypeParam>(c);
}

TYPED_TEST(RingAttentionBackwardTest, AlibiSoftcapUneven) {
  Case c{"backward alibi softcap uneven"};
  c.uneven = true;
  c.alibi = true;
  c.softcap = 5;
  check_backward<TypeParam>(c);
}

// Sinks in the backward live in the forward's lse (the global one): nothing else changes.
TYPED_TEST(RingAttentionBackwardTest, SinksCausalZigZag) {
  Case c{"backward sinks causal zigzag", RingLayout::ZigZag};
  c.causal = true;
  c.sinks = true;
  check_backward<TypeParam>(c);
}

TYPED_TEST(RingAttentionBackwardTest, AlibiCausalCrossAttentionStriped) {
  Case c{"backward alibi causal cross striped", RingLayout::Striped};
  c.n_q = 45;  // bottom-right aligned: query i sits at global position i + 16
  c.causal = true;
  c.alibi = true;
  check_backward<TypeParam>(c);
}

// --- 16-bit storage ------------------------------------------------------------------------
//
// bfloat16 and half q, k, v: the K/V shards travel in 16 bits, every step computes in float and
// the merge runs in float, out is rounded once. Oracles, each rank on its own rows:
//   1. bitwise: the float ring on the widened shards (the stored values, exactly), out rounded
//      once to the format, lse its float lse — at every P, since the merge order is the ring's in
//      both. At P = 1 without a left window or sinks the ring is one attention() call: bitwise
//      round(one-process float attention() on the widened inputs).
//   2. one-process attention() on the gathered 16-bit sequence, and the long double reference on
//      the stored inputs. t = the float tolerance (support/tolerance.hpp) on the stored inputs,
//      u_S = 2^-8 (bfloat16) or 2^-11 (half), M_v = max|v|: against the reference
//      t + u_S·(M_v + t) (the float bound, then one rounding of |out| <= M_v); against attention()
//      twice that plus u_S·M_v (an AVX512_BF16 build's one-process bf16 call rounds P to bf16 for
//      P·V: <= u_S·M_v more, attention_16bit_test). lse is float: the float tolerances.
// The backward, likewise: bitwise round(the float ring backward on the widened shards, out and
// lse); and against one-process attention_backward() in the format on the gathered sequence,
// given the ring's own out and lse (gathered), so both round the float gradients of the same
// inputs: within twice the float gradient bound (support/gradient_tolerance.hpp, as the float
// tests) plus one rounding of each, u_S·(|a| + |b|).

/// The same as `t` in S (each element rounded once), or widened back exactly.
template <class U, class T>
Tensor<U> convert(const Tensor<T>& t) {
  Tensor<U> u(t.batch, t.seq, t.heads, t.dim);
  std::transform(t.data.begin(), t.data.end(), u.data.begin(),
                 [](T x) { return static_cast<U>(static_cast<float>(x)); });
  return u;
}

/// A float problem whose q, k, v hold values of the format S (rounded once): the widened stored
/// inputs, for the float oracles and the tolerances.
template <class S>
Problem<float> stored_problem(const Case& c) {
  Problem<float> p(c);
  for (Tensor<float>* t : {&p.q, &p.k, &p.v}) *t = convert<float>(convert<S>(*t));
  return p;
}

/// Every rank's query rows of a [B, n_q_r, H, d] tensor gathered into [B, n_q, H, d] on every
/// rank: each places its rows into zeros, and a sum adds nothing else (exact).
Tensor<float> gather_rows(const Tensor<float>& shard, const Case& c) {
  Tensor<float> global(shard.batch, c.n_q, shard.heads, shard.dim);
  const ShardPositions pos = positions_of(c, c.n_q, world_size(), world_rank());
  for (Index b = 0; b < shard.batch; ++b) {
    for (Index i = 0; i < pos.size(); ++i) {
      for (Index h = 0; h < shard.heads; ++h) {
        std::copy_n(shard.view().at(b, i, h), shard.dim, global.view().at(b, pos[i], h));
      }
    }
  }
  MPI_Allreduce(MPI_IN_PLACE, global.data.data(), static_cast<int>(global.data.size()), MPI_FLOAT,
                MPI_SUM, MPI_COMM_WORLD);
  return global;
}

/// Every rank's lse [B, H, n_q_r] gathered into [B, H, n_q] (−inf stays −inf: the other ranks add
/// 0 to it).
std::vector<float> gather_lse(const std::vector<float>& lse, const Case& c, Index heads) {
  const ShardPositions qp = positions_of(c, c.n_q, world_size(), world_rank());
  std::vector<float> global(static_cast<std::size_t>(c.batch * heads * c.n_q), 0.0f);
  for (Index bh = 0; bh < c.batch * heads; ++bh) {
    for (Index i = 0; i < qp.size(); ++i) {
      global[static_cast<std::size_t>(bh * c.n_q + qp[i])] =
          lse[static_cast<std::size_t>(bh * qp.size() + i)];
    }
  }
  MPI_Allreduce(MPI_IN_PLACE, global.data(), static_cast<int>(global.size()), MPI_FLOAT, MPI_SUM,
                MPI_COMM_WORLD);
  return global;
}

/// The elements of a 16-bit result that differ from the float one rounded once (0: bitwise).
template <class S>
Index rounding_mismatches(const Tensor<S>& got, const Tensor<float>& wide) {
  Index count = 0;
  for (std::size_t e = 0; e < got.data.size(); ++e) {
    const S want = static_cast<S>(wide.data[e]);
    count += std::memcmp(&got.data[e], &want, sizeof(S)) != 0 ? 1 : 0;
  }
  return count;
}

template <class S>
void check_forward16(const Case& c) {
  SCOPED_TRACE(std::string(c.name) + " P=" + std::to_string(world_size()) +
               " rank=" + std::to_string(world_rank()) + " " + blockattn::test::seed_trace());
  const double u_s = blockattn::test::format_u<S>();
  const Problem<float> p = stored_problem<S>(c);
  const Shards<float> wide(p);  // this rank's shards, widened
  const Tensor<S> q = convert<S>(wide.q), k = convert<S>(wide.k), v = convert<S>(wide.v);
  Tensor<S> out(q.batch, q.seq, q.heads, c.d_v);
  std::vector<float> lse = wide.lse();
  blockattn::distributed::ring_attention(MPI_COMM_WORLD, q.view(), k.view(), v.view(), out.view(),
                                         p.options, lse, {c.layout});

  // 1. Bitwise the float ring on the widened shards, rounded once.
  Tensor<float> out_f = wide.out();
  std::vector<float> lse_f = wide.lse();
  wide.ring(out_f, p.options, lse_f, {c.layout});
  EXPECT_EQ(rounding_mismatches(out, out_f), 0) << "not round(the float ring)";
  EXPECT_EQ(lse, lse_f);
  // A reused RingWorkspace poisoned with NaN, and 2 threads per rank: the same bits.
  blockattn::distributed::RingWorkspace reused;
  for (int call = 0; call < 2; ++call) {
    AttentionOptions options = p.options;
    options.threads = 1 + call;
    Tensor<S> again(q.batch, q.seq, q.heads, c.d_v);
    blockattn::distributed::ring_attention(MPI_COMM_WORLD, q.view(), k.view(), v.view(),
                                           again.view(), options, {}, {c.layout, &reused});
    EXPECT_EQ(rounding_mismatches(again, out_f), 0) << "call " << call;
    poison(reused);
  }

  // 2. One process on the gathered sequence: attention() in the format, in float on the widened
  // inputs, and the long double reference.
  const Tensor<S> q_all = convert<S>(p.q), k_all = convert<S>(p.k), v_all = convert<S>(p.v);
  Tensor<S> full(c.batch, c.n_q, c.heads, c.d_v);
  blockattn::attention(q_all.view(), k_all.view(), v_all.view(), full.view(), p.options);
  Tensor<float> full_f(c.batch, c.n_q, c.heads, c.d_v);
  std::vector<float> full_lse(static_cast<std::size_t>(c.batch * c.heads * c.n_q));
  blockattn::attention(p.q.view(), p.k.view(), p.v.view(), full_f.view(), p.options, full_lse);
  const auto q_ld = p.q.template cast<long double>();
  const auto k_ld = p.k.template cast<long double>();
  const auto v_ld = p.v.template cast<long double>();
  Tensor<long double> ref(c.batch, c.n_q, c.heads, c.d_v);
  std::vector<long double> ref_lse(full_lse.size());
  blockattn::reference::attention(q_ld.view(), k_ld.view(), v_ld.view(), ref.view(), p.options,
                                  ref_lse);
  const ShardPositions& qp = wide.qp;
  if (p.ranks == 1 && c.window_left < 0 && !c.sinks) {
    EXPECT_EQ(rounding_mismatches(out, full_f), 0) << "P = 1: not round(one float attention())";
    EXPECT_EQ(lse, full_lse);
  }
  const Index group = c.heads / c.kv_heads;
  for (Index b = 0; b < c.batch; ++b) {
    for (Index h = 0; h < c.heads; ++h) {
      const Matrix<double> qh = p.q.head(b, h);
      const Matrix<double> kh = p.k.head(b, h / group);
      const Matrix<double> vh = p.v.head(b, h / group);
      const double m_v = vh.cwiseAbs().maxCoeff();
      const auto tol =
          blockattn::test::attention_tolerance<float>(qh, kh, vh, p.scale(), p.extra());
      const auto lse_tol = blockattn::test::lse_tolerance<float>(qh, kh, p.scale(), p.extra());
      for (Index i = 0; i < qp.size(); ++i) {
        const Index gi = qp[i];
        const auto row = static_cast<std::size_t>(gi);
        const double t = tol[row] + u_s * (m_v + tol[row]);
        const long double want_lse =
            ref_lse[static_cast<std::size_t>((b * c.heads + h) * c.n_q + gi)];
        const float got_lse = lse[static_cast<std::size_t>((b * c.heads + h) * qp.size() + i)];
        if (std::isinf(want_lse)) {
          EXPECT_EQ(got_lse, -std::numeric_limits<float>::infinity()) << "b=" << b << " i=" << gi;
        } else {
          EXPECT_NEAR(got_lse, static_cast<double>(want_lse), lse_tol[row])
              << "b=" << b << " h=" << h << " i=" << gi;
          EXPECT_NEAR(got_lse, full_lse[static_cast<std::size_t>((b * c.heads + h) * c.n_q + gi)],
                      2 * lse_tol[row])
              << "b=" << b << " h=" << h << " i=" << gi;
        }
        for (Index col = 0; col < c.d_v; ++col) {
          const auto got = static_cast<double>(static_cast<float>(out.at(b, i, h, col)));
          EXPECT_NEAR(got, static_cast<double>(ref.at(b, gi, h, col)), t)
              << "b=" << b << " h=" << h << " i=" << gi << " c=" << col;
          EXPECT_NEAR(got, static_cast<double>(static_cast<float>(full.at(b, gi, h, col))),
                      2 * t + u_s * m_v)
              << "b=" << b << " h=" << h << " i=" << gi << " c=" << col;
        }
      }
    }
  }
}

template <class S>
void check_backward16(const Case& c) {
  SCOPED_TRACE(std::string(c.name) + " P=" + std::to_string(world_size()) +
               " rank=" + std::to_string(world_rank()) + " " + blockattn::test::seed_trace());
  const double u_s = blockattn::test::format_u<S>();
  const Problem<float> p = stored_problem<S>(c);
  const Shards<float> wide(p);
  const Tensor<S> q = convert<S>(wide.q), k = convert<S>(wide.k), v = convert<S>(wide.v);
  const Tensor<S> dout_all = convert<S>(Problem<float>::make(c, 4, c.n_q, c.heads, c.d_v, 1.0));
  const Tensor<S> dout = take_rows(dout_all, wide.qp);
  Tensor<S> out(q.batch, q.seq, q.heads, c.d_v);
  std::vector<float> lse = wide.lse();
  blockattn::distributed::ring_attention(MPI_COMM_WORLD, q.view(), k.view(), v.view(), out.view(),
                                         p.options, lse, {c.layout});
  blockattn::TensorBackwardInputs<S> in;
  in.q = q.view();
  in.k = k.view();
  in.v = v.view();
  in.out = out.view();
  in.lse = lse;
  in.dout = dout.view();
  Tensor<S> dq(q.batch, q.seq, q.heads, q.dim), dk(k.batch, k.seq, k.heads, k.dim),
      dv(v.batch, v.seq, v.heads, v.dim);
  blockattn::TensorGradients<S> grads;
  grads.dq = dq.view();
  grads.dk = dk.view();
  grads.dv = dv.view();
  blockattn::distributed::ring_attention_backward(MPI_COMM_WORLD, in, grads, p.options, {c.layout});

  // 1. Bitwise the float ring backward on the widened shards, out and dout, rounded once.
  const Tensor<float> out_w = convert<float>(out), dout_w = convert<float>(dout);
  const blockattn::TensorBackwardInputs<float> in_f = wide.backward_inputs(out_w, lse, dout_w);
  Gradients<float> grads_f(wide);
  blockattn::distributed::ring_attention_backward(MPI_COMM_WORLD, in_f, grads_f.views(), p.options,
                                                  {c.layout});
  EXPECT_EQ(rounding_mismatches(dq, grads_f.dq), 0) << "dq is not round(the float ring's)";
  EXPECT_EQ(rounding_mismatches(dk, grads_f.dk), 0) << "dk is not round(the float ring's)";
  EXPECT_EQ(rounding_mismatches(dv, grads_f.dv), 0) << "dv is not round(the float ring's)";

  // 2. One-process attention_backward() in the format on the gathered sequence, with the ring's
  // out and lse gathered (the same inputs).
  const Tensor<S> out_all = convert<S>(gather_rows(out_w, c));
  const std::vector<float> lse_all = gather_lse(lse, c, c.heads);
  Tensor<S> dq1(c.batch, c.n_q, c.heads, c.d), dk1(c.batch, c.n_k, c.kv_heads, c.d),
      dv1(c.batch, c.n_k, c.kv_heads, c.d_v);
  const Tensor<S> q_all = convert<S>(p.q), k_all = convert<S>(p.k), v_all = convert<S>(p.v);
  blockattn::test::backward(q_all.view(), k_all.view(), v_all.view(), out_all.view(), lse_all,
                            dout_all.view(), dq1.view(), dk1.view(), dv1.view(), p.options);
  // The float gradient bound per row, from the exact probabilities (as check_backward).
  using Long = long double;
  const Tensor<float> dout_f = convert<float>(dout_all);
  const Index group = c.heads / c.kv_heads;
  std::vector<double> tol_dq(static_cast<std::size_t>(c.batch * c.heads * c.n_q));
  std::vector<double> tol_dk(static_cast<std::size_t>(c.batch * c.kv_heads * c.n_k), 0.0);
  std::vector<double> tol_dv(tol_dk.size(), 0.0);
  const Matrix<Long> identity = Matrix<Long>::Identity(c.n_k, c.n_k);
  for (Index b = 0; b < c.batch; ++b) {
    AttentionOptions one = p.options;
    if (!p.options.key_lengths.empty()) {
      one.key_lengths = blockattn::Span<const Index>(p.options.key_lengths.data() + b, 1);
    }
    for (Index h = 0; h < c.heads; ++h) {
      Matrix<Long> prob(c.n_q, c.n_k);
      blockattn::reference::attention(p.q.head(b, h).template cast<Long>(),
                                      p.k.head(b, h / group).template cast<Long>(), identity, prob,
                                      one);
      const auto tol = blockattn::test::backward_tolerance<float>(
          p.q.head(b, h), p.k.head(b, h / group), p.v.head(b, h / group), dout_f.head(b, h),
          prob.template cast<double>(), p.scale(), p.extra(), group);
      for (Index i = 0; i < c.n_q; ++i) {
        tol_dq[static_cast<std::size_t>((b * c.heads + h) * c.n_q + i)] =
            tol.dq[static_cast<std::size_t>(i)];
      }
      for (Index j = 0; j < c.n_k; ++j) {
        const auto at = static_cast<std::size_t>((b * c.kv_heads + h / group) * c.n_k + j);
        tol_dk[at] += tol.dk[static_cast<std::size_t>(j)];
        tol_dv[at] += tol.dv[static_cast<std::size_t>(j)];
      }
    }
  }
  const auto check = [&](const char* name, const Tensor<S>& got, const ShardPositions& pos,
                         const Tensor<S>& one_process, const std::vector<double>& tol, Index n) {
    for (Index b = 0; b < got.batch; ++b) {
      for (Index i = 0; i < got.seq; ++i) {
        for (Index h = 0; h < got.heads; ++h) {
          const double t = tol[static_cast<std::size_t>((b * got.heads + h) * n + pos[i])];
          for (Index col = 0; col < got.dim; ++col) {
            const auto g = static_cast<double>(static_cast<float>(got.at(b, i, h, col)));
            const auto o =
                static_cast<double>(static_cast<float>(one_process.at(b, pos[i], h, col)));
            EXPECT_NEAR(g, o, 2 * t + u_s * (std::abs(g) + std::abs(o)))
                << name << " b=" << b << " i=" << pos[i] << " h=" << h << " c=" << col;
          }
        }
      }
    }
  };
  check("dq", dq, wide.qp, dq1, tol_dq, c.n_q);
  check("dk", dk, wide.kp, dk1, tol_dk, c.n_k);
  check("dv", dv, wide.kp, dv1, tol_dv, c.n_k);

  // 3. Float accumulation (issue 19, item 4): against the long double reference on the stored
  // inputs, the normwise relative error of every gradient, over all ranks, stays below u_S —
  // about one rounding to the format, whatever P (16-bit dK, dV sums would add one per hop).
  const auto q_ld = p.q.template cast<Long>();
  const auto k_ld = p.k.template cast<Long>();
  const auto v_ld = p.v.template cast<Long>();
  const auto dout_ld = dout_f.template cast<Long>();
  Tensor<Long> ref(c.batch, c.n_q, c.heads, c.d_v);
  std::vector<Long> ref_lse(static_cast<std::size_t>(c.batch * c.heads * c.n_q));
  blockattn::reference::attention(q_ld.view(), k_ld.view(), v_ld.view(), ref.view(), p.options,
                                  ref_lse);
  Tensor<Long> dq_ref(c.batch, c.n_q, c.heads, c.d), dk_ref(c.batch, c.n_k, c.kv_heads, c.d),
      dv_ref(c.batch, c.n_k, c.kv_heads, c.d_v);
  blockattn::test::reference_backward(q_ld.view(), k_ld.view(), v_ld.view(),
                                      std::as_const(ref).view(), ref_lse, dout_ld.view(),
                                      dq_ref.view(), dk_ref.view(), dv_ref.view(), p.options);
  const auto relative = [&](const Tensor<S>& got, const ShardPositions& pos,
                            const Tensor<Long>& exact) {
    double sums[2] = {0, 0};  // Σ (got − exact)², Σ exact² over this rank's rows
    for (Index b = 0; b < got.batch; ++b) {
      for (Index i = 0; i < got.seq; ++i) {
        for (Index h = 0; h < got.heads; ++h) {
          for (Index col = 0; col < got.dim; ++col) {
            const auto e = static_cast<double>(exact.at(b, pos[i], h, col));
            const auto g = static_cast<double>(static_cast<float>(got.at(b, i, h, col)));
            sums[0] += (g - e) * (g - e);
            sums[1] += e * e;
          }
        }
      }
    }
    MPI_Allreduce(MPI_IN_PLACE, sums, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return std::sqrt(sums[0] / sums[1]);
  };
  const double rel[3] = {relative(dq, wide.qp, dq_ref), relative(dk, wide.kp, dk_ref),
                         relative(dv, wide.kp, dv_ref)};
  for (const double r : rel) EXPECT_LT(r, u_s);
  if (p.rank == 0) {
    std::printf(
        "[ error    ] %s P=%d %s: ‖ring − exact‖ / ‖exact‖ (u_S = %.1e): dq %.2e, dk %.2e, "
        "dv %.2e\n",
        c.name, p.ranks, std::is_same_v<S, Eigen::bfloat16> ? "bfloat16" : "half", u_s, rel[0],
        rel[1], rel[2]);
  }
}

template <class S>
class Ring16BitTest : public ::testing::Test {};
using Formats = ::testing::Types<Eigen::bfloat16, Eigen::half>;
TYPED_TEST_SUITE(Ring16BitTest, Formats, );

// d, d_v multiples of 16: every widened row starts 64-byte aligned, as in the float ring's buffers.
TYPED_TEST(Ring16BitTest, CausalZigZagGqa) {
  Case c{"16-bit causal zigzag GQA", RingLayout::ZigZag};
  c.causal = true;
  c.d_v = 16;
  check_forward16<TypeParam>(c);
}

TYPED_TEST(Ring16BitTest, SinksUnevenAlibi) {
  Case c{"16-bit sinks uneven alibi"};
  c.uneven = true;
  c.alibi = true;
  c.sinks = true;
  c.d_v = 16;
  check_forward16<TypeParam>(c);
}

TYPED_TEST(Ring16BitTest, SinksRowsWithoutKeysStriped) {
  Case c{"16-bit sinks n_q 61, n_k 29, causal, striped", RingLayout::Striped};
  c.n_k = 29;
  c.causal = true;
  c.sinks = true;
  c.d_v = 16;
  check_forward16<TypeParam>(c);
}

// float q and out over a 16-bit K/V (attention()'s KV-cache form): the shards travel in 16 bits
// and every step is attention()'s mixed call, bitwise the float call on the widened K/V, so the
// ring is bitwise the float ring on the widened K/V at every P (which the float tests compare
// with one process) and, at P = 1, bitwise the one-process mixed attention().
TYPED_TEST(Ring16BitTest, FloatQueriesOverCacheCausalZigZag) {
  using S = TypeParam;
  Case c{"float q over 16-bit K/V, causal zigzag", RingLayout::ZigZag};
  c.causal = true;
  c.d_v = 16;
  SCOPED_TRACE(std::string(c.name) + " P=" + std::to_string(world_size()) +
               " rank=" + std::to_string(world_rank()) + " " + blockattn::test::seed_trace());
  const Problem<float> p = stored_problem<S>(c);
  const Shards<float> wide(p);
  const Tensor<S> k = convert<S>(wide.k), v = convert<S>(wide.v);
  Tensor<float> out = wide.out();
  std::vector<float> lse = wide.lse();
  blockattn::distributed::ring_attention(MPI_COMM_WORLD, wide.q.view(), k.view(), v.view(),
                                         out.view(), p.options, lse, {c.layout});
  Tensor<float> out_f = wide.out();
  std::vector<float> lse_f = wide.lse();
  wide.ring(out_f, p.options, lse_f, {c.layout});
  EXPECT_EQ(out.data, out_f.data);
  EXPECT_EQ(lse, lse_f);
  if (p.ranks == 1) {
    const Tensor<S> k_all = convert<S>(p.k), v_all = convert<S>(p.v);
    Tensor<float> full(c.batch, c.n_q, c.heads, c.d_v);
    std::vector<float> full_lse(lse.size());
    blockattn::attention(p.q.view(), k_all.view(), v_all.view(), full.view(), p.options, full_lse);
    EXPECT_EQ(out.data, full.data);
    EXPECT_EQ(lse, full_lse);
  }
}

TYPED_TEST(Ring16BitTest, BackwardCausalZigZagSinks) {
  Case c{"16-bit backward causal zigzag sinks", RingLayout::ZigZag};
  c.causal = true;
  c.sinks = true;
  c.d_v = 16;
  check_backward16<TypeParam>(c);
}

TYPED_TEST(Ring16BitTest, BackwardWindowUneven) {
  Case c{"16-bit backward window uneven"};
  c.window_left = 6;
  c.window_right = 2;
  c.uneven = true;
  c.d_v = 16;
  check_backward16<TypeParam>(c);
}

// Element types that differ between ranks — bfloat16 on rank 0, half elsewhere (the same size),
// then float on rank 0, then the K/V type under float q — make every rank throw the same
// std::invalid_argument before any message.
TEST(RingAttentionValidationTest, ElementTypesThatDifferThrowOnEveryRank) {
  if (world_size() < 2) GTEST_SKIP() << "needs two ranks";
  Case c{"element types"};
  const Problem<float> p(c);
  const Shards<float> shards(p);
  const auto run = [&](auto format) {
    using S = decltype(format);
    const Tensor<S> q = convert<S>(shards.q), k = convert<S>(shards.k), v = convert<S>(shards.v);
    Tensor<S> out(q.batch, q.seq, q.heads, c.d_v);
    blockattn::distributed::ring_attention(MPI_COMM_WORLD, q.view(), k.view(), v.view(),
                                           out.view());
  };
  EXPECT_THAT(
      [&] { p.rank == 0 ? run(Eigen::bfloat16()) : run(Eigen::half()); },
      ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr(
          "the element type differs between rank 0 (16) and rank 1 (17); every rank must pass")));
  EXPECT_THAT([&] { p.rank == 0 ? run(float()) : run(Eigen::bfloat16()); },
              ::testing::ThrowsMessage<std::invalid_argument>(
                  ::testing::HasSubstr("the element type differs between rank 0 (4) and rank 1")));
  // float q over a bfloat16 K/V on rank 0, over a half K/V elsewhere.
  const auto run_cache = [&](auto format) {
    using S = decltype(format);
    const Tensor<S> k = convert<S>(shards.k), v = convert<S>(shards.v);
    Tensor<float> out = shards.out();
    blockattn::distributed::ring_attention(MPI_COMM_WORLD, shards.q.view(), k.view(), v.view(),
                                           out.view());
  };
  EXPECT_THAT([&] { p.rank == 0 ? run_cache(Eigen::bfloat16()) : run_cache(Eigen::half()); },
              ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr(
                  "the key/value element type differs between rank 0 (16) and rank 1 (17)")));
}

// --- messages larger than one MPI count ---------------------------------------------------

/// Lowers detail::max_message_elements (MPI's INT_MAX) for one scope on every rank, so that small
/// buffers travel in many pieces as a K/V shard of more than 2^31 − 1 elements would.
class MessageLimit {
 public:
  explicit MessageLimit(Index limit) {
    blockattn::distributed::detail::max_message_elements = limit;
  }
  MessageLimit(const MessageLimit&) = delete;
  MessageLimit& operator=(const MessageLimit&) = delete;
  ~MessageLimit() { blockattn::distributed::detail::max_message_elements = INT_MAX; }
};

TEST(RingMessageTest, PiecesCoverTheBufferInOrder) {
  namespace dd = blockattn::distributed::detail;
  EXPECT_EQ(dd::message_pieces(0, 7), 1);  // an empty buffer is one empty message
  EXPECT_EQ(dd::message_pieces(7, 7), 1);
  EXPECT_EQ(dd::message_pieces(8, 7), 2);
  const Index int_max = INT_MAX;
  EXPECT_EQ(dd::message_pieces(int_max, int_max), 1);
  EXPECT_EQ(dd::message_pieces(int_max + 1, int_max), 2);
  EXPECT_EQ(dd::message_pieces(3 * int_max, int_max), 3);
  EXPECT_EQ(dd::message_pieces(3 * int_max + 5, int_max), 4);

  const MessageLimit limit(7);
  std::vector<std::pair<Index, int>> pieces;
  dd::Requests::for_each_piece(20,
                               [&](Index offset, int size) { pieces.emplace_back(offset, size); });
  EXPECT_EQ(pieces, (std::vector<std::pair<Index, int>>{{0, 7}, {7, 7}, {14, 6}}));
  // The default splits a 5·2^31-element shard into 3 messages, none over INT_MAX elements.
  blockattn::distributed::detail::max_message_elements = INT_MAX;
  Index total = 0;
  int count = 0;
  dd::Requests::for_each_piece(5 * (Index{1} << 31), [&](Index offset, int size) {
    EXPECT_EQ(offset, total);
    total += size;
    ++count;
  });
  EXPECT_EQ(total, 5 * (Index{1} << 31));
  EXPECT_EQ(count, 6);
}

// One hop around the ring in 7-element pieces: every element arrives where it belongs.
TEST(RingMessageTest, ABufferTravelsInPieces) {
  namespace dd = blockattn::distributed::detail;
  const MessageLimit limit(7);
  const dd::RingComm comm(MPI_COMM_WORLD, "test");
  const Index count = 1000 + comm.rank();  // each rank sends a different length
  std::vector<double> sent(static_cast<std::size_t>(count));
  std::iota(sent.begin(), sent.end(), 1000.0 * comm.rank());
  const Index from_count = 1000 + comm.left();
  std::vector<double> got(static_cast<std::size_t>(from_count), -1.0);
  dd::Requests requests(comm);
  requests.receive(got.data(), from_count, comm.left(), dd::kTagKeysValues);
  requests.send(sent.data(), count, comm.right(), dd::kTagKeysValues);
  requests.wait_all();
  std::vector<double> want(got.size());
  std::iota(want.begin(), want.end(), 1000.0 * comm.left());
  EXPECT_EQ(got, want);
}

// The whole forward, backward and error broadcast with 61-element messages: the same checks as
// unsplit messages (bitwise the serial emulation), so the pieces reassemble exactly.
TYPED_TEST(RingAttentionTest, SmallMessageLimitCausalZigZag) {
  const MessageLimit limit(61);
  Case c{"causal zigzag, 61-element messages", RingLayout::ZigZag};
  c.causal = true;
  check_forward<TypeParam>(c);
}

TYPED_TEST(RingAttentionBackwardTest, SmallMessageLimitCausalGqa) {
  const MessageLimit limit(61);
  Case c{"backward causal GQA, 61-element messages"};
  c.causal = true;
  check_backward<TypeParam>(c);
}

TEST(RingMessageTest, ErrorMessagesBroadcastInPieces) {
  namespace dd = blockattn::distributed::detail;
  const MessageLimit limit(3);
  const dd::RingComm comm(MPI_COMM_WORLD, "test");
  const int root = comm.size() - 1;
  const std::string message(100, 'x');
  EXPECT_THAT([&] { dd::throw_from_rank(comm, root, comm.rank() == root ? message : ""); },
              ::testing::ThrowsMessage<std::invalid_argument>(
                  ::testing::HasSubstr(message + " (on rank " + std::to_string(root))));
}

// --- the BPT layer, sharded ---------------------------------------------------------------

/// Random weights of every field (multiples of 1/64, scaled by fan-in so activations stay O(1)).
template <class T>
blockattn::TransformerBlockWeights<T> random_weights(Index model, Index heads, Index kv_heads,
                                                     Index ffn) {
  std::mt19937_64 rng = blockattn::test::make_rng(11);
  auto w = blockattn::make_transformer_block_weights<T>(model, heads, ffn, kv_heads);
  const auto fill = [&](auto& m, double scale, double offset) {
    for (Index r = 0; r < m.rows(); ++r) {
      for (Index c = 0; c < m.cols(); ++c) {
        m(r, c) = static_cast<T>(offset) + blockattn::test::random_value<T>(rng, -scale, scale);
      }
    }
  };
  const double a = 2.0 / std::sqrt(static_cast<double>(model));
  for (auto* m : {&w.wq, &w.wk, &w.wv, &w.wo, &w.w1}) fill(*m, a, 0);
  fill(w.w2, 2.0 / std::sqrt(static_cast<double>(ffn)), 0);
  for (auto* b : {&w.bq, &w.bk, &w.bv, &w.bo, &w.b1, &w.b2, &w.ln1_beta, &w.ln2_beta}) {
    fill(*b, 0.25, 0);
  }
  fill(w.ln1_gamma, 0.25, 1);
  fill(w.ln2_gamma, 0.25, 1);
  return w;
}

template <class T>
void check_layer(RingLayout layout, bool causal) {
  const int ranks = world_size();
  const int rank = world_rank();
  SCOPED_TRACE("P=" + std::to_string(ranks) + " rank=" + std::to_string(rank) + " " +
               blockattn::test::seed_trace());
  const Index n = 45, model = 32, heads = 4, kv_heads = 2, ffn = 48;
  const auto w = random_weights<T>(model, heads, kv_heads, ffn);
  std::mt19937_64 rng = blockattn::test::make_rng(12);
  const Matrix<T> x = blockattn::test::random_matrix<T>(rng, n, model);
  const ShardPositions p = blockattn::distributed::shard_positions(layout, n, ranks, rank);
  Matrix<T> x_shard(p.size(), model);
  for (Index i = 0; i < p.size(); ++i) x_shard.row(i) = x.row(p[i]);
  blockattn::BlockOptions options;
  options.causal = causal;
  options.query_block = 8;
  options.ffn_chunk = 20;
  Matrix<T> y_shard(p.size(), model);
  blockattn::distributed::ring_transformer_block(MPI_COMM_WORLD, w, x_shard, y_shard, options,
                                                 {layout});
  // In place gives the same bits.
  Matrix<T> in_place = x_shard;
  blockattn::distributed::ring_transformer_block(MPI_COMM_WORLD, w, in_place, in_place, options,
                                                 {layout});
  EXPECT_EQ(in_place, y_shard);

  using Long = long double;
  const auto w_long = blockattn::test::cast_weights<Long>(w);
  const Matrix<Long> x_long = x.template cast<Long>();
  Matrix<Long> exact(n, model);
  blockattn::reference::transformer_block(w_long, x_long, exact, options);
  const Matrix<Long> bound = blockattn::test::layer_error_bound<T>(w_long, x_long, causal);
  for (Index i = 0; i < p.size(); ++i) {
    for (Index c = 0; c < model; ++c) {
      EXPECT_LE(std::abs(static_cast<Long>(y_shard(i, c)) - exact(p[i], c)), bound(p[i], c))
          << "token " << p[i] << ", feature " << c;
    }
  }
}

TYPED_TEST(RingAttentionTest, TransformerBlockZigZagCausal) {
  check_layer<TypeParam>(RingLayout::ZigZag, /*causal=*/true);
}

TYPED_TEST(RingAttentionTest, TransformerBlockContiguous) {
  check_layer<TypeParam>(RingLayout::Contiguous, /*causal=*/false);
}

/// The sharded BPT layer in the format S against the float ring layer on the widened weights and
/// x (bitwise, rounded once: ring_transformer_block computes a 16-bit layer in float), and
/// against one-process transformer_block() in S on the whole sequence within twice the float
/// layer's bound (support/layer_error_bound.hpp) plus one rounding of each, u_S·(|a| + |b|).
template <class S>
void check_layer16(RingLayout layout, bool causal) {
  const int ranks = world_size();
  const int rank = world_rank();
  SCOPED_TRACE("P=" + std::to_string(ranks) + " rank=" + std::to_string(rank) + " " +
               blockattn::test::seed_trace());
  const double u_s = blockattn::test::format_u<S>();
  const Index n = 45, model = 32, heads = 4, kv_heads = 2, ffn = 48;
  const auto w =
      blockattn::test::cast_weights<S>(random_weights<float>(model, heads, kv_heads, ffn));
  const auto w_f = blockattn::test::cast_weights<float>(w);
  std::mt19937_64 rng = blockattn::test::make_rng(12);
  const Matrix<S> x = blockattn::test::random_matrix<float>(rng, n, model).template cast<S>();
  const ShardPositions p = blockattn::distributed::shard_positions(layout, n, ranks, rank);
  Matrix<S> x_shard(p.size(), model);
  for (Index i = 0; i < p.size(); ++i) x_shard.row(i) = x.row(p[i]);
  const Matrix<float> x_shard_f = x_shard.template cast<float>();
  blockattn::BlockOptions options;
  options.causal = causal;
  options.query_block = 8;
  options.ffn_chunk = 20;
  Matrix<S> y_shard(p.size(), model);
  blockattn::distributed::ring_transformer_block(MPI_COMM_WORLD, w, x_shard, y_shard, options,
                                                 {layout});
  Matrix<float> y_f(p.size(), model);
  blockattn::distributed::ring_transformer_block(MPI_COMM_WORLD, w_f, x_shard_f, y_f, options,
                                                 {layout});
  const Matrix<S> y_f_rounded = y_f.template cast<S>();
  EXPECT_EQ(std::memcmp(y_shard.data(), y_f_rounded.data(),
                        static_cast<std::size_t>(y_shard.size()) * sizeof(S)),
            0)
      << "not round(the float ring layer)";

  Matrix<S> y_all(n, model);
  blockattn::transformer_block(w, x, y_all, options);
  using Long = long double;
  const Matrix<Long> bound = blockattn::test::layer_error_bound<float>(
      blockattn::test::cast_weights<Long>(w_f), x.template cast<float>().template cast<Long>(),
      causal);
  for (Index i = 0; i < p.size(); ++i) {
    for (Index c = 0; c < model; ++c) {
      const auto g = static_cast<double>(static_cast<float>(y_shard(i, c)));
      const auto o = static_cast<double>(static_cast<float>(y_all(p[i], c)));
      EXPECT_NEAR(g, o, 2 * static_cast<double>(bound(p[i], c)) + u_s * (std::abs(g) + std::abs(o)))
          << "token " << p[i] << ", feature " << c;
    }
  }
}

TYPED_TEST(Ring16BitTest, TransformerBlockZigZagCausal) {
  check_layer16<TypeParam>(RingLayout::ZigZag, /*causal=*/true);
}

// Ring steps that no rank needs are not run: a causal window shorter than every shard needs the
// own shard and the left neighbour's (2 steps); plain causal and full attention need all P, and
// so does a window over striped shards (every shard spans the whole sequence).
TEST(RingPlanTest, StepsThatNoRankNeedsAreDropped) {
  namespace dd = blockattn::distributed::detail;
  const int ranks = world_size();
  const Index n = 64 * ranks;
  const auto steps = [&](const AttentionOptions& options, RingLayout layout) {
    const dd::RingComm comm(MPI_COMM_WORLD, "test");
    const ShardPositions p = blockattn::distributed::shard_positions(layout, n, ranks, comm.rank());
    std::vector<float> x(static_cast<std::size_t>(p.size() * 4));
    const auto view = blockattn::make_tensor_view<const float>(x.data(), 1, p.size(), 1, 4);
    const blockattn::distributed::RingOptions ring{layout};
    return dd::make_plan(comm, "test", dd::describe<float>(view, view, view, options, ring, ""), "",
                         options, ring)
        .steps;
  };
  AttentionOptions causal;
  causal.causal = true;
  EXPECT_EQ(steps(causal, RingLayout::Contiguous), ranks);
  EXPECT_EQ(steps(causal, RingLayout::ZigZag), ranks);
  AttentionOptions window = causal;
  window.window_left = 10;
  EXPECT_EQ(steps(window, RingLayout::Contiguous), std::min(ranks, 2));
  EXPECT_EQ(steps(window, RingLayout::Striped), ranks);  // every shard holds neighbours
  AttentionOptions full;
  EXPECT_EQ(steps(full, RingLayout::Contiguous), ranks);
}

TEST(RingLayoutTest, ShardAndUnshardRoundTrip) {
  for (const RingLayout layout :
       {RingLayout::Contiguous, RingLayout::ZigZag, RingLayout::Striped}) {
    for (const int ranks : {1, 3, 4}) {
      std::mt19937_64 rng = blockattn::test::make_rng(7);
      const Tensor<float> global = random_tensor<float>(rng, 2, 23, 3, 5, 1.0);
      Tensor<float> back(2, 23, 3, 5);
      std::vector<char> seen(23, 0);
      for (int r = 0; r < ranks; ++r) {
        const ShardPositions p = blockattn::distributed::shard_positions(layout, 23, ranks, r);
        for (Index i = 0; i < p.size(); ++i) {
          ++seen[static_cast<std::size_t>(p[i])];
          if (i > 0) {
            EXPECT_LT(p[i - 1], p[i]);
          }
        }
        Tensor<float> shard(2, p.size(), 3, 5);
        blockattn::distributed::shard_sequence(global.view(), layout, ranks, r, shard.view());
        blockattn::distributed::unshard_sequence(std::as_const(shard).view(), layout, ranks, r,
                                                 back.view());
      }
      EXPECT_EQ(back.data, global.data);
      EXPECT_THAT(seen, ::testing::Each(1)) << "every position on exactly one rank";
    }
  }
  // Zig-zag: rank r of P holds chunks r and 2P − 1 − r of 2P.
  const ShardPositions z = blockattn::distributed::shard_positions(RingLayout::ZigZag, 16, 4, 1);
  EXPECT_EQ(z.start[0], 2);
  EXPECT_EQ(z.start[1], 12);
  EXPECT_EQ(z.size(), 4);
}

// Collective validation: a rank that disagrees, or one whose own arguments are bad, makes every
// rank throw the same std::invalid_argument before any ring message (nobody is left waiting).
TEST(RingAttentionValidationTest, DisagreeingOptionsThrowOnEveryRank) {
  Case c{"disagree"};
  const Problem<float> p(c);
  const Shards<float> shards(p);
  Tensor<float> out = shards.out();
  AttentionOptions options;
  options.causal = p.rank == p.ranks - 1;  // only the last rank asks for causal
  if (p.ranks > 1) {
    EXPECT_THAT([&] { shards.ring(out, options); },
                ::testing::ThrowsMessage<std::invalid_argument>(
                    ::testing::HasSubstr("options.causal differs between rank 0")));
  }
  Tensor<float> bad_out = shards.out(p.rank == p.ranks - 1 ? c.d_v + 1 : c.d_v);
  EXPECT_THAT([&] { shards.ring(bad_out, {}); },
              ::testing::ThrowsMessage<std::invalid_argument>(::testing::AllOf(
                  ::testing::HasSubstr("out.dim"),
                  ::testing::HasSubstr("on rank " + std::to_string(p.ranks - 1)))));
}

// A too-short lse Span on one rank (here the last) makes every rank throw, naming lse and both
// sizes; so does a too-short options.key_lengths, which the ring reads on global positions.
TEST(RingAttentionValidationTest, ShortSpansThrowOnEveryRank) {
  Case c{"short spans"};
  const Problem<float> p(c);
  const Shards<float> shards(p);
  Tensor<float> out = shards.out();
  const Index rows = c.batch * c.heads * shards.qp.size();
  const bool last = p.rank == p.ranks - 1;
  std::vector<float> lse = shards.lse(last ? rows - 1 : rows);
  // Every rank sees the last rank's message (and must expect it: gmock calls the lambda again to
  // explain a mismatch, which would start one more collective call on this rank only).
  const Index last_rows = c.batch * c.heads * p.query_positions(p.ranks - 1).size();
  const std::string where = "on rank " + std::to_string(p.ranks - 1);
  EXPECT_THAT([&] { shards.ring(out, {}, lse); },
              ::testing::ThrowsMessage<std::invalid_argument>(::testing::AllOf(
                  ::testing::HasSubstr("lse.size() is " + std::to_string(last_rows - 1)),
                  ::testing::HasSubstr("batch·heads·n_q is " + std::to_string(last_rows)),
                  ::testing::HasSubstr(where))));

  // The backward requires lse: the same check, with the last rank's lse too short.
  lse.resize(static_cast<std::size_t>(rows));
  shards.ring(out, {}, lse);
  const blockattn::TensorBackwardInputs<float> in = shards.backward_inputs(
      out, blockattn::Span<const float>(lse.data(), last ? rows - 1 : rows), out);
  Gradients<float> grads(shards);
  EXPECT_THAT(
      [&] { blockattn::distributed::ring_attention_backward(MPI_COMM_WORLD, in, grads.views()); },
      ::testing::ThrowsMessage<std::invalid_argument>(
          ::testing::AllOf(::testing::HasSubstr("ring_attention_backward"),
                           ::testing::HasSubstr("lse.size() is " + std::to_string(last_rows - 1)),
                           ::testing::HasSubstr(where))));

  const std::vector<Index> lengths(static_cast<std::size_t>(last ? c.batch - 1 : c.batch), c.n_k);
  AttentionOptions options;
  options.key_lengths = lengths;
  EXPECT_THAT(
      [&] { shards.ring(out, options); },
      ::testing::ThrowsMessage<std::invalid_argument>(::testing::AllOf(
          ::testing::HasSubstr("options.key_lengths.size() is " + std::to_string(c.batch - 1)),
          ::testing::HasSubstr(where))));

  // Sinks are global: one rank's that differ, or a too-short Span on one rank, throw everywhere.
  std::vector<double> sinks(static_cast<std::size_t>(c.heads), 0.5);
  if (last) sinks.back() = 0.25;
  AttentionOptions with_sinks;
  with_sinks.sinks = sinks;
  if (p.ranks > 1) {
    EXPECT_THAT([&] { shards.ring(out, with_sinks); },
                ::testing::ThrowsMessage<std::invalid_argument>(
                    ::testing::HasSubstr("options.sinks differs between rank 0")));
  }
  const std::vector<double> short_sinks(static_cast<std::size_t>(last ? c.heads - 1 : c.heads),
                                        0.5);
  with_sinks.sinks = short_sinks;
  EXPECT_THAT([&] { shards.ring(out, with_sinks); },
              ::testing::ThrowsMessage<std::invalid_argument>(::testing::AllOf(
                  ::testing::HasSubstr("options.sinks.size() is " + std::to_string(c.heads - 1)),
                  ::testing::HasSubstr(where))));
}

}  // namespace

int main(int argc, char** argv) {
  const blockattn::test::MpiSession mpi(argc, argv);
  ::testing::InitGoogleMock(&argc, argv);
  if (mpi.rank() != 0) GTEST_FLAG_SET(brief, true);  // other ranks print failures only
  const int result = RUN_ALL_TESTS();
  int worst = 0;
  MPI_Allreduce(&result, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return worst;
}
