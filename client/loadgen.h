// optd-loadgen as a library: simulated training workers stepping sessions of their own on one or
// more optd endpoints, measured the way perf_analyzer measures Triton — fixed windows, a level
// counts once its last windows agree — with latency taken from each step's intended start in the
// open loop, so a slow server cannot hide its queueing (no coordinated omission).
#ifndef OPTD_CLIENT_LOADGEN_H_
#define OPTD_CLIENT_LOADGEN_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/loadgen_report.h"
#include "client/models.h"
#include "optd/v1/loadgen.pb.h"

namespace optd::loadgen {

// Bounds on a sweep: sessions per level, and levels.
inline constexpr int kMaxConcurrency = 4096;
inline constexpr int kMaxLevels = 64;

// "4" → {4}; "1:16:x2" → {1, 2, 4, 8, 16}; "2:8:+3" → {2, 5, 8}. InvalidArgument past the
// bounds above.
absl::StatusOr<std::vector<int>> ParseSweep(const std::string& spec);

// True when the last `count` windows' rates lie within `tolerance` of their mean.
bool WindowsAgree(const std::vector<double>& rates, int count, double tolerance);

// The q-quantile (0..1) of `sorted` by nearest rank; 0 when empty.
double Quantile(const std::vector<double>& sorted, double q);

enum class Arrival { kClosed, kConstant, kPoisson };

struct Options {
  std::vector<std::string> endpoints = {"127.0.0.1:50051"};
  // /metrics addresses (host:port), one per endpoint or none: the server phases come from them.
  std::vector<std::string> metrics;
  client::ChannelOptions channel;  // TLS settings; `target` is set per endpoint
  std::string admin_token;
  std::string model = "gpt2-small";
  std::string preset = "keller";  // the matrix group's preset; vectors take adamw
  DType wire_dtype = DType::kF32;
  client::StepPath step_path = client::StepPath::kAuto;  // by size, or forced to one RPC
  v1::StepResult result = v1::STEP_RESULT_PARAMETERS;
  int world_size = 1;  // workers per session; each step waits for all of them
  // Each session spans every endpoint (client/sharded.h: placed at epoch 1, every owner stepped at
  // once, results put back together) instead of living on one of them.
  bool sharded = false;
  Arrival arrival = Arrival::kClosed;
  int concurrency = 1;                          // sessions; the open loop's most steps in flight
  double rate = 0;                              // open loop: steps per second
  uint64_t seed = 1;                            // Poisson arrivals
  int warmup_steps = 2;                         // per session, before measuring
  int64_t max_steps = 0;                        // measured worker steps per level; 0: no bound
  absl::Duration duration = absl::Seconds(30);  // per level, the hard bound
  absl::Duration window = absl::Seconds(2);
  int stable_windows = 3;
  double stability = 0.1;
  int max_windows = 10;
  double max_error_rate = 0.0;  // errors / (steps + errors) above it make a level error-ridden
  // Every N-th step of each worker first sends a step with a wrong number (FAILED_PRECONDITION),
  // to see errors counted; 0: none.
  int inject_bad_every = 0;
  // Deadline of each Step call (DEADLINE_EXCEEDED counts as an error) and of every other call.
  absl::Duration step_timeout = absl::Seconds(60);
  absl::Duration call_timeout = absl::Seconds(30);
  // Called with a one-line status after every window.
  std::function<void(const std::string&)> progress;
  // Set (from another thread, e.g. on SIGINT) to end the run early: the level in progress stops
  // measuring at its next check, its sessions are deleted, and no further level starts.
  const std::atomic<bool>* interrupt = nullptr;
};

// One level under `options`: creates `concurrency` sessions (each with a token; spread over the
// endpoints, or each over all of them when sharded), warms them up, measures, deletes them. Errors
// of the setup (an endpoint down, a rejected session) are returned; errors of steps are counted in
// the level.
absl::StatusOr<v1::LoadgenLevel> RunLevel(const Options& options);

// Levels for every concurrency (closed loop) or the one rate (open loop), and the report.
absl::StatusOr<v1::LoadgenReport> Run(const Options& options,
                                      const std::vector<int>& concurrencies);

}  // namespace optd::loadgen

#endif  // OPTD_CLIENT_LOADGEN_H_
