// The optimizer: parameters and optimizer state for a set of named tensors on one backend, and
// the step that applies gradients to them as ../shared/DESIGN.md's stages describe.
#ifndef OPTD_KERNELS_OPTIMIZER_H_
#define OPTD_KERNELS_OPTIMIZER_H_

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/tensor_index.h"
#include "kernels/auto_choice.h"
#include "kernels/backend.h"
#include "kernels/optimizer_config.h"

namespace optd {

// How a tensor of rank > 2 becomes matrices: kFlatten views [d0, d1, ...] as one d0×(d1·...)
// matrix (convolutions); kBatch views [..., m, n] as a batch of m×n matrices (experts, heads).
enum class RankPolicy { kFlatten, kBatch };

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  RankPolicy rank_policy = RankPolicy::kFlatten;
  OptimizerConfig config;
};

struct MatrixView {
  int64_t batch = 1, rows = 0, cols = 0;
};

// Largest gradient magnitude a step accepts, 2⁶³: with it, momentum, its squares and their fp64
// sums stay finite, so no finite gradient can turn into a NaN or an overflowed norm downstream.
inline constexpr float kMaxGradientMagnitude = 0x1p63f;

// Most elements one tensor may have (2⁴⁰, 4 TiB of fp32): beyond it, sizes and byte counts would
// come close to overflowing.
inline constexpr int64_t kMaxTensorElements = int64_t{1} << 40;

// Elements of `shape`; InvalidArgument for a dimension <= 0 or more than kMaxTensorElements.
absl::StatusOr<int64_t> ElementCount(absl::Span<const int64_t> shape);

// The matrices a tensor of `shape` is stepped as. InvalidArgument for rank < 2 or an empty shape.
absl::StatusOr<MatrixView> MatrixViewOf(absl::Span<const int64_t> shape, RankPolicy policy);

// One state buffer of a tensor, for checkpoints: "momentum", "normuon_second_moment",
// "adam_first_moment", "adam_second_moment".
struct StateBuffer {
  std::string name;
  float* data;  // backend memory
  int64_t count;
};

// A matrix tensor's auto-mode choices (kernels/auto_choice.h), optimizer state like its momentum.
struct AutoChoices {
  std::vector<MatrixChoice> matrices;  // one per matrix of the tensor's batch
  // The step (1-based, of this tensor) whose direction input the choices were decided on; they
  // apply from the next one. 0: not decided yet (the config's step count, Newton–Schulz).
  int64_t decided_at_step = 0;
  // That decision's figures, means over the matrices decided: the share of singular values left
  // below 0.6 at the chosen steps, r_min of V·Vᵀ and cos(rownormalize(V), polar(V)) (the last
  // two with direction=auto only).
  double small_sv_share = 0;
  double dominance_min = 0;
  double cosine = 0;
};

class Optimizer {
 public:
  // Validates every spec (unique non-empty names, non-empty shapes, a valid config, rank >= 2 for
  // matrix optimizers) and allocates parameters (zeros), state (zeros), gradient staging and one
  // shared workspace. Tensors with the same matrix shape and direction settings are stepped as
  // one batch.
  static absl::StatusOr<std::unique_ptr<Optimizer>> Create(Backend& backend,
                                                           std::vector<TensorSpec> tensors);

  // Backend bytes that Create would allocate for `tensors` (parameters, gradient staging, state,
  // workspace), with the same validation and errors as Create, allocating nothing.
  static absl::StatusOr<int64_t> RequiredBytes(std::vector<TensorSpec> tensors);

  ~Optimizer();

  // Backend bytes this optimizer holds.
  int64_t allocated_bytes() const;
  // How many steps were recorded as a graph (Backend::BeginRecording) rather than replayed or
  // run kernel by kernel: a recording is made when a step's shape or settings change.
  int64_t recorded_steps() const { return recordings_; }

  Backend& backend() const { return *backend_; }
  int num_tensors() const { return static_cast<int>(tensors_.size()); }
  const TensorSpec& spec(int tensor) const;
  int64_t num_elements(int tensor) const;
  // NotFound when no tensor has that name.
  absl::StatusOr<int> FindTensor(absl::string_view name) const;
  const TensorIndex& index() const { return *index_; }
  // How many steps changed this tensor.
  int64_t steps_applied(int tensor) const;
  // Number of batched groups the step runs (for tests and diagnostics).
  int num_groups() const;

  // Host <-> backend parameter copies; InvalidArgument when the size differs or (SetParameters)
  // a value is NaN or infinite, and then nothing is written.
  absl::Status SetParameters(int tensor, absl::Span<const float> values);
  // SetParameters of values the caller has already found finite (the daemon's staging checks
  // each value as it decodes it), without a second pass over them to check again.
  absl::Status SetFiniteParameters(int tensor, absl::Span<const float> values);
  absl::Status GetParameters(int tensor, absl::Span<float> out) const;
  // Elements [offset, offset + out.size()) of the tensor's parameters; InvalidArgument when the
  // range is not inside the tensor.
  absl::Status GetParameters(int tensor, int64_t offset, absl::Span<float> out) const;
  float* parameters(int tensor) const;

  // Gradient staging: upload with SetGradient, or write straight into gradient(tensor).
  absl::Status SetGradient(int tensor, absl::Span<const float> values);
  float* gradient(int tensor) const;

  // Applies the staged gradients, on the optimizer's own queue; from the second step on, as one
  // recorded graph where the backend has them (the CUDA backend). `has_gradient` (empty: all
  // true) marks tensors that got one;
  // a tensor without a gradient is skipped entirely (no momentum, no decay — the rule of torch,
  // Moonlight, MuonEq and dion). A present gradient with a NaN, an infinity or a value beyond
  // ±kMaxGradientMagnitude fails the whole step with InvalidArgument naming the tensor, before
  // anything changes.
  //
  // Every check runs before the first write, so a step commits whole or not at all as long as the
  // backend's own operations succeed; on the CPU backend none can fail after validation but the
  // SVD of the exact-polar direction (LAPACK non-convergence). Should a backend operation fail
  // mid-step, Step returns Internal and every later Step returns FailedPrecondition: the state
  // may be partly written and must be restored from a checkpoint.
  //
  // `lr`, when given, is this step's learning rate for every tensor (a worker's override; the
  // tensors' own come back after the step): InvalidArgument before anything changes when some
  // tensor's config would not validate with it (CheckStepLearningRate).
  //
  // `progress`, when given, hears how the step goes, on the calling thread: `validated` once
  // every check has passed, before the first write (from then on the step fails only as above,
  // Internal); `stepped` with tensors whose parameters are final for this step, as each group (a
  // batch, an RMNP matrix, an AdamW tensor) finishes — on a backend whose work runs as it is
  // enqueued (the CPU's; elsewhere Step synchronizes its queue before each call) — or all at the
  // end of a recorded step. The daemon streams those tensors' results while the step goes on.
  struct StepProgress {
    std::function<void()> validated;
    std::function<void(absl::Span<const int> tensors)> stepped;
  };
  absl::Status Step(absl::Span<const bool> has_gradient = {},
                    std::optional<double> lr = std::nullopt,
                    const StepProgress* progress = nullptr);
  // Whether `lr` is a valid learning rate for every tensor: InvalidArgument naming the first that
  // refuses it ("step lr <lr> for tensor '<name>': ...").
  absl::Status CheckStepLearningRate(double lr) const;

  // Asks the next Step to write the update it applies to matrix tensor `tensor` into `out`
  // (backend memory, num_elements floats): the direction after post-normalization and the scale,
  // before the learning rate and decay — u in w ← w·(1 − ηλ) − η·u — in fp32, before a preset's
  // step-dtype rounding. For that one Step only, whether it succeeds or not, and only if the
  // tensor has a gradient in it; the analyzer's snapshot uses it. InvalidArgument for an AdamW
  // tensor or a null `out`, OutOfRange for a bad index.
  absl::Status CaptureUpdate(int tensor, float* out);

  // Changes a tensor's learning rate, weight decay and momentum (AdamW: β1, the momentum that
  // torch's schedulers cycle). InvalidArgument, changing nothing, when the result is invalid.
  absl::Status SetHyperparameters(int tensor, double lr, double weight_decay, double momentum);

  // --- Prepared steps: one tensor's step computed ahead, committed with the others at once (the
  // daemon's per-tensor pipelining, ../shared/DESIGN.md "One step, as data"). ---
  //
  // PrepareTensor computes `tensor`'s step on `gradient` (host memory, num_elements floats) into
  // the tensor's shadows — a second set of its parameters and state, allocated on first use
  // (ShadowBytes) and kept — leaving its parameters and state as they are. It runs Step's own
  // stages on that tensor alone (the CPU backend's batched kernels compute each matrix of a batch
  // the same way alone), AdamW and the fused RMNP pass out of place (AdamWInto, RmnpStepInto:
  // element for element the same operations), so the bits are Step's. InvalidArgument, with
  // Step's message, for a gradient Step would refuse, or an `lr` the tensor's config refuses; on
  // any error nothing committed has changed and the tensor is not prepared. CaptureUpdate is for
  // Step alone: a prepared step captures nothing. The caller commits
  // every prepared tensor with CommitPrepared, or drops them with DiscardPrepared, before
  // anything else changes the tensors (parameters, state, hyperparameters, Step).
  absl::Status PrepareTensor(int tensor, absl::Span<const float> gradient,
                             std::optional<double> lr = std::nullopt);
  // PrepareTensor of a gradient the caller has already checked: every value finite and within
  // ±kMaxGradientMagnitude (the daemon's staging checks as it decodes). Skips the check's pass
  // over the gradient; the same bits.
  absl::Status PrepareCheckedTensor(int tensor, absl::Span<const float> gradient,
                                    std::optional<double> lr = std::nullopt);
  bool prepared(int tensor) const;
  // The new parameters of a prepared tensor (FailedPrecondition when it is not).
  absl::Status GetPreparedParameters(int tensor, absl::Span<float> out) const;
  // Every prepared tensor's step becomes its committed one: its shadows and its buffers change
  // places (no copy) and its step count goes up. Cannot fail; returns the tensors committed.
  int CommitPrepared();
  void DiscardPrepared();
  // Backend bytes of a tensor's shadows: parameters and every state buffer.
  int64_t ShadowBytes(int tensor) const;
  // Whether Step runs this tensor's direction in one batch with other tensors (a Newton–Schulz
  // or polar group of several same-shape matrices). Prepared alone, such a tensor gives the same
  // bits but the batch's parallelism is lost (on the CPU, a product's tiles spread over the
  // threads), so the daemon leaves those to the commit's Step.
  bool SteppedInABatch(int tensor) const;

  std::vector<StateBuffer> state(int tensor) const;

  // Host copies of one state buffer (by StateBuffer name), for checkpoints. NotFound for a name
  // the tensor does not have; InvalidArgument when the size differs (nothing is written then).
  absl::Status GetState(int tensor, absl::string_view buffer, absl::Span<float> out) const;
  absl::Status SetState(int tensor, absl::string_view buffer, absl::Span<const float> values);
  // Elements [offset, offset + n) of the tensor's parameters (`buffer` empty) or of one state
  // buffer, for state exported and imported in pieces. NotFound for a buffer the tensor does not
  // have; InvalidArgument, with nothing written, for a range outside it or (WriteRange) a value
  // that is NaN or infinite.
  absl::Status ReadRange(int tensor, absl::string_view buffer, int64_t offset,
                         absl::Span<float> out) const;
  absl::Status WriteRange(int tensor, absl::string_view buffer, int64_t offset,
                          absl::Span<const float> values);
  // Restores the step count of a tensor (checkpoints); InvalidArgument when negative.
  absl::Status SetStepsApplied(int tensor, int64_t steps);

  // --- The auto modes (ns.steps=auto, direction=auto): each matrix's choice is made inside the
  // step, from the matrix the direction is about to orthogonalize, in steps 1, interval,
  // 2·interval, ... of the tensor; it applies from the next step, and only a step that commits
  // changes it. Checkpoints and exports carry it. ---
  //
  // Whether the tensor has auto-mode choices (a matrix tensor with an auto mode on).
  bool has_auto_choices(int tensor) const;
  // REQUIRES: has_auto_choices(tensor).
  const AutoChoices& auto_choices(int tensor) const;
  // Restores the choices (checkpoints, imports). InvalidArgument, changing nothing, for a tensor
  // without auto modes, a count other than its batch, a step count outside the config's bounds,
  // row normalization without direction=auto, or a negative step.
  absl::Status SetAutoChoices(int tensor, AutoChoices choices);

 private:
  struct Tensor;
  struct Group;
  explicit Optimizer(Backend* backend);

  // Validates the specs and sizes tensors, groups and workspace without allocating.
  absl::Status Plan(std::vector<TensorSpec> tensors);

  absl::Status CheckIndex(int tensor) const;
  // Tensor `tensor`, checked to have `count` elements (SetParameters and SetFiniteParameters).
  absl::StatusOr<Tensor*> TensorOfSize(int tensor, size_t count);
  // PrepareTensor, and PrepareCheckedTensor (`checked`: the gradient's range check is skipped).
  absl::Status Prepare(int tensor, absl::Span<const float> gradient, std::optional<double> lr,
                       bool checked);
  // Copies `values` (its size checked) into `t`'s parameters.
  absl::Status WriteParameters(Tensor& t, absl::Span<const float> values);
  absl::StatusOr<StateBuffer> FindState(int tensor, absl::string_view buffer) const;
  // The parameters (`buffer` empty) or state buffer of ReadRange and WriteRange, checked to hold
  // [offset, offset + count).
  absl::StatusOr<StateBuffer> FindRange(int tensor, absl::string_view buffer, int64_t offset,
                                        int64_t count) const;
  // The rate and scale the update applies as lr·(scale·o); full_scale is the scale whether or
  // not a preset folds it into the rate (CaptureUpdate's).
  struct RateAndScale {
    float lr, scale, full_scale;
  };
  RateAndScale RateAndScaleOf(const Tensor& t) const;
  absl::Status CaptureScaled(const Tensor& t, float* capture, const float* o, float scale);
  // One matrix group's step: the stages below in DESIGN.md's order, batched where they can be.
  absl::Status StepGroup(const Group& group, absl::Span<const bool> present);
  // The stages for `members` of `group` (those with a gradient), batched.
  absl::Status StepMembers(const Group& group, absl::Span<Tensor* const> members);
  absl::Status MomentumStage(Tensor& t, float* u);
  absl::Status PreNormalizeStage(const Tensor& t, const MatrixBatch& u, float* scratch);
  absl::Status DirectionStage(const MatrixConfig& c, const MatrixBatch& all, float* scratch);
  // The direction stage of a group whose members have auto choices: each run of consecutive
  // matrices with the same choice as one batch.
  absl::Status AutoDirectionStage(const MatrixConfig& c, absl::Span<Tensor* const> members,
                                  float* directions, float* scratch);
  // Whether this step of `t` decides its auto choices.
  bool DecidesThisStep(const Tensor& t) const;
  // Decides t's choices from its direction input `u` (backend memory), as pending choices that
  // the step's commit makes current.
  absl::Status Decide(Tensor& t, const float* u);
  absl::Status PostNormalizeStage(Tensor& t, const MatrixBatch& o);
  absl::Status ScaleAndDecayStage(Tensor& t, const MatrixBatch& o);
  absl::Status FusedRmnpStep(Tensor& t);
  RmnpStepArgs RmnpArgsOf(const Tensor& t) const;
  absl::Status StepAdamW(Tensor& tensor);
  formulas::AdamWScalars AdamWScalarsOf(const Tensor& tensor) const;
  // The per-step scalars the kernels read from backend memory (step_scalars_): AdamW's, one per
  // AdamW tensor, then kRatesPerTensor RateScalars per matrix tensor: its step's lr and decay,
  // and the constant rates of the two ApplyUpdates that rebuild a captured direction.
  enum class RateSlot { kStep = 0, kCapture = 1, kNesterov = 2 };
  static constexpr int kRatesPerTensor = 3;
  int64_t StepScalarBytes() const;
  formulas::AdamWScalars* AdamWScalarsIn(const Tensor& tensor) const;
  // The rate region of a buffer laid out as step_scalars_ (the buffer or its host image).
  formulas::RateScalars* RatesAt(void* scalars) const;
  formulas::RateScalars* RateIn(const Tensor& tensor, RateSlot slot) const;
  std::array<formulas::RateScalars, kRatesPerTensor> RatesOf(const Tensor& tensor) const;
  // Every tensor's scalars for this step, in one upload; one tensor's (PrepareTensor).
  absl::Status UploadStepScalars();
  absl::Status UploadStepScalarsOf(const Tensor& tensor);
  // What a step's operations take of the backend's temporary memory (Backend::ReserveScratch).
  ScratchNeeds StepScratch() const;
  // Enqueues a step's work (groups, then AdamW) on queue_; with `progress`, synchronizes after
  // each group and tells progress->stepped its tensors.
  absl::Status EnqueueStep(absl::Span<const bool> present, const StepProgress* progress = nullptr);
  // Tells progress->stepped (when set) that `tensors` are final, after synchronizing the queue.
  absl::Status Stepped(const StepProgress* progress, absl::Span<const int> tensors);
  // What must match for a recorded step to be replayed.
  std::vector<uint8_t> GraphKey(absl::Span<const bool> present) const;
  // Counts a step that has run.
  absl::Status FinishStep(absl::Span<const bool> present);
  // After a backend failure mid-step: waits for the work, marks the optimizer unusable, and
  // returns Internal naming the failure.
  absl::Status Poison(const absl::Status& status);

  Backend* backend_;  // null only while RequiredBytes plans
  std::unique_ptr<TensorIndex> index_;
  std::unique_ptr<Queue> queue_;
  std::vector<std::unique_ptr<Tensor>> tensors_;
  std::vector<Group> groups_;
  Buffer workspace_;
  int64_t workspace_floats_ = 0;
  bool poisoned_ = false;
  // Recorded steps (Backend::BeginRecording): the graph of the last one, whether the backend has
  // them, and what keeps a step from being recorded.
  std::unique_ptr<StepGraph> graph_;
  std::vector<uint8_t> graph_key_;  // GraphKey of the recorded step
  bool graphs_available_ = true;
  bool has_exact_polar_ = false;
  int64_t steps_run_ = 0;
  int64_t recordings_ = 0;  // steps recorded (graphs made or updated)
  int num_adamw_ = 0;
  int num_rates_ = 0;
  Buffer step_scalars_;  // see StepScalarBytes
};

}  // namespace optd

#endif  // OPTD_KERNELS_OPTIMIZER_H_
