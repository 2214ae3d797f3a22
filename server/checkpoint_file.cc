#include "server/checkpoint_file.h"

#include <zlib.h>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace optd::server {
namespace {

constexpr size_t kHeaderSize = kCheckpointMagic.size() + sizeof(uint32_t);

void PutU32(std::string& out, uint32_t value) {
  for (int byte = 0; byte < 4; ++byte) out.push_back(static_cast<char>(value >> (8 * byte)));
}

void PutU64(std::string& out, uint64_t value) {
  for (int byte = 0; byte < 8; ++byte) out.push_back(static_cast<char>(value >> (8 * byte)));
}

// Continues the CRC-32 `crc` (0 to start) over `bytes`.
uint32_t ExtendCrc32(uint32_t crc, absl::string_view bytes) {
  // zlib returns 0 for a null buffer whatever `crc` is, and an empty view's data() may be null.
  if (bytes.empty()) return crc;
  return static_cast<uint32_t>(
      crc32_z(crc, reinterpret_cast<const Bytef*>(bytes.data()), bytes.size()));
}

// "/a/b" -> "/a", "/b" -> "/", "b" -> ".".
std::string ParentDir(absl::string_view path) {
  const size_t slash = path.rfind('/');
  if (slash == absl::string_view::npos) return ".";
  if (slash == 0) return "/";
  return std::string(path.substr(0, slash));
}

// Reads little-endian fields from the front of a byte range; every read checks the bytes left
// first, so no length in the data can move it past the end.
class Cursor {
 public:
  explicit Cursor(absl::string_view bytes) : rest_(bytes) {}

  size_t remaining() const { return rest_.size(); }
  const char* position() const { return rest_.data(); }

  // False, consuming nothing, when fewer than `count` bytes are left.
  bool ReadBytes(uint64_t count, absl::string_view& out) {
    if (count > rest_.size()) return false;
    out = rest_.substr(0, static_cast<size_t>(count));
    rest_.remove_prefix(static_cast<size_t>(count));
    return true;
  }

  bool ReadU32(uint32_t& out) {
    uint64_t value;
    if (!ReadLittleEndian(4, value)) return false;
    out = static_cast<uint32_t>(value);
    return true;
  }

  bool ReadU64(uint64_t& out) { return ReadLittleEndian(8, out); }

 private:
  bool ReadLittleEndian(int size, uint64_t& out) {
    absl::string_view bytes;
    if (!ReadBytes(size, bytes)) return false;
    out = 0;
    for (int byte = size - 1; byte >= 0; --byte) {
      out = (out << 8) | static_cast<unsigned char>(bytes[byte]);
    }
    return true;
  }

  absl::string_view rest_;
};

// A record name for an error message: escaped, and cut short when long (a corrupted length can
// make a "name" of megabytes).
std::string QuotedName(absl::string_view name) {
  constexpr size_t kMaxShown = 64;
  return absl::StrCat("'", absl::CHexEscape(name.substr(0, kMaxShown)),
                      name.size() > kMaxShown ? "...'" : "'");
}

}  // namespace

CheckpointWriter::CheckpointWriter(FileSystem& fs, std::string path,
                                   std::unique_ptr<WritableFile> file)
    : fs_(fs), path_(std::move(path)), temporary_path_(path_ + ".tmp"), file_(std::move(file)) {}

absl::StatusOr<std::unique_ptr<CheckpointWriter>> CheckpointWriter::Create(FileSystem& fs,
                                                                           std::string path) {
  if (path.empty()) return absl::InvalidArgumentError("checkpoint path is empty");
  std::unique_ptr<WritableFile> file;
  OPTD_ASSIGN_OR_RETURN(file, fs.NewWritableFile(path + ".tmp"));
  std::unique_ptr<CheckpointWriter> writer(
      new CheckpointWriter(fs, std::move(path), std::move(file)));
  std::string header(kCheckpointMagic);
  PutU32(header, kCheckpointFormatVersion);
  OPTD_RETURN_IF_ERROR(writer->Track(writer->file_->Append(header)));
  return writer;
}

CheckpointWriter::~CheckpointWriter() {
  file_.reset();
  if (!renamed_) fs_.DeleteFile(temporary_path_).IgnoreError();
}

absl::Status CheckpointWriter::Track(absl::Status status) {
  if (status_.ok()) status_ = status;
  return status;
}

absl::Status CheckpointWriter::AddRecord(absl::string_view name, absl::string_view data) {
  if (committed_) {
    return absl::FailedPreconditionError(
        absl::StrCat("checkpoint ", path_, ": AddRecord after Commit"));
  }
  OPTD_RETURN_IF_ERROR(status_);
  if (name.empty() || name.size() >= kCheckpointFooterTag) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint ", path_, ": record name of ",
                                                   name.size(),
                                                   " bytes (must be 1 to 0xFFFFFFFE bytes)"));
  }
  if (names_.find(name) != names_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint ", path_, ": duplicate record name ", QuotedName(name)));
  }
  std::string header;
  PutU32(header, static_cast<uint32_t>(name.size()));
  header.append(name.data(), name.size());
  PutU64(header, data.size());
  std::string checksum;
  PutU32(checksum, ExtendCrc32(ExtendCrc32(0, header), data));
  OPTD_RETURN_IF_ERROR(Track(file_->Append(header)));
  OPTD_RETURN_IF_ERROR(Track(file_->Append(data)));
  OPTD_RETURN_IF_ERROR(Track(file_->Append(checksum)));
  names_.emplace(name);
  return absl::OkStatus();
}

absl::Status CheckpointWriter::Commit() {
  if (committed_) {
    return absl::FailedPreconditionError(
        absl::StrCat("checkpoint ", path_, ": Commit called twice"));
  }
  committed_ = true;
  OPTD_RETURN_IF_ERROR(status_);
  std::string footer;
  PutU32(footer, kCheckpointFooterTag);
  PutU64(footer, names_.size());
  PutU32(footer, ExtendCrc32(0, footer));
  OPTD_RETURN_IF_ERROR(Track(file_->Append(footer)));
  OPTD_RETURN_IF_ERROR(Track(file_->Sync()));
  const absl::Status closed = file_->Close();
  file_.reset();
  OPTD_RETURN_IF_ERROR(Track(closed));
  OPTD_RETURN_IF_ERROR(Track(fs_.Rename(temporary_path_, path_)));
  renamed_ = true;
  return Track(fs_.SyncDir(ParentDir(path_)));
}

CheckpointReader::CheckpointReader(std::string path, std::unique_ptr<const std::string> contents)
    : path_(std::move(path)), contents_(std::move(contents)) {}

absl::StatusOr<CheckpointReader> CheckpointReader::Open(FileSystem& fs, const std::string& path) {
  std::string contents;
  OPTD_ASSIGN_OR_RETURN(contents, fs.ReadFile(path));
  CheckpointReader reader(path, std::make_unique<const std::string>(std::move(contents)));
  OPTD_RETURN_IF_ERROR(reader.Parse());
  return reader;
}

absl::Status CheckpointReader::Parse() {
  const auto corrupt = [this](absl::string_view what) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path_, ": ", what));
  };
  Cursor cursor(*contents_);
  absl::string_view magic;
  uint32_t version;
  if (!cursor.ReadBytes(kCheckpointMagic.size(), magic) || !cursor.ReadU32(version)) {
    return corrupt(
        absl::StrCat("truncated header (", contents_->size(), " of ", kHeaderSize, " bytes)"));
  }
  if (magic != kCheckpointMagic) return corrupt("not an optd checkpoint (bad magic)");
  if (version != kCheckpointFormatVersion) {
    return corrupt(absl::StrCat("unsupported format version ", version, " (this build reads ",
                                kCheckpointFormatVersion, ")"));
  }
  for (;;) {
    const size_t record = records_.size();
    const auto record_error = [&](absl::string_view name, absl::string_view what) {
      return corrupt(absl::StrCat("record ", record, name.empty() ? "" : " ",
                                  name.empty() ? "" : QuotedName(name), ": ", what));
    };
    const char* const record_start = cursor.position();
    uint32_t name_length;
    if (!cursor.ReadU32(name_length)) {
      return corrupt(absl::StrCat("ends after ", record, " records without a footer"));
    }
    if (name_length == kCheckpointFooterTag) break;
    absl::string_view name;
    uint64_t data_length;
    absl::string_view data;
    uint32_t stored_crc;
    if (!cursor.ReadBytes(name_length, name)) {
      return record_error("", absl::StrCat("name of ", name_length, " bytes runs past the end (",
                                           cursor.remaining(), " bytes left)"));
    }
    if (!cursor.ReadU64(data_length)) return record_error(name, "truncated data length");
    if (!cursor.ReadBytes(data_length, data)) {
      return record_error(name, absl::StrCat("data of ", data_length, " bytes runs past the end (",
                                             cursor.remaining(), " bytes left)"));
    }
    if (!cursor.ReadU32(stored_crc)) return record_error(name, "truncated checksum");
    const absl::string_view checksummed(
        record_start, static_cast<size_t>(data.data() + data.size() - record_start));
    const uint32_t computed_crc = ExtendCrc32(0, checksummed);
    if (stored_crc != computed_crc) {
      return record_error(name, absl::StrCat("checksum mismatch (stored ", absl::Hex(stored_crc),
                                             ", computed ", absl::Hex(computed_crc), ")"));
    }
    if (!index_.emplace(name, record).second) return record_error(name, "duplicate name");
    records_.emplace_back(std::string(name), data);
  }
  const char* const footer_start = cursor.position() - sizeof(uint32_t);
  uint64_t record_count;
  uint32_t stored_crc;
  if (!cursor.ReadU64(record_count) || !cursor.ReadU32(stored_crc)) {
    return corrupt("truncated footer");
  }
  const uint32_t computed_crc =
      ExtendCrc32(0, absl::string_view(footer_start, sizeof(uint32_t) + sizeof(uint64_t)));
  if (stored_crc != computed_crc) {
    return corrupt(absl::StrCat("footer checksum mismatch (stored ", absl::Hex(stored_crc),
                                ", computed ", absl::Hex(computed_crc), ")"));
  }
  if (record_count != records_.size()) {
    return corrupt(
        absl::StrCat("footer counts ", record_count, " records, the file holds ", records_.size()));
  }
  if (cursor.remaining() != 0) {
    return corrupt(absl::StrCat(cursor.remaining(), " bytes after the footer"));
  }
  return absl::OkStatus();
}

absl::StatusOr<absl::string_view> CheckpointReader::Find(absl::string_view name) const {
  const auto found = index_.find(name);
  if (found == index_.end()) {
    return absl::NotFoundError(
        absl::StrCat("checkpoint ", path_, " has no record ", QuotedName(name)));
  }
  return records_[found->second].second;
}

}  // namespace optd::server
