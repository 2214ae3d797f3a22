#include "client/loadgen_report.h"

#include <algorithm>
#include <map>
#include <sstream>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/util/json_util.h"

namespace optd::loadgen {

std::string ToJson(const v1::LoadgenReport& report) {
  std::string json;
  google::protobuf::util::JsonPrintOptions print;
  print.add_whitespace = true;
  print.always_print_primitive_fields = true;
  print.preserve_proto_field_names = true;
  // A report always serializes: it has no Any fields or unknown enums.
  (void)google::protobuf::util::MessageToJsonString(report, &json, print);
  return json;
}

absl::StatusOr<v1::LoadgenReport> FromJson(const std::string& json) {
  v1::LoadgenReport report;
  const auto status = google::protobuf::util::JsonStringToMessage(json, &report);
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("not a loadgen report: ", status.ToString()));
  }
  return report;
}

std::string ToCsv(const v1::LoadgenReport& report) {
  std::string csv =
      "arrival,concurrency,rate,seconds,steps,errors,steps_per_second,gradient_gbps,result_gbps,"
      "latency_p50_s,latency_p90_s,latency_p99_s,latency_p999_s,latency_max_s,stable,"
      "server_receive_s,server_aggregate_s,server_compute_s,server_send_s,"
      "session_steps_per_second,intended_starts,unstarted,overloaded,error\n";
  for (const v1::LoadgenLevel& l : report.levels()) {
    auto phase = [&l](const char* name) {
      auto it = l.server_phase_seconds().find(name);
      return it == l.server_phase_seconds().end() ? 0.0 : it->second;
    };
    absl::StrAppendFormat(&csv, "%s,%d,%g,%.3f,%d,%d,%.3f,%.4f,%.4f,%.6f,%.6f,%.6f,%.6f,%.6f,%d,",
                          l.arrival(), l.concurrency(), l.rate(), l.seconds(), l.steps(),
                          l.errors(), l.steps_per_second(), l.gradient_gbps(), l.result_gbps(),
                          l.latency_p50_s(), l.latency_p90_s(), l.latency_p99_s(),
                          l.latency_p999_s(), l.latency_max_s(), l.stable() ? 1 : 0);
    std::string error = l.error();
    std::replace(error.begin(), error.end(), ',', ';');
    std::replace(error.begin(), error.end(), '\n', ' ');
    absl::StrAppendFormat(&csv, "%.6f,%.6f,%.6f,%.6f,%.3f,%d,%d,%d,%s\n", phase("receive"),
                          phase("aggregate"), phase("compute"), phase("send"),
                          l.session_steps_per_second(), l.intended_starts(), l.unstarted(),
                          l.overloaded() ? 1 : 0, error);
  }
  return csv;
}

std::string ToTable(const v1::LoadgenReport& report) {
  std::string out = absl::StrFormat(
      "optd-loadgen: %s (%d parameters), preset %s, wire %s, world_size %d, on %s\n",
      report.model(), report.model_elements(), report.preset(), report.wire_dtype(),
      report.world_size(), absl::StrJoin(report.endpoints(), ", "));
  absl::StrAppendFormat(&out, "%-9s %5s %8s %9s %8s %8s %9s %9s %9s %9s %9s %7s %s\n", "arrival",
                        "conc", "rate", "steps/s", "GB/s in", "GB/s out", "p50 ms", "p90 ms",
                        "p99 ms", "p999 ms", "max ms", "errors", "");
  for (const v1::LoadgenLevel& l : report.levels()) {
    if (!l.error().empty()) {
      absl::StrAppendFormat(&out, "level concurrency=%d rate=%g could not run: %s\n",
                            l.concurrency(), l.rate(), l.error());
      continue;
    }
    std::string codes;
    for (const auto& [code, n] : l.errors_by_code()) absl::StrAppend(&codes, " ", code, "=", n);
    absl::StrAppendFormat(
        &out, "%-9s %5d %8.1f %9.2f %8.3f %8.3f %9.2f %9.2f %9.2f %9.2f %9.2f %7d %s%s%s\n",
        l.arrival(), l.concurrency(), l.rate(), l.steps_per_second(), l.gradient_gbps(),
        l.result_gbps(), 1e3 * l.latency_p50_s(), 1e3 * l.latency_p90_s(), 1e3 * l.latency_p99_s(),
        1e3 * l.latency_p999_s(), 1e3 * l.latency_max_s(), l.errors(),
        l.stable() ? "stable" : "UNSTABLE", l.error_ridden() ? " ERRORS" : "", codes);
    if (l.overloaded()) {
      absl::StrAppendFormat(&out, "          OVERLOADED: %d of %d intended starts never started\n",
                            l.unstarted(), l.intended_starts());
    }
    if (!l.server_phase_seconds().empty()) {
      absl::StrAppend(&out, "          server per step:");
      for (const char* phase : {"receive", "aggregate", "compute", "send"}) {
        auto it = l.server_phase_seconds().find(phase);
        absl::StrAppendFormat(&out, " %s %.2f ms", phase,
                              it == l.server_phase_seconds().end() ? 0.0 : 1e3 * it->second);
      }
      absl::StrAppendFormat(&out, "; backend memory %.1f MiB\n",
                            l.server_backend_memory_bytes() / (1 << 20));
    }
    if (l.sessions_size() > 1) {
      // Fairness: the spread of the sessions' own rates, and their p99s.
      double low = l.sessions(0).steps_per_second(), high = low;
      double p99_low = l.sessions(0).latency_p99_s(), p99_high = p99_low;
      for (const v1::LoadgenSession& s : l.sessions()) {
        low = std::min(low, s.steps_per_second());
        high = std::max(high, s.steps_per_second());
        p99_low = std::min(p99_low, s.latency_p99_s());
        p99_high = std::max(p99_high, s.latency_p99_s());
      }
      absl::StrAppendFormat(&out,
                            "          per session: steps/s %.2f to %.2f (farthest %.0f%% from "
                            "the mean), p99 %.2f to %.2f ms\n",
                            low, high, 100 * l.fairness_spread(), 1e3 * p99_low, 1e3 * p99_high);
    }
  }
  return out;
}

std::string Compare(const v1::LoadgenReport& baseline, const v1::LoadgenReport& candidate,
                    double threshold, bool* regressed) {
  *regressed = false;
  std::string out =
      absl::StrFormat("%-9s %5s %8s %12s %12s %8s %10s %10s %8s\n", "arrival", "conc", "rate",
                      "base st/s", "new st/s", "ratio", "base p99", "new p99", "ratio");
  for (const v1::LoadgenLevel& c : candidate.levels()) {
    const v1::LoadgenLevel* b = nullptr;
    for (const v1::LoadgenLevel& l : baseline.levels()) {
      if (l.arrival() == c.arrival() && l.concurrency() == c.concurrency() &&
          l.rate() == c.rate()) {
        b = &l;
      }
    }
    if (b == nullptr) {
      absl::StrAppendFormat(&out, "%-9s %5d %8.1f   (not in the baseline)\n", c.arrival(),
                            c.concurrency(), c.rate());
      continue;
    }
    const double throughput = c.steps_per_second() / std::max(1e-12, b->steps_per_second());
    const double p99 = c.latency_p99_s() / std::max(1e-12, b->latency_p99_s());
    const bool worse = throughput < 1 - threshold || p99 > 1 + threshold;
    *regressed = *regressed || worse;
    absl::StrAppendFormat(&out, "%-9s %5d %8.1f %12.2f %12.2f %8.3f %9.2fms %9.2fms %8.3f%s\n",
                          c.arrival(), c.concurrency(), c.rate(), b->steps_per_second(),
                          c.steps_per_second(), throughput, 1e3 * b->latency_p99_s(),
                          1e3 * c.latency_p99_s(), p99, worse ? "  REGRESSION" : "");
  }
  return out;
}

}  // namespace optd::loadgen
