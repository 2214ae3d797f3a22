// The per-call floor of a step (issue 18): p50 and p99 of a tiny step (one 64-element AdamW
// tensor, world_size 1) as the streamed Step, as the one-message StepSmall and through the
// worker's shared memory, against the floor of any call on the same daemon and channel, a unary
// GetServerInfo, measured in the same run; and a step of one million elements (4 MB each way)
// as StepSmall and through shared memory. bench/floor.sh runs it (and the Python client's
// counterpart, floor_bench.py) against one optd and writes bench/RESULTS.md's "Per-call floor"
// section.
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
#include "common/status_macros.h"

namespace {

using optd::client::StepPath;

// The large step's tensor: 4 MB of fp32 each way, one message's worth.
constexpr int64_t kLargeElements = 1000000;

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
  // A session of one AdamW tensor of `elements`, its worker's shared memory attached.
  auto open = [&](int64_t elements) -> absl::StatusOr<optd::client::Session> {
    optd::v1::SessionConfig config;
    optd::v1::GroupConfig* group = config.add_groups();
    group->set_name("v");
    group->set_preset("adamw");
    optd::v1::TensorConfig* tensor = config.add_tensors();
    tensor->set_name("b");
    tensor->add_shape(elements);
    tensor->set_group("v");
    config.set_shared_memory(true);
    absl::StatusOr<optd::client::Session> session = client.CreateSession(config);
    if (session.ok()) OPTD_RETURN_IF_ERROR(session->AttachSharedMemory().status());
    return session;
  };
  absl::StatusOr<optd::client::Session> tiny = open(64);
  absl::StatusOr<optd::client::Session> large = open(kLargeElements);
  if (!tiny.ok() || !large.ok()) {
    std::fprintf(stderr, "floor_bench: %s\n",
                 (tiny.ok() ? large.status() : tiny.status()).ToString().c_str());
    return 1;
  }
  std::vector<float> gradient(kLargeElements, 0.01f), out(kLargeElements);
  int64_t step = 0, large_step = 0;
  auto step_on = [&](optd::client::Session& session, int64_t& at, int64_t elements, StepPath path) {
    optd::client::StepOptions options;
    options.path = path;
    const auto n = static_cast<size_t>(elements);
    options.outputs = {{"b", absl::MakeSpan(out).subspan(0, n)}};
    return session.Step(++at, {{"b", absl::MakeConstSpan(gradient).subspan(0, n)}}, options).ok();
  };
  const Figures info = Time(calls, [&] { return client.ServerInfo().ok(); });
  const Figures streamed = Time(calls, [&] { return step_on(*tiny, step, 64, StepPath::kStream); });
  const Figures small = Time(calls, [&] { return step_on(*tiny, step, 64, StepPath::kSmall); });
  const Figures shared = Time(calls, [&] { return step_on(*tiny, step, 64, StepPath::kShared); });
  const int large_calls = std::max(10, calls / 10);
  const Figures large_small = Time(
      large_calls, [&] { return step_on(*large, large_step, kLargeElements, StepPath::kSmall); });
  const Figures large_shared = Time(
      large_calls, [&] { return step_on(*large, large_step, kLargeElements, StepPath::kShared); });
  tiny->Delete().IgnoreError();
  large->Delete().IgnoreError();
  const auto json = [](const Figures& f) {
    return absl::StrFormat("{\"p50_ms\": %.4f, \"p99_ms\": %.4f}", f.p50_ms, f.p99_ms);
  };
  std::printf(
      "{\"calls\": %d, \"server_info\": %s, \"step\": %s, \"step_small\": %s, "
      "\"step_shared\": %s, \"large_elements\": %lld, \"large_calls\": %d, "
      "\"large_small\": %s, \"large_shared\": %s}\n",
      calls, json(info).c_str(), json(streamed).c_str(), json(small).c_str(), json(shared).c_str(),
      static_cast<long long>(kLargeElements), large_calls, json(large_small).c_str(),
      json(large_shared).c_str());
  return 0;
}
