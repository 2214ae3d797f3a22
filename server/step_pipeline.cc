#include "server/step_pipeline.h"

#include <algorithm>
#include <utility>

namespace optd::server {

Pipeliner::Pipeliner(Options options) : options_(options) {
  for (int i = 0; i < std::max(1, options_.threads); ++i) threads_.emplace_back([this] { Loop(); });
}

Pipeliner::~Pipeliner() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    tasks_.clear();
    work_.SignalAll();
  }
  for (std::thread& t : threads_) t.join();
}

bool Pipeliner::Reserve(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  if (bytes < 0 || bytes > options_.scratch_bytes - reserved_) return false;
  reserved_ += bytes;
  return true;
}

void Pipeliner::Release(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  reserved_ -= bytes;
}

int64_t Pipeliner::reserved_bytes() const {
  absl::MutexLock lock(&mu_);
  return reserved_;
}

void Pipeliner::Schedule(std::function<void()> task) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return;
  tasks_.push_back(std::move(task));
  work_.Signal();
}

void Pipeliner::Loop() {
  while (true) {
    std::function<void()> task;
    {
      absl::MutexLock lock(&mu_);
      while (!stopping_ && tasks_.empty()) work_.Wait(&mu_);
      if (stopping_) return;
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    task();
  }
}

StepPipeline::StepPipeline(absl::Mutex& session_mu, Options options)
    : session_mu_(session_mu), options_(options) {}

void StepPipeline::StartOver(int64_t step, std::optional<double> lr, int64_t epoch) {
  step_ = step;
  lr_ = lr;
  epoch_ = epoch;
  broken_ = false;
  workers_.clear();
  arrivals_.assign(static_cast<size_t>(options_.num_tensors), 0);
  in_range_.assign(static_cast<size_t>(options_.num_tensors), 1);
  ready_.clear();
}

bool StepPipeline::Register(int64_t step, int worker, TensorStaging* staging,
                            std::optional<double> lr, int64_t epoch, bool& start_over) {
  session_mu_.AssertHeld();
  absl::MutexLock lock(&mu_);
  start_over = step_ != step || (broken_ && workers_.empty()) || epoch_ != epoch;
  if (start_over) StartOver(step, lr, epoch);
  if (broken_ || workers_.contains(worker)) return false;
  if (lr != lr_) {
    broken_ = true;
    return false;
  }
  workers_[worker] = staging;
  return true;
}

bool StepPipeline::RegisteredLocked(const TensorStaging* staging) const {
  for (const auto& [worker, registered] : workers_) {
    if (registered == staging) return true;
  }
  return false;
}

bool StepPipeline::Registered(const TensorStaging* staging) {
  absl::MutexLock lock(&mu_);
  return RegisteredLocked(staging);
}

bool StepPipeline::Arrived(const TensorStaging* staging, int tensor, bool in_range) {
  absl::MutexLock lock(&mu_);
  if (broken_ || !RegisteredLocked(staging)) return false;
  if (!in_range) in_range_[tensor] = 0;
  if (++arrivals_[tensor] < options_.world_size) return false;
  ready_.push_back(tensor);
  if (scheduled_) return false;
  scheduled_ = true;
  return true;
}

void StepPipeline::Forget(const TensorStaging* staging) {
  session_mu_.AssertHeld();
  absl::MutexLock lock(&mu_);
  for (auto it = workers_.begin(); it != workers_.end(); ++it) {
    if (it->second == staging) {
      workers_.erase(it);
      broken_ = true;
      ready_.clear();
      return;
    }
  }
}

std::optional<int> StepPipeline::NextReady(int64_t step, int64_t epoch) {
  session_mu_.AssertHeld();
  absl::MutexLock lock(&mu_);
  if (step_ != step || broken_ || epoch_ != epoch) ready_.clear();
  if (ready_.empty()) {
    scheduled_ = false;
    return std::nullopt;
  }
  const int tensor = ready_.front();
  ready_.pop_front();
  return tensor;
}

std::vector<const float*> StepPipeline::Inputs(int tensor) {
  session_mu_.AssertHeld();
  absl::MutexLock lock(&mu_);
  std::vector<const float*> inputs;
  for (const auto& [worker, staging] : workers_) inputs.push_back(staging->data(tensor));
  return inputs;
}

bool StepPipeline::InRange(int tensor) {
  session_mu_.AssertHeld();
  absl::MutexLock lock(&mu_);
  const size_t t = static_cast<size_t>(tensor);
  return t < in_range_.size() && in_range_[t] != 0 && arrivals_[t] >= options_.world_size;
}

void StepPipeline::Break() {
  session_mu_.AssertHeld();
  absl::MutexLock lock(&mu_);
  broken_ = true;
  ready_.clear();
}

bool StepPipeline::Usable(int64_t step, int64_t epoch, std::optional<double> lr,
                          const std::map<int, std::unique_ptr<TensorStaging>>& contributions) {
  session_mu_.AssertHeld();
  absl::MutexLock lock(&mu_);
  if (step_ != step || broken_ || epoch_ != epoch || lr_ != lr) return false;
  if (workers_.size() != contributions.size()) return false;
  for (const auto& [worker, staging] : contributions) {
    auto it = workers_.find(worker);
    if (it == workers_.end() || it->second != staging.get()) return false;
  }
  return true;
}

std::optional<double> StepPipeline::lr() {
  session_mu_.AssertHeld();
  absl::MutexLock lock(&mu_);
  return lr_;
}

std::shared_ptr<StepOutcome>& StepPipeline::outcome() {
  session_mu_.AssertHeld();
  return outcome_;
}

}  // namespace optd::server
