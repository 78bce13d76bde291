#pragma once
// Register-blocked micro-kernels for one attention tile (a block of query rows against a chunk of
// keys), written once over the SIMD layer (detail/simd.hpp):
//
// clang-format off
//   pack_k / pack_v          copy a K chunk / V chunk into the panel layouts below (caller's buffer)
//   score_tile               S = Q_blk · K_chunkᵀ  (unscaled dot products)
//   softmax_tile_update      S ← P = exp(scale·S − m_new), m, l updated, acc rescaled (one row
//                            sweep; the online-softmax rules of detail/online_state.hpp)
//   accumulate_pv            acc += P · V_chunk
//   score_rows_direct,       the same two products on unpacked K / V, for one to a few query rows
//   accumulate_pv_direct     (decode), where packing would cost as much as the products
// clang-format on
//
// One tile step of the forward pass is therefore
//   score_tile(q, …, packed_k, kc, s, ld_s);       // then write −inf into masked s entries
//   softmax_tile_update(s, ld_s, rows, kc, scale, m, l, acc, ld_acc, d_v);
//   accumulate_pv(s, ld_s, rows, kc, packed_v, d_v, acc, ld_acc);
// with the invariant, per row i, over the keys seen so far:
//   acc_i = Σ_j exp(x_ij − exp_origin(m_i))·v_j,  l_i = Σ_j exp(x_ij − exp_origin(m_i)),
//   m_i = max_j x_ij  (x = scale·s; NaN ignored by the max).
//
// Packing layouts (L = Simd<T>::kLanes; every buffer comes from the caller, nothing allocates):
//   K chunk [n_keys, d] → panels of KeyPanel = KeyVectors·L keys. Panel p (keys j0 = p·KeyPanel …)
//     starts at packed_k + j0·d; its width w is KeyPanel, or round_up(rest, L) for the last one;
//     element (key j0 + jj, feature c) is at [c·w + jj]; keys past n_keys are 0.
//     Size: packed_k_size(n_keys, d) = round_up(n_keys, L)·d.
//   V chunk [n_keys, d_v] → panels of ValuePanel = ValueVectors·L columns. Panel starting at
//     column c0 starts at packed_v + c0·n_keys; its width w is ValuePanel or round_up(rest, L);
//     element (key j, column c0 + cc) is at [j·w + cc]; columns past d_v are 0.
//     Size: packed_v_size(n_keys, d_v) = round_up(d_v, L)·n_keys.
// Scores and accumulators are row-major with a caller-chosen stride:
//   s:   ld_s   >= round_up(n_keys, L)   (score_tile writes the padded columns: 0)
//   acc: ld_acc >= round_up(d_v, L)      (accumulate_pv adds 0 into the padded columns)
//
// Register blocks: Rows query rows × KeyVectors (resp. ValueVectors) vectors of accumulators;
// tails in rows and in panels are handled by smaller compile-time instantiations (no masking in
// the inner loop). The defaults per ISA are in RegisterBlock
// (docs/tuning.md#register-block-avx512).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <blockattn/detail/config.hpp>
#include <blockattn/detail/convert.hpp>
#include <blockattn/detail/exp.hpp>
#include <blockattn/detail/online_state.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

/// Compile-time register blocking for the current ISA.
template <class T>
struct RegisterBlock {
  static constexpr int kLanes = simd::Simd<T>::kLanes;
#if defined(BLOCKATTN_SIMD_AVX512)
  // 32 zmm registers: 16 accumulators, 2 panel loads, 8 broadcasts per 16 FMAs; fastest of the
  // shapes tried (docs/tuning.md#register-block-avx512).
  static constexpr int kRows = 8;
  static constexpr int kKeyVectors = 2;
  static constexpr int kValueVectors = 2;
#elif defined(BLOCKATTN_SIMD_NEON)
  // 32 q registers; not measured: the AVX-512 choice scaled to 4 lanes
  // (docs/tuning.md#register-block-neon).
  static constexpr int kRows = 8;
  static constexpr int kKeyVectors = 2;
  static constexpr int kValueVectors = 2;
#elif defined(BLOCKATTN_SIMD_AVX2) || defined(BLOCKATTN_SIMD_SSE2)
  // 16 registers: 6 × 2 = 12 accumulators + 2 panel vectors + 1 broadcast (+1 for SSE2's
  // separate multiply); fastest of the shapes tried (docs/tuning.md#register-block-avx2).
  static constexpr int kRows = 6;
  static constexpr int kKeyVectors = 2;
  static constexpr int kValueVectors = 2;
#else
  static constexpr int kRows = 4;
  static constexpr int kKeyVectors = 4;
  static constexpr int kValueVectors = 4;
#endif
  static constexpr int kKeyPanel = kKeyVectors * kLanes;
  static constexpr int kValuePanel = kValueVectors * kLanes;
};

/// x rounded up to a multiple of m > 0.
constexpr Index round_up(Index x, Index m) { return (x + m - 1) / m * m; }

/// Calls f(std::integral_constant<int, count>{}) for 1 <= count <= Max: a runtime count turned
/// into a compile-time one, so tails run a smaller fully unrolled block.
template <int Max, class F>
inline void with_count(int count, F&& f) {
  if constexpr (Max > 1) {
    if (count < Max) {
      with_count<Max - 1>(count, f);
      return;
    }
  }
  f(std::integral_constant<int, Max>{});
}

/// The per-row scales of a quantized (int8) K or V in the direct kernels: row j's values are
/// scale[j·ld]·q, each product rounded once in float (the value the prefill path packs, so both
/// paths see the same floats). Unused (null) for every other storage type.
struct RowScales {
  const float* data = nullptr;
  Index ld = 0;

  /// The scales from row r on.
  RowScales from(Index r) const { return {data == nullptr ? nullptr : data + r * ld, ld}; }
};

/// A loaded K or V vector of row storage KS as the kernels compute with it: for int8, times the
/// row's scale (one rounding, as the scalar float(q)·scale); otherwise unchanged.
template <class KS, class V>
BLOCKATTN_ALWAYS_INLINE V scale_row(V x, const RowScales& scales, Index row) {
  if constexpr (std::is_same_v<KS, std::int8_t>) {
    using S = simd::Simd<float>;
    return S::mul(x, S::set1(scales.data[row * scales.ld]));
  } else {
    static_cast<void>(scales);
    static_cast<void>(row);
    return x;
  }
}

/// One stored K or V element of row `row` as the kernels compute with it: for int8,
/// float(x)·scale (rounded once, as scale_row); otherwise static_cast<T>(x), exact.
template <class T, class KS>
BLOCKATTN_ALWAYS_INLINE T element_of(KS x, const RowScales& scales, Index row) {
  if constexpr (std::is_same_v<KS, std::int8_t>) {
    return static_cast<float>(x) * scales.data[row * scales.ld];
  } else {
    static_cast<void>(scales);
    static_cast<void>(row);
    return static_cast<T>(x);
  }
}

/// Elements of the packed K chunk buffer: round_up(n_keys, L)·d.
template <class T>
constexpr Index packed_k_size(Index n_keys, Index d) {
  return round_up(n_keys, simd::Simd<T>::kLanes) * d;
}

/// Elements of the packed V chunk buffer: round_up(d_v, L)·n_keys.
template <class T>
constexpr Index packed_v_size(Index n_keys, Index d_v) {
  return round_up(d_v, simd::Simd<T>::kLanes) * n_keys;
}

/// The smallest row stride of the score tile (and of acc for d_v): round_up(cols, L).
template <class T>
constexpr Index padded_stride(Index cols) {
  return round_up(cols, simd::Simd<T>::kLanes);
}

/// Packs rows [0, n_keys) of k (row stride ld_k, d features) into `packed` (packed_k_size
/// elements, any alignment) in the K panel layout described at the top of this header. k may hold
/// a 16-bit storage format S (widened exactly to T on the way: the conversion is paid once per
/// packed chunk).
template <class T, int KeyVectors = RegisterBlock<T>::kKeyVectors, class S = T>
inline void pack_k(const S* k, Index ld_k, Index n_keys, Index d, T* packed,
                   const RowScales& scales = {}) {
  constexpr Index kLanes = simd::Simd<T>::kLanes;
  constexpr Index kPanel = KeyVectors * kLanes;
  for (Index j0 = 0; j0 < n_keys; j0 += kPanel) {
    const Index keys = std::min(kPanel, n_keys - j0);
    const Index width = round_up(keys, kLanes);
    T* dst = packed + j0 * d;
    for (Index jj = 0; jj < keys; ++jj) {
      const S* src = k + (j0 + jj) * ld_k;
      for (Index c = 0; c < d; ++c) dst[c * width + jj] = element_of<T>(src[c], scales, j0 + jj);
    }
    for (Index c = 0; c < d; ++c) {
      for (Index jj = keys; jj < width; ++jj) dst[c * width + jj] = T(0);
    }
  }
}

/// Packs rows [0, n_keys) of v (row stride ld_v, d_v columns) into `packed` (packed_v_size
/// elements) in the V panel layout described at the top of this header. v may hold a 16-bit
/// storage format VS (widened exactly to T, StorageIo).
template <class T, int ValueVectors = RegisterBlock<T>::kValueVectors, class VS = T>
inline void pack_v(const VS* v, Index ld_v, Index n_keys, Index d_v, T* packed,
                   const RowScales& scales = {}) {
  using S = simd::Simd<T>;
  using Io = StorageIo<VS>;
  static_assert(std::is_same_v<typename Io::E, T>, "blockattn: V widens to the packed type");
  constexpr Index kLanes = S::kLanes;
  constexpr Index kPanel = ValueVectors * kLanes;
  for (Index c0 = 0; c0 < d_v; c0 += kPanel) {
    const Index cols = std::min(kPanel, d_v - c0);
    const Index width = round_up(cols, kLanes);
    const Index full = cols / kLanes * kLanes;
    T* dst = packed + c0 * n_keys;
    for (Index j = 0; j < n_keys; ++j) {
      const VS* src = v + j * ld_v + c0;
      T* row = dst + j * width;
      // Whole vectors explicitly: GCC -O2 does not vectorise a loop of unknown count.
      for (Index cc = 0; cc < full; cc += kLanes) {
        S::store(row + cc, scale_row<VS>(Io::load(src + cc), scales, j));
      }
      for (Index cc = full; cc < cols; ++cc) row[cc] = element_of<T>(src[cc], scales, j);
      for (Index cc = cols; cc < width; ++cc) row[cc] = T(0);
    }
  }
}

/// One Rows × (Vectors·L) block of S = Q·Kᵀ over d features, from one packed K panel of width
/// Vectors·L. Accumulators stay in registers for the whole d loop.
template <class T, int Rows, int Vectors>
inline void score_block(const T* BLOCKATTN_RESTRICT q, Index ld_q, Index d,
                        const T* BLOCKATTN_RESTRICT panel, T* BLOCKATTN_RESTRICT s, Index ld_s) {
  using S = simd::Simd<T>;
  using V = typename S::V;
  constexpr int kLanes = S::kLanes;
  static_assert(Rows <= 16 && Vectors <= 16, "blockattn: BLOCKATTN_UNROLL(16) must cover them");
  // Every loop over r and t unrolled, so acc is registers at -O2 too (BLOCKATTN_UNROLL).
  V acc[Rows][Vectors];
  BLOCKATTN_UNROLL(16)
  for (int r = 0; r < Rows; ++r) {
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < Vectors; ++t) acc[r][t] = S::zero();
  }
  for (Index c = 0; c < d; ++c) {
    V kv[Vectors];
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < Vectors; ++t) kv[t] = S::load(panel + c * (Vectors * kLanes) + t * kLanes);
    BLOCKATTN_UNROLL(16)
    for (int r = 0; r < Rows; ++r) {
      const V qb = S::set1(q[r * ld_q + c]);
      BLOCKATTN_UNROLL(16)
      for (int t = 0; t < Vectors; ++t) acc[r][t] = S::fma(qb, kv[t], acc[r][t]);
    }
  }
  BLOCKATTN_UNROLL(16)
  for (int r = 0; r < Rows; ++r) {
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < Vectors; ++t) S::store(s + r * ld_s + t * kLanes, acc[r][t]);
  }
}

/// S[i, j] = Σ_c q[i, c]·k[j, c] for i < rows, j < round_up(n_keys, L) (the padded columns get 0).
/// q: rows × d, row stride ld_q; packed_k: pack_k of the same n_keys, d and KeyVectors;
/// s: row stride ld_s >= padded_stride<T>(n_keys). rows, n_keys, d >= 0.
template <class T, int Rows = RegisterBlock<T>::kRows,
          int KeyVectors = RegisterBlock<T>::kKeyVectors>
inline void score_tile(const T* q, Index ld_q, Index rows, Index d, const T* packed_k, Index n_keys,
                       T* s, Index ld_s) {
  constexpr Index kLanes = simd::Simd<T>::kLanes;
  constexpr Index kPanel = KeyVectors * kLanes;
  for (Index j0 = 0; j0 < n_keys; j0 += kPanel) {
    const int vectors = static_cast<int>((std::min(kPanel, n_keys - j0) + kLanes - 1) / kLanes);
    const T* panel = packed_k + j0 * d;
    with_count<KeyVectors>(vectors, [&](auto nv) {
      for (Index i0 = 0; i0 < rows; i0 += Rows) {
        const int r = static_cast<int>(std::min<Index>(Rows, rows - i0));
        with_count<Rows>(r, [&](auto nr) {
          score_block<T, decltype(nr)::value, decltype(nv)::value>(q + i0 * ld_q, ld_q, d, panel,
                                                                   s + i0 * ld_s + j0, ld_s);
        });
      }
    });
  }
}

/// One Rows × (Vectors·L) block of acc += P·V over n_keys keys, from one packed V panel.
template <class T, int Rows, int Vectors>
inline void pv_block(const T* BLOCKATTN_RESTRICT p, Index ld_p, Index n_keys,
                     const T* BLOCKATTN_RESTRICT panel, T* BLOCKATTN_RESTRICT acc, Index ld_acc) {
  using S = simd::Simd<T>;
  using V = typename S::V;
  constexpr int kLanes = S::kLanes;
  static_assert(Rows <= 16 && Vectors <= 16, "blockattn: BLOCKATTN_UNROLL(16) must cover them");
  // Every loop over r and t unrolled, so a is registers at -O2 too (BLOCKATTN_UNROLL).
  V a[Rows][Vectors];
  BLOCKATTN_UNROLL(16)
  for (int r = 0; r < Rows; ++r) {
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < Vectors; ++t) a[r][t] = S::load(acc + r * ld_acc + t * kLanes);
  }
  for (Index j = 0; j < n_keys; ++j) {
    V vv[Vectors];
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < Vectors; ++t) vv[t] = S::load(panel + j * (Vectors * kLanes) + t * kLanes);
    BLOCKATTN_UNROLL(16)
    for (int r = 0; r < Rows; ++r) {
      const V pb = S::set1(p[r * ld_p + j]);
      BLOCKATTN_UNROLL(16)
      for (int t = 0; t < Vectors; ++t) a[r][t] = S::fma(pb, vv[t], a[r][t]);
    }
  }
  BLOCKATTN_UNROLL(16)
  for (int r = 0; r < Rows; ++r) {
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < Vectors; ++t) S::store(acc + r * ld_acc + t * kLanes, a[r][t]);
  }
}

/// acc[i, c] += Σ_{j < n_keys} p[i, j]·v[j, c] for i < rows, c < round_up(d_v, L) (the padded
/// columns get + 0). p: rows × n_keys, row stride ld_p (the score tile after
/// softmax_tile_update); packed_v: pack_v of the same n_keys, d_v and ValueVectors;
/// acc: row stride ld_acc >= padded_stride<T>(d_v).
template <class T, int Rows = RegisterBlock<T>::kRows,
          int ValueVectors = RegisterBlock<T>::kValueVectors>
inline void accumulate_pv(const T* p, Index ld_p, Index rows, Index n_keys, const T* packed_v,
                          Index d_v, T* acc, Index ld_acc) {
  constexpr Index kLanes = simd::Simd<T>::kLanes;
  constexpr Index kPanel = ValueVectors * kLanes;
  for (Index c0 = 0; c0 < d_v; c0 += kPanel) {
    const int vectors = static_cast<int>((std::min(kPanel, d_v - c0) + kLanes - 1) / kLanes);
    const T* panel = packed_v + c0 * n_keys;
    with_count<ValueVectors>(vectors, [&](auto nv) {
      for (Index i0 = 0; i0 < rows; i0 += Rows) {
        const int r = static_cast<int>(std::min<Index>(Rows, rows - i0));
        with_count<Rows>(r, [&](auto nr) {
          pv_block<T, decltype(nr)::value, decltype(nv)::value>(p + i0 * ld_p, ld_p, n_keys, panel,
                                                                acc + i0 * ld_acc + c0, ld_acc);
        });
      }
    });
  }
}

// softmax_tile_update, the fused sweep, lives in detail/online_state.hpp with the rest of the
// online-softmax rules.

/// Unpacked variants for a few query rows (decode: one token of the query heads that share a kv
/// head), where packing K would cost as much as the products themselves
/// (docs/tuning.md#direct-rows): both read K and V in place, row-major,
/// any row stride, no padding required. Each K / V row is loaded into registers once and used
/// for every query row of a block of up to kDirectBlockRows rows, so a decode step streams the
/// chunk from memory once, sequentially, instead of once per row from L2 with the memory idle
/// in between.
///
/// Query rows per register block, and accumulator vectors per block: rows × keys (scores) or
/// rows × value vectors (P·V) accumulators plus the operand loads fit the ISA's registers.
inline constexpr int kDirectBlockRows = 8;
/// 16 with 32 vector registers (AVX-512, NEON), 8 with 16 (AVX2, SSE2).
template <class T>
inline constexpr int kDirectAccumulators =
    RegisterBlock<T>::kRows* RegisterBlock<T>::kKeyVectors >= 16 ? 16 : 8;

/// Software prefetch for the direct kernels: while working on row j of K (or V), fetch row
/// j + ahead, for rows below `limit` (counted from the same base; may run past the chunk into the
/// next one, so the stream does not pause between chunks). ahead = 0: off. A hint only: no
/// effect on results; compiled out where the compiler has no prefetch builtin.
struct RowPrefetch {
  Index ahead = 0;  ///< rows ahead of the current one
  Index limit = 0;  ///< rows that may be fetched, from the kernel's base pointer
};

/// Prefetches (for reading) the cache lines of `count` elements from p.
template <class T>
inline void prefetch_row(const T* p, Index count) {
#if defined(__GNUC__) || defined(__clang__)
  const auto first = reinterpret_cast<std::uintptr_t>(p) / 64 * 64;
  const auto end = reinterpret_cast<std::uintptr_t>(p + count);
  for (std::uintptr_t line = first; line < end; line += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(line), /*rw=*/0, /*locality=*/3);
  }
#else
  static_cast<void>(p);
  static_cast<void>(count);
#endif
}

/// Rows × Keys scores s[r, t] = q_r · k_t over d = full + rest features, each a single FMA chain
/// along d then one horizontal sum. The sums of kLanes accumulators are taken together
/// (reduce_add_lanes: a shuffle tree, ~3 operations a score instead of ~2·log2(kLanes)), bitwise
/// equal to one reduce_add each, so a score does not depend on Rows or Keys. K rows hold KS
/// (T, or a 16-bit format widened in registers by StorageIo as they are loaded: the same FMAs on
/// the same float values as a float K).
template <class T, int Rows, int Keys, class KS = T>
BLOCKATTN_ALWAYS_INLINE void score_rows_block(const T* BLOCKATTN_RESTRICT q, Index ld_q, Index full,
                                              int rest, const KS* BLOCKATTN_RESTRICT k, Index ld_k,
                                              T* BLOCKATTN_RESTRICT s, Index ld_s,
                                              const RowScales& k_scales = {}) {
  using S = simd::Simd<T>;
  using Io = StorageIo<KS>;
  static_assert(std::is_same_v<typename Io::E, T>, "blockattn: K widens to the query type");
  using V = typename S::V;
  constexpr int kLanes = S::kLanes;
  constexpr int kCount = Rows * Keys;
  static_assert(kCount <= 16 && kLanes <= 16, "blockattn: BLOCKATTN_UNROLL(16) must cover them");
  // Every loop over the accumulators unrolled, so acc is registers at -O2 too (BLOCKATTN_UNROLL).
  V acc[kCount];
  BLOCKATTN_UNROLL(16)
  for (int a = 0; a < kCount; ++a) acc[a] = S::zero();
  for (Index c = 0; c < full; c += kLanes) {
    V kv[Keys];
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < Keys; ++t) kv[t] = scale_row<KS>(Io::load(k + t * ld_k + c), k_scales, t);
    BLOCKATTN_UNROLL(16)
    for (int r = 0; r < Rows; ++r) {
      const V qv = S::load(q + r * ld_q + c);
      BLOCKATTN_UNROLL(16)
      for (int t = 0; t < Keys; ++t) acc[r * Keys + t] = S::fma(qv, kv[t], acc[r * Keys + t]);
    }
  }
  if (rest > 0) {
    V kv[Keys];
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < Keys; ++t) {
      kv[t] = scale_row<KS>(Io::load_partial(k + t * ld_k + full, rest, T(0)), k_scales, t);
    }
    BLOCKATTN_UNROLL(16)
    for (int r = 0; r < Rows; ++r) {
      const V qv = S::load_partial(q + r * ld_q + full, rest, T(0));
      BLOCKATTN_UNROLL(16)
      for (int t = 0; t < Keys; ++t) acc[r * Keys + t] = S::fma(qv, kv[t], acc[r * Keys + t]);
    }
  }
  if constexpr (kCount == 1) {
    s[0] = S::reduce_add(acc[0]);
  } else {
    BLOCKATTN_UNROLL(16)
    for (int g = 0; g < kCount; g += kLanes) {
      V group[kLanes];
      BLOCKATTN_UNROLL(16)
      for (int i = 0; i < kLanes; ++i) group[i] = g + i < kCount ? acc[g + i] : S::zero();
      const V sums = S::reduce_add_lanes(group);
      if constexpr (Rows == 1 && Keys % kLanes == 0) {
        S::store(s + g, sums);
      } else {
        alignas(64) T lanes[kLanes];
        S::store(lanes, sums);
        BLOCKATTN_UNROLL(16)
        for (int i = 0; i < kLanes; ++i) {  // one exit: GCC ignores the pragma on two
          if (g + i < kCount) s[(g + i) / Keys * ld_s + (g + i) % Keys] = lanes[i];
        }
      }
    }
  }
}

/// s[i, j] = Σ_c q[i, c]·k[j, c] for i < rows, j < n_keys: vectorised along d, one FMA chain per
/// score, then one horizontal sum per score. Keys outermost: each K row is read once per block
/// of kDirectBlockRows query rows. Writes only j < n_keys. k may hold a 16-bit format KS,
/// converted in registers (no copy of K).
template <class T, class KS>
inline void score_rows_direct(const T* q, Index ld_q, Index rows, Index d, const KS* k, Index ld_k,
                              Index n_keys, T* s, Index ld_s, RowPrefetch prefetch = {},
                              const RowScales& k_scales = {}) {
  constexpr Index kLanes = simd::Simd<T>::kLanes;
  const Index full = d / kLanes * kLanes;
  const int rest = static_cast<int>(d - full);
  for (Index i0 = 0; i0 < rows; i0 += kDirectBlockRows) {
    const int count = static_cast<int>(std::min<Index>(kDirectBlockRows, rows - i0));
    with_count<kDirectBlockRows>(count, [&](auto nr) {
      constexpr int kRows = decltype(nr)::value;
      // As many keys as the accumulator registers hold: one row takes a whole vector of keys.
      constexpr int kKeys = std::max(1, kDirectAccumulators<T> / kRows);
      const T* qi = q + i0 * ld_q;
      T* si = s + i0 * ld_s;
      const bool fetch = i0 == 0 && prefetch.ahead > 0;
      Index j = 0;
      for (; j + kKeys <= n_keys; j += kKeys) {
        if (fetch) {
          for (Index t = j + prefetch.ahead;
               t < std::min(j + kKeys + prefetch.ahead, prefetch.limit); ++t) {
            prefetch_row(k + t * ld_k, d);
          }
        }
        score_rows_block<T, kRows, kKeys, KS>(qi, ld_q, full, rest, k + j * ld_k, ld_k, si + j,
                                              ld_s, k_scales.from(j));
      }
      for (; j < n_keys; ++j) {
        score_rows_block<T, kRows, 1, KS>(qi, ld_q, full, rest, k + j * ld_k, ld_k, si + j, ld_s,
                                          k_scales.from(j));
      }
    });
  }
}

/// acc[r, c0 + t·L + cc] += Σ_j p[r, j]·v[j, c0 + t·L + cc] for r < Rows, t < Vectors (the last
/// one partial, `rest` lanes, when rest > 0): one FMA chain per accumulator vector along j. V rows
/// hold VS (T, or a 16-bit format widened in registers as loaded).
template <class T, int Rows, int Vectors, class VS = T>
inline void pv_rows_block(const T* BLOCKATTN_RESTRICT p, Index ld_p, Index n_keys,
                          const VS* BLOCKATTN_RESTRICT v, Index ld_v, int rest,
                          T* BLOCKATTN_RESTRICT acc, Index ld_acc, RowPrefetch prefetch,
                          Index row_elements, const RowScales& v_scales = {}) {
  using S = simd::Simd<T>;
  using Io = StorageIo<VS>;
  static_assert(std::is_same_v<typename Io::E, T>, "blockattn: V widens to the accumulator type");
  using V = typename S::V;
  constexpr Index kLanes = S::kLanes;
  constexpr int kLast = Vectors - 1;
  static_assert(Rows <= 16 && Vectors <= 16, "blockattn: BLOCKATTN_UNROLL(16) must cover them");
  // Every loop over r and t unrolled, so a is registers at -O2 too (BLOCKATTN_UNROLL).
  V a[Rows][Vectors];
  BLOCKATTN_UNROLL(16)
  for (int r = 0; r < Rows; ++r) {
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < kLast; ++t) a[r][t] = S::load(acc + r * ld_acc + t * kLanes);
    a[r][kLast] = rest > 0 ? S::load_partial(acc + r * ld_acc + kLast * kLanes, rest, T(0))
                           : S::load(acc + r * ld_acc + kLast * kLanes);
  }
  for (Index j = 0; j < n_keys; ++j) {
    if (prefetch.ahead > 0 && j + prefetch.ahead < prefetch.limit) {
      prefetch_row(v + (j + prefetch.ahead) * ld_v, row_elements);
    }
    V vv[Vectors];
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < kLast; ++t) {
      vv[t] = scale_row<VS>(Io::load(v + j * ld_v + t * kLanes), v_scales, j);
    }
    vv[kLast] = scale_row<VS>(rest > 0 ? Io::load_partial(v + j * ld_v + kLast * kLanes, rest, T(0))
                                       : Io::load(v + j * ld_v + kLast * kLanes),
                              v_scales, j);
    BLOCKATTN_UNROLL(16)
    for (int r = 0; r < Rows; ++r) {
      const V pb = S::set1(p[r * ld_p + j]);
      BLOCKATTN_UNROLL(16)
      for (int t = 0; t < Vectors; ++t) a[r][t] = S::fma(pb, vv[t], a[r][t]);
    }
  }
  BLOCKATTN_UNROLL(16)
  for (int r = 0; r < Rows; ++r) {
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < kLast; ++t) S::store(acc + r * ld_acc + t * kLanes, a[r][t]);
    if (rest > 0) {
      S::store_partial(acc + r * ld_acc + kLast * kLanes, rest, a[r][kLast]);
    } else {
      S::store(acc + r * ld_acc + kLast * kLanes, a[r][kLast]);
    }
  }
}

/// acc[i, c] += Σ_{j < n_keys} p[i, j]·v[j, c] for i < rows, c < d_v, reading v in place (row
/// stride ld_v): vectorised along d_v, one FMA chain per accumulator vector along the keys. Each
/// V element is loaded once per block of kDirectBlockRows rows and column panel (a panel is as
/// many vectors as the registers hold for the block; the panels of one chunk re-read it from L1/L2,
/// not from memory). Writes only c < d_v (no padding needed). v may hold a 16-bit format VS,
/// converted in registers (no copy of V).
template <class T, class VS>
inline void accumulate_pv_direct(const T* p, Index ld_p, Index rows, Index n_keys, const VS* v,
                                 Index ld_v, Index d_v, T* acc, Index ld_acc,
                                 RowPrefetch prefetch = {}, const RowScales& v_scales = {}) {
  constexpr Index kLanes = simd::Simd<T>::kLanes;
  const Index vectors = (d_v + kLanes - 1) / kLanes;
  const int rest = static_cast<int>(d_v % kLanes);
  for (Index i0 = 0; i0 < rows; i0 += kDirectBlockRows) {
    const int count = static_cast<int>(std::min<Index>(kDirectBlockRows, rows - i0));
    with_count<kDirectBlockRows>(count, [&](auto nr) {
      constexpr int kRows = decltype(nr)::value;
      constexpr int kPanel = std::clamp(kDirectAccumulators<T> / kRows, 1, 4);
      const T* pi = p + i0 * ld_p;
      T* ai = acc + i0 * ld_acc;
      for (Index t0 = 0; t0 < vectors; t0 += kPanel) {
        const int panel = static_cast<int>(std::min<Index>(kPanel, vectors - t0));
        const int panel_rest = t0 + panel == vectors ? rest : 0;
        with_count<kPanel>(panel, [&](auto nv) {
          const bool fetch = i0 == 0 && t0 == 0 && prefetch.ahead > 0;
          pv_rows_block<T, kRows, decltype(nv)::value, VS>(
              pi, ld_p, n_keys, v + t0 * kLanes, ld_v, panel_rest, ai + t0 * kLanes, ld_acc,
              fetch ? prefetch : RowPrefetch{}, d_v, v_scales);
        });
      }
    });
  }
}

/// Rows of the score tile that the prefill loop computes at a time: a query block shares one
/// packed K/V chunk (amortising the packing), but each S tile stays small enough for L1/L2.
/// 96 = 16 register blocks of 6 rows (docs/tuning.md#tile-rows).
inline constexpr Index kTileRows = 96;

// Decode: blocks of at most this many rows (query heads × queries) read K and V in place instead
// of packing them: packing costs more per element than one row's products
// (docs/tuning.md#direct-rows).
inline constexpr Index kDirectRows = 8;

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
