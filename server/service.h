// The optd.v1.Optimizer gRPC service: parses and checks requests, calls the session manager and
// sessions, converts their results. It decides nothing about steps or state itself.
#ifndef OPTD_SERVER_SERVICE_H_
#define OPTD_SERVER_SERVICE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "optd/v1/optd.grpc.pb.h"
#include "proto/wire_dtype.h"
#include "server/log.h"
#include "server/metrics.h"
#include "server/session_manager.h"
#include "server/stream_watchdog.h"

namespace optd::server {

struct ServiceOptions {
  // Step streams admitted at once, waiting ones included; beyond it Step answers UNAVAILABLE so
  // clients back off and retry. A stream takes its place only after its header named a session
  // and its token opened it.
  int max_pending_steps = 64;
  int64_t default_chunk_bytes = kDefaultChunkBytes;
  // Streaming calls (Step, UploadParams, GetParams) served at once; beyond it they answer
  // UNAVAILABLE at once, so the server's threads past it stay free for the unary calls (the
  // Server sizes its thread quota as this plus a reserve). 0: no bound.
  int max_streams = 0;
  // A stream's first message must arrive within stream_header_timeout; after it, a client may
  // leave its stream without a message, or not read the daemon's, for stream_idle_timeout. Past
  // either the call is cancelled and its thread freed (not while a step waits for its other
  // workers: the straggler timeout governs that).
  absl::Duration stream_header_timeout = absl::Seconds(10);
  absl::Duration stream_idle_timeout = absl::Seconds(60);
  // Called with true when the streams reach max_streams and with false when they fall below it
  // again (the Server's readiness); may be empty.
  std::function<void(bool saturated)> on_saturation;
  // The largest message the server sends or receives (ServerOptions::max_message_bytes):
  // StepSmall refuses a step whose results would not fit its reply.
  int64_t max_message_bytes = kMaxChunkBytes + (64 << 10);
  Metrics* metrics = nullptr;  // may be null
  Clock* clock = nullptr;      // the stream deadlines' clock; default: RealClock()
  v1::ServerInfo server_info;  // GetServerInfo's answer
};

// The most bytes of a status message a client receives (then "... (N more bytes)"): 3 times this,
// the worst case of grpc-message's percent-encoding, stays within the 8 KiB that gRPC clients
// accept in trailers.
inline constexpr size_t kMaxStatusMessageBytes = 2048;

// The one place absl::Status becomes grpc::Status (the canonical codes map one to one; the
// message goes through Printable).
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
  // The tensor streams go as byte buffers, with handlers of their own the constructor installs
  // (the generated GetParams, Step and UploadParams are never called): GetParams and Step send
  // their chunks as ChunkMessage buffers (server/chunk_message.h), Step and UploadParams read
  // theirs where gRPC received them (ViewChunk, server/chunk_view.h).
  grpc::Status GetParamsRaw(
      grpc::ServerContext* context,
      grpc::ServerSplitStreamer<v1::GetParamsRequest, grpc::ByteBuffer>* streamer);
  grpc::Status StepRaw(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>* stream);
  grpc::Status UploadParamsRaw(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<v1::UploadParamsResponse, grpc::ByteBuffer>* stream);
  grpc::Status StepSmall(grpc::ServerContext* context, const v1::StepSmallRequest* request,
                         v1::StepSmallResponse* response) override;
  grpc::Status AttachSharedMemory(grpc::ServerContext* context,
                                  const v1::AttachSharedMemoryRequest* request,
                                  v1::SharedMemoryRegion* response) override;
  grpc::Status Checkpoint(grpc::ServerContext* context, const v1::CheckpointRequest* request,
                          v1::CheckpointResponse* response) override;
  grpc::Status Restore(grpc::ServerContext* context, const v1::RestoreRequest* request,
                       v1::RestoreResponse* response) override;
  grpc::Status AddTensors(grpc::ServerContext* context, const v1::AddTensorsRequest* request,
                          v1::SessionInfo* response) override;
  grpc::Status ExportState(grpc::ServerContext* context, const v1::ExportStateRequest* request,
                           grpc::ServerWriter<v1::ExportStateResponse>* writer) override;
  grpc::Status ImportState(grpc::ServerContext* context,
                           grpc::ServerReader<v1::ImportStateRequest>* reader,
                           v1::ImportStateResponse* response) override;
  grpc::Status GetAnalysis(grpc::ServerContext* context, const v1::GetAnalysisRequest* request,
                           v1::GetAnalysisResponse* response) override;
  grpc::Status GetServerInfo(grpc::ServerContext* context, const v1::GetServerInfoRequest* request,
                             v1::ServerInfo* response) override;

 private:
  // A place among max_streams, given back when destroyed.
  class StreamSlot;
  // For a streaming call: its metadata's token must open some session (or be the admin token)
  // before the call waits for any message, and a place must be free among max_streams.
  absl::StatusOr<std::unique_ptr<StreamSlot>> EnterStream(grpc::ServerContext* context);
  // The index gRPC's generated service gave `method` (methods are added in the proto's order),
  // checked against the handler of type `Generated` it installed there: a mismatch is a build of
  // other generated code, and a daemon serving the wrong method must not start (it aborts).
  template <typename Generated>
  int MethodIndex(absl::string_view method);
  // Serves `method` (whose generated handler is a `Generated`) with `serve`, a stream of byte
  // buffers one way or both (a bidirectional handler; to the client nothing changes).
  template <typename Generated, typename Write, typename Read>
  void ServeStream(absl::string_view method,
                   grpc::Status (OptimizerService::*serve)(grpc::ServerContext*,
                                                           grpc::ServerReaderWriter<Write, Read>*));
  // Readiness from the streams now open (ServiceOptions::on_saturation on a change).
  void UpdateSaturation();

  absl::StatusOr<std::shared_ptr<Session>> Authorize(grpc::ServerContext* context,
                                                     absl::string_view session_id);
  // A step call past its checks (session, token, header, result dtype and chunk size, queue
  // place, drain), holding its place in the step queue until it goes.
  struct AdmittedStep;
  absl::StatusOr<std::unique_ptr<AdmittedStep>> AdmitStep(grpc::ServerContext* context,
                                                          const v1::StepHeader& header,
                                                          absl::string_view& reason);
  // The received gradients' errors as a step's (counting refused non-finite values).
  absl::Status StepReceiveError(const AdmittedStep& step, const v1::StepHeader& header,
                                const TensorStaging& staging, absl::Status received,
                                absl::string_view& reason);
  // After a step call's gradients arrived (`received`: how that went): checks they are whole and
  // runs the step, noting when each began; `on_decided` is Session::Step's (early results).
  absl::StatusOr<StepReply> StepReceived(
      grpc::ServerContext* context, const AdmittedStep& step, const v1::StepHeader& header,
      std::unique_ptr<TensorStaging>& staging, absl::Status received, absl::string_view& reason,
      absl::Time& received_at, absl::Time& stepped_at,
      const std::function<void(StepReply)>& on_decided = nullptr);
  // The step phases' metrics of a finished step call.
  void ObserveStep(const Session& session, const StepReply& reply, absl::Time start,
                   absl::Time received_at, absl::Time stepped_at);
  // `reason` is set when a failure has a more precise rejection reason than its code.
  absl::Status RunStep(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>* stream,
                       StreamWatchdog::Watch& watch, absl::string_view& reason);
  // StepSmall with `shared_memory`: the gradients from the worker's region, the results into it,
  // the summary into `summary`.
  absl::Status StepShared(grpc::ServerContext* context, const v1::StepSmallRequest& request,
                          const AdmittedStep& step, absl::Time start, v1::StepSummary& summary,
                          absl::string_view& reason);
  // Counts the finished RPC (and its rejection) and converts its status.
  grpc::Status Finish(absl::string_view method, const absl::Status& status,
                      absl::string_view reason = {});
  void CountSent(int64_t bytes);

  SessionManager& sessions_;
  const ServiceOptions options_;
  RateLimitedLog refusals_{absl::Seconds(10)};
  StreamWatchdog watchdog_{options_.clock};
  std::atomic<int> streams_{0};
  absl::Mutex saturation_mu_;
  bool saturated_ ABSL_GUARDED_BY(saturation_mu_) = false;
  std::atomic<bool> draining_{false};
  std::atomic<int> steps_in_flight_{0};
};

}  // namespace optd::server

#endif  // OPTD_SERVER_SERVICE_H_
