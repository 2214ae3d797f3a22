// The analysis figures against closed forms and against plain fp64 computations in the test.
#include "kernels/analysis.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "tests/kernels/backend_test_util.h"
#include "tests/kernels/reference.h"

namespace optd {
namespace {

using reference::RandomNormal;

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
  double lo = 1e300, hi = 0, sum = 0;
  for (int i = 0; i < rows; ++i) {
    double diag = 0, off = 0;
    for (int j = 0; j < rows; ++j) {
      double p = 0;
      for (int c = 0; c < cols; ++c) p += double(v[i * cols + c]) * v[j * cols + c];
      if (i == j)
        diag = p;
      else
        off += std::fabs(p);
    }
    const double r = diag / (off / (rows - 1));
    lo = std::min(lo, r);
    hi = std::max(hi, r);
    sum += r;
  }
  EXPECT_NEAR(got->min, lo, 1e-5 * lo);
  EXPECT_NEAR(got->max, hi, 1e-5 * hi);
  EXPECT_NEAR(got->avg, sum / rows, 1e-5 * sum / rows);
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

}  // namespace
}  // namespace optd
