#include <boost/asio/experimental/awaitable_operators.hpp>
#include <cerrno>
#include <poll.h>
#include <sys/socket.h>
#include <variant>

#include "impl.hpp"

namespace pgrt {

// --- the socket and waiting ---------------------------------------------------------------------

// Wraps libpq's current socket (TCP or unix) without taking ownership.
error_code Connection::Impl::watch_socket() {
  error_code error;
  if (socket.is_open()) [[maybe_unused]]
    auto descriptor = socket.release(error);
  const int fd = PQsocket(conn);
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return {errno, boost::system::system_category()};
  }
  socket.assign(asio::generic::stream_protocol(address.ss_family, 0), fd, error);
  return error;
}

// Waits until libpq's socket has bytes to read (or end of file), without taking any. Asio's epoll
// reactor is edge-triggered and a plain async_wait never looks at the socket first, so readiness
// that came before the wait was queued (bytes libpq left unread, or an edge taken by another
// thread running the reactor) would be lost. A one-byte MSG_PEEK receive is a speculative
// operation: the reactor tries it at once and again after every edge, so nothing is lost.
asio::awaitable<error_code> Connection::Impl::wait_readable() {
  char peeked = 0;
  auto [error, size] = co_await socket.async_receive(asio::buffer(&peeked, 1),
                                                     asio::socket_base::message_peek, no_throw);
  if (error == asio::error::eof) co_return error_code{};  // libpq reads the end of file itself
  co_return error;
}

// Waits until the socket is writable. Writes block only for large payloads; a poll() first
// covers a socket that is writable already.
asio::awaitable<error_code> Connection::Impl::wait_writable() {
  pollfd descriptor{.fd = socket.native_handle(), .events = POLLOUT, .revents = 0};
  if (::poll(&descriptor, 1, 0) > 0) co_return error_code{};
  auto [error] = co_await socket.async_wait(asio::socket_base::wait_write, no_throw);
  co_return error;
}

// Waits until the socket is writable or readable (reading meanwhile keeps a server that is
// blocked sending results from blocking us).
asio::awaitable<error_code> Connection::Impl::wait_writable_or_readable() {
  using namespace asio::experimental::awaitable_operators;
  auto outcome = co_await (wait_writable() || wait_readable());
  co_return std::visit([](error_code error) { return error; }, outcome);
}

// --- sending and receiving ----------------------------------------------------------------------

asio::awaitable<error_code> Connection::Impl::flush(std::string_view statement, bool can_drain) {
  for (;;) {
    const int pending = PQflush(conn);
    if (pending == 0) co_return error_code{};
    if (pending < 0) co_return lost(statement);
    if (auto error = co_await wait_writable_or_readable()) {
      co_return co_await interrupted(error, statement, can_drain);
    }
    if (PQconsumeInput(conn) == 0) co_return lost(statement);
  }
}

// The next result of the running statement, or nullptr when it has no more.
asio::awaitable<error_code> Connection::Impl::next_result(PGresult*& out,
                                                          std::string_view statement,
                                                          bool can_drain) {
  out = nullptr;
  while (PQisBusy(conn) != 0) {
    if (auto error = co_await wait_readable()) {
      co_return co_await interrupted(error, statement, can_drain);
    }
    if (PQconsumeInput(conn) == 0) co_return lost(statement);
  }
  out = PQgetResult(conn);
  co_return error_code{};
}

// Collects every result of a sent statement. Rows go to `out`, or to `on_row` one at a time in
// single-row mode.
asio::awaitable<error_code> Connection::Impl::collect(std::string_view statement, Result& out,
                                                      const std::function<void(const Row&)>* on_row,
                                                      std::uint64_t* streamed_rows) {
  error_code first_error;
  for (;;) {
    PGresult* raw = nullptr;
    // A result libpq already holds is taken here: no coroutine frame for next_result().
    if (PQisBusy(conn) == 0) {
      raw = PQgetResult(conn);
    } else if (auto error = co_await next_result(raw, statement)) {
      co_return error;
    }
    if (raw == nullptr) break;
    Result result(raw);
    switch (PQresultStatus(raw)) {
      case PGRES_TUPLES_OK:
      case PGRES_COMMAND_OK:
      case PGRES_EMPTY_QUERY:
        out = std::move(result);
        break;
      case PGRES_SINGLE_TUPLE: {
        std::exception_ptr failure;
        try {
          (*on_row)(result[0]);
          ++*streamed_rows;
        } catch (...) {
          failure = std::current_exception();
        }
        if (failure) {
          co_await cancel_and_drain(statement);
          std::rethrow_exception(failure);
        }
        break;
      }
      case PGRES_COPY_IN:
        PQputCopyEnd(conn, "COPY FROM STDIN needs Connection::copy_from()");
        if (auto error = co_await flush(statement)) co_return error;
        break;
      case PGRES_COPY_OUT:
      case PGRES_COPY_BOTH:
        // Not supported: reading the copy data to its end gets the connection back to idle.
        for (char* buffer = nullptr; PQgetCopyData(conn, &buffer, 0) > 0;) PQfreemem(buffer);
        if (!first_error) {
          first_error = fail(client_errc::protocol_error,
                             "COPY TO STDOUT is not supported by pgrt; use a query", statement);
        }
        break;
      default:
        if (!first_error) first_error = server_error(raw, statement);
        break;
    }
  }
  if (PQstatus(conn) != CONNECTION_OK) co_return lost(statement);
  co_return first_error;
}

asio::awaitable<error_code> Connection::Impl::send_and_collect(
    std::string_view sql, const ParamSink& params, const std::string* prepared_name, Result& out,
    const std::function<void(const Row&)>* on_row, std::uint64_t* streamed_rows) {
  const auto values = params.values();
  const int count = static_cast<int>(params.size());
  int sent = 0;
  if (prepared_name != nullptr) {
    sent = PQsendQueryPrepared(conn, prepared_name->c_str(), count, values.data(), params.lengths(),
                               params.formats(), 0);
  } else {
    const std::string text(sql);
    sent = PQsendQueryParams(conn, text.c_str(), count, params.types(), values.data(),
                             params.lengths(), params.formats(), 0);
  }
  if (sent == 0) co_return lost(sql);
  if (on_row != nullptr) PQsetSingleRowMode(conn);
  // A statement that fits the socket's buffer is sent at once: flush() (a coroutine frame) only
  // for the rest.
  const int pending = PQflush(conn);
  if (pending < 0) co_return lost(sql);
  if (pending > 0) {
    if (auto error = co_await flush(sql)) co_return error;
  }
  co_return co_await collect(sql, out, on_row, streamed_rows);
}

}  // namespace pgrt
