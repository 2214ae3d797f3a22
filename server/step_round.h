// The step round: the aggregator of one session's step protocol (../shared/DESIGN.md, "One step,
// as data"; ../shared/STYLE.md). The pending step collects one contribution (a complete staging of
// gradients) per worker and ends exactly once: committed by the session when the last worker's
// contribution completes it, or aborted (straggler timeout, Restore, deletion). A worker that
// retries a contribution already counted is not counted again and waits for the same end; a
// worker whose every waiting call is cancelled withdraws its contribution.
//
// The round also keeps the outcome buffers: the last completed step's outcome, for retries, and
// the one before it, whose buffers the next step reuses once no reader holds a lease on it (no
// page faults on the hot path).
//
// Locking: the round has no lock of its own; every method but workers_pending() requires the
// lock of the session that owns it (given at construction), so that a round ends under the same
// lock as the step it commits.
#ifndef OPTD_SERVER_STEP_ROUND_H_
#define OPTD_SERVER_STEP_ROUND_H_

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
#include "absl/types/span.h"
#include "optd/v1/optd.pb.h"
#include "server/clock.h"
#include "server/result_progress.h"
#include "server/tensor_staging.h"

namespace optd::server {

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
  // When the optimizer began (the workers' mean taken) and when the result was ready: real time,
  // as every duration the metrics measure (the service's phases are differences with it).
  absl::Time compute_started;
  absl::Time compute_finished;
  // Which of `values` are final: all of them once the step has committed, and before that, for
  // the worker whose stream streams results early (Session::Step's `on_decided`), those so far.
  ResultProgress progress;
  // Readers outside the session (StepReply) that may still read `values`. The round reuses the
  // buffers only once it reads 0: each reader's release pairs with that acquire load.
  std::atomic<int> leases{0};
};

class StepRound {
 public:
  struct Options {
    std::string session_id;  // for messages
    int world_size = 1;
    absl::Duration straggler_timeout = absl::Seconds(60);
    Clock* clock = nullptr;          // REQUIRED
    StagingPool* staging = nullptr;  // REQUIRED: where contributions go back once the round ends
    // Called with each staging the round gives back to the pool, before it does (under the
    // session's lock): the step pipeline forgets it.
    std::function<void(const TensorStaging*)> on_give_back;
  };

  // How a contribution joined the pending step.
  struct Ticket {
    int64_t round = 0;
    // The worker had already contributed (a retry): it waits without being counted again.
    bool replayed = false;
    // This contribution was the last one missing: the caller commits the step and calls End.
    bool complete = false;
  };

  // `mu` is the owning session's lock.
  StepRound(absl::Mutex& mu, Options options);
  StepRound(const StepRound&) = delete;
  StepRound& operator=(const StepRound&) = delete;

  // Contributes `gradients` (complete) of `worker` to step `step`, whose lr override is `lr`.
  // The first contribution opens the round and starts its straggler deadline. InvalidArgument
  // when the gradients cover other tensors (named by `names`), or the lr differs, from the
  // round's first contribution; Cancelled when `cancelled` already says so. The gradients go
  // back to the pool on every path but a counted contribution.
  absl::StatusOr<Ticket> Join(int worker, int64_t step, std::optional<double> lr,
                              std::unique_ptr<TensorStaging> gradients,
                              const std::function<bool()>& cancelled,
                              absl::Span<const std::string> names);

  // Waits until the round of `ticket` ends and returns its outcome, or its abort status. Ends
  // the round with Aborted, naming the missing workers, when the straggler deadline passes
  // first. `cancelled` is polled (every 50 ms at most): when every waiting call of `worker` is
  // cancelled, its contribution is withdrawn, and the call gets Cancelled.
  absl::StatusOr<std::shared_ptr<StepOutcome>> Wait(const Ticket& ticket, int worker,
                                                    const std::function<bool()>& cancelled);

  // Ends the pending round with `result` (its outcome, or why nothing was applied), wakes every
  // waiter and returns the contributions to the pool.
  void End(absl::StatusOr<std::shared_ptr<StepOutcome>> result);
  // Ends the pending round with `status` if one is pending.
  void Abort(const absl::Status& status);

  // Whether a round is pending (some worker has contributed).
  bool pending() const;
  // The pending round's contributions, by worker id; its first carries the mean (MeanInFirst).
  const std::map<int, std::unique_ptr<TensorStaging>>& contributions() const;
  // The workers' mean of tensor `t` (`count` elements), summed in worker order (so the result
  // does not depend on arrival order), written over the first contribution's buffer.
  absl::Span<const float> MeanInFirst(int t, int64_t count);
  // The pending step's lr override.
  std::optional<double> lr() const;

  // An outcome to fill for the committing step: the spare's buffers when no reader holds them.
  std::shared_ptr<StepOutcome> NewOutcome();
  // The step of `outcome` committed: it becomes the last outcome (retries get it) and the last
  // one becomes the spare.
  void Completed(std::shared_ptr<StepOutcome> outcome);
  // Drops the outcome buffers (out of host memory, or a Restore undid their steps).
  void DropOutcomes();
  // The last completed step's outcome, leased; null before the first step.
  std::shared_ptr<const StepOutcome> LastOutcome();
  bool has_last_outcome() const;

  // A reference for a reader outside the lock, counted in outcome->leases until it is dropped.
  static std::shared_ptr<const StepOutcome> Lease(const std::shared_ptr<StepOutcome>& outcome);

  // Workers that have contributed to the pending step; no lock needed.
  int workers_pending() const { return workers_pending_.load(); }

 private:
  void Publish() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void GiveBack(std::unique_ptr<TensorStaging> staging) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Mutex& mu_;
  const Options options_;
  absl::CondVar done_;
  std::atomic<int> workers_pending_{0};

  // Streams waiting on each worker's contribution (its first attempt and any retries).
  std::map<int, int> waiters_ ABSL_GUARDED_BY(mu_);
  // The pending step: contributions by worker id, the step, its lr override and deadline (set
  // by the first), and a round number that changes when the step commits or aborts.
  std::map<int, std::unique_ptr<TensorStaging>> contributions_ ABSL_GUARDED_BY(mu_);
  int64_t step_ ABSL_GUARDED_BY(mu_) = 0;
  std::optional<double> lr_ ABSL_GUARDED_BY(mu_);
  absl::Time deadline_ ABSL_GUARDED_BY(mu_);
  int64_t round_ ABSL_GUARDED_BY(mu_) = 0;
  // How the last round ended (its number and outcome or abort status).
  int64_t finished_round_ ABSL_GUARDED_BY(mu_) = -1;
  absl::StatusOr<std::shared_ptr<StepOutcome>> finished_result_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<StepOutcome> last_outcome_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<StepOutcome> spare_outcome_ ABSL_GUARDED_BY(mu_);
  std::vector<const float*> mean_inputs_ ABSL_GUARDED_BY(mu_);  // MeanInFirst's
};

}  // namespace optd::server

#endif  // OPTD_SERVER_STEP_ROUND_H_
