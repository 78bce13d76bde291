#pragma once
// The memory-efficient attention backward pass (FlashAttention-2's backward, Dao 2023, Algorithm
// 2; the recomputation of Rabe & Staats 2021, section 4): nothing of size n_q×n_k is stored. Each
// (query chunk, key chunk) tile recomputes its probabilities from the forward's log-sum-exp,
//   P = exp(s − lse)                        (s: the same scores, modifiers and masks as forward)
//   dV += Pᵀ·dO,   dP = dO·Vᵀ,   dS = P ∘ (dP − D) ∘ ∂s/∂x,   D = rowsum(dO ∘ O)
//   dQ += scale·dS·K,   dK += scale·dSᵀ·Q   (scale·Q is what the tile holds)
// No argument checking here: attention_backward.hpp validates first.
//
// Rounding at large logits: the scores are the forward's bit for bit (recompute_scores), and a
// row's dominant key takes dP − D as dO·(v − O) (softmax_gradient), so that near one-hot rows
// lose no more than float autograd does (issue 17; tests: LargeLogit* in the backward test).
//
// Work split and determinism. One task per (batch, kv head, key chunk) owns the rows of dK and
// dV of its key chunk, so they need no reduction: the task sums over its query heads and query
// chunks in a fixed order. dQ is the sum over key chunks, which different tasks produce. Rather
// than a second pass over every tile for dQ (7 matrix products per tile instead of 5: ≈3.5× the
// forward's 2 instead of 2.5×) or per-thread dQ copies (O(threads·n·d) memory and a reduction
// order that depends on the thread count), each dQ block carries a token: the number of key
// chunks already added to it. The task of key chunk c waits until the token reads c, adds its
// dS·K, and passes the token on. Every dQ block is therefore summed in key-chunk order 0, 1, 2, …
// whatever the number of threads: one thread and eight give the same bits. The wait cannot
// deadlock as long as each thread takes its tasks in increasing order (parallel_for's dynamic
// and static schedules both do): the lowest unfinished task never waits. The tokens cost one
// integer per (batch, head, query chunk) — n_q / query_chunk of them, 2 KiB at n = 16K.
//
// 16-bit storage (Eigen::bfloat16, Eigen::half; S ≠ T = accumulator_t<S> = float). Every tile is
// widened to float as it is loaded (convert.hpp's widen: exact), into the slice's wide_* buffers,
// and the loop body below runs on the float values unchanged. dK and dV of the task's key chunk
// accumulate in float in the slice (acc_dk, acc_dv) and are rounded once, when the task ends; dQ
// accumulates in a float buffer of the whole call ([batch, heads, n_q, d], FlashAttention-2's
// dq_accum) and each block is rounded once, by the task of the last key chunk. So no gradient is
// rounded inside its sum: its error is the float call's on the widened inputs plus one rounding
// to the format. That float dQ buffer is the one part of the workspace that grows with n (2·n·d
// bytes per head more than the 16-bit dq itself); float and double calls do not have it. Float
// gradients over 16-bit inputs (G = float, issue 17: fp32 master gradients) take the same path
// with the same buffers, and the rounding at the end becomes a copy: they are the accumulators
// bit for bit, and rounding them gives the 16-bit gradients bit for bit.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <new>
#include <thread>
#include <type_traits>

#include <Eigen/Core>

#include <blockattn/detail/attention_kernel.hpp>
#include <blockattn/detail/convert.hpp>
#include <blockattn/detail/finite.hpp>
#include <blockattn/detail/microkernel.hpp>
#include <blockattn/detail/online_state.hpp>
#include <blockattn/detail/parallel.hpp>
#include <blockattn/detail/workspace.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

/// Whether T runs on the forward's SIMD micro-kernels (float, double). Other types (long double,
/// reachable through the generic entry point) take plain Eigen products.
template <class T>
inline constexpr bool kHasMicrokernels = std::is_same_v<T, float> || std::is_same_v<T, double>;

/// One thread's scratch for the backward pass. Every pointer is 64-byte aligned.
template <class T>
struct BackwardSlice {
  T* queries;      ///< [query_chunk, d]: scale·q of the current tile row
  T* probs;        ///< [query_chunk, key_chunk]: scores, then P = exp(s − lse)
  T* grad_scores;  ///< [query_chunk, key_chunk]: dP, then dS
  T* raw_scores;   ///< [query_chunk, key_chunk]: the scores before modifiers (soft-cap only)
  T* delta;        ///< [query_chunk]: D = rowsum(dO ∘ O)
  T* finite_keys;  ///< [key_chunk, d]: the K chunk, non-finite entries 0 (NaN slow path only)
  T* finite_dout;  ///< [query_chunk, d_v]: the dO tile, non-finite entries 0 (slow path only)
  T* packed_keys;  ///< packed_k_size(key_chunk, d): the task's K chunk packed (prefill scores)
  T* tile_scores;  ///< [query_chunk, padded_stride(key_chunk)]: score_tile's output
  // 16-bit storage only (empty otherwise): the tiles widened to T, and dK, dV in T.
  T* wide_q;     ///< [query_chunk, d]: q of the tile, unscaled
  T* wide_out;   ///< [query_chunk, d_v]: out of the tile
  T* wide_dout;  ///< [query_chunk, d_v]: dout of the tile
  T* wide_k;     ///< [key_chunk, d]: the task's K chunk
  T* wide_v;     ///< [key_chunk, d_v]: its V chunk
  T* acc_dk;     ///< [key_chunk, d]: its dK, rounded to storage when the task ends
  T* acc_dv;     ///< [key_chunk, d_v]: its dV, likewise
};

/// The backward workspace, one slice per thread:
/// O(threads·(query_chunk·(d + d_v + 3·key_chunk) + key_chunk·d)), independent of n, followed by
/// the dQ tokens (one atomic integer per (batch, head, query chunk)). With `widen` (16-bit
/// storage) each slice also holds the wide_* and acc_* buffers, O(query_chunk·(d + 2·d_v) +
/// key_chunk·2·(d + d_v)), and `dq_elements` floats follow the slices: the call's dQ accumulator.
/// Carved out of the caller's
/// Workspace when options.workspace is given (then a repeated call of one shape allocates
/// nothing), else one allocation of its own.
template <class T>
class BackwardWorkspace {
 public:
  BackwardWorkspace(int slots, const TileShape& shape, Index token_count, Workspace* external,
                    bool widen = false, Index dq_elements = 0) {
    const Index area = shape.query_chunk * shape.key_chunk;
    SliceLayout<T> layout;
    queries_ = layout.take(shape.query_chunk * shape.d);
    probs_ = layout.take(area);
    grad_scores_ = layout.take(area);
    raw_scores_ = layout.take(area);
    delta_ = layout.take(shape.query_chunk);
    finite_keys_ = layout.take(shape.key_chunk * shape.d);
    finite_dout_ = layout.take(shape.query_chunk * shape.d_v);
    if constexpr (kHasMicrokernels<T>) {
      packed_keys_ = layout.take(packed_k_size<T>(shape.key_chunk, shape.d));
      tile_scores_ = layout.take(shape.query_chunk * padded_stride<T>(shape.key_chunk));
    }
    if (widen) {
      wide_q_ = layout.take(shape.query_chunk * shape.d);
      wide_out_ = layout.take(shape.query_chunk * shape.d_v);
      wide_dout_ = layout.take(shape.query_chunk * shape.d_v);
      wide_k_ = layout.take(shape.key_chunk * shape.d);
      wide_v_ = layout.take(shape.key_chunk * shape.d_v);
      acc_dk_ = layout.take(shape.key_chunk * shape.d);
      acc_dv_ = layout.take(shape.key_chunk * shape.d_v);
    }
    slice_size_ = layout.size();
    // The slices and the dQ accumulator are whole cache lines, so the tokens after them start
    // on one too.
    const auto slice_bytes =
        static_cast<std::size_t>(slice_size_ * slots + SliceLayout<T>::padded(dq_elements)) *
        sizeof(T);
    const std::size_t bytes =
        slice_bytes + static_cast<std::size_t>(token_count) * sizeof(std::atomic<Index>);
    unsigned char* raw = nullptr;
    if (external != nullptr) {
      raw = static_cast<unsigned char*>(external->reserve(bytes));
    } else {
      // One allocation per call, before the loop, with operator new: Eigen's
      // EIGEN_RUNTIME_NO_MALLOC check in attention_backward_test then watches the loop's own
      // products and temporaries. Aligned to a cache line as the slices promise, so that Eigen
      // peels its loops the same way on every call and results are bitwise reproducible
      // (docs/tuning.md#backward-workspace-alignment).
      storage_.reset(
          static_cast<unsigned char*>(::operator new[](bytes, std::align_val_t{kAlign})));
      raw = storage_.get();
    }
    base_ = reinterpret_cast<T*>(raw);
    dq_accumulator_ = base_ + slice_size_ * slots;
    tokens_ = reinterpret_cast<std::atomic<Index>*>(raw + slice_bytes);
    for (Index t = 0; t < token_count; ++t) new (tokens_ + t) std::atomic<Index>(0);
  }

  /// The token of dQ block t: the number of key chunks already added to it.
  std::atomic<Index>& token(Index t) const { return tokens_[t]; }

  /// The call's float dQ accumulator (16-bit storage only): dq_elements values.
  T* dq_accumulator() const { return dq_accumulator_; }

  BackwardSlice<T> slice(int slot) const {
    T* base = base_ + static_cast<Index>(slot) * slice_size_;
    return {base + queries_,     base + probs_,       base + grad_scores_, base + raw_scores_,
            base + delta_,       base + finite_keys_, base + finite_dout_, base + packed_keys_,
            base + tile_scores_, base + wide_q_,      base + wide_out_,    base + wide_dout_,
            base + wide_k_,      base + wide_v_,      base + acc_dk_,      base + acc_dv_};
  }

 private:
  static constexpr std::size_t kAlign = 64;
  struct Free {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t{kAlign}); }
  };
  static_assert(std::is_trivially_destructible_v<std::atomic<Index>>,
                "the tokens live in raw storage and are never destroyed");
  std::unique_ptr<unsigned char[], Free> storage_;
  T* base_ = nullptr;
  T* dq_accumulator_ = nullptr;
  std::atomic<Index>* tokens_ = nullptr;
  Index slice_size_ = 0;
  Index queries_ = 0;
  Index probs_ = 0;
  Index grad_scores_ = 0;
  Index raw_scores_ = 0;
  Index delta_ = 0;
  Index finite_keys_ = 0;
  Index finite_dout_ = 0;
  Index packed_keys_ = 0;
  Index tile_scores_ = 0;
  Index wide_q_ = 0;
  Index wide_out_ = 0;
  Index wide_dout_ = 0;
  Index wide_k_ = 0;
  Index wide_v_ = 0;
  Index acc_dk_ = 0;
  Index acc_dv_ = 0;
};

// NaN in the backward pass (README, "Numerical conventions": a NaN reaches the gradient rows it
// affects and no others). The tile products multiply every pair, so on a Partial tile a masked
// pair's exact 0 (its P and dS) times a non-finite q, k or dO row would spread NaN (0·NaN) into
// gradient rows of queries or keys that never meet. Two rules keep it in place:
//   - dS is re-masked to 0 on a Partial tile whose dS is not all finite (dP = dO·Vᵀ and D are not
//     masked, so a non-finite V or O would otherwise give a masked pair 0·NaN);
//   - a Partial tile whose q, k or dO rows are not all finite (block_is_finite per tile and per K
//     chunk, O((rows + cols)·d) against the products' O(rows·cols·d))
//     takes the slow path: P's masked entries are written as −0 (a visible P is exp(·) >= +0 or
//     NaN, so −0 marks "masked" even where a visible weight underflowed to +0), the three products
//     with that operand run on a copy with its non-finite entries set to 0 (exact for every
//     finite term, so unaffected rows keep their bits), and the visible pairs then add the terms
//     of the non-finite entries one by one.

/// Whether P entry p belongs to a masked pair in the slow path (written as −0 there).
template <class T>
bool masked_weight(T p) {
  return p == T(0) && std::signbit(p);
}

/// Slow-path fix-up of out += aᵀ·b over the pairs (r, c) of a tile: for each row r of b with a
/// non-finite entry e, out(c, e) += a(r, c)·b(r, e) for every visible pair (p(r, c) not masked).
/// `b_scale` multiplies b's entries (the scale that the product's finite copy already holds).
template <class T, class A, class B, class P, class Out>
void add_non_finite_terms(const A& a, const B& b, T b_scale, const P& p, Out& out) {
  for (Index r = 0; r < b.rows(); ++r) {
    if (b.row(r).allFinite()) continue;
    for (Index c = 0; c < a.cols(); ++c) {
      if (masked_weight(p(r, c))) continue;
      for (Index e = 0; e < b.cols(); ++e) {
        const T x = b(r, e) * b_scale;
        if (!std::isfinite(x)) out(c, e) += a(r, c) * x;
      }
    }
  }
}

/// The backward pass keeps at most kBackwardQueryChunk rows per tile (the forward's prefill
/// blocks are 768 rows for its packed micro-kernels): the five Eigen products per tile then pack
/// into Eigen's stack buffers, so the loop never allocates (attention_backward_test checks it).
inline constexpr Index kBackwardQueryChunk = 64;

/// Tile sizes of one backward call: the forward's rules with the query chunk defaulting to
/// kBackwardQueryChunk (aligned with a block-sparse layout's query blocks where
/// block_aligned_chunk() allows).
template <class T>
TileShape choose_backward_tile_shape(const AttentionOptions& options, Index n_q, Index n_k, Index d,
                                     Index d_v) {
  AttentionOptions tiles = options;
  if (tiles.query_chunk == 0) {
    tiles.query_chunk =
        options.block_sparse == nullptr
            ? kBackwardQueryChunk
            : block_aligned_chunk(options.block_sparse->query_block_size(), kBackwardQueryChunk);
  }
  return choose_tile_shape<T>(tiles, n_q, n_k, d, d_v);
}

/// p [rows, cols] = q_blk·Kᵀ for the scaled queries q_blk [rows, d] of one tile and the task's
/// key chunk k_blk, computed by the kernel that the forward pass used for this call (`direct`,
/// forward_scores_direct), so that every score is the forward's bit for bit. This is what makes
/// P = exp(s − lse) consistent with the stored lse: where one key dominates a row the forward
/// stored lse = m = that key's score, and the recomputed weight is exp(0) = 1 exactly. With
/// scores rounded another way (an Eigen product) it was exp(δ), δ a few ulps of a logit: at
/// logits ~120 a relative error ~5e-5 in dV, which float autograd does not have (its P divides by
/// its own row sum). `packed_keys` is pack_k of k_blk (prefill kernel only).
template <class T, class KBlk>
void recompute_scores(const T* q_blk, Index rows, Index d, const KBlk& k_blk, bool direct,
                      const BackwardSlice<T>& ws, Eigen::Map<Matrix<T>>& p) {
  const Index cols = k_blk.rows();
  if constexpr (kHasMicrokernels<T>) {
    if (direct) {
      score_rows_direct(q_blk, d, rows, d, k_blk.data(), k_blk.outerStride(), cols, p.data(), cols);
      return;
    }
    const Index ld_s = padded_stride<T>(cols);
    score_tile(q_blk, d, rows, d, ws.packed_keys, cols, ws.tile_scores, ld_s);
    for (Index r = 0; r < rows; ++r) {
      for (Index c = 0; c < cols; ++c) p(r, c) = ws.tile_scores[r * ld_s + c];
    }
  } else {
    static_cast<void>(direct);
    p.noalias() = Eigen::Map<const Matrix<T>>(q_blk, rows, d) * k_blk.transpose();
  }
}

/// dS_ij = P_ij·(dP_ij − D_i) for the tile, given p = P and ds = dP = dO·Vᵀ, with D_i = dO_i·O_i.
/// For a weight above 1/2 (a row's dominant key r; at most one per row) the factor is computed as
/// dO_i·(v_r − O_i) instead, the same number in exact arithmetic: O_i − v_r = Σ_{j≠r} P_ij·(v_j −
/// v_r) is small there and computed almost exactly (v_r − O_i subtracts nearby numbers), so the
/// result carries an error proportional to 1 − P_ir, as float autograd's does (its D_i = Σ_j
/// P_ij·dP_ij reads 1·dP_ir when the row is one-hot). dP_ir − D_i from two rounded dot products of
/// length d_v errs by a few ulps of dP_ir instead, independent of 1 − P_ir: at logits ~120 (issue
/// 17, exact gradients ~1e-13) that made dQ and dK errors ~1e-4 against autograd's ~1e-6. Other
/// entries keep the product form: their error P_ij·O(u·|dP|) is at most 2·P_ij·(1 −
/// P_ij)·O(u·|dP|). A non-finite dS keeps the product form (the NaN rules above).
template <class P, class DS, class DOut, class Out, class VBlk, class T>
void softmax_gradient(const P& p, DS& ds, const DOut& dout_blk, const Out& out_blk,
                      const VBlk& v_blk, const T* delta) {
  for (Index r = 0; r < ds.rows(); ++r) {
    ds.row(r) = (p.row(r).array() * (ds.row(r).array() - delta[r])).matrix();
    // No dominant key in this row (a NaN weight may hide one: the product form then).
    if (!(p.row(r).maxCoeff() > T(0.5))) continue;
    for (Index c = 0; c < ds.cols(); ++c) {
      if (p(r, c) > T(0.5) && std::isfinite(ds(r, c))) {
        ds(r, c) = p(r, c) * dout_blk.row(r).dot(v_blk.row(c) - out_blk.row(r));
      }
    }
  }
}

/// Rows [first, first + count) of the (batch b, head h) slice of a tensor; no copy.
template <class T>
Eigen::Map<const Matrix<std::remove_const_t<T>>, 0, Eigen::OuterStride<>> row_block(
    const TensorView<T>& t, Index b, Index h, Index first, Index count) {
  return {t.at(b, first, h), count, t.dim, Eigen::OuterStride<>(t.seq_stride)};
}

/// Writable rows [first, first + count) of the (batch b, head h) slice of a tensor; no copy.
template <class T>
Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>> mutable_row_block(const TensorView<T>& t, Index b,
                                                                 Index h, Index first,
                                                                 Index count) {
  return {t.at(b, first, h), count, t.dim, Eigen::OuterStride<>(t.seq_stride)};
}

/// Rows [first, first + count) of the (batch b, head h) slice of a tensor of storage S, as
/// accumulator_t<S> values: the tensor's own rows when S is that type (no copy), else widened
/// (exactly) into `buffer` [count, t.dim], contiguous.
template <class S, class T>
Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>> compute_rows(const TensorView<const S>& t,
                                                                  Index b, Index h, Index first,
                                                                  Index count,
                                                                  [[maybe_unused]] T* buffer) {
  if constexpr (std::is_same_v<S, T>) {
    return row_block(t, b, h, first, count);
  } else {
    for (Index r = 0; r < count; ++r) widen(t.at(b, first + r, h), t.dim, buffer + r * t.dim);
    return {buffer, count, t.dim, Eigen::OuterStride<>(t.dim)};
  }
}

/// Where rows [first, first + count) of a gradient accumulate: the gradient's own rows when the
/// inputs are stored in the compute type T (kBuffered false; the gradient is then a T too), else
/// `buffer` (rows of t.dim values, contiguous), which store_rows() writes into the gradient
/// afterwards. A float gradient over 16-bit inputs accumulates in the buffer as a 16-bit one does,
/// so that the two differ only in store_rows().
template <bool kBuffered, class G, class T>
Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>> accumulator_rows(const TensorView<G>& t, Index b,
                                                                Index h, Index first, Index count,
                                                                [[maybe_unused]] T* buffer) {
  if constexpr (!kBuffered) {
    static_assert(std::is_same_v<G, T>, "an unbuffered gradient is accumulated in place");
    return mutable_row_block(t, b, h, first, count);
  } else {
    return {buffer, count, t.dim, Eigen::OuterStride<>(t.dim)};
  }
}

/// Writes accumulated rows (accumulator_rows' buffer) once into the gradient G: rounded when G is
/// a 16-bit format, copied when G is T; nothing when unbuffered (accumulated in place).
template <bool kBuffered, class G, class T>
void store_rows([[maybe_unused]] const Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>>& acc,
                [[maybe_unused]] const TensorView<G>& t, [[maybe_unused]] Index b,
                [[maybe_unused]] Index h, [[maybe_unused]] Index first) {
  if constexpr (kBuffered) {
    for (Index r = 0; r < acc.rows(); ++r) {
      if constexpr (std::is_same_v<G, T>) {
        std::copy_n(acc.row(r).data(), t.dim, t.at(b, first + r, h));
      } else {
        narrow(acc.row(r).data(), t.dim, t.at(b, first + r, h));
      }
    }
  }
}

/// Gradients of attention() on valid arguments (attention_backward.hpp checked them). lse is
/// [batch, q.heads, n_q]. dq, dk, dv are overwritten entirely. score_mod: only s + bias(b, h, i, j)
/// (∂ = 1, as ALiBi; the chain rule assumes it), e.g. the ring's ALiBi on global positions.
/// Storage S: float, double, or a 16-bit format computed in float (the note at the top). Gradient
/// type G: S, or float over 16-bit S (the same accumulators, copied instead of rounded).
template <class S, class MaskMod, class ScoreMod = NoScoreMod, class G = S>
void attention_backward_kernel(const TensorView<const S>& q, const TensorView<const S>& k,
                               const TensorView<const S>& v, const TensorView<const S>& out,
                               const accumulator_t<S>* lse, const TensorView<const S>& dout,
                               const TensorView<G>& dq, const TensorView<G>& dk,
                               const TensorView<G>& dv, const AttentionOptions& options,
                               const MaskMod& mask_mod, const ScoreMod& score_mod = {}) {
  using T = accumulator_t<S>;
  static_assert(std::is_same_v<G, S> || std::is_same_v<G, T>,
                "the gradients are of the storage type S or of its compute type");
  constexpr bool kWiden = !std::is_same_v<S, T>;
  const Index n_q = q.seq;
  const Index n_k = k.seq;
  const Index d = q.dim;
  const Index d_v = v.dim;
  const Index heads = q.heads;
  const Index kv_heads = k.heads;
  const Index batch = q.batch;
  if (batch == 0) return;
  const Index group = heads / kv_heads;  // query heads per kv head (GQA)
  if (n_k == 0) {                        // no key: every query sees nothing, dQ = 0
    for (Index b = 0; b < batch; ++b) {
      for (Index h = 0; h < heads; ++h) mutable_head_slice(dq, b, h).setZero();
    }
    return;
  }
  const TileShape shape = choose_backward_tile_shape<T>(options, n_q, n_k, d, d_v);
  const bool direct_scores = forward_scores_direct<T>(options, n_q, n_k, d, d_v, group);
  const T scale = resolve_scale<T>(options, d);
  const Index query_chunks = ceil_div(n_q, shape.query_chunk);
  const Index key_chunks = ceil_div(n_k, shape.key_chunk);
  const Index tasks = batch * kv_heads * key_chunks;
  const int threads = resolve_threads(options.threads, tasks);
  // token((b·heads + h)·query_chunks + qc): key chunks already added to that dQ block.
  const Index token_count = batch * heads * query_chunks;
  const Index dq_elements = kWiden ? batch * heads * n_q * d : 0;
  const BackwardWorkspace<T> workspace(threads, shape, token_count, options.workspace, kWiden,
                                       dq_elements);

  parallel_for(tasks, threads, [&](Index task, int slot) {
    const Index kc = task % key_chunks;
    const Index kvh = (task / key_chunks) % kv_heads;
    const Index b = task / (key_chunks * kv_heads);
    const Index k0 = kc * shape.key_chunk;
    const Index cols = std::min(shape.key_chunk, n_k - k0);
    const Index k_end = k0 + cols;
    const BackwardSlice<T> ws = workspace.slice(slot);

    const auto k_blk = compute_rows(k, b, kvh, k0, cols, ws.wide_k);
    const auto v_blk = compute_rows(v, b, kvh, k0, cols, ws.wide_v);
    // This task owns these rows of dK and dV: it accumulates into them directly (in float in the
    // slice for 16-bit storage, rounded once after the loop).
    auto dk_blk = accumulator_rows<kWiden>(dk, b, kvh, k0, cols, ws.acc_dk);
    auto dv_blk = accumulator_rows<kWiden>(dv, b, kvh, k0, cols, ws.acc_dv);
    dk_blk.setZero();
    dv_blk.setZero();
    const bool keys_finite = block_is_finite(k_blk.data(), k_blk.outerStride(), cols, d);
    Eigen::Map<Matrix<T>> finite_keys(ws.finite_keys, cols, d);
    if (!keys_finite) copy_finite(k_blk, finite_keys);
    if constexpr (kHasMicrokernels<T>) {
      if (!direct_scores) pack_k(k_blk.data(), k_blk.outerStride(), cols, d, ws.packed_keys);
    }

    for (Index h = kvh * group; h < (kvh + 1) * group; ++h) {
      const TileMasker<MaskMod> masker(options, n_q, n_k, b, h, mask_mod);
      const ScoreModifier<T, ScoreMod> modifier(options, n_q, n_k, b, h, score_mod);
      const T* lse_head = lse + (b * heads + h) * n_q;
      for (Index qc = 0; qc < query_chunks; ++qc) {
        const Index q0 = qc * shape.query_chunk;
        const Index rows = std::min(shape.query_chunk, n_q - q0);
        const TileMask tile = masker.classify(q0, q0 + rows, k0, k_end);
        const bool visible = tile.visibility != BlockVisibility::Empty;
        const bool partial = tile.visibility == BlockVisibility::Partial;
        Eigen::Map<Matrix<T>> ds(ws.grad_scores, rows, cols);
        Eigen::Map<Matrix<T>> p(ws.probs, rows, cols);
        bool slow_keys = false;  // the NaN slow path above, per operand
        if (visible) {
          const auto dout_blk = compute_rows(dout, b, h, q0, rows, ws.wide_dout);
          const auto out_blk = compute_rows(out, b, h, q0, rows, ws.wide_out);
          const auto q_src = compute_rows(q, b, h, q0, rows, ws.wide_q);
          Eigen::Map<Matrix<T>> q_blk(ws.queries, rows, d);
          q_blk.noalias() = q_src * scale;  // as the forward scales it
          recompute_scores(q_blk.data(), rows, d, k_blk, direct_scores, ws, p);
          Eigen::Map<Matrix<T>> raw(ws.raw_scores, rows, cols);
          if (modifier.scales_gradient()) raw = p;
          if (modifier.active()) modifier.apply(q0, k0, p);
          for (Index r = 0; r < rows; ++r) {
            const T row_lse = lse_head[q0 + r];
            if (row_lse == kNegativeInfinity<T>) {  // no visible key: P = 0, gradients 0
              p.row(r).setZero();
            } else {
              p.row(r) = (p.row(r).array() - row_lse).exp().matrix();
            }
            ws.delta[r] = dout_blk.row(r).dot(out_blk.row(r));
          }
          const bool slow_queries = partial && !block_is_finite(q_blk.data(), d, rows, d);
          const bool slow_dout =
              partial && !block_is_finite(dout_blk.data(), dout_blk.outerStride(), rows, d_v);
          slow_keys = partial && !keys_finite;
          // Masked pairs get P exactly 0 (their score was never set to −inf here); −0 on the
          // slow path, where it marks them.
          const bool slow = slow_queries || slow_dout || slow_keys;
          masker.apply(tile, q0, k0, p, slow ? -T(0) : T(0));
          if (slow_dout) {
            Eigen::Map<Matrix<T>> finite_dout(ws.finite_dout, rows, d_v);
            copy_finite(dout_blk, finite_dout);
            dv_blk.noalias() += p.transpose() * finite_dout;
            add_non_finite_terms(p, dout_blk, T(1), p, dv_blk);
          } else {
            dv_blk.noalias() += p.transpose() * dout_blk;
          }
          ds.noalias() = dout_blk * v_blk.transpose();  // dP
          softmax_gradient(p, ds, dout_blk, out_blk, v_blk, ws.delta);
          if (modifier.scales_gradient()) modifier.chain_rule(raw, ds);
          // A masked pair's dS is p·(dP − D) = 0·(dP − D): ±0, or NaN when dP or D is not finite.
          if (partial && !block_is_finite(ds.data(), cols, rows, cols)) {
            masker.apply(tile, q0, k0, ds, T(0));
          }
          if (slow_queries) {
            copy_finite(q_blk, q_blk);  // q_blk is the tile's own copy; p no longer needs it
            dk_blk.noalias() += ds.transpose() * q_blk;
            add_non_finite_terms(ds, q_src, scale, p, dk_blk);
          } else {
            dk_blk.noalias() += ds.transpose() * q_blk;  // = scale·dSᵀ·q
          }
        }
        // dQ in key-chunk order: wait for key chunk kc − 1 to have added its part.
        std::atomic<Index>& token = workspace.token((b * heads + h) * query_chunks + qc);
        while (token.load(std::memory_order_acquire) != kc) std::this_thread::yield();
        auto dq_blk = accumulator_rows<kWiden>(
            dq, b, h, q0, rows,
            kWiden ? workspace.dq_accumulator() + ((b * heads + h) * n_q + q0) * d : nullptr);
        if (kc == 0) dq_blk.setZero();
        if (visible && slow_keys) {
          dq_blk.noalias() += (ds * scale) * finite_keys;
          // dQ += scale·dS·K is out += aᵀ·b with a = dSᵀ (pairs transposed: p too).
          add_non_finite_terms(ds.transpose(), k_blk, scale, p.transpose(), dq_blk);
        } else if (visible) {
          dq_blk.noalias() += (ds * scale) * k_blk;
        }
        if (kc == key_chunks - 1)
          store_rows<kWiden>(dq_blk, dq, b, h, q0);  // dQ complete: store once
        token.store(kc + 1, std::memory_order_release);
      }
    }
    store_rows<kWiden>(dk_blk, dk, b, kvh, k0);
    store_rows<kWiden>(dv_blk, dv, b, kvh, k0);
  });
}

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
