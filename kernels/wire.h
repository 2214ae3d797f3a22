// Wire formats of gradient and parameter chunks, and the mean over workers: the only arithmetic
// the daemon needs between the network and the optimizer, kept here so the server does none.
#ifndef OPTD_KERNELS_WIRE_H_
#define OPTD_KERNELS_WIRE_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/dtype.h"

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

// out[i] = (Σ_w inputs[w][i]) / inputs.size(), summed in fp32 in the order given, so the mean
// does not depend on the order in which workers arrived. `out` may alias inputs[0].
void MeanOfWorkers(absl::Span<const float* const> inputs, absl::Span<float> out);

// out[i] = after[i] − before[i]: the delta a step applied. All three have the same size; `out` may
// alias either input.
void ParameterDelta(absl::Span<const float> after, absl::Span<const float> before,
                    absl::Span<float> out);

}  // namespace optd

#endif  // OPTD_KERNELS_WIRE_H_
