#pragma once

/// @file
/// Runs a coroutine to completion on a fresh io_context, for tests.

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <exception>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>

namespace pgrt::testing {

/// Waits `duration` on the calling coroutine's executor. Cancellation: as the timer's wait (a
/// cancelled sleep throws boost::system::system_error).
inline boost::asio::awaitable<void> sleep_for(std::chrono::steady_clock::duration duration) {
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor, duration);
  co_await timer.async_wait(boost::asio::use_awaitable);
}

/// Calls `make_coroutine()` (returning boost::asio::awaitable<T>) on a new single-threaded
/// io_context, runs it to completion and returns its value or rethrows its exception. Throws
/// std::runtime_error if it has not finished within `limit` (a hang is a test failure, not a hang).
template <typename MakeCoroutine>
auto run_coroutine(MakeCoroutine make_coroutine,
                   std::chrono::steady_clock::duration limit = std::chrono::seconds(60)) {
  using Awaitable = decltype(make_coroutine());
  using Value = typename Awaitable::value_type;
  boost::asio::io_context io;
  std::exception_ptr failure;
  bool done = false;
  std::conditional_t<std::is_void_v<Value>, bool, std::optional<Value>> value{};
  auto wrapper = [&]() -> boost::asio::awaitable<void> {
    if constexpr (std::is_void_v<Value>) {
      co_await make_coroutine();
    } else {
      value.emplace(co_await make_coroutine());  // Value need not be default-constructible
    }
  };
  boost::asio::co_spawn(io, wrapper(), [&](std::exception_ptr error) {
    failure = error;
    done = true;
  });
  io.run_for(limit);
  if (!done) throw std::runtime_error("run_coroutine: the coroutine did not finish in time");
  if (failure) std::rethrow_exception(failure);
  if constexpr (!std::is_void_v<Value>) return std::move(*value);
}

}  // namespace pgrt::testing
