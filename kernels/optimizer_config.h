// An optimizer's settings as the stages of ../shared/DESIGN.md ("The optimizer, as stages"), the
// named presets that reproduce public implementations (../shared/REFERENCES.md), and the
// key=value overrides users apply on top of a preset.
#ifndef OPTD_KERNELS_OPTIMIZER_CONFIG_H_
#define OPTD_KERNELS_OPTIMIZER_CONFIG_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/auto_choice.h"
#include "kernels/backend.h"
#include "kernels/formulas.h"
#include "kernels/newton_schulz.h"

namespace optd {

enum class Algorithm { kMatrix, kAdamW };
enum class PreNormalize { kNone, kRow, kCol, kRowCol };
enum class Direction { kNewtonSchulz, kRowNormalize, kExactPolar };
enum class PostNormalize { kNone, kNorMuon };
// kKeller √max(1, r/c) · kMatchRms rms·√max(r, c) · kSpectral √(r/c) (fan_out/fan_in) ·
// kUnitRms: each matrix rescaled to RMS `rms` (the NorMuon paper's 0.2·√(mn)/‖Ô‖F).
enum class ScaleRule { kNone, kKeller, kMatchRms, kSpectral, kUnitRms };

// NorMuon's post-normalization settings (seed 002).
struct NorMuonConfig {
  double beta2 = 0.95;
  float eps = 1e-10f;
  bool preserve_frobenius = true;  // o <- o·‖o_before‖/(‖o_after‖ + eps)
};

// Hyperparameters are fp64, as the reference codes hold them in Python: derived scalars such as
// 1 − μ and 1 − lr·λ are formed in fp64 and only then narrowed for the kernels.
struct MatrixConfig {
  double momentum = 0.95;
  formulas::MomentumKind momentum_kind = formulas::MomentumKind::kEma;
  bool nesterov = true;

  PreNormalize pre_normalize = PreNormalize::kNone;
  float pre_normalize_eps = 1e-8f;
  float pre_normalize_exponent = -0.5f;
  float pre_normalize_clip = 0.0f;  // 0: none
  // MuonEq's phase switch: rowcol becomes row from this (1-based) step on; 0: never.
  int64_t rowcol_to_row_at_step = 0;

  Direction direction = Direction::kNewtonSchulz;
  NewtonSchulzConfig newton_schulz;
  // ns.steps=auto and direction=auto: per-matrix choices the step makes (kernels/auto_choice.h).
  // With direction=auto, `direction` is kNewtonSchulz and a matrix the rule picks row-normalizes.
  AutoConfig auto_modes;
  float row_normalize_eps = 1e-12f;

  PostNormalize post_normalize = PostNormalize::kNone;
  NorMuonConfig normuon;

  ScaleRule scale = ScaleRule::kKeller;
  double scale_rms = 0.2;
  // Where the scale multiplies: into the learning rate, p -= (lr·scale)·o with lr·scale formed in
  // fp64 (Moonlight, torch, MuonEq, dion), or into the update, p -= lr·(scale·o) (Keller, NorMuon,
  // RMNP).
  bool scale_in_lr = false;
  // Keller's quirk: a 4-D (conv) weight is flattened for Newton–Schulz but its scale reads the
  // tensor's last two dimensions (kh/kw).
  bool scale_from_last_two_dims = false;
  // The scaled step is rounded to this dtype before it is applied (RMNP and Keller apply a bf16
  // update).
  DType step_dtype = DType::kF32;
};

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.999;
  float eps = 1e-8f;
  formulas::AdamEpsilon eps_placement = formulas::AdamEpsilon::kTorch;
};

struct OptimizerConfig {
  std::string preset;  // the preset this started from
  Algorithm algorithm = Algorithm::kMatrix;
  double lr = 0.02;
  double weight_decay = 0.0;
  MatrixConfig matrix;
  AdamWConfig adamw;
};

// keller, moonlight, torch, dion, normuon, normuon_paper, rmnp, muoneq_row, muoneq_col,
// muoneq_rowcol, adamw.
const std::vector<absl::string_view>& PresetNames();
absl::StatusOr<OptimizerConfig> PresetConfig(absl::string_view name);

// Sets one stage setting, e.g. ("lr", "0.01"), ("ns.dtype", "fp32"), ("pre_normalize", "row").
// `precision` sets both ns.dtype and step_dtype. InvalidArgument names an unknown key or a bad
// value; the config is unchanged then.
absl::Status ApplyOverride(OptimizerConfig& config, absl::string_view key, absl::string_view value);
// "preset[,key=value...]", e.g. "keller,ns.dtype=fp32,lr=0.01".
absl::StatusOr<OptimizerConfig> ParseOptimizerConfig(absl::string_view spec);
// Every override key, for help texts.
const std::vector<absl::string_view>& OverrideKeys();

absl::Status ValidateOptimizerConfig(const OptimizerConfig& config);

// The scale factor of the kKeller, kMatchRms and kSpectral rules for an r×c matrix (1 for kNone
// and kUnitRms, which rescales per matrix instead).
double ScaleFactor(const MatrixConfig& config, int64_t rows, int64_t cols);

// Learning rates above this are rejected: lr, lr·scale and AdamW's step size stay finite in fp32.
inline constexpr double kMaxLearningRate = 1e6;

}  // namespace optd

#endif  // OPTD_KERNELS_OPTIMIZER_CONFIG_H_
