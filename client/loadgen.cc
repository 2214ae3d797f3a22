#include "client/loadgen.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/cleanup/cleanup.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "client/metrics_scrape.h"
#include "client/sharded.h"
#include "common/status_macros.h"

namespace optd::loadgen {
namespace {

// Counters of what the workers did; latencies of measured steps.
struct Tally {
  std::atomic<int64_t> steps{0}, errors{0}, bytes_sent{0}, bytes_received{0};
  std::atomic<int64_t> total_steps{0}, total_errors{0}, total_bytes_sent{0},
      total_bytes_received{0};
  absl::Mutex mu;
  std::vector<double> latencies ABSL_GUARDED_BY(mu);
  std::map<std::string, int64_t> errors_by_code ABSL_GUARDED_BY(mu);
};

// Intended starts of the open loop, handed to whichever session is free first.
class Schedule {
 public:
  // Blocks until the next intended start is due (closed loop: now) or the level stops; false
  // then.
  bool Next(absl::Time* intended) {
    absl::MutexLock lock(&mu_);
    auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return stopped_ || !open_ || !due_.empty();
    };
    mu_.Await(absl::Condition(&ready));
    if (stopped_) return false;
    if (!open_) {
      *intended = absl::Now();
      return true;
    }
    *intended = due_.front();
    due_.pop_front();
    return true;
  }
  void SetOpen() {
    absl::MutexLock lock(&mu_);
    open_ = true;
  }
  void Push(absl::Time t) {
    absl::MutexLock lock(&mu_);
    due_.push_back(t);
  }
  void Stop() {
    absl::MutexLock lock(&mu_);
    stopped_ = true;
  }
  // Intended starts no session has taken.
  int64_t waiting() {
    absl::MutexLock lock(&mu_);
    return static_cast<int64_t>(due_.size());
  }

 private:
  absl::Mutex mu_;
  std::deque<absl::Time> due_ ABSL_GUARDED_BY(mu_);
  bool open_ ABSL_GUARDED_BY(mu_) = false;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
};

// One session's workers: worker 0 takes the next intended start and publishes the step; the
// others follow, so every worker sends the same step, and worker 0 waits for all of them.
class SessionRun {
 public:
  SessionRun(client::Session session, int world_size)
      : session_(std::move(session)), world_size_(world_size) {}

  // Its measured steps' latencies (for the per-session figures).
  void AddLatency(double seconds) {
    absl::MutexLock lock(&latencies_mu_);
    latencies_.push_back(seconds);
  }
  std::vector<double> TakeLatencies() {
    absl::MutexLock lock(&latencies_mu_);
    return std::move(latencies_);
  }
  // A session spread over every endpoint (--sharded).
  SessionRun(client::ShardedSession sharded, int world_size)
      : sharded_(std::make_unique<client::ShardedSession>(std::move(sharded))),
        world_size_(world_size) {}

  absl::StatusOr<client::StepResult> Step(int64_t step, absl::Span<const client::NamedTensor> g,
                                          const client::StepOptions& options) {
    return sharded_ != nullptr ? sharded_->Step(step, g, options)
                               : session_->Step(step, g, options);
  }
  // Where the session stands: the step every part has completed.
  absl::StatusOr<int64_t> CompletedStep() {
    if (sharded_ == nullptr) {
      OPTD_ASSIGN_OR_RETURN(v1::SessionInfo info, session_->Info());
      return info.step();
    }
    int64_t step = std::numeric_limits<int64_t>::max();
    for (auto& [address, part] : sharded_->parts()) {
      absl::StatusOr<v1::SessionInfo> info = part.Info();
      if (!info.ok()) {
        return absl::Status(info.status().code(),
                            absl::StrCat("instance ", address, ": ", info.status().message()));
      }
      step = std::min(step, info->step());
    }
    return step;
  }
  void Delete(client::Client& client) {
    if (sharded_ != nullptr) {
      sharded_->Delete().IgnoreError();
    } else {
      client.DeleteSession(session_->id(), session_->token()).IgnoreError();
    }
  }

  int64_t next_step() {
    absl::MutexLock lock(&mu_);
    return next_step_;
  }
  void set_next_step(int64_t step) {
    absl::MutexLock lock(&mu_);
    next_step_ = step;
  }
  int64_t completed() {
    absl::MutexLock lock(&mu_);
    return completed_;
  }
  // Worker 0: the step every worker sends next, or the end (go false).
  void Publish(bool go, int64_t step, absl::Time intended) {
    absl::MutexLock lock(&mu_);
    go_ = go;
    step_ = step;
    intended_ = intended;
    ++generation_;
  }
  // Workers 1..: the step published after generation `*seen`; false at the end.
  bool Await(int64_t* seen, int64_t* step, absl::Time* intended) {
    absl::MutexLock lock(&mu_);
    const int64_t after = *seen;
    auto published = [this, after]()
                         ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return generation_ > after; };
    mu_.Await(absl::Condition(&published));
    *seen = generation_;
    *step = step_;
    *intended = intended_;
    return go_;
  }
  // Every worker after its step, saying whether it failed.
  void Done(bool failed) {
    absl::MutexLock lock(&mu_);
    failed_ = failed_ || failed;
    if (++done_ == world_size_) {
      done_ = 0;
      next_step_ = step_ + 1;
      ++completed_;
    }
  }
  // Worker 0: until every worker has finished the step published after `completed_before`;
  // true when one of them failed (the caller then asks the daemon where the session stands).
  bool AwaitAll(int64_t completed_before) {
    absl::MutexLock lock(&mu_);
    auto finished = [this, completed_before]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return completed_ > completed_before;
    };
    mu_.Await(absl::Condition(&finished));
    const bool failed = failed_;
    failed_ = false;
    return failed;
  }

 private:
  absl::Mutex latencies_mu_;
  std::vector<double> latencies_ ABSL_GUARDED_BY(latencies_mu_);
  std::optional<client::Session> session_;
  std::unique_ptr<client::ShardedSession> sharded_;
  const int world_size_;
  absl::Mutex mu_;
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool go_ ABSL_GUARDED_BY(mu_) = true;
  int64_t step_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time intended_ ABSL_GUARDED_BY(mu_);
  int64_t next_step_ ABSL_GUARDED_BY(mu_) = 1;
  bool failed_ ABSL_GUARDED_BY(mu_) = false;
  int done_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t completed_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace

absl::StatusOr<std::vector<int>> ParseSweep(const std::string& spec) {
  const std::vector<std::string> parts = absl::StrSplit(spec, ':');
  auto bad = [&spec] {
    return absl::InvalidArgumentError(absl::StrCat(
        "concurrency '", spec, "': expected N, or FIRST:LAST:xFACTOR / FIRST:LAST:+STEP, with ",
        "1 <= FIRST <= LAST <= ", kMaxConcurrency, " and at most ", kMaxLevels, " levels"));
  };
  int64_t first = 0, last = 0, by = 0;
  if (!absl::SimpleAtoi(parts[0], &first) || first < 1 || first > kMaxConcurrency) return bad();
  if (parts.size() == 1) return std::vector<int>{static_cast<int>(first)};
  if (parts.size() != 3 || !absl::SimpleAtoi(parts[1], &last) || last < first ||
      last > kMaxConcurrency || parts[2].size() < 2 || !absl::SimpleAtoi(parts[2].substr(1), &by) ||
      (parts[2][0] != 'x' && parts[2][0] != '+') || by < (parts[2][0] == 'x' ? 2 : 1)) {
    return bad();
  }
  std::vector<int> levels;
  for (int64_t c = first; c <= last; c = parts[2][0] == 'x' ? c * by : c + by) {
    if (static_cast<int>(levels.size()) == kMaxLevels) return bad();
    levels.push_back(static_cast<int>(c));
  }
  return levels;
}

bool WindowsAgree(const std::vector<double>& rates, int count, double tolerance) {
  if (count < 1 || static_cast<int>(rates.size()) < count) return false;
  double mean = 0;
  for (size_t i = rates.size() - count; i < rates.size(); ++i) mean += rates[i] / count;
  if (mean <= 0) return false;
  for (size_t i = rates.size() - count; i < rates.size(); ++i) {
    if (std::fabs(rates[i] - mean) > tolerance * mean) return false;
  }
  return true;
}

double Quantile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  const size_t rank = static_cast<size_t>(std::ceil(q * sorted.size()));
  return sorted[std::min(sorted.size() - 1, rank == 0 ? 0 : rank - 1)];
}

namespace {

// Samples of the daemons' expositions, summed over the endpoints.
using Counters = std::map<std::string, double>;

// One level of RunLevel, phase by phase: Create (clients, sessions, gradients), WarmUp, Measure
// (workers, arrivals, windows) and Summarize. The sessions are deleted when it goes, however the
// level ends.
class LevelRun {
 public:
  explicit LevelRun(const Options& options) : options_(options) {
    if (options_.arrival != Arrival::kClosed) schedule_.SetOpen();
  }
  ~LevelRun() {
    for (size_t i = 0; i < sessions_.size(); ++i) {
      sessions_[i]->Delete(clients_[i % clients_.size()]);
    }
  }

  absl::Status Create();
  absl::Status WarmUp();
  absl::StatusOr<v1::LoadgenLevel> Measure();

 private:
  bool interrupted() const { return options_.interrupt != nullptr && options_.interrupt->load(); }
  v1::SessionConfig Config() const;
  // One worker's step: the call, its accounting, and (every N-th) an injected bad request first.
  // Refusals before the daemon counted the gradients (a full queue, a stream limit) are retried
  // with backoff until the step's deadline, so the worker's partners are not left waiting for
  // it. Returns false when the step failed.
  bool RunStep(SessionRun& run, int worker, int64_t step, absl::Time intended,
               std::vector<float>& out);
  void CountError(const absl::Status& status);
  // Worker `w` of `run` through the measurement: worker 0 takes the intended starts and publishes
  // each step, the others follow it.
  void Work(SessionRun& run, int w);
  // The open loop's intended starts from `start` on, at the rate, until the level stops.
  void Arrive(absl::Time start);
  // The daemons' counters (--metrics), summed over the endpoints.
  absl::StatusOr<std::map<std::string, double>> ScrapeAll() const;
  v1::LoadgenLevel Summarize(absl::Duration measured, const std::vector<double>& rates, bool stable,
                             int64_t unstarted, const std::map<std::string, double>& before,
                             const std::map<std::string, double>& after);

  const Options& options_;
  std::vector<TensorShape> shapes_;
  std::vector<client::Client> clients_;
  std::vector<std::unique_ptr<SessionRun>> sessions_;
  // Gradients (never zero: zeros can run faster than real data), shared by every worker.
  std::vector<std::vector<float>> gradients_;
  std::vector<client::NamedTensor> named_;
  int64_t elements_ = 0;
  int64_t sent_per_step_ = 0, received_per_step_ = 0;
  Tally tally_;
  std::atomic<bool> measuring_{false};
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> intended_starts_{0};
  Schedule schedule_;
};

v1::SessionConfig LevelRun::Config() const {
  v1::SessionConfig config;
  for (const auto& [name, preset] : std::vector<std::pair<std::string, std::string>>{
           {"matrices", options_.preset}, {"vectors", "adamw"}}) {
    v1::GroupConfig* g = config.add_groups();
    g->set_name(name);
    g->set_preset(preset);
  }
  for (const TensorShape& t : shapes_) {
    v1::TensorConfig* tc = config.add_tensors();
    tc->set_name(t.name);
    for (int64_t d : t.shape) tc->add_shape(d);
    tc->set_group(t.adamw ? "vectors" : "matrices");
    tc->mutable_normal()->set_std(0.02);
    tc->mutable_normal()->set_seed(tc->name().size());
  }
  config.set_world_size(options_.world_size);
  config.set_step_result(options_.result);
  config.set_shared_memory(options_.step_path == client::StepPath::kShared);
  return config;
}

absl::Status LevelRun::Create() {
  OPTD_ASSIGN_OR_RETURN(shapes_, ModelShapes(options_.model));
  const v1::SessionConfig config = Config();
  for (const std::string& endpoint : options_.endpoints) {
    client::ChannelOptions channel = options_.channel;
    channel.target = endpoint;
    OPTD_ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> made, client::MakeChannel(channel));
    clients_.emplace_back(made, options_.admin_token);
    clients_.back().set_timeout(options_.call_timeout);
  }
  for (int i = 0; options_.sharded && i < options_.concurrency; ++i) {
    // Every session spread over all the endpoints, under one name on each.
    std::vector<client::ShardEndpoint> shards;
    for (size_t e = 0; e < clients_.size(); ++e) {
      shards.push_back({options_.endpoints[e], clients_[e].channel(), 0});
    }
    absl::StatusOr<client::ShardedSession> sharded =
        client::ShardedSession::Create(shards, config, absl::StrCat("loadgen-", getpid(), "-", i),
                                       /*epoch=*/1, options_.admin_token);
    if (!sharded.ok()) {
      return absl::Status(sharded.status().code(),
                          absl::StrCat("creating a sharded session: ", sharded.status().message()));
    }
    sessions_.push_back(std::make_unique<SessionRun>(*std::move(sharded), options_.world_size));
  }
  for (int i = 0; !options_.sharded && i < options_.concurrency; ++i) {
    absl::StatusOr<client::Session> session = clients_[i % clients_.size()].CreateSession(config);
    if (!session.ok()) {
      return absl::Status(
          session.status().code(),
          absl::StrCat("creating a session on ", options_.endpoints[i % clients_.size()], ": ",
                       session.status().message()));
    }
    for (int worker = 0; options_.step_path == client::StepPath::kShared &&
                         worker < std::max(1, options_.world_size);
         ++worker) {
      OPTD_RETURN_IF_ERROR(session->AttachSharedMemory(worker).status());
    }
    sessions_.push_back(std::make_unique<SessionRun>(*std::move(session), options_.world_size));
  }
  std::mt19937 rng(options_.seed);
  std::normal_distribution<float> normal(0.0f, 0.01f);
  for (const TensorShape& t : shapes_) {
    gradients_.emplace_back(Elements(t));
    for (float& g : gradients_.back()) g = normal(rng);
    elements_ += Elements(t);
  }
  for (size_t i = 0; i < shapes_.size(); ++i) named_.push_back({shapes_[i].name, gradients_[i]});
  sent_per_step_ = elements_ * static_cast<int64_t>(DTypeSize(options_.wire_dtype));
  received_per_step_ =
      options_.result == v1::STEP_RESULT_NONE ? 0 : elements_ * static_cast<int64_t>(sizeof(float));
  return absl::OkStatus();
}

void LevelRun::CountError(const absl::Status& status) {
  const bool measured = measuring_.load();
  ++tally_.total_errors;
  if (measured) ++tally_.errors;
  absl::MutexLock lock(&tally_.mu);
  if (measured) ++tally_.errors_by_code[absl::StatusCodeToString(status.code())];
}

bool LevelRun::RunStep(SessionRun& run, int worker, int64_t step, absl::Time intended,
                       std::vector<float>& out) {
  client::StepOptions step_options;
  step_options.worker_id = worker;
  step_options.wire_dtype = options_.wire_dtype;
  step_options.path = options_.step_path;
  step_options.timeout = options_.step_timeout;
  if (options_.result != v1::STEP_RESULT_NONE) {
    // One span over the worker's buffer per tensor, written in place.
    int64_t offset = 0;
    for (size_t i = 0; i < shapes_.size(); ++i) {
      const int64_t n = Elements(shapes_[i]);
      step_options.outputs.push_back(
          {shapes_[i].name, absl::MakeSpan(out.data() + offset, static_cast<size_t>(n))});
      offset += n;
    }
  }
  if (options_.inject_bad_every > 0 && step % options_.inject_bad_every == 0) {
    CountError(run.Step(step + 1000000, named_, step_options).status());
  }
  const absl::Time deadline = absl::Now() + options_.step_timeout;
  absl::Duration backoff = absl::Milliseconds(5);
  absl::StatusOr<client::StepResult> result;
  while (true) {
    result = run.Step(step, named_, step_options);
    const bool refused =
        absl::IsUnavailable(result.status()) || absl::IsResourceExhausted(result.status());
    if (result.ok() || !refused || absl::Now() + backoff >= deadline) break;
    CountError(result.status());
    absl::SleepFor(backoff);
    backoff = std::min(2 * backoff, absl::Milliseconds(200));
  }
  const absl::Time done = absl::Now();
  if (!result.ok()) {
    CountError(result.status());
    return false;
  }
  ++tally_.total_steps;
  tally_.total_bytes_sent += sent_per_step_;
  tally_.total_bytes_received += received_per_step_;
  // A replay is the answer to a step already counted (after a resync), not new work.
  if (measuring_.load() && !result->replayed) {
    ++tally_.steps;
    tally_.bytes_sent += sent_per_step_;
    tally_.bytes_received += received_per_step_;
    run.AddLatency(absl::ToDoubleSeconds(done - intended));
    absl::MutexLock lock(&tally_.mu);
    tally_.latencies.push_back(absl::ToDoubleSeconds(done - intended));
  }
  return true;
}

absl::Status LevelRun::WarmUp() {
  // Every session steps `warmup_steps` times, closed loop, not measured.
  std::vector<std::thread> threads;
  for (auto& run : sessions_) {
    for (int w = 0; w < options_.world_size; ++w) {
      threads.emplace_back([this, w, run = run.get()] {
        std::vector<float> out(options_.result == v1::STEP_RESULT_NONE ? 0 : elements_);
        for (int s = 1; s <= options_.warmup_steps && !interrupted(); ++s) {
          RunStep(*run, w, s, absl::Now(), out);
        }
      });
    }
  }
  for (std::thread& t : threads) t.join();
  for (auto& run : sessions_) {
    OPTD_ASSIGN_OR_RETURN(const int64_t completed, run->CompletedStep());
    run->set_next_step(completed + 1);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::map<std::string, double>> LevelRun::ScrapeAll() const {
  std::map<std::string, double> sum;
  for (const std::string& address : options_.metrics) {
    OPTD_ASSIGN_OR_RETURN(std::string text, Scrape(address));
    for (const auto& [key, value] : Samples(text)) sum[key] += value;
  }
  return sum;
}

void LevelRun::Work(SessionRun& run, int w) {
  std::vector<float> out(options_.result == v1::STEP_RESULT_NONE ? 0 : elements_);
  int64_t seen = 0;
  while (true) {
    int64_t step = 0, before = 0;
    absl::Time intended;
    if (w == 0) {
      before = run.completed();
      step = run.next_step();
      const bool go = !stop_.load() && schedule_.Next(&intended);
      run.Publish(go, step, intended);
      if (!go) return;
    } else if (!run.Await(&seen, &step, &intended)) {
      return;
    }
    run.Done(!RunStep(run, w, step, intended, out));
    if (w == 0 && run.AwaitAll(before)) {
      // A worker failed: the daemon says which step the session expects next.
      absl::StatusOr<int64_t> completed = run.CompletedStep();
      if (completed.ok()) run.set_next_step(*completed + 1);
    }
  }
}

void LevelRun::Arrive(absl::Time start) {
  std::mt19937_64 gen(options_.seed);
  std::exponential_distribution<double> gap(options_.rate);
  absl::Time next = start;
  while (!stop_.load()) {
    next += absl::Seconds(options_.arrival == Arrival::kPoisson ? gap(gen) : 1.0 / options_.rate);
    for (absl::Time now = absl::Now(); !stop_.load() && now < next; now = absl::Now()) {
      absl::SleepFor(std::min(next - now, absl::Milliseconds(10)));
    }
    if (!stop_.load()) {
      schedule_.Push(next);
      if (measuring_.load()) ++intended_starts_;
    }
  }
}

absl::StatusOr<v1::LoadgenLevel> LevelRun::Measure() {
  // Server counters before the measurement.
  OPTD_ASSIGN_OR_RETURN(const Counters before, ScrapeAll());
  measuring_ = true;
  const absl::Time start = absl::Now();
  std::vector<std::thread> threads;
  for (auto& run : sessions_) {
    for (int w = 0; w < options_.world_size; ++w) {
      threads.emplace_back([this, w, run = run.get()] { Work(*run, w); });
    }
  }
  std::thread arrivals;
  if (options_.arrival != Arrival::kClosed)
    arrivals = std::thread([this, start] { Arrive(start); });

  // Windows: until the last ones agree, or a bound.
  int64_t last_steps = 0;
  absl::Time last = start;
  std::vector<double> rates;
  bool stable = false;
  while (true) {
    const absl::Time window_end = std::min(last + options_.window, start + options_.duration);
    while (absl::Now() < window_end && !interrupted() &&
           !(options_.max_steps > 0 && tally_.steps >= options_.max_steps)) {
      absl::SleepFor(std::min(absl::Milliseconds(10), window_end - absl::Now()));
    }
    const absl::Time now = absl::Now();
    const int64_t steps = tally_.steps;
    const double seconds = absl::ToDoubleSeconds(now - last);
    if (seconds > 0) rates.push_back((steps - last_steps) / seconds);
    last_steps = steps;
    last = now;
    stable = WindowsAgree(rates, options_.stable_windows, options_.stability);
    if (options_.progress) {
      options_.progress(absl::StrFormat(
          "%s c=%d%s window %d: %.1f steps/s, %d steps, %d errors%s",
          options_.arrival == Arrival::kClosed ? "closed" : "open", options_.concurrency,
          options_.arrival == Arrival::kClosed ? "" : absl::StrFormat(" rate=%.1f", options_.rate),
          rates.size(), rates.empty() ? 0.0 : rates.back(), steps, tally_.errors.load(),
          stable ? " (stable)" : ""));
    }
    if (stable || interrupted() || static_cast<int>(rates.size()) >= options_.max_windows ||
        now >= start + options_.duration ||
        (options_.max_steps > 0 && steps >= options_.max_steps)) {
      break;
    }
  }
  const absl::Duration measured = absl::Now() - start;
  measuring_ = false;
  const int64_t unstarted = schedule_.waiting();
  stop_ = true;
  schedule_.Stop();
  if (arrivals.joinable()) arrivals.join();
  for (std::thread& t : threads) t.join();
  OPTD_ASSIGN_OR_RETURN(const Counters after, ScrapeAll());
  return Summarize(measured, rates, stable, unstarted, before, after);
}

v1::LoadgenLevel LevelRun::Summarize(absl::Duration measured, const std::vector<double>& rates,
                                     bool stable, int64_t unstarted,
                                     const std::map<std::string, double>& before,
                                     const std::map<std::string, double>& after) {
  v1::LoadgenLevel level;
  level.set_arrival(options_.arrival == Arrival::kClosed     ? "closed"
                    : options_.arrival == Arrival::kConstant ? "constant"
                                                             : "poisson");
  level.set_concurrency(options_.concurrency);
  level.set_rate(options_.rate);
  level.set_seconds(absl::ToDoubleSeconds(measured));
  level.set_steps(tally_.steps);
  level.set_errors(tally_.errors);
  level.set_steps_per_second(tally_.steps / std::max(1e-9, level.seconds()));
  level.set_gradient_gbps(tally_.bytes_sent / std::max(1e-9, level.seconds()) / 1e9);
  level.set_result_gbps(tally_.bytes_received / std::max(1e-9, level.seconds()) / 1e9);
  {
    absl::MutexLock lock(&tally_.mu);
    std::vector<double>& l = tally_.latencies;
    std::sort(l.begin(), l.end());
    double sum = 0;
    for (double x : l) sum += x;
    level.set_latency_mean_s(l.empty() ? 0 : sum / l.size());
    level.set_latency_p50_s(Quantile(l, 0.5));
    level.set_latency_p90_s(Quantile(l, 0.9));
    level.set_latency_p99_s(Quantile(l, 0.99));
    level.set_latency_p999_s(Quantile(l, 0.999));
    level.set_latency_max_s(l.empty() ? 0 : l.back());
    for (const auto& [code, n] : tally_.errors_by_code) {
      (*level.mutable_errors_by_code())[code] = n;
    }
  }
  // Each session's own share: with every session stepping as fast as it is answered, a fair
  // daemon gives each about the same.
  double sum_rates = 0, farthest = 0;
  for (size_t i = 0; i < sessions_.size(); ++i) {
    std::vector<double> l = sessions_[i]->TakeLatencies();
    std::sort(l.begin(), l.end());
    v1::LoadgenSession* s = level.add_sessions();
    s->set_index(static_cast<int>(i));
    s->set_steps(static_cast<int64_t>(l.size()));
    s->set_steps_per_second(static_cast<double>(l.size()) / std::max(1e-9, level.seconds()));
    s->set_latency_p50_s(Quantile(l, 0.5));
    s->set_latency_p99_s(Quantile(l, 0.99));
    sum_rates += s->steps_per_second();
  }
  const double mean_rate = sessions_.empty() ? 0 : sum_rates / sessions_.size();
  for (const v1::LoadgenSession& s : level.sessions()) {
    if (mean_rate > 0) farthest = std::max(farthest, std::abs(s.steps_per_second() - mean_rate));
  }
  level.set_fairness_spread(mean_rate > 0 ? farthest / mean_rate : 0);
  for (double r : rates) level.add_window_steps_per_second(r);
  level.set_stable(stable);
  const int64_t attempts = level.steps() + level.errors();
  level.set_error_ridden(attempts > 0 &&
                         static_cast<double>(level.errors()) / attempts > options_.max_error_rate);
  level.set_session_steps_per_second(level.steps_per_second() / options_.world_size);
  if (options_.arrival != Arrival::kClosed) {
    level.set_intended_starts(intended_starts_);
    level.set_unstarted(unstarted);
    // Arrivals the sessions could not start in time: the server did not keep up with the rate.
    level.set_overloaded(intended_starts_ > 0 && unstarted > 0.05 * intended_starts_);
  }
  if (!options_.metrics.empty()) {
    for (const char* phase : {"receive", "aggregate", "compute", "send"}) {
      const std::string labels = absl::StrCat("{phase=\"", phase, "\"}");
      const double count = Sample(after, "optd_step_phase_seconds_count" + labels) -
                           Sample(before, "optd_step_phase_seconds_count" + labels);
      const double sum = Sample(after, "optd_step_phase_seconds_sum" + labels) -
                         Sample(before, "optd_step_phase_seconds_sum" + labels);
      (*level.mutable_server_phase_seconds())[phase] = count > 0 ? sum / count : 0;
    }
    level.set_server_backend_memory_bytes(
        Sample(after, "optd_backend_memory_bytes{kind=\"sessions\"}"));
  }
  level.set_total_steps(tally_.total_steps);
  level.set_total_errors(tally_.total_errors);
  level.set_total_bytes_sent(tally_.total_bytes_sent);
  level.set_total_bytes_received(tally_.total_bytes_received);
  return level;
}

}  // namespace

absl::StatusOr<v1::LoadgenLevel> RunLevel(const Options& options) {
  if (options.endpoints.empty()) return absl::InvalidArgumentError("no endpoint");
  if (!options.metrics.empty() && options.metrics.size() != options.endpoints.size()) {
    return absl::InvalidArgumentError("--metrics needs one address per endpoint");
  }
  if (options.concurrency < 1 || options.world_size < 1 ||
      int64_t{options.concurrency} * options.world_size > kMaxConcurrency) {
    return absl::InvalidArgumentError(
        absl::StrCat("concurrency and world_size must be >= 1, with at most ", kMaxConcurrency,
                     " workers (concurrency × world_size) in all"));
  }
  if (options.arrival != Arrival::kClosed && !(options.rate > 0)) {
    return absl::InvalidArgumentError("an open loop needs --rate > 0");
  }
  LevelRun level(options);
  OPTD_RETURN_IF_ERROR(level.Create());
  OPTD_RETURN_IF_ERROR(level.WarmUp());
  return level.Measure();
}

absl::StatusOr<v1::LoadgenReport> Run(const Options& options,
                                      const std::vector<int>& concurrencies) {
  v1::LoadgenReport report;
  for (const std::string& e : options.endpoints) report.add_endpoints(e);
  report.set_model(options.model);
  OPTD_ASSIGN_OR_RETURN(std::vector<TensorShape> shapes, ModelShapes(options.model));
  int64_t elements = 0;
  for (const TensorShape& t : shapes) elements += Elements(t);
  report.set_model_elements(elements);
  report.set_preset(options.preset);
  report.set_wire_dtype(std::string(DTypeName(options.wire_dtype)));
  report.set_world_size(options.world_size);
  report.set_sharded(options.sharded);
  report.set_started(absl::FormatTime(absl::RFC3339_sec, absl::Now(), absl::UTCTimeZone()));
  bool ok = true;
  for (int concurrency : concurrencies) {
    if (options.interrupt != nullptr && options.interrupt->load()) {
      ok = false;
      break;
    }
    Options level_options = options;
    level_options.concurrency = concurrency;
    absl::StatusOr<v1::LoadgenLevel> level = RunLevel(level_options);
    if (!level.ok()) {
      // The levels that ran stay in the report; this one says why it could not.
      v1::LoadgenLevel* failed = report.add_levels();
      failed->set_concurrency(concurrency);
      failed->set_rate(options.rate);
      failed->set_error(level.status().ToString());
      ok = false;
      break;
    }
    // A level bounded by --steps may end before its windows can agree.
    ok = ok && (level->stable() || options.max_steps > 0) && !level->error_ridden() &&
         !level->overloaded();
    *report.add_levels() = *std::move(level);
  }
  report.set_ok(ok);
  return report;
}

}  // namespace optd::loadgen
