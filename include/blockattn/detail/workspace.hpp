#pragma once
// The scratch memory of the attention kernels. blockattn::Workspace (public) owns the bytes and
// can outlive a call; detail::AttentionWorkspace<T> carves one call's layout out of it: one slice
// per thread plus, for a key-split decode, one partial state per task. Sized once before the
// loops, never resized inside them.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>

#include <Eigen/Core>

#include <blockattn/detail/microkernel.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {

/// Reusable scratch memory for attention(): the per-thread tile buffers (scaled queries, packed
/// K/V chunk, one score tile, the running max / sum / output of the query block) and, for decode
/// calls split over the keys, the partial states that are merged at the end. Pass the same
/// Workspace to repeated calls (decode, one token at a time) and only the first call, or a call
/// that needs more, allocates: it grows to fit and is then reused, never shrinks (release() frees
/// it). Its size is O(threads·query_chunk·(key_chunk + d + d_v)) plus, for split decode,
/// O(tasks·segments·rows·d_v) — independent of n for prefill. Not thread-safe: one Workspace per
/// concurrent call. Move-only.
class Workspace {
 public:
  Workspace() = default;
  Workspace(Workspace&&) noexcept = default;
  Workspace& operator=(Workspace&&) noexcept = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  /// Bytes currently held (0 before the first call).
  std::size_t capacity() const { return capacity_; }

  /// Frees the memory; the next call allocates again.
  void release() {
    storage_.reset();
    capacity_ = 0;
  }

  /// At least `bytes` bytes, 64-byte aligned, contents unspecified. Reallocates (losing the
  /// contents) only when the current capacity is smaller. Used by the kernels.
  void* reserve(std::size_t bytes) {
    if (bytes > capacity_) {
      storage_.reset();  // free first: the peak is the new size, not old + new
      // Through Eigen's allocator, so that Eigen's runtime allocation check
      // (EIGEN_RUNTIME_NO_MALLOC, tests/attention_no_malloc_test.cpp) sees this allocation too.
      storage_.reset(static_cast<unsigned char*>(Eigen::internal::aligned_malloc(bytes + kAlign)));
      capacity_ = bytes;
    }
    const auto address = reinterpret_cast<std::uintptr_t>(storage_.get());
    return storage_.get() + (kAlign - address % kAlign) % kAlign;
  }

 private:
  static constexpr std::size_t kAlign = 64;
  struct Free {
    void operator()(unsigned char* p) const { Eigen::internal::aligned_free(p); }
  };
  std::unique_ptr<unsigned char, Free> storage_;
  std::size_t capacity_ = 0;
};

namespace detail {

/// The tile sizes of one attention call, after defaults and clamping.
struct TileShape {
  Index query_chunk = 1;  ///< queries per head in a task's query block
  Index group = 1;        ///< query heads stacked in a block (GQA): rows = group·query_chunk
  Index key_chunk = 1;    ///< keys per tile (one packed K/V chunk)
  Index d = 1;            ///< head dimension of q and k
  Index d_v = 0;          ///< head dimension of v
};

/// Offsets of the named parts of one scratch slice, each part padded to whole 64-byte cache
/// lines so that every part starts on a line when the slice does (no false sharing between
/// threads' slices, aligned loads within a part). take() hands out the parts in order.
template <class T>
class SliceLayout {
 public:
  /// Elements of T per 64-byte cache line (at least 1).
  static constexpr Index kLine = std::max<Index>(1, 64 / static_cast<Index>(sizeof(T)));

  /// `elements` rounded up to whole cache lines.
  static constexpr Index padded(Index elements) { return (elements + kLine - 1) / kLine * kLine; }

  /// Reserves `elements` (padded) at the end of the slice; returns their offset in it.
  Index take(Index elements) {
    const Index offset = size_;
    size_ += padded(elements);
    return offset;
  }

  /// Elements taken so far (a multiple of kLine).
  Index size() const { return size_; }

 private:
  Index size_ = 0;
};

/// One thread's part of the workspace. Every pointer is 64-byte aligned.
template <class T>
struct WorkspaceSlice {
  T* queries;   ///< [rows, d]: the scaled queries of the task's block
  T* packed_k;  ///< packed_k_size(key_chunk, d): the current K chunk (pack_k layout); decode
                ///< over per-channel int8 keys: a block's scaled queries (kDirectRows·(d + 1))
  T* packed_v;  ///< packed_v_size(key_chunk, d_v): the current V chunk (pack_v layout)
  T* scores;    ///< [max(min(rows, kTileRows), 2·min(rows, kDirectRows)), ld_s]: scores, then p
  T* acc;       ///< [rows, ld_acc]: running output
  T* m;         ///< [rows]: running max
  T* l;         ///< [rows]: running sum
};

/// One partial online state (m, l, acc) of `rows` rows, for the key-split decode.
template <class T>
struct PartialState {
  T* m;
  T* l;
  T* acc;  ///< [rows, ld_acc]
};

/// One call's layout over a blockattn::Workspace: `slots` thread slices, `partials` partial
/// states and `extra` elements of the caller's own (varlen's partial states of several row
/// counts). Elements per slice: rows·(d + ld_acc + 2) + packed K/V + one score tile, each part
/// padded to a cache line.
template <class T>
class AttentionWorkspace {
 public:
  AttentionWorkspace(Workspace& storage, int slots, const TileShape& shape, Index partials,
                     Index extra = 0)
      : AttentionWorkspace(slots, shape, partials, extra) {
    base_ = static_cast<T*>(storage.reserve(bytes()));
    partials_ = base_ + slice_size_ * slots;
    extra_ = partials_ + partial_size_ * partials;
  }

  /// The bytes that a call of this layout reserves from its Workspace, so that a caller can size
  /// one in advance (transformer_block()).
  static std::size_t bytes(int slots, const TileShape& shape, Index partials) {
    return AttentionWorkspace(slots, shape, partials).bytes();
  }

  WorkspaceSlice<T> slice(int slot) const {
    T* base = base_ + static_cast<Index>(slot) * slice_size_;
    return {base + queries_, base + packed_k_, base + packed_v_, base + scores_,
            base + acc_,     base + m_,        base + l_};
  }

  PartialState<T> partial(Index index) const {
    const Index rows = shape_.group * shape_.query_chunk;
    T* base = partials_ + index * partial_size_;
    return {base, base + rows, base + 2 * rows};
  }

  /// The `extra` elements (64-byte aligned).
  T* extra() const { return extra_; }

  const TileShape& shape() const { return shape_; }
  Index ld_s() const { return ld_s_; }
  Index ld_acc() const { return ld_acc_; }

 private:
  /// The layout alone, no storage.
  AttentionWorkspace(int slots, const TileShape& shape, Index partials, Index extra = 0)
      : shape_(shape) {
    const Index rows = shape.group * shape.query_chunk;
    ld_s_ = padded_stride<T>(shape.key_chunk);
    ld_acc_ = padded_stride<T>(shape.d_v);
    SliceLayout<T> layout;
    queries_ = layout.take(rows * shape.d);
    // Decode over per-channel int8 keys also keeps one key block's scaled queries and their
    // zero-point terms here (DecodeStream::block_queries): at most kDirectRows·(d + 1).
    packed_k_ = layout.take(std::max(packed_k_size<T>(shape.key_chunk, shape.d),
                                     std::min(rows, kDirectRows) * (shape.d + 1)));
    packed_v_ = layout.take(packed_v_size<T>(shape.key_chunk, shape.d_v));
    // Prefill: one sub-tile of scores; decode: two of at most kDirectRows rows (the pending
    // unit's weights and the next unit's scores).
    scores_ =
        layout.take(std::max(std::min(rows, kTileRows), 2 * std::min(rows, kDirectRows)) * ld_s_);
    acc_ = layout.take(rows * ld_acc_);
    m_ = layout.take(rows);
    l_ = layout.take(rows);
    slice_size_ = layout.size();
    partial_size_ = SliceLayout<T>::padded(rows * (ld_acc_ + 2));
    total_ = slice_size_ * slots + partial_size_ * partials + extra;
  }

  std::size_t bytes() const { return static_cast<std::size_t>(total_) * sizeof(T); }

  TileShape shape_;
  Index ld_s_ = 0;
  Index ld_acc_ = 0;
  Index queries_ = 0;
  Index packed_k_ = 0;
  Index packed_v_ = 0;
  Index scores_ = 0;
  Index acc_ = 0;
  Index m_ = 0;
  Index l_ = 0;
  Index slice_size_ = 0;
  Index partial_size_ = 0;
  Index total_ = 0;  ///< elements of the whole layout
  T* base_ = nullptr;
  T* partials_ = nullptr;
  T* extra_ = nullptr;
};

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
