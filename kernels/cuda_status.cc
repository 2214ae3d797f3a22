#include "kernels/cuda_status.h"

#include "absl/strings/str_cat.h"

#if OPTD_HAVE_CUDA
#include "kernels/cuda/device.h"
#endif

namespace optd {

int CudaDeviceCount() {
#if OPTD_HAVE_CUDA
  return cuda::QueryDevices().count;
#else
  return 0;
#endif
}

std::string CudaBackendUnavailableReason() {
#if OPTD_HAVE_CUDA
  const cuda::DeviceQuery query = cuda::QueryDevices();
  if (query.count == 0) return absl::StrCat("no CUDA device: ", query.error);
  return absl::StrCat(query.count,
                      " CUDA device(s) present, but the CUDA Backend arrives with issue 7");
#else
  return "optd was built without CUDA (OPTD_CUDA=OFF or no nvcc)";
#endif
}

}  // namespace optd
