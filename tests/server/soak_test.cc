// The soak (issue 16): one optd as a child process, 4 sessions × world_size 4 = 16 concurrent
// workers with a checkpoint every step, and kill -9 plus a restart of the daemon at random
// moments throughout. Proves that no step acknowledged as durable (StepSummary.checkpoint_step at
// or past it) is lost by a restart, that no call fails with anything but what a restart causes,
// and that each session ends bit for bit equal to an in-process replay of the same gradients;
// reports the daemon's RSS. Not in ctest (it runs for minutes): bench/soak.sh runs it and writes
// bench/RESULTS.md. OPTD_SOAK_SECONDS and OPTD_SOAK_KILLS size it (default 60 s, 5 kills).
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "tests/server/daemon_process.h"
#include "tests/server/test_daemon.h"

namespace optd::testing {
namespace {

constexpr int kSessions = 4;
constexpr int kWorkers = 4;

int64_t EnvOr(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  int64_t parsed = 0;
  return value != nullptr && absl::SimpleAtoi(value, &parsed) ? parsed : fallback;
}

// VmRSS of `pid` in bytes; -1 once it is gone.
int64_t RssBytes(pid_t pid) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string key;
  int64_t kib = 0;
  while (status >> key) {
    if (key == "VmRSS:" && status >> kib) return kib << 10;
  }
  return -1;
}

// Least-squares slope of y over x.
double Slope(const std::vector<double>& x, const std::vector<double>& y) {
  const double n = static_cast<double>(x.size());
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    sx += x[i], sy += y[i], sxx += x[i] * x[i], sxy += x[i] * y[i];
  }
  const double d = n * sxx - sx * sx;
  return d == 0 ? 0 : (n * sxy - sx * sy) / d;
}

// Worker w's gradients for step `step` of session s: fixed, so a replay sees the same ones.
std::vector<std::vector<float>> SoakGradients(const Reference& reference, int s, int64_t step,
                                              int w) {
  std::vector<std::vector<float>> grads;
  for (int t = 0; t < reference.num_tensors(); ++t) {
    grads.push_back(Gradient(reference.count(t), static_cast<uint64_t>(100 * s + t), step, w));
  }
  return grads;
}

TEST(SoakTest, KillNineRestartsLoseNoAcknowledgedStep) {
  const int64_t seconds = EnvOr("OPTD_SOAK_SECONDS", 60);
  const int64_t kills = EnvOr("OPTD_SOAK_KILLS", 5);
  const std::string dir = MakeTempDir("soak");
  const int port = FreeLoopbackPort();
  const std::vector<std::string> flags = {
      absl::StrCat("--listen=127.0.0.1:", port), "--metrics_addr=", "--threads=1",
      absl::StrCat("--state_dir=", dir, "/state"), "--straggler_timeout_s=5"};
  auto start = [&] { return std::make_unique<DaemonProcess>(OPTD_PATH, dir + "/port", flags); };
  std::unique_ptr<DaemonProcess> daemon = start();
  ASSERT_NE(daemon->port(), 0);

  v1::SessionConfig config =
      MakeConfig({{"m", "keller"}, {"v", "adamw"}},
                 {{"w", {48, 32}, "m"}, {"u", {32, 48}, "m"}, {"b", {48}, "v"}}, kWorkers);
  config.set_checkpoint_interval(1);
  const Reference shapes(config);
  grpc::ChannelArguments arguments;
  arguments.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 50);
  arguments.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 250);
  auto connect = [&] {
    client::Client c(grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port),
                                               grpc::InsecureChannelCredentials(), arguments));
    c.set_timeout(absl::Seconds(20));
    return c;
  };
  std::vector<client::Session> sessions;
  for (int s = 0; s < kSessions; ++s) {
    absl::StatusOr<client::Session> created = connect().CreateSession(config, absl::StrCat("s", s));
    ASSERT_TRUE(created.ok()) << created.status();
    sessions.push_back(*created);
  }

  std::mutex mu;                               // guards the tallies below
  std::vector<int64_t> durable(kSessions, 0);  // highest step acknowledged as on disk
  std::map<std::string, int64_t> errors;       // by code: what restarts cause, and anything else
  int64_t acknowledged = 0;
  std::atomic<bool> stop{false};
  std::vector<std::thread> workers;
  for (int s = 0; s < kSessions; ++s) {
    for (int w = 0; w < kWorkers; ++w) {
      workers.emplace_back([&, s, w] {
        client::Client c = connect();
        client::Session session = c.OpenSession(sessions[s].id(), sessions[s].token());
        client::StepOptions options;
        options.worker_id = w;
        options.timeout = absl::Seconds(20);
        while (!stop.load()) {
          absl::StatusOr<v1::SessionInfo> info = session.Info();
          absl::StatusOr<client::StepResult> result =
              info.ok()
                  ? session.Step(info->step() + 1,
                                 AsNamed(shapes, SoakGradients(shapes, s, info->step() + 1, w)),
                                 options)
                  : info.status();
          {
            std::lock_guard<std::mutex> lock(mu);
            if (result.ok()) {
              ++acknowledged;
              durable[s] = std::max(durable[s], std::min(result->step, result->checkpoint_step));
              continue;
            }
            ++errors[absl::StatusCodeToString(result.status().code())];
          }
          absl::SleepFor(absl::Milliseconds(10));  // the daemon may be down: back off
        }
      });
    }
  }

  std::mt19937_64 rng(1);
  // The RSS every second; each daemon's slope over its life past its first 3 s, weighted by the
  // samples it has.
  std::vector<double> rss_mib;
  double slope_sum = 0, slope_weight = 0;
  int64_t lost = 0, restarts = 0;
  const absl::Time end = absl::Now() + absl::Seconds(seconds);
  const absl::Duration period = absl::Seconds(seconds) / (kills + 1);
  while (absl::Now() < end) {
    // Until a random moment in this period.
    const absl::Time born = absl::Now();
    const absl::Time death =
        std::min(end, born + period * std::uniform_real_distribution<double>(0.5, 1.5)(rng));
    std::vector<double> when, rss;
    while (absl::Now() < death) {
      absl::SleepFor(std::min(absl::Seconds(1), death - absl::Now()));
      const double mib = static_cast<double>(RssBytes(daemon->pid())) / (1 << 20);
      rss_mib.push_back(mib);
      if (absl::Now() - born < absl::Seconds(3)) continue;
      when.push_back(absl::ToDoubleSeconds(absl::Now() - born) / 60);
      rss.push_back(mib);
    }
    if (when.size() >= 3) {
      slope_sum += Slope(when, rss) * static_cast<double>(when.size());
      slope_weight += static_cast<double>(when.size());
    }
    if (absl::Now() >= end || restarts >= kills) continue;
    std::vector<int64_t> promised;
    {
      std::lock_guard<std::mutex> lock(mu);
      promised = durable;
    }
    daemon->Kill(SIGKILL);
    daemon = start();
    if (daemon->port() == 0) {
      stop = true;
      for (std::thread& t : workers) t.join();
      FAIL() << "the daemon did not come back";
    }
    ++restarts;
    client::Client c = connect();
    for (int s = 0; s < kSessions; ++s) {
      // Channels to one address share their connection, which may still be in its reconnect
      // backoff from the workers' attempts while the daemon was down.
      absl::StatusOr<v1::SessionInfo> info = absl::UnavailableError("not asked");
      for (int i = 0; i < 200 && absl::IsUnavailable(info.status()); ++i) {
        info = c.OpenSession(sessions[s].id(), sessions[s].token()).Info();
        if (absl::IsUnavailable(info.status())) absl::SleepFor(absl::Milliseconds(50));
      }
      if (!info.ok()) {
        stop = true;
        for (std::thread& t : workers) t.join();
        FAIL() << info.status();
      }
      if (info->step() < promised[s]) {
        ++lost;
        ADD_FAILURE() << "session " << s << " came back at step " << info->step() << " after step "
                      << promised[s] << " was acknowledged as durable";
      }
    }
  }
  stop = true;
  for (std::thread& t : workers) t.join();

  // Every session equals a replay of its steps in process, bit for bit.
  int64_t steps = 0;
  client::Client c = connect();
  for (int s = 0; s < kSessions; ++s) {
    client::Session session = c.OpenSession(sessions[s].id(), sessions[s].token());
    absl::StatusOr<v1::SessionInfo> info = session.Info();
    ASSERT_TRUE(info.ok()) << info.status();
    steps += info->step();
    Reference replay(config);
    for (int64_t step = 1; step <= info->step(); ++step) {
      std::vector<std::vector<std::vector<float>>> per_worker;
      for (int w = 0; w < kWorkers; ++w) per_worker.push_back(SoakGradients(replay, s, step, w));
      replay.Step(per_worker);
    }
    absl::StatusOr<std::map<std::string, std::vector<float>>> params = session.GetParameters();
    ASSERT_TRUE(params.ok()) << params.status();
    for (int t = 0; t < replay.num_tensors(); ++t) {
      EXPECT_TRUE(BitwiseEqual(params->at(replay.name(t)), replay.Parameters(t)))
          << "session " << s << " tensor " << replay.name(t) << " after " << info->step()
          << " steps";
    }
  }
  int64_t other_errors = 0;
  std::string error_list;
  for (const auto& [code, count] : errors) {
    absl::StrAppend(&error_list, error_list.empty() ? "" : ", ", code, " ", count);
    // What a killed daemon causes: calls refused or cut while it is down (UNAVAILABLE, and
    // CANCELLED or DEADLINE_EXCEEDED for streams it took down), a step whose other workers' calls
    // died with it (ABORTED at the straggler timeout), and a retry against a step the restart
    // rolled back or already completed (FAILED_PRECONDITION).
    if (code != "UNAVAILABLE" && code != "CANCELLED" && code != "DEADLINE_EXCEEDED" &&
        code != "ABORTED" && code != "FAILED_PRECONDITION") {
      other_errors += count;
    }
  }
  EXPECT_EQ(other_errors, 0) << error_list;
  EXPECT_EQ(lost, 0);
  const double slope = slope_weight > 0 ? slope_sum / slope_weight : 0;
  std::printf(
      "soak: %lld s, %lld kill -9 restarts, %d workers (%d sessions x world_size %d), "
      "checkpoint every step\n"
      "soak: %lld worker steps acknowledged, %lld session steps in all, %lld acknowledged durable "
      "steps lost, failed calls by code: %s\n"
      "soak: RSS %.1f to %.1f MiB over %zu samples (one a second); slope within a daemon's life "
      "(past its first 3 s) %.3f MiB per minute\n",
      static_cast<long long>(seconds), static_cast<long long>(restarts), kSessions * kWorkers,
      kSessions, kWorkers, static_cast<long long>(acknowledged), static_cast<long long>(steps),
      static_cast<long long>(lost), error_list.empty() ? "none" : error_list.c_str(),
      *std::min_element(rss_mib.begin(), rss_mib.end()),
      *std::max_element(rss_mib.begin(), rss_mib.end()), rss_mib.size(), slope);
}

}  // namespace
}  // namespace optd::testing
