#pragma once

// The connection budget (PoolConfig::budget, docs/budget.md): each pooled connection holds one
// of the budget's slots, a session-level advisory lock (key, slot) on the server, for as long as
// it lives. Taking a slot runs right after the connect, before any user statement, and at most one
// backend per io_context is between its connect and its slot at a time (ProbeGate).

#include <atomic>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/execution_context.hpp>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "pgrt/db/connection.hpp"
#include "pgrt/db/pool.hpp"

namespace pgrt::detail {

// What looking for a slot found: the slot taken, or none free and how many are held.
struct SlotSearch {
  std::optional<std::size_t> slot;
  std::size_t holders = 0;
  // With a slot: the backend that holds it, from the server (pg_backend_pid(): behind a pooler
  // the connection's own BackendKeyData pid is the pooler's).
  int backend_pid = 0;
  // With a slot: the server that holds it, as it tells in the same statement (two entries of a
  // multi-host conninfo may name one server, under names or addresses that differ): when its
  // postmaster started, and its port ("<epoch microseconds> <port>": the same text whatever the
  // session's settings).
  std::string server;
  // No slot taken, as the pool held its fair share (take_budget_slot()'s may_take false).
  bool held_back = false;
};

// A backend holding one of a budget's slots, or its waiting marker, as pg_locks shows it.
struct SlotHolder {
  std::size_t slot = 0;
  int pid = 0;
  std::string tag;       // its application_name: one per process (pgrt's connection tag)
  bool waiting = false;  // the waiting marker (budget_waiting_key()), not a slot
};

// Every holder of `budget`'s slots and waiting markers in the connection's database (one query
// of pg_locks and pg_stat_activity). `members`, if given, gets the class membership markers
// (budget_member_key()), each as a SlotHolder whose `slot` is the class marker.
[[nodiscard]] boost::asio::awaitable<std::vector<SlotHolder>> budget_slot_holders(
    Connection& connection, const Budget& budget, std::vector<SlotHolder>* members = nullptr);

// The first key of a budget's waiting markers: a connect that found no free slot holds
// pg_advisory_lock_shared(budget_waiting_key, budget_class_marker()) while it waits for one, so
// that the processes holding slots see that another waits (and keep to their fair share).
[[nodiscard]] std::int32_t budget_waiting_key(const Budget& budget);

// The first key of a budget's class membership markers: each connection of a pool with a class
// holds pg_advisory_lock_shared(budget_member_key, budget_class_marker()) beside its slot, so
// that every process sees which class a process belongs to, also while it holds only shared
// slots (the fair shares split a class's slots among its processes).
[[nodiscard]] std::int32_t budget_member_key(const Budget& budget);

// How many slots one process may keep while others wait: its class's own slots split evenly among
// the `class_processes` of its class, plus the shared slots split evenly among all `processes`
// holding slots or waiting for one (at least 1 in all). A remainder goes one slot each to the
// first processes by `rank` (its place among the processes' tags, sorted) and `class_rank` (among
// its class's).
[[nodiscard]] std::size_t budget_fair_share(const Budget& budget, std::size_t processes,
                                            std::size_t class_processes, std::size_t rank,
                                            std::size_t class_rank);

// The pool's class as its waiting marker's second key: its index in Budget::classes plus 1, or 0
// without a class.
[[nodiscard]] std::size_t budget_class_marker(const Budget& budget);
// The class (index plus 1) whose slots include `slot`, or 0 for a shared slot.
[[nodiscard]] std::size_t budget_class_of_slot(const Budget& budget, std::size_t slot);

// A random number in [0, bound), from a per-thread generator. Not inlined, and so safe to call
// from a coroutine: g++ may keep a thread_local's address across a co_await, and a coroutine
// that resumes on another thread would then use the first thread's (perhaps gone) generator.
[[nodiscard]] std::size_t random_below(std::size_t bound);

// Slots [begin, end) of a budget.
struct SlotRange {
  std::size_t begin = 0;
  std::size_t end = 0;
};
// The slots a pool of the budget's class_name may take, in the order it tries them: its class's
// own, then the shared ones (those after the last class).
[[nodiscard]] std::vector<SlotRange> slot_ranges(const Budget& budget);

// Why a connect found no slot: "the connection budget 'k' is full: all 40 slots are held (40
// holders, ...)", or the same for a class.
[[nodiscard]] std::string describe_full_budget(const Budget& budget, std::size_t holders);
// Why a connect took no slot although it may have found one free: "this pool holds its fair
// share of the connection budget 'k' (2 connection(s)) while another process waits for a slot
// (5 of its 6 slots are held, ...)".
[[nodiscard]] std::string describe_budget_share(const Budget& budget, std::size_t share,
                                                std::size_t holders);
// describe_budget_share() for a search held back, describe_full_budget() otherwise.
[[nodiscard]] std::string describe_slot_search(const Budget& budget, const SlotSearch& search,
                                               std::size_t share);

// Takes a free slot on `connection`: reads which slots the server shows held (pg_locks), then
// tries the others one by one, from a random start, with pg_try_advisory_lock (one lock per
// statement: never a set-returning query that could take several; the statement that takes it
// also reads the backend's pid and the server's identity: SlotSearch). Errors as
// Connection::query().
// With `may_take` false (the pool holds its fair share: Core::at_connection_cap()) it only counts
// the holders.
[[nodiscard]] boost::asio::awaitable<SlotSearch> take_budget_slot(Connection& connection,
                                                                  const Budget& budget,
                                                                  bool may_take = true);

// The turn to have a backend without a slot: enter(lane) waits until no other connect of any
// pool on the same execution context (io_context) with the same budget key and class, on the same
// server and database (lane_of()), is between its connect and its slot. Connects under other
// budgets or classes, or to another database, never wait on it.
// A service of the context: it goes with it, and with it every turn and waiter (a process that
// runs one io_context, as the lifecycle manager does, has one gate). A turn is bounded by a
// connect (connect_timeout), a wait for a slot (connect_timeout), a few statements and
// server_close_warning.
class ProbeGate : public boost::asio::execution_context::service {
 public:
  static boost::asio::execution_context::id id;
  explicit ProbeGate(boost::asio::execution_context& context);
  ~ProbeGate() override;
  ProbeGate(const ProbeGate&) = delete;
  ProbeGate& operator=(const ProbeGate&) = delete;
  ProbeGate(ProbeGate&&) = delete;
  ProbeGate& operator=(ProbeGate&&) = delete;

  // The gate of the context `executor` runs on.
  static ProbeGate& of(const boost::asio::any_io_executor& executor);
  // The lane of a budget's pools: its key and class, and how `conninfo` names the server and
  // database (advisory locks are per database: the same key elsewhere is another budget): every
  // keyword it gives but secrets and the application name, and the PG* variables it leaves to.
  [[nodiscard]] static std::string lane_of(const Budget& budget, const std::string& conninfo);
  // True with the turn of `lane` (leave(lane) gives it on); false, without it, when the awaiting
  // coroutine was cancelled while it waited (its cancellation slot: a closing pool).
  [[nodiscard]] boost::asio::awaitable<bool> enter(std::string lane);
  void leave(const std::string& lane) noexcept;
  // Whether the connect with the turn of `lane` waits for a slot of a full budget: set by that
  // connect, cleared when the turn passes. (Shared: a pool keeps it to name a full budget as the
  // reason its callers time out while its connect waits for the turn.)
  [[nodiscard]] std::shared_ptr<std::atomic<bool>> holder_waits_for_slot(const std::string& lane);

 private:
  void shutdown() override;
  struct State;
  std::unique_ptr<State> state_;
};

// DISCARD ALL for a connection that holds budget slot `slot`, in one round trip (one more per
// pass while a lock taken twice in the lease is held still): its statements,
// with every advisory lock released (the caller's too) but the slot's own, which never leaves the
// connection. A slot released by hand in the lease is taken again; throws Error(budget_exhausted)
// if another process took it meanwhile (the reset then fails and the pool closes the connection:
// the budget is never exceeded). Forgets the prepared statements.
[[nodiscard]] boost::asio::awaitable<void> discard_all_keeping_slot(Connection& connection,
                                                                    const Budget& budget,
                                                                    std::size_t slot);

}  // namespace pgrt::detail
