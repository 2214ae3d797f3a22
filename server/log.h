// The daemon's log: one line per event on stderr, "<UTC time, microseconds> optd: <event>",
// written whole under a lock so lines of concurrent calls never interleave. Events that clients
// can cause at any rate (refused calls) go through RateLimitedLog. Events echo what clients sent
// (a tensor name, a session id), so every line goes through Printable: a client cannot end a
// line, forge the next one, move a terminal's cursor or write a line of megabytes.
#ifndef OPTD_SERVER_LOG_H_
#define OPTD_SERVER_LOG_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace optd::server {

// `text` with each control byte (below 0x20, and 0x7f) written as \xNN, cut to at most
// `max_bytes` bytes (at a UTF-8 character boundary) and then marked with how many bytes were cut.
// Bytes from 0x80 up pass unchanged: names are UTF-8 (protobuf checks string fields).
std::string Printable(absl::string_view text, size_t max_bytes);

// The most an event line holds: a refused call's message with a name of a few hundred bytes.
inline constexpr size_t kMaxEventBytes = 4096;

// Writes one event line to stderr: Printable(event, kMaxEventBytes).
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
