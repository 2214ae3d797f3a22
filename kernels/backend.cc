#include "kernels/backend.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

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

absl::Status Backend::AdamWInto(Queue& queue, float* w_out, float* m_out, float* v_out,
                                const float* w_in, const float* m_in, const float* v_in,
                                const float* g, int64_t count,
                                const formulas::AdamWScalars* scalars) {
  const size_t bytes = static_cast<size_t>(count) * sizeof(float);
  OPTD_RETURN_IF_ERROR(Copy(queue, w_out, w_in, bytes));
  OPTD_RETURN_IF_ERROR(Copy(queue, m_out, m_in, bytes));
  OPTD_RETURN_IF_ERROR(Copy(queue, v_out, v_in, bytes));
  return AdamW(queue, w_out, m_out, v_out, g, count, scalars);
}

absl::Status Backend::RmnpStepInto(Queue& queue, float* w_out, float* m_out, const float* w_in,
                                   const float* m_in, const float* g, int64_t rows, int64_t cols,
                                   const RmnpStepArgs& args) {
  const size_t bytes = static_cast<size_t>(rows * cols) * sizeof(float);
  OPTD_RETURN_IF_ERROR(Copy(queue, w_out, w_in, bytes));
  OPTD_RETURN_IF_ERROR(Copy(queue, m_out, m_in, bytes));
  return RmnpStep(queue, w_out, m_out, g, rows, cols, args);
}

absl::Status Backend::ReserveScratch(Queue&, const ScratchNeeds&) { return absl::OkStatus(); }

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
