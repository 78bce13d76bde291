// One program, several translation units built with different ISA flags (isa_mix_tu.cpp, once per
// ISA): each must run its own SIMD path, and all must be correct (docs/build.md#mixing-isa-flags).
//
//   isa_mix            the tagged build: every TU reports the path its flags select
//                      (blockattn::simd_isa(), an out-of-line definition, so the one the linker
//                      kept), their ISA namespaces differ, their results are within tolerance, and
//                      TUs on different paths give bitwise different outputs (so the attention
//                      kernels themselves, not only simd_isa, are each TU's own).
//   isa_mix --shared   the negative control, built with -DBLOCKATTN_NO_ISA_NAMESPACE (every TU in
//                      the same namespace, as before the tag): passes when the trap shows, i.e.
//                      some TU runs a path other than its own. If this ever fails, the tagged test
//                      has lost the power to detect a shared definition.
// Exit 77 (skipped) when this CPU cannot run two of the TUs, or, for --shared, all of them (an
// untagged TU may run any other TU's instructions).
#include <cstdio>
#include <cstring>
#include <vector>

#include "isa_mix.hpp"

namespace {

struct Tu {
  const char* name;
  IsaMixResult (*run)();
  bool cpu_runs;
};

// Tolerance: outputs are convex combinations of values in [-1, 1]; float scores over d = 64 and
// float sums over 53 keys put the error near 1e-6 (measured: ~1e-7); a kernel computing anything
// else (a wrong lane, a lost tail) is off by ~0.1.
constexpr double kTolerance = 1e-5;

}  // namespace

int main(int argc, char** argv) {
  const bool shared = argc > 1 && std::strcmp(argv[1], "--shared") == 0;
  std::vector<Tu> tus;
  // Link order (CMakeLists.txt) puts the widest ISA first: without the tag, GNU ld keeps the first
  // definition, so the narrow TUs run AVX-512 code: the direction that is SIGILL on older CPUs.
#ifdef ISA_MIX_HAS_avx512
  tus.push_back({"avx512", isa_mix_run_avx512, __builtin_cpu_supports("avx512f") != 0});
#endif
#ifdef ISA_MIX_HAS_avx2
  tus.push_back({"avx2", isa_mix_run_avx2,
                 __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0});
#endif
#ifdef ISA_MIX_HAS_sse2
  tus.push_back({"sse2", isa_mix_run_sse2, true});
#endif
#ifdef ISA_MIX_HAS_scalar
  tus.push_back({"scalar", isa_mix_run_scalar, true});
#endif
  std::size_t runnable = 0;
  for (const Tu& tu : tus) runnable += tu.cpu_runs ? 1 : 0;
  if (runnable < 2 || (shared && runnable < tus.size())) {
    std::printf("isa_mix: this CPU runs %zu of the %zu TUs: skipped\n", runnable, tus.size());
    return 77;
  }

  int failures = 0;
  std::vector<IsaMixResult> results;
  std::vector<const Tu*> ran_tus;
  for (const Tu& tu : tus) {
    if (!tu.cpu_runs) {
      std::printf("%-7s TU: skipped (this CPU lacks its ISA)\n", tu.name);
      continue;
    }
    const IsaMixResult r = tu.run();
    std::printf(
        "%-7s TU: compiled for %-8s namespace %-20s ran %-8s max error %.2e, output "
        "bits %016llx\n",
        tu.name, r.compiled, r.tag, r.ran, r.max_error,
        static_cast<unsigned long long>(r.fingerprint));
    if (!(r.max_error <= kTolerance)) {
      std::printf("  FAIL: error %.3g above the tolerance %.0e\n", r.max_error, kTolerance);
      ++failures;
    }
    results.push_back(r);
    ran_tus.push_back(&tu);
  }

  int foreign = 0;
  for (const IsaMixResult& r : results) foreign += std::strcmp(r.compiled, r.ran) != 0 ? 1 : 0;
  if (shared) {
    std::printf("untagged: %d of %zu TUs ran another TU's path\n", foreign, results.size());
    if (foreign == 0) {
      std::printf(
          "  FAIL: expected the shared definitions to show (some TU running another "
          "path); the tagged test could not tell a shared definition from its own\n");
      ++failures;
    }
    return failures == 0 ? 0 : 1;
  }

  if (foreign != 0) {
    std::printf("  FAIL: %d TUs ran another TU's path (shared definitions)\n", foreign);
    ++failures;
  }
  for (std::size_t a = 0; a < results.size(); ++a) {
    for (std::size_t b = a + 1; b < results.size(); ++b) {
      if (std::strcmp(results[a].compiled, results[b].compiled) == 0) continue;
      if (std::strcmp(results[a].tag, results[b].tag) == 0) {
        std::printf("  FAIL: %s and %s TUs share the namespace %s\n", ran_tus[a]->name,
                    ran_tus[b]->name, results[a].tag);
        ++failures;
      }
      // Different paths round differently (FMA or not, 16, 8, 4 or 1 lanes per partial sum), so
      // equal bits over these 2,368 outputs would mean one kernel ran for both TUs.
      if (results[a].fingerprint == results[b].fingerprint) {
        std::printf("  FAIL: %s and %s TUs give bitwise the same output: the same kernel ran\n",
                    ran_tus[a]->name, ran_tus[b]->name);
        ++failures;
      }
    }
  }
  std::printf(failures == 0 ? "isa_mix: every TU ran its own path\n" : "isa_mix: FAILED\n");
  return failures == 0 ? 0 : 1;
}
