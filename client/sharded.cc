#include "client/sharded.h"

#include <algorithm>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

namespace optd::client {
namespace {

absl::Status Named(const absl::Status& status, const std::string& address) {
  return absl::Status(status.code(), absl::StrCat("instance ", address, ": ", status.message()));
}

std::string SliceName(const std::string& tensor, int64_t slice) {
  return absl::StrCat(tensor, "[", slice, "]");
}

}  // namespace

absl::StatusOr<ShardedSession> ShardedSession::Create(const std::vector<ShardEndpoint>& endpoints,
                                                      const v1::SessionConfig& config,
                                                      const std::string& id, int64_t epoch,
                                                      const std::string& admin_token,
                                                      const ShardRestore* restore) {
  if (epoch <= 0) return absl::InvalidArgumentError("a sharded session's epoch must be >= 1");
  v1::PlacementManifest manifest;
  manifest.set_epoch(epoch);
  for (const ShardEndpoint& e : endpoints) {
    v1::PlacementManifest::Endpoint* out = manifest.add_endpoints();
    out->set_address(e.address);
    out->set_memory_bytes(e.memory_bytes);
  }
  // Which tensors Newton–Schulz balances: those of groups whose preset is a matrix optimizer
  // with it; AdamW and RMNP groups by bytes.
  std::map<std::string, std::string> presets;
  for (const v1::GroupConfig& g : config.groups()) presets[g.name()] = g.preset();
  std::map<std::string, const v1::TensorConfig*> tensors;
  for (const v1::TensorConfig& t : config.tensors()) {
    tensors[t.name()] = &t;
    v1::PlacementManifest::Tensor* m = manifest.add_tensors();
    m->set_name(t.name());
    for (int64_t d : t.shape()) m->add_shape(d);
    const std::string& preset = presets[t.group()];
    m->set_kind(preset.rfind("adamw", 0) == 0 || preset.rfind("rmnp", 0) == 0
                    ? v1::PlacementManifest::Tensor::BYTES
                    : v1::PlacementManifest::Tensor::NEWTON_SCHULZ);
    m->set_batch(t.rank_policy() == v1::RANK_POLICY_BATCH && t.shape_size() >= 3);
  }
  ShardedSession sharded;
  sharded.config_ = config;
  sharded.id_ = id;
  sharded.admin_token_ = admin_token;
  OPTD_ASSIGN_OR_RETURN(sharded.placement_, Place(manifest));

  // Each instance's part of the config: its whole tensors, and its slices as tensors of one
  // matrix each ([1, m, n], batched) named "name[i]".
  std::vector<v1::SessionConfig> parts(endpoints.size());
  for (v1::SessionConfig& part : parts) {
    part = config;
    part.clear_tensors();
    part.set_placement_epoch(epoch);
  }
  for (const v1::Placement::Item& item : sharded.placement_.items()) {
    const v1::TensorConfig& t = *tensors.at(item.tensor());
    int64_t elements = 1;
    for (int64_t d : t.shape()) elements *= d;
    sharded.sizes_[item.tensor()] = elements;
    v1::TensorConfig* out = parts[item.endpoint()].add_tensors();
    *out = t;
    if (t.rank_policy() == v1::RANK_POLICY_BATCH && t.shape_size() >= 3) {
      const int64_t m = t.shape(t.shape_size() - 2), n = t.shape(t.shape_size() - 1);
      out->set_name(SliceName(t.name(), item.first()));
      out->clear_shape();
      out->add_shape(1);
      out->add_shape(m);
      out->add_shape(n);
      sharded.pieces_[item.tensor()].push_back(
          {item.endpoint(), out->name(), item.first() * m * n, m * n});
    } else {
      sharded.pieces_[item.tensor()].push_back({item.endpoint(), t.name(), 0, elements});
    }
  }
  std::vector<int> shard_of(endpoints.size(), -1);  // instances that own nothing get no session
  for (size_t e = 0; e < endpoints.size(); ++e) {
    if (parts[e].tensors().empty()) continue;
    Client client(endpoints[e].channel, admin_token);
    v1::CreateSessionRequest request;
    request.set_session_id(id);
    *request.mutable_config() = parts[e];
    std::string token;  // empty: the admin token
    if (restore != nullptr) {
      for (const std::string& instance : restore->instances) {
        v1::CheckpointSource* source = request.add_restore_from();
        source->set_instance(instance);
        source->set_session_id(restore->session_id.empty() ? id : restore->session_id);
        auto source_token = restore->source_tokens.find(instance);
        if (admin_token.empty() && source_token != restore->source_tokens.end()) {
          source->set_token(source_token->second);
        }
      }
      request.set_replace(true);
      auto old = restore->tokens.find(endpoints[e].address);
      if (admin_token.empty() && old != restore->tokens.end()) token = old->second;
    }
    absl::StatusOr<Session> session = client.CreateSession(request, token);
    // A restore replaces what an earlier attempt created, so it may be retried while the
    // instance is unreachable for a moment (a connection broken by its restart).
    for (absl::Duration wait = absl::Milliseconds(100);
         restore != nullptr && absl::IsUnavailable(session.status()) && wait < absl::Seconds(4);
         wait *= 2) {
      absl::SleepFor(wait);
      session = client.CreateSession(request, token);
    }
    if (!session.ok()) {
      if (restore == nullptr) sharded.Delete().IgnoreError();
      return Named(session.status(), endpoints[e].address);
    }
    shard_of[e] = static_cast<int>(sharded.shards_.size());
    Shard shard{endpoints[e].address, endpoints[e].channel, *std::move(session), {}};
    for (const v1::TensorConfig& t : parts[e].tensors()) shard.tensors.push_back(t.name());
    sharded.shards_.push_back(std::move(shard));
  }
  for (auto& [name, pieces] : sharded.pieces_) {
    for (Piece& p : pieces) p.shard = shard_of[p.shard];
  }
  if (restore != nullptr) {
    // Every part has read its sources: now its own checkpoint may overwrite one of them.
    for (Shard& shard : sharded.shards_) {
      absl::StatusOr<v1::CheckpointResponse> written = shard.session.Checkpoint();
      if (!written.ok() && !absl::IsFailedPrecondition(written.status())) {
        return Named(written.status(), shard.address);
      }
    }
  }
  return sharded;
}

std::vector<std::pair<std::string, Session>> ShardedSession::parts() const {
  std::vector<std::pair<std::string, Session>> out;
  for (const Shard& shard : shards_) out.push_back({shard.address, shard.session});
  return out;
}

absl::StatusOr<int64_t> ShardedSession::Checkpoint(bool shared) {
  std::vector<int64_t> steps;
  for (Shard& shard : shards_) {
    absl::StatusOr<v1::CheckpointResponse> written = shard.session.Checkpoint(shared);
    if (!written.ok()) return Named(written.status(), shard.address);
    steps.push_back(written->step());
  }
  return CommonStep(steps, "checkpointed");
}

absl::StatusOr<int64_t> ShardedSession::Restore() {
  std::vector<int64_t> steps;
  for (Shard& shard : shards_) {
    absl::StatusOr<int64_t> step = shard.session.Restore();
    if (!step.ok()) return Named(step.status(), shard.address);
    steps.push_back(*step);
  }
  return CommonStep(steps, "restored");
}

absl::StatusOr<int64_t> ShardedSession::CommonStep(const std::vector<int64_t>& steps,
                                                   absl::string_view what) const {
  if (steps.empty()) return absl::FailedPreconditionError("the sharded session has no parts");
  bool same = true;
  std::vector<std::string> each;
  for (size_t s = 0; s < steps.size(); ++s) {
    same = same && steps[s] == steps[0];
    each.push_back(absl::StrCat(shards_[s].address, " at step ", steps[s]));
  }
  if (!same) {
    return absl::FailedPreconditionError(
        absl::StrCat("the parts of session '", id_, "' were ", what,
                     " at different steps: ", absl::StrJoin(each, ", ")));
  }
  return steps[0];
}

absl::StatusOr<ShardedSession> ShardedSession::Reshard(const std::vector<ShardEndpoint>& endpoints,
                                                       int64_t epoch) {
  if (epoch <= placement_.epoch()) {
    return absl::InvalidArgumentError(
        absl::StrCat("resharding needs an epoch after ", placement_.epoch(), ", got ", epoch));
  }
  ShardRestore restore;
  restore.session_id = id_;
  for (Shard& shard : shards_) {
    absl::StatusOr<v1::ServerInfo> info = Client(shard.channel).ServerInfo();
    if (!info.ok()) return Named(info.status(), shard.address);
    if (!info->shared_state()) {
      return Named(absl::FailedPreconditionError(
                       "the daemon has no --shared_state_root, so its part cannot move"),
                   shard.address);
    }
    restore.instances.push_back(info->instance_name());
    restore.tokens[shard.address] = shard.session.token();
    restore.source_tokens[info->instance_name()] = shard.session.token();
  }
  OPTD_RETURN_IF_ERROR(Checkpoint(/*shared=*/true).status());
  OPTD_ASSIGN_OR_RETURN(ShardedSession moved,
                        Create(endpoints, config_, id_, epoch, admin_token_, &restore));
  // The new parts are checkpointed; the old ones on instances that hold no new part go.
  for (Shard& shard : shards_) {
    bool kept = false;
    for (const Shard& now : moved.shards_) kept = kept || now.address == shard.address;
    if (!kept) {
      Client(shard.channel, admin_token_)
          .DeleteSession(id_, admin_token_.empty() ? shard.session.token() : "")
          .IgnoreError();
    }
  }
  shards_.clear();
  return moved;
}

absl::StatusOr<StepResult> ShardedSession::Step(int64_t step,
                                                absl::Span<const NamedTensor> gradients,
                                                const StepOptions& options) {
  // Each shard's gradients: spans into the caller's (slices are contiguous runs).
  std::vector<std::vector<NamedTensor>> per_shard(shards_.size());
  for (const NamedTensor& g : gradients) {
    auto it = pieces_.find(g.name);
    if (it == pieces_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("unknown tensor '", g.name, "'"));
    }
    if (static_cast<int64_t>(g.values.size()) != sizes_.at(g.name)) {
      return absl::InvalidArgumentError(absl::StrCat("gradient for tensor '", g.name, "' has ",
                                                     g.values.size(), " elements, expected ",
                                                     sizes_.at(g.name)));
    }
    for (const Piece& p : it->second) {
      per_shard[p.shard].push_back({p.name, g.values.subspan(p.offset, p.count)});
    }
  }
  std::vector<absl::StatusOr<StepResult>> results(shards_.size(), absl::UnknownError(""));
  std::vector<std::thread> threads;
  last_part_times_.assign(shards_.size(), absl::ZeroDuration());
  for (size_t s = 0; s < shards_.size(); ++s) {
    threads.emplace_back([&, s] {
      StepOptions shard_options = options;
      shard_options.outputs.clear();
      shard_options.placement_epoch = placement_.epoch();
      const absl::Time start = absl::Now();
      results[s] = shards_[s].session.Step(step, per_shard[s], shard_options);
      last_part_times_[s] = absl::Now() - start;
    });
  }
  for (std::thread& t : threads) t.join();
  for (size_t s = 0; s < shards_.size(); ++s) {
    if (absl::IsFailedPrecondition(results[s].status())) {
      results[s] = CompletedBeforeRestart(s, step, per_shard[s], options, results[s].status());
    }
  }
  StepResult merged;
  merged.step = step;
  for (size_t s = 0; s < shards_.size(); ++s) {
    if (!results[s].ok()) return Named(results[s].status(), shards_[s].address);
    merged.skipped = merged.skipped || results[s]->skipped;
    merged.replayed = merged.replayed || results[s]->replayed;
    merged.tensors_updated += results[s]->tensors_updated;
    merged.nonfinite_values += results[s]->nonfinite_values;
    merged.kind = results[s]->kind;
    // Durable only once every part is on disk.
    merged.checkpoint_step = s == 0 ? results[s]->checkpoint_step
                                    : std::min(merged.checkpoint_step, results[s]->checkpoint_step);
    if (!results[s]->checkpoint_error.empty()) {
      absl::StrAppend(&merged.checkpoint_error, merged.checkpoint_error.empty() ? "" : "; ",
                      shards_[s].address, ": ", results[s]->checkpoint_error);
    }
  }
  if (merged.kind == v1::STEP_RESULT_NONE) return merged;
  for (const auto& [name, pieces] : pieces_) {
    std::vector<float>& whole = merged.values[name];
    whole.resize(sizes_.at(name));
    for (const Piece& p : pieces) {
      auto part = results[p.shard]->values.find(p.name);
      if (part == results[p.shard]->values.end()) continue;  // no gradient, no result
      std::copy(part->second.begin(), part->second.end(), whole.begin() + p.offset);
    }
  }
  return merged;
}

absl::StatusOr<StepResult> ShardedSession::CompletedBeforeRestart(
    size_t s, int64_t step, absl::Span<const NamedTensor> gradients, const StepOptions& options,
    const absl::Status& refused) {
  Session& session = shards_[s].session;
  absl::StatusOr<v1::SessionInfo> info = session.Info();
  if (!info.ok() || info->step() != step ||
      info->config().placement_epoch() != placement_.epoch()) {
    return refused;
  }
  // The instance committed (and checkpointed) this step, then went down before it answered: it
  // restarted at this step and cannot replay it. Its parameters are the step's result.
  StepResult result;
  result.step = step;
  result.replayed = true;
  result.kind = config_.step_result();
  if (result.kind == v1::STEP_RESULT_NONE) return result;
  if (result.kind == v1::STEP_RESULT_DELTA) {
    return absl::FailedPreconditionError(absl::StrCat(
        "it completed step ", step, " before it restarted, and the step's delta went with it; ",
        "its parameters are current (GetParameters)"));
  }
  std::vector<std::string> names;
  for (const NamedTensor& g : gradients) names.push_back(g.name);
  OPTD_ASSIGN_OR_RETURN(result.values, session.GetParameters(names, options.result_dtype));
  return result;
}

absl::Status ShardedSession::UploadParameters(absl::Span<const NamedTensor> tensors) {
  std::vector<std::vector<NamedTensor>> per_shard(shards_.size());
  for (const NamedTensor& t : tensors) {
    auto it = pieces_.find(t.name);
    if (it == pieces_.end() || static_cast<int64_t>(t.values.size()) != sizes_.at(t.name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", t.name, "' is unknown or has the wrong size"));
    }
    for (const Piece& p : it->second) {
      per_shard[p.shard].push_back({p.name, t.values.subspan(p.offset, p.count)});
    }
  }
  for (size_t s = 0; s < shards_.size(); ++s) {
    if (per_shard[s].empty()) continue;
    absl::Status uploaded = shards_[s].session.UploadParameters(per_shard[s]);
    if (!uploaded.ok()) return Named(uploaded, shards_[s].address);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::map<std::string, std::vector<float>>> ShardedSession::GetParameters() {
  std::map<std::string, std::vector<float>> whole;
  for (size_t s = 0; s < shards_.size(); ++s) {
    absl::StatusOr<std::map<std::string, std::vector<float>>> part =
        shards_[s].session.GetParameters();
    if (!part.ok()) return Named(part.status(), shards_[s].address);
    for (const auto& [name, pieces] : pieces_) {
      for (const Piece& p : pieces) {
        if (p.shard != static_cast<int>(s)) continue;
        std::vector<float>& out = whole[name];
        out.resize(sizes_.at(name));
        const std::vector<float>& values = part->at(p.name);
        std::copy(values.begin(), values.end(), out.begin() + p.offset);
      }
    }
  }
  return whole;
}

absl::Status ShardedSession::Delete() {
  absl::Status first;
  for (Shard& shard : shards_) {
    absl::Status deleted = shard.session.Delete();
    if (!deleted.ok() && first.ok()) first = Named(deleted, shard.address);
  }
  shards_.clear();
  return first;
}

}  // namespace optd::client
