// The CUDA backend against the CPU backend on the same inputs: the per-element formulas bit for
// bit, the native Newton–Schulz and whole optimizer steps within the fp32 and bf16 tolerances,
// plus what only the GPU has (the memory budget, concurrent sessions on one stream, queues).
// Without a GPU every test but the first skips with the reason.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if OPTD_TEST_CUDA_RUNTIME
#include <cuda_runtime.h>
#endif

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/newton_schulz.h"
#include "kernels/optimizer.h"
#include "kernels/optimizer_config.h"
#include "tests/kernels/backend_test_util.h"
#include "tests/kernels/reference.h"

namespace optd {
namespace {

using reference::RandomNormal;
using reference::RelativeError;

TEST(CudaBackendCreateTest, IsUnavailableWithAReasonOrWorks) {
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateCudaBackend();
  if (backend.ok()) {
    EXPECT_EQ((*backend)->name(), "cuda");
    EXPECT_FALSE((*backend)->description().empty());
  } else {
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable) << backend.status();
    EXPECT_FALSE(backend.status().message().empty());
  }
  CudaBackendOptions bad;
  bad.device = 1 << 20;
  EXPECT_EQ(CreateCudaBackend(bad).status().code(), absl::StatusCode::kUnavailable);
}

class CudaVsCpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string skip;
    cuda_ = testing::MakeBackend("cuda", &skip);
    if (!skip.empty()) GTEST_SKIP() << skip;
    ASSERT_NE(cuda_, nullptr);
    cpu_ = testing::MakeCpuBackend();
    ASSERT_NE(cpu_, nullptr);
    gpu_memory_ = std::make_unique<testing::DeviceMemory>(*cuda_);
    cpu_memory_ = std::make_unique<testing::DeviceMemory>(*cpu_);
  }

  // The same host data on both backends.
  struct Pair {
    float* cpu;
    float* gpu;
  };
  Pair Both(const std::vector<float>& host) {
    return {cpu_memory_->Upload(host), gpu_memory_->Upload(host)};
  }
  // The CPU's and the GPU's copies of `count` elements.
  std::pair<std::vector<float>, std::vector<float>> Read(Pair p, size_t count) {
    return {cpu_memory_->Download(p.cpu, count), gpu_memory_->Download(p.gpu, count)};
  }
  Queue& cq() { return cpu_->default_queue(); }
  // Every tensor's parameters on the GPU within the presets' tolerance of the CPU's: 1e-5 in
  // fp32, 2e-2 in bf16.
  static void ExpectParametersAlike(const Optimizer& on_cpu, const Optimizer& on_gpu,
                                    const std::string& precision) {
    for (int t = 0; t < on_cpu.num_tensors(); ++t) {
      std::vector<float> want(on_cpu.num_elements(t)), got(want.size());
      ASSERT_TRUE(on_cpu.GetParameters(t, absl::MakeSpan(want)).ok());
      ASSERT_TRUE(on_gpu.GetParameters(t, absl::MakeSpan(got)).ok());
      EXPECT_LT(RelativeError(got, want), precision == "fp32" ? 1e-5 : 2e-2) << on_cpu.spec(t).name;
    }
  }
  Queue& gq() { return cuda_->default_queue(); }

  std::unique_ptr<Backend> cuda_, cpu_;
  std::unique_ptr<testing::DeviceMemory> gpu_memory_, cpu_memory_;
};

TEST_F(CudaVsCpuTest, ElementFormulasGiveTheCpusBits) {
  const int n = 100003;  // not a multiple of any block size
  for (auto kind : {formulas::MomentumKind::kEma, formulas::MomentumKind::kSum}) {
    for (bool nesterov : {false, true}) {
      Pair m = Both(RandomNormal(n, 1)), g = Both(RandomNormal(n, 2)),
           u = Both(std::vector<float>(n, 0.0f));
      const formulas::MomentumScalars s{0.95f, 0.05f, kind, nesterov};
      ASSERT_TRUE(cpu_->Momentum(cq(), m.cpu, g.cpu, u.cpu, n, s).ok());
      ASSERT_TRUE(cuda_->Momentum(gq(), m.gpu, g.gpu, u.gpu, n, s).ok());
      auto [mc, mg] = Read(m, n);
      auto [uc, ug] = Read(u, n);
      EXPECT_EQ(mc, mg);
      EXPECT_EQ(uc, ug);
    }
  }
  for (DType step_dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    Pair w = Both(RandomNormal(n, 3)), o = Both(RandomNormal(n, 4));
    const std::vector<formulas::RateScalars> rate = {{.lr = 0.02f, .decay = 0.999f}};
    ASSERT_TRUE(
        cpu_->ApplyUpdate(cq(), w.cpu, o.cpu, n, cpu_memory_->Upload(rate), 1.7f, step_dtype).ok());
    ASSERT_TRUE(
        cuda_->ApplyUpdate(gq(), w.gpu, o.gpu, n, gpu_memory_->Upload(rate), 1.7f, step_dtype)
            .ok());
    auto [wc, wg] = Read(w, n);
    EXPECT_EQ(wc, wg) << DTypeName(step_dtype);
  }
  for (auto placement : {formulas::AdamEpsilon::kTorch, formulas::AdamEpsilon::kMoonlight}) {
    std::vector<float> v0(n);
    for (int i = 0; i < n; ++i) v0[i] = 0.01f * (1 + i % 7);
    Pair w = Both(RandomNormal(n, 5)), m = Both(RandomNormal(n, 6, 0.1f)), v = Both(v0),
         g = Both(RandomNormal(n, 7));
    const formulas::AdamWScalars s{0.95f, 0.1f, 0.05f, 1e-8f, 0.999f, 0.01f, 0.3f, placement};
    ASSERT_TRUE(cpu_->AdamW(cq(), w.cpu, m.cpu, v.cpu, g.cpu, n,
                            cpu_memory_->Upload(std::vector<formulas::AdamWScalars>{s}))
                    .ok());
    ASSERT_TRUE(cuda_
                    ->AdamW(gq(), w.gpu, m.gpu, v.gpu, g.gpu, n,
                            gpu_memory_->Upload(std::vector<formulas::AdamWScalars>{s}))
                    .ok());
    EXPECT_EQ(Read(w, n).first, Read(w, n).second);
    EXPECT_EQ(Read(v, n).first, Read(v, n).second);
  }
  // Rounding and conversion, over magnitudes that reach fp16's overflow and subnormals.
  std::vector<float> x = RandomNormal(n, 8, 3000.0f);
  for (int i = 0; i < 1000; ++i) x[i] = std::ldexp(x[i], -30);
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    Pair r = Both(x);
    ASSERT_TRUE(cpu_->RoundTo(cq(), r.cpu, n, dtype).ok());
    ASSERT_TRUE(cuda_->RoundTo(gq(), r.gpu, n, dtype).ok());
    EXPECT_EQ(Read(r, n).first, Read(r, n).second) << DTypeName(dtype);
  }
}

TEST_F(CudaVsCpuTest, RowKernelsOnShortAndLongRows) {
  // A warp per row below 2048 columns, a block per row from there; the RMNP step keeps u in
  // shared memory while a block's rows fit 48 KiB (40 and 5000 columns) and rereads m and g
  // otherwise (1800 and 13000).
  // 12288 is past the cache by BlockSum's own shared memory.
  for (int64_t cols : {40, 1800, 5000, 12288, 13000}) {
    const int64_t rows = 37, n = rows * cols;
    SCOPED_TRACE(cols);
    Pair w = Both(RandomNormal(n, 9)), m = Both(RandomNormal(n, 10)), g = Both(RandomNormal(n, 11));
    ASSERT_TRUE(
        cpu_->RmnpStep(cq(), w.cpu, m.cpu, g.cpu, rows, cols, testing::TestRmnpStep(*cpu_memory_))
            .ok());
    ASSERT_TRUE(
        cuda_->RmnpStep(gq(), w.gpu, m.gpu, g.gpu, rows, cols, testing::TestRmnpStep(*gpu_memory_))
            .ok());
    EXPECT_EQ(Read(m, n).first, Read(m, n).second);
    // The row norms sum in a different order: the steps agree to a few fp32 ulps (and bf16
    // rounding of the step can move one element by a bf16 ulp of the step).
    EXPECT_LT(RelativeError(Read(w, n).second, Read(w, n).first), 1e-6);

    Pair x = Both(RandomNormal(n, 12));
    Pair sums = Both(std::vector<float>(rows, 0.0f));
    ASSERT_TRUE(cpu_->RowSumSquares(cq(), x.cpu, rows, cols, sums.cpu).ok());
    ASSERT_TRUE(cuda_->RowSumSquares(gq(), x.gpu, rows, cols, sums.gpu).ok());
    EXPECT_LT(RelativeError(Read(sums, rows).second, Read(sums, rows).first), 1e-7);

    std::vector<float> v0(rows);
    for (int64_t r = 0; r < rows; ++r) v0[r] = 0.01f * (1 + r % 3);
    Pair v = Both(v0);
    const NorMuonArgs normuon{.one_minus_beta2 = 0.05f, .eps = 1e-10f, .preserve_frobenius = true};
    ASSERT_TRUE(
        cpu_->NorMuonNormalize(cq(), MatrixBatch{x.cpu, 1, rows, cols}, v.cpu, normuon).ok());
    ASSERT_TRUE(
        cuda_->NorMuonNormalize(gq(), MatrixBatch{x.gpu, 1, rows, cols}, v.gpu, normuon).ok());
    EXPECT_LT(RelativeError(Read(x, n).second, Read(x, n).first), 1e-6);
    EXPECT_LT(RelativeError(Read(v, rows).second, Read(v, rows).first), 1e-6);

    Pair e = Both(RandomNormal(n, 13));
    Pair scratch = Both(std::vector<float>(rows + cols, 0.0f));
    const EquilibrateArgs eq{.rows = true, .cols = true, .eps = 1e-8f, .exponent = -0.25f};
    ASSERT_TRUE(cpu_->Equilibrate(cq(), MatrixBatch{e.cpu, 1, rows, cols}, eq, scratch.cpu).ok());
    ASSERT_TRUE(cuda_->Equilibrate(gq(), MatrixBatch{e.gpu, 1, rows, cols}, eq, scratch.gpu).ok());
    EXPECT_LT(RelativeError(Read(e, n).second, Read(e, n).first), 1e-6);
  }
}

struct NsCase {
  int64_t batch, rows, cols;
  const char* set;
  DType dtype;
  double tolerance;
};

class CudaNewtonSchulzTest : public CudaVsCpuTest {
 protected:
  // NewtonSchulz of one random batch on both backends under `config` with the case's coefficient
  // set and dtype: the CUDA result within the case's tolerance of the CPU's.
  void ExpectNewtonSchulzLikeTheCpu(const NsCase& c, NewtonSchulzConfig config, uint32_t seed) {
    SCOPED_TRACE(
        absl::StrCat(c.batch, "x", c.rows, "x", c.cols, " ", c.set, " ", DTypeName(c.dtype)));
    config.coefficient_set = c.set;
    config.compute_dtype = c.dtype;
    const int64_t n = c.batch * c.rows * c.cols;
    Pair x = Both(RandomNormal(n, seed));
    const int64_t work = NewtonSchulzWorkspaceFloats(config, c.batch, c.rows, c.cols);
    Pair workspace = Both(std::vector<float>(work, 0.0f));
    ASSERT_TRUE(NewtonSchulz(*cpu_, cq(), MatrixBatch{x.cpu, c.batch, c.rows, c.cols}, config,
                             workspace.cpu)
                    .ok());
    ASSERT_TRUE(NewtonSchulz(*cuda_, gq(), MatrixBatch{x.gpu, c.batch, c.rows, c.cols}, config,
                             workspace.gpu)
                    .ok());
    auto [want, got] = Read(x, n);
    EXPECT_LT(RelativeError(got, want), c.tolerance);
  }
};

TEST_F(CudaNewtonSchulzTest, NativeNewtonSchulzMatchesTheComposedCpuPath) {
  // fp32: both accumulate in fp32, in different orders, over five cubic steps. bf16 and fp16:
  // one rounding of the compute dtype apart where a sum lands near a rounding boundary.
  const std::vector<NsCase> cases = {{1, 64, 64, "keller", DType::kF32, 2e-5},
                                     {1, 96, 256, "keller", DType::kF32, 2e-5},
                                     {1, 300, 80, "keller", DType::kF32, 2e-5},
                                     {3, 48, 40, "polar_express", DType::kF32, 2e-5},
                                     {1, 1, 50, "keller", DType::kF32, 2e-5},
                                     {1, 96, 256, "keller", DType::kBF16, 2e-2},
                                     {1, 300, 80, "keller", DType::kBF16, 2e-2},
                                     {4, 64, 64, "polar_express", DType::kBF16, 2e-2},
                                     {2, 80, 120, "dion_legacy", DType::kF16, 5e-3}};
  for (const NsCase& c : cases) {
    NewtonSchulzConfig config;
    config.method = NewtonSchulzMethod::kStandard;  // CUDA's native path against the CPU's
    if (std::string(c.set) == "polar_express") config.safety = 1.02f;
    ExpectNewtonSchulzLikeTheCpu(c, config, 14);
  }
}

// Gram Newton–Schulz is composed of Backend operations on both backends (cuBLAS syrk, syrkx and
// symm on CUDA): the CPU's result within the standard path's tolerances, fp16 rounding where the
// config says bf16 included, restarts at the default and elsewhere.
TEST_F(CudaNewtonSchulzTest, GramNewtonSchulzMatchesTheCpu) {
  const std::vector<NsCase> cases = {{1, 96, 256, "keller", DType::kF32, 2e-5},
                                     {1, 300, 80, "polar_express", DType::kF32, 2e-5},
                                     {3, 48, 130, "keller", DType::kF32, 2e-5},
                                     {1, 96, 256, "keller", DType::kBF16, 2e-2},
                                     {12, 64, 256, "polar_express", DType::kBF16, 2e-2},
                                     {2, 80, 300, "dion_legacy", DType::kF16, 5e-3}};
  for (const NsCase& c : cases) {
    NewtonSchulzConfig config;
    config.method = NewtonSchulzMethod::kGram;
    if (c.batch == 3) config.gram_restarts = std::vector<int>{1, 3};
    ExpectNewtonSchulzLikeTheCpu(c, config, 15);
  }
}

TEST_F(CudaVsCpuTest, EveryPresetStepsLikeTheCpuOverTenSteps) {
  const std::vector<TensorSpec> shapes = {
      {"square", {64, 64}, RankPolicy::kFlatten, {}},
      {"wide", {48, 160}, RankPolicy::kFlatten, {}},
      {"tall", {200, 32}, RankPolicy::kFlatten, {}},
      {"experts", {3, 24, 40}, RankPolicy::kBatch, {}},
      {"twin", {48, 160}, RankPolicy::kFlatten, {}},  // batches with "wide"
  };
  for (absl::string_view preset : PresetNames()) {
    if (preset == "adamw") continue;
    for (const char* precision : {"fp32", "bf16"}) {
      SCOPED_TRACE(absl::StrCat(preset, " ", precision));
      auto config =
          ParseOptimizerConfig(absl::StrCat(preset, ",weight_decay=0.05,precision=", precision));
      ASSERT_TRUE(config.ok()) << config.status();
      auto adamw = ParseOptimizerConfig("adamw,weight_decay=0.05");
      ASSERT_TRUE(adamw.ok());
      std::vector<TensorSpec> specs = shapes;
      for (TensorSpec& s : specs) s.config = *config;
      specs.push_back({"bias", {77}, RankPolicy::kFlatten, *adamw});
      auto on_cpu = Optimizer::Create(*cpu_, specs);
      auto on_gpu = Optimizer::Create(*cuda_, specs);
      ASSERT_TRUE(on_cpu.ok()) << on_cpu.status();
      ASSERT_TRUE(on_gpu.ok()) << on_gpu.status();
      for (int t = 0; t < (*on_cpu)->num_tensors(); ++t) {
        const std::vector<float> w0 = RandomNormal((*on_cpu)->num_elements(t), 20 + t, 0.5f);
        ASSERT_TRUE((*on_cpu)->SetParameters(t, w0).ok());
        ASSERT_TRUE((*on_gpu)->SetParameters(t, w0).ok());
      }
      for (int step = 0; step < 10; ++step) {
        for (int t = 0; t < (*on_cpu)->num_tensors(); ++t) {
          const std::vector<float> g =
              RandomNormal((*on_cpu)->num_elements(t), 1000 * step + t + 1);
          ASSERT_TRUE((*on_cpu)->SetGradient(t, g).ok());
          ASSERT_TRUE((*on_gpu)->SetGradient(t, g).ok());
        }
        ASSERT_TRUE((*on_cpu)->Step().ok());
        ASSERT_TRUE((*on_gpu)->Step().ok());
      }
      ExpectParametersAlike(**on_cpu, **on_gpu, precision);
    }
  }
}

// The auto modes decide from the direction's input, which momentum forms alike on both backends:
// the same choices bit for bit, every other step (the steps between replay recorded graphs whose
// key holds the choices), and parameters within the presets' tolerances.
TEST_F(CudaVsCpuTest, AutoModesChooseAsTheCpuDoes) {
  for (const char* precision : {"fp32", "bf16"}) {
    SCOPED_TRACE(precision);
    auto config = ParseOptimizerConfig(
        absl::StrCat("keller,weight_decay=0.05,ns.steps=auto,direction=auto,auto.interval=2,"
                     "precision=",
                     precision));
    ASSERT_TRUE(config.ok()) << config.status();
    const std::vector<TensorSpec> specs = {{"wide", {48, 160}, RankPolicy::kFlatten, *config},
                                           {"tall", {200, 32}, RankPolicy::kFlatten, *config},
                                           {"experts", {3, 24, 40}, RankPolicy::kBatch, *config}};
    auto on_cpu = Optimizer::Create(*cpu_, specs);
    auto on_gpu = Optimizer::Create(*cuda_, specs);
    ASSERT_TRUE(on_cpu.ok() && on_gpu.ok());
    for (int step = 0; step < 10; ++step) {
      for (int t = 0; t < (*on_cpu)->num_tensors(); ++t) {
        // Rows along a few shared directions, so the rules have something to tell apart.
        std::vector<float> g = RandomNormal((*on_cpu)->num_elements(t), 300 * step + t + 1);
        for (size_t i = 0; i < g.size(); ++i) g[i] += (i % 7 == 0) ? 2.0f : 0.0f;
        ASSERT_TRUE((*on_cpu)->SetGradient(t, g).ok());
        ASSERT_TRUE((*on_gpu)->SetGradient(t, g).ok());
      }
      ASSERT_TRUE((*on_cpu)->Step().ok());
      ASSERT_TRUE((*on_gpu)->Step().ok());
      for (int t = 0; t < (*on_cpu)->num_tensors(); ++t) {
        EXPECT_EQ((*on_gpu)->auto_choices(t).matrices, (*on_cpu)->auto_choices(t).matrices)
            << (*on_cpu)->spec(t).name << " at step " << step + 1;
        EXPECT_EQ((*on_gpu)->auto_choices(t).decided_at_step,
                  (*on_cpu)->auto_choices(t).decided_at_step);
      }
    }
    ExpectParametersAlike(**on_cpu, **on_gpu, precision);
  }
}

TEST_F(CudaVsCpuTest, ExactPolarDirectionMatches) {
  auto config = ParseOptimizerConfig("keller,direction=polar,precision=fp32");
  ASSERT_TRUE(config.ok()) << config.status();
  const std::vector<TensorSpec> specs = {{"w", {40, 24}, RankPolicy::kFlatten, *config}};
  auto on_cpu = Optimizer::Create(*cpu_, specs);
  auto on_gpu = Optimizer::Create(*cuda_, specs);
  ASSERT_TRUE(on_cpu.ok() && on_gpu.ok());
  for (int step = 0; step < 3; ++step) {
    const std::vector<float> g = RandomNormal(40 * 24, 50 + step);
    ASSERT_TRUE((*on_cpu)->SetGradient(0, g).ok());
    ASSERT_TRUE((*on_gpu)->SetGradient(0, g).ok());
    ASSERT_TRUE((*on_cpu)->Step().ok());
    ASSERT_TRUE((*on_gpu)->Step().ok());
  }
  std::vector<float> want(40 * 24), got(40 * 24);
  ASSERT_TRUE((*on_cpu)->GetParameters(0, absl::MakeSpan(want)).ok());
  ASSERT_TRUE((*on_gpu)->GetParameters(0, absl::MakeSpan(got)).ok());
  EXPECT_LT(RelativeError(got, want), 1e-5);
}

TEST_F(CudaVsCpuTest, RejectedStepChangesNothingOnTheGpu) {
  auto config = ParseOptimizerConfig("keller");
  ASSERT_TRUE(config.ok());
  auto opt = Optimizer::Create(*cuda_, {{"w", {32, 48}, RankPolicy::kFlatten, *config}});
  ASSERT_TRUE(opt.ok());
  const std::vector<float> w0 = RandomNormal(32 * 48, 60);
  ASSERT_TRUE((*opt)->SetParameters(0, w0).ok());
  std::vector<float> g = RandomNormal(32 * 48, 61);
  g[777] = std::numeric_limits<float>::quiet_NaN();
  ASSERT_TRUE((*opt)->SetGradient(0, g).ok());
  const absl::Status status = (*opt)->Step();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  std::vector<float> w(w0.size()), m(w0.size());
  ASSERT_TRUE((*opt)->GetParameters(0, absl::MakeSpan(w)).ok());
  ASSERT_TRUE((*opt)->GetState(0, "momentum", absl::MakeSpan(m)).ok());
  EXPECT_EQ(w, w0);
  EXPECT_EQ(m, std::vector<float>(w0.size(), 0.0f));
  EXPECT_EQ((*opt)->steps_applied(0), 0);
}

TEST_F(CudaVsCpuTest, SessionsOnSeveralThreadsShareTheQueue) {
  // Four optimizers stepped at once from four threads give what each gives alone.
  auto config = ParseOptimizerConfig("muoneq_rowcol,precision=fp32");
  ASSERT_TRUE(config.ok());
  const std::vector<TensorSpec> specs = {{"a", {96, 128}, RankPolicy::kFlatten, *config},
                                         {"b", {128, 96}, RankPolicy::kFlatten, *config}};
  auto run = [&](Optimizer& opt, int seed) {
    for (int step = 0; step < 8; ++step) {
      for (int t = 0; t < 2; ++t) {
        if (!opt.SetGradient(t, RandomNormal(opt.num_elements(t), seed * 100 + step * 2 + t))
                 .ok()) {
          return false;
        }
      }
      if (!opt.Step().ok()) return false;
    }
    return true;
  };
  std::vector<std::unique_ptr<Optimizer>> alone, together;
  for (int i = 0; i < 4; ++i) {
    auto a = Optimizer::Create(*cuda_, specs);
    auto b = Optimizer::Create(*cuda_, specs);
    ASSERT_TRUE(a.ok() && b.ok());
    ASSERT_TRUE(run(**a, i));
    alone.push_back(std::move(*a));
    together.push_back(std::move(*b));
  }
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] { ok[i] = run(*together[i], i); });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(ok[i]) << i;
    for (int t = 0; t < 2; ++t) {
      std::vector<float> want(alone[i]->num_elements(t)), got(want.size());
      ASSERT_TRUE(alone[i]->GetParameters(t, absl::MakeSpan(want)).ok());
      ASSERT_TRUE(together[i]->GetParameters(t, absl::MakeSpan(got)).ok());
      EXPECT_EQ(got, want) << i << " " << t;
    }
  }
}

// Recorded steps (CUDA graphs, the default) on graphs_ against the same steps run eagerly on
// eager_ (step graphs off).
class CudaGraphTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto graphs = CreateCudaBackend();
    if (!graphs.ok()) GTEST_SKIP() << graphs.status().message();
    CudaBackendOptions eager_options;
    eager_options.step_graphs = false;
    auto eager = CreateCudaBackend(eager_options);
    ASSERT_TRUE(eager.ok()) << eager.status();
    graphs_ = *std::move(graphs);
    eager_ = *std::move(eager);
  }

  // An optimizer of `specs` on each backend: (*opts)[0] records its steps, (*opts)[1] does not.
  void CreateOnBoth(const std::vector<TensorSpec>& specs,
                    std::vector<std::unique_ptr<Optimizer>>* opts) {
    for (Backend* backend : {graphs_.get(), eager_.get()}) {
      auto opt = Optimizer::Create(*backend, specs);
      ASSERT_TRUE(opt.ok()) << opt.status();
      opts->push_back(*std::move(opt));
    }
  }

  // Every tensor's parameters and state buffers, bit for bit.
  static void ExpectSameBits(const Optimizer& recorded, const Optimizer& eager) {
    for (int t = 0; t < recorded.num_tensors(); ++t) {
      std::vector<float> x(recorded.num_elements(t)), y(x.size());
      ASSERT_TRUE(recorded.GetParameters(t, absl::MakeSpan(x)).ok());
      ASSERT_TRUE(eager.GetParameters(t, absl::MakeSpan(y)).ok());
      EXPECT_EQ(x, y) << recorded.spec(t).name;
      for (const StateBuffer& b : recorded.state(t)) {
        std::vector<float> xs(b.count), ys(b.count);
        ASSERT_TRUE(recorded.GetState(t, b.name, absl::MakeSpan(xs)).ok());
        ASSERT_TRUE(eager.GetState(t, b.name, absl::MakeSpan(ys)).ok());
        EXPECT_EQ(xs, ys) << recorded.spec(t).name << " " << b.name;
      }
    }
  }

  std::unique_ptr<Backend> graphs_, eager_;
};

// The same bits through everything that changes a step's arguments (AdamW's bias corrections, a
// new learning rate) or its shape (MuonEq's phase switch, a tensor without a gradient, a captured
// update).
TEST_F(CudaGraphTest, RecordedStepsGiveTheEagerStepsBits) {
  auto muon = ParseOptimizerConfig("keller");
  auto rowcol = ParseOptimizerConfig("muoneq_rowcol,precision=fp32,pre_normalize.row_at_step=5");
  auto rmnp = ParseOptimizerConfig("rmnp");
  auto adamw = ParseOptimizerConfig("adamw,weight_decay=0.1");
  ASSERT_TRUE(muon.ok() && rowcol.ok() && rmnp.ok() && adamw.ok()) << rowcol.status();
  const std::vector<TensorSpec> specs = {{"a", {64, 96}, RankPolicy::kFlatten, *muon},
                                         {"b", {64, 96}, RankPolicy::kFlatten, *muon},
                                         {"c", {48, 32}, RankPolicy::kFlatten, *rowcol},
                                         {"d", {40, 72}, RankPolicy::kFlatten, *rmnp},
                                         {"bias", {300}, RankPolicy::kFlatten, *adamw}};
  std::vector<std::unique_ptr<Optimizer>> opts;
  ASSERT_NO_FATAL_FAILURE(CreateOnBoth(specs, &opts));
  testing::DeviceMemory memory(*graphs_);
  float* captured = memory.Upload(std::vector<float>(64 * 96, 0.0f));
  for (int step = 0; step < 12; ++step) {
    std::vector<bool> present(specs.size(), true);
    if (step == 7) present[1] = false;
    bool flags[5];
    for (size_t t = 0; t < specs.size(); ++t) flags[t] = present[t];
    for (auto& opt : opts) {
      for (int t = 0; t < opt->num_tensors(); ++t) {
        ASSERT_TRUE(opt->SetGradient(t, RandomNormal(opt->num_elements(t), 100 * step + t)).ok());
      }
      if (step == 4) {
        ASSERT_TRUE(opt->SetHyperparameters(0, 0.005, 0.0, 0.9).ok());
      }
      if (step == 9) {
        ASSERT_TRUE(opt->CaptureUpdate(0, captured).ok());
      }
      ASSERT_TRUE(opt->Step(absl::MakeConstSpan(flags, specs.size())).ok()) << step;
    }
  }
  ExpectSameBits(*opts[0], *opts[1]);
}

// A learning-rate schedule (a new lr every step, from the step's header or SetHyperparameters)
// replays one recorded step: the kernels read lr and decay from backend memory. The recorded
// steps give the eager steps' bits, and one recording serves them all.
TEST_F(CudaGraphTest, ALearningRateScheduleReplaysOneRecording) {
  auto muon = ParseOptimizerConfig("keller,weight_decay=0.1");
  auto normuon = ParseOptimizerConfig("normuon");
  auto rmnp = ParseOptimizerConfig("rmnp,weight_decay=0.1");
  auto adamw = ParseOptimizerConfig("adamw,weight_decay=0.1");
  ASSERT_TRUE(muon.ok() && normuon.ok() && rmnp.ok() && adamw.ok());
  const std::vector<TensorSpec> specs = {{"a", {64, 96}, RankPolicy::kFlatten, *muon},
                                         {"n", {48, 80}, RankPolicy::kFlatten, *normuon},
                                         {"r", {40, 72}, RankPolicy::kFlatten, *rmnp},
                                         {"bias", {300}, RankPolicy::kFlatten, *adamw}};
  std::vector<std::unique_ptr<Optimizer>> opts;
  ASSERT_NO_FATAL_FAILURE(CreateOnBoth(specs, &opts));
  const int steps = 12;
  for (int step = 0; step < steps; ++step) {
    const double lr = 0.02 * 0.5 * (1 + std::cos(M_PI * step / steps));  // cosine decay
    for (auto& opt : opts) {
      for (int t = 0; t < opt->num_tensors(); ++t) {
        ASSERT_TRUE(
            opt->SetGradient(t, RandomNormal(opt->num_elements(t), 300 + 10 * step + t)).ok());
      }
      if (step % 2 == 0) {
        ASSERT_TRUE(opt->Step({}, lr).ok()) << step;  // the step header's lr
      } else {
        for (int t = 0; t < opt->num_tensors(); ++t) {
          const OptimizerConfig& c = opt->spec(t).config;
          const double momentum =
              c.algorithm == Algorithm::kAdamW ? c.adamw.beta1 : c.matrix.momentum;
          ASSERT_TRUE(opt->SetHyperparameters(t, lr, c.weight_decay, momentum).ok());
        }
        ASSERT_TRUE(opt->Step().ok()) << step;
      }
    }
  }
  // The first step runs kernel by kernel, the second is recorded, the rest replay.
  EXPECT_EQ(opts[0]->recorded_steps(), 1);
  EXPECT_EQ(opts[1]->recorded_steps(), 0);
  ExpectSameBits(*opts[0], *opts[1]);
}

TEST(CudaUploadTest, PageableUploadsAreStagedAndArriveWhole) {
  auto backend = CreateCudaBackend();
  if (!backend.ok()) GTEST_SKIP() << backend.status().message();
  // Several staging slots' worth, not a multiple of a slot, uploaded back to back into two
  // buffers and read back after the compute queue's own work on them.
  const std::vector<float> a = RandomNormal((int64_t{13} << 20) / 4 + 5, 80);
  std::vector<float> b = RandomNormal(a.size(), 81);
  testing::DeviceMemory memory(**backend);
  float* da = memory.Upload(std::vector<float>(a.size(), 0.0f));
  float* db = memory.Upload(std::vector<float>(a.size(), 0.0f));
  Queue& queue = (*backend)->default_queue();
  ASSERT_TRUE((*backend)->Upload(queue, da, a.data(), a.size() * sizeof(float)).ok());
  ASSERT_TRUE((*backend)->Upload(queue, db, b.data(), b.size() * sizeof(float)).ok());
  std::fill(b.begin(), b.end(), 0.0f);  // the host copy may change once Upload returns
  const formulas::RateScalars* rate =
      memory.Upload(std::vector<formulas::RateScalars>{{.lr = 1.0f, .decay = 1.0f}});
  ASSERT_TRUE((*backend)->ApplyUpdate(queue, da, db, a.size(), rate, 1.0f, DType::kF32).ok());
  std::vector<float> got = memory.Download(da, a.size());
  const std::vector<float> b_sent = RandomNormal(a.size(), 81);
  for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(got[i], a[i] - b_sent[i]) << i;
}

#if OPTD_TEST_CUDA_RUNTIME
TEST(CudaUploadTest, PinnedUploadsReturnOnceTheHostCopyMayChange) {
  auto backend = CreateCudaBackend();
  if (!backend.ok()) GTEST_SKIP() << backend.status().message();
  Queue& queue = (*backend)->default_queue();
  const int64_t n = int64_t{16} << 20;  // 64 MiB
  const std::vector<float> sent = RandomNormal(n, 82);
  float* pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(&pinned, n * sizeof(float)), cudaSuccess);
  absl::Cleanup free_pinned = [pinned] { cudaFreeHost(pinned); };
  std::copy(sent.begin(), sent.end(), pinned);
  testing::DeviceMemory memory(**backend);
  float* device = memory.Upload(std::vector<float>(n, 0.0f));
  // Work ahead of the upload on the queue, so a copy that Upload did not wait for would still be
  // queued when the host overwrites its source.
  const int64_t k = 2048;
  float* a = memory.Upload(RandomNormal(k * k, 83));
  float* c = memory.Upload(std::vector<float>(k * k, 0.0f));
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(
        (*backend)
            ->Gemm(
                queue,
                GemmArgs{
                    .m = k, .n = k, .k = k, .a = a, .lda = k, .b = a, .ldb = k, .c = c, .ldc = k})
            .ok());
  }
  ASSERT_TRUE((*backend)->Upload(queue, device, pinned, n * sizeof(float)).ok());
  std::fill(pinned, pinned + n, 0.0f);  // the host copy may change once Upload returns
  const std::vector<float> got = memory.Download(device, n);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(got[i], sent[i]) << i;
}
#endif  // OPTD_TEST_CUDA_RUNTIME

// A failed CUDA call is reported by that call alone: the runtime also keeps its error as the host
// thread's last error, which the next kernel launch or cuBLAS call must not report as its own.
TEST(CudaErrorTest, AnInvalidatedRecordingLeavesNoErrorForTheNextLaunch) {
  auto backend = CreateCudaBackend();
  if (!backend.ok()) GTEST_SKIP() << backend.status().message();
  Queue& queue = (*backend)->default_queue();
  const int64_t n = 1000;
  testing::DeviceMemory memory(**backend);
  float* x = memory.Upload(std::vector<float>(n, 1.0f));
  // Once, so the count's scratch exists; then inside a recording, where its synchronization is
  // not allowed and invalidates the recording.
  ASSERT_TRUE((*backend)->CountOutOfRange(queue, x, n, 1e30f).ok());
  ASSERT_TRUE((*backend)->BeginRecording(queue).ok());
  EXPECT_FALSE((*backend)->CountOutOfRange(queue, x, n, 1e30f).ok());
  std::unique_ptr<StepGraph> graph;
  const absl::Status ended = (*backend)->EndRecording(queue, &graph);
  EXPECT_FALSE(ended.ok());
  EXPECT_NE(ended.message().find("cudaStreamEndCapture"), absl::string_view::npos) << ended;
  EXPECT_EQ(graph, nullptr);
  ASSERT_TRUE((*backend)->Fill(queue, x, n, 2.0f).ok());
  const std::vector<float> got = memory.Download(x, n);
  EXPECT_EQ(got, std::vector<float>(n, 2.0f));
}

TEST(CudaErrorTest, DeviceOutOfMemoryLeavesNoErrorForAnotherQueue) {
  CudaBackendOptions options;
  options.memory_budget_bytes = int64_t{1} << 50;  // beyond any device: the device refuses
  auto backend = CreateCudaBackend(options);
  if (!backend.ok()) GTEST_SKIP() << backend.status().message();
  auto other = (*backend)->CreateQueue(QueuePriority::kNormal);
  ASSERT_TRUE(other.ok()) << other.status();
  auto huge = (*backend)->Allocate(size_t{1} << 48);
  ASSERT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted) << huge.status();
  EXPECT_NE(huge.status().message().find("cudaMallocFromPoolAsync"), absl::string_view::npos)
      << huge.status();
  // The same host thread goes on with another session's work: a cuBLAS product (cuBLAS checks
  // its launches through the thread's last error) and a launch of optd's own.
  // A·I with small integers in A: exact in any precision cuBLAS picks.
  const int64_t m = 64;
  std::vector<float> a_host(m * m), identity(m * m, 0.0f);
  for (int64_t i = 0; i < m * m; ++i) a_host[i] = static_cast<float>(i % 17 - 8);
  for (int64_t i = 0; i < m; ++i) identity[i * m + i] = 1.0f;
  testing::DeviceMemory memory(**backend);
  float* a = memory.Upload(a_host);
  float* b = memory.Upload(identity);
  float* c = memory.Upload(std::vector<float>(m * m, 0.0f));
  ASSERT_TRUE(
      (*backend)
          ->Gemm(**other,
                 GemmArgs{
                     .m = m, .n = m, .k = m, .a = a, .lda = m, .b = b, .ldb = m, .c = c, .ldc = m})
          .ok());
  std::vector<float> got(m * m);
  ASSERT_TRUE((*backend)->Download(**other, got.data(), c, got.size() * sizeof(float)).ok());
  ASSERT_TRUE((*backend)->Synchronize(**other).ok());
  EXPECT_EQ(got, a_host);
  ASSERT_TRUE((*backend)->Fill(**other, c, m * m, 3.0f).ok());
  ASSERT_TRUE((*backend)->Download(**other, got.data(), c, got.size() * sizeof(float)).ok());
  ASSERT_TRUE((*backend)->Synchronize(**other).ok());
  EXPECT_EQ(got, std::vector<float>(m * m, 3.0f));
}

TEST(CudaMemoryTest, BudgetIsResourceExhaustedAndFreedMemoryReturns) {
  CudaBackendOptions options;
  // The backend's own queue holds 32 MiB (cuBLAS's workspace) of it from the start.
  options.memory_budget_bytes = 96 << 20;
  auto backend = CreateCudaBackend(options);
  if (!backend.ok()) GTEST_SKIP() << backend.status().message();
  auto first = (*backend)->Allocate(48 << 20);
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = (*backend)->Allocate(32 << 20);
  ASSERT_EQ(second.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(second.status().message().find("budget of 100663296 bytes"), absl::string_view::npos)
      << second.status();
  *first = Buffer();
  auto third = (*backend)->Allocate(32 << 20);
  EXPECT_TRUE(third.ok()) << third.status();
  // A model too large for the budget is refused whole.
  auto config = ParseOptimizerConfig("keller");
  ASSERT_TRUE(config.ok());
  auto opt = Optimizer::Create(**backend, {{"w", {4096, 4096}, RankPolicy::kFlatten, *config}});
  EXPECT_EQ(opt.status().code(), absl::StatusCode::kResourceExhausted) << opt.status();
}

// A session holds the scratch its steps take from the moment it is created (one whose scratch
// the budget cannot hold is refused there): with every other byte of the budget taken, a
// polar-direction step (fp64 SVD scratch) and a Newton–Schulz one still run whole, like the CPU's.
TEST(CudaMemoryTest, AFullBudgetNeverFailsAStepHalfWay) {
  CudaBackendOptions options;
  options.memory_budget_bytes = int64_t{512} << 20;
  auto backend = CreateCudaBackend(options);
  if (!backend.ok()) GTEST_SKIP() << backend.status().message();
  std::unique_ptr<Backend> cpu = testing::MakeCpuBackend();
  ASSERT_NE(cpu, nullptr);
  auto polar = ParseOptimizerConfig("keller,direction=polar,precision=fp32");
  auto keller = ParseOptimizerConfig("keller,precision=fp32");
  ASSERT_TRUE(polar.ok() && keller.ok());
  const std::vector<TensorSpec> specs = {{"p", {512, 512}, RankPolicy::kFlatten, *polar},
                                         {"k", {256, 384}, RankPolicy::kFlatten, *keller}};
  auto on_gpu = Optimizer::Create(**backend, specs);
  ASSERT_TRUE(on_gpu.ok()) << on_gpu.status();
  auto on_cpu = Optimizer::Create(*cpu, specs);
  ASSERT_TRUE(on_cpu.ok()) << on_cpu.status();
  // Everything left of the budget, to the last 256 bytes, goes to other buffers, but for 1.5 MiB
  // at first: enough for a gradient check's scratch, not for the SVD's (before scratch was
  // reserved, such a step failed after Momentum had changed m), then none at all.
  auto hold = (*backend)->Allocate(size_t{3} << 19);
  ASSERT_TRUE(hold.ok()) << hold.status();
  std::vector<Buffer> others;
  for (size_t bytes = size_t{1} << 30; bytes >= 256;) {
    absl::StatusOr<Buffer> b = (*backend)->Allocate(bytes);
    if (b.ok()) {
      others.push_back(std::move(*b));
    } else {
      ASSERT_EQ(b.status().code(), absl::StatusCode::kResourceExhausted) << b.status();
      bytes /= 2;
    }
  }
  *hold = Buffer();
  for (int step = 0; step < 4; ++step) {
    if (step == 2) {
      hold = (*backend)->Allocate(size_t{3} << 19);
      ASSERT_TRUE(hold.ok()) << hold.status();
    }
    for (int t = 0; t < 2; ++t) {
      const std::vector<float> g = RandomNormal((*on_gpu)->num_elements(t), 90 + 10 * step + t);
      ASSERT_TRUE((*on_gpu)->SetGradient(t, g).ok());
      ASSERT_TRUE((*on_cpu)->SetGradient(t, g).ok());
    }
    const absl::Status stepped = (*on_gpu)->Step();
    ASSERT_TRUE(stepped.ok()) << stepped << " at step " << step;
    ASSERT_TRUE((*on_cpu)->Step().ok());
  }
  for (int t = 0; t < 2; ++t) {
    std::vector<float> want((*on_cpu)->num_elements(t)), got(want.size());
    ASSERT_TRUE((*on_cpu)->GetParameters(t, absl::MakeSpan(want)).ok());
    ASSERT_TRUE((*on_gpu)->GetParameters(t, absl::MakeSpan(got)).ok());
    EXPECT_LT(RelativeError(got, want), 1e-5) << specs[t].name;
  }
}

TEST(CudaQueueTest, LowPriorityQueueRunsWorkInOrder) {
  auto backend = CreateCudaBackend();
  if (!backend.ok()) GTEST_SKIP() << backend.status().message();
  auto queue = (*backend)->CreateQueue(QueuePriority::kLow);
  ASSERT_TRUE(queue.ok()) << queue.status();
  const int m = 33, n = 17, k = 65;
  const std::vector<float> a = RandomNormal(m * k, 70), b = RandomNormal(k * n, 71);
  testing::DeviceMemory memory(**backend);
  float* da = memory.Upload(a);
  float* db = memory.Upload(b);
  float* dc = memory.Upload(std::vector<float>(m * n, 0.0f));
  GemmArgs args{.m = m, .n = n, .k = k, .a = da, .lda = k, .b = db, .ldb = n, .c = dc, .ldc = n};
  ASSERT_TRUE((*backend)->Gemm(**queue, args).ok());
  std::vector<float> got(m * n);
  ASSERT_TRUE((*backend)->Download(**queue, got.data(), dc, got.size() * sizeof(float)).ok());
  ASSERT_TRUE((*backend)->Synchronize(**queue).ok());
  std::vector<double> want(m * n, 0.0);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j)
      for (int p = 0; p < k; ++p) want[i * n + j] += double(a[i * k + p]) * b[p * n + j];
  EXPECT_LT(RelativeError(got, want), 1e-6);
}

}  // namespace
}  // namespace optd
