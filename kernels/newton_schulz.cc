#include "kernels/newton_schulz.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace optd {

absl::StatusOr<std::vector<NewtonSchulzCoefficients>> NewtonSchulzCoefficientSet(
    absl::string_view name) {
  if (name == "keller") return std::vector<NewtonSchulzCoefficients>{{3.4445, -4.7750, 2.0315}};
  if (name == "polar_express") {
    // The 5-step set of modded-nanogpt and dion; its safety factor is applied to the input
    // (safety 1.02 in the dion preset).
    return std::vector<NewtonSchulzCoefficients>{
        {8.156554524902461, -22.48329292557795, 15.878769915207462},
        {4.042929935166739, -2.808917465908714, 0.5000178451051316},
        {3.8916678022926607, -2.772484153217685, 0.5060648178503393},
        {3.285753657755655, -2.3681294933425376, 0.46449024233003106},
        {2.3465413258596377, -1.7097828382687081, 0.42323551169305323}};
  }
  if (name == "dion_legacy") {
    return std::vector<NewtonSchulzCoefficients>{{4.0848, -6.8946, 2.9270},
                                                 {3.9505, -6.3029, 2.6377},
                                                 {3.7418, -5.5913, 2.3037},
                                                 {2.8769, -3.1427, 1.2046},
                                                 {2.8366, -3.0525, 1.2012}};
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown Newton-Schulz coefficient set '", name,
                   "'; expected keller, polar_express, dion_legacy or custom"));
}

namespace {

std::vector<NewtonSchulzCoefficients> ListOf(const NewtonSchulzConfig& config) {
  if (config.coefficient_set == "custom") return config.custom;
  auto list = NewtonSchulzCoefficientSet(config.coefficient_set);
  return list.ok() ? *list : std::vector<NewtonSchulzCoefficients>{};
}

// The checks that make a run well defined; ValidateNewtonSchulzConfig adds the divergence check,
// which costs too much to repeat on every call.
absl::Status CheckNewtonSchulzSettings(const NewtonSchulzConfig& config) {
  if (config.coefficient_set == "custom") {
    if (config.custom.empty()) {
      return absl::InvalidArgumentError("custom Newton-Schulz coefficient list is empty");
    }
    for (const auto& [a, b, c] : config.custom) {
      if (!std::isfinite(a) || !std::isfinite(b) || !std::isfinite(c)) {
        return absl::InvalidArgumentError("custom Newton-Schulz coefficients must be finite");
      }
    }
  } else {
    OPTD_RETURN_IF_ERROR(NewtonSchulzCoefficientSet(config.coefficient_set).status());
  }
  if (config.steps < 1 || config.steps > kMaxNewtonSchulzSteps) {
    return absl::InvalidArgumentError(absl::StrCat("Newton-Schulz steps must be in [1, ",
                                                   kMaxNewtonSchulzSteps, "], got ", config.steps));
  }
  if (config.reference_dimension < 1) {
    return absl::InvalidArgumentError("Newton-Schulz reference dimension must be >= 1");
  }
  if (config.compute_dtype == DType::kF64) {
    return absl::InvalidArgumentError("Newton-Schulz computes in fp32, bf16 or fp16, not fp64");
  }
  // eps > 0 keeps a zero matrix at zero instead of 0/0.
  if (!(config.eps > 0.0f) || !std::isfinite(config.eps)) {
    return absl::InvalidArgumentError("Newton-Schulz eps must be finite and > 0");
  }
  // With safety >= 1 the normalized singular values start in [0, 1].
  if (!(config.safety >= 1.0f) || !std::isfinite(config.safety)) {
    return absl::InvalidArgumentError("Newton-Schulz safety factor must be finite and >= 1");
  }
  const std::vector<int> restarts = config.gram_restarts.value_or(std::vector<int>{});
  for (size_t i = 0; i < restarts.size(); ++i) {
    const int restart = restarts[i];
    // Iteration 0 starts from X anyway; a restart is an iteration index, so at most the last.
    if (restart < 1 || restart >= kMaxNewtonSchulzSteps) {
      return absl::InvalidArgumentError(
          absl::StrCat("Gram Newton-Schulz restart iterations must be in [1, ",
                       kMaxNewtonSchulzSteps - 1, "], got ", restart));
    }
    if (i > 0 && restart <= restarts[i - 1]) {
      return absl::InvalidArgumentError(
          "Gram Newton-Schulz restart iterations must be listed in increasing order");
    }
  }
  return absl::OkStatus();
}

// `restarts` with restarts added where the gain accumulated since the previous one would pass 64:
// Q's eigenvalues are the gains p(σ)/σ of the steps since the last restart (tracked on a grid of
// starting values), largest at σ → 0 where each step multiplies by a, and a spurious negative
// eigenvalue of a half-precision R grows by the square of that gain until it blows up. The
// reference's own 5-step segments reach 33 (polar express) and 41 (keller), so they are left as
// they are; a longer run restarts about every third step (keller: 3.4445³ ≈ 41, 3.4445⁴ ≈ 141).
std::vector<int> WithinHalfRange(const NewtonSchulzRun& run, std::vector<int> restarts) {
  constexpr double kMaxGain = 64.0;
  constexpr int kPoints = 200;
  std::vector<double> start(kPoints + 1), x(kPoints + 1);
  for (int i = 0; i <= kPoints; ++i) start[i] = x[i] = static_cast<double>(i) / kPoints;
  double slope = 1.0;  // the gain at σ → 0
  std::vector<int> out;
  for (int step = 0; step < static_cast<int>(run.steps.size()); ++step) {
    const auto [a, b, c] = run.steps[step];
    std::vector<double> next(x.size());
    double gain = std::fabs(slope * a);
    for (size_t i = 1; i < x.size(); ++i) {
      next[i] = formulas::NewtonSchulzPolynomial(x[i], a, b, c);
      gain = std::max(gain, std::fabs(next[i] / start[i]));
    }
    const bool listed = std::find(restarts.begin(), restarts.end(), step) != restarts.end();
    if (step > 0 && (listed || gain > kMaxGain)) {
      out.push_back(step);
      for (size_t i = 1; i < x.size(); ++i) start[i] = std::max(x[i], 1e-30);
      slope = 1.0;
    }
    slope *= a;
    x = std::move(next);
  }
  return out;
}

// The iterate X of one Newton–Schulz run, in `x` itself and one workspace buffer of its size in
// turn, and the two products both methods make with it. A tall X is iterated on as Xᵀ without
// moving data: its Gram matrix is XᵀX and X ← X·S.
class Iterate {
 public:
  Iterate(Backend& backend, Queue& queue, const MatrixBatch& x, bool transpose_tall, DType dtype,
          float* other)
      : backend_(backend),
        queue_(queue),
        x_(x),
        tall_(transpose_tall && x.rows > x.cols),
        dtype_(dtype),
        current_(x.data),
        other_(other) {}

  // Order of the Gram matrix.
  int64_t order() const { return tall_ ? x_.cols : x_.rows; }
  DType dtype() const { return dtype_; }

  // gram = XXᵀ (or XᵀX), upper triangle, then mirrored and rounded: the next product reads it in
  // full.
  absl::Status Gram(float* gram) {
    const int64_t s = order();
    SyrkArgs args{.trans = tall_ ? Transpose::kYes : Transpose::kNo,
                  .n = s,
                  .k = tall_ ? x_.rows : x_.cols,
                  .a = current_,
                  .lda = x_.cols,
                  .stride_a = x_.matrix_size(),
                  .c = gram,
                  .ldc = s,
                  .stride_c = s * s,
                  .batch = x_.batch};
    OPTD_RETURN_IF_ERROR(backend_.SymmetricRankK(queue_, args));
    return Mirror(gram);
  }

  // Copies each Gram-sized matrix's upper triangle onto its lower one and rounds them.
  absl::Status Mirror(float* gram) {
    OPTD_RETURN_IF_ERROR(backend_.Symmetrize(queue_, gram, order(), x_.batch));
    return backend_.RoundTo(queue_, gram, x_.batch * order() * order(), dtype_);
  }

  // X ← S·X (X·S for a tall X) for symmetric S, read from its upper triangle; rounded.
  absl::Status MultiplyBy(const float* symmetric) {
    const int64_t s = order(), size = x_.matrix_size();
    SymmArgs args{.side = tall_ ? Side::kRight : Side::kLeft,
                  .m = x_.rows,
                  .n = x_.cols,
                  .s = symmetric,
                  .lds = s,
                  .stride_s = s * s,
                  .b = current_,
                  .ldb = x_.cols,
                  .stride_b = size,
                  .c = other_,
                  .ldc = x_.cols,
                  .stride_c = size,
                  .batch = x_.batch};
    OPTD_RETURN_IF_ERROR(backend_.SymmetricMultiply(queue_, args));
    OPTD_RETURN_IF_ERROR(backend_.RoundTo(queue_, other_, x_.size(), dtype_));
    std::swap(current_, other_);
    return absl::OkStatus();
  }

  // Leaves the result in `x`.
  absl::Status Finish() {
    if (current_ == x_.data) return absl::OkStatus();
    return backend_.Copy(queue_, x_.data, current_, static_cast<size_t>(x_.size()) * sizeof(float));
  }

 private:
  Backend& backend_;
  Queue& queue_;
  const MatrixBatch x_;
  const bool tall_;
  const DType dtype_;
  float* current_;
  float* other_;
};

// Gram Newton–Schulz (see NewtonSchulzMethod) on the normalized, rounded X of `x`: every product
// and sum rounded to the iterate's dtype as the reference holds R, Z, Q and X in half precision.
// `gram_space` holds five batches of Gram-sized matrices.
absl::Status GramNewtonSchulz(Backend& backend, Queue& queue, Iterate& x, int64_t batch,
                              const std::vector<std::array<float, 3>>& coefficients,
                              const std::vector<int>& restarts, float* gram_space) {
  const int64_t s = x.order();
  const int64_t gram_size = s * s, grams = batch * gram_size;
  const size_t gram_bytes = static_cast<size_t>(grams) * sizeof(float);
  float* r = gram_space;
  float* z = r + grams;
  float* q = z + grams;
  float* q_next = q + grams;
  float* w = q_next + grams;

  // c = alpha·A·B + beta·c for commuting symmetric A and B (so A·B = A·Bᵀ is symmetric).
  auto product = [&](const float* a, const float* b, float alpha, float beta,
                     float* c) -> absl::Status {
    SyrkArgs args{.n = s,
                  .k = s,
                  .alpha = alpha,
                  .beta = beta,
                  .a = a,
                  .lda = s,
                  .stride_a = gram_size,
                  .b = a == b ? nullptr : b,
                  .ldb = s,
                  .stride_b = gram_size,
                  .c = c,
                  .ldc = s,
                  .stride_c = gram_size,
                  .batch = batch};
    OPTD_RETURN_IF_ERROR(backend.SymmetricRankK(queue, args));
    return x.Mirror(c);
  };
  auto restarts_at = [&](int step) {
    return step > 0 && std::find(restarts.begin(), restarts.end(), step) != restarts.end();
  };

  OPTD_RETURN_IF_ERROR(x.Gram(r));
  const int steps = static_cast<int>(coefficients.size());
  for (int step = 0; step < steps; ++step) {
    const auto [a, b, c] = coefficients[step];
    if (restarts_at(step)) {
      OPTD_RETURN_IF_ERROR(x.MultiplyBy(q));
      OPTD_RETURN_IF_ERROR(x.Gram(r));
    }
    // Z = b·R + c·R².
    OPTD_RETURN_IF_ERROR(backend.Copy(queue, z, r, gram_bytes));
    OPTD_RETURN_IF_ERROR(product(r, r, c, b, z));
    if (step == 0 || restarts_at(step)) {
      // Q = I·(Z + aI).
      OPTD_RETURN_IF_ERROR(backend.Copy(queue, q, z, gram_bytes));
      OPTD_RETURN_IF_ERROR(backend.AddDiagonal(queue, q, s, batch, a));
      OPTD_RETURN_IF_ERROR(backend.RoundTo(queue, q, grams, x.dtype()));
    } else {
      // Q ← Q·Z + a·Q.
      OPTD_RETURN_IF_ERROR(backend.Copy(queue, q_next, q, gram_bytes));
      OPTD_RETURN_IF_ERROR(product(q, z, 1.0f, a, q_next));
      std::swap(q, q_next);
    }
    // R becomes the Gram matrix of (Z + aI)·X, unless nothing reads it.
    if (step + 1 < steps && !restarts_at(step + 1)) {
      OPTD_RETURN_IF_ERROR(backend.Copy(queue, w, r, gram_bytes));
      OPTD_RETURN_IF_ERROR(product(r, z, 1.0f, a, w));  // W = R·Z + a·R
      OPTD_RETURN_IF_ERROR(backend.Copy(queue, r, w, gram_bytes));
      OPTD_RETURN_IF_ERROR(product(z, w, 1.0f, a, r));  // R = Z·W + a·W
    }
  }
  OPTD_RETURN_IF_ERROR(x.MultiplyBy(q));
  return x.Finish();
}

}  // namespace

absl::Status ValidateNewtonSchulzConfig(const NewtonSchulzConfig& config) {
  OPTD_RETURN_IF_ERROR(CheckNewtonSchulzSettings(config));
  // Newton–Schulz acts on each singular value alone, so the coefficients are safe when the scalar
  // iteration keeps every start in [0, 1] bounded over as many steps as the config can run (kept
  // well below fp32's range; the named sets stay below 1.6).
  const std::vector<NewtonSchulzCoefficients> list = ListOf(config);
  const int max_steps = config.steps_grow_with_dimension ? kMaxNewtonSchulzSteps : config.steps;
  constexpr double kBound = 1e3;
  for (int i = 0; i <= 1000; ++i) {
    double x = i / 1000.0;
    for (int step = 0; step < max_steps; ++step) {
      const auto& [a, b, c] = list[std::min<size_t>(step, list.size() - 1)];
      x = formulas::NewtonSchulzPolynomial(x, a, b, c);
      if (!(std::fabs(x) <= kBound)) {
        return absl::InvalidArgumentError(
            absl::StrCat("Newton-Schulz coefficients diverge: the singular value ", i / 1000.0,
                         " grows past ", kBound, " by step ", step + 1, " of ", max_steps));
      }
    }
  }
  return absl::OkStatus();
}

int NewtonSchulzSteps(const NewtonSchulzConfig& config, int64_t rows, int64_t cols) {
  const int64_t dimension = std::min(rows, cols);
  if (!config.steps_grow_with_dimension || dimension <= config.reference_dimension) {
    return config.steps;
  }
  const std::vector<NewtonSchulzCoefficients> list = ListOf(config);
  const double slope = list.empty() ? 1.0 : list.back()[0];
  if (slope <= 1.0) return config.steps;
  const double lost = 0.5 * std::log(static_cast<double>(dimension) / config.reference_dimension);
  const double extra = std::ceil(lost / std::log(slope));
  return static_cast<int>(std::min<double>(kMaxNewtonSchulzSteps, config.steps + extra));
}

NewtonSchulzCoefficients NewtonSchulzStepCoefficients(const NewtonSchulzConfig& config, int step) {
  const std::vector<NewtonSchulzCoefficients> list = ListOf(config);
  return list[std::min<size_t>(step, list.size() - 1)];
}

std::vector<int> GramNewtonSchulzRestarts(const NewtonSchulzConfig& config) {
  if (config.gram_restarts) return *config.gram_restarts;
  return config.compute_dtype == DType::kF32 ? std::vector<int>{3} : std::vector<int>{2};
}

DType GramNewtonSchulzDType(const NewtonSchulzConfig& config) {
  return config.compute_dtype == DType::kBF16 ? DType::kF16 : config.compute_dtype;
}

double GramNewtonSchulzMinAspect(absl::string_view backend) {
  // CPU (bench/RESULTS.md, "Gram Newton–Schulz"): from aspect 2 on Gram won at every benchmarked
  // shape (1.14–1.5× at 2, 1.3–1.7× at 3 to 8); below it the gain was within the machine's noise
  // or a loss (0.93–0.97× at 1.25, 0.92–1.27× across runs at 1.5).
  if (backend == "cpu") return 2.0;
  // CUDA: the standard iteration has a native path (bf16/fp16 tensor-core GEMMs) and Gram runs
  // composed of fp32 cuBLAS calls; not measured on a GPU yet, so `auto` keeps the standard path
  // there (scripts/gpu-check measures both).
  return std::numeric_limits<double>::infinity();
}

bool UsesGramNewtonSchulz(const NewtonSchulzConfig& config, absl::string_view backend, int64_t rows,
                          int64_t cols) {
  if (config.method == NewtonSchulzMethod::kStandard) return false;
  const int64_t order = config.transpose_tall ? std::min(rows, cols) : rows;
  const int64_t other = rows * cols / std::max<int64_t>(1, order);
  if (other <= order) return false;
  if (config.method == NewtonSchulzMethod::kGram) return true;
  return static_cast<double>(other) >=
         GramNewtonSchulzMinAspect(backend) * static_cast<double>(order);
}

int64_t NewtonSchulzWorkspaceFloats(const NewtonSchulzConfig& config, int64_t batch, int64_t rows,
                                    int64_t cols) {
  const int64_t gram = config.transpose_tall ? std::min(rows, cols) : rows;
  // A method that may run Gram on this shape on some backend (a square one never does).
  NewtonSchulzConfig gram_config = config;
  if (gram_config.method == NewtonSchulzMethod::kAuto)
    gram_config.method = NewtonSchulzMethod::kGram;
  const int64_t grams = UsesGramNewtonSchulz(gram_config, "", rows, cols) ? 5 : 2;
  return batch * (rows * cols + grams * gram * gram);
}

absl::Status NewtonSchulz(Backend& backend, Queue& queue, const MatrixBatch& x,
                          const NewtonSchulzConfig& config, float* workspace) {
  OPTD_RETURN_IF_ERROR(CheckNewtonSchulzSettings(config));
  if (x.batch < 0 || x.rows < 0 || x.cols < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("newton-schulz: negative shape [", x.batch, ", ", x.rows, ", ", x.cols, "]"));
  }
  if (x.size() == 0) return absl::OkStatus();
  if (x.data == nullptr || workspace == nullptr) {
    return absl::InvalidArgumentError("newton-schulz: null matrix or workspace");
  }
  const int steps = NewtonSchulzSteps(config, x.rows, x.cols);
  NewtonSchulzRun run{.dtype = config.compute_dtype,
                      .safety = config.safety,
                      .eps = config.eps,
                      .eps_mode = config.eps_mode,
                      .transpose_tall = config.transpose_tall,
                      .steps = {}};
  for (int step = 0; step < steps; ++step) {
    const auto [a, b, c] = NewtonSchulzStepCoefficients(config, step);
    run.steps.push_back({static_cast<float>(a), static_cast<float>(b), static_cast<float>(c)});
  }
  const bool use_gram = UsesGramNewtonSchulz(config, backend.name(), x.rows, x.cols);
  if (!use_gram) {
    absl::Status native = backend.NewtonSchulzNative(queue, x, run, workspace);
    if (!absl::IsUnimplemented(native)) return native;
  }

  const DType dtype = config.compute_dtype;
  // The input is cast to the compute dtype before it is normalized, and the norm computed in it,
  // as the references do in bf16; fp16's range (±65504) holds neither raw gradients nor their
  // norms, so in fp16 the normalization runs in fp32 and the cast follows.
  const DType input_dtype = dtype == DType::kF16 ? DType::kF32 : dtype;
  OPTD_RETURN_IF_ERROR(backend.RoundTo(queue, x.data, x.size(), input_dtype));
  OPTD_RETURN_IF_ERROR(backend.FrobeniusNormalize(queue, x, config.safety, config.eps,
                                                  config.eps_mode, input_dtype));
  OPTD_RETURN_IF_ERROR(backend.RoundTo(queue, x.data, x.size(), dtype));
  if (use_gram) {
    run.dtype = GramNewtonSchulzDType(config);
    OPTD_RETURN_IF_ERROR(backend.RoundTo(queue, x.data, x.size(), run.dtype));
    std::vector<int> restarts = GramNewtonSchulzRestarts(config);
    if (run.dtype == DType::kF16) restarts = WithinHalfRange(run, std::move(restarts));
    Iterate iterate(backend, queue, x, config.transpose_tall, run.dtype, workspace);
    return GramNewtonSchulz(backend, queue, iterate, x.batch, run.steps, restarts,
                            workspace + x.size());
  }

  Iterate iterate(backend, queue, x, config.transpose_tall, dtype, workspace);
  const int64_t s = iterate.order();
  const int64_t grams = x.batch * s * s;
  float* gram = workspace + x.size();
  float* poly = gram + grams;
  for (const auto& [a, b, c] : run.steps) {
    // A = XXᵀ (or XᵀX).
    OPTD_RETURN_IF_ERROR(iterate.Gram(gram));
    // B = c·A·Aᵀ + b·A: start from a copy of A and let beta carry b.
    OPTD_RETURN_IF_ERROR(
        backend.Copy(queue, poly, gram, static_cast<size_t>(grams) * sizeof(float)));
    SyrkArgs poly_args{.trans = Transpose::kNo,
                       .n = s,
                       .k = s,
                       .alpha = c,
                       .beta = b,
                       .a = gram,
                       .lda = s,
                       .stride_a = s * s,
                       .c = poly,
                       .ldc = s,
                       .stride_c = s * s,
                       .batch = x.batch};
    OPTD_RETURN_IF_ERROR(backend.SymmetricRankK(queue, poly_args));
    // aX + BX = (B + aI)·X; B + aI is rounded once, as a GEMM epilogue would.
    OPTD_RETURN_IF_ERROR(backend.AddDiagonal(queue, poly, s, x.batch, a));
    OPTD_RETURN_IF_ERROR(backend.RoundTo(queue, poly, grams, dtype));
    OPTD_RETURN_IF_ERROR(iterate.MultiplyBy(poly));
  }
  return iterate.Finish();
}

}  // namespace optd
