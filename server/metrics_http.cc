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
#include "kernels/status_macros.h"
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
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 16) != 0) {
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

void MetricsHttpServer::Serve() {
  std::vector<pollfd> listeners;
  for (int fd : listen_fds_) listeners.push_back({fd, POLLIN, 0});
  while (!stop_.load()) {
    // Wakes every 100 ms to notice stop_: the destructor needs no signal or self-pipe.
    if (poll(listeners.data(), listeners.size(), kStopCheckMs) <= 0) continue;
    for (const pollfd& listener : listeners) {
      if ((listener.revents & POLLIN) == 0) continue;
      const int connection = accept4(listener.fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (connection < 0) {
        // Out of descriptors: the listener stays readable, so back off instead of spinning.
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          poll(nullptr, 0, kStopCheckMs);
        }
        continue;
      }
      Answer(connection);
      close(connection);
    }
  }
}

bool MetricsHttpServer::WaitFor(int connection, short events, int64_t deadline_ms) {
  while (!stop_.load()) {
    const int64_t left = deadline_ms - NowMs();
    if (left <= 0) return false;
    pollfd p{connection, events, 0};
    const int ready = poll(&p, 1, static_cast<int>(std::min<int64_t>(left, kStopCheckMs)));
    if (ready > 0) return true;
    if (ready < 0 && errno != EINTR) return false;
  }
  return false;
}

bool MetricsHttpServer::WriteAll(int connection, absl::string_view data, int64_t deadline_ms) {
  while (!data.empty()) {
    const ssize_t n = send(connection, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!WaitFor(connection, POLLOUT, deadline_ms)) return false;
    } else {
      return false;
    }
  }
  return true;
}

void MetricsHttpServer::Answer(int connection) {
  const int64_t deadline_ms = NowMs() + kConnectionDeadlineMs;
  std::string request;
  char buffer[4096];
  while (!absl::StrContains(request, "\r\n\r\n") && request.size() < kMaxRequestBytes) {
    const ssize_t n = recv(connection, buffer, sizeof(buffer), 0);
    if (n > 0) {
      request.append(buffer, static_cast<size_t>(n));
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      if (!WaitFor(connection, POLLIN, deadline_ms)) return;
    } else {
      return;  // closed, or an error
    }
  }
  const absl::string_view line = absl::string_view(request).substr(0, request.find("\r\n"));
  const bool get = absl::StartsWith(line, "GET ");
  const bool head = absl::StartsWith(line, "HEAD ");
  if (!get && !head) {
    WriteAll(connection, Response("405 Method Not Allowed", "text/plain", "GET /metrics\n"),
             deadline_ms);
    return;
  }
  const absl::string_view target = line.substr(line.find(' ') + 1);
  const absl::string_view path = target.substr(0, target.find_first_of(" ?"));
  if (path != "/metrics") {
    WriteAll(connection, Response("404 Not Found", "text/plain", "optd serves /metrics\n"),
             deadline_ms);
    return;
  }
  const std::string body = prometheus::TextSerializer().Serialize(registry_->Collect());
  std::string response = Response("200 OK", "text/plain; version=0.0.4; charset=utf-8", body);
  if (head) response.resize(response.size() - body.size());
  WriteAll(connection, response, deadline_ms);
}

}  // namespace optd::server
