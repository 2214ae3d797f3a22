#include "server/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/auth.h"

namespace optd::server {
namespace {

constexpr int64_t kAlign = 64;
constexpr int64_t kMaxBytes = int64_t{1} << 62;

absl::Status Errno(absl::string_view call, absl::string_view name, int error) {
  const std::string message =
      absl::StrCat("shared memory '", name, "': ", call, " failed: ", std::strerror(error));
  return error == ENOMEM || error == ENOSPC ? absl::ResourceExhaustedError(message)
                                            : absl::InternalError(message);
}

}  // namespace

absl::StatusOr<SharedLayout> SharedLayoutFor(absl::Span<const int64_t> counts) {
  int64_t elements = 0;
  for (const int64_t count : counts) {
    if (count < 0 || count > kMaxBytes / 8 - elements) {
      return absl::ResourceExhaustedError("a shared-memory region would pass 2^62 bytes");
    }
    elements += count;
  }
  // The gradient area, then the result area (64-byte aligned), each tensor's slot right after
  // the one before: a client can fill every fp32 gradient with one copy.
  SharedLayout layout;
  int64_t gradient = SharedLayout::kHeaderBytes;
  int64_t result = (gradient + 4 * elements + kAlign - 1) / kAlign * kAlign;
  for (const int64_t count : counts) {
    layout.gradient_offsets.push_back(gradient);
    layout.result_offsets.push_back(result);
    gradient += 4 * count;
    result += 4 * count;
  }
  layout.bytes = std::max<int64_t>(result, SharedLayout::kHeaderBytes);
  return layout;
}

absl::StatusOr<std::unique_ptr<SharedRegion>> SharedRegion::Create(absl::string_view name,
                                                                   SharedLayout layout) {
  OPTD_ASSIGN_OR_RETURN(std::string nonce, RandomBytes(SharedLayout::kNonceBytes));
  const std::string label(name.substr(0, 200));
  const int fd = memfd_create(label.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return Errno("memfd_create", name, errno);
  if (ftruncate(fd, layout.bytes) != 0 ||
      fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    const int error = errno;
    close(fd);
    return Errno("sizing and sealing", name, error);
  }
  void* data =
      mmap(nullptr, static_cast<size_t>(layout.bytes), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (data == MAP_FAILED) {
    const int error = errno;
    close(fd);
    return Errno("mmap", name, error);
  }
  std::memcpy(data, nonce.data(), nonce.size());
  return std::unique_ptr<SharedRegion>(
      new SharedRegion(fd, static_cast<char*>(data), std::move(layout), std::move(nonce)));
}

SharedRegion::SharedRegion(int fd, char* data, SharedLayout layout, std::string nonce)
    : fd_(fd),
      data_(data),
      layout_(std::move(layout)),
      nonce_(std::move(nonce)),
      path_(absl::StrCat("/proc/", getpid(), "/fd/", fd)) {}

SharedRegion::~SharedRegion() {
  munmap(data_, static_cast<size_t>(layout_.bytes));
  close(fd_);
}

}  // namespace optd::server
