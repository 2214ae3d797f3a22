// A FileSystem for tests that forwards to another one and fails chosen operations: the Nth call
// of an operation kind, or every call of it. It counts calls per kind, so a test can run a clean
// write, read the counts, and then fail each of those calls in turn.
#ifndef OPTD_TESTS_SERVER_FAULT_INJECTION_FILE_SYSTEM_H_
#define OPTD_TESTS_SERVER_FAULT_INJECTION_FILE_SYSTEM_H_

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "server/file_system.h"

namespace optd::server {

// The operations a FaultInjectionFileSystem can fail. The others (ReadFile, CreateDir, ...) are
// forwarded without counting.
enum class FsOp { kNewWritableFile, kAppend, kSync, kClose, kRename, kSyncDir };
inline constexpr std::array<FsOp, 6> kAllFsOps = {
    FsOp::kNewWritableFile, FsOp::kAppend, FsOp::kSync,
    FsOp::kClose,           FsOp::kRename, FsOp::kSyncDir};

inline absl::string_view FsOpName(FsOp op) {
  switch (op) {
    case FsOp::kNewWritableFile:
      return "NewWritableFile";
    case FsOp::kAppend:
      return "Append";
    case FsOp::kSync:
      return "Sync";
    case FsOp::kClose:
      return "Close";
    case FsOp::kRename:
      return "Rename";
    case FsOp::kSyncDir:
      return "SyncDir";
  }
  return "unknown";
}

// Thread-safe: a test sets its plan while the daemon's threads write. A failed call does nothing
// (it is not forwarded) and returns InternalError("injected <kind> failure"); it is counted like
// any other call.
class FaultInjectionFileSystem final : public FileSystem {
 public:
  // REQUIRES: `base` outlives this object and every file it opens.
  explicit FaultInjectionFileSystem(FileSystem& base) : base_(base) {}

  // Fails the call of kind `op` whose index, counting from 0 since construction or ResetCounts,
  // is `n`.
  void FailNth(FsOp op, int64_t n) {
    absl::MutexLock lock(&mu_);
    plan(op).fail_index = n;
  }
  // Fails every call of kind `op` from now on.
  void FailAll(FsOp op) {
    absl::MutexLock lock(&mu_);
    plan(op).fail_all = true;
  }
  // Stops failing anything.
  void ClearFailures() {
    absl::MutexLock lock(&mu_);
    for (Plan& p : plans_) p.fail_index = -1, p.fail_all = false;
  }
  void ResetCounts() {
    absl::MutexLock lock(&mu_);
    for (Plan& p : plans_) p.calls = 0;
    log_.clear();
  }
  // Reads of `path` wait until `release` is notified (a test holding a load mid-way).
  void HoldReads(const std::string& path, absl::Notification* release) {
    absl::MutexLock lock(&mu_);
    held_path_ = path;
    held_gate_ = release;
  }
  // Reads that reached a HoldReads gate.
  int reads_held() {
    absl::MutexLock lock(&mu_);
    return reads_held_;
  }
  // Calls of kind `op` since construction or ResetCounts, failed ones included.
  int64_t count(FsOp op) {
    absl::MutexLock lock(&mu_);
    return plans_[static_cast<size_t>(op)].calls;
  }
  // Every counted call in order, since construction or ResetCounts.
  std::vector<FsOp> log() {
    absl::MutexLock lock(&mu_);
    return log_;
  }

  absl::StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path) override {
    if (ShouldFail(FsOp::kNewWritableFile)) return Injected(FsOp::kNewWritableFile);
    absl::StatusOr<std::unique_ptr<WritableFile>> file = base_.NewWritableFile(path);
    if (!file.ok()) return file.status();
    return std::unique_ptr<WritableFile>(new File(*this, *std::move(file)));
  }
  absl::StatusOr<std::string> ReadFile(const std::string& path) override {
    absl::Notification* gate = nullptr;
    {
      absl::MutexLock lock(&mu_);
      if (path == held_path_) {
        gate = held_gate_;
        ++reads_held_;
      }
    }
    if (gate != nullptr) gate->WaitForNotification();
    return base_.ReadFile(path);
  }
  absl::Status Rename(const std::string& from, const std::string& to) override {
    if (ShouldFail(FsOp::kRename)) return Injected(FsOp::kRename);
    return base_.Rename(from, to);
  }
  absl::Status SyncDir(const std::string& dir) override {
    if (ShouldFail(FsOp::kSyncDir)) return Injected(FsOp::kSyncDir);
    return base_.SyncDir(dir);
  }
  absl::Status CreateDir(const std::string& dir) override { return base_.CreateDir(dir); }
  absl::Status DeleteFile(const std::string& path) override { return base_.DeleteFile(path); }
  absl::Status DeleteRecursively(const std::string& dir) override {
    return base_.DeleteRecursively(dir);
  }
  absl::StatusOr<std::vector<std::string>> ListDir(const std::string& dir) override {
    return base_.ListDir(dir);
  }
  bool Exists(const std::string& path) override { return base_.Exists(path); }

 private:
  struct Plan {
    int64_t calls = 0;
    int64_t fail_index = -1;
    bool fail_all = false;
  };

  class File final : public WritableFile {
   public:
    File(FaultInjectionFileSystem& fs, std::unique_ptr<WritableFile> base)
        : fs_(fs), base_(std::move(base)) {}
    absl::Status Append(absl::string_view data) override {
      if (fs_.ShouldFail(FsOp::kAppend)) return Injected(FsOp::kAppend);
      return base_->Append(data);
    }
    absl::Status Sync() override {
      if (fs_.ShouldFail(FsOp::kSync)) return Injected(FsOp::kSync);
      return base_->Sync();
    }
    absl::Status Close() override {
      if (fs_.ShouldFail(FsOp::kClose)) return Injected(FsOp::kClose);
      return base_->Close();
    }

   private:
    FaultInjectionFileSystem& fs_;
    std::unique_ptr<WritableFile> base_;
  };

  static absl::Status Injected(FsOp op) {
    return absl::InternalError(absl::StrCat("injected ", FsOpName(op), " failure"));
  }

  Plan& plan(FsOp op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return plans_[static_cast<size_t>(op)]; }

  // Counts one call of kind `op`; whether it is to fail.
  bool ShouldFail(FsOp op) {
    absl::MutexLock lock(&mu_);
    Plan& p = plan(op);
    const int64_t index = p.calls++;
    log_.push_back(op);
    return p.fail_all || index == p.fail_index;
  }

  FileSystem& base_;
  absl::Mutex mu_;
  std::array<Plan, kAllFsOps.size()> plans_ ABSL_GUARDED_BY(mu_);
  std::vector<FsOp> log_ ABSL_GUARDED_BY(mu_);
  std::string held_path_ ABSL_GUARDED_BY(mu_);
  absl::Notification* held_gate_ ABSL_GUARDED_BY(mu_) = nullptr;
  int reads_held_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace optd::server

#endif  // OPTD_TESTS_SERVER_FAULT_INJECTION_FILE_SYSTEM_H_
