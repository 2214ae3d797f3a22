// The Prometheus endpoint: GET /metrics answers the registry in the text exposition format
// (version 0.0.4), on one thread of its own that serves many connections at once.
//
// Why not prometheus-cpp's Exposer: it serves from civetweb, whose Debian build gives its worker
// threads fixed 100 KiB stacks, and glibc carves every loaded library's static TLS out of a
// thread's stack; OpenBLAS alone takes 60 KiB of it, so the first scrape of a daemon that links
// OpenBLAS overflowed a worker's stack (SIGSEGV in mg_printf, seen under gdb). This server's
// thread has the default 8 MiB stack.
#ifndef OPTD_SERVER_METRICS_HTTP_H_
#define OPTD_SERVER_METRICS_HTTP_H_

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "prometheus/registry.h"

namespace optd::server {

class MetricsHttpServer {
 public:
  // Listens on `address` (host:port; port 0 picks a free one), on every address the host
  // resolves to (both loopbacks for "localhost"). InvalidArgument when the address does not parse
  // or resolve, Unavailable when none of its addresses can be bound.
  //
  // Up to kMaxConnections connections are served at once by one thread (non-blocking sockets
  // and poll), each cut off kConnectionDeadlineMs after its accept: idle or dribbling clients
  // delay no one's scrape, and beyond the bound new connections wait in the listen backlog.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::shared_ptr<prometheus::Registry> registry);
  static constexpr int kConnectionDeadlineMs = 2000;
  static constexpr size_t kMaxConnections = 64;

  // Stops serving within about 100 ms, cutting off a scrape in progress.
  ~MetricsHttpServer();

  int port() const { return port_; }

 private:
  MetricsHttpServer(std::vector<int> listen_fds, int port,
                    std::shared_ptr<prometheus::Registry> registry);
  void Serve();
  // The whole HTTP response to `request`: the exposition for GET (or its headers for HEAD)
  // /metrics, 404 or 405 otherwise.
  std::string ResponseTo(absl::string_view request) const;

  const std::vector<int> listen_fds_;
  const int port_;
  const std::shared_ptr<prometheus::Registry> registry_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace optd::server

#endif  // OPTD_SERVER_METRICS_HTTP_H_
