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
// Errors of the estimate path, with k = min(rows, cols), p = probes, s = √(2/(p·k)) (8 probes:
// 0.035 at k = 200, 0.016 at k = 1024, 0.008 at k = 4096). "Tests" quotes the worst error
// measured in analysis_test (k = 200, p = 8, 40 steps; six matrices).
//
// - Exact: the dominance ratios (the same blocked V·Vᵀ as the exact path), neuron_norm_cv,
//   update_rms, grad_norm, and ‖X‖F² in stable_rank.
// - sigma_max: the largest Ritz value of the k×k Gram matrix XᵀX or XXᵀ over all probes, a lower
//   bound that Lanczos reaches fast; stable_rank = ‖X‖F²/sigma_max² is an upper bound to the
//   same accuracy (tests: 3e-7 relative; asserted 1e-3).
// - sigma_min: the smallest Ritz value, an upper bound on σ_min; condition_number is therefore a
//   lower bound, close only when the low end of the spectrum is resolved (tests: 0.78 to 1.0
//   times exact, but 0.15 times for singular values log-spaced over three decades). It is not an
//   estimate of the true value. Both bounds hold up to the fp32 rounding of the products: the
//   operator Lanczos sees is within E = (γ_rows + γ_cols)·‖X‖F·σ_max + 2u·σ_max² of the Gram
//   matrix (γ_n = n·u/(1 − n·u), u = 2⁻²⁴), so the Ritz values lie in [σ_min² − E, σ_max² + E].
//   Where E exceeds σ_min² (condition numbers past about 1/√(γ·stable rank): a rank-20 matrix
//   plus 1e-3 noise, condition 5e3, came out 7% below σ_min with OpenBLAS's Haswell kernels) the
//   smallest Ritz value bounds nothing; the tests assert exactly these bounds.
// - Traces tr f(A), A the Gram matrix, by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017,
//   "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature"): Rademacher probes z,
//   tr f(A) ≈ (k/p)·Σ_z Σ_j τ_j²·f(θ_j) over the Ritz values θ_j and the first eigenvector
//   components τ_j of each probe's tridiagonal. For Rademacher probes Var(zᵀf(A)z) <= 2‖f(A)‖F²,
//   so the standard error of tr f(A)/k is at most s·rms(f(σ²)) over the spectrum (relative:
//   s·rms/|mean|); only the spread of f(A) off its diagonal counts, so a spectrum on which f is
//   nearly constant does better. On top of that is the error of Gauss quadrature with
//   lanczos_steps nodes: negligible for smooth f, but Lanczos resolves the spectrum near σ = 0
//   only down to about its smallest Ritz value, so a function that changes steeply below it is
//   integrated as if its mass sat on that node.
//   - entropy = log S − (1/S)·Σσ·log σ with S = tr(A^½) and Σσ·log σ = tr(½·A^½·log A), both by
//     SLQ from the same probes. To first order its error is that of tr g(A)/S for
//     g(σ²) = σ·(1 − H − log(σ/S)), so its standard error is at most
//     s·rms_i(k·p_i·(1 − H − log p_i)) with p_i = σ_i/S: s for a flat spectrum, and smaller in
//     practice (tests: 0.053 absolute at 0.52 of that bound, on a rank-20-plus-noise matrix whose
//     small singular values fp32 products blur; at most 0.023 on the others).
//   - ns_polar_error: in exact arithmetic NS(V) = U·p(Σ)·Wᵀ (NewtonSchulzSingularValueMap), so
//     ‖NS(V) − polar(V)‖F² = Σ_i (p(σ_i) − 1)², estimated by SLQ, over ‖polar(V)‖F² = k (V is
//     taken to have full rank). The compute dtype's rounding of the real iteration (bf16 by
//     default) is not modelled: this is the error of the polynomial, not of its rounded run.
//     Relative standard error at most ½·s·rms(h)/mean(h) for h = (p − 1)² (tests: 2.5 times that
//     at worst, 5.8% relative, on a Gaussian matrix).
//   - ns_small_sv_fraction = #{i: |p(σ_i)| < 0.6}/k, the SLQ of a step, which Gauss quadrature
//     smooths: standard error at most s·√fraction, plus a bias bounded by the weights of the two
//     Ritz values around the threshold σ* (where |p(σ*)| = 0.6; Chebyshev–Markov–Stieltjes). When
//     σ* lies below the smallest Ritz value the mass under it is missed: with k = 200 and 40
//     steps, singular values log-spaced from 1 to 1e-3 give 0 for an exact 0.235 (and
//     ns_polar_error 0.18 for 0.38). Tests with a resolved threshold: 0.018 absolute.
// - rmnp_muon_cosine = tr(D⁻¹·(VVᵀ)^½)/(√k·√r) with D the nonzero row norms of V and r their
//   count: tr(Rᵀ·polar(V)) = tr(D⁻¹·U·Σ·Uᵀ) for V = U·Σ·Wᵀ and R = D⁻¹V, and ‖polar(V)‖F = √k for
//   a full-rank V. The trace is Hutchinson's estimate zᵀ·D⁻¹·(VVᵀ)^½·z with (VVᵀ)^½·z ≈
//   ‖z‖·Q·T^½·e₁ from the Lanczos basis Q. Since ‖D⁻¹·(VVᵀ)^½‖F² = r, its standard error is at
//   most s absolute (tests: 0.052 at worst, 1.5·s), plus the Lanczos error of the square root,
//   small unless V is ill-conditioned.
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
