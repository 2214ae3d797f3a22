#include "server/checkpoint_file.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <zlib.h>

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "server/file_system.h"
#include "tests/server/fault_injection_file_system.h"

namespace optd::server {
namespace {

using Records = std::vector<std::pair<std::string, std::string>>;

// Little-endian encodings and the CRC written out here, independently of checkpoint_file.cc, so
// the layout tests check the documented format rather than the writer's own encoder.
std::string U32(uint32_t value) {
  std::string out(4, '\0');
  for (int i = 0; i < 4; ++i) out[i] = static_cast<char>((value >> (8 * i)) & 0xFF);
  return out;
}
std::string U64(uint64_t value) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((value >> (8 * i)) & 0xFF);
  return out;
}
std::string Crc(const std::string& bytes) {
  return U32(static_cast<uint32_t>(
      crc32(0, reinterpret_cast<const Bytef*>(bytes.data()), static_cast<uInt>(bytes.size()))));
}
std::string EncodedRecord(const std::string& name, const std::string& data) {
  const std::string covered = U32(name.size()) + name + U64(data.size()) + data;
  return covered + Crc(covered);
}
std::string EncodedFooter(uint64_t count) {
  const std::string covered = U32(0xFFFFFFFF) + U64(count);
  return covered + Crc(covered);
}
std::string EncodedHeader(uint32_t version = 1) { return "OPTDCKP1" + U32(version); }

Records ToRecords(const CheckpointReader& reader) {
  Records out;
  for (const auto& [name, data] : reader.records()) out.emplace_back(name, std::string(data));
  return out;
}

std::string PseudoRandomBytes(size_t size, uint32_t seed) {
  std::mt19937 engine(seed);
  std::string out(size, '\0');
  for (char& c : out) c = static_cast<char>(engine() & 0xFF);
  return out;
}

// Writes `records` and commits. When `keep_going`, carries on after a failed AddRecord, as a
// careless caller would, and reports the first error: Commit must still not publish the file.
absl::Status WriteCheckpoint(FileSystem& fs, const std::string& path, const Records& records,
                             bool keep_going = false) {
  absl::StatusOr<std::unique_ptr<CheckpointWriter>> writer = CheckpointWriter::Create(fs, path);
  if (!writer.ok()) return writer.status();
  absl::Status first_error;
  for (const auto& [name, data] : records) {
    absl::Status added = (*writer)->AddRecord(name, data);
    if (!added.ok() && !keep_going) return added;
    first_error.Update(added);
  }
  first_error.Update((*writer)->Commit());
  return first_error;
}

void WriteRawFile(const std::string& path, absl::string_view bytes) {
  absl::StatusOr<std::unique_ptr<WritableFile>> file = PosixFileSystem().NewWritableFile(path);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_TRUE((*file)->Append(bytes).ok());
  ASSERT_TRUE((*file)->Close().ok());
}

class CheckpointFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = absl::StrCat(::testing::TempDir(), "checkpoint_file_test.XXXXXX");
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    path_ = dir_ + "/ckpt";
  }
  void TearDown() override { EXPECT_TRUE(fs_.DeleteRecursively(dir_).ok()); }

  std::vector<std::string> DirEntries() {
    absl::StatusOr<std::vector<std::string>> names = fs_.ListDir(dir_);
    EXPECT_TRUE(names.ok()) << names.status();
    return names.ok() ? *names : std::vector<std::string>{};
  }

  // DataLoss naming the file, when `bytes` is read as a checkpoint.
  void ExpectDataLoss(absl::string_view bytes) {
    WriteRawFile(path_, bytes);
    const absl::StatusOr<CheckpointReader> reader = CheckpointReader::Open(fs_, path_);
    ASSERT_EQ(reader.status().code(), absl::StatusCode::kDataLoss) << reader.status();
    EXPECT_NE(reader.status().message().find(path_), absl::string_view::npos);
  }

  FileSystem& fs_ = PosixFileSystem();
  std::string dir_;
  std::string path_;
};

TEST_F(CheckpointFileTest, RoundTripsRecordsInWriteOrder) {
  const Records records = {{"w.momentum", "hello"},
                           {"empty", ""},
                           {"big", PseudoRandomBytes(6 << 20, 1)},
                           {std::string("nul\0name", 8), std::string("\0\xff\0", 3)},
                           {"a", "last"}};
  ASSERT_TRUE(WriteCheckpoint(fs_, path_, records).ok());
  EXPECT_EQ(DirEntries(), std::vector<std::string>{"ckpt"});

  absl::StatusOr<CheckpointReader> reader = CheckpointReader::Open(fs_, path_);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ(ToRecords(*reader), records);
  for (const auto& [name, data] : records) {
    const absl::StatusOr<absl::string_view> found = reader->Find(name);
    ASSERT_TRUE(found.ok()) << found.status();
    EXPECT_EQ(*found, data);
  }
  const absl::StatusOr<absl::string_view> missing = reader->Find("w.velocity");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("'w.velocity'"), absl::string_view::npos);
}

TEST_F(CheckpointFileTest, ZeroRecords) {
  ASSERT_TRUE(WriteCheckpoint(fs_, path_, {}).ok());
  absl::StatusOr<CheckpointReader> reader = CheckpointReader::Open(fs_, path_);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_TRUE(reader->records().empty());
}

TEST_F(CheckpointFileTest, MovedReaderKeepsItsViews) {
  const Records records = {{"short", "x"}, {"long", PseudoRandomBytes(1000, 2)}};
  ASSERT_TRUE(WriteCheckpoint(fs_, path_, records).ok());
  absl::StatusOr<CheckpointReader> opened = CheckpointReader::Open(fs_, path_);
  ASSERT_TRUE(opened.ok()) << opened.status();
  std::vector<CheckpointReader> readers;
  readers.push_back(*std::move(opened));
  for (int i = 0; i < 8; ++i) readers.push_back(*CheckpointReader::Open(fs_, path_));
  for (const CheckpointReader& reader : readers) {
    EXPECT_EQ(ToRecords(reader), records);
    EXPECT_EQ(*reader.Find("short"), "x");
  }
}

TEST_F(CheckpointFileTest, FileMatchesDocumentedLayout) {
  ASSERT_TRUE(WriteCheckpoint(fs_, path_, {{"ab", "xyz"}, {"e", ""}}).ok());
  const absl::StatusOr<std::string> bytes = fs_.ReadFile(path_);
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ(*bytes, EncodedHeader() + EncodedRecord("ab", "xyz") + EncodedRecord("e", "") +
                        EncodedFooter(2));
}

TEST_F(CheckpointFileTest, RejectsBadNamesAndKeepsWriting) {
  absl::StatusOr<std::unique_ptr<CheckpointWriter>> writer = CheckpointWriter::Create(fs_, path_);
  ASSERT_TRUE(writer.ok()) << writer.status();
  ASSERT_TRUE((*writer)->AddRecord("a", "1").ok());
  const absl::Status duplicate = (*writer)->AddRecord("a", "2");
  EXPECT_EQ(duplicate.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(duplicate.message().find("'a'"), absl::string_view::npos);
  EXPECT_EQ((*writer)->AddRecord("", "3").code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE((*writer)->AddRecord("b", "4").ok());
  ASSERT_TRUE((*writer)->Commit().ok());
  EXPECT_EQ((*writer)->Commit().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*writer)->AddRecord("c", "5").code(), absl::StatusCode::kFailedPrecondition);
  writer->reset();

  absl::StatusOr<CheckpointReader> reader = CheckpointReader::Open(fs_, path_);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ(ToRecords(*reader), (Records{{"a", "1"}, {"b", "4"}}));
}

TEST_F(CheckpointFileTest, MissingFileIsNotFound) {
  EXPECT_EQ(CheckpointReader::Open(fs_, path_).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CheckpointFileTest, EveryFlippedByteIsDataLoss) {
  const Records records = {{"m", "abcdef"}, {"empty", ""}, {"v", "0123456789"}};
  ASSERT_TRUE(WriteCheckpoint(fs_, path_, records).ok());
  const std::string good = *fs_.ReadFile(path_);
  for (size_t position = 0; position < good.size(); ++position) {
    for (const unsigned char mask : {0x01, 0x80, 0xFF}) {
      SCOPED_TRACE(absl::StrCat("byte ", position, " ^ ", mask));
      std::string bad = good;
      bad[position] = static_cast<char>(bad[position] ^ mask);
      ExpectDataLoss(bad);
    }
  }
}

TEST_F(CheckpointFileTest, EveryTruncationIsDataLoss) {
  ASSERT_TRUE(WriteCheckpoint(fs_, path_, {{"m", "abcdef"}, {"empty", ""}, {"v", "0123"}}).ok());
  const std::string good = *fs_.ReadFile(path_);
  for (size_t length = 0; length < good.size(); ++length) {
    SCOPED_TRACE(absl::StrCat("length ", length));
    ExpectDataLoss(absl::string_view(good).substr(0, length));
  }
}

TEST_F(CheckpointFileTest, StructuralMismatchesWithValidChecksumsAreDataLoss) {
  const std::string record = EncodedRecord("a", "1");
  ExpectDataLoss(EncodedHeader() + record + EncodedFooter(2));           // count too high
  ExpectDataLoss(EncodedHeader() + record + EncodedFooter(0));           // count too low
  ExpectDataLoss(EncodedHeader() + record + EncodedFooter(1) + "x");     // trailing byte
  ExpectDataLoss(EncodedHeader() + record + record + EncodedFooter(2));  // duplicate name
  ExpectDataLoss(EncodedHeader(2) + record + EncodedFooter(1));          // unknown version
  ExpectDataLoss(EncodedHeader() + record);                              // no footer
  // A data length that would overflow an offset computed as position + length.
  const std::string huge = U32(1) + "a" + U64(~uint64_t{0}) + "1";
  ExpectDataLoss(EncodedHeader() + huge + Crc(huge) + EncodedFooter(1));

  WriteRawFile(path_, EncodedHeader() + record + EncodedFooter(1));
  EXPECT_TRUE(CheckpointReader::Open(fs_, path_).ok());
}

TEST_F(CheckpointFileTest, UncommittedWriterLeavesNoFiles) {
  {
    absl::StatusOr<std::unique_ptr<CheckpointWriter>> writer = CheckpointWriter::Create(fs_, path_);
    ASSERT_TRUE(writer.ok()) << writer.status();
    ASSERT_TRUE((*writer)->AddRecord("a", "1").ok());
    EXPECT_EQ(DirEntries(), std::vector<std::string>{"ckpt.tmp"});
  }
  EXPECT_EQ(DirEntries(), std::vector<std::string>{});
}

TEST_F(CheckpointFileTest, UncommittedWriterKeepsExistingCheckpoint) {
  const Records a = {{"a", "old"}};
  ASSERT_TRUE(WriteCheckpoint(fs_, path_, a).ok());
  {
    absl::StatusOr<std::unique_ptr<CheckpointWriter>> writer = CheckpointWriter::Create(fs_, path_);
    ASSERT_TRUE(writer.ok()) << writer.status();
    ASSERT_TRUE((*writer)->AddRecord("a", "new").ok());
  }
  EXPECT_EQ(DirEntries(), std::vector<std::string>{"ckpt"});
  absl::StatusOr<CheckpointReader> reader = CheckpointReader::Open(fs_, path_);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ(ToRecords(*reader), a);
}

// The property checkpoints exist for: whichever file-system call fails while checkpoint B is
// written over checkpoint A, A is still there, complete; once the rename has happened (only the
// directory sync is left), the file is A or B, complete.
TEST_F(CheckpointFileTest, AnyFailedOperationKeepsTheCommittedCheckpoint) {
  const Records a = {{"w", "A-weights"}, {"w.momentum", PseudoRandomBytes(4096, 3)}};
  const Records b = {{"w", "B-weights"},
                     {"w.momentum", PseudoRandomBytes(70000, 4)},
                     {"empty", ""},
                     {"step", "17"}};

  FaultInjectionFileSystem counting(fs_);
  ASSERT_TRUE(WriteCheckpoint(counting, dir_ + "/clean", b).ok());
  ASSERT_TRUE(fs_.DeleteFile(dir_ + "/clean").ok());
  // Data is durable before it gets the name, and the name before Commit returns.
  std::vector<FsOp> expected_log = {FsOp::kNewWritableFile};
  expected_log.resize(1 + counting.count(FsOp::kAppend), FsOp::kAppend);
  for (const FsOp op : {FsOp::kSync, FsOp::kClose, FsOp::kRename, FsOp::kSyncDir}) {
    expected_log.push_back(op);
  }
  EXPECT_EQ(counting.log(), expected_log);
  for (const FsOp op : kAllFsOps) {
    ASSERT_GT(counting.count(op), 0) << FsOpName(op);
    for (int64_t n = 0; n < counting.count(op); ++n) {
      SCOPED_TRACE(absl::StrCat(FsOpName(op), " call ", n));
      ASSERT_TRUE(WriteCheckpoint(fs_, path_, a).ok());
      for (const bool keep_going : {false, true}) {
        FaultInjectionFileSystem faulty(fs_);
        faulty.FailNth(op, n);
        const absl::Status written = WriteCheckpoint(faulty, path_, b, keep_going);
        EXPECT_EQ(written.code(), absl::StatusCode::kInternal) << written;
        EXPECT_NE(written.message().find("injected"), absl::string_view::npos) << written;

        EXPECT_EQ(DirEntries(), std::vector<std::string>{"ckpt"});
        absl::StatusOr<CheckpointReader> reader = CheckpointReader::Open(fs_, path_);
        ASSERT_TRUE(reader.ok()) << reader.status();
        if (op == FsOp::kSyncDir) {
          const Records found = ToRecords(*reader);
          EXPECT_TRUE(found == a || found == b);
        } else {
          EXPECT_EQ(ToRecords(*reader), a);
        }
      }
    }
  }
}

TEST_F(CheckpointFileTest, EveryAppendFailingKeepsTheCommittedCheckpoint) {
  const Records a = {{"a", "old"}};
  ASSERT_TRUE(WriteCheckpoint(fs_, path_, a).ok());
  FaultInjectionFileSystem faulty(fs_);
  faulty.FailAll(FsOp::kAppend);
  EXPECT_FALSE(WriteCheckpoint(faulty, path_, {{"a", "new"}}, /*keep_going=*/true).ok());
  EXPECT_EQ(faulty.count(FsOp::kRename), 0);
  absl::StatusOr<CheckpointReader> reader = CheckpointReader::Open(fs_, path_);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ(ToRecords(*reader), a);
}

class PosixFileSystemTest : public CheckpointFileTest {};

TEST_F(PosixFileSystemTest, DirectoriesAndListing) {
  const std::string nested = dir_ + "/x/y/z";
  ASSERT_TRUE(fs_.CreateDir(nested).ok());
  ASSERT_TRUE(fs_.CreateDir(nested).ok());
  struct stat info;
  ASSERT_EQ(stat(nested.c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0777, 0700u);
  WriteRawFile(nested + "/b", "2");
  WriteRawFile(nested + "/a", "1");
  ASSERT_TRUE(fs_.CreateDir(nested + "/c").ok());
  EXPECT_EQ(*fs_.ListDir(nested), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_FALSE(fs_.CreateDir(nested + "/a").ok());
  EXPECT_FALSE(fs_.CreateDir(nested + "/a/d").ok());
  EXPECT_EQ(fs_.ListDir(dir_ + "/missing").status().code(), absl::StatusCode::kNotFound);

  ASSERT_TRUE(fs_.DeleteRecursively(dir_ + "/x").ok());
  EXPECT_FALSE(fs_.Exists(dir_ + "/x"));
  EXPECT_TRUE(fs_.DeleteRecursively(dir_ + "/x").ok());
}

TEST_F(PosixFileSystemTest, FilesRenameAndDelete) {
  const std::string from = dir_ + "/from", to = dir_ + "/to";
  WriteRawFile(from, "new");
  WriteRawFile(to, "old");
  struct stat info;
  ASSERT_EQ(stat(from.c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0777, 0600u);
  ASSERT_TRUE(fs_.Rename(from, to).ok());
  EXPECT_FALSE(fs_.Exists(from));
  EXPECT_EQ(*fs_.ReadFile(to), "new");
  ASSERT_TRUE(fs_.SyncDir(dir_).ok());

  const absl::Status renamed = fs_.Rename(from, to);
  EXPECT_EQ(renamed.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(renamed.message().find(from), absl::string_view::npos);

  ASSERT_TRUE(fs_.DeleteFile(to).ok());
  EXPECT_TRUE(fs_.DeleteFile(to).ok());
  const absl::StatusOr<std::string> missing = fs_.ReadFile(to);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(missing.status().message(), absl::StrCat("open ", to, ": No such file or directory"));
}

TEST_F(PosixFileSystemTest, FullDeviceIsResourceExhausted) {
  if (!fs_.Exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  absl::StatusOr<std::unique_ptr<WritableFile>> file = fs_.NewWritableFile("/dev/full");
  ASSERT_TRUE(file.ok()) << file.status();
  const absl::Status appended = (*file)->Append("x");
  EXPECT_EQ(appended.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(appended.message(), "write /dev/full: No space left on device");
  EXPECT_TRUE((*file)->Close().ok());
  EXPECT_EQ((*file)->Append("x").code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace optd::server
