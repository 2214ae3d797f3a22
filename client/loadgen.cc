#include "client/loadgen.h"

#include <netdb.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <thread>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "client/sharded.h"
#include "common/status_macros.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"

namespace optd::loadgen {
namespace {

std::vector<TensorShape> Gpt2(int layers, int64_t d) {
  std::vector<TensorShape> t = {{"wte", {50257, d}, true}, {"wpe", {1024, d}, true}};
  for (int l = 0; l < layers; ++l) {
    const std::string p = absl::StrCat("h", l, ".");
    t.push_back({p + "ln_1.weight", {d}, true});
    t.push_back({p + "ln_1.bias", {d}, true});
    t.push_back({p + "attn.c_attn.weight", {3 * d, d}, false});
    t.push_back({p + "attn.c_attn.bias", {3 * d}, true});
    t.push_back({p + "attn.c_proj.weight", {d, d}, false});
    t.push_back({p + "attn.c_proj.bias", {d}, true});
    t.push_back({p + "ln_2.weight", {d}, true});
    t.push_back({p + "ln_2.bias", {d}, true});
    t.push_back({p + "mlp.c_fc.weight", {4 * d, d}, false});
    t.push_back({p + "mlp.c_fc.bias", {4 * d}, true});
    t.push_back({p + "mlp.c_proj.weight", {d, 4 * d}, false});
    t.push_back({p + "mlp.c_proj.bias", {d}, true});
  }
  t.push_back({"ln_f.weight", {d}, true});
  t.push_back({"ln_f.bias", {d}, true});
  return t;
}

// One decoder layer of Llama 3.2 1B: d 2048, 32 query and 8 key/value heads of 64, MLP 8192.
std::vector<TensorShape> LlamaLayer() {
  return {{"attention_norm.weight", {2048}, true}, {"wq.weight", {2048, 2048}, false},
          {"wk.weight", {512, 2048}, false},       {"wv.weight", {512, 2048}, false},
          {"wo.weight", {2048, 2048}, false},      {"ffn_norm.weight", {2048}, true},
          {"w1.weight", {8192, 2048}, false},      {"w3.weight", {8192, 2048}, false},
          {"w2.weight", {2048, 8192}, false}};
}

int64_t Elements(const TensorShape& t) {
  int64_t n = 1;
  for (int64_t d : t.shape) n *= d;
  return n;
}

// GET http://address/metrics, the body; Unavailable naming the address when it cannot be had.
absl::StatusOr<std::string> Scrape(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("metrics address '", address, "' has no port"));
  }
  const std::string host = address.substr(0, colon), port = address.substr(colon + 1);
  addrinfo hints = {};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0 || found == nullptr) {
    return absl::UnavailableError(absl::StrCat("metrics at ", address, ": cannot resolve"));
  }
  int fd = -1;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {  // every address in turn
    fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) continue;
    timeval timeout{5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
    if (connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(found);
  if (fd < 0)
    return absl::UnavailableError(absl::StrCat("metrics at ", address, ": cannot connect"));
  const std::string request = absl::StrCat("GET /metrics HTTP/1.0\r\nHost: ", address, "\r\n\r\n");
  std::string response;
  bool failed = send(fd, request.data(), request.size(), MSG_NOSIGNAL) !=
                static_cast<ssize_t>(request.size());
  char buffer[1 << 16];
  ssize_t n = 0;
  while (!failed && (n = recv(fd, buffer, sizeof(buffer), 0)) > 0) response.append(buffer, n);
  failed = failed || n < 0;  // a timeout or reset, not the end of the response
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  const std::string status_line = response.substr(0, response.find("\r\n"));
  if (failed || status_line.rfind("HTTP/1.", 0) != 0 ||
      status_line.find(" 200") == std::string::npos || body == std::string::npos) {
    return absl::UnavailableError(
        absl::StrCat("metrics at ", address, ": no whole 200 response (", status_line, ")"));
  }
  return response.substr(body + 4);
}

// The samples loadgen reads from an exposition: name{labels} -> value, the labels as written.
std::map<std::string, double> Samples(const std::string& text) {
  std::map<std::string, double> samples;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    if (line.front() == '#') continue;
    const size_t space = line.rfind(' ');
    double value = 0;
    if (space == absl::string_view::npos || !absl::SimpleAtod(line.substr(space + 1), &value)) {
      continue;
    }
    samples[std::string(line.substr(0, space))] = value;
  }
  return samples;
}

double Sample(const std::map<std::string, double>& samples, const std::string& key) {
  auto it = samples.find(key);
  return it == samples.end() ? 0.0 : it->second;
}

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
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopped_ && (open_ && due_.empty())) cv_.wait(lock);
    if (stopped_) return false;
    if (!open_) {
      *intended = absl::Now();
      return true;
    }
    *intended = due_.front();
    due_.pop_front();
    return true;
  }
  void SetOpen() { open_ = true; }
  void Push(absl::Time t) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      due_.push_back(t);
    }
    cv_.notify_one();
  }
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopped_ = true;
    }
    cv_.notify_all();
  }
  // Intended starts no session has taken.
  int64_t waiting() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(due_.size());
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<absl::Time> due_;
  bool open_ = false;
  bool stopped_ = false;
};

// One session's workers: worker 0 takes the next intended start and publishes the step; the
// others follow, so every worker sends the same step, and worker 0 waits for all of them.
class SessionRun {
 public:
  SessionRun(client::Session session, int world_size)
      : session_(std::move(session)), world_size_(world_size) {}
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
    std::lock_guard<std::mutex> lock(mu_);
    return next_step_;
  }
  void set_next_step(int64_t step) {
    std::lock_guard<std::mutex> lock(mu_);
    next_step_ = step;
  }
  int64_t completed() {
    std::lock_guard<std::mutex> lock(mu_);
    return completed_;
  }
  // Worker 0: the step every worker sends next, or the end (go false).
  void Publish(bool go, int64_t step, absl::Time intended) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      go_ = go;
      step_ = step;
      intended_ = intended;
      ++generation_;
    }
    cv_.notify_all();
  }
  // Workers 1..: the step published after generation `*seen`; false at the end.
  bool Await(int64_t* seen, int64_t* step, absl::Time* intended) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return generation_ > *seen; });
    *seen = generation_;
    *step = step_;
    *intended = intended_;
    return go_;
  }
  // Every worker after its step, saying whether it failed.
  void Done(bool failed) {
    std::lock_guard<std::mutex> lock(mu_);
    failed_ = failed_ || failed;
    if (++done_ == world_size_) {
      done_ = 0;
      next_step_ = step_ + 1;
      ++completed_;
      done_cv_.notify_all();
    }
  }
  // Worker 0: until every worker has finished the step published after `completed_before`;
  // true when one of them failed (the caller then asks the daemon where the session stands).
  bool AwaitAll(int64_t completed_before) {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return completed_ > completed_before; });
    const bool failed = failed_;
    failed_ = false;
    return failed;
  }

 private:
  std::optional<client::Session> session_;
  std::unique_ptr<client::ShardedSession> sharded_;
  const int world_size_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  int64_t generation_ = 0;
  bool go_ = true;
  int64_t step_ = 0;
  absl::Time intended_;
  int64_t next_step_ = 1;
  bool failed_ = false;
  int done_ = 0;
  int64_t completed_ = 0;
};

}  // namespace

absl::StatusOr<std::vector<TensorShape>> ModelShapes(const std::string& model) {
  if (model == "gpt2-small") return Gpt2(12, 768);
  if (model == "gpt2-medium") return Gpt2(24, 1024);
  if (model == "llama-1b-layer") return LlamaLayer();
  std::ifstream in(model);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--model=", model, ": not gpt2-small, gpt2-medium, llama-1b-layer or a readable file"));
  }
  std::stringstream text;
  text << in.rdbuf();
  std::string json = text.str();
  const size_t first = json.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && json[first] == '[') {
    google::protobuf::ListValue list;
    if (!google::protobuf::util::JsonStringToMessage(json, &list).ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--model=", model, ": not valid JSON"));
    }
    v1::LoadgenModel wrapped;
    for (int i = 0; i < list.values_size(); ++i) {
      const google::protobuf::Value& entry = list.values(i);
      if (entry.has_struct_value()) {
        // A list of tensors, as in {"tensors": [...]}.
        std::string one;
        (void)google::protobuf::util::MessageToJsonString(entry, &one);
        if (!google::protobuf::util::JsonStringToMessage(one, wrapped.add_tensors()).ok()) {
          return absl::InvalidArgumentError(
              absl::StrCat("--model=", model, ": entry ", i, " is not a tensor"));
        }
        continue;
      }
      // A list of shapes: lists of positive integers, named t0, t1, ...
      if (!entry.has_list_value() || entry.list_value().values().empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--model=", model, ": entry ", i, " is neither a tensor nor a list of dimensions"));
      }
      v1::LoadgenModel::Tensor* t = wrapped.add_tensors();
      t->set_name(absl::StrCat("t", i));
      for (const google::protobuf::Value& d : entry.list_value().values()) {
        if (d.kind_case() != google::protobuf::Value::kNumberValue || d.number_value() < 1 ||
            d.number_value() != std::floor(d.number_value()) || d.number_value() > 1e12) {
          return absl::InvalidArgumentError(absl::StrCat(
              "--model=", model, ": entry ", i, " has a dimension that is not a positive integer"));
        }
        t->add_shape(static_cast<int64_t>(d.number_value()));
      }
    }
    json.clear();  // MessageToJsonString appends
    (void)google::protobuf::util::MessageToJsonString(wrapped, &json);
  }
  v1::LoadgenModel parsed;
  const auto status = google::protobuf::util::JsonStringToMessage(json, &parsed);
  if (!status.ok() || parsed.tensors().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--model=", model,
                     ": expected {\"tensors\": [{\"name\": ..., \"shape\": [...]}, ...]}, a list "
                     "of such tensors, or a list of shapes [[768, 3072], ...]",
                     status.ok() ? "" : absl::StrCat(": ", status.ToString())));
  }
  std::vector<TensorShape> shapes;
  for (const auto& t : parsed.tensors()) {
    bool positive = !t.shape().empty();
    for (int64_t d : t.shape()) positive = positive && d > 0;
    if (t.name().empty() || !positive) {
      return absl::InvalidArgumentError(absl::StrCat("--model=", model, ": tensor '", t.name(),
                                                     "' needs a name and positive dimensions"));
    }
    TensorShape shape{t.name(), {t.shape().begin(), t.shape().end()}, t.adamw()};
    if (shape.shape.size() < 2) shape.adamw = true;
    shapes.push_back(std::move(shape));
  }
  return shapes;
}

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
  OPTD_ASSIGN_OR_RETURN(std::vector<TensorShape> shapes, ModelShapes(options.model));
  auto interrupted = [&options] {
    return options.interrupt != nullptr && options.interrupt->load();
  };

  // The sessions, spread over the endpoints; deleted however the level ends.
  v1::SessionConfig config;
  for (const auto& [name, preset] : std::vector<std::pair<std::string, std::string>>{
           {"matrices", options.preset}, {"vectors", "adamw"}}) {
    v1::GroupConfig* g = config.add_groups();
    g->set_name(name);
    g->set_preset(preset);
  }
  for (const TensorShape& t : shapes) {
    v1::TensorConfig* tc = config.add_tensors();
    tc->set_name(t.name);
    for (int64_t d : t.shape) tc->add_shape(d);
    tc->set_group(t.adamw ? "vectors" : "matrices");
    tc->mutable_normal()->set_std(0.02);
    tc->mutable_normal()->set_seed(tc->name().size());
  }
  config.set_world_size(options.world_size);
  config.set_step_result(options.result);
  std::vector<client::Client> clients;
  for (const std::string& endpoint : options.endpoints) {
    client::ChannelOptions channel = options.channel;
    channel.target = endpoint;
    OPTD_ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> made, client::MakeChannel(channel));
    clients.emplace_back(made, options.admin_token);
    clients.back().set_timeout(options.call_timeout);
  }
  std::vector<std::unique_ptr<SessionRun>> sessions;
  auto delete_sessions = [&] {
    for (size_t i = 0; i < sessions.size(); ++i) sessions[i]->Delete(clients[i % clients.size()]);
    sessions.clear();
  };
  // Deleted however the level ends (an error, an exception).
  absl::Cleanup delete_on_exit = [&] { delete_sessions(); };
  for (int i = 0; options.sharded && i < options.concurrency; ++i) {
    // Every session spread over all the endpoints, under one name on each.
    std::vector<client::ShardEndpoint> shards;
    for (size_t e = 0; e < clients.size(); ++e) {
      shards.push_back({options.endpoints[e], clients[e].channel(), 0});
    }
    absl::StatusOr<client::ShardedSession> sharded =
        client::ShardedSession::Create(shards, config, absl::StrCat("loadgen-", getpid(), "-", i),
                                       /*epoch=*/1, options.admin_token);
    if (!sharded.ok()) {
      delete_sessions();
      return absl::Status(sharded.status().code(),
                          absl::StrCat("creating a sharded session: ", sharded.status().message()));
    }
    sessions.push_back(std::make_unique<SessionRun>(*std::move(sharded), options.world_size));
  }
  for (int i = 0; !options.sharded && i < options.concurrency; ++i) {
    absl::StatusOr<client::Session> session = clients[i % clients.size()].CreateSession(config);
    if (!session.ok()) {
      delete_sessions();
      return absl::Status(
          session.status().code(),
          absl::StrCat("creating a session on ", options.endpoints[i % clients.size()], ": ",
                       session.status().message()));
    }
    sessions.push_back(std::make_unique<SessionRun>(*std::move(session), options.world_size));
  }

  // Gradients (never zero: zeros can run faster than real data) and result spans, per worker.
  std::mt19937 rng(options.seed);
  std::normal_distribution<float> normal(0.0f, 0.01f);
  std::vector<std::vector<float>> gradients;
  int64_t elements = 0;
  for (const TensorShape& t : shapes) {
    gradients.emplace_back(Elements(t));
    for (float& g : gradients.back()) g = normal(rng);
    elements += Elements(t);
  }
  std::vector<client::NamedTensor> named;
  for (size_t i = 0; i < shapes.size(); ++i) named.push_back({shapes[i].name, gradients[i]});
  const int64_t sent_per_step = elements * static_cast<int64_t>(DTypeSize(options.wire_dtype));
  const int64_t received_per_step =
      options.result == v1::STEP_RESULT_NONE ? 0 : elements * static_cast<int64_t>(sizeof(float));

  Tally tally;
  std::atomic<bool> measuring{false};
  Schedule schedule;
  if (options.arrival != Arrival::kClosed) schedule.SetOpen();

  // One worker's step: the call, its accounting, and (every N-th) an injected bad request first.
  // Refusals before the daemon counted the gradients (a full queue, a stream limit) are retried
  // with backoff until the step's deadline, so the worker's partners are not left waiting for
  // it. Returns false when the step failed.
  auto run_step = [&](SessionRun& run, int worker, int64_t step, absl::Time intended,
                      std::vector<float>& out) -> bool {
    client::StepOptions step_options;
    step_options.worker_id = worker;
    step_options.wire_dtype = options.wire_dtype;
    step_options.timeout = options.step_timeout;
    if (options.result != v1::STEP_RESULT_NONE) {
      // One span over the worker's buffer per tensor, written in place.
      int64_t offset = 0;
      for (size_t i = 0; i < shapes.size(); ++i) {
        const int64_t n = Elements(shapes[i]);
        step_options.outputs.push_back(
            {shapes[i].name, absl::MakeSpan(out.data() + offset, static_cast<size_t>(n))});
        offset += n;
      }
    }
    auto count_error = [&](const absl::Status& status) {
      const bool measured = measuring.load();
      ++tally.total_errors;
      if (measured) ++tally.errors;
      absl::MutexLock lock(&tally.mu);
      if (measured) ++tally.errors_by_code[absl::StatusCodeToString(status.code())];
    };
    if (options.inject_bad_every > 0 && step % options.inject_bad_every == 0) {
      count_error(run.Step(step + 1000000, named, step_options).status());
    }
    const absl::Time deadline = absl::Now() + options.step_timeout;
    absl::Duration backoff = absl::Milliseconds(5);
    absl::StatusOr<client::StepResult> result;
    while (true) {
      result = run.Step(step, named, step_options);
      const bool refused =
          absl::IsUnavailable(result.status()) || absl::IsResourceExhausted(result.status());
      if (result.ok() || !refused || absl::Now() + backoff >= deadline) break;
      count_error(result.status());
      absl::SleepFor(backoff);
      backoff = std::min(2 * backoff, absl::Milliseconds(200));
    }
    const absl::Time done = absl::Now();
    if (!result.ok()) {
      count_error(result.status());
      return false;
    }
    ++tally.total_steps;
    tally.total_bytes_sent += sent_per_step;
    tally.total_bytes_received += received_per_step;
    // A replay is the answer to a step already counted (after a resync), not new work.
    if (measuring.load() && !result->replayed) {
      ++tally.steps;
      tally.bytes_sent += sent_per_step;
      tally.bytes_received += received_per_step;
      absl::MutexLock lock(&tally.mu);
      tally.latencies.push_back(absl::ToDoubleSeconds(done - intended));
    }
    return true;
  };

  // Warm-up: every session steps `warmup_steps` times, closed loop, not measured.
  {
    std::vector<std::thread> threads;
    for (auto& run : sessions) {
      for (int w = 0; w < options.world_size; ++w) {
        threads.emplace_back([&, w, run = run.get()] {
          std::vector<float> out(options.result == v1::STEP_RESULT_NONE ? 0 : elements);
          for (int s = 1; s <= options.warmup_steps && !interrupted(); ++s) {
            run_step(*run, w, s, absl::Now(), out);
          }
        });
      }
    }
    for (std::thread& t : threads) t.join();
    for (auto& run : sessions) {
      absl::StatusOr<int64_t> completed = run->CompletedStep();
      if (!completed.ok()) {
        delete_sessions();
        return completed.status();
      }
      run->set_next_step(*completed + 1);
    }
  }

  // Server counters before the measurement.
  auto scrape_all = [&]() -> absl::StatusOr<std::map<std::string, double>> {
    std::map<std::string, double> sum;
    for (const std::string& address : options.metrics) {
      OPTD_ASSIGN_OR_RETURN(std::string text, Scrape(address));
      for (const auto& [key, value] : Samples(text)) sum[key] += value;
    }
    return sum;
  };
  absl::StatusOr<std::map<std::string, double>> before = scrape_all();
  if (!before.ok()) {
    delete_sessions();
    return before.status();
  }

  // The workers.
  measuring = true;
  const absl::Time start = absl::Now();
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (auto& run : sessions) {
    for (int w = 0; w < options.world_size; ++w) {
      threads.emplace_back([&, w, run = run.get()] {
        std::vector<float> out(options.result == v1::STEP_RESULT_NONE ? 0 : elements);
        int64_t seen = 0;
        while (true) {
          int64_t step = 0, before = 0;
          absl::Time intended;
          if (w == 0) {
            before = run->completed();
            step = run->next_step();
            const bool go = !stop.load() && schedule.Next(&intended);
            run->Publish(go, step, intended);
            if (!go) return;
          } else if (!run->Await(&seen, &step, &intended)) {
            return;
          }
          run->Done(!run_step(*run, w, step, intended, out));
          if (w == 0 && run->AwaitAll(before)) {
            // A worker failed: the daemon says which step the session expects next.
            absl::StatusOr<int64_t> completed = run->CompletedStep();
            if (completed.ok()) run->set_next_step(*completed + 1);
          }
        }
      });
    }
  }
  std::thread arrivals;
  std::atomic<int64_t> intended_starts{0};
  if (options.arrival != Arrival::kClosed) {
    arrivals = std::thread([&] {
      std::mt19937_64 gen(options.seed);
      std::exponential_distribution<double> gap(options.rate);
      absl::Time next = start;
      while (!stop.load()) {
        next += absl::Seconds(options.arrival == Arrival::kPoisson ? gap(gen) : 1.0 / options.rate);
        for (absl::Time now = absl::Now(); !stop.load() && now < next; now = absl::Now()) {
          absl::SleepFor(std::min(next - now, absl::Milliseconds(10)));
        }
        if (!stop.load()) {
          schedule.Push(next);
          if (measuring.load()) ++intended_starts;
        }
      }
    });
  }

  // Windows: until the last ones agree, or a bound.
  v1::LoadgenLevel level;
  int64_t last_steps = 0;
  absl::Time last = start;
  std::vector<double> rates;
  bool stable = false;
  while (true) {
    const absl::Time window_end = std::min(last + options.window, start + options.duration);
    while (absl::Now() < window_end && !interrupted() &&
           !(options.max_steps > 0 && tally.steps >= options.max_steps)) {
      absl::SleepFor(std::min(absl::Milliseconds(10), window_end - absl::Now()));
    }
    const absl::Time now = absl::Now();
    const int64_t steps = tally.steps;
    const double seconds = absl::ToDoubleSeconds(now - last);
    if (seconds > 0) rates.push_back((steps - last_steps) / seconds);
    last_steps = steps;
    last = now;
    stable = WindowsAgree(rates, options.stable_windows, options.stability);
    if (options.progress) {
      options.progress(absl::StrFormat(
          "%s c=%d%s window %d: %.1f steps/s, %d steps, %d errors%s",
          options.arrival == Arrival::kClosed ? "closed" : "open", options.concurrency,
          options.arrival == Arrival::kClosed ? "" : absl::StrFormat(" rate=%.1f", options.rate),
          rates.size(), rates.empty() ? 0.0 : rates.back(), steps, tally.errors.load(),
          stable ? " (stable)" : ""));
    }
    if (stable || interrupted() || static_cast<int>(rates.size()) >= options.max_windows ||
        now >= start + options.duration || (options.max_steps > 0 && steps >= options.max_steps)) {
      break;
    }
  }
  const absl::Duration measured = absl::Now() - start;
  measuring = false;
  const int64_t unstarted = schedule.waiting();
  stop = true;
  schedule.Stop();
  if (arrivals.joinable()) arrivals.join();
  for (std::thread& t : threads) t.join();
  absl::StatusOr<std::map<std::string, double>> after = scrape_all();
  delete_sessions();
  if (!after.ok()) return after.status();

  level.set_arrival(options.arrival == Arrival::kClosed     ? "closed"
                    : options.arrival == Arrival::kConstant ? "constant"
                                                            : "poisson");
  level.set_concurrency(options.concurrency);
  level.set_rate(options.rate);
  level.set_seconds(absl::ToDoubleSeconds(measured));
  level.set_steps(tally.steps);
  level.set_errors(tally.errors);
  level.set_steps_per_second(tally.steps / std::max(1e-9, level.seconds()));
  level.set_gradient_gbps(tally.bytes_sent / std::max(1e-9, level.seconds()) / 1e9);
  level.set_result_gbps(tally.bytes_received / std::max(1e-9, level.seconds()) / 1e9);
  {
    absl::MutexLock lock(&tally.mu);
    std::vector<double>& l = tally.latencies;
    std::sort(l.begin(), l.end());
    double sum = 0;
    for (double x : l) sum += x;
    level.set_latency_mean_s(l.empty() ? 0 : sum / l.size());
    level.set_latency_p50_s(Quantile(l, 0.5));
    level.set_latency_p90_s(Quantile(l, 0.9));
    level.set_latency_p99_s(Quantile(l, 0.99));
    level.set_latency_p999_s(Quantile(l, 0.999));
    level.set_latency_max_s(l.empty() ? 0 : l.back());
    for (const auto& [code, n] : tally.errors_by_code) (*level.mutable_errors_by_code())[code] = n;
  }
  for (double r : rates) level.add_window_steps_per_second(r);
  level.set_stable(stable);
  const int64_t attempts = level.steps() + level.errors();
  level.set_error_ridden(attempts > 0 &&
                         static_cast<double>(level.errors()) / attempts > options.max_error_rate);
  level.set_session_steps_per_second(level.steps_per_second() / options.world_size);
  if (options.arrival != Arrival::kClosed) {
    level.set_intended_starts(intended_starts);
    level.set_unstarted(unstarted);
    // Arrivals the sessions could not start in time: the server did not keep up with the rate.
    level.set_overloaded(intended_starts > 0 && unstarted > 0.05 * intended_starts);
  }
  if (!options.metrics.empty()) {
    for (const char* phase : {"receive", "aggregate", "compute", "send"}) {
      const std::string labels = absl::StrCat("{phase=\"", phase, "\"}");
      const double count = Sample(*after, "optd_step_phase_seconds_count" + labels) -
                           Sample(*before, "optd_step_phase_seconds_count" + labels);
      const double sum = Sample(*after, "optd_step_phase_seconds_sum" + labels) -
                         Sample(*before, "optd_step_phase_seconds_sum" + labels);
      (*level.mutable_server_phase_seconds())[phase] = count > 0 ? sum / count : 0;
    }
    level.set_server_backend_memory_bytes(
        Sample(*after, "optd_backend_memory_bytes{kind=\"sessions\"}"));
  }
  level.set_total_steps(tally.total_steps);
  level.set_total_errors(tally.total_errors);
  level.set_total_bytes_sent(tally.total_bytes_sent);
  level.set_total_bytes_received(tally.total_bytes_received);
  return level;
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

std::string ToJson(const v1::LoadgenReport& report) {
  std::string json;
  google::protobuf::util::JsonPrintOptions print;
  print.add_whitespace = true;
  print.always_print_primitive_fields = true;
  print.preserve_proto_field_names = true;
  // A report always serializes: it has no Any fields or unknown enums.
  (void)google::protobuf::util::MessageToJsonString(report, &json, print);
  return json;
}

absl::StatusOr<v1::LoadgenReport> FromJson(const std::string& json) {
  v1::LoadgenReport report;
  const auto status = google::protobuf::util::JsonStringToMessage(json, &report);
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("not a loadgen report: ", status.ToString()));
  }
  return report;
}

std::string ToCsv(const v1::LoadgenReport& report) {
  std::string csv =
      "arrival,concurrency,rate,seconds,steps,errors,steps_per_second,gradient_gbps,result_gbps,"
      "latency_p50_s,latency_p90_s,latency_p99_s,latency_p999_s,latency_max_s,stable,"
      "server_receive_s,server_aggregate_s,server_compute_s,server_send_s,"
      "session_steps_per_second,intended_starts,unstarted,overloaded,error\n";
  for (const v1::LoadgenLevel& l : report.levels()) {
    auto phase = [&l](const char* name) {
      auto it = l.server_phase_seconds().find(name);
      return it == l.server_phase_seconds().end() ? 0.0 : it->second;
    };
    absl::StrAppendFormat(&csv, "%s,%d,%g,%.3f,%d,%d,%.3f,%.4f,%.4f,%.6f,%.6f,%.6f,%.6f,%.6f,%d,",
                          l.arrival(), l.concurrency(), l.rate(), l.seconds(), l.steps(),
                          l.errors(), l.steps_per_second(), l.gradient_gbps(), l.result_gbps(),
                          l.latency_p50_s(), l.latency_p90_s(), l.latency_p99_s(),
                          l.latency_p999_s(), l.latency_max_s(), l.stable() ? 1 : 0);
    std::string error = l.error();
    std::replace(error.begin(), error.end(), ',', ';');
    std::replace(error.begin(), error.end(), '\n', ' ');
    absl::StrAppendFormat(&csv, "%.6f,%.6f,%.6f,%.6f,%.3f,%d,%d,%d,%s\n", phase("receive"),
                          phase("aggregate"), phase("compute"), phase("send"),
                          l.session_steps_per_second(), l.intended_starts(), l.unstarted(),
                          l.overloaded() ? 1 : 0, error);
  }
  return csv;
}

std::string ToTable(const v1::LoadgenReport& report) {
  std::string out = absl::StrFormat(
      "optd-loadgen: %s (%d parameters), preset %s, wire %s, world_size %d, on %s\n",
      report.model(), report.model_elements(), report.preset(), report.wire_dtype(),
      report.world_size(), absl::StrJoin(report.endpoints(), ", "));
  absl::StrAppendFormat(&out, "%-9s %5s %8s %9s %8s %8s %9s %9s %9s %9s %9s %7s %s\n", "arrival",
                        "conc", "rate", "steps/s", "GB/s in", "GB/s out", "p50 ms", "p90 ms",
                        "p99 ms", "p999 ms", "max ms", "errors", "");
  for (const v1::LoadgenLevel& l : report.levels()) {
    if (!l.error().empty()) {
      absl::StrAppendFormat(&out, "level concurrency=%d rate=%g could not run: %s\n",
                            l.concurrency(), l.rate(), l.error());
      continue;
    }
    std::string codes;
    for (const auto& [code, n] : l.errors_by_code()) absl::StrAppend(&codes, " ", code, "=", n);
    absl::StrAppendFormat(
        &out, "%-9s %5d %8.1f %9.2f %8.3f %8.3f %9.2f %9.2f %9.2f %9.2f %9.2f %7d %s%s%s\n",
        l.arrival(), l.concurrency(), l.rate(), l.steps_per_second(), l.gradient_gbps(),
        l.result_gbps(), 1e3 * l.latency_p50_s(), 1e3 * l.latency_p90_s(), 1e3 * l.latency_p99_s(),
        1e3 * l.latency_p999_s(), 1e3 * l.latency_max_s(), l.errors(),
        l.stable() ? "stable" : "UNSTABLE", l.error_ridden() ? " ERRORS" : "", codes);
    if (l.overloaded()) {
      absl::StrAppendFormat(&out, "          OVERLOADED: %d of %d intended starts never started\n",
                            l.unstarted(), l.intended_starts());
    }
    if (!l.server_phase_seconds().empty()) {
      absl::StrAppend(&out, "          server per step:");
      for (const char* phase : {"receive", "aggregate", "compute", "send"}) {
        auto it = l.server_phase_seconds().find(phase);
        absl::StrAppendFormat(&out, " %s %.2f ms", phase,
                              it == l.server_phase_seconds().end() ? 0.0 : 1e3 * it->second);
      }
      absl::StrAppendFormat(&out, "; backend memory %.1f MiB\n",
                            l.server_backend_memory_bytes() / (1 << 20));
    }
  }
  return out;
}

std::string Compare(const v1::LoadgenReport& baseline, const v1::LoadgenReport& candidate,
                    double threshold, bool* regressed) {
  *regressed = false;
  std::string out =
      absl::StrFormat("%-9s %5s %8s %12s %12s %8s %10s %10s %8s\n", "arrival", "conc", "rate",
                      "base st/s", "new st/s", "ratio", "base p99", "new p99", "ratio");
  for (const v1::LoadgenLevel& c : candidate.levels()) {
    const v1::LoadgenLevel* b = nullptr;
    for (const v1::LoadgenLevel& l : baseline.levels()) {
      if (l.arrival() == c.arrival() && l.concurrency() == c.concurrency() &&
          l.rate() == c.rate()) {
        b = &l;
      }
    }
    if (b == nullptr) {
      absl::StrAppendFormat(&out, "%-9s %5d %8.1f   (not in the baseline)\n", c.arrival(),
                            c.concurrency(), c.rate());
      continue;
    }
    const double throughput = c.steps_per_second() / std::max(1e-12, b->steps_per_second());
    const double p99 = c.latency_p99_s() / std::max(1e-12, b->latency_p99_s());
    const bool worse = throughput < 1 - threshold || p99 > 1 + threshold;
    *regressed = *regressed || worse;
    absl::StrAppendFormat(&out, "%-9s %5d %8.1f %12.2f %12.2f %8.3f %9.2fms %9.2fms %8.3f%s\n",
                          c.arrival(), c.concurrency(), c.rate(), b->steps_per_second(),
                          c.steps_per_second(), throughput, 1e3 * b->latency_p99_s(),
                          1e3 * c.latency_p99_s(), p99, worse ? "  REGRESSION" : "");
  }
  return out;
}

}  // namespace optd::loadgen
