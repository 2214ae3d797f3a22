// openblas_core_probe ARGS...: does what optd's main() does first (kernels/cpu/openblas_core.h),
// then says what it runs on. Each entry into main() prints "entry PID CORE"; the last line is
// "final PID CORE ARGS" with the arguments joined by '|', so a test sees a restart (two entries),
// that it kept the process and its arguments, and the core it ended on.
#include <cblas.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include "kernels/cpu/openblas_core.h"

int main(int argc, char** argv) {
  std::printf("entry %d %s\n", static_cast<int>(getpid()), openblas_get_corename());
  std::fflush(stdout);  // an exec drops what stdio still buffers
  if (absl::Status restart = optd::RestartWithSuitedOpenBlasCore(argv); !restart.ok()) {
    std::printf("failed %s\n", std::string(restart.message()).c_str());
  }
  std::string args;
  for (int i = 1; i < argc; ++i) args += std::string(i > 1 ? "|" : "") + argv[i];
  std::printf("final %d %s %s\n", static_cast<int>(getpid()), openblas_get_corename(),
              args.c_str());
  return 0;
}
