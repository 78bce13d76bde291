#pragma once
// Matrices, views and the strided 4-D tensor view that every blockattn API takes.
//
// Glossary, used the same way in every kernel (the papers' symbols):
//   n_q, n_k   number of query and key tokens        d, d_v   head dimension of q/k and of v
//   i, j       a query index and a key index           q0, k0   first query / key of a block
//   s          a score, scale·q_i·k_j + modifiers      p        exp(s − m), an unnormalised weight
//   m          running maximum of the scores seen      l        running sum Σ exp(s − m)
//   acc        running output Σ exp(s − m)·v_j         lse      log-sum-exp, m + log(l)

#include <array>
#include <cstddef>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <blockattn/detail/config.hpp>

/// Exact attention kernels for the CPU that never form the n×n score matrix.
namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {

/// Sizes, counts and indices: Eigen's signed index type (std::ptrdiff_t).
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

namespace detail {

/// Whether E (cv-ref removed) is an Eigen vector expression with direct access and unit inner
/// stride whose scalar is U: a RowVector, a VectorX, a segment of one, a row of a row-major Matrix.
template <class E, class U, class = void>
struct IsContiguousEigenVector : std::false_type {};
template <class E, class U>
struct IsContiguousEigenVector<E, U, std::enable_if_t<std::is_base_of_v<Eigen::DenseBase<E>, E>>>
    : std::bool_constant<E::IsVectorAtCompileTime && (E::Flags & Eigen::DirectAccessBit) != 0 &&
                         E::InnerStrideAtCompileTime == 1 &&
                         std::is_same_v<typename E::Scalar, std::remove_const_t<U>>> {};

}  // namespace detail

/// A sized view of a 1-D array: a pointer and a number of elements, never owning. Every array
/// argument of blockattn (lse, key lengths, ALiBi slopes, merge inputs) is one, so that its length
/// is checked. Binds without a copy to (pointer, size), a std::vector, a std::array, a C array and
/// a contiguous Eigen vector (RowVector, VectorX, a segment or a row of a row-major Matrix);
/// Span<T> converts to Span<const T>. A default-constructed Span is empty, which means "not given"
/// for an optional array.
template <class T>
class Span {
 public:
  using element_type = T;                  ///< T, const-qualified for a read-only view
  using value_type = std::remove_cv_t<T>;  ///< T without const

  /// Empty: no data, size 0.
  constexpr Span() noexcept = default;
  /// `size` elements from `data`.
  constexpr Span(T* data, Index size) noexcept : data_(data), size_(size) {}
  /// The elements of a C array.
  template <std::size_t N>
  constexpr Span(T (&array)[N]) noexcept  // NOLINT(google-explicit-constructor): as std::span
      : data_(array), size_(static_cast<Index>(N)) {}
  /// The elements of a std::vector (Span<const T> also binds to a const one).
  template <class U, class A,
            class = std::enable_if_t<std::is_same_v<U, value_type> && !std::is_const_v<U>>>
  Span(std::vector<U, A>& v) noexcept  // NOLINT(google-explicit-constructor): as std::span
      : data_(v.data()), size_(static_cast<Index>(v.size())) {}
  template <class U, class A,
            class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  /// The elements of a const std::vector (Span<const T> only).
  Span(const std::vector<U, A>& v) noexcept  // NOLINT(google-explicit-constructor)
      : data_(v.data()), size_(static_cast<Index>(v.size())) {}
  /// The elements of a std::array.
  template <class U, std::size_t N,
            class = std::enable_if_t<std::is_same_v<U, value_type> && !std::is_const_v<U>>>
  constexpr Span(std::array<U, N>& a) noexcept  // NOLINT(google-explicit-constructor)
      : data_(a.data()), size_(static_cast<Index>(N)) {}
  template <class U, std::size_t N,
            class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  /// The elements of a const std::array (Span<const T> only).
  constexpr Span(const std::array<U, N>& a) noexcept  // NOLINT(google-explicit-constructor)
      : data_(a.data()), size_(static_cast<Index>(N)) {}
  /// The coefficients of a contiguous Eigen vector (no copy; expressions do not bind).
  template <class E,
            class = std::enable_if_t<
                detail::IsContiguousEigenVector<std::remove_cv_t<std::remove_reference_t<E>>,
                                                T>::value &&
                (std::is_const_v<T> || !std::is_const_v<std::remove_reference_t<E>>)>>
  Span(E&& e) noexcept  // NOLINT(google-explicit-constructor,
                        // bugprone-forwarding-reference-overload)
      : data_(const_cast<T*>(e.data())), size_(e.size()) {}
  /// The read-only view of a writable one.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  constexpr Span(Span<U> other) noexcept  // NOLINT(google-explicit-constructor)
      : data_(other.data()), size_(other.size()) {}

  /// The first element (null for an empty Span). O(1).
  constexpr T* data() const noexcept { return data_; }
  /// The number of elements. O(1).
  constexpr Index size() const noexcept { return size_; }
  /// Whether size() is 0 (an optional array not given). O(1).
  constexpr bool empty() const noexcept { return size_ == 0; }
  /// Element i, unchecked (0 <= i < size()).
  constexpr T& operator[](Index i) const noexcept { return data_[i]; }
  /// The first element, for range-for. O(1).
  constexpr T* begin() const noexcept { return data_; }
  /// One past the last element. O(1).
  constexpr T* end() const noexcept { return data_ + size_; }

 private:
  T* data_ = nullptr;
  Index size_ = 0;
};

/// Span(pointer, size) deduces Span<T> from a T* (const for a const pointer).
template <class T>
Span(T*, Index) -> Span<T>;
/// Span(vector) deduces the vector's element type.
template <class U, class A>
Span(std::vector<U, A>&) -> Span<U>;
/// Span(const vector) deduces a read-only Span.
template <class U, class A>
Span(const std::vector<U, A>&) -> Span<const U>;
/// Span(array) deduces the array's element type.
template <class U, std::size_t N>
Span(std::array<U, N>&) -> Span<U>;
/// Span(const array) deduces a read-only Span.
template <class U, std::size_t N>
Span(const std::array<U, N>&) -> Span<const U>;

/// A default-constructible, assignable view of a row-major matrix with contiguous rows (data,
/// rows, cols, row stride): the named fields of the backward pass's argument structs. Binds
/// without a copy to whatever binds to ConstMatrixView / MatrixView without one (a Matrix, its
/// blocks and rows, a Map with OuterStride<>); anything else is a compile-time error.
/// MatrixRef<T> writes through a non-const T (the caller's object must not be const);
/// MatrixRef<T> converts to MatrixRef<const T>.
template <class T>
class MatrixRef {
 public:
  using Scalar = std::remove_const_t<T>;  ///< the element type without const (as Eigen's)

  /// Empty: 0×0, no data.
  MatrixRef() = default;
  /// A view of `m` (Eigen's const& idiom for writable temporaries such as m.middleRows()).
  template <class D>
  MatrixRef(const Eigen::MatrixBase<D>& m)  // NOLINT(google-explicit-constructor): a view
      : data_(const_cast<T*>(m.derived().data())),
        rows_(m.rows()),
        cols_(m.cols()),
        stride_(m.derived().outerStride()) {
    static_assert(std::is_same_v<typename D::Scalar, Scalar>,
                  "blockattn: every matrix argument must have the same element type");
    static_assert(
        (D::Flags & Eigen::DirectAccessBit) != 0 && (D::Flags & Eigen::RowMajorBit) != 0 &&
            D::InnerStrideAtCompileTime == 1,
        "blockattn: pass row-major storage with contiguous rows (a blockattn::Matrix, a "
        "block or row of one, an Eigen::Map with OuterStride<>); a column-major matrix or "
        "an expression would be copied into a temporary");
    static_assert(std::is_const_v<T> || (D::Flags & Eigen::LvalueBit) != 0,
                  "blockattn: an output must be writable row-major storage (not const, not an "
                  "expression)");
  }
  /// The read-only view of a writable one.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  MatrixRef(const MatrixRef<U>& other)  // NOLINT(google-explicit-constructor)
      : data_(other.data()),
        rows_(other.rows()),
        cols_(other.cols()),
        stride_(other.outerStride()) {}

  /// Element (0, 0). O(1).
  T* data() const { return data_; }
  /// The number of rows. O(1).
  Index rows() const { return rows_; }
  /// The number of columns (contiguous). O(1).
  Index cols() const { return cols_; }
  /// Elements between the starts of two consecutive rows, as Eigen's outerStride(). O(1).
  Index outerStride() const { return stride_; }

 private:
  T* data_ = nullptr;
  Index rows_ = 0;
  Index cols_ = 0;
  Index stride_ = 0;
};

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

  /// Empty: no data, every size and stride 0.
  TensorView() = default;
  /// Every field, in declaration order; no check (the entry points validate). O(1).
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

/// A view of a contiguous [batch, seq, heads, dim] (BSHD) buffer. O(1), no copy.
template <class T>
TensorView<T> make_tensor_view(T* data, Index batch, Index seq, Index heads, Index dim) {
  return TensorView<T>(data, batch, seq, heads, dim, /*batch_stride=*/seq * heads * dim,
                       /*seq_stride=*/heads * dim, /*head_stride=*/dim);
}

/// A view of a contiguous [batch, heads, seq, dim] (BHSD) buffer, the layout of PyTorch's SDPA.
/// O(1), no copy.
template <class T>
TensorView<T> make_tensor_view_bhsd(T* data, Index batch, Index seq, Index heads, Index dim) {
  return TensorView<T>(data, batch, seq, heads, dim, /*batch_stride=*/heads * seq * dim,
                       /*seq_stride=*/dim, /*head_stride=*/seq * dim);
}

namespace detail {

/// Whether an Eigen argument binds to ConstMatrixView / MatrixView without a copy: real storage
/// (direct access), row-major, contiguous rows (unit inner stride). A column-major matrix or an
/// expression (2*q, q.transpose()) is not: Eigen would copy it into a heap temporary.
template <class Derived>
inline constexpr bool kIsRowMajorStorage =
    (Derived::Flags & Eigen::DirectAccessBit) != 0 &&
    (Derived::Flags & Eigen::RowMajorBit) != 0 && Derived::InnerStrideAtCompileTime == 1;

/// Whether an output argument is writable storage of that kind.
template <class Derived>
inline constexpr bool kIsWritableRowMajorStorage = kIsRowMajorStorage<Derived> &&
                                                   (Derived::Flags & Eigen::LvalueBit) != 0;

/// The compile-time checks of a 2-D entry point's Eigen arguments, each one readable
/// static_assert: every argument holds T, and binds without a copy (kIsRowMajorStorage).
template <class T, class... Args>
constexpr void check_matrix_arguments() {
  static_assert((std::is_same_v<typename Args::Scalar, T> && ...),
                "blockattn: every matrix argument must have the same element type");
  static_assert((kIsRowMajorStorage<Args> && ...),
                "blockattn: pass row-major storage with contiguous rows (a blockattn::Matrix, a "
                "block or row of one, an Eigen::Map with OuterStride<>); a column-major matrix or "
                "an expression would be copied into a temporary");
}

/// The compile-time check of a 2-D entry point's outputs: writable row-major storage.
template <class... Outs>
constexpr void check_matrix_outputs() {
  static_assert((kIsWritableRowMajorStorage<Outs> && ...),
                "blockattn: an output must be writable row-major storage (not const, not an "
                "expression)");
}

/// The writable view of an output taken as `const Eigen::MatrixBase<Derived>&`: Eigen's documented
/// idiom ("Writing Functions Taking Eigen Types as Parameters") for outputs that may be
/// temporaries such as out.middleRows(r, n); the caller's object must not be const. No copy.
template <class Derived>
MatrixView<typename Derived::Scalar> writable_view(const Eigen::MatrixBase<Derived>& out) {
  return MatrixView<typename Derived::Scalar>(
      const_cast<Eigen::MatrixBase<Derived>&>(out).derived());
}

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
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
