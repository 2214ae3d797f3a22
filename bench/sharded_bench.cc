// The sharding benchmark: a GPT-2-medium-shaped model stepped as one sharded session over the optd
// instances given (bench/sharded.sh starts them): the placement's balance of Newton–Schulz cost
// and state bytes, each step's time and each instance's share of it. Prints a progress line per
// step and one JSON object.
//
// Usage: sharded_bench --server=A,B,C [--model=gpt2-medium] [--layers=N] [--preset=keller]
//                      [--steps=3] [--warmup=1] [--json=FILE]
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/loadgen.h"
#include "client/sharded.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "optd endpoints, HOST:PORT[,HOST:PORT...].");
ABSL_FLAG(std::string, model, "gpt2-medium", "optd-loadgen's --model.");
ABSL_FLAG(int, layers, 0, "Keep the first N transformer blocks (h0..h<N-1>) and the rest; 0: all.");
ABSL_FLAG(std::string, preset, "keller", "Preset of the matrices (vectors and embeddings: adamw).");
ABSL_FLAG(int, steps, 3, "Measured steps.");
ABSL_FLAG(int, warmup, 1, "Steps before measuring.");
ABSL_FLAG(std::string, json, "", "Write the result here too.");
ABSL_FLAG(bool, placement_only, false,
          "Only place the model on the --server endpoints (no session, no step): the balance "
          "of a model too large to step here.");

namespace {

// Block index of a GPT-2 tensor name "h<K>.…", or -1.
int BlockOf(const std::string& name) {
  int block = -1;
  if (!absl::StartsWith(name, "h")) return -1;
  const size_t dot = name.find('.');
  if (dot == std::string::npos || !absl::SimpleAtoi(name.substr(1, dot - 1), &block)) return -1;
  return block;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::vector<std::string> servers =
      absl::StrSplit(absl::GetFlag(FLAGS_server), ',', absl::SkipEmpty());
  absl::StatusOr<std::vector<optd::loadgen::TensorShape>> shapes =
      optd::loadgen::ModelShapes(absl::GetFlag(FLAGS_model));
  if (!shapes.ok()) {
    std::fprintf(stderr, "sharded_bench: %s\n", shapes.status().ToString().c_str());
    return 2;
  }
  const int layers = absl::GetFlag(FLAGS_layers);
  optd::v1::SessionConfig config;
  for (const auto& [name, preset] : std::vector<std::pair<std::string, std::string>>{
           {"matrices", absl::GetFlag(FLAGS_preset)}, {"vectors", "adamw"}}) {
    optd::v1::GroupConfig* g = config.add_groups();
    g->set_name(name);
    g->set_preset(preset);
  }
  int64_t elements = 0;
  for (const optd::loadgen::TensorShape& t : *shapes) {
    if (layers > 0 && BlockOf(t.name) >= layers) continue;
    optd::v1::TensorConfig* tc = config.add_tensors();
    tc->set_name(t.name);
    int64_t n = 1;
    for (int64_t d : t.shape) {
      tc->add_shape(d);
      n *= d;
    }
    elements += n;
    tc->set_group(t.adamw ? "vectors" : "matrices");
    tc->mutable_normal()->set_std(0.02);
    tc->mutable_normal()->set_seed(static_cast<uint64_t>(config.tensors_size()));
  }
  if (absl::GetFlag(FLAGS_placement_only)) {
    // The manifest ShardedSession::Create builds for this config: matrices by Newton–Schulz
    // cost (the preset has it), vectors and embeddings by bytes.
    optd::v1::PlacementManifest manifest;
    manifest.set_epoch(1);
    for (const std::string& s : servers) manifest.add_endpoints()->set_address(s);
    for (const optd::v1::TensorConfig& t : config.tensors()) {
      optd::v1::PlacementManifest::Tensor* m = manifest.add_tensors();
      m->set_name(t.name());
      m->mutable_shape()->CopyFrom(t.shape());
      m->set_kind(t.group() == "vectors" ? optd::v1::PlacementManifest::Tensor::BYTES
                                         : optd::v1::PlacementManifest::Tensor::NEWTON_SCHULZ);
    }
    absl::StatusOr<optd::v1::Placement> placement = optd::client::Place(manifest);
    if (!placement.ok()) {
      std::fprintf(stderr, "sharded_bench: %s\n", placement.status().ToString().c_str());
      return 1;
    }
    const std::string json = absl::StrCat(
        "{\"instances\": ", servers.size(), ", \"model\": \"", absl::GetFlag(FLAGS_model),
        "\", \"layers\": ", layers, ", \"elements\": ", elements, ", \"newton_schulz_cost\": [",
        absl::StrJoin(placement->newton_schulz_cost(), ", "), "], \"state_bytes\": [",
        absl::StrJoin(placement->bytes(), ", "), "]}\n");
    std::fputs(json.c_str(), stdout);
    if (!absl::GetFlag(FLAGS_json).empty()) std::ofstream(absl::GetFlag(FLAGS_json)) << json;
    return 0;
  }
  std::vector<optd::client::ShardEndpoint> endpoints;
  for (const std::string& s : servers) {
    optd::client::ChannelOptions channel;
    channel.target = s;
    channel.max_message_bytes = 64 << 20;
    endpoints.push_back({s, *optd::client::MakeChannel(channel), 0});
  }
  absl::StatusOr<optd::client::ShardedSession> sharded = optd::client::ShardedSession::Create(
      endpoints, config, absl::StrCat("bench-", getpid()), /*epoch=*/1);
  if (!sharded.ok()) {
    std::fprintf(stderr, "sharded_bench: %s\n", sharded.status().ToString().c_str());
    return 1;
  }
  const optd::v1::Placement& placement = sharded->placement();
  std::fprintf(stderr, "sharded_bench: %d tensors, %lld elements on %zu instance(s); ",
               config.tensors_size(), static_cast<long long>(elements), servers.size());
  std::fprintf(stderr, "Newton-Schulz cost per instance %s, state bytes %s\n",
               absl::StrJoin(placement.newton_schulz_cost(), ",").c_str(),
               absl::StrJoin(placement.bytes(), ",").c_str());

  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 0.01f);
  std::vector<std::vector<float>> gradients;
  std::vector<optd::client::NamedTensor> named;
  for (const optd::v1::TensorConfig& t : config.tensors()) {
    int64_t n = 1;
    for (int64_t d : t.shape()) n *= d;
    gradients.emplace_back(static_cast<size_t>(n));
    for (float& g : gradients.back()) g = normal(rng);
  }
  for (int t = 0; t < config.tensors_size(); ++t) {
    named.push_back({config.tensors(t).name(), gradients[t]});
  }
  // Parts in parts() order; their addresses map them to placement endpoints.
  std::vector<std::string> part_addresses;
  for (const auto& [address, session] : sharded->parts()) part_addresses.push_back(address);
  std::vector<double> step_seconds;
  std::vector<std::vector<double>> part_seconds(part_addresses.size());
  const int warmup = absl::GetFlag(FLAGS_warmup), steps = absl::GetFlag(FLAGS_steps);
  for (int s = 1; s <= warmup + steps; ++s) {
    const absl::Time start = absl::Now();
    absl::StatusOr<optd::client::StepResult> result = sharded->Step(s, named);
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    if (!result.ok()) {
      std::fprintf(stderr, "sharded_bench: step %d: %s\n", s, result.status().ToString().c_str());
      sharded->Delete().IgnoreError();
      return 1;
    }
    std::vector<std::string> parts;
    for (size_t p = 0; p < part_addresses.size(); ++p) {
      const double part = absl::ToDoubleSeconds(sharded->last_part_times()[p]);
      parts.push_back(absl::StrFormat("%s %.2f s", part_addresses[p], part));
      if (s > warmup) part_seconds[p].push_back(part);
    }
    if (s > warmup) step_seconds.push_back(seconds);
    std::fprintf(stderr, "sharded_bench: step %d/%d%s: %.2f s (%s)\n", s, warmup + steps,
                 s <= warmup ? " (warm-up)" : "", seconds, absl::StrJoin(parts, ", ").c_str());
  }
  sharded->Delete().IgnoreError();

  std::string json = absl::StrCat(
      "{\"instances\": ", servers.size(), ", \"model\": \"", absl::GetFlag(FLAGS_model),
      "\", \"layers\": ", layers, ", \"preset\": \"", absl::GetFlag(FLAGS_preset),
      "\", \"elements\": ", elements, ", \"newton_schulz_cost\": [",
      absl::StrJoin(placement.newton_schulz_cost(), ", "), "], \"state_bytes\": [",
      absl::StrJoin(placement.bytes(), ", "), "], \"endpoints\": [\"",
      absl::StrJoin(servers, "\", \""), "\"], \"step_seconds\": [",
      absl::StrJoin(step_seconds, ", "), "], \"parts\": [");
  for (size_t p = 0; p < part_addresses.size(); ++p) {
    absl::StrAppend(&json, p ? ", " : "", "{\"address\": \"", part_addresses[p],
                    "\", \"seconds\": [", absl::StrJoin(part_seconds[p], ", "), "]}");
  }
  absl::StrAppend(&json, "]}\n");
  std::fputs(json.c_str(), stdout);
  if (!absl::GetFlag(FLAGS_json).empty()) std::ofstream(absl::GetFlag(FLAGS_json)) << json;
  return 0;
}
