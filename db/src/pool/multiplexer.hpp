#pragma once

// Statements without an exclusive lease (Pool::query(), pgrt::query()). The multiplexer borrows
// connections from its pool through ordinary leases (so the pool's strict max, FIFO and
// accounting hold for both paths), and on each runs the statements of many callers at once in
// libpq's pipeline mode: one writer and reader per connection (a coroutine on a strand of its
// own), each statement in a sync segment of its own (an error fails only its caller), prepared
// once per connection from the connection's statement cache. Statements wait in one queue; a
// connection takes what is queued when it has room (its even share of what is queued and in
// flight over the connections it holds or may still borrow, at most `depth`), and a new one is
// borrowed while every borrowed one has statements in flight. A connection is given back once it
// has nothing in flight and nothing is queued, or, draining first, when callers wait for a lease,
// when it has been held for a while (leak reports, lifetime) and when the pool closes.
//
// Threading: callers (any thread) and the connections' coroutines meet under `mutex`. A caller
// waits for its answer as an asynchronous operation of its own (async::ParkedWait,
// async/parked_wait.hpp), started and ended under the mutex. The connection that reads answers
// resumes the first of their callers in place when that caller runs on the connections' own
// io_context (no trip through the io_context's queue, and no look at the reactor before the
// caller's next statement is queued); it posts the others' resumptions, in order. The caller
// resumed in place runs on that connection's strand until its next wait: it holds up that
// connection alone, each connection having a strand of its own. Each connection's libpq state is
// touched only by its coroutine, on its strand.

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/execution_context.hpp>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "../async/parked_wait.hpp"
#include "driver.hpp"
#include "intrusive_list.hpp"

namespace pgrt::detail {

struct SharedLink;

// One query() call, shared by its caller and the connection that runs it. Every field is
// changed under Multiplexer::mutex once the statement is queued.
struct SharedStatement : std::enable_shared_from_this<SharedStatement> {
  SharedStatement(std::string sql_in, ParamSink params_in)
      : sql(std::move(sql_in)), params(std::move(params_in)) {}
  std::string sql;
  ParamSink params;
  const Clock::time_point queued_at = coarse_now();  // (PoolStats::longest_wait)
  // When its wait ends (acquire_timeout, counted again from a requeue; max when it waits without
  // a bound, acquire_timeout 0): queued, it fails with pool_timeout; sent, but held up behind
  // another caller's statement on its connection, with timeout (Multiplexer::sweep()).
  Clock::time_point deadline = Clock::time_point::max();
  // The order its wait for a connection started in (Multiplexer::waits_started, taken again at a
  // requeue): a borrow that fails fails only the statements that waited since before it began.
  std::uint64_t wait_number = 0;
  enum class Stage { queued, sent, done, abandoned };
  Stage stage = Stage::queued;
  async::ParkedWait wait;   // the caller's, while it waits for its answer
  bool sent_again = false;  // queued again once (the server forgot its statement)
  // Done (failed by close(), or answered while memory ran out) and in Multiplexer::unanswered,
  // its caller's resumption still to run; and whether that resumption is posted (not yet: its
  // post failed for want of memory).
  bool unanswered = false;
  bool resumption_posted = false;
  // While queued or in flight (a StatementQueue: Multiplexer::queue, Multiplexer::in_flight):
  // its neighbours, and the queue's reference to it.
  SharedStatement* prev = nullptr;
  SharedStatement* next = nullptr;
  std::shared_ptr<SharedStatement> held_by_queue;
  std::weak_ptr<SharedLink> link;  // the connection it was sent on
  error_code error;
  Diagnostics diagnostics;
  Result result;
};

// The statements waiting for a connection, oldest first (a statement sent again goes to the
// front). The queue keeps each statement alive while it is in it. Taking one out from anywhere (a
// cancelled caller's) is O(1): a storm of cancellations over a long queue costs each caller only
// its own removal, not a search of the queue. Under Multiplexer::mutex.
class StatementQueue {
 public:
  StatementQueue() = default;
  StatementQueue(const StatementQueue&) = delete;
  StatementQueue& operator=(const StatementQueue&) = delete;
  StatementQueue(StatementQueue&&) = delete;
  StatementQueue& operator=(StatementQueue&&) = delete;
  ~StatementQueue() { clear(); }

  [[nodiscard]] bool empty() const noexcept { return list_.empty(); }
  [[nodiscard]] std::size_t size() const noexcept { return list_.size(); }

  void push_back(std::shared_ptr<SharedStatement> statement) noexcept {
    SharedStatement& queued = *statement;
    queued.held_by_queue = std::move(statement);
    list_.push_back(queued);
  }
  void push_front(std::shared_ptr<SharedStatement> statement) noexcept {
    SharedStatement& queued = *statement;
    queued.held_by_queue = std::move(statement);
    list_.push_front(queued);
  }
  // The oldest statement, taken out; the queue must not be empty.
  [[nodiscard]] std::shared_ptr<SharedStatement> pop_front() noexcept {
    return remove(*list_.front());
  }
  // Takes `statement` out, if it is queued, and hands over the queue's reference to it (empty
  // when it was not queued).
  std::shared_ptr<SharedStatement> remove(SharedStatement& statement) noexcept {
    if (!statement.held_by_queue) return nullptr;
    list_.remove(statement);
    return std::move(statement.held_by_queue);
  }
  // Calls `take(SharedStatement&)` on each statement, front to back, and takes out those it
  // returns true for.
  template <typename Take>
  void remove_if(Take&& take) {
    list_.for_each([&](SharedStatement& statement) {
      if (take(statement)) (void)remove(statement);  // (released here: the list is past it)
    });
  }
  template <typename Visit>
  void for_each(Visit&& visit) {
    list_.for_each([&](SharedStatement& statement) { visit(statement); });
  }
  template <typename Visit>
  void for_each(Visit&& visit) const {
    list_.for_each([&](const SharedStatement& statement) { visit(statement); });
  }
  void clear() noexcept {
    while (!list_.empty()) (void)pop_front();
  }

 private:
  pool::IntrusiveList<SharedStatement> list_;
};

// A connection the multiplexer borrowed.
struct SharedLink {
  explicit SharedLink(Lease lease_in) : lease(std::move(lease_in)) {}
  Lease lease;
  const Clock::time_point borrowed = coarse_now();
  // Under Multiplexer::mutex:
  std::size_t in_flight = 0;  // statements sent and not answered
  bool waiting = false;       // its coroutine waits for the socket (a wake cancels that wait)
  bool wake_posted = false;
  bool retiring = false;  // takes no new statement; given back once drained
  // Retiring only because it was held past Multiplexer::hold_limit, with no caller waiting for a
  // lease and not due back: it goes back to be borrowed again, so the statements wait for it,
  // also with acquire_timeout 0 (they do not fail as for a connection drained for good).
  bool rotating = false;
  // Takes no new statement, and is not given back only to be borrowed again.
  [[nodiscard]] bool drained_for_good() const noexcept { return retiring && !rotating; }
  // Statements it takes in flight: Multiplexer::depth, or one behind a transaction pooler
  // (Connection::Impl::one_segment_in_flight()).
  std::size_t depth = 1;
  // The strand its coroutine runs on, a strand of its own (wakes are posted there); set once, as
  // it is borrowed.
  asio::any_io_executor strand;
};

struct Multiplexer : std::enable_shared_from_this<Multiplexer>, async::ParkedWaitOwner {
  Multiplexer(const std::shared_ptr<PoolState>& pool_in, const asio::any_io_executor& executor);

  std::weak_ptr<PoolState> pool;
  // The sweeper's and the borrows' (make_compact_strand()). Each connection borrowed runs on a
  // strand of its own (SharedLink::strand), so that a caller resumed in place by one connection
  // holds up that connection only, not every other one with it.
  asio::any_io_executor strand;
  asio::any_io_executor connections_executor;    // the pool's: what the strands are made over
  asio::execution_context& connections_context;  // the strand's: the pool's io_context
  const std::size_t depth;                       // statements in flight per connection
  const std::size_t max_queued;                  // PoolConfig::max_waiters
  const std::size_t max_links;                   // PoolConfig::max_size
  const std::chrono::milliseconds hold_limit;
  const std::chrono::milliseconds max_wait;  // PoolConfig::acquire_timeout (0: no bound)

  std::mutex mutex;
  // One timer for every queued statement's deadline (a caller's own timer waits without an
  // expiry: arming one per statement would cost a timerfd_settime each whenever it is the
  // reactor's earliest). Armed at the earliest deadline when a statement is queued and it is not
  // armed yet; fails the statements past their deadline when it fires.
  // (Empty, as is `strand`, once release_io() let go of the pool's io_context.)
  std::optional<asio::steady_timer> sweeper;
  bool sweeper_armed = false;
  StatementQueue queue;
  // Every statement sent and not yet answered (or given up and not yet read back), over all the
  // connections, in the order sent: the first of a connection's is its head, which runs; those
  // behind it wait for it (sweep()).
  StatementQueue in_flight;
  // The statements close() failed, until their callers' resumptions have run: close() builds
  // nothing for them (no message, no handler that could fail to allocate and take the caller's
  // wait with it); it posts for each a notice that holds only references, which resumes the
  // caller in place on its own executor. A notice that cannot be posted (no memory) is posted
  // again later (answer_unanswered_locked()): the caller's wait stays parked meanwhile, never lost.
  // So are the statements a connection answered while memory ran out (finish_locked()).
  StatementQueue unanswered;
  std::vector<std::shared_ptr<SharedLink>> links;
  std::size_t borrowing = 0;  // acquires under way
  // How many statement waits have started (SharedStatement::wait_number); and how many had when
  // the borrow under way began: its failure fails those still queued, not the ones queued since,
  // whose acquire_timeout has not run out (they get a borrow of their own).
  std::uint64_t waits_started = 0;
  std::uint64_t borrow_covers = 0;
  // How many more connections the pool could lend now, as its connections last read it
  // (PoolState's Core::lendable()): the even share counts those, not the pool's whole max.
  std::size_t lendable = std::numeric_limits<std::size_t>::max();
  bool closed = false;
  // Statement texts query() has checked and found fit for a shared connection
  // (needs_own_session()): a service sends the same few texts again and again, and looking one up
  // costs less than reading it again. At most max_accepted_texts (then emptied: a service that
  // makes a new text per call gains nothing from it anyway).
  std::unordered_set<std::string> accepted_texts;
  static constexpr std::size_t max_accepted_texts = 1024;
  static constexpr std::size_t max_accepted_text_size = 4096;

  // The execution contexts whose shutdown ends the waits of this multiplexer's callers on them
  // (async::ParkedWaitWatch), once one of them waited.
  std::vector<asio::execution_context*> watched_contexts;

  // Whether `sql` was found fit for a shared connection before.
  [[nodiscard]] bool accepted_before_locked(const std::string& sql) const;
  // Remembers that `sql` is fit for a shared connection.
  void remember_accepted_locked(const std::string& sql);

  // Queues `statement` for its caller; throws pool_closed or pool_queue_full. Wakes a connection
  // with room, or borrows one more. On a throw (std::bad_alloc included), it is not queued.
  void enqueue_locked(const std::shared_ptr<SharedStatement>& statement);
  // The statement is answered (or failed): its caller's resumption is posted, unless it has gone.
  static void finish_locked(SharedStatement& statement);
  // The same, from a connection's coroutine: the wait of a caller on the connections' own
  // io_context is kept in `answered`, for answer() once the mutex is released; any other is
  // posted now (under the mutex, so that its io_context cannot be shutting down meanwhile:
  // async::ParkedWaitWatch's shutdown takes the mutex). With no memory to keep it in `answered`,
  // it goes to `unanswered` (its wait parked, never lost). `statement` is held by a shared_ptr.
  void finish_locked(SharedStatement& statement, std::vector<async::ParkedWait>& answered);
  // Resumes the callers of `answered` (empties it), from a connection's coroutine, in the order
  // they were answered: the first in place, the others posted after it (on an io_context that
  // several threads run, callers resumed in place would all run one after another on this
  // connection's strand). Not under the mutex: a caller resumed in place runs on until its next
  // wait, and may queue its next statement meanwhile.
  static void answer(std::vector<async::ParkedWait>& answered);
  // `context` shuts down: the waits of callers on it are destroyed (async::ParkedWaitWatch).
  void release_waits_of(asio::execution_context& context) override;
  // Starts (again) the statement's wait for a connection: sets its deadline, arms the sweeper.
  void start_wait_locked(SharedStatement& statement);
  // Arms the sweeper to fire at `at`. Marks it armed only once its wait is under way: on a throw
  // (std::bad_alloc), it is left unarmed.
  void arm_sweeper_locked(Clock::time_point at);
  // Fails the queued statements past their deadline with pool_timeout, and the sent ones that
  // are still held up behind another statement of their connection with timeout (their
  // connection then takes no new statement); re-arms for the rest.
  void sweep();
  // `statement`, sent on `link`, is answered or failed there: no longer in flight.
  void land_locked(SharedLink& link, SharedStatement& statement);
  // Closed, with nothing queued or in flight: the sweeper's wait (up to acquire_timeout away) is
  // cancelled, so that it does not keep the pool's io_context running after the close.
  void disarm_sweeper_if_done_locked();
  // Takes `statement` out of the queue (its caller gave up).
  void withdraw_locked(SharedStatement& statement);
  // How many statements `link` may have in flight now: what is queued and in flight, split evenly
  // over the connections that take statements and those the pool can still lend now (up to
  // max_links), at most its depth, at least one.
  [[nodiscard]] std::size_t share_locked(const SharedLink& link) const;
  // The same before the depth: the even split alone.
  [[nodiscard]] std::size_t even_share_locked() const;
  // Wakes the connection with the fewest in flight that has room under its share, and borrows one
  // more when every one is busy.
  void dispatch_locked();
  // Borrows one more connection when statements wait and every borrowed one is busy.
  void grow_locked();
  // Cancels a connection's wait for its socket, so that it takes the newly queued statements.
  void wake_locked(const std::shared_ptr<SharedLink>& link);
  // Pool::evict_all(): every connection held now takes no new statement from here on (also one
  // given back only to be borrowed again: it goes for good), and is woken, so that what is queued
  // goes to a new connection, or fails as the pool's acquire would, at once rather than when the
  // connection next looks at the pool. Thread-safe (under the pool's lock: ours is taken under it).
  // Never throws (std::system_error from the mutex aside): the connections are marked first; a
  // wake or a borrow that cannot be posted for want of memory is left out (the connection sees
  // the eviction once its statements in flight are answered).
  void evict_links();
  // Posts the notice of each statement in `unanswered` not posted yet; stops at the first that
  // cannot be (no memory), to be tried again by the next call (close(), each connection's end,
  // release_io()). Never throws.
  void answer_unanswered_locked() noexcept;
  // The pool is closing: queued statements fail with pool_closed, the connections drain and go
  // back. Thread-safe. Allocates nothing that could leave it half done: it never throws
  // (std::system_error from the mutex aside).
  void close();
  // The pool lets go of the multiplexer, its close done: the strand and the sweeper (objects of
  // the pool's io_context) go now, so that a caller on another io_context that holds the
  // multiplexer longer (its answer came during the close, its resumption runs later) never
  // touches the pool's io_context, which may be gone by then. Thread-safe.
  void release_io();
};

// Pool::query(): see pool.hpp.
// `statement` is the caller's, fresh (made by Pool::query_with(), not a coroutine): the frame
// holds a pointer to it rather than the text and parameters, so that it stays within asio's
// recycled frames (at most 1020 bytes with g++ 12 and Boost 1.81; a larger frame costs an
// aligned allocation per statement and evicts the cached frame of the connection's next flush).
asio::awaitable<Result> run_shared(std::shared_ptr<PoolState> pool,
                                   std::shared_ptr<SharedStatement> statement);

}  // namespace pgrt::detail
