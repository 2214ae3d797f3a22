#include "server/step_round.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/host_math.h"

namespace optd::server {

StepRound::StepRound(absl::Mutex& mu, Options options) : mu_(mu), options_(std::move(options)) {}

absl::StatusOr<StepRound::Ticket> StepRound::Join(int worker, int64_t step,
                                                  std::optional<double> lr,
                                                  std::unique_ptr<TensorStaging> gradients,
                                                  const std::function<bool()>& cancelled,
                                                  absl::Span<const std::string> names) {
  mu_.AssertHeld();
  Ticket ticket;
  ticket.round = round_;
  if (contributions_.contains(worker)) {
    // A retry of a contribution already counted: it waits for the step without counting again.
    GiveBack(std::move(gradients));
    ticket.replayed = true;
    return ticket;
  }
  if (!contributions_.empty()) {
    const auto& [first_worker, first] = *contributions_.begin();
    if (first->PresentTensors() != gradients->PresentTensors()) {
      std::vector<std::string> mine, theirs;
      for (int t : gradients->PresentTensors()) mine.push_back(names[t]);
      for (int t : first->PresentTensors()) theirs.push_back(names[t]);
      GiveBack(std::move(gradients));
      return absl::InvalidArgumentError(absl::StrCat(
          "worker ", worker, " sent gradients for {", absl::StrJoin(mine, ", "), "} but worker ",
          first_worker, " sent {", absl::StrJoin(theirs, ", "), "} for step ", step,
          " of session '", options_.session_id, "'; every worker must send the same tensors"));
    }
    if (lr != lr_) {
      GiveBack(std::move(gradients));
      return absl::InvalidArgumentError(absl::StrCat(
          "worker ", worker, " sent lr ", lr ? absl::StrCat(*lr) : "none", " but worker ",
          first_worker, " sent lr ", lr_ ? absl::StrCat(*lr_) : "none", " for step ", step,
          " of session '", options_.session_id, "'; every worker must send the same"));
    }
  }
  if (cancelled()) {
    GiveBack(std::move(gradients));
    return absl::CancelledError("the step call was cancelled before its gradients counted");
  }
  if (contributions_.empty()) {
    step_ = step;
    lr_ = lr;
    deadline_ = options_.clock->Now() + options_.straggler_timeout;
  }
  contributions_[worker] = std::move(gradients);
  Publish();
  ticket.complete = static_cast<int>(contributions_.size()) == options_.world_size;
  return ticket;
}

absl::StatusOr<std::shared_ptr<StepOutcome>> StepRound::Wait(
    const Ticket& ticket, int worker, const std::function<bool()>& cancelled) {
  mu_.AssertHeld();
  ++waiters_[worker];
  while (round_ == ticket.round) {
    // Cancellation is polled in real time; the deadline is the clock's.
    const absl::Duration poll = absl::Milliseconds(50);
    const absl::Duration left = deadline_ - options_.clock->Now();
    options_.clock->WaitFor(done_, mu_, std::min(poll, std::max(left, absl::ZeroDuration())));
    if (round_ != ticket.round) break;
    if (cancelled()) {
      // Withdraw only when no other stream of this worker (an earlier attempt or a retry) still
      // waits on the contribution.
      if (--waiters_[worker] == 0) {
        waiters_.erase(worker);
        auto it = contributions_.find(worker);
        if (it != contributions_.end()) {
          GiveBack(std::move(it->second));
          contributions_.erase(it);
        }
        Publish();
      }
      return absl::CancelledError(
          absl::StrCat("the step call was cancelled while waiting for the other workers; worker ",
                       worker, "'s gradients for step ", step_, " are withdrawn"));
    }
    if (options_.clock->Now() >= deadline_) {
      std::vector<int> missing;
      for (int w = 0; w < options_.world_size; ++w) {
        if (!contributions_.contains(w)) missing.push_back(w);
      }
      End(absl::AbortedError(absl::StrCat(
          "step ", step_, " of session '", options_.session_id, "' aborted: worker(s) ",
          absl::StrJoin(missing, ", "), " sent no gradients within the straggler timeout of ",
          absl::FormatDuration(options_.straggler_timeout), "; nothing was applied")));
      break;
    }
  }
  if (finished_round_ != ticket.round) {
    return absl::InternalError("step round bookkeeping lost a round");
  }
  return finished_result_;
}

void StepRound::End(absl::StatusOr<std::shared_ptr<StepOutcome>> result) {
  mu_.AssertHeld();
  for (auto& [worker, staging] : contributions_) GiveBack(std::move(staging));
  contributions_.clear();
  waiters_.clear();
  Publish();
  finished_round_ = round_;
  finished_result_ = std::move(result);
  ++round_;
  done_.SignalAll();
}

void StepRound::Abort(const absl::Status& status) {
  mu_.AssertHeld();
  if (!contributions_.empty()) End(status);
}

bool StepRound::pending() const {
  mu_.AssertHeld();
  return !contributions_.empty();
}

const std::map<int, std::unique_ptr<TensorStaging>>& StepRound::contributions() const {
  mu_.AssertHeld();
  return contributions_;
}

absl::Span<const float> StepRound::MeanInFirst(int t, int64_t count) {
  mu_.AssertHeld();
  mean_inputs_.clear();  // kept between calls: no allocation per tensor on the step's path
  for (const auto& [worker, staging] : contributions_) mean_inputs_.push_back(staging->data(t));
  const absl::Span<float> mean(contributions_.begin()->second->data(t), static_cast<size_t>(count));
  MeanOfWorkers(mean_inputs_, mean);
  return mean;
}

std::optional<double> StepRound::lr() const {
  mu_.AssertHeld();
  return lr_;
}

std::shared_ptr<StepOutcome> StepRound::NewOutcome() {
  mu_.AssertHeld();
  std::shared_ptr<StepOutcome> outcome;
  if (spare_outcome_ != nullptr && spare_outcome_->leases.load(std::memory_order_acquire) == 0) {
    // No reader is left (their last reads happen before this load), so the buffers can be
    // overwritten; sizes stay and the committing step writes every element.
    outcome = std::move(spare_outcome_);
    outcome->step = 0;
    outcome->skipped = false;
    outcome->tensors_updated = 0;
    outcome->nonfinite_values = 0;
    outcome->checkpoint_error.clear();
  } else {
    outcome = std::make_shared<StepOutcome>();
  }
  spare_outcome_ = nullptr;
  return outcome;
}

void StepRound::Completed(std::shared_ptr<StepOutcome> outcome) {
  mu_.AssertHeld();
  spare_outcome_ = std::move(last_outcome_);
  last_outcome_ = std::move(outcome);
}

void StepRound::DropOutcomes() {
  mu_.AssertHeld();
  last_outcome_ = nullptr;
  spare_outcome_ = nullptr;
}

std::shared_ptr<const StepOutcome> StepRound::LastOutcome() {
  mu_.AssertHeld();
  return last_outcome_ == nullptr ? nullptr : Lease(last_outcome_);
}

bool StepRound::has_last_outcome() const {
  mu_.AssertHeld();
  return last_outcome_ != nullptr;
}

std::shared_ptr<const StepOutcome> StepRound::Lease(const std::shared_ptr<StepOutcome>& outcome) {
  outcome->leases.fetch_add(1, std::memory_order_relaxed);
  return std::shared_ptr<const StepOutcome>(outcome.get(), [keep = outcome](const StepOutcome*) {
    keep->leases.fetch_sub(1, std::memory_order_release);
  });
}

void StepRound::GiveBack(std::unique_ptr<TensorStaging> staging) {
  if (staging != nullptr && options_.on_give_back) options_.on_give_back(staging.get());
  options_.staging->Release(std::move(staging));
}

void StepRound::Publish() { workers_pending_ = static_cast<int>(contributions_.size()); }

}  // namespace optd::server
