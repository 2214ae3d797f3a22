// The auto modes' figures and rules (kernels/auto_choice.h) against values computed here
// independently: spectra built from known singular vectors, the dominance ratio and the cosine
// read off the matrix and its constructed polar factor, and the Newton–Schulz polynomial iterated
// as a scalar.
#include "kernels/auto_choice.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <vector>

#include "kernels/optimizer_config.h"
#include "tests/kernels/reference.h"

namespace optd {
namespace {

using reference::WithSingularValues;

// cos(rownormalize(x), polar) in fp64, from the matrix and its polar factor.
double CosineToPolar(const std::vector<float>& x, const std::vector<double>& polar, int64_t rows,
                     int64_t cols) {
  double inner = 0, rn = 0, pp = 0;
  for (int64_t i = 0; i < rows; ++i) {
    double n = 0;
    for (int64_t j = 0; j < cols; ++j) n += double(x[i * cols + j]) * x[i * cols + j];
    n = std::sqrt(n);
    for (int64_t j = 0; j < cols; ++j) {
      const double r = n == 0 ? 0.0 : x[i * cols + j] / n;
      inner += r * polar[i * cols + j];
      rn += r * r;
      pp += polar[i * cols + j] * polar[i * cols + j];
    }
  }
  return inner / std::sqrt(rn * pp);
}

// Keller's step polynomial iterated on one normalized singular value.
double KellerMap(double sigma, double frobenius, int steps) {
  const auto& abc = reference::KellerCoefficients()[0];
  double x = sigma / (frobenius + 1e-7);
  for (int k = 0; k < steps; ++k) x = abc[0] * x + abc[1] * x * x * x + abc[2] * std::pow(x, 5);
  return x;
}

double Frobenius(const std::vector<double>& sigma) {
  double s = 0;
  for (double v : sigma) s += v * v;
  return std::sqrt(s);
}

struct ShapeCase {
  int64_t rows, cols;
};

class AutoFiguresTest : public ::testing::TestWithParam<ShapeCase> {};

TEST_P(AutoFiguresTest, SpectrumDominanceAndCosineMatchTheConstruction) {
  const auto [rows, cols] = GetParam();
  const int64_t n = std::min(rows, cols);
  // A decaying spectrum, and a rank-deficient one whose null space the figures leave out.
  for (const int64_t rank : {n, std::max<int64_t>(1, n / 2)}) {
    SCOPED_TRACE(rank);
    std::vector<double> sigma(rank);
    for (int64_t i = 0; i < rank; ++i) sigma[i] = std::pow(0.8, static_cast<double>(i));
    std::vector<double> polar;
    const std::vector<float> x = WithSingularValues(rows, cols, sigma, 7 + rank, &polar);
    auto f = MeasureAutoFigures(x, rows, cols, /*direction=*/true);
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_NEAR(f->frobenius_norm, Frobenius(sigma), 1e-5 * Frobenius(sigma));
    ASSERT_EQ(f->singular_values.size(), sigma.size());
    for (size_t i = 0; i < sigma.size(); ++i) EXPECT_NEAR(f->singular_values[i], sigma[i], 1e-5);
    const double r_min = reference::DominanceRatios(x, rows, cols).min;
    // fp64 for a wide matrix (the Gram matrix the spectrum comes from); fp32 blocks for a tall one.
    EXPECT_NEAR(f->dominance_min, r_min, (rows <= cols ? 1e-9 : 1e-5) * r_min);
    EXPECT_NEAR(f->cosine, CosineToPolar(x, polar, rows, cols), 1e-5);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, AutoFiguresTest,
                         ::testing::Values(ShapeCase{16, 48}, ShapeCase{48, 16}, ShapeCase{24, 24},
                                           // Tall enough for V·Vᵀ in several row blocks.
                                           ShapeCase{2500, 6}, ShapeCase{2, 9}));

TEST(AutoFigures, OrthogonalRowsAreDominantAndRowNormalizationIsThePolarFactor) {
  // Rows of different lengths along orthonormal directions: V·Vᵀ is diagonal, and dividing each
  // row by its length is exactly U·Wᵀ.
  const int64_t rows = 6, cols = 10;
  const reference::Matrix q = reference::RandomOrthonormalColumns(cols, rows, 3);
  std::vector<float> x(rows * cols);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) x[i * cols + j] = static_cast<float>((i + 1) * q.at(j, i));
  auto f = MeasureAutoFigures(x, rows, cols, true);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_GT(f->dominance_min, 1e5);  // fp32 rows are orthogonal to ~1e-7
  EXPECT_NEAR(f->cosine, 1.0, 1e-6);
  // One row: nothing to compare against (+inf), and its normalization is its polar factor.
  auto one = MeasureAutoFigures(std::vector<float>{3, 4}, 1, 2, true);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->dominance_min, std::numeric_limits<double>::infinity());
  EXPECT_NEAR(one->cosine, 1.0, 1e-12);
  ASSERT_EQ(one->singular_values.size(), 1u);
  EXPECT_NEAR(one->singular_values[0], 5.0, 1e-12);
}

TEST(AutoFigures, EqualRowsHaveRatioOneAndAZeroMatrixHasNoFigures) {
  // Every row the same v: (VVᵀ)_ij = ‖v‖² everywhere, so r_i = 1; rank one, so the polar factor
  // is (1/√m)·1·v̂ᵀ and the normalized rows are its multiple: cos = 1.
  std::vector<float> x;
  for (int i = 0; i < 5; ++i) x.insert(x.end(), {1.0f, -2.0f, 0.5f});
  auto f = MeasureAutoFigures(x, 5, 3, true);
  ASSERT_TRUE(f.ok());
  EXPECT_NEAR(f->dominance_min, 1.0, 1e-12);
  EXPECT_NEAR(f->cosine, 1.0, 1e-9);
  EXPECT_EQ(f->singular_values.size(), 1u);
  EXPECT_EQ(MeasureAutoFigures(std::vector<float>(6, 0.0f), 2, 3, true).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(MeasureAutoFigures(std::vector<float>(5, 1.0f), 2, 3, false).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(AutoSteps, TheFewestStepsThatLiftTheSmallSingularValues) {
  // 12 singular values at 1 and 4 at s: the share below 0.6 after k steps is 4/16 while Keller's
  // polynomial leaves s·/‖X‖ below 0.6, and 0 once it lifts it (the large ones are above 0.6 from
  // the first step). The expected count is read off the scalar iteration.
  const int64_t rows = 16, cols = 40;
  for (const double s : {1e-3, 2e-2, 0.2}) {
    SCOPED_TRACE(s);
    std::vector<double> sigma(16, 1.0);
    for (int i = 12; i < 16; ++i) sigma[i] = s;
    const std::vector<float> x = WithSingularValues(rows, cols, sigma, 5);
    const double frobenius = Frobenius(sigma);
    AutoConfig config;
    config.steps = true;
    config.max_step_change = 100;
    int expected = config.max_steps;
    for (int k = config.min_steps; k <= config.max_steps; ++k) {
      ASSERT_GT(KellerMap(1.0, frobenius, k), 0.6);
      // The construction keeps away from 0.6, where fp32 could tip the count.
      ASSERT_GT(std::fabs(KellerMap(s, frobenius, k) - 0.6), 0.02) << k;
      if (KellerMap(s, frobenius, k) >= 0.6) {
        expected = k;
        break;
      }
    }
    auto f = MeasureAutoFigures(x, rows, cols, false);
    ASSERT_TRUE(f.ok());
    for (int k = config.min_steps; k <= config.max_steps; ++k) {
      EXPECT_DOUBLE_EQ(SmallSingularValueShare(NewtonSchulzConfig{}, rows, cols, *f, k),
                       KellerMap(s, frobenius, k) < 0.6 ? 0.25 : 0.0)
          << k;
    }
    for (const int current : {2, 5, 10}) {
      auto d = DecideMatrix(x, rows, cols, config, NewtonSchulzConfig{}, {current, false});
      ASSERT_TRUE(d.ok());
      // Up to the fewest meeting the target; down only where half the target is met, which for
      // this two-level share is the same count.
      EXPECT_EQ(d->choice.steps, expected) << current;
      EXPECT_EQ(d->small_sv_share, 0.0);
    }
  }
}

TEST(AutoSteps, ChangesAreBoundedAndHaveHysteresis) {
  AutoConfig c;
  c.steps = true;
  c.min_steps = 2;
  c.max_steps = 10;
  c.small_sv_target = 0.1;
  c.max_step_change = 2;
  // share(k) from a table: 0.3 up to 5 steps, 0.08 at 6, 0.04 from 7.
  auto share = [](int k) { return k <= 5 ? 0.3 : k == 6 ? 0.08 : 0.04; };
  EXPECT_EQ(ChooseNewtonSchulzSteps(c, 2, share), 4);   // wants 6, moves 2
  EXPECT_EQ(ChooseNewtonSchulzSteps(c, 4, share), 6);   // reaches it
  EXPECT_EQ(ChooseNewtonSchulzSteps(c, 6, share), 6);   // 0.08 meets 0.1: stays
  EXPECT_EQ(ChooseNewtonSchulzSteps(c, 7, share), 7);   // 6 would leave 0.08 > 0.05: stays
  EXPECT_EQ(ChooseNewtonSchulzSteps(c, 10, share), 8);  // 7 meets half: moves 2 towards it
  EXPECT_EQ(ChooseNewtonSchulzSteps(c, 8, share), 7);
  // Nothing meets the target: max_steps; everything does: min_steps.
  EXPECT_EQ(ChooseNewtonSchulzSteps(c, 9, [](int) { return 1.0; }), 10);
  EXPECT_EQ(ChooseNewtonSchulzSteps(c, 3, [](int) { return 0.0; }), 2);
  // A current count outside the bounds (a changed config) is clamped first.
  EXPECT_EQ(ChooseNewtonSchulzSteps(c, 50, [](int) { return 1.0; }), 10);
}

TEST(AutoDirection, BothFiguresMustClearTheirThresholdsWithHysteresis) {
  AutoConfig c;
  c.direction = true;
  c.min_dominance = 2.0;
  c.min_cosine = 0.9;
  c.hysteresis = 0.1;  // enter: r ≥ 2.2 and cos ≥ 0.91; leave: r < 1.8 or cos < 0.89
  EXPECT_TRUE(ChooseRowNormalize(c, false, 2.2, 0.91));
  EXPECT_FALSE(ChooseRowNormalize(c, false, 2.19, 0.99));
  EXPECT_FALSE(ChooseRowNormalize(c, false, 100.0, 0.909));
  EXPECT_TRUE(ChooseRowNormalize(c, true, 1.8, 0.89));
  EXPECT_FALSE(ChooseRowNormalize(c, true, 1.79, 0.99));
  EXPECT_FALSE(ChooseRowNormalize(c, true, 100.0, 0.889));
  // Between the bands the current choice holds.
  EXPECT_FALSE(ChooseRowNormalize(c, false, 2.0, 0.9));
  EXPECT_TRUE(ChooseRowNormalize(c, true, 2.0, 0.9));
}

TEST(AutoConfig, ParsedValidatedAndTurnedOffByAFixedSetting) {
  auto c = ParseOptimizerConfig(
      "keller,ns.steps=auto,ns.min_steps=3,ns.max_steps=8,ns.small_sv_target=0.2,"
      "ns.max_step_change=1,direction=auto,auto.min_dominance=2.5,auto.min_cosine=0.8,"
      "auto.hysteresis=0.1,auto.interval=7");
  ASSERT_TRUE(c.ok()) << c.status();
  const AutoConfig& a = c->matrix.auto_modes;
  EXPECT_TRUE(a.steps && a.direction);
  EXPECT_EQ(a.min_steps, 3);
  EXPECT_EQ(a.max_steps, 8);
  EXPECT_EQ(a.small_sv_target, 0.2);
  EXPECT_EQ(a.max_step_change, 1);
  EXPECT_EQ(a.min_dominance, 2.5);
  EXPECT_EQ(a.min_cosine, 0.8);
  EXPECT_EQ(a.hysteresis, 0.1);
  EXPECT_EQ(a.interval, 7);
  EXPECT_EQ(c->matrix.direction, Direction::kNewtonSchulz);
  auto fixed = ParseOptimizerConfig(
      "keller,ns.steps=auto,direction=auto,ns.steps=6,direction=newton_schulz");
  ASSERT_TRUE(fixed.ok());
  EXPECT_FALSE(fixed->matrix.auto_modes.any());
  EXPECT_EQ(fixed->matrix.newton_schulz.steps, 6);

  const std::map<std::string, std::string> bad = {
      {"keller,ns.steps=auto,ns.min_steps=0", "ns.min_steps"},
      {"keller,ns.steps=auto,ns.min_steps=6,ns.max_steps=5", "ns.min_steps"},
      {"keller,ns.steps=auto,ns.max_steps=101", "ns.max_steps"},
      {"keller,ns.max_steps=99999999999", "out of range"},
      {"keller,ns.steps=auto,ns.small_sv_target=1", "ns.small_sv_target"},
      {"keller,ns.steps=auto,ns.max_step_change=0", "ns.max_step_change"},
      {"keller,direction=auto,auto.min_dominance=0", "auto.min_dominance"},
      {"keller,direction=auto,auto.min_cosine=1.5", "auto.min_cosine"},
      {"keller,direction=auto,auto.hysteresis=1", "auto.hysteresis"},
      {"keller,direction=auto,auto.interval=0", "auto.interval"},
      {"keller,direction=auto,auto.max_dim=0", "auto.max_dim"},
      {"rmnp,ns.steps=auto", "Newton–Schulz direction"},
      {"keller,ns.steps=auto,direction=polar", "Newton–Schulz direction"},
      {"keller,ns.steps=auto,ns.grow_with_dimension=true", "choose one"},
      {"keller,direction=sideways", "auto"},
      {"keller,ns.steps=often", "not an integer"},
  };
  for (const auto& [spec, message] : bad) {
    auto parsed = ParseOptimizerConfig(spec);
    ASSERT_FALSE(parsed.ok()) << spec;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << spec;
    EXPECT_NE(parsed.status().message().find(message), absl::string_view::npos)
        << spec << ": " << parsed.status();
  }
}

}  // namespace
}  // namespace optd
