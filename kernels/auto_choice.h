// The `auto` modes' decisions (issue 20 §2 and §3; ../shared/DESIGN.md, "The optimizer, as
// stages", direction): per matrix, how many Newton–Schulz steps (seed 003) and whether row
// normalization may stand in for Newton–Schulz (seed 000), chosen from the matrix the direction
// stage is about to orthogonalize.
//
// The figures are those of the analyzer's exact path (kernels/analysis.h), computed here on the
// host in fp64 from the direction's input itself, inside the step that decides: an analysis is
// asynchronous and may be skipped, a decision must not be, or two replicas of a session (a
// replay, a restore, a sharded run) would choose differently.
#ifndef OPTD_KERNELS_AUTO_CHOICE_H_
#define OPTD_KERNELS_AUTO_CHOICE_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/newton_schulz.h"

namespace optd {

// Settings of the auto modes (override keys in parentheses).
struct AutoConfig {
  // ns.steps=auto (seed 003): the fewest steps in [min_steps, max_steps] (ns.min_steps,
  // ns.max_steps) whose polynomial leaves at most small_sv_target (ns.small_sv_target) of the
  // input's singular values below 0.6, moving at most max_step_change (ns.max_step_change) steps
  // per decision; fewer steps only where they would leave at most half the target (hysteresis).
  bool steps = false;
  int min_steps = 2;
  int max_steps = 10;
  double small_sv_target = 0.05;
  int max_step_change = 2;
  // direction=auto (seed 000): row normalization where V·Vᵀ's smallest row dominance ratio is at
  // least min_dominance (auto.min_dominance) and cos(rownormalize(V), polar(V)) at least
  // min_cosine (auto.min_cosine), Newton–Schulz elsewhere. A matrix switches to row
  // normalization when both clear their threshold by the margin `hysteresis` (auto.hysteresis):
  // r_min ≥ (1 + h)·min_dominance and cos ≥ min_cosine + h·(1 − min_cosine); it switches back
  // when either falls below its threshold by the same margin.
  bool direction = false;
  double min_dominance = 1.0;
  double min_cosine = 0.9;
  double hysteresis = 0.05;
  // Decisions are made in steps 1, interval, 2·interval, ... of each tensor (auto.interval) and
  // apply from the next step on.
  int64_t interval = 50;
  // A decision costs about (4/3)·n³ for n = min(rows, cols) (the eigenvalues; with direction=auto
  // the eigenvectors too, and rows²·cols for a tall matrix's V·Vᵀ), on the host, inside the step.
  // Matrices whose smaller side exceeds max_dim (auto.max_dim), or tall ones with more than
  // 4·max_dim rows under direction=auto, are not decided on: they keep their choice (the
  // configured steps, Newton–Schulz).
  int64_t max_dim = 4096;

  bool any() const { return steps || direction; }
  friend bool operator==(const AutoConfig&, const AutoConfig&) = default;
};

// InvalidArgument naming the setting out of range.
absl::Status ValidateAutoConfig(const AutoConfig& config);

// Singular values at or below this share of ‖X‖F are the matrix's null space, which no number of
// steps lifts (the polar factor is zero there too): they count in neither figure. 2⁻²⁰ ≈ 1e-6 is
// about where an fp32 matrix's own rounding puts them.
inline constexpr double kAutoNullSpace = 0x1p-20;

// The figures a decision reads, of one rows×cols matrix.
struct AutoFigures {
  double frobenius_norm = 0;
  // Singular values above the null space (kAutoNullSpace·‖X‖F), descending.
  std::vector<double> singular_values;
  // Seed 000's smallest r_i = (XXᵀ)_ii / ((1/(m−1))·Σ_{j≠i}|(XXᵀ)_ij|) over the nonzero rows
  // (+inf for one row); computed only when asked for.
  double dominance_min = 0;
  // cos(rownormalize(X), polar(X)) with polar(X) = U·Wᵀ over the singular values above;
  // computed only when asked for.
  double cosine = 0;
};

// The figures of a host fp32 matrix (row-major). `direction` asks for the dominance and the
// cosine. In fp64: the Gram matrix of the smaller side and its eigen-decomposition (LAPACK
// dsyevd); V·Vᵀ in fp32 row blocks when V is tall, as the analyzer forms it. FailedPrecondition
// when X is zero (it has no direction to decide on); Internal when LAPACK fails.
absl::StatusOr<AutoFigures> MeasureAutoFigures(absl::Span<const float> x, int64_t rows,
                                               int64_t cols, bool direction);

// Share of `figures.singular_values` that `steps` Newton–Schulz steps under `config` leave below
// 0.6 (NewtonSchulzSingularValueMap, with the step count replaced); 0 for an empty spectrum.
double SmallSingularValueShare(const NewtonSchulzConfig& config, int64_t rows, int64_t cols,
                               const AutoFigures& figures, int steps);

// The next step count from the current one, given share(k) for k in [min_steps, max_steps]: the
// rule of AutoConfig.steps.
int ChooseNewtonSchulzSteps(const AutoConfig& config, int current,
                            const std::function<double(int steps)>& share);

// Whether the next steps row-normalize, given whether the current ones do: the rule of
// AutoConfig.direction.
bool ChooseRowNormalize(const AutoConfig& config, bool current, double dominance_min,
                        double cosine);

// One matrix's choice: its Newton–Schulz step count and whether it row-normalizes instead.
struct MatrixChoice {
  int steps = 0;
  bool row_normalize = false;
  friend bool operator==(const MatrixChoice&, const MatrixChoice&) = default;
};

// A decision on one matrix, and the figures it read (the share at the chosen step count).
struct MatrixDecision {
  MatrixChoice choice;
  double small_sv_share = 0;
  double dominance_min = 0;
  double cosine = 0;
};

// Whether DecideMatrix decides on a rows×cols matrix under `config` (AutoConfig.max_dim).
bool DecidesOn(const AutoConfig& config, int64_t rows, int64_t cols);

// The choice for a host fp32 rows×cols matrix whose current choice is `current`, under the auto
// settings `config` and the Newton–Schulz settings `newton_schulz`. Errors as MeasureAutoFigures;
// FailedPrecondition for a matrix DecidesOn refuses.
absl::StatusOr<MatrixDecision> DecideMatrix(absl::Span<const float> x, int64_t rows, int64_t cols,
                                            const AutoConfig& config,
                                            const NewtonSchulzConfig& newton_schulz,
                                            MatrixChoice current);

}  // namespace optd

#endif  // OPTD_KERNELS_AUTO_CHOICE_H_
