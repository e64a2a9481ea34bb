// timing_now(): steady_clock's time for durations, read cheaply (db/src/timing_clock.hpp).
#include "timing_clock.hpp"

#include <chrono>
#include <cstdint>
#include <gtest/gtest.h>
#include <thread>
#include <vector>

namespace pgrt::detail {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// How far timing_now() is from steady_clock's time, read between two steady readings.
std::chrono::nanoseconds distance_from_steady() {
  const auto before = Clock::now();
  const auto timed = timing_now();
  const auto after = Clock::now();
  if (timed < before) return before - timed;
  if (timed > after) return timed - after;
  return std::chrono::nanoseconds(0);
}

// Over 300 ms (the counter's rate measured, then several 20 ms re-readings of the steady clock),
// it stays within a few microseconds of steady_clock's time, and never goes back.
TEST(TimingClockTest, FollowsTheSteadyClockAndNeverGoesBack) {
  std::chrono::nanoseconds farthest{0};
  Clock::time_point previous = timing_now();
  const auto until = Clock::now() + 300ms;
  std::uint64_t reads = 0;
  while (Clock::now() < until) {
    for (int i = 0; i < 1000; ++i) {
      const auto now = timing_now();
      ASSERT_GE(now, previous) << "after " << reads << " reads";
      previous = now;
      ++reads;
    }
    farthest = std::max(farthest, distance_from_steady());
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_LT(farthest, 20us) << "uses the counter: " << timing_clock_uses_counter();
}

// Durations it measures match the steady clock's, within the histograms' resolution, on threads
// of their own (each keeps its own readings).
TEST(TimingClockTest, MeasuresDurationsOnEveryThread) {
  std::vector<std::thread> threads;
  std::vector<std::chrono::nanoseconds> errors(4);
  for (std::size_t t = 0; t < errors.size(); ++t) {
    threads.emplace_back([&errors, t] {
      (void)timing_now();
      std::this_thread::sleep_for(12ms);  // (its rate measured from here on)
      (void)timing_now();
      std::chrono::nanoseconds worst{0};
      for (int round = 0; round < 20; ++round) {
        // Each timing read between two steady ones: a thread preempted between them widens the
        // bounds, not the error.
        const auto start_low = Clock::now();
        const auto started = timing_now();
        const auto start_high = Clock::now();
        std::this_thread::sleep_for(3ms);
        const auto end_low = Clock::now();
        const auto ended = timing_now();
        const auto end_high = Clock::now();
        const auto took = ended - started;
        std::chrono::nanoseconds error{0};
        if (took < end_low - start_high) error = end_low - start_high - took;
        if (took > end_high - start_low) error = took - (end_high - start_low);
        worst = std::max(worst, error);
      }
      errors[t] = worst;
    });
  }
  for (auto& thread : threads) thread.join();
  for (std::size_t t = 0; t < errors.size(); ++t) {
    EXPECT_LT(errors[t], 20us) << "thread " << t;
  }
}

}  // namespace
}  // namespace pgrt::detail
