// The analysis math behind optd's optimizer metrics (../shared/DESIGN.md, "Metrics"): row
// dominance of V·Vᵀ (seed 000), spectrum figures, Newton–Schulz quality (seed 003) and per-neuron
// balance (seed 002). Inputs are backend memory; the heavy parts (Gram matrix, SVD, Newton–Schulz)
// run on the backend, the O(m·n) reductions on the host. None of it is on a step's path.
#ifndef OPTD_KERNELS_ANALYSIS_H_
#define OPTD_KERNELS_ANALYSIS_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/backend.h"
#include "kernels/newton_schulz.h"

namespace optd {

struct DominanceRatios {
  double min = 0, avg = 0, max = 0;
};

// Seed 000: r_i = (VVᵀ)_ii / ((1/(m−1))·Σ_{j≠i} |(VVᵀ)_ij|) over the rows i of the m×n matrix v.
// A row whose off-diagonal sum is zero has r_i = +inf (a diagonal VVᵀ); all-zero rows carry no
// direction and are left out. InvalidArgument for m < 2; FailedPrecondition when every row is
// zero.
absl::StatusOr<DominanceRatios> ComputeDominanceRatios(Backend& backend, Queue& queue,
                                                       const float* v, int64_t rows, int64_t cols);

// min(rows, cols) singular values of x, descending (fp64 SVD on the CPU backend).
absl::StatusOr<std::vector<float>> SingularValues(Backend& backend, Queue& queue, const float* x,
                                                  int64_t rows, int64_t cols);

// max(rows, cols)·ε_fp32: singular values at most this times σ_max count as zero (numpy's pinv
// rule).
float PolarRelativeTolerance(int64_t rows, int64_t cols);

// The exact polar factor U·Vᵀ of x (thin SVD x = U·Σ·Vᵀ, over the singular values above
// PolarRelativeTolerance; zero for a zero matrix) into `out` (rows×cols, backend memory).
absl::Status ExactPolar(Backend& backend, Queue& queue, const float* x, int64_t rows, int64_t cols,
                        float* out);

struct SpectrumStats {
  double sigma_max = 0;
  double sigma_min = 0;
  double stable_rank = 0;       // ‖X‖F²/σ_max² = Σσ²/σ_max²
  double condition_number = 0;  // σ_max/σ_min; +inf when σ_min = 0
  double entropy = 0;           // −Σ p log p, p = σ/Σσ (natural log)
};

// Figures of a spectrum; all zero for an empty or all-zero spectrum.
SpectrumStats ComputeSpectrumStats(absl::Span<const float> singular_values);

// Coefficient of variation (population std / mean) of the row ℓ2 norms of a host matrix; 0 when
// every row is zero.
double RowNormCoefficientOfVariation(absl::Span<const float> x, int64_t rows, int64_t cols);

// Cosine between two host matrices of the same size; 0 when either is zero.
double Cosine(absl::Span<const float> a, absl::Span<const float> b);

struct MatrixAnalysis {
  DominanceRatios dominance;        // of the momentum V
  double rmnp_muon_cosine = 0;      // cos(rownormalize(V), polar(V))
  SpectrumStats momentum;           // spectrum of V
  SpectrumStats update;             // spectrum of the applied update
  double ns_polar_error = 0;        // ‖NS(V) − polar(V)‖F / ‖polar(V)‖F
  double ns_small_sv_fraction = 0;  // share of σ(NS(V)) below 0.6 (seed 003)
  double neuron_norm_cv = 0;        // CV of the update's row norms (seed 002)
  double update_rms = 0;            // ‖update‖F / √(m·n)
  double grad_norm = 0;             // ‖gradient‖F
};

// Every figure for one rows×cols matrix: `momentum` V, the `update` the optimizer applied, and the
// `gradient`; `newton_schulz` is the setting whose quality is measured. FailedPrecondition when V
// is zero (there is no direction to analyze); InvalidArgument for rows < 2.
absl::StatusOr<MatrixAnalysis> AnalyzeMatrix(Backend& backend, Queue& queue, const float* momentum,
                                             const float* update, const float* gradient,
                                             int64_t rows, int64_t cols,
                                             const NewtonSchulzConfig& newton_schulz);

}  // namespace optd

#endif  // OPTD_KERNELS_ANALYSIS_H_
