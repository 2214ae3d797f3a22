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

class ShardedSession {
 public:
  // Places `config`'s tensors on `endpoints` at `epoch` and creates the session `id` on every
  // instance that owns something (a batched tensor's slices become tensors "name[i]"). On an
  // error, the sessions already created are deleted.
  static absl::StatusOr<ShardedSession> Create(const std::vector<ShardEndpoint>& endpoints,
                                               const v1::SessionConfig& config,
                                               const std::string& id, int64_t epoch,
                                               const std::string& admin_token = "");

  const v1::Placement& placement() const { return placement_; }

  // One step of worker `options.worker_id`: each owner gets its tensors' gradients, all at once;
  // the result holds every tensor whole. An instance's failure is returned naming it (UNAVAILABLE
  // when it is down); steps its peers finished are replayed to a retry.
  absl::StatusOr<StepResult> Step(int64_t step, absl::Span<const NamedTensor> gradients,
                                  const StepOptions& options = {});
  // Replaces the given tensors' parameters (each whole), on their owners.
  absl::Status UploadParameters(absl::Span<const NamedTensor> tensors);
  // Every tensor's parameters, whole.
  absl::StatusOr<std::map<std::string, std::vector<float>>> GetParameters();
  absl::Status Delete();

 private:
  struct Shard {
    std::string address;
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

  v1::Placement placement_;
  std::vector<Shard> shards_;
  std::map<std::string, std::vector<Piece>> pieces_;
  std::map<std::string, int64_t> sizes_;
};

}  // namespace optd::client

#endif  // OPTD_CLIENT_SHARDED_H_
