// The analyzer (../shared/DESIGN.md, "One step, as data", 6): every K steps a session hands it a
// snapshot of its matrix tensors' momentum, update and gradient, taken at the end of the step;
// one low-priority thread computes the figures of DESIGN.md's "Metrics" table (kernels/analysis.h)
// and publishes them through the job's callback. A step never waits for it: a session whose
// previous snapshot is still being analyzed, or a snapshot that would not fit the analyzer's
// memory, is skipped (and counted in optd_analysis_skipped_total). The snapshot itself is a copy
// the step makes (12 bytes per matrix parameter, every K steps).
//
// On the CPU the analyzer runs on a backend of its own (one thread, so it never queues behind a
// step's loops on the step backend's thread pool), in a thread at the lowest scheduling priority.
// Its BLAS calls are single-threaded, as the step backend's are (kernels/backend.h), so they run
// beside a step's instead of queueing behind them, and the analysis keeps them small
// (kernels/analysis.h).
#ifndef OPTD_SERVER_ANALYZER_H_
#define OPTD_SERVER_ANALYZER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "kernels/analysis.h"
#include "kernels/backend.h"
#include "kernels/newton_schulz.h"
#include "optd/v1/optd.pb.h"
#include "server/metrics.h"

namespace optd::server {

struct AnalyzerOptions {
  // Snapshot bytes held at once (queued and in analysis).
  int64_t max_snapshot_bytes = int64_t{1} << 30;
  // Exact up to exact_max_dim, estimated past it; the BLAS block size.
  AnalysisOptions analysis;
};

// One matrix tensor at the end of a step: the batch of rows×cols matrices it is stepped as.
struct TensorSnapshot {
  std::string name;
  int64_t batch = 1, rows = 0, cols = 0;
  std::vector<float> momentum;
  // The applied update scale·o, before the learning rate and weight decay.
  std::vector<float> update;
  std::vector<float> gradient;  // the workers' mean
  NewtonSchulzConfig newton_schulz;

  int64_t bytes() const {
    return static_cast<int64_t>((momentum.size() + update.size() + gradient.size()) *
                                sizeof(float));
  }
};

struct AnalysisJob {
  // The reservation's key: the session, and its restore count (Session::BeginSnapshotLocked).
  std::string session;
  int64_t step = 0;
  std::vector<TensorSnapshot> tensors;
  // Called on the analyzer's thread with the figures of each tensor that could be analyzed (a
  // tensor whose momentum is zero has none), in the order of `tensors`.
  std::function<void(int64_t step, std::vector<v1::TensorAnalysis> figures)> publish;
};

// The figures of one snapshot: the mean over its batch of matrices of each figure. Errors as
// AnalyzeMatrix's (FailedPrecondition for a zero momentum).
absl::StatusOr<v1::TensorAnalysis> AnalyzeSnapshot(Backend& backend, Queue& queue,
                                                   const TensorSnapshot& snapshot, int64_t step,
                                                   const AnalysisOptions& options);

class Analyzer;

// One matrix tensor a step asks to snapshot: its session index, name, shape as stepped, Newton-
// Schulz config, and the gradient the step is about to apply (the workers' mean), copied at once.
struct SnapshotRequest {
  int tensor = 0;
  std::string name;
  int64_t batch = 1, rows = 0, cols = 0;
  NewtonSchulzConfig newton_schulz;
  absl::Span<const float> gradient;
};

// A snapshot being taken (Analyzer::BeginSnapshot): the analyzer's room is reserved and every
// buffer is allocated. The step writes each tensor's update into update_buffer(i) (backend
// memory, Optimizer::CaptureUpdate); Analyzer::Finish then reads the momentum and the updates and
// submits the job. A snapshot dropped unfinished gives its room back. Move-only.
class PendingSnapshot {
 public:
  PendingSnapshot(PendingSnapshot&& other) noexcept;
  PendingSnapshot& operator=(PendingSnapshot&&) = delete;
  PendingSnapshot(const PendingSnapshot&) = delete;
  ~PendingSnapshot();

  size_t size() const { return tensors_.size(); }
  // The session index of the i-th tensor, and the buffer its update goes to.
  int tensor(size_t i) const { return tensors_[i]; }
  float* update_buffer(size_t i) const { return updates_[i].f32(); }

 private:
  friend class Analyzer;
  PendingSnapshot(Analyzer* analyzer, AnalysisJob job, int64_t bytes)
      : analyzer_(analyzer), job_(std::move(job)), bytes_(bytes) {}

  Analyzer* analyzer_;  // null once submitted or released
  AnalysisJob job_;
  int64_t bytes_ = 0;
  std::vector<int> tensors_;
  std::vector<Buffer> updates_;
};

class Analyzer {
 public:
  // `backend` is the analyzer's own (see above); `metrics` may be null.
  static absl::StatusOr<std::unique_ptr<Analyzer>> Create(Backend& backend, Metrics* metrics,
                                                          AnalyzerOptions options);
  // Stops after the tensor in analysis; queued jobs are dropped.
  ~Analyzer();

  // Room for a snapshot of `bytes` for `session`, or false (counted as skipped) when the
  // analyzer still holds one of this session's or the bytes do not fit. A true return must be
  // followed by Submit or Release with the same arguments.
  bool Reserve(const std::string& session, int64_t bytes);
  void Release(const std::string& session, int64_t bytes);
  // REQUIRES: Reserve(job.session, bytes) returned true, bytes the sum of the snapshots' bytes.
  void Submit(AnalysisJob job, int64_t bytes);

  // A snapshot of `tensors` for the step `step` of the session keyed `key` (its id and restore
  // count: an analysis of steps a Restore undid does not hold up the next one), or nullopt when
  // the analyzer skips it: `tensors` is empty, room is not free (Reserve), or `step_backend` or
  // the host has no memory for its buffers. The gradients are copied now.
  std::optional<PendingSnapshot> BeginSnapshot(std::string key, int64_t step,
                                               const std::vector<SnapshotRequest>& tensors,
                                               Backend& step_backend);
  // After the step: reads each tensor's momentum through `read_momentum(tensor, out)` and its
  // update from the step backend, and submits the job, whose figures go to `publish`. On an
  // error the room is given back and nothing is submitted.
  absl::Status Finish(
      PendingSnapshot snapshot, Backend& step_backend,
      const std::function<absl::Status(int tensor, absl::Span<float> out)>& read_momentum,
      std::function<void(int64_t step, std::vector<v1::TensorAnalysis> figures)> publish);

  // Waits until every submitted job has been published (tests and benchmarks).
  void WaitUntilIdle();
  // True while some session holds a reservation: its snapshot is being taken, queued or in
  // analysis.
  bool busy();

 private:
  Analyzer(Backend& backend, Metrics* metrics, AnalyzerOptions options,
           std::unique_ptr<Queue> queue);
  void Run();
  bool HasWorkOrStop() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  Backend& backend_;
  Metrics* const metrics_;
  const AnalyzerOptions options_;
  std::unique_ptr<Queue> queue_;

  absl::Mutex mu_;
  std::deque<std::pair<AnalysisJob, int64_t>> jobs_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> reserved_ ABSL_GUARDED_BY(mu_);  // sessions with a job out
  int64_t reserved_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace optd::server

#endif  // OPTD_SERVER_ANALYZER_H_
