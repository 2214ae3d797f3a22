#include "kernels/row_blocks.h"

#include <algorithm>

#include "common/status_macros.h"

namespace optd {

int64_t RowsPerCall(int64_t per_row, int64_t max_flops) {
  return std::max<int64_t>(1, max_flops / std::max<int64_t>(1, per_row));
}

absl::Status GemmInRowBlocks(Backend& backend, Queue& queue, const GemmArgs& args,
                             int64_t max_flops) {
  const int64_t block = RowsPerCall(args.n * args.k, max_flops);
  for (int64_t first = 0; first < args.m; first += block) {
    GemmArgs part = args;
    part.m = std::min(block, args.m - first);
    part.a = static_cast<const float*>(args.a) + first * args.lda;
    part.c = args.c + first * args.ldc;
    OPTD_RETURN_IF_ERROR(backend.Gemm(queue, part));
  }
  return absl::OkStatus();
}

absl::Status TransposedGemmInRowBlocks(Backend& backend, Queue& queue, const GemmArgs& args,
                                       int64_t max_flops) {
  if (args.k == 0) return backend.Gemm(queue, args);
  const int64_t block = RowsPerCall(args.m * args.n, max_flops);
  for (int64_t first = 0; first < args.k; first += block) {
    GemmArgs part = args;
    part.trans_a = Transpose::kYes;
    part.k = std::min(block, args.k - first);
    part.a = static_cast<const float*>(args.a) + first * args.lda;
    part.b = static_cast<const float*>(args.b) + first * args.ldb;
    part.beta = first == 0 ? args.beta : 1.0f;
    OPTD_RETURN_IF_ERROR(backend.Gemm(queue, part));
  }
  return absl::OkStatus();
}

}  // namespace optd
