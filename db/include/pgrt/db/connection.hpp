#pragma once

/// @file
/// An asynchronous PostgreSQL connection: libpq's async API driven by Boost.Asio C++20 coroutines.
///
/// Threading: a Connection is used by one coroutine at a time (operations one after another,
/// never overlapping). Starting a second operation while one runs fails at once with
/// client_errc::concurrent_use (the running one is not disturbed); this check is always on. The
/// io_context may be run by several threads. Destroy or move a Connection only while no operation
/// is running on it.
///
/// Errors: throwing operations throw pgrt::Error (error code + server diagnostics). The token-based
/// async_* forms report (error_code, value) instead; the diagnostics are then in last_error().
///
/// Cancellation: every operation supports per-operation cancellation and treats terminal, partial
/// and total alike (a coroutine passes on terminal cancellation only, unless its filter says
/// otherwise; with_timeout() and asio's awaitable operators emit terminal). A running statement is
/// cancelled on the server with a CancelRequest sent from a helper thread (libpq 15's PQcancel
/// blocks, so it never runs on the io_context); the connection is then drained back to idle, for
/// at most ConnectOptions::cancel_timeout. The operation ends with client_errc::cancelled
/// (condition::query_canceled). If the drain does not finish in time, the connection is closed and
/// reported broken (is_broken()). As PQcancel has no timeout, a request whose connection is
/// accepted and never answered (a stuck proxy) holds its thread until that connection ends: at
/// most 32 requests are on their way in a process at once, and past that none is sent (logged),
/// so such cancellations end at cancel_timeout with the connection closed. A cancelled pipeline is
/// not drained: its connection is closed (after a CancelRequest for what the server runs), and
/// close_and_wait() still waits for the server to end that session (a pool counts the connection's
/// capacity free only then). To keep working after a cancellation, an operation resets the calling
/// coroutine's cancellation state (this_coro::reset_cancellation_state(), which restores the
/// default filter).
///
/// Compiler note: g++ 12 miscompiles a braced temporary with std::string members inside a co_await
/// expression (`co_await Connection::connect({.conninfo = ...})` corrupts the strings). Build
/// ConnectOptions in a named variable first.

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/post.hpp>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "pgrt/db/error.hpp"
#include "pgrt/db/result.hpp"
#include "pgrt/db/types.hpp"

struct pg_conn;

namespace pgrt {

/// TCP keepalive settings, passed to libpq (`keepalives_idle`, `keepalives_interval`,
/// `keepalives_count`).
struct TcpKeepalives {
  std::chrono::seconds idle{30};
  std::chrono::seconds interval{10};
  int count = 3;
};

/// What stands between pgrt and the server (see docs/operations.md, "Behind a pooler").
enum class Pooler {
  /// The server itself, or a TCP proxy in front of it (a cloud SQL proxy), as far as pgrt was
  /// told. pgrt checks at connect, in one round trip, that the session is the server's own: a
  /// pooler makes up the backend pid it gives the client (`SELECT pg_backend_pid()` names another).
  /// Behind a pooler, a session-mode one included (it cannot be told from a transaction-mode one
  /// there), the connection then goes on as behind `transaction` for its statements (unnamed
  /// statements, one sync segment in flight, client_errc::needs_session for LISTEN and
  /// session-level advisory locks), and pgrt logs a warning once per process.
  none,
  /// A transaction-mode pooler (PgBouncer pool_mode=transaction, Supavisor's and Supabase's
  /// transaction port, RDS Proxy's multiplexing): each transaction may run on another server
  /// session. pgrt then prepares no named statements (query_prepared() sends unnamed ones, in
  /// the same round trip as its execution), sends no startup options (the session guards' server
  /// settings and ConnectOptions::session_settings cannot be sent: connect refuses the latter),
  /// checks at connect that the server's DateStyle is ISO, and refuses statements that need a
  /// session (LISTEN, session-level advisory locks) with client_errc::needs_session.
  transaction,
  /// A pooler that gives each client a server session of its own for as long as it is connected
  /// (PgBouncer's session mode): everything works as against the server, named statements and
  /// pipelining included, and pgrt skips `none`'s check at connect (so this also spares that
  /// round trip in front of the server itself).
  session,
};

/// How to connect. An aggregate: use designated initializers.
struct ConnectOptions {
  /// A libpq URL ("postgresql://user@host/db?sslmode=require") or key=value string. Empty: libpq's
  /// defaults and the standard PG* environment variables (PGHOST, PGUSER, PGPASSWORD, ...), which
  /// also fill whatever the conninfo leaves out. TLS settings (sslmode, ...) go to libpq as given.
  std::string conninfo;
  /// Overrides any application_name in the conninfo when not empty.
  std::string application_name;
  /// The whole connect (name resolution, TCP, TLS, authentication) must finish within this. With
  /// several hosts (or addresses), each host but the last may take an equal share of the time
  /// left, and no more than the conninfo's own `connect_timeout` (seconds per host), before pgrt
  /// tries the next (docs/operations.md, "Failover", names the forms libpq tries itself).
  std::chrono::milliseconds connect_timeout{std::chrono::seconds(10)};
  /// Settings applied to the session at start-up (sent in the `options` startup parameter as
  /// `-c name=value`, after any options in the conninfo). pgrt adds `DateStyle=ISO` unless one is
  /// given here: timestamptz results are parsed in ISO format.
  std::vector<std::pair<std::string, std::string>> session_settings;
  /// TCP keepalives; std::nullopt leaves libpq's defaults. A keepalives keyword the conninfo gives
  /// itself wins (these fill in what it leaves out).
  std::optional<TcpKeepalives> keepalives = TcpKeepalives{};
  /// `tcp_user_timeout`: how long sent data may stay unacknowledged before the kernel drops the
  /// connection. Zero leaves the system default. A `tcp_user_timeout` in the conninfo wins.
  std::chrono::milliseconds tcp_user_timeout{0};
  /// After a cancellation, how long to wait for the server to end the statement before the
  /// connection is closed and reported broken.
  std::chrono::milliseconds cancel_timeout{std::chrono::seconds(5)};
  /// How many statements query_prepared() keeps prepared (least recently used ones are
  /// deallocated).
  std::size_t statement_cache_size = 32;
  /// What stands between pgrt and the server (env PGRT_POOLER=transaction or session, read by
  /// PoolConfig::from_env()). Left `none`, pgrt notices a pooler at connect (see Pooler::none);
  /// and should one get past that, it notices a transaction pooler when the server forgets one of
  /// its named statements twice on a connection, and goes on with unnamed ones on that connection
  /// (each logged once per process).
  Pooler pooler = Pooler::none;
};

/// What close() does.
enum class CloseMode {
  graceful,   ///< Send a Terminate message, then close the socket.
  immediate,  ///< Shut the socket down without a word to the server.
};

/// The server-side transaction state of a connection (libpq's PQtransactionStatus).
enum class TransactionStatus {
  idle,            ///< Not in a transaction, no statement running.
  active,          ///< A statement is running.
  in_transaction,  ///< Inside a transaction block, idle.
  in_error,        ///< Inside a failed transaction block: only ROLLBACK helps.
  unknown,         ///< Closed or broken.
};

/// The isolation levels of BEGIN.
enum class IsolationLevel { server_default, read_committed, repeatable_read, serializable };

struct TransactionOptions {
  IsolationLevel isolation = IsolationLevel::server_default;
  bool read_only = false;
  /// Only with serializable + read_only: wait for a snapshot that cannot fail.
  bool deferrable = false;
};

class Pipeline;
struct PipelineOutcome;

namespace detail {
struct ConnectionAccess;
}  // namespace detail

/// One connection to a PostgreSQL server. Move-only; the destructor closes it gracefully.
class Connection {
 public:
  using executor_type = boost::asio::any_io_executor;

  /// Connects on the calling coroutine's executor. Throws pgrt::Error: client_errc::connect_failed
  /// (refused, unreachable), client_errc::invalid_config (a malformed conninfo, a host that holds
  /// a URL or credentials, a database or user name that is a whole conninfo, or a ConnectOptions
  /// duration or number out of range: connect_timeout not positive, any duration negative or
  /// longer than a year, tcp_user_timeout above INT_MAX ms, a negative keepalives.count; refused
  /// before anything is sent), client_errc::name_resolution, client_errc::timeout, or a
  /// SQLSTATE code (28P01 wrong password, 28000 unknown role or one that may not log in, 3D000
  /// unknown database, 42501 no CONNECT privilege, 53300 server full or a role's or database's
  /// connection limit reached, ...). The message says what failed and what to check; it never
  /// contains the password. Host names are resolved on a thread of their own (getaddrinfo()), not
  /// by libpq on the event loop.
  [[nodiscard]] static boost::asio::awaitable<Connection> connect(ConnectOptions options);

  /// connect() for any completion token; completes with (error_code, Connection).
  template <typename Token>
  static auto async_connect(executor_type executor, ConnectOptions options, Token&& token) {
    return spawn_with_error_code<Connection>(
        executor,
        [executor, options = std::move(options)]() mutable {
          return try_connect(executor, std::move(options));
        },
        std::forward<Token>(token));
  }

  /// An empty connection: not open; every operation fails with client_errc::not_connected.
  Connection() noexcept = default;
  Connection(Connection&& other) noexcept = default;
  Connection& operator=(Connection&& other) noexcept = default;
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  ~Connection() = default;

  /// Runs one statement with parameters bound to $1..$n (extended protocol: the values never
  /// become SQL text) and returns its rows. `sql` must stay valid until the operation completes.
  template <Encodable... Args>
  [[nodiscard]] boost::asio::awaitable<Result> query(std::string_view sql, const Args&... args) {
    ParamSink params;
    encode_params(params, args...);
    return query_with(sql, std::move(params));
  }

  /// Runs one statement that returns no rows; returns the affected row count.
  template <Encodable... Args>
  [[nodiscard]] boost::asio::awaitable<std::uint64_t> execute(std::string_view sql,
                                                              const Args&... args) {
    ParamSink params;
    encode_params(params, args...);
    return execute_with(sql, std::move(params));
  }

  /// query() through a named prepared statement, prepared on first use (per SQL text and parameter
  /// types) and kept in a per-connection LRU cache of ConnectOptions::statement_cache_size. If the
  /// server no longer knows the statement (SQLSTATE 26000, e.g. after DISCARD ALL), or its result
  /// changed shape since it was prepared (0A000 "cached plan must not change result type": an
  /// ALTER TABLE under a SELECT *), it did not run: outside a transaction block it is prepared
  /// again and runs once more (inside one, the error is returned and the next use prepares it).
  template <Encodable... Args>
  [[nodiscard]] boost::asio::awaitable<Result> query_prepared(std::string_view sql,
                                                              const Args&... args) {
    ParamSink params;
    encode_params(params, args...);
    return query_prepared_with(sql, std::move(params));
  }

  /// Runs a statement in single-row mode and calls `on_row(const Row&)` for each row as it arrives:
  /// memory stays bounded by one row whatever the result size. Returns the number of rows. If
  /// on_row throws, the statement is cancelled, the connection drained, and the exception rethrown.
  template <typename OnRow, Encodable... Args>
  requires std::invocable<OnRow&, const Row&>
  [[nodiscard]] boost::asio::awaitable<std::uint64_t> stream(std::string_view sql, OnRow on_row,
                                                             const Args&... args) {
    ParamSink params;
    encode_params(params, args...);
    return stream_with(
        sql, std::move(params),
        std::function<void(const Row&)>(
            [handler = std::move(on_row)](const Row& row) mutable { handler(row); }));
  }

  /// Sends every statement of the pipeline in one round trip (libpq pipeline mode) and returns one
  /// outcome per statement, in order; statements run prepared from this connection's statement
  /// cache unless Pipeline::prepare_statements(false) (a cache miss outside a transaction block
  /// costs one more round trip, to prepare). A cached statement the server no longer knows
  /// (SQLSTATE 26000: DEALLOCATE or DISCARD ALL behind pgrt's back, a transaction pooler), or whose
  /// result changed shape (0A000, an ALTER TABLE under a SELECT *), is prepared again and the
  /// pipeline runs again from the first segment that failed for it, once,
  /// when that is safe: outside a transaction block, no later segment committed, and no statement
  /// of the pipeline is transaction control, CALL or DO. See docs/usage.md, "Pipelines".
  [[nodiscard]] boost::asio::awaitable<std::vector<PipelineOutcome>> run(const Pipeline& pipeline);

  /// Runs `copy_statement` (a `COPY ... FROM STDIN`) and sends `data` (in the format that COPY
  /// statement declares; see copy_text_row()) as its input. Returns the number of rows copied.
  /// One statement only, sent by the extended protocol: a second one after a `;` fails the call
  /// (SQLSTATE 42601) and nothing runs. A statement that is not a COPY is refused before it is
  /// sent (client_errc::protocol_error); a COPY of another direction (TO STDOUT, FROM a server
  /// file) is run by the server, then reported as client_errc::protocol_error. Text or CSV
  /// `data` holding a NUL byte is refused before anything is sent (client_errc::conversion, naming
  /// its row and column), as a text parameter holding one is; binary data (starting with the
  /// PGCOPY signature) is sent as it is.
  [[nodiscard]] boost::asio::awaitable<std::uint64_t> copy_from(std::string_view copy_statement,
                                                                std::string_view data);

  /// BEGIN with the given options; COMMIT; ROLLBACK. See also pgrt::transaction(). commit() of a
  /// transaction that had already failed throws SQLSTATE 25P02: the server rolled it back.
  /// begin() on a connection whose transaction block is open already throws SQLSTATE 25001 and
  /// sends nothing (the server would only warn, and the next COMMIT or ROLLBACK would end the
  /// open transaction): use a SAVEPOINT for a nested step.
  [[nodiscard]] boost::asio::awaitable<void> begin(TransactionOptions options = {});
  [[nodiscard]] boost::asio::awaitable<void> commit();
  [[nodiscard]] boost::asio::awaitable<void> rollback();

  /// DISCARD ALL: resets the session to its state at connect (settings back to their start-up
  /// values, temporary tables dropped, prepared statements deallocated, advisory locks released,
  /// LISTEN ended), and forgets the statements query_prepared() had cached, which the server no
  /// longer knows. Must run outside a transaction block (else SQLSTATE 25001). Errors and
  /// cancellation as query(). On a pooled connection under a connection budget it releases the
  /// connection's slot too (an advisory lock): leave it to the pool's reset
  /// (ResetPolicy::discard_all keeps the slot; docs/budget.md).
  [[nodiscard]] boost::asio::awaitable<void> discard_all();

  /// query() for any completion token (as_tuple, deferred, callbacks): completes with
  /// (error_code, Result); the server's diagnostics are in last_error().
  template <typename Token>
  auto async_query(std::string sql, ParamSink params, Token&& token) {
    return spawn_with_error_code<Result>(
        executor(),
        [this, sql = std::move(sql), params = std::move(params)]() mutable {
          return try_query(std::move(sql), std::move(params));
        },
        std::forward<Token>(token));
  }

  /// execute() for any completion token: completes with (error_code, affected rows).
  template <typename Token>
  auto async_execute(std::string sql, ParamSink params, Token&& token) {
    return spawn_with_error_code<std::uint64_t>(
        executor(),
        [this, sql = std::move(sql), params = std::move(params)]() mutable {
          return try_execute(std::move(sql), std::move(params));
        },
        std::forward<Token>(token));
  }

  /// Closes the connection now (synchronous, never blocks). Later operations fail with
  /// client_errc::not_connected. Must not be called while an operation runs.
  /// On a connection from a Lease, the open connection goes back to its pool instead, which
  /// closes it as it closes any of its connections (gracefully, whatever `mode` says) and gives
  /// its slot back as soon as the server has ended the backend, without waiting for the Lease to
  /// be dropped.
  void close(CloseMode mode = CloseMode::graceful) noexcept;

  /// Closes gracefully, then waits until the server has closed its end of the socket, which it
  /// does only after the backend has left pg_stat_activity: after this, the server no longer
  /// counts the connection. If a statement is still running (transaction_status() is active:
  /// e.g. its coroutine was destroyed mid-operation), a cancel request is sent first (from a
  /// helper thread), because a busy backend reads the Terminate message only once its statement
  /// ends; and the client's side is shut for writing, so the server sees the client go (for a busy
  /// backend: at its next client_connection_check_interval check). Waits at most `limit`; then, if
  /// `keep_waiting` is given and returns true, waits another `limit`, and so on. True if the
  /// server's end was seen to close (or to fail); false if the wait ended first, was cancelled or
  /// the socket could not be watched (the connection is closed in every case). Runs on the caller's
  /// executor; on an io_context run by several threads, call it from a strand (it races the socket
  /// against a timer). `keep_waiting` runs on that executor.
  [[nodiscard]] boost::asio::awaitable<bool> close_and_wait(
      std::chrono::milliseconds limit, std::function<bool()> keep_waiting = {});

  /// Cuts the connection from any thread, while an operation may be running on another: sends the
  /// server a cancel request for a running statement (from a helper thread; never blocks) and
  /// shuts the socket down. The operation in progress, and every later one, fails with
  /// client_errc::connection_lost saying the connection was interrupted; is_broken() turns true
  /// once the owner's next operation sees it. The owner must still close or destroy the
  /// Connection. Thread-safe against the owner's operations and close(); not against its
  /// destructor or a move: the owner must keep the Connection where it is, alive, while another
  /// thread may call this (on a lease, Pool::close() does it for you). A no-op on a connection
  /// that is not open. Pool::close() uses it on leases still out after its grace period.
  /// `wait_for_cancel`: how long to wait for the cancel request to be sent (0: do not wait; an
  /// exit handler waits, since the process may be gone before a helper thread sends it).
  void interrupt(std::chrono::milliseconds wait_for_cancel = std::chrono::milliseconds(0)) noexcept;

  /// Open and usable as far as the client knows.
  [[nodiscard]] bool is_open() const noexcept;
  /// Closed because of a failure (connection lost, a drain after cancellation that timed out).
  [[nodiscard]] bool is_broken() const noexcept;
  [[nodiscard]] TransactionStatus transaction_status() const noexcept;
  /// The server process serving this connection (for pg_stat_activity, pg_terminate_backend).
  [[nodiscard]] int backend_pid() const noexcept;
  /// The diagnostics of the last failed operation.
  [[nodiscard]] const Diagnostics& last_error() const noexcept;
  [[nodiscard]] executor_type executor() const noexcept;
  /// The libpq connection, for what pgrt does not wrap. Do not close it or change its mode.
  [[nodiscard]] pg_conn* native_handle() const noexcept;

  /// Implementation detail.
  struct Impl;

 private:
  friend struct detail::ConnectionAccess;
  // Destroys an Impl (defined where Impl is), so that moving and destroying an empty Connection
  // are inline: a Lease moves one at every acquire.
  struct ImplDeleter {
    void operator()(Impl* impl) const noexcept;
  };
  using ImplPtr = std::unique_ptr<Impl, ImplDeleter>;
  explicit Connection(ImplPtr impl) noexcept : impl_(std::move(impl)) {}

  boost::asio::awaitable<Result> query_with(std::string_view sql, ParamSink params);
  boost::asio::awaitable<std::uint64_t> execute_with(std::string_view sql, ParamSink params);
  boost::asio::awaitable<Result> query_prepared_with(std::string_view sql, ParamSink params);
  boost::asio::awaitable<std::uint64_t> stream_with(std::string_view sql, ParamSink params,
                                                    std::function<void(const Row&)> on_row);
  static boost::asio::awaitable<std::pair<boost::system::error_code, Connection>> try_connect(
      executor_type executor, ConnectOptions options);
  boost::asio::awaitable<std::pair<boost::system::error_code, Result>> try_query(std::string sql,
                                                                                 ParamSink params);
  boost::asio::awaitable<std::pair<boost::system::error_code, std::uint64_t>> try_execute(
      std::string sql, ParamSink params);

  // Runs `make_operation()` (an awaitable of pair<error_code, Value>) as its own coroutine and
  // completes `token` with (error_code, Value), forwarding per-operation cancellation. Without an
  // executor (an empty or moved-from Connection) it completes with client_errc::not_connected,
  // through the handler's own executor.
  template <typename Value, typename MakeOperation, typename Token>
  static auto spawn_with_error_code(executor_type executor, MakeOperation make_operation,
                                    Token&& token) {
    return boost::asio::async_initiate<Token, void(boost::system::error_code, Value)>(
        [executor, make_operation = std::move(make_operation)](auto handler) mutable {
          if (!executor) {
            auto handler_executor = boost::asio::get_associated_executor(handler);
            boost::asio::post(handler_executor, [handler = std::move(handler)]() mutable {
              std::move(handler)(make_error_code(client_errc::not_connected), Value{});
            });
            return;
          }
          auto slot = boost::asio::get_associated_cancellation_slot(handler);
          boost::asio::co_spawn(
              executor, make_operation(),
              boost::asio::bind_cancellation_slot(
                  slot, [handler = std::move(handler)](
                            std::exception_ptr failure,
                            std::pair<boost::system::error_code, Value> outcome) mutable {
                    if (failure) outcome.first = make_error_code(client_errc::protocol_error);
                    std::move(handler)(outcome.first, std::move(outcome.second));
                  }));
        },
        token);
  }

  ImplPtr impl_;
};

}  // namespace pgrt
