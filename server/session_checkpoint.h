// A session's checkpoint: writing one and reading one back.
//
// File (server/checkpoint_file.h's record format), <state_dir>/<session>/checkpoint: record
// "meta" (optd.v1.SessionCheckpoint: id, config, token digest, step, hyperparameters, and per
// tensor its name, applied steps and state buffer names), then "params/<tensor>" and
// "state/<tensor>/<buffer>" as little-endian fp32.
#ifndef OPTD_SERVER_SESSION_CHECKPOINT_H_
#define OPTD_SERVER_SESSION_CHECKPOINT_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kernels/backend.h"
#include "kernels/optimizer.h"
#include "optd/v1/checkpoint.pb.h"
#include "optd/v1/optd.pb.h"
#include "server/checkpoint_file.h"
#include "server/file_system.h"
#include "server/hyperparams.h"

namespace optd::server {

struct CheckpointInfo {
  int64_t step = 0;
  std::string path;
  int64_t bytes = 0;
  std::string shared_path;  // the copy for resharding, when one was asked for
};

// What a session is at a step, apart from its config: a fresh optimizer holding parameters and
// state, the step, and the hyperparameters per group name.
struct SessionState {
  std::unique_ptr<Optimizer> optimizer;
  int64_t step = 0;
  std::map<std::string, v1::GroupHyperparams> hyperparams;
};

// A checkpoint file opened and checked whole, with its meta record parsed. NotFound when there is
// none at `path`, DataLoss for a damaged file or a meta record that does not parse.
struct OpenedCheckpoint {
  CheckpointReader reader;
  v1::SessionCheckpoint meta;
};
absl::StatusOr<OpenedCheckpoint> OpenSessionCheckpoint(FileSystem& fs, const std::string& path);

std::string SessionCheckpointPath(const std::string& state_dir, const std::string& id);

// A tensor's auto-mode choices (kernels/optimizer.h) as checkpoints, exports and GetAnalysis carry
// them, and back.
v1::AutoChoices AutoChoicesToProto(const AutoChoices& choices);
AutoChoices AutoChoicesFromProto(const v1::AutoChoices& proto);
// Sets tensor `t`'s choices from `proto` where the tensor has auto modes and `present` (a source
// without them, e.g. a checkpoint from before the tensor had them, leaves the first choices);
// InvalidArgument as Optimizer::SetAutoChoices, or for lists of unequal length.
absl::Status RestoreAutoChoices(Optimizer& optimizer, int t, bool present,
                                const v1::AutoChoices& proto);

// Tensor `t` of `optimizer` from the records of the checkpointed tensor `tc`: parameters, every
// state buffer the optimizer has for it, its applied steps and auto choices. DataLoss for a missing
// record, a record of the wrong size or a non-finite value.
absl::Status LoadTensorRecords(const CheckpointReader& reader, const v1::TensorCheckpoint& tc,
                               int t, Optimizer& optimizer);

// The session `id` (`config`, `token_digest`) from the checkpoint at `path`, on `backend`.
// DataLoss when the file is damaged or holds another session, other tensors or hyperparameters
// that do not validate.
absl::StatusOr<SessionState> LoadSessionCheckpoint(Backend& backend, FileSystem& fs,
                                                   const std::string& path, const std::string& id,
                                                   const v1::SessionConfig& config,
                                                   const std::string& token_digest);

// Everything a checkpoint holds of a session.
struct SessionCheckpointContents {
  const std::string& id;
  const v1::SessionConfig& config;
  const std::string& token_digest;
  int64_t step;
  const std::map<std::string, v1::GroupHyperparams>& hyperparams;
  Optimizer& optimizer;
  absl::Time written;
};

// Writes the checkpoint of `contents` to SessionCheckpointPath(state_dir, id), creating the
// directories; atomic (CheckpointWriter): a failure leaves the last checkpoint in place.
absl::StatusOr<CheckpointInfo> WriteSessionCheckpoint(FileSystem& fs, const std::string& state_dir,
                                                      const SessionCheckpointContents& contents);

}  // namespace optd::server

#endif  // OPTD_SERVER_SESSION_CHECKPOINT_H_
