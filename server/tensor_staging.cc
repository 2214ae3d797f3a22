#include "server/tensor_staging.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <new>
#include <utility>

#include "absl/base/dynamic_annotations.h"
#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/wire.h"
#include "proto/wire_dtype.h"

namespace optd::server {

TensorStaging::TensorStaging(std::vector<std::string> names, std::vector<int64_t> counts)
    : TensorStaging(std::make_shared<const TensorIndex>(std::move(names)), std::move(counts),
                    "the staging") {}

TensorStaging::TensorStaging(std::shared_ptr<const TensorIndex> index, std::vector<int64_t> counts,
                             std::string owner)
    : index_(std::move(index)),
      owner_(std::move(owner)),
      counts_(std::move(counts)),
      buffers_(counts_.size()),
      ranges_(counts_.size()),
      covered_(counts_.size(), 0) {
  for (size_t i = 0; i < counts_.size(); ++i) buffers_[i].resize(static_cast<size_t>(counts_[i]));
}

void TensorStaging::Reset() {
  for (auto& r : ranges_) r.clear();
  std::fill(covered_.begin(), covered_.end(), 0);
  out_of_range_ = 0;
}

namespace {

// DecodeWire over `pieces` (the data's bytes in order, whole elements in all) into `out`: an
// element split between two pieces is put together first.
absl::StatusOr<DecodeReport> DecodePieces(DType dtype, absl::Span<const absl::string_view> pieces,
                                          absl::Span<float> out, float max_magnitude) {
  const size_t size = DTypeSize(dtype);
  DecodeReport total;
  size_t at = 0;  // elements decoded
  const auto decode = [&](absl::string_view bytes) -> absl::Status {
    const size_t n = bytes.size() / size;
    OPTD_ASSIGN_OR_RETURN(DecodeReport report,
                          DecodeWire(dtype, bytes, out.subspan(at, n), max_magnitude));
    if (report.out_of_range > 0 && total.out_of_range == 0) {
      total.first_out_of_range = static_cast<int64_t>(at) + report.first_out_of_range;
    }
    total.out_of_range += report.out_of_range;
    at += n;
    return absl::OkStatus();
  };
  char split[8];
  size_t held = 0;  // bytes of a split element in `split`
  for (absl::string_view piece : pieces) {
    if (held > 0) {
      const size_t take = std::min(size - held, piece.size());
      std::memcpy(split + held, piece.data(), take);
      held += take;
      piece.remove_prefix(take);
      if (held < size) continue;
      OPTD_RETURN_IF_ERROR(decode(absl::string_view(split, size)));
      held = 0;
    }
    const size_t whole = piece.size() / size * size;
    if (whole > 0) OPTD_RETURN_IF_ERROR(decode(piece.substr(0, whole)));
    held = piece.size() - whole;
    std::memcpy(split, piece.data() + whole, held);
  }
  if (held != 0 || at != out.size()) {
    return absl::InternalError("DecodePieces: the pieces are not the output's elements");
  }
  return total;
}

// DecodePieces with ThreadSanitizer ignoring its reads of the pieces: they may be gRPC's receive
// buffers (server/chunk_view.h), handed over by synchronization inside gRPC, which is not built
// with ThreadSanitizer, so every read would look like a race with the socket read that wrote
// them. The writes into the staging are still checked.
absl::StatusOr<DecodeReport> DecodeUnchecked(DType dtype,
                                             absl::Span<const absl::string_view> pieces,
                                             absl::Span<float> out,
                                             float max_magnitude) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  ABSL_ANNOTATE_IGNORE_READS_BEGIN();
  absl::StatusOr<DecodeReport> report = DecodePieces(dtype, pieces, out, max_magnitude);
  ABSL_ANNOTATE_IGNORE_READS_END();
  return report;
}

}  // namespace

absl::Status TensorStaging::AddChunk(int tensor, int64_t offset, DType dtype,
                                     absl::string_view bytes, float max_magnitude,
                                     bool reject_out_of_range) {
  const absl::string_view pieces[] = {bytes};
  return AddChunk(tensor, offset, dtype, absl::MakeConstSpan(pieces, bytes.empty() ? 0 : 1),
                  bytes.size(), max_magnitude, reject_out_of_range);
}

absl::Status TensorStaging::AddChunk(int tensor, int64_t offset, DType dtype,
                                     absl::Span<const absl::string_view> pieces, size_t bytes,
                                     float max_magnitude, bool reject_out_of_range) {
  const std::string& name = index_->name(tensor);
  const size_t size = DTypeSize(dtype);
  if (bytes == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk of tensor '", name, "' at offset ", offset, " is empty"));
  }
  if (bytes % size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("chunk of tensor '", name, "' has ", bytes,
                                                   " bytes, not a whole number of ",
                                                   DTypeName(dtype), " elements"));
  }
  const int64_t n = static_cast<int64_t>(bytes / size);
  const int64_t count = counts_[tensor];
  if (offset < 0 || offset > count || n > count - offset) {
    // offset + n is formed only where it cannot overflow.
    return absl::InvalidArgumentError(absl::StrCat(
        "chunk of tensor '", name, "' covers elements [", offset, ", ",
        offset <= std::numeric_limits<int64_t>::max() - n ? absl::StrCat(offset + n)
                                                          : absl::StrCat(offset, " + ", n),
        ") outside the tensor's ", count, " elements"));
  }
  const int64_t end = offset + n;
  std::map<int64_t, int64_t>& ranges = ranges_[tensor];
  auto next = ranges.upper_bound(offset);
  if (next != ranges.end() && next->first < end) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk of tensor '", name, "' at elements [", offset, ", ", end,
                     ") overlaps elements [", next->first, ", ", next->second, ") sent earlier"));
  }
  auto prev = next == ranges.begin() ? ranges.end() : std::prev(next);
  if (prev != ranges.end() && prev->second > offset) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk of tensor '", name, "' at elements [", offset, ", ", end,
                     ") overlaps elements [", prev->first, ", ", prev->second, ") sent earlier"));
  }
  OPTD_ASSIGN_OR_RETURN(
      DecodeReport report,
      DecodeUnchecked(dtype, pieces, absl::MakeSpan(buffers_[tensor].data() + offset, n),
                      max_magnitude));
  out_of_range_ += report.out_of_range;
  if (report.out_of_range > 0 && reject_out_of_range) {
    const int64_t at = offset + report.first_out_of_range;
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", name, "' element ", at, " is ", buffers_[tensor][at],
        report.out_of_range > 1 ? absl::StrCat(" (and ", report.out_of_range - 1, " more)") : "",
        ": values must be finite and within ±", max_magnitude));
  }
  // Record [offset, end), merged with its neighbours when they touch.
  int64_t start = offset;
  int64_t stop = end;
  if (prev != ranges.end() && prev->second == offset) {
    start = prev->first;
    ranges.erase(prev);
  }
  if (next != ranges.end() && next->first == end) {
    stop = next->second;
    ranges.erase(next);
  }
  ranges[start] = stop;
  covered_[tensor] += n;
  return absl::OkStatus();
}

absl::Status TensorStaging::AddChunk(const v1::TensorChunk& chunk, float max_magnitude,
                                     bool reject_out_of_range, int* completed) {
  return AddChunk(ChunkView::Of(chunk), max_magnitude, reject_out_of_range, completed);
}

absl::Status TensorStaging::AddChunk(const ChunkView& chunk, float max_magnitude,
                                     bool reject_out_of_range, int* completed) {
  if (completed != nullptr) *completed = -1;
  const int tensor = index_->Find(chunk.tensor);
  if (tensor < 0) {
    return absl::NotFoundError(absl::StrCat(owner_, " has no tensor '", chunk.tensor, "'"));
  }
  absl::StatusOr<DType> dtype = FromWireDType(chunk.dtype);
  if (!dtype.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk of tensor '", chunk.tensor, "': ", dtype.status().message()));
  }
  OPTD_RETURN_IF_ERROR(AddChunk(tensor, chunk.offset, *dtype, chunk.data, chunk.data_bytes,
                                max_magnitude, reject_out_of_range));
  if (completed != nullptr && complete(tensor)) *completed = tensor;
  return absl::OkStatus();
}

absl::Status TensorStaging::CheckComplete() const {
  for (size_t t = 0; t < counts_.size(); ++t) {
    if (covered_[t] == 0 || covered_[t] == counts_[t]) continue;
    int64_t missing_start = 0;
    int64_t missing_end = counts_[t];
    for (const auto& [start, end] : ranges_[t]) {
      if (start > missing_start) {
        missing_end = start;
        break;
      }
      missing_start = end;
    }
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", index_->name(t), "' got ", covered_[t], " of its ", counts_[t],
                     " elements; elements [", missing_start, ", ", missing_end, ") are missing"));
  }
  return absl::OkStatus();
}

int TensorStaging::num_present() const {
  int n = 0;
  for (int64_t c : covered_) n += c > 0;
  return n;
}

std::vector<int> TensorStaging::PresentTensors() const {
  std::vector<int> present;
  for (size_t t = 0; t < covered_.size(); ++t) {
    if (covered_[t] > 0) present.push_back(static_cast<int>(t));
  }
  return present;
}

int64_t TensorStaging::bytes() const {
  int64_t n = 0;
  for (int64_t c : counts_) n += c;
  return n * static_cast<int64_t>(sizeof(float));
}

StagingPool::StagingPool(std::string session, std::shared_ptr<const TensorIndex> index,
                         std::vector<int64_t> counts, int limit)
    : session_(std::move(session)),
      index_(std::move(index)),
      counts_(std::move(counts)),
      limit_(limit) {}

absl::StatusOr<std::unique_ptr<TensorStaging>> StagingPool::Acquire() {
  {
    absl::MutexLock lock(&mu_);
    if (outstanding_ >= limit_) {
      return absl::UnavailableError(absl::StrCat(
          "session '", session_, "' already has ", outstanding_,
          " gradient or parameter streams open, its limit (world_size + 1); retry when they "
          "finish"));
    }
    ++outstanding_;
    if (!free_.empty()) {
      std::unique_ptr<TensorStaging> staging = std::move(free_.back());
      free_.pop_back();
      staging->Reset();
      return staging;
    }
  }
  try {
    return std::make_unique<TensorStaging>(index_, counts_,
                                           absl::StrCat("session '", session_, "'"));
  } catch (const std::bad_alloc&) {
    absl::MutexLock lock(&mu_);
    --outstanding_;
    return absl::ResourceExhaustedError(absl::StrCat(
        "session '", session_, "': no host memory for another gradient staging buffer"));
  }
}

void StagingPool::Release(std::unique_ptr<TensorStaging> staging) {
  if (staging == nullptr) return;
  absl::MutexLock lock(&mu_);
  --outstanding_;
  free_.push_back(std::move(staging));
}

}  // namespace optd::server
