// Same-host steps through a worker's shared-memory region (optd.proto, AttachSharedMemory): the
// same results as StepSmall bit for bit, with no tensor bytes in either message; a region only
// its session's token attaches, that cannot shrink under the daemon, and that the session's
// quota counts.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/wire.h"
#include "server/session.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {
namespace {

using ::testing::HasSubstr;

// A client's mapping of a region, as optd.client.SharedMemory makes it.
class Mapped {
 public:
  explicit Mapped(const v1::SharedMemoryRegion& region) : region_(region) {
    fd_ = open(region.path().c_str(), O_RDWR | O_CLOEXEC);
    EXPECT_GE(fd_, 0) << region.path() << ": " << std::strerror(errno);
    if (fd_ < 0) return;
    void* data = mmap(nullptr, static_cast<size_t>(region.bytes()), PROT_READ | PROT_WRITE,
                      MAP_SHARED, fd_, 0);
    EXPECT_NE(data, MAP_FAILED) << std::strerror(errno);
    data_ = data == MAP_FAILED ? nullptr : static_cast<char*>(data);
  }
  ~Mapped() {
    if (data_ != nullptr) munmap(data_, static_cast<size_t>(region_.bytes()));
    if (fd_ >= 0) close(fd_);
  }
  int fd() const { return fd_; }
  bool ok() const { return data_ != nullptr; }
  std::string nonce() const { return std::string(data_, region_.nonce().size()); }

  const v1::SharedMemorySlot& slot(const std::string& tensor) const {
    for (const v1::SharedMemorySlot& s : region_.slots()) {
      if (s.tensor() == tensor) return s;
    }
    ADD_FAILURE() << "no slot for " << tensor;
    return region_.slots(0);
  }
  // Writes a gradient in the wire's encoding of `dtype`.
  void Write(const std::string& tensor, const std::vector<float>& values,
             DType dtype = DType::kF32) {
    ASSERT_TRUE(EncodeWireInto(dtype, values, data_ + slot(tensor).gradient_offset()).ok());
  }
  std::vector<float> Result(const std::string& tensor) const {
    const v1::SharedMemorySlot& s = slot(tensor);
    std::vector<float> values(static_cast<size_t>(s.elements()));
    std::memcpy(values.data(), data_ + s.result_offset(), values.size() * sizeof(float));
    return values;
  }

 private:
  v1::SharedMemoryRegion region_;
  int fd_ = -1;
  char* data_ = nullptr;
};

class SharedMemoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server::ServerOptions options = LoopbackOptions();
    server_ = StartServer(options);
    ASSERT_NE(server_, nullptr);
    client_ = std::make_unique<client::Client>(ConnectTo(*server_));
    stub_ = v1::Optimizer::NewStub(client_->channel());
  }

  v1::SessionConfig Config(bool shared, int world_size = 1) {
    v1::SessionConfig config = ModelConfig("keller", world_size);
    config.set_shared_memory(shared);
    return config;
  }

  absl::StatusOr<v1::SharedMemoryRegion> Attach(const client::Session& session, int worker,
                                                const std::string& token = "") {
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer " + (token.empty() ? session.token() : token));
    v1::AttachSharedMemoryRequest request;
    request.set_session_id(session.id());
    request.set_worker_id(worker);
    v1::SharedMemoryRegion region;
    OPTD_RETURN_IF_ERROR(
        client::FromGrpcStatus(stub_->AttachSharedMemory(&context, request, &region)));
    nonces_[{session.id(), worker}] = region.nonce();
    return region;
  }

  // A StepSmall whose gradients are in the worker's region.
  absl::StatusOr<v1::StepSmallResponse> StepShared(const client::Session& session, int64_t step,
                                                   int worker = 0,
                                                   std::vector<std::string> tensors = {},
                                                   v1::DType dtype = v1::DTYPE_FP32,
                                                   v1::DType result_dtype = v1::DTYPE_UNSPECIFIED,
                                                   const v1::TensorChunk* chunk = nullptr) {
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer " + session.token());
    v1::StepSmallRequest request;
    request.mutable_header()->set_session_id(session.id());
    request.mutable_header()->set_step(step);
    request.mutable_header()->set_worker_id(worker);
    request.mutable_header()->set_result_dtype(result_dtype);
    request.mutable_shared_memory()->set_dtype(dtype);
    request.mutable_shared_memory()->set_nonce(nonces_[{session.id(), worker}]);
    for (std::string& t : tensors) request.mutable_shared_memory()->add_tensors(std::move(t));
    if (chunk != nullptr) *request.add_chunks() = *chunk;
    v1::StepSmallResponse response;
    OPTD_RETURN_IF_ERROR(client::FromGrpcStatus(stub_->StepSmall(&context, request, &response)));
    return response;
  }

  std::unique_ptr<server::Server> server_;
  std::unique_ptr<client::Client> client_;
  std::unique_ptr<v1::Optimizer::Stub> stub_;
  // The nonce of each (session, worker)'s region, as attached: what a step names.
  std::map<std::pair<std::string, int>, std::string> nonces_;
};

TEST_F(SharedMemoryTest, StepsEqualOneMessageStepsBitForBit) {
  const v1::SessionConfig config = Config(true);
  client::Session shared = *client_->CreateSession(config);
  client::Session wired = *client_->CreateSession(config);
  absl::StatusOr<v1::SharedMemoryRegion> region = Attach(shared, 0);
  ASSERT_TRUE(region.ok()) << region.status();
  Mapped mapped(*region);
  ASSERT_TRUE(mapped.ok());
  EXPECT_EQ(mapped.nonce(), region->nonce());
  EXPECT_EQ(region->nonce().size(), 16u);
  // Attaching again gives the same region.
  absl::StatusOr<v1::SharedMemoryRegion> again = Attach(shared, 0);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->path(), region->path());
  EXPECT_EQ(again->nonce(), region->nonce());

  Reference reference(config);
  // fp32 gradients, then bf16 ones with bf16 results, then a step of the bias alone.
  const struct {
    DType dtype;
    bool bias_only;
  } steps[] = {
      {DType::kF32, false}, {DType::kF32, false}, {DType::kBF16, false}, {DType::kF32, true}};
  for (int64_t step = 1; step <= 4; ++step) {
    SCOPED_TRACE(step);
    const auto [dtype, bias_only] = steps[step - 1];
    std::vector<client::NamedTensor> named;
    std::vector<std::vector<float>> grads;
    std::vector<std::string> names;
    for (int t = 0; t < reference.num_tensors(); ++t) {
      grads.push_back(Gradient(reference.count(t), static_cast<uint64_t>(t), step, 0));
    }
    for (int t = 0; t < reference.num_tensors(); ++t) {
      if (bias_only && reference.name(t) != "bias") continue;
      mapped.Write(reference.name(t), grads[t], dtype);
      named.push_back({reference.name(t), grads[t]});
      if (bias_only) names.push_back(reference.name(t));
    }
    const v1::DType wire = dtype == DType::kBF16 ? v1::DTYPE_BF16 : v1::DTYPE_FP32;
    absl::StatusOr<v1::StepSmallResponse> reply =
        StepShared(shared, step, 0, names, wire, v1::DTYPE_FP32);
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(reply->chunks_size(), 0);
    EXPECT_EQ(reply->summary().step(), step);
    client::StepOptions options;
    options.path = client::StepPath::kSmall;
    options.wire_dtype = dtype;
    absl::StatusOr<client::StepResult> expected = wired.Step(step, named, options);
    ASSERT_TRUE(expected.ok()) << expected.status();
    EXPECT_EQ(reply->summary().tensors_updated(), expected->tensors_updated);
    for (const auto& [name, values] : expected->values) {
      EXPECT_TRUE(BitwiseEqual(mapped.Result(name), values)) << name;
    }
  }
  // The parameters the daemon holds are the results the region got.
  absl::StatusOr<std::map<std::string, std::vector<float>>> held = shared.GetParameters();
  ASSERT_TRUE(held.ok());
  for (const auto& [name, values] : *held) EXPECT_TRUE(BitwiseEqual(mapped.Result(name), values));
}

TEST_F(SharedMemoryTest, TheCppClientStepsThroughItAsThroughMessages) {
  // client::Session::AttachSharedMemory, then StepPath::kAuto goes through the region: the
  // results of kSmall bit for bit, into StepResult::values or the caller's outputs, in every wire
  // dtype; after the session gains tensors through another handle, the stale handle's next step
  // is refused before it counts, and the client attaches again and resends by itself.
  const v1::SessionConfig config = Config(true);
  client::Session shared = *client_->CreateSession(config);
  client::Session wired = *client_->CreateSession(config);
  client::StepOptions small;
  small.path = client::StepPath::kShared;
  EXPECT_EQ(shared.Step(1, {}, small).status().code(), absl::StatusCode::kFailedPrecondition);
  absl::StatusOr<std::shared_ptr<client::SharedMemory>> mapped = shared.AttachSharedMemory();
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  EXPECT_EQ(shared.shared_memory(0), *mapped);
  Reference reference(config);
  const DType dtypes[] = {DType::kF32, DType::kBF16, DType::kF16};
  std::vector<float> bias(40);
  for (int64_t step = 1; step <= 3; ++step) {
    std::vector<std::vector<float>> grads;
    for (int t = 0; t < reference.num_tensors(); ++t) {
      grads.push_back(Gradient(reference.count(t), static_cast<uint64_t>(t), step, 0));
    }
    client::StepOptions through, over;
    through.wire_dtype = over.wire_dtype = dtypes[step - 1];
    through.outputs = {{"bias", absl::MakeSpan(bias)}};
    over.path = client::StepPath::kSmall;
    absl::StatusOr<client::StepResult> a = shared.Step(step, AsNamed(reference, grads), through);
    absl::StatusOr<client::StepResult> b = wired.Step(step, AsNamed(reference, grads), over);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(a->values.count("bias"), 0u);
    EXPECT_TRUE(BitwiseEqual(bias, b->values.at("bias")));
    for (const std::string name : {"hidden", "conv"}) {
      EXPECT_TRUE(BitwiseEqual(a->values.at(name), b->values.at(name))) << name;
    }
  }
  client::Session stale = client_->OpenSession(shared.id(), shared.token());
  ASSERT_TRUE(stale.AttachSharedMemory().ok());
  v1::TensorConfig extra;
  extra.set_name("extra");
  extra.add_shape(3);
  extra.set_group("vectors");
  ASSERT_TRUE(shared.AddTensors({extra}).ok());
  ASSERT_TRUE(wired.AddTensors({extra}).ok());
  ASSERT_TRUE(shared.AttachSharedMemory().ok());  // the daemon's session has a new region
  const std::vector<float> g = Gradient(40, 2, 4, 0);
  client::StepOptions over;
  over.path = client::StepPath::kSmall;
  absl::StatusOr<client::StepResult> a = stale.Step(4, {{"bias", g}});
  absl::StatusOr<client::StepResult> b = wired.Step(4, {{"bias", g}}, over);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_NE(stale.shared_memory(0)->region().nonce(), (*mapped)->region().nonce());
  EXPECT_NE(stale.shared_memory(0)->slot("extra"), nullptr);
  for (const auto& [name, values] : b->values) {
    EXPECT_TRUE(BitwiseEqual(a->values.at(name), values)) << name;
  }
  // A step without gradients goes over gRPC (a shared-memory request naming no tensor names
  // every tensor): it changes nothing, as StepSmall's.
  a = stale.Step(5, {});
  b = wired.Step(5, {}, over);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->tensors_updated, 0);
  EXPECT_EQ(b->tensors_updated, 0);
  for (const auto& [name, values] : b->values) {
    EXPECT_TRUE(BitwiseEqual(a->values.at(name), values)) << name;
  }
}

TEST_F(SharedMemoryTest, WorkersMixSharedMemoryAndMessages) {
  const v1::SessionConfig config = Config(true, /*world_size=*/2);
  client::Session session = *client_->CreateSession(config);
  absl::StatusOr<v1::SharedMemoryRegion> region = Attach(session, 1);
  ASSERT_TRUE(region.ok()) << region.status();
  absl::StatusOr<v1::SharedMemoryRegion> other = Attach(session, 0);
  ASSERT_TRUE(other.ok());
  EXPECT_NE(other->path(), region->path());
  Mapped mapped(*region);
  ASSERT_TRUE(mapped.ok());
  Reference reference(config);
  for (int64_t step = 1; step <= 2; ++step) {
    std::vector<std::vector<std::vector<float>>> per_worker(2);
    for (int w = 0; w < 2; ++w) {
      for (int t = 0; t < reference.num_tensors(); ++t) {
        per_worker[w].push_back(Gradient(reference.count(t), static_cast<uint64_t>(t), step, w));
      }
    }
    for (int t = 0; t < reference.num_tensors(); ++t) {
      mapped.Write(reference.name(t), per_worker[1][t]);
    }
    absl::StatusOr<client::StepResult> wired;
    std::thread worker0([&] { wired = session.Step(step, AsNamed(reference, per_worker[0]), {}); });
    absl::StatusOr<v1::StepSmallResponse> reply = StepShared(session, step, 1);
    worker0.join();
    ASSERT_TRUE(reply.ok()) << reply.status();
    ASSERT_TRUE(wired.ok()) << wired.status();
    reference.Step(per_worker);
    ExpectMatches(reference, wired->values, "worker 0, over gRPC");
    std::map<std::string, std::vector<float>> from_region;
    for (int t = 0; t < reference.num_tensors(); ++t) {
      from_region[reference.name(t)] = mapped.Result(reference.name(t));
    }
    ExpectMatches(reference, from_region, "worker 1, through shared memory");
  }
}

TEST_F(SharedMemoryTest, TheRegionCannotShrinkUnderTheDaemon) {
  client::Session session = *client_->CreateSession(Config(true));
  absl::StatusOr<v1::SharedMemoryRegion> region = Attach(session, 0);
  ASSERT_TRUE(region.ok());
  Mapped mapped(*region);
  ASSERT_TRUE(mapped.ok());
  struct stat st {};
  ASSERT_EQ(fstat(mapped.fd(), &st), 0);
  EXPECT_EQ(st.st_size, region->bytes());
  EXPECT_NE(ftruncate(mapped.fd(), 0), 0) << "a client truncated the region";
  EXPECT_EQ(errno, EPERM);
  EXPECT_NE(ftruncate(mapped.fd(), region->bytes() * 2), 0) << "a client grew the region";
  // The slots: every tensor's, 4 bytes per element, gradients then results, inside the region.
  int64_t end = 0;
  for (const v1::SharedMemorySlot& slot : region->slots()) {
    EXPECT_GE(slot.gradient_offset(), 16);
    EXPECT_LE(slot.gradient_offset() + 4 * slot.elements(), region->slots(0).result_offset());
    end = std::max(end, slot.result_offset() + 4 * slot.elements());
  }
  EXPECT_LE(end, region->bytes());
}

TEST_F(SharedMemoryTest, TheSessionsQuotaCountsARegionPerWorker) {
  const v1::SessionConfig wired = ModelConfig("keller", /*world_size=*/3);
  v1::SessionConfig shared = wired;
  shared.set_shared_memory(true);
  const int64_t without = *server::Session::RequiredBytes(wired);
  const int64_t with = *server::Session::RequiredBytes(shared);
  Reference reference(wired);
  int64_t elements = 0;
  for (int t = 0; t < reference.num_tensors(); ++t) elements += reference.count(t);
  // Three regions of a gradient and a result slot per element, a header and the result area's
  // alignment each.
  EXPECT_GE(with - without, 3 * 8 * elements);
  EXPECT_LE(with - without, 3 * (8 * elements + 128));
}

TEST_F(SharedMemoryTest, RefusalsNameWhatWasWrongAndChangeNothing) {
  client::Session session = *client_->CreateSession(Config(true));
  client::Session plain = *client_->CreateSession(Config(false));
  client::Session other = *client_->CreateSession(Config(true));
  const auto expect = [](const absl::Status& status, absl::StatusCode code,
                         const std::string& text) {
    EXPECT_EQ(status.code(), code) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr(text));
  };
  expect(Attach(plain, 0).status(), absl::StatusCode::kFailedPrecondition,
         "created without shared_memory");
  expect(Attach(session, 1).status(), absl::StatusCode::kInvalidArgument, "worker_id 1");
  expect(Attach(session, -1).status(), absl::StatusCode::kInvalidArgument, "worker_id -1");
  expect(Attach(session, 0, other.token()).status(), absl::StatusCode::kPermissionDenied, "");
  expect(StepShared(session, 1).status(), absl::StatusCode::kFailedPrecondition,
         "call AttachSharedMemory first");

  absl::StatusOr<v1::SharedMemoryRegion> region = Attach(session, 0);
  ASSERT_TRUE(region.ok());
  Mapped mapped(*region);
  ASSERT_TRUE(mapped.ok());
  Reference reference(Config(true));
  for (int t = 0; t < reference.num_tensors(); ++t) {
    mapped.Write(reference.name(t), Gradient(reference.count(t), static_cast<uint64_t>(t), 1, 0));
  }
  // The whole optimizer state: parameters, every state buffer, the step.
  const absl::StatusOr<client::SessionState> before = session.ExportState();
  ASSERT_TRUE(before.ok()) << before.status();
  v1::TensorChunk chunk;
  chunk.set_tensor("bias");
  chunk.set_dtype(v1::DTYPE_FP32);
  chunk.set_data(std::string(4 * 40, '\0'));
  expect(StepShared(session, 1, 0, {}, v1::DTYPE_FP32, v1::DTYPE_UNSPECIFIED, &chunk).status(),
         absl::StatusCode::kInvalidArgument, "carries no chunks");
  expect(StepShared(session, 1, 0, {"nope"}).status(), absl::StatusCode::kNotFound, "nope");
  expect(StepShared(session, 1, 0, {"bias", "bias"}).status(), absl::StatusCode::kInvalidArgument,
         "names tensor 'bias' twice");
  expect(StepShared(session, 1, 0, {}, v1::DType(77)).status(), absl::StatusCode::kInvalidArgument,
         "shared-memory step");
  expect(StepShared(session, 2).status(), absl::StatusCode::kFailedPrecondition, "step");
  // A step naming another region (its nonce): one the worker no longer has.
  const std::string nonce = nonces_[{session.id(), 0}];
  nonces_[{session.id(), 0}] = std::string(16, 'x');
  expect(StepShared(session, 1).status(), absl::StatusCode::kFailedPrecondition,
         "not worker 0's region");
  nonces_[{session.id(), 0}] = nonce;
  std::vector<float> bad = Gradient(40, 2, 1, 0);
  bad[7] = std::numeric_limits<float>::quiet_NaN();
  mapped.Write("bias", bad);
  expect(StepShared(session, 1).status(), absl::StatusCode::kInvalidArgument,
         "tensor 'bias' element 7 is nan");
  const absl::StatusOr<client::SessionState> after = session.ExportState();
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->header.step(), before->header.step());
  ASSERT_EQ(after->records.size(), before->records.size());
  for (const auto& [key, values] : before->records) {
    EXPECT_TRUE(BitwiseEqual(after->records.at(key), values))
        << key.first << "/" << key.second << " changed";
  }
  // The refusals left the session able to step.
  mapped.Write("bias", Gradient(40, 2, 1, 0));
  absl::StatusOr<v1::StepSmallResponse> reply = StepShared(session, 1);
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->summary().step(), 1);
}

}  // namespace
}  // namespace optd::testing
