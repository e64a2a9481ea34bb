#pragma once

/// @file
/// Start-up hygiene: find and terminate the server-side connections an earlier run of this
/// instance left behind (a crash, a lost host, a proxy that keeps connections open), and never
/// anyone else's.

#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <string>
#include <string_view>
#include <vector>

#include "pgrt/db/connection.hpp"

namespace pgrt {

struct CleanupOptions {
  std::string application;  ///< The app name of the tags (PoolConfig::application).
  std::string instance;     ///< The instance name; empty: default_instance_name().
  /// Also terminate this app's backends (any instance, any other incarnation) idle longer than
  /// this (the "idle > 5 min" rule). Zero: off.
  std::chrono::seconds idle_threshold{0};
};

/// A backend found (and terminated, or not) by the cleanup.
struct LeftoverBackend {
  int pid = 0;
  std::string application_name;
  std::string state;          ///< pg_stat_activity.state ("idle", "idle in transaction", ...).
  std::string backend_start;  ///< As the server prints it.
  std::string client;         ///< client_addr:port, or "local" for a unix socket.
  std::string reason;         ///< "an earlier incarnation of <app>/<instance>" or "idle for N s".
  bool terminated = false;    ///< pg_terminate_backend() returned true.
};

struct CleanupReport {
  std::vector<LeftoverBackend> backends;  ///< Every candidate found, terminated or not.
  /// The role may not terminate backends (SQLSTATE 42501). `warning` says which grant fixes it.
  bool permission_denied = false;
  /// The cleanup did not run because no singleton lock was held (StartupHygiene); `warning` says
  /// so.
  bool skipped = false;
  std::string warning;
  [[nodiscard]] std::size_t terminated() const noexcept;
};

/// `text` as a SQL LIKE pattern that matches it literally, with a backslash as the escape
/// character (use `LIKE $1 ESCAPE '\'`): `a_b%` becomes `a\_b\%`.
[[nodiscard]] std::string like_literal(std::string_view text);

/// Terminates, over `connection`, the client backends that are in the same database, under the
/// same role, and either carry an application_name `<app>/<instance>/<other incarnation>` or (with
/// idle_threshold) belong to `<app>/` and have been idle longer than the threshold. It never
/// touches the connection's own backend, any backend tagged `own_tag` (this process), or other
/// applications. Each terminated backend is logged (spdlog, info) with its pid, tag, state, start
/// and client. A role that may not terminate gives a warning naming the grant (in the report and
/// the log), never an exception. Other errors (the connection lost) throw pgrt::Error.
/// Not thread-safe (uses `connection`); cancellation: as Connection::query().
[[nodiscard]] boost::asio::awaitable<CleanupReport> cleanup_predecessors(
    Connection& connection, const CleanupOptions& options, std::string own_tag);

}  // namespace pgrt
