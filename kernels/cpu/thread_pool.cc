#include "kernels/cpu/thread_pool.h"

#include <algorithm>

namespace optd {
namespace {

// Polls before a thread blocks: about 10 µs, far below the millisecond-scale BLAS calls that the
// polling could slow, and enough to catch the next loop of a step.
constexpr int kPolls = 2000;

void Pause() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

// Chunk i of `chunks` equal parts of [0, n).
std::pair<int64_t, int64_t> ChunkBounds(int64_t n, int chunks, int i) {
  return {n * i / chunks, n * (i + 1) / chunks};
}

}  // namespace

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    work_cv_.SignalAll();
  }
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             absl::FunctionRef<void(int64_t, int64_t)> fn) {
  if (n <= 0) return;
  const int chunks = static_cast<int>(std::min<int64_t>(
      threads(), (n + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1)));
  if (chunks <= 1) {
    fn(0, n);
    return;
  }
  absl::MutexLock call_lock(&call_mu_);
  {
    absl::MutexLock lock(&mu_);
    fn_ = &fn;
    n_ = n;
    chunks_ = chunks;
    pending_ = chunks - 1;
    published_pending_.store(pending_, std::memory_order_release);
    ++generation_;
    published_generation_.store(generation_, std::memory_order_release);
    work_cv_.SignalAll();
  }
  const auto [begin, end] = ChunkBounds(n, chunks, 0);
  fn(begin, end);
  for (int i = 0; i < kPolls && published_pending_.load(std::memory_order_acquire) > 0; ++i) {
    Pause();
  }
  absl::MutexLock lock(&mu_);
  while (pending_ > 0) done_cv_.Wait(&mu_);
  fn_ = nullptr;
}

void ThreadPool::WorkerLoop(int index) {
  int64_t seen = 0;
  while (true) {
    const absl::FunctionRef<void(int64_t, int64_t)>* fn;
    int64_t n;
    int chunks;
    for (int i = 0; i < kPolls && published_generation_.load(std::memory_order_acquire) == seen;
         ++i) {
      Pause();
    }
    {
      absl::MutexLock lock(&mu_);
      while (!stop_ && generation_ == seen) work_cv_.Wait(&mu_);
      if (stop_) return;
      seen = generation_;
      if (index >= chunks_) continue;  // this loop has fewer chunks than threads
      fn = fn_;
      n = n_;
      chunks = chunks_;
    }
    const auto [begin, end] = ChunkBounds(n, chunks, index);
    (*fn)(begin, end);
    absl::MutexLock lock(&mu_);
    published_pending_.store(--pending_, std::memory_order_release);
    if (pending_ == 0) done_cv_.Signal();
  }
}

}  // namespace optd
