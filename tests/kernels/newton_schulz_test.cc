// Newton–Schulz properties: each output singular value is the coefficient polynomial iterated on
// the input's normalized singular value (so it lands in the band the coefficient set promises),
// convergence to the exact polar factor as steps grow, transposition symmetry, edge shapes.
#include "kernels/newton_schulz.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/analysis.h"
#include "tests/kernels/backend_test_util.h"
#include "tests/kernels/reference.h"

namespace optd {
namespace {

using reference::RandomNormal;
using reference::RelativeError;

class NewtonSchulzTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend_ = testing::MakeCpuBackend();
    ASSERT_NE(backend_, nullptr);
  }

  // NS of a host matrix, on the backend.
  std::vector<float> Run(std::vector<float> x, int64_t batch, int64_t rows, int64_t cols,
                         const NewtonSchulzConfig& config) {
    auto buffer = backend_->Allocate(x.size() * 4);
    auto workspace = backend_->Allocate(NewtonSchulzWorkspaceFloats(config, batch, rows, cols) * 4);
    EXPECT_TRUE(buffer.ok() && workspace.ok());
    Queue& q = backend_->default_queue();
    EXPECT_TRUE(backend_->Upload(q, buffer->data(), x.data(), x.size() * 4).ok());
    const absl::Status status = NewtonSchulz(
        *backend_, q, MatrixBatch{buffer->f32(), batch, rows, cols}, config, workspace->f32());
    EXPECT_TRUE(status.ok()) << status;
    EXPECT_TRUE(backend_->Download(q, x.data(), buffer->data(), x.size() * 4).ok());
    return x;
  }

  std::vector<float> SingularValuesOf(const std::vector<float>& x, int64_t rows, int64_t cols) {
    auto buffer = backend_->Allocate(x.size() * 4);
    EXPECT_TRUE(buffer.ok());
    Queue& q = backend_->default_queue();
    EXPECT_TRUE(backend_->Upload(q, buffer->data(), x.data(), x.size() * 4).ok());
    auto sv = SingularValues(*backend_, q, buffer->f32(), rows, cols);
    EXPECT_TRUE(sv.ok());
    return *sv;
  }

  std::unique_ptr<Backend> backend_;
};

NewtonSchulzConfig Fp32(const char* set, int steps) {
  NewtonSchulzConfig c;
  c.coefficient_set = set;
  c.steps = steps;
  c.compute_dtype = DType::kF32;
  return c;
}

// Iterates the scalar polynomial of `config` on σ/‖X‖F: NS acts on each singular value alone.
std::vector<double> PredictedSingularValues(const std::vector<float>& input_sv,
                                            const NewtonSchulzConfig& config, int64_t rows,
                                            int64_t cols) {
  double norm = 0;
  for (float s : input_sv) norm += double(s) * s;
  norm = std::sqrt(norm) * config.safety + config.eps;
  std::vector<double> out;
  for (float s : input_sv) {
    double x = s / norm;
    for (int k = 0; k < NewtonSchulzSteps(config, rows, cols); ++k) {
      const auto [a, b, c] = NewtonSchulzStepCoefficients(config, k);
      x = formulas::NewtonSchulzPolynomial(x, a, b, c);
    }
    out.push_back(std::fabs(x));
  }
  std::sort(out.rbegin(), out.rend());
  return out;
}

TEST_F(NewtonSchulzTest, OutputSingularValuesFollowThePolynomial) {
  for (const char* set : {"keller", "polar_express", "dion_legacy"}) {
    for (auto [rows, cols] : {std::pair{32, 48}, std::pair{48, 32}, std::pair{40, 40}}) {
      NewtonSchulzConfig config = Fp32(set, 5);
      auto x = RandomNormal(rows * cols, 3);
      auto out = Run(x, 1, rows, cols, config);
      auto predicted = PredictedSingularValues(SingularValuesOf(x, rows, cols), config, rows, cols);
      auto got = SingularValuesOf(out, rows, cols);
      EXPECT_LT(RelativeError(got, predicted), 1e-4) << set << " " << rows << "x" << cols;
    }
  }
}

TEST_F(NewtonSchulzTest, KellerBandOnWellConditionedInput) {
  // Keller's coefficients trade exactness for speed: singular values that start above ~1e-3 of
  // the norm end in roughly [0.68, 1.13] after 5 steps (computed from the polynomial here).
  const int n = 64;
  auto x = RandomNormal(n * n, 4);
  for (int i = 0; i < n; ++i) x[i * n + i] += 8.0f;  // keeps σ_min away from zero
  NewtonSchulzConfig config = Fp32("keller", 5);
  auto sv = SingularValuesOf(Run(x, 1, n, n, config), n, n);
  double lo = 1e9, hi = 0;
  for (double s = 1e-3; s <= 1.0; s += 1e-4) {
    double y = s;
    for (int k = 0; k < 5; ++k) y = formulas::NewtonSchulzPolynomial(y, 3.4445, -4.7750, 2.0315);
    lo = std::min(lo, y);
    hi = std::max(hi, y);
  }
  for (float s : sv) {
    EXPECT_GE(s, lo - 1e-4);
    EXPECT_LE(s, hi + 1e-4);
  }
}

TEST_F(NewtonSchulzTest, ConvergesToThePolarFactorAsStepsGrow) {
  // The cubic Newton–Schulz iteration (1.5, −0.5, 0) converges to UVᵀ for σ in (0, √3).
  const int rows = 24, cols = 36;
  auto x = RandomNormal(rows * cols, 5);
  for (int i = 0; i < rows; ++i) x[i * cols + i] += 4.0f;
  auto buffer = backend_->Allocate(x.size() * 4);
  auto polar = backend_->Allocate(x.size() * 4);
  ASSERT_TRUE(buffer.ok() && polar.ok());
  Queue& q = backend_->default_queue();
  ASSERT_TRUE(backend_->Upload(q, buffer->data(), x.data(), x.size() * 4).ok());
  ASSERT_TRUE(ExactPolar(*backend_, q, buffer->f32(), rows, cols, polar->f32()).ok());
  std::vector<float> exact(x.size());
  ASSERT_TRUE(backend_->Download(q, exact.data(), polar->data(), x.size() * 4).ok());
  double previous = 1e9;
  for (int steps : {3, 6, 12, 24}) {
    NewtonSchulzConfig config = Fp32("keller", steps);
    config.coefficient_set = "custom";
    config.custom = {{1.5, -0.5, 0.0}};
    const double error = RelativeError(Run(x, 1, rows, cols, config), exact);
    // Strictly better each time until fp32 rounding (~3e-7 here) is all that is left.
    if (previous > 1e-6) {
      EXPECT_LT(error, previous) << steps;
    }
    previous = error;
  }
  EXPECT_LT(previous, 1e-5);
}

TEST_F(NewtonSchulzTest, TransposeSymmetryAndBatchEqualsSingles) {
  const int rows = 20, cols = 30;
  auto x = RandomNormal(2 * rows * cols, 6);
  std::vector<float> xt(x.size());
  for (int b = 0; b < 2; ++b)
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < cols; ++j)
        xt[b * rows * cols + j * rows + i] = x[b * rows * cols + i * cols + j];
  NewtonSchulzConfig config = Fp32("keller", 5);
  auto out = Run(x, 2, rows, cols, config);
  auto out_t = Run(xt, 2, cols, rows, config);
  std::vector<float> back(x.size());
  for (int b = 0; b < 2; ++b)
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < cols; ++j)
        back[b * rows * cols + i * cols + j] = out_t[b * rows * cols + j * rows + i];
  EXPECT_LT(RelativeError(back, out), 1e-5);
  std::vector<float> second(x.begin() + rows * cols, x.end());
  auto single = Run(second, 1, rows, cols, config);
  EXPECT_LT(RelativeError(std::vector<float>(out.begin() + rows * cols, out.end()), single), 1e-6);
}

TEST_F(NewtonSchulzTest, MatchesTheFp64ReferenceInFp32AndBf16) {
  const int rows = 32, cols = 64;
  auto x = RandomNormal(rows * cols, 7);
  auto want = reference::NewtonSchulz(reference::FromFloats(x.data(), rows, cols),
                                      reference::KellerCoefficients(), 5, 1e-7, 1.0, false);
  EXPECT_LT(RelativeError(Run(x, 1, rows, cols, Fp32("keller", 5)), want.v), 1e-5);
  NewtonSchulzConfig bf16 = Fp32("keller", 5);
  bf16.compute_dtype = DType::kBF16;
  EXPECT_LT(RelativeError(Run(x, 1, rows, cols, bf16), want.v), 2e-2);
  NewtonSchulzConfig fp16 = Fp32("keller", 5);
  fp16.compute_dtype = DType::kF16;
  EXPECT_LT(RelativeError(Run(x, 1, rows, cols, fp16), want.v), 5e-3);
}

TEST_F(NewtonSchulzTest, EdgeShapes) {
  NewtonSchulzConfig config = Fp32("keller", 5);
  // Zero stays zero (not NaN).
  for (float v : Run(std::vector<float>(12, 0.0f), 1, 3, 4, config)) EXPECT_EQ(v, 0.0f);
  // A 1×n row has one singular value 1 (after normalization); NS maps the row to p⁵(1)·x/‖x‖.
  for (auto [rows, cols] : {std::pair{1, 9}, std::pair{9, 1}}) {
    auto x = RandomNormal(9, 8);
    double norm = 0;
    for (float v : x) norm += double(v) * v;
    norm = std::sqrt(norm);
    double p = norm / (norm + 1e-7);
    for (int k = 0; k < 5; ++k) p = formulas::NewtonSchulzPolynomial(p, 3.4445, -4.7750, 2.0315);
    std::vector<double> want(9);
    for (int i = 0; i < 9; ++i) want[i] = p * x[i] / norm;
    EXPECT_LT(RelativeError(Run(x, 1, rows, cols, config), want), 1e-6);
  }
}

TEST(NewtonSchulzConfigTest, StepsGrowWithDimension) {
  NewtonSchulzConfig config;
  config.steps_grow_with_dimension = true;
  config.reference_dimension = 1024;
  EXPECT_EQ(NewtonSchulzSteps(config, 768, 3072), 5);
  EXPECT_EQ(NewtonSchulzSteps(config, 1024, 4096), 5);
  // √(8192/1024) = 2.83 is lost; a = 3.4445 per step recovers it in ⌈ln 2.83 / ln 3.4445⌉ = 1.
  EXPECT_EQ(NewtonSchulzSteps(config, 8192, 8192), 6);
  // √(65536/1024) = 8: ⌈ln 8 / ln 3.4445⌉ = 2.
  EXPECT_EQ(NewtonSchulzSteps(config, 65536, 65536), 7);
  config.steps_grow_with_dimension = false;
  EXPECT_EQ(NewtonSchulzSteps(config, 65536, 65536), 5);
}

TEST(NewtonSchulzConfigTest, RejectsBadSettings) {
  NewtonSchulzConfig config;
  config.coefficient_set = "nope";
  EXPECT_EQ(ValidateNewtonSchulzConfig(config).code(), absl::StatusCode::kInvalidArgument);
  config.coefficient_set = "custom";
  EXPECT_EQ(ValidateNewtonSchulzConfig(config).code(), absl::StatusCode::kInvalidArgument);
  config.coefficient_set = "keller";
  config.steps = 0;
  EXPECT_EQ(ValidateNewtonSchulzConfig(config).code(), absl::StatusCode::kInvalidArgument);
  // Past the list, the last triple repeats.
  config.coefficient_set = "polar_express";
  config.steps = 7;
  EXPECT_EQ(NewtonSchulzStepCoefficients(config, 6)[0], 2.3465413258596377);
}

TEST_F(NewtonSchulzTest, WithoutTransposeTallMatricesIterateOnTheLargeGram) {
  // Same polynomial on the same singular values, so the same result as the transposed iteration;
  // the workspace must hold the rows×rows Gram matrix.
  const int rows = 40, cols = 8;
  auto x = RandomNormal(2 * rows * cols, 9);
  NewtonSchulzConfig transposed = Fp32("keller", 5);
  NewtonSchulzConfig direct = transposed;
  direct.transpose_tall = false;
  EXPECT_GT(NewtonSchulzWorkspaceFloats(direct, 2, rows, cols),
            NewtonSchulzWorkspaceFloats(transposed, 2, rows, cols));
  EXPECT_LT(RelativeError(Run(x, 2, rows, cols, direct), Run(x, 2, rows, cols, transposed)), 1e-5);
}
}  // namespace
}  // namespace optd
