#pragma once
// Test shorthand for attention_backward(): the tests list the nine arguments by position (q, k,
// v, out, lse, dout, then dq, dk, dv) and these helpers set the two named structs from them, for
// the fast and the reference backward alike. The public API has no positional form on purpose.

#include <type_traits>
#include <utility>

#include <blockattn/attention_backward.hpp>
#include <blockattn/reference.hpp>

namespace blockattn::test {

template <class X>
struct TensorElement {
  using type = void;
};
template <class U>
struct TensorElement<TensorView<U>> {
  using type = std::remove_const_t<U>;
};

/// The (inputs, gradients) structs of one backward call, set by name from positional arguments.
template <class Q, class K, class V, class O, class L, class D, class DQ, class DK, class DV>
auto backward_args(const Q& q, const K& k, const V& v, const O& out, const L& lse, const D& dout,
                   const DQ& dq, const DK& dk, const DV& dv) {
  if constexpr (!std::is_void_v<typename TensorElement<Q>::type>) {
    using T = typename TensorElement<Q>::type;
    TensorBackwardInputs<T> in;
    TensorGradients<T> grads;
    in.q = q, in.k = k, in.v = v, in.out = out, in.dout = dout;
    in.lse = Span<const accumulator_t<T>>(lse);
    grads.dq = dq, grads.dk = dk, grads.dv = dv;
    return std::make_pair(in, grads);
  } else {
    using T = typename Q::Scalar;
    AttentionBackwardInputs<T> in;
    AttentionGradients<T> grads;
    in.q = q, in.k = k, in.v = v, in.out = out, in.dout = dout;
    in.lse = Span<const accumulator_t<T>>(lse);
    grads.dq = dq, grads.dk = dk, grads.dv = dv;
    return std::make_pair(in, grads);
  }
}

/// blockattn::attention_backward() with positional arguments.
template <class Q, class K, class V, class O, class L, class D, class DQ, class DK, class DV,
          class MaskMod = NoMaskMod>
void backward(const Q& q, const K& k, const V& v, const O& out, const L& lse, const D& dout,
              const DQ& dq, const DK& dk, const DV& dv, const AttentionOptions& options = {},
              const MaskMod& mask_mod = {}) {
  const auto args = backward_args(q, k, v, out, lse, dout, dq, dk, dv);
  blockattn::attention_backward(args.first, args.second, options, mask_mod);
}

/// blockattn::reference::attention_backward() with positional arguments.
template <class Q, class K, class V, class O, class L, class D, class DQ, class DK, class DV,
          class MaskMod = NoMaskMod>
void reference_backward(const Q& q, const K& k, const V& v, const O& out, const L& lse,
                        const D& dout, const DQ& dq, const DK& dk, const DV& dv,
                        const AttentionOptions& options = {}, const MaskMod& mask_mod = {}) {
  const auto args = backward_args(q, k, v, out, lse, dout, dq, dk, dv);
  blockattn::reference::attention_backward(args.first, args.second, options, mask_mod);
}

}  // namespace blockattn::test
