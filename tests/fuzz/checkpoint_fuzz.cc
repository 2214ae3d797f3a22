// A checkpoint file as the daemon meets it at start-up (SessionManager::Recover): the record
// reader, the meta record, the config checked as CreateSession checks one, and then the whole
// load (parameters, state, steps, hyperparameters) of any file that passes, on the CPU backend.
// Any bytes give a session or an error, never a crash or an unbounded allocation.
#include <cstddef>
#include <cstdint>
#include <memory>

#include "kernels/backend.h"
#include "server/checkpoint_file.h"
#include "server/file_system.h"
#include "server/session.h"
#include "server/session_config.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

// The fuzzer's sessions stay small, as --max_session_bytes bounds a daemon's.
constexpr int64_t kMaxSessionBytes = int64_t{64} << 20;

optd::Backend& Cpu() {
  static optd::Backend* const backend = optd::CreateCpuBackend({.threads = 1})->release();
  return *backend;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using optd::server::Session;
  optd::server::FileSystem& fs = optd::server::PosixFileSystem();
  const std::string& path = optd::fuzz::WriteInput(data, size);
  absl::StatusOr<optd::server::CheckpointReader> reader =
      optd::server::CheckpointReader::Open(fs, path);
  if (!reader.ok()) return 0;
  absl::StatusOr<optd::v1::SessionCheckpoint> meta = Session::ReadCheckpointMeta(fs, path);
  if (!meta.ok()) return 0;
  optd::v1::SessionConfig config = meta->config();
  if (!optd::server::NormalizeSessionConfig(config).ok()) return 0;
  absl::StatusOr<int64_t> bytes = Session::RequiredBytes(config);
  if (!bytes.ok() || *bytes > kMaxSessionBytes) return 0;
  optd::server::SessionOptions options;
  options.fs = &fs;
  absl::StatusOr<std::unique_ptr<Session>> session = Session::Load(Cpu(), path, options);
  return 0;
}
