// attention() over a paged K/V cache (PagedKV: a pool of pages, each sequence's page list in
// vLLM's, FlashInfer's or OpenVINO's format). Oracle: paging must not change a bit. Sequence b of
// a paged call must equal, bit for bit (out and lse), the contiguous attention() on its gathered
// cache [1, length_b, H_kv, d] in the pool's layout (BSHD for [pages, page_size, H_kv, d] pools,
// BHSD for head-major ones), with batch entry b's q, out, lse and key length, and the user's
// mask_mod / score_mod seeing batch index b — for each table format, both pool layouts, float,
// bfloat16 and half pools, 1 and 2 threads, both kernels (decode: at most 8 rows per kv head,
// rows read in place and split at page ends; prefill: K/V packed per tile across pages), pages in
// shuffled order, page sizes 1, 5 and 16, lengths not multiples of the page size, one token, GQA,
// n_q ≠ n_k, every mask, key segments (> 8192 keys) and non-finite values (the NaN slow path).
// int8 pools (PagedQuantizedKV) against attention() on the QuantizedKV of the gathered int8
// values and scales, likewise. Bad tables and scales: std::invalid_argument naming the argument
// and the sizes, out untouched.
// EIGEN_RUNTIME_NO_MALLOC: the no-malloc check of the last test (detail::NoMallocScope).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <blockattn/paged_kv.hpp>

#include "support/bits.hpp"
#include "support/page_tables.hpp"
#include "support/random.hpp"
#include "support/requires_malloc_guard.hpp"

namespace paged_kv_test {
namespace {
using blockattn::test::count;
using blockattn::test::same_bits;

using blockattn::AttentionOptions;
using blockattn::Index;
using blockattn::PagedKV;
using blockattn::TensorView;
using blockattn::test::make_rng;
using blockattn::test::seed_trace;

using Format = blockattn::test::PageTableFormat;
using blockattn::test::name_of;

struct Shape {
  std::vector<Index> lengths;  // per sequence, the n_q new tokens included (>= n_q)
  Index n_q = 1;
  Index heads = 1;
  Index kv_heads = 1;
  Index d = 1;
  Index d_v = 1;
  Index page_size = 16;
  bool head_major = false;  // pool [pages, H_kv, page_size, d] instead of [pages, page_size, …]
};

/// A pool of pages (pages in shuffled order, a few unused) holding every sequence's keys and
/// values, its page lists in the three formats, and q.
template <class S>
struct Problem : blockattn::test::PageTables {
  Shape s;
  Index batch = 0;
  std::vector<float> q;
  static constexpr bool kInt8 = std::is_same_v<S, std::int8_t>;
  std::vector<S> k_pool, v_pool;
  std::vector<float> k_scale_pool, v_scale_pool;  // int8 only: [pages, page_size, H_kv, 1]

  Problem(const Shape& shape, std::mt19937_64& rng)
      : PageTables(shape.lengths, shape.n_q, shape.page_size, rng), s(shape) {
    batch = static_cast<Index>(s.lengths.size());
    std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
    const auto fill = [&](auto& x, Index n) {
      x.resize(count(n));
      for (auto& e : x) e = static_cast<std::remove_reference_t<decltype(e)>>(dist(rng));
    };
    fill(q, batch * s.n_q * s.heads * s.d);
    if constexpr (kInt8) {  // int8 values and one positive scale per row
      std::uniform_int_distribution<int> value(-127, 127);
      std::uniform_real_distribution<float> scale(0.001f, 0.05f);
      const auto fill8 = [&](std::vector<S>& x, std::vector<float>& sc, Index dim) {
        x.resize(count(num_pages * s.page_size * s.kv_heads * dim));
        for (auto& e : x) e = static_cast<S>(value(rng));
        sc.resize(count(num_pages * s.page_size * s.kv_heads));
        for (float& e : sc) e = scale(rng);
      };
      fill8(k_pool, k_scale_pool, s.d);
      fill8(v_pool, v_scale_pool, s.d_v);
    } else {
      fill(k_pool, num_pages * s.page_size * s.kv_heads * s.d);
      fill(v_pool, num_pages * s.page_size * s.kv_heads * s.d_v);
    }
  }

  template <class X>
  TensorView<const X> pool(const std::vector<X>& x, Index dim) const {
    if (s.head_major) {
      return blockattn::make_tensor_view_bhsd(x.data(), num_pages, s.page_size, s.kv_heads, dim);
    }
    return blockattn::make_tensor_view(x.data(), num_pages, s.page_size, s.kv_heads, dim);
  }
  auto cache(Format f) const {
    if constexpr (kInt8) {
      return blockattn::PagedQuantizedKV{pool(k_pool, s.d), pool(k_scale_pool, 1),
                                         pool(v_pool, s.d_v), pool(v_scale_pool, 1), table(f)};
    } else {
      return PagedKV<S>{pool(k_pool, s.d), pool(v_pool, s.d_v), table(f)};
    }
  }
  TensorView<const float> qv() const {
    return blockattn::make_tensor_view<const float>(q.data(), batch, s.n_q, s.heads, s.d);
  }
  TensorView<float> outv(std::vector<float>& x) const {
    return blockattn::make_tensor_view(x.data(), batch, s.n_q, s.heads, s.d_v);
  }
  std::size_t out_size() const { return count(batch * s.n_q * s.heads * s.d_v); }
  std::size_t lse_size() const { return count(batch * s.heads * s.n_q); }

  /// Sequence b's gathered cache [1, length, H_kv, dim] in the pool's layout.
  template <class X>
  std::vector<X> gather(const std::vector<X>& x, Index dim, Index b) const {
    const Index n = s.lengths[count(b)];
    std::vector<X> out(count(n * s.kv_heads * dim));
    const TensorView<const X> from = pool(x, dim);
    const TensorView<X> to = contiguous(out.data(), n, dim);
    for (Index t = 0; t < n; ++t) {
      const Index page = lists[count(b)][count(t / s.page_size)];
      for (Index h = 0; h < s.kv_heads; ++h) {
        std::copy_n(from.at(page, t % s.page_size, h), dim, to.at(0, t, h));
      }
    }
    return out;
  }
  template <class T>
  TensorView<T> contiguous(T* data, Index n, Index dim) const {
    return s.head_major ? blockattn::make_tensor_view_bhsd(data, 1, n, s.kv_heads, dim)
                        : blockattn::make_tensor_view(data, 1, n, s.kv_heads, dim);
  }
};

/// The contiguous calls, one per sequence on its gathered cache, then the paged call in every
/// table format with 1 and 2 threads (2: with a Workspace): bitwise the same out and lse.
template <class S, class MaskMod = blockattn::NoMaskMod, class ScoreMod = blockattn::NoScoreMod>
void check_bitwise(const Problem<S>& p, AttentionOptions options, const MaskMod& mask_mod = {},
                   const ScoreMod& score_mod = {}) {
  const Shape& s = p.s;
  std::vector<float> out_c(p.out_size());
  std::vector<float> lse_c(p.lse_size());
  options.threads = 1;
  for (Index b = 0; b < p.batch; ++b) {
    const std::vector<S> k = p.gather(p.k_pool, s.d, b);
    const std::vector<S> v = p.gather(p.v_pool, s.d_v, b);
    const Index n = s.lengths[count(b)];
    AttentionOptions ob = options;
    if (!options.key_lengths.empty()) ob.key_lengths = {options.key_lengths.data() + b, 1};
    const auto q_b = blockattn::make_tensor_view<const float>(
        p.q.data() + b * s.n_q * s.heads * s.d, 1, s.n_q, s.heads, s.d);
    const auto out_b = blockattn::make_tensor_view(out_c.data() + b * s.n_q * s.heads * s.d_v, 1,
                                                   s.n_q, s.heads, s.d_v);
    const blockattn::Span<float> lse_b(lse_c.data() + b * s.heads * s.n_q, s.heads * s.n_q);
    const auto k_b = p.contiguous(k.data(), n, s.d);
    const auto v_b = p.contiguous(v.data(), n, s.d_v);
    // The contiguous call in the same format: a QuantizedKV of the gathered int8 values and
    // scales for an int8 pool, else the gathered K and V.
    std::vector<float> k_scale, v_scale;
    if constexpr (Problem<S>::kInt8) {
      k_scale = p.gather(p.k_scale_pool, 1, b);
      v_scale = p.gather(p.v_scale_pool, 1, b);
    }
    const auto call = [&](const auto&... mods) {
      if constexpr (Problem<S>::kInt8) {
        const blockattn::QuantizedKV kv{
            TensorView<const S>(k_b), TensorView<const float>(p.contiguous(k_scale.data(), n, 1)),
            TensorView<const S>(v_b), TensorView<const float>(p.contiguous(v_scale.data(), n, 1))};
        blockattn::attention(q_b, kv, out_b, ob, lse_b, mods...);
      } else {
        blockattn::attention(q_b, TensorView<const S>(k_b), TensorView<const S>(v_b), out_b, ob,
                             lse_b, mods...);
      }
    };
    if constexpr (std::is_same_v<MaskMod, blockattn::NoMaskMod>) {
      if constexpr (std::is_same_v<ScoreMod, blockattn::NoScoreMod>) {
        call();
      } else {
        call(blockattn::NoMaskMod{},
             [&](float x, Index, Index h, Index i, Index j) { return score_mod(x, b, h, i, j); });
      }
    } else {
      const auto mask_b = [&](Index, Index h, Index i, Index j) { return mask_mod(b, h, i, j); };
      if constexpr (blockattn::detail::HasClassifyBlock<MaskMod>::value) {
        const auto classify_b = [&](Index, Index h, Index q0, Index q_end, Index k0, Index k_end) {
          return mask_mod.classify_block(b, h, q0, q_end, k0, k_end);
        };
        call(blockattn::classified_mask_mod(mask_b, classify_b));
      } else {
        call(mask_b);
      }
    }
  }
  blockattn::Workspace workspace;
  for (const Format f : {Format::VLLM, Format::FlashInfer, Format::OpenVINO}) {
    for (const int threads : {1, 2}) {
      SCOPED_TRACE(std::string(name_of(f)) + " threads=" + std::to_string(threads));
      options.threads = threads;
      options.workspace = threads == 2 ? &workspace : nullptr;
      std::vector<float> out(p.out_size(), 7.0f);
      std::vector<float> lse(p.lse_size(), 7.0f);
      blockattn::attention(p.qv(), p.cache(f), p.outv(out), options, lse, mask_mod, score_mod);
      EXPECT_TRUE(same_bits(out, out_c)) << "paged out is not the contiguous call's";
      EXPECT_TRUE(same_bits(lse, lse_c)) << "paged lse is not the contiguous call's";
    }
  }
}

struct Case {
  Shape shape;
  bool causal = false;
  Index window = -1;
  Index key_chunk = 0;
  bool key_lengths = false;
  bool alibi = false;
  double softcap = 0;
  bool non_finite = false;  // an inf and a NaN in V (a hidden key's and a visible one's)
  bool sinks = false;       // options.sinks, one logit per query head
};

std::string describe(const Shape& s) {
  std::string lengths;
  for (const Index n : s.lengths) lengths += std::to_string(n) + ",";
  return "lengths=" + lengths + " n_q=" + std::to_string(s.n_q) +
         " heads=" + std::to_string(s.heads) + "/" + std::to_string(s.kv_heads) +
         " d=" + std::to_string(s.d) + "/" + std::to_string(s.d_v) +
         " page_size=" + std::to_string(s.page_size) + (s.head_major ? " HND" : " NHD");
}

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      // decode, batched, lengths not multiples of the page size, one token
      {{{37, 1, 16, 100}, 1, 8, 8, 64, 64, 16}},
      {{{37, 1, 16, 100}, 1, 8, 8, 64, 64, 16, true}},
      {{{37, 1, 16, 100}, 1, 8, 2, 33, 17, 5, true}, false, -1, 8},  // GQA, chunks cross pages
      {{{3, 50}, 1, 4, 1, 16, 16, 1}, true, 7},                      // page size 1, MQA, window
      {{{9000, 300}, 1, 4, 2, 16, 16, 16}},            // key segments, heads interleave
      {{{9000, 300}, 2, 2, 1, 8, 8, 16, true}, true},  // segments, head-major, causal
      {{{200, 120}, 3, 2, 2, 24, 24, 5}, true, -1, 0, true, true, 30.0},  // padding, alibi, cap
      {{{60, 90}, 1, 2, 1, 16, 16, 16}, false, 10, 16, false, false, 0, true},  // NaN slow path
      // chunked prefill: the chunk's queries see the cached pages and themselves
      {{{45, 120}, 20, 4, 2, 16, 16, 16}, true},
      {{{45, 120}, 20, 4, 2, 16, 16, 16, true}, true, -1, 24},
      {{{70, 33}, 30, 2, 2, 19, 21, 5}, true, 10, 0, true},  // window, padding, odd d
      {{{100, 12}, 12, 2, 2, 16, 16, 1, true}, false, -1, 0, false, true},    // page size 1
      {{{80, 64}, 16, 2, 1, 16, 16, 16}, true, 6, 0, false, false, 0, true},  // NaN slow path
      // attention sinks, folded after the segment merge (decode) and per query block (prefill)
      {{{9000, 300}, 1, 4, 2, 16, 16, 16}, false, -1, 0, false, false, 0, false, true},
      {{{45, 120}, 20, 4, 2, 16, 16, 5}, true, -1, 0, true, false, 0, false, true},
  };
  return all;
}

template <class S>
void run_cases(std::uint64_t salt) {
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(salt);
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c.shape));
    Problem<S> p(c.shape, rng);
    if (c.non_finite && !Problem<S>::kInt8) {
      // Sequence 0: key n−12 (inf; hidden from the last queries by the window) and key n−10 (NaN,
      // visible) in one chunk with hidden keys: the slow path. Sequence 1: key n−2 (NaN, visible).
      const auto set = [&](Index b, Index t, float x) {
        const Index page = p.lists[count(b)][count(t / c.shape.page_size)];
        *const_cast<S*>(p.pool(p.v_pool, c.shape.d_v).at(page, t % c.shape.page_size, 0) + 1) =
            static_cast<S>(x);
      };
      set(0, c.shape.lengths[0] - 12, std::numeric_limits<float>::infinity());
      set(0, c.shape.lengths[0] - 10, std::numeric_limits<float>::quiet_NaN());
      set(1, c.shape.lengths[1] - 2, std::numeric_limits<float>::quiet_NaN());
    }
    AttentionOptions options;
    options.causal = c.causal;
    options.window_left = c.window;
    options.key_chunk = c.key_chunk;
    options.softcap = c.softcap;
    std::vector<Index> lengths;
    if (c.key_lengths) {
      for (const Index n : c.shape.lengths) lengths.push_back(std::max<Index>(0, n - 3));
      options.key_lengths = lengths;
    }
    std::vector<double> slopes;
    if (c.alibi) {
      for (Index h = 0; h < c.shape.heads; ++h) slopes.push_back(0.25 / double(h + 1));
      options.alibi_slopes = slopes;
    }
    std::vector<double> sinks;
    if (c.sinks) {
      for (Index h = 0; h < c.shape.heads; ++h) sinks.push_back(h % 2 == 0 ? 0.5 : 3.0);
      options.sinks = sinks;
    }
    check_bitwise(p, options);
  }
}

TEST(PagedKVTest, FloatPoolEqualsTheContiguousCall) { run_cases<float>(1901); }
TEST(PagedKVTest, BFloat16PoolEqualsTheContiguousCall) { run_cases<Eigen::bfloat16>(1902); }
TEST(PagedKVTest, HalfPoolEqualsTheContiguousCall) { run_cases<Eigen::half>(1903); }
// An int8 pool (PagedQuantizedKV): bitwise the QuantizedKV call on the gathered int8 cache.
TEST(PagedKVTest, Int8PoolEqualsTheContiguousCall) { run_cases<std::int8_t>(1907); }

// bf16 q and out over bf16 pages, prefill and decode: the pages widen to float (no bf16-pair
// packing for pages, so no dot path even on AVX512_BF16 builds), q widens exactly and out is
// rounded once, so out is bitwise the float-q call's out rounded to bf16, and lse its lse.
TEST(PagedKVTest, BFloat16QueriesOverBFloat16PagesRoundTheFloatCallOnce) {
  auto rng = make_rng(1908);
  for (const Index n_q : {1, 20}) {
    Shape s;
    s.lengths = {37, 20, 64};
    s.n_q = n_q;
    s.heads = 4;
    s.kv_heads = 2;
    s.d = 32;
    s.d_v = 16;
    s.page_size = 8;
    Problem<Eigen::bfloat16> p(s, rng);
    std::vector<Eigen::bfloat16> q16(p.q.size());
    for (std::size_t i = 0; i < q16.size(); ++i) {
      q16[i] = Eigen::bfloat16(p.q[i]);
      p.q[i] = static_cast<float>(q16[i]);
    }
    AttentionOptions options;
    options.causal = true;
    std::vector<float> out(p.out_size()), lse(p.lse_size());
    blockattn::attention(p.qv(), p.cache(Format::VLLM), p.outv(out), options, lse);
    std::vector<Eigen::bfloat16> out16(p.out_size());
    std::vector<float> lse16(p.lse_size());
    blockattn::attention(
        blockattn::make_tensor_view<const Eigen::bfloat16>(q16.data(), p.batch, n_q, 4, 32),
        p.cache(Format::VLLM), blockattn::make_tensor_view(out16.data(), p.batch, n_q, 4, 16),
        options, lse16);
    for (std::size_t i = 0; i < out.size(); ++i) {
      const Eigen::bfloat16 want(out[i]);
      ASSERT_EQ(Eigen::numext::bit_cast<std::uint16_t>(out16[i]),
                Eigen::numext::bit_cast<std::uint16_t>(want))
          << "n_q=" << n_q << " i=" << i;
    }
    EXPECT_TRUE(same_bits(lse, lse16)) << "n_q=" << n_q;
  }
}

// A user mask_mod (with and without a block classifier) and score_mod see the batch index of the
// whole call.
TEST(PagedKVTest, MaskModAndScoreModSeeTheSequence) {
  auto rng = make_rng(1904);
  const auto mask = [](Index b, Index h, Index i, Index j) {
    return !(b == 1 && j >= 64) && (i + j + h + 2 * b) % 5 != 0;
  };
  const auto score = [](float x, Index b, Index h, Index, Index j) {
    return x + 0.01f * static_cast<float>(b + h) - 0.001f * static_cast<float>(j % 7);
  };
  const auto classify = [](Index b, Index, Index, Index, Index k0, Index) {
    return b == 1 && k0 >= 64 ? blockattn::BlockVisibility::Empty
                              : blockattn::BlockVisibility::Partial;
  };
  for (const Shape& s : {Shape{{90, 131, 40}, 12, 4, 2, 32, 32, 16},
                         Shape{{90, 131, 40}, 1, 4, 2, 32, 32, 5, true}}) {
    SCOPED_TRACE(describe(s));
    const Problem<float> p(s, rng);
    check_bitwise(p, AttentionOptions{}, mask);
    check_bitwise(p, AttentionOptions{}, blockattn::classified_mask_mod(mask, classify));
    check_bitwise(p, AttentionOptions{}, blockattn::NoMaskMod{}, score);
  }
}

// Bad page tables and pools: std::invalid_argument naming the argument and the sizes, out
// untouched. One row per error, each a change to a valid problem.
TEST(PagedKVTest, ValidationNamesTheArgument) {
  auto rng = make_rng(1905);
  Problem<float> p({{20, 7}, 1, 2, 1, 8, 8, 4}, rng);  // 5 + 2 pages (+3 unused) of 4 tokens
  struct Row {
    const char* what;
    Format format;
    std::function<void(Problem<float>&, PagedKV<float>&)> change;
    const char* message;
  };
  const std::vector<Row> rows = {
      {"page id past the pool", Format::VLLM,
       [](Problem<float>& q, PagedKV<float>&) { q.block_tables[1] = 10; },
       "page 1 of sequence 0 is 10 but k_pages has 10 pages"},
      {"negative page id", Format::FlashInfer,
       [](Problem<float>& q, PagedKV<float>&) { q.indices[5] = -1; },
       "page 0 of sequence 1 is -1 but k_pages has 10 pages"},
      {"table row shorter than the length", Format::VLLM,
       [](Problem<float>& q, PagedKV<float>&) { q.seq_lens[1] = 40; },
       "sequence 1 has 40 tokens (10 pages of 4) but its page list in block_tables holds 6"},
      {"length beyond the pool", Format::VLLM,
       [](Problem<float>& q, PagedKV<float>&) { q.seq_lens[0] = 41; },
       "sequence 0 has 41 tokens but the pool holds 10 pages of 4 (40 tokens)"},
      {"negative length", Format::VLLM,
       [](Problem<float>& q, PagedKV<float>&) { q.seq_lens[0] = -2; },
       "seq_lens[0] is -2 but must be >= 0"},
      {"OpenVINO past_lens beyond its blocks", Format::OpenVINO,
       [](Problem<float>& q, PagedKV<float>&) { q.past_lens[1] = 8; },
       "sequence 1 has 9 tokens (3 pages of 4) but its page list in block_indices holds 2"},
      {"decreasing indptr", Format::FlashInfer,
       [](Problem<float>& q, PagedKV<float>&) { q.indptr[2] = 4; },
       "indptr[2] is 4 but indptr[1] is 5"},
      {"begins past the indices", Format::OpenVINO,
       [](Problem<float>& q, PagedKV<float>&) { q.begins[2] = 9; },
       "block_indices_begins[2] is 9 but must be in [0, 7]"},
      {"negative indptr", Format::FlashInfer,
       [](Problem<float>& q, PagedKV<float>&) { q.indptr[0] = -1; },
       "indptr[0] is -1 but must be in [0, 7]"},
      {"last_page_len past the page", Format::FlashInfer,
       [](Problem<float>& q, PagedKV<float>&) { q.last_page_len[0] = 5; },
       "last_page_len[0] is 5 but sequence 0 has 5 pages of 4 tokens"},
      {"short seq_lens", Format::VLLM,
       [](Problem<float>& q, PagedKV<float>&) { q.seq_lens.pop_back(); },
       "seq_lens.size() is 1 but q.batch is 2"},
      {"short indptr", Format::FlashInfer,
       [](Problem<float>& q, PagedKV<float>&) { q.indptr.pop_back(); },
       "indptr.size() is 2 but q.batch + 1 is 3"},
      {"short block_tables", Format::VLLM,
       [](Problem<float>& q, PagedKV<float>&) { q.block_tables.pop_back(); },
       "block_tables.size() is 11 but q.batch·max_pages is 12"},
      {"value pages of another size", Format::VLLM,
       [](Problem<float>&, PagedKV<float>& kv) { kv.v_pages.seq = 8; },
       "v_pages.seq is 8 but k_pages.seq is 4"},
      {"key dim", Format::VLLM, [](Problem<float>&, PagedKV<float>& kv) { kv.k_pages.dim = 7; },
       "k_pages.dim is 7 but q.dim is 8"},
      {"page size 0", Format::VLLM,
       [](Problem<float>&, PagedKV<float>& kv) {
         kv.k_pages.seq = 0;
         kv.v_pages.seq = 0;
       },
       "k_pages.seq (the page size) is 0"},
  };
  for (const Row& row : rows) {
    SCOPED_TRACE(row.what);
    Problem<float> bad = p;
    PagedKV<float> kv = bad.cache(row.format);
    row.change(bad, kv);
    kv.table = bad.table(row.format);  // the changed vectors (pop_back may move nothing)
    std::vector<float> out(p.out_size(), 3.0f);
    std::vector<float> lse(p.lse_size(), 3.0f);
    EXPECT_THAT([&] { blockattn::attention(bad.qv(), kv, bad.outv(out), AttentionOptions{}, lse); },
                ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr(row.message)));
    for (const float e : out) ASSERT_EQ(e, 3.0f);
    for (const float e : lse) ASSERT_EQ(e, 3.0f);
  }
  // options.key_lengths beyond a sequence's own length.
  const std::vector<Index> key_lengths = {20, 8};
  AttentionOptions options;
  options.key_lengths = key_lengths;
  std::vector<float> out(p.out_size(), 3.0f);
  EXPECT_THAT([&] { blockattn::attention(p.qv(), p.cache(Format::VLLM), p.outv(out), options); },
              ::testing::ThrowsMessage<std::invalid_argument>(
                  ::testing::HasSubstr("options.key_lengths[1] is 8 but sequence 1 has 7 tokens")));
  // out over a page table.
  std::vector<float> shared(64);
  PagedKV<float> kv = p.cache(Format::VLLM);
  kv.table.pages = {reinterpret_cast<const std::int32_t*>(shared.data()), 12};
  EXPECT_THAT(
      [&] {
        blockattn::attention(p.qv(), kv, blockattn::make_tensor_view(shared.data(), 2, 1, 2, 8));
      },
      ::testing::ThrowsMessage<std::invalid_argument>(
          ::testing::HasSubstr("out overlaps the memory of block_tables")));
}

// An int8 pool's scales: sizes, and a non-finite or too large scale of a token some sequence
// holds is rejected naming the pool element, token and sequence, out untouched; a NaN scale in
// a page no sequence reaches is not read.
TEST(PagedKVTest, Int8ValidationNamesTheScale) {
  auto rng = make_rng(1908);
  Problem<std::int8_t> p({{20, 7}, 1, 2, 1, 8, 8, 4}, rng);  // 5 + 2 pages (+3 unused) of 4 tokens
  const auto expect_error = [&](const blockattn::PagedQuantizedKV& kv, const std::string& message) {
    std::vector<float> out(p.out_size(), 3.0f);
    EXPECT_THAT([&] { blockattn::attention(p.qv(), kv, p.outv(out)); },
                ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr(message)));
    for (const float e : out) ASSERT_EQ(e, 3.0f);
  };
  blockattn::PagedQuantizedKV kv = p.cache(Format::VLLM);
  kv.v_scale_pages.seq = 3;
  expect_error(kv, "v_scale_pages.seq is 3 but v_pages.seq is 4");
  kv = p.cache(Format::VLLM);
  kv.k_scale_pages.dim = 2;
  expect_error(kv, "k_scale_pages.dim is 2 but 1 is 1");
  kv = p.cache(Format::VLLM);
  kv.k_scale_pages.data = nullptr;
  expect_error(kv, "k_scale_pages.data is null but sequence 0 holds 20 tokens");
  // Token 6 of sequence 1: page lists[1][1], row 2.
  const Index page = p.lists[1][1];
  const std::size_t at = count(page * 4 + 2);  // [page, row 2, head 0]
  p.v_scale_pool[at] = std::numeric_limits<float>::quiet_NaN();
  expect_error(p.cache(Format::FlashInfer),
               "v_scale_pages[" + std::to_string(page) + ", 2, 0] (token 6 of sequence 1) is nan");
  p.v_scale_pool[at] = std::numeric_limits<float>::max() / 64;
  expect_error(p.cache(Format::OpenVINO), "(token 6 of sequence 1) is");
  p.v_scale_pool[at] = 0.01f;
  // Row 3 of that page is past sequence 1's 7 tokens, and every row of an unused page: not read.
  p.v_scale_pool[at + 1] = std::numeric_limits<float>::quiet_NaN();
  std::vector<std::int32_t> used(p.indices);
  std::sort(used.begin(), used.end());
  Index unused = 0;
  while (std::binary_search(used.begin(), used.end(), static_cast<std::int32_t>(unused))) ++unused;
  p.k_scale_pool[count(unused * 4)] = std::numeric_limits<float>::infinity();
  std::vector<float> out(p.out_size());
  EXPECT_NO_THROW(blockattn::attention(p.qv(), p.cache(Format::VLLM), p.outv(out)));
  for (const float e : out) ASSERT_TRUE(std::isfinite(e));
}

// With a caller's Workspace, a second paged decode call, a chunked prefill call and an int8
// decode call allocate nothing: validation (the scale scan too), the loops and the merge of key
// segments.
TEST(PagedKVTest, SecondCallWithAWorkspaceAllocatesNothing) {
  auto rng = make_rng(1906);
  const Problem<float> decode({{9000, 100, 2000}, 1, 4, 2, 64, 64, 16}, rng);
  const Problem<float> prefill({{300, 120}, 100, 4, 2, 64, 64, 16, true}, rng);
  const Problem<std::int8_t> int8({{3000, 40}, 1, 4, 2, 64, 64, 16}, rng);
  blockattn::Workspace workspace;
  AttentionOptions options;
  options.threads = 1;
  options.workspace = &workspace;
  options.causal = true;
  std::vector<float> out_d(decode.out_size()), out_p(prefill.out_size()), out_8(int8.out_size());
  std::vector<float> lse_d(decode.lse_size());
  blockattn::attention(decode.qv(), decode.cache(Format::FlashInfer), decode.outv(out_d), options,
                       lse_d);
  blockattn::attention(prefill.qv(), prefill.cache(Format::VLLM), prefill.outv(out_p), options);
  blockattn::attention(int8.qv(), int8.cache(Format::OpenVINO), int8.outv(out_8), options);
  const std::vector<float> first_d = out_d, first_p = out_p, first_8 = out_8;
  {
    const blockattn::detail::NoMallocScope no_malloc;  // aborts on an allocation
    blockattn::attention(decode.qv(), decode.cache(Format::FlashInfer), decode.outv(out_d), options,
                         lse_d);
    blockattn::attention(prefill.qv(), prefill.cache(Format::VLLM), prefill.outv(out_p), options);
    blockattn::attention(int8.qv(), int8.cache(Format::OpenVINO), int8.outv(out_8), options);
  }
  EXPECT_TRUE(same_bits(out_d, first_d));
  EXPECT_TRUE(same_bits(out_p, first_p));
  EXPECT_TRUE(same_bits(out_8, first_8));
}

}  // namespace

}  // namespace paged_kv_test
