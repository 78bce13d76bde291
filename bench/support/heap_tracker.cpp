// Interposes the C allocation functions in the benchmark executable and counts live bytes by each
// block's usable size. glibc only: it forwards to __libc_malloc and friends.
#include "heap_tracker.hpp"

#include <atomic>
#include <cstdio>
#include <cstring>

#include <malloc.h>

extern "C" {
void* __libc_malloc(std::size_t size);                     // NOLINT(bugprone-reserved-identifier)
void* __libc_calloc(std::size_t count, std::size_t size);  // NOLINT(bugprone-reserved-identifier)
void* __libc_realloc(void* ptr, std::size_t size);         // NOLINT(bugprone-reserved-identifier)
void* __libc_memalign(std::size_t alignment,
                      std::size_t size);  // NOLINT(bugprone-reserved-identifier)
void __libc_free(void* ptr);              // NOLINT(bugprone-reserved-identifier)
}

namespace {

std::atomic<std::size_t> g_current{0};
std::atomic<std::size_t> g_peak{0};

void note_allocated(void* ptr) {
  if (ptr == nullptr) return;
  const std::size_t now = g_current.fetch_add(malloc_usable_size(ptr)) + malloc_usable_size(ptr);
  std::size_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
}

void note_freed(void* ptr) {
  if (ptr != nullptr) g_current.fetch_sub(malloc_usable_size(ptr));
}

}  // namespace

extern "C" {

void* malloc(std::size_t size) {
  void* ptr = __libc_malloc(size);
  note_allocated(ptr);
  return ptr;
}

void* calloc(std::size_t count, std::size_t size) {
  void* ptr = __libc_calloc(count, size);
  note_allocated(ptr);
  return ptr;
}

void* realloc(void* old, std::size_t size) {
  note_freed(old);
  void* ptr = __libc_realloc(old, size);
  // On failure the old block is still live.
  note_allocated(ptr != nullptr || size == 0 ? ptr : old);
  return ptr;
}

void free(void* ptr) {
  note_freed(ptr);
  __libc_free(ptr);
}

void* memalign(std::size_t alignment, std::size_t size) {
  void* ptr = __libc_memalign(alignment, size);
  note_allocated(ptr);
  return ptr;
}

void* aligned_alloc(std::size_t alignment, std::size_t size) { return memalign(alignment, size); }

int posix_memalign(void** out, std::size_t alignment, std::size_t size) {
  void* ptr = memalign(alignment, size);
  if (ptr == nullptr) return 12;  // ENOMEM
  *out = ptr;
  return 0;
}

}  // extern "C"

namespace blockattn::bench {

std::size_t heap_current() { return g_current.load(); }
std::size_t heap_peak() { return g_peak.load(); }
void heap_reset_peak() { g_peak.store(g_current.load()); }

std::size_t rss_peak() {
  std::FILE* status = std::fopen("/proc/self/status", "r");
  if (status == nullptr) return 0;
  char line[256];
  std::size_t kib = 0;
  while (std::fgets(line, sizeof line, status) != nullptr) {
    if (std::strncmp(line, "VmHWM:", 6) == 0) {
      std::sscanf(line + 6, "%zu", &kib);
      break;
    }
  }
  std::fclose(status);
  return kib * 1024;
}

void rss_reset_peak() {
  if (std::FILE* clear = std::fopen("/proc/self/clear_refs", "w")) {
    std::fputs("5", clear);
    std::fclose(clear);
  }
}

}  // namespace blockattn::bench
