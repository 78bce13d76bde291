#pragma once
// Paged K/V caches: PagedKV (a pool of fixed-size pages of keys and values over the caller's
// memory, and per sequence a list of pages), the page tables of three serving engines taken as
// they keep them (no copy), and the attention() overloads that read such a cache in place:
// pages of float, double, bfloat16 or half (PagedKV<S>), of int8 with one float scale per token
// and kv head (PagedQuantizedKV: quantized_kv.hpp's format in pages), of int8 with per-channel
// keys (PagedChannelQuantizedKV: ChannelQuantizedKV's format in pages) or of int4
// (PagedInt4QuantizedKV: int4_kv.hpp's format in pages). The two formats with per-channel keys
// keep each 32-token key block's scales and zero points in the page that holds its tokens, so
// their page_size must be a multiple of 32 (a block never straddles two pages).
//
// The pool. k_pages and v_pages are TensorViews whose batch axis is the page: [num_pages,
// page_size, H_kv, d] (vLLM's and FlashInfer's "NHD": make_tensor_view) or the head-major
// [num_pages, H_kv, page_size, d] (FlashInfer's "HND", OpenVINO's value cache:
// make_tensor_view_bhsd), or any other strides with contiguous features. Token t of a sequence is
// row t % page_size of page pages[t / page_size] of its page list.
//
// The page tables (PageTable, every index int32 as the engines keep them):
//   vLLM        block_tables [batch, max_pages] row-major, seq_lens [batch]: sequence b's pages
//               are block_tables[b, 0..), its length seq_lens[b];
//   FlashInfer  indptr [batch + 1], indices, last_page_len [batch]: sequence b's pages are
//               indices[indptr[b] .. indptr[b + 1]), its length (pages − 1)·page_size +
//               last_page_len[b] (0 with no page);
//   OpenVINO    block_indices, block_indices_begins [batch + 1], past_lens [batch]: pages
//               block_indices[begins[b] .. begins[b + 1]); past_lens counts the tokens before the
//               current chunk, whose n_q tokens are already in the pages (PagedAttention writes
//               them there first), so the length is past_lens[b] + n_q.
// The pages hold every token of the sequence, the current chunk's too: q [B, n_q, H, d] are the
// last n_q tokens of each sequence (decode: n_q = 1), and causal, the window and ALiBi align them
// bottom-right on each sequence's own length (query i is token length_b − n_q + i).
//
// Semantics: sequence b's rows of out and lse are exactly those of the contiguous call
// attention(q_b, k_b, v_b, out_b, options_b, lse_b, mask_mod_b, score_mod_b) on its gathered
// cache k_b, v_b [1, length_b, H_kv, d] (in the pool's layout: BSHD for [num_pages, page_size,
// H_kv, d] pages, BHSD for head-major ones), where q_b, out_b, lse_b are batch entry b, options_b
// has key_lengths[b] alone when key_lengths is given, and mask_mod_b / score_mod_b see batch
// index b. Bitwise: pages change no operation, only where rows are read (tests/paged_kv_test.cpp,
// tests/paged_quantized_test.cpp for the per-channel key formats).
// Each sequence runs as one planned call (its tasks split over the threads: kv heads and key
// segments); one plan over sequences of different lengths is issue 18's item 3.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <type_traits>

#include <blockattn/attention.hpp>
#include <blockattn/detail/check.hpp>
#include <blockattn/detail/config.hpp>
#include <blockattn/detail/kv_source.hpp>
#include <blockattn/int4_kv.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/quantized_kv.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {

/// Which engine's page table a PageTable holds (see the top of paged_kv.hpp).
enum class PageTableFormat {
  VLLM,        ///< block_tables [batch, max_pages] + seq_lens [batch]
  FlashInfer,  ///< indptr [batch + 1] + indices + last_page_len [batch]
  OpenVINO,    ///< block_indices + block_indices_begins [batch + 1] + past_lens [batch]
};

/// The page lists of a batch of sequences in one engine's format, over the caller's int32 arrays
/// (nothing copied). Build one with vllm_page_table(), flashinfer_page_table() or
/// openvino_page_table(); attention() checks it against the pool and q.
struct PageTable {
  /// The engine format of the arrays below.
  PageTableFormat format = PageTableFormat::VLLM;
  /// The page ids: vLLM's block_tables (row-major [batch, max_pages]), FlashInfer's indices,
  /// OpenVINO's block_indices.
  Span<const std::int32_t> pages;
  /// [batch + 1] offsets of each sequence's pages in `pages`: FlashInfer's indptr, OpenVINO's
  /// block_indices_begins; empty for vLLM.
  Span<const std::int32_t> offsets;
  /// [batch]: vLLM's seq_lens, FlashInfer's last_page_len, OpenVINO's past_lens.
  Span<const std::int32_t> lengths;
  /// vLLM: the row width of block_tables (pages per row); unused otherwise.
  Index max_pages = 0;
};

/// vLLM's page table: block_tables [batch, max_pages] int32 row-major (sequence b's pages are
/// block_tables[b·max_pages ..]), seq_lens [batch] its tokens (the new ones included). O(1).
inline PageTable vllm_page_table(Span<const std::int32_t> block_tables, Index max_pages,
                                 Span<const std::int32_t> seq_lens) {
  return {PageTableFormat::VLLM, block_tables, {}, seq_lens, max_pages};
}

/// FlashInfer's page table: sequence b's pages are indices[indptr[b] .. indptr[b + 1]) and its
/// length (pages − 1)·page_size + last_page_len[b] (last_page_len in [1, page_size]; 0 tokens
/// with no page). O(1).
inline PageTable flashinfer_page_table(Span<const std::int32_t> indptr,
                                       Span<const std::int32_t> indices,
                                       Span<const std::int32_t> last_page_len) {
  return {PageTableFormat::FlashInfer, indices, indptr, last_page_len, 0};
}

/// OpenVINO PagedAttention's page table: sequence b's pages are
/// block_indices[block_indices_begins[b] .. block_indices_begins[b + 1]) and its length
/// past_lens[b] + n_q (the tokens before the chunk and the chunk's own, already in the pages).
/// O(1).
inline PageTable openvino_page_table(Span<const std::int32_t> block_indices,
                                     Span<const std::int32_t> block_indices_begins,
                                     Span<const std::int32_t> past_lens) {
  return {PageTableFormat::OpenVINO, block_indices, block_indices_begins, past_lens, 0};
}

/// A paged K/V cache over the caller's memory: a pool of pages of keys and of values, and the
/// sequences' page lists (see the top of paged_kv.hpp). S: float, double, Eigen::bfloat16 or
/// Eigen::half (a 16-bit pool under float q and out, widened exactly as the contiguous call).
template <class S>
struct PagedKV {
  /// Key pages: [num_pages, page_size, H_kv, d] (batch axis = page), any strides.
  TensorView<const S> k_pages;
  /// Value pages: [num_pages, page_size, H_kv, d_v], any strides.
  TensorView<const S> v_pages;
  /// Each sequence's pages and length.
  PageTable table;
};

/// A paged int8 K/V cache (QuantizedKV's format in pages, over the caller's memory): k_pages and
/// v_pages int8 [num_pages, page_size, H_kv, d] (d_v for v), k_scale_pages and v_scale_pages
/// float [num_pages, page_size, H_kv, 1] (one scale per token and kv head, the value of an
/// element its row's scale times the int8), each view with strides of its own, and the page
/// table. quantize_kv() on a one-token slice of a page appends a token in place.
struct PagedQuantizedKV {
  /// Key pages as int8, [num_pages, page_size, H_kv, d].
  TensorView<const std::int8_t> k_pages;
  /// One float scale per key row, [num_pages, page_size, H_kv, 1].
  TensorView<const float> k_scale_pages;
  /// Value pages as int8, [num_pages, page_size, H_kv, d_v].
  TensorView<const std::int8_t> v_pages;
  /// One float scale per value row, [num_pages, page_size, H_kv, 1].
  TensorView<const float> v_scale_pages;
  /// Each sequence's pages and length.
  PageTable table;
};

/// A paged int8 K/V cache with per-channel keys (ChannelQuantizedKV's format in pages, over the
/// caller's memory): k_pages int8 [num_pages, page_size, H_kv, d], k_scale_pages and k_zero_pages
/// float [num_pages, page_size / 32, H_kv, d] (row r of page p holds the parameters of the key
/// block of the page's tokens [32·r, 32·r + 32)), v_pages int8 [num_pages, page_size, H_kv, d_v],
/// v_scale_pages float [num_pages, page_size, H_kv, 1], each view with strides of its own, and
/// the page table; page_size a multiple of 32. Token t of a sequence is row t % page_size of page
/// pages[t / page_size] and its key block's parameters row (t % page_size) / 32 of the same page,
/// so the sequence's gathered cache is a ChannelQuantizedKV. quantize_kv() on a page (batch-1
/// slices of k_pages, k_scale_pages and k_zero_pages, position t % page_size) appends keys in
/// place, on a one-token slice of v_pages and v_scale_pages a value.
struct PagedChannelQuantizedKV {
  /// Key pages as int8, [num_pages, page_size, H_kv, d].
  TensorView<const std::int8_t> k_pages;
  /// One scale per key block of 32 tokens, kv head and channel, [num_pages, page_size / 32, H_kv,
  /// d].
  TensorView<const float> k_scale_pages;
  /// One zero point per key block, kv head and channel (in int8 steps), as k_scale_pages.
  TensorView<const float> k_zero_pages;
  /// Value pages as int8, [num_pages, page_size, H_kv, d_v].
  TensorView<const std::int8_t> v_pages;
  /// One float scale per value row, [num_pages, page_size, H_kv, 1].
  TensorView<const float> v_scale_pages;
  /// Each sequence's pages and length.
  PageTable table;
};

/// A paged int4 K/V cache (Int4QuantizedKV's format in pages, over the caller's memory): k_pages
/// and v_pages of 4-bit values [num_pages, page_size, H_kv, d] (d_v for v; dim counts values,
/// strides count bytes, rows of ceil(dim / 2) bytes), k_scale_pages and k_zero_pages float
/// [num_pages, page_size / 32, H_kv, d] (the key blocks, as PagedChannelQuantizedKV's),
/// v_scale_pages float [num_pages, page_size, H_kv, ceil(d_v / 32)], each view with strides of its
/// own, and the page table; page_size a multiple of 32. quantize_kv() on pages appends in place
/// as for PagedChannelQuantizedKV.
struct PagedInt4QuantizedKV {
  /// Key pages as 4-bit values, [num_pages, page_size, H_kv, d].
  TensorView<const std::uint8_t> k_pages;
  /// One scale per key block of 32 tokens, kv head and channel, [num_pages, page_size / 32, H_kv,
  /// d].
  TensorView<const float> k_scale_pages;
  /// One zero point per key block, kv head and channel (in 4-bit steps), as k_scale_pages.
  TensorView<const float> k_zero_pages;
  /// Value pages as 4-bit values, [num_pages, page_size, H_kv, d_v].
  TensorView<const std::uint8_t> v_pages;
  /// One scale per value row and group of 32 channels, [num_pages, page_size, H_kv,
  /// ceil(d_v / 32)].
  TensorView<const float> v_scale_pages;
  /// Each sequence's pages and length.
  PageTable table;
};

namespace detail {

/// Sequence b's page ids (`count` of them) in a validated PageTable.
struct PageList {
  const std::int32_t* ids = nullptr;
  Index count = 0;
};

/// Sequence b's pages. The table's spans are large enough (validate_paged_attention).
inline PageList page_list(const PageTable& table, Index b) {
  if (table.format == PageTableFormat::VLLM) {
    return {table.pages.data() + b * table.max_pages, table.max_pages};
  }
  const Index begin = table.offsets[b];
  return {table.pages.data() + begin, table.offsets[b + 1] - begin};
}

/// Sequence b's tokens, the n_q new ones included (may be negative or too long on bad input:
/// validate_paged_attention checks it).
inline Index sequence_length(const PageTable& table, Index b, Index n_q, Index page_size) {
  switch (table.format) {
    case PageTableFormat::VLLM:
      return table.lengths[b];
    case PageTableFormat::FlashInfer: {
      const Index pages = table.offsets[b + 1] - table.offsets[b];
      return pages > 0 ? (pages - 1) * page_size + table.lengths[b] : table.lengths[b];
    }
    case PageTableFormat::OpenVINO:
      return table.lengths[b] + n_q;
  }
  return 0;
}

/// The argument names of a PageTable's arrays in messages, per format (string literals).
struct PageTableNames {
  const char* pages;
  const char* offsets;
  const char* lengths;
};

inline PageTableNames page_table_names(PageTableFormat format) {
  switch (format) {
    case PageTableFormat::VLLM:
      return {"block_tables", "", "seq_lens"};
    case PageTableFormat::FlashInfer:
      return {"indices", "indptr", "last_page_len"};
    case PageTableFormat::OpenVINO:
      return {"block_indices", "block_indices_begins", "past_lens"};
  }
  return {"pages", "offsets", "lengths"};
}

/// Address range of an int32 array.
inline AddressRange span_range(Span<const std::int32_t> s) {
  return address_range(s.data(), 1, s.size(), s.size());
}

/// Checks every argument of attention() on a PagedKV before anything is written: q, out, lse and
/// the options as the contiguous call does; the pool (sizes of k_pages and v_pages, data); the
/// page table (spans long enough, offsets non-negative and non-decreasing within `pages`,
/// lengths non-negative, within the pool, covered by the sequence's pages, FlashInfer's
/// last_page_len in [1, page_size]); the ids of every page a length reaches in [0, num_pages);
/// options.key_lengths[b] <= length b; no output overlapping an input (k and v rows hold
/// kv_values_per_element values to an element: 2 for int4 pools' bytes). O(batch + pages used).
template <class QS, class S, class OS, class L>
void validate_paged_attention(const char* f, const TensorView<const QS>& q,
                              const TensorView<const S>& k, const TensorView<const S>& v,
                              const PageTable& table, const TensorView<OS>& out,
                              const AttentionOptions& options, Span<L> lse,
                              Index kv_values_per_element = 1) {
  const bool empty = validate_query_kv_out(f, kPoolKVNames, q, k, v, out);
  require(k.seq > 0, f, "k_pages.seq (the page size) is 0 (a page holds at least one token)");
  require_size(f, "v_pages.batch", v.batch, "k_pages.batch", k.batch,
               "keys and values have the same pages");
  require_size(f, "v_pages.seq", v.seq, "k_pages.seq", k.seq, "keys and values share pages");
  // The page table.
  const Index batch = q.batch;
  const Index page_size = k.seq;
  const Index num_pages = k.batch;
  const PageTableNames n = page_table_names(table.format);
  require_span(f, n.lengths, table.lengths, "q.batch", batch, "one entry per sequence",
               /*required=*/true);
  if (table.format == PageTableFormat::VLLM) {
    require(table.max_pages >= 0, f, "max_pages is ", table.max_pages, " but must be >= 0");
    require_span(f, n.pages, table.pages, "q.batch·max_pages", batch * table.max_pages,
                 "a row of max_pages page ids per sequence", /*required=*/true);
  } else {
    require_span(f, n.offsets, table.offsets, "q.batch + 1", batch + 1,
                 "each sequence's first page and the end of the last", /*required=*/true);
    for (Index b = 0; b <= batch; ++b) {
      const Index at = table.offsets[b];
      require(at >= 0 && at <= table.pages.size(), f, n.offsets, "[", b, "] is ", at,
              " but must be in [0, ", table.pages.size(), "] (", n.pages, ".size())");
      require(b == 0 || at >= table.offsets[b - 1], f, n.offsets, "[", b, "] is ", at, " but ",
              n.offsets, "[", b - 1, "] is ", table.offsets[b - 1], " (offsets must not decrease)");
    }
  }
  Index max_length = 0;
  for (Index b = 0; b < batch; ++b) {
    const PageList pages = page_list(table, b);
    if (table.format == PageTableFormat::FlashInfer) {
      const Index last = table.lengths[b];
      require(pages.count > 0 ? last >= 1 && last <= page_size : last == 0, f, n.lengths, "[", b,
              "] is ", last, " but sequence ", b, " has ", pages.count, " pages of ", page_size,
              " tokens (the last page holds 1 to page_size tokens; 0 without pages)");
    } else {
      require(table.lengths[b] >= 0, f, n.lengths, "[", b, "] is ", table.lengths[b],
              " but must be >= 0");
    }
    const Index length = sequence_length(table, b, q.seq, page_size);
    require(length <= num_pages * page_size, f, "sequence ", b, " has ", length,
            " tokens but the pool holds ", num_pages, " pages of ", page_size, " (",
            num_pages * page_size, " tokens)");
    const Index used = (length + page_size - 1) / page_size;
    require(used <= pages.count, f, "sequence ", b, " has ", length, " tokens (", used,
            " pages of ", page_size, ") but its page list in ", n.pages, " holds ", pages.count,
            " pages");
    for (Index p = 0; p < used; ++p) {
      const Index id = pages.ids[p];
      require(id >= 0 && id < num_pages, f, "page ", p, " of sequence ", b, " is ", id,
              " but k_pages has ", num_pages, " pages (ids in [0, ", num_pages, "))");
    }
    max_length = std::max(max_length, length);
  }
  require(empty || max_length == 0 || (k.data != nullptr && v.data != nullptr), f,
          "k_pages.data or v_pages.data is null for a non-empty problem");
  validate_attention_options(f, options, batch, q.heads, q.seq, max_length);
  for (Index b = 0; b < (options.key_lengths.empty() ? 0 : batch); ++b) {
    const Index length = sequence_length(table, b, q.seq, page_size);
    require(options.key_lengths[b] <= length, f, "options.key_lengths[", b, "] is ",
            options.key_lengths[b], " but sequence ", b, " has ", length, " tokens");
  }
  // Outputs must not alias inputs.
  const AddressRange out_range = tensor_range(out);
  const AddressRange inputs[] = {tensor_range(q),
                                 tensor_range(k, kv_values_per_element),
                                 tensor_range(v, kv_values_per_element),
                                 span_range(table.pages),
                                 span_range(table.offsets),
                                 span_range(table.lengths)};
  const char* const input_names[] = {"q", "k_pages", "v_pages", n.pages, n.offsets, n.lengths};
  for (std::size_t i = 0; i < std::size(inputs); ++i) {
    require_disjoint(f, "out", out_range, input_names[i], inputs[i]);
  }
  const Index count = q.batch * q.heads * q.seq;
  require_span(f, "lse", lse, "batch·heads·n_q", count,
               "one log-sum-exp per query row, [batch, heads, n_q]", /*required=*/false);
  if (!lse.empty()) {
    const AddressRange lse_range = address_range(lse.data(), 1, count, count);
    for (std::size_t i = 0; i < std::size(inputs); ++i) {
      require_disjoint(f, "lse", lse_range, input_names[i], inputs[i]);
    }
    require_disjoint(f, "lse", lse_range, "out", out_range);
  }
}

/// The argument names of an int8 paged cache's scale pools and their value pools.
inline constexpr ScaleNames kKScalePagesNames{
    "k_scale_pages",     "k_scale_pages.batch", "k_scale_pages.seq", "k_scale_pages.heads",
    "k_scale_pages.dim", "k_pages.batch",       "k_pages.seq",       "k_pages.heads"};
inline constexpr ScaleNames kVScalePagesNames{
    "v_scale_pages",     "v_scale_pages.batch", "v_scale_pages.seq", "v_scale_pages.heads",
    "v_scale_pages.dim", "v_pages.batch",       "v_pages.seq",       "v_pages.heads"};

/// Checks a paged cache's per-row scale pool against its pool `of` (validated, with the table,
/// by validate_paged_attention): sizes [num_pages, page_size, H_kv, groups] (groups 1: int8's one
/// scale per row; int4 values: one per 32 channels), data when some sequence holds a token, and
/// the scales of every token a sequence holds finite with |scale| <= max_scale (pages no sequence
/// reaches are not read). O(Σ_b length_b·H_kv·groups).
template <class K>
void validate_page_scales(const char* f, const ScaleNames& n, const TensorView<const float>& scale,
                          const TensorView<const K>& of, const PageTable& table, Index batch,
                          Index n_q, Index groups = 1, float max_scale = kMaxInt8Scale) {
  const char* const why = groups == 1 ? "one scale per token and kv head"
                                      : "one scale per token, kv head and group of 32 channels";
  require_size(f, n.batch, scale.batch, n.of_batch, of.batch, why);
  require_size(f, n.seq, scale.seq, n.of_seq, of.seq, why);
  require_size(f, n.heads, scale.heads, n.of_heads, of.heads, why);
  require_size(f, n.dim, scale.dim, groups == 1 ? "1" : "ceil(v_pages.dim / 32)", groups, why);
  const Index page_size = of.seq;
  for (Index b = 0; b < batch; ++b) {
    const Index length = sequence_length(table, b, n_q, page_size);
    if (length == 0) continue;
    require(scale.data != nullptr, f, n.name, ".data is null but sequence ", b, " holds ", length,
            " tokens");
    const PageList pages = page_list(table, b);
    for (Index t = 0; t < length; ++t) {
      const Index page = pages.ids[t / page_size];
      for (Index h = 0; h < scale.heads; ++h) {
        const float* x = scale.at(page, t % page_size, h);
        for (Index g = 0; g < groups; ++g) {
          if (std::isfinite(x[g]) && std::abs(x[g]) <= max_scale) continue;
          const char* const why_bad = " (a scale must be finite and at most ";
          const char* const so = " in magnitude, so that every value is finite)";
          if (groups == 1) {
            require(false, f, n.name, "[", page, ", ", t % page_size, ", ", h, "] (token ", t,
                    " of sequence ", b, ") is ", x[g], why_bad, max_scale, so);
          }
          require(false, f, n.name, "[", page, ", ", t % page_size, ", ", h, ", ", g, "] (token ",
                  t, " of sequence ", b, ") is ", x[g], why_bad, max_scale, so);
        }
      }
    }
  }
}

/// Checks a paged cache's per-channel key parameter pools against its key pool k (validated,
/// with the table, by validate_paged_attention): page_size a multiple of 32 (a key block's
/// parameters live in the page of its tokens), sizes [num_pages, page_size / 32, H_kv, d], data
/// when some sequence holds a token, and the parameters of every block some sequence's tokens
/// reach valid for integers in [q_min, q_max] (validate_key_blocks; blocks no sequence reaches
/// are not read). O(Σ_b ceil(length_b / 32)·H_kv·d).
template <class K>
void validate_page_channel_keys(const char* f, const TensorView<const K>& k,
                                const TensorView<const float>& k_scale,
                                const TensorView<const float>& k_zero, const PageTable& table,
                                Index batch, Index n_q, float q_min, float q_max) {
  const Index page_size = k.seq;
  require(page_size % kKeyBlockTokens == 0, f, "page_size (k_pages.seq) is ", page_size,
          " but must be a multiple of ", kKeyBlockTokens,
          " (each 32-token key block keeps its scales and zero points in the page of its tokens)");
  const char* const why = "one per key block of 32 tokens of a page, kv head and channel";
  const char* const names[][5] = {{"k_scale_pages", "k_scale_pages.batch", "k_scale_pages.seq",
                                   "k_scale_pages.heads", "k_scale_pages.dim"},
                                  {"k_zero_pages", "k_zero_pages.batch", "k_zero_pages.seq",
                                   "k_zero_pages.heads", "k_zero_pages.dim"}};
  const TensorView<const float>* params[] = {&k_scale, &k_zero};
  for (int i = 0; i < 2; ++i) {
    const TensorView<const float>& x = *params[i];
    require_size(f, names[i][1], x.batch, "k_pages.batch", k.batch, why);
    require_size(f, names[i][2], x.seq, "page_size / 32", page_size / kKeyBlockTokens, why);
    require_size(f, names[i][3], x.heads, "k_pages.heads", k.heads, why);
    require_size(f, names[i][4], x.dim, "k_pages.dim", k.dim, why);
    for (Index b = 0; b < batch; ++b) {
      const Index length = sequence_length(table, b, n_q, page_size);
      require(length == 0 || x.data != nullptr, f, names[i][0], ".data is null but sequence ", b,
              " holds ", length, " tokens");
    }
  }
  validate_key_blocks(
      f, "k_scale_pages", "k_zero_pages", k_scale, k_zero,
      [&](auto&& block) {
        for (Index b = 0; b < batch; ++b) {
          const PageList pages = page_list(table, b);
          const Index length = sequence_length(table, b, n_q, page_size);
          for (Index t = 0; t < length; t += kKeyBlockTokens) {
            block(Index(pages.ids[t / page_size]), (t % page_size) / kKeyBlockTokens);
          }
        }
      },
      q_min, q_max);
}

/// A user mask_mod seen from one sequence's call (batch entry 0 there): called with the
/// sequence's batch index `b` of the whole call. Forwards classify_block when the mask has one.
template <class MaskMod, bool = HasClassifyBlock<MaskMod>::value>
struct SequenceMaskMod {
  const MaskMod& mask;  ///< the user's mask
  Index b;              ///< the sequence's batch index
  /// mask(b, h, i, j).
  bool operator()(Index, Index h, Index i, Index j) const { return mask(b, h, i, j); }
};
template <class MaskMod>
struct SequenceMaskMod<MaskMod, true> {
  const MaskMod& mask;  ///< the user's mask
  Index b;              ///< the sequence's batch index
  /// mask(b, h, i, j).
  bool operator()(Index, Index h, Index i, Index j) const { return mask(b, h, i, j); }
  /// mask.classify_block(b, h, q0, q_end, k0, k_end).
  BlockVisibility classify_block(Index, Index h, Index q0, Index q_end, Index k0,
                                 Index k_end) const {
    return mask.classify_block(b, h, q0, q_end, k0, k_end);
  }
};

/// A user score_mod seen from one sequence's call: called with the sequence's batch index `b`.
template <class ScoreMod>
struct SequenceScoreMod {
  const ScoreMod& mod;  ///< the user's score_mod
  Index b;              ///< the sequence's batch index
  /// mod(s, b, h, i, j).
  template <class T>
  T operator()(T s, Index, Index h, Index i, Index j) const {
    return mod(s, b, h, i, j);
  }
};

/// The functor a sequence's call gets: NoMaskMod / NoScoreMod stay themselves (compiled out).
template <class MaskMod>
auto sequence_mask_mod(const MaskMod& mask_mod, Index b) {
  if constexpr (kHasMaskMod<MaskMod>) {
    return SequenceMaskMod<MaskMod>{mask_mod, b};
  } else {
    return NoMaskMod{};
  }
}
template <class ScoreMod>
auto sequence_score_mod(const ScoreMod& score_mod, Index b) {
  if constexpr (kHasScoreMod<ScoreMod>) {
    return SequenceScoreMod<ScoreMod>{score_mod, b};
  } else {
    return NoScoreMod{};
  }
}

}  // namespace detail

namespace detail {

/// The body of the paged attention() forms after validation: one planned call per sequence
/// (attention_forward_sources) on the sources make_heads(page ids) gives for its pages, with the
/// sequence's length as n_k, its key length, and the user's functors seeing its batch index.
template <class QS, class S, class MakeHeads, class MaskMod, class ScoreMod>
void paged_attention_forward(const TensorView<const QS>& q, const TensorView<const S>& k_pages,
                             const TensorView<const S>& v_pages, const PageTable& table,
                             const TensorView<QS>& out, const AttentionOptions& options,
                             accumulator_t<QS>* lse, const MaskMod& mask_mod,
                             const ScoreMod& score_mod, const MakeHeads& make_heads) {
  Workspace own;
  Workspace& workspace = options.workspace != nullptr ? *options.workspace : own;
  const auto rows_interleave = [](const TensorView<const S>& x) {
    return std::abs(x.head_stride) < std::abs(x.seq_stride);
  };
  const bool k_interleave = rows_interleave(k_pages);
  const bool v_interleave = rows_interleave(v_pages);
  for (Index b = 0; b < q.batch; ++b) {
    const Index length = sequence_length(table, b, q.seq, k_pages.seq);
    TensorView<const QS> q_b = q;
    q_b.data = q.at(b, 0, 0);
    q_b.batch = 1;
    TensorView<QS> out_b = out;
    out_b.data = out.at(b, 0, 0);
    out_b.batch = 1;
    AttentionOptions options_b = options;
    if (!options.key_lengths.empty()) {
      options_b.key_lengths = Span<const Index>(options.key_lengths.data() + b, 1);
    }
    const AttentionShapes shapes{1,     q.heads, k_pages.heads, q.seq,       length,
                                 q.dim, out.dim, k_interleave,  v_interleave};
    attention_forward_sources(q_b, shapes, make_heads(page_list(table, b).ids), out_b, options_b,
                              lse == nullptr ? nullptr : lse + b * q.heads * q.seq,
                              sequence_mask_mod(mask_mod, b), sequence_score_mod(score_mod, b),
                              workspace);
  }
}

}  // namespace detail

/// Exact attention of q over a paged K/V cache (PagedKV: a pool of pages and each sequence's page
/// list in vLLM's, FlashInfer's or OpenVINO's format, read in place). Sequence b's queries
/// q[b] are its last n_q tokens (decode: n_q = 1; a prefill chunk: more), aligned bottom-right on
/// its own length for causal, the window and ALiBi; every option, mask_mod and score_mod of the
/// contiguous attention() applies, GQA and key segments (split-KV) too. Sequence b's out and lse
/// are bitwise those of the contiguous call on its gathered cache (see the top of paged_kv.hpp).
/// Element types: q and out float or double with pages of the same type, or float q and out over
/// Eigen::bfloat16 or Eigen::half pages (widened exactly, as the contiguous call does).
/// q [B, n_q, H, d], out [B, n_q, H, d_v]; lse (optional) [B, H, n_q] of q's accumulator type.
/// Throws std::invalid_argument naming the argument and the sizes (see
/// detail::validate_paged_attention: page ids out of range, page lists shorter than a length,
/// lengths beyond the pool, offsets that decrease, …) before anything is written.
/// Time: the contiguous calls' O(Σ_b n_q·length_b·H·d); one planned call per sequence, each over
/// options.threads threads; options.workspace (one for the whole batch) makes a repeated call
/// allocate nothing.
template <class QT, class S, class OT, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention(TensorView<QT> q, const PagedKV<S>& kv, TensorView<OT> out,
               const AttentionOptions& options = {},
               Span<accumulator_t<std::remove_const_t<QT>>> lse = {}, const MaskMod& mask_mod = {},
               const ScoreMod& score_mod = {}) {
  using QS = std::remove_const_t<QT>;
  using T = accumulator_t<QS>;
  detail::check_attention_types<QS, S, S, std::remove_const_t<OT>>();
  static_assert(std::is_same_v<OT, QS>,
                "blockattn: out is a writable TensorView of q's element type");
  detail::check_mods<T, MaskMod, ScoreMod>();
  const TensorView<const QS> cq(q);
  detail::validate_paged_attention("attention", cq, kv.k_pages, kv.v_pages, kv.table, out, options,
                                   lse);
  detail::paged_attention_forward(
      cq, kv.k_pages, kv.v_pages, kv.table, out, options, detail::data_or_null(lse), mask_mod,
      score_mod, [&](const std::int32_t* pages) {
        return detail::PagedKVHeads<T, S>(kv.k_pages, kv.v_pages, pages);
      });
}

/// Exact attention of float queries over a paged int8 K/V cache (PagedQuantizedKV): the pages
/// hold QuantizedKV's format (int8 values, one float scale per token and kv head), read in place
/// as attention() on a QuantizedKV reads them. Sequence b's out and lse are bitwise those of
/// attention() on the QuantizedKV of its gathered int8 cache and scales (hence of the float call
/// on their dequantize_kv()), with everything else as the PagedKV form. q and out float.
/// Throws std::invalid_argument as the PagedKV form, and also when a scale pool's sizes differ
/// from [num_pages, page_size, H_kv, 1], its data is null, or a scale of a token some sequence
/// holds is not finite or has |scale|·128 beyond float; nothing is written then. Checking the
/// scales reads those of every held token: O(Σ_b length_b·H_kv).
template <class QT, class OT, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention(TensorView<QT> q, const PagedQuantizedKV& kv, TensorView<OT> out,
               const AttentionOptions& options = {}, Span<float> lse = {},
               const MaskMod& mask_mod = {}, const ScoreMod& score_mod = {}) {
  static_assert(std::is_same_v<std::remove_const_t<QT>, float> && std::is_same_v<OT, float>,
                "blockattn: an int8 paged cache (PagedQuantizedKV) is read under float q and a "
                "writable float out (TensorView<float>)");
  detail::check_mods<float, MaskMod, ScoreMod>();
  const TensorView<const float> cq(q);
  const char* const f = "attention";
  detail::validate_paged_attention(f, cq, kv.k_pages, kv.v_pages, kv.table, out, options, lse);
  detail::validate_page_scales(f, detail::kKScalePagesNames, kv.k_scale_pages, kv.k_pages, kv.table,
                               q.batch, q.seq);
  detail::validate_page_scales(f, detail::kVScalePagesNames, kv.v_scale_pages, kv.v_pages, kv.table,
                               q.batch, q.seq);
  const std::pair<const char*, detail::AddressRange> scales[] = {
      {"k_scale_pages", detail::tensor_range(kv.k_scale_pages)},
      {"v_scale_pages", detail::tensor_range(kv.v_scale_pages)}};
  detail::require_outputs_disjoint(f, detail::tensor_range(out), lse, q.batch * q.heads * q.seq,
                                   scales);
  detail::paged_attention_forward(
      cq, kv.k_pages, kv.v_pages, kv.table, out, options, detail::data_or_null(lse), mask_mod,
      score_mod, [&](const std::int32_t* pages) {
        return detail::PagedKVHeads<float, std::int8_t>(kv.k_pages, kv.v_pages, pages,
                                                        kv.k_scale_pages, kv.v_scale_pages);
      });
}

namespace detail {

/// attention() on a paged cache with per-channel keys (Paged: PagedChannelQuantizedKV or
/// PagedInt4QuantizedKV) after its type checks: validation (the table and pools as the other
/// paged forms, page_size a multiple of 32, the key parameters of every block a sequence reaches,
/// the value scales of every token it holds, outputs disjoint from the parameter pools), then
/// paged_attention_forward on the format's own source (SourceOf: ChannelQuantizedKVSource or
/// Int4KVSource) over PagedRows: only where rows are read changes.
template <class K, template <template <class> class> class SourceOf, class Paged, class MaskMod,
          class ScoreMod>
void paged_channel_key_attention(const TensorView<const float>& q, const Paged& kv,
                                 const TensorView<float>& out, const AttentionOptions& options,
                                 Span<float> lse, const MaskMod& mask_mod,
                                 const ScoreMod& score_mod) {
  constexpr bool kInt4 = std::is_same_v<K, std::uint8_t>;
  const char* const f = "attention";
  validate_paged_attention(f, q, kv.k_pages, kv.v_pages, kv.table, out, options, lse,
                           /*kv_values_per_element=*/kInt4 ? 2 : 1);
  validate_page_channel_keys(f, kv.k_pages, kv.k_scale_pages, kv.k_zero_pages, kv.table, q.batch,
                             q.seq, kInt4 ? -8.0f : -128.0f, kInt4 ? 7.0f : 127.0f);
  validate_page_scales(f, kVScalePagesNames, kv.v_scale_pages, kv.v_pages, kv.table, q.batch, q.seq,
                       kInt4 ? int4_groups(kv.v_pages.dim) : 1,
                       kInt4 ? kMaxInt4Scale : kMaxInt8Scale);
  const std::pair<const char*, AddressRange> scales[] = {
      {"k_scale_pages", tensor_range(kv.k_scale_pages)},
      {"k_zero_pages", tensor_range(kv.k_zero_pages)},
      {"v_scale_pages", tensor_range(kv.v_scale_pages)}};
  require_outputs_disjoint(f, tensor_range(out), lse, q.batch * q.heads * q.seq, scales);
  paged_attention_forward(q, kv.k_pages, kv.v_pages, kv.table, out, options, data_or_null(lse),
                          mask_mod, score_mod, [&](const std::int32_t* pages) {
                            return ChannelKeyKVHeads<K, SourceOf, PagedRows>(
                                kv.k_pages, kv.k_scale_pages, kv.k_zero_pages, kKeyBlockTokens,
                                kv.v_pages, kv.v_scale_pages, pages);
                          });
}

}  // namespace detail

/// Exact attention of float queries over a paged int8 cache with per-channel keys
/// (PagedChannelQuantizedKV): the pages hold ChannelQuantizedKV's format, read in place as
/// attention() on a ChannelQuantizedKV reads it (prefill dequantizes each K tile, decode scales
/// the queries per key block). Sequence b's out and lse are bitwise those of attention() on the
/// ChannelQuantizedKV of its gathered cache (keys, their block parameters and values gathered
/// page by page), with everything else as the PagedKV form. q and out float. Throws
/// std::invalid_argument as the PagedKV form, and also when page_size is not a multiple of 32,
/// k_scale_pages or k_zero_pages is not [num_pages, page_size / 32, H_kv, d] or null, the
/// parameters of a key block some sequence reaches are not finite or make a key non-finite, or
/// v_scale_pages fails the PagedQuantizedKV checks; nothing is written then. Checking reads the
/// parameters of every held block and the scale of every held token: O(Σ_b length_b·H_kv·
/// (1 + d/32)).
template <class QT, class OT, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention(TensorView<QT> q, const PagedChannelQuantizedKV& kv, TensorView<OT> out,
               const AttentionOptions& options = {}, Span<float> lse = {},
               const MaskMod& mask_mod = {}, const ScoreMod& score_mod = {}) {
  static_assert(std::is_same_v<std::remove_const_t<QT>, float> && std::is_same_v<OT, float>,
                "blockattn: an int8 paged cache (PagedChannelQuantizedKV) is read under float q "
                "and a writable float out (TensorView<float>)");
  detail::check_mods<float, MaskMod, ScoreMod>();
  detail::paged_channel_key_attention<std::int8_t, detail::ChannelQuantizedKVSource>(
      TensorView<const float>(q), kv, out, options, lse, mask_mod, score_mod);
}

/// Exact attention of float queries over a paged int4 cache (PagedInt4QuantizedKV): the pages
/// hold Int4QuantizedKV's format, read in place as attention() on an Int4QuantizedKV reads it.
/// Sequence b's out and lse are bitwise those of attention() on the Int4QuantizedKV of its
/// gathered cache (hence of the float call on its dequantize_kv()), with everything else as the
/// PagedKV form. q and out float. Throws std::invalid_argument as the PagedChannelQuantizedKV
/// form (page_size a multiple of 32, the key block parameters for q in [−8, 7]), and also when
/// v_scale_pages is not [num_pages, page_size, H_kv, ceil(d_v / 32)] or null, or a group scale of
/// a held token is not finite or has |scale|·8 beyond float; nothing is written then. Checking:
/// O(Σ_b length_b·H_kv·(d/32 + d_v/32)).
template <class QT, class OT, class MaskMod = NoMaskMod, class ScoreMod = NoScoreMod>
void attention(TensorView<QT> q, const PagedInt4QuantizedKV& kv, TensorView<OT> out,
               const AttentionOptions& options = {}, Span<float> lse = {},
               const MaskMod& mask_mod = {}, const ScoreMod& score_mod = {}) {
  static_assert(std::is_same_v<std::remove_const_t<QT>, float> && std::is_same_v<OT, float>,
                "blockattn: an int4 paged cache (PagedInt4QuantizedKV) is read under float q and "
                "a writable float out (TensorView<float>)");
  detail::check_mods<float, MaskMod, ScoreMod>();
  detail::paged_channel_key_attention<std::uint8_t, detail::Int4KVSource>(
      TensorView<const float>(q), kv, out, options, lse, mask_mod, score_mod);
}

}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
