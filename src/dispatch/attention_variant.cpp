// One kernel variant of blockattn::dispatch: the header-only attention() compiled with this
// file's ISA flags (src/dispatch/CMakeLists.txt builds it once per ISA, naming the variant in
// BLOCKATTN_DISPATCH_VARIANT). Its blockattn types live in the ISA-tagged namespace of those
// flags, so the copies never collide; it takes and gives only the plain structs of
// detail/dispatch_abi.hpp.
#include <cstdint>
#include <vector>

#include <blockattn/attention.hpp>
#include <blockattn/detail/dispatch_abi.hpp>
#include <blockattn/detail/simd.hpp>

#ifndef BLOCKATTN_DISPATCH_VARIANT
#error "build this file through src/dispatch/CMakeLists.txt, which names the variant"
#endif

namespace blockattn_dispatch {
namespace BLOCKATTN_DISPATCH_VARIANT {
namespace {

template <class T>
blockattn::TensorView<T> view(const Tensor& t) {
  // The caller's views are const only where attention() reads; out's data is the caller's
  // writable buffer (AttentionCall::out).
  using Stored = std::remove_const_t<T>;
  return {const_cast<Stored*>(static_cast<const Stored*>(t.data)),  // NOLINT: see above
          t.batch,
          t.seq,
          t.heads,
          t.dim,
          t.batch_stride,
          t.seq_stride,
          t.head_stride};
}

template <class T>
void attention(const AttentionCall& call) {
  const Options& plain = call.options;
  blockattn::AttentionOptions options;
  options.scale = plain.scale;
  options.causal = plain.causal;
  options.window_left = plain.window_left;
  options.window_right = plain.window_right;
  options.query_chunk = plain.query_chunk;
  options.key_chunk = plain.key_chunk;
  options.threads = plain.threads;
  options.key_lengths = {plain.key_lengths, plain.key_lengths_size};
  options.alibi_slopes = {plain.alibi_slopes, plain.alibi_slopes_size};
  options.sinks = {plain.sinks, plain.sinks_size};
  options.softcap = plain.softcap;
  blockattn::BlockSparseLayout sparse;
  if (const Layout* layout = plain.block_sparse) {
    sparse = blockattn::BlockSparseLayout(layout->heads, layout->query_blocks, layout->key_blocks,
                                          layout->query_block_size, layout->key_block_size);
    const std::uint8_t* visible = layout->visible;
    for (Index h = 0; h < layout->heads; ++h) {
      for (Index qb = 0; qb < layout->query_blocks; ++qb) {
        for (Index kb = 0; kb < layout->key_blocks; ++kb) {
          if (*visible++ != 0) sparse.set(h, qb, kb);
        }
      }
    }
    options.block_sparse = &sparse;
  }
  // One workspace per calling thread and element type: repeated calls allocate nothing.
  thread_local blockattn::Workspace workspace;
  options.workspace = &workspace;
  blockattn::attention(view<const T>(call.q), view<const T>(call.k), view<const T>(call.v),
                       view<T>(call.out), options,
                       blockattn::Span<T>(static_cast<T*>(call.lse), call.lse_size));
}

}  // namespace

/// The SIMD layer's name of this variant ("avx512", "avx2+fma", "sse2").
const char* simd_name() { return blockattn::detail::simd::Simd<float>::kName; }
void attention_float(const AttentionCall& call) { attention<float>(call); }
void attention_double(const AttentionCall& call) { attention<double>(call); }

}  // namespace BLOCKATTN_DISPATCH_VARIANT
}  // namespace blockattn_dispatch
