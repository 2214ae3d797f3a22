#include "kernels/optimizer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "kernels/newton_schulz.h"
#include "kernels/polar.h"

namespace optd {

struct Optimizer::Tensor {
  TensorSpec spec;
  MatrixView view;  // matrix optimizers only
  int64_t count = 0;
  int64_t steps = 0;
  Buffer parameters;
  Buffer gradient;
  Buffer momentum;       // matrix: momentum; adamw: first moment
  Buffer second_moment;  // normuon: per-row v; adamw: second moment
  int64_t second_count = 0;
  float* capture = nullptr;  // CaptureUpdate's destination for the next Step
  int adamw_slot = -1;       // AdamW: its scalars' index in step_scalars_' AdamW region
  int rate_slot = -1;        // matrix: its first RateScalars' index in the rate region
  int group = -1;            // matrix: its index in groups_
  // PrepareTensor's: a second set of the parameters and state, allocated on first use; holds the
  // prepared step's values while `prepared`, and the replaced ones after CommitPrepared.
  Buffer shadow_parameters, shadow_momentum, shadow_second_moment;
  bool prepared = false;
  // The auto modes' choices (matrix tensors with an auto mode only), and those a step decided,
  // which become current when that step commits.
  bool has_auto = false;
  AutoChoices choices;
  std::optional<AutoChoices> pending_choices;

  // The step that decided pending_choices commits: they become current.
  void CommitChoices() {
    if (!pending_choices.has_value()) return;
    choices = *std::move(pending_choices);
    pending_choices.reset();
  }

  void SwapWithShadows() {
    std::swap(parameters, shadow_parameters);
    std::swap(momentum, shadow_momentum);
    std::swap(second_moment, shadow_second_moment);
  }
};

// Tensors whose direction runs as one batch: same matrix shape, same direction settings.
struct Optimizer::Group {
  std::vector<int> members;
  int64_t rows = 0, cols = 0;
  // RMNP's stages fused in one pass per row (Backend::RmnpStep), run per member.
  bool fused_rmnp = false;
};

namespace {

bool SameDirection(const MatrixConfig& a, const MatrixConfig& b) {
  const NewtonSchulzConfig& x = a.newton_schulz;
  const NewtonSchulzConfig& y = b.newton_schulz;
  return a.direction == b.direction && a.row_normalize_eps == b.row_normalize_eps &&
         x.coefficient_set == y.coefficient_set && x.custom == y.custom && x.steps == y.steps &&
         x.steps_grow_with_dimension == y.steps_grow_with_dimension &&
         x.reference_dimension == y.reference_dimension && x.compute_dtype == y.compute_dtype &&
         x.eps == y.eps && x.safety == y.safety && x.eps_mode == y.eps_mode &&
         x.transpose_tall == y.transpose_tall && x.method == y.method &&
         x.gram_restarts == y.gram_restarts && a.auto_modes == b.auto_modes;
}

bool FusesRmnp(const MatrixConfig& c) {
  return c.direction == Direction::kRowNormalize && c.pre_normalize == PreNormalize::kNone &&
         c.post_normalize == PostNormalize::kNone &&
         c.momentum_kind == formulas::MomentumKind::kSum && c.scale != ScaleRule::kUnitRms;
}

// 1 − lr·λ, formed in fp64 as the references' `p.mul_(1 - lr * wd)` forms it.
float DecayFactor(const OptimizerConfig& c) {
  return static_cast<float>(1.0 - c.lr * c.weight_decay);
}

// Floats of workspace a group of `batch` rows×cols matrices needs.
int64_t GroupWorkspaceFloats(const MatrixConfig& c, int64_t batch, int64_t rows, int64_t cols) {
  int64_t direction = 0;
  if (c.direction == Direction::kNewtonSchulz) {
    direction = NewtonSchulzWorkspaceFloats(c.newton_schulz, batch, rows, cols);
  } else if (c.direction == Direction::kExactPolar) {
    direction = ExactPolarScratchFloats(batch, rows, cols);
  }
  const int64_t pre = c.pre_normalize == PreNormalize::kNone ? 0 : batch * (rows + cols);
  return batch * rows * cols + std::max(direction, pre);
}

// The refusals Step and PrepareTensor share, with their messages.
absl::Status CheckLearningRateFor(const TensorSpec& spec, double lr) {
  OptimizerConfig c = spec.config;
  c.lr = lr;
  absl::Status valid = ValidateOptimizerConfig(c);
  if (valid.ok()) return valid;
  return absl::InvalidArgumentError(
      absl::StrCat("step lr ", lr, " for tensor '", spec.name, "': ", valid.message()));
}

absl::Status CheckGradientSize(const TensorSpec& spec, int64_t count, size_t got) {
  if (static_cast<int64_t>(got) == count) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("gradient for tensor '", spec.name, "' has ", got,
                                                 " elements, expected ", count));
}

absl::Status OutOfRangeGradient(const TensorSpec& spec, int64_t bad, int64_t count) {
  return absl::InvalidArgumentError(
      absl::StrCat("gradient for tensor '", spec.name, "' has ", bad, " of ", count,
                   " values that are NaN, infinite or beyond ±", kMaxGradientMagnitude));
}

absl::Status Poisoned() {
  return absl::FailedPreconditionError(
      "an earlier step failed inside the backend after it began changing state; restore the "
      "parameters and state from a checkpoint");
}

}  // namespace

absl::StatusOr<int64_t> ElementCount(absl::Span<const int64_t> shape) {
  int64_t count = 1;
  for (int64_t d : shape) {
    if (d <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("shape [", absl::StrJoin(shape, ", "), "] is empty (a dimension <= 0)"));
    }
    if (__builtin_mul_overflow(count, d, &count) || count > kMaxTensorElements) {
      return absl::InvalidArgumentError(absl::StrCat("shape [", absl::StrJoin(shape, ", "),
                                                     "] has more than ", kMaxTensorElements,
                                                     " elements"));
    }
  }
  return count;
}

absl::StatusOr<MatrixView> MatrixViewOf(absl::Span<const int64_t> shape, RankPolicy policy) {
  if (shape.size() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("a matrix optimizer needs rank >= 2, got rank ", shape.size()));
  }
  // Bounds every product below: rows·cols and batch·rows·cols are at most the element count.
  OPTD_RETURN_IF_ERROR(ElementCount(shape).status());
  MatrixView view;
  if (policy == RankPolicy::kFlatten) {
    view.rows = shape[0];
    view.cols = 1;
    for (size_t i = 1; i < shape.size(); ++i) view.cols *= shape[i];
  } else {
    view.rows = shape[shape.size() - 2];
    view.cols = shape.back();
    for (size_t i = 0; i + 2 < shape.size(); ++i) view.batch *= shape[i];
  }
  return view;
}

Optimizer::Optimizer(Backend* backend) : backend_(backend) {}
Optimizer::~Optimizer() {
  // Uploads may still be in flight into buffers about to be freed.
  if (queue_ != nullptr) backend_->Synchronize(*queue_).IgnoreError();
}
int Optimizer::num_groups() const { return static_cast<int>(groups_.size()); }

absl::Status Optimizer::Plan(std::vector<TensorSpec> specs) {
  std::set<std::string> names;
  for (TensorSpec& spec : specs) {
    if (spec.name.empty()) return absl::InvalidArgumentError("tensor name is empty");
    if (!names.insert(spec.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("tensor name '", spec.name, "' is repeated"));
    }
    absl::Status valid = ValidateOptimizerConfig(spec.config);
    if (!valid.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", spec.name, "': ", valid.message()));
    }
    auto t = std::make_unique<Tensor>();
    absl::StatusOr<int64_t> count = ElementCount(spec.shape);
    if (!count.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", spec.name, "': ", count.status().message()));
    }
    t->count = *count;
    const bool matrix = spec.config.algorithm == Algorithm::kMatrix;
    if (matrix) {
      absl::StatusOr<MatrixView> view = MatrixViewOf(spec.shape, spec.rank_policy);
      if (!view.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", spec.name, "' (preset ", spec.config.preset, "): ", view.status().message(),
            "; put vectors, embeddings and heads in an adamw group"));
      }
      t->view = *view;
    }
    if (matrix && spec.config.matrix.auto_modes.any()) {
      const AutoConfig& a = spec.config.matrix.auto_modes;
      t->has_auto = true;
      // With the steps rule off the step count is the config's own, whatever the bounds say.
      const int steps = spec.config.matrix.newton_schulz.steps;
      t->choices.matrices.assign(
          t->view.batch,
          MatrixChoice{a.steps ? std::clamp(steps, a.min_steps, a.max_steps) : steps, false});
    }
    if (!matrix) t->second_count = t->count;
    if (matrix && spec.config.matrix.post_normalize == PostNormalize::kNorMuon) {
      t->second_count = t->view.batch * t->view.rows;
    }
    t->spec = std::move(spec);
    tensors_.push_back(std::move(t));
  }

  num_adamw_ = 0;
  num_rates_ = 0;
  for (auto& t : tensors_) {
    if (t->spec.config.algorithm == Algorithm::kAdamW) {
      t->adamw_slot = num_adamw_++;
    } else {
      t->rate_slot = num_rates_;
      num_rates_ += kRatesPerTensor;
    }
  }

  // Group matrix tensors for batched directions.
  for (int i = 0; i < num_tensors(); ++i) {
    const Tensor& t = *tensors_[i];
    if (t.spec.config.algorithm != Algorithm::kMatrix) continue;
    const MatrixConfig& c = t.spec.config.matrix;
    Group* group = nullptr;
    if (!FusesRmnp(c)) {
      for (Group& g : groups_) {
        const MatrixConfig& first = tensors_[g.members[0]]->spec.config.matrix;
        if (!g.fused_rmnp && g.rows == t.view.rows && g.cols == t.view.cols &&
            SameDirection(first, c)) {
          group = &g;
          break;
        }
      }
    }
    if (group == nullptr) {
      groups_.push_back(Group{{}, t.view.rows, t.view.cols, FusesRmnp(c)});
      group = &groups_.back();
    }
    group->members.push_back(i);
    tensors_[i]->group = static_cast<int>(group - groups_.data());
  }
  for (const Group& g : groups_) {
    has_exact_polar_ |=
        tensors_[g.members[0]]->spec.config.matrix.direction == Direction::kExactPolar;
  }
  workspace_floats_ = 0;
  for (const Group& g : groups_) {
    if (g.fused_rmnp) continue;
    int64_t batch = 0;
    int64_t floats = 0;
    for (int i : g.members) batch += tensors_[i]->view.batch;
    for (int i : g.members) {
      floats = std::max(
          floats, GroupWorkspaceFloats(tensors_[i]->spec.config.matrix, batch, g.rows, g.cols));
    }
    workspace_floats_ = std::max(workspace_floats_, floats);
  }
  std::vector<std::string> ordered;
  for (const auto& t : tensors_) ordered.push_back(t->spec.name);
  index_ = std::make_unique<TensorIndex>(std::move(ordered));
  return absl::OkStatus();
}

int64_t Optimizer::allocated_bytes() const {
  int64_t floats = workspace_floats_;
  for (const auto& t : tensors_) floats += 3 * t->count + t->second_count;
  return floats * static_cast<int64_t>(sizeof(float)) + StepScalarBytes();
}

absl::StatusOr<int64_t> Optimizer::RequiredBytes(std::vector<TensorSpec> tensors) {
  Optimizer plan(nullptr);  // planning allocates nothing
  OPTD_RETURN_IF_ERROR(plan.Plan(std::move(tensors)));
  return plan.allocated_bytes();
}

absl::StatusOr<std::unique_ptr<Optimizer>> Optimizer::Create(Backend& backend,
                                                             std::vector<TensorSpec> specs) {
  std::unique_ptr<Optimizer> opt(new Optimizer(&backend));
  OPTD_RETURN_IF_ERROR(opt->Plan(std::move(specs)));
  // A queue of its own: steps of other optimizers on the backend neither wait for this one's nor
  // end up in its recorded steps.
  OPTD_ASSIGN_OR_RETURN(opt->queue_, backend.CreateQueue(QueuePriority::kNormal));
  Queue& queue = *opt->queue_;
  for (auto& t : opt->tensors_) {
    const size_t bytes = static_cast<size_t>(t->count) * sizeof(float);
    OPTD_ASSIGN_OR_RETURN(t->parameters, backend.Allocate(bytes));
    OPTD_ASSIGN_OR_RETURN(t->gradient, backend.Allocate(bytes));
    OPTD_ASSIGN_OR_RETURN(t->momentum, backend.Allocate(bytes));
    OPTD_RETURN_IF_ERROR(backend.Fill(queue, t->parameters.f32(), t->count, 0.0f));
    OPTD_RETURN_IF_ERROR(backend.Fill(queue, t->gradient.f32(), t->count, 0.0f));
    OPTD_RETURN_IF_ERROR(backend.Fill(queue, t->momentum.f32(), t->count, 0.0f));
    if (t->second_count > 0) {
      OPTD_ASSIGN_OR_RETURN(t->second_moment,
                            backend.Allocate(static_cast<size_t>(t->second_count) * sizeof(float)));
      OPTD_RETURN_IF_ERROR(backend.Fill(queue, t->second_moment.f32(), t->second_count, 0.0f));
    }
  }
  OPTD_ASSIGN_OR_RETURN(
      opt->workspace_,
      backend.Allocate(static_cast<size_t>(opt->workspace_floats_) * sizeof(float)));
  OPTD_ASSIGN_OR_RETURN(opt->step_scalars_, backend.Allocate(opt->StepScalarBytes()));
  // The temporaries a step's operations take, had now: a step that ran out of them half-way
  // (after Momentum has rewritten m) could not leave the state as it was.
  OPTD_RETURN_IF_ERROR(backend.ReserveScratch(queue, opt->StepScratch()));
  OPTD_RETURN_IF_ERROR(backend.Synchronize(queue));
  return opt;
}

ScratchNeeds Optimizer::StepScratch() const {
  ScratchNeeds needs;
  needs.checked_arrays = num_tensors();
  for (const Group& g : groups_) {
    if (g.fused_rmnp) continue;  // one kernel, no temporaries
    int64_t batch = 0;
    for (int i : g.members) batch += tensors_[i]->view.batch;
    needs.matrices.push_back(
        {.batch = batch,
         .rows = g.rows,
         .cols = g.cols,
         .svd = tensors_[g.members[0]]->spec.config.matrix.direction == Direction::kExactPolar});
  }
  return needs;
}

absl::Status Optimizer::CheckIndex(int tensor) const {
  if (tensor < 0 || tensor >= num_tensors()) {
    return absl::OutOfRangeError(
        absl::StrCat("tensor index ", tensor, " is outside [0, ", num_tensors(), ")"));
  }
  return absl::OkStatus();
}

const TensorSpec& Optimizer::spec(int tensor) const { return tensors_[tensor]->spec; }
int64_t Optimizer::num_elements(int tensor) const { return tensors_[tensor]->count; }
int64_t Optimizer::steps_applied(int tensor) const { return tensors_[tensor]->steps; }
float* Optimizer::parameters(int tensor) const { return tensors_[tensor]->parameters.f32(); }
float* Optimizer::gradient(int tensor) const { return tensors_[tensor]->gradient.f32(); }

absl::StatusOr<int> Optimizer::FindTensor(absl::string_view name) const {
  const int t = index_->Find(name);
  if (t < 0) return absl::NotFoundError(absl::StrCat("unknown tensor '", name, "'"));
  return t;
}

absl::Status Optimizer::CheckStepLearningRate(double lr) const {
  for (const auto& t : tensors_) OPTD_RETURN_IF_ERROR(CheckLearningRateFor(t->spec, lr));
  return absl::OkStatus();
}

absl::StatusOr<Optimizer::Tensor*> Optimizer::TensorOfSize(int tensor, size_t count) {
  OPTD_RETURN_IF_ERROR(CheckIndex(tensor));
  Tensor& t = *tensors_[tensor];
  if (static_cast<int64_t>(count) != t.count) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", t.spec.name, "' has ", t.count, " elements, got ", count));
  }
  return &t;
}

absl::Status Optimizer::SetParameters(int tensor, absl::Span<const float> values) {
  OPTD_ASSIGN_OR_RETURN(Tensor * t, TensorOfSize(tensor, values.size()));
  // Counted without a branch, so the loop vectorizes (an early exit kept it scalar: a quarter of
  // the daemon's time in an upload); the first is looked for only when there is one.
  int64_t non_finite = 0;
  for (const float v : values) non_finite += !(std::fabs(v) <= std::numeric_limits<float>::max());
  for (size_t i = 0; non_finite > 0 && i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("parameters for tensor '", t->spec.name, "' are not finite at element ", i));
    }
  }
  return WriteParameters(*t, values);
}

absl::Status Optimizer::SetFiniteParameters(int tensor, absl::Span<const float> values) {
  OPTD_ASSIGN_OR_RETURN(Tensor * t, TensorOfSize(tensor, values.size()));
  return WriteParameters(*t, values);
}

absl::Status Optimizer::WriteParameters(Tensor& t, absl::Span<const float> values) {
  Queue& queue = *queue_;
  OPTD_RETURN_IF_ERROR(
      backend_->Upload(queue, t.parameters.data(), values.data(), values.size() * sizeof(float)));
  return backend_->Synchronize(queue);
}

absl::Status Optimizer::GetParameters(int tensor, absl::Span<float> out) const {
  OPTD_RETURN_IF_ERROR(CheckIndex(tensor));
  const Tensor& t = *tensors_[tensor];
  if (static_cast<int64_t>(out.size()) != t.count) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", t.spec.name, "' has ", t.count,
                                                   " elements, output holds ", out.size()));
  }
  return GetParameters(tensor, 0, out);
}

absl::Status Optimizer::GetParameters(int tensor, int64_t offset, absl::Span<float> out) const {
  OPTD_RETURN_IF_ERROR(CheckIndex(tensor));
  const Tensor& t = *tensors_[tensor];
  const int64_t count = static_cast<int64_t>(out.size());
  if (offset < 0 || offset > t.count || count > t.count - offset) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", t.spec.name, "' has ", t.count,
                                                   " elements, not [", offset, ", ", offset + count,
                                                   ")"));
  }
  Queue& queue = *queue_;
  OPTD_RETURN_IF_ERROR(backend_->Download(queue, out.data(),
                                          static_cast<const float*>(t.parameters.data()) + offset,
                                          out.size() * sizeof(float)));
  return backend_->Synchronize(queue);
}

absl::Status Optimizer::SetGradient(int tensor, absl::Span<const float> values) {
  OPTD_RETURN_IF_ERROR(CheckIndex(tensor));
  Tensor& t = *tensors_[tensor];
  OPTD_RETURN_IF_ERROR(CheckGradientSize(t.spec, t.count, values.size()));
  return backend_->Upload(*queue_, t.gradient.data(), values.data(), values.size() * sizeof(float));
}

absl::Status Optimizer::SetHyperparameters(int tensor, double lr, double weight_decay,
                                           double momentum) {
  OPTD_RETURN_IF_ERROR(CheckIndex(tensor));
  OptimizerConfig config = tensors_[tensor]->spec.config;
  config.lr = lr;
  config.weight_decay = weight_decay;
  if (config.algorithm == Algorithm::kAdamW) {
    config.adamw.beta1 = momentum;
  } else {
    config.matrix.momentum = momentum;
  }
  absl::Status valid = ValidateOptimizerConfig(config);
  if (!valid.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", tensors_[tensor]->spec.name, "': ", valid.message()));
  }
  tensors_[tensor]->spec.config = config;
  return absl::OkStatus();
}

std::vector<StateBuffer> Optimizer::state(int tensor) const {
  const Tensor& t = *tensors_[tensor];
  if (t.spec.config.algorithm == Algorithm::kAdamW) {
    return {{"adam_first_moment", t.momentum.f32(), t.count},
            {"adam_second_moment", t.second_moment.f32(), t.count}};
  }
  std::vector<StateBuffer> state = {{"momentum", t.momentum.f32(), t.count}};
  if (t.spec.config.matrix.post_normalize == PostNormalize::kNorMuon) {
    state.push_back({"normuon_second_moment", t.second_moment.f32(), t.view.batch * t.view.rows});
  }
  return state;
}

absl::StatusOr<StateBuffer> Optimizer::FindState(int tensor, absl::string_view buffer) const {
  OPTD_RETURN_IF_ERROR(CheckIndex(tensor));
  for (const StateBuffer& b : state(tensor)) {
    if (b.name == buffer) return b;
  }
  return absl::NotFoundError(absl::StrCat("tensor '", tensors_[tensor]->spec.name,
                                          "' has no state buffer '", buffer, "'"));
}

absl::Status Optimizer::GetState(int tensor, absl::string_view buffer,
                                 absl::Span<float> out) const {
  OPTD_ASSIGN_OR_RETURN(StateBuffer b, FindState(tensor, buffer));
  if (static_cast<int64_t>(out.size()) != b.count) {
    return absl::InvalidArgumentError(absl::StrCat("state '", buffer, "' of tensor '",
                                                   tensors_[tensor]->spec.name, "' has ", b.count,
                                                   " elements, output holds ", out.size()));
  }
  Queue& queue = *queue_;
  OPTD_RETURN_IF_ERROR(backend_->Download(queue, out.data(), b.data, out.size() * sizeof(float)));
  return backend_->Synchronize(queue);
}

absl::Status Optimizer::SetState(int tensor, absl::string_view buffer,
                                 absl::Span<const float> values) {
  OPTD_ASSIGN_OR_RETURN(StateBuffer b, FindState(tensor, buffer));
  if (static_cast<int64_t>(values.size()) != b.count) {
    return absl::InvalidArgumentError(absl::StrCat("state '", buffer, "' of tensor '",
                                                   tensors_[tensor]->spec.name, "' has ", b.count,
                                                   " elements, got ", values.size()));
  }
  Queue& queue = *queue_;
  OPTD_RETURN_IF_ERROR(
      backend_->Upload(queue, b.data, values.data(), values.size() * sizeof(float)));
  return backend_->Synchronize(queue);
}

absl::StatusOr<StateBuffer> Optimizer::FindRange(int tensor, absl::string_view buffer,
                                                 int64_t offset, int64_t count) const {
  OPTD_RETURN_IF_ERROR(CheckIndex(tensor));
  const Tensor& t = *tensors_[tensor];
  StateBuffer b{"parameters", static_cast<float*>(t.parameters.data()), t.count};
  if (!buffer.empty()) {
    OPTD_ASSIGN_OR_RETURN(b, FindState(tensor, buffer));
  }
  if (offset < 0 || offset > b.count || count > b.count - offset) {
    return absl::InvalidArgumentError(absl::StrCat(b.name, " of tensor '", t.spec.name, "' has ",
                                                   b.count, " elements, not [", offset, ", ",
                                                   offset + count, ")"));
  }
  return b;
}

absl::Status Optimizer::ReadRange(int tensor, absl::string_view buffer, int64_t offset,
                                  absl::Span<float> out) const {
  OPTD_ASSIGN_OR_RETURN(StateBuffer b,
                        FindRange(tensor, buffer, offset, static_cast<int64_t>(out.size())));
  Queue& queue = *queue_;
  OPTD_RETURN_IF_ERROR(
      backend_->Download(queue, out.data(), b.data + offset, out.size() * sizeof(float)));
  return backend_->Synchronize(queue);
}

absl::Status Optimizer::WriteRange(int tensor, absl::string_view buffer, int64_t offset,
                                   absl::Span<const float> values) {
  OPTD_ASSIGN_OR_RETURN(StateBuffer b,
                        FindRange(tensor, buffer, offset, static_cast<int64_t>(values.size())));
  for (size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      return absl::InvalidArgumentError(absl::StrCat(b.name, " of tensor '",
                                                     tensors_[tensor]->spec.name,
                                                     "' is not finite at element ", offset + i));
    }
  }
  Queue& queue = *queue_;
  OPTD_RETURN_IF_ERROR(
      backend_->Upload(queue, b.data + offset, values.data(), values.size() * sizeof(float)));
  return backend_->Synchronize(queue);
}

absl::Status Optimizer::SetStepsApplied(int tensor, int64_t steps) {
  OPTD_RETURN_IF_ERROR(CheckIndex(tensor));
  if (steps < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("steps applied of tensor '", tensors_[tensor]->spec.name, "' is ", steps));
  }
  tensors_[tensor]->steps = steps;
  tensors_[tensor]->pending_choices.reset();  // decided for another step
  return absl::OkStatus();
}

absl::Status Optimizer::CaptureUpdate(int tensor, float* out) {
  OPTD_RETURN_IF_ERROR(CheckIndex(tensor));
  Tensor& t = *tensors_[tensor];
  if (t.spec.config.algorithm != Algorithm::kMatrix || out == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("capture of tensor '", t.spec.name,
                     "': only matrix tensors have an update to capture, into non-null memory"));
  }
  t.capture = out;
  return absl::OkStatus();
}

absl::Status Optimizer::Step(absl::Span<const bool> has_gradient, std::optional<double> lr,
                             const StepProgress* progress) {
  // A capture is for this step only, whatever becomes of it (a rejected step included).
  absl::Cleanup clear_captures = [this] {
    for (auto& t : tensors_) t->capture = nullptr;
  };
  // So is a learning-rate override: the tensors' own rates come back however the step ends.
  std::vector<double> own_lr;
  if (lr.has_value()) {
    OPTD_RETURN_IF_ERROR(CheckStepLearningRate(*lr));
    for (auto& t : tensors_) {
      own_lr.push_back(t->spec.config.lr);
      t->spec.config.lr = *lr;
    }
  }
  absl::Cleanup restore_lr = [this, &own_lr] {
    for (size_t i = 0; i < own_lr.size(); ++i) tensors_[i]->spec.config.lr = own_lr[i];
  };
  if (poisoned_) return Poisoned();
  if (!has_gradient.empty() && static_cast<int>(has_gradient.size()) != num_tensors()) {
    return absl::InvalidArgumentError(absl::StrCat("has_gradient has ", has_gradient.size(),
                                                   " entries for ", num_tensors(), " tensors"));
  }
  // A plain bool array: absl::Span cannot view std::vector<bool>.
  std::unique_ptr<bool[]> present(new bool[num_tensors()]);
  for (int i = 0; i < num_tensors(); ++i) present[i] = has_gradient.empty() || has_gradient[i];
  // Choices are this step's to decide: none left over from a step that did not commit (a failed
  // PrepareTensor) may be committed with it.
  for (int i = 0; i < num_tensors(); ++i) {
    if (present[i]) tensors_[i]->pending_choices.reset();
  }
  Queue& queue = *queue_;
  // Validate everything before any state changes: a rejected step leaves no trace.
  std::vector<const float*> gradients;
  std::vector<int64_t> counts;
  std::vector<int> checked;
  for (int i = 0; i < num_tensors(); ++i) {
    if (!present[i]) continue;
    gradients.push_back(tensors_[i]->gradient.f32());
    counts.push_back(tensors_[i]->count);
    checked.push_back(i);
  }
  OPTD_ASSIGN_OR_RETURN(
      const std::vector<int64_t> bad,
      backend_->CountOutOfRangeEach(queue, gradients, counts, kMaxGradientMagnitude));
  for (size_t j = 0; j < checked.size(); ++j) {
    if (bad[j] > 0) {
      const Tensor& t = *tensors_[checked[j]];
      return OutOfRangeGradient(t.spec, bad[j], t.count);
    }
  }
  // The per-step scalars (AdamW's bias corrections, every tensor's learning rate and decay)
  // go to the backend before the work that reads them, so a recorded step replays with this
  // step's values.
  OPTD_RETURN_IF_ERROR(UploadStepScalars());
  if (progress != nullptr && progress->validated) progress->validated();
  // After its first step, a step whose work neither synchronizes (the exact polar's SVD) nor
  // differs for a capture runs as one graph where the backend has them: replayed while the
  // step's shape and settings stay those it was recorded with (a learning rate, which the kernels
  // read from backend memory, is not among them: a schedule replays one graph), recorded anew
  // when they change.
  const absl::Span<const bool> has = absl::MakeConstSpan(present.get(), num_tensors());
  // A step that decides auto choices reads its direction inputs back: it is not recorded.
  bool record = steps_run_ > 0 && graphs_available_ && !has_exact_polar_;
  for (int i = 0; record && i < num_tensors(); ++i) {
    const Tensor& t = *tensors_[i];
    record = t.capture == nullptr && !(present[i] && DecidesThisStep(t));
  }
  if (record) {
    const std::vector<uint8_t> key = GraphKey(has);
    if (graph_ != nullptr && key == graph_key_) {
      absl::Status replayed = backend_->Replay(queue, *graph_);
      if (replayed.ok()) replayed = backend_->Synchronize(queue);
      if (!replayed.ok()) return Poison(replayed);
      if (absl::Status told = Stepped(progress, checked); !told.ok()) return Poison(told);
      return FinishStep(has);
    }
    absl::Status recorded = backend_->BeginRecording(queue);
    if (recorded.ok()) {
      recorded = EnqueueStep(has);
      if (recorded.ok()) {
        recorded = backend_->EndRecording(queue, &graph_);
      } else {
        backend_->EndRecording(queue, nullptr).IgnoreError();  // ends the recording, runs nothing
      }
    }
    if (recorded.ok()) {
      graph_key_ = key;
      ++recordings_;
      const absl::Status synced = backend_->Synchronize(queue);
      if (!synced.ok()) return Poison(synced);
      if (absl::Status told = Stepped(progress, checked); !told.ok()) return Poison(told);
      return FinishStep(has);
    }
    // Nothing recorded ran: this optimizer steps kernel by kernel from now on.
    graph_.reset();
    graphs_available_ = false;
  }
  absl::Status status = EnqueueStep(has, progress);
  // A failed step's work may still be running: it finishes before the caller frees anything.
  const absl::Status synced = backend_->Synchronize(queue);
  if (status.ok()) status = synced;
  if (!status.ok()) return Poison(status);
  return FinishStep(has);
}

absl::Status Optimizer::EnqueueStep(absl::Span<const bool> present, const StepProgress* progress) {
  const bool tell = progress != nullptr && progress->stepped;
  std::vector<int> stepped;
  for (const Group& group : groups_) {
    if (!tell) {
      OPTD_RETURN_IF_ERROR(StepGroup(group, present));
      continue;
    }
    stepped.clear();
    for (int i : group.members) {
      if (present[i]) stepped.push_back(i);
    }
    if (group.fused_rmnp) {
      // One pass per matrix (StepMembers runs them one by one anyway): each final on its own.
      for (int i : stepped) {
        Tensor* member = tensors_[i].get();
        OPTD_RETURN_IF_ERROR(StepMembers(group, absl::MakeConstSpan(&member, 1)));
        OPTD_RETURN_IF_ERROR(Stepped(progress, absl::MakeConstSpan(&i, 1)));
      }
      continue;
    }
    OPTD_RETURN_IF_ERROR(StepGroup(group, present));
    OPTD_RETURN_IF_ERROR(Stepped(progress, stepped));
  }
  for (int i = 0; i < num_tensors(); ++i) {
    if (present[i] && tensors_[i]->spec.config.algorithm == Algorithm::kAdamW) {
      OPTD_RETURN_IF_ERROR(StepAdamW(*tensors_[i]));
      if (tell) OPTD_RETURN_IF_ERROR(Stepped(progress, absl::MakeConstSpan(&i, 1)));
    }
  }
  return absl::OkStatus();
}

absl::Status Optimizer::Stepped(const StepProgress* progress, absl::Span<const int> tensors) {
  if (progress == nullptr || !progress->stepped || tensors.empty()) return absl::OkStatus();
  OPTD_RETURN_IF_ERROR(backend_->Synchronize(*queue_));
  progress->stepped(tensors);
  return absl::OkStatus();
}

absl::Status Optimizer::Poison(const absl::Status& status) {
  backend_->Synchronize(*queue_).IgnoreError();
  poisoned_ = true;
  return absl::InternalError(
      absl::StrCat("step failed in the ", backend_->name(), " backend: ", status.message()));
}

std::vector<uint8_t> Optimizer::GraphKey(absl::Span<const bool> present) const {
  // What a recorded step's kernels take as arguments or as their sequence: the tensors present,
  // each one's settings (as bytes), and MuonEq's phase. The per-step scalars (AdamW's, and the
  // learning rate and decay every update reads) are read from backend memory and do not count.
  std::vector<uint8_t> key;
  auto add = [&key](const auto& value) {
    const auto* bytes = reinterpret_cast<const uint8_t*>(&value);
    key.insert(key.end(), bytes, bytes + sizeof(value));
  };
  for (int i = 0; i < num_tensors(); ++i) {
    const Tensor& t = *tensors_[i];
    const OptimizerConfig& c = t.spec.config;
    const bool switched =
        c.matrix.rowcol_to_row_at_step > 0 && t.steps + 1 >= c.matrix.rowcol_to_row_at_step;
    add(static_cast<uint8_t>(present[i] | (switched << 1)));
    add(c.algorithm == Algorithm::kAdamW ? c.adamw.beta1 : c.matrix.momentum);
    for (const MatrixChoice& choice : t.choices.matrices) {
      add(choice.steps);
      add(choice.row_normalize);
    }
  }
  return key;
}

absl::Status Optimizer::FinishStep(absl::Span<const bool> present) {
  for (int i = 0; i < num_tensors(); ++i) {
    if (!present[i]) continue;
    Tensor& t = *tensors_[i];
    ++t.steps;
    t.CommitChoices();
  }
  ++steps_run_;
  return absl::OkStatus();
}

formulas::AdamWScalars Optimizer::AdamWScalarsOf(const Tensor& t) const {
  const OptimizerConfig& c = t.spec.config;
  const double step = static_cast<double>(t.steps + 1);
  // torch: step_size = lr/bc1 and denominator √v/√bc2 + ε; Moonlight: lr/(bc1/√bc2) and √v + ε.
  const double bc1 = 1.0 - std::pow(c.adamw.beta1, step);
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(c.adamw.beta2, step));
  const bool torch = c.adamw.eps_placement == formulas::AdamEpsilon::kTorch;
  return formulas::AdamWScalars{
      .beta2 = static_cast<float>(c.adamw.beta2),
      .one_minus_beta1 = static_cast<float>(1.0 - c.adamw.beta1),
      .one_minus_beta2 = static_cast<float>(1.0 - c.adamw.beta2),
      .eps = c.adamw.eps,
      .decay = DecayFactor(c),
      .step_size = static_cast<float>(torch ? c.lr / bc1 : c.lr / (bc1 / bc2_sqrt)),
      .bias_correction2_sqrt = static_cast<float>(bc2_sqrt),
      .eps_placement = c.adamw.eps_placement};
}

absl::Status Optimizer::StepAdamW(Tensor& t) {
  return backend_->AdamW(*queue_, t.parameters.f32(), t.momentum.f32(), t.second_moment.f32(),
                         t.gradient.f32(), t.count, AdamWScalarsIn(t));
}

int64_t Optimizer::StepScalarBytes() const {
  return num_adamw_ * static_cast<int64_t>(sizeof(formulas::AdamWScalars)) +
         num_rates_ * static_cast<int64_t>(sizeof(formulas::RateScalars));
}

formulas::AdamWScalars* Optimizer::AdamWScalarsIn(const Tensor& t) const {
  return static_cast<formulas::AdamWScalars*>(step_scalars_.data()) + t.adamw_slot;
}

formulas::RateScalars* Optimizer::RatesAt(void* scalars) const {
  return reinterpret_cast<formulas::RateScalars*>(static_cast<formulas::AdamWScalars*>(scalars) +
                                                  num_adamw_);
}

formulas::RateScalars* Optimizer::RateIn(const Tensor& t, RateSlot slot) const {
  return RatesAt(step_scalars_.data()) + t.rate_slot + static_cast<int>(slot);
}

std::array<formulas::RateScalars, Optimizer::kRatesPerTensor> Optimizer::RatesOf(
    const Tensor& t) const {
  const OptimizerConfig& c = t.spec.config;
  std::array<formulas::RateScalars, kRatesPerTensor> rates;
  rates[static_cast<int>(RateSlot::kStep)] = {RateAndScaleOf(t).lr, DecayFactor(c)};
  // capture = capture·0 − (−1)·(o·scale) (CaptureScaled).
  rates[static_cast<int>(RateSlot::kCapture)] = {-1.0f, 0.0f};
  // u = g·1 − (−μ)·m: Nesterov's direction rebuilt from the new momentum (FusedRmnpStep).
  rates[static_cast<int>(RateSlot::kNesterov)] = {-static_cast<float>(c.matrix.momentum), 1.0f};
  return rates;
}

absl::Status Optimizer::UploadStepScalars() {
  if (StepScalarBytes() == 0) return absl::OkStatus();
  // The buffer's image, laid out as step_scalars_ (operator new aligns it for both structs).
  std::vector<uint8_t> host(StepScalarBytes());
  auto* adamw = reinterpret_cast<formulas::AdamWScalars*>(host.data());
  formulas::RateScalars* rates = RatesAt(host.data());
  for (const auto& t : tensors_) {
    if (t->adamw_slot >= 0) {
      adamw[t->adamw_slot] = AdamWScalarsOf(*t);
    } else {
      const auto mine = RatesOf(*t);
      std::copy(mine.begin(), mine.end(), rates + t->rate_slot);
    }
  }
  return backend_->Upload(*queue_, step_scalars_.data(), host.data(), host.size());
}

absl::Status Optimizer::UploadStepScalarsOf(const Tensor& t) {
  if (t.adamw_slot >= 0) {
    const formulas::AdamWScalars scalars = AdamWScalarsOf(t);
    return backend_->Upload(*queue_, AdamWScalarsIn(t), &scalars, sizeof(scalars));
  }
  const auto rates = RatesOf(t);
  return backend_->Upload(*queue_, RateIn(t, RateSlot::kStep), rates.data(), sizeof(rates));
}

// The rate and scale the kernels apply as lr·(scale·o); a preset that folds the scale into the
// rate gets (lr·scale) formed in fp64 and a scale of 1.
Optimizer::RateAndScale Optimizer::RateAndScaleOf(const Tensor& t) const {
  const OptimizerConfig& c = t.spec.config;
  const auto& shape = t.spec.shape;
  const double scale = c.matrix.scale_from_last_two_dims && shape.size() >= 2
                           ? ScaleFactor(c.matrix, shape[shape.size() - 2], shape.back())
                           : ScaleFactor(c.matrix, t.view.rows, t.view.cols);
  if (c.matrix.scale_in_lr) {
    return {static_cast<float>(c.lr * scale), 1.0f, static_cast<float>(scale)};
  }
  return {static_cast<float>(c.lr), static_cast<float>(scale), static_cast<float>(scale)};
}

// capture = capture·0 − (−1)·(o·scale): the scaled direction, formed by the same kernel (and the
// same product) as the step's, without its step-dtype rounding. A capture that is not `o` itself
// is zeroed first (its old contents may not be finite); `o` always is.
absl::Status Optimizer::CaptureScaled(const Tensor& t, float* capture, const float* o,
                                      float scale) {
  if (capture != o) OPTD_RETURN_IF_ERROR(backend_->Fill(*queue_, capture, t.count, 0.0f));
  return backend_->ApplyUpdate(*queue_, capture, o, t.count, RateIn(t, RateSlot::kCapture), scale,
                               DType::kF32);
}

// --- The stages of a matrix step, in the order of ../shared/DESIGN.md's table ("The optimizer, as
// stages"): momentum, pre-normalize, direction, post-normalize, scale, weight decay. StepGroup
// runs them in that order; the fused RMNP pass runs them all in one kernel. ---

// momentum: m ← μ·m + (1−μ)·g (ema) or μ·m + g (sum); the direction's input u = lerp(g, m, μ) or
// g + μ·m with Nesterov, else m.
absl::Status Optimizer::MomentumStage(Tensor& t, float* u) {
  const MatrixConfig& c = t.spec.config.matrix;
  const formulas::MomentumScalars momentum{static_cast<float>(c.momentum),
                                           static_cast<float>(1.0 - c.momentum), c.momentum_kind,
                                           c.nesterov};
  return backend_->Momentum(*queue_, t.momentum.f32(), t.gradient.f32(), u, t.count, momentum);
}

// pre-normalize: MuonEq's row, column or row-and-column equilibration of u (seed: MuonEq paper);
// rowcol becomes row from rowcol_to_row_at_step on.
absl::Status Optimizer::PreNormalizeStage(const Tensor& t, const MatrixBatch& u, float* scratch) {
  const MatrixConfig& c = t.spec.config.matrix;
  PreNormalize mode = c.pre_normalize;
  if (mode == PreNormalize::kRowCol && c.rowcol_to_row_at_step > 0 &&
      t.steps + 1 >= c.rowcol_to_row_at_step) {
    mode = PreNormalize::kRow;
  }
  if (mode == PreNormalize::kNone) return absl::OkStatus();
  EquilibrateArgs args{.rows = mode == PreNormalize::kRow || mode == PreNormalize::kRowCol,
                       .cols = mode == PreNormalize::kCol || mode == PreNormalize::kRowCol,
                       .eps = c.pre_normalize_eps,
                       .exponent = c.pre_normalize_exponent,
                       .clip = c.pre_normalize_clip};
  return backend_->Equilibrate(*queue_, u, args, scratch);
}

// direction, batched over the group: Newton–Schulz, RMNP's row ℓ2 normalization, or the exact
// polar factor.
absl::Status Optimizer::DirectionStage(const MatrixConfig& c, const MatrixBatch& all,
                                       float* scratch) {
  switch (c.direction) {
    case Direction::kNewtonSchulz:
      return NewtonSchulz(*backend_, *queue_, all, c.newton_schulz, scratch);
    case Direction::kRowNormalize:
      return backend_->RowNormalize(*queue_, all.data, all.batch * all.rows, all.cols,
                                    c.row_normalize_eps);
    case Direction::kExactPolar:
      return BatchedExactPolar(*backend_, *queue_, all, all.data, scratch);
  }
  return absl::InternalError("unknown direction");
}

bool Optimizer::DecidesThisStep(const Tensor& t) const {
  if (!t.has_auto || !DecidesOn(t.spec.config.matrix.auto_modes, t.view.rows, t.view.cols)) {
    return false;
  }
  const int64_t step = t.steps + 1;  // this step's number, 1-based
  return step == 1 || step % t.spec.config.matrix.auto_modes.interval == 0;
}

// Each matrix's decision is made on a host copy of it alone, so a matrix gets the same choice
// whatever it is batched with (a sharded session's slices of a batched tensor included).
absl::Status Optimizer::Decide(Tensor& t, const float* u) {
  const MatrixConfig& c = t.spec.config.matrix;
  const int64_t size = t.view.rows * t.view.cols;
  std::vector<float> host(t.count);
  OPTD_RETURN_IF_ERROR(backend_->Download(*queue_, host.data(), u, t.count * sizeof(float)));
  OPTD_RETURN_IF_ERROR(backend_->Synchronize(*queue_));
  AutoChoices next = t.choices;
  double share = 0, dominance = 0, cosine = 0;
  int64_t decided = 0;
  for (int64_t b = 0; b < t.view.batch; ++b) {
    absl::StatusOr<MatrixDecision> d =
        DecideMatrix(absl::MakeConstSpan(host).subspan(b * size, size), t.view.rows, t.view.cols,
                     c.auto_modes, c.newton_schulz, t.choices.matrices[b]);
    // A zero matrix has nothing to decide on, and a failed eigensolver must not fail the step:
    // either keeps the matrix's choice.
    if (!d.ok()) continue;
    next.matrices[b] = d->choice;
    share += d->small_sv_share;
    dominance += d->dominance_min;
    cosine += d->cosine;
    ++decided;
  }
  if (decided > 0) {
    const double n = static_cast<double>(decided);
    next.decided_at_step = t.steps + 1;
    next.small_sv_share = share / n;
    next.dominance_min = dominance / n;
    next.cosine = cosine / n;
  }
  t.pending_choices = std::move(next);
  return absl::OkStatus();
}

absl::Status Optimizer::AutoDirectionStage(const MatrixConfig& c, absl::Span<Tensor* const> members,
                                           float* directions, float* scratch) {
  // The members' matrices in workspace order, as runs of one choice.
  std::vector<std::pair<MatrixChoice, int64_t>> runs;
  for (const Tensor* t : members) {
    for (const MatrixChoice& choice : t->choices.matrices) {
      if (!runs.empty() && runs.back().first == choice) {
        ++runs.back().second;
      } else {
        runs.emplace_back(choice, 1);
      }
    }
  }
  MatrixConfig run_config = c;
  const int64_t rows = members[0]->view.rows, cols = members[0]->view.cols;
  float* x = directions;
  for (const auto& [choice, count] : runs) {
    run_config.direction =
        choice.row_normalize ? Direction::kRowNormalize : Direction::kNewtonSchulz;
    run_config.newton_schulz.steps = choice.steps;
    OPTD_RETURN_IF_ERROR(DirectionStage(run_config, MatrixBatch{x, count, rows, cols}, scratch));
    x += count * rows * cols;
  }
  return absl::OkStatus();
}

bool Optimizer::has_auto_choices(int tensor) const { return tensors_[tensor]->has_auto; }

const AutoChoices& Optimizer::auto_choices(int tensor) const { return tensors_[tensor]->choices; }

absl::Status Optimizer::SetAutoChoices(int tensor, AutoChoices choices) {
  OPTD_RETURN_IF_ERROR(CheckIndex(tensor));
  Tensor& t = *tensors_[tensor];
  const std::string& name = t.spec.name;
  if (!t.has_auto) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "' has no auto modes (ns.steps=auto, direction=auto)"));
  }
  const AutoConfig& a = t.spec.config.matrix.auto_modes;
  if (static_cast<int64_t>(choices.matrices.size()) != t.view.batch) {
    return absl::InvalidArgumentError(absl::StrCat("auto choices of tensor '", name,
                                                   "': ", choices.matrices.size(),
                                                   " matrices, expected ", t.view.batch));
  }
  if (choices.decided_at_step < 0) {
    return absl::InvalidArgumentError(absl::StrCat("auto choices of tensor '", name,
                                                   "': decided at step ", choices.decided_at_step));
  }
  if (std::isnan(choices.small_sv_share) || std::isnan(choices.dominance_min) ||
      std::isnan(choices.cosine)) {
    return absl::InvalidArgumentError(
        absl::StrCat("auto choices of tensor '", name, "': a decision figure is NaN"));
  }
  for (MatrixChoice& m : choices.matrices) {
    // Without the steps rule the count is the config's (choices from a session that had it).
    if (!a.steps) m.steps = t.spec.config.matrix.newton_schulz.steps;
    if (a.steps && (m.steps < a.min_steps || m.steps > a.max_steps)) {
      return absl::InvalidArgumentError(
          absl::StrCat("auto choices of tensor '", name, "': ", m.steps,
                       " Newton–Schulz steps is outside [", a.min_steps, ", ", a.max_steps, "]"));
    }
    if (m.row_normalize && !a.direction) {
      return absl::InvalidArgumentError(absl::StrCat(
          "auto choices of tensor '", name, "': row normalization without direction=auto"));
    }
  }
  t.choices = std::move(choices);
  t.pending_choices.reset();
  // A recorded step ran on the old choices.
  graph_.reset();
  return absl::OkStatus();
}

// post-normalize: NorMuon's per-neuron second moment, v ← β₂·v + (1−β₂)·mean_row(o²),
// o ← o/(√v + ε), optionally keeping ‖o‖F (seed: NorMuon summary).
absl::Status Optimizer::PostNormalizeStage(Tensor& t, const MatrixBatch& o) {
  const MatrixConfig& c = t.spec.config.matrix;
  if (c.post_normalize != PostNormalize::kNorMuon) return absl::OkStatus();
  return backend_->NorMuonNormalize(*queue_, o, t.second_moment.f32(),
                                    NorMuonArgs{static_cast<float>(1.0 - c.normuon.beta2),
                                                c.normuon.eps, c.normuon.preserve_frobenius});
}

// scale and weight decay: o to unit RMS where the preset asks, then w ← w·(1 − η·λ) − η·scale·o
// in the step dtype (and the update captured for the analyzer, before that rounding).
absl::Status Optimizer::ScaleAndDecayStage(Tensor& t, const MatrixBatch& o) {
  const OptimizerConfig& c = t.spec.config;
  if (c.matrix.scale == ScaleRule::kUnitRms) {
    OPTD_RETURN_IF_ERROR(backend_->ScaleToRms(*queue_, o, static_cast<float>(c.matrix.scale_rms),
                                              c.matrix.normuon.eps));
  }
  const RateAndScale rate = RateAndScaleOf(t);
  if (t.capture != nullptr) {
    OPTD_RETURN_IF_ERROR(CaptureScaled(t, t.capture, o.data, rate.full_scale));
  }
  return backend_->ApplyUpdate(*queue_, t.parameters.f32(), o.data, t.count,
                               RateIn(t, RateSlot::kStep), rate.scale, c.matrix.step_dtype);
}

// RMNP's six stages in one pass per tensor (Backend::RmnpStep): sum momentum, no pre-normalize,
// row normalization, no post-normalize, the preset's scale and decay.
RmnpStepArgs Optimizer::RmnpArgsOf(const Tensor& t) const {
  const OptimizerConfig& c = t.spec.config;
  const RateAndScale rate = RateAndScaleOf(t);
  return RmnpStepArgs{.momentum = static_cast<float>(c.matrix.momentum),
                      .nesterov = c.matrix.nesterov,
                      .eps = c.matrix.row_normalize_eps,
                      .rate = RateIn(t, RateSlot::kStep),
                      .scale = rate.scale,
                      .step_dtype = c.matrix.step_dtype};
}

absl::Status Optimizer::FusedRmnpStep(Tensor& t) {
  const RateAndScale rate = RateAndScaleOf(t);
  const int64_t rows = t.view.rows, cols = t.view.cols;
  const RmnpStepArgs args = RmnpArgsOf(t);
  OPTD_RETURN_IF_ERROR(backend_->RmnpStep(*queue_, t.parameters.f32(), t.momentum.f32(),
                                          t.gradient.f32(), t.view.batch * rows, cols, args));
  if (t.capture == nullptr) return absl::OkStatus();
  // The fused pass keeps no direction: rebuild it from the new momentum the way the pass formed
  // it (sum momentum: u = g + μ·m with Nesterov, else m; each product and sum the same fp32
  // operation), then row-normalize and scale it.
  float* u = t.capture;
  if (args.nesterov) {
    OPTD_RETURN_IF_ERROR(backend_->Copy(*queue_, u, t.gradient.f32(), t.count * sizeof(float)));
    OPTD_RETURN_IF_ERROR(backend_->ApplyUpdate(*queue_, u, t.momentum.f32(), t.count,
                                               RateIn(t, RateSlot::kNesterov), 1.0f, DType::kF32));
  } else {
    OPTD_RETURN_IF_ERROR(backend_->Copy(*queue_, u, t.momentum.f32(), t.count * sizeof(float)));
  }
  OPTD_RETURN_IF_ERROR(backend_->RowNormalize(*queue_, u, t.view.batch * rows, cols, args.eps));
  return CaptureScaled(t, u, u, rate.full_scale);
}

absl::Status Optimizer::StepGroup(const Group& group, absl::Span<const bool> present) {
  std::vector<Tensor*> members;
  for (int i : group.members) {
    if (present[i]) members.push_back(tensors_[i].get());
  }
  return StepMembers(group, members);
}

absl::Status Optimizer::StepMembers(const Group& group, absl::Span<Tensor* const> members) {
  if (members.empty()) return absl::OkStatus();
  if (group.fused_rmnp) {
    for (Tensor* t : members) OPTD_RETURN_IF_ERROR(FusedRmnpStep(*t));
    return absl::OkStatus();
  }
  int64_t batch = 0;
  for (const Tensor* t : members) batch += t->view.batch;
  const int64_t rows = group.rows, cols = group.cols;
  float* directions = workspace_.f32();
  float* scratch = directions + batch * rows * cols;
  // Each tensor's slot of the group's batch.
  auto slot = [&](const Tensor& t, int64_t offset) {
    return MatrixBatch{directions + offset, t.view.batch, rows, cols};
  };
  int64_t offset = 0;
  for (Tensor* t : members) {
    const MatrixBatch u = slot(*t, offset);
    OPTD_RETURN_IF_ERROR(MomentumStage(*t, u.data));
    OPTD_RETURN_IF_ERROR(PreNormalizeStage(*t, u, scratch));
    offset += t->count;
  }
  if (members[0]->has_auto) {
    offset = 0;
    // (Step and PrepareTensor have already dropped any pending choices of these tensors.)
    for (Tensor* t : members) {
      if (DecidesThisStep(*t)) OPTD_RETURN_IF_ERROR(Decide(*t, directions + offset));
      offset += t->count;
    }
    OPTD_RETURN_IF_ERROR(
        AutoDirectionStage(members[0]->spec.config.matrix, members, directions, scratch));
  } else {
    OPTD_RETURN_IF_ERROR(DirectionStage(members[0]->spec.config.matrix,
                                        MatrixBatch{directions, batch, rows, cols}, scratch));
  }
  offset = 0;
  for (Tensor* t : members) {
    const MatrixBatch o = slot(*t, offset);
    OPTD_RETURN_IF_ERROR(PostNormalizeStage(*t, o));
    OPTD_RETURN_IF_ERROR(ScaleAndDecayStage(*t, o));
    offset += t->count;
  }
  return absl::OkStatus();
}

// --- Prepared steps ---

int64_t Optimizer::ShadowBytes(int tensor) const {
  const Tensor& t = *tensors_[tensor];
  return (2 * t.count + t.second_count) * static_cast<int64_t>(sizeof(float));
}

bool Optimizer::prepared(int tensor) const { return tensors_[tensor]->prepared; }

bool Optimizer::SteppedInABatch(int tensor) const {
  const Tensor& t = *tensors_[tensor];
  if (t.group < 0) return false;
  const Group& g = groups_[t.group];
  return !g.fused_rmnp && g.members.size() > 1;
}

absl::Status Optimizer::PrepareTensor(int tensor, absl::Span<const float> gradient,
                                      std::optional<double> lr) {
  return Prepare(tensor, gradient, lr, /*checked=*/false);
}

absl::Status Optimizer::PrepareCheckedTensor(int tensor, absl::Span<const float> gradient,
                                             std::optional<double> lr) {
  return Prepare(tensor, gradient, lr, /*checked=*/true);
}

absl::Status Optimizer::Prepare(int tensor, absl::Span<const float> gradient,
                                std::optional<double> lr, bool checked) {
  OPTD_RETURN_IF_ERROR(CheckIndex(tensor));
  Tensor& t = *tensors_[tensor];
  t.prepared = false;
  t.pending_choices.reset();
  if (poisoned_) return Poisoned();
  const double own_lr = t.spec.config.lr;
  if (lr.has_value()) {
    OPTD_RETURN_IF_ERROR(CheckLearningRateFor(t.spec, *lr));
    t.spec.config.lr = *lr;
  }
  absl::Cleanup restore_lr = [&t, own_lr] { t.spec.config.lr = own_lr; };
  Queue& queue = *queue_;
  // Where backend memory is the host's, the step reads the gradient where it lies (a stream's
  // staging); else it is uploaded into the tensor's gradient buffer, as Step's caller does.
  Buffer borrowed;
  const bool borrow = backend_->host_memory();
  if (borrow) {
    OPTD_RETURN_IF_ERROR(CheckGradientSize(t.spec, t.count, gradient.size()));
    borrowed = Buffer(const_cast<float*>(gradient.data()), gradient.size() * sizeof(float), {});
    std::swap(t.gradient, borrowed);
  } else {
    OPTD_RETURN_IF_ERROR(SetGradient(tensor, gradient));
  }
  absl::Cleanup give_back = [&t, &borrowed, borrow] {
    if (borrow) std::swap(t.gradient, borrowed);
  };
  // The check Step makes, with its message: nothing is computed from a gradient it would refuse.
  if (!checked) {
    OPTD_ASSIGN_OR_RETURN(
        const int64_t bad,
        backend_->CountOutOfRange(queue, t.gradient.f32(), t.count, kMaxGradientMagnitude));
    if (bad > 0) return OutOfRangeGradient(t.spec, bad, t.count);
  }
  const size_t bytes = static_cast<size_t>(t.count) * sizeof(float);
  const size_t second_bytes = static_cast<size_t>(t.second_count) * sizeof(float);
  if (t.shadow_parameters.data() == nullptr) {
    OPTD_ASSIGN_OR_RETURN(t.shadow_parameters, backend_->Allocate(bytes));
    OPTD_ASSIGN_OR_RETURN(t.shadow_momentum, backend_->Allocate(bytes));
    OPTD_ASSIGN_OR_RETURN(t.shadow_second_moment, backend_->Allocate(second_bytes));
  }
  // This step's scalars of the tensor (its lr override included) for the work below.
  OPTD_RETURN_IF_ERROR(UploadStepScalarsOf(t));
  const bool fused_rmnp = t.group >= 0 && groups_[t.group].fused_rmnp;
  if (t.spec.config.algorithm == Algorithm::kAdamW || fused_rmnp) {
    // One pass from the tensor's buffers into its shadows: Step's kernel, out of place.
    absl::Status status;
    if (fused_rmnp) {
      status = backend_->RmnpStepInto(queue, t.shadow_parameters.f32(), t.shadow_momentum.f32(),
                                      t.parameters.f32(), t.momentum.f32(), t.gradient.f32(),
                                      t.view.batch * t.view.rows, t.view.cols, RmnpArgsOf(t));
    } else {
      status =
          backend_->AdamWInto(queue, t.shadow_parameters.f32(), t.shadow_momentum.f32(),
                              t.shadow_second_moment.f32(), t.parameters.f32(), t.momentum.f32(),
                              t.second_moment.f32(), t.gradient.f32(), t.count, AdamWScalarsIn(t));
    }
    const absl::Status synced = backend_->Synchronize(queue);
    if (status.ok()) status = synced;
    OPTD_RETURN_IF_ERROR(status);  // only the shadows were written
    t.prepared = true;
    return absl::OkStatus();
  }
  // The other stages run in place on copies: the shadows stand in for the tensor's buffers
  // meanwhile, so it is Step's own code, kernel for kernel.
  OPTD_RETURN_IF_ERROR(
      backend_->Copy(queue, t.shadow_parameters.data(), t.parameters.data(), bytes));
  OPTD_RETURN_IF_ERROR(backend_->Copy(queue, t.shadow_momentum.data(), t.momentum.data(), bytes));
  if (second_bytes > 0) {
    OPTD_RETURN_IF_ERROR(
        backend_->Copy(queue, t.shadow_second_moment.data(), t.second_moment.data(), second_bytes));
  }
  t.SwapWithShadows();
  Tensor* member = &t;
  absl::Status status = StepMembers(groups_[t.group], absl::MakeConstSpan(&member, 1));
  const absl::Status synced = backend_->Synchronize(queue);
  t.SwapWithShadows();
  if (status.ok()) status = synced;
  // A failure wrote only into the shadows: the tensor's step is simply not prepared.
  OPTD_RETURN_IF_ERROR(status);
  t.prepared = true;
  return absl::OkStatus();
}

absl::Status Optimizer::GetPreparedParameters(int tensor, absl::Span<float> out) const {
  OPTD_RETURN_IF_ERROR(CheckIndex(tensor));
  const Tensor& t = *tensors_[tensor];
  if (!t.prepared) {
    return absl::FailedPreconditionError(
        absl::StrCat("tensor '", t.spec.name, "' has no prepared step"));
  }
  if (static_cast<int64_t>(out.size()) != t.count) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", t.spec.name, "' has ", t.count,
                                                   " elements, output holds ", out.size()));
  }
  Queue& queue = *queue_;
  OPTD_RETURN_IF_ERROR(backend_->Download(queue, out.data(), t.shadow_parameters.data(),
                                          out.size() * sizeof(float)));
  return backend_->Synchronize(queue);
}

int Optimizer::CommitPrepared() {
  int committed = 0;
  for (auto& t : tensors_) {
    if (!t->prepared) continue;
    t->SwapWithShadows();
    t->prepared = false;
    ++t->steps;
    t->CommitChoices();
    ++committed;
  }
  if (committed > 0) {
    // A recorded step names the buffers it ran on, which have just changed places.
    graph_.reset();
    ++steps_run_;
  }
  return committed;
}

void Optimizer::DiscardPrepared() {
  for (auto& t : tensors_) {
    t->pending_choices.reset();
    t->prepared = false;
  }
}

}  // namespace optd
