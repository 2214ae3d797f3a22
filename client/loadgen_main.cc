// optd-loadgen: load-tests optd's update path. `optd-loadgen --help` lists the flags;
// `optd-loadgen compare BASE.json NEW.json` compares two reports.
#include <signal.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "client/loadgen.h"
#include "common/command_line.h"
#include "common/dtype.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051",
          "optd endpoints, HOST:PORT[,HOST:PORT...]; sessions are spread over them (or, with "
          "--sharded, each spans all of them).");
ABSL_FLAG(bool, sharded, false,
          "Each session is one sharded session over every --server endpoint (placement by "
          "Newton-Schulz cost, all owners stepped at once) instead of living on one.");
ABSL_FLAG(std::string, metrics, "",
          "Their /metrics addresses, HOST:PORT, one per endpoint (empty: no server phases).");
ABSL_FLAG(std::string, admin_token, "", "Admin token for creating and deleting the sessions.");
ABSL_FLAG(bool, tls, false, "Connect with TLS (implied by --tls_ca, --tls_cert, --tls_key).");
ABSL_FLAG(std::string, tls_ca, "", "PEM CA bundle the server's certificate is checked against.");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate for mutual TLS (with --tls_key).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert.");
ABSL_FLAG(std::string, tls_server_name, "", "Name to check the server's certificate against.");
ABSL_FLAG(std::string, model, "gpt2-small",
          "gpt2-small, gpt2-medium, llama-1b-layer, or a JSON file {\"tensors\": [{\"name\": ..., "
          "\"shape\": [...]}]}.");
ABSL_FLAG(bool, print_model, false,
          "Print --model's tensors as JSON ({\"tensors\": [{name, shape, adamw}]}) and exit: the "
          "one catalogue the benchmarks read.");
ABSL_FLAG(std::string, preset, "keller", "Optimizer preset of the matrices (vectors: adamw).");
ABSL_FLAG(std::string, wire_dtype, "fp32", "Gradient wire dtype: fp32, bf16 or fp16.");
ABSL_FLAG(std::string, step_path, "auto",
          "How steps travel: stream (Step), small (StepSmall, one message each way), shared "
          "(StepSmall through each worker's shared-memory region: the daemon on this host, not "
          "with --sharded) or auto (StepSmall while the step fits one message).");
ABSL_FLAG(std::string, result, "parameters", "What a step returns: parameters, delta or none.");
ABSL_FLAG(int, world_size, 1, "Workers per session; a step applies once all have sent it.");
ABSL_FLAG(std::string, concurrency, "1",
          "Sessions stepping at once: N, or a sweep FIRST:LAST:xFACTOR or FIRST:LAST:+STEP. In "
          "the open loop, the most sessions in flight.");
ABSL_FLAG(double, rate, 0,
          "Open loop: steps started per second, latency measured from each intended start. 0: "
          "closed loop.");
ABSL_FLAG(std::string, arrival, "constant",
          "Open-loop arrivals: constant or poisson (needs --rate).");
ABSL_FLAG(int, warmup_steps, 2, "Unmeasured steps per session before each level.");
ABSL_FLAG(int64_t, steps, 0, "Measured worker steps per level; 0: bounded by time only.");
ABSL_FLAG(double, duration_s, 30, "Longest a level is measured, seconds.");
ABSL_FLAG(double, window_s, 2, "Measurement window, seconds.");
ABSL_FLAG(int, stable_windows, 3, "A level is stable when this many last windows agree...");
ABSL_FLAG(double, stability, 0.1, "...within this fraction of their mean steps/s.");
ABSL_FLAG(int, max_windows, 10, "Most windows a level measures.");
ABSL_FLAG(double, max_error_rate, 0,
          "Share of failed steps above which a level is error-ridden (exit 1).");
ABSL_FLAG(int, inject_bad_every, 0,
          "Every N-th step, first send one with a wrong step number (errors under load).");
ABSL_FLAG(double, step_timeout_s, 60,
          "Deadline of each step (DEADLINE_EXCEEDED counts as an error); other calls get 30 s.");
ABSL_FLAG(std::string, json, "", "Write the report as JSON here.");
ABSL_FLAG(std::string, csv, "", "Write one CSV row per level here.");
ABSL_FLAG(double, threshold, 0.1,
          "compare: a fall in steps/s or rise in p99 latency beyond this is a regression.");

namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError("cannot read " + path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

int Compare(const std::vector<char*>& args) {
  if (args.size() != 4) {
    std::fprintf(stderr, "usage: optd-loadgen compare BASELINE.json CANDIDATE.json\n");
    return 2;
  }
  absl::StatusOr<std::string> a = ReadFile(args[2]), b = ReadFile(args[3]);
  if (!a.ok() || !b.ok()) {
    std::fprintf(stderr, "optd-loadgen: %s\n", (a.ok() ? b : a).status().ToString().c_str());
    return 2;
  }
  absl::StatusOr<optd::v1::LoadgenReport> base = optd::loadgen::FromJson(*a);
  absl::StatusOr<optd::v1::LoadgenReport> candidate = optd::loadgen::FromJson(*b);
  if (!base.ok() || !candidate.ok()) {
    std::fprintf(stderr, "optd-loadgen: %s\n",
                 (base.ok() ? candidate.status() : base.status()).ToString().c_str());
    return 2;
  }
  bool regressed = false;
  std::fputs(
      optd::loadgen::Compare(*base, *candidate, absl::GetFlag(FLAGS_threshold), &regressed).c_str(),
      stdout);
  return regressed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<char*> args = optd::ParseCommandLine(
      argc, argv, "optd-loadgen",
      "load-tests optd's update path.\n"
      "  optd-loadgen --server=HOST:PORT --model=gpt2-small --concurrency=1:16:x2 --json=r.json\n"
      "  optd-loadgen --rate=50 --arrival=poisson --concurrency=32\n"
      "  optd-loadgen compare BASELINE.json CANDIDATE.json [--threshold=0.1]",
      "client/loadgen_main.cc");
  if (args.size() > 1 && std::string(args[1]) == "compare") return Compare(args);
  if (args.size() > 1) {
    std::fprintf(stderr, "optd-loadgen: unexpected argument '%s' (see --help)\n", args[1]);
    return 2;
  }

  if (absl::GetFlag(FLAGS_print_model)) {
    absl::StatusOr<std::vector<optd::loadgen::TensorShape>> shapes =
        optd::loadgen::ModelShapes(absl::GetFlag(FLAGS_model));
    if (!shapes.ok()) {
      std::fprintf(stderr, "optd-loadgen: %s\n", shapes.status().ToString().c_str());
      return 2;
    }
    std::printf("%s\n", optd::loadgen::ModelJson(*shapes).c_str());
    return 0;
  }

  optd::loadgen::Options options;
  options.endpoints = absl::StrSplit(absl::GetFlag(FLAGS_server), ',', absl::SkipEmpty());
  options.sharded = absl::GetFlag(FLAGS_sharded);
  options.metrics = absl::StrSplit(absl::GetFlag(FLAGS_metrics), ',', absl::SkipEmpty());
  options.admin_token = absl::GetFlag(FLAGS_admin_token);
  options.channel.tls = absl::GetFlag(FLAGS_tls);
  options.channel.tls_ca = absl::GetFlag(FLAGS_tls_ca);
  options.channel.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  options.channel.tls_key = absl::GetFlag(FLAGS_tls_key);
  options.channel.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  options.model = absl::GetFlag(FLAGS_model);
  options.preset = absl::GetFlag(FLAGS_preset);
  absl::StatusOr<optd::DType> dtype = optd::ParseDType(absl::GetFlag(FLAGS_wire_dtype));
  const std::string result = absl::GetFlag(FLAGS_result);
  const std::string arrival = absl::GetFlag(FLAGS_arrival);
  absl::StatusOr<std::vector<int>> concurrencies =
      optd::loadgen::ParseSweep(absl::GetFlag(FLAGS_concurrency));
  std::string usage_error;
  if (!dtype.ok() || *dtype == optd::DType::kF64) {
    usage_error = "--wire_dtype is fp32, bf16 or fp16";
  } else if (absl::GetFlag(FLAGS_step_path) != "stream" &&
             absl::GetFlag(FLAGS_step_path) != "small" &&
             absl::GetFlag(FLAGS_step_path) != "shared" &&
             absl::GetFlag(FLAGS_step_path) != "auto") {
    usage_error = "--step_path is stream, small, shared or auto";
  } else if (absl::GetFlag(FLAGS_step_path) == "shared" && absl::GetFlag(FLAGS_sharded)) {
    usage_error = "--step_path=shared steps one daemon's sessions: not with --sharded";
  } else if (result != "parameters" && result != "delta" && result != "none") {
    usage_error = "--result is parameters, delta or none";
  } else if (arrival != "constant" && arrival != "poisson") {
    usage_error = "--arrival is constant or poisson";
  } else if (!concurrencies.ok()) {
    usage_error = std::string(concurrencies.status().message());
  } else if (absl::GetFlag(FLAGS_rate) > 0 && concurrencies->size() > 1) {
    usage_error = "--rate takes one --concurrency (the most in flight), not a sweep";
  } else if (!(absl::GetFlag(FLAGS_duration_s) > 0) || !(absl::GetFlag(FLAGS_window_s) > 0) ||
             !std::isfinite(absl::GetFlag(FLAGS_duration_s)) ||
             !std::isfinite(absl::GetFlag(FLAGS_window_s))) {
    usage_error = "--duration_s and --window_s must be finite and > 0";
  } else if (absl::GetFlag(FLAGS_stable_windows) < 1 ||
             absl::GetFlag(FLAGS_max_windows) < absl::GetFlag(FLAGS_stable_windows) ||
             absl::GetFlag(FLAGS_stable_windows) * absl::GetFlag(FLAGS_window_s) >
                 absl::GetFlag(FLAGS_duration_s)) {
    usage_error =
        "--stable_windows must be >= 1, at most --max_windows, and fit in --duration_s "
        "(stable_windows × window_s <= duration_s)";
  } else if (!(absl::GetFlag(FLAGS_stability) > 0) || !(absl::GetFlag(FLAGS_max_error_rate) >= 0) ||
             absl::GetFlag(FLAGS_max_error_rate) > 1) {
    usage_error = "--stability must be > 0 and --max_error_rate in [0, 1]";
  } else if (absl::GetFlag(FLAGS_world_size) < 1 || absl::GetFlag(FLAGS_warmup_steps) < 0 ||
             absl::GetFlag(FLAGS_steps) < 0 || absl::GetFlag(FLAGS_inject_bad_every) < 0) {
    usage_error = "--world_size must be >= 1; --warmup_steps, --steps, --inject_bad_every >= 0";
  } else if (!(absl::GetFlag(FLAGS_step_timeout_s) > 0)) {
    usage_error = "--step_timeout_s must be > 0";
  } else if (absl::GetFlag(FLAGS_rate) != 0 &&
             !(absl::GetFlag(FLAGS_rate) > 0 && absl::GetFlag(FLAGS_rate) <= 1e6)) {
    usage_error = "--rate must be in (0, 1e6] steps/s (0: closed loop)";
  } else if (absl::GetFlag(FLAGS_rate) == 0 && arrival == "poisson") {
    usage_error = "--arrival=poisson needs --rate (the open loop)";
  }
  if (!usage_error.empty()) {
    std::fprintf(stderr, "optd-loadgen: %s\n", usage_error.c_str());
    return 2;
  }
  options.wire_dtype = *dtype;
  const std::string step_path = absl::GetFlag(FLAGS_step_path);
  options.step_path = step_path == "small"    ? optd::client::StepPath::kSmall
                      : step_path == "shared" ? optd::client::StepPath::kShared
                      : step_path == "auto"   ? optd::client::StepPath::kAuto
                                              : optd::client::StepPath::kStream;
  options.result = result == "none"    ? optd::v1::STEP_RESULT_NONE
                   : result == "delta" ? optd::v1::STEP_RESULT_DELTA
                                       : optd::v1::STEP_RESULT_PARAMETERS;
  options.world_size = absl::GetFlag(FLAGS_world_size);
  options.rate = absl::GetFlag(FLAGS_rate);
  options.arrival = options.rate <= 0      ? optd::loadgen::Arrival::kClosed
                    : arrival == "poisson" ? optd::loadgen::Arrival::kPoisson
                                           : optd::loadgen::Arrival::kConstant;
  options.warmup_steps = absl::GetFlag(FLAGS_warmup_steps);
  options.max_steps = absl::GetFlag(FLAGS_steps);
  options.duration = absl::Seconds(absl::GetFlag(FLAGS_duration_s));
  options.window = absl::Seconds(absl::GetFlag(FLAGS_window_s));
  options.stable_windows = absl::GetFlag(FLAGS_stable_windows);
  options.stability = absl::GetFlag(FLAGS_stability);
  options.max_windows = absl::GetFlag(FLAGS_max_windows);
  options.max_error_rate = absl::GetFlag(FLAGS_max_error_rate);
  options.inject_bad_every = absl::GetFlag(FLAGS_inject_bad_every);
  options.step_timeout = absl::Seconds(absl::GetFlag(FLAGS_step_timeout_s));
  // SIGINT and SIGTERM end the run early and still delete its sessions.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  static std::atomic<bool> interrupted{false};
  std::thread([signals] {
    int signal = 0;
    sigwait(&signals, &signal);
    interrupted = true;
    // A second signal does not wait for the sessions to be deleted.
    sigwait(&signals, &signal);
    std::_Exit(130);
  }).detach();
  options.interrupt = &interrupted;
  options.progress = [](const std::string& line) {
    std::fprintf(stderr, "\r\033[K%s", line.c_str());
    std::fflush(stderr);
  };

  absl::StatusOr<optd::v1::LoadgenReport> report = optd::loadgen::Run(options, *concurrencies);
  std::fputc('\n', stderr);
  if (!report.ok()) {
    std::fprintf(stderr, "optd-loadgen: %s\n", report.status().ToString().c_str());
    return 1;
  }
  std::fputs(optd::loadgen::ToTable(*report).c_str(), stdout);
  if (!absl::GetFlag(FLAGS_json).empty()) {
    std::ofstream(absl::GetFlag(FLAGS_json)) << optd::loadgen::ToJson(*report);
  }
  if (!absl::GetFlag(FLAGS_csv).empty()) {
    std::ofstream(absl::GetFlag(FLAGS_csv)) << optd::loadgen::ToCsv(*report);
  }
  if (interrupted) {
    std::fprintf(stderr, "optd-loadgen: interrupted; its sessions are deleted\n");
    return 130;
  }
  if (!report->ok()) {
    std::fprintf(stderr, "optd-loadgen: a level was unstable or had too many errors\n");
    return 1;
  }
  return 0;
}
