#pragma once
// Measured heap use of the benchmark executable. heap_tracker.cpp replaces malloc and friends
// (forwarding to glibc's __libc_* functions) and counts live bytes, so Eigen's aligned
// allocations, operator new and std containers are all seen. Never link it into a sanitizer build.

#include <cstddef>

namespace blockattn::bench {

/// Bytes currently allocated through malloc/calloc/realloc/memalign and friends.
std::size_t heap_current();

/// The high-water mark of heap_current() since the last heap_reset_peak().
std::size_t heap_peak();

/// Starts a new high-water mark at the current level.
void heap_reset_peak();

/// Peak resident set size (VmHWM) in bytes since the last rss_reset_peak(); 0 if unknown.
std::size_t rss_peak();

/// Resets VmHWM to the current RSS (Linux: writes 5 to /proc/self/clear_refs).
void rss_reset_peak();

/// Runs `body` and returns the extra heap high-water mark it reached above the starting level.
template <class Body>
std::size_t measure_extra_heap(Body&& body) {
  const std::size_t before = heap_current();
  heap_reset_peak();
  body();
  const std::size_t peak = heap_peak();
  return peak > before ? peak - before : 0;
}

}  // namespace blockattn::bench
