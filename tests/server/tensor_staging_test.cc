// TensorStaging: chunks in any order assemble the tensor exactly; overlaps, gaps and bounds are
// found wherever they are.
#include "server/tensor_staging.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>

#include "common/wire.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace optd::server {
namespace {

using ::testing::HasSubstr;

std::string Bytes(const std::vector<float>& values, size_t begin, size_t end) {
  return std::string(reinterpret_cast<const char*>(values.data() + begin),
                     (end - begin) * sizeof(float));
}

constexpr float kMax = 3.0e38f;

TEST(TensorStagingTest, ChunksInAnyOrderAssembleTheTensor) {
  std::mt19937 random(11);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t count = std::uniform_int_distribution<int64_t>(1, 300)(random);
    std::vector<float> values(count);
    std::iota(values.begin(), values.end(), 0.5f * trial);
    // Random cut points, chunks sent in a random order.
    std::vector<int64_t> cuts = {0, count};
    for (int i = std::uniform_int_distribution<int>(0, 12)(random); i > 0; --i) {
      cuts.push_back(std::uniform_int_distribution<int64_t>(1, count)(random));
    }
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    std::vector<std::pair<int64_t, int64_t>> chunks;
    for (size_t i = 0; i + 1 < cuts.size(); ++i) chunks.push_back({cuts[i], cuts[i + 1]});
    std::shuffle(chunks.begin(), chunks.end(), random);
    TensorStaging staging({"t", "untouched"}, {count, 5});
    for (size_t i = 0; i < chunks.size(); ++i) {
      const auto [begin, end] = chunks[i];
      ASSERT_TRUE(
          staging.AddChunk(0, begin, DType::kF32, Bytes(values, begin, end), kMax, true).ok());
      if (i + 1 < chunks.size()) {
        EXPECT_FALSE(staging.CheckComplete().ok()) << "trial " << trial << " chunk " << i;
      }
    }
    ASSERT_TRUE(staging.CheckComplete().ok()) << "trial " << trial;
    EXPECT_TRUE(staging.present(0));
    EXPECT_FALSE(staging.present(1));
    EXPECT_EQ(staging.PresentTensors(), std::vector<int>{0});
    EXPECT_TRUE(std::equal(values.begin(), values.end(), staging.values(0).begin()));
    // Any chunk sent again overlaps.
    const auto [begin, end] = chunks[trial % chunks.size()];
    absl::Status again =
        staging.AddChunk(0, begin, DType::kF32, Bytes(values, begin, end), kMax, true);
    EXPECT_EQ(again.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(again.message()), HasSubstr("overlaps"));
  }
}

TEST(TensorStagingTest, GapsAreReportedWithTheFirstMissingRange) {
  std::vector<float> values(100, 1.0f);
  TensorStaging staging({"w"}, {100});
  ASSERT_TRUE(staging.AddChunk(0, 10, DType::kF32, Bytes(values, 10, 40), kMax, true).ok());
  ASSERT_TRUE(staging.AddChunk(0, 60, DType::kF32, Bytes(values, 60, 100), kMax, true).ok());
  absl::Status gap = staging.CheckComplete();
  EXPECT_THAT(std::string(gap.message()), HasSubstr("elements [0, 10) are missing"));
  ASSERT_TRUE(staging.AddChunk(0, 0, DType::kF32, Bytes(values, 0, 10), kMax, true).ok());
  EXPECT_THAT(std::string(staging.CheckComplete().message()),
              HasSubstr("got 80 of its 100 elements; elements [40, 60) are missing"));
  // Reset forgets the chunks; an untouched tensor is complete (no gradient).
  staging.Reset();
  EXPECT_TRUE(staging.CheckComplete().ok());
  EXPECT_FALSE(staging.present(0));
}

TEST(TensorStagingTest, OutOfRangeValuesAreCountedOrRejected) {
  std::vector<float> values = {1, std::numeric_limits<float>::quiet_NaN(), 2,
                               std::numeric_limits<float>::infinity(), 1e20f};
  TensorStaging counting({"g"}, {5});
  ASSERT_TRUE(counting.AddChunk(0, 0, DType::kF32, Bytes(values, 0, 5), 1e19f, false).ok());
  EXPECT_EQ(counting.out_of_range_values(), 3);
  TensorStaging rejecting({"g"}, {5});
  absl::Status rejected = rejecting.AddChunk(0, 0, DType::kF32, Bytes(values, 0, 5), 1e19f, true);
  EXPECT_THAT(std::string(rejected.message()), HasSubstr("'g' element 1 is nan (and 2 more)"));
}

TEST(TensorStagingTest, BoundsAreCheckedWithoutOverflow) {
  std::vector<float> values(4, 1.0f);
  TensorStaging staging({"v"}, {4});
  for (int64_t offset : {int64_t{-1}, int64_t{1}, int64_t{4}, std::numeric_limits<int64_t>::max(),
                         std::numeric_limits<int64_t>::min()}) {
    absl::Status status = staging.AddChunk(0, offset, DType::kF32, Bytes(values, 0, 4), kMax, true);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << offset;
  }
  EXPECT_FALSE(staging.present(0));
  // bf16 and fp16 chunks count two bytes per element.
  const std::string two_bf16("\x80\x3f\x00\x40", 4);  // 1.0, 2.0
  ASSERT_TRUE(staging.AddChunk(0, 2, DType::kBF16, two_bf16, kMax, true).ok());
  EXPECT_EQ(staging.values(0)[2], 1.0f);
  EXPECT_EQ(staging.values(0)[3], 2.0f);
  EXPECT_EQ(staging.AddChunk(0, 0, DType::kF16, std::string(3, '\0'), kMax, true).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TensorStagingTest, AChunkOffTheWireResolvesItsTensorAndDtype) {
  auto index = std::make_shared<const TensorIndex>(std::vector<std::string>{"w", "b"});
  TensorStaging staging(index, {4, 2}, "session 'run'");
  const std::vector<float> values = {1, 2};
  v1::TensorChunk chunk;
  chunk.set_tensor("b");
  chunk.set_dtype(v1::DTYPE_FP32);
  chunk.set_data(Bytes(values, 0, 2));
  ASSERT_TRUE(staging.AddChunk(chunk, kMax, true).ok());
  EXPECT_EQ(staging.PresentTensors(), std::vector<int>{1});
  EXPECT_THAT(staging.values(1), ::testing::ElementsAre(1.0f, 2.0f));
  chunk.set_tensor("ghost");
  absl::Status unknown = staging.AddChunk(chunk, kMax, true);
  EXPECT_EQ(unknown.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(unknown.message(), "session 'run' has no tensor 'ghost'");
  chunk.set_tensor("w");
  chunk.set_dtype(v1::DTYPE_UNSPECIFIED);
  absl::Status dtype = staging.AddChunk(chunk, kMax, true);
  EXPECT_EQ(dtype.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(dtype.message()), HasSubstr("chunk of tensor 'w': "));
  EXPECT_FALSE(staging.present(0)) << "refused chunks leave nothing";
}

TEST(TensorStagingTest, DataInPiecesDecodesAsDataInOnePiece) {
  // gRPC hands a chunk's data over in the slices it received, cut anywhere (inside an element
  // too): every cut of bf16 and fp32 data, with out-of-range values to count and to name.
  std::vector<float> values(23);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.25f * static_cast<float>(i) - 2.0f;
  values[9] = std::numeric_limits<float>::quiet_NaN();
  values[17] = -std::numeric_limits<float>::infinity();
  for (const DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    std::string bytes;
    ASSERT_TRUE(EncodeWire(dtype, values, bytes).ok());
    TensorStaging whole({"t"}, {23});
    const absl::Status expected = whole.AddChunk(0, 0, dtype, bytes, 1e6f, /*reject=*/false);
    ASSERT_TRUE(expected.ok()) << expected;
    for (size_t a = 0; a <= bytes.size(); ++a) {
      for (size_t b = a; b <= bytes.size(); b += 3) {
        SCOPED_TRACE(::testing::Message() << DTypeName(dtype) << " cut at " << a << ", " << b);
        const absl::string_view all(bytes);
        const absl::string_view pieces[] = {all.substr(0, a), all.substr(a, b - a), all.substr(b)};
        TensorStaging staging({"t"}, {23});
        ASSERT_TRUE(
            staging.AddChunk(0, 0, dtype, pieces, bytes.size(), 1e6f, /*reject=*/false).ok());
        EXPECT_EQ(staging.out_of_range_values(), whole.out_of_range_values());
        EXPECT_EQ(
            0, std::memcmp(staging.values(0).data(), whole.values(0).data(), 23 * sizeof(float)));
        TensorStaging rejecting({"t"}, {23});
        const absl::Status refused =
            rejecting.AddChunk(0, 0, dtype, pieces, bytes.size(), 1e6f, /*reject=*/true);
        EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
        EXPECT_THAT(std::string(refused.message()), HasSubstr("element 9 is nan (and 1 more)"));
      }
    }
  }
}

}  // namespace
}  // namespace optd::server
