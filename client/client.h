// The C++ client of optd: channels (plain, TLS, mutual TLS), sessions, chunked parameter upload
// and download, and the streamed Step, with wire-dtype conversion inside. Errors are absl::Status
// values carrying the daemon's gRPC code and message.
#ifndef OPTD_CLIENT_CLIENT_H_
#define OPTD_CLIENT_CLIENT_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "optd/v1/optd.grpc.pb.h"
#include "proto/wire_dtype.h"

namespace optd::client {

struct ChannelOptions {
  std::string target = "127.0.0.1:50051";
  bool tls = false;             // also implied by any of the files below
  std::string tls_ca;           // PEM file of the CA that signed the server; empty: system roots
  std::string tls_cert;         // PEM client certificate (mutual TLS)
  std::string tls_key;          // PEM client key (mutual TLS)
  std::string tls_server_name;  // overrides the name checked against the server certificate
  int64_t max_message_bytes = (int64_t{4} << 20) + (64 << 10);
};

// InvalidArgument naming a PEM file that cannot be read.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ChannelOptions& options);

// grpc::Status -> absl::Status, code for code.
absl::Status FromGrpcStatus(const grpc::Status& status);

// One tensor's values on the client, by name.
struct NamedTensor {
  std::string name;
  absl::Span<const float> values;
};

// Where a tensor's result goes when the caller supplies the memory.
struct NamedOutput {
  std::string name;
  absl::Span<float> values;  // the tensor's size
};

// How a step travels: one message each way (StepSmall), a stream (Step), or through the
// worker's shared-memory region (a StepSmall carrying no tensor bytes).
enum class StepPath {
  kAuto,    // the worker's shared memory where it is attached (Session::AttachSharedMemory),
            // else StepSmall while the gradients and the session's results fit one message,
            // else Step
  kStream,  // always Step
  kSmall,   // always StepSmall (RESOURCE_EXHAUSTED when the results do not fit)
  kShared,  // always the worker's shared memory (FAILED_PRECONDITION when not attached)
};

struct StepOptions {
  int worker_id = 0;
  StepPath path = StepPath::kAuto;
  std::optional<double> lr;           // this step only
  DType wire_dtype = DType::kF32;     // how gradients travel
  std::optional<DType> result_dtype;  // default: each tensor's dtype
  int64_t chunk_bytes = kDefaultChunkBytes;
  int64_t placement_epoch = 0;  // a sharded session's epoch (0: unchecked)
  absl::Duration timeout = absl::InfiniteDuration();
  // Results of these tensors are written here (DataLoss if a span is too small) instead of into
  // StepResult::values: no allocation per step for a training loop that steps in place.
  std::vector<NamedOutput> outputs;
};

struct StepResult {
  int64_t step = 0;
  bool skipped = false;
  bool replayed = false;
  int tensors_updated = 0;
  int64_t nonfinite_values = 0;
  v1::StepResult kind = v1::STEP_RESULT_PARAMETERS;
  // The last step on disk once this one committed, and why this step's periodic checkpoint
  // failed (empty when it did not): such a step is not durable (optd.proto, StepSummary).
  int64_t checkpoint_step = 0;
  std::string checkpoint_error;
  // New parameters or deltas by tensor name (empty for STEP_RESULT_NONE), except for tensors
  // given in StepOptions::outputs.
  std::map<std::string, std::vector<float>> values;
};

// A session's whole optimizer state outside the daemon (ExportState, ImportState): the header,
// and every record by (tensor, buffer); buffer "" holds the parameters.
struct SessionState {
  v1::StateHeader header;
  std::map<std::pair<std::string, std::string>, std::vector<float>> records;
};

// A worker's shared-memory region of a session on this host (optd.proto, AttachSharedMemory),
// mapped read-write: per tensor a gradient slot and a result slot, 4 bytes per element each.
class SharedMemory {
 public:
  // Maps `region` (opening its path) and checks its nonce. Unavailable naming the path when
  // this process cannot open it (another host, container or user); DataLoss when it is not the
  // region the daemon described.
  static absl::StatusOr<std::unique_ptr<SharedMemory>> Map(v1::SharedMemoryRegion region,
                                                           int worker_id);
  ~SharedMemory();
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;

  int worker_id() const { return worker_id_; }
  const v1::SharedMemoryRegion& region() const { return region_; }
  // The slot of `tensor`, or null.
  const v1::SharedMemorySlot* slot(absl::string_view tensor) const;
  char* gradient_bytes(const v1::SharedMemorySlot& slot) const {
    return data_ + slot.gradient_offset();
  }
  const char* result_bytes(const v1::SharedMemorySlot& slot) const {
    return data_ + slot.result_offset();
  }

 private:
  SharedMemory(v1::SharedMemoryRegion region, int worker_id, char* data);

  v1::SharedMemoryRegion region_;
  int worker_id_;
  char* data_;
  std::map<std::string, int, std::less<>> slots_;
};

class Session {
 public:
  Session(std::shared_ptr<grpc::Channel> channel, std::string id, std::string token);

  const std::string& id() const { return id_; }
  const std::string& token() const { return token_; }
  // Deadline of every call but Step (StepOptions::timeout); default none.
  void set_timeout(absl::Duration timeout) { timeout_ = timeout; }
  // The largest message the channel carries (ChannelOptions::max_message_bytes): StepPath::kAuto
  // sends a step in one message only below it.
  void set_max_message_bytes(int64_t bytes) { max_message_bytes_ = bytes; }

  absl::StatusOr<v1::SessionInfo> Info();
  // Uploads the given tensors' parameters (each whole) in chunks of `chunk_bytes`; the daemon
  // applies all of them or none.
  absl::Status UploadParameters(absl::Span<const NamedTensor> tensors,
                                DType wire_dtype = DType::kF32,
                                int64_t chunk_bytes = kDefaultChunkBytes);
  // Parameters of `names` (empty: all), reassembled from the daemon's chunks, sent in
  // `wire_dtype` (default: each tensor's dtype) and chunks of `chunk_bytes` (0: the daemon's
  // default).
  absl::StatusOr<std::map<std::string, std::vector<float>>> GetParameters(
      absl::Span<const std::string> names = {}, std::optional<DType> wire_dtype = std::nullopt,
      int64_t chunk_bytes = 0);
  // Sends this worker's gradients for step `step` (tensors absent from `gradients` get no
  // update) and returns the step's result once every worker has sent theirs. StepOptions::path
  // picks the RPC; both have the same semantics and give the same result.
  absl::StatusOr<StepResult> Step(int64_t step, absl::Span<const NamedTensor> gradients,
                                  const StepOptions& options = {});
  // Maps worker `worker_id`'s shared-memory region (the session created with shared_memory, the
  // daemon on this host, this process allowed to open it); steps on StepPath::kAuto then go
  // through it. Attaching again maps the daemon's current region. A step the daemon refuses for
  // a region it no longer has attaches again and resends; where the new region cannot be mapped
  // the worker's steps on kAuto go over gRPC (nothing counted), on kShared fail.
  absl::StatusOr<std::shared_ptr<SharedMemory>> AttachSharedMemory(int worker_id = 0);
  // The worker's attached region, or null.
  std::shared_ptr<SharedMemory> shared_memory(int worker_id = 0) const;
  absl::Status UpdateHyperparams(absl::Span<const v1::HyperparamUpdate> updates);
  // `shared`: also write the copy other instances restore a resharded session from.
  absl::StatusOr<v1::CheckpointResponse> Checkpoint(bool shared = false);
  absl::StatusOr<int64_t> Restore();
  absl::StatusOr<v1::GetAnalysisResponse> Analysis();
  // Adds tensors (and new groups for them) to the live session, all or nothing; returns the
  // session as it now is. Upload their parameters before stepping them.
  absl::StatusOr<v1::SessionInfo> AddTensors(absl::Span<const v1::TensorConfig> tensors,
                                             absl::Span<const v1::GroupConfig> groups = {});
  // The session's optimizer state, of one step (ABORTED when the session changed while it was
  // read: read again); without its parameters unless `parameters`.
  absl::StatusOr<SessionState> ExportState(bool parameters = true, int64_t chunk_bytes = 0);
  // Replaces the session's parameters, optimizer state, step and hyperparameters with `state`
  // (which holds the parameters), all or nothing.
  absl::StatusOr<v1::ImportStateResponse> ImportState(const SessionState& state,
                                                      int64_t chunk_bytes = kDefaultChunkBytes);
  absl::Status Delete();

 private:
  void Authorize(grpc::ClientContext& context) const;
  // The token, and the step's own deadline (StepOptions::timeout).
  void StartStepCall(grpc::ClientContext& context, const StepOptions& options) const;
  absl::StatusOr<StepResult> StepStreamed(int64_t step, absl::Span<const NamedTensor> gradients,
                                          const StepOptions& options);
  absl::StatusOr<StepResult> StepInOneMessage(int64_t step, absl::Span<const NamedTensor> gradients,
                                              const StepOptions& options);
  absl::StatusOr<StepResult> StepShared(int64_t step, absl::Span<const NamedTensor> gradients,
                                        const StepOptions& options,
                                        std::shared_ptr<SharedMemory> shared);
  absl::StatusOr<StepResult> SendShared(int64_t step, absl::Span<const NamedTensor> gradients,
                                        const StepOptions& options, const SharedMemory& shared);

  std::shared_ptr<grpc::Channel> channel_;
  std::shared_ptr<v1::Optimizer::Stub> stub_;  // shared: a Session is a copyable handle
  std::string id_;
  std::string token_;
  absl::Duration timeout_ = absl::InfiniteDuration();
  int64_t max_message_bytes_ = ChannelOptions{}.max_message_bytes;
  // Set once the daemon said this session's results do not fit one message: kAuto streams.
  std::shared_ptr<std::atomic<bool>> results_too_large_ = std::make_shared<std::atomic<bool>>();
  // The workers' attached regions, shared by the handle's copies.
  struct Attached {
    absl::Mutex mu;
    std::map<int, std::shared_ptr<SharedMemory>> regions ABSL_GUARDED_BY(mu);
  };
  std::shared_ptr<Attached> attached_ = std::make_shared<Attached>();
};

class Client {
 public:
  // `admin_token` goes with CreateSession, ListSessions and DeleteSession when not empty.
  explicit Client(std::shared_ptr<grpc::Channel> channel, std::string admin_token = "");

  // SERVING, NOT_SERVING, ... for `service` ("" is liveness, "optd.v1.Optimizer" readiness).
  absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> Health(
      const std::string& service = "", absl::Duration timeout = absl::Seconds(5));
  // The daemon's backend, its device and why it was picked.
  absl::StatusOr<v1::ServerInfo> ServerInfo(absl::Duration timeout = absl::Seconds(5));
  // Creates a session (id empty: the daemon names it) and returns it with its token.
  absl::StatusOr<Session> CreateSession(const v1::SessionConfig& config, std::string id = "");
  // The full request (restore_from, replace). `token` authorizes it instead of the admin token:
  // replacing a session on a daemon without one takes that session's token.
  absl::StatusOr<Session> CreateSession(const v1::CreateSessionRequest& request,
                                        const std::string& token = "");
  // A handle on an existing session; nothing is checked until the first call.
  Session OpenSession(std::string id, std::string token) const;
  absl::StatusOr<std::vector<v1::SessionInfo>> ListSessions();
  // Deletes with the admin token (or `token` when given).
  absl::Status DeleteSession(const std::string& id, const std::string& token = "");

  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  // Deadline of every call; default none. Sessions opened or created here inherit it.
  void set_timeout(absl::Duration timeout) { timeout_ = timeout; }

 private:
  void Authorize(grpc::ClientContext& context, const std::string& token) const;

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Optimizer::Stub> stub_;
  std::string admin_token_;
  absl::Duration timeout_ = absl::InfiniteDuration();
};

}  // namespace optd::client

#endif  // OPTD_CLIENT_CLIENT_H_
