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
// The parts (a gradient's path: OptimizerService::Step -> Session::Step -> StepRound::Join, then
// the last worker's CommitLocked -> Optimizer::Step -> StepRound::End):
//   server/step_round.h          the pending step: contributions, waiters, straggler deadline,
//                                outcome buffers
//   server/step_pipeline.h       tensors stepped ahead while the step's gradients arrive
//   server/snapshot_progress.h   GetParams' snapshot, sent while it is copied
//   server/session_checkpoint.h  the checkpoint file: write and load
//   server/reshard.h             a session restored from other instances' checkpoints
//   server/analyzer.h            the analysis snapshot a step takes (BeginSnapshot/Finish)
// The session owns the lock they run under and the lifecycle.
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
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kernels/backend.h"
#include "kernels/optimizer.h"
#include "optd/v1/checkpoint.pb.h"
#include "optd/v1/optd.pb.h"
#include "server/analyzer.h"
#include "server/clock.h"
#include "server/file_system.h"
#include "server/metrics.h"
#include "server/reshard.h"
#include "server/session_checkpoint.h"
#include "server/shared_memory.h"
#include "server/snapshot_progress.h"
#include "server/state_transfer.h"
#include "server/step_pipeline.h"
#include "server/step_round.h"
#include "server/tensor_staging.h"

namespace optd::server {

struct SessionOptions {
  // Where checkpoints go; empty: Checkpoint and Restore fail with FailedPrecondition.
  std::string state_dir;
  FileSystem* fs = nullptr;  // REQUIRED when state_dir is set
  Clock* clock = nullptr;    // default: RealClock()
  // Straggler timeout for sessions whose config leaves it 0.
  absl::Duration default_straggler_timeout = absl::Seconds(60);
  // Where the session's series go and who analyzes it; either may be null (then it has none).
  Metrics* metrics = nullptr;
  Analyzer* analyzer = nullptr;
  // The daemon's pipeline threads and scratch budget; null: every step runs serially.
  Pipeliner* pipeliner = nullptr;
  // Early results (Session::Step's `on_decided`): a step whose results are at least this many
  // bytes (fp32) streams each tensor's result as soon as it is final, while the commit computes
  // the rest; -1: none does. Set for backends whose work runs as it is enqueued (the CPU's).
  int64_t early_results_min_bytes = -1;
};

struct StepReply {
  std::shared_ptr<const StepOutcome> outcome;
  // The caller's contribution had already been counted, or the step had already run: this is
  // the result the first attempt produced.
  bool replayed = false;
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
  int num_tensors() const { return index_->size(); }
  // NotFound naming the session and the tensor.
  absl::StatusOr<int> FindTensor(absl::string_view name) const;
  int64_t num_elements(int tensor) const { return counts_[tensor]; }
  DType tensor_dtype(int tensor) const { return dtypes_[tensor]; }
  const std::string& tensor_name(int tensor) const { return index_->name(tensor); }

  // A staging area for one stream of gradients or parameters; give it back with
  // ReleaseStaging (or hand it to Step) so its memory is reused; GetParams reads through one as
  // well. At most world_size + 1 are out
  // at once: Unavailable beyond (a client retrying far too eagerly).
  absl::StatusOr<std::unique_ptr<TensorStaging>> AcquireStaging();
  void ReleaseStaging(std::unique_ptr<TensorStaging> staging);

  // Per-tensor pipelining (server/step_pipeline.h). A Step stream whose header passed
  // CheckStepHeader offers its staging before the gradients arrive; true when it takes part, and
  // then it reports each tensor as it completes with TensorArrived. The step's result is the
  // serial path's, bit for bit, either way.
  bool BeginPipelined(const v1::StepHeader& header, TensorStaging* staging);
  void TensorArrived(TensorStaging* staging, int tensor);
  // Tensors of the pending step already stepped ahead into their shadows (waits for a tensor
  // being prepared); for tests and diagnostics.
  int PreparedTensors();
  // Tensors the session's steps updated ahead of their last gradient, so far (no lock needed).
  int64_t tensors_stepped_ahead() const { return tensors_stepped_ahead_.load(); }

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
  //
  // Early results: when this worker's gradients complete the step and the step qualifies (its
  // results at least early_results_min_bytes, no checkpoint or analysis snapshot due),
  // `on_decided` (when given) is called on this thread, under the session's lock, once every
  // gradient has passed its checks — from then on the step commits unless the backend itself
  // fails — with the outcome whose summary is complete and whose `progress` says which results
  // are final; it must return at once (the caller streams them from another thread). Step then
  // returns the same outcome when the commit is done, or its Internal error (`progress` finishes
  // with it either way). The other workers' calls return the outcome once the step committed.
  absl::StatusOr<StepReply> Step(const v1::StepHeader& header,
                                 std::unique_ptr<TensorStaging> gradients,
                                 const std::function<bool()>& cancelled,
                                 const std::function<void(StepReply)>& on_decided = nullptr);

  // Worker `worker`'s shared-memory region (optd.proto, AttachSharedMemory), created the first
  // time it is asked for; the same one after. FailedPrecondition when the session was created
  // without shared_memory; InvalidArgument for a worker outside [0, world_size).
  absl::StatusOr<std::shared_ptr<const SharedRegion>> AttachSharedMemory(int worker);
  // The region worker `worker` attached, or null.
  std::shared_ptr<const SharedRegion> SharedMemory(int worker);

  // Replaces the parameters of every tensor present in `values` (complete, finite) at once.
  absl::Status SetParameters(const TensorStaging& values);
  // The parameters of `tensors`, all of one step, into their buffers of `into` (one of this
  // session's AcquireStaging buffers), copied under the session's lock on a pipeline thread
  // where the daemon has one and the backend's memory is the host's (else here, before this
  // returns), with `progress` told of each piece: the caller reads what is copied
  // (SnapshotProgress::WaitFor), and waits for WaitDone before `into` or `progress` goes.
  // REQUIRES: the caller holds a reference to this session until the copy is done.
  void SnapshotParameters(std::vector<int> tensors, TensorStaging& into,
                          SnapshotProgress& progress);

  // All updates are checked before any is applied. InvalidArgument names the group and value.
  absl::Status UpdateHyperparams(const v1::UpdateHyperparamsRequest& request);

  // `touch` false: a checkpoint that does not count as use (the idle-session reaper's).
  // `shared_dir` (the instance's directory in the shared state root): a copy goes there too, for
  // other instances to restore from when the session is resharded (only there when the daemon
  // has no state directory; once when it is the state directory).
  absl::StatusOr<CheckpointInfo> Checkpoint(bool touch = true, const std::string& shared_dir = "");
  // Replaces parameters, state, step and hyperparameters with the last checkpoint's, atomically.
  absl::StatusOr<int64_t> Restore();

  // AddTensors (optd.v1): a new session of `extended` (this session's config with more tensors
  // after its own, and groups for them; NormalizeSessionConfig passed) holding this session's
  // tensors as they are (parameters, state, applied steps), its step and hyperparameters, the
  // new tensors at their `init`. This session then ends: a pending step is aborted and every
  // later call is refused with Unavailable (a retry finds the new session). Copied under the
  // session's lock, so no step commits in between. FailedPrecondition for a damaged session.
  absl::StatusOr<std::unique_ptr<Session>> Extend(v1::SessionConfig extended);

  // ExportState (optd.v1): `write` gets the header, then every record (the parameters only when
  // `parameters`) in chunks of at most `chunk_elements` values, each copied under the session's
  // lock and written without it. Aborted when anything commits between two chunks (a step, an
  // upload, new hyperparameters, a restore or import); Cancelled when `write` returns false.
  absl::Status ExportState(int64_t chunk_elements, bool parameters,
                           absl::FunctionRef<bool(const v1::ExportStateResponse&)> write);
  // ImportState (optd.v1): BeginImport checks `header` and allocates the state the chunks go into
  // (StateImport::Begin; like Restore's, outside the session's quota), one import per session at
  // a time (FailedPrecondition for another); the caller adds the chunks and hands it to
  // CommitImport, which replaces the session's state with it whole, aborts a pending step, and
  // checkpoints when the daemon has a state directory.
  absl::StatusOr<std::unique_ptr<StateImport>> BeginImport(const v1::StateHeader& header);
  absl::StatusOr<v1::ImportStateResponse> CommitImport(std::unique_ptr<StateImport> import);

  // The latest analysis figures of each analyzed matrix tensor, in session order (DESIGN.md,
  // "Metrics"); empty until the first analysis (every config.analysis_interval() steps) is done.
  std::vector<v1::TensorAnalysis> Analysis();
  // The current auto-mode choices of every tensor with an auto mode, in session order, as of the
  // last step (kernels/auto_choice.h); empty for a session without auto modes.
  std::vector<v1::TensorChoices> Choices();
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

  // Takes the optimizer and its hyperparameters (the config's, then `hyperparams` over them) at
  // `step`; `checkpointed`: that step is on disk.
  absl::Status Initialize(SessionState state, bool checkpointed);
  absl::Status CheckStepHeaderLocked(const v1::StepHeader& header)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckUsableLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `on_decided`: Step's, or null.
  absl::StatusOr<std::shared_ptr<StepOutcome>> CommitLocked(
      const v1::StepHeader& header, const std::function<void(StepReply)>& on_decided)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ApplyLocked(const v1::StepHeader& header, const std::vector<int>& present,
                           const std::shared_ptr<StepOutcome>& outcome,
                           const std::function<void(StepReply)>& on_decided)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether step `step`, with results of `result`, streams them early (Step's `on_decided`).
  bool EarlyResults(int64_t step, v1::StepResult result) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether committing step `step` writes the periodic checkpoint.
  bool CheckpointDue(int64_t step) const;
  // Fills the outcome's values (new parameters, or the delta from the old ones it holds) of
  // every tensor `filled` leaves false.
  absl::Status ReadResultLocked(StepOutcome& outcome, const std::vector<char>& filled)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // ReadResultLocked of tensor `t` alone (no allocation: result_scratch_ is sized before).
  absl::Status ReadResultOfLocked(StepOutcome& outcome, int t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleaseStagingLocked(std::unique_ptr<TensorStaging> staging)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether step `step` takes an analysis snapshot (it then runs serially).
  bool AnalysisStep(int64_t step) const;
  // Reserves shadows in the pipeline budget for the tensors that have none yet and fit; whether
  // any tensor has them.
  bool ReserveShadowsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // optd_backend_memory_bytes{kind="pipeline"}: the daemon's reserved pipeline scratch.
  void ExportPipelineScratch();
  // A pipeline thread's run: prepares the ready tensors one at a time, the lock taken for each.
  void RunPipeline();
  // Steps tensor `tensor` ahead on the workers' mean and writes its result into `outcome`.
  absl::Status PrepareLocked(int tensor, std::optional<double> lr, StepOutcome& outcome)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Replaces optimizer, step and hyperparameters with `state` (Restore, CommitImport): a pending
  // step is aborted, saying the session `what`; prepared work, kept results and analyses go.
  void ReplaceStateLocked(SessionState state, absl::string_view what)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The restart checkpoint, in the state directory.
  absl::StatusOr<CheckpointInfo> CheckpointLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The session's checkpoint file under `state_dir` (created if missing); a failed write is
  // counted (optd_checkpoint_failures_total) and logged.
  absl::StatusOr<CheckpointInfo> WriteCheckpointLocked(const std::string& state_dir)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Duration straggler_timeout() const;
  Clock& clock() const { return options_.clock != nullptr ? *options_.clock : RealClock(); }
  // With an analyzer and a step the analysis interval divides: a snapshot of each present matrix
  // tensor (gradient now, momentum and update after the step), with the update captured by the
  // step; nullopt otherwise.
  // SnapshotParameters' copy, wherever it runs.
  absl::Status CopySnapshot(const std::vector<int>& tensors, TensorStaging& into,
                            SnapshotProgress& progress);
  std::optional<PendingSnapshot> BeginSnapshotLocked(int64_t step, const std::vector<int>& present)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status FinishSnapshotLocked(PendingSnapshot snapshot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ExportStateLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  Backend& backend_;
  const std::string id_;
  const v1::SessionConfig config_;
  const std::string token_digest_;
  const SessionOptions options_;
  const std::shared_ptr<const TensorIndex> index_;  // shared with every staging buffer
  std::vector<int64_t> counts_;
  std::vector<DType> dtypes_;
  std::vector<int> group_of_;  // index into config_.groups() per tensor
  std::string optimizer_label_;
  int64_t state_bytes_ = 0;

  std::atomic<int64_t> step_published_{0};
  std::atomic<int64_t> checkpoint_step_published_{-1};
  std::atomic<int64_t> last_used_ns_{0};
  std::atomic<int64_t> restores_{0};
  std::atomic<int64_t> tensors_stepped_ahead_{
      0};  // Restores so far: an analysis from before one is dropped

  StagingPool staging_;

  absl::Mutex mu_;
  std::unique_ptr<Optimizer> optimizer_ ABSL_GUARDED_BY(mu_);
  int64_t step_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t checkpoint_step_ ABSL_GUARDED_BY(mu_) = -1;
  // Current hyperparameters per group name.
  std::map<std::string, v1::GroupHyperparams> hyperparams_ ABSL_GUARDED_BY(mu_);
  absl::Status damaged_ ABSL_GUARDED_BY(mu_);
  bool importing_ ABSL_GUARDED_BY(mu_) = false;  // an ImportState is underway
  bool extended_ ABSL_GUARDED_BY(mu_) = false;   // Extend made its successor
  bool deleted_ ABSL_GUARDED_BY(mu_) = false;
  // Bumped by everything that changes the tensors other than a step (parameters, hyperparameters,
  // a restore): prepared work from before is not used.
  int64_t state_epoch_ ABSL_GUARDED_BY(mu_) = 0;
  // Per tensor: its shadows are reserved in the pipeline budget; the bytes reserved.
  std::vector<char> shadowed_ ABSL_GUARDED_BY(mu_);
  int64_t shadow_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<float> result_scratch_ ABSL_GUARDED_BY(mu_);  // a delta's new parameters
  std::vector<float> mean_scratch_ ABSL_GUARDED_BY(mu_);    // the workers' mean, world_size > 1
  std::vector<float> before_scratch_ ABSL_GUARDED_BY(mu_);  // old parameters, for a delta
  // The pipelined step (before round_, which reports the stagings it gives back to it).
  StepPipeline pipeline_;
  // The pending step and the outcome buffers; runs under mu_.
  StepRound round_;
  // The workers' shared-memory regions (null until attached); separate from mu_ so that
  // attaching never waits for a step.
  absl::Mutex shared_mu_;
  std::vector<std::shared_ptr<const SharedRegion>> shared_regions_ ABSL_GUARDED_BY(shared_mu_);
  // Separate from mu_ so that GetAnalysis never waits for a step.
  absl::Mutex analysis_mu_;
  std::vector<v1::TensorAnalysis> analysis_ ABSL_GUARDED_BY(analysis_mu_);
  std::vector<v1::TensorChoices> choices_ ABSL_GUARDED_BY(analysis_mu_);
  bool retired_ ABSL_GUARDED_BY(analysis_mu_) = false;
};

}  // namespace optd::server

#endif  // OPTD_SERVER_SESSION_H_
