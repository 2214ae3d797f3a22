#include "server/session_manager.h"

#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/auth.h"
#include "server/log.h"
#include "server/session_config.h"

namespace optd::server {
namespace {

// A deleted session's checkpoint directory on its way out: '~' is in no session id.
constexpr absl::string_view kDeletedPrefix = "deleted~";

}  // namespace

SessionManager::SessionManager(Backend& backend, SessionManagerOptions options)
    : backend_(backend),
      options_(std::move(options)),
      fs_(options_.fs != nullptr ? *options_.fs : PosixFileSystem()) {}

SessionOptions SessionManager::session_options() const {
  SessionOptions o;
  o.state_dir = options_.state_dir;
  o.fs = &fs_;
  o.clock = options_.clock;
  o.default_straggler_timeout = options_.default_straggler_timeout;
  o.metrics = options_.metrics;
  o.analyzer = options_.analyzer;
  o.pipeliner = options_.pipeliner;
  o.early_results_min_bytes = options_.early_results_min_bytes;
  return o;
}

void SessionManager::ExportCountsLocked() {
  if (options_.metrics == nullptr) return;
  int64_t loaded_bytes = 0;
  for (const auto& [id, entry] : sessions_) {
    if (entry.session != nullptr) loaded_bytes += entry.state_bytes;
  }
  options_.metrics->SetSessions(static_cast<int64_t>(sessions_.size()));
  options_.metrics->SetBackendMemory("sessions", loaded_bytes);
}

absl::Status SessionManager::Recover(std::vector<std::string>* skipped) {
  if (options_.state_dir.empty()) return absl::OkStatus();
  OPTD_RETURN_IF_ERROR(fs_.CreateDir(options_.state_dir));
  OPTD_ASSIGN_OR_RETURN(std::vector<std::string> names, fs_.ListDir(options_.state_dir));
  absl::MutexLock lock(&mu_);
  for (const std::string& name : names) {
    if (absl::StartsWith(name, kDeletedPrefix)) {
      // A deleted session's checkpoint whose removal did not finish.
      fs_.DeleteRecursively(absl::StrCat(options_.state_dir, "/", name)).IgnoreError();
      continue;
    }
    if (!IsValidSessionId(name)) continue;
    const std::string path = Session::CheckpointPath(options_.state_dir, name);
    if (!fs_.Exists(path)) continue;
    absl::StatusOr<v1::SessionCheckpoint> meta = Session::ReadCheckpointMeta(fs_, path);
    // Its config is checked exactly as CreateSession checks one: a crafted checkpoint (with valid
    // checksums) is skipped with its reason, never trusted.
    absl::StatusOr<int64_t> bytes = absl::UnknownError("unread");
    if (meta.ok()) {
      v1::SessionConfig config = meta->config();
      const absl::Status valid = NormalizeSessionConfig(config);
      bytes = valid.ok() ? Session::RequiredBytes(config) : valid;
    } else {
      bytes = meta.status();
    }
    if (bytes.ok() && *bytes > options_.max_session_bytes) {
      bytes = absl::ResourceExhaustedError(absl::StrCat("needs ", *bytes, " bytes, over the ",
                                                        options_.max_session_bytes,
                                                        " of --max_session_bytes"));
    }
    if (!bytes.ok() || meta->session_id() != name) {
      const std::string reason = absl::StrCat(
          path, ": ", bytes.ok() ? "holds another session's id" : bytes.status().ToString());
      if (skipped != nullptr) skipped->push_back(reason);
      continue;
    }
    Entry entry;
    entry.token_digest = meta->token_sha256();
    entry.step = meta->step();
    entry.state_bytes = *bytes;
    // A restart starts the lease again: the last use before it is not on disk.
    entry.delete_after_idle = absl::Seconds(meta->config().delete_after_idle_seconds());
    entry.unloaded_last_used = (options_.clock != nullptr ? *options_.clock : RealClock()).Now();
    id_by_digest_[entry.token_digest] = name;
    sessions_[name] = std::move(entry);
  }
  ExportCountsLocked();
  return absl::OkStatus();
}

absl::Status SessionManager::AuthorizeAdmin(absl::string_view authorization) {
  if (options_.admin_token_digest.empty()) return absl::OkStatus();
  absl::StatusOr<std::string> token = ParseBearer(authorization);
  if (!token.ok()) {
    return absl::UnauthenticatedError(
        absl::StrCat("this call needs the admin token: ", token.status().message()));
  }
  const std::string digest = TokenDigest(*token);
  if (DigestsEqual(digest, options_.admin_token_digest)) return absl::OkStatus();
  absl::MutexLock lock(&mu_);
  if (id_by_digest_.contains(digest)) {
    return absl::PermissionDeniedError(
        "this call needs the admin token; a session token does not grant it");
  }
  return absl::UnauthenticatedError("this call needs the admin token; the token given is not");
}

absl::Status SessionManager::Authenticate(absl::string_view authorization) {
  OPTD_ASSIGN_OR_RETURN(std::string token, ParseBearer(authorization));
  const std::string digest = TokenDigest(token);
  if (!options_.admin_token_digest.empty() && DigestsEqual(digest, options_.admin_token_digest)) {
    return absl::OkStatus();
  }
  absl::MutexLock lock(&mu_);
  if (!id_by_digest_.contains(digest)) {
    return absl::UnauthenticatedError("the bearer token is not valid for any session");
  }
  return absl::OkStatus();
}

bool SessionManager::IsAdmin(absl::string_view authorization) const {
  if (options_.admin_token_digest.empty()) return false;
  absl::StatusOr<std::string> token = ParseBearer(authorization);
  return token.ok() && DigestsEqual(TokenDigest(*token), options_.admin_token_digest);
}

absl::StatusOr<std::string> SessionManager::SharedDir() const {
  if (options_.shared_state_root.empty()) {
    return absl::FailedPreconditionError(
        "the daemon has no shared state root (--shared_state_root); resharding is off");
  }
  return absl::StrCat(options_.shared_state_root, "/", options_.instance_name);
}

absl::StatusOr<CreatedSession> SessionManager::Create(std::string id, v1::SessionConfig config,
                                                      const CreateOptions& create) {
  OPTD_RETURN_IF_ERROR(NormalizeSessionConfig(config));
  if (config.world_size() > options_.max_world_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "world_size ", config.world_size(), " exceeds the ", options_.max_world_size,
        " steps the daemon admits at once (--max_pending_steps); all workers of a step must fit"));
  }
  OPTD_ASSIGN_OR_RETURN(int64_t bytes, Session::RequiredBytes(config));
  if (bytes > options_.max_session_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the session needs ", bytes, " bytes of state (parameters, optimizer state, ",
                     "staging for ", config.world_size(), " worker(s), results); the limit per ",
                     "session is ", options_.max_session_bytes, " (--max_session_bytes)"));
  }
  if (!id.empty() && !IsValidSessionId(id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("session id '", id, "' is not [A-Za-z0-9_.-]{1,64}"));
  }
  std::vector<CheckpointSourcePath> sources;
  if (!create.restore_from.empty()) {
    OPTD_ASSIGN_OR_RETURN(std::string shared_dir, SharedDir());
    for (const v1::CheckpointSource& source : create.restore_from) {
      if (!IsValidSessionId(source.instance()) || !IsValidSessionId(source.session_id())) {
        return absl::InvalidArgumentError(absl::StrCat(
            "restore_from names instance '", source.instance(), "' and session '",
            source.session_id(), "'; both must be [A-Za-z0-9_.-]{1,64}, not '.' or '..'"));
      }
      sources.push_back(
          {absl::StrCat("instance '", source.instance(), "' session '", source.session_id(), "'"),
           Session::CheckpointPath(absl::StrCat(options_.shared_state_root, "/", source.instance()),
                                   source.session_id())});
    }
  }
  // The right to read every source, before anything about them is looked at or told.
  const bool admin = IsAdmin(create.authorization);
  if (!sources.empty() && !admin) {
    for (size_t i = 0; i < sources.size(); ++i) {
      const v1::CheckpointSource& source = create.restore_from[i];
      absl::StatusOr<v1::SessionCheckpoint> meta =
          Session::ReadCheckpointMeta(fs_, sources[i].path);
      if (source.token().empty() || !meta.ok() ||
          !DigestsEqual(TokenDigest(source.token()), meta->token_sha256())) {
        return absl::PermissionDeniedError(absl::StrCat(
            "restore_from ", sources[i].label, ": no checkpoint there that ",
            source.token().empty() ? "an empty token" : "the token given with it",
            " opens; each source needs its session's token, or the call the admin token"));
      }
    }
  }
  if (create.replace && id.empty()) {
    return absl::InvalidArgumentError("replace needs the session_id of the session to replace");
  }
  OPTD_ASSIGN_OR_RETURN(std::string token, GenerateToken());
  const std::string digest = TokenDigest(token);
  // The admin's sessions count against no client.
  const std::string client = admin ? "" : create.client;
  bool replacing = false;
  {
    // Reserve the name and the slot before the (possibly long) allocation.
    absl::MutexLock lock(&mu_);
    if (options_.memory_budget_bytes > 0) {
      // Every session counts, loaded or not (each must be able to reload); a replaced one
      // until its successor takes its place.
      const int64_t committed = CommittedBytesLocked();
      if (committed + bytes > options_.memory_budget_bytes) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "the session needs ", bytes, " bytes of state and the daemon's sessions already hold ",
            committed, " of its ", options_.memory_budget_bytes,
            " (--memory_budget_bytes); delete a session first"));
      }
    }
    auto existing = sessions_.find(id);
    if (create.replace && existing != sessions_.end()) {
      // Wait out a reload, then claim the entry: the old session serves until the swap.
      OPTD_ASSIGN_OR_RETURN(Entry * entry, AuthorizeSettledLocked(id, create.authorization));
      if (entry->replacing) {
        return absl::AlreadyExistsError(
            absl::StrCat("session '", id, "' is already being replaced by another call"));
      }
      entry->replacing = true;
      replacing = true;
    } else {
      if (static_cast<int>(sessions_.size()) >= options_.max_sessions) {
        return absl::ResourceExhaustedError(absl::StrCat("the daemon holds ", sessions_.size(),
                                                         " sessions, its limit (--max_sessions); ",
                                                         "delete one first"));
      }
      if (!client.empty() && options_.max_sessions_per_client > 0) {
        int held = 0;
        for (const auto& [other, e] : sessions_) held += e.client == client ? 1 : 0;
        if (held >= options_.max_sessions_per_client) {
          return absl::ResourceExhaustedError(absl::StrCat(
              "client ", client, " holds ", held, " sessions, the limit for a client without the ",
              "admin token (--max_sessions_per_client); delete one first"));
        }
      }
      // A directory without a session is a checkpoint Recover could not read: never reuse its
      // name, so that it stays on disk for someone to look at.
      auto taken = [&](const std::string& name) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return sessions_.contains(name) ||
               (!options_.state_dir.empty() &&
                fs_.Exists(absl::StrCat(options_.state_dir, "/", name)));
      };
      if (id.empty()) {
        do {
          OPTD_ASSIGN_OR_RETURN(id, GenerateSessionId());
        } while (taken(id));
      } else if (existing != sessions_.end()) {
        return absl::AlreadyExistsError(absl::StrCat("session '", id, "' already exists"));
      } else if (taken(id)) {
        return absl::AlreadyExistsError(
            absl::StrCat("the state directory holds a checkpoint for '", id,
                         "' that could not be loaded at start-up; move it away to reuse the name"));
      }
      Entry reserved;
      reserved.token_digest = digest;
      reserved.state_bytes = bytes;
      reserved.client = client;
      reserved.creating = true;
      sessions_[id] = std::move(reserved);
    }
  }
  absl::StatusOr<std::unique_ptr<Session>> created =
      sources.empty()
          ? Session::Create(backend_, id, std::move(config), digest, session_options())
          : Session::Restored(backend_, id, std::move(config), digest, session_options(), sources);
  // A restored session's sources stay untouched until every part of the resharded session has
  // read them (its first step or checkpoint comes later).
  absl::StatusOr<CheckpointInfo> first = CheckpointInfo{};
  if (created.ok() && !options_.state_dir.empty() && sources.empty()) {
    first = (*created)->Checkpoint();
  }
  absl::MutexLock lock(&mu_);
  if (!created.ok() || !first.ok()) {
    if (created.ok()) (*created)->Retire();
    if (replacing) {
      sessions_.at(id).replacing = false;  // the old session goes on as it was
    } else {
      sessions_.erase(id);
      if (!options_.state_dir.empty()) {
        fs_.DeleteRecursively(absl::StrCat(options_.state_dir, "/", id)).IgnoreError();
      }
    }
    return created.ok() ? first.status() : created.status();
  }
  std::shared_ptr<Session> session = *std::move(created);
  if (replacing) {
    // A call may have started reloading the old session meanwhile: let it finish first, so it
    // cannot put the old session back over the new one.
    while (sessions_.at(id).loading) loading_done_.Wait(&mu_);
  }
  Entry& entry = sessions_.at(id);
  if (replacing) {
    // The old session refuses every later call and never writes its checkpoint again.
    if (entry.session != nullptr) {
      entry.session->MarkDeleted();
      entry.session->Retire();
    }
    id_by_digest_.erase(entry.token_digest);
    const std::string owner = entry.client;  // a replacement stays the same client's
    entry = Entry{};
    entry.token_digest = digest;
    entry.state_bytes = bytes;
    entry.client = owner;
  }
  entry.session = session;
  entry.creating = false;
  entry.delete_after_idle = absl::Seconds(session->config().delete_after_idle_seconds());
  id_by_digest_[digest] = id;
  ExportCountsLocked();
  LogEvent(absl::StrCat(
      "session '", id, "' ", replacing ? "replaced" : "created", ": ", session->num_tensors(),
      " tensor(s), world_size ", session->config().world_size(), ", ", bytes, " bytes of state",
      sources.empty() ? std::string()
                      : absl::StrCat(", restored from ", sources.size(), " checkpoint(s) at step ",
                                     session->step())));
  return CreatedSession{std::move(session), std::move(token)};
}

absl::StatusOr<SessionManager::Entry*> SessionManager::AuthorizeLocked(
    absl::string_view id, absl::string_view authorization) {
  OPTD_ASSIGN_OR_RETURN(std::string token, ParseBearer(authorization));
  const std::string digest = TokenDigest(token);
  const bool admin =
      !options_.admin_token_digest.empty() && DigestsEqual(digest, options_.admin_token_digest);
  auto owner = id_by_digest_.find(digest);
  if (!admin && owner == id_by_digest_.end()) {
    return absl::UnauthenticatedError("the bearer token is not valid for any session");
  }
  // A session token opens its own session only, and learns nothing of others: whether `id`
  // exists is checked after ownership.
  if (!admin && owner->second != id) {
    return absl::PermissionDeniedError(absl::StrCat("the bearer token belongs to session '",
                                                    owner->second, "', not to session '", id, "'"));
  }
  auto it = sessions_.find(id);
  if (it == sessions_.end()) {
    return absl::NotFoundError(absl::StrCat("session '", id, "' does not exist"));
  }
  if (it->second.creating) {
    return absl::UnavailableError(absl::StrCat("session '", id, "' is still being created"));
  }
  return &it->second;
}

absl::StatusOr<SessionManager::Entry*> SessionManager::AuthorizeSettledLocked(
    absl::string_view id, absl::string_view authorization) {
  while (true) {
    OPTD_ASSIGN_OR_RETURN(Entry * entry, AuthorizeLocked(id, authorization));
    if (!entry->loading) return entry;
    // Another call is reloading it; the entry may be gone once it is done.
    loading_done_.Wait(&mu_);
  }
}

int64_t SessionManager::CommittedBytesLocked() const {
  int64_t committed = 0;
  for (const auto& [id, entry] : sessions_) committed += entry.state_bytes;
  return committed;
}

absl::StatusOr<v1::SessionInfo> SessionManager::AddTensors(const v1::AddTensorsRequest& request,
                                                           absl::string_view authorization) {
  const std::string& id = request.session_id();
  if (id.empty()) return absl::InvalidArgumentError("session_id is empty");
  OPTD_ASSIGN_OR_RETURN(std::shared_ptr<Session> session, Get(id, authorization));
  if (request.tensors().empty()) {
    return absl::InvalidArgumentError("AddTensors names no tensors to add");
  }
  v1::SessionConfig extended = session->config();
  if (extended.placement_epoch() != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("session '", id,
                     "' is a part of a sharded session, whose client places its tensors; "
                     "add tensors through it (a new placement), not to one part"));
  }
  std::set<std::string> names;
  for (const v1::TensorConfig& t : extended.tensors()) names.insert(t.name());
  for (const v1::GroupConfig& g : extended.groups()) names.insert("group:" + g.name());
  for (const v1::GroupConfig& g : request.groups()) {
    if (!names.insert("group:" + g.name()).second) {
      return absl::InvalidArgumentError(absl::StrCat("session '", id, "' has a group '", g.name(),
                                                     "' already: name a new one, or put the "
                                                     "new tensors in it without redefining it"));
    }
    *extended.add_groups() = g;
  }
  for (const v1::TensorConfig& t : request.tensors()) {
    if (!names.insert(t.name()).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("session '", id, "' has a tensor '", t.name(), "' already"));
    }
    *extended.add_tensors() = t;
  }
  OPTD_RETURN_IF_ERROR(NormalizeSessionConfig(extended));
  OPTD_ASSIGN_OR_RETURN(int64_t bytes, Session::RequiredBytes(extended));
  if (bytes > options_.max_session_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("with the new tensors, session '", id, "' needs ", bytes,
                     " bytes of state; the limit per session is ", options_.max_session_bytes,
                     " (--max_session_bytes)"));
  }
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end() || it->second.session != session) {
      return absl::AbortedError(
          absl::StrCat("session '", id, "' was replaced or unloaded meanwhile; retry"));
    }
    Entry& entry = it->second;
    if (entry.replacing) {
      return absl::UnavailableError(
          absl::StrCat("session '", id, "' is being replaced or extended by another call; retry"));
    }
    if (options_.memory_budget_bytes > 0) {
      const int64_t committed = CommittedBytesLocked();
      if (committed - entry.state_bytes + bytes > options_.memory_budget_bytes) {
        return absl::ResourceExhaustedError(
            absl::StrCat("with the new tensors, session '", id, "' needs ", bytes,
                         " bytes of state; the ", "daemon's sessions hold ", committed, " of its ",
                         options_.memory_budget_bytes, " (--memory_budget_bytes)"));
      }
    }
    entry.replacing = true;  // Delete and CreateSession's replace wait it out
  }
  absl::StatusOr<std::unique_ptr<Session>> successor = session->Extend(std::move(extended));
  std::shared_ptr<Session> next;
  {
    absl::MutexLock lock(&mu_);
    Entry& entry = sessions_.at(id);
    entry.replacing = false;
    if (!successor.ok()) return successor.status();
    next = std::move(*successor);
    entry.session = next;
    entry.state_bytes = bytes;
    ExportCountsLocked();
  }
  if (!options_.state_dir.empty()) {
    if (absl::StatusOr<CheckpointInfo> written = next->Checkpoint(); !written.ok()) {
      LogEvent(absl::StrCat("session '", id, "': its new tensors are not on disk yet: ",
                            written.status().ToString()));
    }
  }
  return next->Info(/*with_tensors=*/true);
}

absl::StatusOr<std::shared_ptr<Session>> SessionManager::Get(absl::string_view id,
                                                             absl::string_view authorization) {
  {
    absl::MutexLock lock(&mu_);
    OPTD_ASSIGN_OR_RETURN(Entry * entry, AuthorizeSettledLocked(id, authorization));
    if (entry->session != nullptr) return entry->session;
    entry->loading = true;
  }
  // The checkpoint is read without the table lock, so calls for other sessions go on meanwhile;
  // calls for this one wait in AuthorizeSettledLocked.
  const std::string name(id);
  absl::StatusOr<std::unique_ptr<Session>> loaded =
      Session::Load(backend_, Session::CheckpointPath(options_.state_dir, name), session_options());
  absl::MutexLock lock(&mu_);
  loading_done_.SignalAll();
  Entry& entry = sessions_.at(name);  // Delete waits for the load, so the entry is still here
  entry.loading = false;
  if (!loaded.ok()) {
    return absl::Status(loaded.status().code(),
                        absl::StrCat("session '", name, "' could not be reloaded from its ",
                                     "checkpoint: ", loaded.status().message()));
  }
  entry.session = *std::move(loaded);
  ExportCountsLocked();
  return entry.session;
}

absl::Status SessionManager::Delete(absl::string_view id, absl::string_view authorization) {
  // The admin token or the session's own token (a client closing its session).
  absl::MutexLock lock(&mu_);
  // An unloaded session is deleted without loading it (its checkpoint may not even read).
  OPTD_ASSIGN_OR_RETURN(Entry * entry, AuthorizeSettledLocked(id, authorization));
  if (entry->replacing) {
    return absl::UnavailableError(
        absl::StrCat("session '", id, "' is being replaced by a CreateSession; retry after it"));
  }
  return DeleteLocked(id, *entry);
}

absl::Status SessionManager::DeleteLocked(absl::string_view id, Entry& entry) {
  // All or nothing: the checkpoint directory is first renamed out of Recover's sight (a name no
  // session id can take); only then does the session go from memory. A state directory optd
  // cannot write refuses the delete and leaves the session as it was.
  std::string tombstone;
  if (!options_.state_dir.empty()) {
    const std::string dir = absl::StrCat(options_.state_dir, "/", id);
    if (fs_.Exists(dir)) {
      tombstone = absl::StrCat(options_.state_dir, "/", kDeletedPrefix, id);
      OPTD_RETURN_IF_ERROR(fs_.DeleteRecursively(tombstone));  // an earlier delete's leftover
      OPTD_RETURN_IF_ERROR(fs_.Rename(dir, tombstone));
      if (absl::Status synced = fs_.SyncDir(options_.state_dir); !synced.ok()) {
        LogEvent(absl::StrCat("session '", id, "': deleted, but the state directory could not be ",
                              "synced; a crash now may bring it back: ", synced.ToString()));
      }
    }
  }
  // Calls still holding the session get NotFound from now on, and nothing of it is written
  // again: no checkpoint can bring it back after its directory is gone.
  if (entry.session != nullptr) {
    entry.session->MarkDeleted();
    entry.session->Retire();
  }
  id_by_digest_.erase(entry.token_digest);
  sessions_.erase(sessions_.find(id));
  ExportCountsLocked();
  LogEvent(absl::StrCat("session '", id, "' deleted"));
  if (!tombstone.empty()) {
    if (absl::Status removed = fs_.DeleteRecursively(tombstone); !removed.ok()) {
      LogEvent(absl::StrCat("session '", id, "': its old checkpoint stays at ", tombstone,
                            " (removed at the next start): ", removed.ToString()));
    }
  }
  return absl::OkStatus();
}

int SessionManager::DeleteExpired(absl::Time now) {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> expired;
  for (const auto& [id, entry] : sessions_) {
    if (entry.delete_after_idle <= absl::ZeroDuration() || entry.creating || entry.loading ||
        entry.replacing) {
      continue;
    }
    const absl::Time last =
        entry.session != nullptr ? entry.session->last_used() : entry.unloaded_last_used;
    // A call holding the session (Get hands references out under mu_, so none appears while it
    // is held) is using it: not idle.
    if (now - last < entry.delete_after_idle ||
        (entry.session != nullptr && entry.session.use_count() != 1)) {
      continue;
    }
    expired.push_back(id);
  }
  int deleted = 0;
  for (const std::string& id : expired) {
    const absl::Duration lease = sessions_.at(id).delete_after_idle;
    absl::Status status = DeleteLocked(id, sessions_.at(id));
    if (status.ok()) {
      ++deleted;
      LogEvent(absl::StrCat("session '", id,
                            "' deleted: unused for its delete_after_idle_seconds (",
                            absl::FormatDuration(lease), ")"));
    } else {
      LogEvent(
          absl::StrCat("session '", id, "' expired but could not be deleted: ", status.ToString()));
    }
  }
  return deleted;
}

std::vector<v1::SessionInfo> SessionManager::List() {
  std::vector<v1::SessionInfo> infos;
  absl::MutexLock lock(&mu_);
  for (const auto& [id, entry] : sessions_) {
    if (entry.creating) continue;
    if (entry.session != nullptr) {
      infos.push_back(entry.session->Info(/*with_tensors=*/false));
      continue;
    }
    v1::SessionInfo info;
    info.set_session_id(id);
    info.set_loaded(false);
    info.set_step(entry.step);
    info.set_checkpoint_step(entry.step);
    info.set_state_bytes(entry.state_bytes);
    infos.push_back(std::move(info));
  }
  return infos;
}

int SessionManager::num_sessions() {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(sessions_.size());
}

int64_t SessionManager::loaded_bytes() {
  absl::MutexLock lock(&mu_);
  int64_t bytes = 0;
  for (const auto& [id, entry] : sessions_) {
    if (entry.session != nullptr) bytes += entry.state_bytes;
  }
  return bytes;
}

int SessionManager::UnloadIdle(absl::Time now) {
  if (options_.state_dir.empty() || options_.idle_ttl <= absl::ZeroDuration()) return 0;
  std::vector<std::pair<std::string, std::shared_ptr<Session>>> idle;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, entry] : sessions_) {
      if (entry.session == nullptr || now - entry.session->last_used() < options_.idle_ttl) {
        continue;
      }
      idle.push_back({id, entry.session});
    }
  }
  int unloaded = 0;
  for (auto& [id, session] : idle) {
    // Checkpointed without the manager's lock, so other sessions' calls go on meanwhile.
    const absl::Time seen = session->last_used();
    if (!session->Checkpoint(/*touch=*/false).ok()) continue;
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(id);
    // Unload only if nothing used it since: the map and `session` hold the only references
    // (use_count 2; Get takes mu_, so none can appear) and no call touched it after `seen`.
    if (it == sessions_.end() || it->second.session != session || session.use_count() != 2 ||
        session->last_used() != seen) {
      continue;
    }
    it->second.step = session->step();
    it->second.unloaded_last_used = seen;
    session->Retire();
    it->second.session = nullptr;
    ExportCountsLocked();
    ++unloaded;
  }
  return unloaded;
}

absl::Status SessionManager::CheckpointAll() {
  if (options_.state_dir.empty()) return absl::OkStatus();
  std::vector<std::shared_ptr<Session>> loaded;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, entry] : sessions_) {
      if (entry.session != nullptr) loaded.push_back(entry.session);
    }
  }
  absl::Status first;
  for (const auto& session : loaded) {
    absl::StatusOr<CheckpointInfo> info = session->Checkpoint();
    if (!info.ok() && first.ok()) first = info.status();
  }
  return first;
}

}  // namespace optd::server
