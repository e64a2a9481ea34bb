#pragma once

/// @file
/// The utilization watchdog: a lifecycle component that looks at a pool and its server
/// periodically and warns once when a condition starts and once when it clears.

#include <array>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "pgrt/db/pool.hpp"
#include "pgrt/lifecycle/manager.hpp"
#include "pgrt/runtime/event.hpp"

namespace pgrt {

/// What the watchdog watches for. Each is either holding or not; the watchdog reports the changes.
enum class WatchdogCondition {
  pool_busy,           ///< more than WatchdogOptions::in_use_share of the pool's max in use
  long_waits,          ///< a caller has waited longer than WatchdogOptions::long_wait
  acquire_timeouts,    ///< acquires timed out since the previous check
  suspected_leaks,     ///< leases held past PoolConfig::leak_threshold
  connect_backoff,     ///< connects fail and the pool backs off
  server_busy,         ///< the server's client backends above WatchdogOptions::server_share of
                       ///< max_connections - superuser_reserved_connections
  server_unreachable,  ///< the server check could not reach the server
};
inline constexpr std::size_t watchdog_condition_count =
    static_cast<std::size_t>(WatchdogCondition::server_unreachable) + 1;
/// "pool_busy", "long_waits", ...
[[nodiscard]] std::string_view to_string(WatchdogCondition condition) noexcept;

/// The thresholds. An aggregate: `Watchdog w(executor, pool, {.interval = 1s})`.
struct WatchdogOptions {
  /// How often it looks (env PGRT_WATCHDOG_INTERVAL_MS). At least 10 ms.
  std::chrono::milliseconds interval{5'000};
  /// pool_busy above this share of PoolConfig::max_size in use, in (0, 1] (env
  /// PGRT_WATCHDOG_IN_USE_SHARE).
  double in_use_share = 0.8;
  /// long_waits when the longest current wait exceeds this (env PGRT_WATCHDOG_LONG_WAIT_MS).
  std::chrono::milliseconds long_wait{1'000};
  /// server_busy above this share of the server's usable connections, in (0, 1] (env
  /// PGRT_WATCHDOG_SERVER_SHARE).
  double server_share = 0.8;
  /// Query the server each interval (pg_stat_activity, settings). Off: server_busy and
  /// server_unreachable never hold (env PGRT_WATCHDOG_SERVER_CHECK=0).
  bool check_server = true;

  /// The defaults, overridden by the PGRT_WATCHDOG_* variables above. A malformed value throws
  /// pgrt::Error(client_errc::invalid_config) naming the variable.
  [[nodiscard]] static WatchdogOptions from_env();
};

/// One change of a condition.
struct WatchdogChange {
  WatchdogCondition condition;
  bool holds;          ///< true: it started; false: it cleared
  std::string detail;  ///< what was seen, e.g. "3 of max 3 connections in use (100% > 80%)"
};

/// Events, Boost.Signals2 signals (pgrt::Event); callbacks run on the watchdog's executor after
/// each check. An exception a callback throws is logged ("pgrt watchdog: an event subscriber
/// threw: ...") and ignored: every other subscriber still sees the change, and the checks go on.
struct WatchdogEvents {
  Event<void(const WatchdogChange&)> changed{"pgrt watchdog"};
};

/// A lifecycle component (named "watchdog") that checks a pool every interval and, for each
/// WatchdogCondition, logs a warning and emits WatchdogEvents::changed once when the condition
/// starts, and logs and emits once more when it clears: never once per interval (hysteresis by
/// state: a condition is reported on its edges only).
///
/// The server check (check_server) acquires with Priority::high, which is served before every
/// normal caller and may use PoolConfig::reserved_for_priority connections: with at least one
/// reserved, a pool saturated by normal callers cannot hold it up. It waits at most half an
/// interval (at most 2 s) for a connection and runs one query under the same bound; when it
/// cannot get a connection while the pool's connections are all in use, the server conditions
/// keep their state for that round (the pool_busy condition already says why). When the connect
/// itself fails or the query breaks its connection, server_unreachable starts (not when the
/// server refuses connects as full, 53300, or the connection budget is full: connect_backoff
/// says that). The check's own timed-out acquire is not counted in acquire_timeouts.
///
/// `pool` must outlive the component (add it after the pool's component: it stops first).
///
/// Thread safety: conditions(), warnings() and events() from any thread; start() and stop() by
/// the manager. Cancellation: stop() ends the loop at once, cancelling a server check in flight.
class Watchdog {
 public:
  /// Throws pgrt::Error(client_errc::invalid_config) for an out-of-range option.
  Watchdog(boost::asio::any_io_executor executor, Pool& pool, WatchdogOptions options = {});
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;
  Watchdog(Watchdog&&) = delete;
  Watchdog& operator=(Watchdog&&) = delete;

  [[nodiscard]] std::string name() const { return "watchdog"; }
  /// Runs the first check at once, then one every interval, until stop().
  [[nodiscard]] boost::asio::awaitable<void> start();
  [[nodiscard]] boost::asio::awaitable<void> stop();

  /// Which conditions hold now (index: static_cast<std::size_t>(condition)).
  [[nodiscard]] std::array<bool, watchdog_condition_count> conditions() const;
  /// How many times each condition started (warnings logged).
  [[nodiscard]] std::array<std::uint64_t, watchdog_condition_count> warnings() const;
  /// How many checks ran.
  [[nodiscard]] std::uint64_t checks() const;
  [[nodiscard]] WatchdogEvents& events() noexcept;
  [[nodiscard]] const WatchdogOptions& options() const noexcept;

  /// Implementation detail.
  struct State;

 private:
  std::shared_ptr<State> state_;
};

/// Adds a Watchdog on the process-wide pool to `app`, after `pool` (the PoolComponent), so that
/// it stops before the pool closes. Returns it.
Watchdog& add_watchdog(lifecycle::Manager& app, const lifecycle::After& after_pool,
                       WatchdogOptions options = WatchdogOptions::from_env());

}  // namespace pgrt
