// The CUDA sources on a GPU: device discovery never aborts, and the shared formulas give the same
// bits on the device as on the CPU. Skips, with the reason, where there is no GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/cuda/device.h"
#include "kernels/formulas.h"
#include "tests/kernels/reference.h"

namespace optd::cuda {
namespace {

TEST(CudaDeviceTest, QueryNeverAborts) {
  const DeviceQuery query = QueryDevices();
  EXPECT_GE(query.count, 0);
  if (query.count == 0) {
    EXPECT_FALSE(query.error.empty());
  }
}

class CudaFormulaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const DeviceQuery query = QueryDevices();
    if (query.count == 0) GTEST_SKIP() << "no CUDA device: " << query.error;
  }
};

TEST_F(CudaFormulaTest, MomentumIsBitwiseTheCpuFormula) {
  const int n = 4097;
  for (int kind : {0, 1}) {
    for (bool nesterov : {false, true}) {
      auto m = reference::RandomNormal(n, 1), g = reference::RandomNormal(n, 2);
      std::vector<float> u(n), m_cpu = m, u_cpu(n);
      for (int i = 0; i < n; ++i) {
        u_cpu[i] = formulas::MomentumStep(
            m_cpu[i], g[i], {0.95f, 0.05f, static_cast<formulas::MomentumKind>(kind), nesterov});
      }
      ASSERT_EQ(MomentumOnDevice(m.data(), g.data(), u.data(), n, 0.95f, 0.05f, kind, nesterov),
                "");
      EXPECT_EQ(m, m_cpu);
      EXPECT_EQ(u, u_cpu);
    }
  }
}

TEST_F(CudaFormulaTest, RoundingIsBitwiseTheCpuFormula) {
  auto x = reference::RandomNormal(10000, 3, 100.0f);
  auto bf16 = x, half = x;
  ASSERT_EQ(RoundToBf16OnDevice(bf16.data(), bf16.size()), "");
  ASSERT_EQ(RoundToHalfOnDevice(half.data(), half.size()), "");
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(bf16[i], formulas::RoundToBf16(x[i])) << x[i];
    ASSERT_EQ(half[i], formulas::RoundToHalf(x[i])) << x[i];
  }
}

}  // namespace
}  // namespace optd::cuda
