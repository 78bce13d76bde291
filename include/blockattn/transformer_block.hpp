#pragma once
// transformer_block(): one pre-LayerNorm transformer layer computed blockwise (Liu & Abbeel 2023,
// "Blockwise Parallel Transformer for Large Context Models", Algorithm 1):
//   h = x + Attn(LN1(x)),   y = h + FFN(LN2(h)),   FFN(z) = act(z·w1 + b1)·w2 + b2,
// with Attn the multi-head (optionally grouped-query) attention of attention.hpp. K and V are
// computed once for all tokens; then each query block runs LN1 → Q → attention over the keys →
// output projection + residual → LN2 → FFN (in chunks of the hidden dimension) → residual, so
// neither the n×n scores nor the n×ffn hidden activations ever exist.

#include <algorithm>
#include <cmath>
#include <vector>

#include <Eigen/Core>

#include <blockattn/attention.hpp>
#include <blockattn/detail/check.hpp>
#include <blockattn/detail/parallel.hpp>
#include <blockattn/types.hpp>

namespace blockattn {

/// The FFN's nonlinearity.
enum class Activation {
  GeluErf,   ///< x·Φ(x) = 0.5·x·(1 + erf(x/√2)), exact (PyTorch's default GELU)
  GeluTanh,  ///< 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (GPT-2's approximation)
  Relu,      ///< max(0, x)
};

/// The parameters of one pre-LN transformer layer. Every matrix is applied as x·W, stored
/// [in, out] row-major. model = wq.rows(), head_dim = model / heads, ffn = w1.cols(),
/// kv_dim = kv_heads·head_dim. make_transformer_block_weights() sizes every field.
template <class T>
struct TransformerBlockWeights {
  Index heads = 1;         ///< query heads; must divide model
  Index kv_heads = 0;      ///< key/value heads (GQA); 0: same as heads; must divide heads
  Matrix<T> wq;            ///< [model, model]
  Matrix<T> wk;            ///< [model, kv_dim]
  Matrix<T> wv;            ///< [model, kv_dim]
  Matrix<T> wo;            ///< [model, model]
  RowVector<T> bq;         ///< [model]
  RowVector<T> bk;         ///< [kv_dim]
  RowVector<T> bv;         ///< [kv_dim]
  RowVector<T> bo;         ///< [model]
  Matrix<T> w1;            ///< [model, ffn]
  RowVector<T> b1;         ///< [ffn]
  Matrix<T> w2;            ///< [ffn, model]
  RowVector<T> b2;         ///< [model]
  RowVector<T> ln1_gamma;  ///< [model], LayerNorm before attention
  RowVector<T> ln1_beta;   ///< [model]
  RowVector<T> ln2_gamma;  ///< [model], LayerNorm before the FFN
  RowVector<T> ln2_beta;   ///< [model]
  Activation activation = Activation::GeluErf;  ///< the FFN's nonlinearity
  double ln_eps = 1e-5;                         ///< LayerNorm's ε (> 0), added to the variance

  /// key/value heads after the default: kv_heads, or heads when it is 0.
  Index resolved_kv_heads() const { return kv_heads == 0 ? heads : kv_heads; }
};

/// Weights of the given shape: every matrix and bias zero, LayerNorm gammas one, betas zero.
/// kv_heads 0 means heads. Sizes are not checked here (transformer_block() checks them).
template <class T>
TransformerBlockWeights<T> make_transformer_block_weights(Index model, Index heads, Index ffn,
                                                          Index kv_heads = 0) {
  TransformerBlockWeights<T> w;
  w.heads = heads;
  w.kv_heads = kv_heads;
  const Index kv_dim = heads > 0 ? w.resolved_kv_heads() * (model / heads) : 0;
  w.wq.setZero(model, model);
  w.wk.setZero(model, kv_dim);
  w.wv.setZero(model, kv_dim);
  w.wo.setZero(model, model);
  w.bq.setZero(model);
  w.bk.setZero(kv_dim);
  w.bv.setZero(kv_dim);
  w.bo.setZero(model);
  w.w1.setZero(model, ffn);
  w.b1.setZero(ffn);
  w.w2.setZero(ffn, model);
  w.b2.setZero(model);
  w.ln1_gamma.setOnes(model);
  w.ln1_beta.setZero(model);
  w.ln2_gamma.setOnes(model);
  w.ln2_beta.setZero(model);
  return w;
}

/// How transformer_block() runs. Block sizes change rounding only; threads change nothing.
struct BlockOptions {
  bool causal = false;    ///< token i attends to tokens j <= i only
  Index query_block = 0;  ///< tokens per query block; 0: chosen by the library (128)
  Index key_block = 0;    ///< keys per attention tile; 0: attention()'s default
  Index ffn_chunk = 0;    ///< hidden units per FFN chunk; 0: chosen by the library (512)
  int threads = 0;        ///< query blocks run in parallel; 0: all hardware threads
};

namespace detail {

inline constexpr Index kDefaultQueryBlock = 128;
inline constexpr Index kDefaultFfnChunk = 512;

/// Requires a matrix field to be rows×cols: "wk is 64x32, expected 64x64 (why)".
template <class M>
void require_shape(const char* function, const char* name, const M& m, Index rows, Index cols,
                   const char* why) {
  if (m.rows() != rows || m.cols() != cols) {
    throw_invalid_argument(concat("blockattn::", function, ": ", name, " is ", m.rows(), "x",
                                  m.cols(), ", expected ", rows, "x", cols, " (", why, ")"));
  }
}

/// Requires a vector field to have `size` entries: "b1 has 7 entries, expected 8 (why)".
template <class V>
void require_length(const char* function, const char* name, const V& v, Index size,
                    const char* why) {
  if (v.size() != size) {
    throw_invalid_argument(concat("blockattn::", function, ": ", name, " has ", v.size(),
                                  " entries, expected ", size, " (", why, ")"));
  }
}

/// Checks every weight, x, y and the options of transformer_block() (and of the references)
/// before anything is written. y may be exactly x (same data and row stride); any other overlap
/// of y with x or with a weight is rejected.
template <class T>
void validate_transformer_block(const char* function, const TransformerBlockWeights<T>& w,
                                const ConstMatrixView<T>& x, const MatrixView<T>& y,
                                const BlockOptions& options) {
  const Index model = w.wq.rows();
  require(model > 0, function, "wq has 0 rows (the model dimension must be positive)");
  require(w.heads > 0, function, "heads is ", w.heads, " but must be positive");
  require(model % w.heads == 0, function, "model dimension ", model, " (wq.rows()) is not a ",
          "multiple of heads ", w.heads, " (head_dim = model / heads)");
  require(w.kv_heads >= 0, function, "kv_heads is ", w.kv_heads, " but must be >= 0 (0: heads)");
  const Index kv_heads = w.resolved_kv_heads();
  require(w.heads % kv_heads == 0, function, "heads ", w.heads, " is not a multiple of kv_heads ",
          kv_heads, " (each key/value head serves the same number of query heads)");
  const Index kv_dim = kv_heads * (model / w.heads);
  const Index ffn = w.w1.cols();
  require(ffn > 0, function, "w1 has 0 columns (the FFN hidden dimension must be positive)");
  require_shape(function, "wq", w.wq, model, model, "[model, model]");
  require_shape(function, "wk", w.wk, model, kv_dim, "[model, kv_heads*head_dim]");
  require_shape(function, "wv", w.wv, model, kv_dim, "[model, kv_heads*head_dim]");
  require_shape(function, "wo", w.wo, model, model, "[model, model]");
  require_shape(function, "w1", w.w1, model, ffn, "[model, ffn]");
  require_shape(function, "w2", w.w2, ffn, model, "[ffn, model]");
  require_length(function, "bq", w.bq, model, "model");
  require_length(function, "bk", w.bk, kv_dim, "kv_heads*head_dim");
  require_length(function, "bv", w.bv, kv_dim, "kv_heads*head_dim");
  require_length(function, "bo", w.bo, model, "model");
  require_length(function, "b1", w.b1, ffn, "ffn");
  require_length(function, "b2", w.b2, model, "model");
  require_length(function, "ln1_gamma", w.ln1_gamma, model, "model");
  require_length(function, "ln1_beta", w.ln1_beta, model, "model");
  require_length(function, "ln2_gamma", w.ln2_gamma, model, "model");
  require_length(function, "ln2_beta", w.ln2_beta, model, "model");
  require(std::isfinite(w.ln_eps) && w.ln_eps > 0, function, "ln_eps is ", w.ln_eps,
          " but must be finite and > 0");
  require(w.activation == Activation::GeluErf || w.activation == Activation::GeluTanh ||
              w.activation == Activation::Relu,
          function, "activation is ", static_cast<int>(w.activation), ", not an Activation value");
  require_size(function, "x.cols()", x.cols(), "the model dimension (wq.rows())", model,
               "one feature per model dimension");
  require_size(function, "y.rows()", y.rows(), "x.rows()", x.rows(), "one output row per token");
  require_size(function, "y.cols()", y.cols(), "x.cols()", x.cols(), "y has the model dimension");
  require(options.query_block >= 0, function, "options.query_block is ", options.query_block,
          " but must be >= 0 (0 picks a default)");
  require(options.key_block >= 0, function, "options.key_block is ", options.key_block,
          " but must be >= 0 (0 picks a default)");
  require(options.ffn_chunk >= 0, function, "options.ffn_chunk is ", options.ffn_chunk,
          " but must be >= 0 (0 picks a default)");
  require(options.threads >= 0, function, "options.threads is ", options.threads,
          " but must be >= 0 (0 means all)");
  const AddressRange y_range = address_range(y.data(), y.rows(), y.cols(), y.outerStride());
  const bool in_place =
      y.data() == x.data() && (y.outerStride() == x.outerStride() || y.rows() <= 1);
  if (!in_place) {
    require_disjoint(function, "y", y_range, "x",
                     address_range(x.data(), x.rows(), x.cols(), x.outerStride()));
  }
  const auto check_weight = [&](const char* name, const auto& m) {
    require_disjoint(function, "y", y_range, name,
                     address_range(m.data(), m.rows(), m.cols(), m.cols()));
  };
  check_weight("wq", w.wq);
  check_weight("wk", w.wk);
  check_weight("wv", w.wv);
  check_weight("wo", w.wo);
  check_weight("w1", w.w1);
  check_weight("w2", w.w2);
  check_weight("bq", w.bq);
  check_weight("bk", w.bk);
  check_weight("bv", w.bv);
  check_weight("bo", w.bo);
  check_weight("b1", w.b1);
  check_weight("b2", w.b2);
  check_weight("ln1_gamma", w.ln1_gamma);
  check_weight("ln1_beta", w.ln1_beta);
  check_weight("ln2_gamma", w.ln2_gamma);
  check_weight("ln2_beta", w.ln2_beta);
}

/// out.row(r) = LayerNorm(in.row(r))·gamma + beta for every row: mean and biased variance over
/// the row (two passes), (x − mean)/sqrt(var + eps). No allocation.
template <class T, class In, class Out>
void layer_norm_rows(const In& in, Out& out, const RowVector<T>& gamma, const RowVector<T>& beta,
                     T eps) {
  const auto cols = static_cast<T>(in.cols());
  for (Index r = 0; r < in.rows(); ++r) {
    const T mean = in.row(r).sum() / cols;
    out.row(r) = in.row(r).array() - mean;
    const T var = out.row(r).squaredNorm() / cols;
    const T inv_std = T(1) / std::sqrt(var + eps);
    out.row(r) = (out.row(r).array() * inv_std) * gamma.array() + beta.array();
  }
}

/// One activation value (the formulas of Activation, evaluated in T).
template <class T>
T activate(Activation activation, T x) {
  switch (activation) {
    case Activation::GeluErf:
      return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440084436210484903928L)));
    case Activation::GeluTanh: {
      const T k = T(0.79788456080286535587989211986876373695L);  // √(2/π)
      return T(0.5) * x * (T(1) + std::tanh(k * (x + T(0.044715) * x * x * x)));
    }
    case Activation::Relu:
      return x > T(0) ? x : T(0);
  }
  return x;
}

/// Applies the activation to every element of m in place.
template <class M>
void activate_in_place(Activation activation, M& m) {
  using T = typename M::Scalar;
  for (Index r = 0; r < m.rows(); ++r) {
    for (Index c = 0; c < m.cols(); ++c) m(r, c) = activate<T>(activation, m(r, c));
  }
}

/// One thread's buffers for a query block of up to `rows` tokens; allocated once per call.
template <class T>
struct BlockBuffers {
  Matrix<T> normed;               ///< [rows, model]: LN1(x), later LN2(h)
  Matrix<T> q;                    ///< [rows, model]: the block's queries
  Matrix<T> attn;                 ///< [rows, model]: attention output, heads side by side
  Matrix<T> h;                    ///< [rows, model]: x + attn·wo + bo
  Matrix<T> hidden;               ///< [rows, ffn_chunk]: one chunk of the FFN's hidden layer
  Workspace attention_workspace;  ///< attention()'s tiles, grown by the thread's first block

  BlockBuffers(Index rows, Index model, Index ffn_chunk)
      : normed(rows, model),
        q(rows, model),
        attn(rows, model),
        h(rows, model),
        hidden(rows, ffn_chunk) {}
};

/// The fused layer; arguments are valid.
template <class T>
void transformer_block_forward(const TransformerBlockWeights<T>& w, const ConstMatrixView<T>& x,
                               MatrixView<T>& y, const BlockOptions& options) {
  const Index n = x.rows();
  if (n == 0) return;
  const Index model = w.wq.rows();
  const Index heads = w.heads;
  const Index kv_heads = w.resolved_kv_heads();
  const Index head_dim = model / heads;
  const Index kv_dim = kv_heads * head_dim;
  const Index ffn = w.w1.cols();
  const Index block =
      std::min(n, options.query_block > 0 ? options.query_block : kDefaultQueryBlock);
  const Index ffn_chunk =
      std::min(ffn, options.ffn_chunk > 0 ? options.ffn_chunk : kDefaultFfnChunk);
  const Index blocks = (n + block - 1) / block;
  const T eps = static_cast<T>(w.ln_eps);
  const int threads = resolve_threads(options.threads, blocks);

  // K and V for every token: the only O(n) storage of the layer.
  Matrix<T> k(n, kv_dim);
  Matrix<T> v(n, kv_dim);
  std::vector<BlockBuffers<T>> buffers;
  buffers.reserve(static_cast<std::size_t>(threads));
  for (int t = 0; t < threads; ++t) buffers.emplace_back(block, model, ffn_chunk);

  parallel_for(blocks, threads, [&](Index b, int slot) {
    BlockBuffers<T>& buf = buffers[static_cast<std::size_t>(slot)];
    const Index q0 = b * block;
    const Index rows = std::min(block, n - q0);
    auto normed = buf.normed.topRows(rows);
    layer_norm_rows<T>(x.middleRows(q0, rows), normed, w.ln1_gamma, w.ln1_beta, eps);
    auto k_blk = k.middleRows(q0, rows);
    auto v_blk = v.middleRows(q0, rows);
    k_blk.noalias() = normed * w.wk;
    k_blk.rowwise() += w.bk;
    v_blk.noalias() = normed * w.wv;
    v_blk.rowwise() += w.bv;
  });

  AttentionOptions attention_options;
  attention_options.key_chunk = options.key_block;
  attention_options.threads = 1;  // one block per thread: bit-identical for any thread count

  // Causal blocks later in the sequence see more keys: hand them out first for load balance.
  parallel_for(blocks, threads, [&](Index task, int slot) {
    BlockBuffers<T>& buf = buffers[static_cast<std::size_t>(slot)];
    const Index b = options.causal ? blocks - 1 - task : task;
    const Index q0 = b * block;
    const Index rows = std::min(block, n - q0);
    const auto x_blk = x.middleRows(q0, rows);
    auto normed = buf.normed.topRows(rows);
    auto q = buf.q.topRows(rows);
    auto attn = buf.attn.topRows(rows);
    auto h = buf.h.topRows(rows);

    layer_norm_rows<T>(x_blk, normed, w.ln1_gamma, w.ln1_beta, eps);
    q.noalias() = normed * w.wq;
    q.rowwise() += w.bq;

    // Causal: keys [0, q0 + rows) with the bottom-right-aligned mask give exactly j <= i.
    const Index n_keys = options.causal ? q0 + rows : n;
    AttentionOptions block_options = attention_options;
    block_options.causal = options.causal;
    block_options.query_chunk = rows;
    block_options.workspace = &buf.attention_workspace;
    attention(TensorView<const T>(q.data(), 1, rows, heads, head_dim, 0, model, head_dim),
              TensorView<const T>(k.data(), 1, n_keys, kv_heads, head_dim, 0, kv_dim, head_dim),
              TensorView<const T>(v.data(), 1, n_keys, kv_heads, head_dim, 0, kv_dim, head_dim),
              TensorView<T>(attn.data(), 1, rows, heads, head_dim, 0, model, head_dim),
              block_options);

    h.noalias() = attn * w.wo;
    h += x_blk;
    h.rowwise() += w.bo;
    layer_norm_rows<T>(h, normed, w.ln2_gamma, w.ln2_beta, eps);

    // x's rows of this block are not read again (K and V are done), so y may be x.
    auto y_blk = y.middleRows(q0, rows);
    y_blk = h;
    y_blk.rowwise() += w.b2;
    for (Index c0 = 0; c0 < ffn; c0 += ffn_chunk) {
      const Index width = std::min(ffn_chunk, ffn - c0);
      auto hidden = buf.hidden.topLeftCorner(rows, width);
      hidden.noalias() = normed * w.w1.middleCols(c0, width);
      hidden.rowwise() += w.b1.segment(c0, width);
      activate_in_place(w.activation, hidden);
      y_blk.noalias() += hidden * w.w2.middleRows(c0, width);
    }
  });
}

}  // namespace detail

/// One pre-LN transformer layer, fused blockwise (BPT): y = h + FFN(LN2(h)), h = x + Attn(LN1(x)),
/// Attn(z) = concat_heads(softmax(Q_h·K_hᵀ/√head_dim [causal]) V_h)·wo + bo with Q = z·wq + bq,
/// K = z·wk + bk, V = z·wv + bv (query head h reads key/value head h / (heads / kv_heads)),
/// FFN(z) = act(z·w1 + b1)·w2 + b2, LN(z) = (z − mean)/sqrt(var + ln_eps)·gamma + beta per token
/// (biased variance). K and V are computed once; each query block then runs the whole layer
/// (attention through blockattn::attention, the FFN in ffn_chunk-wide slices of the hidden layer).
/// Shapes: x, y [n, model]; weights as documented on TransformerBlockWeights.
/// Time O(n·model·(model + kv_dim + ffn) + n·n_keys·model) (half the attention term when causal).
/// Extra memory: K and V, 2·n·kv_dim elements, plus O(threads·query_block·(4·model + ffn_chunk))
/// buffers and attention()'s O(query_block·(key_block + head_dim)) per block — never O(n²),
/// never O(n·ffn).
/// Throws std::invalid_argument naming the field or argument and the sizes ("wk is 64x32,
/// expected 64x64"), before writing anything.
/// y may be exactly x (in place: same data and row stride); any other overlap of y with x or a
/// weight is rejected. Bitwise identical for any thread count; block sizes change rounding only.
/// Element types: float or double (T of the weights; x and y must match, as row-major storage);
/// long double: use reference::transformer_block.
template <class T, class X, class Y>
void transformer_block(const TransformerBlockWeights<T>& weights, const Eigen::MatrixBase<X>& x,
                       const Eigen::MatrixBase<Y>& y, const BlockOptions& options = {}) {
  static_assert(detail::kKernelScalar<T>, BLOCKATTN_KERNEL_SCALAR_MESSAGE);
  detail::check_matrix_arguments<T, X, Y>();
  detail::check_matrix_outputs<Y>();
  const ConstMatrixView<T> x_view(x.derived());
  MatrixView<T> y_view = detail::writable_view(y);
  detail::validate_transformer_block<T>("transformer_block", weights, x_view, y_view, options);
  detail::transformer_block_forward<T>(weights, x_view, y_view, options);
}

}  // namespace blockattn
