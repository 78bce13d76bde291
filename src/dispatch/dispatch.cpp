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
#define BLOCKATTN_DECLARE_VARIANT(name)      \
  namespace name {                           \
  const char* simd_name();                   \
  void attention(const AttentionCall& call); \
  }
BLOCKATTN_DECLARE_VARIANT(sse2)
BLOCKATTN_DECLARE_VARIANT(avx2)
BLOCKATTN_DECLARE_VARIANT(avx512)
BLOCKATTN_DECLARE_VARIANT(avx512_bf16)
#undef BLOCKATTN_DECLARE_VARIANT

namespace {

struct Variant {
  const char* (*name)();
  void (*attention)(const AttentionCall&);
};

/// The variants from the least to the most capable; each needs everything the one below needs.
enum Level { kSse2 = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

/// XCR0: which register states the operating system saves on a context switch. A CPU feature
/// is usable only when its registers are saved (a kernel without AVX-512 support clears them).
std::uint64_t saved_register_state() {
  std::uint32_t low = 0;
  std::uint32_t high = 0;
  __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
  return (static_cast<std::uint64_t>(high) << 32) | low;
}

/// The best level this CPU runs, from CPUID leaves 1 and 7 (subleaves 0 and 1) and XCR0.
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
  const unsigned max_subleaf = eax;
  if (!(ymm_saved && avx2 && fma && f16c)) return kSse2;
  if (!(zmm_saved && avx512f && avx512dq && avx512bw && avx512vl)) return kAvx2;
  // AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16): leaf 7 subleaf 1, EAX bit 5; its registers are the
  // AVX-512 ones, already saved.
  if (max_subleaf < 1 || __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) == 0) return kAvx512;
  const bool avx512_bf16 = (eax & (1U << 5)) != 0;
  return avx512_bf16 ? kAvx512Bf16 : kAvx512;
}

/// BLOCKATTN_MAX_ISA as a level; kAvx512Bf16 (no cap) when unset or empty. "avx512" caps below
/// avx512_bf16.
Level cap_from_environment() {
  const char* cap = std::getenv("BLOCKATTN_MAX_ISA");  // NOLINT(concurrency-mt-unsafe): read once
  if (cap == nullptr || *cap == '\0') return kAvx512Bf16;
  if (std::strcmp(cap, "sse2") == 0) return kSse2;
  if (std::strcmp(cap, "avx2") == 0) return kAvx2;
  if (std::strcmp(cap, "avx512") == 0) return kAvx512;
  if (std::strcmp(cap, "avx512_bf16") == 0) return kAvx512Bf16;
  throw std::invalid_argument(std::string("blockattn::dispatch: BLOCKATTN_MAX_ISA is \"") + cap +
                              "\"; expected sse2, avx2, avx512 or avx512_bf16 (or unset)");
}

Variant choose() {
  const Level cpu = cpu_level();
  const Level cap = cap_from_environment();
  switch (cpu < cap ? cpu : cap) {
    case kAvx512Bf16:
      return {avx512_bf16::simd_name, avx512_bf16::attention};
    case kAvx512:
      return {avx512::simd_name, avx512::attention};
    case kAvx2:
      return {avx2::simd_name, avx2::attention};
    case kSse2:
      break;
  }
  return {sse2::simd_name, sse2::attention};
}

/// The variant, chosen at the first call (thread-safe: a function-local static; a throwing
/// choice is retried at the next call).
const Variant& variant() {
  static const Variant chosen = choose();
  return chosen;
}

}  // namespace

const char* selected_isa() { return variant().name(); }
void attention(const AttentionCall& call) { variant().attention(call); }

}  // namespace blockattn_dispatch
