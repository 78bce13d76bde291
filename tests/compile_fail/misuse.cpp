// Misuse that must not compile, one case per -DCASE=<name> (tests/CMakeLists.txt builds each with
// -fsyntax-only and expects its one static_assert message): the scalar policy of every fast entry
// point (long double runs only through blockattn::reference), attention()'s element-type pairs
// (a 16-bit K/V cache only under float q and out), a column-major argument, the backward pass's
// gradients given by position (so that a swapped dq/dk cannot compile), and softmax_topk's
// unsized raw-pointer form (removed: its arrays are Spans).

#include <vector>

#include <blockattn/blockattn.hpp>

namespace {

using L = long double;
using blockattn::Index;
using blockattn::Matrix;

[[maybe_unused]] void misuse() {
  Matrix<L> x(4, 4);
  Matrix<L> y(4, 4);
  blockattn::RowVector<L> row(4);
  blockattn::RowVector<Index> indices(4);
  const auto t = blockattn::make_tensor_view(x.data(), 1, 4, 1, 4);
#if defined(CASE_softmax)
  blockattn::softmax(x, y);
#elif defined(CASE_softmax_pointer)
  blockattn::softmax(x.data(), 4, y.data());
#elif defined(CASE_softmax_topk)
  blockattn::softmax_topk(row, 2, row, indices);
#elif defined(CASE_softmax_topk_span)
  std::vector<L> values(2);
  std::vector<Index> top(2);
  blockattn::softmax_topk(blockattn::Span(row.data(), 4), 2, blockattn::Span(values),
                          blockattn::Span(top));
#elif defined(CASE_softmax_topk_pointer)
  // The unsized raw-pointer form is gone: lengths travel with the arrays (Span).
  std::vector<float> xs(4);
  std::vector<float> values(2);
  std::vector<Index> top(2);
  blockattn::softmax_topk(xs.data(), 4, 2, values.data(), top.data());
#elif defined(CASE_attention)
  blockattn::attention(x, x, x, y);
#elif defined(CASE_attention_tensor)
  blockattn::attention(t, t, t, t);
#elif defined(CASE_attention_backward)
  blockattn::AttentionBackwardInputs<L> in;
  blockattn::AttentionGradients<L> grads;
  blockattn::attention_backward(in, grads);
#elif defined(CASE_merge_attention_states)
  std::vector<L> lse(4);
  blockattn::merge_attention_states(x, lse, x, lse, y);
#elif defined(CASE_transformer_block)
  const auto weights = blockattn::make_transformer_block_weights<L>(4, 1, 8);
  blockattn::transformer_block(weights, x, y);
#elif defined(CASE_attention_double_over_bf16)
  const Matrix<double> q(4, 4);
  const Matrix<Eigen::bfloat16> kv(4, 4);
  Matrix<double> out(4, 4);
  blockattn::attention(q, kv, kv, out);
#elif defined(CASE_attention_tensor_bf16_over_float)
  Matrix<Eigen::bfloat16> q(4, 4);
  Matrix<float> kv(4, 4);
  const auto q_view = blockattn::make_tensor_view(q.data(), 1, 4, 1, 4);
  const auto kv_view = blockattn::make_tensor_view(kv.data(), 1, 4, 1, 4);
  blockattn::attention(q_view, kv_view, kv_view, q_view);
#elif defined(CASE_attention_out_type)
  const Matrix<float> q(4, 4);
  const Matrix<Eigen::half> kv(4, 4);
  Matrix<Eigen::half> out(4, 4);
  blockattn::attention(q, kv, kv, out);
#elif defined(CASE_column_major)
  const Eigen::MatrixXf q(4, 4);
  Matrix<float> out(4, 4);
  blockattn::attention(q, q, q, out);
#elif defined(CASE_gradients_by_position)
  Matrix<float> dq(4, 4);
  Matrix<float> dk(4, 4);
  Matrix<float> dv(4, 4);
  const blockattn::AttentionGradients<float> grads{dk, dq, dv};  // swapped: must not compile
  static_cast<void>(grads);
#elif defined(CASE_backward_by_position)
  const Matrix<float> q(4, 4);
  Matrix<float> dq(4, 4);
  Matrix<float> dk(4, 4);
  std::vector<float> lse(4);
  blockattn::attention_backward(q, q, q, q, lse, q, dk, dq, dq);
#else
#error "define one CASE_<name>"
#endif
  static_cast<void>(t);
}

}  // namespace
