#include "server/log.h"

#include <cstdio>

#include "absl/strings/str_cat.h"

namespace optd::server {

void LogEvent(absl::string_view event) {
  static absl::Mutex mu(absl::kConstInit);
  const std::string line =
      absl::StrCat(absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::Now(), absl::UTCTimeZone()),
                   " optd: ", event, "\n");
  absl::MutexLock lock(&mu);
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

void RateLimitedLog::Log(absl::string_view key, absl::string_view event, absl::Time now) {
  int64_t suppressed = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = windows_.find(key);
    if (it == windows_.end()) it = windows_.emplace(std::string(key), Window{}).first;
    Window& window = it->second;
    if (now - window.started < period_) {
      ++window.suppressed;
      return;
    }
    suppressed = window.suppressed;
    window = Window{now, 0};
  }
  if (suppressed == 0) {
    LogEvent(event);
  } else {
    LogEvent(absl::StrCat(event, " (and ", suppressed, " more like it since the last such line)"));
  }
}

}  // namespace optd::server
