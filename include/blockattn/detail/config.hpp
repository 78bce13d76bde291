#pragma once
// Version, assertion and error-reporting configuration. CMake reads the version from here.

#include <cstdio>
#include <cstdlib>

#include <Eigen/Core>

// Convenience overloads. Every public function template also has float and double overloads so
// that plain Matrix<float> arguments need no explicit <float> (STYLE 2.3). They are written as
// `template <int = 0> inline ...`, a template with nothing to deduce: overload resolution is the
// same as for a plain inline function, but the body is instantiated only where it is called. A
// plain inline overload would instantiate the whole float and double kernel stack in every
// translation unit that includes the header (measured: ~30 s of compile time for an empty main).

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

// BLOCKATTN_UNROLL(n): unroll the next loop n times, n an integer literal (GCC 12 rejects a
// template parameter there); with n >= the loop's fixed trip count the loop is unrolled
// completely. For the register blocks: their arrays of accumulator vectors become registers
// only when every loop that indexes them is unrolled, and GCC -O2 unrolls no loop whose body it
// would have to copy (only -O3 does), so without the pragma the accumulators live on the stack:
// a load and a store around every FMA, 2-5x the instructions (docs/tuning.md, "Optimisation
// levels"). Nothing on compilers without the pragma.
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
