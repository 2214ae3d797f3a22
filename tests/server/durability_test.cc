// Nothing is lost: kill -9 at random points restarts from the last complete checkpoint, injected
// write/fsync/rename failures never corrupt an existing checkpoint, SIGTERM drains and
// checkpoints, idle sessions unload and reload, a restarted daemon resumes every session, and a
// full step queue answers UNAVAILABLE.
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "prometheus/metric_family.h"
#include "server/auth.h"
#include "server/checkpoint_file.h"
#include "tests/server/daemon_process.h"
#include "tests/server/fake_clock.h"
#include "tests/server/fault_injection_file_system.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {
namespace {

using ::testing::HasSubstr;

// The optd binary in a child process, on a state directory.
class Daemon : public DaemonProcess {
 public:
  Daemon(const std::string& state_dir, std::vector<std::string> extra = {})
      : DaemonProcess(OPTD_PATH, absl::StrCat(state_dir, "/../", std::to_string(getpid()), ".port"),
                      Flags(state_dir, std::move(extra))) {}

 private:
  static std::vector<std::string> Flags(const std::string& state_dir,
                                        std::vector<std::string> extra) {
    std::vector<std::string> flags = {"--listen=127.0.0.1:0", "--metrics_addr=", "--threads=1",
                                      absl::StrCat("--state_dir=", state_dir)};
    for (std::string& e : extra) flags.push_back(std::move(e));
    return flags;
  }
};

// A daemon on `state_dir` whose file operations go through `faulty`.
std::unique_ptr<server::Server> StartWithFaults(const std::string& state_dir,
                                                server::FaultInjectionFileSystem& faulty) {
  server::ServerOptions options = LoopbackOptions(state_dir);
  options.sessions.fs = &faulty;
  return StartServer(options);
}

// Parameters the kernels library holds after each step of a deterministic gradient stream.
class History {
 public:
  explicit History(const v1::SessionConfig& config) : reference_(config) { Record(); }

  const std::vector<std::vector<float>>& At(int64_t step) {
    while (static_cast<int64_t>(states_.size()) <= step) {
      const int64_t next = static_cast<int64_t>(states_.size());
      reference_.Step({WorkerGradients(reference_, next, 0)});
      Record();
    }
    return states_[step];
  }
  std::vector<std::vector<float>> Gradients(int64_t step) const {
    return WorkerGradients(reference_, step, 0);
  }
  const Reference& reference() const { return reference_; }

 private:
  void Record() {
    std::vector<std::vector<float>> state;
    for (int t = 0; t < reference_.num_tensors(); ++t) state.push_back(reference_.Parameters(t));
    states_.push_back(std::move(state));
  }
  Reference reference_;
  std::vector<std::vector<std::vector<float>>> states_;
};

void ExpectState(client::Session& session, History& history, int64_t step,
                 const std::string& what) {
  absl::StatusOr<std::map<std::string, std::vector<float>>> got = session.GetParameters();
  ASSERT_TRUE(got.ok()) << what << ": " << got.status();
  const auto& expected = history.At(step);
  for (int t = 0; t < history.reference().num_tensors(); ++t) {
    EXPECT_TRUE(BitwiseEqual(got->at(history.reference().name(t)), expected[t]))
        << what << ": tensor " << history.reference().name(t) << " is not the state of step "
        << step;
  }
}

// The matrices choose their Newton–Schulz steps and direction (ns.steps=auto, direction=auto)
// every other step: the choices are state a checkpoint, a restart and a restore must carry.
v1::SessionConfig SmallModel() {
  v1::SessionConfig config = MakeConfig(
      {{"matrices", "muoneq_row"}, {"vectors", "adamw"}},
      {{"w1", {96, 128}, "matrices"}, {"w2", {128, 96}, "matrices"}, {"b", {128}, "vectors"}});
  for (v1::GroupConfig& g : *config.mutable_groups()) {
    if (g.name() == "matrices") AddOverrides(g, AutoModes(2));
  }
  return config;
}

TEST(DurabilityTest, KillNineAtRandomPointsRestartsFromTheLastCompleteCheckpoint) {
  const std::string dir = MakeTempDir("kill9");
  const std::string state_dir = dir + "/state";
  v1::SessionConfig config = SmallModel();
  config.set_checkpoint_interval(1);
  History history(config);
  std::string id, token;
  {
    Daemon daemon(state_dir);
    absl::StatusOr<client::Session> session = daemon.Connect().CreateSession(config);
    ASSERT_TRUE(session.ok()) << session.status();
    id = session->id();
    token = session->token();
  }
  std::mt19937 random(7);
  int64_t acknowledged = 0;
  for (int round = 0; round < 25; ++round) {
    Daemon daemon(state_dir);
    client::Session session = daemon.Connect().OpenSession(id, token);
    absl::StatusOr<v1::SessionInfo> info = session.Info();
    ASSERT_TRUE(info.ok()) << "round " << round << ": " << info.status();
    const int64_t step = info->step();
    // Every acknowledged step was checkpointed before its reply; a step the kill interrupted
    // may or may not have been.
    EXPECT_GE(step, acknowledged) << "round " << round;
    EXPECT_LE(step, acknowledged + 1) << "round " << round;
    ExpectState(session, history, step, absl::StrCat("round ", round, " after restart"));
    acknowledged = step;
    for (int64_t s = step + 1; s <= step + 3; ++s) history.At(s);  // computed before the clock
    std::atomic<int64_t> done{step};
    std::thread driver([&, step] {
      for (int64_t s = step + 1;; ++s) {
        const auto grads = history.Gradients(s);
        if (!session.Step(s, AsNamed(history.reference(), grads)).ok()) return;
        done = s;
      }
    });
    absl::SleepFor(absl::Milliseconds(std::uniform_int_distribution<int>(0, 80)(random)));
    EXPECT_EQ(daemon.Kill(SIGKILL), -SIGKILL);
    driver.join();
    acknowledged = done.load();
  }
  EXPECT_GT(acknowledged, 25) << "too few steps ran between the kills to test anything";
}

TEST(DurabilityTest, SigtermCheckpointsAndExitsZero) {
  const std::string dir = MakeTempDir("sigterm");
  const std::string state_dir = dir + "/state";
  const v1::SessionConfig config = SmallModel();  // no periodic checkpoints
  History history(config);
  std::string id, token;
  {
    Daemon daemon(state_dir);
    absl::StatusOr<client::Session> session = daemon.Connect().CreateSession(config);
    ASSERT_TRUE(session.ok()) << session.status();
    id = session->id();
    token = session->token();
    for (int64_t s = 1; s <= 3; ++s) {
      ASSERT_TRUE(session->Step(s, AsNamed(history.reference(), history.Gradients(s))).ok());
    }
    EXPECT_EQ(daemon.Kill(SIGTERM), 0);
  }
  Daemon daemon(state_dir);
  client::Session session = daemon.Connect().OpenSession(id, token);
  EXPECT_EQ(session.Info()->step(), 3);
  ExpectState(session, history, 3, "after SIGTERM and restart");
}

TEST(DurabilityTest, ShutdownLetsAStepInFlightFinishAndRefusesNewOnes) {
  const std::string state_dir = MakeTempDir("drain");
  std::unique_ptr<server::Server> server = StartServer(LoopbackOptions(state_dir));
  client::Client c = ConnectTo(*server);
  // A step long enough to be in flight when the shutdown starts.
  const v1::SessionConfig config =
      MakeConfig({{"m", "keller"}}, {{"big", {512, 512}, "m"}, {"big2", {512, 512}, "m"}});
  client::Session session = *c.CreateSession(config);
  const v1::SessionConfig pair_config = MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}}, 2);
  client::Session pair = *c.CreateSession(pair_config);
  Reference reference(config);
  const auto grads = WorkerGradients(reference, 1, 0);
  absl::StatusOr<client::StepResult> in_flight;
  std::thread step([&] { in_flight = session.Step(1, AsNamed(reference, grads)); });
  while (server->steps_in_flight() == 0) absl::SleepFor(absl::Microseconds(100));
  absl::Status stopped;
  std::thread shutdown([&] { stopped = server->Shutdown(); });
  absl::SleepFor(absl::Milliseconds(20));
  Reference pair_reference(pair_config);
  absl::StatusOr<client::StepResult> refused =
      pair.Step(1, AsNamed(pair_reference, WorkerGradients(pair_reference, 1, 0)));
  step.join();
  shutdown.join();
  ASSERT_TRUE(in_flight.ok()) << in_flight.status();
  reference.Step({grads});
  EXPECT_TRUE(stopped.ok()) << stopped;
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
  // The restarted daemon has the step.
  server = StartServer(LoopbackOptions(state_dir));
  client::Session reopened = ConnectTo(*server).OpenSession(session.id(), session.token());
  EXPECT_EQ(reopened.Info()->step(), 1);
  absl::StatusOr<std::map<std::string, std::vector<float>>> params = reopened.GetParameters();
  ASSERT_TRUE(params.ok());
  EXPECT_TRUE(BitwiseEqual(params->at("big"), reference.Parameters(0)));
}

TEST(DurabilityTest, AFullStepQueueAnswersUnavailable) {
  server::FakeClock clock;
  server::ServerOptions options = LoopbackOptions();
  options.clock = &clock;
  options.service.max_pending_steps = 2;
  std::unique_ptr<server::Server> server = StartServer(options);
  client::Client c = ConnectTo(*server);
  v1::SessionConfig config = MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}}, 2);
  config.set_straggler_timeout_seconds(0.5);
  // Worker 0 of two sessions waits for its partner: the two places of the queue are taken.
  client::Session first = *c.CreateSession(config);
  client::Session second = *c.CreateSession(config);
  Reference reference(config);
  std::vector<absl::StatusOr<client::StepResult>> waiting(2, absl::UnknownError("not run"));
  std::vector<std::thread> workers;
  for (client::Session* s : {&first, &second}) {
    workers.emplace_back([&, s] {
      waiting[s == &second] = s->Step(1, AsNamed(reference, WorkerGradients(reference, 1, 0)));
    });
    while (s->Info()->workers_pending() != 1) absl::SleepFor(absl::Milliseconds(5));
  }
  client::StepOptions worker1;
  worker1.worker_id = 1;
  absl::StatusOr<client::StepResult> full =
      first.Step(1, AsNamed(reference, WorkerGradients(reference, 1, 1)), worker1);
  EXPECT_EQ(full.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(full.status().message()), HasSubstr("step queue is full"));
  // The waiting workers give up at the straggler timeout, which frees the queue; then a whole
  // step fits again.
  clock.Advance(absl::Milliseconds(500));
  for (std::thread& t : workers) t.join();
  for (const auto& w : waiting) EXPECT_EQ(w.status().code(), absl::StatusCode::kAborted);
  std::vector<std::vector<std::vector<float>>> grads = {WorkerGradients(reference, 1, 0),
                                                        WorkerGradients(reference, 1, 1)};
  absl::StatusOr<client::StepResult> again;
  std::thread worker0([&] { again = first.Step(1, AsNamed(reference, grads[0])); });
  while (first.Info()->workers_pending() != 1) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_TRUE(first.Step(1, AsNamed(reference, grads[1]), worker1).ok());
  worker0.join();
  EXPECT_TRUE(again.ok()) << again.status();
}

TEST(DurabilityTest, StreamsThatNeverProveWhoTheyAreTakeNoPlaceInTheStepQueue) {
  // Issue 16: Step counted against --max_pending_steps before it read the header, so header-less
  // anonymous streams made every real step answer UNAVAILABLE, and a drain waited for them.
  server::ServerOptions options = LoopbackOptions();
  options.service.max_pending_steps = 2;
  std::unique_ptr<server::Server> server = StartServer(options);
  client::Client c = ConnectTo(*server);
  const v1::SessionConfig config = MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}});
  client::Session session = *c.CreateSession(config);
  Reference reference(config);
  std::unique_ptr<v1::Optimizer::Stub> stub = v1::Optimizer::NewStub(c.channel());
  struct Idle {
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReaderWriter<v1::StepRequest, v1::StepResponse>> stream;
  };
  std::vector<std::unique_ptr<Idle>> idle;
  for (int i = 0; i < 4; ++i) {
    idle.push_back(std::make_unique<Idle>());
    idle.back()->stream = stub->Step(&idle.back()->context);
  }
  // A header with a wrong token takes no place either.
  {
    auto wrong = std::make_unique<Idle>();
    wrong->context.AddMetadata("authorization", "Bearer guess");
    wrong->stream = stub->Step(&wrong->context);
    v1::StepRequest header;
    header.mutable_header()->set_session_id(session.id());
    header.mutable_header()->set_step(1);
    // The token is checked before the header is read, so the daemon may already have ended
    // the call when the header goes out: the write may fail, the status says why.
    wrong->stream->Write(header);
    wrong->stream->WritesDone();
    EXPECT_EQ(wrong->stream->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  // A call on the same connection after them: the idle streams have reached the server.
  ASSERT_TRUE(c.ServerInfo().ok());
  EXPECT_EQ(server->steps_in_flight(), 0);
  absl::StatusOr<client::StepResult> stepped =
      session.Step(1, AsNamed(reference, WorkerGradients(reference, 1, 0)));
  EXPECT_TRUE(stepped.ok()) << stepped.status();
  EXPECT_EQ(server->steps_in_flight(), 0);
  for (auto& stream : idle) stream->context.TryCancel();
  for (auto& stream : idle) stream->stream->Finish().IgnoreError();
}

TEST(DurabilityTest, AStepWhosePeriodicCheckpointFailsIsNotAcknowledgedAsDurable) {
  // Issue 16: with checkpoint_interval=1 on a full disk, steps answered OK as if on disk,
  // nothing was logged or counted, and a killed daemon resumed at the last good step.
  const std::string state_dir = MakeTempDir("periodic");
  server::FaultInjectionFileSystem faulty(server::PosixFileSystem());
  std::unique_ptr<server::Server> server = StartWithFaults(state_dir, faulty);
  v1::SessionConfig config = SmallModel();
  config.set_checkpoint_interval(1);
  History history(config);
  client::Session session = *ConnectTo(*server).CreateSession(config);
  auto failures = [&] {
    for (const prometheus::MetricFamily& family : server->metrics().registry()->Collect()) {
      if (family.name == "optd_checkpoint_failures_total") return family.metric.at(0).counter.value;
    }
    return -1.0;
  };
  auto on_disk = [&] {
    absl::StatusOr<v1::SessionCheckpoint> meta = server::Session::ReadCheckpointMeta(
        server::PosixFileSystem(), server::Session::CheckpointPath(state_dir, session.id()));
    return meta.ok() ? meta->step() : -1;
  };
  absl::StatusOr<client::StepResult> first =
      session.Step(1, AsNamed(history.reference(), history.Gradients(1)));
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->checkpoint_step, 1);
  EXPECT_EQ(first->checkpoint_error, "");
  EXPECT_EQ(failures(), 0);

  faulty.FailAll(server::FsOp::kSync);  // the disk refuses to persist anything
  absl::StatusOr<client::StepResult> second =
      session.Step(2, AsNamed(history.reference(), history.Gradients(2)));
  ASSERT_TRUE(second.ok()) << second.status();  // committed in memory...
  EXPECT_EQ(second->checkpoint_step, 1);        // ...but not durable, and the reply says so
  EXPECT_THAT(second->checkpoint_error, HasSubstr("injected Sync failure"));
  EXPECT_EQ(failures(), 1);
  EXPECT_EQ(on_disk(), 1);
  EXPECT_EQ(session.Info()->checkpoint_step(), 1);

  faulty.ClearFailures();
  absl::StatusOr<client::StepResult> third =
      session.Step(3, AsNamed(history.reference(), history.Gradients(3)));
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(third->checkpoint_step, 3);
  EXPECT_EQ(third->checkpoint_error, "");
  EXPECT_EQ(on_disk(), 3);
  EXPECT_EQ(failures(), 1);
}

// An open Step or UploadParams stream that sends nothing: a client holding a thread.
struct IdleStream {
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReaderWriter<v1::StepRequest, v1::StepResponse>> step;
  v1::UploadParamsResponse upload_response;
  std::unique_ptr<grpc::ClientWriter<v1::UploadParamsRequest>> upload;
  grpc::Status Finish() { return step != nullptr ? step->Finish() : upload->Finish(); }
};

std::unique_ptr<IdleStream> OpenIdle(v1::Optimizer::Stub& stub, const std::string& token,
                                     bool upload) {
  auto idle = std::make_unique<IdleStream>();
  if (!token.empty()) idle->context.AddMetadata("authorization", "Bearer " + token);
  if (upload) {
    idle->upload = stub.UploadParams(&idle->context, &idle->upload_response);
  } else {
    idle->step = stub.Step(&idle->context);
  }
  return idle;
}

TEST(DurabilityTest, AnonymousStreamsAreRefusedBeforeTheyWaitForAnything) {
  // Issue 16: 140 idle anonymous UploadParams/Step streams exhausted the server's threads.
  std::unique_ptr<server::Server> server = StartServer(LoopbackOptions());
  client::Client c = ConnectTo(*server);
  std::unique_ptr<v1::Optimizer::Stub> stub = v1::Optimizer::NewStub(c.channel());
  for (const bool upload : {false, true}) {
    for (const std::string token : {"", "guess"}) {
      std::unique_ptr<IdleStream> idle = OpenIdle(*stub, token, upload);
      // Answered without a message from the client: the handler did not wait for one.
      EXPECT_EQ(idle->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED) << upload;
    }
  }
}

TEST(DurabilityTest, AStreamWithoutItsHeaderIsCutOffAtTheHeaderTimeout) {
  server::ServerOptions options = LoopbackOptions();
  options.service.stream_header_timeout = absl::Milliseconds(100);
  std::unique_ptr<server::Server> server = StartServer(options);
  client::Client c = ConnectTo(*server);
  client::Session session = *c.CreateSession(MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}}));
  std::unique_ptr<v1::Optimizer::Stub> stub = v1::Optimizer::NewStub(c.channel());
  for (const bool upload : {false, true}) {
    std::unique_ptr<IdleStream> idle = OpenIdle(*stub, session.token(), upload);
    // The server cancels it: Finish returns without the client closing its side.
    EXPECT_EQ(idle->Finish().error_code(), grpc::StatusCode::CANCELLED) << upload;
  }
  EXPECT_EQ(server->steps_in_flight(), 0);
  EXPECT_TRUE(session.Info().ok());
}

TEST(DurabilityTest, SaturatedStreamsTurnReadinessOffAndLeaveRoomForOtherCalls) {
  // Issue 16: with every thread held the health service still answered SERVING, so Kubernetes
  // never noticed, and every other call failed.
  server::ServerOptions options = LoopbackOptions();
  options.service.max_pending_steps = 2;
  options.service.max_streams = 2;
  std::unique_ptr<server::Server> server = StartServer(options);
  client::Client c = ConnectTo(*server);
  client::Session session = *c.CreateSession(MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}}));
  std::unique_ptr<v1::Optimizer::Stub> stub = v1::Optimizer::NewStub(c.channel());
  EXPECT_EQ(*c.Health(server::kServiceName), grpc::health::v1::HealthCheckResponse::SERVING);
  std::vector<std::unique_ptr<IdleStream>> idle;
  for (int i = 0; i < 2; ++i) idle.push_back(OpenIdle(*stub, session.token(), i == 1));
  auto readiness = [&] { return *c.Health(server::kServiceName); };
  for (int i = 0; i < 500 && readiness() != grpc::health::v1::HealthCheckResponse::NOT_SERVING;
       ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(readiness(), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  // A third stream is refused at once, naming the bound; unary calls are still answered.
  std::unique_ptr<IdleStream> third = OpenIdle(*stub, session.token(), false);
  const grpc::Status refused = third->Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(refused.error_message(), HasSubstr("--max_streams"));
  EXPECT_TRUE(c.ServerInfo().ok());
  EXPECT_TRUE(session.Info().ok());
  // Once they go, readiness comes back.
  for (auto& stream : idle) stream->context.TryCancel();
  for (auto& stream : idle) stream->Finish().IgnoreError();
  for (int i = 0; i < 500 && readiness() != grpc::health::v1::HealthCheckResponse::SERVING; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(readiness(), grpc::health::v1::HealthCheckResponse::SERVING);
}

// VmData of a process, in bytes (the memory RLIMIT_DATA counts).
int64_t DataBytes(pid_t pid) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    int64_t kib = 0;
    if (absl::StartsWith(line, "VmData:") &&
        absl::SimpleAtoi(absl::StripAsciiWhitespace(line.substr(7, line.size() - 10)), &kib)) {
      return kib << 10;
    }
  }
  return -1;
}

TEST(DurabilityTest, OutOfHostMemoryIsResourceExhaustedAndLeaksNoSlot) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer's operator new reports a failed allocation as a fatal error "
                  "instead of throwing std::bad_alloc";
#elif defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "ThreadSanitizer's allocator and shadow memory do not fit under the daemon's "
                  "RLIMIT_DATA, so the limit cannot single out the gradient staging";
#endif
  // Issue 16: std::bad_alloc inside Step (a daemon under an address-space limit) escaped the
  // handler, which answered UNKNOWN and never gave back its step-queue place or its staging slot:
  // the queue stayed full for good. A 256 MiB tensor whose state fits the daemon's data limit but
  // whose gradient staging does not.
  const std::string dir = MakeTempDir("oom");
  Daemon daemon(dir, {"--max_pending_steps=2"});
  client::Client c = daemon.Connect();
  const int64_t elements = int64_t{1} << 26;
  absl::StatusOr<client::Session> big =
      c.CreateSession(MakeConfig({{"m", "rmnp"}}, {{"x", {elements, 1}, "m"}}));
  ASSERT_TRUE(big.ok()) << big.status();
  client::Session small = *c.CreateSession(MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}}));
  const int64_t data = DataBytes(daemon.pid());
  ASSERT_GT(data, 0);
  // The soft limit only, so that it can be raised again without privileges.
  rlimit unlimited{};
  ASSERT_EQ(prlimit(daemon.pid(), RLIMIT_DATA, nullptr, &unlimited), 0) << std::strerror(errno);
  rlimit limit = unlimited;
  limit.rlim_cur = static_cast<rlim_t>(data + elements * 2);  // half a buffer's room
  ASSERT_EQ(prlimit(daemon.pid(), RLIMIT_DATA, &limit, nullptr), 0) << std::strerror(errno);

  std::unique_ptr<v1::Optimizer::Stub> stub = v1::Optimizer::NewStub(c.channel());
  for (int attempt = 0; attempt < 4; ++attempt) {  // more than the queue and the staging slots
    SCOPED_TRACE(attempt);
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer " + big->token());
    auto stream = stub->Step(&context);
    v1::StepRequest header;
    header.mutable_header()->set_session_id(big->id());
    header.mutable_header()->set_step(1);
    ASSERT_TRUE(stream->Write(header));
    stream->WritesDone();
    const grpc::Status status = stream->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr("no host memory")) << status.error_message();
  }
  ASSERT_EQ(prlimit(daemon.pid(), RLIMIT_DATA, &unlimited, nullptr), 0) << std::strerror(errno);
  // No queue place or staging slot was lost: both sessions step.
  const std::vector<float> g(16, 0.5f);
  EXPECT_TRUE(small.Step(1, {{"x", g}}).ok());
  absl::StatusOr<client::StepResult> stepped =
      big->Step(1, {{"x", std::vector<float>(elements, 0.5f)}});
  EXPECT_TRUE(stepped.ok()) << stepped.status();
}

TEST(DurabilityTest, InjectedWriteFailuresNeverCorruptTheLastCheckpoint) {
  const std::string state_dir = MakeTempDir("faults");
  server::FaultInjectionFileSystem faulty(server::PosixFileSystem());
  std::unique_ptr<server::Server> server = StartWithFaults(state_dir, faulty);
  const v1::SessionConfig config = SmallModel();
  History history(config);
  client::Session session = *ConnectTo(*server).CreateSession(config);
  ASSERT_TRUE(session.Step(1, AsNamed(history.reference(), history.Gradients(1))).ok());
  // Count the operations of one clean checkpoint (step 1's), then fail each in turn while
  // writing the next step's over it.
  faulty.ResetCounts();
  ASSERT_TRUE(session.Checkpoint().ok());
  std::vector<std::pair<server::FsOp, int64_t>> points;
  for (server::FsOp op : server::kAllFsOps) {
    for (int64_t i = 0; i < faulty.count(op); ++i) points.push_back({op, i});
  }
  ASSERT_GT(points.size(), 5u);
  int64_t committed = 1;
  for (const auto& [op, index] : points) {
    SCOPED_TRACE(absl::StrCat(server::FsOpName(op), " #", index));
    const int64_t step = committed + 1;
    ASSERT_TRUE(session.Step(step, AsNamed(history.reference(), history.Gradients(step))).ok());
    faulty.ResetCounts();
    faulty.FailNth(op, index);
    absl::StatusOr<v1::CheckpointResponse> written = session.Checkpoint();
    faulty.ClearFailures();
    EXPECT_FALSE(written.ok()) << "the injected failure went unnoticed";
    // The file on disk is a whole checkpoint: the last committed one, or (when only the
    // directory sync after the rename failed) the new one.
    absl::StatusOr<int64_t> restored = session.Restore();
    ASSERT_TRUE(restored.ok()) << restored.status();
    if (op == server::FsOp::kSyncDir) {
      EXPECT_TRUE(*restored == committed || *restored == step) << *restored;
    } else {
      EXPECT_EQ(*restored, committed);
    }
    ExpectState(session, history, *restored, "restored after the failure");
    committed = *restored;
  }
}

TEST(DurabilityTest, RestoreReturnsToTheCheckpointAndStepsContinueBitForBit) {
  const std::string state_dir = MakeTempDir("restore");
  std::unique_ptr<server::Server> server = StartServer(LoopbackOptions(state_dir));
  const v1::SessionConfig config = SmallModel();
  History history(config);
  client::Session session = *ConnectTo(*server).CreateSession(config);
  ASSERT_TRUE(session.Step(1, AsNamed(history.reference(), history.Gradients(1))).ok());
  ASSERT_TRUE(session.Checkpoint().ok());
  ASSERT_TRUE(session.Step(2, AsNamed(history.reference(), history.Gradients(2))).ok());
  EXPECT_EQ(*session.Restore(), 1);
  ExpectState(session, history, 1, "restored");
  absl::StatusOr<client::StepResult> again =
      session.Step(2, AsNamed(history.reference(), history.Gradients(2)));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->replayed);
  ExpectState(session, history, 2, "step 2 again");
}

TEST(DurabilityTest, ARestartedDaemonResumesEverySessionInItsStateDirectory) {
  const std::string state_dir = MakeTempDir("resume");
  const v1::SessionConfig config = SmallModel();
  History history(config);
  std::vector<client::Session> sessions;
  {
    std::unique_ptr<server::Server> server = StartServer(LoopbackOptions(state_dir));
    client::Client c = ConnectTo(*server);
    for (int i = 0; i < 3; ++i) {
      sessions.push_back(*c.CreateSession(config));
      for (int64_t s = 1; s <= i; ++s) {
        ASSERT_TRUE(
            sessions.back().Step(s, AsNamed(history.reference(), history.Gradients(s))).ok());
      }
    }
  }  // the destructor drains and checkpoints
  std::unique_ptr<server::Server> server = StartServer(LoopbackOptions(state_dir));
  client::Client c = ConnectTo(*server);
  absl::StatusOr<std::vector<v1::SessionInfo>> listed = c.ListSessions();
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->size(), 3u);
  for (int i = 0; i < 3; ++i) {
    client::Session s = c.OpenSession(sessions[i].id(), sessions[i].token());
    EXPECT_EQ(s.Info()->step(), i);
    ExpectState(s, history, i, absl::StrCat("session ", i, " resumed"));
    ASSERT_TRUE(s.Step(i + 1, AsNamed(history.reference(), history.Gradients(i + 1))).ok());
    ExpectState(s, history, i + 1, absl::StrCat("session ", i, " stepped after resuming"));
  }
  // Tokens survive the restart; other sessions' tokens still do not open them.
  EXPECT_EQ(c.OpenSession(sessions[0].id(), sessions[1].token()).Info().status().code(),
            absl::StatusCode::kPermissionDenied);
}

TEST(DurabilityTest, IdleSessionsAreCheckpointedUnloadedAndReloaded) {
  const std::string state_dir = MakeTempDir("ttl");
  server::FakeClock clock;
  server::ServerOptions options = LoopbackOptions(state_dir);
  options.clock = &clock;
  options.sessions.idle_ttl = absl::Milliseconds(200);
  std::unique_ptr<server::Server> server = StartServer(options);
  client::Client c = ConnectTo(*server);
  const v1::SessionConfig config = SmallModel();
  History history(config);
  client::Session session = *c.CreateSession(config);
  ASSERT_TRUE(session.Step(1, AsNamed(history.reference(), history.Gradients(1))).ok());
  absl::SleepFor(absl::Milliseconds(100));  // a reaper pass: used just now, it stays
  EXPECT_TRUE(c.ListSessions()->at(0).loaded());
  clock.Advance(absl::Milliseconds(200));
  bool unloaded = false;
  for (int i = 0; i < 300 && !unloaded; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
    unloaded = !c.ListSessions()->at(0).loaded();
  }
  ASSERT_TRUE(unloaded) << "the idle session was never unloaded";
  EXPECT_EQ(server->sessions().loaded_bytes(), 0);
  EXPECT_EQ(c.ListSessions()->at(0).step(), 1);
  ExpectState(session, history, 1, "reloaded");
  EXPECT_TRUE(c.ListSessions()->at(0).loaded());
  ASSERT_TRUE(session.Step(2, AsNamed(history.reference(), history.Gradients(2))).ok());
  ExpectState(session, history, 2, "stepped after reloading");
}

// Opens a Step stream and sends its header only, for tests that act while a step is mid-way.
struct OpenStep {
  OpenStep(const server::Server& server, const client::Session& session, int64_t step)
      : stub(v1::Optimizer::NewStub(ConnectTo(server).channel())) {
    context.AddMetadata("authorization", "Bearer " + session.token());
    stream = stub->Step(&context);
    v1::StepRequest request;
    request.mutable_header()->set_session_id(session.id());
    request.mutable_header()->set_step(step);
    EXPECT_TRUE(stream->Write(request));
  }
  // Sends `values` as the whole of `tensor`, half-closes and reads the reply.
  grpc::Status Finish(const std::string& tensor, const std::vector<float>& values,
                      v1::StepSummary* summary) {
    v1::StepRequest request;
    v1::TensorChunk* chunk = request.mutable_chunk();
    chunk->set_tensor(tensor);
    chunk->set_dtype(v1::DTYPE_FP32);
    chunk->set_data(
        std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float)));
    stream->Write(request);
    stream->WritesDone();
    v1::StepResponse response;
    while (stream->Read(&response)) {
      if (response.has_summary()) *summary = response.summary();
    }
    return stream->Finish();
  }

  grpc::ClientContext context;
  std::unique_ptr<v1::Optimizer::Stub> stub;
  std::unique_ptr<grpc::ClientReaderWriter<v1::StepRequest, v1::StepResponse>> stream;
};

TEST(DurabilityTest, ADeletedSessionStaysDeletedWhateverWasInFlight) {
  const std::string state_dir = MakeTempDir("deleted");
  std::unique_ptr<server::Server> server = StartServer(LoopbackOptions(state_dir));
  client::Client c = ConnectTo(*server);
  v1::SessionConfig config = MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}});
  config.set_checkpoint_interval(1);
  client::Session old_session = *c.CreateSession(config, "shared");
  OpenStep in_flight(*server, old_session, 1);
  while (server->steps_in_flight() == 0) absl::SleepFor(absl::Milliseconds(1));
  absl::SleepFor(absl::Milliseconds(100));  // past its header checks
  ASSERT_TRUE(old_session.Delete().ok());
  // The id is reused at once; the old stream then completes its gradients.
  client::Session fresh = *c.CreateSession(config, "shared");
  v1::StepSummary summary;
  const grpc::Status late = in_flight.Finish("x", std::vector<float>(16, 0.5f), &summary);
  EXPECT_EQ(late.error_code(), grpc::StatusCode::NOT_FOUND) << late.error_message();
  // Nothing of the old session reached the new one's checkpoint.
  EXPECT_EQ(*fresh.Restore(), 0);
  absl::StatusOr<v1::SessionCheckpoint> meta = server::Session::ReadCheckpointMeta(
      server::PosixFileSystem(), server::Session::CheckpointPath(state_dir, "shared"));
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_EQ(meta->token_sha256(), server::TokenDigest(fresh.token()));
  server = StartServer(LoopbackOptions(state_dir));
  client::Client after = ConnectTo(*server);
  EXPECT_TRUE(after.OpenSession("shared", fresh.token()).Info().ok());
  EXPECT_EQ(after.OpenSession("shared", old_session.token()).Info().status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(server->sessions().num_sessions(), 1);
}

TEST(DurabilityTest, AStepAcknowledgedDuringShutdownIsInTheFinalCheckpoint) {
  const std::string state_dir = MakeTempDir("late");
  server::ServerOptions options = LoopbackOptions(state_dir);
  options.drain_timeout = absl::Milliseconds(100);
  std::unique_ptr<server::Server> server = StartServer(options);
  client::Session session =
      *ConnectTo(*server).CreateSession(MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}}));
  OpenStep in_flight(*server, session, 1);
  while (server->steps_in_flight() == 0) absl::SleepFor(absl::Milliseconds(1));
  std::thread shutdown([&] { EXPECT_TRUE(server->Shutdown().ok()); });
  absl::SleepFor(absl::Milliseconds(400));  // past the drain timeout, within gRPC's grace
  v1::StepSummary summary;
  const grpc::Status status = in_flight.Finish("x", std::vector<float>(16, 0.5f), &summary);
  shutdown.join();
  // Whatever the client was told is what the restarted daemon has.
  const int64_t acknowledged = status.ok() ? summary.step() : 0;
  server = StartServer(LoopbackOptions(state_dir));
  client::Session reopened = ConnectTo(*server).OpenSession(session.id(), session.token());
  EXPECT_EQ(reopened.Info()->step(), acknowledged) << status.error_message();
}

TEST(DurabilityTest, AnUnloadedSessionWithAnUnreadableCheckpointCanStillBeDeleted) {
  const std::string state_dir = MakeTempDir("undeletable");
  server::FakeClock clock;
  server::ServerOptions options = LoopbackOptions(state_dir);
  options.clock = &clock;
  options.sessions.idle_ttl = absl::Milliseconds(100);
  std::unique_ptr<server::Server> server = StartServer(options);
  client::Session session =
      *ConnectTo(*server).CreateSession(MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}}), "gone");
  clock.Advance(absl::Milliseconds(100));
  for (int i = 0; i < 200 && server->sessions().loaded_bytes() > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(server->sessions().loaded_bytes(), 0) << "never unloaded";
  std::ofstream(state_dir + "/gone/checkpoint", std::ios::trunc) << "torn";
  EXPECT_EQ(session.Info().status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(session.Delete().ok());
  EXPECT_EQ(server->sessions().num_sessions(), 0);
}

// Issue 19: a client that goes away without deleting its session leaves it to its lease.
TEST(DurabilityTest, ASessionUnusedPastItsLeaseIsDeletedWithItsCheckpoint) {
  const std::string state_dir = MakeTempDir("leased");
  server::FakeClock clock;
  server::ServerOptions options = LoopbackOptions(state_dir);
  options.clock = &clock;
  options.sessions.idle_ttl = absl::Seconds(30);  // and one unloaded meanwhile
  std::unique_ptr<server::Server> server = StartServer(options);
  client::Client c = ConnectTo(*server);
  v1::SessionConfig leased_config = MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}});
  leased_config.set_delete_after_idle_seconds(60);
  client::Session leased = *c.CreateSession(leased_config, "leased");
  client::Session unloaded = *c.CreateSession(leased_config, "unloaded");
  client::Session kept =
      *c.CreateSession(MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}}), "kept");
  const auto ids = [&] {
    std::set<std::string> found;
    absl::StatusOr<std::vector<v1::SessionInfo>> listed = c.ListSessions();
    EXPECT_TRUE(listed.ok()) << listed.status();
    if (!listed.ok()) return found;
    for (const v1::SessionInfo& s : *listed) found.insert(s.session_id());
    return found;
  };
  // Two reaper rounds (250 ms each) at every clock reading.
  const auto settle = [] { absl::SleepFor(absl::Milliseconds(600)); };
  clock.Advance(absl::Seconds(40));  // past the idle TTL: all three are unloaded
  for (int i = 0; i < 200 && server->sessions().loaded_bytes() > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(server->sessions().loaded_bytes(), 0);
  ASSERT_TRUE(leased.Info().ok());  // a use: reloads it and starts its lease again
  clock.Advance(absl::Seconds(30));
  settle();
  // 70 s since "unloaded" was last used; 30 s since "leased" was.
  EXPECT_EQ(ids(), (std::set<std::string>{"kept", "leased"}));
  EXPECT_FALSE(server::PosixFileSystem().Exists(state_dir + "/unloaded"));
  clock.Advance(absl::Seconds(29));
  settle();
  EXPECT_EQ(ids(), (std::set<std::string>{"kept", "leased"}));
  clock.Advance(absl::Seconds(2));
  for (int i = 0; i < 100 && ids().size() > 1; ++i) absl::SleepFor(absl::Milliseconds(20));
  EXPECT_EQ(ids(), std::set<std::string>{"kept"});
  EXPECT_FALSE(server::PosixFileSystem().Exists(state_dir + "/leased"));
  EXPECT_EQ(leased.Info().status().code(), absl::StatusCode::kUnauthenticated);
  // A restart does not bring it back; "kept", without a lease, stays.
  server.reset();
  server = StartServer(LoopbackOptions(state_dir));
  EXPECT_EQ(server->sessions().num_sessions(), 1);
}

TEST(DurabilityTest, ADeleteTheStateDirectoryRefusesChangesNothing) {
  // Issue 16: on a read-only state directory DeleteSession removed the session from memory, kept
  // its checkpoint (so it came back after a restart), and answered PERMISSION_DENIED.
  const std::string state_dir = MakeTempDir("readonly");
  server::FaultInjectionFileSystem faulty(server::PosixFileSystem());
  std::unique_ptr<server::Server> server = StartWithFaults(state_dir, faulty);
  const v1::SessionConfig config = SmallModel();
  History history(config);
  client::Session session = *ConnectTo(*server).CreateSession(config, "kept");
  ASSERT_TRUE(session.Step(1, AsNamed(history.reference(), history.Gradients(1))).ok());
  faulty.FailAll(server::FsOp::kRename);
  const absl::Status refused = session.Delete();
  EXPECT_FALSE(refused.ok());
  EXPECT_NE(refused.code(), absl::StatusCode::kPermissionDenied) << refused;
  faulty.ClearFailures();
  // Still there, in memory and on disk, and it steps on.
  EXPECT_EQ(server->sessions().num_sessions(), 1);
  ExpectState(session, history, 1, "after the refused delete");
  ASSERT_TRUE(session.Step(2, AsNamed(history.reference(), history.Gradients(2))).ok());
  EXPECT_TRUE(server::PosixFileSystem().Exists(state_dir + "/kept/checkpoint"));
  // A delete that goes through leaves nothing for a restart to bring back.
  ASSERT_TRUE(session.Delete().ok());
  server = StartServer(LoopbackOptions(state_dir));
  EXPECT_EQ(server->sessions().num_sessions(), 0);
  EXPECT_EQ(*server::PosixFileSystem().ListDir(state_dir), std::vector<std::string>{});
}

TEST(DurabilityTest, AnUnwritableStateDirectoryIsAFailedPreconditionNotAnAuthError) {
  // EPERM, EACCES and EROFS mean optd may not write there; absl maps them to PERMISSION_DENIED,
  // which a client reads as a refused token. /proc refuses unlink even to root.
  const absl::Status status = server::PosixFileSystem().DeleteFile("/proc/version");
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("cannot write its state directory"));
}

// Rewrites the checkpoint at `path` record by record, letting `edit` change each (its name and
// bytes); the checksums are the writer's own, so only optd's checks of the content stand between
// the file and the daemon.
void RewriteCheckpoint(const std::string& path,
                       const std::function<void(const std::string&, std::string&)>& edit) {
  server::FileSystem& fs = server::PosixFileSystem();
  absl::StatusOr<server::CheckpointReader> reader = server::CheckpointReader::Open(fs, path);
  ASSERT_TRUE(reader.ok()) << reader.status();
  std::vector<std::pair<std::string, std::string>> records;
  for (const auto& [name, bytes] : reader->records()) records.push_back({name, std::string(bytes)});
  absl::StatusOr<std::unique_ptr<server::CheckpointWriter>> writer =
      server::CheckpointWriter::Create(fs, path);
  ASSERT_TRUE(writer.ok()) << writer.status();
  for (auto& [name, bytes] : records) {
    edit(name, bytes);
    ASSERT_TRUE((*writer)->AddRecord(name, bytes).ok());
  }
  ASSERT_TRUE((*writer)->Commit().ok());
}

TEST(DurabilityTest, ACraftedCheckpointIsSkippedWithItsReasonNotTrusted) {
  // Issue 16: a checkpoint with valid checksums but a shape of [0, 8], [-3, 8] or [2^40, 2^40]
  // aborted the daemon at start-up, on every restart; NaN optimizer state loaded and the next step
  // returned NaN parameters.
  const std::string state_dir = MakeTempDir("crafted");
  const v1::SessionConfig config = SmallModel();
  std::map<std::string, std::string> tokens;
  {
    std::unique_ptr<server::Server> server = StartServer(LoopbackOptions(state_dir));
    client::Client c = ConnectTo(*server);
    History history(config);
    for (const char* id : {"zero", "negative", "huge", "nan_state", "fine"}) {
      client::Session s = *c.CreateSession(config, id);
      ASSERT_TRUE(s.Step(1, AsNamed(history.reference(), history.Gradients(1))).ok());
      tokens[id] = s.token();
    }
  }  // checkpointed at shutdown
  auto with_shape = [&](const std::string& id, std::vector<int64_t> shape) {
    RewriteCheckpoint(server::Session::CheckpointPath(state_dir, id),
                      [&](const std::string& name, std::string& bytes) {
                        if (name != "meta") return;
                        v1::SessionCheckpoint meta;
                        ASSERT_TRUE(meta.ParseFromString(bytes));
                        v1::TensorConfig* t = meta.mutable_config()->mutable_tensors(0);
                        t->clear_shape();
                        for (int64_t d : shape) t->add_shape(d);
                        bytes = meta.SerializeAsString();
                      });
  };
  with_shape("zero", {0, 8});
  with_shape("negative", {-3, 8});
  with_shape("huge", {int64_t{1} << 40, int64_t{1} << 40});
  bool poisoned = false;
  RewriteCheckpoint(server::Session::CheckpointPath(state_dir, "nan_state"),
                    [&](const std::string& name, std::string& bytes) {
                      if (poisoned || !absl::StartsWith(name, "state/")) return;
                      const float nan = std::numeric_limits<float>::quiet_NaN();
                      std::memcpy(bytes.data(), &nan, sizeof(nan));
                      poisoned = true;
                    });
  ASSERT_TRUE(poisoned);

  std::unique_ptr<server::Server> server = StartServer(LoopbackOptions(state_dir));
  std::string log = absl::StrJoin(server->startup_log(), "\n");
  for (const char* id : {"zero", "negative", "huge"}) {
    EXPECT_THAT(log, HasSubstr(absl::StrCat("skipped checkpoint ", state_dir, "/", id)));
  }
  // Its config is sound, so it is listed; loading it finds the NaN and refuses.
  EXPECT_EQ(server->sessions().num_sessions(), 2);
  client::Client c = ConnectTo(*server);
  absl::StatusOr<std::vector<v1::SessionInfo>> listed = c.ListSessions();
  ASSERT_TRUE(listed.ok());
  std::vector<std::string> ids;
  for (const v1::SessionInfo& info : *listed) ids.push_back(info.session_id());
  EXPECT_THAT(ids, ::testing::UnorderedElementsAre("fine", "nan_state"));
  const absl::Status nan = c.OpenSession("nan_state", tokens["nan_state"]).Info().status();
  EXPECT_EQ(nan.code(), absl::StatusCode::kDataLoss) << nan;
  EXPECT_THAT(std::string(nan.message()), HasSubstr("non-finite value at element 0"));
  EXPECT_TRUE(c.OpenSession("fine", tokens["fine"]).Info().ok());
}

TEST(DurabilityTest, ReloadingOneSessionDoesNotHoldUpTheOthers) {
  const std::string state_dir = MakeTempDir("reload");
  server::FaultInjectionFileSystem faulty(server::PosixFileSystem());
  server::FakeClock clock;
  server::ServerOptions options = LoopbackOptions(state_dir);
  options.clock = &clock;
  options.sessions.fs = &faulty;
  options.sessions.idle_ttl = absl::Milliseconds(100);
  std::unique_ptr<server::Server> server = StartServer(options);
  client::Client c = ConnectTo(*server);
  c.set_timeout(absl::Seconds(5));  // a call stuck behind the reload fails instead of hanging
  const v1::SessionConfig config = MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}});
  client::Session sleeper = *c.CreateSession(config, "sleeper");
  // Only the sleeper idles past the TTL: the sessions below stay loaded on the fake clock.
  clock.Advance(absl::Milliseconds(100));
  for (int i = 0; i < 300 && server->sessions().loaded_bytes() > 0; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(server->sessions().loaded_bytes(), 0) << "never unloaded";
  // Hold the sleeper's reload inside its checkpoint read.
  absl::Notification release;
  faulty.HoldReads(server::Session::CheckpointPath(state_dir, "sleeper"), &release);
  absl::StatusOr<v1::SessionInfo> woken;
  std::thread reload([&] { woken = sleeper.Info(); });
  while (faulty.reads_held() == 0) absl::SleepFor(absl::Milliseconds(1));
  // Meanwhile other calls go on: a new session is created, stepped and listed.
  // (EXPECT, not ASSERT: the held reload must be released and joined whatever happens.)
  absl::StatusOr<client::Session> other = c.CreateSession(config, "other");
  EXPECT_TRUE(other.ok()) << other.status();
  Reference reference(config);
  if (other.ok()) {
    EXPECT_TRUE(other->Step(1, AsNamed(reference, WorkerGradients(reference, 1, 0))).ok());
  }
  absl::StatusOr<std::vector<v1::SessionInfo>> listed = c.ListSessions();
  EXPECT_TRUE(listed.ok()) << listed.status();
  // A second call for the sleeper waits for the same reload and shares its result.
  absl::StatusOr<v1::SessionInfo> second;
  std::thread waiter([&] { second = sleeper.Info(); });
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ(faulty.reads_held(), 1) << "the second call read the checkpoint again";
  release.Notify();
  reload.join();
  waiter.join();
  ASSERT_TRUE(woken.ok()) << woken.status();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(woken->session_id(), "sleeper");
}

TEST(DurabilityTest, ADrainLetsTheRestOfAStepUnderWayArrive) {
  const std::string state_dir = MakeTempDir("drain_round");
  server::ServerOptions options = LoopbackOptions(state_dir);
  options.drain_timeout = absl::Seconds(20);
  std::unique_ptr<server::Server> server = StartServer(options);
  client::Client c = ConnectTo(*server);
  const v1::SessionConfig config = MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}}, 2);
  client::Session pair = *c.CreateSession(config);
  client::Session idle = *c.CreateSession(MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}}));
  Reference reference(config);
  std::vector<std::vector<std::vector<float>>> grads = {WorkerGradients(reference, 1, 0),
                                                        WorkerGradients(reference, 1, 1)};
  absl::StatusOr<client::StepResult> first;
  std::thread worker0([&] { first = pair.Step(1, AsNamed(reference, grads[0])); });
  while (pair.Info()->workers_pending() != 1) absl::SleepFor(absl::Milliseconds(5));
  std::thread shutdown([&] { EXPECT_TRUE(server->Shutdown().ok()); });
  while (*c.Health(server::kServiceName) != grpc::health::v1::HealthCheckResponse::NOT_SERVING) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  // A step that has not begun is refused; the partner of the one under way is let in.
  Reference idle_reference(idle.Info()->config());
  EXPECT_EQ(
      idle.Step(1, AsNamed(idle_reference, WorkerGradients(idle_reference, 1, 0))).status().code(),
      absl::StatusCode::kUnavailable);
  client::StepOptions worker1;
  worker1.worker_id = 1;
  absl::StatusOr<client::StepResult> second = pair.Step(1, AsNamed(reference, grads[1]), worker1);
  worker0.join();
  shutdown.join();
  reference.Step(grads);
  ASSERT_TRUE(first.ok() && second.ok()) << first.status() << second.status();
  EXPECT_TRUE(BitwiseEqual(second->values.at("x"), reference.Parameters(0)));
  // The final checkpoint has the step.
  server = StartServer(LoopbackOptions(state_dir));
  client::Session reopened = ConnectTo(*server).OpenSession(pair.id(), pair.token());
  EXPECT_EQ(reopened.Info()->step(), 1);
}

}  // namespace
}  // namespace optd::testing
