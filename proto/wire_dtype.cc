#include "proto/wire_dtype.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace optd {

absl::StatusOr<DType> FromWireDType(int dtype) {
  switch (dtype) {
    case v1::DTYPE_FP32:
      return DType::kF32;
    case v1::DTYPE_BF16:
      return DType::kBF16;
    case v1::DTYPE_FP16:
      return DType::kF16;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "dtype ", dtype, " is not a wire dtype (DTYPE_FP32, DTYPE_BF16, DTYPE_FP16)"));
  }
}

v1::DType ToWireDType(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return v1::DTYPE_BF16;
    case DType::kF16:
      return v1::DTYPE_FP16;
    default:
      return v1::DTYPE_FP32;
  }
}

}  // namespace optd
