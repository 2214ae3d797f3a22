// optd: the optimizer daemon. `optd --help` lists the flags.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/command_line.h"
#include "kernels/cpu/openblas_core.h"
#include "server/auth.h"
#include "server/heap.h"
#include "server/log.h"
#include "server/server.h"
#include "server/session_config.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "Address to serve gRPC on, host:port; port 0 picks a free port (see --port_file).");
ABSL_FLAG(std::string, backend, "auto",
          "Optimizer backend: auto, cpu or cuda. auto takes the GPU when a CUDA device is present "
          "and the CPU otherwise, and logs which and why; cuda refuses to start without one.");
ABSL_FLAG(int, threads, 0, "CPU backend threads (BLAS and element loops); 0 uses every core.");
ABSL_FLAG(int, gpu, 0, "CUDA device the CUDA backend runs on.");
ABSL_FLAG(int64_t, gpu_memory_budget_bytes, 0,
          "Device memory the CUDA backend may hold for sessions; beyond it CreateSession answers "
          "RESOURCE_EXHAUSTED. 0: 90% of the device memory free at start.");
ABSL_FLAG(bool, cuda_graphs, true,
          "Run each session's steps after its first as one CUDA graph (CUDA backend): one launch "
          "instead of hundreds; a step whose shape changes is recorded anew.");
ABSL_FLAG(bool, allow_tf32, false,
          "Run fp32 products on TF32 tensor cores (CUDA backend): faster, but outside fp32's "
          "1e-5 agreement with an fp64 reference.");
ABSL_FLAG(std::string, state_dir, "",
          "Directory for checkpoints; optd resumes every session found in it. Empty: sessions "
          "live in memory only and Checkpoint/Restore are refused.");
ABSL_FLAG(std::string, shared_state_root, "",
          "Directory every instance of a sharded deployment can read (a shared volume, or one "
          "host's disk), with one directory of checkpoints per instance: <root>/<instance_name>. "
          "A resharded session restores its tensors from there (CreateSession restore_from), and "
          "Checkpoint with shared=true writes there. Point --state_dir at <root>/<instance_name> "
          "to use one copy for both. Empty: resharding is off.");
ABSL_FLAG(std::string, instance_name, "",
          "This instance's name in --shared_state_root; empty: the host name (a StatefulSet "
          "pod's name).");
ABSL_FLAG(int, max_sessions, 64, "Most sessions held at once (RESOURCE_EXHAUSTED beyond).");
ABSL_FLAG(int, max_sessions_per_client, 16,
          "Most sessions one client may hold when it creates them without the admin token (a "
          "client is its TLS certificate's identity, else its address), so that no client takes "
          "every slot; 0: no limit.");
ABSL_FLAG(int64_t, memory_budget_bytes, 0,
          "Bytes of state all sessions together may hold (loaded or not), the daemon's host "
          "memory budget: CreateSession beyond it answers RESOURCE_EXHAUSTED. 0: 80% of the "
          "memory optd may use (its cgroup's limit, else the machine's).");
ABSL_FLAG(int64_t, max_session_bytes, int64_t{16} << 30,
          "Most bytes of state one session may hold: parameters, optimizer state, gradient "
          "staging per worker and the result buffer (RESOURCE_EXHAUSTED beyond).");
ABSL_FLAG(int64_t, max_message_bytes, (int64_t{4} << 20) + (64 << 10),
          "Largest gRPC message accepted or sent; chunks are at most 4 MiB.");
ABSL_FLAG(int64_t, chunk_bytes, int64_t{1} << 20,
          "Default size of the chunks results are streamed in (clients may ask for others).");
ABSL_FLAG(int, max_pending_steps, 64,
          "Step calls admitted at once, waiting ones included; beyond it Step answers "
          "UNAVAILABLE so clients back off.");
ABSL_FLAG(int, max_concurrent_streams, 256, "HTTP/2 streams per connection.");
ABSL_FLAG(int, max_streams, 0,
          "Streaming calls (Step, UploadParams, GetParams) served at once; beyond it they answer "
          "UNAVAILABLE and readiness turns NOT_SERVING until they drop, while a reserve of "
          "threads keeps answering the other calls. 0: --max_pending_steps + 32.");
ABSL_FLAG(double, stream_header_timeout_s, 10,
          "Seconds a streaming call may wait for its first message before it is cancelled.");
ABSL_FLAG(double, stream_idle_timeout_s, 60,
          "Seconds a stream may go without a message from its client, or without reading the "
          "daemon's, before it is cancelled (not counting a step's wait for its other workers).");
ABSL_FLAG(double, max_connection_idle_s, 300,
          "Connections without a call for this long are closed (GOAWAY; clients reconnect).");
ABSL_FLAG(double, max_connection_age_s, 3600,
          "Connections older than this are closed once their calls end (GOAWAY; clients "
          "reconnect), so no client holds one for good.");
ABSL_FLAG(double, straggler_timeout_s, 60,
          "Seconds a step waits for all workers of a multi-worker session before it is aborted "
          "(sessions may set their own).");
ABSL_FLAG(double, idle_ttl_s, 0,
          "Sessions unused this many seconds are checkpointed and unloaded, and reload on next "
          "use; 0 keeps them loaded. Needs --state_dir.");
ABSL_FLAG(double, drain_timeout_s, 30,
          "On SIGTERM, seconds steps in flight get to finish before sessions are checkpointed.");
ABSL_FLAG(std::string, admin_token, "",
          "Token that CreateSession and ListSessions require (Bearer metadata); it also opens and "
          "deletes every session (a session's own token deletes that session). Visible in the "
          "process's command line: prefer --admin_token_file. Empty: creating and listing are "
          "open to anyone who can connect.");
ABSL_FLAG(std::string, admin_token_file, "",
          "File whose first line is the admin token (as --admin_token, which it excludes): keeps "
          "the token out of argv and /proc/PID/cmdline (a mounted Kubernetes Secret, a systemd "
          "credential).");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain; with --tls_key turns TLS on.");
ABSL_FLAG(std::string, tls_key, "", "PEM private key for --tls_cert.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).");
ABSL_FLAG(std::string, metrics_addr, "127.0.0.1:9464",
          "host:port of the Prometheus endpoint (/metrics); empty turns it off; port 0 picks a "
          "free one.");
ABSL_FLAG(int, metrics_tensor_budget, 32,
          "Tensors per session whose optimizer figures get series of their own; the rest count "
          "in the session's aggregate only.");
ABSL_FLAG(int64_t, pipeline_scratch_bytes, -1,
          "Host memory for stepping tensors ahead while a step's gradients still arrive (CPU "
          "backend): each session's shadows of its parameters and state (2-3x its tensors), "
          "reserved the first time it steps, first come first served; tensors beyond it step "
          "after the last gradient. -1: min(4 GiB, --memory_budget_bytes / 8); 0: off.");
ABSL_FLAG(int, pipeline_threads, 2, "Threads that step tensors ahead (--pipeline_scratch_bytes).");
ABSL_FLAG(int64_t, early_results_min_bytes, int64_t{4} << 20,
          "CPU backend: a step whose results are at least this many bytes streams each tensor's "
          "result to the worker that completed the step as soon as it is final, while the "
          "commit computes the rest (not a step that writes a checkpoint or takes an analysis "
          "snapshot). -1: never.");
ABSL_FLAG(int64_t, analysis_max_bytes, int64_t{1} << 30,
          "Most bytes of momentum/update/gradient snapshots the analyzer holds; a session's "
          "analysis that does not fit is skipped (optd_analysis_skipped_total).");
ABSL_FLAG(int64_t, analysis_exact_max_dim, 1024,
          "Matrices whose smaller side is at most this get exact SVDs in the analysis; larger "
          "ones the stochastic Lanczos estimates (GetAnalysis marks them 'estimated').");
ABSL_FLAG(int64_t, malloc_keep_bytes, int64_t{32} << 20,
          "Freed heap memory each malloc arena keeps for the next allocation instead of returning "
          "it to the system, and the size below which allocations come from the heap (glibc's "
          "M_TRIM_THRESHOLD and M_MMAP_THRESHOLD, the latter at most 32 MiB): a step's messages "
          "and results then reuse memory instead of faulting in freshly zeroed pages every step. "
          "0: glibc's dynamic defaults.");
ABSL_FLAG(std::string, metrics_port_file, "",
          "Once serving, write the metrics port here (for --metrics_addr with port 0).");
ABSL_FLAG(bool, print_openblas_core, false,
          "Print the OpenBLAS core (kernel set) optd computes with on this machine and exit: "
          "scripts run their numpy or torch baselines with OPENBLAS_CORETYPE set to it, so both "
          "sides of a comparison multiply with the same kernels.");
ABSL_FLAG(std::string, port_file, "",
          "Write the bound port to this file once serving (for --listen=...:0).");

int main(int argc, char** argv) {
  // First, before any thread or file: where OpenBLAS took this CPU for an older one, this
  // replaces the process with itself run on the kernels the CPU calls for (openblas_core.h).
  const absl::Status blas_restart = optd::RestartWithSuitedOpenBlasCore(argv);
  // --help lists this file's flags (absl matches flag files against the program name otherwise).
  optd::ParseCommandLine(argc, argv, "optd",
                         "optimizer-as-a-service daemon (Muon, RMNP, MuonEq, NorMuon, AdamW).\n"
                         "  optd --listen=127.0.0.1:50051 --state_dir=/var/lib/optd",
                         "server/main.cc");
  if (absl::GetFlag(FLAGS_print_openblas_core)) {
    std::printf("%s\n", optd::InspectOpenBlasCore().loaded.c_str());
    return 0;
  }

  // Block the shutdown signals before any thread starts, then wait for them here.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  if (absl::Status kept = optd::server::KeepFreedHeap(absl::GetFlag(FLAGS_malloc_keep_bytes));
      !kept.ok()) {
    std::fprintf(stderr, "optd: --malloc_keep_bytes: %s\n", std::string(kept.message()).c_str());
    // Where it cannot be done (not glibc, a sanitizer's allocator) the C library keeps its own
    // policy: a warning, not a refusal.
    if (!absl::IsUnimplemented(kept)) return 2;
  }

  optd::server::ServerOptions options;
  options.listen = absl::GetFlag(FLAGS_listen);
  options.backend = absl::GetFlag(FLAGS_backend);
  options.threads = absl::GetFlag(FLAGS_threads);
  options.cuda.device = absl::GetFlag(FLAGS_gpu);
  options.cuda.memory_budget_bytes = absl::GetFlag(FLAGS_gpu_memory_budget_bytes);
  options.cuda.allow_tf32 = absl::GetFlag(FLAGS_allow_tf32);
  options.cuda.step_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  options.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  options.admin_token = absl::GetFlag(FLAGS_admin_token);
  if (const std::string path = absl::GetFlag(FLAGS_admin_token_file); !path.empty()) {
    absl::StatusOr<std::string> token = optd::server::ReadTokenFile(path);
    if (!options.admin_token.empty() || !token.ok()) {
      std::fprintf(stderr, "optd: --admin_token_file: %s\n",
                   token.ok() ? "give it or --admin_token, not both"
                              : std::string(token.status().message()).c_str());
      return 2;
    }
    options.admin_token = *std::move(token);
  }
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  options.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  options.service.max_streams = absl::GetFlag(FLAGS_max_streams);
  options.service.stream_header_timeout =
      absl::Seconds(absl::GetFlag(FLAGS_stream_header_timeout_s));
  options.service.stream_idle_timeout = absl::Seconds(absl::GetFlag(FLAGS_stream_idle_timeout_s));
  options.max_connection_idle = absl::Seconds(absl::GetFlag(FLAGS_max_connection_idle_s));
  options.max_connection_age = absl::Seconds(absl::GetFlag(FLAGS_max_connection_age_s));
  options.drain_timeout = absl::Seconds(absl::GetFlag(FLAGS_drain_timeout_s));
  options.sessions.state_dir = absl::GetFlag(FLAGS_state_dir);
  options.sessions.shared_state_root = absl::GetFlag(FLAGS_shared_state_root);
  options.sessions.instance_name = absl::GetFlag(FLAGS_instance_name);
  if (options.sessions.instance_name.empty()) {
    char host[256] = {};
    if (gethostname(host, sizeof(host) - 1) == 0) options.sessions.instance_name = host;
  }
  if (!options.sessions.shared_state_root.empty() &&
      !optd::server::IsValidSessionId(options.sessions.instance_name)) {
    std::fprintf(stderr, "optd: --instance_name '%s' is not [A-Za-z0-9_.-]{1,64}\n",
                 options.sessions.instance_name.c_str());
    return 2;
  }
  options.sessions.max_sessions = absl::GetFlag(FLAGS_max_sessions);
  options.sessions.max_session_bytes = absl::GetFlag(FLAGS_max_session_bytes);
  options.sessions.max_sessions_per_client = absl::GetFlag(FLAGS_max_sessions_per_client);
  options.sessions.memory_budget_bytes = absl::GetFlag(FLAGS_memory_budget_bytes);
  options.sessions.idle_ttl = absl::Seconds(absl::GetFlag(FLAGS_idle_ttl_s));
  options.sessions.default_straggler_timeout =
      absl::Seconds(absl::GetFlag(FLAGS_straggler_timeout_s));
  options.service.max_pending_steps = absl::GetFlag(FLAGS_max_pending_steps);
  options.service.default_chunk_bytes = absl::GetFlag(FLAGS_chunk_bytes);
  options.metrics_addr = absl::GetFlag(FLAGS_metrics_addr);
  options.metrics.tensor_label_budget = absl::GetFlag(FLAGS_metrics_tensor_budget);
  options.analyzer.max_snapshot_bytes = absl::GetFlag(FLAGS_analysis_max_bytes);
  options.pipeline_scratch_bytes = absl::GetFlag(FLAGS_pipeline_scratch_bytes);
  options.pipeline_threads = absl::GetFlag(FLAGS_pipeline_threads);
  options.early_results_min_bytes = absl::GetFlag(FLAGS_early_results_min_bytes);
  options.analyzer.analysis.exact_max_dim = absl::GetFlag(FLAGS_analysis_exact_max_dim);
  if (options.service.default_chunk_bytes < 4 ||
      options.service.default_chunk_bytes > optd::kMaxChunkBytes ||
      options.max_message_bytes < options.service.default_chunk_bytes + 1024) {
    std::fprintf(stderr,
                 "optd: --chunk_bytes must be in [4, 4 MiB] and below --max_message_bytes\n");
    return 2;
  }
  if (options.sessions.idle_ttl > absl::ZeroDuration() && options.sessions.state_dir.empty()) {
    std::fprintf(stderr, "optd: --idle_ttl_s needs --state_dir to unload sessions into\n");
    return 2;
  }

  absl::StatusOr<std::unique_ptr<optd::server::Server>> server =
      optd::server::Server::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "optd: %s\n", server.status().ToString().c_str());
    return 1;
  }
  for (const std::string& line : (*server)->startup_log()) optd::server::LogEvent(line);
  optd::server::LogEvent(optd::OpenBlasCoreNote());
  if (!blas_restart.ok()) optd::server::LogEvent(std::string(blas_restart.message()));
  optd::server::LogEvent(
      absl::StrCat("optd ", optd::kOptdVersion, " serving on ", (*server)->address()));
  // Written whole under a temporary name, so a reader never sees half a port.
  auto write_port = [](const std::string& path, int port) {
    if (path.empty()) return;
    const std::string temporary = path + ".tmp";
    std::ofstream(temporary) << port << "\n";
    std::rename(temporary.c_str(), path.c_str());
  };
  write_port(absl::GetFlag(FLAGS_metrics_port_file), (*server)->metrics_port());
  write_port(absl::GetFlag(FLAGS_port_file), (*server)->port());

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  optd::server::LogEvent(absl::StrCat(signal_number == SIGTERM ? "SIGTERM" : "SIGINT",
                                      ": draining steps, checkpointing sessions"));
  absl::Status stopped = (*server)->Shutdown();
  if (!stopped.ok()) {
    optd::server::LogEvent(absl::StrCat("shutdown checkpoint failed: ", stopped.ToString()));
    return 1;
  }
  optd::server::LogEvent("stopped");
  return 0;
}
