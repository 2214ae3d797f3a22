// The session configuration of the wire contract (optd.v1.SessionConfig), validated and turned
// into the kernels' tensor specs.
#ifndef OPTD_SERVER_SESSION_CONFIG_H_
#define OPTD_SERVER_SESSION_CONFIG_H_

#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/dtype.h"
#include "kernels/optimizer.h"
#include "optd/v1/optd.pb.h"
#include "proto/wire_dtype.h"

namespace optd::server {

inline constexpr int kMaxTensorsPerSession = 100000;
inline constexpr int kMaxWorldSize = 1024;
inline constexpr int kMaxNameLength = 256;

// Fills defaults in place (world_size 1, reject, parameters, fp32 dtype, flatten) and checks
// everything a session needs before any allocation: names (unique, printable, at most
// kMaxNameLength), shapes, groups (known preset, overrides that apply, every tensor's group
// exists), world_size in [1, kMaxWorldSize], a straggler timeout that is finite and >= 0, init
// settings (finite std >= 0). InvalidArgument naming the tensor or group and the problem.
absl::Status NormalizeSessionConfig(v1::SessionConfig& config);

// The optimizer config of one group: its preset with the overrides applied in order.
absl::StatusOr<OptimizerConfig> GroupOptimizerConfig(const v1::GroupConfig& group);

// One TensorSpec per tensor, in the config's order. REQUIRES: a normalized config.
absl::StatusOr<std::vector<TensorSpec>> TensorSpecs(const v1::SessionConfig& config);

// Backend and host bytes a session with this config holds: the optimizer's buffers, one gradient
// staging per worker plus one, and two result buffers (the last step's, kept for retries, and
// the next one's). ResourceExhausted past 2^63.
absl::StatusOr<int64_t> SessionRequiredBytes(const v1::SessionConfig& config);

// Session names: [A-Za-z0-9_.-]{1,64}.
bool IsValidSessionId(absl::string_view id);

}  // namespace optd::server

#endif  // OPTD_SERVER_SESSION_CONFIG_H_
