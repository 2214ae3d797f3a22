#include "server/state_transfer.h"

#include <cmath>
#include <cstring>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/status_macros.h"
#include "server/session_config.h"

namespace optd::server {
namespace {

std::string RecordName(absl::string_view tensor, absl::string_view buffer) {
  return buffer.empty() ? absl::StrCat("the parameters of tensor '", tensor, "'")
                        : absl::StrCat("state buffer '", buffer, "' of tensor '", tensor, "'");
}

const std::string* GroupPreset(const v1::SessionConfig& config, absl::string_view group) {
  for (const v1::GroupConfig& g : config.groups()) {
    if (g.name() == group) return &g.preset();
  }
  return nullptr;
}

}  // namespace

v1::StateHeader StateHeaderOf(const v1::SessionConfig& config, int64_t step,
                              const HyperparamTable& hyperparams, const Optimizer& optimizer,
                              bool parameters) {
  v1::StateHeader header;
  *header.mutable_config() = config;
  header.set_step(step);
  header.set_parameters(parameters);
  for (const auto& [name, h] : hyperparams) {
    v1::HyperparamUpdate* u = header.add_hyperparams();
    u->set_group(name);
    u->set_lr(h.lr());
    u->set_momentum(h.momentum());
    u->set_weight_decay(h.weight_decay());
  }
  for (int t = 0; t < optimizer.num_tensors(); ++t) {
    v1::TensorState* ts = header.add_tensors();
    ts->set_name(config.tensors(t).name());
    ts->set_steps_applied(optimizer.steps_applied(t));
    ts->set_elements(optimizer.num_elements(t));
    if (optimizer.has_auto_choices(t)) {
      *ts->mutable_auto_choices() = AutoChoicesToProto(optimizer.auto_choices(t));
    }
    for (const StateBuffer& b : optimizer.state(t)) {
      ts->add_state_buffers(b.name);
      ts->add_state_elements(b.count);
    }
  }
  return header;
}

absl::StatusOr<std::unique_ptr<StateImport>> StateImport::Begin(Backend& backend,
                                                                const std::string& session_id,
                                                                const v1::SessionConfig& config,
                                                                const v1::StateHeader& header) {
  const std::string where = absl::StrCat("the state imported into session '", session_id, "'");
  if (!header.parameters()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where,
                     " holds no parameters: an import takes every record, the parameters "
                     "too (export without skip_parameters, or add them)"));
  }
  if (header.step() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(where, " is at step ", header.step()));
  }
  std::map<std::string, const v1::TensorConfig*> source_tensors;
  for (const v1::TensorConfig& t : header.config().tensors()) source_tensors[t.name()] = &t;
  std::map<std::string, const v1::TensorState*> given;
  for (const v1::TensorState& ts : header.tensors()) {
    if (!given.emplace(ts.name(), &ts).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " names tensor '", ts.name(), "' twice"));
    }
  }
  std::vector<std::string> missing, extra;
  std::set<std::string> names;
  for (const v1::TensorConfig& t : config.tensors()) {
    names.insert(t.name());
    if (!given.contains(t.name())) missing.push_back(t.name());
  }
  for (const auto& [name, ts] : given) {
    if (!names.contains(name)) extra.push_back(name);
  }
  if (!missing.empty() || !extra.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, " is of other tensors: it lacks [", absl::StrJoin(missing, ", "),
                     "] and holds [", absl::StrJoin(extra, ", "), "] the session does not have"));
  }

  auto import = std::unique_ptr<StateImport>(new StateImport());
  import->session_id_ = session_id;
  import->config_ = &config;
  OPTD_ASSIGN_OR_RETURN(std::vector<TensorSpec> specs, TensorSpecs(config));
  OPTD_ASSIGN_OR_RETURN(import->state_.optimizer, Optimizer::Create(backend, std::move(specs)));
  Optimizer& optimizer = *import->state_.optimizer;
  import->state_.step = header.step();
  import->steps_applied_.resize(static_cast<size_t>(config.tensors_size()));
  for (int t = 0; t < config.tensors_size(); ++t) {
    const v1::TensorConfig& tc = config.tensors(t);
    const v1::TensorState& ts = *given[tc.name()];
    auto source = source_tensors.find(tc.name());
    if (source == source_tensors.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": its config lacks tensor '", tc.name(), "'"));
    }
    const v1::TensorConfig& st = *source->second;
    if (!std::equal(st.shape().begin(), st.shape().end(), tc.shape().begin(), tc.shape().end())) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": tensor '", tc.name(), "' has shape [", absl::StrJoin(st.shape(), ", "),
          "], the session's [", absl::StrJoin(tc.shape(), ", "), "]"));
    }
    const std::string* preset = GroupPreset(config, tc.group());
    const std::string* source_preset = GroupPreset(header.config(), st.group());
    if (source_preset == nullptr || *source_preset != *preset) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": tensor '", tc.name(), "' was stepped with preset '",
                       source_preset == nullptr ? "" : *source_preset,
                       "', the session steps it with '", *preset, "'"));
    }
    if (ts.steps_applied() < 0) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": tensor '", tc.name(), "' has ",
                                                     ts.steps_applied(), " steps applied"));
    }
    import->steps_applied_[t] = ts.steps_applied();
    // Checked now, against the session's own config, so a bad header changes nothing.
    const absl::Status choices =
        RestoreAutoChoices(optimizer, t, ts.has_auto_choices(), ts.auto_choices());
    if (!choices.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": ", choices.message()));
    }
    import->records_[{tc.name(), ""}] = Record{t, optimizer.num_elements(t), 0, false};
    std::vector<std::string> want, got(ts.state_buffers().begin(), ts.state_buffers().end());
    for (const StateBuffer& b : optimizer.state(t)) {
      want.push_back(b.name);
      import->records_[{tc.name(), b.name}] =
          Record{t, b.count, 0, absl::EndsWith(b.name, "second_moment")};
    }
    if (std::set<std::string>(want.begin(), want.end()) !=
            std::set<std::string>(got.begin(), got.end()) ||
        want.size() != got.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": tensor '", tc.name(), "' has state buffers [", absl::StrJoin(got, ", "),
          "], the session's optimizer [", absl::StrJoin(want, ", "), "]"));
    }
  }
  std::set<std::string> used;  // groups without tensors have no hyperparameters to carry
  for (const v1::TensorConfig& t : config.tensors()) used.insert(t.group());
  for (const v1::GroupConfig& g : config.groups()) {
    if (!used.contains(g.name())) continue;
    const v1::HyperparamUpdate* found = nullptr;
    for (const v1::HyperparamUpdate& u : header.hyperparams()) {
      if (u.group() == g.name()) found = &u;
    }
    if (found == nullptr || !found->has_lr() || !found->has_momentum() ||
        !found->has_weight_decay()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " lacks group '", g.name(), "''s lr, momentum or weight_decay"));
    }
    v1::GroupHyperparams& h = import->state_.hyperparams[g.name()];
    h.set_group(g.name());
    h.set_lr(found->lr());
    h.set_momentum(found->momentum());
    h.set_weight_decay(found->weight_decay());
  }
  return import;
}

absl::Status StateImport::Add(const v1::StateChunk& chunk) {
  auto it = records_.find({chunk.tensor(), chunk.buffer()});
  if (it == records_.end()) {
    return absl::InvalidArgumentError(absl::StrCat("ImportState: session '", session_id_,
                                                   "' has no ",
                                                   RecordName(chunk.tensor(), chunk.buffer())));
  }
  Record& r = it->second;
  const std::string name = RecordName(chunk.tensor(), chunk.buffer());
  const std::string& data = chunk.data();
  if (data.empty() || data.size() % sizeof(float) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("ImportState: a chunk of ", name, " holds ",
                                                   data.size(),
                                                   " bytes, not a whole number (> 0) "
                                                   "of fp32 values"));
  }
  const int64_t count = static_cast<int64_t>(data.size() / sizeof(float));
  if (chunk.offset() != r.received) {
    return absl::InvalidArgumentError(absl::StrCat("ImportState: a chunk of ", name,
                                                   " starts at element ", chunk.offset(),
                                                   "; the record's next element is ", r.received));
  }
  if (count > r.elements - r.received) {
    return absl::InvalidArgumentError(absl::StrCat("ImportState: a chunk of ", name, " ends at ",
                                                   chunk.offset() + count, ", past its ",
                                                   r.elements, " elements"));
  }
  values_.resize(static_cast<size_t>(count));
  std::memcpy(values_.data(), data.data(), data.size());  // the wire is little-endian, as x86
  if (r.non_negative) {
    for (int64_t i = 0; i < count; ++i) {
      if (values_[static_cast<size_t>(i)] < 0) {
        return absl::InvalidArgumentError(absl::StrCat("ImportState: ", name, " is negative at ",
                                                       "element ", chunk.offset() + i));
      }
    }
  }
  absl::Status written =
      state_.optimizer->WriteRange(r.tensor, chunk.buffer(), chunk.offset(), values_);
  if (!written.ok()) {
    return absl::Status(written.code(), absl::StrCat("ImportState: ", written.message()));
  }
  r.received += count;
  bytes_received_ += static_cast<int64_t>(data.size());
  return absl::OkStatus();
}

absl::StatusOr<SessionState> StateImport::Finish() {
  for (const auto& [key, r] : records_) {
    if (r.received != r.elements) {
      return absl::InvalidArgumentError(
          absl::StrCat("ImportState: ", RecordName(key.first, key.second), " has ", r.received,
                       " of its ", r.elements, " elements; nothing was changed"));
    }
  }
  Optimizer& optimizer = *state_.optimizer;
  for (int t = 0; t < optimizer.num_tensors(); ++t) {
    OPTD_RETURN_IF_ERROR(optimizer.SetStepsApplied(t, steps_applied_[static_cast<size_t>(t)]));
  }
  absl::Status applied = ApplyGroupHyperparams(*config_, optimizer, state_.hyperparams);
  if (!applied.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("ImportState: its hyperparameters do not validate: ", applied.message()));
  }
  return std::move(state_);
}

}  // namespace optd::server
