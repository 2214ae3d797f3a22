// Trains a small two-layer ReLU classifier once per optimizer preset, and prints the loss curve
// and final figures of each. The optimizer runs in-process on the kernels library or, with
// --server, remotely in an optd daemon through the C++ client: the same arithmetic, so the two
// modes print the same losses bit for bit, and the step times show what the service costs. The
// data is a synthetic teacher task (a random two-layer teacher labels Gaussian inputs), so the
// example needs no downloads.
//
// Usage: train_example [steps [losses.csv]] [--server=HOST:PORT] — the CSV gets one row per
// (optimizer, step, loss). Remote sessions are analyzed every 10 steps; the table's dominance
// ratios then come from the daemon's GetAnalysis.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/client.h"
#include "kernels/analysis.h"
#include "kernels/backend.h"
#include "kernels/cpu/openblas_core.h"
#include "kernels/optimizer.h"

namespace {

constexpr int kInputs = 32, kHidden = 256, kClasses = 10, kBatch = 256;

struct Data {
  std::vector<float> x;  // n × kInputs
  std::vector<int> y;
};

// Labels come from a random teacher: argmax of W2·relu(W1·x).
Data MakeData(int n, std::mt19937& rng) {
  static const auto teacher = [] {
    std::mt19937 t(7);
    std::normal_distribution<float> normal;
    std::vector<float> w(64 * kInputs + kClasses * 64);
    for (float& v : w) v = normal(t);
    return w;
  }();
  std::normal_distribution<float> normal;
  Data d{std::vector<float>(n * kInputs), std::vector<int>(n)};
  for (float& v : d.x) v = normal(rng);
  for (int i = 0; i < n; ++i) {
    float h[64];
    for (int j = 0; j < 64; ++j) {
      float s = 0;
      for (int k = 0; k < kInputs; ++k) s += teacher[j * kInputs + k] * d.x[i * kInputs + k];
      h[j] = std::max(0.0f, s);
    }
    int best = 0;
    float best_score = -1e30f;
    for (int c = 0; c < kClasses; ++c) {
      float s = 0;
      for (int j = 0; j < 64; ++j) s += teacher[64 * kInputs + c * 64 + j] * h[j];
      if (s > best_score) best_score = s, best = c;
    }
    d.y[i] = best;
  }
  return d;
}

struct Model {
  std::vector<float> w1, b1, w2, b2;
};

// Cross-entropy loss and accuracy over `rows` examples from `offset`; fills gradients when given.
double LossAndGradient(const Model& m, const Data& d, int offset, int rows, Model* grad,
                       double* accuracy) {
  std::vector<float> h(kHidden), p(kClasses);
  double loss = 0;
  int correct = 0;
  if (grad) {
    for (auto* v : {&grad->w1, &grad->b1, &grad->w2, &grad->b2}) std::fill(v->begin(), v->end(), 0);
  }
  for (int i = offset; i < offset + rows; ++i) {
    const float* x = &d.x[i * kInputs];
    for (int j = 0; j < kHidden; ++j) {
      float s = m.b1[j];
      for (int k = 0; k < kInputs; ++k) s += m.w1[j * kInputs + k] * x[k];
      h[j] = std::max(0.0f, s);
    }
    float max_logit = -1e30f;
    for (int c = 0; c < kClasses; ++c) {
      float s = m.b2[c];
      for (int j = 0; j < kHidden; ++j) s += m.w2[c * kHidden + j] * h[j];
      p[c] = s;
      max_logit = std::max(max_logit, s);
    }
    int argmax = 0;
    for (int c = 1; c < kClasses; ++c) {
      if (p[c] > p[argmax]) argmax = c;
    }
    double z = 0;
    for (int c = 0; c < kClasses; ++c) {
      p[c] = std::exp(p[c] - max_logit);
      z += p[c];
    }
    correct += argmax == d.y[i];
    loss -= std::log(p[d.y[i]] / z);
    if (!grad) continue;
    for (int c = 0; c < kClasses; ++c) {
      const float dlogit = (p[c] / z - (c == d.y[i] ? 1.0f : 0.0f)) / rows;
      grad->b2[c] += dlogit;
      for (int j = 0; j < kHidden; ++j) grad->w2[c * kHidden + j] += dlogit * h[j];
    }
    for (int j = 0; j < kHidden; ++j) {
      if (h[j] <= 0) continue;
      float dh = 0;
      for (int c = 0; c < kClasses; ++c) {
        dh += m.w2[c * kHidden + j] * ((p[c] / z - (c == d.y[i] ? 1.0f : 0.0f)) / rows);
      }
      grad->b1[j] += dh;
      for (int k = 0; k < kInputs; ++k) grad->w1[j * kInputs + k] += dh * x[k];
    }
  }
  if (accuracy) *accuracy = static_cast<double>(correct) / rows;
  return loss / rows;
}

void Check(const absl::Status& status) {
  if (!status.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(status.message()).c_str());
    std::exit(1);
  }
}

}  // namespace

// The optimizer groups of the remote session: the matrix preset for W1, AdamW for the rest.
constexpr int kAnalysisInterval = 10;

optd::v1::SessionConfig RemoteConfig(const std::string& preset,
                                     const optd::OptimizerConfig& matrix) {
  optd::v1::SessionConfig config;
  config.set_analysis_interval(kAnalysisInterval);
  optd::v1::GroupConfig* hidden = config.add_groups();
  hidden->set_name("hidden");
  hidden->set_preset(preset);
  for (const auto& [key, value] :
       {std::pair<std::string, double>{"lr", matrix.lr}, {"weight_decay", matrix.weight_decay}}) {
    optd::v1::Override* o = hidden->add_overrides();
    o->set_key(key);
    o->set_value(absl::StrCat(value));
  }
  optd::v1::GroupConfig* vectors = config.add_groups();
  vectors->set_name("vectors");
  vectors->set_preset("adamw");
  optd::v1::Override* lr = vectors->add_overrides();
  lr->set_key("lr");
  lr->set_value("0.003");
  const std::pair<const char*, std::vector<int64_t>> tensors[] = {{"w1", {kHidden, kInputs}},
                                                                  {"b1", {kHidden}},
                                                                  {"w2", {kClasses, kHidden}},
                                                                  {"b2", {kClasses}}};
  for (const auto& [name, shape] : tensors) {
    optd::v1::TensorConfig* t = config.add_tensors();
    t->set_name(name);
    for (int64_t d : shape) t->add_shape(d);
    t->set_group(std::string(name) == "w1" ? "hidden" : "vectors");
  }
  return config;
}

int main(int argc, char** argv) {
  // On the kernels optd runs (kernels/cpu/openblas_core.h): where OpenBLAS took this CPU for an
  // older one, both restart onto the same suited core, so in-process equals remote here too.
  optd::RestartWithSuitedOpenBlasCoreOrWarn(argv);
  std::vector<std::string> positional;
  std::string server;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--server=", 0) == 0) {
      server = arg.substr(9);
    } else {
      positional.push_back(arg);
    }
  }
  const int steps = !positional.empty() ? std::atoi(positional[0].c_str()) : 300;
  if (steps < 1 || positional.size() > 2) {
    std::fprintf(stderr, "usage: %s [steps >= 1 [losses.csv]] [--server=HOST:PORT]\n", argv[0]);
    return 2;
  }
  FILE* csv = positional.size() > 1 ? std::fopen(positional[1].c_str(), "w") : nullptr;
  if (positional.size() > 1 && csv == nullptr) {
    std::fprintf(stderr, "cannot write %s\n", positional[1].c_str());
    return 1;
  }
  std::unique_ptr<optd::client::Client> remote;
  if (!server.empty()) {
    optd::client::ChannelOptions channel;
    channel.target = server;
    auto made = optd::client::MakeChannel(channel);
    Check(made.status());
    remote = std::make_unique<optd::client::Client>(*made);
    std::printf("optimizer: remote, optd at %s\n", server.c_str());
  }
  if (csv) std::fprintf(csv, "optimizer,step,train_loss\n");
  auto backend_or = optd::CreateCpuBackend();
  Check(backend_or.status());
  optd::Backend& backend = **backend_or;
  std::printf("backend: %s (%s)\n", std::string(backend.name()).c_str(),
              backend.description().c_str());
  std::mt19937 rng(1);
  const Data train = MakeData(kBatch * 40, rng);
  const Data valid = MakeData(2000, rng);

  struct Run {
    std::string preset;
    double train_loss, valid_loss, valid_accuracy, ms_per_step;
    optd::DominanceRatios dominance;
    int64_t dominance_step = 0;  // the step whose momentum they are of
  };
  std::vector<Run> runs;
  for (const char* preset : {"keller", "moonlight", "torch", "dion", "normuon", "normuon_paper",
                             "rmnp", "muoneq_row", "muoneq_col", "muoneq_rowcol", "adamw"}) {
    auto matrix = optd::PresetConfig(preset);
    auto vector_config = optd::PresetConfig("adamw");
    Check(matrix.status());
    if (std::string(preset) != "adamw") {
      // The presets' default learning rates assume their own models; one shared rate per family
      // keeps this comparison about the update rule.
      matrix->lr = matrix->matrix.scale == optd::ScaleRule::kMatchRms ? 0.01 : 0.02;
      matrix->weight_decay = 0.0;
    } else {
      matrix->lr = 3e-3;
    }
    vector_config->lr = 3e-3;
    std::vector<optd::TensorSpec> specs = {
        {"w1", {kHidden, kInputs}, optd::RankPolicy::kFlatten, *matrix},
        {"b1", {kHidden}, optd::RankPolicy::kFlatten, *vector_config},
        {"w2", {kClasses, kHidden}, optd::RankPolicy::kFlatten, *vector_config},
        {"b2", {kClasses}, optd::RankPolicy::kFlatten, *vector_config}};
    auto optimizer_or = optd::Optimizer::Create(backend, specs);
    Check(optimizer_or.status());
    optd::Optimizer& opt = **optimizer_or;
    std::optional<optd::client::Session> session;
    if (remote != nullptr) {
      const std::string group = std::string(preset) == "adamw" ? "adamw" : preset;
      auto created = remote->CreateSession(RemoteConfig(group, *matrix));
      Check(created.status());
      session = *created;
    }

    std::mt19937 init(3);
    std::normal_distribution<float> normal;
    Model model{std::vector<float>(kHidden * kInputs), std::vector<float>(kHidden, 0.0f),
                std::vector<float>(kClasses * kHidden), std::vector<float>(kClasses, 0.0f)};
    for (float& v : model.w1) v = normal(init) / std::sqrt(float(kInputs));
    for (float& v : model.w2) v = normal(init) / std::sqrt(float(kHidden));
    Model grad = model;
    Check(opt.SetParameters(0, model.w1));
    Check(opt.SetParameters(2, model.w2));
    if (session.has_value()) {
      const optd::client::NamedTensor initial[] = {
          {"w1", model.w1}, {"b1", model.b1}, {"w2", model.w2}, {"b2", model.b2}};
      Check(session->UploadParameters(initial));
    }

    std::printf("\n%-14s step  train_loss\n", preset);
    double optimizer_seconds = 0, train_loss = 0;
    for (int step = 0; step < steps; ++step) {
      const int offset = (step % 40) * kBatch;
      train_loss = LossAndGradient(model, train, offset, kBatch, &grad, nullptr);
      if (csv) std::fprintf(csv, "%s,%d,%.6f\n", preset, step, train_loss);
      if (step % std::max(1, steps / 6) == 0 || step == steps - 1) {
        std::printf("%-14s %4d  %.4f\n", "", step, train_loss);
      }
      const auto start = std::chrono::steady_clock::now();
      if (session.has_value()) {
        // One Step call: the gradients go to optd, the new parameters come back in place.
        const optd::client::NamedTensor gradients[] = {
            {"w1", grad.w1}, {"b1", grad.b1}, {"w2", grad.w2}, {"b2", grad.b2}};
        optd::client::StepOptions options;
        options.outputs = {{"w1", absl::MakeSpan(model.w1)},
                           {"b1", absl::MakeSpan(model.b1)},
                           {"w2", absl::MakeSpan(model.w2)},
                           {"b2", absl::MakeSpan(model.b2)}};
        Check(session->Step(step + 1, gradients, options).status());
      } else {
        Check(opt.SetGradient(0, grad.w1));
        Check(opt.SetGradient(1, grad.b1));
        Check(opt.SetGradient(2, grad.w2));
        Check(opt.SetGradient(3, grad.b2));
        Check(opt.Step());
        Check(opt.GetParameters(0, absl::MakeSpan(model.w1)));
        Check(opt.GetParameters(1, absl::MakeSpan(model.b1)));
        Check(opt.GetParameters(2, absl::MakeSpan(model.w2)));
        Check(opt.GetParameters(3, absl::MakeSpan(model.b2)));
      }
      optimizer_seconds +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    Run run{preset, train_loss, 0, 0, 1e3 * optimizer_seconds / steps, {}, steps};
    run.valid_loss = LossAndGradient(model, valid, 0, 2000, nullptr, &run.valid_accuracy);
    if (session.has_value()) {
      // Seed 000's dominance ratios from the daemon's analyzer, which runs in the background
      // after a step returned: the last analyzed step's (an analysis the analyzer was too busy
      // to take is skipped, so give it up to 1 s, then take the latest).
      const int64_t last = steps / kAnalysisInterval * kAnalysisInterval;
      for (int attempt = 0; last > 0 && attempt <= 20; ++attempt) {
        auto analysis = session->Analysis();
        Check(analysis.status());
        if (!analysis->tensors().empty() &&
            (analysis->tensors(0).step() == last || attempt == 20)) {
          const optd::v1::TensorAnalysis& w1 = analysis->tensors(0);
          run.dominance = {w1.dominance_ratio_min(), w1.dominance_ratio_avg(),
                           w1.dominance_ratio_max()};
          run.dominance_step = w1.step();
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      Check(session->Delete());
    } else if (opt.spec(0).config.algorithm == optd::Algorithm::kMatrix) {
      // Seed 000's dominance ratios of the hidden layer's momentum V (rows = hidden neurons).
      auto dominance = optd::ComputeDominanceRatios(backend, backend.default_queue(),
                                                    opt.state(0)[0].data, kHidden, kInputs);
      if (dominance.ok()) run.dominance = *dominance;
    }
    runs.push_back(run);
  }

  std::printf("\n%-14s %10s %10s %9s %11s %22s %6s\n", "optimizer", "train_loss", "valid_loss",
              "valid_acc", "ms/opt-step", "r_min/avg/max(W1 VVᵀ)", "@step");
  for (const Run& r : runs) {
    std::printf("%-14s %10.4f %10.4f %8.1f%% %11.3f %s\n", r.preset.c_str(), r.train_loss,
                r.valid_loss, 100 * r.valid_accuracy, r.ms_per_step,
                r.dominance.max > 0
                    ? absl::StrFormat("%6.2f/%6.2f/%6.2f %6d", r.dominance.min, r.dominance.avg,
                                      r.dominance.max, r.dominance_step)
                          .c_str()
                    : "   (adamw: no V)");
  }
  if (csv) std::fclose(csv);
  return 0;
}
