#pragma once

/// @file
/// Put a deadline on any awaitable operation (Boost 1.81 has no cancel_after).

#include <boost/asio/awaitable.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

#include "pgrt/db/error.hpp"

namespace pgrt {

/// Runs `operation`; if it has not completed after `timeout`, cancels it (terminal cancellation)
/// and, once it has wound down, throws pgrt::Error(client_errc::timeout). Otherwise returns its
/// value or rethrows its exception.
///
/// A cancelled pgrt connection operation winds down before with_timeout returns: the statement
/// is cancelled on the server and the connection drained (at most ConnectOptions::cancel_timeout),
/// or the connection is closed and reported broken. So with_timeout can return up to
/// cancel_timeout after the deadline; the connection is then known to be either idle or broken.
///
/// T must be default-constructible or void. Cancellation: with_timeout itself supports the same
/// per-operation cancellation as the operation.
template <typename T>
boost::asio::awaitable<T> with_timeout(boost::asio::awaitable<T> operation,
                                       std::chrono::steady_clock::duration timeout) {
  using namespace boost::asio::experimental::awaitable_operators;
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor, timeout);
  auto outcome = co_await (std::move(operation) || timer.async_wait(boost::asio::use_awaitable));
  if (outcome.index() == 1) {
    throw Error(
        make_error_code(client_errc::timeout),
        Diagnostics{
            .message = "the operation did not complete within " +
                       std::to_string(
                           std::chrono::duration_cast<std::chrono::milliseconds>(timeout).count()) +
                       " ms"});
  }
  if constexpr (!std::is_void_v<T>) co_return std::get<0>(std::move(outcome));
}

}  // namespace pgrt
