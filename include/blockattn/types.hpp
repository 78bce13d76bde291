#pragma once
// Matrices, views and the strided 4-D tensor view that every blockattn API takes.
//
// Glossary, used the same way in every kernel (the papers' symbols):
//   n_q, n_k   number of query and key tokens        d, d_v   head dimension of q/k and of v
//   i, j       a query index and a key index           q0, k0   first query / key of a block
//   s          a score, scale·q_i·k_j + modifiers      p        exp(s − m), an unnormalised weight
//   m          running maximum of the scores seen      l        running sum Σ exp(s − m)
//   acc        running output Σ exp(s − m)·v_j         lse      log-sum-exp, m + log(l)

#include <type_traits>

#include <Eigen/Core>

/// Exact attention kernels for the CPU that never form the n×n score matrix.
namespace blockattn {

using Index = Eigen::Index;

/// A row per token, contiguous along the feature dimension (the layout of PyTorch, ggml,
/// FlashAttention).
template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A row vector, used for biases, LayerNorm parameters and single softmax rows.
template <class T>
using RowVector = Eigen::Matrix<T, 1, Eigen::Dynamic>;

/// Read-only view of a row-major matrix with any row stride and unit column stride.
/// Binds without a copy to Matrix<T>, its middleRows()/middleCols() blocks and an Eigen::Map with
/// Eigen::OuterStride<>. Anything else (a column-major matrix, an expression such as 2*q) is
/// silently copied into a temporary by Eigen, which costs an allocation: pass a real row-major
/// buffer.
template <class T>
using ConstMatrixView = Eigen::Ref<const Matrix<T>, 0, Eigen::OuterStride<>>;

/// Writable view of a row-major matrix with any row stride and unit column stride. Only real
/// row-major storage binds to it (there is no silent copy for a mutable Ref).
template <class T>
using MatrixView = Eigen::Ref<Matrix<T>, 0, Eigen::OuterStride<>>;

/// A strided 4-D view [batch, seq, heads, dim] with `dim` contiguous. Strides are in elements, so
/// a BSHD buffer, a BHSD buffer or one slice of a fused QKV buffer are all views without a copy.
/// T may be const-qualified; TensorView<T> converts to TensorView<const T>.
template <class T>
struct TensorView {
  T* data = nullptr;       ///< element [0, 0, 0, 0]
  Index batch = 0;         ///< number of sequences
  Index seq = 0;           ///< tokens per sequence
  Index heads = 0;         ///< number of heads
  Index dim = 0;           ///< features per head, contiguous
  Index batch_stride = 0;  ///< elements between [b, s, h, 0] and [b + 1, s, h, 0]
  Index seq_stride = 0;    ///< elements between [b, s, h, 0] and [b, s + 1, h, 0]
  Index head_stride = 0;   ///< elements between [b, s, h, 0] and [b, s, h + 1, 0]

  TensorView() = default;
  TensorView(T* data_, Index batch_, Index seq_, Index heads_, Index dim_, Index batch_stride_,
             Index seq_stride_, Index head_stride_)
      : data(data_),
        batch(batch_),
        seq(seq_),
        heads(heads_),
        dim(dim_),
        batch_stride(batch_stride_),
        seq_stride(seq_stride_),
        head_stride(head_stride_) {}

  /// The read-only view of a writable one, as std::span<T> converts to std::span<const T>.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  TensorView(const TensorView<U>& other)  // NOLINT(google-explicit-constructor): mirrors std::span
      : TensorView(other.data, other.batch, other.seq, other.heads, other.dim, other.batch_stride,
                   other.seq_stride, other.head_stride) {}

  /// Pointer to element [b, s, h, 0].
  T* at(Index b, Index s, Index h) const {
    return data + b * batch_stride + s * seq_stride + h * head_stride;
  }
};

/// A view of a contiguous [batch, seq, heads, dim] (BSHD) buffer.
template <class T>
TensorView<T> make_tensor_view(T* data, Index batch, Index seq, Index heads, Index dim) {
  return TensorView<T>(data, batch, seq, heads, dim, /*batch_stride=*/seq * heads * dim,
                       /*seq_stride=*/heads * dim, /*head_stride=*/dim);
}

/// A view of a contiguous [batch, heads, seq, dim] (BHSD) buffer, the layout of PyTorch's SDPA.
template <class T>
TensorView<T> make_tensor_view_bhsd(T* data, Index batch, Index seq, Index heads, Index dim) {
  return TensorView<T>(data, batch, seq, heads, dim, /*batch_stride=*/heads * seq * dim,
                       /*seq_stride=*/dim, /*head_stride=*/seq * dim);
}

namespace detail {

template <class T>
inline constexpr bool kIsSupportedScalar =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, long double>;

/// The 2-D [seq, dim] view of one (batch, head) slice of a TensorView; no copy.
template <class T>
Eigen::Map<const Matrix<std::remove_const_t<T>>, 0, Eigen::OuterStride<>> head_slice(
    const TensorView<T>& t, Index b, Index h) {
  return {t.at(b, 0, h), t.seq, t.dim, Eigen::OuterStride<>(t.seq_stride)};
}

/// Writable [seq, dim] view of one (batch, head) slice.
template <class T>
Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>> mutable_head_slice(const TensorView<T>& t, Index b,
                                                                  Index h) {
  static_assert(!std::is_const_v<T>, "blockattn: mutable_head_slice needs a writable view");
  return {t.at(b, 0, h), t.seq, t.dim, Eigen::OuterStride<>(t.seq_stride)};
}

}  // namespace detail
}  // namespace blockattn
