// Command-line handling shared by optd's binaries (optd, optctl, optd-loadgen).
#ifndef OPTD_COMMON_COMMAND_LINE_H_
#define OPTD_COMMON_COMMAND_LINE_H_

#include <vector>

#include "absl/strings/string_view.h"
#include "common/version.h"

namespace optd {

// Parses argv as absl::ParseCommandLine does (an unknown flag or a bad value exits 1 with the
// reason), except that --help, --helpfull and the other help flags print to stdout and exit 0
// (bookworm's Abseil exits 1 after help), and --version prints "<program> <kOptdVersion>" and
// exits 0. `help_source_suffix` picks the flags --help lists: those defined in a file whose path
// ends with it (empty: absl's default). Returns the positional arguments, argv[0] first.
std::vector<char*> ParseCommandLine(int argc, char** argv, absl::string_view program,
                                    absl::string_view usage,
                                    absl::string_view help_source_suffix = {});

}  // namespace optd

#endif  // OPTD_COMMON_COMMAND_LINE_H_
