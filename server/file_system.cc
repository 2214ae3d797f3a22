#include "server/file_system.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace optd::server {
namespace {

// "<operation> <path>: <strerror(errno)>" with the code absl maps `errno` to, except that a
// state directory optd may not write (EACCES, EPERM, EROFS) is FAILED_PRECONDITION: absl's
// PERMISSION_DENIED would read as a refused token to a client.
absl::Status PosixError(absl::string_view operation, absl::string_view path, int error_number) {
  const absl::Status status = absl::ErrnoToStatus(error_number, absl::StrCat(operation, " ", path));
  if (error_number == EACCES || error_number == EPERM || error_number == EROFS) {
    return absl::FailedPreconditionError(
        absl::StrCat(status.message(), " (optd cannot write its state directory)"));
  }
  return status;
}

class PosixWritableFile final : public WritableFile {
 public:
  PosixWritableFile(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}

  ~PosixWritableFile() override {
    if (fd_ >= 0) close(fd_);
  }

  PosixWritableFile(const PosixWritableFile&) = delete;
  PosixWritableFile& operator=(const PosixWritableFile&) = delete;

  absl::Status Append(absl::string_view data) override {
    if (fd_ < 0) return ClosedError("write");
    while (!data.empty()) {
      const ssize_t written = write(fd_, data.data(), data.size());
      if (written < 0) {
        if (errno == EINTR) continue;
        return PosixError("write", path_, errno);
      }
      data.remove_prefix(static_cast<size_t>(written));
    }
    return absl::OkStatus();
  }

  absl::Status Sync() override {
    if (fd_ < 0) return ClosedError("fsync");
    if (fsync(fd_) != 0) return PosixError("fsync", path_, errno);
    return absl::OkStatus();
  }

  absl::Status Close() override {
    if (fd_ < 0) return ClosedError("close");
    // Linux releases the descriptor even when close fails, so it is never retried (close(2)).
    const int result = close(fd_);
    fd_ = -1;
    if (result != 0) return PosixError("close", path_, errno);
    return absl::OkStatus();
  }

 private:
  absl::Status ClosedError(absl::string_view operation) const {
    return absl::FailedPreconditionError(absl::StrCat(operation, " ", path_, ": file is closed"));
  }

  int fd_;
  const std::string path_;
};

// open(2), retried on EINTR.
int OpenRetrying(const std::string& path, int flags, mode_t mode = 0) {
  int fd;
  do {
    fd = open(path.c_str(), flags | O_CLOEXEC, mode);
  } while (fd < 0 && errno == EINTR);
  return fd;
}

// Reads `fd` to its end; the file may be longer or shorter than its size at open.
absl::StatusOr<std::string> ReadToEnd(int fd, const std::string& path) {
  struct stat info;
  if (fstat(fd, &info) != 0) return PosixError("stat", path, errno);
  std::string contents;
  if (S_ISREG(info.st_mode)) contents.resize(static_cast<size_t>(info.st_size));
  size_t filled = 0;
  for (;;) {
    // Into the space sized from fstat first; then through a small buffer, so finding the end of
    // a file of expected size costs no extra allocation.
    char chunk[1 << 16];
    const bool into_contents = filled < contents.size();
    char* const target = into_contents ? contents.data() + filled : chunk;
    const size_t capacity = into_contents ? contents.size() - filled : sizeof(chunk);
    const ssize_t got = read(fd, target, capacity);
    if (got < 0) {
      if (errno == EINTR) continue;
      return PosixError("read", path, errno);
    }
    if (got == 0) break;
    if (!into_contents) contents.append(chunk, static_cast<size_t>(got));
    filled += static_cast<size_t>(got);
  }
  contents.resize(filled);
  return contents;
}

// Deletes `path`, and everything below it when it is a directory (links are not followed).
absl::Status RemoveTree(const std::string& path);

class PosixFileSystemImpl final : public FileSystem {
 public:
  absl::StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path) override {
    const int fd = OpenRetrying(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return PosixError("open", path, errno);
    return std::make_unique<PosixWritableFile>(fd, path);
  }

  absl::StatusOr<std::string> ReadFile(const std::string& path) override {
    const int fd = OpenRetrying(path, O_RDONLY);
    if (fd < 0) return PosixError("open", path, errno);
    absl::StatusOr<std::string> contents = ReadToEnd(fd, path);
    close(fd);
    return contents;
  }

  absl::Status Rename(const std::string& from, const std::string& to) override {
    if (rename(from.c_str(), to.c_str()) != 0) {
      return PosixError("rename", absl::StrCat(from, " to ", to), errno);
    }
    return absl::OkStatus();
  }

  absl::Status SyncDir(const std::string& dir) override {
    const int fd = OpenRetrying(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return PosixError("open directory", dir, errno);
    const int result = fsync(fd);
    const int fsync_errno = errno;
    close(fd);
    if (result != 0) return PosixError("fsync directory", dir, fsync_errno);
    return absl::OkStatus();
  }

  absl::Status CreateDir(const std::string& dir) override {
    if (dir.empty()) return absl::InvalidArgumentError("mkdir: empty directory name");
    // Each proper prefix ending before a '/', then `dir` itself; EEXIST is checked once at the end.
    for (size_t slash = dir.find('/', 1); slash != std::string::npos;
         slash = dir.find('/', slash + 1)) {
      const std::string parent = dir.substr(0, slash);
      if (mkdir(parent.c_str(), 0700) != 0 && errno != EEXIST) {
        return PosixError("mkdir", parent, errno);
      }
    }
    if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) return PosixError("mkdir", dir, errno);
    struct stat info;
    if (stat(dir.c_str(), &info) != 0) return PosixError("stat", dir, errno);
    if (!S_ISDIR(info.st_mode)) return PosixError("mkdir", dir, ENOTDIR);
    return absl::OkStatus();
  }

  absl::Status DeleteFile(const std::string& path) override {
    if (unlink(path.c_str()) != 0 && errno != ENOENT) return PosixError("unlink", path, errno);
    return absl::OkStatus();
  }

  absl::Status DeleteRecursively(const std::string& dir) override { return RemoveTree(dir); }

  absl::StatusOr<std::vector<std::string>> ListDir(const std::string& dir) override {
    DIR* const stream = opendir(dir.c_str());
    if (stream == nullptr) return PosixError("opendir", dir, errno);
    std::vector<std::string> names;
    for (;;) {
      errno = 0;
      const dirent* const entry = readdir(stream);
      if (entry == nullptr) break;
      const absl::string_view name = entry->d_name;
      if (name != "." && name != "..") names.emplace_back(name);
    }
    const int readdir_errno = errno;
    closedir(stream);
    if (readdir_errno != 0) return PosixError("readdir", dir, readdir_errno);
    std::sort(names.begin(), names.end());
    return names;
  }

  bool Exists(const std::string& path) override {
    struct stat info;
    return stat(path.c_str(), &info) == 0;
  }
};

absl::Status RemoveTree(const std::string& path) {
  struct stat info;
  if (lstat(path.c_str(), &info) != 0) {
    if (errno == ENOENT) return absl::OkStatus();
    return PosixError("stat", path, errno);
  }
  if (!S_ISDIR(info.st_mode)) return PosixFileSystem().DeleteFile(path);
  std::vector<std::string> names;
  OPTD_ASSIGN_OR_RETURN(names, PosixFileSystem().ListDir(path));
  for (const std::string& name : names)
    OPTD_RETURN_IF_ERROR(RemoveTree(absl::StrCat(path, "/", name)));
  if (rmdir(path.c_str()) != 0 && errno != ENOENT) return PosixError("rmdir", path, errno);
  return absl::OkStatus();
}

}  // namespace

FileSystem& PosixFileSystem() {
  static PosixFileSystemImpl* const file_system = new PosixFileSystemImpl;
  return *file_system;
}

}  // namespace optd::server
