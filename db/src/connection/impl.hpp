#pragma once

// Connection::Impl, private to pgrt_db: the state of one libpq connection and the operations on it.
// Its member functions live in files named by job:
//   connection/conninfo.cpp         parsing the conninfo (conninfo.hpp), password redaction
//   connection/connect.cpp          resolving host names, connecting, connect errors, the check
//                                   for a pooler nobody told pgrt about
//   connection/io.cpp               the socket watch, the readiness waits, sending and collecting
//                                   results (the per-query path, kept in one translation unit)
//   connection/cancel.cpp           interrupt(), a cancelled operation: cancel request and drain
//   connection/statement_cache.cpp  the prepared statements, most recently used first
//   connection.cpp                  close(), failures, and the public Connection methods
//   pipeline.cpp, copy.cpp          Connection::run() and Connection::copy_from()

#include <atomic>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/cancellation_state.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <future>
#include <initializer_list>
#include <libpq-fe.h>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "../connection_access.hpp"
#include "../sql_text.hpp"
#include "pgrt/db/connection.hpp"
#include "pgrt/db/deadline.hpp"

namespace pgrt {

namespace asio = boost::asio;
using boost::system::error_code;

struct ParsedConninfo;  // conninfo.hpp

inline constexpr auto no_throw = asio::as_tuple(asio::use_awaitable);
// The same for an operation awaited directly by the coroutine that starts it: asio runs its
// initiation from the awaiting frame, where use_awaitable starts a coroutine frame of its own for
// it (an allocation, a resumption and a destruction per wait). For the per-query waits.
inline constexpr auto no_throw_in_frame = asio::as_tuple(asio::deferred);

// Whether a cancellation of the running coroutine has been requested and not yet handled
// (interrupted() resets it). asio delivers a cancellation to the operation pending when it is
// emitted; one emitted while none was (the last wait had completed, its resumption not yet run: a
// multi-threaded io_context, a strand busy with something else) is only recorded in the
// coroutine's cancellation state. A wait about to start looks there first: with
// throw_if_cancelled(false), as the connection's operations run, it would otherwise wait on
// without a bound. (co_await asio::this_coro::cancellation_state never suspends.)
inline bool cancellation_requested(const asio::cancellation_state& state) noexcept {
  return state.cancelled() != asio::cancellation_type::none;
}

inline std::string trimmed(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

inline bool contains(std::string_view text, std::string_view part) {
  return text.find(part) != std::string_view::npos;
}

// A prepared statement whose result's shape changed since it was prepared (an ALTER TABLE under a
// SELECT *): SQLSTATE 0A000 from the server's plan revalidation ("cached plan must not change
// result type"; told by the routine, not the message, which may be translated). The statement did
// not run; prepared again, it does.
bool is_stale_plan(const PGresult* result);

// Whether `error` says the server no longer has our prepared statement `name`: SQLSTATE 26000
// whose message names it (a 26000 from inside the statement, e.g. a function's EXECUTE, is the
// statement's own). The statement did not run.
bool forgot_statement(const error_code& error, const Diagnostics& diagnostics,
                      const std::string& name);

struct Connection::Impl {
  Impl(executor_type executor_in, ConnectOptions options_in)
      : executor(std::move(executor_in)),
        socket(socket_executor(executor)),
        options(std::move(options_in)) {}
  ~Impl() { close(CloseMode::graceful); }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  Impl(Impl&&) = delete;
  Impl& operator=(Impl&&) = delete;

  struct CachedStatement {
    std::string key;
    std::string name;
  };

  // The executor that the socket's operations count as outstanding work on: a strand's inner
  // executor. Completions run on the executor of the coroutine that awaits them, whatever it is,
  // so the strand gains the socket nothing; and a strand does not fit any_io_executor's
  // small-object buffer, so asio would copy it to the heap for every wait (its work tracking).
  static executor_type socket_executor(const executor_type& executor);

  executor_type executor;
  asio::generic::stream_protocol::socket socket;  // wraps PQsocket() without owning it
  ConnectOptions options;
  PGconn* conn = nullptr;
  void* tls_session = nullptr;  // libpq's OpenSSL SSL*, while the connection uses TLS
  Diagnostics last_error;
  bool busy = false;
  bool broken = false;
  std::list<CachedStatement> statements;  // most recently used first
  std::unordered_map<std::string, std::list<CachedStatement>::iterator> statement_index;
  std::uint64_t next_statement_id = 0;
  std::string statement_prefix;                 // "pgrt_<random>_", made on the first prepare
  std::vector<std::string> evicted_statements;  // to DEALLOCATE once outside a transaction
  std::string statement_key;  // cached_statement()'s lookup key, kept to spare an allocation
  // libpq 15 keeps single-row mode on after a stream()'s statement until the next statement sent
  // outside pipeline mode, so the first statement of a pipeline run next would be in it: run()
  // sends an empty statement first while this is set (send() keeps it).
  bool single_row_mode_left_on = false;
  // Behind a transaction pooler (configured, or noticed: at connect, see notice_pooler(), or when
  // the server forgets named statements, see exchange()) query_prepared() sends unnamed
  // statements; forgotten_statements counts the named ones the server lost.
  bool unnamed_statements = false;
  // notice_pooler() got an error, not a pid, for its statement (connect() passes such a host over
  // while another is left to try), and the error's words.
  bool first_statement_refused = false;
  std::string refused_first_statement;
  // Behind a pooler (configured as a transaction pooler, or noticed: at connect, or when the server
  // forgets named statements), at most one sync segment is in flight:
  // PgBouncer before 1.21 counts a client's Syncs as it reads them and gives the server session
  // back to its pool once those are answered, even when it has passed on the start of the next
  // segment (pgbouncer#759), which then runs in another client's session: for it, two answers;
  // for us, none, or the pooler's "server conn crashed?"; or, when our segment's Sync reaches a
  // session holding another client's stranded statement, that statement's answer in place of
  // ours, the counts in step (no check of the answers can tell). Only never sending the start of
  // a segment before the last one is answered rules it out.
  [[nodiscard]] bool one_segment_in_flight() const noexcept { return unnamed_statements; }
  // A pooled connection's: each statement's duration (ConnectionAccess::time_statements).
  std::shared_ptr<detail::StatementTimes> statement_times;
  int forgotten_statements = 0;

  // What interrupt() needs, from any thread: the open connection's descriptor and cancel key.
  // close() clears them under the mutex before PQfinish() frees the descriptor, so interrupt()
  // never shuts down a descriptor that has been reused for something else.
  std::mutex interrupt_mutex;
  int interruptible_fd = -1;
  // After a close that could not wait for the server (a cancelled pipeline, a connect attempt
  // that ran out of time): a second descriptor of each such socket, so that close_and_wait() can
  // still see the server end those sessions (the pool keeps the connection's capacity until
  // then). One per attempt: the addresses of a name and the hosts of a conninfo each leave one.
  // close() closes them unless told to keep them (between the attempts of one connect).
  std::vector<int> lingering_fds;
  std::shared_ptr<PGcancel> interrupt_cancel;
  std::atomic<bool> cut_by_owner{false};
  // The socket's reading side was shut down (finish_interrupt()): the server's end of the session
  // can no longer be seen on it. Under interrupt_mutex.
  bool read_side_cut = false;
  // Set while a Lease holds this connection: close() hands the open connection to it.
  detail::LeaseBinding* lease_binding = nullptr;

  // --- state (connection.cpp) -------------------------------------------------------------------

  enum class Lingering : bool { close, keep };
  void close(CloseMode mode, Lingering lingering = Lingering::close) noexcept;
  void close_lingering() noexcept;
  // Closes gracefully, keeping a second descriptor of the socket (returned; -1 if none) on which
  // the server's end can be seen to close; end-of-file has been sent on it. `lingering_fds` stay.
  int close_keeping_socket() noexcept;
  // Adds `fd` (if >= 0) to `lingering_fds`. Without the memory for it, closes it instead: the
  // server still sees the end of the session, but close_and_wait() cannot wait for it.
  void keep_lingering(int fd) noexcept;
  // A connect attempt that ran out of time: closed. Once the socket is connected the server may
  // have a backend for it, in its start-up, which lives on after this: then a second descriptor
  // joins `lingering_fds` (end-of-file sent), so that close_and_wait() sees it end.
  void abandon_connect() noexcept;
  error_code fail(client_errc code, std::string message, std::string_view statement = {},
                  std::string hint = {});
  error_code lost(std::string_view statement);
  error_code server_error(const PGresult* result, std::string_view statement);

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
    // (Each field cleared where it stands: assigning a fresh Diagnostics moves six strings, a
    // cost on every query for what is nearly always empty already.)
    static_assert(sizeof(Diagnostics) == 6 * sizeof(std::string), "clear every field below");
    for (std::string* field : {&last_error.sqlstate, &last_error.severity, &last_error.message,
                               &last_error.detail, &last_error.hint, &last_error.statement}) {
      field->clear();
    }
    return {};
  }

  // --- the socket and waiting (io.cpp) ----------------------------------------------------------

  error_code watch_socket();
  // Whether OpenSSL holds decrypted bytes that libpq has not taken yet: the socket does not show
  // them, so a wait for readability must not start.
  [[nodiscard]] bool tls_holds_bytes() const noexcept;
  asio::awaitable<error_code> wait_readable();
  asio::awaitable<error_code> wait_writable();
  asio::awaitable<error_code> wait_writable_or_readable();
  // Keeps what libpq sends in libpq's own buffer until release_output(); the next flush() then
  // sends it all in one write. libpq 15 sends at every PQpipelineSync (PQsendPipelineSync, which
  // does not, came in libpq 17): a pipeline that gives each statement a sync of its own would
  // make one send() per statement, and wake the server for each. Meanwhile libpq's descriptor
  // number is a socket that takes nothing (dup3() over it; our own descriptor, `socket`, keeps
  // the connection's socket open): its sends fail with EAGAIN, as on a full socket, and libpq in
  // nonblocking mode keeps the bytes for later. Between the two, no co_await and nothing else
  // on libpq's descriptor. False, holding nothing, over TLS or GSSAPI encryption (their state
  // machines keep bytes of their own), when libpq is not in nonblocking mode (it would wait in
  // poll()), or without a socket.
  bool hold_output() noexcept;
  bool output_held = false;  // (close() gives the socket back first)
  // Gives libpq's descriptor number its socket back (after hold_output() returned true), still
  // closed on exec. False if it could not (libpq dropped its socket meanwhile): the connection
  // is lost.
  bool release_output() noexcept;
  // Reads a COPY TO STDOUT's (or COPY BOTH's) data to its end and drops it, waiting for the
  // socket between chunks (libpq's synchronous PQgetCopyData would block the thread in poll()
  // without a bound). Empty when done (the final result follows); a failed or cancelled wait's
  // error; connection_lost when libpq failed.
  asio::awaitable<error_code> skip_copy_data();
  asio::awaitable<error_code> refuse_copy(ExecStatusType status, std::string_view sql,
                                          error_code& first_error);

  // --- cancelling (cancel.cpp) ------------------------------------------------------------------

  void arm_interrupt() noexcept;
  void interrupt(std::chrono::milliseconds wait_for_cancel) noexcept;
  // interrupt() in two steps, so that many connections' cancel requests go out together: the
  // first sends the request (on a thread of its own) and returns what turns ready once it was
  // delivered (invalid when none was sent); the second shuts the socket down.
  std::shared_future<void> start_interrupt() noexcept;
  // The gentle first step of a cut, from any thread: the cancel request (start_interrupt()) and
  // end-of-file to the server, the socket left readable, so that an operation waiting on it ends
  // with the server's answer and the server's end of the session stays in sight for
  // close_and_wait(). finish_interrupt() is the hard step, for a server that does not answer.
  void cut_writing() noexcept;
  // Cancel requests sent and not yet delivered, in the process (at most 32: see cancel.cpp).
  static int cancel_requests_on_their_way() noexcept;
  void finish_interrupt() noexcept;
  // `completed`: the statement's own result was read already (it ran), before the wait ended.
  asio::awaitable<error_code> interrupted(error_code error, std::string_view statement,
                                          bool can_drain, bool completed = false);
  std::shared_ptr<std::atomic<bool>> send_cancel_request() noexcept;
  asio::awaitable<bool> cancel_delivered(std::shared_ptr<std::atomic<bool>> delivered);
  // What drain() read: a 57014 (the server cancelled the statement), another error's SQLSTATE,
  // or a result that succeeded (the statement had completed).
  struct Drained {
    bool cancelled = false;
    std::string failure;
    bool completed = false;
  };
  asio::awaitable<bool> drain(Drained& drained);
  asio::awaitable<bool> drain_then_delivered(Drained& drained,
                                             std::shared_ptr<std::atomic<bool>> delivered);
  asio::awaitable<error_code> cancel_and_drain(std::string_view statement, bool completed = false);

  // --- sending and receiving (io.cpp) -----------------------------------------------------------

  // What exchange() does: send a statement (as text or prepared) and collect its results, or only
  // collect the results of a statement sent already.
  struct Request {
    enum class Kind { results_only, text, prepared };
    Kind kind = Kind::results_only;
    std::string_view sql;  // the statement, also named in errors
    const ParamSink* params = nullptr;
    const std::function<void(const Row&)>* on_row = nullptr;  // single-row mode when set
    std::uint64_t* streamed_rows = nullptr;                   // counts on_row's calls
    // In statement_times (a pooled connection's statement-time histogram): false for pgrt's own
    // housekeeping (a PREPARE or DEALLOCATE for the statement cache, a single-row-mode reset),
    // which would otherwise count as statements of their own.
    bool timed = true;
  };
  // Runs `request` to its last result; the last result with rows or a command status goes to
  // `out`, the first error is returned (after the rest have been read).
  asio::awaitable<error_code> exchange(Request request, Result& out);
  // Collects every result of a sent statement into `out` (the last one). `timed`: see Request.
  asio::awaitable<error_code> collect(std::string_view statement, Result& out, bool timed = true) {
    return exchange(Request{.kind = Request::Kind::results_only, .sql = statement, .timed = timed},
                    out);
  }
  error_code send(const Request& request, const std::string* prepared_name, bool& flush_pending);
  asio::awaitable<error_code> flush(std::string_view statement, bool can_drain = true);
  // flush()'s first step, without a coroutine frame: sends what libpq holds if the socket takes
  // it all at once. False when some is left (then co_await flush()); true when nothing is, with
  // `error` set if the connection was lost meanwhile.
  bool flushed_at_once(std::string_view statement, error_code& error) {
    const int pending = PQflush(conn);
    if (pending < 0) error = lost(statement);
    return pending <= 0;
  }
  asio::awaitable<error_code> next_result(PGresult*& out, std::string_view statement,
                                          bool can_drain = true);

  // --- the statement cache (io.cpp: the lookup; statement_cache.cpp: preparing) -----------------

  const std::string* cached_statement(std::string_view sql, const ParamSink& params);
  // Prepares the statement cached_statement() has just missed (its key is in statement_key).
  asio::awaitable<error_code> prepare(std::string_view sql, const ParamSink& params,
                                      const std::string*& name);
  // A name no statement of this connection has had, "pgrt_<random>_<n>".
  std::string new_statement_name();
  // Caches a statement prepared under `name` as the most recently used; the least recently used
  // beyond the cache's size go to evicted_statements.
  void remember_statement(std::string key, std::string name);
  // DEALLOCATEs the evicted statements, outside a transaction block only.
  asio::awaitable<error_code> deallocate_evicted();
  // False when the cache did not hold it (forgotten already).
  bool forget_statement(const std::string& name);
  // A statement's result: if it was the caller's own DISCARD ALL or DEALLOCATE ALL, the server
  // has none of the cached statements any more, and the cache is emptied (they are prepared
  // again as they are used, and their 26000s never count towards noticing a pooler).
  void note_statements_dropped(const PGresult* result);
  // The server says it no longer has our prepared statement `name` (forgot_statement()): the
  // whole cache is dropped, since what forgot one (DISCARD ALL, DEALLOCATE ALL, another server
  // session behind a pooler) forgot them all. True if `name` was cached: a new forgetting, to be
  // counted once (false: the same forgetting, seen through another statement).
  bool server_forgot_statement(const std::string& name);
  // Forgets a statement whose plan went stale (is_stale_plan()) and queues it for DEALLOCATE: the
  // next use of its text prepares it again. False when the cache did not hold it.
  bool retire_stale_statement(std::string name);
  // Goes on with unnamed statements on this connection: a transaction pooler was noticed.
  void use_unnamed_statements(std::string_view why);
  // The answers read in pipeline mode do not match what was sent (a statement with two results,
  // a sync without its statement's): a pooler mixed up server sessions. Closes the connection
  // and returns connection_lost, with a message saying so (for `sql`).
  error_code answers_out_of_step(std::string_view sql);
  // client_errc::needs_session for a statement that needs a session, behind a transaction
  // pooler; no error otherwise.
  error_code refuse_without_session(std::string_view sql);

  // --- connecting (connect.cpp) -----------------------------------------------------------------

  std::string target() const;
  error_code connect_error();
  // One place to connect to, as libpq's host, hostaddr and port keywords take it: a host of the
  // conninfo as given (a name, an address or a socket directory), the address a name was resolved
  // to ("" for none: libpq looks the host up, or it is no name), and its port ("" for the
  // conninfo's single port).
  struct Target {
    std::string host;
    std::string hostaddr;
    std::string port;
  };
  error_code host_entries(const ParsedConninfo& parsed, std::vector<Target>& entries);
  asio::awaitable<error_code> resolve_host(
      const std::string& host, std::optional<std::chrono::steady_clock::time_point> deadline,
      std::vector<std::string>& addresses);
  // Tries each target in turn, each within its share of connect_timeout (connect.cpp).
  asio::awaitable<error_code> connect();
  // With ConnectOptions::pooler none, once connected: one round trip that tells a pooler from the
  // server itself (the backend pid the pooler made up for the client is not its session's). Behind
  // one, the connection goes on as behind a transaction pooler noticed: unnamed statements, one
  // sync segment in flight. A failed or cancelled wait closes the connection (no drain).
  asio::awaitable<error_code> notice_pooler();
  // notice_pooler() within a host's time (connect()): given up at `deadline`, and the connection
  // closed when it fails.
  asio::awaitable<error_code> notice_pooler_within(
      std::optional<std::chrono::steady_clock::time_point> deadline);
  // One libpq connect to `host` (all of the conninfo's hosts when null), given up after
  // `limit` (none: until cancelled).
  asio::awaitable<error_code> connect_once(
      const std::vector<std::pair<std::string, std::string>>& params, const Target* host,
      const char* session_attrs, std::optional<std::chrono::milliseconds> limit);
  // What the earlier hosts of a connect that moved on said ("" when none), for its last error.
  std::string failed_hosts;
  // The host last connected to (target()), which target() names once the connection is closed
  // (a connect cut short: try_connect()).
  std::string connecting_to;
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

[[noreturn]] inline void throw_not_connected() {
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

}  // namespace pgrt
