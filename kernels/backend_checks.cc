#include "kernels/backend_checks.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace optd {

absl::Status CheckCount(absl::string_view op, int64_t count, const void* ptr) {
  if (count < 0) return absl::InvalidArgumentError(absl::StrCat(op, ": negative count ", count));
  if (count > 0 && ptr == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": null pointer for ", count, " elements"));
  }
  return absl::OkStatus();
}

absl::Status CheckMatrixBatch(absl::string_view op, const MatrixBatch& x) {
  if (x.batch < 0 || x.rows < 0 || x.cols < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": negative shape [", x.batch, ", ", x.rows, ", ", x.cols, "]"));
  }
  return CheckCount(op, x.size(), x.data);
}

absl::Status CheckLeading(absl::string_view op, absl::string_view name, int64_t ld, int64_t cols) {
  if (ld < std::max<int64_t>(1, cols)) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": leading dimension of ", name, " is ", ld,
                                                   ", below its ", cols, " columns"));
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> CheckGemm(const GemmArgs& g) {
  if (g.m < 0 || g.n < 0 || g.k < 0 || g.batch < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("gemm: negative size m=", g.m, " n=", g.n, " k=", g.k, " batch=", g.batch));
  }
  if (g.input_dtype == DType::kF64) {
    return absl::InvalidArgumentError("gemm: inputs must be fp32, bf16 or fp16");
  }
  OPTD_RETURN_IF_ERROR(CheckLeading("gemm", "A", g.lda, g.trans_a == Transpose::kYes ? g.m : g.k));
  OPTD_RETURN_IF_ERROR(CheckLeading("gemm", "B", g.ldb, g.trans_b == Transpose::kYes ? g.k : g.n));
  OPTD_RETURN_IF_ERROR(CheckLeading("gemm", "C", g.ldc, g.n));
  if (g.batch == 0 || g.m == 0 || g.n == 0) return false;
  if (g.c == nullptr || (g.k > 0 && (g.a == nullptr || g.b == nullptr))) {
    return absl::InvalidArgumentError("gemm: null matrix pointer");
  }
  return true;
}

absl::StatusOr<bool> CheckSyrk(const SyrkArgs& s) {
  if (s.n < 0 || s.k < 0 || s.batch < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("syrk: negative size n=", s.n, " k=", s.k, " batch=", s.batch));
  }
  OPTD_RETURN_IF_ERROR(CheckLeading("syrk", "A", s.lda, s.trans == Transpose::kYes ? s.n : s.k));
  if (s.b != nullptr) {
    OPTD_RETURN_IF_ERROR(CheckLeading("syrk", "B", s.ldb, s.trans == Transpose::kYes ? s.n : s.k));
  }
  OPTD_RETURN_IF_ERROR(CheckLeading("syrk", "C", s.ldc, s.n));
  if (s.batch == 0 || s.n == 0) return false;
  if (s.c == nullptr || (s.k > 0 && s.a == nullptr)) {
    return absl::InvalidArgumentError("syrk: null matrix pointer");
  }
  return true;
}

absl::StatusOr<bool> CheckSymm(const SymmArgs& s) {
  if (s.m < 0 || s.n < 0 || s.batch < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("symm: negative size m=", s.m, " n=", s.n, " batch=", s.batch));
  }
  OPTD_RETURN_IF_ERROR(CheckLeading("symm", "S", s.lds, s.side == Side::kLeft ? s.m : s.n));
  OPTD_RETURN_IF_ERROR(CheckLeading("symm", "B", s.ldb, s.n));
  OPTD_RETURN_IF_ERROR(CheckLeading("symm", "C", s.ldc, s.n));
  if (s.batch == 0 || s.m == 0 || s.n == 0) return false;
  if (s.s == nullptr || s.b == nullptr || s.c == nullptr) {
    return absl::InvalidArgumentError("symm: null matrix pointer");
  }
  return true;
}

}  // namespace optd
