// Host staging for one stream's tensors (a worker's gradients for one step, or a parameter
// upload): chunks are checked and decoded as they arrive, and the whole set is checked for
// completeness at the end.
#ifndef OPTD_SERVER_TENSOR_STAGING_H_
#define OPTD_SERVER_TENSOR_STAGING_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "common/tensor_index.h"
#include "optd/v1/optd.pb.h"
#include "server/chunk_view.h"

namespace optd::server {

class TensorStaging {
 public:
  // One buffer per tensor of `index`, `counts[i]` floats, allocated here and reused across
  // Reset(). `owner` names the tensors' owner in errors ("session 'run'").
  TensorStaging(std::shared_ptr<const TensorIndex> index, std::vector<int64_t> counts,
                std::string owner);
  // The same with an index of its own.
  TensorStaging(std::vector<std::string> names, std::vector<int64_t> counts);

  // Forgets every chunk; keeps the buffers.
  void Reset();

  // Checks and decodes elements [offset, offset + n) of `tensor`, n = bytes.size() / size of
  // dtype. InvalidArgument naming the tensor for an empty chunk, a byte count that is not whole
  // elements, elements outside [0, count), or elements an earlier chunk already sent. Values that
  // are NaN, infinite or beyond ±max_magnitude are counted (also when they fail the chunk); with
  // `reject_out_of_range` the first one fails the chunk with InvalidArgument naming the tensor
  // and element.
  absl::Status AddChunk(int tensor, int64_t offset, DType dtype, absl::string_view bytes,
                        float max_magnitude, bool reject_out_of_range);
  // The same for bytes in pieces (as gRPC received them; an element may be split between two),
  // `bytes` of them in all.
  absl::Status AddChunk(int tensor, int64_t offset, DType dtype,
                        absl::Span<const absl::string_view> pieces, size_t bytes,
                        float max_magnitude, bool reject_out_of_range);
  // The same for a chunk off the wire, its tensor and dtype resolved first: NotFound naming the
  // owner and the tensor, InvalidArgument naming the tensor for a dtype that is not one.
  // `completed` (optional): the tensor's index when this chunk completed it, else -1.
  absl::Status AddChunk(const v1::TensorChunk& chunk, float max_magnitude, bool reject_out_of_range,
                        int* completed = nullptr);
  // The same for a chunk read where gRPC received it (server/chunk_view.h).
  absl::Status AddChunk(const ChunkView& chunk, float max_magnitude, bool reject_out_of_range,
                        int* completed = nullptr);

  // After the last chunk: InvalidArgument naming the first tensor that got some chunks but not
  // all of its elements, with the first missing range.
  absl::Status CheckComplete() const;

  int num_tensors() const { return static_cast<int>(counts_.size()); }
  bool present(int tensor) const { return covered_[tensor] > 0; }
  // Every element of `tensor` has arrived.
  bool complete(int tensor) const { return covered_[tensor] == counts_[tensor]; }
  int num_present() const;
  // Tensors with at least one chunk, in index order.
  std::vector<int> PresentTensors() const;
  float* data(int tensor) { return buffers_[tensor].data(); }
  absl::Span<const float> values(int tensor) const { return buffers_[tensor]; }
  int64_t out_of_range_values() const { return out_of_range_; }
  int64_t bytes() const;

 private:
  std::shared_ptr<const TensorIndex> index_;
  std::string owner_;
  std::vector<int64_t> counts_;
  std::vector<std::vector<float>> buffers_;
  // Per tensor: covered element ranges, start -> end, merged when adjacent.
  std::vector<std::map<int64_t, int64_t>> ranges_;
  std::vector<int64_t> covered_;
  int64_t out_of_range_ = 0;
};

// A session's staging buffers: each stream of gradients or parameters takes one and gives it back,
// so that steps reuse their memory. At most `limit` are out at once, so that no client can make a
// session hold more staging than its quota counted. Thread-safe.
class StagingPool {
 public:
  // `session` names the session in errors; `index` and `counts` are its tensors.
  StagingPool(std::string session, std::shared_ptr<const TensorIndex> index,
              std::vector<int64_t> counts, int limit);

  // A reset buffer. Unavailable beyond the limit (a client retrying far too eagerly),
  // ResourceExhausted when the host has no memory for another.
  absl::StatusOr<std::unique_ptr<TensorStaging>> Acquire();
  // Gives a buffer back (null: nothing).
  void Release(std::unique_ptr<TensorStaging> staging);

 private:
  const std::string session_;
  const std::shared_ptr<const TensorIndex> index_;
  const std::vector<int64_t> counts_;
  const int limit_;
  absl::Mutex mu_;
  std::vector<std::unique_ptr<TensorStaging>> free_ ABSL_GUARDED_BY(mu_);
  int outstanding_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace optd::server

#endif  // OPTD_SERVER_TENSOR_STAGING_H_
