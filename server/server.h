// The optd daemon as an object: backend, sessions, the gRPC server with health checking and
// reflection, the idle-session reaper, and the drain-and-checkpoint shutdown. main.cc wires flags
// to it; end-to-end tests run it in-process.
#ifndef OPTD_SERVER_SERVER_H_
#define OPTD_SERVER_SERVER_H_

#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "kernels/backend.h"
#include "server/analyzer.h"
#include "server/metrics.h"
#include "server/metrics_http.h"
#include "server/service.h"
#include "server/session_manager.h"

namespace optd::server {

// The service name readiness is reported under; "" is liveness.
inline constexpr char kServiceName[] = "optd.v1.Optimizer";

struct ServerOptions {
  std::string listen = "127.0.0.1:50051";  // port 0 picks a free one
  std::string backend = "auto";            // auto | cpu | cuda
  int threads = 0;                         // CPU backend threads; 0: all cores
  CudaBackendOptions cuda;                 // the CUDA backend's device, memory budget, TF32
  // PEM file paths; cert and key turn TLS on, a client CA makes it mutual.
  std::string tls_cert, tls_key, tls_client_ca;
  std::string admin_token;  // empty: CreateSession and ListSessions need none
  int64_t max_message_bytes = kMaxChunkBytes + (64 << 10);
  int max_concurrent_streams = 256;
  // Connections without a call for max_connection_idle, or older than max_connection_age, are
  // sent GOAWAY (clients reconnect on their next call; calls under way get the drain timeout to
  // finish, or the straggler timeout past it): no client holds a connection for good.
  absl::Duration max_connection_idle = absl::Minutes(5);
  absl::Duration max_connection_age = absl::Hours(1);
  absl::Duration drain_timeout = absl::Seconds(30);
  // host:port the Prometheus exposition is served on (/metrics); empty: not served (the
  // metrics are still kept, see Server::metrics()). Port 0 picks a free one.
  std::string metrics_addr;
  // What the daemon's deadlines and idle times read (straggler timeouts, the idle-session reaper,
  // the stream watchdog); default RealClock(). Tests drive them with a fake one instead of
  // sleeping. Durations measured for the metrics use the real clock.
  Clock* clock = nullptr;
  // Per-tensor pipelining of steps (server/step_pipeline.h), CPU backend: the scratch every
  // session's shadows share, and the threads that step tensors ahead. -1: min(4 GiB, the
  // sessions' memory budget / 8); 0: every step runs serially.
  int64_t pipeline_scratch_bytes = -1;
  int pipeline_threads = 2;
  // Early results (Session::Step), CPU backend: a step whose results are at least this many
  // bytes streams each tensor's result as soon as it is final, while the commit computes the
  // rest; -1: never. (The CUDA backend's step is one asynchronous graph: none there.)
  int64_t early_results_min_bytes = int64_t{4} << 20;
  MetricsOptions metrics;
  AnalyzerOptions analyzer;
  SessionManagerOptions sessions;
  ServiceOptions service;
};

class Server {
 public:
  // Picks the backend, recovers the sessions in the state directory and starts serving.
  // InvalidArgument for bad options, Unavailable when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<Server>> Start(ServerOptions options);
  ~Server();

  int port() const { return port_; }
  std::string address() const;
  Backend& backend() { return *backend_; }
  int steps_in_flight() const { return service_->steps_in_flight(); }
  SessionManager& sessions() { return *sessions_; }
  Metrics& metrics() { return *metrics_; }
  Analyzer& analyzer() { return *analyzer_; }
  // Null when steps run serially (no scratch, or not the CPU backend).
  Pipeliner* pipeliner() { return pipeliner_.get(); }
  // The port /metrics is served on; 0 when it is not.
  int metrics_port() const { return metrics_port_; }
  // Lines worth logging at start-up (backend choice, recovered and skipped sessions).
  const std::vector<std::string>& startup_log() const { return startup_log_; }

  // Readiness goes NOT_SERVING, new steps are refused, steps in flight get up to the drain
  // timeout to finish, every session is checkpointed, and the gRPC server stops. Returns the
  // checkpoint result; idempotent.
  absl::Status Shutdown();

 private:
  Server() = default;
  Clock& clock() const { return *options_.clock; }

  ServerOptions options_;
  // Declared first, destroyed last: sessions and the service report to it until they go.
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Backend> analysis_backend_;  // null: the analyzer shares backend_ (the GPU)
  std::unique_ptr<Analyzer> analyzer_;
  // Before the sessions: they give their scratch back to it as they go.
  std::unique_ptr<Pipeliner> pipeliner_;
  std::unique_ptr<SessionManager> sessions_;
  std::unique_ptr<OptimizerService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::vector<std::string> startup_log_;
  absl::Notification stop_reaper_;
  std::thread reaper_;
  bool shut_down_ = false;
  // Readiness: NOT_SERVING while the streams are saturated (ServiceOptions::max_streams) or the
  // server is shutting down.
  absl::Mutex health_mu_;
  grpc::HealthCheckServiceInterface* health_ ABSL_GUARDED_BY(health_mu_) = nullptr;
  bool stopping_ ABSL_GUARDED_BY(health_mu_) = false;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  int metrics_port_ = 0;
};

// grpc::Server credentials for `options`: insecure, TLS, or mutual TLS. InvalidArgument naming
// the file that cannot be read.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const ServerOptions& options);

}  // namespace optd::server

#endif  // OPTD_SERVER_SERVER_H_
