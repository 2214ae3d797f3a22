// The exact polar factor U·Vᵀ of a matrix (thin SVD X = U·Σ·Vᵀ), batched: the optimizer's
// `exact_polar` direction and the analysis's reference for Newton–Schulz, written once.
#ifndef OPTD_KERNELS_POLAR_H_
#define OPTD_KERNELS_POLAR_H_

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/backend.h"

namespace optd {

// max(rows, cols)·ε_fp32: singular values at most this times σ_max count as zero (numpy's pinv
// rule).
float PolarRelativeTolerance(int64_t rows, int64_t cols);

// Floats of scratch BatchedExactPolar needs for `batch` rows×cols matrices: the singular values
// and both sets of singular vectors.
int64_t ExactPolarScratchFloats(int64_t batch, int64_t rows, int64_t cols);

// out_b = U_b·V_bᵀ for every matrix of `x`, over the singular values above PolarRelativeTolerance
// (a zero matrix's factor is zero). `out` (batch·rows·cols floats, backend memory) may be x.data;
// `scratch` holds ExactPolarScratchFloats. max_flops_per_call > 0 cuts each product into row
// blocks of at most that many multiply-adds (the analyzer's bound on one call); 0 runs one batched
// GEMM. Errors as the backend's SVD (FailedPrecondition when it does not converge).
absl::Status BatchedExactPolar(Backend& backend, Queue& queue, const MatrixBatch& x, float* out,
                               float* scratch, int64_t max_flops_per_call = 0);

// The polar factor of one rows×cols matrix `x` into `out`, with scratch of its own, synchronized;
// the product in row blocks of at most max_flops_per_call multiply-adds (by default
// AnalysisOptions's bound). InvalidArgument for an
// empty shape.
absl::Status ExactPolar(Backend& backend, Queue& queue, const float* x, int64_t rows, int64_t cols,
                        float* out, int64_t max_flops_per_call = int64_t{1} << 28);

}  // namespace optd

#endif  // OPTD_KERNELS_POLAR_H_
