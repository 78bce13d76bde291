#pragma once
// Included by the tests that run with assertions on (Eigen's allocation guard reports through
// eigen_assert, which NDEBUG turns off): they belong to a CHECKED test group
// (tests/CMakeLists.txt), whose whole translation unit is built without NDEBUG.
#ifdef NDEBUG
#error "this test needs assertions: build it in a CHECKED test group (tests/CMakeLists.txt)"
#endif
