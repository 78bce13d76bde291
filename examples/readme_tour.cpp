// The README's API tour, compiled and run: every snippet of README.md that is not a whole example
// is a marked region here (between two "// [readme]" lines), with the declarations it needs
// around it. The readme_snippets_match_examples test (cmake/CheckReadmeSnippets.cmake) fails when a
// README block differs from every marked region of examples/, so the README cannot drift from code
// that runs.
//
//   readme_tour      (no arguments; returns 0 when every snippet gave a finite, checked result)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include <blockattn/blockattn.hpp>

namespace {

using blockattn::Index;
using blockattn::Matrix;

/// Batched GQA with padding, the lse and a reused workspace; checked against the reference.
bool tensor_views() {
  const Index batch = 2, n = 96;
  std::vector<float> q_buffer(static_cast<std::size_t>(batch * n * 16 * 64));
  std::vector<float> k_buffer(static_cast<std::size_t>(batch * n * 4 * 64));
  std::vector<float> v_buffer(k_buffer.size());
  std::vector<float> out_buffer(q_buffer.size());
  float seed = 0.0F;
  for (auto* buffer : {&q_buffer, &k_buffer, &v_buffer}) {
    for (float& x : *buffer) x = std::sin(seed += 0.37F);  // deterministic, in [-1, 1]
  }
  float* const q_data = q_buffer.data();
  float* const k_data = k_buffer.data();
  float* const v_data = v_buffer.data();
  float* const out_data = out_buffer.data();
  // [readme]
  auto q = blockattn::make_tensor_view(q_data, batch, n, 16, 64);  // 16 query heads
  auto k = blockattn::make_tensor_view(k_data, batch, n, 4, 64);   // 4 kv heads (GQA)
  auto v = blockattn::make_tensor_view(v_data, batch, n, 4, 64);
  auto out = blockattn::make_tensor_view(out_data, batch, n, 16, 64);
  std::vector<Index> lengths{n, n - 10};  // keys at or past lengths[b] are padding
  std::vector<float> lse(static_cast<std::size_t>(batch * 16 * n));  // [batch, heads, n]
  blockattn::Workspace workspace;  // grows once; later calls allocate nothing
  blockattn::AttentionOptions options;
  options.causal = true;
  options.key_lengths = lengths;
  options.workspace = &workspace;
  blockattn::attention(q, k, v, out, options, lse);
  // [readme]
  std::vector<float> expected(out_buffer.size());
  blockattn::reference::attention(
      q, k, v, blockattn::make_tensor_view(expected.data(), batch, n, 16, 64), options);
  float worst = 0.0F;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const float diff = out_buffer[i] - expected[i];
    worst = diff > worst ? diff : (-diff > worst ? -diff : worst);
  }
  std::printf("tensor views: max |out - reference| = %g\n", static_cast<double>(worst));
  return worst < 1e-4F;  // float rounding is ~1e-6 here; a head or padding mix-up is ~0.1
}

/// A user mask (documents packed into one sequence), single head.
bool user_mask() {
  const Index n = 200, d = 32;
  const Matrix<float> q = Matrix<float>::Random(n, d);
  const Matrix<float> k = Matrix<float>::Random(n, d);
  const Matrix<float> v = Matrix<float>::Random(n, d);
  Matrix<float> out(n, d);
  Eigen::VectorXi doc(n);  // the document of each token: three documents
  for (Index i = 0; i < n; ++i) doc[i] = i < 50 ? 0 : (i < 120 ? 1 : 2);
  blockattn::AttentionOptions options;
  options.causal = true;
  // [readme]
  auto same_document = [&](Index, Index, Index i, Index j) { return doc[i] == doc[j]; };
  blockattn::attention(q, k, v, out, options, {}, same_document);  // {}: no lse
  // [readme]
  // Token 50 starts document 1: it sees only itself, so its output is v's row 50 exactly.
  const bool first_of_document = out.row(50) == v.row(50);
  std::printf("user mask: token 50 sees only itself: %s\n", first_of_document ? "yes" : "no");
  return first_of_document && out.allFinite();
}

/// The backward pass through the named structs.
bool training() {
  const Index n = 64, d = 16;
  const Matrix<float> q = Matrix<float>::Random(n, d);
  const Matrix<float> k = Matrix<float>::Random(n, d);
  const Matrix<float> v = Matrix<float>::Random(n, d);
  const Matrix<float> dout = Matrix<float>::Random(n, d);
  Matrix<float> out(n, d);
  std::vector<float> lse(static_cast<std::size_t>(n));
  blockattn::AttentionOptions options;
  options.causal = true;
  blockattn::attention(q, k, v, out, options, lse);
  Matrix<float> dq(n, d), dk(n, d), dv(n, d);
  // [readme]
  blockattn::AttentionBackwardInputs<float> in;  // the forward's q, k, v, out, lse, and dL/dout
  in.q = q, in.k = k, in.v = v, in.out = out, in.lse = lse, in.dout = dout;
  blockattn::AttentionGradients<float> grads;  // overwritten: dL/dq, dL/dk, dL/dv
  grads.dq = dq, grads.dk = dk, grads.dv = dv;
  blockattn::attention_backward(in, grads, options);
  // [readme]
  // The last key is seen only by the last query (causal): its dv row is that query's weight
  // exp(s - lse) <= 1 times dout's last row.
  std::printf("training: finite gradients: %s\n",
              dq.allFinite() && dk.allFinite() && dv.allFinite() ? "yes" : "no");
  return dq.allFinite() && dk.allFinite() && dv.allFinite() &&
         (dv.row(n - 1).cwiseAbs().array() <= dout.row(n - 1).cwiseAbs().array() + 1e-6F).all();
}

/// softmax_topk on plain arrays: each Span carries its length.
bool top_k() {
  const std::vector<float> logits{0.5F, 3.0F, -1.0F, 2.0F, 0.0F};
  std::vector<float> p(2);                 // the two largest probabilities, descending
  std::vector<blockattn::Index> token(2);  // and their indices in logits
  blockattn::softmax_topk(blockattn::Span(logits), 2, blockattn::Span(p), blockattn::Span(token));
  std::printf("top-2: tokens %ld, %ld\n", static_cast<long>(token[0]), static_cast<long>(token[1]));
  return token[0] == 1 && token[1] == 3 && p[0] > p[1];
}

/// Decode over a paged float cache with a vLLM page table: each sequence's output is bitwise the
/// call on its own pages gathered into a contiguous cache.
bool paged_cache() {
  const Index batch = 2, num_pages = 6, page_size = 4, max_pages = 3;
  std::vector<float> k_buffer(static_cast<std::size_t>(num_pages * page_size * 8 * 128));
  std::vector<float> v_buffer(k_buffer.size());
  std::vector<float> q_buffer(static_cast<std::size_t>(batch * 8 * 128));
  std::vector<float> out_buffer(q_buffer.size());
  float seed = 0.0F;
  for (auto* buffer : {&k_buffer, &v_buffer, &q_buffer}) {
    for (float& x : *buffer) x = std::sin(seed += 0.29F);
  }
  const float* const k_pages = k_buffer.data();
  const float* const v_pages = v_buffer.data();
  const std::vector<std::int32_t> block_tables{4, 0, 2, 5, 1, 3};  // [batch, max_pages]
  const std::vector<std::int32_t> seq_lens{9, 12};                 // tokens of each sequence
  auto q = blockattn::make_tensor_view<const float>(q_buffer.data(), batch, 1, 8, 128);
  auto out = blockattn::make_tensor_view(out_buffer.data(), batch, 1, 8, 128);
  blockattn::AttentionOptions options;
  // [readme]
  auto pool_k = blockattn::make_tensor_view<const float>(k_pages, num_pages, page_size, 8, 128);
  auto pool_v = blockattn::make_tensor_view<const float>(v_pages, num_pages, page_size, 8, 128);
  blockattn::PagedKV<float> cache{pool_k, pool_v,
                                  blockattn::vllm_page_table(block_tables, max_pages, seq_lens)};
  blockattn::attention(q, cache, out, options);  // q, out [batch, n_q, heads, d]
  // [readme]
  bool same = true;
  for (Index b = 0; b < batch; ++b) {  // the contiguous call on sequence b's gathered pages
    const Index n = seq_lens[static_cast<std::size_t>(b)];
    std::vector<float> k_seq(static_cast<std::size_t>(n * 8 * 128)), v_seq(k_seq.size());
    for (Index j = 0; j < n; ++j) {
      const auto page = block_tables[static_cast<std::size_t>(b * max_pages + j / page_size)];
      const std::size_t from =
          static_cast<std::size_t>((page * page_size + j % page_size) * 8 * 128);
      std::copy_n(k_buffer.begin() + static_cast<std::ptrdiff_t>(from), 8 * 128,
                  k_seq.begin() + j * 8 * 128);
      std::copy_n(v_buffer.begin() + static_cast<std::ptrdiff_t>(from), 8 * 128,
                  v_seq.begin() + j * 8 * 128);
    }
    std::vector<float> want(8 * 128);
    blockattn::attention(
        blockattn::make_tensor_view<const float>(q_buffer.data() + b * 8 * 128, 1, 1, 8, 128),
        blockattn::make_tensor_view<const float>(k_seq.data(), 1, n, 8, 128),
        blockattn::make_tensor_view<const float>(v_seq.data(), 1, n, 8, 128),
        blockattn::make_tensor_view(want.data(), 1, 1, 8, 128), options);
    same = same && std::equal(want.begin(), want.end(), out_buffer.begin() + b * 8 * 128);
  }
  std::printf("paged decode equals the gathered contiguous call: %s\n", same ? "yes" : "no");
  return same;
}

/// Three decodes over caches of 1,000, 517 and 383 tokens packed without padding: each sequence's
/// output is bitwise attention() on that sequence alone.
bool varlen_batch() {
  const Index total_q = 3, total_k = 1900;
  std::vector<float> q_buffer(static_cast<std::size_t>(total_q * 16 * 128));
  std::vector<float> k_buffer(static_cast<std::size_t>(total_k * 4 * 128));
  std::vector<float> v_buffer(k_buffer.size());
  std::vector<float> out_buffer(q_buffer.size());
  float seed = 0.0F;
  for (auto* buffer : {&q_buffer, &k_buffer, &v_buffer}) {
    for (float& x : *buffer) x = std::sin(seed += 0.23F);
  }
  auto q = blockattn::make_tensor_view<const float>(q_buffer.data(), 1, total_q, 16, 128);
  auto k = blockattn::make_tensor_view<const float>(k_buffer.data(), 1, total_k, 4, 128);
  auto v = blockattn::make_tensor_view<const float>(v_buffer.data(), 1, total_k, 4, 128);
  auto out = blockattn::make_tensor_view(out_buffer.data(), 1, total_q, 16, 128);
  blockattn::AttentionOptions options;
  // [readme]
  std::vector<std::int32_t> cu_q{0, 1, 2, 3}, cu_k{0, 1000, 1517, 1900};  // 3 decodes
  blockattn::attention_varlen(q, k, v, out, cu_q, cu_k, options);  // views [1, total, heads, d]
  // [readme]
  bool same = true;
  for (std::size_t s = 0; s < 3; ++s) {  // attention() on sequence s alone
    const Index k0 = cu_k[s], n = cu_k[s + 1] - cu_k[s];
    std::vector<float> want(16 * 128);
    blockattn::attention(
        blockattn::make_tensor_view<const float>(q_buffer.data() + s * 16 * 128, 1, 1, 16, 128),
        blockattn::make_tensor_view<const float>(k_buffer.data() + k0 * 4 * 128, 1, n, 4, 128),
        blockattn::make_tensor_view<const float>(v_buffer.data() + k0 * 4 * 128, 1, n, 4, 128),
        blockattn::make_tensor_view(want.data(), 1, 1, 16, 128), options);
    same = same && std::equal(want.begin(), want.end(), out_buffer.begin() + s * 16 * 128);
  }
  std::printf("varlen decode equals one call per sequence: %s\n", same ? "yes" : "no");
  return same;
}

}  // namespace

int main() {
  const bool ok =
      tensor_views() && user_mask() && training() && top_k() && paged_cache() && varlen_batch();
  return ok ? 0 : 1;
}
