#pragma once
// The paged-cache tests' page tables: each sequence's pages drawn at random from a pool, and the
// same assignment in the three engines' table layouts (paged_kv.hpp).

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include <blockattn/paged_kv.hpp>

#include "support/bits.hpp"

namespace blockattn::test {

enum class PageTableFormat { VLLM, FlashInfer, OpenVINO };

inline const char* name_of(PageTableFormat f) {
  return f == PageTableFormat::VLLM         ? "vLLM"
         : f == PageTableFormat::FlashInfer ? "FlashInfer"
                                            : "OpenVINO";
}

/// Sequence b (lengths[b] tokens, the n_q new ones included) gets ceil(lengths[b] / page_size)
/// pages of a pool of num_pages, shuffled, with 3 pages no sequence uses; the tables hold that
/// assignment as vLLM (one spare column), FlashInfer and OpenVINO keep it. Test data: the
/// vectors are public so that validation tests can corrupt them.
struct PageTables {
  Index num_pages = 0;
  std::vector<std::vector<std::int32_t>> lists;      // each sequence's page ids
  std::vector<std::int32_t> block_tables, seq_lens;  // vLLM
  Index max_pages = 0;
  std::vector<std::int32_t> indptr, indices, last_page_len;  // FlashInfer
  std::vector<std::int32_t> begins, past_lens;               // OpenVINO (indices reused)

  PageTables(const std::vector<Index>& lengths, Index n_q, Index page_size, std::mt19937_64& rng) {
    const Index batch = static_cast<Index>(lengths.size());
    for (const Index n : lengths) num_pages += (n + page_size - 1) / page_size;
    num_pages += 3;
    std::vector<std::int32_t> ids(count(num_pages));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::size_t next = 0;
    for (const Index n : lengths) {
      const Index pages = (n + page_size - 1) / page_size;
      lists.emplace_back(ids.begin() + static_cast<std::ptrdiff_t>(next),
                         ids.begin() + static_cast<std::ptrdiff_t>(next + count(pages)));
      next += count(pages);
      max_pages = std::max(max_pages, pages + 1);  // a spare column: rows longer than needed
    }
    indptr.push_back(0);
    for (Index b = 0; b < batch; ++b) {
      const auto& list = lists[count(b)];
      const Index n = lengths[count(b)];
      const Index used = static_cast<Index>(list.size());
      for (Index p = 0; p < max_pages; ++p) block_tables.push_back(p < used ? list[count(p)] : -1);
      seq_lens.push_back(static_cast<std::int32_t>(n));
      indices.insert(indices.end(), list.begin(), list.end());
      indptr.push_back(static_cast<std::int32_t>(indices.size()));
      last_page_len.push_back(
          static_cast<std::int32_t>(used == 0 ? 0 : n - (used - 1) * page_size));
      past_lens.push_back(static_cast<std::int32_t>(n - n_q));
    }
    begins = indptr;
  }

  /// The assignment as engine f keeps it (views of the vectors above).
  PageTable table(PageTableFormat f) const {
    switch (f) {
      case PageTableFormat::VLLM:
        return vllm_page_table(block_tables, max_pages, seq_lens);
      case PageTableFormat::FlashInfer:
        return flashinfer_page_table(indptr, indices, last_page_len);
      case PageTableFormat::OpenVINO:
        return openvino_page_table(indices, begins, past_lens);
    }
    return {};
  }
};

}  // namespace blockattn::test
