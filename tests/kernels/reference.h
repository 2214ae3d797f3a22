// Plain fp64 references for the kernels tests, written from the formulas of the seeds and
// ../shared/REFERENCES.md without any of optd's code, so the tests compare against independently
// computed values.
#ifndef OPTD_TESTS_KERNELS_REFERENCE_H_
#define OPTD_TESTS_KERNELS_REFERENCE_H_

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace optd::reference {

// A row-major fp64 matrix.
struct Matrix {
  int64_t rows = 0, cols = 0;
  std::vector<double> v;

  Matrix() = default;
  Matrix(int64_t r, int64_t c) : rows(r), cols(c), v(r * c, 0.0) {}
  double& at(int64_t i, int64_t j) { return v[i * cols + j]; }
  double at(int64_t i, int64_t j) const { return v[i * cols + j]; }
};

inline Matrix FromFloats(const float* x, int64_t rows, int64_t cols) {
  Matrix m(rows, cols);
  for (int64_t i = 0; i < rows * cols; ++i) m.v[i] = x[i];
  return m;
}

inline Matrix Transposed(const Matrix& a) {
  Matrix t(a.cols, a.rows);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < a.cols; ++j) t.at(j, i) = a.at(i, j);
  return t;
}

inline Matrix Multiply(const Matrix& a, const Matrix& b) {
  Matrix c(a.rows, b.cols);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t k = 0; k < a.cols; ++k) {
      const double x = a.at(i, k);
      for (int64_t j = 0; j < b.cols; ++j) c.at(i, j) += x * b.at(k, j);
    }
  return c;
}

inline double FrobeniusNorm(const Matrix& a) {
  double s = 0;
  for (double x : a.v) s += x * x;
  return std::sqrt(s);
}

// Newton–Schulz exactly as Keller's zeropower_via_newtonschulz5 reads, in fp64: transpose when
// rows > cols, X/(safety·‖X‖ + eps) (or max(safety·‖X‖, eps) when `floor_eps`), then per step
// A = XXᵀ, B = bA + cA², X = aX + BX.
inline Matrix NewtonSchulz(Matrix x, const std::vector<std::array<double, 3>>& coefficients,
                           int steps, double eps, double safety, bool floor_eps) {
  const bool tall = x.rows > x.cols;
  if (tall) x = Transposed(x);
  const double norm = FrobeniusNorm(x) * safety;
  const double denominator = floor_eps ? std::max(norm, eps) : norm + eps;
  for (double& e : x.v) e /= denominator;
  for (int s = 0; s < steps; ++s) {
    const auto& abc = coefficients[std::min<size_t>(s, coefficients.size() - 1)];
    const Matrix a = Multiply(x, Transposed(x));
    const Matrix a2 = Multiply(a, a);
    Matrix b(a.rows, a.cols);
    for (size_t i = 0; i < b.v.size(); ++i) b.v[i] = abc[1] * a.v[i] + abc[2] * a2.v[i];
    const Matrix bx = Multiply(b, x);
    for (size_t i = 0; i < x.v.size(); ++i) x.v[i] = abc[0] * x.v[i] + bx.v[i];
  }
  return tall ? Transposed(x) : x;
}

inline const std::vector<std::array<double, 3>>& KellerCoefficients() {
  static const std::vector<std::array<double, 3>> k = {{3.4445, -4.7750, 2.0315}};
  return k;
}

inline const std::vector<std::array<double, 3>>& PolarExpressCoefficients() {
  static const std::vector<std::array<double, 3>> k = {
      {8.156554524902461, -22.48329292557795, 15.878769915207462},
      {4.042929935166739, -2.808917465908714, 0.5000178451051316},
      {3.8916678022926607, -2.772484153217685, 0.5060648178503393},
      {3.285753657755655, -2.3681294933425376, 0.46449024233003106},
      {2.3465413258596377, -1.7097828382687081, 0.42323551169305323}};
  return k;
}

inline std::vector<float> RandomNormal(int64_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> x(n);
  for (float& v : x) v = normal(rng);
  return x;
}

struct Dominance {
  double min = 0, avg = 0, max = 0;
};

// Seed 000's r_i = (VVᵀ)_ii / ((1/(m−1))·Σ_{j≠i} |(VVᵀ)_ij|) over the non-zero rows i of the
// rows×cols matrix v, in fp64: their min, mean and max (+inf for a row orthogonal to the others).
inline Dominance DominanceRatios(const std::vector<float>& v, int64_t rows, int64_t cols) {
  const Matrix vm = FromFloats(v.data(), rows, cols);
  const Matrix gram = Multiply(vm, Transposed(vm));
  Dominance d{std::numeric_limits<double>::infinity(), 0, 0};
  int counted = 0;
  for (int64_t i = 0; i < rows; ++i) {
    if (gram.at(i, i) == 0) continue;
    double off = 0;
    for (int64_t j = 0; j < rows; ++j) {
      if (j != i) off += std::fabs(gram.at(i, j));
    }
    const double r = off == 0 ? std::numeric_limits<double>::infinity()
                              : gram.at(i, i) / (off / static_cast<double>(rows - 1));
    d.min = std::min(d.min, r);
    d.max = std::max(d.max, r);
    d.avg += r;
    ++counted;
  }
  d.avg /= counted;
  return d;
}

// A rows×k matrix with orthonormal columns: Gram–Schmidt (twice) on Gaussian columns, in fp64.
inline Matrix RandomOrthonormalColumns(int64_t rows, int64_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  Matrix q(rows, k);
  for (int64_t j = 0; j < k; ++j) {
    std::vector<double> c(rows);
    for (double& e : c) e = normal(rng);
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t i = 0; i < j; ++i) {
        double dot = 0;
        for (int64_t r = 0; r < rows; ++r) dot += q.at(r, i) * c[r];
        for (int64_t r = 0; r < rows; ++r) c[r] -= dot * q.at(r, i);
      }
    }
    double norm = 0;
    for (double e : c) norm += e * e;
    for (int64_t r = 0; r < rows; ++r) q.at(r, j) = c[r] / std::sqrt(norm);
  }
  return q;
}

// U·diag(sigma)·Wᵀ with random orthonormal U (rows×k) and W (cols×k), k = sigma.size(); the
// polar factor U·Wᵀ into *polar when given.
inline std::vector<float> WithSingularValues(int64_t rows, int64_t cols,
                                             const std::vector<double>& sigma, uint32_t seed,
                                             std::vector<double>* polar = nullptr) {
  const int64_t k = sigma.size();
  const Matrix u = RandomOrthonormalColumns(rows, k, seed);
  const Matrix w = RandomOrthonormalColumns(cols, k, seed + 1);
  std::vector<float> x(rows * cols);
  if (polar != nullptr) polar->assign(rows * cols, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      double e = 0, p = 0;
      for (int64_t i = 0; i < k; ++i) {
        e += u.at(r, i) * sigma[i] * w.at(c, i);
        p += u.at(r, i) * w.at(c, i);
      }
      x[r * cols + c] = static_cast<float>(e);
      if (polar != nullptr) (*polar)[r * cols + c] = p;
    }
  return x;
}

// ‖a − b‖ / ‖b‖ over two equally long sequences.
template <typename A, typename B>
double RelativeError(const A& a, const B& b) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    diff += (double(a[i]) - double(b[i])) * (double(a[i]) - double(b[i]));
    norm += double(b[i]) * double(b[i]);
  }
  return norm == 0 ? std::sqrt(diff) : std::sqrt(diff / norm);
}

}  // namespace optd::reference

#endif  // OPTD_TESTS_KERNELS_REFERENCE_H_
