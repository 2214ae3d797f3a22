// ViewChunk (server/chunk_view.h) against protobuf's parser: the daemon reads a plain chunk
// message where gRPC received it, so whatever it takes must mean what protobuf says the same bytes
// mean. The input: two bytes choosing where the message is cut into three slices, then the raw
// bytes of one Step or UploadParams request. ViewChunk taking a message protobuf refuses, or
// reading any field differently, fails it.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "grpcpp/support/slice.h"
#include "optd/v1/optd.pb.h"
#include "server/chunk_view.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const char* message = reinterpret_cast<const char*>(data + 2);
  const size_t length = size - 2;
  const size_t cut_a = data[0] % (length + 1);
  const size_t cut_b = cut_a + data[1] % (length - cut_a + 1);
  std::vector<grpc::Slice> slices;
  slices.emplace_back(message, cut_a);
  slices.emplace_back(message + cut_a, cut_b - cut_a);
  slices.emplace_back(message + cut_b, length - cut_b);
  optd::server::ChunkView view;
  if (!optd::server::ViewChunk(slices, view)) return 0;  // left to protobuf: nothing to compare
  optd::v1::StepRequest parsed;
  if (!parsed.ParseFromArray(message, static_cast<int>(length)) || !parsed.has_chunk()) {
    __builtin_trap();
  }
  std::string joined;
  for (absl::string_view piece : view.data) joined.append(piece.data(), piece.size());
  const optd::v1::TensorChunk& chunk = parsed.chunk();
  if (view.tensor != chunk.tensor() || view.offset != chunk.offset() ||
      view.dtype != chunk.dtype() || view.tensor_elements != chunk.tensor_elements() ||
      joined != chunk.data() || view.data_bytes != joined.size()) {
    __builtin_trap();
  }
  return 0;
}
