#pragma once

/// @file
/// A process's metrics in the Prometheus text exposition format, named after OpenTelemetry's
/// semantic conventions for database client connection pools.

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "pgrt/db/pending_writes.hpp"
#include "pgrt/db/pool.hpp"
#include "pgrt/lifecycle/manager.hpp"

namespace pgrt {

class Watchdog;

/// What a metrics reader sees of a process: its pools, pending writes, watchdog and lifecycle.
///
/// render() writes the Prometheus text exposition format (version 0.0.4), every family with
/// `# HELP` and `# TYPE`. The names (stable; a rename is a breaking change):
///
/// - OpenTelemetry's database client connection pool metrics, in Prometheus form, each labelled
///   `db_client_connection_pool_name`: `db_client_connection_count{state="idle|used"}`,
///   `db_client_connection_max`, `db_client_connection_idle_min`,
///   `db_client_connection_pending_requests`, `db_client_connection_timeouts_total`, and the
///   histograms `db_client_connection_create_time_seconds`,
///   `db_client_connection_wait_time_seconds` and `db_client_connection_use_time_seconds`
///   (PoolStats::create_time, wait_time, use_time).
/// - pgrt's own, prefixed `pgrt_`: the pool's other states, discards by reason, acquires,
///   cancellations, connect attempts and failures, the connect backoff, suspected leaks, the
///   longest current wait, the budget's probes and slot waits, the consumers' shares; the pending
///   writes (accepted, flushed, failed, queued, waiting); the watchdog's conditions; the
///   lifecycle's state and readiness.
///
/// Thread safety: the add_*() calls before the first render(), from one thread; render() and
/// stuck() from any thread, concurrently (they only call the sources' thread-safe snapshots).
/// Every object added must outlive the Metrics, or the last render() (the process-wide pool is
/// looked up at each render instead, so it may come and go).
class Metrics {
 public:
  /// A pool, by its stats (Pool::stats(), which is thread-safe), named `name` in the
  /// db_client_connection_pool_name label.
  void add_pool(std::string name, std::function<PoolStats()> stats);
  /// `pool`, named by its application_name.
  void add_pool(const Pool& pool);
  /// The process-wide pool (pgrt::pool()) while one is configured, named by its
  /// application_name; nothing while none is.
  void add_process_pool();
  /// A PendingWrites, by its report(), labelled pending_writes=`name`.
  void add_pending_writes(std::string name, const PendingWrites& writes);
  /// The watchdog's conditions (one gauge per condition, 1 while it holds).
  void add_watchdog(const Watchdog& watchdog);
  /// The manager's state (pgrt_lifecycle_state{state="..."} 1 for the current one) and readiness.
  void add_lifecycle(const lifecycle::Manager& manager);

  /// Everything, in the Prometheus text exposition format.
  [[nodiscard]] std::string render() const;

  /// Why a pool looks stuck, or nullopt: a caller of one of its pools has waited longer than
  /// `after` (an acquire never waits longer than its acquire_timeout, so with `after` above it
  /// the pool has stopped serving). /healthz answers 503 with this text.
  [[nodiscard]] std::optional<std::string> stuck(std::chrono::milliseconds after) const;

 private:
  struct PoolSource {
    std::string name;
    std::function<PoolStats()> stats;
  };
  struct PendingSource {
    std::string name;
    const PendingWrites* writes;
  };
  // Each pool present now, named: the process-wide one is looked up here.
  [[nodiscard]] std::vector<std::pair<std::string, PoolStats>> pool_snapshots() const;
  std::vector<PoolSource> pools_;
  bool process_pool_ = false;
  std::vector<PendingSource> pending_;
  const Watchdog* watchdog_ = nullptr;
  const lifecycle::Manager* manager_ = nullptr;
};

}  // namespace pgrt
