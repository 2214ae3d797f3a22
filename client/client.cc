#include "client/client.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/wire.h"
#include "proto/wire_dtype.h"

namespace optd::client {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("cannot read PEM file '", path, "'"));
  std::stringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

// A chunk from the daemon in a dtype this client does not know is damaged data.
absl::StatusOr<DType> FromWire(int dtype) {
  absl::StatusOr<DType> known = FromWireDType(dtype);
  if (!known.ok())
    return absl::DataLossError(absl::StrCat("the daemon sent ", known.status().message()));
  return known;
}

void SetDeadline(grpc::ClientContext& context, absl::Duration timeout) {
  if (timeout != absl::InfiniteDuration()) {
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  }
}

absl::Status CheckChunkBytes(int64_t chunk_bytes) {
  if (chunk_bytes < 4 || chunk_bytes > (int64_t{4} << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk_bytes ", chunk_bytes, " is outside [4, 4 MiB]"));
  }
  return absl::OkStatus();
}

// Sends each tensor as chunks of at most `chunk_bytes` through `write(chunk)`.
template <typename Write>
absl::Status SendTensors(absl::Span<const NamedTensor> tensors, DType dtype, int64_t chunk_bytes,
                         v1::TensorChunk& chunk, Write write) {
  OPTD_RETURN_IF_ERROR(CheckChunkBytes(chunk_bytes));
  for (const NamedTensor& tensor : tensors) {
    OPTD_ASSIGN_OR_RETURN(
        bool sent, WriteTensorChunks(tensor.name, tensor.values, dtype, chunk_bytes, chunk, write));
    if (!sent) return absl::OkStatus();  // the stream broke; Finish() says why
  }
  return absl::OkStatus();
}

// Decodes one received chunk into `values`, which must hold it.
absl::Status ReceiveInto(const v1::TensorChunk& chunk, absl::Span<float> values) {
  OPTD_ASSIGN_OR_RETURN(DType dtype, FromWire(chunk.dtype()));
  const size_t size = DTypeSize(dtype);
  const size_t n = chunk.data().size() / size;
  if (chunk.offset() < 0 || chunk.data().size() % size != 0 ||
      static_cast<size_t>(chunk.offset()) > values.size() ||
      n > values.size() - static_cast<size_t>(chunk.offset())) {
    return absl::DataLossError(absl::StrCat("chunk of tensor '", chunk.tensor(), "' at offset ",
                                            chunk.offset(), " does not fit its ", values.size(),
                                            "-element output"));
  }
  return DecodeWire(dtype, chunk.data(), values.subspan(chunk.offset(), n),
                    std::numeric_limits<float>::infinity())
      .status();
}

// Places one received chunk into `out[chunk.tensor()]`, growing it as needed.
absl::Status Receive(const v1::TensorChunk& chunk, std::map<std::string, std::vector<float>>& out) {
  OPTD_ASSIGN_OR_RETURN(DType dtype, FromWire(chunk.dtype()));
  const size_t size = DTypeSize(dtype);
  if (chunk.offset() < 0 || chunk.data().size() % size != 0) {
    return absl::DataLossError(absl::StrCat("malformed chunk of tensor '", chunk.tensor(), "'"));
  }
  const size_t n = chunk.data().size() / size;
  const size_t end = static_cast<size_t>(chunk.offset()) + n;
  constexpr size_t kMaxElements = size_t{1} << 40;
  if (end > kMaxElements || static_cast<size_t>(chunk.tensor_elements()) > kMaxElements) {
    return absl::DataLossError(absl::StrCat("chunk of tensor '", chunk.tensor(), "' ends at ", end,
                                            ", past any tensor optd holds"));
  }
  std::vector<float>& values = out[chunk.tensor()];
  // The first chunk says how large the tensor is: size it once.
  const size_t whole = std::max(end, static_cast<size_t>(chunk.tensor_elements()));
  if (values.size() < whole) values.resize(whole);
  return DecodeWire(dtype, chunk.data(), absl::MakeSpan(values.data() + chunk.offset(), n),
                    std::numeric_limits<float>::infinity())
      .status();
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ChannelOptions& options) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  // Results stream in bulk: a 16 MiB HTTP/2 window, as the daemon uses for gradients.
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 20);
  const bool tls = options.tls || !options.tls_ca.empty() || !options.tls_cert.empty() ||
                   !options.tls_key.empty();
  if (!tls) {
    return grpc::CreateCustomChannel(options.target, grpc::InsecureChannelCredentials(), args);
  }
  grpc::SslCredentialsOptions ssl;
  if (!options.tls_ca.empty()) {
    OPTD_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPem(options.tls_ca));
  }
  if (options.tls_cert.empty() != options.tls_key.empty()) {
    return absl::InvalidArgumentError("a client certificate needs both tls_cert and tls_key");
  }
  if (!options.tls_cert.empty()) {
    OPTD_ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadPem(options.tls_cert));
    OPTD_ASSIGN_OR_RETURN(ssl.pem_private_key, ReadPem(options.tls_key));
  }
  if (!options.tls_server_name.empty()) {
    args.SetSslTargetNameOverride(options.tls_server_name);
  }
  return grpc::CreateCustomChannel(options.target, grpc::SslCredentials(ssl), args);
}

Session::Session(std::shared_ptr<grpc::Channel> channel, std::string id, std::string token)
    : channel_(std::move(channel)),
      stub_(v1::Optimizer::NewStub(channel_)),
      id_(std::move(id)),
      token_(std::move(token)) {}

void Session::Authorize(grpc::ClientContext& context) const {
  if (!token_.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", token_));
  SetDeadline(context, timeout_);
}

absl::StatusOr<v1::SessionInfo> Session::Info() {
  grpc::ClientContext context;
  Authorize(context);
  v1::GetSessionRequest request;
  request.set_session_id(id_);
  v1::SessionInfo info;
  OPTD_RETURN_IF_ERROR(FromGrpcStatus(stub_->GetSession(&context, request, &info)));
  return info;
}

absl::Status Session::UploadParameters(absl::Span<const NamedTensor> tensors, DType wire_dtype,
                                       int64_t chunk_bytes) {
  grpc::ClientContext context;
  Authorize(context);
  v1::UploadParamsResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::UploadParamsRequest>> writer =
      stub_->UploadParams(&context, &response);
  v1::UploadParamsRequest request;
  request.mutable_header()->set_session_id(id_);
  if (writer->Write(request)) {
    v1::TensorChunk* chunk = request.mutable_chunk();
    absl::Status sent = SendTensors(tensors, wire_dtype, chunk_bytes, *chunk,
                                    [&] { return writer->Write(request); });
    if (!sent.ok()) {
      context.TryCancel();
      writer->Finish().ok();
      return sent;
    }
  }
  writer->WritesDone();
  return FromGrpcStatus(writer->Finish());
}

absl::StatusOr<std::map<std::string, std::vector<float>>> Session::GetParameters(
    absl::Span<const std::string> names, std::optional<DType> wire_dtype, int64_t chunk_bytes) {
  grpc::ClientContext context;
  Authorize(context);
  v1::GetParamsRequest request;
  request.set_session_id(id_);
  for (const std::string& name : names) request.add_tensors(name);
  if (wire_dtype.has_value()) request.set_dtype(ToWireDType(*wire_dtype));
  request.set_chunk_bytes(chunk_bytes);
  std::unique_ptr<grpc::ClientReader<v1::TensorChunk>> reader = stub_->GetParams(&context, request);
  std::map<std::string, std::vector<float>> values;
  v1::TensorChunk chunk;
  absl::Status received;
  while (reader->Read(&chunk)) {
    if (received.ok()) received = Receive(chunk, values);
  }
  OPTD_RETURN_IF_ERROR(FromGrpcStatus(reader->Finish()));
  OPTD_RETURN_IF_ERROR(received);
  return values;
}

namespace {

// The header both step RPCs carry.
void FillStepHeader(const std::string& session, int64_t step, const StepOptions& options,
                    v1::StepHeader& header) {
  header.set_session_id(session);
  header.set_worker_id(options.worker_id);
  header.set_step(step);
  if (options.lr.has_value()) header.set_lr(*options.lr);
  if (options.result_dtype.has_value()) {
    header.set_result_dtype(ToWireDType(*options.result_dtype));
  }
  header.set_chunk_bytes(options.chunk_bytes);
  header.set_placement_epoch(options.placement_epoch);
}

void TakeSummary(const v1::StepSummary& s, StepResult& result) {
  result.step = s.step();
  result.skipped = s.skipped();
  result.replayed = s.replayed();
  result.tensors_updated = s.tensors_updated();
  result.nonfinite_values = s.nonfinite_values();
  result.kind = s.result();
  result.checkpoint_step = s.checkpoint_step();
  result.checkpoint_error = s.checkpoint_error();
}

// A result chunk into the caller's span for its tensor, or into result.values.
absl::Status TakeChunk(const v1::TensorChunk& chunk,
                       const std::map<absl::string_view, absl::Span<float>>& outputs,
                       StepResult& result) {
  auto o = outputs.find(chunk.tensor());
  return o != outputs.end() ? ReceiveInto(chunk, o->second) : Receive(chunk, result.values);
}

std::map<absl::string_view, absl::Span<float>> OutputsByName(const StepOptions& options) {
  std::map<absl::string_view, absl::Span<float>> outputs;
  for (const NamedOutput& o : options.outputs) outputs[o.name] = o.values;
  return outputs;
}

// The gradients' wire bytes, with each chunk's framing.
int64_t GradientMessageBytes(absl::Span<const NamedTensor> gradients, DType wire_dtype,
                             int64_t chunk_bytes) {
  int64_t bytes = 256;  // the header
  for (const NamedTensor& g : gradients) {
    const int64_t data = static_cast<int64_t>(g.values.size() * DTypeSize(wire_dtype));
    const int64_t chunks = 1 + data / std::max<int64_t>(1, chunk_bytes);
    bytes += data + chunks * (64 + static_cast<int64_t>(g.name.size()));
  }
  return bytes;
}

}  // namespace

absl::StatusOr<StepResult> Session::Step(int64_t step, absl::Span<const NamedTensor> gradients,
                                         const StepOptions& options) {
  if (options.path == StepPath::kShared || options.path == StepPath::kAuto) {
    // A step without gradients goes over gRPC: a shared-memory step naming no tensor names
    // every tensor.
    std::shared_ptr<SharedMemory> shared =
        gradients.empty() ? nullptr : shared_memory(options.worker_id);
    if (shared != nullptr) {
      absl::StatusOr<StepResult> result = StepShared(step, gradients, options, std::move(shared));
      // The daemon's new region could not be mapped here (it came back in another namespace):
      // nothing counted, and on kAuto this worker steps over gRPC from now on.
      if (result.ok() || options.path == StepPath::kShared || shared_memory(options.worker_id)) {
        return result;
      }
    }
    if (options.path == StepPath::kShared && shared_memory(options.worker_id) == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "worker ", options.worker_id, " has no shared memory: AttachSharedMemory first"));
    }
  }
  const bool small = options.path == StepPath::kSmall ||
                     (options.path == StepPath::kAuto && !results_too_large_->load() &&
                      GradientMessageBytes(gradients, options.wire_dtype, options.chunk_bytes) <=
                          max_message_bytes_);
  if (small) {
    absl::StatusOr<StepResult> result = StepInOneMessage(step, gradients, options);
    // The daemon refuses before anything counts when the results would not fit: stream them,
    // this step and the session's next ones.
    if (options.path == StepPath::kSmall || !absl::IsResourceExhausted(result.status()) ||
        !absl::StartsWith(result.status().message(), "StepSmall:")) {
      return result;
    }
    results_too_large_->store(true);
  }
  return StepStreamed(step, gradients, options);
}

void Session::StartStepCall(grpc::ClientContext& context, const StepOptions& options) const {
  if (!token_.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", token_));
  SetDeadline(context, options.timeout);
}

absl::StatusOr<StepResult> Session::StepInOneMessage(int64_t step,
                                                     absl::Span<const NamedTensor> gradients,
                                                     const StepOptions& options) {
  grpc::ClientContext context;
  StartStepCall(context, options);
  v1::StepSmallRequest request;
  FillStepHeader(id_, step, options, *request.mutable_header());
  v1::TensorChunk chunk;
  OPTD_RETURN_IF_ERROR(SendTensors(gradients, options.wire_dtype, options.chunk_bytes, chunk, [&] {
    *request.add_chunks() = chunk;
    return true;
  }));
  v1::StepSmallResponse response;
  OPTD_RETURN_IF_ERROR(FromGrpcStatus(stub_->StepSmall(&context, request, &response)));
  StepResult result;
  TakeSummary(response.summary(), result);
  const std::map<absl::string_view, absl::Span<float>> outputs = OutputsByName(options);
  for (const v1::TensorChunk& c : response.chunks()) {
    OPTD_RETURN_IF_ERROR(TakeChunk(c, outputs, result));
  }
  return result;
}

namespace {

// The daemon refused a shared-memory step because the region it names is not the worker's
// current one: nothing counted, attach again and resend.
bool RegionRefused(const absl::Status& status) {
  return absl::IsFailedPrecondition(status) &&
         absl::StrContains(status.message(), "call AttachSharedMemory");
}

}  // namespace

SharedMemory::SharedMemory(v1::SharedMemoryRegion region, int worker_id, char* data)
    : region_(std::move(region)), worker_id_(worker_id), data_(data) {
  for (int i = 0; i < region_.slots_size(); ++i) slots_[region_.slots(i).tensor()] = i;
}

SharedMemory::~SharedMemory() { munmap(data_, static_cast<size_t>(region_.bytes())); }

absl::StatusOr<std::unique_ptr<SharedMemory>> SharedMemory::Map(v1::SharedMemoryRegion region,
                                                                int worker_id) {
  const int fd = open(region.path().c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot open shared memory ", region.path(), ": ", std::strerror(errno)));
  }
  struct stat st {};
  void* data = MAP_FAILED;
  if (fstat(fd, &st) == 0 && st.st_size == region.bytes() && region.bytes() > 0) {
    data = mmap(nullptr, static_cast<size_t>(region.bytes()), PROT_READ | PROT_WRITE, MAP_SHARED,
                fd, 0);
  }
  close(fd);
  if (data == MAP_FAILED) {
    return absl::UnavailableError(
        absl::StrCat("cannot map shared memory ", region.path(), " (", region.bytes(), " bytes)"));
  }
  const size_t nonce = region.nonce().size();
  if (nonce == 0 || std::memcmp(data, region.nonce().data(), nonce) != 0) {
    munmap(data, static_cast<size_t>(region.bytes()));
    return absl::DataLossError(absl::StrCat(region.path(),
                                            " is not the session's region (another process's "
                                            "namespace?)"));
  }
  return std::unique_ptr<SharedMemory>(
      new SharedMemory(std::move(region), worker_id, static_cast<char*>(data)));
}

const v1::SharedMemorySlot* SharedMemory::slot(absl::string_view tensor) const {
  auto it = slots_.find(tensor);
  return it == slots_.end() ? nullptr : &region_.slots(it->second);
}

absl::StatusOr<std::shared_ptr<SharedMemory>> Session::AttachSharedMemory(int worker_id) {
  grpc::ClientContext context;
  Authorize(context);
  v1::AttachSharedMemoryRequest request;
  request.set_session_id(id_);
  request.set_worker_id(worker_id);
  v1::SharedMemoryRegion region;
  OPTD_RETURN_IF_ERROR(FromGrpcStatus(stub_->AttachSharedMemory(&context, request, &region)));
  OPTD_ASSIGN_OR_RETURN(std::shared_ptr<SharedMemory> shared,
                        SharedMemory::Map(std::move(region), worker_id));
  absl::MutexLock lock(&attached_->mu);
  attached_->regions[worker_id] = shared;
  return shared;
}

std::shared_ptr<SharedMemory> Session::shared_memory(int worker_id) const {
  absl::MutexLock lock(&attached_->mu);
  auto it = attached_->regions.find(worker_id);
  return it == attached_->regions.end() ? nullptr : it->second;
}

absl::StatusOr<StepResult> Session::StepShared(int64_t step,
                                               absl::Span<const NamedTensor> gradients,
                                               const StepOptions& options,
                                               std::shared_ptr<SharedMemory> shared) {
  // Maps the daemon's current region in place of `shared`; where that fails the worker's
  // mapping goes, and its steps on kAuto go over gRPC.
  const auto attach_again = [&]() -> absl::Status {
    absl::StatusOr<std::shared_ptr<SharedMemory>> again = AttachSharedMemory(options.worker_id);
    if (!again.ok()) {
      absl::MutexLock lock(&attached_->mu);
      attached_->regions.erase(options.worker_id);
      return again.status();
    }
    shared = *std::move(again);
    return absl::OkStatus();
  };
  // A tensor the region lacks: the session gained tensors since it was mapped.
  if (std::any_of(gradients.begin(), gradients.end(),
                  [&](const NamedTensor& g) { return shared->slot(g.name) == nullptr; })) {
    OPTD_RETURN_IF_ERROR(attach_again());
  }
  absl::StatusOr<StepResult> result = SendShared(step, gradients, options, *shared);
  if (!RegionRefused(result.status())) return result;
  OPTD_RETURN_IF_ERROR(attach_again());
  return SendShared(step, gradients, options, *shared);
}

absl::StatusOr<StepResult> Session::SendShared(int64_t step,
                                               absl::Span<const NamedTensor> gradients,
                                               const StepOptions& options,
                                               const SharedMemory& shared) {
  v1::StepSmallRequest request;
  FillStepHeader(id_, step, options, *request.mutable_header());
  v1::SharedMemoryStep& wanted = *request.mutable_shared_memory();
  wanted.set_dtype(ToWireDType(options.wire_dtype));
  wanted.set_nonce(shared.region().nonce());
  for (const NamedTensor& g : gradients) {
    const v1::SharedMemorySlot* slot = shared.slot(g.name);
    if (slot == nullptr) {
      return absl::NotFoundError(absl::StrCat("the shared memory has no tensor '", g.name, "'"));
    }
    if (static_cast<int64_t>(g.values.size()) != slot->elements()) {
      return absl::InvalidArgumentError(absl::StrCat("gradient of '", g.name, "' has ",
                                                     g.values.size(), " elements, the tensor ",
                                                     slot->elements()));
    }
    OPTD_RETURN_IF_ERROR(
        EncodeWireInto(options.wire_dtype, g.values, shared.gradient_bytes(*slot)));
    if (static_cast<int>(gradients.size()) != shared.region().slots_size())
      wanted.add_tensors(g.name);
  }
  grpc::ClientContext context;
  StartStepCall(context, options);
  v1::StepSmallResponse response;
  OPTD_RETURN_IF_ERROR(FromGrpcStatus(stub_->StepSmall(&context, request, &response)));
  StepResult result;
  TakeSummary(response.summary(), result);
  if (result.kind == v1::STEP_RESULT_NONE) return result;
  const std::map<absl::string_view, absl::Span<float>> outputs = OutputsByName(options);
  for (const v1::SharedMemorySlot& slot : shared.region().slots()) {
    OPTD_ASSIGN_OR_RETURN(const DType tensor_dtype, FromWire(slot.dtype()));
    const DType dtype = options.result_dtype.value_or(tensor_dtype);
    const absl::string_view bytes(shared.result_bytes(slot),
                                  static_cast<size_t>(slot.elements()) * DTypeSize(dtype));
    auto o = outputs.find(slot.tensor());
    absl::Span<float> into;
    if (o != outputs.end()) {
      if (static_cast<int64_t>(o->second.size()) < slot.elements()) {
        return absl::DataLossError(absl::StrCat("the output of '", slot.tensor(), "' holds ",
                                                o->second.size(), " of its ", slot.elements(),
                                                " elements"));
      }
      into = o->second.subspan(0, static_cast<size_t>(slot.elements()));
    } else {
      std::vector<float>& values = result.values[slot.tensor()];
      values.resize(static_cast<size_t>(slot.elements()));
      into = absl::MakeSpan(values);
    }
    OPTD_RETURN_IF_ERROR(
        DecodeWire(dtype, bytes, into, std::numeric_limits<float>::infinity()).status());
  }
  return result;
}

absl::StatusOr<StepResult> Session::StepStreamed(int64_t step,
                                                 absl::Span<const NamedTensor> gradients,
                                                 const StepOptions& options) {
  grpc::ClientContext context;
  StartStepCall(context, options);
  std::unique_ptr<grpc::ClientReaderWriter<v1::StepRequest, v1::StepResponse>> stream =
      stub_->Step(&context);
  v1::StepRequest request;
  FillStepHeader(id_, step, options, *request.mutable_header());
  if (stream->Write(request)) {
    v1::TensorChunk* chunk = request.mutable_chunk();
    absl::Status sent = SendTensors(gradients, options.wire_dtype, options.chunk_bytes, *chunk,
                                    [&] { return stream->Write(request); });
    if (!sent.ok()) {
      context.TryCancel();
      stream->Finish().ok();
      return sent;
    }
  }
  stream->WritesDone();
  StepResult result;
  const std::map<absl::string_view, absl::Span<float>> outputs = OutputsByName(options);
  v1::StepResponse response;
  absl::Status received;
  while (stream->Read(&response)) {
    if (!received.ok()) continue;
    if (response.has_summary()) {
      TakeSummary(response.summary(), result);
    } else {
      received = TakeChunk(response.chunk(), outputs, result);
    }
  }
  OPTD_RETURN_IF_ERROR(FromGrpcStatus(stream->Finish()));
  OPTD_RETURN_IF_ERROR(received);
  return result;
}

absl::Status Session::UpdateHyperparams(absl::Span<const v1::HyperparamUpdate> updates) {
  grpc::ClientContext context;
  Authorize(context);
  v1::UpdateHyperparamsRequest request;
  request.set_session_id(id_);
  for (const v1::HyperparamUpdate& u : updates) *request.add_updates() = u;
  v1::UpdateHyperparamsResponse response;
  return FromGrpcStatus(stub_->UpdateHyperparams(&context, request, &response));
}

absl::StatusOr<v1::CheckpointResponse> Session::Checkpoint(bool shared) {
  grpc::ClientContext context;
  Authorize(context);
  v1::CheckpointRequest request;
  request.set_session_id(id_);
  request.set_shared(shared);
  v1::CheckpointResponse response;
  OPTD_RETURN_IF_ERROR(FromGrpcStatus(stub_->Checkpoint(&context, request, &response)));
  return response;
}

absl::StatusOr<int64_t> Session::Restore() {
  grpc::ClientContext context;
  Authorize(context);
  v1::RestoreRequest request;
  request.set_session_id(id_);
  v1::RestoreResponse response;
  OPTD_RETURN_IF_ERROR(FromGrpcStatus(stub_->Restore(&context, request, &response)));
  return response.step();
}

absl::StatusOr<v1::GetAnalysisResponse> Session::Analysis() {
  grpc::ClientContext context;
  Authorize(context);
  v1::GetAnalysisRequest request;
  request.set_session_id(id_);
  v1::GetAnalysisResponse response;
  OPTD_RETURN_IF_ERROR(FromGrpcStatus(stub_->GetAnalysis(&context, request, &response)));
  return response;
}

absl::StatusOr<v1::SessionInfo> Session::AddTensors(absl::Span<const v1::TensorConfig> tensors,
                                                    absl::Span<const v1::GroupConfig> groups) {
  grpc::ClientContext context;
  Authorize(context);
  v1::AddTensorsRequest request;
  request.set_session_id(id_);
  for (const v1::TensorConfig& t : tensors) *request.add_tensors() = t;
  for (const v1::GroupConfig& g : groups) *request.add_groups() = g;
  v1::SessionInfo response;
  OPTD_RETURN_IF_ERROR(FromGrpcStatus(stub_->AddTensors(&context, request, &response)));
  return response;
}

absl::StatusOr<SessionState> Session::ExportState(bool parameters, int64_t chunk_bytes) {
  grpc::ClientContext context;
  Authorize(context);
  v1::ExportStateRequest request;
  request.set_session_id(id_);
  request.set_chunk_bytes(chunk_bytes);
  request.set_skip_parameters(!parameters);
  std::unique_ptr<grpc::ClientReader<v1::ExportStateResponse>> reader =
      stub_->ExportState(&context, request);
  SessionState state;
  std::map<std::pair<std::string, std::string>, int64_t> sizes;
  v1::ExportStateResponse response;
  absl::Status received;
  while (reader->Read(&response)) {
    if (!received.ok()) continue;
    if (response.has_header()) {
      state.header = response.header();
      for (const v1::TensorState& t : state.header.tensors()) {
        if (state.header.parameters()) sizes[{t.name(), ""}] = t.elements();
        for (int b = 0; b < t.state_buffers_size() && b < t.state_elements_size(); ++b) {
          sizes[{t.name(), t.state_buffers(b)}] = t.state_elements(b);
        }
      }
      continue;
    }
    const v1::StateChunk& chunk = response.chunk();
    auto size = sizes.find({chunk.tensor(), chunk.buffer()});
    const int64_t count = static_cast<int64_t>(chunk.data().size() / sizeof(float));
    if (size == sizes.end() || chunk.offset() < 0 || count > size->second - chunk.offset()) {
      received = absl::DataLossError(absl::StrCat("ExportState sent a chunk of '", chunk.tensor(),
                                                  "' buffer '", chunk.buffer(),
                                                  "' its header does not hold"));
      continue;
    }
    std::vector<float>& values = state.records[size->first];
    values.resize(static_cast<size_t>(size->second));
    std::memcpy(values.data() + chunk.offset(), chunk.data().data(),
                static_cast<size_t>(count) * sizeof(float));
  }
  OPTD_RETURN_IF_ERROR(FromGrpcStatus(reader->Finish()));
  OPTD_RETURN_IF_ERROR(received);
  return state;
}

absl::StatusOr<v1::ImportStateResponse> Session::ImportState(const SessionState& state,
                                                             int64_t chunk_bytes) {
  grpc::ClientContext context;
  Authorize(context);
  v1::ImportStateResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::ImportStateRequest>> writer =
      stub_->ImportState(&context, &response);
  v1::ImportStateRequest request;
  request.mutable_header()->set_session_id(id_);
  *request.mutable_header()->mutable_state() = state.header;
  const int64_t per_chunk =
      std::max<int64_t>(1, std::min(chunk_bytes, kMaxChunkBytes) / sizeof(float));
  bool open = writer->Write(request);
  for (auto it = state.records.begin(); open && it != state.records.end(); ++it) {
    const std::vector<float>& values = it->second;
    for (size_t offset = 0; open && offset < values.size();
         offset += static_cast<size_t>(per_chunk)) {
      const size_t count = std::min(values.size() - offset, static_cast<size_t>(per_chunk));
      v1::StateChunk* chunk = request.mutable_chunk();
      chunk->set_tensor(it->first.first);
      chunk->set_buffer(it->first.second);
      chunk->set_offset(static_cast<int64_t>(offset));
      chunk->set_data(values.data() + offset, count * sizeof(float));
      open = writer->Write(request);
    }
  }
  writer->WritesDone();
  OPTD_RETURN_IF_ERROR(FromGrpcStatus(writer->Finish()));
  return response;
}

absl::Status Session::Delete() {
  grpc::ClientContext context;
  Authorize(context);
  v1::DeleteSessionRequest request;
  request.set_session_id(id_);
  v1::DeleteSessionResponse response;
  return FromGrpcStatus(stub_->DeleteSession(&context, request, &response));
}

Client::Client(std::shared_ptr<grpc::Channel> channel, std::string admin_token)
    : channel_(std::move(channel)),
      stub_(v1::Optimizer::NewStub(channel_)),
      admin_token_(std::move(admin_token)) {}

void Client::Authorize(grpc::ClientContext& context, const std::string& token) const {
  if (!token.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", token));
  SetDeadline(context, timeout_);
}

absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> Client::Health(
    const std::string& service, absl::Duration timeout) {
  grpc::ClientContext context;
  SetDeadline(context, timeout);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  OPTD_RETURN_IF_ERROR(FromGrpcStatus(
      grpc::health::v1::Health::NewStub(channel_)->Check(&context, request, &response)));
  return response.status();
}

absl::StatusOr<v1::ServerInfo> Client::ServerInfo(absl::Duration timeout) {
  grpc::ClientContext context;
  SetDeadline(context, timeout);
  v1::ServerInfo info;
  OPTD_RETURN_IF_ERROR(
      FromGrpcStatus(stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info)));
  return info;
}

absl::StatusOr<Session> Client::CreateSession(const v1::SessionConfig& config, std::string id) {
  v1::CreateSessionRequest request;
  request.set_session_id(std::move(id));
  *request.mutable_config() = config;
  return CreateSession(request);
}

absl::StatusOr<Session> Client::CreateSession(const v1::CreateSessionRequest& request,
                                              const std::string& token) {
  grpc::ClientContext context;
  Authorize(context, token.empty() ? admin_token_ : token);
  v1::CreateSessionResponse response;
  OPTD_RETURN_IF_ERROR(FromGrpcStatus(stub_->CreateSession(&context, request, &response)));
  Session session(channel_, response.session_id(), response.token());
  session.set_timeout(timeout_);
  return session;
}

Session Client::OpenSession(std::string id, std::string token) const {
  Session session(channel_, std::move(id), std::move(token));
  session.set_timeout(timeout_);
  return session;
}

absl::StatusOr<std::vector<v1::SessionInfo>> Client::ListSessions() {
  grpc::ClientContext context;
  Authorize(context, admin_token_);
  v1::ListSessionsResponse response;
  OPTD_RETURN_IF_ERROR(
      FromGrpcStatus(stub_->ListSessions(&context, v1::ListSessionsRequest(), &response)));
  return std::vector<v1::SessionInfo>(response.sessions().begin(), response.sessions().end());
}

absl::Status Client::DeleteSession(const std::string& id, const std::string& token) {
  grpc::ClientContext context;
  Authorize(context, token.empty() ? admin_token_ : token);
  v1::DeleteSessionRequest request;
  request.set_session_id(id);
  v1::DeleteSessionResponse response;
  return FromGrpcStatus(stub_->DeleteSession(&context, request, &response));
}

}  // namespace optd::client
