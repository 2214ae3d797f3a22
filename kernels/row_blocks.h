// Products cut into blocks of rows, so that no single BLAS call exceeds a multiply-add budget:
// the analyzer's work runs beside a step's and must not hold a core for long (server/analyzer.h).
#ifndef OPTD_KERNELS_ROW_BLOCKS_H_
#define OPTD_KERNELS_ROW_BLOCKS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/backend.h"

namespace optd {

// Rows of a row-blocked call whose every row costs `per_row` multiply-adds: as many as stay within
// max_flops, and at least one.
int64_t RowsPerCall(int64_t per_row, int64_t max_flops);

// C = A·op(B) (A not transposed, batch 1) as one call per block of A's and C's rows.
absl::Status GemmInRowBlocks(Backend& backend, Queue& queue, const GemmArgs& args,
                             int64_t max_flops);

// C = Aᵀ·B for A (k×m) and B (k×n) stored row-major: a sum over blocks of the k rows they share,
// accumulated in C.
absl::Status TransposedGemmInRowBlocks(Backend& backend, Queue& queue, const GemmArgs& args,
                                       int64_t max_flops);

}  // namespace optd

#endif  // OPTD_KERNELS_ROW_BLOCKS_H_
