#include "server/chunk_view.h"

#include <algorithm>

namespace optd::server {
namespace {

// Reads protobuf's wire format across the slices of one message.
class SliceReader {
 public:
  explicit SliceReader(const std::vector<grpc::Slice>& slices) : slices_(slices) {
    for (const grpc::Slice& slice : slices) remaining_ += slice.size();
    Settle();
  }

  size_t remaining() const { return remaining_; }

  // A varint in its shortest form, of at most `max_bytes` bytes (10 for a 64-bit value; tags
  // and lengths, which protobuf reads as 32-bit values, 5). A longer form, which no serializer
  // writes, is left to protobuf like any other message ViewChunk does not take.
  bool ReadVarint(uint64_t& value, int max_bytes = 10) {
    value = 0;
    for (int i = 0; i < max_bytes; ++i) {
      if (remaining_ == 0) return false;
      const uint8_t byte = slices_[slice_].begin()[position_];
      Advance(1);
      if (i == 9 && byte > 1) return false;  // beyond 64 bits
      if (i > 0 && byte == 0) return false;  // not the shortest form
      value |= static_cast<uint64_t>(byte & 0x7f) << (7 * i);
      if ((byte & 0x80) == 0) return true;
    }
    return false;
  }

  // A tag or a length: a 32-bit varint, a length below 2^31.
  bool ReadSmall(uint64_t& value) { return ReadVarint(value, 5) && value < (uint64_t{1} << 31); }

  // The next `n` bytes, as the pieces of the slices that hold them.
  bool Take(size_t n, std::vector<absl::string_view>& pieces) {
    if (n > remaining_) return false;
    while (n > 0) {
      const grpc::Slice& slice = slices_[slice_];
      const size_t here = std::min(n, slice.size() - position_);
      pieces.emplace_back(reinterpret_cast<const char*>(slice.begin()) + position_, here);
      Advance(here);
      n -= here;
    }
    return true;
  }

 private:
  void Advance(size_t n) {
    position_ += n;
    remaining_ -= n;
    Settle();
  }
  // Past empty slices and the end of the current one.
  void Settle() {
    while (slice_ < slices_.size() && position_ == slices_[slice_].size()) {
      ++slice_;
      position_ = 0;
    }
  }

  const std::vector<grpc::Slice>& slices_;
  size_t slice_ = 0;
  size_t position_ = 0;
  size_t remaining_ = 0;
};

constexpr uint64_t kVarint = 0, kLengthDelimited = 2;

// Structurally valid UTF-8 (what protobuf requires of a string field): no overlong forms, no
// surrogates, nothing beyond U+10FFFF.
bool IsUtf8(absl::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const unsigned char* end = p + s.size();
  while (p < end) {
    const unsigned char c = *p;
    if (c < 0x80) {
      ++p;
      continue;
    }
    int n = 0;
    uint32_t code = 0, min = 0;
    if ((c & 0xe0) == 0xc0) {
      n = 1, code = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
      n = 2, code = c & 0x0f, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
      n = 3, code = c & 0x07, min = 0x10000;
    } else {
      return false;
    }
    if (end - p <= n) return false;
    for (int i = 1; i <= n; ++i) {
      if ((p[i] & 0xc0) != 0x80) return false;
      code = (code << 6) | (p[i] & 0x3f);
    }
    if (code < min || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) return false;
    p += n + 1;
  }
  return true;
}

}  // namespace

ChunkView ChunkView::Of(const v1::TensorChunk& chunk) {
  ChunkView view;
  view.tensor = chunk.tensor();
  view.offset = chunk.offset();
  view.dtype = chunk.dtype();
  view.tensor_elements = chunk.tensor_elements();
  if (!chunk.data().empty()) view.data.push_back(chunk.data());
  view.data_bytes = chunk.data().size();
  return view;
}

bool ViewChunk(const std::vector<grpc::Slice>& slices, ChunkView& view) {
  SliceReader reader(slices);
  uint64_t tag = 0, length = 0;
  // The request: field 2 (chunk) once, and nothing else.
  if (!reader.ReadSmall(tag) || tag != (2 << 3 | kLengthDelimited)) return false;
  if (!reader.ReadSmall(length) || length != reader.remaining()) return false;
  view = ChunkView();
  bool seen[6] = {};
  std::vector<absl::string_view> name;
  while (reader.remaining() > 0) {
    if (!reader.ReadSmall(tag)) return false;
    const uint64_t field = tag >> 3, wire_type = tag & 7;
    if (field < 1 || field > 5 || seen[field]) return false;
    seen[field] = true;
    const bool bytes_field = field == 1 || field == 4;
    if (wire_type != (bytes_field ? kLengthDelimited : kVarint)) return false;
    uint64_t value = 0;
    if (!(bytes_field ? reader.ReadSmall(value) : reader.ReadVarint(value))) return false;
    switch (field) {
      case 1:
        if (!reader.Take(value, name)) return false;
        break;
      case 2:
        view.offset = static_cast<int64_t>(value);
        break;
      case 3:
        view.dtype = static_cast<int32_t>(value);  // an enum is an int32 (truncated, as protobuf)
        break;
      case 4:
        if (!reader.Take(value, view.data)) return false;
        view.data_bytes = value;
        break;
      case 5:
        view.tensor_elements = static_cast<int64_t>(value);
        break;
    }
  }
  for (absl::string_view piece : name) view.tensor.append(piece.data(), piece.size());
  return IsUtf8(view.tensor);
}

}  // namespace optd::server
