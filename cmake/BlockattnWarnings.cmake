# Warnings and target flags for blockattn's own tests, benchmarks and examples only; the
# INTERFACE target never forces flags on its users.
add_library(blockattn_warnings INTERFACE)
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(blockattn_warnings INTERFACE
    -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wdouble-promotion -Wold-style-cast
    -Wnon-virtual-dtor)
  # GCC < 12.3 warns inside its own AVX-512 intrinsics (_mm512_undefined_*) whenever Eigen's packet
  # math is inlined under -march=native; a pragma cannot silence it (the warning is attributed to
  # the system header). https://gcc.gnu.org/bugzilla/show_bug.cgi?id=105593
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 12.3)
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
  # GCC 12 reports -Wmaybe-uninitialized inside Eigen 3.4's AVX-512 GEMM kernels (the
  # _mm512_undefined_ps() operand of pload1/pbroadcast4 in GeneralBlockPanelKernel.h), a false
  # positive that -Werror turns into a build failure on AVX-512 hosts.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    target_compile_options(blockattn_native INTERFACE -Wno-maybe-uninitialized)
  endif()
endif()
