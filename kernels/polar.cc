#include "kernels/polar.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/row_blocks.h"

namespace optd {

float PolarRelativeTolerance(int64_t rows, int64_t cols) {
  return static_cast<float>(std::max(rows, cols)) * std::numeric_limits<float>::epsilon();
}

int64_t ExactPolarScratchFloats(int64_t batch, int64_t rows, int64_t cols) {
  const int64_t k = std::min(rows, cols);
  return batch * (k + rows * k + k * cols);
}

absl::Status BatchedExactPolar(Backend& backend, Queue& queue, const MatrixBatch& x, float* out,
                               float* scratch, int64_t max_flops_per_call) {
  const int64_t batch = x.batch, rows = x.rows, cols = x.cols;
  const int64_t k = std::min(rows, cols);
  float* s = scratch;
  float* u = s + batch * k;
  float* vt = u + batch * rows * k;
  OPTD_RETURN_IF_ERROR(backend.SingularValueDecomposition(queue, x, s, u, vt));
  OPTD_RETURN_IF_ERROR(backend.ZeroSmallSingularVectors(queue, u, s, batch, rows, k,
                                                        PolarRelativeTolerance(rows, cols)));
  GemmArgs polar{.m = rows,
                 .n = cols,
                 .k = k,
                 .a = u,
                 .lda = k,
                 .stride_a = rows * k,
                 .b = vt,
                 .ldb = cols,
                 .stride_b = k * cols,
                 .c = out,
                 .ldc = cols,
                 .stride_c = rows * cols,
                 .batch = batch};
  if (max_flops_per_call <= 0) return backend.Gemm(queue, polar);
  for (int64_t b = 0; b < batch; ++b) {
    GemmArgs one = polar;
    one.batch = 1;
    one.stride_a = one.stride_b = one.stride_c = 0;
    one.a = u + b * rows * k;
    one.b = vt + b * k * cols;
    one.c = out + b * rows * cols;
    OPTD_RETURN_IF_ERROR(GemmInRowBlocks(backend, queue, one, max_flops_per_call));
  }
  return absl::OkStatus();
}

absl::Status ExactPolar(Backend& backend, Queue& queue, const float* x, int64_t rows, int64_t cols,
                        float* out, int64_t max_flops_per_call) {
  if (rows < 1 || cols < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("analysis: matrix shape ", rows, "x", cols, " is empty"));
  }
  OPTD_ASSIGN_OR_RETURN(
      Buffer work, backend.Allocate(static_cast<size_t>(ExactPolarScratchFloats(1, rows, cols)) *
                                    sizeof(float)));
  OPTD_RETURN_IF_ERROR(BatchedExactPolar(backend, queue,
                                         MatrixBatch{const_cast<float*>(x), 1, rows, cols}, out,
                                         work.f32(), std::max<int64_t>(1, max_flops_per_call)));
  return backend.Synchronize(queue);
}

}  // namespace optd
