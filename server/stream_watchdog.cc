#include "server/stream_watchdog.h"

#include <algorithm>

namespace optd::server {

StreamWatchdog::StreamWatchdog(Clock* clock)
    : clock_(clock != nullptr ? *clock : RealClock()), thread_([this] { Run(); }) {}

StreamWatchdog::~StreamWatchdog() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    changed_.Signal();
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
  const absl::Time deadline = watchdog_.clock_.Now() + timeout;
  watchdog_.entries_[id_].deadline = deadline;
  if (deadline < watchdog_.sleeping_until_) {
    ++watchdog_.changes_;
    watchdog_.changed_.Signal();
  }
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
    const absl::Time now = clock_.Now();
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
    while (!stop_ && changes_ == seen) {
      const absl::Duration left = next - clock_.Now();
      if (left <= absl::ZeroDuration()) break;
      clock_.WaitFor(changed_, mu_, left);
    }
  }
}

}  // namespace optd::server
