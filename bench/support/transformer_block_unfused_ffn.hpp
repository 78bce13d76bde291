#pragma once
// A benchmark baseline, not library API: the middle variant of the BPT paper's memory comparison
// (memory-efficient attention, then an unfused FFN over all tokens). transformer_block_bench
// compares it with the fused transformer_block() and the naive reference; transformer_block_test
// checks it.

#include <Eigen/Core>

#include <blockattn/attention.hpp>
#include <blockattn/transformer_block.hpp>
#include <blockattn/types.hpp>

namespace blockattn::bench {

/// The middle variant of the BPT paper's memory comparison: memory-efficient attention
/// (blockattn::attention over full Q, K, V, options.query_block / key_block as its chunks,
/// options.threads threads) followed by an unfused FFN over all tokens at once. Each buffer is
/// freed when no longer needed and the activation is applied in place, so the peak is the FFN's:
/// h, LN2(h) and the n×ffn hidden layer, O(n·(2·model + ffn)). Same results as
/// transformer_block() up to rounding; same shapes, errors and aliasing rules.
template <class T, class X, class Y>
void transformer_block_unfused_ffn(const TransformerBlockWeights<T>& w,
                                   const Eigen::MatrixBase<X>& x_, const Eigen::MatrixBase<Y>& y_,
                                   const BlockOptions& options = {}) {
  const ConstMatrixView<T> x(x_.derived());
  MatrixView<T> y = blockattn::detail::writable_view(y_);
  blockattn::detail::validate_transformer_block<T>("bench::transformer_block_unfused_ffn", w, x, y,
                                                   options);
  const Index n = x.rows();
  if (n == 0) return;
  const Index model = w.wq.rows();
  const Index heads = w.heads;
  const Index kv_heads = w.resolved_kv_heads();
  const Index head_dim = model / heads;
  const Index kv_dim = kv_heads * head_dim;
  const T eps = static_cast<T>(w.ln_eps);

  Matrix<T> h(n, model);
  {
    Matrix<T> q(n, model);
    Matrix<T> k(n, kv_dim);
    Matrix<T> v(n, kv_dim);
    {
      Matrix<T> ln1(n, model);
      blockattn::detail::layer_norm_rows<T>(x, ln1, w.ln1_gamma, w.ln1_beta, eps);
      q.noalias() = ln1 * w.wq;
      q.rowwise() += w.bq;
      k.noalias() = ln1 * w.wk;
      k.rowwise() += w.bk;
      v.noalias() = ln1 * w.wv;
      v.rowwise() += w.bv;
    }
    Matrix<T> attn(n, model);
    AttentionOptions attention_options;
    attention_options.causal = options.causal;
    attention_options.query_chunk = options.query_block;
    attention_options.key_chunk = options.key_block;
    attention_options.threads = options.threads;
    blockattn::attention(make_tensor_view<const T>(q.data(), 1, n, heads, head_dim),
                         make_tensor_view<const T>(k.data(), 1, n, kv_heads, head_dim),
                         make_tensor_view<const T>(v.data(), 1, n, kv_heads, head_dim),
                         make_tensor_view<T>(attn.data(), 1, n, heads, head_dim),
                         attention_options);
    h.noalias() = attn * w.wo;
    h += x;
    h.rowwise() += w.bo;
  }
  Matrix<T> hidden(n, w.w1.cols());
  {
    Matrix<T> ln2(n, model);
    blockattn::detail::layer_norm_rows<T>(h, ln2, w.ln2_gamma, w.ln2_beta, eps);
    hidden.noalias() = ln2 * w.w1;
  }
  hidden.rowwise() += w.b1;
  blockattn::detail::activate_in_place(w.activation, hidden);
  y = h;
  y.rowwise() += w.b2;
  y.noalias() += hidden * w.w2;
}

}  // namespace blockattn::bench
