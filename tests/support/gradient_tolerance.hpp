#pragma once
// The error bound of attention_backward() against the exact gradients, shared by the one-process
// backward tests and the ring backward (whose dK/dV and dQ sums have the same lengths).

#include <algorithm>
#include <cmath>
#include <vector>

#include <blockattn/types.hpp>

#include "support/tolerance.hpp"

namespace blockattn::test {

/// The largest |x| of a matrix, in double.
template <class M>
double max_abs(const M& m) {
  double r = 0;
  for (Index i = 0; i < m.rows(); ++i) {
    for (Index c = 0; c < m.cols(); ++c) r = std::max(r, std::abs(static_cast<double>(m(i, c))));
  }
  return r;
}

// Per-row absolute tolerances of dq [n_q], dk [n_k] and dv [n_k] for one head in T.
struct GradientTolerance {
  std::vector<double> dq, dk, dv;
};

// Error bound of attention_backward() in T for one (batch, head), against the exact gradients.
// Notation: u = eps(T)/2; P the exact probabilities [n_q, n_k] (materialised by the caller in long
// double); M_x = max|x| over a matrix; G = 2·d_v·M_dO·M_v bounds |dP_ij − D_i| (|dP_ij| =
// |dO_i·v_j| <= d_v·M_dO·M_v, and |D_i| = |dO_i·O_i| is as large since O_i is a convex
// combination of the v_j); n_eff = n_q·(query heads per kv head), the length of the dK/dV sums.
//  * P_ij: its logit is recomputed with error <= d·u·A_i (+u·E for modifiers, as in
//    attention_tolerance), and lse_i comes from the forward in T with error <= lse_tol_i
//    (tolerance.hpp); exp adds u. So P_ij carries relative error ε_i <= 2·lse_tol_i.
//  * dS_ij = P_ij·(dP_ij − D_i)·∂s/∂x: absolute error <= P_ij·σ_i with
//    σ_i = (ε_i + (d_v + 8)·u)·G + d_v·M_dO·out_tol_i — the relative error of P, the d_v-term dot
//    products dP and D plus the subtraction and products, and D's error through the forward's
//    output error out_tol_i (attention_tolerance). Soft-capping's factor 1 − tanh² is <= 1 and
//    its own error (<= 2·d·A_i·u/softcap + 4u, absolute) is inside ε_i·G for softcap >= 1.
//  * dV_j = Σ_i P_ij·dO_i: <= M_dO·Σ_i P_ij·(ε_i + (n_eff + 4)·u).
//  * dQ_i = scale·Σ_j dS_ij·k_j: <= |scale|·M_k·Σ_j P_ij·(σ_i + (n_k + d + 4)·u·G), Σ_j P_ij <= 1.
//  * dK_j = scale·Σ_i dS_ij·q_i: <= |scale|·M_q·Σ_i P_ij·(σ_i + (n_eff + d + 4)·u·G).
// Each is doubled to absorb the (1 + O(u)) factors of the γ_k bounds. A row with no visible key
// has P = 0 and tolerance exactly 0: its gradients must be exactly 0. A masking or indexing bug
// moves a gradient by O(P_ij·G·M_k·|scale|), above these at the test sizes.
template <class T>
GradientTolerance backward_tolerance(const Matrix<double>& q, const Matrix<double>& k,
                                     const Matrix<double>& v, const Matrix<double>& dout,
                                     const Matrix<double>& p, double scale, double extra,
                                     Index group) {
  const double u = static_cast<double>(unit_roundoff<T>());
  const Index n_q = q.rows();
  const Index n_k = k.rows();
  const auto d = static_cast<double>(q.cols());
  const auto d_v = static_cast<double>(v.cols());
  const auto n_eff = static_cast<double>(n_q * group);
  const std::vector<double> lse_tol = lse_tolerance<T>(q, k, scale, extra);
  const std::vector<double> out_tol = attention_tolerance<T>(q, k, v, scale, extra);
  const double m_do = max_abs(dout);
  const double g = 2 * d_v * m_do * max_abs(v);
  const double m_q = max_abs(q);
  const double m_k = max_abs(k);
  GradientTolerance tol{std::vector<double>(static_cast<std::size_t>(n_q), 0.0),
                        std::vector<double>(static_cast<std::size_t>(n_k), 0.0),
                        std::vector<double>(static_cast<std::size_t>(n_k), 0.0)};
  for (Index i = 0; i < n_q; ++i) {
    const auto si = static_cast<std::size_t>(i);
    const double eps = 2 * lse_tol[si];
    const double sigma = (eps + (d_v + 8) * u) * g + d_v * m_do * out_tol[si];
    for (Index j = 0; j < n_k; ++j) {
      const auto sj = static_cast<std::size_t>(j);
      const double pij = p(i, j);
      tol.dq[si] +=
          2 * std::abs(scale) * m_k * pij * (sigma + (static_cast<double>(n_k) + d + 4) * u * g);
      tol.dk[sj] += 2 * std::abs(scale) * m_q * pij * (sigma + (n_eff + d + 4) * u * g);
      tol.dv[sj] += 2 * m_do * pij * (eps + (n_eff + 4) * u);
    }
  }
  return tol;
}

}  // namespace blockattn::test
