// One conformance suite for every backend: each operation against a plain fp64 computation of the
// same inputs (llm.c's and ggml's test-backend-ops habit). The CUDA backend joins the parameter
// list with the same cases; without a GPU its cases skip with the reason.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/backend_test_util.h"
#include "tests/kernels/reference.h"

namespace optd {
namespace {

using reference::RandomNormal;
using reference::RelativeError;

class BackendTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string skip;
    backend_ = testing::MakeBackend(GetParam(), &skip);
    if (!skip.empty()) GTEST_SKIP() << skip;
    ASSERT_NE(backend_, nullptr);
    memory_ = std::make_unique<testing::DeviceMemory>(*backend_);
  }

  // A backend copy of host data, kept alive for the test.
  template <typename T>
  T* Device(const std::vector<T>& host) {
    return memory_->Upload(host);
  }
  std::vector<float> Host(const float* device, size_t count) {
    return memory_->Download(device, count);
  }
  Queue& queue() { return backend_->default_queue(); }
  void FusedRmnpStepEqualsItsStagesFor(int rows, int cols);

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<testing::DeviceMemory> memory_;
};

// fp64 C = alpha·op(A)·op(B) + beta·C for row-major inputs.
std::vector<double> GemmReference(bool ta, bool tb, int m, int n, int k, double alpha,
                                  const std::vector<float>& a, const std::vector<float>& b,
                                  double beta, const std::vector<float>& c) {
  std::vector<double> out(m * n);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int p = 0; p < k; ++p) {
        const double x = ta ? a[p * m + i] : a[i * k + p];
        const double y = tb ? b[j * k + p] : b[p * n + j];
        s += x * y;
      }
      out[i * n + j] = alpha * s + beta * c[i * n + j];
    }
  return out;
}

TEST_P(BackendTest, GemmFp32AllTransposesBatched) {
  const int m = 13, n = 9, k = 17, batch = 3;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      auto a = RandomNormal(batch * m * k, 1), b = RandomNormal(batch * k * n, 2),
           c = RandomNormal(batch * m * n, 3);
      float* dc = Device(c);
      GemmArgs args{.trans_a = ta ? Transpose::kYes : Transpose::kNo,
                    .trans_b = tb ? Transpose::kYes : Transpose::kNo,
                    .m = m,
                    .n = n,
                    .k = k,
                    .alpha = 0.7f,
                    .beta = -0.3f,
                    .a = Device(a),
                    .lda = ta ? m : k,
                    .stride_a = m * k,
                    .b = Device(b),
                    .ldb = tb ? k : n,
                    .stride_b = k * n,
                    .c = dc,
                    .ldc = n,
                    .stride_c = m * n,
                    .batch = batch};
      ASSERT_TRUE(backend_->Gemm(queue(), args).ok());
      auto got = Host(dc, c.size());
      for (int i = 0; i < batch; ++i) {
        auto slice = [&](const std::vector<float>& v, int size) {
          return std::vector<float>(v.begin() + i * size, v.begin() + (i + 1) * size);
        };
        auto want = GemmReference(ta, tb, m, n, k, 0.7, slice(a, m * k), slice(b, k * n), -0.3,
                                  slice(c, m * n));
        EXPECT_LT(RelativeError(slice(got, m * n), want), 1e-6) << ta << tb << i;
      }
    }
  }
}

TEST_P(BackendTest, GemmHalfInputsAccumulateInFp32) {
  const int m = 8, n = 6, k = 64;
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    auto a = RandomNormal(m * k, 4), b = RandomNormal(k * n, 5);
    std::vector<float> c(m * n, 0.0f);
    uint16_t* da = Device(testing::ToHalfWords(a, dtype));
    uint16_t* db = Device(testing::ToHalfWords(b, dtype));
    float* dc = Device(c);
    GemmArgs args{.m = m,
                  .n = n,
                  .k = k,
                  .input_dtype = dtype,
                  .a = da,
                  .lda = k,
                  .b = db,
                  .ldb = n,
                  .c = dc,
                  .ldc = n};
    ASSERT_TRUE(backend_->Gemm(queue(), args).ok());
    // The inputs are exact in fp32, so only fp32 accumulation separates the result from fp64.
    EXPECT_LT(
        RelativeError(Host(dc, c.size()), GemmReference(false, false, m, n, k, 1, a, b, 0, c)),
        1e-6);
  }
}

TEST_P(BackendTest, SymmetricRankKWritesTheUpperTriangle) {
  const int n = 11, k = 7;
  for (bool trans : {false, true}) {
    auto a = RandomNormal(n * k, 6), c = RandomNormal(n * n, 7);
    float* dc = Device(c);
    SyrkArgs args{.trans = trans ? Transpose::kYes : Transpose::kNo,
                  .n = n,
                  .k = k,
                  .alpha = 1.5f,
                  .beta = 0.5f,
                  .a = Device(a),
                  .lda = trans ? n : k,
                  .c = dc,
                  .ldc = n};
    ASSERT_TRUE(backend_->SymmetricRankK(queue(), args).ok());
    auto got = Host(dc, c.size());
    // op(A)·op(A)ᵀ is op(A)·(op(A))ᵀ: A·Aᵀ (no trans, A is n×k) or Aᵀ·A (trans, A is k×n).
    auto want = GemmReference(trans, !trans, n, n, k, 1.5, a, a, 0.5, c);
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        if (j >= i) {
          EXPECT_NEAR(got[i * n + j], want[i * n + j], 1e-5 * (1 + std::fabs(want[i * n + j])));
        } else {
          EXPECT_EQ(got[i * n + j], c[i * n + j]) << "lower triangle written at " << i << "," << j;
        }
      }
    }
  }
}

// syrkx: the upper triangle of alpha·op(A)·op(B)ᵀ + beta·C, batched, over more than one of the
// CPU backend's 256-wide tiles (its diagonal tiles take a separate path); a NaN in C's strict lower
// triangle is neither read nor overwritten.
TEST_P(BackendTest, SymmetricRankKWithTwoOperandsWritesTheUpperTriangle) {
  const int n = 300, k = 9, batch = 2;
  for (bool trans : {false, true}) {
    auto a = RandomNormal(batch * n * k, 11), b = RandomNormal(batch * n * k, 12),
         c = RandomNormal(batch * n * n, 13);
    for (int m = 0; m < batch; ++m)
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < i; ++j)
          c[m * n * n + i * n + j] = std::numeric_limits<float>::quiet_NaN();
    float* dc = Device(c);
    SyrkArgs args{.trans = trans ? Transpose::kYes : Transpose::kNo,
                  .n = n,
                  .k = k,
                  .alpha = -0.75f,
                  .beta = 0.5f,
                  .a = Device(a),
                  .lda = trans ? n : k,
                  .stride_a = n * k,
                  .b = Device(b),
                  .ldb = trans ? n : k,
                  .stride_b = n * k,
                  .c = dc,
                  .ldc = n,
                  .stride_c = n * n,
                  .batch = batch};
    ASSERT_TRUE(backend_->SymmetricRankK(queue(), args).ok());
    auto got = Host(dc, c.size());
    for (int m = 0; m < batch; ++m) {
      const auto slice = [&](const std::vector<float>& v, int size) {
        return std::vector<float>(v.begin() + m * size, v.begin() + (m + 1) * size);
      };
      auto want = GemmReference(trans, !trans, n, n, k, -0.75, slice(a, n * k), slice(b, n * k),
                                0.5, slice(c, n * n));
      int wrong = 0;
      for (int i = 0; i < n; ++i) {
        for (int j = 0; j < n; ++j) {
          const float value = got[m * n * n + i * n + j];
          if (j >= i) {
            wrong +=
                !(std::fabs(value - want[i * n + j]) <= 1e-5 * (1 + std::fabs(want[i * n + j])));
          } else {
            wrong += !std::isnan(value);
          }
        }
      }
      EXPECT_EQ(wrong, 0) << "trans=" << trans << " matrix " << m;
    }
  }
}

TEST_P(BackendTest, SymmetricMultiplyReadsTheUpperTriangleOnly) {
  const int m = 7, n = 5;
  for (Side side : {Side::kLeft, Side::kRight}) {
    const int s_order = side == Side::kLeft ? m : n;
    auto s = RandomNormal(s_order * s_order, 8);
    std::vector<float> full = s;
    for (int i = 0; i < s_order; ++i)
      for (int j = 0; j < i; ++j) {
        full[i * s_order + j] = s[j * s_order + i];
        s[i * s_order + j] = std::numeric_limits<float>::quiet_NaN();  // must not be read
      }
    auto b = RandomNormal(m * n, 9), c = RandomNormal(m * n, 10);
    float* dc = Device(c);
    SymmArgs args{.side = side,
                  .m = m,
                  .n = n,
                  .alpha = 2.0f,
                  .beta = 0.25f,
                  .s = Device(s),
                  .lds = s_order,
                  .b = Device(b),
                  .ldb = n,
                  .c = dc,
                  .ldc = n};
    ASSERT_TRUE(backend_->SymmetricMultiply(queue(), args).ok());
    auto want = side == Side::kLeft ? GemmReference(false, false, m, n, m, 2, full, b, 0.25, c)
                                    : GemmReference(false, false, m, n, n, 2, b, full, 0.25, c);
    EXPECT_LT(RelativeError(Host(dc, c.size()), want), 1e-6);
  }
}

TEST_P(BackendTest, SingularValueDecompositionReconstructs) {
  for (auto [m, n] : {std::pair{9, 5}, std::pair{4, 10}}) {
    const int k = std::min(m, n);
    auto a = RandomNormal(2 * m * n, 11);
    float* da = Device(a);
    std::vector<float> zeros(2 * (k + m * k + k * n), 0.0f);
    float* work = Device(zeros);
    float* s = work;
    float* u = s + 2 * k;
    float* vt = u + 2 * m * k;
    ASSERT_TRUE(
        backend_->SingularValueDecomposition(queue(), MatrixBatch{da, 2, m, n}, s, u, vt).ok());
    auto hs = Host(s, 2 * k), hu = Host(u, 2 * m * k), hvt = Host(vt, 2 * k * n);
    for (int b = 0; b < 2; ++b) {
      std::vector<double> rebuilt(m * n, 0.0);
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j)
          for (int p = 0; p < k; ++p)
            rebuilt[i * n + j] +=
                double(hu[b * m * k + i * k + p]) * hs[b * k + p] * hvt[b * k * n + p * n + j];
      std::vector<float> original(a.begin() + b * m * n, a.begin() + (b + 1) * m * n);
      EXPECT_LT(RelativeError(rebuilt, original), 1e-6);
      for (int p = 1; p < k; ++p) EXPECT_GE(hs[b * k + p - 1], hs[b * k + p]);
    }
  }
  // Singular values of a diagonal matrix are its absolute diagonal, sorted.
  std::vector<float> d = {0, 0, -2, 0, 3, 0, 0.5, 0, 0};
  std::vector<float> out(3, 0);
  float* ds = Device(out);
  ASSERT_TRUE(backend_
                  ->SingularValueDecomposition(queue(), MatrixBatch{Device(d), 1, 3, 3}, ds,
                                               nullptr, nullptr)
                  .ok());
  auto s = Host(ds, 3);
  EXPECT_NEAR(s[0], 3, 1e-6);
  EXPECT_NEAR(s[1], 2, 1e-6);
  EXPECT_NEAR(s[2], 0.5, 1e-6);
}

TEST_P(BackendTest, SymmetrizeAndAddDiagonal) {
  const int n = 4;
  auto a = RandomNormal(2 * n * n, 12);
  float* da = Device(a);
  ASSERT_TRUE(backend_->Symmetrize(queue(), da, n, 2).ok());
  ASSERT_TRUE(backend_->AddDiagonal(queue(), da, n, 2, 1.5f).ok());
  auto got = Host(da, a.size());
  for (int b = 0; b < 2; ++b)
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        const int upper = b * n * n + std::min(i, j) * n + std::max(i, j);
        EXPECT_EQ(got[b * n * n + i * n + j], a[upper] + (i == j ? 1.5f : 0.0f));
      }
}

TEST_P(BackendTest, FrobeniusNormalizePerMatrixAndZeroStaysZero) {
  auto x = RandomNormal(2 * 12, 13);
  x.resize(3 * 12, 0.0f);  // the third matrix is zero
  float* dx = Device(x);
  ASSERT_TRUE(backend_
                  ->FrobeniusNormalize(queue(), MatrixBatch{dx, 3, 3, 4}, 1.02f, 1e-7f,
                                       formulas::NormEpsilon::kAdd, DType::kF32)
                  .ok());
  auto got = Host(dx, x.size());
  for (int b = 0; b < 2; ++b) {
    double norm = 0;
    for (int i = 0; i < 12; ++i) norm += double(x[b * 12 + i]) * x[b * 12 + i];
    norm = std::sqrt(norm);
    for (int i = 0; i < 12; ++i) {
      EXPECT_NEAR(got[b * 12 + i], x[b * 12 + i] / (1.02 * norm + 1e-7), 1e-6);
    }
  }
  for (int i = 24; i < 36; ++i) EXPECT_EQ(got[i], 0.0f);
  // The floor form divides a tiny matrix by eps, not by its norm.
  std::vector<float> tiny = {1e-9f, 0, 0, 0};
  float* dt = Device(tiny);
  ASSERT_TRUE(backend_
                  ->FrobeniusNormalize(queue(), MatrixBatch{dt, 1, 2, 2}, 1.0f, 1e-7f,
                                       formulas::NormEpsilon::kFloor, DType::kF32)
                  .ok());
  EXPECT_NEAR(Host(dt, 4)[0], 1e-2, 1e-8);
}

TEST_P(BackendTest, RowAndColumnSumsOfSquares) {
  const int batch = 2, rows = 3, cols = 5;
  auto x = RandomNormal(batch * rows * cols, 14);
  std::vector<float> zeros(batch * (rows + cols), 0.0f);
  float* out = Device(zeros);
  float* dx = Device(x);
  ASSERT_TRUE(backend_->RowSumSquares(queue(), dx, batch * rows, cols, out).ok());
  ASSERT_TRUE(
      backend_->ColumnSumSquares(queue(), MatrixBatch{dx, batch, rows, cols}, out + batch * rows)
          .ok());
  auto got = Host(out, zeros.size());
  for (int b = 0; b < batch; ++b) {
    for (int r = 0; r < rows; ++r) {
      double s = 0;
      for (int c = 0; c < cols; ++c)
        s += double(x[(b * rows + r) * cols + c]) * x[(b * rows + r) * cols + c];
      EXPECT_NEAR(got[b * rows + r], s, 1e-5 * s);
    }
    for (int c = 0; c < cols; ++c) {
      double s = 0;
      for (int r = 0; r < rows; ++r)
        s += double(x[(b * rows + r) * cols + c]) * x[(b * rows + r) * cols + c];
      EXPECT_NEAR(got[batch * rows + b * cols + c], s, 1e-5 * s);
    }
  }
}

TEST_P(BackendTest, EquilibrateRowColumnAndClip) {
  const int rows = 4, cols = 6;
  for (int mode = 0; mode < 3; ++mode) {
    for (float clip : {0.0f, 1.5f}) {
      auto x = RandomNormal(rows * cols, 15);
      x[0] *= 40;  // a large row and column so the clip binds
      std::vector<float> scratch(rows + cols, 0.0f);
      float* dx = Device(x);
      EquilibrateArgs args{
          .rows = mode != 1, .cols = mode != 0, .eps = 1e-8f, .exponent = -0.5f, .clip = clip};
      ASSERT_TRUE(
          backend_->Equilibrate(queue(), MatrixBatch{dx, 1, rows, cols}, args, Device(scratch))
              .ok());
      std::vector<double> rs(rows, 0), cs(cols, 0), want(rows * cols);
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
          rs[r] += double(x[r * cols + c]) * x[r * cols + c];
          cs[c] += double(x[r * cols + c]) * x[r * cols + c];
        }
      auto factor = [&](double sum) {
        double f = 1 / std::sqrt(sum + 1e-8);
        return clip > 0 ? std::clamp(f, 1.0 / clip, double(clip)) : f;
      };
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c)
          want[r * cols + c] =
              x[r * cols + c] * (args.rows ? factor(rs[r]) : 1) * (args.cols ? factor(cs[c]) : 1);
      EXPECT_LT(RelativeError(Host(dx, x.size()), want), 1e-6) << mode << " " << clip;
    }
  }
}

TEST_P(BackendTest, RowNormalizeKeepsZeroRowsZero) {
  auto x = RandomNormal(3 * 7, 16);
  for (int c = 0; c < 7; ++c) x[7 + c] = 0.0f;
  float* dx = Device(x);
  ASSERT_TRUE(backend_->RowNormalize(queue(), dx, 3, 7, 1e-12f).ok());
  auto got = Host(dx, x.size());
  for (int r = 0; r < 3; ++r) {
    double n = 0;
    for (int c = 0; c < 7; ++c) n += double(x[r * 7 + c]) * x[r * 7 + c];
    for (int c = 0; c < 7; ++c) {
      const double want = r == 1 ? 0.0 : x[r * 7 + c] / std::sqrt(n);
      EXPECT_NEAR(got[r * 7 + c], want, 1e-6);
    }
  }
}

TEST_P(BackendTest, NorMuonNormalizeMatchesSeed002) {
  const int rows = 5, cols = 8;
  for (bool preserve : {true, false}) {
    auto o = RandomNormal(rows * cols, 17);
    std::vector<float> v = {0.1f, 0.0f, 0.3f, 0.02f, 1.0f};
    float* dox = Device(o);
    float* dv = Device(v);
    NorMuonArgs args{.one_minus_beta2 = 0.05f, .eps = 1e-10f, .preserve_frobenius = preserve};
    ASSERT_TRUE(
        backend_->NorMuonNormalize(queue(), MatrixBatch{dox, 1, rows, cols}, dv, args).ok());
    std::vector<double> want(rows * cols), want_v(rows);
    double before = 0, after = 0;
    for (float e : o) before += double(e) * e;
    for (int r = 0; r < rows; ++r) {
      double mean = 0;
      for (int c = 0; c < cols; ++c) mean += double(o[r * cols + c]) * o[r * cols + c] / cols;
      want_v[r] = 0.95 * v[r] + 0.05 * mean;
      for (int c = 0; c < cols; ++c) {
        want[r * cols + c] = o[r * cols + c] / (std::sqrt(want_v[r]) + 1e-10);
        after += want[r * cols + c] * want[r * cols + c];
      }
    }
    if (preserve) {
      for (double& e : want) e *= std::sqrt(before) / std::sqrt(after);
    }
    EXPECT_LT(RelativeError(Host(dox, o.size()), want), 1e-6);
    EXPECT_LT(RelativeError(Host(dv, rows), want_v), 1e-6);
  }
}

TEST_P(BackendTest, ScaleToRms) {
  auto x = RandomNormal(2 * 6, 18);
  float* dx = Device(x);
  ASSERT_TRUE(backend_->ScaleToRms(queue(), MatrixBatch{dx, 2, 2, 3}, 0.2f, 0.0f).ok());
  auto got = Host(dx, x.size());
  for (int b = 0; b < 2; ++b) {
    double s = 0;
    for (int i = 0; i < 6; ++i) s += double(got[b * 6 + i]) * got[b * 6 + i];
    EXPECT_NEAR(std::sqrt(s / 6), 0.2, 1e-6);
  }
}

TEST_P(BackendTest, MomentumFormsMatchTheirDefinitions) {
  const int n = 100;
  for (auto kind : {formulas::MomentumKind::kEma, formulas::MomentumKind::kSum}) {
    for (bool nesterov : {false, true}) {
      auto m = RandomNormal(n, 19), g = RandomNormal(n, 20);
      std::vector<float> u(n, 0.0f);
      float *dm = Device(m), *du = Device(u);
      const formulas::MomentumScalars scalars{0.9f, 0.1f, kind, nesterov};
      ASSERT_TRUE(backend_->Momentum(queue(), dm, Device(g), du, n, scalars).ok());
      auto gm = Host(dm, n), gu = Host(du, n);
      for (int i = 0; i < n; ++i) {
        const double mu = 0.9;
        const double new_m =
            kind == formulas::MomentumKind::kEma ? mu * m[i] + (1 - mu) * g[i] : mu * m[i] + g[i];
        double want_u = new_m;
        if (nesterov) {
          want_u = kind == formulas::MomentumKind::kEma ? (1 - mu) * g[i] + mu * new_m
                                                        : g[i] + mu * new_m;
        }
        EXPECT_NEAR(gm[i], new_m, 1e-6 * (1 + std::fabs(new_m)));
        EXPECT_NEAR(gu[i], want_u, 1e-6 * (1 + std::fabs(want_u)));
      }
    }
  }
}

TEST_P(BackendTest, ApplyUpdateDecaysThenStepsWithRounding) {
  const int n = 64;
  auto w = RandomNormal(n, 21), o = RandomNormal(n, 22);
  float* dw = Device(w);
  const auto* rate = Device(std::vector<formulas::RateScalars>{{.lr = 0.1f, .decay = 0.95f}});
  ASSERT_TRUE(backend_->ApplyUpdate(queue(), dw, Device(o), n, rate, 1.7f, DType::kBF16).ok());
  auto got = Host(dw, n);
  for (int i = 0; i < n; ++i) {
    const double step = formulas::RoundToBf16(o[i] * 1.7f);
    EXPECT_NEAR(got[i], w[i] * (1 - 0.05) - 0.1 * step, 1e-6);
  }
}

TEST_P(BackendTest, AdamWBothEpsilonPlacements) {
  const int n = 50;
  for (auto placement : {formulas::AdamEpsilon::kTorch, formulas::AdamEpsilon::kMoonlight}) {
    auto w = RandomNormal(n, 23), m = RandomNormal(n, 24, 0.1f), g = RandomNormal(n, 26);
    std::vector<float> v(n);
    for (int i = 0; i < n; ++i) v[i] = 0.01f * (1 + i % 5);
    float *dw = Device(w), *dm = Device(m), *dv = Device(v);
    const int t = 3;
    const double b1 = 0.9, b2 = 0.95, lr = 0.01, wd = 0.1, eps = 1e-8;
    const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
    const bool torch = placement == formulas::AdamEpsilon::kTorch;
    formulas::AdamWScalars s{float(b2),
                             float(1 - b1),
                             float(1 - b2),
                             float(eps),
                             float(1 - lr * wd),
                             float(torch ? lr / bc1 : lr * std::sqrt(bc2) / bc1),
                             float(std::sqrt(bc2)),
                             placement};
    const auto* ds = Device(std::vector<formulas::AdamWScalars>{s});
    ASSERT_TRUE(backend_->AdamW(queue(), dw, dm, dv, Device(g), n, ds).ok());
    auto gw = Host(dw, n);
    for (int i = 0; i < n; ++i) {
      const double mm = b1 * m[i] + (1 - b1) * g[i];
      const double vv = b2 * v[i] + (1 - b2) * double(g[i]) * g[i];
      const double direction = placement == formulas::AdamEpsilon::kTorch
                                   ? (mm / bc1) / (std::sqrt(vv / bc2) + eps)
                                   : (mm / bc1) / (std::sqrt(vv / bc2) + eps / std::sqrt(bc2));
      const double want = w[i] * (1 - lr * wd) - lr * direction;
      EXPECT_NEAR(gw[i], want, 2e-6 * (1 + std::fabs(want)));
    }
  }
}

TEST_P(BackendTest, FusedRmnpStepEqualsItsStages) {
  // Odd and multiple-of-4 row lengths (a GPU takes 16-byte accesses for the latter), short and
  // long rows.
  for (int cols : {33, 36, 2100}) {
    SCOPED_TRACE(cols);
    FusedRmnpStepEqualsItsStagesFor(6, cols);
  }
}

void BackendTest::FusedRmnpStepEqualsItsStagesFor(int rows, int cols) {
  auto w = RandomNormal(rows * cols, 27), m = RandomNormal(rows * cols, 28),
       g = RandomNormal(rows * cols, 29);
  float *w1 = Device(w), *m1 = Device(m), *w2 = Device(w), *m2 = Device(m), *dg = Device(g);
  std::vector<float> u(rows * cols);
  float* du = Device(u);
  const RmnpStepArgs args = testing::TestRmnpStep(*memory_);
  ASSERT_TRUE(backend_->RmnpStep(queue(), w1, m1, dg, rows, cols, args).ok());
  ASSERT_TRUE(
      backend_
          ->Momentum(queue(), m2, dg, du, rows * cols,
                     formulas::MomentumScalars{0.95f, 0.05f, formulas::MomentumKind::kSum, true})
          .ok());
  ASSERT_TRUE(backend_->RowNormalize(queue(), du, rows, cols, 1e-12f).ok());
  ASSERT_TRUE(
      backend_->ApplyUpdate(queue(), w2, du, rows * cols, args.rate, 1.3f, DType::kBF16).ok());
  EXPECT_EQ(Host(w1, w.size()), Host(w2, w.size()));
  EXPECT_EQ(Host(m1, m.size()), Host(m2, m.size()));
}

TEST_P(BackendTest, ConvertRoundTripAndCountOutOfRange) {
  std::vector<float> x = {1.0f, -2.5f, 3.14159f, 65504.0f, 1e-7f};
  float* dx = Device(x);
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    auto narrow = backend_->Allocate(x.size() * 2);
    ASSERT_TRUE(narrow.ok());
    std::vector<float> back(x.size());
    float* db = Device(back);
    ASSERT_TRUE(backend_->Convert(queue(), dx, DType::kF32, narrow->data(), dtype, x.size()).ok());
    ASSERT_TRUE(backend_->Convert(queue(), narrow->data(), dtype, db, DType::kF32, x.size()).ok());
    auto got = Host(db, x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      const float want =
          dtype == DType::kBF16 ? formulas::RoundToBf16(x[i]) : formulas::RoundToHalf(x[i]);
      EXPECT_EQ(got[i], want);
    }
  }
  std::vector<float> bad = {1,
                            std::numeric_limits<float>::infinity(),
                            2,
                            std::numeric_limits<float>::quiet_NaN(),
                            -std::numeric_limits<float>::infinity(),
                            -5,
                            4};
  auto count = backend_->CountOutOfRange(queue(), Device(bad), bad.size(), 4.0f);
  ASSERT_TRUE(count.ok());
  EXPECT_EQ(*count, 4);
}

TEST_P(BackendTest, BadArgumentsAreInvalidArgumentAndWriteNothing) {
  std::vector<float> x = {1, 2, 3, 4};
  float* dx = Device(x);
  EXPECT_EQ(backend_->RowNormalize(queue(), dx, -1, 4, 1e-12f).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(backend_->RowNormalize(queue(), nullptr, 1, 4, 1e-12f).code(),
            absl::StatusCode::kInvalidArgument);
  GemmArgs gemm{.m = 2, .n = 2, .k = 2, .a = dx, .lda = 1, .b = dx, .ldb = 2, .c = dx, .ldc = 2};
  const absl::Status status = backend_->Gemm(queue(), gemm);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("leading dimension of A"), absl::string_view::npos) << status;
  SyrkArgs syrk{.n = -2, .k = 2, .a = dx, .lda = 2, .c = dx, .ldc = 2};
  EXPECT_EQ(backend_->SymmetricRankK(queue(), syrk).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Host(dx, 4), x);
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendTest, ::testing::Values("cpu", "cuda"),
                         [](const auto& info) { return info.param; });

TEST_P(BackendTest, HalfGemmWithPaddedRowsReadsOnlyTheMatrix) {
  // A is 4×3 stored with lda 5; the last row ends at element 3·5 + 3, the rest is not read.
  const int m = 4, n = 2, k = 3, lda = 5;
  std::vector<float> a(m * lda, 0.0f), b = RandomNormal(k * n, 30), c(m * n, 0.0f);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < k; ++j) a[i * lda + j] = float(i + j);
  a.resize((m - 1) * lda + k);  // the backend memory ends where the matrix does
  uint16_t* da = Device(testing::ToHalfWords(a, DType::kBF16));
  uint16_t* db = Device(testing::ToHalfWords(b, DType::kBF16));
  float* dc = Device(c);
  GemmArgs args{.m = m,
                .n = n,
                .k = k,
                .input_dtype = DType::kBF16,
                .a = da,
                .lda = lda,
                .b = db,
                .ldb = n,
                .c = dc,
                .ldc = n};
  ASSERT_TRUE(backend_->Gemm(queue(), args).ok());
  std::vector<float> dense(m * k);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < k; ++j) dense[i * k + j] = a[i * lda + j];
  EXPECT_LT(
      RelativeError(Host(dc, c.size()), GemmReference(false, false, m, n, k, 1, dense, b, 0, c)),
      1e-6);
}

TEST_P(BackendTest, FailedSvdAndFp64ConversionWriteNothing) {
  auto a = RandomNormal(2 * 9, 31);
  a[9 + 4] = std::numeric_limits<float>::quiet_NaN();  // the second matrix
  std::vector<float> out(2 * 3, -7.0f);
  float* s = Device(out);
  const absl::Status status = backend_->SingularValueDecomposition(
      queue(), MatrixBatch{Device(a), 2, 3, 3}, s, nullptr, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("matrix 1"), absl::string_view::npos) << status;
  EXPECT_EQ(Host(s, out.size()), out);
  std::vector<float> x = {1, 2};
  EXPECT_EQ(backend_->Convert(queue(), Device(x), DType::kF32, Device(x), DType::kF64, 2).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(BackendTest, ZeroSmallSingularVectors) {
  // u is 3×2 per matrix; the second singular value is tiny in matrix 0 and zero in matrix 1.
  std::vector<float> u = {1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6}, s = {2, 1e-9f, 0, 0};
  float* du = Device(u);
  ASSERT_TRUE(backend_->ZeroSmallSingularVectors(queue(), du, Device(s), 2, 3, 2, 1e-6f).ok());
  EXPECT_EQ(Host(du, u.size()), (std::vector<float>{1, 0, 3, 0, 5, 0, 0, 0, 0, 0, 0, 0}));
}
}  // namespace
}  // namespace optd
