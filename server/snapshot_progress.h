// How far the copy of a parameter snapshot has come (Session::SnapshotParameters), so that
// GetParams sends each piece as soon as it is copied while a pipeline thread copies the rest:
// the copy, which holds the session's lock to be of one step, overlaps the stream instead of
// preceding it, and the lock is never held while a client reads.
#ifndef OPTD_SERVER_SNAPSHOT_PROGRESS_H_
#define OPTD_SERVER_SNAPSHOT_PROGRESS_H_

#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace optd::server {

class SnapshotProgress {
 public:
  SnapshotProgress() = default;
  SnapshotProgress(const SnapshotProgress&) = delete;
  SnapshotProgress& operator=(const SnapshotProgress&) = delete;

  // The copier: the snapshot's tensors before `index` are copied, and elements [0, end) of the
  // `index`th. Positions only move forward.
  void Copied(int index, int64_t end);
  // The copier is done: every tensor copied (OK) or `status`, the copy's error. The first call
  // counts.
  void Finish(absl::Status status);

  // Waits until elements [0, end) of the snapshot's `index`th tensor are copied: OK, or the
  // copy's error when it stopped before.
  absl::Status WaitFor(int index, int64_t end);
  // Waits until the copier is done (no copy writes into the snapshot's buffers afterwards).
  void WaitDone();

 private:
  absl::Mutex mu_;
  int index_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t end_ ABSL_GUARDED_BY(mu_) = 0;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace optd::server

#endif  // OPTD_SERVER_SNAPSHOT_PROGRESS_H_
