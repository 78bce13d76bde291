// Ring attention over MPI: one sequence, its tokens spread over the ranks.
//
//   mpirun -np 4 ./ring_attention [n] [heads] [head_dim] [repetitions]
//
// What happens (Liu, Zaharia & Abbeel 2023):
//   1. Each rank holds a shard of q, k and v: here the zig-zag layout, rank r holding chunks r and
//      2P − 1 − r of 2P, so that under a causal mask every rank has the same amount of work.
//   2. ring_attention() runs P steps (fewer when the mask hides the far shards). At step s rank r
//      holds the K/V shard of rank r − s: it computes attention of its queries against that
//      shard — the masks use global positions — while the shard travels on to rank r + 1 and
//      the next one arrives from rank r − 1 (non-blocking MPI on a double buffer).
//   3. The P partial results of each query row merge exactly: softmax is a ratio of sums, and two
//      (out, lse) pairs over disjoint keys combine into the (out, lse) over their union.
//   4. ring_attention_backward() sends the K/V shards around again, with their dK and dV, which
//      return to their owner at the end. dQ never leaves its rank.
//   5. The same forward over K and V stored in bfloat16 (float q and out), as a KV cache keeps
//      them: the shards travel in their 16-bit storage, half the bytes per message, and the
//      partial results still merge in float.
// Each rank needs memory for its own shard and two K/V shards in flight: O(n / P), so the longest
// sequence grows with the number of ranks.
//
// The program checks the result against one process computing the whole sequence (rank 0), and
// prints timings (median of the repetitions) and each rank's peak resident memory.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <blockattn/attention.hpp>
#include <blockattn/attention_backward.hpp>
#include <blockattn/distributed/ring_attention.hpp>

#include <mpi.h>

namespace {

using blockattn::Index;
namespace dist = blockattn::distributed;

/// Peak resident memory of this process in MiB (Linux), or −1.
double peak_rss_mib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  return -1;
}

std::vector<float> random_values(std::size_t count, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0F, 1.0F);
  std::vector<float> x(count);
  for (float& e : x) e = dist(rng);
  return x;
}

double median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  return x[x.size() / 2];
}

template <class F>
double seconds(F&& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) d = std::max(d, double(std::abs(a[i] - b[i])));
  return d;
}

double max_abs(const std::vector<float>& a) {
  double m = 0;
  for (const float x : a) m = std::max(m, double(std::abs(x)));
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  int ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  const Index n = argc > 1 ? std::atol(argv[1]) : 2048;
  const Index heads = argc > 2 ? std::atol(argv[2]) : 4;
  const Index d = argc > 3 ? std::atol(argv[3]) : 64;
  const int repetitions = argc > 4 ? std::atoi(argv[4]) : 3;
  const Index batch = 1;
  const dist::RingLayout layout = dist::RingLayout::ZigZag;
  blockattn::AttentionOptions options;
  options.causal = true;

  // The global sequence, made on every rank from one seed (a real job would load only its shard).
  const auto size = static_cast<std::size_t>(batch * n * heads * d);
  const std::vector<float> q = random_values(size, 1);
  const std::vector<float> k = random_values(size, 2);
  const std::vector<float> v = random_values(size, 3);
  const std::vector<float> dout = random_values(size, 4);
  const auto global = [&](const std::vector<float>& x) {
    return blockattn::make_tensor_view(x.data(), batch, n, heads, d);
  };

  // 1. This rank's shards.
  const Index mine = dist::shard_positions(layout, n, ranks, rank).size();
  const auto shard_size = static_cast<std::size_t>(batch * mine * heads * d);
  std::vector<float> q_r(shard_size), k_r(shard_size), v_r(shard_size), dout_r(shard_size);
  const auto view = [&](std::vector<float>& x) {
    return blockattn::make_tensor_view(x.data(), batch, mine, heads, d);
  };
  dist::shard_sequence(global(q), layout, ranks, rank, view(q_r));
  dist::shard_sequence(global(k), layout, ranks, rank, view(k_r));
  dist::shard_sequence(global(v), layout, ranks, rank, view(v_r));
  dist::shard_sequence(global(dout), layout, ranks, rank, view(dout_r));

  // 2.–3. The ring, forward; then 4., backward.
  std::vector<float> out_r(shard_size), lse_r(static_cast<std::size_t>(batch * heads * mine));
  std::vector<float> dq_r(shard_size), dk_r(shard_size), dv_r(shard_size);
  // The backward's arguments by name, as attention_backward() takes them.
  blockattn::TensorBackwardInputs<float> in;
  in.q = view(q_r);
  in.k = view(k_r);
  in.v = view(v_r);
  in.out = view(out_r);
  in.lse = lse_r;
  in.dout = view(dout_r);
  blockattn::TensorGradients<float> grads;
  grads.dq = view(dq_r);
  grads.dk = view(dk_r);
  grads.dv = view(dv_r);
  std::vector<double> forward_times;
  std::vector<double> backward_times;
  for (int rep = 0; rep < repetitions; ++rep) {
    MPI_Barrier(MPI_COMM_WORLD);
    forward_times.push_back(seconds([&] {
      dist::ring_attention(MPI_COMM_WORLD, view(q_r), view(k_r), view(v_r), view(out_r), options,
                           lse_r, {layout});
    }));
    MPI_Barrier(MPI_COMM_WORLD);
    backward_times.push_back(seconds(
        [&] { dist::ring_attention_backward(MPI_COMM_WORLD, in, grads, options, {layout}); }));
  }

  // 5. K and V in bfloat16 (rounded once here; a real cache would hold them so).
  std::vector<Eigen::bfloat16> k16_r(shard_size), v16_r(shard_size);
  const auto to_bf16 = [](float x) { return Eigen::bfloat16(x); };
  std::transform(k_r.begin(), k_r.end(), k16_r.begin(), to_bf16);
  std::transform(v_r.begin(), v_r.end(), v16_r.begin(), to_bf16);
  const auto view16 = [&](std::vector<Eigen::bfloat16>& x) {
    return blockattn::make_tensor_view(x.data(), batch, mine, heads, d);
  };
  std::vector<float> out16_r(shard_size), lse16_r(lse_r.size());
  std::vector<double> bf16_times;
  for (int rep = 0; rep < repetitions; ++rep) {
    MPI_Barrier(MPI_COMM_WORLD);
    bf16_times.push_back(seconds([&] {
      dist::ring_attention(MPI_COMM_WORLD, view(q_r), view16(k16_r), view16(v16_r), view(out16_r),
                           options, lse16_r, {layout});
    }));
  }

  // Collect the shards on rank 0 and compare with one process doing the whole sequence.
  std::vector<int> counts(static_cast<std::size_t>(ranks));
  const int my_count = static_cast<int>(shard_size);
  MPI_Gather(&my_count, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  std::vector<int> displs(counts.size(), 0);
  for (std::size_t r = 1; r < counts.size(); ++r) displs[r] = displs[r - 1] + counts[r - 1];
  const auto gather = [&](std::vector<float>& shard) {
    std::vector<float> all(rank == 0 ? size : 0);
    std::vector<float> global_order(rank == 0 ? size : 0);
    MPI_Gatherv(shard.data(), my_count, MPI_FLOAT, all.data(), counts.data(), displs.data(),
                MPI_FLOAT, 0, MPI_COMM_WORLD);
    if (rank == 0) {
      for (int r = 0; r < ranks; ++r) {
        const Index rows = dist::shard_positions(layout, n, ranks, r).size();
        dist::unshard_sequence(
            blockattn::make_tensor_view<const float>(all.data() + displs[std::size_t(r)], batch,
                                                     rows, heads, d),
            layout, ranks, r, blockattn::make_tensor_view(global_order.data(), batch, n, heads, d));
      }
    }
    return global_order;
  };
  const std::vector<float> out = gather(out_r);
  const std::vector<float> dq = gather(dq_r);
  const std::vector<float> dk = gather(dk_r);
  const std::vector<float> dv = gather(dv_r);
  const std::vector<float> out16 = gather(out16_r);

  const double rss = peak_rss_mib();
  std::vector<double> all_rss(static_cast<std::size_t>(ranks));
  MPI_Gather(&rss, 1, MPI_DOUBLE, all_rss.data(), 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  if (rank == 0) {
    std::vector<float> one(size), one_lse(static_cast<std::size_t>(batch * heads * n));
    std::vector<float> dq1(size), dk1(size), dv1(size);
    std::vector<double> one_times;
    const auto g = [&](std::vector<float>& x) {
      return blockattn::make_tensor_view(x.data(), batch, n, heads, d);
    };
    for (int rep = 0; rep < repetitions; ++rep) {
      one_times.push_back(seconds([&] {
        blockattn::attention(global(q), global(k), global(v), g(one), options, one_lse);
      }));
    }
    blockattn::TensorBackwardInputs<float> one_in;
    one_in.q = global(q);
    one_in.k = global(k);
    one_in.v = global(v);
    one_in.out = global(one);
    one_in.lse = one_lse;
    one_in.dout = global(dout);
    blockattn::TensorGradients<float> one_grads;
    one_grads.dq = g(dq1);
    one_grads.dk = g(dk1);
    one_grads.dv = g(dv1);
    blockattn::attention_backward(one_in, one_grads, options);
    std::printf("ring attention: n = %ld, heads = %ld, d = %ld, causal, zig-zag, P = %d\n",
                static_cast<long>(n), static_cast<long>(heads), static_cast<long>(d), ranks);
    for (int r = 0; r < ranks; ++r) {
      std::printf("  rank %d: %ld tokens, peak resident memory %.1f MiB\n", r,
                  static_cast<long>(dist::shard_positions(layout, n, ranks, r).size()),
                  all_rss[std::size_t(r)]);
    }
    std::printf(
        "  max |ring − one process| / max |one process|: out %.2e, dq %.2e, dk %.2e, "
        "dv %.2e\n",
        max_abs_diff(out, one) / max_abs(one), max_abs_diff(dq, dq1) / max_abs(dq1),
        max_abs_diff(dk, dk1) / max_abs(dk1), max_abs_diff(dv, dv1) / max_abs(dv1));
    const char* threads = std::getenv("OMP_NUM_THREADS");
    std::printf(
        "  forward: ring %.4f s, one process %.4f s (OMP_NUM_THREADS=%s); backward: ring "
        "%.4f s (medians of %d)\n",
        median(forward_times), median(one_times), threads != nullptr ? threads : "unset",
        median(backward_times), repetitions);
    std::printf(
        "  K/V in bfloat16: forward %.4f s; max |ring − one process in float| / max |one "
        "process|: out %.2e (K and V rounded to bf16, u = 2^-8)\n",
        median(bf16_times), max_abs_diff(out16, one) / max_abs(one));
  }
  MPI_Finalize();
  return 0;
}
