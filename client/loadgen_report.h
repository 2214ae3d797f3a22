// optd-loadgen's reports: JSON (the LoadgenReport message), CSV, a table, and the comparison of
// two runs that flags regressions.
#ifndef OPTD_CLIENT_LOADGEN_REPORT_H_
#define OPTD_CLIENT_LOADGEN_REPORT_H_

#include <string>

#include "absl/status/statusor.h"
#include "optd/v1/loadgen.pb.h"

namespace optd::loadgen {

std::string ToJson(const v1::LoadgenReport& report);
absl::StatusOr<v1::LoadgenReport> FromJson(const std::string& json);
std::string ToCsv(const v1::LoadgenReport& report);
std::string ToTable(const v1::LoadgenReport& report);

// Levels of `candidate` matched with `baseline`'s (same arrival, concurrency and rate): a line per
// level, "REGRESSION" where steps/s fell or p99 latency rose by more than `threshold`. `*regressed`
// says whether any did.
std::string Compare(const v1::LoadgenReport& baseline, const v1::LoadgenReport& candidate,
                    double threshold, bool* regressed);

}  // namespace optd::loadgen

#endif  // OPTD_CLIENT_LOADGEN_REPORT_H_
