#pragma once
// The prefill's two products on bf16 pairs (issue 17 item 3): built only where the compiler
// targets AVX512_BF16 (__AVX512BF16__ on the AVX-512 path, e.g. -march=znver4 or -march=native on
// Zen 4/5), and used only when q, k and v are all stored as Eigen::bfloat16 (prefill_keys_bf16 in
// detail/prefill_kernel.hpp). Q·Kᵀ runs on q and K pairs; P·V rounds P to bf16 and runs on P and
// V pairs (keys paired), both with vdpbf16ps into float accumulators. The softmax (max, exp, row
// sum l, rescaling) stays in float on the float scores, and l sums the unrounded p. Elsewhere (no
// AVX512_BF16, float/double/half storage) nothing here is compiled and the widening path of
// detail/microkernel.hpp runs. A K/V chunk with a non-finite value keeps P·V in float (the NaN
// slow path of detail/non_finite_values.hpp needs float P and V). AMX tiles, where a machine has
// them, would be a third score/P·V kernel pair beside these, chosen at the same place.
//
// How it computes. vdpbf16ps multiplies bf16 pairs and adds both products into a float
// accumulator. bf16 has an 8-bit significand, so every product is exact in float (16 bits ≤ 24);
// only the additions round, as in the widening path's FMA chain. The result therefore differs from
// the widened float path only in summation order and rounding: the pair's two products are added
// one after the other into the accumulator, and the scale is applied to the finished dot product
// (scale·(q·k)) instead of to q first ((scale·q)·k). Both stay within d·u_float·Σ|q||k| (plus one
// rounding for the scale) of the exact score. One difference in kind: vdpbf16ps treats subnormal
// bf16 inputs as zero and flushes subnormal results to zero (whatever MXCSR says); a score that
// small is far below anything the softmax can see next to a normal one.
//
// P in bf16. Each p_j ∈ [0, 1] is rounded to nearest even (relative error ≤ u_bf16 = 2^-8;
// below 2^-126 it becomes 0, against a row sum l ≥ 1), the products p̃_j·v_jc are exact and only
// the float additions round, so out[i, c] moves by at most u_bf16·Σ_j p_j·|v_jc| / l beyond the
// float path's error: the same order as rounding out to bf16 at the end, which every all-bf16 call
// pays anyway. Issue 17 allows P in bf16 while the measured error stays within 2× the widening
// path's: tests/attention_bf16dot_test.cpp checks it; the figures are in docs/performance.md.
//
// Layouts (words are 32-bit: one bf16 pair, feature 2p in the low half, 2p + 1 in the high half;
// an odd d pads the last pair's high half with +0 in both q and k):
//   K chunk [n_keys, d] → panels of KeyPanel = KeyVectors·16 keys, as pack_k's float layout but
//     over pairs: panel p (keys j0 = p·KeyPanel …) starts at word j0·pairs; its width w is
//     KeyPanel, or round_up(rest, 16); word (key j0 + jj, pair c) is at [c·w + jj]; keys past
//     n_keys are 0. Words: round_up(n_keys, 16)·pairs ≤ packed_k_size<float>(n_keys, d), so the
//     float path's workspace buffer holds it.
//   q block [rows, d] → rows of `pairs` words (unscaled), ≤ the float queries buffer [rows, d].
//   V chunk [n_keys, d_v] → key pairs (word = keys 2m, 2m + 1 of one column; an odd n_keys pads
//     the last pair's high half with +0), panels of ValuePanel = ValueVectors·16 columns as
//     pack_v's float layout: the panel at column c0 starts at word c0·key_pairs; its width w is
//     ValuePanel or round_up(rest, 16); word (pair m, column c0 + cc) is at [m·w + cc]; columns
//     past d_v are 0. Words: round_up(d_v, 16)·key_pairs ≤ packed_v_size<float>(n_keys, d_v).
//   P sub-tile [rows, n_keys] → rounded in place: row i of the float score tile (stride ld_s)
//     begins with its key_pairs words.
// The buffers are the workspace's float buffers reused; they are written and read only through
// memcpy and intrinsics (no aliasing through a typed pointer).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include <blockattn/detail/config.hpp>
#include <blockattn/detail/microkernel.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/types.hpp>

#if defined(BLOCKATTN_SIMD_AVX512) && defined(__AVX512BF16__)
#include <immintrin.h>
#define BLOCKATTN_BF16_DOT 1
#endif

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

/// Whether a K/V source packs bf16 pairs for the dot path (pack_k_pairs; detail/kv_source.hpp).
template <class Source, class = void>
inline constexpr bool kPacksPairs = false;
template <class Source>
inline constexpr bool kPacksPairs<
    Source,
    std::void_t<decltype(std::declval<const Source&>().pack_k_pairs(Index{}, Index{}, nullptr))>> =
    true;

#if defined(BLOCKATTN_BF16_DOT)

/// Whether a prefill with q stored as QS and K as KS computes its scores on bf16 pairs.
template <class QS, class KS>
inline constexpr bool kBf16DotScores =
    std::is_same_v<QS, Eigen::bfloat16>&& std::is_same_v<KS, Eigen::bfloat16>;

/// bf16 pairs (words) of d features.
constexpr Index bf16_pairs(Index d) { return (d + 1) / 2; }

/// r[i] lane j <-> r[j] lane i: a 16 x 16 transpose of 32-bit words in registers, in four rounds
/// of 16 shuffles (pairs of words, pairs of pairs, then 128-bit lanes twice).
BLOCKATTN_ALWAYS_INLINE void transpose_words_16x16(__m512i* r) {
  // The masked forms with all lanes set: GCC 12's unmasked ones read an uninitialised
  // _mm512_undefined_*() and trip -Wmaybe-uninitialized (see detail/simd.hpp).
  constexpr __mmask16 kAll16 = 0xFFFF;
  constexpr __mmask8 kAll8 = 0xFF;
  __m512i t[16];
  BLOCKATTN_UNROLL(8)
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane L: t[2i] = r2i[4L], r2i+1[4L], r2i[4L+1], ...
    t[2 * i] = _mm512_mask_unpacklo_epi32(r[2 * i], kAll16, r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_mask_unpackhi_epi32(r[2 * i], kAll16, r[2 * i], r[2 * i + 1]);
  }
  BLOCKATTN_UNROLL(4)
  for (int i = 0; i < 4; ++i) {  // r[4i + k], lane L: rows 4i .. 4i + 3 of column 4L + k
    r[4 * i] = _mm512_mask_unpacklo_epi64(t[4 * i], kAll8, t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_mask_unpackhi_epi64(t[4 * i], kAll8, t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_mask_unpacklo_epi64(t[4 * i + 1], kAll8, t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_mask_unpackhi_epi64(t[4 * i + 1], kAll8, t[4 * i + 1], t[4 * i + 3]);
  }
  // Column 4L + k gathers lane L of r[k], r[4 + k], r[8 + k], r[12 + k]. 0x88 picks lanes 0 and 2
  // of each source, 0xDD lanes 1 and 3.
  BLOCKATTN_UNROLL(4)
  for (int k = 0; k < 4; ++k) {
    const __m512i even_low = _mm512_mask_shuffle_i32x4(r[k], kAll16, r[k], r[4 + k], 0x88);
    const __m512i odd_low = _mm512_mask_shuffle_i32x4(r[k], kAll16, r[k], r[4 + k], 0xDD);
    const __m512i even_high =
        _mm512_mask_shuffle_i32x4(r[8 + k], kAll16, r[8 + k], r[12 + k], 0x88);
    const __m512i odd_high = _mm512_mask_shuffle_i32x4(r[8 + k], kAll16, r[8 + k], r[12 + k], 0xDD);
    t[k] = _mm512_mask_shuffle_i32x4(even_low, kAll16, even_low, even_high, 0x88);  // column k
    t[8 + k] =
        _mm512_mask_shuffle_i32x4(even_low, kAll16, even_low, even_high, 0xDD);      // column 8 + k
    t[4 + k] = _mm512_mask_shuffle_i32x4(odd_low, kAll16, odd_low, odd_high, 0x88);  // column 4 + k
    t[12 + k] =
        _mm512_mask_shuffle_i32x4(odd_low, kAll16, odd_low, odd_high, 0xDD);  // column 12 + k
  }
  BLOCKATTN_UNROLL(16)
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

/// Packs rows [0, n_keys) of k (row stride ld_k, d features) into `panel` (the K pair layout at
/// the top of this header; any 4-byte-aligned buffer of at least round_up(n_keys, 16)·pairs words).
/// 16 keys × 16 pairs at a time: 16 row loads, one register transpose, 16 stores of one pair's
/// words for 16 keys (copied word by word, every word is a store to another cache line). Features
/// past d and keys past n_keys pack as +0.
template <int KeyVectors = RegisterBlock<float>::kKeyVectors>
inline void pack_k_bf16_pairs(const Eigen::bfloat16* k, Index ld_k, Index n_keys, Index d,
                              void* panel) {
  constexpr Index kLanes = 16;
  constexpr Index kPanel = KeyVectors * kLanes;
  const Index pairs = bf16_pairs(d);
  auto* bytes = static_cast<unsigned char*>(panel);
  for (Index j0 = 0; j0 < n_keys; j0 += kPanel) {
    const Index keys = std::min(kPanel, n_keys - j0);
    const Index width = round_up(keys, kLanes);
    unsigned char* dst = bytes + 4 * j0 * pairs;
    for (Index g = 0; g < width; g += kLanes) {
      const Index rows = std::min(kLanes, keys - g);
      for (Index c0 = 0; c0 < pairs; c0 += kLanes) {
        const Index features = std::min(2 * kLanes, d - 2 * c0);  // bf16 values of each row
        const auto mask =
            features == 2 * kLanes ? ~__mmask32{0} : static_cast<__mmask32>((1u << features) - 1u);
        __m512i r[kLanes];
        BLOCKATTN_UNROLL(16)
        for (Index i = 0; i < kLanes; ++i) {
          r[i] = i < rows ? _mm512_maskz_loadu_epi16(mask, k + (j0 + g + i) * ld_k + 2 * c0)
                          : _mm512_setzero_si512();
        }
        transpose_words_16x16(r);
        const Index columns = std::min(kLanes, pairs - c0);
        for (Index c = 0; c < columns; ++c) {
          _mm512_storeu_si512(dst + 4 * ((c0 + c) * width + g), r[c]);
        }
      }
    }
  }
}

/// Packs `rows` query rows (row stride ld_q, d features, stored bf16, unscaled) into `dst` as
/// rows of bf16_pairs(d) words.
inline void pack_q_bf16_pairs(const Eigen::bfloat16* q, Index ld_q, Index rows, Index d,
                              void* dst) {
  const Index pairs = bf16_pairs(d);
  auto* bytes = static_cast<unsigned char*>(dst);
  for (Index r = 0; r < rows; ++r) {
    const Eigen::bfloat16* src = q + r * ld_q;
    unsigned char* row = bytes + 4 * r * pairs;
    if (d % 2 == 0) {
      std::memcpy(row, src, static_cast<std::size_t>(2 * d));
    } else {
      std::memcpy(row, src, static_cast<std::size_t>(2 * d));
      std::memset(row + 2 * d, 0, 2);
    }
  }
}

/// One Rows × (Vectors·16) block of s = scale·(Q·Kᵀ) over `pairs` bf16 pairs, from one packed K
/// panel of width Vectors·16: Rows·Vectors float accumulators in registers for the whole loop.
template <int Rows, int Vectors>
inline void score_block_bf16(const unsigned char* BLOCKATTN_RESTRICT q, Index pairs,
                             const unsigned char* BLOCKATTN_RESTRICT panel, float scale,
                             float* BLOCKATTN_RESTRICT s, Index ld_s) {
  static_assert(Rows <= 16 && Vectors <= 16, "blockattn: BLOCKATTN_UNROLL(16) must cover them");
  __m512 acc[Rows][Vectors];
  BLOCKATTN_UNROLL(16)
  for (int r = 0; r < Rows; ++r) {
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < Vectors; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  for (Index c = 0; c < pairs; ++c) {
    __m512bh kv[Vectors];
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < Vectors; ++t) {
      kv[t] =
          reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel + 4 * (c * (Vectors * 16) + t * 16)));
    }
    BLOCKATTN_UNROLL(16)
    for (int r = 0; r < Rows; ++r) {
      std::int32_t word;
      std::memcpy(&word, q + 4 * (r * pairs + c), 4);
      const __m512bh qb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(word));
      BLOCKATTN_UNROLL(16)
      for (int t = 0; t < Vectors; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], qb, kv[t]);
    }
  }
  const __m512 factor = _mm512_set1_ps(scale);
  BLOCKATTN_UNROLL(16)
  for (int r = 0; r < Rows; ++r) {
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < Vectors; ++t) {
      _mm512_storeu_ps(s + r * ld_s + t * 16, _mm512_mul_ps(acc[r][t], factor));
    }
  }
}

/// s[i, j] = scale·Σ_c q[i, c]·k[j, c] for i < rows, j < round_up(n_keys, 16) (the padded columns
/// get 0), on bf16 pairs: q from pack_q_bf16_pairs (rows of bf16_pairs(d) words), packed_k from
/// pack_k_bf16_pairs of the same n_keys and d; s: row stride ld_s >= padded_stride<float>(n_keys).
template <int Rows = RegisterBlock<float>::kRows,
          int KeyVectors = RegisterBlock<float>::kKeyVectors>
inline void score_tile_bf16(const void* q, Index rows, Index d, const void* packed_k, Index n_keys,
                            float scale, float* s, Index ld_s) {
  constexpr Index kLanes = 16;
  constexpr Index kPanel = KeyVectors * kLanes;
  const Index pairs = bf16_pairs(d);
  const auto* qb = static_cast<const unsigned char*>(q);
  const auto* kb = static_cast<const unsigned char*>(packed_k);
  for (Index j0 = 0; j0 < n_keys; j0 += kPanel) {
    const int vectors = static_cast<int>((std::min(kPanel, n_keys - j0) + kLanes - 1) / kLanes);
    const unsigned char* panel = kb + 4 * j0 * pairs;
    with_count<KeyVectors>(vectors, [&](auto nv) {
      for (Index i0 = 0; i0 < rows; i0 += Rows) {
        const int r = static_cast<int>(std::min<Index>(Rows, rows - i0));
        with_count<Rows>(r, [&](auto nr) {
          score_block_bf16<decltype(nr)::value, decltype(nv)::value>(
              qb + 4 * i0 * pairs, pairs, panel, scale, s + i0 * ld_s + j0, ld_s);
        });
      }
    });
  }
}

/// Packs rows [0, n_keys) of v (row stride ld_v, d_v columns) into `panel` as key pairs (the V
/// pair layout at the top of this header; any 4-byte-aligned buffer of at least
/// round_up(d_v, 16)·bf16_pairs(n_keys) words, which packed_v_size<float>(n_keys, d_v) covers).
template <int ValueVectors = RegisterBlock<float>::kValueVectors>
inline void pack_v_bf16_pairs(const Eigen::bfloat16* v, Index ld_v, Index n_keys, Index d_v,
                              void* panel) {
  constexpr Index kLanes = 16;
  constexpr Index kPanel = ValueVectors * kLanes;
  const Index key_pairs = bf16_pairs(n_keys);
  auto* bytes = static_cast<unsigned char*>(panel);
  for (Index c0 = 0; c0 < d_v; c0 += kPanel) {
    const Index cols = std::min(kPanel, d_v - c0);
    const Index width = round_up(cols, kLanes);
    unsigned char* dst = bytes + 4 * c0 * key_pairs;
    for (Index m = 0; m < key_pairs; ++m) {
      const Eigen::bfloat16* even = v + 2 * m * ld_v + c0;
      const bool odd = 2 * m + 1 < n_keys;  // the pair has its second key
      for (Index cc = 0; cc < width; cc += kLanes) {
        // Columns past d_v and the missing second key read as +0 (masked loads).
        const Index left = std::max<Index>(0, std::min(kLanes, cols - cc));
        const auto mask = static_cast<__mmask16>((1u << left) - 1u);
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, even + cc));
        const __m512i hi = _mm512_cvtepu16_epi32(
            _mm256_maskz_loadu_epi16(odd ? mask : __mmask16{0}, even + ld_v + cc));
        _mm512_storeu_si512(dst + 4 * (m * width + cc),
                            _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
  }
}

/// Rounds p (rows × n_keys floats, row stride ld_p, the softmax numerators) to bf16 in place:
/// row i then begins with bf16_pairs(n_keys) words of key pairs (keys 2m, 2m + 1; +0 past
/// n_keys), read by accumulate_pv_bf16. Round to nearest even (vcvtneps2bf16); the float values
/// of the row are gone afterwards.
inline void round_p_bf16_pairs(float* p, Index ld_p, Index rows, Index n_keys) {
  constexpr Index kLanes = 16;
  for (Index i = 0; i < rows; ++i) {
    float* row = p + i * ld_p;
    auto* out = reinterpret_cast<unsigned char*>(row);
    // Forward in place: chunk j reads bytes [4j, 4j + 64) and writes [2j, 2j + 32), so it never
    // overwrites a float it has not read yet.
    for (Index j = 0; j < n_keys; j += kLanes) {
      const Index left = std::min(kLanes, n_keys - j);
      const auto mask = static_cast<__mmask16>((1u << left) - 1u);
      const __m256bh b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, row + j));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * j), reinterpret_cast<__m256i>(b));
    }
  }
}

/// One Rows × (Vectors·16) block of acc += P·V over `key_pairs` key pairs, from one V pair panel
/// of width Vectors·16; p: rows of bf16 pairs, row stride ld_p bytes.
template <int Rows, int Vectors>
inline void pv_block_bf16(const unsigned char* BLOCKATTN_RESTRICT p, Index ld_p, Index key_pairs,
                          const unsigned char* BLOCKATTN_RESTRICT panel,
                          float* BLOCKATTN_RESTRICT acc, Index ld_acc) {
  static_assert(Rows <= 16 && Vectors <= 16, "blockattn: BLOCKATTN_UNROLL(16) must cover them");
  __m512 a[Rows][Vectors];
  BLOCKATTN_UNROLL(16)
  for (int r = 0; r < Rows; ++r) {
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < Vectors; ++t) a[r][t] = _mm512_loadu_ps(acc + r * ld_acc + t * 16);
  }
  for (Index m = 0; m < key_pairs; ++m) {
    __m512bh vv[Vectors];
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < Vectors; ++t) {
      vv[t] =
          reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel + 4 * (m * (Vectors * 16) + t * 16)));
    }
    BLOCKATTN_UNROLL(16)
    for (int r = 0; r < Rows; ++r) {
      std::int32_t word;
      std::memcpy(&word, p + r * ld_p + 4 * m, 4);
      const __m512bh pb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(word));
      BLOCKATTN_UNROLL(16)
      for (int t = 0; t < Vectors; ++t) a[r][t] = _mm512_dpbf16_ps(a[r][t], pb, vv[t]);
    }
  }
  BLOCKATTN_UNROLL(16)
  for (int r = 0; r < Rows; ++r) {
    BLOCKATTN_UNROLL(16)
    for (int t = 0; t < Vectors; ++t) _mm512_storeu_ps(acc + r * ld_acc + t * 16, a[r][t]);
  }
}

/// acc[i, c] += Σ_j p[i, j]·v[j, c] for i < rows, c < round_up(d_v, 16) (padded columns + 0), on
/// bf16 pairs: p after round_p_bf16_pairs (the float row stride ld_p of the score tile),
/// packed_v from pack_v_bf16_pairs of the same n_keys and d_v; acc: row stride ld_acc >=
/// padded_stride<float>(d_v).
template <int Rows = RegisterBlock<float>::kRows,
          int ValueVectors = RegisterBlock<float>::kValueVectors>
inline void accumulate_pv_bf16(const float* p, Index ld_p, Index rows, Index n_keys,
                               const void* packed_v, Index d_v, float* acc, Index ld_acc) {
  constexpr Index kLanes = 16;
  constexpr Index kPanel = ValueVectors * kLanes;
  const Index key_pairs = bf16_pairs(n_keys);
  const auto* pb = reinterpret_cast<const unsigned char*>(p);
  const auto* vb = static_cast<const unsigned char*>(packed_v);
  for (Index c0 = 0; c0 < d_v; c0 += kPanel) {
    const int vectors = static_cast<int>((std::min(kPanel, d_v - c0) + kLanes - 1) / kLanes);
    const unsigned char* panel = vb + 4 * c0 * key_pairs;
    with_count<ValueVectors>(vectors, [&](auto nv) {
      for (Index i0 = 0; i0 < rows; i0 += Rows) {
        const int r = static_cast<int>(std::min<Index>(Rows, rows - i0));
        with_count<Rows>(r, [&](auto nr) {
          pv_block_bf16<decltype(nr)::value, decltype(nv)::value>(
              pb + 4 * i0 * ld_p, 4 * ld_p, key_pairs, panel, acc + i0 * ld_acc + c0, ld_acc);
        });
      }
    });
  }
}

#else

template <class QS, class KS>
inline constexpr bool kBf16DotScores = false;

#endif  // BLOCKATTN_BF16_DOT

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
