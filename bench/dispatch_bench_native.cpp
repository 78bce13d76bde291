// dispatch_bench's -march=native half (bench/CMakeLists.txt): the header-only blockattn::attention
// on the benchmark's cases, as a program built for this machine calls it. See dispatch_bench.cpp.
#include <memory>

#include <Eigen/Core>

#include <blockattn/attention.hpp>

#include "dispatch_bench.hpp"

namespace dispatch_bench {
namespace {

/// The runner on q and out of T, k and v of KT.
template <class T, class KT>
std::function<void()> runner(const Case& c) {
  const auto q = blockattn::make_tensor_view(static_cast<const T*>(c.q), 1, c.n_q, c.heads, c.d);
  const auto k =
      blockattn::make_tensor_view(static_cast<const KT*>(c.k), 1, c.n_k, c.kv_heads, c.d);
  const auto v =
      blockattn::make_tensor_view(static_cast<const KT*>(c.v), 1, c.n_k, c.kv_heads, c.d);
  const auto out = blockattn::make_tensor_view(static_cast<T*>(c.out), 1, c.n_q, c.heads, c.d);
  auto workspace = std::make_shared<blockattn::Workspace>();
  blockattn::AttentionOptions options;
  options.threads = c.threads;
  options.workspace = workspace.get();
  // workspace is captured to keep it alive as long as the runner (options points to it).
  return [q, k, v, out, options, workspace] { blockattn::attention(q, k, v, out, options); };
}

}  // namespace

std::function<void()> native_runner(const Case& c) {
  using Bf16 = Eigen::bfloat16;
  if (c.bf16_q) return runner<Bf16, Bf16>(c);
  if (c.bf16_kv) return runner<float, Bf16>(c);
  return runner<float, float>(c);
}

const char* native_isa() { return BLOCKATTN_ISA_NAMESPACE_NAME; }

}  // namespace dispatch_bench
