#include "kernels/optimizer_config.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"

namespace optd {
namespace {

using formulas::AdamEpsilon;
using formulas::MomentumKind;
using formulas::NormEpsilon;

// Newton–Schulz as the public codes run it: Keller's coefficients in bf16, X/(‖X‖F + 1e-7).
NewtonSchulzConfig KellerNewtonSchulz() { return NewtonSchulzConfig{}; }

OptimizerConfig MatrixPreset(absl::string_view name, double lr, double weight_decay) {
  OptimizerConfig config;
  config.preset = std::string(name);
  config.lr = lr;
  config.weight_decay = weight_decay;
  return config;
}

// Each preset follows ../shared/REFERENCES.md, which was read from the projects' own code.
absl::StatusOr<OptimizerConfig> BuildPreset(absl::string_view name) {
  if (name == "keller") {  // KellerJordan/Muon muon.py
    OptimizerConfig c = MatrixPreset(name, 0.02, 0.0);
    c.matrix.momentum_kind = MomentumKind::kEma;
    c.matrix.newton_schulz = KellerNewtonSchulz();
    c.matrix.scale = ScaleRule::kKeller;
    c.matrix.scale_from_last_two_dims = true;
    c.matrix.step_dtype = DType::kBF16;  // `update *= scale` happens on the bf16 update
    return c;
  }
  if (name == "moonlight") {  // MoonshotAI/Moonlight examples/toy_train.py
    OptimizerConfig c = MatrixPreset(name, 1e-3, 0.1);
    c.matrix.momentum_kind = MomentumKind::kSum;
    c.matrix.scale = ScaleRule::kMatchRms;
    c.matrix.scale_in_lr = true;  // adjusted_lr = lr·0.2·√max(A, B)
    c.adamw = {0.9, 0.95, 1e-8f, AdamEpsilon::kMoonlight};
    return c;
  }
  if (name == "torch") {  // torch.optim.Muon (torch >= 2.9)
    OptimizerConfig c = MatrixPreset(name, 1e-3, 0.1);
    c.matrix.momentum_kind = MomentumKind::kEma;
    c.matrix.newton_schulz.eps_mode = NormEpsilon::kFloor;
    c.matrix.scale = ScaleRule::kKeller;
    c.matrix.scale_in_lr = true;  // adjusted_lr = lr·scale
    return c;
  }
  if (name == "dion") {  // microsoft/dion dion/muon.py
    OptimizerConfig c = MatrixPreset(name, 0.01, 0.01);
    c.matrix.momentum_kind = MomentumKind::kSum;
    c.matrix.nesterov = false;
    c.matrix.newton_schulz.coefficient_set = "polar_express";
    c.matrix.newton_schulz.safety = 1.02f;
    c.matrix.newton_schulz.eps = 1e-8f;
    c.matrix.scale = ScaleRule::kSpectral;
    c.matrix.scale_in_lr = true;  // adjusted_lr = lr·√(fan_out/fan_in)
    return c;
  }
  if (name == "normuon") {  // zichongli5/NorMuon normuon.py
    OptimizerConfig c = MatrixPreset(name, 0.02, 0.0);
    c.matrix.momentum_kind = MomentumKind::kEma;
    c.matrix.post_normalize = PostNormalize::kNorMuon;
    c.matrix.normuon = {0.95, 1e-10f, true};
    c.matrix.scale = ScaleRule::kKeller;
    c.matrix.scale_from_last_two_dims = true;
    return c;
  }
  if (name == "normuon_paper") {  // NorMuon paper (seed 002), Algorithm 1
    OptimizerConfig c = MatrixPreset(name, 0.02, 0.0);
    c.matrix.momentum_kind = MomentumKind::kEma;
    c.matrix.nesterov = false;
    c.matrix.post_normalize = PostNormalize::kNorMuon;
    c.matrix.normuon = {0.95, 1e-8f, false};
    c.matrix.scale = ScaleRule::kUnitRms;
    c.matrix.scale_rms = 0.2;
    return c;
  }
  if (name == "rmnp") {  // Dominator-Index/RMNP rmnp/rmnp.py
    OptimizerConfig c = MatrixPreset(name, 0.02, 0.0);
    c.matrix.momentum_kind = MomentumKind::kSum;
    c.matrix.direction = Direction::kRowNormalize;
    c.matrix.row_normalize_eps = 1e-12f;
    c.matrix.scale = ScaleRule::kKeller;
    c.matrix.step_dtype = DType::kBF16;  // updates are stored in a bf16 buffer before applying
    return c;
  }
  if (name == "muoneq_row" || name == "muoneq_col" || name == "muoneq_rowcol") {
    // MaeChd/muon-eq muoneq.py
    OptimizerConfig c = MatrixPreset(name, 1e-3, 0.1);
    c.matrix.momentum_kind = MomentumKind::kSum;
    c.matrix.pre_normalize = name == "muoneq_row"   ? PreNormalize::kRow
                             : name == "muoneq_col" ? PreNormalize::kCol
                                                    : PreNormalize::kRowCol;
    c.matrix.scale = ScaleRule::kMatchRms;
    c.matrix.scale_in_lr = true;  // adjusted_lr = lr·0.2·√max(A, B)
    c.adamw = {0.95, 0.95, 1e-8f, AdamEpsilon::kMoonlight};
    return c;
  }
  if (name == "adamw") {  // torch.optim.AdamW defaults
    OptimizerConfig c;
    c.preset = "adamw";
    c.algorithm = Algorithm::kAdamW;
    c.lr = 1e-3;
    c.weight_decay = 0.01;
    return c;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown optimizer preset '", name,
                                                 "'; expected one of ",
                                                 absl::StrJoin(PresetNames(), ", ")));
}

absl::StatusOr<float> ParseFloat(absl::string_view key, absl::string_view value) {
  float v;
  if (!absl::SimpleAtof(value, &v) || !std::isfinite(v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("override ", key, ": '", value, "' is not a finite number"));
  }
  return v;
}

absl::StatusOr<double> ParseDouble(absl::string_view key, absl::string_view value) {
  double v;
  if (!absl::SimpleAtod(value, &v) || !std::isfinite(v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("override ", key, ": '", value, "' is not a finite number"));
  }
  return v;
}

absl::StatusOr<int64_t> ParseInt(absl::string_view key, absl::string_view value) {
  int64_t v;
  if (!absl::SimpleAtoi(value, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("override ", key, ": '", value, "' is not an integer"));
  }
  return v;
}

absl::StatusOr<bool> ParseBool(absl::string_view key, absl::string_view value) {
  bool v;
  if (!absl::SimpleAtob(value, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("override ", key, ": '", value, "' is not true or false"));
  }
  return v;
}

template <typename E>
absl::StatusOr<E> ParseEnum(absl::string_view key, absl::string_view value,
                            const std::vector<std::pair<absl::string_view, E>>& names) {
  for (const auto& [name, e] : names) {
    if (name == value) return e;
  }
  std::vector<absl::string_view> options;
  for (const auto& [name, e] : names) options.push_back(name);
  return absl::InvalidArgumentError(absl::StrCat("override ", key, ": '", value, "' is not one of ",
                                                 absl::StrJoin(options, ", ")));
}

// "a:b:c/a:b:c/..." -> coefficient list.
absl::StatusOr<std::vector<NewtonSchulzCoefficients>> ParseCoefficientList(
    absl::string_view key, absl::string_view value) {
  std::vector<NewtonSchulzCoefficients> list;
  for (absl::string_view triple : absl::StrSplit(value, '/')) {
    std::vector<absl::string_view> parts = absl::StrSplit(triple, ':');
    if (parts.size() != 3) {
      return absl::InvalidArgumentError(
          absl::StrCat("override ", key, ": '", triple, "' is not a coefficient triple a:b:c"));
    }
    NewtonSchulzCoefficients abc;
    for (int i = 0; i < 3; ++i) {
      if (!absl::SimpleAtod(parts[i], &abc[i]) || !std::isfinite(abc[i])) {
        return absl::InvalidArgumentError(
            absl::StrCat("override ", key, ": '", parts[i], "' is not a finite number"));
      }
    }
    list.push_back(abc);
  }
  return list;
}

using Setter =
    std::function<absl::Status(OptimizerConfig&, absl::string_view key, absl::string_view value)>;

template <typename T, typename Parse>
Setter Field(Parse parse, std::function<T&(OptimizerConfig&)> field) {
  return [parse, field](OptimizerConfig& c, absl::string_view key, absl::string_view value) {
    absl::StatusOr<T> v = parse(key, value);
    if (!v.ok()) return v.status();
    field(c) = *v;
    return absl::OkStatus();
  };
}

Setter FloatField(std::function<float&(OptimizerConfig&)> f) { return Field<float>(ParseFloat, f); }
Setter DoubleField(std::function<double&(OptimizerConfig&)> f) {
  return Field<double>(ParseDouble, f);
}
// An int setting; values beyond int's range are refused rather than cut.
Setter IntField(std::function<int&(OptimizerConfig&)> f) {
  return Field<int>(
      [](absl::string_view key, absl::string_view value) -> absl::StatusOr<int> {
        OPTD_ASSIGN_OR_RETURN(int64_t v, ParseInt(key, value));
        if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max()) {
          return absl::InvalidArgumentError(
              absl::StrCat("override ", key, ": ", v, " is out of range"));
        }
        return static_cast<int>(v);
      },
      f);
}
Setter BoolField(std::function<bool&(OptimizerConfig&)> f) { return Field<bool>(ParseBool, f); }

template <typename E>
Setter EnumField(std::vector<std::pair<absl::string_view, E>> names,
                 std::function<E&(OptimizerConfig&)> f) {
  return Field<E>(
      [names](absl::string_view k, absl::string_view v) { return ParseEnum(k, v, names); }, f);
}

Setter DTypeField(std::function<DType&(OptimizerConfig&)> f) {
  return Field<DType>([](absl::string_view, absl::string_view v) { return ParseDType(v); }, f);
}

const std::map<absl::string_view, Setter>& Setters() {
  static const auto* setters = new std::map<absl::string_view, Setter>{
      {"lr", DoubleField([](auto& c) -> auto& { return c.lr; })},
      {"weight_decay", DoubleField([](auto& c) -> auto& { return c.weight_decay; })},
      {"momentum", DoubleField([](auto& c) -> auto& { return c.matrix.momentum; })},
      {"momentum.kind", EnumField<MomentumKind>(
                            {{"ema", MomentumKind::kEma}, {"sum", MomentumKind::kSum}},
                            [](auto& c) -> auto& { return c.matrix.momentum_kind; })},
      {"nesterov", BoolField([](auto& c) -> auto& { return c.matrix.nesterov; })},
      {"pre_normalize", EnumField<PreNormalize>(
                            {{"none", PreNormalize::kNone},
                             {"row", PreNormalize::kRow},
                             {"col", PreNormalize::kCol},
                             {"rowcol", PreNormalize::kRowCol}},
                            [](auto& c) -> auto& { return c.matrix.pre_normalize; })},
      {"pre_normalize.eps",
       FloatField([](auto& c) -> auto& { return c.matrix.pre_normalize_eps; })},
      {"pre_normalize.exponent",
       FloatField([](auto& c) -> auto& { return c.matrix.pre_normalize_exponent; })},
      {"pre_normalize.clip",
       FloatField([](auto& c) -> auto& { return c.matrix.pre_normalize_clip; })},
      {"pre_normalize.row_at_step",
       Field<int64_t>(
           ParseInt, [](auto& c) -> auto& { return c.matrix.rowcol_to_row_at_step; })},
      // newton_schulz, row_normalize, polar, or auto (Newton–Schulz or row normalization, chosen
      // per matrix: AutoConfig.direction).
      {"direction",
       [](OptimizerConfig& c, absl::string_view key, absl::string_view value) -> absl::Status {
         if (value == "auto") {
           c.matrix.direction = Direction::kNewtonSchulz;
           c.matrix.auto_modes.direction = true;
           return absl::OkStatus();
         }
         OPTD_ASSIGN_OR_RETURN(c.matrix.direction,
                               ParseEnum<Direction>(key, value,
                                                    {{"newton_schulz", Direction::kNewtonSchulz},
                                                     {"row_normalize", Direction::kRowNormalize},
                                                     {"polar", Direction::kExactPolar},
                                                     {"auto", Direction::kNewtonSchulz}}));
         c.matrix.auto_modes.direction = false;
         return absl::OkStatus();
       }},
      {"auto.min_dominance",
       DoubleField([](auto& c) -> auto& { return c.matrix.auto_modes.min_dominance; })},
      {"auto.min_cosine",
       DoubleField([](auto& c) -> auto& { return c.matrix.auto_modes.min_cosine; })},
      {"auto.hysteresis",
       DoubleField([](auto& c) -> auto& { return c.matrix.auto_modes.hysteresis; })},
      {"auto.max_dim", Field<int64_t>(
                           ParseInt, [](auto& c) -> auto& { return c.matrix.auto_modes.max_dim; })},
      {"auto.interval",
       Field<int64_t>(
           ParseInt, [](auto& c) -> auto& { return c.matrix.auto_modes.interval; })},
      {"ns.coefficients",
       [](OptimizerConfig& c, absl::string_view key, absl::string_view value) -> absl::Status {
         if (value.find(':') == absl::string_view::npos) {
           OPTD_RETURN_IF_ERROR(NewtonSchulzCoefficientSet(value).status());
           c.matrix.newton_schulz.coefficient_set = std::string(value);
           c.matrix.newton_schulz.custom.clear();
           return absl::OkStatus();
         }
         OPTD_ASSIGN_OR_RETURN(auto list, ParseCoefficientList(key, value));
         c.matrix.newton_schulz.coefficient_set = "custom";
         c.matrix.newton_schulz.custom = std::move(list);
         return absl::OkStatus();
       }},
      // A count, or auto (AutoConfig.steps; the count, clamped to the bounds, is the first).
      {"ns.steps",
       [](OptimizerConfig& c, absl::string_view key, absl::string_view value) -> absl::Status {
         if (value == "auto") {
           c.matrix.auto_modes.steps = true;
           return absl::OkStatus();
         }
         OPTD_ASSIGN_OR_RETURN(int64_t steps, ParseInt(key, value));
         if (steps < 1 || steps > kMaxNewtonSchulzSteps) {
           return absl::InvalidArgumentError(absl::StrCat(
               "override ns.steps: ", steps, " is outside [1, ", kMaxNewtonSchulzSteps, "]"));
         }
         c.matrix.newton_schulz.steps = static_cast<int>(steps);
         c.matrix.auto_modes.steps = false;
         return absl::OkStatus();
       }},
      {"ns.min_steps", IntField([](auto& c) -> auto& { return c.matrix.auto_modes.min_steps; })},
      {"ns.max_steps", IntField([](auto& c) -> auto& { return c.matrix.auto_modes.max_steps; })},
      {"ns.max_step_change",
       IntField([](auto& c) -> auto& { return c.matrix.auto_modes.max_step_change; })},
      {"ns.small_sv_target",
       DoubleField([](auto& c) -> auto& { return c.matrix.auto_modes.small_sv_target; })},
      {"ns.grow_with_dimension", BoolField([](auto& c) -> auto& {
         return c.matrix.newton_schulz.steps_grow_with_dimension;
       })},
      {"ns.reference_dimension",
       Field<int64_t>(
           ParseInt, [](auto& c) -> auto& { return c.matrix.newton_schulz.reference_dimension; })},
      {"ns.dtype",
       DTypeField([](auto& c) -> auto& { return c.matrix.newton_schulz.compute_dtype; })},
      {"ns.eps", FloatField([](auto& c) -> auto& { return c.matrix.newton_schulz.eps; })},
      {"ns.safety", FloatField([](auto& c) -> auto& { return c.matrix.newton_schulz.safety; })},
      {"ns.eps_mode", EnumField<NormEpsilon>(
                          {{"add", NormEpsilon::kAdd}, {"floor", NormEpsilon::kFloor}},
                          [](auto& c) -> auto& { return c.matrix.newton_schulz.eps_mode; })},
      {"ns.transpose",
       BoolField([](auto& c) -> auto& { return c.matrix.newton_schulz.transpose_tall; })},
      {"ns.method", EnumField<NewtonSchulzMethod>(
                        {{"standard", NewtonSchulzMethod::kStandard},
                         {"gram", NewtonSchulzMethod::kGram},
                         {"auto", NewtonSchulzMethod::kAuto}},
                        [](auto& c) -> auto& { return c.matrix.newton_schulz.method; })},
      // Iteration indices separated by ':' ("2", "2:4"), "none", or "default".
      {"ns.gram_restarts",
       [](OptimizerConfig& c, absl::string_view key, absl::string_view value) -> absl::Status {
         if (value == "default") {
           c.matrix.newton_schulz.gram_restarts.reset();
           return absl::OkStatus();
         }
         std::vector<int> restarts;
         if (value != "none") {
           for (absl::string_view part : absl::StrSplit(value, ':')) {
             OPTD_ASSIGN_OR_RETURN(int64_t step, ParseInt(key, part));
             if (step < 1 || step >= kMaxNewtonSchulzSteps) {
               return absl::InvalidArgumentError(absl::StrCat("override ", key, ": ", step,
                                                              " is outside [1, ",
                                                              kMaxNewtonSchulzSteps - 1, "]"));
             }
             if (!restarts.empty() && step <= restarts.back()) {
               return absl::InvalidArgumentError(
                   absl::StrCat("override ", key, ": '", value, "' is not in increasing order"));
             }
             restarts.push_back(static_cast<int>(step));
           }
         }
         c.matrix.newton_schulz.gram_restarts = std::move(restarts);
         return absl::OkStatus();
       }},
      {"row_normalize.eps",
       FloatField([](auto& c) -> auto& { return c.matrix.row_normalize_eps; })},
      {"post_normalize", EnumField<PostNormalize>(
                             {{"none", PostNormalize::kNone}, {"normuon", PostNormalize::kNorMuon}},
                             [](auto& c) -> auto& { return c.matrix.post_normalize; })},
      {"normuon.beta2", DoubleField([](auto& c) -> auto& { return c.matrix.normuon.beta2; })},
      {"normuon.eps", FloatField([](auto& c) -> auto& { return c.matrix.normuon.eps; })},
      {"normuon.preserve_norm",
       BoolField([](auto& c) -> auto& { return c.matrix.normuon.preserve_frobenius; })},
      {"scale", EnumField<ScaleRule>(
                    {{"none", ScaleRule::kNone},
                     {"keller", ScaleRule::kKeller},
                     {"match_rms", ScaleRule::kMatchRms},
                     {"spectral", ScaleRule::kSpectral},
                     {"unit_rms", ScaleRule::kUnitRms}},
                    [](auto& c) -> auto& { return c.matrix.scale; })},
      {"scale.rms", DoubleField([](auto& c) -> auto& { return c.matrix.scale_rms; })},
      {"scale.in_lr", BoolField([](auto& c) -> auto& { return c.matrix.scale_in_lr; })},
      {"scale.last_two_dims",
       BoolField([](auto& c) -> auto& { return c.matrix.scale_from_last_two_dims; })},
      {"step_dtype", DTypeField([](auto& c) -> auto& { return c.matrix.step_dtype; })},
      {"precision",
       [](OptimizerConfig& c, absl::string_view, absl::string_view value) -> absl::Status {
         OPTD_ASSIGN_OR_RETURN(DType dtype, ParseDType(value));
         c.matrix.newton_schulz.compute_dtype = dtype;
         c.matrix.step_dtype = dtype;
         return absl::OkStatus();
       }},
      {"adamw.beta1", DoubleField([](auto& c) -> auto& { return c.adamw.beta1; })},
      {"adamw.beta2", DoubleField([](auto& c) -> auto& { return c.adamw.beta2; })},
      {"adamw.eps", FloatField([](auto& c) -> auto& { return c.adamw.eps; })},
      {"adamw.eps_placement",
       EnumField<AdamEpsilon>(
           {{"torch", AdamEpsilon::kTorch}, {"moonlight", AdamEpsilon::kMoonlight}},
           [](auto& c) -> auto& { return c.adamw.eps_placement; })},
  };
  return *setters;
}

}  // namespace

const std::vector<absl::string_view>& PresetNames() {
  static const auto* names = new std::vector<absl::string_view>{
      "keller", "moonlight",  "torch",      "dion",          "normuon", "normuon_paper",
      "rmnp",   "muoneq_row", "muoneq_col", "muoneq_rowcol", "adamw"};
  return *names;
}

absl::StatusOr<OptimizerConfig> PresetConfig(absl::string_view name) { return BuildPreset(name); }

const std::vector<absl::string_view>& OverrideKeys() {
  static const auto* keys = [] {
    auto* k = new std::vector<absl::string_view>();
    for (const auto& [key, setter] : Setters()) k->push_back(key);
    return k;
  }();
  return *keys;
}

absl::Status ApplyOverride(OptimizerConfig& config, absl::string_view key,
                           absl::string_view value) {
  const auto it = Setters().find(key);
  if (it == Setters().end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown optimizer setting '", key,
                     "'; known settings: ", absl::StrJoin(OverrideKeys(), ", ")));
  }
  OptimizerConfig candidate = config;
  OPTD_RETURN_IF_ERROR(it->second(candidate, key, value));
  config = std::move(candidate);
  return absl::OkStatus();
}

absl::StatusOr<OptimizerConfig> ParseOptimizerConfig(absl::string_view spec) {
  std::vector<absl::string_view> parts = absl::StrSplit(spec, ',');
  OPTD_ASSIGN_OR_RETURN(OptimizerConfig config, PresetConfig(parts[0]));
  for (size_t i = 1; i < parts.size(); ++i) {
    const size_t eq = parts[i].find('=');
    if (eq == absl::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("optimizer setting '", parts[i], "' is not key=value"));
    }
    OPTD_RETURN_IF_ERROR(ApplyOverride(config, parts[i].substr(0, eq), parts[i].substr(eq + 1)));
  }
  OPTD_RETURN_IF_ERROR(ValidateOptimizerConfig(config));
  return config;
}

absl::Status ValidateOptimizerConfig(const OptimizerConfig& c) {
  auto check = [](bool ok, absl::string_view what) {
    return ok ? absl::OkStatus() : absl::InvalidArgumentError(what);
  };
  OPTD_RETURN_IF_ERROR(check(c.lr >= 0.0 && c.lr <= kMaxLearningRate, "lr must be in [0, 1e6]"));
  OPTD_RETURN_IF_ERROR(check(c.weight_decay >= 0.0, "weight_decay must be >= 0"));
  // Decoupled decay multiplies w by 1 − lr·λ: beyond 1 it flips signs and grows without bound.
  OPTD_RETURN_IF_ERROR(check(c.lr * c.weight_decay <= 1.0, "lr * weight_decay must be <= 1"));
  if (c.algorithm == Algorithm::kAdamW) {
    OPTD_RETURN_IF_ERROR(
        check(c.adamw.beta1 >= 0.0f && c.adamw.beta1 < 1.0f, "adamw.beta1 must be in [0, 1)"));
    OPTD_RETURN_IF_ERROR(
        check(c.adamw.beta2 >= 0.0f && c.adamw.beta2 < 1.0f, "adamw.beta2 must be in [0, 1)"));
    // eps >= 1e-30 keeps m/(√v + eps) finite when v underflows to zero.
    return check(c.adamw.eps >= 1e-30f, "adamw.eps must be >= 1e-30");
  }
  const MatrixConfig& m = c.matrix;
  OPTD_RETURN_IF_ERROR(
      check(m.momentum >= 0.0f && m.momentum < 1.0f, "momentum must be in [0, 1)"));
  // eps > 0 keeps a zero row or column at zero instead of 0·inf.
  OPTD_RETURN_IF_ERROR(check(m.pre_normalize_eps > 0.0f, "pre_normalize.eps must be > 0"));
  // MuonEq's two exponents; others can overflow fp32 on small rows (0·inf).
  OPTD_RETURN_IF_ERROR(
      check(m.pre_normalize_exponent == -0.5f || m.pre_normalize_exponent == -0.25f,
            "pre_normalize.exponent must be -0.5 or -0.25"));
  OPTD_RETURN_IF_ERROR(check(m.pre_normalize_clip == 0.0f || m.pre_normalize_clip >= 1.0f,
                             "pre_normalize.clip must be 0 (off) or >= 1"));
  OPTD_RETURN_IF_ERROR(
      check(m.rowcol_to_row_at_step >= 0, "pre_normalize.row_at_step must be >= 0"));
  OPTD_RETURN_IF_ERROR(check(m.row_normalize_eps > 0.0f, "row_normalize.eps must be > 0"));
  OPTD_RETURN_IF_ERROR(
      check(m.normuon.beta2 >= 0.0f && m.normuon.beta2 < 1.0f, "normuon.beta2 must be in [0, 1)"));
  // eps >= 1e-30 keeps 1/(√v + eps) finite for a zero row.
  OPTD_RETURN_IF_ERROR(check(m.normuon.eps >= 1e-30f, "normuon.eps must be >= 1e-30"));
  OPTD_RETURN_IF_ERROR(
      check(m.scale_rms > 0.0 && m.scale_rms <= 1e3, "scale.rms must be in (0, 1e3]"));
  OPTD_RETURN_IF_ERROR(check(m.step_dtype != DType::kF64, "step_dtype must be fp32, bf16 or fp16"));
  OPTD_RETURN_IF_ERROR(ValidateNewtonSchulzConfig(m.newton_schulz));
  OPTD_RETURN_IF_ERROR(ValidateAutoConfig(m.auto_modes));
  if (m.auto_modes.any()) {
    OPTD_RETURN_IF_ERROR(
        check(m.direction == Direction::kNewtonSchulz,
              "ns.steps=auto and direction=auto need the Newton–Schulz direction"));
    OPTD_RETURN_IF_ERROR(check(!m.newton_schulz.steps_grow_with_dimension,
                               "ns.grow_with_dimension and the auto modes both set the step count; "
                               "choose one"));
  }
  return absl::OkStatus();
}

double ScaleFactor(const MatrixConfig& config, int64_t rows, int64_t cols) {
  const double r = static_cast<double>(rows), c = static_cast<double>(cols);
  switch (config.scale) {
    case ScaleRule::kKeller:
      return std::sqrt(std::max(1.0, r / c));
    case ScaleRule::kMatchRms:
      return config.scale_rms * std::sqrt(std::max(r, c));
    case ScaleRule::kSpectral:
      return std::sqrt(r / c);
    case ScaleRule::kNone:
    case ScaleRule::kUnitRms:
      return 1.0;
  }
  return 1.0;
}

}  // namespace optd
