// The smallest useful program: exact single-head causal attention on Eigen matrices, computed
// chunk by chunk so the n×n score matrix never exists, checked against the naive reference.
#include <cstdio>

// [readme]
#include <blockattn/blockattn.hpp>
// [readme]

int main() {
  // [readme]
  const blockattn::Index n = 1000, d = 64;  // tokens, head dimension
  const blockattn::Matrix<float> q = blockattn::Matrix<float>::Random(n, d);
  const blockattn::Matrix<float> k = blockattn::Matrix<float>::Random(n, d);
  const blockattn::Matrix<float> v = blockattn::Matrix<float>::Random(n, d);
  blockattn::Matrix<float> out(n, d);

  blockattn::AttentionOptions options;
  options.causal = true;                        // token i sees tokens 0..i
  blockattn::attention(q, k, v, out, options);  // softmax(q kᵀ/√d) v, no n×n matrix

  blockattn::Matrix<float> naive(n, d);  // the O(n²) way, for comparison
  blockattn::reference::attention(q, k, v, naive, options);
  std::printf("max |chunked - naive| = %g\n",
              static_cast<double>((out - naive).cwiseAbs().maxCoeff()));
  // [readme]
  // Float rounding here is ~1e-6 (tests/support/tolerance.hpp); a masking bug would be ~0.1.
  return (out - naive).cwiseAbs().maxCoeff() < 1e-4F ? 0 : 1;
}
