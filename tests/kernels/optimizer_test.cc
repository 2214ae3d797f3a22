// Every preset against a plain fp64 implementation of its public reference's rule
// (../shared/REFERENCES.md), 10 steps on random gradients, over square, wide, tall, 1×n and
// rank-3 (flattened and batched) shapes; plus the optimizer's contract on bad input.
#include "kernels/optimizer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/formulas.h"
#include "tests/kernels/backend_test_util.h"
#include "tests/kernels/reference.h"

namespace optd {
namespace {

using reference::Matrix;

constexpr int kSteps = 10;
constexpr double kWeightDecay = 0.05;

// fp64 state of one matrix for the reference rules.
struct RefState {
  Matrix w, m;
  std::vector<double> v;  // NorMuon per-row second moment
};

double Lerp(double a, double b, double t) { return a + t * (b - a); }

// One step of `preset` on one matrix, as the reference code reads. `scale_rows/cols` are the
// dimensions the scale rule reads (the 4-D quirk aside, the matrix's own).
// `ns_steps` and `row_normalize` are the auto modes' choices for this step.
void ReferenceMatrixStep(const std::string& preset, RefState& s, const Matrix& g, double lr,
                         double mu, double scale_rows, double scale_cols, int ns_steps = 5,
                         bool row_normalize = false) {
  const int64_t r = g.rows, c = g.cols;
  const bool ema =
      preset == "keller" || preset == "torch" || preset == "normuon" || preset == "normuon_paper";
  const bool nesterov = preset != "dion" && preset != "normuon_paper";
  Matrix u(r, c);
  for (size_t i = 0; i < g.v.size(); ++i) {
    double& m = s.m.v[i];
    if (ema) {
      m = Lerp(m, g.v[i], 1 - mu);
      u.v[i] = nesterov ? Lerp(g.v[i], m, mu) : m;
    } else {
      m = mu * m + g.v[i];
      u.v[i] = nesterov ? g.v[i] + mu * m : m;
    }
  }
  Matrix o;
  if (preset == "rmnp" || row_normalize) {
    o = u;
    for (int64_t i = 0; i < r; ++i) {
      double n = 0;
      for (int64_t j = 0; j < c; ++j) n += u.at(i, j) * u.at(i, j);
      n = std::max(std::sqrt(n), 1e-12);
      for (int64_t j = 0; j < c; ++j) o.at(i, j) = u.at(i, j) / n;
    }
  } else {
    if (preset.rfind("muoneq", 0) == 0) {
      const bool rows = preset == "muoneq_row" || preset == "muoneq_rowcol";
      const bool cols = preset == "muoneq_col" || preset == "muoneq_rowcol";
      std::vector<double> rs(r, 0), cs(c, 0);
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = 0; j < c; ++j) {
          rs[i] += u.at(i, j) * u.at(i, j);
          cs[j] += u.at(i, j) * u.at(i, j);
        }
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = 0; j < c; ++j) {
          if (rows) u.at(i, j) /= std::sqrt(rs[i] + 1e-8);
          if (cols) u.at(i, j) /= std::sqrt(cs[j] + 1e-8);
        }
    }
    if (preset == "dion") {
      o = reference::NewtonSchulz(u, reference::PolarExpressCoefficients(), 5, 1e-8, 1.02, false);
    } else {
      o = reference::NewtonSchulz(u, reference::KellerCoefficients(), ns_steps, 1e-7, 1.0,
                                  preset == "torch");
    }
  }
  double scale = 1;
  if (preset == "keller" || preset == "torch" || preset == "normuon" || preset == "rmnp") {
    scale = std::sqrt(std::max(1.0, scale_rows / scale_cols));
  } else if (preset == "moonlight" || preset.rfind("muoneq", 0) == 0) {
    scale = 0.2 * std::sqrt(std::max(double(r), double(c)));
  } else if (preset == "dion") {
    scale = std::sqrt(double(r) / double(c));
  }
  if (preset == "normuon" || preset == "normuon_paper") {
    const double eps = preset == "normuon" ? 1e-10 : 1e-8;
    const double before = reference::FrobeniusNorm(o);
    for (int64_t i = 0; i < r; ++i) {
      double mean = 0;
      for (int64_t j = 0; j < c; ++j) mean += o.at(i, j) * o.at(i, j) / c;
      s.v[i] = Lerp(s.v[i], mean, 1 - 0.95);
      for (int64_t j = 0; j < c; ++j) o.at(i, j) /= std::sqrt(s.v[i]) + eps;
    }
    if (preset == "normuon") {
      const double after = reference::FrobeniusNorm(o);
      for (double& x : o.v) x *= before / (after + 1e-10);
    } else {
      // Seed 002, Algorithm 1: η̂ = 0.2·η·√(mn)/‖Ô‖F.
      scale = 0.2 * std::sqrt(double(r * c)) / reference::FrobeniusNorm(o);
    }
  }
  for (size_t i = 0; i < s.w.v.size(); ++i) {
    s.w.v[i] = s.w.v[i] * (1 - lr * kWeightDecay) - lr * scale * o.v[i];
  }
}

// The fp32 contract: w within 1e-5 relative of the fp64 w, and the accumulated change w − w0
// (which w0 would otherwise dominate) within 1e-4 — about what rounding w to fp32 at every step
// leaves when lr is 1e-3.
void ExpectFp32Match(const std::vector<float>& got, const std::vector<double>& want,
                     const std::vector<float>& w0) {
  std::vector<double> delta_got(got.size()), delta_want(got.size());
  for (size_t i = 0; i < got.size(); ++i) {
    delta_got[i] = double(got[i]) - w0[i];
    delta_want[i] = want[i] - w0[i];
  }
  EXPECT_LT(reference::RelativeError(got, want), 1e-5);
  EXPECT_LT(reference::RelativeError(delta_got, delta_want), 1e-4);
}

struct Shape {
  std::string name;
  std::vector<int64_t> dims;
  RankPolicy policy;
};

std::vector<Shape> Shapes() {
  return {{"square", {24, 24}, RankPolicy::kFlatten},
          {"wide", {12, 40}, RankPolicy::kFlatten},
          {"tall", {40, 12}, RankPolicy::kFlatten},
          {"row", {1, 24}, RankPolicy::kFlatten},
          {"rank3_flatten", {6, 4, 5}, RankPolicy::kFlatten},
          {"rank3_batch", {3, 10, 14}, RankPolicy::kBatch}};
}

struct PresetCase {
  std::string preset;
  std::string precision;  // "fp32" or "" (the preset's own, bf16)
  std::string backend;    // "cpu" or "cuda"
};

// Names a case in test output (gtest would print its bytes).
void PrintTo(const PresetCase& c, std::ostream* os) {
  *os << c.preset << " " << (c.precision.empty() ? "bf16" : c.precision) << " on " << c.backend;
}

class PresetTest : public ::testing::TestWithParam<PresetCase> {};

TEST_P(PresetTest, MatchesFp64ReferenceOverTenSteps) {
  const PresetCase& pc = GetParam();
  std::string skip;
  std::unique_ptr<Backend> backend = testing::MakeBackend(pc.backend, &skip);
  if (!skip.empty()) GTEST_SKIP() << skip;
  ASSERT_NE(backend, nullptr);
  for (const Shape& shape : Shapes()) {
    SCOPED_TRACE(shape.name);
    std::string spec = pc.preset + ",weight_decay=0.05";
    if (!pc.precision.empty()) spec += ",precision=" + pc.precision;
    auto config = ParseOptimizerConfig(spec);
    ASSERT_TRUE(config.ok()) << config.status();
    auto opt = Optimizer::Create(*backend, {{"w", shape.dims, shape.policy, *config}});
    ASSERT_TRUE(opt.ok()) << opt.status();
    auto view = MatrixViewOf(shape.dims, shape.policy);
    ASSERT_TRUE(view.ok());
    const int64_t count = view->batch * view->rows * view->cols;
    const std::vector<float> w0 = reference::RandomNormal(count, 11, 0.5f);
    ASSERT_TRUE((*opt)->SetParameters(0, w0).ok());

    // The 4-D quirk aside, the scale reads the last two dims for batched shapes and the
    // flattened matrix otherwise; Keller and NorMuon read the tensor's last two dims always.
    const bool quirk = pc.preset == "keller" || pc.preset == "normuon";
    const double scale_rows = quirk ? shape.dims[shape.dims.size() - 2] : view->rows;
    const double scale_cols = quirk ? shape.dims.back() : view->cols;
    std::vector<RefState> ref(view->batch);
    const int64_t size = view->rows * view->cols;
    for (int64_t b = 0; b < view->batch; ++b) {
      ref[b].w = reference::FromFloats(w0.data() + b * size, view->rows, view->cols);
      ref[b].m = Matrix(view->rows, view->cols);
      ref[b].v.assign(view->rows, 0.0);
    }
    for (int step = 0; step < kSteps; ++step) {
      const std::vector<float> g = reference::RandomNormal(count, 100 + step);
      ASSERT_TRUE((*opt)->SetGradient(0, g).ok());
      ASSERT_TRUE((*opt)->Step().ok());
      for (int64_t b = 0; b < view->batch; ++b) {
        ReferenceMatrixStep(pc.preset, ref[b],
                            reference::FromFloats(g.data() + b * size, view->rows, view->cols),
                            config->lr, config->matrix.momentum, scale_rows, scale_cols);
      }
    }
    std::vector<float> w(count);
    ASSERT_TRUE((*opt)->GetParameters(0, absl::MakeSpan(w)).ok());
    std::vector<double> got(count), want(count), want_w(count);
    for (int64_t b = 0; b < view->batch; ++b) {
      for (int64_t i = 0; i < size; ++i) {
        got[b * size + i] = double(w[b * size + i]) - w0[b * size + i];
        want[b * size + i] = ref[b].w.v[i] - w0[b * size + i];
        want_w[b * size + i] = ref[b].w.v[i];
      }
    }
    if (pc.precision == "fp32") {
      ExpectFp32Match(w, want_w, w0);
    } else {
      EXPECT_LT(reference::RelativeError(w, want_w), 2e-2);
      // A 1×n matrix has one singular value, 1/1.02 after dion's normalization, where Polar
      // Express's first polynomial has slope 8.16 − 67.4σ² + 79.4σ⁴ ≈ 16.7: it amplifies bf16's
      // 2⁻⁹ input rounding about 17-fold, so bf16 itself (on a GPU too) sits ~8% off fp64 there.
      const bool amplified = pc.preset == "dion" && view->rows == 1;
      EXPECT_LT(reference::RelativeError(got, want), amplified ? 1e-1 : 2e-2);
    }
  }
}

std::vector<PresetCase> PresetCases() {
  std::vector<PresetCase> cases;
  for (const char* p : {"keller", "moonlight", "torch", "dion", "normuon", "normuon_paper", "rmnp",
                        "muoneq_row", "muoneq_col", "muoneq_rowcol"}) {
    for (const char* backend : {"cpu", "cuda"}) {
      cases.push_back({p, "fp32", backend});
      cases.push_back({p, "", backend});
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(AllPresets, PresetTest, ::testing::ValuesIn(PresetCases()),
                         [](const auto& info) {
                           return info.param.preset + "_" +
                                  (info.param.precision.empty() ? "bf16" : info.param.precision) +
                                  "_" + info.param.backend;
                         });

// --- The optimizer's contract on edge cases and bad input. ---

class OptimizerContractTest : public testing::CpuOptimizerTest {
 protected:
  std::unique_ptr<Optimizer> Make(std::vector<TensorSpec> specs) {
    auto opt = Optimizer::Create(*backend_, std::move(specs));
    EXPECT_TRUE(opt.ok()) << opt.status();
    return std::move(*opt);
  }
  std::vector<float> Params(const Optimizer& opt, int i) {
    std::vector<float> w(opt.num_elements(i));
    EXPECT_TRUE(opt.GetParameters(i, absl::MakeSpan(w)).ok());
    return w;
  }
  std::vector<float> State(const Optimizer& opt, int i, int k) {
    const StateBuffer b = opt.state(i)[k];
    return std::vector<float>(b.data, b.data + b.count);  // CPU backend: host memory
  }
};

// --- The auto modes (kernels/auto_choice.h) inside the step. ---

// Keller's polynomial on one singular value σ of a matrix of Frobenius norm `frobenius`.
double KellerMap(double sigma, double frobenius, int steps) {
  const auto& abc = reference::KellerCoefficients()[0];
  double x = sigma / (frobenius + 1e-7);
  for (int k = 0; k < steps; ++k) x = abc[0] * x + abc[1] * x * x * x + abc[2] * std::pow(x, 5);
  return x;
}

TEST_F(OptimizerContractTest, AutoStepsAreDecidedPerMatrixAndApplyFromTheNextStep) {
  // Two matrices of one batched tensor, each with 12 singular values at 1 and 4 at s. Every
  // gradient is a multiple of the same matrix, so every step's direction input has that spectrum
  // and the right step count is known in closed form: the fewest whose polynomial lifts s above
  // 0.6. From 3 steps, moving at most 2 per decision, decided every step; the fp64 reference
  // steps with the counts the rule gives, one step late.
  const int64_t rows = 16, cols = 40, size = rows * cols;
  const std::vector<double> spectrum_s = {3e-3, 0.3};
  std::vector<float> g0;
  std::vector<int> target;
  for (size_t b = 0; b < spectrum_s.size(); ++b) {
    std::vector<double> sigma(16, 1.0);
    for (int i = 12; i < 16; ++i) sigma[i] = spectrum_s[b];
    const std::vector<float> x = reference::WithSingularValues(rows, cols, sigma, 31 + b);
    g0.insert(g0.end(), x.begin(), x.end());
    double frobenius = 0;
    for (double v : sigma) frobenius += v * v;
    frobenius = std::sqrt(frobenius);
    int k = 2;
    while (k < 10 && KellerMap(spectrum_s[b], frobenius, k) < 0.6) ++k;
    target.push_back(k);
  }
  ASSERT_GT(target[0], 5);  // climbs in two decisions
  ASSERT_LT(target[1], 3);  // descends
  OptimizerConfig config = Config(
      "keller,precision=fp32,weight_decay=0.05,ns.steps=3,ns.steps=auto,ns.max_step_change=2,"
      "auto.interval=1");
  auto opt = Make({{"w", {2, rows, cols}, RankPolicy::kBatch, config}});
  ASSERT_TRUE(opt->has_auto_choices(0));
  const std::vector<float> w0 = reference::RandomNormal(2 * size, 11, 0.5f);
  ASSERT_TRUE(opt->SetParameters(0, w0).ok());
  std::vector<RefState> ref(2);
  std::vector<int> steps = {3, 3};
  for (int b = 0; b < 2; ++b) {
    ref[b].w = reference::FromFloats(w0.data() + b * size, rows, cols);
    ref[b].m = Matrix(rows, cols);
    EXPECT_EQ(opt->auto_choices(0).matrices[b].steps, 3);
  }
  for (int step = 1; step <= kSteps; ++step) {
    std::vector<float> g(g0);
    for (float& v : g) v *= static_cast<float>(1.0 + 0.3 * std::sin(step));
    ASSERT_TRUE(opt->SetGradient(0, g).ok());
    ASSERT_TRUE(opt->Step().ok());
    for (int b = 0; b < 2; ++b) {
      ReferenceMatrixStep("keller", ref[b], reference::FromFloats(g.data() + b * size, rows, cols),
                          config.lr, config.matrix.momentum, rows, cols, steps[b]);
      steps[b] += std::clamp(target[b] - steps[b], -2, 2);
      EXPECT_EQ(opt->auto_choices(0).matrices[b].steps, steps[b]) << "step " << step;
    }
    EXPECT_EQ(opt->auto_choices(0).decided_at_step, step);
  }
  EXPECT_EQ(steps, target);
  EXPECT_EQ(opt->auto_choices(0).small_sv_share, 0.0);
  std::vector<double> want(2 * size);
  for (int b = 0; b < 2; ++b)
    std::copy(ref[b].w.v.begin(), ref[b].w.v.end(), want.begin() + b * size);
  ExpectFp32Match(Params(*opt, 0), want, w0);
}

TEST_F(OptimizerContractTest, AutoDirectionRowNormalizesOnlyWhereBothFiguresAgree) {
  // "o": rows of different lengths along orthonormal directions, so V·Vᵀ is diagonal and the
  // normalized rows are the polar factor: row normalization from the first decision on.
  // "e": every row the same vector, r_i = 1 < 1.05·min_dominance: Newton–Schulz throughout.
  // Decisions at steps 1, 3, 6, 9 (interval 3); the fp64 reference follows them a step late.
  const int64_t rows = 6, cols = 10;
  const Matrix q = reference::RandomOrthonormalColumns(cols, rows, 3);
  std::vector<float> go(rows * cols), ge;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) go[i * cols + j] = static_cast<float>((i + 1) * q.at(j, i));
  for (int i = 0; i < 5; ++i) ge.insert(ge.end(), {1.0f, -2.0f, 0.5f});
  OptimizerConfig config =
      Config("keller,precision=fp32,weight_decay=0.05,direction=auto,auto.interval=3");
  auto opt = Make({{"o", {rows, cols}, RankPolicy::kFlatten, config},
                   {"e", {5, 3}, RankPolicy::kFlatten, config}});
  const std::vector<std::vector<float>> g0 = {go, ge};
  const std::vector<std::pair<int64_t, int64_t>> shape = {{rows, cols}, {5, 3}};
  std::vector<RefState> ref(2);
  std::vector<std::vector<float>> w0(2);
  for (int t = 0; t < 2; ++t) {
    w0[t] = reference::RandomNormal(g0[t].size(), 5 + t, 0.5f);
    ASSERT_TRUE(opt->SetParameters(t, w0[t]).ok());
    ref[t].w = reference::FromFloats(w0[t].data(), shape[t].first, shape[t].second);
    ref[t].m = Matrix(shape[t].first, shape[t].second);
  }
  for (int step = 1; step <= kSteps; ++step) {
    std::vector<std::vector<float>> g = g0;
    for (int t = 0; t < 2; ++t) {
      for (float& v : g[t]) v *= static_cast<float>(1.0 + 0.3 * std::cos(step));
      ASSERT_TRUE(opt->SetGradient(t, g[t]).ok());
    }
    ASSERT_TRUE(opt->Step().ok());
    for (int t = 0; t < 2; ++t) {
      ReferenceMatrixStep("keller", ref[t],
                          reference::FromFloats(g[t].data(), shape[t].first, shape[t].second),
                          config.lr, config.matrix.momentum, shape[t].first, shape[t].second, 5,
                          /*row_normalize=*/t == 0 && step > 1);
    }
    EXPECT_TRUE(opt->auto_choices(0).matrices[0].row_normalize) << step;
    EXPECT_FALSE(opt->auto_choices(1).matrices[0].row_normalize) << step;
    EXPECT_EQ(opt->auto_choices(0).decided_at_step, step < 3 ? 1 : step / 3 * 3);
  }
  EXPECT_GT(opt->auto_choices(0).dominance_min, 1e5);
  EXPECT_NEAR(opt->auto_choices(0).cosine, 1.0, 1e-6);
  EXPECT_NEAR(opt->auto_choices(1).dominance_min, 1.0, 1e-6);
  for (int t = 0; t < 2; ++t) ExpectFp32Match(Params(*opt, t), ref[t].w.v, w0[t]);
}

TEST_F(OptimizerContractTest, AutoChoicesChangeOnlyWithACommittedStepAndRestoreChecked) {
  OptimizerConfig config = Config("keller,ns.steps=auto,direction=auto,auto.interval=2");
  auto opt = Make({{"w", {3, 4, 8}, RankPolicy::kBatch, config},
                   {"v", {8}, RankPolicy::kFlatten, Config("adamw")}});
  EXPECT_FALSE(opt->has_auto_choices(1));
  const AutoChoices before = opt->auto_choices(0);
  EXPECT_EQ(before.decided_at_step, 0);
  // A rejected step (a NaN gradient) decides nothing.
  std::vector<float> g = reference::RandomNormal(96, 4);
  g[5] = std::nanf("");
  ASSERT_TRUE(opt->SetGradient(0, g).ok());
  EXPECT_EQ(opt->Step().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(opt->auto_choices(0).decided_at_step, 0);
  // A prepared step decides, and only its commit makes the choice current.
  g[5] = 0.25f;
  ASSERT_TRUE(opt->PrepareTensor(0, g).ok());
  EXPECT_EQ(opt->auto_choices(0).decided_at_step, 0);
  opt->DiscardPrepared();
  ASSERT_TRUE(opt->PrepareTensor(0, g).ok());
  EXPECT_EQ(opt->CommitPrepared(), 1);
  EXPECT_EQ(opt->auto_choices(0).decided_at_step, 1);

  AutoChoices set = opt->auto_choices(0);
  set.matrices = {{3, true}, {7, false}, {10, true}};
  set.decided_at_step = 40;
  ASSERT_TRUE(opt->SetAutoChoices(0, set).ok());
  EXPECT_EQ(opt->auto_choices(0).matrices, set.matrices);
  EXPECT_EQ(opt->auto_choices(0).decided_at_step, 40);
  auto refused = [&](AutoChoices c, int tensor = 0) {
    const absl::Status s = opt->SetAutoChoices(tensor, c);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_EQ(opt->auto_choices(0).matrices, set.matrices);
    return std::string(s.message());
  };
  AutoChoices bad = set;
  bad.matrices.pop_back();
  EXPECT_NE(refused(bad).find("2 matrices, expected 3"), std::string::npos);
  bad = set;
  bad.matrices[1].steps = 11;
  EXPECT_NE(refused(bad).find("outside [2, 10]"), std::string::npos);
  bad = set;
  bad.decided_at_step = -1;
  EXPECT_NE(refused(bad).find("decided at step -1"), std::string::npos);
  EXPECT_NE(refused(set, 1).find("no auto modes"), std::string::npos);
  auto steps_only = Make({{"w", {4, 8}, RankPolicy::kFlatten, Config("keller,ns.steps=auto")}});
  AutoChoices rn = steps_only->auto_choices(0);
  rn.matrices[0].row_normalize = true;
  EXPECT_EQ(steps_only->SetAutoChoices(0, rn).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(OptimizerContractTest, DirectionAutoAloneKeepsTheConfiguredStepsAndDecidesWithinMaxDim) {
  // ns.steps=1 and 20 lie outside ns.steps=auto's default bounds [2, 10]: without that rule they
  // are the step count, also after a restore from a session whose rule chose 3.
  for (const int steps : {1, 20}) {
    auto opt = Make({{"w",
                      {4, 8},
                      RankPolicy::kFlatten,
                      Config(absl::StrCat("keller,direction=auto,ns.steps=", steps))}});
    EXPECT_EQ(opt->auto_choices(0).matrices[0].steps, steps);
    AutoChoices restored = opt->auto_choices(0);
    restored.matrices[0].steps = 3;
    ASSERT_TRUE(opt->SetAutoChoices(0, restored).ok());
    EXPECT_EQ(opt->auto_choices(0).matrices[0].steps, steps);
    ASSERT_TRUE(opt->SetGradient(0, reference::RandomNormal(32, 2)).ok());
    ASSERT_TRUE(opt->Step().ok());
    EXPECT_EQ(opt->auto_choices(0).matrices[0].steps, steps);
    EXPECT_EQ(opt->auto_choices(0).decided_at_step, 1);
  }
  // Beyond auto.max_dim nothing is decided: the first choice stays.
  auto big = Make({{"w",
                    {6, 8},
                    RankPolicy::kFlatten,
                    Config("keller,ns.steps=auto,direction=auto,auto.max_dim=5")}});
  ASSERT_TRUE(big->SetGradient(0, reference::RandomNormal(48, 3)).ok());
  ASSERT_TRUE(big->Step().ok());
  EXPECT_EQ(big->auto_choices(0).decided_at_step, 0);
  EXPECT_EQ(big->auto_choices(0).matrices[0], (MatrixChoice{5, false}));
  // A NaN figure is refused.
  AutoChoices nan = big->auto_choices(0);
  nan.cosine = std::nan("");
  EXPECT_EQ(big->SetAutoChoices(0, nan).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(OptimizerContractTest, AutoChoicesAreTheSameBatchedPreparedOrAlone) {
  // The same gradients through one optimizer holding two same-shape auto tensors (one batch), one
  // stepping them by PrepareTensor, and two holding one each: the same bits and choices.
  OptimizerConfig config = Config("keller,ns.steps=auto,direction=auto,auto.interval=2");
  auto batched = Make(
      {{"a", {8, 24}, RankPolicy::kFlatten, config}, {"b", {8, 24}, RankPolicy::kFlatten, config}});
  auto prepared = Make(
      {{"a", {8, 24}, RankPolicy::kFlatten, config}, {"b", {8, 24}, RankPolicy::kFlatten, config}});
  ASSERT_EQ(batched->num_groups(), 1);
  std::vector<std::unique_ptr<Optimizer>> alone;
  alone.push_back(Make({{"a", {8, 24}, RankPolicy::kFlatten, config}}));
  alone.push_back(Make({{"b", {8, 24}, RankPolicy::kFlatten, config}}));
  for (int step = 1; step <= 6; ++step) {
    for (int t = 0; t < 2; ++t) {
      // Tensor b's rows are nearly orthogonal (a scaled identity block plus noise); a's are one
      // shared vector plus noise (r_i ≈ 1.01, and row normalization far from the polar factor).
      std::vector<float> g = reference::RandomNormal(192, 100 * step + t, t == 0 ? 0.1f : 0.01f);
      const std::vector<float> shared = reference::RandomNormal(24, 7);
      for (int i = 0; i < 8; ++i) {
        if (t == 0) {
          for (int j = 0; j < 24; ++j) g[i * 24 + j] += shared[j];
        } else {
          g[i * 24 + i] += 1.0f;
        }
      }
      ASSERT_TRUE(batched->SetGradient(t, g).ok());
      ASSERT_TRUE(prepared->PrepareTensor(t, g).ok());
      ASSERT_TRUE(alone[t]->SetGradient(0, g).ok());
      ASSERT_TRUE(alone[t]->Step().ok());
    }
    ASSERT_TRUE(batched->Step().ok());
    ASSERT_EQ(prepared->CommitPrepared(), 2);
    for (int t = 0; t < 2; ++t) {
      EXPECT_EQ(Params(*batched, t), Params(*alone[t], 0)) << step;
      EXPECT_EQ(Params(*prepared, t), Params(*alone[t], 0)) << step;
      EXPECT_EQ(batched->auto_choices(t).matrices, alone[t]->auto_choices(0).matrices);
      EXPECT_EQ(prepared->auto_choices(t).matrices, alone[t]->auto_choices(0).matrices);
    }
  }
  // The rule split the batch: b row-normalizes, a does not.
  EXPECT_FALSE(batched->auto_choices(0).matrices[0].row_normalize);
  EXPECT_TRUE(batched->auto_choices(1).matrices[0].row_normalize);
}

TEST_F(OptimizerContractTest, CapturedUpdateIsWhatTheStepApplied) {
  // From zero parameters at lr 1 with no decay, a step leaves w = −step(u) exactly: the captured
  // update itself, or its bf16 rounding for the presets that apply a bf16 step (keller, rmnp; the
  // latter's fused pass keeps no direction, so the capture rebuilds it). Two tensors of one
  // shape step as one batch; only the second is captured, on the second step, after a first
  // step gave every preset a momentum history.
  for (const char* preset : {"keller", "moonlight", "torch", "dion", "normuon", "normuon_paper",
                             "rmnp", "muoneq_row", "muoneq_col", "muoneq_rowcol"}) {
    SCOPED_TRACE(preset);
    OptimizerConfig config = Config(absl::StrCat(preset, ",lr=1,weight_decay=0"));
    auto opt = Make({{"a", {6, 10}, RankPolicy::kFlatten, config},
                     {"b", {6, 10}, RankPolicy::kFlatten, config}});
    for (int step = 1; step <= 2; ++step) {
      for (int t = 0; t < 2; ++t) {
        ASSERT_TRUE(opt->SetGradient(t, reference::RandomNormal(60, 10 * step + t)).ok());
        ASSERT_TRUE(opt->SetParameters(t, std::vector<float>(60, 0.0f)).ok());
      }
      std::vector<float> captured(60, std::nanf(""));
      if (step == 2) {
        ASSERT_TRUE(opt->CaptureUpdate(1, captured.data()).ok());
      }
      ASSERT_TRUE(opt->Step().ok());
      if (step == 1) continue;
      const bool bf16 = config.matrix.step_dtype == DType::kBF16;
      const std::vector<float> w = Params(*opt, 1);
      for (int i = 0; i < 60; ++i) {
        const float applied = bf16 ? formulas::RoundToBf16(captured[i]) : captured[i];
        ASSERT_EQ(-w[i], applied) << "element " << i;
      }
    }
  }
  // For one step only; AdamW tensors have no such update.
  auto opt = Make({{"m", {3, 4}, RankPolicy::kFlatten, Config("keller")},
                   {"v", {4}, RankPolicy::kFlatten, Config("adamw")}});
  std::vector<float> captured(12, 7.0f);
  ASSERT_TRUE(opt->CaptureUpdate(0, captured.data()).ok());
  ASSERT_TRUE(opt->SetGradient(0, reference::RandomNormal(12, 1)).ok());
  ASSERT_TRUE(opt->Step().ok());
  const std::vector<float> first = captured;
  EXPECT_NE(first[0], 7.0f);
  ASSERT_TRUE(opt->SetGradient(0, reference::RandomNormal(12, 2)).ok());
  ASSERT_TRUE(opt->Step().ok());
  EXPECT_EQ(captured, first);
  EXPECT_EQ(opt->CaptureUpdate(1, captured.data()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(opt->CaptureUpdate(0, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(opt->CaptureUpdate(2, captured.data()).code(), absl::StatusCode::kOutOfRange);
}

TEST_F(OptimizerContractTest, NonFiniteGradientRejectsTheWholeStepAndChangesNothing) {
  auto opt = Make({{"a", {8, 6}, RankPolicy::kFlatten, Config("keller")},
                   {"b", {6}, RankPolicy::kFlatten, Config("adamw")}});
  ASSERT_TRUE(opt->SetParameters(0, reference::RandomNormal(48, 1)).ok());
  ASSERT_TRUE(opt->SetGradient(0, reference::RandomNormal(48, 2)).ok());
  ASSERT_TRUE(opt->SetGradient(1, reference::RandomNormal(6, 3)).ok());
  ASSERT_TRUE(opt->Step().ok());
  const auto w0 = Params(*opt, 0), w1 = Params(*opt, 1), m0 = State(*opt, 0, 0),
             v1 = State(*opt, 1, 1);
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), -1e20f}) {
    auto g = reference::RandomNormal(6, 4);
    g[2] = bad;
    ASSERT_TRUE(opt->SetGradient(0, reference::RandomNormal(48, 5)).ok());
    ASSERT_TRUE(opt->SetGradient(1, g).ok());
    const absl::Status status = opt->Step();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(status.message().find("tensor 'b'"), absl::string_view::npos) << status;
    EXPECT_NE(status.message().find("has 1 of 6 values"), absl::string_view::npos) << status;
    EXPECT_EQ(Params(*opt, 0), w0);
    EXPECT_EQ(Params(*opt, 1), w1);
    EXPECT_EQ(State(*opt, 0, 0), m0);
    EXPECT_EQ(State(*opt, 1, 1), v1);
    EXPECT_EQ(opt->steps_applied(0), 1);
  }
}

TEST_F(OptimizerContractTest, StepProgressTellsEachTensorWhenItsParametersAreFinal) {
  // A batch of two same-shape Muon matrices, two same-shape RMNP matrices (one fused pass each,
  // each final on its own), an AdamW vector, and a tensor without a gradient. Each `stepped` call
  // must name tensors whose parameters are already the step's final ones, while those of every
  // tensor not yet named are still the old ones — what lets the daemon stream a result before the
  // step ends.
  const std::vector<TensorSpec> specs = {
      {"q", {8, 12}, RankPolicy::kFlatten, Config("keller,precision=fp32")},
      {"k", {8, 12}, RankPolicy::kFlatten, Config("keller,precision=fp32")},
      {"rows", {6, 10}, RankPolicy::kFlatten, Config("rmnp,precision=fp32")},
      {"rows2", {6, 10}, RankPolicy::kFlatten, Config("rmnp,precision=fp32")},
      {"bias", {12}, RankPolicy::kFlatten, Config("adamw")},
      {"idle", {5}, RankPolicy::kFlatten, Config("adamw")}};
  auto opt = Make(specs);
  auto twin = Make(specs);  // stepped without progress: the final parameters to expect
  const bool present[6] = {true, true, true, true, true, false};
  const int n = 6;
  for (int step = 1; step <= 2; ++step) {
    std::vector<int> calls;  // tensors per stepped call
    for (int i = 0; i < 5; ++i) {
      const auto g = reference::RandomNormal(opt->num_elements(i), 100 * step + i);
      ASSERT_TRUE(opt->SetGradient(i, g).ok());
      ASSERT_TRUE(twin->SetGradient(i, g).ok());
    }
    ASSERT_TRUE(twin->Step(absl::MakeConstSpan(present, n)).ok());
    std::vector<std::vector<float>> before;
    for (int i = 0; i < n; ++i) before.push_back(Params(*opt, i));
    int validated = 0;
    std::vector<int> order;
    Optimizer::StepProgress progress;
    progress.validated = [&] {
      ++validated;
      EXPECT_TRUE(order.empty());
      for (int i = 0; i < n; ++i) EXPECT_EQ(Params(*opt, i), before[i]) << "tensor " << i;
    };
    progress.stepped = [&](absl::Span<const int> tensors) {
      EXPECT_EQ(validated, 1);
      calls.push_back(static_cast<int>(tensors.size()));
      order.insert(order.end(), tensors.begin(), tensors.end());
      for (int i = 0; i < n; ++i) {
        const bool named = std::find(order.begin(), order.end(), i) != order.end();
        EXPECT_EQ(Params(*opt, i), named ? Params(*twin, i) : before[i])
            << "step " << step << ", tensor " << i << (named ? " (final)" : " (not yet)");
      }
    };
    ASSERT_TRUE(opt->Step(absl::MakeConstSpan(present, n), std::nullopt, &progress).ok());
    EXPECT_EQ(validated, 1);
    // The batch at once, then each RMNP matrix, then AdamW; the tensor without a gradient never.
    EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3, 4})) << "step " << step;
    EXPECT_EQ(calls, (std::vector<int>{2, 1, 1, 1})) << "step " << step;
  }
  // A step refused by its checks hears nothing.
  std::vector<float> bad = reference::RandomNormal(12, 9);
  bad[3] = std::numeric_limits<float>::quiet_NaN();
  ASSERT_TRUE(opt->SetGradient(4, bad).ok());
  Optimizer::StepProgress progress;
  int calls = 0;
  progress.validated = [&] { ++calls; };
  progress.stepped = [&](absl::Span<const int>) { ++calls; };
  EXPECT_EQ(opt->Step(absl::MakeConstSpan(present, n), std::nullopt, &progress).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(calls, 0);
}

TEST_F(OptimizerContractTest, ALearningRateOverrideIsForOneStepAndChecksFirst) {
  // Step(has_gradient, lr) equals setting every tensor's lr to `lr` for that step (the workers'
  // override); the tensors' own rates are back afterwards. Two optimizers from the same start:
  // one steps with the override, the other with SetHyperparameters before and after.
  const std::vector<TensorSpec> specs = {
      {"m", {8, 6}, RankPolicy::kFlatten, Config("normuon,lr=0.02,weight_decay=0.1")},
      {"v", {6}, RankPolicy::kFlatten, Config("adamw,lr=0.001,weight_decay=0.01")}};
  auto with_override = Make(specs);
  auto by_hand = Make(specs);
  const double mu = specs[0].config.matrix.momentum, beta1 = specs[1].config.adamw.beta1;
  for (Optimizer* opt : {with_override.get(), by_hand.get()}) {
    ASSERT_TRUE(opt->SetParameters(0, reference::RandomNormal(48, 1)).ok());
    ASSERT_TRUE(opt->SetParameters(1, reference::RandomNormal(6, 2)).ok());
  }
  for (int step = 1; step <= 3; ++step) {
    const std::optional<double> lr = step == 2 ? std::nullopt : std::optional<double>(0.005 * step);
    for (Optimizer* opt : {with_override.get(), by_hand.get()}) {
      ASSERT_TRUE(opt->SetGradient(0, reference::RandomNormal(48, 10 * step)).ok());
      ASSERT_TRUE(opt->SetGradient(1, reference::RandomNormal(6, 10 * step + 1)).ok());
    }
    ASSERT_TRUE(with_override->Step({}, lr).ok());
    if (lr.has_value()) {
      ASSERT_TRUE(by_hand->SetHyperparameters(0, *lr, 0.1, mu).ok());
      ASSERT_TRUE(by_hand->SetHyperparameters(1, *lr, 0.01, beta1).ok());
    }
    ASSERT_TRUE(by_hand->Step().ok());
    ASSERT_TRUE(by_hand->SetHyperparameters(0, 0.02, 0.1, mu).ok());
    ASSERT_TRUE(by_hand->SetHyperparameters(1, 0.001, 0.01, beta1).ok());
    for (int t = 0; t < 2; ++t) {
      EXPECT_EQ(Params(*with_override, t), Params(*by_hand, t)) << "step " << step << " " << t;
    }
  }
  EXPECT_EQ(with_override->spec(0).config.lr, 0.02);
  EXPECT_EQ(with_override->spec(1).config.lr, 0.001);
  // A rate some tensor refuses fails the step before anything changes, naming the tensor.
  const auto w0 = Params(*with_override, 0), m0 = State(*with_override, 0, 0);
  ASSERT_TRUE(with_override->SetGradient(0, reference::RandomNormal(48, 99)).ok());
  const absl::Status refused = with_override->Step({}, -1.0);
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.message().find("step lr -1 for tensor 'm'"), absl::string_view::npos)
      << refused;
  EXPECT_EQ(with_override->CheckStepLearningRate(-1.0), refused);
  EXPECT_TRUE(with_override->CheckStepLearningRate(0.5).ok());
  EXPECT_EQ(Params(*with_override, 0), w0);
  EXPECT_EQ(State(*with_override, 0, 0), m0);
  EXPECT_EQ(with_override->steps_applied(0), 3);
  EXPECT_EQ(with_override->spec(0).config.lr, 0.02);
}

TEST_F(OptimizerContractTest, BadSpecsAreInvalidArgumentNamingTheProblem) {
  struct Case {
    std::vector<TensorSpec> specs;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{{"bias", {16}, RankPolicy::kFlatten, Config("muoneq_row")}}, "adamw group"},
      {{{"w", {4, 0}, RankPolicy::kFlatten, Config("keller")}}, "is empty"},
      {{{"", {4, 4}, RankPolicy::kFlatten, Config("keller")}}, "name is empty"},
      {{{"w", {4, 4}, RankPolicy::kFlatten, Config("keller")},
        {"w", {4}, RankPolicy::kFlatten, Config("adamw")}},
       "repeated"},
  };
  for (const Case& c : cases) {
    auto opt = Optimizer::Create(*backend_, c.specs);
    EXPECT_EQ(opt.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(opt.status().message().find(c.message), absl::string_view::npos) << opt.status();
  }
  OptimizerConfig bad = Config("keller");
  bad.matrix.momentum = 1.5f;
  auto opt = Optimizer::Create(*backend_, {{"w", {4, 4}, RankPolicy::kFlatten, bad}});
  EXPECT_NE(opt.status().message().find("tensor 'w': momentum"), absl::string_view::npos);
}

TEST_F(OptimizerContractTest, ConfigParsingRejectsUnknownsAndKeepsTheConfig) {
  EXPECT_EQ(ParseOptimizerConfig("sgd").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(ParseOptimizerConfig("keller,colour=red").status().message().find("'colour'"),
            absl::string_view::npos);
  EXPECT_NE(ParseOptimizerConfig("keller,lr=fast").status().message().find("'fast'"),
            absl::string_view::npos);
  EXPECT_NE(ParseOptimizerConfig("keller,ns.steps=0").status().message().find("[1, 100]"),
            absl::string_view::npos);
  EXPECT_NE(ParseOptimizerConfig("keller,ns.dtype=int8").status().message().find("int8"),
            absl::string_view::npos);
  EXPECT_NE(ParseOptimizerConfig("keller,lr").status().message().find("key=value"),
            absl::string_view::npos);
  OptimizerConfig config = Config("keller");
  EXPECT_FALSE(ApplyOverride(config, "direction", "sideways").ok());
  EXPECT_EQ(config.matrix.direction, Direction::kNewtonSchulz);
  auto custom = ParseOptimizerConfig("keller,ns.coefficients=1.5:-0.5:0/3:-3.2:1.2,ns.steps=7");
  ASSERT_TRUE(custom.ok()) << custom.status();
  EXPECT_EQ(custom->matrix.newton_schulz.coefficient_set, "custom");
  EXPECT_EQ(custom->matrix.newton_schulz.custom.size(), 2u);
  for (absl::string_view preset : PresetNames()) EXPECT_TRUE(PresetConfig(preset).ok()) << preset;
  // Newton–Schulz's method and Gram restarts: named values, increasing iterations in [1, 99].
  for (const auto& [spec, message] : std::vector<std::pair<std::string, std::string>>{
           {"keller,ns.method=fast", "'fast' is not one of standard, gram, auto"},
           {"keller,ns.gram_restarts=0", "0 is outside [1, 99]"},
           {"keller,ns.gram_restarts=100", "100 is outside [1, 99]"},
           {"keller,ns.gram_restarts=3:2", "'3:2' is not in increasing order"},
           {"keller,ns.gram_restarts=2:2", "'2:2' is not in increasing order"},
           {"keller,ns.gram_restarts=two", "'two'"},
           {"keller,ns.gram_restarts=", "''"}}) {
    const absl::Status status = ParseOptimizerConfig(spec).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << spec;
    EXPECT_NE(status.message().find(message), absl::string_view::npos) << spec << ": " << status;
  }
  OptimizerConfig gram = Config("keller,ns.method=gram,ns.gram_restarts=1:4");
  EXPECT_EQ(gram.matrix.newton_schulz.method, NewtonSchulzMethod::kGram);
  EXPECT_EQ(gram.matrix.newton_schulz.gram_restarts, (std::vector<int>{1, 4}));
  EXPECT_FALSE(ApplyOverride(gram, "ns.gram_restarts", "5:1").ok());
  EXPECT_EQ(gram.matrix.newton_schulz.gram_restarts, (std::vector<int>{1, 4}));
  EXPECT_TRUE(ApplyOverride(gram, "ns.gram_restarts", "none").ok());
  EXPECT_EQ(gram.matrix.newton_schulz.gram_restarts, std::vector<int>{});
  EXPECT_TRUE(ApplyOverride(gram, "ns.gram_restarts", "default").ok());
  EXPECT_FALSE(gram.matrix.newton_schulz.gram_restarts.has_value());
  EXPECT_EQ(Config("keller").matrix.newton_schulz.method, NewtonSchulzMethod::kAuto);
}

TEST_F(OptimizerContractTest, SizeMismatchesAndBadIndicesLeaveStateAlone) {
  auto opt = Make({{"w", {3, 5}, RankPolicy::kFlatten, Config("rmnp")}});
  const auto w = Params(*opt, 0);
  const absl::Status status = opt->SetGradient(0, std::vector<float>(14));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("14 elements, expected 15"), absl::string_view::npos) << status;
  EXPECT_EQ(opt->SetParameters(0, std::vector<float>(16)).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<float> nan_params(15, 1.0f);
  nan_params[7] = std::numeric_limits<float>::quiet_NaN();
  const absl::Status nan_status = opt->SetParameters(0, nan_params);
  EXPECT_EQ(nan_status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(nan_status.message().find("element 7"), absl::string_view::npos) << nan_status;
  nan_params[12] = -std::numeric_limits<float>::infinity();
  nan_params[2] = std::numeric_limits<float>::infinity();
  const absl::Status inf_status = opt->SetParameters(0, nan_params);
  EXPECT_NE(inf_status.message().find("element 2"), absl::string_view::npos) << inf_status;
  EXPECT_EQ(opt->SetParameters(1, std::vector<float>(15)).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(opt->FindTensor("v").status().code(), absl::StatusCode::kNotFound);
  const bool wrong_size[2] = {true, true};
  EXPECT_EQ(opt->Step(absl::MakeConstSpan(wrong_size, 2)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(opt->SetHyperparameters(0, -1.0, 0.0, 0.9).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(opt->spec(0).config.lr, 0.02);
  EXPECT_EQ(Params(*opt, 0), w);
}

TEST_F(OptimizerContractTest, ZeroGradientGivesAZeroUpdate) {
  for (absl::string_view preset : PresetNames()) {
    auto opt = Make({{"w", {6, 4}, RankPolicy::kFlatten, Config(std::string(preset))}});
    const auto w0 = reference::RandomNormal(24, 6);
    ASSERT_TRUE(opt->SetParameters(0, w0).ok());
    ASSERT_TRUE(opt->Step().ok()) << preset;  // gradients start zero
    const float decay =
        static_cast<float>(1.0 - opt->spec(0).config.lr * opt->spec(0).config.weight_decay);
    const auto w = Params(*opt, 0);
    for (int i = 0; i < 24; ++i) EXPECT_EQ(w[i], w0[i] * decay) << preset << " " << i;
  }
}

TEST_F(OptimizerContractTest, TensorWithoutGradientIsSkipped) {
  auto opt = Make({{"a", {4, 4}, RankPolicy::kFlatten, Config("moonlight")},
                   {"b", {4, 4}, RankPolicy::kFlatten, Config("moonlight")}});
  ASSERT_TRUE(opt->SetParameters(1, reference::RandomNormal(16, 7)).ok());
  ASSERT_TRUE(opt->SetGradient(0, reference::RandomNormal(16, 8)).ok());
  ASSERT_TRUE(opt->SetGradient(1, reference::RandomNormal(16, 9)).ok());
  const auto b = Params(*opt, 1);
  const bool present[2] = {true, false};
  ASSERT_TRUE(opt->Step(absl::MakeConstSpan(present, 2)).ok());
  EXPECT_EQ(Params(*opt, 1), b);  // no decay either
  EXPECT_EQ(State(*opt, 1, 0), std::vector<float>(16, 0.0f));
  EXPECT_EQ(opt->steps_applied(0), 1);
  EXPECT_EQ(opt->steps_applied(1), 0);
}

TEST_F(OptimizerContractTest, SameShapeTensorsStepAsOneBatchWithTheSameResult) {
  const OptimizerConfig keller = Config("keller,precision=fp32");
  auto batched = Make({{"q", {8, 12}, RankPolicy::kFlatten, keller},
                       {"k", {8, 12}, RankPolicy::kFlatten, keller},
                       {"mlp", {12, 8}, RankPolicy::kFlatten, keller},
                       {"experts", {2, 8, 12}, RankPolicy::kBatch, keller}});
  EXPECT_EQ(batched->num_groups(), 2);  // 8×12 (q, k, experts) and 12×8
  std::vector<std::unique_ptr<Optimizer>> singles;
  for (int i = 0; i < 4; ++i) {
    singles.push_back(Make({batched->spec(i)}));
  }
  for (int step = 0; step < 3; ++step) {
    for (int i = 0; i < 4; ++i) {
      const auto g = reference::RandomNormal(batched->num_elements(i), 10 * step + i);
      ASSERT_TRUE(batched->SetGradient(i, g).ok());
      ASSERT_TRUE(singles[i]->SetGradient(0, g).ok());
      ASSERT_TRUE(singles[i]->Step().ok());
    }
    ASSERT_TRUE(batched->Step().ok());
  }
  for (int i = 0; i < 4; ++i) {
    EXPECT_LT(reference::RelativeError(Params(*batched, i), Params(*singles[i], 0)), 1e-7) << i;
  }
}

// Plain AdamW (torch's rule, or Moonlight's ε placement) in fp64.
void ReferenceAdamW(std::vector<double>& w, std::vector<double>& m, std::vector<double>& v,
                    const std::vector<float>& g, int t, double lr, double b1, double b2, double eps,
                    double wd, bool moonlight) {
  const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
  for (size_t i = 0; i < w.size(); ++i) {
    m[i] = b1 * m[i] + (1 - b1) * g[i];
    v[i] = b2 * v[i] + (1 - b2) * double(g[i]) * g[i];
    w[i] *= 1 - lr * wd;
    w[i] -= moonlight ? lr * std::sqrt(bc2) / bc1 * m[i] / (std::sqrt(v[i]) + eps)
                      : lr * (m[i] / bc1) / (std::sqrt(v[i] / bc2) + eps);
  }
}

TEST_F(OptimizerContractTest, AdamWMatchesFp64OverTenSteps) {
  for (const char* spec : {"adamw", "adamw,adamw.eps_placement=moonlight,adamw.beta2=0.95"}) {
    const OptimizerConfig c = Config(spec);
    auto opt =
        Make({{"emb", {10, 6}, RankPolicy::kFlatten, c}, {"bias", {7}, RankPolicy::kFlatten, c}});
    for (int i = 0; i < 2; ++i) {
      const auto w0 = reference::RandomNormal(opt->num_elements(i), 20 + i);
      ASSERT_TRUE(opt->SetParameters(i, w0).ok());
      std::vector<double> w(w0.begin(), w0.end()), m(w.size()), v(w.size());
      for (int t = 1; t <= kSteps; ++t) {
        const auto g = reference::RandomNormal(w.size(), 100 * t + i);
        ASSERT_TRUE(opt->SetGradient(i, g).ok());
        const bool present[2] = {i == 0, i == 1};
        ASSERT_TRUE(opt->Step(absl::MakeConstSpan(present, 2)).ok());
        ReferenceAdamW(w, m, v, g, t, c.lr, c.adamw.beta1, c.adamw.beta2, c.adamw.eps,
                       c.weight_decay, c.adamw.eps_placement == formulas::AdamEpsilon::kMoonlight);
      }
      SCOPED_TRACE(std::string(spec) + " tensor " + std::to_string(i));
      ExpectFp32Match(Params(*opt, i), w, w0);
    }
  }
}

TEST_F(OptimizerContractTest, MuonEqPhaseSwitchesRowColToRow) {
  const int rows = 8, cols = 10;
  auto opt = Make(
      {{"w",
        {rows, cols},
        RankPolicy::kFlatten,
        Config("muoneq_rowcol,precision=fp32,pre_normalize.row_at_step=3,weight_decay=0.05")}});
  const auto w0 = reference::RandomNormal(rows * cols, 30);
  ASSERT_TRUE(opt->SetParameters(0, w0).ok());
  RefState ref{reference::FromFloats(w0.data(), rows, cols), Matrix(rows, cols), {}};
  for (int step = 0; step < 5; ++step) {
    const auto g = reference::RandomNormal(rows * cols, 40 + step);
    ASSERT_TRUE(opt->SetGradient(0, g).ok());
    ASSERT_TRUE(opt->Step().ok());
    // Steps 1 and 2 (1-based) are rowcol; from step 3 on, row.
    ReferenceMatrixStep(step < 2 ? "muoneq_rowcol" : "muoneq_row", ref,
                        reference::FromFloats(g.data(), rows, cols), 1e-3, 0.95, rows, cols);
  }
  EXPECT_LT(reference::RelativeError(Params(*opt, 0), ref.w.v), 1e-6);
}

TEST_F(OptimizerContractTest, ExactPolarAndRowNormalizeDirections) {
  const int rows = 6, cols = 9;
  for (const char* direction : {"polar", "row_normalize"}) {
    auto opt =
        Make({{"w",
               {rows, cols},
               RankPolicy::kFlatten,
               Config(std::string("keller,precision=fp32,scale=none,direction=") + direction)}});
    std::vector<double> m(rows * cols, 0.0), w(rows * cols, 0.0);
    for (int step = 0; step < 3; ++step) {
      const auto g = reference::RandomNormal(rows * cols, 50 + step);
      ASSERT_TRUE(opt->SetGradient(0, g).ok());
      ASSERT_TRUE(opt->Step().ok());
      Matrix u(rows, cols);
      for (int i = 0; i < rows * cols; ++i) {
        m[i] = Lerp(m[i], g[i], 0.05);
        u.v[i] = Lerp(g[i], m[i], 0.95);
      }
      Matrix o;
      if (std::string(direction) == "polar") {
        // The cubic iteration converges to UVᵀ for singular values in (0, √3).
        o = reference::NewtonSchulz(u, {{1.5, -0.5, 0.0}}, 60, 0.0, 1.0, false);
      } else {
        o = u;
        for (int i = 0; i < rows; ++i) {
          double n = 0;
          for (int j = 0; j < cols; ++j) n += u.at(i, j) * u.at(i, j);
          for (int j = 0; j < cols; ++j) o.at(i, j) /= std::sqrt(n);
        }
      }
      for (int i = 0; i < rows * cols; ++i) w[i] -= 0.02 * o.v[i];
    }
    EXPECT_LT(reference::RelativeError(Params(*opt, 0), w), 1e-5) << direction;
  }
}

TEST_F(OptimizerContractTest, OversizedShapesAndUnsafeSettingsAreRejected) {
  auto huge = Optimizer::Create(
      *backend_, {{"w", {3, int64_t{0x5555555555555556}}, RankPolicy::kFlatten, Config("keller")}});
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(huge.status().message().find("more than"), absl::string_view::npos) << huge.status();
  auto big = Optimizer::Create(*backend_,
                               {{"v", {int64_t{1} << 41}, RankPolicy::kFlatten, Config("adamw")}});
  EXPECT_EQ(big.status().code(), absl::StatusCode::kInvalidArgument);
  // Settings that would let a finite gradient become NaN or inf: a zero or denormal epsilon, an
  // exponent that overflows on small rows, a rate that does not fit fp32, decay past 1, a safety
  // factor that starts singular values above 1, coefficients that diverge.
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"keller,ns.eps=0", "Newton-Schulz eps"},
      {"muoneq_row,pre_normalize.eps=0", "pre_normalize.eps"},
      {"rmnp,row_normalize.eps=0", "row_normalize.eps"},
      {"normuon,normuon.eps=1e-40", "normuon.eps"},
      {"adamw,adamw.eps=1e-40", "adamw.eps"},
      {"muoneq_row,pre_normalize.exponent=-5", "exponent"},
      {"keller,lr=1e39", "lr must be"},
      {"adamw,lr=1,weight_decay=3", "lr * weight_decay"},
      {"keller,ns.safety=0.2", "safety"},
      {"keller,ns.coefficients=3:0:0,ns.steps=10", "diverge"},
      {"keller,scale.rms=0", "scale.rms"},
  };
  for (const auto& [spec, message] : bad) {
    const absl::Status status = ParseOptimizerConfig(spec).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << spec;
    EXPECT_NE(status.message().find(message), absl::string_view::npos) << spec << ": " << status;
  }
  EXPECT_TRUE(ParseOptimizerConfig("keller,ns.coefficients=3:0:0,ns.steps=5").ok());  // 3⁵ < 1e3
}

TEST_F(OptimizerContractTest, ExactPolarOfZeroAndRankDeficientMomentum) {
  // Zero gradient: the polar factor of a zero matrix is zero, so nothing moves.
  auto opt = Make({{"w",
                    {5, 7},
                    RankPolicy::kFlatten,
                    Config("keller,precision=fp32,direction=polar,weight_decay=0")}});
  const auto w0 = reference::RandomNormal(35, 60);
  ASSERT_TRUE(opt->SetParameters(0, w0).ok());
  ASSERT_TRUE(opt->Step().ok());
  EXPECT_EQ(Params(*opt, 0), w0);
  // A rank-one gradient a·bᵀ: the polar factor is (a/‖a‖)(b/‖b‖)ᵀ, and the step moves w by
  // lr·scale times it.
  std::vector<float> a = {1, -2, 0.5f, 3, 1}, b = {2, 0, -1, 1, 0.5f, 1, -3}, g(35);
  double na = 0, nb = 0;
  for (float v : a) na += v * v;
  for (float v : b) nb += v * v;
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 7; ++j) g[i * 7 + j] = a[i] * b[j];
  ASSERT_TRUE(opt->SetGradient(0, g).ok());
  ASSERT_TRUE(opt->Step().ok());
  const auto w = Params(*opt, 0);
  std::vector<double> want(35);
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 7; ++j) {
      want[i * 7 + j] = w0[i * 7 + j] - 0.02 * a[i] * b[j] / std::sqrt(na * nb);
    }
  EXPECT_LT(reference::RelativeError(w, want), 1e-6);
}

TEST_F(OptimizerContractTest, LargeFiniteGradientsStayFiniteAndMove) {
  // The largest accepted magnitude, for several steps (sum momentum grows it twentyfold): squares
  // and norms stay finite, so every preset still applies a finite, non-zero update.
  std::vector<std::string> specs(PresetNames().begin(), PresetNames().end());
  specs.push_back("keller,ns.dtype=fp16");
  for (const std::string& preset : specs) {
    auto opt = Make({{"w", {6, 4}, RankPolicy::kFlatten, Config(preset)}});
    std::vector<float> g(24);
    for (int i = 0; i < 24; ++i) g[i] = (i % 3 == 0 ? -1.0f : 1.0f) * kMaxGradientMagnitude;
    for (int step = 0; step < 3; ++step) {
      ASSERT_TRUE(opt->SetGradient(0, g).ok());
      ASSERT_TRUE(opt->Step().ok()) << preset;
    }
    const auto w = Params(*opt, 0);
    double moved = 0;
    for (float v : w) {
      EXPECT_TRUE(std::isfinite(v)) << preset;
      moved += std::fabs(v);
    }
    EXPECT_GT(moved, 0.0) << preset;
  }
}
}  // namespace
}  // namespace optd
