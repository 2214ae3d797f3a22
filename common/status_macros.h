// optd's one pair of early-return macros: bookworm's Abseil (20220623) predates
// ABSL_RETURN_IF_ERROR / ABSL_ASSIGN_OR_RETURN.
#ifndef OPTD_COMMON_STATUS_MACROS_H_
#define OPTD_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define OPTD_STATUS_CONCAT_INNER_(a, b) a##b
#define OPTD_STATUS_CONCAT_(a, b) OPTD_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define OPTD_RETURN_IF_ERROR(expr)               \
  do {                                           \
    ::absl::Status optd_status_ = (expr);        \
    if (!optd_status_.ok()) return optd_status_; \
  } while (false)

// `lhs = value of expr` (an absl::StatusOr<T>), or returns its error status.
#define OPTD_ASSIGN_OR_RETURN(lhs, expr) \
  OPTD_ASSIGN_OR_RETURN_IMPL_(OPTD_STATUS_CONCAT_(optd_statusor_, __LINE__), lhs, expr)
#define OPTD_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr)   \
  auto statusor = (expr);                                  \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = *std::move(statusor)

#endif  // OPTD_COMMON_STATUS_MACROS_H_
