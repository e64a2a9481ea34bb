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

}  // namespace pgrt::lifecycle
