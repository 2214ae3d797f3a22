#include "server/session.h"

#include <algorithm>
#include <new>
#include <set>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "kernels/host_math.h"
#include "kernels/initializers.h"
#include "server/log.h"
#include "server/session_config.h"

namespace optd::server {

namespace {

std::shared_ptr<const TensorIndex> IndexOf(const v1::SessionConfig& config) {
  std::vector<std::string> names;
  for (const v1::TensorConfig& t : config.tensors()) names.push_back(t.name());
  return std::make_shared<const TensorIndex>(std::move(names));
}

// A step header's lr override, if it has one.
std::optional<double> LrOverride(const v1::StepHeader& header) {
  return header.has_lr() ? std::optional<double>(header.lr()) : std::nullopt;
}

std::vector<int64_t> TensorCounts(const v1::SessionConfig& config) {
  std::vector<int64_t> counts;
  for (const v1::TensorConfig& t : config.tensors()) counts.push_back(*ElementCount(t.shape()));
  return counts;
}

}  // namespace

Session::Session(Backend& backend, std::string id, v1::SessionConfig config,
                 std::string token_digest, SessionOptions options)
    : backend_(backend),
      id_(std::move(id)),
      config_(std::move(config)),
      token_digest_(std::move(token_digest)),
      options_(std::move(options)),
      index_(IndexOf(config_)),
      counts_(TensorCounts(config_)),
      // Bounded so that no client can make a session hold more staging than its quota counted.
      staging_(id_, index_, counts_, config_.world_size() + 1),
      pipeline_(mu_, StepPipeline::Options{config_.world_size(), config_.tensors_size()}),
      round_(mu_, StepRound::Options{id_, config_.world_size(), straggler_timeout(), &clock(),
                                     &staging_, [this](const TensorStaging* staging) {
                                       mu_.AssertHeld();
                                       pipeline_.Forget(staging);
                                     }}) {
  for (const v1::TensorConfig& t : config_.tensors()) {
    dtypes_.push_back(*FromWireDType(t.dtype()));
    int group = 0;
    while (config_.groups(group).name() != t.group()) ++group;
    group_of_.push_back(group);
  }
  shadowed_.assign(counts_.size(), 0);
  Touch();
}

Session::~Session() {
  absl::MutexLock lock(&mu_);
  if (options_.pipeliner != nullptr && shadow_bytes_ > 0) {
    options_.pipeliner->Release(shadow_bytes_);
    ExportPipelineScratch();
  }
}

std::string Session::CheckpointPath(const std::string& state_dir, const std::string& id) {
  return SessionCheckpointPath(state_dir, id);
}

absl::StatusOr<int64_t> Session::RequiredBytes(const v1::SessionConfig& config) {
  return SessionRequiredBytes(config);
}

namespace {

// The parameters of tensors `first`.. of `config` as their `init` says (zeros without one).
absl::Status InitializeParameters(const v1::SessionConfig& config, int first,
                                  Optimizer& optimizer) {
  for (int t = first; t < config.tensors_size(); ++t) {
    const v1::TensorConfig& tensor = config.tensors(t);
    if (!tensor.has_normal()) continue;
    std::vector<float> values(static_cast<size_t>(optimizer.num_elements(t)));
    FillNormal(tensor.normal().seed(), tensor.normal().mean(), tensor.normal().std(),
               absl::MakeSpan(values));
    OPTD_RETURN_IF_ERROR(optimizer.SetParameters(t, values));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Session>> Session::Create(Backend& backend, std::string id,
                                                         v1::SessionConfig config,
                                                         std::string token_digest,
                                                         SessionOptions options) {
  OPTD_ASSIGN_OR_RETURN(std::vector<TensorSpec> specs, TensorSpecs(config));
  SessionState state;
  OPTD_ASSIGN_OR_RETURN(state.optimizer, Optimizer::Create(backend, std::move(specs)));
  OPTD_RETURN_IF_ERROR(InitializeParameters(config, 0, *state.optimizer));
  std::unique_ptr<Session> session(new Session(backend, std::move(id), std::move(config),
                                               std::move(token_digest), std::move(options)));
  OPTD_RETURN_IF_ERROR(session->Initialize(std::move(state), /*checkpointed=*/false));
  return session;
}

absl::Status Session::Initialize(SessionState state, bool checkpointed) {
  OPTD_ASSIGN_OR_RETURN(state_bytes_, RequiredBytes(config_));
  std::set<std::string> presets;
  for (int t = 0; t < num_tensors(); ++t) {
    if (state.optimizer->spec(t).config.algorithm == Algorithm::kMatrix) {
      presets.insert(config_.groups(group_of_[t]).preset());
    }
  }
  optimizer_label_ = presets.empty() ? "adamw" : absl::StrJoin(presets, "+");
  absl::MutexLock lock(&mu_);
  optimizer_ = std::move(state.optimizer);
  for (const auto& [name, h] : state.hyperparams) hyperparams_[name] = h;
  AddDefaultHyperparams(config_, *optimizer_, hyperparams_);
  step_ = state.step;
  step_published_ = state.step;
  if (checkpointed) {
    checkpoint_step_ = state.step;
    checkpoint_step_published_ = state.step;
  }
  ExportStateLocked();
  return absl::OkStatus();
}

absl::StatusOr<v1::SessionCheckpoint> Session::ReadCheckpointMeta(FileSystem& fs,
                                                                  const std::string& path) {
  OPTD_ASSIGN_OR_RETURN(OpenedCheckpoint opened, OpenSessionCheckpoint(fs, path));
  return std::move(opened.meta);
}

absl::StatusOr<std::unique_ptr<Session>> Session::Load(Backend& backend, const std::string& path,
                                                       SessionOptions options) {
  if (options.fs == nullptr) return absl::InvalidArgumentError("Session::Load needs a FileSystem");
  OPTD_ASSIGN_OR_RETURN(v1::SessionCheckpoint meta, ReadCheckpointMeta(*options.fs, path));
  v1::SessionConfig config = meta.config();
  absl::Status valid = NormalizeSessionConfig(config);
  if (!valid.ok()) {
    return absl::DataLossError(
        absl::StrCat(path, ": the config does not validate: ", valid.message()));
  }
  std::unique_ptr<Session> session(new Session(backend, meta.session_id(), std::move(config),
                                               meta.token_sha256(), std::move(options)));
  OPTD_ASSIGN_OR_RETURN(SessionState state,
                        LoadSessionCheckpoint(backend, *session->options_.fs, path, session->id_,
                                              session->config_, session->token_digest_));
  OPTD_RETURN_IF_ERROR(session->Initialize(std::move(state), /*checkpointed=*/true));
  return session;
}

absl::StatusOr<std::unique_ptr<Session>> Session::Restored(
    Backend& backend, std::string id, v1::SessionConfig config, std::string token_digest,
    SessionOptions options, const std::vector<CheckpointSourcePath>& sources) {
  if (options.fs == nullptr) {
    return absl::InvalidArgumentError("Session::Restored needs a FileSystem");
  }
  OPTD_ASSIGN_OR_RETURN(SessionState state,
                        ReadReshardedState(backend, *options.fs, config, sources));
  std::unique_ptr<Session> session(new Session(backend, std::move(id), std::move(config),
                                               std::move(token_digest), std::move(options)));
  OPTD_RETURN_IF_ERROR(session->Initialize(std::move(state), /*checkpointed=*/false));
  return session;
}

absl::StatusOr<int> Session::FindTensor(absl::string_view name) const {
  const int t = index_->Find(name);
  if (t < 0) {
    return absl::NotFoundError(absl::StrCat("session '", id_, "' has no tensor '", name, "'"));
  }
  return t;
}

void Session::Touch() { last_used_ns_ = absl::ToUnixNanos(clock().Now()); }

absl::StatusOr<std::unique_ptr<TensorStaging>> Session::AcquireStaging() {
  return staging_.Acquire();
}

void Session::ReleaseStaging(std::unique_ptr<TensorStaging> staging) {
  // Only its own stream registers a staging, so one that is not registered now never will be.
  if (staging != nullptr && pipeline_.Registered(staging.get())) {
    absl::MutexLock lock(&mu_);
    pipeline_.Forget(staging.get());
  }
  staging_.Release(std::move(staging));
}

void Session::ReleaseStagingLocked(std::unique_ptr<TensorStaging> staging) {
  if (staging != nullptr) pipeline_.Forget(staging.get());
  staging_.Release(std::move(staging));
}

bool Session::AnalysisStep(int64_t step) const {
  const int64_t interval = config_.analysis_interval();
  return options_.analyzer != nullptr && interval > 0 && step % interval == 0;
}

void Session::ExportPipelineScratch() {
  if (options_.metrics != nullptr) {
    options_.metrics->SetBackendMemory("pipeline", options_.pipeliner->reserved_bytes());
  }
}

bool Session::ReserveShadowsLocked() {
  bool any = false;
  for (int t = 0; t < num_tensors(); ++t) {
    // A tensor of a batched direction steps with its batch at the commit (SteppedInABatch).
    if (!shadowed_[t] && !optimizer_->SteppedInABatch(t)) {
      const int64_t bytes = optimizer_->ShadowBytes(t);
      if (options_.pipeliner->Reserve(bytes)) {
        shadowed_[t] = 1;
        shadow_bytes_ += bytes;
        ExportPipelineScratch();
      }
    }
    any |= shadowed_[t] != 0;
  }
  return any;
}

bool Session::BeginPipelined(const v1::StepHeader& header, TensorStaging* staging) {
  if (options_.pipeliner == nullptr) return false;
  absl::MutexLock lock(&mu_);
  // Analysis steps run serially: the snapshot reads the step's gradients and captures its update.
  if (!CheckUsableLocked().ok() || header.step() != step_ + 1 || AnalysisStep(header.step())) {
    return false;
  }
  if (!ReserveShadowsLocked()) return false;
  const std::optional<double> lr = LrOverride(header);
  bool start_over = false;
  const bool registered =
      pipeline_.Register(header.step(), header.worker_id(), staging, lr, state_epoch_, start_over);
  if (start_over) optimizer_->DiscardPrepared();
  return registered;
}

void Session::TensorArrived(TensorStaging* staging, int tensor) {
  // Read on the stream's own thread, the staging's only writer.
  if (!pipeline_.Arrived(staging, tensor, staging->out_of_range_values() == 0)) return;
  options_.pipeliner->Schedule([weak = weak_from_this()] {
    if (std::shared_ptr<Session> session = weak.lock()) session->RunPipeline();
  });
}

int Session::PreparedTensors() {
  absl::MutexLock lock(&mu_);
  int prepared = 0;
  for (int t = 0; t < num_tensors(); ++t) prepared += optimizer_->prepared(t) ? 1 : 0;
  return prepared;
}

void Session::RunPipeline() {
  while (true) {
    absl::MutexLock lock(&mu_);
    const std::optional<int> tensor = pipeline_.NextReady(step_ + 1, state_epoch_);
    if (!tensor.has_value()) return;
    absl::Status prepared = CheckUsableLocked();
    if (prepared.ok() && !shadowed_[*tensor]) continue;  // the commit steps it in place
    try {
      if (prepared.ok()) {
        std::shared_ptr<StepOutcome>& outcome = pipeline_.outcome();
        if (outcome == nullptr) outcome = round_.NewOutcome();
        prepared = PrepareLocked(*tensor, pipeline_.lr(), *outcome);
      }
    } catch (const std::bad_alloc&) {
      prepared = absl::ResourceExhaustedError("no host memory for a prepared tensor's result");
    }
    // The commit runs the step serially, with the serial path's errors.
    if (!prepared.ok()) pipeline_.Break();
  }
}

absl::Status Session::PrepareLocked(int tensor, std::optional<double> lr, StepOutcome& outcome) {
  const std::vector<const float*> inputs = pipeline_.Inputs(tensor);
  const size_t count = static_cast<size_t>(counts_[tensor]);
  absl::Span<const float> gradient(inputs[0], count);
  if (inputs.size() > 1) {
    // The serial path's mean (StepRound::MeanInFirst): the same sum in worker order.
    mean_scratch_.resize(std::max(mean_scratch_.size(), count));
    const absl::Span<float> mean(mean_scratch_.data(), count);
    MeanOfWorkers(inputs, mean);
    gradient = mean;
  }
  if (inputs.size() == 1 && pipeline_.InRange(tensor)) {
    // One worker's gradient, every value checked by its staging as it decoded it: no second
    // pass over it. (A mean of several is checked again: its rounding may leave the range.)
    OPTD_RETURN_IF_ERROR(optimizer_->PrepareCheckedTensor(tensor, gradient, lr));
  } else {
    OPTD_RETURN_IF_ERROR(optimizer_->PrepareTensor(tensor, gradient, lr));
  }
  if (config_.step_result() == v1::STEP_RESULT_NONE) return absl::OkStatus();
  outcome.values.resize(counts_.size());
  outcome.values[tensor].resize(count);
  const absl::Span<float> values = absl::MakeSpan(outcome.values[tensor]);
  OPTD_RETURN_IF_ERROR(optimizer_->GetPreparedParameters(tensor, values));
  if (config_.step_result() == v1::STEP_RESULT_DELTA) {
    before_scratch_.resize(std::max(before_scratch_.size(), count));
    const absl::Span<float> before(before_scratch_.data(), count);
    OPTD_RETURN_IF_ERROR(optimizer_->GetParameters(tensor, before));
    ParameterDelta(values, before, values);
  }
  return absl::OkStatus();
}

absl::Duration Session::straggler_timeout() const {
  if (config_.straggler_timeout_seconds() > 0) {
    return absl::Seconds(config_.straggler_timeout_seconds());
  }
  return options_.default_straggler_timeout;
}

void Session::MarkDeleted() {
  absl::MutexLock lock(&mu_);
  deleted_ = true;
  round_.Abort(absl::NotFoundError(absl::StrCat("session '", id_, "' was deleted")));
}

absl::Status Session::CheckUsableLocked() const {
  if (deleted_) return absl::NotFoundError(absl::StrCat("session '", id_, "' was deleted"));
  if (extended_) {
    return absl::UnavailableError(
        absl::StrCat("session '", id_, "' was given new tensors meanwhile; retry the call"));
  }
  if (!damaged_.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("session '", id_, "' was damaged by a failed step (", damaged_.message(),
                     "); Restore it from its checkpoint"));
  }
  return absl::OkStatus();
}

absl::Status Session::CheckStepHeader(const v1::StepHeader& header) {
  absl::MutexLock lock(&mu_);
  return CheckStepHeaderLocked(header);
}

absl::Status Session::CheckStepHeaderLocked(const v1::StepHeader& header) {
  OPTD_RETURN_IF_ERROR(CheckUsableLocked());
  if (header.worker_id() < 0 || header.worker_id() >= config_.world_size()) {
    return absl::InvalidArgumentError(absl::StrCat("worker_id ", header.worker_id(),
                                                   " is outside [0, ", config_.world_size(),
                                                   ") for session '", id_, "'"));
  }
  if (header.placement_epoch() != 0 && header.placement_epoch() != config_.placement_epoch()) {
    return absl::FailedPreconditionError(
        absl::StrCat("session '", id_, "' was placed at epoch ", config_.placement_epoch(),
                     "; worker ", header.worker_id(), " steps with placement epoch ",
                     header.placement_epoch(), " (a stale placement: recompute it)"));
  }
  if (header.step() == step_ && round_.has_last_outcome()) return absl::OkStatus();
  if (header.step() != step_ + 1) {
    return WithRejectionReason(
        absl::FailedPreconditionError(absl::StrCat(
            "session '", id_, "' expects step ", step_ + 1, " (it has completed ", step_,
            " steps); worker ", header.worker_id(), " sent step ", header.step())),
        "wrong_step");
  }
  if (header.has_lr()) return optimizer_->CheckStepLearningRate(header.lr());
  return absl::OkStatus();
}

bool Session::StepUnderway(int64_t step) {
  absl::MutexLock lock(&mu_);
  return (step == step_ + 1 && round_.pending()) || (step == step_ && round_.has_last_outcome());
}

absl::StatusOr<StepReply> Session::Step(const v1::StepHeader& header,
                                        std::unique_ptr<TensorStaging> gradients,
                                        const std::function<bool()>& cancelled,
                                        const std::function<void(StepReply)>& on_decided) {
  Touch();
  absl::MutexLock lock(&mu_);
  absl::Status valid = CheckStepHeaderLocked(header);
  if (!valid.ok()) {
    ReleaseStagingLocked(std::move(gradients));
    return valid;
  }
  if (header.step() == step_) {
    ReleaseStagingLocked(std::move(gradients));
    return StepReply{round_.LastOutcome(), true};
  }
  const std::optional<double> lr = LrOverride(header);
  OPTD_ASSIGN_OR_RETURN(const StepRound::Ticket ticket,
                        round_.Join(header.worker_id(), header.step(), lr, std::move(gradients),
                                    cancelled, index_->names()));
  if (ticket.complete) {
    // Out of host memory before the optimizer ran (the result buffers; the snapshot and the
    // checkpoint after it catch their own), nothing was applied: the round ends with the error.
    absl::StatusOr<std::shared_ptr<StepOutcome>> result = absl::ResourceExhaustedError(
        absl::StrCat("session '", id_, "' step ", header.step(),
                     ": no host memory for the step's results; nothing was applied"));
    try {
      result = CommitLocked(header, on_decided);
    } catch (const std::bad_alloc&) {
    }
    round_.End(result);
    if (!result.ok()) return result.status();
    return StepReply{StepRound::Lease(*result), false};
  }
  OPTD_ASSIGN_OR_RETURN(std::shared_ptr<StepOutcome> outcome,
                        round_.Wait(ticket, header.worker_id(), cancelled));
  return StepReply{StepRound::Lease(outcome), ticket.replayed};
}

absl::StatusOr<std::shared_ptr<StepOutcome>> Session::CommitLocked(
    const v1::StepHeader& header, const std::function<void(StepReply)>& on_decided) {
  // The pipeline's outcome holds the results of the tensors it prepared.
  std::shared_ptr<StepOutcome> outcome = std::exchange(pipeline_.outcome(), nullptr);
  if (outcome == nullptr) outcome = round_.NewOutcome();
  outcome->step = header.step();
  outcome->result = config_.step_result();
  outcome->checkpoint_step = checkpoint_step_;  // until this step's own checkpoint, if due
  outcome->progress.Reset(outcome->result == v1::STEP_RESULT_NONE ? 0 : num_tensors());
  // A stream reading the results early waits on the progress: it finishes on every path (an
  // earlier Finish counts; this one is for a throw).
  absl::Cleanup finish = [keep = outcome] {
    keep->progress.Finish(absl::InternalError("the step failed while its results were sent"));
  };
  for (const auto& [worker, staging] : round_.contributions()) {
    outcome->nonfinite_values += staging->out_of_range_values();
  }
  const std::vector<int> present = round_.contributions().begin()->second->PresentTensors();
  outcome->compute_started = absl::Now();  // ApplyLocked moves it past the mean
  if (outcome->nonfinite_values > 0) {
    // Only reachable under NON_FINITE_POLICY_SKIP_STEP: the stream rejects them otherwise.
    outcome->skipped = true;
    optimizer_->DiscardPrepared();
  } else {
    absl::Status applied = ApplyLocked(header, present, outcome, on_decided);
    if (!applied.ok()) {
      outcome->progress.Finish(applied);
      return applied;
    }
  }
  if (outcome->skipped && outcome->result != v1::STEP_RESULT_NONE) {
    outcome->values.resize(num_tensors());
    for (int t = 0; t < num_tensors(); ++t) {
      outcome->values[t].assign(static_cast<size_t>(counts_[t]), 0.0f);
      if (outcome->result == v1::STEP_RESULT_PARAMETERS) {
        OPTD_RETURN_IF_ERROR(optimizer_->GetParameters(t, absl::MakeSpan(outcome->values[t])));
      }
    }
  }
  outcome->compute_finished = absl::Now();
  step_ = header.step();
  step_published_ = step_;
  ExportStateLocked();
  if (outcome->nonfinite_values > 0) CountNonFinite(outcome->nonfinite_values);
  round_.Completed(outcome);
  if (CheckpointDue(step_)) {
    // The step has committed in memory; if its checkpoint fails the reply says so (the step is
    // not durable: a daemon killed now restarts from checkpoint_step), and it is counted and
    // logged. The last good checkpoint stays in place. (Such a step's results are not streamed
    // early: its summary, which says this, goes first.)
    absl::StatusOr<CheckpointInfo> written = CheckpointLocked();
    if (!written.ok()) outcome->checkpoint_error = std::string(written.status().message());
    outcome->checkpoint_step = checkpoint_step_;
  }
  outcome->progress.Finish(absl::OkStatus());
  return outcome;
}

bool Session::CheckpointDue(int64_t step) const {
  return config_.checkpoint_interval() > 0 && !options_.state_dir.empty() &&
         step % config_.checkpoint_interval() == 0;
}

bool Session::EarlyResults(int64_t step, v1::StepResult result) const {
  if (options_.early_results_min_bytes < 0 || result == v1::STEP_RESULT_NONE ||
      AnalysisStep(step) || CheckpointDue(step)) {
    return false;
  }
  int64_t bytes = 0;
  for (int64_t count : counts_) bytes += count * static_cast<int64_t>(sizeof(float));
  return bytes >= options_.early_results_min_bytes;
}

absl::Status Session::ApplyLocked(const v1::StepHeader& header, const std::vector<int>& present,
                                  const std::shared_ptr<StepOutcome>& outcome_ptr,
                                  const std::function<void(StepReply)>& on_decided) {
  StepOutcome& outcome = *outcome_ptr;
  const std::optional<double> lr = LrOverride(header);
  // The pipeline's prepared tensors count when they were computed from exactly this step's
  // contributions and nothing changed the tensors since; the tensors it has not prepared yet are
  // prepared now, the same way (those without shadows step in place below).
  const bool pipelined = !AnalysisStep(header.step()) &&
                         pipeline_.Usable(header.step(), state_epoch_, lr, round_.contributions());
  pipeline_.Break();  // nothing more is prepared for this step
  if (!pipelined) optimizer_->DiscardPrepared();
  int64_t ahead = 0;
  for (int t : present) ahead += optimizer_->prepared(t) ? 1 : 0;
  for (int t : present) {
    if (!pipelined || optimizer_->prepared(t) || !shadowed_[t]) continue;
    absl::Status prepared = PrepareLocked(t, lr, outcome);
    if (absl::IsInvalidArgument(prepared)) {
      optimizer_->DiscardPrepared();
      return prepared;  // the serial path's refusal: nothing has changed
    }
    // Anything else (no memory for the shadows) leaves the tensor to the serial path.
  }
  // Per tensor: its result is already in `outcome` (prepared).
  std::vector<char> filled(counts_.size(), 0);
  std::vector<int> in_place;  // present tensors stepped in place, below
  for (int t : present) {
    if (optimizer_->prepared(t)) {
      filled[t] = 1;
    } else {
      in_place.push_back(t);
    }
  }
  for (int t : in_place) {
    OPTD_RETURN_IF_ERROR(optimizer_->SetGradient(t, round_.MeanInFirst(t, counts_[t])));
  }
  if (outcome.result != v1::STEP_RESULT_NONE) {
    outcome.values.resize(num_tensors());
    int64_t largest = 0;
    for (int t = 0; t < num_tensors(); ++t) {
      if (filled[t]) continue;
      outcome.values[t].resize(static_cast<size_t>(counts_[t]));
      largest = std::max(largest, counts_[t]);
      if (outcome.result == v1::STEP_RESULT_DELTA) {
        OPTD_RETURN_IF_ERROR(optimizer_->GetParameters(t, absl::MakeSpan(outcome.values[t])));
      }
    }
    if (outcome.result == v1::STEP_RESULT_DELTA) {
      result_scratch_.resize(std::max(result_scratch_.size(), static_cast<size_t>(largest)));
    }
  }
  // A plain bool array: absl::Span cannot view std::vector<bool>.
  const size_t n = counts_.size();
  std::unique_ptr<bool[]> has_gradient = std::make_unique<bool[]>(n);
  for (int t : in_place) has_gradient[t] = true;
  outcome.tensors_updated = static_cast<int>(present.size());
  outcome.compute_started = absl::Now();
  std::optional<PendingSnapshot> snapshot = BeginSnapshotLocked(header.step(), present);
  // Early results: from the moment every gradient has passed its checks, the prepared tensors'
  // results are final, and each batch's as it finishes; a result read here fails only as the
  // backend does (the session is then damaged, below).
  const bool early = on_decided != nullptr && EarlyResults(header.step(), outcome.result);
  absl::Status read_early;
  const auto decided = [&] {
    for (int t : present) {
      if (filled[t]) outcome.progress.Ready(t);
    }
    on_decided(StepReply{StepRound::Lease(outcome_ptr), false});
  };
  Optimizer::StepProgress progress;
  if (early) {
    progress.validated = decided;
    progress.stepped = [&](absl::Span<const int> tensors) {
      mu_.AssertHeld();  // called within optimizer_->Step, below
      for (int t : tensors) {
        if (!read_early.ok()) return;
        read_early = ReadResultOfLocked(outcome, t);
        if (!read_early.ok()) return;
        filled[t] = 1;
        outcome.progress.Ready(t);
      }
    };
  }
  if (!in_place.empty() || !pipelined) {
    // Validates every in-place gradient before it writes; the prepared tensors are untouched.
    absl::Status stepped = optimizer_->Step(absl::MakeConstSpan(has_gradient.get(), n), lr,
                                            early ? &progress : nullptr);
    if (!stepped.ok()) {
      optimizer_->DiscardPrepared();
      if (stepped.code() == absl::StatusCode::kInternal) damaged_ = stepped;
      return stepped;  // an unfinished snapshot gives its room back
    }
  } else if (early) {
    decided();  // every tensor was stepped ahead: nothing is left to check
  }
  // Cannot fail: the prepared tensors' shadows change places with their buffers.
  optimizer_->CommitPrepared();
  // The state has changed: a failure from here on would leave the step count behind the state
  // (a retry would apply the step twice), so it damages the session.
  absl::Status finished = read_early;
  if (finished.ok()) finished = ReadResultLocked(outcome, filled);
  if (finished.ok() && snapshot.has_value()) {
    finished = FinishSnapshotLocked(*std::move(snapshot));
  }
  if (!finished.ok()) {
    damaged_ = finished;
    return finished;
  }
  tensors_stepped_ahead_ += ahead;
  if (options_.metrics != nullptr) {
    options_.metrics->CountStepTensors(ahead, static_cast<int64_t>(present.size()) - ahead);
  }
  return absl::OkStatus();
}

std::optional<PendingSnapshot> Session::BeginSnapshotLocked(int64_t step,
                                                            const std::vector<int>& present) {
  const int64_t interval = config_.analysis_interval();
  if (options_.analyzer == nullptr || interval == 0 || step % interval != 0) return std::nullopt;
  std::vector<SnapshotRequest> requests;
  try {
    for (int t : present) {
      const TensorSpec& spec = optimizer_->spec(t);
      if (spec.config.algorithm != Algorithm::kMatrix) continue;
      const absl::StatusOr<MatrixView> view = MatrixViewOf(spec.shape, spec.rank_policy);
      if (!view.ok() || view->rows < 2) continue;  // no dominance ratio for a single row
      // The gradient is the workers' mean, which ApplyLocked left in the first contribution.
      const float* gradient = round_.contributions().begin()->second->data(t);
      requests.push_back(SnapshotRequest{t, index_->name(t), view->batch, view->rows, view->cols,
                                         spec.config.matrix.newton_schulz,
                                         absl::MakeConstSpan(gradient, counts_[t])});
    }
  } catch (const std::bad_alloc&) {
    return std::nullopt;  // no analysis this time; the step goes on
  }
  // Keyed by the session and its restores: an analysis still running for steps a Restore undid
  // does not hold up the first analysis after it (its figures will be dropped anyway).
  std::optional<PendingSnapshot> snapshot = options_.analyzer->BeginSnapshot(
      absl::StrCat(id_, "#", restores_.load()), step, requests, backend_);
  if (!snapshot.has_value()) return std::nullopt;
  // Every buffer is in place: the step writes each update it applies into one
  // (Optimizer::CaptureUpdate), exact at any learning rate, where the parameters differenced over
  // lr would not be. It cannot fail for a matrix tensor of this session and a buffer.
  for (size_t i = 0; i < snapshot->size(); ++i) {
    optimizer_->CaptureUpdate(snapshot->tensor(i), snapshot->update_buffer(i)).IgnoreError();
  }
  return snapshot;
}

absl::Status Session::FinishSnapshotLocked(PendingSnapshot snapshot) {
  std::weak_ptr<Session> self = weak_from_this();
  return options_.analyzer->Finish(
      std::move(snapshot), backend_,
      [this](int t, absl::Span<float> out) {
        mu_.AssertHeld();  // called within Finish
        return optimizer_->GetState(t, "momentum", out);
      },
      [self, restores = restores_.load()](int64_t step, std::vector<v1::TensorAnalysis> figures) {
        if (std::shared_ptr<Session> session = self.lock()) {
          session->PublishAnalysis(step, restores, std::move(figures));
        }
      });
}

void Session::PublishAnalysis(int64_t step, int64_t restores,
                              std::vector<v1::TensorAnalysis> figures) {
  absl::MutexLock lock(&analysis_mu_);
  // A Restore since the snapshot undid the analyzed step.
  if (retired_ || restores != restores_.load() || figures.empty()) return;
  // Keep each tensor's latest figures; a tensor left out this time keeps its earlier ones.
  std::map<std::string, v1::TensorAnalysis> latest;
  for (v1::TensorAnalysis& a : analysis_) latest[a.tensor()] = std::move(a);
  for (v1::TensorAnalysis& a : figures) latest[a.tensor()] = std::move(a);
  analysis_.clear();
  for (const std::string& name : index_->names()) {
    auto it = latest.find(name);
    if (it != latest.end()) analysis_.push_back(std::move(it->second));
  }
  if (options_.metrics != nullptr) options_.metrics->PublishAnalysis(id_, step, analysis_);
}

void Session::Retire() {
  absl::MutexLock lock(&analysis_mu_);
  retired_ = true;
  if (options_.metrics != nullptr) options_.metrics->RemoveSession(id_);
}

void Session::CountNonFinite(int64_t values) {
  if (options_.metrics == nullptr) return;
  absl::MutexLock lock(&analysis_mu_);
  if (!retired_) options_.metrics->CountNonFinite(id_, values);
}

void Session::ExportStateLocked() {
  std::vector<v1::TensorChoices> choices;
  for (int t = 0; t < num_tensors(); ++t) {
    if (!optimizer_->has_auto_choices(t)) continue;
    v1::TensorChoices& c = choices.emplace_back();
    c.set_tensor(config_.tensors(t).name());
    *c.mutable_choices() = AutoChoicesToProto(optimizer_->auto_choices(t));
  }
  absl::MutexLock lock(&analysis_mu_);
  const bool publish_choices = !choices.empty() || !choices_.empty();
  choices_ = std::move(choices);
  if (options_.metrics == nullptr || retired_) return;
  options_.metrics->SetSessionState(id_, step_, state_bytes_);
  if (publish_choices) options_.metrics->PublishChoices(id_, choices_);
}

absl::Status Session::ReadResultLocked(StepOutcome& outcome, const std::vector<char>& filled) {
  if (outcome.result == v1::STEP_RESULT_NONE) return absl::OkStatus();
  for (int t = 0; t < num_tensors(); ++t) {
    if (!filled[t]) OPTD_RETURN_IF_ERROR(ReadResultOfLocked(outcome, t));
  }
  return absl::OkStatus();
}

absl::Status Session::ReadResultOfLocked(StepOutcome& outcome, int t) {
  absl::Span<float> values = absl::MakeSpan(outcome.values[t]);
  if (outcome.result == v1::STEP_RESULT_PARAMETERS) return optimizer_->GetParameters(t, values);
  const absl::Span<float> after = absl::MakeSpan(result_scratch_).subspan(0, values.size());
  OPTD_RETURN_IF_ERROR(optimizer_->GetParameters(t, after));
  ParameterDelta(after, values, values);
  return absl::OkStatus();
}

absl::Status Session::UpdateHyperparams(const v1::UpdateHyperparamsRequest& request) {
  Touch();
  absl::MutexLock lock(&mu_);
  OPTD_RETURN_IF_ERROR(CheckUsableLocked());
  OPTD_ASSIGN_OR_RETURN(HyperparamTable updated,
                        UpdatedHyperparams(config_, *optimizer_, hyperparams_, request, id_));
  ++state_epoch_;
  OPTD_RETURN_IF_ERROR(ApplyGroupHyperparams(config_, *optimizer_, updated));
  for (const auto& [name, h] : updated) hyperparams_[name] = h;
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const SharedRegion>> Session::AttachSharedMemory(int worker) {
  if (!config_.shared_memory()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "session '", id_, "' was created without shared_memory (SessionConfig.shared_memory)"));
  }
  const int workers = std::max(1, config_.world_size());
  if (worker < 0 || worker >= workers) {
    return absl::InvalidArgumentError(absl::StrCat("worker_id ", worker, " is outside [0, ",
                                                   workers, ") of session '", id_, "'"));
  }
  absl::MutexLock lock(&shared_mu_);
  if (shared_regions_.empty()) shared_regions_.resize(static_cast<size_t>(workers));
  std::shared_ptr<const SharedRegion>& region = shared_regions_[static_cast<size_t>(worker)];
  if (region == nullptr) {
    // The session's quota counted a region per worker (RequiredBytes).
    OPTD_ASSIGN_OR_RETURN(SharedLayout layout, SharedLayoutFor(counts_));
    OPTD_ASSIGN_OR_RETURN(
        region,
        SharedRegion::Create(absl::StrCat("optd-", id_, "-worker-", worker), std::move(layout)));
  }
  return region;
}

std::shared_ptr<const SharedRegion> Session::SharedMemory(int worker) {
  absl::MutexLock lock(&shared_mu_);
  if (worker < 0 || static_cast<size_t>(worker) >= shared_regions_.size()) return nullptr;
  return shared_regions_[static_cast<size_t>(worker)];
}

absl::Status Session::SetParameters(const TensorStaging& values) {
  Touch();
  absl::MutexLock lock(&mu_);
  OPTD_RETURN_IF_ERROR(CheckUsableLocked());
  // The staging checked every value as it decoded it (within ±FLT_MAX: finite), so none of the
  // tensors can fail after an earlier one was written.
  if (values.out_of_range_values() > 0) {
    return absl::InvalidArgumentError("parameters must be finite");
  }
  ++state_epoch_;
  for (int t : values.PresentTensors()) {
    OPTD_RETURN_IF_ERROR(optimizer_->SetFiniteParameters(t, values.values(t)));
  }
  return absl::OkStatus();
}

void Session::SnapshotParameters(std::vector<int> tensors, TensorStaging& into,
                                 SnapshotProgress& progress) {
  Touch();
  if (options_.pipeliner == nullptr || !backend_.host_memory()) {
    progress.Finish(CopySnapshot(tensors, into, progress));
    return;
  }
  // A task the pipeliner drops unrun (the daemon stopping) still ends the copy, with an error;
  // one that ran leaves `progress` alone (the reader may have gone once the copy finished).
  struct Unrun {
    explicit Unrun(SnapshotProgress* progress) : progress(progress) {}
    Unrun(const Unrun&) = delete;
    Unrun& operator=(const Unrun&) = delete;
    ~Unrun() {
      if (!ran) {
        progress->Finish(
            absl::UnavailableError("the daemon stopped before the parameters were read"));
      }
    }
    SnapshotProgress* progress;
    bool ran = false;
  };
  options_.pipeliner->Schedule([weak = weak_from_this(), tensors = std::move(tensors), into = &into,
                                unrun = std::make_shared<Unrun>(&progress)] {
    unrun->ran = true;
    absl::Status copied = absl::NotFoundError("the session was deleted");
    // The caller holds the session until the copy finishes, so the last reference to it is
    // never this thread's: it is dropped before Finish.
    if (std::shared_ptr<Session> session = weak.lock()) {
      copied = session->CopySnapshot(tensors, *into, *unrun->progress);
    }
    unrun->progress->Finish(std::move(copied));
  });
}

absl::Status Session::CopySnapshot(const std::vector<int>& tensors, TensorStaging& into,
                                   SnapshotProgress& progress) {
  // Pieces of 4 MiB: the reader waits for no more than one piece beyond what it sends.
  constexpr int64_t kPiece = int64_t{1} << 20;
  absl::MutexLock lock(&mu_);
  OPTD_RETURN_IF_ERROR(CheckUsableLocked());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int t = tensors[i];
    for (int64_t offset = 0; offset < counts_[t]; offset += kPiece) {
      const int64_t n = std::min(kPiece, counts_[t] - offset);
      OPTD_RETURN_IF_ERROR(optimizer_->GetParameters(
          t, offset, absl::MakeSpan(into.data(t) + offset, static_cast<size_t>(n))));
      progress.Copied(static_cast<int>(i), offset + n);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<CheckpointInfo> Session::Checkpoint(bool touch, const std::string& shared_dir) {
  if (touch) Touch();
  absl::MutexLock lock(&mu_);
  OPTD_RETURN_IF_ERROR(CheckUsableLocked());
  if (!shared_dir.empty() && options_.state_dir.empty()) {
    // Only the shared copy: the daemon keeps no restart checkpoints of its own.
    OPTD_ASSIGN_OR_RETURN(CheckpointInfo info, WriteCheckpointLocked(shared_dir));
    info.shared_path = info.path;
    return info;
  }
  OPTD_ASSIGN_OR_RETURN(CheckpointInfo info, CheckpointLocked());
  if (shared_dir.empty()) return info;
  if (shared_dir == options_.state_dir) {
    info.shared_path = info.path;
    return info;
  }
  OPTD_ASSIGN_OR_RETURN(CheckpointInfo shared, WriteCheckpointLocked(shared_dir));
  info.shared_path = shared.path;
  return info;
}

absl::StatusOr<CheckpointInfo> Session::CheckpointLocked() {
  if (options_.state_dir.empty()) {
    return absl::FailedPreconditionError(
        "the daemon has no state directory (--state_dir); checkpoints are off");
  }
  OPTD_ASSIGN_OR_RETURN(CheckpointInfo info, WriteCheckpointLocked(options_.state_dir));
  checkpoint_step_ = step_;
  checkpoint_step_published_ = step_;
  return info;
}

absl::StatusOr<CheckpointInfo> Session::WriteCheckpointLocked(const std::string& state_dir) {
  OPTD_RETURN_IF_ERROR(CheckUsableLocked());
  absl::StatusOr<CheckpointInfo> written =
      absl::ResourceExhaustedError("optd could not allocate host memory to write the checkpoint");
  try {
    written =
        WriteSessionCheckpoint(*options_.fs, state_dir,
                               SessionCheckpointContents{id_, config_, token_digest_, step_,
                                                         hyperparams_, *optimizer_, clock().Now()});
  } catch (const std::bad_alloc&) {
    // `written` says so; the last good checkpoint stays (the writer commits by rename).
  }
  if (!written.ok()) {
    // The last good checkpoint stays in place (CheckpointWriter commits by rename).
    if (options_.metrics != nullptr) options_.metrics->CountCheckpointFailure();
    LogEvent(absl::StrCat("session '", id_, "': checkpoint of step ", step_, " in ", state_dir,
                          " failed, the last on disk is step ", checkpoint_step_, ": ",
                          written.status().ToString()));
  }
  return written;
}

absl::StatusOr<int64_t> Session::Restore() {
  Touch();
  if (options_.state_dir.empty()) {
    return absl::FailedPreconditionError(
        "the daemon has no state directory (--state_dir); checkpoints are off");
  }
  absl::MutexLock lock(&mu_);
  const std::string path = CheckpointPath(options_.state_dir, id_);
  absl::StatusOr<SessionState> loaded =
      LoadSessionCheckpoint(backend_, *options_.fs, path, id_, config_, token_digest_);
  if (absl::IsNotFound(loaded.status())) {
    return absl::FailedPreconditionError(
        absl::StrCat("session '", id_, "' has no checkpoint at ", path));
  }
  OPTD_RETURN_IF_ERROR(loaded.status());
  const std::string what = absl::StrCat("was restored from its checkpoint at step ", loaded->step);
  ReplaceStateLocked(std::move(*loaded), what);
  checkpoint_step_ = step_;
  checkpoint_step_published_ = step_;
  LogEvent(absl::StrCat("session '", id_, "' restored from its checkpoint at step ", step_));
  return step_;
}

void Session::ReplaceStateLocked(SessionState state, absl::string_view what) {
  // Abort a pending step: its workers get Aborted and resend against the new step.
  round_.Abort(absl::AbortedError(
      absl::StrCat("session '", id_, "' ", what, " while this step was pending")));
  // Nothing can fail from here on: the replacement is all or nothing.
  optimizer_ = std::move(state.optimizer);
  ++state_epoch_;
  damaged_ = absl::OkStatus();
  for (const auto& [name, h] : state.hyperparams) hyperparams_[name] = h;
  step_ = state.step;
  step_published_ = step_;
  round_.DropOutcomes();
  ExportStateLocked();
  // The figures were of steps that no longer happened, and so are those still in analysis.
  absl::MutexLock analysis_lock(&analysis_mu_);
  ++restores_;
  analysis_.clear();
  if (options_.metrics != nullptr && !retired_) options_.metrics->PublishAnalysis(id_, step_, {});
}

absl::StatusOr<std::unique_ptr<Session>> Session::Extend(v1::SessionConfig extended) {
  Touch();
  OPTD_ASSIGN_OR_RETURN(std::vector<TensorSpec> specs, TensorSpecs(extended));
  SessionState state;
  OPTD_ASSIGN_OR_RETURN(state.optimizer, Optimizer::Create(backend_, std::move(specs)));
  Optimizer& next = *state.optimizer;
  OPTD_RETURN_IF_ERROR(InitializeParameters(extended, num_tensors(), next));
  std::unique_ptr<Session> successor(
      new Session(backend_, id_, std::move(extended), token_digest_, options_));
  absl::MutexLock lock(&mu_);
  OPTD_RETURN_IF_ERROR(CheckUsableLocked());
  // Every record of every tensor this session has, in pieces of 4 MiB.
  std::vector<float> piece;
  for (int t = 0; t < num_tensors(); ++t) {
    std::vector<std::pair<std::string, int64_t>> records{{"", counts_[t]}};
    for (const StateBuffer& b : optimizer_->state(t)) records.emplace_back(b.name, b.count);
    for (const auto& [buffer, count] : records) {
      for (int64_t offset = 0; offset < count; offset += int64_t{1} << 20) {
        piece.resize(static_cast<size_t>(std::min(count - offset, int64_t{1} << 20)));
        OPTD_RETURN_IF_ERROR(optimizer_->ReadRange(t, buffer, offset, absl::MakeSpan(piece)));
        OPTD_RETURN_IF_ERROR(next.WriteRange(t, buffer, offset, piece));
      }
    }
    OPTD_RETURN_IF_ERROR(next.SetStepsApplied(t, optimizer_->steps_applied(t)));
    if (optimizer_->has_auto_choices(t)) {
      OPTD_RETURN_IF_ERROR(next.SetAutoChoices(t, optimizer_->auto_choices(t)));
    }
  }
  state.step = step_;
  state.hyperparams = hyperparams_;
  OPTD_RETURN_IF_ERROR(ApplyGroupHyperparams(successor->config_, next, state.hyperparams));
  // The successor's metric series replace this session's (same id): retire these first.
  Retire();
  OPTD_RETURN_IF_ERROR(successor->Initialize(std::move(state), /*checkpointed=*/false));
  round_.Abort(absl::AbortedError(absl::StrCat(
      "session '", id_, "' was given new tensors while this step was pending; send it again")));
  extended_ = true;
  LogEvent(absl::StrCat("session '", id_, "' given ", successor->num_tensors() - num_tensors(),
                        " new tensor(s) at step ", step_));
  return successor;
}

absl::Status Session::ExportState(int64_t chunk_elements, bool parameters,
                                  absl::FunctionRef<bool(const v1::ExportStateResponse&)> write) {
  Touch();
  v1::ExportStateResponse response;
  int64_t epoch = 0;
  int64_t step = 0;
  {
    absl::MutexLock lock(&mu_);
    OPTD_RETURN_IF_ERROR(CheckUsableLocked());
    *response.mutable_header() =
        StateHeaderOf(config_, step_, hyperparams_, *optimizer_, parameters);
    epoch = state_epoch_;
    step = step_;
  }
  const v1::StateHeader header = response.header();
  if (!write(response)) {
    return absl::CancelledError("the client went away while the state's header was sent");
  }
  std::vector<float> values;
  v1::StateChunk* chunk = response.mutable_chunk();
  for (int t = 0; t < header.tensors_size(); ++t) {
    const v1::TensorState& ts = header.tensors(t);
    std::vector<std::pair<std::string, int64_t>> records;
    if (parameters) records.emplace_back("", ts.elements());
    for (int b = 0; b < ts.state_buffers_size(); ++b) {
      records.emplace_back(ts.state_buffers(b), ts.state_elements(b));
    }
    for (const auto& [buffer, elements] : records) {
      for (int64_t offset = 0; offset < elements; offset += chunk_elements) {
        const int64_t count = std::min(chunk_elements, elements - offset);
        values.resize(static_cast<size_t>(count));
        {
          absl::MutexLock lock(&mu_);
          OPTD_RETURN_IF_ERROR(CheckUsableLocked());
          if (state_epoch_ != epoch || step_ != step) {
            return absl::AbortedError(absl::StrCat(
                "session '", id_, "' changed while its state of step ", step,
                " was exported (now step ", step_,
                ", or new parameters, hyperparameters, a restore or an import); export again"));
          }
          OPTD_RETURN_IF_ERROR(optimizer_->ReadRange(t, buffer, offset, absl::MakeSpan(values)));
        }
        chunk->set_tensor(ts.name());
        chunk->set_buffer(buffer);
        chunk->set_offset(offset);
        chunk->set_data(values.data(), values.size() * sizeof(float));  // little-endian fp32
        if (!write(response)) {
          return absl::CancelledError(
              absl::StrCat("the client went away while tensor '", ts.name(), "' was exported"));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<StateImport>> Session::BeginImport(const v1::StateHeader& header) {
  Touch();
  {
    absl::MutexLock lock(&mu_);
    if (deleted_) return absl::NotFoundError(absl::StrCat("session '", id_, "' was deleted"));
    if (importing_) {
      return absl::FailedPreconditionError(
          absl::StrCat("session '", id_, "' is already importing a state; one import at a time"));
    }
    importing_ = true;
  }
  auto end = [this] {
    absl::MutexLock lock(&mu_);
    importing_ = false;
  };
  absl::StatusOr<std::unique_ptr<StateImport>> import =
      StateImport::Begin(backend_, id_, config_, header);
  if (!import.ok()) {
    end();
    return import.status();
  }
  (*import)->OnEnd(end);
  return import;
}

absl::StatusOr<v1::ImportStateResponse> Session::CommitImport(std::unique_ptr<StateImport> import) {
  OPTD_ASSIGN_OR_RETURN(SessionState state, import->Finish());
  v1::ImportStateResponse response;
  absl::MutexLock lock(&mu_);
  if (deleted_) return absl::NotFoundError(absl::StrCat("session '", id_, "' was deleted"));
  const std::string what = absl::StrCat("imported a state of step ", state.step);
  ReplaceStateLocked(std::move(state), what);
  checkpoint_step_ = -1;  // what is on disk is of the session before the import
  checkpoint_step_published_ = -1;
  response.set_step(step_);
  response.set_checkpoint_step(-1);
  if (!options_.state_dir.empty()) {
    absl::StatusOr<CheckpointInfo> written = CheckpointLocked();
    if (written.ok()) {
      response.set_checkpoint_step(written->step);
    } else {
      response.set_checkpoint_error(std::string(written.status().message()));
    }
  }
  LogEvent(absl::StrCat("session '", id_, "' imported a state at step ", step_));
  return response;
}

std::vector<v1::TensorAnalysis> Session::Analysis() {
  Touch();
  absl::MutexLock lock(&analysis_mu_);
  return analysis_;
}

std::vector<v1::TensorChoices> Session::Choices() {
  absl::MutexLock lock(&analysis_mu_);
  return choices_;
}

v1::SessionInfo Session::Info(bool with_tensors) {
  v1::SessionInfo info;
  info.set_session_id(id_);
  info.set_loaded(true);
  info.set_step(step_published_.load());
  info.set_checkpoint_step(checkpoint_step_published_.load());
  info.set_state_bytes(state_bytes_);
  info.set_backend(std::string(backend_.name()));
  info.set_workers_pending(round_.workers_pending());
  if (!with_tensors) return info;
  *info.mutable_config() = config_;
  absl::MutexLock lock(&mu_);
  for (int t = 0; t < num_tensors(); ++t) {
    v1::TensorInfo* ti = info.add_tensors();
    *ti->mutable_config() = config_.tensors(t);
    ti->set_num_elements(counts_[t]);
    ti->set_steps_applied(optimizer_->steps_applied(t));
    if (optimizer_->has_auto_choices(t)) {
      *ti->mutable_auto_choices() = AutoChoicesToProto(optimizer_->auto_choices(t));
    }
    const v1::GroupHyperparams& h = hyperparams_.at(config_.groups(group_of_[t]).name());
    ti->set_lr(h.lr());
    ti->set_weight_decay(h.weight_decay());
    ti->set_momentum(h.momentum());
  }
  return info;
}

}  // namespace optd::server
