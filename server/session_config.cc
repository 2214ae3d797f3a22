#include "server/session_config.h"

#include <cmath>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/shared_memory.h"

namespace optd::server {
namespace {

bool IsPrintableName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxNameLength) return false;
  for (char c : name) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) return false;
  }
  return true;
}

}  // namespace

bool IsValidSessionId(absl::string_view id) {
  if (id.empty() || id.size() > 64) return false;
  for (char c : id) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '_' || c == '.' || c == '-';
    if (!ok) return false;
  }
  return id != "." && id != "..";
}

absl::StatusOr<OptimizerConfig> GroupOptimizerConfig(const v1::GroupConfig& group) {
  absl::StatusOr<OptimizerConfig> config = PresetConfig(group.preset());
  if (!config.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("group '", group.name(), "': ", config.status().message()));
  }
  for (const v1::Override& o : group.overrides()) {
    absl::Status applied = ApplyOverride(*config, o.key(), o.value());
    if (!applied.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("group '", group.name(), "': ", applied.message()));
    }
  }
  absl::Status valid = ValidateOptimizerConfig(*config);
  if (!valid.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("group '", group.name(), "': ", valid.message()));
  }
  return config;
}

absl::Status NormalizeSessionConfig(v1::SessionConfig& config) {
  if (config.tensors().empty()) return absl::InvalidArgumentError("the session has no tensors");
  if (config.tensors_size() > kMaxTensorsPerSession) {
    return absl::InvalidArgumentError(absl::StrCat("the session has ", config.tensors_size(),
                                                   " tensors; at most ", kMaxTensorsPerSession));
  }
  if (config.world_size() == 0) config.set_world_size(1);
  if (config.world_size() < 1 || config.world_size() > kMaxWorldSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("world_size ", config.world_size(), " is outside [1, ", kMaxWorldSize, "]"));
  }
  if (config.non_finite_policy() == v1::NON_FINITE_POLICY_UNSPECIFIED) {
    config.set_non_finite_policy(v1::NON_FINITE_POLICY_REJECT);
  }
  if (!v1::NonFinitePolicy_IsValid(config.non_finite_policy())) {
    return absl::InvalidArgumentError(
        absl::StrCat("non_finite_policy ", config.non_finite_policy(), " is unknown"));
  }
  if (config.step_result() == v1::STEP_RESULT_UNSPECIFIED) {
    config.set_step_result(v1::STEP_RESULT_PARAMETERS);
  }
  if (!v1::StepResult_IsValid(config.step_result())) {
    return absl::InvalidArgumentError(
        absl::StrCat("step_result ", config.step_result(), " is unknown"));
  }
  const double straggler = config.straggler_timeout_seconds();
  if (!std::isfinite(straggler) || straggler < 0 || straggler > 86400 * 7) {
    return absl::InvalidArgumentError(
        absl::StrCat("straggler_timeout_seconds ", straggler, " is outside [0, 604800]"));
  }
  const double lease = config.delete_after_idle_seconds();
  if (!std::isfinite(lease) || lease < 0 || lease > 86400 * 365) {
    return absl::InvalidArgumentError(
        absl::StrCat("delete_after_idle_seconds ", lease, " is outside [0, 31536000]"));
  }

  std::set<std::string> groups;
  for (const v1::GroupConfig& group : config.groups()) {
    if (!IsPrintableName(group.name())) {
      return absl::InvalidArgumentError(
          absl::StrCat("group name '", group.name(), "' is empty, too long or not printable"));
    }
    if (!groups.insert(group.name()).second) {
      return absl::InvalidArgumentError(absl::StrCat("group '", group.name(), "' is repeated"));
    }
    OPTD_RETURN_IF_ERROR(GroupOptimizerConfig(group).status());
  }
  std::set<std::string> names;
  for (v1::TensorConfig& tensor : *config.mutable_tensors()) {
    if (!IsPrintableName(tensor.name())) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor name '", tensor.name(), "' is empty, too long or not printable"));
    }
    if (!names.insert(tensor.name()).second) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", tensor.name(), "' is repeated"));
    }
    absl::StatusOr<int64_t> count = ElementCount(tensor.shape());
    if (!count.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", tensor.name(), "': ", count.status().message()));
    }
    if (tensor.dtype() == v1::DTYPE_UNSPECIFIED) tensor.set_dtype(v1::DTYPE_FP32);
    absl::StatusOr<DType> dtype = FromWireDType(tensor.dtype());
    if (!dtype.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", tensor.name(), "': ", dtype.status().message()));
    }
    if (tensor.rank_policy() == v1::RANK_POLICY_UNSPECIFIED) {
      tensor.set_rank_policy(v1::RANK_POLICY_FLATTEN);
    }
    if (!v1::RankPolicy_IsValid(tensor.rank_policy())) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", tensor.name(), "': rank_policy ",
                                                     tensor.rank_policy(), " is unknown"));
    }
    if (!groups.contains(tensor.group())) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", tensor.name(), "': group '",
                                                     tensor.group(), "' is not defined"));
    }
    if (tensor.init_case() == v1::TensorConfig::INIT_NOT_SET) tensor.mutable_zeros();
    if (tensor.has_normal()) {
      const v1::NormalInit& n = tensor.normal();
      if (!std::isfinite(n.std()) || n.std() < 0 || !std::isfinite(n.mean()) ||
          std::fabs(n.mean()) + 40 * n.std() > 1e30) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", tensor.name(), "': normal init ",
                                                       "mean ", n.mean(), " std ", n.std(),
                                                       " must be finite, std >= 0, and small"));
      }
    }
  }
  // Shapes against the optimizer (rank >= 2 for matrix optimizers and so on).
  OPTD_ASSIGN_OR_RETURN(std::vector<TensorSpec> specs, TensorSpecs(config));
  return Optimizer::RequiredBytes(std::move(specs)).status();
}

absl::StatusOr<std::vector<TensorSpec>> TensorSpecs(const v1::SessionConfig& config) {
  std::map<std::string, OptimizerConfig, std::less<>> groups;
  for (const v1::GroupConfig& g : config.groups()) {
    OPTD_ASSIGN_OR_RETURN(groups[g.name()], GroupOptimizerConfig(g));
  }
  std::vector<TensorSpec> specs;
  specs.reserve(config.tensors_size());
  for (const v1::TensorConfig& tensor : config.tensors()) {
    auto group = groups.find(tensor.group());
    if (group == groups.end()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", tensor.name(), "': group '",
                                                     tensor.group(), "' is not defined"));
    }
    TensorSpec spec;
    spec.name = tensor.name();
    spec.shape.assign(tensor.shape().begin(), tensor.shape().end());
    spec.rank_policy =
        tensor.rank_policy() == v1::RANK_POLICY_BATCH ? RankPolicy::kBatch : RankPolicy::kFlatten;
    spec.config = group->second;
    specs.push_back(std::move(spec));
  }
  return specs;
}

absl::StatusOr<int64_t> SessionRequiredBytes(const v1::SessionConfig& config) {
  OPTD_ASSIGN_OR_RETURN(std::vector<TensorSpec> specs, TensorSpecs(config));
  int64_t elements = 0;
  std::vector<int64_t> counts;
  for (const TensorSpec& spec : specs) {
    OPTD_ASSIGN_OR_RETURN(const int64_t count, ElementCount(spec.shape));
    if (__builtin_add_overflow(elements, count, &elements)) {
      return absl::ResourceExhaustedError("the session's tensors hold more than 2^63 elements");
    }
    counts.push_back(count);
  }
  OPTD_ASSIGN_OR_RETURN(int64_t optimizer, Optimizer::RequiredBytes(std::move(specs)));
  const int64_t result = config.step_result() == v1::STEP_RESULT_NONE ? 0 : 2;
  // Staging: one per worker plus one for a retry or an upload (the StagingPool's limit).
  const int64_t staging = std::max(1, config.world_size()) + 1;
  // Shared memory: a region per worker (AttachSharedMemory).
  int64_t shared = 0;
  if (config.shared_memory()) {
    OPTD_ASSIGN_OR_RETURN(const SharedLayout layout, SharedLayoutFor(counts));
    shared = layout.bytes;
  }
  int64_t host = 0, regions = 0, total = 0;
  if (__builtin_mul_overflow((staging + result) * static_cast<int64_t>(sizeof(float)), elements,
                             &host) ||
      __builtin_mul_overflow(std::max(1, config.world_size()), shared, &regions) ||
      __builtin_add_overflow(optimizer, host, &total) ||
      __builtin_add_overflow(total, regions, &total)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the session's ", elements, " elements with world_size ", config.world_size(),
                     " need more than 2^63 bytes"));
  }
  return total;
}

}  // namespace optd::server
