// optd's Prometheus metrics (../shared/DESIGN.md, "Metrics": the names are a contract). One
// registry; every family is created once, at construction; the hot path only increments,
// observes or sets. Per-session series (the optimizer figures, memory, step, non-finite
// gradients) are removed when the session is deleted or unloaded.
//
// Optimizer figures carry labels `session` and `tensor`; the session aggregate (the mean over the
// session's analyzed matrix tensors, as seed 000 averages per-layer figures) is the same metric
// without the `tensor` label, so `{tensor=""}` selects it. Only the first `tensor_label_budget`
// tensors of a session (in session order) get series of their own; the others count in the
// aggregate only, so a session exports at most (budget + 1) series per figure whatever its size.
//
// Thread-safe.
#ifndef OPTD_SERVER_METRICS_H_
#define OPTD_SERVER_METRICS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "optd/v1/optd.pb.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace optd::server {

struct MetricsOptions {
  // Tensors per session with series of their own.
  int tensor_label_budget = 32;
  // The per-session quota (--max_session_bytes), exported for the memory alert.
  int64_t session_memory_limit_bytes = 0;
};

enum class StepPhase { kReceive, kAggregate, kCompute, kSend };

// `status` tagged with its optd_rejected_total reason, where the code alone would say less (a
// wrong step number is one FAILED_PRECONDITION among several); Metrics::CountRpc reads it.
absl::Status WithRejectionReason(absl::Status status, absl::string_view reason);

class Metrics {
 public:
  explicit Metrics(MetricsOptions options);
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  const std::shared_ptr<prometheus::Registry>& registry() const { return registry_; }

  // One finished RPC. A non-OK status also counts in optd_rejected_total under `reason`, else
  // under the reason it was tagged with (WithRejectionReason), else the one its code stands for.
  void CountRpc(absl::string_view method, const absl::Status& status,
                absl::string_view reason = {});
  void ObserveStep(absl::string_view optimizer, absl::Duration duration);
  void ObservePhase(StepPhase phase, absl::Duration duration);
  void AddBytesReceived(int64_t bytes);
  void AddBytesSent(int64_t bytes);
  void SetSessions(int64_t sessions);
  // optd_backend_info{backend, device} = 1: which backend serves, on what.
  void SetBackendInfo(absl::string_view backend, absl::string_view device);
  // kind: "sessions" (bytes held for loaded sessions) or "analysis" (the analyzer's snapshots).
  void SetBackendMemory(absl::string_view kind, int64_t bytes);

  void SetSessionState(const std::string& session, int64_t step, int64_t memory_bytes);
  void CountNonFinite(const std::string& session, int64_t values);
  // A checkpoint that could not be written (periodic, explicit, at unload or shutdown).
  void CountCheckpointFailure();
  // Tensors a step updated: `ahead` stepped while the step's gradients still arrived (per-tensor
  // pipelining), `at_commit` once the last had.
  void CountStepTensors(int64_t ahead, int64_t at_commit);
  // Replaces the session's figures with `tensors` (the latest analysis of each analyzed tensor,
  // in session order) and their mean.
  void PublishAnalysis(const std::string& session, int64_t step,
                       const std::vector<v1::TensorAnalysis>& tensors);
  // Replaces the session's auto-mode series with `choices` (every tensor with an auto mode, in
  // session order): optd_newton_schulz_steps, the mean step count over a tensor's matrices that
  // run Newton–Schulz (0 where all row-normalize), and
  // optd_direction, the share of them that row-normalize (0: Newton–Schulz, 1: RMNP's row
  // normalization); and the same without `tensor`, the mean over the session's tensors.
  void PublishChoices(const std::string& session, const std::vector<v1::TensorChoices>& choices);
  void ObserveAnalysis(absl::Duration duration);
  void CountAnalysisSkipped(absl::string_view reason);
  // Drops every series labelled with `session`.
  void RemoveSession(const std::string& session);

 private:
  struct Figure;
  struct StateSeries;
  struct AnalysisSeries;
  using GaugeMap = std::map<std::pair<prometheus::Family<prometheus::Gauge>*, prometheus::Labels>,
                            prometheus::Gauge*>;
  void RemoveAnalysisLocked(AnalysisSeries& series) ABSL_EXCLUSIVE_LOCKS_REQUIRED(analysis_mu_);

  const MetricsOptions options_;
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& rpcs_;
  prometheus::Family<prometheus::Histogram>& step_duration_;
  prometheus::Family<prometheus::Histogram>& step_phase_;
  prometheus::Counter& bytes_received_;
  prometheus::Counter& bytes_sent_;
  prometheus::Gauge& sessions_;
  prometheus::Family<prometheus::Gauge>& backend_memory_;
  prometheus::Family<prometheus::Gauge>& backend_info_;
  prometheus::Family<prometheus::Counter>& rejected_;
  prometheus::Family<prometheus::Counter>& nonfinite_;
  prometheus::Counter& checkpoint_failures_;
  prometheus::Family<prometheus::Counter>& step_tensors_;
  prometheus::Counter& step_tensors_ahead_;
  prometheus::Counter& step_tensors_at_commit_;
  prometheus::Family<prometheus::Gauge>& session_memory_;
  prometheus::Family<prometheus::Gauge>& session_step_;
  prometheus::Family<prometheus::Gauge>& analysis_step_;
  prometheus::Histogram& analysis_duration_;
  prometheus::Family<prometheus::Counter>& analysis_skipped_;
  prometheus::Family<prometheus::Gauge>& newton_schulz_steps_;
  prometheus::Family<prometheus::Gauge>& direction_;
  std::vector<Figure> figures_;
  std::vector<prometheus::Histogram*> phases_;

  // Each session's series, in three parts under locks of their own: the step path sets its state
  // (and an auto-mode session its choices) on every step, while the analyzer thread, which runs
  // only on idle cores, publishes figures. A step never waits for a publication it preempted.
  absl::Mutex state_mu_;
  std::map<std::string, StateSeries> state_series_ ABSL_GUARDED_BY(state_mu_);
  absl::Mutex analysis_mu_;
  std::map<std::string, AnalysisSeries> analysis_series_ ABSL_GUARDED_BY(analysis_mu_);
  absl::Mutex choices_mu_;
  std::map<std::string, GaugeMap> choices_series_ ABSL_GUARDED_BY(choices_mu_);
};

}  // namespace optd::server

#endif  // OPTD_SERVER_METRICS_H_
