// A gradient or parameter chunk read where gRPC received it. Protobuf's parser copies a chunk's
// data out of gRPC's receive slices into the message's string, and the staging then decodes that
// string: one copy of every byte more than the wire needs. ViewChunk reads a Step or UploadParams
// request (header = 1, chunk = 2) in its plain form — one chunk, each of its fields at most once,
// nothing unknown — straight from the slices, leaving the data where it is, in pieces, for
// TensorStaging to decode from. Anything else (a header, a repeated or unknown field, a name that
// is not UTF-8) is left to protobuf's parser, so every message means what protobuf says it means.
#ifndef OPTD_SERVER_CHUNK_VIEW_H_
#define OPTD_SERVER_CHUNK_VIEW_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "grpcpp/support/slice.h"
#include "optd/v1/optd.pb.h"

namespace optd::server {

// A TensorChunk's fields, its data in pieces (an element may be split between two).
struct ChunkView {
  std::string tensor;
  int64_t offset = 0;
  int dtype = 0;
  int64_t tensor_elements = 0;
  std::vector<absl::string_view> data;  // valid while the slices (or message) it came from are
  size_t data_bytes = 0;

  // A parsed chunk's fields; the data is the message's own string, one piece.
  static ChunkView Of(const v1::TensorChunk& chunk);
};

// Fills `view` from the request whose bytes are `slices`, when it is a plain chunk request; its
// data pieces point into `slices`. False otherwise (`view` is then unspecified): parse the request
// with protobuf.
bool ViewChunk(const std::vector<grpc::Slice>& slices, ChunkView& view);

}  // namespace optd::server

#endif  // OPTD_SERVER_CHUNK_VIEW_H_
