// host:port addresses of the flags --listen and --metrics_addr.
#ifndef OPTD_SERVER_ADDRESS_H_
#define OPTD_SERVER_ADDRESS_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace optd::server {

struct HostPort {
  std::string host;  // without the brackets of an IPv6 literal; may be empty (every interface)
  int port = 0;      // 0: the system picks a free one
};

// Splits "host:port" or "[v6]:port". InvalidArgument naming `flag` and the address when there is
// no ':', or the port is not a decimal number in [0, 65535] (gRPC and getaddrinfo would otherwise
// take 99999 modulo 65536 and serve on another port without a word).
absl::StatusOr<HostPort> ParseHostPort(absl::string_view address, absl::string_view flag);

}  // namespace optd::server

#endif  // OPTD_SERVER_ADDRESS_H_
