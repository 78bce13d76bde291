#pragma once
// Small helpers every bitwise-comparing test uses.

#include <cstddef>
#include <cstring>
#include <vector>

#include <blockattn/types.hpp>

namespace blockattn::test {

/// n as a std::size_t (vector sizes and indices from the library's signed Index).
inline std::size_t count(Index n) { return static_cast<std::size_t>(n); }

/// True when a and b hold the same bits (NaNs and signed zeros included), not only equal values.
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(T) * a.size()) == 0;
}

}  // namespace blockattn::test
