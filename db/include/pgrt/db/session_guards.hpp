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
/// - tcp_user_timeout set to guards.tcp_user_timeout unless options has its own.
/// A pure function: no I/O, thread-safe.
[[nodiscard]] ConnectOptions with_session_guards(ConnectOptions options,
                                                 const SessionGuards& guards);

}  // namespace pgrt
