// Which SIMD path this build runs (detail/simd.hpp's kName). Every CI configuration sets
// BLOCKATTN_EXPECT_ISA to the path its flags select, so a build that silently falls back to a
// narrower ISA fails instead of testing the wrong code; without it the test only reports the path.
#include <cstdio>
#include <cstdlib>

#include <gtest/gtest.h>

#include <blockattn/detail/simd.hpp>

namespace isa_test {
namespace {

using blockattn::detail::simd::Simd;

TEST(IsaTest, RunsTheExpectedSimdPath) {
  std::printf("blockattn SIMD path: %s (float %d lanes, double %d lanes), namespace %s\n",
              Simd<float>::kName, Simd<float>::kLanes, Simd<double>::kLanes,
              BLOCKATTN_ISA_NAMESPACE_NAME);
  RecordProperty("isa", Simd<float>::kName);
  EXPECT_STREQ(Simd<float>::kName, Simd<double>::kName);
  EXPECT_STREQ(blockattn::simd_isa(), Simd<float>::kName);
  const char* expected = std::getenv("BLOCKATTN_EXPECT_ISA");  // NOLINT(concurrency-mt-unsafe)
  if (expected == nullptr || *expected == '\0') {
    GTEST_SKIP() << "BLOCKATTN_EXPECT_ISA is not set: the path above is not checked";
  }
  EXPECT_STREQ(Simd<float>::kName, expected)
      << "built for " << expected << " but runs " << Simd<float>::kName;
}

}  // namespace

}  // namespace isa_test
