#include "kernels/cpu/openblas_core.h"

#include <cblas.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace optd {
namespace {

constexpr char kCoreType[] = "OPENBLAS_CORETYPE";
// Set beside OPENBLAS_CORETYPE by the restart: the core OpenBLAS took before it.
constexpr char kFallback[] = "OPTD_OPENBLAS_FALLBACK";

BlasIsa CpuIsa() {
#if !defined(__x86_64__)
  return BlasIsa::kOlder;  // the table below is x86-64's; elsewhere OpenBLAS's choice stands
#else
  __builtin_cpu_init();
  // libgcc's answers include the OS's: AVX and AVX-512 count only where XCR0 enables their state.
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return BlasIsa::kAvx512Bf16;
  if (avx512) return BlasIsa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return BlasIsa::kAvx2;
  if (__builtin_cpu_supports("avx")) return BlasIsa::kAvx;
  return BlasIsa::kOlder;
#endif
}

absl::string_view IsaName(BlasIsa isa) {
  switch (isa) {
    case BlasIsa::kAvx512Bf16:
      return "AVX-512 with BF16";
    case BlasIsa::kAvx512:
      return "AVX-512";
    case BlasIsa::kAvx2:
      return "AVX2 and FMA";
    case BlasIsa::kAvx:
      return "AVX";
    case BlasIsa::kOlder:
      break;
  }
  return "no AVX";
}

}  // namespace

bool CoreIsa(absl::string_view name, BlasIsa& isa) {
  // OpenBLAS's x86-64 core names (driver/others/dynamic.c) by the instructions their kernels use.
  static const struct {
    absl::string_view name;
    BlasIsa isa;
  } kCores[] = {
      {"sapphirerapids", BlasIsa::kAvx512Bf16},
      {"cooperlake", BlasIsa::kAvx512Bf16},
      {"skylakex", BlasIsa::kAvx512},
      {"haswell", BlasIsa::kAvx2},
      {"zen", BlasIsa::kAvx2},
      {"excavator", BlasIsa::kAvx2},
      {"sandybridge", BlasIsa::kAvx},
      {"bulldozer", BlasIsa::kAvx},
      {"piledriver", BlasIsa::kAvx},
      {"steamroller", BlasIsa::kAvx},
      {"katmai", BlasIsa::kOlder},
      {"coppermine", BlasIsa::kOlder},
      {"northwood", BlasIsa::kOlder},
      {"prescott", BlasIsa::kOlder},
      {"banias", BlasIsa::kOlder},
      {"atom", BlasIsa::kOlder},
      {"core2", BlasIsa::kOlder},
      {"penryn", BlasIsa::kOlder},
      {"dunnington", BlasIsa::kOlder},
      {"nehalem", BlasIsa::kOlder},
      {"athlon", BlasIsa::kOlder},
      {"opteron", BlasIsa::kOlder},
      {"opteron_sse3", BlasIsa::kOlder},
      {"barcelona", BlasIsa::kOlder},
      {"nano", BlasIsa::kOlder},
      {"bobcat", BlasIsa::kOlder},
  };
  const std::string lower = absl::AsciiStrToLower(name);
  for (const auto& core : kCores) {
    if (lower == core.name) {
      isa = core.isa;
      return true;
    }
  }
  return false;
}

std::string SuitedCore(BlasIsa isa, bool amd) {
  switch (isa) {
    case BlasIsa::kAvx512Bf16:
      return "Cooperlake";
    case BlasIsa::kAvx512:
      return "SkylakeX";
    case BlasIsa::kAvx2:
      return amd ? "Zen" : "Haswell";
    case BlasIsa::kAvx:
      return amd ? "Bulldozer" : "Sandybridge";
    case BlasIsa::kOlder:
      break;
  }
  return "";
}

OpenBlasCore InspectOpenBlasCore() {
  OpenBlasCore core;
  core.loaded = openblas_get_corename();
  core.cpu = CpuIsa();
  BlasIsa loaded_isa;
  if (getenv(kCoreType) == nullptr && CoreIsa(core.loaded, loaded_isa) && loaded_isa < core.cpu) {
    bool amd = false;
#if defined(__x86_64__)
    amd = __builtin_cpu_is("amd");
#endif
    core.suited = SuitedCore(core.cpu, amd);
  }
  return core;
}

absl::Status RestartWithSuitedOpenBlasCore(char** argv) {
  const OpenBlasCore core = InspectOpenBlasCore();
  if (core.suited.empty()) return absl::OkStatus();
  if (setenv(kCoreType, core.suited.c_str(), 1) != 0 ||
      setenv(kFallback, core.loaded.c_str(), 1) != 0) {
    return absl::InternalError(absl::StrCat("setenv: ", std::strerror(errno)));
  }
  execv("/proc/self/exe", argv);
  const int error = errno;  // execv returns only when it failed
  unsetenv(kCoreType);
  unsetenv(kFallback);
  return absl::InternalError(
      absl::StrCat("OpenBLAS runs ", core.loaded, " kernels on a CPU with ", IsaName(core.cpu),
                   "; restarting with ", kCoreType, "=", core.suited,
                   " failed: execv(/proc/self/exe): ", std::strerror(error)));
}

void RestartWithSuitedOpenBlasCoreOrWarn(char** argv) {
  if (absl::Status restart = RestartWithSuitedOpenBlasCore(argv); !restart.ok()) {
    std::fprintf(stderr, "%s\n", std::string(restart.message()).c_str());
  }
}

std::string OpenBlasCoreNote() {
  const OpenBlasCore core = InspectOpenBlasCore();
  std::string note =
      absl::StrCat("OpenBLAS kernels: ", core.loaded, " (CPU with ", IsaName(core.cpu), ")");
  const char* set = getenv(kCoreType);
  const char* fallback = getenv(kFallback);
  if (set != nullptr && fallback != nullptr) {
    absl::StrAppend(&note, ";", OPENBLAS_VERSION, "took this CPU for ", fallback,
                    ", so optd restarted with ", kCoreType, "=", set,
                    " (set OPENBLAS_CORETYPE to choose yourself)");
  } else if (set != nullptr) {
    absl::StrAppend(&note, "; ", kCoreType, "=", set, " from the environment");
  }
  return note;
}

}  // namespace optd
