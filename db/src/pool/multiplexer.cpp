// The multiplexer behind Pool::query() (multiplexer.hpp): the caller's side, the connections'
// writer and reader, and their borrowing and giving back.
#include "multiplexer.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/execution/context.hpp>
#include <boost/asio/query.hpp>
#include <cctype>
#include <optional>
#include <string_view>
#include <unordered_map>

#include "../connection/impl.hpp"
#include "../timing_clock.hpp"

namespace pgrt::detail {

std::source_location shared_connection_site() noexcept {
  return std::source_location::current();
}

namespace {

// Statements a shared connection cannot run: they change or need the session (a transaction, a
// setting, a cursor, a listener) that the other callers' statements share, or COPY, which takes
// the connection over. Throws Error(needs_session) for those. (Not in run_shared()'s frame: its
// Diagnostics would make the frame too large for asio's recycled ones.)
void refuse_if_it_needs_a_session(std::string_view sql) {
  const std::string what = needs_own_session(sql, SessionScope::own_implicit_transaction);
  if (what.empty()) return;
  throw Error(
      make_error_code(client_errc::needs_session),
      Diagnostics{
          .message = what +
                     " cannot run on a shared connection: query() runs each statement on a "
                     "connection other callers' statements share, in an implicit transaction of "
                     "its own",
          .hint =
              "take a lease for it (co_await pool.acquire() or pgrt::connection()): "
              "transactions, SET, LISTEN, COPY, cursors, temporary tables, session settings and "
              "locks, DO blocks and LOAD need a connection of their own",
          .statement = std::string(sql)});
}

constexpr std::size_t default_depth = 64;

// A prepared statement's name as a sent entry keeps it: inline, so that a statement's entry
// allocates nothing for it (new_statement_name() makes "pgrt_", 16 hex digits, "_" and a counter:
// at most 42 characters). A longer name (none is made) is kept on the heap.
class EntryName {
 public:
  EntryName() = default;
  explicit EntryName(std::string_view name) {
    if (name.size() <= inline_.size()) {
      std::copy(name.begin(), name.end(), inline_.begin());
      size_ = static_cast<std::uint8_t>(name.size());
    } else {
      long_ = name;
      size_ = long_marker;
    }
  }
  [[nodiscard]] std::string_view view() const noexcept {
    return size_ == long_marker ? std::string_view(long_) : std::string_view(inline_.data(), size_);
  }
  [[nodiscard]] std::string str() const { return std::string(view()); }
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
  friend bool operator==(const EntryName& a, const EntryName& b) noexcept {
    return a.view() == b.view();
  }

 private:
  static constexpr std::uint8_t long_marker = 255;
  std::array<char, 63> inline_{};
  std::uint8_t size_ = 0;
  std::string long_;
};

// What one shared connection has sent and not yet had answered, in order: each entry ends with
// its own sync.
struct SentEntry {
  enum class Kind { prepare, statement, deallocate };
  Kind kind = Kind::statement;
  std::shared_ptr<SharedStatement> statement;  // Kind::statement
  std::string key;                             // Kind::prepare: the statement cache's key
  EntryName name;                              // the prepared name (empty when unnamed)
  Result result;                               // its result, once in
  int results = 0;                             // how many came (one; two with a commit error)
  Clock::time_point sent_at{};                 // its batch's send, when statements are timed
};

// The entries a shared connection has sent and not yet had answered, oldest first: a queue over
// a vector that keeps its capacity, so that a connection in steady use allocates nothing for it
// (a std::deque allocated a block every few entries and freed it once they were read). An entry
// read is reset at once (its statement released); the slots before the first live one are
// reused when the vector is full, or when none is live.
class SentQueue {
 public:
  using iterator = std::vector<SentEntry>::iterator;
  using const_iterator = std::vector<SentEntry>::const_iterator;

  [[nodiscard]] bool empty() const noexcept { return head_ == entries_.size(); }
  [[nodiscard]] SentEntry& front() noexcept { return entries_[head_]; }
  [[nodiscard]] iterator begin() noexcept {
    return entries_.begin() + static_cast<std::ptrdiff_t>(head_);
  }
  [[nodiscard]] iterator end() noexcept { return entries_.end(); }
  [[nodiscard]] const_iterator begin() const noexcept {
    return entries_.begin() + static_cast<std::ptrdiff_t>(head_);
  }
  [[nodiscard]] const_iterator end() const noexcept { return entries_.end(); }
  [[nodiscard]] std::size_t capacity() const noexcept { return entries_.capacity(); }

  // Allocates only when every slot holds an entry not yet read (std::bad_alloc then).
  void push_back(SentEntry entry) {
    if (head_ > 0 && entries_.size() == entries_.capacity()) {
      entries_.erase(entries_.begin(), begin());  // (moves the live ones down: no allocation)
      head_ = 0;
    }
    entries_.push_back(std::move(entry));
  }
  // The oldest entry, taken out; the queue must not be empty.
  [[nodiscard]] SentEntry take_front() noexcept {
    // (The slot is left moved from: its statement and result released, its strings empty.)
    SentEntry entry = std::move(entries_[head_]);
    if (++head_ == entries_.size()) {
      entries_.clear();  // (keeps the capacity)
      head_ = 0;
    }
    return entry;
  }

 private:
  std::vector<SentEntry> entries_;
  std::size_t head_ = 0;  // the first entry not yet read
};

struct FailedPrepare {
  error_code error;
  Diagnostics diagnostics;
  std::size_t users = 0;  // statements sent by its name and not answered yet
};

asio::awaitable<void> run_link(std::shared_ptr<Multiplexer> mux, std::shared_ptr<SharedLink> link);

// The first statement in flight if every statement in flight was given up by its caller (or
// timed out behind another, sweep()), else nullptr. Under Multiplexer::mutex (the callers change
// the stages).
const SharedStatement* abandoned_head_locked(const SentQueue& sent) {
  const SharedStatement* head = nullptr;
  for (const SentEntry& entry : sent) {
    if (entry.kind != SentEntry::Kind::statement) continue;
    if (entry.statement->stage == SharedStatement::Stage::sent) return nullptr;
    if (head == nullptr) head = entry.statement.get();
  }
  return head;
}

// How long a cancel request sent for a given-up head statement may take to end it before it is
// sent again (run_link(), 4.).
constexpr std::chrono::milliseconds cancel_retry_interval{250};

// The most a batch's statements (their text and parameters) may weigh to be held in libpq's
// buffer and sent in one write (Connection::Impl::hold_output()): libpq's own threshold for
// flushing a pipeline.
constexpr std::size_t held_batch_limit = 64 * 1024;

std::size_t batch_bytes(const std::vector<std::shared_ptr<SharedStatement>>& batch) {
  std::size_t bytes = 0;
  for (const auto& statement : batch) {
    bytes += statement->sql.size();
    const int* lengths = statement->params.lengths();
    for (std::size_t i = 0; i < statement->params.size(); ++i) {
      bytes += static_cast<std::size_t>(std::max(lengths[i], 0));
    }
  }
  return bytes;
}

// Borrows a connection for the multiplexer, then runs it.
asio::awaitable<void> borrow(std::shared_ptr<Multiplexer> mux) {
  // The connection's own strand (grow_locked()), which its coroutine keeps.
  const asio::any_io_executor own_strand = co_await asio::this_coro::executor;
  // (If this coroutine is destroyed mid-acquire, its io_context shut down, the count goes too.)
  async::AbandonGuard uncount([&mux] {
    std::lock_guard lock(mux->mutex);
    --mux->borrowing;
  });
  std::shared_ptr<PoolState> pool = mux->pool.lock();
  std::optional<Lease> lease;
  error_code failure = make_error_code(client_errc::pool_closed);
  Diagnostics diagnostics{.message = "the pool is closed"};
  if (pool) {
    try {
      lease.emplace(co_await pool->acquire(pool, Priority::normal, pool::default_consumer,
                                           shared_connection_site()));
    } catch (const Error& error) {
      failure = error.code();
      diagnostics = error.diagnostics();
      if (diagnostics.message.empty()) diagnostics.message = error.what();
    } catch (const std::exception& error) {
      failure = make_error_code(client_errc::protocol_error);
      diagnostics = Diagnostics{.message = error.what()};
    }
  }
  std::shared_ptr<SharedLink> link;
  {
    std::lock_guard lock(mux->mutex);
    uncount.disarm();
    --mux->borrowing;
    if (lease && !mux->closed) {
      link = std::make_shared<SharedLink>(std::move(*lease));
      link->strand = own_strand;
      mux->links.push_back(link);
    } else if (!lease && std::all_of(mux->links.begin(), mux->links.end(),
                                     [](const auto& held) { return held->drained_for_good(); })) {
      // The pool could not lend one (its acquire timed out or failed fast, it is closing): with
      // no connection that takes statements (none, or only ones draining to go back for good, not
      // to be borrowed again: SharedLink::drained_for_good()), the queued statements fail with
      // the acquire's error, as a caller of acquire() would, and do not wait on for a draining one
      // (with acquire_timeout 0, without a bound). Only those that waited since before the acquire
      // began: one queued while it waited has its own acquire_timeout still to run, and gets a
      // borrow of its own (as would the next statement).
      mux->queue.remove_if([&](SharedStatement& statement) {
        if (statement.wait_number >= mux->borrow_covers) return false;
        statement.error = failure;
        statement.diagnostics = diagnostics;
        statement.diagnostics.statement = statement.sql;
        Multiplexer::finish_locked(statement);
        return true;
      });
      mux->grow_locked();
    }
  }
  if (lease && !link) lease->release();  // closed meanwhile
  if (link) co_await run_link(mux, link);
}

// One shared connection: sends what is queued, reads what comes back, and gives the connection
// back when it is done with it.
asio::awaitable<void> run_link(std::shared_ptr<Multiplexer> mux, std::shared_ptr<SharedLink> link) {
  Connection::Impl* impl_pointer = ConnectionAccess::impl_of(*link->lease);
  SentQueue sent;
  std::unordered_map<std::string, std::string> preparing;  // key -> name, sent, not answered
  std::unordered_map<std::string, FailedPrepare> failed;   // name -> its prepare's error
  std::vector<std::shared_ptr<SharedStatement>> batch;
  // The name of the statement being sent, kept from one to the next (it keeps its capacity: a
  // statement sent allocates nothing for it).
  std::string name;
  // The callers answered by the results just read, resumed once the mutex is released.
  std::vector<async::ParkedWait> answered;
  bool must_wait = false;
  error_code lost;
  // The connection's strand (the multiplexer's, which release_io() may let go of first).
  const asio::any_io_executor on_strand = co_await asio::this_coro::executor;
  // If this coroutine is destroyed mid-wait (its io_context shut down), the link leaves the
  // multiplexer, so that its lease goes back to the pool with it.
  // (Its in-flight statements fail: callers on other io_contexts would otherwise wait for good.)
  async::AbandonGuard abandon([&mux, &link, &sent, &batch] {
    std::lock_guard lock(mux->mutex);
    std::erase(mux->links, link);
    const auto fail = [&mux](SharedStatement& statement) {
      (void)mux->in_flight.remove(statement);  // (the batch or `sent` still holds it)
      if (statement.stage != SharedStatement::Stage::sent) return;
      statement.error = make_error_code(client_errc::connection_lost);
      statement.diagnostics = Diagnostics{
          .message =
              "the io_context of the shared connection was shut down with the statement "
              "in flight",
          .statement = statement.sql};
      Multiplexer::finish_locked(statement);
    };
    for (const auto& statement : batch) fail(*statement);
    for (const SentEntry& entry : sent) {
      if (entry.statement) fail(*entry.statement);
    }
  });
  if (impl_pointer == nullptr || impl_pointer->conn == nullptr) {
    lost = make_error_code(client_errc::connection_lost);
  } else {
    if (impl_pointer->single_row_mode_left_on) {
      // libpq 15 keeps single-row mode on after a stream() until the next statement sent outside
      // pipeline mode (see Connection::run()).
      const ParamSink no_params;
      Result ignored;
      const Connection::Impl::Request empty{.kind = Connection::Impl::Request::Kind::text,
                                            .sql = "",
                                            .params = &no_params,
                                            .timed = false};
      if (auto reset_error = co_await impl_pointer->exchange(empty, ignored)) lost = reset_error;
    }
    if (!lost && PQenterPipelineMode(impl_pointer->conn) == 0) {
      lost = impl_pointer->lost("pipeline mode");
    }
  }
  {
    std::lock_guard lock(mux->mutex);
    link->depth = impl_pointer != nullptr && impl_pointer->one_segment_in_flight() ? 1 : mux->depth;
  }
  // The cancel requests sent for statements whose callers all gave up (see 4.), the head
  // statement the last one was sent for and when, and the timer that wakes this coroutine to send
  // it again if that statement is still the head by then.
  std::vector<std::shared_ptr<std::atomic<bool>>> cancels_delivered;
  const SharedStatement* cancelled_head = nullptr;
  Clock::time_point cancelled_at{};
  Clock::duration cancel_retry_after = cancel_retry_interval;
  // When the first cancel request went out for the given-up head statement: it must have ended
  // within cancel_timeout from then, or the connection is closed (a server or network that
  // answers nothing would otherwise keep it, and its slot, for good).
  Clock::time_point head_first_cancelled{};
  asio::steady_timer cancel_again(on_strand);
  bool served = false;  // it has sent something: only then may it be given up early
  bool yielded_when_drained = false;
  // Reads the pool (under its lock, never under ours): whether callers wait for a lease beyond
  // the multiplexer's own borrows, and whether this connection is due back (evicted, or past its
  // lifetime); and, kept in the multiplexer, how many more connections it could lend now
  // (Multiplexer::lendable).
  bool due_back = false;
  const auto read_pool_and_see_lease_waiters = [&mux, &link, &due_back]() {
    const std::shared_ptr<PoolState> pool = mux->pool.lock();
    if (!pool) return false;
    std::size_t waiting = 0;
    std::size_t lendable = 0;
    {
      std::lock_guard pool_lock(pool->mutex);
      waiting = pool->core.waiters().size();
      lendable = pool->core.lendable();
      due_back = PoolState::due_back_locked(link->lease, coarse_now());
    }
    // A server that no longer serves target_session_attrs (PoolConfig::recheck_session_attrs):
    // given back now, where it is closed (DiscardReason::server_role), rather than after
    // hold_limit under steady load. (Read on the connection's own strand.)
    if (!due_back && pool->role != RequiredRole::any && link->lease &&
        !serves_role(*link->lease, pool->role)) {
      due_back = true;
    }
    std::lock_guard lock(mux->mutex);
    mux->lendable = lendable;
    return waiting > mux->borrowing;
  };

  // The statement taken off `sent` and not yet answered: if something throws meanwhile, the
  // catch below answers it (it is in neither `batch` nor `sent` any more).
  std::shared_ptr<SharedStatement> in_hand;
  try {
    while (!lost) {
      Connection::Impl& impl = *impl_pointer;
      PGconn* conn = impl.conn;
      // Give the connection up (drained first) to a caller waiting for a lease, or after a while;
      // not before it has served a batch (the lease caller queued behind its borrowing would
      // otherwise take every connection it borrows at once). One the pool wants closed
      // (Pool::evict_all(): a failover, rotated credentials) or past its lifetime takes no new
      // statement from now on.
      const bool lease_callers_wait = read_pool_and_see_lease_waiters();
      if (due_back ||
          (served && (coarse_now() - link->borrowed >= mux->hold_limit || lease_callers_wait))) {
        std::lock_guard lock(mux->mutex);
        const bool only_held_long = !due_back && !lease_callers_wait;
        link->rotating = (link->rotating || !link->retiring) && only_held_long;
        link->retiring = true;
      }
      // 1. Take what is queued, up to the depth.
      batch.clear();
      {
        std::lock_guard lock(mux->mutex);
        const std::size_t share = mux->share_locked(*link);
        while (!mux->closed && !link->retiring && !mux->queue.empty() && link->in_flight < share) {
          batch.push_back(mux->queue.pop_front());
          batch.back()->stage = SharedStatement::Stage::sent;
          batch.back()->link = link;
          mux->in_flight.push_back(batch.back());
          ++link->in_flight;
        }
        // More queued than this connection takes: another one with room takes them, or one more
        // is borrowed now (a burst that came at once must not stay on one connection).
        if (!mux->queue.empty()) mux->dispatch_locked();
      }
      // 2. Send it: each statement prepared once per connection (its preparation in a sync segment
      // of its own) and in a sync segment of its own.
      const Clock::time_point sent_at = impl.statement_times ? timing_now() : Clock::time_point{};
      // The statements the cache evicted (or retired as stale) are deallocated now, each in a
      // sync segment of its own, not when the connection goes back: a connection held long by
      // callers with many different texts would keep every one prepared on the server, then hold
      // the connection for a DEALLOCATE round trip each. What was sent by that name before runs
      // first; nothing later uses it. (Not with one segment in flight: no names there.)
      const bool deallocating = !impl.evicted_statements.empty() && !impl.one_segment_in_flight();
      // More than one statement, small together: libpq keeps them all until the flush below,
      // which sends them in one write (libpq 15 would send at each statement's sync; see
      // hold_output()). Large ones are sent as they come: libpq would hold them all in memory.
      const bool output_held =
          batch.size() + (deallocating ? impl.evicted_statements.size() : 0) > 1 &&
          batch_bytes(batch) <= held_batch_limit && impl.hold_output();
      if (deallocating) {
        for (std::string& evicted : impl.evicted_statements) {
          const std::string deallocate = "DEALLOCATE " + evicted;
          if (PQsendQueryParams(conn, deallocate.c_str(), 0, nullptr, nullptr, nullptr, nullptr,
                                0) == 0 ||
              PQpipelineSync(conn) == 0) {
            lost = impl.lost(deallocate);
            break;
          }
          sent.push_back(SentEntry{.kind = SentEntry::Kind::deallocate,
                                   .statement = nullptr,
                                   .key = {},
                                   .name = EntryName(evicted),
                                   .result = {}});
        }
        impl.evicted_statements.clear();
      }
      for (const auto& statement : batch) {
        if (lost) break;
        name.clear();
        if (!impl.unnamed_statements) {
          if (const std::string* cached =
                  impl.cached_statement(statement->sql, statement->params)) {
            name.assign(*cached);
          } else if (auto pending = preparing.find(impl.statement_key);
                     pending != preparing.end()) {
            name.assign(pending->second);
          } else {
            name = impl.new_statement_name();
            if (PQsendPrepare(conn, name.c_str(), statement->sql.c_str(),
                              static_cast<int>(statement->params.size()),
                              statement->params.types()) == 0 ||
                PQpipelineSync(conn) == 0) {
              lost = impl.lost(statement->sql);
              break;
            }
            preparing.emplace(impl.statement_key, name);
            sent.push_back(SentEntry{.kind = SentEntry::Kind::prepare,
                                     .statement = nullptr,
                                     .key = impl.statement_key,
                                     .name = EntryName(name),
                                     .result = {}});
          }
        }
        const auto values = statement->params.values();
        const int count = static_cast<int>(statement->params.size());
        const int queued =
            name.empty()
                ? PQsendQueryParams(conn, statement->sql.c_str(), count, statement->params.types(),
                                    values.data(), statement->params.lengths(),
                                    statement->params.formats(), 0)
                : PQsendQueryPrepared(conn, name.c_str(), count, values.data(),
                                      statement->params.lengths(), statement->params.formats(), 0);
        // Each statement its own sync (PQpipelineSync sends what libpq holds, unless held above).
        if (queued == 0 || PQpipelineSync(conn) == 0) {
          lost = impl.lost(statement->sql);
          break;
        }
        sent.push_back(SentEntry{.kind = SentEntry::Kind::statement,
                                 .statement = statement,
                                 .key = {},
                                 .name = EntryName(name),
                                 .result = {},
                                 .sent_at = sent_at});
      }
      if (output_held && !impl.release_output() && !lost) {
        lost = impl.fail(client_errc::connection_lost,
                         "libpq dropped the connection's socket while the batch was being queued");
      }
      if (lost) {
        // Those of the batch not sent yet go back to the front of the queue (or fail, if the
        // pool closed meanwhile: nothing would take them).
        std::lock_guard lock(mux->mutex);
        for (auto it = batch.rbegin(); it != batch.rend(); ++it) {
          const bool was_sent = std::any_of(sent.begin(), sent.end(), [&](const SentEntry& entry) {
            return entry.statement == *it;
          });
          if (was_sent) continue;
          mux->land_locked(*link, **it);
          if ((*it)->stage != SharedStatement::Stage::sent) continue;
          if (mux->closed) {
            (*it)->error = make_error_code(client_errc::pool_closed);
            (*it)->diagnostics =
                Diagnostics{.message = "the pool closed before the statement was sent",
                            .statement = (*it)->sql};
            Multiplexer::finish_locked(**it);
            continue;
          }
          // (Queued before its wait starts: a sweeper that cannot be armed, for want of memory,
          // throws with the statement queued, not marked queued and in no queue, never answered.)
          (*it)->stage = SharedStatement::Stage::queued;
          mux->queue.push_front(*it);
          mux->start_wait_locked(**it);
        }
        break;
      }
      served = served || !batch.empty();
      if ((!batch.empty() || deallocating) && !impl.flushed_at_once("query()", lost)) {
        lost = co_await impl.flush("query()", /*can_drain=*/false);
      }
      if (lost) break;
      // 3. Nothing in flight: give the connection back if there is nothing to take, after letting
      // the callers just answered run once (a caller in a loop queues its next statement then,
      // and a lone caller does not pay a borrow per statement).
      if (sent.empty()) {
        {
          std::lock_guard lock(mux->mutex);
          if (mux->closed || link->retiring) break;
          if (!mux->queue.empty()) continue;
        }
        if (yielded_when_drained) break;
        yielded_when_drained = true;
        co_await asio::post(on_strand, asio::deferred);  // (no coroutine frame of its own)
        continue;
      }
      yielded_when_drained = false;
      // 4. Wait for results, or for statements to send.
      if (PQisBusy(conn) != 0 || must_wait) {
        must_wait = false;
        const SharedStatement* cancel_for = nullptr;
        {
          std::lock_guard lock(mux->mutex);
          if (!mux->closed && !link->retiring && !mux->queue.empty() &&
              link->in_flight < mux->share_locked(*link)) {
            continue;
          }
          if (link->retiring) cancel_for = abandoned_head_locked(sent);
          link->waiting = true;
        }
        // Every statement in flight here was given up by its caller, and none will follow (the
        // connection retires): a cancel request can only hit one of them, so it is sent, again
        // for each new head, rather than holding the connection until they end. The connection
        // goes back to the pool only once the request was delivered (below). A request that
        // reaches the backend between two statements (while it reads the next) is ignored by the
        // server: if the same statement is still the head after cancel_retry_interval, the
        // request is sent again (the timer wakes this coroutine from its wait for the socket),
        // and again after twice as long each time, up to 16 times the interval (a statement that
        // swallows cancels costs a request every few seconds, not four a second). Never while the
        // last one is still on its way (a network that swallows cancel requests would otherwise
        // take one more of the process's cancel threads at each resend): the timer looks again
        // an interval later. A head the server has not ended within cancel_timeout of its first
        // request (a server or network that answers nothing) closes the connection, as a lease's
        // cancelled statement does.
        if (cancel_for != nullptr) {
          const auto now = Clock::now();
          const bool new_head = cancel_for != cancelled_head;
          if (new_head) head_first_cancelled = now;
          const auto close_at = head_first_cancelled + impl.options.cancel_timeout;
          if (now >= close_at) {
            {
              std::lock_guard lock(mux->mutex);
              link->waiting = false;
            }
            lost = impl.fail(client_errc::cancelled,
                             "the callers of the statements in flight on a shared connection all "
                             "gave up, and the server did not end them within " +
                                 std::to_string(impl.options.cancel_timeout.count()) +
                                 " ms of a cancel request, so the connection was closed",
                             cancel_for->sql, "the network or server may be unresponsive");
            impl.close(CloseMode::immediate);
            break;
          }
          if (new_head || now >= cancelled_at + cancel_retry_after) {
            const bool last_on_its_way =
                !cancels_delivered.empty() && !cancels_delivered.back()->load();
            if (new_head || !last_on_its_way) {
              cancel_retry_after = new_head ? cancel_retry_interval
                                            : std::min<Clock::duration>(cancel_retry_after * 2,
                                                                        cancel_retry_interval * 16);
              std::erase_if(cancels_delivered,
                            [](const auto& delivered) { return delivered->load(); });
              if (auto delivered = impl.send_cancel_request()) {
                cancels_delivered.push_back(delivered);
              }
            }
            cancelled_head = cancel_for;
            cancelled_at = now;
            cancel_again.expires_after(
                std::min<Clock::duration>(cancel_retry_after, close_at - now));
            cancel_again.async_wait(
                [weak_mux = std::weak_ptr<Multiplexer>(mux),
                 weak_link = std::weak_ptr<SharedLink>(link)](error_code error) {
                  const auto live_mux = weak_mux.lock();
                  const auto live_link = weak_link.lock();
                  if (error || !live_mux || !live_link) return;
                  const std::lock_guard lock(live_mux->mutex);
                  live_mux->wake_locked(live_link);
                });
          }
        }
        error_code wait_error;
        if (!impl.tls_holds_bytes()) {
          auto [error] =
              co_await impl.socket.async_wait(asio::socket_base::wait_read, no_throw_in_frame);
          wait_error = error;
        }
        {
          std::lock_guard lock(mux->mutex);
          link->waiting = false;
          link->wake_posted = false;
        }
        if (wait_error && wait_error != asio::error::operation_aborted) {
          lost = impl.lost("query()");
          break;
        }
        if (PQconsumeInput(conn) == 0) {
          lost = impl.lost("query()");
          break;
        }
      }
      // 5. Every result that is in (timed, when statements are, from its batch's send to now).
      const Clock::time_point read_at = impl.statement_times ? timing_now() : Clock::time_point{};
      int empty_in_a_row = 0;
      while (!lost && !sent.empty() && PQisBusy(conn) == 0) {
        in_hand.reset();
        PGresult* raw = PQgetResult(conn);
        if (raw == nullptr) {
          if (PQstatus(conn) != CONNECTION_OK) {
            lost = impl.lost("query()");
            break;
          }
          if (++empty_in_a_row >= 2) {  // the next one is not in yet: wait for it
            must_wait = true;
            break;
          }
          continue;
        }
        empty_in_a_row = 0;
        Result result(raw);
        if (PQresultStatus(raw) != PGRES_PIPELINE_SYNC) {
          // The statement's result; or an error after it, before its sync: its implicit
          // transaction failed to commit (a deferred constraint, a serialization failure), so it
          // took no effect and that error is its answer. Anything more belongs to no statement of
          // ours (a pooler mixed up server sessions).
          SentEntry& entry = sent.front();
          const auto status = PQresultStatus(raw);
          const PGresult* kept = entry.result.native_handle();
          const auto kept_status = kept != nullptr ? PQresultStatus(kept) : PGRES_FATAL_ERROR;
          const bool commit_error =
              entry.results == 1 && status == PGRES_FATAL_ERROR &&
              (kept_status == PGRES_COMMAND_OK || kept_status == PGRES_TUPLES_OK ||
               kept_status == PGRES_EMPTY_QUERY);
          if (entry.results != 0 && !commit_error) {
            lost = impl.answers_out_of_step(entry.statement ? entry.statement->sql : "query()");
            break;
          }
          // The server (or a pooler in front of it) ends the session and says why (57P01 from
          // pg_terminate_backend, a pooler's own FATAL): that is what the statements in flight
          // fail with when the connection then closes (lost() keeps it).
          if (status == PGRES_FATAL_ERROR) {
            const char* severity = PQresultErrorField(raw, PG_DIAG_SEVERITY_NONLOCALIZED);
            if (severity != nullptr && std::string_view(severity) != "ERROR") {
              (void)impl.server_error(raw, entry.statement ? entry.statement->sql : "query()");
            }
          }
          ++entry.results;
          entry.result = std::move(result);
          continue;
        }
        if (sent.front().results == 0) {  // a sync without its statement's result
          lost = impl.answers_out_of_step(sent.front().statement ? sent.front().statement->sql
                                                                 : "query()");
          break;
        }
        // The entry's sync: it is complete.
        SentEntry entry = sent.take_front();
        const PGresult* answer = entry.result.native_handle();
        const ExecStatusType status =
            answer != nullptr ? PQresultStatus(answer) : PGRES_FATAL_ERROR;
        const bool ok =
            status == PGRES_TUPLES_OK || status == PGRES_COMMAND_OK || status == PGRES_EMPTY_QUERY;
        if (entry.kind == SentEntry::Kind::deallocate) continue;  // (26000 if forgotten: fine)
        if (entry.kind == SentEntry::Kind::prepare) {
          preparing.erase(entry.key);
          if (ok) {
            impl.remember_statement(std::move(entry.key), entry.name.str());
          } else {
            // Kept for the statements already sent by its name (no later one uses it): each
            // answer of theirs gives this error instead of the server's 26000.
            const auto users = static_cast<std::size_t>(
                std::count_if(sent.begin(), sent.end(), [&](const SentEntry& waiting) {
                  return waiting.kind == SentEntry::Kind::statement && waiting.name == entry.name;
                }));
            if (users > 0) {
              FailedPrepare& failure = failed[entry.name.str()];
              failure.error = answer != nullptr ? impl.server_error(answer, "query()")
                                                : make_error_code(client_errc::protocol_error);
              failure.diagnostics = impl.last_error;
              failure.users = users;
            }
          }
          continue;
        }
        in_hand = entry.statement;
        if (impl.statement_times) impl.statement_times->record(read_at - entry.sent_at);
        SharedStatement& statement = *entry.statement;
        error_code error;
        Diagnostics diagnostics;
        bool again = false;  // it did not run: the server forgot it, or its plan went stale
        // A transaction block opened on a shared connection (refused by its first keyword: this
        // is the last line of defence, should some text still hide it from that check; no test
        // reaches it through query()): the statements sent after it run in the block, and would
        // never commit. This one fails; the connection is closed, which rolls the block
        // back, and what was sent after it fails with it.
        bool opened_block = false;
        if (ok && answer != nullptr) {
          const std::string_view tag = PQcmdStatus(const_cast<PGresult*>(answer));
          opened_block = tag == "BEGIN" || tag == "START TRANSACTION";
        }
        if (opened_block) {
          error = impl.fail(client_errc::needs_session,
                            "the statement opened a transaction block on a shared connection: "
                            "it was not committed, and the connection was closed",
                            statement.sql);
          diagnostics = impl.last_error;
          diagnostics.hint =
              "take a lease for transactions (co_await pool.acquire() or pgrt::connection())";
          lost = error;
        } else if (!ok && impl.cut_by_owner) {
          // Interrupted by the pool (close() past its grace, close_now()): interrupt() sends a
          // cancel request, then cuts the socket, and the server's 57014 for that request may be
          // read before the cut shows. The statement did not fail by itself or by its caller's
          // doing: the connection was interrupted (as exchange() and Pipeline report it), and
          // what is in flight behind it fails with it.
          error = impl.lost(statement.sql);
          diagnostics = impl.last_error;
          lost = error;
        } else if (!ok) {
          if (status == PGRES_PIPELINE_ABORTED) {
            error =
                impl.fail(client_errc::pipeline_aborted,
                          "not run: the server skipped it after an earlier error", statement.sql);
          } else {
            error = impl.server_error(answer, statement.sql);
          }
          diagnostics = impl.last_error;
          if (forgot_statement(error, diagnostics, entry.name.str())) {
            if (auto prepare = failed.find(entry.name.str()); prepare != failed.end()) {
              error = prepare->second.error;  // its preparation failed: that is its error
              diagnostics = prepare->second.diagnostics;
              diagnostics.statement = statement.sql;
            } else {
              // The server forgot the statement, so it did not run: forgotten here, and the
              // statement queued again, once (as exchange() does). Twice on one connection, or
              // twice for one statement (its second send was forgotten too, here or on another
              // connection): a transaction pooler, unnamed from now on (see below). (sent_again
              // is this connection's to change while the statement is sent on it.)
              const bool counted = impl.server_forgot_statement(entry.name.str()) &&
                                   ++impl.forgotten_statements >= 2;
              if (counted || statement.sent_again) {
                impl.use_unnamed_statements("forgot its prepared statements");
              }
              again = true;
            }
          } else if (!entry.name.empty() && is_stale_plan(answer)) {
            // Its result changed shape since it was prepared (an ALTER TABLE under a SELECT *):
            // it did not run. Prepared again (the old one deallocated before the connection
            // goes back), it is sent again, once.
            impl.retire_stale_statement(entry.name.str());
            again = true;
          }
        }
        if (!failed.empty()) {
          if (auto prepare = failed.find(entry.name.str());
              prepare != failed.end() && --prepare->second.users == 0) {
            failed.erase(prepare);
          }
        }
        std::lock_guard lock(mux->mutex);
        mux->land_locked(*link, statement);
        if (impl.one_segment_in_flight()) link->depth = 1;              // (the pooler, noticed)
        if (statement.stage != SharedStatement::Stage::sent) continue;  // given up, or timed out
        // Once this connection has noticed the pooler, any statement it did not run goes again,
        // even one sent once already: named statements sent before it noticed are forgotten
        // with no fault of their own, and unnamed ones cannot be.
        if (again && (!statement.sent_again || impl.one_segment_in_flight()) && !mux->closed) {
          statement.sent_again = true;
          statement.stage = SharedStatement::Stage::queued;
          // (Queued before its wait starts: see the requeue of a lost batch.)
          mux->queue.push_front(entry.statement);
          mux->start_wait_locked(statement);
          mux->dispatch_locked();
          continue;
        }
        if (again && mux->closed) {
          // It did not run, and nothing takes statements any more: the pool's error, not the
          // server's about pgrt's own prepared statement.
          error = make_error_code(client_errc::pool_closed);
          diagnostics = Diagnostics{
              .message =
                  "the pool closed before the statement could be sent again (the server "
                  "had not run it)",
              .statement = statement.sql};
        }
        if (diagnostics.sqlstate == "42601" && contains(diagnostics.message, "multiple commands")) {
          diagnostics.hint =
              "query() runs one statement: run several one by one, or on a lease (co_await "
              "pool.acquire() or pgrt::connection()), as a Pipeline or in a transaction";
        }
        statement.error = error;
        statement.diagnostics = std::move(diagnostics);
        if (ok && !error) statement.result = std::move(entry.result);
        mux->finish_locked(statement, answered);
      }
      in_hand.reset();
      // The callers answered run now: the first in place when it runs on this io_context (a
      // caller in a loop queues its next statement before this connection looks at the queue
      // again), the others after it, posted in order.
      Multiplexer::answer(answered);
      if (lost) {  // the connection broke, or a statement opened a transaction block on it
        // (Not one lost() closed already: it may keep a descriptor of the socket, for the pool
        // to see the server end the session, which a second close would close.)
        if (impl.conn != nullptr) impl.close(CloseMode::immediate);
        break;
      }
      if (sent.empty()) failed.clear();  // (each entry goes with its last user; this is a guard)
    }
  } catch (const std::exception& error) {
    // Nothing here should throw; if something does, the connection cannot be trusted: it is
    // closed, and what was in flight on it fails with it (never left waiting).
    spdlog::error("pgrt: a shared connection failed: {}", error.what());
    for (async::ParkedWait& wait : answered) {
      if (wait.waiting()) async::resume(wait.take(), error_code{}, false);
    }
    answered.clear();
    {
      std::lock_guard lock(mux->mutex);
      if (in_hand && !in_hand->link.expired() && in_hand->stage != SharedStatement::Stage::queued) {
        mux->land_locked(*link, *in_hand);
      }
      if (in_hand && in_hand->stage == SharedStatement::Stage::sent) {
        in_hand->error = make_error_code(client_errc::protocol_error);
        in_hand->diagnostics =
            Diagnostics{.message = std::string("the shared connection failed: ") + error.what(),
                        .statement = in_hand->sql};
        Multiplexer::finish_locked(*in_hand);
      }
      for (const auto& statement : batch) {  // taken, not yet among `sent`
        const bool was_sent = std::any_of(sent.begin(), sent.end(), [&](const SentEntry& entry) {
          return entry.statement == statement;
        });
        // (Answered already, or queued again: landed, not this link's to land again.)
        if (was_sent || statement->link.expired() ||
            statement->stage == SharedStatement::Stage::queued) {
          continue;
        }
        mux->land_locked(*link, *statement);
        if (statement->stage != SharedStatement::Stage::sent) continue;
        statement->error = make_error_code(client_errc::protocol_error);
        statement->diagnostics =
            Diagnostics{.message = std::string("the shared connection failed: ") + error.what(),
                        .statement = statement->sql};
        Multiplexer::finish_locked(*statement);
      }
    }
    if (impl_pointer != nullptr) {
      lost = impl_pointer->fail(client_errc::protocol_error,
                                std::string("the shared connection failed: ") + error.what());
      impl_pointer->close(CloseMode::immediate);
    } else {
      lost = make_error_code(client_errc::protocol_error);
    }
  }

  // Done: what is in flight on a lost connection fails with it (those not sent yet went back to
  // the queue), and the connection goes back to the pool. It takes no statement from here on:
  // statements queued meanwhile go to the other connections (woken), or to one more borrowed,
  // not to this one, whose DEALLOCATEs may take a round trip each.
  {
    std::lock_guard lock(mux->mutex);
    link->retiring = true;
    if (!mux->queue.empty()) mux->dispatch_locked();
  }
  const auto all_delivered = [&cancels_delivered] {
    return std::all_of(cancels_delivered.begin(), cancels_delivered.end(),
                       [](const auto& delivered) { return delivered->load(); });
  };
  if (!lost && impl_pointer != nullptr && !all_delivered()) {
    // A cancel request still on its way would hit the next user's statement: wait for them, at
    // most cancel_timeout, or close the connection.
    const auto give_up_at = Clock::now() + impl_pointer->options.cancel_timeout;
    asio::steady_timer pause(on_strand);
    while (!all_delivered() && Clock::now() < give_up_at) {
      pause.expires_after(std::chrono::milliseconds(1));
      co_await pause.async_wait(no_throw);
    }
    if (!all_delivered()) {
      lost = impl_pointer->fail(client_errc::cancelled,
                                "a cancel request for statements whose callers gave up was not "
                                "delivered within cancel_timeout: the connection was closed");
      impl_pointer->close(CloseMode::immediate);
    }
  }
  if (!lost && impl_pointer != nullptr && impl_pointer->conn != nullptr) {
    if (PQexitPipelineMode(impl_pointer->conn) == 0) {
      lost = impl_pointer->lost("pipeline mode");
    } else if (auto error = co_await impl_pointer->deallocate_evicted()) {
      lost = error;  // (evicted statements are deallocated before the connection goes back)
    }
  }
  {
    std::lock_guard lock(mux->mutex);
    if (lost) {
      const Diagnostics diagnostics =
          impl_pointer != nullptr ? impl_pointer->last_error
                                  : Diagnostics{.message = "the shared connection was lost"};
      for (SentEntry& entry : sent) {
        if (entry.kind != SentEntry::Kind::statement) continue;
        SharedStatement& statement = *entry.statement;
        mux->land_locked(*link, statement);
        if (statement.stage != SharedStatement::Stage::sent) continue;
        statement.error = make_error_code(client_errc::connection_lost);
        statement.diagnostics = diagnostics;
        statement.diagnostics.statement = statement.sql;
        Multiplexer::finish_locked(statement);
      }
    }
    std::erase(mux->links, link);
    if (!mux->closed) mux->dispatch_locked();
    mux->answer_unanswered_locked();  // (those close() could not post for want of memory)
  }
  abandon.disarm();
  // A connection lost or closed here goes back as broken (the pool counts it so); one still open
  // that cannot be trusted is discarded.
  if (lost && impl_pointer != nullptr && impl_pointer->conn != nullptr) {
    link->lease.discard();
  } else {
    link->lease.release();
  }
}

}  // namespace

Multiplexer::Multiplexer(const std::shared_ptr<PoolState>& pool_in,
                         const asio::any_io_executor& executor)
    : pool(pool_in),
      strand(make_compact_strand(executor)),
      connections_executor(executor),
      connections_context(asio::query(strand, asio::execution::context)),
      depth(default_depth),
      max_queued(pool_in->config.max_waiters),
      max_links(pool_in->config.max_size),
      hold_limit(pool_in->config.leak_threshold.count() > 0
                     ? std::min<std::chrono::milliseconds>(pool_in->config.leak_threshold / 2,
                                                           std::chrono::seconds(30))
                     : std::chrono::milliseconds(std::chrono::seconds(30))),
      max_wait(pool_in->config.acquire_timeout),
      sweeper(std::in_place, strand, Clock::time_point::max()) {}

void Multiplexer::start_wait_locked(SharedStatement& statement) {
  statement.wait_number = waits_started++;
  if (max_wait.count() <= 0) return;
  statement.deadline = coarse_now() + max_wait;
  // Armed already: at an earlier deadline, and it re-arms for this one when it fires.
  if (!sweeper_armed) arm_sweeper_locked(statement.deadline);
}

void Multiplexer::arm_sweeper_locked(Clock::time_point at) {
  if (!sweeper) return;  // (released: the connections were cut, nothing is held up any more)
  sweeper->expires_at(at);
  sweeper->async_wait([weak = weak_from_this()](error_code error) {
    if (error) return;  // cancelled: the multiplexer is gone or let go of
    if (const auto self = weak.lock()) self->sweep();
  });
  // (Only once its wait is under way: a wait that could not begin, for want of memory, leaves
  // it unarmed, for the next statement's wait to arm. Marked first, it was believed armed for
  // good, and no deadline was enforced again.)
  sweeper_armed = true;
}

void Multiplexer::land_locked(SharedLink& link, SharedStatement& statement) {
  --link.in_flight;
  (void)in_flight.remove(statement);  // (its connection still holds it)
  statement.link.reset();             // (landed: see run_link()'s catch)
  disarm_sweeper_if_done_locked();
}

void Multiplexer::disarm_sweeper_if_done_locked() {
  if (!closed || !sweeper_armed || !queue.empty() || !in_flight.empty()) return;
  sweeper_armed = false;
  if (sweeper) sweeper->cancel();  // (its handler sees operation_aborted: does nothing)
}

void Multiplexer::sweep() {
  // While every connect of the pool fails and none of its connections is alive, a statement that
  // no connection took fails as an acquire() would (PoolState::timeout_error_locked()): with the
  // last connect error, and its code where acquire() gives it, not a busy pool's advice. Its own
  // deadline comes before its borrow's acquire gives up (that one began later), so the borrow's
  // error (borrow()) does not reach it. (Read first: the pool's lock is never taken under ours.)
  std::optional<Error> connects_fail;
  if (const std::shared_ptr<PoolState> owner = pool.lock()) {
    connects_fail = owner->connects_failing_error(max_wait);
  }
  std::lock_guard lock(mutex);
  sweeper_armed = false;
  // (A connection borrowed meanwhile that takes statements: they wait no longer for a connect.)
  if (connects_fail && !std::all_of(links.begin(), links.end(),
                                    [](const auto& held) { return held->drained_for_good(); })) {
    connects_fail.reset();
  }
  // (Closed: what was queued failed, but statements held up behind others on their connections
  // keep their bound while those drain.)
  const auto now = Clock::now();  // (precise: the timer fired at the deadline by this clock)
  Clock::time_point next = Clock::time_point::max();
  // A statement sent behind another on its connection waits for that one to end: one that runs
  // long, or waits for a lock that the caller of a statement behind it holds (a lease holder's
  // query() behind a statement blocked on its row lock: a deadlock the server cannot see), would
  // hold it for good. Past its deadline it fails with timeout, as a queued one would, and its
  // answer is dropped when it comes; its connection takes no new statement, and sends a cancel
  // request once nothing in flight there is awaited (run_link()). The head runs: its time is
  // its own (statement_timeout).
  std::vector<const SharedLink*> heads_seen;
  in_flight.for_each([&](SharedStatement& statement) {
    const std::shared_ptr<SharedLink> link = statement.link.lock();
    if (!link) return;
    if (std::find(heads_seen.begin(), heads_seen.end(), link.get()) == heads_seen.end()) {
      heads_seen.push_back(link.get());
      return;
    }
    if (statement.stage != SharedStatement::Stage::sent) return;
    if (statement.deadline > now) {
      next = std::min(next, statement.deadline);
      return;
    }
    statement.error = make_error_code(client_errc::timeout);
    statement.diagnostics = Diagnostics{
        .message =
            "the statement was sent on a shared connection behind another caller's "
            "statement that did not end within PoolConfig::acquire_timeout (" +
            std::to_string(max_wait.count()) +
            " ms); it may still run when that one ends (its answer will be dropped)",
        .hint =
            "a statement that holds the others up runs long or waits for a lock: bound it "
            "with statement_timeout, run slow statements through a lease, and do not wait "
            "in query() for a statement while holding a lease whose locks it may need",
        .statement = statement.sql};
    finish_locked(statement);
    link->retiring = true;
    link->rotating = false;
    wake_locked(link);
  });
  queue.remove_if([&](SharedStatement& statement) {
    if (statement.deadline > now) {
      next = std::min(next, statement.deadline);
      return false;
    }
    if (connects_fail) {
      statement.error = connects_fail->code();
      statement.diagnostics = connects_fail->diagnostics();
      statement.diagnostics.statement = statement.sql;
      finish_locked(statement);
      return true;
    }
    statement.error = make_error_code(client_errc::pool_timeout);
    statement.diagnostics = Diagnostics{.message =
                                            "no connection could run the statement within "
                                            "PoolConfig::acquire_timeout (" +
                                            std::to_string(max_wait.count()) + " ms)",
                                        .hint =
                                            "raise acquire_timeout or max_size, or shed load; "
                                            "Pool::stats() says what holds the connections",
                                        .statement = statement.sql};
    finish_locked(statement);
    return true;
  });
  if (next == Clock::time_point::max()) return;
  try {
    arm_sweeper_locked(next);
  } catch (const std::exception&) {
    // (No memory for the wait, in the timer's handler, which must not throw: left unarmed, the
    // next statement whose wait starts arms it, and its sweep fails these too once past due.)
  }
}

bool Multiplexer::accepted_before_locked(const std::string& sql) const {
  return accepted_texts.contains(sql);
}

void Multiplexer::remember_accepted_locked(const std::string& sql) {
  if (sql.size() > max_accepted_text_size) return;
  if (accepted_texts.size() >= max_accepted_texts) accepted_texts.clear();
  accepted_texts.insert(sql);
}

void Multiplexer::enqueue_locked(const std::shared_ptr<SharedStatement>& statement) {
  if (closed) {
    throw Error(make_error_code(client_errc::pool_closed),
                Diagnostics{.message = "the pool is closed", .statement = statement->sql});
  }
  if (max_queued > 0 && queue.size() >= max_queued) {
    throw Error(make_error_code(client_errc::pool_queue_full),
                Diagnostics{.message = "the pool already has " + std::to_string(queue.size()) +
                                       " statements of query() waiting for a connection",
                            .hint = "raise PoolConfig::max_waiters, or shed load earlier",
                            .statement = statement->sql});
  }
  start_wait_locked(*statement);
  queue.push_back(statement);
  try {
    dispatch_locked();
  } catch (...) {
    // (A wake or a borrow that could not be posted, for want of memory: the statement leaves the
    // queue, and its caller gets the failure. Left queued, it ran later for a caller told it
    // had failed.)
    (void)queue.remove(*statement);
    throw;
  }
}

std::size_t Multiplexer::even_share_locked() const {
  // What is queued and in flight, spread evenly over the connections that take statements and
  // those the pool may still lend: a burst waits a moment for a connection being borrowed rather
  // than queueing behind the statements of another (a slow one would hold up all behind it).
  std::size_t outstanding = queue.size();
  std::size_t taking = 0;
  for (const auto& held : links) {
    if (held->retiring) continue;
    ++taking;
    outstanding += held->in_flight;
  }
  // (The pool lends only what it has: with the other connections leased, the ones held take
  // all, up to their depth, rather than waiting for a borrow that would have to wait too.)
  const std::size_t held = links.size() + borrowing;
  const std::size_t more = held < max_links ? std::min(lendable, max_links - held) : 0;
  const std::size_t could_take = std::max<std::size_t>(taking + borrowing + more, 1);
  return std::max<std::size_t>((outstanding + could_take - 1) / could_take, 1);
}

std::size_t Multiplexer::share_locked(const SharedLink& link) const {
  return std::min(link.depth, even_share_locked());
}

void Multiplexer::dispatch_locked() {
  // The connection with the fewest in flight that has room takes what is queued; if every one is
  // busy, one more is borrowed.
  const std::size_t even = even_share_locked();
  const std::shared_ptr<SharedLink>* least = nullptr;
  for (const auto& link : links) {
    if (link->retiring || link->in_flight >= std::min(link->depth, even)) continue;
    if (least == nullptr || link->in_flight < (*least)->in_flight) least = &link;
  }
  if (least != nullptr) wake_locked(*least);
  grow_locked();
}

void Multiplexer::grow_locked() {
  if (closed || queue.empty()) return;
  if (borrowing > 0) return;  // one at a time
  if (links.size() >= max_links) {
    // Every connection the pool may have is held here: one more cannot be borrowed, and the
    // statements wait for one of them (at most acquire_timeout). With acquire_timeout 0 they do
    // not wait for one that drains to go back: when none takes statements any more, a borrow is
    // made all the same, which the pool refuses at once, as it would refuse acquire() (every
    // connection in use), and its refusal fails them (borrow()). One given back only because it
    // was held long (SharedLink::rotating) is borrowed again once drained: they wait for it.
    const bool none_takes = std::all_of(links.begin(), links.end(),
                                        [](const auto& link) { return link->drained_for_good(); });
    if (max_wait.count() > 0 || !none_takes) return;
  }
  // Nothing to lend (the rest leased, as the connections last read the pool) while a connection
  // held has room in its pipeline: a borrow would only wait, counted as a caller waiting and
  // timing out, while the statements can go there (it is woken, and reads the pool again). With
  // no room anywhere (full pipelines; one statement at a time behind a pooler), it borrows,
  // however stale that reading: it waits like any acquire, and its failure fails the queued
  // statements.
  const bool one_has_room = std::any_of(links.begin(), links.end(), [](const auto& link) {
    return !link->retiring && link->in_flight < link->depth;
  });
  if (one_has_room && lendable == 0) return;
  const bool all_busy = std::all_of(links.begin(), links.end(), [](const auto& link) {
    return link->in_flight > 0 || link->retiring;
  });
  if (!all_busy) return;
  // Later, never inline: the acquire takes the pool's lock, which is never taken under ours.
  // (Counted once posted: a post that fails for want of memory leaves no borrow counted that
  // never comes. The borrow takes our mutex before it counts itself done.) On a strand of its
  // own, which the connection keeps: a caller that its answer resumes in place (Multiplexer::
  // answer()) runs on that strand until its next wait, and must not hold up the other
  // connections, and their callers, on an io_context that several threads run.
  const asio::any_io_executor own_strand = make_compact_strand(connections_executor);
  asio::post(own_strand, [self = shared_from_this(), on = own_strand] {
    asio::co_spawn(on, borrow(self), asio::detached);
  });
  ++borrowing;
  borrow_covers = waits_started;
}

void Multiplexer::wake_locked(const std::shared_ptr<SharedLink>& link) {
  // (Released: the connections were cut, and their waits end with the cut.)
  if (!link->waiting || link->wake_posted || !strand || !link->strand) return;
  // (Marked once posted, which the handler cannot see before: it takes the mutex, held here. A
  // post that fails for want of memory leaves it unmarked, for the next wake to post.)
  asio::post(link->strand, [self = shared_from_this(), link] {
    // On the strand, like the connection's coroutine: its wait for the socket is cancelled if it
    // still waits for it (not a later wait of another kind, such as a flush's).
    const std::lock_guard lock(self->mutex);
    if (!link->waiting || !link->wake_posted) return;
    if (link->lease) {
      if (Connection::Impl* impl = ConnectionAccess::impl_of(*link->lease)) {
        error_code ignored;
        impl->socket.cancel(ignored);
      }
    }
  });
  link->wake_posted = true;
}

void Multiplexer::finish_locked(SharedStatement& statement) {
  statement.stage = SharedStatement::Stage::done;
  if (statement.wait.waiting()) async::resume(statement.wait.take(), error_code{}, false);
}

void Multiplexer::finish_locked(SharedStatement& statement,
                                std::vector<async::ParkedWait>& answered) {
  statement.stage = SharedStatement::Stage::done;
  if (!statement.wait.waiting()) return;
  if (!statement.wait.resumable_in_place) {
    async::resume(statement.wait.take(), error_code{}, false);
    return;
  }
  // Room in `answered` first, the wait still in the statement: a push that failed for want of
  // memory destroyed the wait it had taken, and with it the caller's coroutine, never resumed.
  if (answered.size() == answered.capacity()) {
    try {
      answered.reserve(std::max<std::size_t>(2 * answered.size(), 4));
    } catch (const std::exception&) {
      // Answered by a notice instead, as a closed pool's statements are (answer_unanswered_
      // locked()): the wait stays parked until the notice runs, posted again later if it
      // cannot be posted now.
      statement.unanswered = true;
      unanswered.push_back(statement.shared_from_this());
      answer_unanswered_locked();
      return;
    }
  }
  answered.push_back(statement.wait.take());  // (room reserved: no allocation)
}

void Multiplexer::answer(std::vector<async::ParkedWait>& answered) {
  for (std::size_t i = 0; i < answered.size(); ++i) {
    async::resume(answered[i].take(), error_code{}, i == 0);
  }
  answered.clear();
}

void Multiplexer::release_waits_of(asio::execution_context& context) {
  // (Each caller's unwinding is posted by asio to its io_context, whose shutdown destroys it:
  // run_shared()'s AbandonGuard takes the mutex.)
  async::release_waits_on(
      context, mutex,
      [this](const auto& visit) {
        const auto visit_statement = [&](SharedStatement& statement) { visit(statement.wait); };
        queue.for_each(visit_statement);
        in_flight.for_each(visit_statement);
        unanswered.for_each(visit_statement);
      },
      [this, &context] { std::erase(watched_contexts, &context); });
}

void Multiplexer::withdraw_locked(SharedStatement& statement) {
  queue.remove(statement);
}

void Multiplexer::evict_links() {
  std::lock_guard lock(mutex);
  if (closed) return;
  for (const auto& link : links) {
    link->retiring = true;
    link->rotating = false;
  }
  // The eviction is done: what follows only hastens it, and may fail for want of memory without
  // undoing it (a connection not woken sees it once its statements in flight are answered; what
  // is queued goes once a connection next dispatches, or fails at its deadline).
  try {
    for (const auto& link : links) {
      try {
        wake_locked(link);
      } catch (const std::exception&) {
        link->wake_posted = false;
      }
    }
    if (!queue.empty()) dispatch_locked();
  } catch (const std::exception&) {
    // (No memory for a borrow: see above.)
  }
}

void Multiplexer::answer_unanswered_locked() noexcept {
  bool out_of_memory = false;
  unanswered.for_each([&](SharedStatement& statement) {
    if (out_of_memory || statement.resumption_posted) return;
    if (!statement.wait.waiting()) return;  // (its caller was cancelled: it leaves on its own)
    try {
      // Only references: if the post fails, or the notice is destroyed unrun (its executor gone),
      // the caller's handler is still in its wait, for a later notice or its context's shutdown.
      asio::post(statement.wait.executor,
                 [self = shared_from_this(), held = statement.held_by_queue] {
                   std::optional<async::ParkedWait> taken;
                   {
                     const std::lock_guard relock(self->mutex);
                     if (held->unanswered) {
                       held->unanswered = false;
                       (void)self->unanswered.remove(*held);
                     }
                     if (held->wait.waiting()) taken.emplace(held->wait.take());
                   }
                   // (On the caller's own executor: resumed in place, nothing posted.)
                   if (taken) async::resume(std::move(*taken), error_code{}, true);
                 });
      statement.resumption_posted = true;
    } catch (const std::exception&) {
      out_of_memory = true;  // (tried again by the next call)
    }
  });
}

void Multiplexer::close() {
  std::lock_guard lock(mutex);
  if (closed) return;
  closed = true;
  // Each queued statement fails with pool_closed: its caller builds the message (run_shared()),
  // not this close, which must not fail midway (the statements after it would wait on).
  while (!queue.empty()) {
    std::shared_ptr<SharedStatement> statement = queue.pop_front();
    statement->error = make_error_code(client_errc::pool_closed);
    statement->stage = SharedStatement::Stage::done;
    statement->unanswered = true;
    unanswered.push_back(std::move(statement));
  }
  answer_unanswered_locked();
  disarm_sweeper_if_done_locked();
  for (const auto& link : links) {
    try {
      wake_locked(link);
    } catch (const std::exception&) {
      // (No memory for the wake: the connection sees the close once its statements in flight
      // are answered, as it drains anyway.)
      link->wake_posted = false;
    }
  }
}

void Multiplexer::release_io() {
  std::optional<asio::steady_timer> timer;
  asio::any_io_executor on;
  asio::any_io_executor beneath;
  {
    std::lock_guard lock(mutex);
    timer.swap(sweeper);
    sweeper_armed = false;
    std::swap(on, strand);
    std::swap(beneath, connections_executor);
    answer_unanswered_locked();  // (those close() could not post for want of memory)
  }
  // (Destroyed here, unlocked: the timer's wait ends cancelled, and its handler holds nothing.)
}

asio::awaitable<Result> run_shared(std::shared_ptr<PoolState> pool,
                                   std::shared_ptr<SharedStatement> statement) {
  statement->params.check();
  check_statement_text(statement->sql);
  const auto executor = co_await asio::this_coro::executor;
  std::shared_ptr<Multiplexer> mux = pool->multiplexer_for(executor);
  asio::execution_context& context = asio::query(executor, asio::execution::context);
  std::shared_ptr<SharedLink> held_up;
  std::unique_lock lock(mux->mutex);
  if (!mux->accepted_before_locked(statement->sql)) {
    lock.unlock();
    refuse_if_it_needs_a_session(statement->sql);
    lock.lock();
    mux->remember_accepted_locked(statement->sql);
  }
  if (std::find(mux->watched_contexts.begin(), mux->watched_contexts.end(), &context) ==
      mux->watched_contexts.end()) {
    lock.unlock();  // (asio's service registry takes a lock of its own)
    asio::use_service<async::ParkedWaitWatch>(context).watch(mux);
    lock.lock();
    mux->watched_contexts.push_back(&context);
  }
  mux->enqueue_locked(statement);
  // If this coroutine is destroyed while it waits (its io_context shut down), the statement
  // leaves the queue, or its answer is dropped when it comes.
  async::AbandonGuard abandon([&mux, &statement, &lock] {
    std::unique_lock relock(mux->mutex, std::defer_lock);
    if (!lock.owns_lock()) relock.lock();
    if (statement->stage == SharedStatement::Stage::queued) mux->withdraw_locked(*statement);
    if (statement->stage != SharedStatement::Stage::done) {
      statement->stage = SharedStatement::Stage::abandoned;
    }
    if (statement->unanswered) {
      statement->unanswered = false;
      (void)mux->unanswered.remove(*statement);
    }
  });
  // The wait has no expiry of its own: the multiplexer's sweeper fails a statement queued past
  // its deadline (finish_locked ends the wait), and a sent one waits for its answer.
  for (;;) {
    // A cancellation recorded while this coroutine was not waiting (its wait had just ended)
    // is taken as one that ended the wait: asio would otherwise throw operation_aborted at the
    // co_await below, bypassing what a cancellation does here.
    error_code error = asio::error::operation_aborted;
    const asio::cancellation_state cancellation = co_await asio::this_coro::cancellation_state;
    if (cancellation.cancelled() == asio::cancellation_type::none) {
      // Resumed in place by the connection that reads its answer only when it runs on the
      // connections' own io_context, with its plain executor (not a strand of its own).
      const bool beside_connections = &context == &mux->connections_context &&
                                      executor.target<asio::io_context::executor_type>() != nullptr;
      const auto [waited] =
          co_await async::park_then_unlock(lock, statement->wait, executor, beside_connections);
      lock = std::unique_lock(mux->mutex);
      error = waited;
    }
    if (statement->stage == SharedStatement::Stage::done) break;
    if (!error) continue;  // (an answer ends it only once the statement is done: not reached)
    // The caller cancelled: a queued statement leaves the queue; a sent one's answer is dropped
    // when it comes, and its connection, held up by it, takes no new statement: it drains and
    // goes back to the pool. No cancel request for it alone (it could hit the statement of
    // another caller): the connection sends one once every statement in flight there is given
    // up.
    // (Whether it was sent is the caller's to know: a write sent may have run, one not sent did
    // not, and only the one not sent can be run again without a check.)
    const bool was_sent = statement->stage == SharedStatement::Stage::sent;
    if (statement->stage == SharedStatement::Stage::queued) mux->withdraw_locked(*statement);
    if (was_sent) {
      held_up = statement->link.lock();  // (dropped after the lock: never the last under it)
      if (held_up) {
        held_up->retiring = true;
        held_up->rotating = false;
        mux->wake_locked(held_up);  // (to cancel, if every statement in flight there is given up)
      }
    }
    statement->stage = SharedStatement::Stage::abandoned;
    abandon.disarm();
    throw Error(
        make_error_code(client_errc::cancelled),
        was_sent
            ? Diagnostics{.message = "the statement was cancelled after it was sent: it may have "
                                     "run on the server, and its answer is dropped",
                          .hint = "check whether it ran before you run it again",
                          .statement = statement->sql}
            : Diagnostics{.message = "the statement was cancelled before it was sent: it did not "
                                     "run",
                          .statement = statement->sql});
  }
  abandon.disarm();
  if (statement->unanswered) {  // (failed by close(), and resumed otherwise: cancelled)
    statement->unanswered = false;
    (void)mux->unanswered.remove(*statement);
  }
  lock.unlock();
  if (statement->error == client_errc::pool_closed && statement->diagnostics.message.empty()) {
    // (Failed by close(), which builds no message: see Multiplexer::unanswered.)
    statement->diagnostics.message = "the pool closed before the statement was sent";
    statement->diagnostics.statement = statement->sql;
  }
  if (statement->error) throw Error(statement->error, std::move(statement->diagnostics));
  co_return std::move(statement->result);
}

}  // namespace pgrt::detail
