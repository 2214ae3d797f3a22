// NumPy .npy files (numpy/lib/format.py, format versions 1.0, 2.0 and 3.0): optctl dumps
// parameters to them and reads gradients from them.
#ifndef OPTD_CLIENT_NPY_H_
#define OPTD_CLIENT_NPY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace optd::client {

// An fp32 array in C (row-major) order. A 0-d array has shape {} and one element; data.size() is
// always the product of `shape`.
struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

// Reads the .npy file at `path`: format version 1.0, 2.0 or 3.0, in C or Fortran order (Fortran
// order is converted to C order), holding little-endian
//   '<f4' float32, copied as is;
//   '<f8' float64, rounded to float32 to nearest, ties to even (NaN and ±inf carry over; a
//         finite value that would round to ±inf is an error);
//   '<f2' float16, widened exactly.
// The header dict may list its keys in any order, quote with ' or ", and omit the trailing comma.
// Returns NotFound when the file does not exist, another errno-derived code when it cannot be
// opened or read, and InvalidArgument, with a message that starts with `path` and names the
// problem, for a non-regular file, bad magic, an unsupported format version, a header that does
// not parse, an unsupported dtype (the message quotes it, e.g. '<i8' or '>f4'), a negative or
// overflowing shape, data shorter or longer than the shape needs, or an out-of-range float64.
absl::StatusOr<NpyArray> ReadNpy(const std::string& path);

// Writes `data` as a C-order '<f4' array of `shape` to `path`, as np.save would: format version
// 1.0 (2.0 only when the header would not fit version 1.0's 65535 bytes), the header padded with
// spaces so the data starts at a multiple of 64 bytes. Writes and fsyncs path + ".tmp", then
// renames it over `path`, so `path` holds either its old contents or the whole new file; the
// temporary is removed on failure.
// Returns InvalidArgument (message starts with `path`) when a dimension is negative, the shape's
// product overflows, or data.size() differs from it; an errno-derived status when a file
// operation fails.
absl::Status WriteNpy(const std::string& path, absl::Span<const int64_t> shape,
                      absl::Span<const float> data);

}  // namespace optd::client

#endif  // OPTD_CLIENT_NPY_H_
