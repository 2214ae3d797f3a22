// Which kernels OpenBLAS runs on this CPU, and a restart with better ones where it took the CPU for
// an older one.
//
// OpenBLAS built with DYNAMIC_ARCH (Debian's) picks its kernels once, as it loads, by CPU model.
// Debian bookworm's 0.3.21 takes an Intel model it does not know — any newer than it, such as
// Sapphire or Emerald Rapids (family 6, model 143 or 207) — for `Prescott`: SSE3 kernels on a CPU
// with AVX-512, and GPT-2 small's Muon step 2.6x slower (bench/RESULTS.md, "OpenBLAS's kernels").
// OpenBLAS fixed that in 0.3.25 (its issue 4267: a feature-based fallback); its choice can only be
// changed before it loads, by OPENBLAS_CORETYPE. So a process that computes with it (the daemon,
// the benchmarks) checks at the top of main() and, where OpenBLAS's core lacks instructions the
// CPU has, restarts itself once with OPENBLAS_CORETYPE naming the core the CPU's features call
// for. A user's own OPENBLAS_CORETYPE is never overridden.
#ifndef OPTD_KERNELS_CPU_OPENBLAS_CORE_H_
#define OPTD_KERNELS_CPU_OPENBLAS_CORE_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace optd {

// What a CPU offers OpenBLAS's x86-64 kernels, in the order they need it.
enum class BlasIsa { kOlder = 0, kAvx = 1, kAvx2 = 2, kAvx512 = 3, kAvx512Bf16 = 4 };

struct OpenBlasCore {
  std::string loaded;             // the core OpenBLAS runs (openblas_get_corename)
  BlasIsa cpu = BlasIsa::kOlder;  // what this CPU (and its OS) offers
  // The core to restart with: empty where the loaded one already uses what the CPU offers, or is
  // not one this table knows (a later OpenBLAS's), or OPENBLAS_CORETYPE was set.
  std::string suited;
};

// The instructions core `name` (an OpenBLAS x86-64 core name, as openblas_get_corename spells it,
// any case) uses; false where the name is not one of OpenBLAS's x86-64 cores.
bool CoreIsa(absl::string_view name, BlasIsa& isa);

// The core OpenBLAS's own feature-based choice names for `isa` on this vendor.
std::string SuitedCore(BlasIsa isa, bool amd);

// This process's OpenBLAS core, this CPU's features, and what to restart with.
OpenBlasCore InspectOpenBlasCore();

// Where InspectOpenBlasCore() names a suited core: sets OPENBLAS_CORETYPE to it (and
// OPTD_OPENBLAS_FALLBACK to the core OpenBLAS took, for OpenBlasCoreNote) and replaces this
// process with /proc/self/exe run with `argv`: it does not return. Call it first in main(), before
// any thread starts or file opens. Returns OK where there is nothing to do, and the reason where
// the restart failed (the process goes on with the core it has).
absl::Status RestartWithSuitedOpenBlasCore(char** argv);
// The same for the programs that compute beside the daemon (benchmarks, tests, examples): a
// failed restart is a line on stderr, and the program goes on with the core it has.
void RestartWithSuitedOpenBlasCoreOrWarn(char** argv);

// One line for the log: the core OpenBLAS runs, and, after such a restart, the one it took first
// and why it was replaced.
std::string OpenBlasCoreNote();

}  // namespace optd

#endif  // OPTD_KERNELS_CPU_OPENBLAS_CORE_H_
