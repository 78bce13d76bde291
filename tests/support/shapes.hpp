#pragma once
// The attention problem shapes the forward and backward tests share: a Shape with its chunk
// sizes, its SCOPED_TRACE description, seeded q/k/v for it, and the two numbers the tolerances
// need from AttentionOptions (the effective scale and the magnitude modifiers add to a logit).

#include <cmath>
#include <cstdlib>
#include <random>
#include <string>

#include <blockattn/mask.hpp>
#include <blockattn/types.hpp>

#include "random.hpp"

namespace blockattn::test {

/// One single-head problem: q [n_q, d], k [n_k, d], v [n_k, d_v], with the chunk sizes to use
/// (0: the library's defaults).
struct Shape {
  Index n_q, n_k, d, d_v, query_chunk, key_chunk;
};

/// "<what> n_q=… n_k=… d=… d_v=… query_chunk=… key_chunk=… seed=…", for SCOPED_TRACE.
inline std::string describe(const Shape& s, const std::string& what = "") {
  return what + " n_q=" + std::to_string(s.n_q) + " n_k=" + std::to_string(s.n_k) +
         " d=" + std::to_string(s.d) + " d_v=" + std::to_string(s.d_v) +
         " query_chunk=" + std::to_string(s.query_chunk) +
         " key_chunk=" + std::to_string(s.key_chunk) + " " + seed_trace();
}

/// Random q, k and v of a shape (random_matrix values), drawn in that order from `rng`.
template <class T>
struct AttentionInputs {
  Matrix<T> q, k, v;
};

template <class T>
AttentionInputs<T> random_attention_inputs(std::mt19937_64& rng, const Shape& s) {
  AttentionInputs<T> in;
  in.q = random_matrix<T>(rng, s.n_q, s.d);
  in.k = random_matrix<T>(rng, s.n_k, s.d);
  in.v = random_matrix<T>(rng, s.n_k, s.d_v);
  return in;
}

/// The scale attention() applies to q·k: options.scale, or 1/sqrt(d) when it is 0.
inline double effective_scale(const AttentionOptions& options, Index d) {
  return options.scale != 0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(d));
}

/// The magnitude modifiers can add to a logit (the E of attention_tolerance): the soft-cap, and
/// |slope|·(n_q + n_k) for ALiBi (the largest distance times the first head's slope).
inline double modifier_magnitude(const AttentionOptions& options, Index n_q, Index n_k) {
  double extra = options.softcap;
  if (!options.alibi_slopes.empty()) {
    extra += std::abs(options.alibi_slopes[0]) * static_cast<double>(n_q + n_k);
  }
  if (!options.sinks.empty()) extra += std::abs(options.sinks[0]);  // one more exp argument
  return extra;
}

}  // namespace blockattn::test
