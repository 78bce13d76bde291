# Dependencies come from the system when installed (Debian: libeigen3-dev libgtest-dev
# libbenchmark-dev); a missing one falls back to FetchContent of a pinned, hashed release.
include(FetchContent)

find_package(Eigen3 3.4 QUIET NO_MODULE)
if(NOT TARGET Eigen3::Eigen)
  message(STATUS "blockattn: Eigen 3.4 not found on the system; fetching 3.4.0")
  FetchContent_Declare(eigen
    URL https://gitlab.com/libeigen/eigen/-/archive/3.4.0/eigen-3.4.0.tar.gz
    URL_HASH SHA256=8586084f71f9bde545ee7fa6d00288b264a2b7ac3607b974e54d13e7162c1c72)
  FetchContent_GetProperties(eigen)
  if(NOT eigen_POPULATED)
    FetchContent_Populate(eigen)  # headers only: Eigen's own CMake would add its tests
  endif()
  add_library(Eigen3::Eigen INTERFACE IMPORTED)
  set_target_properties(Eigen3::Eigen PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${eigen_SOURCE_DIR}")
endif()

if(BLOCKATTN_OPENMP)
  find_package(OpenMP COMPONENTS CXX)
endif()

if(BLOCKATTN_MPI)
  # Open MPI from Debian (libopenmpi-dev openmpi-bin). The C API only: no MPI C++ bindings.
  set(MPI_CXX_SKIP_MPICXX ON)
  find_package(MPI COMPONENTS CXX QUIET)
endif()

if(BLOCKATTN_BUILD_TESTS OR BLOCKATTN_BUILD_EXAMPLES)
  find_package(Threads REQUIRED)
endif()

if(BLOCKATTN_BUILD_TESTS)
  if(BLOCKATTN_GTEST_SOURCE_DIR)
    # A cross build cannot link the host's libgtest: compile GoogleTest for the target from a
    # source tree (Debian's libgtest-dev ships it in /usr/src/googletest; the neon preset).
    set(INSTALL_GTEST OFF CACHE BOOL "" FORCE)
    add_subdirectory("${BLOCKATTN_GTEST_SOURCE_DIR}" "${CMAKE_BINARY_DIR}/_deps/googletest-build"
                     EXCLUDE_FROM_ALL)
  else()
    find_package(GTest 1.11 QUIET)
  endif()
  if(NOT TARGET GTest::gmock_main)
    message(STATUS "blockattn: GoogleTest not found on the system; fetching 1.12.1")
    FetchContent_Declare(googletest
      URL https://github.com/google/googletest/archive/refs/tags/release-1.12.1.tar.gz
      URL_HASH SHA256=81964fe578e9bd7c94dfdb09c8e4d6e6759e19967e397dbea48d1c10e45d0df2)
    set(INSTALL_GTEST OFF CACHE BOOL "" FORCE)
    FetchContent_MakeAvailable(googletest)
  endif()
  include(GoogleTest)
endif()

if(BLOCKATTN_BUILD_BENCHMARKS)
  find_package(benchmark 1.6 QUIET)
  if(NOT TARGET benchmark::benchmark)
    message(STATUS "blockattn: Google Benchmark not found on the system; fetching 1.7.1")
    FetchContent_Declare(googlebenchmark
      URL https://github.com/google/benchmark/archive/refs/tags/v1.7.1.tar.gz
      URL_HASH SHA256=6430e4092653380d9dc4ccb45a1e2dc9259d581f4866dc0759713126056bc1d7)
    set(BENCHMARK_ENABLE_TESTING OFF CACHE BOOL "" FORCE)
    set(BENCHMARK_ENABLE_INSTALL OFF CACHE BOOL "" FORCE)
    FetchContent_MakeAvailable(googlebenchmark)
  endif()
endif()
