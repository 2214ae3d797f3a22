#include "server/clock.h"

namespace optd::server {
namespace {

class Real final : public Clock {
 public:
  absl::Time Now() override { return absl::Now(); }
  void WaitFor(absl::CondVar& cv, absl::Mutex& mu, absl::Duration timeout) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    cv.WaitWithTimeout(&mu, timeout);
  }
};

}  // namespace

Clock& RealClock() {
  static Real* const clock = new Real;
  return *clock;
}

}  // namespace optd::server
