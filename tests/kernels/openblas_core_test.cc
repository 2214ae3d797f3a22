// OpenBLAS's kernels (kernels/cpu/openblas_core.h): which core a CPU's features call for, and the
// restart a process makes where OpenBLAS took the CPU for an older one. The restart test runs a
// probe with the environment as the suite has it, so on a machine whose OpenBLAS falls back (an
// Intel model newer than it) it sees the restart, and elsewhere that none happens.
#include "kernels/cpu/openblas_core.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <optional>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"

namespace optd {
namespace {

// Sets an environment variable for one scope and puts back what was there.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = getenv(name)) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(CoreIsaTest, KnowsOpenBlasCoreNamesInAnyCase) {
  BlasIsa isa;
  ASSERT_TRUE(CoreIsa("Prescott", isa));
  EXPECT_EQ(isa, BlasIsa::kOlder);
  ASSERT_TRUE(CoreIsa("SKYLAKEX", isa));
  EXPECT_EQ(isa, BlasIsa::kAvx512);
  ASSERT_TRUE(CoreIsa("cooperlake", isa));
  EXPECT_EQ(isa, BlasIsa::kAvx512Bf16);
  ASSERT_TRUE(CoreIsa("Zen", isa));
  EXPECT_EQ(isa, BlasIsa::kAvx2);
  ASSERT_TRUE(CoreIsa("Sandybridge", isa));
  EXPECT_EQ(isa, BlasIsa::kAvx);
}

TEST(CoreIsaTest, DoesNotGuessNamesItDoesNotKnow) {
  BlasIsa isa = BlasIsa::kAvx2;
  EXPECT_FALSE(CoreIsa("", isa));
  EXPECT_FALSE(CoreIsa("NeoverseV2", isa));  // another architecture's
  EXPECT_FALSE(CoreIsa("SkylakeX2", isa));   // a later OpenBLAS's: left as it chose
  EXPECT_EQ(isa, BlasIsa::kAvx2);
}

TEST(SuitedCoreTest, NamesACoreUsingExactlyWhatTheCpuHas) {
  for (const BlasIsa want :
       {BlasIsa::kAvx, BlasIsa::kAvx2, BlasIsa::kAvx512, BlasIsa::kAvx512Bf16}) {
    for (const bool amd : {false, true}) {
      const std::string core = SuitedCore(want, amd);
      BlasIsa isa;
      ASSERT_TRUE(CoreIsa(core, isa)) << core;
      EXPECT_EQ(isa, want) << core;
    }
  }
  EXPECT_EQ(SuitedCore(BlasIsa::kAvx2, /*amd=*/true), "Zen");
  EXPECT_EQ(SuitedCore(BlasIsa::kAvx2, /*amd=*/false), "Haswell");
  EXPECT_EQ(SuitedCore(BlasIsa::kOlder, /*amd=*/false), "");
}

TEST(InspectOpenBlasCoreTest, NeverOverridesACoreTypeFromTheEnvironment) {
  // Set after OpenBLAS loaded, so it changes no kernel: only what InspectOpenBlasCore advises.
  ScopedEnv env("OPENBLAS_CORETYPE", "Prescott");
  EXPECT_EQ(InspectOpenBlasCore().suited, "");
  EXPECT_TRUE(RestartWithSuitedOpenBlasCore(nullptr).ok());  // nothing to do: no exec
  EXPECT_NE(OpenBlasCoreNote().find("OPENBLAS_CORETYPE=Prescott from the environment"),
            std::string::npos)
      << OpenBlasCoreNote();
}

TEST(InspectOpenBlasCoreTest, AdvisesARestartExactlyWhereTheLoadedCoreLacksWhatTheCpuHas) {
  if (getenv("OPENBLAS_CORETYPE") != nullptr) GTEST_SKIP() << "OPENBLAS_CORETYPE is set here";
  const OpenBlasCore core = InspectOpenBlasCore();
  BlasIsa loaded;
  if (!CoreIsa(core.loaded, loaded)) {
    EXPECT_EQ(core.suited, "") << core.loaded;
    return;
  }
  EXPECT_EQ(core.suited.empty(), loaded >= core.cpu) << core.loaded;
  if (!core.suited.empty()) {
    BlasIsa suited;
    ASSERT_TRUE(CoreIsa(core.suited, suited));
    EXPECT_EQ(suited, core.cpu);
  }
}

struct ProbeRun {
  std::vector<std::vector<std::string>> entries;  // {"entry", pid, core}
  std::vector<std::string> final;                 // {"final", pid, core, args}
  std::string output;
};

ProbeRun RunProbe(const std::string& args) {
  ProbeRun run;
  FILE* pipe = popen((std::string(OPTD_OPENBLAS_CORE_PROBE) + " " + args).c_str(), "r");
  if (pipe == nullptr) return run;
  char buffer[512];
  while (fgets(buffer, sizeof(buffer), pipe) != nullptr) run.output += buffer;
  EXPECT_EQ(pclose(pipe), 0) << run.output;
  for (absl::string_view line : absl::StrSplit(run.output, '\n', absl::SkipEmpty())) {
    std::vector<std::string> fields = absl::StrSplit(line, absl::MaxSplits(' ', 3));
    if (fields[0] == "entry") run.entries.push_back(fields);
    if (fields[0] == "final") run.final = fields;
  }
  return run;
}

TEST(RestartTest, EndsOnTheSuitedCoreInTheSameProcessWithTheSameArguments) {
  const ProbeRun run = RunProbe("alpha --flag=1 'two words'");
  ASSERT_EQ(run.final.size(), 4u) << run.output;
  ASSERT_FALSE(run.entries.empty()) << run.output;
  for (const std::vector<std::string>& entry : run.entries) {
    EXPECT_EQ(entry[1], run.final[1]) << "the restart is an exec, not a new process:\n"
                                      << run.output;
  }
  EXPECT_EQ(run.final[3], "alpha|--flag=1|two words");

  const OpenBlasCore here = InspectOpenBlasCore();  // this process: the same CPU, never restarted
  const std::string first = run.entries.front()[2], last = run.final[2];
  if (const char* set = getenv("OPENBLAS_CORETYPE")) {
    EXPECT_EQ(run.entries.size(), 1u) << "restarted although OPENBLAS_CORETYPE=" << set;
    return;
  }
  BlasIsa first_isa;
  const bool restart = CoreIsa(first, first_isa) && first_isa < here.cpu;
  ASSERT_EQ(run.entries.size(), restart ? 2u : 1u) << run.output;
  if (restart) {
    BlasIsa last_isa;
    ASSERT_TRUE(CoreIsa(last, last_isa)) << last;
    EXPECT_EQ(last_isa, here.cpu) << "OpenBLAS took " << first << ", the restart ran " << last;
  } else {
    EXPECT_EQ(last, first);
  }
}

}  // namespace
}  // namespace optd
