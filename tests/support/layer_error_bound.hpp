#pragma once
// The first-order error bound of one transformer layer evaluated in T against the exact layer,
// shared by transformer_block_test and the sharded layer's test (ring_attention_test): the bound
// holds for any summation order, so it covers the ring's merges too.

#include <algorithm>
#include <cmath>

#include <blockattn/reference.hpp>
#include <blockattn/transformer_block.hpp>
#include <blockattn/types.hpp>

#include "support/tolerance.hpp"

namespace blockattn::test {

using Long = long double;

// The same weights in another scalar type (the reference runs on the rounded weights, cast up).
template <class To, class From>
TransformerBlockWeights<To> cast_weights(const TransformerBlockWeights<From>& w) {
  TransformerBlockWeights<To> c;
  c.heads = w.heads;
  c.kv_heads = w.kv_heads;
  c.wq = w.wq.template cast<To>();
  c.wk = w.wk.template cast<To>();
  c.wv = w.wv.template cast<To>();
  c.wo = w.wo.template cast<To>();
  c.w1 = w.w1.template cast<To>();
  c.w2 = w.w2.template cast<To>();
  c.bq = w.bq.template cast<To>();
  c.bk = w.bk.template cast<To>();
  c.bv = w.bv.template cast<To>();
  c.bo = w.bo.template cast<To>();
  c.b1 = w.b1.template cast<To>();
  c.b2 = w.b2.template cast<To>();
  c.ln1_gamma = w.ln1_gamma.template cast<To>();
  c.ln1_beta = w.ln1_beta.template cast<To>();
  c.ln2_gamma = w.ln2_gamma.template cast<To>();
  c.ln2_beta = w.ln2_beta.template cast<To>();
  c.activation = w.activation;
  c.ln_eps = w.ln_eps;
  return c;
}

// ---------------------------------------------------------------------------------------------
// First-order running error bound of the layer evaluated in T, elementwise for y.
//
// Every stage of the layer is one of four operations; for each, the absolute error of its output
// (E_out) follows from the error of its input (E_in) and the rounding it adds, both evaluated on
// the exact (long double) intermediate values, with u = eps(T)/2:
//  * affine out = a·W + b (+ residual r), K terms per output (K = fan-in + 2 with bias and
//    residual): any summation order (blocked GEMM, FFN chunks, FMA) has error <= γ_K·Σ|terms|, so
//      E_out = E_a·|W| + E_r + K·u·(|a|·|W| + |b| + |r|).
//  * LayerNorm over D features, x̂ = (z − μ)/σ: the computed mean errs by <= D·u·max|z|, the
//    centred value by that plus u·|z − μ|, the variance relatively by (D + 2)·u and 1/σ by half
//    that plus 2u; so x̂_c errs by <= (2D + 8)·u·M/σ with M = max|z| + |μ| >= max|z − μ|, and the
//    final ·γ + β adds 3u·(|x̂γ| + |β|). Input errors propagate through the Jacobian
//    ∂x̂_c/∂z = (e_c − 1/D − x̂_c·x̂ᵀ/D)/σ, whose rows have l1 norm <= (2 + |x̂_c|)/σ (since
//    Σ|x̂|/D <= 1), giving |γ_c|·(2 + |x̂_c|)·max E_z/σ.
//  * attention of one head: a logit s_ij = scale·q_i·k_j errs by
//      E_s = scale·(E_q·|k_j| + |q_i|·E_k) + (hd + 2)·u·scale·|q_i|·|k_j|
//    (dot product, scaling q, the scale itself). exp turns an absolute logit error into a
//    relative weight error, normalisation at most doubles it, and the online softmax's rescalings
//    and sums over n_k keys add (2·n_k + 8)·u relative; so with ρ_i = 2·max_j E_s + (2·n_k + 8)·u
//      E_out = Σ_j p_ij·E_v[j] + ρ_i·Σ_j p_ij·|v_j|.
//  * activation f: |f'| <= 1.13 for both GELUs (max of x·Φ(x)' is 1.129) and 1 for ReLU; libm's
//    erf/tanh are within a few ulp, and 1 + erf(·) can lose all relative accuracy but not
//    absolute, so E_f = 1.13·E_z + 4u·(|z| + |f(z)|).
// Second-order terms (products of two errors, O(u²)) are dropped; the tests use twice the bound
// to cover them with a wide margin. At the test sizes the bound is ~1e-5 (float) / ~1e-14
// (double) relative to O(1) outputs, while a wrong index, mask or formula moves y by O(0.01..1).
// ---------------------------------------------------------------------------------------------

struct Bounded {
  Matrix<Long> value;
  Matrix<Long> error;
};

inline Bounded affine(const Bounded& a, const Matrix<Long>& w, const RowVector<Long>& b, Long u,
                      const Bounded* residual = nullptr) {
  Bounded out;
  out.value = a.value * w;
  out.value.rowwise() += b;
  Matrix<Long> magnitude = a.value.cwiseAbs() * w.cwiseAbs();
  magnitude.rowwise() += b.cwiseAbs();
  out.error = a.error * w.cwiseAbs();
  Long terms = static_cast<Long>(w.rows() + 2);
  if (residual != nullptr) {
    out.value += residual->value;
    magnitude += residual->value.cwiseAbs();
    out.error += residual->error;
    terms += 1;
  }
  out.error += terms * u * magnitude;
  return out;
}

inline Bounded layer_norm(const Bounded& z, const RowVector<Long>& gamma,
                          const RowVector<Long>& beta, Long eps, Long u) {
  const Index d = z.value.cols();
  Bounded out{Matrix<Long>(z.value.rows(), d), Matrix<Long>(z.value.rows(), d)};
  for (Index r = 0; r < z.value.rows(); ++r) {
    const Long mean = z.value.row(r).mean();
    const Long var = (z.value.row(r).array() - mean).square().mean();
    const Long sigma = std::sqrt(var + eps);
    const Long big = z.value.row(r).cwiseAbs().maxCoeff() + std::abs(mean);
    const Long input_error = z.error.row(r).maxCoeff();
    for (Index c = 0; c < d; ++c) {
      const Long xhat = (z.value(r, c) - mean) / sigma;
      out.value(r, c) = xhat * gamma(c) + beta(c);
      out.error(r, c) = static_cast<Long>(2 * d + 8) * u * big / sigma * std::abs(gamma(c)) +
                        3 * u * (std::abs(xhat * gamma(c)) + std::abs(beta(c))) +
                        std::abs(gamma(c)) * (2 + std::abs(xhat)) * input_error / sigma;
    }
  }
  return out;
}

inline Bounded attention(const Bounded& q, const Bounded& k, const Bounded& v, Index heads,
                         Index kv_heads, bool causal, Long u) {
  const Index n = q.value.rows();
  const Index hd = q.value.cols() / heads;
  const Index group = heads / kv_heads;
  const Long scale = 1 / std::sqrt(static_cast<Long>(hd));
  Bounded out{Matrix<Long>::Zero(n, q.value.cols()), Matrix<Long>::Zero(n, q.value.cols())};
  std::vector<Long> s(static_cast<std::size_t>(n));
  std::vector<Long> e(static_cast<std::size_t>(n));
  for (Index h = 0; h < heads; ++h) {
    const Index qc = h * hd;
    const Index kc = h / group * hd;
    for (Index i = 0; i < n; ++i) {
      const Index keys = causal ? i + 1 : n;
      Long m = -std::numeric_limits<Long>::infinity();
      Long worst = 0;
      for (Index j = 0; j < keys; ++j) {
        Long dot = 0, mag = 0, prop = 0;
        for (Index c = 0; c < hd; ++c) {
          dot += q.value(i, qc + c) * k.value(j, kc + c);
          mag += std::abs(q.value(i, qc + c) * k.value(j, kc + c));
          prop += q.error(i, qc + c) * std::abs(k.value(j, kc + c)) +
                  std::abs(q.value(i, qc + c)) * k.error(j, kc + c);
        }
        s[static_cast<std::size_t>(j)] = scale * dot;
        worst = std::max(worst, scale * prop + static_cast<Long>(hd + 2) * u * scale * mag);
        m = std::max(m, scale * dot);
      }
      Long sum = 0;
      for (Index j = 0; j < keys; ++j) {
        e[static_cast<std::size_t>(j)] = std::exp(s[static_cast<std::size_t>(j)] - m);
        sum += e[static_cast<std::size_t>(j)];
      }
      const Long rho = 2 * worst + static_cast<Long>(2 * keys + 8) * u;
      for (Index j = 0; j < keys; ++j) {
        const Long p = e[static_cast<std::size_t>(j)] / sum;
        for (Index c = 0; c < hd; ++c) {
          out.value(i, qc + c) += p * v.value(j, kc + c);
          out.error(i, qc + c) += p * v.error(j, kc + c) + rho * p * std::abs(v.value(j, kc + c));
        }
      }
    }
  }
  return out;
}

// Elementwise bound on |y_T − y_exact| for the layer evaluated in T (see above), times 2.
template <class T>
Matrix<Long> layer_error_bound(const TransformerBlockWeights<Long>& w, const Matrix<Long>& x,
                               bool causal) {
  const Long u = static_cast<Long>(unit_roundoff<T>());
  const Long eps = static_cast<Long>(w.ln_eps);
  const Bounded input{x, Matrix<Long>::Zero(x.rows(), x.cols())};
  const Bounded ln1 = layer_norm(input, w.ln1_gamma, w.ln1_beta, eps, u);
  const Bounded q = affine(ln1, w.wq, w.bq, u);
  const Bounded k = affine(ln1, w.wk, w.bk, u);
  const Bounded v = affine(ln1, w.wv, w.bv, u);
  const Bounded attn = attention(q, k, v, w.heads, w.resolved_kv_heads(), causal, u);
  const Bounded h = affine(attn, w.wo, w.bo, u, &input);
  const Bounded ln2 = layer_norm(h, w.ln2_gamma, w.ln2_beta, eps, u);
  Bounded hidden = affine(ln2, w.w1, w.b1, u);
  const Long slope = w.activation == Activation::Relu ? Long(1) : Long(1.13);
  for (Index r = 0; r < hidden.value.rows(); ++r) {
    for (Index c = 0; c < hidden.value.cols(); ++c) {
      const Long z = hidden.value(r, c);
      const Long f = blockattn::reference::detail::activation_value(w.activation, z);
      hidden.value(r, c) = f;
      hidden.error(r, c) = slope * hidden.error(r, c) + 4 * u * (std::abs(z) + std::abs(f));
    }
  }
  const Bounded y = affine(hidden, w.w2, w.b2, u, &h);
  return 2 * y.error;
}

}  // namespace blockattn::test
