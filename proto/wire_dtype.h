// What the daemon and the clients share about the wire: optd.v1.DType <-> the kernels' DType,
// and cutting a tensor into TensorChunks.
#ifndef OPTD_PROTO_WIRE_DTYPE_H_
#define OPTD_PROTO_WIRE_DTYPE_H_

#include <algorithm>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "common/wire.h"
#include "optd/v1/optd.pb.h"

namespace optd {

// A tensor travels in chunks of kDefaultChunkBytes unless a call asks otherwise; the daemon
// accepts at most kMaxChunkBytes of data in one.
inline constexpr int64_t kDefaultChunkBytes = int64_t{1} << 20;
inline constexpr int64_t kMaxChunkBytes = int64_t{4} << 20;

// InvalidArgument naming the value for DTYPE_UNSPECIFIED and unknown values.
absl::StatusOr<DType> FromWireDType(int dtype);
// fp32, bf16, fp16 to their wire values; anything else to DTYPE_FP32.
v1::DType ToWireDType(DType dtype);

// WriteTensorChunks' `ready` when every value is already there.
struct AlwaysReady {
  absl::Status operator()(int64_t) const { return absl::OkStatus(); }
};

// Fills `chunk` with consecutive pieces of tensor `name` (`values` in `dtype`, at most
// `chunk_bytes` bytes each, tensor_elements set) and calls `write()` after each. Before a piece
// [offset, end) is read, `ready(end)` must return OK (it may wait for the values to be there;
// its error is returned). Returns false as soon as `write()` does (the stream broke), true when
// every piece went out; an error only if encoding fails (fp64) or `ready` fails.
template <typename Write, typename Ready = AlwaysReady>
absl::StatusOr<bool> WriteTensorChunks(absl::string_view name, absl::Span<const float> values,
                                       DType dtype, int64_t chunk_bytes, v1::TensorChunk& chunk,
                                       Write write, Ready ready = {}) {
  const int64_t per_chunk = std::max<int64_t>(1, chunk_bytes / DTypeSize(dtype));
  const int64_t count = static_cast<int64_t>(values.size());
  chunk.set_tensor(std::string(name));
  chunk.set_dtype(ToWireDType(dtype));
  chunk.set_tensor_elements(count);
  for (int64_t offset = 0; offset < count; offset += per_chunk) {
    const int64_t n = std::min(per_chunk, count - offset);
    OPTD_RETURN_IF_ERROR(ready(offset + n));
    chunk.set_offset(offset);
    chunk.mutable_data()->clear();
    OPTD_RETURN_IF_ERROR(EncodeWire(dtype, values.subspan(offset, n), *chunk.mutable_data()));
    if (!write()) return false;
  }
  return true;
}

}  // namespace optd

#endif  // OPTD_PROTO_WIRE_DTYPE_H_
