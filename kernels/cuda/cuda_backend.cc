// The CUDA backend: cuBLAS for the products, cuSOLVER (fp64 Jacobi) for the SVD, and optd's own
// kernels (launch.h) for everything else, each applying the formulas the CPU backend applies.
//
// Memory comes from a stream-ordered pool of the backend's own that keeps freed memory for reuse
// (a caching arena), under a byte budget: beyond it Allocate is RESOURCE_EXHAUSTED, never an
// abort. Temporaries an operation needs (partial sums, the SVD's fp64 copies) come from its
// queue's scratch blocks (queue.h), taken from the same pool and reserved when an optimizer is
// created (ReserveScratch), so a step never asks for memory half-way.
//
// Sessions step from several host threads on one queue: each queue has its own cuBLAS and
// cuSOLVER handles and a mutex that serializes the calls made through them. Work of different
// sessions interleaves on the stream, each session's in its own order.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/cleanup/cleanup.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "kernels/backend.h"
#include "kernels/backend_checks.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/queue.h"
#include "kernels/formulas.h"

namespace optd {
namespace {

int DTypeCode(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return cuda::kBF16;
    case DType::kF16:
      return cuda::kF16;
    default:
      return cuda::kF32;
  }
}

cudaDataType_t CudaType(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kF16:
      return CUDA_R_16F;
    default:
      return CUDA_R_32F;
  }
}

cublasOperation_t ToCublas(Transpose t) { return t == Transpose::kYes ? CUBLAS_OP_T : CUBLAS_OP_N; }

// cuBLAS and cuSOLVER take 32-bit sizes.
absl::Status CheckInt(absl::string_view op, std::initializer_list<int64_t> sizes) {
  for (int64_t size : sizes) {
    if (size > INT_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": size ", size, " exceeds cuBLAS's 32-bit limit"));
    }
  }
  return absl::OkStatus();
}

// A recorded step, instantiated (CUDA graph exec).
class CudaStepGraph : public StepGraph {
 public:
  explicit CudaStepGraph(cudaGraphExec_t exec) : exec_(exec) {}
  ~CudaStepGraph() override { IgnoreCudaError(cudaGraphExecDestroy(exec_)); }
  cudaGraphExec_t exec() const { return exec_; }

 private:
  cudaGraphExec_t exec_;
};

class CudaBackend : public Backend {
 public:
  CudaBackend(std::shared_ptr<DeviceMemory> memory, std::unique_ptr<CudaQueue> queue,
              std::string description, const CudaBackendOptions& options)
      : memory_(std::move(memory)),
        queue_(std::move(queue)),
        description_(std::move(description)),
        allow_tf32_(options.allow_tf32),
        step_graphs_(options.step_graphs) {}

  ~CudaBackend() override { queue_.reset(); }

  absl::string_view name() const override { return "cuda"; }
  std::string description() const override { return description_; }

  Queue& default_queue() override { return *queue_; }

  absl::StatusOr<std::unique_ptr<Queue>> CreateQueue(QueuePriority priority) override {
    OPTD_CUDA(cudaSetDevice(memory_->device));
    int least = 0, greatest = 0;  // numerically: least is the lowest priority
    OPTD_CUDA(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    auto queue = std::make_unique<CudaQueue>(memory_);
    OPTD_RETURN_IF_ERROR(
        queue->Init(priority == QueuePriority::kLow ? least : greatest, allow_tf32_));
    return queue;
  }

  absl::Status BeginRecording(Queue& queue) override {
    if (!step_graphs_) {
      return absl::UnimplementedError("cuda backend: step graphs are switched off");
    }
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    if (q.recording()) return absl::FailedPreconditionError("cuda backend: already recording");
    OPTD_CUDA(cudaStreamBeginCapture(q.stream(), cudaStreamCaptureModeThreadLocal));
    q.set_recording(true);
    return absl::OkStatus();
  }

  absl::Status Replay(Queue& queue, const StepGraph& graph) override {
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_CUDA(cudaGraphLaunch(static_cast<const CudaStepGraph&>(graph).exec(), q.stream()));
    return absl::OkStatus();
  }

  absl::Status EndRecording(Queue& queue, std::unique_ptr<StepGraph>* graph) override {
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    if (!q.recording()) return absl::FailedPreconditionError("cuda backend: not recording");
    q.set_recording(false);
    cudaGraph_t recorded = nullptr;
    OPTD_CUDA(cudaStreamEndCapture(q.stream(), &recorded));
    absl::Cleanup destroy = [recorded] { IgnoreCudaError(cudaGraphDestroy(recorded)); };
    if (graph == nullptr) return absl::OkStatus();
    if (*graph != nullptr) {
      cudaGraphExecUpdateResultInfo result;
      const cudaError_t updated =
          cudaGraphExecUpdate(static_cast<CudaStepGraph&>(**graph).exec(), recorded, &result);
      if (updated != cudaSuccess) {
        IgnoreCudaError(updated);  // a different shape: instantiate anew below
        graph->reset();
      }
    }
    if (*graph == nullptr) {
      cudaGraphExec_t exec = nullptr;
      OPTD_CUDA(cudaGraphInstantiate(&exec, recorded, 0));
      *graph = std::make_unique<CudaStepGraph>(exec);
    }
    OPTD_CUDA(cudaGraphLaunch(static_cast<CudaStepGraph&>(**graph).exec(), q.stream()));
    return absl::OkStatus();
  }

  absl::Status Synchronize(Queue& queue) override {
    OPTD_CUDA(cudaSetDevice(memory_->device));
    OPTD_CUDA(cudaStreamSynchronize(Q(queue).stream()));
    return absl::OkStatus();
  }

  absl::StatusOr<Buffer> Allocate(size_t bytes) override {
    if (bytes == 0) return Buffer();
    const int64_t size = static_cast<int64_t>((bytes + 255) / 256 * 256);
    OPTD_ASSIGN_OR_RETURN(void* data, memory_->Take(size, bytes));
    std::shared_ptr<DeviceMemory> memory = memory_;
    // Buffers are released between steps, after their work has been synchronized.
    return Buffer(data, bytes, [memory, size](void* p) { memory->Give(p, size); });
  }

  absl::Status ReserveScratch(Queue& queue, const ScratchNeeds& needs) override {
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_ASSIGN_OR_RETURN(const size_t bytes, ScratchBytes(q, needs));
    return q.ReserveScratch(bytes);
  }

  absl::Status Upload(Queue& queue, void* dst, const void* src, size_t bytes) override {
    if (bytes == 0 || dst == nullptr || src == nullptr) return Copy(queue, dst, src, bytes);
    // Upload returns once `src` may change: pageable memory is staged through pinned slots,
    // page-locked and managed memory is copied directly and waited for; device memory is a
    // device copy.
    CudaQueue& q = Enter(queue);
    cudaPointerAttributes attributes;
    OPTD_CUDA(cudaPointerGetAttributes(&attributes, src));
    if (attributes.type == cudaMemoryTypeDevice) return Copy(queue, dst, src, bytes);
    absl::MutexLock lock(&q.mu());
    // Both wait on the host: inside a recording they would break it (and record the staging
    // slots' addresses).
    if (q.recording()) {
      return absl::FailedPreconditionError("cuda backend: an upload cannot be recorded");
    }
    if (attributes.type == cudaMemoryTypeUnregistered) return q.StagedUpload(dst, src, bytes);
    return q.DirectUpload(dst, src, bytes);
  }
  absl::Status Download(Queue& queue, void* dst, const void* src, size_t bytes) override {
    return Copy(queue, dst, src, bytes);
  }
  absl::Status Copy(Queue& queue, void* dst, const void* src, size_t bytes) override {
    if (bytes > 0 && (dst == nullptr || src == nullptr)) {
      return absl::InvalidArgumentError("copy: null pointer");
    }
    if (bytes == 0 || dst == src) return absl::OkStatus();
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, q.stream()));
    return absl::OkStatus();
  }

  absl::Status Fill(Queue& queue, float* x, int64_t count, float value) override {
    OPTD_RETURN_IF_ERROR(CheckCount("fill", count, x));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_CUDA(cuda::Fill(q.stream(), x, count, value));
    return absl::OkStatus();
  }

  absl::Status Convert(Queue& queue, const void* src, DType src_dtype, void* dst, DType dst_dtype,
                       int64_t count) override {
    OPTD_RETURN_IF_ERROR(CheckCount("convert", count, src));
    OPTD_RETURN_IF_ERROR(CheckCount("convert", count, dst));
    if (src_dtype == DType::kF64 || dst_dtype == DType::kF64) {
      return absl::InvalidArgumentError("convert: dtypes are fp32, bf16 or fp16 (the wire dtypes)");
    }
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_CUDA(
        cuda::Convert(q.stream(), src, DTypeCode(src_dtype), dst, DTypeCode(dst_dtype), count));
    return absl::OkStatus();
  }

  absl::Status RoundTo(Queue& queue, float* x, int64_t count, DType dtype) override {
    OPTD_RETURN_IF_ERROR(CheckCount("round", count, x));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_CUDA(cuda::RoundTo(q.stream(), x, count, DTypeCode(dtype)));
    return absl::OkStatus();
  }

  absl::StatusOr<int64_t> CountOutOfRange(Queue& queue, const float* x, int64_t count,
                                          float max_magnitude) override {
    OPTD_ASSIGN_OR_RETURN(const std::vector<int64_t> bad,
                          CountOutOfRangeEach(queue, {x}, {count}, max_magnitude));
    return bad[0];
  }

  absl::StatusOr<std::vector<int64_t>> CountOutOfRangeEach(Queue& queue,
                                                           const std::vector<const float*>& xs,
                                                           const std::vector<int64_t>& counts,
                                                           float max_magnitude) override {
    if (xs.size() != counts.size()) {
      return absl::InvalidArgumentError(absl::StrCat("count out of range: ", xs.size(),
                                                     " arrays but ", counts.size(), " counts"));
    }
    for (size_t i = 0; i < xs.size(); ++i) {
      OPTD_RETURN_IF_ERROR(CheckCount("count out of range", counts[i], xs[i]));
    }
    std::vector<int64_t> bad(xs.size(), 0);
    if (xs.empty()) return bad;
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    cudaStream_t stream = q.stream();
    // One launch over a table of the arrays (a step checks every gradient of the session).
    Scratch scratch(q);
    const int64_t n = static_cast<int64_t>(xs.size());
    OPTD_ASSIGN_OR_RETURN(unsigned long long* device, scratch.Get<unsigned long long>(n));
    OPTD_ASSIGN_OR_RETURN(const float** table, scratch.Get<const float*>(n));
    OPTD_ASSIGN_OR_RETURN(int64_t * sizes, scratch.Get<int64_t>(n));
    OPTD_CUDA(cudaMemsetAsync(device, 0, n * sizeof(unsigned long long), stream));
    OPTD_CUDA(cudaMemcpyAsync(table, xs.data(), n * sizeof(const float*), cudaMemcpyHostToDevice,
                              stream));
    OPTD_CUDA(
        cudaMemcpyAsync(sizes, counts.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice, stream));
    const int64_t max_count = *std::max_element(counts.begin(), counts.end());
    OPTD_CUDA(
        cuda::CountOutOfRangeTable(stream, table, sizes, n, max_count, max_magnitude, device));
    std::vector<unsigned long long> host(xs.size());
    OPTD_CUDA(cudaMemcpyAsync(host.data(), device, host.size() * sizeof(unsigned long long),
                              cudaMemcpyDeviceToHost, stream));
    OPTD_CUDA(cudaStreamSynchronize(stream));
    for (size_t i = 0; i < xs.size(); ++i) bad[i] = static_cast<int64_t>(host[i]);
    return bad;
  }

  absl::Status Gemm(Queue& queue, const GemmArgs& g) override {
    OPTD_ASSIGN_OR_RETURN(const bool work, CheckGemm(g));
    if (!work) return absl::OkStatus();
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    return GemmLocked(q, g.trans_a, g.trans_b, g.m, g.n, g.k, g.alpha, g.a, g.lda, g.stride_a, g.b,
                      g.ldb, g.stride_b, g.beta, g.c, g.ldc, g.stride_c, g.batch, g.input_dtype,
                      DType::kF32);
  }

  absl::Status SymmetricRankK(Queue& queue, const SyrkArgs& s) override {
    OPTD_ASSIGN_OR_RETURN(const bool work, CheckSyrk(s));
    if (!work) return absl::OkStatus();
    OPTD_RETURN_IF_ERROR(CheckInt("syrk", {s.n, s.k, s.lda, s.ldc}));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    // Row-major buffers read column-major are the transposes: the row-major upper triangle is
    // the column-major lower one, and A·Aᵀ of a row-major n×k A is MᵀM of the k×n M it reads as.
    const cublasOperation_t op = s.trans == Transpose::kYes ? CUBLAS_OP_N : CUBLAS_OP_T;
    if (s.b != nullptr) {
      OPTD_RETURN_IF_ERROR(CheckInt("syrkx", {s.ldb}));
      // Column-major element (j, i), j >= i, is row-major (i, j) = Σ op(A)[i,p]·op(B)[j,p]:
      // syrkx's first operand is B, its second A, so every element is the CPU's product.
      for (int64_t i = 0; i < s.batch; ++i) {
        OPTD_CUBLAS(cublasSsyrkx(
            q.blas(), CUBLAS_FILL_MODE_LOWER, op, static_cast<int>(s.n), static_cast<int>(s.k),
            &s.alpha, s.b + i * s.stride_b, static_cast<int>(s.ldb), s.a + i * s.stride_a,
            static_cast<int>(s.lda), &s.beta, s.c + i * s.stride_c, static_cast<int>(s.ldc)));
      }
      return absl::OkStatus();
    }
    for (int64_t i = 0; i < s.batch; ++i) {
      OPTD_CUBLAS(cublasSsyrk(q.blas(), CUBLAS_FILL_MODE_LOWER, op, static_cast<int>(s.n),
                              static_cast<int>(s.k), &s.alpha, s.a + i * s.stride_a,
                              static_cast<int>(s.lda), &s.beta, s.c + i * s.stride_c,
                              static_cast<int>(s.ldc)));
    }
    return absl::OkStatus();
  }

  absl::Status SymmetricMultiply(Queue& queue, const SymmArgs& s) override {
    OPTD_ASSIGN_OR_RETURN(const bool work, CheckSymm(s));
    if (!work) return absl::OkStatus();
    OPTD_RETURN_IF_ERROR(CheckInt("symm", {s.m, s.n, s.lds, s.ldb, s.ldc}));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    // Column-major, C becomes Cᵀ (n×m): S·B turns into Bᵀ·S (side right) and B·S into S·Bᵀ.
    const cublasSideMode_t side = s.side == Side::kLeft ? CUBLAS_SIDE_RIGHT : CUBLAS_SIDE_LEFT;
    for (int64_t i = 0; i < s.batch; ++i) {
      OPTD_CUBLAS(cublasSsymm(
          q.blas(), side, CUBLAS_FILL_MODE_LOWER, static_cast<int>(s.n), static_cast<int>(s.m),
          &s.alpha, s.s + i * s.stride_s, static_cast<int>(s.lds), s.b + i * s.stride_b,
          static_cast<int>(s.ldb), &s.beta, s.c + i * s.stride_c, static_cast<int>(s.ldc)));
    }
    return absl::OkStatus();
  }

  absl::Status SingularValueDecomposition(Queue& queue, const MatrixBatch& a, float* s, float* u,
                                          float* vt) override {
    OPTD_RETURN_IF_ERROR(CheckMatrixBatch("svd", a));
    const int64_t m = a.rows, n = a.cols, k = std::min(m, n);
    if (a.size() == 0 || k == 0) return absl::OkStatus();
    if (s == nullptr) return absl::InvalidArgumentError("svd: null singular value output");
    OPTD_RETURN_IF_ERROR(CheckInt("svd", {m, n}));
    OPTD_ASSIGN_OR_RETURN(const int64_t bad, CountOutOfRange(queue, a.data, a.size(),
                                                             std::numeric_limits<float>::max()));
    if (bad > 0) return NonFiniteSvdInput(queue, a);
    const bool vectors = u != nullptr || vt != nullptr;
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    cudaStream_t stream = q.stream();
    // A row-major m×n matrix read column-major is M = Aᵀ (n×m). cuSOLVER's M = U'·Σ·V'ᵀ gives
    // A = V'·Σ·U'ᵀ: A's u is V' transposed into row-major, and its vᵀ is U' as it lies.
    Scratch scratch(q);
    OPTD_ASSIGN_OR_RETURN(double* work_a, scratch.Get<double>(m * n));
    OPTD_ASSIGN_OR_RETURN(double* sd, scratch.Get<double>(a.batch * k));
    OPTD_ASSIGN_OR_RETURN(double* ud, scratch.Get<double>(a.batch * n * k));  // U' (n×k)
    OPTD_ASSIGN_OR_RETURN(double* vd, scratch.Get<double>(a.batch * m * k));  // V' (m×k)
    OPTD_ASSIGN_OR_RETURN(int* info, scratch.Get<int>(a.batch));
    OPTD_ASSIGN_OR_RETURN(const GesvdjParams params, NewGesvdjParams());
    const cusolverEigMode_t mode = vectors ? CUSOLVER_EIG_MODE_VECTOR : CUSOLVER_EIG_MODE_NOVECTOR;
    const int rows = static_cast<int>(n), cols = static_cast<int>(m);
    OPTD_ASSIGN_OR_RETURN(const int lwork, GesvdjWorkspace(q, mode, m, n, params.get()));
    OPTD_ASSIGN_OR_RETURN(double* work, scratch.Get<double>(lwork));
    for (int64_t b = 0; b < a.batch; ++b) {
      OPTD_CUDA(cuda::Widen(stream, a.data + b * m * n, work_a, m * n));
      OPTD_CUSOLVER(cusolverDnDgesvdj(q.solver(), mode, 1, rows, cols, work_a, rows, sd + b * k,
                                      ud + b * n * k, rows, vd + b * m * k, cols, work, lwork,
                                      info + b, params.get()));
    }
    std::vector<int> host_info(a.batch);
    OPTD_CUDA(cudaMemcpyAsync(host_info.data(), info, a.batch * sizeof(int), cudaMemcpyDeviceToHost,
                              stream));
    OPTD_CUDA(cudaStreamSynchronize(stream));
    for (int64_t b = 0; b < a.batch; ++b) {
      if (host_info[b] != 0) {
        return absl::InternalError(absl::StrCat(
            "svd: cusolverDnDgesvdj failed with info=", host_info[b], " on matrix ", b));
      }
    }
    // Every matrix is decomposed: only now are the outputs written.
    OPTD_CUDA(cuda::Narrow(stream, sd, s, a.batch * k));
    if (vt != nullptr) OPTD_CUDA(cuda::Narrow(stream, ud, vt, a.batch * k * n));
    if (u != nullptr) OPTD_CUDA(cuda::NarrowTransposed(stream, vd, u, a.batch, m, k));
    return absl::OkStatus();
  }

  absl::Status ZeroSmallSingularVectors(Queue& queue, float* u, const float* s, int64_t batch,
                                        int64_t rows, int64_t k,
                                        float relative_tolerance) override {
    OPTD_RETURN_IF_ERROR(CheckCount("zero small singular vectors", batch * rows * k, u));
    OPTD_RETURN_IF_ERROR(CheckCount("zero small singular vectors", batch * k, s));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_CUDA(cuda::ZeroSmallSingularVectors(q.stream(), u, s, batch, rows, k, relative_tolerance));
    return absl::OkStatus();
  }

  absl::Status Symmetrize(Queue& queue, float* a, int64_t n, int64_t batch) override {
    OPTD_RETURN_IF_ERROR(CheckCount("symmetrize", batch * n * n, a));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_CUDA(cuda::Symmetrize(q.stream(), a, n, batch));
    return absl::OkStatus();
  }

  absl::Status AddDiagonal(Queue& queue, float* a, int64_t n, int64_t batch, float value) override {
    OPTD_RETURN_IF_ERROR(CheckCount("add diagonal", batch * n * n, a));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_CUDA(cuda::AddDiagonal(q.stream(), a, n, batch, value));
    return absl::OkStatus();
  }

  absl::Status FrobeniusNormalize(Queue& queue, const MatrixBatch& x, float safety, float eps,
                                  formulas::NormEpsilon mode, DType norm_dtype) override {
    OPTD_RETURN_IF_ERROR(CheckMatrixBatch("frobenius normalize", x));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    return FrobeniusNormalizeLocked(q, x, safety, eps, mode, norm_dtype);
  }

  absl::Status RowSumSquares(Queue& queue, const float* x, int64_t rows, int64_t cols,
                             float* out) override {
    OPTD_RETURN_IF_ERROR(CheckCount("row sum of squares", rows * cols, x));
    OPTD_RETURN_IF_ERROR(CheckCount("row sum of squares", rows, out));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_CUDA(cuda::RowSumSquares(q.stream(), x, rows, cols, out));
    return absl::OkStatus();
  }

  absl::Status ColumnSumSquares(Queue& queue, const MatrixBatch& x, float* out) override {
    OPTD_RETURN_IF_ERROR(CheckMatrixBatch("column sum of squares", x));
    OPTD_RETURN_IF_ERROR(CheckCount("column sum of squares", x.batch * x.cols, out));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_CUDA(cuda::ColumnSumSquares(q.stream(), x.data, x.batch, x.rows, x.cols, out));
    return absl::OkStatus();
  }

  absl::Status Equilibrate(Queue& queue, const MatrixBatch& x, const EquilibrateArgs& args,
                           float* scratch) override {
    OPTD_RETURN_IF_ERROR(CheckMatrixBatch("equilibrate", x));
    OPTD_RETURN_IF_ERROR(CheckCount("equilibrate", x.batch * (x.rows + x.cols), scratch));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    // Both factors come from the unnormalized input (seed 001's rowcol squares u once).
    float* row_factors = args.rows ? scratch : nullptr;
    float* col_factors = args.cols ? scratch + x.batch * x.rows : nullptr;
    if (args.rows) {
      OPTD_CUDA(cuda::RowEquilibrationFactors(q.stream(), x.data, x.batch * x.rows, x.cols,
                                              args.eps, args.exponent, args.clip, row_factors));
    }
    if (args.cols) {
      OPTD_CUDA(cuda::ColumnEquilibrationFactors(q.stream(), x.data, x.batch, x.rows, x.cols,
                                                 args.eps, args.exponent, args.clip, col_factors));
    }
    OPTD_CUDA(cuda::ApplyEquilibration(q.stream(), x.data, x.batch, x.rows, x.cols, row_factors,
                                       col_factors));
    return absl::OkStatus();
  }

  absl::Status RowNormalize(Queue& queue, float* x, int64_t rows, int64_t cols,
                            float eps) override {
    OPTD_RETURN_IF_ERROR(CheckCount("row normalize", rows * cols, x));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_CUDA(cuda::RowNormalize(q.stream(), x, rows, cols, eps));
    return absl::OkStatus();
  }

  absl::Status NorMuonNormalize(Queue& queue, const MatrixBatch& o, float* v,
                                const NorMuonArgs& args) override {
    OPTD_RETURN_IF_ERROR(CheckMatrixBatch("normuon normalize", o));
    OPTD_RETURN_IF_ERROR(CheckCount("normuon normalize", o.batch * o.rows, v));
    if (o.size() == 0) return absl::OkStatus();
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    cudaStream_t stream = q.stream();
    Scratch scratch(q);
    double* before = nullptr;
    double* after = nullptr;
    double* partials = nullptr;
    if (args.preserve_frobenius) {
      OPTD_ASSIGN_OR_RETURN(before, scratch.Get<double>(o.batch));
      OPTD_ASSIGN_OR_RETURN(after, scratch.Get<double>(o.batch));
      OPTD_ASSIGN_OR_RETURN(partials, scratch.Get<double>(o.batch * cuda::SumSquaresBlocks(
                                                                        o.batch, o.matrix_size())));
      OPTD_CUDA(cuda::MatrixSumSquares(stream, o.data, o.batch, o.matrix_size(), partials, before));
    }
    OPTD_CUDA(cuda::NorMuonRows(stream, o.data, v, o.batch * o.rows, o.cols, args.one_minus_beta2,
                                args.eps));
    if (args.preserve_frobenius) {
      OPTD_CUDA(cuda::MatrixSumSquares(stream, o.data, o.batch, o.matrix_size(), partials, after));
      OPTD_CUDA(cuda::NorMuonPreserveNorm(stream, o.data, o.batch, o.matrix_size(), before, after,
                                          args.eps));
    }
    return absl::OkStatus();
  }

  absl::Status ScaleToRms(Queue& queue, const MatrixBatch& x, float rms, float eps) override {
    OPTD_RETURN_IF_ERROR(CheckMatrixBatch("scale to rms", x));
    if (x.size() == 0) return absl::OkStatus();
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    Scratch scratch(q);
    OPTD_ASSIGN_OR_RETURN(double* sums, MatrixSums(q, scratch, x));
    const float target = rms * std::sqrt(static_cast<float>(x.matrix_size()));
    OPTD_CUDA(cuda::ScaleToNorm(q.stream(), x.data, x.batch, x.matrix_size(), sums, target, eps));
    return absl::OkStatus();
  }

  absl::Status Momentum(Queue& queue, float* m, const float* g, float* u, int64_t count,
                        const formulas::MomentumScalars& scalars) override {
    OPTD_RETURN_IF_ERROR(CheckCount("momentum", count, m));
    OPTD_RETURN_IF_ERROR(CheckCount("momentum", count, g));
    OPTD_RETURN_IF_ERROR(CheckCount("momentum", count, u));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_CUDA(cuda::Momentum(q.stream(), m, g, u, count, scalars));
    return absl::OkStatus();
  }

  absl::Status ApplyUpdate(Queue& queue, float* w, const float* o, int64_t count,
                           const formulas::RateScalars* rate, float scale,
                           DType step_dtype) override {
    OPTD_RETURN_IF_ERROR(CheckCount("apply update", count, w));
    OPTD_RETURN_IF_ERROR(CheckCount("apply update", count, o));
    OPTD_RETURN_IF_ERROR(CheckCount("apply update", 1, rate));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_CUDA(cuda::ApplyUpdate(q.stream(), w, o, count, rate, scale, DTypeCode(step_dtype)));
    return absl::OkStatus();
  }

  absl::Status AdamW(Queue& queue, float* w, float* m, float* v, const float* g, int64_t count,
                     const formulas::AdamWScalars* scalars) override {
    OPTD_RETURN_IF_ERROR(CheckCount("adamw", count, w));
    OPTD_RETURN_IF_ERROR(CheckCount("adamw", count, m));
    OPTD_RETURN_IF_ERROR(CheckCount("adamw", count, v));
    OPTD_RETURN_IF_ERROR(CheckCount("adamw", count, g));
    OPTD_RETURN_IF_ERROR(CheckCount("adamw", 1, scalars));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    OPTD_CUDA(cuda::AdamW(q.stream(), w, m, v, g, count, scalars));
    return absl::OkStatus();
  }

  absl::Status RmnpStep(Queue& queue, float* w, float* m, const float* g, int64_t rows,
                        int64_t cols, const RmnpStepArgs& a) override {
    OPTD_RETURN_IF_ERROR(CheckCount("rmnp step", rows * cols, w));
    OPTD_RETURN_IF_ERROR(CheckCount("rmnp step", rows * cols, m));
    OPTD_RETURN_IF_ERROR(CheckCount("rmnp step", rows * cols, g));
    OPTD_RETURN_IF_ERROR(CheckCount("rmnp step", 1, a.rate));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    const cuda::RmnpScalars scalars{.momentum = a.momentum,
                                    .eps = a.eps,
                                    .scale = a.scale,
                                    .rate = a.rate,
                                    .nesterov = a.nesterov,
                                    .step_dtype = DTypeCode(a.step_dtype)};
    OPTD_CUDA(cuda::RmnpStep(q.stream(), w, m, g, rows, cols, scalars));
    return absl::OkStatus();
  }

  // The composed path's rounding points (newton_schulz.cc), with every product one GEMM of
  // `run.dtype` inputs and fp32 accumulation on the tensor cores, and X held in `run.dtype`:
  //   A = X·Xᵀ (out in dtype: cuBLAS rounds as RoundTo does);  D = c·A·A (fp32);
  //   P = round(D + b·A + a·I) in place of A;  X ← P·X (out in dtype).
  // cuBLAS has no symmetric rank-k update for bf16 or fp16, so A and A·A are full products.
  absl::Status NewtonSchulzNative(Queue& queue, const MatrixBatch& x, const NewtonSchulzRun& run,
                                  float* workspace) override {
    OPTD_RETURN_IF_ERROR(CheckMatrixBatch("newton-schulz", x));
    if (x.size() == 0) return absl::OkStatus();
    if (workspace == nullptr) return absl::InvalidArgumentError("newton-schulz: null workspace");
    if (run.dtype == DType::kF64) {
      return absl::InvalidArgumentError("newton-schulz: computes in fp32, bf16 or fp16");
    }
    const int64_t m = x.rows, n = x.cols, size = x.matrix_size();
    const bool tall = run.transpose_tall && m > n;
    const int64_t s = tall ? n : m;  // order of the Gram matrix
    OPTD_RETURN_IF_ERROR(CheckInt("newton-schulz", {m, n, x.batch}));
    CudaQueue& q = Enter(queue);
    absl::MutexLock lock(&q.mu());
    cudaStream_t stream = q.stream();
    const DType dtype = run.dtype;
    const int code = DTypeCode(dtype);
    const DType input_dtype = dtype == DType::kF16 ? DType::kF32 : dtype;

    OPTD_CUDA(cuda::RoundTo(stream, x.data, x.size(), DTypeCode(input_dtype)));
    OPTD_RETURN_IF_ERROR(
        FrobeniusNormalizeLocked(q, x, run.safety, run.eps, run.eps_mode, input_dtype));
    // X lives in x itself and the workspace's first region (fp32), or in two narrow halves of it.
    void* current;
    void* next;
    if (dtype == DType::kF32) {
      current = x.data;
      next = workspace;
    } else {
      current = workspace;
      next = reinterpret_cast<uint16_t*>(workspace) + x.size();
      OPTD_CUDA(cuda::RoundAndNarrow(stream, x.data, current, x.size(), code));
    }
    float* product = workspace + x.size();    // batch·s² fp32: c·A·A
    float* gram = product + x.batch * s * s;  // batch·s² of dtype: A, then P
    const int64_t gram_size = s * s;
    for (const auto& [a, b, c] : run.steps) {
      OPTD_RETURN_IF_ERROR(GemmLocked(q, tall ? Transpose::kYes : Transpose::kNo,
                                      tall ? Transpose::kNo : Transpose::kYes, s, s, tall ? m : n,
                                      1.0f, current, n, size, current, n, size, 0.0f, gram, s,
                                      gram_size, x.batch, dtype, dtype));
      OPTD_RETURN_IF_ERROR(GemmLocked(q, Transpose::kNo, Transpose::kNo, s, s, s, c, gram, s,
                                      gram_size, gram, s, gram_size, 0.0f, product, s, gram_size,
                                      x.batch, dtype, DType::kF32));
      OPTD_CUDA(cuda::PolynomialAndNarrow(stream, product, gram, s, x.batch, a, b, code));
      if (tall) {
        OPTD_RETURN_IF_ERROR(GemmLocked(q, Transpose::kNo, Transpose::kNo, m, n, n, 1.0f, current,
                                        n, size, gram, s, gram_size, 0.0f, next, n, size, x.batch,
                                        dtype, dtype));
      } else {
        OPTD_RETURN_IF_ERROR(GemmLocked(q, Transpose::kNo, Transpose::kNo, m, n, m, 1.0f, gram, s,
                                        gram_size, current, n, size, 0.0f, next, n, size, x.batch,
                                        dtype, dtype));
      }
      std::swap(current, next);
    }
    if (dtype != DType::kF32) {
      OPTD_CUDA(cuda::Convert(stream, current, code, x.data, cuda::kF32, x.size()));
    } else if (current != x.data) {
      OPTD_CUDA(cudaMemcpyAsync(x.data, current, x.size() * sizeof(float), cudaMemcpyDeviceToDevice,
                                stream));
    }
    return absl::OkStatus();
  }

 private:
  CudaQueue& Q(Queue& queue) { return static_cast<CudaQueue&>(queue); }
  // Host threads start on device 0; every entry makes the backend's device current.
  CudaQueue& Enter(Queue& queue) {
    // (A failure here fails the operation's first call on the queue, which names it.)
    IgnoreCudaError(cudaSetDevice(memory_->device));
    return Q(queue);
  }

  // Row-major C = alpha·op(A)·op(B) + beta·C over a strided batch, as column-major
  // Cᵀ = op(B)ᵀ·op(A)ᵀ: operands swap, flags stay.
  absl::Status GemmLocked(CudaQueue& q, Transpose ta, Transpose tb, int64_t m, int64_t n, int64_t k,
                          float alpha, const void* a, int64_t lda, int64_t stride_a, const void* b,
                          int64_t ldb, int64_t stride_b, float beta, void* c, int64_t ldc,
                          int64_t stride_c, int64_t batch, DType input, DType output)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(q.mu()) {
    OPTD_RETURN_IF_ERROR(CheckInt("gemm", {m, n, k, lda, ldb, ldc, batch}));
    const cublasComputeType_t compute =
        input == DType::kF32 && allow_tf32_ ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    OPTD_CUBLAS(cublasGemmStridedBatchedEx(
        q.blas(), ToCublas(tb), ToCublas(ta), static_cast<int>(n), static_cast<int>(m),
        static_cast<int>(k), &alpha, b, CudaType(input), static_cast<int>(ldb), stride_b, a,
        CudaType(input), static_cast<int>(lda), stride_a, &beta, c, CudaType(output),
        static_cast<int>(ldc), stride_c, static_cast<int>(batch), compute, CUBLAS_GEMM_DEFAULT));
    return absl::OkStatus();
  }

  // The most scratch one operation within `needs` takes: the arrays each one asks Scratch for
  // (CountOutOfRangeEach, MatrixSums, NorMuonNormalize, SingularValueDecomposition), as
  // CudaQueue::TakeScratch lays them out.
  absl::StatusOr<size_t> ScratchBytes(CudaQueue& q, const ScratchNeeds& needs)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(q.mu()) {
    auto arrays = [](std::initializer_list<size_t> bytes) {
      size_t total = 0;
      for (size_t b : bytes) total += CudaQueue::ScratchArrayBytes(b);
      return total;
    };
    auto check = [&](int64_t n) {
      const size_t each = static_cast<size_t>(n) * 8;  // counts, pointers, sizes
      return arrays({each, each, each});
    };
    size_t most = check(std::max<int64_t>(1, needs.checked_arrays));
    for (const ScratchNeeds::Matrices& m : needs.matrices) {
      if (m.batch <= 0 || m.rows <= 0 || m.cols <= 0) continue;
      // Σx² per matrix (twice for NorMuon) and the partial sums: batch·SumSquaresBlocks is at
      // most max(batch, 4096) for any matrix size (kernels.cu), so for every part of the batch.
      const size_t per_matrix = static_cast<size_t>(m.batch) * sizeof(double);
      const size_t partials = static_cast<size_t>(std::max<int64_t>(m.batch, 4096)) * 8;
      most = std::max(most, arrays({per_matrix, per_matrix, partials}));
      if (!m.svd) continue;
      OPTD_RETURN_IF_ERROR(CheckInt("svd", {m.rows, m.cols}));
      const int64_t k = std::min(m.rows, m.cols);
      OPTD_ASSIGN_OR_RETURN(const GesvdjParams params, NewGesvdjParams());
      int lwork = 0;
      for (const cusolverEigMode_t mode : {CUSOLVER_EIG_MODE_VECTOR, CUSOLVER_EIG_MODE_NOVECTOR}) {
        OPTD_ASSIGN_OR_RETURN(const int need,
                              GesvdjWorkspace(q, mode, m.rows, m.cols, params.get()));
        lwork = std::max(lwork, need);
      }
      const size_t b = static_cast<size_t>(m.batch);
      // (Its finiteness check takes less: one array.)
      most = std::max(most, arrays({static_cast<size_t>(m.rows * m.cols) * 8, b * k * 8,
                                    b * static_cast<size_t>(m.cols * k) * 8,
                                    b * static_cast<size_t>(m.rows * k) * 8, b * sizeof(int),
                                    static_cast<size_t>(lwork) * 8}));
    }
    return most;
  }

  using GesvdjParams = std::unique_ptr<gesvdjInfo, void (*)(gesvdjInfo_t)>;
  static absl::StatusOr<GesvdjParams> NewGesvdjParams() {
    gesvdjInfo_t params = nullptr;
    OPTD_CUSOLVER(cusolverDnCreateGesvdjInfo(&params));
    return GesvdjParams(params, [](gesvdjInfo_t p) { cusolverDnDestroyGesvdjInfo(p); });
  }
  // The Jacobi SVD's workspace, in doubles, for a row-major m×n matrix (SingularValueDecomposition
  // hands cuSOLVER its column-major reading, n×m). The one query both the SVD and the reservation
  // of its scratch (ScratchBytes) make.
  static absl::StatusOr<int> GesvdjWorkspace(CudaQueue& q, cusolverEigMode_t mode, int64_t m,
                                             int64_t n, gesvdjInfo_t params)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(q.mu()) {
    const int rows = static_cast<int>(n), cols = static_cast<int>(m);
    int lwork = 0;
    OPTD_CUSOLVER(cusolverDnDgesvdj_bufferSize(q.solver(), mode, /*econ=*/1, rows, cols, nullptr,
                                               rows, nullptr, nullptr, rows, nullptr, cols, &lwork,
                                               params));
    return lwork;
  }

  // Σx² of every matrix of x (fp64, on the device), in scratch.
  absl::StatusOr<double*> MatrixSums(CudaQueue& q, Scratch& scratch, const MatrixBatch& x)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(q.mu()) {
    OPTD_ASSIGN_OR_RETURN(double* sums, scratch.Get<double>(x.batch));
    OPTD_ASSIGN_OR_RETURN(
        double* partials,
        scratch.Get<double>(x.batch * cuda::SumSquaresBlocks(x.batch, x.matrix_size())));
    OPTD_CUDA(cuda::MatrixSumSquares(q.stream(), x.data, x.batch, x.matrix_size(), partials, sums));
    return sums;
  }

  absl::Status FrobeniusNormalizeLocked(CudaQueue& q, const MatrixBatch& x, float safety, float eps,
                                        formulas::NormEpsilon mode, DType norm_dtype)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(q.mu()) {
    if (x.size() == 0) return absl::OkStatus();
    Scratch scratch(q);
    OPTD_ASSIGN_OR_RETURN(double* sums, MatrixSums(q, scratch, x));
    OPTD_CUDA(cuda::FrobeniusDivide(q.stream(), x.data, x.batch, x.matrix_size(), sums, safety, eps,
                                    static_cast<int>(mode), DTypeCode(norm_dtype)));
    return absl::OkStatus();
  }

  // The error for an SVD input with a NaN or infinity, naming the first one, as the CPU does.
  absl::Status NonFiniteSvdInput(Queue& queue, const MatrixBatch& a) {
    std::vector<float> host(a.size());
    OPTD_RETURN_IF_ERROR(Download(queue, host.data(), a.data, host.size() * sizeof(float)));
    OPTD_RETURN_IF_ERROR(Synchronize(queue));
    for (int64_t i = 0; i < a.size(); ++i) {
      if (!std::isfinite(host[i])) {
        return absl::InvalidArgumentError(absl::StrCat("svd: matrix ", i / a.matrix_size(),
                                                       " has a non-finite value at element ",
                                                       i % a.matrix_size()));
      }
    }
    return absl::InternalError("svd: a non-finite value was counted but not found");
  }

  std::shared_ptr<DeviceMemory> memory_;
  std::unique_ptr<CudaQueue> queue_;
  std::string description_;
  bool allow_tf32_;
  bool step_graphs_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions& options) {
  int count = 0;
  const cudaError_t query = cudaGetDeviceCount(&count);
  if (query != cudaSuccess) {
    IgnoreCudaError(query);  // so later calls start clean
    return absl::UnavailableError(
        absl::StrCat("no CUDA device: cudaGetDeviceCount: ", cudaGetErrorString(query)));
  }
  if (options.device < 0 || options.device >= count) {
    return absl::UnavailableError(
        absl::StrCat("no CUDA device ", options.device, ": ", count, " device(s) present"));
  }
  if (options.memory_budget_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: memory budget must be >= 0, got ",
                                                   options.memory_budget_bytes));
  }
  OPTD_CUDA(cudaSetDevice(options.device));
  cudaDeviceProp props;
  OPTD_CUDA(cudaGetDeviceProperties(&props, options.device));
  size_t free_bytes = 0, total_bytes = 0;
  OPTD_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));

  auto memory = std::make_shared<DeviceMemory>();
  memory->device = options.device;
  memory->budget = options.memory_budget_bytes > 0 ? options.memory_budget_bytes
                                                   : static_cast<int64_t>(free_bytes * 0.9);
  cudaMemPoolProps pool_props = {};
  pool_props.allocType = cudaMemAllocationTypePinned;
  pool_props.location.type = cudaMemLocationTypeDevice;
  pool_props.location.id = options.device;
  OPTD_CUDA(cudaMemPoolCreate(&memory->pool, &pool_props));
  // Freed memory stays in the pool for the next allocation instead of going back to the driver.
  uint64_t keep = std::numeric_limits<uint64_t>::max();
  OPTD_CUDA(cudaMemPoolSetAttribute(memory->pool, cudaMemPoolAttrReleaseThreshold, &keep));
  OPTD_CUDA(cudaStreamCreateWithFlags(&memory->stream, cudaStreamNonBlocking));

  int least = 0, greatest = 0;
  OPTD_CUDA(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  auto queue = std::make_unique<CudaQueue>(memory);
  OPTD_RETURN_IF_ERROR(queue->Init(greatest, options.allow_tf32));

  int driver = 0, runtime = 0;
  IgnoreCudaError(cudaDriverGetVersion(&driver));
  IgnoreCudaError(cudaRuntimeGetVersion(&runtime));
  const std::string description = absl::StrFormat(
      "%s (device %d, compute %d.%d, %d SMs, %.1f GiB), CUDA driver %d.%d, runtime %d.%d, "
      "memory budget %.1f GiB%s%s",
      props.name, options.device, props.major, props.minor, props.multiProcessorCount,
      total_bytes / double(1 << 30), driver / 1000, driver % 1000 / 10, runtime / 1000,
      runtime % 1000 / 10, memory->budget / double(1 << 30), options.allow_tf32 ? ", TF32" : "",
      options.step_graphs ? ", step graphs" : "");
  return std::make_unique<CudaBackend>(std::move(memory), std::move(queue), description, options);
}

}  // namespace optd
