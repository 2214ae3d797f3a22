#include "server/session_checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/auth.h"
#include "server/session_config.h"

namespace optd::server {
namespace {

absl::string_view AsBytes(absl::Span<const float> values) {
  return absl::string_view(reinterpret_cast<const char*>(values.data()),
                           values.size() * sizeof(float));
}

absl::Status CopyRecord(absl::string_view record, absl::string_view name, absl::Span<float> out) {
  if (record.size() != out.size() * sizeof(float)) {
    return absl::DataLossError(absl::StrCat("checkpoint record '", name, "' has ", record.size(),
                                            " bytes, expected ", out.size() * sizeof(float)));
  }
  std::memcpy(out.data(), record.data(), record.size());
  // A step from NaN or infinite state would return non-finite parameters: such a checkpoint
  // (crafted, or written by a build without today's checks) is refused, not loaded.
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) {
      return absl::DataLossError(
          absl::StrCat("checkpoint record '", name, "' holds a non-finite value at element ", i));
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::string SessionCheckpointPath(const std::string& state_dir, const std::string& id) {
  return absl::StrCat(state_dir, "/", id, "/checkpoint");
}

absl::StatusOr<OpenedCheckpoint> OpenSessionCheckpoint(FileSystem& fs, const std::string& path) {
  OPTD_ASSIGN_OR_RETURN(CheckpointReader reader, CheckpointReader::Open(fs, path));
  OPTD_ASSIGN_OR_RETURN(absl::string_view meta_bytes, reader.Find("meta"));
  OpenedCheckpoint opened{std::move(reader), {}};
  if (!opened.meta.ParseFromArray(meta_bytes.data(), static_cast<int>(meta_bytes.size()))) {
    return absl::DataLossError(absl::StrCat(path, ": the meta record does not parse"));
  }
  return opened;
}

v1::AutoChoices AutoChoicesToProto(const AutoChoices& choices) {
  v1::AutoChoices proto;
  for (const MatrixChoice& m : choices.matrices) {
    proto.add_newton_schulz_steps(m.steps);
    proto.add_row_normalize(m.row_normalize);
  }
  proto.set_decided_at_step(choices.decided_at_step);
  proto.set_small_sv_share(choices.small_sv_share);
  proto.set_dominance_ratio_min(choices.dominance_min);
  proto.set_rmnp_muon_cosine(choices.cosine);
  return proto;
}

AutoChoices AutoChoicesFromProto(const v1::AutoChoices& proto) {
  AutoChoices choices;
  const int n = std::min(proto.newton_schulz_steps_size(), proto.row_normalize_size());
  for (int i = 0; i < n; ++i) {
    choices.matrices.push_back({proto.newton_schulz_steps(i), proto.row_normalize(i)});
  }
  choices.decided_at_step = proto.decided_at_step();
  choices.small_sv_share = proto.small_sv_share();
  choices.dominance_min = proto.dominance_ratio_min();
  choices.cosine = proto.rmnp_muon_cosine();
  return choices;
}

absl::Status RestoreAutoChoices(Optimizer& optimizer, int t, bool present,
                                const v1::AutoChoices& proto) {
  if (!present || !optimizer.has_auto_choices(t)) return absl::OkStatus();
  if (proto.newton_schulz_steps_size() != proto.row_normalize_size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "auto choices of tensor '", optimizer.spec(t).name, "': ", proto.newton_schulz_steps_size(),
        " step counts for ", proto.row_normalize_size(), " directions"));
  }
  return optimizer.SetAutoChoices(t, AutoChoicesFromProto(proto));
}

absl::Status LoadTensorRecords(const CheckpointReader& reader, const v1::TensorCheckpoint& tc,
                               int t, Optimizer& optimizer) {
  std::vector<float> values;
  const std::string params_name = absl::StrCat("params/", tc.name());
  OPTD_ASSIGN_OR_RETURN(absl::string_view params, reader.Find(params_name));
  values.resize(static_cast<size_t>(optimizer.num_elements(t)));
  OPTD_RETURN_IF_ERROR(CopyRecord(params, params_name, absl::MakeSpan(values)));
  OPTD_RETURN_IF_ERROR(optimizer.SetParameters(t, values));
  for (const StateBuffer& buffer : optimizer.state(t)) {
    const std::string name = absl::StrCat("state/", tc.name(), "/", buffer.name);
    OPTD_ASSIGN_OR_RETURN(absl::string_view record, reader.Find(name));
    values.resize(static_cast<size_t>(buffer.count));
    OPTD_RETURN_IF_ERROR(CopyRecord(record, name, absl::MakeSpan(values)));
    OPTD_RETURN_IF_ERROR(optimizer.SetState(t, buffer.name, values));
  }
  OPTD_RETURN_IF_ERROR(optimizer.SetStepsApplied(t, tc.steps_applied()));
  const absl::Status choices =
      RestoreAutoChoices(optimizer, t, tc.has_auto_choices(), tc.auto_choices());
  if (!choices.ok()) return absl::DataLossError(choices.message());
  return absl::OkStatus();
}

absl::StatusOr<SessionState> LoadSessionCheckpoint(Backend& backend, FileSystem& fs,
                                                   const std::string& path, const std::string& id,
                                                   const v1::SessionConfig& config,
                                                   const std::string& token_digest) {
  OPTD_ASSIGN_OR_RETURN(OpenedCheckpoint opened, OpenSessionCheckpoint(fs, path));
  const v1::SessionCheckpoint& meta = opened.meta;
  const int num_tensors = config.tensors_size();
  if (meta.session_id() != id || !DigestsEqual(meta.token_sha256(), token_digest) ||
      meta.tensors_size() != num_tensors || meta.step() < 0) {
    return absl::DataLossError(absl::StrCat(path, " holds session '", meta.session_id(), "' with ",
                                            meta.tensors_size(), " tensors at step ", meta.step(),
                                            "; expected session '", id, "' with ", num_tensors,
                                            " tensors"));
  }
  OPTD_ASSIGN_OR_RETURN(std::vector<TensorSpec> specs, TensorSpecs(config));
  SessionState loaded;
  OPTD_ASSIGN_OR_RETURN(loaded.optimizer, Optimizer::Create(backend, std::move(specs)));
  for (int t = 0; t < num_tensors; ++t) {
    const v1::TensorCheckpoint& tc = meta.tensors(t);
    const std::string& name = config.tensors(t).name();
    if (tc.name() != name) {
      return absl::DataLossError(
          absl::StrCat(path, ": tensor ", t, " is '", tc.name(), "', expected '", name, "'"));
    }
    OPTD_RETURN_IF_ERROR(LoadTensorRecords(opened.reader, tc, t, *loaded.optimizer));
  }
  loaded.step = meta.step();
  for (const v1::GroupHyperparams& h : meta.hyperparams()) loaded.hyperparams[h.group()] = h;
  absl::Status applied = ApplyGroupHyperparams(config, *loaded.optimizer, loaded.hyperparams);
  if (!applied.ok()) {
    return absl::DataLossError(
        absl::StrCat(path, ": its hyperparameters do not validate: ", applied.message()));
  }
  return loaded;
}

absl::StatusOr<CheckpointInfo> WriteSessionCheckpoint(FileSystem& fs, const std::string& state_dir,
                                                      const SessionCheckpointContents& contents) {
  OPTD_RETURN_IF_ERROR(fs.CreateDir(state_dir));
  OPTD_RETURN_IF_ERROR(fs.CreateDir(absl::StrCat(state_dir, "/", contents.id)));
  CheckpointInfo info;
  info.path = SessionCheckpointPath(state_dir, contents.id);
  info.step = contents.step;

  Optimizer& optimizer = contents.optimizer;
  const int num_tensors = contents.config.tensors_size();
  v1::SessionCheckpoint meta;
  meta.set_session_id(contents.id);
  *meta.mutable_config() = contents.config;
  meta.set_token_sha256(contents.token_digest);
  meta.set_step(contents.step);
  meta.set_written_unix_micros(absl::ToUnixMicros(contents.written));
  for (const auto& [name, h] : contents.hyperparams) *meta.add_hyperparams() = h;
  for (int t = 0; t < num_tensors; ++t) {
    v1::TensorCheckpoint* tc = meta.add_tensors();
    tc->set_name(contents.config.tensors(t).name());
    tc->set_steps_applied(optimizer.steps_applied(t));
    for (const StateBuffer& b : optimizer.state(t)) tc->add_state_buffers(b.name);
    if (optimizer.has_auto_choices(t)) {
      *tc->mutable_auto_choices() = AutoChoicesToProto(optimizer.auto_choices(t));
    }
  }
  OPTD_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointWriter> writer,
                        CheckpointWriter::Create(fs, info.path));
  const std::string meta_bytes = meta.SerializeAsString();
  OPTD_RETURN_IF_ERROR(writer->AddRecord("meta", meta_bytes));
  info.bytes = static_cast<int64_t>(meta_bytes.size());
  std::vector<float> values;
  for (int t = 0; t < num_tensors; ++t) {
    const std::string& name = contents.config.tensors(t).name();
    values.resize(static_cast<size_t>(optimizer.num_elements(t)));
    OPTD_RETURN_IF_ERROR(optimizer.GetParameters(t, absl::MakeSpan(values)));
    OPTD_RETURN_IF_ERROR(writer->AddRecord(absl::StrCat("params/", name), AsBytes(values)));
    info.bytes += static_cast<int64_t>(values.size() * sizeof(float));
    for (const StateBuffer& b : optimizer.state(t)) {
      values.resize(static_cast<size_t>(b.count));
      OPTD_RETURN_IF_ERROR(optimizer.GetState(t, b.name, absl::MakeSpan(values)));
      OPTD_RETURN_IF_ERROR(
          writer->AddRecord(absl::StrCat("state/", name, "/", b.name), AsBytes(values)));
      info.bytes += static_cast<int64_t>(values.size() * sizeof(float));
    }
  }
  OPTD_RETURN_IF_ERROR(writer->Commit());
  return info;
}

}  // namespace optd::server
