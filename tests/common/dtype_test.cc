#include "common/dtype.h"

#include <gtest/gtest.h>

namespace optd {
namespace {

TEST(DTypeTest, NamesSizesAndParsing) {
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16, DType::kF64}) {
    auto parsed = ParseDType(DTypeName(d));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, d);
  }
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF64), 8u);
  EXPECT_EQ(*ParseDType("bfloat16"), DType::kBF16);
  const auto bad = ParseDType("int8");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("'int8'"), absl::string_view::npos);
}

}  // namespace
}  // namespace optd
