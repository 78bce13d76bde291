#pragma once
// The boundary between a user's translation unit and the runtime-dispatched kernels of
// blockattn::dispatch (dispatch.hpp). Each kernel variant is compiled with its own ISA flags, so
// its blockattn types live in its own ISA-tagged namespace (config.hpp) and are different C++
// types from the caller's. What crosses the boundary is therefore plain data only, in a namespace
// no ISA tag applies to: pointers, sizes and strides, never a blockattn class.

#include <cstddef>
#include <cstdint>

namespace blockattn_dispatch {

using Index = std::ptrdiff_t;

/// A strided [batch, seq, heads, dim] tensor (blockattn::TensorView without its type).
struct Tensor {
  const void* data = nullptr;
  Index batch = 0;
  Index seq = 0;
  Index heads = 0;
  Index dim = 0;
  Index batch_stride = 0;
  Index seq_stride = 0;
  Index head_stride = 0;
};

/// A BlockSparseLayout: its sizes and one byte per (head, query block, key block), 1 = visible.
struct Layout {
  Index heads = 0;
  Index query_blocks = 0;
  Index key_blocks = 0;
  Index query_block_size = 1;
  Index key_block_size = 1;
  const std::uint8_t* visible = nullptr;
};

/// AttentionOptions without its workspace (each kernel variant keeps a per-thread one).
struct Options {
  double scale = 0;
  bool causal = false;
  Index window_left = -1;
  Index window_right = -1;
  Index query_chunk = 0;
  Index key_chunk = 0;
  int threads = 0;
  const Index* key_lengths = nullptr;
  Index key_lengths_size = 0;
  const Layout* block_sparse = nullptr;
  const double* alibi_slopes = nullptr;
  Index alibi_slopes_size = 0;
  double softcap = 0;
  const double* sinks = nullptr;
  Index sinks_size = 0;
};

/// The element type of a tensor that crosses the boundary. The 16-bit formats are the bits of
/// Eigen::bfloat16 and Eigen::half (2-byte PODs): each variant compiles Eigen under a name of its
/// own, so their C++ types differ per variant and only the bytes cross. 0 is no type (rejected).
enum class Element : std::uint8_t { kFloat = 1, kDouble = 2, kBfloat16 = 3, kHalf = 4 };

/// One attention() call: q and out of element type q_type, k and v of kv_type (attention()'s
/// pairs: one type for all four, or kFloat over kBfloat16 / kHalf), lse (may be null with size
/// 0) of q_type's accumulator type: double for kDouble, float otherwise.
struct AttentionCall {
  Tensor q;
  Tensor k;
  Tensor v;
  Tensor out;  ///< written: data is the caller's writable buffer
  void* lse = nullptr;
  Index lse_size = 0;
  Element q_type{};
  Element kv_type{};
  Options options;
};

/// The kernel variant chosen for this process: "avx512_bf16" (the AVX-512 kernels plus
/// AVX512_BF16's vdpbf16ps), or the SIMD layer's kName "avx512", "avx2+fma", "sse2". Chosen at
/// the first call of any function here, from the CPU's features (CPUID and the operating
/// system's saved register state) capped by the environment variable BLOCKATTN_MAX_ISA (sse2,
/// avx2, avx512 or avx512_bf16); throws std::invalid_argument on another value.
const char* selected_isa();
/// attention() in the chosen variant on the call's element types; throws what attention()
/// throws, and std::invalid_argument for a pair of element types attention() does not take.
void attention(const AttentionCall& call);

}  // namespace blockattn_dispatch
