// blockattn::dispatch's choice of kernel variant: the best the CPU and the operating system
// support, capped by BLOCKATTN_MAX_ISA, decided once per process. Built with the baseline
// (SSE2) flags: this file runs before anything is known about the CPU.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include <blockattn/detail/dispatch_abi.hpp>

#include <cpuid.h>

namespace blockattn_dispatch {

// The variants (attention_variant.cpp, once per ISA).
#define BLOCKATTN_DECLARE_VARIANT(name)             \
  namespace name {                                  \
  const char* simd_name();                          \
  void attention_float(const AttentionCall& call);  \
  void attention_double(const AttentionCall& call); \
  }
BLOCKATTN_DECLARE_VARIANT(sse2)
BLOCKATTN_DECLARE_VARIANT(avx2)
BLOCKATTN_DECLARE_VARIANT(avx512)
#undef BLOCKATTN_DECLARE_VARIANT

namespace {

struct Variant {
  const char* (*name)();
  void (*attention_float)(const AttentionCall&);
  void (*attention_double)(const AttentionCall&);
};

enum Level { kSse2 = 0, kAvx2 = 1, kAvx512 = 2 };

/// XCR0: which register states the operating system saves on a context switch. A CPU feature
/// is usable only when its registers are saved (a kernel without AVX-512 support clears them).
std::uint64_t saved_register_state() {
  std::uint32_t low = 0;
  std::uint32_t high = 0;
  __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
  return (static_cast<std::uint64_t>(high) << 32) | low;
}

/// The best level this CPU runs, from CPUID leaves 1 and 7 and XCR0.
Level cpu_level() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0) return kSse2;
  const bool osxsave = (ecx & (1U << 27)) != 0;
  const bool fma = (ecx & (1U << 12)) != 0;
  const bool avx = (ecx & (1U << 28)) != 0;
  const bool f16c = (ecx & (1U << 29)) != 0;
  if (!osxsave || !avx) return kSse2;
  const std::uint64_t xcr0 = saved_register_state();
  const bool ymm_saved = (xcr0 & 0x6) == 0x6;    // SSE and AVX state
  const bool zmm_saved = (xcr0 & 0xe6) == 0xe6;  // plus opmask, ZMM0-15 upper, ZMM16-31
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return kSse2;
  const bool avx2 = (ebx & (1U << 5)) != 0;
  const bool avx512f = (ebx & (1U << 16)) != 0;
  const bool avx512dq = (ebx & (1U << 17)) != 0;
  const bool avx512bw = (ebx & (1U << 30)) != 0;
  const bool avx512vl = (ebx & (1U << 31)) != 0;
  if (!(ymm_saved && avx2 && fma && f16c)) return kSse2;
  if (zmm_saved && avx512f && avx512dq && avx512bw && avx512vl) return kAvx512;
  return kAvx2;
}

/// BLOCKATTN_MAX_ISA as a level; kAvx512 when unset or empty.
Level cap_from_environment() {
  const char* cap = std::getenv("BLOCKATTN_MAX_ISA");  // NOLINT(concurrency-mt-unsafe): read once
  if (cap == nullptr || *cap == '\0') return kAvx512;
  if (std::strcmp(cap, "sse2") == 0) return kSse2;
  if (std::strcmp(cap, "avx2") == 0) return kAvx2;
  if (std::strcmp(cap, "avx512") == 0) return kAvx512;
  throw std::invalid_argument(std::string("blockattn::dispatch: BLOCKATTN_MAX_ISA is \"") + cap +
                              "\"; expected sse2, avx2 or avx512 (or unset)");
}

Variant choose() {
  const Level cpu = cpu_level();
  const Level cap = cap_from_environment();
  switch (cpu < cap ? cpu : cap) {
    case kAvx512:
      return {avx512::simd_name, avx512::attention_float, avx512::attention_double};
    case kAvx2:
      return {avx2::simd_name, avx2::attention_float, avx2::attention_double};
    case kSse2:
      break;
  }
  return {sse2::simd_name, sse2::attention_float, sse2::attention_double};
}

/// The variant, chosen at the first call (thread-safe: a function-local static; a throwing
/// choice is retried at the next call).
const Variant& variant() {
  static const Variant chosen = choose();
  return chosen;
}

}  // namespace

const char* selected_isa() { return variant().name(); }
void attention_float(const AttentionCall& call) { variant().attention_float(call); }
void attention_double(const AttentionCall& call) { variant().attention_double(call); }

}  // namespace blockattn_dispatch
