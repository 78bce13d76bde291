#pragma once
// Conversions between a storage type S (float, double, Eigen::bfloat16, Eigen::half) and the type
// the kernels compute in, E = accumulator_t<S> (float for the 16-bit formats), one SIMD vector of
// E (Simd<E>::kLanes elements) at a time. Reading widens exactly (every bf16 and half value is a
// float); writing rounds once, to nearest even, bitwise as Eigen's scalar conversions do (half
// overflow gives ±inf, tiny values denormals; a NaN stays a NaN of the same sign, its payload
// not kept).
//
//   StorageIo<S>::load(p), load_partial(p, n, fill)   S → Simd<E>::V (fill: an E)
//   StorageIo<S>::store(p, v), store_partial(p, n, v) Simd<E>::V → S, rounded
//   widen(src, n, dst), narrow(src, n, dst)            whole rows, vector by vector
//   to_compute(s), round_to<S>(e)                      one element
//
// bf16 is the upper half of a float: widening is a 16-bit shift on every ISA, narrowing adds the
// round-to-nearest-even bias in integer lanes. half uses the F16C / AVX-512 conversion
// instructions (exact, RNE), `vcvt` on AArch64, and Eigen's scalar conversion where the ISA has
// neither (SSE2 without F16C, the scalar fallback). For S = E every function is the plain
// Simd<E> access.

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <blockattn/detail/config.hpp>
#include <blockattn/detail/simd.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

/// One stored element as the kernels compute with it (exact for every storage type).
template <class S>
inline accumulator_t<S> to_compute(S s) {
  return static_cast<accumulator_t<S>>(s);
}

/// One computed value rounded (to nearest even) to the storage type S.
template <class S, class E>
inline S round_to(E e) {
  return static_cast<S>(e);
}

/// Widening loads and rounding stores of S, one Simd<accumulator_t<S>> vector at a time: the
/// primary template handles S = E (float, double) by forwarding to Simd<E>.
template <class S, class = void>
struct StorageIo {
  using E = S;
  using Simd = simd::Simd<E>;
  using V = typename Simd::V;
  static constexpr int kLanes = Simd::kLanes;

  static V load(const S* p) { return Simd::load(p); }
  static V load_partial(const S* p, int n, E fill) { return Simd::load_partial(p, n, fill); }
  static void store(S* p, V v) { Simd::store(p, v); }
  static void store_partial(S* p, int n, V v) { Simd::store_partial(p, n, v); }
};

/// The 16-bit formats: element-wise fallbacks for the partial forms (tails only) and for ISAs
/// without a vector conversion; the full-vector forms use the ISA's instructions where it has them.
template <class S>
struct StorageIo<S, std::enable_if_t<kIs16BitFloat<S>>> {
  using E = float;
  using Simd = simd::Simd<float>;
  using V = typename Simd::V;
  static constexpr int kLanes = Simd::kLanes;

  static V load(const S* p) {
#if defined(BLOCKATTN_SIMD_AVX512)
    // Masked forms with an all-ones mask: GCC 12's unmasked ones trip -Wmaybe-uninitialized
    // (see Avx512Float in detail/simd.hpp).
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
      return _mm512_castsi512_ps(
          _mm512_maskz_slli_epi32(kAll, _mm512_maskz_cvtepu16_epi32(kAll, raw), 16));
    } else {
      return _mm512_maskz_cvtph_ps(kAll, raw);
    }
#elif defined(BLOCKATTN_SIMD_AVX2)
    if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    } else {
#if defined(__F16C__)
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
      return load_elementwise(p);
#endif
    }
#elif defined(BLOCKATTN_SIMD_SSE2)
    if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), raw));
    } else {
      return load_elementwise(p);
    }
#elif defined(BLOCKATTN_SIMD_NEON)
    if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
      const uint16x4_t raw = vld1_u16(reinterpret_cast<const std::uint16_t*>(p));
      return vreinterpretq_f32_u32(vshll_n_u16(raw, 16));
    } else {
      return vcvt_f32_f16(vld1_f16(reinterpret_cast<const __fp16*>(p)));
    }
#else
    return load_elementwise(p);
#endif
  }

  static V load_partial(const S* p, int n, float fill) {
    alignas(64) float buf[kLanes];
    for (int t = 0; t < kLanes; ++t) buf[t] = t < n ? static_cast<float>(p[t]) : fill;
    return Simd::load(buf);
  }

  static void store(S* p, V v) {
#if defined(BLOCKATTN_SIMD_AVX512)
    if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                          _mm512_maskz_cvtepi32_epi16(kAll, bf16_rne(v)));
    } else {
      _mm256_storeu_si256(
          reinterpret_cast<__m256i*>(p),
          _mm512_maskz_cvtps_ph(kAll, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#elif defined(BLOCKATTN_SIMD_AVX2) && defined(__F16C__)
    if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
      store_elementwise(p, v);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#elif defined(BLOCKATTN_SIMD_NEON)
    if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
      store_elementwise(p, v);
    } else {
      vst1_f16(reinterpret_cast<__fp16*>(p), vcvt_f16_f32(v));
    }
#else
    store_elementwise(p, v);
#endif
  }

  static void store_partial(S* p, int n, V v) {
    alignas(64) float buf[kLanes];
    Simd::store(buf, v);
    for (int t = 0; t < n; ++t) p[t] = round_to<S>(buf[t]);
  }

 private:
  static V load_elementwise(const S* p) {
    alignas(64) float buf[kLanes];
    for (int t = 0; t < kLanes; ++t) buf[t] = static_cast<float>(p[t]);
    return Simd::load(buf);
  }
  static void store_elementwise(S* p, V v) { store_partial(p, kLanes, v); }
#if defined(BLOCKATTN_SIMD_AVX512)
  static constexpr __mmask16 kAll = 0xFFFF;
  /// bf16 bits of each lane (in the low 16 bits of 32): the float's upper half rounded to nearest
  /// even by adding 0x7fff plus the kept part's lowest bit; a NaN becomes the quiet NaN 0x7fc0
  /// with its sign (Eigen's rule).
  static __m512i bf16_rne(V v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb =
        _mm512_and_si512(_mm512_maskz_srli_epi32(kAll, bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_maskz_srli_epi32(
        kAll, _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __m512i quiet_nan = _mm512_or_si512(
        _mm512_and_si512(_mm512_maskz_srli_epi32(kAll, bits, 16), _mm512_set1_epi32(0x8000)),
        _mm512_set1_epi32(0x7fc0));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(rounded, nan, quiet_nan);
  }
#endif
};

/// int8 (the quantized K/V caches, detail/kv_source.hpp): loads only, each int8 converted exactly
/// to float (the per-row scale is applied by the caller, one multiply per vector). Sign-extended
/// to 32 bits and converted with the ISA's instructions on AVX-512, AVX2 and SSE2; element-wise
/// elsewhere (the same exact values).
template <>
struct StorageIo<std::int8_t> {
  using S = std::int8_t;
  using E = float;
  using Simd = simd::Simd<float>;
  using V = typename Simd::V;
  static constexpr int kLanes = Simd::kLanes;

  static V load(const S* p) {
#if defined(BLOCKATTN_SIMD_AVX512)
    // Masked forms with an all-ones mask, as the 16-bit loads above (GCC 12).
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_maskz_cvtepi32_ps(__mmask16{0xFFFF}, _mm512_maskz_cvtepi8_epi32(0xFFFF, raw));
#elif defined(BLOCKATTN_SIMD_AVX2)
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
#elif defined(BLOCKATTN_SIMD_SSE2)
    std::int32_t bits = 0;
    std::memcpy(&bits, p, sizeof(bits));
    const __m128i raw = _mm_cvtsi32_si128(bits);
    // Each byte to the top of its 32-bit lane, then an arithmetic shift back: sign extension.
    const __m128i bytes = _mm_unpacklo_epi8(raw, raw);
    return _mm_cvtepi32_ps(_mm_srai_epi32(_mm_unpacklo_epi16(bytes, bytes), 24));
#else
    alignas(64) float buf[kLanes];
    for (int t = 0; t < kLanes; ++t) buf[t] = static_cast<float>(p[t]);
    return Simd::load(buf);
#endif
  }

  static V load_partial(const S* p, int n, float fill) {
    alignas(64) float buf[kLanes];
    for (int t = 0; t < kLanes; ++t) buf[t] = t < n ? static_cast<float>(p[t]) : fill;
    return Simd::load(buf);
  }
};

/// dst[i] = to_compute(src[i]) for i < n: whole vectors, then one partial.
template <class S>
void widen(const S* src, Index n, accumulator_t<S>* dst) {
  using Io = StorageIo<S>;
  Index i = 0;
  for (; i + Io::kLanes <= n; i += Io::kLanes) Io::Simd::store(dst + i, Io::load(src + i));
  if (i < n) {
    const int tail = static_cast<int>(n - i);
    Io::Simd::store_partial(dst + i, tail, Io::load_partial(src + i, tail, 0));
  }
}

/// dst[i] = round_to<S>(src[i]) for i < n: whole vectors, then one partial.
template <class S>
void narrow(const accumulator_t<S>* src, Index n, S* dst) {
  using Io = StorageIo<S>;
  Index i = 0;
  for (; i + Io::kLanes <= n; i += Io::kLanes) Io::store(dst + i, Io::Simd::load(src + i));
  if (i < n) {
    const int tail = static_cast<int>(n - i);
    Io::store_partial(dst + i, tail, Io::Simd::load_partial(src + i, tail, 0));
  }
}

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
