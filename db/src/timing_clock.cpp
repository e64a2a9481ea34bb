#include "timing_clock.hpp"

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <x86intrin.h>
#define PGRT_TIMING_CLOCK_COUNTER 1
#endif

namespace pgrt::detail {

namespace {

using Clock = std::chrono::steady_clock;

#ifdef PGRT_TIMING_CLOCK_COUNTER

bool counter_is_invariant() noexcept {
  unsigned eax = 0;
  unsigned ebx = 0;
  unsigned ecx = 0;
  unsigned edx = 0;
  if (__get_cpuid(0x80000000U, &eax, &ebx, &ecx, &edx) == 0 || eax < 0x80000007U) return false;
  if (__get_cpuid(0x80000007U, &eax, &ebx, &ecx, &edx) == 0) return false;
  return (edx & (1U << 8U)) != 0;
}

// Some hypervisors trap the counter's reads (microseconds each): it is used only when a read
// costs less than steady_clock's, measured once.
bool counter_is_cheaper() noexcept {
  constexpr int reads = 200;
  std::uint64_t sink = 0;
  const auto counter_started = Clock::now();
  for (int i = 0; i < reads; ++i) sink += __rdtsc();
  const auto counter_took = Clock::now() - counter_started;
  const auto clock_started = Clock::now();
  for (int i = 0; i < reads; ++i)
    sink += static_cast<std::uint64_t>(Clock::now().time_since_epoch().count());
  const auto clock_took = Clock::now() - clock_started;
  return sink != 0 && counter_took < clock_took;
}

// A reading of both clocks at about the same moment: the counter read before and after the
// steady clock, and their midpoint kept, the tightest of a few tries (a thread preempted between
// the reads would skew the rate measured from it).
struct Reading {
  std::uint64_t ticks = 0;  // 0: no usable reading
  Clock::time_point at{};
};

Reading read_both_clocks() noexcept {
  constexpr std::uint64_t tight_enough = 2000;  // ticks: under a microsecond
  Reading best;
  std::uint64_t best_width = ~std::uint64_t{0};
  for (int attempt = 0; attempt < 4 && best_width > tight_enough; ++attempt) {
    const std::uint64_t before = __rdtsc();
    const Clock::time_point at = Clock::now();
    const std::uint64_t after = __rdtsc();
    if (after < before || after - before >= best_width) continue;
    best_width = after - before;
    best = Reading{.ticks = before + best_width / 2, .at = at};
  }
  return best;
}

// A thread's recent reading of both clocks and the rate between them.
struct Anchor {
  Reading reading;
  double nanoseconds_per_tick = 0;  // 0: not measured yet
  Clock::time_point last{};         // the last time returned (never go back)
};

// The counter's time is extrapolated from the last reading for at most 20 ms; the rate comes
// from the two last readings, at least 10 ms apart (a tight reading's skew, under a microsecond
// and usually tens of nanoseconds, makes an error of at most 1e-4 of a duration: at most 2 us by
// the next reading, usually well under one).
constexpr double reread_after_nanoseconds = 20e6;
constexpr Clock::duration shortest_measure = std::chrono::milliseconds(10);

thread_local Anchor anchor;

Clock::time_point from_counter() noexcept {
  Anchor& a = anchor;
  const std::uint64_t ticks = __rdtsc();
  if (a.nanoseconds_per_tick > 0 && ticks >= a.reading.ticks) {
    const double elapsed = static_cast<double>(ticks - a.reading.ticks) * a.nanoseconds_per_tick;
    if (elapsed < reread_after_nanoseconds) {
      const auto now = a.reading.at + std::chrono::nanoseconds(static_cast<std::int64_t>(elapsed));
      a.last = std::max(a.last, now);
      return a.last;
    }
  }
  // Read both clocks: the first time, the rate not measured yet, or 20 ms on.
  const Reading reading = read_both_clocks();
  if (reading.ticks == 0) return a.last = std::max(a.last, Clock::now());
  if (a.reading.ticks == 0 || reading.ticks < a.reading.ticks) {
    a.reading = reading;  // (the first, or a counter that went back: start over)
    a.nanoseconds_per_tick = 0;
  } else if (reading.at - a.reading.at >= shortest_measure) {
    a.nanoseconds_per_tick =
        static_cast<double>(std::chrono::nanoseconds(reading.at - a.reading.at).count()) /
        static_cast<double>(reading.ticks - a.reading.ticks);
    a.reading = reading;
  }
  a.last = std::max(a.last, reading.at);
  return a.last;
}

#endif

}  // namespace

bool timing_clock_uses_counter() noexcept {
#ifdef PGRT_TIMING_CLOCK_COUNTER
  static const bool uses_counter = counter_is_invariant() && counter_is_cheaper();
  return uses_counter;
#else
  return false;
#endif
}

Clock::time_point timing_now() noexcept {
#ifdef PGRT_TIMING_CLOCK_COUNTER
  if (timing_clock_uses_counter()) return from_counter();
#endif
  return Clock::now();
}

}  // namespace pgrt::detail
