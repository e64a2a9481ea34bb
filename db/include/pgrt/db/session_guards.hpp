#pragma once

/// @file
/// The per-session guards (PoolConfig::guards) as connect options, for any connection of the
/// service: the pool's, and start-up hygiene's own.

#include "pgrt/db/connection.hpp"
#include "pgrt/db/pool.hpp"

namespace pgrt {

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
