#include "server/snapshot_progress.h"

namespace optd::server {

void SnapshotProgress::Copied(int index, int64_t end) {
  absl::MutexLock lock(&mu_);
  if (index > index_ || (index == index_ && end > end_)) {
    index_ = index;
    end_ = end;
  }
}

void SnapshotProgress::Finish(absl::Status status) {
  absl::MutexLock lock(&mu_);
  if (done_) return;
  done_ = true;
  status_ = std::move(status);
}

absl::Status SnapshotProgress::WaitFor(int index, int64_t end) {
  absl::MutexLock lock(&mu_);
  auto there = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return done_ || index_ > index || (index_ == index && end_ >= end);
  };
  mu_.Await(absl::Condition(&there));
  // A finished copy that failed stopped somewhere before: nothing of it is sent.
  return done_ ? status_ : absl::OkStatus();
}

void SnapshotProgress::WaitDone() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(&done_));
}

}  // namespace optd::server
