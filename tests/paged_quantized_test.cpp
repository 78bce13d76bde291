// attention() over paged caches with per-channel keys: PagedChannelQuantizedKV (int8 keys with a
// scale and zero point per 32-token block, kv head and channel; int8 values with a scale per
// token) and PagedInt4QuantizedKV (int4 keys likewise; q4_0 values in groups of 32 channels).
// Oracle: paging must not change a bit. Sequence b of a paged call must equal, bit for bit (out
// and lse), attention() on the ChannelQuantizedKV / Int4QuantizedKV of its gathered cache (keys,
// their block parameters, values and value scales, in the pool's layout) with batch entry b's q,
// out and lse — for each table format (vLLM, FlashInfer, OpenVINO), both pool layouts, 1 and 2
// threads, decode (at most 8 rows per kv head: per-block scaled queries for int8 keys, runs of
// dequantized rows for int4) and prefill (K/V tiles packed across pages), GQA, a causal chunk of
// n_q > 1 aligned bottom-right, lengths that are not multiples of 32 or of the page size, shuffled
// page ids, key segments (> 8192 keys). The caches are written by quantize_kv (keys in two
// appends, so that open blocks are re-quantized). Appending in place through page slices gives
// the same bytes as appending to the contiguous cache. Bad input (page_size not a multiple of 32,
// parameter pools of the wrong size, a non-finite scale or zero point of a block some sequence
// reaches): std::invalid_argument naming the argument, out untouched.
// EIGEN_RUNTIME_NO_MALLOC: the no-malloc check of the last test (detail::NoMallocScope).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <blockattn/paged_kv.hpp>

#include "support/bits.hpp"
#include "support/page_tables.hpp"
#include "support/random.hpp"
#include "support/requires_malloc_guard.hpp"

namespace paged_quantized_test {
namespace {
using blockattn::test::count;
using blockattn::test::same_bits;

using blockattn::AttentionOptions;
using blockattn::Index;
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
  Index page_size = 32;
  bool head_major = false;  // pools [pages, H_kv, rows, dim] instead of [pages, rows, H_kv, dim]
};

/// A [n, seq, heads, dim] view of `data` whose rows are `row` elements (dim, or ceil(dim / 2)
/// bytes of 4-bit values), sequence-major or head-major.
template <class T>
TensorView<T> view(T* data, Index n, Index seq, Index heads, Index dim, Index row,
                   bool head_major) {
  if (head_major) return TensorView<T>(data, n, seq, heads, dim, heads * seq * row, row, seq * row);
  return TensorView<T>(data, n, seq, heads, dim, seq * heads * row, heads * row, row);
}

/// Batch entry (page) p of a pool view, as a batch-1 view.
template <class T>
TensorView<T> page_of(TensorView<T> pool, Index p) {
  pool.data = pool.at(p, 0, 0);
  pool.batch = 1;
  return pool;
}

/// One format's storage: K, the type of k and v (int8, or bytes of 4-bit values).
template <bool kInt4>
struct Storage {
  using K = std::conditional_t<kInt4, std::uint8_t, std::int8_t>;
  static Index row(Index dim) { return kInt4 ? (dim + 1) / 2 : dim; }
  static Index value_scales(Index d_v) { return kInt4 ? (d_v + 31) / 32 : 1; }
};

/// One sequence's contiguous cache [1, n, H_kv, ·] in the problem's layout, and the paged pools
/// of all sequences (the same bytes, scattered over shuffled pages, a few unused).
template <bool kInt4>
struct Problem : blockattn::test::PageTables {
  using K = typename Storage<kInt4>::K;
  struct Cache {
    Index n = 0;
    std::vector<K> k, v;
    std::vector<float> k_scale, k_zero, v_scale;
  };
  Shape s;
  Index batch = 0;
  std::vector<float> q;
  std::vector<Cache> caches;
  std::vector<K> k_pool, v_pool;
  std::vector<float> k_scale_pool, k_zero_pool, v_scale_pool;

  Index blocks_per_page() const { return std::max<Index>(1, s.page_size / 32); }
  Index groups() const { return Storage<kInt4>::value_scales(s.d_v); }

  Problem(const Shape& shape, std::mt19937_64& rng)
      : PageTables(shape.lengths, shape.n_q, shape.page_size, rng), s(shape) {
    batch = static_cast<Index>(s.lengths.size());
    std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
    q.resize(count(batch * s.n_q * s.heads * s.d));
    for (float& e : q) e = dist(rng);
    const Index rk = Storage<kInt4>::row(s.d);
    const Index rv = Storage<kInt4>::row(s.d_v);
    const Index bpp = blocks_per_page();
    k_pool.assign(count(num_pages * s.page_size * s.kv_heads * rk), K(0));
    v_pool.assign(count(num_pages * s.page_size * s.kv_heads * rv), K(0));
    k_scale_pool.assign(count(num_pages * bpp * s.kv_heads * s.d), 0.0f);
    k_zero_pool = k_scale_pool;
    v_scale_pool.assign(count(num_pages * s.page_size * s.kv_heads * groups()), 0.0f);
    for (Index b = 0; b < batch; ++b) {
      const Index n = s.lengths[count(b)];
      // The contiguous cache, written by quantize_kv: keys in two appends (the second with a
      // wider range, so that the open block is re-quantized).
      Cache c;
      c.n = n;
      const Index nb = (n + 31) / 32;
      c.k.assign(count(n * s.kv_heads * rk), K(0));
      c.v.assign(count(n * s.kv_heads * rv), K(0));
      c.k_scale.assign(count(nb * s.kv_heads * s.d), 0.0f);
      c.k_zero = c.k_scale;
      c.v_scale.assign(count(n * s.kv_heads * groups()), 0.0f);
      std::vector<float> kf(count(n * s.kv_heads * s.d)), vf(count(n * s.kv_heads * s.d_v));
      for (float& e : kf) e = dist(rng);
      for (float& e : vf) e = dist(rng);
      const Index cut = n / 2;
      for (Index t = cut; t < n; ++t) {
        for (Index i = 0; i < s.kv_heads * s.d; ++i) kf[count(t * s.kv_heads * s.d + i)] *= 3.0f;
      }
      const auto kx = blockattn::make_tensor_view<const float>(kf.data(), 1, n, s.kv_heads, s.d);
      TensorView<const float> first = kx;
      first.seq = cut;
      TensorView<const float> second = kx;
      second.data = kx.at(0, cut, 0);
      second.seq = n - cut;
      blockattn::quantize_kv(first, 0, kview(c), kparams(c.k_scale, nb), kparams(c.k_zero, nb));
      blockattn::quantize_kv(second, cut, kview(c), kparams(c.k_scale, nb), kparams(c.k_zero, nb));
      blockattn::quantize_kv(
          blockattn::make_tensor_view<const float>(vf.data(), 1, n, s.kv_heads, s.d_v), vview(c),
          vscales(c.v_scale, n));
      // Scatter it over the sequence's pages.
      const auto& list = lists[count(b)];
      for (Index t = 0; t < n; ++t) {
        const Index page = list[count(t / s.page_size)];
        const Index row = t % s.page_size;
        for (Index h = 0; h < s.kv_heads; ++h) {
          std::copy_n(kview(c).at(0, t, h), rk, kpool().at(page, row, h));
          std::copy_n(vview(c).at(0, t, h), rv, vpool().at(page, row, h));
          std::copy_n(vscales(c.v_scale, n).at(0, t, h), groups(),
                      vscales(v_scale_pool, s.page_size, num_pages).at(page, row, h));
          if (t % 32 == 0) {
            const Index r = row / 32;
            std::copy_n(kparams(c.k_scale, nb).at(0, t / 32, h), s.d,
                        kparams(k_scale_pool, bpp, num_pages).at(page, r, h));
            std::copy_n(kparams(c.k_zero, nb).at(0, t / 32, h), s.d,
                        kparams(k_zero_pool, bpp, num_pages).at(page, r, h));
          }
        }
      }
      caches.push_back(std::move(c));
    }
  }

  // Views of a contiguous cache and of the pools, in the problem's layout.
  TensorView<K> kview(Cache& c) {
    return view(c.k.data(), 1, c.n, s.kv_heads, s.d, Storage<kInt4>::row(s.d), s.head_major);
  }
  TensorView<K> vview(Cache& c) {
    return view(c.v.data(), 1, c.n, s.kv_heads, s.d_v, Storage<kInt4>::row(s.d_v), s.head_major);
  }
  TensorView<float> kparams(std::vector<float>& x, Index blocks, Index n = 1) {
    return view(x.data(), n, blocks, s.kv_heads, s.d, s.d, s.head_major);
  }
  TensorView<float> vscales(std::vector<float>& x, Index rows, Index n = 1) {
    return view(x.data(), n, rows, s.kv_heads, groups(), groups(), s.head_major);
  }
  TensorView<K> kpool() {
    return view(k_pool.data(), num_pages, s.page_size, s.kv_heads, s.d, Storage<kInt4>::row(s.d),
                s.head_major);
  }
  TensorView<K> vpool() {
    return view(v_pool.data(), num_pages, s.page_size, s.kv_heads, s.d_v,
                Storage<kInt4>::row(s.d_v), s.head_major);
  }

  auto cache(Format f) {
    using Paged = std::conditional_t<kInt4, blockattn::PagedInt4QuantizedKV,
                                     blockattn::PagedChannelQuantizedKV>;
    return Paged{TensorView<const K>(kpool()),
                 TensorView<const float>(kparams(k_scale_pool, blocks_per_page(), num_pages)),
                 TensorView<const float>(kparams(k_zero_pool, blocks_per_page(), num_pages)),
                 TensorView<const K>(vpool()),
                 TensorView<const float>(vscales(v_scale_pool, s.page_size, num_pages)),
                 table(f)};
  }
  /// Sequence b's contiguous cache as the format's own struct.
  auto contiguous(Index b) {
    Cache& c = caches[count(b)];
    const Index nb = (c.n + 31) / 32;
    using Contiguous =
        std::conditional_t<kInt4, blockattn::Int4QuantizedKV, blockattn::ChannelQuantizedKV>;
    return Contiguous{TensorView<const K>(kview(c)),
                      TensorView<const float>(kparams(c.k_scale, nb)),
                      TensorView<const float>(kparams(c.k_zero, nb)), TensorView<const K>(vview(c)),
                      TensorView<const float>(vscales(c.v_scale, c.n))};
  }
  TensorView<const float> qv() const {
    return blockattn::make_tensor_view<const float>(q.data(), batch, s.n_q, s.heads, s.d);
  }
  TensorView<float> outv(std::vector<float>& x) const {
    return blockattn::make_tensor_view(x.data(), batch, s.n_q, s.heads, s.d_v);
  }
  std::size_t out_size() const { return count(batch * s.n_q * s.heads * s.d_v); }
  std::size_t lse_size() const { return count(batch * s.heads * s.n_q); }
};

/// The contiguous calls, one per sequence, then the paged call in every table format with 1 and
/// 2 threads (2: with a Workspace): bitwise the same out and lse.
template <bool kInt4>
void check_bitwise(Problem<kInt4>& p, AttentionOptions options) {
  const Shape& s = p.s;
  std::vector<float> out_c(p.out_size());
  std::vector<float> lse_c(p.lse_size());
  options.threads = 1;
  for (Index b = 0; b < p.batch; ++b) {
    const auto q_b = blockattn::make_tensor_view<const float>(
        p.q.data() + b * s.n_q * s.heads * s.d, 1, s.n_q, s.heads, s.d);
    const auto out_b = blockattn::make_tensor_view(out_c.data() + b * s.n_q * s.heads * s.d_v, 1,
                                                   s.n_q, s.heads, s.d_v);
    const blockattn::Span<float> lse_b(lse_c.data() + b * s.heads * s.n_q, s.heads * s.n_q);
    blockattn::attention(q_b, p.contiguous(b), out_b, options, lse_b);
  }
  blockattn::Workspace workspace;
  for (const Format f : {Format::VLLM, Format::FlashInfer, Format::OpenVINO}) {
    for (const int threads : {1, 2}) {
      SCOPED_TRACE(std::string(name_of(f)) + " threads=" + std::to_string(threads));
      options.threads = threads;
      options.workspace = threads == 2 ? &workspace : nullptr;
      std::vector<float> out(p.out_size(), 7.0f);
      std::vector<float> lse(p.lse_size(), 7.0f);
      blockattn::attention(p.qv(), p.cache(f), p.outv(out), options, lse);
      EXPECT_TRUE(same_bits(out, out_c)) << "paged out is not the contiguous call's";
      EXPECT_TRUE(same_bits(lse, lse_c)) << "paged lse is not the contiguous call's";
    }
  }
}

struct Case {
  Shape shape;
  bool causal = false;
  Index key_chunk = 0;
};

std::string describe(const Shape& s) {
  std::string lengths;
  for (const Index n : s.lengths) lengths += std::to_string(n) + ",";
  return "lengths=" + lengths + " n_q=" + std::to_string(s.n_q) +
         " heads=" + std::to_string(s.heads) + "/" + std::to_string(s.kv_heads) +
         " d=" + std::to_string(s.d) + "/" + std::to_string(s.d_v) +
         " page_size=" + std::to_string(s.page_size) + (s.head_major ? " HND" : " NHD");
}

template <bool kInt4>
void run_cases(std::uint64_t salt) {
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(salt);
  const Case cases[] = {
      // decode, GQA, odd head dims, lengths off the block and page grids, one token
      {{{37, 1, 64, 100}, 1, 8, 2, 40, 33, 32}},
      // decode, head-major pools of two key blocks per page, a key chunk off the block grid
      {{{95, 33}, 1, 4, 4, 64, 64, 64, true}, false, 24},
      // decode of two causal rows per query head (8 rows per kv head), one kv head: the
      // contiguous call pipelines its P·V, the paged one does not (the same bits)
      {{{200, 50}, 2, 4, 1, 32, 32, 32}, true},
      // key segments (> 8192 keys)
      {{{9000, 300}, 1, 4, 2, 16, 16, 64}},
      // causal chunked prefill: the chunk's queries see the cached pages and themselves
      {{{45, 120}, 20, 4, 2, 16, 24, 32}, true},
      {{{70, 130}, 40, 2, 1, 24, 16, 64, true}, true, 24},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(describe(c.shape));
    Problem<kInt4> p(c.shape, rng);
    AttentionOptions options;
    options.causal = c.causal;
    options.key_chunk = c.key_chunk;
    check_bitwise(p, options);
  }
}

TEST(PagedQuantizedTest, ChannelInt8PoolEqualsTheContiguousCall) { run_cases<false>(2101); }
TEST(PagedQuantizedTest, Int4PoolEqualsTheContiguousCall) { run_cases<true>(2102); }

template <bool kInt4>
void check_validation(std::uint64_t salt) {
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(salt);
  Problem<kInt4> p({{70, 20}, 1, 2, 1, 8, 8, 64}, rng);  // 2 + 1 pages (+3 unused) of 64 tokens
  const auto expect_error = [&](const auto& kv, const std::string& message) {
    std::vector<float> out(p.out_size(), 3.0f);
    EXPECT_THAT([&] { blockattn::attention(p.qv(), kv, p.outv(out)); },
                ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr(message)));
    for (const float e : out) ASSERT_EQ(e, 3.0f);
  };
  auto kv = p.cache(Format::VLLM);
  kv.k_pages.seq = kv.v_pages.seq = 48;
  kv.k_scale_pages.seq = kv.k_zero_pages.seq = kv.v_scale_pages.seq = 1;
  expect_error(kv, "page_size (k_pages.seq) is 48 but must be a multiple of 32");
  kv = p.cache(Format::VLLM);
  kv.k_scale_pages.seq = 3;
  expect_error(kv, "k_scale_pages.seq is 3 but page_size / 32 is 2");
  kv = p.cache(Format::VLLM);
  kv.k_zero_pages.dim = 4;
  expect_error(kv, "k_zero_pages.dim is 4 but k_pages.dim is 8");
  kv = p.cache(Format::VLLM);
  kv.k_zero_pages.data = nullptr;
  expect_error(kv, "k_zero_pages.data is null but sequence 0 holds 70 tokens");
  kv = p.cache(Format::VLLM);
  kv.v_scale_pages.dim = 2;
  expect_error(kv, "v_scale_pages.dim is 2");
  // Block 2 of sequence 0 (tokens 64..69): page lists[0][1], block row 0.
  const Index page = p.lists[0][1];
  const std::size_t at = count(page * 2 * 8 + 5);  // [page, block 0, head 0, channel 5]
  p.k_scale_pool[at] = std::numeric_limits<float>::quiet_NaN();
  expect_error(p.cache(Format::FlashInfer),
               "k_scale_pages[" + std::to_string(page) + ", 0, 0, 5] is nan");
  p.k_scale_pool[at] = 0.01f;
  p.k_zero_pool[at] = std::numeric_limits<float>::infinity();
  expect_error(p.cache(Format::OpenVINO), "k_zero_pages[" + std::to_string(page) + ", 0, 0, 5]");
  p.k_scale_pool[at] = 2.0f;  // both finite, but scale·(q − zero) is not
  p.k_zero_pool[at] = std::numeric_limits<float>::max();
  expect_error(p.cache(Format::VLLM), "k_scale_pages[" + std::to_string(page) + ", 0, 0, 5]");
  p.k_scale_pool[at] = 0.01f;
  p.k_zero_pool[at] = 0.0f;
  // A value scale of token 3 of sequence 1.
  const Index vpage = p.lists[1][0];
  const std::size_t vat = count((vpage * 64 + 3) * p.groups());
  const float saved = p.v_scale_pool[vat];
  p.v_scale_pool[vat] = std::numeric_limits<float>::quiet_NaN();
  expect_error(p.cache(Format::VLLM), "(token 3 of sequence 1) is nan");
  p.v_scale_pool[vat] = saved;
  // Block row 1 of that page lies past sequence 0's 70 tokens, and every block of an unused
  // page: not read.
  p.k_scale_pool[at + 8] = std::numeric_limits<float>::quiet_NaN();
  std::vector<std::int32_t> used(p.indices);
  std::sort(used.begin(), used.end());
  Index unused = 0;
  while (std::binary_search(used.begin(), used.end(), static_cast<std::int32_t>(unused))) ++unused;
  p.k_zero_pool[count(unused * 2 * 8)] = std::numeric_limits<float>::infinity();
  p.v_scale_pool[count(unused * 64 * p.groups())] = std::numeric_limits<float>::infinity();
  std::vector<float> out(p.out_size());
  EXPECT_NO_THROW(blockattn::attention(p.qv(), p.cache(Format::VLLM), p.outv(out)));
  for (const float e : out) ASSERT_TRUE(std::isfinite(e));
}

TEST(PagedQuantizedTest, ChannelInt8ValidationNamesTheArgument) { check_validation<false>(2103); }
TEST(PagedQuantizedTest, Int4ValidationNamesTheArgument) { check_validation<true>(2104); }

// quantize_kv on page slices (k, k_scale, k_zero of one page, position t % page_size; values a
// token at a time) writes the bytes quantize_kv writes into the contiguous cache, appending the
// same runs of tokens: page boundaries are key block boundaries, and blocks are independent.
template <bool kInt4>
void check_append(std::uint64_t salt) {
  SCOPED_TRACE(seed_trace());
  auto rng = make_rng(salt);
  for (const bool head_major : {false, true}) {
    Problem<kInt4> p({{77}, 1, 2, 2, 12, 40, 32, head_major}, rng);
    const Index n = 77;
    std::vector<float> kf(count(n * 2 * 12)), vf(count(n * 2 * 40));
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (float& e : kf) e = dist(rng) * (1.0f + static_cast<float>(&e - kf.data()) / 200.0f);
    for (float& e : vf) e = dist(rng);
    const auto kx = blockattn::make_tensor_view<const float>(kf.data(), 1, n, 2, 12);
    const auto vx = blockattn::make_tensor_view<const float>(vf.data(), 1, n, 2, 40);
    typename Problem<kInt4>::Cache c;
    c.n = n;
    c.k.assign(p.caches[0].k.size(), 0);
    c.v.assign(p.caches[0].v.size(), 0);
    c.k_scale.assign(p.caches[0].k_scale.size(), 0.0f);
    c.k_zero = c.k_scale;
    c.v_scale.assign(p.caches[0].v_scale.size(), 0.0f);
    std::fill(p.k_pool.begin(), p.k_pool.end(), 0);
    const Index nb = 3;
    const auto& list = p.lists[0];
    // Runs of 20, 1, 1, 30 (crosses page 0's end) and 25 tokens.
    Index t0 = 0;
    for (const Index m : {20, 1, 1, 30, 25}) {
      TensorView<const float> x = kx;
      x.data = kx.at(0, t0, 0);
      x.seq = m;
      blockattn::quantize_kv(x, t0, p.kview(c), p.kparams(c.k_scale, nb), p.kparams(c.k_zero, nb));
      for (Index t = t0; t < t0 + m;) {  // the same run, page piece by page piece
        const Index page = list[count(t / 32)];
        const Index piece = std::min(t0 + m - t, 32 - t % 32);
        TensorView<const float> y = kx;
        y.data = kx.at(0, t, 0);
        y.seq = piece;
        blockattn::quantize_kv(y, t % 32, page_of(p.kpool(), page),
                               page_of(p.kparams(p.k_scale_pool, 1, p.num_pages), page),
                               page_of(p.kparams(p.k_zero_pool, 1, p.num_pages), page));
        t += piece;
      }
      t0 += m;
    }
    for (Index t = 0; t < n; ++t) {  // values a token at a time, in place
      TensorView<const float> x = vx;
      x.data = vx.at(0, t, 0);
      x.seq = 1;
      auto v = page_of(p.vpool(), list[count(t / 32)]);
      v.data = v.at(0, t % 32, 0);
      v.seq = 1;
      auto vs = page_of(p.vscales(p.v_scale_pool, 32, p.num_pages), list[count(t / 32)]);
      vs.data = vs.at(0, t % 32, 0);
      vs.seq = 1;
      blockattn::quantize_kv(x, v, vs);
    }
    blockattn::quantize_kv(vx, p.vview(c), p.vscales(c.v_scale, n));
    p.caches[0] = c;
    // The paged call reads the same cache as the contiguous one.
    std::vector<float> out(p.out_size()), out_c(p.out_size());
    blockattn::attention(p.qv(), p.cache(Format::VLLM), p.outv(out));
    blockattn::attention(p.qv(), p.contiguous(0), p.outv(out_c));
    EXPECT_TRUE(same_bits(out, out_c)) << "head_major=" << head_major;
    // And the bytes: gather the pages and compare.
    for (Index t = 0; t < n; ++t) {
      for (Index h = 0; h < 2; ++h) {
        const auto* a = p.kpool().at(list[count(t / 32)], t % 32, h);
        const auto* b = p.kview(c).at(0, t, h);
        ASSERT_TRUE(std::equal(a, a + Storage<kInt4>::row(12), b)) << "key " << t;
        if (t % 32 == 0) {
          const float* sa = p.kparams(p.k_scale_pool, 1, p.num_pages).at(list[count(t / 32)], 0, h);
          const float* sb = p.kparams(c.k_scale, nb).at(0, t / 32, h);
          ASSERT_EQ(std::memcmp(sa, sb, 12 * sizeof(float)), 0) << "block " << t / 32;
        }
      }
    }
  }
}

TEST(PagedQuantizedTest, ChannelInt8AppendThroughPagesIsTheContiguousAppend) {
  check_append<false>(2105);
}
TEST(PagedQuantizedTest, Int4AppendThroughPagesIsTheContiguousAppend) { check_append<true>(2106); }

// With a caller's Workspace, a second decode call and a second chunked prefill call allocate
// nothing: validation (the scans of the block parameters and scales too) and the loops.
template <bool kInt4>
void check_no_malloc(std::uint64_t salt) {
  auto rng = make_rng(salt);
  Problem<kInt4> decode({{3000, 40}, 1, 4, 2, 64, 64, 64}, rng);
  Problem<kInt4> prefill({{300, 120}, 100, 4, 2, 64, 64, 32, true}, rng);
  blockattn::Workspace workspace;
  AttentionOptions options;
  options.threads = 1;
  options.workspace = &workspace;
  options.causal = true;
  std::vector<float> out_d(decode.out_size()), out_p(prefill.out_size());
  std::vector<float> lse_d(decode.lse_size());
  const auto decode_kv = decode.cache(Format::FlashInfer);
  const auto prefill_kv = prefill.cache(Format::OpenVINO);
  blockattn::attention(decode.qv(), decode_kv, decode.outv(out_d), options, lse_d);
  blockattn::attention(prefill.qv(), prefill_kv, prefill.outv(out_p), options);
  const std::vector<float> first_d = out_d, first_p = out_p;
  {
    const blockattn::detail::NoMallocScope no_malloc;  // aborts on an allocation
    blockattn::attention(decode.qv(), decode_kv, decode.outv(out_d), options, lse_d);
    blockattn::attention(prefill.qv(), prefill_kv, prefill.outv(out_p), options);
  }
  EXPECT_TRUE(same_bits(out_d, first_d));
  EXPECT_TRUE(same_bits(out_p, first_p));
}

TEST(PagedQuantizedTest, ChannelInt8SecondCallWithAWorkspaceAllocatesNothing) {
  check_no_malloc<false>(2107);
}
TEST(PagedQuantizedTest, Int4SecondCallWithAWorkspaceAllocatesNothing) {
  check_no_malloc<true>(2108);
}

}  // namespace

}  // namespace paged_quantized_test
