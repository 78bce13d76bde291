#pragma once
// A thin portable SIMD layer: one vector type per (ISA, scalar) and the dozen operations the
// attention kernels need. The ISA is chosen at compile time from the user's compiler flags, most
// capable first: AVX-512F (__AVX512F__), AVX2 + FMA (__AVX2__ and __FMA__), NEON on AArch64
// (__ARM_NEON and __aarch64__), SSE2 (__SSE2__), and a scalar fallback (one lane). There is no
// runtime dispatch: `-march=native` (or `-mavx2 -mfma`, …) is the whole configuration.
// Defining BLOCKATTN_FORCE_SCALAR (e.g. -DBLOCKATTN_FORCE_SCALAR) selects the scalar fallback
// whatever the flags, so the path of targets without any of these ISAs is built and tested on
// every machine (the `scalar` preset). The choice is made in detail/config.hpp, which also names
// the inline namespace that keeps translation units built with different flags (or with and without
// BLOCKATTN_FORCE_SCALAR) apart in one program (docs/build.md#mixing-isa-flags).
//
// Every ISA provides, in `Simd<T>` for T = float and double:
//   V, kLanes, kName                      the register type, its lane count, the ISA's name
//   zero(), set1(x)                       broadcasts
//   load(p), store(p, v)                  unaligned full-vector access (kLanes elements)
//   load_partial(p, n, fill)              the first n < kLanes elements, `fill` in the others;
//   store_partial(p, n, v)                  neither touches memory past p[n - 1]
//   add, sub, mul                         lane-wise, correctly rounded
//   fma(a, b, c)                          a·b + c, fused where the ISA has FMA (AVX2, AVX-512,
//                                         NEON), mul then add (two roundings) on SSE2 and scalar
//   max(a, b)                             a > b ? a : b lane-wise: a NaN in either argument
//                                         gives b (the x86 maxps rule, made the rule everywhere)
//   min(a, b)                             a < b ? a : b lane-wise, the same NaN rule
//   reduce_add(v), reduce_max(v)          horizontal sum / maximum (max ignores nothing: callers
//                                         keep NaN out of max accumulators via max's rule)
//   reduce_add_lanes(v)                   kLanes horizontal sums at once: lane i = reduce_add(v[i])
//                                         bitwise (the same halving order)
//   round_to_int(v)                       nearest integer, ties to even, valid for |v| < 2^22
//                                         (float) / 2^51 (double); used by exp
//   pow2i(n)                              2^n for integral n with a normal result: n in
//                                         [-126, 127] (float), [-1022, 1023] (double); n NaN
//                                         gives an unspecified value (exp's p is NaN then)
//   ldexp(p, n)                           p·2^n for integral n with |n| <= 2·(max_exponent − 1),
//                                         rounded once (so overflow gives ±inf and results below
//                                         the normal range are correctly rounded denormals):
//                                         one vscalefps on AVX-512, two exact pow2i factors and
//                                         two products elsewhere

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include <blockattn/detail/config.hpp>

// The path itself is chosen in detail/config.hpp (BLOCKATTN_SIMD_*), with the ISA namespace.
#if defined(BLOCKATTN_SIMD_AVX512) || defined(BLOCKATTN_SIMD_AVX2)
#include <immintrin.h>
#elif defined(BLOCKATTN_SIMD_NEON)
#include <arm_neon.h>
#elif defined(BLOCKATTN_SIMD_SSE2)
#include <emmintrin.h>
#endif

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail::simd {

/// Bit pattern of the magic constant 1.5·2^(digits−1): adding it to |x| < 2^(digits−2) rounds x
/// to an integer (current rounding mode, i.e. to nearest even) and leaves that integer in the
/// low bits of the sum.
template <class T>
inline constexpr T kRoundMagic = T(1.5) *
                                 T(std::uint64_t(1) << (std::numeric_limits<T>::digits - 1));

template <class T>
struct Simd;

/// Operations shared by every ISA, written once on top of the per-ISA primitives (Isa).
/// Whether the ISA has a native p·2^n instruction (AVX-512's vscalef): it says so with
/// `static constexpr bool kHasScalef = true` and provides scalef(p, n).
template <class Isa, class = void>
struct HasScalef : std::false_type {};
template <class Isa>
struct HasScalef<Isa, std::enable_if_t<Isa::kHasScalef>> : std::true_type {};
/// Whether the ISA has a shuffle tree for reduce_add_lanes: it says so with
/// `static constexpr bool kHasTransposeSum = true` and provides transpose_sum(v).
template <class Isa, class = void>
struct HasTransposeSum : std::false_type {};
template <class Isa>
struct HasTransposeSum<Isa, std::enable_if_t<Isa::kHasTransposeSum>> : std::true_type {};

template <class T, class Isa>
struct SimdCommon : Isa {
  /// p·2^n for integral n, |n| <= 2·(max_exponent − 1), with one rounding: n = n1 + n2 with
  /// n1 = round(n/2) makes both 2^n1 and 2^n2 normal and p·2^n1 exact (p is normal and not near
  /// the ends of the range), so only the last product rounds.
  static typename Isa::V ldexp(typename Isa::V p, typename Isa::V n) {
    if constexpr (HasScalef<Isa>::value) {
      return Isa::scalef(p, n);
    } else {
      const typename Isa::V n1 = round_to_int(Isa::mul(n, Isa::set1(T(0.5))));
      const typename Isa::V n2 = Isa::sub(n, n1);
      return Isa::mul(Isa::mul(p, Isa::pow2i(n1)), Isa::pow2i(n2));
    }
  }
  /// Lane i = reduce_add(v[i]) for the kLanes vectors v[0 .. kLanes), bitwise: the ISA's
  /// transpose-and-add tree where it has one (kLanes − 1 vector additions, 2·(kLanes − 1)
  /// shuffles, against ~2·log2(kLanes) operations per reduce_add), else one reduce_add a vector.
  BLOCKATTN_ALWAYS_INLINE static typename Isa::V reduce_add_lanes(const typename Isa::V* v) {
    if constexpr (HasTransposeSum<Isa>::value) {
      return Isa::transpose_sum(v);
    } else {
      alignas(64) T sums[Isa::kLanes];
      BLOCKATTN_UNROLL(16)  // kLanes <= 16: v stays in registers at -O2 too
      for (int i = 0; i < Isa::kLanes; ++i) sums[i] = Isa::reduce_add(v[i]);
      return Isa::load(sums);
    }
  }
  /// Nearest integer (ties to even) of |x| < 2^(digits−2), as a T, by the magic-constant trick:
  /// no rounding instruction is needed on SSE2.
  static typename Isa::V round_to_int(typename Isa::V x) {
    const typename Isa::V magic = Isa::set1(kRoundMagic<T>);
    return Isa::sub(Isa::add(x, magic), magic);
  }
};

/// The scalar reference semantics, also the fallback ISA (one lane).
template <class T>
struct ScalarIsa {
  using V = T;
  static constexpr int kLanes = 1;
  static constexpr const char* kName = "scalar";
  static V zero() { return T(0); }
  static V set1(T x) { return x; }
  static V load(const T* p) { return *p; }
  static void store(T* p, V v) { *p = v; }
  static V load_partial(const T*, int, T fill) { return fill; }  // n < kLanes = 1: n == 0
  static void store_partial(T*, int, V) {}
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V min(V a, V b) { return a < b ? a : b; }
  static T reduce_add(V v) { return v; }
  static T reduce_max(V v) { return v; }
  static V pow2i(V n) {
    // exp(NaN) reaches here with n = NaN, and converting NaN to an integer is undefined in C++
    // (the SIMD paths' conversion instructions define it); any value will do, since the factor it
    // multiplies is NaN already.
    if (n != n) return n;
    using Bits = std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t>;
    constexpr int kMantissa = std::numeric_limits<T>::digits - 1;
    constexpr Bits kBias = std::numeric_limits<T>::max_exponent - 1;
    const Bits bits = (static_cast<Bits>(n) + kBias) << kMantissa;
    T out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
  }
};

#if defined(BLOCKATTN_SIMD_AVX512)

// GCC 12's unmasked AVX-512 intrinsics (max, slli, cvtps) read an uninitialised
// _mm512_undefined_*() and trip -Wuninitialized at -O3 (GCC bug 105593, fixed in GCC 13); the
// masked forms with an all-ones mask compile to the same instruction without the warning. The
// reductions avoid _mm512_reduce_* (built on the unmasked extract) for the same reason.
struct Avx512Float {
  static constexpr __mmask16 kAll = 0xFFFF;
  static constexpr bool kHasScalef = true;
  static constexpr bool kHasTransposeSum = true;
  using V = __m512;
  static constexpr int kLanes = 16;
  static constexpr const char* kName = "avx512";
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static __mmask16 tail_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static V load_partial(const float* p, int n, float fill) {
    return _mm512_mask_loadu_ps(set1(fill), tail_mask(n), p);
  }
  static void store_partial(float* p, int n, V v) { _mm512_mask_storeu_ps(p, tail_mask(n), v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm512_mask_max_ps(a, kAll, a, b); }
  static V min(V a, V b) { return _mm512_mask_min_ps(a, kAll, a, b); }
  static V scalef(V p, V n) { return _mm512_mask_scalef_ps(p, kAll, p, n); }
  // `op` is a lambda, not an intrinsic's address: GCC defines intrinsics only inline, so taking
  // one's address fails to link when it is not inlined (-O0, -O1).
  template <class Op>
  static __m128 fold_to_128(V v, Op op) {
    const __m512d d = _mm512_castps_pd(v);
    const __m256 lo = _mm256_castpd_ps(_mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xF, d, 0));
    const __m256 hi = _mm256_castpd_ps(_mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xF, d, 1));
    const __m256 half = op(lo, hi);
    return _mm256_castps256_ps128(op(half, _mm256_permute2f128_ps(half, half, 1)));
  }
  static float reduce_add(V v) {
    __m128 t = fold_to_128(v, [](__m256 a, __m256 b) { return _mm256_add_ps(a, b); });
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  // reduce_add_lanes: each level adds the two halves of every input's partial sums (the halving
  // order of reduce_add: 256-bit halves, 128-bit halves, pairs, neighbours) and packs two inputs
  // into one vector. The tree leaves slot 4l + k in lane 4k + l, so slot s reads v[4(s%4) + s/4].
  BLOCKATTN_ALWAYS_INLINE static V transpose_sum(const V* v) {
    const auto slot = [v](int s) { return v[4 * (s % 4) + s / 4]; };
    // Unrolled (as every loop below), so a, c and f are registers at GCC -O2 too.
    V a[8];
    BLOCKATTN_UNROLL(8)
    for (int i = 0; i < 8; ++i) {
      const V x = slot(2 * i);
      const V y = slot(2 * i + 1);
      a[i] = add(_mm512_mask_shuffle_f32x4(x, kAll, x, y, 0x44),
                 _mm512_mask_shuffle_f32x4(x, kAll, x, y, 0xEE));
    }
    V c[4];
    BLOCKATTN_UNROLL(4)
    for (int j = 0; j < 4; ++j) {
      const V x = a[2 * j];
      const V y = a[2 * j + 1];
      c[j] = add(_mm512_mask_shuffle_f32x4(x, kAll, x, y, 0x88),
                 _mm512_mask_shuffle_f32x4(x, kAll, x, y, 0xDD));
    }
    V f[2];
    BLOCKATTN_UNROLL(2)
    for (int m = 0; m < 2; ++m) {
      const __m512d x = _mm512_castps_pd(c[2 * m]);
      const __m512d y = _mm512_castps_pd(c[2 * m + 1]);
      f[m] = add(_mm512_castpd_ps(_mm512_mask_unpacklo_pd(x, 0xFF, x, y)),
                 _mm512_castpd_ps(_mm512_mask_unpackhi_pd(x, 0xFF, x, y)));
    }
    return add(_mm512_mask_shuffle_ps(f[0], kAll, f[0], f[1], 0x88),
               _mm512_mask_shuffle_ps(f[0], kAll, f[0], f[1], 0xDD));
  }
  static float reduce_max(V v) {
    __m128 t = fold_to_128(v, [](__m256 a, __m256 b) { return _mm256_max_ps(a, b); });
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
  }
  static V pow2i(V n) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i i =
        _mm512_add_epi32(_mm512_mask_cvtps_epi32(zero, kAll, n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_mask_slli_epi32(zero, kAll, i, 23));
  }
};
template <>
struct Simd<float> : SimdCommon<float, Avx512Float> {};

struct Avx512Double {
  static constexpr __mmask8 kAll = 0xFF;
  static constexpr bool kHasScalef = true;
  static constexpr bool kHasTransposeSum = true;
  using V = __m512d;
  static constexpr int kLanes = 8;
  static constexpr const char* kName = "avx512";
  static V zero() { return _mm512_setzero_pd(); }
  static V set1(double x) { return _mm512_set1_pd(x); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static __mmask8 tail_mask(int n) { return static_cast<__mmask8>((1u << n) - 1u); }
  static V load_partial(const double* p, int n, double fill) {
    return _mm512_mask_loadu_pd(set1(fill), tail_mask(n), p);
  }
  static void store_partial(double* p, int n, V v) { _mm512_mask_storeu_pd(p, tail_mask(n), v); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V max(V a, V b) { return _mm512_mask_max_pd(a, kAll, a, b); }
  static V min(V a, V b) { return _mm512_mask_min_pd(a, kAll, a, b); }
  static V scalef(V p, V n) { return _mm512_mask_scalef_pd(p, kAll, p, n); }
  template <class Op>  // a lambda, not an intrinsic's address (see Avx512Float)
  static __m128d fold_to_128(V v, Op op) {
    const __m256d lo = _mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xF, v, 0);
    const __m256d hi = _mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xF, v, 1);
    const __m256d half = op(lo, hi);
    return _mm256_castpd256_pd128(op(half, _mm256_permute2f128_pd(half, half, 1)));
  }
  static double reduce_add(V v) {
    const __m128d t = fold_to_128(v, [](__m256d a, __m256d b) { return _mm256_add_pd(a, b); });
    return _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
  }
  // reduce_add_lanes, as in Avx512Float: the tree leaves slot 4l + k in lane 2k + l, so slot s
  // reads v[2(s%4) + s/4].
  BLOCKATTN_ALWAYS_INLINE static V transpose_sum(const V* v) {
    const auto slot = [v](int s) { return v[2 * (s % 4) + s / 4]; };
    // Unrolled (as the loop below), so a and c are registers at GCC -O2 too.
    V a[4];
    BLOCKATTN_UNROLL(4)
    for (int i = 0; i < 4; ++i) {
      const V x = slot(2 * i);
      const V y = slot(2 * i + 1);
      a[i] = add(_mm512_mask_shuffle_f64x2(x, kAll, x, y, 0x44),
                 _mm512_mask_shuffle_f64x2(x, kAll, x, y, 0xEE));
    }
    V c[2];
    BLOCKATTN_UNROLL(2)
    for (int j = 0; j < 2; ++j) {
      c[j] = add(_mm512_mask_shuffle_f64x2(a[2 * j], kAll, a[2 * j], a[2 * j + 1], 0x88),
                 _mm512_mask_shuffle_f64x2(a[2 * j], kAll, a[2 * j], a[2 * j + 1], 0xDD));
    }
    return add(_mm512_mask_unpacklo_pd(c[0], kAll, c[0], c[1]),
               _mm512_mask_unpackhi_pd(c[0], kAll, c[0], c[1]));
  }
  static double reduce_max(V v) {
    const __m128d t = fold_to_128(v, [](__m256d a, __m256d b) { return _mm256_max_pd(a, b); });
    return _mm_cvtsd_f64(_mm_max_sd(t, _mm_unpackhi_pd(t, t)));
  }
  // AVX-512F has no double→int64 conversion (that is AVX-512DQ): the magic constant leaves n in
  // the low bits instead.
  static V pow2i(V n) {
    const V magic = set1(kRoundMagic<double>);
    const __m512i i =
        _mm512_sub_epi64(_mm512_castpd_si512(_mm512_add_pd(n, magic)), _mm512_castpd_si512(magic));
    return _mm512_castsi512_pd(_mm512_mask_slli_epi64(
        _mm512_setzero_si512(), kAll, _mm512_add_epi64(i, _mm512_set1_epi64(1023)), 52));
  }
};
template <>
struct Simd<double> : SimdCommon<double, Avx512Double> {};

#elif defined(BLOCKATTN_SIMD_AVX2) || defined(BLOCKATTN_SIMD_SSE2) || defined(BLOCKATTN_SIMD_NEON)

/// Tails through a small stack buffer: these ISAs have no cheap general masked access.
template <class T, class Isa>
struct BufferedTail : Isa {
  static typename Isa::V load_partial(const T* p, int n, T fill) {
    alignas(64) T buf[Isa::kLanes];
    for (int t = 0; t < Isa::kLanes; ++t) buf[t] = t < n ? p[t] : fill;
    return Isa::load(buf);
  }
  static void store_partial(T* p, int n, typename Isa::V v) {
    alignas(64) T buf[Isa::kLanes];
    Isa::store(buf, v);
    for (int t = 0; t < n; ++t) p[t] = buf[t];
  }
  static T reduce_add(typename Isa::V v) {
    alignas(64) T buf[Isa::kLanes];
    Isa::store(buf, v);
    // Halving widths w = kLanes/2, …, 1 (a counted loop, so that it unrolls to straight code).
    constexpr int kLevels = Isa::kLanes >= 8 ? 3 : Isa::kLanes >= 4 ? 2 : 1;
    static_assert(Isa::kLanes == 1 << kLevels, "blockattn: kLanes is 2, 4 or 8 here");
    BLOCKATTN_UNROLL(4)  // fixed counts, unrolled: buf stays in registers at GCC -O2 too
    for (int level = 1; level <= kLevels; ++level) {
      const int w = Isa::kLanes >> level;
      BLOCKATTN_UNROLL(8)
      for (int t = 0; t < w; ++t) buf[t] += buf[t + w];
    }
    return buf[0];
  }
  static T reduce_max(typename Isa::V v) {
    alignas(64) T buf[Isa::kLanes];
    Isa::store(buf, v);
    T m = buf[0];
    BLOCKATTN_UNROLL(8)  // kLanes <= 8: straight code at GCC -O2 too
    for (int t = 1; t < Isa::kLanes; ++t) m = buf[t] > m ? buf[t] : m;
    return m;
  }
};

#if defined(BLOCKATTN_SIMD_AVX2)

struct Avx2Float {
  static constexpr bool kHasTransposeSum = true;
  using V = __m256;
  static constexpr int kLanes = 8;
  static constexpr const char* kName = "avx2+fma";
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  // reduce_add_lanes, as in Avx512Float (the halving order of BufferedTail::reduce_add): the
  // tree leaves slot 2l + k in lane 4k + l, so slot s reads v[4(s%2) + s/2].
  BLOCKATTN_ALWAYS_INLINE static V transpose_sum(const V* v) {
    const auto slot = [v](int s) { return v[4 * (s % 2) + s / 2]; };
    // Unrolled (as the loop below), so a and c are registers at GCC -O2 too.
    V a[4];
    BLOCKATTN_UNROLL(4)
    for (int i = 0; i < 4; ++i) {
      const V x = slot(2 * i);
      const V y = slot(2 * i + 1);
      a[i] = add(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
    }
    V c[2];
    BLOCKATTN_UNROLL(2)
    for (int j = 0; j < 2; ++j) {
      const __m256d x = _mm256_castps_pd(a[2 * j]);
      const __m256d y = _mm256_castps_pd(a[2 * j + 1]);
      c[j] = add(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)),
                 _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
    }
    return add(_mm256_shuffle_ps(c[0], c[1], 0x88), _mm256_shuffle_ps(c[0], c[1], 0xDD));
  }
  static V pow2i(V n) {
    const __m256i i = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(i, 23));
  }
};
template <>
struct Simd<float> : SimdCommon<float, BufferedTail<float, Avx2Float>> {};

struct Avx2Double {
  using V = __m256d;
  static constexpr int kLanes = 4;
  static constexpr const char* kName = "avx2+fma";
  static V zero() { return _mm256_setzero_pd(); }
  static V set1(double x) { return _mm256_set1_pd(x); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V max(V a, V b) { return _mm256_max_pd(a, b); }
  static V min(V a, V b) { return _mm256_min_pd(a, b); }
  static V pow2i(V n) {
    const V magic = set1(kRoundMagic<double>);
    const __m256i i =
        _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(n, magic)), _mm256_castpd_si256(magic));
    return _mm256_castsi256_pd(
        _mm256_slli_epi64(_mm256_add_epi64(i, _mm256_set1_epi64x(1023)), 52));
  }
};
template <>
struct Simd<double> : SimdCommon<double, BufferedTail<double, Avx2Double>> {};

#elif defined(BLOCKATTN_SIMD_NEON)

struct NeonFloat {
  using V = float32x4_t;
  static constexpr int kLanes = 4;
  static constexpr const char* kName = "neon";
  static V zero() { return vdupq_n_f32(0.0f); }
  static V set1(float x) { return vdupq_n_f32(x); }
  static V load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, V v) { vst1q_f32(p, v); }
  static V add(V a, V b) { return vaddq_f32(a, b); }
  static V sub(V a, V b) { return vsubq_f32(a, b); }
  static V mul(V a, V b) { return vmulq_f32(a, b); }
  static V fma(V a, V b, V c) { return vfmaq_f32(c, a, b); }
  static V max(V a, V b) { return vbslq_f32(vcgtq_f32(a, b), a, b); }
  static V min(V a, V b) { return vbslq_f32(vcltq_f32(a, b), a, b); }
  static V pow2i(V n) {
    const int32x4_t i = vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127));
    return vreinterpretq_f32_s32(vshlq_n_s32(i, 23));
  }
};
template <>
struct Simd<float> : SimdCommon<float, BufferedTail<float, NeonFloat>> {};

struct NeonDouble {
  using V = float64x2_t;
  static constexpr int kLanes = 2;
  static constexpr const char* kName = "neon";
  static V zero() { return vdupq_n_f64(0.0); }
  static V set1(double x) { return vdupq_n_f64(x); }
  static V load(const double* p) { return vld1q_f64(p); }
  static void store(double* p, V v) { vst1q_f64(p, v); }
  static V add(V a, V b) { return vaddq_f64(a, b); }
  static V sub(V a, V b) { return vsubq_f64(a, b); }
  static V mul(V a, V b) { return vmulq_f64(a, b); }
  static V fma(V a, V b, V c) { return vfmaq_f64(c, a, b); }
  static V max(V a, V b) { return vbslq_f64(vcgtq_f64(a, b), a, b); }
  static V min(V a, V b) { return vbslq_f64(vcltq_f64(a, b), a, b); }
  static V pow2i(V n) {
    const int64x2_t i = vaddq_s64(vcvtq_s64_f64(n), vdupq_n_s64(1023));
    return vreinterpretq_f64_s64(vshlq_n_s64(i, 52));
  }
};
template <>
struct Simd<double> : SimdCommon<double, BufferedTail<double, NeonDouble>> {};

#else  // SSE2

struct Sse2Float {
  using V = __m128;
  static constexpr int kLanes = 4;
  static constexpr const char* kName = "sse2";
  static V zero() { return _mm_setzero_ps(); }
  static V set1(float x) { return _mm_set1_ps(x); }
  static V load(const float* p) { return _mm_loadu_ps(p); }
  static void store(float* p, V v) { _mm_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm_add_ps(a, b); }
  static V sub(V a, V b) { return _mm_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
  static V max(V a, V b) { return _mm_max_ps(a, b); }
  static V min(V a, V b) { return _mm_min_ps(a, b); }
  static V pow2i(V n) {
    const __m128i i = _mm_add_epi32(_mm_cvtps_epi32(n), _mm_set1_epi32(127));
    return _mm_castsi128_ps(_mm_slli_epi32(i, 23));
  }
};
template <>
struct Simd<float> : SimdCommon<float, BufferedTail<float, Sse2Float>> {};

struct Sse2Double {
  using V = __m128d;
  static constexpr int kLanes = 2;
  static constexpr const char* kName = "sse2";
  static V zero() { return _mm_setzero_pd(); }
  static V set1(double x) { return _mm_set1_pd(x); }
  static V load(const double* p) { return _mm_loadu_pd(p); }
  static void store(double* p, V v) { _mm_storeu_pd(p, v); }
  static V add(V a, V b) { return _mm_add_pd(a, b); }
  static V sub(V a, V b) { return _mm_sub_pd(a, b); }
  static V mul(V a, V b) { return _mm_mul_pd(a, b); }
  static V fma(V a, V b, V c) { return _mm_add_pd(_mm_mul_pd(a, b), c); }
  static V max(V a, V b) { return _mm_max_pd(a, b); }
  static V min(V a, V b) { return _mm_min_pd(a, b); }
  static V pow2i(V n) {
    const V magic = set1(kRoundMagic<double>);
    const __m128i i =
        _mm_sub_epi64(_mm_castpd_si128(_mm_add_pd(n, magic)), _mm_castpd_si128(magic));
    return _mm_castsi128_pd(_mm_slli_epi64(_mm_add_epi64(i, _mm_set1_epi64x(1023)), 52));
  }
};
template <>
struct Simd<double> : SimdCommon<double, BufferedTail<double, Sse2Double>> {};

#endif

#else  // BLOCKATTN_SIMD_SCALAR

template <>
struct Simd<float> : SimdCommon<float, ScalarIsa<float>> {};
template <>
struct Simd<double> : SimdCommon<double, ScalarIsa<double>> {};

#endif

}  // namespace detail::simd
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {

/// The SIMD path that this translation unit's blockattn calls run on: "avx512", "avx2+fma",
/// "neon", "sse2" or "scalar" (detail/simd.hpp's kName), for bug reports and tests. Kept out of
/// line, like the kernels, so that it reports the definition the linker kept, not a constant
/// folded into the caller: in a program whose translation units were built with different flags
/// it shows that each runs its own code (tests/isa_mix).
BLOCKATTN_OUT_OF_LINE inline const char* simd_isa() noexcept {
  return detail::simd::Simd<float>::kName;
}

}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
