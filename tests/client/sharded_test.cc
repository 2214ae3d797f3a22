// A sharded session over three in-process daemons against the same session on one: the same
// parameters bit for bit after several steps with several presets and a batched tensor split into
// slices; stale placement epochs refused; a down instance named in the step's error.
#include "client/sharded.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {
namespace {

using ::testing::HasSubstr;

v1::SessionConfig ShardedConfig() {
  v1::SessionConfig config;
  for (const auto& [name, preset] : std::vector<std::pair<std::string, std::string>>{
           {"muon", "keller"}, {"eq", "muoneq_rowcol"}, {"rmnp", "rmnp"}, {"vectors", "adamw"}}) {
    v1::GroupConfig* g = config.add_groups();
    g->set_name(name);
    g->set_preset(preset);
  }
  struct Def {
    std::string name;
    std::vector<int64_t> shape;
    std::string group;
    bool batch;
  };
  for (const Def& d : std::vector<Def>{{"w1", {48, 64}, "muon", false},
                                       {"w2", {64, 48}, "muon", false},
                                       {"w3", {40, 40}, "eq", false},
                                       {"experts", {5, 24, 16}, "muon", true},
                                       {"r", {32, 40}, "rmnp", false},
                                       {"b", {64}, "vectors", false}}) {
    v1::TensorConfig* t = config.add_tensors();
    t->set_name(d.name);
    for (int64_t x : d.shape) t->add_shape(x);
    t->set_group(d.group);
    if (d.batch) t->set_rank_policy(v1::RANK_POLICY_BATCH);
  }
  return config;
}

std::vector<float> Values(int64_t count, uint64_t seed) { return Gradient(count, seed, 0, 0); }

TEST(ShardedSessionTest, EqualsOneInstanceBitForBit) {
  std::vector<std::unique_ptr<server::Server>> servers;
  std::vector<client::ShardEndpoint> endpoints;
  for (int i = 0; i < 4; ++i) {
    servers.push_back(StartServer(LoopbackOptions()));
    ASSERT_NE(servers.back(), nullptr);
  }
  for (int i = 0; i < 3; ++i) {
    client::ChannelOptions channel;
    channel.target = servers[i]->address();
    endpoints.push_back({servers[i]->address(), *client::MakeChannel(channel), 0});
  }
  const v1::SessionConfig config = ShardedConfig();
  absl::StatusOr<client::ShardedSession> sharded =
      client::ShardedSession::Create(endpoints, config, "run", /*epoch=*/1);
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  absl::StatusOr<client::Session> single = ConnectTo(*servers[3]).CreateSession(config, "run");
  ASSERT_TRUE(single.ok()) << single.status();
  // Every instance got work; the batched tensor went out in slices.
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(ConnectTo(*servers[i]).ListSessions()->size(), 1u) << i;
  }
  int slices = 0;
  for (const auto& item : sharded->placement().items()) slices += item.tensor() == "experts";
  EXPECT_EQ(slices, 5);

  // The same starting parameters on both, then the same gradients.
  std::map<std::string, std::vector<float>> start;
  std::vector<client::NamedTensor> named;
  uint64_t seed = 1;
  for (const v1::TensorConfig& t : config.tensors()) {
    int64_t n = 1;
    for (int64_t d : t.shape()) n *= d;
    start[t.name()] = Values(n, seed++);
  }
  for (const auto& [name, values] : start) named.push_back({name, values});
  ASSERT_TRUE(sharded->UploadParameters(named).ok());
  ASSERT_TRUE(single->UploadParameters(named).ok());
  for (int64_t step = 1; step <= 5; ++step) {
    std::map<std::string, std::vector<float>> grads;
    std::vector<client::NamedTensor> g;
    for (const auto& [name, values] : start) {
      grads[name] =
          Gradient(static_cast<int64_t>(values.size()), name.size() * 31 + name[0], step, 0);
    }
    for (const auto& [name, values] : grads) g.push_back({name, values});
    absl::StatusOr<client::StepResult> a = sharded->Step(step, g);
    absl::StatusOr<client::StepResult> b = single->Step(step, g);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    for (const auto& [name, values] : b->values) {
      EXPECT_TRUE(BitwiseEqual(a->values.at(name), values)) << name << " at step " << step;
    }
  }
  absl::StatusOr<std::map<std::string, std::vector<float>>> got = sharded->GetParameters();
  absl::StatusOr<std::map<std::string, std::vector<float>>> want = single->GetParameters();
  ASSERT_TRUE(got.ok() && want.ok());
  for (const auto& [name, values] : *want) {
    EXPECT_TRUE(BitwiseEqual(got->at(name), values)) << name;
  }

  // A down instance: the step fails naming it, without waiting.
  servers[1].reset();
  std::vector<client::NamedTensor> g;
  for (const auto& [name, values] : start) g.push_back({name, values});
  client::StepOptions options;
  options.timeout = absl::Seconds(20);
  absl::StatusOr<client::StepResult> down = sharded->Step(6, g, options);
  EXPECT_EQ(down.status().code(), absl::StatusCode::kUnavailable) << down.status();
  EXPECT_THAT(std::string(down.status().message()), HasSubstr(endpoints[1].address));
}

TEST(ShardedSessionTest, AStalePlacementEpochIsRefused) {
  std::unique_ptr<server::Server> server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  v1::SessionConfig config = MakeConfig({{"m", "keller"}}, {{"w", {8, 8}, "m"}});
  config.set_placement_epoch(3);
  absl::StatusOr<client::Session> session = ConnectTo(*server).CreateSession(config);
  ASSERT_TRUE(session.ok());
  const std::vector<float> g = Values(64, 9);
  client::StepOptions options;
  options.placement_epoch = 2;
  absl::StatusOr<client::StepResult> stale = session->Step(1, {{"w", g}}, options);
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(stale.status().message()), HasSubstr("placed at epoch 3"));
  options.placement_epoch = 3;
  EXPECT_TRUE(session->Step(1, {{"w", g}}, options).ok());
  EXPECT_EQ((*session->Info()).step(), 1);
}

}  // namespace
}  // namespace optd::testing
