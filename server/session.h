// A session: one training run's tensors, their parameters and optimizer state on a backend, and
// the step protocol that turns the gradients of `world_size` workers into one optimizer step.
//
// Step protocol (DESIGN.md, "One step, as data"): the session has completed `step` steps; each
// worker sends step + 1. The step runs when every worker has contributed, on the mean of their
// gradients summed in worker order (so the result does not depend on arrival order), exactly
// once. A worker that retries a step it already contributed to is not counted again and gets the
// step's result; a retry of the last completed step gets that step's result again. If the
// workers do not all arrive within the straggler timeout, the step is aborted and nothing is
// applied.
//
// Commit: every input is checked before the optimizer runs, and the kernels' Step checks again
// before its first write, so a step either commits whole or leaves parameters and state
// untouched. Should the backend fail mid-step, the session refuses further work
// (FailedPrecondition) until Restore reloads its last checkpoint.
//
// Checkpoint file (server/checkpoint_file.h's record format), <state_dir>/<session>/checkpoint:
// record "meta" (optd.v1.SessionCheckpoint), then "params/<tensor>" and
// "state/<tensor>/<buffer>" as little-endian fp32.
#ifndef OPTD_SERVER_SESSION_H_
#define OPTD_SERVER_SESSION_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kernels/backend.h"
#include "kernels/optimizer.h"
#include "optd/v1/checkpoint.pb.h"
#include "optd/v1/optd.pb.h"
#include "server/analyzer.h"
#include "server/file_system.h"
#include "server/metrics.h"
#include "server/tensor_staging.h"

namespace optd::server {

struct SessionOptions {
  // Where checkpoints go; empty: Checkpoint and Restore fail with FailedPrecondition.
  std::string state_dir;
  FileSystem* fs = nullptr;  // REQUIRED when state_dir is set
  // Straggler timeout for sessions whose config leaves it 0.
  absl::Duration default_straggler_timeout = absl::Seconds(60);
  // Where the session's series go and who analyzes it; either may be null (then it has none).
  Metrics* metrics = nullptr;
  Analyzer* analyzer = nullptr;
};

// What one step produced, shared by every worker that asks for it.
struct StepOutcome {
  int64_t step = 0;
  bool skipped = false;
  int tensors_updated = 0;
  int64_t nonfinite_values = 0;
  v1::StepResult result = v1::STEP_RESULT_PARAMETERS;
  // The last step on disk once this one committed (its own when its periodic checkpoint was
  // written), and why this step's periodic checkpoint failed: such a step is not durable.
  int64_t checkpoint_step = 0;
  std::string checkpoint_error;
  // Per tensor, in session order: the new parameters or the delta; empty for STEP_RESULT_NONE.
  std::vector<std::vector<float>> values;
  // When the optimizer began (the workers' mean taken) and when the result was ready.
  absl::Time compute_started;
  absl::Time compute_finished;
  // Readers outside the session (StepReply) that may still read `values`. The session reuses
  // the buffers only once it reads 0: each reader's release pairs with that acquire load.
  std::atomic<int> leases{0};
};

struct StepReply {
  std::shared_ptr<const StepOutcome> outcome;
  // The caller's contribution had already been counted, or the step had already run: this is
  // the result the first attempt produced.
  bool replayed = false;
};

struct CheckpointInfo {
  int64_t step = 0;
  std::string path;
  int64_t bytes = 0;
  std::string shared_path;  // the copy for resharding, when one was asked for
};

// A checkpoint a resharded session restores from, and how errors name it.
struct CheckpointSourcePath {
  std::string label;  // e.g. "instance 'optd-2' session 'run'"
  std::string path;
};

// Owned through std::shared_ptr (the analyzer's callback holds a weak one).
class Session : public std::enable_shared_from_this<Session> {
 public:
  // A new session at step 0 with parameters initialized as the config says. REQUIRES: `config`
  // passed NormalizeSessionConfig.
  static absl::StatusOr<std::unique_ptr<Session>> Create(Backend& backend, std::string id,
                                                         v1::SessionConfig config,
                                                         std::string token_digest,
                                                         SessionOptions options);
  // The session in a checkpoint file. DataLoss for a damaged file, InvalidArgument when its
  // contents do not fit its own config.
  static absl::StatusOr<std::unique_ptr<Session>> Load(Backend& backend, const std::string& path,
                                                       SessionOptions options);
  // A new session whose tensors come from checkpoints of other sessions, by name (resharding;
  // CreateSessionRequest.restore_from states the rules): at the sources' step, with their
  // hyperparameters, and without a checkpoint of its own yet. NotFound for a missing source,
  // DataLoss for a damaged one, FailedPrecondition naming the tensor or source that does not fit.
  // REQUIRES: `config` passed NormalizeSessionConfig.
  static absl::StatusOr<std::unique_ptr<Session>> Restored(
      Backend& backend, std::string id, v1::SessionConfig config, std::string token_digest,
      SessionOptions options, const std::vector<CheckpointSourcePath>& sources);
  // The meta record of a checkpoint, read without loading any tensor (the file is still checked
  // whole).
  static absl::StatusOr<v1::SessionCheckpoint> ReadCheckpointMeta(FileSystem& fs,
                                                                  const std::string& path);
  // Backend and host bytes a session with this config holds: the optimizer's buffers, one
  // gradient staging per worker plus one, and two result buffers (the last step's, kept for
  // retries, and the next one's).
  static absl::StatusOr<int64_t> RequiredBytes(const v1::SessionConfig& config);
  static std::string CheckpointPath(const std::string& state_dir, const std::string& id);

  ~Session();

  const std::string& id() const { return id_; }
  const v1::SessionConfig& config() const { return config_; }
  const std::string& token_digest() const { return token_digest_; }
  int64_t state_bytes() const { return state_bytes_; }
  int num_tensors() const { return static_cast<int>(names_.size()); }
  // NotFound naming the session and the tensor.
  absl::StatusOr<int> FindTensor(absl::string_view name) const;
  int64_t num_elements(int tensor) const { return counts_[tensor]; }
  DType tensor_dtype(int tensor) const { return dtypes_[tensor]; }
  const std::string& tensor_name(int tensor) const { return names_[tensor]; }

  // A staging area for one stream of gradients or parameters; give it back with
  // ReleaseStaging (or hand it to Step) so its memory is reused; GetParams reads through one as
  // well. At most world_size + 1 are out
  // at once: Unavailable beyond (a client retrying far too eagerly).
  absl::StatusOr<std::unique_ptr<TensorStaging>> AcquireStaging();
  void ReleaseStaging(std::unique_ptr<TensorStaging> staging);

  // The checks Step makes on its header (worker id, step number, lr override), for a stream to
  // fail fast before reading gradients. A retry of the last completed step passes.
  absl::Status CheckStepHeader(const v1::StepHeader& header);

  // True when `step` is the pending step and some worker has contributed to it, or is the last
  // completed step (a retry).
  bool StepUnderway(int64_t step);

  // Contributes `gradients` (complete, checked by the caller with CheckComplete) for worker
  // header.worker_id and waits until the step has run, then returns its outcome. `cancelled` is
  // polled while waiting: a worker whose call is cancelled withdraws its contribution. Errors:
  // FailedPrecondition for a wrong step number (naming the expected one) or a damaged session;
  // InvalidArgument for a worker id outside [0, world_size) or gradients for another set of
  // tensors than the step's first worker sent; Aborted when the straggler timeout passes first;
  // Cancelled when the call is cancelled before the step runs.
  absl::StatusOr<StepReply> Step(const v1::StepHeader& header,
                                 std::unique_ptr<TensorStaging> gradients,
                                 const std::function<bool()>& cancelled);

  // Replaces the parameters of every tensor present in `values` (complete, finite) at once.
  absl::Status SetParameters(const TensorStaging& values);
  // The parameters of `tensors`, all of one step, into their buffers of `into` (one of this
  // session's AcquireStaging buffers).
  absl::Status GetParameters(const std::vector<int>& tensors, TensorStaging& into);

  // All updates are checked before any is applied. InvalidArgument names the group and value.
  absl::Status UpdateHyperparams(const v1::UpdateHyperparamsRequest& request);

  // `touch` false: a checkpoint that does not count as use (the idle-session reaper's).
  // `shared_dir` (the instance's directory in the shared state root): a copy goes there too, for
  // other instances to restore from when the session is resharded (only there when the daemon
  // has no state directory; once when it is the state directory).
  absl::StatusOr<CheckpointInfo> Checkpoint(bool touch = true, const std::string& shared_dir = "");
  // Replaces parameters, state, step and hyperparameters with the last checkpoint's, atomically.
  absl::StatusOr<int64_t> Restore();

  // The latest analysis figures of each analyzed matrix tensor, in session order (DESIGN.md,
  // "Metrics"); empty until the first analysis (every config.analysis_interval() steps) is done.
  std::vector<v1::TensorAnalysis> Analysis();
  // Takes the analyzer's figures for `step` and exports them, unless the session is retired or a
  // Restore came after the snapshot (`restores` counts the Restores before it was taken).
  void PublishAnalysis(int64_t step, int64_t restores, std::vector<v1::TensorAnalysis> figures);
  // Removes the session's metric series for good: the session is being deleted or unloaded.
  void Retire();
  // Counts non-finite gradient values a worker sent (optd_nonfinite_gradients_total), unless
  // the session is retired.
  void CountNonFinite(int64_t values);
  // The optimizer label of its step metrics: its matrix groups' presets joined by '+', or
  // "adamw" when it has no matrix tensor.
  const std::string& optimizer_label() const { return optimizer_label_; }

  // `with_tensors` adds per-tensor details and waits for a running step; without, it never
  // blocks.
  v1::SessionInfo Info(bool with_tensors);

  int64_t step() const { return step_published_.load(); }
  absl::Time last_used() const { return absl::FromUnixNanos(last_used_ns_.load()); }
  void Touch();
  // Called by SessionManager::Delete: aborts a pending step and refuses every later call and
  // checkpoint, so that nothing of this session is written after its directory is removed.
  void MarkDeleted();

 private:
  Session(Backend& backend, std::string id, v1::SessionConfig config, std::string token_digest,
          SessionOptions options);

  absl::Status Initialize(std::unique_ptr<Optimizer> optimizer);
  absl::Status CheckStepHeaderLocked(const v1::StepHeader& header)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckUsableLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::shared_ptr<StepOutcome>> CommitLocked(const v1::StepHeader& header)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ApplyLocked(const v1::StepHeader& header, const std::vector<int>& present,
                           StepOutcome& outcome) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Fills the outcome's values (new parameters, or the delta from the old ones it holds).
  absl::Status ReadResultLocked(StepOutcome& outcome) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A reference for a reader outside the lock, counted in outcome->leases until it is dropped.
  static std::shared_ptr<const StepOutcome> Lease(const std::shared_ptr<StepOutcome>& outcome);
  void EndRoundLocked(absl::StatusOr<std::shared_ptr<StepOutcome>> result)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The restart checkpoint, in the state directory.
  absl::StatusOr<CheckpointInfo> CheckpointLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The session's checkpoint file under `state_dir` (created if missing); a failed write is
  // counted (optd_checkpoint_failures_total) and logged.
  absl::StatusOr<CheckpointInfo> WriteCheckpointLocked(const std::string& state_dir)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<CheckpointInfo> WriteCheckpointFileLocked(const std::string& state_dir)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A fresh optimizer holding the checkpoint at `path`, with its step and hyperparameters.
  struct Loaded;
  absl::StatusOr<Loaded> LoadCheckpoint(const std::string& path);
  absl::Status ApplyHyperparams(Optimizer& optimizer,
                                const std::map<std::string, v1::GroupHyperparams>& groups) const;
  absl::Status SetHyperparamsLocked(const std::map<std::string, v1::GroupHyperparams>& groups)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Duration straggler_timeout() const;
  // The analyzer's snapshot of one step.
  struct Snapshot;
  // With an analyzer and a step the analysis interval divides: each present matrix tensor's
  // gradient and pre-step parameters, with the analyzer's room reserved; nullopt otherwise.
  std::optional<Snapshot> StartSnapshotLocked(int64_t step, const std::vector<int>& present)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The snapshot's host buffers and one update buffer per tensor (fewer when the backend is out
  // of memory); throws std::bad_alloc when the host is.
  void AllocateSnapshotLocked(Snapshot& snapshot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // After the step: momentum, and the update recovered from the parameters; submits the job.
  absl::Status FinishSnapshotLocked(Snapshot snapshot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ExportStateLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  Backend& backend_;
  const std::string id_;
  const v1::SessionConfig config_;
  const std::string token_digest_;
  const SessionOptions options_;
  std::vector<std::string> names_;
  std::vector<int64_t> counts_;
  std::vector<DType> dtypes_;
  std::vector<int> group_of_;  // index into config_.groups() per tensor
  std::string optimizer_label_;
  int64_t state_bytes_ = 0;

  std::atomic<int64_t> step_published_{0};
  std::atomic<int64_t> checkpoint_step_published_{-1};
  std::atomic<int> workers_pending_published_{0};
  std::atomic<int64_t> last_used_ns_{0};
  std::atomic<int64_t> restores_{0};  // Restores so far: an analysis from before one is dropped

  absl::Mutex staging_mu_;
  std::vector<std::unique_ptr<TensorStaging>> free_staging_ ABSL_GUARDED_BY(staging_mu_);
  int staging_outstanding_ ABSL_GUARDED_BY(staging_mu_) = 0;

  absl::Mutex mu_;
  absl::CondVar round_done_;
  std::unique_ptr<Optimizer> optimizer_ ABSL_GUARDED_BY(mu_);
  int64_t step_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t checkpoint_step_ ABSL_GUARDED_BY(mu_) = -1;
  // Current hyperparameters per group name.
  std::map<std::string, v1::GroupHyperparams> hyperparams_ ABSL_GUARDED_BY(mu_);
  absl::Status damaged_ ABSL_GUARDED_BY(mu_);
  bool deleted_ ABSL_GUARDED_BY(mu_) = false;
  // The lr override of the pending step, set by its first contribution.
  std::optional<double> round_lr_ ABSL_GUARDED_BY(mu_);
  // Streams waiting on each worker's contribution (its first attempt and any retries).
  std::map<int, int> waiters_ ABSL_GUARDED_BY(mu_);
  // The pending step: contributions by worker id, the deadline set by the first, and a round
  // number that changes when the step commits or aborts.
  std::map<int, std::unique_ptr<TensorStaging>> contributions_ ABSL_GUARDED_BY(mu_);
  absl::Time round_deadline_ ABSL_GUARDED_BY(mu_);
  int64_t round_ ABSL_GUARDED_BY(mu_) = 0;
  // How the last round ended (its number and outcome or abort status).
  int64_t finished_round_ ABSL_GUARDED_BY(mu_) = -1;
  absl::StatusOr<std::shared_ptr<StepOutcome>> finished_result_ ABSL_GUARDED_BY(mu_);
  // The last completed step's outcome, for retries, and the one before it, whose buffers the next
  // step reuses once nobody streams it any more (no page faults on the hot path).
  std::shared_ptr<StepOutcome> last_outcome_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<StepOutcome> spare_outcome_ ABSL_GUARDED_BY(mu_);
  // Separate from mu_ so that GetAnalysis never waits for a step.
  absl::Mutex analysis_mu_;
  std::vector<v1::TensorAnalysis> analysis_ ABSL_GUARDED_BY(analysis_mu_);
  bool retired_ ABSL_GUARDED_BY(analysis_mu_) = false;
};

}  // namespace optd::server

#endif  // OPTD_SERVER_SESSION_H_
