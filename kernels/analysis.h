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
#include "kernels/polar.h"

namespace optd {

struct DominanceRatios {
  double min = 0, avg = 0, max = 0;
};

// How AnalyzeMatrix computes its figures, and how large a piece of work it hands BLAS at once.
//
// Matrices with min(rows, cols) <= exact_max_dim take the exact path: fp64 SVDs of V, of the
// update and of the real Newton–Schulz output NS(V), and the exact polar factor. Larger ones take
// the estimate path, which forms no SVD and runs no Newton–Schulz GEMM on the matrix. It costs
// the exact dominance ratios (one pass of row blocks of V·Vᵀ) and Lanczos runs (one on V's Gram
// matrix, one on the update's, one more on V·Vᵀ when V is tall) of lanczos_steps steps, each step
// two products of the matrix with a block of `probes` vectors; the host holds
// probes·lanczos_steps·rows fp64 Lanczos vectors. The products are fp32.
//
// The estimate path's errors, figure by figure (bounds, and the worst error the tests measured),
// are derived in kernels/ANALYSIS_ERRORS.md. In short: the dominance ratios, neuron_norm_cv,
// update_rms and grad_norm are exact; sigma_max (and so stable_rank) converges fast;
// sigma_min and condition_number are bounds, not estimates; the traces (entropy, ns_polar_error,
// ns_small_sv_fraction, rmnp_muon_cosine) have a standard error of about √(2/(probes·k)).
//
// Every figure is deterministic: the probes come from `seed`.
struct AnalysisOptions {
  int64_t exact_max_dim = 1024;
  int probes = 8;
  int lanczos_steps = 40;
  uint64_t seed = 0x5eed'0a1a'7515'0001;
  // Multiply-adds one BLAS call may do. Every call the analysis issues itself (Gram blocks,
  // products, Lanczos products) is split into blocks of at least one row that stay below this, so
  // a training step that shares the device with the analysis (the GPU's low-priority queue, or
  // the cores under the CPU backends' single-threaded BLAS calls) waits for at most one block. The
  // exact path's LAPACK SVDs and its Newton–Schulz run are not split: min(rows, cols) <=
  // exact_max_dim bounds their size in one dimension only (the other is the matrix's own).
  int64_t max_flops_per_call = int64_t{1} << 28;
};

// InvalidArgument for probes, lanczos_steps or max_flops_per_call below 1, or a negative
// exact_max_dim.
absl::Status ValidateAnalysisOptions(const AnalysisOptions& options);

// Seed 000: r_i = (VVᵀ)_ii / ((1/(m−1))·Σ_{j≠i} |(VVᵀ)_ij|) over the rows i of the m×n matrix v.
// A row whose off-diagonal sum is zero has r_i = +inf (a diagonal VVᵀ); all-zero rows carry no
// direction and are left out. VVᵀ is formed in row blocks (options.max_flops_per_call) and
// reduced on the host block by block; it is never held whole. InvalidArgument for m < 2 or
// invalid options; FailedPrecondition when every row is zero.
absl::StatusOr<DominanceRatios> ComputeDominanceRatios(Backend& backend, Queue& queue,
                                                       const float* v, int64_t rows, int64_t cols,
                                                       const AnalysisOptions& options = {});

// min(rows, cols) singular values of x, descending (fp64 SVD on the CPU backend).
absl::StatusOr<std::vector<float>> SingularValues(Backend& backend, Queue& queue, const float* x,
                                                  int64_t rows, int64_t cols);

// Newton–Schulz acts on each singular value alone: in exact arithmetic NS(V) = U·p(Σ)·Wᵀ for the
// thin SVD V = U·Σ·Wᵀ, where p(σ) is the composition of the step polynomials a·s + b·s³ + c·s⁵
// that NewtonSchulz runs on a rows×cols matrix under `config` (NewtonSchulzSteps steps,
// NewtonSchulzStepCoefficients), applied to σ/FrobeniusDenominator(‖V‖F, safety, eps, eps_mode).
// The rounding to the compute dtype is not modelled. REQUIRES: ValidateNewtonSchulzConfig(config).
class NewtonSchulzSingularValueMap {
 public:
  NewtonSchulzSingularValueMap(const NewtonSchulzConfig& config, int64_t rows, int64_t cols,
                               double frobenius_norm);
  // p(σ).
  double operator()(double sigma) const;

 private:
  double denominator_;
  std::vector<NewtonSchulzCoefficients> steps_;
};

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
  bool estimated = false;           // the estimate path ran (AnalysisOptions)
};

// Every figure for one rows×cols matrix: `momentum` V, the `update` the optimizer applied, and the
// `gradient`; `newton_schulz` is the setting whose quality is measured. Exact when
// min(rows, cols) <= options.exact_max_dim, estimated otherwise (AnalysisOptions states each
// estimate's error). FailedPrecondition when V is zero (there is no direction to analyze);
// InvalidArgument for rows < 2 or invalid options.
absl::StatusOr<MatrixAnalysis> AnalyzeMatrix(Backend& backend, Queue& queue, const float* momentum,
                                             const float* update, const float* gradient,
                                             int64_t rows, int64_t cols,
                                             const NewtonSchulzConfig& newton_schulz,
                                             const AnalysisOptions& options = {});

}  // namespace optd

#endif  // OPTD_KERNELS_ANALYSIS_H_
