// Placement of a model's tensors on several optd instances (DESIGN.md, "Scale beyond one
// machine"). As the distributed Muon implementations do, a matrix is never split inside
// Newton–Schulz: whole tensors, or whole batch slices of a [..., m, n] tensor, go to one instance
// each, assigned by greedy longest-processing-time-first — Newton–Schulz matrices on their cost
// steps·m·n·min(m, n) (torchtitan's owned placement; NorMuon's code deals whole matrices
// round-robin by size), then the rest (RMNP, AdamW) on their state bytes — within each instance's
// memory. A pure function of the manifest: client/python/optd/placement.py computes the same
// placement, fingerprint included.
#ifndef OPTD_CLIENT_PLACEMENT_H_
#define OPTD_CLIENT_PLACEMENT_H_

#include "absl/status/statusor.h"
#include "optd/v1/placement.pb.h"

namespace optd::client {

// State bytes per element a placement charges: parameters, gradient and momentum for a
// Newton–Schulz matrix; parameters, gradient and two moments otherwise.
inline constexpr int64_t kNewtonSchulzStateBytes = 12;
inline constexpr int64_t kOtherStateBytes = 16;

// InvalidArgument for a manifest without endpoints, a tensor without a name or with an empty
// dimension, a batched tensor of rank < 3, a repeated name; ResourceExhausted naming the first
// tensor (slice) no instance has memory left for.
absl::StatusOr<v1::Placement> Place(const v1::PlacementManifest& manifest);

}  // namespace optd::client

#endif  // OPTD_CLIENT_PLACEMENT_H_
