#include "server/heap.h"

#include <malloc.h>

#include <algorithm>
#include <climits>

#include "absl/strings/str_cat.h"

namespace optd::server {

absl::Status KeepFreedHeap(int64_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  if (bytes < 0 || bytes > INT_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("freed heap to keep must be in [0, 2 GiB], not ", bytes, " bytes"));
  }
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  return absl::OkStatus();  // the sanitizer's allocator keeps its own policy
#elif defined(__GLIBC__)
  // glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit hosts.
  constexpr int64_t kMaxMmapThreshold = int64_t{32} << 20;
  const int mmap_threshold = static_cast<int>(std::min(bytes, kMaxMmapThreshold));
  if (mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1 ||
      mallopt(M_TRIM_THRESHOLD, static_cast<int>(bytes)) != 1) {
    return absl::UnimplementedError(absl::StrCat("mallopt refused to keep ", bytes, " bytes"));
  }
  return absl::OkStatus();
#else
  return absl::UnimplementedError("keeping freed heap needs glibc's mallopt");
#endif
}

}  // namespace optd::server
