// StepRound driven directly, on a fake clock: rounds commit once when every worker has
// contributed, retries are not counted twice, stragglers abort at the deadline the clock (not a
// real sleep) reaches, cancelled workers withdraw, and outcome buffers are reused only without
// readers.
#include "server/step_round.h"

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/server/fake_clock.h"

namespace optd::server {
namespace {

using ::testing::HasSubstr;

const std::vector<std::string> kNames = {"a", "b"};
const std::vector<int64_t> kCounts = {3, 2};
const std::function<bool()> kNever = [] { return false; };

// A complete staging of tensor "a" (and "b" when `both`) filled with `value`.
std::unique_ptr<TensorStaging> Gradients(StagingPool& pool, float value, bool both = false) {
  std::unique_ptr<TensorStaging> staging = *pool.Acquire();
  for (int t = 0; t < (both ? 2 : 1); ++t) {
    std::vector<float> values(static_cast<size_t>(kCounts[t]), value);
    EXPECT_TRUE(staging
                    ->AddChunk(t, 0, DType::kF32,
                               absl::string_view(reinterpret_cast<const char*>(values.data()),
                                                 values.size() * sizeof(float)),
                               3e38f, true)
                    .ok());
  }
  return staging;
}

class StepRoundTest : public ::testing::Test {
 protected:
  void Make(int world_size, absl::Duration straggler_timeout = absl::Seconds(60)) {
    pool_ = std::make_unique<StagingPool>("s", std::make_shared<const TensorIndex>(kNames), kCounts,
                                          world_size + 1);
    round_ = std::make_unique<StepRound>(
        mu_, StepRound::Options{"s", world_size, straggler_timeout, &clock_, pool_.get(),
                                [this](const TensorStaging*) {
                                  mu_.AssertHeld();  // the pipeline forgets under the lock
                                  ++given_back_;
                                }});
  }

  absl::StatusOr<StepRound::Ticket> Join(int worker, int64_t step, float value,
                                         std::optional<double> lr = std::nullopt,
                                         bool both = false) {
    std::unique_ptr<TensorStaging> g = Gradients(*pool_, value, both);
    absl::MutexLock lock(&mu_);
    return round_->Join(worker, step, lr, std::move(g), kNever, kNames);
  }

  // A worker's whole call, as Session::Step makes it: join, then wait (or commit when last).
  absl::StatusOr<std::shared_ptr<StepOutcome>> Contribute(
      int worker, int64_t step, float value, const std::function<bool()>& cancelled = kNever) {
    std::unique_ptr<TensorStaging> g = Gradients(*pool_, value);
    absl::MutexLock lock(&mu_);
    absl::StatusOr<StepRound::Ticket> ticket =
        round_->Join(worker, step, std::nullopt, std::move(g), cancelled, kNames);
    if (!ticket.ok()) return ticket.status();
    if (ticket->complete) {
      std::shared_ptr<StepOutcome> outcome = round_->NewOutcome();
      outcome->step = step;
      const absl::Span<const float> mean = round_->MeanInFirst(0, kCounts[0]);
      mean_.assign(mean.begin(), mean.end());
      ++commits_;
      round_->Completed(outcome);
      round_->End(outcome);
      return outcome;
    }
    return round_->Wait(*ticket, worker, cancelled);
  }

  // Waits (in real time, briefly) until `n` workers have contributed.
  void AwaitPending(int n) {
    while (round_->workers_pending() != n) absl::SleepFor(absl::Milliseconds(1));
  }

  // How many more stagings the pool hands out before its limit: the contributions it holds.
  int FreeStagings() {
    std::vector<std::unique_ptr<TensorStaging>> taken;
    while (true) {
      absl::StatusOr<std::unique_ptr<TensorStaging>> s = pool_->Acquire();
      if (!s.ok()) break;
      taken.push_back(*std::move(s));
    }
    const int n = static_cast<int>(taken.size());
    for (auto& s : taken) pool_->Release(std::move(s));
    return n;
  }

  FakeClock clock_;
  absl::Mutex mu_;
  std::unique_ptr<StagingPool> pool_;
  std::unique_ptr<StepRound> round_;
  std::vector<float> mean_;
  int commits_ = 0;
  int given_back_ = 0;  // stagings the round reported giving back to the pool
};

TEST_F(StepRoundTest, TheLastContributionCompletesTheRoundAndEveryWorkerGetsItsOutcome) {
  Make(3);
  std::vector<absl::StatusOr<std::shared_ptr<StepOutcome>>> results(3,
                                                                    absl::UnknownError("not run"));
  std::vector<std::thread> workers;
  for (int w : {2, 0}) {
    workers.emplace_back([&, w] { results[w] = Contribute(w, 1, 1.0f + w); });
    AwaitPending(w == 2 ? 1 : 2);
  }
  results[1] = Contribute(1, 1, 2.0f);
  for (std::thread& t : workers) t.join();
  ASSERT_EQ(commits_, 1);
  for (const auto& r : results) {
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->get(), results[1]->get()) << "one outcome, shared";
  }
  // The mean of 1, 2 and 3, summed in worker order whatever the arrival order.
  EXPECT_THAT(mean_, ::testing::Each(((1.0f + 2.0f) + 3.0f) / 3.0f));
  EXPECT_EQ(round_->workers_pending(), 0);
  EXPECT_EQ(FreeStagings(), 4) << "every contribution went back to the pool";
  absl::MutexLock lock(&mu_);
  EXPECT_FALSE(round_->pending());
  EXPECT_EQ(round_->LastOutcome().get(), results[0]->get());
}

TEST_F(StepRoundTest, ARetryOfACountedContributionIsNotCountedAgain) {
  Make(2);
  absl::StatusOr<std::shared_ptr<StepOutcome>> first, retry;
  std::thread a([&] { first = Contribute(0, 1, 1.0f); });
  AwaitPending(1);
  std::thread b([&] { retry = Contribute(0, 1, 100.0f); });  // a retry: its values are ignored
  // Both calls of worker 0 wait; the pool holds only the first's contribution.
  absl::SleepFor(absl::Milliseconds(20));
  EXPECT_EQ(round_->workers_pending(), 1);
  EXPECT_EQ(FreeStagings(), 2);
  absl::StatusOr<std::shared_ptr<StepOutcome>> last = Contribute(1, 1, 3.0f);
  a.join();
  b.join();
  ASSERT_TRUE(first.ok() && retry.ok() && last.ok());
  EXPECT_EQ(first->get(), retry->get());
  EXPECT_EQ(commits_, 1);
  EXPECT_THAT(mean_, ::testing::Each(2.0f));
}

TEST_F(StepRoundTest, JoinTellsARetryApart) {
  Make(2);
  absl::StatusOr<StepRound::Ticket> first = Join(0, 1, 1.0f);
  absl::StatusOr<StepRound::Ticket> again = Join(0, 1, 1.0f);
  ASSERT_TRUE(first.ok() && again.ok());
  EXPECT_FALSE(first->replayed);
  EXPECT_FALSE(first->complete);
  EXPECT_TRUE(again->replayed);
  EXPECT_EQ(first->round, again->round);
  absl::StatusOr<StepRound::Ticket> last = Join(1, 1, 1.0f);
  ASSERT_TRUE(last.ok());
  EXPECT_TRUE(last->complete);
}

TEST_F(StepRoundTest, AStragglerAbortsTheRoundWhenTheClockPassesTheDeadline) {
  Make(3, absl::Seconds(30));
  absl::StatusOr<std::shared_ptr<StepOutcome>> waiting;
  std::thread worker([&] { waiting = Contribute(1, 7, 1.0f); });
  AwaitPending(1);
  // Real time passes, the clock's does not: the round stays open.
  clock_.Advance(absl::Seconds(29));
  absl::SleepFor(absl::Milliseconds(30));
  EXPECT_EQ(round_->workers_pending(), 1);
  clock_.Advance(absl::Seconds(1));
  worker.join();
  EXPECT_EQ(waiting.status().code(), absl::StatusCode::kAborted);
  EXPECT_THAT(std::string(waiting.status().message()),
              HasSubstr("step 7 of session 's' aborted: worker(s) 0, 2 sent no gradients within "
                        "the straggler timeout of 30s; nothing was applied"));
  EXPECT_EQ(round_->workers_pending(), 0);
  EXPECT_EQ(FreeStagings(), 4);
  // The next round starts a fresh deadline and commits.
  absl::StatusOr<std::shared_ptr<StepOutcome>> again;
  std::thread next([&] { again = Contribute(0, 7, 1.0f); });
  AwaitPending(1);
  ASSERT_TRUE(Join(1, 7, 1.0f).ok());
  absl::StatusOr<std::shared_ptr<StepOutcome>> last = Contribute(2, 7, 1.0f);
  next.join();
  ASSERT_TRUE(last.ok()) << last.status();
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(commits_, 1);
}

TEST_F(StepRoundTest, ACancelledWorkerWithdrawsItsContribution) {
  Make(2);
  std::atomic<bool> cancel{false};
  absl::StatusOr<std::shared_ptr<StepOutcome>> waiting;
  std::thread worker([&] { waiting = Contribute(0, 1, 5.0f, [&] { return cancel.load(); }); });
  AwaitPending(1);
  cancel = true;
  worker.join();
  EXPECT_EQ(waiting.status().code(), absl::StatusCode::kCancelled);
  EXPECT_THAT(std::string(waiting.status().message()),
              HasSubstr("worker 0's gradients for step 1 are withdrawn"));
  EXPECT_EQ(round_->workers_pending(), 0);
  EXPECT_EQ(FreeStagings(), 3);
  // Worker 0 sends again; the step runs on the new values only.
  std::thread again([&] { waiting = Contribute(0, 1, 1.0f); });
  AwaitPending(1);
  ASSERT_TRUE(Contribute(1, 1, 3.0f).ok());
  again.join();
  ASSERT_TRUE(waiting.ok());
  EXPECT_THAT(mean_, ::testing::Each(2.0f));
}

TEST_F(StepRoundTest, ACancelledAttemptKeepsTheContributionWhileItsRetryWaits) {
  Make(2);
  std::atomic<bool> cancel_first{false};
  absl::StatusOr<std::shared_ptr<StepOutcome>> first, retry;
  std::thread a([&] { first = Contribute(0, 1, 1.0f, [&] { return cancel_first.load(); }); });
  AwaitPending(1);
  std::thread b([&] { retry = Contribute(0, 1, 1.0f); });
  absl::SleepFor(absl::Milliseconds(20));  // the retry waits too
  cancel_first = true;
  a.join();
  EXPECT_EQ(first.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(round_->workers_pending(), 1) << "the retry still waits on the contribution";
  ASSERT_TRUE(Contribute(1, 1, 3.0f).ok());
  b.join();
  ASSERT_TRUE(retry.ok()) << retry.status();
  EXPECT_THAT(mean_, ::testing::Each(2.0f));
}

TEST_F(StepRoundTest, ACancelledCallIsNotCounted) {
  Make(2);
  std::unique_ptr<TensorStaging> g = Gradients(*pool_, 1.0f);
  absl::MutexLock lock(&mu_);
  absl::StatusOr<StepRound::Ticket> ticket = round_->Join(
      0, 1, std::nullopt, std::move(g), [] { return true; }, kNames);
  EXPECT_EQ(ticket.status().code(), absl::StatusCode::kCancelled);
  EXPECT_FALSE(round_->pending());
}

TEST_F(StepRoundTest, ContributionsMustAgreeOnTensorsAndLearningRate) {
  Make(3);
  ASSERT_TRUE(Join(0, 4, 1.0f, 0.5).ok());
  absl::StatusOr<StepRound::Ticket> more = Join(1, 4, 1.0f, 0.5, /*both=*/true);
  EXPECT_EQ(more.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(more.status().message()),
              HasSubstr("worker 1 sent gradients for {a, b} but worker 0 sent {a} for step 4 "
                        "of session 's'"));
  absl::StatusOr<StepRound::Ticket> other_lr = Join(2, 4, 1.0f, 0.25);
  EXPECT_EQ(other_lr.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(other_lr.status().message()),
              HasSubstr("worker 2 sent lr 0.25 but worker 0 sent lr 0.5"));
  absl::StatusOr<StepRound::Ticket> no_lr = Join(2, 4, 1.0f);
  EXPECT_THAT(std::string(no_lr.status().message()),
              HasSubstr("worker 2 sent lr none but worker 0 sent lr 0.5"));
  EXPECT_EQ(round_->workers_pending(), 1) << "refused contributions are not counted";
  EXPECT_EQ(FreeStagings(), 3);
  absl::MutexLock lock(&mu_);
  EXPECT_EQ(round_->lr(), 0.5);
}

TEST_F(StepRoundTest, EveryStagingGivenBackIsReportedFirst) {
  // A retry's copy, a refused contribution, and the round's own at its end: each one reported
  // (the step pipeline must stop reading a staging before it is reused).
  Make(2);
  ASSERT_TRUE(Join(0, 1, 1.0f).ok());
  EXPECT_EQ(given_back_, 0);
  ASSERT_TRUE(Join(0, 1, 1.0f).ok());  // a retry: its staging goes back
  EXPECT_EQ(given_back_, 1);
  EXPECT_FALSE(Join(1, 1, 1.0f, 0.5).ok());  // another lr: refused, given back
  EXPECT_EQ(given_back_, 2);
  {
    absl::MutexLock lock(&mu_);
    round_->Abort(absl::AbortedError("test"));
  }
  EXPECT_EQ(given_back_, 3);
  EXPECT_EQ(FreeStagings(), 3);
}

TEST_F(StepRoundTest, AbortEndsAPendingRoundForEveryWaiter) {
  Make(3);
  std::vector<absl::StatusOr<std::shared_ptr<StepOutcome>>> results(2,
                                                                    absl::UnknownError("not run"));
  std::vector<std::thread> workers;
  for (int w = 0; w < 2; ++w) {
    workers.emplace_back([&, w] { results[w] = Contribute(w, 1, 1.0f); });
    AwaitPending(w + 1);
  }
  {
    absl::MutexLock lock(&mu_);
    round_->Abort(absl::NotFoundError("session 's' was deleted"));
    round_->Abort(absl::NotFoundError("twice is a no-op"));
  }
  for (std::thread& t : workers) t.join();
  for (const auto& r : results) {
    EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("was deleted"));
  }
  EXPECT_EQ(FreeStagings(), 4);
}

TEST_F(StepRoundTest, OutcomeBuffersAreReusedOnlyOnceNoReaderHoldsThem) {
  Make(1);
  absl::MutexLock lock(&mu_);
  std::shared_ptr<StepOutcome> first = round_->NewOutcome();
  first->values = {{1, 2, 3}};
  first->checkpoint_error = "disk full";
  round_->Completed(first);
  std::shared_ptr<StepOutcome> second = round_->NewOutcome();
  ASSERT_NE(second, first) << "the last outcome serves retries";
  round_->Completed(second);  // `first` is the spare now
  {
    std::shared_ptr<const StepOutcome> reader = StepRound::Lease(first);
    std::shared_ptr<StepOutcome> third = round_->NewOutcome();
    EXPECT_NE(third, first) << "a reader still holds the spare";
    EXPECT_NE(third, second);
    round_->Completed(third);  // the spare is `second` now
  }
  std::shared_ptr<StepOutcome> fourth = round_->NewOutcome();
  EXPECT_EQ(fourth, second) << "no reader: the spare's buffers are reused";
  EXPECT_TRUE(fourth->checkpoint_error.empty());
  EXPECT_EQ(fourth->step, 0);
  round_->Completed(fourth);
  EXPECT_TRUE(round_->has_last_outcome());
  round_->DropOutcomes();
  EXPECT_FALSE(round_->has_last_outcome());
  EXPECT_EQ(round_->LastOutcome(), nullptr);
}

}  // namespace
}  // namespace optd::server
