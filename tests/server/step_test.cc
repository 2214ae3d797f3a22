// Steps over real loopback gRPC: results equal the kernels library's bit for bit, the mean of
// several workers is applied once, retries replay, stragglers abort, cancelled contributions are
// withdrawn.
#include <limits>
#include <thread>

#include "kernels/formulas.h"
#include "tests/server/fake_clock.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {
namespace {

class StepTest : public ::testing::Test {
 protected:
  // The daemon's deadlines run on a fake clock: a test that needs one to pass advances it.
  static void SetUpTestSuite() {
    clock_ = new server::FakeClock;
    server::ServerOptions options = LoopbackOptions();
    options.clock = clock_;
    server_ = StartServer(options).release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
    delete clock_;
    clock_ = nullptr;
  }

  client::Session Create(const v1::SessionConfig& config) {
    client::Client c = ConnectTo(*server_);
    absl::StatusOr<client::Session> session = c.CreateSession(config);
    EXPECT_TRUE(session.ok()) << session.status();
    return *session;
  }

  static server::FakeClock* clock_;
  static server::Server* server_;
};

server::FakeClock* StepTest::clock_ = nullptr;
server::Server* StepTest::server_ = nullptr;

class PresetStepTest : public StepTest, public ::testing::WithParamInterface<std::string> {};

TEST_P(PresetStepTest, OneWorkerEqualsKernelsBitForBit) {
  const v1::SessionConfig config = ModelConfig(GetParam());
  client::Session session = Create(config);
  Reference reference(config);
  ExpectMatches(reference, *session.GetParameters(), "initial parameters");
  for (int64_t step = 1; step <= 3; ++step) {
    const auto grads = WorkerGradients(reference, step, 0);
    absl::StatusOr<client::StepResult> result = session.Step(step, AsNamed(reference, grads));
    ASSERT_TRUE(result.ok()) << result.status();
    reference.Step({grads});
    EXPECT_EQ(result->step, step);
    EXPECT_FALSE(result->replayed);
    EXPECT_EQ(result->tensors_updated, 3);
    ExpectMatches(reference, result->values, absl::StrCat("step ", step, " result"));
  }
  ExpectMatches(reference, *session.GetParameters(), "GetParams after 3 steps");
  absl::StatusOr<v1::SessionInfo> info = session.Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->step(), 3);
  for (const v1::TensorInfo& t : info->tensors()) EXPECT_EQ(t.steps_applied(), 3);
}

INSTANTIATE_TEST_SUITE_P(Presets, PresetStepTest, ::testing::ValuesIn([] {
                           std::vector<std::string> names;
                           for (absl::string_view n : PresetNames()) names.emplace_back(n);
                           return names;
                         }()),
                         [](const auto& info) { return info.param; });

// Runs Step for every worker on its own thread and returns their results in worker order.
std::vector<absl::StatusOr<client::StepResult>> StepAll(
    client::Session& session, const Reference& reference, int64_t step,
    const std::vector<std::vector<std::vector<float>>>& grads, const client::StepOptions& base) {
  std::vector<absl::StatusOr<client::StepResult>> results(grads.size(),
                                                          absl::UnknownError("not run"));
  std::vector<std::thread> workers;
  for (size_t w = 0; w < grads.size(); ++w) {
    workers.emplace_back([&, w] {
      client::StepOptions options = base;
      options.worker_id = static_cast<int>(w);
      results[w] = session.Step(step, AsNamed(reference, grads[w]), options);
    });
  }
  for (std::thread& t : workers) t.join();
  return results;
}

TEST_F(StepTest, FourConcurrentWorkersApplyTheirMeanOnce) {
  const v1::SessionConfig config = ModelConfig("keller", /*world_size=*/4);
  client::Session session = Create(config);
  Reference reference(config);
  for (int64_t step = 1; step <= 2; ++step) {
    std::vector<std::vector<std::vector<float>>> grads;
    for (int w = 0; w < 4; ++w) grads.push_back(WorkerGradients(reference, step, w));
    auto results = StepAll(session, reference, step, grads, {});
    reference.Step(grads);
    for (int w = 0; w < 4; ++w) {
      ASSERT_TRUE(results[w].ok()) << "worker " << w << ": " << results[w].status();
      ExpectMatches(reference, results[w]->values, absl::StrCat("worker ", w, " step ", step));
    }
  }
  absl::StatusOr<v1::SessionInfo> info = session.Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->step(), 2);
  for (const v1::TensorInfo& t : info->tensors()) EXPECT_EQ(t.steps_applied(), 2);
}

TEST_F(StepTest, RetryOfAFinishedStepReplaysItsResult) {
  const v1::SessionConfig config = ModelConfig("rmnp");
  client::Session session = Create(config);
  Reference reference(config);
  const auto grads = WorkerGradients(reference, 1, 0);
  absl::StatusOr<client::StepResult> first = session.Step(1, AsNamed(reference, grads));
  ASSERT_TRUE(first.ok()) << first.status();
  reference.Step({grads});
  // Different gradients on the retry: they must not be applied.
  const auto other = WorkerGradients(reference, 99, 0);
  absl::StatusOr<client::StepResult> retry = session.Step(1, AsNamed(reference, other));
  ASSERT_TRUE(retry.ok()) << retry.status();
  EXPECT_TRUE(retry->replayed);
  EXPECT_EQ(retry->values, first->values);
  ExpectMatches(reference, *session.GetParameters(), "after the retry");
  EXPECT_EQ(session.Info()->step(), 1);
}

// Waits until the session has `n` contributions pending.
void AwaitPending(client::Session& session, int n) {
  for (int i = 0; i < 500; ++i) {
    absl::StatusOr<v1::SessionInfo> info = session.Info();
    if (info.ok() && info->workers_pending() == n) return;
    absl::SleepFor(absl::Milliseconds(10));
  }
  ADD_FAILURE() << "never saw " << n << " workers pending";
}

TEST_F(StepTest, RetryWhileThePendingStepWaitsIsCountedOnce) {
  const v1::SessionConfig config = ModelConfig("keller", /*world_size=*/2);
  client::Session session = Create(config);
  Reference reference(config);
  const auto g0 = WorkerGradients(reference, 1, 0);
  const auto g0_retry = WorkerGradients(reference, 1, 7);
  const auto g1 = WorkerGradients(reference, 1, 1);
  absl::StatusOr<client::StepResult> first, retry, other;
  std::thread a([&] { first = session.Step(1, AsNamed(reference, g0)); });
  AwaitPending(session, 1);
  std::thread b([&] { retry = session.Step(1, AsNamed(reference, g0_retry)); });
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(session.Info()->workers_pending(), 1) << "the retry was counted as a contribution";
  client::StepOptions worker1;
  worker1.worker_id = 1;
  other = session.Step(1, AsNamed(reference, g1), worker1);
  a.join();
  b.join();
  reference.Step({g0, g1});
  ASSERT_TRUE(first.ok() && retry.ok() && other.ok())
      << first.status() << retry.status() << other.status();
  EXPECT_FALSE(first->replayed);
  EXPECT_TRUE(retry->replayed);
  ExpectMatches(reference, first->values, "first attempt");
  ExpectMatches(reference, retry->values, "retry");
  ExpectMatches(reference, other->values, "worker 1");
}

TEST_F(StepTest, AWorkerOnTheWrongStepIsRefusedWithTheExpectedStep) {
  const v1::SessionConfig config = ModelConfig("keller");
  client::Session session = Create(config);
  Reference reference(config);
  absl::StatusOr<client::StepResult> result =
      session.Step(3, AsNamed(reference, WorkerGradients(reference, 3, 0)));
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(result.status().message()), ::testing::HasSubstr("expects step 1"));
  EXPECT_THAT(std::string(result.status().message()), ::testing::HasSubstr("sent step 3"));
  ExpectMatches(reference, *session.GetParameters(), "after the refused step");
}

TEST_F(StepTest, AStragglerPastTheDeadlineAbortsTheStepWithNothingApplied) {
  v1::SessionConfig config = ModelConfig("muoneq_rowcol", /*world_size=*/4);
  config.set_straggler_timeout_seconds(0.3);
  client::Session session = Create(config);
  Reference reference(config);
  std::vector<std::vector<std::vector<float>>> grads;
  for (int w = 0; w < 4; ++w) grads.push_back(WorkerGradients(reference, 1, w));
  std::vector<std::vector<std::vector<float>>> three(grads.begin(), grads.begin() + 3);
  std::vector<absl::StatusOr<client::StepResult>> results;
  std::thread stepping([&] { results = StepAll(session, reference, 1, three, {}); });
  while (session.Info()->workers_pending() != 3) absl::SleepFor(absl::Milliseconds(1));
  clock_->Advance(absl::Milliseconds(299));
  absl::SleepFor(absl::Milliseconds(20));
  EXPECT_EQ(session.Info()->workers_pending(), 3) << "aborted before the straggler timeout";
  clock_->Advance(absl::Milliseconds(1));
  stepping.join();
  for (int w = 0; w < 3; ++w) {
    EXPECT_EQ(results[w].status().code(), absl::StatusCode::kAborted) << results[w].status();
    EXPECT_THAT(std::string(results[w].status().message()), ::testing::HasSubstr("worker(s) 3"));
  }
  ExpectMatches(reference, *session.GetParameters(), "after the aborted step");
  EXPECT_EQ(session.Info()->step(), 0);
  // The step can be run again by all four.
  results = StepAll(session, reference, 1, grads, {});
  reference.Step(grads);
  for (int w = 0; w < 4; ++w) {
    ASSERT_TRUE(results[w].ok()) << results[w].status();
    ExpectMatches(reference, results[w]->values, "rerun");
  }
}

TEST_F(StepTest, ACancelledWaitWithdrawsTheContribution) {
  const v1::SessionConfig config = ModelConfig("normuon", /*world_size=*/2);
  client::Session session = Create(config);
  Reference reference(config);
  client::StepOptions hurried;
  hurried.timeout = absl::Milliseconds(300);
  absl::StatusOr<client::StepResult> gone =
      session.Step(1, AsNamed(reference, WorkerGradients(reference, 1, 0)), hurried);
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kDeadlineExceeded) << gone.status();
  AwaitPending(session, 0);
  // Worker 0 sends other gradients; only those count.
  std::vector<std::vector<std::vector<float>>> grads = {WorkerGradients(reference, 1, 5),
                                                        WorkerGradients(reference, 1, 1)};
  auto results = StepAll(session, reference, 1, grads, {});
  reference.Step(grads);
  for (int w = 0; w < 2; ++w) {
    ASSERT_TRUE(results[w].ok()) << results[w].status();
    ExpectMatches(reference, results[w]->values, "after the withdrawal");
  }
}

TEST_F(StepTest, ACancelledRetryLeavesTheFirstAttemptsContribution) {
  const v1::SessionConfig config = ModelConfig("rmnp", /*world_size=*/2);
  client::Session session = Create(config);
  Reference reference(config);
  const auto g0 = WorkerGradients(reference, 1, 0);
  const auto g1 = WorkerGradients(reference, 1, 1);
  absl::StatusOr<client::StepResult> first;
  std::thread waiting([&] { first = session.Step(1, AsNamed(reference, g0)); });
  AwaitPending(session, 1);
  client::StepOptions hurried;
  hurried.timeout = absl::Milliseconds(300);
  EXPECT_EQ(session.Step(1, AsNamed(reference, g0), hurried).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(session.Info()->workers_pending(), 1) << "the retry withdrew the first attempt";
  client::StepOptions worker1;
  worker1.worker_id = 1;
  absl::StatusOr<client::StepResult> other = session.Step(1, AsNamed(reference, g1), worker1);
  waiting.join();
  reference.Step({g0, g1});
  ASSERT_TRUE(first.ok() && other.ok()) << first.status() << other.status();
  ExpectMatches(reference, first->values, "first attempt");
}

TEST_F(StepTest, WorkersMustAgreeOnTheStepsLrOverride) {
  v1::SessionConfig config = ModelConfig("rmnp", /*world_size=*/2);
  client::Session session = Create(config);
  Reference reference(config);
  const auto g0 = WorkerGradients(reference, 1, 0);
  const auto g1 = WorkerGradients(reference, 1, 1);
  client::StepOptions worker0, worker1;
  worker0.lr = 0.005;
  worker1.worker_id = 1;
  absl::StatusOr<client::StepResult> first;
  std::thread waiting([&] { first = session.Step(1, AsNamed(reference, g0), worker0); });
  AwaitPending(session, 1);
  absl::StatusOr<client::StepResult> disagreeing = session.Step(1, AsNamed(reference, g1), worker1);
  EXPECT_EQ(disagreeing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(disagreeing.status().message()),
              ::testing::HasSubstr("worker 1 sent lr none but worker 0 sent lr 0.005"));
  worker1.lr = 0.005;
  absl::StatusOr<client::StepResult> agreeing = session.Step(1, AsNamed(reference, g1), worker1);
  waiting.join();
  ASSERT_TRUE(first.ok() && agreeing.ok()) << first.status() << agreeing.status();
  for (int t = 0; t < reference.num_tensors(); ++t) {
    const OptimizerConfig c = reference.optimizer().spec(t).config;
    const double momentum = c.algorithm == Algorithm::kAdamW ? c.adamw.beta1 : c.matrix.momentum;
    ASSERT_TRUE(reference.optimizer().SetHyperparameters(t, 0.005, c.weight_decay, momentum).ok());
  }
  reference.Step({g0, g1});
  ExpectMatches(reference, first->values, "the agreed lr");
}

TEST_F(StepTest, ClientSideAccumulationAppliesTheOptimizerOncePerStep) {
  const v1::SessionConfig config = ModelConfig("moonlight");
  client::Session session = Create(config);
  Reference reference(config);
  for (int64_t step = 1; step <= 2; ++step) {
    // Four micro-batches summed on the client, one Step.
    std::vector<std::vector<float>> sum = WorkerGradients(reference, step, 0);
    for (int micro = 1; micro < 4; ++micro) {
      const auto g = WorkerGradients(reference, step, micro);
      for (size_t t = 0; t < sum.size(); ++t) {
        for (size_t i = 0; i < sum[t].size(); ++i) sum[t][i] += g[t][i];
      }
    }
    absl::StatusOr<client::StepResult> result = session.Step(step, AsNamed(reference, sum));
    ASSERT_TRUE(result.ok()) << result.status();
    reference.Step({sum});
    ExpectMatches(reference, result->values, "accumulated step");
  }
  const v1::SessionInfo info = *session.Info();
  for (const v1::TensorInfo& t : info.tensors()) EXPECT_EQ(t.steps_applied(), 2);
}

TEST_F(StepTest, DeltaResultIsNewMinusOldParameters) {
  v1::SessionConfig config = ModelConfig("torch");
  config.set_step_result(v1::STEP_RESULT_DELTA);
  client::Session session = Create(config);
  Reference reference(config);
  std::vector<std::vector<float>> before;
  for (int t = 0; t < reference.num_tensors(); ++t) before.push_back(reference.Parameters(t));
  const auto grads = WorkerGradients(reference, 1, 0);
  absl::StatusOr<client::StepResult> result = session.Step(1, AsNamed(reference, grads));
  ASSERT_TRUE(result.ok()) << result.status();
  reference.Step({grads});
  EXPECT_EQ(result->kind, v1::STEP_RESULT_DELTA);
  for (int t = 0; t < reference.num_tensors(); ++t) {
    const std::vector<float> after = reference.Parameters(t);
    std::vector<float> delta(after.size());
    for (size_t i = 0; i < after.size(); ++i) delta[i] = after[i] - before[t][i];
    EXPECT_TRUE(BitwiseEqual(result->values.at(reference.name(t)), delta)) << reference.name(t);
  }
}

TEST_F(StepTest, SkipStepPolicySkipsNonFiniteGradientsAndAdvances) {
  v1::SessionConfig config = ModelConfig("keller");
  config.set_non_finite_policy(v1::NON_FINITE_POLICY_SKIP_STEP);
  client::Session session = Create(config);
  Reference reference(config);
  auto grads = WorkerGradients(reference, 1, 0);
  grads[0][5] = std::numeric_limits<float>::quiet_NaN();
  grads[2][1] = std::numeric_limits<float>::infinity();
  absl::StatusOr<client::StepResult> skipped = session.Step(1, AsNamed(reference, grads));
  ASSERT_TRUE(skipped.ok()) << skipped.status();
  EXPECT_TRUE(skipped->skipped);
  EXPECT_EQ(skipped->nonfinite_values, 2);
  ExpectMatches(reference, skipped->values, "skipped step");
  const auto next = WorkerGradients(reference, 2, 0);
  absl::StatusOr<client::StepResult> result = session.Step(2, AsNamed(reference, next));
  ASSERT_TRUE(result.ok()) << result.status();
  reference.Step({next});
  ExpectMatches(reference, result->values, "step after the skipped one");
}

TEST_F(StepTest, StepLrOverrideAndHyperparameterUpdates) {
  const v1::SessionConfig config = ModelConfig("rmnp");
  client::Session session = Create(config);
  Reference reference(config);
  Optimizer& opt = reference.optimizer();
  // Step 1 with lr 0.001 for every group, this step only.
  const auto g1 = WorkerGradients(reference, 1, 0);
  client::StepOptions override_lr;
  override_lr.lr = 0.001;
  ASSERT_TRUE(session.Step(1, AsNamed(reference, g1), override_lr).ok());
  std::vector<OptimizerConfig> original;
  for (int t = 0; t < reference.num_tensors(); ++t) {
    original.push_back(opt.spec(t).config);
    const OptimizerConfig& c = original.back();
    const double momentum = c.algorithm == Algorithm::kAdamW ? c.adamw.beta1 : c.matrix.momentum;
    ASSERT_TRUE(opt.SetHyperparameters(t, 0.001, c.weight_decay, momentum).ok());
  }
  reference.Step({g1});
  // Then the matrices' lr becomes 0.005 and their momentum 0.9 from step 2 on.
  v1::HyperparamUpdate update;
  update.set_group("matrices");
  update.set_lr(0.005);
  update.set_momentum(0.9);
  ASSERT_TRUE(session.UpdateHyperparams({update}).ok());
  for (int t = 0; t < reference.num_tensors(); ++t) {
    const OptimizerConfig& c = original[t];
    if (c.algorithm == Algorithm::kAdamW) {
      ASSERT_TRUE(opt.SetHyperparameters(t, c.lr, c.weight_decay, c.adamw.beta1).ok());
    } else {
      ASSERT_TRUE(opt.SetHyperparameters(t, 0.005, c.weight_decay, 0.9).ok());
    }
  }
  const auto g2 = WorkerGradients(reference, 2, 0);
  absl::StatusOr<client::StepResult> result = session.Step(2, AsNamed(reference, g2));
  ASSERT_TRUE(result.ok()) << result.status();
  reference.Step({g2});
  ExpectMatches(reference, result->values, "after the updates");
  const v1::SessionInfo info = *session.Info();
  for (const v1::TensorInfo& t : info.tensors()) {
    if (t.config().group() == "matrices") {
      EXPECT_EQ(t.lr(), 0.005);
      EXPECT_EQ(t.momentum(), 0.9);
    }
  }
}

TEST_F(StepTest, HalfPrecisionWireAndSmallChunksRoundTrip) {
  const v1::SessionConfig config = ModelConfig("keller");
  client::Session session = Create(config);
  Reference reference(config);
  auto grads = WorkerGradients(reference, 1, 0);
  client::StepOptions options;
  options.wire_dtype = DType::kBF16;
  options.result_dtype = DType::kF16;
  options.chunk_bytes = 100;  // 50 bf16 values per chunk, tensors split unevenly
  absl::StatusOr<client::StepResult> result = session.Step(1, AsNamed(reference, grads), options);
  ASSERT_TRUE(result.ok()) << result.status();
  // The daemon saw the gradients rounded to bf16 and sent the parameters rounded to fp16.
  for (auto& g : grads) {
    for (float& x : g) x = formulas::RoundToBf16(x);
  }
  reference.Step({grads});
  for (int t = 0; t < reference.num_tensors(); ++t) {
    std::vector<float> expected = reference.Parameters(t);
    for (float& x : expected) x = formulas::RoundToHalf(x);
    EXPECT_TRUE(BitwiseEqual(result->values.at(reference.name(t)), expected)) << reference.name(t);
  }
  ExpectMatches(reference, *session.GetParameters(), "fp32 parameters on the daemon");
}

TEST_F(StepTest, UploadedParametersReplaceTheInitialOnes) {
  const v1::SessionConfig config = ModelConfig("dion");
  client::Session session = Create(config);
  Reference reference(config);
  std::vector<std::vector<float>> values;
  for (int t = 0; t < reference.num_tensors(); ++t) {
    values.push_back(Gradient(reference.count(t), 50 + t, 0, 0));
    ASSERT_TRUE(reference.optimizer().SetParameters(t, values.back()).ok());
  }
  ASSERT_TRUE(session.UploadParameters(AsNamed(reference, values), DType::kF32, 64).ok());
  ExpectMatches(reference, *session.GetParameters(), "after the upload");
  const auto grads = WorkerGradients(reference, 1, 0);
  absl::StatusOr<client::StepResult> result = session.Step(1, AsNamed(reference, grads));
  ASSERT_TRUE(result.ok()) << result.status();
  reference.Step({grads});
  ExpectMatches(reference, result->values, "step after the upload");
}

TEST_F(StepTest, AStreamCancelledWhileSendingGradientsChangesNothing) {
  const v1::SessionConfig config = ModelConfig("keller");
  client::Session session = Create(config);
  Reference reference(config);
  {
    // Header and the first chunk, then the client gives up.
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer " + session.token());
    auto stub = v1::Optimizer::NewStub(ConnectTo(*server_).channel());
    auto stream = stub->Step(&context);
    v1::StepRequest request;
    request.mutable_header()->set_session_id(session.id());
    request.mutable_header()->set_step(1);
    ASSERT_TRUE(stream->Write(request));
    const std::vector<float> half(reference.count(0) / 2, 1.0f);
    v1::TensorChunk* chunk = request.mutable_chunk();
    chunk->set_tensor(reference.name(0));
    chunk->set_dtype(v1::DTYPE_FP32);
    chunk->set_data(
        std::string(reinterpret_cast<const char*>(half.data()), half.size() * sizeof(float)));
    ASSERT_TRUE(stream->Write(request));
    context.TryCancel();
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  EXPECT_EQ(session.Info()->step(), 0);
  ExpectMatches(reference, *session.GetParameters(), "after the cancelled stream");
  const auto grads = WorkerGradients(reference, 1, 0);
  absl::StatusOr<client::StepResult> result = session.Step(1, AsNamed(reference, grads));
  ASSERT_TRUE(result.ok()) << result.status();
  reference.Step({grads});
  ExpectMatches(reference, result->values, "the step after the cancelled one");
}

TEST_F(StepTest, StreamsPerSessionAreBoundedByItsStagingQuota) {
  const v1::SessionConfig config = ModelConfig("keller");  // world_size 1: two streams at most
  client::Session session = Create(config);
  auto stub = v1::Optimizer::NewStub(ConnectTo(*server_).channel());
  struct Open {
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReaderWriter<v1::StepRequest, v1::StepResponse>> stream;
  };
  std::vector<std::unique_ptr<Open>> open;
  auto start = [&] {
    auto o = std::make_unique<Open>();
    o->context.AddMetadata("authorization", "Bearer " + session.token());
    o->stream = stub->Step(&o->context);
    v1::StepRequest request;
    request.mutable_header()->set_session_id(session.id());
    request.mutable_header()->set_step(1);
    o->stream->Write(request);
    open.push_back(std::move(o));
  };
  start();
  start();
  while (server_->steps_in_flight() < 2) absl::SleepFor(absl::Milliseconds(1));
  absl::SleepFor(absl::Milliseconds(50));  // both past their header checks
  start();
  open.back()->stream->WritesDone();
  const grpc::Status third = open.back()->stream->Finish();
  EXPECT_EQ(third.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(third.error_message(), ::testing::HasSubstr("its limit (world_size + 1)"));
  for (size_t i = 0; i < 2; ++i) {
    open[i]->context.TryCancel();
    open[i]->stream->Finish();
  }
  // Once they are gone, steps work again.
  Reference reference(config);
  while (server_->steps_in_flight() > 0) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_TRUE(session.Step(1, AsNamed(reference, WorkerGradients(reference, 1, 0))).ok());
}

TEST_F(StepTest, HalfPrecisionParameterUploadsWidenExactly) {
  const v1::SessionConfig config = ModelConfig("rmnp");
  client::Session session = Create(config);
  Reference reference(config);
  std::vector<std::vector<float>> values;
  for (int t = 0; t < reference.num_tensors(); ++t) {
    values.push_back(Gradient(reference.count(t), 70 + t, 0, 0));
  }
  ASSERT_TRUE(session.UploadParameters(AsNamed(reference, values), DType::kF16).ok());
  absl::StatusOr<std::map<std::string, std::vector<float>>> got = session.GetParameters();
  ASSERT_TRUE(got.ok());
  for (int t = 0; t < reference.num_tensors(); ++t) {
    std::vector<float> expected = values[t];
    for (float& x : expected) x = formulas::RoundToHalf(x);
    EXPECT_TRUE(BitwiseEqual(got->at(reference.name(t)), expected)) << reference.name(t);
  }
}

TEST_F(StepTest, TensorsWithoutGradientsAreLeftAlone) {
  const v1::SessionConfig config = ModelConfig("keller");
  client::Session session = Create(config);
  Reference reference(config);
  auto grads = WorkerGradients(reference, 1, 0);
  std::vector<client::NamedTensor> only_hidden = {{reference.name(0), grads[0]}};
  absl::StatusOr<client::StepResult> result = session.Step(1, only_hidden);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->tensors_updated, 1);
  ASSERT_TRUE(reference.optimizer().SetGradient(0, grads[0]).ok());
  const bool present[] = {true, false, false};
  ASSERT_TRUE(reference.optimizer().Step(present).ok());
  ExpectMatches(reference, result->values, "partial step");
}

// --- StepSmall: the one-message step (issue 18) has Step's semantics and results. ---

client::StepOptions Path(client::StepPath path) {
  client::StepOptions options;
  options.path = path;
  return options;
}

TEST_F(StepTest, OneMessageStepsMixWithStreamedOnesAndGiveTheSameBits) {
  // Four workers, two on each RPC, over three steps, with a retry of a finished step on the
  // other path: every worker gets the kernels library's parameters bit for bit.
  const v1::SessionConfig config = ModelConfig("normuon", /*world_size=*/4);
  client::Session session = Create(config);
  Reference reference(config);
  for (int64_t step = 1; step <= 3; ++step) {
    std::vector<std::vector<std::vector<float>>> grads;
    for (int w = 0; w < 4; ++w) grads.push_back(WorkerGradients(reference, step, w));
    std::vector<absl::StatusOr<client::StepResult>> results(4, absl::UnknownError("not run"));
    std::vector<std::thread> workers;
    for (int w = 0; w < 4; ++w) {
      workers.emplace_back([&, w] {
        client::StepOptions options =
            Path((w + step) % 2 == 0 ? client::StepPath::kSmall : client::StepPath::kStream);
        options.worker_id = w;
        results[w] = session.Step(step, AsNamed(reference, grads[w]), options);
      });
    }
    for (std::thread& t : workers) t.join();
    reference.Step(grads);
    for (int w = 0; w < 4; ++w) {
      ASSERT_TRUE(results[w].ok()) << "worker " << w << ": " << results[w].status();
      ExpectMatches(reference, results[w]->values, absl::StrCat("worker ", w, " step ", step));
    }
    client::StepOptions retry =
        Path(step % 2 ? client::StepPath::kSmall : client::StepPath::kStream);
    retry.worker_id = 1;
    absl::StatusOr<client::StepResult> again =
        session.Step(step, AsNamed(reference, WorkerGradients(reference, 99, 1)), retry);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_TRUE(again->replayed);
    ExpectMatches(reference, again->values, absl::StrCat("retry of step ", step));
  }
}

TEST_F(StepTest, OneMessageStepErrorsAreStepsErrors) {
  const v1::SessionConfig config = ModelConfig("keller");
  client::Session session = Create(config);
  Reference reference(config);
  const client::StepOptions small = Path(client::StepPath::kSmall);
  absl::StatusOr<client::StepResult> wrong =
      session.Step(3, AsNamed(reference, WorkerGradients(reference, 3, 0)), small);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(wrong.status().message()), ::testing::HasSubstr("expects step 1"));
  std::vector<std::vector<float>> bad = WorkerGradients(reference, 1, 0);
  bad[0][5] = std::numeric_limits<float>::quiet_NaN();
  absl::StatusOr<client::StepResult> nan = session.Step(1, AsNamed(reference, bad), small);
  EXPECT_EQ(nan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(nan.status().message()), ::testing::HasSubstr("element 5 is nan"));
  ExpectMatches(reference, *session.GetParameters(), "after the refused one-message steps");
  EXPECT_EQ(session.Info()->step(), 0);
}

TEST_F(StepTest, ResultsTooLargeForOneMessageAreRefusedBeforeTheyCountAndAutoStreams) {
  // 1.5M fp32 parameters: 6 MiB of results, past the 4 MiB message. The gradients travel in bf16
  // (3 MiB), so they alone would fit.
  const v1::SessionConfig config =
      MakeConfig({{"v", "adamw"}}, {{"big", {1536 * 1024}, "v"}}, /*world_size=*/1);
  client::Session session = Create(config);
  Reference reference(config);
  const auto grads = WorkerGradients(reference, 1, 0);
  client::StepOptions small = Path(client::StepPath::kSmall);
  small.wire_dtype = DType::kBF16;
  absl::StatusOr<client::StepResult> refused = session.Step(1, AsNamed(reference, grads), small);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()),
              ::testing::HasSubstr("more than one message holds"));
  EXPECT_EQ(session.Info()->step(), 0) << "nothing counted";
  client::StepOptions automatic = Path(client::StepPath::kAuto);
  automatic.wire_dtype = DType::kBF16;
  absl::StatusOr<client::StepResult> streamed =
      session.Step(1, AsNamed(reference, grads), automatic);
  ASSERT_TRUE(streamed.ok()) << streamed.status();
  EXPECT_FALSE(streamed->replayed);
  EXPECT_EQ(session.Info()->step(), 1);
}

}  // namespace
}  // namespace optd::testing
