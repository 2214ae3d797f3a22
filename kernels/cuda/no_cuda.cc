// CreateCudaBackend in a build without CUDA (OPTD_CUDA=OFF, or no nvcc): always Unavailable, so
// `--backend=auto` serves from the CPU and says why.
#include "kernels/backend.h"

namespace optd {

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions&) {
  return absl::UnavailableError("optd was built without CUDA (OPTD_CUDA=OFF or no nvcc)");
}

}  // namespace optd
