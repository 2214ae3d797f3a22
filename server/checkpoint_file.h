// A checkpoint file: named byte records, written atomically (a new file either replaces the old
// one completely or not at all) and verified completely when read.
//
// Format, every integer little-endian:
//   header:  8 bytes magic "OPTDCKP1", u32 format version (1)
//   record:  u32 name length (< 0xFFFFFFFF), name bytes, u64 data length, data bytes,
//            u32 CRC-32 (zlib's crc32) of the name length, name, data length and data bytes
//   footer:  u32 kFooterTag (0xFFFFFFFF, no name length equals it), u64 record count,
//            u32 CRC-32 of the tag and count bytes
// Records follow the header back to back; the footer ends the file.
#ifndef OPTD_SERVER_CHECKPOINT_FILE_H_
#define OPTD_SERVER_CHECKPOINT_FILE_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/file_system.h"

namespace optd::server {

inline constexpr absl::string_view kCheckpointMagic = "OPTDCKP1";
inline constexpr uint32_t kCheckpointFormatVersion = 1;
inline constexpr uint32_t kCheckpointFooterTag = 0xFFFFFFFF;

// Writes records to `path + ".tmp"`; Commit() then syncs and closes it, renames it to `path` and
// syncs the parent directory. Any failure, or destroying a writer that was not committed, leaves
// a file already at `path` untouched, and the destructor deletes the temporary file.
// REQUIRES: `path`'s directory exists; at most one writer per path at a time; `fs` outlives the
// writer. Not thread-safe.
class CheckpointWriter {
 public:
  // Creates (or truncates) the temporary file and writes the header.
  static absl::StatusOr<std::unique_ptr<CheckpointWriter>> Create(FileSystem& fs, std::string path);

  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;
  ~CheckpointWriter();

  // Appends one record, writing `data` straight to the file (no copy is kept). InvalidArgument,
  // with nothing written, for an empty name, a name of 0xFFFFFFFF bytes or more, or a name already
  // added. After a file-system error, this and every later call return that error.
  absl::Status AddRecord(absl::string_view name, absl::string_view data);

  // Writes the footer, then Sync, Close, Rename(temporary, path), SyncDir(parent of path). Once
  // the rename has succeeded `path` holds the new checkpoint, even when the directory sync then
  // fails (the error is returned: the new name may not survive a crash). FailedPrecondition when
  // called again.
  absl::Status Commit();

 private:
  CheckpointWriter(FileSystem& fs, std::string path, std::unique_ptr<WritableFile> file);

  // Returns `status`, remembering it in status_ when it is the first failure.
  absl::Status Track(absl::Status status);

  FileSystem& fs_;
  const std::string path_;
  const std::string temporary_path_;
  std::unique_ptr<WritableFile> file_;  // null once closed
  std::set<std::string, std::less<>> names_;
  absl::Status status_;     // the first file-system failure
  bool renamed_ = false;    // the temporary file has become `path_`
  bool committed_ = false;  // Commit was called
};

// A checkpoint file read into memory and verified: the magic and version, every record's
// checksum, unique names, the footer's checksum and record count, and no bytes after the footer.
// Movable; moves keep the views records() hands out valid.
class CheckpointReader {
 public:
  // NotFound when the file is missing (other read errors as FileSystem::ReadFile reports them);
  // DataLoss, naming the path and the record, on any mismatch or truncation.
  static absl::StatusOr<CheckpointReader> Open(FileSystem& fs, const std::string& path);

  // (name, data) in the order written; the data views point into memory this reader owns.
  const std::vector<std::pair<std::string, absl::string_view>>& records() const { return records_; }

  // The data of record `name`; NotFound naming the record and the file when there is none.
  absl::StatusOr<absl::string_view> Find(absl::string_view name) const;

 private:
  CheckpointReader(std::string path, std::unique_ptr<const std::string> contents);

  // Verifies contents_ and fills records_ and index_.
  absl::Status Parse();

  std::string path_;
  std::unique_ptr<const std::string> contents_;
  std::vector<std::pair<std::string, absl::string_view>> records_;
  std::map<absl::string_view, size_t> index_;  // name (a view into contents_) -> records_ index
};

}  // namespace optd::server

#endif  // OPTD_SERVER_CHECKPOINT_FILE_H_
