#include "server/hyperparams.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace optd::server {

void AddDefaultHyperparams(const v1::SessionConfig& config, const Optimizer& optimizer,
                           HyperparamTable& table) {
  for (int t = 0; t < config.tensors_size(); ++t) {
    const std::string& group = config.tensors(t).group();
    if (table.contains(group)) continue;
    const OptimizerConfig& c = optimizer.spec(t).config;
    v1::GroupHyperparams& h = table[group];
    h.set_group(group);
    h.set_lr(c.lr);
    h.set_weight_decay(c.weight_decay);
    h.set_momentum(c.algorithm == Algorithm::kAdamW ? c.adamw.beta1 : c.matrix.momentum);
  }
}

absl::Status ApplyGroupHyperparams(const v1::SessionConfig& config, Optimizer& optimizer,
                                   const HyperparamTable& table) {
  for (int t = 0; t < config.tensors_size(); ++t) {
    auto h = table.find(config.tensors(t).group());
    if (h == table.end()) continue;
    OPTD_RETURN_IF_ERROR(optimizer.SetHyperparameters(t, h->second.lr(), h->second.weight_decay(),
                                                      h->second.momentum()));
  }
  return absl::OkStatus();
}

absl::StatusOr<HyperparamTable> UpdatedHyperparams(const v1::SessionConfig& config,
                                                   const Optimizer& optimizer,
                                                   const HyperparamTable& current,
                                                   const v1::UpdateHyperparamsRequest& request,
                                                   const std::string& session) {
  HyperparamTable updated;
  for (const v1::HyperparamUpdate& u : request.updates()) {
    auto now = current.find(u.group());
    if (now == current.end()) {
      return absl::NotFoundError(
          absl::StrCat("session '", session, "' has no group '", u.group(), "'"));
    }
    v1::GroupHyperparams h = updated.contains(u.group()) ? updated[u.group()] : now->second;
    if (u.has_lr()) h.set_lr(u.lr());
    if (u.has_momentum()) h.set_momentum(u.momentum());
    if (u.has_weight_decay()) h.set_weight_decay(u.weight_decay());
    updated[u.group()] = h;
  }
  // Every tensor of every updated group is checked before any changes.
  for (int t = 0; t < config.tensors_size(); ++t) {
    auto h = updated.find(config.tensors(t).group());
    if (h == updated.end()) continue;
    OptimizerConfig c = optimizer.spec(t).config;
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
  return updated;
}

}  // namespace optd::server
