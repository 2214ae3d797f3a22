// The shared formulas against values worked out by hand or from IEEE 754's definitions.
#include "kernels/formulas.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>

namespace optd::formulas {
namespace {

TEST(FormulasTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(RoundToBf16(1.0f), 1.0f);
  // bf16 keeps 8 significand bits: 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷, ties to even (1).
  EXPECT_EQ(RoundToBf16(1.0f + 0x1p-8f), 1.0f);
  EXPECT_EQ(RoundToBf16(1.0f + 3 * 0x1p-8f), 1.0f + 0x1p-6f);         // tie, rounds up to even
  EXPECT_EQ(RoundToBf16(1.0f + 0x1p-8f + 0x1p-20f), 1.0f + 0x1p-7f);  // above the tie
  EXPECT_EQ(FloatToBf16Bits(-2.0f), 0xc000);
  EXPECT_TRUE(std::isnan(RoundToBf16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_EQ(RoundToBf16(std::numeric_limits<float>::infinity()),
            std::numeric_limits<float>::infinity());
}

TEST(FormulasTest, HalfRoundsToNearestEvenWithSubnormalsAndOverflow) {
  EXPECT_EQ(RoundToHalf(1.0f), 1.0f);
  EXPECT_EQ(RoundToHalf(1.0f + 0x1p-11f), 1.0f);                             // tie to even
  EXPECT_EQ(RoundToHalf(1.0f + 3 * 0x1p-11f), 1.0f + 0x1p-9f);               // tie to even, up
  EXPECT_EQ(RoundToHalf(65504.0f), 65504.0f);                                // largest half
  EXPECT_EQ(RoundToHalf(65520.0f), std::numeric_limits<float>::infinity());  // rounds past it
  EXPECT_EQ(RoundToHalf(0x1p-24f), 0x1p-24f);                                // smallest subnormal
  EXPECT_EQ(RoundToHalf(0x1p-26f), 0.0f);                                    // below half of it
  EXPECT_EQ(RoundToHalf(3 * 0x1p-26f), 0x1p-24f);                            // above half of it
  EXPECT_EQ(RoundToHalf(-0x1p-15f), -0x1p-15f);                              // subnormal, exact
  EXPECT_EQ(FloatToHalfBits(-2.0f), 0xc000);
  EXPECT_TRUE(std::isnan(RoundToHalf(std::numeric_limits<float>::quiet_NaN())));
  for (uint32_t h = 0; h < 0x7c00; ++h) {  // every finite positive half survives a round trip
    const float f = HalfBitsToFloat(static_cast<uint16_t>(h));
    ASSERT_EQ(FloatToHalfBits(f), h) << h;
  }
}

// RoundToHalf is branch-free (so it vectorizes); it must be exactly the bit-level conversion there
// and back. Every sign, exponent and high mantissa (the top 16 bits), each with the low bits
// around every rounding point fp16 has (bit 13 for normal halves, up to bit 23 below them):
// 1.6 M floats. (Checked over all 2³² floats once by hand: no difference.)
TEST(FormulasTest, HalfRoundingEqualsTheConversionThereAndBack) {
  const uint32_t lows[] = {0x0000, 0x0001, 0x0fff, 0x1000, 0x1001, 0x1fff, 0x2000, 0x2fff,
                           0x3000, 0x3001, 0x4000, 0x5000, 0x7fff, 0x8000, 0x8001, 0x9000,
                           0xbfff, 0xc000, 0xe000, 0xefff, 0xf000, 0xf001, 0xfffe, 0xffff};
  uint32_t seed = 1;
  for (uint32_t high = 0; high < 0x10000; ++high) {
    for (size_t i = 0; i <= std::size(lows); ++i) {
      seed = seed * 1664525u + 1013904223u;
      const uint32_t bits = high << 16 | (i < std::size(lows) ? lows[i] : seed >> 16);
      const float x = BitsToFloat(bits);
      const uint32_t want = FloatBits(HalfBitsToFloat(FloatToHalfBits(x)));
      ASSERT_EQ(FloatBits(RoundToHalf(x)), want) << std::hex << bits;
    }
  }
}

TEST(FormulasTest, LerpMatchesTorchsTwoBranches) {
  EXPECT_EQ(Lerp(1.0f, 3.0f, 0.25f), 1.5f);
  EXPECT_EQ(Lerp(1.0f, 3.0f, 0.75f), 2.5f);
  EXPECT_EQ(Lerp(2.0f, 2.0f, 0.95f), 2.0f);
}

TEST(FormulasTest, ScalesAndDenominators) {
  EXPECT_EQ(RowL2Denominator(5.0f, 1e-12f), 5.0f);
  EXPECT_TRUE(IsOutOfRange(std::numeric_limits<float>::quiet_NaN(), 1e30f));
  EXPECT_TRUE(IsOutOfRange(-std::numeric_limits<float>::infinity(), 1e30f));
  EXPECT_TRUE(IsOutOfRange(-2e30f, 1e30f));
  EXPECT_FALSE(IsOutOfRange(-1e30f, 1e30f));
  EXPECT_EQ(RowL2Denominator(0.0f, 1e-12f), 1e-12f);
  // The argument is √(Σu² + eps): Σu² = 4 → 1/2, Σu² = 16 with exponent -1/4 → 1/2.
  EXPECT_FLOAT_EQ(EquilibrationScale(2.0f, -0.5f, 0.0f), 0.5f);
  EXPECT_FLOAT_EQ(EquilibrationScale(4.0f, -0.25f, 0.0f), 0.5f);
  EXPECT_FLOAT_EQ(EquilibrationScale(1e-2f, -0.5f, 10.0f), 10.0f);  // clipped from 100
  EXPECT_FLOAT_EQ(EquilibrationScale(8.0f, -1.0f / 3.0f, 0.0f), 0.25f);
  EXPECT_FLOAT_EQ(FrobeniusDenominator(2.0f, 1.02f, 1e-7f, NormEpsilon::kAdd), 2.04f + 1e-7f);
  EXPECT_EQ(FrobeniusDenominator(0.0f, 1.0f, 1e-7f, NormEpsilon::kFloor), 1e-7f);
  EXPECT_FLOAT_EQ(NorMuonSecondMoment(1.0f, 3.0f, 0.05f), 1.1f);  // takes 1 − β₂
  EXPECT_FLOAT_EQ(NorMuonRowScale(4.0f, 0.0f), 0.5f);
  EXPECT_DOUBLE_EQ(NewtonSchulzPolynomial(1.0, 3.4445, -4.7750, 2.0315), 0.701);
}

}  // namespace
}  // namespace optd::formulas
