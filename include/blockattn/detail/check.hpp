#pragma once
// The one validation funnel: every public entry point checks its arguments through these helpers
// before it writes anything, and every failure leaves through throw_invalid_argument().

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include <blockattn/detail/config.hpp>
#include <blockattn/types.hpp>

namespace blockattn {
inline namespace BLOCKATTN_ISA_NAMESPACE {
namespace detail {

/// Throws std::invalid_argument(message); under -fno-exceptions prints it and aborts.
[[noreturn]] BLOCKATTN_NOINLINE inline void throw_invalid_argument(const std::string& message) {
#if BLOCKATTN_HAS_EXCEPTIONS
  throw std::invalid_argument(message);
#else
  std::fputs(message.c_str(), stderr);
  std::fputc('\n', stderr);
  std::abort();
#endif
}

/// Concatenates the parts with operator<< into one message.
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream stream;
  (stream << ... << parts);
  return stream.str();
}

/// Throws "<function>: <parts...>" unless `ok`. The message is built only on failure.
template <class... Parts>
void require(bool ok, const char* function, const Parts&... parts) {
  if (!ok) throw_invalid_argument(concat("blockattn::", function, ": ", parts...));
}

/// Requires `actual == expected` for a size named `what`; the message names both sizes and `why`.
inline void require_size(const char* function, const char* what, Eigen::Index actual,
                         const char* expected_what, Eigen::Index expected, const char* why) {
  if (actual != expected) {
    throw_invalid_argument(concat("blockattn::", function, ": ", what, " is ", actual, " but ",
                                  expected_what, " is ", expected, " (", why, ")"));
  }
}

/// Checks a Span argument named `name` that must hold at least `expected` elements (named
/// `expected_what`) when given: a Span with size > 0 needs data; `required` makes an empty one an
/// error too (when expected > 0). Longer spans are fine (only the first `expected` are used).
template <class T>
void require_span(const char* function, const char* name, Span<T> span, const char* expected_what,
                  Eigen::Index expected, const char* why, bool required) {
  if (span.empty()) {
    if (required && expected > 0) {
      throw_invalid_argument(concat("blockattn::", function, ": ", name, " is empty but ",
                                    expected_what, " is ", expected, " (", why, ")"));
    }
    return;
  }
  if (span.data() == nullptr) {
    throw_invalid_argument(concat("blockattn::", function, ": ", name, ".data() is null but ", name,
                                  ".size() is ", span.size()));
  }
  if (span.size() < expected) {
    throw_invalid_argument(concat("blockattn::", function, ": ", name, ".size() is ", span.size(),
                                  " but ", expected_what, " is ", expected, " (", why, ")"));
  }
}

/// The half-open address range [begin, end) that a strided buffer can touch.
struct AddressRange {
  const void* begin = nullptr;
  const void* end = nullptr;
};

/// Range of a row-major block of `rows` rows of `cols` contiguous elements, `row_stride` apart.
template <class T>
AddressRange address_range(const T* data, Eigen::Index rows, Eigen::Index cols,
                           Eigen::Index row_stride) {
  if (data == nullptr || rows <= 0 || cols <= 0) return {};
  return {data, data + (rows - 1) * row_stride + cols};
}

/// True when the two ranges share at least one byte.
inline bool overlaps(AddressRange a, AddressRange b) {
  if (a.begin == nullptr || b.begin == nullptr) return false;
  const std::less<const void*> less;
  return less(a.begin, b.end) && less(b.begin, a.end);
}

/// Throws unless `output` is disjoint from `input` ("out must not alias q", say).
inline void require_disjoint(const char* function, const char* output_name, AddressRange output,
                             const char* input_name, AddressRange input) {
  if (overlaps(output, input)) {
    throw_invalid_argument(concat("blockattn::", function, ": ", output_name,
                                  " overlaps the memory of ", input_name,
                                  " (outputs must not alias inputs)"));
  }
}

}  // namespace detail
}  // namespace BLOCKATTN_ISA_NAMESPACE
}  // namespace blockattn
