// Whether this build and machine can run the CUDA backend, and why not.
#ifndef OPTD_KERNELS_CUDA_STATUS_H_
#define OPTD_KERNELS_CUDA_STATUS_H_

#include <string>

namespace optd {

// Number of CUDA devices the runtime reports; 0 without CUDA, a driver or a device.
int CudaDeviceCount();

// Why the CUDA backend cannot be used here (no CUDA in this build, no driver, no device, or the
// backend not yet built); empty when it can.
std::string CudaBackendUnavailableReason();

}  // namespace optd

#endif  // OPTD_KERNELS_CUDA_STATUS_H_
