// Views, TensorView geometry and the validation helpers that every entry point uses.
#include <stdexcept>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <blockattn/detail/check.hpp>
#include <blockattn/types.hpp>

namespace types_test {
namespace {

using blockattn::Index;
using blockattn::Matrix;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

TEST(TensorViewTest, BshdStridesAddressEveryElementOnce) {
  std::vector<float> buffer(2 * 3 * 4 * 5);
  const auto view = blockattn::make_tensor_view(buffer.data(), 2, 3, 4, 5);
  std::vector<int> hits(buffer.size(), 0);
  for (Index b = 0; b < 2; ++b) {
    for (Index s = 0; s < 3; ++s) {
      for (Index h = 0; h < 4; ++h) {
        for (Index c = 0; c < 5; ++c)
          ++hits[static_cast<std::size_t>(view.at(b, s, h) + c - buffer.data())];
      }
    }
  }
  for (const int hit : hits) EXPECT_EQ(hit, 1);
  EXPECT_EQ(view.at(1, 2, 3), buffer.data() + ((1 * 3 + 2) * 4 + 3) * 5);
}

TEST(TensorViewTest, BhsdViewPutsSequenceInsideHead) {
  std::vector<double> buffer(2 * 4 * 3 * 5);
  const auto view = blockattn::make_tensor_view_bhsd(buffer.data(), 2, 3, 4, 5);
  EXPECT_EQ(view.at(1, 2, 3), buffer.data() + ((1 * 4 + 3) * 3 + 2) * 5);
}

TEST(TensorViewTest, ConvertsToConstAndSlicesWithoutCopy) {
  std::vector<float> buffer(1 * 6 * 2 * 3);
  for (std::size_t i = 0; i < buffer.size(); ++i) buffer[i] = static_cast<float>(i);
  const blockattn::TensorView<float> view = blockattn::make_tensor_view(buffer.data(), 1, 6, 2, 3);
  const blockattn::TensorView<const float> read_only = view;
  const auto slice = blockattn::detail::head_slice(read_only, 0, 1);
  EXPECT_EQ(slice.rows(), 6);
  EXPECT_EQ(slice.cols(), 3);
  EXPECT_EQ(slice.data(), buffer.data() + 3);
  EXPECT_EQ(slice(4, 2), buffer[static_cast<std::size_t>(4 * 6 + 3 + 2)]);
}

TEST(CheckTest, RequireSizeNamesFunctionArgumentAndBothSizes) {
  EXPECT_THAT(
      [] { blockattn::detail::require_size("attention", "k.cols()", 63, "q.cols()", 64, "why"); },
      ThrowsMessage<std::invalid_argument>(AllOf(HasSubstr("blockattn::attention"),
                                                 HasSubstr("k.cols() is 63"),
                                                 HasSubstr("q.cols() is 64"), HasSubstr("why"))));
  EXPECT_NO_THROW(blockattn::detail::require_size("attention", "a", 5, "b", 5, "why"));
}

TEST(CheckTest, OverlapSeesSharedRowsAndIgnoresGapsBetweenStridedRows) {
  Matrix<float> storage(4, 8);
  const float* base = storage.data();
  using blockattn::detail::address_range;
  using blockattn::detail::overlaps;
  // Columns 0..3 and 4..7 of the same rows interleave in memory: their ranges overlap.
  EXPECT_TRUE(overlaps(address_range(base, 4, 4, 8), address_range(base + 4, 4, 4, 8)));
  // Rows 0..1 and rows 2..3 are disjoint.
  EXPECT_FALSE(overlaps(address_range(base, 2, 8, 8), address_range(base + 16, 2, 8, 8)));
  EXPECT_TRUE(overlaps(address_range(base, 3, 8, 8), address_range(base + 16, 2, 8, 8)));
  // Empty views never overlap.
  EXPECT_FALSE(overlaps(address_range(base, 0, 8, 8), address_range(base, 4, 8, 8)));
  EXPECT_THROW(blockattn::detail::require_disjoint("f", "out", address_range(base, 4, 8, 8), "q",
                                                   address_range(base + 8, 1, 8, 8)),
               std::invalid_argument);
}

}  // namespace

}  // namespace types_test
