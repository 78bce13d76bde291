#pragma once
// The plan of one forward call: which kernel runs (prefill / decode / decode over interleaved
// heads, pipelined or not), the tile shape, and how the work splits into tasks (batch × kv heads
// × query blocks × key segments) — computed once from the shapes, strides and options, before any
// arithmetic, and a pure function of them: nothing here depends on the thread count, which is
// why the results are bitwise the same for any number of threads. Also the tiling policy that
// the backward pass shares (choose_tile_shape, resolve_scale, block_aligned_chunk).

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <utility>

#include <blockattn/detail/microkernel.hpp>
#include <blockattn/detail/workspace.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

// Default tile sizes. A tile step packs a K and a V chunk once, then, per sub-tile of kTileRows
// query rows, computes the scores, exponentiates them in place and adds P·V.
// Packed K and V chunks are re-read by every sub-tile, so they stay in L2: at most 256 keys
// (docs/tuning.md#max-default-key-chunk), 128 KiB per packed operand
// (docs/tuning.md#packed-block-bytes).
inline constexpr Index kMaxDefaultKeyChunk = 256;
inline constexpr Index kPackedBlockBytes = 128 * 1024;
// q and acc of one query block stay in L2, so packing is amortised over many rows
// (docs/tuning.md#max-default-query-rows, docs/tuning.md#query-block-bytes).
inline constexpr Index kMaxDefaultQueryRows = 768;
inline constexpr Index kQueryBlockBytes = 384 * 1024;
// Decode key segments: a decode task covers at most this many keys (whole key chunks); fixed,
// not derived from the thread count, so results are bitwise the same for any number of threads;
// the merge is negligible at this size (docs/tuning.md#decode-segment-keys).
inline constexpr Index kDecodeSegmentKeys = 8192;
// Decode: the interleaved schedule (detail/decode_kernel.hpp, scores_with_pending_values) is used
// for at most this many rows per kv head; beyond it the loop is compute-bound and the pipeline
// loses (docs/tuning.md#decode-pipeline-rows).
inline constexpr Index kDecodePipelineRows = 4;
// Prefill: a call with fewer query blocks than this (batch × kv heads × query chunks) also splits
// the keys into segments, merged like decode's, so that short single-head calls still have tasks
// for two or more threads. Fixed, so results do not depend on the thread count; the partial
// states cost at most 2·kMinPrefillBlocks query blocks' output (docs/tuning.md#min-prefill-blocks).
inline constexpr Index kMinPrefillBlocks = 4;

constexpr Index ceil_div(Index a, Index b) { return (a + b - 1) / b; }

/// The largest divisor of `block` that is at most `limit` (at least 1).
constexpr Index largest_divisor_at_most(Index block, Index limit) {
  for (Index c = std::min(block, limit); c > 1; --c) {
    if (block % c == 0) return c;
  }
  return 1;
}

/// The chunk for a block-sparse layout's blocks of `block` rows or keys, given the default
/// chunk `limit`: the largest divisor of `block` up to `limit`, so that every tile lies inside
/// one block and is exactly empty or full — unless that divisor is under half of min(block,
/// limit), which only happens for a block larger than `limit` with no divisor near it (a prime
/// such as 257 would give 1-key tiles; docs/tuning.md#block-aligned-chunk). Then the default chunk
/// is kept and the tiles that straddle two blocks are masked (TileMasker); a tile of `limit` <=
/// block elements straddles at most one block boundary, so whole tiles are still skipped inside
/// unset blocks.
constexpr Index block_aligned_chunk(Index block, Index limit) {
  const Index divisor = largest_divisor_at_most(block, limit);
  return 2 * divisor >= std::min(block, limit) ? divisor : limit;
}

/// Tile sizes for one call: the options' chunks, or the defaults above (aligned with a
/// block-sparse layout's blocks where block_aligned_chunk() allows). Clamped to [1, n].
template <class T>
TileShape choose_tile_shape(const AttentionOptions& options, Index n_q, Index n_k, Index d,
                            Index d_v, Index group = 1) {
  TileShape shape;
  shape.d = d;
  shape.d_v = d_v;
  Index qc = options.query_chunk;
  Index kc = options.key_chunk;
  const auto size = static_cast<Index>(sizeof(T));
  const Index width = std::max<Index>(1, std::max(d, d_v));
  const Index key_default =
      std::clamp<Index>(kPackedBlockBytes / (width * size) / 16 * 16, 16, kMaxDefaultKeyChunk);
  if (kc == 0) {
    kc = key_default;
    if (options.block_sparse != nullptr) {
      kc = block_aligned_chunk(options.block_sparse->key_block_size(), key_default);
    }
  }
  if (qc == 0) {
    const Index rows =
        std::clamp<Index>(kQueryBlockBytes / ((d + d_v) * size) / kTileRows * kTileRows, kTileRows,
                          kMaxDefaultQueryRows);
    qc = std::max<Index>(1, rows / group);  // a block stacks the group's heads
    if (options.block_sparse != nullptr) {
      qc = block_aligned_chunk(options.block_sparse->query_block_size(), qc);
    }
  }
  shape.query_chunk = std::max<Index>(1, std::min(qc, n_q));
  shape.group = group;
  shape.key_chunk = std::max<Index>(1, std::min(kc, n_k));
  return shape;
}

/// The scale that multiplies q·k: options.scale, or 1/sqrt(d) when it is 0.
template <class T>
T resolve_scale(const AttentionOptions& options, Index d) {
  const double scale = options.scale != 0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(d));
  return static_cast<T>(scale);
}

/// The query heads that share one key/value head (GQA) and one chunk of their queries, stacked
/// into one tile: rows [g·rows_per_head, (g+1)·rows_per_head) hold head h0 + g's queries
/// [q0, q0 + rows_per_head). K and V are then read once for the whole group (decode with 8 query
/// heads on one kv head reads the cache once, not 8 times).
struct TileRows {
  Index b = 0;              ///< batch index
  Index h0 = 0;             ///< first query head of the group
  Index group = 1;          ///< query heads in the tile
  Index q0 = 0;             ///< first query of each head's rows
  Index rows_per_head = 0;  ///< queries per head in the tile

  /// Rows of the tile: group·rows_per_head.
  Index rows() const { return group * rows_per_head; }
};

/// A half-open range of keys [begin, end).
struct KeyRange {
  Index begin = 0;
  Index end = 0;
};

/// What plan_attention() reads of a call: sizes, and whether one kv head's K and V rows are
/// interleaved with the other heads' rows in memory ([seq, heads, dim]: |head_stride| <
/// |seq_stride|) rather than adjacent ([heads, seq, dim]).
struct AttentionShapes {
  Index batch = 1;
  Index heads = 1;     ///< query heads
  Index kv_heads = 1;  ///< key/value heads (divides heads)
  Index n_q = 0;
  Index n_k = 0;
  Index d = 1;
  Index d_v = 1;
  bool k_rows_interleave = false;
  bool v_rows_interleave = false;
};

/// The AttentionShapes of the views of a call.
template <class QT, class KT>
AttentionShapes shapes_of(const TensorView<const QT>& q, const TensorView<const KT>& k,
                          const TensorView<const KT>& v) {
  const auto rows_interleave = [](const TensorView<const KT>& x) {
    return std::abs(x.head_stride) < std::abs(x.seq_stride);
  };
  return {q.batch,           q.heads, k.heads, q.seq, k.seq, q.dim, v.dim, rows_interleave(k),
          rows_interleave(v)};
}

/// Which forward kernel a call runs (detail/prefill_kernel.hpp, detail/decode_kernel.hpp).
enum class ForwardPath {
  Prefill,            ///< more than kDirectRows rows per kv head: K/V chunks packed per tile
  Decode,             ///< at most kDirectRows rows per kv head: K/V read in place, one head a task
  DecodeInterleaved,  ///< decode of every kv head in one task, chunk by chunk (see plan_attention)
};

/// The plan of one forward call (see the top of this file). Tasks are numbered block-major:
/// task = block·segments + segment, block = (b·(kv_heads / task_heads) + kv head / task_heads)
/// ·query_chunks + query chunk.
struct AttentionPlan {
  ForwardPath path = ForwardPath::Prefill;
  bool pipelined = false;  ///< decode defers each chunk's P·V to stream with the next chunk's K
  TileShape shape;         ///< tile sizes; shape.group = query heads per kv head
  double scale = 0;        ///< multiplies q·k (options.scale or 1/sqrt(d))
  Index n_q = 0;
  Index n_k = 0;
  Index kv_heads = 1;
  Index task_heads = 1;    ///< kv heads per task (all of them on DecodeInterleaved)
  Index query_chunks = 0;  ///< query blocks per (batch, kv head)
  Index blocks = 0;        ///< batch · kv_heads / task_heads · query_chunks
  Index segment_keys = 0;  ///< keys per segment, whole key chunks
  Index segments = 1;      ///< key segments per block, merged in order after the tasks
  Index tasks = 0;         ///< blocks · segments; 0: nothing to compute

  bool decode() const { return path != ForwardPath::Prefill; }

  /// The tile shape of one task: its rows stack every query head of its task_heads kv heads.
  TileShape task_shape() const {
    TileShape task = shape;
    task.group = shape.group * task_heads;
    return task;
  }

  /// The rows of query block `block`: batch entry, first query head, queries.
  TileRows block_rows(Index block) const {
    TileRows t;
    const Index chunk = block % query_chunks;
    const Index kv_blocks = kv_heads / task_heads;
    const Index kv_h = (block / query_chunks) % kv_blocks * task_heads;
    t.b = block / (query_chunks * kv_blocks);
    t.h0 = kv_h * shape.group;
    t.group = shape.group * task_heads;
    t.q0 = chunk * shape.query_chunk;
    t.rows_per_head = std::min(shape.query_chunk, n_q - t.q0);
    return t;
  }

  /// The keys that segment `segment` of a block computes, given the keys [visible.begin,
  /// visible.end) its queries can see at all: starts on the key_chunk grid, so that every query
  /// block sees the same key tiles.
  KeyRange task_keys(Index segment, KeyRange visible) const {
    KeyRange keys{visible.begin / shape.key_chunk * shape.key_chunk, visible.end};
    if (segments > 1) {
      keys.begin = std::max(keys.begin, segment * segment_keys);
      keys.end = std::min(keys.end, (segment + 1) * segment_keys);
    }
    return keys;
  }
};

/// Whether the forward pass computes a call's scores with the decode kernel (score_rows_direct:
/// one FMA chain per lane along d, then a horizontal sum) rather than the prefill one (score_tile
/// on packed K: one FMA chain along d per score). The two round differently; the backward pass
/// recomputes the scores with the same kernel, so that they are the forward's bit for bit.
template <class T>
bool forward_scores_direct(const AttentionOptions& options, Index n_q, Index n_k, Index d,
                           Index d_v, Index group) {
  const TileShape shape = choose_tile_shape<T>(options, n_q, n_k, d, d_v, group);
  return group * shape.query_chunk <= kDirectRows;
}

/// Plans a forward call of element type T (T sets the default tile sizes). Pure: the same shapes
/// and options give the same plan, whatever options.threads says.
template <class T>
AttentionPlan plan_attention(const AttentionShapes& x, const AttentionOptions& options) {
  AttentionPlan plan;
  plan.n_q = x.n_q;
  plan.n_k = x.n_k;
  plan.kv_heads = x.kv_heads;
  if (x.batch == 0 || x.heads == 0 || x.n_q == 0) return plan;  // tasks = 0
  const Index group = x.heads / x.kv_heads;                     // query heads per kv head (GQA)
  plan.shape = choose_tile_shape<T>(options, x.n_q, x.n_k, x.d, x.d_v, group);
  plan.scale = options.scale != 0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(x.d));
  plan.query_chunks = ceil_div(x.n_q, plan.shape.query_chunk);
  const bool direct = forward_scores_direct<T>(options, x.n_q, x.n_k, x.d, x.d_v, group);
  // Long decode with several kv heads whose rows interleave in memory ([seq, heads, dim]): one
  // task covers every kv head of its batch entry and key segment, head after head within each key
  // chunk, so that a run of keys is read in one window; segments then hold kDecodeSegmentKeys /
  // kv_heads keys. Contiguous rows ([heads, seq, dim]) keep one head per task (two streams, not
  // 2·kv_heads), and short caches keep one task per head (docs/tuning.md#decode-head-interleave).
  const bool interleave_heads = direct && x.kv_heads > 1 && x.n_k > kDecodeSegmentKeys &&
                                x.k_rows_interleave && x.v_rows_interleave;
  plan.path = !direct            ? ForwardPath::Prefill
              : interleave_heads ? ForwardPath::DecodeInterleaved
                                 : ForwardPath::Decode;
  plan.task_heads = interleave_heads ? x.kv_heads : 1;
  // Decode over contiguous rows (each head's K and V rows adjacent) with few rows per kv head
  // defers each chunk's P·V to stream with the next chunk's K (kDecodePipelineRows).
  plan.pipelined = direct && !x.k_rows_interleave && !x.v_rows_interleave &&
                   group * plan.shape.query_chunk <= kDecodePipelineRows;
  plan.blocks = x.batch * (x.kv_heads / plan.task_heads) * plan.query_chunks;
  // Decode: split the keys into segments of whole key chunks (independent of the thread count).
  // Prefill with fewer than kMinPrefillBlocks query blocks (one short head) splits them too, into
  // as many segments as make that many tasks, so that even n = 512 keeps two threads busy.
  const Index key_chunk = plan.shape.key_chunk;
  const Index key_chunks = ceil_div(x.n_k, key_chunk);
  Index segment_chunks = std::max<Index>(1, key_chunks);
  if (direct) {
    segment_chunks =
        ceil_div(std::max<Index>(kDecodeSegmentKeys / plan.task_heads, key_chunk), key_chunk);
  } else if (plan.blocks < kMinPrefillBlocks && key_chunks > 1) {
    segment_chunks =
        ceil_div(key_chunks, std::min(ceil_div(kMinPrefillBlocks, plan.blocks), key_chunks));
  }
  plan.segment_keys = segment_chunks * key_chunk;
  plan.segments = std::max<Index>(1, ceil_div(key_chunks, segment_chunks));
  plan.tasks = plan.blocks * plan.segments;
  return plan;
}

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
