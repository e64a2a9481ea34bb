#pragma once

// The connection budget (PoolConfig::budget, docs/budget.md): each pooled connection holds one
// of the budget's slots, a session-level advisory lock (key, slot) on the server, for as long as
// it lives. Taking a slot runs right after the connect, before any user statement, and at most one
// backend per process is between its connect and its slot at a time (ProbeGate).

#include <boost/asio/awaitable.hpp>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "pgrt/db/connection.hpp"
#include "pgrt/db/pool.hpp"

namespace pgrt::detail {

// What looking for a slot found: the slot taken, or none free and how many are held.
struct SlotSearch {
  std::optional<std::size_t> slot;
  std::size_t holders = 0;
};

// Takes a free slot on `connection`: reads which slots the server shows held (pg_locks), then
// tries the others one by one, from a random start, with pg_try_advisory_lock (one lock per
// statement: never a set-returning query that could take several). Errors as Connection::query().
[[nodiscard]] boost::asio::awaitable<SlotSearch> take_budget_slot(Connection& connection,
                                                                  const Budget& budget);

// The process's turn to have a backend without a slot: enter() waits until no other connect of
// any pool of this process is between its connect and its slot. Not cancellable; every turn is
// bounded by a connect (connect_timeout) and a few statements.
class ProbeGate {
 public:
  static ProbeGate& instance();
  [[nodiscard]] boost::asio::awaitable<void> enter();
  void leave() noexcept;

 private:
  struct State;
  ProbeGate();
  State* state_;
};

// DISCARD ALL's statements except pg_advisory_unlock_all(): the discard_all reset of a pool under
// a budget, which must keep its slot. Forgets the connection's prepared statements.
[[nodiscard]] boost::asio::awaitable<void> discard_all_but_advisory_locks(Connection& connection);

}  // namespace pgrt::detail
