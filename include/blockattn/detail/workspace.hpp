#pragma once
// The per-call scratch memory of the attention kernels: one slice per thread, allocated once
// before the loops, carved into named parts. Never resized inside a loop.

#include <algorithm>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include <blockattn/types.hpp>

namespace blockattn::detail {

/// The tile sizes of one attention call, after defaults and clamping.
struct TileShape {
  Index query_chunk = 1;  ///< queries per head in a tile
  Index group = 1;        ///< query heads stacked in a tile (GQA): rows = group·query_chunk
  Index key_chunk = 1;    ///< columns of a tile (keys)
  Index d = 1;            ///< head dimension of q and k
  Index d_v = 0;          ///< head dimension of v
};

/// One thread's part of the workspace. Every pointer is 64-byte aligned and every slice has the
/// same layout, so Eigen's reductions take the same path (the same rounding) on every thread.
template <class T>
struct WorkspaceSlice {
  T* queries;  ///< [rows, d]: the scaled queries of the current tile row
  T* scores;   ///< [rows, key_chunk]: scores, then weights p
  T* acc;      ///< [rows, d_v]: running output
  T* m;        ///< [rows]: running max
  T* l;        ///< [rows]: running sum
};

/// Scratch for `slots` threads: slots·(rows·(d + key_chunk + d_v + 2)) elements with
/// rows = group·query_chunk, padded
/// to cache lines. O(threads·query_chunk·(key_chunk + d + d_v)), independent of n.
template <class T>
class Workspace {
 public:
  Workspace(int slots, const TileShape& shape) : shape_(shape) {
    const Index rows = shape.group * shape.query_chunk;
    queries_ = 0;
    scores_ = queries_ + padded(rows * shape.d);
    acc_ = scores_ + padded(rows * shape.key_chunk);
    m_ = acc_ + padded(rows * shape.d_v);
    l_ = m_ + padded(rows);
    slice_size_ = l_ + padded(rows);
    // Over-allocate one cache line so that the first slice can start on a 64-byte boundary.
    buffer_.resize(static_cast<std::size_t>(slice_size_ * slots + kLine));
  }

  WorkspaceSlice<T> slice(int slot) {
    T* base = aligned_base() + static_cast<Index>(slot) * slice_size_;
    return {base + queries_, base + scores_, base + acc_, base + m_, base + l_};
  }

  const TileShape& shape() const { return shape_; }

 private:
  static constexpr Index kLine = 64 / static_cast<Index>(sizeof(T)) > 0
                                     ? 64 / static_cast<Index>(sizeof(T))
                                     : 1;  // elements per cache line

  static Index padded(Index elements) { return (elements + kLine - 1) / kLine * kLine; }

  T* aligned_base() {
    const auto address = reinterpret_cast<std::uintptr_t>(buffer_.data());
    const auto misalign = static_cast<Index>(address % 64) / static_cast<Index>(sizeof(T));
    return buffer_.data() + (misalign == 0 ? 0 : kLine - misalign);
  }

  TileShape shape_;
  Index queries_ = 0;
  Index scores_ = 0;
  Index acc_ = 0;
  Index m_ = 0;
  Index l_ = 0;
  Index slice_size_ = 0;
  std::vector<T> buffer_;
};

}  // namespace blockattn::detail
