// Restore from other instances (resharding, ../shared/DESIGN.md "Scale beyond one machine"): a
// new session's tensors come, by name, from the checkpoints of sessions on other instances, with
// their step and hyperparameters. CreateSessionRequest.restore_from (proto/optd/v1/optd.proto)
// states the rules.
#ifndef OPTD_SERVER_RESHARD_H_
#define OPTD_SERVER_RESHARD_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "optd/v1/optd.pb.h"
#include "server/file_system.h"
#include "server/session_checkpoint.h"

namespace optd::server {

// A checkpoint a resharded session restores from, and how errors name it.
struct CheckpointSourcePath {
  std::string label;  // e.g. "instance 'optd-2' session 'run'"
  std::string path;
};

// The state of a session with `config` (normalized) whose every tensor comes from one of
// `sources`, read and checked whole before anything is built. The sources must be of one step
// and one placement epoch, earlier than config's; each tensor must be in exactly one of them,
// with the same shape, dtype, rank policy, preset and overrides; a group's hyperparameters must
// agree across sources. NotFound for a missing source, DataLoss for a damaged one,
// FailedPrecondition naming the tensor or source that does not fit.
absl::StatusOr<SessionState> ReadReshardedState(Backend& backend, FileSystem& fs,
                                                const v1::SessionConfig& config,
                                                const std::vector<CheckpointSourcePath>& sources);

}  // namespace optd::server

#endif  // OPTD_SERVER_RESHARD_H_
