#include <atomic>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/steady_timer.hpp>
#include <future>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <thread>

#include "impl.hpp"

namespace pgrt {

namespace {

// Cancel requests on their way. Each runs on a thread of its own, since libpq 15's PQcancel()
// blocks and has no timeout of its own: a network or proxy that accepts the request's connection
// and never answers holds its thread for good. So at most this many are on their way at once;
// past that, no request is sent, and where one was needed the connection is closed instead (the
// drain that waits for it gives up at cancel_timeout).
constexpr int max_cancel_threads = 32;
std::atomic<int> cancel_threads{0};
std::atomic<bool> cancel_limit_logged{false};

// Runs `send` on a thread of its own, counted; false (nothing runs) at the limit.
template <typename Send>
bool run_cancel_thread(Send send) noexcept {
  if (cancel_threads.fetch_add(1) >= max_cancel_threads) {
    cancel_threads.fetch_sub(1);
    if (!cancel_limit_logged.exchange(true)) {
      spdlog::warn(
          "pgrt: {} cancel requests are still on their way (the server, or something between, "
          "accepts them and does not answer): no more are sent until one ends; connections that "
          "needed one are closed instead",
          max_cancel_threads);
    }
    return false;
  }
  try {
    std::thread([send = std::move(send)]() mutable {
      send();
      cancel_threads.fetch_sub(1);
      cancel_limit_logged = false;
    }).detach();
    return true;
  } catch (...) {
    cancel_threads.fetch_sub(1);
    return false;
  }
}

}  // namespace

int Connection::Impl::cancel_requests_on_their_way() noexcept {
  return cancel_threads.load();
}

void Connection::Impl::arm_interrupt() noexcept {
  std::lock_guard lock(interrupt_mutex);
  // Our own descriptor for the socket (watch_socket()), never libpq's: libpq may close its own
  // at any time, and its number may then be another socket's by the time interrupt() uses it.
  interruptible_fd = socket.is_open() ? socket.native_handle() : -1;
  read_side_cut = false;
  interrupt_cancel = std::shared_ptr<PGcancel>(PQgetCancel(conn), PQfreeCancel);
}

void Connection::Impl::interrupt(std::chrono::milliseconds wait_for_cancel) noexcept {
  // (An exiting process must send the request before it is gone: waited for, at most
  // `wait_for_cancel`.)
  const std::shared_future<void> delivered = start_interrupt();
  if (delivered.valid() && wait_for_cancel.count() > 0) delivered.wait_for(wait_for_cancel);
  finish_interrupt();
}

std::shared_future<void> Connection::Impl::start_interrupt() noexcept {
  std::lock_guard lock(interrupt_mutex);
  if (interruptible_fd < 0) return {};
  cut_by_owner = true;
  if (!interrupt_cancel) return {};
  try {
    // PQcancel() blocks (it connects to the server): on a thread of its own.
    auto sent = std::make_shared<std::promise<void>>();
    std::shared_future<void> done = sent->get_future().share();
    const bool started = run_cancel_thread([cancel = interrupt_cancel, sent] {
      char error[256];
      PQcancel(cancel.get(), error, sizeof error);
      sent->set_value();
    });
    if (started) return done;
  } catch (const std::exception&) {  // NOLINT(bugprone-empty-catch): finish_interrupt() still cuts
  }
  return {};
}

void Connection::Impl::finish_interrupt() noexcept {
  std::lock_guard lock(interrupt_mutex);
  if (interruptible_fd < 0) return;
  ::shutdown(interruptible_fd, SHUT_RDWR);
  read_side_cut = true;
}

void Connection::Impl::cut_writing() noexcept {
  (void)start_interrupt();
  std::lock_guard lock(interrupt_mutex);
  if (interruptible_fd >= 0) ::shutdown(interruptible_fd, SHUT_WR);
}

// A wait ended early: the operation was cancelled, or the socket was closed under us.
asio::awaitable<error_code> Connection::Impl::interrupted(error_code error,
                                                          std::string_view statement,
                                                          bool can_drain, bool completed) {
  auto state = co_await asio::this_coro::cancellation_state;
  if (state.cancelled() == asio::cancellation_type::none) {
    if (conn == nullptr) co_return make_error_code(client_errc::not_connected);
    last_error.message = error.message();
    co_return lost(statement);
  }
  co_await asio::this_coro::reset_cancellation_state();
  if (!can_drain) {
    // The backend still runs what the pipeline sent: ask it to cancel that, and keep a descriptor
    // of the socket, so that close_and_wait() (the pool's, which keeps the connection's capacity
    // until then) sees the server end the session. The end-of-file goes out at once.
    broken = true;
    (void)send_cancel_request();
    keep_lingering(close_keeping_socket());
    co_return fail(client_errc::cancelled,
                   "the operation was cancelled; the connection was closed (a cancelled "
                   "pipeline cannot be drained)",
                   statement);
  }
  co_return co_await cancel_and_drain(statement, completed);
}

// Asks the server to cancel the running statement. libpq 15's PQcancel blocks (it connects and
// waits for the server), so it runs on a thread of its own and never on the io_context. The
// returned flag turns true once PQcancel has returned: the server has taken the request and
// closed the cancel connection, or the request could not be made (no connection to the
// server): either way no cancel is still on its way. Only then may the connection run another
// statement, or a late cancel would hit that one; a failed request leaves the statement to end
// on its own (the drain, or cancel_timeout, decides). nullptr if no request was sent.
std::shared_ptr<std::atomic<bool>> Connection::Impl::send_cancel_request() noexcept {
  PGcancel* cancel = PQgetCancel(conn);
  if (cancel == nullptr) return nullptr;
  try {
    auto delivered = std::make_shared<std::atomic<bool>>(false);
    const bool started = run_cancel_thread([cancel, delivered] {
      // (Not logged on failure: the thread is detached and may outlive the logger at exit.)
      char error[256];
      PQcancel(cancel, error, sizeof error);
      PQfreeCancel(cancel);
      *delivered = true;
    });
    if (started) return delivered;
  } catch (const std::exception&) {  // NOLINT(bugprone-empty-catch): as no thread
  }
  PQfreeCancel(cancel);  // no thread, no request: the drain alone decides
  return nullptr;
}

// Waits (polling: the helper thread must not touch the io_context) until the cancel request
// has been delivered.
asio::awaitable<bool> Connection::Impl::cancel_delivered(
    std::shared_ptr<std::atomic<bool>> delivered) {
  asio::steady_timer timer(executor);
  while (delivered && !*delivered) {
    timer.expires_after(std::chrono::milliseconds(1));
    if (auto [error] = co_await timer.async_wait(no_throw); error) co_return false;
  }
  co_return true;
}

// Reads and discards results until the connection is idle, counting what they said. False if it
// cannot get there.
asio::awaitable<bool> Connection::Impl::drain(Drained& drained) {
  for (;;) {
    while (PQisBusy(conn) != 0) {
      if (co_await wait_readable()) co_return false;
      if (PQconsumeInput(conn) == 0) co_return false;
    }
    PGresult* result = PQgetResult(conn);
    if (result == nullptr) co_return PQstatus(conn) == CONNECTION_OK;
    const auto status = PQresultStatus(result);
    if (status == PGRES_FATAL_ERROR) {
      const char* sqlstate = PQresultErrorField(result, PG_DIAG_SQLSTATE);
      if (sqlstate != nullptr && std::string_view(sqlstate) == "57014") {
        drained.cancelled = true;
      } else if (drained.failure.empty()) {
        drained.failure = sqlstate != nullptr ? sqlstate : "?";
      }
    } else if (status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK) {
      drained.completed = true;
    }
    PQclear(result);
    if (status == PGRES_COPY_OUT || status == PGRES_COPY_BOTH) {
      // (libpq hands this result out again at every PQgetResult until the data is read: the
      // drain would spin for ever, never reaching a wait its timeout could end.)
      if (co_await skip_copy_data()) co_return false;
    } else if (status == PGRES_COPY_IN) {
      PQputCopyEnd(conn, "cancelled by the client");
      while (PQflush(conn) == 1) {
        if (co_await wait_writable_or_readable()) co_return false;
        PQconsumeInput(conn);
      }
    }
  }
}

// The drain, then the cancel request's delivery: a connection whose request is still on its way
// must not take its next statement, which the request could cancel. False as soon as the drain
// fails (the connection is gone: nothing left to wait for).
asio::awaitable<bool> Connection::Impl::drain_then_delivered(
    Drained& drained, std::shared_ptr<std::atomic<bool>> delivered) {
  const bool idle = co_await drain(drained);
  if (!idle) co_return false;
  const bool sent = co_await cancel_delivered(std::move(delivered));
  co_return sent;
}

asio::awaitable<error_code> Connection::Impl::cancel_and_drain(std::string_view statement,
                                                               bool completed) {
  using namespace asio::experimental::awaitable_operators;
  if (PQflush(conn) == 1) {
    // Part of the statement is still unsent (a large parameter, a server that stopped reading):
    // the server cannot answer a statement it has not read whole, so no drain can end; closing
    // now ends it (the server does not complete a statement whose Sync it did not get).
    broken = true;
    close(CloseMode::immediate);
    co_return fail(client_errc::cancelled,
                   "the operation was cancelled while its statement was still being sent; the "
                   "connection was closed, so the statement did not complete (what it did is "
                   "rolled back with the connection, an open transaction block with it)",
                   statement);
  }
  auto delivered = send_cancel_request();
  asio::steady_timer timer(executor, options.cancel_timeout);
  Drained drained{.completed = completed};
  auto outcome = co_await detail::serialized(drain_then_delivered(drained, std::move(delivered)) ||
                                             timer.async_wait(no_throw));
  if (outcome.index() == 0 && std::get<0>(outcome)) {
    // What the statement's results said: the server cancelled it; it failed on its own first; or
    // it had completed before the request came (its effects stand: running it again would run it
    // twice). The connection takes statements again, inside a transaction block if one is open
    // (a BEGIN that completed opened one).
    const PGTransactionStatusType now = PQtransactionStatus(conn);
    const std::string ready = now == PQTRANS_INTRANS || now == PQTRANS_INERROR
                                  ? "the connection takes statements again, inside the "
                                    "transaction block that is still open"
                                  : "the connection is idle again";
    if (drained.cancelled) {
      co_return fail(
          client_errc::cancelled,
          "the operation was cancelled; the statement was cancelled on the server and " + ready,
          statement);
    }
    if (!drained.failure.empty()) {
      co_return fail(client_errc::cancelled,
                     "the operation was cancelled; the statement had already failed on the server "
                     "(SQLSTATE " +
                         drained.failure + "), and " + ready,
                     statement);
    }
    if (drained.completed) {
      co_return fail(client_errc::cancelled,
                     "the operation was cancelled, but the statement had already completed on the "
                     "server: it ran, and its effects stand; " +
                         ready,
                     statement,
                     "do not run it again as if it had not run (inside a transaction block, its "
                     "effects stand until the block ends)");
    }
    co_return fail(client_errc::cancelled, "the operation was cancelled; " + ready, statement);
  }
  broken = true;
  if (outcome.index() == 0 && (conn == nullptr || PQstatus(conn) != CONNECTION_OK)) {
    // The connection went while the statement was being ended (the server terminated the
    // session, restarted, or the network failed): said as such, not as a slow server.
    const std::string why = conn != nullptr ? trimmed(PQerrorMessage(conn)) : "";
    close(CloseMode::immediate);
    co_return fail(client_errc::cancelled,
                   "the operation was cancelled, and the connection to the server was lost while "
                   "its statement was being ended" +
                       (why.empty() ? std::string() : " (" + why + ")") +
                       "; the connection was closed, and whether the statement completed is not "
                       "known",
                   statement,
                   "the server may have restarted or terminated the session, or the network "
                   "failed");
  }
  close(CloseMode::immediate);
  co_return fail(client_errc::cancelled,
                 "the operation was cancelled, and the server did not end the statement within " +
                     std::to_string(options.cancel_timeout.count()) +
                     " ms, so the connection was closed",
                 statement, "the network or server may be unresponsive");
}

}  // namespace pgrt
