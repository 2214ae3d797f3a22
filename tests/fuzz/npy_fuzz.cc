// The .npy reader (optctl dump/step): any bytes give an array or an error, never a crash, a read
// past the input or an allocation the input does not pay for.
#include <cstddef>
#include <cstdint>

#include "client/npy.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<optd::client::NpyArray> array =
      optd::client::ReadNpy(optd::fuzz::WriteInput(data, size));
  if (array.ok()) {
    int64_t elements = 1;
    for (int64_t d : array->shape) elements *= d;
    if (elements != static_cast<int64_t>(array->data.size())) __builtin_trap();
  }
  return 0;
}
