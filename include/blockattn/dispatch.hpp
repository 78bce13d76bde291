#pragma once
// Runtime dispatch (opt-in): attention() from one binary built for baseline x86-64 that runs the
// AVX-512 + AVX512_BF16, AVX-512, AVX2 + FMA or SSE2 kernels, whichever is the best the CPU has.
// Link the compiled target blockattn::dispatch (CMake option BLOCKATTN_RUNTIME_DISPATCH=ON;
// x86-64, GCC or Clang); it defines BLOCKATTN_RUNTIME_DISPATCH for its users. The header-only,
// compile-time selection (blockattn::attention) stays the default and is untouched by it: a
// program built with -march=native gets the same kernels without the indirection.
//
// How it holds together: the library compiles the kernels once per ISA, each copy under names of
// its own (the ISA-tagged inline namespace of detail/config.hpp, and the variant's own names for
// namespaces blockattn and Eigen: src/dispatch/CMakeLists.txt), and the calls below cross into
// them through plain structs (detail/dispatch_abi.hpp), never through blockattn or Eigen types,
// which differ per ISA. The choice is made once per process (see selected_isa()); the
// environment variable BLOCKATTN_MAX_ISA=sse2|avx2|avx512|avx512_bf16 caps it, so one binary can
// test every variant.

#include <cstdint>
#include <type_traits>
#include <vector>

#include <blockattn/detail/dispatch_abi.hpp>
#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace dispatch {

/// The kernel variant this process runs: "avx512_bf16", "avx512", "avx2+fma" or "sse2". Decided
/// at the first call of any dispatch function; O(1) after that. Throws std::invalid_argument when
/// BLOCKATTN_MAX_ISA holds something other than sse2, avx2, avx512 or avx512_bf16.
inline const char* isa() { return blockattn_dispatch::selected_isa(); }

namespace abi {

/// The ABI's code of a storage element type (attention()'s four).
template <class T>
constexpr blockattn_dispatch::Element element() {
  using blockattn_dispatch::Element;
  if constexpr (std::is_same_v<T, double>) {
    return Element::kDouble;
  } else if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
    return Element::kBfloat16;  // crosses as its 2 bytes: each variant has its own Eigen
  } else if constexpr (std::is_same_v<T, Eigen::half>) {
    return Element::kHalf;
  } else {
    static_assert(std::is_same_v<T, float>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
    return Element::kFloat;
  }
}

template <class T>
blockattn_dispatch::Tensor plain(const TensorView<T>& view) {
  return {view.data, view.batch,        view.seq,        view.heads,
          view.dim,  view.batch_stride, view.seq_stride, view.head_stride};
}

/// The options as plain data. `layout` receives the block-sparse bits when options has a layout;
/// `visible` holds them (both must outlive the call).
inline blockattn_dispatch::Options plain(const AttentionOptions& options,
                                         blockattn_dispatch::Layout& layout,
                                         std::vector<std::uint8_t>& visible) {
  blockattn_dispatch::Options plain_options;
  plain_options.scale = options.scale;
  plain_options.causal = options.causal;
  plain_options.window_left = options.window_left;
  plain_options.window_right = options.window_right;
  plain_options.query_chunk = options.query_chunk;
  plain_options.key_chunk = options.key_chunk;
  plain_options.threads = options.threads;
  plain_options.key_lengths = options.key_lengths.data();
  plain_options.key_lengths_size = options.key_lengths.size();
  plain_options.alibi_slopes = options.alibi_slopes.data();
  plain_options.alibi_slopes_size = options.alibi_slopes.size();
  plain_options.sinks = options.sinks.data();
  plain_options.sinks_size = options.sinks.size();
  plain_options.softcap = options.softcap;
  if (const BlockSparseLayout* sparse = options.block_sparse) {
    layout = {sparse->heads(),          sparse->query_blocks(),
              sparse->key_blocks(),     sparse->query_block_size(),
              sparse->key_block_size(), nullptr};
    visible.clear();
    visible.reserve(
        static_cast<std::size_t>(layout.heads * layout.query_blocks * layout.key_blocks));
    for (Index h = 0; h < layout.heads; ++h) {
      for (Index qb = 0; qb < layout.query_blocks; ++qb) {
        for (Index kb = 0; kb < layout.key_blocks; ++kb) {
          visible.push_back(sparse->visible(h, qb, kb) ? 1 : 0);
        }
      }
    }
    layout.visible = visible.data();
    plain_options.block_sparse = &layout;
  }
  return plain_options;
}

/// The whole call as plain data (q and out of element type T, k and v of KT; lse of T's
/// accumulator type).
template <class T, class KT>
blockattn_dispatch::AttentionCall plain_call(const TensorView<const T>& q,
                                             const TensorView<const KT>& k,
                                             const TensorView<const KT>& v,
                                             const TensorView<T>& out,
                                             const blockattn_dispatch::Options& options,
                                             Span<accumulator_t<T>> lse) {
  blockattn_dispatch::AttentionCall call;
  call.q = plain(q);
  call.k = plain(k);
  call.v = plain(v);
  call.out = plain(out);
  call.lse = lse.data();
  call.lse_size = lse.size();
  call.q_type = element<T>();
  call.kv_type = element<KT>();
  call.options = options;
  return call;
}

}  // namespace abi

/// blockattn::attention() on TensorViews, run by the kernel variant isa() names: the same element
/// types (float, double, Eigen::bfloat16 or Eigen::half for all four tensors, or float q and out
/// over a bfloat16 / half K/V cache; lse in double for double, float otherwise), shapes, masks
/// (every AttentionOptions field but the user functors), lse, errors and guarantees; results
/// bitwise equal to the header-only call compiled for that ISA. Cost: the kernel's plus one
/// indirect call (and O(heads·blocks²) to pass a block-sparse layout). options.workspace is not
/// used: each variant reuses a workspace per calling thread, so repeated calls of one shape
/// allocate nothing after the first.
template <class QT, class KT, class VT, class OT>
void attention(TensorView<QT> q, TensorView<KT> k, TensorView<VT> v, TensorView<OT> out,
               const AttentionOptions& options = {},
               Span<accumulator_t<std::remove_const_t<QT>>> lse = {}) {
  using T = std::remove_const_t<QT>;
  using KS = std::remove_const_t<KT>;
  static_assert(detail::kStorageScalar<T>, BLOCKATTN_STORAGE_SCALAR_MESSAGE);
  static_assert(
      !detail::kStorageScalar<T> ||
          detail::kAttentionTypes<T, KS, std::remove_const_t<VT>, std::remove_const_t<OT>>,
      BLOCKATTN_ATTENTION_TYPES_MESSAGE);
  static_assert(!std::is_const_v<OT>, "blockattn: out must be a writable TensorView<T>");
  blockattn_dispatch::Layout layout;
  std::vector<std::uint8_t> visible;
  blockattn_dispatch::attention(abi::plain_call<T, KS>(
      TensorView<const T>(q), TensorView<const KS>(k), TensorView<const KS>(v), out,
      abi::plain(options, layout, visible), lse));
}

}  // namespace dispatch
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
