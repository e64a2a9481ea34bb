#include "pgrt/db/connection.hpp"

#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cerrno>
#include <fcntl.h>
#include <new>
#include <sys/socket.h>
#include <system_error>
#include <unistd.h>
#include <variant>

#include "connection/commit_rolled_back.hpp"
#include "connection/impl.hpp"
#include "connection/options_check.hpp"
#include "connection_access.hpp"
#include "pgrt/db/transaction.hpp"

namespace pgrt {

// --- Connection::Impl's state -------------------------------------------------------------------

void Connection::Impl::close_lingering() noexcept {
  for (const int fd : std::exchange(lingering_fds, {})) ::close(fd);
}

void Connection::Impl::close(CloseMode mode, Lingering lingering) noexcept {
  if (lingering == Lingering::close) close_lingering();
  // libpq's descriptor may be the socket that takes nothing (hold_output()), shared by every
  // connection: it is never shut down.
  const bool libpq_descriptor_is_its_socket = !output_held || release_output();
  {
    std::lock_guard lock(interrupt_mutex);
    interruptible_fd = -1;
    interrupt_cancel.reset();
  }
  if (socket.is_open()) {
    // Our own descriptor for libpq's socket (watch_socket()): deregistered and closed; the
    // socket itself stays open until PQfinish() closes libpq's.
    error_code ignored;
    socket.close(ignored);
  }
  if (conn != nullptr) {
    if (mode == CloseMode::immediate && libpq_descriptor_is_its_socket) {
      ::shutdown(PQsocket(conn), SHUT_RDWR);
    }
    PQfinish(conn);
    conn = nullptr;
  }
  output_held = false;
  tls_session = nullptr;
  statements.clear();
  statement_index.clear();
  evicted_statements.clear();
}

int Connection::Impl::close_keeping_socket() noexcept {
  if (output_held && !release_output()) {
    close(CloseMode::graceful, Lingering::keep);
    return -1;
  }
  const int fd = PQsocket(conn);
  const int kept = fd >= 0 ? ::fcntl(fd, F_DUPFD_CLOEXEC, 0) : -1;
  close(CloseMode::graceful, Lingering::keep);
  // Our descriptor keeps the socket open, so the server would never see the client go: send it
  // end-of-file now (after the Terminate libpq queued). A backend still busy with a statement the
  // cancel did not reach then notices at its next client_connection_check_interval check.
  if (kept >= 0) (void)::shutdown(kept, SHUT_WR);
  return kept;
}

void Connection::Impl::keep_lingering(int fd) noexcept {
  if (fd < 0) return;
  try {
    lingering_fds.push_back(fd);
  } catch (const std::bad_alloc&) {
    ::close(fd);
  }
}

void Connection::Impl::abandon_connect() noexcept {
  if (conn == nullptr) return;  // abandoned already (its lingering descriptor stays)
  // Connected: the server may have forked a backend for it, which is in its start-up (a server
  // that authenticates without a word says nothing until its start-up is done) and lives on
  // until it reads the end of the connection. Not connected (yet): no backend can exist.
  const int fd = PQsocket(conn);
  sockaddr_storage peer{};
  socklen_t length = sizeof peer;
  if (fd >= 0 && ::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &length) == 0) {
    keep_lingering(close_keeping_socket());
  } else {
    close(CloseMode::immediate, Lingering::keep);  // (earlier attempts' stay)
  }
}

error_code Connection::Impl::fail(client_errc code, std::string message, std::string_view statement,
                                  std::string hint) {
  last_error = Diagnostics{
      .message = std::move(message), .hint = std::move(hint), .statement = std::string(statement)};
  return make_error_code(code);
}

// The connection is gone: close it and say why. A server error that came first (a FATAL such as
// 57P01 from pg_terminate_backend) stays the message; libpq's own words go to the detail.
error_code Connection::Impl::lost(std::string_view statement) {
  std::string libpq_message = conn != nullptr ? trimmed(PQerrorMessage(conn)) : "";
  broken = true;
  bool server_end_in_sight = false;  // cut gently (cut_writing()): its reading side still open
  {
    std::lock_guard lock(interrupt_mutex);
    server_end_in_sight = cut_by_owner && !read_side_cut && interruptible_fd >= 0;
  }
  if (server_end_in_sight) {
    // The backend may still be running what it was sent: close_and_wait() (the pool's, which
    // keeps the connection's capacity until then) watches the server end the session.
    keep_lingering(close_keeping_socket());
  } else {
    close(CloseMode::immediate);
  }
  if (cut_by_owner) {
    return fail(client_errc::connection_lost,
                "the connection was interrupted by its owner (Connection::interrupt(); a "
                "Pool::close() whose grace period ran out does this to leases still out)",
                statement, "finish with pooled connections before the pool closes");
  }
  if (!last_error.sqlstate.empty() && last_error.severity != "ERROR") {
    last_error.detail += (last_error.detail.empty() ? "" : "\n") + libpq_message;
    return make_error_code(client_errc::connection_lost);
  }
  return fail(client_errc::connection_lost,
              "the connection to the server was lost: " + libpq_message, statement,
              "the server may have restarted or terminated the session, or the network failed; "
              "open a new connection");
}

error_code Connection::Impl::server_error(const PGresult* result, std::string_view statement) {
  auto field = [result](int code) {
    const char* value = PQresultErrorField(result, code);
    return std::string(value != nullptr ? value : "");
  };
  last_error = Diagnostics{.sqlstate = field(PG_DIAG_SQLSTATE),
                           .severity = field(PG_DIAG_SEVERITY_NONLOCALIZED),
                           .message = field(PG_DIAG_MESSAGE_PRIMARY),
                           .detail = field(PG_DIAG_MESSAGE_DETAIL),
                           .hint = field(PG_DIAG_MESSAGE_HINT),
                           .statement = std::string(statement)};
  if (last_error.message.empty()) last_error.message = trimmed(PQresultErrorMessage(result));
  if (last_error.sqlstate.empty()) return make_error_code(client_errc::protocol_error);
  // A class 08 error that ends the session (a FATAL 08P01, a pooler's FATAL 08006): the
  // connection is lost, whatever the statement's result says (its SQLSTATE stays in the
  // diagnostics). As an ERROR, the connection goes on.
  if (last_error.sqlstate.starts_with("08") && last_error.severity != "ERROR" &&
      !last_error.severity.empty()) {
    return make_error_code(client_errc::connection_lost);
  }
  return make_sqlstate_error(last_error.sqlstate);
}

// --- Connection ---------------------------------------------------------------------------------

void Connection::ImplDeleter::operator()(Impl* impl) const noexcept {
  delete impl;  // NOLINT(cppcoreguidelines-owning-memory): the ImplPtr owns it
}

asio::awaitable<std::pair<error_code, Connection>> Connection::try_connect(executor_type executor,
                                                                           ConnectOptions options) {
  using namespace asio::experimental::awaitable_operators;
  ImplPtr impl(new Impl(executor, std::move(options)));  // NOLINT: owned by the ImplPtr
  if (auto problem = detail::connect_options_problem(impl->options, "ConnectOptions::")) {
    // Before anything is sent: a duration out of range would overflow the deadlines below.
    const error_code error = impl->fail(client_errc::invalid_config, std::move(problem->message),
                                        {}, std::move(problem->hint));
    co_return std::pair{error, Connection(std::move(impl))};
  }
  asio::steady_timer timer(executor, impl->options.connect_timeout);
  auto outcome = co_await detail::serialized(impl->connect() || timer.async_wait(no_throw));
  error_code error;
  if (outcome.index() == 0) {
    error = std::get<0>(outcome);
    // Failed: closed at once. Cancelled by the caller (connect() leaves that to here): abandoned,
    // as a backend in start-up may exist, which lives on until it reads the end of the
    // connection (its end is watched: a pool under a budget keeps its turn for a backend without
    // a slot until then). What earlier attempts of this connect left lingering stays for
    // close_and_wait() (a host that ran out of its share of the time may have a backend in
    // start-up although a later host refused).
    if (error && impl->conn != nullptr) {
      if (error == client_errc::cancelled) {
        impl->abandon_connect();
      } else {
        impl->close(CloseMode::immediate, Impl::Lingering::keep);
      }
    }
  } else if (std::get<0>(std::get<1>(outcome)) == asio::error::operation_aborted) {
    // Cancelled: its caller is going away (a closing pool), and makes no new connection in its
    // place. Abandoned, as above.
    std::string where = impl->target();
    impl->abandon_connect();
    error = impl->fail(client_errc::cancelled, "connecting to " + where + " was cancelled");
  } else {
    std::string where = impl->target();
    impl->abandon_connect();
    const std::string within = std::to_string(impl->options.connect_timeout.count()) + " ms";
    error = impl->fail(
        client_errc::timeout,
        impl->failed_hosts.empty()
            ? "could not connect to " + where + " within " + within
            : "could not connect within " + within + ": the last host tried, " + where +
                  ", had not answered in the time left (before it: " + impl->failed_hosts + ")",
        {},
        "check that the server is reachable; a blackholed network or an "
        "overloaded server looks like this");
  }
  co_return std::pair{error, Connection(std::move(impl))};
}

asio::awaitable<Connection> Connection::connect(ConnectOptions options) {
  auto executor = co_await asio::this_coro::executor;
  auto [error, connection] = co_await try_connect(executor, std::move(options));
  if (error) throw Error(error, connection.last_error());
  co_return std::move(connection);
}

// query(), query_prepared() and stream() run one exchange() each, without run_operation()'s
// frames: the per-query path. exchange() does what run_operation() does about cancellation.
asio::awaitable<Result> Connection::query_with(std::string_view sql, ParamSink params) {
  params.check();
  check_statement_text(sql);
  if (!impl_) throw_not_connected();
  Impl& impl = *impl_;
  if (auto error = impl.begin_operation()) throw Error(error, impl.last_error);
  Operation operation(impl);
  Result result;
  if (auto error = co_await impl.exchange(
          {.kind = Impl::Request::Kind::text, .sql = sql, .params = &params}, result)) {
    throw Error(error, impl.last_error);
  }
  co_return result;
}

asio::awaitable<std::uint64_t> Connection::execute_with(std::string_view sql, ParamSink params) {
  Result result = co_await query_with(sql, std::move(params));
  co_return result.affected_rows();
}

asio::awaitable<Result> Connection::query_prepared_with(std::string_view sql, ParamSink params) {
  params.check();
  check_statement_text(sql);
  if (!impl_) throw_not_connected();
  Impl& impl = *impl_;
  if (auto error = impl.begin_operation()) throw Error(error, impl.last_error);
  Operation operation(impl);
  Result result;
  if (auto error = co_await impl.exchange(
          {.kind = Impl::Request::Kind::prepared, .sql = sql, .params = &params}, result)) {
    throw Error(error, impl.last_error);
  }
  co_return result;
}

asio::awaitable<std::uint64_t> Connection::stream_with(std::string_view sql, ParamSink params,
                                                       std::function<void(const Row&)> on_row) {
  params.check();
  check_statement_text(sql);
  if (!impl_) throw_not_connected();
  Impl& impl = *impl_;
  if (auto error = impl.begin_operation()) throw Error(error, impl.last_error);
  Operation operation(impl);
  Result last;
  std::uint64_t rows = 0;
  if (auto error = co_await impl.exchange({.kind = Impl::Request::Kind::text,
                                           .sql = sql,
                                           .params = &params,
                                           .on_row = &on_row,
                                           .streamed_rows = &rows},
                                          last)) {
    throw Error(error, impl.last_error);
  }
  co_return rows;
}

asio::awaitable<void> Connection::begin(TransactionOptions options) {
  detail::refuse_nested_transaction(*this);
  std::string sql = "BEGIN";
  switch (options.isolation) {
    case IsolationLevel::server_default:
      break;
    case IsolationLevel::read_committed:
      sql += " ISOLATION LEVEL READ COMMITTED";
      break;
    case IsolationLevel::repeatable_read:
      sql += " ISOLATION LEVEL REPEATABLE READ";
      break;
    case IsolationLevel::serializable:
      sql += " ISOLATION LEVEL SERIALIZABLE";
      break;
  }
  if (options.read_only) sql += " READ ONLY";
  if (options.deferrable) sql += " DEFERRABLE";
  co_await query_with(sql, {});
}

asio::awaitable<void> Connection::commit() {
  // (COMMIT of a failed transaction "succeeds" with the tag ROLLBACK: every statement that does
  // so fails with 25P02: detail::commit_rolled_back().)
  co_await query_with("COMMIT", {});
}

asio::awaitable<void> Connection::rollback() {
  co_await query_with("ROLLBACK", {});
}

asio::awaitable<void> Connection::discard_all() {
  if (!impl_) throw_not_connected();
  // Refused before the cache is touched: a statement running now holds a pointer into it.
  if (auto error = impl_->begin_operation()) throw Error(error, impl_->last_error);
  // Forgotten first: if DISCARD ALL fails half-way, a statement the server still knows is merely
  // prepared again under a new name.
  impl_->statements.clear();
  impl_->evicted_statements.clear();
  impl_->statement_index.clear();
  co_await query_with("DISCARD ALL", {});
}

asio::awaitable<std::pair<error_code, Result>> Connection::try_query(std::string sql,
                                                                     ParamSink params) {
  try {
    Result result = co_await query_with(sql, std::move(params));
    co_return std::pair{error_code{}, std::move(result)};
  } catch (const Error& error) {
    if (impl_) impl_->last_error = error.diagnostics();  // one the statement failed before it ran
    co_return std::pair{error.code(), Result()};
  }
}

asio::awaitable<std::pair<error_code, std::uint64_t>> Connection::try_execute(std::string sql,
                                                                              ParamSink params) {
  try {
    const std::uint64_t rows = co_await execute_with(sql, std::move(params));
    co_return std::pair{error_code{}, rows};
  } catch (const Error& error) {
    if (impl_) impl_->last_error = error.diagnostics();
    co_return std::pair{error.code(), std::uint64_t{0}};
  }
}

void Connection::close(CloseMode mode) noexcept {
  if (!impl_) return;
  if (impl_->lease_binding != nullptr && impl_->conn != nullptr) {
    detail::LeaseBinding* binding = std::exchange(impl_->lease_binding, nullptr);
    binding->closed_in_lease(Connection(std::move(impl_)));
    return;
  }
  impl_->close(mode);
}

namespace {

// Waits until the server closes its end of `watched` (a second descriptor of a closed connection's
// socket; taken over and closed here) or `timer` expires, which `keep_waiting` may extend by
// `limit` at a time. True when the server's end closed.
asio::awaitable<bool> wait_for_server_end(int watched, asio::steady_timer& timer,
                                          std::chrono::milliseconds limit,
                                          const std::function<bool()>& keep_waiting) {
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  const bool named =
      watched >= 0 && ::getsockname(watched, reinterpret_cast<sockaddr*>(&address), &length) == 0;
  if (!named) {
    if (watched >= 0) ::close(watched);
    co_return false;
  }
  asio::generic::stream_protocol::socket socket(timer.get_executor());
  error_code error;
  socket.assign(asio::generic::stream_protocol(address.ss_family, 0), watched, error);
  if (error) {
    ::close(watched);
    co_return false;
  }
  using namespace asio::experimental::awaitable_operators;
  for (;;) {
    auto outcome = co_await detail::serialized(
        socket.async_wait(asio::socket_base::wait_read, no_throw) || timer.async_wait(no_throw));
    if (outcome.index() == 1) {  // the limit passed first
      if (std::get<0>(std::get<1>(outcome)) || !keep_waiting || !keep_waiting()) co_return false;
      timer.expires_after(limit);
      continue;
    }
    if (std::get<0>(std::get<0>(outcome))) co_return false;
    char discard[512];
    const ssize_t received = ::recv(watched, discard, sizeof discard, MSG_DONTWAIT);
    if (received == 0) co_return true;  // the server closed its end
    if (received < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      co_return true;  // reset by the server: its end is closed too
    }
  }
}

}  // namespace

asio::awaitable<bool> Connection::close_and_wait(std::chrono::milliseconds limit,
                                                 std::function<bool()> keep_waiting) {
  if (!impl_) co_return true;
  // Closed already without waiting (a cancelled pipeline, a connect given up on): its lingering
  // descriptors, if any, still show when the server ends those sessions.
  std::vector<int> watched = std::exchange(impl_->lingering_fds, {});
  if (impl_->conn != nullptr) {
    // A backend running a statement reads the Terminate only when the statement ends: cancel it,
    // so that the backend ends now rather than after its statement (and the server's end closes).
    if (PQtransactionStatus(impl_->conn) == PQTRANS_ACTIVE) (void)impl_->send_cancel_request();
    // A second descriptor for the same socket keeps it open after PQfinish() closes libpq's, so
    // the server's end can be watched: it closes the socket only after its pg_stat_activity entry
    // is gone (the backend clears that entry before it exits).
    watched.insert(watched.begin(), impl_->close_keeping_socket());
  }
  if (watched.empty()) co_return true;
  asio::steady_timer timer(co_await asio::this_coro::executor, limit);
  for (std::size_t at = 0; at < watched.size(); ++at) {
    if (!co_await wait_for_server_end(watched[at], timer, limit, keep_waiting)) {
      for (std::size_t rest = at + 1; rest < watched.size(); ++rest) ::close(watched[rest]);
      co_return false;
    }
  }
  co_return true;
}

void Connection::interrupt(std::chrono::milliseconds wait_for_cancel) noexcept {
  if (impl_) impl_->interrupt(wait_for_cancel);
}

bool Connection::is_open() const noexcept {
  return impl_ && impl_->conn != nullptr;
}

bool Connection::is_broken() const noexcept {
  return impl_ && (impl_->broken || impl_->cut_by_owner);
}

TransactionStatus Connection::transaction_status() const noexcept {
  if (!is_open()) return TransactionStatus::unknown;
  switch (PQtransactionStatus(impl_->conn)) {
    case PQTRANS_IDLE:
      return TransactionStatus::idle;
    case PQTRANS_ACTIVE:
      return TransactionStatus::active;
    case PQTRANS_INTRANS:
      return TransactionStatus::in_transaction;
    case PQTRANS_INERROR:
      return TransactionStatus::in_error;
    default:
      return TransactionStatus::unknown;
  }
}

int Connection::backend_pid() const noexcept {
  return is_open() ? PQbackendPID(impl_->conn) : 0;
}

const Diagnostics& Connection::last_error() const noexcept {
  static const Diagnostics none;
  return impl_ ? impl_->last_error : none;
}

Connection::executor_type Connection::executor() const noexcept {
  return impl_ ? impl_->executor : executor_type();
}

pg_conn* Connection::native_handle() const noexcept {
  return impl_ ? impl_->conn : nullptr;
}

namespace detail {

Connection::Impl* ConnectionAccess::bind(Connection& connection, LeaseBinding* binding) noexcept {
  Connection::Impl* impl = connection.impl_.get();
  if (impl != nullptr) impl->lease_binding = binding;
  return impl;
}

std::string ConnectionAccess::server_of(const Connection& connection) {
  if (connection.impl_ == nullptr || connection.impl_->conn == nullptr) return {};
  return connection.impl_->target();
}

bool ConnectionAccess::has_lingering_socket(const Connection& connection) noexcept {
  return connection.impl_ != nullptr && connection.impl_->conn == nullptr &&
         !connection.impl_->lingering_fds.empty();
}

void ConnectionAccess::cut_writing(Connection& connection) noexcept {
  if (connection.impl_) connection.impl_->cut_writing();
}

std::chrono::milliseconds ConnectionAccess::cancel_timeout(const Connection& connection) noexcept {
  return connection.impl_ ? connection.impl_->options.cancel_timeout : std::chrono::milliseconds(0);
}

bool ConnectionAccess::behind_pooler(const Connection& connection) noexcept {
  return connection.impl_ != nullptr && connection.impl_->one_segment_in_flight();
}

Connection::Impl* ConnectionAccess::impl_of(Connection& connection) noexcept {
  return connection.impl_.get();
}

void ConnectionAccess::time_statements(Connection& connection,
                                       std::shared_ptr<StatementTimes> times) noexcept {
  if (connection.impl_) connection.impl_->statement_times = std::move(times);
}

void ConnectionAccess::forget_statements(Connection& connection) noexcept {
  if (!connection.impl_) return;
  connection.impl_->statements.clear();
  connection.impl_->evicted_statements.clear();
  connection.impl_->statement_index.clear();
}

void ConnectionAccess::interrupt(Connection::Impl& impl,
                                 std::chrono::milliseconds wait_for_cancel) noexcept {
  impl.interrupt(wait_for_cancel);
}

std::shared_future<void> ConnectionAccess::start_interrupt(Connection::Impl& impl) noexcept {
  return impl.start_interrupt();
}

void ConnectionAccess::finish_interrupt(Connection::Impl& impl) noexcept {
  impl.finish_interrupt();
}

void refuse_nested_transaction(const Connection& connection) {
  const TransactionStatus status = connection.transaction_status();
  if (status != TransactionStatus::in_transaction && status != TransactionStatus::in_error) return;
  throw Error(make_sqlstate_error("25001"),
              Diagnostics{.sqlstate = "25001",
                          .severity = "ERROR",
                          .message = "a transaction is already open on this connection: "
                                     "transactions do not nest, so BEGIN was not sent (its "
                                     "COMMIT or ROLLBACK would end the open transaction)",
                          .hint = "use a SAVEPOINT for a nested step, or end the open "
                                  "transaction first",
                          .statement = "BEGIN"});
}

void refuse_transaction_ended_by_body(const Connection& connection) {
  if (connection.transaction_status() != TransactionStatus::idle) return;
  throw Error(make_sqlstate_error("25P01"),
              Diagnostics{.sqlstate = "25P01",
                          .severity = "ERROR",
                          .message = "the body of transaction() ended the transaction block "
                                     "itself (a COMMIT, ROLLBACK or END it ran): the statements "
                                     "it ran after that ran outside the transaction, each "
                                     "committed on its own, and COMMIT was not sent",
                          .hint = "return from the body to commit and throw to roll back; for a "
                                  "step that may fail on its own, use SAVEPOINT and ROLLBACK TO "
                                  "SAVEPOINT",
                          .statement = "COMMIT"});
}

asio::awaitable<void> rollback_after_failure(Connection& connection) {
  co_await asio::this_coro::reset_cancellation_state();
  const auto status = connection.transaction_status();
  if (status != TransactionStatus::in_transaction && status != TransactionStatus::in_error) {
    co_return;  // broken or closed: the server rolls back when the session ends
  }
  try {
    co_await connection.rollback();
  } catch (const Error&) {  // NOLINT(bugprone-empty-catch): see above
  }
}

}  // namespace detail

}  // namespace pgrt
