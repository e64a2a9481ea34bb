#include <atomic>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/strand.hpp>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fcntl.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <tuple>
#include <variant>

#include "../timing_clock.hpp"
#include "commit_rolled_back.hpp"
#include "impl.hpp"

namespace pgrt {

// --- the socket and waiting ---------------------------------------------------------------------

Connection::executor_type Connection::Impl::socket_executor(const executor_type& executor) {
  if (const auto* strand = executor.target<asio::strand<executor_type>>()) {
    return strand->get_inner_executor();
  }
  if (const auto* strand = executor.target<asio::strand<asio::io_context::executor_type>>()) {
    return strand->get_inner_executor();
  }
  return executor;
}

// Watches libpq's current socket (TCP or unix) through a descriptor of our own for it (a dup).
// libpq closes its descriptor whenever it decides the connection is gone (end-of-file, an error,
// the next host of a connect), and the number may be reused at once by any new socket of the
// process; the reactor must never be left holding, or later deregister, a number that is no
// longer ours. Our duplicate is closed only by us (close(), or the next watch_socket()).
error_code Connection::Impl::watch_socket() {
  error_code error;
  if (socket.is_open()) socket.close(error);
  const int fd = PQsocket(conn);
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  if (fd < 0 || ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return {fd < 0 ? EBADF : errno, boost::system::system_category()};
  }
  const int own = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) return {errno, boost::system::system_category()};
  socket.assign(asio::generic::stream_protocol(address.ss_family, 0), own, error);
  if (error) ::close(own);
  tls_session = PQsslStruct(conn, "OpenSSL");
  return error;
}

namespace {

// A socket that takes nothing: nonblocking, its send buffer full and never read (the other end
// stays open, so it never reads end-of-file either). One for the process; -1 if it could not be
// made.
int socket_that_takes_nothing() noexcept {
  static const int descriptor = [] {
    int pair[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair) != 0) {
      spdlog::warn(
          "pgrt: no socket pair for query()'s batched writes ({}): each statement is sent on "
          "its own",
          std::strerror(errno));
      return -1;
    }
    const int smallest = 1;
    (void)::setsockopt(pair[0], SOL_SOCKET, SO_SNDBUF, &smallest, sizeof smallest);
    const char filler[1024] = {};
    while (::send(pair[0], filler, sizeof filler, MSG_DONTWAIT | MSG_NOSIGNAL) > 0) {
    }
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      ::close(pair[0]);
      ::close(pair[1]);
      return -1;
    }
    return pair[0];  // (pair[1] stays open too: two descriptors for the life of the process)
  }();
  return descriptor;
}

}  // namespace

bool Connection::Impl::hold_output() noexcept {
  if (conn == nullptr || tls_session != nullptr || PQgssEncInUse(conn) != 0 ||
      PQisnonblocking(conn) == 0 || !socket.is_open()) {
    return false;
  }
  const int libpq_descriptor = PQsocket(conn);
  const int takes_nothing = socket_that_takes_nothing();
  if (libpq_descriptor < 0 || takes_nothing < 0) return false;
  // (Our own descriptor, socket, keeps the connection's socket open meanwhile.)
  output_held = ::dup3(takes_nothing, libpq_descriptor, O_CLOEXEC) == libpq_descriptor;
  return output_held;
}

bool Connection::Impl::release_output() noexcept {
  const int libpq_descriptor = conn != nullptr ? PQsocket(conn) : -1;
  if (libpq_descriptor < 0) return false;  // (libpq dropped it: nothing of ours is left there)
  // Still held if this fails: close() then never shuts the socket that takes nothing down.
  output_held = ::dup3(socket.native_handle(), libpq_descriptor, O_CLOEXEC) != libpq_descriptor;
  return !output_held;
}

// OpenSSL reads a whole TLS record (up to 16 KiB) from the socket but hands libpq no more of it
// than libpq's input buffer has room for; the rest stays in OpenSSL, decrypted, and the socket
// no longer shows it. A reply whose last record is cut that way would never wake a wait on the
// socket. (TlsRecordProxy in the test harness sends such replies; tls_pgtest.cpp goes through
// it.)
bool Connection::Impl::tls_holds_bytes() const noexcept {
  return tls_session != nullptr && SSL_pending(static_cast<const SSL*>(tls_session)) > 0;
}

// Waits until libpq's socket is readable (bytes, end of file or an error), without reading.
//
// Nothing that came before the wait is lost, although asio's epoll reactor is edge-triggered:
// async_wait() queues a non-speculative operation, and asio re-arms the descriptor for it
// (epoll_ctl(EPOLL_CTL_MOD)); the kernel then reports a socket that is readable already at once.
// So bytes that arrived between libpq's last read and this wait, or an edge that another thread
// running the io_context took while no wait was queued, still wake it. Bytes that libpq holds in
// its own buffer are not the socket's: callers look at PQisBusy() before they wait. Nor are
// bytes that OpenSSL holds (tls_holds_bytes()): then the wait ends at once.
// (readiness_pgtest.cpp covers the first two, on one thread and on four; tls_pgtest.cpp the
// last.)
asio::awaitable<error_code> Connection::Impl::wait_readable() {
  if (tls_holds_bytes()) co_return error_code{};
  if (cancellation_requested(co_await asio::this_coro::cancellation_state)) {
    co_return asio::error::operation_aborted;
  }
  auto [error] = co_await socket.async_wait(asio::socket_base::wait_read, no_throw_in_frame);
  co_return error;
}

asio::awaitable<error_code> Connection::Impl::skip_copy_data() {
  for (;;) {
    char* buffer = nullptr;
    const int got = PQgetCopyData(conn, &buffer, /*async=*/1);
    if (got > 0) {
      PQfreemem(buffer);
      continue;
    }
    if (got == -1) co_return error_code{};
    if (got < -1) co_return make_error_code(client_errc::connection_lost);
    if (auto error = co_await wait_readable()) co_return error;
    if (PQconsumeInput(conn) == 0) co_return make_error_code(client_errc::connection_lost);
  }
}

// Waits until the socket is writable. Writes block only for large payloads; a poll() first
// covers a socket that is writable already.
asio::awaitable<error_code> Connection::Impl::wait_writable() {
  pollfd descriptor{.fd = socket.native_handle(), .events = POLLOUT, .revents = 0};
  if (::poll(&descriptor, 1, 0) > 0) co_return error_code{};
  auto [error] = co_await socket.async_wait(asio::socket_base::wait_write, no_throw_in_frame);
  co_return error;
}

// Waits until the socket is writable or readable (reading meanwhile keeps a server that is
// blocked sending results from blocking us).
asio::awaitable<error_code> Connection::Impl::wait_writable_or_readable() {
  using namespace asio::experimental::awaitable_operators;
  auto outcome = co_await detail::serialized(wait_writable() || wait_readable());
  co_return std::visit([](error_code error) { return error; }, outcome);
}

// --- sending and receiving ----------------------------------------------------------------------

asio::awaitable<error_code> Connection::Impl::flush(std::string_view statement, bool can_drain) {
  for (;;) {
    const int pending = PQflush(conn);
    if (pending == 0) co_return error_code{};
    if (pending < 0) co_return lost(statement);
    // (The wait below runs its two halves as coroutines of their own, which do not see a
    // cancellation recorded in this one's state: it is looked at here.)
    error_code error = asio::error::operation_aborted;
    if (!cancellation_requested(co_await asio::this_coro::cancellation_state)) {
      error = co_await wait_writable_or_readable();
    }
    if (error) co_return co_await interrupted(error, statement, can_drain);
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

// The cached prepared statement for this SQL text and these parameter types, or nullptr. The key
// is built in a buffer the connection keeps, so a hit allocates nothing.
const std::string* Connection::Impl::cached_statement(std::string_view sql,
                                                      const ParamSink& params) {
  statement_key.assign(sql);
  statement_key += '\0';
  for (std::size_t i = 0; i < params.size(); ++i) {
    char digits[16];
    const auto end = std::to_chars(digits, digits + sizeof digits, params.types()[i]).ptr;
    statement_key.append(digits, end);
    statement_key += ',';
  }
  const auto found = statement_index.find(statement_key);
  if (found == statement_index.end()) return nullptr;
  statements.splice(statements.begin(), statements, found->second);
  return &found->second->name;
}

// Sends the request's statement; flush_pending tells whether libpq still holds part of it.
error_code Connection::Impl::send(const Request& request, const std::string* prepared_name,
                                  bool& flush_pending) {
  const ParamSink& params = *request.params;
  const auto values = params.values();
  const int count = static_cast<int>(params.size());
  int sent = 0;
  if (prepared_name != nullptr) {
    sent = PQsendQueryPrepared(conn, prepared_name->c_str(), count, values.data(), params.lengths(),
                               params.formats(), 0);
  } else {
    const std::string text(request.sql);
    sent = PQsendQueryParams(conn, text.c_str(), count, params.types(), values.data(),
                             params.lengths(), params.formats(), 0);
  }
  if (sent == 0) return lost(request.sql);
  if (request.on_row != nullptr) PQsetSingleRowMode(conn);
  single_row_mode_left_on = request.on_row != nullptr;
  // A statement that fits the socket's buffer is sent now; flush() only for the rest.
  const int pending = PQflush(conn);
  if (pending < 0) return lost(request.sql);
  flush_pending = pending > 0;
  return {};
}

// One request, from its statement cache lookup to its last result, in one coroutine frame (plus
// asio's for each readiness wait): a cache miss, a statement larger than the socket's buffer and a
// cancellation take frames of their own. Cancellation is handled here (cancel request, drain), so
// the coroutine must keep awaiting after it: throw-if-cancelled is off until the end.
// A COPY that query() or execute() started: refused (its first error, unless one came first),
// and ended so that the connection is idle again. Its own coroutine: exchange()'s frame stays
// small enough for asio's frame recycling.
asio::awaitable<error_code> Connection::Impl::refuse_copy(ExecStatusType status,
                                                          std::string_view sql,
                                                          error_code& first_error) {
  if (status == PGRES_COPY_IN) {
    // The server answers the refusal with 57014 (query_canceled), which would read as a
    // timeout or a cancellation: the client's own error comes first.
    if (!first_error) {
      first_error = fail(client_errc::protocol_error,
                         "COPY FROM STDIN cannot run through query() or execute(); "
                         "nothing was copied",
                         sql, "use Connection::copy_from()");
    }
    PQputCopyEnd(conn, "COPY FROM STDIN needs Connection::copy_from()");
    co_return co_await flush(sql);
  }
  // Not supported: reading the copy data to its end gets the connection back to idle.
  if (!first_error) {
    first_error = fail(client_errc::protocol_error,
                       "COPY TO STDOUT is not supported by pgrt; use a query", sql);
  }
  const error_code skip_error = co_await skip_copy_data();
  if (skip_error == client_errc::connection_lost) co_return lost(sql);
  if (skip_error) co_return co_await interrupted(skip_error, sql, /*can_drain=*/true);
  co_return error_code();
}

asio::awaitable<error_code> Connection::Impl::exchange(Request request, Result& out) {
  if (request.kind != Request::Kind::results_only) {
    if (auto refusal = refuse_without_session(request.sql)) co_return refusal;
  }
  const bool throw_if_cancelled = co_await asio::this_coro::throw_if_cancelled();
  co_await asio::this_coro::throw_if_cancelled(false);
  // Read once: a handle to this coroutine's state, which exchange() never resets. (One co_await
  // here instead of one per wait keeps the frame small enough for asio's frame recycling: a frame
  // past it costs a malloc and a free per statement.)
  const asio::cancellation_state cancellation = co_await asio::this_coro::cancellation_state;
  const bool timed = statement_times && request.timed;
  const auto started = timed ? detail::timing_now() : std::chrono::steady_clock::time_point{};
  error_code error;
  std::exception_ptr failure;  // e.g. from a stream() callback
  try {
    for (int attempt = 0;; ++attempt) {
      // Statements evicted inside a transaction block (nothing is deallocated there) are
      // deallocated before the first request outside one.
      if (attempt == 0 && !evicted_statements.empty() &&
          request.kind != Request::Kind::results_only &&
          PQtransactionStatus(conn) == PQTRANS_IDLE) {
        if ((error = co_await deallocate_evicted())) break;
      }
      const std::string* name = nullptr;
      if (request.kind == Request::Kind::prepared && !unnamed_statements) {
        name = cached_statement(request.sql, *request.params);
        if (name == nullptr) {
          if ((error = co_await prepare(request.sql, *request.params, name))) break;
        }
      }
      if (request.kind != Request::Kind::results_only) {
        bool flush_pending = false;
        error = send(request, name, flush_pending);
        if (!error && flush_pending) error = co_await flush(request.sql);
        if (error) break;
      }

      // The results, each one taken as soon as libpq has all of it: no wait when libpq holds it
      // already (a multi-statement string, a result read with the one before).
      error_code first_error;   // the results are read to the end; the first error is returned
      error_code read_error;    // a failed wait, read or write ends them at once
      bool stale_plan = false;  // the first error: the prepared statement's plan went stale
      bool completed = false;   // a result that succeeded is in (its statement ran)
      bool answered = false;    // the statement's result (success or the server's error) is in
      for (;;) {
        while (PQisBusy(conn) != 0) {
          if (!tls_holds_bytes()) {
            error_code wait_error = asio::error::operation_aborted;
            if (!cancellation_requested(cancellation)) {
              std::tie(wait_error) =
                  co_await socket.async_wait(asio::socket_base::wait_read, no_throw_in_frame);
            }
            if (wait_error) {
              read_error =
                  co_await interrupted(wait_error, request.sql, /*can_drain=*/true, completed);
              break;
            }
          }
          if (PQconsumeInput(conn) == 0) {
            read_error = lost(request.sql);
            break;
          }
        }
        if (read_error) break;
        PGresult* raw = PQgetResult(conn);
        if (raw == nullptr) break;
        Result result(raw);
        switch (PQresultStatus(raw)) {
          case PGRES_TUPLES_OK:
          case PGRES_COMMAND_OK:
          case PGRES_EMPTY_QUERY:
            // One statement sent by the extended protocol has one result (an error after it is
            // its commit failing): a second one answers a statement we did not send. A pooler
            // ran another client's statement in this session (PgBouncer before 1.21 does, when
            // that client pipelines); neither answer can be trusted to be ours.
            if (request.kind != Request::Kind::results_only && answered) {
              read_error = answers_out_of_step(request.sql);
              break;
            }
            note_statements_dropped(raw);
            if (!first_error && request.kind != Request::Kind::results_only) {
              first_error = detail::commit_rolled_back(raw, request.sql, last_error);
            }
            out = std::move(result);
            completed = true;
            answered = true;
            break;
          case PGRES_SINGLE_TUPLE: {
            std::exception_ptr callback_failure;
            try {
              (*request.on_row)(result[0]);
              ++*request.streamed_rows;
            } catch (...) {
              callback_failure = std::current_exception();
            }
            if (callback_failure) {
              co_await cancel_and_drain(request.sql);
              std::rethrow_exception(callback_failure);
            }
            break;
          }
          case PGRES_COPY_IN:
          case PGRES_COPY_OUT:
          case PGRES_COPY_BOTH:
            read_error = co_await refuse_copy(PQresultStatus(raw), request.sql, first_error);
            break;
          default:
            if (!first_error) {
              first_error = server_error(raw, request.sql);
              stale_plan = is_stale_plan(raw);
            }
            answered = true;
            break;
        }
        if (read_error) break;
      }
      if (read_error) {
        error = read_error;
        break;
      }
      // Interrupted by its owner (interrupt() cancels, then cuts): the server's 57014 for that
      // cancel may come before the cut shows; either way the statement was interrupted.
      if (PQstatus(conn) != CONNECTION_OK || (cut_by_owner && first_error)) {
        error = lost(request.sql);
        break;
      }
      error = first_error;
      // The server no longer has our prepared statement (its message names it: a 26000 from
      // inside the statement, e.g. a function's EXECUTE, is the statement's own): the statement
      // did not run. Prepare it again, once (a DISCARD ALL did it), or, the second time on this
      // connection, go on without named statements (a transaction pooler ran the preparation in
      // another server session). Inside a transaction block the error has aborted the block:
      // it is counted, and returned.
      if (name != nullptr && forgot_statement(error, last_error, *name)) {
        const std::string forgotten = *name;
        const bool counted = server_forgot_statement(forgotten) && ++forgotten_statements >= 2;
        const bool pooler_noticed = forgotten_statements >= 2;
        if (counted) use_unnamed_statements("forgot its prepared statements");
        if (PQtransactionStatus(conn) == PQTRANS_IDLE && (attempt == 0 || pooler_noticed)) {
          continue;
        }
      }
      // The statement's result changed shape since it was prepared (an ALTER TABLE under a
      // SELECT *): it did not run. Prepared again (the old one deallocated), it runs once more,
      // outside a transaction block (inside one, the error has aborted the block: returned).
      if (name != nullptr && stale_plan && retire_stale_statement(*name) && attempt == 0 &&
          PQtransactionStatus(conn) == PQTRANS_IDLE) {
        continue;
      }
      break;
    }
  } catch (...) {
    failure = std::current_exception();
  }
  if (timed) statement_times->record(detail::timing_now() - started);
  co_await asio::this_coro::throw_if_cancelled(throw_if_cancelled);
  if (failure) std::rethrow_exception(failure);
  co_return error;
}

// --- behind a transaction pooler ---------------------------------------------------------------

void Connection::Impl::use_unnamed_statements(std::string_view why) {
  unnamed_statements = true;
  statements.clear();  // whatever the server sessions hold of them is theirs now
  evicted_statements.clear();
  statement_index.clear();
  static std::atomic<bool> said{false};
  if (!said.exchange(true)) {
    spdlog::warn(
        "pgrt: the server {} ({}): this looks like a transaction-mode pooler. Going on with "
        "unnamed statements on such connections; set PGRT_POOLER=transaction "
        "(ConnectOptions::pooler) to say so from the start",
        why, target());
  }
}

error_code Connection::Impl::answers_out_of_step(std::string_view sql) {
  auto error = fail(client_errc::connection_lost,
                    "the server's answers do not match the statements sent: a pooler in between "
                    "mixed up server sessions; the connection was closed, and the statements in "
                    "flight on it may or may not have run",
                    sql,
                    "behind PgBouncer in transaction mode set PGRT_POOLER=transaction "
                    "(ConnectOptions::pooler): pgrt then keeps one sync segment in flight per "
                    "connection, which PgBouncer before 1.21 needs");
  broken = true;
  close(CloseMode::immediate);
  return error;
}

bool is_stale_plan(const PGresult* result) {
  const char* sqlstate = PQresultErrorField(result, PG_DIAG_SQLSTATE);
  const char* routine = PQresultErrorField(result, PG_DIAG_SOURCE_FUNCTION);
  return sqlstate != nullptr && routine != nullptr && std::string_view(sqlstate) == "0A000" &&
         std::string_view(routine) == "RevalidateCachedQuery";
}

bool forgot_statement(const error_code& error, const Diagnostics& diagnostics,
                      const std::string& name) {
  if (!error || name.empty() || error != make_sqlstate_error("26000")) return false;
  // The name as a word of the message, whatever quotes its language puts around it ("name" in
  // English, »name« in German, « name » in French).
  const auto is_name_char = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_';
  };
  const std::string& message = diagnostics.message;
  for (auto at = message.find(name); at != std::string::npos; at = message.find(name, at + 1)) {
    const auto end = at + name.size();
    if ((at == 0 || !is_name_char(message[at - 1])) &&
        (end == message.size() || !is_name_char(message[end]))) {
      return true;
    }
  }
  return false;
}

error_code Connection::Impl::refuse_without_session(std::string_view sql) {
  // Configured as behind a transaction pooler, or behind a pooler noticed (at connect, or by the
  // server forgetting named statements), which is taken for one.
  const bool configured = options.pooler == Pooler::transaction;
  if (!configured && !(options.pooler == Pooler::none && unnamed_statements)) return {};
  std::string what;
  if (first_keyword(sql) == "listen") {
    what = "LISTEN";
  } else if (calls_session_advisory_lock(sql)) {
    what = "a session-level advisory lock (pg_advisory_lock() and its kin)";
  }
  if (what.empty()) return {};
  return fail(client_errc::needs_session,
              what + " needs a server session of its own, and behind a transaction pooler " +
                  (configured ? std::string("(ConnectOptions::pooler, PGRT_POOLER=transaction)")
                              : std::string("(this connection goes through a pooler, noticed "
                                            "and taken for one)")) +
                  " the next transaction may run in another one",
              sql,
              std::string("use a connection straight to the server (or a session-mode pool) for "
                          "it; pg_advisory_xact_lock() holds a lock to the end of the "
                          "transaction and works here") +
                  (configured ? "" : "; for a session-mode pooler, set PGRT_POOLER=session"));
}

}  // namespace pgrt
