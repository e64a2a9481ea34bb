#pragma once

/// @file
/// Run a body inside a transaction: commit when it returns, roll back when it throws or is
/// cancelled.

#include <boost/asio/awaitable.hpp>
#include <boost/asio/this_coro.hpp>
#include <concepts>
#include <exception>
#include <type_traits>
#include <utility>

#include "pgrt/db/connection.hpp"

namespace pgrt {

namespace detail {
// Rolls back after a failed or cancelled body, also when the calling coroutine was cancelled;
// never throws (the body's exception matters more).
boost::asio::awaitable<void> rollback_after_failure(Connection& connection);
// Throws SQLSTATE 25001 when a transaction block is open on `connection` already: a BEGIN there
// would only be warned about by the server, and the ROLLBACK or COMMIT meant for it would end the
// open one.
void refuse_nested_transaction(const Connection& connection);
// Throws SQLSTATE 25P01 when no transaction block is open on `connection` as its body returns:
// the body ended it itself (a COMMIT, ROLLBACK or END it ran), and the statements after that ran
// outside it, each committed on its own; a COMMIT then would only be warned about by the server.
void refuse_transaction_ended_by_body(const Connection& connection);
}  // namespace detail

/// BEGIN (with `options`), then `co_await body(connection)`, then COMMIT; returns what the body
/// returned. If BEGIN or the body throws, or the operation is cancelled while either runs, the
/// transaction is rolled back (when the connection is still usable: also a BEGIN that completed
/// on the server just before the cancellation reached it) and the exception is rethrown.
/// If COMMIT itself fails (for example a serialization failure at commit), its pgrt::Error is
/// thrown; compare it with condition::serialization_failure to retry.
/// Transactions do not nest: on a connection whose transaction block is open already (a
/// transaction() called from the body of another), it throws SQLSTATE 25001 before sending
/// anything, and leaves the open transaction as it is (use a SAVEPOINT for a nested step).
/// A body that ends the transaction block itself (runs COMMIT, ROLLBACK or END) makes it throw
/// SQLSTATE 25P01 instead of sending COMMIT: what the body ran after that ran outside the
/// transaction (each statement committed on its own), which the caller must be told.
///
/// `body` is called as `body(Connection&)` and must return an awaitable.
template <typename Body>
requires std::invocable<Body&, Connection&>
auto transaction(Connection& connection, Body body, TransactionOptions options = {})
    -> std::invoke_result_t<Body&, Connection&> {
  using Value = typename std::invoke_result_t<Body&, Connection&>::value_type;
  detail::refuse_nested_transaction(connection);  // (before the try: the open one is not ours)
  std::exception_ptr failure;
  try {
    // Inside the try: a BEGIN that completed on the server before a cancellation (or a timeout)
    // reached it leaves a transaction block open, which must be rolled back like any other.
    co_await connection.begin(options);
    if constexpr (std::is_void_v<Value>) {
      co_await body(connection);
      detail::refuse_transaction_ended_by_body(connection);
      co_await connection.commit();
      co_return;
    } else {
      Value value = co_await body(connection);
      detail::refuse_transaction_ended_by_body(connection);
      co_await connection.commit();
      co_return value;
    }
  } catch (...) {
    failure = std::current_exception();
  }
  // A cancelled coroutine throws at its next co_await unless told otherwise: the rollback must run.
  const bool throw_if_cancelled = co_await boost::asio::this_coro::throw_if_cancelled();
  co_await boost::asio::this_coro::throw_if_cancelled(false);
  co_await detail::rollback_after_failure(connection);
  co_await boost::asio::this_coro::throw_if_cancelled(throw_if_cancelled);
  std::rethrow_exception(failure);
}

}  // namespace pgrt
