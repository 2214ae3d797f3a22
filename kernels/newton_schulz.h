// Newton–Schulz orthogonalization: X ← aX + (bA + cA²)X with A = XXᵀ, the polynomial iteration
// Muon uses to approximate the polar factor UVᵀ of a matrix (seed 000, §1).
#ifndef OPTD_KERNELS_NEWTON_SCHULZ_H_
#define OPTD_KERNELS_NEWTON_SCHULZ_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/dtype.h"
#include "kernels/backend.h"
#include "kernels/formulas.h"

namespace optd {

using NewtonSchulzCoefficients = std::array<double, 3>;  // (a, b, c) of one step

// Most steps one orthogonalization runs, however the count is set or grows.
inline constexpr int kMaxNewtonSchulzSteps = 100;

struct NewtonSchulzConfig {
  // "keller", "polar_express", "dion_legacy", or "custom" (then `custom` holds the list).
  std::string coefficient_set = "keller";
  std::vector<NewtonSchulzCoefficients> custom;
  // Steps; steps past the end of a coefficient list repeat its last triple.
  int steps = 5;
  // Seed 003: singular values of a Frobenius-normalized m×n matrix shrink like 1/√min(m, n), so a
  // fixed step count leaves more of them small as width grows. When set, matrices whose smaller
  // dimension d exceeds `reference_dimension` get ⌈log(√(d/reference))/log(a)⌉ extra steps, where
  // a is the slope at zero of the repeated (last) triple: enough to lift the smallest singular
  // values by the factor they lost.
  bool steps_grow_with_dimension = false;
  int64_t reference_dimension = 1024;
  // GEMM inputs and outputs are rounded to this dtype (bf16 and fp16 emulate a GPU's narrow
  // computation; fp32 is exact single precision).
  DType compute_dtype = DType::kBF16;
  // X ← X / (safety·‖X‖F + eps) (kAdd) or X / max(safety·‖X‖F, eps) (kFloor) before iterating.
  float eps = 1e-7f;
  float safety = 1.0f;
  formulas::NormEpsilon eps_mode = formulas::NormEpsilon::kAdd;
  // Iterate on Xᵀ when rows > cols so the Gram matrix is the smaller one.
  bool transpose_tall = true;
};

// The named coefficient lists (../shared/REFERENCES.md); InvalidArgument for an unknown name.
absl::StatusOr<std::vector<NewtonSchulzCoefficients>> NewtonSchulzCoefficientSet(
    absl::string_view name);
// InvalidArgument for an unknown set, steps outside [1, kMaxNewtonSchulzSteps], eps <= 0,
// safety < 1, or coefficients whose scalar iteration diverges from some start in [0, 1].
absl::Status ValidateNewtonSchulzConfig(const NewtonSchulzConfig& config);
// Steps run on a rows×cols matrix under `config`.
int NewtonSchulzSteps(const NewtonSchulzConfig& config, int64_t rows, int64_t cols);
// The coefficients of step `step` (0-based). REQUIRES: ValidateNewtonSchulzConfig(config).ok().
NewtonSchulzCoefficients NewtonSchulzStepCoefficients(const NewtonSchulzConfig& config, int step);

// Floats of workspace NewtonSchulz needs for a batch of rows×cols matrices under `config` (the
// Gram matrix is min(rows, cols)² when tall matrices are transposed, rows² otherwise).
int64_t NewtonSchulzWorkspaceFloats(const NewtonSchulzConfig& config, int64_t batch, int64_t rows,
                                    int64_t cols);

// Orthogonalizes every matrix of `x` in place, on `queue`. `workspace` holds
// NewtonSchulzWorkspaceFloats(...) floats of backend memory. A zero matrix stays zero.
// REQUIRES: ValidateNewtonSchulzConfig(config).ok() (checked once where a config is accepted;
// each call re-checks only what keeps it well defined).
//
// Each step costs one symmetric rank-k update for A, one for A² (A is symmetric, so A·A = A·Aᵀ),
// and one symmetric multiply; the scalar parts ride in the BLAS calls' alpha/beta and a diagonal
// shift: B = c·A·Aᵀ + b·A, then X ← (B + aI)·X.
absl::Status NewtonSchulz(Backend& backend, Queue& queue, const MatrixBatch& x,
                          const NewtonSchulzConfig& config, float* workspace);

}  // namespace optd

#endif  // OPTD_KERNELS_NEWTON_SCHULZ_H_
