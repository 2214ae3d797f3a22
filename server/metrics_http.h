// The Prometheus endpoint: GET /metrics answers the registry in the text exposition format
// (version 0.0.4), on one thread of its own.
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

#include "absl/status/statusor.h"
#include "prometheus/registry.h"

namespace optd::server {

class MetricsHttpServer {
 public:
  // Listens on `address` (host:port; port 0 picks a free one). InvalidArgument when the address
  // does not parse or resolve, Unavailable when it cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::shared_ptr<prometheus::Registry> registry);
  // Stops serving; a scrape in progress finishes first.
  ~MetricsHttpServer();

  int port() const { return port_; }

 private:
  MetricsHttpServer(int listen_fd, int port, std::shared_ptr<prometheus::Registry> registry);
  void Serve();
  void Answer(int connection);

  const int listen_fd_;
  const int port_;
  const std::shared_ptr<prometheus::Registry> registry_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace optd::server

#endif  // OPTD_SERVER_METRICS_HTTP_H_
