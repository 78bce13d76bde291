// A rank that dies mid-ring must not hang the job (issue 19, faults). Run by
// tests/ring_fault_test.sh under mpirun, which asserts that the job ends with a non-zero exit
// status within a time limit and that the output names the dead rank.
//
//   mpirun -np P ring_fault_test exit|abort|kill [milliseconds]
//
// Every rank calls ring_attention() in a loop. The last rank starts a watchdog thread that ends
// the process after `milliseconds` (default 300) with std::_Exit(3) ("exit"), std::abort()
// ("abort") or SIGKILL ("kill", as when a node is lost), while its main thread is inside a ring
// call: its neighbours are then waiting for, or sending, a K/V shard. The library does not detect
// the death itself (MPI-3 has no fault notification). A survivor sees either an MPI error, which
// ring_attention() throws as std::runtime_error with MPI's message (printed here, then
// MPI_Abort), or nothing (Open MPI 4.1, shared memory and TCP alike), in which case the MPI
// runtime (mpirun) notices the dead process and ends the job.

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <random>
#include <thread>
#include <vector>

#include <blockattn/distributed/ring_attention.hpp>

#include "support/mpi_session.hpp"

#include <mpi.h>

namespace {

using blockattn::Index;

std::atomic<int> calls_done{0};

}  // namespace

int main(int argc, char** argv) {
  const blockattn::test::MpiSession mpi(argc, argv);
  const int rank = mpi.rank();
  const int ranks = mpi.size();
  const char* mode = argc > 1 ? argv[1] : "exit";
  const int delay_ms = argc > 2 ? std::atoi(argv[2]) : 300;
  const int victim = ranks - 1;

  // Each call takes some tens of milliseconds, so the watchdog fires inside one.
  const Index n = 512, heads = 2, d = 32;
  std::mt19937 rng(static_cast<unsigned>(rank + 1));
  std::uniform_real_distribution<float> uniform(-1.0F, 1.0F);
  std::vector<float> q(static_cast<std::size_t>(n * heads * d));
  for (float& x : q) x = uniform(rng);
  const std::vector<float> k = q;
  const std::vector<float> v = q;
  std::vector<float> out(q.size());
  blockattn::AttentionOptions options;
  options.threads = 1;
  const auto view = [&](const std::vector<float>& x) {
    return blockattn::make_tensor_view<const float>(x.data(), 1, n, heads, d);
  };

  if (rank == victim) {
    std::thread([mode, delay_ms, rank] {
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
      std::fprintf(stderr, "ring_fault_test: rank %d dies now (%s), after %d ring calls\n", rank,
                   mode, calls_done.load());
      if (std::strcmp(mode, "abort") == 0) std::abort();
      if (std::strcmp(mode, "kill") == 0) std::raise(SIGKILL);
      std::_Exit(3);
    }).detach();
  }
  const auto start = std::chrono::steady_clock::now();
  try {
    // Bounded: if nothing stops the loop (it should), the program ends with status 0, which the
    // wrapper script reports as a failure.
    while (std::chrono::steady_clock::now() - start < std::chrono::seconds(20)) {
      blockattn::distributed::ring_attention(
          MPI_COMM_WORLD, view(q), view(k), view(v),
          blockattn::make_tensor_view(out.data(), 1, n, heads, d), options);
      ++calls_done;
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "ring_fault_test: rank %d: %s\n", rank, error.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  std::fprintf(stderr, "ring_fault_test: rank %d ran %d ring calls and saw no failure\n", rank,
               calls_done.load());
  return 0;
}
