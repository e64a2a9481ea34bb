#pragma once

/// @file
/// Start-up hygiene as a lifecycle component: one instance at a time, and the leftovers of an
/// earlier run terminated before the pool starts.

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <filesystem>
#include <functional>
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
  /// While the process runs, the cluster-wide lock's session is watched: at once when its socket
  /// turns readable (the server ended it, or sent something), and with a check that the lock is
  /// still held at least this often (a connection lost without a word). A lost lock is retaken
  /// at once, on a new connection, by the same rules as at the start; if another instance holds
  /// it by then, the lock is lost for good: see StartupHygiene::on_cluster_lock_lost(). Positive.
  std::chrono::milliseconds cluster_lock_check_interval{2'000};
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
///
/// The cluster-wide lock is kept, not only taken: its session can end while the process runs
/// (a failover, a network cut, an administrator's pg_terminate_backend), and an instance started
/// elsewhere meanwhile would take the lock and terminate this process's connections as an
/// earlier incarnation's. So its session is watched (cluster_lock_check_interval) and a lost lock
/// retaken at once (logged as a warning); while the database cannot be reached, retaking is
/// retried with backoff for as long as the process runs. If another session holds the lock when
/// it is retaken, this process no longer is the instance: the error is logged and the
/// on_cluster_lock_lost() handler runs (add_startup_hygiene() makes it stop the service with
/// exit_code::failure).
///
/// Thread safety: start(), stop() and the setters from one coroutine at a time, as the manager
/// calls them; the watch runs on a strand of its own, so the io_context may run on any number of
/// threads. Destroying the component without stop() ends the watch and closes the lock's session
/// (releasing the lock) from the io_context soon after.
class StartupHygiene {
 public:
  StartupHygiene(boost::asio::any_io_executor executor, const PoolConfig& pool_config,
                 StartupHygieneOptions options);
  ~StartupHygiene();
  StartupHygiene(const StartupHygiene&) = delete;
  StartupHygiene& operator=(const StartupHygiene&) = delete;
  StartupHygiene(StartupHygiene&&) = delete;
  StartupHygiene& operator=(StartupHygiene&&) = delete;
  /// What to do when the cluster-wide lock is lost to another session (see the class comment):
  /// `handler` gets the reason, naming the new holder; it runs on the io_context, once, and must
  /// not throw. Without one, the loss is only logged. Set it before start().
  void on_cluster_lock_lost(std::function<void(const std::string& reason)> handler);
  [[nodiscard]] std::string name() const { return "startup_hygiene"; }
  [[nodiscard]] boost::asio::awaitable<void> start();
  [[nodiscard]] boost::asio::awaitable<void> stop();
  /// The options of its own connections (the cleanup's, the cluster-wide lock's): the pool's
  /// conninfo and connect settings with the pool's session guards (with_session_guards()), and
  /// this process's tag as application_name.
  [[nodiscard]] ConnectOptions connect_options() const;
  /// What the cleanup found and did (empty before start()).
  [[nodiscard]] const CleanupReport& cleanup_report() const noexcept { return report_; }

  /// Implementation detail: the cluster-wide lock's connection and its watch.
  struct ClusterLock;

 private:
  boost::asio::awaitable<Connection> connect();

  boost::asio::any_io_executor executor_;
  std::string conninfo_;
  ConnectOptions connect_options_;
  SessionGuards guards_;
  std::string application_;
  std::string instance_;
  std::string tag_;
  StartupHygieneOptions options_;
  std::optional<InstanceLock> lock_;
  std::function<void(const std::string&)> on_cluster_lock_lost_;
  std::shared_ptr<ClusterLock> cluster_lock_;
  bool watching_ = false;  // the lock's watch was spawned and not stopped
  CleanupReport report_;
};

/// Adds StartupHygiene to `app`, configured from `pool_config` (conninfo, app and instance, connect
/// settings). With cluster_lock, lowers pool_config.max_size by one for the lock's connection (so
/// add the pool with this config afterwards; throws pgrt::Error(invalid_config) if max_size is 1),
/// and a cluster-wide lock lost to another session stops `app` (request_stop() with
/// exit_code::failure and the reason).
/// Its start deadline is the manager's start_timeout plus max_takeover_time() (with force) plus
/// start_wait (when it connects), so a takeover of a holder that ignores SIGTERM, and a wait for
/// the database, complete (a ManagerOptions::start_hard_deadline, if
/// set, must be longer still). Returns the component: add the pool after it, `add_pool(app, config,
/// {}, after(hygiene))`.
StartupHygiene& add_startup_hygiene(
    lifecycle::Manager& app, PoolConfig& pool_config,
    StartupHygieneOptions options = StartupHygieneOptions::from_env());

}  // namespace pgrt
