// TensorIndex: every name finds its index and back; anything else finds nothing.
#include "common/tensor_index.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace optd {
namespace {

TEST(TensorIndexTest, NamesAndIndicesBothWays) {
  std::vector<std::string> names;
  for (int i = 0; i < 100; ++i) names.push_back("layer" + std::to_string(i) + ".weight");
  const TensorIndex index(names);
  ASSERT_EQ(index.size(), 100);
  EXPECT_EQ(index.names(), names);
  for (int i = 0; i < 100; ++i) {
    EXPECT_EQ(index.Find(names[i]), i);
    EXPECT_EQ(index.name(i), names[i]);
  }
  EXPECT_EQ(index.Find(""), -1);
  EXPECT_EQ(index.Find("layer1"), -1);
  EXPECT_EQ(index.Find("layer1.weight "), -1);
  EXPECT_EQ(TensorIndex({}).Find("x"), -1);
}

}  // namespace
}  // namespace optd
