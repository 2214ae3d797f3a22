// optd.v1.DType <-> the kernels' DType: the one mapping the daemon and the clients share.
#ifndef OPTD_PROTO_WIRE_DTYPE_H_
#define OPTD_PROTO_WIRE_DTYPE_H_

#include "absl/status/statusor.h"
#include "kernels/dtype.h"
#include "optd/v1/optd.pb.h"

namespace optd {

// InvalidArgument naming the value for DTYPE_UNSPECIFIED and unknown values.
absl::StatusOr<DType> FromWireDType(int dtype);
// fp32, bf16, fp16 to their wire values; anything else to DTYPE_FP32.
v1::DType ToWireDType(DType dtype);

}  // namespace optd

#endif  // OPTD_PROTO_WIRE_DTYPE_H_
