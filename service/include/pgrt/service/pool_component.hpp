#pragma once

/// @file
/// The process-wide pool as a lifecycle component.

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <string>

#include "pgrt/db/pool.hpp"
#include "pgrt/lifecycle/manager.hpp"

namespace pgrt {

struct PoolComponentOptions {
  /// How long stop() waits for leases to come back before interrupting them (Pool::close()).
  std::chrono::milliseconds close_grace{5'000};
  /// start() opens one connection to prove the server is reachable (within acquire_timeout), and
  /// binds the pool to the component's executor. Without it, the pool binds to the executor of
  /// its first acquire.
  bool check_connection = true;
  /// With check_connection: how long start() waits for the database. A server that is down,
  /// still starting up (57P03), or full (53300) is waited for: the pool retries with its connect
  /// backoff, each new reason is logged once ("waiting for the database: ..."), and the start
  /// succeeds as soon as a connection works. Only when this deadline passes does the start fail,
  /// with the last reason. Errors that waiting cannot cure (a malformed conninfo, a wrong
  /// password, a missing database) fail the start at once. add_pool() gives the component a
  /// start deadline this long plus 5 s. Zero: no waiting, one acquire within acquire_timeout
  /// (env PGRT_START_WAIT_S).
  std::chrono::milliseconds start_wait{60'000};

  /// The defaults, overridden by PGRT_START_WAIT_S. A malformed value throws
  /// pgrt::Error(client_errc::invalid_config).
  [[nodiscard]] static PoolComponentOptions from_env();
};

/// The process-wide pool (pgrt::pool(), pgrt::connection()) as a lifecycle component named
/// "pool".
///
/// The constructor configures the process-wide pool (pgrt::configure(); it throws if the pool is
/// already configured or the config is invalid), so components built after it may take
/// pgrt::pool(). No connection is opened and no asio object exists until start(), which binds
/// the pool to `executor` (use the manager's executor, not a strand) and, with
/// check_connection, acquires one connection, waiting for a database that is not up yet for up
/// to start_wait: a server that stays down makes the start fail with the pool's message
/// (pgrt::Error) instead of the first request. A failed or
/// cancelled start closes the pool again. stop() closes the pool (Pool::close() with
/// close_grace) and forgets it, so pgrt::configure() may be called again.
class PoolComponent {
 public:
  PoolComponent(boost::asio::any_io_executor executor, PoolConfig config,
                PoolComponentOptions options = {});
  [[nodiscard]] std::string name() const { return "pool"; }
  [[nodiscard]] boost::asio::awaitable<void> start();
  [[nodiscard]] boost::asio::awaitable<void> stop();

 private:
  boost::asio::awaitable<void> wait_for_database();
  boost::asio::any_io_executor executor_;
  PoolComponentOptions options_;
};

/// Adds the process-wide pool to `app` (a PoolComponent on app.executor()) and registers the
/// atexit handler that closes its connections if the process exits without a graceful stop
/// (Pool::close_now(), through Pool::close_now_handle(): also once the pool's own stop has begun
/// and was abandoned at the end of the shutdown budget). It starts after `dependencies` (e.g. the
/// StartupHygiene). Returns the component: pass it to lifecycle::after().
PoolComponent& add_pool(lifecycle::Manager& app, PoolConfig config,
                        PoolComponentOptions options = PoolComponentOptions::from_env(),
                        lifecycle::After dependencies = {});

}  // namespace pgrt
