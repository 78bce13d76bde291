#pragma once
// K/V sources: how the forward kernels read keys and values. The kernels never index K or V
// themselves; they ask a source, so that a storage format (bf16, half, int8 with scales, a paged
// cache) is one more source class with the members below, not a new kernel.
//
// The contract. A source family (e.g. StridedKVHeads) is built once per call from the caller's
// K and V and hands out, for one (batch b, kv head h), a source (e.g. StridedKV) with:
//
//   using Element = …;  // what the kernels compute in: float or double
//   using Storage = …;  // what K and V rows hold (Element here; bf16, half, int8 … later)
//   Index d() const;    // K features (q·k dimension)
//   Index d_v() const;  // V columns
//
//   Prefill (detail/prefill_kernel.hpp): once per K/V tile, then shared by every query row of
//   the block, so a conversion is paid once per tile and amortised over the block's rows:
//   void pack_k(Index k0, Index keys, Element* panel) const;
//       keys [k0, k0 + keys) of K into the score kernel's panel layout (pack_k in
//       detail/microkernel.hpp: packed_k_size(keys, d) elements), converted to Element;
//   void pack_v(Index k0, Index keys, Element* panel) const;
//       their values into the P·V kernel's layout (pack_v: packed_v_size(keys, d_v) elements);
//   bool values_finite(Index k0, Index keys) const;
//       whether every value entry of those keys is finite (the NaN slow path's one check,
//       detail/non_finite_values.hpp; ±inf and NaN of any format count as non-finite);
//
//   AVX512_BF16 builds, bf16 StridedKV only (detail/bf16_dot.hpp, prefill_keys_bf16):
//   void pack_k_pairs(Index k0, Index keys, void* panel) const;  // K tile as bf16 feature pairs
//   void pack_v_pairs(Index k0, Index keys, void* panel) const;  // V tile as bf16 key pairs
//
//   Decode (detail/decode_kernel.hpp): few query rows, each K and V row read once, in place:
//   StridedRows<Storage> keys(Index k0) const;    // K rows from key k0 on
//   StridedRows<Storage> values(Index k0) const;  // V rows from key k0 on
//       read by score_rows_direct / accumulate_pv_direct, which for Storage ≠ Element are to
//       load and convert in registers as they stream (no converted copy of the cache);
//   void copy_finite_values(Index k0, Index keys, Element* dst) const;
//       the decode slow path's copy: values of those keys as Element, [keys, d_v] contiguous,
//       every non-finite entry replaced by 0.
//   RowScales key_scales(Index k0) const;    // int8 K: the scales of its rows from k0 on;
//   RowScales value_scales(Index k0) const;  // empty (null) for every other storage
//   static constexpr bool kValuesFinite;
//       true when every value is finite by construction (int8 with validated scales): the
//       kernels then compile out the NaN slow path, and values_finite / copy_finite_values are
//       never called.
//
// Rows past the end of the cache are never asked for: 0 <= k0 and k0 + keys <= n_k.

#include <cstdint>
#include <type_traits>

#include <blockattn/detail/attention_problem.hpp>
#include <blockattn/detail/bf16_dot.hpp>
#include <blockattn/detail/config.hpp>
#include <blockattn/detail/finite.hpp>
#include <blockattn/detail/microkernel.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

/// The K/V source of rows stored in S, computed in E, any row stride (one head of a [seq, heads,
/// dim] or [heads, seq, dim] view, or a single-head matrix). S = E (float, double): packing is a
/// copy into the panel layouts. S = Eigen::bfloat16 or Eigen::half with E = float: packing widens
/// once per tile (exact), and decode reads the 16-bit rows in place, widened in registers by the
/// direct kernels (StorageIo), so a 16-bit cache is never copied. Either way the kernels see the
/// same float values, hence a 16-bit K/V call is bitwise the float call on the widened K/V.
template <class E, class S = E>
class StridedKV {
 public:
  using Element = E;
  using Storage = S;
  static_assert(std::is_same_v<S, E> || (kIs16BitFloat<S> && std::is_same_v<E, float>),
                "blockattn: K/V storage is the compute type, or a 16-bit format computed in float");

  StridedKV(StridedRows<S> k, StridedRows<S> v, Index d, Index d_v)
      : k_(k), v_(v), d_(d), d_v_(d_v) {}

  Index d() const { return d_; }
  Index d_v() const { return d_v_; }

  void pack_k(Index k0, Index keys, E* panel) const {
    detail::pack_k<E>(k_.row(k0), k_.ld, keys, d_, panel);
  }
#if defined(BLOCKATTN_BF16_DOT)
  /// bf16 K only: keys [k0, k0 + keys) as bf16 pairs (pack_k_bf16_pairs, detail/bf16_dot.hpp).
  void pack_k_pairs(Index k0, Index keys, void* panel) const {
    detail::pack_k_bf16_pairs(k_.row(k0), k_.ld, keys, d_, panel);
  }
  /// bf16 V only: values of keys [k0, k0 + keys) as key pairs (pack_v_bf16_pairs).
  void pack_v_pairs(Index k0, Index keys, void* panel) const {
    detail::pack_v_bf16_pairs(v_.row(k0), v_.ld, keys, d_v_, panel);
  }
#endif
  void pack_v(Index k0, Index keys, E* panel) const {
    detail::pack_v<E>(v_.row(k0), v_.ld, keys, d_v_, panel);
  }
  bool values_finite(Index k0, Index keys) const {
    return block_is_finite(v_.row(k0), v_.ld, keys, d_v_);
  }

  StridedRows<S> keys(Index k0) const { return k_.from(k0); }
  StridedRows<S> values(Index k0) const { return v_.from(k0); }
  void copy_finite_values(Index k0, Index keys, E* dst) const {
    copy_finite(v_.row(k0), v_.ld, keys, d_v_, dst, d_v_);
  }
  RowScales key_scales(Index) const { return {}; }
  RowScales value_scales(Index) const { return {}; }
  static constexpr bool kValuesFinite = false;

 private:
  StridedRows<S> k_;
  StridedRows<S> v_;
  Index d_;
  Index d_v_;
};

/// The K/V source of an int8 cache with one float scale per row (per token and kv head), for K
/// and for V: element c of row j is scale[j]·q[j, c], the product rounded once in float. Prefill
/// packs the float products once per tile (pack_k / pack_v with the row scales); decode reads
/// the int8 rows in place, converts and scales each loaded vector in registers (StorageIo<int8_t>,
/// scale_row). Both compute the same float products as a scalar float(q)·scale, so an int8 call
/// is bitwise the float call on the dequantized cache (dequantize_kv). Every value is finite:
/// the entry point rejects non-finite scales and scales whose ·127 overflows.
class QuantizedKVSource {
 public:
  using Element = float;
  using Storage = std::int8_t;
  static constexpr bool kValuesFinite = true;

  QuantizedKVSource(StridedRows<std::int8_t> k, StridedRows<std::int8_t> v, RowScales k_scales,
                    RowScales v_scales, Index d, Index d_v)
      : k_(k), v_(v), k_scales_(k_scales), v_scales_(v_scales), d_(d), d_v_(d_v) {}

  Index d() const { return d_; }
  Index d_v() const { return d_v_; }

  void pack_k(Index k0, Index keys, float* panel) const {
    detail::pack_k<float>(k_.row(k0), k_.ld, keys, d_, panel, k_scales_.from(k0));
  }
  void pack_v(Index k0, Index keys, float* panel) const {
    detail::pack_v<float>(v_.row(k0), v_.ld, keys, d_v_, panel, v_scales_.from(k0));
  }
  bool values_finite(Index, Index) const { return true; }

  StridedRows<std::int8_t> keys(Index k0) const { return k_.from(k0); }
  StridedRows<std::int8_t> values(Index k0) const { return v_.from(k0); }
  RowScales key_scales(Index k0) const { return k_scales_.from(k0); }
  RowScales value_scales(Index k0) const { return v_scales_.from(k0); }

 private:
  StridedRows<std::int8_t> k_;
  StridedRows<std::int8_t> v_;
  RowScales k_scales_;
  RowScales v_scales_;
  Index d_;
  Index d_v_;
};

/// The StridedKV sources of a call's K and V views (storage S, computed in E): head(b, h) is kv
/// head h of batch entry b.
template <class E, class S = E>
class StridedKVHeads {
 public:
  using Source = StridedKV<E, S>;

  StridedKVHeads(const TensorView<const S>& k, const TensorView<const S>& v) : k_(k), v_(v) {}

  Source head(Index b, Index h) const {
    return {{k_.at(b, 0, h), k_.seq_stride}, {v_.at(b, 0, h), v_.seq_stride}, k_.dim, v_.dim};
  }

 private:
  TensorView<const S> k_;
  TensorView<const S> v_;
};

/// The QuantizedKVSource sources of an int8 cache: k, v [B, n_k, H_kv, d] int8 and their scales
/// [B, n_k, H_kv, 1] float (any strides); head(b, h) is kv head h of batch entry b.
class QuantizedKVHeads {
 public:
  using Source = QuantizedKVSource;

  QuantizedKVHeads(const TensorView<const std::int8_t>& k, const TensorView<const std::int8_t>& v,
                   const TensorView<const float>& k_scale, const TensorView<const float>& v_scale)
      : k_(k), v_(v), k_scale_(k_scale), v_scale_(v_scale) {}

  Source head(Index b, Index h) const {
    return {{k_.at(b, 0, h), k_.seq_stride},
            {v_.at(b, 0, h), v_.seq_stride},
            {k_scale_.at(b, 0, h), k_scale_.seq_stride},
            {v_scale_.at(b, 0, h), v_scale_.seq_stride},
            k_.dim,
            v_.dim};
  }

 private:
  TensorView<const std::int8_t> k_;
  TensorView<const std::int8_t> v_;
  TensorView<const float> k_scale_;
  TensorView<const float> v_scale_;
};

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
