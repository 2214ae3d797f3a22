// Element types optd stores, computes in, and accepts on the wire.
#ifndef OPTD_COMMON_DTYPE_H_
#define OPTD_COMMON_DTYPE_H_

#include <cstddef>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace optd {

enum class DType { kF32, kBF16, kF16, kF64 };

// Bytes per element.
size_t DTypeSize(DType dtype);
// "fp32", "bf16", "fp16", "fp64".
absl::string_view DTypeName(DType dtype);
// Inverse of DTypeName; also accepts "float32", "bfloat16", "float16", "float64".
absl::StatusOr<DType> ParseDType(absl::string_view name);

}  // namespace optd

#endif  // OPTD_COMMON_DTYPE_H_
