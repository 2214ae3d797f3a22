// Result chunks as the bytes gRPC sends, without protobuf's copies. Serializing a TensorChunk
// copies its data twice on the daemon (encoding into the message's string, then the message
// into gRPC's buffer) before the kernel copies it into the socket. ChunkMessage writes the
// message's few small fields itself and hands gRPC the values where they already are: fp32 data
// is a slice over the daemon's own buffer (kept alive by `keep` until gRPC has sent it and
// released the slice), bf16 and fp16 data is encoded once into a slice gRPC owns. The bytes are
// exactly protobuf's serialization of the same message (chunk_message_test).
#ifndef OPTD_SERVER_CHUNK_MESSAGE_H_
#define OPTD_SERVER_CHUNK_MESSAGE_H_

#include <algorithm>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "google/protobuf/message_lite.h"
#include "grpcpp/support/byte_buffer.h"

namespace optd::server {

// Whatever keeps a chunk's values where they are (a leased step outcome, a staging buffer on
// loan) until the last slice over them is released; may be released on any thread.
using Keepalive = std::shared_ptr<const void>;

// Below this many data bytes a chunk is one slice (a copy): a slice of its own costs more.
inline constexpr size_t kMinBorrowedBytes = 16 << 10;

// The message TensorChunk{tensor: name, offset, dtype, data: values in dtype, tensor_elements},
// or, with `field` > 0, an outer message holding only that TensorChunk as field number `field`
// (StepResponse.chunk is 2). InvalidArgument for a dtype that is not a wire dtype (fp64).
absl::StatusOr<grpc::ByteBuffer> ChunkMessage(int field, absl::string_view name, int64_t offset,
                                              int64_t tensor_elements, DType dtype,
                                              absl::Span<const float> values,
                                              const Keepalive& keep);

// Any message as a ByteBuffer (a summary before the chunks).
grpc::ByteBuffer MessageBuffer(const google::protobuf::MessageLite& message);

// WriteTensorChunks (proto/wire_dtype.h) for ChunkMessage: tensor `name`'s `values` in pieces of
// at most `chunk_bytes` bytes of `dtype`, each through `write(const grpc::ByteBuffer&)`, with
// `ready(end)` OK before a piece [offset, end) is read, from element `from` on (a send resumed
// where another stopped). False as soon as `write` is (the stream broke), true when every piece
// went out; an error from encoding or `ready`.
template <typename Write, typename Ready>
absl::StatusOr<bool> WriteChunkMessages(int field, absl::string_view name,
                                        absl::Span<const float> values, DType dtype,
                                        int64_t chunk_bytes, const Keepalive& keep, Write write,
                                        Ready ready, int64_t from = 0) {
  const int64_t per_chunk = std::max<int64_t>(1, chunk_bytes / DTypeSize(dtype));
  const int64_t count = static_cast<int64_t>(values.size());
  for (int64_t offset = from; offset < count; offset += per_chunk) {
    const int64_t n = std::min(per_chunk, count - offset);
    OPTD_RETURN_IF_ERROR(ready(offset + n));
    OPTD_ASSIGN_OR_RETURN(grpc::ByteBuffer message, ChunkMessage(field, name, offset, count, dtype,
                                                                 values.subspan(offset, n), keep));
    if (!write(message)) return false;
  }
  return true;
}

}  // namespace optd::server

#endif  // OPTD_SERVER_CHUNK_MESSAGE_H_
