// Server-side parameter initialization, reproducible from a seed on any platform.
#ifndef OPTD_KERNELS_INITIALIZERS_H_
#define OPTD_KERNELS_INITIALIZERS_H_

#include <cstdint>

#include "absl/types/span.h"

namespace optd {

// out[i] = mean + std·z_i with z_i standard normal: element i draws two uniforms u1, u2 in (0, 1]
// from SplitMix64 of (seed, 2i) and (seed, 2i + 1) (53-bit mantissas) and takes the Box–Muller
// cosine branch in fp64, z = √(−2 ln u1)·cos(2π u2), rounded once to fp32. Every element depends
// only on (seed, i), so the result does not depend on threads or chunking.
void FillNormal(uint64_t seed, double mean, double std, absl::Span<float> out);

}  // namespace optd

#endif  // OPTD_KERNELS_INITIALIZERS_H_
