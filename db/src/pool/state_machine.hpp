#pragma once

// The pool's core, free of I/O: no Asio, no libpq, no clock reads (every call is given `now`).
// It owns the waiter queues, the capacity (strict max and reserved connections) and the nodes,
// and makes every decision: who gets a connection, how many to open, when to reset, ping or close
// one, when capacity comes back. Events go in as calls; what the driver must do comes out as
// Actions. The driver (driver.hpp) holds one mutex around every call and carries the actions out
// after releasing it. tests/unit/pool_core_model_test.cpp drives it against a reference model.
//
//   events in                              actions out
//   try_acquire / enqueue                  wake a waiter (handed a node, or failed)
//   withdraw (cancelled; a deadline the    open a node (connect)
//     driver kept)
//   lease_returned (clean, reset, broken,  reset a node (ROLLBACK / DISCARD ALL)
//     mid-query, discard)                  ping a node (keepalive)
//   connect_succeeded / connect_failed     close a node (then report backend_ended)
//   reset_done / ping_done                 cancel a connect (the pool closes)
//   closed_in_lease (the user closed it)   arm the upkeep timer
//   lease_dropped_after_close              report a lease held past leak_threshold
//   connection_lost (idle socket closed)
//   backend_ended
//   connect_abandoned (evicted while it
//     waited for a budget slot)
//   tick (the upkeep timer fired: also
//     times out waiters past their deadline)
//   close

#include <algorithm>
#include <array>
#include <boost/container/small_vector.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <random>
#include <source_location>
#include <vector>

#include "intrusive_list.hpp"
#include "node.hpp"

namespace pgrt::detail::pool {

using std::chrono::milliseconds;

// A consumer's share of the pool: it may hold at most `max` leases at once (whatever their
// priority), and is served before consumers at or above their own minimum while it holds fewer
// than `min`.
struct ConsumerLimits {
  std::size_t min = 0;
  std::size_t max = 0;
};

// The settings the core decides by (the driver's PoolConfig, without what only I/O needs).
struct CoreConfig {
  std::size_t max_size = 10;
  std::size_t min_idle = 0;
  std::size_t reserved_for_priority = 0;
  std::size_t max_waiters = 10'000;
  milliseconds acquire_timeout{30'000};
  milliseconds connect_timeout{10'000};  // how long a zero acquire_timeout waits for a connect
  milliseconds max_lifetime{0};          // 0: never
  double lifetime_jitter = 0.0;
  milliseconds idle_timeout{0};
  milliseconds keepalive_interval{0};
  milliseconds validate_after_idle{0};
  milliseconds leak_threshold{0};
  // Under a budget: how often the pool checks on the server that each of its connections still
  // holds its slot (Action::check_slots on a ping or reset); 0: never.
  milliseconds slot_check_interval{0};
  // An idle connection's socket is watched once it has been idle this long, so that a backend
  // the server ends meanwhile is noticed (0: never watched).
  milliseconds watch_idle_after{0};
  milliseconds backoff_initial{100};
  milliseconds backoff_max{10'000};
  double backoff_jitter = 0.0;
  bool reset_discard_all = false;  // ResetPolicy::discard_all
  // While every connect in a row has failed and no connection is alive, waiters fail after
  // waiting this long (FailReason::server_down); 0: off.
  milliseconds fail_fast_after{0};
  // Named consumers' shares (PoolConfig::consumers). The core puts the default consumer (acquires
  // that name none), {min 0, max max_size}, before them: named consumer i is ConsumerIndex i + 1.
  std::vector<ConsumerLimits> consumers;
};

// server_down: fail_fast_after passed with every connect failing; refused: a connect failed with
// an error that every later one would meet too (fail_waiting()).
enum class FailReason : std::uint8_t { pool_closed, timeout, cancelled, server_down, refused };

// One caller waiting for a connection. The driver owns it (on the waiting coroutine's frame) and
// derives from it to add its wake-up; the core queues it and decides its outcome exactly once.
struct Waiter {
  enum class Outcome : std::uint8_t { none, handed, failed };

  Waiter(Priority priority_in, std::source_location site_in,
         ConsumerIndex consumer_in = default_consumer) noexcept
      : priority(priority_in), consumer(consumer_in), site(site_in) {}
  Waiter(const Waiter&) = delete;
  Waiter& operator=(const Waiter&) = delete;
  Waiter(Waiter&&) = delete;
  Waiter& operator=(Waiter&&) = delete;
  ~Waiter() = default;

  const Priority priority;
  const ConsumerIndex consumer;
  const std::source_location site;
  std::uint64_t ticket = 0;  // arrival order, set by enqueue()
  Outcome outcome = Outcome::none;
  Node* handed = nullptr;  // Outcome::handed
  bool validate = false;   // Outcome::handed: it sat idle validate_after_idle; ping it before use
  FailReason failed = FailReason::timeout;  // Outcome::failed
  bool queued = false;
  Time enqueued_at{};
  // When the wait times out: tick() fails it then (FailReason::timeout, a wake). Time::max():
  // never; the driver then ends the wait itself (withdraw).
  Time deadline = Time::max();
  bool out_of_order = false;  // WaitQueues' bookkeeping: queued behind a later deadline
  Waiter* prev = nullptr;
  Waiter* next = nullptr;
};

// Callers waiting: one FIFO queue per consumer and priority. Which queue is served next is the
// core's decision (Core::next_waiter()).
//
// Each queue also knows whether it is in deadline order, so that timing waiters out looks only at
// the heads in the common case (every waiter of a queue waits as long as the one before it):
// scanning all W waiters on each of W successive timeouts would be O(W^2) under the pool's mutex.
class WaitQueues {
 public:
  explicit WaitQueues(std::size_t consumers) : queues_(consumers) {}
  [[nodiscard]] const IntrusiveList<Waiter>& of(Priority priority,
                                                ConsumerIndex consumer) const noexcept {
    return queues_[consumer][slot(priority)].waiters;
  }
  [[nodiscard]] std::size_t consumers() const noexcept { return queues_.size(); }
  [[nodiscard]] std::size_t size() const noexcept { return counts_[0] + counts_[1]; }
  [[nodiscard]] std::size_t size(Priority priority) const noexcept {
    return counts_[slot(priority)];
  }
  void push_back(Waiter& waiter) noexcept {
    Queue& queue = queue_of(waiter);
    // In order when no waiter queued before it (since the queue was last empty) has a later
    // deadline: then the queue, front to back, has deadlines that never decrease.
    waiter.out_of_order = waiter.deadline < queue.latest_deadline;
    if (waiter.out_of_order) {
      ++queue.out_of_order;
    } else {
      queue.latest_deadline = waiter.deadline;
    }
    queue.waiters.push_back(waiter);
    ++counts_[slot(waiter.priority)];
  }
  void remove(Waiter& waiter) noexcept {
    Queue& queue = queue_of(waiter);
    queue.waiters.remove(waiter);
    if (waiter.out_of_order) --queue.out_of_order;
    waiter.out_of_order = false;
    if (queue.waiters.empty()) queue.latest_deadline = Time::min();
    --counts_[slot(waiter.priority)];
  }
  // Calls `visit(Waiter&)` on every waiter of `priority`, consumer by consumer; `visit` may
  // remove() the waiter it is given.
  template <typename Visit>
  void for_each(Priority priority, Visit&& visit) {
    for (auto& queues : queues_) queues[slot(priority)].waiters.for_each(visit);
  }
  // Calls `expire(Waiter&)` on every waiter of `priority` whose deadline is at or before `now`
  // (`expire` must remove() it), and returns the earliest deadline left after `now`
  // (Time::max() if none). A queue in deadline order is looked at only up to its first waiter
  // still in time.
  template <typename Expire>
  Time expire(Priority priority, Time now, Expire&& expire) {
    Time next = Time::max();
    for (auto& queues : queues_) {
      Queue& queue = queues[slot(priority)];
      if (queue.out_of_order == 0) {
        while (!queue.waiters.empty() && queue.waiters.front()->deadline <= now) {
          expire(*queue.waiters.front());
        }
        if (!queue.waiters.empty()) next = std::min(next, queue.waiters.front()->deadline);
        continue;
      }
      // A full scan also judges the order afresh against the waiters still queued, so that once
      // the waiter that put a queue out of order has left, the queue is back to the short path.
      Time latest = Time::min();
      std::size_t out_of_order = 0;
      queue.waiters.for_each([&](Waiter& waiter) {
        if (waiter.deadline <= now) {
          expire(waiter);
          return;
        }
        next = std::min(next, waiter.deadline);
        waiter.out_of_order = waiter.deadline < latest;
        if (waiter.out_of_order) {
          ++out_of_order;
        } else {
          latest = waiter.deadline;
        }
      });
      queue.latest_deadline = latest;
      queue.out_of_order = out_of_order;
    }
    return next;
  }

 private:
  struct Queue {
    IntrusiveList<Waiter> waiters;
    // The latest deadline of the waiters queued in order since the queue was last empty.
    Time latest_deadline = Time::min();
    std::size_t out_of_order = 0;  // waiters queued with an earlier deadline than that
  };
  [[nodiscard]] static std::size_t slot(Priority priority) noexcept {
    return priority == Priority::high ? 1 : 0;
  }
  [[nodiscard]] Queue& queue_of(const Waiter& waiter) noexcept {
    return queues_[waiter.consumer][slot(waiter.priority)];
  }
  std::vector<std::array<Queue, 2>> queues_;  // [consumer][normal, high]
  std::array<std::size_t, 2> counts_{};
};

struct Action {
  enum class Kind : std::uint8_t {
    wake,            // `waiter` has its outcome (handed or failed): wake it
    open,            // connect `node`, then report connect_succeeded or connect_failed
    reset,           // ROLLBACK (and DISCARD ALL) `node`, then report reset_done
    ping,            // ping `node`, then report ping_done
    close,           // close `node` (for `reason`), then report backend_ended once it has ended
    cancel_connect,  // the pool closed: abandon connecting `node` (it still reports)
    arm_timer,       // call tick() at `at` (replaces any earlier arming)
    report_leak,     // `node` has been leased for `age` (past leak_threshold)
    watch,           // watch idle `node`'s socket; report connection_lost if the server ends it
    unwatch,         // stop watching `node` (it leaves idle); before any other action on it
  };
  Kind kind;
  Node* node = nullptr;
  Waiter* waiter = nullptr;
  DiscardReason reason = DiscardReason::closing;
  Time at{};
  milliseconds age{0};
  // ping, reset: also check which of the pool's connections still hold their budget slot, and
  // report those that do not with slot_lost().
  bool check_slots = false;
  // close: false for a connect given up on whose backend may still be starting up (not a
  // discarded connection: no PoolEvents::discarded for it).
  bool discarded = true;
};
using Actions = boost::container::small_vector<Action, 6>;

// Which nodes Core::limit_connections() retires before the others (the driver's choice: under a
// budget with classes, those on a shared slot).
using RetireFirst = std::function<bool(const Node&)>;

// How a lease came back, as the driver saw its connection.
enum class ReturnKind : std::uint8_t {
  clean,        // idle, nothing to reset
  needs_reset,  // in a transaction (or a failed one); the core adds DISCARD ALL when configured
  broken,       // the socket is gone or failed
  mid_query,    // a statement still running
  discard,      // Lease::discard()
  wrong_role,   // its server no longer serves the role target_session_attrs asks for
};

struct AcquireResult {
  enum class Kind : std::uint8_t {
    leased,      // `node` is leased to the caller now
    wait,        // enqueue a Waiter and wait at most `wait_limit`
    closed,      // the pool is closed
    queue_full,  // max_waiters are waiting
    no_wait,     // nothing free and acquire_timeout is 0 (counted as a timeout)
  };
  Kind kind;
  Node* node = nullptr;
  bool validate = false;  // leased: idle longer than validate_after_idle; ping before use
  milliseconds wait_limit{0};
};

// Counts, every one read off the node states or kept beside them by the core alone.
struct CoreStats {
  std::size_t max = 0;
  std::size_t live = 0;  // capacity tokens out: every node, in any state but detached
  std::array<std::size_t, node_state_count> nodes{};  // by NodeState
  std::size_t leased_normal = 0;
  std::size_t waiting_normal = 0;
  std::size_t waiting_high = 0;
  // Per consumer (index 0: the default one): leases held and callers waiting, both priorities.
  struct Consumer {
    std::size_t in_use = 0;
    std::size_t waiting = 0;
  };
  std::vector<Consumer> consumers;
  std::uint64_t acquired = 0, timeouts = 0, cancellations = 0, connect_attempts = 0,
                connect_errors = 0, discarded = 0, leaks_suspected = 0;
  std::array<std::uint64_t, discard_reason_count> discarded_by_reason{};
  Time oldest_waiter_since = Time::max();      // the enqueue time of the longest waiting caller
  std::size_t leases_past_leak_threshold = 0;  // leased nodes whose leak was reported
  std::uint32_t consecutive_connect_failures = 0;
  milliseconds connect_backoff{0};
  [[nodiscard]] std::size_t count(NodeState state) const noexcept {
    return nodes[static_cast<std::size_t>(state)];
  }
};

// How many connections to open now: a pure function of the pool's numbers.
struct SizingInput {
  std::size_t max_size = 0;
  std::size_t live = 0;        // every node
  std::size_t closing = 0;     // of them, being closed
  std::size_t connecting = 0;  // of them, being opened
  std::size_t idle = 0;
  std::size_t servable_waiters = 0;  // waiters the reserve rules let a new connection serve
  std::size_t min_idle = 0;
  bool backing_off = false;  // a connect failed and its backoff has not passed
  bool failing = false;      // the last connect failed: probe with one at a time
};
[[nodiscard]] std::size_t connections_to_open(const SizingInput& input) noexcept;

// The leases each consumer would hold if every `active` one kept asking for more, out of
// `capacity` connections: its min, then one at a time to the active consumer holding the fewest
// beyond its min (the lower index on a tie), each within its max. An idle consumer's share is 0.
[[nodiscard]] std::vector<std::size_t> fair_shares(const std::vector<ConsumerLimits>& limits,
                                                   const std::vector<bool>& active,
                                                   std::size_t capacity);

// How many transitions the core refused (a bug in the core; each also throws std::logic_error).
// The pool's tests check it stays 0.
std::uint64_t illegal_node_transitions() noexcept;

class Core {
 public:
  Core(CoreConfig config, std::uint64_t seed);
  Core(const Core&) = delete;
  Core& operator=(const Core&) = delete;
  Core(Core&&) = delete;
  Core& operator=(Core&&) = delete;
  ~Core();

  [[nodiscard]] const CoreConfig& config() const noexcept { return config_; }
  // Connections open and not closing: idle, leased, resetting or pinging (one may come back to
  // a waiter).
  [[nodiscard]] std::size_t live_connections() const noexcept {
    return by_state_[static_cast<std::size_t>(NodeState::idle)].size() +
           by_state_[static_cast<std::size_t>(NodeState::leased)].size() +
           by_state_[static_cast<std::size_t>(NodeState::resetting)].size() +
           by_state_[static_cast<std::size_t>(NodeState::pinging)].size();
  }
  // Refusing acquires: close() has run, or refuse_acquires() (close_now() on a thread that cannot
  // carry out close()'s actions: it refuses at once, and close() follows on the io_context).
  [[nodiscard]] bool closed() const noexcept { return closed_ || refusing_; }
  [[nodiscard]] bool close_done() const noexcept { return closed_; }
  void refuse_acquires() noexcept { refusing_ = true; }
  // Evicted (evict_all(), a budget slot or share lost) or past its lifetime: closed, not used
  // again, once nobody holds it.
  [[nodiscard]] static bool expired(const Node& node, Time now) noexcept {
    return node.evicted || now >= node.expires;
  }

  // --- events ----------------------------------------------------------------------------------

  // An acquire: leases an idle node at once when nobody of its priority (or higher) waits, else
  // says whether and how long to wait. May close expired idle nodes on the way.
  AcquireResult try_acquire(Priority priority, std::source_location site, Time now,
                            Actions& actions, ConsumerIndex consumer = default_consumer);
  // Queues `waiter` (after try_acquire said wait); may open connections for it. A waiter with a
  // deadline has the upkeep tick armed for it (at most one timer for all of them).
  void enqueue(Waiter& waiter, Time now, Actions& actions);
  // The waiter gives up (it was cancelled; a deadline the core does not keep, Waiter::deadline
  // being Time::max(), passed). False when it already has an outcome (a node was handed to it,
  // tick() timed it out, or the pool failed it): that outcome stands.
  bool withdraw(Waiter& waiter, FailReason why, Actions& actions);
  // Fails every waiting caller (FailReason::refused, counted as a timeout): the connect that just
  // failed (connect_failed()) met an error that no retry cures. Not while a connection is alive
  // (idle, leased, resetting or pinging): one may come back to them. The pool goes on retrying
  // with backoff, and a caller that comes later waits for the next connect.
  void fail_waiting(Actions& actions);
  // A lease ended.
  void lease_returned(Node& node, ReturnKind kind, Time now, Actions& actions);
  // The user closed a leased node's connection inside its lease: it is closed now (its capacity
  // comes back when its backend has ended), though the Lease still refers to it.
  void closed_in_lease(Node& node, Time now, Actions& actions);
  // The Lease of a node closed inside it (closed_in_lease) was dropped. A node whose backend has
  // already ended (detached) is destroyed; one still closing is destroyed when it ends.
  void lease_dropped_after_close(Node& node);
  // The on-checkout check (validate_after_idle, before_handout) found a leased node unusable.
  void checkout_failed(Node& node, DiscardReason reason, Time now, Actions& actions);
  void connect_succeeded(Node& node, Time now, Actions& actions);
  // `backpressure`: the connect worked but a shared limit refused it (a full budget): the next
  // attempt comes within max_backpressure_backoff at most, as a slot may come free any moment.
  // `backend_may_live`: the connect ran out of time once connected, and a backend may still be
  // starting up on the server: the node closes (Action::close, not counted as discarded) and its
  // capacity comes back at backend_ended(); the failure counts now all the same.
  void connect_failed(Node& node, Time now, Actions& actions, bool backpressure = false,
                      bool backend_may_live = false);
  static constexpr milliseconds max_backpressure_backoff{500};
  // A connect given up on because its node was evicted (evict_all()) while it waited for a budget
  // slot, its backend already ended: no failure (no backoff, no failure counted); the node goes,
  // and its replacement may open at once.
  void connect_abandoned(Node& node, Time now, Actions& actions);
  // A reset that failed (!ok) closes its node for `failure` (failed_reset, or server_role).
  void reset_done(Node& node, bool ok, Time now, Actions& actions,
                  DiscardReason failure = DiscardReason::failed_reset);
  // A ping that failed (!ok) closes its node for `failure` (broken, or server_role: the server
  // answered but no longer serves what target_session_attrs asks).
  void ping_done(Node& node, bool ok, Time now, Actions& actions,
                 DiscardReason failure = DiscardReason::broken);
  // The server (or the network) closed an idle node's socket. Ignored unless it is idle: a leased
  // one fails its user, who returns it broken.
  void connection_lost(Node& node, Actions& actions);
  // A closing node's backend has ended: its capacity is given back, and the node destroyed (or
  // detached, while a Lease it was closed in is still out).
  void backend_ended(Node& node, Time now, Actions& actions);
  // The upkeep timer: lifetime, idle timeout, keepalive, leak reports, connect retry.
  void tick(Time now, Actions& actions);
  // Soft eviction: idle nodes close now; every other node (connecting, leased, resetting, pinging)
  // closes instead of becoming idle again. New connections replace them as usual.
  void evict_all(Time now, Actions& actions);
  // Under a budget, while another process waits for a slot: holds at most `cap` connections
  // (fewer than max_size), closing the idle ones beyond it now and the others when they come back
  // (DiscardReason::budget_share), and opens none beyond it, for `valid_for`: a limit not applied
  // again by then lapses (the checks that confirm it need a connection). max_size (or more) lifts
  // it; connections retired for it and not yet closed are kept then.
  // `retire_first`: the nodes to retire before any other (empty: none preferred); among them
  // and then among the rest, idle ones first. Connects count apart: they hold no slot yet, and
  // the oldest may stay beyond the cap (to wait for a slot: at_connection_cap()); the others
  // beyond the room under the cap retire, newest first.
  void limit_connections(std::size_t cap, Time now, Actions& actions,
                         milliseconds valid_for = milliseconds(30'000),
                         const RetireFirst& retire_first = {});
  [[nodiscard]] std::size_t connection_cap() const noexcept { return cap_; }
  // Whether the connections past their connect, not retired, are as many as the cap or more:
  // under a budget, a connect then takes no slot, and waits (with the waiting marker) until the
  // cap rises or a connection goes. Taking one would put the pool above its fair share, and the
  // slot it gives back for that goes to whichever process looks first, not to the one short of
  // its share: the shares would never settle.
  [[nodiscard]] bool at_connection_cap() const noexcept;
  // The connections past their connect (idle, leased, resetting, pinging), not retired: under a
  // budget, each holds a slot.
  [[nodiscard]] std::size_t connections_holding_slots() const noexcept;
  // Under a budget: the server shows no slot held by `node`'s backend (it was unlocked by hand).
  // An idle node closes now; any other closes instead of becoming idle again
  // (DiscardReason::slot_lost).
  void slot_lost(Node& node, Time now, Actions& actions);
  // Refuses new acquires, fails every waiter, closes idle nodes and abandons connects.
  void close(Actions& actions);

  // --- reading ---------------------------------------------------------------------------------

  [[nodiscard]] CoreStats stats() const;
  [[nodiscard]] const IntrusiveList<Node>& nodes(NodeState state) const noexcept {
    return by_state_[static_cast<std::size_t>(state)];
  }
  [[nodiscard]] const WaitQueues& waiters() const noexcept { return waiters_; }
  // Calls `visit(Waiter&)` on every queued waiter, of both priorities (it must not remove it).
  template <typename Visit>
  void for_each_waiter(Visit&& visit) {
    for (Priority priority : {Priority::high, Priority::normal}) waiters_.for_each(priority, visit);
  }
  [[nodiscard]] bool can_lease(Priority priority) const noexcept {
    return priority == Priority::high ||
           leased_normal_ + config_.reserved_for_priority < config_.max_size;
  }
  // The consumers' limits, index 0 the default consumer.
  [[nodiscard]] const std::vector<ConsumerLimits>& consumer_limits() const noexcept {
    return limits_;
  }
  // A lease of `priority` for `consumer` is allowed now (below the consumer's max, and outside
  // the reserved connections for a normal one).
  [[nodiscard]] bool can_lease(Priority priority, ConsumerIndex consumer) const noexcept {
    return can_lease(priority) && in_use_[consumer] < limits_[consumer].max;
  }
  // The waiter a free connection goes to next, or null: the high priority first (a normal one
  // only outside the reserved connections); within a priority, among the consumers below their
  // max, first those below their min, then the one holding the fewest leases, then the one whose
  // first waiter came first. FIFO within one consumer and priority.
  [[nodiscard]] Waiter* next_waiter() const noexcept;
  // Everything is closed and every backend has ended.
  [[nodiscard]] bool drained() const noexcept { return capacity_.taken() == 0; }
  // How many more normal leases could be handed out soon without waiting for a lease to come
  // back: idle connections, those opening or in a background reset or ping, and capacity to
  // open more, within the reserved ones, less the callers already waiting (they come first).
  [[nodiscard]] std::size_t lendable() const noexcept {
    const std::size_t unreserved = config_.max_size > config_.reserved_for_priority
                                       ? config_.max_size - config_.reserved_for_priority
                                       : 0;
    const std::size_t allowed = unreserved > leased_normal_ ? unreserved - leased_normal_ : 0;
    const std::size_t there = nodes(NodeState::idle).size() + nodes(NodeState::connecting).size() +
                              nodes(NodeState::resetting).size() +
                              nodes(NodeState::pinging).size() + capacity_.available();
    const std::size_t free_now = std::min(allowed, there);
    return free_now > waiters_.size() ? free_now - waiters_.size() : 0;
  }

 private:
  void move(Node& node, NodeState to);
  [[nodiscard]] IntrusiveList<Node>& list(NodeState state) noexcept {
    return by_state_[static_cast<std::size_t>(state)];
  }
  void lease(Node& node, Priority priority, ConsumerIndex consumer, std::source_location site,
             Time now, Actions& actions);
  // Leases `node` (idle, or coming back) to `waiter`, taken off its queue, and wakes it.
  void hand(Node& node, Waiter& waiter, Time now, Actions& actions);
  void stop_watching(Node& node, Actions& actions);
  void offer(Node& node, Time now, bool used, Actions& actions);
  void serve_idle(Time now, Actions& actions);
  void close_node(Node& node, DiscardReason reason, Actions& actions);
  void destroy(Node& node);
  void maybe_open(Time now, Actions& actions);
  // CoreConfig::fail_fast_after: fails the waiters that have waited that long while the server is
  // down (every connect in a row failed, nothing alive), and arms a tick for the next one.
  void fail_fast(Time now, Actions& actions);
  // A queued waiter fails with `why` and is woken; a timeout (its deadline, fail_fast) counts.
  void fail_queued(Waiter& waiter, FailReason why, Actions& actions);
  // Fails the waiters whose deadline has come (tick()); `next` gets the earliest one still ahead.
  void time_out_waiters(Time now, Time& next, Actions& actions);
  void want_tick(Time at, Actions& actions);
  [[nodiscard]] Time deadline_of(const Node& node) const noexcept;
  [[nodiscard]] Time lifetime_deadline(Time now);
  [[nodiscard]] milliseconds next_backoff();
  // Idle for validate_after_idle or longer: pinged before it is handed out.
  [[nodiscard]] bool needs_validation(const Node& node, Time now) const noexcept {
    return config_.validate_after_idle.count() > 0 &&
           now - node.idle_since >= config_.validate_after_idle;
  }
  // Why an expired() node is closed.
  [[nodiscard]] static DiscardReason expiry_reason(const Node& node) noexcept {
    return node.evicted ? node.evict_reason : DiscardReason::lifetime;
  }
  [[nodiscard]] std::size_t servable_waiters() const noexcept;
  // Marks `node` to close instead of becoming idle again (unless it already is, for a reason of
  // its own). The budget's fair share retires provisionally (a lifted cap keeps what it had
  // retired): any other reason takes its place, and is never undone.
  static void retire(Node& node, DiscardReason reason) noexcept {
    if (node.evicted && node.evict_reason != DiscardReason::budget_share) return;
    node.evicted = true;
    node.evict_reason = reason;
  }
  [[nodiscard]] bool slot_check_due(Time now) const noexcept {
    return config_.slot_check_interval.count() > 0 && now >= next_slot_check_;
  }
  [[nodiscard]] Waiter* next_waiter(Priority priority) const noexcept;

  const CoreConfig config_;
  const std::vector<ConsumerLimits> limits_;  // [0]: the default consumer
  std::size_t cap_;                           // limit_connections(); max_size when not limited
  Time cap_until_ = Time::max();              // when a limit lapses
  std::vector<std::size_t> in_use_;           // leases per consumer; kept by move() alone
  Capacity capacity_;
  std::array<IntrusiveList<Node>, node_state_count> by_state_;
  WaitQueues waiters_;
  std::size_t leased_normal_ = 0;  // kept by move() alone
  bool closed_ = false;
  bool refusing_ = false;   // refuse_acquires()
  Time last_failure_at_{};  // the last connect_failed()
  std::uint64_t next_node_id_ = 1;
  std::uint64_t next_ticket_ = 1;

  std::uint32_t consecutive_failures_ = 0;
  Time retry_at_{};
  milliseconds backoff_{0};
  Time timer_at_ = Time::max();         // when the driver's upkeep timer is armed for
  Time next_slot_check_ = Time::max();  // set at the first connect

  std::uint64_t acquired_ = 0, timeouts_ = 0, cancellations_ = 0, connect_attempts_ = 0,
                connect_errors_ = 0, discarded_ = 0, leaks_suspected_ = 0;
  std::array<std::uint64_t, discard_reason_count> discarded_by_reason_{};
  std::mt19937_64 random_;
};

}  // namespace pgrt::detail::pool
