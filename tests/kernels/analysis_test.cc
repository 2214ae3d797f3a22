// The analysis figures against closed forms and against plain fp64 computations in the test.
#include "kernels/analysis.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "tests/kernels/backend_test_util.h"
#include "tests/kernels/reference.h"

namespace optd {
namespace {

using reference::RandomNormal;
using reference::WithSingularValues;

// The spectrum figures of a known list of singular values, in fp64.
SpectrumStats ClosedFormSpectrum(const std::vector<double>& sigma) {
  double sum = 0, squares = 0, hi = 0, lo = 1e300;
  for (double s : sigma) {
    sum += s;
    squares += s * s;
    hi = std::max(hi, s);
    lo = std::min(lo, s);
  }
  SpectrumStats stats{.sigma_max = hi,
                      .sigma_min = lo,
                      .stable_rank = squares / (hi * hi),
                      .condition_number = hi / lo};
  for (double s : sigma) stats.entropy -= s / sum * std::log(s / sum);
  return stats;
}

// How far the fp32 Lanczos products can move the Gram operator of a rows×cols matrix X with the
// given exact spectrum (analysis.h: "The products are fp32"). fl(X·q) = (X + ΔX)·q with
// |ΔX| <= γ_n·|X|, γ_n = n·u/(1 − n·u), u = 2⁻²⁴ (Higham, "Accuracy and Stability of Numerical
// Algorithms", 3.5), so ‖ΔX‖₂ <= γ_n·‖X‖F; the two products (inner dimensions rows and cols), the
// rounding of q to fp32 and of the product back give an operator within
// E = (γ_rows + γ_cols)·‖X‖F·σ_max + 2u·σ_max² of the exact one. Lanczos with full
// reorthogonalization (in fp64) then yields Ritz values of that operator, each within E of the
// exact spectrum's range (Weyl): λ in [σ_min² − E, σ_max² + E].
double GramOperatorError(int64_t rows, int64_t cols, const SpectrumStats& exact) {
  const double u = std::ldexp(1.0, -24);
  auto gamma = [u](int64_t n) { return n * u / (1 - n * u); };
  const double frobenius = exact.sigma_max * std::sqrt(exact.stable_rank);
  return (gamma(rows) + gamma(cols)) * frobenius * exact.sigma_max +
         2 * u * exact.sigma_max * exact.sigma_max;
}

class AnalysisTest : public ::testing::Test {
 protected:
  float* Device(const std::vector<float>& host) { return memory_.Upload(host); }
  Queue& queue() { return backend_->default_queue(); }

  std::unique_ptr<Backend> backend_ = testing::MakeCpuBackend();
  testing::DeviceMemory memory_{*backend_};
};

TEST_F(AnalysisTest, DominanceOfClosedForms) {
  // Orthogonal rows: VVᵀ is diagonal, every r_i is infinite.
  auto diagonal =
      ComputeDominanceRatios(*backend_, queue(), Device({2, 0, 0, 0, 0, 3, 0, 0}), 2, 4);
  ASSERT_TRUE(diagonal.ok());
  EXPECT_EQ(diagonal->min, std::numeric_limits<double>::infinity());
  // V = [[1, 1], [1, 0]]: VVᵀ = [[2, 1], [1, 1]], r = (2/1, 1/1).
  auto two = ComputeDominanceRatios(*backend_, queue(), Device({1, 1, 1, 0}), 2, 2);
  ASSERT_TRUE(two.ok());
  EXPECT_DOUBLE_EQ(two->min, 1.0);
  EXPECT_DOUBLE_EQ(two->avg, 1.5);
  EXPECT_DOUBLE_EQ(two->max, 2.0);
  // Rank one with equal rows: VVᵀ is all ‖v‖², so every r_i = 1.
  auto rank_one = ComputeDominanceRatios(*backend_, queue(), Device({1, 2, 1, 2, 1, 2}), 3, 2);
  ASSERT_TRUE(rank_one.ok());
  EXPECT_NEAR(rank_one->min, 1.0, 1e-6);
  EXPECT_NEAR(rank_one->max, 1.0, 1e-6);
  // A zero row is left out; all zero is an error, as is a single row.
  auto with_zero = ComputeDominanceRatios(*backend_, queue(), Device({1, 1, 0, 0, 1, 0}), 3, 2);
  ASSERT_TRUE(with_zero.ok());
  // VVᵀ = [[2, 0, 1], [0, 0, 0], [1, 0, 1]], m − 1 = 2: r_0 = 2/(1/2), r_2 = 1/(1/2).
  EXPECT_DOUBLE_EQ(with_zero->min, 2.0);
  EXPECT_DOUBLE_EQ(with_zero->max, 4.0);
  EXPECT_EQ(ComputeDominanceRatios(*backend_, queue(), Device({0, 0, 0, 0}), 2, 2).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ComputeDominanceRatios(*backend_, queue(), Device({1, 2}), 1, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(AnalysisTest, DominanceOfARandomMatrixMatchesFp64) {
  const int rows = 12, cols = 30;
  auto v = RandomNormal(rows * cols, 1);
  auto got = ComputeDominanceRatios(*backend_, queue(), Device(v), rows, cols);
  ASSERT_TRUE(got.ok());
  const reference::Dominance want = reference::DominanceRatios(v, rows, cols);
  EXPECT_NEAR(got->min, want.min, 1e-5 * want.min);
  EXPECT_NEAR(got->max, want.max, 1e-5 * want.max);
  EXPECT_NEAR(got->avg, want.avg, 1e-5 * want.avg);
}

TEST_F(AnalysisTest, SpectrumStatsClosedForms) {
  const std::vector<float> rank_one = {5, 0, 0};
  SpectrumStats s = ComputeSpectrumStats(rank_one);
  EXPECT_DOUBLE_EQ(s.stable_rank, 1.0);
  EXPECT_EQ(s.condition_number, std::numeric_limits<double>::infinity());
  EXPECT_DOUBLE_EQ(s.entropy, 0.0);
  const std::vector<float> two = {3, 1};
  s = ComputeSpectrumStats(two);
  EXPECT_DOUBLE_EQ(s.stable_rank, 10.0 / 9.0);
  EXPECT_DOUBLE_EQ(s.condition_number, 3.0);
  EXPECT_NEAR(s.entropy, -(0.75 * std::log(0.75) + 0.25 * std::log(0.25)), 1e-12);
  const std::vector<float> flat = {1, 1, 1, 1};
  EXPECT_NEAR(ComputeSpectrumStats(flat).entropy, std::log(4.0), 1e-12);
  EXPECT_EQ(ComputeSpectrumStats(std::vector<float>{0, 0}).stable_rank, 0.0);
}

TEST_F(AnalysisTest, StableRankOfARankOneMatrix) {
  // u·vᵀ has one non-zero singular value: stable rank 1.
  std::vector<float> x(6 * 4);
  for (int i = 0; i < 6; ++i)
    for (int j = 0; j < 4; ++j) x[i * 4 + j] = float(i + 1) * float(j - 1.5);
  auto sv = SingularValues(*backend_, queue(), Device(x), 6, 4);
  ASSERT_TRUE(sv.ok());
  EXPECT_NEAR(ComputeSpectrumStats(*sv).stable_rank, 1.0, 1e-6);
}

TEST_F(AnalysisTest, RowNormCvAndCosine) {
  // Row norms 3 and 5 (3-4-5 rows): mean 4, population std 1.
  const std::vector<float> x = {3, 0, 3, 4};
  EXPECT_NEAR(RowNormCoefficientOfVariation(x, 2, 2), 0.25, 1e-12);
  EXPECT_EQ(RowNormCoefficientOfVariation(std::vector<float>(4, 0.0f), 2, 2), 0.0);
  const std::vector<float> a = {1, 2, 3}, b = {2, 4, 6}, c = {-1, -2, -3};
  EXPECT_NEAR(Cosine(a, b), 1.0, 1e-12);
  EXPECT_NEAR(Cosine(a, c), -1.0, 1e-12);
}

TEST_F(AnalysisTest, AnalyzeMatrixOnOrthogonalRows) {
  // V with orthogonal rows of different norms: polar(V) = rownormalize(V) (cosine 1), and VVᵀ is
  // diagonal (infinite dominance). The update U = polar(V) has all singular values 1.
  const int rows = 3, cols = 5;
  std::vector<float> v(rows * cols, 0.0f);
  v[0 * cols + 0] = 2;
  v[1 * cols + 1] = 0.5f;
  v[1 * cols + 2] = 0.5f;
  v[2 * cols + 4] = -3;
  std::vector<float> update(rows * cols, 0.0f);
  update[0] = 1;
  update[1 * cols + 1] = update[1 * cols + 2] = float(1 / std::sqrt(2.0));
  update[2 * cols + 4] = -1;
  NewtonSchulzConfig ns;
  ns.compute_dtype = DType::kF32;
  auto a = AnalyzeMatrix(*backend_, queue(), Device(v), Device(update), Device(v), rows, cols, ns);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->dominance.min, std::numeric_limits<double>::infinity());
  EXPECT_NEAR(a->rmnp_muon_cosine, 1.0, 1e-6);
  EXPECT_NEAR(a->update.stable_rank, 3.0, 1e-5);
  EXPECT_NEAR(a->update.condition_number, 1.0, 1e-5);
  EXPECT_NEAR(a->neuron_norm_cv, 0.0, 1e-6);
  EXPECT_NEAR(a->update_rms, std::sqrt(3.0 / 15.0), 1e-6);
  EXPECT_NEAR(a->momentum.condition_number, 3.0 / std::sqrt(0.5), 1e-5);
  // NS maps each normalized singular value σ/‖V‖F through p⁵; the error against polar(V) = 1 per
  // direction follows from the scalar iteration.
  const double norm = std::sqrt(4.0 + 0.5 + 9.0);
  double error = 0;
  int small = 0;
  for (double s : {2.0, std::sqrt(0.5), 3.0}) {
    double y = s / (norm + 1e-7);
    for (int k = 0; k < 5; ++k) y = formulas::NewtonSchulzPolynomial(y, 3.4445, -4.7750, 2.0315);
    error += (y - 1) * (y - 1);
    small += y < 0.6;
  }
  EXPECT_NEAR(a->ns_polar_error, std::sqrt(error / 3.0), 1e-5);
  EXPECT_NEAR(a->ns_small_sv_fraction, small / 3.0, 1e-12);
  double grad_norm = 0;
  for (float e : v) grad_norm += double(e) * e;
  EXPECT_NEAR(a->grad_norm, std::sqrt(grad_norm), 1e-6);
}

TEST_F(AnalysisTest, AnalyzeMatrixOnRandomMatchesFp64Pieces) {
  const int rows = 10, cols = 16;
  auto v = RandomNormal(rows * cols, 2);
  auto u = RandomNormal(rows * cols, 3);
  NewtonSchulzConfig ns;
  ns.compute_dtype = DType::kF32;
  auto a = AnalyzeMatrix(*backend_, queue(), Device(v), Device(u), Device(u), rows, cols, ns);
  ASSERT_TRUE(a.ok()) << a.status();
  // NS(V) against the fp64 reference iteration and the exact polar factor from the backend SVD.
  auto ns_ref = reference::NewtonSchulz(reference::FromFloats(v.data(), rows, cols),
                                        reference::KellerCoefficients(), 5, 1e-7, 1.0, false);
  std::vector<float> polar(rows * cols);
  auto buffer = backend_->Allocate(polar.size() * 4);
  ASSERT_TRUE(buffer.ok());
  ASSERT_TRUE(ExactPolar(*backend_, queue(), Device(v), rows, cols, buffer->f32()).ok());
  ASSERT_TRUE(backend_->Download(queue(), polar.data(), buffer->data(), polar.size() * 4).ok());
  EXPECT_NEAR(a->ns_polar_error, reference::RelativeError(ns_ref.v, polar), 1e-5);
  // Polar factor: orthonormal rows (rows < cols), P·Pᵀ = I.
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < rows; ++j) {
      double p = 0;
      for (int c = 0; c < cols; ++c) p += double(polar[i * cols + c]) * polar[j * cols + c];
      EXPECT_NEAR(p, i == j ? 1.0 : 0.0, 1e-5);
    }
  // RMNP–Muon cosine from the plain row normalization.
  std::vector<double> rn(rows * cols);
  for (int i = 0; i < rows; ++i) {
    double n = 0;
    for (int c = 0; c < cols; ++c) n += double(v[i * cols + c]) * v[i * cols + c];
    for (int c = 0; c < cols; ++c) rn[i * cols + c] = v[i * cols + c] / std::sqrt(n);
  }
  double dot = 0, nr = 0, np = 0;
  for (int i = 0; i < rows * cols; ++i) {
    dot += rn[i] * polar[i];
    nr += rn[i] * rn[i];
    np += double(polar[i]) * polar[i];
  }
  EXPECT_NEAR(a->rmnp_muon_cosine, dot / std::sqrt(nr * np), 1e-6);
  EXPECT_EQ(AnalyzeMatrix(*backend_, queue(), Device(std::vector<float>(rows * cols, 0.0f)),
                          Device(u), Device(u), rows, cols, ns)
                .status()
                .code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(AnalysisTest, RowBlockedDominanceMatchesFp64) {
  // A tall matrix, so V·Vᵀ (300×300) is much larger than V; caps of 2 rows per call and of less
  // than one row (one row per call).
  const int rows = 300, cols = 20;
  auto v = RandomNormal(rows * cols, 11);
  for (int c = 0; c < cols; ++c) v[7 * cols + c] = 0;  // a zero row is left out
  const reference::Dominance want = reference::DominanceRatios(v, rows, cols);
  for (int64_t cap : {int64_t{3 * rows * cols - 1}, int64_t{1}, int64_t{1} << 28}) {
    auto got = ComputeDominanceRatios(*backend_, queue(), Device(v), rows, cols,
                                      AnalysisOptions{.max_flops_per_call = cap});
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_NEAR(got->min, want.min, 1e-5 * want.min) << cap;
    EXPECT_NEAR(got->max, want.max, 1e-5 * want.max) << cap;
    EXPECT_NEAR(got->avg, want.avg, 1e-5 * want.avg) << cap;
  }
}

TEST_F(AnalysisTest, ExactPathIsTheSameInRowBlocks) {
  const int rows = 40, cols = 24;
  auto v = RandomNormal(rows * cols, 12);
  auto u = RandomNormal(rows * cols, 13);
  NewtonSchulzConfig ns;
  ns.compute_dtype = DType::kF32;
  auto whole = AnalyzeMatrix(*backend_, queue(), Device(v), Device(u), Device(u), rows, cols, ns);
  auto blocked = AnalyzeMatrix(*backend_, queue(), Device(v), Device(u), Device(u), rows, cols, ns,
                               AnalysisOptions{.max_flops_per_call = 100});
  ASSERT_TRUE(whole.ok() && blocked.ok());
  EXPECT_FALSE(whole->estimated);
  EXPECT_FALSE(blocked->estimated);
  EXPECT_NEAR(blocked->dominance.avg, whole->dominance.avg, 1e-6 * whole->dominance.avg);
  EXPECT_NEAR(blocked->rmnp_muon_cosine, whole->rmnp_muon_cosine, 1e-6);
  EXPECT_NEAR(blocked->ns_polar_error, whole->ns_polar_error, 1e-6);
}

TEST_F(AnalysisTest, NewtonSchulzSingularValueMapMatchesTheIteration) {
  // Known singular values from 1e-3 to 1 (log-spaced): the scalar map's Σ(p(σ)−1)² against
  // ‖NS(V) − U·Wᵀ‖F² of the real iteration in fp32, for several settings and both orientations.
  const int k = 40;
  std::vector<double> sigma(k);
  for (int i = 0; i < k; ++i) sigma[i] = std::pow(10.0, -3.0 * i / (k - 1));
  NewtonSchulzConfig keller;
  keller.compute_dtype = DType::kF32;
  NewtonSchulzConfig polar_express = keller;
  polar_express.coefficient_set = "polar_express";
  polar_express.safety = 1.02f;
  polar_express.eps_mode = formulas::NormEpsilon::kFloor;
  NewtonSchulzConfig growing = keller;
  growing.steps_grow_with_dimension = true;
  growing.reference_dimension = 10;  // 40 > 10: one more step
  ASSERT_EQ(NewtonSchulzSteps(growing, k, 64), 6);
  for (const auto& [rows, cols] : {std::pair{40, 64}, std::pair{64, 40}}) {
    std::vector<double> polar;
    const std::vector<float> v = WithSingularValues(rows, cols, sigma, 21, &polar);
    double norm = 0;
    for (double s : sigma) norm += s * s;
    norm = std::sqrt(norm);
    for (const NewtonSchulzConfig& config : {keller, polar_express, growing}) {
      const NewtonSchulzSingularValueMap map(config, rows, cols, norm);
      double predicted = 0;
      for (double s : sigma) predicted += (map(s) - 1) * (map(s) - 1);
      float* x = Device(v);
      auto workspace =
          backend_->Allocate(NewtonSchulzWorkspaceFloats(config, 1, rows, cols) * sizeof(float));
      ASSERT_TRUE(workspace.ok());
      ASSERT_TRUE(
          NewtonSchulz(*backend_, queue(), MatrixBatch{x, 1, rows, cols}, config, workspace->f32())
              .ok());
      const std::vector<float> ns = memory_.Download(x, rows * cols);
      double actual = 0;
      for (int i = 0; i < rows * cols; ++i) actual += (ns[i] - polar[i]) * (ns[i] - polar[i]);
      EXPECT_NEAR(predicted, actual, 1e-4 * actual) << config.coefficient_set << " " << rows;
    }
  }
}

struct EstimateCase {
  std::string name;
  int64_t rows, cols;
  std::vector<float> momentum, update;
  std::vector<double> sigma;  // the momentum's singular values, when prescribed
};

class AnalysisEstimateTest : public AnalysisTest {
 protected:
  // The estimate path (exact_max_dim below min(rows, cols)) against the exact path on the same
  // matrices, within the errors analysis.h states.
  void ExpectEstimateMatchesExact(const EstimateCase& c) {
    SCOPED_TRACE(c.name);
    NewtonSchulzConfig ns;
    ns.compute_dtype = DType::kF32;  // the estimate models the polynomial, not bf16 rounding
    const float* v = Device(c.momentum);
    const float* u = Device(c.update);
    auto exact = AnalyzeMatrix(*backend_, queue(), v, u, u, c.rows, c.cols, ns);
    auto estimate = AnalyzeMatrix(*backend_, queue(), v, u, u, c.rows, c.cols, ns,
                                  AnalysisOptions{.exact_max_dim = 100});
    ASSERT_TRUE(exact.ok()) << exact.status();
    ASSERT_TRUE(estimate.ok()) << estimate.status();
    EXPECT_FALSE(exact->estimated);
    EXPECT_TRUE(estimate->estimated);
    // The standard errors analysis.h states, from the exact singular values: s = √(2/(p·k)) and
    // the rms/mean of each trace's function over the spectrum.
    auto sv = SingularValues(*backend_, queue(), v, c.rows, c.cols);
    ASSERT_TRUE(sv.ok());
    const double k = static_cast<double>(sv->size());
    const double s = std::sqrt(2.0 / (8 * k));
    double norm = 0, sum = 0;
    for (float x : *sv) {
      norm += double(x) * x;
      sum += x;
    }
    const NewtonSchulzSingularValueMap map(ns, c.rows, c.cols, std::sqrt(norm));
    double h_mean = 0, h_squares = 0, small = 0, entropy_squares = 0;
    for (float x : *sv) {
      const double h = (map(x) - 1) * (map(x) - 1);
      h_mean += h / k;
      h_squares += h * h / k;
      small += std::fabs(map(x)) < 0.6 ? 1 / k : 0;
      const double p = x / sum;
      const double g = k * p * (1 - exact->momentum.entropy - (p > 0 ? std::log(p) : 0));
      entropy_squares += g * g / k;
    }
    const double ns_error_se = 0.5 * s * std::sqrt(h_squares) / h_mean * exact->ns_polar_error;
    const double small_se = s * std::sqrt(small);
    const double entropy_se = s * std::sqrt(entropy_squares);
    EXPECT_DOUBLE_EQ(estimate->dominance.min, exact->dominance.min);
    EXPECT_DOUBLE_EQ(estimate->dominance.avg, exact->dominance.avg);
    EXPECT_DOUBLE_EQ(estimate->dominance.max, exact->dominance.max);
    for (const auto& [name, e, x] : {std::tuple{"momentum", estimate->momentum, exact->momentum},
                                     std::tuple{"update", estimate->update, exact->update}}) {
      SCOPED_TRACE(name);
      // The Ritz values' range lies within the spectrum's up to the products' rounding E.
      const double error = GramOperatorError(c.rows, c.cols, x);
      const double lambda_max = x.sigma_max * x.sigma_max + error;
      const double lambda_min = x.sigma_min * x.sigma_min - error;
      EXPECT_LE(e.sigma_max, std::sqrt(lambda_max));
      EXPECT_NEAR(e.sigma_max, x.sigma_max, 1e-3 * x.sigma_max);
      EXPECT_NEAR(e.stable_rank, x.stable_rank, 2e-3 * x.stable_rank);
      if (lambda_min > 0) {
        EXPECT_GE(e.sigma_min, std::sqrt(lambda_min));
        EXPECT_LE(e.condition_number, std::sqrt(lambda_max / lambda_min));
      }
      // Otherwise fp32 products cannot resolve σ_min (E exceeds σ_min²: the rank-20-plus-noise
      // matrix), and the smallest Ritz value bounds nothing.
    }
    EXPECT_NEAR(estimate->momentum.entropy, exact->momentum.entropy, 4 * entropy_se);
    EXPECT_NEAR(estimate->rmnp_muon_cosine, exact->rmnp_muon_cosine, 4 * s);
    EXPECT_NEAR(estimate->ns_polar_error, exact->ns_polar_error, 4 * ns_error_se);
    EXPECT_NEAR(estimate->ns_small_sv_fraction, exact->ns_small_sv_fraction,
                4 * small_se + 1.0 / 40);
    EXPECT_EQ(estimate->neuron_norm_cv, exact->neuron_norm_cv);
    EXPECT_EQ(estimate->update_rms, exact->update_rms);
    EXPECT_EQ(estimate->grad_norm, exact->grad_norm);
    if (!c.sigma.empty()) {
      const SpectrumStats truth = ClosedFormSpectrum(c.sigma);
      EXPECT_NEAR(estimate->momentum.sigma_max, truth.sigma_max, 1e-3 * truth.sigma_max);
      EXPECT_NEAR(estimate->momentum.stable_rank, truth.stable_rank, 2e-3 * truth.stable_rank);
      // The matrix holds the prescribed spectrum rounded to fp32: each σ moves by at most
      // ‖ΔV‖₂ <= u·‖V‖F, before the products' rounding E.
      const double stored = std::ldexp(1.0, -24) * truth.sigma_max * std::sqrt(truth.stable_rank);
      const double error = GramOperatorError(c.rows, c.cols, exact->momentum);
      const double low = truth.sigma_min - stored, high = truth.sigma_max + stored;
      if (low * low > error) {
        EXPECT_LE(estimate->momentum.condition_number,
                  std::sqrt((high * high + error) / (low * low - error)));
      }
      EXPECT_NEAR(estimate->momentum.entropy, truth.entropy, 4 * entropy_se);
    }
  }
};

TEST_F(AnalysisEstimateTest, RandomGaussian) {
  ExpectEstimateMatchesExact(
      {"gaussian", 200, 300, RandomNormal(200 * 300, 31), RandomNormal(200 * 300, 32), {}});
}

TEST_F(AnalysisEstimateTest, TallRandomGaussian) {
  ExpectEstimateMatchesExact(
      {"tall", 300, 200, RandomNormal(300 * 200, 33), RandomNormal(300 * 200, 34), {}});
}

TEST_F(AnalysisEstimateTest, DecayingSpectrum) {
  // σ_i = 1/(1 + i/10): a spread spectrum with a long tail of small values.
  std::vector<double> sigma(200);
  for (int i = 0; i < 200; ++i) sigma[i] = 1.0 / (1.0 + i / 10.0);
  ExpectEstimateMatchesExact({"decaying", 200, 300, WithSingularValues(200, 300, sigma, 41),
                              RandomNormal(200 * 300, 42), sigma});
}

TEST_F(AnalysisEstimateTest, ClusterBelowTheNewtonSchulzThreshold) {
  // 150 singular values in [0.5, 1] and 50 in [1e-3, 3e-3]: after Newton–Schulz the small
  // cluster stays below 0.6 (seed 003's tail), and the gap lets the quadrature resolve it.
  std::vector<double> sigma(200);
  for (int i = 0; i < 150; ++i) sigma[i] = 1.0 - 0.5 * i / 149;
  for (int i = 150; i < 200; ++i) sigma[i] = 3e-3 - 2e-3 * (i - 150) / 49;
  ExpectEstimateMatchesExact({"cluster", 200, 300, WithSingularValues(200, 300, sigma, 45),
                              RandomNormal(200 * 300, 46), sigma});
}

TEST_F(AnalysisEstimateTest, UnresolvedThresholdIsMissed) {
  // σ log-spaced from 1 down to 1e-3: the Newton–Schulz threshold (σ ≈ 5e-3 here) lies below
  // the smallest Ritz value of 40 Lanczos steps, so the quadrature puts the directions under it
  // on a node above it. analysis.h states this bias; the estimate misses the small share.
  const int rows = 200, cols = 300;
  std::vector<double> sigma(200);
  for (int i = 0; i < 200; ++i) sigma[i] = std::pow(10.0, -3.0 * i / 199);
  const std::vector<float> v = WithSingularValues(rows, cols, sigma, 47);
  NewtonSchulzConfig ns;
  ns.compute_dtype = DType::kF32;
  auto exact = AnalyzeMatrix(*backend_, queue(), Device(v), Device(v), Device(v), rows, cols, ns);
  auto estimate = AnalyzeMatrix(*backend_, queue(), Device(v), Device(v), Device(v), rows, cols, ns,
                                AnalysisOptions{.exact_max_dim = 100});
  ASSERT_TRUE(exact.ok() && estimate.ok());
  EXPECT_GT(exact->ns_small_sv_fraction, 0.2);
  EXPECT_LT(estimate->ns_small_sv_fraction, exact->ns_small_sv_fraction - 0.1);
  EXPECT_LT(estimate->ns_polar_error, exact->ns_polar_error);
  EXPECT_LE(estimate->momentum.condition_number, exact->momentum.condition_number);
}

TEST_F(AnalysisEstimateTest, NearlyRankDeficient) {
  // Rank 20 plus small noise: 20 large singular values over a bulk 1e-3 times smaller.
  auto left = RandomNormal(200 * 20, 51);
  auto right = RandomNormal(20 * 300, 52);
  auto noise = RandomNormal(200 * 300, 53, 1e-3f);
  std::vector<float> v(200 * 300);
  for (int r = 0; r < 200; ++r)
    for (int c = 0; c < 300; ++c) {
      double e = noise[r * 300 + c];
      for (int i = 0; i < 20; ++i) e += double(left[r * 20 + i]) * right[i * 300 + c] / 20;
      v[r * 300 + c] = static_cast<float>(e);
    }
  ExpectEstimateMatchesExact({"rank20", 200, 300, v, RandomNormal(200 * 300, 54), {}});
}

TEST_F(AnalysisEstimateTest, PrescribedSingularValues) {
  // σ evenly spaced in [0.5, 2] from random orthogonal factors; the update is orthogonal-ish.
  std::vector<double> sigma(200), flat(200, 1.0);
  for (int i = 0; i < 200; ++i) sigma[i] = 2.0 - 1.5 * i / 199.0;
  ExpectEstimateMatchesExact({"prescribed", 200, 300, WithSingularValues(200, 300, sigma, 61),
                              WithSingularValues(200, 300, flat, 62), sigma});
}

TEST_F(AnalysisEstimateTest, CosineIdentityHoldsAsProbesGrow) {
  // tr(D⁻¹·(VVᵀ)^½)/(√k·√r) is the cosine itself, not an approximation of it: with 512 probes
  // the estimate closes in on the exact cosine (standard error at most √(2/(p·k)) = 0.0063 here),
  // for a wide and a tall V.
  for (const auto& [rows, cols] : {std::pair{100, 160}, std::pair{160, 100}}) {
    auto v = RandomNormal(rows * cols, 75);
    NewtonSchulzConfig ns;
    auto exact = AnalyzeMatrix(*backend_, queue(), Device(v), Device(v), Device(v), rows, cols, ns);
    auto estimate = AnalyzeMatrix(*backend_, queue(), Device(v), Device(v), Device(v), rows, cols,
                                  ns, AnalysisOptions{.exact_max_dim = 50, .probes = 512});
    ASSERT_TRUE(exact.ok() && estimate.ok());
    EXPECT_NEAR(estimate->rmnp_muon_cosine, exact->rmnp_muon_cosine, 4 * std::sqrt(2.0 / 51200))
        << rows << "x" << cols;
  }
}

TEST_F(AnalysisEstimateTest, Deterministic) {
  const int rows = 150, cols = 220;
  auto v = RandomNormal(rows * cols, 71);
  auto u = RandomNormal(rows * cols, 72);
  NewtonSchulzConfig ns;
  const AnalysisOptions options{.exact_max_dim = 100};
  auto first =
      AnalyzeMatrix(*backend_, queue(), Device(v), Device(u), Device(u), rows, cols, ns, options);
  auto second =
      AnalyzeMatrix(*backend_, queue(), Device(v), Device(u), Device(u), rows, cols, ns, options);
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_TRUE(first->estimated);
  EXPECT_EQ(first->rmnp_muon_cosine, second->rmnp_muon_cosine);
  EXPECT_EQ(first->momentum.sigma_max, second->momentum.sigma_max);
  EXPECT_EQ(first->momentum.sigma_min, second->momentum.sigma_min);
  EXPECT_EQ(first->momentum.entropy, second->momentum.entropy);
  EXPECT_EQ(first->update.entropy, second->update.entropy);
  EXPECT_EQ(first->ns_polar_error, second->ns_polar_error);
  EXPECT_EQ(first->ns_small_sv_fraction, second->ns_small_sv_fraction);
  EXPECT_EQ(first->dominance.avg, second->dominance.avg);
}

TEST_F(AnalysisEstimateTest, RowBlocksChangeOnlyRounding) {
  // A cap of 1000 multiply-adds splits every Lanczos product into blocks of a few rows (one row
  // for the dominance); the figures move only by the fp32 rounding of the products. Each run's
  // Gram operator is within E (GramOperatorError) of the exact one, so each singular value it
  // sees within δ = E/√(σ_min² − E), and each figure moves by at most twice its first-order
  // sensitivity to δ.
  for (const auto& [rows, cols] : {std::pair{150, 220}, std::pair{220, 150}}) {
    SCOPED_TRACE(::testing::Message() << rows << "x" << cols);
    auto v = RandomNormal(rows * cols, 73);
    auto u = RandomNormal(rows * cols, 74);
    NewtonSchulzConfig ns;
    auto whole = AnalyzeMatrix(*backend_, queue(), Device(v), Device(u), Device(u), rows, cols, ns,
                               AnalysisOptions{.exact_max_dim = 100});
    auto blocked =
        AnalyzeMatrix(*backend_, queue(), Device(v), Device(u), Device(u), rows, cols, ns,
                      AnalysisOptions{.exact_max_dim = 100, .max_flops_per_call = 1000});
    ASSERT_TRUE(whole.ok() && blocked.ok());

    // Dominance: each (VVᵀ)_ij is an fp32 dot product of length cols, off by at most
    // γ_cols·‖v_i‖·‖v_j‖ in either run, which moves r_i by at most that relative to its numerator
    // and denominator.
    const double gamma = cols * std::ldexp(1.0, -24) / (1 - cols * std::ldexp(1.0, -24));
    std::vector<double> norms(rows);
    for (int i = 0; i < rows; ++i) {
      for (int c = 0; c < cols; ++c) norms[i] += double(v[i * cols + c]) * v[i * cols + c];
      norms[i] = std::sqrt(norms[i]);
    }
    double norm_sum = 0;
    for (double n : norms) norm_sum += n;
    double dominance_bound = 0;
    for (int i = 0; i < rows; ++i) {
      double off_diagonal = 0;
      for (int j = 0; j < rows; ++j) {
        if (j == i) continue;
        double g = 0;
        for (int c = 0; c < cols; ++c) g += double(v[i * cols + c]) * v[j * cols + c];
        off_diagonal += std::fabs(g);
      }
      const double ratio = norms[i] * norms[i] * (rows - 1) / off_diagonal;
      const double relative = gamma + gamma * norms[i] * (norm_sum - norms[i]) / off_diagonal;
      dominance_bound += 2 * ratio * relative / rows;
    }
    EXPECT_NEAR(blocked->dominance.avg, whole->dominance.avg, dominance_bound);

    auto spectrum = [&](const std::vector<float>& x) {
      auto sv = SingularValues(*backend_, queue(), Device(x), rows, cols);
      EXPECT_TRUE(sv.ok());
      return *sv;
    };
    const std::vector<float> v_sv = spectrum(v), u_sv = spectrum(u);
    const SpectrumStats v_stats = ComputeSpectrumStats(v_sv), u_stats = ComputeSpectrumStats(u_sv);
    auto delta = [&](const SpectrumStats& stats) {
      const double error = GramOperatorError(rows, cols, stats);
      return error / std::sqrt(stats.sigma_min * stats.sigma_min - error);
    };
    const double v_delta = delta(v_stats), u_delta = delta(u_stats);
    const double k = static_cast<double>(v_sv.size());

    EXPECT_NEAR(blocked->momentum.sigma_max, whole->momentum.sigma_max, 2 * v_delta);
    // H = −Σ p log p with p = σ/S: ∂H/∂σ_i = −(log p_i + H)/S.
    auto entropy_bound = [](const std::vector<float>& sv, const SpectrumStats& stats, double d) {
      double sum = 0, sensitivity = 0;
      for (float x : sv) sum += x;
      for (float x : sv) sensitivity += std::fabs(std::log(x / sum) + stats.entropy) / sum;
      return 2 * sensitivity * d;
    };
    EXPECT_NEAR(blocked->momentum.entropy, whole->momentum.entropy,
                entropy_bound(v_sv, v_stats, v_delta));
    EXPECT_NEAR(blocked->update.entropy, whole->update.entropy,
                entropy_bound(u_sv, u_stats, u_delta));
    // The cosine is tr(D⁻¹·S)/(√k·√r) with S = (VVᵀ)^½, which moves by at most δ in norm:
    // |Δ| <= ‖D⁻¹‖F·√k·δ/(√k·√r) = rms(1/‖v_i‖)·δ per run.
    double inverse_squares = 0;
    for (double n : norms) inverse_squares += 1 / (n * n);
    EXPECT_NEAR(blocked->rmnp_muon_cosine, whole->rmnp_muon_cosine,
                2 * std::sqrt(inverse_squares / rows) * v_delta);
    // ns_polar_error = √(Σ(p(σ_i) − 1)²/k): ∂/∂σ_i = (p(σ_i) − 1)·p'(σ_i)/(k·error).
    double frobenius = 0;
    for (float x : v_sv) frobenius += double(x) * x;
    const NewtonSchulzSingularValueMap map(ns, rows, cols, std::sqrt(frobenius));
    double squares = 0;
    for (float x : v_sv) squares += (map(x) - 1) * (map(x) - 1);
    const double ns_error = std::sqrt(squares / k);
    double ns_sensitivity = 0;
    for (float x : v_sv) {
      const double h = 1e-4 * x;
      const double slope = (map(x + h) - map(x - h)) / (2 * h);
      ns_sensitivity += std::fabs((map(x) - 1) * slope) / (k * ns_error);
    }
    EXPECT_NEAR(blocked->ns_polar_error, whole->ns_polar_error, 2 * ns_sensitivity * v_delta);
  }
}

TEST_F(AnalysisEstimateTest, InvalidOptions) {
  auto v = RandomNormal(4 * 6, 81);
  NewtonSchulzConfig ns;
  for (const AnalysisOptions& bad :
       {AnalysisOptions{.probes = 0}, AnalysisOptions{.lanczos_steps = 0},
        AnalysisOptions{.max_flops_per_call = 0}, AnalysisOptions{.exact_max_dim = -1}}) {
    EXPECT_EQ(AnalyzeMatrix(*backend_, queue(), Device(v), Device(v), Device(v), 4, 6, ns, bad)
                  .status()
                  .code(),
              absl::StatusCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace optd
