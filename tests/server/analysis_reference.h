// Every figure of DESIGN.md's "Metrics" table for one matrix, computed plainly in fp64 with its own
// SVD (one-sided Jacobi), independent of kernels/analysis.cc: what the daemon's GetAnalysis and
// its Prometheus series must match.
#ifndef OPTD_TESTS_SERVER_ANALYSIS_REFERENCE_H_
#define OPTD_TESTS_SERVER_ANALYSIS_REFERENCE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "tests/kernels/reference.h"

namespace optd::reference {

// A = U·diag(s)·Wᵀ, s descending, k = min(rows, cols) columns in U and W.
struct Svd {
  std::vector<double> s;
  Matrix u, w;
};

// Hestenes' one-sided Jacobi: rotate column pairs of A (and of W = I) until all are orthogonal;
// then s_j = ‖a_j‖ and u_j = a_j/s_j. Accurate to working precision for small singular values too.
inline Svd JacobiSvd(const Matrix& input) {
  const bool wide = input.rows < input.cols;
  Matrix a = wide ? Transposed(input) : input;
  const int64_t m = a.rows, n = a.cols;
  Matrix w(n, n);
  for (int64_t i = 0; i < n; ++i) w.at(i, i) = 1;
  for (int sweep = 0; sweep < 100; ++sweep) {
    bool rotated = false;
    for (int64_t p = 0; p < n; ++p) {
      for (int64_t q = p + 1; q < n; ++q) {
        double alpha = 0, beta = 0, gamma = 0;
        for (int64_t i = 0; i < m; ++i) {
          alpha += a.at(i, p) * a.at(i, p);
          beta += a.at(i, q) * a.at(i, q);
          gamma += a.at(i, p) * a.at(i, q);
        }
        if (std::fabs(gamma) <= 1e-15 * std::sqrt(alpha * beta) || gamma == 0) continue;
        rotated = true;
        const double zeta = (beta - alpha) / (2 * gamma);
        const double t = (zeta >= 0 ? 1.0 : -1.0) / (std::fabs(zeta) + std::sqrt(1 + zeta * zeta));
        const double c = 1 / std::sqrt(1 + t * t), s = c * t;
        for (int64_t i = 0; i < m; ++i) {
          const double x = a.at(i, p), y = a.at(i, q);
          a.at(i, p) = c * x - s * y;
          a.at(i, q) = s * x + c * y;
        }
        for (int64_t i = 0; i < n; ++i) {
          const double x = w.at(i, p), y = w.at(i, q);
          w.at(i, p) = c * x - s * y;
          w.at(i, q) = s * x + c * y;
        }
      }
    }
    if (!rotated) break;
  }
  std::vector<double> norms(n);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) norms[j] += a.at(i, j) * a.at(i, j);
    norms[j] = std::sqrt(norms[j]);
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return norms[x] > norms[y]; });
  Svd r;
  r.u = Matrix(m, n);
  r.w = Matrix(n, n);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t j = order[k];
    r.s.push_back(norms[j]);
    for (int64_t i = 0; i < m; ++i) r.u.at(i, k) = norms[j] > 0 ? a.at(i, j) / norms[j] : 0.0;
    for (int64_t i = 0; i < n; ++i) r.w.at(i, k) = w.at(i, j);
  }
  if (wide) std::swap(r.u, r.w);  // Aᵀ = U·S·Wᵀ, so A = W·S·Uᵀ
  return r;
}

struct Figures {
  double dominance_min = 0, dominance_avg = 0, dominance_max = 0;
  double rmnp_muon_cosine = 0;
  double stable_rank_momentum = 0, stable_rank_update = 0;
  double condition_number_momentum = 0;
  double entropy_momentum = 0, entropy_update = 0;
  double ns_polar_error = 0, ns_small_sv_fraction = 0;
  double neuron_norm_cv = 0, update_rms = 0, grad_norm = 0;
};

inline void SpectrumFigures(const std::vector<double>& s, double& stable_rank, double* condition,
                            double& entropy) {
  const double sum = std::accumulate(s.begin(), s.end(), 0.0);
  double squares = 0;
  for (double x : s) squares += x * x;
  stable_rank = squares / (s.front() * s.front());
  if (condition != nullptr) {
    *condition = s.back() == 0 ? std::numeric_limits<double>::infinity() : s.front() / s.back();
  }
  entropy = 0;
  for (double x : s) {
    if (x > 0) entropy -= x / sum * std::log(x / sum);
  }
}

// The figures of momentum V, update U and gradient G (rows×cols, fp32 as the daemon holds them)
// for Keller's Newton–Schulz coefficients with `ns_steps` steps, eps 1e-7 added to the norm.
inline Figures AnalyzeFp64(const std::vector<float>& v, const std::vector<float>& update,
                           const std::vector<float>& gradient, int64_t rows, int64_t cols,
                           int ns_steps = 5) {
  Figures f;
  const Matrix vm = FromFloats(v.data(), rows, cols);
  const Dominance dominance = DominanceRatios(v, rows, cols);
  f.dominance_min = dominance.min;
  f.dominance_avg = dominance.avg;
  f.dominance_max = dominance.max;

  const Svd svd = JacobiSvd(vm);
  SpectrumFigures(svd.s, f.stable_rank_momentum, &f.condition_number_momentum, f.entropy_momentum);
  // polar(V) over the singular values above max(m, n)·ε_fp32·σ_max (numpy's pinv rule).
  const double tolerance = static_cast<double>(std::max(rows, cols)) *
                           std::numeric_limits<float>::epsilon() * svd.s.front();
  Matrix polar(rows, cols);
  for (size_t k = 0; k < svd.s.size(); ++k) {
    if (svd.s[k] <= tolerance) continue;
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) polar.at(i, j) += svd.u.at(i, k) * svd.w.at(j, k);
    }
  }
  Matrix row_normalized = vm;
  for (int64_t i = 0; i < rows; ++i) {
    double n = 0;
    for (int64_t j = 0; j < cols; ++j) n += vm.at(i, j) * vm.at(i, j);
    for (int64_t j = 0; j < cols; ++j) {
      row_normalized.at(i, j) = n > 0 ? vm.at(i, j) / std::sqrt(n) : 0.0;
    }
  }
  double dot = 0, nr = 0, np = 0;
  for (size_t i = 0; i < polar.v.size(); ++i) {
    dot += row_normalized.v[i] * polar.v[i];
    nr += row_normalized.v[i] * row_normalized.v[i];
    np += polar.v[i] * polar.v[i];
  }
  f.rmnp_muon_cosine = dot / std::sqrt(nr * np);
  const Matrix ns = NewtonSchulz(vm, KellerCoefficients(), ns_steps, 1e-7, 1.0, false);
  double error = 0;
  for (size_t i = 0; i < ns.v.size(); ++i) error += (ns.v[i] - polar.v[i]) * (ns.v[i] - polar.v[i]);
  f.ns_polar_error = std::sqrt(error / np);
  const Svd ns_svd = JacobiSvd(ns);
  f.ns_small_sv_fraction = static_cast<double>(std::count_if(ns_svd.s.begin(), ns_svd.s.end(),
                                                             [](double s) { return s < 0.6; })) /
                           static_cast<double>(ns_svd.s.size());

  const Matrix um = FromFloats(update.data(), rows, cols);
  SpectrumFigures(JacobiSvd(um).s, f.stable_rank_update, nullptr, f.entropy_update);
  std::vector<double> row_norms(rows);
  double mean = 0, squares = 0;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) row_norms[i] += um.at(i, j) * um.at(i, j);
    squares += row_norms[i];
    row_norms[i] = std::sqrt(row_norms[i]);
    mean += row_norms[i] / static_cast<double>(rows);
  }
  double variance = 0;
  for (double n : row_norms) variance += (n - mean) * (n - mean) / static_cast<double>(rows);
  f.neuron_norm_cv = std::sqrt(variance) / mean;
  f.update_rms = std::sqrt(squares / static_cast<double>(rows * cols));
  double g = 0;
  for (float x : gradient) g += static_cast<double>(x) * x;
  f.grad_norm = std::sqrt(g);
  return f;
}

}  // namespace optd::reference

#endif  // OPTD_TESTS_SERVER_ANALYSIS_REFERENCE_H_
