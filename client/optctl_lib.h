// optctl's commands as functions over the C++ client (client/client.h). Each writes what it
// prints to `out`, so tests run the commands in-process; client/optctl.cc parses flags, picks the
// tokens and dispatches here.
//
// Errors: a command returns the daemon's status as is (optctl exits with 1) or a usage error
// (IsUsageError; optctl exits with 2) for bad arguments and input files: a config that does not
// parse, a gradient file of the wrong shape, a tensor name the session does not have.
#ifndef OPTD_CLIENT_OPTCTL_LIB_H_
#define OPTD_CLIENT_OPTCTL_LIB_H_

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/client.h"
#include "common/dtype.h"

namespace optd::client {

// InvalidArgument carrying a marker that IsUsageError recognizes.
absl::Status UsageError(absl::string_view message);
bool IsUsageError(const absl::Status& status);

// The file, inside a dump or gradient directory, that holds the tensor `tensor_name`: the name
// with every '%' written as "%25" and every '/' as "%2F", then ".npy"; distinct names give
// distinct files. "blocks/0/w%" -> "blocks%2F0%2Fw%25.npy".
std::string TensorFileName(absl::string_view tensor_name);

// "[8, 6]"; "[]" for a scalar.
std::string FormatShape(absl::Span<const int64_t> shape);

// IEC units with one decimal above 1 KiB: "512 B", "1.5 KiB", "3.0 GiB".
std::string HumanBytes(int64_t bytes);

// A wire dtype named as fp32, bf16 or fp16 (or float32, bfloat16, float16); a usage error naming
// `flag` (e.g. "--wire_dtype") and the value otherwise.
absl::StatusOr<DType> ParseWireDType(absl::string_view flag, absl::string_view name);

// Prints the serving status of `service` ("" is liveness, "optd.v1.Optimizer" readiness) as
// SERVING, NOT_SERVING, ...; returns whether it is SERVING.
absl::StatusOr<bool> RunHealth(Client& client, const std::string& service, absl::Duration timeout,
                               std::ostream& out);

// Reads an optd.v1.SessionConfig in protobuf text format from `config_path` (a usage error naming
// the file, line and column when it does not parse), creates the session `id` (empty: the daemon
// picks one) and prints "session_id: <id>" and "token: <token>" lines.
absl::Status RunCreate(Client& client, const std::string& config_path, const std::string& id,
                       std::ostream& out);

// A table of the daemon's sessions: id, step, loaded, state bytes, checkpoint step.
absl::Status RunList(Client& client, std::ostream& out);

// The session's settings (world size, policies, intervals, groups with preset and overrides),
// its step and state, and a table of its tensors: name, shape, dtype, group, elements, steps
// applied, lr, momentum, weight decay.
absl::Status RunInspect(Session& session, std::ostream& out);

// Deletes session `id` with `token`, or with the client's admin token when `token` is empty.
absl::Status RunDelete(Client& client, const std::string& id, const std::string& token,
                       std::ostream& out);

// Prints the checkpoint's step, path and bytes.
absl::Status RunCheckpoint(Session& session, std::ostream& out);

// Prints the step the session went back to.
absl::Status RunRestore(Session& session, std::ostream& out);

struct AnalysisCommandOptions {
  // Keep polling and print each new analysis (a new step) as it lands, headed by its step.
  bool follow = false;
  absl::Duration interval = absl::Seconds(2);  // between polls
  int64_t updates = 0;                         // following: stop after this many; 0: never
};

// The latest analysis figures, one row per tensor, or "no analysis yet"; with `follow`, every
// new analysis until `updates` were printed (or the call fails).
absl::Status RunAnalysis(Session& session, const AnalysisCommandOptions& options,
                         std::ostream& out);

struct DumpOptions {
  std::string dir;                   // created when missing
  std::vector<std::string> tensors;  // empty: all
  DType wire_dtype = DType::kF32;
};

// Writes each tensor's parameters to dir/TensorFileName(name) as an fp32 .npy array of the
// tensor's shape and prints one line per file. A usage error names a tensor the session does not
// have, before anything is written.
absl::Status RunDump(Session& session, const DumpOptions& options, std::ostream& out);

struct StepCommandOptions {
  int64_t step = 0;          // 1-based: the session's completed steps + 1
  std::string grads_dir;     // gradients as dir/TensorFileName(name); a missing file: no gradient
  std::string out_dir;       // empty: the result tensors are not written
  StepOptions step_options;  // worker, lr, dtypes, chunk size, deadline
};

// Sends one worker's step with the gradients found in `grads_dir`; prints the .npy files there
// that match no tensor ("ignored ..."), how many tensors have a gradient, the step's summary
// (step, tensors updated, skipped, replayed, non-finite values, result kind) and, with `out_dir`,
// writes the result tensors (parameters or deltas, as the session's step_result says) there as
// .npy arrays of the tensors' shapes. Usage errors, raised before the step is sent: a gradient
// file whose shape differs from its tensor's (naming the file, expected and actual shape) or
// that does not read, `grads_dir` not being a directory, `out_dir` with a session whose
// step_result is NONE.
absl::Status RunStep(Session& session, const StepCommandOptions& options, std::ostream& out);

}  // namespace optd::client

#endif  // OPTD_CLIENT_OPTCTL_LIB_H_
