// The Step and UploadParams request streams, as a hostile client sends them, against one
// in-process daemon on loopback. The input is a list of messages, each a 2-byte little-endian
// length and that many bytes of a serialized request; every header is pointed at the fuzzer's
// session (with its token), and a header step of 0 becomes the session's next step, so that the
// fuzzer reaches the chunk checks, the commit and the results rather than the refusals. Each
// input runs as a Step stream, then as one StepSmall call (the first header and every chunk of
// the same messages), then as an UploadParams stream. A crash, a hang past the stream timeouts,
// or a daemon that stops answering fails it.
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "client/client.h"
#include "google/protobuf/text_format.h"
#include "grpcpp/grpcpp.h"
#include "optd/v1/optd.grpc.pb.h"
#include "server/server.h"

namespace {

struct Daemon {
  std::unique_ptr<optd::server::Server> server;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<optd::v1::Optimizer::Stub> stub;
  std::string session_id;
  std::string token;
};

Daemon& TheDaemon() {
  static Daemon* const daemon = [] {
    auto* d = new Daemon;
    optd::server::ServerOptions options;
    options.listen = "127.0.0.1:0";
    options.backend = "cpu";
    options.threads = 1;
    options.service.stream_header_timeout = absl::Seconds(2);
    options.service.stream_idle_timeout = absl::Seconds(2);
    d->server = *optd::server::Server::Start(options);
    d->channel = grpc::CreateChannel(d->server->address(), grpc::InsecureChannelCredentials());
    d->stub = optd::v1::Optimizer::NewStub(d->channel);
    // A matrix for Muon, a vector for AdamW, with small shapes the fuzzer can cover.
    optd::v1::CreateSessionRequest create;
    google::protobuf::TextFormat::ParseFromString(
        R"pb(tensors {
               name: "w"
               shape: [ 4, 6 ]
               group: "m"
             }
             tensors {
               name: "b"
               shape: [ 6 ]
               group: "v"
             }
             groups { name: "m" preset: "keller" }
             groups { name: "v" preset: "adamw" }
             non_finite_policy: NON_FINITE_POLICY_SKIP_STEP)pb",
        create.mutable_config());
    grpc::ClientContext context;
    optd::v1::CreateSessionResponse created;
    if (!d->stub->CreateSession(&context, create, &created).ok()) __builtin_trap();
    d->session_id = created.session_id();
    d->token = created.token();
    return d;
  }();
  return *daemon;
}

int64_t NextStep(Daemon& d) {
  grpc::ClientContext context;
  context.AddMetadata("authorization", "Bearer " + d.token);
  optd::v1::GetSessionRequest request;
  request.set_session_id(d.session_id);
  optd::v1::SessionInfo info;
  if (!d.stub->GetSession(&context, request, &info).ok()) __builtin_trap();  // must still answer
  return info.step() + 1;
}

// The input's messages, each parsed as T (unparsable ones are skipped).
template <typename T>
std::vector<T> Messages(const uint8_t* data, size_t size) {
  std::vector<T> messages;
  while (size >= 2) {
    const size_t length = std::min<size_t>(size - 2, data[0] | (data[1] << 8));
    T message;
    if (message.ParseFromArray(data + 2, static_cast<int>(length))) messages.push_back(message);
    data += 2 + length;
    size -= 2 + length;
  }
  return messages;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Daemon& d = TheDaemon();
  const int64_t next = NextStep(d);
  {
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer " + d.token);
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    auto stream = d.stub->Step(&context);
    for (optd::v1::StepRequest& request : Messages<optd::v1::StepRequest>(data, size)) {
      if (request.has_header()) {
        request.mutable_header()->set_session_id(d.session_id);
        if (request.header().step() == 0) request.mutable_header()->set_step(next);
        request.mutable_header()->set_worker_id(0);
      }
      if (!stream->Write(request)) break;
    }
    stream->WritesDone();
    optd::v1::StepResponse response;
    while (stream->Read(&response)) {
    }
    stream->Finish().IgnoreError();
  }
  {
    optd::v1::StepSmallRequest request;
    for (optd::v1::StepRequest& message : Messages<optd::v1::StepRequest>(data, size)) {
      if (message.has_header() && !request.has_header()) {
        *request.mutable_header() = message.header();
        request.mutable_header()->set_session_id(d.session_id);
        if (request.header().step() == 0) request.mutable_header()->set_step(NextStep(d));
        request.mutable_header()->set_worker_id(0);
      } else if (message.has_chunk()) {
        *request.add_chunks() = message.chunk();
      }
    }
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer " + d.token);
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    optd::v1::StepSmallResponse response;
    d.stub->StepSmall(&context, request, &response).IgnoreError();
  }
  {
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer " + d.token);
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    optd::v1::UploadParamsResponse response;
    auto stream = d.stub->UploadParams(&context, &response);
    for (optd::v1::UploadParamsRequest& request :
         Messages<optd::v1::UploadParamsRequest>(data, size)) {
      if (request.has_header()) request.mutable_header()->set_session_id(d.session_id);
      if (!stream->Write(request)) break;
    }
    stream->WritesDone();
    stream->Finish().IgnoreError();
  }
  NextStep(d);  // the daemon still answers
  return 0;
}
