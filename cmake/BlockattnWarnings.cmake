# Warnings and target flags for blockattn's own tests, benchmarks and examples only; the
# INTERFACE target never forces flags on its users.
add_library(blockattn_warnings INTERFACE)
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(blockattn_warnings INTERFACE
    -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wdouble-promotion -Wold-style-cast
    -Wnon-virtual-dtor)
  # GCC 12 warns inside its own AVX-512 intrinsics (the _mm512_undefined_*() operands that Eigen's
  # packet math and GEMM kernels inline under -march=native): a false positive that -Werror turns
  # into a build failure on AVX-512 hosts, and a pragma in our files cannot silence it.
  # https://gcc.gnu.org/bugzilla/show_bug.cgi?id=105593 (fixed in GCC 13).
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
    target_compile_options(blockattn_warnings INTERFACE -Wno-uninitialized -Wno-maybe-uninitialized)
  endif()
  if(BLOCKATTN_WERROR)
    target_compile_options(blockattn_warnings INTERFACE -Werror)
  endif()
endif()

# -march=native for benchmarks and examples when asked (the release and bench presets).
add_library(blockattn_native INTERFACE)
if(BLOCKATTN_NATIVE AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(blockattn_native INTERFACE -march=native)
endif()
