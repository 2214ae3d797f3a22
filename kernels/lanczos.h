// Lanczos on the Gram matrix of a matrix in backend memory, block-wise over several probes, and
// stochastic Lanczos quadrature (SLQ) over its runs: the estimate path of the analysis
// (kernels/analysis.h), whose errors kernels/ANALYSIS_ERRORS.md derives.
#ifndef OPTD_KERNELS_LANCZOS_H_
#define OPTD_KERNELS_LANCZOS_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace optd {

struct LanczosOptions {
  int probes = 8;
  int steps = 40;  // at most the Gram matrix's order
  uint64_t seed = 0;
  // Multiply-adds one BLAS call may do (kernels/row_blocks.h).
  int64_t max_flops_per_call = int64_t{1} << 28;
};

// Lanczos on the Gram matrix A = X·Xᵀ (`outer`, order rows) or Xᵀ·X (order cols) of a rows×cols
// matrix x in backend memory, from `probes` Rademacher start vectors at once: each step's A·Q is
// two row-blocked GEMMs with the block Q of the probes' current vectors as columns; the recurrence
// and the full reorthogonalization run per probe in fp64 on the host.
struct LanczosRun {
  int64_t order = 0;
  struct Probe {
    std::vector<double> alpha, beta;  // the tridiagonal T: diagonal, and the steps−1 below it
    std::vector<double> basis;        // steps rows of `order`: the orthonormal Lanczos vectors
  };
  std::vector<Probe> probes;
};

absl::StatusOr<LanczosRun> RunLanczos(Backend& backend, Queue& queue, const float* x, int64_t rows,
                                      int64_t cols, bool outer, const LanczosOptions& options);

// The Gauss quadrature of one probe's tridiagonal: Ritz values θ_j (clamped at 0: A is positive
// semidefinite) and the squared first components τ_j² of their eigenvectors, whose columns are in
// `vectors` (column-major, size²).
struct RitzPairs {
  std::vector<double> values;
  std::vector<double> vectors;
  double weight(size_t j) const { return vectors[j * values.size()] * vectors[j * values.size()]; }
};

// LAPACK's dstev of the probe's tridiagonal; Internal when it fails.
absl::StatusOr<RitzPairs> Ritz(const LanczosRun::Probe& probe);

// SLQ nodes and weights over all probes: tr f(A) ≈ Σ_j weight_j·f(node_j), weights (order/p)·τ_j²
// (‖z‖² = order for a Rademacher z).
struct Quadrature {
  std::vector<double> nodes, weights;
  double Trace(const std::function<double(double)>& f) const {
    double sum = 0;
    for (size_t j = 0; j < nodes.size(); ++j) sum += weights[j] * f(nodes[j]);
    return sum;
  }
};

absl::StatusOr<Quadrature> SlqQuadrature(const LanczosRun& run);

}  // namespace optd

#endif  // OPTD_KERNELS_LANCZOS_H_
