// optd-loadgen against an in-process daemon: its report's counts equal the daemon's own counters
// (steps, bytes, errors by code), the duration bound holds, sessions are cleaned up; and the
// pieces it is built from (model shapes with their published parameter totals, sweeps, the
// stability rule, quantiles, report comparison).
#include "client/loadgen.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "google/protobuf/util/message_differencer.h"
#include "prometheus/text_serializer.h"
#include "tests/server/certificates.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {
namespace {

using ::testing::HasSubstr;

int64_t Parameters(const std::vector<loadgen::TensorShape>& shapes) {
  int64_t total = 0;
  for (const auto& t : shapes) {
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    total += n;
  }
  return total;
}

TEST(LoadgenModelTest, PrintedModelsReadBackAsTheSameTensors) {
  // optd-loadgen --print_model writes ModelJson, which the torch GPU reference and ModelShapes
  // read.
  for (const char* model : {"gpt2-small", "gpt2-medium", "llama-1b-layer"}) {
    SCOPED_TRACE(model);
    const std::vector<loadgen::TensorShape> shapes = *loadgen::ModelShapes(model);
    const std::string path = MakeTempDir("loadgen_print_") + "/model.json";
    std::ofstream(path) << loadgen::ModelJson(shapes);
    absl::StatusOr<std::vector<loadgen::TensorShape>> back = loadgen::ModelShapes(path);
    ASSERT_TRUE(back.ok()) << back.status();
    ASSERT_EQ(back->size(), shapes.size());
    for (size_t i = 0; i < shapes.size(); ++i) {
      EXPECT_EQ((*back)[i].name, shapes[i].name);
      EXPECT_EQ((*back)[i].shape, shapes[i].shape);
      EXPECT_EQ((*back)[i].adamw, shapes[i].adamw) << shapes[i].name;
    }
  }
}

TEST(LoadgenModelTest, PresetsHaveTheirPublishedParameterCounts) {
  // GPT-2's published totals (head tied to the token embedding), and one Llama 3.2 1B layer:
  // 2·2048² (q, o) + 2·512·2048 (k, v) + 3·8192·2048 (MLP) + 2·2048 (norms).
  EXPECT_EQ(Parameters(*loadgen::ModelShapes("gpt2-small")), 124439808);
  EXPECT_EQ(Parameters(*loadgen::ModelShapes("gpt2-medium")), 354823168);
  EXPECT_EQ(Parameters(*loadgen::ModelShapes("llama-1b-layer")), 60821504);
  const std::string path = MakeTempDir("loadgen_model_") + "/model.json";
  std::ofstream(path) << R"({"tensors": [{"name": "w", "shape": [3, 4]},
      {"name": "e", "shape": [10, 4], "adamw": true}, {"name": "b", "shape": [4]}]})";
  absl::StatusOr<std::vector<loadgen::TensorShape>> shapes = loadgen::ModelShapes(path);
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  ASSERT_EQ(shapes->size(), 3u);
  EXPECT_FALSE((*shapes)[0].adamw);
  EXPECT_TRUE((*shapes)[1].adamw);
  EXPECT_TRUE((*shapes)[2].adamw);  // a vector
  // A list of tensors, and a bare list of shapes.
  std::ofstream(path) << R"([{"name": "w", "shape": [3, 4]}, {"name": "b", "shape": [4]}])";
  shapes = loadgen::ModelShapes(path);
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  EXPECT_EQ(shapes->size(), 2u);
  std::ofstream(path) << "[[768, 3072], [3072, 768], [ 768 ]]";
  shapes = loadgen::ModelShapes(path);
  ASSERT_TRUE(shapes.ok()) << shapes.status();
  ASSERT_EQ(shapes->size(), 3u);
  EXPECT_EQ((*shapes)[1].name, "t1");
  EXPECT_EQ((*shapes)[1].shape, (std::vector<int64_t>{3072, 768}));
  EXPECT_TRUE((*shapes)[2].adamw);
  for (const char* bad : {"[[[768, 3072]]]", "[[1, 2], 7]", "[[1, 2]] [[9, 9]]", "[[1, 2]",
                          "[[0, 4]]", "[[1.5, 2]]", "[]", R"([{"name": "s", "shape": []}])"}) {
    std::ofstream(path) << bad;
    EXPECT_EQ(loadgen::ModelShapes(path).status().code(), absl::StatusCode::kInvalidArgument)
        << bad;
  }
  EXPECT_EQ(loadgen::ModelShapes("gpt3").status().code(), absl::StatusCode::kInvalidArgument);
  std::ofstream(path) << "{\"tensors\": 5}";
  EXPECT_EQ(loadgen::ModelShapes(path).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(LoadgenSweepTest, ParsesLevelsAndRejectsNonsense) {
  EXPECT_EQ(*loadgen::ParseSweep("4"), std::vector<int>{4});
  EXPECT_EQ(*loadgen::ParseSweep("1:16:x2"), (std::vector<int>{1, 2, 4, 8, 16}));
  EXPECT_EQ(*loadgen::ParseSweep("2:8:+3"), (std::vector<int>{2, 5, 8}));
  for (const char* bad : {"0", "x", "4:2:x2", "1:8:x1", "1:8:*2", "1:8", "-1", "1:2147483647:x2",
                          "1:4096:+1", "5000", "2147483000:2147483647:+1000"}) {
    EXPECT_EQ(loadgen::ParseSweep(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(LoadgenMeasureTest, StabilityRuleAndQuantiles) {
  EXPECT_TRUE(loadgen::WindowsAgree({10, 100, 104, 96}, 3, 0.1));
  EXPECT_FALSE(loadgen::WindowsAgree({100, 104, 80}, 3, 0.1));
  EXPECT_FALSE(loadgen::WindowsAgree({100, 100}, 3, 0.1));  // too few windows
  EXPECT_FALSE(loadgen::WindowsAgree({0, 0, 0}, 3, 0.1));   // nothing ran
  std::vector<double> sorted;
  for (int i = 1; i <= 1000; ++i) sorted.push_back(i);
  EXPECT_EQ(loadgen::Quantile(sorted, 0.5), 500);
  EXPECT_EQ(loadgen::Quantile(sorted, 0.99), 990);
  EXPECT_EQ(loadgen::Quantile(sorted, 0.999), 999);
  EXPECT_EQ(loadgen::Quantile(sorted, 1.0), 1000);
  EXPECT_EQ(loadgen::Quantile({}, 0.5), 0);
}

// The series `name{labels}` in the daemon's exposition, 0 when absent.
double Counter(server::Server& server, const std::string& series) {
  const std::string text =
      prometheus::TextSerializer().Serialize(server.metrics().registry()->Collect());
  const size_t at = text.find("\n" + series + " ");
  return at == std::string::npos ? 0 : std::stod(text.substr(at + series.size() + 2));
}

class LoadgenRunTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server::ServerOptions options = LoopbackOptions();
    options.metrics_addr = "127.0.0.1:0";
    server_ = StartServer(options);
    ASSERT_NE(server_, nullptr);
    model_ = MakeTempDir("loadgen_") + "/model.json";
    std::ofstream(model_) << R"({"tensors": [{"name": "w1", "shape": [48, 64]},
        {"name": "w2", "shape": [64, 48]}, {"name": "b", "shape": [64]}]})";
  }
  // One level of one session of two workers stepping on `path` for two windows, its report.
  absl::StatusOr<v1::LoadgenReport> RunTwoWorkers(client::StepPath path) const {
    loadgen::Options o = Options();
    o.world_size = 2;
    o.step_path = path;
    o.max_windows = 2;
    o.stable_windows = 100;
    return loadgen::Run(o, {1});
  }
  loadgen::Options Options() const {
    loadgen::Options o;
    o.endpoints = {server_->address()};
    o.metrics = {absl::StrCat("127.0.0.1:", server_->metrics_port())};
    o.model = model_;
    o.window = absl::Milliseconds(200);
    o.duration = absl::Seconds(5);
    return o;
  }
  std::unique_ptr<server::Server> server_;
  std::string model_;
};

TEST_F(LoadgenRunTest, OneMessageStepsAreStepSmallCallsWithTheSameCounts) {
  // --step_path=small: every step is one StepSmall call, with what Step would have carried.
  absl::StatusOr<v1::LoadgenReport> report = RunTwoWorkers(client::StepPath::kSmall);
  ASSERT_TRUE(report.ok()) << report.status();
  const v1::LoadgenLevel& level = report->levels(0);
  EXPECT_GT(level.steps(), 0);
  EXPECT_EQ(level.total_errors(), 0);
  EXPECT_EQ(level.total_steps(),
            Counter(*server_, R"(optd_rpc_total{code="OK",method="StepSmall"})"));
  EXPECT_EQ(Counter(*server_, R"(optd_rpc_total{code="OK",method="Step"})"), 0);
  EXPECT_EQ(level.total_bytes_sent(), Counter(*server_, "optd_bytes_received_total"));
  EXPECT_EQ(level.total_bytes_received(), Counter(*server_, "optd_bytes_sent_total"));
  EXPECT_GT(level.server_phase_seconds().at("compute"), 0);
}

TEST_F(LoadgenRunTest, SharedMemoryStepsAreStepSmallCallsWithoutWireBytes) {
  // --step_path=shared: every worker attaches its region, and every step is one StepSmall call
  // whose tensors go through it, none over the wire.
  absl::StatusOr<v1::LoadgenReport> report = RunTwoWorkers(client::StepPath::kShared);
  ASSERT_TRUE(report.ok()) << report.status();
  const v1::LoadgenLevel& level = report->levels(0);
  EXPECT_GT(level.steps(), 0);
  EXPECT_EQ(level.total_errors(), 0);
  EXPECT_EQ(level.total_steps(),
            Counter(*server_, R"(optd_rpc_total{code="OK",method="StepSmall"})"));
  EXPECT_EQ(Counter(*server_, R"(optd_rpc_total{code="OK",method="AttachSharedMemory"})"), 2);
  EXPECT_EQ(Counter(*server_, "optd_bytes_received_total"), 0);
  EXPECT_EQ(Counter(*server_, "optd_bytes_sent_total"), 0);
}

TEST_F(LoadgenRunTest, CountsAgreeWithTheDaemonsOwnAndSessionsAreDeleted) {
  loadgen::Options o = Options();
  o.step_path = client::StepPath::kStream;  // the streamed RPC (StepSmall's test is above)
  o.world_size = 2;
  o.inject_bad_every = 3;
  o.max_error_rate = 0.5;
  o.max_windows = 4;
  o.stable_windows = 100;  // never stable: the level runs its four windows
  absl::StatusOr<v1::LoadgenReport> report = loadgen::Run(o, {2});
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->levels_size(), 1);
  const v1::LoadgenLevel& level = report->levels(0);
  EXPECT_EQ(level.window_steps_per_second_size(), 4);
  EXPECT_GT(level.steps(), 0);
  // Everything the level sent, against what the daemon counted.
  EXPECT_EQ(level.total_steps(), Counter(*server_, R"(optd_rpc_total{code="OK",method="Step"})"));
  EXPECT_EQ(level.total_errors(),
            Counter(*server_, R"(optd_rpc_total{code="FAILED_PRECONDITION",method="Step"})"));
  EXPECT_GT(level.total_errors(), 0);
  EXPECT_EQ(level.errors(), level.errors_by_code().at("FAILED_PRECONDITION"));
  EXPECT_EQ(level.total_bytes_sent(), Counter(*server_, "optd_bytes_received_total"));
  EXPECT_EQ(level.total_bytes_received(), Counter(*server_, "optd_bytes_sent_total"));
  EXPECT_EQ(level.total_bytes_sent(), level.total_steps() * 4 * (48 * 64 * 2 + 64));
  // Measured figures are a subset, with their percentiles in order, and the server's phases.
  EXPECT_LE(level.steps(), level.total_steps());
  EXPECT_LE(level.latency_p50_s(), level.latency_p99_s());
  EXPECT_LE(level.latency_p99_s(), level.latency_max_s());
  EXPECT_GT(level.server_phase_seconds().at("compute"), 0);
  // Per session: its own steps add up to the level's, and the spread is the farthest session's
  // distance from their mean rate.
  ASSERT_EQ(level.sessions_size(), 2);
  int64_t session_steps = 0;
  double mean = 0;
  for (const v1::LoadgenSession& s : level.sessions()) {
    session_steps += s.steps();
    mean += s.steps_per_second() / 2;
    EXPECT_GT(s.steps(), 0);
    EXPECT_NEAR(s.steps_per_second(), s.steps() / level.seconds(), 1e-9);
    EXPECT_LE(s.latency_p50_s(), s.latency_p99_s());
    EXPECT_LE(s.latency_p99_s(), level.latency_max_s());
  }
  EXPECT_EQ(session_steps, level.steps());
  EXPECT_NEAR(level.fairness_spread(), std::abs(level.sessions(0).steps_per_second() - mean) / mean,
              1e-9);
  EXPECT_THAT(loadgen::ToTable(*report), HasSubstr("per session: steps/s"));
  EXPECT_FALSE(level.stable());
  EXPECT_FALSE(report->ok());
  // Cleaned up.
  absl::StatusOr<std::vector<v1::SessionInfo>> left = ConnectTo(*server_).ListSessions();
  ASSERT_TRUE(left.ok());
  EXPECT_TRUE(left->empty());
  // The report survives JSON, and the CSV has a row per level.
  absl::StatusOr<v1::LoadgenReport> back = loadgen::FromJson(loadgen::ToJson(*report));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(*back, *report));
  const std::string csv = loadgen::ToCsv(*report);
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 2);
  EXPECT_THAT(loadgen::ToTable(*report), HasSubstr("FAILED_PRECONDITION="));
}

TEST_F(LoadgenRunTest, ShardedSessionsStepEveryInstanceOncePerStep) {
  std::unique_ptr<server::Server> second = StartServer(LoopbackOptions());
  ASSERT_NE(second, nullptr);
  loadgen::Options o = Options();
  o.endpoints.push_back(second->address());
  o.metrics.clear();
  o.sharded = true;
  o.max_steps = 12;
  o.stable_windows = 100;
  absl::StatusOr<v1::LoadgenReport> report = loadgen::Run(o, {2});
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->sharded());
  const v1::LoadgenLevel& level = report->levels(0);
  EXPECT_GT(level.total_steps(), 0);
  EXPECT_EQ(level.total_errors(), 0);
  // Placement gives each instance one of the two matrices: every logical step is one StepSmall
  // call on each (each part fits one message), and the gradient bytes split between them.
  const std::string ok_steps = R"(optd_rpc_total{code="OK",method="StepSmall"})";
  EXPECT_EQ(Counter(*server_, ok_steps), level.total_steps());
  EXPECT_EQ(Counter(*second, ok_steps), level.total_steps());
  EXPECT_EQ(Counter(*server_, "optd_bytes_received_total") +
                Counter(*second, "optd_bytes_received_total"),
            level.total_bytes_sent());
  const double a = Counter(*server_, "optd_bytes_received_total"),
               b = Counter(*second, "optd_bytes_received_total");
  EXPECT_EQ(std::min(a, b), level.total_steps() * 4 * (48 * 64));
  EXPECT_EQ(std::max(a, b), level.total_steps() * 4 * (48 * 64 + 64));
  EXPECT_TRUE(ConnectTo(*server_).ListSessions()->empty());
  EXPECT_TRUE(ConnectTo(*second).ListSessions()->empty());
}

TEST_F(LoadgenRunTest, TheDurationBoundHolds) {
  loadgen::Options o = Options();
  o.duration = absl::Milliseconds(600);
  o.stable_windows = 100;
  o.max_windows = 1000;
  absl::StatusOr<v1::LoadgenReport> report = loadgen::Run(o, {1});
  ASSERT_TRUE(report.ok()) << report.status();
  // Measuring stops at the bound; the steps in flight then finish unmeasured.
  EXPECT_LE(report->levels(0).seconds(), 0.6 + 0.25);
  EXPECT_GT(report->levels(0).steps(), 0);
}

TEST_F(LoadgenRunTest, OpenLoopStartsStepsAtTheRate) {
  loadgen::Options o = Options();
  o.arrival = loadgen::Arrival::kPoisson;
  o.rate = 40;
  o.concurrency = 4;
  o.duration = absl::Seconds(2);
  o.window = absl::Milliseconds(500);
  o.stable_windows = 100;
  absl::StatusOr<v1::LoadgenReport> report = loadgen::Run(o, {4});
  ASSERT_TRUE(report.ok()) << report.status();
  const v1::LoadgenLevel& level = report->levels(0);
  EXPECT_EQ(level.arrival(), "poisson");
  // About rate × seconds arrivals were due; the daemon keeps up with this tiny model, so the
  // steps done are near that (Poisson's spread over ~80 arrivals is about ±20%).
  const double due = o.rate * level.seconds();
  EXPECT_GT(level.steps(), 0.4 * due);
  EXPECT_LT(level.steps(), 1.6 * due);
  EXPECT_EQ(level.total_steps(),
            Counter(*server_, R"(optd_rpc_total{code="OK",method="StepSmall"})"));
}

TEST_F(LoadgenRunTest, AnOpenLoopTheServerCannotKeepUpWithIsOverloaded) {
  // Far more arrivals than one session can start: most are still waiting at the end, and the
  // level says so instead of reporting what the server managed as the answer.
  loadgen::Options o = Options();
  o.arrival = loadgen::Arrival::kConstant;
  o.rate = 100000;
  o.duration = absl::Seconds(1);
  o.window = absl::Milliseconds(250);
  absl::StatusOr<v1::LoadgenReport> report = loadgen::Run(o, {1});
  ASSERT_TRUE(report.ok()) << report.status();
  const v1::LoadgenLevel& level = report->levels(0);
  EXPECT_TRUE(level.overloaded());
  EXPECT_GT(level.unstarted(), level.intended_starts() / 2);
  EXPECT_FALSE(report->ok());
}

TEST(LoadgenRetryTest, RefusedWorkersRetrySoTheirPartnersAreNotLeftWaiting) {
  // Two sessions of two workers against a daemon that admits three step streams at once: a
  // refused worker retries its step instead of leaving its partner waiting for the straggler
  // timeout, so the level ends at its bound with every refusal counted.
  server::ServerOptions options = LoopbackOptions();
  options.service.max_pending_steps = 3;
  std::unique_ptr<server::Server> server = StartServer(options);
  ASSERT_NE(server, nullptr);
  const std::string model = MakeTempDir("loadgen_retry_") + "/model.json";
  std::ofstream(model) << R"({"tensors": [{"name": "w", "shape": [64, 64]}]})";
  loadgen::Options o;
  o.endpoints = {server->address()};
  o.model = model;
  o.world_size = 2;
  o.max_error_rate = 1;
  o.duration = absl::Seconds(1);
  o.window = absl::Milliseconds(250);
  const absl::Time start = absl::Now();
  absl::StatusOr<v1::LoadgenReport> report = loadgen::Run(o, {2});
  ASSERT_TRUE(report.ok()) << report.status();
  // Without the retries a refused worker's partner waits 60 s (the straggler timeout).
  EXPECT_LT(absl::Now() - start, absl::Seconds(30));
  EXPECT_GT(report->levels(0).steps(), 0);
  EXPECT_EQ(report->levels(0).errors_by_code().count("ABORTED"), 0u);
}

TEST(LoadgenCompareTest, FlagsRegressionsBeyondTheThreshold) {
  v1::LoadgenReport base, same, slower;
  auto add = [](v1::LoadgenReport& r, int concurrency, double steps_per_second, double p99) {
    v1::LoadgenLevel* l = r.add_levels();
    l->set_arrival("closed");
    l->set_concurrency(concurrency);
    l->set_steps_per_second(steps_per_second);
    l->set_latency_p99_s(p99);
  };
  add(base, 1, 100, 0.010);
  add(base, 4, 300, 0.020);
  add(same, 1, 96, 0.0105);
  add(same, 4, 310, 0.019);
  add(slower, 1, 100, 0.010);
  add(slower, 4, 240, 0.020);
  bool regressed = true;
  std::string text = loadgen::Compare(base, same, 0.1, &regressed);
  EXPECT_FALSE(regressed) << text;
  text = loadgen::Compare(base, slower, 0.1, &regressed);
  EXPECT_TRUE(regressed);
  EXPECT_THAT(text, HasSubstr("REGRESSION"));
  // The binary: exit 1 on a regression, 0 without.
  const std::string dir = MakeTempDir("loadgen_compare_");
  std::ofstream(dir + "/base.json") << loadgen::ToJson(base);
  std::ofstream(dir + "/slower.json") << loadgen::ToJson(slower);
  const std::string command = absl::StrCat("'", OPTD_LOADGEN_PATH, "' compare '", dir,
                                           "/base.json' '", dir, "/slower.json' >/dev/null");
  EXPECT_EQ(WEXITSTATUS(std::system(command.c_str())), 1);
  const std::string self = absl::StrCat("'", OPTD_LOADGEN_PATH, "' compare '", dir, "/base.json' '",
                                        dir, "/base.json' >/dev/null");
  EXPECT_EQ(WEXITSTATUS(std::system(self.c_str())), 0);
}

TEST(LoadgenBinaryTest, HelpDocumentsEveryFlag) {
  std::ifstream source(absl::StrCat(OPTD_SOURCE_DIR, "/client/loadgen_main.cc"));
  std::stringstream text;
  text << source.rdbuf();
  const std::string dir = MakeTempDir("loadgen_help_");
  const std::string help = dir + "/help.txt";
  std::system(absl::StrCat("'", OPTD_LOADGEN_PATH, "' --help >'", help, "' 2>&1").c_str());
  std::ifstream in(help);
  std::stringstream printed;
  printed << in.rdbuf();
  int flags = 0;
  const std::string code = text.str();
  for (size_t at = code.find("ABSL_FLAG("); at != std::string::npos;
       at = code.find("ABSL_FLAG(", at + 1)) {
    const size_t comma = code.find(',', at);
    const size_t name_end = code.find(',', comma + 1);
    std::string name = code.substr(comma + 1, name_end - comma - 1);
    name.erase(0, name.find_first_not_of(' '));
    EXPECT_THAT(printed.str(), HasSubstr("--" + name + " ")) << name;
    ++flags;
  }
  EXPECT_GE(flags, 25);
  // Bad usage exits 2 and says what is wrong.
  const std::string bad =
      absl::StrCat("'", OPTD_LOADGEN_PATH, "' --wire_dtype=fp64 2>'", dir, "/err.txt'");
  EXPECT_EQ(WEXITSTATUS(std::system(bad.c_str())), 2);
  std::ifstream err(dir + "/err.txt");
  std::stringstream message;
  message << err.rdbuf();
  EXPECT_THAT(message.str(), HasSubstr("--wire_dtype"));
}

// Against two daemons that require mutual TLS: the same TLS settings as optctl, sessions spread
// over the endpoints, and each daemon's counters adding up to the report's.
TEST(LoadgenTlsTest, MutualTlsEndpointsShareTheSessions) {
  Certificates certs;
  ASSERT_TRUE(certs.ok());
  std::vector<std::unique_ptr<server::Server>> servers;
  loadgen::Options o;
  o.endpoints.clear();
  for (int i = 0; i < 2; ++i) {
    server::ServerOptions options = LoopbackOptions();
    options.metrics_addr = "127.0.0.1:0";
    options.tls_cert = certs.path("server.pem");
    options.tls_key = certs.path("server.key");
    options.tls_client_ca = certs.path("ca.pem");
    servers.push_back(StartServer(options));
    ASSERT_NE(servers.back(), nullptr);
    o.endpoints.push_back(servers.back()->address());
    o.metrics.push_back(absl::StrCat("127.0.0.1:", servers.back()->metrics_port()));
  }
  const std::string model = MakeTempDir("loadgen_tls_") + "/model.json";
  std::ofstream(model) << R"({"tensors": [{"name": "w", "shape": [32, 48]}]})";
  o.model = model;
  o.channel.tls_ca = certs.path("ca.pem");
  o.window = absl::Milliseconds(200);
  o.max_windows = 2;
  o.stable_windows = 100;
  // Without a client certificate the daemons refuse the connection: the level reports why.
  absl::StatusOr<v1::LoadgenReport> refused = loadgen::Run(o, {2});
  ASSERT_TRUE(refused.ok()) << refused.status();
  EXPECT_FALSE(refused->ok());
  EXPECT_THAT(refused->levels(0).error(), HasSubstr("creating a session on"));
  o.channel.tls_cert = certs.path("client.pem");
  o.channel.tls_key = certs.path("client.key");
  absl::StatusOr<v1::LoadgenReport> report = loadgen::Run(o, {2});
  ASSERT_TRUE(report.ok()) << report.status();
  const std::string ok_steps = R"(optd_rpc_total{code="OK",method="StepSmall"})";
  const double first = Counter(*servers[0], ok_steps), second = Counter(*servers[1], ok_steps);
  EXPECT_GT(first, 0);
  EXPECT_GT(second, 0);
  EXPECT_EQ(report->levels(0).total_steps(), first + second);
}

TEST_F(LoadgenRunTest, AnInterruptedRunStillDeletesItsSessions) {
  // SIGINT once its three sessions exist: it reports what it measured, exits 130, and the daemon
  // holds no session of it.
  const std::string dir = MakeTempDir("loadgen_interrupt_");
  const std::string command = absl::StrCat(
      "sh -c \"'", OPTD_LOADGEN_PATH, "' --server=", server_->address(), " --model=", model_,
      " --concurrency=3 --duration_s=30 --window_s=0.2 --stable_windows=100 --max_windows=1000",
      " >/dev/null 2>&1 & echo \\$! >'", dir, "/pid'; wait \\$!; echo \\$? >'", dir, "/rc'\" &");
  ASSERT_EQ(std::system(command.c_str()), 0);
  client::Client client = ConnectTo(*server_);
  for (int i = 0; i < 600; ++i) {
    absl::StatusOr<std::vector<v1::SessionInfo>> sessions = client.ListSessions();
    if (sessions.ok() && sessions->size() == 3) break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  int pid = 0;
  std::ifstream(dir + "/pid") >> pid;
  ASSERT_GT(pid, 0);
  ASSERT_EQ(kill(pid, SIGINT), 0);
  int rc = -1;
  for (int i = 0; i < 1200 && rc < 0; ++i) {
    absl::SleepFor(absl::Milliseconds(50));
    std::ifstream(dir + "/rc") >> rc;
  }
  EXPECT_EQ(rc, 130);
  absl::StatusOr<std::vector<v1::SessionInfo>> left = client.ListSessions();
  ASSERT_TRUE(left.ok());
  EXPECT_TRUE(left->empty());
  EXPECT_EQ(Counter(*server_, R"(optd_rpc_total{code="OK",method="DeleteSession"})"), 3);
}

}  // namespace
}  // namespace optd::testing
