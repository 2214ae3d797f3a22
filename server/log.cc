#include "server/log.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"

namespace optd::server {

std::string Printable(absl::string_view text, size_t max_bytes) {
  std::string out;
  out.reserve(std::min(text.size(), max_bytes));
  size_t used = 0;  // bytes of `text` written
  for (; used < text.size(); ++used) {
    const auto byte = static_cast<unsigned char>(text[used]);
    const bool control = byte < 0x20 || byte == 0x7f;
    const size_t width = control ? 4 : 1;
    if (out.size() + width > max_bytes) {
      // A character cut in two loses the bytes already written: its continuation bytes
      // (10xxxxxx) and its lead byte (bytes from 0x80 up are written as they are, one each).
      auto continuation = [&](size_t i) {
        return (static_cast<unsigned char>(text[i]) & 0xc0) == 0x80;
      };
      if (continuation(used)) {
        while (used > 0 && continuation(used - 1)) {
          --used;
          out.pop_back();
        }
        if (used > 0) {
          --used;
          out.pop_back();
        }
      }
      break;
    }
    if (control) {
      absl::StrAppend(&out, "\\x", absl::Hex(byte, absl::kZeroPad2));
    } else {
      out.push_back(static_cast<char>(byte));
    }
  }
  if (used < text.size()) absl::StrAppend(&out, "... (", text.size() - used, " more bytes)");
  return out;
}

void LogEvent(absl::string_view event) {
  static absl::Mutex mu(absl::kConstInit);
  const std::string line =
      absl::StrCat(absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::Now(), absl::UTCTimeZone()),
                   " optd: ", Printable(event, kMaxEventBytes), "\n");
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
