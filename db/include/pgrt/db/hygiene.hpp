#pragma once

/// @file
/// Start-up hygiene: find and terminate the server-side connections an earlier run of this
/// instance left behind (a crash, a lost host, a proxy that keeps connections open), and never
/// anyone else's. The leftover rule here (leftover_reasons()) is the one both the start-up cleanup
/// and pgrt-diag apply.

#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "pgrt/db/connection.hpp"
#include "pgrt/runtime/identity.hpp"

namespace pgrt {

/// One client backend of an app, as pg_stat_activity shows it: its application_name is a
/// connection tag of the app (parse_connection_tag()).
struct AppBackend {
  int pid = 0;
  std::string application_name;
  std::string state;          ///< pg_stat_activity.state ("idle", "active", ...); "" if not shown.
  std::string backend_start;  ///< As the server prints it; "" if not shown.
  /// backend_start in microseconds since the Unix epoch (0 if not shown): orders incarnations.
  std::int64_t started_us = 0;
  /// How long it has been in `state` (now() - state_change; zero if not shown).
  std::chrono::milliseconds in_state{0};
  std::string user;      ///< The role; "" if not shown.
  std::string database;  ///< "" if not shown.
  std::string client;    ///< client_addr:port, or "local" (a unix socket, or not shown).
  /// In the querying connection's database and under its login role (session_user, also for
  /// sessions that SET role to a group role): only those are ever classified or terminated (a
  /// service of the same name elsewhere is not this one).
  bool in_scope = false;
  /// Holds a granted advisory lock (a live instance's cluster-wide lock session, for one).
  bool holds_advisory_lock = false;
  /// Whether its incarnation is a live process's of this user on the host that listed it
  /// (incarnation_on_this_host()).
  HostPresence presence = HostPresence::unknown;
  /// presence == HostPresence::running: whatever else says, not a dead incarnation's.
  bool running_here = false;
};

/// The client backends, in every database and under every role, whose application_name is a
/// connection tag of `application` (as configured; parse_connection_tag() decides, after a
/// `LIKE '<tag app>/%'` on the server), oldest first, without `connection`'s own, each with
/// whether its incarnation runs on this host (AppBackend::running_here). Throws
/// pgrt::Error (the connection lost, a failed query). Not thread-safe (uses `connection`);
/// cancellation: as Connection::query().
[[nodiscard]] boost::asio::awaitable<std::vector<AppBackend>> list_app_backends(
    Connection& connection, std::string_view application);

/// Terminates backend `pid` only if the server still shows it as listed: the same
/// application_name and backend_start (as list_app_backends() gives them, on a connection with the
/// same DateStyle and TimeZone): a pid listed earlier may belong to another backend by now. With
/// `wait` above zero, also waits up to that long for it to end (pg_terminate_backend's timeout).
/// True if it was terminated (and ended within `wait`); false if it was gone or replaced, or did
/// not end in time. Throws pgrt::Error: SQLSTATE 42501 when the role may not terminate it, or as
/// Connection::query(). Not thread-safe (uses `connection`); cancellation: as
/// Connection::query().
[[nodiscard]] boost::asio::awaitable<bool> terminate_backend_if_unchanged(
    Connection& connection, int pid, std::string application_name, std::string backend_start,
    std::chrono::milliseconds wait = std::chrono::milliseconds(0));

/// What leftover_reasons() is to judge by.
struct LeftoverRule {
  std::string application;  ///< The app as configured (PoolConfig::application).
  /// This process's own tag (make_connection_tag()), when it is an instance of the app (the
  /// start-up cleanup, which holds that instance's lock): the other incarnations of its instance
  /// are leftovers, and its own backends never are. Empty (pgrt-diag): for each instance, the
  /// incarnations other than the one whose first backend started last are leftovers
  /// (superseded). A tag of another app: no incarnation is a leftover (the idle rule still
  /// applies).
  std::string own_tag;
  /// Above zero: also a backend of any instance in state "idle" (not in a transaction) longer
  /// than this and holding no advisory lock (the idle rule).
  std::chrono::seconds idle_threshold{0};
};

/// The leftover rule, the one both the start-up cleanup and pgrt-diag apply: for each of
/// `backends`, in order, why it is a leftover, or "" if it is not. Only backends that are
/// in_scope and whose application_name is exactly a tag of the app (parse_connection_tag()) are
/// ever leftovers, never one tagged `own_tag`, and never by its incarnation one whose incarnation
/// runs on this host (AppBackend::running_here). A backend of a dead incarnation (per
/// LeftoverRule::own_tag) is one whatever its state, also `active`: its process is gone, so no
/// one will read what it computes, and it holds a slot and its locks until it ends. Reasons:
/// "an earlier incarnation of <app>/<instance>" (with own_tag), "superseded: ..." (without), or
/// "idle for N s". A pure function: no I/O, thread-safe.
[[nodiscard]] std::vector<std::string> leftover_reasons(const std::vector<AppBackend>& backends,
                                                        const LeftoverRule& rule);

struct CleanupOptions {
  std::string application;  ///< The app name of the tags (PoolConfig::application).
  std::string instance;     ///< The instance name; empty: default_instance_name().
  /// Also terminate this app's backends (any instance, any other incarnation) idle longer than
  /// this (the "idle > 5 min" rule). Zero: off.
  std::chrono::seconds idle_threshold{0};
  /// Incarnations of this instance known to have ended (InstanceLock::earlier_incarnations()).
  /// Where this host cannot tell which incarnations run here (HostPresence::unknown: no unix
  /// sockets or socket diagnostics in a sandbox), only these are terminated as earlier ones.
  std::vector<std::string> earlier_incarnations;
};

/// A backend found (and terminated, or not) by the cleanup.
struct LeftoverBackend {
  int pid = 0;
  std::string application_name;
  std::string state;          ///< pg_stat_activity.state ("idle", "idle in transaction", ...).
  std::string backend_start;  ///< As the server prints it.
  std::string client;         ///< client_addr:port, or "local" for a unix socket.
  std::string reason;  ///< leftover_reasons(): "an earlier incarnation of ..." or "idle for N s".
  bool terminated = false;  ///< pg_terminate_backend() returned true.
};

struct CleanupReport {
  std::vector<LeftoverBackend> backends;  ///< Every candidate found, terminated or not.
  /// The role may not terminate backends (SQLSTATE 42501). `warning` says which grant fixes it.
  bool permission_denied = false;
  /// The cleanup did not run: the connection goes through a pooler (configured as a transaction
  /// pooler, or noticed at connect), or no singleton lock was held (StartupHygiene); `warning`
  /// says why.
  bool skipped = false;
  /// Other incarnations of this very app and instance that a live process on this host runs
  /// (AppBackend::running_here): a duplicate whose instance lock is in another directory (its
  /// PGRT_RUNTIME_DIR or XDG_RUNTIME_DIR differ). Then nothing is terminated, `warning` says so,
  /// and StartupHygiene::start() refuses to start.
  std::vector<std::string> running_duplicates;
  /// Other incarnations of this instance whose backends were left alone: this host cannot tell
  /// whether they run here (HostPresence::unknown), and none of them is one the instance lock saw
  /// end (CleanupOptions::earlier_incarnations). `warning` says so.
  std::vector<std::string> unverified_incarnations;
  std::string warning;
  [[nodiscard]] std::size_t terminated() const noexcept;
};

/// `text` as a SQL LIKE pattern that matches it literally, with a backslash as the escape
/// character (use `LIKE $1 ESCAPE '\'`): `a_b%` becomes `a\_b\%`.
[[nodiscard]] std::string like_literal(std::string_view text);

/// Terminates, over `connection`, the leftovers by leftover_reasons() with
/// `LeftoverRule{options.application, own_tag, options.idle_threshold}` among
/// list_app_backends(): in the same database, under the same login role, tagged exactly
/// `<app>/<instance>/<incarnation>` with another incarnation than `own_tag`'s (whatever their
/// state), or (with idle_threshold) tagged as any instance of the app and idle longer than the
/// threshold. `own_tag` is this process's tag, make_connection_tag(options.application,
/// options.instance). It never touches the connection's own backend, any backend tagged `own_tag`
/// (this process), the backends of an incarnation that runs on this host (if another incarnation
/// of its own instance does, it terminates nothing: CleanupReport::running_duplicates),
/// names that only start like a tag (`<app>/console`,
/// `<app>/<instance>/report-job`), or other applications. Each terminated backend is logged
/// (spdlog, info) with its pid, tag, state, start and client. A role that may not terminate gives
/// a warning naming the grant (in the report and the log), never an exception. Over a connection
/// through a pooler (configured as a transaction pooler, or noticed at connect) it terminates
/// nothing: CleanupReport::skipped, with a warning (logged). Other errors (the
/// connection lost) throw pgrt::Error. Not thread-safe (uses `connection`); cancellation: as
/// Connection::query().
[[nodiscard]] boost::asio::awaitable<CleanupReport> cleanup_predecessors(
    Connection& connection, const CleanupOptions& options, std::string own_tag);

}  // namespace pgrt
