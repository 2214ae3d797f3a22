// Kernels that apply the shared per-element formulas one element per thread. Built without FMA
// contraction so the device evaluates each formula exactly as the CPU backend does.
#include <cuda_runtime.h>

#include <string>

#include "kernels/cuda/device.h"
#include "kernels/formulas.h"

namespace optd::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void MomentumKernel(float* m, const float* g, float* u, int64_t n,
                               formulas::MomentumScalars scalars) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) u[i] = formulas::MomentumStep(m[i], g[i], scalars);
}

__global__ void RoundKernel(float* x, int64_t n, bool bf16) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) x[i] = bf16 ? formulas::RoundToBf16(x[i]) : formulas::RoundToHalf(x[i]);
}

// Device copies of host arrays, freed on scope exit.
class DeviceArrays {
 public:
  ~DeviceArrays() {
    for (float* p : pointers_) cudaFree(p);
  }
  cudaError_t Upload(const float* host, int64_t n, float** device) {
    cudaError_t e = cudaMalloc(device, n * sizeof(float));
    if (e != cudaSuccess) return e;
    pointers_[used_++] = *device;
    return cudaMemcpy(*device, host, n * sizeof(float), cudaMemcpyHostToDevice);
  }

 private:
  float* pointers_[4] = {};
  int used_ = 0;
};

std::string Message(cudaError_t e) { return e == cudaSuccess ? "" : cudaGetErrorString(e); }

unsigned Blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

std::string MomentumOnDevice(float* m, const float* g, float* u, int64_t n, float mu,
                             float one_minus_mu, int kind, bool nesterov) {
  DeviceArrays arrays;
  float *dm, *dg, *du;
  cudaError_t e = arrays.Upload(m, n, &dm);
  if (e == cudaSuccess) e = arrays.Upload(g, n, &dg);
  if (e == cudaSuccess) e = arrays.Upload(u, n, &du);
  if (e != cudaSuccess) return Message(e);
  const formulas::MomentumScalars scalars{mu, one_minus_mu,
                                          static_cast<formulas::MomentumKind>(kind), nesterov};
  MomentumKernel<<<Blocks(n), kThreads>>>(dm, dg, du, n, scalars);
  e = cudaGetLastError();
  if (e == cudaSuccess) e = cudaMemcpy(m, dm, n * sizeof(float), cudaMemcpyDeviceToHost);
  if (e == cudaSuccess) e = cudaMemcpy(u, du, n * sizeof(float), cudaMemcpyDeviceToHost);
  return Message(e);
}

namespace {

std::string RoundOnDevice(float* x, int64_t n, bool bf16) {
  DeviceArrays arrays;
  float* dx;
  cudaError_t e = arrays.Upload(x, n, &dx);
  if (e != cudaSuccess) return Message(e);
  RoundKernel<<<Blocks(n), kThreads>>>(dx, n, bf16);
  e = cudaGetLastError();
  if (e == cudaSuccess) e = cudaMemcpy(x, dx, n * sizeof(float), cudaMemcpyDeviceToHost);
  return Message(e);
}

}  // namespace

std::string RoundToBf16OnDevice(float* x, int64_t n) { return RoundOnDevice(x, n, true); }
std::string RoundToHalfOnDevice(float* x, int64_t n) { return RoundOnDevice(x, n, false); }

}  // namespace optd::cuda
