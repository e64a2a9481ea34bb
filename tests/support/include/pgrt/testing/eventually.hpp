#pragma once

/// @file
/// Polling for a condition that becomes true asynchronously (a process exiting, a backend going).

#include <chrono>
#include <thread>

namespace pgrt::testing {

/// Calls `condition()` every 20 ms until it returns true (then true) or `patience` runs out
/// (then false).
template <typename Condition>
bool eventually(Condition condition,
                std::chrono::milliseconds patience = std::chrono::seconds(10)) {
  const auto deadline = std::chrono::steady_clock::now() + patience;
  while (!condition()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

}  // namespace pgrt::testing
