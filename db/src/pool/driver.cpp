// The pool's driver (driver.hpp): carrying out the core's actions, watching idle sockets, the
// background work (connect, reset, ping, close), and the acquire and release paths.
#include "driver.hpp"

#include <algorithm>
#include <boost/asio/execution/context.hpp>
#include <boost/asio/query.hpp>
#include <cstring>
#include <set>
#include <tuple>
#include <type_traits>
#include <unordered_set>

#include "../connection/conninfo.hpp"
#include "budget.hpp"
#include "multiplexer.hpp"
#include "pgrt/db/deadline.hpp"

namespace pgrt::detail {

RequiredRole required_role(const PoolConfig& config) {
  if (!config.recheck_session_attrs) return RequiredRole::any;
  const ParsedConninfo parsed = parse_conninfo(config.conninfo);
  std::string attrs;
  if (const auto given = parsed.values.find("target_session_attrs"); given != parsed.values.end()) {
    attrs = given->second;
  } else if (parsed.values.contains("service") || std::getenv("PGSERVICE") != nullptr) {
    // A service file may set it, and libpq ranks it above PGTARGETSESSIONATTRS: pgrt does not
    // read service files, so it does not guess.
    return RequiredRole::any;
  } else if (const char* from_env = std::getenv("PGTARGETSESSIONATTRS"); from_env != nullptr) {
    attrs = from_env;
  }
  if (attrs == "read-write") return RequiredRole::read_write;
  if (attrs == "read-only") return RequiredRole::read_only;
  if (attrs == "primary") return RequiredRole::primary;
  if (attrs == "standby") return RequiredRole::standby;
  return RequiredRole::any;  // any, prefer-standby, or not given (libpq refuses other values)
}

bool serves_role(const Connection& connection, RequiredRole role) noexcept {
  PGconn* conn = connection.native_handle();
  const char* hot_standby = PQparameterStatus(conn, "in_hot_standby");
  const char* read_only = PQparameterStatus(conn, "default_transaction_read_only");
  const bool standby = hot_standby != nullptr && std::strcmp(hot_standby, "on") == 0;
  // As libpq: what the server does not report is not held against it (libpq would ask it at
  // connect, and took its answer).
  const bool both_known = hot_standby != nullptr && read_only != nullptr;
  const bool writes_refused =
      standby || (read_only != nullptr && std::strcmp(read_only, "on") == 0);
  switch (role) {
    case RequiredRole::any:
      return true;
    case RequiredRole::read_write:
      return !both_known || !writes_refused;
    case RequiredRole::read_only:
      return !both_known || writes_refused;
    case RequiredRole::primary:
      return hot_standby == nullptr || !standby;
    case RequiredRole::standby:
      return hot_standby == nullptr || standby;
  }
  return true;
}

namespace {

// Whether the server refused the budget's SQL in a way that every connect would meet: an error of
// class 42 (the role refused EXECUTE on an advisory-lock function, 42501; a server without
// them, 42883) or a feature it does not have (0A000). A connection lost during the slot search,
// a statement cut at connect_timeout, a server shutting down: passing, retried as before.
bool budget_sql_refused(const error_code& code) {
  const std::string sqlstate = sqlstate_of(code);
  return sqlstate.starts_with("42") || sqlstate == "0A000";
}

std::string budget_refused_hint(const error_code& code) {
  if (sqlstate_of(code) == "42501") {
    return "the role may not run the connection budget's advisory-lock functions (PUBLIC may, "
           "unless revoked): GRANT EXECUTE ON FUNCTION pg_catalog.pg_try_advisory_lock(integer, "
           "integer), pg_catalog.pg_try_advisory_lock_shared(integer, integer), "
           "pg_catalog.pg_advisory_lock_shared(integer, integer), "
           "pg_catalog.pg_advisory_unlock(bigint), pg_catalog.pg_advisory_unlock(integer, "
           "integer), pg_catalog.pg_advisory_unlock_shared(bigint), "
           "pg_catalog.pg_advisory_unlock_shared(integer, integer) TO the role; or run the pool "
           "without a budget (unset PGRT_BUDGET_KEY and PGRT_BUDGET_SLOTS)";
  }
  return "the server does not run the connection budget's SQL (session-level advisory locks and "
         "pg_locks, as PostgreSQL has them): run the pool without a budget (unset "
         "PGRT_BUDGET_KEY and PGRT_BUDGET_SLOTS) and bound its connections another way";
}

// Runs `operation` on `connection`, and cuts the connection if it has not finished by
// `deadline`: the operation then fails (the server's cancel error, or connection_lost). Every wait
// the pool makes on the server goes through here, so none is unbounded, whatever the network
// does (a blackholed path never answers and never fails). The cut comes in two steps: at
// `deadline` a cancel request and end-of-file (Connection::Impl::cut_writing()), which a server
// that answers ends the statement and the session on, in sight of the pool, which keeps the
// connection's capacity until the session is seen to end (close_and_wait(); strict max); only if
// the operation has not ended by the connection's cancel_timeout after that is the socket shut
// down altogether (Connection::interrupt(): thread-safe), as for a server that is gone.
struct Cutter {
  std::mutex mutex;
  bool done = false;
  bool cut = false;  // the deadline came: the connection is cut, whatever the operation says
  Connection* connection = nullptr;
  asio::steady_timer* timer = nullptr;
  std::chrono::milliseconds hard_after{0};
};

void cut_step(const std::shared_ptr<Cutter>& cutter, error_code error, bool gently_cut) {
  if (error) return;
  std::lock_guard lock(cutter->mutex);
  if (cutter->done) return;  // (the timer, in cut_at()'s frame, is alive while not done)
  if (gently_cut) {
    cutter->connection->interrupt();
    return;
  }
  cutter->cut = true;
  ConnectionAccess::cut_writing(*cutter->connection);
  cutter->timer->expires_after(cutter->hard_after);
  cutter->timer->async_wait([cutter](error_code later) { cut_step(cutter, later, true); });
}

template <typename T>
asio::awaitable<T> cut_at(Connection& connection, Clock::time_point deadline,
                          asio::awaitable<T> operation) {
  auto cutter = std::make_shared<Cutter>();
  cutter->connection = &connection;
  cutter->hard_after = ConnectionAccess::cancel_timeout(connection);
  asio::steady_timer timer(co_await asio::this_coro::executor, deadline);
  cutter->timer = &timer;
  timer.async_wait([cutter](error_code error) { cut_step(cutter, error, false); });
  struct Disarm {
    Cutter& cutter;
    asio::steady_timer& timer;
    Disarm(Cutter& cutter_in, asio::steady_timer& timer_in) : cutter(cutter_in), timer(timer_in) {}
    Disarm(const Disarm&) = delete;
    Disarm& operator=(const Disarm&) = delete;
    Disarm(Disarm&&) = delete;
    Disarm& operator=(Disarm&&) = delete;
    ~Disarm() {
      std::lock_guard lock(cutter.mutex);  // (held while cancelling: cut_step() re-arms under it)
      cutter.done = true;
      timer.cancel();
    }
  } disarm(*cutter, timer);
  // An operation the server answered after the cut completes, but its connection, shut for
  // writing, is not one to go on with: the caller discards it as for any failure.
  const auto throw_if_cut = [&cutter] {
    std::lock_guard lock(cutter->mutex);
    if (cutter->cut) {
      throw Error(make_error_code(client_errc::connection_lost),
                  Diagnostics{.message = "the connection was cut at its deadline (the server "
                                         "answered only after it)"});
    }
  };
  if constexpr (std::is_void_v<T>) {
    co_await std::move(operation);
    throw_if_cut();
  } else {
    T value = co_await std::move(operation);
    throw_if_cut();
    co_return value;
  }
}

}  // namespace

void PooledConnection::closed_in_lease(Connection live) noexcept {
  pool.closed_in_lease(node, std::move(live));
}

void PoolState::spawn_later(asio::awaitable<void> operation) {
  asio::post(*executor, [executor = *executor, operation = std::move(operation)]() mutable {
    asio::co_spawn(executor, std::move(operation), [](const std::exception_ptr& error) {
      if (!error) return;
      try {
        std::rethrow_exception(error);
      } catch (const std::exception& exception) {
        spdlog::error("pgrt pool: background work failed: {}", exception.what());
      } catch (...) {
        spdlog::error("pgrt pool: background work failed");
      }
    });
  });
}

void PoolState::execute_actions_locked(const pool::Actions& actions, Deferred& deferred) {
  // The wake-ups first: a woken waiter has left the core's queue, so if another action threw
  // before its wake-up, nothing would ever resume it, nor release it when its io_context shuts
  // down. (Posted under the mutex: the waiter's io_context cannot be shutting down meanwhile, as
  // ParkedWaitWatch's shutdown takes the mutex to take the waits; see async::resume().)
  for (const pool::Action& action : actions) {
    if (action.kind != pool::Action::Kind::wake) continue;
    async::ParkedWait& parked = static_cast<PoolWaiter*>(action.waiter)->parked;
    if (parked.waiting()) async::resume(parked.take(), error_code{}, false);
  }
  for (const pool::Action& action : actions) {
    switch (action.kind) {
      case pool::Action::Kind::wake:
        break;  // (above)
      case pool::Action::Kind::open:
        start_connect(*action.node);
        break;
      case pool::Action::Kind::reset:
        spawn_later(reset(shared_from_this(), action.node, action.check_slots));
        break;
      case pool::Action::Kind::ping:
        spawn_later(ping(shared_from_this(), action.node, action.check_slots));
        break;
      case pool::Action::Kind::close:
        if (action.discarded && events.discarded.ever_connected()) {
          deferred.add([this, reason = action.reason] { emit(events.discarded, reason); });
        }
        start_close(*action.node);
        break;
      case pool::Action::Kind::cancel_connect: {
        auto& pooled = static_cast<PooledConnection&>(*action.node->attachment);
        asio::post(pooled.strand, [cancel = pooled.connect_cancel] {
          cancel->cancelled = true;
          if (cancel->started && !cancel->finished) {
            cancel->signal.emit(asio::cancellation_type::terminal);
          }
        });
        break;
      }
      case pool::Action::Kind::arm_timer:
        // (Gone once the pool closed: nothing needs the upkeep then.)
        if (upkeep_timer) upkeep_timer->expires_at(action.at);  // cancels the wait: waits again
        break;
      case pool::Action::Kind::watch:
        start_watch(*action.node);
        break;
      case pool::Action::Kind::unwatch:
        stop_watch(*action.node);
        break;
      case pool::Action::Kind::report_leak: {
        const auto site = action.node->lease_site;
        spdlog::warn(
            "pgrt pool {}: a connection acquired at {} has been held for {} ms (leak_threshold "
            "{} ms); is a Lease kept alive by mistake?",
            application_name, describe_site(site), action.age.count(),
            config.leak_threshold.count());
        deferred.add([this, site, age = action.age] { emit(events.leak_suspected, site, age); });
        break;
      }
    }
  }
  if (core.drained()) {
    drained.notify_all_locked();
  }
}

void PoolState::start_watch(pool::Node& node) {
  auto& pooled = static_cast<PooledConnection&>(*node.attachment);
  auto watch = std::make_shared<IdleWatch>(*executor);
  watch->node = &node;
  pooled.watch = watch;
  PGconn* handle = pooled.connection.native_handle();
  const int socket = handle != nullptr ? PQsocket(handle) : -1;
  const int own = socket >= 0 ? ::fcntl(socket, F_DUPFD_CLOEXEC, 0) : -1;
  error_code error;
  if (own >= 0) watch->descriptor.assign(own, error);
  if (own < 0 || error) {
    if (own >= 0 && error) ::close(own);
    // No socket to watch: look at it once, later, as if it had become readable.
    asio::post(*executor, [self = shared_from_this(), watch] { self->on_readable(watch, {}); });
    return;
  }
  watch->descriptor.async_wait(asio::posix::stream_descriptor::wait_read,
                               [self = shared_from_this(), watch](error_code wait_error) {
                                 self->on_readable(watch, wait_error);
                               });
}

void PoolState::stop_watch(pool::Node& node) {
  auto& pooled = static_cast<PooledConnection&>(*node.attachment);
  if (!pooled.watch) return;
  pooled.watch->node = nullptr;
  error_code ignored;
  pooled.watch->descriptor.close(ignored);  // cancels the wait; closes our descriptor only
  pooled.watch.reset();
}

void PoolState::on_readable(const std::shared_ptr<IdleWatch>& watch,
                            error_code wait_error) noexcept {
  try {
    Deferred deferred;
    std::lock_guard lock(mutex);
    pool::Node* node = watch->node;
    if (node == nullptr) return;  // unwatched meanwhile: the connection is someone's now
    PGconn* handle = connection_of(*node).native_handle();
    bool alive = handle != nullptr && !wait_error && watch->descriptor.is_open();
    if (alive) {
      char byte = 0;
      const ssize_t peeked =
          ::recv(watch->descriptor.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
      if (peeked == 0) {
        alive = false;  // end of file
      } else if (peeked < 0) {
        alive = errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
      } else {
        alive = PQconsumeInput(handle) == 1 && PQstatus(handle) == CONNECTION_OK;
      }
    }
    if (alive) {
      watch->descriptor.async_wait(asio::posix::stream_descriptor::wait_read,
                                   [self = shared_from_this(), watch](error_code error) {
                                     self->on_readable(watch, error);
                                   });
      return;
    }
    auto& actions = fresh_actions_locked();
    core.connection_lost(*node, actions);
    execute_locked(actions, deferred);
  } catch (const std::exception& error) {
    spdlog::error("pgrt pool {}: watching an idle connection failed: {}", application_name,
                  error.what());
  }
}

void PoolState::bind_executor_locked(const asio::any_io_executor& candidate) {
  if (executor) return;
  executor = candidate;
  upkeep_timer = std::make_shared<asio::steady_timer>(*executor, Clock::time_point::max());
  spawn_later(upkeep(shared_from_this()));
  Deferred nothing;
  auto& actions = fresh_actions_locked();
  core.tick(Clock::now(), actions);  // min_idle
  execute_locked(actions, nothing);
}

void PoolState::evict_all() {
  Deferred deferred;
  std::lock_guard lock(mutex);
  if (!executor) return;  // nothing opened yet
  auto& actions = fresh_actions_locked();
  core.evict_all(Clock::now(), actions);
  execute_locked(actions, deferred);
  // The connections query() holds were evicted with the other leased ones: they take no new
  // statement from now on, even one a link would otherwise send before it next reads the pool
  // (its lock is taken under ours, never the reverse).
  if (multiplexer) multiplexer->evict_links();
}

void PoolState::start_connect(pool::Node& node) {
  auto attachment = std::make_unique<PooledConnection>(*executor, *this, node);
  auto& pooled = *attachment;
  node.attachment = std::move(attachment);
  asio::post(*executor, [self = shared_from_this(), &node, &pooled] {
    // The spawned coroutine's cancellation state lives in the signal's storage, and asio touches
    // it until the spawn completes, after open_connection() has returned (and a failed connect
    // has destroyed the node, and `pooled` with it): the completion handler keeps the signal.
    asio::co_spawn(pooled.strand, open_connection(self, &node, pooled.connect_cancel),
                   asio::bind_cancellation_slot(
                       pooled.connect_cancel->signal.slot(),
                       [keep_signal = pooled.connect_cancel](const std::exception_ptr&) {}));
  });
}

asio::awaitable<void> PoolState::open_connection(
    std::shared_ptr<PoolState> self, pool::Node* node,
    std::shared_ptr<PooledConnection::ConnectCancel> cancel) {
  // A cancellation (the pool closing) reaches the connect and the statements through the slot;
  // the awaits after it must still run, so that the outcome is always reported to the core and a
  // backend is never left without its close.
  co_await asio::this_coro::throw_if_cancelled(false);
  cancel->started = true;
  ConnectOptions options = connect_options(self->config);
  options.application_name = self->application_name;
  const Budget& budget = self->config.budget;
  // Under a budget, the io_context's one backend without a slot of this budget and class, from
  // its connect to its slot (or its close): the gate is left when `probe_turn` goes.
  const std::string probe_lane =
      budget.key.empty() ? std::string() : ProbeGate::lane_of(budget, options.conninfo);
  auto leave_lane = [&probe_lane](ProbeGate* gate) { gate->leave(probe_lane); };
  std::unique_ptr<ProbeGate, decltype(leave_lane)> probe_turn(nullptr, leave_lane);
  if (!budget.key.empty() && !cancel->cancelled) {
    ProbeGate& gate = ProbeGate::of(co_await asio::this_coro::executor);
    auto holder_waits = gate.holder_waits_for_slot(probe_lane);
    {
      std::lock_guard lock(self->mutex);
      ++self->connects_waiting_for_turn;
      self->turn_holder_waits_for_slot = std::move(holder_waits);
    }
    const bool granted = co_await gate.enter(probe_lane);
    {
      std::lock_guard lock(self->mutex);
      --self->connects_waiting_for_turn;
    }
    if (granted) {
      probe_turn.reset(&gate);
    } else {
      cancel->cancelled = true;  // cancelled while it waited for its turn: the pool is closing
    }
  }
  error_code error;
  Connection connection;
  const auto connect_started = Clock::now();
  if (cancel->cancelled) {  // the pool closed before this connect began
    error = make_error_code(client_errc::cancelled);
  } else {
    std::tie(error, connection) =
        co_await Connection::async_connect(co_await asio::this_coro::executor, std::move(options),
                                           asio::as_tuple(asio::use_awaitable));
  }
  std::string failure;
  std::string failure_hint;  // the connect's own (PoolState::last_connect_hint)
  // What went wrong without the counts that may change between attempts (a budget's holders and
  // share): the warning below is logged again only when it changes. Empty: the failure itself.
  std::string failure_reason;
  bool probed = false;
  bool no_slot = false;
  // Evicted (Pool::evict_all()) while it waited for a slot: given up on, but no failure.
  bool abandoned = false;
  bool backend_may_live = false;  // a connect given up on with a backend perhaps starting up
  // Cancelled by the pool's close under a budget, its backend perhaps alive: closed once the core
  // has its capacity back (Pool::close() does not wait for it), keeping the turn till it ended.
  bool close_after = false;
  // The server refused the budget's SQL (budget_sql_refused()): every connect would meet it.
  bool budget_refused = false;
  if (error) {
    if (cancel->cancelled) {
      failure = "the pool closed while connecting";
    } else {
      failure = connection.last_error().message;
      failure_hint = connection.last_error().hint;
      if (!failure_hint.empty()) failure += " (" + failure_hint + ")";
    }
    // A connect that ran out of time once its socket was connected may have a backend in
    // start-up on the server (a slow server says nothing until it is done), which lives on until
    // it reads the end of the connection (Connection::Impl::abandon_connect()): its capacity comes
    // back once it has ended, or the strict max would not hold on the server while connects time
    // out and are made again. The failure counts now (backoff, fail_fast_after, events); the node
    // closes like a discarded connection. (Under a budget, here, while the connect still holds
    // the io_context's turn for a backend without a slot, and lets it go if the server is slow.)
    backend_may_live = ConnectionAccess::has_lingering_socket(connection);
    if (backend_may_live && cancel->cancelled) {
      // The pool closes (close() abandons connects at once): its capacity is given back now.
      // Under a budget, a backend without a slot: the turn is kept until it has ended, for up to
      // server_close_warning (another pool of the process may open one of its own then), past
      // the pool's close, which does not wait for it (below).
      if (budget.key.empty()) {
        connection.close();
      } else {
        close_after = true;
      }
      backend_may_live = false;
    } else if (backend_may_live && !budget.key.empty()) {
      co_await close_until_backend_ends(self, connection, [&probe_turn] { probe_turn.reset(); });
      backend_may_live = false;
    }
  } else if (cancel->cancelled) {  // the pool closed right after the connect
    error = make_error_code(client_errc::cancelled);
    failure = "the pool closed while connecting";
    // Under a budget, a backend without a slot: the turn is kept until it has ended (as above).
    if (budget.key.empty()) {
      connection.close();
    } else {
      close_after = true;
    }
  } else if (!budget.key.empty() && ConnectionAccess::behind_pooler(connection)) {
    // A pooler nobody told pgrt about, noticed at connect: an advisory lock taken here would
    // belong to one of the pooler's server sessions, which outlives this connection (a
    // transaction pooler does not reset it), so the slot would never come back and the budget
    // would fill for every process that shares it.
    error = make_error_code(client_errc::invalid_config);
    failure =
        "the connection budget '" + budget.key +
        "' cannot be used through a connection pooler (this connection goes through one, noticed "
        "at connect): its slots are session-level advisory locks, which the pooler's server "
        "sessions would keep after this connection ends (connect to the server itself, or to a "
        "session-mode pooler with PGRT_POOLER=session; behind a transaction pooler, bound the "
        "connections in the pooler instead)";
    connection.close();
  } else if (!budget.key.empty()) {
    probed = true;
    try {
      SlotSearch search =
          co_await cut_at(connection, Clock::now() + self->config.connect.connect_timeout,
                          take_budget_slot(connection, budget, self->may_take_budget_slot()));
      if (!search.slot && !cancel->cancelled) {
        const std::shared_ptr<std::atomic<bool>> holder_waits = [&] {
          std::lock_guard lock(self->mutex);
          return self->turn_holder_waits_for_slot;
        }();
        if (holder_waits) holder_waits->store(true);
        // (Cleared however the wait ends; the turn passing clears it too.)
        const std::unique_ptr<std::atomic<bool>, void (*)(std::atomic<bool>*)> clear_when_done(
            holder_waits.get(), [](std::atomic<bool>* flag) {
              if (flag != nullptr) flag->store(false);
            });
        search = co_await wait_for_budget_slot(self, *node, connection, *cancel, search);
      }
      if (search.slot) {
        // (Under the lock: the slot checks read them, on any connection's coroutine.)
        std::lock_guard lock(self->mutex);
        auto& pooled = static_cast<PooledConnection&>(*node->attachment);
        pooled.budget_slot = *search.slot;
        pooled.backend_pid = search.backend_pid;
        pooled.server = std::move(search.server);
      } else if (evicted_by_user(self, *node)) {
        abandoned = true;
        error = make_error_code(client_errc::cancelled);
        failure = "evicted (Pool::evict_all()) while it waited for a slot";
      } else {
        no_slot = true;
        error = make_error_code(client_errc::budget_exhausted);
        failure = describe_slot_search(budget, search, self->budget_share());
        failure_reason = std::string(search.held_back ? "held at its fair share of the budget '"
                                                      : "no slot free in the budget '") +
                         budget.key + "'";
      }
    } catch (const Error& slot_error) {
      if (budget_sql_refused(slot_error.code())) {
        budget_refused = true;
        error = slot_error.code();
        failure = "the server refused the SQL of the connection budget '" + budget.key +
                  "' (its advisory locks): " + slot_error.what();
      } else {
        error = make_error_code(client_errc::connect_failed);
        failure =
            std::string("taking a slot of the connection budget failed: ") + slot_error.what();
      }
    } catch (const std::exception& slot_error) {
      error = make_error_code(client_errc::connect_failed);
      failure = std::string("taking a slot of the connection budget failed: ") + slot_error.what();
    }
    // A backend without a slot counts for nothing: its capacity comes back once it has ended.
    // The gate is left then, or after server_close_warning if the server is slow to end it (the
    // other pools of the process must not wait on a silent server).
    if (error) {
      co_await close_until_backend_ends(self, connection, [&probe_turn] { probe_turn.reset(); });
    }
  }
  if (!close_after) probe_turn.reset();
  if (!error && self->config.on_connect) {
    try {
      // Cut at connect_timeout twice over: the connection (a statement the hook runs ends), and
      // the hook itself (cancelled, for one that waits on something else).
      const auto hook_deadline = Clock::now() + self->config.connect.connect_timeout;
      co_await with_timeout(cut_at(connection, hook_deadline, self->config.on_connect(connection)),
                            self->config.connect.connect_timeout);
      // (with_timeout() hands back what completed as it was cancelled: a hook that returned
      // normally once cut is cut all the same.)
      if (connection.is_broken() || !connection.is_open() || Clock::now() >= hook_deadline) {
        error = make_error_code(client_errc::connect_failed);
        failure =
            "PoolConfig::on_connect returned after its connection was cut (it ran past "
            "connect.connect_timeout, or its statement failed and it went on)";
      }
    } catch (const std::exception& hook_error) {
      error = make_error_code(client_errc::connect_failed);
      failure = std::string("PoolConfig::on_connect failed: ") + hook_error.what();
    }
    // Its backend exists: the capacity comes back only once it has ended.
    if (error) co_await close_until_backend_ends(self, connection);
  }
  cancel->finished = true;  // on the strand: a cancel that comes later does nothing
  {
    Deferred deferred;
    std::lock_guard lock(self->mutex);
    self->budget_probes += probed ? 1 : 0;
    self->budget_probes_without_slot += no_slot ? 1 : 0;
    auto& actions = self->fresh_actions_locked();
    if (abandoned) {
      // Not a failure: no backoff, no event, and its replacement opens now (to the server the
      // conninfo names now, after a failover).
      self->core.connect_abandoned(*node, Clock::now(), actions);
    } else if (error) {
      self->last_connect_error = failure;
      self->last_connect_error_code = error;
      self->last_connect_hint = failure_hint;
      if (!cancel->cancelled) {
        ++self->failed_connects_in_a_row;
        if (const std::string& reason = failure_reason.empty() ? failure : failure_reason;
            reason != self->logged_connect_failure) {
          self->logged_connect_failure = reason;
          std::string one_line = failure;  // libpq's messages have "\n\t" inside: one log line
          for (std::size_t at = one_line.find('\n'); at != std::string::npos;
               at = one_line.find('\n', at)) {
            const std::size_t end = one_line.find_first_not_of("\n\t ", at);
            one_line.replace(at, (end == std::string::npos ? one_line.size() : end) - at, " ");
          }
          deferred.add(
              [self, failure = std::move(one_line), in_a_row = self->failed_connects_in_a_row] {
                spdlog::warn(
                    "pgrt pool {}: cannot open a connection ({} failed in a row): {}; retrying "
                    "with backoff (logged again when the reason changes or a connect succeeds)",
                    self->application_name, in_a_row, failure);
              });
        }
      }
      deferred.add(
          [self, error = error, failure] { emit(self->events.connect_failed, error, failure); });
      if (backend_may_live) connection_of(*node) = std::move(connection);  // for its close
      // (Destroys the node, or closes it when its backend may live.)
      self->core.connect_failed(*node, Clock::now(), actions, no_slot, backend_may_live);
      // No retry cures it: the callers waiting hear it now (and the pool goes on retrying, for
      // a grant that comes later).
      if (budget_refused && !cancel->cancelled) self->core.fail_waiting(actions);
    } else {
      if (!self->logged_connect_failure.empty()) {
        deferred.add([self, failures = self->failed_connects_in_a_row] {
          spdlog::info("pgrt pool {}: connected again, after {} failed attempt(s)",
                       self->application_name, failures);
        });
        self->logged_connect_failure.clear();
      }
      self->failed_connects_in_a_row = 0;
      connection_of(*node) = std::move(connection);
      if (self->config.timings) {
        ConnectionAccess::time_statements(connection_of(*node), self->statement_times);
      }
      const int pid = connection_of(*node).backend_pid();
      deferred.add([self, pid] { emit(self->events.connected, pid); });
      const auto connected_at = Clock::now();
      self->create_time.record(connected_at - connect_started);
      self->core.connect_succeeded(*node, connected_at, actions);
    }
    self->execute_locked(actions, deferred);
  }
  if (close_after) (void)co_await connection.close_and_wait(server_close_warning);
}

asio::awaitable<void> PoolState::reset(std::shared_ptr<PoolState> self, pool::Node* node,
                                       bool check_slots) {
  Connection& connection = connection_of(*node);
  bool ok = true;
  // Bounded like a connect: a server that answers neither in connect_timeout is not one to
  // hand a connection of to anybody.
  const auto deadline = Clock::now() + self->config.connect.connect_timeout;
  try {
    if (connection.transaction_status() != TransactionStatus::idle) {
      co_await cut_at(connection, deadline, connection.rollback());
    }
    if (self->config.reset == ResetPolicy::discard_all) {
      // DISCARD ALL would release the connection's budget slot with the other advisory locks.
      // (Two statements, not a conditional expression: g++ 12 mishandles the awaitable
      // temporaries of one inside co_await.)
      if (self->config.budget.key.empty()) {
        co_await cut_at(connection, deadline, connection.discard_all());
      } else {
        co_await cut_at(connection, deadline,
                        discard_all_keeping_slot(
                            connection, self->config.budget,
                            static_cast<PooledConnection&>(*node->attachment).budget_slot));
      }
      if (self->config.on_connect) {
        // DISCARD ALL took what the hook set up (search_path, prepared statements): set up again,
        // as on a new connection, and bounded as there.
        const auto hook_deadline = Clock::now() + self->config.connect.connect_timeout;
        co_await with_timeout(
            cut_at(connection, hook_deadline, self->config.on_connect(connection)),
            self->config.connect.connect_timeout);
        if (connection.is_broken() || !connection.is_open() || Clock::now() >= hook_deadline) {
          throw std::runtime_error(
              "PoolConfig::on_connect, run again after DISCARD ALL, ran past "
              "connect.connect_timeout, or returned after its connection was cut");
        }
      }
    }
    if (check_slots) {
      try {
        // Bounded on its own, as in a ping: what is left of `deadline` may have gone to an
        // on_connect hook run again above (which has connect_timeout of its own).
        co_await check_budget_slots(self, node,
                                    Clock::now() + self->config.connect.connect_timeout);
      } catch (const std::exception& error) {
        // The check's own failure is not this connection's, unless it broke it.
        if (!connection.is_open() || connection.is_broken()) throw;
        spdlog::warn("pgrt pool {}: checking the connection budget's slots failed: {}",
                     self->application_name, error.what());
      }
    }
  } catch (const std::exception& error) {
    ok = false;
    spdlog::warn("pgrt pool: resetting a returned connection ({}) failed: {}",
                 to_string(self->config.reset), error.what());
  }
  // (The reset's answers bring what the server reports now; a SET LOCAL of the lease is gone.)
  DiscardReason failure = DiscardReason::failed_reset;
  if (ok && self->role != RequiredRole::any && !serves_role(connection, self->role)) {
    ok = false;
    failure = DiscardReason::server_role;
  }
  Deferred deferred;
  std::lock_guard lock(self->mutex);
  auto& actions = self->fresh_actions_locked();
  self->core.reset_done(*node, ok, Clock::now(), actions, failure);
  self->execute_locked(actions, deferred);
}

asio::awaitable<void> PoolState::ping(std::shared_ptr<PoolState> self, pool::Node* node,
                                      bool check_slots) {
  bool ok = true;
  DiscardReason failure = DiscardReason::broken;
  try {
    Connection& connection = connection_of(*node);
    const auto deadline = Clock::now() + self->config.connect.connect_timeout;
    if (check_slots) {
      co_await check_budget_slots(self, node, deadline);  // a round trip: the ping's too
    } else {
      (void)co_await cut_at(connection, deadline, connection.query(""));
    }
    // (The answer brings what the server reports of a role changed while it was idle.)
    if (self->role != RequiredRole::any && !serves_role(connection, self->role)) {
      ok = false;
      failure = DiscardReason::server_role;
    }
  } catch (...) {  // NOLINT(bugprone-empty-catch): the core closes a connection that failed
    ok = false;
  }
  Deferred deferred;
  std::lock_guard lock(self->mutex);
  auto& actions = self->fresh_actions_locked();
  self->core.ping_done(*node, ok, Clock::now(), actions, failure);
  self->execute_locked(actions, deferred);
}

bool PoolState::evicted_by_user(const std::shared_ptr<PoolState>& self, const pool::Node& node) {
  std::lock_guard lock(self->mutex);
  return node.evicted && node.evict_reason == DiscardReason::evicted;
}

asio::awaitable<SlotSearch> PoolState::wait_for_budget_slot(
    std::shared_ptr<PoolState> self, const pool::Node& node, Connection& connection,
    const PooledConnection::ConnectCancel& cancel, SlotSearch search) {
  // Retired meanwhile (the pool keeps to its fair share): it would be closed on arrival, so it
  // stops waiting and leaves the turn to the pool's other connects.
  const auto retired = [&] {
    std::lock_guard lock(self->mutex);
    return node.evicted;
  };
  const Budget& budget = self->config.budget;
  const std::string full = describe_slot_search(budget, search, self->budget_share());
  {
    std::lock_guard lock(self->mutex);
    ++self->budget_waits;
    ++self->budget_slot_waits;
    self->last_connect_error = full + "; a connection waits for one";
    self->last_connect_error_code = make_error_code(client_errc::budget_exhausted);
    self->last_connect_hint.clear();
  }
  const auto timeout = self->config.connect.connect_timeout;
  const auto give_up_at = Clock::now() + timeout;
  const auto marker = budget_waiting_key(budget);
  const auto marker_class = static_cast<std::int32_t>(budget_class_marker(budget));
  bool marked = false;
  std::exception_ptr failed;
  try {
    marked = (co_await cut_at(connection, Clock::now() + timeout,
                              connection.query("SELECT pg_catalog.pg_try_advisory_lock_shared("
                                               "$1::pg_catalog.int4, $2::pg_catalog.int4)",
                                               marker, marker_class)))
                 .scalar<bool>();
    asio::steady_timer timer(co_await asio::this_coro::executor);
    // Each look has a deadline of its own: the wait ends with "no slot", never with a look cut
    // short (which would read as a failed connect).
    while (!search.slot && !cancel.cancelled && !retired()) {
      const auto left = give_up_at - Clock::now();
      if (left <= Clock::duration::zero()) break;
      timer.expires_after(
          std::min<Clock::duration>(std::chrono::milliseconds(100 + random_below(201)), left));
      (void)co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
      if (cancel.cancelled || retired()) break;
      search = co_await cut_at(connection, Clock::now() + timeout,
                               take_budget_slot(connection, budget, self->may_take_budget_slot()));
    }
    if (marked && search.slot) {
      (void)co_await cut_at(connection, Clock::now() + timeout,
                            connection.query("SELECT pg_catalog.pg_advisory_unlock_shared("
                                             "$1::pg_catalog.int4, $2::pg_catalog.int4)",
                                             marker, marker_class));
    }
  } catch (...) {
    failed = std::current_exception();
  }
  {
    std::lock_guard lock(self->mutex);
    --self->budget_waits;
  }
  if (failed) std::rethrow_exception(failed);
  co_return search;
}

asio::awaitable<void> PoolState::check_budget_slots(std::shared_ptr<PoolState> self,
                                                    pool::Node* checker,
                                                    Clock::time_point deadline) {
  struct Judged {
    std::uint64_t node_id;
    std::uint32_t resets;
  };
  std::vector<Judged> judged;
  {
    std::lock_guard lock(self->mutex);
    for (auto state : {pool::NodeState::idle, pool::NodeState::leased}) {
      self->core.nodes(state).for_each([&](const pool::Node& node) {
        judged.push_back({node.id, node.resets});
      });
    }
    judged.push_back({checker->id, checker->resets});
  }
  Connection& connection = connection_of(*checker);
  // What pg_locks shows is this server's (each has its own advisory locks): the connections that
  // reached another server of a multi-host conninfo hold their slots there, and are not judged
  // (those that reached this one through another of its entries are).
  const std::string server = [&] {
    std::lock_guard lock(self->mutex);
    return static_cast<const PooledConnection&>(*checker->attachment).server;
  }();
  std::vector<SlotHolder> members;
  const std::vector<SlotHolder> holders = co_await cut_at(
      connection, deadline, budget_slot_holders(connection, self->config.budget, &members));
  std::unordered_set<int> holding;
  for (const SlotHolder& holder : holders) {
    if (!holder.waiting) holding.insert(holder.pid);
  }
  Deferred deferred;
  std::lock_guard lock(self->mutex);
  auto& actions = self->fresh_actions_locked();
  const auto now = Clock::now();
  std::vector<const pool::Node*> lost;
  for (auto state : {pool::NodeState::idle, pool::NodeState::leased, pool::NodeState::resetting,
                     pool::NodeState::pinging}) {
    self->core.nodes(state).for_each([&](const pool::Node& node) {
      const bool unchanged = std::any_of(judged.begin(), judged.end(), [&](const Judged& entry) {
        return entry.node_id == node.id && entry.resets == node.resets;
      });
      // (A node retired for the fair share alone may be kept when the cap lifts: checked.)
      if (!unchanged || (node.evicted && node.evict_reason != DiscardReason::budget_share)) return;
      const auto& pooled = static_cast<const PooledConnection&>(*node.attachment);
      // Matched by pid alone, soundly: a pid names one live backend of the server, and is given
      // again only once its backend has ended. So a healthy connection is never judged to have
      // lost its slot. A connection whose backend ended unnoticed (terminated, crashed), its pid
      // since given to a backend that holds a slot, is taken for one that holds its own: that is
      // harmless, as an ended backend holds nothing and the connection fails at its next use or
      // ping like any broken one. (pg_stat_activity's backend_start would tell them apart, but
      // only the backends' own role and pg_read_all_stats see it: a checker left under another
      // role by a SET ROLE in a lease, kept by the rollback reset, would read it as null.)
      if (pooled.server != server || holding.count(pooled.backend_pid) != 0) return;
      deferred.add([self, pid = pooled.backend_pid, slot = pooled.budget_slot,
                    idle = node.state == pool::NodeState::idle] {
        spdlog::warn(
            "pgrt pool {}: the connection to backend {} no longer holds its slot {} of the "
            "connection budget '{}' (released by hand: pg_advisory_unlock_all(), or DISCARD ALL "
            "sent as a query?); it is closed {}",
            self->application_name, pid, slot, self->config.budget.key,
            idle ? "now" : "when it comes back");
      });
      lost.push_back(&node);
    });
  }
  // A sharer holding a slot this pool's budget does not have: it was given a larger
  // PGRT_BUDGET_SLOTS, and together they may hold more than this pool's view of the budget.
  if (!self->warned_foreign_slots) {
    for (const SlotHolder& holder : holders) {
      if (holder.waiting || holder.slot < self->config.budget.slots) continue;
      self->warned_foreign_slots = true;
      deferred.add([self, slot = holder.slot, tag = holder.tag] {
        spdlog::warn(
            "pgrt pool {}: {} holds slot {} of the connection budget '{}', which has {} slots "
            "here: the sharers disagree on PGRT_BUDGET_SLOTS, and together may hold more than "
            "{}; give every sharer the same value",
            self->application_name, tag, slot, self->config.budget.key, self->config.budget.slots,
            self->config.budget.slots);
      });
      break;
    }
  }
  // Fair shares between processes: while another process waits for a slot, keep at most an even
  // split of the budget among the processes holding or waiting for one (of this pool's class:
  // an even split of its own slots among the processes of the class); lifted once none waits.
  const Budget& budget = self->config.budget;
  const std::size_t my_class = budget_class_marker(budget);
  std::set<std::string> processes;
  std::set<std::string> class_processes{self->application_name};
  bool another_waits = false;
  // Whether a process waits that cannot use this pool's class slots (no class, or another): then
  // the connections on shared slots are the ones to give back.
  bool waiter_needs_shared = false;
  for (const SlotHolder& holder : holders) {
    processes.insert(holder.tag);
    const std::size_t holder_class =
        holder.waiting ? holder.slot : budget_class_of_slot(budget, holder.slot);
    if (my_class != 0 && holder_class == my_class) class_processes.insert(holder.tag);
    if (holder.waiting && holder.tag != self->application_name) {
      another_waits = true;
      waiter_needs_shared = waiter_needs_shared || holder.slot != my_class;
    }
  }
  // A process of this class that holds only shared slots is one of the class too (its
  // membership marker says so): every process then splits the class's slots alike.
  for (const SlotHolder& member : members) {
    if (my_class != 0 && member.slot == my_class) class_processes.insert(member.tag);
  }
  processes.insert(self->application_name);
  // The share is the process's, and other pools of this process on the same budget (the same
  // tag) hold part of it: this pool keeps what they leave (at least one).
  std::size_t held_by_sibling_pools = 0;
  if (another_waits) {
    std::unordered_set<int> own_backends;
    for (auto state : {pool::NodeState::connecting, pool::NodeState::idle, pool::NodeState::leased,
                       pool::NodeState::resetting, pool::NodeState::pinging}) {
      self->core.nodes(state).for_each([&](const pool::Node& node) {
        if (node.attachment == nullptr) return;
        const auto& pooled = static_cast<const PooledConnection&>(*node.attachment);
        if (pooled.backend_pid > 0) own_backends.insert(pooled.backend_pid);
      });
    }
    for (const SlotHolder& holder : holders) {
      if (holder.waiting || holder.tag != self->application_name) continue;
      if (my_class != 0 && budget_class_of_slot(budget, holder.slot) != my_class) continue;
      if (own_backends.count(holder.pid) == 0) ++held_by_sibling_pools;
    }
  }
  const auto rank_in = [this_process = self->application_name](const std::set<std::string>& of) {
    return static_cast<std::size_t>(std::distance(of.begin(), of.find(this_process)));
  };
  const std::size_t share = budget_fair_share(budget, processes.size(), class_processes.size(),
                                              rank_in(processes), rank_in(class_processes));
  const std::size_t cap =
      another_waits ? std::min(self->config.max_size,
                               share > held_by_sibling_pools ? share - held_by_sibling_pools : 1)
                    : self->config.max_size;
  if (cap != self->core.connection_cap()) {
    deferred.add([self, cap, another_waits, processes = processes.size()] {
      if (another_waits) {
        spdlog::info(
            "pgrt pool {}: another process waits for a slot of the connection budget '{}': "
            "keeping at most {} connection(s), its share of {} slots among {} processes",
            self->application_name, self->config.budget.key, cap, self->config.budget.slots,
            processes);
      } else {
        spdlog::info(
            "pgrt pool {}: no process waits for a slot of the connection budget '{}' any more: "
            "up to max_size again",
            self->application_name, self->config.budget.key);
      }
    });
  }
  // Applied again at every check: a limit not confirmed lapses by itself (Core::limit_connections).
  if (another_waits || cap != self->core.connection_cap()) {
    // (A waiter that cannot use this class's slots gets one only from a connection on a shared
    // slot: those are retired first.)
    const auto on_shared_slot = [&budget](const pool::Node& node) {
      return node.state != pool::NodeState::connecting && node.attachment != nullptr &&
             budget_class_of_slot(
                 budget, static_cast<const PooledConnection&>(*node.attachment).budget_slot) == 0;
    };
    self->core.limit_connections(
        cap, now, actions, 2 * budget.check_interval + self->config.connect.connect_timeout,
        waiter_needs_shared && my_class != 0 ? pool::RetireFirst(on_shared_slot)
                                             : pool::RetireFirst());
  }
  // (The core's own nodes, read through its const view, handed back to it.)
  for (const pool::Node* node : lost)
    self->core.slot_lost(const_cast<pool::Node&>(*node), now, actions);
  self->execute_locked(actions, deferred);
}

void PoolState::start_close(pool::Node& node) {
  // The connection (its socket, its strand) leaves the node here, under the lock, and belongs to
  // the close from then on: to the handler posted below, then to finish_close()'s frame. If the
  // io_context is destroyed before the close runs (close() returned after its grace period and
  // interrupted a lease, whose return comes in the io_context's shutdown) or while the server is
  // slow to end the backend, the connection goes with the handler or the frame, while the
  // io_context's services still exist, and not with the Pool later (the docs let the Pool
  // outlive its io_context once closed). Nothing reads a closing node's attachment.
  // On a strand: close_and_wait() races the socket against a timer.
  asio::post(*executor,
             [self = shared_from_this(), &node, attachment = std::move(node.attachment)]() mutable {
               asio::co_spawn(asio::make_strand(*self->executor),
                              finish_close(self, &node, std::move(attachment)), asio::detached);
             });
}

asio::awaitable<void> PoolState::finish_close(std::shared_ptr<PoolState> self, pool::Node* node,
                                              std::unique_ptr<pool::NodeAttachment> attachment) {
  co_await close_until_backend_ends(self, static_cast<PooledConnection&>(*attachment).connection);
  // The connection goes outside the lock; the node (and its capacity) under it.
  attachment.reset();
  Deferred deferred;
  std::lock_guard lock(self->mutex);
  auto& actions = self->fresh_actions_locked();
  self->core.backend_ended(*node, Clock::now(), actions);
  self->execute_locked(actions, deferred);
}

asio::awaitable<void> PoolState::close_until_backend_ends(const std::shared_ptr<PoolState>& self,
                                                          Connection& connection,
                                                          const std::function<void()>& when_slow) {
  const int pid = connection.backend_pid();
  // (A connect given up on has no backend pid: its backend never said it.)
  const std::string backend = pid > 0 ? "backend " + std::to_string(pid)
                                      : std::string("the backend of a connect given up on");
  const auto closed_at = Clock::now();
  bool slow = false;
  (void)co_await connection.close_and_wait(server_close_warning, [&] {
    if (!slow && when_slow) when_slow();
    slow = true;
    const auto waited =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - closed_at);
    if (self->backend_end_bound.count() > 0 && waited >= self->backend_end_bound) {
      spdlog::warn(
          "pgrt pool {}: {} was not seen to end {} ms after it was closed; its slot is "
          "given back now: by this bound the session guards (keepalives, tcp_user_timeout, "
          "client_connection_check_interval) have made the server end it",
          self->application_name, backend, waited.count());
      return false;
    }
    if (waited < 2 * server_close_warning) {
      spdlog::warn(
          "pgrt pool {}: the server has not ended {} {} ms after it was closed; its "
          "slot stays counted against max_size until it does{}",
          self->application_name, backend, waited.count(),
          self->backend_end_bound.count() > 0
              ? " (at most " + std::to_string(self->backend_end_bound.count()) + " ms)"
              : std::string(" (keepalives are off: there is no bound)"));
    }
    return true;
  });
}

asio::awaitable<void> PoolState::upkeep(std::shared_ptr<PoolState> self) {
  for (;;) {
    std::unique_lock lock(self->mutex);
    if (self->core.closed()) co_return;
    (void)co_await async::wait_locked(lock, *self->upkeep_timer);
    Deferred deferred;  // its events run after the lock is released below
    if (self->core.closed()) co_return;
    const auto now = Clock::now();
    if (self->upkeep_timer->expiry() > now) continue;  // re-armed meanwhile
    auto& actions = self->fresh_actions_locked();
    self->upkeep_timer->expires_at(Clock::time_point::max());
    self->core.tick(now, actions);
    self->execute_locked(actions, deferred);
    lock.unlock();
  }
}

void PoolState::closed_in_lease(pool::Node& node, Connection live) noexcept {
  try {
    Deferred deferred;
    std::lock_guard lock(mutex);
    auto& pooled = static_cast<PooledConnection&>(*node.attachment);
    pooled.leased_impl = nullptr;
    pooled.connection = std::move(live);
    auto& actions = fresh_actions_locked();
    core.closed_in_lease(node, coarse_now(), actions);
    execute_locked(actions, deferred);
  } catch (const std::exception& error) {
    spdlog::error("pgrt pool {}: closing a connection closed in its lease failed: {}",
                  application_name, error.what());
  }
}

std::string PoolState::describe_load_locked(std::size_t uncounted_waiters) const {
  const auto stats = core.stats();
  std::string load = std::to_string(stats.count(pool::NodeState::leased)) + " of max " +
                     std::to_string(config.max_size) + " connections in use, " +
                     std::to_string(stats.count(pool::NodeState::connecting)) + " connecting, ";
  // The states a connection passes through briefly: named only when a wait may be due to them.
  for (auto state :
       {pool::NodeState::resetting, pool::NodeState::pinging, pool::NodeState::closing}) {
    if (stats.count(state) > 0) {
      load += std::to_string(stats.count(state)) + " " + std::string(pool::to_string(state)) + ", ";
    }
  }
  if (core.connection_cap() < config.max_size) {
    load += "kept to " + std::to_string(core.connection_cap()) + " by the budget's fair share, ";
  }
  return load + std::to_string(stats.waiting_normal + stats.waiting_high + uncounted_waiters) +
         " callers waiting";
}

asio::awaitable<Lease> PoolState::acquire(std::shared_ptr<PoolState> self, Priority priority,
                                          pool::ConsumerIndex consumer, std::source_location site,
                                          std::optional<Clock::time_point> deadline) {
  // A caller already cancelled: reported as client_errc::cancelled and counted. (Under asio's
  // default this_coro::throw_if_cancelled(true), asio itself throws operation_aborted at the
  // caller's co_await before the pool is reached; see pool.hpp.)
  if ((co_await asio::this_coro::cancellation_state).cancelled() != asio::cancellation_type::none) {
    std::lock_guard lock(mutex);
    fail_cancelled_locked(priority, site);
  }
  const auto now = coarse_now();
  Deferred deferred;  // declared before the lock: its events run after it is released
  std::unique_lock lock(mutex);
  if (!executor && !core.closed()) {
    // co_await this_coro::executor never suspends: it is safe under the lock.
    bind_executor_locked(co_await asio::this_coro::executor);
  }
  auto& actions = fresh_actions_locked();
  const auto result = core.try_acquire(priority, site, now, actions, consumer);
  execute_locked(actions, deferred);
  // One Lease, built in one place below for both ways of getting a node: the frame holds every
  // local of every branch, and must stay within asio's recycling allocator (at most 1020 bytes
  // with g++ 12 and Boost 1.81; 896 now): a larger frame costs a malloc per acquire.
  pool::Node* handed = result.node;
  bool validate = result.validate;
  Clock::time_point check_deadline{};
  Clock::time_point resumed{};  // when a waiter ran again: the end of its wait, its lease's start
  switch (result.kind) {
    case pool::AcquireResult::Kind::leased:
      [[likely]] waits.record(std::chrono::microseconds(0));
      if (config.timings) wait_time.record(std::chrono::nanoseconds(0));
      if (validate || config.before_handout) {
        check_deadline = deadline.value_or(Clock::now() + checkout_limit());
      }
      break;
    case pool::AcquireResult::Kind::closed:
    case pool::AcquireResult::Kind::queue_full:
    case pool::AcquireResult::Kind::no_wait:
      fail_admission_locked(result.kind, deferred);
    case pool::AcquireResult::Kind::wait:
      [[unlikely]] {
        const auto started = Clock::now();
        auto wait_limit = result.wait_limit;
        if (deadline) {
          wait_limit =
              std::max(std::chrono::milliseconds(0),
                       std::chrono::duration_cast<std::chrono::milliseconds>(*deadline - started));
        }
        PoolWaiter waiter(priority, consumer, site);
        // The core's upkeep tick times the wait out (one timer for every waiter); the waiter arms
        // no timer of its own: its coroutine parks in it until the core wakes it.
        waiter.deadline = started + wait_limit;
        // If this coroutine is destroyed while it waits (its io_context shut down), the waiter
        // must leave the queue, and a connection already handed to it must go back.
        auto& enqueued = fresh_actions_locked();
        core.enqueue(waiter, now, enqueued);
        execute_locked(enqueued, deferred);
        async::AbandonGuard abandon([this, &waiter, &lock] {
          pool::Node* given = nullptr;
          {
            std::unique_lock relock(mutex, std::defer_lock);
            if (!lock.owns_lock()) relock.lock();
            pool::Actions ignored;
            core.withdraw(waiter, pool::FailReason::cancelled, ignored);
            if (waiter.outcome == pool::Waiter::Outcome::handed) given = waiter.handed;
          }
          if (given != nullptr && !lock.owns_lock()) release(*given, nullptr, false);
        });
        // The wait starts under the lock, so a handoff cannot slip in before it. (A plain
        // asynchronous operation: no coroutine frame of its own.) One the core ended already, as
        // it queued it, is not waited for.
        error_code error;
        if (waiter.outcome == pool::Waiter::Outcome::none) {
          const auto waiting_on = co_await asio::this_coro::executor;
          asio::execution_context& context = asio::query(waiting_on, asio::execution::context);
          watch_waiters_on_locked(context);
          std::tie(error) = co_await async::park_then_unlock(lock, waiter.parked, waiting_on);
          lock = std::unique_lock(mutex);
        }
        abandon.disarm();
        if (waiter.outcome != pool::Waiter::Outcome::handed) {
          fail_wait(lock, waiter, error, wait_limit);
        }
        resumed = Clock::now();
        const auto waited = resumed - started;
        waits.record(std::chrono::duration_cast<std::chrono::microseconds>(waited));
        if (config.timings) wait_time.record(waited);
        handed = waiter.handed;
        validate = waiter.validate;
        check_deadline = started + wait_limit;
        break;
      }
  }
  // The Lease owns the connection before any event runs: nothing can leak its slot.
  const bool check = validate || config.before_handout;
  if (config.timings) {
    handed->lease_started = resumed != Clock::time_point{} ? resumed : timing_now();
  }
  Lease lease(check ? self : std::move(self), handed);
  lock.unlock();
  emit(events.acquired, site);
  if (!check) co_return lease;
  co_return co_await checked(std::move(lease), std::move(self), priority, consumer, site,
                             check_deadline, validate);
}

void PoolState::watch_waiters_on_locked(asio::execution_context& context) {
  if (std::find(watched_contexts.begin(), watched_contexts.end(), &context) !=
      watched_contexts.end()) {
    return;
  }
  // (asio's service registry takes a lock of its own, never held while it calls into pgrt.)
  asio::use_service<async::ParkedWaitWatch>(context).watch(shared_from_this());
  watched_contexts.push_back(&context);
}

void PoolState::release_waits_of(asio::execution_context& context) {
  // (Each waiter's unwinding is posted by asio to its io_context, whose shutdown destroys it:
  // acquire()'s AbandonGuard takes the mutex.)
  async::release_waits_on(
      context, mutex,
      [this](const auto& visit) {
        core.for_each_waiter(
            [&](pool::Waiter& waiter) { visit(static_cast<PoolWaiter&>(waiter).parked); });
      },
      [this, &context] { std::erase(watched_contexts, &context); });
}

void PoolState::fail_cancelled_locked(Priority priority, std::source_location site) {
  pool::Waiter gone(priority, site);
  core.withdraw(gone, pool::FailReason::cancelled, fresh_actions_locked());  // counted
  throw_pool_error(client_errc::cancelled, "waiting for a pooled connection was cancelled");
}

std::optional<pool::ConsumerIndex> PoolState::find_consumer(std::string_view name) const {
  for (std::size_t i = 0; i < config.consumers.size(); ++i) {
    if (config.consumers[i].name == name) return static_cast<pool::ConsumerIndex>(i + 1);
  }
  return std::nullopt;
}

namespace {
asio::awaitable<Lease> throw_at_co_await(client_errc code, std::string message, std::string hint) {
  throw_pool_error(code, std::move(message), std::move(hint));
  co_return Lease{};
}
}  // namespace

asio::awaitable<Lease> PoolState::fail_unknown_consumer(std::string_view name) const {
  std::string known;
  for (const ConsumerShare& consumer : config.consumers) {
    known += (known.empty() ? "" : ", ") + consumer.name;
  }
  return throw_at_co_await(
      client_errc::invalid_config,
      "the pool " + application_name + " has no consumer named '" + std::string(name) + "'",
      known.empty() ? "PoolConfig::consumers (PGRT_POOL_CONSUMERS) is empty: list it there, or "
                      "acquire without a consumer"
                    : "PoolConfig::consumers (PGRT_POOL_CONSUMERS) lists: " + known);
}

void PoolState::fail_admission_locked(pool::AcquireResult::Kind kind, Deferred& deferred) {
  if (kind == pool::AcquireResult::Kind::closed) {
    throw_pool_error(client_errc::pool_closed, "the pool " + application_name + " is closed");
  }
  if (kind == pool::AcquireResult::Kind::queue_full) {
    throw_pool_error(client_errc::pool_queue_full,
                     "the pool " + application_name + " already has " +
                         std::to_string(config.max_waiters) + " callers waiting (" +
                         describe_load_locked() + ")",
                     "raise PoolConfig::max_waiters, or shed load earlier");
  }
  std::string message =
      "no connection free in the pool " + application_name + " (" + describe_load_locked() +
      ") and acquire_timeout is 0" +
      (last_connect_error.empty() ? std::string() : "; last connect error: " + last_connect_error);
  // A timeout like any other (counted in `timeouts`): its event too.
  deferred.add([this, message] { emit(events.acquire_timeout, message); });
  throw_pool_error(client_errc::pool_timeout, std::move(message));
}

void PoolState::fail_wait(std::unique_lock<std::mutex>& lock, pool::Waiter& waiter,
                          error_code error, std::chrono::milliseconds wait_limit) {
  // Counting this caller among the waiting (the upkeep tick has dequeued it if it timed out).
  const std::string load = describe_load_locked(waiter.queued ? 0 : 1);
  if (waiter.outcome == pool::Waiter::Outcome::none) {
    core.withdraw(waiter, error ? pool::FailReason::cancelled : pool::FailReason::timeout,
                  fresh_actions_locked());
  }
  switch (waiter.failed) {
    case pool::FailReason::pool_closed:
      throw_pool_error(client_errc::pool_closed, "the pool " + application_name + " was closed");
    case pool::FailReason::cancelled:
      throw_pool_error(client_errc::cancelled, "waiting for a pooled connection was cancelled");
    case pool::FailReason::server_down: {
      if (last_connect_error_code == client_errc::budget_exhausted) {
        const std::string message = "no connection for the pool " + application_name + " for " +
                                    std::to_string(config.fail_fast_after.count()) +
                                    " ms: " + last_connect_error;
        lock.unlock();
        throw_pool_error(client_errc::budget_exhausted, message,
                         "PoolConfig::fail_fast_after (PGRT_FAIL_FAST_MS) ended this wait early");
      }
      if (last_connect_error_code == condition::too_many_connections) {
        // Reachable, but full (53300, or a role's or database's connection limit): backpressure,
        // with the server's own code, not "cannot be reached".
        const std::string message =
            "the server refuses new connections (it is full): every connect of the pool " +
            application_name + " was refused for " +
            std::to_string(config.fail_fast_after.count()) +
            " ms and none of its connections is alive; last connect error: " + last_connect_error;
        const error_code full = last_connect_error_code;
        lock.unlock();
        throw Error(full, Diagnostics{.message = message,
                                      .hint = "PoolConfig::fail_fast_after (PGRT_FAIL_FAST_MS) "
                                              "ended this wait early; the pool keeps retrying "
                                              "with backoff. Close idle connections elsewhere, "
                                              "lower pool sizes, or raise max_connections"});
      }
      const std::string message =
          "the server cannot be reached: every connect of the pool " + application_name +
          " failed for " + std::to_string(config.fail_fast_after.count()) +
          " ms and none of its connections is alive; last connect error: " + last_connect_error;
      lock.unlock();
      throw_pool_error(client_errc::connect_failed, message,
                       "PoolConfig::fail_fast_after (PGRT_FAIL_FAST_MS) ended this wait early; "
                       "the pool keeps retrying with backoff");
    }
    case pool::FailReason::refused: {
      const std::string message =
          "no connection for the pool " + application_name + ": " + last_connect_error;
      const error_code refused = last_connect_error_code;
      lock.unlock();
      throw Error(refused, Diagnostics{.message = message, .hint = budget_refused_hint(refused)});
    }
    case pool::FailReason::timeout:
      break;
  }
  Error timed_out = timeout_error_locked(wait_limit, load);
  lock.unlock();
  emit(events.acquire_timeout, timed_out.diagnostics().message);
  throw timed_out;
}

Error PoolState::timeout_error_locked(std::chrono::milliseconds wait_limit,
                                      const std::string& load) const {
  std::string message = "timed out after " + std::to_string(wait_limit.count()) +
                        " ms waiting for a connection from the pool " + application_name + " (" +
                        load + ")";
  if (!last_connect_error.empty()) message += "; last connect error: " + last_connect_error;
  // Held below what it needs by a full budget: say so, with the budget's own error. Also when
  // this pool's connect waits for its turn behind one (maybe another pool's) that waits for a
  // slot: it has no error of its own yet.
  const bool behind_a_slot_wait = connects_waiting_for_turn > 0 && turn_holder_waits_for_slot &&
                                  turn_holder_waits_for_slot->load();
  if (behind_a_slot_wait && last_connect_error_code != client_errc::budget_exhausted) {
    message +=
        "; its connect waits for its turn behind another that waits for a slot of the "
        "full connection budget '" +
        config.budget.key + "'";
  }
  const bool budget_full = ((failed_connects_in_a_row > 0 || budget_waits > 0) &&
                            last_connect_error_code == client_errc::budget_exhausted) ||
                           behind_a_slot_wait;
  // Every connect fails with an error that waiting does not cure (a TLS certificate the check
  // refuses, a wrong password, a conninfo value): that error's own code, not a busy pool's.
  const error_code connect_error = last_connect_error_code;
  const bool connects_cannot_succeed =
      failed_connects_in_a_row > 0 &&
      (connect_error == client_errc::tls_failed || connect_error == client_errc::invalid_config ||
       (connect_error.category() == sqlstate_category() &&
        connect_error != condition::connection_error &&
        connect_error != condition::too_many_connections));
  // Every connect refused by a full server (53300, or a role's or database's connection limit),
  // and none of the pool's connections alive to come back to the caller: backpressure, with the
  // server's own code and the connect's hint (what relieves the server), as fail_fast_after's
  // error has, not a busy pool's "raise max_size". A full server may have room in a moment:
  // which is why waiting does cure it, and why the caller waited out its acquire_timeout.
  const bool nothing_alive = failed_connects_in_a_row > 0 && core.live_connections() == 0;
  const bool server_full = nothing_alive && connect_error == condition::too_many_connections;
  if (connects_cannot_succeed) {
    return Error(
        connect_error,
        Diagnostics{.message = std::move(message),
                    .hint = "every connect fails with an error that waiting does not cure: "
                            "fix what it says (the pool keeps retrying with backoff)"});
  }
  if (budget_full) {
    return Error(make_error_code(client_errc::budget_exhausted),
                 Diagnostics{.message = std::move(message),
                             .hint = "every process sharing the budget (PGRT_BUDGET_KEY) together "
                                     "holds at most PGRT_BUDGET_SLOTS connections: hold leases for "
                                     "shorter, or raise the budget where the server allows it "
                                     "(pgrt-diag budget shows the holders)"});
  }
  if (server_full) {
    return Error(connect_error,
                 Diagnostics{.message = std::move(message),
                             .hint = last_connect_hint.empty()
                                         ? "the server refuses new connections (it is full): "
                                           "close idle connections elsewhere, lower pool sizes, "
                                           "or raise max_connections; retry with backoff"
                                         : last_connect_hint});
  }
  // Every connect fails (the server down or unreachable) and nothing is alive: no lease to hold
  // for shorter, no size to raise.
  return Error(
      make_error_code(client_errc::pool_timeout),
      Diagnostics{.message = std::move(message),
                  .hint = nothing_alive ? "none of the pool's connections is alive and every "
                                          "connect fails: check the server and the conninfo (the "
                                          "last connect error says why); the pool keeps retrying "
                                          "with backoff"
                                        : "hold leases for shorter, raise max_size, or check the "
                                          "server"});
}

std::optional<Error> PoolState::connects_failing_error(std::chrono::milliseconds wait_limit) const {
  std::lock_guard lock(mutex);
  if (failed_connects_in_a_row == 0 || core.live_connections() > 0) return std::nullopt;
  return timeout_error_locked(wait_limit, describe_load_locked());
}

asio::awaitable<Lease> PoolState::checked(Lease lease, std::shared_ptr<PoolState> self,
                                          Priority priority, pool::ConsumerIndex consumer,
                                          std::source_location site, Clock::time_point deadline,
                                          bool validate) {
  const asio::cancellation_state caller = co_await asio::this_coro::cancellation_state;
  bool usable = true;
  bool gave_up = false;
  DiscardReason reason = DiscardReason::broken;
  Connection& connection = *lease;
  try {
    if (validate) {
      (void)co_await cut_at(connection, deadline, connection.query(""));
      // (The ping's answer brings what the server reports of a role changed while it was idle.)
      if (self->role != RequiredRole::any && !serves_role(connection, self->role)) {
        usable = false;
        reason = DiscardReason::server_role;
      }
    }
    if (usable && self->config.before_handout) {
      reason = DiscardReason::rejected;
      // Cut at the deadline twice over: the connection (a statement the check runs ends), and
      // the check itself (cancelled, for one that waits on something else).
      usable = co_await with_timeout(
          cut_at(connection, deadline, self->config.before_handout(connection)),
          std::max(deadline - Clock::now(), Clock::duration::zero()));
      // A check that said yes once cut (with_timeout() hands back what completed as it was
      // cancelled) did not finish in time: as documented, not handed out.
      if (Clock::now() >= deadline) usable = false;
    }
  } catch (const Error& error) {
    usable = false;
    gave_up = error.code() == client_errc::cancelled;  // the caller gave up: so do we
  } catch (const std::exception& error) {
    usable = false;
    if (caller.cancelled() == asio::cancellation_type::none) {
      spdlog::warn("pgrt pool {}: PoolConfig::before_handout threw: {}", self->application_name,
                   error.what());
    }
  }
  if (gave_up || caller.cancelled() != asio::cancellation_type::none) {
    // The caller gave up while its connection was checked: the connection goes back as it is
    // (closed if the cancelled check left it broken: the lease's return sees to that), and the
    // acquire fails as a cancelled one, counted as one.
    {
      std::lock_guard lock(self->mutex);
      pool::Waiter gone(priority, site, consumer);
      self->core.withdraw(gone, pool::FailReason::cancelled, self->fresh_actions_locked());
    }
    lease.release();
    throw_pool_error(client_errc::cancelled,
                     "waiting for a pooled connection was cancelled (while its connection was "
                     "checked before handout)");
  }
  // A check that said yes on a connection that was cut meanwhile (it caught the error) hands out
  // nothing dead.
  if (usable && (connection.is_broken() || !connection.is_open())) {
    usable = false;
    reason = DiscardReason::broken;
  }
  if (usable) co_return lease;
  self->refuse(std::move(lease), reason);
  if (Clock::now() >= deadline) {
    // No time is left to check another: starting over would cut each idle connection at once.
    {
      std::lock_guard lock(self->mutex);
      pool::Waiter gone(priority, site, consumer);
      self->core.withdraw(gone, pool::FailReason::timeout,
                          self->fresh_actions_locked());  // counted
    }
    const std::string message = "no connection of the pool " + self->application_name +
                                " passed its checks before handout (validate_after_idle, "
                                "PoolConfig::before_handout) within the acquire's deadline";
    emit(self->events.acquire_timeout, message);  // (a timeout counted in `timeouts`)
    throw_pool_error(client_errc::pool_timeout, message,
                     "make the check quicker, or give the acquire more time (acquire_timeout)");
  }
  co_return co_await self->acquire(self, priority, consumer, site, deadline);
}

void PoolState::refuse(Lease lease, DiscardReason reason) noexcept {
  pool::Node* node = std::exchange(lease.node_, nullptr);
  lease.pool_.reset();
  try {
    Deferred deferred;
    std::lock_guard lock(mutex);
    // The Lease ends here, as any other does: its `acquired` went out when it took the connection.
    if (events.released.ever_connected()) deferred.add([this] { emit(events.released); });
    if (node->state != pool::NodeState::leased) {  // before_handout closed it itself
      core.lease_dropped_after_close(*node);
      return;
    }
    (void)take_back_locked(*node, lease.connection_);
    auto& actions = fresh_actions_locked();
    core.checkout_failed(*node, reason, coarse_now(), actions);
    execute_locked(actions, deferred);
  } catch (const std::exception& error) {
    spdlog::error("pgrt pool: closing a refused connection failed: {}", error.what());
  }
}

PoolStats PoolState::stats() const {
  std::lock_guard lock(mutex);
  const pool::CoreStats counts = core.stats();
  PoolStats snapshot;
  snapshot.max = counts.max;
  snapshot.size = counts.live;
  snapshot.idle = counts.count(pool::NodeState::idle);
  snapshot.in_use = counts.count(pool::NodeState::leased);
  snapshot.connecting = counts.count(pool::NodeState::connecting);
  snapshot.closing = counts.count(pool::NodeState::closing);
  snapshot.resetting = counts.count(pool::NodeState::resetting);
  snapshot.pinging = counts.count(pool::NodeState::pinging);
  Clock::time_point oldest_waiter_since = counts.oldest_waiter_since;
  if (multiplexer) {  // (its lock is taken under ours, never the reverse)
    std::lock_guard shared_lock(multiplexer->mutex);
    snapshot.shared_queued = multiplexer->queue.size();
    multiplexer->queue.for_each([&](const SharedStatement& statement) {
      oldest_waiter_since = std::min(oldest_waiter_since, statement.queued_at);
    });
    snapshot.shared_connections = multiplexer->links.size();
    for (const auto& link : multiplexer->links) snapshot.shared_in_flight += link->in_flight;
  }
  snapshot.waiting_normal = counts.waiting_normal;
  snapshot.waiting_high = counts.waiting_high;
  snapshot.acquired = counts.acquired;
  snapshot.timeouts = counts.timeouts;
  snapshot.cancellations = counts.cancellations;
  snapshot.connect_attempts = counts.connect_attempts;
  snapshot.connect_errors = counts.connect_errors;
  snapshot.discarded = counts.discarded;
  snapshot.leaks_suspected = counts.leaks_suspected;
  snapshot.wait_p50 = waits.percentile(0.5);
  snapshot.wait_p99 = waits.percentile(0.99);
  snapshot.wait_max = waits.max();
  if (oldest_waiter_since != pool::Time::max()) {
    snapshot.longest_wait = std::chrono::duration_cast<std::chrono::microseconds>(
        std::max(coarse_now() - oldest_waiter_since, Clock::duration::zero()));
  }
  snapshot.leases_past_leak_threshold = counts.leases_past_leak_threshold;
  snapshot.min_idle = config.min_idle;
  snapshot.discarded_by_reason = counts.discarded_by_reason;
  snapshot.wait_time = wait_time;
  snapshot.use_time = use_time;
  snapshot.create_time = create_time;
  snapshot.operation_time = statement_times->snapshot();
  snapshot.last_connect_error = last_connect_error;
  snapshot.last_connect_error_code = last_connect_error_code;
  snapshot.consecutive_connect_failures = counts.consecutive_connect_failures;
  snapshot.connect_backoff = counts.connect_backoff;
  snapshot.budget_probes = budget_probes;
  snapshot.budget_probes_without_slot = budget_probes_without_slot;
  snapshot.budget_slot_waits = budget_slot_waits;
  if (!config.consumers.empty()) {
    const auto& limits = core.consumer_limits();
    std::vector<bool> active(limits.size());
    for (std::size_t i = 0; i < limits.size(); ++i) {
      active[i] = counts.consumers[i].in_use > 0 || counts.consumers[i].waiting > 0;
    }
    const auto shares =
        pool::fair_shares(limits, active, config.max_size - config.reserved_for_priority);
    for (std::size_t i = 0; i < limits.size(); ++i) {
      snapshot.consumers.push_back({.name = i == 0 ? std::string() : config.consumers[i - 1].name,
                                    .in_use = counts.consumers[i].in_use,
                                    .waiting = counts.consumers[i].waiting,
                                    .min = limits[i].min,
                                    .max = limits[i].max,
                                    .share = shares[i]});
    }
  }
  return snapshot;
}

}  // namespace pgrt::detail
