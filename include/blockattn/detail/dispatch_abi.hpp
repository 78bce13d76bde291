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

/// One attention() call: q, k, v, out as tensors of the element type the entry point names,
/// lse (may be null with size 0) of the same type.
struct AttentionCall {
  Tensor q;
  Tensor k;
  Tensor v;
  Tensor out;  ///< written: data is the caller's writable buffer
  void* lse = nullptr;
  Index lse_size = 0;
  Options options;
};

/// The kernel variant chosen for this process ("avx512", "avx2+fma" or "sse2": the SIMD layer's
/// kName). Chosen at the first call of any function here, from the CPU's features (CPUID and
/// the operating system's saved register state) capped by the environment variable
/// BLOCKATTN_MAX_ISA (sse2, avx2 or avx512); throws std::invalid_argument on another value.
const char* selected_isa();
/// attention() on float tensors in the chosen variant; throws what attention() throws.
void attention_float(const AttentionCall& call);
/// attention() on double tensors in the chosen variant; throws what attention() throws.
void attention_double(const AttentionCall& call);

}  // namespace blockattn_dispatch
