// optctl: the admin CLI of optd. `optctl --help` lists the commands and flags; the commands
// themselves live in client/optctl_lib.h.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/optctl_lib.h"
#include "common/command_line.h"
#include "common/status_macros.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "The daemon's address, HOST:PORT.");
ABSL_FLAG(std::string, token, "",
          "Session token for the session commands (inspect, checkpoint, restore, dump, step, "
          "analysis, and delete); default: $OPTD_TOKEN.");
ABSL_FLAG(std::string, admin_token, "",
          "Admin token for create, list and delete (and for session commands when no session "
          "token is given); default: $OPTD_ADMIN_TOKEN.");
ABSL_FLAG(bool, tls, false, "Connect with TLS (implied by --tls_ca, --tls_cert, --tls_key).");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM file of the CA that signed the daemon's certificate; empty: the system roots.");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate for mutual TLS (with --tls_key).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert.");
ABSL_FLAG(std::string, tls_server_name, "",
          "Name to check the daemon's certificate against instead of the --server host.");
ABSL_FLAG(double, timeout_s, 30,
          "Deadline in seconds of `health` and of `step` (which includes waiting for the other "
          "workers of the step); 0: none.");

// Flags of single commands; optctl refuses them with any other command.
ABSL_FLAG(std::optional<std::string>, id, std::nullopt,
          "create: the session's name, [A-Za-z0-9_.-]{1,64}; default: the daemon picks one.");
ABSL_FLAG(std::optional<std::string>, tensors, std::nullopt,
          "dump: comma-separated tensor names to write (names holding ',' cannot be picked "
          "here); default: all.");
ABSL_FLAG(std::optional<std::string>, wire_dtype, std::nullopt,
          "dump, step: how values travel, fp32, bf16 or fp16; default: fp32 (dump writes "
          "float32 files either way).");
ABSL_FLAG(std::optional<int64_t>, step, std::nullopt,
          "step (required): the step number, the session's completed steps + 1; a finished "
          "step's number replays its result.");
ABSL_FLAG(std::optional<std::string>, grads, std::nullopt,
          "step (required): directory of gradient .npy files, one per tensor (see Files); a "
          "tensor without a file gets no gradient.");
ABSL_FLAG(std::optional<std::string>, out, std::nullopt,
          "step: directory to write the result tensors to (new parameters or deltas, as the "
          "session's step_result says), created when missing; default: none written.");
ABSL_FLAG(std::optional<int>, worker, std::nullopt,
          "step: this worker's id, 0 .. world_size-1; default: 0.");
ABSL_FLAG(std::optional<double>, lr, std::nullopt,
          "step: learning rate of every group for this step only; default: the groups' own.");
ABSL_FLAG(std::optional<std::string>, result_dtype, std::nullopt,
          "step: dtype the result travels in, fp32, bf16 or fp16; default: each tensor's dtype.");
ABSL_FLAG(bool, follow, false, "analysis: keep polling and print each new analysis as it lands.");
ABSL_FLAG(std::optional<double>, interval_s, std::nullopt,
          "analysis --follow: seconds between polls (default 2).");
ABSL_FLAG(std::optional<int64_t>, updates, std::nullopt,
          "analysis --follow: stop after this many analyses (default: never).");
ABSL_FLAG(std::optional<int64_t>, chunk_bytes, std::nullopt,
          "step: size of the gradient and result chunks, 4 .. 4194304; default: 1048576.");

namespace optd::client {
namespace {

constexpr char kUsage[] = R"(the admin CLI of optd, the optimizer daemon.

  optctl --server=HOST:PORT [--token=T] [--admin_token=T] [--tls ...] <command> [args]

Commands:
  health [SERVICE]
      Prints SERVING or NOT_SERVING for SERVICE ("" is liveness and the default;
      optd.v1.Optimizer is readiness). Exit status 0 only when SERVING.
  create CONFIG.textproto [--id=NAME]
      Creates a session from an optd.v1.SessionConfig in protobuf text format and prints
      "session_id: ..." and "token: ..." lines; the token is shown only this once.
  list
      The daemon's sessions: id, step, loaded, state bytes, checkpoint step.
  inspect SESSION
      The session's settings and groups, and per tensor its shape, group, elements, steps
      applied, lr, momentum and weight decay.
  delete SESSION
      Deletes the session and its checkpoint.
  checkpoint SESSION
      Writes the session's checkpoint; prints its step, path and bytes.
  restore SESSION
      Puts the session back to its last checkpoint; prints the step.
  dump SESSION DIR [--tensors=a,b] [--wire_dtype=fp32|bf16|fp16]
      Writes each tensor's parameters to DIR (created when missing) as a .npy file.
  step SESSION --step=N --grads=DIR [--out=DIR] [--worker=0] [--lr=X] [--wire_dtype=fp32]
       [--result_dtype=fp32|bf16|fp16] [--chunk_bytes=N]
      Sends one worker's gradients for step N from DIR's .npy files (each must have its
      tensor's exact shape), prints the step's summary and with --out writes the result
      tensors there.
  analysis SESSION [--follow [--interval_s=2] [--updates=N]]
      The latest analysis figures per tensor (DESIGN.md, "Metrics"): a session analyzes every
      analysis_interval steps. --follow polls and prints each new analysis as it lands, until
      interrupted or N were shown; it stops at the first failed call (exit status 1).

Tokens: create and list send --admin_token ($OPTD_ADMIN_TOKEN); delete sends the admin token
when given (a daemon started with --admin_token requires it), else --token ($OPTD_TOKEN); the
other session commands send --token, or the admin token when no session token is given (the
daemon accepts it for every session).

Files: dump and step name a tensor's file after the tensor: the name with every '%' written as
"%25" and every '/' as "%2F", then ".npy" (tensor "blocks/0/w%" is blocks%2F0%2Fw%25.npy).
Files hold the tensor's shape in C order; dump writes float32, step reads float32, float64
and float16.

Exit status: 0 on success; 1 for an error from the daemon or the connection, and for health
other than SERVING; 2 for a usage error (flags, arguments, input files). Errors are printed as
"optctl: <status code>: <message>".)";

// absl::ParseCommandLine exits with status 1 for an unknown flag or a value that does not
// parse; optctl's usage errors exit with 2, so the flags are checked here first, by the same
// rules (--name=value, --name value, --bool, --nobool; "--" ends the flags).
absl::Status CheckFlagSyntax(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--") break;
    if (arg.size() < 2 || arg[0] != '-') continue;
    arg.remove_prefix(arg[1] == '-' ? 2 : 1);
    const size_t equals = arg.find('=');
    absl::string_view name = arg.substr(0, equals);
    // Abseil handles its usage flags itself, without registering them.
    constexpr absl::string_view kUsageFlags[] = {"help",        "helpfull",       "helpshort",
                                                 "helppackage", "helpon",         "helpmatch",
                                                 "version",     "only_check_args"};
    if (std::find(std::begin(kUsageFlags), std::end(kUsageFlags), name) != std::end(kUsageFlags)) {
      continue;
    }
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr && equals == absl::string_view::npos && absl::ConsumePrefix(&name, "no")) {
      absl::CommandLineFlag* negated = absl::FindCommandLineFlag(name);
      if (negated != nullptr && negated->IsOfType<bool>()) continue;
    }
    if (flag == nullptr) return UsageError(absl::StrCat("unknown flag ", argv[i]));
    std::string value;
    if (equals != absl::string_view::npos) {
      value = std::string(arg.substr(equals + 1));
    } else if (flag->IsOfType<bool>()) {
      continue;
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      return UsageError(absl::StrCat("flag --", name, " needs a value"));
    }
    std::string error;
    if (!flag->ParseFrom(value, &error)) {
      return UsageError(absl::StrCat("--", name, "=", value, ": ", error));
    }
  }
  return absl::OkStatus();
}

std::string FlagOrEnv(const std::string& flag, const char* variable) {
  if (!flag.empty()) return flag;
  const char* value = std::getenv(variable);
  return value == nullptr ? "" : value;
}

struct Command {
  absl::string_view name;
  size_t min_args;
  size_t max_args;
  std::vector<absl::string_view> flags;  // the single-command flags it takes
};

const std::vector<Command>& Commands() {
  static const auto* commands = new std::vector<Command>{
      {"health", 0, 1, {}},
      {"create", 1, 1, {"id"}},
      {"list", 0, 0, {}},
      {"inspect", 1, 1, {}},
      {"delete", 1, 1, {}},
      {"checkpoint", 1, 1, {}},
      {"restore", 1, 1, {}},
      {"dump", 2, 2, {"tensors", "wire_dtype"}},
      {"step",
       1,
       1,
       {"step", "grads", "out", "worker", "lr", "wire_dtype", "result_dtype", "chunk_bytes"}},
      {"analysis", 1, 1, {"follow", "interval_s", "updates"}},
  };
  return *commands;
}

// Checks the command's name, argument count and single-command flags.
absl::StatusOr<const Command*> FindCommand(const std::vector<std::string>& args) {
  if (args.empty()) return UsageError("no command given; optctl --help lists them");
  const Command* command = nullptr;
  for (const Command& c : Commands()) {
    if (c.name == args[0]) command = &c;
  }
  if (command == nullptr) {
    return UsageError(absl::StrCat("unknown command '", args[0], "'; optctl --help lists them"));
  }
  const size_t count = args.size() - 1;
  if (count < command->min_args || count > command->max_args) {
    return UsageError(absl::StrCat("'", command->name, "' takes ",
                                   command->min_args == command->max_args
                                       ? absl::StrCat(command->min_args)
                                       : absl::StrCat(command->min_args, " or ", command->max_args),
                                   " argument(s), not ", count, "; optctl --help shows usage"));
  }
  const std::pair<absl::string_view, bool> given[] = {
      {"id", absl::GetFlag(FLAGS_id).has_value()},
      {"tensors", absl::GetFlag(FLAGS_tensors).has_value()},
      {"wire_dtype", absl::GetFlag(FLAGS_wire_dtype).has_value()},
      {"step", absl::GetFlag(FLAGS_step).has_value()},
      {"grads", absl::GetFlag(FLAGS_grads).has_value()},
      {"out", absl::GetFlag(FLAGS_out).has_value()},
      {"worker", absl::GetFlag(FLAGS_worker).has_value()},
      {"lr", absl::GetFlag(FLAGS_lr).has_value()},
      {"result_dtype", absl::GetFlag(FLAGS_result_dtype).has_value()},
      {"chunk_bytes", absl::GetFlag(FLAGS_chunk_bytes).has_value()},
      {"follow", absl::GetFlag(FLAGS_follow)},
      {"interval_s", absl::GetFlag(FLAGS_interval_s).has_value()},
      {"updates", absl::GetFlag(FLAGS_updates).has_value()},
  };
  for (const auto& [flag, is_given] : given) {
    if (is_given &&
        std::find(command->flags.begin(), command->flags.end(), flag) == command->flags.end()) {
      return UsageError(absl::StrCat("--", flag, " does not apply to '", command->name, "'"));
    }
  }
  return command;
}

absl::StatusOr<StepCommandOptions> StepFlags(absl::Duration timeout) {
  StepCommandOptions step;
  const std::optional<int64_t> number = absl::GetFlag(FLAGS_step);
  if (!number.has_value()) return UsageError("step needs --step=N (the 1-based step number)");
  step.step = *number;
  const std::optional<std::string> grads = absl::GetFlag(FLAGS_grads);
  if (!grads.has_value() || grads->empty()) {
    return UsageError("step needs --grads=DIR (the gradient .npy files)");
  }
  step.grads_dir = *grads;
  step.out_dir = absl::GetFlag(FLAGS_out).value_or("");
  step.step_options.worker_id = absl::GetFlag(FLAGS_worker).value_or(0);
  step.step_options.lr = absl::GetFlag(FLAGS_lr);
  OPTD_ASSIGN_OR_RETURN(
      step.step_options.wire_dtype,
      ParseWireDType("--wire_dtype", absl::GetFlag(FLAGS_wire_dtype).value_or("fp32")));
  const std::optional<std::string> result_dtype = absl::GetFlag(FLAGS_result_dtype);
  if (result_dtype.has_value()) {
    OPTD_ASSIGN_OR_RETURN(step.step_options.result_dtype,
                          ParseWireDType("--result_dtype", *result_dtype));
  }
  step.step_options.chunk_bytes = absl::GetFlag(FLAGS_chunk_bytes).value_or(kDefaultChunkBytes);
  if (step.step_options.chunk_bytes < 4 || step.step_options.chunk_bytes > (int64_t{4} << 20)) {
    return UsageError(
        absl::StrCat("--chunk_bytes=", step.step_options.chunk_bytes, " is outside [4, 4194304]"));
  }
  step.step_options.timeout = timeout;
  return step;
}

// Runs the command in `args` (command name first); returns the exit status.
absl::StatusOr<int> Run(const std::vector<std::string>& args) {
  OPTD_ASSIGN_OR_RETURN(const Command* command, FindCommand(args));
  const double timeout_s = absl::GetFlag(FLAGS_timeout_s);
  if (!(timeout_s >= 0)) return UsageError(absl::StrCat("--timeout_s=", timeout_s, " is negative"));
  const absl::Duration timeout =
      timeout_s == 0 ? absl::InfiniteDuration() : absl::Seconds(timeout_s);

  ChannelOptions channel_options;
  channel_options.target = absl::GetFlag(FLAGS_server);
  channel_options.tls = absl::GetFlag(FLAGS_tls);
  channel_options.tls_ca = absl::GetFlag(FLAGS_tls_ca);
  channel_options.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  channel_options.tls_key = absl::GetFlag(FLAGS_tls_key);
  channel_options.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(channel_options);
  if (!channel.ok()) return UsageError(channel.status().message());
  const std::string token = FlagOrEnv(absl::GetFlag(FLAGS_token), "OPTD_TOKEN");
  const std::string admin_token = FlagOrEnv(absl::GetFlag(FLAGS_admin_token), "OPTD_ADMIN_TOKEN");
  Client client(*channel, admin_token);

  const absl::string_view name = command->name;
  if (name == "health") {
    OPTD_ASSIGN_OR_RETURN(bool serving,
                          RunHealth(client, args.size() > 1 ? args[1] : "", timeout, std::cout));
    return serving ? 0 : 1;
  }
  if (name == "create") {
    OPTD_RETURN_IF_ERROR(
        RunCreate(client, args[1], absl::GetFlag(FLAGS_id).value_or(""), std::cout));
    return 0;
  }
  if (name == "list") {
    OPTD_RETURN_IF_ERROR(RunList(client, std::cout));
    return 0;
  }
  if (name == "delete") {
    // The admin token when there is one (a daemon with an admin token requires it), else the
    // session's own.
    OPTD_RETURN_IF_ERROR(
        RunDelete(client, args[1], admin_token.empty() ? token : admin_token, std::cout));
    return 0;
  }
  if (token.empty() && admin_token.empty()) {
    return UsageError(absl::StrCat("'", name,
                                   "' needs the session's token: --token or $OPTD_TOKEN (or the "
                                   "admin token)"));
  }
  Session session = client.OpenSession(args[1], token.empty() ? admin_token : token);
  if (name == "inspect") {
    OPTD_RETURN_IF_ERROR(RunInspect(session, std::cout));
  } else if (name == "checkpoint") {
    OPTD_RETURN_IF_ERROR(RunCheckpoint(session, std::cout));
  } else if (name == "restore") {
    OPTD_RETURN_IF_ERROR(RunRestore(session, std::cout));
  } else if (name == "analysis") {
    AnalysisCommandOptions analysis;
    analysis.follow = absl::GetFlag(FLAGS_follow);
    const double interval = absl::GetFlag(FLAGS_interval_s).value_or(2.0);
    const int64_t updates = absl::GetFlag(FLAGS_updates).value_or(0);
    if (!(interval > 0) || updates < 0) {
      return UsageError("--interval_s must be > 0 and --updates >= 0");
    }
    analysis.interval = absl::Seconds(interval);
    analysis.updates = updates;
    OPTD_RETURN_IF_ERROR(RunAnalysis(session, analysis, std::cout));
  } else if (name == "dump") {
    DumpOptions dump;
    dump.dir = args[2];
    const std::optional<std::string> tensors = absl::GetFlag(FLAGS_tensors);
    if (tensors.has_value()) dump.tensors = absl::StrSplit(*tensors, ',', absl::SkipEmpty());
    OPTD_ASSIGN_OR_RETURN(
        dump.wire_dtype,
        ParseWireDType("--wire_dtype", absl::GetFlag(FLAGS_wire_dtype).value_or("fp32")));
    OPTD_RETURN_IF_ERROR(RunDump(session, dump, std::cout));
  } else if (name == "step") {
    OPTD_ASSIGN_OR_RETURN(StepCommandOptions step, StepFlags(timeout));
    OPTD_RETURN_IF_ERROR(RunStep(session, step, std::cout));
  }
  return 0;
}

}  // namespace
}  // namespace optd::client

int main(int argc, char** argv) {
  absl::StatusOr<int> exit_code;
  const absl::Status syntax = optd::client::CheckFlagSyntax(argc, argv);
  if (syntax.ok()) {
    const std::vector<char*> positional =
        optd::ParseCommandLine(argc, argv, "optctl", optd::client::kUsage);
    exit_code =
        optd::client::Run(std::vector<std::string>(positional.begin() + 1, positional.end()));
  } else {
    exit_code = syntax;
  }
  std::cout.flush();
  if (exit_code.ok()) return *exit_code;
  const absl::Status& status = exit_code.status();
  std::fprintf(stderr, "optctl: %s: %s\n", absl::StatusCodeToString(status.code()).c_str(),
               std::string(status.message()).c_str());
  return optd::client::IsUsageError(status) ? 2 : 1;
}
