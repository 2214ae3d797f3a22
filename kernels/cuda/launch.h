// optd's own CUDA kernels, as launchers the CUDA backend (cuda_backend.cc) calls. Plain C++ and
// CUDA runtime types only, so the host side compiles without nvcc and the device side without
// Abseil. Every launcher enqueues on `stream`, returns the launch's error, and applies the shared
// formulas of kernels/formulas.h (built without FMA contraction, so per-element results are the
// CPU backend's bit for bit). Sums of squares accumulate in fp64, as on the CPU.
//
// Dtype codes are DType's values: 0 fp32, 1 bf16, 2 fp16.
#ifndef OPTD_KERNELS_CUDA_LAUNCH_H_
#define OPTD_KERNELS_CUDA_LAUNCH_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/formulas.h"

namespace optd::cuda {

inline constexpr int kF32 = 0, kBF16 = 1, kF16 = 2;

struct RmnpScalars {
  float momentum, eps, scale;
  const formulas::RateScalars* rate;  // device memory
  bool nesterov;
  int step_dtype;
};

cudaError_t Fill(cudaStream_t stream, float* x, int64_t n, float value);
// Element conversion between the wire dtypes, rounding to nearest even.
cudaError_t Convert(cudaStream_t stream, const void* src, int src_dtype, void* dst, int dst_dtype,
                    int64_t n);
cudaError_t RoundTo(cudaStream_t stream, float* x, int64_t n, int dtype);
// out[i] += the number of out-of-range values (NaN, ±inf, beyond max_magnitude) of array xs[i]
// (counts[i] values) for i < arrays, in one launch;
// xs, counts and out are device memory, max_count the largest count.
cudaError_t CountOutOfRangeTable(cudaStream_t stream, const float* const* xs, const int64_t* counts,
                                 int64_t arrays, int64_t max_count, float max_magnitude,
                                 unsigned long long* out);

cudaError_t Symmetrize(cudaStream_t stream, float* a, int64_t n, int64_t batch);
cudaError_t AddDiagonal(cudaStream_t stream, float* a, int64_t n, int64_t batch, float value);
cudaError_t ZeroSmallSingularVectors(cudaStream_t stream, float* u, const float* s, int64_t batch,
                                     int64_t rows, int64_t k, float relative_tolerance);

// Σx² of each of `batch` matrices of `size` elements, in fp64, in a fixed order (the same bits
// on every run). `partials` holds batch·SumSquaresBlocks(batch, size) doubles; `sums` batch.
int SumSquaresBlocks(int64_t batch, int64_t size);
cudaError_t MatrixSumSquares(cudaStream_t stream, const float* x, int64_t batch, int64_t size,
                             double* partials, double* sums);

// x <- x / FrobeniusDenominator(round(√sum), ...) per matrix, the norm and divisor rounded to
// `norm_dtype`.
cudaError_t FrobeniusDivide(cudaStream_t stream, float* x, int64_t batch, int64_t size,
                            const double* sums, float safety, float eps, int eps_mode,
                            int norm_dtype);
// x <- x · target/(√sum + eps) per matrix (ScaleToRms).
cudaError_t ScaleToNorm(cudaStream_t stream, float* x, int64_t batch, int64_t size,
                        const double* sums, float target, float eps);

cudaError_t RowSumSquares(cudaStream_t stream, const float* x, int64_t rows, int64_t cols,
                          float* out);
cudaError_t ColumnSumSquares(cudaStream_t stream, const float* x, int64_t batch, int64_t rows,
                             int64_t cols, float* out);
// MuonEq (seed 001): per-row and per-column factors EquilibrationScale(√(Σu² + eps), ...) of the
// unnormalized input, then the scaling; a null factor array skips that side.
cudaError_t RowEquilibrationFactors(cudaStream_t stream, const float* x, int64_t rows, int64_t cols,
                                    float eps, float exponent, float clip, float* factors);
cudaError_t ColumnEquilibrationFactors(cudaStream_t stream, const float* x, int64_t batch,
                                       int64_t rows, int64_t cols, float eps, float exponent,
                                       float clip, float* factors);
cudaError_t ApplyEquilibration(cudaStream_t stream, float* x, int64_t batch, int64_t rows,
                               int64_t cols, const float* row_factors, const float* col_factors);

cudaError_t RowNormalize(cudaStream_t stream, float* x, int64_t rows, int64_t cols, float eps);
// NorMuon (seed 002): v <- lerp(v, mean_row(o²), 1−β₂), o_row <- o_row/(√v + eps).
cudaError_t NorMuonRows(cudaStream_t stream, float* o, float* v, int64_t rows, int64_t cols,
                        float one_minus_beta2, float eps);
// o <- o · √before/(√after + eps) per matrix.
cudaError_t NorMuonPreserveNorm(cudaStream_t stream, float* o, int64_t batch, int64_t size,
                                const double* before, const double* after, float eps);

cudaError_t Momentum(cudaStream_t stream, float* m, const float* g, float* u, int64_t n,
                     formulas::MomentumScalars scalars);
// `rate` is device memory, read when the kernel runs.
cudaError_t ApplyUpdate(cudaStream_t stream, float* w, const float* o, int64_t n,
                        const formulas::RateScalars* rate, float scale, int step_dtype);
cudaError_t AdamW(cudaStream_t stream, float* w, float* m, float* v, const float* g, int64_t n,
                  const formulas::AdamWScalars* scalars);
cudaError_t RmnpStep(cudaStream_t stream, float* w, float* m, const float* g, int64_t rows,
                     int64_t cols, RmnpScalars scalars);

// Newton–Schulz's elementwise steps around the GEMMs: x <- round(x) with its narrow copy, and,
// per n×n matrix of the batch, gram <- round(product + b·gram + a·I) in place (gram in `dtype`,
// product = c·A·A in fp32).
cudaError_t RoundAndNarrow(cudaStream_t stream, float* x, void* narrow, int64_t n, int dtype);
cudaError_t PolynomialAndNarrow(cudaStream_t stream, const float* product, void* gram, int64_t n,
                                int64_t batch, float a, float b, int dtype);

// fp32 <-> fp64 copies, and the SVD's transposed left vectors: for each matrix,
// out[r·k + j] = in[j·rows + r] narrowed to fp32.
cudaError_t Widen(cudaStream_t stream, const float* in, double* out, int64_t n);
cudaError_t Narrow(cudaStream_t stream, const double* in, float* out, int64_t n);
cudaError_t NarrowTransposed(cudaStream_t stream, const double* in, float* out, int64_t batch,
                             int64_t rows, int64_t k);

}  // namespace optd::cuda

#endif  // OPTD_KERNELS_CUDA_LAUNCH_H_
