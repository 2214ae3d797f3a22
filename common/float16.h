// fp32 <-> bf16 and IEEE binary16 bit conversions, round to nearest even, and the out-of-range
// test the wire and the kernels share. Header-only and `OPTD_HOST_DEVICE`, depending on the C++
// standard library alone, so that the CUDA kernels (through kernels/formulas.h) and the wire
// codecs (common/wire.h) run the same code.
#ifndef OPTD_COMMON_FLOAT16_H_
#define OPTD_COMMON_FLOAT16_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef OPTD_HOST_DEVICE
#if defined(__CUDACC__)
#define OPTD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define OPTD_HOST_DEVICE inline
#endif
#endif

namespace optd {

OPTD_HOST_DEVICE uint32_t FloatBits(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return bits;
}

OPTD_HOST_DEVICE float BitsToFloat(uint32_t bits) {
  float x;
  memcpy(&x, &bits, sizeof(x));
  return x;
}

// fp32 -> bf16 bits, round to nearest even (what torch's .bfloat16() and CUDA's __float2bfloat16
// do); NaN stays NaN.
OPTD_HOST_DEVICE uint16_t FloatToBf16Bits(float x) {
  const uint32_t bits = FloatBits(x);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x0040u;
  // A select, not a branch, so CPU loops over it vectorize.
  return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// True for NaN, ±inf and |x| > max_magnitude (the comparison is false for NaN).
OPTD_HOST_DEVICE bool IsOutOfRange(float x, float max_magnitude) {
  return !(fabsf(x) <= max_magnitude);
}

OPTD_HOST_DEVICE float Bf16BitsToFloat(uint16_t bits) {
  return BitsToFloat(static_cast<uint32_t>(bits) << 16);
}

// fp32 -> IEEE binary16 bits, round to nearest even, with subnormals and overflow to infinity.
OPTD_HOST_DEVICE uint16_t FloatToHalfBits(float x) {
  const uint32_t bits = FloatBits(x);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits >= 0x7f800000u) {  // inf or NaN
    return static_cast<uint16_t>(sign | 0x7c00u | (abs_bits > 0x7f800000u ? 0x0200u : 0u));
  }
  if (abs_bits >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past max
  const int exponent = static_cast<int>(abs_bits >> 23) - 127;
  if (exponent < -25) return sign;  // below half the smallest subnormal: rounds to zero
  uint32_t mantissa = (abs_bits & 0x007fffffu) | 0x00800000u;
  if (exponent < -14) {
    // Subnormal half: value = mantissa * 2^(exponent - 23); half unit is 2^-24.
    const int shift = -exponent - 14 + 13;
    const uint32_t halfway = 1u << (shift - 1);
    const uint32_t remainder = mantissa & ((1u << shift) - 1u);
    uint32_t result = mantissa >> shift;
    if (remainder > halfway || (remainder == halfway && (result & 1u))) ++result;
    return static_cast<uint16_t>(sign | result);
  }
  uint32_t result = (static_cast<uint32_t>(exponent + 15) << 10) | ((mantissa >> 13) & 0x3ffu);
  const uint32_t remainder = mantissa & 0x1fffu;
  if (remainder > 0x1000u || (remainder == 0x1000u && (result & 1u))) ++result;
  return static_cast<uint16_t>(sign | result);
}

OPTD_HOST_DEVICE float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return BitsToFloat(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Subnormal or zero: mantissa * 2^-24, exact in fp32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return BitsToFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

OPTD_HOST_DEVICE float RoundToBf16(float x) { return Bf16BitsToFloat(FloatToBf16Bits(x)); }
// HalfBitsToFloat(FloatToHalfBits(x)) — round to nearest even at fp16's precision and range,
// overflow to ±inf, NaN to the quiet NaN of its sign — without a branch, so the CPU loops that
// round every Gram Newton–Schulz iterate to fp16 vectorize (the branchy composition took a third
// of a GPT-2-small keller step's CPU time). Normal halves: round the fp32 bits at bit 13, as
// FloatToBf16Bits does at bit 16 (a carry into the exponent is the right result). Below fp16's
// smallest normal, 2⁻¹⁴, the spacing is 2⁻²⁴ throughout: adding 0.75 (whose fp32 spacing is 2⁻²⁴)
// and subtracting it again rounds |x| to a multiple of 2⁻²⁴ in the default rounding mode, exactly.
// tests/kernels/formulas_test.cc checks it against the composition on every sign, exponent and
// rounding case.
OPTD_HOST_DEVICE float RoundToHalf(float x) {
  const uint32_t bits = FloatBits(x);
  const uint32_t sign = bits & 0x80000000u;
  const uint32_t abs_bits = bits & 0x7fffffffu;
  const uint32_t normal = (bits + 0x0fffu + ((bits >> 13) & 1u)) & 0xffffe000u;
  const float small = BitsToFloat(FloatBits((BitsToFloat(abs_bits) + 0.75f) - 0.75f) | sign);
  const uint32_t infinite = sign | 0x7f800000u;
  const uint32_t nan = sign | 0x7fc00000u;
  uint32_t result = abs_bits < 0x38800000u ? FloatBits(small) : normal;
  result = abs_bits >= 0x477ff000u ? infinite : result;  // rounds past 65504, or is inf
  result = abs_bits > 0x7f800000u ? nan : result;
  return BitsToFloat(result);
}

}  // namespace optd

#endif  // OPTD_COMMON_FLOAT16_H_
