// Wire formats of gradient and parameter chunks: little-endian fp32, bf16 and fp16, decoded with a
// count of the values out of range. The daemon and the clients share it.
#ifndef OPTD_COMMON_WIRE_H_
#define OPTD_COMMON_WIRE_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/dtype.h"

namespace optd {

// What DecodeWire found besides the values.
struct DecodeReport {
  int64_t out_of_range = 0;         // NaN, ±inf or |x| > max_magnitude
  int64_t first_out_of_range = -1;  // index of the first such value; -1: none
};

// Decodes `bytes` (little-endian fp32, bf16 or fp16) into `out`, which must hold exactly
// bytes.size() / DTypeSize(dtype) floats. bf16 and fp16 widen exactly. Counts values that are NaN,
// infinite or beyond ±max_magnitude. InvalidArgument when the byte count is not a multiple of the
// element size, the counts differ, or the dtype is not a wire dtype (fp64).
absl::StatusOr<DecodeReport> DecodeWire(DType dtype, absl::string_view bytes, absl::Span<float> out,
                                        float max_magnitude);

// Appends `values` to `out` in `dtype` (bf16 and fp16 round to nearest even). InvalidArgument for
// fp64.
absl::Status EncodeWire(DType dtype, absl::Span<const float> values, std::string& out);
// The same into `out`, which has room for values.size() elements of `dtype`.
absl::Status EncodeWireInto(DType dtype, absl::Span<const float> values, char* out);

}  // namespace optd

#endif  // OPTD_COMMON_WIRE_H_
