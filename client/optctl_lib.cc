#include "client/optctl_lib.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <set>
#include <system_error>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "client/npy.h"
#include "common/status_macros.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"

namespace optd::client {
namespace {

constexpr char kUsageErrorUrl[] = "type.googleapis.com/optd.optctl.UsageError";

using Row = std::vector<std::string>;

// Rows as columns two spaces apart, each as wide as its widest cell, every line after `indent`.
void PrintTable(const std::vector<Row>& rows, absl::string_view indent, std::ostream& out) {
  std::vector<size_t> widths;
  for (const Row& row : rows) {
    if (widths.size() < row.size()) widths.resize(row.size());
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  for (const Row& row : rows) {
    std::string line(indent);
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line.append(widths[i] - row[i].size() + 2, ' ');
    }
    out << line << '\n';
  }
}

const char* Bool(bool value) { return value ? "true" : "false"; }

// An enum value's proto name without the enum's prefix: NON_FINITE_POLICY_REJECT -> REJECT.
std::string EnumName(const std::string& name, absl::string_view prefix) {
  return std::string(absl::StripPrefix(name, prefix));
}

std::string CheckpointStep(int64_t step) { return step < 0 ? "none" : absl::StrCat(step); }

std::vector<int64_t> Shape(const v1::TensorConfig& tensor) {
  return std::vector<int64_t>(tensor.shape().begin(), tensor.shape().end());
}

int64_t NumElements(absl::Span<const int64_t> shape) {
  int64_t count = 1;
  for (const int64_t dim : shape) count *= dim;
  return count;
}

std::string FilePath(const std::string& dir, absl::string_view tensor_name) {
  return (std::filesystem::path(dir) / TensorFileName(tensor_name)).string();
}

absl::Status CreateDirectory(const std::string& dir) {
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) {
    return absl::ErrnoToStatus(error.value(), absl::StrCat("cannot create directory ", dir));
  }
  return absl::OkStatus();
}

// Writes one tensor's values as dir/<file>.npy with the tensor's shape and says so on `out`.
absl::Status WriteTensor(const std::string& dir, const v1::TensorConfig& tensor,
                         absl::Span<const float> values, std::ostream& out) {
  const std::vector<int64_t> shape = Shape(tensor);
  if (static_cast<int64_t>(values.size()) != NumElements(shape)) {
    return absl::DataLossError(absl::StrCat("the daemon sent ", values.size(),
                                            " values for tensor '", tensor.name(), "' of shape ",
                                            FormatShape(shape)));
  }
  const std::string path = FilePath(dir, tensor.name());
  OPTD_RETURN_IF_ERROR(WriteNpy(path, shape, values));
  out << "wrote " << path << " " << FormatShape(shape) << "\n";
  return absl::OkStatus();
}

// Collects the text-format parser's errors as "path:line:column: message" (1-based).
class ConfigErrors : public google::protobuf::io::ErrorCollector {
 public:
  explicit ConfigErrors(absl::string_view path) : path_(path) {}

  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    errors_.push_back(absl::StrCat(path_, ":", line + 1, ":", column + 1, ": ", message));
  }

  std::string Message() const { return absl::StrJoin(errors_, "; "); }

 private:
  std::string path_;
  std::vector<std::string> errors_;
};

absl::StatusOr<v1::SessionConfig> ReadSessionConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return UsageError(absl::StrCat("cannot read config file ", path));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return UsageError(absl::StrCat("cannot read config file ", path));
  ConfigErrors errors(path);
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  v1::SessionConfig config;
  if (!parser.ParseFromString(text, &config)) {
    return UsageError(
        absl::StrCat("config is not an optd.v1.SessionConfig in text format: ", errors.Message()));
  }
  return config;
}

}  // namespace

absl::Status UsageError(absl::string_view message) {
  absl::Status status = absl::InvalidArgumentError(message);
  status.SetPayload(kUsageErrorUrl, absl::Cord("usage"));
  return status;
}

bool IsUsageError(const absl::Status& status) {
  return status.GetPayload(kUsageErrorUrl).has_value();
}

std::string TensorFileName(absl::string_view tensor_name) {
  std::string file;
  for (const char c : tensor_name) {
    if (c == '%') {
      file += "%25";
    } else if (c == '/') {
      file += "%2F";
    } else {
      file += c;
    }
  }
  return file + ".npy";
}

std::string FormatShape(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string HumanBytes(int64_t bytes) {
  constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return absl::StrCat(bytes, " B");
  double value = static_cast<double>(bytes) / 1024;
  size_t unit = 0;
  // Move up while the value would print as 1024.0 or more in this unit.
  while (value >= 1023.95 && unit + 1 < std::size(kUnits)) {
    value /= 1024;
    ++unit;
  }
  return absl::StrFormat("%.1f %s", value, kUnits[unit]);
}

absl::StatusOr<DType> ParseWireDType(absl::string_view flag, absl::string_view name) {
  absl::StatusOr<DType> dtype = ParseDType(name);
  if (!dtype.ok() || *dtype == DType::kF64) {
    return UsageError(absl::StrCat(flag, "=", name, ": the wire dtype is fp32, bf16 or fp16"));
  }
  return *dtype;
}

absl::StatusOr<bool> RunHealth(Client& client, const std::string& service, absl::Duration timeout,
                               std::ostream& out) {
  using grpc::health::v1::HealthCheckResponse;
  OPTD_ASSIGN_OR_RETURN(HealthCheckResponse::ServingStatus status, client.Health(service, timeout));
  out << HealthCheckResponse::ServingStatus_Name(status) << "\n";
  if (status == HealthCheckResponse::SERVING) {
    OPTD_ASSIGN_OR_RETURN(v1::ServerInfo info, client.ServerInfo(timeout));
    out << "backend: " << info.backend() << " (" << info.backend_description() << ")\n";
    out << "backend_choice: " << info.backend_choice() << "\n";
  }
  return status == HealthCheckResponse::SERVING;
}

absl::Status RunCreate(Client& client, const std::string& config_path, const std::string& id,
                       std::ostream& out) {
  OPTD_ASSIGN_OR_RETURN(v1::SessionConfig config, ReadSessionConfig(config_path));
  OPTD_ASSIGN_OR_RETURN(Session session, client.CreateSession(config, id));
  out << "session_id: " << session.id() << "\n";
  out << "token: " << session.token() << "\n";
  return absl::OkStatus();
}

absl::Status RunList(Client& client, std::ostream& out) {
  OPTD_ASSIGN_OR_RETURN(std::vector<v1::SessionInfo> sessions, client.ListSessions());
  if (sessions.empty()) {
    out << "no sessions\n";
    return absl::OkStatus();
  }
  std::vector<Row> rows = {{"SESSION", "STEP", "LOADED", "STATE", "CHECKPOINT_STEP"}};
  for (const v1::SessionInfo& s : sessions) {
    rows.push_back({s.session_id(), absl::StrCat(s.step()), Bool(s.loaded()),
                    HumanBytes(s.state_bytes()), CheckpointStep(s.checkpoint_step())});
  }
  PrintTable(rows, "", out);
  return absl::OkStatus();
}

absl::Status RunInspect(Session& session, std::ostream& out) {
  OPTD_ASSIGN_OR_RETURN(v1::SessionInfo info, session.Info());
  const v1::SessionConfig& config = info.config();
  out << "session_id: " << info.session_id() << "\n";
  out << "backend: " << info.backend() << "\n";
  out << "step: " << info.step() << "\n";
  out << "loaded: " << Bool(info.loaded()) << "\n";
  out << "state_bytes: " << info.state_bytes() << " (" << HumanBytes(info.state_bytes()) << ")\n";
  out << "checkpoint_step: " << CheckpointStep(info.checkpoint_step()) << "\n";
  out << "world_size: " << config.world_size() << "\n";
  out << "workers_pending: " << info.workers_pending() << "\n";
  out << "non_finite_policy: "
      << EnumName(v1::NonFinitePolicy_Name(config.non_finite_policy()), "NON_FINITE_POLICY_")
      << "\n";
  out << "step_result: " << EnumName(v1::StepResult_Name(config.step_result()), "STEP_RESULT_")
      << "\n";
  out << "analysis_interval: " << config.analysis_interval()
      << (config.analysis_interval() == 0 ? " (off)" : "") << "\n";
  out << "checkpoint_interval: " << config.checkpoint_interval()
      << (config.checkpoint_interval() == 0 ? " (on request only)" : "") << "\n";
  out << "straggler_timeout_seconds: " << absl::StrCat(config.straggler_timeout_seconds())
      << (config.straggler_timeout_seconds() == 0 ? " (the daemon's default)" : "") << "\n";

  out << "groups:\n";
  std::vector<Row> groups = {{"NAME", "PRESET", "OVERRIDES"}};
  for (const v1::GroupConfig& g : config.groups()) {
    std::vector<std::string> overrides;
    for (const v1::Override& o : g.overrides()) {
      overrides.push_back(absl::StrCat(o.key(), "=", o.value()));
    }
    groups.push_back(
        {g.name(), g.preset(), overrides.empty() ? "-" : absl::StrJoin(overrides, ", ")});
  }
  PrintTable(groups, "  ", out);

  out << "tensors:\n";
  std::vector<Row> tensors = {{"NAME", "SHAPE", "DTYPE", "GROUP", "ELEMENTS", "STEPS_APPLIED", "LR",
                               "MOMENTUM", "WEIGHT_DECAY"}};
  for (const v1::TensorInfo& t : info.tensors()) {
    tensors.push_back({t.config().name(), FormatShape(Shape(t.config())),
                       EnumName(v1::DType_Name(t.config().dtype()), "DTYPE_"), t.config().group(),
                       absl::StrCat(t.num_elements()), absl::StrCat(t.steps_applied()),
                       absl::StrCat(t.lr()), absl::StrCat(t.momentum()),
                       absl::StrCat(t.weight_decay())});
  }
  PrintTable(tensors, "  ", out);
  return absl::OkStatus();
}

absl::Status RunDelete(Client& client, const std::string& id, const std::string& token,
                       std::ostream& out) {
  OPTD_RETURN_IF_ERROR(client.DeleteSession(id, token));
  out << "deleted: " << id << "\n";
  return absl::OkStatus();
}

absl::Status RunCheckpoint(Session& session, std::ostream& out) {
  OPTD_ASSIGN_OR_RETURN(v1::CheckpointResponse checkpoint, session.Checkpoint());
  out << "step: " << checkpoint.step() << "\n";
  out << "path: " << checkpoint.path() << "\n";
  out << "bytes: " << checkpoint.bytes() << " (" << HumanBytes(checkpoint.bytes()) << ")\n";
  return absl::OkStatus();
}

absl::Status RunRestore(Session& session, std::ostream& out) {
  OPTD_ASSIGN_OR_RETURN(int64_t step, session.Restore());
  out << "step: " << step << "\n";
  return absl::OkStatus();
}

namespace {

void PrintAnalysis(const v1::GetAnalysisResponse& analysis, std::ostream& out) {
  // Every field of TensorAnalysis is a column, headed by its proto name, so the table follows
  // the wire contract as figures are added to it.
  const google::protobuf::Descriptor* descriptor = v1::TensorAnalysis::descriptor();
  const google::protobuf::Reflection* reflection = v1::TensorAnalysis::GetReflection();
  std::vector<Row> rows(1);
  for (int f = 0; f < descriptor->field_count(); ++f) {
    rows[0].push_back(absl::AsciiStrToUpper(descriptor->field(f)->name()));
  }
  for (const v1::TensorAnalysis& tensor : analysis.tensors()) {
    Row& row = rows.emplace_back();
    for (int f = 0; f < descriptor->field_count(); ++f) {
      const google::protobuf::FieldDescriptor* field = descriptor->field(f);
      switch (field->cpp_type()) {
        case google::protobuf::FieldDescriptor::CPPTYPE_STRING:
          row.push_back(reflection->GetString(tensor, field));
          break;
        case google::protobuf::FieldDescriptor::CPPTYPE_INT64:
          row.push_back(absl::StrCat(reflection->GetInt64(tensor, field)));
          break;
        case google::protobuf::FieldDescriptor::CPPTYPE_DOUBLE:
          row.push_back(absl::StrCat(reflection->GetDouble(tensor, field)));
          break;
        default: {
          std::string value;
          google::protobuf::TextFormat::PrintFieldValueToString(tensor, field, -1, &value);
          row.push_back(std::move(value));
        }
      }
    }
  }
  PrintTable(rows, "", out);
}

// The auto modes' current choices (ns.steps=auto, direction=auto), one row per tensor: its
// matrices' step counts and directions (a batched tensor lists one per matrix), the step that
// decided them, and that decision's figures.
void PrintChoices(const v1::GetAnalysisResponse& analysis, std::ostream& out) {
  std::vector<Row> rows = {{"TENSOR", "NS_STEPS", "DIRECTION", "DECIDED_AT_STEP", "SMALL_SV_SHARE",
                            "DOMINANCE_RATIO_MIN", "RMNP_MUON_COSINE"}};
  for (const v1::TensorChoices& t : analysis.choices()) {
    const v1::AutoChoices& c = t.choices();
    std::vector<std::string> directions;
    for (bool r : c.row_normalize()) directions.push_back(r ? "row_normalize" : "newton_schulz");
    rows.push_back({t.tensor(), absl::StrJoin(c.newton_schulz_steps(), ","),
                    absl::StrJoin(directions, ","), absl::StrCat(c.decided_at_step()),
                    absl::StrCat(c.small_sv_share()), absl::StrCat(c.dominance_ratio_min()),
                    absl::StrCat(c.rmnp_muon_cosine())});
  }
  out << "auto choices\n";
  PrintTable(rows, "", out);
}

}  // namespace

absl::Status RunAnalysis(Session& session, const AnalysisCommandOptions& options,
                         std::ostream& out) {
  if (!options.follow) {
    OPTD_ASSIGN_OR_RETURN(v1::GetAnalysisResponse analysis, session.Analysis());
    if (analysis.tensors().empty()) {
      out << "no analysis yet\n";
    } else {
      PrintAnalysis(analysis, out);
    }
    if (!analysis.choices().empty()) PrintChoices(analysis, out);
    return absl::OkStatus();
  }
  int64_t shown_step = -1;
  for (int64_t printed = 0; options.updates == 0 || printed < options.updates;) {
    OPTD_ASSIGN_OR_RETURN(v1::GetAnalysisResponse analysis, session.Analysis());
    int64_t step = -1;
    for (const v1::TensorAnalysis& tensor : analysis.tensors()) {
      step = std::max(step, tensor.step());
    }
    if (step != shown_step) {
      if (step < 0) {
        out << "waiting for the first analysis\n";
      } else {
        out << "step " << step << "\n";
        PrintAnalysis(analysis, out);
        ++printed;
      }
      out.flush();
      shown_step = step;
    }
    if (options.updates == 0 || printed < options.updates) absl::SleepFor(options.interval);
  }
  return absl::OkStatus();
}

absl::Status RunDump(Session& session, const DumpOptions& options, std::ostream& out) {
  OPTD_ASSIGN_OR_RETURN(v1::SessionInfo info, session.Info());
  std::map<std::string, const v1::TensorConfig*, std::less<>> by_name;
  for (const v1::TensorInfo& t : info.tensors()) by_name[t.config().name()] = &t.config();
  std::vector<const v1::TensorConfig*> selected;
  if (options.tensors.empty()) {
    for (const v1::TensorInfo& t : info.tensors()) selected.push_back(&t.config());
  } else {
    for (const std::string& name : options.tensors) {
      auto it = by_name.find(name);
      if (it == by_name.end()) {
        return UsageError(
            absl::StrCat("session '", session.id(), "' has no tensor named '", name, "'"));
      }
      selected.push_back(it->second);
    }
  }
  using Values = std::map<std::string, std::vector<float>>;
  OPTD_ASSIGN_OR_RETURN(Values values, session.GetParameters(options.tensors, options.wire_dtype));
  OPTD_RETURN_IF_ERROR(CreateDirectory(options.dir));
  for (const v1::TensorConfig* tensor : selected) {
    auto it = values.find(tensor->name());
    if (it == values.end()) {
      return absl::DataLossError(
          absl::StrCat("the daemon sent no parameters for tensor '", tensor->name(), "'"));
    }
    OPTD_RETURN_IF_ERROR(WriteTensor(options.dir, *tensor, it->second, out));
  }
  return absl::OkStatus();
}

absl::Status RunStep(Session& session, const StepCommandOptions& options, std::ostream& out) {
  if (options.step < 1) {
    return UsageError(absl::StrCat("step ", options.step, " is not a step number (1-based)"));
  }
  std::error_code error;
  if (!std::filesystem::is_directory(options.grads_dir, error)) {
    return UsageError(
        absl::StrCat("gradient directory ", options.grads_dir, " is not a directory"));
  }
  OPTD_ASSIGN_OR_RETURN(v1::SessionInfo info, session.Info());
  if (!options.out_dir.empty() && info.config().step_result() == v1::STEP_RESULT_NONE) {
    return UsageError(absl::StrCat("session '", session.id(),
                                   "' returns no tensors from a step (step_result NONE); there is "
                                   "nothing to write to ",
                                   options.out_dir));
  }

  // Read every gradient file and check its shape before anything is sent.
  std::vector<NpyArray> arrays;
  arrays.reserve(info.tensors_size());  // the spans below point into these
  std::vector<NamedTensor> gradients;
  std::set<std::string> tensor_files;
  for (const v1::TensorInfo& t : info.tensors()) {
    const v1::TensorConfig& tensor = t.config();
    tensor_files.insert(TensorFileName(tensor.name()));
    const std::string path = FilePath(options.grads_dir, tensor.name());
    absl::StatusOr<NpyArray> array = ReadNpy(path);
    if (absl::IsNotFound(array.status())) continue;
    if (!array.ok()) return UsageError(array.status().message());
    const std::vector<int64_t> shape = Shape(tensor);
    if (array->shape != shape) {
      return UsageError(absl::StrCat(path, ": tensor '", tensor.name(), "' has shape ",
                                     FormatShape(shape), " but the file holds shape ",
                                     FormatShape(array->shape)));
    }
    arrays.push_back(*std::move(array));
    gradients.push_back({tensor.name(), arrays.back().data});
  }
  // Files that name no tensor are most likely a misspelled or unescaped name: say so.
  std::vector<std::string> ignored;
  for (std::filesystem::directory_iterator it(options.grads_dir, error), end; !error && it != end;
       it.increment(error)) {
    const std::string file = it->path().filename().string();
    if (it->is_regular_file(error) && absl::EndsWith(file, ".npy") &&
        !tensor_files.contains(file)) {
      ignored.push_back(it->path().string());
    }
  }
  std::sort(ignored.begin(), ignored.end());
  for (const std::string& path : ignored) {
    out << "ignored " << path << ": the session has no tensor with this file name\n";
  }
  out << "gradients: " << gradients.size() << " of " << info.tensors_size() << " tensors\n";

  OPTD_ASSIGN_OR_RETURN(StepResult result,
                        session.Step(options.step, gradients, options.step_options));
  out << "step: " << result.step << "\n";
  out << "tensors_updated: " << result.tensors_updated << "\n";
  out << "skipped: " << Bool(result.skipped) << "\n";
  out << "replayed: " << Bool(result.replayed) << "\n";
  out << "nonfinite_values: " << result.nonfinite_values << "\n";
  out << "result: " << EnumName(v1::StepResult_Name(result.kind), "STEP_RESULT_") << "\n";
  if (options.out_dir.empty()) return absl::OkStatus();

  OPTD_RETURN_IF_ERROR(CreateDirectory(options.out_dir));
  for (const v1::TensorInfo& t : info.tensors()) {
    auto it = result.values.find(t.config().name());
    if (it == result.values.end()) continue;
    OPTD_RETURN_IF_ERROR(WriteTensor(options.out_dir, t.config(), it->second, out));
  }
  return absl::OkStatus();
}

}  // namespace optd::client
