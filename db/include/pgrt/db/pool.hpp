#pragma once

/// @file
/// A connection pool with a strict maximum, FIFO waiters served by direct handoff, and move-only
/// leases; plus the process-wide pool behind `co_await pgrt::connection()`.
///
/// Strict max: connections being opened, in use, idle, being reset (ROLLBACK, DISCARD ALL) and
/// being closed all count against PoolConfig::max_size; a closed connection's capacity is released
/// only once the server has closed its end of the socket (a statement still running is cancelled
/// first). So the server never sees more than max_size backends of one pool. The one exception: a
/// connection already cut on the client side (lost, or closed after a cancel whose drain exceeded
/// ConnectOptions::cancel_timeout) has no socket left to watch and gives its capacity back at once.
///
/// Threading: a Pool may be used from any thread, and its io_context may be run by several
/// threads; coroutines that combine operations (with_timeout(), asio's || and &&) must then run on
/// a strand, as asio requires. Its connections are opened on the pool's executor (the one given to
/// the constructor, or for the process-wide pool the executor of the first acquire). A Lease may be
/// destroyed on any thread, and may outlive its Pool object, but must be returned before the
/// pool's io_context is destroyed (asio objects must go before their io_context).

#include <array>
#include <atomic>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/signals2/signal.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <source_location>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "pgrt/db/connection.hpp"
#include "pgrt/db/error.hpp"
#include "pgrt/db/pool_types.hpp"
#include "pgrt/db/session_guards.hpp"
#include "pgrt/runtime/event.hpp"

namespace pgrt {

/// What a returned connection goes through before it is reused (PoolConfig::reset).
enum class ResetPolicy {
  /// A connection returned inside a transaction (or a failed one) is rolled back in the
  /// background; an idle one goes straight back, with no round trip. Session state (SET, temporary
  /// tables, prepared statements, advisory locks) carries over to the next user.
  rollback,
  /// As rollback, then DISCARD ALL in the background on every return (Connection::discard_all():
  /// session state is reset and the prepared-statement cache forgotten). One round trip per
  /// return, off the caller's path; capacity stays counted meanwhile. A connection whose reset
  /// fails is discarded (DiscardReason::failed_reset).
  discard_all,
};

/// Pool settings. An aggregate: use designated initializers, a preset, or from_env().
/// One connection budget shared by every pool, in any process on any host, that names the same
/// key against the same database (docs/budget.md). Each pooled connection holds one of `slots`
/// session-level advisory locks on the server for as long as it lives, so the server itself
/// enforces the total, and a crashed process's slots come back when the server ends its sessions.
struct Budget {
  /// A class of sharers with slots of its own (Budget::classes).
  struct Class {
    /// 1-63 printable characters, no spaces, ',' or ':'.
    std::string name;
    /// How many slots only this class's pools take.
    std::size_t slots = 0;
  };
  /// The budget's name (env PGRT_BUDGET_KEY); empty: no budget.
  std::string key;
  /// How many connections all its pools together may hold (env PGRT_BUDGET_SLOTS, 1-100000).
  std::size_t slots = 0;
  /// How often the pool asks the server whether each of its connections still holds its slot
  /// (one pg_locks query on an idle connection, or on one coming back when none is idle). A
  /// connection whose slot was released by hand (pg_advisory_unlock_all(), DISCARD ALL sent as
  /// a query) is closed: at once if idle, else when it comes back (DiscardReason::slot_lost).
  /// The same query reads the other processes' waiting markers (a connect that finds no slot
  /// free waits on its session for one, marked): while another process waits, this pool keeps to
  /// an even split of the budget (DiscardReason::budget_share for what it gives back). Zero: never
  /// checked, and so no fair shares; otherwise at least 100 ms (env PGRT_BUDGET_CHECK_MS).
  std::chrono::milliseconds check_interval{std::chrono::seconds(10)};
  /// Optional classes that split the slots, the same list in every sharer (env
  /// PGRT_BUDGET_CLASSES="api:10,batch:30"): the first class gets slots 0-9, the next 10-39, and
  /// the slots after the last class are shared by everybody. Their sizes add up to at most
  /// `slots`.
  std::vector<Class> classes;
  /// This pool's class (env PGRT_BUDGET_CLASS): its connections take a slot of their class first,
  /// then a shared one, never another class's. Empty: the shared slots only.
  std::string class_name;
};

/// The first key of a budget's advisory locks, `pg_try_advisory_lock(key, slot)`: a 32-bit hash
/// (FNV-1a) of its name. pg_locks shows it as `classid` (unsigned: `(key::int8 &
/// 4294967295)::oid`), the slot as `objid`, with `objsubid` 2. For queries of your own; `pgrt-diag
/// budget` uses it.
[[nodiscard]] std::int32_t budget_lock_key(std::string_view budget_key) noexcept;

/// A named consumer's share of one pool (PoolConfig::consumers; docs/pool.md, "Consumers").
/// Leases for it are taken with Pool::acquire(name) or pgrt::connection(name).
struct ConsumerShare {
  /// Its name: 1-63 printable characters, no spaces, ',' or ':', unique within the pool.
  std::string name;
  /// Connections it gets first while it holds fewer and asks for more: a connection that comes
  /// back goes to a waiting consumer below its minimum before any other.
  std::size_t min = 0;
  /// The most leases it holds at once, of either priority; 0: the pool's max_size.
  std::size_t max = 0;
};

struct PoolConfig {
  /// libpq URL or key=value string; empty uses the PG* environment variables.
  std::string conninfo;
  /// The strict maximum of connections (env PGRT_POOL_MAX).
  std::size_t max_size = 10;
  /// Connections opened at start and kept open while idle (env PGRT_POOL_MIN_IDLE).
  std::size_t min_idle = 0;
  /// How long an acquire waits. Zero never waits for a lease to come back: it fails at once when
  /// every connection is in use (leased, or being reset on its way back), and otherwise waits
  /// only for one being opened, also one opened once a closing one has ended (at most
  /// connect.connect_timeout) (env PGRT_ACQUIRE_TIMEOUT_MS).
  std::chrono::milliseconds acquire_timeout{std::chrono::seconds(30)};
  /// Fail fast while the server is down: when every connect in a row has failed and none of the
  /// pool's connections is alive, a caller that has waited this long fails with connect_failed and
  /// the last connect error, instead of waiting out acquire_timeout. Zero: off (env
  /// PGRT_FAIL_FAST_MS). A server that answers again ends it: the pool keeps retrying.
  std::chrono::milliseconds fail_fast_after{0};
  /// The most callers that may wait; beyond it acquires fail with pool_queue_full.
  std::size_t max_waiters = 10'000;
  /// A connection is closed once this old (checked on return and while idle); zero: never
  /// (env PGRT_MAX_LIFETIME_S). Each connection's lifetime is shortened by a random part of up to
  /// `lifetime_jitter`, so connections opened together do not expire together.
  std::chrono::milliseconds max_lifetime{std::chrono::minutes(30)};
  double lifetime_jitter = 0.1;
  /// Idle connections above min_idle are closed after this long; zero: never
  /// (env PGRT_IDLE_TIMEOUT_S). Not below a non-zero max_lifetime, it never applies: connections
  /// reach their lifetime first (validate() logs a warning).
  std::chrono::milliseconds idle_timeout{std::chrono::minutes(10)};
  /// Idle connections are pinged this often to keep them (and detect dead ones); zero: never.
  std::chrono::milliseconds keepalive_interval{0};
  /// A connection idle for longer than this is pinged before it is handed out; zero: never.
  std::chrono::milliseconds validate_after_idle{0};
  /// A connection idle this long has its socket watched (no round trip, no syscall per
  /// checkout), so that one whose backend the server ends while it is idle (pg_terminate_backend,
  /// a restart, a proxy's idle timeout) is discarded at once instead of being handed out dead.
  /// A connection handed out again sooner is not looked at. Zero: never watched.
  std::chrono::milliseconds watch_idle_after{100};
  /// The reset on return (env PGRT_POOL_RESET=rollback|discard_all).
  ResetPolicy reset = ResetPolicy::rollback;
  /// A lease held longer than this is reported once, with its acquisition site; zero: never
  /// (env PGRT_LEAK_THRESHOLD_MS).
  std::chrono::milliseconds leak_threshold{0};
  /// Record the wait, use and statement time histograms (PoolStats::wait_time, use_time,
  /// operation_time; the metrics' db_client_connection_wait_time_seconds and friends). They cost
  /// two clock reads per lease and two per statement, from the CPU's invariant time-stamp counter
  /// where it has one and reads it faster than the steady clock (else steady_clock): a few tens of
  /// ns per acquire and release, nothing next to a statement's round trip (benchmark 1 shows
  /// both). Off: those histograms stay empty (env PGRT_POOL_TIMINGS=0 or 1).
  bool timings = true;
  /// Check target_session_attrs (read-write, read-only, primary, standby) again on every clean
  /// return, after every reset, validate_after_idle ping and keepalive ping (and, on the
  /// connections Pool::query() holds, after each batch of statements), from what the server
  /// reports (PostgreSQL 14+): a connection whose server no longer serves that role (a primary set
  /// read-only, a standby promoted) is closed (DiscardReason::server_role) and replaced by one to
  /// a server that does. Off by default: libpq checks at connect only, and with no server of the
  /// right kind left, the pool then has no connection at all (reads fail too). Costs two lookups
  /// in libpq's parameter list per return when on and a role is asked for; nothing otherwise
  /// (env PGRT_RECHECK_SESSION_ATTRS=0 or 1). docs/operations.md, "Failover".
  bool recheck_session_attrs = false;
  /// Connections of max_size that only high-priority acquires may use.
  std::size_t reserved_for_priority = 0;
  /// Backoff between failed connect attempts: doubles from initial to max, with up to `jitter`
  /// of it randomized.
  std::chrono::milliseconds connect_backoff_initial{100};
  std::chrono::milliseconds connect_backoff_max{std::chrono::seconds(10)};
  double connect_backoff_jitter = 0.5;
  /// The application and instance names in every connection's application_name,
  /// `<application>/<instance>/<incarnation>` (env PGRT_APP, PGRT_INSTANCE). The incarnation is
  /// random per process start. A name too long for the 63-byte tag, or with characters a tag
  /// cannot hold, becomes a prefix plus a hash of the whole name, so distinct names never share
  /// a tag (pgrt::tag_app_name(), pgrt::tag_instance_name(), pgrt::make_connection_tag()). An
  /// empty instance means the host name (pgrt::default_instance_name()).
  std::string application = "pgrt";
  std::string instance;
  /// Further connect settings (timeouts, session settings, keepalives). Its conninfo and
  /// application_name are replaced by the pool's.
  ConnectOptions connect;
  /// Per-session guards set at connect (on by default), so that a stuck client cannot hold a
  /// backend for long: they complement the start-up cleanup of leftovers.
  SessionGuards guards;
  /// A connection budget shared with other pools and processes (env PGRT_BUDGET_KEY,
  /// PGRT_BUDGET_SLOTS; docs/budget.md). A connection that finds no free slot waits on its own
  /// session for one (holding the budget's waiting marker) for up to connect.connect_timeout;
  /// none found, it is closed and counts as a failed connect (client_errc::budget_exhausted, with
  /// backoff); callers then time out with budget_exhausted. Not behind a transaction pooler
  /// (validate() refuses it).
  Budget budget;
  /// Consumers sharing this pool, each with a guaranteed minimum and a maximum (env
  /// PGRT_POOL_CONSUMERS="name:min:max,name:min:max"; a max of 0 means max_size). The sharing is
  /// work-conserving: a consumer that asks for nothing leaves its share to the others at once;
  /// a connection that comes back goes, among the waiters of the highest priority allowed to take
  /// it, to the consumer furthest below its minimum, then to the one holding the fewest leases
  /// beyond its minimum, then to whoever waited longest; no consumer ever holds more than its
  /// max. A lease is never taken back: a consumer below its minimum gets the next connection
  /// that comes back. Acquires that name no consumer share the rest as one more consumer, with min
  /// 0 and max max_size. validate() requires the minimums to fit in max_size minus
  /// reserved_for_priority. Empty: no consumers, plain FIFO.
  std::vector<ConsumerShare> consumers;

  /// Runs on every new connection before the pool uses it, on the pool's executor: set a
  /// search_path, prepare statements, register types (as asyncpg's `init`, pgx's `AfterConnect`,
  /// HikariCP's `connectionInitSql`). It is cut at connect.connect_timeout: its connection is
  /// interrupted and the hook itself cancelled (a hook that waits on anything must honour asio's
  /// per-operation cancellation to be bounded). If it throws, is cut, or returns with its
  /// connection cut, the connection is closed and the connect counts as failed: connect_errors, the
  /// connect_failed event, the connect backoff, and the message in last_connect_error and in
  /// waiters' pool_timeout errors. Empty: nothing runs.
  std::function<boost::asio::awaitable<void>(Connection&)> on_connect;
  /// Runs before every handout of a connection (after the validate_after_idle ping, if any), on
  /// the acquiring coroutine: return false to refuse the connection, which is then closed
  /// (DiscardReason::rejected), and the acquire goes on with another within its acquire_timeout;
  /// a check not done by the acquire's deadline is cancelled and its connection cut and closed,
  /// and the acquire then fails with client_errc::pool_timeout (no time is left to check another).
  /// A check that throws refuses too (client_errc::cancelled, when the acquire is cancelled, is
  /// passed on); a connection found cut after a check said yes is closed, never handed out.
  /// Empty: no check, and no cost.
  std::function<boost::asio::awaitable<bool>(Connection&)> before_handout;

  /// max 3, min_idle 0, max_waiters 1,000: for a db-f1-micro (about 25 connections) shared with
  /// other services.
  [[nodiscard]] static PoolConfig micro();
  /// max 10.
  [[nodiscard]] static PoolConfig small();
  /// DATABASE_URL and the PGRT_* variables (PGRT_POOL_PRESET=micro|small first, then the rest).
  /// Throws pgrt::Error(client_errc::invalid_config) naming the variable and the accepted form.
  [[nodiscard]] static PoolConfig from_env();
  /// Same, starting from `defaults` instead of PoolConfig{} when PGRT_POOL_PRESET is unset:
  /// `PoolConfig::from_env(PoolConfig::micro())`.
  [[nodiscard]] static PoolConfig from_env(PoolConfig defaults);
  /// Throws pgrt::Error(client_errc::invalid_config), naming the field, its value and what to
  /// do, if the settings contradict each other or a duration is negative (connect_backoff_initial
  /// and connect.connect_timeout must be positive). Logs a warning (spdlog) if idle_timeout is not
  /// below max_lifetime, both non-zero. The Pool constructor calls it; from_env() runs the same
  /// checks without the warning.
  void validate() const;
};

/// A snapshot of a pool's state and counters.
struct PoolStats {
  std::size_t max = 0;
  std::size_t size = 0;  ///< Connections counted against max (all states).
  std::size_t idle = 0;
  std::size_t in_use = 0;
  std::size_t connecting = 0;
  /// Closed, waiting for the server to end the backend (a running statement is cancelled first);
  /// still counted in size until the server has closed its end of the socket.
  std::size_t closing = 0;
  /// Being reset after a return (ROLLBACK, DISCARD ALL) and being pinged (keepalive_interval),
  /// in the background; counted in size.
  std::size_t resetting = 0;
  std::size_t pinging = 0;
  /// Pool::query(): statements waiting for a shared connection, statements sent and not yet
  /// answered, and the connections lent to query() (also counted in in_use).
  std::size_t shared_queued = 0;
  std::size_t shared_in_flight = 0;
  std::size_t shared_connections = 0;
  std::size_t waiting_normal = 0;
  std::size_t waiting_high = 0;
  std::uint64_t acquired = 0;
  std::uint64_t timeouts = 0;
  std::uint64_t cancellations = 0;
  std::uint64_t connect_attempts = 0;
  std::uint64_t connect_errors = 0;
  std::uint64_t discarded = 0;
  std::uint64_t leaks_suspected = 0;
  std::chrono::microseconds wait_p50{0};
  std::chrono::microseconds wait_p99{0};
  std::chrono::microseconds wait_max{0};
  /// How long the caller waiting longest now has waited so far: for a lease, or for a connection
  /// to take its Pool::query() statement (0 when nobody waits). The watchdog's long_waits and the
  /// metrics endpoint's /healthz (stuck_after) read it.
  std::chrono::microseconds longest_wait{0};
  /// Leases held now past PoolConfig::leak_threshold (each reported once, by leaks_suspected).
  std::size_t leases_past_leak_threshold = 0;
  /// PoolConfig::min_idle, for the metrics.
  std::size_t min_idle = 0;
  /// `discarded`, by DiscardReason (index: static_cast<std::size_t>(reason)).
  std::array<std::uint64_t, discard_reason_count> discarded_by_reason{};
  /// Since the pool was made: how long each acquire waited (0 for those served at once), how long
  /// each lease was held (from the acquire's return to the lease's end), and how long each
  /// successful connect took (from the first packet to a connection ready for use, the checks on
  /// connect included).
  DurationHistogram wait_time;
  DurationHistogram use_time;
  DurationHistogram create_time;
  /// How long each statement on the pool's connections took, from its send to its last result
  /// (query(), query_prepared(), stream(), and what is built on them; each statement of a
  /// pipeline from the pipeline's send, and of Pool::query() from its batch's send; not COPY).
  DurationHistogram operation_time;
  /// Connect attempts that failed in a row (0 once one succeeds), and the backoff the pool waits
  /// before its next attempt because of them (0 while connecting works).
  std::uint32_t consecutive_connect_failures = 0;
  std::chrono::milliseconds connect_backoff{0};
  /// The message of the last failed connect, "" if none.
  std::string last_connect_error;
  /// The error code of last_connect_error (a SQLSTATE such as 28P01, or a client_errc); empty
  /// when no connect has failed.
  boost::system::error_code last_connect_error_code;
  /// Under a budget: connections opened to look for a free slot, and those that found none (and
  /// were closed). Between its connect and its slot such a backend holds no slot; at most one per
  /// io_context exists at a time.
  std::uint64_t budget_probes = 0;
  std::uint64_t budget_probes_without_slot = 0;
  /// Under a budget: connects that found every slot held and waited on their connection for one
  /// (holding the budget's waiting marker, so that the processes holding slots keep to their
  /// fair share), at most connect.connect_timeout each.
  std::uint64_t budget_slot_waits = 0;
  /// One consumer (PoolConfig::consumers), as the pool sees it now.
  struct Consumer {
    std::string name;  ///< "" for the acquires that name none
    std::size_t in_use = 0;
    std::size_t waiting = 0;
    std::size_t min = 0;
    std::size_t max = 0;
    /// The leases it would hold if every consumer now active (holding or waiting for a lease)
    /// kept asking: its min, plus an even part of what the active ones' minimums leave, within
    /// its max. 0 while it is idle: its share is the others' meanwhile.
    std::size_t share = 0;
  };
  /// With PoolConfig::consumers: the default consumer first, then each named one in order.
  /// Empty without consumers.
  std::vector<Consumer> consumers;

  /// The snapshot as one JSON object.
  [[nodiscard]] std::string to_json() const;
};

[[nodiscard]] std::string_view to_string(ResetPolicy policy) noexcept;

/// Pool events, as Boost.Signals2 signals (pgrt::Event). Connect with a scoped_connection member so
/// the subscription ends before what its callback uses. Callbacks run on whichever thread caused
/// the event, outside the pool's lock; they must not block. An exception thrown by a callback is
/// logged and swallowed (every subscriber is called, whatever one connected before it throws): an
/// event is emitted only after the pool's bookkeeping for it is complete
/// (`acquired` once the Lease owns the connection), so a subscriber cannot leak a slot or make an
/// acquire fail.
struct PoolEvents {
  Event<void(int backend_pid)> connected;
  Event<void(const std::source_location& site)> acquired;
  Event<void()> released;
  Event<void(DiscardReason reason)> discarded;
  Event<void(const std::string& message)> acquire_timeout;
  Event<void(const std::source_location& site, std::chrono::milliseconds age)> leak_suspected;
  Event<void(const boost::system::error_code& code, const std::string& message)> connect_failed;
};

class Pool;
namespace detail {
struct PoolState;
namespace pool {
struct Node;
}  // namespace pool
// pgrt::query(): Pool::query() on the process-wide pool, held by a reference taken under the
// global lock, so that a close() on another thread cannot destroy it under the call.
boost::asio::awaitable<Result> query_process_pool(std::string sql, ParamSink params);
// The state of `pool`, for what may go on after the Pool object is gone and must then not use
// it (PendingWrites' flusher): held weakly, it keeps nothing alive.
std::weak_ptr<PoolState> pool_state_of(Pool& pool) noexcept;
}  // namespace detail

/// A connection borrowed from a pool. Move-only; a default-constructed or moved-from Lease is
/// empty. Destroying it (or release()) returns the connection: idle ones go straight back; one in
/// a transaction is rolled back in the background first; a broken one is closed and replaced; one
/// with a statement still running gets a cancel request, is closed, and its capacity comes back
/// once the server has ended the backend. It may outlive its Pool object. The destructor is
/// noexcept and may run on any thread.
class Lease {
 public:
  Lease() noexcept = default;
  Lease(Lease&& other) noexcept
      : pool_(std::move(other.pool_)),
        node_(std::exchange(other.node_, nullptr)),
        connection_(std::move(other.connection_)) {}
  Lease& operator=(Lease&& other) noexcept;
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  ~Lease() {
    if (node_ != nullptr) release();
  }

  /// The connection. Throws pgrt::Error(client_errc::not_connected) on an empty Lease
  /// (default-constructed, moved from, released or discarded).
  ///
  /// The reference is valid while this Lease holds the connection: once the Lease is released,
  /// discarded, moved from or destroyed, every operation through a reference kept from it fails
  /// with client_errc::not_connected (in every build), never reaching the connection that the pool
  /// has meanwhile handed to someone else. Do not move or swap the Connection itself out of a
  /// Lease. Closing it (Connection::close()) gives its slot back to the pool as soon as the server
  /// has ended the backend; the Lease then holds a closed connection until it is dropped.
  Connection& operator*() const;
  Connection* operator->() const;
  [[nodiscard]] explicit operator bool() const noexcept { return node_ != nullptr; }
  /// Returns the connection to the pool now; the Lease becomes empty.
  void release() noexcept;
  /// Closes the connection instead of returning it (its capacity comes back once the server has
  /// ended the backend, as for any closed connection); the Lease becomes empty. For a connection
  /// whose session state you cannot trust. Emits PoolEvents::discarded (DiscardReason::by_user).
  void discard() noexcept;

 private:
  friend struct detail::PoolState;
  // Under the pool's lock: takes the node's connection.
  Lease(std::shared_ptr<detail::PoolState> pool, detail::pool::Node* node) noexcept;

  std::shared_ptr<detail::PoolState> pool_;
  detail::pool::Node* node_ = nullptr;
  // The connection while this Lease holds it: it moves in at handout and back to the pool at
  // release, so that a reference kept past the release refers to an empty Connection.
  mutable Connection connection_;
};

/// A pool of connections to one server.
class Pool {
 public:
  /// Validates the config (throws pgrt::Error(client_errc::invalid_config)) and starts opening
  /// min_idle connections on `executor`.
  Pool(boost::asio::any_io_executor executor, PoolConfig config);
  /// A pool whose executor is taken from its first acquire (the process-wide pool uses this).
  explicit Pool(PoolConfig config);
  /// Closes the pool without waiting (close(0)); outstanding leases stay valid until returned.
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;
  Pool(Pool&&) = delete;
  Pool& operator=(Pool&&) = delete;

  /// A connection, as soon as one is free; waiters are served FIFO within a priority, high first.
  ///
  /// Errors (pgrt::Error): pool_timeout after PoolConfig::acquire_timeout, saying how many
  /// connections were in use, how many callers waited, and the last connect error
  /// (budget_exhausted instead while a full budget, PoolConfig::budget, keeps the pool from
  /// connecting; the connect error's own code when every connect fails with an error that waiting
  /// does not cure, or is refused by a full server, 53300 (condition::too_many_connections), while
  /// none of the pool's connections is alive); pool_queue_full; pool_closed; cancelled.
  ///
  /// Cancellation: per-operation cancellation of a waiting acquire leaves no trace; a connection
  /// that was opened for it goes to the next waiter or the idle set.
  [[nodiscard]] boost::asio::awaitable<Lease> acquire(
      Priority priority = Priority::normal,
      std::source_location site = std::source_location::current());
  /// A connection for the named consumer (PoolConfig::consumers), within its share: as
  /// acquire(priority), and it waits while the consumer holds its max. Errors: as acquire(), and
  /// invalid_config for a name PoolConfig::consumers does not list (thrown by the co_await).
  [[nodiscard]] boost::asio::awaitable<Lease> acquire(
      std::string_view consumer, Priority priority = Priority::normal,
      std::source_location site = std::source_location::current());

  /// Runs one statement without an exclusive lease: on one of the pool's connections, which it
  /// shares with the statements of other query() callers through libpq's pipeline mode (each
  /// statement in a sync segment of its own, prepared once per connection). Hundreds of callers
  /// share max_size connections, and a round trip no longer caps them at max_size statements in
  /// flight. The connections are borrowed through the pool's own acquire: the strict max, FIFO
  /// and accounting hold for both paths, and a connection goes back once nothing is queued, or
  /// (drained first) when callers wait for a lease. Statements wait at most
  /// PoolConfig::acquire_timeout for a connection to take them; once sent they run to their end
  /// (a server-side statement_timeout bounds them), and a slow one delays the answers
  /// behind it on its connection (head of line: see docs/usage.md).
  ///
  /// Refused (client_errc::needs_session, at the co_await, nothing sent), as they need a session
  /// of their own: transaction control (BEGIN, COMMIT, SAVEPOINT, ...), SET and RESET, LISTEN,
  /// COPY, cursors, DISCARD, DEALLOCATE, PREPARE and LOCK, by the first keyword past whitespace,
  /// ';' and (nested) comments; and calls of the session-level advisory lock functions
  /// (pg_advisory_lock, pg_try_advisory_lock, pg_advisory_unlock and their variants) and of
  /// set_config() without `true` as its last argument, named anywhere outside string constants
  /// and comments; temporary tables, views and sequences (CREATE ... TEMP, SELECT ... INTO TEMP,
  /// a pg_temp. name; not one ON COMMIT DROP). Take a lease for those. A string
  /// of several statements is refused by the server (SQLSTATE 42601). A statement that still
  /// opens a transaction block fails with needs_session and its connection is closed (the
  /// statements sent after it on it fail with connection_lost, none committed).
  ///
  /// A statement the server forgot (26000) or whose result changed shape since it was prepared
  /// (0A000, an ALTER TABLE under a SELECT *) did not run: it is prepared again and sent again,
  /// once. Behind a transaction pooler (configured, or noticed: at connect, see Pooler::none, or
  /// when the server forgets a statement twice on a connection or for one statement) statements
  /// run unnamed, one at a time per shared connection (PgBouncer before 1.21 mixes up server
  /// sessions under pipelined segments). Answers that do not match what was sent (such a mix-up)
  /// close the connection and fail its statements in flight with connection_lost, never with
  /// another caller's answer.
  ///
  /// Errors (pgrt::Error): the statement's own (SQLSTATE), for its caller only; pool_timeout when
  /// no connection took it within acquire_timeout (while every connect fails and none of the
  /// pool's connections is alive: acquire()'s error instead, with the last connect error and its
  /// code where acquire() gives it, such as invalid_config or 53300); pool_queue_full beyond
  /// max_waiters queued;
  /// pool_closed; connection_lost when its connection was lost while it was in flight (it may or
  /// may not have run: retry only what is idempotent), also when close() past its grace or
  /// close_now() cut it (saying the connection was interrupted); cancelled. std::bad_alloc when
  /// memory runs out as the statement is queued: it is then not queued, and never runs.
  ///
  /// Cancellation: per-operation cancellation of a queued statement takes it out of the queue; of
  /// a sent one fails the caller at once, and its answer is read and dropped when it comes. No
  /// cancel request is sent for it alone (it could hit another caller's statement); once every
  /// statement in flight on its connection has been given up, the connection (which then takes no
  /// new statement) sends one, and goes back to the pool only after it was delivered.
  /// Thread-safe.
  template <Encodable... Args>
  [[nodiscard]] boost::asio::awaitable<Result> query(std::string_view sql, const Args&... args) {
    ParamSink params;
    encode_params(params, args...);
    return query_with(std::string(sql), std::move(params));
  }

  [[nodiscard]] PoolStats stats() const;
  [[nodiscard]] PoolEvents& events() noexcept;
  [[nodiscard]] const PoolConfig& config() const noexcept;
  /// The application_name every connection of this pool carries.
  [[nodiscard]] const std::string& application_name() const noexcept;

  /// Use to shut down in order (a service's stop, the end of a test).
  ///
  /// Closes the pool, in order: (1) refuses new acquires (waiters fail with pool_closed) and
  /// closes the idle connections; (2) waits up to `grace` for leases, connects and background
  /// ROLLBACKs to finish; (3) interrupts what is still out (Connection::interrupt(): a running
  /// statement is cancelled and the socket shut down, so its holder gets connection_lost and the
  /// server ends the backend); (4) every connection is then closed: the returned ones at once, the
  /// interrupted ones when their Lease is dropped; (5) returns a description of each lease that
  /// was still out ("file:line (function), held for 1234 ms"), also logged; empty when all came
  /// back in time. Thread-safe; may be called more than once. On the process-wide pool,
  /// pgrt::pool() then reports pool_not_configured and configure() may be called again.
  [[nodiscard]] boost::asio::awaitable<std::vector<std::string>> close(
      std::chrono::milliseconds grace);

  /// Soft eviction, for a failover (or a credentials rotation) learned of out of band: the idle
  /// connections close now; the leased ones, and those being opened, reset or pinged, close when
  /// they come back instead of becoming idle again (DiscardReason::evicted; a lease in use is
  /// never interrupted). The connections query() holds take no new statement from then on: they
  /// drain and come back. New connections replace them as usual, to the server the conninfo names
  /// then. Under a budget, a connect waiting for a slot stops waiting and is replaced at once; it
  /// does not count as a failed connect (no backoff, no connect_failed event). Does not wait; a
  /// no-op on a closed pool. Thread-safe.
  void evict_all();

  /// Use only in a process that is exiting without a graceful stop (an atexit handler).
  ///
  /// Synchronously and
  /// without running any coroutine, refuses new acquires, fails the waiters, closes the idle
  /// connections (Terminate, then the socket) and interrupts the leased ones and those being
  /// reset (as Connection::interrupt(): their cancel requests sent together and waited for up
  /// to 1 s in all, then their sockets shut down). The waiters are failed and the pool's timers
  /// cancelled on the pool's executor (at once when the calling thread runs it; an io_context no
  /// thread runs any more is left alone), so that io threads still running are not raced. Best
  /// effort; never throws; thread-safe. Prefer close(). On the process-wide pool, as for close().
  void close_now() noexcept;
  /// A handle that does close_now() on this pool when called, for an exit handler registered
  /// now and run later: it still reaches what the pool has out (leases, connects, resets) once
  /// close() has begun and the Pool object is gone (the process-wide pool is forgotten as close()
  /// begins), and does nothing once nothing of the pool is left. It keeps nothing alive. Never
  /// throws; thread-safe.
  [[nodiscard]] std::function<void()> close_now_handle() const;
  /// True once close() or close_now() has begun (or the Pool object is being destroyed).
  [[nodiscard]] bool closed() const noexcept;

 private:
  friend boost::asio::awaitable<Result> detail::query_process_pool(std::string sql,
                                                                   ParamSink params);
  friend std::weak_ptr<detail::PoolState> detail::pool_state_of(Pool& pool) noexcept;
  boost::asio::awaitable<Result> query_with(std::string sql, ParamSink params);

  std::shared_ptr<detail::PoolState> state_;
};

/// Configures the process-wide pool. Call once, before the first pgrt::connection(); a second
/// call throws pgrt::Error(client_errc::already_configured), unless the pool was closed
/// (pgrt::pool().close() or close_now()). To shut it down: `co_await pgrt::pool().close(grace)`,
/// or in an exit handler `pgrt::pool().close_now()`.
void configure(PoolConfig config);
/// Same, with the executor the pool runs its background work on (otherwise the executor of the
/// first acquire). Use the executor of an io_context (not a strand) run by the service's threads.
void configure(PoolConfig config, boost::asio::any_io_executor executor);
/// The process-wide pool. Throws pgrt::Error(client_errc::pool_not_configured) before
/// configure() and after the pool was closed: pgrt never guesses a database (use
/// configure(PoolConfig::from_env()) to read the environment).
[[nodiscard]] Pool& pool();
/// The process-wide pool, shared (it stays valid while held, even once closed and forgotten), or
/// null when none is configured. For readers that must not throw and may run on any thread while
/// the pool comes and goes (metrics). Never throws.
[[nodiscard]] std::shared_ptr<const Pool> configured_pool() noexcept;
/// `co_await pgrt::connection()`: a lease from the process-wide pool (see Pool::acquire).
[[nodiscard]] boost::asio::awaitable<Lease> connection(
    Priority priority = Priority::normal,
    std::source_location site = std::source_location::current());
/// `co_await pgrt::connection("scraper")`: a lease for a named consumer of the process-wide pool
/// (see Pool::acquire(consumer)).
[[nodiscard]] boost::asio::awaitable<Lease> connection(
    std::string_view consumer, Priority priority = Priority::normal,
    std::source_location site = std::source_location::current());
/// `co_await pgrt::query(sql, args...)`: one statement on the process-wide pool's shared
/// connections, without a lease (see Pool::query). Throws pool_not_configured as pool() does.
template <Encodable... Args>
[[nodiscard]] boost::asio::awaitable<Result> query(std::string_view sql, const Args&... args) {
  ParamSink params;
  encode_params(params, args...);
  return detail::query_process_pool(std::string(sql), std::move(params));
}

}  // namespace pgrt
