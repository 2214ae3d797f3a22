// A sharded session over three in-process daemons against the same session on one: the same
// parameters bit for bit after several steps with several presets and a batched tensor split into
// slices; stale placement epochs refused; a down instance named in the step's error; resharding
// 3 -> 2 -> 3 instances through the shared state root, still bit for bit, and every way a
// restore_from can fail, each leaving the session it would replace as it was.
#include "client/sharded.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "tests/server/daemon_process.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {
namespace {

using ::testing::AnyOf;
using ::testing::HasSubstr;
using ::testing::Not;

v1::SessionConfig ShardedConfig() {
  v1::SessionConfig config;
  for (const auto& [name, preset] : std::vector<std::pair<std::string, std::string>>{
           {"muon", "keller"}, {"eq", "muoneq_rowcol"}, {"rmnp", "rmnp"}, {"vectors", "adamw"}}) {
    v1::GroupConfig* g = config.add_groups();
    g->set_name(name);
    g->set_preset(preset);
    // Steps and direction chosen per matrix, every other step: a batched tensor's slices on
    // different instances choose as the whole does on one.
    if (name == "muon") AddOverrides(*g, AutoModes(2));
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
  // The auto modes chose something other than their start (5 steps, Newton–Schulz) somewhere,
  // and GetAnalysis reports each muon tensor's choices, one per matrix.
  absl::StatusOr<v1::GetAnalysisResponse> analysis = single->Analysis();
  ASSERT_TRUE(analysis.ok()) << analysis.status();
  ASSERT_EQ(analysis->choices_size(), 3);
  int changed = 0;
  for (const v1::TensorChoices& c : analysis->choices()) {
    EXPECT_EQ(c.choices().decided_at_step(), 4) << c.tensor();
    EXPECT_EQ(c.choices().newton_schulz_steps_size(), c.tensor() == "experts" ? 5 : 1);
    for (int i = 0; i < c.choices().newton_schulz_steps_size(); ++i) {
      changed += c.choices().newton_schulz_steps(i) != 5 || c.choices().row_normalize(i);
    }
  }
  EXPECT_GT(changed, 0);

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

// Three daemons sharing one state root (each one's state directory is its directory there).
struct SharedCluster {
  explicit SharedCluster(int n) : root(MakeTempDir("shared")) {
    for (int i = 0; i < n; ++i) {
      server::ServerOptions options = LoopbackOptions(absl::StrCat(root, "/i", i));
      options.sessions.shared_state_root = root;
      options.sessions.instance_name = absl::StrCat("i", i);
      servers.push_back(StartServer(options));
      client::ChannelOptions channel;
      channel.target = servers.back()->address();
      endpoints.push_back({servers.back()->address(), *client::MakeChannel(channel), 0});
    }
  }
  std::vector<client::ShardEndpoint> Endpoints(std::vector<int> which) const {
    std::vector<client::ShardEndpoint> out;
    for (int i : which) out.push_back(endpoints[i]);
    return out;
  }
  std::string root;
  std::vector<std::unique_ptr<server::Server>> servers;
  std::vector<client::ShardEndpoint> endpoints;
};

// Steps `sharded` and `single` through steps [first, last] with the same gradients and expects
// the same results bit for bit.
void StepBoth(client::ShardedSession& sharded, client::Session& single,
              const v1::SessionConfig& config, int64_t first, int64_t last) {
  for (int64_t step = first; step <= last; ++step) {
    std::map<std::string, std::vector<float>> grads;
    for (const v1::TensorConfig& t : config.tensors()) {
      int64_t n = 1;
      for (int64_t d : t.shape()) n *= d;
      grads[t.name()] = Gradient(n, t.name().size() * 31 + t.name()[0], step, 0);
    }
    std::vector<client::NamedTensor> g;
    for (const auto& [name, values] : grads) g.push_back({name, values});
    absl::StatusOr<client::StepResult> a = sharded.Step(step, g);
    absl::StatusOr<client::StepResult> b = single.Step(step, g);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    for (const auto& [name, values] : b->values) {
      EXPECT_TRUE(BitwiseEqual(a->values.at(name), values)) << name << " at step " << step;
    }
  }
}

TEST(ShardedSessionTest, ReshardsThreeToTwoAndBackBitForBit) {
  SharedCluster cluster(3);
  std::unique_ptr<server::Server> reference = StartServer(LoopbackOptions());
  v1::SessionConfig config = ShardedConfig();
  config.set_checkpoint_interval(2);
  absl::StatusOr<client::ShardedSession> three =
      client::ShardedSession::Create(cluster.Endpoints({0, 1, 2}), config, "run", 1);
  ASSERT_TRUE(three.ok()) << three.status();
  absl::StatusOr<client::Session> single = ConnectTo(*reference).CreateSession(config, "run");
  ASSERT_TRUE(single.ok());
  ASSERT_TRUE(single
                  ->UpdateHyperparams({[] {
                    v1::HyperparamUpdate u;
                    u.set_group("muon");
                    u.set_lr(0.013);
                    return u;
                  }()})
                  .ok());
  for (const auto& [address, part] : three->parts()) {
    client::Session session = part;
    if (!session.Info()->config().groups().empty()) {
      v1::HyperparamUpdate u;
      u.set_group("muon");
      u.set_lr(0.013);
      ASSERT_TRUE(session.UpdateHyperparams({u}).ok());
    }
  }
  StepBoth(*three, *single, config, 1, 3);

  absl::StatusOr<client::ShardedSession> two = three->Reshard(cluster.Endpoints({0, 1}), 2);
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_EQ(two->placement().epoch(), 2);
  // The instance that owns nothing any more gave its part up.
  EXPECT_TRUE(ConnectTo(*cluster.servers[2]).ListSessions()->empty());
  for (const auto& [address, part] : two->parts()) {
    client::Session session = part;
    absl::StatusOr<v1::SessionInfo> info = session.Info();
    ASSERT_TRUE(info.ok());
    EXPECT_EQ(info->step(), 3);
    EXPECT_EQ(info->config().placement_epoch(), 2);
    for (const v1::TensorInfo& t : info->tensors()) {
      if (t.config().group() == "muon") {
        EXPECT_EQ(t.lr(), 0.013) << t.config().name();
      }
    }
  }
  StepBoth(*two, *single, config, 4, 6);

  absl::StatusOr<client::ShardedSession> again = two->Reshard(cluster.Endpoints({2, 0, 1}), 3);
  ASSERT_TRUE(again.ok()) << again.status();
  StepBoth(*again, *single, config, 7, 8);
  absl::StatusOr<std::map<std::string, std::vector<float>>> got = again->GetParameters();
  absl::StatusOr<std::map<std::string, std::vector<float>>> want = single->GetParameters();
  ASSERT_TRUE(got.ok() && want.ok());
  for (const auto& [name, values] : *want) {
    EXPECT_TRUE(BitwiseEqual(got->at(name), values)) << name;
  }
}

TEST(ShardedSessionTest, RestoreFromRefusesWhatDoesNotFitAndChangesNothing) {
  SharedCluster cluster(2);
  const v1::SessionConfig base =
      MakeConfig({{"m", "keller"}, {"v", "adamw"}}, {{"w", {8, 6}, "m"}, {"b", {6}, "v"}});
  // A's part: session "src" at epoch 1, step 2, checkpointed into the shared root.
  v1::SessionConfig placed = base;
  placed.set_placement_epoch(1);
  absl::StatusOr<client::Session> src = ConnectTo(*cluster.servers[0]).CreateSession(placed, "src");
  ASSERT_TRUE(src.ok());
  const std::vector<float> gw = Values(48, 3), gb = Values(6, 4);
  client::StepOptions at1;
  at1.placement_epoch = 1;
  ASSERT_TRUE(src->Step(1, {{"w", gw}, {"b", gb}}, at1).ok());
  ASSERT_TRUE(src->Step(2, {{"w", gw}, {"b", gb}}, at1).ok());
  ASSERT_TRUE(src->Checkpoint(/*shared=*/true).ok());
  // B holds "dst" (the session a restore would replace) at step 1.
  absl::StatusOr<client::Session> dst = ConnectTo(*cluster.servers[1]).CreateSession(placed, "dst");
  ASSERT_TRUE(dst.ok());
  ASSERT_TRUE(dst->Step(1, {{"w", gw}, {"b", gb}}, at1).ok());
  const std::map<std::string, std::vector<float>> before = *dst->GetParameters();

  // A CreateSession that would replace "dst" at epoch 2; each case adds its sources.
  auto replace_dst = [&] {
    v1::CreateSessionRequest request;
    request.set_session_id("dst");
    *request.mutable_config() = base;
    request.mutable_config()->set_placement_epoch(2);
    request.set_replace(true);
    return request;
  };
  struct Case {
    std::string what;
    std::function<void(v1::CreateSessionRequest&)> change;
    absl::StatusCode code;
    std::string message;
  };
  auto source = [&](v1::CreateSessionRequest& r, const std::string& instance,
                    const std::string& session) {
    v1::CheckpointSource* s = r.add_restore_from();
    s->set_instance(instance);
    s->set_session_id(session);
    s->set_token(session == "dst" ? dst->token() : src->token());
  };
  std::vector<Case> cases = {
      {"bad instance name", [&](auto& r) { source(r, "..", "src"); },
       absl::StatusCode::kInvalidArgument, "instance '..'"},
      // Without the admin token a missing source answers as one the token does not open.
      {"missing source", [&](auto& r) { source(r, "i7", "src"); },
       absl::StatusCode::kPermissionDenied, "instance 'i7' session 'src'"},
      // Issue 16: restore_from copied any session without its token.
      {"no token",
       [&](auto& r) {
         source(r, "i0", "src");
         r.mutable_restore_from(0)->clear_token();
       },
       absl::StatusCode::kPermissionDenied, "an empty token"},
      {"another session's token",
       [&](auto& r) {
         source(r, "i0", "src");
         r.mutable_restore_from(0)->set_token(dst->token());
       },
       absl::StatusCode::kPermissionDenied, "the token given with it"},
      {"the right token for one source, not the other",
       [&](auto& r) {
         source(r, "i0", "src");
         source(r, "i0", "src");
         r.mutable_restore_from(1)->set_token("guess");
       },
       absl::StatusCode::kPermissionDenied, "instance 'i0' session 'src'"},
      {"epoch not later",
       [&](auto& r) {
         source(r, "i0", "src");
         r.mutable_config()->set_placement_epoch(1);
       },
       absl::StatusCode::kFailedPrecondition, "later placement epoch"},
      {"tensor missing",
       [&](auto& r) {
         source(r, "i0", "src");
         r.mutable_config()->mutable_tensors(0)->set_name("w2");
       },
       absl::StatusCode::kFailedPrecondition, "tensor 'w2' is in none"},
      {"shape",
       [&](auto& r) {
         source(r, "i0", "src");
         r.mutable_config()->mutable_tensors(0)->set_shape(1, 8);
         r.mutable_config()->mutable_tensors(0)->set_shape(0, 6);
       },
       absl::StatusCode::kFailedPrecondition, "shape 8x6 there, 6x8 here"},
      {"preset",
       [&](auto& r) {
         source(r, "i0", "src");
         r.mutable_config()->mutable_groups(0)->set_preset("normuon");
       },
       absl::StatusCode::kFailedPrecondition, "preset 'keller' there, 'normuon' here"},
      {"two sources hold a tensor",
       [&](auto& r) {
         source(r, "i0", "src");
         source(r, "i0", "src");
       },
       absl::StatusCode::kFailedPrecondition, "is in both"},
  };
  for (Case& c : cases) {
    v1::CreateSessionRequest request = replace_dst();
    c.change(request);
    absl::StatusOr<client::Session> created =
        ConnectTo(*cluster.servers[1]).CreateSession(request, dst->token());
    EXPECT_EQ(created.status().code(), c.code) << c.what << ": " << created.status();
    EXPECT_THAT(std::string(created.status().message()), HasSubstr(c.message)) << c.what;
    if (c.code == absl::StatusCode::kPermissionDenied) {
      // Nothing of the source is described to a caller who may not read it.
      EXPECT_THAT(std::string(created.status().message()),
                  Not(AnyOf(HasSubstr("'w'"), HasSubstr("keller"), HasSubstr("step"))))
          << c.what;
    }
  }
  // Sources at different steps: B's own "dst" (step 1) beside A's "src" (step 2).
  ASSERT_TRUE(dst->Checkpoint(/*shared=*/true).ok());
  {
    v1::CreateSessionRequest request = replace_dst();
    source(request, "i0", "src");
    source(request, "i1", "dst");
    absl::StatusOr<client::Session> created =
        ConnectTo(*cluster.servers[1]).CreateSession(request, dst->token());
    EXPECT_EQ(created.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(created.status().message()), HasSubstr("at step 1"));
  }
  // Replacing without the session's token (no admin token configured): refused.
  {
    v1::CreateSessionRequest request = replace_dst();
    source(request, "i0", "src");
    absl::StatusOr<client::Session> created =
        ConnectTo(*cluster.servers[1]).CreateSession(request, "");
    EXPECT_EQ(created.status().code(), absl::StatusCode::kUnauthenticated) << created.status();
  }
  // A daemon without a shared root refuses restore_from and shared checkpoints.
  {
    std::unique_ptr<server::Server> plain = StartServer(LoopbackOptions());
    v1::CreateSessionRequest request;
    *request.mutable_config() = base;
    source(request, "i0", "src");
    absl::StatusOr<client::Session> created = ConnectTo(*plain).CreateSession(request);
    EXPECT_EQ(created.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(created.status().message()), HasSubstr("--shared_state_root"));
    absl::StatusOr<client::Session> s = ConnectTo(*plain).CreateSession(base);
    ASSERT_TRUE(s.ok());
    EXPECT_EQ(s->Checkpoint(/*shared=*/true).status().code(),
              absl::StatusCode::kFailedPrecondition);
  }
  // Nothing changed: "dst" is still at step 1 with its parameters, and steps on with its token.
  absl::StatusOr<v1::SessionInfo> info = dst->Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->step(), 1);
  EXPECT_EQ(info->config().placement_epoch(), 1);
  const std::map<std::string, std::vector<float>> after = *dst->GetParameters();
  for (const auto& [name, values] : before) EXPECT_TRUE(BitwiseEqual(after.at(name), values));
  EXPECT_TRUE(dst->Step(2, {{"w", gw}, {"b", gb}}, at1).ok());

  // And a restore that fits replaces it: A's state at step 2, the old token no longer valid.
  v1::CreateSessionRequest request = replace_dst();
  source(request, "i0", "src");
  absl::StatusOr<client::Session> moved =
      ConnectTo(*cluster.servers[1]).CreateSession(request, dst->token());
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_EQ(moved->Info()->step(), 2);
  EXPECT_EQ(dst->Info().status().code(), absl::StatusCode::kUnauthenticated);
  const std::map<std::string, std::vector<float>> a = *src->GetParameters();
  const std::map<std::string, std::vector<float>> b = *moved->GetParameters();
  for (const auto& [name, values] : a) EXPECT_TRUE(BitwiseEqual(b.at(name), values)) << name;
  client::StepOptions at2;
  at2.placement_epoch = 2;
  absl::StatusOr<client::StepResult> x = src->Step(3, {{"w", gw}, {"b", gb}}, at1);
  absl::StatusOr<client::StepResult> y = moved->Step(3, {{"w", gw}, {"b", gb}}, at2);
  ASSERT_TRUE(x.ok() && y.ok());
  for (const auto& [name, values] : x->values)
    EXPECT_TRUE(BitwiseEqual(y->values.at(name), values));
}

// Three optd processes on loopback ports sharing a state root, each checkpointing every step.
class Cluster {
 public:
  Cluster() : root_(MakeTempDir("cluster")) {
    while (ports_.size() < 3) {
      const int port = FreeLoopbackPort();
      if (std::find(ports_.begin(), ports_.end(), port) == ports_.end()) ports_.push_back(port);
    }
    for (int i = 0; i < 3; ++i) {
      daemons_.emplace_back();
      Start(i);
      grpc::ChannelArguments args;  // reconnect soon after a restart
      args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
      args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
      args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 300);
      const std::string address = absl::StrCat("127.0.0.1:", ports_[i]);
      endpoints_.push_back(
          {address, grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args),
           0});
    }
  }
  void Start(int i) {
    daemons_[i] = std::make_unique<DaemonProcess>(
        OPTD_PATH, absl::StrCat(root_, "/i", i, ".port"),
        std::vector<std::string>{
            absl::StrCat("--listen=127.0.0.1:", ports_[i]), "--metrics_addr=", "--threads=1",
            absl::StrCat("--state_dir=", root_, "/i", i),
            absl::StrCat("--shared_state_root=", root_), absl::StrCat("--instance_name=i", i)});
  }
  void Kill(int i) { EXPECT_EQ(daemons_[i]->Kill(SIGKILL), -SIGKILL); }
  std::vector<client::ShardEndpoint> Endpoints(std::vector<int> which) const {
    std::vector<client::ShardEndpoint> out;
    for (int i : which) out.push_back(endpoints_[i]);
    return out;
  }
  const std::string& address(int i) const { return endpoints_[i].address; }

 private:
  std::string root_;
  std::vector<int> ports_;
  std::vector<std::unique_ptr<DaemonProcess>> daemons_;
  std::vector<client::ShardEndpoint> endpoints_;
};

// Gradients of logical step `step`, the same for every run.
std::map<std::string, std::vector<float>> StepGradients(const v1::SessionConfig& config,
                                                        int64_t step) {
  std::map<std::string, std::vector<float>> grads;
  for (const v1::TensorConfig& t : config.tensors()) {
    int64_t n = 1;
    for (int64_t d : t.shape()) n *= d;
    grads[t.name()] = Gradient(n, t.name().size() * 31 + t.name()[0], step, 0);
  }
  return grads;
}

std::vector<client::NamedTensor> Named(const std::map<std::string, std::vector<float>>& values) {
  std::vector<client::NamedTensor> out;
  for (const auto& [name, v] : values) out.push_back({name, v});
  return out;
}

// Steps `sharded` through `step`, retrying while an instance is away (each error must name the
// instance `away`), for at most 30 s; the result or the last error.
absl::StatusOr<client::StepResult> StepThroughRestarts(client::ShardedSession& sharded,
                                                       const v1::SessionConfig& config,
                                                       int64_t step, const std::string& away,
                                                       int* failures) {
  const auto grads = StepGradients(config, step);
  client::StepOptions options;
  options.timeout = absl::Seconds(20);
  absl::StatusOr<client::StepResult> result;
  for (const absl::Time end = absl::Now() + absl::Seconds(30); absl::Now() < end;) {
    result = sharded.Step(step, Named(grads), options);
    if (result.ok()) return result;
    ++*failures;
    EXPECT_NE(result.status().code(), absl::StatusCode::kDeadlineExceeded) << result.status();
    EXPECT_THAT(std::string(result.status().message()), HasSubstr(away)) << result.status();
    absl::SleepFor(absl::Milliseconds(50));
  }
  return result;
}

void ExpectSameResult(const absl::StatusOr<client::StepResult>& got,
                      const absl::StatusOr<client::StepResult>& want, int64_t step) {
  ASSERT_TRUE(got.ok()) << "step " << step << ": " << got.status();
  ASSERT_TRUE(want.ok()) << "step " << step << ": " << want.status();
  for (const auto& [name, values] : want->values) {
    EXPECT_TRUE(BitwiseEqual(got->values.at(name), values)) << name << " at step " << step;
  }
}

TEST(ShardedClusterTest, ThreeProcessesMatchOneThroughKillsRestartsAndAReshardToTwo) {
  Cluster cluster;
  DaemonProcess one(OPTD_PATH, absl::StrCat(MakeTempDir("one"), "/port"),
                    {"--listen=127.0.0.1:0", "--metrics_addr=", "--threads=1"});
  v1::SessionConfig config = ShardedConfig();
  v1::GroupConfig* normuon = config.add_groups();
  normuon->set_name("normuon");
  normuon->set_preset("normuon");
  v1::TensorConfig* w4 = config.add_tensors();
  w4->set_name("w4");
  w4->add_shape(56);
  w4->add_shape(32);
  w4->set_group("normuon");
  config.set_checkpoint_interval(1);  // every acknowledged step survives a kill
  absl::StatusOr<client::ShardedSession> sharded =
      client::ShardedSession::Create(cluster.Endpoints({0, 1, 2}), config, "run", 1);
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  EXPECT_EQ(sharded->parts().size(), 3u);
  absl::StatusOr<client::Session> single = one.Connect().CreateSession(config, "run");
  ASSERT_TRUE(single.ok()) << single.status();
  auto reference = [&](int64_t step) {
    return single->Step(step, Named(StepGradients(config, step)));
  };
  int failures = 0;
  for (int64_t step = 1; step <= 3; ++step) {
    ExpectSameResult(StepThroughRestarts(*sharded, config, step, "-", &failures), reference(step),
                     step);
  }
  ASSERT_EQ(failures, 0);

  // Instance 1 is killed between steps: step 4 fails at once, naming it; its peers complete the
  // step. Restarted from its checkpoint (step 3), it takes the retry while its peers replay.
  cluster.Kill(1);
  client::StepOptions options;
  options.timeout = absl::Seconds(20);
  const absl::Time start = absl::Now();
  absl::StatusOr<client::StepResult> down =
      sharded->Step(4, Named(StepGradients(config, 4)), options);
  EXPECT_EQ(down.status().code(), absl::StatusCode::kUnavailable) << down.status();
  EXPECT_THAT(std::string(down.status().message()), HasSubstr(cluster.address(1)));
  EXPECT_LT(absl::Now() - start, absl::Seconds(10)) << "a step to a dead instance waited";
  cluster.Start(1);
  ExpectSameResult(StepThroughRestarts(*sharded, config, 4, cluster.address(1), &failures),
                   reference(4), 4);

  // Instance 0 completes step 5 and goes down before the client hears of it: after its restart
  // the retry finds it at step 5 and takes its parameters as its part of the result.
  ExpectSameResult(StepThroughRestarts(*sharded, config, 5, "-", &failures), reference(5), 5);
  cluster.Kill(0);
  cluster.Start(0);
  ExpectSameResult(StepThroughRestarts(*sharded, config, 5, cluster.address(0), &failures),
                   reference(5), 5);

  // Instance 2 is killed at a random moment of a run of steps and restarted at once.
  // Steps go on until it is back, and at least to step 12.
  std::mt19937 random(absl::ToUnixNanos(absl::Now()));
  std::atomic<bool> restarted{false};
  std::thread killer([&] {
    absl::SleepFor(absl::Milliseconds(std::uniform_int_distribution<int>(0, 60)(random)));
    cluster.Kill(2);
    cluster.Start(2);
    restarted = true;
  });
  int64_t step = 6;
  for (; step <= 12 || !restarted.load(); ++step) {
    ExpectSameResult(StepThroughRestarts(*sharded, config, step, cluster.address(2), &failures),
                     reference(step), step);
  }
  killer.join();
  ExpectSameResult(StepThroughRestarts(*sharded, config, step, cluster.address(2), &failures),
                   reference(step), step);
  std::printf("steps 6..%lld ran through a kill of instance 2; %d step calls failed in all\n",
              static_cast<long long>(step), failures);

  // A checkpoint on 3 restored on 2: every part checkpoints into the shared root, the whole
  // cluster goes down, and two instances come back to hold the session at the next epoch.
  absl::StatusOr<int64_t> checkpointed = sharded->Checkpoint(/*shared=*/true);
  ASSERT_TRUE(checkpointed.ok()) << checkpointed.status();
  EXPECT_EQ(*checkpointed, step);
  client::ShardRestore restore;
  restore.instances = {"i0", "i1", "i2"};
  for (const auto& [address, part] : sharded->parts()) {
    restore.tokens[address] = part.token();
    for (int i = 0; i < 3; ++i) {
      if (cluster.address(i) == address) restore.source_tokens[absl::StrCat("i", i)] = part.token();
    }
  }
  for (int i = 0; i < 3; ++i) cluster.Kill(i);
  cluster.Start(0);
  cluster.Start(1);
  absl::StatusOr<client::ShardedSession> two =
      client::ShardedSession::Create(cluster.Endpoints({0, 1}), config, "run", 2, "", &restore);
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_EQ(two->parts().size(), 2u);
  for (int64_t next = step + 1; next <= step + 3; ++next) {
    ExpectSameResult(StepThroughRestarts(*two, config, next, "-", &failures), reference(next),
                     next);
  }
  absl::StatusOr<std::map<std::string, std::vector<float>>> got = two->GetParameters();
  absl::StatusOr<std::map<std::string, std::vector<float>>> want = single->GetParameters();
  ASSERT_TRUE(got.ok() && want.ok());
  for (const auto& [name, values] : *want) {
    EXPECT_TRUE(BitwiseEqual(got->at(name), values)) << name;
  }
}

}  // namespace
}  // namespace optd::testing
