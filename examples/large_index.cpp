// 64-bit indexing check: single-query decode over n_k keys of head dimension d, where n_k·d
// exceeds 2^31 elements, so any 32-bit index or offset product in the kernel would wrap.
// The values are chosen so the exact answer is known without a reference pass: every key is
// zero except key j* (the last one, index n_k − 1, beyond every 2^31 boundary), whose k row is
// all ones; q is all ones and the scale large, so key j* takes all the weight (the others'
// weights are exp(−scale·d) = 0 in float) and out must equal v[j*] = 3.
//   usage: large_index [n_k] [d]      default n_k = 2^25 + 7, d = 64
// Memory with the defaults: K is n_k·d floats = 2^31 + 448 floats ≈ 8.0 GiB, V (d_v = 1) is
// n_k floats ≈ 128 MiB; about 8.2 GiB in all (plus the kernel's per-thread workspace). ctest runs
// it with small arguments; run the defaults by hand on a machine with ≥ 10 GiB free.

#include <cstdio>
#include <cstdlib>
#include <vector>

#include <blockattn/attention.hpp>

int main(int argc, char** argv) {
  using blockattn::Index;
  const Index n_k = argc > 1 ? std::atoll(argv[1]) : (Index(1) << 25) + 7;
  const Index d = argc > 2 ? std::atoll(argv[2]) : 64;
  const Index last = n_k - 1;
  std::printf("n_k = %td, d = %td, n_k*d = %td elements (2^31 = %td), K = %.2f GiB\n", n_k, d,
              n_k * d, Index(1) << 31,
              static_cast<double>(n_k * d) * sizeof(float) / (1024.0 * 1024.0 * 1024.0));
  std::vector<float> q(static_cast<std::size_t>(d), 1.0F);
  std::vector<float> k(static_cast<std::size_t>(n_k * d), 0.0F);
  std::vector<float> v(static_cast<std::size_t>(n_k), 1.0F);
  for (Index c = 0; c < d; ++c) k[static_cast<std::size_t>(last * d + c)] = 1.0F;
  v[static_cast<std::size_t>(last)] = 3.0F;
  float out = 0;
  float lse = 0;
  blockattn::AttentionOptions options;
  options.scale = 16;  // score of key j*: 16·d; of every other key: 0
  blockattn::attention(blockattn::make_tensor_view<const float>(q.data(), 1, 1, 1, d),
                       blockattn::make_tensor_view<const float>(k.data(), 1, n_k, 1, d),
                       blockattn::make_tensor_view<const float>(v.data(), 1, n_k, 1, 1),
                       blockattn::make_tensor_view(&out, 1, 1, 1, 1), options, {&lse, 1});
  const float score = 16.0F * static_cast<float>(d);
  std::printf("out = %.9g (expected 3), lse = %.9g (expected %.9g)\n", static_cast<double>(out),
              static_cast<double>(lse), static_cast<double>(score));
  // exp(−16·d) underflows to 0 in float for d >= 7; for smaller d the other keys still weigh in,
  // so the exact check applies from d = 7 on.
  if (d >= 7 && (out != 3.0F || lse != score)) {
    std::printf("FAILED\n");
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
