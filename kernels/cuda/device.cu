#include <cuda_runtime.h>

#include "kernels/cuda/device.h"

namespace optd::cuda {

DeviceQuery QueryDevices() {
  DeviceQuery query;
  const cudaError_t error = cudaGetDeviceCount(&query.count);
  if (error != cudaSuccess) {
    query.count = 0;
    query.error = cudaGetErrorString(error);
    cudaGetLastError();  // clear the sticky error so later calls start clean
  } else if (query.count == 0) {
    query.error = "no CUDA device";
  }
  return query;
}

}  // namespace optd::cuda
