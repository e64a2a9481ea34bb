// Small helpers shared by the lifecycle manager and the child processes it runs (internal).
#pragma once

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>

namespace pgrt::lifecycle {

// A completion token that hands an operation's error back as the first element of a tuple
// instead of throwing it: `const auto [error] = co_await timer.async_wait(no_throw);`.
inline constexpr auto no_throw = boost::asio::as_tuple(boost::asio::use_awaitable);

// Whole milliseconds on the steady clock since `since`.
inline std::chrono::milliseconds elapsed_ms(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                               since);
}

// `from` + `duration`, saturated: steady_clock counts nanoseconds (about 292 years in all), and a
// "forever" such as milliseconds::max() would overflow into a deadline in the past (every stop
// cut at once, the watchdog firing at the start of a shutdown). Past the clock's range, the
// deadline is time_point::max(): never. A negative duration gives `from`.
inline std::chrono::steady_clock::time_point deadline_after(
    std::chrono::steady_clock::time_point from, std::chrono::milliseconds duration) {
  using std::chrono::steady_clock;
  if (duration.count() <= 0) return from;
  if (std::chrono::duration_cast<std::chrono::milliseconds>(steady_clock::time_point::max() -
                                                            from) <= duration) {
    return steady_clock::time_point::max();
  }
  return from + duration;
}

}  // namespace pgrt::lifecycle
