// The daemon's sessions: creation under limits, authorization, lookup (reloading sessions that
// idled out), deletion, and the state directory that outlives the process.
#ifndef OPTD_SERVER_SESSION_MANAGER_H_
#define OPTD_SERVER_SESSION_MANAGER_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kernels/backend.h"
#include "optd/v1/optd.pb.h"
#include "server/clock.h"
#include "server/file_system.h"
#include "server/session.h"

namespace optd::server {

struct SessionManagerOptions {
  // Checkpoints and the sessions a restarted daemon resumes; empty: in memory only.
  std::string state_dir;
  FileSystem* fs = nullptr;  // default: PosixFileSystem()
  Clock* clock = nullptr;    // default: RealClock(); straggler deadlines and idle times
  int max_sessions = 64;
  // Largest world_size a session may have: its workers wait for each other inside the daemon's
  // step queue, so a session larger than the queue could never step (Server sets it to
  // --max_pending_steps).
  int max_world_size = 64;
  int64_t max_session_bytes = int64_t{16} << 30;
  // Bytes of state every session together may hold (loaded or not, so that each can always
  // reload): the daemon's host memory budget. CreateSession beyond it is RESOURCE_EXHAUSTED.
  // 0: none (Server sets it from --memory_budget_bytes, by default 80% of the memory it may use).
  int64_t memory_budget_bytes = 0;
  // Sessions one client may hold at once, when it creates them without the admin token; a client
  // is its TLS identity, else its address. 0: no limit.
  int max_sessions_per_client = 0;
  // Resharding (DESIGN.md, "Scale beyond one machine"): the directory every instance of a
  // sharded deployment can read (a shared volume, or one host's disk), holding one directory of
  // checkpoints per instance, and this instance's name there. Empty root: no resharding.
  std::string shared_state_root;
  std::string instance_name;
  // Sessions unused this long are checkpointed and unloaded (state_dir required); 0: never.
  absl::Duration idle_ttl = absl::ZeroDuration();
  absl::Duration default_straggler_timeout = absl::Seconds(60);
  // SHA-256 of the admin token; empty: none (CreateSession and ListSessions are open).
  std::string admin_token_digest;
  // Handed to every session; any may be null (no pipeliner: every step runs serially).
  Metrics* metrics = nullptr;
  Analyzer* analyzer = nullptr;
  Pipeliner* pipeliner = nullptr;
  // SessionOptions::early_results_min_bytes.
  int64_t early_results_min_bytes = -1;
};

struct CreateOptions {
  // Checkpoints in the shared state root to restore the new session from (resharding); each
  // needs its session's token unless `authorization` carries the admin token (PermissionDenied,
  // before anything of the source is read beyond its token's digest).
  std::vector<v1::CheckpointSource> restore_from;
  // Replace a session of the same id once the new one is built. `authorization` must carry the
  // admin token when the daemon has one (the caller checks), otherwise that session's token.
  bool replace = false;
  std::string authorization;
  // Who calls (CreateOptions::client counts against max_sessions_per_client unless the call
  // carries the admin token): a TLS identity or a peer address.
  std::string client;
};

struct CreatedSession {
  std::shared_ptr<Session> session;
  std::string token;
};

class SessionManager {
 public:
  SessionManager(Backend& backend, SessionManagerOptions options);

  // Registers every session checkpointed in the state directory, unloaded (each loads on first
  // use). Sessions whose checkpoint does not read are logged to `skipped` and left on disk.
  absl::Status Recover(std::vector<std::string>* skipped);

  // Caller checks for the admin-guarded calls: OK when no admin token is configured or
  // `authorization` carries it; PermissionDenied for a session's token (valid, but not enough);
  // Unauthenticated for a missing or unknown token.
  absl::Status AuthorizeAdmin(absl::string_view authorization);

  // Normalizes and validates `config`, checks the limits (ResourceExhausted naming the bytes or
  // session count), creates the session with a fresh token and, with a state directory, writes
  // its first checkpoint. AlreadyExists for a taken id; InvalidArgument for a bad id or config.
  // With `create.restore_from` the session comes from those checkpoints (Session::Restored) and
  // gets no first checkpoint. FailedPrecondition without a shared state root; InvalidArgument for
  // a bad instance name or session id in a source. With `create.replace`, a session of that id
  // (loaded or not) is retired once the new one is built: its checkpoint stays until the new
  // one's first overwrites it, and its token no longer opens anything.
  absl::StatusOr<CreatedSession> Create(std::string id, v1::SessionConfig config,
                                        const CreateOptions& create = {});
  // OK when `authorization` carries the admin token or some session's token; Unauthenticated
  // otherwise. Streaming calls check this before they wait for their first message.
  absl::Status Authenticate(absl::string_view authorization);

  // Whether `authorization` carries the admin token (false when the daemon has none).
  bool IsAdmin(absl::string_view authorization) const;

  // This instance's directory in the shared state root; FailedPrecondition without one.
  absl::StatusOr<std::string> SharedDir() const;

  // The session `id` for a caller presenting `authorization` ("Bearer <token>"): its own token or
  // the admin token. Unauthenticated for a missing or unknown token, PermissionDenied for another
  // session's token (whether `id` exists or not), NotFound for an unknown session. Loads an
  // unloaded session, without holding up calls for other sessions meanwhile.
  // AddTensors (optd.v1): the session `request` names, as `authorization` may use it (Get's
  // rules), given the request's tensors and groups (Session::Extend), within the session and
  // memory limits, and checkpointed when the daemon has a state directory. InvalidArgument for no
  // tensors, a name the session has, or a config that does not validate; FailedPrecondition for a
  // sharded part; Unavailable while another call replaces or extends it.
  absl::StatusOr<v1::SessionInfo> AddTensors(const v1::AddTensorsRequest& request,
                                             absl::string_view authorization);

  absl::StatusOr<std::shared_ptr<Session>> Get(absl::string_view id,
                                               absl::string_view authorization);

  // Removes the session and its checkpoint, without loading it; the admin token or the
  // session's own token may (errors as Get's). Calls that still hold the session get NotFound
  // from then on.
  absl::Status Delete(absl::string_view id, absl::string_view authorization);

  std::vector<v1::SessionInfo> List();
  int num_sessions();
  int64_t loaded_bytes();

  // Checkpoints and unloads sessions idle longer than the TTL that nobody is using. Returns how
  // many were unloaded.
  int UnloadIdle(absl::Time now);
  // Deletes, with their checkpoints, the sessions whose config's delete_after_idle_seconds has
  // passed since their last use (loaded or not; one in use by a call is left). Returns how many.
  int DeleteExpired(absl::Time now);
  // Checkpoints every loaded session (shutdown). Returns the first failure, after trying all.
  absl::Status CheckpointAll();

 private:
  struct Entry {
    std::string token_digest;
    std::shared_ptr<Session> session;  // null while unloaded
    int64_t step = 0;                  // while unloaded
    int64_t state_bytes = 0;
    std::string client;      // who created it without the admin token; empty: the admin
    bool creating = false;   // reserved by Create, not yet usable
    bool loading = false;    // a call is reading its checkpoint (without holding mu_)
    bool replacing = false;  // a CreateSession with `replace` is building its successor
    // The config's delete_after_idle_seconds (0: never), and the last use while unloaded.
    absl::Duration delete_after_idle = absl::ZeroDuration();
    absl::Time unloaded_last_used = absl::InfinitePast();
  };

  // Bytes every session holds, loaded or not (each must be able to reload): what
  // --memory_budget_bytes bounds.
  int64_t CommittedBytesLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Delete's work once `entry` (of `id`) is authorized: its checkpoint directory, then it.
  absl::Status DeleteLocked(absl::string_view id, Entry& entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // The entry `id` if `authorization` may use it (Get's rules), without loading it.
  absl::StatusOr<Entry*> AuthorizeLocked(absl::string_view id, absl::string_view authorization)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // AuthorizeLocked, after waiting out a reload of the entry by another call.
  absl::StatusOr<Entry*> AuthorizeSettledLocked(absl::string_view id,
                                                absl::string_view authorization)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  SessionOptions session_options() const;
  // optd_sessions and the sessions' backend memory, after the table changed.
  void ExportCountsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  Backend& backend_;
  const SessionManagerOptions options_;
  FileSystem& fs_;

  absl::Mutex mu_;
  absl::CondVar loading_done_;
  std::map<std::string, Entry, std::less<>> sessions_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string, std::less<>> id_by_digest_ ABSL_GUARDED_BY(mu_);
};

}  // namespace optd::server

#endif  // OPTD_SERVER_SESSION_MANAGER_H_
