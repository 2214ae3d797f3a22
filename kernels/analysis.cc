#include "kernels/analysis.h"

#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/lanczos.h"
#include "kernels/row_blocks.h"

namespace optd {
namespace {

absl::StatusOr<std::vector<float>> ToHost(Backend& backend, Queue& queue, const float* x,
                                          int64_t count) {
  std::vector<float> host(count);
  OPTD_RETURN_IF_ERROR(backend.Download(queue, host.data(), x, count * sizeof(float)));
  OPTD_RETURN_IF_ERROR(backend.Synchronize(queue));
  return host;
}

absl::StatusOr<Buffer> AllocateFloats(Backend& backend, int64_t count) {
  return backend.Allocate(static_cast<size_t>(count) * sizeof(float));
}

double SumSquares(absl::Span<const float> x) {
  double s = 0;
  for (float v : x) s += static_cast<double>(v) * v;
  return s;
}

LanczosOptions LanczosOptionsOf(const AnalysisOptions& options) {
  return LanczosOptions{.probes = options.probes,
                        .steps = options.lanczos_steps,
                        .seed = options.seed,
                        .max_flops_per_call = options.max_flops_per_call};
}

absl::Status CheckShape(int64_t rows, int64_t cols) {
  if (rows < 1 || cols < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("analysis: matrix shape ", rows, "x", cols, " is empty"));
  }
  return absl::OkStatus();
}

// The spectrum figures of X from the SLQ of its k×k Gram matrix (AnalysisOptions states their
// errors); ‖X‖F² is exact.
SpectrumStats EstimateSpectrumStats(const Quadrature& quadrature, double frobenius_squared) {
  SpectrumStats stats;
  const double largest = *std::max_element(quadrature.nodes.begin(), quadrature.nodes.end());
  const double smallest = *std::min_element(quadrature.nodes.begin(), quadrature.nodes.end());
  if (largest <= 0.0) return stats;
  stats.sigma_max = std::sqrt(largest);
  stats.sigma_min = std::sqrt(smallest);
  stats.stable_rank = frobenius_squared / largest;
  stats.condition_number = stats.sigma_min == 0.0 ? std::numeric_limits<double>::infinity()
                                                  : stats.sigma_max / stats.sigma_min;
  const double sum = quadrature.Trace([](double l) { return std::sqrt(l); });
  const double sum_log =
      quadrature.Trace([](double l) { return l > 0.0 ? 0.5 * std::sqrt(l) * std::log(l) : 0.0; });
  if (sum > 0.0) stats.entropy = std::log(sum) - sum_log / sum;
  return stats;
}

absl::StatusOr<SpectrumStats> EstimateSpectrum(Backend& backend, Queue& queue, const float* x,
                                               int64_t rows, int64_t cols, double frobenius_squared,
                                               const AnalysisOptions& options) {
  if (frobenius_squared == 0.0) return SpectrumStats{};
  OPTD_ASSIGN_OR_RETURN(LanczosRun run, RunLanczos(backend, queue, x, rows, cols, rows <= cols,
                                                   LanczosOptionsOf(options)));
  OPTD_ASSIGN_OR_RETURN(Quadrature quadrature, SlqQuadrature(run));
  return EstimateSpectrumStats(quadrature, frobenius_squared);
}

// Hutchinson's estimate of tr(D⁻¹·(VVᵀ)^½) from a Lanczos run on VVᵀ: per probe z,
// zᵀ·D⁻¹·y with y = ‖z‖·Q·f(T)·e₁ ≈ (VVᵀ)^½·z, f = √; rows with D = 0 are left out.
absl::StatusOr<double> EstimateRowScaledSqrtTrace(const LanczosRun& run,
                                                  const std::vector<double>& row_norms) {
  const int64_t order = run.order;
  const double norm = std::sqrt(static_cast<double>(order));
  double total = 0;
  for (const LanczosRun::Probe& probe : run.probes) {
    OPTD_ASSIGN_OR_RETURN(RitzPairs ritz, Ritz(probe));
    const size_t n = ritz.values.size();
    std::vector<double> coefficients(n, 0.0);  // f(T)·e₁ in the Lanczos basis
    for (size_t j = 0; j < n; ++j) {
      const double c = std::sqrt(ritz.values[j]) * ritz.vectors[j * n];
      for (size_t i = 0; i < n; ++i) coefficients[i] += ritz.vectors[j * n + i] * c;
    }
    const double* z = probe.basis.data();  // z/‖z‖
    for (int64_t r = 0; r < order; ++r) {
      if (row_norms[r] == 0.0) continue;
      double y = 0;
      for (size_t i = 0; i < n; ++i) y += probe.basis[i * order + r] * coefficients[i];
      total += (z[r] * norm) * (norm * y) / row_norms[r];
    }
  }
  return total / static_cast<double>(run.probes.size());
}

}  // namespace

absl::Status ValidateAnalysisOptions(const AnalysisOptions& options) {
  if (options.probes < 1 || options.lanczos_steps < 1 || options.max_flops_per_call < 1 ||
      options.exact_max_dim < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "analysis options: probes (", options.probes, "), lanczos_steps (", options.lanczos_steps,
        ") and max_flops_per_call (", options.max_flops_per_call,
        ") must be >= 1 and exact_max_dim (", options.exact_max_dim, ") >= 0"));
  }
  return absl::OkStatus();
}

NewtonSchulzSingularValueMap::NewtonSchulzSingularValueMap(const NewtonSchulzConfig& config,
                                                           int64_t rows, int64_t cols,
                                                           double frobenius_norm)
    : denominator_(formulas::FrobeniusDenominator(static_cast<float>(frobenius_norm), config.safety,
                                                  config.eps, config.eps_mode)) {
  const int steps = NewtonSchulzSteps(config, rows, cols);
  for (int step = 0; step < steps; ++step) {
    steps_.push_back(NewtonSchulzStepCoefficients(config, step));
  }
}

double NewtonSchulzSingularValueMap::operator()(double sigma) const {
  double s = sigma / denominator_;
  for (const auto& [a, b, c] : steps_) s = formulas::NewtonSchulzPolynomial(s, a, b, c);
  return s;
}

absl::StatusOr<DominanceRatios> ComputeDominanceRatios(Backend& backend, Queue& queue,
                                                       const float* v, int64_t rows, int64_t cols,
                                                       const AnalysisOptions& options) {
  OPTD_RETURN_IF_ERROR(CheckShape(rows, cols));
  OPTD_RETURN_IF_ERROR(ValidateAnalysisOptions(options));
  if (rows < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("dominance ratio needs at least 2 rows, got ", rows));
  }
  // Rows [first, first + block) of VVᵀ at a time: V[first:first + block]·Vᵀ.
  const int64_t block = std::min(rows, RowsPerCall(rows * cols, options.max_flops_per_call));
  OPTD_ASSIGN_OR_RETURN(Buffer gram, AllocateFloats(backend, block * rows));
  std::vector<float> p(block * rows);
  DominanceRatios r{std::numeric_limits<double>::infinity(), 0.0, 0.0};
  int64_t counted = 0;
  for (int64_t first = 0; first < rows; first += block) {
    const int64_t count = std::min(block, rows - first);
    OPTD_RETURN_IF_ERROR(backend.Gemm(queue, GemmArgs{.trans_b = Transpose::kYes,
                                                      .m = count,
                                                      .n = rows,
                                                      .k = cols,
                                                      .a = v + first * cols,
                                                      .lda = cols,
                                                      .b = v,
                                                      .ldb = cols,
                                                      .c = gram.f32(),
                                                      .ldc = rows}));
    OPTD_RETURN_IF_ERROR(
        backend.Download(queue, p.data(), gram.f32(), count * rows * sizeof(float)));
    OPTD_RETURN_IF_ERROR(backend.Synchronize(queue));
    for (int64_t b = 0; b < count; ++b) {
      const int64_t i = first + b;
      const float* row = p.data() + b * rows;
      const double diagonal = row[i];
      double off = 0;
      for (int64_t j = 0; j < rows; ++j) {
        if (j != i) off += std::fabs(static_cast<double>(row[j]));
      }
      if (diagonal == 0.0) continue;  // an all-zero row of V
      const double ratio = off == 0.0 ? std::numeric_limits<double>::infinity()
                                      : diagonal / (off / static_cast<double>(rows - 1));
      r.min = std::min(r.min, ratio);
      r.max = std::max(r.max, ratio);
      r.avg += ratio;
      ++counted;
    }
  }
  if (counted == 0) {
    return absl::FailedPreconditionError("dominance ratio: every row of the matrix is zero");
  }
  r.avg /= static_cast<double>(counted);
  return r;
}

absl::StatusOr<std::vector<float>> SingularValues(Backend& backend, Queue& queue, const float* x,
                                                  int64_t rows, int64_t cols) {
  OPTD_RETURN_IF_ERROR(CheckShape(rows, cols));
  const int64_t k = std::min(rows, cols);
  OPTD_ASSIGN_OR_RETURN(Buffer s, AllocateFloats(backend, k));
  OPTD_RETURN_IF_ERROR(backend.SingularValueDecomposition(
      queue, MatrixBatch{const_cast<float*>(x), 1, rows, cols}, s.f32(), nullptr, nullptr));
  return ToHost(backend, queue, s.f32(), k);
}

SpectrumStats ComputeSpectrumStats(absl::Span<const float> sv) {
  SpectrumStats stats;
  double sum = 0, sum_squares = 0;
  for (float s : sv) {
    sum += s;
    sum_squares += static_cast<double>(s) * s;
  }
  if (sv.empty() || sum == 0.0) return stats;
  stats.sigma_max = *std::max_element(sv.begin(), sv.end());
  stats.sigma_min = *std::min_element(sv.begin(), sv.end());
  stats.stable_rank = sum_squares / (stats.sigma_max * stats.sigma_max);
  stats.condition_number = stats.sigma_min == 0.0 ? std::numeric_limits<double>::infinity()
                                                  : stats.sigma_max / stats.sigma_min;
  for (float s : sv) {
    const double p = s / sum;
    if (p > 0) stats.entropy -= p * std::log(p);
  }
  return stats;
}

double RowNormCoefficientOfVariation(absl::Span<const float> x, int64_t rows, int64_t cols) {
  std::vector<double> norms(rows);
  double mean = 0;
  for (int64_t r = 0; r < rows; ++r) {
    norms[r] = std::sqrt(SumSquares(x.subspan(r * cols, cols)));
    mean += norms[r];
  }
  mean /= static_cast<double>(rows);
  if (mean == 0.0) return 0.0;
  double variance = 0;
  for (double n : norms) variance += (n - mean) * (n - mean);
  variance /= static_cast<double>(rows);
  return std::sqrt(variance) / mean;
}

double Cosine(absl::Span<const float> a, absl::Span<const float> b) {
  double dot = 0;
  for (size_t i = 0; i < a.size(); ++i) dot += static_cast<double>(a[i]) * b[i];
  const double norms = std::sqrt(SumSquares(a) * SumSquares(b));
  return norms == 0.0 ? 0.0 : dot / norms;
}

namespace {

// The spectra, the cosine and the Newton–Schulz figures from fp64 SVDs, the exact polar factor
// and a real Newton–Schulz run.
absl::Status AnalyzeExactly(Backend& backend, Queue& queue, const float* momentum,
                            const float* update, int64_t rows, int64_t cols,
                            const NewtonSchulzConfig& newton_schulz, const AnalysisOptions& options,
                            MatrixAnalysis* a) {
  const int64_t size = rows * cols;
  OPTD_ASSIGN_OR_RETURN(std::vector<float> momentum_sv,
                        SingularValues(backend, queue, momentum, rows, cols));
  a->momentum = ComputeSpectrumStats(momentum_sv);
  OPTD_ASSIGN_OR_RETURN(std::vector<float> update_sv,
                        SingularValues(backend, queue, update, rows, cols));
  a->update = ComputeSpectrumStats(update_sv);

  // polar(V), NS(V) and rownormalize(V), side by side in one buffer.
  OPTD_ASSIGN_OR_RETURN(
      Buffer work, AllocateFloats(backend, 3 * size + NewtonSchulzWorkspaceFloats(newton_schulz, 1,
                                                                                  rows, cols)));
  float* polar = work.f32();
  float* ns = polar + size;
  float* rows_normalized = ns + size;
  float* ns_workspace = rows_normalized + size;
  OPTD_RETURN_IF_ERROR(
      ExactPolar(backend, queue, momentum, rows, cols, polar, options.max_flops_per_call));
  OPTD_RETURN_IF_ERROR(backend.Copy(queue, ns, momentum, size * sizeof(float)));
  OPTD_RETURN_IF_ERROR(
      NewtonSchulz(backend, queue, MatrixBatch{ns, 1, rows, cols}, newton_schulz, ns_workspace));
  OPTD_RETURN_IF_ERROR(backend.Copy(queue, rows_normalized, momentum, size * sizeof(float)));
  OPTD_RETURN_IF_ERROR(backend.RowNormalize(queue, rows_normalized, rows, cols, 1e-12f));
  OPTD_ASSIGN_OR_RETURN(std::vector<float> host, ToHost(backend, queue, polar, 3 * size));
  const absl::Span<const float> p = absl::MakeConstSpan(host).subspan(0, size);
  const absl::Span<const float> n = absl::MakeConstSpan(host).subspan(size, size);
  const absl::Span<const float> r = absl::MakeConstSpan(host).subspan(2 * size, size);
  double error = 0;
  for (int64_t i = 0; i < size; ++i) error += (double(n[i]) - p[i]) * (double(n[i]) - p[i]);
  a->ns_polar_error = std::sqrt(error / SumSquares(p));
  a->rmnp_muon_cosine = Cosine(r, p);
  OPTD_ASSIGN_OR_RETURN(std::vector<float> ns_sv, SingularValues(backend, queue, ns, rows, cols));
  a->ns_small_sv_fraction = static_cast<double>(std::count_if(ns_sv.begin(), ns_sv.end(),
                                                              [](float s) { return s < 0.6f; })) /
                            static_cast<double>(ns_sv.size());
  return absl::OkStatus();
}

// The same figures by Lanczos on the Gram matrices and stochastic trace estimates; no SVD and no
// Newton–Schulz run (AnalysisOptions states the errors).
absl::Status AnalyzeByEstimates(Backend& backend, Queue& queue, const float* momentum,
                                const float* update, absl::Span<const float> v,
                                absl::Span<const float> u, int64_t rows, int64_t cols,
                                const NewtonSchulzConfig& newton_schulz,
                                const AnalysisOptions& options, MatrixAnalysis* a) {
  const int64_t k = std::min(rows, cols);
  const double momentum_squared = SumSquares(v);
  OPTD_ASSIGN_OR_RETURN(LanczosRun momentum_run,
                        RunLanczos(backend, queue, momentum, rows, cols,
                                   /*outer=*/rows <= cols, LanczosOptionsOf(options)));
  OPTD_ASSIGN_OR_RETURN(Quadrature quadrature, SlqQuadrature(momentum_run));
  a->momentum = EstimateSpectrumStats(quadrature, momentum_squared);
  OPTD_ASSIGN_OR_RETURN(
      a->update, EstimateSpectrum(backend, queue, update, rows, cols, SumSquares(u), options));

  // Quadrature nodes are eigenvalues σ² of the Gram matrix.
  const NewtonSchulzSingularValueMap ns_map(newton_schulz, rows, cols, std::sqrt(momentum_squared));
  const double error = quadrature.Trace([&](double l) {
    const double d = ns_map(std::sqrt(l)) - 1.0;
    return d * d;
  });
  a->ns_polar_error = std::sqrt(std::max(0.0, error) / static_cast<double>(k));
  const double small =
      quadrature.Trace([&](double l) { return std::fabs(ns_map(std::sqrt(l))) < 0.6 ? 1.0 : 0.0; });
  a->ns_small_sv_fraction = std::clamp(small / static_cast<double>(k), 0.0, 1.0);

  // cos(R, polar(V)) = tr(D⁻¹·(VVᵀ)^½) / (‖R‖F·‖polar(V)‖F); the SLQ run above is on VVᵀ
  // already when V is wide.
  std::vector<double> row_norms(rows);
  int64_t nonzero_rows = 0;
  for (int64_t r = 0; r < rows; ++r) {
    row_norms[r] = std::sqrt(SumSquares(v.subspan(r * cols, cols)));
    nonzero_rows += row_norms[r] > 0.0;
  }
  LanczosRun outer_run;
  if (rows > cols) {
    OPTD_ASSIGN_OR_RETURN(outer_run, RunLanczos(backend, queue, momentum, rows, cols,
                                                /*outer=*/true, LanczosOptionsOf(options)));
  }
  OPTD_ASSIGN_OR_RETURN(const double trace, EstimateRowScaledSqrtTrace(
                                                rows > cols ? outer_run : momentum_run, row_norms));
  a->rmnp_muon_cosine = trace / std::sqrt(static_cast<double>(k) * nonzero_rows);
  a->estimated = true;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<MatrixAnalysis> AnalyzeMatrix(Backend& backend, Queue& queue, const float* momentum,
                                             const float* update, const float* gradient,
                                             int64_t rows, int64_t cols,
                                             const NewtonSchulzConfig& newton_schulz,
                                             const AnalysisOptions& options) {
  OPTD_RETURN_IF_ERROR(CheckShape(rows, cols));
  OPTD_RETURN_IF_ERROR(ValidateNewtonSchulzConfig(newton_schulz));
  OPTD_RETURN_IF_ERROR(ValidateAnalysisOptions(options));
  const int64_t size = rows * cols;
  MatrixAnalysis a;
  OPTD_ASSIGN_OR_RETURN(std::vector<float> v, ToHost(backend, queue, momentum, size));
  if (SumSquares(v) == 0.0) {
    return absl::FailedPreconditionError("analysis: the momentum is zero; nothing to analyze");
  }
  OPTD_ASSIGN_OR_RETURN(a.dominance,
                        ComputeDominanceRatios(backend, queue, momentum, rows, cols, options));
  OPTD_ASSIGN_OR_RETURN(std::vector<float> u, ToHost(backend, queue, update, size));
  if (std::min(rows, cols) <= options.exact_max_dim) {
    OPTD_RETURN_IF_ERROR(
        AnalyzeExactly(backend, queue, momentum, update, rows, cols, newton_schulz, options, &a));
  } else {
    OPTD_RETURN_IF_ERROR(AnalyzeByEstimates(backend, queue, momentum, update, v, u, rows, cols,
                                            newton_schulz, options, &a));
  }
  a.neuron_norm_cv = RowNormCoefficientOfVariation(u, rows, cols);
  a.update_rms = std::sqrt(SumSquares(u) / static_cast<double>(size));
  OPTD_ASSIGN_OR_RETURN(std::vector<float> g, ToHost(backend, queue, gradient, size));
  a.grad_norm = std::sqrt(SumSquares(g));
  return a;
}

}  // namespace optd
