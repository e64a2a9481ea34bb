#pragma once

/// @file
/// Start-up hygiene as a lifecycle component: one instance at a time, and the leftovers of an
/// earlier run terminated before the pool starts.

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "pgrt/db/connection.hpp"
#include "pgrt/db/hygiene.hpp"
#include "pgrt/db/pool.hpp"
#include "pgrt/db/session_guards.hpp"
#include "pgrt/lifecycle/manager.hpp"
#include "pgrt/runtime/instance_lock.hpp"

namespace pgrt {

struct StartupHygieneOptions {
  /// One process per app and instance on this host (flock on a lock file) (env
  /// PGRT_INSTANCE_LOCK=0 turns it off).
  bool instance_lock = true;
  /// Where the lock files live; empty: default_lock_directory() (env PGRT_RUNTIME_DIR).
  std::filesystem::path lock_directory;
  /// Stop a running holder (SIGTERM, then SIGKILL after takeover_grace) and take over, instead of
  /// refusing to start (env PGRT_FORCE=1).
  bool force = false;
  /// Longer than a holder's own graceful shutdown (the lifecycle's 30 s budget, 35 s hard
  /// deadline, by default), so that it flushes its pending writes before it is killed.
  std::chrono::milliseconds takeover_grace{40'000};
  /// Also one instance across hosts: pg_try_advisory_lock on a connection of its own, held while
  /// the process runs and counted against the pool's max (env PGRT_CLUSTER_LOCK=1). When the
  /// holder's session is tagged with the incarnation of an earlier holder of the (local)
  /// instance lock, that process is gone and the session a leftover: it is terminated (logged)
  /// and the lock taken. Any other holder makes start() refuse, naming it.
  bool cluster_lock = false;
  /// Terminate the leftovers of earlier incarnations of this app/instance (env PGRT_CLEANUP=0
  /// turns it off). Only while holding a singleton lock: with instance_lock and cluster_lock
  /// both off, start() skips it with a warning (CleanupReport::skipped).
  bool cleanup = true;
  /// Also terminate this app's backends idle longer than this; zero: off (env
  /// PGRT_CLEANUP_IDLE_S).
  std::chrono::seconds idle_threshold{0};
  /// How long its connects (the cleanup's, the cluster-wide lock's) wait for a database that is
  /// down, starting up or full, retrying with backoff and logging each new reason once, before
  /// the start fails (as PoolComponentOptions::start_wait; env PGRT_START_WAIT_S). Zero: one try.
  std::chrono::milliseconds start_wait{60'000};

  /// The defaults, overridden by the variables above. A malformed value throws
  /// pgrt::Error(client_errc::invalid_config) naming the variable and the accepted form.
  [[nodiscard]] static StartupHygieneOptions from_env();
};

/// A component named "startup_hygiene". start() logs the process identity (host, pid, boot id,
/// start time, incarnation), takes the instance lock (a second instance fails to start with a
/// message naming the holder's pid; with force it stops the holder first), optionally the
/// cluster-wide lock, then terminates the leftovers (cleanup_predecessors(); a missing permission
/// is a warning and the start goes on; without any lock held the cleanup is skipped, with a
/// warning). stop() releases the locks. Add the pool after it.
class StartupHygiene {
 public:
  StartupHygiene(boost::asio::any_io_executor executor, const PoolConfig& pool_config,
                 StartupHygieneOptions options);
  [[nodiscard]] std::string name() const { return "startup_hygiene"; }
  [[nodiscard]] boost::asio::awaitable<void> start();
  [[nodiscard]] boost::asio::awaitable<void> stop();
  /// The options of its own connections (the cleanup's, the cluster-wide lock's): the pool's
  /// conninfo and connect settings with the pool's session guards (with_session_guards()), and
  /// this process's tag as application_name.
  [[nodiscard]] ConnectOptions connect_options() const;
  /// What the cleanup found and did (empty before start()).
  [[nodiscard]] const CleanupReport& cleanup_report() const noexcept { return report_; }

 private:
  boost::asio::awaitable<Connection> connect();
  boost::asio::awaitable<void> take_cluster_lock();

  boost::asio::any_io_executor executor_;
  std::string conninfo_;
  ConnectOptions connect_options_;
  SessionGuards guards_;
  std::string application_;
  std::string instance_;
  std::string tag_;
  StartupHygieneOptions options_;
  std::optional<InstanceLock> lock_;
  Connection cluster_lock_connection_;
  CleanupReport report_;
};

/// Adds StartupHygiene to `app`, configured from `pool_config` (conninfo, app and instance, connect
/// settings). With cluster_lock, lowers pool_config.max_size by one for the lock's connection (so
/// add the pool with this config afterwards; throws pgrt::Error(invalid_config) if max_size is 1).
/// Its start deadline is the manager's start_timeout plus max_takeover_time() (with force) plus
/// start_wait (when it connects), so a takeover of a holder that ignores SIGTERM, and a wait for
/// the database, complete (a ManagerOptions::start_hard_deadline, if
/// set, must be longer still). Returns the component: add the pool after it, `add_pool(app, config,
/// {}, after(hygiene))`.
StartupHygiene& add_startup_hygiene(
    lifecycle::Manager& app, PoolConfig& pool_config,
    StartupHygieneOptions options = StartupHygieneOptions::from_env());

}  // namespace pgrt
