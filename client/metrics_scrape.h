// Reading a Prometheus exposition over plain HTTP: optd-loadgen scrapes each daemon's /metrics
// before and after a level, for the server-side phase times.
#ifndef OPTD_CLIENT_METRICS_SCRAPE_H_
#define OPTD_CLIENT_METRICS_SCRAPE_H_

#include <map>
#include <string>

#include "absl/status/statusor.h"

namespace optd::loadgen {

// GET http://address/metrics, the body; Unavailable naming the address when it cannot be had
// (5 s timeouts on connect, send and receive), InvalidArgument for an address without a port.
absl::StatusOr<std::string> Scrape(const std::string& address);

// The samples of an exposition: name{labels} -> value, the labels as written.
std::map<std::string, double> Samples(const std::string& text);

// samples[key], or 0 when it is missing.
double Sample(const std::map<std::string, double>& samples, const std::string& key);

}  // namespace optd::loadgen

#endif  // OPTD_CLIENT_METRICS_SCRAPE_H_
