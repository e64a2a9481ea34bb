#pragma once

/// @file
/// Put a deadline on any awaitable operation (Boost 1.81 has no cancel_after).

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/cancellation_state.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

#include "pgrt/db/error.hpp"

namespace pgrt {

namespace detail {
[[nodiscard]] inline bool runs_on_a_strand(const boost::asio::any_io_executor& executor) noexcept {
  return executor.target<boost::asio::strand<boost::asio::io_context::executor_type>>() !=
             nullptr ||
         executor.target<boost::asio::strand<boost::asio::any_io_executor>>() != nullptr;
}

// Runs `operation`, an awaitable that combines operations with asio's || or &&, where its parts
// cannot complete on two threads at once: inline when the coroutine runs on a strand, else on a
// new strand of its executor. asio's parallel_group registers with the awaiting coroutine's
// cancellation slot after it has launched the parts, and on an io_context run by several threads
// a part can complete on another thread meanwhile: a data race (ThreadSanitizer reports it).
//
// A cancellation of the caller reaches the operation through a signal owned by the handler that
// forwards it (Boost 1.81's co_spawn would forward it through a pointer to a signal that dies
// with the operation: with a strand in between, a cancellation racing the completion would use
// it after it died).
template <typename T>
boost::asio::awaitable<T> serialized(boost::asio::awaitable<T> operation) {
  auto executor = co_await boost::asio::this_coro::executor;
  if (runs_on_a_strand(executor)) co_return co_await std::move(operation);
  auto strand = boost::asio::make_strand(executor);
  auto signal = std::make_shared<boost::asio::cancellation_signal>();
  boost::asio::cancellation_state state = co_await boost::asio::this_coro::cancellation_state;
  auto caller = state.slot();
  if (caller.is_connected()) {
    caller.assign([signal, strand](boost::asio::cancellation_type type) {
      boost::asio::dispatch(strand, [signal, type] { signal->emit(type); });
    });
  }
  co_return co_await boost::asio::co_spawn(
      strand, std::move(operation),
      boost::asio::bind_cancellation_slot(signal->slot(), boost::asio::use_awaitable));
}

// Runs `operation` and hands back its value or its exception, never throwing: asio's `||` waits
// for the first operation that *succeeds*, so a failure must not look like one.
template <typename T>
boost::asio::awaitable<std::pair<std::exception_ptr, std::optional<T>>> capture_outcome(
    boost::asio::awaitable<T> operation) {
  try {
    co_return std::pair{std::exception_ptr(), std::optional<T>(co_await std::move(operation))};
  } catch (...) {
    co_return std::pair{std::current_exception(), std::optional<T>()};
  }
}

inline boost::asio::awaitable<std::exception_ptr> capture_outcome(
    boost::asio::awaitable<void> operation) {
  try {
    co_await std::move(operation);
  } catch (...) {
    co_return std::current_exception();
  }
  co_return std::exception_ptr();
}

// The outcome of the operation with_timeout() runs, kept whichever part of its || wins: asio's
// || drops the outcome of the part that lost, and a cancelled operation may still have completed
// (its cancellation came too late), or have said, as it wound down, what became of it.
template <typename T>
struct KeptOutcome {
  std::exception_ptr failure;
  std::optional<T> value;
  [[nodiscard]] bool completed() const noexcept { return value.has_value(); }
};

template <>
struct KeptOutcome<void> {
  std::exception_ptr failure;
  bool succeeded = false;
  [[nodiscard]] bool completed() const noexcept { return succeeded; }
};

template <typename T>
boost::asio::awaitable<bool> capture_outcome_into(boost::asio::awaitable<T> operation,
                                                  KeptOutcome<T>& kept) {
  auto outcome = co_await capture_outcome(std::move(operation));
  kept.failure = outcome.first;
  if (outcome.second) kept.value.emplace(std::move(*outcome.second));
  co_return true;
}

inline boost::asio::awaitable<bool> capture_outcome_into(boost::asio::awaitable<void> operation,
                                                         KeptOutcome<void>& kept) {
  kept.failure = co_await capture_outcome(std::move(operation));
  kept.succeeded = !kept.failure;
  co_return true;
}

// `message`, then what a cancelled operation said as it wound down (a pgrt::Error's diagnostics:
// the statement was cancelled on the server, or had already completed, or the connection was
// closed), with its hint and statement.
inline Diagnostics cut_short(std::string message, const std::exception_ptr& wound_down) {
  Diagnostics diagnostics{.message = std::move(message)};
  if (!wound_down) return diagnostics;
  try {
    std::rethrow_exception(wound_down);
  } catch (const Error& error) {
    const Diagnostics& said = error.diagnostics();
    if (said.message.starts_with(diagnostics.message)) {
      diagnostics.message = said.message;  // (it says the same, and more)
    } else if (!said.message.empty()) {
      diagnostics.message += "; " + said.message;
    }
    diagnostics.hint = said.hint;
    diagnostics.statement = said.statement;
  } catch (...) {  // NOLINT(bugprone-empty-catch): nothing more to say
  }
  return diagnostics;
}
}  // namespace detail

/// Runs `operation`; if it has not completed after `timeout`, cancels it (terminal cancellation)
/// and, once it has wound down, throws pgrt::Error(client_errc::timeout). Otherwise returns its
/// value or rethrows its exception (at once: a failure does not wait for the deadline). An
/// operation that completed all the same as it was being cancelled (the cancellation came too
/// late: a write already accepted, a result already read) returns its value: a timeout is reported
/// only for an operation that did not complete, so what it did never goes unreported.
///
/// The timeout's diagnostics go on with what the operation said as it wound down: for a
/// statement, whether the server cancelled it, it had failed first, or it had already completed
/// (then it ran and its effects stand: do not run it again as if it had not), or the connection
/// was closed; with the statement and its hint.
///
/// A cancelled pgrt connection operation winds down before with_timeout returns: the statement
/// is cancelled on the server and the connection drained (at most ConnectOptions::cancel_timeout),
/// or the connection is closed and reported broken. So with_timeout can return up to
/// cancel_timeout after the deadline; the connection is then known to be either idle or broken.
///
/// Cancellation: with_timeout itself supports the same per-operation cancellation as the operation.
///
/// Threading: safe on an io_context run by several threads without a strand (the operation and
/// the timer then run on a strand of their own).
template <typename T>
boost::asio::awaitable<T> with_timeout(boost::asio::awaitable<T> operation,
                                       std::chrono::steady_clock::duration timeout) {
  using namespace boost::asio::experimental::awaitable_operators;
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor, timeout);
  detail::KeptOutcome<T> kept;  // (written on the strand before the || completes)
  auto outcome = co_await detail::serialized(
      detail::capture_outcome_into(std::move(operation), kept) ||
      timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable)));
  const std::exception_ptr& wound_down = kept.failure;
  // Completed all the same as it was being cancelled: what it did stands, and is reported.
  if (outcome.index() == 1 && !kept.completed()) {
    if (std::get<0>(std::get<1>(outcome)) == boost::asio::error::operation_aborted) {
      throw Error(make_error_code(client_errc::cancelled),
                  detail::cut_short("the operation was cancelled", wound_down));
    }
    throw Error(
        make_error_code(client_errc::timeout),
        detail::cut_short(
            "the operation did not complete within " +
                std::to_string(
                    std::chrono::duration_cast<std::chrono::milliseconds>(timeout).count()) +
                " ms",
            wound_down));
  }
  if (kept.failure) std::rethrow_exception(kept.failure);
  if constexpr (!std::is_void_v<T>) co_return std::move(*kept.value);
}

}  // namespace pgrt
