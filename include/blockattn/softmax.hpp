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
//
// Element types: float, double, Eigen::bfloat16 and Eigen::half rows. A 16-bit row is widened to
// float in registers as it streams (detail/convert.hpp; no converted copy), every max, exp and sum
// is the float computation, and a 16-bit output is rounded once, at the end; so a 16-bit call
// gives bitwise the float call on the widened row, rounded. The special values above hold for
// every format (a NaN or inf in a bf16 row is a NaN or inf of its float).

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <blockattn/detail/check.hpp>
#include <blockattn/detail/config.hpp>
#include <blockattn/detail/convert.hpp>
#include <blockattn/detail/exp.hpp>
#include <blockattn/detail/online_state.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/types.hpp>

// The static_assert message of an output whose element type does not fit the input's.
#define BLOCKATTN_SOFTMAX_OUTPUT_MESSAGE                                                   \
  "blockattn: a softmax output holds the input's element type or its compute type (float " \
  "for bfloat16 and half inputs)"

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {

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
template <class S>
OnlineSoftmax<accumulator_t<S>> online_state_of(const S* x, Index n);
}  // namespace detail::softmax_kernel

/// The running (max, sum) of an online softmax: after seeing x_1..x_n, max = max_j x_j and
/// sum = Σ_j exp(x_j − max). A default-constructed state has seen nothing (max = −inf, sum = 0)
/// and is the identity of merge(); a state that has seen only −inf values is that same state.
/// merge() is the paper's ⊕: associative and commutative up to rounding (each merge adds at most
/// a few ulp of relative error to sum; the max is exact). NaN values are ignored by max and make
/// sum NaN. O(1) space.
/// T is the state's type, float or double (long double too, for checking). A float state takes
/// float, Eigen::bfloat16 and Eigen::half values (widened exactly): the state of 16-bit rows is
/// OnlineSoftmax<accumulator_t<S>>, i.e. OnlineSoftmax<float>, and merges with any other.
template <class T>
struct OnlineSoftmax {
  static_assert(!detail::kIs16BitFloat<T>,
                "blockattn: OnlineSoftmax keeps its state in float for bfloat16 and half rows: "
                "use OnlineSoftmax<float> (OnlineSoftmax<accumulator_t<S>>), whose update() takes "
                "16-bit values");

  T max = detail::kNegativeInfinity<T>;  ///< largest value seen, −inf when none
  T sum = T(0);                          ///< Σ exp(x − max) over the values seen

  /// Adds one value (a bfloat16 or half converts to float exactly). O(1).
  void update(T x) {
    const T new_max = detail::running_max(max, x);
    sum = sum * detail::rescale_factor(max, new_max) + detail::softmax_weight(x, new_max);
    max = new_max;
  }

  /// Adds `n` values with one read from memory (Algorithm 3 of the paper), vectorised: the
  /// values are taken in L1-sized tiles, each tile's (max, sum) computed while it is in L1 and
  /// merged in, so the result equals n calls of update(x) up to rounding. O(n) time, no
  /// allocation. Throws std::invalid_argument if n < 0 or x is null with n > 0.
  void update(const T* x, Index n) { update_row(x, n); }

  /// The same for a row of bfloat16 or half values (T = float): each vector widened in registers
  /// as it is loaded, no copy; the state equals that of the widened row, bitwise. O(n) time, no
  /// allocation.
  template <class S, std::enable_if_t<
                         detail::kIs16BitFloat<S> && std::is_same_v<accumulator_t<S>, T>, int> = 0>
  void update(const S* x, Index n) {
    update_row(x, n);
  }

  /// Adds the values of a row vector (a RowVector, a row of a row-major Matrix, a Map of a
  /// buffer; anything else is copied into a temporary first). Same as update(x.data(), x.size()):
  /// O(n) time.
  void update(const Eigen::Ref<const RowVector<T>>& x) { update(x.data(), x.size()); }

  /// Adds the values of a contiguous vector of bfloat16 or half (T = float; a strided one is a
  /// compile-time error: it is not copied). Same as update(x.data(), x.size()): O(n) time, no
  /// allocation.
  template <class X, std::enable_if_t<detail::kIs16BitFloat<typename X::Scalar>, int> = 0>
  void update(const Eigen::MatrixBase<X>& x) {
    static_assert(std::is_same_v<accumulator_t<typename X::Scalar>, T>,
                  "blockattn: bfloat16 and half values go into an OnlineSoftmax<float>");
    static_assert(X::IsVectorAtCompileTime && (X::Flags & Eigen::DirectAccessBit) != 0 &&
                      X::InnerStrideAtCompileTime == 1,
                  "blockattn: OnlineSoftmax::update takes a contiguous vector of bfloat16 or "
                  "half (a RowVector, a row of a row-major Matrix, a Map of a buffer)");
    update(x.derived().data(), x.size());
  }

  /// Combines with the state of a disjoint set of values: the state of their union. O(1).
  OnlineSoftmax& merge(const OnlineSoftmax& other) {
    detail::merge_row(max, sum, static_cast<T*>(nullptr), other.max, other.sum,
                      static_cast<const T*>(nullptr), 0);  // the one merge rule, without output
    return *this;
  }

  /// log Σ exp(x) over the values seen: −inf when none (or all were −inf), NaN if any was NaN.
  /// O(1).
  T log_sum_exp() const { return max + std::log(sum); }

 private:
  template <class S>
  void update_row(const S* x, Index n) {
    detail::require(n >= 0, "OnlineSoftmax::update", "n is ", n, " but must be >= 0");
    detail::require(n == 0 || x != nullptr, "OnlineSoftmax::update", "x is null but n is ", n);
    merge(detail::softmax_kernel::online_state_of(x, n));
  }
};

namespace detail::softmax_kernel {

// The kernels work on one contiguous row of storage type S (float, double, bfloat16, half) and
// compute in E = accumulator_t<S>. Float and double go through the library's SIMD layer
// (detail/simd.hpp: SSE2 by default, AVX2+FMA or AVX-512 under -march=native) and its exp
// (detail/exp.hpp: simd_exp, <= 2 ulp, exact 0 for −inf, correctly rounded denormals, no
// tables) — the exp the attention kernels use, so softmax() and attention() agree on every
// weight. 16-bit rows are loaded through StorageIo<S> (detail/convert.hpp), widened in registers,
// and then take exactly the float path: same vectors, same order of operations, so the float
// state and weights of a 16-bit row are those of its widened copy, bitwise. Outputs of type Y (S
// or E) are stored through StorageIo<Y>, which rounds once. The last partial vector is padded with
// −inf, so every element of a row goes through the same exp and equal inputs give equal outputs.
// Long double takes the scalar loops. simd_exp is also faster than Eigen's pexp here
// (docs/tuning.md#softmax-exp).

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
template <class S, class E = accumulator_t<S>>
E row_max(const S* x, Index n) {
  E m = kNegativeInfinity<E>;
  Index j = 0;
  if constexpr (kVectorised<E>) {
    using Io = StorageIo<S>;
    using Sd = simd::Simd<E>;
    using V = typename Sd::V;
    constexpr Index w = Sd::kLanes;
    const V lowest = Sd::set1(kNegativeInfinity<E>);
    V m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
    for (; j + 4 * w <= n; j += 4 * w) {
      m0 = max_ignoring_nan<Sd>(m0, Io::load(x + j));
      m1 = max_ignoring_nan<Sd>(m1, Io::load(x + j + w));
      m2 = max_ignoring_nan<Sd>(m2, Io::load(x + j + 2 * w));
      m3 = max_ignoring_nan<Sd>(m3, Io::load(x + j + 3 * w));
    }
    for (; j + w <= n; j += w) m0 = max_ignoring_nan<Sd>(m0, Io::load(x + j));
    if (j < n) {
      m1 = max_ignoring_nan<Sd>(
          m1, Io::load_partial(x + j, static_cast<int>(n - j), kNegativeInfinity<E>));
      j = n;
    }
    m = Sd::reduce_max(Sd::max(Sd::max(m0, m1), Sd::max(m2, m3)));
  }
  for (; j < n; ++j) m = running_max(m, to_compute(x[j]));
  return m;
}

/// The vector part of Σ_j exp(x_j − origin), origin finite (float and double, from storage S), in
/// four running sums (chains) so that exp's latency is hidden. sum_exp() and sum_exp_and_max()
/// share it, and with it the one order in which the chains are reduced.
template <class S>
class ExpSumChains {
 public:
  using E = accumulator_t<S>;
  using Io = StorageIo<S>;
  using Sd = simd::Simd<E>;
  using V = typename Sd::V;
  static constexpr Index kLanes = Sd::kLanes;

  explicit ExpSumChains(E origin) : origin_(Sd::set1(origin)) {}

  /// Adds exp(x_j − origin) for x[0..kLanes) into chain `Chain` (0 to 3).
  template <int Chain>
  void add(const S* x) {
    static_assert(Chain >= 0 && Chain < 4, "blockattn: ExpSumChains has four chains");
    l_[Chain] = Sd::add(l_[Chain], weight(Io::load(x)));
  }

  /// Adds exp(x_j − origin) for x[0..count), 0 < count < kLanes, into chain 1 (the padding lanes
  /// are −inf, whose weight is exactly 0).
  void add_partial(const S* x, Index count) {
    l_[1] =
        Sd::add(l_[1], weight(Io::load_partial(x, static_cast<int>(count), kNegativeInfinity<E>)));
  }

  /// The sum of the four chains.
  E total() const { return Sd::reduce_add(Sd::add(Sd::add(l_[0], l_[1]), Sd::add(l_[2], l_[3]))); }

 private:
  V weight(V v) const { return exp_minus<E>(v, origin_); }

  V origin_;
  V l_[4] = {Sd::zero(), Sd::zero(), Sd::zero(), Sd::zero()};
};

/// Σ_j exp(x_j − origin), origin finite. One read.
template <class S, class E = accumulator_t<S>>
E sum_exp(const S* x, Index n, E origin) {
  E l = E(0);
  Index j = 0;
  if constexpr (kVectorised<E>) {
    constexpr Index w = ExpSumChains<S>::kLanes;
    ExpSumChains<S> sums(origin);
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
  for (; j < n; ++j) l += std::exp(to_compute(x[j]) - origin);
  return l;
}

/// y_j = exp(x_j − origin)·scale, origin finite, rounded once to Y (S or E). One read, one write;
/// y may be x itself (each element is read before it is written, at the same index).
template <class S, class Y, class E = accumulator_t<S>>
void write_scaled_exp(const S* x, Index n, E origin, E scale, Y* y) {
  static_assert(std::is_same_v<accumulator_t<Y>, E>, "blockattn: y holds S or its compute type");
  Index j = 0;
  if constexpr (kVectorised<E>) {
    using In = StorageIo<S>;
    using Out = StorageIo<Y>;
    using Sd = simd::Simd<E>;
    using V = typename Sd::V;
    constexpr Index w = Sd::kLanes;
    const V o = Sd::set1(origin);
    const V c = Sd::set1(scale);
    const auto prob = [&](V v) { return Sd::mul(exp_minus<E>(v, o), c); };
    for (; j + 2 * w <= n; j += 2 * w) {
      const V y0 = prob(In::load(x + j));
      const V y1 = prob(In::load(x + j + w));
      Out::store(y + j, y0);
      Out::store(y + j + w, y1);
    }
    for (; j + w <= n; j += w) Out::store(y + j, prob(In::load(x + j)));
    if (j < n) {
      const int rest = static_cast<int>(n - j);
      Out::store_partial(y + j, rest, prob(In::load_partial(x + j, rest, kNegativeInfinity<E>)));
      j = n;
    }
  }
  for (; j < n; ++j) y[j] = round_to<Y>(std::exp(to_compute(x[j]) - origin) * scale);
}

/// The row for a max of +inf (and any scalar fallback): y_j = softmax_weight(x_j, m)/Σ, which
/// gives the +inf entries equal shares. Two reads, one write; y may be x itself.
template <class S, class Y, class E = accumulator_t<S>>
void write_weights_scalar(const S* x, Index n, E m, Y* y) {
  E l = E(0);
  for (Index j = 0; j < n; ++j) l += softmax_weight(to_compute(x[j]), m);
  const E scale = inverse_or_zero(l);
  for (Index j = 0; j < n; ++j) y[j] = round_to<Y>(softmax_weight(to_compute(x[j]), m) * scale);
}

/// Σ_j exp(a_j − origin) over a[0..na) and max_j b_j over b[0..nb), nb <= na, in one loop: the
/// exps of one tile (already in L1) run between the loads of the next tile (on their way from
/// memory), so the two overlap.
template <class S, class E = accumulator_t<S>>
void sum_exp_and_max(const S* a, Index na, E origin, const S* b, Index nb, E& sum, E& max) {
  E l = E(0);
  E m = kNegativeInfinity<E>;
  Index j = 0;
  if constexpr (kVectorised<E>) {
    using Io = StorageIo<S>;
    using Sd = simd::Simd<E>;
    using V = typename Sd::V;
    constexpr Index w = Sd::kLanes;
    ExpSumChains<S> sums(origin);
    const V lowest = Sd::set1(kNegativeInfinity<E>);
    V m0 = lowest, m1 = lowest;
    for (; j + 4 * w <= nb; j += 4 * w) {
      sums.template add<0>(a + j);
      m0 = max_ignoring_nan<Sd>(m0, Io::load(b + j));
      sums.template add<1>(a + j + w);
      m1 = max_ignoring_nan<Sd>(m1, Io::load(b + j + w));
      sums.template add<2>(a + j + 2 * w);
      m0 = max_ignoring_nan<Sd>(m0, Io::load(b + j + 2 * w));
      sums.template add<3>(a + j + 3 * w);
      m1 = max_ignoring_nan<Sd>(m1, Io::load(b + j + 3 * w));
    }
    l = sums.total();
    m = Sd::reduce_max(Sd::max(m0, m1));
  }
  sum = l + sum_exp(a + j, na - j, origin);
  max = running_max(m, row_max(b + j, nb - j));
}

/// Elements per tile: 16 KiB of the compute type, so that a tile and the next one stay in L1
/// (48 KiB here) between their two reads. Counted in elements of E, not of the storage type, so
/// that a 16-bit row is cut where its widened copy is (8 KiB tiles of bf16: the same sums).
template <class T>
inline constexpr Index kTile = Index(16384 / sizeof(accumulator_t<T>));

/// A tile hook that does nothing (plain online softmax).
struct NoTileHook {
  template <class S, class E>
  void operator()(const S* /*tile*/, Index /*count*/, E /*tile_max*/) const {}
};

/// Algorithm 3 over one row, by tiles: the state (max, sum) of x[0..n) with one read of x from
/// memory. Each tile's max is taken as it arrives from memory, its Σ exp(x − max) from L1 (in the
/// same loop as the next tile's max), and the tile's state is merged into the row's with ⊕.
/// Invariant after each merge: state = (max, Σ exp(x − max)) over the tiles seen. Compared with
/// rescaling per element, no exp is spent on rescales except one per tile, and a row of one tile
/// costs what Safe's first two passes cost. `hook(tile, count, tile_max)` sees every tile once,
/// in order, while it is in L1 (the fused top-k rides on it).
template <class S, class Hook, class E = accumulator_t<S>>
OnlineSoftmax<E> online_reduce(const S* x, Index n, Hook&& hook) {
  OnlineSoftmax<E> state;
  if (n == 0) return state;
  Index start = 0;
  Index count = std::min(kTile<S>, n);
  E tile_max = row_max(x, count);
  for (;;) {
    hook(x + start, count, tile_max);
    const Index next = start + count;
    const Index next_count = std::min(kTile<S>, n - next);
    E tile_sum;
    E next_max;
    sum_exp_and_max(x + start, count, exp_origin(tile_max), x + next, next_count, tile_sum,
                    next_max);
    state.merge(OnlineSoftmax<E>{tile_max, tile_sum});
    if (next_count == 0) break;
    start = next;
    count = next_count;
    tile_max = next_max;
  }
  if (state.max == std::numeric_limits<E>::infinity()) {
    // A tile with max +inf computed exp(inf − inf) = NaN; redo the row with the scalar update,
    // which gives each +inf entry weight 1 (only rows that contain +inf pay for a second read).
    state = OnlineSoftmax<E>{};
    for (Index t = 0; t < n; ++t) state.update(to_compute(x[t]));
  }
  return state;
}

template <class S>
OnlineSoftmax<accumulator_t<S>> online_state_of(const S* x, Index n) {
  return online_reduce(x, n, NoTileHook{});
}

/// Softmax of one row into y (Y = S or accumulator_t<S>, rounded once); y may be x itself.
template <class S, class Y>
void softmax_row(const S* x, Index n, Y* y, SoftmaxAlgorithm algorithm) {
  using E = accumulator_t<S>;
  if (n == 0) return;
  constexpr E kInfinity = std::numeric_limits<E>::infinity();
  switch (algorithm) {
    case SoftmaxAlgorithm::Naive: {
      const E l = sum_exp(x, n, E(0));
      write_scaled_exp(x, n, E(0), inverse_or_zero(l), y);
      return;
    }
    case SoftmaxAlgorithm::Safe: {
      const E m = row_max(x, n);
      if (m == kInfinity) return write_weights_scalar(x, n, m, y);
      const E origin = exp_origin(m);
      write_scaled_exp(x, n, origin, inverse_or_zero(sum_exp(x, n, origin)), y);
      return;
    }
    case SoftmaxAlgorithm::Online: {
      const OnlineSoftmax<E> state = online_state_of(x, n);
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

/// The running top-k of the raw values of a row of S, kept in the caller's output arrays (of Vt,
/// S or accumulator_t<S>, which hold every S exactly): values[0..kept) in descending order,
/// equal values by ascending index. A later equal value never displaces an earlier one, which is
/// the "ties by lower index" rule. Compares in the compute type E.
template <class S, class Vt>
struct RunningTopK {
  using E = accumulator_t<S>;
  Vt* values;
  Index* indices;
  Index k;
  Index kept = 0;

  E kth() const { return to_compute(values[k - 1]); }

  void offer(E v, Index j) {
    Index position;
    if (kept < k) {
      position = kept++;
    } else if (v > kth()) {
      position = k - 1;
    } else {
      return;
    }
    for (; position > 0 && to_compute(values[position - 1]) < v; --position) {
      values[position] = values[position - 1];
      indices[position] = indices[position - 1];
    }
    values[position] = round_to<Vt>(v);  // exact: v is a value of S
    indices[position] = j;
  }

  /// Offers every element of block[0..count), whose first index is j0, skipping whole packets
  /// that cannot beat the current k-th value.
  void scan(const S* block, Index count, Index j0) {
    Index t = 0;
    if constexpr (kVectorised<E>) {
      using Sd = simd::Simd<E>;
      constexpr Index w = Sd::kLanes;
      for (; t + w <= count; t += w) {
        if (kept == k) {
          // Some lane > the k-th value? max(lane, kth) turns NaN lanes into kth (Simd::max's
          // NaN rule), so NaN never counts, as a lane-wise comparison would have it.
          const E threshold = kth();
          if (!(Sd::reduce_max(Sd::max(StorageIo<S>::load(block + t), Sd::set1(threshold))) >
                threshold)) {
            continue;
          }
        }
        for (Index s = t; s < t + w; ++s) offer(to_compute(block[s]), j0 + s);
      }
    }
    for (; t < count; ++t) offer(to_compute(block[t]), j0 + t);
  }
};

/// Algorithm 4: one read of x gives the state and the top-k raw values; the k probabilities are
/// computed from those at the end (in E, rounded once to Vt). Writes min(k, n) entries; k >= 1,
/// n >= 1.
template <class S, class Vt>
Index topk_fused(const S* x, Index n, Index k, Vt* values, Index* indices) {
  using E = accumulator_t<S>;
  RunningTopK<S, Vt> top{values, indices, std::min(k, n)};
  const OnlineSoftmax<E> state = online_reduce(x, n, [&](const S* tile, Index count, E tile_max) {
    if (top.kept == top.k && !(tile_max > top.kth())) return;
    top.scan(tile, count, tile - x);
  });
  const E scale = inverse_or_zero(state.sum);
  for (Index i = 0; i < top.kept; ++i) {
    values[i] = round_to<Vt>(softmax_weight(to_compute(values[i]), state.max) * scale);
  }
  return top.kept;
}

/// The checks of every softmax_topk() form, before anything is written: k >= 0, a valid x
/// (x.size() >= 0, data non-null when non-empty), values and indices long enough for
/// min(k, x.size()) entries and non-null when that is > 0, and no overlap between x, values and
/// indices. Returns min(k, x.size()).
template <class T, class Vt>
Index require_topk_arrays(const char* function, const T* x, Index x_size, Index k, const Vt* values,
                          Index values_size, const Index* indices, Index indices_size) {
  require(k >= 0, function, "k is ", k, " but must be >= 0");
  require(x_size >= 0, function, "x.size() is ", x_size, " but must be >= 0");
  require(x_size == 0 || x != nullptr, function, "x.data() is null but x.size() is ", x_size);
  const Index kept = std::min(k, x_size);
  require(values_size >= kept, function, "values.size() is ", values_size,
          " but min(k, x.size()) is ", kept, " (one value per returned entry)");
  require(indices_size >= kept, function, "indices.size() is ", indices_size,
          " but min(k, x.size()) is ", kept, " (one index per returned entry)");
  require(kept == 0 || (values != nullptr && indices != nullptr), function,
          "values.data() or indices.data() is null but min(k, x.size()) is ", kept);
  const AddressRange x_range = address_range(x, 1, x_size, x_size);
  const AddressRange values_range = address_range(values, 1, kept, kept);
  const AddressRange indices_range = address_range(indices, 1, kept, kept);
  require_disjoint(function, "values", values_range, "x", x_range);
  require_disjoint(function, "indices", indices_range, "x", x_range);
  require_disjoint(function, "indices", indices_range, "values", values_range);
  return kept;
}

/// The checks of the Eigen form of softmax_topk() (and of bench/support's unfused baseline), as
/// require_topk_arrays(). Returns min(k, x.size()).
template <class T, class Vt>
Index require_topk_views(const char* function, const Eigen::Ref<const RowVector<T>>& x, Index k,
                         const Eigen::Ref<RowVector<Vt>>& values,
                         const Eigen::Ref<RowVector<Index>>& indices) {
  return require_topk_arrays(function, x.data(), x.size(), k, values.data(), values.size(),
                             indices.data(), indices.size());
}

/// An output of element type Y for an input of T: T itself, or T's compute type (float for a
/// bfloat16 or half input).
template <class T, class Y>
inline constexpr bool kIsOutputFor = std::is_same_v<Y, T> || std::is_same_v<Y, accumulator_t<T>>;

/// The compile-time checks of softmax_topk()'s Eigen arguments: contiguous vectors of T (x), of T
/// or accumulator_t<T> (values) and of Index (indices), values and indices writable.
template <class T, class X, class V, class I>
constexpr void check_topk_arguments() {
  static_assert(kIsOutputFor<T, typename V::Scalar>, BLOCKATTN_SOFTMAX_OUTPUT_MESSAGE);
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
/// Element types: float, double, Eigen::bfloat16 or Eigen::half, deduced from x; y holds the same
/// type or its compute type accumulator_t (float for bfloat16 and half). A 16-bit x is widened in
/// registers and computed in float; a 16-bit y is rounded once (bitwise round(the float result of
/// the widened x)). x and y row-major storage with contiguous rows (anything else is a
/// compile-time error, as for attention()).
/// Shapes: x [rows, cols], y [rows, cols]; any row strides. Time O(rows·cols), vectorised, single
/// thread; no allocation.
/// Throws std::invalid_argument naming the argument and both sizes if y's shape differs from x's,
/// if y partially overlaps x, or for an invalid algorithm; nothing is written then.
/// In place is supported: y may be x itself (same data, row stride and element type); any other
/// overlap throws.
template <class X, class Y>
void softmax(const Eigen::MatrixBase<X>& x_, const Eigen::MatrixBase<Y>& y_,
             SoftmaxAlgorithm algorithm = SoftmaxAlgorithm::Online) {
  using T = typename X::Scalar;
  using YT = typename Y::Scalar;
  static_assert(detail::kStorageScalar<T>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
  static_assert(detail::softmax_kernel::kIsOutputFor<T, YT>, BLOCKATTN_SOFTMAX_OUTPUT_MESSAGE);
  detail::check_matrix_arguments<T, X>();
  detail::check_matrix_arguments<YT, Y>();
  detail::check_matrix_outputs<Y>();
  const ConstMatrixView<T> x(x_.derived());
  MatrixView<YT> y = detail::writable_view(y_);
  detail::require_size("softmax", "y.rows()", y.rows(), "x.rows()", x.rows(),
                       "y must have x's shape");
  detail::require_size("softmax", "y.cols()", y.cols(), "x.cols()", x.cols(),
                       "y must have x's shape");
  detail::softmax_kernel::require_algorithm("softmax", algorithm);
  const bool same = std::is_same_v<T, YT> &&
                    static_cast<const void*>(x.data()) == static_cast<const void*>(y.data()) &&
                    (x.rows() <= 1 || x.outerStride() == y.outerStride());
  detail::softmax_kernel::require_same_or_disjoint(
      "softmax", "y", detail::address_range(y.data(), y.rows(), y.cols(), y.outerStride()), "x",
      detail::address_range(x.data(), x.rows(), x.cols(), x.outerStride()), same);
  for (Index i = 0; i < x.rows(); ++i) {
    detail::softmax_kernel::softmax_row(x.data() + i * x.outerStride(), x.cols(),
                                        y.data() + i * y.outerStride(), algorithm);
  }
}

/// Softmax of one vector of n contiguous values, x[0..n) → y[0..n); the same contract as the
/// matrix form (a single row), T and Y deduced from the pointers (Y = T or accumulator_t<T>).
/// Throws std::invalid_argument if n < 0, a pointer is null with n > 0, or y partially overlaps x
/// (y == x, in place, is fine). Time O(n), no allocation.
template <class T, class Y>
void softmax(const T* x, Index n, Y* y, SoftmaxAlgorithm algorithm = SoftmaxAlgorithm::Online) {
  static_assert(detail::kStorageScalar<T>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
  static_assert(detail::softmax_kernel::kIsOutputFor<T, Y>, BLOCKATTN_SOFTMAX_OUTPUT_MESSAGE);
  detail::require(n >= 0, "softmax", "n is ", n, " but must be >= 0");
  detail::require(n == 0 || (x != nullptr && y != nullptr), "softmax", "x or y is null but n is ",
                  n);
  detail::softmax_kernel::require_algorithm("softmax", algorithm);
  detail::softmax_kernel::require_same_or_disjoint(
      "softmax", "y", detail::address_range(y, 1, n, n), "x", detail::address_range(x, 1, n, n),
      std::is_same_v<T, Y> && static_cast<const void*>(x) == static_cast<const void*>(y));
  detail::softmax_kernel::softmax_row(x, n, y, algorithm);
}

/// Fused softmax + top-k (Algorithm 4 of the paper): in one read of x, the online normaliser and
/// the k largest raw values; then their probabilities. Writes min(k, n) entries: values[i] is
/// the i-th largest probability and indices[i] its index in x, in descending order of x (so of
/// the exact probability), equal values by lower index. k = 0 writes nothing; k > n writes all n
/// (a full sort). Special values as softmax(); with a NaN in x every returned value is NaN and
/// the indices are unspecified (but distinct and in range).
/// Element types: float, double, Eigen::bfloat16 or Eigen::half, deduced from x; values hold the
/// same type or its compute type (float for bfloat16 and half: the probabilities unrounded);
/// indices hold Index. A 16-bit x is compared and computed widened to float, so the indices and
/// ties are exactly those of the float call on the widened row, and the values that call's,
/// rounded once when values are 16-bit. x, values and indices are contiguous vectors (a
/// RowVector, a row of a row-major Matrix).
/// Returns the number of entries written, min(k, n).
/// Time O(n + r·k), r = the number of times the running top-k changes (expected O(k·log(n/k)) for
/// values in random order, n in the worst case: ascending input); no allocation.
/// Throws std::invalid_argument if k < 0, or values or indices is shorter than min(k, n), or
/// values / indices overlap x or each other; nothing is written then.
template <class X, class V, class I>
Index softmax_topk(const Eigen::MatrixBase<X>& x, Index k, const Eigen::MatrixBase<V>& values,
                   const Eigen::MatrixBase<I>& indices) {
  using T = typename X::Scalar;
  using Vt = typename V::Scalar;
  static_assert(detail::kStorageScalar<T>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
  detail::softmax_kernel::check_topk_arguments<T, X, V, I>();
  const Eigen::Ref<const RowVector<T>> x_view(x.derived());
  Eigen::Ref<RowVector<Vt>> values_view(const_cast<Eigen::MatrixBase<V>&>(values).derived());
  Eigen::Ref<RowVector<Index>> indices_view(const_cast<Eigen::MatrixBase<I>&>(indices).derived());
  const Index kept = detail::softmax_kernel::require_topk_views("softmax_topk", x_view, k,
                                                                values_view, indices_view);
  if (kept == 0) return 0;
  return detail::softmax_kernel::topk_fused(x_view.data(), x_view.size(), k, values_view.data(),
                                            indices_view.data());
}

/// softmax_topk() on sized 1-D arrays: x, values and indices are Spans (pointer and size, a
/// std::vector, a std::array, ...; Span(vector) and Span(pointer, size) deduce the element type).
/// Same contract, cost and memory as the Eigen form. Element types: x's (const or not) float,
/// double, Eigen::bfloat16 or Eigen::half; values of that type or its compute type (float for
/// bfloat16 and half); indices of Index. Throws std::invalid_argument naming the argument and both
/// sizes if values or indices is shorter than min(k, x.size()), and for k < 0, a null data
/// pointer that would be used, or overlapping arrays; nothing is written then.
template <class X, class Vt>
Index softmax_topk(Span<X> x, Index k, Span<Vt> values, Span<Index> indices) {
  using T = std::remove_const_t<X>;
  static_assert(detail::kStorageScalar<T>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
  static_assert(!std::is_const_v<Vt>, "blockattn: softmax_topk's values must be writable");
  static_assert(detail::softmax_kernel::kIsOutputFor<T, Vt>, BLOCKATTN_SOFTMAX_OUTPUT_MESSAGE);
  const Index kept = detail::softmax_kernel::require_topk_arrays("softmax_topk", x.data(), x.size(),
                                                                 k, values.data(), values.size(),
                                                                 indices.data(), indices.size());
  if (kept == 0) return 0;
  return detail::softmax_kernel::topk_fused(static_cast<const T*>(x.data()), x.size(), k,
                                            values.data(), indices.data());
}

}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
