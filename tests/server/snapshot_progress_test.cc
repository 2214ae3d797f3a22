// SnapshotProgress: GetParams waits for each piece of its snapshot until the copier says it is
// there, and learns of a copy that failed.
#include "server/snapshot_progress.h"

#include <atomic>
#include <thread>

#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace optd::server {
namespace {

TEST(SnapshotProgressTest, AReaderWaitsUntilItsPieceIsCopied) {
  SnapshotProgress progress;
  std::atomic<bool> returned{false};
  absl::Status status = absl::UnknownError("not returned");
  std::thread reader([&] {
    status = progress.WaitFor(1, 10);
    returned = true;
  });
  progress.Copied(0, 100);
  progress.Copied(1, 9);
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_FALSE(returned.load()) << "returned before elements [0, 10) of tensor 1 were copied";
  progress.Copied(1, 10);
  reader.join();
  EXPECT_TRUE(status.ok()) << status;
  progress.Finish(absl::OkStatus());
  progress.WaitDone();
}

TEST(SnapshotProgressTest, ALaterTensorMeansEveryEarlierOneIsWhole) {
  SnapshotProgress progress;
  progress.Copied(3, 1);
  EXPECT_TRUE(progress.WaitFor(2, int64_t{1} << 40).ok());
  EXPECT_TRUE(progress.WaitFor(3, 1).ok());
  // Positions only move forward.
  progress.Copied(1, 5);
  EXPECT_TRUE(progress.WaitFor(2, 7).ok());
  progress.Finish(absl::OkStatus());
}

TEST(SnapshotProgressTest, AFailedCopyEndsEveryWaitWithItsError) {
  SnapshotProgress progress;
  absl::Status status;
  std::thread reader([&] { status = progress.WaitFor(4, 1); });
  progress.Copied(0, 3);
  progress.Finish(absl::FailedPreconditionError("session 's' was damaged"));
  reader.join();
  EXPECT_EQ(status, absl::FailedPreconditionError("session 's' was damaged"));
  // Even for what was copied before it failed, and the first Finish counts.
  progress.Finish(absl::OkStatus());
  EXPECT_EQ(progress.WaitFor(0, 1).code(), absl::StatusCode::kFailedPrecondition);
  progress.WaitDone();
}

TEST(SnapshotProgressTest, ACompleteCopySatisfiesEveryWait) {
  SnapshotProgress progress;
  std::thread copier([&] { progress.Finish(absl::OkStatus()); });
  progress.WaitDone();
  copier.join();
  EXPECT_TRUE(progress.WaitFor(7, 123).ok());
}

}  // namespace
}  // namespace optd::server
