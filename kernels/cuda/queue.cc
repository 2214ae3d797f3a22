#include "kernels/cuda/queue.h"

#include <algorithm>
#include <cstring>

#include "kernels/cuda/cuda_status.h"

namespace optd {

CudaQueue::~CudaQueue() {
  if (stream_ != nullptr) IgnoreCudaError(cudaStreamSynchronize(stream_));
  if (copy_stream_ != nullptr) IgnoreCudaError(cudaStreamSynchronize(copy_stream_));
  if (solver_ != nullptr) cusolverDnDestroy(solver_);
  if (blas_ != nullptr) cublasDestroy(blas_);
  if (blas_workspace_ != nullptr) memory_->Give(blas_workspace_, kBlasWorkspace);
  for (StagingSlot& slot : staging_) {
    if (slot.host != nullptr) IgnoreCudaError(cudaFreeHost(slot.host));
    if (slot.copied != nullptr) IgnoreCudaError(cudaEventDestroy(slot.copied));
  }
  if (copies_done_ != nullptr) IgnoreCudaError(cudaEventDestroy(copies_done_));
  if (compute_mark_ != nullptr) IgnoreCudaError(cudaEventDestroy(compute_mark_));
  for (const ScratchBlock& block : scratch_) {
    memory_->Give(block.data, static_cast<int64_t>(block.bytes));
  }
  if (copy_stream_ != nullptr) IgnoreCudaError(cudaStreamDestroy(copy_stream_));
  if (stream_ != nullptr) IgnoreCudaError(cudaStreamDestroy(stream_));
}

absl::Status CudaQueue::Init(int priority, bool allow_tf32) {
  OPTD_CUDA(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, priority));
  OPTD_CUDA(cudaStreamCreateWithPriority(&copy_stream_, cudaStreamNonBlocking, priority));
  OPTD_CUBLAS(cublasCreate(&blas_));
  OPTD_CUBLAS(cublasSetStream(blas_, stream_));
  // A workspace of its own keeps cuBLAS from allocating inside a step (and inside a graph);
  // charged to the budget like the sessions' buffers.
  OPTD_ASSIGN_OR_RETURN(blas_workspace_, memory_->Take(kBlasWorkspace, kBlasWorkspace));
  OPTD_CUBLAS(cublasSetWorkspace(blas_, blas_workspace_, kBlasWorkspace));
  OPTD_CUBLAS(
      cublasSetMathMode(blas_, allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  OPTD_CUSOLVER(cusolverDnCreate(&solver_));
  OPTD_CUSOLVER(cusolverDnSetStream(solver_, stream_));
  for (StagingSlot& slot : staging_) {
    OPTD_CUDA(cudaMallocHost(&slot.host, kStagingBytes));
    OPTD_CUDA(cudaEventCreateWithFlags(&slot.copied, cudaEventDisableTiming));
  }
  OPTD_CUDA(cudaEventCreateWithFlags(&copies_done_, cudaEventDisableTiming));
  OPTD_CUDA(cudaEventCreateWithFlags(&compute_mark_, cudaEventDisableTiming));
  return absl::OkStatus();
}

absl::Status CudaQueue::StagedUpload(void* dst, const void* src, size_t bytes) {
  return OnCopyStream(
      [&] {
        mu_.AssertHeld();  // held by the caller (the analysis cannot follow it into the lambda)
        return CopyThroughSlots(dst, src, bytes);
      },
      /*wait=*/false);
}

absl::Status CudaQueue::CopyThroughSlots(void* dst, const void* src, size_t bytes) {
  for (size_t offset = 0; offset < bytes; offset += kStagingBytes) {
    StagingSlot& slot = staging_[next_slot_];
    next_slot_ = (next_slot_ + 1) % staging_.size();
    const size_t n = std::min(kStagingBytes, bytes - offset);
    OPTD_CUDA(cudaEventSynchronize(slot.copied));  // the slot's previous DMA is done
    std::memcpy(slot.host, static_cast<const char*>(src) + offset, n);
    OPTD_CUDA(cudaMemcpyAsync(static_cast<char*>(dst) + offset, slot.host, n,
                              cudaMemcpyHostToDevice, copy_stream_));
    OPTD_CUDA(cudaEventRecord(slot.copied, copy_stream_));
  }
  return absl::OkStatus();
}

absl::Status CudaQueue::DirectUpload(void* dst, const void* src, size_t bytes) {
  // The DMA reads `src` itself: the caller may change it once Upload returns, so this waits for
  // the copy.
  return OnCopyStream(
      [&] {
        return CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, copy_stream_),
                          "cudaMemcpyAsync");
      },
      /*wait=*/true);
}

absl::Status CudaQueue::OnCopyStream(absl::FunctionRef<absl::Status()> enqueue, bool wait) {
  // The copies may overwrite what earlier compute work still reads.
  OPTD_CUDA(cudaEventRecord(compute_mark_, stream_));
  OPTD_CUDA(cudaStreamWaitEvent(copy_stream_, compute_mark_, 0));
  const absl::Status status = enqueue();
  // Whatever was enqueued, failed or not, the compute stream's later work (and so Synchronize,
  // which a buffer's owner calls before freeing it) waits for: copies still running when a later
  // one failed must not land in memory that has been freed and handed out again.
  absl::Status ordered = CudaStatus(cudaEventRecord(copies_done_, copy_stream_), "cudaEventRecord");
  if (ordered.ok()) {
    ordered = CudaStatus(cudaStreamWaitEvent(stream_, copies_done_, 0), "cudaStreamWaitEvent");
  }
  if (ordered.ok() && wait) {
    ordered = CudaStatus(cudaEventSynchronize(copies_done_), "cudaEventSynchronize");
  }
  // A failed upload returns only once nothing it enqueued still runs.
  if (!status.ok() || !ordered.ok()) IgnoreCudaError(cudaStreamSynchronize(copy_stream_));
  return status.ok() ? ordered : status;
}

absl::StatusOr<void*> CudaQueue::TakeScratch(size_t bytes) {
  bytes = ScratchArrayBytes(bytes);
  while (block_ < scratch_.size() && offset_ + bytes > scratch_[block_].bytes) {
    ++block_;
    offset_ = 0;
  }
  if (block_ == scratch_.size()) {
    if (recording_) {
      return absl::FailedPreconditionError(
          "cuda backend: a recorded step needs more scratch than its queue holds");
    }
    OPTD_RETURN_IF_ERROR(AddScratchBlock(std::max(
        {bytes, size_t{1} << 20, scratch_.empty() ? size_t{0} : 2 * scratch_.back().bytes})));
  }
  void* p = static_cast<char*>(scratch_[block_].data) + offset_;
  offset_ += bytes;
  return p;
}

absl::Status CudaQueue::ReserveScratch(size_t bytes) {
  // An operation's arrays are taken in order and move on to the next block when one does not
  // fit, so once they reach a block that holds them all the rest fit there too.
  for (const ScratchBlock& block : scratch_) {
    if (block.bytes >= bytes) return absl::OkStatus();
  }
  return AddScratchBlock(std::max(bytes, size_t{1} << 20));
}

absl::Status CudaQueue::AddScratchBlock(size_t size) {
  size = (size + 255) / 256 * 256;
  OPTD_ASSIGN_OR_RETURN(void* data, memory_->Take(static_cast<int64_t>(size), size));
  scratch_.push_back({data, size});
  return absl::OkStatus();
}

}  // namespace optd
