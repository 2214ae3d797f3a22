#include "kernels/analysis.h"

#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
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

absl::Status CheckShape(int64_t rows, int64_t cols) {
  if (rows < 1 || cols < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("analysis: matrix shape ", rows, "x", cols, " is empty"));
  }
  return absl::OkStatus();
}

// Lanczos on the Gram matrix A = X·Xᵀ (`outer`, order rows) or Xᵀ·X (order cols) of a rows×cols
// matrix x in backend memory, from `probes` Rademacher start vectors at once: each step's A·Q is
// two row-blocked GEMMs with the block Q of the probes' current vectors as columns; the recurrence
// and the full reorthogonalization run per probe in fp64 on the host.
struct LanczosRun {
  int64_t order = 0;
  struct Probe {
    std::vector<double> alpha, beta;  // the tridiagonal T: diagonal, and the steps−1 below it
    std::vector<double> basis;        // steps rows of `order`: the orthonormal Lanczos vectors
  };
  std::vector<Probe> probes;
};

absl::StatusOr<LanczosRun> RunLanczos(Backend& backend, Queue& queue, const float* x, int64_t rows,
                                      int64_t cols, bool outer, const AnalysisOptions& options) {
  const int64_t order = outer ? rows : cols;
  const int64_t inner = outer ? cols : rows;
  const int64_t p = options.probes;
  // Past `order` steps the Krylov space is the whole space.
  const int64_t steps = std::min<int64_t>(options.lanczos_steps, order);
  LanczosRun run;
  run.order = order;
  run.probes.resize(p);
  std::mt19937_64 rng(options.seed);
  const double start = 1.0 / std::sqrt(static_cast<double>(order));
  for (LanczosRun::Probe& probe : run.probes) {
    probe.basis.reserve(steps * order);
    for (int64_t i = 0; i < order; ++i) probe.basis.push_back((rng() & 1) != 0 ? start : -start);
  }
  OPTD_ASSIGN_OR_RETURN(Buffer work, AllocateFloats(backend, (2 * order + inner) * p));
  float* q_block = work.f32();           // order×p
  float* product = q_block + order * p;  // order×p
  float* half = product + order * p;     // inner×p: Xᵀ·Q or X·Q
  std::vector<float> host(order * p);
  std::vector<double> w(order);
  std::vector<bool> active(p, true);
  for (int64_t step = 0; step < steps; ++step) {
    for (int64_t j = 0; j < p; ++j) {
      const double* q = run.probes[j].basis.data() + step * order;
      for (int64_t i = 0; i < order; ++i)
        host[i * p + j] = active[j] ? static_cast<float>(q[i]) : 0;
    }
    OPTD_RETURN_IF_ERROR(backend.Upload(queue, q_block, host.data(), host.size() * sizeof(float)));
    const GemmArgs into_half{.m = inner,
                             .n = p,
                             .k = order,
                             .a = x,
                             .lda = cols,
                             .b = q_block,
                             .ldb = p,
                             .c = half,
                             .ldc = p};
    const GemmArgs back{.m = order,
                        .n = p,
                        .k = inner,
                        .a = x,
                        .lda = cols,
                        .b = half,
                        .ldb = p,
                        .c = product,
                        .ldc = p};
    if (outer) {  // A·Q = X·(Xᵀ·Q)
      OPTD_RETURN_IF_ERROR(
          TransposedGemmInRowBlocks(backend, queue, into_half, options.max_flops_per_call));
      OPTD_RETURN_IF_ERROR(GemmInRowBlocks(backend, queue, back, options.max_flops_per_call));
    } else {  // A·Q = Xᵀ·(X·Q)
      OPTD_RETURN_IF_ERROR(GemmInRowBlocks(backend, queue, into_half, options.max_flops_per_call));
      OPTD_RETURN_IF_ERROR(
          TransposedGemmInRowBlocks(backend, queue, back, options.max_flops_per_call));
    }
    OPTD_RETURN_IF_ERROR(
        backend.Download(queue, host.data(), product, host.size() * sizeof(float)));
    OPTD_RETURN_IF_ERROR(backend.Synchronize(queue));
    for (int64_t j = 0; j < p; ++j) {
      if (!active[j]) continue;
      LanczosRun::Probe& probe = run.probes[j];
      const double* q = probe.basis.data() + step * order;
      for (int64_t i = 0; i < order; ++i) w[i] = host[i * p + j];
      double alpha = 0;
      for (int64_t i = 0; i < order; ++i) alpha += q[i] * w[i];
      probe.alpha.push_back(alpha);
      if (step + 1 == steps) continue;
      // Full reorthogonalization against every earlier vector, twice (classical Gram–Schmidt
      // twice is orthogonal to working precision); it also removes α·q and β·q_previous.
      for (int pass = 0; pass < 2; ++pass) {
        for (int64_t v = 0; v <= step; ++v) {
          const double* b = probe.basis.data() + v * order;
          double dot = 0;
          for (int64_t i = 0; i < order; ++i) dot += b[i] * w[i];
          for (int64_t i = 0; i < order; ++i) w[i] -= dot * b[i];
        }
      }
      double beta = 0;
      for (double e : w) beta += e * e;
      beta = std::sqrt(beta);
      // An invariant Krylov space: T is complete (in fp32 products only an exact one ends here).
      double scale = 0;
      for (size_t i = 0; i < probe.alpha.size(); ++i) {
        scale = std::max(scale,
                         std::fabs(probe.alpha[i]) + (i < probe.beta.size() ? probe.beta[i] : 0));
      }
      if (!(beta > 1e-12 * scale)) {
        active[j] = false;
        continue;
      }
      probe.beta.push_back(beta);
      for (int64_t i = 0; i < order; ++i) probe.basis.push_back(w[i] / beta);
    }
  }
  return run;
}

// The Gauss quadrature of one probe's tridiagonal: Ritz values θ_j (clamped at 0: A is positive
// semidefinite) and the squared first components τ_j² of their eigenvectors, whose columns are in
// `vectors` (column-major, size²).
struct RitzPairs {
  std::vector<double> values;
  std::vector<double> vectors;
  double weight(size_t j) const { return vectors[j * values.size()] * vectors[j * values.size()]; }
};

absl::StatusOr<RitzPairs> Ritz(const LanczosRun::Probe& probe) {
  const lapack_int n = static_cast<lapack_int>(probe.alpha.size());
  RitzPairs ritz{probe.alpha, std::vector<double>(static_cast<size_t>(n) * n)};
  std::vector<double> off(probe.beta.begin(), probe.beta.begin() + std::max(0, n - 1));
  off.resize(std::max(1, n - 1));
  const lapack_int info = LAPACKE_dstev(LAPACK_COL_MAJOR, 'V', n, ritz.values.data(), off.data(),
                                        ritz.vectors.data(), n);
  if (info != 0) {
    return absl::InternalError(absl::StrCat("analysis: LAPACKE_dstev failed with info=", info));
  }
  for (double& v : ritz.values) v = std::max(v, 0.0);
  return ritz;
}

// SLQ nodes and weights over all probes: tr f(A) ≈ Σ_j weight_j·f(node_j), weights (order/p)·τ_j²
// (‖z‖² = order for a Rademacher z).
struct Quadrature {
  std::vector<double> nodes, weights;
  double Trace(const std::function<double(double)>& f) const {
    double sum = 0;
    for (size_t j = 0; j < nodes.size(); ++j) sum += weights[j] * f(nodes[j]);
    return sum;
  }
};

absl::StatusOr<Quadrature> SlqQuadrature(const LanczosRun& run) {
  Quadrature quadrature;
  const double scale = static_cast<double>(run.order) / static_cast<double>(run.probes.size());
  for (const LanczosRun::Probe& probe : run.probes) {
    OPTD_ASSIGN_OR_RETURN(RitzPairs ritz, Ritz(probe));
    for (size_t j = 0; j < ritz.values.size(); ++j) {
      quadrature.nodes.push_back(ritz.values[j]);
      quadrature.weights.push_back(scale * ritz.weight(j));
    }
  }
  return quadrature;
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
  OPTD_ASSIGN_OR_RETURN(LanczosRun run,
                        RunLanczos(backend, queue, x, rows, cols, rows <= cols, options));
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
  OPTD_ASSIGN_OR_RETURN(LanczosRun momentum_run, RunLanczos(backend, queue, momentum, rows, cols,
                                                            /*outer=*/rows <= cols, options));
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
    OPTD_ASSIGN_OR_RETURN(
        outer_run, RunLanczos(backend, queue, momentum, rows, cols, /*outer=*/true, options));
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
