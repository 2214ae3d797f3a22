// A fixed pool of threads that split a loop with the caller and sleep between loops.
//
// The CPU backend runs its element and row loops here instead of OpenMP: libgomp's idle threads
// spin on the cores OpenBLAS's threads need, which cost Newton–Schulz up to 40% on two cores
// (bench/RESULTS.md). Threads here poll for a few microseconds after a loop, which keeps the
// wake-up of back-to-back loops cheap, then block on a condition variable.
#ifndef OPTD_KERNELS_CPU_THREAD_POOL_H_
#define OPTD_KERNELS_CPU_THREAD_POOL_H_

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/synchronization/mutex.h"

namespace optd {

class ThreadPool {
 public:
  // `threads` counts the caller: ThreadPool(2) starts one worker. REQUIRES: threads >= 1.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(begin, end) on contiguous chunks covering [0, n), each at least `grain` long (so
  // short loops stay on the calling thread), and returns when every chunk is done. Calls from
  // several threads run one after another. REQUIRES: fn does not call ParallelFor on this pool
  // (it would wait on itself).
  void ParallelFor(int64_t n, int64_t grain, absl::FunctionRef<void(int64_t, int64_t)> fn);

 private:
  void WorkerLoop(int index);

  absl::Mutex call_mu_;  // one loop at a time
  absl::Mutex mu_;
  absl::CondVar work_cv_;
  absl::CondVar done_cv_;
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  int chunks_ ABSL_GUARDED_BY(mu_) = 0;
  int pending_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t n_ ABSL_GUARDED_BY(mu_) = 0;
  const absl::FunctionRef<void(int64_t, int64_t)>* fn_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Copies of generation_ and pending_, written under mu_, read without it while polling.
  std::atomic<int64_t> published_generation_{0};
  std::atomic<int> published_pending_{0};
  std::vector<std::thread> workers_;
};

}  // namespace optd

#endif  // OPTD_KERNELS_CPU_THREAD_POOL_H_
