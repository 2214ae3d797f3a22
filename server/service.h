// The optd.v1.Optimizer gRPC service: parses and checks requests, calls the session manager and
// sessions, converts their results. It decides nothing about steps or state itself.
#ifndef OPTD_SERVER_SERVICE_H_
#define OPTD_SERVER_SERVICE_H_

#include <atomic>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "optd/v1/optd.grpc.pb.h"
#include "server/log.h"
#include "server/metrics.h"
#include "server/session_manager.h"

namespace optd::server {

inline constexpr int64_t kDefaultChunkBytes = int64_t{1} << 20;
inline constexpr int64_t kMaxChunkBytes = int64_t{4} << 20;

struct ServiceOptions {
  // Step streams admitted at once, waiting ones included; beyond it Step answers UNAVAILABLE so
  // clients back off and retry. A stream takes its place only after its header named a session
  // and its token opened it.
  int max_pending_steps = 64;
  int64_t default_chunk_bytes = kDefaultChunkBytes;
  Metrics* metrics = nullptr;  // may be null
  v1::ServerInfo server_info;  // GetServerInfo's answer
};

// The one place absl::Status becomes grpc::Status (the canonical codes map one to one).
grpc::Status ToGrpcStatus(const absl::Status& status);

class OptimizerService final : public v1::Optimizer::Service {
 public:
  OptimizerService(SessionManager& sessions, ServiceOptions options);

  // From now on Step answers UNAVAILABLE ("shutting down") except to the workers of a step
  // already under way (and retries of a finished one); steps already admitted go on.
  void StartDraining();
  // Waits until no step is in flight or `timeout` passes; true when none is.
  bool WaitForIdle(absl::Duration timeout);
  int steps_in_flight() const { return steps_in_flight_.load(); }

  grpc::Status CreateSession(grpc::ServerContext* context, const v1::CreateSessionRequest* request,
                             v1::CreateSessionResponse* response) override;
  grpc::Status GetSession(grpc::ServerContext* context, const v1::GetSessionRequest* request,
                          v1::SessionInfo* response) override;
  grpc::Status ListSessions(grpc::ServerContext* context, const v1::ListSessionsRequest* request,
                            v1::ListSessionsResponse* response) override;
  grpc::Status DeleteSession(grpc::ServerContext* context, const v1::DeleteSessionRequest* request,
                             v1::DeleteSessionResponse* response) override;
  grpc::Status UpdateHyperparams(grpc::ServerContext* context,
                                 const v1::UpdateHyperparamsRequest* request,
                                 v1::UpdateHyperparamsResponse* response) override;
  grpc::Status UploadParams(grpc::ServerContext* context,
                            grpc::ServerReader<v1::UploadParamsRequest>* reader,
                            v1::UploadParamsResponse* response) override;
  grpc::Status GetParams(grpc::ServerContext* context, const v1::GetParamsRequest* request,
                         grpc::ServerWriter<v1::TensorChunk>* writer) override;
  grpc::Status Step(grpc::ServerContext* context,
                    grpc::ServerReaderWriter<v1::StepResponse, v1::StepRequest>* stream) override;
  grpc::Status Checkpoint(grpc::ServerContext* context, const v1::CheckpointRequest* request,
                          v1::CheckpointResponse* response) override;
  grpc::Status Restore(grpc::ServerContext* context, const v1::RestoreRequest* request,
                       v1::RestoreResponse* response) override;
  grpc::Status GetAnalysis(grpc::ServerContext* context, const v1::GetAnalysisRequest* request,
                           v1::GetAnalysisResponse* response) override;
  grpc::Status GetServerInfo(grpc::ServerContext* context, const v1::GetServerInfoRequest* request,
                             v1::ServerInfo* response) override;

 private:
  absl::StatusOr<std::shared_ptr<Session>> Authorize(grpc::ServerContext* context,
                                                     absl::string_view session_id);
  // `reason` is set when a failure has a more precise rejection reason than its code.
  absl::Status RunStep(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<v1::StepResponse, v1::StepRequest>* stream,
                       absl::string_view& reason);
  // Counts the finished RPC (and its rejection) and converts its status.
  grpc::Status Finish(absl::string_view method, const absl::Status& status,
                      absl::string_view reason = {});
  void CountSent(int64_t bytes);

  SessionManager& sessions_;
  const ServiceOptions options_;
  RateLimitedLog refusals_{absl::Seconds(10)};
  std::atomic<bool> draining_{false};
  std::atomic<int> steps_in_flight_{0};
};

}  // namespace optd::server

#endif  // OPTD_SERVER_SERVICE_H_
