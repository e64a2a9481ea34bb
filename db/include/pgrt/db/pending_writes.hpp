#pragma once

/// @file
/// Write-behind: a bounded in-memory queue of writes that a background flusher sends to the
/// database in batches, one transaction per batch. A service can answer "accepted" as soon as
/// enqueue() returns and rely on the write being made (at least once) unless stop() reports it
/// lost.
///
/// Guarantees: writes are flushed in the order they were accepted (FIFO; one flusher, one batch at
/// a time). No write is dropped silently: each accepted write ends up flushed, or counted in
/// PendingWritesReport::failed, logged and reported through PendingWritesEvents::failed, and then
/// stop() throws client_errc::writes_failed.
///
/// At-least-once: a batch whose COMMIT was sent but not confirmed (the connection was lost) is
/// retried, so its writes may be made twice. Make writes idempotent when that matters: give the
/// rows a unique key and write them with `INSERT ... ON CONFLICT DO NOTHING` (see
/// docs/pending_writes.md). When no retry can follow (the pool closed, stop() cancelled, the
/// flusher failed), such a batch's writes are of unknown outcome: counted failed and in
/// PendingWritesReport::unconfirmed, and reported with client_errc::commit_unconfirmed.
///
/// Threading: enqueue(), TableAppender::append(), report() and events() may be used from any
/// thread, on an io_context run by one or several threads. The flusher runs on a strand of the
/// executor given to the constructor.
///
/// This is a lifecycle component (name(), start(), stop()) without depending on the lifecycle
/// library: it only uses the Pool.

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "pgrt/db/copy.hpp"
#include "pgrt/db/error.hpp"
#include "pgrt/db/pool.hpp"
#include "pgrt/db/types.hpp"
#include "pgrt/runtime/event.hpp"

namespace pgrt {

/// PendingWrites settings. An aggregate: use designated initializers.
struct PendingWritesConfig {
  /// What to do when `capacity` writes are accepted but not yet flushed.
  enum class WhenFull {
    wait,  ///< enqueue() waits for room (backpressure), FIFO.
    fail,  ///< enqueue() throws client_errc::writes_queue_full at once.
  };

  /// The component's name, in logs and error messages.
  std::string name = "pending_writes";
  /// The most writes accepted but not yet flushed (queued plus being flushed).
  std::size_t capacity = 10'000;
  WhenFull when_full = WhenFull::wait;
  /// With WhenFull::wait, the longest an enqueue() waits for room: past it, the write is refused
  /// with client_errc::writes_queue_full, which says how long it waited and, when the flusher's
  /// batch is failing, its last error. Positive; at most a year, or milliseconds::max() for no
  /// limit.
  std::chrono::milliseconds enqueue_timeout{30'000};
  /// A batch is flushed as soon as this many writes are queued; also the most writes per batch.
  /// At most `capacity`.
  std::size_t batch_size = 500;
  /// ... or once the oldest queued write has waited this long. Zero: flush at once;
  /// milliseconds::max(): no time limit (only full batches, and stop()).
  std::chrono::milliseconds flush_interval{100};
  /// Backoff between retries of a batch after a transient error: doubles from retry_initial up to
  /// retry_max; each delay is randomized down to half of it (jitter). At most a year each.
  std::chrono::milliseconds retry_initial{50};
  std::chrono::milliseconds retry_max{2000};
  /// The priority of the flusher's pool acquires.
  Priority priority = Priority::normal;

  /// Throws pgrt::Error(client_errc::invalid_config) naming the offending field.
  void validate() const;
};

/// A snapshot of a PendingWrites' counters. accepted == flushed + failed + pending.
struct PendingWritesReport {
  std::uint64_t accepted = 0;  ///< Writes enqueue()/append() returned for.
  std::uint64_t flushed = 0;   ///< Writes in a committed batch.
  std::uint64_t failed = 0;    ///< Writes given up on (permanent error, or stop() cancelled).
  /// Of `failed`, the writes whose outcome is unknown: their batch sent its COMMIT and lost the
  /// connection before the answer came, and could not then be retried (the pool closed, stop()
  /// cancelled, the flusher failed). They may have been written, or not. The rest of `failed`
  /// were not written.
  std::uint64_t unconfirmed = 0;
  std::size_t pending = 0;    ///< Accepted, neither flushed nor failed yet.
  std::size_t waiting = 0;    ///< enqueue() calls waiting for room (not accepted yet).
  std::uint64_t batches = 0;  ///< Committed transactions.
  /// Batch attempts repeated after a transient error, a stale prepared plan's included.
  std::uint64_t retries = 0;

  /// The snapshot as one JSON object.
  [[nodiscard]] std::string to_json() const;
};

/// PendingWrites events, as Boost.Signals2 signals (pgrt::Event). Connect with a scoped_connection
/// member so the subscription ends before what its callback uses. Callbacks run on the flusher's
/// strand, outside the component's lock; they must not block, and exceptions they throw are logged
/// and ignored (each subscriber is called, whatever one connected before it throws).
struct PendingWritesEvents {
  /// Writes that failed for good, each described as text (a statement with its parameters, or a
  /// table row in COPY text format; never a conninfo or password; as one line: a control byte
  /// shows as \n, \t, \r, \xHH or \u00HH, and over 400 bytes is cut, at a character boundary), with
  /// the error (SQLSTATE and server message). A permanent error is narrowed down to the writes that
  /// cause it, so this usually carries one write. With client_errc::commit_unconfirmed, the writes
  /// are of unknown outcome (their batch's COMMIT was sent, its answer lost, and no retry could
  /// follow): they may have been written.
  Event<void(const std::vector<std::string>& writes, const Error& error)> failed;
  /// A batch of `writes` writes hit a transient error and is retried after `delay`: 0 when a
  /// statement's prepared plan went stale (SQLSTATE 0A000, "cached plan must not change result
  /// type": the batch runs again at once, on the same connection).
  Event<void(std::size_t writes, const Error& error, std::chrono::milliseconds delay)> retrying;
};

/// A type a TableAppender column can hold: one with an append_copy_field() overload
/// (pgrt/db/copy.hpp), std::optional of one included.
template <typename T>
concept CopyField = requires(std::string& out, const T& value) {
  append_copy_field(out, value);
};

namespace detail {
struct PendingWritesState;
struct PendingTable;
boost::asio::awaitable<void> accept_statement(std::shared_ptr<PendingWritesState> state,
                                              std::string sql, ParamSink params);
boost::asio::awaitable<void> accept_row(std::shared_ptr<PendingWritesState> state,
                                        std::shared_ptr<const PendingTable> table, std::string row);
}  // namespace detail

/// Typed appends to one table, flushed with `COPY table (columns) FROM STDIN`. Obtained from
/// PendingWrites::table(); copyable and cheap (two shared pointers); may outlive the PendingWrites
/// (appends then fail with writes_closed once it is stopped).
template <CopyField... Columns>
class TableAppender {
 public:
  /// Queues one row. The values are encoded at the call (they need not outlive it). Semantics,
  /// cancellation, thread safety and errors are those of PendingWrites::enqueue(); a text value
  /// with a NUL byte (which PostgreSQL's text types cannot store) is refused with
  /// client_errc::conversion.
  [[nodiscard]] boost::asio::awaitable<void> append(const Columns&... values) const {
    std::string row;
    copy_text_row(row, values...);
    return detail::accept_row(state_, table_, std::move(row));
  }

 private:
  friend class PendingWrites;
  TableAppender(std::shared_ptr<detail::PendingWritesState> state,
                std::shared_ptr<const detail::PendingTable> table)
      : state_(std::move(state)), table_(std::move(table)) {}

  std::shared_ptr<detail::PendingWritesState> state_;
  std::shared_ptr<const detail::PendingTable> table_;
};

/// The write-behind queue. See the file comment for the guarantees.
///
/// Lifetime: the Pool must outlive the PendingWrites. Call stop() (and let it finish) before
/// destroying a started PendingWrites; destroying it while running abandons what is still queued
/// (logged as an error), and its flusher ends on its own after the destructor has returned: it
/// holds the pool weakly, so that once the Pool is gone its acquire fails with pool_closed (the
/// batch given up and reported) instead of using the destroyed Pool. Not movable. While
/// events().failed subscribers are called for what the flusher gave up on as it ends, the
/// component is stopped: enqueue() throws writes_closed ("... are stopped ..."), and the
/// PendingWrites may be destroyed from the callback (nothing is left running).
class PendingWrites {
 public:
  /// Validates `config` (throws pgrt::Error(client_errc::invalid_config)). Writes may be accepted
  /// at once; they are flushed once start() has been called.
  PendingWrites(Pool& pool, boost::asio::any_io_executor executor, PendingWritesConfig config = {});
  ~PendingWrites();
  PendingWrites(const PendingWrites&) = delete;
  PendingWrites& operator=(const PendingWrites&) = delete;
  PendingWrites(PendingWrites&&) = delete;
  PendingWrites& operator=(PendingWrites&&) = delete;

  /// Queues one statement (parameters bound to $1..$n, encoded at the call) and returns once it is
  /// accepted: from then on it is flushed, or counted as failed and reported. Flushed in a
  /// pipeline inside the batch's transaction; the statement must not return rows that matter
  /// (they are discarded). Refused at the call (client_errc::needs_session, not accepted):
  /// transaction control (BEGIN, COMMIT, SAVEPOINT, ...) and session state (SET but SET LOCAL,
  /// SET CONSTRAINTS and SET TRANSACTION; set_config() but set_config(..., true); RESET, LISTEN,
  /// PREPARE, DISCARD, LOAD, cursors, a temporary table, view or sequence, a session-level
  /// advisory lock), which
  /// would end part of a batch or stay on the pooled connection, COPY, and a read-only transaction
  /// setting (SET [LOCAL] TRANSACTION ... READ ONLY, SET LOCAL transaction_read_only to a value
  /// PostgreSQL reads as true, or to one the check cannot read, such as DEFAULT: the writes after
  /// it in the batch would fail; set to off, false, no or 0 it is accepted), and a text of several
  /// statements: a write is one statement (the server would refuse the text at the flush, 42601);
  /// the message names the statement refused (`INSERT ...; COMMIT`), or else the text's statement
  /// 2. A trailing `;` ends the one statement, and a BEGIN ATOMIC body's `;` end none. (Functions
  /// and DO blocks are not looked into.)
  ///
  /// When `capacity` writes are pending: with WhenFull::wait, waits (FIFO) for room, at most
  /// `enqueue_timeout`; with WhenFull::fail, throws.
  ///
  /// Errors (pgrt::Error): client_errc::writes_closed once stop() has begun (also to a caller
  /// waiting for room when it begins); client_errc::writes_queue_full (WhenFull::fail, or no room
  /// within enqueue_timeout);
  /// client_errc::cancelled; client_errc::needs_session (above); client_errc::conversion (a
  /// parameter that cannot be sent). std::bad_alloc when memory runs out as the write is queued,
  /// also for a caller that waited for room (its write then not queued when the room came; the
  /// flusher goes on). In each case the write was not accepted.
  ///
  /// Cancellation: per-operation cancellation of a wait for room leaves no trace: the write is not
  /// accepted. Any type that reaches the operation counts (a coroutine passes on terminal only,
  /// unless its filter says otherwise; with_timeout() and asio's operators emit terminal). A
  /// cancellation that comes after the write was accepted has no effect.
  ///
  /// Thread safety: may be called from any thread, concurrently.
  template <Encodable... Args>
  [[nodiscard]] boost::asio::awaitable<void> enqueue(std::string sql, const Args&... params) {
    ParamSink sink;
    encode_params(sink, params...);
    return detail::accept_statement(state_, std::move(sql), std::move(sink));
  }

  /// An appender of rows of `table` with the given columns, one C++ type per column:
  ///
  ///     auto events = writes.table<std::int64_t, std::string>("demo_events", {"seq", "payload"});
  ///     co_await events.append(42, "x");
  ///
  /// Consecutive rows for the same table and columns are sent with one COPY. COPY has no ON
  /// CONFLICT: a batch repeated after a lost COMMIT (at-least-once) inserts its rows again, or, on
  /// a table with a unique key, reports them as failed; use enqueue() with ON CONFLICT DO NOTHING
  /// where duplicates matter.
  ///
  /// Names are used as written in SQL: plain identifiers (letters, digits, _ and $, not a digit
  /// first, not a reserved word such as order or user) or double-quoted ones (not empty), the table
  /// optionally qualified (parts joined by
  /// '.'). Throws pgrt::Error(client_errc::invalid_config) if a name is anything else (no SQL
  /// injection through names, no name taken for another), or if the number of columns is not the
  /// number of types.
  template <CopyField... Columns>
  [[nodiscard]] TableAppender<Columns...> table(std::string table,
                                                std::vector<std::string> columns) {
    return TableAppender<Columns...>(
        state_, make_table(std::move(table), std::move(columns), sizeof...(Columns)));
  }

  /// The name from the config.
  [[nodiscard]] std::string name() const;

  /// Starts the flusher on a strand of the constructor's executor and returns at once. A second
  /// call does nothing. Throws pgrt::Error(client_errc::writes_closed) once stop() has begun.
  [[nodiscard]] boost::asio::awaitable<void> start();

  /// Stops accepting writes (later enqueue() and callers waiting for room get writes_closed),
  /// flushes everything accepted (retrying transient errors as long as it takes), logs
  /// "accepted N, flushed N, failed N", and returns. If any accepted write was not written (failed
  /// for good, now or earlier), throws pgrt::Error(client_errc::writes_failed) saying how many.
  /// Starts the flusher if start() was not called. May be called more than once, concurrently;
  /// every call waits for the same end, which comes once every write given up on has been
  /// reported through events().failed (no callback for them runs after stop() returns).
  ///
  /// Cancellation: per-operation cancellation (as for enqueue()) stops the flushing: the flusher
  /// gives up (a running statement is cancelled; at most ConnectOptions::cancel_timeout), every
  /// write not yet committed is counted as failed, and stop() throws writes_failed. A batch whose
  /// COMMIT was under way may still have been written: its writes are counted in
  /// PendingWritesReport::unconfirmed too, and reported with client_errc::commit_unconfirmed.
  [[nodiscard]] boost::asio::awaitable<void> stop();

  /// A snapshot of the counters. Thread-safe.
  [[nodiscard]] PendingWritesReport report() const;
  /// The event signals. Thread-safe to connect to.
  [[nodiscard]] PendingWritesEvents& events() noexcept;

 private:
  std::shared_ptr<const detail::PendingTable> make_table(std::string table,
                                                         std::vector<std::string> columns,
                                                         std::size_t types) const;

  std::shared_ptr<detail::PendingWritesState> state_;
};

}  // namespace pgrt
