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
//   Index key_block() const;  // optional (int8 keys per channel only, kChannelKeys): keys
//       share per-channel scales and zero points in blocks of key_block() tokens from key 0, and
//   void block_queries(Index k0, const Element* q, Index rows, Element* qs, Element* bias) const;
//       for the block of key k0, qs[r, c] = q[r, c]·scale[c] ([rows, d], q's rows d apart) and
//       bias[r] = Σ_c qs[r, c]·zero[c]: a score is then qs·k8 − bias over the raw int8 row
//       (decode_chunk_channel_keys), whose keys(k0) carry no row scales.
//
//   void dequantize_keys(Index k0, Index keys, float* dst) const;    // optional (int4 caches
//   void dequantize_values(Index k0, Index keys, float* dst) const;  // only, kDequantizesRows):
//       keys [k0, k0 + keys) as float rows d apart, their values as rows d_v apart: the floats
//       pack_k / pack_v put in the panels. Decode then converts a short run of rows at a time
//       into a buffer that stays in L1 and runs the float kernels on it (decode_chunk_dequantized),
//       because a 4-bit row has no vector load of its own; Storage is then float (what the
//       kernels read) and keys(k0) / values(k0) are not members.
//
//   Index contiguous_keys(Index k0) const;  // optional (paged caches only, kSplitsRows):
//       how many rows from k0 on keys(k0) / values(k0) reach: rows of one page share one stride,
//       the next page is elsewhere. Decode then splits each chunk's reads at page boundaries
//       (decode_chunk_split_rows); a source without it has every row of the cache on one stride.
//   void for_each_page_run(Index k0, Index keys, F f) const;  // with contiguous_keys: f(j, run)
//       for each run of keys [k0, k0 + keys) on one stride, in key order;
//   const Storage* value_row(Index j) const;  // with contiguous_keys: V row j, for the NaN slow
//       path, which needs a chunk's rows across page boundaries.
//
// The per-channel key sources (ChannelQuantizedKVSource, Int4KVSource) are templated on their
// rows: StridedRows for a contiguous cache, PagedRows for a paged pool (paged_kv.hpp), the same
// code reading rows from other addresses.
//
// Rows past the end of the cache are never asked for: 0 <= k0 and k0 + keys <= n_k.

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include <blockattn/detail/attention_problem.hpp>
#include <blockattn/detail/bf16_dot.hpp>
#include <blockattn/detail/config.hpp>
#include <blockattn/detail/finite.hpp>
#include <blockattn/detail/int4.hpp>
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

/// Rows of one (sequence, kv head) of a paged pool: row j is row j % rows_per_page of page
/// pages[j / rows_per_page], rows `ld` apart within a page and pages `page_stride` apart (a pool
/// holding one row per 32-token key block has rows_per_page = page_size / 32). The same members
/// as StridedRows (row, from), so a K/V source templated on its rows reads pages unchanged.
template <class T>
struct PagedRows {
  const T* data = nullptr;  ///< row 0 of page 0
  Index ld = 0;
  Index page_stride = 0;
  const std::int32_t* pages = nullptr;  ///< the sequence's page ids (validated)
  Index rows_per_page = 1;

  /// Row j.
  const T* row(Index j) const {
    return data + pages[j / rows_per_page] * page_stride + (j % rows_per_page) * ld;
  }
  /// The rows from row j on, valid to the end of j's page (contiguous(j) rows).
  StridedRows<T> from(Index j) const { return {row(j), ld}; }
  /// Rows from j to the end of its page.
  Index contiguous(Index j) const { return rows_per_page - j % rows_per_page; }
};

/// Whether Rows is a PagedRows (a source templated on its rows then splits reads at pages).
template <class Rows>
inline constexpr bool kPagedRows = false;
template <class T>
inline constexpr bool kPagedRows<PagedRows<T>> = true;

/// Calls f(j, run) for the runs of rows [k0, k0 + keys) that lie on one stride (one page of
/// paged rows; all of them for StridedRows): rows [k0 + j, k0 + j + run), in order.
template <class Rows, class F>
void for_each_row_run(const Rows& rows, Index k0, Index keys, F&& f) {
  if constexpr (kPagedRows<Rows>) {
    for (Index j = 0; j < keys;) {
      const Index run = std::min(keys - j, rows.contiguous(k0 + j));
      f(j, run);
      j += run;
    }
  } else {
    static_cast<void>(rows);
    static_cast<void>(k0);
    f(Index(0), keys);
  }
}

/// The integer that element c of a stored key row holds: int8, or a 4-bit value packed two per
/// byte (detail/int4.hpp) in a row of d values.
inline float stored_key(const std::int8_t* row, Index c, Index) {
  return static_cast<float>(row[c]);
}
inline float stored_key(const std::uint8_t* row, Index c, Index d) {
  return static_cast<float>(int4_get(row, c, d));
}

/// pack_k of keys stored per channel over blocks of `block` tokens (ChannelQuantizedKVSource,
/// Int4KVSource): keys [k0, k0 + keys) into detail::pack_k's panel layout (panels of
/// kKeyVectors·L keys, each of width round_up(panel keys, L), feature-major, zero-padded),
/// element c of key j scale[c]·(stored_key − zero[c]) with its block's parameters, as
/// dequantize_kv computes it. k, scale, zero: StridedRows or PagedRows (scale and zero one row
/// per block). O(keys·d).
template <class KRows, class PRows>
void pack_channel_keys(const KRows& k, const PRows& scale, const PRows& zero, Index block, Index k0,
                       Index keys, Index d, float* panel) {
  constexpr Index kLanes = simd::Simd<float>::kLanes;
  constexpr Index kPanel = RegisterBlock<float>::kKeyVectors * kLanes;
  for (Index j0 = 0; j0 < keys; j0 += kPanel) {
    const Index count = std::min(kPanel, keys - j0);
    const Index width = round_up(count, kLanes);
    float* dst = panel + j0 * d;
    for (Index jj = 0; jj < count; ++jj) {
      const Index j = k0 + j0 + jj;
      const auto* src = k.row(j);
      const float* sc = scale.row(j / block);
      const float* zp = zero.row(j / block);
      for (Index c = 0; c < d; ++c) dst[c * width + jj] = sc[c] * (stored_key(src, c, d) - zp[c]);
    }
    for (Index c = 0; c < d; ++c) {
      for (Index jj = count; jj < width; ++jj) dst[c * width + jj] = 0.0f;
    }
  }
}

/// detail::pack_v of the values of keys [k0, k0 + keys) held as rows of S with one float scale
/// per row (int8) or none (RowScales{}), on several strides (a paged cache): for_each_run(k0,
/// keys, f) calls f(j, run) for each run of rows on one stride, and run_rows(k0 + j) gives that
/// run's rows and scales. Rows are independent in pack_v's layout, so each run is packed by
/// pack_v's own code into the rows it owns of every column panel: the same panel as one call over
/// contiguous rows. O(keys·d_v).
template <class E, class S, class ForEachRun, class RunRows>
void pack_v_runs(Index k0, Index keys, Index d_v, E* panel, const ForEachRun& for_each_run,
                 const RunRows& run_rows) {
  constexpr Index kLanes = simd::Simd<E>::kLanes;
  constexpr Index kPanel = RegisterBlock<E>::kValueVectors * kLanes;
  for (Index c0 = 0; c0 < d_v; c0 += kPanel) {
    const Index cols = std::min(kPanel, d_v - c0);
    const Index width = round_up(cols, kLanes);
    for_each_run(k0, keys, [&](Index j, Index run) {
      const std::pair<StridedRows<S>, RowScales> rows = run_rows(k0 + j);
      detail::pack_v<E>(rows.first.data + c0, rows.first.ld, run, cols,
                        panel + c0 * keys + j * width, rows.second);
    });
  }
}

/// The K/V source of an int8 cache whose keys are quantized per channel over blocks of
/// `block` tokens with a zero point, and whose values have one float scale per row (as
/// QuantizedKVSource): element c of key j is scale[j / block, c]·(float(k8[j, c]) − zero[j /
/// block, c]), the difference and the product each rounded once in float (dequantize_kv's
/// formula). Prefill packs those floats once per tile, so a prefill call is bitwise the float call
/// on the dequantized cache. Decode reads the int8 keys raw: per block, the queries are
/// multiplied by the block's scales (block_queries) and the zero points fold into one bias per
/// query row, so a score is qs·k8 − q·(scale∘zero): the same real number in another order of
/// roundings, hence within a stated tolerance, not bitwise (tests/attention_int8_channel_test.cpp).
/// Rows: StridedRows (a contiguous cache) or PagedRows (a paged one: a block never straddles a
/// page, since page_size is a multiple of the block; the source then has contiguous_keys and
/// decode splits its value reads at pages, bitwise the contiguous call on the gathered cache).
template <template <class> class Rows = StridedRows>
class ChannelQuantizedKVSource {
 public:
  using Element = float;
  using Storage = std::int8_t;
  static constexpr bool kValuesFinite = true;

  /// k: int8 key rows; k_scale, k_zero: one row of d floats per key block; v: int8 value rows,
  /// v_scale: one float per value row.
  ChannelQuantizedKVSource(Rows<std::int8_t> k, Rows<float> k_scale, Rows<float> k_zero,
                           Index block, Rows<std::int8_t> v, Rows<float> v_scale, Index d,
                           Index d_v)
      : k_(k),
        k_scale_(k_scale),
        k_zero_(k_zero),
        block_(block),
        v_(v),
        v_scale_(v_scale),
        d_(d),
        d_v_(d_v) {}

  Index d() const { return d_; }
  Index d_v() const { return d_v_; }
  Index key_block() const { return block_; }

  /// Paged rows only: rows from key k0 to the end of its page.
  template <class R = Rows<std::int8_t>, class = std::enable_if_t<kPagedRows<R>>>
  Index contiguous_keys(Index k0) const {
    return k_.contiguous(k0);
  }
  /// Calls f(j, run) for the runs of keys [k0, k0 + keys) on one stride, in key order.
  template <class F>
  void for_each_page_run(Index k0, Index keys, F&& f) const {
    for_each_row_run(k_, k0, keys, f);
  }

  void pack_k(Index k0, Index keys, float* panel) const {
    pack_channel_keys(k_, k_scale_, k_zero_, block_, k0, keys, d_, panel);
  }
  void pack_v(Index k0, Index keys, float* panel) const {
    if constexpr (kPagedRows<Rows<std::int8_t>>) {
      pack_v_runs<float, std::int8_t>(
          k0, keys, d_v_, panel,
          [&](Index first, Index count, auto&& f) { for_each_page_run(first, count, f); },
          [&](Index j) { return std::make_pair(values(j), value_scales(j)); });
    } else {
      detail::pack_v<float>(v_.row(k0), v_.ld, keys, d_v_, panel, value_scales(k0));
    }
  }
  bool values_finite(Index, Index) const { return true; }

  void block_queries(Index k0, const float* q, Index rows, float* qs, float* bias) const {
    const float* scale = k_scale_.row(k0 / block_);
    const float* zero = k_zero_.row(k0 / block_);
    for (Index r = 0; r < rows; ++r) {
      float sum = 0.0f;
      for (Index c = 0; c < d_; ++c) {
        qs[r * d_ + c] = q[r * d_ + c] * scale[c];
        sum += qs[r * d_ + c] * zero[c];
      }
      bias[r] = sum;
    }
  }

  /// Raw int8 key rows from k0 on (no row scales: see block_queries); paged: to the page's end.
  StridedRows<std::int8_t> keys(Index k0) const { return k_.from(k0); }
  StridedRows<std::int8_t> values(Index k0) const { return v_.from(k0); }
  RowScales key_scales(Index) const { return {}; }
  RowScales value_scales(Index k0) const { return {v_scale_.row(k0), v_scale_.ld}; }

 private:
  Rows<std::int8_t> k_;
  Rows<float> k_scale_;
  Rows<float> k_zero_;
  Index block_;
  Rows<std::int8_t> v_;
  Rows<float> v_scale_;
  Index d_;
  Index d_v_;
};

/// The K/V source of an int4 cache (Int4QuantizedKV): keys per channel over blocks of `block`
/// tokens with a scale and a zero point, element c of key j scale[j / block, c]·(float(q) −
/// zero[j / block, c]); values per token in groups of 32 channels, element c of value j
/// scale[j, c / 32]·float(q); q in [−8, 7] packed two per byte (detail/int4.hpp). Prefill packs
/// those floats once per tile; decode dequantizes runs of rows into an L1 buffer
/// (dequantize_keys / dequantize_values) and runs the float kernels on them. Both produce
/// exactly dequantize_kv()'s floats, and the kernels see them as they see a float cache, so an
/// int4 call is bitwise the float call on the dequantized cache. Every value is finite: the entry
/// point checked the scales and zero points. Rows: StridedRows or PagedRows (every read is row by
/// row, so a paged cache changes only where rows are read).
template <template <class> class Rows = StridedRows>
class Int4KVSource {
 public:
  using Element = float;
  using Storage = float;  // decode reads the dequantized rows (see dequantize_keys)
  static constexpr bool kValuesFinite = true;

  /// k, v: rows of packed 4-bit values (int4_row_bytes(d) bytes each); k_scale, k_zero: one row
  /// of d floats per key block; v_scale: one row of int4_groups(d_v) scales per value row.
  Int4KVSource(Rows<std::uint8_t> k, Rows<float> k_scale, Rows<float> k_zero, Index block,
               Rows<std::uint8_t> v, Rows<float> v_scale, Index d, Index d_v)
      : k_(k),
        k_scale_(k_scale),
        k_zero_(k_zero),
        block_(block),
        v_(v),
        v_scale_(v_scale),
        d_(d),
        d_v_(d_v) {}

  Index d() const { return d_; }
  Index d_v() const { return d_v_; }

  void pack_k(Index k0, Index keys, float* panel) const {
    pack_channel_keys(k_, k_scale_, k_zero_, block_, k0, keys, d_, panel);
  }
  void pack_v(Index k0, Index keys, float* panel) const {
    // detail::pack_v's layout: column panels of kValueVectors·L, key rows of width
    // round_up(columns, L) within each, zero-padded.
    constexpr Index kLanes = simd::Simd<float>::kLanes;
    constexpr Index kPanel = RegisterBlock<float>::kValueVectors * kLanes;
    for (Index c0 = 0; c0 < d_v_; c0 += kPanel) {
      const Index cols = std::min(kPanel, d_v_ - c0);
      const Index width = round_up(cols, kLanes);
      float* dst = panel + c0 * keys;
      for (Index j = 0; j < keys; ++j) {
        const std::uint8_t* src = v_.row(k0 + j);
        const float* scale = v_scale_.row(k0 + j);
        float* row = dst + j * width;
        for (Index cc = 0; cc < cols; ++cc) {
          const Index c = c0 + cc;
          row[cc] = scale[c / kInt4Group] * static_cast<float>(int4_get(src, c, d_v_));
        }
        for (Index cc = cols; cc < width; ++cc) row[cc] = 0.0f;
      }
    }
  }
  bool values_finite(Index, Index) const { return true; }

  void dequantize_keys(Index k0, Index keys, float* dst) const {
    for (Index j = k0; j < k0 + keys; ++j, dst += d_) {
      int4_row_channels(k_.row(j), d_, k_scale_.row(j / block_), k_zero_.row(j / block_), dst);
    }
  }
  void dequantize_values(Index k0, Index keys, float* dst) const {
    for (Index j = k0; j < k0 + keys; ++j, dst += d_v_) {
      int4_row_groups(v_.row(j), d_v_, v_scale_.row(j), dst);
    }
  }

 private:
  Rows<std::uint8_t> k_;
  Rows<float> k_scale_;
  Rows<float> k_zero_;
  Index block_;
  Rows<std::uint8_t> v_;
  Rows<float> v_scale_;
  Index d_;
  Index d_v_;
};

/// Whether K/V source `Source` hands decode dequantized runs of rows (member dequantize_keys, see
/// the contract above: the int4 cache).
template <class Source, class = void>
inline constexpr bool kDequantizesRows = false;
template <class Source>
inline constexpr bool kDequantizesRows<
    Source, std::void_t<decltype(std::declval<const Source&>().dequantize_keys(0, 0, nullptr))>> =
    true;

/// Whether K/V source `Source` holds int8 keys per channel in blocks (member key_block, see the
/// contract above): decode then scales the queries per block instead of the keys.
template <class Source, class = void>
inline constexpr bool kChannelKeys = false;
template <class Source>
inline constexpr bool
    kChannelKeys<Source, std::void_t<decltype(std::declval<const Source&>().key_block())>> = true;

/// Whether K/V source `Source` may keep its rows on several strides (a paged cache: member
/// contiguous_keys, see the contract above).
template <class Source, class = void>
inline constexpr bool kSplitsRows = false;
template <class Source>
inline constexpr bool
    kSplitsRows<Source, std::void_t<decltype(std::declval<const Source&>().contiguous_keys(0))>> =
        true;

/// The K/V source of one (sequence, kv head) of a paged cache: rows stored in S (E; a 16-bit
/// format under E = float; or int8 with one float scale per row under E = float, as
/// QuantizedKVSource), computed in E. Key j lives in page pages[j / page_size] at row
/// j % page_size; within a page, rows are `ld` apart (the pool's token stride), pages are
/// `page_stride` apart, and an int8 pool's scales likewise. Prefill packs a chunk row by row
/// (K) and page run by page run (V, detail::pack_v's own code) into StridedKV's panel layout,
/// the same converted values, so the same bits; decode reads rows in place, split at page
/// boundaries (contiguous_keys). The page ids were validated (0 <= id < num_pages for every page
/// the sequence's length reaches).
template <class E, class S = E>
class PagedKVSource {
 public:
  using Element = E;
  using Storage = S;
  static constexpr bool kInt8 = std::is_same_v<S, std::int8_t>;
  static_assert(std::is_same_v<S, E> || ((kIs16BitFloat<S> || kInt8) && std::is_same_v<E, float>),
                "blockattn: K/V storage is the compute type, or a 16-bit format or int8 computed "
                "in float");
  /// int8 values are finite by construction (the entry point checked the scales).
  static constexpr bool kValuesFinite = kInt8;

  /// One pool's rows of one kv head: element [page, row, 0] at data + page·page_stride + row·ld;
  /// for int8, the row's scale at scale + page·scale_page_stride + row·scale_ld.
  struct Pool {
    const S* data = nullptr;
    Index page_stride = 0;
    Index ld = 0;
    const float* scale = nullptr;
    Index scale_page_stride = 0;
    Index scale_ld = 0;
  };

  PagedKVSource(const std::int32_t* pages, Index page_size, Pool k, Pool v, Index d, Index d_v)
      : pages_(pages), page_size_(page_size), k_(k), v_(v), d_(d), d_v_(d_v) {}

  Index d() const { return d_; }
  Index d_v() const { return d_v_; }

  /// Rows from key k0 to the end of its page.
  Index contiguous_keys(Index k0) const { return page_size_ - k0 % page_size_; }

  /// Calls f(j, run) for the runs of keys [k0, k0 + keys) that share one page (one stride):
  /// keys [k0 + j, k0 + j + run), in key order.
  template <class F>
  void for_each_page_run(Index k0, Index keys, F&& f) const {
    for (Index j = 0; j < keys;) {
      const Index run = std::min(keys - j, contiguous_keys(k0 + j));
      f(j, run);
      j += run;
    }
  }

  void pack_k(Index k0, Index keys, E* panel) const {
    // The panel layout of detail::pack_k (keys in panels of kKeyVectors·L, each panel of
    // width round_up(panel keys, L), feature-major, zero-padded), gathered row by row, each
    // element converted by element_of as pack_k does.
    constexpr Index kLanes = simd::Simd<E>::kLanes;
    constexpr Index kPanel = RegisterBlock<E>::kKeyVectors * kLanes;
    for (Index j0 = 0; j0 < keys; j0 += kPanel) {
      const Index count = std::min(kPanel, keys - j0);
      const Index width = round_up(count, kLanes);
      E* dst = panel + j0 * d_;
      for (Index jj = 0; jj < count; ++jj) {
        const S* src = row(k_, k0 + j0 + jj);
        const RowScales scale = scales(k_, k0 + j0 + jj);
        for (Index c = 0; c < d_; ++c) dst[c * width + jj] = element_of<E>(src[c], scale, 0);
      }
      for (Index c = 0; c < d_; ++c) {
        for (Index jj = count; jj < width; ++jj) dst[c * width + jj] = E(0);
      }
    }
  }
  void pack_v(Index k0, Index keys, E* panel) const {
    pack_v_runs<E, S>(
        k0, keys, d_v_, panel,
        [&](Index first, Index count, auto&& f) { for_each_page_run(first, count, f); },
        [&](Index j) { return std::make_pair(values(j), value_scales(j)); });
  }
  bool values_finite(Index k0, Index keys) const {
    if constexpr (!kValuesFinite) {
      bool finite = true;
      for_each_page_run(k0, keys, [&](Index j, Index run) {
        finite = finite && block_is_finite(row(v_, k0 + j), v_.ld, run, d_v_);
      });
      return finite;
    } else {
      static_cast<void>(k0);
      static_cast<void>(keys);
    }
    return true;
  }

  /// K rows from k0 on, valid for contiguous_keys(k0) rows.
  StridedRows<S> keys(Index k0) const { return {row(k_, k0), k_.ld}; }
  /// V rows from k0 on, valid for contiguous_keys(k0) rows.
  StridedRows<S> values(Index k0) const { return {row(v_, k0), v_.ld}; }
  /// V row j.
  const S* value_row(Index j) const { return row(v_, j); }
  void copy_finite_values(Index k0, Index keys, E* dst) const {
    for_each_page_run(k0, keys, [&](Index j, Index run) {
      copy_finite(row(v_, k0 + j), v_.ld, run, d_v_, dst + j * d_v_, d_v_);
    });
  }
  /// int8: the scales of K rows from k0 on, valid for contiguous_keys(k0) rows; else empty.
  RowScales key_scales(Index k0) const { return scales(k_, k0); }
  /// int8: the scales of V rows from k0 on, valid for contiguous_keys(k0) rows; else empty.
  RowScales value_scales(Index k0) const { return scales(v_, k0); }

 private:
  const S* row(const Pool& pool, Index j) const {
    return pool.data + pages_[j / page_size_] * pool.page_stride + (j % page_size_) * pool.ld;
  }
  RowScales scales(const Pool& pool, Index j) const {
    if constexpr (kInt8) {
      return {pool.scale + pages_[j / page_size_] * pool.scale_page_stride +
                  (j % page_size_) * pool.scale_ld,
              pool.scale_ld};
    } else {
      static_cast<void>(pool);
      static_cast<void>(j);
      return {};
    }
  }

  const std::int32_t* pages_;
  Index page_size_;
  Pool k_;
  Pool v_;
  Index d_;
  Index d_v_;
};

/// The PagedKVSource sources of one sequence of a paged cache: head(0, h) is kv head h (the
/// sequence is batch entry 0 of its call; attention() on a paged cache runs one call per
/// sequence). k_pages, v_pages: [num_pages, page_size, H_kv, d] views (any strides); for int8,
/// k_scale_pages and v_scale_pages [num_pages, page_size, H_kv, 1] float (else empty); pages:
/// the sequence's page ids.
template <class E, class S = E>
class PagedKVHeads {
 public:
  using Source = PagedKVSource<E, S>;

  PagedKVHeads(const TensorView<const S>& k_pages, const TensorView<const S>& v_pages,
               const std::int32_t* pages, const TensorView<const float>& k_scale_pages = {},
               const TensorView<const float>& v_scale_pages = {})
      : k_(k_pages), v_(v_pages), k_scale_(k_scale_pages), v_scale_(v_scale_pages), pages_(pages) {}

  Source head(Index, Index h) const {
    return {pages_, k_.seq, pool(k_, k_scale_, h), pool(v_, v_scale_, h), k_.dim, v_.dim};
  }

 private:
  static typename Source::Pool pool(const TensorView<const S>& x,
                                    const TensorView<const float>& scale, Index h) {
    const float* scale_data = scale.data != nullptr ? scale.at(0, 0, h) : nullptr;
    return {x.at(0, 0, h), x.batch_stride,     x.seq_stride,
            scale_data,    scale.batch_stride, scale.seq_stride};
  }

  TensorView<const S> k_;
  TensorView<const S> v_;
  TensorView<const float> k_scale_;
  TensorView<const float> v_scale_;
  const std::int32_t* pages_;
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

/// The StridedKV sources of packed variable-length K and V (attention_varlen): k, v
/// [1, total_k, H_kv, d] (any strides) and the sequences' first rows `starts` (cu_seqlens_k);
/// head(b, h) is kv head h of sequence b.
template <class E, class S = E>
class VarlenKVHeads {
 public:
  using Source = StridedKV<E, S>;

  VarlenKVHeads(const TensorView<const S>& k, const TensorView<const S>& v,
                const std::int32_t* starts)
      : k_(k), v_(v), starts_(starts) {}

  Source head(Index b, Index h) const {
    const Index row = starts_[b];
    return {{k_.at(0, row, h), k_.seq_stride}, {v_.at(0, row, h), v_.seq_stride}, k_.dim, v_.dim};
  }

 private:
  TensorView<const S> k_;
  TensorView<const S> v_;
  const std::int32_t* starts_;
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

/// The sources of a cache whose keys are stored per channel over blocks of `block` tokens
/// (SourceOf<Rows>: ChannelQuantizedKVSource with K = std::int8_t, Int4KVSource with K =
/// std::uint8_t): k [B, n_k, H_kv, d] and v [B, n_k, H_kv, d_v] of K, k_scale and k_zero
/// [B, ceil(n_k / block), H_kv, d] float, v_scale [B, n_k, H_kv, 1 or ceil(d_v / 32)] float,
/// each view with strides of its own; head(b, h) is kv head h of batch entry b. Paged (Rows =
/// PagedRows, pages non-null): every view is a pool whose batch axis is the page and whose seq
/// axis holds one page's rows (k_scale and k_zero page_size / block of them), and head(0, h) is
/// kv head h of the sequence whose page ids are `pages`.
template <class K, template <template <class> class> class SourceOf,
          template <class> class Rows = StridedRows>
class ChannelKeyKVHeads {
 public:
  using Source = SourceOf<Rows>;

  ChannelKeyKVHeads(const TensorView<const K>& k, const TensorView<const float>& k_scale,
                    const TensorView<const float>& k_zero, Index block,
                    const TensorView<const K>& v, const TensorView<const float>& v_scale,
                    const std::int32_t* pages = nullptr)
      : k_(k),
        k_scale_(k_scale),
        k_zero_(k_zero),
        block_(block),
        v_(v),
        v_scale_(v_scale),
        pages_(pages) {}

  Source head(Index b, Index h) const {
    return {rows(k_, b, h),
            rows(k_scale_, b, h),
            rows(k_zero_, b, h),
            block_,
            rows(v_, b, h),
            rows(v_scale_, b, h),
            k_.dim,
            v_.dim};
  }

 private:
  template <class T>
  Rows<T> rows(const TensorView<const T>& x, Index b, Index h) const {
    if constexpr (kPagedRows<Rows<T>>) {
      static_cast<void>(b);
      return {x.at(0, 0, h), x.seq_stride, x.batch_stride, pages_, x.seq};
    } else {
      return {x.at(b, 0, h), x.seq_stride};
    }
  }

  TensorView<const K> k_;
  TensorView<const float> k_scale_;
  TensorView<const float> k_zero_;
  Index block_;
  TensorView<const K> v_;
  TensorView<const float> v_scale_;
  const std::int32_t* pages_;
};

/// The ChannelQuantizedKVSource sources of a per-channel int8 key cache (ChannelKeyKVHeads).
using ChannelQuantizedKVHeads = ChannelKeyKVHeads<std::int8_t, ChannelQuantizedKVSource>;
/// The Int4KVSource sources of an int4 cache: k and v of 4-bit values (dim counts values,
/// strides count bytes), v_scale [B, n_k, H_kv, ceil(d_v / 32)] (ChannelKeyKVHeads).
using Int4KVHeads = ChannelKeyKVHeads<std::uint8_t, Int4KVSource>;

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
