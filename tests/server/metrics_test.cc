// optd's metrics end to end: the analyzer's figures in GetAnalysis and in the Prometheus
// exposition against fp64 values computed here, the service metrics against what the test did,
// the label budget, series removal, the step never waiting for an analysis, and /metrics over
// HTTP.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "prometheus/text_serializer.h"
#include "tests/server/analysis_reference.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {
namespace {

using Labels = std::map<std::string, std::string>;

struct Sample {
  std::string name;
  Labels labels;
  double value = 0;
};

// Parses the text exposition format: `name{k="v",...} value` lines; comments skipped.
std::vector<Sample> ParseExposition(const std::string& text) {
  std::vector<Sample> samples;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    if (line.front() == '#') continue;
    Sample s;
    const size_t brace = line.find('{');
    const size_t space = line.rfind(' ');
    if (brace != absl::string_view::npos && brace < space) {
      s.name = std::string(line.substr(0, brace));
      // name="value" pairs; values may hold commas and \-escapes.
      size_t i = brace + 1;
      while (i < line.size() && line[i] != '}') {
        const size_t eq = line.find('=', i);
        std::string value;
        size_t j = eq + 2;  // past ="
        for (; line[j] != '"'; ++j) value += line[j] == '\\' ? line[++j] : line[j];
        s.labels[std::string(line.substr(i, eq - i))] = value;
        i = line[j + 1] == ',' ? j + 2 : j + 1;
      }
    } else {
      s.name = std::string(line.substr(0, space));
    }
    s.value = std::strtod(std::string(line.substr(space + 1)).c_str(), nullptr);
    samples.push_back(std::move(s));
  }
  return samples;
}

class Exposition {
 public:
  explicit Exposition(server::Server& server)
      : samples_(ParseExposition(
            prometheus::TextSerializer().Serialize(server.metrics().registry()->Collect()))) {}

  // The value of the series with exactly these labels; NaN (and a failure) when absent.
  double Get(const std::string& name, const Labels& labels = {}) const {
    for (const Sample& s : samples_) {
      if (s.name == name && s.labels == labels) return s.value;
    }
    ADD_FAILURE() << "no series " << name << " with " << labels.size() << " labels";
    return std::nan("");
  }
  int Count(const std::string& name, const std::string& session) const {
    int n = 0;
    for (const Sample& s : samples_) {
      auto it = s.labels.find("session");
      n += s.name == name && it != s.labels.end() && it->second == session;
    }
    return n;
  }
  int CountWithLabel(const std::string& label, const std::string& value) const {
    int n = 0;
    for (const Sample& s : samples_) {
      auto it = s.labels.find(label);
      n += it != s.labels.end() && it->second == value;
    }
    return n;
  }

 private:
  std::vector<Sample> samples_;
};

v1::TensorConfig* AddTensor(v1::SessionConfig& config, const std::string& name,
                            std::vector<int64_t> shape) {
  v1::TensorConfig* t = config.add_tensors();
  t->set_name(name);
  for (int64_t d : shape) t->add_shape(d);
  t->set_group("matrices");
  return t;
}

// Moonlight's rule with fp32 Newton–Schulz: `sum` momentum, so the first step's momentum is the
// gradient itself, and zero initial parameters, so the update is −w₁/lr.
v1::SessionConfig AnalyzedConfig() {
  v1::SessionConfig config;
  v1::GroupConfig* group = config.add_groups();
  group->set_name("matrices");
  group->set_preset("moonlight");
  v1::Override* dtype = group->add_overrides();
  dtype->set_key("ns.dtype");
  dtype->set_value("fp32");
  config.set_analysis_interval(1);
  return config;
}

// Moonlight's first update, computed here in fp64: sum momentum from zero gives m = g, Nesterov
// u = g + 0.95·m, then Newton–Schulz (Keller's coefficients, 5 steps) and the match-RMS scale
// 0.2·√max(rows, cols). The learning rate, weight decay and parameters play no part.
std::vector<float> MoonlightFirstUpdate(const std::vector<float>& g, int64_t rows, int64_t cols) {
  std::vector<float> u;
  for (float x : g) u.push_back(static_cast<float>(x + 0.95 * x));
  const reference::Matrix o =
      reference::NewtonSchulz(reference::FromFloats(u.data(), rows, cols),
                              reference::KellerCoefficients(), 5, 1e-7, 1.0, false);
  const double scale = 0.2 * std::sqrt(static_cast<double>(std::max(rows, cols)));
  std::vector<float> update;
  for (double x : o.v) update.push_back(static_cast<float>(scale * x));
  return update;
}

void ExpectClose(double got, double want, const std::string& what) {
  if (std::isinf(want)) {
    EXPECT_EQ(got, want) << what;
    return;
  }
  EXPECT_NEAR(got, want, 2e-5 * std::max(1.0, std::fabs(want))) << what;
}

// Each figure of a TensorAnalysis next to its metric name and labels.
struct FigureOf {
  const char* metric;
  Labels labels;
  double (v1::TensorAnalysis::*get)() const;
  double reference::Figures::*want;
};

const std::vector<FigureOf>& Figures() {
  using A = v1::TensorAnalysis;
  using F = reference::Figures;
  static const std::vector<FigureOf> figures = {
      {"optd_dominance_ratio", {{"stat", "min"}}, &A::dominance_ratio_min, &F::dominance_min},
      {"optd_dominance_ratio", {{"stat", "avg"}}, &A::dominance_ratio_avg, &F::dominance_avg},
      {"optd_dominance_ratio", {{"stat", "max"}}, &A::dominance_ratio_max, &F::dominance_max},
      {"optd_rmnp_muon_cosine", {}, &A::rmnp_muon_cosine, &F::rmnp_muon_cosine},
      {"optd_stable_rank",
       {{"of", "momentum"}},
       &A::stable_rank_momentum,
       &F::stable_rank_momentum},
      {"optd_stable_rank", {{"of", "update"}}, &A::stable_rank_update, &F::stable_rank_update},
      {"optd_condition_number",
       {{"of", "momentum"}},
       &A::condition_number_momentum,
       &F::condition_number_momentum},
      {"optd_singular_value_entropy",
       {{"of", "momentum"}},
       &A::singular_value_entropy_momentum,
       &F::entropy_momentum},
      {"optd_singular_value_entropy",
       {{"of", "update"}},
       &A::singular_value_entropy_update,
       &F::entropy_update},
      {"optd_newton_schulz_polar_error", {}, &A::ns_polar_error, &F::ns_polar_error},
      {"optd_newton_schulz_small_sv_fraction",
       {},
       &A::ns_small_sv_fraction,
       &F::ns_small_sv_fraction},
      {"optd_neuron_norm_cv", {{"of", "update"}}, &A::neuron_norm_cv_update, &F::neuron_norm_cv},
      {"optd_update_rms", {}, &A::update_rms, &F::update_rms},
      {"optd_grad_norm", {}, &A::grad_norm, &F::grad_norm},
  };
  return figures;
}

Labels With(Labels labels, const std::string& session, const std::string& tensor = "") {
  labels["session"] = session;
  if (!tensor.empty()) labels["tensor"] = tensor;
  return labels;
}

class MetricsTest : public ::testing::Test {
 protected:
  void SetUp() override { server_ = StartServer(LoopbackOptions()); }

  std::unique_ptr<server::Server> server_;
};

TEST_F(MetricsTest, FiguresMatchFp64InGetAnalysisAndTheExposition) {
  v1::SessionConfig config = AnalyzedConfig();
  AddTensor(config, "diagonal", {6, 6});
  AddTensor(config, "rank_one", {5, 8});
  AddTensor(config, "random", {12, 20});
  client::Client client = ConnectTo(*server_);
  absl::StatusOr<client::Session> session = client.CreateSession(config, "figures");
  ASSERT_TRUE(session.ok()) << session.status();

  // diag(1..6): VVᵀ is diagonal, every dominance ratio infinite, polar(V) = rownormalize(V).
  std::vector<float> diagonal(36, 0.0f);
  for (int i = 0; i < 6; ++i) diagonal[i * 6 + i] = static_cast<float>(i + 1);
  // u·vᵀ with dyadic entries: exactly rank one in fp32; r_i = |u_i| / mean_{j≠i} |u_j|.
  const std::vector<float> u = {1, -2, 3, 0.5f, -1};
  const std::vector<float> v = {0.5f, 1, -1, 2, 0.25f, -0.75f, 1.5f, -0.5f};
  std::vector<float> rank_one;
  for (float a : u) {
    for (float b : v) rank_one.push_back(a * b);
  }
  const std::vector<float> random = Gradient(12 * 20, 7, 1, 0);
  const std::vector<client::NamedTensor> gradients = {
      {"diagonal", diagonal}, {"rank_one", rank_one}, {"random", random}};
  ASSERT_TRUE(session->Step(1, gradients).ok());
  server_->analyzer().WaitUntilIdle();

  absl::StatusOr<v1::GetAnalysisResponse> analysis = session->Analysis();
  ASSERT_TRUE(analysis.ok()) << analysis.status();
  ASSERT_EQ(analysis->tensors_size(), 3);
  ASSERT_TRUE(session->GetParameters().ok());
  const Exposition exposition(*server_);

  const std::vector<std::pair<std::vector<float>, std::vector<int64_t>>> inputs = {
      {diagonal, {6, 6}}, {rank_one, {5, 8}}, {random, {12, 20}}};
  std::map<std::string, double> sums;
  for (int t = 0; t < 3; ++t) {
    const v1::TensorAnalysis& got = analysis->tensors(t);
    const std::string& name = config.tensors(t).name();
    EXPECT_EQ(got.tensor(), name);
    EXPECT_EQ(got.step(), 1);
    const std::vector<float>& g = inputs[t].first;
    const int64_t rows = inputs[t].second[0], cols = inputs[t].second[1];
    const reference::Figures want =
        reference::AnalyzeFp64(g, MoonlightFirstUpdate(g, rows, cols), g, rows, cols);
    for (const FigureOf& f : Figures()) {
      const std::string what =
          absl::StrCat(name, " ", f.metric, " ", f.labels.empty() ? "" : f.labels.begin()->second);
      const double value = (got.*f.get)();
      if (t == 1 && f.want == &reference::Figures::condition_number_momentum) {
        // Exactly rank one: σ_min is zero, or rounding noise ~1e-16·σ_max.
        EXPECT_GT(value, 1e12) << what;
      } else if (t == 1 && f.want == &reference::Figures::entropy_update) {
        // The daemon's fp32 Newton–Schulz leaves rounding noise (σ ~ 1e-6) in the rank-one
        // update's null space, which the entropy counts; fp64 leaves less.
        EXPECT_NEAR(value, want.*f.want, 1e-3) << what;
      } else {
        ExpectClose(value, want.*f.want, what);
      }
      // The exposition carries the same number, and the session series their mean.
      EXPECT_DOUBLE_EQ(exposition.Get(f.metric, With(f.labels, "figures", name)), value) << what;
      sums[absl::StrCat(f.metric, f.labels.empty() ? "" : f.labels.begin()->second)] += value;
    }
  }
  for (const FigureOf& f : Figures()) {
    const double mean =
        sums[absl::StrCat(f.metric, f.labels.empty() ? "" : f.labels.begin()->second)] / 3;
    EXPECT_DOUBLE_EQ(exposition.Get(f.metric, With(f.labels, "figures")), mean) << f.metric;
  }
  // Closed forms for two of the inputs, beside the fp64 reference.
  EXPECT_EQ(analysis->tensors(0).dominance_ratio_min(), std::numeric_limits<double>::infinity());
  EXPECT_NEAR(analysis->tensors(0).rmnp_muon_cosine(), 1.0, 1e-6);
  EXPECT_NEAR(analysis->tensors(0).condition_number_momentum(), 6.0, 1e-5);
  EXPECT_NEAR(analysis->tensors(1).dominance_ratio_max(), 3.0 / ((1 + 2 + 0.5 + 1) / 4.0), 1e-5);
  EXPECT_NEAR(analysis->tensors(1).ns_small_sv_fraction(), 4.0 / 5.0, 1e-12);
  EXPECT_NEAR(analysis->tensors(1).stable_rank_momentum(), 1.0, 1e-6);

  // The service metrics of what this test did.
  int64_t elements = 0;
  for (const auto& [g, shape] : inputs) elements += static_cast<int64_t>(g.size());
  EXPECT_EQ(exposition.Get("optd_rpc_total", {{"method", "CreateSession"}, {"code", "OK"}}), 1);
  // The step fits one message: StepSmall (StepOptions::path kAuto).
  EXPECT_EQ(exposition.Get("optd_rpc_total", {{"method", "StepSmall"}, {"code", "OK"}}), 1);
  EXPECT_EQ(exposition.Get("optd_rpc_total", {{"method", "GetAnalysis"}, {"code", "OK"}}), 1);
  EXPECT_EQ(exposition.Get("optd_bytes_received_total"), 4.0 * elements);
  // The step's result (parameters) and GetParams.
  EXPECT_EQ(exposition.Get("optd_bytes_sent_total"), 2 * 4.0 * elements);
  EXPECT_EQ(exposition.Get("optd_step_duration_seconds_count", {{"optimizer", "moonlight"}}), 1);
  for (const char* phase : {"receive", "aggregate", "compute", "send"}) {
    EXPECT_EQ(exposition.Get("optd_step_phase_seconds_count", {{"phase", phase}}), 1) << phase;
  }
  EXPECT_EQ(exposition.Get("optd_sessions"), 1);
  EXPECT_EQ(
      exposition.Get("optd_backend_info", {{"backend", std::string(server_->backend().name())},
                                           {"device", server_->backend().description()}}),
      1);
  EXPECT_EQ(exposition.CountWithLabel("backend", std::string(server_->backend().name())), 1);
  // DESIGN.md's optd_build_info{version}; the version is CMake's project version.
  EXPECT_EQ(exposition.Get("optd_build_info", {{"version", OPTD_VERSION}}), 1);
  absl::StatusOr<v1::SessionInfo> info = session->Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(exposition.Get("optd_backend_memory_bytes", {{"kind", "sessions"}}),
            info->state_bytes());
  EXPECT_EQ(exposition.Get("optd_session_memory_bytes", {{"session", "figures"}}),
            info->state_bytes());
  EXPECT_EQ(exposition.Get("optd_session_memory_limit_bytes"),
            static_cast<double>(server::SessionManagerOptions().max_session_bytes));
  EXPECT_EQ(exposition.Get("optd_session_step", {{"session", "figures"}}), 1);
  EXPECT_EQ(exposition.Get("optd_analysis_step", {{"session", "figures"}}), 1);
  EXPECT_EQ(exposition.Get("optd_analysis_duration_seconds_count"), 1);
  EXPECT_EQ(exposition.Get("optd_backend_memory_bytes", {{"kind", "analysis"}}), 0);
}

TEST_F(MetricsTest, RejectionsAreCountedByReason) {
  v1::SessionConfig config = AnalyzedConfig();
  AddTensor(config, "w", {2, 5});
  client::Client client = ConnectTo(*server_);
  absl::StatusOr<client::Session> session = client.CreateSession(config, "rejections");
  ASSERT_TRUE(session.ok());
  std::vector<float> g(10, 1.0f);
  EXPECT_EQ(session->Step(3, {{"w", g}}).status().code(), absl::StatusCode::kFailedPrecondition);
  // Step 0 of a fresh session is no retry: a wrong step too.
  EXPECT_EQ(session->Step(0, {{"w", g}}).status().code(), absl::StatusCode::kFailedPrecondition);
  client::ChannelOptions channel;
  channel.target = server_->address();
  client::Session stranger(*client::MakeChannel(channel), "rejections", "optd_0000");
  EXPECT_EQ(stranger.Info().status().code(), absl::StatusCode::kUnauthenticated);
  g[1] = g[4] = g[7] = std::nanf("");
  EXPECT_EQ(session->Step(1, {{"w", g}}).status().code(), absl::StatusCode::kInvalidArgument);
  const Exposition exposition(*server_);
  EXPECT_EQ(exposition.Get("optd_rejected_total", {{"reason", "wrong_step"}}), 2);
  EXPECT_EQ(exposition.Get("optd_rejected_total", {{"reason", "other"}}), 0);
  EXPECT_EQ(exposition.Get("optd_rejected_total", {{"reason", "unauthenticated"}}), 1);
  EXPECT_EQ(exposition.Get("optd_rejected_total", {{"reason", "nonfinite"}}), 1);
  EXPECT_EQ(exposition.Get("optd_nonfinite_gradients_total", {{"session", "rejections"}}), 3);
  EXPECT_EQ(
      exposition.Get("optd_rpc_total", {{"method", "StepSmall"}, {"code", "FAILED_PRECONDITION"}}),
      2);
  EXPECT_EQ(
      exposition.Get("optd_rpc_total", {{"method", "StepSmall"}, {"code", "INVALID_ARGUMENT"}}), 1);
  EXPECT_EQ(
      exposition.Get("optd_rpc_total", {{"method", "GetSession"}, {"code", "UNAUTHENTICATED"}}), 1);
}

TEST(MetricsBudgetTest, SessionsPastTheBudgetFoldIntoTheAggregate) {
  server::ServerOptions options = LoopbackOptions();
  options.metrics.tensor_label_budget = 2;
  std::unique_ptr<server::Server> server = StartServer(options);
  v1::SessionConfig config = AnalyzedConfig();
  std::vector<std::vector<float>> storage;
  std::vector<client::NamedTensor> gradients;
  for (int t = 0; t < 5; ++t) {
    AddTensor(config, absl::StrCat("layer", t), {4, 6});
    storage.push_back(Gradient(24, t, 1, 0));
  }
  for (int t = 0; t < 5; ++t) gradients.push_back({config.tensors(t).name(), storage[t]});
  client::Client client = ConnectTo(*server);
  absl::StatusOr<client::Session> session = client.CreateSession(config, "budget");
  ASSERT_TRUE(session.ok());
  ASSERT_TRUE(session->Step(1, gradients).ok());
  server->analyzer().WaitUntilIdle();
  absl::StatusOr<v1::GetAnalysisResponse> analysis = session->Analysis();
  ASSERT_TRUE(analysis.ok());
  ASSERT_EQ(analysis->tensors_size(), 5);  // GetAnalysis has every tensor
  const Exposition exposition(*server);
  for (const FigureOf& f : Figures()) {
    // Per figure and label value: two tensors and the aggregate.
    int series_per_figure = 0;
    for (const FigureOf& g : Figures()) series_per_figure += g.metric == std::string(f.metric);
    EXPECT_EQ(exposition.Count(f.metric, "budget"), 3 * series_per_figure) << f.metric;
    double sum = 0;
    for (const v1::TensorAnalysis& a : analysis->tensors()) sum += (a.*f.get)();
    EXPECT_DOUBLE_EQ(exposition.Get(f.metric, With(f.labels, "budget")), sum / 5) << f.metric;
  }
  EXPECT_EQ(exposition.CountWithLabel("tensor", "layer2"), 0);
}

TEST(MetricsSkipTest, SkippedAnalysesAreCountedByReason) {
  // A snapshot larger than the analyzer's memory is too_large; a zero momentum has no direction
  // to analyze (failed). Neither step waits or fails for it.
  server::ServerOptions options = LoopbackOptions();
  options.analyzer.max_snapshot_bytes = 100;  // a 3×4 snapshot is 3·12·4 = 144 bytes
  std::unique_ptr<server::Server> small = StartServer(options);
  v1::SessionConfig config = AnalyzedConfig();
  AddTensor(config, "w", {3, 4});
  absl::StatusOr<client::Session> session = ConnectTo(*small).CreateSession(config, "big");
  ASSERT_TRUE(session.ok());
  const std::vector<float> g = Gradient(12, 0, 1, 0);
  ASSERT_TRUE(session->Step(1, {{"w", g}}).ok());
  EXPECT_EQ(Exposition(*small).Get("optd_analysis_skipped_total", {{"reason", "too_large"}}), 1);

  std::unique_ptr<server::Server> server = StartServer(LoopbackOptions());
  session = ConnectTo(*server).CreateSession(config, "zero");
  ASSERT_TRUE(session.ok());
  ASSERT_TRUE(session->Step(1, {{"w", std::vector<float>(12, 0.0f)}}).ok());
  server->analyzer().WaitUntilIdle();
  const Exposition exposition(*server);
  EXPECT_EQ(exposition.Get("optd_analysis_skipped_total", {{"reason", "failed"}}), 1);
  EXPECT_EQ(exposition.Count("optd_analysis_step", "zero"), 0);  // nothing was published
  absl::StatusOr<v1::GetAnalysisResponse> analysis = session->Analysis();
  ASSERT_TRUE(analysis.ok());
  EXPECT_EQ(analysis->tensors_size(), 0);
}

TEST_F(MetricsTest, DeletingASessionRemovesItsSeries) {
  v1::SessionConfig config = AnalyzedConfig();
  AddTensor(config, "w", {3, 4});
  client::Client client = ConnectTo(*server_);
  absl::StatusOr<client::Session> session = client.CreateSession(config, "gone");
  ASSERT_TRUE(session.ok());
  std::vector<float> g = Gradient(12, 0, 1, 0);
  ASSERT_TRUE(session->Step(1, {{"w", g}}).ok());
  server_->analyzer().WaitUntilIdle();
  EXPECT_GT(Exposition(*server_).CountWithLabel("session", "gone"), 20);
  ASSERT_TRUE(session->Delete().ok());
  const Exposition after(*server_);
  EXPECT_EQ(after.CountWithLabel("session", "gone"), 0);
  EXPECT_EQ(after.Get("optd_sessions"), 0);
}

TEST_F(MetricsTest, AutoChoicesAreExportedPerTensorAndInGetAnalysis) {
  // direction=auto decided at every step, analysis off: "diagonal" (diag(1..6): V·Vᵀ diagonal,
  // row normalization is the polar factor) row-normalizes, "rank_one" (every row the same: r_i =
  // 1) keeps Newton–Schulz, and "both" holds one matrix of each kind.
  v1::SessionConfig config;
  v1::GroupConfig* group = config.add_groups();
  group->set_name("matrices");
  group->set_preset("keller");
  AddOverrides(*group, AutoModes(1));
  AddTensor(config, "diagonal", {6, 6});
  AddTensor(config, "rank_one", {5, 6});
  AddTensor(config, "both", {2, 5, 6});
  config.mutable_tensors(2)->set_rank_policy(v1::RANK_POLICY_BATCH);
  client::Client client = ConnectTo(*server_);
  absl::StatusOr<client::Session> session = client.CreateSession(config, "choices");
  ASSERT_TRUE(session.ok()) << session.status();
  std::vector<float> diagonal(36, 0.0f), rank_one;
  for (int i = 0; i < 6; ++i) diagonal[i * 6 + i] = static_cast<float>(i + 1);
  for (int i = 0; i < 5; ++i) rank_one.insert(rank_one.end(), {1, -2, 3, 0.5f, -1, 2});
  std::vector<float> both(diagonal.begin(), diagonal.begin() + 30);
  both.insert(both.end(), rank_one.begin(), rank_one.end());
  ASSERT_TRUE(
      session->Step(1, {{"diagonal", diagonal}, {"rank_one", rank_one}, {"both", both}}).ok());

  absl::StatusOr<v1::GetAnalysisResponse> analysis = session->Analysis();
  ASSERT_TRUE(analysis.ok());
  EXPECT_EQ(analysis->tensors_size(), 0);  // no analysis ran
  ASSERT_EQ(analysis->choices_size(), 3);
  const std::map<std::string, double> row_normalized = {
      {"diagonal", 1.0}, {"rank_one", 0.0}, {"both", 0.5}};
  const Exposition exposition(*server_);
  double steps_sum = 0, direction_sum = 0;
  for (const v1::TensorChoices& c : analysis->choices()) {
    SCOPED_TRACE(c.tensor());
    EXPECT_EQ(c.choices().decided_at_step(), 1);
    // Steps: the mean over the matrices that run Newton–Schulz (0 where none does).
    double steps = 0, rn = 0;
    for (int i = 0; i < c.choices().newton_schulz_steps_size(); ++i) {
      if (c.choices().row_normalize(i)) {
        ++rn;
      } else {
        steps += c.choices().newton_schulz_steps(i);
      }
    }
    const double n = c.choices().newton_schulz_steps_size();
    const double mean_steps = rn < n ? steps / (n - rn) : 0.0;
    EXPECT_EQ(rn / n, row_normalized.at(c.tensor()));
    EXPECT_EQ(exposition.Get("optd_direction", With({}, "choices", c.tensor())), rn / n);
    EXPECT_EQ(exposition.Get("optd_newton_schulz_steps", With({}, "choices", c.tensor())),
              mean_steps);
    steps_sum += mean_steps;
    direction_sum += rn / n;
  }
  EXPECT_DOUBLE_EQ(exposition.Get("optd_direction", With({}, "choices")), direction_sum / 3);
  EXPECT_DOUBLE_EQ(exposition.Get("optd_newton_schulz_steps", With({}, "choices")), steps_sum / 3);
  // SessionInfo carries them too, and deleting the session removes the series.
  absl::StatusOr<v1::SessionInfo> info = session->Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->tensors(2).auto_choices().row_normalize_size(), 2);
  ASSERT_TRUE(session->Delete().ok());
  EXPECT_EQ(Exposition(*server_).CountWithLabel("session", "choices"), 0);
}

TEST_F(MetricsTest, TheUpdateFiguresDoNotDependOnTheLearningRate) {
  // The step hands the analyzer the update it applies (before the learning rate): the same at
  // lr 0, 1e-7 (a warm-up's first steps) and the preset's own, from any parameters.
  v1::SessionConfig config = AnalyzedConfig();
  AddTensor(config, "w", {6, 10})->mutable_normal()->set_std(0.5);
  client::Client client = ConnectTo(*server_);
  const std::vector<float> g = Gradient(60, 0, 1, 0);
  std::vector<v1::TensorAnalysis> figures;
  for (std::optional<double> lr :
       {std::optional<double>(), std::optional<double>(1e-7), std::optional<double>(0.0)}) {
    absl::StatusOr<client::Session> session =
        client.CreateSession(config, absl::StrCat("lr", figures.size()));
    ASSERT_TRUE(session.ok());
    client::StepOptions options;
    options.lr = lr;
    ASSERT_TRUE(session->Step(1, {{"w", g}}, options).ok());
    server_->analyzer().WaitUntilIdle();
    absl::StatusOr<v1::GetAnalysisResponse> analysis = session->Analysis();
    ASSERT_TRUE(analysis.ok());
    ASSERT_EQ(analysis->tensors_size(), 1);
    figures.push_back(analysis->tensors(0));
  }
  const reference::Figures want =
      reference::AnalyzeFp64(g, MoonlightFirstUpdate(g, 6, 10), g, 6, 10);
  for (const v1::TensorAnalysis& f : figures) {
    ExpectClose(f.update_rms(), want.update_rms, "update rms");
    ExpectClose(f.stable_rank_update(), want.stable_rank_update, "update stable rank");
    ExpectClose(f.neuron_norm_cv_update(), want.neuron_norm_cv, "update row-norm cv");
    EXPECT_EQ(f.update_rms(), figures[0].update_rms());
    EXPECT_EQ(f.singular_value_entropy_update(), figures[0].singular_value_entropy_update());
  }
}

TEST(MetricsRestoreTest, RestoreDropsTheFiguresOfStepsItUndid) {
  std::unique_ptr<server::Server> server =
      StartServer(LoopbackOptions(MakeTempDir("metrics_restore_")));
  v1::SessionConfig config = AnalyzedConfig();
  AddTensor(config, "w", {3, 4});
  client::Client client = ConnectTo(*server);
  absl::StatusOr<client::Session> session = client.CreateSession(config, "undone");
  ASSERT_TRUE(session.ok());  // checkpointed at step 0
  const std::vector<float> g = Gradient(12, 0, 1, 0);
  ASSERT_TRUE(session->Step(1, {{"w", g}}).ok());
  server->analyzer().WaitUntilIdle();
  EXPECT_EQ(Exposition(*server).Get("optd_analysis_step", {{"session", "undone"}}), 1);
  absl::StatusOr<int64_t> restored = session->Restore();
  ASSERT_TRUE(restored.ok());
  EXPECT_EQ(*restored, 0);
  absl::StatusOr<v1::GetAnalysisResponse> analysis = session->Analysis();
  ASSERT_TRUE(analysis.ok());
  EXPECT_EQ(analysis->tensors_size(), 0);
  const Exposition after(*server);
  EXPECT_EQ(after.Count("optd_dominance_ratio", "undone"), 0);
  EXPECT_EQ(after.Count("optd_analysis_step", "undone"), 0);
  EXPECT_EQ(after.Get("optd_session_step", {{"session", "undone"}}), 0);
}

TEST_F(MetricsTest, AStepDoesNotWaitForTheAnalysis) {
  // Exact SVDs and Newton–Schulz of a 768×1536 momentum take the analyzer seconds, about ten of
  // its steps (bench/RESULTS.md, "Analyzer"); the step that handed it over returns meanwhile, and
  // so does the next, whose analysis is skipped. (Under ThreadSanitizer the instrumented step
  // becomes slower than the uninstrumented LAPACK analysis, and this ordering does not hold.)
  v1::SessionConfig config = AnalyzedConfig();
  AddTensor(config, "big", {768, 1536});
  client::Client client = ConnectTo(*server_);
  absl::StatusOr<client::Session> session = client.CreateSession(config, "big");
  ASSERT_TRUE(session.ok());
  const std::vector<float> g = Gradient(768 * 1536, 0, 1, 0);
  ASSERT_TRUE(session->Step(1, {{"big", g}}).ok());
  EXPECT_TRUE(server_->analyzer().busy());
  ASSERT_TRUE(session->Step(2, {{"big", g}}).ok());
  // Step 2 came while step 1's analysis ran: its analysis is skipped, not queued behind it.
  EXPECT_TRUE(server_->analyzer().busy());
  server_->analyzer().WaitUntilIdle();
  absl::StatusOr<v1::GetAnalysisResponse> analysis = session->Analysis();
  ASSERT_TRUE(analysis.ok());
  ASSERT_EQ(analysis->tensors_size(), 1);
  EXPECT_EQ(analysis->tensors(0).step(), 1);
  const Exposition exposition(*server_);
  EXPECT_EQ(exposition.Get("optd_analysis_skipped_total", {{"reason", "busy"}}), 1);
}

// The analyzer's thread yields to every other: SCHED_IDLE (and nice 19), so that a step's reply,
// and the client waiting for it, preempt an analysis at once (bench/RESULTS.md's main job: the
// steps after an analysis had p99 at 4x the median before).
TEST_F(MetricsTest, TheAnalyzerThreadRunsAtIdlePriority) {
  // Each optd-analyzer thread's nice value and policy, from /proc/<tid>/stat ("tid (comm) state
  // ..."; nice is field 19 and policy field 41).
  struct Seen {
    std::string nice, policy, stat;
  };
  const auto scan = [] {
    std::vector<Seen> seen;
    for (const auto& entry : std::filesystem::directory_iterator("/proc/self/task")) {
      std::ifstream comm(entry.path() / "comm");
      std::string name;
      std::getline(comm, name);
      if (name != "optd-analyzer") continue;
      std::ifstream stat_file(entry.path() / "stat");
      const std::string stat((std::istreambuf_iterator<char>(stat_file)),
                             std::istreambuf_iterator<char>());
      std::istringstream fields(stat.substr(stat.rfind(')') + 2));
      std::vector<std::string> f((std::istream_iterator<std::string>(fields)),
                                 std::istream_iterator<std::string>());
      seen.push_back(f.size() >= 39 ? Seen{f[19 - 3], f[41 - 3], stat} : Seen{"", "", stat});
    }
    return seen;
  };
  // The thread names itself and lowers its priority as it starts, which may be after the daemon
  // is up: wait (bounded) for it to have done both.
  const std::string idle = std::to_string(SCHED_IDLE);
  std::vector<Seen> seen = scan();
  for (const absl::Time deadline = absl::Now() + absl::Seconds(30);
       !(seen.size() == 1 && seen[0].nice == "19" && seen[0].policy == idle) &&
       absl::Now() < deadline;
       seen = scan()) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_EQ(seen.size(), 1u) << "threads named optd-analyzer";
  EXPECT_EQ(seen[0].nice, "19") << "nice, in " << seen[0].stat;
  EXPECT_EQ(seen[0].policy, idle) << "policy, in " << seen[0].stat;
}

TEST(MetricsEstimateTest, MatricesPastTheExactLimitGetTheStatedEstimates) {
  // A 40×60 momentum past an exact limit of 16: the dominance ratios, row-norm CV, update RMS
  // and gradient norm stay exact; the spectrum figures are estimates within kernels/analysis.h's
  // stated errors (4 standard errors of √(2/(probes·k)) for the SLQ traces; σ_max converges).
  server::ServerOptions options = LoopbackOptions();
  options.analyzer.analysis.exact_max_dim = 16;
  std::unique_ptr<server::Server> server = StartServer(options);
  v1::SessionConfig config = AnalyzedConfig();
  AddTensor(config, "wide", {40, 60});
  client::Client client = ConnectTo(*server);
  absl::StatusOr<client::Session> session = client.CreateSession(config, "estimated");
  ASSERT_TRUE(session.ok());
  const std::vector<float> g = Gradient(40 * 60, 3, 1, 0);
  ASSERT_TRUE(session->Step(1, {{"wide", g}}).ok());
  server->analyzer().WaitUntilIdle();
  absl::StatusOr<v1::GetAnalysisResponse> analysis = session->Analysis();
  ASSERT_TRUE(analysis.ok());
  ASSERT_EQ(analysis->tensors_size(), 1);
  const v1::TensorAnalysis& got = analysis->tensors(0);
  EXPECT_TRUE(got.estimated());
  const reference::Figures want =
      reference::AnalyzeFp64(g, MoonlightFirstUpdate(g, 40, 60), g, 40, 60);
  ExpectClose(got.dominance_ratio_min(), want.dominance_min, "dominance min");
  ExpectClose(got.dominance_ratio_max(), want.dominance_max, "dominance max");
  ExpectClose(got.neuron_norm_cv_update(), want.neuron_norm_cv, "neuron cv");
  ExpectClose(got.update_rms(), want.update_rms, "update rms");
  ExpectClose(got.grad_norm(), want.grad_norm, "grad norm");
  EXPECT_NEAR(got.stable_rank_momentum(), want.stable_rank_momentum,
              1e-3 * want.stable_rank_momentum);
  EXPECT_LE(got.condition_number_momentum(), want.condition_number_momentum * (1 + 1e-5));
  const double s = std::sqrt(2.0 / (8 * 40));
  EXPECT_NEAR(got.rmnp_muon_cosine(), want.rmnp_muon_cosine, 4 * s);
  EXPECT_NEAR(got.singular_value_entropy_momentum(), want.entropy_momentum,
              4 * s * want.entropy_momentum);
  EXPECT_NEAR(got.ns_polar_error(), want.ns_polar_error, 4 * s * want.ns_polar_error + 0.02);
}

// GET /metrics over a plain socket.
std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return "";
  }
  const std::string request =
      absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return "";
  }
  std::string response;
  char buffer[4096];
  ssize_t n;
  while ((n = read(fd, buffer, sizeof(buffer))) > 0) response.append(buffer, n);
  close(fd);
  return response;
}

TEST(MetricsExposerTest, ServesTheRegistryOverHttp) {
  server::ServerOptions options = LoopbackOptions();
  options.metrics_addr = "127.0.0.1:0";
  std::unique_ptr<server::Server> server = StartServer(options);
  ASSERT_GT(server->metrics_port(), 0);
  const std::string response = HttpGet(server->metrics_port(), "/metrics");
  EXPECT_NE(response.find("200 OK"), std::string::npos) << response.substr(0, 200);
  EXPECT_NE(response.find("# TYPE optd_sessions gauge"), std::string::npos);
  EXPECT_NE(response.find("optd_session_memory_limit_bytes"), std::string::npos);
  // The same port again cannot be bound; an address without a port is refused.
  const std::string taken = absl::StrCat("127.0.0.1:", server->metrics_port());
  EXPECT_EQ(server::MetricsHttpServer::Start(taken, server->metrics().registry()).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(
      server::MetricsHttpServer::Start("localhost", server->metrics().registry()).status().code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(server::MetricsHttpServer::Start("no.such.host.invalid:0", server->metrics().registry())
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  // Anything but /metrics is 404; HEAD has no body.
  EXPECT_NE(HttpGet(server->metrics_port(), "/other").find("404 Not Found"), std::string::npos);
}

TEST(MetricsOptionsTest, BadMetricsAndAnalyzerSettingsStopStartUp) {
  server::ServerOptions budget = LoopbackOptions();
  budget.metrics.tensor_label_budget = -1;
  absl::StatusOr<std::unique_ptr<server::Server>> started = server::Server::Start(budget);
  ASSERT_EQ(started.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(started.status().message().find("--metrics_tensor_budget"), std::string::npos);
  server::ServerOptions exact = LoopbackOptions();
  exact.analyzer.analysis.exact_max_dim = -1;
  started = server::Server::Start(exact);
  ASSERT_EQ(started.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(started.status().message().find("exact_max_dim"), std::string::npos);
  server::ServerOptions address = LoopbackOptions();
  address.metrics_addr = "no-port";
  EXPECT_EQ(server::Server::Start(address).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(MetricsExposerTest, AStallingClientDoesNotHoldUpScrapes) {
  absl::StatusOr<std::unique_ptr<server::MetricsHttpServer>> http =
      server::MetricsHttpServer::Start("localhost:0", std::make_shared<prometheus::Registry>());
  ASSERT_TRUE(http.ok()) << http.status();
  const int port = (*http)->port();
  // A client that sends one byte of a request every 100 ms for 20 s and never finishes it.
  std::atomic<bool> dribbling{true};
  std::thread dribbler([&] {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0) {
      for (int i = 0; i < 200 && send(fd, "G", 1, MSG_NOSIGNAL) == 1; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
    close(fd);
    dribbling = false;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // it holds the server now
  // A scrape is answered once the stalled connection's deadline cuts it off, long before the
  // dribbler would have finished; "localhost" was bound on the IPv4 loopback too.
  const std::string response = HttpGet(port, "/metrics");
  EXPECT_TRUE(dribbling.load());
  EXPECT_NE(response.find("200 OK"), std::string::npos) << response;
  http->reset();  // stops while the dribbler may still be connected
  dribbler.join();
}

TEST(MetricsExposerTest, IdleConnectionsDoNotDelayAScrape) {
  // Issue 16: connections were served one at a time, 2 s each, so five idle sockets delayed
  // every scrape by about 10 s (Prometheus's default timeout). Now a scrape is answered while
  // they are all still open: a server that waited them out would have closed them first.
  absl::StatusOr<std::unique_ptr<server::MetricsHttpServer>> http =
      server::MetricsHttpServer::Start("127.0.0.1:0", std::make_shared<prometheus::Registry>());
  ASSERT_TRUE(http.ok()) << http.status();
  const int port = (*http)->port();
  std::vector<int> idle;
  for (int i = 0; i < 5; ++i) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
    idle.push_back(fd);
  }
  const std::string response = HttpGet(port, "/metrics");
  EXPECT_NE(response.find("200 OK"), std::string::npos) << response;
  for (int fd : idle) {
    char byte;
    // Still open: no data and no end of stream yet.
    EXPECT_EQ(recv(fd, &byte, 1, MSG_DONTWAIT), -1);
    EXPECT_TRUE(errno == EAGAIN || errno == EWOULDBLOCK) << std::strerror(errno);
    close(fd);
  }
}

}  // namespace
}  // namespace optd::testing
