#pragma once

/// @file
/// The per-session guards (PoolConfig::guards), and the same as connect options, for any
/// connection of the service: the pool's, and start-up hygiene's own.

#include <chrono>

#include "pgrt/db/connection.hpp"

namespace pgrt {

/// Session guards a pool sets on each of its connections (PoolConfig::guards), and start-up
/// hygiene on its own; zero turns one off (the server's or the system's default then applies).
/// Settings already in ConnectOptions::session_settings win.
struct SessionGuards {
  /// idle_in_transaction_session_timeout: the server ends a session left idle inside a
  /// transaction this long (a lease forgotten mid-transaction).
  std::chrono::milliseconds idle_in_transaction_timeout{std::chrono::minutes(5)};
  /// client_connection_check_interval: while a statement runs, the server checks this often that
  /// the client is still there, and ends the statement if not.
  std::chrono::milliseconds client_connection_check_interval{std::chrono::seconds(10)};
  /// TCP keepalives as ConnectOptions::keepalives has them (on by default: idle 30 s, then every
  /// 10 s, 3 probes); false turns them off.
  bool keepalives = true;
  /// tcp_user_timeout, unless ConnectOptions sets its own: sent data unacknowledged this long
  /// drops the connection.
  std::chrono::milliseconds tcp_user_timeout{std::chrono::seconds(30)};
};

/// `options` with `guards` applied:
/// - `idle_in_transaction_session_timeout` and `client_connection_check_interval` (in
///   milliseconds) put first into session_settings, each unless it is zero or session_settings
///   already names it (the caller's setting wins). They are sent as startup options, so the
///   server checks them at connect: `client_connection_check_interval` exists from PostgreSQL 14
///   on, and an older server refuses the connection ("unrecognized configuration parameter");
///   set it to zero there.
/// - keepalives reset (libpq's defaults) when guards.keepalives is false;
/// - tcp_user_timeout set to guards.tcp_user_timeout unless options has its own;
/// - the server's side of the TCP guards, as session settings (unless already named):
///   `tcp_keepalives_idle`, `tcp_keepalives_interval`, `tcp_keepalives_count` from the keepalives
///   and `tcp_user_timeout`, so that the server, too, ends a session whose client it cannot reach
///   (on a unix socket the server ignores them).
/// Behind a transaction pooler (options.pooler) no server setting is added: only the client's
/// TCP guards (keepalives, tcp_user_timeout) apply.
/// A pure function: no I/O, thread-safe.
[[nodiscard]] ConnectOptions with_session_guards(ConnectOptions options,
                                                 const SessionGuards& guards);

/// How long after a guarded connection was closed its backend is sure to be gone, even if the
/// server never received the close (a partition): the server's keepalives give up on the client
/// after idle + interval x count (or tcp_user_timeout, if longer, while it has data in flight),
/// and a backend busy with a statement notices at its next client_connection_check_interval.
/// `guarded` is what with_session_guards() returned; settings of these names the caller put in
/// session_settings count as the server reads them (with units: "1min", "30s"; a bare number in
/// the setting's own unit; 0 or `default` for the keepalives: the operating system's, 7200 s idle,
/// 75 s apart, 9 probes on Linux). Zero when keepalives are off: then there is no such bound. The
/// pool gives a closed connection's capacity back at this bound at the latest.
[[nodiscard]] std::chrono::milliseconds backend_end_bound(const ConnectOptions& guarded);

}  // namespace pgrt
