// The GPU benchmark: the CUDA backend against the device's own ceilings, measured in the same
// run — a large bf16 GEMM through cuBLAS (the matrix-rate ceiling) and a device-to-device copy (the
// bandwidth ceiling) — for Newton–Schulz (NS5, bf16, keller), the RMNP step and a whole
// GPT-2-small Muon step. Writes one JSON object (bench/gpu_results.py turns it and the torch
// reference's JSON into bench/RESULTS.md's GPU section). Needs a GPU; exits 77 without one.
//
//   gpu_bench [--json=PATH] [--quick]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/models.h"
#include "kernels/backend.h"
#include "kernels/cpu/openblas_core.h"
#include "kernels/newton_schulz.h"
#include "kernels/optimizer.h"
#include "kernels/optimizer_config.h"

namespace optd {
namespace {

[[noreturn]] void Die(const absl::Status& status, const std::string& what) {
  std::fprintf(stderr, "gpu_bench: %s: %s\n", what.c_str(), status.ToString().c_str());
  std::exit(1);
}

void Check(const absl::Status& status, const std::string& what) {
  if (!status.ok()) Die(status, what);
}

template <typename T>
T Get(absl::StatusOr<T> value, const std::string& what) {
  if (!value.ok()) Die(value.status(), what);
  return *std::move(value);
}

// Median milliseconds of `repeats` calls of fn, each synchronized, after `warmup` calls.
double MedianMs(Backend& backend, int warmup, int repeats, const std::function<void()>& fn) {
  Queue& queue = backend.default_queue();
  for (int i = 0; i < warmup; ++i) fn();
  Check(backend.Synchronize(queue), "synchronize");
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    Check(backend.Synchronize(queue), "synchronize");
    times.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
            .count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Backend memory with fresh normal values (never zeros: they hide unwritten outputs and can run
// faster than real data).
Buffer Random(Backend& backend, int64_t count, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> host(count);
  for (float& x : host) x = normal(rng);
  Buffer buffer = Get(backend.Allocate(count * sizeof(float)), "allocate");
  Check(backend.Upload(backend.default_queue(), buffer.data(), host.data(), count * sizeof(float)),
        "upload");
  Check(backend.Synchronize(backend.default_queue()), "synchronize");
  return buffer;
}

struct Json {
  std::vector<std::string> fields;
  void Add(const std::string& key, double value) {
    fields.push_back(absl::StrFormat("\"%s\": %.6g", key, value));
  }
  void Add(const std::string& key, const std::string& value) {
    fields.push_back(absl::StrFormat("\"%s\": \"%s\"", key, value));
  }
  void AddRaw(const std::string& key, const std::string& raw) {
    fields.push_back(absl::StrFormat("\"%s\": %s", key, raw));
  }
  std::string str() const { return absl::StrCat("{", absl::StrJoin(fields, ", "), "}"); }
};

// cuBLAS bf16 GEMM (fp32 accumulation and output) at n³, TFLOP/s.
double GemmPeakTflops(Backend& backend, int64_t n) {
  Queue& queue = backend.default_queue();
  Buffer a32 = Random(backend, n * n, 1), b32 = Random(backend, n * n, 2);
  Buffer a = Get(backend.Allocate(n * n * 2), "allocate"),
         b = Get(backend.Allocate(n * n * 2), "a");
  Buffer c = Get(backend.Allocate(n * n * 4), "allocate");
  Check(backend.Convert(queue, a32.data(), DType::kF32, a.data(), DType::kBF16, n * n), "convert");
  Check(backend.Convert(queue, b32.data(), DType::kF32, b.data(), DType::kBF16, n * n), "convert");
  GemmArgs args{.m = n,
                .n = n,
                .k = n,
                .input_dtype = DType::kBF16,
                .a = a.data(),
                .lda = n,
                .b = b.data(),
                .ldb = n,
                .c = c.f32(),
                .ldc = n};
  const double ms = MedianMs(backend, 3, 10, [&] { Check(backend.Gemm(queue, args), "gemm"); });
  return 2.0 * n * n * n / (ms * 1e-3) / 1e12;
}

// Device-to-device copy, GB/s counting bytes read plus bytes written.
double CopyGbps(Backend& backend, int64_t bytes) {
  Buffer src = Random(backend, bytes / 4, 3);
  Buffer dst = Get(backend.Allocate(bytes), "allocate");
  Queue& queue = backend.default_queue();
  const double ms = MedianMs(
      backend, 3, 20, [&] { Check(backend.Copy(queue, dst.data(), src.data(), bytes), "copy"); });
  return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

struct NsShape {
  std::string name;
  int64_t batch, rows, cols;
};

// NS FLOPs per call: per step X·Xᵀ (2·s·s·k), A·A (2·s³) and P·X (2·s·s·k), s = min, k = max.
double NsFlops(const NsShape& s, int steps) {
  const double small = std::min(s.rows, s.cols), large = std::max(s.rows, s.cols);
  return s.batch * steps * (4.0 * small * small * large + 2.0 * small * small * small);
}

std::string NewtonSchulzRuns(Backend& backend, const std::vector<NsShape>& shapes,
                             double peak_tflops, NewtonSchulzMethod method) {
  std::vector<std::string> rows;
  NewtonSchulzConfig config;  // keller, 5 steps, bf16
  config.method = method;
  const char* label = method == NewtonSchulzMethod::kGram ? "Gram" : "NS5";
  for (const NsShape& s : shapes) {
    Buffer x = Random(backend, s.batch * s.rows * s.cols, 4);
    Buffer work = Get(
        backend.Allocate(NewtonSchulzWorkspaceFloats(config, s.batch, s.rows, s.cols) * 4), "ws");
    const MatrixBatch batch{x.f32(), s.batch, s.rows, s.cols};
    const double ms = MedianMs(backend, 3, 20, [&] {
      Check(NewtonSchulz(backend, backend.default_queue(), batch, config, work.f32()), "ns");
    });
    const double tflops = NsFlops(s, config.steps) / (ms * 1e-3) / 1e12;
    std::fprintf(stderr, "  %s bf16 %-22s %8.3f ms  %6.1f TFLOP/s  %5.1f%% of GEMM peak\n", label,
                 s.name.c_str(), ms, tflops, 100 * tflops / peak_tflops);
    Json row;
    row.Add("name", s.name);
    row.Add("batch", s.batch);
    row.Add("rows", s.rows);
    row.Add("cols", s.cols);
    row.Add("ms", ms);
    row.Add("tflops", tflops);
    rows.push_back(row.str());
  }
  return absl::StrCat("[", absl::StrJoin(rows, ", "), "]");
}

// Backend::RmnpStep on rows×cols, GB/s over the 5·4·r·c bytes it must move.
double RmnpGbps(Backend& backend, int64_t rows, int64_t cols, double* ms_out) {
  const int64_t n = rows * cols;
  Buffer w = Random(backend, n, 5), m = Random(backend, n, 6), g = Random(backend, n, 7);
  // The rate in backend memory, as the optimizer keeps it.
  const formulas::RateScalars host_rate{.lr = 0.02f, .decay = 1.0f};
  Buffer rate = Get(backend.Allocate(sizeof(host_rate)), "allocate");
  Check(backend.Upload(backend.default_queue(), rate.data(), &host_rate, sizeof(host_rate)),
        "upload");
  RmnpStepArgs args;
  args.rate = static_cast<const formulas::RateScalars*>(rate.data());
  const double ms = MedianMs(backend, 3, 20, [&] {
    Check(backend.RmnpStep(backend.default_queue(), w.f32(), m.f32(), g.f32(), rows, cols, args),
          "rmnp");
  });
  *ms_out = ms;
  return 5.0 * 4.0 * n / (ms * 1e-3) / 1e9;
}

// GPT-2 small (124M) from the model catalogue (client/models.h): 12 blocks of c_attn [2304, 768],
// attn.c_proj [768, 768], mlp.c_fc [3072, 768], mlp.c_proj [768, 3072] on `matrix_preset`;
// embeddings, LayerNorms and biases on AdamW (the usual split).
std::vector<TensorSpec> Gpt2Small(const std::string& matrix_preset) {
  const OptimizerConfig matrix = Get(ParseOptimizerConfig(matrix_preset), "preset");
  const OptimizerConfig adamw = Get(ParseOptimizerConfig("adamw"), "adamw");
  const std::vector<loadgen::TensorShape> shapes = Get(loadgen::ModelShapes("gpt2-small"), "model");
  std::vector<TensorSpec> specs;
  for (const loadgen::TensorShape& t : shapes) {
    specs.push_back({t.name, t.shape, RankPolicy::kFlatten, t.adamw ? adamw : matrix});
  }
  return specs;
}

// Optimizer::Step on GPT-2 small with gradients already on the device, ms.
// With `schedule`, every step takes a new learning rate (the step header's), as a schedule does.
double Gpt2Step(Backend& backend, const std::string& preset, int* groups, bool schedule = false,
                int64_t* recorded = nullptr) {
  auto opt = Get(Optimizer::Create(backend, Gpt2Small(preset)), "create");
  std::vector<Buffer> keep;
  for (int t = 0; t < opt->num_tensors(); ++t) {
    Buffer g = Random(backend, opt->num_elements(t), 100 + t, 0.01f);
    Check(backend.Copy(backend.default_queue(), opt->gradient(t), g.data(),
                       opt->num_elements(t) * sizeof(float)),
          "copy");
    keep.push_back(std::move(g));
  }
  Check(backend.Synchronize(backend.default_queue()), "synchronize");  // the optimizer's queue
                                                                       // is another
  *groups = opt->num_groups();
  int64_t step = 0;
  const double ms = MedianMs(backend, 3, 20, [&] {
    const double lr = 0.02 / (1.0 + 0.01 * static_cast<double>(step++));
    Check(schedule ? opt->Step({}, lr) : opt->Step(), "step");
  });
  if (recorded != nullptr) *recorded = opt->recorded_steps();
  return ms;
}

}  // namespace
}  // namespace optd

int main(int argc, char** argv) {
  // The kernels the daemon runs (kernels/cpu/openblas_core.h), for the CPU figures beside the
  // GPU's.
  optd::RestartWithSuitedOpenBlasCoreOrWarn(argv);
  std::string json_path;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--json=", 0) == 0) {
      json_path = arg.substr(7);
    } else if (arg == "--quick") {
      quick = true;
    } else {
      std::fprintf(stderr, "usage: gpu_bench [--json=PATH] [--quick]\n");
      return 2;
    }
  }
  absl::StatusOr<std::unique_ptr<optd::Backend>> created = optd::CreateCudaBackend();
  if (!created.ok()) {
    std::fprintf(stderr, "gpu_bench: no GPU: %s\n", created.status().ToString().c_str());
    return 77;
  }
  optd::Backend& backend = **created;
  std::fprintf(stderr, "gpu_bench on %s\n", backend.description().c_str());
  optd::Json out;
  out.Add("device", backend.description());
  const double peak = optd::GemmPeakTflops(backend, quick ? 4096 : 8192);
  const double copy = optd::CopyGbps(backend, quick ? (int64_t{256} << 20) : (int64_t{2} << 30));
  std::fprintf(stderr, "  ceilings: bf16 GEMM %.1f TFLOP/s, device copy %.0f GB/s\n", peak, copy);
  out.Add("gemm_bf16_tflops", peak);
  out.Add("copy_gbps", copy);

  {
    // Backend::Upload from pageable host memory (the server's staging), through the pinned
    // slots and the copy stream; torch_gpu_reference.py measures torch's own copies.
    const int64_t bytes = int64_t{256} << 20;
    std::vector<float> host(bytes / 4, 1.5f);
    optd::Buffer dst = optd::Get(backend.Allocate(bytes), "allocate");
    const double ms = optd::MedianMs(backend, 2, 10, [&] {
      optd::Check(backend.Upload(backend.default_queue(), dst.data(), host.data(), bytes),
                  "upload");
    });
    const double gbps = bytes / (ms * 1e-3) / 1e9;
    std::fprintf(stderr, "  upload 256 MiB from pageable memory %8.3f ms  %6.1f GB/s\n", ms, gbps);
    out.Add("upload_pageable_gbps", gbps);
  }

  std::vector<optd::NsShape> shapes = {{"4096x4096", 1, 4096, 4096},
                                       {"gpt2 c_attn 12x2304x768", 12, 2304, 768},
                                       {"gpt2 c_proj 12x768x768", 12, 768, 768},
                                       {"gpt2 c_fc 12x3072x768", 12, 3072, 768},
                                       {"gpt2 mlp_proj 12x768x3072", 12, 768, 3072}};
  out.AddRaw("newton_schulz",
             optd::NewtonSchulzRuns(backend, shapes, peak, optd::NewtonSchulzMethod::kStandard));
  // Issue 20: Gram Newton–Schulz on the non-square shapes (a square one runs the standard
  // iteration), its time read against the standard row of the same name; TFLOP/s count the
  // standard iteration's FLOPs.
  std::vector<optd::NsShape> wide;
  for (const optd::NsShape& s : shapes) {
    if (s.rows != s.cols) wide.push_back(s);
  }
  out.AddRaw("newton_schulz_gram",
             optd::NewtonSchulzRuns(backend, wide, peak, optd::NewtonSchulzMethod::kGram));

  std::vector<std::string> rmnp;
  for (const auto& [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{
           {768, 3072}, {4096, 4096}, {8192, 8192}, {16384, 512}}) {
    double ms = 0;
    const double gbps = optd::RmnpGbps(backend, rows, cols, &ms);
    std::fprintf(stderr, "  RMNP step %5ldx%-5ld %8.3f ms  %6.0f GB/s  %5.1f%% of copy\n",
                 static_cast<long>(rows), static_cast<long>(cols), ms, gbps, 100 * gbps / copy);
    optd::Json row;
    row.Add("rows", rows);
    row.Add("cols", cols);
    row.Add("ms", ms);
    row.Add("gbps", gbps);
    rmnp.push_back(row.str());
  }
  out.AddRaw("rmnp", absl::StrCat("[", absl::StrJoin(rmnp, ", "), "]"));

  std::vector<std::string> steps;
  auto step_row = [&steps](const std::string& preset, double ms, int groups) {
    optd::Json row;
    row.Add("preset", preset);
    row.Add("ms", ms);
    row.Add("groups", groups);
    steps.push_back(row.str());
  };
  for (const char* preset : {"keller", "keller,precision=fp32", "rmnp", "normuon"}) {
    int groups = 0;
    const double ms = optd::Gpt2Step(backend, preset, &groups);
    std::fprintf(stderr, "  GPT-2 small step %-22s %8.3f ms (%d batched groups)\n", preset, ms,
                 groups);
    step_row(preset, ms, groups);
  }
  for (const char* preset : {"keller", "rmnp"}) {
    // A learning-rate schedule: the kernels read lr from device memory, so one recording serves
    // every step (the rows above are the baseline).
    int groups = 0;
    int64_t recorded = 0;
    const double ms = optd::Gpt2Step(backend, preset, &groups, /*schedule=*/true, &recorded);
    std::fprintf(stderr, "  GPT-2 small step %-22s %8.3f ms (a new lr every step, %ld recorded)\n",
                 preset, ms, static_cast<long>(recorded));
    step_row(absl::StrCat(preset, ",lr_schedule"), ms, groups);
  }
  {
    // The same steps run eagerly (step graphs off), the baseline of the recorded ones above.
    optd::CudaBackendOptions eager;
    eager.step_graphs = false;
    auto eager_backend = optd::Get(optd::CreateCudaBackend(eager), "eager backend");
    for (const char* preset : {"keller", "rmnp"}) {
      int groups = 0;
      const double ms = optd::Gpt2Step(*eager_backend, preset, &groups);
      std::fprintf(stderr, "  GPT-2 small step %-22s %8.3f ms (step graphs off)\n", preset, ms);
      step_row(absl::StrCat(preset, ",no_graphs"), ms, groups);
    }
  }
  {
    // fp32 Newton–Schulz on TF32 tensor cores (--allow_tf32), beside the exact fp32 above.
    optd::CudaBackendOptions tf32;
    tf32.allow_tf32 = true;
    auto tf32_backend = optd::Get(optd::CreateCudaBackend(tf32), "tf32 backend");
    int groups = 0;
    const double ms = optd::Gpt2Step(*tf32_backend, "keller,precision=fp32", &groups);
    std::fprintf(stderr, "  GPT-2 small step %-22s %8.3f ms (TF32)\n", "keller,precision=fp32", ms);
    step_row("keller,precision=fp32,tf32", ms, groups);
  }
  out.AddRaw("gpt2_small_step", absl::StrCat("[", absl::StrJoin(steps, ", "), "]"));

  const std::string text = absl::StrCat(out.str(), "\n");
  if (json_path.empty()) {
    std::fputs(text.c_str(), stdout);
  } else {
    std::ofstream(json_path) << text;
  }
  return 0;
}
