// One kernel variant of blockattn::dispatch: the header-only attention() compiled with this
// file's ISA flags (src/dispatch/CMakeLists.txt builds it once per ISA, naming the variant in
// BLOCKATTN_DISPATCH_VARIANT). Its blockattn types live in the ISA-tagged namespace of those
// flags, so the copies never collide; it takes and gives only the plain structs of
// detail/dispatch_abi.hpp. CMake also renames namespaces blockattn and Eigen in this file
// (-Dblockattn=blockattn_variant_<name>, -DEigen=blockattn_eigen_<name>), so nothing here shares a
// symbol with another variant or with the caller's own header-only code.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
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

// The 16-bit formats cross the boundary as their bytes (dispatch_abi.hpp's Element).
static_assert(sizeof(Eigen::bfloat16) == 2 && std::is_trivially_copyable_v<Eigen::bfloat16>);
static_assert(sizeof(Eigen::half) == 2 && std::is_trivially_copyable_v<Eigen::half>);

/// attention() with q and out of element type T, k and v of KT.
template <class T, class KT>
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
  // One workspace per calling thread and element-type pair: repeated calls allocate nothing.
  thread_local blockattn::Workspace workspace;
  options.workspace = &workspace;
  using L = blockattn::accumulator_t<T>;
  blockattn::attention(view<const T>(call.q), view<const KT>(call.k), view<const KT>(call.v),
                       view<T>(call.out), options,
                       blockattn::Span<L>(static_cast<L*>(call.lse), call.lse_size));
}

/// An Element's name, for the error message.
const char* element_name(Element e) {
  switch (e) {
    case Element::kFloat:
      return "float";
    case Element::kDouble:
      return "double";
    case Element::kBfloat16:
      return "bfloat16";
    case Element::kHalf:
      return "half";
  }
  return "unknown";
}

}  // namespace

/// This variant's name: "avx512_bf16" where the bf16 dot-product kernels are compiled
/// (detail/bf16_dot.hpp), else the SIMD layer's ("avx512", "avx2+fma", "sse2").
const char* simd_name() {
#if defined(BLOCKATTN_BF16_DOT)
  return "avx512_bf16";
#else
  return blockattn::detail::simd::Simd<float>::kName;
#endif
}

/// attention() on the call's element types (the pairs attention() takes).
void attention(const AttentionCall& call) {
  using Bf16 = Eigen::bfloat16;
  using Half = Eigen::half;
  const Element q = call.q_type;
  const Element kv = call.kv_type;
  if (q == Element::kFloat && kv == Element::kFloat) return attention<float, float>(call);
  if (q == Element::kDouble && kv == Element::kDouble) return attention<double, double>(call);
  if (q == Element::kBfloat16 && kv == Element::kBfloat16) return attention<Bf16, Bf16>(call);
  if (q == Element::kHalf && kv == Element::kHalf) return attention<Half, Half>(call);
  if (q == Element::kFloat && kv == Element::kBfloat16) return attention<float, Bf16>(call);
  if (q == Element::kFloat && kv == Element::kHalf) return attention<float, Half>(call);
  throw std::invalid_argument(
      std::string("blockattn::dispatch::attention: q and out of element type ") + element_name(q) +
      " (code " + std::to_string(static_cast<int>(q)) + ") over k and v of " + element_name(kv) +
      " (code " + std::to_string(static_cast<int>(kv)) +
      "): not a pair attention() takes (one type for all, or float over bfloat16 or half)");
}

}  // namespace BLOCKATTN_DISPATCH_VARIANT
}  // namespace blockattn_dispatch
