// Transport and discovery: TLS and mutual TLS with certificates made by openssl in the test,
// the standard health service (liveness and readiness), and server reflection.
#include <cstdlib>
#include <fstream>
#include <thread>

#include "google/protobuf/unknown_field_set.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/support/byte_buffer.h"
#include "tests/server/certificates.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {
namespace {

using HealthStatus = grpc::health::v1::HealthCheckResponse;

client::Client Connect(const server::Server& server, client::ChannelOptions options) {
  options.target = server.address();
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = client::MakeChannel(options);
  EXPECT_TRUE(channel.ok()) << channel.status();
  return client::Client(*channel);
}

// A session round trip: create, step, read back.
absl::Status UseSession(client::Client& c) {
  const v1::SessionConfig config = MakeConfig({{"m", "rmnp"}}, {{"x", {8, 8}, "m"}});
  absl::StatusOr<client::Session> session = c.CreateSession(config);
  if (!session.ok()) return session.status();
  Reference reference(config);
  return session->Step(1, AsNamed(reference, WorkerGradients(reference, 1, 0))).status();
}

absl::StatusCode HealthCode(client::Client& c) {
  return c.Health("", absl::Seconds(5)).status().code();
}

TEST(TransportTest, TlsServesClientsThatTrustItsCa) {
  Certificates certs;
  ASSERT_TRUE(certs.ok()) << "openssl could not make the test certificates";
  server::ServerOptions options = LoopbackOptions();
  options.tls_cert = certs.path("server.pem");
  options.tls_key = certs.path("server.key");
  std::unique_ptr<server::Server> server = StartServer(options);
  ASSERT_NE(server, nullptr);

  client::ChannelOptions trusted;
  trusted.tls_ca = certs.path("ca.pem");
  client::Client good = Connect(*server, trusted);
  EXPECT_EQ(*good.Health(), HealthStatus::SERVING);
  EXPECT_TRUE(UseSession(good).ok());

  client::Client plain = Connect(*server, {});
  EXPECT_EQ(HealthCode(plain), absl::StatusCode::kUnavailable);
  client::ChannelOptions wrong_ca;
  wrong_ca.tls_ca = certs.path("rogue.pem");
  client::Client doubtful = Connect(*server, wrong_ca);
  EXPECT_EQ(HealthCode(doubtful), absl::StatusCode::kUnavailable);
}

TEST(TransportTest, MutualTlsRequiresAClientCertificateFromItsCa) {
  Certificates certs;
  ASSERT_TRUE(certs.ok()) << "openssl could not make the test certificates";
  server::ServerOptions options = LoopbackOptions();
  options.tls_cert = certs.path("server.pem");
  options.tls_key = certs.path("server.key");
  options.tls_client_ca = certs.path("ca.pem");
  std::unique_ptr<server::Server> server = StartServer(options);
  ASSERT_NE(server, nullptr);

  client::ChannelOptions with_cert;
  with_cert.tls_ca = certs.path("ca.pem");
  with_cert.tls_cert = certs.path("client.pem");
  with_cert.tls_key = certs.path("client.key");
  client::Client good = Connect(*server, with_cert);
  EXPECT_EQ(*good.Health(), HealthStatus::SERVING);
  EXPECT_TRUE(UseSession(good).ok());

  client::ChannelOptions without_cert;
  without_cert.tls_ca = certs.path("ca.pem");
  client::Client anonymous = Connect(*server, without_cert);
  EXPECT_EQ(HealthCode(anonymous), absl::StatusCode::kUnavailable);

  client::ChannelOptions intruder = with_cert;
  intruder.tls_cert = certs.path("intruder.pem");
  intruder.tls_key = certs.path("intruder.key");
  client::Client rogue = Connect(*server, intruder);
  EXPECT_EQ(HealthCode(rogue), absl::StatusCode::kUnavailable);
}

TEST(TransportTest, BadTlsOptionsAreRefusedAtStart) {
  server::ServerOptions options = LoopbackOptions();
  options.tls_cert = "/nonexistent/server.pem";
  options.tls_key = "/nonexistent/server.key";
  absl::StatusOr<std::unique_ptr<server::Server>> server = server::Server::Start(options);
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(server.status().message()),
              ::testing::HasSubstr("/nonexistent/server.pem"));
  options.tls_key.clear();
  EXPECT_EQ(server::Server::Start(options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TransportTest, HealthReportsLivenessAndReadinessAndDrainsToNotServing) {
  server::ServerOptions options = LoopbackOptions();
  options.drain_timeout = absl::Seconds(1);
  std::unique_ptr<server::Server> server = StartServer(options);
  client::Client c = ConnectTo(*server);
  EXPECT_EQ(*c.Health(""), HealthStatus::SERVING);
  EXPECT_EQ(*c.Health(server::kServiceName), HealthStatus::SERVING);
  EXPECT_EQ(c.Health("no.such.Service").status().code(), absl::StatusCode::kNotFound);

  // While a shutdown drains (a worker waits for its partner), readiness is NOT_SERVING and
  // liveness stays SERVING.
  const v1::SessionConfig config = MakeConfig({{"m", "rmnp"}}, {{"x", {4, 4}, "m"}}, 2);
  client::Session session = *c.CreateSession(config);
  Reference reference(config);
  std::thread waiting(
      [&] { session.Step(1, AsNamed(reference, WorkerGradients(reference, 1, 0))).IgnoreError(); });
  while (server->steps_in_flight() == 0) absl::SleepFor(absl::Milliseconds(1));
  std::thread shutdown([&] { server->Shutdown().IgnoreError(); });
  absl::StatusOr<HealthStatus::ServingStatus> ready;
  for (int i = 0; i < 200; ++i) {
    ready = c.Health(server::kServiceName);
    if (ready.ok() && *ready == HealthStatus::NOT_SERVING) break;
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(*ready, HealthStatus::NOT_SERVING);
  EXPECT_EQ(*c.Health(""), HealthStatus::SERVING);
  shutdown.join();
  waiting.join();
}

// Reads field `number` (length-delimited, every occurrence) of a serialized message.
std::vector<std::string> Field(const std::string& bytes, int number) {
  google::protobuf::UnknownFieldSet fields;
  std::vector<std::string> found;
  if (!fields.ParseFromString(bytes)) return found;
  for (int i = 0; i < fields.field_count(); ++i) {
    const google::protobuf::UnknownField& f = fields.field(i);
    if (f.number() == number && f.type() == google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) {
      found.push_back(f.length_delimited());
    }
  }
  return found;
}

TEST(TransportTest, ReflectionListsTheServices) {
  std::unique_ptr<server::Server> server = StartServer(LoopbackOptions());
  client::Client c = ConnectTo(*server);
  // grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo with list_services = ""
  // (field 7), read without generated stubs: the response's list_services_response (field 6)
  // holds ServiceResponse messages (field 1) whose name is field 1.
  grpc::ClientContext context;
  grpc::internal::RpcMethod method("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                   grpc::internal::RpcMethod::BIDI_STREAMING);
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          c.channel().get(), method, &context));
  const std::string request("\x3a\x00", 2);
  grpc::Slice slice(request);
  grpc::ByteBuffer out(&slice, 1);
  ASSERT_TRUE(stream->Write(out));
  stream->WritesDone();
  grpc::ByteBuffer in;
  ASSERT_TRUE(stream->Read(&in));
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(in.Dump(&slices).ok());
  std::string response;
  for (const grpc::Slice& s : slices) {
    response.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  ASSERT_TRUE(stream->Finish().ok());
  std::vector<std::string> names;
  for (const std::string& list : Field(response, 6)) {
    for (const std::string& service : Field(list, 1)) {
      for (const std::string& name : Field(service, 1)) names.push_back(name);
    }
  }
  EXPECT_THAT(names, ::testing::Contains("optd.v1.Optimizer"));
  EXPECT_THAT(names, ::testing::Contains("grpc.health.v1.Health"));
}

}  // namespace
}  // namespace optd::testing
