#include "pgrt/db/connection.hpp"

#include <atomic>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cerrno>
#include <cstdlib>
#include <fcntl.h>
#include <future>
#include <libpq-fe.h>
#include <list>
#include <memory>
#include <mutex>
#include <poll.h>
#include <sys/socket.h>
#include <system_error>
#include <thread>
#include <unistd.h>
#include <unordered_map>
#include <variant>

#include "connection_access.hpp"
#include "pgrt/db/pipeline.hpp"
#include "pgrt/db/transaction.hpp"

namespace pgrt {

namespace asio = boost::asio;
using boost::system::error_code;

namespace {

constexpr auto no_throw = asio::as_tuple(asio::use_awaitable);
constexpr std::size_t copy_chunk_size = 64 * 1024;

std::string trimmed(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

bool contains(std::string_view text, std::string_view part) {
  return text.find(part) != std::string_view::npos;
}

// libpq's `options` startup parameter separates arguments by spaces; escape them.
std::string escape_option_value(std::string_view value) {
  std::string escaped;
  for (char c : value) {
    if (c == ' ' || c == '\\') escaped += '\\';
    escaped += c;
  }
  return escaped;
}

std::vector<std::string> split_hosts(const std::string& hosts) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  for (;;) {
    auto comma = hosts.find(',', start);
    parts.push_back(hosts.substr(start, comma - start));
    if (comma == std::string::npos) return parts;
    start = comma + 1;
  }
}

struct ParsedConninfo {
  bool valid = false;
  std::unordered_map<std::string, std::string> values;
  [[nodiscard]] std::string get(const std::string& keyword, const char* env) const {
    if (auto it = values.find(keyword); it != values.end()) return it->second;
    const char* from_env = env != nullptr ? std::getenv(env) : nullptr;
    return from_env != nullptr ? from_env : "";
  }
};

ParsedConninfo parse_conninfo(const std::string& conninfo) {
  ParsedConninfo parsed;
  char* error = nullptr;
  PQconninfoOption* options = PQconninfoParse(conninfo.c_str(), &error);
  PQfreemem(error);  // may quote the password: never shown
  if (options == nullptr) return parsed;
  parsed.valid = true;
  for (const PQconninfoOption* option = options; option->keyword != nullptr; ++option) {
    if (option->val != nullptr) parsed.values.emplace(option->keyword, option->val);
  }
  PQconninfoFree(options);
  return parsed;
}

bool mentions_password(std::string_view conninfo) {
  if (contains(conninfo, "password")) return true;
  auto scheme = conninfo.find("://");
  if (scheme == std::string_view::npos) return false;
  auto at = conninfo.find('@', scheme);
  auto colon = conninfo.find(':', scheme + 3);
  return at != std::string_view::npos && colon != std::string_view::npos && colon < at;
}

}  // namespace

struct Connection::Impl {
  Impl(executor_type executor_in, ConnectOptions options_in)
      : executor(std::move(executor_in)), socket(executor), options(std::move(options_in)) {}
  ~Impl() { close(CloseMode::graceful); }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  Impl(Impl&&) = delete;
  Impl& operator=(Impl&&) = delete;

  struct CachedStatement {
    std::string key;
    std::string name;
  };

  executor_type executor;
  asio::generic::stream_protocol::socket socket;  // wraps PQsocket() without owning it
  ConnectOptions options;
  PGconn* conn = nullptr;
  Diagnostics last_error;
  bool busy = false;
  bool broken = false;
  std::list<CachedStatement> statements;  // most recently used first
  std::unordered_map<std::string, std::list<CachedStatement>::iterator> statement_index;
  std::uint64_t next_statement_id = 0;

  // What interrupt() needs, from any thread: the open connection's descriptor and cancel key.
  // close() clears them under the mutex before PQfinish() frees the descriptor, so interrupt()
  // never shuts down a descriptor that has been reused for something else.
  std::mutex interrupt_mutex;
  int interruptible_fd = -1;
  std::shared_ptr<PGcancel> interrupt_cancel;
  std::atomic<bool> cut_by_owner{false};
  // Set while a Lease holds this connection: close() hands the open connection to it.
  detail::LeaseBinding* lease_binding = nullptr;

  // --- state ----------------------------------------------------------------------------------

  // Wraps libpq's current socket (TCP or unix) without taking ownership.
  error_code watch_socket() {
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

  void arm_interrupt() noexcept {
    std::lock_guard lock(interrupt_mutex);
    interruptible_fd = PQsocket(conn);
    interrupt_cancel = std::shared_ptr<PGcancel>(PQgetCancel(conn), PQfreeCancel);
  }

  void interrupt(std::chrono::milliseconds wait_for_cancel) noexcept {
    std::lock_guard lock(interrupt_mutex);
    if (interruptible_fd < 0) return;
    cut_by_owner = true;
    if (interrupt_cancel) {
      try {
        // PQcancel() blocks (it connects to the server): on a thread of its own, waited for at
        // most `wait_for_cancel` (an exiting process must send it before it is gone).
        auto sent = std::make_shared<std::promise<void>>();
        auto done = sent->get_future();
        std::thread([cancel = interrupt_cancel, sent] {
          char error[256];
          PQcancel(cancel.get(), error, sizeof error);
          sent->set_value();
        }).detach();
        if (wait_for_cancel.count() > 0) done.wait_for(wait_for_cancel);
      } catch (const std::exception&) {  // NOLINT(bugprone-empty-catch): shutdown() still cuts it
      }
    }
    ::shutdown(interruptible_fd, SHUT_RDWR);
  }

  void close(CloseMode mode) noexcept {
    {
      std::lock_guard lock(interrupt_mutex);
      interruptible_fd = -1;
      interrupt_cancel.reset();
    }
    if (socket.is_open()) {
      // Deregister from the reactor without closing: the descriptor belongs to libpq.
      error_code ignored;
      [[maybe_unused]] auto descriptor = socket.release(ignored);
    }
    if (conn != nullptr) {
      if (mode == CloseMode::immediate) ::shutdown(PQsocket(conn), SHUT_RDWR);
      PQfinish(conn);
      conn = nullptr;
    }
    statements.clear();
    statement_index.clear();
  }

  error_code fail(client_errc code, std::string message, std::string_view statement = {},
                  std::string hint = {}) {
    last_error = Diagnostics{.message = std::move(message),
                             .hint = std::move(hint),
                             .statement = std::string(statement)};
    return make_error_code(code);
  }

  // The connection is gone: close it and say why. A server error that came first (a FATAL such as
  // 57P01 from pg_terminate_backend) stays the message; libpq's own words go to the detail.
  error_code lost(std::string_view statement) {
    std::string libpq_message = conn != nullptr ? trimmed(PQerrorMessage(conn)) : "";
    broken = true;
    close(CloseMode::immediate);
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

  error_code server_error(const PGresult* result, std::string_view statement) {
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
    return make_sqlstate_error(last_error.sqlstate);
  }

  error_code begin_operation() {
    if (busy) {
      // Not recorded in last_error: that belongs to the operation that is running.
      return make_error_code(client_errc::concurrent_use);
    }
    if (conn == nullptr) {
      return fail(client_errc::not_connected,
                  broken ? "the connection was closed after a failure; open a new one"
                         : "the connection is not open");
    }
    last_error = {};
    return {};
  }

  // --- waiting ----------------------------------------------------------------------------------

  // Waits until libpq's socket has bytes to read (or end of file), without taking any. Asio's epoll
  // reactor is edge-triggered and a plain async_wait never looks at the socket first, so readiness
  // that came before the wait was queued (bytes libpq left unread, or an edge taken by another
  // thread running the reactor) would be lost. A one-byte MSG_PEEK receive is a speculative
  // operation: the reactor tries it at once and again after every edge, so nothing is lost.
  asio::awaitable<error_code> wait_readable() {
    char peeked = 0;
    auto [error, size] = co_await socket.async_receive(asio::buffer(&peeked, 1),
                                                       asio::socket_base::message_peek, no_throw);
    if (error == asio::error::eof) co_return error_code{};  // libpq reads the end of file itself
    co_return error;
  }

  // Waits until the socket is writable. Writes block only for large payloads; a poll() first
  // covers a socket that is writable already.
  asio::awaitable<error_code> wait_writable() {
    pollfd descriptor{.fd = socket.native_handle(), .events = POLLOUT, .revents = 0};
    if (::poll(&descriptor, 1, 0) > 0) co_return error_code{};
    auto [error] = co_await socket.async_wait(asio::socket_base::wait_write, no_throw);
    co_return error;
  }

  // Waits until the socket is writable or readable (reading meanwhile keeps a server that is
  // blocked sending results from blocking us).
  asio::awaitable<error_code> wait_writable_or_readable() {
    using namespace asio::experimental::awaitable_operators;
    auto outcome = co_await (wait_writable() || wait_readable());
    co_return std::visit([](error_code error) { return error; }, outcome);
  }

  // A wait ended early: the operation was cancelled, or the socket was closed under us.
  asio::awaitable<error_code> interrupted(error_code error, std::string_view statement,
                                          bool can_drain) {
    auto state = co_await asio::this_coro::cancellation_state;
    if (state.cancelled() == asio::cancellation_type::none) {
      if (conn == nullptr) co_return make_error_code(client_errc::not_connected);
      last_error.message = error.message();
      co_return lost(statement);
    }
    co_await asio::this_coro::reset_cancellation_state();
    if (!can_drain) {
      broken = true;
      close(CloseMode::immediate);
      co_return fail(client_errc::cancelled,
                     "the operation was cancelled; the connection was closed (a cancelled "
                     "pipeline cannot be drained)",
                     statement);
    }
    co_return co_await cancel_and_drain(statement);
  }

  // Asks the server to cancel the running statement. libpq 15's PQcancel blocks (it connects and
  // waits for the server), so it runs on a thread of its own and never on the io_context. The
  // returned flag turns true once the server has taken the request: only then may the connection
  // run another statement, or a late cancel would hit that one. nullptr if no request was sent.
  std::shared_ptr<std::atomic<bool>> send_cancel_request() noexcept {
    PGcancel* cancel = PQgetCancel(conn);
    if (cancel == nullptr) return nullptr;
    try {
      auto delivered = std::make_shared<std::atomic<bool>>(false);
      std::thread([cancel, delivered] {
        char error[256];
        PQcancel(cancel, error, sizeof error);
        PQfreeCancel(cancel);
        *delivered = true;
      }).detach();
      return delivered;
    } catch (const std::exception&) {
      PQfreeCancel(cancel);  // no thread, no request: the drain alone decides
      return nullptr;
    }
  }

  // Waits (polling: the helper thread must not touch the io_context) until the cancel request
  // has been delivered.
  asio::awaitable<bool> cancel_delivered(std::shared_ptr<std::atomic<bool>> delivered) {
    asio::steady_timer timer(executor);
    while (delivered && !*delivered) {
      timer.expires_after(std::chrono::milliseconds(1));
      if (auto [error] = co_await timer.async_wait(no_throw); error) co_return false;
    }
    co_return true;
  }

  // Reads and discards results until the connection is idle. False if it cannot get there.
  asio::awaitable<bool> drain() {
    for (;;) {
      while (PQisBusy(conn) != 0) {
        if (co_await wait_readable()) co_return false;
        if (PQconsumeInput(conn) == 0) co_return false;
      }
      PGresult* result = PQgetResult(conn);
      if (result == nullptr) co_return PQstatus(conn) == CONNECTION_OK;
      const auto status = PQresultStatus(result);
      PQclear(result);
      if (status == PGRES_COPY_IN) {
        PQputCopyEnd(conn, "cancelled by the client");
        while (PQflush(conn) == 1) {
          if (co_await wait_writable_or_readable()) co_return false;
          PQconsumeInput(conn);
        }
      }
    }
  }

  asio::awaitable<error_code> cancel_and_drain(std::string_view statement) {
    using namespace asio::experimental::awaitable_operators;
    auto delivered = send_cancel_request();
    asio::steady_timer timer(executor, options.cancel_timeout);
    auto outcome = co_await ((drain() && cancel_delivered(std::move(delivered))) ||
                             timer.async_wait(no_throw));
    if (outcome.index() == 0 && std::get<0>(std::get<0>(outcome)) &&
        std::get<1>(std::get<0>(outcome))) {
      co_return fail(client_errc::cancelled,
                     "the operation was cancelled; the statement was cancelled on the server and "
                     "the connection is idle again",
                     statement);
    }
    broken = true;
    close(CloseMode::immediate);
    co_return fail(client_errc::cancelled,
                   "the operation was cancelled, and the server did not end the statement within " +
                       std::to_string(options.cancel_timeout.count()) +
                       " ms, so the connection was closed",
                   statement, "the network or server may be unresponsive");
  }

  // --- sending and receiving
  // ----------------------------------------------------------------------

  asio::awaitable<error_code> flush(std::string_view statement, bool can_drain = true) {
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
  asio::awaitable<error_code> next_result(PGresult*& out, std::string_view statement,
                                          bool can_drain = true) {
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
  asio::awaitable<error_code> collect(std::string_view statement, Result& out,
                                      const std::function<void(const Row&)>* on_row,
                                      std::uint64_t* streamed_rows) {
    error_code first_error;
    for (;;) {
      PGresult* raw = nullptr;
      if (auto error = co_await next_result(raw, statement)) co_return error;
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

  asio::awaitable<error_code> send_and_collect(std::string_view sql, const ParamSink& params,
                                               const std::string* prepared_name, Result& out,
                                               const std::function<void(const Row&)>* on_row,
                                               std::uint64_t* streamed_rows) {
    const auto values = params.values();
    const int count = static_cast<int>(params.size());
    int sent = 0;
    if (prepared_name != nullptr) {
      sent = PQsendQueryPrepared(conn, prepared_name->c_str(), count, values.data(),
                                 params.lengths(), params.formats(), 0);
    } else {
      const std::string text(sql);
      sent = PQsendQueryParams(conn, text.c_str(), count, params.types(), values.data(),
                               params.lengths(), params.formats(), 0);
    }
    if (sent == 0) co_return lost(sql);
    if (on_row != nullptr) PQsetSingleRowMode(conn);
    if (auto error = co_await flush(sql)) co_return error;
    co_return co_await collect(sql, out, on_row, streamed_rows);
  }

  // A prepared statement for this SQL text and these parameter types, prepared on first use.
  asio::awaitable<error_code> prepared_name_for(std::string_view sql, const ParamSink& params,
                                                std::string& name) {
    std::string key(sql);
    key += '\0';
    for (std::size_t i = 0; i < params.size(); ++i) key += std::to_string(params.types()[i]) + ',';
    if (auto found = statement_index.find(key); found != statement_index.end()) {
      statements.splice(statements.begin(), statements, found->second);
      name = found->second->name;
      co_return error_code{};
    }
    name = "pgrt_" + std::to_string(next_statement_id++);
    const std::string text(sql);
    if (PQsendPrepare(conn, name.c_str(), text.c_str(), static_cast<int>(params.size()),
                      params.types()) == 0) {
      co_return lost(sql);
    }
    if (auto error = co_await flush(sql)) co_return error;
    Result ignored;
    if (auto error = co_await collect(sql, ignored, nullptr, nullptr)) co_return error;
    statements.push_front(CachedStatement{key, name});
    statement_index.emplace(std::move(key), statements.begin());
    while (statements.size() > std::max<std::size_t>(options.statement_cache_size, 1)) {
      const std::string evicted = statements.back().name;
      statement_index.erase(statements.back().key);
      statements.pop_back();
      const std::string deallocate = "DEALLOCATE " + evicted;
      if (PQsendQuery(conn, deallocate.c_str()) == 0) co_return lost(deallocate);
      if (auto error = co_await flush(deallocate)) co_return error;
      if (auto error = co_await collect(deallocate, ignored, nullptr, nullptr)) co_return error;
    }
    co_return error_code{};
  }

  void forget_statement(const std::string& name) {
    for (auto it = statements.begin(); it != statements.end(); ++it) {
      if (it->name == name) {
        statement_index.erase(it->key);
        statements.erase(it);
        return;
      }
    }
  }

  // --- connecting
  // ---------------------------------------------------------------------------------

  std::string target() const {
    if (conn == nullptr) return "the server";
    std::string host = PQhost(conn) != nullptr ? PQhost(conn) : "";
    std::string port = PQport(conn) != nullptr ? PQport(conn) : "";
    std::string where = host.empty() || host.front() != '/' ? host + ":" + port
                                                            : "socket " + host + " port " + port;
    return where + " (database \"" + (PQdb(conn) != nullptr ? PQdb(conn) : "") + "\", user \"" +
           (PQuser(conn) != nullptr ? PQuser(conn) : "") + "\")";
  }

  error_code connect_error() {
    const std::string message = trimmed(conn != nullptr ? PQerrorMessage(conn) : "out of memory");
    std::string where = target();
    close(CloseMode::immediate);
    auto classify = [&](std::string_view sqlstate, std::string hint) {
      last_error = Diagnostics{.sqlstate = std::string(sqlstate),
                               .severity = "FATAL",
                               .message = "could not connect to " + where + ": " + message,
                               .hint = std::move(hint)};
      return make_sqlstate_error(sqlstate);
    };
    if (contains(message, "password authentication failed")) {
      return classify("28P01", "check the user name and password (conninfo or PGPASSWORD)");
    }
    if (contains(message, "database") && contains(message, "does not exist")) {
      return classify("3D000", "check the database name, or create the database");
    }
    if (contains(message, "role") && contains(message, "does not exist")) {
      return classify("28000", "check the user name, or create the role");
    }
    if (contains(message, "too many clients") || contains(message, "remaining connection slots")) {
      return classify("53300",
                      "the server is at max_connections: close idle connections elsewhere, lower "
                      "pool sizes, or raise max_connections; retry with backoff");
    }
    if (contains(message, "the database system is")) {
      return classify("57P03", "the server is starting up or shutting down; retry shortly");
    }
    if (contains(message, "could not translate host name")) {
      return fail(client_errc::name_resolution, "could not connect to " + where + ": " + message,
                  {}, "check the host name and DNS");
    }
    std::string hint =
        "check that the server is running and accepts connections on that host "
        "and port (listen_addresses, pg_hba.conf, firewalls)";
    if (contains(message, "no password supplied")) {
      hint = "the server wants a password: put it in the conninfo, PGPASSWORD or ~/.pgpass";
    }
    return fail(client_errc::connect_failed, "could not connect to " + where + ": " + message, {},
                std::move(hint));
  }

  // Resolves host names with asio's resolver (a background thread), so that libpq, which would
  // call getaddrinfo() on the event loop, gets numeric addresses in `hostaddr`. A name with several
  // addresses becomes several host entries, one per address, tried in order as libpq would.
  struct Targets {
    std::string host;
    std::string hostaddr;
    std::string port;
  };
  asio::awaitable<error_code> resolve_hosts(const ParsedConninfo& parsed,
                                            std::optional<Targets>& targets) {
    const std::string hosts = parsed.get("host", "PGHOST");
    if (hosts.empty() || !parsed.get("hostaddr", "PGHOSTADDR").empty()) co_return error_code{};
    const auto host_list = split_hosts(hosts);
    const auto port_list = split_hosts(parsed.get("port", "PGPORT"));
    const bool port_per_host = port_list.size() > 1;
    Targets resolved;
    bool any_resolved = false;
    asio::ip::tcp::resolver resolver(executor);
    std::size_t entries = 0;
    auto append = [&](const std::string& host, const std::string& address, std::size_t index) {
      const std::string separator = entries++ == 0 ? "" : ",";
      resolved.host += separator + host;
      resolved.hostaddr += separator + address;
      if (port_per_host) resolved.port += separator + port_list[index];
    };
    for (std::size_t index = 0; index < host_list.size(); ++index) {
      const std::string& host = host_list[index];
      const bool is_path = !host.empty() && (host.front() == '/' || host.front() == '@');
      error_code numeric_error;
      if (!host.empty() && !is_path) asio::ip::make_address(host, numeric_error);
      if (host.empty() || is_path || !numeric_error) {
        append(host, "", index);
        continue;
      }
      auto [error, results] = co_await resolver.async_resolve(host, "", no_throw);
      if (error) {
        co_return fail(client_errc::name_resolution,
                       "could not resolve host name \"" + host + "\": " + error.message(), {},
                       "check the host name and DNS");
      }
      for (const auto& entry : results) {
        append(host, entry.endpoint().address().to_string(), index);
        any_resolved = true;
      }
    }
    if (any_resolved) {
      if (!port_per_host) resolved.port.clear();
      targets = std::move(resolved);
    }
    co_return error_code{};
  }

  asio::awaitable<error_code> connect() {
    const ParsedConninfo parsed = parse_conninfo(options.conninfo);
    if (!parsed.valid) {
      std::string message = "the conninfo could not be parsed";
      if (!mentions_password(options.conninfo)) {
        message += ": \"" + options.conninfo + "\"";
      }
      co_return fail(client_errc::connect_failed, message, {},
                     "use a URL (postgresql://user@host:5432/db) or key=value pairs "
                     "(host=... dbname=...)");
    }
    std::optional<Targets> targets;
    if (auto error = co_await resolve_hosts(parsed, targets)) co_return error;

    std::vector<std::pair<std::string, std::string>> params;
    if (!options.conninfo.empty()) params.emplace_back("dbname", options.conninfo);
    std::string startup_options = parsed.get("options", "PGOPTIONS");
    bool datestyle_given = false;
    for (const auto& [name, value] : options.session_settings) {
      std::string lowered;
      for (char c : name) lowered += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      datestyle_given = datestyle_given || lowered == "datestyle";
      startup_options += " -c " + escape_option_value(name) + "=" + escape_option_value(value);
    }
    if (!datestyle_given) startup_options += " -c DateStyle=ISO";
    params.emplace_back("options", startup_options);
    if (!options.application_name.empty()) {
      params.emplace_back("application_name", options.application_name);
    }
    if (options.keepalives) {
      params.emplace_back("keepalives", "1");
      params.emplace_back("keepalives_idle", std::to_string(options.keepalives->idle.count()));
      params.emplace_back("keepalives_interval",
                          std::to_string(options.keepalives->interval.count()));
      params.emplace_back("keepalives_count", std::to_string(options.keepalives->count));
    }
    if (options.tcp_user_timeout.count() > 0) {
      params.emplace_back("tcp_user_timeout", std::to_string(options.tcp_user_timeout.count()));
    }
    if (targets) {
      params.emplace_back("host", targets->host);
      params.emplace_back("hostaddr", targets->hostaddr);
      if (!targets->port.empty()) params.emplace_back("port", targets->port);
    }
    std::vector<const char*> keywords;
    std::vector<const char*> values;
    for (const auto& [keyword, value] : params) {
      keywords.push_back(keyword.c_str());
      values.push_back(value.c_str());
    }
    keywords.push_back(nullptr);
    values.push_back(nullptr);

    conn = PQconnectStartParams(keywords.data(), values.data(), 1);
    if (conn == nullptr || PQstatus(conn) == CONNECTION_BAD) co_return connect_error();
    PostgresPollingStatusType polling = PGRES_POLLING_WRITING;
    while (polling != PGRES_POLLING_OK) {
      if (polling == PGRES_POLLING_FAILED) co_return connect_error();
      // libpq may open a new socket at any step (next address, next host, SSL fallback): wrap the
      // current one afresh each time.
      if (auto assign_error = watch_socket()) {
        co_return fail(client_errc::connect_failed,
                       "cannot watch the connection's socket: " + assign_error.message());
      }
      auto [error] = co_await socket.async_wait(polling == PGRES_POLLING_READING
                                                    ? asio::socket_base::wait_read
                                                    : asio::socket_base::wait_write,
                                                no_throw);
      if (error) {
        std::string where = target();
        close(CloseMode::immediate);
        co_return fail(client_errc::cancelled, "connecting to " + where + " was cancelled");
      }
      polling = PQconnectPoll(conn);
    }
    if (PQsetnonblocking(conn, 1) != 0) co_return connect_error();
    if (auto assign_error = watch_socket()) {
      close(CloseMode::immediate);
      co_return fail(client_errc::connect_failed,
                     "cannot watch the connection's socket: " + assign_error.message());
    }
    arm_interrupt();
    co_return error_code{};
  }
};

// Marks an operation running for its whole duration, restoring the coroutine's throw-if-cancelled
// setting (operations handle cancellation themselves and must keep awaiting after it).
class Operation {
 public:
  explicit Operation(Connection::Impl& impl) noexcept : impl_(impl) { impl_.busy = true; }
  ~Operation() { impl_.busy = false; }
  Operation(const Operation&) = delete;
  Operation& operator=(const Operation&) = delete;
  Operation(Operation&&) = delete;
  Operation& operator=(Operation&&) = delete;

 private:
  Connection::Impl& impl_;
};

namespace {

[[noreturn]] void throw_not_connected() {
  throw Error(make_error_code(client_errc::not_connected),
              Diagnostics{.message = "the connection is not open (closed, moved from, or given "
                                     "back to its pool with the Lease it came from)",
                          .hint = "a Connection& taken from a Lease is valid only while that "
                                  "Lease holds it: use the Lease itself"});
}

// Runs `body` as one connection operation; throws pgrt::Error on failure.
template <typename Body>
asio::awaitable<error_code> run_operation(Connection::Impl& impl, Body body) {
  if (auto error = impl.begin_operation()) co_return error;
  Operation operation(impl);
  const bool throw_if_cancelled = co_await asio::this_coro::throw_if_cancelled();
  co_await asio::this_coro::throw_if_cancelled(false);
  error_code error;
  std::exception_ptr failure;  // e.g. from a stream() callback
  try {
    error = co_await body();
  } catch (...) {
    failure = std::current_exception();
  }
  co_await asio::this_coro::throw_if_cancelled(throw_if_cancelled);
  if (failure) std::rethrow_exception(failure);
  co_return error;
}

}  // namespace

void Connection::ImplDeleter::operator()(Impl* impl) const noexcept {
  delete impl;  // NOLINT(cppcoreguidelines-owning-memory): the ImplPtr owns it
}

asio::awaitable<std::pair<error_code, Connection>> Connection::try_connect(executor_type executor,
                                                                           ConnectOptions options) {
  using namespace asio::experimental::awaitable_operators;
  ImplPtr impl(new Impl(executor, std::move(options)));  // NOLINT: owned by the ImplPtr
  asio::steady_timer timer(executor, impl->options.connect_timeout);
  auto outcome = co_await (impl->connect() || timer.async_wait(no_throw));
  error_code error;
  if (outcome.index() == 0) {
    error = std::get<0>(outcome);
  } else if (std::get<0>(std::get<1>(outcome)) == asio::error::operation_aborted) {
    std::string where = impl->target();
    impl->close(CloseMode::immediate);
    error = impl->fail(client_errc::cancelled, "connecting to " + where + " was cancelled");
  } else {
    std::string where = impl->target();
    impl->close(CloseMode::immediate);
    error = impl->fail(client_errc::timeout,
                       "could not connect to " + where + " within " +
                           std::to_string(impl->options.connect_timeout.count()) + " ms",
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

asio::awaitable<Result> Connection::query_with(std::string_view sql, ParamSink params) {
  if (!impl_) throw_not_connected();
  Result result;
  Impl& impl = *impl_;
  auto error = co_await run_operation(impl, [&]() -> asio::awaitable<error_code> {
    co_return co_await impl.send_and_collect(sql, params, nullptr, result, nullptr, nullptr);
  });
  if (error) throw Error(error, impl.last_error);
  co_return result;
}

asio::awaitable<std::uint64_t> Connection::execute_with(std::string_view sql, ParamSink params) {
  Result result = co_await query_with(sql, std::move(params));
  co_return result.affected_rows();
}

asio::awaitable<Result> Connection::query_prepared_with(std::string_view sql, ParamSink params) {
  if (!impl_) throw_not_connected();
  Result result;
  Impl& impl = *impl_;
  auto error = co_await run_operation(impl, [&]() -> asio::awaitable<error_code> {
    for (int attempt = 0;; ++attempt) {
      std::string name;
      if (auto prepare_error = co_await impl.prepared_name_for(sql, params, name)) {
        co_return prepare_error;
      }
      auto run_error = co_await impl.send_and_collect(sql, params, &name, result, nullptr, nullptr);
      // Someone deallocated it (DISCARD ALL, a pooler): prepare again, once.
      if (run_error == make_sqlstate_error("26000") && attempt == 0) {
        impl.forget_statement(name);
        continue;
      }
      co_return run_error;
    }
  });
  if (error) throw Error(error, impl.last_error);
  co_return result;
}

asio::awaitable<std::uint64_t> Connection::stream_with(std::string_view sql, ParamSink params,
                                                       std::function<void(const Row&)> on_row) {
  if (!impl_) throw_not_connected();
  Result last;
  std::uint64_t rows = 0;
  Impl& impl = *impl_;
  auto error = co_await run_operation(impl, [&]() -> asio::awaitable<error_code> {
    co_return co_await impl.send_and_collect(sql, params, nullptr, last, &on_row, &rows);
  });
  if (error) throw Error(error, impl.last_error);
  co_return rows;
}

asio::awaitable<std::vector<PipelineOutcome>> Connection::run(const Pipeline& pipeline) {
  if (!impl_) throw_not_connected();
  Impl& impl = *impl_;
  std::vector<PipelineOutcome> outcomes(pipeline.size());
  if (pipeline.size() == 0) co_return outcomes;
  auto error = co_await run_operation(impl, [&]() -> asio::awaitable<error_code> {
    PGconn* conn = impl.conn;
    if (PQenterPipelineMode(conn) == 0) {
      co_return impl.fail(client_errc::protocol_error,
                          "cannot enter pipeline mode: " + trimmed(PQerrorMessage(conn)));
    }
    std::size_t syncs = 0;
    const auto& statements = pipeline.statements();
    for (std::size_t i = 0; i < statements.size(); ++i) {
      const auto& statement = statements[i];
      const auto values = statement.params.values();
      if (PQsendQueryParams(conn, statement.sql.c_str(), static_cast<int>(statement.params.size()),
                            statement.params.types(), values.data(), statement.params.lengths(),
                            statement.params.formats(), 0) == 0) {
        co_return impl.lost(statement.sql);
      }
      if (statement.sync_after || i + 1 == statements.size()) {
        if (PQpipelineSync(conn) == 0) co_return impl.lost(statement.sql);
        ++syncs;
      }
    }
    if (auto flush_error = co_await impl.flush("pipeline", /*can_drain=*/false)) {
      co_return flush_error;
    }
    std::size_t index = 0;
    for (std::size_t syncs_seen = 0; syncs_seen < syncs;) {
      PGresult* raw = nullptr;
      const std::string_view current =
          index < statements.size() ? std::string_view(statements[index].sql) : "pipeline";
      if (auto read_error = co_await impl.next_result(raw, current, /*can_drain=*/false)) {
        co_return read_error;
      }
      if (raw == nullptr) {
        if (PQstatus(conn) != CONNECTION_OK) co_return impl.lost(current);
        continue;  // the end of one statement's results
      }
      Result result(raw);
      const auto status = PQresultStatus(raw);
      if (status == PGRES_PIPELINE_SYNC) {
        ++syncs_seen;
        continue;
      }
      if (index >= outcomes.size()) continue;
      PipelineOutcome& outcome = outcomes[index++];
      if (status == PGRES_PIPELINE_ABORTED) {
        outcome.error = make_error_code(client_errc::pipeline_aborted);
        outcome.diagnostics.message =
            "not run: an earlier statement of the same pipeline segment failed";
        outcome.diagnostics.statement = std::string(current);
      } else if (status == PGRES_TUPLES_OK || status == PGRES_COMMAND_OK) {
        outcome.result = std::move(result);
      } else {
        outcome.error = impl.server_error(raw, current);
        outcome.diagnostics = impl.last_error;
      }
    }
    if (PQexitPipelineMode(conn) == 0) {
      co_return impl.lost("pipeline");  // never hand back a connection still in pipeline mode
    }
    impl.last_error = {};
    co_return error_code{};
  });
  if (error) throw Error(error, impl.last_error);
  co_return outcomes;
}

asio::awaitable<std::uint64_t> Connection::copy_from(std::string_view copy_statement,
                                                     std::string_view data) {
  if (!impl_) throw_not_connected();
  Impl& impl = *impl_;
  Result result;
  auto error = co_await run_operation(impl, [&]() -> asio::awaitable<error_code> {
    PGconn* conn = impl.conn;
    const std::string statement(copy_statement);
    if (PQsendQuery(conn, statement.c_str()) == 0) co_return impl.lost(statement);
    if (auto flush_error = co_await impl.flush(statement)) co_return flush_error;
    PGresult* raw = nullptr;
    if (auto read_error = co_await impl.next_result(raw, statement)) co_return read_error;
    Result first(raw);
    if (raw == nullptr || PQresultStatus(raw) != PGRES_COPY_IN) {
      error_code failure =
          raw != nullptr && PQresultStatus(raw) == PGRES_FATAL_ERROR
              ? impl.server_error(raw, statement)
              : impl.fail(client_errc::protocol_error,
                          "copy_from() needs a COPY ... FROM STDIN statement", statement);
      Result rest;
      if (auto collect_error = co_await impl.collect(statement, rest, nullptr, nullptr)) {
        co_return collect_error;
      }
      co_return failure;
    }
    for (std::size_t offset = 0; offset < data.size();) {
      const std::size_t size = std::min(copy_chunk_size, data.size() - offset);
      const int put = PQputCopyData(conn, data.data() + offset, static_cast<int>(size));
      if (put < 0) co_return impl.lost(statement);
      if (put == 0) {  // libpq's buffer is full
        if (auto flush_error = co_await impl.flush(statement)) co_return flush_error;
        continue;
      }
      offset += size;
    }
    for (;;) {
      const int ended = PQputCopyEnd(conn, nullptr);
      if (ended < 0) co_return impl.lost(statement);
      if (ended == 1) break;
      if (auto flush_error = co_await impl.flush(statement)) co_return flush_error;
    }
    if (auto flush_error = co_await impl.flush(statement)) co_return flush_error;
    co_return co_await impl.collect(statement, result, nullptr, nullptr);
  });
  if (error) throw Error(error, impl.last_error);
  co_return result.affected_rows();
}

asio::awaitable<void> Connection::begin(TransactionOptions options) {
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
  Result result = co_await query_with("COMMIT", {});
  // COMMIT of a failed transaction "succeeds" with the tag ROLLBACK: that is a failure to the
  // caller.
  if (result.command_tag() == "ROLLBACK") {
    throw Error(make_sqlstate_error("25P02"),
                Diagnostics{.sqlstate = "25P02",
                            .severity = "ERROR",
                            .message = "the transaction had failed, so COMMIT rolled it back",
                            .statement = "COMMIT"});
  }
}

asio::awaitable<void> Connection::rollback() {
  co_await query_with("ROLLBACK", {});
}

asio::awaitable<void> Connection::discard_all() {
  if (!impl_) throw_not_connected();
  // Forgotten first: if DISCARD ALL fails half-way, a statement the server still knows is merely
  // prepared again under a new name.
  impl_->statements.clear();
  impl_->statement_index.clear();
  co_await query_with("DISCARD ALL", {});
}

asio::awaitable<std::pair<error_code, Result>> Connection::try_query(std::string sql,
                                                                     ParamSink params) {
  try {
    Result result = co_await query_with(sql, std::move(params));
    co_return std::pair{error_code{}, std::move(result)};
  } catch (const Error& error) {
    co_return std::pair{error.code(), Result()};
  }
}

asio::awaitable<std::pair<error_code, std::uint64_t>> Connection::try_execute(std::string sql,
                                                                              ParamSink params) {
  try {
    const std::uint64_t rows = co_await execute_with(sql, std::move(params));
    co_return std::pair{error_code{}, rows};
  } catch (const Error& error) {
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

asio::awaitable<bool> Connection::close_and_wait(std::chrono::milliseconds limit,
                                                 std::function<bool()> keep_waiting) {
  if (!impl_ || impl_->conn == nullptr) co_return true;
  // A backend running a statement reads the Terminate only when the statement ends: cancel it,
  // so that the backend ends now rather than after its statement (and the server's end closes).
  if (PQtransactionStatus(impl_->conn) == PQTRANS_ACTIVE) (void)impl_->send_cancel_request();
  // A second descriptor for the same socket keeps it open after PQfinish() closes libpq's, so the
  // server's end can be watched: it closes the socket only after its pg_stat_activity entry is
  // gone (the backend clears that entry before it exits).
  const int fd = PQsocket(impl_->conn);
  const int watched = fd >= 0 ? ::fcntl(fd, F_DUPFD_CLOEXEC, 0) : -1;
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  const bool named =
      watched >= 0 && ::getsockname(watched, reinterpret_cast<sockaddr*>(&address), &length) == 0;
  impl_->close(CloseMode::graceful);
  if (!named) {
    if (watched >= 0) ::close(watched);
    co_return false;
  }
  // Our descriptor keeps the socket open, so the server would never see the client go: send it
  // end-of-file now (after the Terminate libpq queued). A backend still busy with a statement the
  // cancel did not reach then notices at its next client_connection_check_interval check.
  (void)::shutdown(watched, SHUT_WR);
  const auto executor = co_await asio::this_coro::executor;
  asio::generic::stream_protocol::socket socket(executor);
  error_code error;
  socket.assign(asio::generic::stream_protocol(address.ss_family, 0), watched, error);
  if (error) {
    ::close(watched);
    co_return false;
  }
  using namespace asio::experimental::awaitable_operators;
  asio::steady_timer timer(executor, limit);
  for (;;) {
    auto outcome = co_await (socket.async_wait(asio::socket_base::wait_read, no_throw) ||
                             timer.async_wait(no_throw));
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

void ConnectionAccess::interrupt(Connection::Impl& impl,
                                 std::chrono::milliseconds wait_for_cancel) noexcept {
  impl.interrupt(wait_for_cancel);
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
