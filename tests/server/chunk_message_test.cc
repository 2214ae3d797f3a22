// ChunkMessage writes exactly the bytes protobuf's serializer writes for the same TensorChunk
// (alone, or as StepResponse.chunk), for every wire dtype, small and borrowed data, zero offsets,
// an empty name; and a borrowed buffer is held until gRPC lets its slice go.
#include "server/chunk_message.h"

#include <memory>
#include <string>
#include <vector>

#include "common/wire.h"
#include "gtest/gtest.h"
#include "optd/v1/optd.pb.h"
#include "proto/wire_dtype.h"

namespace optd::server {
namespace {

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return bytes;
}

// What protobuf writes for the same chunk (independently of ChunkMessage's own encoder).
std::string Expected(int field, const std::string& name, int64_t offset, int64_t elements,
                     DType dtype, absl::Span<const float> values) {
  v1::TensorChunk chunk;
  chunk.set_tensor(name);
  chunk.set_offset(offset);
  chunk.set_dtype(ToWireDType(dtype));
  chunk.set_tensor_elements(elements);
  EXPECT_TRUE(EncodeWire(dtype, values, *chunk.mutable_data()).ok());
  if (field == 0) return chunk.SerializeAsString();
  v1::StepResponse response;
  *response.mutable_chunk() = chunk;
  return response.SerializeAsString();
}

TEST(ChunkMessageTest, BytesAreProtobufsSerialization) {
  for (const size_t n : {size_t{0}, size_t{1}, size_t{5}, size_t{3000}, size_t{40000}}) {
    std::vector<float> values(n);
    for (size_t i = 0; i < n; ++i) values[i] = 0.001f * static_cast<float>(i) - 7.5f;
    const auto keep = std::make_shared<const int>(0);
    for (const DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
      for (const int field : {0, static_cast<int>(v1::StepResponse::kChunkFieldNumber)}) {
        for (const std::string& name : {std::string("w"), std::string(300, 'n'), std::string()}) {
          for (const int64_t offset : {int64_t{0}, int64_t{1} << 40}) {
            SCOPED_TRACE(testing::Message()
                         << n << " values, " << DTypeName(dtype) << ", field " << field
                         << ", name of " << name.size() << ", offset " << offset);
            absl::StatusOr<grpc::ByteBuffer> message =
                ChunkMessage(field, name, offset, static_cast<int64_t>(n) + 9, dtype, values, keep);
            ASSERT_TRUE(message.ok()) << message.status();
            EXPECT_EQ(Flatten(*message),
                      Expected(field, name, offset, static_cast<int64_t>(n) + 9, dtype, values));
            // And it parses back to the same fields.
            v1::StepResponse parsed;
            if (field > 0) {
              ASSERT_TRUE(parsed.ParseFromString(Flatten(*message)));
              EXPECT_EQ(parsed.chunk().offset(), offset);
              EXPECT_EQ(parsed.chunk().tensor(), name);
            }
          }
        }
      }
    }
  }
}

TEST(ChunkMessageTest, ASendStoppedByReadyResumesFromWhereItStopped) {
  // What an early send handed back between two pieces does (service.cc, RunStep): the first
  // writer's `ready` refuses the third piece, the second writes from there; together the pieces
  // are exactly the tensor's, each once, in order.
  std::vector<float> values(10);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.5f * static_cast<float>(i);
  const int64_t chunk_bytes = 3 * sizeof(float);
  std::vector<std::string> written;
  const auto write = [&](const grpc::ByteBuffer& message) {
    written.push_back(Flatten(message));
    return true;
  };
  int64_t resume = 0;
  absl::StatusOr<bool> first = WriteChunkMessages(0, "w", values, DType::kF32, chunk_bytes, nullptr,
                                                  write, [&](int64_t end) {
                                                    if (written.size() == 2)
                                                      return absl::CancelledError("handed back");
                                                    resume = end;
                                                    return absl::OkStatus();
                                                  });
  EXPECT_EQ(first.status(), absl::CancelledError("handed back"));
  EXPECT_EQ(resume, 6);
  absl::StatusOr<bool> rest = WriteChunkMessages(
      0, "w", values, DType::kF32, chunk_bytes, nullptr, write,
      [](int64_t) { return absl::OkStatus(); }, resume);
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_TRUE(*rest);
  const absl::Span<const float> all(values);
  const std::vector<std::string> expected = {
      Expected(0, "w", 0, 10, DType::kF32, all.subspan(0, 3)),
      Expected(0, "w", 3, 10, DType::kF32, all.subspan(3, 3)),
      Expected(0, "w", 6, 10, DType::kF32, all.subspan(6, 3)),
      Expected(0, "w", 9, 10, DType::kF32, all.subspan(9, 1))};
  EXPECT_EQ(written, expected);
}

TEST(ChunkMessageTest, Fp64IsNotAWireDtype) {
  const std::vector<float> values(8, 1.0f);
  EXPECT_EQ(ChunkMessage(0, "w", 0, 8, DType::kF64, values, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ChunkMessageTest, ABorrowedBufferIsHeldUntilTheLastSliceGoes) {
  std::vector<float> values(kMinBorrowedBytes / sizeof(float) * 2, 0.5f);
  auto keep = std::make_shared<const int>(7);
  std::weak_ptr<const int> watch = keep;
  {
    absl::StatusOr<grpc::ByteBuffer> message =
        ChunkMessage(0, "w", 0, static_cast<int64_t>(values.size()), DType::kF32, values, keep);
    ASSERT_TRUE(message.ok());
    // The data is the caller's memory, not a copy.
    std::vector<grpc::Slice> slices;
    ASSERT_TRUE(message->Dump(&slices).ok());
    bool borrowed = false;
    for (const grpc::Slice& s : slices) {
      borrowed |= reinterpret_cast<const float*>(s.begin()) == values.data();
    }
    EXPECT_TRUE(borrowed);
    keep.reset();
    EXPECT_FALSE(watch.expired()) << "released while gRPC still held the slice";
    grpc::ByteBuffer copy = *message;  // gRPC's copies reference the same slice
    message = absl::InternalError("dropped");
    slices.clear();
    EXPECT_FALSE(watch.expired());
  }
  EXPECT_TRUE(watch.expired());
  // bf16 and small fp32 data are copied: nothing is held.
  auto small = std::make_shared<const int>(1);
  std::weak_ptr<const int> small_watch = small;
  absl::StatusOr<grpc::ByteBuffer> copied =
      ChunkMessage(0, "w", 0, 4, DType::kF32, absl::MakeConstSpan(values).first(4), small);
  ASSERT_TRUE(copied.ok());
  small.reset();
  EXPECT_TRUE(small_watch.expired());
}

}  // namespace
}  // namespace optd::server
