// The CPU backend's thread pool: every index once, chunks no shorter than the grain, callers from
// several threads served one loop at a time, and a clean shutdown.
#include "kernels/cpu/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

namespace optd {
namespace {

TEST(ThreadPoolTest, CoversEveryIndexOnceInChunksOfAtLeastTheGrain) {
  for (int threads : {1, 2, 5}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.threads(), threads);
    for (int64_t n : {0, 1, 7, 1000, 100003}) {
      for (int64_t grain : {1, 64, 1 << 20}) {
        std::vector<std::atomic<int>> hits(n);
        std::atomic<int> chunks{0};
        std::atomic<bool> short_chunk{false};
        pool.ParallelFor(n, grain, [&](int64_t begin, int64_t end) {
          ++chunks;
          if (end - begin < grain && end - begin < n) short_chunk = true;
          for (int64_t i = begin; i < end; ++i) ++hits[i];
        });
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i], 1) << n << " " << grain << " " << i;
        EXPECT_FALSE(short_chunk) << n << " " << grain;
        EXPECT_LE(chunks, threads);
        if (n == 0) {
          EXPECT_EQ(chunks, 0);
        }
      }
    }
  }
}

TEST(ThreadPoolTest, UsesItsWorkersForLongLoops) {
  ThreadPool pool(3);
  std::vector<std::thread::id> ids(3);
  pool.ParallelFor(3, 1, [&](int64_t begin, int64_t) { ids[begin] = std::this_thread::get_id(); });
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < i; ++j) EXPECT_NE(ids[i], ids[j]);
  }
}

TEST(ThreadPoolTest, CallersFromSeveralThreadsEachGetTheirWholeLoop) {
  ThreadPool pool(2);
  std::vector<std::thread> callers;
  std::vector<int64_t> sums(4, 0);
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&pool, &sums, c] {
      for (int round = 0; round < 50; ++round) {
        std::atomic<int64_t> sum{0};
        pool.ParallelFor(10000, 100, [&](int64_t begin, int64_t end) {
          int64_t local = 0;
          for (int64_t i = begin; i < end; ++i) local += i;
          sum += local;
        });
        sums[c] += sum;
      }
    });
  }
  for (std::thread& t : callers) t.join();
  for (int64_t s : sums) EXPECT_EQ(s, int64_t{50} * (9999 * 10000 / 2));
}

}  // namespace
}  // namespace optd
