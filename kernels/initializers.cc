#include "kernels/initializers.h"

#include <cmath>
#include <numbers>

namespace optd {
namespace {

// SplitMix64's output function (Steele, Lea and Flood, 2014) on the counter seed + n·γ.
uint64_t SplitMix64(uint64_t seed, uint64_t n) {
  uint64_t z = seed + (n + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform in (0, 1]: never 0, so the logarithm stays finite.
double Uniform(uint64_t bits) { return static_cast<double>((bits >> 11) + 1) * 0x1p-53; }

}  // namespace

void FillNormal(uint64_t seed, double mean, double std, absl::Span<float> out) {
  for (size_t i = 0; i < out.size(); ++i) {
    const double u1 = Uniform(SplitMix64(seed, 2 * i));
    const double u2 = Uniform(SplitMix64(seed, 2 * i + 1));
    const double z = std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
    out[i] = static_cast<float>(mean + std * z);
  }
}

}  // namespace optd
