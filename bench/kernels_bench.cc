// The CPU kernel benchmarks, all fp32 on optd::CreateCpuBackend(). Each figure is read as a ratio
// against a baseline measured in the same run:
// - BM_NewtonSchulz (optd's NS5, keller coefficients) against BM_NewtonSchulzBlasLimit, the same
//   cblas calls with nothing between them: the time NewtonSchulz cannot beat.
// - BM_AdamWKernel (Backend::AdamW) in bytes/s against BM_AdamWCopy, a copy moving as many bytes.
// - BM_RmnpStep (Optimizer::Step, preset rmnp) in bytes/s against BM_Copy, a memory copy of the
//   same footprint; BM_RmnpKernel is Backend::RmnpStep alone, without Step's gradient check.
// - BM_MuonStep (Optimizer::Step, keller at fp32) per shape, so RMNP's speedup over Muon reads off.
// - BM_Gpt2SmallStep: Optimizer::Step over GPT-2 small's 48 matrices, per preset (keller with
//   each Newton–Schulz method), and BM_Gpt2SmallCopy, the copy baseline of its RMNP step.
// - BM_NewtonSchulzMethod: Gram Newton–Schulz and `auto` against the standard iteration on the
//   same shapes (bench/gram.sh writes their section of RESULTS.md).
// bench/run.sh runs this with JSON output next to bench/numpy_ns.py and writes bench/RESULTS.md.
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/status_macros.h"
#include "kernels/auto_choice.h"
#include "kernels/backend.h"
#include "kernels/cpu/openblas_core.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/newton_schulz.h"
#include "kernels/optimizer.h"
#include "kernels/optimizer_config.h"

namespace optd {
namespace {

struct Shape {
  int64_t rows, cols;
};

// The shapes (rows × cols): GPT-2 small's attention and MLP widths and a 1024×4096 layer.
constexpr Shape kShapes[] = {{768, 768}, {768, 3072}, {1024, 4096}};

// One GPT-2 small block's matrices in Hugging Face's Conv1D (in × out) layout: attn.c_attn,
// attn.c_proj, mlp.c_fc, mlp.c_proj.
constexpr Shape kGpt2SmallBlock[] = {{768, 2304}, {768, 768}, {768, 3072}, {3072, 768}};
constexpr int kGpt2SmallLayers = 12;

// OpenBLAS's own thread count, read before the backend sets it to one (kernels/backend.h): the
// baselines that call cblas directly run multithreaded at this count, as for a caller of its own.
int BlasThreads() {
  static const int threads = openblas_get_num_threads();
  return threads;
}

// One CPU backend for the whole run, never destroyed, as a server process holds one.
Backend& Cpu() {
  static Backend* const backend = [] {
    BlasThreads();
    absl::StatusOr<std::unique_ptr<Backend>> created = CreateCpuBackend();
    if (!created.ok()) {
      std::fprintf(stderr, "kernels_bench: %s\n", created.status().ToString().c_str());
      std::exit(1);
    }
    return created->release();
  }();
  return *backend;
}

// The first `count` values of one fixed pool of standard normal floats: every benchmark of a
// shape sees the same input, and GPT-2's 48 gradients cost one draw of the largest matrix.
absl::Span<const float> Gaussian(int64_t count) {
  static const std::vector<float> pool = [] {
    int64_t largest = 0;
    for (const Shape& s : kShapes) largest = std::max(largest, s.rows * s.cols);
    for (const Shape& s : kGpt2SmallBlock) largest = std::max(largest, s.rows * s.cols);
    std::mt19937 rng(3);
    std::normal_distribution<float> normal;
    std::vector<float> values(largest);
    for (float& v : values) v = normal(rng);
    return values;
  }();
  if (count > static_cast<int64_t>(pool.size())) {
    std::fprintf(stderr, "kernels_bench: %lld floats asked of a pool of %zu\n",
                 static_cast<long long>(count), pool.size());
    std::exit(1);
  }
  return absl::MakeConstSpan(pool.data(), count);
}

// Records a failed status as the benchmark's error; true when `status` is OK.
bool Ok(benchmark::State& state, const absl::Status& status) {
  if (status.ok()) return true;
  state.SkipWithError(status.ToString().c_str());
  return false;
}

// `count` floats of backend memory, or an empty Buffer with the benchmark marked failed.
Buffer AllocateFloats(benchmark::State& state, int64_t count) {
  absl::StatusOr<Buffer> buffer = Cpu().Allocate(static_cast<size_t>(count) * sizeof(float));
  if (!Ok(state, buffer.status())) return Buffer();
  return *std::move(buffer);
}

// The standard iteration: BM_NewtonSchulz compares it with its own BLAS calls.
NewtonSchulzConfig KellerFp32() {
  NewtonSchulzConfig config;
  config.coefficient_set = "keller";
  config.steps = 5;
  config.compute_dtype = DType::kF32;
  config.method = NewtonSchulzMethod::kStandard;
  return config;
}

// Flops of one Newton–Schulz step as kernels/newton_schulz.cc issues it on a rows×cols matrix,
// s = min(rows, cols), k = max(rows, cols): the Gram syrk s(s+1)k, the A·A syrk s(s+1)s and the
// update symm 2s²k. RESULTS.md converts numpy's times with this same count.
double NewtonSchulzStepFlops(int64_t rows, int64_t cols) {
  const double s = static_cast<double>(std::min(rows, cols));
  const double k = static_cast<double>(std::max(rows, cols));
  return s * (s + 1) * k + s * (s + 1) * s + 2 * s * s * k;
}

// Bytes an RMNP step has to move on a rows×cols fp32 matrix: read g, m and w, write m and w.
double RmnpStepBytes(int64_t rows, int64_t cols) { return 5.0 * 4.0 * rows * cols; }

void SetFlopCounters(benchmark::State& state, double flop_per_iteration) {
  state.counters["flop"] = flop_per_iteration;
  state.counters["FLOP/s"] =
      benchmark::Counter(flop_per_iteration, benchmark::Counter::kIsIterationInvariantRate);
}

void SetByteCounters(benchmark::State& state, double bytes_per_iteration) {
  state.counters["bytes"] = bytes_per_iteration;
  state.SetBytesProcessed(static_cast<int64_t>(bytes_per_iteration) * state.iterations());
}

void TimeNewtonSchulz(benchmark::State& state, const NewtonSchulzConfig& config) {
  const int64_t rows = state.range(0), cols = state.range(1);
  Backend& backend = Cpu();
  Queue& queue = backend.default_queue();
  const absl::Span<const float> input = Gaussian(rows * cols);
  Buffer x = AllocateFloats(state, rows * cols);
  Buffer workspace = AllocateFloats(state, NewtonSchulzWorkspaceFloats(config, 1, rows, cols));
  if (state.error_occurred()) return;
  const MatrixBatch batch{x.f32(), 1, rows, cols};
  // NewtonSchulz works in place, so every iteration restores the input first, outside the timed
  // region (a copy of rows·cols floats: about 1 ms at 1024×4096, under 1% of the iteration).
  auto restore = [&] { std::memcpy(x.data(), input.data(), input.size() * sizeof(float)); };
  restore();
  // Untimed warm-up: first touch of the workspace pages and OpenBLAS's thread start.
  if (!Ok(state, NewtonSchulz(backend, queue, batch, config, workspace.f32()))) return;
  for (auto _ : state) {
    state.PauseTiming();
    restore();
    state.ResumeTiming();
    if (!Ok(state, NewtonSchulz(backend, queue, batch, config, workspace.f32()))) break;
  }
  // The standard iteration's count for either method: FLOP/s of a Gram run reads as the rate at
  // which it delivers the standard iteration's result.
  SetFlopCounters(state, NewtonSchulzSteps(config, rows, cols) * NewtonSchulzStepFlops(rows, cols));
}

void BM_NewtonSchulz(benchmark::State& state) { TimeNewtonSchulz(state, KellerFp32()); }

// Issue 20: optd's standard iteration against Gram Newton–Schulz, keller fp32, same shapes and
// run; `auto` runs whichever GramNewtonSchulzMinAspect picks. Aspect ratios from square to 8.
void BM_NewtonSchulzMethod(benchmark::State& state, NewtonSchulzMethod method) {
  NewtonSchulzConfig config = KellerFp32();
  config.method = method;
  state.counters["gram"] = UsesGramNewtonSchulz(config, "cpu", state.range(0), state.range(1));
  TimeNewtonSchulz(state, config);
}

// One auto-mode decision on a rows×cols matrix (kernels/auto_choice.h), as the step makes it on
// its own thread: ns.steps=auto alone (`direction` false: the Gram matrix's eigenvalues) or with
// direction=auto (eigenvectors, V·Vᵀ's dominance and the cosine too). Against
// BM_NewtonSchulzMethod/standard of the same shape: what a decision costs in Newton–Schulz runs.
void BM_AutoDecision(benchmark::State& state, bool direction) {
  const int64_t rows = state.range(0), cols = state.range(1);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> x(rows * cols);
  for (float& v : x) v = normal(rng);
  AutoConfig config;
  config.steps = true;
  config.direction = direction;
  for (auto _ : state) {
    absl::StatusOr<MatrixDecision> d =
        DecideMatrix(x, rows, cols, config, KellerFp32(), MatrixChoice{5, false});
    if (!d.ok()) {
      state.SkipWithError(std::string(d.status().message()).c_str());
      return;
    }
    benchmark::DoNotOptimize(d->choice);
  }
}

// The cblas calls NewtonSchulz makes, in its order, on its buffer layout (x, then a workspace of
// next X, A and B), with its shapes, leading dimensions, transposes, alpha and beta, and nothing
// else: no normalization, mirroring, A-to-B copy, diagonal shift, rounding or final copy. The time
// NewtonSchulz cannot beat. Per-call times come back as counters (ms per iteration).
//
// Without the a·I shift the iterates are not Newton–Schulz's, but restarting every iteration from
// the normalized input X0 with A and B holding A(X0) keeps every value a normal float through five
// steps (no denormals or infinities, which would change BLAS speed).
//
// `gemm_update` replaces the symm by an sgemm on the same operands: whether a mirrored B and a
// general product would beat OpenBLAS's symm at these shapes.
void BM_NewtonSchulzBlasLimit(benchmark::State& state, bool gemm_update) {
  const int64_t rows = state.range(0), cols = state.range(1), size = rows * cols;
  const NewtonSchulzConfig config = KellerFp32();
  const bool tall = config.transpose_tall && rows > cols;
  const int64_t s = tall ? cols : rows, k = tall ? rows : cols;
  const int steps = NewtonSchulzSteps(config, rows, cols);
  std::vector<float> poly_alpha, poly_beta;
  for (int step = 0; step < steps; ++step) {
    const NewtonSchulzCoefficients abc = NewtonSchulzStepCoefficients(config, step);
    poly_beta.push_back(static_cast<float>(abc[1]));
    poly_alpha.push_back(static_cast<float>(abc[2]));
  }

  const absl::Span<const float> input = Gaussian(size);
  std::vector<float> x0(input.begin(), input.end());
  const float norm = cblas_snrm2(static_cast<int>(size), x0.data(), 1);
  for (float& v : x0) v /= norm;
  std::vector<float> gram0(s * s);
  cblas_ssyrk(CblasRowMajor, CblasUpper, tall ? CblasTrans : CblasNoTrans, s, k, 1.0f, x0.data(),
              cols, 0.0f, gram0.data(), s);
  for (int64_t i = 0; i < s; ++i) {
    for (int64_t j = 0; j < i; ++j) gram0[i * s + j] = gram0[j * s + i];
  }

  Buffer x = AllocateFloats(state, size);
  Buffer workspace =
      AllocateFloats(state, NewtonSchulzWorkspaceFloats(KellerFp32(), 1, rows, cols));
  if (state.error_occurred()) return;
  float* const gram = workspace.f32() + size;
  float* const poly = gram + s * s;
  auto restore = [&] {
    std::memcpy(x.data(), x0.data(), size * sizeof(float));
    std::memcpy(gram, gram0.data(), s * s * sizeof(float));
    std::memcpy(poly, gram0.data(), s * s * sizeof(float));
  };

  using Clock = std::chrono::steady_clock;
  double gram_seconds = 0, poly_seconds = 0, update_seconds = 0;
  Cpu();
  openblas_set_num_threads(BlasThreads());
  auto run = [&] {
    float* current = x.f32();
    float* next = workspace.f32();
    for (int step = 0; step < steps; ++step) {
      const Clock::time_point t0 = Clock::now();
      cblas_ssyrk(CblasRowMajor, CblasUpper, tall ? CblasTrans : CblasNoTrans, s, k, 1.0f, current,
                  cols, 0.0f, gram, s);
      const Clock::time_point t1 = Clock::now();
      cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, s, s, poly_alpha[step], gram, s,
                  poly_beta[step], poly, s);
      const Clock::time_point t2 = Clock::now();
      if (gemm_update) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, cols, tall ? cols : rows, 1.0f,
                    tall ? current : poly, tall ? cols : s, tall ? poly : current, tall ? s : cols,
                    0.0f, next, cols);
      } else {
        cblas_ssymm(CblasRowMajor, tall ? CblasRight : CblasLeft, CblasUpper, rows, cols, 1.0f,
                    poly, s, current, cols, 0.0f, next, cols);
      }
      const Clock::time_point t3 = Clock::now();
      gram_seconds += std::chrono::duration<double>(t1 - t0).count();
      poly_seconds += std::chrono::duration<double>(t2 - t1).count();
      update_seconds += std::chrono::duration<double>(t3 - t2).count();
      std::swap(current, next);
    }
  };
  restore();
  run();  // untimed warm-up, as in BM_NewtonSchulz
  gram_seconds = poly_seconds = update_seconds = 0;
  for (auto _ : state) {
    state.PauseTiming();
    restore();
    state.ResumeTiming();
    run();
  }
  const double per_iteration_ms =
      1e3 / static_cast<double>(std::max<int64_t>(1, state.iterations()));
  openblas_set_num_threads(1);  // back to what the backend's tiled calls expect
  state.counters["gram_syrk_ms"] = gram_seconds * per_iteration_ms;
  state.counters["poly_syrk_ms"] = poly_seconds * per_iteration_ms;
  state.counters[gemm_update ? "update_gemm_ms" : "update_symm_ms"] =
      update_seconds * per_iteration_ms;
  SetFlopCounters(state, steps * NewtonSchulzStepFlops(rows, cols));
}

// An optimizer over `shapes` (one tensor each) under `spec`, every gradient staged, and one step
// already taken so that the timed steps find every buffer's pages touched.
absl::StatusOr<std::unique_ptr<Optimizer>> ReadyOptimizer(absl::string_view spec,
                                                          absl::Span<const Shape> shapes) {
  OPTD_ASSIGN_OR_RETURN(const OptimizerConfig config, ParseOptimizerConfig(spec));
  std::vector<TensorSpec> tensors;
  for (size_t i = 0; i < shapes.size(); ++i) {
    tensors.push_back(TensorSpec{
        .name = absl::StrCat("w", i), .shape = {shapes[i].rows, shapes[i].cols}, .config = config});
  }
  OPTD_ASSIGN_OR_RETURN(std::unique_ptr<Optimizer> optimizer,
                        Optimizer::Create(Cpu(), std::move(tensors)));
  for (int i = 0; i < optimizer->num_tensors(); ++i) {
    OPTD_RETURN_IF_ERROR(optimizer->SetGradient(i, Gaussian(optimizer->num_elements(i))));
  }
  OPTD_RETURN_IF_ERROR(optimizer->Step());
  return optimizer;
}

// Times Optimizer::Step on staged gradients; the gradients stay the same from step to step.
void TimeSteps(benchmark::State& state, absl::string_view spec, absl::Span<const Shape> shapes) {
  absl::StatusOr<std::unique_ptr<Optimizer>> optimizer = ReadyOptimizer(spec, shapes);
  if (!Ok(state, optimizer.status())) return;
  for (auto _ : state) {
    if (!Ok(state, (*optimizer)->Step())) break;
  }
}

void BM_RmnpStep(benchmark::State& state) {
  const Shape shape{state.range(0), state.range(1)};
  TimeSteps(state, "rmnp", {shape});
  SetByteCounters(state, RmnpStepBytes(shape.rows, shape.cols));
}

void BM_RmnpKernel(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1), count = rows * cols;
  Backend& backend = Cpu();
  absl::StatusOr<OptimizerConfig> config = ParseOptimizerConfig("rmnp");
  if (!Ok(state, config.status())) return;
  const formulas::RateScalars rate{
      .lr = static_cast<float>(config->lr),
      .decay = static_cast<float>(1.0 - config->lr * config->weight_decay)};
  const RmnpStepArgs args{.momentum = static_cast<float>(config->matrix.momentum),
                          .nesterov = config->matrix.nesterov,
                          .eps = config->matrix.row_normalize_eps,
                          .rate = &rate,  // the CPU backend's memory is the host's
                          .scale = static_cast<float>(ScaleFactor(config->matrix, rows, cols)),
                          .step_dtype = config->matrix.step_dtype};
  Buffer w = AllocateFloats(state, count);
  Buffer m = AllocateFloats(state, count);
  Buffer g = AllocateFloats(state, count);
  if (state.error_occurred()) return;
  const absl::Span<const float> gradient = Gaussian(count);
  std::memcpy(g.data(), gradient.data(), count * sizeof(float));
  std::memset(w.data(), 0, count * sizeof(float));
  std::memset(m.data(), 0, count * sizeof(float));
  for (auto _ : state) {
    if (!Ok(state, backend.RmnpStep(backend.default_queue(), w.f32(), m.f32(), g.f32(), rows, cols,
                                    args))) {
      break;
    }
  }
  SetByteCounters(state, RmnpStepBytes(rows, cols));
}

// A memory copy with the footprint of an RMNP step over `rmnp_floats` parameters: 1.5·rmnp_floats
// floats into as many, so source and destination span the 12 bytes per parameter of g, m and w and
// the copy meets the same cache level as the step (a copy of rmnp_floats floats would fit in the L3
// cache where RMNP's arrays do not). Split over a thread pool as large as the CPU backend's, as its
// loops are. Bytes moved count the read and the write: 2·4·1.5·rmnp_floats.
void TimeCopy(benchmark::State& state, int64_t rmnp_floats) {
  const int64_t count = 3 * rmnp_floats / 2;
  Buffer src = AllocateFloats(state, count);
  Buffer dst = AllocateFloats(state, count);
  if (state.error_occurred()) return;
  std::memset(src.data(), 0, count * sizeof(float));
  std::memset(dst.data(), 0, count * sizeof(float));
  float* const to = dst.f32();
  const float* const from = src.f32();
  static ThreadPool* const pool = new ThreadPool(BlasThreads());
  for (auto _ : state) {
    pool->ParallelFor(count, 1 << 15, [&](int64_t begin, int64_t end) {
      std::memcpy(to + begin, from + begin, (end - begin) * sizeof(float));
    });
    benchmark::ClobberMemory();
  }
  SetByteCounters(state, 2.0 * 4.0 * count);
}

void BM_Copy(benchmark::State& state) { TimeCopy(state, state.range(0) * state.range(1)); }

// Backend::AdamW over `count` elements (w, m, v, g: 28 bytes moved per element, 16 read, 12
// written) in bytes/s, against BM_AdamWCopy, a copy moving as many bytes (TimeCopy of 7/3·count
// RMNP floats). AdamW steps every vector, embedding and head, so its rate is every session's.
void BM_AdamWKernel(benchmark::State& state) {
  const int64_t count = state.range(0);
  Backend& backend = Cpu();
  Buffer w = AllocateFloats(state, count);
  Buffer m = AllocateFloats(state, count);
  Buffer v = AllocateFloats(state, count);
  Buffer g = AllocateFloats(state, count);
  Buffer scalars = AllocateFloats(state, sizeof(formulas::AdamWScalars) / sizeof(float));
  if (state.error_occurred()) return;
  const absl::Span<const float> gradient = Gaussian(count);
  std::memcpy(g.data(), gradient.data(), count * sizeof(float));
  std::memset(w.data(), 0, count * sizeof(float));
  std::memset(m.data(), 0, count * sizeof(float));
  std::memset(v.data(), 0, count * sizeof(float));
  // torch.optim.AdamW's defaults at step 10, lr 1e-3.
  const double beta1 = 0.9, beta2 = 0.999, lr = 1e-3;
  const formulas::AdamWScalars host{
      .beta2 = static_cast<float>(beta2),
      .one_minus_beta1 = static_cast<float>(1 - beta1),
      .one_minus_beta2 = static_cast<float>(1 - beta2),
      .eps = 1e-8f,
      .decay = static_cast<float>(1 - lr * 0.01),
      .step_size = static_cast<float>(lr / (1 - std::pow(beta1, 10))),
      .bias_correction2_sqrt = static_cast<float>(std::sqrt(1 - std::pow(beta2, 10))),
      .eps_placement = formulas::AdamEpsilon::kTorch};
  std::memcpy(scalars.data(), &host, sizeof(host));
  const auto* device_scalars = reinterpret_cast<const formulas::AdamWScalars*>(scalars.data());
  for (auto _ : state) {
    if (!Ok(state, backend.AdamW(backend.default_queue(), w.f32(), m.f32(), v.f32(), g.f32(), count,
                                 device_scalars))) {
      break;
    }
  }
  SetByteCounters(state, 28.0 * count);
}

void BM_AdamWCopy(benchmark::State& state) { TimeCopy(state, 7 * state.range(0) / 3); }

void BM_MuonStep(benchmark::State& state) {
  const Shape shape{state.range(0), state.range(1)};
  TimeSteps(state, "keller,precision=fp32,ns.method=standard", {shape});
  SetFlopCounters(state, KellerFp32().steps * NewtonSchulzStepFlops(shape.rows, shape.cols));
}

std::vector<Shape> Gpt2SmallShapes() {
  std::vector<Shape> shapes;
  for (int layer = 0; layer < kGpt2SmallLayers; ++layer) {
    shapes.insert(shapes.end(), std::begin(kGpt2SmallBlock), std::end(kGpt2SmallBlock));
  }
  return shapes;
}

void BM_Gpt2SmallStep(benchmark::State& state, const char* spec) {
  const std::vector<Shape> shapes = Gpt2SmallShapes();
  TimeSteps(state, spec, shapes);
  double flop = 0, bytes = 0;
  for (const Shape& s : shapes) {
    flop += KellerFp32().steps * NewtonSchulzStepFlops(s.rows, s.cols);
    bytes += RmnpStepBytes(s.rows, s.cols);
  }
  // The figure that bounds each preset: Newton–Schulz flops for Muon, bytes moved for RMNP.
  if (absl::string_view(spec).substr(0, 4) == "rmnp") {
    SetByteCounters(state, bytes);
  } else {
    SetFlopCounters(state, flop);
  }
}

// The copy baseline for an RMNP step over all of GPT-2 small: a 1 GB footprint, far past any
// cache, so this pair compares DRAM bandwidth.
void BM_Gpt2SmallCopy(benchmark::State& state) {
  int64_t parameters = 0;
  for (const Shape& s : Gpt2SmallShapes()) parameters += s.rows * s.cols;
  TimeCopy(state, parameters);
}

void ForEachShape(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"rows", "cols"});
  for (const Shape& shape : kShapes) benchmark->Args({shape.rows, shape.cols});
  // Real time: the work runs on OpenBLAS's and the backend's threads, not only the timing thread.
  benchmark->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_NewtonSchulz)->Apply(ForEachShape);

constexpr Shape kMethodShapes[] = {
    {768, 768},   {768, 960},   {768, 1152}, {768, 1536}, {768, 2304}, {768, 3072},  {3072, 768},
    {1024, 4096}, {512, 4096},  {256, 1024}, {512, 1024}, {384, 768},  {1024, 1280}, {1024, 1536},
    {1024, 2048}, {1536, 2048}, {64, 256},   {128, 512},  {128, 1024}};
void ForEachMethodShape(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"rows", "cols"});
  for (const Shape& shape : kMethodShapes) benchmark->Args({shape.rows, shape.cols});
  benchmark->UseRealTime()->Unit(benchmark::kMillisecond);
}
BENCHMARK_CAPTURE(BM_NewtonSchulzMethod, standard, NewtonSchulzMethod::kStandard)
    ->Apply(ForEachMethodShape);
BENCHMARK_CAPTURE(BM_NewtonSchulzMethod, gram, NewtonSchulzMethod::kGram)
    ->Apply(ForEachMethodShape);
BENCHMARK_CAPTURE(BM_NewtonSchulzMethod, auto, NewtonSchulzMethod::kAuto)
    -> Apply(ForEachMethodShape);
// GPT-2 small's block, and a wider matrix.
constexpr Shape kDecisionShapes[] = {
    {768, 2304}, {768, 768}, {768, 3072}, {3072, 768}, {1024, 4096}};
void ForEachDecisionShape(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"rows", "cols"});
  for (const Shape& shape : kDecisionShapes) benchmark->Args({shape.rows, shape.cols});
  benchmark->UseRealTime()->Unit(benchmark::kMillisecond);
}
BENCHMARK_CAPTURE(BM_AutoDecision, steps, false)->Apply(ForEachDecisionShape);
BENCHMARK_CAPTURE(BM_AutoDecision, steps_and_direction, true)->Apply(ForEachDecisionShape);
BENCHMARK_CAPTURE(BM_NewtonSchulzBlasLimit, symm, false)->Apply(ForEachShape);
BENCHMARK_CAPTURE(BM_NewtonSchulzBlasLimit, gemm_update, true)->Apply(ForEachShape);
BENCHMARK(BM_MuonStep)->Apply(ForEachShape);
BENCHMARK(BM_RmnpStep)->Apply(ForEachShape);
BENCHMARK(BM_RmnpKernel)->Apply(ForEachShape);
BENCHMARK(BM_Copy)->Apply(ForEachShape);
// The main job's transformer (112,768 parameters), GPT-2 small's vectors and embeddings in one
// tensor's range, and past the last-level cache.
void ForEachAdamWCount(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"count"});
  for (int64_t count : {112768, 1 << 20, 1 << 22}) benchmark->Args({count});
  benchmark->UseRealTime()->Unit(benchmark::kMicrosecond);
}
BENCHMARK(BM_AdamWKernel)->Apply(ForEachAdamWCount);
BENCHMARK(BM_AdamWCopy)->Apply(ForEachAdamWCount);
// A Muon step over GPT-2 small is about 1.1 TFLOP, seconds on a few cores, each repetition paying
// one more for its warm-up: one timed step in each of three repetitions, whatever the command line
// asks of the other benchmarks.
BENCHMARK_CAPTURE(BM_Gpt2SmallStep, keller_fp32, "keller,precision=fp32,ns.method=standard")
    ->Iterations(1)
    ->Repetitions(3)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Gpt2SmallStep, keller_fp32_gram, "keller,precision=fp32,ns.method=gram")
    ->Iterations(1)
    ->Repetitions(3)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Gpt2SmallStep, keller_fp32_auto, "keller,precision=fp32,ns.method=auto")
    ->Iterations(1)
    ->Repetitions(3)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Gpt2SmallStep, rmnp, "rmnp")->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Gpt2SmallCopy)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace optd

int main(int argc, char** argv) {
  // The kernels the daemon runs (kernels/cpu/openblas_core.h).
  optd::RestartWithSuitedOpenBlasCoreOrWarn(argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  // The backend's own description (CPU model, threads, OpenBLAS build) and OpenBLAS's kernel
  // choice go into the JSON context, so RESULTS.md names what produced its figures.
  benchmark::AddCustomContext("optd_backend", optd::Cpu().description());
  benchmark::AddCustomContext("openblas_corename", openblas_get_corename());
  benchmark::AddCustomContext("copy_threads", std::to_string(optd::BlasThreads()));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
