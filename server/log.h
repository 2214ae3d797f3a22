// The daemon's log: one line per event on stderr, "<UTC time, microseconds> optd: <event>",
// written whole under a lock so lines of concurrent calls never interleave. Events that clients
// can cause at any rate (refused calls) go through RateLimitedLog.
#ifndef OPTD_SERVER_LOG_H_
#define OPTD_SERVER_LOG_H_

#include <cstdint>
#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace optd::server {

// Writes one event line to stderr.
void LogEvent(absl::string_view event);

// Writes at most one line per key and period: the first event of a period as it comes, and the
// number suppressed since with the next line written for that key.
class RateLimitedLog {
 public:
  explicit RateLimitedLog(absl::Duration period) : period_(period) {}

  void Log(absl::string_view key, absl::string_view event, absl::Time now = absl::Now());

 private:
  struct Window {
    absl::Time started = absl::InfinitePast();
    int64_t suppressed = 0;
  };
  const absl::Duration period_;
  absl::Mutex mu_;
  std::map<std::string, Window, std::less<>> windows_ ABSL_GUARDED_BY(mu_);
};

}  // namespace optd::server

#endif  // OPTD_SERVER_LOG_H_
