// Newton–Schulz properties: each output singular value is the coefficient polynomial iterated on
// the input's normalized singular value (so it lands in the band the coefficient set promises),
// convergence to the exact polar factor as steps grow, transposition symmetry, edge shapes; Gram
// Newton–Schulz against the standard iteration and the fp64 reference, and in half precision
// against the exact polar factor of matrices built from known singular vectors.
#include "kernels/newton_schulz.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "kernels/analysis.h"
#include "kernels/optimizer_config.h"
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

NewtonSchulzConfig WithMethod(NewtonSchulzConfig config, NewtonSchulzMethod method,
                              std::optional<std::vector<int>> restarts = std::nullopt) {
  config.method = method;
  config.gram_restarts = std::move(restarts);
  return config;
}

struct Shape {
  int64_t batch, rows, cols;
};

// Wide, tall, nearly square, batched, one row or column, and a Gram matrix over two of the CPU
// backend's 256-wide tiles.
constexpr Shape kGramShapes[] = {{1, 64, 256}, {1, 256, 64}, {3, 24, 80},  {1, 40, 41},
                                 {1, 1, 9},    {1, 9, 1},    {1, 300, 700}};

TEST_F(NewtonSchulzTest, GramMatchesStandardAndTheFp64ReferenceInFp32ForEveryPreset) {
  double worst_standard = 0, worst_fp64 = 0;
  for (absl::string_view preset : PresetNames()) {
    auto full = PresetConfig(preset);
    ASSERT_TRUE(full.ok()) << full.status();
    if (full->algorithm != Algorithm::kMatrix) continue;
    NewtonSchulzConfig config = full->matrix.newton_schulz;
    config.compute_dtype = DType::kF32;
    std::vector<std::array<double, 3>> coefficients;
    for (int step = 0; step < config.steps; ++step) {
      coefficients.push_back(NewtonSchulzStepCoefficients(config, step));
    }
    for (const Shape& shape : kGramShapes) {
      SCOPED_TRACE(std::string(preset) + " " + std::to_string(shape.batch) + "x" +
                   std::to_string(shape.rows) + "x" + std::to_string(shape.cols));
      const int64_t size = shape.rows * shape.cols;
      auto x = RandomNormal(shape.batch * size, 21);
      auto standard = Run(x, shape.batch, shape.rows, shape.cols,
                          WithMethod(config, NewtonSchulzMethod::kStandard));
      auto gram = Run(x, shape.batch, shape.rows, shape.cols,
                      WithMethod(config, NewtonSchulzMethod::kGram));
      EXPECT_LT(RelativeError(gram, standard), 1e-5);
      worst_standard = std::max(worst_standard, RelativeError(gram, standard));
      for (int64_t b = 0; b < shape.batch; ++b) {
        auto want = reference::NewtonSchulz(
            reference::FromFloats(x.data() + b * size, shape.rows, shape.cols), coefficients,
            config.steps, config.eps, config.safety,
            config.eps_mode == formulas::NormEpsilon::kFloor);
        const double error = RelativeError(
            std::vector<float>(gram.begin() + b * size, gram.begin() + (b + 1) * size), want.v);
        EXPECT_LT(error, 1e-5);
        worst_fp64 = std::max(worst_fp64, error);
      }
    }
  }
  std::printf("worst relative error of Gram: %.3g against standard, %.3g against fp64\n",
              worst_standard, worst_fp64);
}

TEST_F(NewtonSchulzTest, GramRestartsDoNotChangeTheResultInFp32) {
  const int rows = 48, cols = 160;
  auto x = RandomNormal(rows * cols, 22);
  const NewtonSchulzConfig config = Fp32("polar_express", 5);
  auto standard = Run(x, 1, rows, cols, WithMethod(config, NewtonSchulzMethod::kStandard));
  for (std::vector<int> restarts : {std::vector<int>{}, {1}, {2}, {1, 3}, {4}, {1, 2, 3, 4}, {9}}) {
    auto gram = Run(x, 1, rows, cols, WithMethod(config, NewtonSchulzMethod::kGram, restarts));
    EXPECT_LT(RelativeError(gram, standard), 1e-5) << restarts.size() << " restarts";
  }
}

TEST(NewtonSchulzMethodTest, GramRunsOnNonSquareMatricesAndAutoByAspectRatio) {
  NewtonSchulzConfig config;
  EXPECT_EQ(config.method, NewtonSchulzMethod::kAuto);
  config.method = NewtonSchulzMethod::kStandard;
  EXPECT_FALSE(UsesGramNewtonSchulz(config, "cpu", 64, 256));
  config.method = NewtonSchulzMethod::kGram;
  EXPECT_TRUE(UsesGramNewtonSchulz(config, "cpu", 64, 65));
  EXPECT_TRUE(UsesGramNewtonSchulz(config, "cpu", 256, 64));
  EXPECT_TRUE(UsesGramNewtonSchulz(config, "cpu", 1, 9));
  EXPECT_FALSE(
      UsesGramNewtonSchulz(config, "cpu", 64, 64));  // as the reference: square is standard
  config.transpose_tall = false;  // a tall matrix's Gram matrix is then the larger one
  EXPECT_FALSE(UsesGramNewtonSchulz(config, "cpu", 256, 64));
  EXPECT_TRUE(UsesGramNewtonSchulz(config, "cpu", 64, 256));
  config.transpose_tall = true;
  config.method = NewtonSchulzMethod::kAuto;
  const double threshold = GramNewtonSchulzMinAspect("cpu");
  EXPECT_GT(threshold, 1.0);
  const auto at = static_cast<int64_t>(std::ceil(100 * threshold));
  EXPECT_TRUE(UsesGramNewtonSchulz(config, "cpu", 100, at));
  EXPECT_TRUE(UsesGramNewtonSchulz(config, "cpu", at, 100));
  EXPECT_FALSE(UsesGramNewtonSchulz(config, "cpu", 100, at - 1));
  // Not measured on a GPU yet: auto keeps CUDA's native standard path.
  EXPECT_FALSE(UsesGramNewtonSchulz(config, "cuda", 64, 4096));
  // Gram's five n×n matrices fit the workspace of both methods.
  NewtonSchulzConfig standard;
  standard.method = NewtonSchulzMethod::kStandard;
  EXPECT_EQ(NewtonSchulzWorkspaceFloats(standard, 2, 64, 256), 2 * (64 * 256 + 2 * 64 * 64));
  EXPECT_EQ(NewtonSchulzWorkspaceFloats(config, 2, 64, 256), 2 * (64 * 256 + 5 * 64 * 64));
  EXPECT_EQ(NewtonSchulzWorkspaceFloats(config, 2, 64, 64), 2 * (64 * 64 + 2 * 64 * 64));
}

TEST(NewtonSchulzConfigTest, RejectsBadGramRestarts) {
  NewtonSchulzConfig config;
  for (std::vector<int> bad :
       {std::vector<int>{0}, {-1}, {kMaxNewtonSchulzSteps}, {3, 2}, {2, 2}}) {
    config.gram_restarts = bad;
    EXPECT_EQ(ValidateNewtonSchulzConfig(config).code(), absl::StatusCode::kInvalidArgument);
  }
  config.gram_restarts = {1, 4};
  EXPECT_TRUE(ValidateNewtonSchulzConfig(config).ok());
}

// fp64 orthonormal columns (rows × count, count <= rows) by Gram–Schmidt on Gaussian vectors.
std::vector<double> OrthonormalColumns(int64_t rows, int64_t count, std::mt19937& rng) {
  std::normal_distribution<double> normal;
  std::vector<double> q(rows * count);
  for (int64_t j = 0; j < count; ++j) {
    for (int pass = 0; pass < 2; ++pass) {  // twice is enough (Kahan)
      if (pass == 0) {
        for (int64_t i = 0; i < rows; ++i) q[i * count + j] = normal(rng);
      }
      for (int64_t p = 0; p < j; ++p) {
        double dot = 0;
        for (int64_t i = 0; i < rows; ++i) dot += q[i * count + p] * q[i * count + j];
        for (int64_t i = 0; i < rows; ++i) q[i * count + j] -= dot * q[i * count + p];
      }
    }
    double norm = 0;
    for (int64_t i = 0; i < rows; ++i) norm += q[i * count + j] * q[i * count + j];
    for (int64_t i = 0; i < rows; ++i) q[i * count + j] /= std::sqrt(norm);
  }
  return q;
}

// One draw: X = U·diag(σ)·Vᵀ from known singular vectors, and its exact polar factor U_r·V_rᵀ
// over the nonzero singular values.
struct Draw {
  int64_t rows, cols;
  std::vector<float> x;
  std::vector<double> polar;
};

Draw MakeDraw(int index, std::mt19937& rng) {
  std::uniform_int_distribution<int64_t> order(2, 40);
  int64_t n = order(rng), m = n + 1 + order(rng) * 2;
  const int kind = index % 5;
  if (kind == 4) n = 1;  // a single row or column
  const int64_t k = std::min(n, m);
  std::vector<double> sigma(k);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (int64_t i = 0; i < k; ++i) {
    switch (kind) {
      case 0:
        sigma[i] = 0.05 + uniform(rng);
        break;  // well conditioned
      case 1:
        sigma[i] = std::pow(10.0, -6.0 * uniform(rng));
        break;  // σ over 1e-6…1
      case 2:
        sigma[i] = i < (k + 1) / 2 ? 0.1 + uniform(rng) : 0.0;
        break;  // rank-deficient
      case 3:
        sigma[i] = i == 0 ? 1.0 : 1e-3 * uniform(rng);
        break;  // one dominant direction
      default:
        sigma[i] = 0.5;
        break;
    }
  }
  sigma[0] = std::max(sigma[0], 1e-3);
  auto u = OrthonormalColumns(n, k, rng), v = OrthonormalColumns(m, k, rng);
  const bool tall = index % 2 == 1;  // half the draws transposed
  Draw draw{tall ? m : n, tall ? n : m, std::vector<float>(n * m), std::vector<double>(n * m)};
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < m; ++j) {
      double x = 0, polar = 0;
      for (int64_t p = 0; p < k; ++p) {
        x += u[i * k + p] * sigma[p] * v[j * k + p];
        if (sigma[p] > 0) polar += u[i * k + p] * v[j * k + p];
      }
      const int64_t at = tall ? j * n + i : i * m + j;
      draw.x[at] = static_cast<float>(x);
      draw.polar[at] = polar;
    }
  }
  return draw;
}

// Over a long fp16 run Gram's accumulated polynomial Q grows by about a per step where σ is (near)
// zero (keller: 3.4445²⁰ ≈ 5e10 over 20 steps, far past fp16's 65504), and so does a spurious
// negative eigenvalue of R, squared: without the restarts Gram adds (WithinHalfRange) the run
// overflows into NaN. With them it stays as close to the polar factor as the standard iteration.
TEST_F(NewtonSchulzTest, GramInFp16StaysInRangeOverLongRuns) {
  NewtonSchulzConfig config = Fp32("keller", 20);
  config.compute_dtype = DType::kF16;
  std::mt19937 rng(43);
  double standard_sum = 0, gram_sum = 0;
  for (int index = 0; index < 20; ++index) {
    const Draw draw = MakeDraw(index % 2 == 0 ? 1 : 2, rng);  // ill conditioned, rank-deficient
    auto standard =
        Run(draw.x, 1, draw.rows, draw.cols, WithMethod(config, NewtonSchulzMethod::kStandard));
    auto gram = Run(draw.x, 1, draw.rows, draw.cols,
                    WithMethod(config, NewtonSchulzMethod::kGram, std::vector<int>{}));
    for (float value : gram) ASSERT_TRUE(std::isfinite(value)) << "draw " << index;
    standard_sum += RelativeError(standard, draw.polar);
    gram_sum += RelativeError(gram, draw.polar);
  }
  EXPECT_LE(gram_sum, 1.1 * standard_sum);
}

// The half-precision bar: over 200 draws (well and ill conditioned, rank-deficient, one
// row or column, wide and tall), Gram's mean error against the exact polar factor is at most 10%
// above the standard iteration's in the same dtype, and no draw blows up: every value is finite
// and ‖out‖F stays within 10% of the standard run's.
TEST_F(NewtonSchulzTest, GramInHalfPrecisionIsAsCloseToThePolarFactorAsStandard) {
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    for (const char* set : {"keller", "polar_express"}) {
      NewtonSchulzConfig config = Fp32(set, 5);
      config.compute_dtype = dtype;
      std::mt19937 rng(31);
      double standard_sum = 0, gram_sum = 0, worst_ratio = 0;
      for (int index = 0; index < 200; ++index) {
        const Draw draw = MakeDraw(index, rng);
        auto standard =
            Run(draw.x, 1, draw.rows, draw.cols, WithMethod(config, NewtonSchulzMethod::kStandard));
        NewtonSchulzConfig gram_config = WithMethod(config, NewtonSchulzMethod::kGram);
        auto gram = Run(draw.x, 1, draw.rows, draw.cols, gram_config);
        double standard_norm = 0, gram_norm = 0;
        for (size_t i = 0; i < gram.size(); ++i) {
          ASSERT_TRUE(std::isfinite(gram[i])) << "draw " << index;
          standard_norm += double(standard[i]) * standard[i];
          gram_norm += double(gram[i]) * gram[i];
        }
        EXPECT_LT(std::sqrt(gram_norm), 1.1 * std::sqrt(standard_norm) + 1e-3)
            << "draw " << index << " kind " << index % 5 << " " << draw.rows << "x" << draw.cols
            << " err " << RelativeError(gram, draw.polar) << " vs "
            << RelativeError(standard, draw.polar);
        const double standard_error = RelativeError(standard, draw.polar);
        const double gram_error = RelativeError(gram, draw.polar);
        standard_sum += standard_error;
        gram_sum += gram_error;
        worst_ratio = std::max(worst_ratio, gram_error / standard_error);
      }
      RecordProperty(std::string(set) + "_" + std::string(DTypeName(dtype)) + "_mean_ratio",
                     std::to_string(gram_sum / standard_sum));
      std::printf(
          "%s %s: mean error vs polar standard %.4g gram %.4g (ratio %.4f, worst draw %.4f)\n", set,
          std::string(DTypeName(dtype)).c_str(), standard_sum / 200, gram_sum / 200,
          gram_sum / standard_sum, worst_ratio);
      EXPECT_LE(gram_sum, 1.1 * standard_sum) << set << " " << DTypeName(dtype);
    }
  }
}

}  // namespace
}  // namespace optd
