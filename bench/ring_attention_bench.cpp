// Ring attention benchmark (issue 19): P-scaling of the forward, the overlap of communication
// with compute, each rank's peak memory, and the link bandwidth. An MPI program, not a Google
// Benchmark: every rank must run the same number of collective calls, which Benchmark's adaptive
// iteration counts would not guarantee. Never asserts on timings.
//
//   mpirun -np P ring_attention_bench [options]
//     --mode ring|compute|both|single|link   (default both)
//     --n N --heads H --dim D --reps R --threads T --layout zigzag|contiguous|striped
//     --causal 0|1 --link-mib M
//
// Modes:
//   ring     ring_attention() forward, R times: the job's time per call is the slowest rank's.
//   compute  the same local attention() calls and merges on every rank, in ring order, with every
//            K/V shard already in memory and no message at all: the compute-only bound.
//   both     ring and compute interleaved (ring, compute, ring, …); overlap = compute / ring per
//            repetition (1 = the transfers are hidden, or free), and a bitwise check that the two
//            give the same out.
//   single   one process (-np 1), blockattn::attention() on the whole sequence with T threads:
//            the baseline of the scaling figure.
//   link     ring exchange of an M MiB buffer with both neighbours (MPI_Sendrecv): the link's
//            bandwidth per direction, as the ring uses it.
// Inputs are a hash of (tensor, position, head, feature), so each rank makes only its own rows and
// any P sees the same global sequence. Memory: VmHWM is reset (/proc/self/clear_refs) after the
// inputs exist, so "extra peak" is what the ring (or attention()) adds on top of them.

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <blockattn/attention.hpp>
#include <blockattn/distributed/ring_attention.hpp>

#include "../tests/support/mpi_session.hpp"

#include <mpi.h>

namespace {

using blockattn::Index;
namespace dist = blockattn::distributed;

struct Args {
  std::string mode = "both";
  Index n = 8192;
  Index heads = 4;
  Index dim = 64;
  int reps = 5;
  int threads = 1;
  dist::RingLayout layout = dist::RingLayout::ZigZag;
  bool causal = true;
  Index link_mib = 64;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    const char* value = argv[i + 1];
    if (key == "--mode") {
      a.mode = value;
    } else if (key == "--n") {
      a.n = std::atol(value);
    } else if (key == "--heads") {
      a.heads = std::atol(value);
    } else if (key == "--dim") {
      a.dim = std::atol(value);
    } else if (key == "--reps") {
      a.reps = std::atoi(value);
    } else if (key == "--threads") {
      a.threads = std::atoi(value);
    } else if (key == "--causal") {
      a.causal = std::atoi(value) != 0;
    } else if (key == "--link-mib") {
      a.link_mib = std::atol(value);
    } else if (key == "--layout") {
      const std::string l = value;
      a.layout = l == "contiguous" ? dist::RingLayout::Contiguous
                 : l == "striped"  ? dist::RingLayout::Striped
                                   : dist::RingLayout::ZigZag;
    } else {
      std::fprintf(stderr, "ring_attention_bench: unknown option %s\n", key.c_str());
      MPI_Abort(MPI_COMM_WORLD, 2);
    }
  }
  return a;
}

const char* layout_name(dist::RingLayout l) {
  return l == dist::RingLayout::Contiguous ? "contiguous"
         : l == dist::RingLayout::Striped  ? "striped"
                                           : "zigzag";
}

/// A value in [-1, 1) from (tensor, position, head, feature): splitmix64's finaliser.
float input_value(std::uint64_t tensor, Index position, Index head, Index feature) {
  std::uint64_t x = (tensor * 0x9E3779B97F4A7C15ULL) ^
                    (static_cast<std::uint64_t>(position) << 24) ^
                    (static_cast<std::uint64_t>(head) << 12) ^ static_cast<std::uint64_t>(feature);
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  x ^= x >> 31;
  return static_cast<float>(static_cast<double>(x >> 40) / double(1 << 23) - 1.0);
}

/// The rows at `positions` of global tensor `tensor` [1, n, heads, dim], contiguous.
std::vector<float> make_rows(std::uint64_t tensor, const dist::ShardPositions& positions,
                             Index heads, Index dim) {
  std::vector<float> x(static_cast<std::size_t>(positions.size() * heads * dim));
  auto* out = x.data();
  for (Index i = 0; i < positions.size(); ++i) {
    for (Index h = 0; h < heads; ++h) {
      for (Index c = 0; c < dim; ++c) *out++ = input_value(tensor, positions[i], h, c);
    }
  }
  return x;
}

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// CPU seconds of this process, all threads (POSIX): what a call costs whatever the machine's
/// other load, as long as it is not contended for caches or memory bandwidth.
double cpu_now() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

double median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  return x.empty() ? 0.0 : x[x.size() / 2];
}

/// A field of /proc/self/status in MiB (VmRSS, VmHWM), or −1.
double status_mib(const char* field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  const std::size_t length = std::strlen(field);
  while (std::getline(status, line)) {
    if (line.compare(0, length, field) == 0 && line[length] == ':') {
      return std::stod(line.substr(length + 1)) / 1024.0;
    }
  }
  return -1;
}

/// Resets VmHWM to the current RSS (Linux); returns false where that is not possible.
bool reset_peak() {
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
  return static_cast<bool>(clear);
}

/// The job's time of one collective step: every rank times f(); the slowest rank's time.
template <class F>
double timed(F&& f) {
  MPI_Barrier(MPI_COMM_WORLD);
  const double start = now();
  f();
  const double mine = now() - start;
  double slowest = 0;
  MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return slowest;
}

std::vector<double> gather(double x) {
  int ranks = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  std::vector<double> all(static_cast<std::size_t>(ranks));
  MPI_Gather(&x, 1, MPI_DOUBLE, all.data(), 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  return all;
}

void link_mode(const Args& a, int rank, int ranks) {
  const auto count = static_cast<std::size_t>(a.link_mib) * 1024 * 1024 / sizeof(float);
  std::vector<float> send(count, 1.0F);
  std::vector<float> receive(count);
  const int right = (rank + 1) % ranks;
  const int left = (rank + ranks - 1) % ranks;
  const std::size_t piece = std::size_t{1} << 24;  // floats per message (64 MiB): an int count
  std::vector<double> times;
  for (int rep = 0; rep < a.reps + 1; ++rep) {
    const double t = timed([&] {
      for (std::size_t off = 0; off < count; off += piece) {
        const int n = static_cast<int>(std::min<std::size_t>(piece, count - off));
        MPI_Sendrecv(send.data() + off, n, MPI_FLOAT, right, 7, receive.data() + off, n, MPI_FLOAT,
                     left, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      }
    });
    if (rep > 0) times.push_back(t);  // the first exchange sets up the connections
  }
  if (rank == 0) {
    const double t = median(times);
    std::printf("ring_attention_bench link: P=%d, %" PRId64
                " MiB to the right neighbour while "
                "receiving as much from the left: median %.4f s = %.2f GB/s per direction per "
                "rank (median of %d)\n",
                ranks, static_cast<std::int64_t>(a.link_mib), t,
                static_cast<double>(count * sizeof(float)) / t / 1e9, a.reps);
  }
}

/// Everything but link mode; returns before MPI_Finalize (the ring's communicator is freed here).
void attention_modes(const Args& a, int rank, int ranks) {
  const Index heads = a.heads;
  const Index dim = a.dim;
  blockattn::AttentionOptions options;
  options.causal = a.causal;
  options.threads = a.threads;
  const double flops = 4.0 * static_cast<double>(a.n) * static_cast<double>(a.n) *
                       static_cast<double>(heads * dim) * (a.causal ? 0.5 : 1.0);
  if (rank == 0) {
    std::printf("ring_attention_bench %s: n=%" PRId64 " heads=%" PRId64 " d=%" PRId64
                " %s %s float, P=%d, threads per rank=%d, reps=%d\n",
                a.mode.c_str(), static_cast<std::int64_t>(a.n), static_cast<std::int64_t>(heads),
                static_cast<std::int64_t>(dim), a.causal ? "causal" : "full", layout_name(a.layout),
                ranks, a.threads, a.reps);
  }

  if (a.mode == "single") {
    if (ranks != 1) {
      if (rank == 0) std::fprintf(stderr, "ring_attention_bench: --mode single needs -np 1\n");
      MPI_Abort(MPI_COMM_WORLD, 2);
    }
    dist::ShardPositions all;
    all.count[0] = a.n;
    const std::vector<float> q = make_rows(1, all, heads, dim);
    const std::vector<float> k = make_rows(2, all, heads, dim);
    const std::vector<float> v = make_rows(3, all, heads, dim);
    std::vector<float> out(q.size());
    const auto view = [&](const std::vector<float>& x) {
      return blockattn::make_tensor_view<const float>(x.data(), 1, a.n, heads, dim);
    };
    const double before = status_mib("VmRSS");
    const bool reset = reset_peak();
    std::vector<double> times;
    std::vector<double> cpu;
    for (int rep = 0; rep < a.reps; ++rep) {
      const double cpu_start = cpu_now();
      times.push_back(timed([&] {
        blockattn::attention(view(q), view(k), view(v),
                             blockattn::make_tensor_view(out.data(), 1, a.n, heads, dim), options);
      }));
      cpu.push_back(cpu_now() - cpu_start);
    }
    const double t = median(times);
    std::printf(
        "  attention(): median %.4f s (min %.4f, max %.4f) = %.1f GFLOP/s, CPU %.4f s; extra "
        "peak %.1f MiB%s\n",
        t, *std::min_element(times.begin(), times.end()),
        *std::max_element(times.begin(), times.end()), flops / t / 1e9, median(cpu),
        status_mib("VmHWM") - before, reset ? "" : " (VmHWM not resettable)");
    return;
  }

  // This rank's shards; in "compute" and "both", every owner's K/V shard too.
  const dist::ShardPositions mine = dist::shard_positions(a.layout, a.n, ranks, rank);
  const std::vector<float> q = make_rows(1, mine, heads, dim);
  const std::vector<float> k = make_rows(2, mine, heads, dim);
  const std::vector<float> v = make_rows(3, mine, heads, dim);
  const auto view = [&](const std::vector<float>& x, Index seq) {
    return blockattn::make_tensor_view<const float>(x.data(), 1, seq, heads, dim);
  };
  const bool run_ring = a.mode == "ring" || a.mode == "both";
  const bool run_compute = a.mode == "compute" || a.mode == "both";
  std::vector<std::vector<float>> keys(static_cast<std::size_t>(ranks));
  std::vector<std::vector<float>> values(static_cast<std::size_t>(ranks));
  if (run_compute) {
    for (int r = 0; r < ranks; ++r) {
      const dist::ShardPositions p = dist::shard_positions(a.layout, a.n, ranks, r);
      keys[static_cast<std::size_t>(r)] = make_rows(2, p, heads, dim);
      values[static_cast<std::size_t>(r)] = make_rows(3, p, heads, dim);
    }
  }
  std::vector<float> out_ring(q.size());
  std::vector<float> out_compute(q.size());
  const auto out_view = [&](std::vector<float>& x) {
    return blockattn::make_tensor_view(x.data(), 1, mine.size(), heads, dim);
  };

  // The compute-only run mirrors ring_attention(): the same plan, local calls and merges.
  namespace dd = dist::detail;
  const dd::RingComm comm(MPI_COMM_WORLD, "ring_attention_bench");
  blockattn::Workspace workspace;
  const blockattn::AttentionOptions local = dd::local_options(options, &workspace);
  const dist::RingOptions ring{a.layout};
  const dd::RingPlan plan =
      dd::make_plan(comm, "ring_attention_bench",
                    dd::describe<float>(view(q, mine.size()), view(k, mine.size()),
                                        view(v, mine.size()), options, ring, ""),
                    "", options, ring);
  std::vector<float> lse_run(static_cast<std::size_t>(heads * mine.size()));
  std::vector<float> block(q.size());
  std::vector<float> block_lse(lse_run.size());
  const auto compute_only = [&] {
    std::fill(out_compute.begin(), out_compute.end(), 0.0F);
    std::fill(lse_run.begin(), lse_run.end(), -std::numeric_limits<float>::infinity());
    for (int s = 0; s < plan.steps; ++s) {
      const int owner = plan.owner_at(rank, s);
      if (!plan.sees(rank, owner) || mine.size() == 0) continue;
      const Index n_k = plan.keys[static_cast<std::size_t>(owner)].size();
      dd::local_attention<float>(view(q, mine.size()),
                                 view(keys[static_cast<std::size_t>(owner)], n_k),
                                 view(values[static_cast<std::size_t>(owner)], n_k),
                                 out_view(block), local, blockattn::Span<float>(block_lse),
                                 plan.mask(options, rank, owner), blockattn::NoScoreMod{});
      dd::merge_into<float>(out_view(out_compute), blockattn::Span<float>(lse_run),
                            blockattn::TensorView<const float>(out_view(block)),
                            blockattn::Span<const float>(block_lse), options.threads);
    }
  };
  // Both runs reuse one attention() workspace across calls, as a training loop would.
  blockattn::Workspace ring_workspace;
  blockattn::AttentionOptions ring_options = options;
  ring_options.workspace = &ring_workspace;
  const auto ring_call = [&] {
    dist::ring_attention(MPI_COMM_WORLD, view(q, mine.size()), view(k, mine.size()),
                         view(v, mine.size()), out_view(out_ring), ring_options, {}, ring);
  };

  const double before = status_mib("VmRSS");
  const bool reset = reset_peak();
  std::vector<double> ring_times;
  std::vector<double> compute_times;
  std::vector<double> my_compute;   // this rank's own compute time (load balance)
  std::vector<double> my_ring_cpu;  // CPU seconds, busy-polling waits included
  std::vector<double> my_compute_cpu;
  std::vector<double> overlap;
  for (int rep = 0; rep < a.reps; ++rep) {
    double t_ring = 0;
    if (run_ring) {
      const double cpu_start = cpu_now();
      ring_times.push_back(t_ring = timed(ring_call));
      my_ring_cpu.push_back(cpu_now() - cpu_start);
    }
    if (run_compute) {
      MPI_Barrier(MPI_COMM_WORLD);
      const double start = now();
      const double cpu_start = cpu_now();
      compute_only();
      my_compute_cpu.push_back(cpu_now() - cpu_start);
      my_compute.push_back(now() - start);
      double slowest = 0;
      MPI_Allreduce(&my_compute.back(), &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      compute_times.push_back(slowest);
      if (run_ring) overlap.push_back(slowest / t_ring);
    }
  }
  const double extra = status_mib("VmHWM") - before;
  const std::vector<double> extras = gather(extra);
  const std::vector<double> own_compute = gather(median(my_compute));
  const std::vector<double> ring_cpu = gather(median(my_ring_cpu));
  const std::vector<double> compute_cpu = gather(median(my_compute_cpu));
  int same = run_ring && run_compute ? (out_ring == out_compute ? 1 : 0) : 1;
  int all_same = 0;
  MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (rank == 0) {
    const auto report = [&](const char* what, const std::vector<double>& times) {
      const double t = median(times);
      std::printf("  %s: median %.4f s (min %.4f, max %.4f) = %.1f GFLOP/s [slowest rank]\n", what,
                  t, *std::min_element(times.begin(), times.end()),
                  *std::max_element(times.begin(), times.end()), flops / t / 1e9);
    };
    if (run_ring) report("ring forward", ring_times);
    if (run_compute) report("compute-only", compute_times);
    if (run_ring && run_compute) {
      std::printf(
          "  overlap = compute-only / ring, per repetition: median %.3f (min %.3f, max "
          "%.3f); ring out == compute-only out bitwise: %s\n",
          median(overlap), *std::min_element(overlap.begin(), overlap.end()),
          *std::max_element(overlap.begin(), overlap.end()), all_same ? "yes" : "NO");
    }
    for (int r = 0; r < ranks; ++r) {
      const Index tokens = dist::shard_positions(a.layout, a.n, ranks, r).size();
      std::printf("  rank %d: %" PRId64 " tokens, extra peak memory %.1f MiB%s", r,
                  static_cast<std::int64_t>(tokens), extras[static_cast<std::size_t>(r)],
                  reset ? "" : " (VmHWM not resettable)");
      const auto at = static_cast<std::size_t>(r);
      if (run_compute) std::printf(", own compute median %.4f s", own_compute[at]);
      std::printf("; CPU medians:");
      if (run_ring) std::printf(" ring %.4f s", ring_cpu[at]);
      if (run_compute) std::printf(" compute-only %.4f s", compute_cpu[at]);
      std::printf("\n");
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const blockattn::test::MpiSession mpi(argc, argv);
  const Args a = parse(argc, argv);
  if (a.mode == "link") {
    link_mode(a, mpi.rank(), mpi.size());
  } else {
    attention_modes(a, mpi.rank(), mpi.size());
  }
  return 0;
}
