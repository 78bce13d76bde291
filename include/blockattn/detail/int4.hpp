#pragma once
// The byte layout of a row of 4-bit values (Int4QuantizedKV's keys and values) and the loops that
// turn rows of it into floats, shared by quantize_kv / dequantize_kv and the int4 K/V source.
//
// A row of dim values is cut into groups of kInt4Group = 32 consecutive values (the last one
// shorter when 32 does not divide dim). A group of len values takes half = ceil(len / 2) bytes,
// the row's groups one after the other, so a row is ceil(dim / 2) bytes: byte i of the group holds
// value i in its low nibble and value half + i in its high nibble (ggml's q4_0 order for a whole
// group: the two halves of a group unpack with one mask and one shift each, no shuffle). A nibble
// u in [0, 15] stands for the signed q = u − 8 in [−8, 7]; the high nibble of a short group's odd
// last byte is unused (written 0).

#include <algorithm>
#include <cstdint>

#include <blockattn/detail/config.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

/// Values per group of an int4 row (one byte layout group; values' scales are per group).
inline constexpr Index kInt4Group = 32;

/// Bytes of a row of dim 4-bit values.
constexpr Index int4_row_bytes(Index dim) { return (dim + 1) / 2; }

/// Groups of kInt4Group values in a row of dim values (the last one may be shorter).
constexpr Index int4_groups(Index dim) { return (dim + kInt4Group - 1) / kInt4Group; }

/// Where value c of a row of dim values lives: its byte and the shift of its nibble (0 or 4).
inline void int4_position(Index c, Index dim, Index* byte, int* shift) {
  const Index g0 = c / kInt4Group * kInt4Group;
  const Index half = (std::min(kInt4Group, dim - g0) + 1) / 2;
  const Index i = c - g0;
  *byte = g0 / 2 + (i < half ? i : i - half);
  *shift = i < half ? 0 : 4;
}

/// The signed value q in [−8, 7] of element c of a row of dim 4-bit values.
inline int int4_get(const std::uint8_t* row, Index c, Index dim) {
  Index byte = 0;
  int shift = 0;
  int4_position(c, dim, &byte, &shift);
  return ((row[byte] >> shift) & 15) - 8;
}

/// Sets element c of a row of dim 4-bit values to q in [−8, 7], leaving the other nibble alone.
inline void int4_set(std::uint8_t* row, Index c, Index dim, int q) {
  Index byte = 0;
  int shift = 0;
  int4_position(c, dim, &byte, &shift);
  const auto u = static_cast<unsigned>(q + 8) & 15u;
  row[byte] = static_cast<std::uint8_t>((row[byte] & ~(15u << shift)) | (u << shift));
}

/// out[i] = float(q_i) for the 32 values of a whole group (16 bytes from b): the low nibbles are
/// values 0–15 and the high nibbles 16–31 (one mask and one shift for the 16 bytes), each nibble
/// u widened to a 32-bit integer, converted and then 8 subtracted in float: every step exact,
/// so the same floats as the scalar float(u − 8) on every ISA.
BLOCKATTN_ALWAYS_INLINE void int4_group_floats(const std::uint8_t* b, float* out) {
#if defined(BLOCKATTN_SIMD_AVX512) || defined(BLOCKATTN_SIMD_AVX2) || defined(BLOCKATTN_SIMD_SSE2)
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  const __m128i mask = _mm_set1_epi8(15);
  const __m128i halves[2] = {_mm_and_si128(raw, mask), _mm_and_si128(_mm_srli_epi16(raw, 4), mask)};
#endif
#if defined(BLOCKATTN_SIMD_AVX512)
  // Masked forms with an all-ones mask, as StorageIo's loads (GCC 12, detail/convert.hpp).
  const __m512 eight = _mm512_set1_ps(8.0f);
  for (int h = 0; h < 2; ++h) {
    const __m512 u =
        _mm512_maskz_cvtepi32_ps(__mmask16{0xFFFF}, _mm512_maskz_cvtepu8_epi32(0xFFFF, halves[h]));
    _mm512_storeu_ps(out + 16 * h, _mm512_sub_ps(u, eight));
  }
#elif defined(BLOCKATTN_SIMD_AVX2)
  const __m256 eight = _mm256_set1_ps(8.0f);
  for (int h = 0; h < 2; ++h) {
    const __m256 u0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(halves[h]));
    const __m256 u1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(halves[h], 8)));
    _mm256_storeu_ps(out + 16 * h, _mm256_sub_ps(u0, eight));
    _mm256_storeu_ps(out + 16 * h + 8, _mm256_sub_ps(u1, eight));
  }
#elif defined(BLOCKATTN_SIMD_SSE2)
  const __m128 eight = _mm_set1_ps(8.0f);
  const __m128i zero = _mm_setzero_si128();
  for (int h = 0; h < 2; ++h) {
    const __m128i words[2] = {_mm_unpacklo_epi8(halves[h], zero),
                              _mm_unpackhi_epi8(halves[h], zero)};
    for (int w = 0; w < 2; ++w) {
      const __m128 u0 = _mm_cvtepi32_ps(_mm_unpacklo_epi16(words[w], zero));
      const __m128 u1 = _mm_cvtepi32_ps(_mm_unpackhi_epi16(words[w], zero));
      _mm_storeu_ps(out + 16 * h + 8 * w, _mm_sub_ps(u0, eight));
      _mm_storeu_ps(out + 16 * h + 8 * w + 4, _mm_sub_ps(u1, eight));
    }
  }
#else
  for (int i = 0; i < 16; ++i) {
    out[i] = static_cast<float>(b[i] & 15) - 8.0f;
    out[i + 16] = static_cast<float>(b[i] >> 4) - 8.0f;
  }
#endif
}

/// dst[c] = float(q_c) − zero[c] then · scale[c] (one rounding each, dequantize_kv's per-channel
/// key formula) for the dim values of one int4 row. Whole groups convert by vectors
/// (int4_group_floats) and then take the same IEEE operations as the scalar formula, so the same
/// bits; a short last group goes value by value.
inline void int4_row_channels(const std::uint8_t* row, Index dim, const float* scale,
                              const float* zero, float* dst) {
  using S = simd::Simd<float>;
  const Index full = dim / kInt4Group * kInt4Group;
  alignas(64) float q[kInt4Group];
  for (Index g0 = 0; g0 < full; g0 += kInt4Group) {
    int4_group_floats(row + g0 / 2, q);
    for (Index t = 0; t < kInt4Group; t += S::kLanes) {
      const Index c = g0 + t;
      S::store(dst + c, S::mul(S::load(scale + c), S::sub(S::load(q + t), S::load(zero + c))));
    }
  }
  for (Index c = full; c < dim; ++c) {
    dst[c] = scale[c] * (static_cast<float>(int4_get(row, c, dim)) - zero[c]);
  }
}

/// dst[c] = scale[c / 32]·float(q_c) (one rounding, dequantize_kv's per-group value formula) for
/// the dim values of one int4 row; whole groups by vectors as int4_row_channels.
inline void int4_row_groups(const std::uint8_t* row, Index dim, const float* scale, float* dst) {
  using S = simd::Simd<float>;
  const Index full = dim / kInt4Group * kInt4Group;
  alignas(64) float q[kInt4Group];
  for (Index g0 = 0; g0 < full; g0 += kInt4Group) {
    int4_group_floats(row + g0 / 2, q);
    const typename S::V s = S::set1(scale[g0 / kInt4Group]);
    for (Index t = 0; t < kInt4Group; t += S::kLanes) {
      S::store(dst + g0 + t, S::mul(s, S::load(q + t)));
    }
  }
  for (Index c = full; c < dim; ++c) {
    dst[c] = scale[c / kInt4Group] * static_cast<float>(int4_get(row, c, dim));
  }
}

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
