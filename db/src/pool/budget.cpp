#include "budget.hpp"

#include <algorithm>
#include <atomic>
#include <boost/asio/append.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/execution/context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/query.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <string_view>

#include "../connection/conninfo.hpp"
#include "../connection_access.hpp"
#include "pgrt/db/pipeline.hpp"

namespace pgrt {

std::int32_t budget_lock_key(std::string_view budget_key) noexcept {
  std::uint32_t hash = 2166136261U;
  for (const char c : budget_key) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 16777619U;
  }
  return static_cast<std::int32_t>(hash);
}

}  // namespace pgrt

namespace pgrt::detail {

namespace asio = boost::asio;

std::int32_t budget_waiting_key(const Budget& budget) {
  return budget_lock_key(budget.key + "/waiting");
}

std::int32_t budget_member_key(const Budget& budget) {
  return budget_lock_key(budget.key + "/members");
}

[[gnu::noinline]] std::size_t random_below(std::size_t bound) {
  thread_local std::minstd_rand random(std::random_device{}());
  return std::uniform_int_distribution<std::size_t>(0, bound - 1)(random);
}

namespace {
std::size_t classes_slots(const Budget& budget) {
  std::size_t total = 0;
  for (const Budget::Class& slot_class : budget.classes) total += slot_class.slots;
  return total;
}
}  // namespace

std::vector<SlotRange> slot_ranges(const Budget& budget) {
  std::vector<SlotRange> ranges;
  std::size_t begin = 0;
  for (const Budget::Class& slot_class : budget.classes) {
    if (slot_class.name == budget.class_name) {
      ranges.push_back({.begin = begin, .end = begin + slot_class.slots});
    }
    begin += slot_class.slots;
  }
  if (begin < budget.slots) ranges.push_back({.begin = begin, .end = budget.slots});
  return ranges;
}

std::size_t budget_class_marker(const Budget& budget) {
  for (std::size_t i = 0; i < budget.classes.size(); ++i) {
    if (budget.classes[i].name == budget.class_name) return i + 1;
  }
  return 0;
}

std::size_t budget_class_of_slot(const Budget& budget, std::size_t slot) {
  std::size_t end = 0;
  for (std::size_t i = 0; i < budget.classes.size(); ++i) {
    end += budget.classes[i].slots;
    if (slot < end) return i + 1;
  }
  return 0;
}

std::size_t budget_fair_share(const Budget& budget, std::size_t processes,
                              std::size_t class_processes, std::size_t rank,
                              std::size_t class_rank) {
  const std::size_t shared = budget.slots - classes_slots(budget);
  const std::size_t my_class = budget_class_marker(budget);
  const std::size_t own = my_class == 0 ? 0 : budget.classes[my_class - 1].slots;
  // An even split, and what does not split evenly one more each for the first in the order
  // every process sees alike (their tags sorted): 6 slots over 4 processes are 2, 2, 1, 1, so
  // the shares add up to the whole budget.
  const auto split = [](std::size_t slots, std::size_t among, std::size_t my_rank) {
    among = std::max<std::size_t>(1, among);
    return slots / among + (my_rank < slots % among ? 1 : 0);
  };
  return std::max<std::size_t>(
      1, split(own, class_processes, class_rank) + split(shared, processes, rank));
}

std::string describe_full_budget(const Budget& budget, std::size_t holders) {
  const std::string counted = " holders, counting every process and host that shares it)";
  if (budget.classes.empty()) {
    return "the connection budget '" + budget.key + "' is full: all " +
           std::to_string(budget.slots) + " slots are held (" + std::to_string(holders) + counted;
  }
  const std::size_t shared = budget.slots - classes_slots(budget);
  std::string mine;
  for (const Budget::Class& slot_class : budget.classes) {
    if (slot_class.name == budget.class_name) {
      mine = "its class '" + slot_class.name + "' has " + std::to_string(slot_class.slots) +
             " slots and " + std::to_string(shared) + " are shared";
    }
  }
  if (mine.empty()) mine = "a pool without a class takes the " + std::to_string(shared) + " shared";
  return "the connection budget '" + budget.key + "' has no slot free for this pool (" + mine +
         ", all held; " + std::to_string(holders) + " of its " + std::to_string(budget.slots) +
         " slots are held, counting every process and host that shares it)";
}

std::string describe_budget_share(const Budget& budget, std::size_t share, std::size_t holders) {
  return "this pool holds its fair share of the connection budget '" + budget.key + "' (" +
         std::to_string(share) + " connection(s)) while another process waits for a slot (" +
         std::to_string(holders) + " of its " + std::to_string(budget.slots) +
         " slots are held, counting every process and host that shares it)";
}

std::string describe_slot_search(const Budget& budget, const SlotSearch& search,
                                 std::size_t share) {
  return search.held_back ? describe_budget_share(budget, share, search.holders)
                          : describe_full_budget(budget, search.holders);
}

asio::awaitable<std::vector<SlotHolder>> budget_slot_holders(Connection& connection,
                                                             const Budget& budget,
                                                             std::vector<SlotHolder>* members) {
  // Advisory locks are per database; pg_locks shows the (int4, int4) form's keys as classid and
  // objid (unsigned), with objsubid 2. The last column: 0 a slot, 1 a waiting marker, 2 a class
  // membership marker.
  // Every name schema-qualified, operators too (OPERATOR(pg_catalog.=)): a role whose search_path
  // puts a schema of its own before pg_catalog (or a temporary view named pg_locks) must not
  // change what the budget reads. The keys compare as int4 (an oid cast to int4 keeps its bits).
  const Result rows = co_await connection.query(
      "SELECT l.objid::pg_catalog.int8, l.pid, coalesce(a.application_name, ''), CASE WHEN "
      "l.classid::pg_catalog.int4 OPERATOR(pg_catalog.=) $2 THEN 1 WHEN "
      "l.classid::pg_catalog.int4 OPERATOR(pg_catalog.=) $3 THEN 2 ELSE 0 END FROM "
      "pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid "
      "OPERATOR(pg_catalog.=) l.pid WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory' AND "
      "l.granted AND l.objsubid OPERATOR(pg_catalog.=) 2 AND l.classid::pg_catalog.int4 "
      "OPERATOR(pg_catalog.=) ANY (ARRAY[$1, $2, $3]::pg_catalog.int4[]) AND l.database "
      "OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname "
      "OPERATOR(pg_catalog.=) pg_catalog.current_database())",
      budget_lock_key(budget.key), budget_waiting_key(budget), budget_member_key(budget));
  std::vector<SlotHolder> holders;
  for (const Row& row : rows) {
    const auto kind = row.get<std::int32_t>(3);
    SlotHolder holder{.slot = static_cast<std::size_t>(row.get<std::int64_t>(0)),
                      .pid = row.get<std::int32_t>(1),
                      .tag = row.get<std::string>(2),
                      .waiting = kind == 1};
    if (kind == 2) {
      if (members != nullptr) members->push_back(std::move(holder));
    } else {
      holders.push_back(std::move(holder));
    }
  }
  co_return holders;
}

asio::awaitable<void> mark_class_member(Connection& connection, const Budget& budget) {
  const std::size_t marker = budget_class_marker(budget);
  if (marker == 0) co_return;
  // Shared: never waits (nobody takes the key exclusively), and every connection of the class
  // holds it alike.
  (void)co_await connection.query(
      "SELECT pg_catalog.pg_advisory_lock_shared($1::pg_catalog.int4, $2::pg_catalog.int4)",
      budget_member_key(budget), static_cast<std::int32_t>(marker));
}

asio::awaitable<SlotSearch> take_budget_slot(Connection& connection, const Budget& budget,
                                             bool may_take) {
  const std::int32_t key = budget_lock_key(budget.key);
  const std::vector<SlotHolder> holders = co_await budget_slot_holders(connection, budget);
  std::set<std::size_t> held;
  for (const SlotHolder& holder : holders) {
    if (!holder.waiting) held.insert(holder.slot);
  }
  SlotSearch search;
  const std::vector<SlotRange> ranges = may_take ? slot_ranges(budget) : std::vector<SlotRange>{};
  for (const SlotRange& range : ranges) {
    const std::size_t size = range.end - range.begin;
    const std::size_t start = random_below(size);
    for (std::size_t step = 0; step < size; ++step) {
      const std::size_t slot = range.begin + (start + step) % size;
      if (held.count(slot) != 0) continue;
      const Result taken = co_await connection.query(
          "SELECT pg_catalog.pg_try_advisory_lock($1::pg_catalog.int4, $2::pg_catalog.int4), "
          "pg_catalog.pg_backend_pid(), (EXTRACT(epoch FROM "
          "pg_catalog.pg_postmaster_start_time()) OPERATOR(pg_catalog.*) "
          "1000000)::pg_catalog.int8, pg_catalog.current_setting('port')",
          key, static_cast<std::int32_t>(slot));
      if (taken[0].get<bool>(0)) {
        search.slot = slot;
        search.backend_pid = taken[0].get<std::int32_t>(1);
        // (Whole microseconds: a float8 as text would change with extra_float_digits.)
        search.server =
            std::to_string(taken[0].get<std::int64_t>(2)) + " " + taken[0].get<std::string>(3);
        co_await mark_class_member(connection, budget);
        co_return search;
      }
      held.insert(slot);  // taken meanwhile by another process
    }
  }
  search.holders = held.size();
  search.held_back = !may_take;
  co_return search;
}

namespace {

// A suspended enter(), resumed on its own executor: with the turn (true), or cancelled (false).
struct Resumption {
  virtual ~Resumption() = default;
  virtual void resume(bool granted) = 0;
};

template <typename Handler>
struct HandlerResumption final : Resumption {
  explicit HandlerResumption(Handler&& handler_in) : handler(std::move(handler_in)) {}
  void resume(bool granted) override {
    auto executor = asio::get_associated_executor(handler);
    asio::post(executor, asio::append(std::move(handler), granted));
  }
  Handler handler;
};

struct Waiter {
  std::uint64_t id = 0;
  std::unique_ptr<Resumption> resumption;
};

struct Lane {
  bool busy = false;
  std::deque<Waiter> waiting;
};

}  // namespace

struct ProbeGate::State {
  std::mutex mutex;
  std::map<std::string, Lane, std::less<>> lanes;  // a lane that is free and empty is erased
  // Per lane, kept for the context's life (a process has a few lanes): whether the connect with
  // the turn waits for a slot of a full budget.
  std::map<std::string, std::shared_ptr<std::atomic<bool>>, std::less<>> holder_waits;
  std::uint64_t next_waiter = 0;
};

asio::execution_context::id ProbeGate::id;

ProbeGate::ProbeGate(asio::execution_context& context)
    : asio::execution_context::service(context), state_(std::make_unique<State>()) {}

ProbeGate::~ProbeGate() = default;

void ProbeGate::shutdown() {
  std::map<std::string, Lane, std::less<>> lanes;
  {
    std::lock_guard lock(state_->mutex);
    lanes.swap(state_->lanes);
  }
  // Destroyed without resuming: the context is going away with every coroutine on it.
}

ProbeGate& ProbeGate::of(const asio::any_io_executor& executor) {
  return asio::use_service<ProbeGate>(asio::query(executor, asio::execution::context));
}

std::string ProbeGate::lane_of(const Budget& budget, const std::string& conninfo) {
  // Each part with its length first: no two different lists make the same text.
  std::string lane;
  const auto add = [&lane](std::string_view part) {
    lane += std::to_string(part.size()) + ":" + std::string(part) + "/";
  };
  add(budget.key);
  add(budget.class_name);
  // Where the advisory locks live, as far as the conninfo names it: each keyword it gives, in
  // keyword order (a URL and its key=value form name one lane), and the PG* variable of each that
  // picks the server or database and that it leaves out. A service file's values are not read:
  // the service's name stands for them. Secrets (a password) stay out. A conninfo libpq cannot
  // parse fails its connect anyway.
  const ParsedConninfo parsed = parse_conninfo(conninfo);
  std::map<std::string, std::string, std::less<>> naming(parsed.values.begin(),
                                                         parsed.values.end());
  for (const auto& [keyword, variable] : {std::pair{"host", "PGHOST"},
                                          {"hostaddr", "PGHOSTADDR"},
                                          {"port", "PGPORT"},
                                          {"dbname", "PGDATABASE"},
                                          {"user", "PGUSER"},
                                          {"service", "PGSERVICE"},
                                          {"target_session_attrs", "PGTARGETSESSIONATTRS"}}) {
    naming[keyword] = parsed.get(keyword, variable);
  }
  for (const auto& [keyword, value] : naming) {
    if (keyword.find("password") != std::string::npos || keyword == "application_name" ||
        keyword == "fallback_application_name") {
      continue;
    }
    add(keyword);
    add(value);
  }
  return lane;
}

asio::awaitable<bool> ProbeGate::enter(std::string lane) {
  State& state = *state_;
  {
    std::lock_guard lock(state.mutex);
    Lane& entry = state.lanes[lane];
    if (!entry.busy) {
      entry.busy = true;
      co_return true;
    }
  }
  // Named: g++ 12 miscompiles capturing lambdas written inside a co_await.
  auto initiation = [&state, &lane](auto handler) {
    std::unique_lock lock(state.mutex);
    Lane& entry = state.lanes[lane];
    if (!entry.busy) {  // left meanwhile
      entry.busy = true;
      lock.unlock();
      auto executor = asio::get_associated_executor(handler);
      asio::post(executor, asio::append(std::move(handler), true));
      return;
    }
    const std::uint64_t waiter_id = ++state.next_waiter;
    auto slot = asio::get_associated_cancellation_slot(handler);
    entry.waiting.push_back(
        {waiter_id, std::make_unique<HandlerResumption<decltype(handler)>>(std::move(handler))});
    if (slot.is_connected()) {
      // Leaves the queue, if still in it: the turn goes on to the others. Run on the waiter's own
      // executor (asio's cancellation contract), so the waiter, and the state, are alive.
      slot.assign([&state, lane, waiter_id](asio::cancellation_type) {
        std::unique_lock cancel_lock(state.mutex);
        auto found = state.lanes.find(lane);
        if (found == state.lanes.end()) return;
        auto& waiting = found->second.waiting;
        auto waiter = std::find_if(
            waiting.begin(), waiting.end(),
            [waiter_id](const Waiter& candidate) { return candidate.id == waiter_id; });
        if (waiter == waiting.end()) return;  // given the turn already
        auto resumption = std::move(waiter->resumption);
        waiting.erase(waiter);
        cancel_lock.unlock();
        resumption->resume(false);
      });
    }
  };
  co_return co_await asio::async_initiate<decltype(asio::use_awaitable), void(bool)>(
      initiation, asio::use_awaitable);
}

std::shared_ptr<std::atomic<bool>> ProbeGate::holder_waits_for_slot(const std::string& lane) {
  State& state = *state_;
  std::lock_guard lock(state.mutex);
  auto& flag = state.holder_waits[lane];
  if (!flag) flag = std::make_shared<std::atomic<bool>>(false);
  return flag;
}

void ProbeGate::leave(const std::string& lane) noexcept {
  State& state = *state_;
  std::unique_lock lock(state.mutex);
  if (auto flag = state.holder_waits.find(lane); flag != state.holder_waits.end()) {
    flag->second->store(false);  // the turn passes (or nobody has it)
  }
  auto found = state.lanes.find(lane);
  if (found == state.lanes.end()) return;
  Lane& entry = found->second;
  if (entry.waiting.empty()) {
    state.lanes.erase(found);
    return;
  }
  auto next = std::move(entry.waiting.front().resumption);  // the turn passes: busy stays set
  entry.waiting.pop_front();
  lock.unlock();
  next->resume(true);
}

namespace {

// pg_advisory_unlock_all() but for the connection's own slot, (key, slot) taken exclusively: one
// pass over what pg_locks shows this session holding, each lock released once (a lock taken twice
// shows once, and goes in the next pass); it answers how many it released and whether the slot
// is held, taken again if it was not (released by hand in the lease; once: a second hold of it
// would outlive the next reset). One read of pg_locks: the slot is never released here, and no
// other session can release it, so what the read shows of it holds to the end of the statement;
// the slot is taken again after every release (the aggregate's result is computed once its
// input has been read). Plain SQL, not a DO block: a role may be refused USAGE on PL/pgSQL
// (pg_advisory_unlock_all() needs no privilege).
// $1, $2: the slot's (key, slot); with $5, (key $3, marker $4) taken shared is kept as well.
constexpr const char* unlock_all_but_slot_sql =
    "SELECT coalesce(pg_catalog.sum(CASE WHEN l.objsubid OPERATOR(pg_catalog.=) 2 AND l.mode "
    "OPERATOR(pg_catalog.=) 'ExclusiveLock' AND l.classid::pg_catalog.int4 "
    "OPERATOR(pg_catalog.=) $1 AND l.objid::pg_catalog.int4 OPERATOR(pg_catalog.=) $2 THEN 0 "
    "WHEN $5 AND l.objsubid OPERATOR(pg_catalog.=) 2 AND l.mode OPERATOR(pg_catalog.=) "
    "'ShareLock' AND l.classid::pg_catalog.int4 OPERATOR(pg_catalog.=) $3 AND "
    "l.objid::pg_catalog.int4 OPERATOR(pg_catalog.=) $4 THEN 0 WHEN l.objsubid "
    "OPERATOR(pg_catalog.=) 1 AND l.mode OPERATOR(pg_catalog.=) 'ExclusiveLock' THEN CASE WHEN "
    "pg_catalog.pg_advisory_unlock((l.classid::pg_catalog.int8 OPERATOR(pg_catalog.<<) 32) "
    "OPERATOR(pg_catalog.|) l.objid::pg_catalog.int8) THEN 1 ELSE 0 END WHEN l.objsubid "
    "OPERATOR(pg_catalog.=) 1 THEN CASE WHEN "
    "pg_catalog.pg_advisory_unlock_shared((l.classid::pg_catalog.int8 OPERATOR(pg_catalog.<<) "
    "32) OPERATOR(pg_catalog.|) l.objid::pg_catalog.int8) THEN 1 ELSE 0 END WHEN l.mode "
    "OPERATOR(pg_catalog.=) 'ExclusiveLock' THEN CASE WHEN "
    "pg_catalog.pg_advisory_unlock(l.classid::pg_catalog.int4, l.objid::pg_catalog.int4) THEN 1 "
    "ELSE 0 END ELSE CASE WHEN pg_catalog.pg_advisory_unlock_shared(l.classid::pg_catalog.int4, "
    "l.objid::pg_catalog.int4) THEN 1 ELSE 0 END END), 0)::pg_catalog.int8, CASE WHEN "
    "coalesce(pg_catalog.bool_or(l.objsubid OPERATOR(pg_catalog.=) 2 AND l.mode "
    "OPERATOR(pg_catalog.=) 'ExclusiveLock' AND l.classid::pg_catalog.int4 "
    "OPERATOR(pg_catalog.=) $1 AND l.objid::pg_catalog.int4 OPERATOR(pg_catalog.=) $2), false) "
    "THEN true ELSE pg_catalog.pg_try_advisory_lock($1, $2) END FROM pg_catalog.pg_locks l WHERE "
    "l.locktype OPERATOR(pg_catalog.=) 'advisory' AND l.granted AND l.pid OPERATOR(pg_catalog.=) "
    "pg_catalog.pg_backend_pid() AND l.database OPERATOR(pg_catalog.=) (SELECT d.oid FROM "
    "pg_catalog.pg_database d WHERE d.datname OPERATOR(pg_catalog.=) "
    "pg_catalog.current_database())";

}  // namespace

asio::awaitable<void> discard_all_keeping_slot(Connection& connection, const Budget& budget,
                                               std::size_t slot) {
  ConnectionAccess::forget_statements(connection);
  const std::int32_t key = budget_lock_key(budget.key);
  // DISCARD ALL is these and pg_advisory_unlock_all() (PostgreSQL's documentation of DISCARD);
  // each in a segment of its own, outside any transaction block. The advisory locks go but the
  // slot's: released and taken again, it could go to another process in between.
  Pipeline statements;
  // Unnamed: DEALLOCATE ALL would drop its own prepared statements under it (each later one would
  // fail as forgotten, and, twice on a connection, it would go unnamed for good, as behind a
  // pooler).
  statements.prepare_statements(false);
  for (const char* sql :
       {"CLOSE ALL", "SET SESSION AUTHORIZATION DEFAULT", "RESET ALL", "DEALLOCATE ALL",
        "UNLISTEN *", "DISCARD PLANS", "DISCARD TEMP", "DISCARD SEQUENCES"}) {
    statements.add(sql).sync();
  }
  const std::size_t marker = budget_class_marker(budget);
  const std::int32_t member_key = budget_member_key(budget);
  const std::size_t unlock_pass = statements.size();
  statements
      .add(unlock_all_but_slot_sql, key, static_cast<std::int32_t>(slot), member_key,
           static_cast<std::int32_t>(marker), false)
      .sync();
  if (marker != 0) {
    statements
        .add("SELECT pg_catalog.pg_advisory_lock_shared($1::pg_catalog.int4, $2::pg_catalog.int4)",
             budget_member_key(budget), static_cast<std::int32_t>(marker))
        .sync();
  }
  const auto outcomes = co_await connection.run(statements);
  for (const auto& outcome : outcomes) {
    if (!outcome.ok()) throw Error(outcome.error, outcome.diagnostics);
  }
  if (outcomes.size() <= unlock_pass || outcomes[unlock_pass].result.empty()) {
    throw Error(make_error_code(client_errc::connection_lost),
                Diagnostics{.message = "releasing the advisory locks of a reset failed"});
  }
  if (!outcomes[unlock_pass].result[0].get<bool>(1)) {
    throw Error(
        make_error_code(client_errc::budget_exhausted),
        Diagnostics{.message = "the budget slot " + std::to_string(slot) + " of '" + budget.key +
                               "', released by hand in a lease, was taken by another process "
                               "before the reset of its connection, which is closed"});
  }
  // A lock of the lease's taken more than once is held still: a pass more, until one releases
  // nothing (keeping the class marker, taken again above).
  for (bool released = outcomes[unlock_pass].result[0].get<std::int64_t>(0) > 0; released;) {
    Pipeline pass;
    pass.prepare_statements(false);
    pass.add(unlock_all_but_slot_sql, key, static_cast<std::int32_t>(slot), member_key,
             static_cast<std::int32_t>(marker), marker != 0);
    const auto passed = co_await connection.run(pass);
    if (passed.empty() || !passed.front().ok()) {
      if (!passed.empty()) throw Error(passed.front().error, passed.front().diagnostics);
      throw Error(make_error_code(client_errc::connection_lost),
                  Diagnostics{.message = "releasing the advisory locks of a reset failed"});
    }
    released = !passed.front().result.empty() && passed.front().result[0].get<std::int64_t>(0) > 0;
  }
}

}  // namespace pgrt::detail
