#pragma once
// A benchmark baseline, not library API: the tile loop of the forward pass written with the
// micro-kernels alone (detail/microkernel.hpp), without masks, threads or the decode split. Used by
// machine_bench (the unmasked ceiling of the building blocks) and simd_test.

#include <algorithm>

#include <blockattn/detail/microkernel.hpp>
#include <blockattn/detail/online_state.hpp>
#include <blockattn/types.hpp>

namespace blockattn::bench {

/// Elements of the workspace that tile_attention_forward needs: the packed K and V chunks, one
/// score tile, and acc, m and l for one query block. Independent of n_q and n_k.
template <class T>
constexpr Index tile_attention_workspace_size(Index query_block, Index key_block, Index d,
                                              Index d_v) {
  return detail::packed_k_size<T>(key_block, d) + detail::packed_v_size<T>(key_block, d_v) +
         std::min(query_block, detail::kTileRows) * detail::padded_stride<T>(key_block) +
         query_block * detail::padded_stride<T>(d_v) + 2 * query_block;
}

/// Prototype single-head forward pass built only from the micro-kernels (no masks, one thread),
/// for machine_bench's measurement of the building blocks (its unmasked ceiling), simd_test, and
/// as the worked example of how they compose; the public attention() runs the same kernels through
/// its own loop in detail/attention_kernel.hpp (masks, modifiers, GQA, threads, decode split). out
/// = softmax(scale·q·kᵀ)·v with q [n_q, d], k [n_k, d], v [n_k, d_v], out [n_q, d_v], all row-major
/// with the given row strides. Query blocks of query_block rows, key chunks of key_block keys (both
/// >= 1); each (query block, key chunk) packs K and V once and runs the tile step on
/// detail::kTileRows rows at a time. workspace: tile_attention_workspace_size elements. A row with
/// l = 0 (possible only with n_k = 0) gets 0; NaN propagates.
template <class T>
inline void tile_attention_forward(const T* q, Index ld_q, const T* k, Index ld_k, const T* v,
                                   Index ld_v, Index n_q, Index n_k, Index d, Index d_v, T scale,
                                   T* out, Index ld_out, Index query_block, Index key_block,
                                   T* workspace) {
  const Index ld_s = detail::padded_stride<T>(key_block);
  const Index ld_acc = detail::padded_stride<T>(d_v);
  T* packed_k = workspace;
  T* packed_v = packed_k + detail::packed_k_size<T>(key_block, d);
  T* s = packed_v + detail::packed_v_size<T>(key_block, d_v);
  T* acc = s + std::min(query_block, detail::kTileRows) * ld_s;
  T* m = acc + query_block * ld_acc;
  T* l = m + query_block;
  for (Index q0 = 0; q0 < n_q; q0 += query_block) {
    const Index rows = std::min(query_block, n_q - q0);
    std::fill(m, m + rows, detail::kNegativeInfinity<T>);
    std::fill(l, l + rows, T(0));
    std::fill(acc, acc + rows * ld_acc, T(0));
    for (Index k0 = 0; k0 < n_k; k0 += key_block) {
      const Index keys = std::min(key_block, n_k - k0);
      detail::pack_k(k + k0 * ld_k, ld_k, keys, d, packed_k);
      detail::pack_v(v + k0 * ld_v, ld_v, keys, d_v, packed_v);
      for (Index t0 = 0; t0 < rows; t0 += detail::kTileRows) {
        const Index tile = std::min(detail::kTileRows, rows - t0);
        T* acc_tile = acc + t0 * ld_acc;
        detail::score_tile(q + (q0 + t0) * ld_q, ld_q, tile, d, packed_k, keys, s, ld_s);
        detail::softmax_tile_update(s, ld_s, tile, keys, scale, m + t0, l + t0, acc_tile, ld_acc,
                                    d_v);
        detail::accumulate_pv(s, ld_s, tile, keys, packed_v, d_v, acc_tile, ld_acc);
      }
    }
    // Deferred normalisation: one division per row.
    for (Index i = 0; i < rows; ++i) {
      const T inv = l[i] == T(0) ? T(0) : T(1) / l[i];
      for (Index c = 0; c < d_v; ++c) out[(q0 + i) * ld_out + c] = acc[i * ld_acc + c] * inv;
    }
  }
}

}  // namespace blockattn::bench
