// Per-tensor pipelining of a step (../shared/DESIGN.md, "One step, as data"): while a step's
// gradients stream in, each tensor whose gradients every worker has sent is stepped ahead into
// shadow buffers (Optimizer::PrepareTensor) on a pipeline thread, so that when the last gradient
// arrives little is left but the commit — swapping the shadows in, all tensors at once — and the
// results are already in the reply's buffers.
//
// Semantics are the serial path's, bit for bit: the prepared work is used only when the step
// commits with exactly the contributions it was computed from (the same workers' stagings), the
// same learning rate, and nothing changed the session's tensors meanwhile (SetParameters,
// UpdateHyperparams, Restore: the session's state epoch); otherwise it is dropped and the step
// runs serially. A rejected or failed step changes nothing either way, since prepared work lives
// in the shadows until the commit.
//
// Pipeliner: the daemon's pipeline threads and its scratch budget (--pipeline_scratch_bytes),
// from which each session reserves its tensors' shadows (parameters and state: 2-3× the tensor)
// the first time it pipelines, first come first served, and keeps them until it goes. A tensor
// whose shadows do not fit steps serially at the commit.
//
// StepPipeline: one session's pipelined step. Locking: the arrival side (Arrived) takes only
// its own lock, so a stream is never held up by a computation; everything else requires the
// session's lock, which the computation holds, so a staging is never read after it was given
// up (Forget), and the optimizer is never touched outside the session's lock.
#ifndef OPTD_SERVER_STEP_PIPELINE_H_
#define OPTD_SERVER_STEP_PIPELINE_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "server/step_round.h"
#include "server/tensor_staging.h"

namespace optd::server {

class Pipeliner {
 public:
  struct Options {
    int64_t scratch_bytes = 0;  // 0: nothing is pipelined
    int threads = 2;
  };
  explicit Pipeliner(Options options);
  // Runs no task that has not started; waits for those that have.
  ~Pipeliner();
  Pipeliner(const Pipeliner&) = delete;
  Pipeliner& operator=(const Pipeliner&) = delete;

  // Takes `bytes` of the scratch budget; false (taking nothing) when they do not fit.
  bool Reserve(int64_t bytes);
  void Release(int64_t bytes);
  int64_t reserved_bytes() const;
  int64_t scratch_bytes() const { return options_.scratch_bytes; }

  // Runs `task` on a pipeline thread.
  void Schedule(std::function<void()> task);

 private:
  void Loop();

  const Options options_;
  mutable absl::Mutex mu_;
  absl::CondVar work_;
  int64_t reserved_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

class StepPipeline {
 public:
  struct Options {
    int world_size = 1;
    int num_tensors = 0;
  };
  // `session_mu` is the owning session's lock.
  StepPipeline(absl::Mutex& session_mu, Options options);
  StepPipeline(const StepPipeline&) = delete;
  StepPipeline& operator=(const StepPipeline&) = delete;

  // A worker's stream for `step`, before its gradients arrive into `staging`. A pipeline left
  // from an earlier step, or broken with no stream left in it, starts over for this one (the
  // optimizer's prepared tensors must then be discarded: `start_over` says so). False when this
  // stream does not take part: the worker already has one (a retry), the pipeline is broken, or
  // `lr` differs from the first stream's (the step's Join refuses one of them anyway).
  // REQUIRES: the session's lock.
  bool Register(int64_t step, int worker, TensorStaging* staging, std::optional<double> lr,
                int64_t epoch, bool& start_over);
  // Whether `staging` takes part (no lock needed: only its own stream registers it).
  bool Registered(const TensorStaging* staging);
  // Tensor `tensor` of `staging` is complete; `in_range`: the staging has found no value out of
  // range so far (so none in this tensor). True when this makes it complete for every worker
  // and no run is scheduled yet: the caller schedules one (Session::RunPipeline).
  bool Arrived(const TensorStaging* staging, int tensor, bool in_range);
  // `staging` is being given up (its stream failed or its contribution was withdrawn or
  // replaced): the prepared work is no longer the step's. REQUIRES: the session's lock.
  void Forget(const TensorStaging* staging);

  // The next tensor to prepare for `step`, or nullopt (then no run is scheduled any more) when
  // none is ready or the pipeline is not that step's, is broken, or `epoch` moved.
  // REQUIRES: the session's lock.
  std::optional<int> NextReady(int64_t step, int64_t epoch);
  // The registered workers' gradients of `tensor`, in worker order. REQUIRES: the session's lock.
  std::vector<const float*> Inputs(int tensor);
  // Whether every worker's staging found each value of `tensor` within range as it decoded it
  // (then the optimizer need not check them again). REQUIRES: the session's lock.
  bool InRange(int tensor);
  // Prepared work is not to be used. REQUIRES: the session's lock.
  void Break();
  // Whether the prepared work counts for the committing step: the pipeline's step, not broken,
  // `epoch` unchanged, `lr` the same, and exactly `contributions` (the same stagings by worker).
  // REQUIRES: the session's lock.
  bool Usable(int64_t step, int64_t epoch, std::optional<double> lr,
              const std::map<int, std::unique_ptr<TensorStaging>>& contributions);
  // The learning-rate override of the pipeline's step. REQUIRES: the session's lock.
  std::optional<double> lr();
  // The step's outcome the pipeline fills; null until the first prepared tensor.
  // REQUIRES: the session's lock.
  std::shared_ptr<StepOutcome>& outcome();

 private:
  void StartOver(int64_t step, std::optional<double> lr, int64_t epoch)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool RegisteredLocked(const TensorStaging* staging) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Mutex& session_mu_;
  const Options options_;
  absl::Mutex mu_;  // after the session's lock
  int64_t step_ ABSL_GUARDED_BY(mu_) = -1;
  int64_t epoch_ ABSL_GUARDED_BY(mu_) = 0;
  std::optional<double> lr_ ABSL_GUARDED_BY(mu_);
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool scheduled_ ABSL_GUARDED_BY(mu_) = false;
  std::map<int, TensorStaging*> workers_ ABSL_GUARDED_BY(mu_);
  std::vector<int> arrivals_ ABSL_GUARDED_BY(mu_);   // per tensor: workers complete
  std::vector<char> in_range_ ABSL_GUARDED_BY(mu_);  // per tensor: every arrival in range
  std::deque<int> ready_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<StepOutcome> outcome_ ABSL_GUARDED_BY(session_mu_);
};

}  // namespace optd::server

#endif  // OPTD_SERVER_STEP_PIPELINE_H_
