// CUDA, cuBLAS and cuSOLVER results as absl::Status naming the call: every call the CUDA backend
// makes goes through OPTD_CUDA, OPTD_CUBLAS or OPTD_CUSOLVER, or, where a failure changes nothing
// (releasing), IgnoreCudaError. Out of memory is ResourceExhausted, anything else Internal. A
// runtime error is cleared where it is reported, so it is never blamed on a later call.
#ifndef OPTD_KERNELS_CUDA_CUDA_STATUS_H_
#define OPTD_KERNELS_CUDA_CUDA_STATUS_H_

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status_macros.h"

namespace optd {

// The name of the call in `expression` ("cudaMemcpyAsync(dst, ...)" -> "cudaMemcpyAsync").
inline absl::string_view CallName(absl::string_view expression) {
  return expression.substr(0, expression.find('('));
}

// A failed runtime call also leaves its error as the host thread's last error, which the next
// kernel launch (or cuBLAS, which checks its own launches that way) would report as its own: a
// failure another session's call caused, blamed on this one's step. The error is this call's, so
// it is cleared here, where it is reported.
inline absl::Status CudaStatus(cudaError_t error, absl::string_view expression) {
  if (error == cudaSuccess) return absl::OkStatus();
  (void)cudaGetLastError();
  const std::string message = absl::StrCat(CallName(expression), ": ", cudaGetErrorName(error),
                                           " (", cudaGetErrorString(error), ")");
  if (error == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

// For the calls whose failure changes nothing (releasing, best-effort queries): their error is
// dropped and cleared, so no later call reports it.
inline void IgnoreCudaError(cudaError_t error) {
  if (error != cudaSuccess) (void)cudaGetLastError();
}

// A failed library call may leave a runtime error of its own behind too: cleared the same way.
inline absl::Status CublasStatus(cublasStatus_t status, absl::string_view expression) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  (void)cudaGetLastError();
  const std::string message = absl::StrCat(CallName(expression), ": ", cublasGetStatusName(status),
                                           " (", cublasGetStatusString(status), ")");
  if (status == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

inline absl::Status CusolverStatus(cusolverStatus_t status, absl::string_view expression) {
  if (status == CUSOLVER_STATUS_SUCCESS) return absl::OkStatus();
  (void)cudaGetLastError();
  const std::string message =
      absl::StrCat(CallName(expression), ": cusolverStatus_t ", static_cast<int>(status));
  if (status == CUSOLVER_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

#define OPTD_CUDA(expression) OPTD_RETURN_IF_ERROR(CudaStatus((expression), #expression))
#define OPTD_CUBLAS(expression) OPTD_RETURN_IF_ERROR(CublasStatus((expression), #expression))
#define OPTD_CUSOLVER(expression) OPTD_RETURN_IF_ERROR(CusolverStatus((expression), #expression))

}  // namespace optd

#endif  // OPTD_KERNELS_CUDA_CUDA_STATUS_H_
