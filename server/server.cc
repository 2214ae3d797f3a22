#include "server/server.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/address.h"
#include "server/auth.h"

namespace optd::server {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, absl::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read ", what, " file '", path, "'"));
  }
  std::stringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

// The backend --backend names; `choice` says how it was chosen (and why not the GPU).
absl::StatusOr<std::unique_ptr<Backend>> PickBackend(const ServerOptions& options,
                                                     std::string& choice) {
  if (options.backend != "auto" && options.backend != "cpu" && options.backend != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("--backend=", options.backend, " is not one of auto, cpu, cuda"));
  }
  if (options.backend != "cpu") {
    absl::StatusOr<std::unique_ptr<Backend>> cuda = CreateCudaBackend(options.cuda);
    if (cuda.ok()) {
      choice = options.backend == "auto" ? "--backend=auto: cuda (a CUDA device is present)"
                                         : "--backend=cuda";
      return cuda;
    }
    if (options.backend == "cuda" || !absl::IsUnavailable(cuda.status())) {
      // Without a GPU, --backend=cuda cannot start; with one, a bad CUDA setting (a device that
      // does not exist, a budget below one queue) is an error either way, not a silent fallback.
      return absl::FailedPreconditionError(
          absl::StrCat("--backend=", options.backend, ": ", cuda.status().message()));
    }
    choice = absl::StrCat("--backend=auto: cpu (", cuda.status().message(), ")");
  } else {
    choice = "--backend=cpu";
  }
  CpuBackendOptions cpu;
  cpu.threads = options.threads;
  return CreateCpuBackend(cpu);
}

// Streams the daemon serves beyond --max_pending_steps by default (uploads, parameter reads), and
// threads kept beyond the streams for unary calls.
constexpr int kStreamsBeyondSteps = 32;
constexpr int kUnaryThreadReserve = 32;

// 80% of the memory this process may use: its cgroup's limit (v2 memory.max, v1
// memory.limit_in_bytes) when there is one below the machine's, else the machine's.
int64_t DefaultMemoryBudget() {
  const int64_t pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  int64_t limit = pages > 0 && page > 0 ? pages * page : int64_t{16} << 30;
  for (const char* path :
       {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream file(path);
    int64_t cgroup = 0;
    if (file >> cgroup && cgroup > 0) limit = std::min(limit, cgroup);  // "max" fails to parse
  }
  return limit / 5 * 4;
}

// The analyzer's own backend on the CPU: a single loop thread, so that it never waits for (or
// holds up) the step backend's thread pool. On a GPU it needs none: it shares the step backend
// through a low-priority queue of its own (Analyzer::Create), so steps' kernels go first.
absl::StatusOr<std::unique_ptr<Backend>> AnalysisBackend(const Backend& steps) {
  if (steps.name() == "cuda") return nullptr;
  CpuBackendOptions cpu;
  cpu.threads = 1;
  return CreateCpuBackend(cpu);
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const ServerOptions& options) {
  if (options.tls_cert.empty() && options.tls_key.empty()) {
    if (!options.tls_client_ca.empty()) {
      return absl::InvalidArgumentError("--tls_client_ca needs --tls_cert and --tls_key");
    }
    return grpc::InsecureServerCredentials();
  }
  if (options.tls_cert.empty() || options.tls_key.empty()) {
    return absl::InvalidArgumentError("TLS needs both --tls_cert and --tls_key");
  }
  grpc::SslServerCredentialsOptions ssl;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  OPTD_ASSIGN_OR_RETURN(pair.cert_chain, ReadPem(options.tls_cert, "--tls_cert"));
  OPTD_ASSIGN_OR_RETURN(pair.private_key, ReadPem(options.tls_key, "--tls_key"));
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (!options.tls_client_ca.empty()) {
    OPTD_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPem(options.tls_client_ca, "--tls_client_ca"));
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

absl::StatusOr<std::unique_ptr<Server>> Server::Start(ServerOptions options) {
  OPTD_RETURN_IF_ERROR(ParseHostPort(options.listen, "--listen").status());
  std::unique_ptr<Server> server(new Server());
  OPTD_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                        ServerCredentials(options));
  v1::ServerInfo& info = options.service.server_info;
  OPTD_ASSIGN_OR_RETURN(server->backend_, PickBackend(options, *info.mutable_backend_choice()));
  info.set_backend(std::string(server->backend_->name()));
  info.set_backend_description(server->backend_->description());
  info.set_instance_name(options.sessions.instance_name);
  info.set_shared_state(!options.sessions.shared_state_root.empty());
  if (info.shared_state()) {
    server->startup_log_.push_back(absl::StrCat("instance '", options.sessions.instance_name,
                                                "' in shared state root ",
                                                options.sessions.shared_state_root));
  }
  server->startup_log_.push_back(absl::StrCat("backend ", info.backend_choice()));
  server->startup_log_.push_back(absl::StrCat("backend: ", info.backend_description()));
  if (options.metrics.tensor_label_budget < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics_tensor_budget must be >= 0, got ",
                                                   options.metrics.tensor_label_budget));
  }
  options.metrics.session_memory_limit_bytes = options.sessions.max_session_bytes;
  if (options.sessions.memory_budget_bytes < 0 || options.sessions.max_sessions_per_client < 0) {
    return absl::InvalidArgumentError(
        "--memory_budget_bytes and --max_sessions_per_client must be >= 0");
  }
  if (options.sessions.memory_budget_bytes == 0) {
    options.sessions.memory_budget_bytes = DefaultMemoryBudget();
  }
  server->startup_log_.push_back(
      absl::StrCat("memory budget for sessions: ", options.sessions.memory_budget_bytes, " bytes"));
  server->metrics_ = std::make_unique<Metrics>(options.metrics);
  server->metrics_->SetBackendInfo(info.backend(), info.backend_description());
  if (!options.metrics_addr.empty()) {
    OPTD_ASSIGN_OR_RETURN(
        server->metrics_http_,
        MetricsHttpServer::Start(options.metrics_addr, server->metrics_->registry()));
    server->metrics_port_ = server->metrics_http_->port();
    server->startup_log_.push_back(absl::StrCat(
        "metrics on http://", options.metrics_addr.substr(0, options.metrics_addr.rfind(':')), ":",
        server->metrics_port_, "/metrics"));
  }
  OPTD_ASSIGN_OR_RETURN(server->analysis_backend_, AnalysisBackend(*server->backend_));
  Backend& analysis =
      server->analysis_backend_ != nullptr ? *server->analysis_backend_ : *server->backend_;
  OPTD_ASSIGN_OR_RETURN(server->analyzer_,
                        Analyzer::Create(analysis, server->metrics_.get(), options.analyzer));
  options.sessions.metrics = server->metrics_.get();
  options.sessions.analyzer = server->analyzer_.get();
  options.service.metrics = server->metrics_.get();
  options.service.max_message_bytes = options.max_message_bytes;
  if (options.clock == nullptr) options.clock = &RealClock();
  options.sessions.clock = options.clock;
  options.service.clock = options.clock;
  if (!options.admin_token.empty()) {
    options.sessions.admin_token_digest = TokenDigest(options.admin_token);
  }
  options.sessions.max_world_size = options.service.max_pending_steps;
  if (options.pipeline_scratch_bytes < -1 || options.pipeline_threads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--pipeline_scratch_bytes must be >= -1 (got ", options.pipeline_scratch_bytes,
                     ") and --pipeline_threads >= 1 (got ", options.pipeline_threads, ")"));
  }
  if (options.early_results_min_bytes < -1) {
    return absl::InvalidArgumentError(absl::StrCat("--early_results_min_bytes must be >= -1 (got ",
                                                   options.early_results_min_bytes, ")"));
  }
  options.sessions.early_results_min_bytes =
      server->backend_->name() == "cpu" ? options.early_results_min_bytes : -1;
  if (options.pipeline_scratch_bytes == -1) {
    options.pipeline_scratch_bytes =
        std::min<int64_t>(int64_t{4} << 30, options.sessions.memory_budget_bytes / 8);
  }
  // The CUDA backend's steps already run on the device while the host receives; pipelining there
  // is not done (nor proved bit-identical to its batched kernels).
  if (options.pipeline_scratch_bytes > 0 && server->backend_->name() == "cpu") {
    server->pipeliner_ = std::make_unique<Pipeliner>(
        Pipeliner::Options{options.pipeline_scratch_bytes, options.pipeline_threads});
    options.sessions.pipeliner = server->pipeliner_.get();
    server->startup_log_.push_back(absl::StrCat("step pipelining: ", options.pipeline_scratch_bytes,
                                                " bytes of scratch, ", options.pipeline_threads,
                                                " threads"));
  }
  server->sessions_ = std::make_unique<SessionManager>(*server->backend_, options.sessions);
  std::vector<std::string> skipped;
  OPTD_RETURN_IF_ERROR(server->sessions_->Recover(&skipped));
  for (const std::string& s : skipped) {
    server->startup_log_.push_back(absl::StrCat("skipped checkpoint ", s));
  }
  if (!options.sessions.state_dir.empty()) {
    server->startup_log_.push_back(absl::StrCat("state directory ", options.sessions.state_dir,
                                                ": ", server->sessions_->num_sessions(),
                                                " session(s) to resume"));
  }
  // Every pending step holds a thread of the synchronous server (workers wait for each other), so
  // the streams leave room for all of them; past the streams, a reserve of threads stays free for
  // the unary calls (session admin, GetServerInfo) and the health service.
  if (options.service.max_streams <= 0) {
    options.service.max_streams = options.service.max_pending_steps + kStreamsBeyondSteps;
  }
  if (options.service.max_streams < options.service.max_pending_steps) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_streams (", options.service.max_streams, ") must be at least --max_pending_steps (",
        options.service.max_pending_steps, "): every pending step is a stream"));
  }
  Server* self = server.get();
  options.service.on_saturation = [self](bool saturated) {
    absl::MutexLock lock(&self->health_mu_);
    if (self->health_ != nullptr && !self->stopping_) {
      self->health_->SetServingStatus(kServiceName, !saturated);
    }
  };
  server->service_ = std::make_unique<OptimizerService>(*server->sessions_, options.service);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, credentials, &server->port_);
  builder.RegisterService(server->service_.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  grpc::ResourceQuota quota("optd");
  quota.SetMaxThreads(options.service.max_streams + kUnaryThreadReserve);
  builder.SetResourceQuota(quota);
  builder.AddChannelArgument(
      GRPC_ARG_MAX_CONNECTION_IDLE_MS,
      static_cast<int>(absl::ToInt64Milliseconds(options.max_connection_idle)));
  builder.AddChannelArgument(
      GRPC_ARG_MAX_CONNECTION_AGE_MS,
      static_cast<int>(absl::ToInt64Milliseconds(options.max_connection_age)));
  builder.AddChannelArgument(
      GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
      static_cast<int>(absl::ToInt64Milliseconds(options.drain_timeout + absl::Seconds(60))));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, options.max_concurrent_streams);
  // Gradient streams are bulk transfers: let each stream run 16 MiB ahead of its reader (HTTP/2
  // flow-control window) instead of waiting for window updates every 64 KiB.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 20);
  // Keepalive: ping idle clients every 60 s, drop them after 20 s without an answer; refuse
  // clients that ping more often than every 10 s (gRPC's anti-abuse strikes).
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 60000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 2);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  {
    absl::MutexLock lock(&server->health_mu_);
    server->health_ = server->server_->GetHealthCheckService();
    server->health_->SetServingStatus(kServiceName, true);
  }
  server->options_ = std::move(options);

  // Unloads idle sessions (--idle_ttl_s) and deletes those past their own
  // delete_after_idle_seconds, which any session may ask for: so it always runs.
  const absl::Duration ttl = server->options_.sessions.idle_ttl;
  const absl::Duration period =
      ttl > absl::ZeroDuration()
          ? std::clamp(ttl / 4, absl::Milliseconds(50), absl::Milliseconds(250))
          : absl::Milliseconds(250);
  server->reaper_ = std::thread([self, period] {
    while (!self->stop_reaper_.WaitForNotificationWithTimeout(period)) {
      self->sessions_->UnloadIdle(self->clock().Now());
      self->sessions_->DeleteExpired(self->clock().Now());
    }
  });
  return server;
}

std::string Server::address() const {
  const std::string& listen = options_.listen;
  return absl::StrCat(listen.substr(0, listen.rfind(':')), ":", port_);
}

absl::Status Server::Shutdown() {
  if (shut_down_) return absl::OkStatus();
  shut_down_ = true;
  {
    absl::MutexLock lock(&health_mu_);
    stopping_ = true;
    health_->SetServingStatus(kServiceName, false);
  }
  service_->StartDraining();
  service_->WaitForIdle(options_.drain_timeout);
  if (reaper_.joinable()) {
    stop_reaper_.Notify();
    reaper_.join();
  }
  // Stop serving first, so that nothing can change a session after its final checkpoint.
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  server_->Wait();
  return sessions_->CheckpointAll();
}

Server::~Server() {
  if (!shut_down_ && server_ != nullptr) Shutdown().IgnoreError();
  if (reaper_.joinable()) {
    stop_reaper_.Notify();
    reaper_.join();
  }
  // The analyzer may still publish into sessions and metrics: it stops before they go.
  analyzer_.reset();
}

}  // namespace optd::server
