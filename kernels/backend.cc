#include "kernels/backend.h"

#include "absl/strings/str_cat.h"

namespace optd {

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    Reset();
    data_ = other.data_;
    bytes_ = other.bytes_;
    release_ = std::move(other.release_);
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

void Buffer::Reset() {
  if (data_ != nullptr && release_) release_(data_);
  data_ = nullptr;
  bytes_ = 0;
}

absl::StatusOr<std::vector<int64_t>> Backend::CountOutOfRangeEach(
    Queue& queue, const std::vector<const float*>& xs, const std::vector<int64_t>& counts,
    float max_magnitude) {
  if (xs.size() != counts.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("count out of range: ", xs.size(), " arrays but ", counts.size(), " counts"));
  }
  std::vector<int64_t> bad(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    absl::StatusOr<int64_t> count = CountOutOfRange(queue, xs[i], counts[i], max_magnitude);
    if (!count.ok()) return count.status();
    bad[i] = *count;
  }
  return bad;
}

absl::Status Backend::NewtonSchulzNative(Queue&, const MatrixBatch&, const NewtonSchulzRun&,
                                         float*) {
  return absl::UnimplementedError(
      absl::StrCat("the ", name(), " backend has no native Newton-Schulz"));
}

absl::Status Backend::BeginRecording(Queue&) {
  return absl::UnimplementedError(absl::StrCat("the ", name(), " backend records no graphs"));
}

absl::Status Backend::Replay(Queue&, const StepGraph&) {
  return absl::UnimplementedError(absl::StrCat("the ", name(), " backend records no graphs"));
}

absl::Status Backend::EndRecording(Queue&, std::unique_ptr<StepGraph>*) {
  return absl::UnimplementedError(absl::StrCat("the ", name(), " backend records no graphs"));
}

}  // namespace optd
