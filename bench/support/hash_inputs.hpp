#pragma once
// Inputs that a program in another language can reproduce exactly: element i of tensor t is a
// 32-bit integer hash of (t, i) scaled to [-1, 1), a multiple of 2^-23, so float holds it exactly.
// bench/compare_ort.mjs computes the same values in JavaScript (Math.imul), so ONNX Runtime and
// blockattn read identical q, k, v without a file between them.

#include <cstdint>
#include <vector>

#include <blockattn/types.hpp>

namespace blockattn::bench {

/// Which tensor a hashed value belongs to (the hash's second argument).
enum class HashedTensor : std::uint32_t { kQuery = 1, kKey = 2, kValue = 3 };

/// Element `index` of `tensor`: uniform-looking in [-1, 1), a multiple of 2^-23.
inline float hashed_value(HashedTensor tensor, std::uint32_t index) {
  std::uint32_t h = index * 0x9E3779B1u + static_cast<std::uint32_t>(tensor) * 0x85EBCA77u;
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return static_cast<float>(static_cast<std::int32_t>(h >> 8) - (1 << 23)) * 0x1p-23f;
}

/// `count` consecutive values of `tensor` (flat indices 0 … count − 1).
inline std::vector<float> hashed_values(HashedTensor tensor, Index count) {
  std::vector<float> x(static_cast<std::size_t>(count));
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] = hashed_value(tensor, static_cast<std::uint32_t>(i));
  }
  return x;
}

}  // namespace blockattn::bench
