#include "server/result_progress.h"

#include <utility>

namespace optd::server {

void ResultProgress::Reset(int num_tensors) {
  absl::MutexLock lock(&mu_);
  order_.clear();
  order_.reserve(static_cast<size_t>(num_tensors));
  ready_.assign(static_cast<size_t>(num_tensors), 0);
  done_ = false;
  status_ = absl::OkStatus();
}

void ResultProgress::Ready(int tensor) {
  absl::MutexLock lock(&mu_);
  if (done_ || tensor < 0 || static_cast<size_t>(tensor) >= ready_.size() || ready_[tensor]) {
    return;
  }
  ready_[tensor] = 1;
  order_.push_back(tensor);
}

void ResultProgress::Finish(absl::Status status) {
  absl::MutexLock lock(&mu_);
  if (done_) return;
  done_ = true;
  status_ = std::move(status);
  if (!status_.ok()) return;
  for (size_t t = 0; t < ready_.size(); ++t) {
    if (!ready_[t]) order_.push_back(static_cast<int>(t));
    ready_[t] = 1;
  }
}

absl::StatusOr<std::optional<int>> ResultProgress::Next(size_t i) const {
  absl::MutexLock lock(&mu_);
  auto there = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return done_ || i < order_.size(); };
  mu_.Await(absl::Condition(&there));
  // A failed step's results are not the step's: none is sent after its failure is known.
  if (!status_.ok()) return status_;
  if (i < order_.size()) return order_[i];
  return std::nullopt;
}

std::vector<int> ResultProgress::final_so_far() const {
  absl::MutexLock lock(&mu_);
  return order_;
}

}  // namespace optd::server
