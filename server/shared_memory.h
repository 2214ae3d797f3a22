// Same-host steps through shared memory (optd.proto, AttachSharedMemory): a worker's region holds
// a gradient slot and a result slot per tensor, so a StepSmall carries no tensor bytes.
#ifndef OPTD_SERVER_SHARED_MEMORY_H_
#define OPTD_SERVER_SHARED_MEMORY_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace optd::server {

// Where each tensor's slots lie in a region: a 64-byte header (its first 16 bytes the nonce), the
// gradient slots of every tensor one after the other, then (from the next 64-byte boundary) the
// result slots likewise, 4 bytes per element each.
struct SharedLayout {
  static constexpr int64_t kHeaderBytes = 64;
  static constexpr int64_t kNonceBytes = 16;
  std::vector<int64_t> gradient_offsets;
  std::vector<int64_t> result_offsets;
  int64_t bytes = 0;
};

// The layout for tensors of `counts` elements. ResourceExhausted when it passes 2^62 bytes.
absl::StatusOr<SharedLayout> SharedLayoutFor(absl::Span<const int64_t> counts);

// A sealed memory file (memfd: it cannot grow or shrink, so a client cannot truncate it under the
// daemon's mapping) mapped read-write here, its first 16 bytes a random nonce. Another process
// opens it at path(), which only processes allowed to inspect this one can open (the same user,
// or root). Unmapped and closed on destruction; the memory goes once every client has unmapped
// it too.
class SharedRegion {
 public:
  // `name` shows in /proc/<pid>/fd (memfd:<name>). Internal naming the call that failed;
  // ResourceExhausted when the memory cannot be had.
  static absl::StatusOr<std::unique_ptr<SharedRegion>> Create(absl::string_view name,
                                                              SharedLayout layout);
  ~SharedRegion();
  SharedRegion(const SharedRegion&) = delete;
  SharedRegion& operator=(const SharedRegion&) = delete;

  // /proc/<pid>/fd/<fd>.
  const std::string& path() const { return path_; }
  const std::string& nonce() const { return nonce_; }
  const SharedLayout& layout() const { return layout_; }
  int64_t bytes() const { return layout_.bytes; }
  // The mapping. Its contents are the client's to change at any time: read each value once.
  char* data() const { return data_; }

 private:
  SharedRegion(int fd, char* data, SharedLayout layout, std::string nonce);

  int fd_;
  char* data_;
  SharedLayout layout_;
  std::string nonce_;
  std::string path_;
};

}  // namespace optd::server

#endif  // OPTD_SERVER_SHARED_MEMORY_H_
