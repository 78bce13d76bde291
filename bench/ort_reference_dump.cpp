// blockattn's output on the hashed inputs of bench/support/hash_inputs.hpp, written to a file for
// bench/compare_ort.mjs, which computes the same inputs in JavaScript, runs ONNX Runtime on them
// and compares every output with this one. Not a benchmark: one call, all threads.
//
// Usage: ort_reference_dump n_q n_k heads d causal out.bin
// q is [1, n_q, heads, d], k and v [1, n_k, heads, d] (flat index = hash index); the file holds
// the output [n_q, heads, d] as raw little-endian float32. Causal is bottom-right aligned.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <vector>

#include <blockattn/attention.hpp>

#include "support/hash_inputs.hpp"

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s n_q n_k heads d causal out.bin\n", argv[0]);
    return 2;
  }
  using blockattn::Index;
  using blockattn::bench::HashedTensor;
  const Index n_q = std::atoll(argv[1]);
  const Index n_k = std::atoll(argv[2]);
  const Index heads = std::atoll(argv[3]);
  const Index d = std::atoll(argv[4]);
  try {
    const auto q = blockattn::bench::hashed_values(HashedTensor::kQuery, n_q * heads * d);
    const auto k = blockattn::bench::hashed_values(HashedTensor::kKey, n_k * heads * d);
    const auto v = blockattn::bench::hashed_values(HashedTensor::kValue, n_k * heads * d);
    std::vector<float> out(q.size());
    blockattn::AttentionOptions options;
    options.causal = std::atoi(argv[5]) != 0;
    options.threads = 0;  // results are bitwise the same for every thread count
    blockattn::attention(blockattn::make_tensor_view(q.data(), 1, n_q, heads, d),
                         blockattn::make_tensor_view(k.data(), 1, n_k, heads, d),
                         blockattn::make_tensor_view(v.data(), 1, n_k, heads, d),
                         blockattn::make_tensor_view(out.data(), 1, n_q, heads, d), options);
    std::FILE* file = std::fopen(argv[6], "wb");
    if (file == nullptr || std::fwrite(out.data(), sizeof(float), out.size(), file) != out.size() ||
        std::fclose(file) != 0) {
      std::perror(argv[6]);
      return 1;
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "ort_reference_dump: %s\n", error.what());
    return 1;
  }
  return 0;
}
