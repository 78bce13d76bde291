#pragma once
// Softmax three ways (naive, safe, online), the online-softmax state that every blockattn kernel
// merges through, and the fused softmax + top-k. Milakov & Gimelshein 2018, "Online normalizer
// calculation for softmax": Algorithm 1 (naive), 2 (safe), 3 (online normaliser), 4 (online
// softmax + top-k); the state merge is the ⊕ of its section 3.1.
//
// Special values, the same for every entry point (decided once, in detail/online_state.hpp):
//   −inf entries get probability 0; a row of only −inf gets all zeros (never NaN);
//   +inf entries share the probability equally and every other entry gets 0;
//   a NaN anywhere in a row makes the whole row NaN.

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <blockattn/detail/check.hpp>
#include <blockattn/detail/exp.hpp>
#include <blockattn/detail/online_state.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/types.hpp>

namespace blockattn {

/// The three softmax algorithms of Milakov & Gimelshein, by memory accesses per element.
enum class SoftmaxAlgorithm {
  /// Σ exp(x), then exp(x)/Σ (Algorithm 1): 2 reads + 1 write. Overflows once exp(x) does (x >
  /// ≈88.7 for float, ≈709.8 for double): that row comes out as zeros and NaNs. Kept for
  /// comparison, not fixed; +inf entries likewise give NaN.
  Naive,
  /// max, then Σ exp(x − max), then exp(x − max)/Σ (Algorithm 2): 3 reads + 1 write. Never
  /// overflows.
  Safe,
  /// max and Σ exp(x − max) together in one pass (Algorithm 3), then exp(x − max)/Σ: 2 reads +
  /// 1 write. As safe as Safe, one read fewer. On the CPU the pass goes by 16 KiB tiles, each
  /// tile's (max, sum) taken while it is in L1 and merged into the row's with the ⊕ of
  /// OnlineSoftmax::merge, so memory is still read once.
  Online,
};

template <class T>
struct OnlineSoftmax;

namespace detail::softmax_kernel {
template <class T>
OnlineSoftmax<T> online_state_of(const T* x, Index n);
}  // namespace detail::softmax_kernel

/// The running (max, sum) of an online softmax: after seeing x_1..x_n, max = max_j x_j and
/// sum = Σ_j exp(x_j − max). A default-constructed state has seen nothing (max = −inf, sum = 0)
/// and is the identity of merge(); a state that has seen only −inf values is that same state.
/// merge() is the paper's ⊕: associative and commutative up to rounding (each merge adds at most
/// a few ulp of relative error to sum; the max is exact). NaN values are ignored by max and make
/// sum NaN. O(1) space.
template <class T>
struct OnlineSoftmax {
  T max = detail::kNegativeInfinity<T>;  ///< largest value seen, −inf when none
  T sum = T(0);                          ///< Σ exp(x − max) over the values seen

  /// Adds one value. O(1).
  void update(T x) {
    const T new_max = detail::running_max(max, x);
    sum = sum * detail::rescale_factor(max, new_max) + detail::softmax_weight(x, new_max);
    max = new_max;
  }

  /// Adds `n` values with one read from memory (Algorithm 3 of the paper), vectorised: the
  /// values are taken in L1-sized tiles, each tile's (max, sum) computed while it is in L1 and
  /// merged in, so the result equals n calls of update(x) up to rounding. O(n) time, no
  /// allocation. Throws std::invalid_argument if n < 0 or x is null with n > 0.
  void update(const T* x, Index n) {
    detail::require(n >= 0, "OnlineSoftmax::update", "n is ", n, " but must be >= 0");
    detail::require(n == 0 || x != nullptr, "OnlineSoftmax::update", "x is null but n is ", n);
    merge(detail::softmax_kernel::online_state_of(x, n));
  }

  /// Adds the values of a row vector (a RowVector, a row of a row-major Matrix, a Map of a
  /// buffer; anything else is copied into a temporary first). Same as update(x.data(), x.size()).
  void update(const Eigen::Ref<const RowVector<T>>& x) { update(x.data(), x.size()); }

  /// Combines with the state of a disjoint set of values: the state of their union. O(1).
  OnlineSoftmax& merge(const OnlineSoftmax& other) {
    detail::merge_row(max, sum, static_cast<T*>(nullptr), other.max, other.sum,
                      static_cast<const T*>(nullptr), 0);  // the one merge rule, without output
    return *this;
  }

  /// log Σ exp(x) over the values seen: −inf when none (or all were −inf), NaN if any was NaN.
  T log_sum_exp() const { return max + std::log(sum); }
};

namespace detail::softmax_kernel {

// The kernels work on one contiguous row. Float and double go through the library's SIMD layer
// (detail/simd.hpp: SSE2 by default, AVX2+FMA or AVX-512 under -march=native) and its exp
// (detail/exp.hpp: simd_exp, <= 2 ulp, exact 0 for −inf, correctly rounded denormals, no
// tables) — the exp the attention kernels use, so softmax() and attention() agree on every
// weight. The last partial vector is padded with −inf, so every element of a row goes through
// the same exp and equal inputs give equal outputs. Long double takes the scalar loops.
// simd_exp is also faster than Eigen's pexp here (docs/tuning.md#softmax-exp).

template <class T>
inline constexpr bool kVectorised = std::is_same_v<T, float> || std::is_same_v<T, double>;
// The loops below take four vectors per iteration: four independent chains hide the latency of
// exp and of the reductions.

/// Lane-wise running_max(): x > m ? x : m, so a NaN x is ignored (m is never NaN). Simd::max(a,
/// b) gives b when either is NaN.
template <class S>
typename S::V max_ignoring_nan(typename S::V m, typename S::V x) {
  return S::max(x, m);
}

/// exp(v − origin) lane-wise: the unnormalised weights of a row whose exp origin is `origin`.
template <class T>
typename simd::Simd<T>::V exp_minus(typename simd::Simd<T>::V v, typename simd::Simd<T>::V origin) {
  return simd_exp<T>(simd::Simd<T>::sub(v, origin));
}

/// 1/l, or 0 for l = 0 (a row of only −inf comes out as zeros). NaN stays NaN.
template <class T>
T inverse_or_zero(T l) {
  return l == T(0) ? T(0) : T(1) / l;
}

/// max_j x_j with NaN ignored; −inf for n = 0. One read.
template <class T>
T row_max(const T* x, Index n) {
  T m = kNegativeInfinity<T>;
  Index j = 0;
  if constexpr (kVectorised<T>) {
    using S = simd::Simd<T>;
    using V = typename S::V;
    constexpr Index w = S::kLanes;
    const V lowest = S::set1(kNegativeInfinity<T>);
    V m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
    for (; j + 4 * w <= n; j += 4 * w) {
      m0 = max_ignoring_nan<S>(m0, S::load(x + j));
      m1 = max_ignoring_nan<S>(m1, S::load(x + j + w));
      m2 = max_ignoring_nan<S>(m2, S::load(x + j + 2 * w));
      m3 = max_ignoring_nan<S>(m3, S::load(x + j + 3 * w));
    }
    for (; j + w <= n; j += w) m0 = max_ignoring_nan<S>(m0, S::load(x + j));
    if (j < n) {
      m1 = max_ignoring_nan<S>(
          m1, S::load_partial(x + j, static_cast<int>(n - j), kNegativeInfinity<T>));
      j = n;
    }
    m = S::reduce_max(S::max(S::max(m0, m1), S::max(m2, m3)));
  }
  for (; j < n; ++j) m = running_max(m, x[j]);
  return m;
}

/// The vector part of Σ_j exp(x_j − origin), origin finite (float and double), in four running
/// sums (chains) so that exp's latency is hidden. sum_exp() and sum_exp_and_max() share it, and
/// with it the one order in which the chains are reduced.
template <class T>
class ExpSumChains {
 public:
  using S = simd::Simd<T>;
  using V = typename S::V;
  static constexpr Index kLanes = S::kLanes;

  explicit ExpSumChains(T origin) : origin_(S::set1(origin)) {}

  /// Adds exp(x_j − origin) for x[0..kLanes) into chain `Chain` (0 to 3).
  template <int Chain>
  void add(const T* x) {
    static_assert(Chain >= 0 && Chain < 4, "blockattn: ExpSumChains has four chains");
    l_[Chain] = S::add(l_[Chain], weight(S::load(x)));
  }

  /// Adds exp(x_j − origin) for x[0..count), 0 < count < kLanes, into chain 1 (the padding lanes
  /// are −inf, whose weight is exactly 0).
  void add_partial(const T* x, Index count) {
    l_[1] =
        S::add(l_[1], weight(S::load_partial(x, static_cast<int>(count), kNegativeInfinity<T>)));
  }

  /// The sum of the four chains.
  T total() const { return S::reduce_add(S::add(S::add(l_[0], l_[1]), S::add(l_[2], l_[3]))); }

 private:
  V weight(V v) const { return exp_minus<T>(v, origin_); }

  V origin_;
  V l_[4] = {S::zero(), S::zero(), S::zero(), S::zero()};
};

/// Σ_j exp(x_j − origin), origin finite. One read.
template <class T>
T sum_exp(const T* x, Index n, T origin) {
  T l = T(0);
  Index j = 0;
  if constexpr (kVectorised<T>) {
    constexpr Index w = ExpSumChains<T>::kLanes;
    ExpSumChains<T> sums(origin);
    for (; j + 4 * w <= n; j += 4 * w) {
      sums.template add<0>(x + j);
      sums.template add<1>(x + j + w);
      sums.template add<2>(x + j + 2 * w);
      sums.template add<3>(x + j + 3 * w);
    }
    for (; j + w <= n; j += w) sums.template add<0>(x + j);
    if (j < n) {
      sums.add_partial(x + j, n - j);
      j = n;
    }
    l = sums.total();
  }
  for (; j < n; ++j) l += std::exp(x[j] - origin);
  return l;
}

/// y_j = exp(x_j − origin)·scale, origin finite. One read, one write; y may be x itself (each
/// element is read before it is written, at the same index).
template <class T>
void write_scaled_exp(const T* x, Index n, T origin, T scale, T* y) {
  Index j = 0;
  if constexpr (kVectorised<T>) {
    using S = simd::Simd<T>;
    using V = typename S::V;
    constexpr Index w = S::kLanes;
    const V o = S::set1(origin);
    const V c = S::set1(scale);
    const auto prob = [&](V v) { return S::mul(exp_minus<T>(v, o), c); };
    for (; j + 2 * w <= n; j += 2 * w) {
      const V y0 = prob(S::load(x + j));
      const V y1 = prob(S::load(x + j + w));
      S::store(y + j, y0);
      S::store(y + j + w, y1);
    }
    for (; j + w <= n; j += w) S::store(y + j, prob(S::load(x + j)));
    if (j < n) {
      const int rest = static_cast<int>(n - j);
      S::store_partial(y + j, rest, prob(S::load_partial(x + j, rest, kNegativeInfinity<T>)));
      j = n;
    }
  }
  for (; j < n; ++j) y[j] = std::exp(x[j] - origin) * scale;
}

/// The row for a max of +inf (and any scalar fallback): y_j = softmax_weight(x_j, m)/Σ, which
/// gives the +inf entries equal shares. Two reads, one write; y may be x itself.
template <class T>
void write_weights_scalar(const T* x, Index n, T m, T* y) {
  T l = T(0);
  for (Index j = 0; j < n; ++j) l += softmax_weight(x[j], m);
  const T scale = inverse_or_zero(l);
  for (Index j = 0; j < n; ++j) y[j] = softmax_weight(x[j], m) * scale;
}

/// Σ_j exp(a_j − origin) over a[0..na) and max_j b_j over b[0..nb), nb <= na, in one loop: the
/// exps of one tile (already in L1) run between the loads of the next tile (on their way from
/// memory), so the two overlap.
template <class T>
void sum_exp_and_max(const T* a, Index na, T origin, const T* b, Index nb, T& sum, T& max) {
  T l = T(0);
  T m = kNegativeInfinity<T>;
  Index j = 0;
  if constexpr (kVectorised<T>) {
    using S = simd::Simd<T>;
    using V = typename S::V;
    constexpr Index w = S::kLanes;
    ExpSumChains<T> sums(origin);
    const V lowest = S::set1(kNegativeInfinity<T>);
    V m0 = lowest, m1 = lowest;
    for (; j + 4 * w <= nb; j += 4 * w) {
      sums.template add<0>(a + j);
      m0 = max_ignoring_nan<S>(m0, S::load(b + j));
      sums.template add<1>(a + j + w);
      m1 = max_ignoring_nan<S>(m1, S::load(b + j + w));
      sums.template add<2>(a + j + 2 * w);
      m0 = max_ignoring_nan<S>(m0, S::load(b + j + 2 * w));
      sums.template add<3>(a + j + 3 * w);
      m1 = max_ignoring_nan<S>(m1, S::load(b + j + 3 * w));
    }
    l = sums.total();
    m = S::reduce_max(S::max(m0, m1));
  }
  sum = l + sum_exp(a + j, na - j, origin);
  max = running_max(m, row_max(b + j, nb - j));
}

/// Elements per tile: 16 KiB, so that a tile and the next one stay in L1 (48 KiB here) between
/// their two reads.
template <class T>
inline constexpr Index kTile = Index(16384 / sizeof(T));

/// A tile hook that does nothing (plain online softmax).
struct NoTileHook {
  template <class T>
  void operator()(const T* /*tile*/, Index /*count*/, T /*tile_max*/) const {}
};

/// Algorithm 3 over one row, by tiles: the state (max, sum) of x[0..n) with one read of x from
/// memory. Each tile's max is taken as it arrives from memory, its Σ exp(x − max) from L1 (in the
/// same loop as the next tile's max), and the tile's state is merged into the row's with ⊕.
/// Invariant after each merge: state = (max, Σ exp(x − max)) over the tiles seen. Compared with
/// rescaling per element, no exp is spent on rescales except one per tile, and a row of one tile
/// costs what Safe's first two passes cost. `hook(tile, count, tile_max)` sees every tile once,
/// in order, while it is in L1 (the fused top-k rides on it).
template <class T, class Hook>
OnlineSoftmax<T> online_reduce(const T* x, Index n, Hook&& hook) {
  OnlineSoftmax<T> state;
  if (n == 0) return state;
  Index start = 0;
  Index count = std::min(kTile<T>, n);
  T tile_max = row_max(x, count);
  for (;;) {
    hook(x + start, count, tile_max);
    const Index next = start + count;
    const Index next_count = std::min(kTile<T>, n - next);
    T tile_sum;
    T next_max;
    sum_exp_and_max(x + start, count, exp_origin(tile_max), x + next, next_count, tile_sum,
                    next_max);
    state.merge(OnlineSoftmax<T>{tile_max, tile_sum});
    if (next_count == 0) break;
    start = next;
    count = next_count;
    tile_max = next_max;
  }
  if (state.max == std::numeric_limits<T>::infinity()) {
    // A tile with max +inf computed exp(inf − inf) = NaN; redo the row with the scalar update,
    // which gives each +inf entry weight 1 (only rows that contain +inf pay for a second read).
    state = OnlineSoftmax<T>{};
    for (Index t = 0; t < n; ++t) state.update(x[t]);
  }
  return state;
}

template <class T>
OnlineSoftmax<T> online_state_of(const T* x, Index n) {
  return online_reduce(x, n, NoTileHook{});
}

/// Softmax of one row, y may be x itself.
template <class T>
void softmax_row(const T* x, Index n, T* y, SoftmaxAlgorithm algorithm) {
  if (n == 0) return;
  constexpr T kInfinity = std::numeric_limits<T>::infinity();
  switch (algorithm) {
    case SoftmaxAlgorithm::Naive: {
      const T l = sum_exp(x, n, T(0));
      write_scaled_exp(x, n, T(0), inverse_or_zero(l), y);
      return;
    }
    case SoftmaxAlgorithm::Safe: {
      const T m = row_max(x, n);
      if (m == kInfinity) return write_weights_scalar(x, n, m, y);
      const T origin = exp_origin(m);
      write_scaled_exp(x, n, origin, inverse_or_zero(sum_exp(x, n, origin)), y);
      return;
    }
    case SoftmaxAlgorithm::Online: {
      const OnlineSoftmax<T> state = online_state_of(x, n);
      if (state.max == kInfinity) return write_weights_scalar(x, n, state.max, y);
      write_scaled_exp(x, n, exp_origin(state.max), inverse_or_zero(state.sum), y);
      return;
    }
  }
}

inline void require_algorithm(const char* function, SoftmaxAlgorithm algorithm) {
  require(algorithm == SoftmaxAlgorithm::Naive || algorithm == SoftmaxAlgorithm::Safe ||
              algorithm == SoftmaxAlgorithm::Online,
          function, "algorithm is ", static_cast<int>(algorithm),
          ", not a SoftmaxAlgorithm enumerator");
}

/// y must be x itself (in place) or disjoint from it.
inline void require_same_or_disjoint(const char* function, const char* output_name,
                                     AddressRange output, const char* input_name,
                                     AddressRange input, bool same) {
  if (same) return;
  if (overlaps(output, input)) {
    throw_invalid_argument(concat("blockattn::", function, ": ", output_name,
                                  " overlaps the memory of ", input_name, " (", output_name,
                                  " must be ", input_name, " itself or disjoint from it)"));
  }
}

/// The running top-k of the raw values, kept in the caller's output arrays: values[0..kept) in
/// descending order, equal values by ascending index. A later equal value never displaces an
/// earlier one, which is the "ties by lower index" rule.
template <class T>
struct RunningTopK {
  T* values;
  Index* indices;
  Index k;
  Index kept = 0;

  void offer(T v, Index j) {
    Index position;
    if (kept < k) {
      position = kept++;
    } else if (v > values[k - 1]) {
      position = k - 1;
    } else {
      return;
    }
    for (; position > 0 && values[position - 1] < v; --position) {
      values[position] = values[position - 1];
      indices[position] = indices[position - 1];
    }
    values[position] = v;
    indices[position] = j;
  }

  /// Offers every element of block[0..count), whose first index is j0, skipping whole packets
  /// that cannot beat the current k-th value.
  void scan(const T* block, Index count, Index j0) {
    Index t = 0;
    if constexpr (kVectorised<T>) {
      using S = simd::Simd<T>;
      constexpr Index w = S::kLanes;
      for (; t + w <= count; t += w) {
        if (kept == k) {
          // Some lane > the k-th value? max(lane, kth) turns NaN lanes into kth (Simd::max's
          // NaN rule), so NaN never counts, as a lane-wise comparison would have it.
          const T kth = values[k - 1];
          if (!(S::reduce_max(S::max(S::load(block + t), S::set1(kth))) > kth)) continue;
        }
        for (Index s = t; s < t + w; ++s) offer(block[s], j0 + s);
      }
    }
    for (; t < count; ++t) offer(block[t], j0 + t);
  }
};

/// Algorithm 4: one read of x gives the state and the top-k raw values; the k probabilities are
/// computed from those at the end. Writes min(k, n) entries; k >= 1, n >= 1.
template <class T>
Index topk_fused(const T* x, Index n, Index k, T* values, Index* indices) {
  RunningTopK<T> top{values, indices, std::min(k, n)};
  const OnlineSoftmax<T> state = online_reduce(x, n, [&](const T* tile, Index count, T tile_max) {
    if (top.kept == top.k && !(tile_max > top.values[top.k - 1])) return;
    top.scan(tile, count, tile - x);
  });
  const T scale = inverse_or_zero(state.sum);
  for (Index i = 0; i < top.kept; ++i) values[i] = softmax_weight(values[i], state.max) * scale;
  return top.kept;
}

template <class T>
void require_topk_arguments(const char* function, const T* x, Index n, Index k, const T* values,
                            const Index* indices) {
  require(n >= 0, function, "n is ", n, " but must be >= 0");
  require(k >= 0, function, "k is ", k, " but must be >= 0");
  require(n == 0 || x != nullptr, function, "x is null but n is ", n);
  const Index kept = std::min(k, n);
  require(kept == 0 || (values != nullptr && indices != nullptr), function,
          "values or indices is null but min(k, n) is ", kept);
  const AddressRange x_range = address_range(x, 1, n, n);
  const AddressRange values_range = address_range(values, 1, kept, kept);
  const AddressRange indices_range = address_range(indices, 1, kept, kept);
  require_disjoint(function, "values", values_range, "x", x_range);
  require_disjoint(function, "indices", indices_range, "x", x_range);
  require_disjoint(function, "indices", indices_range, "values", values_range);
}

/// The checks of the Eigen form of softmax_topk() (and of bench/support's unfused baseline): k >=
/// 0, values and indices long enough for min(k, x.size()) entries, then require_topk_arguments().
/// Returns min(k, x.size()).
template <class T>
Index require_topk_views(const char* function, const Eigen::Ref<const RowVector<T>>& x, Index k,
                         const Eigen::Ref<RowVector<T>>& values,
                         const Eigen::Ref<RowVector<Index>>& indices) {
  require(k >= 0, function, "k is ", k, " but must be >= 0");
  const Index kept = std::min(k, x.size());
  require(values.size() >= kept, function, "values.size() is ", values.size(),
          " but min(k, x.size()) is ", kept, " (one value per returned entry)");
  require(indices.size() >= kept, function, "indices.size() is ", indices.size(),
          " but min(k, x.size()) is ", kept, " (one index per returned entry)");
  require_topk_arguments(function, x.data(), x.size(), k, values.data(), indices.data());
  return kept;
}

/// The compile-time checks of softmax_topk()'s Eigen arguments: contiguous vectors of T (x,
/// values) and of Index (indices), values and indices writable.
template <class T, class X, class V, class I>
constexpr void check_topk_arguments() {
  static_assert(std::is_same_v<typename V::Scalar, T>,
                "blockattn: every matrix argument must have the same element type");
  static_assert(std::is_same_v<typename I::Scalar, Index>,
                "blockattn: softmax_topk's indices must hold blockattn::Index");
  static_assert(X::IsVectorAtCompileTime && V::IsVectorAtCompileTime && I::IsVectorAtCompileTime &&
                    kIsRowMajorStorage<X> && kIsWritableRowMajorStorage<V> &&
                    kIsWritableRowMajorStorage<I>,
                "blockattn: softmax_topk takes contiguous vectors (a RowVector, a row of a "
                "row-major Matrix); values and indices writable");
}

}  // namespace detail::softmax_kernel

/// Row-wise softmax: y(i, j) = exp(x(i, j) − m_i) / Σ_j' exp(x(i, j') − m_i), m_i = max_j x(i, j),
/// computed by `algorithm` (see SoftmaxAlgorithm for accesses per element and Naive's overflow).
/// Special values: −inf entries give 0, a row of only −inf gives all zeros, +inf entries share
/// the row's probability equally (others 0), a NaN makes its whole row NaN.
/// Element types: float or double, deduced from x (y must match); x and y row-major storage with
/// contiguous rows (anything else is a compile-time error, as for attention()).
/// Shapes: x [rows, cols], y [rows, cols]; any row strides. Time O(rows·cols), vectorised, single
/// thread; no allocation.
/// Throws std::invalid_argument naming the argument and both sizes if y's shape differs from x's,
/// if y partially overlaps x, or for an invalid algorithm; nothing is written then.
/// In place is supported: y may be x itself (same data and row stride); any other overlap throws.
template <class X, class Y>
void softmax(const Eigen::MatrixBase<X>& x_, const Eigen::MatrixBase<Y>& y_,
             SoftmaxAlgorithm algorithm = SoftmaxAlgorithm::Online) {
  using T = typename X::Scalar;
  static_assert(detail::kKernelScalar<T>, BLOCKATTN_KERNEL_SCALAR_MESSAGE);
  detail::check_matrix_arguments<T, X, Y>();
  detail::check_matrix_outputs<Y>();
  const ConstMatrixView<T> x(x_.derived());
  MatrixView<T> y = detail::writable_view(y_);
  detail::require_size("softmax", "y.rows()", y.rows(), "x.rows()", x.rows(),
                       "y must have x's shape");
  detail::require_size("softmax", "y.cols()", y.cols(), "x.cols()", x.cols(),
                       "y must have x's shape");
  detail::softmax_kernel::require_algorithm("softmax", algorithm);
  const bool same = x.data() == y.data() && (x.rows() <= 1 || x.outerStride() == y.outerStride());
  detail::softmax_kernel::require_same_or_disjoint(
      "softmax", "y", detail::address_range(y.data(), y.rows(), y.cols(), y.outerStride()), "x",
      detail::address_range(x.data(), x.rows(), x.cols(), x.outerStride()), same);
  for (Index i = 0; i < x.rows(); ++i) {
    detail::softmax_kernel::softmax_row(x.data() + i * x.outerStride(), x.cols(),
                                        y.data() + i * y.outerStride(), algorithm);
  }
}

/// Softmax of one vector of n contiguous values, x[0..n) → y[0..n); the same contract as the
/// matrix form (a single row), T deduced from the pointers. Throws std::invalid_argument if n < 0,
/// a pointer is null with n > 0, or y partially overlaps x (y == x, in place, is fine).
template <class T>
void softmax(const T* x, Index n, T* y, SoftmaxAlgorithm algorithm = SoftmaxAlgorithm::Online) {
  static_assert(detail::kKernelScalar<T>, BLOCKATTN_KERNEL_SCALAR_MESSAGE);
  detail::require(n >= 0, "softmax", "n is ", n, " but must be >= 0");
  detail::require(n == 0 || (x != nullptr && y != nullptr), "softmax", "x or y is null but n is ",
                  n);
  detail::softmax_kernel::require_algorithm("softmax", algorithm);
  detail::softmax_kernel::require_same_or_disjoint("softmax", "y",
                                                   detail::address_range(y, 1, n, n), "x",
                                                   detail::address_range(x, 1, n, n), x == y);
  detail::softmax_kernel::softmax_row(x, n, y, algorithm);
}

/// Fused softmax + top-k (Algorithm 4 of the paper): in one read of x, the online normaliser and
/// the k largest raw values; then their probabilities. Writes min(k, n) entries: values[i] is
/// the i-th largest probability and indices[i] its index in x, in descending order of x (so of
/// the exact probability), equal values by lower index. k = 0 writes nothing; k > n writes all n
/// (a full sort). Special values as softmax(); with a NaN in x every returned value is NaN and
/// the indices are unspecified (but distinct and in range).
/// Element types: float or double, deduced from x (values must match; indices hold Index); x,
/// values and indices are contiguous vectors (a RowVector, a row of a row-major Matrix).
/// Returns the number of entries written, min(k, n).
/// Time O(n + r·k), r = the number of times the running top-k changes (expected O(k·log(n/k)) for
/// values in random order, n in the worst case: ascending input); no allocation.
/// Throws std::invalid_argument if k < 0, or values or indices is shorter than min(k, n), or
/// values / indices overlap x or each other; nothing is written then.
template <class X, class V, class I>
Index softmax_topk(const Eigen::MatrixBase<X>& x, Index k, const Eigen::MatrixBase<V>& values,
                   const Eigen::MatrixBase<I>& indices) {
  using T = typename X::Scalar;
  static_assert(detail::kKernelScalar<T>, BLOCKATTN_KERNEL_SCALAR_MESSAGE);
  detail::softmax_kernel::check_topk_arguments<T, X, V, I>();
  const Eigen::Ref<const RowVector<T>> x_view(x.derived());
  Eigen::Ref<RowVector<T>> values_view(const_cast<Eigen::MatrixBase<V>&>(values).derived());
  Eigen::Ref<RowVector<Index>> indices_view(const_cast<Eigen::MatrixBase<I>&>(indices).derived());
  const Index kept = detail::softmax_kernel::require_topk_views("softmax_topk", x_view, k,
                                                                values_view, indices_view);
  if (kept == 0) return 0;
  return detail::softmax_kernel::topk_fused(x_view.data(), x_view.size(), k, values_view.data(),
                                            indices_view.data());
}

/// softmax_topk() on raw buffers: x[0..n), values and indices with room for min(k, n) entries
/// (which cannot be checked here). Same contract otherwise; also throws for n < 0 or a null
/// pointer that would be used.
template <class T>
Index softmax_topk(const T* x, Index n, Index k, T* values, Index* indices) {
  static_assert(detail::kKernelScalar<T>, BLOCKATTN_KERNEL_SCALAR_MESSAGE);
  detail::softmax_kernel::require_topk_arguments("softmax_topk", x, n, k, values, indices);
  if (std::min(k, n) == 0) return 0;
  return detail::softmax_kernel::topk_fused(x, n, k, values, indices);
}

}  // namespace blockattn
