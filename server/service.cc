#include "server/service.h"

#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/dynamic_annotations.h"
#include "absl/base/thread_annotations.h"
#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "common/wire.h"
#include "google/protobuf/descriptor.h"
#include "grpcpp/support/method_handler.h"
#include "kernels/optimizer.h"
#include "server/chunk_message.h"
#include "server/chunk_view.h"
#include "server/session_config.h"

namespace optd::server {
namespace {

absl::string_view Authorization(const grpc::ServerContext& context) {
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return {};
  return absl::string_view(it->second.data(), it->second.size());
}

// Who calls, for per-client limits: the TLS client certificate's identity under mutual TLS,
// else the peer's address without its port.
std::string ClientIdentity(const grpc::ServerContext& context) {
  const std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth != nullptr && auth->IsPeerAuthenticated()) {
    for (const grpc::string_ref& id : auth->GetPeerIdentity()) {
      return absl::StrCat("tls:", absl::string_view(id.data(), id.size()));
    }
  }
  const std::string peer = context.peer();  // "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555"
  const size_t colon = peer.rfind(':');
  return colon == std::string::npos || colon < peer.find(':') + 1 ? peer : peer.substr(0, colon);
}

absl::StatusOr<int64_t> ChunkBytes(int64_t requested, int64_t default_bytes) {
  if (requested == 0) return default_bytes;
  if (requested < 4 || requested > kMaxChunkBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk_bytes ", requested, " is outside [4, ", kMaxChunkBytes, "]"));
  }
  return requested;
}

// The dtype results go out in: the request's, or the tensor's own.
absl::StatusOr<DType> ResultDType(int requested, DType tensor_dtype) {
  if (requested == v1::DTYPE_UNSPECIFIED) return tensor_dtype;
  return FromWireDType(requested);
}

// Streams one tensor's values through `write` (WriteTensorChunks, `ready` before each piece);
// Cancelled when the peer went away.
template <typename Write, typename Ready = AlwaysReady>
absl::Status StreamTensor(const std::string& name, absl::Span<const float> values, DType dtype,
                          int64_t chunk_bytes, v1::TensorChunk& chunk, Write write,
                          Ready ready = {}) {
  OPTD_ASSIGN_OR_RETURN(bool sent,
                        WriteTensorChunks(name, values, dtype, chunk_bytes, chunk, write, ready));
  if (!sent) {
    return absl::CancelledError(
        absl::StrCat("the client went away while tensor '", name, "' was being sent"));
  }
  return absl::OkStatus();
}

// StreamTensor for ChunkMessage byte buffers (GetParams and Step): `keep` holds `values` until
// gRPC is done with them.
template <typename Write, typename Ready = AlwaysReady>
absl::Status SendTensor(int field, const std::string& name, absl::Span<const float> values,
                        DType dtype, int64_t chunk_bytes, const Keepalive& keep, Write write,
                        Ready ready = {}, int64_t from = 0) {
  OPTD_ASSIGN_OR_RETURN(bool sent, WriteChunkMessages(field, name, values, dtype, chunk_bytes, keep,
                                                      write, ready, from));
  if (!sent) {
    return absl::CancelledError(
        absl::StrCat("the client went away while tensor '", name, "' was being sent"));
  }
  return absl::OkStatus();
}

// A session's staging buffer lent to gRPC's slices (GetParams): given back to the session when
// the last holder lets go, on whichever thread that is.
struct LentStaging {
  LentStaging(std::shared_ptr<Session> session, std::unique_ptr<TensorStaging> staging)
      : session(std::move(session)), staging(std::move(staging)) {}
  ~LentStaging() { session->ReleaseStaging(std::move(staging)); }
  LentStaging(const LentStaging&) = delete;
  LentStaging& operator=(const LentStaging&) = delete;

  std::shared_ptr<Session> session;
  mutable std::unique_ptr<TensorStaging> staging;
};

// fn(), with an allocation failure turned into RESOURCE_EXHAUSTED. Every slot a handler takes is
// released by a scope guard, so a throw leaves none held.
absl::Status Guarded(absl::FunctionRef<absl::Status()> fn) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("optd could not allocate host memory for this call");
  }
}

// A stream the watchdog cut off: `what` ("header" or "chunk") did not arrive, or the client did
// not read, within its timeout.
absl::Status StreamTimeout(absl::string_view method, absl::string_view what) {
  return WithRejectionReason(
      absl::DeadlineExceededError(absl::StrCat(
          method, ": no ", what, what == "header" ? " within --stream_header_timeout_s" : "",
          what == "header" ? "" : " sent or result read within --stream_idle_timeout_s",
          "; the stream was cancelled")),
      "stream_timeout");
}

// Reads the chunks that follow a `method` stream's header: `next()` gives the next one (a pointer
// valid until the next call; null once the client half-closes; an error for a message that is no
// chunk), `add` takes it (or refuses it, which ends the stream), with `watch` re-armed for the idle
// timeout after each. A stream the watchdog cut off, or that the client cancelled (`cancelled`
// says what that lost), is an error too.
template <typename Next, typename Add>
absl::Status ReadChunks(absl::string_view method, grpc::ServerContext& context,
                        StreamWatchdog::Watch& watch, absl::Duration idle_timeout,
                        absl::string_view cancelled, Next next, Add add) {
  absl::Status status;
  while (status.ok()) {
    auto chunk = next();
    if (!chunk.ok()) return chunk.status();
    if (*chunk == nullptr) break;
    status = add(**chunk);
    watch.Arm(idle_timeout);
  }
  watch.Disarm();
  if (status.ok() && watch.fired()) return StreamTimeout(method, "chunk");
  if (status.ok() && context.IsCancelled()) return absl::CancelledError(cancelled);
  return status;
}

// The header that opens a `method` stream: `read()` reads the first message into `request` (false
// when none came), within `header_timeout`; then `watch` is armed for `idle_timeout`. No message,
// or one without a header, is InvalidArgument ("`method` must start with a header `what`"), or a
// timeout when the watchdog cut the stream off first.
template <typename Request, typename Read>
absl::Status ReadStreamHeader(absl::string_view method, absl::string_view what,
                              StreamWatchdog::Watch& watch, absl::Duration header_timeout,
                              absl::Duration idle_timeout, Request& request, Read read) {
  watch.Arm(header_timeout);
  if (!read() || !request.has_header()) {
    if (watch.fired()) return StreamTimeout(method, "header");
    return absl::InvalidArgumentError(absl::StrCat(method, " must start with a header ", what));
  }
  watch.Arm(idle_timeout);
  return absl::OkStatus();
}

// A message after a stream's header that is not a chunk.
absl::Status NotAChunk(absl::string_view method) {
  return absl::InvalidArgumentError(absl::StrCat(method, " carries one header, then only chunks"));
}

// ViewChunk on gRPC's receive buffers. gRPC is not built with ThreadSanitizer, so the
// synchronization that hands a received message to this thread is invisible to it and it would
// take every read of the message's bytes for a race with the socket read that wrote them: the
// reads of them are not optd's to check (TensorStaging's decode of the pieces says the same).
bool ViewGrpcChunk(const std::vector<grpc::Slice>& slices,
                   ChunkView& view) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  ABSL_ANNOTATE_IGNORE_READS_BEGIN();
  const bool viewed = ViewChunk(slices, view);
  ABSL_ANNOTATE_IGNORE_READS_END();
  return viewed;
}

// The next message of a stream read as byte buffers (Step, UploadParams), parsed as `Request`
// by protobuf; false at the stream's end or for a message that is not one.
template <typename Request, typename Stream>
bool ReadMessage(Stream& stream, Request& request) {
  grpc::ByteBuffer buffer;
  return stream.Read(&buffer) &&
         grpc::SerializationTraits<Request>::Deserialize(&buffer, &request).ok();
}

// ReadChunks for Step and UploadParams, into `staging`: each chunk decoded from the slices gRPC
// received it in (ViewChunk; protobuf parses any other message, and one that is not a `Request`
// is InvalidArgument). `pipeline` (optional): the session told of each tensor completed.
template <typename Request, typename Stream>
absl::Status ReceiveChunks(absl::string_view method, Stream& stream, grpc::ServerContext& context,
                           StreamWatchdog::Watch& watch, absl::Duration idle_timeout,
                           TensorStaging& staging, float max_magnitude, bool reject,
                           Metrics* metrics, absl::string_view cancelled,
                           Session* pipeline = nullptr) {
  grpc::ByteBuffer buffer;
  std::vector<grpc::Slice> slices;  // the message's, which `view` points into
  ChunkView view;
  Request request;
  int completed = -1;
  return ReadChunks(
      method, context, watch, idle_timeout, cancelled,
      [&]() -> absl::StatusOr<const ChunkView*> {
        if (!stream.Read(&buffer)) return nullptr;
        slices.clear();
        if (!buffer.Dump(&slices).ok() || !ViewGrpcChunk(slices, view)) {
          if (!grpc::SerializationTraits<Request>::Deserialize(&buffer, &request).ok()) {
            return absl::InvalidArgumentError(absl::StrCat(
                method, ": a message of the stream is not a ", Request::descriptor()->full_name()));
          }
          if (!request.has_chunk()) return NotAChunk(method);
          view = ChunkView::Of(request.chunk());
        }
        if (metrics != nullptr) metrics->AddBytesReceived(static_cast<int64_t>(view.data_bytes));
        return &view;
      },
      [&](const ChunkView& chunk) {
        OPTD_RETURN_IF_ERROR(staging.AddChunk(chunk, max_magnitude, reject, &completed));
        if (completed >= 0 && pipeline != nullptr) pipeline->TensorArrived(&staging, completed);
        return absl::OkStatus();
      });
}

// The thread that sends a step's results early takes the cycles the commit's computation leaves
// (nice 19): on cores the commit keeps busy, sending beside it would only slow it down (GPT-2
// small keller on 2 cores, client and daemon sharing them: the send tail after the commit fell
// from 190 to 42 ms per step either way, but at nice 0 the computation took 170-220 ms longer);
// on idle cores it runs at once. It hands the rest back once the commit is done (an unprivileged
// thread cannot raise its priority again, and at nice 19 on a daemon busy with other sessions'
// steps its results would wait behind them). Named for top -H and perf.
void YieldToTheCommit() {
  pthread_setname_np(pthread_self(), "optd-results");
  setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 19);
}

// A step's summary, as Step and StepSmall send it.
void FillSummary(const StepOutcome& outcome, bool replayed, v1::StepSummary& summary) {
  summary.set_step(outcome.step);
  summary.set_skipped(outcome.skipped);
  summary.set_replayed(replayed);
  summary.set_tensors_updated(outcome.tensors_updated);
  summary.set_nonfinite_values(outcome.nonfinite_values);
  summary.set_result(outcome.result);
  summary.set_checkpoint_step(outcome.checkpoint_step);
  summary.set_checkpoint_error(outcome.checkpoint_error);
}

// Where a step's results have been sent up to: the next result (ResultProgress::Next's index)
// and the next element of it, and the bytes of values sent so far.
struct ResultCursor {
  size_t next = 0;
  int64_t offset = 0;
  int64_t sent = 0;
};

// Every result tensor from `at` on through `send(name, values, dtype, from)` (SendTensor from
// element `from`), each in the header's result dtype or its own, in the order they became final
// (tensor order once the step has committed; early results as the commit finishes them, waiting
// for each); `at` moves past what went out. The step's failure when it failed after its first
// results went out; `send`'s error as it is (one that stops the send partway through a tensor
// leaves `at` there, for a resumed send: see RunStep).
template <typename Send>
absl::Status SendResults(const Session& session, const StepOutcome& outcome,
                         const v1::StepHeader& header, ResultCursor& at, Send send) {
  while (true) {
    OPTD_ASSIGN_OR_RETURN(const std::optional<int> t, outcome.progress.Next(at.next));
    if (!t.has_value()) return absl::OkStatus();
    const DType dtype = *ResultDType(header.result_dtype(), session.tensor_dtype(*t));
    const int64_t from = at.offset;
    OPTD_RETURN_IF_ERROR(send(session.tensor_name(*t), outcome.values[*t], dtype, from));
    at.sent += static_cast<int64_t>(outcome.values[*t].size() - from) *
               static_cast<int64_t>(DTypeSize(dtype));
    ++at.next;
    at.offset = 0;
  }
}

// An upper bound on a StepSmall reply's size: every tensor's results in its result dtype, plus
// each chunk's framing (its name, offset, counts and tags) and the summary.
int64_t ResultBytes(const Session& session, const v1::StepHeader& header, int64_t chunk_bytes) {
  if (session.config().step_result() == v1::STEP_RESULT_NONE) return 256;
  int64_t bytes = 256;
  for (int t = 0; t < session.num_tensors(); ++t) {
    const DType dtype = *ResultDType(header.result_dtype(), session.tensor_dtype(t));
    const int64_t data = session.num_elements(t) * static_cast<int64_t>(DTypeSize(dtype));
    const int64_t chunks = 1 + data / std::max<int64_t>(1, chunk_bytes);
    bytes += data + chunks * (64 + static_cast<int64_t>(session.tensor_name(t).size()));
  }
  return bytes;
}

// Takes a shared-memory step's gradients from worker `header.worker_id()`'s region into
// `staging`: the tensors `request` names (every tensor when it names none), each read once from
// its slot and checked as a chunk off the wire is.
absl::Status ReceiveShared(Session& session, const v1::StepHeader& header,
                           const v1::SharedMemoryStep& request, const SharedRegion* region,
                           bool has_chunks, bool reject, TensorStaging& staging) {
  if (region == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", header.worker_id(), " of session '", session.id(),
                     "' has no shared memory: call AttachSharedMemory first"));
  }
  if (request.nonce() != region->nonce()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the shared memory this step names is not worker ", header.worker_id(),
        "'s region of session '", session.id(),
        "' (the session changed since it was attached): call AttachSharedMemory again"));
  }
  if (has_chunks) {
    return absl::InvalidArgumentError(
        "a shared-memory step's gradients are in the region: its request carries no chunks");
  }
  absl::StatusOr<DType> dtype = FromWireDType(request.dtype());
  if (!dtype.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared-memory step: ", dtype.status().message()));
  }
  std::vector<int> tensors;
  if (request.tensors().empty()) {
    for (int t = 0; t < session.num_tensors(); ++t) tensors.push_back(t);
  }
  std::vector<char> named(static_cast<size_t>(session.num_tensors()), 0);
  for (const std::string& name : request.tensors()) {
    OPTD_ASSIGN_OR_RETURN(const int t, session.FindTensor(name));
    if (named[static_cast<size_t>(t)]) {
      return absl::InvalidArgumentError(
          absl::StrCat("shared-memory step names tensor '", name, "' twice"));
    }
    named[static_cast<size_t>(t)] = 1;
    tensors.push_back(t);
  }
  const size_t size = DTypeSize(*dtype);
  for (const int t : tensors) {
    const char* slot = region->data() + region->layout().gradient_offsets[t];
    OPTD_RETURN_IF_ERROR(staging.AddChunk(
        t, 0, *dtype, absl::string_view(slot, static_cast<size_t>(session.num_elements(t)) * size),
        kMaxGradientMagnitude, reject));
  }
  return absl::OkStatus();
}

// Writes every result of `outcome` into its tensor's result slot of `region`, in the header's
// result dtype or the tensor's own.
absl::Status WriteSharedResults(const Session& session, const StepOutcome& outcome,
                                const v1::StepHeader& header, const SharedRegion& region) {
  for (size_t t = 0; t < outcome.values.size(); ++t) {
    const DType dtype = *ResultDType(header.result_dtype(), session.tensor_dtype(t));
    OPTD_RETURN_IF_ERROR(EncodeWireInto(dtype, outcome.values[t],
                                        region.data() + region.layout().result_offsets[t]));
  }
  return absl::OkStatus();
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // The message travels in a trailer (grpc-message, percent-encoded: up to 3 bytes per byte
  // from 0x80 up) and clients refuse trailers beyond 8 KiB: a message echoing a name a client
  // made up is cut to fit, so the client reads the status rather than a metadata error.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      Printable(status.message(), kMaxStatusMessageBytes));
}

grpc::Status OptimizerService::Finish(absl::string_view method, const absl::Status& status,
                                      absl::string_view reason) {
  if (options_.metrics != nullptr) options_.metrics->CountRpc(method, status, reason);
  // Refusals are logged by method and code at most once per period each: a client can cause
  // them at any rate.
  if (!status.ok() && !absl::IsCancelled(status)) {
    const std::string code = absl::StatusCodeToString(status.code());
    refusals_.Log(absl::StrCat(method, "/", code, "/", reason),
                  absl::StrCat(method, " refused", reason.empty() ? "" : " (", reason,
                               reason.empty() ? "" : ")", ": ", code, ": ", status.message()));
  }
  return ToGrpcStatus(status);
}

void OptimizerService::CountSent(int64_t bytes) {
  if (options_.metrics != nullptr) options_.metrics->AddBytesSent(bytes);
}

template <typename Generated>
int OptimizerService::MethodIndex(absl::string_view method) {
  const google::protobuf::ServiceDescriptor* descriptor =
      v1::GetParamsRequest::descriptor()->file()->FindServiceByName("Optimizer");
  const google::protobuf::MethodDescriptor* found =
      descriptor == nullptr ? nullptr : descriptor->FindMethodByName(std::string(method));
  if (found == nullptr || dynamic_cast<Generated*>(GetHandler(found->index())) == nullptr) {
    LogEvent(absl::StrCat("optd.v1.Optimizer.", method, " is not where the generated code put it"));
    std::abort();
  }
  return found->index();
}

template <typename Generated, typename Write, typename Read>
void OptimizerService::ServeStream(
    absl::string_view method,
    grpc::Status (OptimizerService::*serve)(grpc::ServerContext*,
                                            grpc::ServerReaderWriter<Write, Read>*)) {
  MarkMethodStreamed(MethodIndex<Generated>(method),
                     new grpc::internal::BidiStreamingHandler<OptimizerService, Read, Write>(
                         [serve](OptimizerService* service, grpc::ServerContext* context,
                                 grpc::ServerReaderWriter<Write, Read>* stream) {
                           return (service->*serve)(context, stream);
                         },
                         this));
}

OptimizerService::OptimizerService(SessionManager& sessions, ServiceOptions options)
    : sessions_(sessions), options_(options) {
  MarkMethodStreamed(
      MethodIndex<grpc::internal::ServerStreamingHandler<v1::Optimizer::Service,
                                                         v1::GetParamsRequest, v1::TensorChunk>>(
          "GetParams"),
      new grpc::internal::SplitServerStreamingHandler<v1::GetParamsRequest, grpc::ByteBuffer>(
          [this](grpc::ServerContext* context,
                 grpc::ServerSplitStreamer<v1::GetParamsRequest, grpc::ByteBuffer>* streamer) {
            return GetParamsRaw(context, streamer);
          }));
  ServeStream<grpc::internal::BidiStreamingHandler<v1::Optimizer::Service, v1::StepRequest,
                                                   v1::StepResponse>>("Step",
                                                                      &OptimizerService::StepRaw);
  ServeStream<grpc::internal::ClientStreamingHandler<
      v1::Optimizer::Service, v1::UploadParamsRequest, v1::UploadParamsResponse>>(
      "UploadParams", &OptimizerService::UploadParamsRaw);
}

void OptimizerService::StartDraining() { draining_ = true; }

bool OptimizerService::WaitForIdle(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (steps_in_flight_.load() > 0) {
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

class OptimizerService::StreamSlot {
 public:
  explicit StreamSlot(OptimizerService& service) : service_(service) {}
  ~StreamSlot() {
    service_.streams_.fetch_sub(1);
    service_.UpdateSaturation();
  }
  StreamSlot(const StreamSlot&) = delete;
  StreamSlot& operator=(const StreamSlot&) = delete;

 private:
  OptimizerService& service_;
};

void OptimizerService::UpdateSaturation() {
  if (options_.max_streams <= 0) return;
  // The count is read under the lock, so concurrent updates cannot leave a stale state behind.
  absl::MutexLock lock(&saturation_mu_);
  const int streams = streams_.load();
  const bool saturated = streams >= options_.max_streams;
  if (saturated == saturated_) return;
  saturated_ = saturated;
  if (saturated) LogEvent(absl::StrCat("saturated: ", streams, " streams (--max_streams)"));
  if (options_.on_saturation) options_.on_saturation(saturated);
}

absl::StatusOr<std::unique_ptr<OptimizerService::StreamSlot>> OptimizerService::EnterStream(
    grpc::ServerContext* context) {
  OPTD_RETURN_IF_ERROR(sessions_.Authenticate(Authorization(*context)));
  // Counted first, then checked: concurrent calls cannot both take the last place.
  if (streams_.fetch_add(1) >= options_.max_streams && options_.max_streams > 0) {
    streams_.fetch_sub(1);
    return WithRejectionReason(
        absl::UnavailableError(absl::StrCat("optd serves ", options_.max_streams,
                                            " streams at once (--max_streams); retry shortly")),
        "saturated");
  }
  UpdateSaturation();
  return std::make_unique<StreamSlot>(*this);
}

absl::StatusOr<std::shared_ptr<Session>> OptimizerService::Authorize(grpc::ServerContext* context,
                                                                     absl::string_view session_id) {
  if (session_id.empty()) return absl::InvalidArgumentError("session_id is empty");
  return sessions_.Get(session_id, Authorization(*context));
}

grpc::Status OptimizerService::CreateSession(grpc::ServerContext* context,
                                             const v1::CreateSessionRequest* request,
                                             v1::CreateSessionResponse* response) {
  return Finish(
      "CreateSession", Guarded([&]() -> absl::Status {
        OPTD_RETURN_IF_ERROR(sessions_.AuthorizeAdmin(Authorization(*context)));
        CreateOptions create;
        create.restore_from.assign(request->restore_from().begin(), request->restore_from().end());
        create.replace = request->replace();
        create.authorization = std::string(Authorization(*context));
        create.client = ClientIdentity(*context);
        OPTD_ASSIGN_OR_RETURN(CreatedSession created,
                              sessions_.Create(request->session_id(), request->config(), create));
        response->set_session_id(created.session->id());
        response->set_token(created.token);
        // The reply stays small whatever the config's size: it repeats neither the config nor
        // the per-tensor details (GetSession has them), so it cannot outgrow the message limit
        // and leave a committed session whose token never reached its client.
        *response->mutable_session() = created.session->Info(/*with_tensors=*/false);
        response->mutable_session()->clear_config();
        return absl::OkStatus();
      }));
}

grpc::Status OptimizerService::GetSession(grpc::ServerContext* context,
                                          const v1::GetSessionRequest* request,
                                          v1::SessionInfo* response) {
  return Finish("GetSession", Guarded([&]() -> absl::Status {
                  OPTD_ASSIGN_OR_RETURN(std::shared_ptr<Session> session,
                                        Authorize(context, request->session_id()));
                  *response = session->Info(/*with_tensors=*/true);
                  return absl::OkStatus();
                }));
}

grpc::Status OptimizerService::ListSessions(grpc::ServerContext* context,
                                            const v1::ListSessionsRequest*,
                                            v1::ListSessionsResponse* response) {
  return Finish("ListSessions", Guarded([&]() -> absl::Status {
                  OPTD_RETURN_IF_ERROR(sessions_.AuthorizeAdmin(Authorization(*context)));
                  for (v1::SessionInfo& info : sessions_.List())
                    *response->add_sessions() = std::move(info);
                  return absl::OkStatus();
                }));
}

grpc::Status OptimizerService::DeleteSession(grpc::ServerContext* context,
                                             const v1::DeleteSessionRequest* request,
                                             v1::DeleteSessionResponse*) {
  return Finish("DeleteSession", Guarded([&]() -> absl::Status {
                  if (request->session_id().empty())
                    return absl::InvalidArgumentError("session_id is empty");
                  return sessions_.Delete(request->session_id(), Authorization(*context));
                }));
}

grpc::Status OptimizerService::UpdateHyperparams(grpc::ServerContext* context,
                                                 const v1::UpdateHyperparamsRequest* request,
                                                 v1::UpdateHyperparamsResponse*) {
  return Finish("UpdateHyperparams", Guarded([&]() -> absl::Status {
                  OPTD_ASSIGN_OR_RETURN(std::shared_ptr<Session> session,
                                        Authorize(context, request->session_id()));
                  return session->UpdateHyperparams(*request);
                }));
}

grpc::Status OptimizerService::UploadParamsRaw(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<v1::UploadParamsResponse, grpc::ByteBuffer>* reader) {
  v1::UploadParamsResponse reply;
  v1::UploadParamsResponse* response = &reply;
  const grpc::Status status = Finish(
      "UploadParams", Guarded([&]() -> absl::Status {
        OPTD_ASSIGN_OR_RETURN(std::unique_ptr<StreamSlot> slot, EnterStream(context));
        StreamWatchdog::Watch watch(watchdog_, context);
        v1::UploadParamsRequest request;
        OPTD_RETURN_IF_ERROR(ReadStreamHeader(
            "UploadParams", "naming the session", watch, options_.stream_header_timeout,
            options_.stream_idle_timeout, request, [&] { return ReadMessage(*reader, request); }));
        OPTD_ASSIGN_OR_RETURN(std::shared_ptr<Session> session,
                              Authorize(context, request.header().session_id()));
        OPTD_ASSIGN_OR_RETURN(std::unique_ptr<TensorStaging> staging, session->AcquireStaging());
        absl::Cleanup release = [&] { session->ReleaseStaging(std::move(staging)); };
        // Parameters may be any finite value; the gradient bound does not apply to them.
        absl::Status status = ReceiveChunks<v1::UploadParamsRequest>(
            "UploadParams", *reader, *context, watch, options_.stream_idle_timeout, *staging,
            std::numeric_limits<float>::max(), /*reject=*/true, options_.metrics,
            "the upload was cancelled; nothing was changed");
        if (status.ok()) status = staging->CheckComplete();
        if (status.ok()) status = session->SetParameters(*staging);
        if (status.ok()) response->set_tensors_updated(staging->num_present());
        return status;
      }));
  // A client-streaming call's one reply, only with OK (as gRPC's own handler sends it).
  if (status.ok()) reader->Write(reply);
  return status;
}

grpc::Status OptimizerService::GetParamsRaw(
    grpc::ServerContext* context,
    grpc::ServerSplitStreamer<v1::GetParamsRequest, grpc::ByteBuffer>* streamer) {
  return Finish(
      "GetParams", Guarded([&]() -> absl::Status {
        OPTD_ASSIGN_OR_RETURN(std::unique_ptr<StreamSlot> slot, EnterStream(context));
        v1::GetParamsRequest read;
        if (!streamer->Read(&read)) {
          return absl::InvalidArgumentError("GetParams carries one request; none arrived");
        }
        const v1::GetParamsRequest* request = &read;
        OPTD_ASSIGN_OR_RETURN(std::shared_ptr<Session> found,
                              Authorize(context, request->session_id()));
        Session& session = *found;
        OPTD_ASSIGN_OR_RETURN(int64_t chunk_bytes,
                              ChunkBytes(request->chunk_bytes(), options_.default_chunk_bytes));
        std::vector<int> tensors;
        for (const std::string& name : request->tensors()) {
          OPTD_ASSIGN_OR_RETURN(int t, session.FindTensor(name));
          tensors.push_back(t);
        }
        if (tensors.empty()) {
          for (int t = 0; t < session.num_tensors(); ++t) tensors.push_back(t);
        }
        if (request->dtype() != v1::DTYPE_UNSPECIFIED) {
          OPTD_RETURN_IF_ERROR(FromWireDType(request->dtype()).status());
        }
        // One of the session's staging buffers, already charged to its quota and bounded in
        // number: a slow reader holds that, not an uncounted copy of the tensors. The copy is
        // one step's parameters, whole; each piece is sent as soon as it is copied, from the
        // staging itself (fp32), which goes back to the session once gRPC has released the
        // last piece (LentStaging: after this call at the latest, when gRPC ends it).
        OPTD_ASSIGN_OR_RETURN(std::unique_ptr<TensorStaging> acquired, session.AcquireStaging());
        const auto lent = std::make_shared<const LentStaging>(found, std::move(acquired));
        TensorStaging& staging = *lent->staging;
        SnapshotProgress progress;
        session.SnapshotParameters(tensors, staging, progress);
        // Before the staging can go back: nothing copies into it any more.
        absl::Cleanup copied = [&] { progress.WaitDone(); };
        // A reader that stops reading is cut off after the idle timeout.
        StreamWatchdog::Watch watch(watchdog_, context);
        for (size_t i = 0; i < tensors.size(); ++i) {
          const int t = tensors[i];
          const absl::Span<const float> values(staging.data(t),
                                               static_cast<size_t>(session.num_elements(t)));
          const DType dtype = *ResultDType(request->dtype(), session.tensor_dtype(t));
          OPTD_RETURN_IF_ERROR(SendTensor(
              /*field=*/0, session.tensor_name(t), values, dtype, chunk_bytes, lent,
              [&](const grpc::ByteBuffer& message) {
                watch.Arm(options_.stream_idle_timeout);
                return streamer->Write(message);
              },
              [&](int64_t end) { return progress.WaitFor(static_cast<int>(i), end); }));
          CountSent(static_cast<int64_t>(values.size() * DTypeSize(dtype)));
        }
        return absl::OkStatus();
      }));
}

struct OptimizerService::AdmittedStep {
  explicit AdmittedStep(std::atomic<int>& in_flight) : in_flight(in_flight) {}
  ~AdmittedStep() { in_flight.fetch_sub(1); }
  AdmittedStep(const AdmittedStep&) = delete;
  AdmittedStep& operator=(const AdmittedStep&) = delete;

  std::atomic<int>& in_flight;  // the place in the step queue, given back by the destructor
  std::shared_ptr<Session> session;
  int64_t chunk_bytes = 0;  // of the results
  bool reject = true;       // non-finite gradients fail the step (else they skip it)
};

absl::StatusOr<std::unique_ptr<OptimizerService::AdmittedStep>> OptimizerService::AdmitStep(
    grpc::ServerContext* context, const v1::StepHeader& header, absl::string_view& reason) {
  OPTD_ASSIGN_OR_RETURN(std::shared_ptr<Session> session, Authorize(context, header.session_id()));
  OPTD_ASSIGN_OR_RETURN(int64_t chunk_bytes,
                        ChunkBytes(header.chunk_bytes(), options_.default_chunk_bytes));
  if (header.result_dtype() != v1::DTYPE_UNSPECIFIED) {
    OPTD_RETURN_IF_ERROR(FromWireDType(header.result_dtype()).status());
  }
  OPTD_RETURN_IF_ERROR(session->CheckStepHeader(header));
  // A place in the step queue only for a caller that has proved who it is. Counted first, then
  // the drain checked: a drain that starts later waits for this step.
  if (steps_in_flight_.fetch_add(1) >= options_.max_pending_steps) {
    steps_in_flight_.fetch_sub(1);
    reason = "queue_full";
    return absl::UnavailableError(
        absl::StrCat("the step queue is full (", options_.max_pending_steps,
                     " steps pending, --max_pending_steps); back off and retry"));
  }
  auto step = std::make_unique<AdmittedStep>(steps_in_flight_);
  const bool admitted_before_drain = !draining_.load();
  // Once draining, only calls that arrived before it, the workers of a step that has already
  // begun (so it can finish within the drain deadline) and retries of the last one go on.
  if (!admitted_before_drain && !session->StepUnderway(header.step())) {
    reason = "draining";
    return absl::UnavailableError("optd is shutting down; no new steps");
  }
  step->reject = session->config().non_finite_policy() != v1::NON_FINITE_POLICY_SKIP_STEP;
  step->session = std::move(session);
  step->chunk_bytes = chunk_bytes;
  return step;
}

absl::Status OptimizerService::StepReceiveError(const AdmittedStep& step,
                                                const v1::StepHeader& header,
                                                const TensorStaging& staging, absl::Status received,
                                                absl::string_view& reason) {
  if (staging.out_of_range_values() > 0 && step.reject) {
    reason = "nonfinite";
    step.session->CountNonFinite(staging.out_of_range_values());
  }
  return absl::Status(received.code(), absl::StrCat("session '", step.session->id(), "' step ",
                                                    header.step(), ": ", received.message()));
}

absl::StatusOr<StepReply> OptimizerService::StepReceived(
    grpc::ServerContext* context, const AdmittedStep& step, const v1::StepHeader& header,
    std::unique_ptr<TensorStaging>& staging, absl::Status received, absl::string_view& reason,
    absl::Time& received_at, absl::Time& stepped_at,
    const std::function<void(StepReply)>& on_decided) {
  if (received.ok()) received = staging->CheckComplete();
  if (!received.ok()) return StepReceiveError(step, header, *staging, received, reason);
  received_at = absl::Now();
  OPTD_ASSIGN_OR_RETURN(
      StepReply reply,
      step.session->Step(
          header, std::move(staging), [context] { return context->IsCancelled(); }, on_decided));
  stepped_at = absl::Now();
  return reply;
}

void OptimizerService::ObserveStep(const Session& session, const StepReply& reply, absl::Time start,
                                   absl::Time received_at, absl::Time stepped_at) {
  if (options_.metrics == nullptr) return;
  const absl::Time end = absl::Now();
  const StepOutcome& outcome = *reply.outcome;
  Metrics& m = *options_.metrics;
  m.ObserveStep(session.optimizer_label(), end - start);
  m.ObservePhase(StepPhase::kReceive, received_at - start);
  if (!reply.replayed) {
    // Waiting for the other workers and averaging, then the optimizer and the result.
    m.ObservePhase(StepPhase::kAggregate, outcome.compute_started - received_at);
    m.ObservePhase(StepPhase::kCompute, outcome.compute_finished - outcome.compute_started);
  }
  m.ObservePhase(StepPhase::kSend, end - stepped_at);
}

grpc::Status OptimizerService::StepRaw(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>* stream) {
  absl::string_view reason;
  const absl::Status status = Guarded([&]() -> absl::Status {
    OPTD_ASSIGN_OR_RETURN(std::unique_ptr<StreamSlot> slot, EnterStream(context));
    StreamWatchdog::Watch watch(watchdog_, context);
    return RunStep(context, stream, watch, reason);
  });
  return Finish("Step", status, reason);
}

absl::Status OptimizerService::RunStep(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>* stream,
    StreamWatchdog::Watch& watch, absl::string_view& reason) {
  const absl::Time start = absl::Now();
  v1::StepRequest request;
  OPTD_RETURN_IF_ERROR(ReadStreamHeader(
      "Step", "(session, worker, step number)", watch, options_.stream_header_timeout,
      options_.stream_idle_timeout, request, [&] { return ReadMessage(*stream, request); }));
  const v1::StepHeader header = request.header();
  OPTD_ASSIGN_OR_RETURN(std::unique_ptr<AdmittedStep> step, AdmitStep(context, header, reason));
  Session& session = *step->session;
  OPTD_ASSIGN_OR_RETURN(std::unique_ptr<TensorStaging> staging, session.AcquireStaging());
  // Returned here unless Session::Step took it.
  absl::Cleanup release = [&] { session.ReleaseStaging(std::move(staging)); };
  // Each tensor is stepped ahead as soon as every worker's gradient of it is in.
  const bool pipelined = session.BeginPipelined(header, staging.get());
  // Disarmed after the chunks: waiting for the other workers is the straggler timeout's to bound.
  absl::Status received = ReceiveChunks<v1::StepRequest>(
      "Step", *stream, *context, watch, options_.stream_idle_timeout, *staging,
      kMaxGradientMagnitude, step->reject, options_.metrics,
      "the step was cancelled while its gradients arrived", pipelined ? &session : nullptr);
  // The summary, then every result as it is final (StepReply's progress) from `at` on, each
  // message armed with the idle timeout (a client that stops reading is cut off; between results
  // the wait is the commit's, not the client's). With `stop`, the send stops before the next
  // piece once it is set, `at` left there: Cancelled, "handed back".
  const auto send_summary = [&](const StepReply& reply) -> absl::Status {
    v1::StepResponse response;
    FillSummary(*reply.outcome, reply.replayed, *response.mutable_summary());
    watch.Arm(options_.stream_idle_timeout);
    if (!stream->Write(MessageBuffer(response))) {
      return absl::CancelledError("the client went away before the step's result was sent");
    }
    watch.Disarm();
    return absl::OkStatus();
  };
  const absl::Status handed_back = absl::CancelledError("handed back");
  const auto send_results = [&](const StepReply& reply, ResultCursor& at,
                                const std::atomic<bool>* stop) -> absl::Status {
    // The results go out from the outcome's buffers, held by its lease until gRPC has sent them
    // (the round makes new buffers for a later step while they are held).
    return SendResults(
        session, *reply.outcome, header, at,
        [&](const std::string& name, absl::Span<const float> values, DType dtype, int64_t from) {
          int64_t resume = from;
          absl::Status sent = SendTensor(
              /*field=*/v1::StepResponse::kChunkFieldNumber, name, values, dtype, step->chunk_bytes,
              reply.outcome,
              [&](const grpc::ByteBuffer& message) {
                watch.Arm(options_.stream_idle_timeout);
                return stream->Write(message);
              },
              [&](int64_t end) {
                if (stop != nullptr && stop->load()) return handed_back;
                resume = end;  // once this piece is written, the next starts there
                return absl::OkStatus();
              },
              from);
          watch.Disarm();
          if (sent == handed_back) {
            at.offset = resume;
            at.sent += (resume - from) * static_cast<int64_t>(DTypeSize(dtype));
          }
          return sent;
        });
  };
  // Early results (Session::Step): when this stream's gradients complete a step that qualifies,
  // a thread of its own sends the summary and each result as the commit finishes it, at the
  // lowest priority (YieldToTheCommit); once the commit is done it hands back, between two
  // pieces, and this thread sends the rest at its own. Declared after what it reads, so that it
  // is joined before they go.
  ResultCursor at;
  absl::Status sent_early;
  std::atomic<bool> committed{false};
  std::optional<std::jthread> sender;
  const auto on_decided = [&](StepReply decided) {
    try {
      sender.emplace([&, decided = std::move(decided)] {
        YieldToTheCommit();
        sent_early = send_summary(decided);
        if (sent_early.ok()) sent_early = send_results(decided, at, &committed);
      });
    } catch (const std::system_error&) {
      // No thread to be had: the results go after the commit, from this one.
    }
  };
  absl::Time received_at, stepped_at;
  absl::StatusOr<StepReply> reply = StepReceived(context, *step, header, staging, received, reason,
                                                 received_at, stepped_at, on_decided);
  committed = true;
  if (sender.has_value()) {
    sender->join();
    if (!reply.ok()) return reply.status();
    if (sent_early == handed_back) sent_early = send_results(*reply, at, nullptr);
    OPTD_RETURN_IF_ERROR(sent_early);
  } else {
    if (!reply.ok()) return reply.status();
    OPTD_RETURN_IF_ERROR(send_summary(*reply));
    OPTD_RETURN_IF_ERROR(send_results(*reply, at, nullptr));
  }
  const int64_t sent = at.sent;
  CountSent(sent);
  ObserveStep(session, *reply, start, received_at, stepped_at);
  return absl::OkStatus();
}

grpc::Status OptimizerService::StepSmall(grpc::ServerContext* context,
                                         const v1::StepSmallRequest* request,
                                         v1::StepSmallResponse* response) {
  absl::string_view reason;
  const absl::Status status = Guarded([&]() -> absl::Status {
    // A stream's place: like Step, the call may wait for the session's other workers, and so
    // holds a thread of those kept for streams, not of the unary calls' reserve.
    OPTD_ASSIGN_OR_RETURN(std::unique_ptr<StreamSlot> slot, EnterStream(context));
    const absl::Time start = absl::Now();
    const v1::StepHeader& header = request->header();
    OPTD_ASSIGN_OR_RETURN(std::unique_ptr<AdmittedStep> step, AdmitStep(context, header, reason));
    Session& session = *step->session;
    if (request->has_shared_memory()) {
      return StepShared(context, *request, *step, start, *response->mutable_summary(), reason);
    }
    const int64_t reply_bytes = ResultBytes(session, header, step->chunk_bytes);
    if (reply_bytes > options_.max_message_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "StepSmall: session '", session.id(), "' returns ", reply_bytes,
          " bytes of results, more than one message holds (", options_.max_message_bytes,
          " bytes, --max_message_bytes); stream the step with Step"));
    }
    OPTD_ASSIGN_OR_RETURN(std::unique_ptr<TensorStaging> staging, session.AcquireStaging());
    absl::Cleanup release = [&] { session.ReleaseStaging(std::move(staging)); };
    absl::Status received;
    for (const v1::TensorChunk& chunk : request->chunks()) {
      if (options_.metrics != nullptr) {
        options_.metrics->AddBytesReceived(static_cast<int64_t>(chunk.data().size()));
      }
      received = staging->AddChunk(chunk, kMaxGradientMagnitude, step->reject);
      if (!received.ok()) break;
    }
    absl::Time received_at, stepped_at;
    OPTD_ASSIGN_OR_RETURN(StepReply reply, StepReceived(context, *step, header, staging, received,
                                                        reason, received_at, stepped_at));
    FillSummary(*reply.outcome, reply.replayed, *response->mutable_summary());
    // Each piece's values move into the reply (the next piece is encoded into the string the
    // move leaves); only its small fields are copied.
    v1::TensorChunk chunk;
    ResultCursor sent;
    OPTD_RETURN_IF_ERROR(SendResults(
        session, *reply.outcome, header, sent,
        [&](const std::string& name, absl::Span<const float> values, DType dtype, int64_t) {
          return StreamTensor(name, values, dtype, step->chunk_bytes, chunk, [&] {
            v1::TensorChunk& piece = *response->add_chunks();
            piece.set_tensor(chunk.tensor());
            piece.set_dtype(chunk.dtype());
            piece.set_tensor_elements(chunk.tensor_elements());
            piece.set_offset(chunk.offset());
            piece.mutable_data()->swap(*chunk.mutable_data());
            return true;
          });
        }));
    CountSent(sent.sent);
    ObserveStep(session, reply, start, received_at, stepped_at);
    return absl::OkStatus();
  });
  return Finish("StepSmall", status, reason);
}

absl::Status OptimizerService::StepShared(grpc::ServerContext* context,
                                          const v1::StepSmallRequest& request,
                                          const AdmittedStep& step, absl::Time start,
                                          v1::StepSummary& summary, absl::string_view& reason) {
  const v1::StepHeader& header = request.header();
  Session& session = *step.session;
  // Held for the whole step: a region outlives its session while a step uses it.
  const std::shared_ptr<const SharedRegion> region = session.SharedMemory(header.worker_id());
  OPTD_ASSIGN_OR_RETURN(std::unique_ptr<TensorStaging> staging, session.AcquireStaging());
  absl::Cleanup release = [&] { session.ReleaseStaging(std::move(staging)); };
  absl::Status received = ReceiveShared(session, header, request.shared_memory(), region.get(),
                                        request.chunks_size() > 0, step.reject, *staging);
  absl::Time received_at, stepped_at;
  OPTD_ASSIGN_OR_RETURN(StepReply reply, StepReceived(context, step, header, staging, received,
                                                      reason, received_at, stepped_at));
  // The byte counters count the wire's bytes: a shared-memory step's are not on it.
  OPTD_RETURN_IF_ERROR(WriteSharedResults(session, *reply.outcome, header, *region));
  FillSummary(*reply.outcome, reply.replayed, summary);
  ObserveStep(session, reply, start, received_at, stepped_at);
  return absl::OkStatus();
}

grpc::Status OptimizerService::AttachSharedMemory(grpc::ServerContext* context,
                                                  const v1::AttachSharedMemoryRequest* request,
                                                  v1::SharedMemoryRegion* response) {
  return Finish("AttachSharedMemory", Guarded([&]() -> absl::Status {
                  OPTD_ASSIGN_OR_RETURN(std::shared_ptr<Session> session,
                                        Authorize(context, request->session_id()));
                  OPTD_ASSIGN_OR_RETURN(std::shared_ptr<const SharedRegion> region,
                                        session->AttachSharedMemory(request->worker_id()));
                  response->set_path(region->path());
                  response->set_bytes(region->bytes());
                  response->set_nonce(region->nonce());
                  for (int t = 0; t < session->num_tensors(); ++t) {
                    v1::SharedMemorySlot* slot = response->add_slots();
                    slot->set_tensor(session->tensor_name(t));
                    slot->set_elements(session->num_elements(t));
                    slot->set_gradient_offset(region->layout().gradient_offsets[t]);
                    slot->set_result_offset(region->layout().result_offsets[t]);
                    slot->set_dtype(ToWireDType(session->tensor_dtype(t)));
                  }
                  return absl::OkStatus();
                }));
}

grpc::Status OptimizerService::Checkpoint(grpc::ServerContext* context,
                                          const v1::CheckpointRequest* request,
                                          v1::CheckpointResponse* response) {
  return Finish("Checkpoint", Guarded([&]() -> absl::Status {
                  OPTD_ASSIGN_OR_RETURN(std::shared_ptr<Session> session,
                                        Authorize(context, request->session_id()));
                  std::string shared_dir;
                  if (request->shared()) {
                    OPTD_ASSIGN_OR_RETURN(shared_dir, sessions_.SharedDir());
                  }
                  OPTD_ASSIGN_OR_RETURN(CheckpointInfo info,
                                        session->Checkpoint(/*touch=*/true, shared_dir));
                  response->set_step(info.step);
                  response->set_path(info.path);
                  response->set_bytes(info.bytes);
                  response->set_shared_path(info.shared_path);
                  return absl::OkStatus();
                }));
}

grpc::Status OptimizerService::Restore(grpc::ServerContext* context,
                                       const v1::RestoreRequest* request,
                                       v1::RestoreResponse* response) {
  return Finish("Restore", Guarded([&]() -> absl::Status {
                  OPTD_ASSIGN_OR_RETURN(std::shared_ptr<Session> session,
                                        Authorize(context, request->session_id()));
                  OPTD_ASSIGN_OR_RETURN(int64_t step, session->Restore());
                  response->set_step(step);
                  return absl::OkStatus();
                }));
}

grpc::Status OptimizerService::AddTensors(grpc::ServerContext* context,
                                          const v1::AddTensorsRequest* request,
                                          v1::SessionInfo* response) {
  return Finish("AddTensors", Guarded([&]() -> absl::Status {
                  OPTD_ASSIGN_OR_RETURN(*response,
                                        sessions_.AddTensors(*request, Authorization(*context)));
                  return absl::OkStatus();
                }));
}

grpc::Status OptimizerService::ExportState(grpc::ServerContext* context,
                                           const v1::ExportStateRequest* request,
                                           grpc::ServerWriter<v1::ExportStateResponse>* writer) {
  return Finish("ExportState", Guarded([&]() -> absl::Status {
                  OPTD_ASSIGN_OR_RETURN(std::unique_ptr<StreamSlot> slot, EnterStream(context));
                  OPTD_ASSIGN_OR_RETURN(std::shared_ptr<Session> session,
                                        Authorize(context, request->session_id()));
                  OPTD_ASSIGN_OR_RETURN(
                      int64_t chunk_bytes,
                      ChunkBytes(request->chunk_bytes(), options_.default_chunk_bytes));
                  // A reader that stops reading is cut off after the idle timeout.
                  StreamWatchdog::Watch watch(watchdog_, context);
                  return session->ExportState(
                      std::max<int64_t>(1, chunk_bytes / static_cast<int64_t>(sizeof(float))),
                      !request->skip_parameters(), [&](const v1::ExportStateResponse& response) {
                        watch.Arm(options_.stream_idle_timeout);
                        if (!writer->Write(response)) return false;
                        if (response.has_chunk()) {
                          CountSent(static_cast<int64_t>(response.chunk().data().size()));
                        }
                        return true;
                      });
                }));
}

grpc::Status OptimizerService::ImportState(grpc::ServerContext* context,
                                           grpc::ServerReader<v1::ImportStateRequest>* reader,
                                           v1::ImportStateResponse* response) {
  return Finish("ImportState", Guarded([&]() -> absl::Status {
                  OPTD_ASSIGN_OR_RETURN(std::unique_ptr<StreamSlot> slot, EnterStream(context));
                  StreamWatchdog::Watch watch(watchdog_, context);
                  v1::ImportStateRequest request;
                  OPTD_RETURN_IF_ERROR(ReadStreamHeader("ImportState", "naming the session", watch,
                                                        options_.stream_header_timeout,
                                                        options_.stream_idle_timeout, request,
                                                        [&] { return reader->Read(&request); }));
                  OPTD_ASSIGN_OR_RETURN(std::shared_ptr<Session> session,
                                        Authorize(context, request.header().session_id()));
                  OPTD_ASSIGN_OR_RETURN(std::unique_ptr<StateImport> import,
                                        session->BeginImport(request.header().state()));
                  OPTD_RETURN_IF_ERROR(ReadChunks(
                      "ImportState", *context, watch, options_.stream_idle_timeout,
                      "the import was cancelled; nothing was changed",
                      [&]() -> absl::StatusOr<const v1::StateChunk*> {
                        if (!reader->Read(&request)) return nullptr;
                        if (!request.has_chunk()) return NotAChunk("ImportState");
                        if (options_.metrics != nullptr) {
                          options_.metrics->AddBytesReceived(
                              static_cast<int64_t>(request.chunk().data().size()));
                        }
                        return &request.chunk();
                      },
                      [&](const v1::StateChunk& chunk) { return import->Add(chunk); }));
                  OPTD_ASSIGN_OR_RETURN(*response, session->CommitImport(std::move(import)));
                  return absl::OkStatus();
                }));
}

grpc::Status OptimizerService::GetAnalysis(grpc::ServerContext* context,
                                           const v1::GetAnalysisRequest* request,
                                           v1::GetAnalysisResponse* response) {
  return Finish("GetAnalysis", Guarded([&]() -> absl::Status {
                  OPTD_ASSIGN_OR_RETURN(std::shared_ptr<Session> session,
                                        Authorize(context, request->session_id()));
                  for (v1::TensorAnalysis& a : session->Analysis())
                    *response->add_tensors() = std::move(a);
                  for (v1::TensorChoices& c : session->Choices())
                    *response->add_choices() = std::move(c);
                  return absl::OkStatus();
                }));
}

grpc::Status OptimizerService::GetServerInfo(grpc::ServerContext*, const v1::GetServerInfoRequest*,
                                             v1::ServerInfo* response) {
  return Finish("GetServerInfo", Guarded([&]() -> absl::Status {
                  *response = options_.server_info;
                  return absl::OkStatus();
                }));
}

}  // namespace optd::server
