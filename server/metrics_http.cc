#include "server/metrics_http.h"

#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "prometheus/text_serializer.h"
#include "server/address.h"

namespace optd::server {
namespace {

// A scrape request is a few hundred bytes; anything longer is not one.
constexpr size_t kMaxRequestBytes = 16 << 10;
// How often a wait looks at stop_.
constexpr int kStopCheckMs = 100;

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int PortOf(int fd) {
  sockaddr_storage bound{};
  socklen_t length = sizeof(bound);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &length) != 0) return 0;
  return bound.ss_family == AF_INET6
             ? ntohs(reinterpret_cast<const sockaddr_in6*>(&bound)->sin6_port)
             : ntohs(reinterpret_cast<const sockaddr_in*>(&bound)->sin_port);
}

void SetPort(sockaddr* address, int port) {
  if (address->sa_family == AF_INET6) {
    reinterpret_cast<sockaddr_in6*>(address)->sin6_port = htons(static_cast<uint16_t>(port));
  } else {
    reinterpret_cast<sockaddr_in*>(address)->sin_port = htons(static_cast<uint16_t>(port));
  }
}

std::string Response(absl::string_view status, absl::string_view content_type,
                     absl::string_view body) {
  return absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", content_type,
                      "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& address, std::shared_ptr<prometheus::Registry> registry) {
  OPTD_ASSIGN_OR_RETURN(const HostPort parsed, ParseHostPort(address, "--metrics_addr"));
  const std::string& host = parsed.host;
  const std::string port = std::to_string(parsed.port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* resolved = nullptr;
  const int error =
      getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &resolved);
  if (error != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics address '", address, "' does not resolve: ", gai_strerror(error)));
  }
  // Every resolved address on one port: the first bound picks it when the address asks for 0.
  std::vector<int> fds;
  int bound_port = 0;
  std::string last_error = "no address";
  for (addrinfo* a = resolved; a != nullptr; a = a->ai_next) {
    const int fd =
        socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    // An IPv6 socket takes only IPv6: "::" beside "0.0.0.0" is then no conflict.
    if (a->ai_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bound_port != 0) SetPort(a->ai_addr, bound_port);
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 128) != 0) {
      last_error = std::strerror(errno);
      close(fd);
      continue;
    }
    if (bound_port == 0) bound_port = PortOf(fd);
    fds.push_back(fd);
  }
  freeaddrinfo(resolved);
  if (fds.empty()) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on '", address, "': ", last_error));
  }
  return std::unique_ptr<MetricsHttpServer>(
      new MetricsHttpServer(std::move(fds), bound_port, std::move(registry)));
}

MetricsHttpServer::MetricsHttpServer(std::vector<int> listen_fds, int port,
                                     std::shared_ptr<prometheus::Registry> registry)
    : listen_fds_(std::move(listen_fds)), port_(port), registry_(std::move(registry)) {
  thread_ = std::thread([this] { Serve(); });
}

MetricsHttpServer::~MetricsHttpServer() {
  stop_ = true;
  thread_.join();
  for (int fd : listen_fds_) close(fd);
}

namespace {

// One scrape connection: its request as it arrives, then its response as it leaves.
struct Connection {
  int fd = -1;
  int64_t deadline_ms = 0;
  std::string request;
  std::string response;  // empty while the request is still arriving
  size_t sent = 0;
};

}  // namespace

std::string MetricsHttpServer::ResponseTo(absl::string_view request) const {
  const absl::string_view line = request.substr(0, request.find("\r\n"));
  const bool get = absl::StartsWith(line, "GET ");
  const bool head = absl::StartsWith(line, "HEAD ");
  if (!get && !head) return Response("405 Method Not Allowed", "text/plain", "GET /metrics\n");
  const absl::string_view target = line.substr(line.find(' ') + 1);
  const absl::string_view path = target.substr(0, target.find_first_of(" ?"));
  if (path != "/metrics") return Response("404 Not Found", "text/plain", "optd serves /metrics\n");
  const std::string body = prometheus::TextSerializer().Serialize(registry_->Collect());
  std::string response = Response("200 OK", "text/plain; version=0.0.4; charset=utf-8", body);
  if (head) response.resize(response.size() - body.size());
  return response;
}

void MetricsHttpServer::Serve() {
  std::vector<Connection> connections;
  std::vector<pollfd> polled;
  while (!stop_.load()) {
    // Listeners only while there is room: beyond kMaxConnections new ones wait in the backlog.
    polled.clear();
    if (connections.size() < kMaxConnections) {
      for (int fd : listen_fds_) polled.push_back({fd, POLLIN, 0});
    }
    const size_t first_connection = polled.size();
    int64_t next_deadline = NowMs() + kStopCheckMs;  // wakes to notice stop_ as well
    for (const Connection& c : connections) {
      polled.push_back({c.fd, static_cast<short>(c.response.empty() ? POLLIN : POLLOUT), 0});
      next_deadline = std::min(next_deadline, c.deadline_ms);
    }
    const int64_t wait = std::max<int64_t>(0, next_deadline - NowMs());
    if (poll(polled.data(), polled.size(), static_cast<int>(wait)) < 0 && errno != EINTR) {
      poll(nullptr, 0, kStopCheckMs);
      continue;
    }
    const int64_t now = NowMs();
    // Existing connections first (their indices match `polled`), then new ones.
    for (size_t i = 0; i < connections.size(); ++i) {
      Connection& c = connections[i];
      const short ready = polled[first_connection + i].revents;
      bool done = now >= c.deadline_ms;  // a stalled or dribbling client is cut off
      if (!done && c.response.empty() && (ready & (POLLIN | POLLHUP | POLLERR)) != 0) {
        char buffer[4096];
        const ssize_t n = recv(c.fd, buffer, sizeof(buffer), 0);
        if (n > 0) {
          c.request.append(buffer, static_cast<size_t>(n));
          if (absl::StrContains(c.request, "\r\n\r\n") || c.request.size() >= kMaxRequestBytes) {
            c.response = ResponseTo(c.request);
          }
        } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
          done = true;  // closed, or an error
        }
      }
      if (!done && !c.response.empty()) {
        const ssize_t n =
            send(c.fd, c.response.data() + c.sent, c.response.size() - c.sent, MSG_NOSIGNAL);
        if (n > 0) {
          c.sent += static_cast<size_t>(n);
          done = c.sent == c.response.size();
        } else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
          done = true;
        }
      }
      if (done) {
        close(c.fd);
        c.fd = -1;
      }
    }
    connections.erase(std::remove_if(connections.begin(), connections.end(),
                                     [](const Connection& c) { return c.fd < 0; }),
                      connections.end());
    for (size_t i = 0; i < first_connection; ++i) {
      if ((polled[i].revents & POLLIN) == 0 || connections.size() >= kMaxConnections) continue;
      const int fd = accept4(polled[i].fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) {
        // Out of descriptors: the listener stays readable, so back off instead of spinning.
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          poll(nullptr, 0, kStopCheckMs);
        }
        continue;
      }
      connections.push_back({fd, now + kConnectionDeadlineMs, {}, {}, 0});
    }
  }
  for (const Connection& c : connections) close(c.fd);
}

}  // namespace optd::server
