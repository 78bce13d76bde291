#pragma once
// Error bounds, each derived where it is defined. No bare 1e-5 anywhere in the tests.

#include <limits>

namespace blockattn::test {

/// Unit roundoff u = eps/2: the relative error of one correctly rounded operation.
template <class T>
constexpr T unit_roundoff() {
  return std::numeric_limits<T>::epsilon() / 2;
}

}  // namespace blockattn::test
