// Newton–Schulz orthogonalization: X ← aX + (bA + cA²)X with A = XXᵀ, the polynomial iteration
// Muon uses to approximate the polar factor UVᵀ of a matrix (seed 000, §1).
#ifndef OPTD_KERNELS_NEWTON_SCHULZ_H_
#define OPTD_KERNELS_NEWTON_SCHULZ_H_

#include <array>
#include <cstdint>
#include <optional>
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

// How the polynomial is evaluated. Both run the same steps on the same coefficients, so in exact
// arithmetic they give the same matrix.
//   kStandard: X ← aX + (bA + cA²)X with A = XXᵀ at every step (Keller Jordan's Muon).
//   kGram: Gram Newton–Schulz (Zhang, Amsel, Chen, Dao, 2026; the gram-newton-schulz package):
//     for an n×m X with n < m, iterate on the n×n Gram matrix R = XXᵀ and the accumulated
//     polynomial Q instead of on X: Z = bR + cR², Q ← QZ + aQ (Q = Z + aI at the start of a
//     segment), R ← Z(RZ + aR) + a(RZ + aR); X is touched at the start, at each restart
//     (X ← QX, R ← XXᵀ, Q ← I) and at the end (X ← QX). R, Z and Q are polynomials in one
//     matrix, so they commute and every product of two of them is symmetric: only upper
//     triangles are computed. A square matrix runs the standard iteration, as the reference
//     does (its Gram matrix is as large as X, so nothing is saved).
//   kAuto: Gram where it measured faster on the backend (GramNewtonSchulzMinAspect), standard
//     elsewhere.
enum class NewtonSchulzMethod { kStandard, kGram, kAuto };

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
  // kAuto by default: Gram's fidelity checks hold (tests/kernels/newton_schulz_test.cc).
  NewtonSchulzMethod method = NewtonSchulzMethod::kAuto;
  // Gram iterations (0-based) that restart from X; iterations past the run's last step never
  // fire. Unset: GramNewtonSchulzRestarts' defaults.
  std::optional<std::vector<int>> gram_restarts;
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

// The long side over the short one at or above which `auto` runs Gram Newton–Schulz on
// `backend` ("cpu", "cuda"), measured by bench/kernels_bench.cc (BM_NewtonSchulzMethods) and
// recorded in bench/RESULTS.md.
double GramNewtonSchulzMinAspect(absl::string_view backend);
// The restart iterations a Gram run uses, `config.gram_restarts` when set. By default {2} in half
// precision, as the reference: there R = XXᵀ grows spurious negative eigenvalues that a fresh R
// removes early. In fp32 {3}: nothing needs removing early, and the error Gram adds grows with
// the steps accumulated in Q after the last restart (bench/RESULTS.md, "Gram Newton–Schulz":
// polar express on 40×80, 1.6e-5 against the fp64 iteration with a restart at 2, 3.4e-6 at 3;
// the standard iteration 2.4e-6).
std::vector<int> GramNewtonSchulzRestarts(const NewtonSchulzConfig& config);
// The dtype a Gram run holds its matrices in: fp16 where the config computes in bf16, as the
// reference does (in bf16 R = XXᵀ carries singular values only to √ε_bf16 ≈ 0.06: over 200 draws
// polar express lifted rank-deficient inputs' null spaces, 14% further from the polar factor than
// the standard iteration in bf16; in fp16 26% closer). Normalized inputs keep every value within
// fp16's range; restarts are added where a long run's accumulated polynomial would leave it.
DType GramNewtonSchulzDType(const NewtonSchulzConfig& config);
// Whether NewtonSchulz runs the Gram iteration on a rows×cols matrix on `backend`.
bool UsesGramNewtonSchulz(const NewtonSchulzConfig& config, absl::string_view backend, int64_t rows,
                          int64_t cols);

// Floats of workspace NewtonSchulz needs for a batch of rows×cols matrices under `config` (the
// Gram matrix is min(rows, cols)² when tall matrices are transposed, rows² otherwise): X's next
// iterate and two Gram-sized matrices for the standard method, five for Gram (R, Z, Q, Q's next
// value, RZ + aR). Enough for either method where `config.method` may run Gram on the shape.
int64_t NewtonSchulzWorkspaceFloats(const NewtonSchulzConfig& config, int64_t batch, int64_t rows,
                                    int64_t cols);

// Orthogonalizes every matrix of `x` in place, on `queue`. `workspace` holds
// NewtonSchulzWorkspaceFloats(...) floats of backend memory. A zero matrix stays zero.
// REQUIRES: ValidateNewtonSchulzConfig(config).ok() (checked once where a config is accepted;
// each call re-checks only what keeps it well defined).
//
// A standard step costs one symmetric rank-k update for A, one for A² (A is symmetric, so
// A·A = A·Aᵀ), and one symmetric multiply; the scalar parts ride in the BLAS calls' alpha/beta and
// a diagonal shift: B = c·A·Aᵀ + b·A, then X ← (B + aI)·X. A Gram step costs one rank-k update
// (R²) and up to three upper-triangle products of n×n matrices; see NewtonSchulzMethod.
absl::Status NewtonSchulz(Backend& backend, Queue& queue, const MatrixBatch& x,
                          const NewtonSchulzConfig& config, float* workspace);

}  // namespace optd

#endif  // OPTD_KERNELS_NEWTON_SCHULZ_H_
