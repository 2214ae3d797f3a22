#include "kernels/auto_choice.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/analysis.h"

namespace optd {

absl::Status ValidateAutoConfig(const AutoConfig& c) {
  auto check = [](bool ok, absl::string_view what) {
    return ok ? absl::OkStatus() : absl::InvalidArgumentError(what);
  };
  OPTD_RETURN_IF_ERROR(
      check(c.min_steps >= 1 && c.min_steps <= c.max_steps && c.max_steps <= kMaxNewtonSchulzSteps,
            absl::StrCat("ns.min_steps and ns.max_steps must satisfy 1 <= "
                         "min <= max <= ",
                         kMaxNewtonSchulzSteps)));
  OPTD_RETURN_IF_ERROR(check(c.small_sv_target >= 0.0 && c.small_sv_target < 1.0,
                             "ns.small_sv_target must be in [0, 1)"));
  OPTD_RETURN_IF_ERROR(check(c.max_step_change >= 1, "ns.max_step_change must be >= 1"));
  OPTD_RETURN_IF_ERROR(check(c.min_dominance > 0.0, "auto.min_dominance must be > 0"));
  OPTD_RETURN_IF_ERROR(
      check(c.min_cosine >= 0.0 && c.min_cosine <= 1.0, "auto.min_cosine must be in [0, 1]"));
  OPTD_RETURN_IF_ERROR(
      check(c.hysteresis >= 0.0 && c.hysteresis < 1.0, "auto.hysteresis must be in [0, 1)"));
  OPTD_RETURN_IF_ERROR(check(c.max_dim >= 1, "auto.max_dim must be >= 1"));
  return check(c.interval >= 1, "auto.interval must be >= 1");
}

bool DecidesOn(const AutoConfig& config, int64_t rows, int64_t cols) {
  if (std::min(rows, cols) > config.max_dim) return false;
  return !(config.direction && rows > cols && rows / 4 > config.max_dim);
}

namespace {

// Seed 000's smallest ratio over the nonzero rows of a Gram matrix `g` (n×n, upper triangle).
double DominanceMinOfGram(const std::vector<double>& g, int64_t n) {
  std::vector<double> off(n, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i + 1; j < n; ++j) {
      off[i] += std::fabs(g[i * n + j]);
      off[j] += std::fabs(g[i * n + j]);
    }
  }
  double min = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (g[i * n + i] == 0.0 || off[i] == 0.0) continue;  // a zero row; an unbounded ratio
    min = std::min(min, g[i * n + i] / (off[i] / static_cast<double>(n - 1)));
  }
  return min;
}

// The same for a tall X (rows > cols): X·Xᵀ a block of rows at a time, never held whole, in fp32
// as the analyzer forms it (rows²·cols multiply-adds, the decision's largest cost for a tall
// matrix; the ratio needs no more precision), summed in fp64.
double DominanceMinByBlocks(absl::Span<const float> x, int64_t rows, int64_t cols) {
  const int64_t block = std::clamp<int64_t>((int64_t{1} << 22) / rows, 1, rows);
  std::vector<float> g(block * rows);
  double min = std::numeric_limits<double>::infinity();
  for (int64_t first = 0; first < rows; first += block) {
    const int64_t count = std::min(block, rows - first);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(count),
                static_cast<int>(rows), static_cast<int>(cols), 1.0f, x.data() + first * cols,
                static_cast<int>(cols), x.data(), static_cast<int>(cols), 0.0f, g.data(),
                static_cast<int>(rows));
    for (int64_t b = 0; b < count; ++b) {
      const int64_t i = first + b;
      const float* row = g.data() + b * rows;
      double off = 0;
      for (int64_t j = 0; j < rows; ++j) {
        if (j != i) off += std::fabs(static_cast<double>(row[j]));
      }
      if (row[i] == 0.0f || off == 0.0) continue;
      min = std::min(min, row[i] / (off / static_cast<double>(rows - 1)));
    }
  }
  return min;
}

}  // namespace

absl::StatusOr<AutoFigures> MeasureAutoFigures(absl::Span<const float> x32, int64_t rows,
                                               int64_t cols, bool direction) {
  if (rows < 1 || cols < 1 || static_cast<int64_t>(x32.size()) != rows * cols) {
    return absl::InvalidArgumentError(
        absl::StrCat("auto figures: ", x32.size(), " values for a ", rows, "x", cols, " matrix"));
  }
  std::vector<double> x(x32.begin(), x32.end());
  AutoFigures f;
  std::vector<double> row_norms(rows, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    double s = 0;
    for (int64_t j = 0; j < cols; ++j) s += x[i * cols + j] * x[i * cols + j];
    row_norms[i] = std::sqrt(s);
    f.frobenius_norm += s;
  }
  f.frobenius_norm = std::sqrt(f.frobenius_norm);
  if (f.frobenius_norm == 0.0) {
    return absl::FailedPreconditionError("auto figures: the matrix is zero");
  }
  // The Gram matrix of the smaller side: X·Xᵀ for a wide X, Xᵀ·X for a tall one.
  const bool wide = rows <= cols;
  const int64_t n = wide ? rows : cols;
  std::vector<double> gram(n * n, 0.0);
  cblas_dsyrk(CblasRowMajor, CblasUpper, wide ? CblasNoTrans : CblasTrans, static_cast<int>(n),
              static_cast<int>(wide ? cols : rows), 1.0, x.data(), static_cast<int>(cols), 0.0,
              gram.data(), static_cast<int>(n));
  if (direction) {
    f.dominance_min = rows < 2 ? std::numeric_limits<double>::infinity()
                      : wide   ? DominanceMinOfGram(gram, n)
                               : DominanceMinByBlocks(x32, rows, cols);
  }
  // Eigenvalues ascending, and with `direction` the eigenvectors as the columns of `gram`.
  std::vector<double> lambda(n);
  const lapack_int info =
      LAPACKE_dsyevd(LAPACK_ROW_MAJOR, direction ? 'V' : 'N', 'U', static_cast<lapack_int>(n),
                     gram.data(), static_cast<lapack_int>(n), lambda.data());
  if (info != 0) {
    return absl::InternalError(absl::StrCat("auto figures: LAPACKE_dsyevd failed with info=", info,
                                            " on a ", rows, "x", cols, " matrix"));
  }
  const double null = kAutoNullSpace * f.frobenius_norm;
  std::vector<int64_t> kept;  // eigenvector columns above the null space, descending
  for (int64_t k = n - 1; k >= 0; --k) {
    const double sigma = std::sqrt(std::max(lambda[k], 0.0));
    if (sigma <= null) break;
    f.singular_values.push_back(sigma);
    kept.push_back(k);
  }
  if (!direction) return f;

  // cos(D·X, polar(X)) with D = diag(1/‖x_i‖) over the nonzero rows: ‖D·X‖F² is their count and
  // ‖polar(X)‖F² the rank, and ⟨D·X, polar(X)⟩ = tr(D·U·Σ·Uᵀ) = Σ_i d_i·Σ_k U_ik²·σ_k for a wide
  // X = U·Σ·Wᵀ (polar = (X·Xᵀ)^(−1/2)·X), = Σ_k w_kᵀ·(Xᵀ·D·X)·w_k / σ_k for a tall one.
  int64_t nonzero_rows = 0;
  for (double norm : row_norms) nonzero_rows += norm > 0.0;
  double inner = 0;
  if (wide) {
    for (int64_t i = 0; i < rows; ++i) {
      if (row_norms[i] == 0.0) continue;
      double s = 0;
      for (size_t r = 0; r < kept.size(); ++r) {
        const double u = gram[i * n + kept[r]];
        s += u * u * f.singular_values[r];
      }
      inner += s / row_norms[i];
    }
  } else {
    // Xᵀ·D·X = Yᵀ·Y with the rows of Y = x_i/√‖x_i‖.
    for (int64_t i = 0; i < rows; ++i) {
      const double d = row_norms[i] == 0.0 ? 0.0 : 1.0 / std::sqrt(row_norms[i]);
      for (int64_t j = 0; j < cols; ++j) x[i * cols + j] *= d;
    }
    std::vector<double> m(n * n, 0.0);
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(n), static_cast<int>(rows),
                1.0, x.data(), static_cast<int>(cols), 0.0, m.data(), static_cast<int>(n));
    // w_kᵀ·M·w_k for every kept eigenvector at once: M·W in one symmetric multiply (W = `gram`,
    // whose columns are the eigenvectors), then the columns' dot products.
    std::vector<double> mw(n * n);
    cblas_dsymm(CblasRowMajor, CblasLeft, CblasUpper, static_cast<int>(n), static_cast<int>(n), 1.0,
                m.data(), static_cast<int>(n), gram.data(), static_cast<int>(n), 0.0, mw.data(),
                static_cast<int>(n));
    for (size_t r = 0; r < kept.size(); ++r) {
      const int64_t k = kept[r];
      double quad = 0;
      for (int64_t a = 0; a < n; ++a) quad += gram[a * n + k] * mw[a * n + k];
      inner += quad / f.singular_values[r];
    }
  }
  const double norms =
      std::sqrt(static_cast<double>(nonzero_rows) * static_cast<double>(f.singular_values.size()));
  f.cosine = norms > 0.0 ? inner / norms : 0.0;
  return f;
}

double SmallSingularValueShare(const NewtonSchulzConfig& config, int64_t rows, int64_t cols,
                               const AutoFigures& figures, int steps) {
  if (figures.singular_values.empty()) return 0.0;
  NewtonSchulzConfig c = config;
  c.steps = steps;
  c.steps_grow_with_dimension = false;
  const NewtonSchulzSingularValueMap map(c, rows, cols, figures.frobenius_norm);
  int64_t small = 0;
  for (double sigma : figures.singular_values) small += map(sigma) < 0.6;
  return static_cast<double>(small) / static_cast<double>(figures.singular_values.size());
}

int ChooseNewtonSchulzSteps(const AutoConfig& config, int current,
                            const std::function<double(int steps)>& share) {
  current = std::clamp(current, config.min_steps, config.max_steps);
  // The fewest steps meeting a target; max_steps where none does.
  auto fewest = [&](double target) {
    for (int k = config.min_steps; k < config.max_steps; ++k) {
      if (share(k) <= target) return k;
    }
    return config.max_steps;
  };
  const int up = fewest(config.small_sv_target);
  if (up > current) return std::min(up, current + config.max_step_change);
  const int down = fewest(config.small_sv_target / 2);
  if (down < current) return std::max(down, current - config.max_step_change);
  return current;
}

bool ChooseRowNormalize(const AutoConfig& config, bool current, double dominance_min,
                        double cosine) {
  const double h = config.hysteresis;
  const double cosine_margin = h * (1.0 - config.min_cosine);
  if (!current) {
    return dominance_min >= (1.0 + h) * config.min_dominance &&
           cosine >= config.min_cosine + cosine_margin;
  }
  return !(dominance_min < (1.0 - h) * config.min_dominance ||
           cosine < config.min_cosine - cosine_margin);
}

absl::StatusOr<MatrixDecision> DecideMatrix(absl::Span<const float> x, int64_t rows, int64_t cols,
                                            const AutoConfig& config,
                                            const NewtonSchulzConfig& newton_schulz,
                                            MatrixChoice current) {
  if (!DecidesOn(config, rows, cols)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "auto modes: a ", rows, "x", cols, " matrix is beyond auto.max_dim ", config.max_dim));
  }
  OPTD_ASSIGN_OR_RETURN(const AutoFigures figures,
                        MeasureAutoFigures(x, rows, cols, config.direction));
  MatrixDecision d;
  d.choice = current;
  auto share = [&](int steps) {
    return SmallSingularValueShare(newton_schulz, rows, cols, figures, steps);
  };
  if (config.steps) d.choice.steps = ChooseNewtonSchulzSteps(config, current.steps, share);
  d.small_sv_share = share(d.choice.steps);
  if (config.direction) {
    d.choice.row_normalize =
        ChooseRowNormalize(config, current.row_normalize, figures.dominance_min, figures.cosine);
    d.dominance_min = figures.dominance_min;
    d.cosine = figures.cosine;
  }
  return d;
}

}  // namespace optd
