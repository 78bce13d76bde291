#pragma once
// MPI for the programs that run under mpirun (the ring tests and the ring benchmark): one
// MpiSession per main(), and this process's place in MPI_COMM_WORLD.

#include <mpi.h>

namespace blockattn::test {

/// MPI_Init on construction, MPI_Finalize on destruction (after main's other objects that hold
/// communicators are gone, when it is main's first local). Non-copyable.
class MpiSession {
 public:
  MpiSession(int& argc, char**& argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  ~MpiSession() { MPI_Finalize(); }

  /// This process's rank in MPI_COMM_WORLD.
  int rank() const { return rank_; }
  /// The number of processes in MPI_COMM_WORLD.
  int size() const { return size_; }

 private:
  int rank_ = 0;
  int size_ = 1;
};

/// This process's rank in MPI_COMM_WORLD (MPI initialised).
inline int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

/// The number of processes in MPI_COMM_WORLD (MPI initialised).
inline int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

}  // namespace blockattn::test
