// The utilization watchdog: a pool's and its server's load, checked every interval, reported on
// the edges of each condition.
#include "pgrt/service/watchdog.hpp"

#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <spdlog/spdlog.h>
#include <utility>
#include <vector>

#include "config_input.hpp"
#include "pgrt/db/deadline.hpp"
#include "pgrt/db/error.hpp"

namespace pgrt {

namespace asio = boost::asio;
using std::chrono::milliseconds;

std::string_view to_string(WatchdogCondition condition) noexcept {
  switch (condition) {
    case WatchdogCondition::pool_busy:
      return "pool_busy";
    case WatchdogCondition::long_waits:
      return "long_waits";
    case WatchdogCondition::acquire_timeouts:
      return "acquire_timeouts";
    case WatchdogCondition::suspected_leaks:
      return "suspected_leaks";
    case WatchdogCondition::connect_backoff:
      return "connect_backoff";
    case WatchdogCondition::server_busy:
      return "server_busy";
    case WatchdogCondition::server_unreachable:
      return "server_unreachable";
  }
  return "unknown";
}

using detail::env;
using detail::invalid;

namespace {

constexpr milliseconds a_year = std::chrono::hours(24 * 366);

void validate(const WatchdogOptions& options) {
  // (Above a year a duration would overflow the clock's arithmetic: the watchdog would check in
  // a tight loop.)
  if (options.interval < milliseconds(10) || options.interval > a_year) {
    invalid("WatchdogOptions::interval is " + std::to_string(options.interval.count()) + " ms",
            "give at least 10 ms and at most a year (the default is 5000 ms)");
  }
  const auto share_ok = [](double share) {
    return std::isfinite(share) && share > 0 && share <= 1;
  };
  if (!share_ok(options.in_use_share)) {
    invalid("WatchdogOptions::in_use_share is " + std::to_string(options.in_use_share),
            "give a share in (0, 1], e.g. 0.8");
  }
  if (!share_ok(options.server_share)) {
    invalid("WatchdogOptions::server_share is " + std::to_string(options.server_share),
            "give a share in (0, 1], e.g. 0.8");
  }
  if (options.long_wait.count() < 0 || options.long_wait > a_year) {
    invalid("WatchdogOptions::long_wait is " + std::to_string(options.long_wait.count()) + " ms",
            "give a duration of 0 ms to a year");
  }
}

// Whole milliseconds from `min` to a year, or `fallback` when `name` is unset.
milliseconds env_milliseconds(const char* name, milliseconds fallback, milliseconds min) {
  const auto text = env(name);
  if (!text) return fallback;
  std::int64_t value = 0;
  const auto [end, error] = std::from_chars(text->data(), text->data() + text->size(), value);
  if (text->empty() || error != std::errc() || end != text->data() + text->size() ||
      value < min.count() || value > a_year.count()) {
    invalid(std::string(name) + "='" + *text + "' is not valid",
            "expected whole milliseconds from " + std::to_string(min.count()) + " to " +
                std::to_string(a_year.count()) + " (a year)");
  }
  return milliseconds(value);
}

// A share in (0, 1] ("0.8"), or `fallback` when `name` is unset.
double env_share(const char* name, double fallback) {
  const auto text = env(name);
  if (!text) return fallback;
  return detail::decimal_number(name, *text, 0, 1, true,
                                "expected a share in (0, 1]: a decimal such as 0.8 or 1");
}

std::string percent(double share) {
  return std::to_string(static_cast<int>(std::lround(share * 100))) + "%";
}

std::string millis(std::chrono::microseconds duration) {
  return std::to_string(std::chrono::duration_cast<milliseconds>(duration).count()) + " ms";
}

}  // namespace

WatchdogOptions WatchdogOptions::from_env() {
  WatchdogOptions options;
  options.interval =
      env_milliseconds("PGRT_WATCHDOG_INTERVAL_MS", options.interval, milliseconds(10));
  options.in_use_share = env_share("PGRT_WATCHDOG_IN_USE_SHARE", options.in_use_share);
  options.long_wait =
      env_milliseconds("PGRT_WATCHDOG_LONG_WAIT_MS", options.long_wait, milliseconds(0));
  options.server_share = env_share("PGRT_WATCHDOG_SERVER_SHARE", options.server_share);
  if (const auto check = env("PGRT_WATCHDOG_SERVER_CHECK")) {
    if (*check != "0" && *check != "1") {
      invalid("PGRT_WATCHDOG_SERVER_CHECK='" + *check + "' is not valid", "expected 0 or 1");
    }
    options.check_server = *check == "1";
  }
  validate(options);
  return options;
}

struct Watchdog::State {
  State(asio::any_io_executor executor, Pool& pool_in, WatchdogOptions options_in)
      : strand(asio::make_strand(executor)),
        pool(pool_in),
        options(options_in),
        wake(strand),
        finished(strand, asio::steady_timer::time_point::max()) {}

  // What one check saw: each condition, and the words for it.
  struct Seen {
    std::array<std::optional<std::string>, watchdog_condition_count> holding;  // nullopt: clear
    std::array<bool, watchdog_condition_count> judged{};  // false: keep the previous state
  };

  asio::awaitable<void> run();
  asio::awaitable<void> check();
  asio::awaitable<void> check_server(Seen& seen, const PoolStats& stats);
  void apply(const Seen& seen);

  asio::strand<asio::any_io_executor> strand;
  Pool& pool;
  const WatchdogOptions options;
  WatchdogEvents events;

  // On the strand:
  asio::steady_timer wake;
  asio::steady_timer finished;
  asio::cancellation_signal stop_signal;
  bool stopping = false;
  bool running = false;
  std::uint64_t timeouts_seen = 0;
  bool first_check = true;
  bool server_check_failing = false;  // its failure (not a timeout) was logged
  std::array<std::string, watchdog_condition_count> last_detail;

  // Read from any thread:
  mutable std::mutex mutex;
  std::array<bool, watchdog_condition_count> holding{};
  std::array<std::uint64_t, watchdog_condition_count> warnings{};
  std::uint64_t checks = 0;
};

asio::awaitable<void> Watchdog::State::run() {
  // stop() cancels this loop: it winds down through `stopping`, never by an exception, so that
  // `running` always goes false.
  co_await asio::this_coro::throw_if_cancelled(false);
  while (!stopping) {
    try {
      co_await check();
    } catch (const std::exception& error) {
      if (stopping) break;
      spdlog::error("pgrt watchdog: a check failed: {}", error.what());
    } catch (...) {
      if (stopping) break;
      spdlog::error("pgrt watchdog: a check failed");
    }
    if (stopping) break;
    wake.expires_after(options.interval);
    co_await wake.async_wait(asio::as_tuple(asio::use_awaitable));
  }
  running = false;
  finished.cancel();
}

asio::awaitable<void> Watchdog::State::check() {
  const PoolStats stats = pool.stats();
  Seen seen;
  seen.judged.fill(true);
  const auto at = [&](WatchdogCondition condition) -> std::optional<std::string>& {
    return seen.holding[static_cast<std::size_t>(condition)];
  };
  const double in_use = stats.max > 0 ? static_cast<double>(stats.in_use) / stats.max : 0;
  if (in_use > options.in_use_share) {
    at(WatchdogCondition::pool_busy) =
        std::to_string(stats.in_use) + " of max " + std::to_string(stats.max) +
        " connections in use (" + percent(in_use) + " > " + percent(options.in_use_share) + ")";
  }
  if (stats.longest_wait > options.long_wait) {
    at(WatchdogCondition::long_waits) =
        "a caller has waited " + millis(stats.longest_wait) + " for a connection (> " +
        std::to_string(options.long_wait.count()) + " ms); " +
        std::to_string(stats.waiting_normal + stats.waiting_high) + " waiting";
  }
  // The first check has no previous interval: timeouts before the watchdog started are history.
  if (!first_check && stats.timeouts > timeouts_seen) {
    at(WatchdogCondition::acquire_timeouts) = std::to_string(stats.timeouts - timeouts_seen) +
                                              " acquire(s) timed out in the last " +
                                              std::to_string(options.interval.count()) + " ms";
  }
  timeouts_seen = stats.timeouts;
  if (stats.leases_past_leak_threshold > 0) {
    at(WatchdogCondition::suspected_leaks) =
        std::to_string(stats.leases_past_leak_threshold) +
        " lease(s) held past the leak threshold (see the pool's leak reports for where they "
        "were taken)";
  }
  if (stats.consecutive_connect_failures > 0) {
    at(WatchdogCondition::connect_backoff) =
        std::to_string(stats.consecutive_connect_failures) + " connect(s) failed in a row" +
        (stats.connect_backoff.count() > 0
             ? ", next in " + std::to_string(stats.connect_backoff.count()) + " ms"
             : std::string()) +
        ": " + stats.last_connect_error;
  }
  seen.judged[static_cast<std::size_t>(WatchdogCondition::server_busy)] = false;
  seen.judged[static_cast<std::size_t>(WatchdogCondition::server_unreachable)] = false;
  if (options.check_server) co_await check_server(seen, stats);
  first_check = false;
  if (!stopping) apply(seen);
}

asio::awaitable<void> Watchdog::State::check_server(Seen& seen, const PoolStats& stats) {
  const auto bound = std::min(options.interval / 2, milliseconds(2'000));
  const auto busy = static_cast<std::size_t>(WatchdogCondition::server_busy);
  const auto unreachable = static_cast<std::size_t>(WatchdogCondition::server_unreachable);
  Lease lease;
  try {
    lease = co_await with_timeout(pool.acquire(Priority::high), std::max(bound, milliseconds(5)));
  } catch (const Error& error) {
    if (stopping) co_return;
    // The pool counted this acquire's own failure among its timeouts (PoolStats::timeouts: a
    // wait that ran out, whatever code it failed with: pool_timeout, budget_exhausted, a connect
    // error after fail_fast_after): not a caller's. Not counted there: the check's own bound
    // (timeout, a cancellation for the pool), a closed pool, a full queue.
    if (error.code() != client_errc::timeout && error.code() != client_errc::cancelled &&
        error.code() != client_errc::pool_closed && error.code() != client_errc::pool_queue_full) {
      ++timeouts_seen;
    }
    // No connection within the bound: unreachable when the pool cannot connect, else the pool is
    // only saturated (pool_busy says so) and the server's state is unknown this round. A server
    // that answers "full" (53300, a role's limit) or a full budget is reachable: connect_backoff
    // says why connects fail.
    const PoolStats now = pool.stats();
    const bool answers_full = now.last_connect_error_code == condition::too_many_connections ||
                              error.code() == condition::too_many_connections;
    if (!answers_full &&
        (now.consecutive_connect_failures > 0 || (now.size == 0 && now.connecting == 0) ||
         error.code() == condition::connection_error)) {
      seen.judged[unreachable] = true;
      seen.holding[unreachable] =
          "cannot reach the server: " +
          (now.last_connect_error.empty() ? std::string(error.what()) : now.last_connect_error);
    }
    (void)stats;
    co_return;
  }
  try {
    const Result result = co_await with_timeout(
        // (A role without pg_read_all_stats sees other roles' rows with backend_type null:
        // those in a database count too, with the few background workers that sit in one.)
        // Every name schema-qualified, operators too: a schema put before pg_catalog in the
        // pool's search_path (a pg_stat_activity of its own) must not change what it counts.
        lease->query("SELECT (SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity a"
                     " WHERE a.backend_type OPERATOR(pg_catalog.=) 'client backend'"
                     " OR (a.backend_type IS NULL AND a.datid IS NOT NULL))::pg_catalog.int8,"
                     " (pg_catalog.current_setting('max_connections')::pg_catalog.int8"
                     " OPERATOR(pg_catalog.-)"
                     " pg_catalog.current_setting('superuser_reserved_connections')"
                     "::pg_catalog.int8) OPERATOR(pg_catalog.-)"
                     // (PostgreSQL 16 reserves reserved_connections more, for pg_use_reserved_
                     // connections: no setting before it)
                     " coalesce(pg_catalog.current_setting('reserved_connections', true)"
                     "::pg_catalog.int8, 0)"),
        std::max(bound, milliseconds(5)));
    server_check_failing = false;
    const auto backends = result[0].get<std::int64_t>(0);
    const auto usable = result[0].get<std::int64_t>(1);
    seen.judged[unreachable] = true;
    seen.judged[busy] = true;
    const double share = usable > 0 ? static_cast<double>(backends) / usable : 1.0;
    if (share > options.server_share) {
      seen.holding[busy] = "the server has " + std::to_string(backends) + " client backends of " +
                           std::to_string(usable) +
                           " usable connections (max_connections - "
                           "superuser_reserved_connections - reserved_connections; " +
                           percent(share) + " > " + percent(options.server_share) + ")";
    }
  } catch (const Error& error) {
    if (stopping) co_return;
    if (error.code() == condition::connection_error) {
      seen.judged[unreachable] = true;
      seen.holding[unreachable] =
          std::string("the server check lost its connection: ") + error.what();
    } else if (error.code() != client_errc::timeout && !server_check_failing) {
      // Logged on its edge only (a slow server's timeouts: the state stays unknown this round).
      spdlog::warn("pgrt watchdog: the server check failed: {}", error.what());
      server_check_failing = true;
    }
    co_return;
  }
}

void Watchdog::State::apply(const Seen& seen) {
  std::vector<WatchdogChange> changes;
  {
    std::lock_guard lock(mutex);
    ++checks;
    for (std::size_t i = 0; i < watchdog_condition_count; ++i) {
      if (!seen.judged[i]) continue;
      const bool now = seen.holding[i].has_value();
      if (now == holding[i]) continue;
      holding[i] = now;
      if (now) ++warnings[i];
      changes.push_back({static_cast<WatchdogCondition>(i), now,
                         now ? *seen.holding[i] : "was: " + last_detail[i]});
      if (now) last_detail[i] = *seen.holding[i];
    }
  }
  for (const WatchdogChange& change : changes) {
    if (change.holds) {
      spdlog::warn("pgrt watchdog: {} started: {}", to_string(change.condition), change.detail);
    } else {
      spdlog::info("pgrt watchdog: {} cleared ({})", to_string(change.condition), change.detail);
    }
    try {
      events.changed(change);  // the combiner catches what subscribers throw
    } catch (const std::exception& error) {
      spdlog::error("pgrt watchdog: emitting a change failed: {}", error.what());
    } catch (...) {
      spdlog::error("pgrt watchdog: emitting a change failed");
    }
  }
}

Watchdog::Watchdog(asio::any_io_executor executor, Pool& pool, WatchdogOptions options) {
  validate(options);
  state_ = std::make_shared<State>(std::move(executor), pool, options);
}

Watchdog::~Watchdog() = default;

namespace {
// The loop's coroutine holds the state: it outlives the Watchdog if it must.
asio::awaitable<void> run_watchdog(std::shared_ptr<Watchdog::State> state) {
  co_await state->run();
}

asio::awaitable<void> stop_on_strand(std::shared_ptr<Watchdog::State> state) {
  state->stopping = true;
  state->wake.cancel();
  state->stop_signal.emit(asio::cancellation_type::terminal);
  while (state->running) {
    co_await state->finished.async_wait(asio::as_tuple(asio::use_awaitable));
  }
}
}  // namespace

asio::awaitable<void> Watchdog::start() {
  auto state = state_;
  asio::dispatch(state->strand, [state] {
    if (state->running || state->stopping) return;
    state->running = true;
    asio::co_spawn(state->strand, run_watchdog(state),
                   asio::bind_cancellation_slot(state->stop_signal.slot(), asio::detached));
  });
  co_return;
}

asio::awaitable<void> Watchdog::stop() {
  co_await asio::co_spawn(state_->strand, stop_on_strand(state_), asio::use_awaitable);
}

std::array<bool, watchdog_condition_count> Watchdog::conditions() const {
  std::lock_guard lock(state_->mutex);
  return state_->holding;
}

std::array<std::uint64_t, watchdog_condition_count> Watchdog::warnings() const {
  std::lock_guard lock(state_->mutex);
  return state_->warnings;
}

std::uint64_t Watchdog::checks() const {
  std::lock_guard lock(state_->mutex);
  return state_->checks;
}

WatchdogEvents& Watchdog::events() noexcept {
  return state_->events;
}

const WatchdogOptions& Watchdog::options() const noexcept {
  return state_->options;
}

Watchdog& add_watchdog(lifecycle::Manager& app, const lifecycle::After& after_pool,
                       WatchdogOptions options) {
  return app.add(std::make_shared<Watchdog>(app.executor(), pgrt::pool(), options), after_pool);
}

}  // namespace pgrt
