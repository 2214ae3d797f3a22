#include "server/reshard.h"

#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "server/session_config.h"

namespace optd::server {
namespace {

const v1::GroupConfig* FindGroup(const v1::SessionConfig& config, absl::string_view name) {
  for (const v1::GroupConfig& g : config.groups()) {
    if (g.name() == name) return &g;
  }
  return nullptr;
}

// Why the tensor `want` (of group `group`) cannot take the state checkpointed as `had` (of group
// `had_group`, null when the checkpoint's config lacks it); empty when it can.
std::string Mismatch(const v1::TensorConfig& want, const v1::GroupConfig& group,
                     const v1::TensorConfig& had, const v1::GroupConfig* had_group) {
  auto shape = [](const v1::TensorConfig& c) { return absl::StrJoin(c.shape(), "x"); };
  if (shape(want) != shape(had)) {
    return absl::StrCat("shape ", shape(had), " there, ", shape(want), " here");
  }
  if (want.dtype() != had.dtype()) {
    return absl::StrCat("dtype ", v1::DType_Name(had.dtype()), " there, ",
                        v1::DType_Name(want.dtype()), " here");
  }
  if (want.rank_policy() != had.rank_policy()) return "another rank policy";
  if (had_group == nullptr || had_group->preset() != group.preset() ||
      had_group->overrides_size() != group.overrides_size()) {
    return absl::StrCat("preset '", had_group == nullptr ? "" : had_group->preset(), "' there, '",
                        group.preset(), "' here (or other overrides)");
  }
  for (int o = 0; o < group.overrides_size(); ++o) {
    const v1::Override& there = had_group->overrides(o);
    const v1::Override& here = group.overrides(o);
    if (there.key() != here.key() || there.value() != here.value()) {
      return absl::StrCat("override ", there.key(), "=", there.value(), " there, ", here.key(), "=",
                          here.value(), " here");
    }
  }
  return "";
}

}  // namespace

absl::StatusOr<SessionState> ReadReshardedState(Backend& backend, FileSystem& fs,
                                                const v1::SessionConfig& config,
                                                const std::vector<CheckpointSourcePath>& sources) {
  if (sources.empty()) return absl::InvalidArgumentError("no checkpoint to restore from");
  // Every source read and checked whole before anything is built.
  std::vector<OpenedCheckpoint> opened;
  for (const CheckpointSourcePath& source : sources) {
    absl::StatusOr<OpenedCheckpoint> one = OpenSessionCheckpoint(fs, source.path);
    if (absl::IsNotFound(one.status())) {
      return absl::NotFoundError(
          absl::StrCat("there is no checkpoint of ", source.label, " at ", source.path));
    }
    OPTD_RETURN_IF_ERROR(one.status());
    opened.push_back(*std::move(one));
  }
  const int64_t step = opened[0].meta.step();
  const int64_t epoch = opened[0].meta.config().placement_epoch();
  for (size_t s = 1; s < sources.size(); ++s) {
    const v1::SessionCheckpoint& meta = opened[s].meta;
    if (meta.step() != step) {
      return absl::FailedPreconditionError(absl::StrCat(
          sources[0].label, " was checkpointed at step ", step, " but ", sources[s].label,
          " at step ", meta.step(), "; checkpoint every part at the same step"));
    }
    if (meta.config().placement_epoch() != epoch) {
      return absl::FailedPreconditionError(absl::StrCat(
          sources[0].label, " was placed at epoch ", epoch, " but ", sources[s].label, " at epoch ",
          meta.config().placement_epoch(), "; restore from the parts of one placement"));
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
    const v1::SessionCheckpoint& meta = opened[s].meta;
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
  SessionState state;
  state.step = step;
  std::map<std::string, size_t> hyperparams_from;  // group -> the source its values came from
  for (const v1::TensorConfig& want : config.tensors()) {
    auto it = found.find(want.name());
    if (it == found.end()) {
      return absl::FailedPreconditionError(absl::StrCat("tensor '", want.name(), "' is in none of ",
                                                        "the ", sources.size(),
                                                        " checkpoints restored from"));
    }
    const Found& f = it->second;
    const v1::SessionCheckpoint& meta = opened[f.source].meta;
    const v1::GroupConfig& group = *FindGroup(config, want.group());
    const std::string differs =
        Mismatch(want, group, *f.config, FindGroup(meta.config(), f.config->group()));
    if (!differs.empty()) {
      return absl::FailedPreconditionError(absl::StrCat("tensor '", want.name(),
                                                        "' does not match its checkpoint in ",
                                                        sources[f.source].label, ": ", differs));
    }
    for (const v1::GroupHyperparams& h : meta.hyperparams()) {
      if (h.group() != f.config->group()) continue;
      v1::GroupHyperparams mine = h;
      mine.set_group(group.name());
      auto [have, added] = state.hyperparams.try_emplace(group.name(), mine);
      if (!added && (have->second.lr() != h.lr() || have->second.momentum() != h.momentum() ||
                     have->second.weight_decay() != h.weight_decay())) {
        return absl::FailedPreconditionError(absl::StrCat(
            "group '", group.name(), "' has other hyperparameters in ",
            sources[hyperparams_from[group.name()]].label, " than in ", sources[f.source].label));
      }
      hyperparams_from.try_emplace(group.name(), f.source);
    }
  }
  OPTD_ASSIGN_OR_RETURN(std::vector<TensorSpec> specs, TensorSpecs(config));
  OPTD_ASSIGN_OR_RETURN(state.optimizer, Optimizer::Create(backend, std::move(specs)));
  for (int t = 0; t < config.tensors_size(); ++t) {
    const Found& f = found.find(config.tensors(t).name())->second;
    OPTD_RETURN_IF_ERROR(
        LoadTensorRecords(opened[f.source].reader, *f.checkpoint, t, *state.optimizer));
  }
  OPTD_RETURN_IF_ERROR(ApplyGroupHyperparams(config, *state.optimizer, state.hyperparams));
  return state;
}

}  // namespace optd::server
