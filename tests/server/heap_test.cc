// KeepFreedHeap: memory a step frees is reused by the next step's allocations, without pages
// faulted in anew.
#include "server/heap.h"

#include <sys/resource.h>

#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace optd::server {
namespace {

[[maybe_unused]] long MinorFaults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

// One round of what a step does to the heap: one thread builds four 440 KiB messages by
// appending 4 KiB pieces (a message's bytes fields grow so as they are parsed or encoded),
// another frees them (gRPC's threads come and go). The minor page faults this took.
[[maybe_unused]] long FaultsOfOneRound() {
  const long before = MinorFaults();
  std::vector<std::unique_ptr<std::string>> messages;
  std::thread([&] {
    for (int m = 0; m < 4; ++m) {
      auto message = std::make_unique<std::string>();
      for (int piece = 0; piece < 110; ++piece) message->append(4096, 'x');
      messages.push_back(std::move(message));
    }
  }).join();
  std::thread([&] { messages.clear(); }).join();
  return MinorFaults() - before;
}

TEST(HeapTest, FreedMessagesAreReusedWithoutFaults) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || !defined(__GLIBC__)
  GTEST_SKIP() << "the sanitizers' allocators (and C libraries other than glibc) keep their own "
                  "policy";
#else
  ASSERT_TRUE(KeepFreedHeap(int64_t{32} << 20).ok());
  // The first rounds grow the heap and fault its pages in; the next ones reuse it. With glibc's
  // dynamic defaults the heap is trimmed after each round and the next faults its pages in again
  // (measured: about 540 faults a round).
  for (int round = 0; round < 5; ++round) FaultsOfOneRound();
  long faults = 0;
  for (int round = 0; round < 20; ++round) faults += FaultsOfOneRound();
  EXPECT_LT(faults, 200) << "20 rounds of 1.7 MiB of messages each faulted in " << faults
                         << " pages";
#endif
}

TEST(HeapTest, RefusesSizesMallocCannotTake) {
  EXPECT_TRUE(KeepFreedHeap(0).ok());
  for (int64_t bytes : {int64_t{-1}, int64_t{3} << 30}) {
    const absl::Status status = KeepFreedHeap(bytes);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bytes;
    EXPECT_NE(status.message().find(std::to_string(bytes)), std::string::npos) << status;
  }
}

}  // namespace
}  // namespace optd::server
