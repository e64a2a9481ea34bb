#pragma once

// The clock of the timing histograms (PoolConfig::timings: lease use and wait times, statement
// times): steady_clock's time, read for a fraction of its cost. Under a paravirtual clock source
// (kvm-clock) steady_clock::now() costs about 27 ns, two of them a third of an uncontended
// acquire and release; the CPU's time-stamp counter costs about 11.
//
// Where the counter is invariant (constant rate, never stopped: CPUID 8000_0007h EDX bit 8) and
// cheaper to read than steady_clock, each thread keeps a recent pair of readings of both and the
// rate between them, measured over at least 10 ms, and reads the steady clock again every 20 ms;
// anywhere else it is steady_clock::now(). The result stays within a few microseconds of
// steady_clock's, usually well under one (far below the histograms' 100 us resolution), never
// goes back within a thread, and may differ by that much between threads: for durations only,
// never for deadlines.
// Thread-safe (its state is per thread), noexcept.

#include <chrono>

namespace pgrt::detail {

std::chrono::steady_clock::time_point timing_now() noexcept;

// Whether timing_now() reads the time-stamp counter on this machine (for tests and reports).
bool timing_clock_uses_counter() noexcept;

}  // namespace pgrt::detail
