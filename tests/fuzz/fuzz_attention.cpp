// libFuzzer target: attention() against reference::attention<long double> on problems decoded
// from the fuzzer's bytes (see attention_fuzz.hpp). Built with clang when
// BLOCKATTN_BUILD_FUZZERS=ON (the `fuzz` preset):
//   cmake --preset fuzz && cmake --build --preset fuzz
//   build/fuzz/tests/fuzz/fuzz_attention -max_len=512 -max_total_time=60 <scratch dir> \
//     tests/fuzz/corpus

#include <cstddef>
#include <cstdint>

#include "fuzz/attention_fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  blockattn::fuzz::check_bytes(data, size);
  return 0;
}
