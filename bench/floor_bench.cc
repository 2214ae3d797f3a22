// The per-call floor of a step (issue 18): p50 and p99 of a tiny step (one 64-element AdamW
// tensor, world_size 1) as the streamed Step and as the one-message StepSmall, against the
// floor of any call on the same daemon and channel, a unary GetServerInfo, measured in the same
// run. bench/floor.sh runs it (and the Python client's counterpart, floor_bench.py) against one
// optd and writes bench/RESULTS.md's "Per-call floor" section.
//
// Usage: floor_bench --server=HOST:PORT [--calls=N] > out.json
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/client.h"

namespace {

using optd::client::StepPath;

struct Figures {
  double p50_ms = 0, p99_ms = 0;
};

// `calls` timed calls of fn after a tenth as many untimed ones; fn returns false on failure.
Figures Time(int calls, const std::function<bool()>& fn) {
  for (int i = 0; i < calls / 10; ++i) fn();
  std::vector<double> ms;
  ms.reserve(calls);
  for (int i = 0; i < calls; ++i) {
    const auto start = std::chrono::steady_clock::now();
    if (!fn()) {
      std::fprintf(stderr, "floor_bench: a call failed\n");
      std::exit(1);
    }
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                     .count());
  }
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms[static_cast<size_t>(0.99 * (ms.size() - 1))]};
}

}  // namespace

int main(int argc, char** argv) {
  std::string server = "127.0.0.1:50051";
  int calls = 2000;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--server=", 0) == 0) {
      server = arg.substr(9);
    } else if (arg.rfind("--calls=", 0) != 0 || !absl::SimpleAtoi(arg.substr(8), &calls) ||
               calls < 10) {
      std::fprintf(stderr, "usage: floor_bench --server=HOST:PORT [--calls=N>=10]\n");
      return 2;
    }
  }
  optd::client::ChannelOptions channel;
  channel.target = server;
  absl::StatusOr<std::shared_ptr<grpc::Channel>> made = optd::client::MakeChannel(channel);
  if (!made.ok()) {
    std::fprintf(stderr, "floor_bench: %s\n", made.status().ToString().c_str());
    return 1;
  }
  optd::client::Client client(*made);
  optd::v1::SessionConfig config;
  optd::v1::GroupConfig* group = config.add_groups();
  group->set_name("v");
  group->set_preset("adamw");
  optd::v1::TensorConfig* tensor = config.add_tensors();
  tensor->set_name("b");
  tensor->add_shape(64);
  tensor->set_group("v");
  absl::StatusOr<optd::client::Session> session = client.CreateSession(config);
  if (!session.ok()) {
    std::fprintf(stderr, "floor_bench: %s\n", session.status().ToString().c_str());
    return 1;
  }
  std::vector<float> gradient(64, 0.01f), out(64);
  int64_t step = 0;
  auto step_on = [&](StepPath path) {
    optd::client::StepOptions options;
    options.path = path;
    options.outputs = {{"b", absl::MakeSpan(out)}};
    return session->Step(++step, {{"b", gradient}}, options).ok();
  };
  const Figures info = Time(calls, [&] { return client.ServerInfo().ok(); });
  const Figures streamed = Time(calls, [&] { return step_on(StepPath::kStream); });
  const Figures small = Time(calls, [&] { return step_on(StepPath::kSmall); });
  session->Delete().IgnoreError();
  std::printf(
      "{\"calls\": %d, \"server_info\": {\"p50_ms\": %.4f, \"p99_ms\": %.4f}, "
      "\"step\": {\"p50_ms\": %.4f, \"p99_ms\": %.4f}, "
      "\"step_small\": {\"p50_ms\": %.4f, \"p99_ms\": %.4f}}\n",
      calls, info.p50_ms, info.p99_ms, streamed.p50_ms, streamed.p99_ms, small.p50_ms,
      small.p99_ms);
  return 0;
}
