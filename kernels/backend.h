// The Backend interface: memory, queues, GEMM and the row/element operations optd's optimizers
// are built from. The CPU backend (kernels/cpu) implements it on OpenBLAS and LAPACKE; the CUDA
// backend implements the same contract on cuBLAS, cuSOLVER and optd's kernels.
//
// Conventions for every operation:
// - Pointers are backend memory (from Allocate); on the CPU backend that is host memory.
// - Matrices are row-major. A "matrix batch" is `batch` contiguous rows×cols matrices.
// - Work is enqueued on a Queue and runs in order on it; results are visible to the host after
//   Synchronize(queue). Operations that return a value to the host synchronize themselves.
// - An error returns a non-OK Status naming the operation and the offending argument; the
//   operation then wrote nothing.
#ifndef OPTD_KERNELS_BACKEND_H_
#define OPTD_KERNELS_BACKEND_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/dtype.h"
#include "kernels/formulas.h"

namespace optd {

// Owned backend memory. Move-only; frees on destruction.
class Buffer {
 public:
  Buffer() = default;
  Buffer(void* data, size_t bytes, std::function<void(void*)> release)
      : data_(data), bytes_(bytes), release_(std::move(release)) {}
  Buffer(Buffer&& other) noexcept { *this = std::move(other); }
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { Reset(); }

  void* data() const { return data_; }
  float* f32() const { return static_cast<float*>(data_); }
  size_t bytes() const { return bytes_; }

 private:
  void Reset();

  void* data_ = nullptr;
  size_t bytes_ = 0;
  std::function<void(void*)> release_;
};

enum class QueuePriority { kNormal, kLow };

// An in-order stream of work (a CUDA stream; on the CPU backend, work runs as it is enqueued).
class Queue {
 public:
  virtual ~Queue() = default;
};

// A recorded step (a CUDA graph), kept by its owner to be run again.
class StepGraph {
 public:
  virtual ~StepGraph() = default;
};

enum class Transpose { kNo, kYes };
enum class Side { kLeft, kRight };

// C[i] = alpha·op(A[i])·op(B[i]) + beta·C[i] for i < batch; op(A) is m×k, op(B) is k×n, C is m×n.
// A and B share a dtype (fp32, bf16 or fp16; bf16/fp16 accumulate in fp32); C is fp32.
struct GemmArgs {
  Transpose trans_a = Transpose::kNo;
  Transpose trans_b = Transpose::kNo;
  int64_t m = 0, n = 0, k = 0;
  float alpha = 1.0f, beta = 0.0f;
  DType input_dtype = DType::kF32;
  const void* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  const void* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  float* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
  int64_t batch = 1;
};

// The operations a queue's steps run that take temporary memory in a backend (Backend::
// ReserveScratch): one gradient check over `checked_arrays` arrays, and for each matrix batch the
// norms, NorMuon's normalization and, where `svd`, the exact polar factor's decomposition (of the
// batch or any part of it).
struct ScratchNeeds {
  struct Matrices {
    int64_t batch = 0, rows = 0, cols = 0;
    bool svd = false;
  };
  int64_t checked_arrays = 0;
  std::vector<Matrices> matrices;
};

// Symmetric rank-k update of the upper triangle: C[i] = alpha·op(A[i])·op(A[i])ᵀ + beta·C[i],
// op(A) is n×k (trans: A is stored k×n and the product is AᵀA). The strict lower triangle of C is
// not written.
//
// With `b` set, the product takes a second operand: C[i] = alpha·op(A[i])·op(B[i])ᵀ + beta·C[i]
// (BLAS's syrkx), for products the caller knows to be symmetric, such as A·B of two commuting
// symmetric matrices (Gram Newton–Schulz): only the upper triangle is computed, about half a
// general product's work. B has A's shape and transpose.
struct SyrkArgs {
  Transpose trans = Transpose::kNo;
  int64_t n = 0, k = 0;
  float alpha = 1.0f, beta = 0.0f;
  const float* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  const float* b = nullptr;  // null: B = A
  int64_t ldb = 0, stride_b = 0;
  float* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
  int64_t batch = 1;
};

// Product with a symmetric matrix S that is read from its upper triangle only. C is m×n.
// kLeft: C = alpha·S·B + beta·C (S is m×m); kRight: C = alpha·B·S + beta·C (S is n×n).
struct SymmArgs {
  Side side = Side::kLeft;
  int64_t m = 0, n = 0;
  float alpha = 1.0f, beta = 0.0f;
  const float* s = nullptr;
  int64_t lds = 0, stride_s = 0;
  const float* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  float* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
  int64_t batch = 1;
};

// A contiguous batch of row-major matrices.
struct MatrixBatch {
  float* data = nullptr;
  int64_t batch = 1, rows = 0, cols = 0;
  int64_t matrix_size() const { return rows * cols; }
  int64_t size() const { return batch * rows * cols; }
};

// MuonEq's pre-normalization (seed 001): row and/or column factors, both computed from the
// unnormalized input.
struct EquilibrateArgs {
  bool rows = true;
  bool cols = false;
  float eps = 1e-8f;
  float exponent = -0.5f;
  float clip = 0.0f;  // 0: no clip
};

// The fused RMNP step on one matrix batch (seed 000): per row, sum momentum with optional
// Nesterov, row ℓ2 normalization, scale, optional rounding of the step, decoupled decay and
// the parameter update, in one pass over the row.
struct RmnpStepArgs {
  float momentum = 0.95f;
  bool nesterov = true;
  float eps = 1e-12f;
  // lr and 1 − lr·λ, in backend memory, read when the work runs (as ApplyUpdate's).
  const formulas::RateScalars* rate = nullptr;
  float scale = 1.0f;
  DType step_dtype = DType::kF32;  // the step is rounded to this dtype before it is applied
};

struct NorMuonArgs {
  float one_minus_beta2 = 0.05f;  // formed in fp64
  float eps = 1e-10f;
  bool preserve_frobenius = true;  // o <- o·‖o_before‖/(‖o_after‖ + eps)
};

// One Newton–Schulz run as a backend sees it; NewtonSchulz (newton_schulz.h) fills it from a
// NewtonSchulzConfig and the matrix shape.
struct NewtonSchulzRun {
  DType dtype = DType::kBF16;  // GEMM inputs and outputs; products accumulate in fp32
  float safety = 1.0f;
  float eps = 1e-7f;
  formulas::NormEpsilon eps_mode = formulas::NormEpsilon::kAdd;
  bool transpose_tall = true;
  std::vector<std::array<float, 3>> steps;  // (a, b, c) of each step, rounded to fp32
};

class Backend {
 public:
  virtual ~Backend() = default;

  // "cpu" or "cuda".
  virtual absl::string_view name() const = 0;
  // Whether backend memory is host memory that host code may read and write directly (the CPU
  // backend): then a host buffer can stand in for a backend one.
  virtual bool host_memory() const { return false; }
  // A human-readable description of the device (CPU model and threads, or GPU name).
  virtual std::string description() const = 0;

  // The queue optimizer steps run on.
  virtual Queue& default_queue() = 0;
  virtual absl::StatusOr<std::unique_ptr<Queue>> CreateQueue(QueuePriority priority) = 0;
  virtual absl::Status Synchronize(Queue& queue) = 0;

  // Memory whose contents are unspecified until written. RESOURCE_EXHAUSTED when it cannot be had.
  virtual absl::StatusOr<Buffer> Allocate(size_t bytes) = 0;
  // Makes sure that every operation within `needs` finds the temporary memory it takes on `queue`
  // without asking for more, so that a step cannot fail half-way for want of it; RESOURCE_EXHAUSTED
  // when that memory cannot be had (the queue's work is unchanged). The CUDA backend keeps it per
  // queue, charged to its budget; the CPU backend's operations take theirs from the heap, and it
  // reserves nothing.
  virtual absl::Status ReserveScratch(Queue& queue, const ScratchNeeds& needs);
  // Copies host memory into backend memory, in order with the queue's work. Returns once
  // `host_src` may be changed or freed (the copy itself may still be in flight).
  virtual absl::Status Upload(Queue& queue, void* dst, const void* host_src, size_t bytes) = 0;
  // `host_dst` holds the bytes after Synchronize(queue).
  virtual absl::Status Download(Queue& queue, void* host_dst, const void* src, size_t bytes) = 0;
  virtual absl::Status Copy(Queue& queue, void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status Fill(Queue& queue, float* x, int64_t count, float value) = 0;
  // Element conversion between fp32, bf16 and fp16 (the wire dtypes); rounding to nearest even.
  // InvalidArgument for fp64.
  virtual absl::Status Convert(Queue& queue, const void* src, DType src_dtype, void* dst,
                               DType dst_dtype, int64_t count) = 0;
  // Rounds fp32 values in place to the nearest value of `dtype` (bf16/fp16; fp32 is a no-op):
  // how an fp32 buffer emulates a computation held in a narrower dtype.
  virtual absl::Status RoundTo(Queue& queue, float* x, int64_t count, DType dtype) = 0;
  // Number of values that are NaN, ±inf or of magnitude above max_magnitude; synchronizes.
  virtual absl::StatusOr<int64_t> CountOutOfRange(Queue& queue, const float* x, int64_t count,
                                                  float max_magnitude) = 0;
  // CountOutOfRange of each array xs[i] of counts[i] values, with one synchronization for all
  // (a step checks every gradient before it changes anything).
  virtual absl::StatusOr<std::vector<int64_t>> CountOutOfRangeEach(
      Queue& queue, const std::vector<const float*>& xs, const std::vector<int64_t>& counts,
      float max_magnitude);

  virtual absl::Status Gemm(Queue& queue, const GemmArgs& args) = 0;
  virtual absl::Status SymmetricRankK(Queue& queue, const SyrkArgs& args) = 0;
  virtual absl::Status SymmetricMultiply(Queue& queue, const SymmArgs& args) = 0;
  // Thin SVD of each matrix of `a` (not modified): s gets min(rows, cols) singular values per
  // matrix in descending order; u (rows×k) and vt (k×cols) may be null when not wanted. Computed
  // in fp64 on the CPU backend.
  virtual absl::Status SingularValueDecomposition(Queue& queue, const MatrixBatch& a, float* s,
                                                  float* u, float* vt) = 0;

  // Zeroes column j of each rows×k matrix of u whose singular value s[j] (descending, k per
  // matrix) is at most relative_tolerance·s[0]: U·Vᵀ then spans only the matrix's numerical
  // range, the polar factor of a rank-deficient matrix (and zero for a zero matrix).
  virtual absl::Status ZeroSmallSingularVectors(Queue& queue, float* u, const float* s,
                                                int64_t batch, int64_t rows, int64_t k,
                                                float relative_tolerance) = 0;

  // Copies each n×n matrix's upper triangle onto its lower triangle.
  virtual absl::Status Symmetrize(Queue& queue, float* a, int64_t n, int64_t batch) = 0;
  // a[i][j][j] += value for every matrix of the n×n batch.
  virtual absl::Status AddDiagonal(Queue& queue, float* a, int64_t n, int64_t batch,
                                   float value) = 0;
  // x <- x / FrobeniusDenominator(‖x‖F, safety, eps, mode) per matrix; the norm is rounded to
  // `norm_dtype` first (a bf16 computation's norm is itself bf16).
  virtual absl::Status FrobeniusNormalize(Queue& queue, const MatrixBatch& x, float safety,
                                          float eps, formulas::NormEpsilon mode,
                                          DType norm_dtype) = 0;
  // out[r] = Σ_c x[r][c]² over rows×cols (all matrices of a batch laid end to end).
  virtual absl::Status RowSumSquares(Queue& queue, const float* x, int64_t rows, int64_t cols,
                                     float* out) = 0;
  // out[b][c] = Σ_r x[b][r][c]².
  virtual absl::Status ColumnSumSquares(Queue& queue, const MatrixBatch& x, float* out) = 0;
  // MuonEq pre-normalization. `scratch` holds batch·(rows + cols) floats.
  virtual absl::Status Equilibrate(Queue& queue, const MatrixBatch& x, const EquilibrateArgs& args,
                                   float* scratch) = 0;
  // Each row x <- x / RowL2Denominator(‖x‖, eps) (RMNP's direction).
  virtual absl::Status RowNormalize(Queue& queue, float* x, int64_t rows, int64_t cols,
                                    float eps) = 0;
  // NorMuon's post-normalization; v holds batch·rows second moments and is updated.
  virtual absl::Status NorMuonNormalize(Queue& queue, const MatrixBatch& o, float* v,
                                        const NorMuonArgs& args) = 0;
  // Scales each matrix so its RMS becomes `rms`: x <- x·rms·√(rows·cols)/(‖x‖F + eps).
  virtual absl::Status ScaleToRms(Queue& queue, const MatrixBatch& x, float rms, float eps) = 0;

  // u[i] = MomentumStep(m[i], g[i], ...) for i < count; m updated in place.
  virtual absl::Status Momentum(Queue& queue, float* m, const float* g, float* u, int64_t count,
                                const formulas::MomentumScalars& scalars) = 0;
  // w <- DecayAndStep(w, round(scale·o), lr, decay) with round to `step_dtype`.
  // w ← w·decay − lr·round(o·scale) (DecayAndStep), `rate` in backend memory, read when the work
  // runs: a recorded step reads the rate of the step it runs in.
  virtual absl::Status ApplyUpdate(Queue& queue, float* w, const float* o, int64_t count,
                                   const formulas::RateScalars* rate, float scale,
                                   DType step_dtype) = 0;
  // `scalars` is backend memory, read when the work runs: a recorded step reads the values of
  // the step it runs in (the bias corrections change every step).
  virtual absl::Status AdamW(Queue& queue, float* w, float* m, float* v, const float* g,
                             int64_t count, const formulas::AdamWScalars* scalars) = 0;
  virtual absl::Status RmnpStep(Queue& queue, float* w, float* m, const float* g, int64_t rows,
                                int64_t cols, const RmnpStepArgs& args) = 0;
  // The same two steps out of place: the state is read from the `_in` buffers and the new state
  // written to the `_out` ones (all distinct), with AdamW's and RmnpStep's bits. A prepared step
  // (Optimizer::PrepareTensor) writes its shadows so, in one pass. By default a copy into the
  // outputs, then the step in place there; the CPU backend fuses them.
  virtual absl::Status AdamWInto(Queue& queue, float* w_out, float* m_out, float* v_out,
                                 const float* w_in, const float* m_in, const float* v_in,
                                 const float* g, int64_t count,
                                 const formulas::AdamWScalars* scalars);
  virtual absl::Status RmnpStepInto(Queue& queue, float* w_out, float* m_out, const float* w_in,
                                    const float* m_in, const float* g, int64_t rows, int64_t cols,
                                    const RmnpStepArgs& args);

  // Newton–Schulz on every matrix of `x` in place, where the backend has a native path for it:
  // the same rounding points as the composed path of newton_schulz.cc (inputs and outputs of
  // every product in `run.dtype`, fp32 accumulation), with the matrices held in `run.dtype`
  // between products. `workspace` holds NewtonSchulzWorkspaceFloats(...) floats. Unimplemented
  // where the backend has none (the CPU); NewtonSchulz then composes the operations above.
  virtual absl::Status NewtonSchulzNative(Queue& queue, const MatrixBatch& x,
                                          const NewtonSchulzRun& run, float* workspace);

  // Step graphs: work enqueued on `queue` after BeginRecording is recorded instead of run, and
  // EndRecording runs it as one launch. It reuses `*graph` when the recording has the same
  // shape as the one it was made from (kernel arguments may differ) and replaces it otherwise;
  // with a null `graph` the recording is dropped unrun (after a failure). REQUIRES: nobody else
  // enqueues on `queue` meanwhile, and nothing recorded synchronizes or allocates. Unimplemented
  // where the backend has no graphs (the CPU) or they are switched off.
  virtual absl::Status BeginRecording(Queue& queue);
  virtual absl::Status EndRecording(Queue& queue, std::unique_ptr<StepGraph>* graph);
  // Runs a recorded step again as it was recorded (its arguments included).
  virtual absl::Status Replay(Queue& queue, const StepGraph& graph);
};

struct CpuBackendOptions {
  // Threads of the backend's loops and BLAS tiles; 0 takes OpenBLAS's own count
  // (OPENBLAS_NUM_THREADS, or the cores the process may use).
  int threads = 0;
};

// The CPU backend: OpenBLAS (cblas) and LAPACKE. Creating one sets OpenBLAS's process-wide thread
// count to one: the backend runs its products as single-threaded BLAS calls on fixed tiles of the
// output over its own threads, so a result has the same bits whatever `threads` is (on one
// machine: OpenBLAS picks its kernels per CPU, and they round differently).
absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const CpuBackendOptions& options = {});

struct CudaBackendOptions {
  int device = 0;
  // Device memory the backend's buffers may hold; beyond it Allocate is RESOURCE_EXHAUSTED.
  // 0: 90% of the memory free on the device when the backend starts.
  int64_t memory_budget_bytes = 0;
  // fp32 products on TF32 tensor cores (inputs cut to a 10-bit mantissa): several times faster,
  // and outside the fp32 tolerance of 1e-5. Off by default.
  bool allow_tf32 = false;
  // Optimizer steps after the first run as CUDA graphs (BeginRecording/EndRecording): one launch
  // instead of hundreds of small ones.
  bool step_graphs = true;
};

// The CUDA backend (kernels/cuda): cuBLAS, cuSOLVER and optd's kernels on one GPU. Unavailable,
// with the reason, in a build without CUDA or on a machine without a driver or a device.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions& options = {});

}  // namespace optd

#endif  // OPTD_KERNELS_BACKEND_H_
