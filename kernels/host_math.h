// The arithmetic the daemon does on the host around a step: the workers' mean of a gradient, and
// the delta a step applied (StepResult DELTA).
#ifndef OPTD_KERNELS_HOST_MATH_H_
#define OPTD_KERNELS_HOST_MATH_H_

#include "absl/types/span.h"

namespace optd {

// out[i] = (Σ_w inputs[w][i]) / inputs.size(), summed in fp32 in the order given, so the mean
// does not depend on the order in which workers arrived. `out` may alias inputs[0].
void MeanOfWorkers(absl::Span<const float* const> inputs, absl::Span<float> out);

// out[i] = after[i] − before[i]: the delta a step applied. All three have the same size; `out` may
// alias either input.
void ParameterDelta(absl::Span<const float> after, absl::Span<const float> before,
                    absl::Span<float> out);

}  // namespace optd

#endif  // OPTD_KERNELS_HOST_MATH_H_
