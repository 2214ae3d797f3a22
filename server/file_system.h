// The file-system seam checkpoint writing goes through (after leveldb's Env), so tests can fail
// any write, fsync or rename and check that nothing already committed is lost.
#ifndef OPTD_SERVER_FILE_SYSTEM_H_
#define OPTD_SERVER_FILE_SYSTEM_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace optd::server {

// A file open for appending. Not thread-safe. Every failure is a Status whose message names the
// operation, the path and the errno text ("write /a/b: No space left on device"); its code follows
// absl::ErrnoToStatusCode (ENOENT NotFound, ENOSPC and EDQUOT ResourceExhausted, EACCES
// PermissionDenied, ...).
class WritableFile {
 public:
  virtual ~WritableFile() = default;

  // Writes all of `data` at the end of the file before returning (no user-space buffering). After
  // a failure, an unknown prefix of `data` may have been written.
  virtual absl::Status Append(absl::string_view data) = 0;

  // Makes everything appended so far, and the file's size, durable (fsync).
  virtual absl::Status Sync() = 0;

  // Closes the file. Later calls of any method return FailedPrecondition. A file destroyed
  // without Close is closed and the error, if any, dropped.
  virtual absl::Status Close() = 0;
};

// File operations on paths. Implementations are thread-safe; errors as for WritableFile.
class FileSystem {
 public:
  virtual ~FileSystem() = default;

  // Creates `path`, or truncates it when it exists, with mode 0600 for a new file.
  virtual absl::StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(
      const std::string& path) = 0;

  // The whole contents of `path`. NotFound when it does not exist.
  virtual absl::StatusOr<std::string> ReadFile(const std::string& path) = 0;

  // Atomically replaces `to` (if it exists) with `from`. Durable only after SyncDir of the
  // directory holding them.
  virtual absl::Status Rename(const std::string& from, const std::string& to) = 0;

  // Makes the directory's entries (files created, renamed or deleted in it) durable (fsync).
  virtual absl::Status SyncDir(const std::string& dir) = 0;

  // Creates `dir` and any missing parents with mode 0700. OK when `dir` already is a directory;
  // an error when it or a parent exists and is not one.
  virtual absl::Status CreateDir(const std::string& dir) = 0;

  // Deletes a file. OK when it is already missing.
  virtual absl::Status DeleteFile(const std::string& path) = 0;

  // Deletes `dir` and everything below it without following symbolic links (a file or link
  // given as `dir` is deleted itself). OK when it is already missing.
  virtual absl::Status DeleteRecursively(const std::string& dir) = 0;

  // Names of the entries of `dir`, sorted bytewise, without "." and "..".
  virtual absl::StatusOr<std::vector<std::string>> ListDir(const std::string& dir) = 0;

  // Whether `path` exists (false also when it cannot be inspected, e.g. EACCES).
  virtual bool Exists(const std::string& path) = 0;
};

// The process's real file system (POSIX calls); lives for the whole program.
FileSystem& PosixFileSystem();

}  // namespace optd::server

#endif  // OPTD_SERVER_FILE_SYSTEM_H_
