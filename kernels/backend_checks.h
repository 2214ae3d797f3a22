// The argument checks of the Backend contract (backend.h), shared by every backend so that each
// rejects the same input with the same message. Internal to kernels/.
#ifndef OPTD_KERNELS_BACKEND_CHECKS_H_
#define OPTD_KERNELS_BACKEND_CHECKS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/backend.h"

namespace optd {

// InvalidArgument for a negative count, or a null pointer to a non-empty array.
absl::Status CheckCount(absl::string_view op, int64_t count, const void* ptr);
// A non-negative shape and non-null data when non-empty.
absl::Status CheckMatrixBatch(absl::string_view op, const MatrixBatch& x);
// A leading dimension of at least the matrix's columns (and 1).
absl::Status CheckLeading(absl::string_view op, absl::string_view name, int64_t ld, int64_t cols);

// Each call's sizes, dtype, leading dimensions and pointers; true when there is work to do
// (false for an empty product, which writes nothing).
absl::StatusOr<bool> CheckGemm(const GemmArgs& g);
absl::StatusOr<bool> CheckSyrk(const SyrkArgs& s);
absl::StatusOr<bool> CheckSymm(const SymmArgs& s);

}  // namespace optd

#endif  // OPTD_KERNELS_BACKEND_CHECKS_H_
