#pragma once

// The pool's driver, the asio/libpq side of the pool: detail::PoolState holds the sans-I/O core
// (state_machine.hpp) under one mutex, feeds it events and carries out its actions (driver.cpp).
// Private to the pool: the public types are in pgrt/db/pool.hpp. Built on it: pool.cpp (Pool),
// lease.cpp (Lease), shutdown.cpp (closing, in order) and process_pool.cpp (pgrt::configure(),
// pgrt::connection()).

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cerrno>
#include <ctime>
#include <fcntl.h>
#include <functional>
#include <initializer_list>
#include <libpq-fe.h>
#include <mutex>
#include <optional>
#include <random>
#include <spdlog/spdlog.h>
#include <string>
#include <sys/socket.h>
#include <tuple>
#include <unistd.h>

#include "../async/abandon_guard.hpp"
#include "../async/parked_wait.hpp"
#include "../async/timer_condition.hpp"
#include "../connection_access.hpp"
#include "../timing_clock.hpp"
#include "budget.hpp"
#include "pgrt/db/pool.hpp"
#include "pgrt/db/session_guards.hpp"
#include "pgrt/runtime/identity.hpp"
#include "state_machine.hpp"

namespace pgrt::detail {

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;
using boost::system::error_code;

// The time for the pool's coarse decisions (lifetime, idle age, lease age) on the acquire and
// release paths: CLOCK_MONOTONIC_COARSE, the timeline of steady_clock (CLOCK_MONOTONIC in
// libstdc++ on Linux) as of the last kernel tick, a few milliseconds behind at most. It is a plain
// read from the vDSO, several times cheaper than steady_clock::now(), which the uncontended
// acquire would otherwise pay twice. Waits are measured with steady_clock.
inline Clock::time_point coarse_now() noexcept {
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
  return Clock::time_point(std::chrono::duration_cast<Clock::duration>(
      std::chrono::seconds(now.tv_sec) + std::chrono::nanoseconds(now.tv_nsec)));
}

inline constexpr auto no_throw = asio::as_tuple(asio::use_awaitable);

// A strand on `executor`, as an any_io_executor. On an io_context's own executor (what a pool
// usually runs on) the strand wraps that executor's type rather than any_io_executor: small enough
// to live in any_io_executor's in-place buffer, so the copies asio's work tracking makes of it, one
// for every operation started by a coroutine on the strand, need no heap allocation (a strand of
// an any_io_executor does not fit, and costs one at each).
inline asio::any_io_executor make_compact_strand(const asio::any_io_executor& executor) {
  if (const auto* plain = executor.target<asio::io_context::executor_type>()) {
    return asio::make_strand(*plain);
  }
  return asio::make_strand(executor);
}

inline std::string make_application_name(const PoolConfig& config) {
  return make_connection_tag(config.application, config.instance);
}

// The pool's connect options: the config's, with its conninfo and the session guards.
inline ConnectOptions connect_options(const PoolConfig& config) {
  ConnectOptions options = config.connect;
  options.conninfo = config.conninfo;
  return with_session_guards(std::move(options), config.guards);
}

// The site the multiplexer's leases are acquired at (multiplexer.cpp): Pool::query()'s
// connections, described as such rather than by pgrt's own source line.
std::source_location shared_connection_site() noexcept;

inline std::string describe_site(const std::source_location& site) {
  const std::source_location shared = shared_connection_site();
  if (site.line() == shared.line() && site.column() == shared.column() &&
      std::string_view(site.file_name()) == shared.file_name()) {
    return "Pool::query() (a connection shared by its statements)";
  }
  return std::string(site.file_name()) + ":" + std::to_string(site.line()) + " (" +
         site.function_name() + ")";
}

[[noreturn]] inline void throw_pool_error(client_errc code, std::string message,
                                          std::string hint = {}) {
  throw Error(make_error_code(code),
              Diagnostics{.message = std::move(message), .hint = std::move(hint)});
}

// Power-of-two buckets of microseconds: enough for p50/p99 of acquire waits.
class WaitHistogram {
 public:
  void record(std::chrono::microseconds wait) {
    const auto micros = static_cast<std::uint64_t>(std::max<std::int64_t>(wait.count(), 0));
    std::size_t bucket = 0;
    while (bucket + 1 < buckets_.size() && (std::uint64_t{1} << bucket) <= micros) ++bucket;
    ++buckets_[bucket];
    ++count_;
    max_ = std::max(max_, wait);
  }
  [[nodiscard]] std::chrono::microseconds percentile(double fraction) const {
    if (count_ == 0) return std::chrono::microseconds(0);
    const auto wanted = static_cast<std::uint64_t>(fraction * static_cast<double>(count_));
    std::uint64_t seen = 0;
    for (std::size_t bucket = 0; bucket < buckets_.size(); ++bucket) {
      seen += buckets_[bucket];
      if (seen > wanted) {
        return std::min(std::chrono::microseconds(std::int64_t{1} << bucket), max_);
      }
    }
    return max_;
  }
  [[nodiscard]] std::chrono::microseconds max() const { return max_; }

 private:
  std::array<std::uint64_t, 40> buckets_{};
  std::uint64_t count_ = 0;
  std::chrono::microseconds max_{0};
};

// Every event goes out through here: a subscriber that throws is logged, and the pool's
// accounting (already complete when an event is emitted) cannot be disturbed by it.
template <typename Signal, typename... Args>
void emit(Signal& signal, const Args&... args) noexcept {
  if (!signal.ever_connected()) return;  // the common case: no lock, no call
  try {
    signal(args...);
  } catch (const std::exception& error) {
    spdlog::error("pgrt pool: an event subscriber threw: {}", error.what());
  } catch (...) {
    spdlog::error("pgrt pool: an event subscriber threw");
  }
}

// Event emissions collected under the pool's lock and run after it is released.
class Deferred {
 public:
  Deferred() = default;
  Deferred(const Deferred&) = delete;
  Deferred& operator=(const Deferred&) = delete;
  Deferred(Deferred&&) = delete;
  Deferred& operator=(Deferred&&) = delete;
  ~Deferred() {
    for (auto& call : calls_) {
      try {
        call();
      } catch (...) {  // NOLINT(bugprone-empty-catch): each call is an emit(), which logs
      }
    }
  }
  void add(std::function<void()> call) { calls_.push_back(std::move(call)); }

 private:
  std::vector<std::function<void()>> calls_;
};

// A pooled connection: what the driver hangs on a core node.
// Watches an idle connection's socket, through a descriptor of its own (a dup() of libpq's), for
// the server ending the backend (pg_terminate_backend, a restart, a proxy's idle timeout). Used
// under the pool's lock only; the pending wait's handler holds it.
struct IdleWatch {
  explicit IdleWatch(const asio::any_io_executor& executor) : descriptor(executor) {}
  asio::posix::stream_descriptor descriptor;
  pool::Node* node = nullptr;  // null once unwatched: a late handler does nothing
};

struct PoolState;
struct Multiplexer;  // multiplexer.hpp

struct PooledConnection : pool::NodeAttachment, LeaseBinding {
  PooledConnection(const asio::any_io_executor& executor, PoolState& pool_in, pool::Node& node_in)
      : pool(pool_in), node(node_in), strand(executor) {}
  // The connection, while the pool has it; while leased, the Lease holds it (Lease::connection_)
  // and this is empty, unless its user closed it (then it is back here, being closed).
  Connection connection;
  PoolState& pool;
  pool::Node& node;
  std::size_t budget_slot = 0;  // under a budget: the slot this connection holds
  int backend_pid = 0;          // under a budget: its backend, as pg_locks shows it
  // Under a budget: the server that holds its slot, as the server tells (its postmaster's start
  // and its port): a multi-host conninfo may leave a pool's connections on several servers, or
  // reach one server through several of its entries.
  std::string server;
  // While leased (under the pool's lock): the implementation of the connection the Lease holds,
  // which the pool may cut (Pool::close() after its grace period).
  Connection::Impl* leased_impl = nullptr;
  void closed_in_lease(Connection live) noexcept override;
  // Its connect runs on this strand, so that the pool's close can cancel it from any thread.
  asio::strand<asio::any_io_executor> strand;
  // The connect's cancellation, shared with the connect's coroutine: a cancel posted by close()
  // may run after the connect has ended (and the node is gone): it then finds `finished` set, on
  // the strand, and does nothing.
  struct ConnectCancel {
    asio::cancellation_signal signal;
    bool cancelled = false;  // on the strand only: a cancel that came before the connect began
    // On the strand only: the connect's coroutine runs with throw_if_cancelled(false). A signal
    // emitted before that would make asio's co_spawn entry point throw outside any handler
    // (std::terminate); until then a cancel only sets `cancelled`, which the coroutine reads.
    bool started = false;
    bool finished = false;  // on the strand only
  };
  std::shared_ptr<ConnectCancel> connect_cancel = std::make_shared<ConnectCancel>();
  std::shared_ptr<IdleWatch> watch;  // while the core has it watched
};

inline Connection& connection_of(pool::Node& node) {
  return static_cast<PooledConnection&>(*node.attachment).connection;
}

// A caller waiting for a connection: the core's Waiter plus its coroutine's parked handler. The
// core's decision (handed a node, or failed) is made under the pool's lock, and the handler is
// taken and its resumption posted under it too, so the waiter is woken exactly once and never
// after its frame is gone.
struct PoolWaiter : pool::Waiter {
  PoolWaiter(Priority priority_in, pool::ConsumerIndex consumer_in, std::source_location site_in)
      : Waiter(priority_in, site_in, consumer_in) {}
  async::ParkedWait parked;  // while it waits
};

// A discarded connection keeps its capacity until the server has closed its end of the socket; a
// warning is logged when that takes longer than this.
constexpr std::chrono::milliseconds server_close_warning{2000};
// How long close_now() waits for each cancel request to go out.
constexpr std::chrono::milliseconds exit_cancel_wait{1000};

inline std::vector<pool::ConsumerLimits> consumer_limits(const PoolConfig& config) {
  std::vector<pool::ConsumerLimits> limits;
  for (const ConsumerShare& consumer : config.consumers) {
    limits.push_back(
        {.min = consumer.min, .max = consumer.max == 0 ? config.max_size : consumer.max});
  }
  return limits;
}

inline pool::CoreConfig core_config(const PoolConfig& config) {
  return pool::CoreConfig{
      .max_size = config.max_size,
      .min_idle = config.min_idle,
      .reserved_for_priority = config.reserved_for_priority,
      .max_waiters = config.max_waiters,
      .acquire_timeout = config.acquire_timeout,
      .connect_timeout = config.connect.connect_timeout,
      .max_lifetime = config.max_lifetime,
      .lifetime_jitter = config.lifetime_jitter,
      .idle_timeout = config.idle_timeout,
      .keepalive_interval = config.keepalive_interval,
      .validate_after_idle = config.validate_after_idle,
      .leak_threshold = config.leak_threshold,
      .slot_check_interval =
          config.budget.key.empty() ? std::chrono::milliseconds(0) : config.budget.check_interval,
      .watch_idle_after = config.watch_idle_after,
      .backoff_initial = config.connect_backoff_initial,
      .backoff_max = config.connect_backoff_max,
      .backoff_jitter = config.connect_backoff_jitter,
      .reset_discard_all = config.reset == ResetPolicy::discard_all,
      .fail_fast_after = config.fail_fast_after,
      .consumers = consumer_limits(config),
  };
}

// What target_session_attrs asks of every connection's server, under
// PoolConfig::recheck_session_attrs (else, and for prefer-standby and any: nothing). libpq checks
// it at connect only; a server's role can change under a live connection (a primary set
// read-only, a standby promoted), which the server reports with the next statement's answer
// (ParameterStatus in_hot_standby and default_transaction_read_only, PostgreSQL 14 and later).
enum class RequiredRole : std::uint8_t { any, read_write, read_only, primary, standby };

// Read off the pool's conninfo (or PGTARGETSESSIONATTRS); none with a service (whose file may
// set it, and is not read here).
RequiredRole required_role(const PoolConfig& config);

// Whether `connection`'s server, as it last reported, still serves `role`. A server that reports
// neither parameter (before PostgreSQL 14, or a pooler that hides them) is taken to.
bool serves_role(const Connection& connection, RequiredRole role) noexcept;

// How a lease came back, read off its connection. (A connection returned in a transaction has its
// role checked after its reset, which undoes the transaction's SET LOCALs.)
inline pool::ReturnKind classify(const Connection& connection, RequiredRole role) {
  if (!connection.is_open() || connection.is_broken()) return pool::ReturnKind::broken;
  auto kind = pool::ReturnKind::broken;
  switch (connection.transaction_status()) {
    case TransactionStatus::idle:
      kind = pool::ReturnKind::clean;
      break;
    case TransactionStatus::in_transaction:
    case TransactionStatus::in_error:
      kind = pool::ReturnKind::needs_reset;
      break;
    case TransactionStatus::active:
      return pool::ReturnKind::mid_query;  // its coroutine was destroyed mid-operation
    case TransactionStatus::unknown:
      return pool::ReturnKind::broken;
  }
  if (kind == pool::ReturnKind::clean && role != RequiredRole::any &&
      !serves_role(connection, role)) {
    return pool::ReturnKind::wrong_role;
  }
  return kind;
}

// The asio/libpq driver: it holds the core under one mutex, feeds it events and carries out its
// actions. One acquire: Pool::acquire() -> PoolState::acquire() -> Core::try_acquire() (an idle
// connection: leased at once) or Core::enqueue() + a parked wait in the PoolWaiter, until the
// core hands it a node (a Lease returned: release() -> Core::lease_returned() -> offer) or fails
// it.
struct PoolState : std::enable_shared_from_this<PoolState>, async::ParkedWaitOwner {
  explicit PoolState(PoolConfig config_in)
      : config(std::move(config_in)),
        application_name(make_application_name(config)),
        backend_end_bound(pgrt::backend_end_bound(connect_options(config))),
        role(required_role(config)),
        core(core_config(config), std::random_device{}()) {}

  mutable std::mutex mutex;
  const PoolConfig config;
  const std::string application_name;
  // A closed connection's capacity comes back when the server has ended its backend, or at this
  // bound (session_guards.hpp), by which the session guards have made the server end it.
  const std::chrono::milliseconds backend_end_bound;
  // What target_session_attrs asks of the server (any unless PoolConfig::recheck_session_attrs),
  // checked at every clean return and after every reset and ping (DiscardReason::server_role).
  const RequiredRole role;
  PoolEvents events;
  std::optional<asio::any_io_executor> executor;
  // The upkeep timer, armed by the core (Action::arm_timer); used under `mutex` only.
  std::shared_ptr<asio::steady_timer> upkeep_timer;
  pool::Core core;
  WaitHistogram waits;
  DurationHistogram wait_time;  // PoolStats::wait_time, use_time, create_time
  DurationHistogram use_time;
  DurationHistogram create_time;
  // operation_time: recorded by the connections themselves, on any thread.
  std::shared_ptr<StatementTimes> statement_times = std::make_shared<StatementTimes>();
  std::string last_connect_error;
  error_code last_connect_error_code;
  // The last failed connect's own hint (Connection::last_error(): for 53300, what relieves a full
  // server), "" when it had none.
  std::string last_connect_hint;
  // The reason of the connect failure last logged, "" while connects succeed: failed connects
  // are logged once per change of reason (a budget's changing holders and share are not one),
  // and a success after failures once.
  std::string logged_connect_failure;
  std::uint64_t failed_connects_in_a_row = 0;
  std::uint64_t budget_probes = 0;               // PoolStats::budget_probes
  std::uint64_t budget_probes_without_slot = 0;  // PoolStats::budget_probes_without_slot
  bool warned_foreign_slots = false;  // a sharer held a slot past budget.slots: said once
  std::size_t budget_waits = 0;       // connects waiting for a budget slot (wait_for_budget_slot())
  std::uint64_t budget_slot_waits = 0;  // PoolStats::budget_slot_waits
  // Connects waiting for their turn at the probe gate, and whether the connect with the turn (of
  // this pool or another on the io_context) waits for a slot (ProbeGate::holder_waits_for_slot()):
  // a full budget, then, is why callers time out.
  std::size_t connects_waiting_for_turn = 0;
  std::shared_ptr<std::atomic<bool>> turn_holder_waits_for_slot;
  // close() calls waiting for every connection to be gone; notified once none is left.
  async::TimerCondition drained;
  // The execution contexts whose shutdown ends the waits of this pool's waiters on them
  // (async::ParkedWaitWatch), once one of them waited.
  std::vector<asio::execution_context*> watched_contexts;
  // Pool::query()'s, made on its first call (under `mutex`); let go of at the end of close().
  std::shared_ptr<Multiplexer> multiplexer;
  // Whether the connection `lease` holds is to be closed when it comes back (Pool::evict_all(),
  // a budget slot or share lost) or is past its lifetime: a holder that can give it back early
  // (a shared connection of the multiplexer) does. Under `mutex`.
  static bool due_back_locked(const Lease& lease, Clock::time_point now) noexcept {
    return lease.node_ != nullptr && pool::Core::expired(*lease.node_, now);
  }
  // The multiplexer, made on the first call (the pool's executor bound from `caller` if it has
  // none yet). Throws pool_closed on a closed pool.
  std::shared_ptr<Multiplexer> multiplexer_for(const asio::any_io_executor& caller);

  // --- carrying out the core's actions (under `mutex`) ------------------------------------------

  // Starts background work later, never inline: co_spawn dispatches, so from the io_context's
  // own thread it would run the coroutine at once, under the pool's lock.
  void spawn_later(asio::awaitable<void> operation);

  // The scratch list of the core's actions: one per pool, used under `mutex` only, so that no
  // acquire's coroutine frame carries one (a frame too large for asio's recycling allocator
  // would cost a malloc per acquire).
  pool::Actions actions_scratch;
  pool::Actions& fresh_actions_locked() noexcept {
    actions_scratch.clear();
    return actions_scratch;
  }

  // Carries out the core's actions (inline: most events of a busy pool, a clean return or an
  // idle connection leased, bring none, and then cost no call), then wakes close() once every
  // backend has ended (an event with no action can be the last: 7bed09e skipped that, and close()
  // waited out its grace).
  void execute_locked(const pool::Actions& actions, Deferred& deferred) {
    if (!actions.empty()) {
      execute_actions_locked(actions, deferred);
    } else if (core.drained()) {
      drained.notify_all_locked();
    }
  }
  void execute_actions_locked(const pool::Actions& actions, Deferred& deferred);

  // --- watching idle sockets (under `mutex`) ----------------------------------------------------

  void start_watch(pool::Node& node);

  static void stop_watch(pool::Node& node);

  // An idle connection's socket became readable: the server closed it (end of file, or its
  // goodbye message first), or sent something harmless (a notice, a parameter status), which
  // libpq then reads. Closed: the core discards the connection; otherwise the watch goes on.
  void on_readable(const std::shared_ptr<IdleWatch>& watch, error_code wait_error) noexcept;

  void bind_executor_locked(const asio::any_io_executor& candidate);

  // --- background work ----------------------------------------------------------------------

  void start_connect(pool::Node& node);

  static asio::awaitable<void> open_connection(
      std::shared_ptr<PoolState> self, pool::Node* node,
      std::shared_ptr<PooledConnection::ConnectCancel> cancel);

  // `check_slots`: then check_budget_slots() on it (Action::check_slots).
  static asio::awaitable<void> reset(std::shared_ptr<PoolState> self, pool::Node* node,
                                     bool check_slots);
  static asio::awaitable<void> ping(std::shared_ptr<PoolState> self, pool::Node* node,
                                    bool check_slots);

  // Under a budget: whether a new connection may take a slot (not while the pool holds its fair
  // share: Core::at_connection_cap()), and that share (the core's cap). Lock-taking.
  bool may_take_budget_slot() {
    std::lock_guard lock(mutex);
    return !core.at_connection_cap();
  }
  std::size_t budget_share() {
    std::lock_guard lock(mutex);
    return core.connection_cap();
  }

  // Whether `node` was evicted by Pool::evict_all() (not retired for the budget's fair share).
  static bool evicted_by_user(const std::shared_ptr<PoolState>& self, const pool::Node& node);
  // Under a budget, when a new connection found no slot free: waits for one on that connection,
  // holding the budget's waiting marker meanwhile (so the processes holding slots keep to their
  // fair share), retrying every 100-300 ms for at most connect_timeout or until the pool closes.
  static asio::awaitable<SlotSearch> wait_for_budget_slot(
      std::shared_ptr<PoolState> self, const pool::Node& node, Connection& connection,
      const PooledConnection::ConnectCancel& cancel, SlotSearch search);

  // Under a budget: asks the server, on `checker`'s connection, which backends hold a slot, and
  // reports to the core (slot_lost()) each of the pool's connections that does not: its slot was
  // released by hand. Judged are the connections idle or leased when the check starts, that have
  // not been reset since (a discard_all reset releases and retakes the slot), and the checker.
  static asio::awaitable<void> check_budget_slots(std::shared_ptr<PoolState> self,
                                                  pool::Node* checker, Clock::time_point deadline);

  void start_close(pool::Node& node);

  // The capacity is given back only once the server has closed its end of the socket, which it
  // does after the backend has left pg_stat_activity: the strict max holds on the server's side
  // at every instant. A statement still running is cancelled first (close_and_wait() does), so
  // that the backend ends now. A backend that outlives server_close_warning keeps its slot
  // counted (with a warning) until it ends or its socket fails.
  // `attachment`: the node's connection, taken from it by start_close().
  static asio::awaitable<void> finish_close(std::shared_ptr<PoolState> self, pool::Node* node,
                                            std::unique_ptr<pool::NodeAttachment> attachment);

  // Closes `connection` and waits until the server has ended its backend, or backend_end_bound.
  // On a strand (close_and_wait() races the socket against a timer).
  // `when_slow` runs once if the backend has not ended after server_close_warning.
  static asio::awaitable<void> close_until_backend_ends(
      const std::shared_ptr<PoolState>& self, Connection& connection,
      const std::function<void()>& when_slow = {});

  // Calls the core's tick() when the timer it armed expires, until the pool closes.
  static asio::awaitable<void> upkeep(std::shared_ptr<PoolState> self);

  // --- acquire and release --------------------------------------------------------------------

  // A node's connection, moved out for the Lease that takes it (under the lock).
  Connection hand_out_locked(pool::Node& node) noexcept {
    auto& pooled = static_cast<PooledConnection&>(*node.attachment);
    Connection connection = std::move(pooled.connection);
    pooled.leased_impl = ConnectionAccess::bind(connection, &pooled);
    return connection;
  }

  // A Lease's connection, moved back to its node (under the lock). False when it is not the one
  // handed out (the user replaced it): the node is then closed as broken.
  static bool take_back_locked(pool::Node& node, Connection& leased) noexcept {
    auto& pooled = static_cast<PooledConnection&>(*node.attachment);
    const bool same = ConnectionAccess::bind(leased, nullptr) == pooled.leased_impl;
    pooled.connection = std::move(leased);
    pooled.leased_impl = nullptr;
    return same;
  }

  // Cuts a connection that is leased or being worked on (Connection::interrupt()), under the lock.
  static void interrupt_locked(const pool::Node& node,
                               std::chrono::milliseconds wait_for_cancel) noexcept {
    auto& pooled = static_cast<PooledConnection&>(*node.attachment);
    if (pooled.leased_impl != nullptr) {
      ConnectionAccess::interrupt(*pooled.leased_impl, wait_for_cancel);
    } else {
      pooled.connection.interrupt(wait_for_cancel);
    }
  }

  // The connection of a node that is leased or being worked on, to interrupt in two steps
  // (ConnectionAccess::start_interrupt()); null when it has none. Under the lock.
  static Connection::Impl* interruptible_locked(const pool::Node& node) noexcept {
    auto& pooled = static_cast<PooledConnection&>(*node.attachment);
    return pooled.leased_impl != nullptr ? pooled.leased_impl
                                         : ConnectionAccess::impl_of(pooled.connection);
  }

  // The user closed a leased connection (PooledConnection::closed_in_lease): the pool closes it
  // now, and its capacity comes back once the backend has ended, while the Lease is still out.
  void closed_in_lease(pool::Node& node, Connection live) noexcept;

  // `uncounted_waiters`: callers waiting that the core no longer queues (one timed out just now).
  std::string describe_load_locked(std::size_t uncounted_waiters = 0) const;

  // `self` is this state, held by the coroutine frame so that the state outlives the acquire even
  // if the Pool object goes away meanwhile (and handed to the Lease).
  // `deadline`: when the caller's acquire_timeout ends, for an acquire started over after a
  // failed check before handout (none: from now).
  asio::awaitable<Lease> acquire(std::shared_ptr<PoolState> self, Priority priority,
                                 pool::ConsumerIndex consumer, std::source_location site,
                                 std::optional<Clock::time_point> deadline = std::nullopt);

  // The failures of an acquire, apart from its coroutine, so that their strings are not part of
  // its frame: a frame too large for asio's recycling allocator would cost a malloc per acquire.
  [[noreturn]] void fail_cancelled_locked(Priority priority, std::source_location site);

  // (`deferred`: the acquire_timeout event of an acquire_timeout 0 refusal, emitted once the
  // lock is released.)
  [[noreturn]] void fail_admission_locked(pool::AcquireResult::Kind kind, Deferred& deferred);

  // The consumer PoolConfig::consumers names `name` (named consumer i is index i + 1), or none.
  [[nodiscard]] std::optional<pool::ConsumerIndex> find_consumer(std::string_view name) const;
  // An acquire for a consumer the config does not name: fails at its co_await.
  [[nodiscard]] asio::awaitable<Lease> fail_unknown_consumer(std::string_view name) const;

  // A waiter is about to park on `context`: its shutdown will end the wait (watched once).
  void watch_waiters_on_locked(asio::execution_context& context);
  // `context` shuts down: the waits of the waiters on it are destroyed, and with them their
  // coroutines (whose AbandonGuards take the waiters out of the queue).
  void release_waits_of(asio::execution_context& context) override;

  // A waiter woken without a connection: the pool closed, it was cancelled, or its time ran out.
  [[noreturn]] void fail_wait(std::unique_lock<std::mutex>& lock, pool::Waiter& waiter,
                              error_code error, std::chrono::milliseconds wait_limit);

  // The error of an acquire that waited `wait_limit` in vain (fail_wait()): pool_timeout, or the
  // code of what kept the pool from opening one (connects that cannot succeed, a full budget, a
  // full server with none of the pool's connections alive). `load`: describe_load_locked().
  [[nodiscard]] Error timeout_error_locked(std::chrono::milliseconds wait_limit,
                                           const std::string& load) const;
  // While every connect fails and none of the pool's connections is alive: the error an acquire
  // that waited `wait_limit` in vain gets now, for a statement of query() that no connection took
  // (Multiplexer::sweep()); none otherwise. Takes the mutex (never under the multiplexer's).
  [[nodiscard]] std::optional<Error> connects_failing_error(
      std::chrono::milliseconds wait_limit) const;

  // How long an acquire may take in all, checks before handout included.
  [[nodiscard]] std::chrono::milliseconds checkout_limit() const {
    return config.acquire_timeout.count() > 0 ? config.acquire_timeout
                                              : config.connect.connect_timeout;
  }

  // The checks before handout, cut at the acquire's deadline: the validate_after_idle ping (for
  // a connection that sat idle), then PoolConfig::before_handout. A connection that fails one is
  // closed and the acquire starts over, with what is left of its time.
  static asio::awaitable<Lease> checked(Lease lease, std::shared_ptr<PoolState> self,
                                        Priority priority, pool::ConsumerIndex consumer,
                                        std::source_location site, Clock::time_point deadline,
                                        bool validate);

  // A leased connection that a check before handout refused: closed.
  void refuse(Lease lease, DiscardReason reason) noexcept;

  // A lease ended. `leased`: the connection its Lease held (null: the node still has it, as for a
  // waiter that was handed a node but gone before it took it: no Lease was made, so neither
  // `released` nor a use time goes with its return, as no `acquired` went with its handout).
  // (Inline: the hot path of every Lease's end.)
  void release(pool::Node& node, Connection* leased, bool discard) noexcept {
    try {
      auto kind = discard ? pool::ReturnKind::discard
                          : classify(leased != nullptr ? *leased : connection_of(node), role);
      const auto now = coarse_now();
      const auto ended = config.timings ? timing_now() : Clock::time_point{};
      Deferred deferred;
      std::lock_guard lock(mutex);
      const bool lease_made = leased != nullptr;
      if (lease_made && events.released.ever_connected()) {
        deferred.add([this] { emit(events.released); });
      }
      if (node.state != pool::NodeState::leased) {  // its user closed it: the pool has it already
        core.lease_dropped_after_close(node);
        return;
      }
      if (config.timings && lease_made) use_time.record(ended - node.lease_started);
      if (leased != nullptr && !take_back_locked(node, *leased) && !discard) {
        kind = pool::ReturnKind::broken;
      }
      auto& actions = fresh_actions_locked();
      core.lease_returned(node, kind, now, actions);
      execute_locked(actions, deferred);
    } catch (const std::exception& error) {
      spdlog::error("pgrt pool: returning a connection failed: {}", error.what());
    }
  }

  PoolStats stats() const;

  // Every connection in one of these states, under the lock.
  template <typename Visit>
  void for_each_locked(std::initializer_list<pool::NodeState> states, Visit&& visit) const {
    for (pool::NodeState state : states) {
      core.nodes(state).for_each([&](const pool::Node& node) { visit(node); });
    }
  }

  // Pool::evict_all().
  void evict_all();

  // The shutdown, in order (shutdown.cpp).
  void close_now() noexcept;
  void begin_close();
  static asio::awaitable<std::vector<std::string>> close(std::shared_ptr<PoolState> self,
                                                         std::chrono::milliseconds grace);
};

// When `pool` is the process-wide pool, forgets it (a closed pool is no longer pgrt::pool(), and
// configure() may run again) and returns it, so that the caller keeps it alive to its end
// (process_pool.cpp).
std::shared_ptr<Pool> forget_if_process_pool(const Pool* pool);

}  // namespace pgrt::detail
