// Per-tensor pipelining over real loopback gRPC (server/step_pipeline.h). Each test drives raw
// Step streams tensor by tensor and waits until the daemon has stepped every tensor sent so far
// ahead, so the pipelined path is the one under test (not a race with the stream's end). Its
// results must equal the kernels library stepping the same gradients serially, bit for bit, for
// every preset and for four workers; a step that fails, is cancelled or aborted after tensors
// were stepped ahead leaves every parameter as it was; parameters uploaded mid-step count as
// they would serially; tensors beyond the scratch budget step at the commit.
#include <atomic>
#include <cstring>
#include <iostream>
#include <limits>
#include <set>
#include <thread>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "server/step_pipeline.h"
#include "tests/server/fake_clock.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {
namespace {

// One worker's Step stream, sent tensor by tensor.
class StreamedStep {
 public:
  StreamedStep(v1::Optimizer::Stub& stub, const client::Session& session, int64_t step, int worker,
               std::optional<double> lr = std::nullopt) {
    context_.AddMetadata("authorization", absl::StrCat("Bearer ", session.token()));
    stream_ = stub.Step(&context_);
    v1::StepRequest r;
    v1::StepHeader& h = *r.mutable_header();
    h.set_session_id(session.id());
    h.set_step(step);
    h.set_worker_id(worker);
    // Results in small pieces (many per tensor): Read checks each follows the one before, also
    // where early results send them from a thread of their own while the commit goes on.
    h.set_chunk_bytes(256);
    if (lr.has_value()) h.set_lr(*lr);
    EXPECT_TRUE(stream_->Write(r));
  }
  // In two chunks, the second completing the tensor. A write fails once the daemon has ended the
  // stream (a refused chunk); Read then says why.
  void Send(const std::string& tensor, const std::vector<float>& values) {
    const size_t half = values.size() / 2;
    for (auto [begin, end] : {std::pair<size_t, size_t>{0, half}, {half, values.size()}}) {
      if (begin == end) continue;
      v1::StepRequest r;
      v1::TensorChunk& c = *r.mutable_chunk();
      c.set_tensor(tensor);
      c.set_offset(static_cast<int64_t>(begin));
      c.set_dtype(v1::DTYPE_FP32);
      c.set_data(std::string(reinterpret_cast<const char*>(values.data() + begin),
                             (end - begin) * sizeof(float)));
      if (!stream_->Write(r)) return;
    }
  }
  void Close() { stream_->WritesDone(); }
  void Cancel() { context_.TryCancel(); }
  // The step's results by tensor (fp32), or its status.
  absl::StatusOr<std::map<std::string, std::vector<float>>> Read() {
    std::map<std::string, std::vector<float>> results;
    v1::StepResponse response;
    bool first = true;
    while (stream_->Read(&response)) {
      EXPECT_EQ(response.has_summary(), first) << "the summary comes first, and once";
      first = false;
      if (!response.has_chunk()) continue;
      const v1::TensorChunk& c = response.chunk();
      if (order_.empty() || order_.back() != c.tensor()) {
        EXPECT_FALSE(results.contains(c.tensor())) << c.tensor() << "'s pieces are apart";
        order_.push_back(c.tensor());
      }
      std::vector<float>& values = results[c.tensor()];
      EXPECT_EQ(c.offset(), static_cast<int64_t>(values.size()))
          << c.tensor() << ": a piece missing or sent twice";
      const size_t n = c.data().size() / sizeof(float);
      values.resize(std::max(values.size(), static_cast<size_t>(c.offset()) + n));
      std::memcpy(values.data() + c.offset(), c.data().data(), c.data().size());
    }
    OPTD_RETURN_IF_ERROR(client::FromGrpcStatus(stream_->Finish()));
    return results;
  }
  // The tensors whose results Read got, in the order they came (each tensor's chunks together).
  const std::vector<std::string>& order() const { return order_; }

 private:
  std::vector<std::string> order_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::StepRequest, v1::StepResponse>> stream_;
};

class PipelineTest : public ::testing::Test {
 protected:
  void Start(int64_t scratch_bytes = int64_t{1} << 30, int64_t early_results_min_bytes = 0,
             const std::string& state_dir = "") {
    server::ServerOptions options = LoopbackOptions(state_dir);
    options.clock = &clock_;
    options.pipeline_scratch_bytes = scratch_bytes;
    options.early_results_min_bytes = early_results_min_bytes;
    server_ = StartServer(options);
    ASSERT_NE(server_, nullptr);
    ASSERT_NE(server_->pipeliner(), nullptr);
    client_ = std::make_unique<client::Client>(ConnectTo(*server_));
    stub_ = v1::Optimizer::NewStub(client_->channel());
  }
  client::Session Create(const v1::SessionConfig& config) {
    absl::StatusOr<client::Session> session = client_->CreateSession(config);
    EXPECT_TRUE(session.ok()) << session.status();
    return *session;
  }
  std::shared_ptr<server::Session> Daemons(const client::Session& session) {
    absl::StatusOr<std::shared_ptr<server::Session>> s =
        server_->sessions().Get(session.id(), absl::StrCat("Bearer ", session.token()));
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *s : nullptr;
  }
  // Waits (real time, bounded) until `n` tensors of the pending step are stepped ahead.
  static void AwaitPrepared(server::Session& session, int n) {
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    while (session.PreparedTensors() < n) {
      ASSERT_LT(absl::Now(), deadline)
          << "the daemon stepped " << session.PreparedTensors() << " tensors ahead, not " << n;
      absl::SleepFor(absl::Milliseconds(1));
    }
  }
  // Every worker sends tensor after tensor; after each, the daemon must have stepped it ahead.
  // Then the streams close and each worker's results come back.
  std::vector<absl::StatusOr<std::map<std::string, std::vector<float>>>> PipelinedStep(
      const client::Session& session, const Reference& reference, int64_t step,
      const std::vector<std::vector<std::vector<float>>>& grads,
      std::optional<double> lr = std::nullopt) {
    std::shared_ptr<server::Session> daemons = Daemons(session);
    std::vector<std::unique_ptr<StreamedStep>> streams;
    for (size_t w = 0; w < grads.size(); ++w) {
      streams.push_back(
          std::make_unique<StreamedStep>(*stub_, session, step, static_cast<int>(w), lr));
    }
    for (int t = 0; t < reference.num_tensors(); ++t) {
      for (size_t w = 0; w < grads.size(); ++w) streams[w]->Send(reference.name(t), grads[w][t]);
      AwaitPrepared(*daemons, t + 1);
    }
    for (auto& s : streams) s->Close();
    std::vector<absl::StatusOr<std::map<std::string, std::vector<float>>>> results;
    for (auto& s : streams) results.push_back(s->Read());
    return results;
  }
  void ExpectParameters(client::Session& session, const Reference& reference,
                        const std::string& what) {
    absl::StatusOr<std::map<std::string, std::vector<float>>> params = session.GetParameters();
    ASSERT_TRUE(params.ok()) << params.status();
    ExpectMatches(reference, *params, what);
  }
  // Every tensor but the last, each waited for until the daemon has stepped it ahead.
  static void SendAheadAllButTheLast(StreamedStep& stream, const Reference& reference,
                                     const std::vector<std::vector<float>>& grads,
                                     server::Session& daemons) {
    for (int t = 0; t + 1 < reference.num_tensors(); ++t) {
      stream.Send(reference.name(t), grads[t]);
      AwaitPrepared(daemons, t + 1);
    }
  }
  // One worker's step: the first tensor, waited for until stepped ahead, then the rest; its
  // results against the reference stepping the same gradients.
  void StepFirstAheadThenTheRest(const client::Session& session, Reference& reference,
                                 server::Session& daemons, int64_t step) {
    const std::vector<std::vector<float>> grads = WorkerGradients(reference, step, 0);
    StreamedStep stream(*stub_, session, step, 0);
    stream.Send(reference.name(0), grads[0]);
    AwaitPrepared(daemons, 1);
    for (int t = 1; t < reference.num_tensors(); ++t) stream.Send(reference.name(t), grads[t]);
    stream.Close();
    absl::StatusOr<std::map<std::string, std::vector<float>>> results = stream.Read();
    reference.Step({grads});
    ASSERT_TRUE(results.ok()) << results.status();
    ExpectMatches(reference, *results, absl::StrCat("step ", step));
  }

  server::FakeClock clock_;
  std::unique_ptr<server::Server> server_;
  std::unique_ptr<client::Client> client_;
  std::unique_ptr<v1::Optimizer::Stub> stub_;
};

class PresetPipelineTest : public PipelineTest,
                           public ::testing::WithParamInterface<std::string> {};

TEST_P(PresetPipelineTest, SteppedAheadEqualsTheSerialStepBitForBit) {
  Start();
  const v1::SessionConfig config = ModelConfig(GetParam());
  client::Session session = Create(config);
  Reference reference(config);
  std::shared_ptr<server::Session> daemons = Daemons(session);
  for (int64_t step = 1; step <= 3; ++step) {
    const std::vector<std::vector<std::vector<float>>> grads = {
        WorkerGradients(reference, step, 0)};
    auto results = PipelinedStep(session, reference, step, grads);
    reference.Step(grads);
    ASSERT_TRUE(results[0].ok()) << results[0].status();
    ExpectMatches(reference, *results[0], absl::StrCat("step ", step, " results"));
  }
  ExpectParameters(session, reference, "parameters after 3 steps");
  EXPECT_EQ(daemons->tensors_stepped_ahead(), 3 * reference.num_tensors());
}

INSTANTIATE_TEST_SUITE_P(Presets, PresetPipelineTest, ::testing::ValuesIn([] {
                           std::vector<std::string> names;
                           for (absl::string_view n : PresetNames()) names.emplace_back(n);
                           return names;
                         }()),
                         [](const auto& info) { return info.param; });

TEST_F(PipelineTest, FourWorkersStepEachTensorAheadOnTheirMean) {
  Start();
  const v1::SessionConfig config = ModelConfig("normuon", /*world_size=*/4);
  client::Session session = Create(config);
  Reference reference(config);
  for (int64_t step = 1; step <= 2; ++step) {
    std::vector<std::vector<std::vector<float>>> grads;
    for (int w = 0; w < 4; ++w) grads.push_back(WorkerGradients(reference, step, w));
    auto results = PipelinedStep(session, reference, step, grads);
    reference.Step(grads);
    for (int w = 0; w < 4; ++w) {
      ASSERT_TRUE(results[w].ok()) << "worker " << w << ": " << results[w].status();
      ExpectMatches(reference, *results[w], absl::StrCat("worker ", w, " step ", step));
    }
  }
  EXPECT_EQ(Daemons(session)->tensors_stepped_ahead(), 2 * reference.num_tensors());
}

TEST_F(PipelineTest, ALearningRateOverrideAndDeltaResultsAsSerially) {
  Start();
  v1::SessionConfig config = ModelConfig("muoneq_rowcol");
  config.set_step_result(v1::STEP_RESULT_DELTA);
  client::Session session = Create(config);
  Reference reference(config);
  const std::vector<std::vector<std::vector<float>>> grads = {WorkerGradients(reference, 1, 0)};
  std::vector<std::vector<float>> before;
  for (int t = 0; t < reference.num_tensors(); ++t) before.push_back(reference.Parameters(t));
  auto results = PipelinedStep(session, reference, 1, grads, /*lr=*/0.004);
  for (int t = 0; t < reference.num_tensors(); ++t) {
    ASSERT_TRUE(reference.optimizer().SetGradient(t, grads[0][t]).ok());
  }
  ASSERT_TRUE(reference.optimizer().Step({}, 0.004).ok());
  ASSERT_TRUE(results[0].ok()) << results[0].status();
  for (int t = 0; t < reference.num_tensors(); ++t) {
    const std::vector<float> after = reference.Parameters(t);
    std::vector<float> delta(after.size());
    for (size_t i = 0; i < after.size(); ++i) delta[i] = after[i] - before[t][i];
    EXPECT_TRUE(BitwiseEqual(results[0]->at(reference.name(t)), delta)) << reference.name(t);
  }
  ExpectParameters(session, reference, "parameters");
}

TEST_F(PipelineTest, AStepThatFailsAfterTensorsWereSteppedAheadChangesNothing) {
  Start();
  const v1::SessionConfig config = ModelConfig("keller");
  client::Session session = Create(config);
  Reference reference(config);
  std::shared_ptr<server::Session> daemons = Daemons(session);
  const std::vector<std::vector<float>> grads = WorkerGradients(reference, 1, 0);
  {
    // A non-finite value in the last tensor, after the others were stepped ahead.
    StreamedStep stream(*stub_, session, 1, 0);
    SendAheadAllButTheLast(stream, reference, grads, *daemons);
    std::vector<float> bad = grads.back();
    bad[3] = std::numeric_limits<float>::infinity();
    stream.Send(reference.name(reference.num_tensors() - 1), bad);
    stream.Close();
    EXPECT_EQ(stream.Read().status().code(), absl::StatusCode::kInvalidArgument);
  }
  ExpectParameters(session, reference, "after the refused step");
  {
    // Cancelled after every tensor but the last was stepped ahead.
    StreamedStep stream(*stub_, session, 1, 0);
    SendAheadAllButTheLast(stream, reference, grads, *daemons);
    stream.Cancel();
    EXPECT_EQ(stream.Read().status().code(), absl::StatusCode::kCancelled);
  }
  ExpectParameters(session, reference, "after the cancelled step");
  absl::StatusOr<v1::SessionInfo> info = session.Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->step(), 0);
  for (const v1::TensorInfo& t : info->tensors()) EXPECT_EQ(t.steps_applied(), 0);
  // The step then runs as if nothing had happened.
  auto results = PipelinedStep(session, reference, 1, {grads});
  reference.Step({grads});
  ASSERT_TRUE(results[0].ok()) << results[0].status();
  ExpectMatches(reference, *results[0], "the step after");
}

// Under the skip policy a non-finite value is counted, not refused: tensors stepped ahead before
// and after it (the ones before without the optimizer's second range check, the staging having
// found every value in range) are dropped, the step is skipped and the next one runs as serially.
TEST_F(PipelineTest, ASkippedStepDropsTheTensorsSteppedAheadAroundANonFiniteValue) {
  Start();
  v1::SessionConfig config = ModelConfig("rmnp");
  config.set_non_finite_policy(v1::NON_FINITE_POLICY_SKIP_STEP);
  client::Session session = Create(config);
  Reference reference(config);
  std::shared_ptr<server::Session> daemons = Daemons(session);
  std::vector<std::vector<float>> grads = WorkerGradients(reference, 1, 0);
  grads[1][2] = std::numeric_limits<float>::quiet_NaN();
  {
    StreamedStep stream(*stub_, session, 1, 0);
    stream.Send(reference.name(0), grads[0]);
    AwaitPrepared(*daemons, 1);
    for (int t = 1; t < reference.num_tensors(); ++t) stream.Send(reference.name(t), grads[t]);
    stream.Close();
    absl::StatusOr<std::map<std::string, std::vector<float>>> results = stream.Read();
    ASSERT_TRUE(results.ok()) << results.status();
    ExpectMatches(reference, *results, "the skipped step's results");
  }
  ExpectParameters(session, reference, "after the skipped step");
  StepFirstAheadThenTheRest(session, reference, *daemons, 2);
}

TEST_F(PipelineTest, AStragglerAbortAfterTensorsWereSteppedAheadChangesNothing) {
  Start();
  v1::SessionConfig config = ModelConfig("normuon", /*world_size=*/2);
  config.set_straggler_timeout_seconds(5);
  client::Session session = Create(config);
  Reference reference(config);
  std::shared_ptr<server::Session> daemons = Daemons(session);
  const std::vector<std::vector<std::vector<float>>> grads = {WorkerGradients(reference, 1, 0),
                                                              WorkerGradients(reference, 1, 1)};
  const int n = reference.num_tensors();
  StreamedStep first(*stub_, session, 1, 0), second(*stub_, session, 1, 1);
  for (int t = 0; t < n; ++t) first.Send(reference.name(t), grads[0][t]);
  first.Close();
  for (int t = 0; t + 1 < n; ++t) second.Send(reference.name(t), grads[1][t]);
  AwaitPrepared(*daemons, n - 1);
  // Worker 0 waits for worker 1 until the straggler deadline passes.
  std::atomic<bool> done{false};
  absl::StatusOr<std::map<std::string, std::vector<float>>> waited = absl::UnknownError("");
  std::thread waiter([&] {
    waited = first.Read();
    done = true;
  });
  while (!done) {
    clock_.Advance(absl::Seconds(1));
    absl::SleepFor(absl::Milliseconds(5));
  }
  waiter.join();
  EXPECT_EQ(waited.status().code(), absl::StatusCode::kAborted) << waited.status();
  second.Cancel();
  EXPECT_FALSE(second.Read().ok());
  ExpectParameters(session, reference, "after the aborted step");
  auto results = PipelinedStep(session, reference, 1, grads);
  reference.Step(grads);
  for (int w = 0; w < 2; ++w) {
    ASSERT_TRUE(results[w].ok()) << results[w].status();
    ExpectMatches(reference, *results[w], absl::StrCat("worker ", w, " after the abort"));
  }
}

TEST_F(PipelineTest, ParametersUploadedMidStepCountAsTheyWouldSerially) {
  Start();
  const v1::SessionConfig config = ModelConfig("torch");
  client::Session session = Create(config);
  Reference reference(config);
  std::shared_ptr<server::Session> daemons = Daemons(session);
  const std::vector<std::vector<float>> grads = WorkerGradients(reference, 1, 0);
  StreamedStep stream(*stub_, session, 1, 0);
  stream.Send(reference.name(0), grads[0]);
  AwaitPrepared(*daemons, 1);
  // New parameters for the tensor already stepped ahead: the step must start from them.
  const std::vector<float> uploaded(static_cast<size_t>(reference.count(0)), 0.25f);
  ASSERT_TRUE(session.UploadParameters({{reference.name(0), uploaded}}).ok());
  ASSERT_TRUE(reference.optimizer().SetParameters(0, uploaded).ok());
  for (int t = 1; t < reference.num_tensors(); ++t) stream.Send(reference.name(t), grads[t]);
  stream.Close();
  absl::StatusOr<std::map<std::string, std::vector<float>>> results = stream.Read();
  reference.Step({grads});
  ASSERT_TRUE(results.ok()) << results.status();
  ExpectMatches(reference, *results, "results");
  EXPECT_EQ(daemons->tensors_stepped_ahead(), 0);  // the prepared work was dropped
}

TEST_F(PipelineTest, TensorsOfABatchedDirectionStepWithTheirBatchAtTheCommit) {
  // Two same-shape Muon matrices form one Newton–Schulz batch: they wait for the commit (and take
  // no scratch), the vector is stepped ahead.
  Start();
  const v1::SessionConfig config = MakeConfig(
      {{"matrices", "keller"}, {"vectors", "adamw"}},
      {{"bias", {40}, "vectors"}, {"q", {24, 40}, "matrices"}, {"k", {24, 40}, "matrices"}});
  client::Session session = Create(config);
  Reference reference(config);
  std::shared_ptr<server::Session> daemons = Daemons(session);
  for (int64_t step = 1; step <= 2; ++step) {
    StepFirstAheadThenTheRest(session, reference, *daemons, step);
  }
  EXPECT_EQ(daemons->tensors_stepped_ahead(), 2);
  EXPECT_EQ(server_->pipeliner()->reserved_bytes(), 3 * 40 * 4);  // the vector's w, m, v
}

TEST_F(PipelineTest, TensorsBeyondTheScratchBudgetStepAtTheCommit) {
  // Room for the first tensor's shadows only (parameters and momentum: 2 × 960 floats).
  Start(/*scratch_bytes=*/2 * 960 * 4);
  const v1::SessionConfig config = ModelConfig("keller");
  client::Session session = Create(config);
  Reference reference(config);
  std::shared_ptr<server::Session> daemons = Daemons(session);
  for (int64_t step = 1; step <= 2; ++step) {
    StepFirstAheadThenTheRest(session, reference, *daemons, step);
  }
  EXPECT_EQ(daemons->tensors_stepped_ahead(), 2);
  EXPECT_EQ(server_->pipeliner()->reserved_bytes(), 2 * 960 * 4);
  // A second session finds the budget taken and steps serially, with the same results.
  client::Session other = Create(config);
  Reference other_reference(config);
  const std::vector<std::vector<float>> grads = WorkerGradients(other_reference, 1, 0);
  client::StepOptions streamed;
  streamed.path = client::StepPath::kStream;
  absl::StatusOr<client::StepResult> result =
      other.Step(1, AsNamed(other_reference, grads), streamed);
  other_reference.Step({grads});
  ASSERT_TRUE(result.ok()) << result.status();
  ExpectMatches(other_reference, result->values, "the second session");
  EXPECT_EQ(Daemons(other)->tensors_stepped_ahead(), 0);
  // Deleting the first gives its scratch back.
  ASSERT_TRUE(session.Delete().ok());
  daemons.reset();
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (server_->pipeliner()->reserved_bytes() != 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(server_->pipeliner()->reserved_bytes(), 0);
}

// GetParams copies its snapshot on a pipeline thread, piece by piece, and sends each piece as it
// is copied: every read while steps commit must still be the parameters of exactly one step.
TEST_F(PipelineTest, GetParamsSendsOneStepsParametersWhileStepsCommit) {
  Start();
  // Several of the copy's 4 MiB pieces per tensor, the last of each a partial one. Under
  // ThreadSanitizer (10 times slower) fewer: 26 MB a transfer starved the connection's keepalive.
#ifdef __SANITIZE_THREAD__
  constexpr int64_t kFirst = (1 << 20) + 3, kLast = (1 << 20) + 7;
  constexpr int kSteps = 3, kMaxReads = 4;
#else
  constexpr int64_t kFirst = 3 << 20, kLast = 2500000;
  constexpr int kSteps = 6, kMaxReads = 16;
#endif
  const v1::SessionConfig config = MakeConfig(
      {{"vectors", "adamw"}},
      {{"a", {kFirst}, "vectors"}, {"b", {(1 << 20) + 5}, "vectors"}, {"c", {kLast}, "vectors"}});
  client::Session session = Create(config);
  Reference reference(config);
  // The reference's parameters after each step (0: as created).
  std::vector<std::map<std::string, std::vector<float>>> after(1);
  std::vector<std::vector<std::vector<float>>> grads;
  for (int t = 0; t < reference.num_tensors(); ++t) {
    after[0][reference.name(t)] = reference.Parameters(t);
  }
  for (int64_t step = 1; step <= kSteps; ++step) {
    grads.push_back(WorkerGradients(reference, step, 0));
    reference.Step({grads.back()});
    after.emplace_back();
    for (int t = 0; t < reference.num_tensors(); ++t) {
      after.back()[reference.name(t)] = reference.Parameters(t);
    }
  }
  std::atomic<bool> stepping{true};
  std::thread steps([&] {
    client::Session stepper(client_->channel(), session.id(), session.token());
    for (int64_t step = 1; step <= kSteps; ++step) {
      absl::StatusOr<client::StepResult> result =
          stepper.Step(step, AsNamed(reference, grads[step - 1]));
      EXPECT_TRUE(result.ok()) << result.status();
    }
    stepping = false;
  });
  absl::Cleanup join = [&] {
    if (steps.joinable()) steps.join();
  };
  // Reads while the steps run, and one after: that one must be the last step's. At most
  // kMaxReads meanwhile: under a sanitizer the reads could otherwise starve the steps.
  std::set<size_t> seen;
  for (int reads = 1;; ++reads) {
    const bool last = !stepping.load() || reads > kMaxReads;
    if (last) steps.join();
    // Small chunks: many waits on the copy.
    absl::StatusOr<std::map<std::string, std::vector<float>>> got =
        session.GetParameters({}, std::nullopt, /*chunk_bytes=*/256 << 10);
    ASSERT_TRUE(got.ok()) << got.status();
    size_t step = 0;
    while (step < after.size() && *got != after[step]) ++step;
    ASSERT_LT(step, after.size()) << "read " << reads << " is no step's parameters (torn)";
    seen.insert(step);
    if (last) {
      EXPECT_EQ(step, size_t{kSteps}) << "the read after every step";
      break;
    }
  }
  std::cerr << "reads saw the parameters of " << seen.size() << " different steps\n";
}

// --- Early results (Session::Step's on_decided): the worker whose gradients complete a step gets
// each result as soon as it is final, while the commit computes the rest. ---

// Two same-shape Muon matrices (one batch, stepped at the commit) and a vector stepped ahead.
v1::SessionConfig BatchAndVectorConfig() {
  return MakeConfig(
      {{"matrices", "keller"}, {"vectors", "adamw"}},
      {{"q", {24, 40}, "matrices"}, {"k", {24, 40}, "matrices"}, {"bias", {40}, "vectors"}});
}

TEST_F(PipelineTest, EarlyResultsComeInTheOrderTheyBecameFinalAndEqualTheSerialStep) {
  // The vector is sent first and stepped ahead: its result is final once the step's gradients
  // have passed their checks, the batch's only when the commit has stepped it. With early
  // results the reply says so by its order; without (-1) it is tensor order. Same bits.
  for (const int64_t early : {int64_t{0}, int64_t{-1}}) {
    SCOPED_TRACE(early == 0 ? "early results" : "results after the commit");
    Start(int64_t{1} << 30, early);
    const v1::SessionConfig config = BatchAndVectorConfig();
    client::Session session = Create(config);
    Reference reference(config);
    std::shared_ptr<server::Session> daemons = Daemons(session);
    for (int64_t step = 1; step <= 2; ++step) {
      const std::vector<std::vector<float>> grads = WorkerGradients(reference, step, 0);
      StreamedStep stream(*stub_, session, step, 0);
      stream.Send("bias", grads[2]);
      AwaitPrepared(*daemons, 1);
      stream.Send("q", grads[0]);
      stream.Send("k", grads[1]);
      stream.Close();
      absl::StatusOr<std::map<std::string, std::vector<float>>> results = stream.Read();
      reference.Step({grads});
      ASSERT_TRUE(results.ok()) << results.status();
      ExpectMatches(reference, *results, absl::StrCat("step ", step));
      const std::vector<std::string> expected = early == 0
                                                    ? std::vector<std::string>{"bias", "q", "k"}
                                                    : std::vector<std::string>{"q", "k", "bias"};
      EXPECT_EQ(stream.order(), expected) << "step " << step;
    }
    ExpectParameters(session, reference, "parameters after 2 steps");
  }
}

// One worker's gradients for `step` in a staging of `session`, whole.
std::unique_ptr<server::TensorStaging> Staged(server::Session& session,
                                              const std::vector<std::vector<float>>& grads) {
  std::unique_ptr<server::TensorStaging> staging = *session.AcquireStaging();
  for (size_t t = 0; t < grads.size(); ++t) {
    EXPECT_TRUE(staging
                    ->AddChunk(static_cast<int>(t), 0, DType::kF32,
                               absl::string_view(reinterpret_cast<const char*>(grads[t].data()),
                                                 grads[t].size() * sizeof(float)),
                               kMaxGradientMagnitude, /*reject_out_of_range=*/true)
                    .ok());
  }
  return staging;
}

v1::StepHeader Header(const client::Session& session, int64_t step) {
  v1::StepHeader header;
  header.set_session_id(session.id());
  header.set_step(step);
  return header;
}

TEST_F(PipelineTest, TheDecisionComesBeforeTheCommitWithTheSummaryComplete) {
  // Session::Step itself: on_decided is called once, while the step has not committed (the
  // session still at the step before), with every summary field final and no result final yet
  // (nothing was stepped ahead here); when Step returns, the batch came first, then the vector,
  // and each result is the reference's.
  Start();
  const v1::SessionConfig config = BatchAndVectorConfig();
  client::Session session = Create(config);
  Reference reference(config);
  std::shared_ptr<server::Session> daemons = Daemons(session);
  for (int64_t step = 1; step <= 2; ++step) {
    const std::vector<std::vector<float>> grads = WorkerGradients(reference, step, 0);
    int decided = 0;
    std::shared_ptr<const server::StepOutcome> early;
    absl::StatusOr<server::StepReply> reply = daemons->Step(
        Header(session, step), Staged(*daemons, grads), [] { return false; },
        [&](server::StepReply r) {
          ++decided;
          EXPECT_EQ(daemons->step(), step - 1) << "decided after the commit";
          EXPECT_FALSE(r.replayed);
          EXPECT_EQ(r.outcome->step, step);
          EXPECT_EQ(r.outcome->tensors_updated, 3);
          EXPECT_FALSE(r.outcome->skipped);
          EXPECT_EQ(r.outcome->result, v1::STEP_RESULT_PARAMETERS);
          EXPECT_TRUE(r.outcome->progress.final_so_far().empty());
          early = r.outcome;
        });
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(decided, 1);
    EXPECT_EQ(reply->outcome.get(), early.get()) << "the outcome streamed early is the step's";
    EXPECT_EQ(reply->outcome->progress.final_so_far(), (std::vector<int>{0, 1, 2}));
    reference.Step({grads});
    for (int t = 0; t < 3; ++t) {
      EXPECT_EQ(reply->outcome->values[t], reference.Parameters(t)) << reference.name(t);
    }
  }
}

TEST(EarlyResultsOptionTest, AThresholdBelowMinusOneIsRefusedAtStart) {
  server::ServerOptions options = LoopbackOptions();
  options.early_results_min_bytes = -2;
  absl::StatusOr<std::unique_ptr<server::Server>> server = server::Server::Start(options);
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(server.status().message().find("--early_results_min_bytes must be >= -1 (got -2)"),
            absl::string_view::npos)
      << server.status();
}

TEST_F(PipelineTest, StepsThatCheckpointOrResultsBelowTheThresholdAreNotStreamedEarly) {
  // A step that writes its checkpoint replies after it (the summary says whether it is on disk);
  // a step whose results are below --early_results_min_bytes replies after its commit.
  const std::string dir = MakeTempDir("early");
  Start(int64_t{1} << 30, /*early_results_min_bytes=*/0, dir);
  {
    v1::SessionConfig config = BatchAndVectorConfig();
    config.set_checkpoint_interval(2);
    client::Session session = Create(config);
    Reference reference(config);
    std::shared_ptr<server::Session> daemons = Daemons(session);
    for (int64_t step = 1; step <= 2; ++step) {
      const std::vector<std::vector<float>> grads = WorkerGradients(reference, step, 0);
      int decided = 0;
      absl::StatusOr<server::StepReply> reply = daemons->Step(
          Header(session, step), Staged(*daemons, grads), [] { return false; },
          [&](server::StepReply) { ++decided; });
      ASSERT_TRUE(reply.ok()) << reply.status();
      EXPECT_EQ(decided, step == 1 ? 1 : 0) << "step " << step;
      EXPECT_EQ(reply->outcome->checkpoint_step, step == 1 ? 0 : 2);
    }
  }  // the session goes before its daemon
  server_.reset();
  const int64_t bytes = (2 * 24 * 40 + 40) * 4;  // the session's results
  Start(int64_t{1} << 30, /*early_results_min_bytes=*/bytes + 1);
  client::Session small = Create(BatchAndVectorConfig());
  Reference small_reference(BatchAndVectorConfig());
  int decided = 0;
  std::shared_ptr<server::Session> small_daemons = Daemons(small);
  ASSERT_TRUE(small_daemons
                  ->Step(
                      Header(small, 1),
                      Staged(*small_daemons, WorkerGradients(small_reference, 1, 0)),
                      [] { return false; }, [&](server::StepReply) { ++decided; })
                  .ok());
  EXPECT_EQ(decided, 0);
}

}  // namespace
}  // namespace optd::testing
