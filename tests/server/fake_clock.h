// A Clock for tests: time stands still until the test advances it. Waiters poll it every real
// millisecond, so a wait whose deadline an Advance passed returns within about that.
#ifndef OPTD_TESTS_SERVER_FAKE_CLOCK_H_
#define OPTD_TESTS_SERVER_FAKE_CLOCK_H_

#include <algorithm>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/clock.h"

namespace optd::server {

class FakeClock final : public Clock {
 public:
  explicit FakeClock(absl::Time start = absl::FromUnixSeconds(1'700'000'000)) : now_(start) {}

  absl::Time Now() override {
    absl::MutexLock lock(&mu_);
    return now_;
  }

  void Advance(absl::Duration by) {
    absl::MutexLock lock(&mu_);
    now_ += by;
  }

  void WaitFor(absl::CondVar& cv, absl::Mutex& mu, absl::Duration timeout) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (timeout <= absl::ZeroDuration()) return;
    cv.WaitWithTimeout(&mu, std::min(timeout, absl::Milliseconds(1)));
  }

 private:
  absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
};

}  // namespace optd::server

#endif  // OPTD_TESTS_SERVER_FAKE_CLOCK_H_
