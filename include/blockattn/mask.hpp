#pragma once
// Masks and score modifiers of attention(): the options that select them (AttentionOptions), the
// block-sparse layout type, the user functor protocol, and — in namespace detail — the one
// machinery that classifies a (query block, key block) tile as empty / partial / full and masks
// it. The forward pass, the backward pass and the BPT layer all go through detail::TileMasker, so
// a mask means the same thing everywhere.
//
// Order of operations on one score (every kernel and reference::attention):
//   s = scale · q_i·k_j                                   (scale 0: 1/sqrt(d))
//   s = softcap · tanh(s / softcap)                       (softcap > 0)
//   s = s − alibi_slopes[h] · |i + (n_k − n_q) − j|       (alibi_slopes not empty)
//   s = score_mod(s, b, h, i, j)                          (user functor)
//   s = −inf unless visible(b, h, i, j)                   (every mask below, AND-ed)
// visible(b, h, i, j) = j < key_lengths[b]
//                     and (not causal        or j <= i + (n_k − n_q))
//                     and (window_left < 0   or j >= i + (n_k − n_q) − window_left)
//                     and (window_right < 0  or j <= i + (n_k − n_q) + window_right)
//                     and block_sparse->visible(h, i / query_block, j / key_block)
//                     and mask_mod(b, h, i, j)
// The alignment n_k − n_q uses the tensor's n_k, not key_lengths[b]: key_lengths only removes
// padding at the end of each sequence's keys.
//
// An attention sink (options.sinks, one logit per query head, gpt-oss / ONNX Runtime's head_sink /
// ggml's add_sinks) joins the softmax denominator only, after every step above: the weights are
// p_ij = exp(s_ij) / (exp(sinks[h]) + Σ_j' exp(s_ij')), so out = Σ_j p_ij·v_j no longer sums
// to one weight. The sink is not scaled, soft-capped, ALiBi-shifted, passed to score_mod or masked,
// and it carries no value; lse includes it (lse = log(exp(sinks[h]) + Σ_j exp(s_ij))). A row with
// no visible key gives out 0 and lse sinks[h]; a sink of −inf is no sink.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <blockattn/detail/check.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {

class Workspace;

/// How much of a (query block, key block) tile a mask lets through.
enum class BlockVisibility {
  Empty,    ///< no pair visible: the kernel skips the tile, no FLOPs
  Partial,  ///< some pairs visible: the kernel checks each pair
  Full,     ///< every pair visible: the kernel does no per-pair check
};

/// A BlockBERT layout (Qiu et al. 2019): for each head, a boolean grid over (query block, key
/// block); query i may see key j only if the block (i / query_block_size, j / key_block_size) is
/// set. Blocks not set cost no FLOPs. One layout may be shared by all heads (heads() == 1) or give
/// one grid per query head. Starts with every block unset. O(heads·query_blocks·key_blocks) bytes.
class BlockSparseLayout {
 public:
  BlockSparseLayout() = default;

  /// An all-unset layout. Throws std::invalid_argument unless every argument is positive.
  BlockSparseLayout(Index heads, Index query_blocks, Index key_blocks, Index query_block_size,
                    Index key_block_size)
      : heads_(heads),
        query_blocks_(query_blocks),
        key_blocks_(key_blocks),
        query_block_size_(query_block_size),
        key_block_size_(key_block_size) {
    detail::require(heads > 0 && query_blocks > 0 && key_blocks > 0, "BlockSparseLayout",
                    "heads, query_blocks and key_blocks must be positive (got ", heads, ", ",
                    query_blocks, ", ", key_blocks, ")");
    detail::require(query_block_size > 0 && key_block_size > 0, "BlockSparseLayout",
                    "block sizes must be positive (got ", query_block_size, " and ", key_block_size,
                    ")");
    bits_.assign(static_cast<std::size_t>(heads * query_blocks * key_blocks), 0);
  }

  /// The BlockBERT permutation pattern: head h lets query block qb see key block
  /// permutations[h][qb] (one key block per query block). Each inner vector is one head's
  /// permutation of 0..blocks−1 (any map into 0..blocks−1 is accepted).
  static BlockSparseLayout from_permutations(const std::vector<std::vector<Index>>& permutations,
                                             Index block_size) {
    const auto heads = static_cast<Index>(permutations.size());
    detail::require(heads > 0, "BlockSparseLayout::from_permutations", "no permutation given");
    const auto blocks = static_cast<Index>(permutations.front().size());
    BlockSparseLayout layout(heads, blocks, blocks, block_size, block_size);
    for (Index h = 0; h < heads; ++h) {
      const auto& perm = permutations[static_cast<std::size_t>(h)];
      detail::require_size("BlockSparseLayout::from_permutations", "a permutation's size",
                           static_cast<Index>(perm.size()), "the first one's", blocks,
                           "every head has the same number of blocks");
      for (Index qb = 0; qb < blocks; ++qb) {
        const Index kb = perm[static_cast<std::size_t>(qb)];
        detail::require(kb >= 0 && kb < blocks, "BlockSparseLayout::from_permutations",
                        "block index ", kb, " is outside [0, ", blocks, ")");
        layout.set(h, qb, kb);
      }
    }
    return layout;
  }

  /// Sets (or clears) block (qb, kb) of head h. Throws std::invalid_argument when out of range.
  /// O(1).
  void set(Index h, Index qb, Index kb, bool visible = true) {
    detail::require(
        h >= 0 && h < heads_ && qb >= 0 && qb < query_blocks_ && kb >= 0 && kb < key_blocks_,
        "BlockSparseLayout::set", "block (", h, ", ", qb, ", ", kb, ") is outside the layout's [",
        heads_, ", ", query_blocks_, ", ", key_blocks_, "]");
    bits_[index(h, qb, kb)] = visible ? 1 : 0;
  }

  /// Whether block (qb, kb) of head h is set. Unchecked; the kernels validate the layout once.
  /// O(1).
  bool visible(Index h, Index qb, Index kb) const { return bits_[index(h, qb, kb)] != 0; }

  /// Heads in the layout (1: shared by every head). O(1).
  Index heads() const { return heads_; }
  /// Query blocks per head. O(1).
  Index query_blocks() const { return query_blocks_; }
  /// Key blocks per head. O(1).
  Index key_blocks() const { return key_blocks_; }
  /// Queries per block. O(1).
  Index query_block_size() const { return query_block_size_; }
  /// Keys per block. O(1).
  Index key_block_size() const { return key_block_size_; }

 private:
  std::size_t index(Index h, Index qb, Index kb) const {
    return static_cast<std::size_t>((h * query_blocks_ + qb) * key_blocks_ + kb);
  }

  Index heads_ = 0;
  Index query_blocks_ = 0;
  Index key_blocks_ = 0;
  Index query_block_size_ = 1;
  Index key_block_size_ = 1;
  std::vector<std::uint8_t> bits_;
};

/// Options of attention() and of everything built on it (backward pass, BPT layer). The masks
/// compose: a pair is visible only if every mask lets it through (see the top of mask.hpp).
struct AttentionOptions {
  double scale = 0;     ///< multiplies q·k; 0: 1/sqrt(head_dim)
  bool causal = false;  ///< key j visible to query i iff j <= i + (n_k − n_q) (bottom-right)
  Index window_left = -1;  ///< key j visible iff j >= i + (n_k − n_q) − window_left; −1: unbounded
  Index window_right =
      -1;  ///< key j visible iff j <= i + (n_k − n_q) + window_right; −1: unbounded
  Index query_chunk = 0;  ///< queries per tile; 0: chosen by the library
  Index key_chunk = 0;    ///< keys per tile; 0: chosen by the library
  int threads = 0;        ///< 0: omp_get_max_threads() (all, unless OMP_NUM_THREADS says less)
  Span<const Index> key_lengths;  ///< [batch] or empty: keys j >= key_lengths[b] are padding
  const BlockSparseLayout* block_sparse = nullptr;  ///< BlockBERT layout; not owned
  Span<const double> alibi_slopes;  ///< [query heads] or empty: s −= slope_h·|i + (n_k − n_q) − j|
  double softcap = 0;               ///< > 0: s = softcap·tanh(s / softcap) (Gemma 2)
  /// [query heads] or empty: a logit per head that joins the softmax denominator only (see the
  /// top of mask.hpp); NaN and +inf are rejected, −inf is no sink. Forward passes only; the
  /// backward pass takes the forward's lse, which includes the sinks, and gives no sink gradient.
  Span<const double> sinks;
  /// Caller's reusable scratch (not owned; one per concurrent call): with it, repeated calls of
  /// the same shape allocate nothing. nullptr: the call allocates its own.
  Workspace* workspace = nullptr;
};

/// The default user mask: no per-pair mask at all (compiled out).
struct NoMaskMod {};
/// The default user score modifier: none (compiled out).
struct NoScoreMod {};

/// A user mask together with a block classifier, so that the kernel can skip tiles the mask
/// hides entirely and avoid per-pair calls on tiles it shows entirely.
///   mask(b, h, i, j) -> bool
///   classify(b, h, q0, q_end, k0, k_end) -> BlockVisibility  for queries [q0, q_end), keys
///   [k0, k_end). Returning Partial is always correct; Empty or Full must be exact.
/// Any functor type with a member classify_block(b, h, q0, q_end, k0, k_end) works the same way.
template <class Mask, class Classify>
struct ClassifiedMaskMod {
  Mask mask;          ///< mask(b, h, i, j) -> bool: whether query i sees key j
  Classify classify;  ///< classify(b, h, q0, q_end, k0, k_end) -> BlockVisibility

  /// The mask itself: mask(b, h, i, j). One call per pair on Partial tiles.
  bool operator()(Index b, Index h, Index i, Index j) const { return mask(b, h, i, j); }
  /// The classifier: classify(b, h, q0, q_end, k0, k_end). One call per tile.
  BlockVisibility classify_block(Index b, Index h, Index q0, Index q_end, Index k0,
                                 Index k_end) const {
    return classify(b, h, q0, q_end, k0, k_end);
  }
};

/// Pairs a mask functor with its block classifier (see ClassifiedMaskMod). O(1): moves both.
template <class Mask, class Classify>
ClassifiedMaskMod<Mask, Classify> classified_mask_mod(Mask mask, Classify classify) {
  return {std::move(mask), std::move(classify)};
}

namespace detail {

template <class M, class = void>
struct HasClassifyBlock : std::false_type {};
template <class M>
struct HasClassifyBlock<M, std::void_t<decltype(std::declval<const M&>().classify_block(
                               Index{}, Index{}, Index{}, Index{}, Index{}, Index{}))>>
    : std::true_type {};

template <class MaskMod>
inline constexpr bool kHasMaskMod = !std::is_same_v<MaskMod, NoMaskMod>;
template <class ScoreMod>
inline constexpr bool kHasScoreMod = !std::is_same_v<ScoreMod, NoScoreMod>;

/// Compile-time check of the user functors' signatures, with a readable message.
template <class T, class MaskMod, class ScoreMod>
constexpr void check_mods() {
  static_assert(!kHasMaskMod<MaskMod> ||
                    std::is_invocable_r_v<bool, const MaskMod&, Index, Index, Index, Index>,
                "blockattn: mask_mod must be callable as bool(Index b, Index h, Index q_idx, "
                "Index k_idx) const");
  static_assert(!kHasScoreMod<ScoreMod> ||
                    std::is_invocable_r_v<T, const ScoreMod&, T, Index, Index, Index, Index>,
                "blockattn: score_mod must be callable as T(T score, Index b, Index h, Index "
                "q_idx, Index k_idx) const");
}

/// Which parts of a tile's mask need per-pair work. `visibility` is the combination.
struct TileMask {
  BlockVisibility visibility = BlockVisibility::Full;
  bool interval_partial = false;  ///< causal / window / key length cut through the tile
  bool layout_partial = false;    ///< the block-sparse layout cuts through the tile
  bool user_partial = false;      ///< mask_mod must be called per pair
};

/// Every mask of one (batch b, query head h), resolved from AttentionOptions: causal, window and
/// key length give each query i one interval of visible keys [key_begin(i), key_end(i)), both
/// ends non-decreasing in i; the layout and the user mask are checked per block, then per pair.
/// The one place that decides visibility; forward, backward and BPT all call it.
template <class MaskMod = NoMaskMod>
class TileMasker {
 public:
  TileMasker(const AttentionOptions& options, Index n_q, Index n_k, Index b, Index h,
             const MaskMod& mask_mod)
      : offset_(n_k - n_q),
        key_length_(!options.key_lengths.empty() ? options.key_lengths[b] : n_k),
        causal_(options.causal),
        window_left_(options.window_left),
        window_right_(options.window_right),
        layout_(options.block_sparse),
        layout_head_(layout_ != nullptr && layout_->heads() > 1 ? h : 0),
        b_(b),
        h_(h),
        mask_mod_(mask_mod) {}

  /// First key visible to query i through causal / window / key length (may exceed key_end).
  Index key_begin(Index i) const {
    return window_left_ >= 0 ? std::max<Index>(0, i + offset_ - window_left_) : 0;
  }
  /// One past the last key visible to query i through causal / window / key length (may be < 0).
  Index key_end(Index i) const {
    Index end = key_length_;
    if (causal_) end = std::min(end, i + offset_ + 1);
    if (window_right_ >= 0) end = std::min(end, i + offset_ + window_right_ + 1);
    return end;
  }
  /// The keys that queries [q0, q_end) can see at all: [first, last) with 0 <= first <= last <=
  /// key length (first == last when none).
  std::pair<Index, Index> key_range(Index q0, Index q_end) const {
    const Index last = std::max<Index>(0, key_end(q_end - 1));
    return {std::min(key_begin(q0), last), last};
  }

  /// Classifies the tile queries [q0, q_end) × keys [k0, k_end). Empty is exact (nothing visible
  /// is ever skipped); Full is exact; Partial may be returned for a tile that is in fact full.
  TileMask classify(Index q0, Index q_end, Index k0, Index k_end) const {
    TileMask tile;
    // Interval masks: both ends are monotone in i, so the first and last rows bound the tile.
    if (k0 >= key_end(q_end - 1) || k_end <= key_begin(q0)) return empty();
    tile.interval_partial = !(key_begin(q_end - 1) <= k0 && key_end(q0) >= k_end);
    if (layout_ != nullptr) {
      const Index qb0 = q0 / layout_->query_block_size();
      const Index qb1 = (q_end - 1) / layout_->query_block_size();
      const Index kb0 = k0 / layout_->key_block_size();
      const Index kb1 = (k_end - 1) / layout_->key_block_size();
      Index set = 0;
      for (Index qb = qb0; qb <= qb1; ++qb) {
        for (Index kb = kb0; kb <= kb1; ++kb) set += layout_->visible(layout_head_, qb, kb);
      }
      if (set == 0) return empty();
      tile.layout_partial = set != (qb1 - qb0 + 1) * (kb1 - kb0 + 1);
    }
    if constexpr (kHasMaskMod<MaskMod>) {
      if constexpr (HasClassifyBlock<MaskMod>::value) {
        const BlockVisibility user = mask_mod_.classify_block(b_, h_, q0, q_end, k0, k_end);
        if (user == BlockVisibility::Empty) return empty();
        tile.user_partial = user == BlockVisibility::Partial;
      } else {
        tile.user_partial = true;
      }
    }
    tile.visibility = tile.interval_partial || tile.layout_partial || tile.user_partial
                          ? BlockVisibility::Partial
                          : BlockVisibility::Full;
    return tile;
  }

  /// Sets every pair of the tile (rows q0.., columns k0..) that `tile` does not show to
  /// `masked` (−inf before the softmax; 0 for probabilities). Full tiles are left alone.
  template <class Scores, class T>
  void apply(const TileMask& tile, Index q0, Index k0, Scores& s, T masked) const {
    if (tile.visibility != BlockVisibility::Partial) return;
    const Index cols = s.cols();
    for (Index r = 0; r < s.rows(); ++r) {
      const Index i = q0 + r;
      Index lo = 0;
      Index hi = cols;
      if (tile.interval_partial) {
        lo = std::clamp<Index>(key_begin(i) - k0, 0, cols);
        hi = std::clamp<Index>(key_end(i) - k0, lo, cols);
        for (Index c = 0; c < lo; ++c) s(r, c) = masked;
        for (Index c = hi; c < cols; ++c) s(r, c) = masked;
      }
      if (tile.layout_partial) {
        // Block by block, not pair by pair: one lookup per key block that the row's [lo, hi)
        // meets; a division and lookup per pair was twice as slow
        // (docs/tuning.md#block-sparse-masking).
        const Index qb = i / layout_->query_block_size();
        const Index size = layout_->key_block_size();
        for (Index kb = (k0 + lo) / size; kb * size < k0 + hi; ++kb) {
          if (layout_->visible(layout_head_, qb, kb)) continue;
          const Index end = std::min(hi, (kb + 1) * size - k0);
          for (Index c = std::max(lo, kb * size - k0); c < end; ++c) s(r, c) = masked;
        }
      }
      if constexpr (kHasMaskMod<MaskMod>) {
        if (tile.user_partial) {
          for (Index c = lo; c < hi; ++c) {
            if (!mask_mod_(b_, h_, i, k0 + c)) s(r, c) = masked;
          }
        }
      }
    }
  }

 private:
  static TileMask empty() {
    TileMask tile;
    tile.visibility = BlockVisibility::Empty;
    return tile;
  }

  Index offset_;
  Index key_length_;
  bool causal_;
  Index window_left_;
  Index window_right_;
  const BlockSparseLayout* layout_;
  Index layout_head_;
  Index b_;
  Index h_;
  const MaskMod& mask_mod_;
};

/// The score modifiers of one (batch b, query head h): softcap, ALiBi and the user's score_mod,
/// applied in that order to a tile of scaled scores. No-ops are skipped without a pass.
template <class T, class ScoreMod = NoScoreMod>
class ScoreModifier {
 public:
  ScoreModifier(const AttentionOptions& options, Index n_q, Index n_k, Index b, Index h,
                const ScoreMod& score_mod)
      : offset_(n_k - n_q),
        softcap_(static_cast<T>(options.softcap)),
        alibi_slope_(!options.alibi_slopes.empty() ? static_cast<T>(options.alibi_slopes[h])
                                                   : T(0)),
        has_alibi_(!options.alibi_slopes.empty()),
        b_(b),
        h_(h),
        score_mod_(score_mod) {}

  /// True when apply() changes anything.
  bool active() const { return softcap_ > T(0) || has_alibi_ || kHasScoreMod<ScoreMod>; }

  /// True when ∂s/∂x of the built-in modifiers is not identically 1 (soft-capping): the backward
  /// pass then keeps the unmodified scores x of the tile and calls chain_rule().
  bool scales_gradient() const { return softcap_ > T(0); }

  /// The chain rule through apply() for the built-in modifiers: multiplies g (∂L/∂s, s the
  /// modified scores of a tile) in place by ∂s/∂x at the unmodified scores x = scale·q·k of the
  /// same tile. Soft-capping gives 1 − tanh²(x / softcap); ALiBi adds a term that does not depend
  /// on x (factor 1). A user score_mod has no derivative here: attention_backward() rejects it.
  template <class Raw, class Grad>
  void chain_rule(const Raw& x, Grad& g) const {
    if (softcap_ > T(0)) {
      const T inv = T(1) / softcap_;
      g = (g.array() * (T(1) - (x.array() * inv).tanh().square())).matrix();
    }
  }

  /// Modifies the tile of scores s (rows q0.., columns k0..) in place.
  template <class Scores>
  void apply(Index q0, Index k0, Scores& s) const {
    if (softcap_ > T(0)) {
      const T inv = T(1) / softcap_;
      s = ((s.array() * inv).tanh() * softcap_).matrix();
    }
    if (has_alibi_) {
      for (Index r = 0; r < s.rows(); ++r) {
        const Index aligned = q0 + r + offset_;
        for (Index c = 0; c < s.cols(); ++c) {
          const Index distance = aligned - (k0 + c);
          s(r, c) -= alibi_slope_ * static_cast<T>(distance < 0 ? -distance : distance);
        }
      }
    }
    if constexpr (kHasScoreMod<ScoreMod>) {
      for (Index r = 0; r < s.rows(); ++r) {
        for (Index c = 0; c < s.cols(); ++c) s(r, c) = score_mod_(s(r, c), b_, h_, q0 + r, k0 + c);
      }
    }
  }

 private:
  Index offset_;
  T softcap_;
  T alibi_slope_;
  bool has_alibi_;
  Index b_;
  Index h_;
  const ScoreMod& score_mod_;
};

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
