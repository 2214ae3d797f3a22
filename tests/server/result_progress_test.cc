// ResultProgress: the stream that streams a step's results early takes each tensor in the order
// its result became final, waits for the next, and learns of a step that failed after its
// first results were final (then sends none of them).
#include "server/result_progress.h"

#include <atomic>
#include <optional>
#include <thread>

#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace optd::server {
namespace {

TEST(ResultProgressTest, TensorsComeInTheOrderTheyBecameFinalThenTheRestInTensorOrder) {
  ResultProgress progress;
  progress.Reset(4);
  progress.Ready(2);
  progress.Ready(0);
  progress.Ready(2);  // once is enough
  progress.Ready(7);  // no such tensor
  EXPECT_EQ(progress.Next(0).value(), 2);
  EXPECT_EQ(progress.Next(1).value(), 0);
  EXPECT_EQ(progress.final_so_far(), (std::vector<int>{2, 0}));
  progress.Finish(absl::OkStatus());
  progress.Ready(1);  // after the end: nothing changes
  EXPECT_EQ(progress.Next(2).value(), 1);
  EXPECT_EQ(progress.Next(3).value(), 3);
  EXPECT_EQ(progress.Next(4).value(), std::nullopt);
  // Reused by the next step: nothing final again.
  progress.Reset(2);
  EXPECT_TRUE(progress.final_so_far().empty());
  progress.Finish(absl::OkStatus());
  EXPECT_EQ(progress.final_so_far(), (std::vector<int>{0, 1}));
}

TEST(ResultProgressTest, AReaderWaitsUntilTheNextResultIsFinal) {
  ResultProgress progress;
  progress.Reset(3);
  progress.Ready(1);
  std::atomic<bool> returned{false};
  absl::StatusOr<std::optional<int>> next = absl::UnknownError("not returned");
  std::thread reader([&] {
    next = progress.Next(1);
    returned = true;
  });
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_FALSE(returned.load()) << "returned before a second result was final";
  progress.Ready(0);
  reader.join();
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(*next, 0);
}

TEST(ResultProgressTest, AStepThatFailsEndsEveryWaitAndSendsNoneOfItsResults) {
  ResultProgress progress;
  progress.Reset(3);
  progress.Ready(2);
  absl::StatusOr<std::optional<int>> waiting = absl::UnknownError("not returned");
  std::thread reader([&] { waiting = progress.Next(1); });
  const absl::Status failure = absl::InternalError("step failed in the cpu backend: svd");
  progress.Finish(failure);
  progress.Finish(absl::OkStatus());  // the first call counts
  reader.join();
  EXPECT_EQ(waiting.status(), failure);
  // Even the result that was final before: the step it belongs to did not commit.
  EXPECT_EQ(progress.Next(0).status(), failure);
}

}  // namespace
}  // namespace optd::server
