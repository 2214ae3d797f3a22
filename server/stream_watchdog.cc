#include "server/stream_watchdog.h"

#include <algorithm>

namespace optd::server {

StreamWatchdog::StreamWatchdog() : thread_([this] { Run(); }) {}

StreamWatchdog::~StreamWatchdog() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

StreamWatchdog::Watch::Watch(StreamWatchdog& watchdog, grpc::ServerContext* context)
    : watchdog_(watchdog), id_([&] {
        absl::MutexLock lock(&watchdog.mu_);
        const int64_t id = watchdog.next_id_++;
        watchdog.entries_[id].context = context;
        return id;
      }()) {}

StreamWatchdog::Watch::~Watch() {
  absl::MutexLock lock(&watchdog_.mu_);
  watchdog_.entries_.erase(id_);
}

void StreamWatchdog::Watch::Arm(absl::Duration timeout) {
  absl::MutexLock lock(&watchdog_.mu_);
  const absl::Time deadline = absl::Now() + timeout;
  watchdog_.entries_[id_].deadline = deadline;
  if (deadline < watchdog_.sleeping_until_) ++watchdog_.changes_;
}

void StreamWatchdog::Watch::Disarm() {
  absl::MutexLock lock(&watchdog_.mu_);
  watchdog_.entries_[id_].deadline = absl::InfiniteFuture();
}

bool StreamWatchdog::Watch::fired() const {
  absl::MutexLock lock(&watchdog_.mu_);
  return watchdog_.entries_.at(id_).fired;
}

void StreamWatchdog::Run() {
  absl::MutexLock lock(&mu_);
  while (!stop_) {
    const absl::Time now = absl::Now();
    absl::Time next = absl::InfiniteFuture();
    for (auto& [id, entry] : entries_) {
      if (entry.fired) continue;
      if (entry.deadline <= now) {
        // Under mu_: the Watch, and so the call, cannot be gone meanwhile.
        entry.context->TryCancel();
        entry.fired = true;
      } else {
        next = std::min(next, entry.deadline);
      }
    }
    // Sleep until the earliest deadline, or until an Arm may have set an earlier one.
    const int64_t seen = changes_;
    sleeping_until_ = next;
    auto woken = [this, seen]()
                     ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || changes_ != seen; };
    mu_.AwaitWithDeadline(absl::Condition(&woken), next);
  }
}

}  // namespace optd::server
