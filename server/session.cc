#include "server/session.h"

#include <cmath>
#include <cstring>
#include <new>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/initializers.h"
#include "kernels/status_macros.h"
#include "kernels/wire.h"
#include "server/auth.h"
#include "server/checkpoint_file.h"
#include "server/log.h"
#include "server/session_config.h"

namespace optd::server {
namespace {

absl::string_view AsBytes(absl::Span<const float> values) {
  return absl::string_view(reinterpret_cast<const char*>(values.data()),
                           values.size() * sizeof(float));
}

absl::Status CopyRecord(absl::string_view record, absl::string_view name, absl::Span<float> out) {
  if (record.size() != out.size() * sizeof(float)) {
    return absl::DataLossError(absl::StrCat("checkpoint record '", name, "' has ", record.size(),
                                            " bytes, expected ", out.size() * sizeof(float)));
  }
  std::memcpy(out.data(), record.data(), record.size());
  // A step from NaN or infinite state would return non-finite parameters: such a checkpoint
  // (crafted, or written by a build without today's checks) is refused, not loaded.
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) {
      return absl::DataLossError(
          absl::StrCat("checkpoint record '", name, "' holds a non-finite value at element ", i));
    }
  }
  return absl::OkStatus();
}

// Tensor `t` of `optimizer` from the records of the checkpointed tensor `tc`: parameters, every
// state buffer the optimizer has for it, and its applied steps.
absl::Status LoadTensorRecords(const CheckpointReader& reader, const v1::TensorCheckpoint& tc,
                               int t, Optimizer& optimizer) {
  std::vector<float> values;
  const std::string params_name = absl::StrCat("params/", tc.name());
  OPTD_ASSIGN_OR_RETURN(absl::string_view params, reader.Find(params_name));
  values.resize(static_cast<size_t>(optimizer.num_elements(t)));
  OPTD_RETURN_IF_ERROR(CopyRecord(params, params_name, absl::MakeSpan(values)));
  OPTD_RETURN_IF_ERROR(optimizer.SetParameters(t, values));
  for (const StateBuffer& buffer : optimizer.state(t)) {
    const std::string name = absl::StrCat("state/", tc.name(), "/", buffer.name);
    OPTD_ASSIGN_OR_RETURN(absl::string_view record, reader.Find(name));
    values.resize(static_cast<size_t>(buffer.count));
    OPTD_RETURN_IF_ERROR(CopyRecord(record, name, absl::MakeSpan(values)));
    OPTD_RETURN_IF_ERROR(optimizer.SetState(t, buffer.name, values));
  }
  return optimizer.SetStepsApplied(t, tc.steps_applied());
}

const v1::GroupConfig* FindGroup(const v1::SessionConfig& config, absl::string_view name) {
  for (const v1::GroupConfig& g : config.groups()) {
    if (g.name() == name) return &g;
  }
  return nullptr;
}

}  // namespace

struct Session::Snapshot {
  AnalysisJob job;
  int64_t bytes = 0;
  std::vector<int> tensors;     // session index of each job tensor
  std::vector<Buffer> updates;  // backend memory the step captures each update into
};

struct Session::Loaded {
  std::unique_ptr<Optimizer> optimizer;
  int64_t step = 0;
  std::map<std::string, v1::GroupHyperparams> hyperparams;
};

Session::Session(Backend& backend, std::string id, v1::SessionConfig config,
                 std::string token_digest, SessionOptions options)
    : backend_(backend),
      id_(std::move(id)),
      config_(std::move(config)),
      token_digest_(std::move(token_digest)),
      options_(std::move(options)) {
  for (const v1::TensorConfig& t : config_.tensors()) {
    names_.push_back(t.name());
    counts_.push_back(*ElementCount(t.shape()));
    dtypes_.push_back(*FromWireDType(t.dtype()));
    int group = 0;
    while (config_.groups(group).name() != t.group()) ++group;
    group_of_.push_back(group);
  }
  Touch();
}

Session::~Session() = default;

std::string Session::CheckpointPath(const std::string& state_dir, const std::string& id) {
  return absl::StrCat(state_dir, "/", id, "/checkpoint");
}

absl::StatusOr<int64_t> Session::RequiredBytes(const v1::SessionConfig& config) {
  OPTD_ASSIGN_OR_RETURN(std::vector<TensorSpec> specs, TensorSpecs(config));
  int64_t elements = 0;
  for (const TensorSpec& spec : specs) {
    OPTD_ASSIGN_OR_RETURN(const int64_t count, ElementCount(spec.shape));
    if (__builtin_add_overflow(elements, count, &elements)) {
      return absl::ResourceExhaustedError("the session's tensors hold more than 2^63 elements");
    }
  }
  OPTD_ASSIGN_OR_RETURN(int64_t optimizer, Optimizer::RequiredBytes(std::move(specs)));
  const int64_t result = config.step_result() == v1::STEP_RESULT_NONE ? 0 : 2;
  // Staging: one per worker plus one for a retry or an upload (AcquireStaging's limit).
  const int64_t staging = std::max(1, config.world_size()) + 1;
  int64_t host = 0, total = 0;
  if (__builtin_mul_overflow((staging + result) * static_cast<int64_t>(sizeof(float)), elements,
                             &host) ||
      __builtin_add_overflow(optimizer, host, &total)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the session's ", elements, " elements with world_size ", config.world_size(),
                     " need more than 2^63 bytes"));
  }
  return total;
}

absl::StatusOr<std::unique_ptr<Session>> Session::Create(Backend& backend, std::string id,
                                                         v1::SessionConfig config,
                                                         std::string token_digest,
                                                         SessionOptions options) {
  OPTD_ASSIGN_OR_RETURN(std::vector<TensorSpec> specs, TensorSpecs(config));
  OPTD_ASSIGN_OR_RETURN(std::unique_ptr<Optimizer> optimizer,
                        Optimizer::Create(backend, std::move(specs)));
  for (int t = 0; t < config.tensors_size(); ++t) {
    const v1::TensorConfig& tensor = config.tensors(t);
    if (!tensor.has_normal()) continue;
    std::vector<float> values(static_cast<size_t>(optimizer->num_elements(t)));
    FillNormal(tensor.normal().seed(), tensor.normal().mean(), tensor.normal().std(),
               absl::MakeSpan(values));
    OPTD_RETURN_IF_ERROR(optimizer->SetParameters(t, values));
  }
  std::unique_ptr<Session> session(new Session(backend, std::move(id), std::move(config),
                                               std::move(token_digest), std::move(options)));
  OPTD_RETURN_IF_ERROR(session->Initialize(std::move(optimizer)));
  absl::MutexLock lock(&session->mu_);
  session->ExportStateLocked();
  return session;
}

absl::Status Session::Initialize(std::unique_ptr<Optimizer> optimizer) {
  OPTD_ASSIGN_OR_RETURN(state_bytes_, RequiredBytes(config_));
  std::set<std::string> presets;
  for (int t = 0; t < num_tensors(); ++t) {
    if (optimizer->spec(t).config.algorithm == Algorithm::kMatrix) {
      presets.insert(config_.groups(group_of_[t]).preset());
    }
  }
  optimizer_label_ = presets.empty() ? "adamw" : absl::StrJoin(presets, "+");
  absl::MutexLock lock(&mu_);
  optimizer_ = std::move(optimizer);
  for (int t = 0; t < num_tensors(); ++t) {
    const v1::GroupConfig& group = config_.groups(group_of_[t]);
    if (hyperparams_.contains(group.name())) continue;
    const OptimizerConfig& c = optimizer_->spec(t).config;
    v1::GroupHyperparams& h = hyperparams_[group.name()];
    h.set_group(group.name());
    h.set_lr(c.lr);
    h.set_weight_decay(c.weight_decay);
    h.set_momentum(c.algorithm == Algorithm::kAdamW ? c.adamw.beta1 : c.matrix.momentum);
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::SessionCheckpoint> Session::ReadCheckpointMeta(FileSystem& fs,
                                                                  const std::string& path) {
  OPTD_ASSIGN_OR_RETURN(CheckpointReader reader, CheckpointReader::Open(fs, path));
  OPTD_ASSIGN_OR_RETURN(absl::string_view meta_bytes, reader.Find("meta"));
  v1::SessionCheckpoint meta;
  if (!meta.ParseFromArray(meta_bytes.data(), static_cast<int>(meta_bytes.size()))) {
    return absl::DataLossError(absl::StrCat(path, ": the meta record does not parse"));
  }
  return meta;
}

absl::StatusOr<Session::Loaded> Session::LoadCheckpoint(const std::string& path) {
  OPTD_ASSIGN_OR_RETURN(CheckpointReader reader, CheckpointReader::Open(*options_.fs, path));
  OPTD_ASSIGN_OR_RETURN(absl::string_view meta_bytes, reader.Find("meta"));
  v1::SessionCheckpoint meta;
  if (!meta.ParseFromArray(meta_bytes.data(), static_cast<int>(meta_bytes.size()))) {
    return absl::DataLossError(absl::StrCat(path, ": the meta record does not parse"));
  }
  if (meta.session_id() != id_ || !DigestsEqual(meta.token_sha256(), token_digest_) ||
      meta.tensors_size() != num_tensors() || meta.step() < 0) {
    return absl::DataLossError(absl::StrCat(path, " holds session '", meta.session_id(), "' with ",
                                            meta.tensors_size(), " tensors at step ", meta.step(),
                                            "; expected session '", id_, "' with ", num_tensors(),
                                            " tensors"));
  }
  OPTD_ASSIGN_OR_RETURN(std::vector<TensorSpec> specs, TensorSpecs(config_));
  Loaded loaded;
  OPTD_ASSIGN_OR_RETURN(loaded.optimizer, Optimizer::Create(backend_, std::move(specs)));
  for (int t = 0; t < num_tensors(); ++t) {
    const v1::TensorCheckpoint& tc = meta.tensors(t);
    if (tc.name() != names_[t]) {
      return absl::DataLossError(
          absl::StrCat(path, ": tensor ", t, " is '", tc.name(), "', expected '", names_[t], "'"));
    }
    OPTD_RETURN_IF_ERROR(LoadTensorRecords(reader, tc, t, *loaded.optimizer));
  }
  loaded.step = meta.step();
  for (const v1::GroupHyperparams& h : meta.hyperparams()) loaded.hyperparams[h.group()] = h;
  absl::Status applied = ApplyHyperparams(*loaded.optimizer, loaded.hyperparams);
  if (!applied.ok()) {
    return absl::DataLossError(
        absl::StrCat(path, ": its hyperparameters do not validate: ", applied.message()));
  }
  return loaded;
}

absl::StatusOr<std::unique_ptr<Session>> Session::Load(Backend& backend, const std::string& path,
                                                       SessionOptions options) {
  if (options.fs == nullptr) return absl::InvalidArgumentError("Session::Load needs a FileSystem");
  OPTD_ASSIGN_OR_RETURN(v1::SessionCheckpoint meta, ReadCheckpointMeta(*options.fs, path));
  v1::SessionConfig config = meta.config();
  absl::Status valid = NormalizeSessionConfig(config);
  if (!valid.ok()) {
    return absl::DataLossError(
        absl::StrCat(path, ": the config does not validate: ", valid.message()));
  }
  std::unique_ptr<Session> session(new Session(backend, meta.session_id(), std::move(config),
                                               meta.token_sha256(), std::move(options)));
  OPTD_ASSIGN_OR_RETURN(Loaded loaded, session->LoadCheckpoint(path));
  OPTD_RETURN_IF_ERROR(session->Initialize(std::move(loaded.optimizer)));
  absl::MutexLock lock(&session->mu_);
  for (const auto& [name, h] : loaded.hyperparams) session->hyperparams_[name] = h;
  session->step_ = loaded.step;
  session->checkpoint_step_ = loaded.step;
  session->step_published_ = loaded.step;
  session->checkpoint_step_published_ = loaded.step;
  session->ExportStateLocked();
  return session;
}

absl::StatusOr<std::unique_ptr<Session>> Session::Restored(
    Backend& backend, std::string id, v1::SessionConfig config, std::string token_digest,
    SessionOptions options, const std::vector<CheckpointSourcePath>& sources) {
  if (options.fs == nullptr) {
    return absl::InvalidArgumentError("Session::Restored needs a FileSystem");
  }
  if (sources.empty()) return absl::InvalidArgumentError("no checkpoint to restore from");
  // Every source read and checked whole before anything is built.
  std::vector<CheckpointReader> readers;
  std::vector<v1::SessionCheckpoint> metas;
  for (const CheckpointSourcePath& source : sources) {
    absl::StatusOr<CheckpointReader> reader = CheckpointReader::Open(*options.fs, source.path);
    if (absl::IsNotFound(reader.status())) {
      return absl::NotFoundError(
          absl::StrCat("there is no checkpoint of ", source.label, " at ", source.path));
    }
    OPTD_RETURN_IF_ERROR(reader.status());
    OPTD_ASSIGN_OR_RETURN(absl::string_view meta_bytes, reader->Find("meta"));
    v1::SessionCheckpoint& meta = metas.emplace_back();
    if (!meta.ParseFromArray(meta_bytes.data(), static_cast<int>(meta_bytes.size()))) {
      return absl::DataLossError(absl::StrCat(source.path, ": the meta record does not parse"));
    }
    readers.push_back(*std::move(reader));
  }
  const int64_t step = metas[0].step();
  const int64_t epoch = metas[0].config().placement_epoch();
  for (size_t s = 1; s < sources.size(); ++s) {
    if (metas[s].step() != step) {
      return absl::FailedPreconditionError(absl::StrCat(
          sources[0].label, " was checkpointed at step ", step, " but ", sources[s].label,
          " at step ", metas[s].step(), "; checkpoint every part at the same step"));
    }
    if (metas[s].config().placement_epoch() != epoch) {
      return absl::FailedPreconditionError(absl::StrCat(
          sources[0].label, " was placed at epoch ", epoch, " but ", sources[s].label, " at epoch ",
          metas[s].config().placement_epoch(), "; restore from the parts of one placement"));
    }
  }
  if (config.placement_epoch() <= epoch && (epoch != 0 || config.placement_epoch() != 0)) {
    return absl::FailedPreconditionError(
        absl::StrCat("the checkpoints were placed at epoch ", epoch, "; a session restored from ",
                     "them needs a later placement epoch, not ", config.placement_epoch()));
  }
  // Each checkpointed tensor by name: (source, its entry in the meta, its config).
  struct Found {
    size_t source;
    const v1::TensorCheckpoint* checkpoint;
    const v1::TensorConfig* config;
  };
  std::map<std::string, Found, std::less<>> found;
  for (size_t s = 0; s < sources.size(); ++s) {
    const v1::SessionCheckpoint& meta = metas[s];
    if (meta.tensors_size() != meta.config().tensors_size()) {
      return absl::DataLossError(absl::StrCat(sources[s].path, " lists ", meta.tensors_size(),
                                              " tensors for a config of ",
                                              meta.config().tensors_size()));
    }
    for (int t = 0; t < meta.tensors_size(); ++t) {
      auto [it, added] = found.try_emplace(meta.tensors(t).name(),
                                           Found{s, &meta.tensors(t), &meta.config().tensors(t)});
      if (!added) {
        return absl::FailedPreconditionError(
            absl::StrCat("tensor '", meta.tensors(t).name(), "' is in both ",
                         sources[it->second.source].label, " and ", sources[s].label));
      }
    }
  }
  std::unique_ptr<Session> session(new Session(backend, std::move(id), std::move(config),
                                               std::move(token_digest), std::move(options)));
  const v1::SessionConfig& target = session->config_;
  std::map<std::string, v1::GroupHyperparams> hyperparams;
  std::map<std::string, size_t> hyperparams_from;  // group -> the source its values came from
  for (int t = 0; t < session->num_tensors(); ++t) {
    const v1::TensorConfig& want = target.tensors(t);
    auto it = found.find(want.name());
    if (it == found.end()) {
      return absl::FailedPreconditionError(absl::StrCat("tensor '", want.name(), "' is in none of ",
                                                        "the ", sources.size(),
                                                        " checkpoints restored from"));
    }
    const Found& f = it->second;
    const v1::SessionCheckpoint& meta = metas[f.source];
    const v1::GroupConfig& group = *FindGroup(target, want.group());
    const v1::GroupConfig* had = FindGroup(meta.config(), f.config->group());
    auto shape = [](const v1::TensorConfig& c) { return absl::StrJoin(c.shape(), "x"); };
    std::string differs;
    if (shape(want) != shape(*f.config)) {
      differs = absl::StrCat("shape ", shape(*f.config), " there, ", shape(want), " here");
    } else if (want.dtype() != f.config->dtype()) {
      differs = absl::StrCat("dtype ", v1::DType_Name(f.config->dtype()), " there, ",
                             v1::DType_Name(want.dtype()), " here");
    } else if (want.rank_policy() != f.config->rank_policy()) {
      differs = "another rank policy";
    } else if (had == nullptr || had->preset() != group.preset() ||
               had->overrides_size() != group.overrides_size()) {
      differs = absl::StrCat("preset '", had == nullptr ? "" : had->preset(), "' there, '",
                             group.preset(), "' here (or other overrides)");
    } else {
      for (int o = 0; o < group.overrides_size(); ++o) {
        if (had->overrides(o).key() != group.overrides(o).key() ||
            had->overrides(o).value() != group.overrides(o).value()) {
          differs = absl::StrCat("override ", had->overrides(o).key(), "=",
                                 had->overrides(o).value(), " there, ", group.overrides(o).key(),
                                 "=", group.overrides(o).value(), " here");
          break;
        }
      }
    }
    if (!differs.empty()) {
      return absl::FailedPreconditionError(absl::StrCat("tensor '", want.name(),
                                                        "' does not match its checkpoint in ",
                                                        sources[f.source].label, ": ", differs));
    }
    for (const v1::GroupHyperparams& h : meta.hyperparams()) {
      if (h.group() != f.config->group()) continue;
      v1::GroupHyperparams mine = h;
      mine.set_group(group.name());
      auto [have, added] = hyperparams.try_emplace(group.name(), mine);
      if (!added && (have->second.lr() != h.lr() || have->second.momentum() != h.momentum() ||
                     have->second.weight_decay() != h.weight_decay())) {
        return absl::FailedPreconditionError(absl::StrCat(
            "group '", group.name(), "' has other hyperparameters in ",
            sources[hyperparams_from[group.name()]].label, " than in ", sources[f.source].label));
      }
      hyperparams_from.try_emplace(group.name(), f.source);
    }
  }
  OPTD_ASSIGN_OR_RETURN(std::vector<TensorSpec> specs, TensorSpecs(target));
  OPTD_ASSIGN_OR_RETURN(std::unique_ptr<Optimizer> optimizer,
                        Optimizer::Create(backend, std::move(specs)));
  for (int t = 0; t < session->num_tensors(); ++t) {
    const Found& f = found.find(target.tensors(t).name())->second;
    OPTD_RETURN_IF_ERROR(LoadTensorRecords(readers[f.source], *f.checkpoint, t, *optimizer));
  }
  OPTD_RETURN_IF_ERROR(session->ApplyHyperparams(*optimizer, hyperparams));
  OPTD_RETURN_IF_ERROR(session->Initialize(std::move(optimizer)));
  absl::MutexLock lock(&session->mu_);
  for (const auto& [name, h] : hyperparams) session->hyperparams_[name] = h;
  session->step_ = step;
  session->step_published_ = step;
  session->ExportStateLocked();
  return session;
}

absl::StatusOr<int> Session::FindTensor(absl::string_view name) const {
  for (int t = 0; t < num_tensors(); ++t) {
    if (names_[t] == name) return t;
  }
  return absl::NotFoundError(absl::StrCat("session '", id_, "' has no tensor '", name, "'"));
}

void Session::Touch() { last_used_ns_ = absl::ToUnixNanos(absl::Now()); }

absl::StatusOr<std::unique_ptr<TensorStaging>> Session::AcquireStaging() {
  {
    absl::MutexLock lock(&staging_mu_);
    // Bounded so that no client can make a session hold more staging than its quota counted.
    const int limit = config_.world_size() + 1;
    if (staging_outstanding_ >= limit) {
      return absl::UnavailableError(absl::StrCat(
          "session '", id_, "' already has ", staging_outstanding_,
          " gradient or parameter streams open, its limit (world_size + 1); retry when they "
          "finish"));
    }
    ++staging_outstanding_;
    if (!free_staging_.empty()) {
      std::unique_ptr<TensorStaging> staging = std::move(free_staging_.back());
      free_staging_.pop_back();
      staging->Reset();
      return staging;
    }
  }
  try {
    return std::make_unique<TensorStaging>(names_, counts_);
  } catch (const std::bad_alloc&) {
    absl::MutexLock lock(&staging_mu_);
    --staging_outstanding_;
    return absl::ResourceExhaustedError(
        absl::StrCat("session '", id_, "': no host memory for another gradient staging buffer"));
  }
}

void Session::ReleaseStaging(std::unique_ptr<TensorStaging> staging) {
  if (staging == nullptr) return;
  absl::MutexLock lock(&staging_mu_);
  --staging_outstanding_;
  free_staging_.push_back(std::move(staging));
}

absl::Duration Session::straggler_timeout() const {
  if (config_.straggler_timeout_seconds() > 0) {
    return absl::Seconds(config_.straggler_timeout_seconds());
  }
  return options_.default_straggler_timeout;
}

void Session::MarkDeleted() {
  absl::MutexLock lock(&mu_);
  deleted_ = true;
  if (!contributions_.empty()) {
    EndRoundLocked(absl::NotFoundError(absl::StrCat("session '", id_, "' was deleted")));
  }
}

absl::Status Session::CheckUsableLocked() const {
  if (deleted_) return absl::NotFoundError(absl::StrCat("session '", id_, "' was deleted"));
  if (!damaged_.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("session '", id_, "' was damaged by a failed step (", damaged_.message(),
                     "); Restore it from its checkpoint"));
  }
  return absl::OkStatus();
}

absl::Status Session::CheckStepHeader(const v1::StepHeader& header) {
  absl::MutexLock lock(&mu_);
  return CheckStepHeaderLocked(header);
}

absl::Status Session::CheckStepHeaderLocked(const v1::StepHeader& header) {
  OPTD_RETURN_IF_ERROR(CheckUsableLocked());
  if (header.worker_id() < 0 || header.worker_id() >= config_.world_size()) {
    return absl::InvalidArgumentError(absl::StrCat("worker_id ", header.worker_id(),
                                                   " is outside [0, ", config_.world_size(),
                                                   ") for session '", id_, "'"));
  }
  if (header.placement_epoch() != 0 && header.placement_epoch() != config_.placement_epoch()) {
    return absl::FailedPreconditionError(
        absl::StrCat("session '", id_, "' was placed at epoch ", config_.placement_epoch(),
                     "; worker ", header.worker_id(), " steps with placement epoch ",
                     header.placement_epoch(), " (a stale placement: recompute it)"));
  }
  if (header.step() == step_ && last_outcome_ != nullptr) return absl::OkStatus();
  if (header.step() != step_ + 1) {
    return WithRejectionReason(
        absl::FailedPreconditionError(absl::StrCat(
            "session '", id_, "' expects step ", step_ + 1, " (it has completed ", step_,
            " steps); worker ", header.worker_id(), " sent step ", header.step())),
        "wrong_step");
  }
  if (header.has_lr()) {
    for (int t = 0; t < num_tensors(); ++t) {
      OptimizerConfig c = optimizer_->spec(t).config;
      c.lr = header.lr();
      absl::Status valid = ValidateOptimizerConfig(c);
      if (!valid.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("step lr ", header.lr(), " for tensor '",
                                                       names_[t], "': ", valid.message()));
      }
    }
  }
  return absl::OkStatus();
}

bool Session::StepUnderway(int64_t step) {
  absl::MutexLock lock(&mu_);
  return (step == step_ + 1 && !contributions_.empty()) ||
         (step == step_ && last_outcome_ != nullptr);
}

absl::StatusOr<StepReply> Session::Step(const v1::StepHeader& header,
                                        std::unique_ptr<TensorStaging> gradients,
                                        const std::function<bool()>& cancelled) {
  Touch();
  absl::MutexLock lock(&mu_);
  absl::Status valid = CheckStepHeaderLocked(header);
  if (!valid.ok()) {
    ReleaseStaging(std::move(gradients));
    return valid;
  }
  if (header.step() == step_) {
    ReleaseStaging(std::move(gradients));
    return StepReply{Lease(last_outcome_), true};
  }
  const int worker = header.worker_id();
  const bool replayed = contributions_.contains(worker);
  if (replayed) {
    // A retry of a contribution already counted: wait for the step without counting it again.
    ReleaseStaging(std::move(gradients));
  } else {
    if (!contributions_.empty()) {
      const TensorStaging& first = *contributions_.begin()->second;
      if (first.PresentTensors() != gradients->PresentTensors()) {
        std::vector<std::string> mine, theirs;
        for (int t : gradients->PresentTensors()) mine.push_back(names_[t]);
        for (int t : first.PresentTensors()) theirs.push_back(names_[t]);
        ReleaseStaging(std::move(gradients));
        return absl::InvalidArgumentError(absl::StrCat(
            "worker ", worker, " sent gradients for {", absl::StrJoin(mine, ", "), "} but worker ",
            contributions_.begin()->first, " sent {", absl::StrJoin(theirs, ", "), "} for step ",
            header.step(), " of session '", id_, "'; every worker must send the same tensors"));
      }
    }
    const std::optional<double> lr =
        header.has_lr() ? std::optional<double>(header.lr()) : std::nullopt;
    if (!contributions_.empty() && lr != round_lr_) {
      ReleaseStaging(std::move(gradients));
      return absl::InvalidArgumentError(absl::StrCat(
          "worker ", worker, " sent lr ", lr ? absl::StrCat(*lr) : "none", " but worker ",
          contributions_.begin()->first, " sent lr ", round_lr_ ? absl::StrCat(*round_lr_) : "none",
          " for step ", header.step(), " of session '", id_, "'; every worker must send the same"));
    }
    if (cancelled()) {
      ReleaseStaging(std::move(gradients));
      return absl::CancelledError("the step call was cancelled before its gradients counted");
    }
    if (contributions_.empty()) {
      round_deadline_ = absl::Now() + straggler_timeout();
      round_lr_ = lr;
    }
    contributions_[worker] = std::move(gradients);
    workers_pending_published_ = static_cast<int>(contributions_.size());
    if (static_cast<int>(contributions_.size()) == config_.world_size()) {
      // Out of host memory before the optimizer ran (the result buffers; the snapshot and the
      // checkpoint after it catch their own), nothing was applied: the round ends with the error.
      absl::StatusOr<std::shared_ptr<StepOutcome>> result = absl::ResourceExhaustedError(
          absl::StrCat("session '", id_, "' step ", header.step(),
                       ": no host memory for the step's results; nothing was applied"));
      try {
        result = CommitLocked(header);
      } catch (const std::bad_alloc&) {
        spare_outcome_ = nullptr;
      }
      EndRoundLocked(result);
      if (!result.ok()) return result.status();
      return StepReply{Lease(*result), false};
    }
  }
  const int64_t my_round = round_;
  ++waiters_[worker];
  while (round_ == my_round) {
    const absl::Duration poll = absl::Milliseconds(50);
    const absl::Duration left = round_deadline_ - absl::Now();
    round_done_.WaitWithTimeout(&mu_, std::min(poll, std::max(left, absl::ZeroDuration())));
    if (round_ != my_round) break;
    if (cancelled()) {
      // Withdraw only when no other stream of this worker (an earlier attempt or a retry) still
      // waits on the contribution.
      if (--waiters_[worker] == 0) {
        waiters_.erase(worker);
        auto it = contributions_.find(worker);
        if (it != contributions_.end()) {
          ReleaseStaging(std::move(it->second));
          contributions_.erase(it);
        }
        workers_pending_published_ = static_cast<int>(contributions_.size());
      }
      return absl::CancelledError(
          absl::StrCat("the step call was cancelled while waiting for the other workers; worker ",
                       worker, "'s gradients for step ", header.step(), " are withdrawn"));
    }
    if (absl::Now() >= round_deadline_) {
      std::vector<int> missing;
      for (int w = 0; w < config_.world_size(); ++w) {
        if (!contributions_.contains(w)) missing.push_back(w);
      }
      EndRoundLocked(absl::AbortedError(absl::StrCat(
          "step ", header.step(), " of session '", id_, "' aborted: worker(s) ",
          absl::StrJoin(missing, ", "), " sent no gradients within the straggler timeout of ",
          absl::FormatDuration(straggler_timeout()), "; nothing was applied")));
      break;
    }
  }
  if (finished_round_ != my_round) {
    return absl::InternalError("step round bookkeeping lost a round");
  }
  if (!finished_result_.ok()) return finished_result_.status();
  return StepReply{Lease(*finished_result_), replayed};
}

std::shared_ptr<const StepOutcome> Session::Lease(const std::shared_ptr<StepOutcome>& outcome) {
  outcome->leases.fetch_add(1, std::memory_order_relaxed);
  return std::shared_ptr<const StepOutcome>(outcome.get(), [keep = outcome](const StepOutcome*) {
    keep->leases.fetch_sub(1, std::memory_order_release);
  });
}

void Session::EndRoundLocked(absl::StatusOr<std::shared_ptr<StepOutcome>> result) {
  for (auto& [worker, staging] : contributions_) ReleaseStaging(std::move(staging));
  contributions_.clear();
  waiters_.clear();
  workers_pending_published_ = 0;
  finished_round_ = round_;
  finished_result_ = std::move(result);
  ++round_;
  round_done_.SignalAll();
}

absl::StatusOr<std::shared_ptr<StepOutcome>> Session::CommitLocked(const v1::StepHeader& header) {
  std::shared_ptr<StepOutcome> outcome;
  if (spare_outcome_ != nullptr && spare_outcome_->leases.load(std::memory_order_acquire) == 0) {
    // No reader is left (their last reads happen before this load), so the buffers can be
    // overwritten; sizes stay and every element is written below.
    outcome = std::move(spare_outcome_);
    outcome->step = 0;
    outcome->skipped = false;
    outcome->tensors_updated = 0;
    outcome->nonfinite_values = 0;
    outcome->checkpoint_error.clear();
  } else {
    outcome = std::make_shared<StepOutcome>();
  }
  spare_outcome_ = nullptr;
  outcome->step = header.step();
  outcome->result = config_.step_result();
  for (const auto& [worker, staging] : contributions_) {
    outcome->nonfinite_values += staging->out_of_range_values();
  }
  const std::vector<int> present = contributions_.begin()->second->PresentTensors();
  outcome->compute_started = absl::Now();  // ApplyLocked moves it past the mean
  if (outcome->nonfinite_values > 0) {
    // Only reachable under NON_FINITE_POLICY_SKIP_STEP: the stream rejects them otherwise.
    outcome->skipped = true;
  } else {
    OPTD_RETURN_IF_ERROR(ApplyLocked(header, present, *outcome));
  }
  if (outcome->skipped && outcome->result != v1::STEP_RESULT_NONE) {
    outcome->values.resize(num_tensors());
    for (int t = 0; t < num_tensors(); ++t) {
      outcome->values[t].assign(static_cast<size_t>(counts_[t]), 0.0f);
      if (outcome->result == v1::STEP_RESULT_PARAMETERS) {
        OPTD_RETURN_IF_ERROR(optimizer_->GetParameters(t, absl::MakeSpan(outcome->values[t])));
      }
    }
  }
  outcome->compute_finished = absl::Now();
  step_ = header.step();
  step_published_ = step_;
  ExportStateLocked();
  if (outcome->nonfinite_values > 0) CountNonFinite(outcome->nonfinite_values);
  spare_outcome_ = std::move(last_outcome_);
  last_outcome_ = outcome;
  if (config_.checkpoint_interval() > 0 && !options_.state_dir.empty() &&
      step_ % config_.checkpoint_interval() == 0) {
    // The step has committed in memory; if its checkpoint fails the reply says so (the step is
    // not durable: a daemon killed now restarts from checkpoint_step), and it is counted and
    // logged. The last good checkpoint stays in place.
    absl::StatusOr<CheckpointInfo> written = CheckpointLocked();
    if (!written.ok()) outcome->checkpoint_error = std::string(written.status().message());
  }
  outcome->checkpoint_step = checkpoint_step_;
  return outcome;
}

absl::Status Session::ApplyLocked(const v1::StepHeader& header, const std::vector<int>& present,
                                  StepOutcome& outcome) {
  std::vector<const float*> inputs;
  for (int t : present) {
    inputs.clear();
    for (const auto& [worker, staging] : contributions_) inputs.push_back(staging->data(t));
    float* mean = contributions_.begin()->second->data(t);
    MeanOfWorkers(inputs, absl::MakeSpan(mean, static_cast<size_t>(counts_[t])));
    OPTD_RETURN_IF_ERROR(
        optimizer_->SetGradient(t, absl::MakeConstSpan(mean, static_cast<size_t>(counts_[t]))));
  }
  if (outcome.result != v1::STEP_RESULT_NONE) {
    outcome.values.resize(num_tensors());
    for (int t = 0; t < num_tensors(); ++t) {
      outcome.values[t].resize(static_cast<size_t>(counts_[t]));
      if (outcome.result == v1::STEP_RESULT_DELTA) {
        OPTD_RETURN_IF_ERROR(optimizer_->GetParameters(t, absl::MakeSpan(outcome.values[t])));
      }
    }
  }
  // A plain bool array: absl::Span cannot view std::vector<bool>.
  const size_t n = names_.size();
  std::unique_ptr<bool[]> has_gradient = std::make_unique<bool[]>(n);
  for (int t : present) has_gradient[t] = true;
  if (header.has_lr()) {
    for (int t = 0; t < num_tensors(); ++t) {
      const v1::GroupHyperparams& h = hyperparams_.at(config_.groups(group_of_[t]).name());
      OPTD_RETURN_IF_ERROR(
          optimizer_->SetHyperparameters(t, header.lr(), h.weight_decay(), h.momentum()));
    }
  }
  outcome.compute_started = absl::Now();
  std::optional<Snapshot> snapshot = StartSnapshotLocked(header.step(), present);
  absl::Status stepped = optimizer_->Step(absl::MakeConstSpan(has_gradient.get(), n));
  const absl::Status restored =
      header.has_lr() ? SetHyperparamsLocked(hyperparams_) : absl::OkStatus();
  if (!stepped.ok()) {
    if (snapshot.has_value()) options_.analyzer->Release(snapshot->job.session, snapshot->bytes);
    if (stepped.code() == absl::StatusCode::kInternal) damaged_ = stepped;
    return stepped;
  }
  // The state has changed: a failure from here on would leave the step count behind the state
  // (a retry would apply the step twice), so it damages the session.
  absl::Status finished = restored.ok() ? ReadResultLocked(outcome) : restored;
  if (finished.ok() && snapshot.has_value()) {
    finished = FinishSnapshotLocked(*std::move(snapshot));
  } else if (snapshot.has_value()) {
    options_.analyzer->Release(snapshot->job.session, snapshot->bytes);
  }
  if (!finished.ok()) {
    damaged_ = finished;
    return finished;
  }
  outcome.tensors_updated = static_cast<int>(present.size());
  return absl::OkStatus();
}

std::optional<Session::Snapshot> Session::StartSnapshotLocked(int64_t step,
                                                              const std::vector<int>& present) {
  const int64_t interval = config_.analysis_interval();
  if (options_.analyzer == nullptr || interval == 0 || step % interval != 0) return std::nullopt;
  Snapshot snapshot;
  for (int t : present) {
    const TensorSpec& spec = optimizer_->spec(t);
    if (spec.config.algorithm != Algorithm::kMatrix) continue;
    const absl::StatusOr<MatrixView> view = MatrixViewOf(spec.shape, spec.rank_policy);
    if (!view.ok() || view->rows < 2) continue;  // no dominance ratio for a single row
    snapshot.tensors.push_back(t);
    snapshot.bytes += 3 * counts_[t] * static_cast<int64_t>(sizeof(float));
  }
  // Keyed by the session and its restores: an analysis still running for steps a Restore undid
  // does not hold up the first analysis after it (its figures will be dropped anyway).
  snapshot.job.session = absl::StrCat(id_, "#", restores_.load());
  if (snapshot.tensors.empty() ||
      !options_.analyzer->Reserve(snapshot.job.session, snapshot.bytes)) {
    return std::nullopt;
  }
  snapshot.job.step = step;
  // Every host buffer the snapshot needs is allocated here, before the step changes anything:
  // out of memory, the step goes on without an analysis.
  try {
    AllocateSnapshotLocked(snapshot);
  } catch (const std::bad_alloc&) {
    snapshot.updates.clear();
  }
  if (snapshot.updates.size() != snapshot.tensors.size()) {
    options_.analyzer->Release(snapshot.job.session, snapshot.bytes);
    return std::nullopt;  // no analysis this time; the step goes on
  }
  // Every buffer is in place: the step writes each update it applies into one
  // (Optimizer::CaptureUpdate), exact at any learning rate, where the parameters differenced over
  // lr would not be. It cannot fail for a matrix tensor of this session and a buffer.
  for (size_t i = 0; i < snapshot.tensors.size(); ++i) {
    optimizer_->CaptureUpdate(snapshot.tensors[i], snapshot.updates[i].f32()).IgnoreError();
  }
  return snapshot;
}

void Session::AllocateSnapshotLocked(Snapshot& snapshot) {
  for (int t : snapshot.tensors) {
    const TensorSpec& spec = optimizer_->spec(t);
    const MatrixView view = *MatrixViewOf(spec.shape, spec.rank_policy);
    TensorSnapshot& s = snapshot.job.tensors.emplace_back();
    s.name = names_[t];
    s.batch = view.batch;
    s.rows = view.rows;
    s.cols = view.cols;
    s.newton_schulz = spec.config.matrix.newton_schulz;
    const size_t count = static_cast<size_t>(counts_[t]);
    const float* gradient = contributions_.begin()->second->data(t);  // the workers' mean
    s.gradient.assign(gradient, gradient + count);
    s.momentum.resize(count);
    s.update.resize(count);
    absl::StatusOr<Buffer> update = backend_.Allocate(count * sizeof(float));
    if (!update.ok()) return;  // fewer updates than tensors: no analysis
    snapshot.updates.push_back(*std::move(update));
  }
}

absl::Status Session::FinishSnapshotLocked(Snapshot snapshot) {
  for (size_t i = 0; i < snapshot.tensors.size(); ++i) {
    const int t = snapshot.tensors[i];
    TensorSnapshot& s = snapshot.job.tensors[i];  // sized by AllocateSnapshotLocked
    absl::Status read = optimizer_->GetState(t, "momentum", absl::MakeSpan(s.momentum));
    if (read.ok()) {
      read = backend_.Download(backend_.default_queue(), s.update.data(),
                               snapshot.updates[i].data(), s.update.size() * sizeof(float));
    }
    if (read.ok()) read = backend_.Synchronize(backend_.default_queue());
    if (!read.ok()) {
      options_.analyzer->Release(snapshot.job.session, snapshot.bytes);
      return read;
    }
  }
  std::weak_ptr<Session> self = weak_from_this();
  snapshot.job.publish = [self, restores = restores_.load()](
                             int64_t step, std::vector<v1::TensorAnalysis> figures) {
    if (std::shared_ptr<Session> session = self.lock()) {
      session->PublishAnalysis(step, restores, std::move(figures));
    }
  };
  options_.analyzer->Submit(std::move(snapshot.job), snapshot.bytes);
  return absl::OkStatus();
}

void Session::PublishAnalysis(int64_t step, int64_t restores,
                              std::vector<v1::TensorAnalysis> figures) {
  absl::MutexLock lock(&analysis_mu_);
  // A Restore since the snapshot undid the analyzed step.
  if (retired_ || restores != restores_.load() || figures.empty()) return;
  // Keep each tensor's latest figures; a tensor left out this time keeps its earlier ones.
  std::map<std::string, v1::TensorAnalysis> latest;
  for (v1::TensorAnalysis& a : analysis_) latest[a.tensor()] = std::move(a);
  for (v1::TensorAnalysis& a : figures) latest[a.tensor()] = std::move(a);
  analysis_.clear();
  for (const std::string& name : names_) {
    auto it = latest.find(name);
    if (it != latest.end()) analysis_.push_back(std::move(it->second));
  }
  if (options_.metrics != nullptr) options_.metrics->PublishAnalysis(id_, step, analysis_);
}

void Session::Retire() {
  absl::MutexLock lock(&analysis_mu_);
  retired_ = true;
  if (options_.metrics != nullptr) options_.metrics->RemoveSession(id_);
}

void Session::CountNonFinite(int64_t values) {
  if (options_.metrics == nullptr) return;
  absl::MutexLock lock(&analysis_mu_);
  if (!retired_) options_.metrics->CountNonFinite(id_, values);
}

void Session::ExportStateLocked() {
  if (options_.metrics == nullptr) return;
  absl::MutexLock lock(&analysis_mu_);
  if (!retired_) options_.metrics->SetSessionState(id_, step_, state_bytes_);
}

absl::Status Session::ReadResultLocked(StepOutcome& outcome) {
  if (outcome.result == v1::STEP_RESULT_NONE) return absl::OkStatus();
  std::vector<float> after;
  for (int t = 0; t < num_tensors(); ++t) {
    absl::Span<float> values = absl::MakeSpan(outcome.values[t]);
    if (outcome.result == v1::STEP_RESULT_PARAMETERS) {
      OPTD_RETURN_IF_ERROR(optimizer_->GetParameters(t, values));
    } else {
      after.resize(values.size());
      OPTD_RETURN_IF_ERROR(optimizer_->GetParameters(t, absl::MakeSpan(after)));
      ParameterDelta(after, values, values);
    }
  }
  return absl::OkStatus();
}

absl::Status Session::ApplyHyperparams(
    Optimizer& optimizer, const std::map<std::string, v1::GroupHyperparams>& groups) const {
  for (int t = 0; t < num_tensors(); ++t) {
    auto h = groups.find(config_.groups(group_of_[t]).name());
    if (h == groups.end()) continue;
    OPTD_RETURN_IF_ERROR(optimizer.SetHyperparameters(t, h->second.lr(), h->second.weight_decay(),
                                                      h->second.momentum()));
  }
  return absl::OkStatus();
}

absl::Status Session::SetHyperparamsLocked(
    const std::map<std::string, v1::GroupHyperparams>& groups) {
  OPTD_RETURN_IF_ERROR(ApplyHyperparams(*optimizer_, groups));
  if (&groups != &hyperparams_) {
    for (const auto& [name, h] : groups) hyperparams_[name] = h;
  }
  return absl::OkStatus();
}

absl::Status Session::UpdateHyperparams(const v1::UpdateHyperparamsRequest& request) {
  Touch();
  absl::MutexLock lock(&mu_);
  OPTD_RETURN_IF_ERROR(CheckUsableLocked());
  std::map<std::string, v1::GroupHyperparams> updated;
  for (const v1::HyperparamUpdate& u : request.updates()) {
    auto current = hyperparams_.find(u.group());
    if (current == hyperparams_.end()) {
      return absl::NotFoundError(
          absl::StrCat("session '", id_, "' has no group '", u.group(), "'"));
    }
    v1::GroupHyperparams h = updated.contains(u.group()) ? updated[u.group()] : current->second;
    if (u.has_lr()) h.set_lr(u.lr());
    if (u.has_momentum()) h.set_momentum(u.momentum());
    if (u.has_weight_decay()) h.set_weight_decay(u.weight_decay());
    updated[u.group()] = h;
  }
  // Check every tensor of every updated group before changing any.
  for (int t = 0; t < num_tensors(); ++t) {
    auto h = updated.find(config_.groups(group_of_[t]).name());
    if (h == updated.end()) continue;
    OptimizerConfig c = optimizer_->spec(t).config;
    c.lr = h->second.lr();
    c.weight_decay = h->second.weight_decay();
    if (c.algorithm == Algorithm::kAdamW) {
      c.adamw.beta1 = h->second.momentum();
    } else {
      c.matrix.momentum = h->second.momentum();
    }
    absl::Status valid = ValidateOptimizerConfig(c);
    if (!valid.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "group '", h->first, "' (lr ", h->second.lr(), ", momentum ", h->second.momentum(),
          ", weight_decay ", h->second.weight_decay(), "): ", valid.message()));
    }
  }
  return SetHyperparamsLocked(updated);
}

absl::Status Session::SetParameters(const TensorStaging& values) {
  Touch();
  absl::MutexLock lock(&mu_);
  OPTD_RETURN_IF_ERROR(CheckUsableLocked());
  if (values.out_of_range_values() > 0) {
    return absl::InvalidArgumentError("parameters must be finite");
  }
  for (int t : values.PresentTensors()) {
    OPTD_RETURN_IF_ERROR(optimizer_->SetParameters(t, values.values(t)));
  }
  return absl::OkStatus();
}

absl::Status Session::GetParameters(const std::vector<int>& tensors, TensorStaging& into) {
  Touch();
  absl::MutexLock lock(&mu_);
  OPTD_RETURN_IF_ERROR(CheckUsableLocked());
  for (int t : tensors) {
    OPTD_RETURN_IF_ERROR(optimizer_->GetParameters(
        t, absl::MakeSpan(into.data(t), static_cast<size_t>(counts_[t]))));
  }
  return absl::OkStatus();
}

absl::StatusOr<CheckpointInfo> Session::Checkpoint(bool touch, const std::string& shared_dir) {
  if (touch) Touch();
  absl::MutexLock lock(&mu_);
  OPTD_RETURN_IF_ERROR(CheckUsableLocked());
  if (!shared_dir.empty() && options_.state_dir.empty()) {
    // Only the shared copy: the daemon keeps no restart checkpoints of its own.
    OPTD_ASSIGN_OR_RETURN(CheckpointInfo info, WriteCheckpointLocked(shared_dir));
    info.shared_path = info.path;
    return info;
  }
  OPTD_ASSIGN_OR_RETURN(CheckpointInfo info, CheckpointLocked());
  if (shared_dir.empty()) return info;
  if (shared_dir == options_.state_dir) {
    info.shared_path = info.path;
    return info;
  }
  OPTD_ASSIGN_OR_RETURN(CheckpointInfo shared, WriteCheckpointLocked(shared_dir));
  info.shared_path = shared.path;
  return info;
}

absl::StatusOr<CheckpointInfo> Session::CheckpointLocked() {
  if (options_.state_dir.empty()) {
    return absl::FailedPreconditionError(
        "the daemon has no state directory (--state_dir); checkpoints are off");
  }
  OPTD_ASSIGN_OR_RETURN(CheckpointInfo info, WriteCheckpointLocked(options_.state_dir));
  checkpoint_step_ = step_;
  checkpoint_step_published_ = step_;
  return info;
}

absl::StatusOr<CheckpointInfo> Session::WriteCheckpointLocked(const std::string& state_dir) {
  OPTD_RETURN_IF_ERROR(CheckUsableLocked());
  absl::StatusOr<CheckpointInfo> written =
      absl::ResourceExhaustedError("optd could not allocate host memory to write the checkpoint");
  try {
    written = WriteCheckpointFileLocked(state_dir);
  } catch (const std::bad_alloc&) {
    // `written` says so; the last good checkpoint stays (the writer commits by rename).
  }
  if (!written.ok()) {
    // The last good checkpoint stays in place (CheckpointWriter commits by rename).
    if (options_.metrics != nullptr) options_.metrics->CountCheckpointFailure();
    LogEvent(absl::StrCat("session '", id_, "': checkpoint of step ", step_, " in ", state_dir,
                          " failed, the last on disk is step ", checkpoint_step_, ": ",
                          written.status().ToString()));
  }
  return written;
}

absl::StatusOr<CheckpointInfo> Session::WriteCheckpointFileLocked(const std::string& state_dir) {
  FileSystem& fs = *options_.fs;
  OPTD_RETURN_IF_ERROR(fs.CreateDir(state_dir));
  const std::string dir = absl::StrCat(state_dir, "/", id_);
  OPTD_RETURN_IF_ERROR(fs.CreateDir(dir));
  CheckpointInfo info;
  info.path = CheckpointPath(state_dir, id_);
  info.step = step_;

  v1::SessionCheckpoint meta;
  meta.set_session_id(id_);
  *meta.mutable_config() = config_;
  meta.set_token_sha256(token_digest_);
  meta.set_step(step_);
  meta.set_written_unix_micros(absl::ToUnixMicros(absl::Now()));
  for (const auto& [name, h] : hyperparams_) *meta.add_hyperparams() = h;
  for (int t = 0; t < num_tensors(); ++t) {
    v1::TensorCheckpoint* tc = meta.add_tensors();
    tc->set_name(names_[t]);
    tc->set_steps_applied(optimizer_->steps_applied(t));
    for (const StateBuffer& b : optimizer_->state(t)) tc->add_state_buffers(b.name);
  }
  OPTD_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointWriter> writer,
                        CheckpointWriter::Create(fs, info.path));
  const std::string meta_bytes = meta.SerializeAsString();
  OPTD_RETURN_IF_ERROR(writer->AddRecord("meta", meta_bytes));
  info.bytes = static_cast<int64_t>(meta_bytes.size());
  std::vector<float> values;
  for (int t = 0; t < num_tensors(); ++t) {
    values.resize(static_cast<size_t>(counts_[t]));
    OPTD_RETURN_IF_ERROR(optimizer_->GetParameters(t, absl::MakeSpan(values)));
    OPTD_RETURN_IF_ERROR(writer->AddRecord(absl::StrCat("params/", names_[t]), AsBytes(values)));
    info.bytes += static_cast<int64_t>(values.size() * sizeof(float));
    for (const StateBuffer& b : optimizer_->state(t)) {
      values.resize(static_cast<size_t>(b.count));
      OPTD_RETURN_IF_ERROR(optimizer_->GetState(t, b.name, absl::MakeSpan(values)));
      OPTD_RETURN_IF_ERROR(
          writer->AddRecord(absl::StrCat("state/", names_[t], "/", b.name), AsBytes(values)));
      info.bytes += static_cast<int64_t>(values.size() * sizeof(float));
    }
  }
  OPTD_RETURN_IF_ERROR(writer->Commit());
  return info;
}

absl::StatusOr<int64_t> Session::Restore() {
  Touch();
  if (options_.state_dir.empty()) {
    return absl::FailedPreconditionError(
        "the daemon has no state directory (--state_dir); checkpoints are off");
  }
  absl::MutexLock lock(&mu_);
  const std::string path = CheckpointPath(options_.state_dir, id_);
  absl::StatusOr<Loaded> loaded = LoadCheckpoint(path);
  if (absl::IsNotFound(loaded.status())) {
    return absl::FailedPreconditionError(
        absl::StrCat("session '", id_, "' has no checkpoint at ", path));
  }
  OPTD_RETURN_IF_ERROR(loaded.status());
  // Abort a pending step: its workers get Aborted and resend against the restored step.
  if (!contributions_.empty()) {
    EndRoundLocked(absl::AbortedError(absl::StrCat("session '", id_,
                                                   "' was restored from its checkpoint at step ",
                                                   loaded->step, " while this step was pending")));
  }
  // Nothing can fail from here on: the restore is all or nothing.
  optimizer_ = std::move(loaded->optimizer);
  damaged_ = absl::OkStatus();
  for (const auto& [name, h] : loaded->hyperparams) hyperparams_[name] = h;
  step_ = loaded->step;
  step_published_ = step_;
  checkpoint_step_ = step_;
  checkpoint_step_published_ = step_;
  last_outcome_ = nullptr;
  spare_outcome_ = nullptr;
  ExportStateLocked();
  // The figures were of steps that no longer happened, and so are those still in analysis.
  absl::MutexLock analysis_lock(&analysis_mu_);
  ++restores_;
  analysis_.clear();
  if (options_.metrics != nullptr && !retired_) options_.metrics->PublishAnalysis(id_, step_, {});
  LogEvent(absl::StrCat("session '", id_, "' restored from its checkpoint at step ", step_));
  return step_;
}

std::vector<v1::TensorAnalysis> Session::Analysis() {
  Touch();
  absl::MutexLock lock(&analysis_mu_);
  return analysis_;
}

v1::SessionInfo Session::Info(bool with_tensors) {
  v1::SessionInfo info;
  info.set_session_id(id_);
  info.set_loaded(true);
  info.set_step(step_published_.load());
  info.set_checkpoint_step(checkpoint_step_published_.load());
  info.set_state_bytes(state_bytes_);
  info.set_backend(std::string(backend_.name()));
  info.set_workers_pending(workers_pending_published_.load());
  if (!with_tensors) return info;
  *info.mutable_config() = config_;
  absl::MutexLock lock(&mu_);
  for (int t = 0; t < num_tensors(); ++t) {
    v1::TensorInfo* ti = info.add_tensors();
    *ti->mutable_config() = config_.tensors(t);
    ti->set_num_elements(counts_[t]);
    ti->set_steps_applied(optimizer_->steps_applied(t));
    const v1::GroupHyperparams& h = hyperparams_.at(config_.groups(group_of_[t]).name());
    ti->set_lr(h.lr());
    ti->set_weight_decay(h.weight_decay());
    ti->set_momentum(h.momentum());
  }
  return info;
}

}  // namespace optd::server
