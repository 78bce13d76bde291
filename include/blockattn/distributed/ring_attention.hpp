#pragma once
// Ring attention over MPI (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers
// for Near-Infinite Context", Algorithm 1): the sequence is sharded across the P processes of a
// communicator; each keeps its queries, and the key/value shards travel around the ring, one hop
// per step. At step s rank r holds the K/V shard of rank (r − s) mod P, runs attention() of its
// queries against it — with every mask evaluated on global positions — and merges the partial
// (out, lse) into its running result through merge_attention_states(), the library's one
// online-softmax merge. The transfer of the next shard (MPI_Isend / MPI_Irecv on a double
// buffer) overlaps the attention of the shard in hand. The backward pass sends dK and dV around
// with their shards and returns them to their owner; dQ stays home. bfloat16 and half shards
// travel in their 16 bits; the partial results merge, and the gradients sum, in float.
//
// The only blockattn header that includes <mpi.h>; link blockattn::mpi. The core library never
// needs MPI.

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <blockattn/attention.hpp>
#include <blockattn/attention_backward.hpp>
#include <blockattn/detail/check.hpp>
#include <blockattn/detail/workspace.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/transformer_block.hpp>
#include <blockattn/types.hpp>

#include <mpi.h>

/// Attention over a sequence sharded across the processes of an MPI communicator.
namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace distributed {

/// How a global sequence of n tokens is split across P ranks. Every layout keeps each rank's
/// positions increasing, so a shard is an ordinary [batch, seq, heads, dim] tensor.
enum class RingLayout {
  /// Rank r holds one contiguous run. ring_attention() takes any run lengths (uneven shards, even
  /// empty ones); shard_positions() proposes n / P each, the first n mod P ranks one more.
  /// Causal work is unbalanced: the last rank sees every key, the first only its own.
  Contiguous,
  /// The sequence is cut into 2P chunks (the first n mod 2P one token longer); rank r holds chunks
  /// r and 2P − 1 − r. Under a causal mask every rank then has the same work (±1 chunk pair).
  ZigZag,
  /// Rank r holds tokens r, r + P, r + 2P, … Causal work is balanced to within one token per
  /// pair of ranks; every tile of a causal step is on the diagonal (checked per pair).
  Striped,
};

/// Reusable memory of ring_attention() and ring_attention_backward() on one rank: pass the same
/// one (RingOptions::workspace) to repeated calls and only the first call, or one that needs more,
/// allocates; each part grows to fit and is then reused, never shrinks. Not thread-safe: one per
/// concurrent call. Move-only.
struct RingWorkspace {
  /// The ring's own buffers: the K/V shards in hand and arriving (the backward's dK/dV shards
  /// too), one block's out and lse, the running lse (the backward's dQ sums), and for 16-bit
  /// storage the float copies (q and the running out; q, out, dout and the shard in hand).
  Workspace buffers;
  /// The scratch of every step's attention() / attention_backward(), unless the call's
  /// options.workspace is given (then that one is used and this stays empty).
  Workspace steps;

  /// Bytes currently held by both parts.
  std::size_t capacity() const { return buffers.capacity() + steps.capacity(); }
  /// Frees both parts; the next call allocates again.
  void release() {
    buffers.release();
    steps.release();
  }
};

/// Options of the ring itself (AttentionOptions keeps the attention's).
struct RingOptions {
  RingLayout layout = RingLayout::Contiguous;  ///< how q and k/v are split (the same for both)
  /// Caller's reusable memory (not owned); nullptr: each call allocates its own.
  RingWorkspace* workspace = nullptr;
};

/// The global positions of one shard, in local order: up to two runs start[r] + t·stride,
/// t < count[r] (Contiguous and Striped use one run, ZigZag two). Increasing in the local index.
struct ShardPositions {
  Index start[2] = {0, 0};  ///< global position of each run's first token
  Index count[2] = {0, 0};  ///< tokens in each run
  Index stride = 1;         ///< distance between consecutive tokens of a run

  /// Number of tokens of the shard. O(1).
  Index size() const { return count[0] + count[1]; }
  /// Global position of local token i (0 <= i < size()).
  Index operator[](Index i) const {
    return i < count[0] ? start[0] + i * stride : start[1] + (i - count[0]) * stride;
  }
};

/// The positions that rank `rank` of `ranks` holds of a sequence of `n` tokens in `layout`.
/// Throws std::invalid_argument unless n >= 0, ranks >= 1 and 0 <= rank < ranks. O(1), no
/// allocation.
inline ShardPositions shard_positions(RingLayout layout, Index n, int ranks, int rank) {
  detail::require(n >= 0 && ranks >= 1 && rank >= 0 && rank < ranks, "shard_positions", "n is ", n,
                  ", ranks ", ranks, ", rank ", rank, " (need n >= 0 and 0 <= rank < ranks)");
  ShardPositions p;
  const Index r = rank;
  if (layout == RingLayout::Striped) {
    p.start[0] = r;
    p.count[0] = r < n ? (n - r + ranks - 1) / ranks : 0;
    p.stride = ranks;
    return p;
  }
  const Index parts = layout == RingLayout::ZigZag ? 2 * Index{ranks} : Index{ranks};
  const Index base = n / parts;
  const Index extra = n % parts;
  const auto chunk_start = [&](Index c) { return c * base + std::min(c, extra); };
  const auto chunk_size = [&](Index c) { return base + (c < extra ? 1 : 0); };
  p.start[0] = chunk_start(r);
  p.count[0] = chunk_size(r);
  if (layout == RingLayout::ZigZag) {
    p.start[1] = chunk_start(parts - 1 - r);
    p.count[1] = chunk_size(parts - 1 - r);
  }
  return p;
}

namespace detail {

/// Which way copy_shard() copies.
enum class ShardCopy { GlobalToShard, ShardToGlobal };

/// The copy behind shard_sequence() and unshard_sequence(): for every token that rank `rank`
/// holds in `layout`, global [batch, n, heads, dim] at its position ↔ shard [batch, size, heads,
/// dim] at its local index, in direction kCopy (the destination must be writable). Throws
/// std::invalid_argument, naming `function`, when the shapes do not match.
template <ShardCopy kCopy, class GT, class ST>
void copy_shard(const char* function, TensorView<GT> global, RingLayout layout, int ranks, int rank,
                TensorView<ST> shard) {
  static_assert(std::is_same_v<std::remove_const_t<GT>, std::remove_const_t<ST>>,
                "blockattn: global and shard must have the same element type");
  static_assert(!std::is_const_v<std::conditional_t<kCopy == ShardCopy::GlobalToShard, ST, GT>>,
                "blockattn: the destination view must be writable");
  const ShardPositions p = shard_positions(layout, global.seq, ranks, rank);
  blockattn::detail::require(shard.batch == global.batch && shard.seq == p.size() &&
                                 shard.heads == global.heads && shard.dim == global.dim,
                             function, "shard is [", shard.batch, ", ", shard.seq, ", ",
                             shard.heads, ", ", shard.dim, "] but rank ", rank, " holds [",
                             global.batch, ", ", p.size(), ", ", global.heads, ", ", global.dim,
                             "]");
  for (Index b = 0; b < global.batch; ++b) {
    for (Index i = 0; i < p.size(); ++i) {
      for (Index h = 0; h < global.heads; ++h) {
        if constexpr (kCopy == ShardCopy::GlobalToShard) {
          std::copy_n(global.at(b, p[i], h), global.dim, shard.at(b, i, h));
        } else {
          std::copy_n(shard.at(b, i, h), global.dim, global.at(b, p[i], h));
        }
      }
    }
  }
}

}  // namespace detail

/// Copies the tokens that rank `rank` holds in `layout` from the global sequence `global`
/// [batch, n, heads, dim] into `shard` [batch, shard_positions(...).size(), heads, dim]. No MPI.
/// Element type deduced (global may be TensorView<T> or TensorView<const T>). Throws
/// std::invalid_argument when the shapes do not match. Time O(batch·shard_seq·heads·dim), no
/// allocation.
template <class GT, class T>
void shard_sequence(TensorView<GT> global, RingLayout layout, int ranks, int rank,
                    TensorView<T> shard) {
  static_assert(std::is_same_v<std::remove_const_t<GT>, T>,
                "blockattn: global and shard must have the same element type (shard writable)");
  detail::copy_shard<detail::ShardCopy::GlobalToShard>("shard_sequence", global, layout, ranks,
                                                       rank, shard);
}

/// The inverse of shard_sequence(): writes rank `rank`'s `shard` back to its positions of
/// `global` [batch, n, heads, dim]; the other positions are left alone. No MPI. Element type
/// deduced as shard_sequence()'s. Time O(batch·shard_seq·heads·dim), no allocation.
template <class ST, class T>
void unshard_sequence(TensorView<ST> shard, RingLayout layout, int ranks, int rank,
                      TensorView<T> global) {
  static_assert(std::is_same_v<std::remove_const_t<ST>, T>,
                "blockattn: shard and global must have the same element type (global writable)");
  detail::copy_shard<detail::ShardCopy::ShardToGlobal>("unshard_sequence", global, layout, ranks,
                                                       rank, shard);
}

namespace detail {

using blockattn::detail::require;

/// The MPI type of one element: float and double as themselves, the 16-bit formats as their
/// 16 bits (MPI has no bfloat16 or half; the ring only moves them, never reduces them).
template <class T>
MPI_Datatype mpi_type() {
  static_assert(
      std::is_same_v<T, float> || std::is_same_v<T, double> || blockattn::detail::kIs16BitFloat<T>,
      "blockattn: ring_attention runs on float, double, bfloat16 and half");
  if constexpr (blockattn::detail::kIs16BitFloat<T>) {
    static_assert(sizeof(T) == sizeof(std::uint16_t) && std::is_trivially_copyable_v<T>,
                  "blockattn: a 16-bit format travels as its 16 bits");
    return MPI_UINT16_T;
  } else {
    return std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
  }
}

/// Throws std::runtime_error carrying MPI's own error string unless `code` is MPI_SUCCESS.
inline void check_mpi(int code, const char* function, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw std::runtime_error(
      blockattn::detail::concat("blockattn::distributed::", function, ": ", call,
                                " failed: ", std::string(text, static_cast<std::size_t>(length))));
}

/// The caller's communicator, duplicated for the call: our messages cannot match the caller's,
/// and MPI errors come back as codes (MPI_ERRORS_RETURN) without touching the caller's handler.
class RingComm {
 public:
  RingComm(MPI_Comm comm, const char* function) : function_(function) {
    check_mpi(MPI_Comm_dup(comm, &comm_), function, "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  RingComm(const RingComm&) = delete;
  RingComm& operator=(const RingComm&) = delete;
  ~RingComm() { MPI_Comm_free(&comm_); }

  MPI_Comm get() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  int left() const { return (rank_ + size_ - 1) % size_; }
  int right() const { return (rank_ + 1) % size_; }
  void check(int code, const char* call) const { check_mpi(code, function_, call); }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  const char* function_;
};

/// The most elements of one MPI message: MPI counts are int, so a buffer of more than INT_MAX
/// elements travels as several messages of at most this many (same tag, matched in order: MPI
/// does not let messages between one pair of ranks on one tag overtake each other). The library
/// never changes it; tests lower it to split small buffers into many pieces. Not synchronised:
/// set it only while no ring call runs, to the same value on every rank.
inline Index max_message_elements = INT_MAX;

/// The pieces one buffer of `count` elements travels in: ceil(count / limit), at least 1 (an
/// empty buffer is one empty message, so both sides always agree on the number of messages).
constexpr Index message_pieces(Index count, Index limit) {
  return count <= limit ? 1 : (count + limit - 1) / limit;
}

/// Outstanding non-blocking messages; waits for all of them on destruction too, so that an
/// exception thrown mid-ring never frees a buffer that MPI still reads or writes.
class Requests {
 public:
  explicit Requests(const RingComm& comm) : comm_(comm) {}
  Requests(const Requests&) = delete;
  Requests& operator=(const Requests&) = delete;
  ~Requests() {
    if (!requests_.empty()) {
      MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE);
    }
  }

  /// Sends `count` elements at `data` as message_pieces(count, max_message_elements) messages.
  template <class T>
  void send(const T* data, Index count, int to, int tag) {
    for_each_piece(count, [&](Index offset, int piece) {
      requests_.emplace_back();
      comm_.check(
          MPI_Isend(data + offset, piece, mpi_type<T>(), to, tag, comm_.get(), &requests_.back()),
          "MPI_Isend");
    });
  }
  /// Receives what send() sent with the same count (the same pieces, in order).
  template <class T>
  void receive(T* data, Index count, int from, int tag) {
    for_each_piece(count, [&](Index offset, int piece) {
      requests_.emplace_back();
      comm_.check(
          MPI_Irecv(data + offset, piece, mpi_type<T>(), from, tag, comm_.get(), &requests_.back()),
          "MPI_Irecv");
    });
  }
  void wait_all() {
    if (requests_.empty()) return;
    const int code =
        MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE);
    requests_.clear();
    comm_.check(code, "MPI_Waitall");
  }

  /// Calls f(offset, size) for each piece of a `count`-element buffer, in order.
  template <class F>
  static void for_each_piece(Index count, const F& f) {
    const Index limit = std::max<Index>(1, std::min<Index>(max_message_elements, INT_MAX));
    const Index pieces = message_pieces(count, limit);
    for (Index p = 0; p < pieces; ++p) {
      const Index offset = p * limit;
      f(offset, static_cast<int>(std::min(limit, count - offset)));
    }
  }

 private:
  const RingComm& comm_;
  std::vector<MPI_Request> requests_;
};

inline constexpr int kTagKeysValues = 1;
inline constexpr int kTagGradients = 2;
inline constexpr int kTagReturn = 3;

/// Every mask of AttentionOptions that is defined on positions (causal, windows, key lengths),
/// evaluated on global positions for one (query shard, key shard) pair. Global alignment is the
/// library's: bottom-right on the global (n_q, n_k). classify_block() lets attention() skip the
/// tiles it hides and check no pair on the tiles it shows entirely; both ends of each query's
/// visible interval grow with the position and positions grow with the local index, so the
/// first and last rows and columns of a tile bound it.
struct GlobalMask {
  ShardPositions queries;
  ShardPositions keys;
  Index offset = 0;  ///< global n_k − n_q
  bool causal = false;
  Index window_left = -1;
  Index window_right = -1;
  const Index* key_lengths = nullptr;  ///< [batch], global

  bool visible(Index b, Index i, Index j) const {  // i: aligned query position, j: key position
    return (key_lengths == nullptr || j < key_lengths[b]) && (!causal || j <= i) &&
           (window_left < 0 || j >= i - window_left) && (window_right < 0 || j <= i + window_right);
  }
  bool operator()(Index b, Index /*h*/, Index i, Index j) const {
    return visible(b, queries[i] + offset, keys[j]);
  }
  BlockVisibility classify_block(Index b, Index /*h*/, Index q0, Index q_end, Index k0,
                                 Index k_end) const {
    if (q_end <= q0 || k_end <= k0) return BlockVisibility::Empty;
    const Index i_lo = queries[q0] + offset;
    const Index i_hi = queries[q_end - 1] + offset;
    const Index j_lo = keys[k0];
    const Index j_hi = keys[k_end - 1];
    const Index length =
        key_lengths != nullptr ? key_lengths[b] : std::numeric_limits<Index>::max();
    if (j_lo >= length || (causal && j_lo > i_hi) ||
        (window_left >= 0 && j_hi < i_lo - window_left) ||
        (window_right >= 0 && j_lo > i_hi + window_right)) {
      return BlockVisibility::Empty;
    }
    const bool full = j_hi < length && (!causal || j_hi <= i_lo) &&
                      (window_left < 0 || j_lo >= i_hi - window_left) &&
                      (window_right < 0 || j_hi <= i_lo + window_right);
    return full ? BlockVisibility::Full : BlockVisibility::Partial;
  }
  /// True when some pair of the whole (query shard, key shard) block is visible in some batch.
  bool any_visible(Index batch) const {
    for (Index b = 0; b < batch; ++b) {
      if (classify_block(b, 0, 0, queries.size(), 0, keys.size()) != BlockVisibility::Empty) {
        return true;
      }
    }
    return false;
  }
};

/// ALiBi on global positions: s − slope_h·|i + (n_k − n_q) − j|, with the library's rounding
/// (the slope rounded to T, then one multiply and one subtract), as a score_mod.
template <class T>
struct GlobalAlibi {
  ShardPositions queries;
  ShardPositions keys;
  Index offset = 0;
  const double* slopes = nullptr;  ///< [query heads]

  T operator()(T s, Index /*b*/, Index h, Index i, Index j) const {
    const Index distance = queries[i] + offset - keys[j];
    return s - static_cast<T>(slopes[h]) * static_cast<T>(distance < 0 ? -distance : distance);
  }
};

// --- the one place that calls into the library (adapt here when its API changes) -------------

/// attention() of the local queries against one K/V shard, masks on global positions; lse is the
/// block's [B, H, n_q_r] (required here: the merge needs it). T: the compute type of q and the
/// block's out (float for 16-bit storage: the partial results merge unrounded); KS: the shard's
/// storage (T, or a 16-bit format under a float q, which attention() reads in place).
template <class T, class ScoreMod, class KS>
void local_attention(TensorView<const T> q, TensorView<const KS> k, TensorView<const KS> v,
                     TensorView<T> out, const AttentionOptions& options, Span<accumulator_t<T>> lse,
                     const GlobalMask& mask, const ScoreMod& score_mod) {
  blockattn::attention(q, k, v, out, options, lse, mask, score_mod);
}

/// attention_backward() of the local queries against one K/V shard (global out, lse, dout).
/// ALiBi on global positions is a score_mod, which the public attention_backward() rejects (a
/// user's has no known derivative): ALiBi's is 1, so this calls the kernel behind it, after
/// local_validate_backward() has run attention_backward()'s checks.
template <class T, class ScoreMod>
void local_backward(const TensorBackwardInputs<T>& in, const TensorGradients<T>& grads,
                    const AttentionOptions& options, const GlobalMask& mask,
                    const ScoreMod& score_mod) {
  if constexpr (std::is_same_v<ScoreMod, NoScoreMod>) {
    blockattn::attention_backward(in, grads, options, mask);
  } else {
    blockattn::detail::attention_backward_kernel<T>(
        in.q, in.k, in.v, in.out, blockattn::detail::data_or_null(in.lse), in.dout, grads.dq,
        grads.dk, grads.dv, options, mask, score_mod);
  }
}

/// attention()'s argument checks on this rank's shards (throws std::invalid_argument); KS: the
/// K/V storage (T, or a 16-bit format under a float q).
template <class T, class KS>
void local_validate(const char* function, const TensorView<const T>& q,
                    const TensorView<const KS>& k, const TensorView<const KS>& v,
                    const TensorView<T>& out, const AttentionOptions& options,
                    Span<accumulator_t<T>> lse) {
  blockattn::detail::validate_attention<T>(function, q, k, v, out, options, lse);
}

/// attention_backward()'s argument checks on this rank's shards (throws std::invalid_argument).
template <class T>
void local_validate_backward(const char* function, const TensorBackwardInputs<T>& in,
                             const TensorGradients<T>& grads, const AttentionOptions& options) {
  blockattn::detail::validate_attention_backward<T>(function, in.q, in.k, in.v, in.out, in.lse,
                                                    in.dout, grads.dq, grads.dk, grads.dv, options);
}

/// The optional arrays of AttentionOptions that the ring reads on global positions (key_lengths
/// [B], alibi_slopes [H]) checked for length: the local checks no longer see them (they move into
/// the global-position functors), and make_plan() reads batch key lengths.
inline void validate_global_arrays(const char* function, const AttentionOptions& options,
                                   Index batch, Index q_heads) {
  blockattn::detail::require_span(function, "options.key_lengths", options.key_lengths,
                                  "the batch size", batch, "one key length per sequence",
                                  /*required=*/false);
  blockattn::detail::require_span(function, "options.alibi_slopes", options.alibi_slopes,
                                  "the number of query heads", q_heads, "one slope per query head",
                                  /*required=*/false);
}

/// (out, lse) ⊕= (block_out, block_lse) for every (batch, head) and row: the library's exact
/// N-way merge with two parts, the running state first (out is exactly its out, so it starts the
/// merge in place).
template <class T>
void merge_into(TensorView<T> out, Span<accumulator_t<T>> lse, TensorView<const T> block_out,
                Span<const accumulator_t<T>> block_lse, int threads) {
  const std::array<TensorAttentionState<T>, 2> parts = {
      TensorAttentionState<T>{TensorView<const T>(out), Span<const accumulator_t<T>>(lse)},
      TensorAttentionState<T>{block_out, block_lse}};
  blockattn::merge_attention_states(parts, out, lse, threads);
}

/// The argument checks of the local call, as a message ("" when they pass).
template <class Check>
std::string local_error(const Check& check) {
  try {
    check();
  } catch (const std::invalid_argument& error) {
    return error.what();
  }
  return {};
}

// --- the plan: sizes exchanged and checked collectively before the first ring message ---------

/// What every rank tells every other rank before the ring starts.
enum Field : int {
  kElementType,
  kKeyElementType,
  kBatch,
  kQueryHeads,
  kKeyHeads,
  kDim,
  kValueDim,
  kQuerySeq,
  kKeySeq,
  kLayout,
  kCausal,
  kWindowLeft,
  kWindowRight,
  kScaleBits,
  kSoftcapBits,
  kKeyLengthsHash,
  kAlibiHash,
  kSinksHash,
  kLocalError,
  kFieldCount
};

/// The element type as a number that differs between every pair of types the ring takes
/// (bfloat16 and half have the same size, so sizeof cannot tell them apart): 4 float, 8 double,
/// 16 bfloat16, 17 half.
template <class T>
constexpr std::int64_t element_code() {
  if constexpr (std::is_same_v<T, Eigen::bfloat16>) return 16;
  if constexpr (std::is_same_v<T, Eigen::half>) return 17;
  return static_cast<std::int64_t>(sizeof(T));
}

inline std::int64_t bits_of(double x) {
  std::int64_t bits = 0;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

/// A cheap fingerprint of an array that must be the same on every rank (FNV-1a over the bytes of
/// its first `count` elements, fewer when it is shorter: a short array is reported by the local
/// checks); 0 for "not given".
template <class U>
std::int64_t fingerprint(Span<const U> array, Index count) {
  if (array.empty()) return 0;
  std::uint64_t h = 1469598103934665603ULL;
  const auto* bytes = reinterpret_cast<const unsigned char*>(array.data());
  const Index n = std::min(count, array.size());
  for (std::size_t i = 0; i < static_cast<std::size_t>(n) * sizeof(U); ++i) {
    h = (h ^ bytes[i]) * 1099511628211ULL;
  }
  return static_cast<std::int64_t>(h | 1);
}

/// Every rank throws rank `root`'s message (`error` on root) as std::invalid_argument.
[[noreturn]] inline void throw_from_rank(const RingComm& comm, int root, std::string message) {
  auto length = static_cast<std::int64_t>(message.size());
  comm.check(MPI_Bcast(&length, 1, MPI_INT64_T, root, comm.get()), "MPI_Bcast");
  message.resize(static_cast<std::size_t>(length));
  Requests::for_each_piece(length, [&](Index offset, int piece) {
    comm.check(MPI_Bcast(message.data() + offset, piece, MPI_CHAR, root, comm.get()), "MPI_Bcast");
  });
  blockattn::detail::throw_invalid_argument(
      blockattn::detail::concat(message, " (on rank ", root, " of ", comm.size(), ")"));
}

/// Collective: when some rank's `error` is not empty, every rank throws the lowest such rank's.
inline void agree_on_errors(const RingComm& comm, const std::string& error) {
  const int mine = error.empty() ? comm.size() : comm.rank();
  int first = comm.size();
  comm.check(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm.get()), "MPI_Allreduce");
  if (first < comm.size()) throw_from_rank(comm, first, error);
}

/// Who holds what, known identically on every rank once make_plan() returns.
struct RingPlan {
  int ranks = 1;
  int rank = 0;
  std::vector<ShardPositions> queries;  ///< [ranks]
  std::vector<ShardPositions> keys;     ///< [ranks]
  Index n_q = 0;
  Index n_k = 0;
  int steps = 1;  ///< ring steps actually run (the last ones are dropped when no rank needs them)
  std::vector<char> visible;  ///< [ranks · ranks]: rank r's queries see rank o's keys

  bool sees(int r, int owner) const {
    return visible[static_cast<std::size_t>(r) * static_cast<std::size_t>(ranks) +
                   static_cast<std::size_t>(owner)] != 0;
  }
  int owner_at(int r, int step) const { return (r - step % ranks + ranks) % ranks; }
  GlobalMask mask(const AttentionOptions& options, int r, int owner) const {
    GlobalMask m;
    m.queries = queries[static_cast<std::size_t>(r)];
    m.keys = keys[static_cast<std::size_t>(owner)];
    m.offset = n_k - n_q;
    m.causal = options.causal;
    m.window_left = options.window_left;
    m.window_right = options.window_right;
    m.key_lengths = blockattn::detail::data_or_null(options.key_lengths);
    return m;
  }
};

/// Exchanges every rank's sizes and options, checks them collectively and returns the plan.
/// Every rank throws the same std::invalid_argument (and none is left waiting) when any rank's
/// own checks failed (`error`, the lowest such rank's message is shown) or the ranks disagree.
inline RingPlan make_plan(const RingComm& comm, const char* function,
                          const std::array<std::int64_t, kFieldCount>& mine,
                          const std::string& error, const AttentionOptions& options,
                          const RingOptions& ring) {
  const int ranks = comm.size();
  std::vector<std::int64_t> all(static_cast<std::size_t>(ranks) * kFieldCount);
  comm.check(MPI_Allgather(mine.data(), kFieldCount, MPI_INT64_T, all.data(), kFieldCount,
                           MPI_INT64_T, comm.get()),
             "MPI_Allgather");
  const auto at = [&](int r, Field f) {
    return all[static_cast<std::size_t>(r) * kFieldCount + static_cast<std::size_t>(f)];
  };
  for (int r = 0; r < ranks; ++r) {
    if (at(r, kLocalError) != 0) throw_from_rank(comm, r, error);
  }
  const char* const names[] = {"the element type",
                               "the key/value element type",
                               "batch",
                               "q.heads",
                               "k.heads",
                               "q.dim",
                               "v.dim",
                               "",
                               "",
                               "ring.layout",
                               "options.causal",
                               "options.window_left",
                               "options.window_right",
                               "options.scale",
                               "options.softcap",
                               "options.key_lengths",
                               "options.alibi_slopes",
                               "options.sinks"};
  for (int f = kElementType; f <= kSinksHash; ++f) {
    if (f == kQuerySeq || f == kKeySeq) continue;
    for (int r = 1; r < ranks; ++r) {
      require(at(r, Field(f)) == at(0, Field(f)), function, names[f], " differs between rank 0 (",
              at(0, Field(f)), ") and rank ", r, " (", at(r, Field(f)),
              "); every rank must pass the same shapes, options and element type");
    }
  }
  RingPlan plan;
  plan.ranks = ranks;
  plan.rank = comm.rank();
  for (int r = 0; r < ranks; ++r) {
    plan.n_q += at(r, kQuerySeq);
    plan.n_k += at(r, kKeySeq);
  }
  Index q_start = 0;
  Index k_start = 0;
  for (int r = 0; r < ranks; ++r) {
    ShardPositions qp;
    ShardPositions kp;
    if (ring.layout == RingLayout::Contiguous) {
      qp.start[0] = q_start;
      qp.count[0] = at(r, kQuerySeq);
      kp.start[0] = k_start;
      kp.count[0] = at(r, kKeySeq);
      q_start += qp.count[0];
      k_start += kp.count[0];
    } else {
      qp = shard_positions(ring.layout, plan.n_q, ranks, r);
      kp = shard_positions(ring.layout, plan.n_k, ranks, r);
      require(qp.size() == at(r, kQuerySeq) && kp.size() == at(r, kKeySeq), function, "rank ", r,
              " holds ", at(r, kQuerySeq), " queries and ", at(r, kKeySeq),
              " keys but its share of the layout is ", qp.size(), " and ", kp.size(),
              " (n_q = ", plan.n_q, ", n_k = ", plan.n_k,
              "; lay the sequence out with shard_sequence())");
    }
    plan.queries.push_back(qp);
    plan.keys.push_back(kp);
  }
  const Index batch = at(0, kBatch);
  if (!options.key_lengths.empty()) {
    for (Index b = 0; b < batch; ++b) {
      require(options.key_lengths[b] >= 0 && options.key_lengths[b] <= plan.n_k, function,
              "options.key_lengths[", b, "] is ", options.key_lengths[b], " but must be in [0, ",
              plan.n_k, "] (n_k, the global keys' sequence length)");
    }
  }
  plan.visible.assign(static_cast<std::size_t>(ranks) * static_cast<std::size_t>(ranks), 0);
  int last_step = 0;
  for (int r = 0; r < ranks; ++r) {
    for (int s = 0; s < ranks; ++s) {
      const int owner = plan.owner_at(r, s);
      if (plan.mask(options, r, owner).any_visible(batch)) {
        plan.visible[static_cast<std::size_t>(r) * static_cast<std::size_t>(ranks) +
                     static_cast<std::size_t>(owner)] = 1;
        last_step = std::max(last_step, s);
      }
    }
  }
  plan.steps = last_step + 1;
  return plan;
}

template <class T, class KS>
std::array<std::int64_t, kFieldCount> describe(const TensorView<const T>& q,
                                               const TensorView<const KS>& k,
                                               const TensorView<const KS>& v,
                                               const AttentionOptions& options,
                                               const RingOptions& ring, const std::string& error) {
  std::array<std::int64_t, kFieldCount> f{};
  f[kElementType] = element_code<T>();
  f[kKeyElementType] = element_code<KS>();
  f[kBatch] = q.batch;
  f[kQueryHeads] = q.heads;
  f[kKeyHeads] = k.heads;
  f[kDim] = q.dim;
  f[kValueDim] = v.dim;
  f[kQuerySeq] = q.seq;
  f[kKeySeq] = k.seq;
  f[kLayout] = static_cast<std::int64_t>(ring.layout);
  f[kCausal] = options.causal ? 1 : 0;
  f[kWindowLeft] = options.window_left;
  f[kWindowRight] = options.window_right;
  f[kScaleBits] = bits_of(options.scale);
  f[kSoftcapBits] = bits_of(options.softcap);
  f[kKeyLengthsHash] = fingerprint(options.key_lengths, q.batch);
  f[kAlibiHash] = fingerprint(options.alibi_slopes, q.heads);
  f[kSinksHash] = fingerprint(options.sinks, q.heads);
  f[kLocalError] = error.empty() ? 0 : 1;
  return f;
}

/// The options of every local call: the positional masks and ALiBi move into the global-position
/// functors; the sinks leave too (a local call would fold them into every step's partial result:
/// the ring starts its running state at the sink instead, so it joins each denominator once);
/// scale, soft-capping, chunks and threads pass through, and every step's attention() runs in the
/// caller's options.workspace or else in `own` (one workspace for the whole ring).
inline AttentionOptions local_options(const AttentionOptions& options, Workspace* own = nullptr) {
  AttentionOptions local = options;
  local.causal = false;
  local.window_left = -1;
  local.window_right = -1;
  local.key_lengths = {};
  local.alibi_slopes = {};
  local.sinks = {};
  if (local.workspace == nullptr) local.workspace = own;
  return local;
}

/// Every ring call's checks, collectively, then its plan: block_sparse is rejected, the global
/// arrays' lengths checked, and check_local(checked) runs the library's own checks of this rank's
/// shards with `checked` = `local` plus ALiBi's slopes and the sinks (checked for length and value
/// there, not moved). Any rank's failure makes every rank throw it (make_plan()).
template <class T, class KS, class CheckLocal>
RingPlan checked_plan(const RingComm& comm, const char* function, const TensorView<const T>& q,
                      const TensorView<const KS>& k, const TensorView<const KS>& v,
                      const AttentionOptions& options, const AttentionOptions& local,
                      const RingOptions& ring, const CheckLocal& check_local) {
  const std::string error = local_error([&] {
    require(options.block_sparse == nullptr, function,
            "options.block_sparse is not supported (its grid is on local positions); use a mask "
            "on global positions");
    validate_global_arrays(function, options, q.batch, q.heads);
    AttentionOptions checked = local;
    checked.alibi_slopes = options.alibi_slopes;
    checked.sinks = options.sinks;
    check_local(checked);
  });
  return make_plan(comm, function, describe<T, KS>(q, k, v, options, ring, error), error, options,
                   ring);
}

/// Copies a strided [batch, seq, heads, dim] view into contiguous BSHD storage at `to`: of the
/// same type, or of accumulator_t<S> from a 16-bit S (widened exactly, detail/convert.hpp).
template <class S, class D>
void pack(const TensorView<const S>& from, D* to) {
  for (Index b = 0; b < from.batch; ++b) {
    for (Index s = 0; s < from.seq; ++s) {
      for (Index h = 0; h < from.heads; ++h) {
        if constexpr (std::is_same_v<S, D>) {
          std::copy_n(from.at(b, s, h), from.dim, to);
        } else {
          blockattn::detail::widen(from.at(b, s, h), from.dim, to);
        }
        to += from.dim;
      }
    }
  }
}

/// Copies contiguous BSHD storage at `from` into a strided view: of the same type, or from
/// accumulator_t<S> into a 16-bit S (each element rounded once, detail/convert.hpp).
template <class S, class F>
void unpack(const F* from, const TensorView<S>& to) {
  for (Index b = 0; b < to.batch; ++b) {
    for (Index s = 0; s < to.seq; ++s) {
      for (Index h = 0; h < to.heads; ++h) {
        if constexpr (std::is_same_v<S, F>) {
          std::copy_n(from, to.dim, to.at(b, s, h));
        } else {
          blockattn::detail::narrow(from, to.dim, to.at(b, s, h));
        }
        from += to.dim;
      }
    }
  }
}

/// sum[e] += part[e] for e < count.
template <class T>
void add_to(T* sum, const T* part, Index count) {
  for (Index e = 0; e < count; ++e) sum[e] += part[e];
}

/// One K/V shard (and later its gradients) in one contiguous buffer of shard_size(max_seq)
/// elements (not owned): keys [batch, seq, heads, d], then values [batch, seq, heads, d_v].
template <class T>
struct ShardBuffer {
  T* data = nullptr;
  Index batch = 0;
  Index heads = 0;
  Index d = 0;
  Index d_v = 0;

  Index count(Index seq) const { return batch * seq * heads * (d + d_v); }
  TensorView<T> keys(Index seq) { return make_tensor_view(data, batch, seq, heads, d); }
  TensorView<T> values(Index seq) {
    return make_tensor_view(data + batch * seq * heads * d, batch, seq, heads, d_v);
  }
};

/// The ring's own arrays of one call, laid out in one Workspace reservation, each on a 64-byte
/// line: take() every array first, then reserve() once and at() each. Contents unspecified (the
/// ring writes every element before reading it).
class BufferLayout {
 public:
  /// Reserves `count` elements of U; returns their byte offset.
  template <class U>
  std::size_t take(Index count) {
    const std::size_t offset = bytes_;
    bytes_ += (static_cast<std::size_t>(count) * sizeof(U) + kLine - 1) / kLine * kLine;
    return offset;
  }
  /// The storage of every array taken, from `storage` (which grows to fit).
  unsigned char* reserve(Workspace& storage) const {
    return static_cast<unsigned char*>(storage.reserve(bytes_));
  }
  /// The array at byte `offset` of reserve()'s storage `base`.
  template <class U>
  static U* at(unsigned char* base, std::size_t offset) {
    return reinterpret_cast<U*>(base + offset);
  }

 private:
  static constexpr std::size_t kLine = 64;
  std::size_t bytes_ = 0;
};

/// The RingWorkspace of one call: the caller's (ring.workspace) or the call's own.
class RingScratch {
 public:
  explicit RingScratch(RingWorkspace* given) : workspace_(given != nullptr ? given : &own_) {}
  RingScratch(const RingScratch&) = delete;
  RingScratch& operator=(const RingScratch&) = delete;
  Workspace& buffers() { return workspace_->buffers; }
  Workspace& steps() { return workspace_->steps; }

 private:
  RingWorkspace own_;
  RingWorkspace* workspace_;
};

}  // namespace detail

/// Ring attention: the exact attention() of the global sequence, sharded across the ranks of
/// `comm` (Liu, Zaharia & Abbeel 2023). Each rank passes its shard of q [B, n_q_r, H, d], k
/// [B, n_k_r, H_kv, d] and v [B, n_k_r, H_kv, d_v] and receives out [B, n_q_r, H, d_v] and
/// (optional, empty = not wanted) lse [B, H, n_q_r] contiguous for its own queries. Element
/// types as attention(), deduced from the views (q, k, v TensorView<T> or TensorView<const T>, out
/// TensorView<T>): float, double, Eigen::bfloat16 or Eigen::half for all four, or float q and out
/// over a bfloat16 or half K/V; lse is accumulator_t<T>. 16-bit storage: the K/V shards travel in
/// it (half float's bytes per message), a 16-bit q is widened once, every step computes in float
/// and the partial results merge in float; a 16-bit out is rounded once at the end, so the result
/// is bitwise round(the float ring on the widened inputs). GQA as in attention(). Every option of
/// AttentionOptions applies on global positions (causal and windows bottom-right aligned on the
/// global n_q, n_k; key_lengths [B], alibi_slopes [H] and sinks [H] global and the same on every
/// rank; softcap, scale), except block_sparse (rejected); a sink joins each query's denominator
/// once (the running state starts as the sink's), and lse includes it, as in attention().
/// options.workspace, when given, is the scratch
/// of every step's attention() on this rank, and ring.workspace holds the ring's own buffers
/// (and that scratch when options.workspace is not given): repeated calls of one shape with
/// the same RingWorkspace allocate nothing. The shards are laid out as ring.layout says:
/// Contiguous takes any lengths in rank order (uneven, empty); ZigZag and Striped take exactly
/// what shard_sequence() gives.
/// Cost per rank: the attention of its queries against the K/V shards it sees (shards a mask
/// hides are skipped; ring steps that no rank needs are not run, e.g. a causal window shorter
/// than a shard needs one neighbour), ≤ P − 1 messages of one K/V shard each (split into pieces
/// of at most INT_MAX elements), overlapped with that work. Extra memory: two K/V shard buffers and
/// one block of out, O(B·(n_k_r + n_q_r)·H·d); 16-bit storage adds q and the running out in float,
/// B·n_q_r·H·(d + d_v) floats. Collective: every rank of comm must call it. Shapes,
/// options or element types that differ between ranks, or a rank whose arguments fail attention()'s
/// checks (a too-short lse, key_lengths, alibi_slopes or sinks included, named with both sizes):
/// every rank throws the same std::invalid_argument before any ring message. An MPI error throws
/// std::runtime_error with MPI's error string. The merge order is fixed (ring step order), so
/// results are bitwise reproducible for a given P, layout and thread count, and the same bits for
/// any thread count.
template <class QT, class KT, class VT, class OT>
void ring_attention(MPI_Comm comm, TensorView<QT> q_, TensorView<KT> k_, TensorView<VT> v_,
                    TensorView<OT> out, const AttentionOptions& options = {},
                    Span<accumulator_t<std::remove_const_t<QT>>> lse = {},
                    const RingOptions& ring = {}) {
  using T = std::remove_const_t<QT>;   // q and out
  using KS = std::remove_const_t<KT>;  // k and v: T, or a 16-bit cache under a float q
  static_assert(
      std::is_same_v<T, float> || std::is_same_v<T, double> || blockattn::detail::kIs16BitFloat<T>,
      "blockattn: ring_attention runs on float, double, bfloat16 and half");
  blockattn::detail::check_attention_types<T, KS, std::remove_const_t<VT>,
                                           std::remove_const_t<OT>>();
  static_assert(!std::is_const_v<OT>, "blockattn: out must be a writable TensorView<T>");
  using A = accumulator_t<T>;  // the compute type: q, every block's out and the running out
  constexpr bool kWiden = !std::is_same_v<T, A>;
  const TensorView<const T> q(q_);
  const TensorView<const KS> k(k_);
  const TensorView<const KS> v(v_);
  const char* function = "ring_attention";
  detail::RingComm c(comm, function);
  detail::RingScratch scratch(ring.workspace);
  const AttentionOptions local = detail::local_options(options, &scratch.steps());
  const detail::RingPlan plan = detail::checked_plan<T, KS>(
      c, function, q, k, v, options, local, ring, [&](const AttentionOptions& checked) {
        detail::local_validate<T, KS>(function, q, k, v, out, checked, lse);
      });

  const Index batch = q.batch;
  const Index heads = q.heads;
  const Index n_q = q.seq;
  Index max_k = 0;
  for (const ShardPositions& p : plan.keys) max_k = std::max(max_k, p.size());
  detail::ShardBuffer<KS> shards[2] = {{nullptr, batch, k.heads, k.dim, v.dim},
                                       {nullptr, batch, k.heads, k.dim, v.dim}};
  const Index rows = batch * heads * n_q;
  const Index out_size = batch * n_q * heads * v.dim;
  detail::BufferLayout layout;
  const std::size_t shard_at[2] = {layout.take<KS>(shards[0].count(max_k)),
                                   layout.take<KS>(shards[1].count(max_k))};
  const std::size_t block_at = layout.take<A>(out_size);
  const std::size_t lse_run_at = layout.take<A>(rows);
  const std::size_t block_lse_at = layout.take<A>(rows);
  // 16-bit storage: q widened and the running out, in float (else q and out themselves).
  const std::size_t wide_q_at = layout.take<A>(kWiden ? batch * n_q * heads * q.dim : 0);
  const std::size_t run_at = layout.take<A>(kWiden ? out_size : 0);
  unsigned char* const base = layout.reserve(scratch.buffers());
  for (int i = 0; i < 2; ++i) shards[i].data = layout.at<KS>(base, shard_at[i]);
  detail::pack(k, shards[0].data);
  detail::pack(v, shards[0].values(k.seq).data);
  TensorView<const A> q_compute;
  TensorView<A> run;
  if constexpr (kWiden) {
    A* const wide_q = layout.at<A>(base, wide_q_at);
    detail::pack(q, wide_q);
    q_compute = make_tensor_view(static_cast<const A*>(wide_q), batch, n_q, heads, q.dim);
    run = make_tensor_view(layout.at<A>(base, run_at), batch, n_q, heads, v.dim);
  } else {
    q_compute = q;
    run = out;
  }
  // The running result: run and lse_run, starting as the merge's identity (0, −inf) — or, with
  // sinks, as the sink's own state (0, sinks[h]): a denominator term without a value, merged
  // once like any other part (attention() folds it in after its keys: other roundings only).
  const Span<A> lse_run(layout.at<A>(base, lse_run_at), rows);
  for (Index b = 0; b < batch; ++b) {
    for (Index h = 0; h < heads; ++h) {
      const A start = options.sinks.empty() ? -std::numeric_limits<A>::infinity()
                                            : static_cast<A>(options.sinks[h]);
      std::fill_n(lse_run.data() + (b * heads + h) * n_q, n_q, start);
      blockattn::detail::mutable_head_slice(run, b, h).setZero();
    }
  }
  const Span<A> block_lse(layout.at<A>(base, block_lse_at), rows);
  const TensorView<A> block =
      make_tensor_view(layout.at<A>(base, block_at), batch, n_q, heads, v.dim);

  for (int s = 0; s < plan.steps; ++s) {
    detail::ShardBuffer<KS>& hand = shards[s % 2];
    detail::ShardBuffer<KS>& next = shards[(s + 1) % 2];
    const int owner = plan.owner_at(c.rank(), s);
    const Index n_k = plan.keys[static_cast<std::size_t>(owner)].size();
    detail::Requests requests(c);
    if (s + 1 < plan.steps) {  // pass the shard in hand on while computing with it
      const Index next_n_k =
          plan.keys[static_cast<std::size_t>(plan.owner_at(c.rank(), s + 1))].size();
      requests.receive(next.data, next.count(next_n_k), c.left(), detail::kTagKeysValues);
      requests.send(hand.data, hand.count(n_k), c.right(), detail::kTagKeysValues);
    }
    if (plan.sees(c.rank(), owner) && n_q > 0) {
      const detail::GlobalMask mask = plan.mask(options, c.rank(), owner);
      const TensorView<const KS> keys = hand.keys(n_k);
      const TensorView<const KS> values = hand.values(n_k);
      if (!options.alibi_slopes.empty()) {
        const detail::GlobalAlibi<A> alibi{mask.queries, mask.keys, mask.offset,
                                           options.alibi_slopes.data()};
        detail::local_attention<A>(q_compute, keys, values, block, local, block_lse, mask, alibi);
      } else {
        detail::local_attention<A>(q_compute, keys, values, block, local, block_lse, mask,
                                   NoScoreMod{});
      }
      detail::merge_into<A>(run, lse_run, block, Span<const A>(block_lse), options.threads);
    }
    requests.wait_all();
  }
  if constexpr (kWiden) detail::unpack<T>(run.data, out);
  if (!lse.empty()) std::copy_n(lse_run.data(), rows, lse.data());
}

/// Gradients of ring_attention(), sharded the same way (the paper's backward): given each rank's
/// q, k, v shards, its out and lse from ring_attention() and dout = ∂L/∂out for its queries,
/// writes dq for its queries and dk, dv for its own keys. The K/V shards travel around the ring
/// again; each rank adds its queries' contribution (attention_backward() of its queries against
/// the shard in hand, with the global lse, so the probabilities are the global ones) to the dK,
/// dV that travel with the shard, and after the last step they return to their owner. dQ stays
/// home and is summed in ring order. Accumulation is in accumulator_t<T> (float for float and the
/// 16-bit formats, double for double): the dK, dV that travel and dQ's sum stay unrounded until
/// the end, where each gradient is rounded once into a 16-bit T; the K/V shards travel in T.
/// Options as ring_attention(): causal, windows, key lengths, ALiBi (on global positions),
/// soft-capping, sinks (they live in lse, as for attention_backward(); no sink gradient) and GQA;
/// block_sparse is rejected.
/// Arguments by name, as attention_backward(): TensorBackwardInputs<T> (this rank's q, k, v, out,
/// lse, dout) and TensorGradients<T> (its dq, dk, dv); T float, double, Eigen::bfloat16 or
/// Eigen::half (deduced from them). 16-bit storage computes each step in float on q, out, dout
/// (widened once) and the shard in hand (widened per step): bitwise round(the float ring on the
/// widened inputs).
/// Shapes: those of attention_backward() per shard; lse [B, H, n_q_r] (ring_attention()'s,
/// required: empty or too short throws, naming it and both sizes).
/// Cost per rank: 2.5× the forward's attention and twice its messages (K/V out, dK/dV with
/// them; the dK/dV message of step s overlaps step s + 1). Extra memory O(B·(n_k_r·H_kv·(d +
/// d_v)·6 + n_q_r·H·d)) — for 16-bit storage the gradient buffers in float, plus one widened
/// shard and q, out, dout in float — and every step's attention_backward() scratch; both reused
/// from options.workspace / ring.workspace as in ring_attention(). Collective, validated like
/// ring_attention(). Deterministic: the sums run in ring order whatever the message timing.
template <class T>
void ring_attention_backward(MPI_Comm comm, const TensorBackwardInputs<T>& in,
                             const TensorGradients<T>& grads, const AttentionOptions& options = {},
                             const RingOptions& ring = {}) {
  static_assert(
      std::is_same_v<T, float> || std::is_same_v<T, double> || blockattn::detail::kIs16BitFloat<T>,
      "blockattn: ring_attention_backward runs on float, double, bfloat16 and half");
  using A = accumulator_t<T>;  // the compute type: every step's inputs and all gradient sums
  constexpr bool kWiden = !std::is_same_v<T, A>;
  const TensorView<const T>& q = in.q;
  const TensorView<const T>& k = in.k;
  const TensorView<const T>& v = in.v;
  const char* function = "ring_attention_backward";
  detail::RingComm c(comm, function);
  detail::RingScratch scratch(ring.workspace);
  const AttentionOptions local = detail::local_options(options, &scratch.steps());
  const detail::RingPlan plan = detail::checked_plan<T>(
      c, function, q, k, v, options, local, ring, [&](const AttentionOptions& checked) {
        detail::local_validate_backward<T>(function, in, grads, checked);
      });

  const Index batch = q.batch;
  const Index n_q = q.seq;
  Index max_k = 0;
  for (const ShardPositions& p : plan.keys) max_k = std::max(max_k, p.size());
  const Index own_k = k.seq;
  const detail::ShardBuffer<T> shard{nullptr, batch, k.heads, k.dim, v.dim};
  const detail::ShardBuffer<A> grad_shard{nullptr, batch, k.heads, k.dim, v.dim};
  detail::ShardBuffer<T> shards[2] = {shard, shard};             // K, V in hand / arriving
  detail::ShardBuffer<A> carried[2] = {grad_shard, grad_shard};  // dK, dV travelling with them
  detail::ShardBuffer<A> block_grad = grad_shard;                // this step's dK, dV
  detail::ShardBuffer<A> returned = grad_shard;                  // this rank's dK, dV, back home
  detail::ShardBuffer<A> wide = grad_shard;  // 16-bit storage: the K, V in hand, widened
  detail::ShardBuffer<A>* const grad_parts[] = {&carried[0], &carried[1], &block_grad};
  const Index dq_size = batch * n_q * q.heads * q.dim;
  const Index out_size = batch * n_q * q.heads * in.out.dim;
  detail::BufferLayout layout;
  std::size_t shard_at[2];
  for (int i = 0; i < 2; ++i) shard_at[i] = layout.take<T>(shard.count(max_k));
  std::size_t grad_at[3];
  for (int i = 0; i < 3; ++i) grad_at[i] = layout.take<A>(shard.count(max_k));
  const std::size_t returned_at = layout.take<A>(shard.count(own_k));
  const std::size_t dq_sum_at = layout.take<A>(dq_size);
  const std::size_t dq_block_at = layout.take<A>(dq_size);
  const std::size_t wide_at = layout.take<A>(kWiden ? shard.count(max_k) : 0);
  const std::size_t wide_q_at = layout.take<A>(kWiden ? dq_size : 0);
  const std::size_t wide_out_at = layout.take<A>(kWiden ? out_size : 0);
  const std::size_t wide_dout_at = layout.take<A>(kWiden ? out_size : 0);
  unsigned char* const base = layout.reserve(scratch.buffers());
  for (int i = 0; i < 2; ++i) shards[i].data = layout.at<T>(base, shard_at[i]);
  for (int i = 0; i < 3; ++i) grad_parts[i]->data = layout.at<A>(base, grad_at[i]);
  returned.data = layout.at<A>(base, returned_at);
  wide.data = layout.at<A>(base, wide_at);
  A* const dq_sum = layout.at<A>(base, dq_sum_at);
  A* const dq_block = layout.at<A>(base, dq_block_at);
  std::fill_n(dq_sum, dq_size, A(0));
  detail::pack(k, shards[0].data);
  detail::pack(v, shards[0].values(k.seq).data);
  // Every step's q, out, dout in the compute type: the caller's own, or widened once.
  TensorBackwardInputs<A> step;
  step.lse = in.lse;
  if constexpr (kWiden) {
    const auto widened = [&](const TensorView<const T>& x, std::size_t at) {
      A* const to = layout.at<A>(base, at);
      detail::pack(x, to);
      return make_tensor_view(static_cast<const A*>(to), x.batch, x.seq, x.heads, x.dim);
    };
    step.q = widened(q, wide_q_at);
    step.out = widened(in.out, wide_out_at);
    step.dout = widened(in.dout, wide_dout_at);
  } else {
    step.q = q;
    step.out = in.out;
    step.dout = in.dout;
  }
  detail::Requests grad_sends[2] = {detail::Requests(c), detail::Requests(c)};

  const int last = plan.steps - 1;
  for (int s = 0; s <= last; ++s) {
    detail::ShardBuffer<T>& hand = shards[s % 2];
    detail::ShardBuffer<T>& next = shards[(s + 1) % 2];
    detail::ShardBuffer<A>& grad = carried[s % 2];
    const int owner = plan.owner_at(c.rank(), s);
    const Index n_k = plan.keys[static_cast<std::size_t>(owner)].size();
    detail::Requests kv(c);
    detail::Requests grad_in(c);
    if (s < last) {
      const Index next_n_k =
          plan.keys[static_cast<std::size_t>(plan.owner_at(c.rank(), s + 1))].size();
      kv.receive(next.data, next.count(next_n_k), c.left(), detail::kTagKeysValues);
      kv.send(hand.data, hand.count(n_k), c.right(), detail::kTagKeysValues);
    }
    if (s > 0) {  // the gradients so far of the shard in hand, sent by the left neighbour
      grad_sends[s % 2].wait_all();  // this buffer's previous send (step s − 2) is done
      grad_in.receive(grad.data, grad.count(n_k), c.left(), detail::kTagGradients);
    } else {
      std::fill_n(grad.data, grad.count(n_k), A(0));
    }
    const bool computed = plan.sees(c.rank(), owner) && n_q > 0;
    if (computed) {
      if constexpr (kWiden) {  // the shard in hand, widened: K and V are contiguous in it
        blockattn::detail::widen(hand.data, hand.count(n_k), wide.data);
        step.k = wide.keys(n_k);
        step.v = wide.values(n_k);
      } else {
        step.k = hand.keys(n_k);
        step.v = hand.values(n_k);
      }
      TensorGradients<A> step_grads;
      step_grads.dq = make_tensor_view(dq_block, batch, n_q, q.heads, q.dim);
      step_grads.dk = block_grad.keys(n_k);
      step_grads.dv = block_grad.values(n_k);
      const detail::GlobalMask mask = plan.mask(options, c.rank(), owner);
      if (!options.alibi_slopes.empty()) {
        const detail::GlobalAlibi<A> alibi{mask.queries, mask.keys, mask.offset,
                                           options.alibi_slopes.data()};
        detail::local_backward<A>(step, step_grads, local, mask, alibi);
      } else {
        detail::local_backward<A>(step, step_grads, local, mask, NoScoreMod{});
      }
      detail::add_to(dq_sum, dq_block, dq_size);
    }
    grad_in.wait_all();
    if (computed) {
      detail::add_to(grad.data, block_grad.data, grad.count(n_k));
    }
    if (s < last) {
      grad_sends[s % 2].send(grad.data, grad.count(n_k), c.right(), detail::kTagGradients);
    }
    kv.wait_all();
  }
  // The shard in hand after the last step belongs to rank (r − last): its gradients go home.
  const int held = plan.owner_at(c.rank(), last);
  detail::ShardBuffer<A>& final_grad = carried[last % 2];
  detail::ShardBuffer<A>* mine = &final_grad;
  if (last > 0) {
    detail::Requests home(c);
    home.receive(returned.data, returned.count(own_k), (c.rank() + last) % c.size(),
                 detail::kTagReturn);
    home.send(final_grad.data, final_grad.count(plan.keys[static_cast<std::size_t>(held)].size()),
              held, detail::kTagReturn);
    home.wait_all();
    mine = &returned;
  }
  grad_sends[0].wait_all();
  grad_sends[1].wait_all();
  detail::unpack<T>(mine->keys(own_k).data, grads.dk);
  detail::unpack<T>(mine->values(own_k).data, grads.dv);
  detail::unpack<T>(dq_sum, grads.dq);
}

namespace detail {

/// The sharded layer on x, y of the compute type T (arguments valid, checked collectively): w is
/// TransformerBlockWeights<T>, or WidenedBlockWeights<T> for a 16-bit layer. y may be exactly x.
template <class T, class W>
void ring_block_layer(MPI_Comm comm, const W& w, const ConstMatrixView<T>& x, MatrixView<T>& y,
                      const BlockOptions& options, const RingOptions& ring) {
  const Index n = x.rows();
  const Index model = w.wq.rows();
  const Index heads = w.heads;
  const Index kv_heads = w.resolved_kv_heads();
  const Index head_dim = model / heads;
  const Index kv_dim = kv_heads * head_dim;
  const T eps = static_cast<T>(w.ln_eps);
  Matrix<T> normed(n, model);
  blockattn::detail::layer_norm_rows<T>(x, normed, w.ln1_gamma, w.ln1_beta, eps);
  Matrix<T> q = normed * w.wq;
  q.rowwise() += w.bq;
  Matrix<T> k = normed * w.wk;
  k.rowwise() += w.bk;
  Matrix<T> v = normed * w.wv;
  v.rowwise() += w.bv;
  Matrix<T> attn(n, model);
  AttentionOptions attention_options;
  attention_options.causal = options.causal;
  attention_options.key_chunk = options.key_block;
  attention_options.threads = options.threads;
  ring_attention(comm, TensorView<const T>(q.data(), 1, n, heads, head_dim, 0, model, head_dim),
                 TensorView<const T>(k.data(), 1, n, kv_heads, head_dim, 0, kv_dim, head_dim),
                 TensorView<const T>(v.data(), 1, n, kv_heads, head_dim, 0, kv_dim, head_dim),
                 TensorView<T>(attn.data(), 1, n, heads, head_dim, 0, model, head_dim),
                 attention_options, {}, ring);
  // h = x + attn·wo + bo for every token first: x is not read afterwards, so y may be x.
  Matrix<T>& h = q;
  h.noalias() = attn * w.wo;
  h += x;
  h.rowwise() += w.bo;
  // The FFN, token-local: query blocks × hidden-layer chunks, as transformer_block() does.
  const Index ffn = w.w1.cols();
  const Index block = std::max<Index>(
      1, std::min(n, options.query_block > 0 ? options.query_block
                                             : blockattn::detail::kDefaultQueryBlock));
  const Index ffn_chunk = std::min(
      ffn, options.ffn_chunk > 0 ? options.ffn_chunk : blockattn::detail::kDefaultFfnChunk);
  Matrix<T> hidden(block, ffn_chunk);
  for (Index q0 = 0; q0 < n; q0 += block) {
    const Index rows = std::min(block, n - q0);
    auto normed_blk = normed.middleRows(q0, rows);
    blockattn::detail::layer_norm_rows<T>(h.middleRows(q0, rows), normed_blk, w.ln2_gamma,
                                          w.ln2_beta, eps);
    auto y_blk = y.middleRows(q0, rows);
    blockattn::detail::ffn_rows<T>(w, normed_blk, h.middleRows(q0, rows), y_blk, hidden, ffn_chunk);
  }
}

}  // namespace detail

/// One pre-LN transformer layer (transformer_block()'s, BPT) on a sequence sharded across the
/// ranks of `comm`, the paper's full system: each rank runs LayerNorm, the Q/K/V projections, the
/// output projection and the FFN on its own tokens only, and the attention through
/// ring_attention() (causal on global positions, laid out as ring.layout says). Shapes: x, y
/// [n_r, model], this rank's tokens in the layout's order; weights as transformer_block() (the
/// same on every rank, not checked across ranks). Per rank: K, V, Q and the attention output of
/// its tokens, 4·n_r·model elements, plus O(query_block·(model + ffn_chunk)) for the FFN, and the
/// ring's two K/V shards in flight. Throws as transformer_block() does, collectively (every rank
/// throws when one rank's arguments are bad), and as ring_attention(). y may be exactly x.
/// Element types: float, double, Eigen::bfloat16 or Eigen::half (T of the weights; x and y must
/// match, as row-major storage, as in transformer_block()). 16-bit storage computes in float as
/// transformer_block() does (weights and x widened exactly, y rounded once): the layer is bitwise
/// round(the float layer on the widened weights and x), and its K/V, float intermediates, travel
/// in float; 16-bit adds the widened weights and x, n_r·model floats.
template <class T, class X, class Y>
void ring_transformer_block(MPI_Comm comm, const TransformerBlockWeights<T>& w,
                            const Eigen::MatrixBase<X>& x_, const Eigen::MatrixBase<Y>& y_,
                            const BlockOptions& options = {}, const RingOptions& ring = {}) {
  static_assert(
      std::is_same_v<T, float> || std::is_same_v<T, double> || blockattn::detail::kIs16BitFloat<T>,
      "blockattn: ring_transformer_block runs on float, double, bfloat16 and half");
  blockattn::detail::check_matrix_arguments<T, X, Y>();
  blockattn::detail::check_matrix_outputs<Y>();
  const ConstMatrixView<T> x(x_.derived());
  MatrixView<T> y = blockattn::detail::writable_view(y_);
  const char* function = "ring_transformer_block";
  {
    const detail::RingComm c(comm, function);
    detail::agree_on_errors(c, detail::local_error([&] {
                              blockattn::detail::validate_transformer_block<T>(function, w, x, y,
                                                                               options);
                            }));
  }
  if constexpr (blockattn::detail::kIs16BitFloat<T>) {
    using A = accumulator_t<T>;
    Workspace weights;
    const auto wide = blockattn::detail::widen_weights(w, weights);
    Matrix<A> work(x.rows(), x.cols());  // x widened, then y in float (the layer runs in place)
    for (Index r = 0; r < x.rows(); ++r) {
      blockattn::detail::widen(x.row(r).data(), x.cols(), work.row(r).data());
    }
    MatrixView<A> work_view(work);
    detail::ring_block_layer<A>(comm, wide, ConstMatrixView<A>(work), work_view, options, ring);
    for (Index r = 0; r < x.rows(); ++r) {
      blockattn::detail::narrow(work.row(r).data(), x.cols(), y.row(r).data());
    }
  } else {
    detail::ring_block_layer<T>(comm, w, x, y, options, ring);
  }
}

}  // namespace distributed
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
