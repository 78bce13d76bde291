#pragma once
// Included by the tests that switch Eigen's allocation guard on (set_is_malloc_allowed(false)
// around a call, directly or through detail::NoMallocScope): without EIGEN_RUNTIME_NO_MALLOC the
// guard does not exist and those checks could not fail. MALLOC_GUARD test groups define it
// (tests/CMakeLists.txt), on the command line, so that it holds before the first Eigen include of
// a unity build.
#ifndef EIGEN_RUNTIME_NO_MALLOC
#error "this test needs Eigen's allocation guard: a MALLOC_GUARD test group (tests/CMakeLists.txt)"
#endif
