#include "kernels/lanczos.h"

#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/row_blocks.h"

namespace optd {

absl::StatusOr<LanczosRun> RunLanczos(Backend& backend, Queue& queue, const float* x, int64_t rows,
                                      int64_t cols, bool outer, const LanczosOptions& options) {
  const int64_t order = outer ? rows : cols;
  const int64_t inner = outer ? cols : rows;
  const int64_t p = options.probes;
  // Past `order` steps the Krylov space is the whole space.
  const int64_t steps = std::min<int64_t>(options.steps, order);
  LanczosRun run;
  run.order = order;
  run.probes.resize(p);
  std::mt19937_64 rng(options.seed);
  const double start = 1.0 / std::sqrt(static_cast<double>(order));
  for (LanczosRun::Probe& probe : run.probes) {
    probe.basis.reserve(steps * order);
    for (int64_t i = 0; i < order; ++i) probe.basis.push_back((rng() & 1) != 0 ? start : -start);
  }
  OPTD_ASSIGN_OR_RETURN(
      Buffer work, backend.Allocate(static_cast<size_t>((2 * order + inner) * p) * sizeof(float)));
  float* q_block = work.f32();           // order×p
  float* product = q_block + order * p;  // order×p
  float* half = product + order * p;     // inner×p: Xᵀ·Q or X·Q
  std::vector<float> host(order * p);
  std::vector<double> w(order);
  std::vector<bool> active(p, true);
  for (int64_t step = 0; step < steps; ++step) {
    for (int64_t j = 0; j < p; ++j) {
      const double* q = run.probes[j].basis.data() + step * order;
      for (int64_t i = 0; i < order; ++i)
        host[i * p + j] = active[j] ? static_cast<float>(q[i]) : 0;
    }
    OPTD_RETURN_IF_ERROR(backend.Upload(queue, q_block, host.data(), host.size() * sizeof(float)));
    const GemmArgs into_half{.m = inner,
                             .n = p,
                             .k = order,
                             .a = x,
                             .lda = cols,
                             .b = q_block,
                             .ldb = p,
                             .c = half,
                             .ldc = p};
    const GemmArgs back{.m = order,
                        .n = p,
                        .k = inner,
                        .a = x,
                        .lda = cols,
                        .b = half,
                        .ldb = p,
                        .c = product,
                        .ldc = p};
    if (outer) {  // A·Q = X·(Xᵀ·Q)
      OPTD_RETURN_IF_ERROR(
          TransposedGemmInRowBlocks(backend, queue, into_half, options.max_flops_per_call));
      OPTD_RETURN_IF_ERROR(GemmInRowBlocks(backend, queue, back, options.max_flops_per_call));
    } else {  // A·Q = Xᵀ·(X·Q)
      OPTD_RETURN_IF_ERROR(GemmInRowBlocks(backend, queue, into_half, options.max_flops_per_call));
      OPTD_RETURN_IF_ERROR(
          TransposedGemmInRowBlocks(backend, queue, back, options.max_flops_per_call));
    }
    OPTD_RETURN_IF_ERROR(
        backend.Download(queue, host.data(), product, host.size() * sizeof(float)));
    OPTD_RETURN_IF_ERROR(backend.Synchronize(queue));
    for (int64_t j = 0; j < p; ++j) {
      if (!active[j]) continue;
      LanczosRun::Probe& probe = run.probes[j];
      const double* q = probe.basis.data() + step * order;
      for (int64_t i = 0; i < order; ++i) w[i] = host[i * p + j];
      double alpha = 0;
      for (int64_t i = 0; i < order; ++i) alpha += q[i] * w[i];
      probe.alpha.push_back(alpha);
      if (step + 1 == steps) continue;
      // Full reorthogonalization against every earlier vector, twice (classical Gram–Schmidt
      // twice is orthogonal to working precision); it also removes α·q and β·q_previous.
      for (int pass = 0; pass < 2; ++pass) {
        for (int64_t v = 0; v <= step; ++v) {
          const double* b = probe.basis.data() + v * order;
          double dot = 0;
          for (int64_t i = 0; i < order; ++i) dot += b[i] * w[i];
          for (int64_t i = 0; i < order; ++i) w[i] -= dot * b[i];
        }
      }
      double beta = 0;
      for (double e : w) beta += e * e;
      beta = std::sqrt(beta);
      // An invariant Krylov space: T is complete (in fp32 products only an exact one ends here).
      double scale = 0;
      for (size_t i = 0; i < probe.alpha.size(); ++i) {
        scale = std::max(scale,
                         std::fabs(probe.alpha[i]) + (i < probe.beta.size() ? probe.beta[i] : 0));
      }
      if (!(beta > 1e-12 * scale)) {
        active[j] = false;
        continue;
      }
      probe.beta.push_back(beta);
      for (int64_t i = 0; i < order; ++i) probe.basis.push_back(w[i] / beta);
    }
  }
  return run;
}

absl::StatusOr<RitzPairs> Ritz(const LanczosRun::Probe& probe) {
  const lapack_int n = static_cast<lapack_int>(probe.alpha.size());
  RitzPairs ritz{probe.alpha, std::vector<double>(static_cast<size_t>(n) * n)};
  std::vector<double> off(probe.beta.begin(), probe.beta.begin() + std::max(0, n - 1));
  off.resize(std::max(1, n - 1));
  const lapack_int info = LAPACKE_dstev(LAPACK_COL_MAJOR, 'V', n, ritz.values.data(), off.data(),
                                        ritz.vectors.data(), n);
  if (info != 0) {
    return absl::InternalError(absl::StrCat("analysis: LAPACKE_dstev failed with info=", info));
  }
  for (double& v : ritz.values) v = std::max(v, 0.0);
  return ritz;
}

absl::StatusOr<Quadrature> SlqQuadrature(const LanczosRun& run) {
  Quadrature quadrature;
  const double scale = static_cast<double>(run.order) / static_cast<double>(run.probes.size());
  for (const LanczosRun::Probe& probe : run.probes) {
    OPTD_ASSIGN_OR_RETURN(RitzPairs ritz, Ritz(probe));
    for (size_t j = 0; j < ritz.values.size(); ++j) {
      quadrature.nodes.push_back(ritz.values[j]);
      quadrature.weights.push_back(scale * ritz.weight(j));
    }
  }
  return quadrature;
}

}  // namespace optd
