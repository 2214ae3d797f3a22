#include "server/chunk_message.h"

#include <cstring>
#include <string>
#include <vector>

#include "common/wire.h"
#include "grpcpp/support/slice.h"
#include "proto/wire_dtype.h"

namespace optd::server {
namespace {

// Protobuf's wire format: varints, and tags of (field number << 3 | wire type).
constexpr uint32_t kVarint = 0, kLengthDelimited = 2;

void AppendVarint(std::string& out, uint64_t value) {
  while (value >= 0x80) {
    out.push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
}

void AppendTag(std::string& out, int field, uint32_t wire_type) {
  AppendVarint(out, (static_cast<uint64_t>(field) << 3) | wire_type);
}

// A proto3 int64 or enum field: absent when zero; negative values take ten bytes.
void AppendInt(std::string& out, int field, int64_t value) {
  if (value == 0) return;
  AppendTag(out, field, kVarint);
  AppendVarint(out, static_cast<uint64_t>(value));
}

// The slice's destroy callback: drops the Keepalive copy it was given.
void ReleaseKeepalive(void* keep) { delete static_cast<Keepalive*>(keep); }

// Where to write `slice`'s bytes. A small slice holds them inside itself: the pointer is good
// while `slice` stays where it is (so write before the slice moves into a ByteBuffer).
char* Bytes(grpc::Slice& slice) {
  return reinterpret_cast<char*>(const_cast<uint8_t*>(slice.begin()));
}

}  // namespace

absl::StatusOr<grpc::ByteBuffer> ChunkMessage(int field, absl::string_view name, int64_t offset,
                                              int64_t tensor_elements, DType dtype,
                                              absl::Span<const float> values,
                                              const Keepalive& keep) {
  if (dtype == DType::kF64) {
    return absl::InvalidArgumentError("fp64 is not a wire dtype; use fp32, bf16 or fp16");
  }
  const size_t data_bytes = values.size() * DTypeSize(dtype);
  // TensorChunk's fields in field order, as protobuf writes them: tensor (1), offset (2),
  // dtype (3), then data (4) and tensor_elements (5).
  std::string head, tail;
  if (!name.empty()) {
    AppendTag(head, 1, kLengthDelimited);
    AppendVarint(head, name.size());
    head.append(name.data(), name.size());
  }
  AppendInt(head, 2, offset);
  AppendInt(head, 3, ToWireDType(dtype));
  if (data_bytes > 0) {
    AppendTag(head, 4, kLengthDelimited);
    AppendVarint(head, data_bytes);
  }
  AppendInt(tail, 5, tensor_elements);
  if (field > 0) {
    const size_t inner = head.size() + data_bytes + tail.size();
    std::string outer;
    AppendTag(outer, field, kLengthDelimited);
    AppendVarint(outer, inner);
    head.insert(0, outer);
  }

  if (dtype != DType::kF32 || data_bytes < kMinBorrowedBytes || keep == nullptr) {
    // One slice: the fields, and the data encoded (or copied) into it once.
    grpc::Slice slice(head.size() + data_bytes + tail.size());
    char* p = Bytes(slice);
    std::memcpy(p, head.data(), head.size());
    OPTD_RETURN_IF_ERROR(EncodeWireInto(dtype, values, p + head.size()));
    std::memcpy(p + head.size() + data_bytes, tail.data(), tail.size());
    return grpc::ByteBuffer(&slice, 1);
  }
  // fp32 values are their own wire bytes (little-endian): the daemon's buffer, read by gRPC
  // where it is, with `keep` holding it until gRPC releases the slice.
  std::vector<grpc::Slice> slices;
  slices.reserve(3);
  slices.emplace_back(head.data(), head.size());
  slices.emplace_back(const_cast<float*>(values.data()), data_bytes, &ReleaseKeepalive,
                      new Keepalive(keep));
  if (!tail.empty()) slices.emplace_back(tail.data(), tail.size());
  return grpc::ByteBuffer(slices.data(), slices.size());
}

grpc::ByteBuffer MessageBuffer(const google::protobuf::MessageLite& message) {
  grpc::Slice slice(message.ByteSizeLong());
  message.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(Bytes(slice)));
  return grpc::ByteBuffer(&slice, 1);
}

}  // namespace optd::server
