// End-to-end test helpers: an optd server on a free loopback port (in-process), clients for it,
// session configs, deterministic gradients, and the kernels-library reference a remote step must
// equal bit for bit.
#ifndef OPTD_TESTS_SERVER_TEST_DAEMON_H_
#define OPTD_TESTS_SERVER_TEST_DAEMON_H_

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/host_math.h"
#include "kernels/initializers.h"
#include "kernels/optimizer.h"
#include "server/server.h"
#include "server/session_config.h"

namespace optd::testing {

// A fresh directory under the test temp dir.
inline std::string MakeTempDir(const std::string& prefix) {
  std::string pattern = absl::StrCat(::testing::TempDir(), "/", prefix, "XXXXXX");
  if (mkdtemp(pattern.data()) == nullptr) ADD_FAILURE() << "mkdtemp " << pattern;
  return pattern;
}

// The backend the daemon under test and its Reference run on: $OPTD_TEST_BACKEND ("cpu" unless
// set; scripts/gpu-check sets "cuda"), so the bit-for-bit comparisons hold on either.
inline std::string TestBackendName() {
  const char* name = std::getenv("OPTD_TEST_BACKEND");
  return name != nullptr && *name != '\0' ? name : "cpu";
}

inline server::ServerOptions LoopbackOptions(const std::string& state_dir = "") {
  server::ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.backend = TestBackendName();
  options.threads = 1;
  options.sessions.state_dir = state_dir;
  options.drain_timeout = absl::Seconds(5);
  // Every Step stream that completes a step streams its results early (a large step's path on
  // the CPU backend: Session::Step's on_decided), so the suites hold that path to their checks;
  // tests of the other path set it back.
  options.early_results_min_bytes = 0;
  return options;
}

inline std::unique_ptr<server::Server> StartServer(server::ServerOptions options) {
  absl::StatusOr<std::unique_ptr<server::Server>> server = server::Server::Start(options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

inline client::Client ConnectTo(const server::Server& server, const std::string& admin = "") {
  client::ChannelOptions options;
  options.target = server.address();
  return client::Client(*client::MakeChannel(options), admin);
}

struct TensorDef {
  std::string name;
  std::vector<int64_t> shape;
  std::string group;
};

// Appends key=value overrides to `group`, in order.
inline void AddOverrides(v1::GroupConfig& group,
                         const std::vector<std::pair<std::string, std::string>>& overrides) {
  for (const auto& [key, value] : overrides) {
    v1::Override* o = group.add_overrides();
    o->set_key(key);
    o->set_value(value);
  }
}

// ns.steps=auto and direction=auto, deciding every `interval` steps (kernels/auto_choice.h).
inline std::vector<std::pair<std::string, std::string>> AutoModes(int interval) {
  return {{"ns.steps", "auto"}, {"direction", "auto"}, {"auto.interval", absl::StrCat(interval)}};
}

// A session config with groups {name -> preset} and the given tensors, initialized normal with
// a per-tensor seed.
inline v1::SessionConfig MakeConfig(const std::map<std::string, std::string>& groups,
                                    const std::vector<TensorDef>& tensors, int world_size = 1) {
  v1::SessionConfig config;
  for (const auto& [name, preset] : groups) {
    v1::GroupConfig* g = config.add_groups();
    g->set_name(name);
    g->set_preset(preset);
  }
  uint64_t seed = 1;
  for (const TensorDef& t : tensors) {
    v1::TensorConfig* tc = config.add_tensors();
    tc->set_name(t.name);
    for (int64_t d : t.shape) tc->add_shape(d);
    tc->set_group(t.group);
    tc->mutable_normal()->set_seed(seed++);
    tc->mutable_normal()->set_std(0.5);
  }
  config.set_world_size(world_size);
  return config;
}

// A small model of three tensors: a matrix and a convolution on `preset` (on AdamW when it is
// "adamw"), and a vector on AdamW.
inline v1::SessionConfig ModelConfig(const std::string& preset, int world_size = 1) {
  const std::string matrix = preset == "adamw" ? "vectors" : "matrices";
  return MakeConfig(
      {{"matrices", preset}, {"vectors", "adamw"}},
      {{"hidden", {24, 40}, matrix}, {"conv", {6, 3, 3, 3}, matrix}, {"bias", {40}, "vectors"}},
      world_size);
}

// Deterministic gradient values for (tensor, step, worker).
inline std::vector<float> Gradient(int64_t count, uint64_t tensor, int64_t step, int worker) {
  std::vector<float> g(static_cast<size_t>(count));
  FillNormal(tensor * 1000003 + static_cast<uint64_t>(step) * 101 + static_cast<uint64_t>(worker),
             0.0, 1.0, absl::MakeSpan(g));
  return g;
}

// The kernels library holding the same session, stepped locally: what the daemon must equal.
class Reference {
 public:
  explicit Reference(const v1::SessionConfig& config) : config_(config) {
    backend_ =
        TestBackendName() == "cuda" ? *CreateCudaBackend() : *CreateCpuBackend({.threads = 1});
    v1::SessionConfig normalized = config;
    EXPECT_TRUE(server::NormalizeSessionConfig(normalized).ok());
    config_ = normalized;
    optimizer_ = *Optimizer::Create(*backend_, *server::TensorSpecs(normalized));
    for (int t = 0; t < normalized.tensors_size(); ++t) {
      const v1::TensorConfig& tc = normalized.tensors(t);
      std::vector<float> values(static_cast<size_t>(optimizer_->num_elements(t)));
      FillNormal(tc.normal().seed(), tc.normal().mean(), tc.normal().std(), absl::MakeSpan(values));
      EXPECT_TRUE(optimizer_->SetParameters(t, values).ok());
    }
  }

  int num_tensors() const { return optimizer_->num_tensors(); }
  int64_t count(int t) const { return optimizer_->num_elements(t); }
  const std::string& name(int t) const { return optimizer_->spec(t).name; }
  Optimizer& optimizer() { return *optimizer_; }

  // One step on the mean of `per_worker[w][t]` (summed in worker order, as the daemon does).
  void Step(const std::vector<std::vector<std::vector<float>>>& per_worker) {
    for (int t = 0; t < num_tensors(); ++t) {
      std::vector<const float*> inputs;
      for (const auto& worker : per_worker) inputs.push_back(worker[t].data());
      std::vector<float> mean(static_cast<size_t>(count(t)));
      MeanOfWorkers(inputs, absl::MakeSpan(mean));
      ASSERT_TRUE(optimizer_->SetGradient(t, mean).ok());
    }
    ASSERT_TRUE(optimizer_->Step().ok());
  }

  std::vector<float> Parameters(int t) const {
    std::vector<float> values(static_cast<size_t>(count(t)));
    EXPECT_TRUE(optimizer_->GetParameters(t, absl::MakeSpan(values)).ok());
    return values;
  }

 private:
  v1::SessionConfig config_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Optimizer> optimizer_;
};

inline bool BitwiseEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Every tensor of `got` (new parameters by name) equals the reference's, bit for bit.
inline void ExpectMatches(const Reference& reference,
                          const std::map<std::string, std::vector<float>>& got,
                          const std::string& what) {
  ASSERT_EQ(got.size(), static_cast<size_t>(reference.num_tensors())) << what;
  for (int t = 0; t < reference.num_tensors(); ++t) {
    auto it = got.find(reference.name(t));
    ASSERT_NE(it, got.end()) << what << ": " << reference.name(t);
    EXPECT_TRUE(BitwiseEqual(it->second, reference.Parameters(t)))
        << what << ": tensor " << reference.name(t) << " differs from the kernels library";
  }
}

// Every worker's gradients for `step` as NamedTensors (views into `storage`).
inline std::vector<client::NamedTensor> AsNamed(const Reference& reference,
                                                const std::vector<std::vector<float>>& grads) {
  std::vector<client::NamedTensor> named;
  for (int t = 0; t < reference.num_tensors(); ++t) {
    named.push_back({reference.name(t), grads[t]});
  }
  return named;
}

inline std::vector<std::vector<float>> WorkerGradients(const Reference& reference, int64_t step,
                                                       int worker) {
  std::vector<std::vector<float>> grads;
  for (int t = 0; t < reference.num_tensors(); ++t) {
    grads.push_back(Gradient(reference.count(t), static_cast<uint64_t>(t), step, worker));
  }
  return grads;
}

}  // namespace optd::testing

#endif  // OPTD_TESTS_SERVER_TEST_DAEMON_H_
