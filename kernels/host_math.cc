#include "kernels/host_math.h"

#include <cstring>

namespace optd {

void MeanOfWorkers(absl::Span<const float* const> inputs, absl::Span<float> out) {
  if (inputs.empty()) return;
  if (inputs.size() == 1) {
    if (inputs[0] != out.data()) std::memcpy(out.data(), inputs[0], out.size() * sizeof(float));
    return;
  }
  const float count = static_cast<float>(inputs.size());
  for (size_t i = 0; i < out.size(); ++i) {
    float sum = inputs[0][i];
    for (size_t w = 1; w < inputs.size(); ++w) sum += inputs[w][i];
    out[i] = sum / count;
  }
}

void ParameterDelta(absl::Span<const float> after, absl::Span<const float> before,
                    absl::Span<float> out) {
  for (size_t i = 0; i < out.size(); ++i) out[i] = after[i] - before[i];
}

}  // namespace optd
