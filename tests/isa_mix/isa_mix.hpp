#pragma once
// The interface between isa_mix_main.cpp and the copies of isa_mix_tu.cpp, each compiled with its
// own ISA flags. Deliberately free of blockattn and Eigen: main itself instantiates nothing that
// a TU defines.
#include <cstdint>

struct IsaMixResult {
  const char* compiled;       // the SIMD path this TU's flags select (Simd<float>::kName, inlined)
  const char* tag;            // its ISA namespace (BLOCKATTN_ISA_NAMESPACE_NAME)
  const char* ran;            // blockattn::simd_isa() called from this TU: the definition linked
  double max_error;           // attention() against a double-precision loop, max |difference|
  std::uint64_t fingerprint;  // FNV-1a of the output's bits
};

// One per TU, named by ISA_MIX_TU (isa_mix_run_sse2, ...).
IsaMixResult isa_mix_run_scalar();
IsaMixResult isa_mix_run_sse2();
IsaMixResult isa_mix_run_avx2();
IsaMixResult isa_mix_run_avx512();
