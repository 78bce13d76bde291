#pragma once
// transformer_block(): one pre-LayerNorm transformer layer computed blockwise (Liu & Abbeel 2023,
// "Blockwise Parallel Transformer for Large Context Models", Algorithm 1):
//   h = x + Attn(LN1(x)),   y = h + FFN(LN2(h)),   FFN(z) = act(z·w1 + b1)·w2 + b2,
// with Attn the multi-head (optionally grouped-query) attention of attention.hpp. K and V are
// computed once for all tokens; then each query block runs LN1 → Q → attention over the keys →
// output projection + residual → LN2 → FFN (in chunks of the hidden dimension) → residual, so
// neither the n×n scores nor the n×ffn hidden activations ever exist.
//
// Element types: float, double, Eigen::bfloat16, Eigen::half (weights, x and y of one type). A
// 16-bit layer computes in float: its weights are widened once per call (exactly) into the
// workspace, each block's x rows as the block starts, and every intermediate (LayerNorm, Q, K, V,
// attention, the FFN's hidden layer, the residuals) is float; y is rounded once per element.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include <Eigen/Core>

#include <blockattn/attention.hpp>
#include <blockattn/detail/attention_plan.hpp>
#include <blockattn/detail/check.hpp>
#include <blockattn/detail/convert.hpp>
#include <blockattn/detail/parallel.hpp>
#include <blockattn/detail/workspace.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {

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

  /// key/value heads after the default: kv_heads, or heads when it is 0. O(1).
  Index resolved_kv_heads() const { return kv_heads == 0 ? heads : kv_heads; }
};

/// Weights of the given shape: every matrix and bias zero, LayerNorm gammas one, betas zero.
/// kv_heads 0 means heads. Sizes are not checked here (transformer_block() checks them).
/// Allocates the weights: O(model·(model + kv_dim + ffn)) elements.
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

namespace detail {
struct TransformerBlockWorkspaceAccess;
}  // namespace detail

/// Reusable memory for transformer_block(): K and V of every token, and per thread its block
/// buffers and its attention() workspace. Pass the same object to repeated calls
/// (BlockOptions::workspace) and only the first call, or one that needs more, allocates: every
/// part is sized before the parallel loops, grows to fit and never shrinks (release() frees it).
/// Its size is 2·n·kv_dim elements plus O(threads·query_block·(4·model + ffn_chunk + key_block
/// + head_dim)), in the compute type (float for 16-bit storage); 16-bit storage adds the weights
/// widened to float and one more [query_block, model] buffer per thread. Not thread-safe: one per
/// concurrent call. Move-only.
class TransformerBlockWorkspace {
 public:
  /// Empty: the first call allocates.
  TransformerBlockWorkspace() = default;
  /// Takes the other's memory; the other is left empty. O(1), no allocation.
  TransformerBlockWorkspace(TransformerBlockWorkspace&&) noexcept = default;
  /// Takes the other's memory, freeing this one's. O(1), no allocation.
  TransformerBlockWorkspace& operator=(TransformerBlockWorkspace&&) noexcept = default;
  TransformerBlockWorkspace(const TransformerBlockWorkspace&) = delete;
  TransformerBlockWorkspace& operator=(const TransformerBlockWorkspace&) = delete;

  /// Bytes currently held by every part (0 before the first call). O(threads).
  std::size_t capacity() const {
    std::size_t bytes = kv_.capacity() + weights_.capacity();
    for (const Workspace& w : buffers_) bytes += w.capacity();
    for (const Workspace& w : attention_) bytes += w.capacity();
    return bytes;
  }

  /// Thread slots prepared so far (0 before the first call). O(1).
  std::size_t slots() const { return buffers_.size(); }

  /// Frees the memory; the next call allocates again.
  void release() {
    kv_.release();
    weights_.release();
    buffers_.clear();
    buffers_.shrink_to_fit();
    attention_.clear();
    attention_.shrink_to_fit();
  }

 private:
  friend struct detail::TransformerBlockWorkspaceAccess;
  Workspace kv_;                      ///< K and V, [n, kv_dim] each
  Workspace weights_;                 ///< 16-bit storage: the weights widened to float
  std::vector<Workspace> buffers_;    ///< per thread slot: its BlockBuffers
  std::vector<Workspace> attention_;  ///< per thread slot: attention()'s workspace
};

/// How transformer_block() runs. Block sizes change rounding only; threads change nothing.
struct BlockOptions {
  bool causal = false;    ///< token i attends to tokens j <= i only
  Index query_block = 0;  ///< tokens per query block; 0: chosen by the library (128)
  Index key_block = 0;    ///< keys per attention tile; 0: attention()'s default
  Index ffn_chunk = 0;    ///< hidden units per FFN chunk; 0: chosen by the library (512)
  int threads = 0;        ///< query blocks run in parallel; 0: all hardware threads
  /// The caller's reusable memory for the call (K, V, per-thread buffers and attention
  /// workspaces), grown to fit before the loops; then a second call of the same shapes and
  /// threads allocates nothing. nullptr: the call allocates its own. Results are the same bits
  /// either way.
  TransformerBlockWorkspace* workspace = nullptr;
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
template <class T, class In, class Out, class Gamma, class Beta>
void layer_norm_rows(const In& in, Out& out, const Gamma& gamma, const Beta& beta, T eps) {
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

/// One thread's buffers for a query block of up to `rows` tokens, carved out of one Workspace
/// (each part starts on a cache line).
template <class T>
struct BlockBuffers {
  using Buffer = Eigen::Map<Matrix<T>>;
  Buffer normed;  ///< [rows, model]: LN1(x), later LN2(h)
  Buffer q;       ///< [rows, model]: the block's queries
  Buffer attn;    ///< [rows, model]: attention output, heads side by side
  Buffer h;       ///< [rows, model]: x + attn·wo + bo
  Buffer hidden;  ///< [rows, ffn_chunk]: one chunk of the FFN's hidden layer
  Buffer wide;    ///< [rows, model] with `widen` (16-bit storage), else empty: x widened, then y

  /// Elements of T that the buffers take (cache-line padded).
  static Index size(Index rows, Index model, Index ffn_chunk, bool widen) {
    return (widen ? 5 : 4) * SliceLayout<T>::padded(rows * model) +
           SliceLayout<T>::padded(rows * ffn_chunk);
  }

  /// The buffers over `base` (size() elements, 64-byte aligned).
  BlockBuffers(T* base, Index rows, Index model, Index ffn_chunk, bool widen)
      : normed(base, rows, model),
        q(base + SliceLayout<T>::padded(rows * model), rows, model),
        attn(base + 2 * SliceLayout<T>::padded(rows * model), rows, model),
        h(base + 3 * SliceLayout<T>::padded(rows * model), rows, model),
        hidden(base + 4 * SliceLayout<T>::padded(rows * model), rows, ffn_chunk),
        wide(base + 4 * SliceLayout<T>::padded(rows * model) +
                 SliceLayout<T>::padded(rows * ffn_chunk),
             widen ? rows : 0, model) {}
};

/// The weights of a 16-bit layer widened (exactly) to float: the fields of
/// TransformerBlockWeights as maps over a float copy, so the layer's code reads either.
template <class T>
struct WidenedBlockWeights {
  using M = Eigen::Map<const Matrix<T>>;
  using R = Eigen::Map<const RowVector<T>>;
  Index heads;                                 ///< as TransformerBlockWeights::heads
  Index kv_heads;                              ///< as TransformerBlockWeights::kv_heads
  M wq, wk, wv, wo;                            ///< the projections
  R bq, bk, bv, bo;                            ///< their biases
  M w1;                                        ///< [model, ffn]
  R b1;                                        ///< [ffn]
  M w2;                                        ///< [ffn, model]
  R b2;                                        ///< [model]
  R ln1_gamma, ln1_beta, ln2_gamma, ln2_beta;  ///< the LayerNorms
  Activation activation;                       ///< the FFN's nonlinearity
  double ln_eps;                               ///< LayerNorm's ε

  /// As TransformerBlockWeights::resolved_kv_heads. O(1).
  Index resolved_kv_heads() const { return kv_heads == 0 ? heads : kv_heads; }
};

/// Widens every weight of `w` into `memory` (grown to fit: the weights' element count in
/// accumulator_t<S>, each field on its own cache line) and returns the maps over the copy.
/// O(weights) time.
template <class S>
WidenedBlockWeights<accumulator_t<S>> widen_weights(const TransformerBlockWeights<S>& w,
                                                    Workspace& memory) {
  using T = accumulator_t<S>;
  const auto padded = [](const auto& m) { return SliceLayout<T>::padded(m.size()); };
  const Index total = padded(w.wq) + padded(w.wk) + padded(w.wv) + padded(w.wo) + padded(w.bq) +
                      padded(w.bk) + padded(w.bv) + padded(w.bo) + padded(w.w1) + padded(w.b1) +
                      padded(w.w2) + padded(w.b2) + padded(w.ln1_gamma) + padded(w.ln1_beta) +
                      padded(w.ln2_gamma) + padded(w.ln2_beta);
  T* next = static_cast<T*>(memory.reserve(static_cast<std::size_t>(total) * sizeof(T)));
  // Each call takes the next field: widened into `next`, which then moves past it.
  const auto matrix = [&](const Matrix<S>& m) {
    widen(m.data(), m.size(), next);
    const typename WidenedBlockWeights<T>::M view(next, m.rows(), m.cols());
    next += padded(m);
    return view;
  };
  const auto vector = [&](const RowVector<S>& v) {
    widen(v.data(), v.size(), next);
    const typename WidenedBlockWeights<T>::R view(next, v.size());
    next += padded(v);
    return view;
  };
  // Braced initialisation runs left to right, so the fields take the buffer in order.
  return WidenedBlockWeights<T>{w.heads,
                                w.kv_heads,
                                matrix(w.wq),
                                matrix(w.wk),
                                matrix(w.wv),
                                matrix(w.wo),
                                vector(w.bq),
                                vector(w.bk),
                                vector(w.bv),
                                vector(w.bo),
                                matrix(w.w1),
                                vector(w.b1),
                                matrix(w.w2),
                                vector(w.b2),
                                vector(w.ln1_gamma),
                                vector(w.ln1_beta),
                                vector(w.ln2_gamma),
                                vector(w.ln2_beta),
                                w.activation,
                                w.ln_eps};
}

/// transformer_block()'s access to a TransformerBlockWorkspace: grows every part to a call's
/// needs, before the parallel loops.
struct TransformerBlockWorkspaceAccess {
  /// K and V, [n, kv_dim] each: K at the returned pointer, V at kv_offset(n, kv_dim) after it.
  template <class T>
  static T* reserve_kv(TransformerBlockWorkspace& w, Index n, Index kv_dim) {
    return static_cast<T*>(
        w.kv_.reserve(static_cast<std::size_t>(2 * kv_offset<T>(n, kv_dim)) * sizeof(T)));
  }
  template <class T>
  static Index kv_offset(Index n, Index kv_dim) {
    return SliceLayout<T>::padded(n * kv_dim);
  }
  /// At least `slots` thread slots.
  static void reserve_slots(TransformerBlockWorkspace& w, int slots) {
    const auto count = static_cast<std::size_t>(slots);
    if (w.buffers_.size() < count) w.buffers_.resize(count);
    if (w.attention_.size() < count) w.attention_.resize(count);
  }
  static Workspace& buffers(TransformerBlockWorkspace& w, int slot) {
    return w.buffers_[static_cast<std::size_t>(slot)];
  }
  static Workspace& attention(TransformerBlockWorkspace& w, int slot) {
    return w.attention_[static_cast<std::size_t>(slot)];
  }
  /// The widened weights of a 16-bit layer.
  static Workspace& weights(TransformerBlockWorkspace& w) { return w.weights_; }
};

/// The FFN of one block of rows: y = h + b2 + act(normed·w1 + b1)·w2, the hidden layer in
/// ffn_chunk-wide slices of `hidden` [>= rows, >= ffn_chunk]. h is read (into y) before anything
/// else is written, so y may be h's own source rows; y aliases neither normed nor hidden.
/// `w`: TransformerBlockWeights<T> or WidenedBlockWeights<T>.
template <class T, class W, class Normed, class H, class Y, class Hidden>
void ffn_rows(const W& w, const Normed& normed, const H& h, Y& y, Hidden& hidden, Index ffn_chunk) {
  const Index rows = normed.rows();
  const Index ffn = w.w1.cols();
  y = h;
  y.rowwise() += w.b2;
  for (Index c0 = 0; c0 < ffn; c0 += ffn_chunk) {
    const Index width = std::min(ffn_chunk, ffn - c0);
    auto hid = hidden.topLeftCorner(rows, width);
    hid.noalias() = normed * w.w1.middleCols(c0, width);
    hid.rowwise() += w.b1.segment(c0, width);
    activate_in_place(w.activation, hid);
    y.noalias() += hid * w.w2.middleRows(c0, width);
  }
}

/// The fused layer on x, y stored in S, computed in T = accumulator_t<S> with the weights `w`
/// (TransformerBlockWeights<T>, or WidenedBlockWeights<T> for 16-bit S), in `memory`; arguments
/// are valid.
template <class S, class W>
void transformer_block_layer(const W& w, const ConstMatrixView<S>& x, MatrixView<S>& y,
                             const BlockOptions& options, TransformerBlockWorkspace& memory) {
  using T = accumulator_t<S>;
  constexpr bool kWiden = !std::is_same_v<S, T>;
  const Index n = x.rows();
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

  using Access = TransformerBlockWorkspaceAccess;
  Access::reserve_slots(memory, threads);
  // K and V for every token: the only O(n) storage of the layer.
  T* const kv = Access::reserve_kv<T>(memory, n, kv_dim);
  Eigen::Map<Matrix<T>> k(kv, n, kv_dim);
  Eigen::Map<Matrix<T>> v(kv + Access::kv_offset<T>(n, kv_dim), n, kv_dim);
  const auto buffer_bytes =
      static_cast<std::size_t>(BlockBuffers<T>::size(block, model, ffn_chunk, kWiden)) * sizeof(T);
  for (int t = 0; t < threads; ++t) {
    static_cast<void>(Access::buffers(memory, t).reserve(buffer_bytes));
  }
  // Slot `slot`'s buffers (its Workspace fits them already: nothing allocates).
  const auto slot_buffers = [&](int slot) {
    return BlockBuffers<T>(static_cast<T*>(Access::buffers(memory, slot).reserve(buffer_bytes)),
                           block, model, ffn_chunk, kWiden);
  };
  // Rows [q0, q0 + rows) of x as T: x's own rows, or widened into the slot's `wide` buffer.
  const auto x_rows = [&](BlockBuffers<T>& buf, Index q0, Index rows) {
    using Rows = Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>;
    if constexpr (kWiden) {
      for (Index r = 0; r < rows; ++r) widen(x.row(q0 + r).data(), model, buf.wide.row(r).data());
      return Rows(buf.wide.data(), rows, model, Eigen::OuterStride<>(model));
    } else {
      return Rows(x.row(q0).data(), rows, model, Eigen::OuterStride<>(x.outerStride()));
    }
  };

  AttentionOptions attention_options;
  attention_options.key_chunk = options.key_block;
  attention_options.threads = 1;  // one block per thread: bit-identical for any thread count
  attention_options.causal = options.causal;
  const auto block_attention = [&](Index b, T* q, T* attn, int slot) {
    const Index q0 = b * block;
    const Index rows = std::min(block, n - q0);
    // Causal: keys [0, q0 + rows) with the bottom-right-aligned mask give exactly j <= i.
    const Index n_keys = options.causal ? q0 + rows : n;
    struct Call {
      TensorView<const T> q, k, v;
      TensorView<T> out;
      AttentionOptions options;
    };
    Call call{TensorView<const T>(q, 1, rows, heads, head_dim, 0, model, head_dim),
              TensorView<const T>(k.data(), 1, n_keys, kv_heads, head_dim, 0, kv_dim, head_dim),
              TensorView<const T>(v.data(), 1, n_keys, kv_heads, head_dim, 0, kv_dim, head_dim),
              TensorView<T>(attn, 1, rows, heads, head_dim, 0, model, head_dim), attention_options};
    call.options.query_chunk = rows;
    call.options.workspace = &Access::attention(memory, slot);
    return call;
  };
  // Each slot's attention workspace fits the largest block's plan, so no block grows it.
  std::size_t attention_bytes = 0;
  for (Index b = 0; b < blocks; ++b) {
    BlockBuffers<T> buf = slot_buffers(0);
    const auto call = block_attention(b, buf.q.data(), buf.attn.data(), 0);
    const AttentionPlan plan = plan_attention<T>(shapes_of(call.q, call.k, call.v), call.options);
    attention_bytes = std::max(
        attention_bytes,
        AttentionWorkspace<T>::bytes(1, plan.task_shape(), plan.segments > 1 ? plan.tasks : 0));
  }
  for (int t = 0; t < threads; ++t) {
    static_cast<void>(Access::attention(memory, t).reserve(attention_bytes));
  }

  parallel_for(blocks, threads, [&](Index b, int slot) {
    BlockBuffers<T> buf = slot_buffers(slot);
    const Index q0 = b * block;
    const Index rows = std::min(block, n - q0);
    auto normed = buf.normed.topRows(rows);
    layer_norm_rows<T>(x_rows(buf, q0, rows), normed, w.ln1_gamma, w.ln1_beta, eps);
    auto k_blk = k.middleRows(q0, rows);
    auto v_blk = v.middleRows(q0, rows);
    k_blk.noalias() = normed * w.wk;
    k_blk.rowwise() += w.bk;
    v_blk.noalias() = normed * w.wv;
    v_blk.rowwise() += w.bv;
  });

  // Causal blocks later in the sequence see more keys: hand them out first for load balance.
  parallel_for(blocks, threads, [&](Index task, int slot) {
    BlockBuffers<T> buf = slot_buffers(slot);
    const Index b = options.causal ? blocks - 1 - task : task;
    const Index q0 = b * block;
    const Index rows = std::min(block, n - q0);
    const auto x_blk = x_rows(buf, q0, rows);
    auto normed = buf.normed.topRows(rows);
    auto q = buf.q.topRows(rows);
    auto attn = buf.attn.topRows(rows);
    auto h = buf.h.topRows(rows);

    layer_norm_rows<T>(x_blk, normed, w.ln1_gamma, w.ln1_beta, eps);
    q.noalias() = normed * w.wq;
    q.rowwise() += w.bq;

    const auto call = block_attention(b, buf.q.data(), buf.attn.data(), slot);
    attention(call.q, call.k, call.v, call.out, call.options);

    h.noalias() = attn * w.wo;
    h += x_blk;
    h.rowwise() += w.bo;
    layer_norm_rows<T>(h, normed, w.ln2_gamma, w.ln2_beta, eps);

    // x's rows of this block are not read again (K and V are done), so y may be x.
    auto y_blk = y.middleRows(q0, rows);
    if constexpr (kWiden) {
      // y in float in `wide` (x's widened rows are read already), then rounded once.
      auto y_wide = buf.wide.topRows(rows);
      ffn_rows<T>(w, normed, h, y_wide, buf.hidden, ffn_chunk);
      for (Index r = 0; r < rows; ++r) narrow(y_wide.row(r).data(), model, y_blk.row(r).data());
    } else {
      ffn_rows<T>(w, normed, h, y_blk, buf.hidden, ffn_chunk);
    }
  });
}

/// The fused layer; arguments are valid. Every buffer of the call, sized before the loops: the
/// caller's workspace or one of our own; 16-bit weights widened into it first.
template <class S>
void transformer_block_forward(const TransformerBlockWeights<S>& w, const ConstMatrixView<S>& x,
                               MatrixView<S>& y, const BlockOptions& options) {
  if (x.rows() == 0) return;
  TransformerBlockWorkspace own;
  TransformerBlockWorkspace& memory = options.workspace != nullptr ? *options.workspace : own;
  if constexpr (kIs16BitFloat<S>) {
    const auto wide = widen_weights(w, TransformerBlockWorkspaceAccess::weights(memory));
    transformer_block_layer<S>(wide, x, y, options, memory);
  } else {
    transformer_block_layer<S>(w, x, y, options, memory);
  }
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
/// buffers and attention()'s O(query_block·(key_block + head_dim)) per thread — never O(n²),
/// never O(n·ffn); all of it sized before the loops, taken from options.workspace when given
/// (then a second call of the same shapes and threads allocates nothing). 16-bit storage: those
/// buffers in float, plus the weights widened to float and one more [query_block, model] buffer
/// per thread.
/// Throws std::invalid_argument naming the field or argument and the sizes ("wk is 64x32,
/// expected 64x64"), before writing anything.
/// y may be exactly x (in place: same data and row stride); any other overlap of y with x or a
/// weight is rejected. Bitwise identical for any thread count; block sizes change rounding only.
/// Element types: float, double, Eigen::bfloat16 or Eigen::half (T of the weights; x and y must
/// match, as row-major storage). 16-bit storage computes in float throughout (weights and x
/// widened exactly) and rounds y once; long double: use reference::transformer_block.
template <class T, class X, class Y>
void transformer_block(const TransformerBlockWeights<T>& weights, const Eigen::MatrixBase<X>& x,
                       const Eigen::MatrixBase<Y>& y, const BlockOptions& options = {}) {
  static_assert(detail::kStorageScalar<T>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
  detail::check_matrix_arguments<T, X, Y>();
  detail::check_matrix_outputs<Y>();
  const ConstMatrixView<T> x_view(x.derived());
  MatrixView<T> y_view = detail::writable_view(y);
  detail::validate_transformer_block<T>("transformer_block", weights, x_view, y_view, options);
  detail::transformer_block_forward<T>(weights, x_view, y_view, options);
}

}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
