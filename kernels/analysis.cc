#include "kernels/analysis.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/status_macros.h"

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

}  // namespace

absl::StatusOr<DominanceRatios> ComputeDominanceRatios(Backend& backend, Queue& queue,
                                                       const float* v, int64_t rows, int64_t cols) {
  OPTD_RETURN_IF_ERROR(CheckShape(rows, cols));
  if (rows < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("dominance ratio needs at least 2 rows, got ", rows));
  }
  OPTD_ASSIGN_OR_RETURN(Buffer gram, AllocateFloats(backend, rows * rows));
  OPTD_RETURN_IF_ERROR(backend.SymmetricRankK(
      queue, SyrkArgs{.n = rows, .k = cols, .a = v, .lda = cols, .c = gram.f32(), .ldc = rows}));
  OPTD_RETURN_IF_ERROR(backend.Symmetrize(queue, gram.f32(), rows, 1));
  OPTD_ASSIGN_OR_RETURN(std::vector<float> p, ToHost(backend, queue, gram.f32(), rows * rows));
  DominanceRatios r{std::numeric_limits<double>::infinity(), 0.0, 0.0};
  int64_t counted = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const double diagonal = p[i * rows + i];
    double off = 0;
    for (int64_t j = 0; j < rows; ++j) {
      if (j != i) off += std::fabs(static_cast<double>(p[i * rows + j]));
    }
    if (diagonal == 0.0) continue;  // an all-zero row of V
    const double ratio = off == 0.0 ? std::numeric_limits<double>::infinity()
                                    : diagonal / (off / static_cast<double>(rows - 1));
    r.min = std::min(r.min, ratio);
    r.max = std::max(r.max, ratio);
    r.avg += ratio;
    ++counted;
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

float PolarRelativeTolerance(int64_t rows, int64_t cols) {
  return static_cast<float>(std::max(rows, cols)) * std::numeric_limits<float>::epsilon();
}

absl::Status ExactPolar(Backend& backend, Queue& queue, const float* x, int64_t rows, int64_t cols,
                        float* out) {
  OPTD_RETURN_IF_ERROR(CheckShape(rows, cols));
  const int64_t k = std::min(rows, cols);
  OPTD_ASSIGN_OR_RETURN(Buffer work, AllocateFloats(backend, k + rows * k + k * cols));
  float* s = work.f32();
  float* u = s + k;
  float* vt = u + rows * k;
  OPTD_RETURN_IF_ERROR(backend.SingularValueDecomposition(
      queue, MatrixBatch{const_cast<float*>(x), 1, rows, cols}, s, u, vt));
  OPTD_RETURN_IF_ERROR(backend.ZeroSmallSingularVectors(queue, u, s, 1, rows, k,
                                                        PolarRelativeTolerance(rows, cols)));
  OPTD_RETURN_IF_ERROR(backend.Gemm(queue, GemmArgs{.m = rows,
                                                    .n = cols,
                                                    .k = k,
                                                    .a = u,
                                                    .lda = k,
                                                    .b = vt,
                                                    .ldb = cols,
                                                    .c = out,
                                                    .ldc = cols}));
  return backend.Synchronize(queue);
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

absl::StatusOr<MatrixAnalysis> AnalyzeMatrix(Backend& backend, Queue& queue, const float* momentum,
                                             const float* update, const float* gradient,
                                             int64_t rows, int64_t cols,
                                             const NewtonSchulzConfig& newton_schulz) {
  OPTD_RETURN_IF_ERROR(CheckShape(rows, cols));
  OPTD_RETURN_IF_ERROR(ValidateNewtonSchulzConfig(newton_schulz));
  const int64_t size = rows * cols;
  MatrixAnalysis a;
  OPTD_ASSIGN_OR_RETURN(std::vector<float> v, ToHost(backend, queue, momentum, size));
  if (SumSquares(v) == 0.0) {
    return absl::FailedPreconditionError("analysis: the momentum is zero; nothing to analyze");
  }
  OPTD_ASSIGN_OR_RETURN(a.dominance, ComputeDominanceRatios(backend, queue, momentum, rows, cols));

  OPTD_ASSIGN_OR_RETURN(std::vector<float> momentum_sv,
                        SingularValues(backend, queue, momentum, rows, cols));
  a.momentum = ComputeSpectrumStats(momentum_sv);
  OPTD_ASSIGN_OR_RETURN(std::vector<float> update_sv,
                        SingularValues(backend, queue, update, rows, cols));
  a.update = ComputeSpectrumStats(update_sv);

  // polar(V), NS(V) and rownormalize(V), side by side in one buffer.
  OPTD_ASSIGN_OR_RETURN(
      Buffer work, AllocateFloats(backend, 3 * size + NewtonSchulzWorkspaceFloats(newton_schulz, 1,
                                                                                  rows, cols)));
  float* polar = work.f32();
  float* ns = polar + size;
  float* rows_normalized = ns + size;
  float* ns_workspace = rows_normalized + size;
  OPTD_RETURN_IF_ERROR(ExactPolar(backend, queue, momentum, rows, cols, polar));
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
  a.ns_polar_error = std::sqrt(error / SumSquares(p));
  a.rmnp_muon_cosine = Cosine(r, p);
  OPTD_ASSIGN_OR_RETURN(std::vector<float> ns_sv, SingularValues(backend, queue, ns, rows, cols));
  a.ns_small_sv_fraction = static_cast<double>(std::count_if(ns_sv.begin(), ns_sv.end(),
                                                             [](float s) { return s < 0.6f; })) /
                           static_cast<double>(ns_sv.size());

  OPTD_ASSIGN_OR_RETURN(std::vector<float> u, ToHost(backend, queue, update, size));
  a.neuron_norm_cv = RowNormCoefficientOfVariation(u, rows, cols);
  a.update_rms = std::sqrt(SumSquares(u) / static_cast<double>(size));
  OPTD_ASSIGN_OR_RETURN(std::vector<float> g, ToHost(backend, queue, gradient, size));
  a.grad_norm = std::sqrt(SumSquares(g));
  return a;
}

}  // namespace optd
