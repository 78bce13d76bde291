#pragma once

#include <gtest/gtest.h>

namespace blockattn::test {

/// The scalar types every typed test runs over.
using Scalars = ::testing::Types<float, double>;

}  // namespace blockattn::test
