#include "pgrt/db/pending_writes.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cctype>
#include <cstdlib>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <spdlog/spdlog.h>
#include <string_view>
#include <type_traits>
#include <vector>

#include "async/abandon_guard.hpp"
#include "async/timer_condition.hpp"
#include "async/wait_group.hpp"
#include "connection/options_check.hpp"
#include "connection/stale_plan.hpp"
#include "pgrt/db/pipeline.hpp"
#include "pool/weak_pool.hpp"
#include "sql_text.hpp"

namespace pgrt {

namespace asio = boost::asio;
namespace async = detail::async;
using Clock = std::chrono::steady_clock;
using boost::system::error_code;

namespace detail {

// The target of a TableAppender.
struct PendingTable {
  std::string copy_sql;  // COPY table (a, b) FROM STDIN
  std::string heading;   // table (a, b), for descriptions
};

}  // namespace detail

namespace {

// The parameters of a statement, encoded when it was accepted: bound again, one by one, as the
// parameters of a pipelined statement.
struct EncodedParams {
  const ParamSink* sink = nullptr;
};

}  // namespace

template <>
struct Codec<EncodedParams> {
  static void encode(const EncodedParams& encoded, ParamSink& sink) {
    const ParamSink& from = *encoded.sink;
    const auto values = from.values();
    for (std::size_t i = 0; i < from.size(); ++i) {
      const Oid type = from.types()[i];
      const auto length = static_cast<std::size_t>(from.lengths()[i]);
      if (values[i] == nullptr) {
        sink.null(type);
      } else if (from.formats()[i] == 0) {
        sink.text(std::string_view(values[i], length), type);
      } else {
        sink.binary(std::span(reinterpret_cast<const std::byte*>(values[i]), length), type);
      }
    }
  }
};

namespace {

[[noreturn]] void throw_error(client_errc code, std::string message, std::string hint = {}) {
  throw Error(make_error_code(code),
              Diagnostics{.message = std::move(message), .hint = std::move(hint)});
}

// One accepted write: a statement with its parameters, or a table row in COPY text format.
struct Write {
  std::shared_ptr<const detail::PendingTable> table;  // null for a statement
  std::string text;                                   // the SQL, or the row (newline-terminated)
  ParamSink params;
  Clock::time_point accepted_at{};
  bool settled = false;  // flushed or given up on (the flusher's only)
  // An attempt of its batch sent the COMMIT and lost the answer: it may have been written, until a
  // retry settles it (the flusher's only).
  bool commit_lost = false;
};
// (The flusher hands its batch back as it fails without allocating: memory may be what ran out.)
static_assert(std::is_nothrow_move_constructible_v<Write> &&
              std::is_nothrow_move_assignable_v<Write>);

// `text` as one line of a log or an error: at most `limit` bytes of it, cut at a character
// boundary (never inside a UTF-8 sequence, which would leave invalid UTF-8), and no control byte
// (a line break in a row's value must not forge a log line, an escape sequence must not reach a
// terminal): C0 and DEL as \n, \t, \r or \xHH, UTF-8's C1 controls (U+0080-U+009F) as \u00HH.
std::string one_line(std::string_view text, std::size_t limit = 200) {
  const bool cut = text.size() > limit;
  if (cut) {
    // Back to the start of the character the limit falls in (past at most 3 continuation bytes:
    // a longer run is not UTF-8, and is cut where it is).
    std::size_t end = limit;
    while (end > 0 && limit - end < 3 && (static_cast<unsigned char>(text[end]) & 0xc0U) == 0x80U) {
      --end;
    }
    if ((static_cast<unsigned char>(text[end]) & 0xc0U) == 0x80U) end = limit;
    text = text.substr(0, end);
  }
  std::string shown;
  shown.reserve(text.size() + 3);
  static constexpr char hex[] = "0123456789abcdef";
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto byte = static_cast<unsigned char>(text[i]);
    if (byte == '\n') {
      shown += "\\n";
    } else if (byte == '\t') {
      shown += "\\t";
    } else if (byte == '\r') {
      shown += "\\r";
    } else if (byte < 0x20 || byte == 0x7f) {
      shown += {'\\', 'x', hex[byte >> 4U], hex[byte & 0xfU]};
    } else if (byte == 0xc2 && i + 1 < text.size() &&
               (static_cast<unsigned char>(text[i + 1]) & 0xe0U) == 0x80) {
      const auto c1 = static_cast<unsigned char>(text[++i]);
      shown += {'\\', 'u', '0', '0', hex[c1 >> 4U], hex[c1 & 0xfU]};
    } else {
      shown += text[i];
    }
  }
  if (cut) shown += "...";
  return shown;
}

// An error's whole text (its statement, redacted, included) in a log line, as one line.
constexpr std::size_t error_log_limit = 4000;

template <typename Int>
Int big_endian(const char* bytes) {
  std::make_unsigned_t<Int> value = 0;
  for (std::size_t i = 0; i < sizeof(Int); ++i) {
    value = static_cast<std::make_unsigned_t<Int>>((value << 8U) |
                                                   static_cast<unsigned char>(bytes[i]));
  }
  return static_cast<Int>(value);
}

std::string describe_param(const char* value, std::size_t length, int format, Oid type) {
  if (value == nullptr) return "NULL";
  if (format == 0) return "'" + one_line(std::string_view(value, length), 100) + "'";
  if (type == oid::int2 && length == 2) return std::to_string(big_endian<std::int16_t>(value));
  if (type == oid::int4 && length == 4) return std::to_string(big_endian<std::int32_t>(value));
  if (type == oid::int8 && length == 8) return std::to_string(big_endian<std::int64_t>(value));
  if (type == oid::float8 && length == 8) {
    return std::to_string(std::bit_cast<double>(big_endian<std::uint64_t>(value)));
  }
  if (type == oid::float4 && length == 4) {
    return std::to_string(std::bit_cast<float>(big_endian<std::uint32_t>(value)));
  }
  if (type == oid::boolean && length == 1) return value[0] != 0 ? "true" : "false";
  return "<" + std::to_string(length) + " bytes of " + type_name(type) + ">";
}

// A write as text, for logs and events: the statement and its parameters, or the table row.
std::string describe(const Write& write) {
  if (write.table) {
    std::string row = write.text;
    if (!row.empty() && row.back() == '\n') row.pop_back();
    std::string shown;
    for (char c : row) {
      if (c == '\t') {
        shown += " | ";
      } else {
        shown += c;
      }
    }
    return write.table->heading + " row: " + one_line(shown, 400);
  }
  // (A password written in the statement, as in ALTER ROLE ... PASSWORD '...', is masked.)
  std::string text = one_line(redact_statement(write.text), 400);
  if (write.params.size() == 0) return text;
  const auto values = write.params.values();
  text += " -- parameters:";
  for (std::size_t i = 0; i < write.params.size(); ++i) {
    text += " $" + std::to_string(i + 1) + "=" +
            describe_param(values[i], static_cast<std::size_t>(write.params.lengths()[i]),
                           write.params.formats()[i], write.params.types()[i]);
  }
  return text;
}

std::string error_code_text(const Error& error) {
  if (!error.sqlstate().empty()) return error.sqlstate();
  return error.code().message();
}

// How many times a single write cut short by a timeout or a lock (57014, 55P03) is tried.
constexpr int too_slow_write_attempts = 5;

// How many times a batch that failed with 26000 is tried again before the error is taken for a
// write's own.
constexpr int forgotten_statement_retries = 2;

// How a failed batch is handled.
enum class Failure {
  transient,  // retry the whole batch after a delay
  too_slow,   // cut short (a timeout, a lock): halves while it has several writes, else transient
  too_big,    // the server ran short of a resource for it (memory, locks, a configured limit):
              // as too_slow
  read_only,  // the server takes no writes for now (25006): a single write retried as transient;
              // a batch halved, so that a write that made its transaction read-only (in a
              // function, set_config()) does not hold up the writes after it for ever
  forgotten,  // 26000: the server forgot a prepared statement pgrt had cached (the cache has
              // dropped it): retried forgotten_statement_retries times, then per_write
  per_write,  // the server rejected something in the batch: narrow it down by halves
  whole,      // nothing to narrow down (the pool is closed, ...): the batch fails for good
};

Failure classify(const error_code& code) {
  // 53000, 53200 (out of memory or of the lock table), 53400 (temp_file_limit and other
  // configured limits): a resource the batch itself may need too much of. A smaller batch needs
  // less; the same batch retried as it is could fail for ever, holding up every write behind it.
  // (53100, disk full, and 53300, a full server, are the server's state: transient, below.)
  if (const auto state = sqlstate_of(code);
      state == "53000" || state == "53200" || state == "53400") {
    return Failure::too_big;
  }
  // 25006: the server takes no writes for now (a read-only mode while its disk is full, a
  // replica that a DNS name still points at): nothing is wrong with the writes, unless one of
  // them made the batch's transaction read-only for the writes after it.
  if (sqlstate_of(code) == "25006") return Failure::read_only;
  // pool_queue_full: the pool's wait queue was full for a moment (a load spike, the very time
  // write-behind is for), as pool_timeout.
  if (code == condition::connection_error || code == condition::serialization_failure ||
      code == condition::deadlock || code == condition::too_many_connections ||
      code == client_errc::pool_timeout || code == client_errc::pool_queue_full) {
    return Failure::transient;
  }
  // 57014 from the server (statement_timeout, an administrator's pg_cancel_backend) and 55P03
  // (lock_timeout, a lock held elsewhere): the batch ran out of time, not out of validity.
  if (sqlstate_of(code) == "57014" || sqlstate_of(code) == "55P03") return Failure::too_slow;
  // 26000 inside the batch's transaction: the server no longer had a statement prepared by a name
  // in the connection's cache (a DEALLOCATE ALL pgrt did not see, a transaction pooler), so it
  // did not run, and could not be run again inside the transaction block. The cache has dropped
  // the name: the batch runs again. (A 26000 of the write's own, as from a function's EXECUTE of
  // a statement that does not exist, comes again every time.)
  if (sqlstate_of(code) == "26000") return Failure::forgotten;
  if (code.category() == sqlstate_category()) return Failure::per_write;
  return Failure::whole;
}

// An enqueue() waiting for room.
struct SpaceWaiter {
  SpaceWaiter(const asio::any_io_executor& executor, Write write_in)
      : timer(executor), write(std::move(write_in)) {}
  asio::steady_timer timer;
  Write write;
  bool accepted = false;  // handed into the queue
  bool closed = false;    // stop() began
  // Its write could not be queued when room came (std::bad_alloc): the enqueue() throws it.
  std::exception_ptr failure;
};

}  // namespace

namespace detail {

struct PendingWritesState {
  PendingWritesState(Pool& pool_in, const asio::any_io_executor& executor,
                     PendingWritesConfig config_in)
      : pool(pool_state_of(pool_in)),
        config(std::move(config_in)),
        strand(asio::make_strand(executor)),
        random(std::random_device{}()) {
    // (Events are emitted outside the lock: the combiner calls each subscriber on its own and
    // logs and ignores what one throws, naming this component.)
    events.failed.set_combiner(EverySubscriber{"pgrt pending writes " + config.name});
    events.retrying.set_combiner(EverySubscriber{"pgrt pending writes " + config.name});
  }

  // Held weakly: a PendingWrites destroyed while running leaves its flusher to end on its own,
  // after the destructor has returned, and so maybe after the Pool (see acquire_lease()).
  std::weak_ptr<PoolState> pool;
  const PendingWritesConfig config;
  asio::strand<asio::any_io_executor> strand;  // the flusher runs here
  PendingWritesEvents events;

  mutable std::mutex mutex;
  std::deque<Write> queue;    // accepted, not yet taken by the flusher
  std::size_t in_flight = 0;  // taken by the flusher, neither flushed nor failed yet
  // Of in_flight, the writes of the batch the flusher had when it failed (an exception out of
  // flush()): flusher_ended() reports them.
  std::vector<Write> orphaned;
  // The writes still queued when the flusher ended, for flusher_ended() to report: a member, so
  // that taking them from `queue` is a swap, with no allocation (a deque allocates as it is made).
  std::deque<Write> never_sent;
  // The error of the attempt of the flusher's batch whose COMMIT was sent and its answer lost, for
  // the writes flusher_ended() reports of unknown outcome (the flusher's only, then its end's).
  std::optional<Error> commit_lost;
  // The last error of the flusher's batch while it is being retried (cleared by a flush): why a
  // writer waiting for room got none.
  std::string failing_with;
  std::deque<SpaceWaiter*> waiters;
  // The flusher waits on it for writes, and during a backoff: woken by new writes, close, abandon.
  async::TimerCondition flusher_wake;
  bool started = false;
  bool closing = false;    // stop() began: no more writes accepted
  bool abandoned = false;  // stop() was cancelled (or the object destroyed): give up
  // The flusher has done its work (its counts are final) and is reporting what it gave up on:
  // stopped for enqueue(), start() and the destructor, while stop() still waits for `finished`.
  bool ending = false;
  bool finished = false;      // the flusher has ended, and reported what it gave up on
  async::WaitGroup flushing;  // the flusher, from launch_locked() to its end: stop() waits
  asio::cancellation_signal flusher_cancel;  // emitted on the strand only

  // (failed_by_error and unconfirmed: of failed, those given up for an error, and those whose
  // outcome is unknown; the rest were given up when the flushing was abandoned.)
  std::uint64_t accepted = 0, flushed = 0, failed = 0, failed_by_error = 0, unconfirmed = 0,
                batches = 0, retries = 0;
  std::mt19937_64 random;  // the flusher's only

  // --- all *_locked functions need `mutex` held ---------------------------------------------

  [[nodiscard]] std::size_t unflushed_locked() const { return queue.size() + in_flight; }

  void wake_flusher_locked() { flusher_wake.notify_all_locked(); }

  // Strong guarantee: if the push throws (std::bad_alloc), `write` is left as it was.
  void push_locked(Write&& write) {
    write.accepted_at = Clock::now();
    queue.push_back(std::move(write));
    ++accepted;
    // The flusher waits for the first write (to learn the interval's deadline) or a full batch.
    if (queue.size() == 1 || queue.size() >= config.batch_size) wake_flusher_locked();
  }

  // Hands the room there is to waiters, oldest first. Never throws: a waiter whose write cannot
  // be queued (the push ran out of memory) is woken with that failure, which its enqueue() throws
  // (the write not accepted, as for an enqueue() that did not wait), and the next is tried. (It
  // left the list before its push, and the write was moved out of it, before: a push that threw
  // lost the write, and the waiter, listed nowhere, was never woken.)
  void make_room_locked() noexcept {
    while (!waiters.empty() && unflushed_locked() < config.capacity) {
      SpaceWaiter* waiter = waiters.front();
      try {
        push_locked(std::move(waiter->write));
        waiter->accepted = true;
      } catch (...) {
        waiter->failure = std::current_exception();
      }
      waiters.pop_front();
      // Wakes it: it finds `accepted` or `failure` set. (A timer's cancel() reports no error.)
      waiter->timer.cancel();
    }
  }

  void close_locked() {
    closing = true;
    for (SpaceWaiter* waiter : waiters) {
      waiter->closed = true;
      waiter->timer.cancel();
    }
    waiters.clear();
    wake_flusher_locked();
  }

  void abandon_locked() {
    abandoned = true;
    close_locked();  // wakes the flusher (waiting for writes or backing off): it gives up
  }

  [[noreturn]] void throw_closed_locked() const {
    throw_error(client_errc::writes_closed, "pending writes " + config.name + " are " +
                                                (finished || ending ? "stopped" : "stopping") +
                                                "; the write was not accepted");
  }

  [[nodiscard]] PendingWritesReport report_locked() const {
    PendingWritesReport report;
    report.accepted = accepted;
    report.flushed = flushed;
    report.failed = failed;
    report.unconfirmed = unconfirmed;
    report.pending = unflushed_locked();
    report.waiting = waiters.size();
    report.batches = batches;
    report.retries = retries;
    return report;
  }
};

}  // namespace detail

namespace {

using State = detail::PendingWritesState;

bool is_abandoned(State& self) {
  std::lock_guard lock(self.mutex);
  return self.abandoned;
}

// A lease for the flusher. The Pool must outlive the PendingWrites, but the flusher of one
// destroyed while running ends on its own, after the destructor has returned, and so maybe after
// the Pool: it then gets pool_closed (its writes given up and reported), never uses the Pool that
// is gone.
asio::awaitable<Lease> acquire_lease(State& self) {
  const std::shared_ptr<detail::PoolState> pool = self.pool.lock();
  if (!pool) {
    throw_error(client_errc::pool_closed,
                "pending writes " + self.config.name +
                    ": the pool they write through was destroyed before they were stopped",
                "stop the pending writes (co_await stop()) before destroying their Pool");
  }
  co_return co_await detail::acquire_from(pool, self.config.priority);
}

// The batch's writes in one transaction on `lease`. Runs of rows for the same table go as one
// COPY, runs of statements as one pipeline. `commit_sent` is set as the COMMIT goes out.
asio::awaitable<void> write_transaction(Lease& lease, std::span<Write> writes, bool& commit_sent) {
  co_await lease->begin();
  for (std::size_t first = 0; first < writes.size();) {
    std::size_t end = first + 1;
    if (writes[first].table) {
      const std::string& copy_sql = writes[first].table->copy_sql;
      while (end < writes.size() && writes[end].table && writes[end].table->copy_sql == copy_sql) {
        ++end;
      }
      std::string data;
      for (std::size_t i = first; i < end; ++i) data += writes[i].text;
      co_await lease->copy_from(copy_sql, data);
    } else {
      while (end < writes.size() && !writes[end].table) ++end;
      Pipeline pipeline;
      for (std::size_t i = first; i < end; ++i) {
        pipeline.add(writes[i].text, EncodedParams{&writes[i].params});
      }
      const std::vector<PipelineOutcome> outcomes = co_await lease->run(pipeline);
      // The statement that failed, rather than the ones the server skipped after it.
      const PipelineOutcome* failure = nullptr;
      for (const auto& outcome : outcomes) {
        if (outcome.ok()) continue;
        if (failure == nullptr || (failure->error == client_errc::pipeline_aborted &&
                                   outcome.error != client_errc::pipeline_aborted)) {
          failure = &outcome;
        }
      }
      if (failure != nullptr) throw Error(failure->error, failure->diagnostics);
    }
    first = end;
  }
  commit_sent = true;
  co_await lease->commit();
}

// One attempt at a batch: one lease, on which its transaction runs. `commit_sent` is set as its
// COMMIT goes out.
asio::awaitable<void> write_batch(State& self, std::span<Write> writes, bool& commit_sent) {
  Lease lease;
  try {
    lease = co_await acquire_lease(self);
  } catch (const Error& error) {
    // No connection for the batch (the server down, full, or refusing every connect, whatever
    // code the pool gives it): nothing is wrong with the writes, which wait it out as a pool
    // timeout. A closed pool or a cancellation is passed on.
    if (error.code() == client_errc::pool_closed || error.code() == client_errc::cancelled) {
      throw;
    }
    throw Error(make_error_code(client_errc::pool_timeout), error.diagnostics());
  }
  // A statement run by a name in the connection's statement cache whose plan went stale (an
  // ALTER TABLE under an INSERT ... RETURNING *: the server's 0A000, "cached plan must not change
  // result type") did not run, and the cache has retired it: the transaction runs again on the
  // same connection, where that statement now runs unnamed. Each time retires another of the
  // batch's statements, so this ends; past one retry per write the error is passed on. (A
  // genuine 0A000, feature_not_supported, is the write's own: passed on at once.) Each time is a
  // retry of the batch, as any other: counted in `retries` and announced by events().retrying,
  // with the 0A000 error and no delay.
  for (std::size_t stale_retries = 0;; ++stale_retries) {
    std::optional<Error> stale;
    try {
      co_await write_transaction(lease, writes, commit_sent);
      co_return;
    } catch (const Error& error) {
      if (stale_retries >= writes.size() ||
          !detail::not_run_for_a_stale_plan(error.diagnostics())) {
        throw;
      }
      stale = error;
    }
    // (Only a stale plan gets here; no co_await inside the catch.)
    spdlog::debug(
        "pgrt pending writes {}: a statement's prepared plan went stale; the batch of {} writes "
        "runs again",
        self.config.name, writes.size());
    {
      std::lock_guard lock(self.mutex);
      ++self.retries;
    }
    self.events.retrying(writes.size(), *stale, std::chrono::milliseconds(0));
    co_await lease->rollback();
  }
}

// Whether `copy_sql` itself fails with `sqlstate`, whatever rows it is given: run with none (no
// row inserted, no trigger fired). A COPY of a table or column that does not exist fails so for
// every row: its rows are given up at once, not narrowed down to one transaction each.
asio::awaitable<bool> copy_statement_fails(State& self, const std::string& copy_sql,
                                           const std::string& sqlstate) {
  try {
    Lease lease = co_await acquire_lease(self);
    (void)co_await lease->copy_from(copy_sql, "");
  } catch (const Error& error) {
    co_return error.sqlstate() == sqlstate;
  }
  co_return false;
}

// SQLSTATEs a COPY statement can fail with for itself, before any row: class 42, syntax errors
// and access rule violations (a name that does not exist, a syntax error, a view or sequence as
// the target, a generated column or a column named twice, permission denied), and 0A000.
// copy_statement_fails() tells whether it did (a trigger may raise one for a row).
bool may_be_the_statements(const std::string& sqlstate) {
  return sqlstate.starts_with("42") || sqlstate == "0A000";
}

// Waits `delay`; false if the flushing was abandoned meanwhile.
asio::awaitable<bool> back_off(State& self, std::chrono::milliseconds delay) {
  std::unique_lock lock(self.mutex);
  const auto until = Clock::now() + delay;
  while (!self.abandoned && Clock::now() < until) {
    // cancel_flusher() comes only once abandoned; a recorded cancellation must not spin here.
    if (co_await self.flusher_wake.wait(lock, until) == async::Woken::cancelled) break;
  }
  co_return !self.abandoned;
}

void settle_flushed(State& self, std::span<Write> writes) {
  for (Write& write : writes) write.settled = true;
  const std::size_t count = writes.size();
  std::lock_guard lock(self.mutex);
  self.flushed += count;
  self.failing_with.clear();
  self.in_flight -= count;
  ++self.batches;
  self.make_room_locked();
}

// Why writes are given up on.
enum class GivenUp {
  by_error,     // for an error (their own, or one that fails their batch as a whole)
  abandoned,    // the flushing was abandoned (stop() cancelled), not for an error of their own
  unconfirmed,  // their batch's COMMIT was sent and its answer lost, and no retry settled it: they
                // may have been written
};

// Whether a batch whose COMMIT was sent and that failed with `error` may have been written: the
// server did not answer the COMMIT (the connection was lost, the wait for the answer cut short),
// so it may have committed. An error the server answered with (a deferred constraint, a
// serialization failure at commit) rolled the transaction back.
bool commit_outcome_unknown(const Error& error) {
  return error.code() == condition::connection_error ||
         error.code().category() != sqlstate_category();
}

// The error of writes whose batch's COMMIT was sent and its answer lost (`lost`), and that could
// then not be retried, which would have settled it (`then`: the pool closed, stop() cancelled).
Error unconfirmed_error(const Error& lost, const Error& then) {
  return Error(
      make_error_code(client_errc::commit_unconfirmed),
      Diagnostics{.message = "these writes may have been written, or not: their batch's COMMIT was "
                             "sent, and its answer lost (" +
                             one_line(lost.what(), 1000) +
                             "); no retry could settle it, for: " + one_line(then.what(), 1000),
                  .hint = "look the writes up, or write them again idempotently (a unique key "
                          "and ON CONFLICT DO NOTHING)"});
}

// Counts `writes` as failed (`why`: see GivenUp), logs them and reports them through
// events().failed with `error`.
void give_up(State& self, std::span<Write> writes, const Error& error,
             GivenUp why = GivenUp::by_error) {
  std::vector<std::string> descriptions;
  descriptions.reserve(writes.size());
  for (const Write& write : writes) descriptions.push_back(describe(write));
  const std::string& name = self.config.name;
  const bool unconfirmed = why == GivenUp::unconfirmed;
  if (descriptions.size() <= 10) {
    for (const auto& description : descriptions) {
      spdlog::warn("pgrt pending writes {}: {} [{}]: {}; error: {}", name,
                   unconfirmed ? "a write's outcome is unknown: it may have been written, or not"
                               : "a write failed for good and was not written",
                   error_code_text(error), description, one_line(error.what(), error_log_limit));
    }
  } else {
    spdlog::warn("pgrt pending writes {}: {} writes {} [{}], the first: {}; error: {}", name,
                 descriptions.size(),
                 unconfirmed ? "of unknown outcome: they may have been written, or not"
                             : "failed for good and were not written",
                 error_code_text(error), descriptions.front(),
                 one_line(error.what(), error_log_limit));
  }
  {
    std::lock_guard lock(self.mutex);
    self.failed += writes.size();
    if (why == GivenUp::by_error) self.failed_by_error += writes.size();
    if (unconfirmed) self.unconfirmed += writes.size();
    self.in_flight -= writes.size();
    for (Write& write : writes) write.settled = true;
    self.failing_with.clear();  // (settled: the next attempt says what fails now)
    self.make_room_locked();
  }
  self.events.failed(descriptions, error);
}

// Flushes `writes` (taken from the queue, counted in in_flight): retries transient errors with
// backoff; on a permanent error, flushes each half on its own until the failing writes are
// isolated; a batch cut short by a timeout or a lock is halved, and a single write tried
// too_slow_write_attempts times; so is a batch the server ran short of a resource for. Returns
// early, leaving the rest in in_flight, when the flushing is abandoned.
asio::awaitable<void> flush(State& self, std::span<Write> writes,
                            std::optional<Error> commit_lost = std::nullopt) {
  auto delay = self.config.retry_initial;
  // The error of an attempt whose COMMIT was sent and not answered (the connection lost, the
  // wait cut short): the server may have committed it. A retry that commits settles it (the
  // writes are then written, maybe twice: at-least-once); given up on without one (the pool
  // closed, stop() cancelled), the writes' outcome is unknown, and they are reported so
  // (GivenUp::unconfirmed), not as not written. (A part of such a batch, narrowed down, is flushed
  // with the error: its writes too may have been written.)
  // Abandoned before the batch's commit was confirmed: its writes are given up on, and reported
  // (logged, events().failed) like those of a permanent error.
  const auto abandon = [&self, writes, &commit_lost] {
    const Error abandoned(
        make_error_code(client_errc::cancelled),
        Diagnostics{.message = "the flushing was abandoned (stop() was cancelled or ran out of "
                               "time) before the batch's commit was confirmed"});
    if (commit_lost) {
      give_up(self, writes, unconfirmed_error(*commit_lost, abandoned), GivenUp::unconfirmed);
    } else {
      give_up(self, writes, abandoned, GivenUp::abandoned);
    }
  };
  // Writes given up on for `error`: of unknown outcome once an attempt's COMMIT was lost, as that
  // attempt ran them (a write failing the retry, such as on a unique key, may be failing for being
  // there already).
  const auto give_up_for = [&self, &commit_lost](std::span<Write> given_up, const Error& error) {
    if (commit_lost) {
      give_up(self, given_up, unconfirmed_error(*commit_lost, error), GivenUp::unconfirmed);
    } else {
      give_up(self, given_up, error);
    }
  };
  int too_slow_attempts = 0;  // a single write cut by a timeout or a lock, or short of a resource
  int forgotten_retries = 0;  // retries after a 26000
  Clock::time_point failing_since{};  // its first such failure
  for (std::uint64_t attempt = 1;; ++attempt) {
    if (is_abandoned(self)) {
      abandon();
      co_return;
    }
    std::optional<Error> failure;
    bool commit_sent = false;
    try {
      co_await write_batch(self, writes, commit_sent);
    } catch (const Error& error) {
      failure = error;
    } catch (const std::exception& error) {
      failure =
          Error(make_error_code(client_errc::protocol_error), Diagnostics{.message = error.what()});
    }
    if (!failure) {
      settle_flushed(self, writes);
      spdlog::debug("pgrt pending writes {}: flushed {} writes in one transaction",
                    self.config.name, writes.size());
      co_return;
    }
    if (commit_sent && !commit_lost && commit_outcome_unknown(*failure)) {
      commit_lost = failure;
      // (Should the flusher fail before a retry settles them, flusher_ended() reports them of
      // unknown outcome, not as not written.)
      self.commit_lost = failure;
      for (Write& write : writes) write.commit_lost = true;
    }
    if (is_abandoned(self)) {
      abandon();
      co_return;
    }
    Failure kind = classify(failure->code());
    if (kind == Failure::too_slow || kind == Failure::too_big) {
      // Halved down to one write; that one is retried a few times (a lock held for a while),
      // then given up on: a write that always runs out of time must not hold up every write
      // behind it. One short of a resource is given up on only once it has also failed for 10
      // retry_max periods: the server may be short for everyone for a while (memory, locks), and
      // its writes must not be lost to a squeeze the server gets over.
      const auto now = Clock::now();
      if (writes.size() > 1) {
        kind = Failure::per_write;
      } else {
        if (too_slow_attempts++ == 0) failing_since = now;
        const bool given_time =
            kind == Failure::too_slow || now - failing_since >= 10 * self.config.retry_max;
        kind = too_slow_attempts < too_slow_write_attempts || !given_time ? Failure::transient
                                                                          : Failure::whole;
      }
    }
    if (kind == Failure::read_only) {
      // Halved down to one write (a few transactions more), which is retried for as long as it
      // takes: a server in a read-only mode loses no writes, and a write that made its batch's
      // transaction read-only ends up alone, where it fails nothing.
      kind = writes.size() > 1 ? Failure::per_write : Failure::transient;
    }
    if (kind == Failure::forgotten) {
      kind = forgotten_retries++ < forgotten_statement_retries ? Failure::transient
                                                               : Failure::per_write;
    }
    switch (kind) {
      case Failure::too_slow:  // (resolved above)
      case Failure::too_big:
      case Failure::forgotten:
      case Failure::read_only:
      case Failure::transient: {
        std::uniform_int_distribution<std::int64_t> jitter(delay.count() / 2, delay.count());
        const std::chrono::milliseconds wait(jitter(self.random));
        {
          std::lock_guard lock(self.mutex);
          ++self.retries;
          // (The first line of its message and its error code only, no DETAIL or STATEMENT: the
          // refusal goes to callers whose writes are not in this batch.)
          const std::string& message = failure->diagnostics().message;
          const std::string first_line = message.substr(0, message.find('\n'));
          self.failing_with =
              (first_line.empty() ? std::string() : one_line(first_line, 600) + " ") + "[" +
              failure->code().message() + "]";
        }
        if (attempt == 1 || attempt % 10 == 0) {
          spdlog::warn(
              "pgrt pending writes {}: a batch of {} writes failed with a transient error "
              "(attempt {}): {}; retrying in {} ms",
              self.config.name, writes.size(), attempt, one_line(failure->what(), error_log_limit),
              wait.count());
        }
        self.events.retrying(writes.size(), *failure, wait);
        const bool waited = co_await back_off(self, wait);
        if (!waited) {
          abandon();
          co_return;
        }
        delay = std::min(delay * 2, self.config.retry_max);
        continue;
      }
      case Failure::per_write: {
        // (No co_await inside the &&: g++ 12 would evaluate it whatever the left side.)
        const std::string& failed_sql = failure->diagnostics().statement;
        bool statements_fault = writes.size() > 1 && failed_sql.starts_with("COPY ") &&
                                may_be_the_statements(failure->sqlstate());
        if (statements_fault) {
          statements_fault = co_await copy_statement_fails(self, failed_sql, failure->sqlstate());
        }
        if (statements_fault) {
          // Every row of that COPY fails alike: given up together, in runs; the rest flushed.
          const auto of_failed = [&](const Write& write) {
            return write.table && write.table->copy_sql == failed_sql;
          };
          for (std::size_t first = 0; first < writes.size();) {
            std::size_t end = first + 1;
            while (end < writes.size() && of_failed(writes[end]) == of_failed(writes[first])) ++end;
            if (of_failed(writes[first])) {
              give_up_for(writes.subspan(first, end - first), *failure);
            } else {
              co_await flush(self, writes.subspan(first, end - first), commit_lost);
            }
            first = end;
          }
          co_return;
        }
        if (writes.size() > 1) {
          const std::size_t half = writes.size() / 2;
          co_await flush(self, writes.first(half), commit_lost);
          co_await flush(self, writes.subspan(half), commit_lost);
          co_return;
        }
        give_up_for(writes, *failure);
        co_return;
      }
      case Failure::whole:
        give_up_for(writes, *failure);
        co_return;
    }
  }
}

// Takes batches from the queue and flushes them, one at a time, until stop() has begun and the
// queue is empty, or the flushing is abandoned.
asio::awaitable<void> run_flusher(std::shared_ptr<State> self) {
  for (;;) {
    std::vector<Write> batch;
    {
      std::unique_lock lock(self->mutex);
      for (;;) {
        if (self->abandoned) co_return;
        auto until = Clock::time_point::max();
        if (!self->queue.empty()) {
          // (Saturated: a flush_interval such as milliseconds::max(), which accepted_at +
          // flush_interval would overflow, means only full batches, and stop().)
          const auto accepted_at = self->queue.front().accepted_at;
          const auto headroom = std::chrono::duration_cast<std::chrono::milliseconds>(
              Clock::time_point::max() - accepted_at);
          const auto due = self->config.flush_interval >= headroom
                               ? Clock::time_point::max()
                               : accepted_at + self->config.flush_interval;
          if (self->closing || self->queue.size() >= self->config.batch_size ||
              Clock::now() >= due) {
            break;
          }
          until = due;
        } else if (self->closing) {
          co_return;
        }
        if (co_await self->flusher_wake.wait(lock, until) == async::Woken::cancelled) {
          co_return;  // cancel_flusher(): only once abandoned
        }
      }
      const std::size_t count = std::min(self->queue.size(), self->config.batch_size);
      batch.reserve(count);
      for (std::size_t i = 0; i < count; ++i) {
        batch.push_back(std::move(self->queue.front()));
        self->queue.pop_front();
      }
      self->in_flight += count;
    }
    // (An exception out of flush() ends the flusher: flusher_ended() reports the batch's writes
    // it had not settled yet, which only this frame knows.)
    std::exception_ptr failure;
    try {
      co_await flush(*self, batch);
    } catch (...) {
      failure = std::current_exception();
    }
    if (failure) {
      // Handed back without an allocation (memory may be what ran out: a push_back failing here
      // destroyed the batch's writes unannounced): its writes not settled, then the vector itself.
      std::erase_if(batch, [](const Write& write) { return write.settled; });
      {
        std::lock_guard lock(self->mutex);
        self->orphaned.swap(batch);  // (empty before: the flusher runs once)
      }
      std::rethrow_exception(failure);
    }
  }
}

// The flusher has ended: what was not written is counted as failed; stop() calls wake up.
void flusher_ended(const std::shared_ptr<State>& self, const std::exception_ptr& failure) {
  // The flusher counts as ended (stop() calls wake up and return) only once what it gave up on
  // has been logged and reported, however that ends: a stop() that returned first (on another
  // thread) had its caller tear down what the subscribers use while they were still called.
  // (Made first: an allocation failing before it, memory being what the flusher may have run out
  // of, threw out of io_context::run() and left stop() waiting for ever.)
  struct Ended {
    explicit Ended(const std::shared_ptr<State>& state) : self(state) {}
    const std::shared_ptr<State>& self;
    Ended(const Ended&) = delete;
    Ended& operator=(const Ended&) = delete;
    Ended(Ended&&) = delete;
    Ended& operator=(Ended&&) = delete;
    ~Ended() {
      {
        const std::lock_guard lock(self->mutex);
        self->finished = true;
      }
      self->flushing.done();
    }
  } const ended(self);
  // Counted before anything that allocates: no write left uncounted, whatever fails below.
  std::size_t lost = 0;
  std::size_t were_in_flight = 0;
  std::vector<Write> in_flight;  // (made empty, a vector allocates nothing)
  std::size_t unconfirmed = 0;   // of in_flight, the first: an attempt's COMMIT was lost
  {
    std::lock_guard lock(self->mutex);
    lost = self->unflushed_locked();
    were_in_flight = self->in_flight;
    in_flight.swap(self->orphaned);
    unconfirmed = static_cast<std::size_t>(
        std::partition(in_flight.begin(), in_flight.end(),
                       [](const Write& write) { return write.commit_lost; }) -
        in_flight.begin());
    self->failed += lost;
    // Of unknown outcome (they may have been written), or given up on for the flusher's failure,
    // not for a cancelled stop().
    self->unconfirmed += unconfirmed;
    if (failure) self->failed_by_error += lost - unconfirmed;
    self->never_sent.swap(self->queue);
    self->in_flight = 0;
    self->close_locked();  // in case it ended for another reason than stop()
    self->ending = true;
  }
  const char* failed_for = nullptr;  // what the flusher failed with, if it did (`failure` holds it)
  if (failure) {
    try {
      std::rethrow_exception(failure);
    } catch (const std::exception& error) {
      failed_for = error.what();
    } catch (...) {
      failed_for = "an exception of an unknown type";
    }
    spdlog::error("pgrt pending writes {}: the flusher failed: {}", self->config.name, failed_for);
  }
  if (lost == 0) return;
  // Every write given up on is logged and reported, as a permanent error's are (give_up()): the
  // queued ones, and those of the batch the flusher had when it failed (left for here by
  // run_flusher()), by what they were. Memory running out as they are (the flusher's failure may
  // be that) leaves them counted, and says so.
  const std::string& name = self->config.name;
  const std::deque<Write>& never_sent = self->never_sent;
  try {
    spdlog::warn(
        "pgrt pending writes {}: gave up on {} accepted writes that were not committed ({} never "
        "sent, {} in a batch whose commit was not confirmed)",
        name, lost, never_sent.size(), were_in_flight);
    const auto report = [&](const auto& writes, const Error& error,
                            std::string_view outcome = "not written") {
      if (writes.empty()) return;
      std::vector<std::string> descriptions;
      descriptions.reserve(writes.size());
      for (const Write& write : writes) descriptions.push_back(describe(write));
      for (std::size_t i = 0; i < descriptions.size() && i < 10; ++i) {
        spdlog::warn("pgrt pending writes {}: {}: {}", name, outcome, descriptions[i]);
      }
      if (descriptions.size() > 10) {
        spdlog::warn("pgrt pending writes {}: ... and {} more {}", name, descriptions.size() - 10,
                     outcome);
      }
      self->events.failed(descriptions, error);
    };
    if (failure) {
      const Error flusher_failed(make_error_code(client_errc::protocol_error),
                                 Diagnostics{.message = "the pending writes' flusher failed (" +
                                                        one_line(failed_for, 1000) + ")"});
      report(std::span<const Write>(in_flight).first(unconfirmed),
             self->commit_lost ? unconfirmed_error(*self->commit_lost, flusher_failed)
                               : flusher_failed,
             "of unknown outcome (may have been written, or not)");
      report(std::span<const Write>(in_flight).subspan(unconfirmed),
             Error(make_error_code(client_errc::protocol_error),
                   Diagnostics{.message = "the pending writes' flusher failed (" +
                                          one_line(failed_for, 1000) +
                                          ") before the commit of these writes' batch "
                                          "was confirmed"}));
      report(never_sent, Error(make_error_code(client_errc::protocol_error),
                               Diagnostics{.message = "the pending writes' flusher failed (" +
                                                      one_line(failed_for, 1000) +
                                                      ") before these writes were sent"}));
    } else {
      report(never_sent,
             Error(make_error_code(client_errc::cancelled),
                   Diagnostics{.message = "the flushing was abandoned (stop() was cancelled or ran "
                                          "out of time) before these writes were sent"}));
    }
  } catch (const std::exception& error) {
    spdlog::error(
        "pgrt pending writes {}: of the {} accepted writes given up on (counted failed), not all "
        "could be logged and reported through events().failed: {}",
        name, lost, error.what());
  }
}

// Starts the flusher, counted in `flushing` at once (with `mutex` held, so that a stop() cannot
// miss it). Never inline: co_spawn would run it at once, under the caller's lock.
void launch_locked(const std::shared_ptr<State>& self) {
  self->flushing.add();
  asio::post(self->strand, [self] {
    asio::co_spawn(self->strand, run_flusher(self),
                   asio::bind_cancellation_slot(
                       self->flusher_cancel.slot(),
                       asio::bind_executor(self->strand, [self](std::exception_ptr failure) {
                         flusher_ended(self, failure);
                       })));
  });
}

// Cancels what the flusher is waiting for (a pool acquire, a statement), on its strand.
void cancel_flusher(const std::shared_ptr<State>& self) {
  asio::post(self->strand, [self] {
    {
      std::lock_guard lock(self->mutex);
      if (self->finished) return;
    }
    self->flusher_cancel.emit(asio::cancellation_type::terminal);
  });
}

// PostgreSQL's keywords that cannot be a plain column or table name (its documentation's
// "reserved" and "reserved (can be function or type)" ones, PostgreSQL 16's system_user
// included): quoted, they can.
// clang-format off
constexpr std::array<std::string_view, 101> reserved_words{
    "all", "analyse", "analyze", "and", "any", "array", "as", "asc", "asymmetric", "authorization",
    "binary", "both", "case", "cast", "check", "collate", "collation", "column", "concurrently",
    "constraint", "create", "cross", "current_catalog", "current_date", "current_role",
    "current_schema", "current_time", "current_timestamp", "current_user", "default", "deferrable",
    "desc", "distinct", "do", "else", "end", "except", "false", "fetch", "for", "foreign",
    "freeze", "from", "full", "grant", "group", "having", "ilike", "in", "initially", "inner",
    "intersect", "into", "is", "isnull", "join", "lateral", "leading", "left", "like", "limit",
    "localtime", "localtimestamp", "natural", "not", "notnull", "null", "offset", "on", "only",
    "or", "order", "outer", "overlaps", "placing", "primary", "references", "returning", "right",
    "select", "session_user", "similar", "some", "symmetric", "system_user", "table", "tablesample", "then", "to",
    "trailing", "true", "union", "unique", "user", "using", "variadic", "verbose", "when", "where",
    "window", "with"};
// clang-format on
static_assert(std::is_sorted(reserved_words.begin(), reserved_words.end()));

bool is_reserved_word(std::string_view plain) {
  std::string lower(plain);
  for (char& c : lower) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return std::binary_search(reserved_words.begin(), reserved_words.end(), lower);
}

// A name as SQL writes it: `parts` identifiers at most, joined by '.', each either plain (a
// letter, '_' or a non-ASCII byte first, then also digits and '$') or double-quoted (not empty;
// "" for a quote inside), the first not a reserved word unless quoted. Anything else could not be
// the name it looks like (`1t`, `""`, `a"b"c`, `order`) or would inject SQL.
bool valid_name(std::string_view name, int parts) {
  const auto letter = [](unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c >= 0x80;
  };
  std::size_t at = 0;
  for (int part = 1;; ++part) {
    if (at >= name.size()) return false;
    if (name[at] == '"') {
      std::size_t length = 0;
      for (++at;; ++at) {
        if (at >= name.size()) return false;  // not closed
        if (name[at] == '"') {
          if (at + 1 < name.size() && name[at + 1] == '"') {
            ++at;
            ++length;
            continue;
          }
          ++at;
          break;
        }
        if (static_cast<unsigned char>(name[at]) < 0x20) return false;
        ++length;
      }
      if (length == 0) return false;
    } else {
      if (!letter(static_cast<unsigned char>(name[at]))) return false;
      const std::size_t word = at;
      while (at < name.size() && (letter(static_cast<unsigned char>(name[at])) ||
                                  (name[at] >= '0' && name[at] <= '9') || name[at] == '$')) {
        ++at;
      }
      // (The parts after the first may be any keyword: `public.order` is a table.)
      if (part == 1 && is_reserved_word(name.substr(word, at - word))) return false;
    }
    if (at == name.size()) return true;
    if (name[at] != '.' || part == parts) return false;
    ++at;
  }
}

// Accepts `write` into the queue, waiting for room if need be (see PendingWrites::enqueue()).
asio::awaitable<void> accept(std::shared_ptr<State> self, Write write) {
  const auto executor = co_await asio::this_coro::executor;
  const auto cancelled = (co_await asio::this_coro::cancellation_state).cancelled();
  std::unique_lock lock(self->mutex);
  if (self->closing) self->throw_closed_locked();
  if (self->waiters.empty() && self->unflushed_locked() < self->config.capacity) {
    self->push_locked(std::move(write));
    co_return;
  }
  if (self->config.when_full == PendingWritesConfig::WhenFull::fail) {
    throw_error(client_errc::writes_queue_full,
                "pending writes " + self->config.name + " hold " +
                    std::to_string(self->unflushed_locked()) + " unflushed writes (capacity " +
                    std::to_string(self->config.capacity) + "); the write was not accepted",
                "the database is slower than the writes come in, or unreachable; raise "
                "PendingWritesConfig::capacity or shed load");
  }
  if (cancelled != asio::cancellation_type::none) {
    throw_error(client_errc::cancelled, "waiting for room in pending writes " + self->config.name +
                                            " was cancelled; the write was not accepted");
  }
  SpaceWaiter waiter(executor, std::move(write));
  self->waiters.push_back(&waiter);
  // If this coroutine is destroyed while it waits (its io_context shut down), the waiter must
  // leave the queue.
  async::AbandonGuard leave_queue([&self, &waiter, &lock] {
    std::unique_lock relock(self->mutex, std::defer_lock);
    if (!lock.owns_lock()) relock.lock();
    std::erase(self->waiters, &waiter);
  });
  // make_room_locked() and close_locked() cancel the timer, under the lock; its expiry is the
  // end of enqueue_timeout (validate(): at most a year, or max() for no limit).
  const bool bounded = self->config.enqueue_timeout != std::chrono::milliseconds::max();
  const boost::system::error_code woken = co_await async::wait_locked(
      lock, waiter.timer,
      bounded ? Clock::now() + self->config.enqueue_timeout : Clock::time_point::max());
  leave_queue.disarm();
  if (waiter.accepted) co_return;
  if (waiter.failure) std::rethrow_exception(waiter.failure);  // (no longer listed)
  std::erase(self->waiters, &waiter);
  if (waiter.closed) self->throw_closed_locked();
  if (!woken) {  // (the timer ran out: nobody woke the writer)
    throw_error(client_errc::writes_queue_full,
                "pending writes " + self->config.name + " had no room within enqueue_timeout (" +
                    std::to_string(self->config.enqueue_timeout.count()) + " ms; " +
                    std::to_string(self->unflushed_locked()) + " unflushed writes, capacity " +
                    std::to_string(self->config.capacity) + ")" +
                    (self->failing_with.empty()
                         ? std::string()
                         : "; the flusher's batch keeps failing: " + self->failing_with) +
                    "; the write was not accepted",
                "the database is slower than the writes come in, or unreachable; raise "
                "PendingWritesConfig::capacity or enqueue_timeout, or shed load");
  }
  throw_error(client_errc::cancelled, "waiting for room in pending writes " + self->config.name +
                                          " was cancelled; the write was not accepted");
}

// Statements that cannot be a pending write: each runs inside the flusher's batch transaction, on
// a pooled connection. Transaction control would commit or end part of a batch (a later failure
// in it then reported committed writes as not written); session state (SET, LISTEN, a cursor, a
// prepared statement, a session advisory lock) would stay on the pooled connection for its next
// users (the rollback that resets it does not undo a SET); COPY takes the connection over.
// SET LOCAL, SET CONSTRAINTS and SET TRANSACTION belong to the batch's transaction: allowed.
void refuse_as_pending_write(std::string_view sql) {
  const std::string what = needs_own_session(sql, SessionScope::batch_transaction);
  if (what.empty()) return;
  throw Error(
      make_error_code(client_errc::needs_session),
      Diagnostics{
          .message = what + " cannot be a pending write: pending writes run in the flusher's batch "
                            "transaction, on a pooled connection that later users share",
          .hint = "use SET LOCAL for a setting of the batch's transaction, and take a lease "
                  "(co_await pgrt::connection()) for a transaction or session state of your own",
          .statement = std::string(sql)});
}

// What refuse_as_pending_write() and refuse_read_only_setting() refuse in one statement alone
// (its read-only setting read up to its own end): "" for nothing.
std::string refused_statement(std::string_view statement) {
  std::string what = needs_own_session(statement, SessionScope::batch_transaction);
  if (!what.empty()) return what;
  switch (transaction_read_only_setting(statement)) {
    case ReadOnlySetting::none:
      return {};
    case ReadOnlySetting::read_only:
      return "a read-only transaction setting";
    case ReadOnlySetting::unknown:
      return "SET LOCAL transaction_read_only to a value pgrt cannot tell to be off";
  }
  return {};
}

// The statement at the start of `rest` (a text's rest from a statement on), up to the next
// (`next`: after_first_statement(rest)), its ';' and the blanks before them dropped.
std::string_view statement_before(std::string_view rest, std::string_view next) {
  std::string_view statement = rest.substr(0, rest.size() - next.size());
  while (!statement.empty() &&
         (statement.back() == ';' || std::isspace(static_cast<unsigned char>(statement.back())))) {
    statement.remove_suffix(1);
  }
  return statement;
}

// A write is one statement: it is sent as one extended-protocol statement, which holds one command,
// and the server refused a text of several at the flush (42601), after enqueue() had accepted it.
// A text of several is refused at the call. The statements after the first are each checked as the
// first is (below), and the message names the first one refused: `INSERT ...; COMMIT` is refused
// for its COMMIT, `SET LOCAL transaction_read_only = off; SET TRANSACTION READ ONLY` for its
// read-only setting, not for a value the check could not read; a text of harmless statements for
// its statement 2.
void refuse_later_statements(std::string_view sql) {
  const std::string_view second = after_first_statement(sql);
  if (second.empty()) return;
  std::size_t number = 1;
  for (std::string_view rest = second; !rest.empty();) {
    ++number;
    const std::string_view next = after_first_statement(rest);
    const std::string_view statement = statement_before(rest, next);
    const std::string what = refused_statement(statement);
    if (!what.empty()) {
      throw Error(
          make_error_code(client_errc::needs_session),
          Diagnostics{.message = what + ", the text's statement " + std::to_string(number) + " (" +
                                 one_line(redact_statement(statement), 200) +
                                 "), cannot be a pending write: pending writes run in the "
                                 "flusher's batch transaction, on a pooled connection that later "
                                 "users share; and a write is one statement (the server refuses a "
                                 "text of several at the flush, 42601)",
                      .hint = "enqueue each statement on its own; take a lease (co_await "
                              "pgrt::connection()) for a transaction or session state of your own",
                      .statement = std::string(sql)});
    }
    rest = next;
  }
  const std::string_view statement = statement_before(second, after_first_statement(second));
  throw Error(
      make_error_code(client_errc::needs_session),
      Diagnostics{
          .message = "a text of several statements cannot be a pending write: its statement "
                     "2 (" +
                     one_line(redact_statement(statement), 200) +
                     ") would be sent with the first as one write, which the server "
                     "refuses at the flush (42601: a write is sent as one extended-protocol "
                     "statement, which holds one command), and the write would be given up",
          .hint = "enqueue each statement on its own (the writes of a batch run in the "
                  "order they were accepted, in one transaction)",
          .statement = std::string(sql)});
}

// A read-only transaction setting belongs to the batch's transaction, but makes every write after
// it in the batch fail (25006): refused. Setting transaction_read_only off is harmless; a value
// the check cannot read is refused, saying so.
void refuse_read_only_setting(std::string_view sql) {
  const ReadOnlySetting setting = transaction_read_only_setting(sql);
  if (setting == ReadOnlySetting::none) return;
  const std::string what =
      setting == ReadOnlySetting::read_only
          ? std::string("a read-only transaction setting cannot be a pending write")
          : std::string(
                "SET LOCAL transaction_read_only to a value pgrt cannot tell to be off (it reads "
                "off, false, no and 0, as a word, a quoted name, a plain '...' string or a number, "
                "and the prefixes PostgreSQL takes of them) is taken for a read-only transaction "
                "setting, which cannot be a pending write");
  throw Error(
      make_error_code(client_errc::needs_session),
      Diagnostics{.message = what + ": it would make the flusher's batch transaction read-only, "
                                    "and every write after it in the batch fail (25006)",
                  .hint = "take a lease (co_await pgrt::connection()) for a read-only "
                          "transaction of your own",
                  .statement = std::string(sql)});
}

}  // namespace

namespace detail {

asio::awaitable<void> accept_statement(std::shared_ptr<PendingWritesState> state, std::string sql,
                                       ParamSink params) {
  params.check();  // nothing is accepted that could not be sent
  check_statement_text(sql);
  refuse_as_pending_write(sql);
  refuse_later_statements(sql);
  refuse_read_only_setting(sql);
  Write write;
  write.text = std::move(sql);
  write.params = std::move(params);
  co_await accept(std::move(state), std::move(write));
}

asio::awaitable<void> accept_row(std::shared_ptr<PendingWritesState> state,
                                 std::shared_ptr<const PendingTable> table, std::string row) {
  // Nothing is accepted that could not be written: a text field with a NUL byte (PostgreSQL's
  // text cannot hold one; bytea fields are sent escaped) would fail its batch at the flush.
  if (row.find('\0') != std::string::npos) {
    throw Error(make_error_code(client_errc::conversion),
                Diagnostics{.message = "a row for " + table->heading +
                                       " has a text field with a NUL byte, which PostgreSQL's "
                                       "text types cannot store; the row was not accepted",
                            .hint = "strip the NUL bytes, or store the value as bytea "
                                    "(pgrt::Bytes)"});
  }
  Write write;
  write.table = std::move(table);
  write.text = std::move(row);
  co_await accept(std::move(state), std::move(write));
}

}  // namespace detail

void PendingWritesConfig::validate() const {
  auto invalid = [](const std::string& message) {
    throw_error(client_errc::invalid_config, "PendingWritesConfig::" + message);
  };
  if (name.empty()) invalid("name must not be empty");
  if (capacity == 0) invalid("capacity must be at least 1");
  if (batch_size == 0) invalid("batch_size must be at least 1");
  if (batch_size > capacity) {
    invalid("batch_size (" + std::to_string(batch_size) + ") must be at most capacity (" +
            std::to_string(capacity) + ")");
  }
  if (when_full != WhenFull::wait && when_full != WhenFull::fail) {
    invalid("when_full must be WhenFull::wait or WhenFull::fail");
  }
  if (flush_interval.count() < 0) invalid("flush_interval must not be negative");
  if (enqueue_timeout.count() <= 0) {
    invalid("enqueue_timeout must be positive (milliseconds::max() for no limit), got " +
            std::to_string(enqueue_timeout.count()) + " ms");
  }
  if (enqueue_timeout != std::chrono::milliseconds::max()) {
    if (auto problem = detail::longer_than_a_year("enqueue_timeout", enqueue_timeout, "")) {
      throw_error(client_errc::invalid_config, "PendingWritesConfig::" + problem->message,
                  problem->hint);
    }
  }
  if (retry_initial.count() <= 0) invalid("retry_initial must be positive");
  // The retry delays are doubled and added to steady_clock instants (nanoseconds): one such as
  // milliseconds::max() would overflow. (flush_interval saturates instead: max() means no limit.)
  for (const auto& [field, value] :
       {std::pair{"retry_initial", retry_initial}, std::pair{"retry_max", retry_max}}) {
    if (auto problem = detail::longer_than_a_year(field, value, "")) {
      throw_error(client_errc::invalid_config, "PendingWritesConfig::" + problem->message,
                  problem->hint);
    }
  }
  if (retry_max < retry_initial) {
    invalid("retry_max (" + std::to_string(retry_max.count()) +
            " ms) must be at least retry_initial (" + std::to_string(retry_initial.count()) +
            " ms)");
  }
}

std::string PendingWritesReport::to_json() const {
  auto field = [](const char* name, auto value) {
    return std::string("\"") + name + "\":" + std::to_string(value);
  };
  return "{" + field("accepted", accepted) + "," + field("flushed", flushed) + "," +
         field("failed", failed) + "," + field("unconfirmed", unconfirmed) + "," +
         field("pending", pending) + "," + field("waiting", waiting) + "," +
         field("batches", batches) + "," + field("retries", retries) + "}";
}

namespace {

// Every PendingWrites alive, for a process that exits without destroying them (std::exit() from a
// worker: main's stack is not unwound, and their destructors, which would say what was not
// written, never run): an atexit handler says it for them.
struct LivePendingWrites {
  std::mutex mutex;
  std::vector<detail::PendingWritesState*> states;
};

LivePendingWrites& live_pending_writes() {
  static LivePendingWrites live;
  return live;
}

void report_unwritten_at_exit() noexcept {
  try {
    LivePendingWrites& live = live_pending_writes();
    std::lock_guard lock(live.mutex);
    for (detail::PendingWritesState* state : live.states) {
      // (A thread may hold it as the process exits: then the count is read without it.)
      std::unique_lock state_lock(state->mutex, std::try_to_lock);
      const std::size_t unflushed = state->unflushed_locked();
      if (unflushed == 0 || state->finished || state->abandoned) continue;  // (reported then)
      const auto logger = spdlog::default_logger();  // (null after spdlog::shutdown())
      if (!logger) return;
      logger->error(
          "pgrt pending writes {}: the process is exiting without stop(): {} accepted writes were "
          "not written",
          state->config.name, unflushed);
      logger->flush();
    }
  } catch (...) {  // NOLINT(bugprone-empty-catch): at exit, nothing more can be done
  }
}

void watch_at_exit(detail::PendingWritesState* state) {
  static const bool registered = [] {
    // (Made first, so that they are destroyed after the handler has run.)
    (void)live_pending_writes();
    (void)spdlog::default_logger();
    return std::atexit(report_unwritten_at_exit) == 0;
  }();
  (void)registered;
  LivePendingWrites& live = live_pending_writes();
  std::lock_guard lock(live.mutex);
  live.states.push_back(state);
}

void unwatch_at_exit(detail::PendingWritesState* state) noexcept {
  LivePendingWrites& live = live_pending_writes();
  std::lock_guard lock(live.mutex);
  std::erase(live.states, state);
}

}  // namespace

PendingWrites::PendingWrites(Pool& pool, boost::asio::any_io_executor executor,
                             PendingWritesConfig config) {
  config.validate();
  state_ = std::make_shared<detail::PendingWritesState>(pool, executor, std::move(config));
  watch_at_exit(state_.get());
}

PendingWrites::~PendingWrites() {
  unwatch_at_exit(state_.get());
  std::lock_guard lock(state_->mutex);
  const std::size_t unflushed = state_->unflushed_locked();
  // (Once `ending`, nothing is left to abandon: a failed subscriber called for what the flusher
  // gave up on may destroy the PendingWrites.)
  if (state_->started && !state_->finished && !state_->ending && !state_->abandoned) {
    spdlog::error(
        "pgrt pending writes {}: destroyed while running, without stop(): {} accepted "
        "writes may not be written",
        state_->config.name, unflushed);
    state_->abandon_locked();
    cancel_flusher(state_);
  } else if (!state_->started && unflushed > 0) {
    spdlog::error(
        "pgrt pending writes {}: destroyed without start() or stop(): {} accepted writes "
        "were not written",
        state_->config.name, unflushed);
  }
  state_->close_locked();
}

std::string PendingWrites::name() const {
  return state_->config.name;
}

asio::awaitable<void> PendingWrites::start() {
  const std::shared_ptr<State> self = state_;
  std::unique_lock lock(self->mutex);
  if (self->closing) self->throw_closed_locked();
  if (self->started) co_return;
  self->started = true;
  launch_locked(self);
  lock.unlock();
  spdlog::debug("pgrt pending writes {}: started", self->config.name);
}

asio::awaitable<void> PendingWrites::stop() {
  const std::shared_ptr<State> self = state_;
  bool abandoned = false;
  {
    const std::lock_guard lock(self->mutex);
    if (!self->closing) {
      spdlog::info("pgrt pending writes {}: stopping; flushing {} accepted writes",
                   self->config.name, self->unflushed_locked());
      self->close_locked();
    }
    if (!self->started) {
      self->started = true;
      launch_locked(self);
    }
    abandoned = self->abandoned;
  }
  for (;;) {
    // Until the flusher ends; once abandoned, re-cancel it every 100 ms (a cancellation that
    // reached it between two operations would otherwise be lost).
    const auto deadline =
        abandoned ? Clock::now() + std::chrono::milliseconds(100) : Clock::time_point::max();
    const async::Woken woken = co_await self->flushing.wait(deadline);
    if (woken == async::Woken::notified) break;
    {
      const std::lock_guard lock(self->mutex);
      if (self->finished) break;  // ended meanwhile: its counts are final
      if (woken == async::Woken::cancelled && !self->abandoned) {
        spdlog::warn(
            "pgrt pending writes {}: stop() was cancelled; giving up on {} writes not "
            "yet committed",
            self->config.name, self->unflushed_locked());
        self->abandon_locked();
      }
      abandoned = self->abandoned;
      if (abandoned) cancel_flusher(self);
    }
    if (woken == async::Woken::cancelled) {
      co_await asio::this_coro::reset_cancellation_state();
    }
  }
  std::unique_lock lock(self->mutex);
  const PendingWritesReport report = self->report_locked();
  const std::uint64_t by_error = self->failed_by_error;
  lock.unlock();
  const std::string& name = self->config.name;
  if (report.failed == 0) {
    spdlog::info("pgrt pending writes {}: stopped: accepted {}, flushed {}, failed 0", name,
                 report.accepted, report.flushed);
    co_return;
  }
  spdlog::warn("pgrt pending writes {}: stopped: accepted {}, flushed {}, failed {}{}", name,
               report.accepted, report.flushed, report.failed,
               report.unconfirmed == 0
                   ? std::string()
                   : " (" + std::to_string(report.unconfirmed) + " of unknown outcome)");
  std::string why;
  if (by_error > 0) {
    why = std::to_string(by_error) +
          " failed with errors (logged and reported through "
          "events().failed)";
  }
  if (report.unconfirmed > 0) {
    if (!why.empty()) why += "; ";
    why += std::to_string(report.unconfirmed) +
           " may have been written, or not: their batch's COMMIT was sent and its answer lost, "
           "and no retry could settle it (logged, and reported through events().failed as "
           "commit_unconfirmed)";
  }
  if (report.failed > by_error + report.unconfirmed) {
    if (!why.empty()) why += "; ";
    why += std::to_string(report.failed - by_error - report.unconfirmed) +
           " were still pending when the flushing was abandoned (stop() cancelled; logged, and "
           "reported through events().failed)";
  }
  throw_error(client_errc::writes_failed,
              "pending writes " + name + ": " + std::to_string(report.failed) + " of " +
                  std::to_string(report.accepted) + " accepted writes were not " +
                  (report.unconfirmed == 0 ? "written: " : "confirmed written: ") + why);
}

PendingWritesReport PendingWrites::report() const {
  std::lock_guard lock(state_->mutex);
  return state_->report_locked();
}

PendingWritesEvents& PendingWrites::events() noexcept {
  return state_->events;
}

std::shared_ptr<const detail::PendingTable> PendingWrites::make_table(
    std::string table, std::vector<std::string> columns, std::size_t types) const {
  auto invalid = [&](const std::string& message) {
    throw_error(client_errc::invalid_config, "pending writes " + state_->config.name +
                                                 ": table(\"" + one_line(table, 100) +
                                                 "\"): " + message);
  };
  if (!valid_name(table, 3)) {
    invalid(
        "the table name must be an identifier, schema-qualified or not (letters, digits, _ and $, "
        "not a digit first, not a reserved word such as order or user; or double-quoted), parts "
        "joined by '.'");
  }
  if (columns.size() != types) {
    invalid(std::to_string(columns.size()) + " column names for " + std::to_string(types) +
            " column types");
  }
  if (columns.empty()) invalid("no columns");
  std::string list;
  for (const auto& column : columns) {
    if (!valid_name(column, 1)) {
      invalid("column \"" + one_line(column, 100) +
              "\" is not an identifier (letters, digits, _ and $, not a digit first, not a "
              "reserved word such as order or user; or double-quoted)");
    }
    if (!list.empty()) list += ", ";
    list += column;
  }
  auto target = std::make_shared<detail::PendingTable>();
  target->heading = table + " (" + list + ")";
  target->copy_sql = "COPY " + target->heading + " FROM STDIN";
  return target;
}

}  // namespace pgrt
