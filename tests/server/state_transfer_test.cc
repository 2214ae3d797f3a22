// ExportState and ImportState (issue 19, part 3): a session's whole optimizer state leaves the
// daemon and comes back into another session, which then steps exactly as the original would;
// an export never mixes two steps; every bad import is refused whole (bad_input_test). And
// AddTensors (part 6): a live session takes new tensors, the others untouched.
#include <functional>

#include "server/session.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {
namespace {

using ::testing::HasSubstr;
using Records = std::map<std::pair<std::string, std::string>, std::vector<float>>;

class StateTransferTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    state_dir_ = MakeTempDir("state_transfer");
    server_ = StartServer(LoopbackOptions(state_dir_));
    ASSERT_NE(server_, nullptr);
  }

  std::string state_dir_;
  std::unique_ptr<server::Server> server_;
};

// Steps `first`..`last` on every session and on `reference`, the same gradients to each.
void StepAlike(const std::vector<client::Session*>& sessions, Reference& reference, int64_t first,
               int64_t last) {
  for (int64_t step = first; step <= last; ++step) {
    const auto grads = WorkerGradients(reference, step, 0);
    for (client::Session* session : sessions) {
      absl::StatusOr<client::StepResult> result = session->Step(step, AsNamed(reference, grads));
      ASSERT_TRUE(result.ok()) << "step " << step << ": " << result.status();
    }
    reference.Step({grads});
  }
}

// The kernels library's own records of `reference` after its steps: what an export must hold.
Records ReferenceRecords(Reference& reference) {
  Records records;
  Optimizer& optimizer = reference.optimizer();
  for (int t = 0; t < reference.num_tensors(); ++t) {
    records[{reference.name(t), ""}] = reference.Parameters(t);
    for (const StateBuffer& b : optimizer.state(t)) {
      std::vector<float> values(static_cast<size_t>(b.count));
      EXPECT_TRUE(optimizer.GetState(t, b.name, absl::MakeSpan(values)).ok());
      records[{reference.name(t), b.name}] = values;
    }
  }
  return records;
}

void ExpectSameRecords(const Records& got, const Records& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (const auto& [key, values] : want) {
    auto it = got.find(key);
    ASSERT_NE(it, got.end()) << what << ": no record " << key.first << "/" << key.second;
    EXPECT_TRUE(BitwiseEqual(it->second, values))
        << what << ": record " << key.first << "/" << key.second << " differs";
  }
}

// ModelConfig(preset); "keller_auto" is keller choosing its steps and direction every other step
// (choices the export must carry: the import lands between two decisions).
v1::SessionConfig TransferConfig(const std::string& param) {
  if (param != "keller_auto") return ModelConfig(param);
  v1::SessionConfig config = ModelConfig("keller");
  for (v1::GroupConfig& g : *config.mutable_groups()) {
    if (g.name() == "matrices") AddOverrides(g, AutoModes(2));
  }
  return config;
}

TEST_P(StateTransferTest, AnImportedSessionStepsOnAsTheExportedOneBitForBit) {
  const v1::SessionConfig config = TransferConfig(GetParam());
  client::Client c = ConnectTo(*server_);
  client::Session source = *c.CreateSession(config);
  Reference reference(config);
  ASSERT_NO_FATAL_FAILURE(StepAlike({&source}, reference, 1, 3));
  ASSERT_TRUE(source
                  .UpdateHyperparams({[] {
                    v1::HyperparamUpdate u;
                    u.set_group("vectors");
                    u.set_lr(1.5e-3);
                    return u;
                  }()})
                  .ok());

  // 8 KiB chunks: records of several chunks.
  absl::StatusOr<client::SessionState> exported = source.ExportState(true, 8 << 10);
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(exported->header.step(), 3);
  ExpectSameRecords(exported->records, ReferenceRecords(reference), "the export");
  for (const v1::TensorState& t : exported->header.tensors()) {
    EXPECT_EQ(t.steps_applied(), 3);
    // Decided at step 2, applied at steps 3 and 4.
    if (t.has_auto_choices()) {
      EXPECT_EQ(t.auto_choices().decided_at_step(), 2) << t.name();
    }
  }

  // A session of the same tensors, other initial values, takes the state.
  v1::SessionConfig other = config;
  for (v1::TensorConfig& t : *other.mutable_tensors()) t.mutable_normal()->set_seed(99);
  client::Session target = *c.CreateSession(other);
  absl::StatusOr<v1::ImportStateResponse> imported = target.ImportState(*exported, 4 << 10);
  ASSERT_TRUE(imported.ok()) << imported.status();
  EXPECT_EQ(imported->step(), 3);
  EXPECT_EQ(imported->checkpoint_step(), 3) << imported->checkpoint_error();
  absl::StatusOr<client::SessionState> again = target.ExportState();
  ASSERT_TRUE(again.ok()) << again.status();
  ExpectSameRecords(again->records, exported->records, "the imported session's export");
  EXPECT_EQ(again->header.hyperparams_size(), exported->header.hyperparams_size());
  for (int g = 0; g < again->header.hyperparams_size(); ++g) {
    EXPECT_EQ(again->header.hyperparams(g).SerializeAsString(),
              exported->header.hyperparams(g).SerializeAsString());
  }

  // Both step on alike, and as the kernels library does (with the changed AdamW rate).
  for (const v1::HyperparamUpdate& h : exported->header.hyperparams()) {
    if (h.group() != "vectors") continue;
    EXPECT_DOUBLE_EQ(h.lr(), 1.5e-3);
    for (int t = 0; t < reference.num_tensors(); ++t) {
      if (config.tensors(t).group() != "vectors") continue;
      ASSERT_TRUE(
          reference.optimizer().SetHyperparameters(t, h.lr(), h.weight_decay(), h.momentum()).ok());
    }
  }
  ASSERT_NO_FATAL_FAILURE(StepAlike({&source, &target}, reference, 4, 5));
  ExpectMatches(reference, *target.GetParameters(), "the imported session after 2 steps");
  ExpectMatches(reference, *source.GetParameters(), "the exported session after 2 steps");

  // The import was checkpointed: a restore goes back to it.
  ASSERT_EQ(*target.Restore(), 3);
  ExpectSameRecords(target.ExportState()->records, exported->records, "restored after import");
}

INSTANTIATE_TEST_SUITE_P(Presets, StateTransferTest,
                         ::testing::Values("keller", "normuon", "rmnp", "adamw", "keller_auto"));

// A large tensor read in small chunks: the client reads the header, changes the session's
// hyperparameters, then reads on. The export must end ABORTED rather than send records of two
// states.
TEST(StateExportTest, AChangeDuringTheExportAbortsIt) {
  std::unique_ptr<server::Server> server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  client::Client c = ConnectTo(*server);
  const v1::SessionConfig config =
      MakeConfig({{"matrices", "keller"}}, {{"w", {2048, 2048}, "matrices"}});
  client::Session session = *c.CreateSession(config);
  auto stub = v1::Optimizer::NewStub(c.channel());
  grpc::ClientContext context;
  context.AddMetadata("authorization", "Bearer " + session.token());
  v1::ExportStateRequest request;
  request.set_session_id(session.id());
  request.set_chunk_bytes(4096);
  auto reader = stub->ExportState(&context, request);
  v1::ExportStateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  ASSERT_TRUE(response.has_header());
  // A change the export must not straddle: new hyperparameters (a unary call, so the test does
  // not hang on how fast a bulk upload gets through beside the unread export).
  v1::HyperparamUpdate update;
  update.set_group("matrices");
  update.set_lr(0.01);
  ASSERT_TRUE(session.UpdateHyperparams({update}).ok());
  int64_t chunks = 0;
  while (reader->Read(&response)) ++chunks;
  const grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::ABORTED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("changed while its state of step 0"));
  // 32 MiB of parameters and momentum in 4 KiB chunks: far more than flow control lets ahead.
  EXPECT_LT(chunks, 2 * 2048 * 2048 / 1024);
  // Unchanged, it goes through whole, with the new rate.
  absl::StatusOr<client::SessionState> whole = session.ExportState();
  ASSERT_TRUE(whole.ok()) << whole.status();
  ASSERT_EQ(whole->header.hyperparams_size(), 1);
  EXPECT_EQ(whole->header.hyperparams(0).lr(), 0.01);
  EXPECT_TRUE(BitwiseEqual(whole->records[{"w", ""}], (*session.GetParameters())["w"]));
}

// AddTensors: a live session takes a matrix into an existing group (same shape: it joins that
// batch) and a new AdamW group; the others go on as they were, the new ones from their init.
TEST(AddTensorsTest, NewTensorsJoinAtTheNextStepAndTheOthersGoOnBitForBit) {
  const std::string state_dir = MakeTempDir("add_tensors");
  std::unique_ptr<server::Server> server = StartServer(LoopbackOptions(state_dir));
  ASSERT_NE(server, nullptr);
  client::Client c = ConnectTo(*server);
  const v1::SessionConfig config = ModelConfig("keller");
  client::Session session = *c.CreateSession(config);
  Reference before(config);
  ASSERT_NO_FATAL_FAILURE(StepAlike({&session}, before, 1, 2));
  v1::SessionConfig merged = config;
  v1::TensorConfig* extra = merged.add_tensors();
  extra->set_name("extra");
  extra->add_shape(24);
  extra->add_shape(40);
  extra->set_group("matrices");
  extra->mutable_normal()->set_seed(7);
  extra->mutable_normal()->set_std(0.5);
  v1::GroupConfig* heads = merged.add_groups();
  heads->set_name("heads");
  heads->set_preset("adamw");
  v1::TensorConfig* gain = merged.add_tensors();
  gain->set_name("gain");
  gain->add_shape(40);
  gain->set_group("heads");
  gain->mutable_normal()->set_seed(8);
  gain->mutable_normal()->set_std(0.5);
  absl::StatusOr<v1::SessionInfo> info = session.AddTensors({*extra, *gain}, {*heads});
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->step(), 2);
  EXPECT_EQ(info->tensors_size(), 5);
  EXPECT_EQ(info->checkpoint_step(), 2);

  // The extended session's reference: the old tensors as `before` holds them, the new at init.
  Reference after(merged);
  for (int t = 0; t < before.num_tensors(); ++t) {
    ASSERT_TRUE(after.optimizer().SetParameters(t, before.Parameters(t)).ok());
    for (const StateBuffer& b : before.optimizer().state(t)) {
      std::vector<float> values(static_cast<size_t>(b.count));
      ASSERT_TRUE(before.optimizer().GetState(t, b.name, absl::MakeSpan(values)).ok());
      ASSERT_TRUE(after.optimizer().SetState(t, b.name, values).ok());
    }
    ASSERT_TRUE(after.optimizer().SetStepsApplied(t, before.optimizer().steps_applied(t)).ok());
  }
  ExpectMatches(after, *session.GetParameters(), "right after AddTensors");
  ASSERT_NO_FATAL_FAILURE(StepAlike({&session}, after, 3, 4));
  ExpectMatches(after, *session.GetParameters(), "two steps after AddTensors");
  // Its checkpoint holds the new tensors: a restore goes back to step 2 with all five.
  ASSERT_EQ(*session.Restore(), 2);
  EXPECT_EQ(session.Info()->tensors_size(), 5);
}

}  // namespace
}  // namespace optd::testing
