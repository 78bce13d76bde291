// A toy serving loop over a paged int8 K/V cache, the way an inference server (vLLM, SGLang,
// OpenVINO GenAI) runs attention. The server keeps the keys and values of every running sequence
// in one pool of fixed-size pages. A sequence owns a list of pages: it takes one from the free
// list whenever its last page is full and returns them all when it finishes, so later arrivals
// reuse them in any order. Each step every running sequence advances: one still reading its
// prompt runs the next chunk of it (chunked prefill: the chunk's queries see the cached tokens
// and the chunk itself, causal), one that is generating appends one token and attends from it to
// its whole cache (decode: all of them in one batched call).
//
// blockattn calls:
//   quantize_kv(k, int8 slot, scale slot)            writes a new token into its page, in place
//   PagedQuantizedKV{pools, vllm_page_table(...)}    describes the pool and the page lists
//   attention(q, PagedQuantizedKV, out, options)      reads the pages in place, no gather
//   dequantize_kv, attention(q, k, v, out, options)  the check on a contiguous float cache
//
// There is no model: the q, k and v of a token are a fixed function of (sequence, position).
// The check: every output of the loop equals, bit for bit, attention() on the sequence's
// contiguous float cache made by dequantize_kv() of its int8 rows (the int8 kernels compute with
// exactly those floats). The distance to the unquantized float cache, the int8 format's own
// error, is printed.
//   paged_decode [sequences] [longest prompt] [page size] [head dim]   (defaults: 32 1000 16 128)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include <blockattn/blockattn.hpp>

namespace {

using blockattn::Index;
using blockattn::TensorView;

constexpr Index kHeads = 8;            // query heads
constexpr Index kKvHeads = 2;          // key/value heads (GQA: 4 query heads share one)
constexpr Index kPrefillChunk = 48;    // prompt tokens a sequence runs per step
constexpr Index kMaxNewTokens = 7;     // each sequence generates 1 to 7 tokens
constexpr Index kSequencesInPool = 3;  // the pool holds the 3 longest sequences at once
enum class Vector { K, V, Q };         // which of a token's vectors token_vectors() makes

std::size_t size_of(Index n) { return static_cast<std::size_t>(n); }

/// A token's k or v (kKvHeads rows) or q (kHeads rows) of d features, in [-1, 1]. A model would
/// compute them from the token; here they depend on the sequence, the position and `which` only,
/// so the check can rebuild any sequence's float cache.
std::vector<float> token_vectors(Index sequence, Index position, Vector which, Index d) {
  const Index heads = which == Vector::Q ? kHeads : kKvHeads;
  std::vector<float> x(size_of(heads * d));
  for (Index h = 0; h < heads; ++h) {
    for (Index c = 0; c < d; ++c) {
      const double angle = 0.9 * static_cast<double>(sequence) +
                           0.05 * static_cast<double>(position * (c % 7 + 1)) +
                           1.3 * static_cast<double>(h) + 0.7 * static_cast<double>(c) +
                           2.1 * static_cast<double>(which);
      x[size_of(h * d + c)] = static_cast<float>(std::sin(angle));
    }
  }
  return x;
}

/// The server's K/V memory: num_pages pages of page_size tokens, int8 keys and values with one
/// float scale per token and kv head, and the ids of the pages no sequence holds.
struct PagePool {
  Index num_pages, page_size, d;
  std::vector<std::int8_t> k, v;        // [num_pages, page_size, kKvHeads, d]
  std::vector<float> k_scale, v_scale;  // [num_pages, page_size, kKvHeads, 1]
  std::vector<std::int32_t> free_pages;
  std::vector<bool> ever_used;  // for the summary: how often a returned page is handed out again
  Index allocations = 0, reuses = 0;

  PagePool(Index pages, Index tokens_per_page, Index head_dim)
      : num_pages(pages),
        page_size(tokens_per_page),
        d(head_dim),
        k(size_of(pages * tokens_per_page * kKvHeads * head_dim)),
        v(k.size()),
        k_scale(size_of(pages * tokens_per_page * kKvHeads)),
        v_scale(k_scale.size()),
        ever_used(size_of(pages)) {
    for (Index id = 0; id < pages; ++id) free_pages.push_back(static_cast<std::int32_t>(id));
    std::mt19937 rng(7);  // a pool hands pages out in no particular order
    std::shuffle(free_pages.begin(), free_pages.end(), rng);
  }

  std::int32_t take() {
    const std::int32_t id = free_pages.back();
    free_pages.pop_back();
    ++allocations;
    if (ever_used[size_of(id)]) ++reuses;
    ever_used[size_of(id)] = true;
    return id;
  }
  void give_back(const std::vector<std::int32_t>& pages) {
    free_pages.insert(free_pages.end(), pages.begin(), pages.end());
  }

  /// A pool as the [num_pages, page_size, kKvHeads, dim] view attention() reads (dim 1: scales).
  template <class T>
  TensorView<T> view(T* data, Index dim) const {
    return blockattn::make_tensor_view(data, num_pages, page_size, kKvHeads, dim);
  }
};

/// The [1, 1, kKvHeads, dim] slice of a pool view at one token slot (page, row in the page).
template <class T>
TensorView<T> token_slot(TensorView<T> pool, Index page, Index row) {
  pool.data = pool.at(page, row, 0);
  pool.batch = 1;
  pool.seq = 1;
  return pool;
}

/// One request: its prompt, how many tokens it generates, the tokens in its cache so far and
/// the pages that hold them (token t is row t % page_size of pages[t / page_size]).
struct Sequence {
  Index id, prompt, new_tokens;
  Index length = 0;
  std::vector<std::int32_t> pages;

  bool prefilling() const { return length < prompt; }
  bool finished() const { return length == prompt + new_tokens; }
};

/// Pages a sequence needs at its longest.
Index pages_needed(const Sequence& s, Index page_size) {
  return (s.prompt + s.new_tokens + page_size - 1) / page_size;
}

/// Writes the key and value of the sequence's next token into its next slot, taking a new page
/// when the last one is full. quantize_kv() on a one-token slice appends in place.
void append_token(PagePool& pool, Sequence& s) {
  const Index row = s.length % pool.page_size;
  if (row == 0) s.pages.push_back(pool.take());
  const Index page = s.pages.back();
  for (const Vector which : {Vector::K, Vector::V}) {
    const std::vector<float> x = token_vectors(s.id, s.length, which, pool.d);
    const bool is_k = which == Vector::K;
    std::int8_t* values = is_k ? pool.k.data() : pool.v.data();
    float* scales = is_k ? pool.k_scale.data() : pool.v_scale.data();
    blockattn::quantize_kv(blockattn::make_tensor_view(x.data(), 1, 1, kKvHeads, pool.d),
                           token_slot(pool.view(values, pool.d), page, row),
                           token_slot(pool.view(scales, 1), page, row));
  }
  ++s.length;
}

/// The queries of a sequence's n_q newest tokens, [n_q, kHeads, d], appended to q.
void append_queries(const Sequence& s, Index n_q, Index d, std::vector<float>& q) {
  for (Index t = s.length - n_q; t < s.length; ++t) {
    const std::vector<float> x = token_vectors(s.id, t, Vector::Q, d);
    q.insert(q.end(), x.begin(), x.end());
  }
}

/// One attention() call for sequences that each bring their n_q newest tokens (already in their
/// pages), through a vLLM page table: block_tables [batch, max_pages] and seq_lens [batch].
/// q and out are [batch, n_q, kHeads, d].
void paged_attention(const PagePool& pool, const std::vector<Sequence*>& batch, Index n_q,
                     const std::vector<float>& q, std::vector<float>& out,
                     const blockattn::AttentionOptions& options) {
  const Index count = static_cast<Index>(batch.size());
  Index max_pages = 0;
  for (const Sequence* s : batch) max_pages = std::max(max_pages, Index(s->pages.size()));
  std::vector<std::int32_t> block_tables(size_of(count * max_pages), -1);  // -1: unused
  std::vector<std::int32_t> seq_lens;
  for (Index b = 0; b < count; ++b) {
    const Sequence& s = *batch[size_of(b)];
    std::copy(s.pages.begin(), s.pages.end(), block_tables.begin() + b * max_pages);
    seq_lens.push_back(static_cast<std::int32_t>(s.length));  // the n_q new tokens included
  }
  const blockattn::PagedQuantizedKV cache{
      pool.view(pool.k.data(), pool.d), pool.view(pool.k_scale.data(), 1),
      pool.view(pool.v.data(), pool.d), pool.view(pool.v_scale.data(), 1),
      blockattn::vllm_page_table(block_tables, max_pages, seq_lens)};
  out.resize(q.size());
  blockattn::attention(blockattn::make_tensor_view(q.data(), count, n_q, kHeads, pool.d), cache,
                       blockattn::make_tensor_view(out.data(), count, n_q, kHeads, pool.d),
                       options);
}

/// The check of every output against contiguous float caches.
struct Check {
  Index outputs = 0, mismatches = 0;  // query tokens checked, and those not bitwise equal
  double int8_error = 0;  // max |paged int8 − attention on the unquantized float cache|

  /// out: the sequence's n_q newest outputs [n_q, kHeads, d] from the paged call (q: their
  /// queries). Expected bitwise: attention() on the dequantized cache, gathered page by page.
  void sequence(const PagePool& pool, const Sequence& s, Index n_q, const float* q,
                const float* out, const blockattn::AttentionOptions& options) {
    const Index n = s.length, d = pool.d, rows = n_q * kHeads * d;
    std::vector<float> k(size_of(n * kKvHeads * d)), v(k.size());  // [1, n, kKvHeads, d]
    const auto k_cache = blockattn::make_tensor_view(k.data(), 1, n, kKvHeads, d);
    const auto v_cache = blockattn::make_tensor_view(v.data(), 1, n, kKvHeads, d);
    for (Index t = 0; t < n; ++t) {
      const Index page = s.pages[size_of(t / pool.page_size)], row = t % pool.page_size;
      blockattn::dequantize_kv(token_slot(pool.view(pool.k.data(), d), page, row),
                               token_slot(pool.view(pool.k_scale.data(), 1), page, row),
                               token_slot(k_cache, 0, t));
      blockattn::dequantize_kv(token_slot(pool.view(pool.v.data(), d), page, row),
                               token_slot(pool.view(pool.v_scale.data(), 1), page, row),
                               token_slot(v_cache, 0, t));
    }
    const auto qv = blockattn::make_tensor_view(q, 1, n_q, kHeads, d);
    std::vector<float> expected(size_of(rows));
    blockattn::attention(qv, k_cache, v_cache,
                         blockattn::make_tensor_view(expected.data(), 1, n_q, kHeads, d), options);
    const Index token = kHeads * d;  // one query token's outputs
    for (Index i = 0; i < n_q; ++i) {
      const float* got = out + i * token;
      if (std::memcmp(got, expected.data() + i * token, sizeof(float) * size_of(token)) != 0) {
        ++mismatches;
      }
    }
    outputs += n_q;

    // The same cache before quantization: the int8 format's error, for information.
    for (Index t = 0; t < n; ++t) {
      const std::vector<float> kt = token_vectors(s.id, t, Vector::K, d);
      const std::vector<float> vt = token_vectors(s.id, t, Vector::V, d);
      std::copy(kt.begin(), kt.end(), k_cache.at(0, t, 0));
      std::copy(vt.begin(), vt.end(), v_cache.at(0, t, 0));
    }
    blockattn::attention(qv, k_cache, v_cache,
                         blockattn::make_tensor_view(expected.data(), 1, n_q, kHeads, d), options);
    for (Index i = 0; i < rows; ++i) {
      int8_error =
          std::max(int8_error, std::abs(static_cast<double>(out[i] - expected[size_of(i)])));
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  const Index sequences = argc > 1 ? std::atol(argv[1]) : 32;
  const Index longest_prompt = argc > 2 ? std::atol(argv[2]) : 1000;
  const Index page_size = argc > 3 ? std::atol(argv[3]) : 16;
  const Index d = argc > 4 ? std::atol(argv[4]) : 128;
  if (sequences < 1 || longest_prompt < 1 || page_size < 1 || d < 1) return 2;

  // The requests: prompts from 1 to longest_prompt tokens, 1 to kMaxNewTokens tokens to generate,
  // arriving one per step.
  std::vector<Sequence> requests;
  for (Index i = 0; i < sequences; ++i) {
    const Index prompt = 1 + (longest_prompt - 1) * (i * 5 % 8) / 7;
    requests.push_back({i, prompt, 1 + i * 3 % kMaxNewTokens, 0, {}});
  }
  PagePool pool(kSequencesInPool * ((longest_prompt + kMaxNewTokens + page_size - 1) / page_size),
                page_size, d);

  blockattn::Workspace workspace;  // reused by every call: no allocation per step
  blockattn::AttentionOptions options;
  options.causal = true;  // bottom-right: a sequence's new tokens see its cache and each other
  options.workspace = &workspace;

  Check check;
  std::vector<Sequence*> running;
  Index next_arrival = 0, reserved_pages = 0, served = 0, steps = 0, chunks = 0, decode_calls = 0;
  std::vector<float> q, out;
  for (; served < sequences; ++steps) {
    // Admit waiting requests in arrival order while the pool can hold them at their longest (a
    // real engine admits more and preempts a sequence when pages run out).
    while (next_arrival < std::min(steps + 1, sequences)) {
      Sequence& s = requests[size_of(next_arrival)];
      if (reserved_pages + pages_needed(s, page_size) > pool.num_pages) break;
      reserved_pages += pages_needed(s, page_size);
      running.push_back(&s);
      ++next_arrival;
    }

    // Decode: every sequence past its prompt appends one token, then one batched call.
    std::vector<Sequence*> decoding;
    for (Sequence* s : running) {
      if (!s->prefilling()) decoding.push_back(s);
    }
    if (!decoding.empty()) {
      q.clear();
      for (Sequence* s : decoding) {
        append_token(pool, *s);
        append_queries(*s, 1, d, q);
      }
      paged_attention(pool, decoding, 1, q, out, options);
      ++decode_calls;
      const Index row = kHeads * d;
      for (std::size_t b = 0; b < decoding.size(); ++b) {
        check.sequence(pool, *decoding[b], 1, q.data() + Index(b) * row,
                       out.data() + Index(b) * row, options);
      }
    }

    // Chunked prefill: the next chunk of each prompt, one call per sequence (chunks differ in
    // length, and one call's sequences share n_q).
    for (Sequence* s : running) {
      if (!s->prefilling()) continue;
      const Index n_q = std::min(kPrefillChunk, s->prompt - s->length);
      q.clear();
      for (Index t = 0; t < n_q; ++t) append_token(pool, *s);
      append_queries(*s, n_q, d, q);
      paged_attention(pool, {s}, n_q, q, out, options);
      ++chunks;
      check.sequence(pool, *s, n_q, q.data(), out.data(), options);
    }

    // Finished sequences return their pages.
    for (Sequence* s : running) {
      if (!s->finished()) continue;
      pool.give_back(s->pages);
      reserved_pages -= pages_needed(*s, page_size);
      s->pages.clear();
      ++served;
    }
    running.erase(std::remove_if(running.begin(), running.end(),
                                 [](const Sequence* s) { return s->finished(); }),
                  running.end());
  }

  const bool all_pages_back = Index(pool.free_pages.size()) == pool.num_pages;
  std::printf(
      "served %ld sequences (prompts of 1 to %ld tokens, 1 to %ld new tokens) in %ld steps\n",
      static_cast<long>(served), static_cast<long>(longest_prompt),
      static_cast<long>(kMaxNewTokens), static_cast<long>(steps));
  std::printf(
      "pool: %ld int8 pages of %ld tokens, %ld kv heads, d = %ld; %ld pages taken, %ld of "
      "them reused; %s\n",
      static_cast<long>(pool.num_pages), static_cast<long>(page_size), static_cast<long>(kKvHeads),
      static_cast<long>(d), static_cast<long>(pool.allocations), static_cast<long>(pool.reuses),
      all_pages_back ? "all free at the end" : "PAGES LEAKED");
  std::printf("attention: %ld prefill chunks, %ld batched decode calls, %ld query tokens\n",
              static_cast<long>(chunks), static_cast<long>(decode_calls),
              static_cast<long>(check.outputs));
  std::printf(
      "query tokens whose output is not bitwise the contiguous call on the dequantized cache: "
      "%ld of %ld\n",
      static_cast<long>(check.mismatches), static_cast<long>(check.outputs));
  std::printf("max |paged int8 - unquantized float cache| = %.2g (the int8 format's error)\n",
              check.int8_error);
  return check.mismatches == 0 && all_pages_back ? 0 : 1;
}
