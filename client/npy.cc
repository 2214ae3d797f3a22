#include "client/npy.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "common/dtype.h"
#include "common/float16.h"
#include "common/status_macros.h"

namespace optd::client {
namespace {

// Elements move between file and memory by memcpy, which keeps little-endian ('<') bytes only on
// a little-endian host.
static_assert(std::endian::native == std::endian::little, "npy.cc assumes a little-endian host");

constexpr absl::string_view kMagic("\x93NUMPY", 6);
// numpy's ARRAY_ALIGN: writers pad the header so the data starts at a multiple of this.
constexpr size_t kAlignment = 64;
// Magic, major and minor version bytes; the header length follows.
constexpr size_t kVersionEnd = 8;
// Longest header excerpt a parse error quotes.
constexpr size_t kQuotedHeaderLimit = 200;

struct FileCloser {
  void operator()(FILE* file) const { fclose(file); }
};
using File = std::unique_ptr<FILE, FileCloser>;

// `text` with bytes outside printable ASCII written as \xNN, for quoting file contents in messages.
std::string Printable(absl::string_view text) {
  std::string out;
  for (const char c : text) {
    if (absl::ascii_isprint(c)) {
      out.push_back(c);
    } else {
      absl::StrAppend(&out, "\\x", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
    }
  }
  return out;
}

absl::Status NpyError(absl::string_view path, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", problem));
}

// Python's repr of the shape tuple, "()", "(5,)" or "(3, 4)", as headers and messages write it.
std::string ShapeRepr(absl::Span<const int64_t> shape) {
  if (shape.size() == 1) return absl::StrCat("(", shape[0], ",)");
  return absl::StrCat("(", absl::StrJoin(shape, ", "), ")");
}

absl::StatusOr<int64_t> ElementCount(absl::string_view path, absl::Span<const int64_t> shape) {
  int64_t count = 1;
  for (const int64_t dim : shape) {
    if (dim < 0) {
      return NpyError(path, absl::StrCat("shape ", ShapeRepr(shape), " has a negative dimension"));
    }
    if (__builtin_mul_overflow(count, dim, &count)) {
      return NpyError(path, absl::StrCat("shape ", ShapeRepr(shape), " overflows int64"));
    }
  }
  return count;
}

// The header dict as numpy writes it, e.g. "{'descr': '<f4', 'fortran_order': False, 'shape':
// (3, 4), }" followed by padding spaces and '\n'.
struct NpyHeader {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
};

// Parses the Python dict literal of a .npy header: keys 'descr', 'fortran_order' and 'shape',
// each exactly once and in any order (numpy rejects other keys too); strings in ' or "; optional
// trailing commas; whitespace, numpy's padding and '\n' included, after the closing brace.
// Errors state the problem alone; ReadNpy names the file.
class HeaderParser {
 public:
  explicit HeaderParser(absl::string_view text) : rest_(text) {}

  absl::StatusOr<NpyHeader> Parse() {
    if (!Consume('{')) return Expected("'{'");
    NpyHeader header;
    bool have_descr = false;
    bool have_fortran_order = false;
    bool have_shape = false;
    while (!Consume('}')) {
      OPTD_ASSIGN_OR_RETURN(const std::string key, ParseString());
      if (!Consume(':')) return Expected("':'");
      if (key == "descr" && !have_descr) {
        have_descr = true;
        OPTD_ASSIGN_OR_RETURN(header.descr, ParseString());
      } else if (key == "fortran_order" && !have_fortran_order) {
        have_fortran_order = true;
        OPTD_ASSIGN_OR_RETURN(header.fortran_order, ParseBool());
      } else if (key == "shape" && !have_shape) {
        have_shape = true;
        OPTD_ASSIGN_OR_RETURN(header.shape, ParseShape());
      } else {
        return absl::InvalidArgumentError(absl::StrCat("unexpected or repeated key '", key, "'"));
      }
      if (!Consume(',')) {
        if (!Consume('}')) return Expected("',' or '}'");
        break;
      }
    }
    if (!have_descr) return absl::InvalidArgumentError("no 'descr' key");
    if (!have_fortran_order) return absl::InvalidArgumentError("no 'fortran_order' key");
    if (!have_shape) return absl::InvalidArgumentError("no 'shape' key");
    SkipSpace();
    if (!rest_.empty()) return Expected("only whitespace after '}'");
    return header;
  }

 private:
  void SkipSpace() { rest_ = absl::StripLeadingAsciiWhitespace(rest_); }

  bool Consume(char c) {
    SkipSpace();
    return absl::ConsumePrefix(&rest_, absl::string_view(&c, 1));
  }

  absl::Status Expected(absl::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat("expected ", what, " at \"", Printable(rest_.substr(0, 20)), "\""));
  }

  absl::StatusOr<std::string> ParseString() {
    SkipSpace();
    if (rest_.empty() || (rest_.front() != '\'' && rest_.front() != '"')) {
      return Expected("a quoted string");
    }
    const size_t close = rest_.find(rest_.front(), 1);
    if (close == absl::string_view::npos) return Expected("a closing quote");
    std::string value(rest_.substr(1, close - 1));
    rest_.remove_prefix(close + 1);
    return value;
  }

  absl::StatusOr<bool> ParseBool() {
    SkipSpace();
    if (absl::ConsumePrefix(&rest_, "True")) return true;
    if (absl::ConsumePrefix(&rest_, "False")) return false;
    return Expected("True or False");
  }

  // "()", "(5,)", "(3, 4)", "(3, 4,)"; "(5)" is the integer 5 in Python, not a shape.
  absl::StatusOr<std::vector<int64_t>> ParseShape() {
    if (!Consume('(')) return Expected("a shape tuple");
    std::vector<int64_t> shape;
    if (Consume(')')) return shape;
    while (true) {
      OPTD_ASSIGN_OR_RETURN(const int64_t dim, ParseDimension());
      shape.push_back(dim);
      if (Consume(')')) {
        if (shape.size() == 1) return Expected("',' after a 1-d shape's only dimension");
        return shape;
      }
      if (!Consume(',')) return Expected("',' or ')'");
      if (Consume(')')) return shape;
    }
  }

  absl::StatusOr<int64_t> ParseDimension() {
    SkipSpace();
    size_t digits = 0;
    while (digits < rest_.size() && absl::ascii_isdigit(rest_[digits])) ++digits;
    if (digits == 0) return Expected("a non-negative dimension");
    int64_t dim;
    if (!absl::SimpleAtoi(rest_.substr(0, digits), &dim)) {
      return absl::InvalidArgumentError(
          absl::StrCat("dimension ", rest_.substr(0, digits), " overflows int64"));
    }
    rest_.remove_prefix(digits);
    absl::ConsumePrefix(&rest_, "L");  // numpy under Python 2 wrote long integers as "3L"
    return dim;
  }

  absl::string_view rest_;
};

// absl::ErrnoToStatus, never OK: a failed call that left errno 0 becomes Unknown.
absl::Status ErrnoError(int error_number, absl::string_view message) {
  if (error_number == 0) return absl::UnknownError(message);
  return absl::ErrnoToStatus(error_number, message);
}

absl::Status ReadExactly(FILE* file, absl::string_view path, void* destination, size_t bytes) {
  if (fread(destination, 1, bytes, file) == bytes) return absl::OkStatus();
  if (ferror(file) != 0) return ErrnoError(errno, absl::StrCat("cannot read ", path));
  return NpyError(path, "the file ended early (it shrank while being read)");
}

uint32_t LoadLittleEndian(const unsigned char* bytes, size_t count) {
  uint32_t value = 0;
  for (size_t i = 0; i < count; ++i) value |= static_cast<uint32_t>(bytes[i]) << (8 * i);
  return value;
}

// The header as ReadHeaderText found it: the dict's text and the offset of the first data byte.
struct HeaderText {
  std::string text;
  uint64_t data_start;
};

// Reads the preamble (magic, version, header length) and the header text, leaving `file` at the
// first data byte.
absl::StatusOr<HeaderText> ReadHeaderText(FILE* file, absl::string_view path, uint64_t file_size) {
  unsigned char preamble[kVersionEnd + 4];
  const size_t leading_bytes = std::min<uint64_t>(file_size, kVersionEnd + 2);
  OPTD_RETURN_IF_ERROR(ReadExactly(file, path, preamble, leading_bytes));
  const absl::string_view magic(reinterpret_cast<const char*>(preamble),
                                std::min(leading_bytes, kMagic.size()));
  if (magic != kMagic) {
    return NpyError(path, absl::StrCat("not a .npy file: it starts with \"", Printable(magic),
                                       "\", not the magic \"\\x93NUMPY\""));
  }
  if (leading_bytes < kVersionEnd + 2) return NpyError(path, "the file ends inside the preamble");
  const int major = preamble[6];
  const int minor = preamble[7];
  // Version 1.0 stores the header length as a uint16, versions 2.0 and 3.0 (3.0: header in UTF-8)
  // as a uint32.
  size_t length_bytes;
  if (major == 1 && minor == 0) {
    length_bytes = 2;
  } else if ((major == 2 || major == 3) && minor == 0) {
    length_bytes = 4;
    if (file_size < kVersionEnd + length_bytes) {
      return NpyError(path, "the file ends inside the preamble");
    }
    OPTD_RETURN_IF_ERROR(ReadExactly(file, path, preamble + kVersionEnd + 2, 2));
  } else {
    return NpyError(path, absl::StrCat("unsupported .npy format version ", major, ".", minor,
                                       "; ReadNpy reads 1.0, 2.0 and 3.0"));
  }
  const uint64_t header_start = kVersionEnd + length_bytes;
  const uint64_t header_length = LoadLittleEndian(preamble + kVersionEnd, length_bytes);
  if (header_length > file_size - header_start) {
    return NpyError(
        path, absl::StrCat("the header of ", header_length, " bytes runs past the end of the ",
                           file_size, "-byte file"));
  }
  HeaderText header{std::string(header_length, '\0'), header_start + header_length};
  OPTD_RETURN_IF_ERROR(ReadExactly(file, path, header.text.data(), header_length));
  return header;
}

// Fortran order stores element (i0, i1, ..., ik) at i0 + d0·(i1 + d1·(... + d(k-1)·ik)): walk
// the source in storage order, first index fastest, and place each element at its C offset.
std::vector<float> FortranToCOrder(const std::vector<float>& fortran,
                                   absl::Span<const int64_t> shape) {
  // No elements: nothing to place, and with a zero dimension the other dimensions' products (the
  // strides) may overflow (npy_fuzz: shape (0, 66666, 66, 6666, ...)).
  if (fortran.empty()) return {};
  const size_t rank = shape.size();
  std::vector<int64_t> c_stride(rank, 1);
  for (size_t k = rank; k > 1; --k) c_stride[k - 2] = c_stride[k - 1] * shape[k - 1];
  std::vector<float> c_order(fortran.size());
  std::vector<int64_t> index(rank, 0);
  int64_t offset = 0;
  for (const float value : fortran) {
    c_order[offset] = value;
    for (size_t k = 0; k < rank; ++k) {
      offset += c_stride[k];
      if (++index[k] < shape[k]) break;
      offset -= c_stride[k] * shape[k];
      index[k] = 0;
    }
  }
  return c_order;
}

absl::Status ConvertFloat64(absl::string_view path, absl::Span<const unsigned char> raw,
                            std::vector<float>& out) {
  // Finite doubles at or past the midpoint between FLT_MAX and 2^128 round to infinity.
  constexpr double kRoundsToInfinity = 0x1.ffffffp127;
  for (size_t i = 0; i < out.size(); ++i) {
    double value;
    memcpy(&value, raw.data() + sizeof(double) * i, sizeof(double));
    if (std::isfinite(value) && std::fabs(value) >= kRoundsToInfinity) {
      return NpyError(path, absl::StrCat("element ", i, " (", value,
                                         ") of the '<f8' data is beyond float32 range"));
    }
    out[i] = static_cast<float>(value);
  }
  return absl::OkStatus();
}

void ConvertFloat16(absl::Span<const unsigned char> raw, std::vector<float>& out) {
  for (size_t i = 0; i < out.size(); ++i) {
    uint16_t bits;
    memcpy(&bits, raw.data() + sizeof(bits) * i, sizeof(bits));
    out[i] = HalfBitsToFloat(bits);
  }
}

// The header bytes up to the data: magic, version, header length, and the dict padded with
// spaces and ended by '\n' so the data starts at a multiple of kAlignment (numpy's
// format._wrap_header).
std::string EncodePreambleAndHeader(absl::Span<const int64_t> shape) {
  const std::string dict =
      absl::StrCat("{'descr': '<f4', 'fortran_order': False, 'shape': ", ShapeRepr(shape), ", }");
  const auto padded_length = [&dict](size_t header_start) {
    const size_t unpadded_end = header_start + dict.size() + 1;
    return (unpadded_end + kAlignment - 1) / kAlignment * kAlignment - header_start;
  };
  char major = 1;
  size_t length_bytes = 2;
  size_t header_length = padded_length(kVersionEnd + length_bytes);
  if (header_length > 0xffff) {  // version 1.0's header length is a uint16
    major = 2;
    length_bytes = 4;
    header_length = padded_length(kVersionEnd + length_bytes);
  }
  std::string out(kMagic);
  out.push_back(major);
  out.push_back(0);
  for (size_t i = 0; i < length_bytes; ++i) {
    out.push_back(static_cast<char>((header_length >> (8 * i)) & 0xff));
  }
  out += dict;
  out.append(header_length - dict.size() - 1, ' ');
  out.push_back('\n');
  return out;
}

absl::Status WriteAndSync(FILE* file, absl::string_view path, absl::string_view header,
                          absl::Span<const float> data) {
  const bool written =
      fwrite(header.data(), 1, header.size(), file) == header.size() &&
      (data.empty() || fwrite(data.data(), sizeof(float), data.size(), file) == data.size());
  // fsync before the rename: after a crash `path` then holds the old file or the whole new one.
  if (!written || fflush(file) != 0 || fsync(fileno(file)) != 0) {
    return ErrnoError(errno, absl::StrCat("cannot write ", path));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<NpyArray> ReadNpy(const std::string& path) {
  const File file(fopen(path.c_str(), "rb"));
  if (file == nullptr) return ErrnoError(errno, absl::StrCat("cannot open ", path));
  struct stat info;
  if (fstat(fileno(file.get()), &info) != 0) {
    return ErrnoError(errno, absl::StrCat("cannot stat ", path));
  }
  if (!S_ISREG(info.st_mode)) return NpyError(path, "not a regular file");
  const uint64_t file_size = static_cast<uint64_t>(info.st_size);

  OPTD_ASSIGN_OR_RETURN(const HeaderText header_text, ReadHeaderText(file.get(), path, file_size));
  absl::StatusOr<NpyHeader> header = HeaderParser(header_text.text).Parse();
  if (!header.ok()) {
    return NpyError(
        path,
        absl::StrCat("header \"",
                     Printable(absl::string_view(header_text.text).substr(0, kQuotedHeaderLimit)),
                     "\" does not parse: ", header.status().message()));
  }

  DType dtype;
  if (header->descr == "<f4") {
    dtype = DType::kF32;
  } else if (header->descr == "<f8") {
    dtype = DType::kF64;
  } else if (header->descr == "<f2") {
    dtype = DType::kF16;
  } else {
    return NpyError(path, absl::StrCat("unsupported dtype '", Printable(header->descr),
                                       "'; ReadNpy reads '<f4', '<f8' and '<f2'"));
  }
  OPTD_ASSIGN_OR_RETURN(const int64_t count, ElementCount(path, header->shape));
  uint64_t data_bytes;
  if (__builtin_mul_overflow(static_cast<uint64_t>(count), DTypeSize(dtype), &data_bytes)) {
    return NpyError(path, absl::StrCat("shape ", ShapeRepr(header->shape), " of '", header->descr,
                                       "' overflows the byte count"));
  }
  const uint64_t available = file_size - header_text.data_start;
  if (available != data_bytes) {
    return NpyError(
        path, absl::StrCat("the data is ", available, " bytes but shape ", ShapeRepr(header->shape),
                           " of '", header->descr, "' needs ", data_bytes));
  }

  NpyArray array;
  array.shape = std::move(header->shape);
  array.data.resize(count);
  if (dtype == DType::kF32) {
    OPTD_RETURN_IF_ERROR(ReadExactly(file.get(), path, array.data.data(), data_bytes));
  } else {
    std::vector<unsigned char> raw(data_bytes);
    OPTD_RETURN_IF_ERROR(ReadExactly(file.get(), path, raw.data(), data_bytes));
    if (dtype == DType::kF64) {
      OPTD_RETURN_IF_ERROR(ConvertFloat64(path, raw, array.data));
    } else {
      ConvertFloat16(raw, array.data);
    }
  }
  if (header->fortran_order && array.shape.size() > 1) {
    array.data = FortranToCOrder(array.data, array.shape);
  }
  return array;
}

absl::Status WriteNpy(const std::string& path, absl::Span<const int64_t> shape,
                      absl::Span<const float> data) {
  OPTD_ASSIGN_OR_RETURN(const int64_t count, ElementCount(path, shape));
  if (static_cast<uint64_t>(count) != data.size()) {
    return NpyError(path, absl::StrCat("shape ", ShapeRepr(shape), " holds ", count,
                                       " elements but the data has ", data.size()));
  }
  const std::string header = EncodePreambleAndHeader(shape);
  const std::string temp_path = path + ".tmp";
  File file(fopen(temp_path.c_str(), "wb"));
  if (file == nullptr) {
    return ErrnoError(errno, absl::StrCat("cannot create ", temp_path));
  }
  absl::Status status = WriteAndSync(file.get(), temp_path, header, data);
  if (fclose(file.release()) != 0 && status.ok()) {
    status = ErrnoError(errno, absl::StrCat("cannot close ", temp_path));
  }
  if (status.ok() && rename(temp_path.c_str(), path.c_str()) != 0) {
    status = ErrnoError(errno, absl::StrCat("cannot rename ", temp_path, " to ", path));
  }
  if (!status.ok()) unlink(temp_path.c_str());
  return status;
}

}  // namespace optd::client
