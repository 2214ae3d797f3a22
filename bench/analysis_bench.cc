// The analyzer benchmark (bench/analysis.sh): what one analysis costs, in optimizer steps of
// the same matrix measured in the same run, on its exact path and on its estimate path; and what
// a running analyzer does to a concurrent step's latency, against the same steps with the
// analyzer idle. Prints JSON for bench/write_analysis_results.py.
//
// Usage: analysis_bench [--repetitions=N]   (default 5)
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/analysis.h"
#include "kernels/backend.h"
#include "kernels/cpu/openblas_core.h"
#include "kernels/initializers.h"
#include "kernels/optimizer.h"
#include "kernels/optimizer_config.h"
#include "server/analyzer.h"

namespace optd {
namespace {

using Clock = std::chrono::steady_clock;

void Check(const absl::Status& status) {
  if (!status.ok()) {
    std::fprintf(stderr, "analysis_bench: %s\n", status.ToString().c_str());
    std::exit(1);
  }
}

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Muon (Keller's rule, fp32) on one rows×cols matrix: the step the analysis is measured against.
struct OneMatrix {
  OneMatrix(Backend& backend, int64_t rows, int64_t cols) : rows(rows), cols(cols) {
    absl::StatusOr<OptimizerConfig> config = ParseOptimizerConfig("keller,precision=fp32");
    Check(config.status());
    absl::StatusOr<std::unique_ptr<Optimizer>> created =
        Optimizer::Create(backend, {{"w", {rows, cols}, RankPolicy::kFlatten, *config}});
    Check(created.status());
    optimizer = *std::move(created);
    gradient.resize(static_cast<size_t>(rows * cols));
    FillNormal(7, 0.0, 1.0, absl::MakeSpan(gradient));
    Check(optimizer->SetGradient(0, gradient));
    Check(optimizer->Step());  // warm-up, and a non-zero momentum to analyze
  }
  double Step() {
    Check(optimizer->SetGradient(0, gradient));
    const Clock::time_point start = Clock::now();
    Check(optimizer->Step());
    return Seconds(start);
  }
  const float* momentum() const { return optimizer->state(0)[0].data; }

  int64_t rows, cols;
  std::unique_ptr<Optimizer> optimizer;
  std::vector<float> gradient;
};

double AnalyzeSeconds(Backend& backend, Queue& queue, const OneMatrix& m, int64_t exact_max_dim,
                      bool* estimated) {
  AnalysisOptions options;
  options.exact_max_dim = exact_max_dim;
  NewtonSchulzConfig ns = m.optimizer->spec(0).config.matrix.newton_schulz;
  const Clock::time_point start = Clock::now();
  absl::StatusOr<MatrixAnalysis> a =
      AnalyzeMatrix(backend, queue, m.momentum(), m.optimizer->gradient(0),
                    m.optimizer->gradient(0), m.rows, m.cols, ns, options);
  Check(a.status());
  *estimated = a->estimated;
  return Seconds(start);
}

int Main(int argc, char** argv) {
  // The kernels the daemon runs (kernels/cpu/openblas_core.h).
  optd::RestartWithSuitedOpenBlasCoreOrWarn(argv);
  int repetitions = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--repetitions=", 0) == 0) {
      repetitions = std::max(1, std::atoi(arg.c_str() + 14));
    } else {
      std::fprintf(stderr, "usage: analysis_bench [--repetitions=N]\n");
      return 2;
    }
  }
  // As optd runs them: the steps on a backend with every core, the analyzer on one of its own
  // (server/server.cc).
  absl::StatusOr<std::unique_ptr<Backend>> step_backend = CreateCpuBackend({});
  Check(step_backend.status());
  absl::StatusOr<std::unique_ptr<Backend>> analysis_backend = CreateCpuBackend({.threads = 1});
  Check(analysis_backend.status());
  Queue& queue = (*analysis_backend)->default_queue();

  std::vector<std::string> shapes;
  // GPT-2 small's block matrices (768×768, 768×2304, 768×3072, 3072×768) and one square matrix
  // past the exact limit, where only the estimate runs.
  for (auto [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{
           {768, 768}, {768, 2304}, {768, 3072}, {3072, 768}, {2048, 2048}}) {
    OneMatrix m(**step_backend, rows, cols);
    std::vector<double> steps, exact, estimate;
    bool exact_estimated = false, estimate_estimated = false;
    for (int r = 0; r < repetitions; ++r) {
      steps.push_back(m.Step());
      if (std::min(rows, cols) <= 1024) {
        exact.push_back(AnalyzeSeconds(**analysis_backend, queue, m, 1024, &exact_estimated));
      }
      estimate.push_back(AnalyzeSeconds(**analysis_backend, queue, m, 0, &estimate_estimated));
    }
    if (exact_estimated || !estimate_estimated) {
      std::fprintf(stderr, "analysis_bench: the paths did not run as asked\n");
      return 1;
    }
    shapes.push_back(
        absl::StrCat("{\"rows\": ", rows, ", \"cols\": ", cols, ", \"step_s\": ", Median(steps),
                     ", \"exact_s\": ", exact.empty() ? "null" : absl::StrCat(Median(exact)),
                     ", \"estimate_s\": ", Median(estimate), "}"));
    std::fprintf(stderr, "analysis_bench: %ldx%ld done\n", static_cast<long>(rows),
                 static_cast<long>(cols));
  }

  // A step of 768×3072 while the analyzer, fed back to back, analyzes another 768×3072 matrix,
  // against the same steps with the analyzer idle.
  OneMatrix stepped(**step_backend, 768, 3072);
  OneMatrix analyzed(**step_backend, 768, 3072);
  const int steps_per_phase = 8 * repetitions;
  std::vector<double> alone, beside;
  for (int i = 0; i < steps_per_phase; ++i) alone.push_back(stepped.Step());
  absl::StatusOr<std::unique_ptr<server::Analyzer>> analyzer =
      server::Analyzer::Create(**analysis_backend, nullptr, {});
  Check(analyzer.status());
  std::atomic<int> analyses{0};
  std::atomic<bool> stop{false};
  const int64_t count = 768 * 3072;
  std::thread feeder([&] {
    while (!stop.load()) {
      const int64_t bytes = 3 * count * static_cast<int64_t>(sizeof(float));
      if (!(*analyzer)->Reserve("bench", bytes)) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        continue;
      }
      server::AnalysisJob job;
      job.session = "bench";
      job.tensors.push_back(server::TensorSnapshot{
          .name = "w",
          .batch = 1,
          .rows = 768,
          .cols = 3072,
          .momentum = std::vector<float>(analyzed.momentum(), analyzed.momentum() + count),
          .update = analyzed.gradient,
          .gradient = analyzed.gradient,
          .newton_schulz = analyzed.optimizer->spec(0).config.matrix.newton_schulz});
      job.publish = [&](int64_t, std::vector<v1::TensorAnalysis>) { ++analyses; };
      (*analyzer)->Submit(std::move(job), bytes);
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the analyzer is under way
  const int before = analyses.load();
  const Clock::time_point start = Clock::now();
  for (int i = 0; i < steps_per_phase; ++i) beside.push_back(stepped.Step());
  const double phase_seconds = Seconds(start);
  const int during = analyses.load() - before;
  stop = true;
  feeder.join();
  analyzer->reset();

  std::printf(
      "{\"repetitions\": %d, \"description\": \"%s\", \"shapes\": [%s],\n"
      " \"interference\": {\"rows\": 768, \"cols\": 3072, \"steps\": %d, \"alone_p50_s\": %.6f, "
      "\"alone_max_s\": %.6f, \"beside_p50_s\": %.6f, \"beside_max_s\": %.6f, "
      "\"analyses_during\": %d, \"phase_s\": %.3f}}\n",
      repetitions, (*step_backend)->description().c_str(), absl::StrJoin(shapes, ", ").c_str(),
      steps_per_phase, Median(alone), *std::max_element(alone.begin(), alone.end()), Median(beside),
      *std::max_element(beside.begin(), beside.end()), during, phase_seconds);
  return 0;
}

}  // namespace
}  // namespace optd

int main(int argc, char** argv) { return optd::Main(argc, argv); }
