#pragma once
// blockattn::reference — the naive versions of everything, written for clarity, not speed: they
// materialise what the fast kernels avoid (the n_q×n_k scores, the n×ffn hidden layer). The tests
// check every kernel against them, evaluated in long double; users can do the same.

#include <Eigen/Core>

#include <blockattn/types.hpp>

namespace blockattn::reference {

// --- softmax ---------------------------------------------------------------------------------

// --- attention -------------------------------------------------------------------------------

}  // namespace blockattn::reference
