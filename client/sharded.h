// A sharded session: one logical session over several optd instances, each holding the tensors
// (or batch slices) placement gave it (client/placement.h). Steps go to every owner at once over
// its own channel, and the results are put back together; on the same backend the result equals
// the single-instance result bit for bit, since no matrix is split inside Newton–Schulz and every
// kernel works per matrix, row or element.
#ifndef OPTD_CLIENT_SHARDED_H_
#define OPTD_CLIENT_SHARDED_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "client/placement.h"

namespace optd::client {

struct ShardEndpoint {
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  int64_t memory_bytes = 0;  // state bytes the instance may hold; 0: no limit
};

// Where a resharded session's state comes from: the parts of session `session_id` that the
// instances `instances` (their --instance_name) checkpointed into the shared state root.
struct ShardRestore {
  std::vector<std::string> instances;
  std::string session_id;  // empty: the new session's id
  // Without an admin token, a new part that replaces the session an instance holds needs that
  // session's token: by instance address.
  std::map<std::string, std::string> tokens;
  // Without an admin token, reading each source needs its session's token: by instance name.
  std::map<std::string, std::string> source_tokens;
};

class ShardedSession {
 public:
  // Places `config`'s tensors on `endpoints` at `epoch` and creates the session `id` on every
  // instance that owns something (a batched tensor's slices become tensors "name[i]"). On an
  // error, the sessions already created are deleted.
  //
  // With `restore`, each part starts from the checkpoints named there instead (resharding:
  // tensors are found by name, so N parts restore on M), replacing a session of that id on its
  // instance; `epoch` must be later than theirs. Once every part exists, each is checkpointed
  // (when its daemon has a state directory). On an error nothing is deleted: the sources must
  // survive, and a retry replaces what was created.
  static absl::StatusOr<ShardedSession> Create(const std::vector<ShardEndpoint>& endpoints,
                                               const v1::SessionConfig& config,
                                               const std::string& id, int64_t epoch,
                                               const std::string& admin_token = "",
                                               const ShardRestore* restore = nullptr);

  const v1::Placement& placement() const { return placement_; }

  // One step of worker `options.worker_id`: each owner gets its tensors' gradients, all at once;
  // the result holds every tensor whole. An instance's failure is returned naming it (UNAVAILABLE
  // when it is down, at once: no call waits for a dead instance); steps its peers finished are
  // replayed to a retry. An instance that restarted from its checkpoint (--state_dir, every step
  // checkpointed: SessionConfig.checkpoint_interval 1) takes the retry as a new step, or, when it
  // had completed the step before going down, answers with its parameters. One that restarted
  // further back refuses the step (FAILED_PRECONDITION naming the step it expects): Restore()
  // then brings every part back to the last checkpoint they share. A hung (not dead) instance is
  // bounded by `options.timeout`.
  absl::StatusOr<StepResult> Step(int64_t step, absl::Span<const NamedTensor> gradients,
                                  const StepOptions& options = {});
  // Replaces the given tensors' parameters (each whole), on their owners.
  absl::Status UploadParameters(absl::Span<const NamedTensor> tensors);
  // Every tensor's parameters, whole.
  absl::StatusOr<std::map<std::string, std::vector<float>>> GetParameters();
  absl::Status Delete();

  // Checkpoints every part (`shared`: into the shared state root too, where a resharded session
  // restores from) and returns their step; FailedPrecondition naming the instances when the
  // parts are at different steps.
  absl::StatusOr<int64_t> Checkpoint(bool shared = false);
  // Restores every part from its last checkpoint (after an instance restarted further back than
  // its peers) and returns the common step; FailedPrecondition naming each instance's step when
  // the checkpoints are not of one step.
  absl::StatusOr<int64_t> Restore();
  // Moves the session onto `endpoints` at a later `epoch`: checkpoints every part into the shared
  // state root, creates the new parts from those checkpoints (Create with a ShardRestore), then
  // deletes the parts left on instances that own nothing any more. Every daemon involved needs
  // --shared_state_root. This session must not be used afterwards.
  absl::StatusOr<ShardedSession> Reshard(const std::vector<ShardEndpoint>& endpoints,
                                         int64_t epoch);

  // How long each part's call of the last Step took (in parts() order): the instances' balance.
  const std::vector<absl::Duration>& last_part_times() const { return last_part_times_; }

  // The parts: instance address and its session (token included).
  std::vector<std::pair<std::string, Session>> parts() const;

 private:
  struct Shard {
    std::string address;
    std::shared_ptr<grpc::Channel> channel;
    Session session;
    std::vector<std::string> tensors;  // its tensor names (slices as "name[i]")
  };
  // Where the values of a logical tensor live: (shard, name there, offset, count) pieces.
  struct Piece {
    int shard;
    std::string name;
    int64_t offset, count;
  };
  ShardedSession() = default;
  // Shard `s` refused step `step` with FailedPrecondition (`refused`): the step's result when the
  // shard had completed it before a restart, `refused` otherwise.
  absl::StatusOr<StepResult> CompletedBeforeRestart(size_t s, int64_t step,
                                                    absl::Span<const NamedTensor> gradients,
                                                    const StepOptions& options,
                                                    const absl::Status& refused);
  // The step all parts share, or FailedPrecondition naming each part's.
  absl::StatusOr<int64_t> CommonStep(const std::vector<int64_t>& steps,
                                     absl::string_view what) const;

  v1::SessionConfig config_;
  std::string id_;
  std::string admin_token_;
  v1::Placement placement_;
  std::vector<Shard> shards_;
  std::map<std::string, std::vector<Piece>> pieces_;
  std::map<std::string, int64_t> sizes_;
  std::vector<absl::Duration> last_part_times_;
};

}  // namespace optd::client

#endif  // OPTD_CLIENT_SHARDED_H_
