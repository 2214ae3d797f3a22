// CUDA device discovery and the shared formulas run on a GPU. Plain C++ interface (no CUDA or
// Abseil types) so host code links it without nvcc.
#ifndef OPTD_KERNELS_CUDA_DEVICE_H_
#define OPTD_KERNELS_CUDA_DEVICE_H_

#include <cstdint>
#include <string>

namespace optd::cuda {

struct DeviceQuery {
  int count = 0;
  std::string error;  // why count is 0 (no driver, no device), empty otherwise
};

// Asks the CUDA runtime for devices. On a machine without a driver this returns count 0 and the
// runtime's message; it never aborts.
DeviceQuery QueryDevices();

// Element formulas (kernels/formulas.h) on device 0 over host arrays of n elements, for checking
// the GPU's arithmetic against the CPU backend. Each returns "" on success or the CUDA error.
std::string MomentumOnDevice(float* m, const float* g, float* u, int64_t n, float mu,
                             float one_minus_mu, int kind, bool nesterov);
std::string RoundToBf16OnDevice(float* x, int64_t n);
std::string RoundToHalfOnDevice(float* x, int64_t n);

}  // namespace optd::cuda

#endif  // OPTD_KERNELS_CUDA_DEVICE_H_
