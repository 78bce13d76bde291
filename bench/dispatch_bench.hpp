#pragma once
// What the two translation units of dispatch_bench share: plain data and std types only. One TU
// is built for baseline x86-64 and calls blockattn::dispatch::attention; the other is built with
// -march=native and calls the header-only blockattn::attention. Each sees blockattn under its own
// ISA tag (isa_sse2, isa_avx512_bf16 on a Zen 4/5 machine), so no blockattn type may cross.

#include <cstddef>
#include <functional>

namespace dispatch_bench {

/// One benchmark problem: q [1, n_q, heads, d], k and v [1, n_k, kv_heads, d], out like q, all
/// contiguous (BSHD). q and out hold float, or bfloat16 bits when bf16_q; k and v likewise with
/// bf16_kv. threads: AttentionOptions::threads.
struct Case {
  std::ptrdiff_t n_q = 0;
  std::ptrdiff_t n_k = 0;
  std::ptrdiff_t heads = 0;
  std::ptrdiff_t kv_heads = 0;
  std::ptrdiff_t d = 0;
  bool bf16_q = false;
  bool bf16_kv = false;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  int threads = 1;
};

/// One call of the header-only blockattn::attention on the case, compiled with -march=native,
/// with a Workspace kept across calls (as a caller's loop does: no call allocates after the first).
std::function<void()> native_runner(const Case& c);

/// The native TU's ISA tag, e.g. "isa_avx512_bf16" (detail/config.hpp).
const char* native_isa();

}  // namespace dispatch_bench
