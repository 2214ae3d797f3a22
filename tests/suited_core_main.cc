// main() of the tests that compute with the kernels: first what optd's own main() does
// (kernels/cpu/openblas_core.h), so where OpenBLAS took this CPU for an older one the test and the
// daemons it starts run the same suited core and their steps can be compared bit for bit. Never
// overrides an OPENBLAS_CORETYPE from the environment (README, "Determinism").
#include "gtest/gtest.h"
#include "kernels/cpu/openblas_core.h"

int main(int argc, char** argv) {
  optd::RestartWithSuitedOpenBlasCoreOrWarn(argv);
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
