// The CPU backend's products are tiled over its own threads (kernels/backend.h): the same bits for
// any thread count, on whatever kernels OpenBLAS picked for this CPU, and each product within its
// fp32 rounding bound of an fp64 reference at shapes that span several tiles with ragged edges.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "kernels/backend.h"
#include "kernels/formulas.h"
#include "kernels/newton_schulz.h"
#include "tests/kernels/backend_test_util.h"
#include "tests/kernels/reference.h"

namespace optd {
namespace {

using reference::RandomNormal;

// Shapes past the backend's 256-wide tiles, none a multiple of them.
constexpr int64_t kM = 300, kN = 517, kK = 261;

// AdamW's scalars the element tests step with (torch's ε placement).
constexpr formulas::AdamWScalars kTestAdamW{.beta2 = 0.95f,
                                            .one_minus_beta1 = 0.1f,
                                            .one_minus_beta2 = 0.05f,
                                            .eps = 1e-8f,
                                            .decay = 0.999f,
                                            .step_size = 0.01f,
                                            .bias_correction2_sqrt = 0.3f,
                                            .eps_placement = formulas::AdamEpsilon::kTorch};

std::unique_ptr<Backend> CpuBackendWith(int threads) {
  auto backend = CreateCpuBackend({.threads = threads});
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? std::move(*backend) : nullptr;
}

std::vector<uint16_t> ToBf16(const std::vector<float>& x) {
  std::vector<uint16_t> bits(x.size());
  for (size_t i = 0; i < x.size(); ++i) bits[i] = formulas::FloatToBf16Bits(x[i]);
  return bits;
}

// Every product the backend tiles, and Newton–Schulz over them, run on `backend`: the outputs one
// after another.
std::vector<float> AllProducts(Backend& backend) {
  testing::DeviceMemory memory(backend);
  Queue& q = backend.default_queue();
  std::vector<float> out;
  auto keep = [&](const float* device, size_t count) {
    const std::vector<float> host = memory.Download(device, count);
    out.insert(out.end(), host.begin(), host.end());
  };
  const std::vector<float> a = RandomNormal(kM * kK, 1), b = RandomNormal(kK * kN, 2);
  const std::vector<float> c0 = RandomNormal(kM * kN, 3);
  for (const Transpose trans_a : {Transpose::kNo, Transpose::kYes}) {
    for (const Transpose trans_b : {Transpose::kNo, Transpose::kYes}) {
      float* c = memory.Upload(c0);
      const GemmArgs gemm{.trans_a = trans_a,
                          .trans_b = trans_b,
                          .m = kM,
                          .n = kN,
                          .k = kK,
                          .alpha = 0.75f,
                          .beta = 0.5f,
                          .a = memory.Upload(a),
                          .lda = trans_a == Transpose::kYes ? kM : kK,
                          .b = memory.Upload(b),
                          .ldb = trans_b == Transpose::kYes ? kK : kN,
                          .c = c,
                          .ldc = kN};
      EXPECT_TRUE(backend.Gemm(q, gemm).ok());
      keep(c, c0.size());
    }
  }
  {
    float* c = memory.Upload(c0);
    const GemmArgs bf16{.m = kM,
                        .n = kN,
                        .k = kK,
                        .input_dtype = DType::kBF16,
                        .a = memory.Upload(ToBf16(a)),
                        .lda = kK,
                        .b = memory.Upload(ToBf16(b)),
                        .ldb = kN,
                        .c = c,
                        .ldc = kN};
    EXPECT_TRUE(backend.Gemm(q, bf16).ok());
    keep(c, c0.size());
  }
  for (const Transpose trans : {Transpose::kNo, Transpose::kYes}) {
    const int64_t n = trans == Transpose::kYes ? kK : kM;
    float* c = memory.Upload(RandomNormal(n * n, 4));
    EXPECT_TRUE(backend
                    .SymmetricRankK(q, SyrkArgs{.trans = trans,
                                                .n = n,
                                                .k = trans == Transpose::kYes ? kM : kK,
                                                .alpha = 1.25f,
                                                .beta = 0.5f,
                                                .a = memory.Upload(a),
                                                .lda = kK,
                                                .c = c,
                                                .ldc = n})
                    .ok());
    keep(c, n * n);
  }
  for (const Side side : {Side::kLeft, Side::kRight}) {
    const int64_t order = side == Side::kLeft ? kM : kN;
    float* c = memory.Upload(c0);
    EXPECT_TRUE(
        backend
            .SymmetricMultiply(q, SymmArgs{.side = side,
                                           .m = kM,
                                           .n = kN,
                                           .alpha = 0.75f,
                                           .beta = 0.5f,
                                           .s = memory.Upload(RandomNormal(order * order, 5)),
                                           .lds = order,
                                           .b = memory.Upload(c0),
                                           .ldb = kN,
                                           .c = c,
                                           .ldc = kN})
            .ok());
    keep(c, c0.size());
  }
  for (const auto& [rows, cols] : {std::pair{kM, kN}, std::pair{kN, kM}}) {
    for (const DType dtype : {DType::kF32, DType::kBF16}) {
      NewtonSchulzConfig config;
      config.compute_dtype = dtype;
      constexpr int64_t kBatch = 2;
      float* x = memory.Upload(RandomNormal(kBatch * rows * cols, 6));
      std::vector<float> workspace(NewtonSchulzWorkspaceFloats(config, kBatch, rows, cols));
      EXPECT_TRUE(NewtonSchulz(backend, q, MatrixBatch{x, kBatch, rows, cols}, config,
                               memory.Upload(workspace))
                      .ok());
      keep(x, kBatch * rows * cols);
    }
  }
  return out;
}

TEST(CpuBackendTest, SameBitsForAnyThreadCount) {
  std::unique_ptr<Backend> one = CpuBackendWith(1);
  ASSERT_NE(one, nullptr);
  const std::vector<float> expected = AllProducts(*one);
  for (const int threads : {2, 3, 7}) {
    SCOPED_TRACE(threads);
    std::unique_ptr<Backend> backend = CpuBackendWith(threads);
    ASSERT_NE(backend, nullptr);
    const std::vector<float> got = AllProducts(*backend);
    ASSERT_EQ(got.size(), expected.size());
    int64_t differing = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      differing += std::memcmp(&got[i], &expected[i], sizeof(float)) != 0 ? 1 : 0;
    }
    EXPECT_EQ(differing, 0) << "of " << got.size() << " elements";
  }
}

TEST(CpuBackendTest, OutOfPlaceStepsGiveTheInPlaceBitsAndLeaveTheirInputs) {
  // The CPU backend's fused AdamWInto and RmnpStepInto, and the Backend default (a copy, then the
  // step in place) that the CUDA backend inherits, against the in-place kernels.
  std::unique_ptr<Backend> backend = CpuBackendWith(3);
  ASSERT_NE(backend, nullptr);
  Queue& q = backend->default_queue();
  const int64_t rows = 37, cols = 300, n = rows * cols;
  const std::vector<float> w0 = reference::RandomNormal(n, 1), m0 = reference::RandomNormal(n, 2),
                           v0 =
                               [&] {
                                 std::vector<float> v = reference::RandomNormal(n, 3);
                                 for (float& x : v) x = x * x;
                                 return v;
                               }(),
                           g = reference::RandomNormal(n, 4);
  const formulas::AdamWScalars scalars = kTestAdamW;
  std::vector<float> w = w0, m = m0, v = v0;
  ASSERT_TRUE(backend->AdamW(q, w.data(), m.data(), v.data(), g.data(), n, &scalars).ok());
  for (const bool fused : {true, false}) {
    SCOPED_TRACE(fused ? "fused" : "default");
    std::vector<float> wo(n), mo(n), vo(n), wi = w0, mi = m0, vi = v0;
    const absl::Status s =
        fused ? backend->AdamWInto(q, wo.data(), mo.data(), vo.data(), wi.data(), mi.data(),
                                   vi.data(), g.data(), n, &scalars)
              : backend->Backend::AdamWInto(q, wo.data(), mo.data(), vo.data(), wi.data(),
                                            mi.data(), vi.data(), g.data(), n, &scalars);
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(std::memcmp(wo.data(), w.data(), n * 4), 0);
    EXPECT_EQ(std::memcmp(mo.data(), m.data(), n * 4), 0);
    EXPECT_EQ(std::memcmp(vo.data(), v.data(), n * 4), 0);
    EXPECT_EQ(wi, w0);
    EXPECT_EQ(mi, m0);
    EXPECT_EQ(vi, v0);
  }
  for (const DType step_dtype : {DType::kF32, DType::kBF16}) {
    const formulas::RateScalars rate{.lr = 0.02f, .decay = 0.999f};  // host memory is the CPU's
    const RmnpStepArgs args{.momentum = 0.95f,
                            .nesterov = true,
                            .eps = 1e-8f,
                            .rate = &rate,
                            .scale = 0.5f,
                            .step_dtype = step_dtype};
    w = w0;
    m = m0;
    ASSERT_TRUE(backend->RmnpStep(q, w.data(), m.data(), g.data(), rows, cols, args).ok());
    for (const bool fused : {true, false}) {
      SCOPED_TRACE(fused ? "fused" : "default");
      std::vector<float> wo(n), mo(n), wi = w0, mi = m0;
      const absl::Status s =
          fused ? backend->RmnpStepInto(q, wo.data(), mo.data(), wi.data(), mi.data(), g.data(),
                                        rows, cols, args)
                : backend->Backend::RmnpStepInto(q, wo.data(), mo.data(), wi.data(), mi.data(),
                                                 g.data(), rows, cols, args);
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(std::memcmp(wo.data(), w.data(), n * 4), 0);
      EXPECT_EQ(std::memcmp(mo.data(), m.data(), n * 4), 0);
      EXPECT_EQ(wi, w0);
      EXPECT_EQ(mi, m0);
    }
  }
}

// Each product of an element formula rounds before the sum it feeds (the build's
// -ffp-contract=off; nvcc's --fmad=false on the GPU): a build that fuses a·b + c into one FMA would
// break CPU ≡ CUDA. The expectations round every product through a volatile, independent of how
// this file is compiled; the inputs are checked to tell the two apart (an FMA of them gives other
// bits for many elements), so a fused backend fails here.
TEST(CpuBackendTest, ElementFormulasRoundEveryProduct) {
  std::unique_ptr<Backend> backend = CpuBackendWith(1);
  ASSERT_NE(backend, nullptr);
  Queue& q = backend->default_queue();
  const int64_t n = 4099;  // vector bodies and a tail
  const std::vector<float> w0 = reference::RandomNormal(n, 11), m0 = reference::RandomNormal(n, 12),
                           g = reference::RandomNormal(n, 13), o = reference::RandomNormal(n, 14);
  auto rounded = [](float a, float b) {
    volatile float p = a * b;
    return static_cast<float>(p);
  };
  // Per way of fusing a formula: the elements whose bits it changes.
  std::vector<int64_t> told_apart;
  auto count_fused_differs = [&](float unfused, std::initializer_list<float> fused) {
    told_apart.resize(fused.size());
    int k = 0;
    for (float f : fused) told_apart[k++] += std::memcmp(&f, &unfused, sizeof(float)) != 0;
  };
  auto expect_told_apart = [&](absl::string_view what) {
    for (size_t k = 0; k < told_apart.size(); ++k) {
      EXPECT_GT(told_apart[k], n / 100)
          << "fusing the " << what << " (way " << k << ") would change too few elements to be seen";
    }
    told_apart.clear();
  };

  // Sum momentum with Nesterov: m ← μ·m + g, u = g + μ·m.
  const float mu = 0.95f;
  std::vector<float> m = m0, u(n);
  const formulas::MomentumScalars sum{mu, 0.05f, formulas::MomentumKind::kSum, true};
  ASSERT_TRUE(backend->Momentum(q, m.data(), g.data(), u.data(), n, sum).ok());
  for (int64_t i = 0; i < n; ++i) {
    const float m1 = rounded(mu, m0[i]) + g[i];
    const float u1 = g[i] + rounded(mu, m1);
    ASSERT_EQ(m[i], m1) << "element " << i;
    ASSERT_EQ(u[i], u1) << "element " << i;
    count_fused_differs(m1, {std::fma(mu, m0[i], g[i])});
  }
  expect_told_apart("momentum");

  // Decay and step: w ← w·decay − lr·(o·scale).
  const float lr = 0.0213f, decay = 0.99957f, scale = 0.731f;
  const formulas::RateScalars rate{.lr = lr, .decay = decay};
  std::vector<float> w = w0;
  ASSERT_TRUE(backend->ApplyUpdate(q, w.data(), o.data(), n, &rate, scale, DType::kF32).ok());
  for (int64_t i = 0; i < n; ++i) {
    const float step = rounded(o[i], scale);
    const float decayed = rounded(w0[i], decay), moved = rounded(lr, step);
    ASSERT_EQ(w[i], decayed - moved) << "element " << i;
    count_fused_differs(decayed - moved,
                        {std::fma(w0[i], decay, -moved), std::fma(-lr, step, decayed)});
  }
  expect_told_apart("update");

  // AdamW (torch's ε placement): every product of its four multiply-adds rounded.
  std::vector<float> v0(n);
  for (int64_t i = 0; i < n; ++i) v0[i] = rounded(m0[i], m0[i]);
  const formulas::AdamWScalars scalars = kTestAdamW;
  std::vector<float> wa = w0, ma = m0, va = v0;
  ASSERT_TRUE(backend->AdamW(q, wa.data(), ma.data(), va.data(), g.data(), n, &scalars).ok());
  for (int64_t i = 0; i < n; ++i) {
    const float m1 = m0[i] + rounded(scalars.one_minus_beta1, g[i] - m0[i]);  // lerp, weight < ½
    const float v1 =
        rounded(v0[i], scalars.beta2) + rounded(scalars.one_minus_beta2, rounded(g[i], g[i]));
    volatile float root = std::sqrt(v1);
    volatile float denom = root / scalars.bias_correction2_sqrt + scalars.eps;
    volatile float ratio = m1 / denom;
    const float decayed = rounded(w0[i], scalars.decay);
    const float w1 = decayed - rounded(scalars.step_size, ratio);
    ASSERT_EQ(ma[i], m1) << "element " << i;
    ASSERT_EQ(va[i], v1) << "element " << i;
    ASSERT_EQ(wa[i], w1) << "element " << i;
    count_fused_differs(
        v1,
        {std::fma(v0[i], scalars.beta2, rounded(scalars.one_minus_beta2, rounded(g[i], g[i]))),
         std::fma(scalars.one_minus_beta2, rounded(g[i], g[i]), rounded(v0[i], scalars.beta2))});
  }
  expect_told_apart("AdamW second moment");
}

TEST(CpuBackendTest, TiledGemmWithinRoundingOfFp64) {
  // |fl(c) − c| <= γ_k·(|α|·|A|·|B|) + rounding of the β term, γ_k = k·u/(1 − k·u) with
  // u = 2⁻²⁴ (Higham, "Accuracy and Stability of Numerical Algorithms", 3.5), for every tile.
  std::unique_ptr<Backend> backend = CpuBackendWith(3);
  ASSERT_NE(backend, nullptr);
  testing::DeviceMemory memory(*backend);
  const std::vector<float> a = RandomNormal(kM * kK, 11), b = RandomNormal(kK * kN, 12);
  const std::vector<float> c0 = RandomNormal(kM * kN, 13);
  const float alpha = 0.75f, beta = 0.5f;
  float* c = memory.Upload(c0);
  ASSERT_TRUE(backend
                  ->Gemm(backend->default_queue(), GemmArgs{.m = kM,
                                                            .n = kN,
                                                            .k = kK,
                                                            .alpha = alpha,
                                                            .beta = beta,
                                                            .a = memory.Upload(a),
                                                            .lda = kK,
                                                            .b = memory.Upload(b),
                                                            .ldb = kN,
                                                            .c = c,
                                                            .ldc = kN})
                  .ok());
  const std::vector<float> got = memory.Download(c, c0.size());
  const double u = std::ldexp(1.0, -24);
  const double gamma = (kK + 2) * u / (1 - (kK + 2) * u);
  for (int64_t i = 0; i < kM; ++i) {
    for (int64_t j = 0; j < kN; ++j) {
      double exact = 0, magnitude = 0;
      for (int64_t l = 0; l < kK; ++l) {
        exact += double(a[i * kK + l]) * b[l * kN + j];
        magnitude += std::fabs(double(a[i * kK + l]) * b[l * kN + j]);
      }
      exact = alpha * exact + beta * double(c0[i * kN + j]);
      const double bound = gamma * (alpha * magnitude + beta * std::fabs(c0[i * kN + j]));
      ASSERT_NEAR(got[i * kN + j], exact, bound) << "element " << i << "," << j;
    }
  }
}

}  // namespace
}  // namespace optd
