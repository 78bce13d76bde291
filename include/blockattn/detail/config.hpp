#pragma once
// Version, assertion and error-reporting configuration. CMake reads the version from here.

#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include <Eigen/Core>

#define BLOCKATTN_VERSION_MAJOR 0
#define BLOCKATTN_VERSION_MINOR 1
#define BLOCKATTN_VERSION_PATCH 0

// BLOCKATTN_ALWAYS_INLINE: register-blocked helpers whose arrays of vectors must stay in
// registers, which only happens when they are inlined into their loop (GCC 12 otherwise keeps
// some out of line and passes the vectors through memory).
#if defined(__GNUC__) || defined(__clang__)
#define BLOCKATTN_NOINLINE __attribute__((noinline))
#define BLOCKATTN_ALWAYS_INLINE inline __attribute__((always_inline))
#define BLOCKATTN_RESTRICT __restrict__
#elif defined(_MSC_VER)
#define BLOCKATTN_NOINLINE __declspec(noinline)
#define BLOCKATTN_ALWAYS_INLINE __forceinline
#define BLOCKATTN_RESTRICT __restrict
#else
#define BLOCKATTN_NOINLINE
#define BLOCKATTN_ALWAYS_INLINE inline
#define BLOCKATTN_RESTRICT
#endif

// BLOCKATTN_OUT_OF_LINE: a function the compiler neither inlines nor constant-propagates into its
// callers (GCC's noipa; clang does not propagate from linkonce_odr definitions anyway), so a call
// runs the definition the linker kept (blockattn::simd_isa in detail/simd.hpp).
#if defined(__clang__)
#define BLOCKATTN_OUT_OF_LINE __attribute__((noinline))
#elif defined(__GNUC__) && __GNUC__ >= 8
#define BLOCKATTN_OUT_OF_LINE __attribute__((noipa))
#else
#define BLOCKATTN_OUT_OF_LINE BLOCKATTN_NOINLINE
#endif

// BLOCKATTN_UNROLL(n): unroll the next loop n times, n an integer literal (GCC 12 rejects a
// template parameter there); with n >= the loop's fixed trip count the loop is unrolled
// completely. For the register blocks: their arrays of accumulator vectors become registers
// only when every loop that indexes them is unrolled, and GCC -O2 unrolls no loop whose body it
// would have to copy (only -O3 does), so without the pragma the accumulators live on the stack:
// a load and a store around every FMA (docs/tuning.md#optimisation-levels). Nothing on compilers
// without the pragma.
#define BLOCKATTN_PRAGMA(text) _Pragma(#text)
#if defined(__clang__)
#define BLOCKATTN_UNROLL(n) BLOCKATTN_PRAGMA(unroll n)
#elif defined(__GNUC__) && __GNUC__ >= 8
#define BLOCKATTN_UNROLL(n) BLOCKATTN_PRAGMA(GCC unroll n)
#else
#define BLOCKATTN_UNROLL(n)
#endif

// Internal invariants only (debug builds); user input is validated by detail/check.hpp, always.
#ifndef BLOCKATTN_ASSERT
#define BLOCKATTN_ASSERT(cond) eigen_assert(cond)
#endif

#if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
#define BLOCKATTN_HAS_EXCEPTIONS 1
#else
#define BLOCKATTN_HAS_EXCEPTIONS 0
#endif

// The scalar policy, decided here once. Every fast entry point (softmax, softmax_topk, attention,
// attention_backward, merge_attention_states, transformer_block) deduces its element type and
// checks it with
//   static_assert(detail::kStorageScalar<T>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
// at the call (the 16-bit formats compute in float); blockattn::reference checks kReferenceScalar
// the same way. Adding a kernel type is one entry in kKernelScalar's list plus its SIMD kernels;
// adding a storage format, one entry in kIs16BitFloat's plus its StorageIo (detail/convert.hpp).
#define BLOCKATTN_STORAGE_SCALAR_MESSAGE                                                     \
  "blockattn: the element type must be float, double, Eigen::bfloat16 or Eigen::half (long " \
  "double runs only through blockattn::reference)"
#define BLOCKATTN_ATTENTION_TYPES_MESSAGE                                                       \
  "blockattn::attention: q and out must have one element type, k and v one element type: q's, " \
  "or Eigen::bfloat16 / Eigen::half under a float q and out (a 16-bit KV cache)"
#define BLOCKATTN_GRADIENT_SCALAR_MESSAGE                                                    \
  "blockattn::attention_backward: dq, dk and dv must have the element type of q, k, v, out " \
  "and dout, or float over Eigen::bfloat16 / Eigen::half inputs (fp32 master gradients)"
#define BLOCKATTN_REFERENCE_SCALAR_MESSAGE \
  "blockattn::reference: the element type must be float, double or long double"

// The SIMD path, decided here once for every header (detail/simd.hpp implements it), from the
// compiler's flags, most capable first. Defining BLOCKATTN_FORCE_SCALAR selects the scalar
// fallback whatever the flags (the `scalar` preset tests it on every machine).
#if defined(BLOCKATTN_FORCE_SCALAR)
#define BLOCKATTN_SIMD_SCALAR 1
#elif defined(__AVX512F__)
#define BLOCKATTN_SIMD_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define BLOCKATTN_SIMD_AVX2 1
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define BLOCKATTN_SIMD_NEON 1
#elif defined(__SSE2__) || defined(_M_X64)
#define BLOCKATTN_SIMD_SSE2 1
#else
#define BLOCKATTN_SIMD_SCALAR 1
#endif

// BLOCKATTN_ISA_NAMESPACE: the inline namespace around everything in namespace blockattn, named
// after the code this translation unit's flags select (docs/build.md#mixing-isa-flags). A header-
// only library is compiled with each TU's flags; without the tag, TUs built with different flags
// would define the same inline functions with different bodies (an ODR violation) and the linker
// would keep one of them for all: a TU built for SSE2 could run AVX-512 code (SIGILL on an older
// CPU). With it each TU's definitions have their own mangled names. The name is the SIMD path plus
// every other feature macro a header selects code with, so that two TUs share a definition only
// when they compile it from the same source text:
//   __F16C__       the AVX2 path's half <-> float conversions (detail/convert.hpp)
//   __AVX512BF16__ the AVX-512 path's bf16 instructions, __AVX512FP16__ its half arithmetic
//   __AVX__        VEX-encoded code on the SSE2 path (-mavx, or -mavx2 without -mfma)
// tests/check_isa_namespace.sh fails when a header tests a feature macro not listed here, or
// opens namespace blockattn without the tag (tools/isa_ns.py adds it). Names spelled
// blockattn::attention keep working: the namespace is inline.
// BLOCKATTN_NO_ISA_NAMESPACE gives every TU the same name, i.e. the untagged behaviour: only for
// the test that shows the trap (tests/isa_mix), never in a program that mixes flags.
#if defined(BLOCKATTN_NO_ISA_NAMESPACE)
#define BLOCKATTN_ISA_NAMESPACE isa_untagged
#elif defined(BLOCKATTN_SIMD_SCALAR)
#define BLOCKATTN_ISA_NAMESPACE isa_scalar
#elif defined(BLOCKATTN_SIMD_AVX512) && defined(__AVX512BF16__) && defined(__AVX512FP16__)
#define BLOCKATTN_ISA_NAMESPACE isa_avx512_bf16_fp16
#elif defined(BLOCKATTN_SIMD_AVX512) && defined(__AVX512BF16__)
#define BLOCKATTN_ISA_NAMESPACE isa_avx512_bf16
#elif defined(BLOCKATTN_SIMD_AVX512) && defined(__AVX512FP16__)
#define BLOCKATTN_ISA_NAMESPACE isa_avx512_fp16
#elif defined(BLOCKATTN_SIMD_AVX512)
#define BLOCKATTN_ISA_NAMESPACE isa_avx512
#elif defined(BLOCKATTN_SIMD_AVX2) && defined(__F16C__)
#define BLOCKATTN_ISA_NAMESPACE isa_avx2_f16c
#elif defined(BLOCKATTN_SIMD_AVX2)
#define BLOCKATTN_ISA_NAMESPACE isa_avx2
#elif defined(BLOCKATTN_SIMD_NEON)
#define BLOCKATTN_ISA_NAMESPACE isa_neon
#elif defined(BLOCKATTN_SIMD_SSE2) && defined(__AVX__)
#define BLOCKATTN_ISA_NAMESPACE isa_sse2_vex
#elif defined(BLOCKATTN_SIMD_SSE2)
#define BLOCKATTN_ISA_NAMESPACE isa_sse2
#else
#error "blockattn: detail/config.hpp selected no SIMD path"
#endif
#define BLOCKATTN_STRINGIFY_(x) #x
#define BLOCKATTN_STRINGIFY(x) BLOCKATTN_STRINGIFY_(x)
/// The tag as a string literal, e.g. "isa_avx2_f16c" (for reports and tests).
#define BLOCKATTN_ISA_NAMESPACE_NAME BLOCKATTN_STRINGIFY(BLOCKATTN_ISA_NAMESPACE)

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

template <class T, class... List>
inline constexpr bool kIsOneOf = (std::is_same_v<T, List> || ...);

/// The element types of the fast kernels (SIMD micro-kernels exist for them).
template <class T>
inline constexpr bool kKernelScalar = kIsOneOf<T, float, double>;

/// The 16-bit floating-point storage formats: read widened to float, accumulated in float,
/// written rounded once (detail/convert.hpp).
template <class T>
inline constexpr bool kIs16BitFloat = kIsOneOf<T, Eigen::bfloat16, Eigen::half>;

/// The storage types the fast entry points accept for their tensors: the kernel scalars plus the
/// 16-bit formats, which compute in accumulator_t<T> (float).
template <class T>
inline constexpr bool kStorageScalar = kKernelScalar<T> || kIs16BitFloat<T>;

/// The element types of one attention() call: q and out of one storage type Q, k and v of one
/// storage type K, which is Q or, under a float q, a 16-bit format (the KV-cache case; double q
/// over a 16-bit cache is not offered: its float accumulation would not be double's).
template <class Q, class K, class V, class O>
inline constexpr bool kAttentionTypes = std::is_same_v<Q, O>&& std::is_same_v<K, V> &&
                                        (std::is_same_v<K, Q> ||
                                         (std::is_same_v<Q, float> && kIs16BitFloat<K>));

/// The element types of blockattn::reference: the kernels' types plus long double (the tests'
/// oracle precision).
template <class T>
inline constexpr bool kReferenceScalar = kKernelScalar<T> || std::is_same_v<T, long double>;

}  // namespace detail

/// The type in which sums, the online-softmax state and the log-sum-exp are kept for element type
/// T: double for double (and long double in the reference), float for everything else (float
/// today; bfloat16 and half storage accumulate in float).
template <class T>
struct AccumulatorOf {
  using type =
      std::conditional_t<std::is_same_v<T, double> || std::is_same_v<T, long double>, T, float>;
};

/// Shorthand for AccumulatorOf<T>::type; the element type of every lse array.
template <class T>
using accumulator_t = typename AccumulatorOf<T>::type;

}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
