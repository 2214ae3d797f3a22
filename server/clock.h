// The time seam (after leveldb's Env, which holds it beside the file system: server/file_system.h).
// Straggler deadlines, idle times and the stream watchdog read time through a Clock, so that tests
// drive them with a fake one (tests/server/fake_clock.h) instead of sleeping in real time.
#ifndef OPTD_SERVER_CLOCK_H_
#define OPTD_SERVER_CLOCK_H_

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace optd::server {

// Implementations are thread-safe.
class Clock {
 public:
  virtual ~Clock() = default;

  virtual absl::Time Now() = 0;

  // Waits on `cv` until it is signalled or `timeout` of this clock's time has passed; it may
  // return earlier (callers re-check their condition and deadline against Now()).
  virtual void WaitFor(absl::CondVar& cv, absl::Mutex& mu, absl::Duration timeout)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) = 0;
};

// The process's real clock (absl::Now); lives for the whole program.
Clock& RealClock();

}  // namespace optd::server

#endif  // OPTD_SERVER_CLOCK_H_
