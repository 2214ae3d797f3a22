// Deadlines for the phases of a streaming call that wait on its client: a stream whose header
// does not arrive in time, or whose client stops sending or reading, is cancelled
// (ServerContext::TryCancel), which ends the blocked Read or Write and frees the handler's thread.
// The synchronous API has no read deadline of its own.
#ifndef OPTD_SERVER_STREAM_WATCHDOG_H_
#define OPTD_SERVER_STREAM_WATCHDOG_H_

#include <cstdint>
#include <map>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/server_context.h"
#include "server/clock.h"

namespace optd::server {

class StreamWatchdog {
 public:
  // `clock` (default RealClock()) decides when a deadline has passed.
  explicit StreamWatchdog(Clock* clock = nullptr);
  // Cancels nothing more; REQUIRES: no Watch outlives it.
  ~StreamWatchdog();
  StreamWatchdog(const StreamWatchdog&) = delete;
  StreamWatchdog& operator=(const StreamWatchdog&) = delete;

  // One call's deadline. Unarmed when made, and disarmed when destroyed: TryCancel is never
  // called on a context after its Watch is gone.
  class Watch {
   public:
    Watch(StreamWatchdog& watchdog, grpc::ServerContext* context);
    ~Watch();
    Watch(const Watch&) = delete;
    Watch& operator=(const Watch&) = delete;

    // The call is cancelled unless Arm or Disarm is called again within `timeout`.
    void Arm(absl::Duration timeout);
    void Disarm();
    // Whether the watchdog cancelled the call.
    bool fired() const;

   private:
    StreamWatchdog& watchdog_;
    const int64_t id_;
  };

 private:
  struct Entry {
    grpc::ServerContext* context = nullptr;
    absl::Time deadline = absl::InfiniteFuture();
    bool fired = false;
  };
  void Run();

  Clock& clock_;
  mutable absl::Mutex mu_;
  absl::CondVar changed_;  // an earlier deadline, or stop
  std::map<int64_t, Entry> entries_ ABSL_GUARDED_BY(mu_);
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 0;
  // Bumped by an Arm that sets a deadline before the one Run sleeps until, so it re-reads them.
  int64_t changes_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time sleeping_until_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace optd::server

#endif  // OPTD_SERVER_STREAM_WATCHDOG_H_
