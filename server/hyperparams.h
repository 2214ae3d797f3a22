// A session's hyperparameters per group (lr, weight decay, momentum: AdamW's β1), the values its
// optimizer runs with: their defaults from the optimizer's configs, updates checked whole before
// any is applied (UpdateHyperparams), and their application to an optimizer (start-up,
// checkpoints, resharding).
#ifndef OPTD_SERVER_HYPERPARAMS_H_
#define OPTD_SERVER_HYPERPARAMS_H_

#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/optimizer.h"
#include "optd/v1/checkpoint.pb.h"
#include "optd/v1/optd.pb.h"

namespace optd::server {

// Group name -> its hyperparameters.
using HyperparamTable = std::map<std::string, v1::GroupHyperparams>;

// Adds to `table` every group of `config` it lacks, with the values `optimizer` runs its tensors
// with.
void AddDefaultHyperparams(const v1::SessionConfig& config, const Optimizer& optimizer,
                           HyperparamTable& table);

// Sets each tensor's lr, weight decay and momentum from its group's entry in `table` (a group
// without one keeps its values). Errors as Optimizer::SetHyperparameters.
absl::Status ApplyGroupHyperparams(const v1::SessionConfig& config, Optimizer& optimizer,
                                   const HyperparamTable& table);

// The groups `request` changes, with their new values, every tensor of them checked against its
// optimizer config first: NotFound naming the session and a group it lacks, InvalidArgument
// naming the group and the values it would get. `session` names the session in errors.
absl::StatusOr<HyperparamTable> UpdatedHyperparams(const v1::SessionConfig& config,
                                                   const Optimizer& optimizer,
                                                   const HyperparamTable& current,
                                                   const v1::UpdateHyperparamsRequest& request,
                                                   const std::string& session);

}  // namespace optd::server

#endif  // OPTD_SERVER_HYPERPARAMS_H_
