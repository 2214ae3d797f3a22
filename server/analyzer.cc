#include "server/analyzer.h"

#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <new>
#include <utility>

#include "absl/time/clock.h"
#include "common/status_macros.h"

namespace optd::server {
namespace {

// The analyzer runs on the cores the steps leave idle: SCHED_IDLE, whose thread any other thread
// preempts the moment it wakes (with a nice value of 19 alone, the analysis kept a core while a
// step's reply, or the client waiting for it, waited, and the main job's steps just after an
// analysis took 2-5x their median). It is not starved: on a saturated machine CFS still gives it
// a weight below nice 19's. Linux applies both per thread; the nice value stays where SCHED_IDLE
// is refused.
// Named for top -H, perf and the test that checks its policy.
void LowerThisThreadsPriority() {
  pthread_setname_np(pthread_self(), "optd-analyzer");
  const pid_t tid = static_cast<pid_t>(syscall(SYS_gettid));
  setpriority(PRIO_PROCESS, static_cast<id_t>(tid), 19);
  sched_param param{};
  param.sched_priority = 0;
  sched_setscheduler(tid, SCHED_IDLE, &param);
}

}  // namespace

absl::StatusOr<v1::TensorAnalysis> AnalyzeSnapshot(Backend& backend, Queue& queue,
                                                   const TensorSnapshot& s, int64_t step,
                                                   const AnalysisOptions& options) {
  const int64_t size = s.rows * s.cols;
  if (s.batch < 1 || size < 1 || static_cast<int64_t>(s.momentum.size()) != s.batch * size ||
      s.update.size() != s.momentum.size() || s.gradient.size() != s.momentum.size()) {
    return absl::InvalidArgumentError(absl::StrCat("analysis of tensor '", s.name,
                                                   "': snapshot sizes do not match ", s.batch, "x",
                                                   s.rows, "x", s.cols));
  }
  OPTD_ASSIGN_OR_RETURN(Buffer work, backend.Allocate(3 * size * sizeof(float)));
  float* momentum = work.f32();
  float* update = momentum + size;
  float* gradient = update + size;
  MatrixAnalysis sum;
  for (int64_t b = 0; b < s.batch; ++b) {
    const size_t bytes = size * sizeof(float);
    OPTD_RETURN_IF_ERROR(backend.Upload(queue, momentum, s.momentum.data() + b * size, bytes));
    OPTD_RETURN_IF_ERROR(backend.Upload(queue, update, s.update.data() + b * size, bytes));
    OPTD_RETURN_IF_ERROR(backend.Upload(queue, gradient, s.gradient.data() + b * size, bytes));
    OPTD_ASSIGN_OR_RETURN(MatrixAnalysis a,
                          AnalyzeMatrix(backend, queue, momentum, update, gradient, s.rows, s.cols,
                                        s.newton_schulz, options));
    sum.estimated = sum.estimated || a.estimated;
    sum.dominance.min += a.dominance.min;
    sum.dominance.avg += a.dominance.avg;
    sum.dominance.max += a.dominance.max;
    sum.rmnp_muon_cosine += a.rmnp_muon_cosine;
    sum.momentum.stable_rank += a.momentum.stable_rank;
    sum.momentum.condition_number += a.momentum.condition_number;
    sum.momentum.entropy += a.momentum.entropy;
    sum.update.stable_rank += a.update.stable_rank;
    sum.update.entropy += a.update.entropy;
    sum.ns_polar_error += a.ns_polar_error;
    sum.ns_small_sv_fraction += a.ns_small_sv_fraction;
    sum.neuron_norm_cv += a.neuron_norm_cv;
    sum.update_rms += a.update_rms;
    sum.grad_norm += a.grad_norm;
  }
  // The mean over the batch, as seed 000 averages per-layer figures.
  const double n = static_cast<double>(s.batch);
  v1::TensorAnalysis out;
  out.set_tensor(s.name);
  out.set_step(step);
  out.set_dominance_ratio_min(sum.dominance.min / n);
  out.set_dominance_ratio_avg(sum.dominance.avg / n);
  out.set_dominance_ratio_max(sum.dominance.max / n);
  out.set_rmnp_muon_cosine(sum.rmnp_muon_cosine / n);
  out.set_stable_rank_momentum(sum.momentum.stable_rank / n);
  out.set_stable_rank_update(sum.update.stable_rank / n);
  out.set_condition_number_momentum(sum.momentum.condition_number / n);
  out.set_singular_value_entropy_momentum(sum.momentum.entropy / n);
  out.set_singular_value_entropy_update(sum.update.entropy / n);
  out.set_ns_polar_error(sum.ns_polar_error / n);
  out.set_ns_small_sv_fraction(sum.ns_small_sv_fraction / n);
  out.set_neuron_norm_cv_update(sum.neuron_norm_cv / n);
  out.set_update_rms(sum.update_rms / n);
  out.set_grad_norm(sum.grad_norm / n);
  out.set_estimated(sum.estimated);
  return out;
}

absl::StatusOr<std::unique_ptr<Analyzer>> Analyzer::Create(Backend& backend, Metrics* metrics,
                                                           AnalyzerOptions options) {
  if (options.max_snapshot_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "analyzer: max_snapshot_bytes must be >= 0, got ", options.max_snapshot_bytes));
  }
  OPTD_RETURN_IF_ERROR(ValidateAnalysisOptions(options.analysis));
  OPTD_ASSIGN_OR_RETURN(std::unique_ptr<Queue> queue, backend.CreateQueue(QueuePriority::kLow));
  return std::unique_ptr<Analyzer>(new Analyzer(backend, metrics, options, std::move(queue)));
}

Analyzer::Analyzer(Backend& backend, Metrics* metrics, AnalyzerOptions options,
                   std::unique_ptr<Queue> queue)
    : backend_(backend), metrics_(metrics), options_(options), queue_(std::move(queue)) {
  thread_ = std::thread([this] { Run(); });
}

Analyzer::~Analyzer() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
  if (metrics_ != nullptr) metrics_->SetBackendMemory("analysis", 0);
}

bool Analyzer::Reserve(const std::string& session, int64_t bytes) {
  {
    absl::MutexLock lock(&mu_);
    if (!stop_ && !reserved_.contains(session) &&
        reserved_bytes_ + bytes <= options_.max_snapshot_bytes) {
      reserved_.insert(session);
      reserved_bytes_ += bytes;
      if (metrics_ != nullptr) metrics_->SetBackendMemory("analysis", reserved_bytes_);
      return true;
    }
  }
  if (metrics_ != nullptr) {
    metrics_->CountAnalysisSkipped(bytes > options_.max_snapshot_bytes ? "too_large" : "busy");
  }
  return false;
}

void Analyzer::Release(const std::string& session, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  reserved_.erase(session);
  reserved_bytes_ -= bytes;
  if (metrics_ != nullptr) metrics_->SetBackendMemory("analysis", reserved_bytes_);
}

void Analyzer::Submit(AnalysisJob job, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  jobs_.emplace_back(std::move(job), bytes);
}

bool Analyzer::HasWorkOrStop() const { return stop_ || !jobs_.empty(); }

bool Analyzer::busy() {
  absl::MutexLock lock(&mu_);
  return !reserved_.empty();
}

void Analyzer::WaitUntilIdle() {
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return reserved_.empty() || stop_; };
  mu_.Await(absl::Condition(&idle));
}

void Analyzer::Run() {
  LowerThisThreadsPriority();
  while (true) {
    std::pair<AnalysisJob, int64_t> next;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &Analyzer::HasWorkOrStop));
      if (stop_) return;
      next = std::move(jobs_.front());
      jobs_.pop_front();
    }
    AnalysisJob& job = next.first;
    const absl::Time start = absl::Now();
    std::vector<v1::TensorAnalysis> figures;
    bool stopped = false;
    for (const TensorSnapshot& snapshot : job.tensors) {
      {
        absl::MutexLock lock(&mu_);
        stopped = stop_;
      }
      if (stopped) break;
      absl::StatusOr<v1::TensorAnalysis> a =
          AnalyzeSnapshot(backend_, *queue_, snapshot, job.step, options_.analysis);
      if (a.ok()) {
        figures.push_back(*std::move(a));
      } else if (metrics_ != nullptr) {
        metrics_->CountAnalysisSkipped("failed");  // e.g. a zero momentum: no direction
      }
    }
    if (!stopped) {
      job.publish(job.step, std::move(figures));
      if (metrics_ != nullptr) metrics_->ObserveAnalysis(absl::Now() - start);
    }
    const std::string session = job.session;
    const int64_t bytes = next.second;
    next = {};  // the snapshot's memory goes before its reservation does
    Release(session, bytes);
  }
}

PendingSnapshot::PendingSnapshot(PendingSnapshot&& other) noexcept
    : analyzer_(std::exchange(other.analyzer_, nullptr)),
      job_(std::move(other.job_)),
      bytes_(other.bytes_),
      tensors_(std::move(other.tensors_)),
      updates_(std::move(other.updates_)) {}

PendingSnapshot::~PendingSnapshot() {
  if (analyzer_ != nullptr) analyzer_->Release(job_.session, bytes_);
}

std::optional<PendingSnapshot> Analyzer::BeginSnapshot(std::string key, int64_t step,
                                                       const std::vector<SnapshotRequest>& tensors,
                                                       Backend& step_backend) {
  int64_t bytes = 0;
  for (const SnapshotRequest& r : tensors) {
    bytes += 3 * static_cast<int64_t>(r.gradient.size() * sizeof(float));
  }
  if (tensors.empty() || !Reserve(key, bytes)) return std::nullopt;
  AnalysisJob job;
  job.session = std::move(key);
  job.step = step;
  PendingSnapshot snapshot(this, std::move(job), bytes);
  // Every buffer is allocated here, before the step changes anything: out of memory, the step
  // goes on without an analysis (and the room is given back as `snapshot` goes).
  try {
    for (const SnapshotRequest& r : tensors) {
      TensorSnapshot& s = snapshot.job_.tensors.emplace_back();
      s.name = r.name;
      s.batch = r.batch;
      s.rows = r.rows;
      s.cols = r.cols;
      s.newton_schulz = r.newton_schulz;
      s.gradient.assign(r.gradient.begin(), r.gradient.end());
      s.momentum.resize(r.gradient.size());
      s.update.resize(r.gradient.size());
      absl::StatusOr<Buffer> update = step_backend.Allocate(r.gradient.size() * sizeof(float));
      if (!update.ok()) return std::nullopt;
      snapshot.updates_.push_back(*std::move(update));
      snapshot.tensors_.push_back(r.tensor);
    }
  } catch (const std::bad_alloc&) {
    return std::nullopt;
  }
  return snapshot;
}

absl::Status Analyzer::Finish(
    PendingSnapshot snapshot, Backend& step_backend,
    const std::function<absl::Status(int tensor, absl::Span<float> out)>& read_momentum,
    std::function<void(int64_t step, std::vector<v1::TensorAnalysis> figures)> publish) {
  for (size_t i = 0; i < snapshot.size(); ++i) {
    TensorSnapshot& s = snapshot.job_.tensors[i];
    OPTD_RETURN_IF_ERROR(read_momentum(snapshot.tensors_[i], absl::MakeSpan(s.momentum)));
    OPTD_RETURN_IF_ERROR(step_backend.Download(step_backend.default_queue(), s.update.data(),
                                               snapshot.updates_[i].data(),
                                               s.update.size() * sizeof(float)));
    OPTD_RETURN_IF_ERROR(step_backend.Synchronize(step_backend.default_queue()));
  }
  snapshot.job_.publish = std::move(publish);
  snapshot.analyzer_ = nullptr;  // the room passes to the job
  Submit(std::move(snapshot.job_), snapshot.bytes_);
  return absl::OkStatus();
}

}  // namespace optd::server
