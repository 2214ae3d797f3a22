// A queue of the CUDA backend: a compute stream and a copy stream, the cuBLAS and cuSOLVER handles
// bound to it, pinned staging slots for uploads from pageable memory, and a scratch arena; and the
// device memory (pool and budget) every buffer and queue of a backend shares.
//
// Sessions step from several host threads on one queue: the handles are not thread-safe and the
// arena and staging slots are the queue's state, so every use goes through mu(), which serializes
// the calls (ABSL_EXCLUSIVE_LOCKS_REQUIRED below; clang's -Wthread-safety checks it, a test).
#ifndef OPTD_KERNELS_CUDA_QUEUE_H_
#define OPTD_KERNELS_CUDA_QUEUE_H_

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_status.h"

namespace optd {

// What the backend's buffers share, alive while any buffer is: the pool, the stream frees run
// on, and the budget's count.
struct DeviceMemory {
  int device = 0;
  cudaMemPool_t pool = nullptr;
  cudaStream_t stream = nullptr;  // allocations and frees of buffers
  int64_t budget = 0;
  std::atomic<int64_t> used{0};

  // Charges `bytes` to the budget; RESOURCE_EXHAUSTED, charging nothing, beyond it.
  absl::Status Charge(int64_t bytes, size_t asked) {
    const int64_t before = used.fetch_add(bytes);
    if (before + bytes > budget) {
      used.fetch_sub(bytes);
      return absl::ResourceExhaustedError(absl::StrCat(
          "cuda backend: ", asked, " more bytes would exceed the device memory budget of ", budget,
          " bytes (", before, " in use)"));
    }
    return absl::OkStatus();
  }

  // `bytes` (a multiple of 256) from the pool, charged to the budget, usable by every stream on
  // return. RESOURCE_EXHAUSTED, charging nothing, beyond the budget or what the device has.
  // Everything the backend holds comes from here: memory a freed buffer left in the pool serves
  // the next request, whoever makes it.
  absl::StatusOr<void*> Take(int64_t bytes, size_t asked) {
    OPTD_RETURN_IF_ERROR(Charge(bytes, asked));
    void* data = nullptr;
    absl::Status status = CudaStatus(cudaSetDevice(device), "cudaSetDevice");
    if (status.ok()) {
      status = CudaStatus(cudaMallocFromPoolAsync(&data, bytes, pool, stream),
                          "cudaMallocFromPoolAsync");
    }
    if (status.ok()) status = CudaStatus(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    if (!status.ok()) {
      used.fetch_sub(bytes);
      if (status.code() == absl::StatusCode::kResourceExhausted) {
        return absl::ResourceExhaustedError(absl::StrCat("cuda backend: the device has no ", asked,
                                                         " bytes free: ", status.message()));
      }
      return status;
    }
    return data;
  }
  // Returns Take's memory to the pool, in order on `stream`. REQUIRES: no work still uses it.
  void Give(void* data, int64_t bytes) {
    IgnoreCudaError(cudaSetDevice(device));
    IgnoreCudaError(cudaFreeAsync(data, stream));
    used.fetch_sub(bytes);
  }

  ~DeviceMemory() {
    if (stream != nullptr) {
      IgnoreCudaError(cudaStreamSynchronize(stream));
      IgnoreCudaError(cudaStreamDestroy(stream));
    }
    if (pool != nullptr) IgnoreCudaError(cudaMemPoolDestroy(pool));
  }
};

class CudaQueue : public Queue {
 public:
  explicit CudaQueue(std::shared_ptr<DeviceMemory> memory) : memory_(std::move(memory)) {}
  // Waits for both streams, then frees the handles, slots, events, scratch and streams.
  ~CudaQueue() override;

  // Creates the streams (at `priority`), handles (TF32 only with `allow_tf32`), the cuBLAS
  // workspace (charged to the budget), the staging slots and events.
  absl::Status Init(int priority, bool allow_tf32);

  absl::Mutex& mu() ABSL_LOCK_RETURNED(mu_) { return mu_; }
  // Set by Init, fixed after it; what is enqueued on them is ordered by mu().
  cudaStream_t stream() const { return stream_; }
  cublasHandle_t blas() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return blas_; }
  cusolverDnHandle_t solver() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return solver_; }

  // Work enqueued from BeginRecording on is captured into a graph, not run.
  bool recording() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return recording_; }
  void set_recording(bool recording) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { recording_ = recording; }

  // Copies host memory the GPU cannot read directly (pageable) through pinned staging slots on
  // the copy stream: the host fills slot k+1 while slot k's DMA runs, returns once the last
  // chunk is staged, and the compute stream's later work waits for the copies.
  // Whether it succeeds or fails, no copy it enqueued outlives the compute stream's later work.
  absl::Status StagedUpload(void* dst, const void* src, size_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Copies page-locked (pinned or registered) or managed memory directly on the copy stream,
  // after the compute stream's earlier work, and returns once the copy is done, failed or not:
  // `src` may change then.
  absl::Status DirectUpload(void* dst, const void* src, size_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Device scratch for one operation, from blocks the queue keeps (charged to the budget), so
  // that a recorded step allocates nothing: Begin, then Take the arrays, all valid until the next
  // Begin; stream order keeps one operation's use of a block before the next one's.
  void BeginScratch() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    block_ = 0;
    offset_ = 0;
  }
  absl::StatusOr<void*> TakeScratch(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // What an array of `bytes` takes of a block (256-byte aligned).
  static size_t ScratchArrayBytes(size_t bytes) {
    return std::max<size_t>(256, (bytes + 255) / 256 * 256);
  }
  // Makes sure one block holds `bytes` (arrays' ScratchArrayBytes summed): an operation that
  // takes no more never allocates. RESOURCE_EXHAUSTED beyond the budget or the device.
  absl::Status ReserveScratch(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

 private:
  // Allocates a scratch block of `size` bytes, charged to the budget.
  absl::Status AddScratchBlock(size_t size) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // StagedUpload's chunks, after the copy stream has been ordered after the compute stream.
  absl::Status CopyThroughSlots(void* dst, const void* src, size_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // An upload's frame: orders the copy stream after the compute stream's earlier work, runs
  // `enqueue` (the copies, on copy_stream_), then orders the compute stream's later work after
  // them, failed or not; with `wait`, or after a failure, returns once the copies are done.
  absl::Status OnCopyStream(absl::FunctionRef<absl::Status()> enqueue, bool wait)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  static constexpr size_t kStagingBytes = size_t{4} << 20;
  static constexpr int64_t kBlasWorkspace = int64_t{32} << 20;
  struct StagingSlot {
    void* host = nullptr;
    cudaEvent_t copied = nullptr;
  };
  struct ScratchBlock {
    void* data;
    size_t bytes;
  };

  std::shared_ptr<DeviceMemory> memory_;
  absl::Mutex mu_;
  // Created by Init, destroyed by the destructor.
  cudaStream_t stream_ = nullptr;
  cudaStream_t copy_stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  cusolverDnHandle_t solver_ = nullptr;
  void* blas_workspace_ = nullptr;
  std::array<StagingSlot, 3> staging_;
  cudaEvent_t copies_done_ = nullptr;
  cudaEvent_t compute_mark_ = nullptr;
  // The queue's state between calls.
  size_t next_slot_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<ScratchBlock> scratch_ ABSL_GUARDED_BY(mu_);
  size_t block_ ABSL_GUARDED_BY(mu_) = 0;
  size_t offset_ ABSL_GUARDED_BY(mu_) = 0;
  bool recording_ ABSL_GUARDED_BY(mu_) = false;
};

// One operation's scratch arrays (CudaQueue::TakeScratch).
class Scratch {
 public:
  explicit Scratch(CudaQueue& queue) ABSL_EXCLUSIVE_LOCKS_REQUIRED(queue.mu()) : queue_(queue) {
    queue_.BeginScratch();
  }
  // REQUIRES: the queue's mu(), as at construction (asserted: the analysis cannot tie queue_ to
  // the caller's name for the queue).
  template <typename T>
  absl::StatusOr<T*> Get(int64_t count) {
    queue_.mu().AssertHeld();
    OPTD_ASSIGN_OR_RETURN(void* p, queue_.TakeScratch(static_cast<size_t>(count) * sizeof(T)));
    return static_cast<T*>(p);
  }

 private:
  CudaQueue& queue_;
};

}  // namespace optd

#endif  // OPTD_KERNELS_CUDA_QUEUE_H_
