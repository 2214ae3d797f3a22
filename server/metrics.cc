#include "server/metrics.h"

#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/types/optional.h"
#include "common/version.h"

namespace optd::server {
namespace {

using prometheus::Counter;
using prometheus::Family;
using prometheus::Gauge;
using prometheus::Histogram;

// 0.25 ms to 60 s: a small model's step on a GPU up to a large one's on a CPU, about three
// buckets per decade below 0.1 s so that a quantile interpolated inside one (histogram_quantile)
// is off by less than half of it — a sub-millisecond median is not read as 0.5 ms, nor a 6 ms
// p99 as 9. Built once: every step's observation passes them (used only when its series is new).
const Histogram::BucketBoundaries& StepBuckets() {
  static const Histogram::BucketBoundaries buckets = {
      0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025,
      0.05,    0.075,  0.1,     0.25,  0.5,    1,     2.5,   5,     10,     25,   60};
  return buckets;
}

Histogram::BucketBoundaries AnalysisBuckets() {
  return {0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600};
}

// optd_rejected_total's reasons: the service's own (queue_full, draining, nonfinite, wrong_step)
// and those a status code stands for (ReasonOf).
const std::vector<absl::string_view>& RejectionReasons() {
  static const std::vector<absl::string_view> reasons = {
      "queue_full",        "draining",       "nonfinite",        "wrong_step", "unauthenticated",
      "permission_denied", "not_found",      "invalid_argument", "over_quota", "straggler",
      "cancelled",         "stream_timeout", "saturated",        "other"};
  return reasons;
}

absl::string_view ReasonOf(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kUnauthenticated:
      return "unauthenticated";
    case absl::StatusCode::kPermissionDenied:
      return "permission_denied";
    case absl::StatusCode::kNotFound:
      return "not_found";
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return "invalid_argument";
    case absl::StatusCode::kResourceExhausted:
      return "over_quota";
    case absl::StatusCode::kAborted:
      return "straggler";
    case absl::StatusCode::kCancelled:
      return "cancelled";
    default:
      return "other";
  }
}

// gRPC's name for a code ("INVALID_ARGUMENT"); absl's StatusCodeToString gives the same words
// in another case.
std::string GrpcCodeName(absl::StatusCode code) {
  std::string name = absl::StatusCodeToString(code);
  for (char& c : name) c = c == ' ' ? '_' : static_cast<char>(std::toupper(c));
  return name;
}

constexpr char kRejectionReasonPayload[] = "type.optd.dev/rejection_reason";

}  // namespace

absl::Status WithRejectionReason(absl::Status status, absl::string_view reason) {
  status.SetPayload(kRejectionReasonPayload, absl::Cord(reason));
  return status;
}

struct Metrics::Figure {
  Family<Gauge>* family;
  prometheus::Labels labels;  // the figure's own label (stat or of), if any
  double (*value)(const v1::TensorAnalysis&);
};

struct Metrics::StateSeries {
  Gauge* memory = nullptr;
  Gauge* step = nullptr;
  Counter* nonfinite = nullptr;
};

struct Metrics::AnalysisSeries {
  Gauge* analysis_step = nullptr;
  // The figures' gauges by family and labels: a new analysis sets them in place, so a scrape
  // never sees a series missing between two analyses. (The auto modes' series are kept the same
  // way, in choices_series_.)
  GaugeMap analysis;
};

namespace {

// Sets `values` into `gauges` in place, removing the series no longer present.
void ReplaceGauges(
    std::map<std::pair<Family<Gauge>*, prometheus::Labels>, Gauge*>& gauges,
    const std::map<std::pair<Family<Gauge>*, prometheus::Labels>, double>& values = {}) {
  for (auto it = gauges.begin(); it != gauges.end();) {
    if (values.contains(it->first)) {
      ++it;
    } else {
      it->first.first->Remove(it->second);
      it = gauges.erase(it);
    }
  }
  for (const auto& [key, value] : values) {
    Gauge*& gauge = gauges[key];
    if (gauge == nullptr) gauge = &key.first->Add(key.second);
    gauge->Set(value);
  }
}

}  // namespace

Metrics::Metrics(MetricsOptions options)
    : options_(options),
      registry_(std::make_shared<prometheus::Registry>()),
      rpcs_(prometheus::BuildCounter()
                .Name("optd_rpc_total")
                .Help("RPCs finished, by method and gRPC status code.")
                .Register(*registry_)),
      step_duration_(prometheus::BuildHistogram()
                         .Name("optd_step_duration_seconds")
                         .Help("One Step call, from its header to the last result byte, by the "
                               "session's matrix optimizer presets.")
                         .Register(*registry_)),
      step_phase_(prometheus::BuildHistogram()
                      .Name("optd_step_phase_seconds")
                      .Help("A Step call's phases: receive (gradients read and decoded), "
                            "aggregate (waiting for the other workers and averaging), compute "
                            "(the optimizer step and the result), send (streaming the result "
                            "once the step has committed: with early results, what was left).")
                      .Register(*registry_)),
      bytes_received_(prometheus::BuildCounter()
                          .Name("optd_bytes_received_total")
                          .Help("Tensor payload bytes received (gradients and parameters).")
                          .Register(*registry_)
                          .Add({})),
      bytes_sent_(prometheus::BuildCounter()
                      .Name("optd_bytes_sent_total")
                      .Help("Tensor payload bytes sent (step results and parameters).")
                      .Register(*registry_)
                      .Add({})),
      sessions_(prometheus::BuildGauge()
                    .Name("optd_sessions")
                    .Help("Sessions held, loaded or unloaded after idling.")
                    .Register(*registry_)
                    .Add({})),
      backend_memory_(prometheus::BuildGauge()
                          .Name("optd_backend_memory_bytes")
                          .Help("Backend memory: held for sessions (kind=sessions), by the "
                                "analyzer's snapshots (kind=analysis), or for the sessions' "
                                "pipelined steps (kind=pipeline, of --pipeline_scratch_bytes).")
                          .Register(*registry_)),
      backend_info_(prometheus::BuildGauge()
                        .Name("optd_backend_info")
                        .Help("1 for the backend that serves (cpu or cuda) and its device; "
                              "--backend=auto takes the GPU when one is present.")
                        .Register(*registry_)),
      rejected_(prometheus::BuildCounter()
                    .Name("optd_rejected_total")
                    .Help("Failed RPCs by reason.")
                    .Register(*registry_)),
      nonfinite_(prometheus::BuildCounter()
                     .Name("optd_nonfinite_gradients_total")
                     .Help("NaN, infinite or out-of-range gradient values received.")
                     .Register(*registry_)),
      checkpoint_failures_(prometheus::BuildCounter()
                               .Name("optd_checkpoint_failures_total")
                               .Help("Checkpoints that could not be written (periodic, explicit, "
                                     "at unload or shutdown); the last good one stays on disk.")
                               .Register(*registry_)
                               .Add({})),
      step_tensors_(prometheus::BuildCounter()
                        .Name("optd_step_tensors_total")
                        .Help("Tensors steps updated, by when: path=ahead while the step's "
                              "gradients still arrived (per-tensor pipelining, "
                              "--pipeline_scratch_bytes), path=at_commit once the last had.")
                        .Register(*registry_)),
      step_tensors_ahead_(step_tensors_.Add({{"path", "ahead"}})),
      step_tensors_at_commit_(step_tensors_.Add({{"path", "at_commit"}})),
      session_memory_(prometheus::BuildGauge()
                          .Name("optd_session_memory_bytes")
                          .Help("Bytes a session holds (charged against "
                                "optd_session_memory_limit_bytes).")
                          .Register(*registry_)),
      session_step_(prometheus::BuildGauge()
                        .Name("optd_session_step")
                        .Help("Steps a session has completed.")
                        .Register(*registry_)),
      analysis_step_(prometheus::BuildGauge()
                         .Name("optd_analysis_step")
                         .Help("The step the session's latest optimizer figures belong to.")
                         .Register(*registry_)),
      analysis_duration_(prometheus::BuildHistogram()
                             .Name("optd_analysis_duration_seconds")
                             .Help("One analysis of a session's matrix tensors.")
                             .Register(*registry_)
                             .Add({}, AnalysisBuckets())),
      analysis_skipped_(prometheus::BuildCounter()
                            .Name("optd_analysis_skipped_total")
                            .Help("Analyses not taken, by reason: busy (the analyzer was still "
                                  "on the session's previous one, or its snapshot memory was "
                                  "full), too_large (the snapshot alone exceeds "
                                  "--analysis_max_bytes), failed (a tensor with no direction, "
                                  "such as a zero momentum).")
                            .Register(*registry_)),
      newton_schulz_steps_(
          prometheus::BuildGauge()
              .Name("optd_newton_schulz_steps")
              .Help("ns.steps=auto (seed 003): the Newton-Schulz steps the tensor's matrices run "
                    "now, the mean over those that run Newton-Schulz (0 where all "
                    "row-normalize); without `tensor`, the mean over the session's tensors.")
              .Register(*registry_)),
      direction_(prometheus::BuildGauge()
                     .Name("optd_direction")
                     .Help("direction=auto (seed 000): the share of the tensor's matrices that "
                           "row-normalize (RMNP) instead of running Newton-Schulz: 0 all "
                           "Newton-Schulz, 1 all row normalization.")
                     .Register(*registry_)) {
  prometheus::BuildGauge()
      .Name("optd_build_info")
      .Help("1, labelled with the running optd's version.")
      .Register(*registry_)
      .Add({{"version", kOptdVersion}})
      .Set(1);
  prometheus::BuildGauge()
      .Name("optd_session_memory_limit_bytes")
      .Help("Most bytes one session may hold (--max_session_bytes).")
      .Register(*registry_)
      .Add({})
      .Set(static_cast<double>(options_.session_memory_limit_bytes));
  for (const char* phase : {"receive", "aggregate", "compute", "send"}) {
    phases_.push_back(&step_phase_.Add({{"phase", phase}}, StepBuckets()));
  }
  // Every known label value starts at 0, so rate() and the alerts see the first event.
  for (absl::string_view reason : RejectionReasons())
    rejected_.Add({{"reason", std::string(reason)}});
  for (const char* reason : {"busy", "too_large", "failed"}) {
    analysis_skipped_.Add({{"reason", reason}});
  }
  for (const char* kind : {"sessions", "analysis"}) backend_memory_.Add({{"kind", kind}});
  auto gauge = [this](const char* name, const char* help) {
    return &prometheus::BuildGauge().Name(name).Help(help).Register(*registry_);
  };
  // DESIGN.md's table, figure by figure.
  Family<Gauge>* dominance =
      gauge("optd_dominance_ratio",
            "Seed 000: r_i = (VV^T)_ii / mean_{j!=i} |(VV^T)_ij| over the rows of the momentum V; "
            "min, avg and max over rows. Below 1, rows interact more than they dominate.");
  Family<Gauge>* cosine = gauge("optd_rmnp_muon_cosine",
                                "Cosine between the RMNP direction (rows of V normalized) and "
                                "the exact polar factor of V (Muon's ideal direction).");
  Family<Gauge>* stable_rank = gauge("optd_stable_rank", "||X||_F^2 / sigma_max^2.");
  Family<Gauge>* condition =
      gauge("optd_condition_number", "sigma_max / sigma_min of the momentum.");
  Family<Gauge>* entropy =
      gauge("optd_singular_value_entropy", "Entropy of sigma / sum(sigma) (natural log).");
  Family<Gauge>* ns_error =
      gauge("optd_newton_schulz_polar_error",
            "||NS(V) - polar(V)||_F / ||polar(V)||_F for the session's Newton-Schulz setting.");
  Family<Gauge>* ns_small = gauge("optd_newton_schulz_small_sv_fraction",
                                  "Seed 003: share of singular values of NS(V) below 0.6.");
  Family<Gauge>* neuron_cv =
      gauge("optd_neuron_norm_cv", "Seed 002: coefficient of variation of the update's row norms.");
  Family<Gauge>* update_rms = gauge("optd_update_rms",
                                    "RMS of the applied update (the direction after its scale, "
                                    "before the learning rate).");
  Family<Gauge>* grad_norm = gauge("optd_grad_norm", "Frobenius norm of the mean gradient.");
  using A = v1::TensorAnalysis;
  figures_ = {
      {dominance, {{"stat", "min"}}, [](const A& a) { return a.dominance_ratio_min(); }},
      {dominance, {{"stat", "avg"}}, [](const A& a) { return a.dominance_ratio_avg(); }},
      {dominance, {{"stat", "max"}}, [](const A& a) { return a.dominance_ratio_max(); }},
      {cosine, {}, [](const A& a) { return a.rmnp_muon_cosine(); }},
      {stable_rank, {{"of", "momentum"}}, [](const A& a) { return a.stable_rank_momentum(); }},
      {stable_rank, {{"of", "update"}}, [](const A& a) { return a.stable_rank_update(); }},
      {condition, {{"of", "momentum"}}, [](const A& a) { return a.condition_number_momentum(); }},
      {entropy,
       {{"of", "momentum"}},
       [](const A& a) { return a.singular_value_entropy_momentum(); }},
      {entropy, {{"of", "update"}}, [](const A& a) { return a.singular_value_entropy_update(); }},
      {ns_error, {}, [](const A& a) { return a.ns_polar_error(); }},
      {ns_small, {}, [](const A& a) { return a.ns_small_sv_fraction(); }},
      {neuron_cv, {{"of", "update"}}, [](const A& a) { return a.neuron_norm_cv_update(); }},
      {update_rms, {}, [](const A& a) { return a.update_rms(); }},
      {grad_norm, {}, [](const A& a) { return a.grad_norm(); }},
  };
}

Metrics::~Metrics() = default;

void Metrics::CountRpc(absl::string_view method, const absl::Status& status,
                       absl::string_view reason) {
  rpcs_.Add({{"method", std::string(method)}, {"code", GrpcCodeName(status.code())}}).Increment();
  if (!status.ok()) {
    std::string why(reason);
    if (why.empty()) {
      const absl::optional<absl::Cord> tagged = status.GetPayload(kRejectionReasonPayload);
      why = tagged.has_value() ? std::string(*tagged) : std::string(ReasonOf(status.code()));
    }
    rejected_.Add({{"reason", why}}).Increment();
  }
}

void Metrics::ObserveStep(absl::string_view optimizer, absl::Duration duration) {
  step_duration_.Add({{"optimizer", std::string(optimizer)}}, StepBuckets())
      .Observe(absl::ToDoubleSeconds(duration));
}

void Metrics::ObservePhase(StepPhase phase, absl::Duration duration) {
  phases_[static_cast<int>(phase)]->Observe(absl::ToDoubleSeconds(duration));
}

void Metrics::AddBytesReceived(int64_t bytes) {
  bytes_received_.Increment(static_cast<double>(bytes));
}
void Metrics::AddBytesSent(int64_t bytes) { bytes_sent_.Increment(static_cast<double>(bytes)); }
void Metrics::SetSessions(int64_t sessions) { sessions_.Set(static_cast<double>(sessions)); }

void Metrics::SetBackendInfo(absl::string_view backend, absl::string_view device) {
  backend_info_.Add({{"backend", std::string(backend)}, {"device", std::string(device)}}).Set(1);
}

void Metrics::SetBackendMemory(absl::string_view kind, int64_t bytes) {
  backend_memory_.Add({{"kind", std::string(kind)}}).Set(static_cast<double>(bytes));
}

void Metrics::SetSessionState(const std::string& session, int64_t step, int64_t memory_bytes) {
  absl::MutexLock lock(&state_mu_);
  StateSeries& series = state_series_[session];
  if (series.step == nullptr) {
    series.step = &session_step_.Add({{"session", session}});
    series.memory = &session_memory_.Add({{"session", session}});
  }
  if (series.nonfinite == nullptr) series.nonfinite = &nonfinite_.Add({{"session", session}});
  series.step->Set(static_cast<double>(step));
  series.memory->Set(static_cast<double>(memory_bytes));
}

void Metrics::CountNonFinite(const std::string& session, int64_t values) {
  absl::MutexLock lock(&state_mu_);
  StateSeries& series = state_series_[session];
  if (series.nonfinite == nullptr) series.nonfinite = &nonfinite_.Add({{"session", session}});
  series.nonfinite->Increment(static_cast<double>(values));
}

void Metrics::CountCheckpointFailure() { checkpoint_failures_.Increment(); }

void Metrics::CountStepTensors(int64_t ahead, int64_t at_commit) {
  step_tensors_ahead_.Increment(static_cast<double>(ahead));
  step_tensors_at_commit_.Increment(static_cast<double>(at_commit));
}

void Metrics::RemoveAnalysisLocked(AnalysisSeries& series) {
  for (auto& [key, gauge] : series.analysis) key.first->Remove(gauge);
  series.analysis.clear();
  if (series.analysis_step != nullptr) analysis_step_.Remove(series.analysis_step);
  series.analysis_step = nullptr;
}

void Metrics::PublishAnalysis(const std::string& session, int64_t step,
                              const std::vector<v1::TensorAnalysis>& tensors) {
  if (tensors.empty()) {
    absl::MutexLock lock(&analysis_mu_);
    RemoveAnalysisLocked(analysis_series_[session]);
    return;
  }
  // The values of this analysis by series (no lock needed: figures_ is fixed), then set in
  // place; series no longer present go.
  std::map<std::pair<Family<Gauge>*, prometheus::Labels>, double> values;
  const size_t budget = static_cast<size_t>(std::max(options_.tensor_label_budget, 0));
  for (const Figure& figure : figures_) {
    double sum = 0;
    for (size_t t = 0; t < tensors.size(); ++t) {
      const double value = figure.value(tensors[t]);
      sum += value;
      if (t >= budget) continue;
      prometheus::Labels labels = figure.labels;
      labels["session"] = session;
      labels["tensor"] = tensors[t].tensor();
      values[{figure.family, std::move(labels)}] = value;
    }
    prometheus::Labels labels = figure.labels;
    labels["session"] = session;
    values[{figure.family, std::move(labels)}] = sum / static_cast<double>(tensors.size());
  }
  absl::MutexLock lock(&analysis_mu_);
  AnalysisSeries& series = analysis_series_[session];
  ReplaceGauges(series.analysis, values);
  if (series.analysis_step == nullptr) {
    series.analysis_step = &analysis_step_.Add({{"session", session}});
  }
  series.analysis_step->Set(static_cast<double>(step));
}

void Metrics::PublishChoices(const std::string& session,
                             const std::vector<v1::TensorChoices>& choices) {
  std::map<std::pair<Family<Gauge>*, prometheus::Labels>, double> values;
  const size_t budget = static_cast<size_t>(std::max(options_.tensor_label_budget, 0));
  double steps_sum = 0, direction_sum = 0;
  for (size_t t = 0; t < choices.size(); ++t) {
    const v1::AutoChoices& c = choices[t].choices();
    // Steps: the mean over the matrices that run Newton–Schulz (0 where none does).
    double steps = 0, row_normalized = 0, newton_schulz = 0;
    for (int i = 0; i < c.newton_schulz_steps_size() && i < c.row_normalize_size(); ++i) {
      if (c.row_normalize(i)) {
        ++row_normalized;
      } else {
        steps += c.newton_schulz_steps(i);
        ++newton_schulz;
      }
    }
    const double n = std::max(1, c.newton_schulz_steps_size());
    const double mean_steps = newton_schulz > 0 ? steps / newton_schulz : 0.0;
    steps_sum += mean_steps;
    direction_sum += row_normalized / n;
    if (t >= budget) continue;
    values[{&newton_schulz_steps_, {{"session", session}, {"tensor", choices[t].tensor()}}}] =
        mean_steps;
    values[{&direction_, {{"session", session}, {"tensor", choices[t].tensor()}}}] =
        row_normalized / n;
  }
  if (!choices.empty()) {
    const double n = static_cast<double>(choices.size());
    values[{&newton_schulz_steps_, {{"session", session}}}] = steps_sum / n;
    values[{&direction_, {{"session", session}}}] = direction_sum / n;
  }
  absl::MutexLock lock(&choices_mu_);
  ReplaceGauges(choices_series_[session], values);
}

void Metrics::ObserveAnalysis(absl::Duration duration) {
  analysis_duration_.Observe(absl::ToDoubleSeconds(duration));
}

void Metrics::CountAnalysisSkipped(absl::string_view reason) {
  analysis_skipped_.Add({{"reason", std::string(reason)}}).Increment();
}

void Metrics::RemoveSession(const std::string& session) {
  {
    absl::MutexLock lock(&state_mu_);
    auto it = state_series_.find(session);
    if (it != state_series_.end()) {
      StateSeries& series = it->second;
      if (series.step != nullptr) session_step_.Remove(series.step);
      if (series.memory != nullptr) session_memory_.Remove(series.memory);
      if (series.nonfinite != nullptr) nonfinite_.Remove(series.nonfinite);
      state_series_.erase(it);
    }
  }
  {
    absl::MutexLock lock(&analysis_mu_);
    auto it = analysis_series_.find(session);
    if (it != analysis_series_.end()) {
      RemoveAnalysisLocked(it->second);
      analysis_series_.erase(it);
    }
  }
  absl::MutexLock lock(&choices_mu_);
  auto it = choices_series_.find(session);
  if (it != choices_series_.end()) {
    ReplaceGauges(it->second);
    choices_series_.erase(it);
  }
}

}  // namespace optd::server
