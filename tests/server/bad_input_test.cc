// Every bad input gets its precise status and a message naming the problem, and leaves every
// parameter and state buffer byte-identical (compared through GetParams and a checkpoint).
#include <functional>

#include "server/checkpoint_file.h"
#include "server/file_system.h"
#include "server/session.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr int64_t kRows = 16, kCols = 24;

// What a session holds: parameters, every checkpoint record but the meta's timestamp, the step,
// hyperparameters and steps applied.
struct Snapshot {
  std::map<std::string, std::vector<float>> parameters;
  std::map<std::string, std::string> records;
  std::string info;

  bool operator==(const Snapshot&) const = default;
};

Snapshot Take(client::Session& session) {
  Snapshot s;
  s.parameters = *session.GetParameters();
  absl::StatusOr<v1::CheckpointResponse> checkpoint = session.Checkpoint();
  EXPECT_TRUE(checkpoint.ok()) << checkpoint.status();
  absl::StatusOr<server::CheckpointReader> reader =
      server::CheckpointReader::Open(server::PosixFileSystem(), checkpoint->path());
  EXPECT_TRUE(reader.ok()) << reader.status();
  for (const auto& [name, data] : reader->records()) {
    if (name == "meta") {
      v1::SessionCheckpoint meta;
      meta.ParseFromArray(data.data(), static_cast<int>(data.size()));
      meta.clear_written_unix_micros();
      s.records[name] = meta.SerializeAsString();
    } else {
      s.records[name] = std::string(data);
    }
  }
  s.info = session.Info()->SerializeAsString();
  return s;
}

// Raw calls, for requests the client library would never build.
struct Raw {
  std::shared_ptr<v1::Optimizer::Stub> stub;

  static void Authorize(grpc::ClientContext& context, const std::string& authorization) {
    if (!authorization.empty()) context.AddMetadata("authorization", authorization);
  }

  absl::Status Step(const std::string& authorization,
                    const std::vector<v1::StepRequest>& requests) {
    grpc::ClientContext context;
    Authorize(context, authorization);
    auto stream = stub->Step(&context);
    for (const v1::StepRequest& r : requests) {
      if (!stream->Write(r)) break;
    }
    stream->WritesDone();
    v1::StepResponse response;
    while (stream->Read(&response)) {
    }
    return client::FromGrpcStatus(stream->Finish());
  }

  // The same requests as one StepSmall call: the first header and every chunk (a stream's
  // ordering has no one-message form).
  absl::Status StepSmall(const std::string& authorization,
                         const std::vector<v1::StepRequest>& requests) {
    grpc::ClientContext context;
    Authorize(context, authorization);
    v1::StepSmallRequest request;
    for (const v1::StepRequest& r : requests) {
      if (r.has_header() && !request.has_header()) *request.mutable_header() = r.header();
      if (r.has_chunk()) *request.add_chunks() = r.chunk();
    }
    v1::StepSmallResponse response;
    return client::FromGrpcStatus(stub->StepSmall(&context, request, &response));
  }

  absl::Status Import(const std::string& authorization,
                      const std::vector<v1::ImportStateRequest>& requests) {
    grpc::ClientContext context;
    Authorize(context, authorization);
    v1::ImportStateResponse response;
    auto writer = stub->ImportState(&context, &response);
    for (const v1::ImportStateRequest& r : requests) {
      if (!writer->Write(r)) break;
    }
    writer->WritesDone();
    return client::FromGrpcStatus(writer->Finish());
  }

  absl::Status Export(const std::string& authorization, const v1::ExportStateRequest& request) {
    grpc::ClientContext context;
    Authorize(context, authorization);
    auto reader = stub->ExportState(&context, request);
    v1::ExportStateResponse response;
    while (reader->Read(&response)) {
    }
    return client::FromGrpcStatus(reader->Finish());
  }

  absl::Status Upload(const std::string& authorization,
                      const std::vector<v1::UploadParamsRequest>& requests) {
    grpc::ClientContext context;
    Authorize(context, authorization);
    v1::UploadParamsResponse response;
    auto writer = stub->UploadParams(&context, &response);
    for (const v1::UploadParamsRequest& r : requests) {
      if (!writer->Write(r)) break;
    }
    writer->WritesDone();
    return client::FromGrpcStatus(writer->Finish());
  }
};

v1::StepRequest Header(const std::string& session, int64_t step, int worker = 0) {
  v1::StepRequest r;
  r.mutable_header()->set_session_id(session);
  r.mutable_header()->set_step(step);
  r.mutable_header()->set_worker_id(worker);
  return r;
}

v1::TensorChunk Chunk(const std::string& tensor, int64_t offset, const std::vector<float>& values,
                      v1::DType dtype = v1::DTYPE_FP32) {
  v1::TensorChunk c;
  c.set_tensor(tensor);
  c.set_offset(offset);
  c.set_dtype(dtype);
  c.set_data(
      std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float)));
  return c;
}

v1::StepRequest StepChunk(v1::TensorChunk chunk) {
  v1::StepRequest r;
  *r.mutable_chunk() = std::move(chunk);
  return r;
}

v1::UploadParamsRequest UploadChunk(v1::TensorChunk chunk) {
  v1::UploadParamsRequest r;
  *r.mutable_chunk() = std::move(chunk);
  return r;
}

std::vector<float> Ones(int64_t n) { return std::vector<float>(static_cast<size_t>(n), 1.0f); }

struct BadInput {
  std::string name;
  absl::StatusCode code;
  std::string message;  // a substring the message must hold
};

class BadInputTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    state_dir_ = new std::string(MakeTempDir("bad_input"));
    server::ServerOptions options = LoopbackOptions(*state_dir_);
    options.sessions.max_session_bytes = 64 << 20;
    server_ = StartServer(options).release();
  }
  static void TearDownTestSuite() {
    delete server_;
    delete state_dir_;
  }

  void SetUp() override {
    client::Client c = ConnectTo(*server_);
    config_ = MakeConfig({{"matrices", "keller"}, {"vectors", "adamw"}},
                         {{"w", {kRows, kCols}, "matrices"}, {"b", {kCols}, "vectors"}});
    // The matrices choose their steps and direction (state that a refusal must leave alone).
    AddOverrides(*config_.mutable_groups(0), {{"ns.steps", "auto"}, {"direction", "auto"}});
    victim_ = std::make_unique<client::Session>(*c.CreateSession(config_));
    other_ = std::make_unique<client::Session>(*c.CreateSession(config_));
    // One real step first, so momentum and Adam moments are not zero.
    Reference reference(config_);
    ASSERT_TRUE(victim_->Step(1, AsNamed(reference, WorkerGradients(reference, 1, 0))).ok());
    raw_.stub = v1::Optimizer::NewStub(c.channel());
  }

  std::string Bearer(const client::Session& s) const { return "Bearer " + s.token(); }

  // Every bad step input through Step (a stream) or StepSmall (one message each way).
  void CheckStepInputs(bool one_message);

  // Runs `call`, checks its status, and checks the victim's state did not change.
  void Check(const BadInput& expected, const std::function<absl::Status()>& call) {
    SCOPED_TRACE(expected.name);
    const Snapshot before = Take(*victim_);
    const absl::Status status = call();
    EXPECT_EQ(status.code(), expected.code) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr(expected.message));
    EXPECT_TRUE(Take(*victim_) == before) << "state changed";
  }

  static server::Server* server_;
  static std::string* state_dir_;
  v1::SessionConfig config_;
  std::unique_ptr<client::Session> victim_, other_;
  Raw raw_;
};

server::Server* BadInputTest::server_ = nullptr;
std::string* BadInputTest::state_dir_ = nullptr;

TEST_F(BadInputTest, StepStreams) { CheckStepInputs(/*one_message=*/false); }

TEST_F(BadInputTest, OneMessageSteps) { CheckStepInputs(/*one_message=*/true); }

void BadInputTest::CheckStepInputs(bool one_message) {
  const std::string id = victim_->id();
  const std::string bearer = Bearer(*victim_);
  const std::vector<float> w = Ones(kRows * kCols);
  const std::vector<float> b = Ones(kCols);
  auto step = [&](std::vector<v1::StepRequest> requests, const std::string& auth = "") {
    return [this, requests, auth, bearer, one_message] {
      const std::string& authorization = auth.empty() ? bearer : auth;
      return one_message ? raw_.StepSmall(authorization, requests)
                         : raw_.Step(authorization, requests);
    };
  };
  auto with = [&](v1::StepRequest header, std::vector<v1::TensorChunk> chunks) {
    std::vector<v1::StepRequest> r = {std::move(header)};
    for (auto& c : chunks) r.push_back(StepChunk(std::move(c)));
    return r;
  };
  std::vector<float> nan = w;
  nan[5] = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> inf = b;
  inf[3] = -std::numeric_limits<float>::infinity();
  std::vector<float> huge = b;
  huge[0] = 1e30f;
  v1::TensorChunk ragged = Chunk("b", 0, b);
  ragged.mutable_data()->resize(7);
  v1::TensorChunk unspecified = Chunk("b", 0, b, v1::DTYPE_UNSPECIFIED);
  v1::TensorChunk empty = Chunk("b", 0, {});
  v1::StepRequest bad_lr = Header(id, 2);
  bad_lr.mutable_header()->set_lr(-1);
  v1::StepRequest big_chunks = Header(id, 2);
  big_chunks.mutable_header()->set_chunk_bytes(int64_t{8} << 20);
  v1::StepRequest bad_result_dtype = Header(id, 2);
  bad_result_dtype.mutable_header()->set_result_dtype(static_cast<v1::DType>(9));
  const std::vector<float> oversize(5 << 18, 0.5f);  // 5 MiB in one message

  // A session token names its own session only: an unknown id answers as another session's
  // does, so the token cannot probe which ids exist (the admin token gets NOT_FOUND,
  // AdminTokenTest).
  Check({"unknown session", absl::StatusCode::kPermissionDenied, "not to session 'nope'"},
        step(with(Header("nope", 2), {Chunk("b", 0, b)})));
  Check({"unknown tensor", absl::StatusCode::kNotFound, "has no tensor 'ghost'"},
        step(with(Header(id, 2), {Chunk("ghost", 0, b)})));
  // A name the client made up is echoed bounded and with its control bytes escaped, so the
  // status fits gRPC's trailers and the daemon's log line stays one line.
  Check({"unknown tensor with a long name", absl::StatusCode::kNotFound,
         absl::StrCat("has no tensor '", std::string(200, 'g'))},
        step(with(Header(id, 2), {Chunk(std::string(100000, 'g'), 0, b)})));
  Check({"unknown tensor with control bytes", absl::StatusCode::kNotFound,
         "has no tensor 'a\\x0a2026-01-01 optd: forged\\x00'"},
        step(with(Header(id, 2), {Chunk(std::string("a\n2026-01-01 optd: forged") + '\0', 0, b)})));
  Check({"offset past the end", absl::StatusCode::kInvalidArgument,
         "covers elements [10, 34) outside the tensor's 24 elements"},
        step(with(Header(id, 2), {Chunk("b", 10, b)})));
  Check({"negative offset", absl::StatusCode::kInvalidArgument, "outside the tensor"},
        step(with(Header(id, 2), {Chunk("b", -1, {1.0f})})));
  Check({"overlapping chunks", absl::StatusCode::kInvalidArgument,
         "at elements [4, 8) overlaps elements [0, 12)"},
        step(with(Header(id, 2), {Chunk("b", 0, Ones(12)), Chunk("b", 4, Ones(4))})));
  Check({"missing chunk", absl::StatusCode::kInvalidArgument,
         "tensor 'b' got 20 of its 24 elements; elements [8, 12) are missing"},
        step(with(Header(id, 2),
                  {Chunk("w", 0, w), Chunk("b", 0, Ones(8)), Chunk("b", 12, Ones(12))})));
  Check({"unspecified dtype", absl::StatusCode::kInvalidArgument, "is not a wire dtype"},
        step(with(Header(id, 2), {unspecified})));
  Check({"ragged bytes", absl::StatusCode::kInvalidArgument, "not a whole number of fp32"},
        step(with(Header(id, 2), {ragged})));
  Check({"empty chunk", absl::StatusCode::kInvalidArgument, "is empty"},
        step(with(Header(id, 2), {empty})));
  Check({"NaN gradient", absl::StatusCode::kInvalidArgument, "tensor 'w' element 5 is nan"},
        step(with(Header(id, 2), {Chunk("w", 0, nan), Chunk("b", 0, b)})));
  Check({"infinite gradient", absl::StatusCode::kInvalidArgument, "tensor 'b' element 3 is -inf"},
        step(with(Header(id, 2), {Chunk("w", 0, w), Chunk("b", 0, inf)})));
  Check({"gradient beyond 2^63", absl::StatusCode::kInvalidArgument, "must be finite and within"},
        step(with(Header(id, 2), {Chunk("w", 0, w), Chunk("b", 0, huge)})));
  Check({"wrong step", absl::StatusCode::kFailedPrecondition, "expects step 2"},
        step(with(Header(id, 5), {Chunk("b", 0, b)})));
  Check(
      {"worker outside world", absl::StatusCode::kInvalidArgument, "worker_id 3 is outside [0, 1)"},
      step(with(Header(id, 2, 3), {Chunk("b", 0, b)})));
  if (one_message) {
    Check({"no header", absl::StatusCode::kInvalidArgument, "session_id is empty"},
          step({StepChunk(Chunk("b", 0, b))}));
  } else {
    Check({"chunk before header", absl::StatusCode::kInvalidArgument, "must start with a header"},
          step({StepChunk(Chunk("b", 0, b))}));
    Check({"second header", absl::StatusCode::kInvalidArgument, "one header, then only chunks"},
          step({Header(id, 2), Header(id, 2)}));
  }
  Check({"invalid step lr", absl::StatusCode::kInvalidArgument, "step lr -1"},
        step(with(bad_lr, {Chunk("b", 0, b)})));
  Check({"result chunks too large", absl::StatusCode::kInvalidArgument, "chunk_bytes 8388608"},
        step(with(big_chunks, {Chunk("b", 0, b)})));
  Check({"unknown result dtype", absl::StatusCode::kInvalidArgument, "dtype 9"},
        step(with(bad_result_dtype, {Chunk("b", 0, b)})));
  Check({"oversize message", absl::StatusCode::kResourceExhausted, "larger than max"},
        step(with(Header(id, 2), {Chunk("b", 0, oversize)})));
  Check({"missing token", absl::StatusCode::kUnauthenticated, "missing 'authorization"}, [&] {
    grpc::ClientContext context;
    if (one_message) {
      v1::StepSmallRequest request;
      *request.mutable_header() = Header(id, 2).header();
      v1::StepSmallResponse response;
      return client::FromGrpcStatus(raw_.stub->StepSmall(&context, request, &response));
    }
    auto stream = raw_.stub->Step(&context);
    stream->Write(Header(id, 2));
    stream->WritesDone();
    return client::FromGrpcStatus(stream->Finish());
  });
  Check({"not a bearer credential", absl::StatusCode::kUnauthenticated, "not 'Bearer <token>'"},
        step(with(Header(id, 2), {Chunk("b", 0, b)}), "Basic dXNlcjpwYXNz"));
  Check({"unknown token", absl::StatusCode::kUnauthenticated, "not valid for any session"},
        step(with(Header(id, 2), {Chunk("b", 0, b)}), "Bearer optd_0123"));
  Check({"another session's token", absl::StatusCode::kPermissionDenied,
         absl::StrCat("belongs to session '", other_->id(), "', not to session '", id, "'")},
        step(with(Header(id, 2), {Chunk("b", 0, b)}), Bearer(*other_)));
}

TEST_F(BadInputTest, WorkersThatDisagreeOnTheirTensors) {
  client::Client c = ConnectTo(*server_);
  v1::SessionConfig two = config_;
  two.set_world_size(2);
  client::Session pair = *c.CreateSession(two);
  Reference reference(two);
  const auto grads = WorkerGradients(reference, 1, 0);
  absl::StatusOr<client::StepResult> first;
  std::thread worker0([&] { first = pair.Step(1, AsNamed(reference, grads)); });
  for (int i = 0; i < 500 && pair.Info()->workers_pending() != 1; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  client::StepOptions worker1;
  worker1.worker_id = 1;
  std::vector<client::NamedTensor> only_w = {{"w", grads[0]}};
  absl::StatusOr<client::StepResult> mismatched = pair.Step(1, only_w, worker1);
  EXPECT_EQ(mismatched.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(mismatched.status().message()),
              HasSubstr("worker 1 sent gradients for {w} but worker 0 sent {w, b}"));
  absl::StatusOr<client::StepResult> second = pair.Step(1, AsNamed(reference, grads), worker1);
  worker0.join();
  ASSERT_TRUE(first.ok() && second.ok()) << first.status() << second.status();
}

TEST_F(BadInputTest, ParameterUploads) {
  const std::string id = victim_->id();
  const std::string bearer = Bearer(*victim_);
  auto upload = [&](std::vector<v1::TensorChunk> chunks, const std::string& auth = "",
                    const std::string& session = "") {
    std::vector<v1::UploadParamsRequest> requests(1);
    requests[0].mutable_header()->set_session_id(session.empty() ? id : session);
    for (auto& c : chunks) requests.push_back(UploadChunk(std::move(c)));
    return [this, requests, auth, bearer] {
      return raw_.Upload(auth.empty() ? bearer : auth, requests);
    };
  };
  std::vector<float> nan = Ones(kCols);
  nan[2] = std::numeric_limits<float>::quiet_NaN();
  Check({"non-finite parameter", absl::StatusCode::kInvalidArgument, "element 2 is nan"},
        upload({Chunk("w", 0, Ones(kRows * kCols)), Chunk("b", 0, nan)}));
  Check({"partial tensor", absl::StatusCode::kInvalidArgument, "elements [10, 24) are missing"},
        upload({Chunk("w", 0, Ones(kRows * kCols)), Chunk("b", 0, Ones(10))}));
  Check({"unknown tensor", absl::StatusCode::kNotFound, "has no tensor 'x'"},
        upload({Chunk("w", 0, Ones(kRows * kCols)), Chunk("x", 0, Ones(3))}));
  Check({"no header", absl::StatusCode::kInvalidArgument, "must start with a header"},
        [&] { return raw_.Upload(bearer, {UploadChunk(Chunk("b", 0, Ones(kCols)))}); });
  Check({"another session's token", absl::StatusCode::kPermissionDenied, "belongs to session"},
        upload({Chunk("b", 0, Ones(kCols))}, Bearer(*other_)));
}

// An import built from the victim's own export (which alone would be accepted), changed by
// `edit`: every refusal names its cause and changes nothing.
TEST_F(BadInputTest, StateImports) {
  absl::StatusOr<client::SessionState> exported = victim_->ExportState();
  ASSERT_TRUE(exported.ok()) << exported.status();
  const std::string bearer = Bearer(*victim_);
  auto import = [&](const std::function<void(std::vector<v1::ImportStateRequest>&)>& edit,
                    const std::string& auth = "") {
    std::vector<v1::ImportStateRequest> requests(1);
    requests[0].mutable_header()->set_session_id(victim_->id());
    *requests[0].mutable_header()->mutable_state() = exported->header;
    for (const auto& [key, values] : exported->records) {
      v1::ImportStateRequest r;
      r.mutable_chunk()->set_tensor(key.first);
      r.mutable_chunk()->set_buffer(key.second);
      r.mutable_chunk()->set_data(values.data(), values.size() * sizeof(float));
      requests.push_back(std::move(r));
    }
    edit(requests);
    return [this, requests, auth, bearer] {
      return raw_.Import(auth.empty() ? bearer : auth, requests);
    };
  };
  auto header = [](std::vector<v1::ImportStateRequest>& r) -> v1::StateHeader& {
    return *r[0].mutable_header()->mutable_state();
  };
  auto record = [](std::vector<v1::ImportStateRequest>& r, const std::string& tensor,
                   const std::string& buffer) -> v1::StateChunk& {
    for (auto& request : r) {
      if (request.has_chunk() && request.chunk().tensor() == tensor &&
          request.chunk().buffer() == buffer) {
        return *request.mutable_chunk();
      }
    }
    ADD_FAILURE() << "no record " << tensor << "/" << buffer;
    return *r[1].mutable_chunk();
  };
  auto set_value = [](v1::StateChunk& chunk, int i, float value) {
    std::memcpy(chunk.mutable_data()->data() + i * sizeof(float), &value, sizeof(float));
  };
  using Requests = std::vector<v1::ImportStateRequest>;
  Check({"another session's token", absl::StatusCode::kPermissionDenied, "belongs to session"},
        import([](Requests&) {}, Bearer(*other_)));
  Check({"no header", absl::StatusCode::kInvalidArgument, "must start with a header"},
        import([](Requests& r) { r.erase(r.begin()); }));
  Check({"two headers", absl::StatusCode::kInvalidArgument, "one header, then only chunks"},
        import([](Requests& r) { r.push_back(r[0]); }));
  Check({"no parameters", absl::StatusCode::kInvalidArgument, "holds no parameters"},
        import([&](Requests& r) { header(r).set_parameters(false); }));
  Check({"a negative step", absl::StatusCode::kInvalidArgument, "is at step -1"},
        import([&](Requests& r) { header(r).set_step(-1); }));
  Check({"a tensor missing", absl::StatusCode::kInvalidArgument, "it lacks [b] and holds []"},
        import([&](Requests& r) { header(r).mutable_tensors()->RemoveLast(); }));
  Check({"another tensor", absl::StatusCode::kInvalidArgument, "it lacks [b] and holds [c]"},
        import([&](Requests& r) { header(r).mutable_tensors(1)->set_name("c"); }));
  Check({"another shape", absl::StatusCode::kInvalidArgument,
         "tensor 'w' has shape [24, 16], the session's [16, 24]"},
        import([&](Requests& r) {
          header(r).mutable_config()->mutable_tensors(0)->set_shape(0, kCols);
          header(r).mutable_config()->mutable_tensors(0)->set_shape(1, kRows);
        }));
  Check({"another preset", absl::StatusCode::kInvalidArgument,
         "tensor 'w' was stepped with preset 'normuon', the session steps it with 'keller'"},
        import([&](Requests& r) {
          for (auto& g : *header(r).mutable_config()->mutable_groups()) {
            if (g.name() == "matrices") g.set_preset("normuon");
          }
        }));
  Check({"other state buffers", absl::StatusCode::kInvalidArgument,
         "tensor 'w' has state buffers [momentum, extra]"},
        import([&](Requests& r) { header(r).mutable_tensors(0)->add_state_buffers("extra"); }));
  Check({"a group's rates missing", absl::StatusCode::kInvalidArgument,
         "lacks group 'vectors''s lr, momentum or weight_decay"},
        import([&](Requests& r) {
          for (auto& h : *header(r).mutable_hyperparams()) {
            if (h.group() == "vectors") h.clear_momentum();
          }
        }));
  Check({"rates that do not validate", absl::StatusCode::kInvalidArgument,
         "its hyperparameters do not validate"},
        import([&](Requests& r) {
          for (auto& h : *header(r).mutable_hyperparams()) h.set_momentum(1.5);
        }));
  Check({"negative steps applied", absl::StatusCode::kInvalidArgument,
         "tensor 'b' has -2 steps applied"},
        import([&](Requests& r) { header(r).mutable_tensors(1)->set_steps_applied(-2); }));
  Check({"auto choices for two matrices", absl::StatusCode::kInvalidArgument,
         "auto choices of tensor 'w': 2 matrices, expected 1"},
        import([&](Requests& r) {
          v1::AutoChoices* c = header(r).mutable_tensors(0)->mutable_auto_choices();
          c->add_newton_schulz_steps(5);
          c->add_row_normalize(false);
        }));
  Check({"auto choices of unequal lists", absl::StatusCode::kInvalidArgument,
         "auto choices of tensor 'w': 2 step counts for 1 directions"},
        import([&](Requests& r) {
          header(r).mutable_tensors(0)->mutable_auto_choices()->add_newton_schulz_steps(5);
        }));
  Check({"auto steps out of bounds", absl::StatusCode::kInvalidArgument,
         "auto choices of tensor 'w': 50 Newton–Schulz steps is outside [2, 10]"},
        import([&](Requests& r) {
          header(r).mutable_tensors(0)->mutable_auto_choices()->set_newton_schulz_steps(0, 50);
        }));
  Check({"an unknown buffer", absl::StatusCode::kInvalidArgument,
         "has no state buffer 'velocity' of tensor 'w'"},
        import([&](Requests& r) { record(r, "w", "momentum").set_buffer("velocity"); }));
  Check({"a record missing", absl::StatusCode::kInvalidArgument,
         "state buffer 'adam_second_moment' of tensor 'b' has 0 of its 24 elements"},
        import([&](Requests& r) {
          std::erase_if(r, [](const v1::ImportStateRequest& q) {
            return q.has_chunk() && q.chunk().buffer() == "adam_second_moment";
          });
        }));
  Check({"a chunk out of order", absl::StatusCode::kInvalidArgument,
         "starts at element 4; the record's next element is 0"},
        import([&](Requests& r) { record(r, "b", "").set_offset(4); }));
  Check({"a chunk past the record", absl::StatusCode::kInvalidArgument, "past its 24 elements"},
        import([&](Requests& r) { record(r, "b", "").mutable_data()->append(4, '\0'); }));
  Check(
      {"a partial value", absl::StatusCode::kInvalidArgument, "holds 95 bytes, not a whole number"},
      import([&](Requests& r) { record(r, "b", "").mutable_data()->pop_back(); }));
  Check({"a NaN parameter", absl::StatusCode::kInvalidArgument,
         "parameters of tensor 'w' is not finite at element 5"},
        import([&](Requests& r) {
          set_value(record(r, "w", ""), 5, std::numeric_limits<float>::quiet_NaN());
        }));
  Check({"an infinite momentum", absl::StatusCode::kInvalidArgument,
         "momentum of tensor 'w' is not finite at element 7"},
        import([&](Requests& r) {
          set_value(record(r, "w", "momentum"), 7, std::numeric_limits<float>::infinity());
        }));
  Check({"a negative second moment", absl::StatusCode::kInvalidArgument,
         "state buffer 'adam_second_moment' of tensor 'b' is negative at element 3"},
        import([&](Requests& r) { set_value(record(r, "b", "adam_second_moment"), 3, -1.0f); }));
  v1::ExportStateRequest request;
  request.set_session_id(victim_->id());
  Check({"an export with another session's token", absl::StatusCode::kPermissionDenied,
         "belongs to session"},
        [&] { return raw_.Export(Bearer(*other_), request); });
  request.set_chunk_bytes(2);
  Check({"an export in 2-byte chunks", absl::StatusCode::kInvalidArgument,
         "chunk_bytes 2 is outside [4, 4194304]"},
        [&] { return raw_.Export(bearer, request); });
  // The unchanged export goes in, and changes nothing either.
  Check({"the export itself", absl::StatusCode::kOk, ""}, import([](Requests&) {}));
}

TEST_F(BadInputTest, AddedTensors) {
  auto tensor = [](const std::string& name, std::vector<int64_t> shape, const std::string& group) {
    v1::TensorConfig t;
    t.set_name(name);
    for (int64_t d : shape) t.add_shape(d);
    t.set_group(group);
    return t;
  };
  auto add = [&](std::vector<v1::TensorConfig> tensors, std::vector<v1::GroupConfig> groups = {},
                 client::Session* as = nullptr) {
    return [this, tensors, groups, as] {
      client::Session session(ConnectTo(*server_).channel(), victim_->id(),
                              (as != nullptr ? as : victim_.get())->token());
      return session.AddTensors(tensors, groups).status();
    };
  };
  v1::GroupConfig matrices;
  matrices.set_name("matrices");
  matrices.set_preset("normuon");
  Check({"another session's token", absl::StatusCode::kPermissionDenied, "belongs to session"},
        add({tensor("x", {4, 4}, "matrices")}, {}, other_.get()));
  Check({"no tensors", absl::StatusCode::kInvalidArgument, "names no tensors to add"}, add({}));
  Check({"a name the session has", absl::StatusCode::kInvalidArgument, "has a tensor 'w' already"},
        add({tensor("w", {4, 4}, "matrices")}));
  Check({"a group redefined", absl::StatusCode::kInvalidArgument, "has a group 'matrices' already"},
        add({tensor("x", {4, 4}, "matrices")}, {matrices}));
  Check({"an undefined group", absl::StatusCode::kInvalidArgument, "group 'nope' is not defined"},
        add({tensor("x", {4, 4}, "nope")}));
  Check({"a vector in a matrix group", absl::StatusCode::kInvalidArgument,
         "put vectors, embeddings and heads in an adamw group"},
        add({tensor("x", {4}, "matrices")}));
  Check({"over the per-session byte quota", absl::StatusCode::kResourceExhausted,
         "with the new tensors, session"},
        add({tensor("big", {4096, 4096}, "matrices")}));
}

TEST_F(BadInputTest, SessionCalls) {
  client::Client c = ConnectTo(*server_);
  auto update = [&](const std::string& group, std::optional<double> lr,
                    std::optional<double> momentum, std::optional<double> wd) {
    v1::HyperparamUpdate u;
    u.set_group(group);
    if (lr) u.set_lr(*lr);
    if (momentum) u.set_momentum(*momentum);
    if (wd) u.set_weight_decay(*wd);
    return [this, u] { return victim_->UpdateHyperparams({u}); };
  };
  Check({"unknown group", absl::StatusCode::kNotFound, "has no group 'heads'"},
        update("heads", 0.1, {}, {}));
  Check({"negative lr", absl::StatusCode::kInvalidArgument, "group 'matrices' (lr -0.1"},
        update("matrices", -0.1, {}, {}));
  Check({"lr times decay above 1", absl::StatusCode::kInvalidArgument, "group 'vectors'"},
        update("vectors", 2.0, {}, 0.9));
  Check({"momentum of 1", absl::StatusCode::kInvalidArgument, "momentum"},
        update("matrices", {}, 1.0, {}));
  Check({"GetParams of an unknown tensor", absl::StatusCode::kNotFound, "has no tensor 'q'"},
        [&] { return victim_->GetParameters({"q"}).status(); });
  Check({"delete with another session's token", absl::StatusCode::kPermissionDenied,
         "belongs to session"},
        [&] { return c.DeleteSession(victim_->id(), other_->token()); });
  Check({"restore with another session's token", absl::StatusCode::kPermissionDenied,
         "belongs to session"},
        [&] { return c.OpenSession(victim_->id(), other_->token()).Restore().status(); });
  Check({"over the per-session byte quota", absl::StatusCode::kResourceExhausted,
         "the limit per session is 67108864"},
        [&] {
          return c.CreateSession(MakeConfig({{"m", "keller"}}, {{"big", {4096, 4096}, "m"}}))
              .status();
        });
  Check({"unknown preset", absl::StatusCode::kInvalidArgument, "group 'm'"}, [&] {
    return c.CreateSession(MakeConfig({{"m", "sgd"}}, {{"x", {4, 4}, "m"}})).status();
  });
  Check({"vector in a matrix group", absl::StatusCode::kInvalidArgument,
         "put vectors, embeddings and heads in an adamw group"},
        [&] {
          return c.CreateSession(MakeConfig({{"m", "keller"}}, {{"x", {4}, "m"}})).status();
        });
  Check({"undefined group", absl::StatusCode::kInvalidArgument, "group 'nope' is not defined"},
        [&] {
          return c.CreateSession(MakeConfig({{"m", "keller"}}, {{"x", {4, 4}, "nope"}})).status();
        });
  Check({"a zero dimension", absl::StatusCode::kInvalidArgument, "tensor 'x'"}, [&] {
    return c.CreateSession(MakeConfig({{"m", "keller"}}, {{"x", {4, 0}, "m"}})).status();
  });
  Check({"an unknown tensor dtype", absl::StatusCode::kInvalidArgument,
         "tensor 'x': dtype 9 is not a wire dtype"},
        [&] {
          v1::SessionConfig config = MakeConfig({{"m", "keller"}}, {{"x", {4, 4}, "m"}});
          config.mutable_tensors(0)->set_dtype(static_cast<v1::DType>(9));
          return c.CreateSession(config).status();
        });
  Check({"taken session id", absl::StatusCode::kAlreadyExists, "already exists"},
        [&] { return c.CreateSession(config_, victim_->id()).status(); });
  Check({"malformed session id", absl::StatusCode::kInvalidArgument, "is not [A-Za-z0-9_.-]"},
        [&] { return c.CreateSession(config_, "../etc").status(); });
  Check({"more workers than the step queue holds", absl::StatusCode::kInvalidArgument,
         "(--max_pending_steps)"},
        [&] {
          v1::SessionConfig wide = config_;
          wide.set_world_size(65);
          return c.CreateSession(wide).status();
        });
  Check({"a byte count beyond int64", absl::StatusCode::kResourceExhausted,
         "need more than 2^63 bytes"},
        [&] {
          v1::SessionConfig huge = MakeConfig({{"v", "adamw"}}, {});
          for (int i = 0; i < 100000; ++i) {
            v1::TensorConfig* t = huge.add_tensors();
            t->set_name(absl::StrCat("t", i));
            t->add_shape(int64_t{1} << 40);
            t->set_group("v");
          }
          huge.set_world_size(60);
          return c.CreateSession(huge).status();
        });
  Check({"a negative lease", absl::StatusCode::kInvalidArgument,
         "delete_after_idle_seconds -1 is outside [0, 31536000]"},
        [&] {
          v1::SessionConfig leased = config_;
          leased.set_delete_after_idle_seconds(-1);
          return c.CreateSession(leased).status();
        });
  Check({"zero world size is one; 5000 is too many", absl::StatusCode::kInvalidArgument,
         "world_size 5000"},
        [&] {
          v1::SessionConfig many = config_;
          many.set_world_size(5000);
          return c.CreateSession(many).status();
        });
}

TEST(AdminTokenTest, GuardsCreateListAndDelete) {
  server::ServerOptions options = LoopbackOptions();
  options.admin_token = "admin-secret";
  options.sessions.max_sessions = 1;
  std::unique_ptr<server::Server> server = StartServer(options);
  const v1::SessionConfig config = MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}});
  client::Client anonymous = ConnectTo(*server);
  client::Client wrong = ConnectTo(*server, "guess");
  client::Client admin = ConnectTo(*server, "admin-secret");
  EXPECT_EQ(anonymous.CreateSession(config).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(wrong.CreateSession(config).status().code(), absl::StatusCode::kUnauthenticated);
  absl::StatusOr<client::Session> session = admin.CreateSession(config);
  ASSERT_TRUE(session.ok()) << session.status();
  absl::StatusOr<client::Session> second = admin.CreateSession(config);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(second.status().message()), HasSubstr("--max_sessions"));
  EXPECT_EQ(anonymous.ListSessions().status().code(), absl::StatusCode::kUnauthenticated);
  client::Client with_session_token = ConnectTo(*server, session->token());
  EXPECT_EQ(with_session_token.ListSessions().status().code(), absl::StatusCode::kPermissionDenied);
  absl::StatusOr<std::vector<v1::SessionInfo>> listed = admin.ListSessions();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].session_id(), session->id());
  // The admin token opens any session; the session token opens its own.
  EXPECT_TRUE(admin.OpenSession(session->id(), "admin-secret").Info().ok());
  EXPECT_TRUE(session->Info().ok());
  // With an admin token, the admin deletes any session and a session's own token deletes it
  // (a client closing its session), but no other.
  absl::StatusOr<client::Session> other = admin.CreateSession(config);
  EXPECT_EQ(other.status().code(), absl::StatusCode::kResourceExhausted);  // max_sessions 1
  EXPECT_TRUE(admin.DeleteSession(session->id()).ok());
  EXPECT_EQ(session->Info().status().code(), absl::StatusCode::kUnauthenticated);
  absl::StatusOr<client::Session> mine = admin.CreateSession(config);
  ASSERT_TRUE(mine.ok()) << mine.status();
  EXPECT_EQ(anonymous.DeleteSession(mine->id(), "guess").code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(anonymous.DeleteSession(mine->id(), mine->token()).ok());
  EXPECT_EQ(mine->Info().status().code(), absl::StatusCode::kUnauthenticated);
}

TEST(CreateSessionTest, TheReplyStaysSmallWhateverTheConfigsSize) {
  // Issue 16: the reply carried the config twice (as SessionInfo.config and in every TensorInfo),
  // so a 2 MB request made a 4 MB reply that could not be sent, yet the session was committed and
  // its token lost. 8,200 tensors with 250-character names: a config of about 2.1 MB.
  std::unique_ptr<server::Server> server = StartServer(LoopbackOptions());
  client::Client c = ConnectTo(*server);
  v1::CreateSessionRequest request;
  *request.mutable_config() = MakeConfig({{"v", "adamw"}}, {});
  for (int i = 0; i < 8200; ++i) {
    v1::TensorConfig* t = request.mutable_config()->add_tensors();
    t->set_name(absl::StrCat(std::string(244, 'w'), absl::Dec(i, absl::kZeroPad6)));
    t->add_shape(1);
    t->set_group("v");
  }
  ASSERT_GT(request.ByteSizeLong(), size_t{2} << 20);
  std::unique_ptr<v1::Optimizer::Stub> stub = v1::Optimizer::NewStub(c.channel());
  grpc::ClientContext context;
  v1::CreateSessionResponse response;
  const grpc::Status created = stub->CreateSession(&context, request, &response);
  ASSERT_TRUE(created.ok()) << created.error_message();
  EXPECT_LT(response.ByteSizeLong(), 1024u);
  EXPECT_FALSE(response.session().has_config());
  EXPECT_EQ(response.session().step(), 0);
  // The token that came back works.
  client::Session session = c.OpenSession(response.session_id(), response.token());
  absl::StatusOr<std::map<std::string, std::vector<float>>> params = session.GetParameters();
  ASSERT_TRUE(params.ok()) << params.status();
  EXPECT_EQ(params->size(), 8200u);
  EXPECT_TRUE(session.Delete().ok());
}

TEST(GetParamsTest, SlowReadersHoldTheSessionsOwnBoundedBuffersNotUncountedCopies) {
  // Issue 16: every GetParams copied whole tensors outside the session's quota, so slow readers
  // grew the daemon's memory without bound (RSS +971 MiB for a session charged 96 MiB). Now a
  // reader holds one of the session's staging buffers (counted in its quota, world_size + 1 of
  // them): past those, GetParams answers UNAVAILABLE.
  std::unique_ptr<server::Server> server = StartServer(LoopbackOptions());
  client::Client c = ConnectTo(*server);
  const int64_t elements = int64_t{4} << 20;  // 16 MiB, far past the stream's flow-control window
  client::Session session =
      *c.CreateSession(MakeConfig({{"v", "adamw"}}, {{"big", {elements}, "v"}}));
  std::unique_ptr<v1::Optimizer::Stub> stub = v1::Optimizer::NewStub(c.channel());
  struct Reader {
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReader<v1::TensorChunk>> stream;
  };
  v1::GetParamsRequest request;
  request.set_session_id(session.id());
  std::vector<std::unique_ptr<Reader>> stalled;
  for (int i = 0; i < 2; ++i) {  // world_size 1: two buffers
    stalled.push_back(std::make_unique<Reader>());
    stalled.back()->context.AddMetadata("authorization", "Bearer " + session.token());
    stalled.back()->stream = stub->GetParams(&stalled.back()->context, request);
    v1::TensorChunk first;
    ASSERT_TRUE(stalled.back()->stream->Read(&first));  // it streams: it holds its buffer
  }
  absl::StatusOr<std::map<std::string, std::vector<float>>> third = session.GetParameters();
  EXPECT_EQ(third.status().code(), absl::StatusCode::kUnavailable) << third.status();
  EXPECT_THAT(std::string(third.status().message()), HasSubstr("its limit (world_size + 1)"));
  for (auto& reader : stalled) reader->context.TryCancel();
  for (auto& reader : stalled) reader->stream->Finish().IgnoreError();
  // The buffers come back once the readers are gone.
  absl::StatusOr<std::map<std::string, std::vector<float>>> after;
  for (int i = 0; i < 100; ++i) {
    after = session.GetParameters();
    if (after.ok()) break;
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->at("big").size(), static_cast<size_t>(elements));
}

TEST(LimitsTest, TheMemoryBudgetBoundsEverySessionTogether) {
  // Issue 16: on the CPU backend the worst case was max_sessions × max_session_bytes (1 TiB by
  // default). Now all sessions together stay within --memory_budget_bytes.
  const v1::SessionConfig config = MakeConfig({{"v", "adamw"}}, {{"x", {1 << 16}, "v"}});
  absl::StatusOr<int64_t> bytes = server::Session::RequiredBytes(config);
  ASSERT_TRUE(bytes.ok());
  server::ServerOptions options = LoopbackOptions();
  options.sessions.memory_budget_bytes = 2 * *bytes + *bytes / 2;  // room for two
  std::unique_ptr<server::Server> server = StartServer(options);
  client::Client c = ConnectTo(*server);
  absl::StatusOr<client::Session> first = c.CreateSession(config);
  absl::StatusOr<client::Session> second = c.CreateSession(config);
  ASSERT_TRUE(first.ok() && second.ok());
  absl::StatusOr<client::Session> third = c.CreateSession(config);
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted) << third.status();
  EXPECT_THAT(std::string(third.status().message()), HasSubstr("--memory_budget_bytes"));
  EXPECT_EQ(server->sessions().num_sessions(), 2);
  // A deleted session's bytes come back.
  ASSERT_TRUE(first->Delete().ok());
  EXPECT_TRUE(c.CreateSession(config).ok());
}

TEST(LimitsTest, OneClientWithoutTheAdminTokenCannotTakeEverySessionSlot) {
  // Issue 16: anonymous clients could take every session slot (--max_sessions).
  server::ServerOptions options = LoopbackOptions();
  options.sessions.max_sessions_per_client = 2;
  std::unique_ptr<server::Server> server = StartServer(options);
  const v1::SessionConfig config = MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}});
  client::Client c = ConnectTo(*server);
  absl::StatusOr<client::Session> first = c.CreateSession(config);
  ASSERT_TRUE(first.ok() && c.CreateSession(config).ok());
  absl::StatusOr<client::Session> third = c.CreateSession(config);
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted) << third.status();
  EXPECT_THAT(std::string(third.status().message()),
              AllOf(HasSubstr("client ipv4:127.0.0.1 holds 2 sessions"),
                    HasSubstr("--max_sessions_per_client")));
  ASSERT_TRUE(first->Delete().ok());
  EXPECT_TRUE(c.CreateSession(config).ok());
  // The admin's sessions count against no client.
  server::ServerOptions guarded = LoopbackOptions();
  guarded.admin_token = "admin-secret";
  guarded.sessions.max_sessions_per_client = 1;
  std::unique_ptr<server::Server> admin_server = StartServer(guarded);
  client::Client admin = ConnectTo(*admin_server, "admin-secret");
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(admin.CreateSession(config).ok()) << i;
}

TEST(AdminTokenTest, ASessionTokenCannotProbeOtherSessionIds) {
  // Issue 16: NOT_FOUND for a missing id but PERMISSION_DENIED for an existing one told a session
  // token holder which ids exist. Both answer PERMISSION_DENIED now, for every call naming one.
  server::ServerOptions options = LoopbackOptions();
  options.admin_token = "admin-secret";
  std::unique_ptr<server::Server> server = StartServer(options);
  const v1::SessionConfig config = MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}});
  client::Client admin = ConnectTo(*server, "admin-secret");
  absl::StatusOr<client::Session> mine = admin.CreateSession(config);
  absl::StatusOr<client::Session> victim = admin.CreateSession(config);
  ASSERT_TRUE(mine.ok() && victim.ok());
  client::Client c = ConnectTo(*server);
  for (const std::string& id : {victim->id(), std::string("no-such-session")}) {
    SCOPED_TRACE(id);
    client::Session probe = c.OpenSession(id, mine->token());
    EXPECT_EQ(probe.Info().status().code(), absl::StatusCode::kPermissionDenied);
    EXPECT_EQ(probe.GetParameters().status().code(), absl::StatusCode::kPermissionDenied);
    EXPECT_EQ(c.DeleteSession(id, mine->token()).code(), absl::StatusCode::kPermissionDenied);
  }
  EXPECT_TRUE(victim->Info().ok());
  // The admin token still tells a missing session apart.
  EXPECT_EQ(admin.OpenSession("no-such-session", "admin-secret").Info().status().code(),
            absl::StatusCode::kNotFound);
}

// The GPU's memory budget is a limit of the whole daemon, beside the per-session quota: a session
// that does not fit is refused whole, and the memory of a deleted one comes back.
TEST(GpuBudgetTest, SessionsBeyondTheDeviceBudgetAreResourceExhausted) {
  if (TestBackendName() != "cuda") {
    GTEST_SKIP() << "the CUDA backend's device budget (run with OPTD_TEST_BACKEND=cuda on a GPU)";
  }
  server::ServerOptions options = LoopbackOptions();
  options.cuda.memory_budget_bytes = int64_t{360} << 20;
  std::unique_ptr<server::Server> server = StartServer(options);
  ASSERT_NE(server, nullptr);
  client::Client c = ConnectTo(*server);
  // 2048² fp32: parameters, gradient, momentum and workspace, 96 MiB on the device, and 32 MiB
  // for the session's queue (cuBLAS's workspace); the backend's and the analyzer's queues hold
  // 64 from the start. Two sessions fit in 360 MiB, a third does not.
  const v1::SessionConfig config = MakeConfig({{"m", "keller"}}, {{"w", {2048, 2048}, "m"}});
  absl::StatusOr<client::Session> first = c.CreateSession(config, "first");
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<client::Session> second = c.CreateSession(config, "second");
  ASSERT_TRUE(second.ok()) << second.status();
  absl::StatusOr<client::Session> third = c.CreateSession(config, "third");
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted) << third.status();
  EXPECT_THAT(third.status().message(), HasSubstr("device memory budget of 377487360 bytes"));
  absl::StatusOr<std::vector<v1::SessionInfo>> listed = c.ListSessions();
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->size(), 2u);
  ASSERT_TRUE(c.DeleteSession("first", first->token()).ok());
  EXPECT_TRUE(c.CreateSession(config, "third").ok());
}

}  // namespace
}  // namespace optd::testing
