#include "common/wire.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/float16.h"

namespace optd {
namespace {

uint16_t LoadHalfWord(const char* p) {
  uint16_t word;
  std::memcpy(&word, p, sizeof(word));
  return word;
}

}  // namespace

absl::StatusOr<DecodeReport> DecodeWire(DType dtype, absl::string_view bytes, absl::Span<float> out,
                                        float max_magnitude) {
  if (dtype == DType::kF64) {
    return absl::InvalidArgumentError("fp64 is not a wire dtype; use fp32, bf16 or fp16");
  }
  const size_t size = DTypeSize(dtype);
  if (bytes.size() % size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(bytes.size(), " bytes of ", DTypeName(dtype),
                                                   " is not a whole number of elements"));
  }
  if (bytes.size() / size != out.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("decoding ", bytes.size() / size, " elements into room for ", out.size()));
  }
  const char* p = bytes.data();
  // One pass: each value is widened, stored and range-checked together; the checks count
  // without branching, and only a chunk with a bad value is scanned again for the first one.
  int64_t bad = 0;
  switch (dtype) {
    case DType::kF32:
      for (size_t i = 0; i < out.size(); ++i) {
        float x;
        std::memcpy(&x, p + 4 * i, sizeof(x));
        out[i] = x;
        bad += IsOutOfRange(x, max_magnitude);
      }
      break;
    case DType::kBF16:
      for (size_t i = 0; i < out.size(); ++i) {
        const float x = Bf16BitsToFloat(LoadHalfWord(p + 2 * i));
        out[i] = x;
        bad += IsOutOfRange(x, max_magnitude);
      }
      break;
    case DType::kF16:
      for (size_t i = 0; i < out.size(); ++i) {
        const float x = HalfBitsToFloat(LoadHalfWord(p + 2 * i));
        out[i] = x;
        bad += IsOutOfRange(x, max_magnitude);
      }
      break;
    case DType::kF64:
      break;
  }
  DecodeReport report;
  report.out_of_range = bad;
  for (size_t i = 0; bad > 0 && i < out.size(); ++i) {
    if (IsOutOfRange(out[i], max_magnitude)) {
      report.first_out_of_range = static_cast<int64_t>(i);
      break;
    }
  }
  return report;
}

absl::Status EncodeWire(DType dtype, absl::Span<const float> values, std::string& out) {
  if (dtype == DType::kF64) {
    return absl::InvalidArgumentError("fp64 is not a wire dtype; use fp32, bf16 or fp16");
  }
  const size_t start = out.size();
  out.resize(start + values.size() * DTypeSize(dtype));
  return EncodeWireInto(dtype, values, out.data() + start);
}

absl::Status EncodeWireInto(DType dtype, absl::Span<const float> values, char* p) {
  if (dtype == DType::kF64) {
    return absl::InvalidArgumentError("fp64 is not a wire dtype; use fp32, bf16 or fp16");
  }
  switch (dtype) {
    case DType::kF32:
      if (!values.empty()) std::memcpy(p, values.data(), values.size() * sizeof(float));
      break;
    case DType::kBF16:
      for (size_t i = 0; i < values.size(); ++i) {
        const uint16_t word = FloatToBf16Bits(values[i]);
        std::memcpy(p + 2 * i, &word, sizeof(word));
      }
      break;
    case DType::kF16:
      for (size_t i = 0; i < values.size(); ++i) {
        const uint16_t word = FloatToHalfBits(values[i]);
        std::memcpy(p + 2 * i, &word, sizeof(word));
      }
      break;
    case DType::kF64:
      break;
  }
  return absl::OkStatus();
}

}  // namespace optd
