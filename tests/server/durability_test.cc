// Nothing is lost: kill -9 at random points restarts from the last complete checkpoint, injected
// write/fsync/rename failures never corrupt an existing checkpoint, SIGTERM drains and
// checkpoints, idle sessions unload and reload, a restarted daemon resumes every session, and a
// full step queue answers UNAVAILABLE.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <thread>

#include "server/checkpoint_file.h"
#include "tests/server/fault_injection_file_system.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {
namespace {

using ::testing::HasSubstr;

// The optd binary in a child process.
class Daemon {
 public:
  Daemon(const std::string& state_dir, std::vector<std::string> extra = {}) {
    port_file_ = absl::StrCat(state_dir, "/../", std::to_string(getpid()), ".port");
    unlink(port_file_.c_str());
    std::vector<std::string> args = {OPTD_PATH, "--listen=127.0.0.1:0", "--threads=1",
                                     absl::StrCat("--state_dir=", state_dir),
                                     absl::StrCat("--port_file=", port_file_)};
    for (std::string& e : extra) args.push_back(std::move(e));
    pid_ = fork();
    if (pid_ == 0) {
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    for (int i = 0; i < 1000 && port_ == 0; ++i) {
      std::ifstream in(port_file_);
      if (!(in >> port_)) port_ = 0;
      if (port_ == 0) absl::SleepFor(absl::Milliseconds(10));
    }
    EXPECT_NE(port_, 0) << "optd did not start";
  }
  ~Daemon() {
    if (pid_ > 0) Kill(SIGKILL);
  }

  client::Client Connect() const {
    client::ChannelOptions options;
    options.target = absl::StrCat("127.0.0.1:", port_);
    return client::Client(*client::MakeChannel(options));
  }

  // Sends `signal` and returns the exit status (or -signal).
  int Kill(int signal) {
    kill(pid_, signal);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  std::string port_file_;
};

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

v1::SessionConfig SmallModel() {
  return MakeConfig(
      {{"matrices", "muoneq_row"}, {"vectors", "adamw"}},
      {{"w1", {96, 128}, "matrices"}, {"w2", {128, 96}, "matrices"}, {"b", {128}, "vectors"}});
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
  server::ServerOptions options = LoopbackOptions();
  options.service.max_pending_steps = 1;
  std::unique_ptr<server::Server> server = StartServer(options);
  client::Client c = ConnectTo(*server);
  v1::SessionConfig config = MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}}, 2);
  config.set_straggler_timeout_seconds(0.5);
  client::Session session = *c.CreateSession(config);
  Reference reference(config);
  absl::StatusOr<client::StepResult> waiting;
  std::thread worker0(
      [&] { waiting = session.Step(1, AsNamed(reference, WorkerGradients(reference, 1, 0))); });
  while (session.Info()->workers_pending() != 1) absl::SleepFor(absl::Milliseconds(5));
  client::StepOptions worker1;
  worker1.worker_id = 1;
  absl::StatusOr<client::StepResult> full =
      session.Step(1, AsNamed(reference, WorkerGradients(reference, 1, 1)), worker1);
  EXPECT_EQ(full.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(full.status().message()), HasSubstr("step queue is full"));
  // Worker 0 gives up at the straggler timeout, which frees the queue.
  worker0.join();
  EXPECT_EQ(waiting.status().code(), absl::StatusCode::kAborted) << waiting.status();
  std::vector<std::vector<std::vector<float>>> grads = {WorkerGradients(reference, 1, 0),
                                                        WorkerGradients(reference, 1, 1)};
  absl::StatusOr<client::StepResult> second;
  std::thread again([&] { second = session.Step(1, AsNamed(reference, grads[0])); });
  while (session.Info()->workers_pending() != 1) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_EQ(session.Step(1, AsNamed(reference, grads[1]), worker1).status().code(),
            absl::StatusCode::kUnavailable);
  again.join();
}

TEST(DurabilityTest, InjectedWriteFailuresNeverCorruptTheLastCheckpoint) {
  const std::string state_dir = MakeTempDir("faults");
  server::FaultInjectionFileSystem faulty(server::PosixFileSystem());
  server::ServerOptions options = LoopbackOptions(state_dir);
  options.sessions.fs = &faulty;
  std::unique_ptr<server::Server> server = StartServer(options);
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
  server::ServerOptions options = LoopbackOptions(state_dir);
  options.sessions.idle_ttl = absl::Milliseconds(200);
  std::unique_ptr<server::Server> server = StartServer(options);
  client::Client c = ConnectTo(*server);
  const v1::SessionConfig config = SmallModel();
  History history(config);
  client::Session session = *c.CreateSession(config);
  ASSERT_TRUE(session.Step(1, AsNamed(history.reference(), history.Gradients(1))).ok());
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

}  // namespace
}  // namespace optd::testing
