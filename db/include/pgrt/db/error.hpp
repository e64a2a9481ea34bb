#pragma once

/// @file
/// Errors of the db layer: a client category (our side and libpq), a server category (SQLSTATE),
/// portable conditions, the diagnostics the server sent, and the exception that carries them.

#include <boost/system/error_category.hpp>
#include <boost/system/error_code.hpp>
#include <boost/system/error_condition.hpp>
#include <boost/system/system_error.hpp>
#include <string>
#include <string_view>
#include <type_traits>

namespace pgrt {

/// Failures detected on the client side (by pgrt or libpq). Category: client_category().
enum class client_errc {
  connect_failed = 1,   ///< The connection could not be established (see the message for why).
  connection_lost,      ///< The server or network closed an established connection.
  protocol_error,       ///< libpq reported a state pgrt cannot continue from.
  timeout,              ///< A deadline passed (with_timeout(), the connect timeout).
  cancelled,            ///< The operation was cancelled (per-operation cancellation).
  conversion,           ///< A value could not be converted to or from the requested C++ type.
  unexpected_null,      ///< A NULL was read into a type that cannot hold it; use std::optional.
  concurrent_use,       ///< A second operation was started while one was running.
  not_connected,        ///< The connection is closed or broken; open a new one.
  pipeline_aborted,     ///< An earlier statement of the same pipeline segment failed.
  name_resolution,      ///< The host name could not be resolved.
  pool_timeout,         ///< No pooled connection became free within the acquire timeout.
  pool_queue_full,      ///< The pool's wait queue is full (PoolConfig::max_waiters).
  pool_closed,          ///< The pool is closing or closed.
  pool_not_configured,  ///< pgrt::pool() or pgrt::connection() before pgrt::configure().
  already_configured,   ///< pgrt::configure() called twice.
  invalid_config,       ///< A configuration value (or environment variable, or the conninfo)
                        ///< is malformed. Equivalent to boost::system::errc::invalid_argument,
                        ///< which the lifecycle manager maps to exit_code::config.
  writes_closed,        ///< PendingWrites is stopping or stopped: the write was not accepted.
  writes_queue_full,    ///< PendingWrites is full (WhenFull::fail, or no room within
                        ///< PendingWritesConfig::enqueue_timeout): the write was not accepted.
  writes_failed,        ///< PendingWrites::stop(): some accepted writes were not written.
  instance_locked,      ///< Another instance of the same app/instance holds the instance lock.
  tls_failed,           ///< TLS could not be set up: the server's certificate failed the check
                        ///< sslmode asks for (unknown CA, wrong host name), the CA file is
                        ///< missing, or the server does not offer TLS. Waiting does not cure it,
                        ///< so it matches no condition::connection_error.
  needs_session,        ///< The statement needs a server session of its own (LISTEN, a
                        ///< session-level advisory lock), which a transaction-mode pooler does not
                        ///< give (ConnectOptions::pooler): connect to the server directly for it.
  budget_exhausted,     ///< Every slot of the connection budget (PoolConfig::budget) is held:
                        ///< the message names the budget, its size and its holders. Equivalent
                        ///< to condition::too_many_connections (backpressure, like 53300).
  commit_unconfirmed,   ///< PendingWrites (events().failed): the writes' batch sent its COMMIT and
                        ///< lost the connection before the answer, and could not be retried (the
                        ///< pool closed, stop() cancelled, the flusher failed): they may have been
                        ///< written, or not.
};

/// The category of client_errc.
[[nodiscard]] const boost::system::error_category& client_category() noexcept;
[[nodiscard]] boost::system::error_code make_error_code(client_errc code) noexcept;

/// Server errors: the value is the five-character SQLSTATE packed into an int; message() gives the
/// SQLSTATE and its name. Category: sqlstate_category().
[[nodiscard]] const boost::system::error_category& sqlstate_category() noexcept;
/// The error code for a SQLSTATE such as "23505". An invalid SQLSTATE gives
/// client_errc::protocol_error.
[[nodiscard]] boost::system::error_code make_sqlstate_error(std::string_view sqlstate) noexcept;
/// The SQLSTATE of a sqlstate_category() code, or "" for other categories.
[[nodiscard]] std::string sqlstate_of(const boost::system::error_code& code);

/// Portable conditions: compare any pgrt error code with them, e.g.
/// `if (error.code() == pgrt::condition::serialization_failure) retry();`
enum class condition {
  connection_error = 1,  ///< The connection is unusable: client connect/lost errors, SQLSTATE class
                         ///< 08 but 08P01, and 57P01-57P03 (server shutting down or starting).
                         ///< 08P01 as an ERROR (a statement given the wrong number of parameters)
                         ///< leaves the connection working: the statement's mistake. A class 08
                         ///< FATAL ends the session: client_errc::connection_lost.
  too_many_connections,  ///< SQLSTATE 53300 and the rest of class 53 (insufficient resources).
  admin_shutdown,        ///< 57P01: the session was terminated by an administrator or shutdown.
  serialization_failure,  ///< 40001: retry the transaction.
  deadlock,               ///< 40P01: retry the transaction.
  unique_violation,       ///< 23505.
  query_canceled,         ///< 57014 from the server, or a client-side cancellation.
  timeout,                ///< A client-side deadline passed (including the pool's acquire timeout).
};

[[nodiscard]] const boost::system::error_category& condition_category() noexcept;
[[nodiscard]] boost::system::error_condition make_error_condition(condition value) noexcept;

/// What the server (or pgrt) said about an error. Fields the server did not send are empty.
struct Diagnostics {
  std::string sqlstate;   ///< e.g. "23505"; empty for client-side errors.
  std::string severity;   ///< "ERROR", "FATAL", ...
  std::string message;    ///< The primary message.
  std::string detail;     ///< Optional detail.
  std::string hint;       ///< Optional hint on how to fix it.
  std::string statement;  ///< The SQL text that failed, when known.
};

/// The exception thrown by every throwing pgrt db operation: an error code (client or SQLSTATE
/// category, comparable with pgrt::condition) plus the diagnostics. what() reads like
/// "duplicate key value violates unique constraint "users_pkey" [23505 unique_violation]
/// DETAIL: Key (id)=(1) already exists. STATEMENT: INSERT ...".
class Error : public boost::system::system_error {
 public:
  Error(boost::system::error_code code, Diagnostics diagnostics);
  /// The message, SQLSTATE and name, detail, hint and statement (never a password: the string
  /// constant after a PASSWORD keyword or an option such as sslpassword, as in ALTER ROLE ...
  /// PASSWORD '...', shows as '****'; see
  /// redact_statement()). diagnostics().statement keeps the text as it was sent.
  [[nodiscard]] const char* what() const noexcept override { return what_.c_str(); }
  [[nodiscard]] const Diagnostics& diagnostics() const noexcept { return diagnostics_; }
  [[nodiscard]] const std::string& sqlstate() const noexcept { return diagnostics_.sqlstate; }

 private:
  Diagnostics diagnostics_;
  std::string what_;
};

/// Returns the conninfo (URL or key=value) with any password replaced by "****", for messages and
/// logs. Never throws. An unparsable conninfo keeps only libpq's non-secret keywords' values:
/// every other value, every word without '=' and a URL's whole remainder become "****", so a
/// password under a misspelled keyword (PASSWORD=, passwd=) never shows. Masked too: a host that
/// holds a URL or credentials, and a database or user name that is a whole conninfo (a connection
/// URL in any case, a JDBC URL, a "password=", or key=value pairs), which connect() refuses, in
/// a conninfo that parses or not.
[[nodiscard]] std::string mask_password(std::string_view conninfo);

/// Returns the SQL text with the string constant that follows each PASSWORD keyword, or word ending
/// in it (CREATE or ALTER ROLE ... [ENCRYPTED] PASSWORD '...', a user mapping's OPTIONS (password
/// '...', sslpassword '...', the option's name quoted too: "password" '...') replaced by '****',
/// for messages and logs; comments, other quoted identifiers and other string constants are left
/// as they are. A guard for the common forms, not a
/// parser: a password inside another string (a conninfo given to dblink) is not seen. Never throws
/// other than std::bad_alloc.
[[nodiscard]] std::string redact_statement(std::string_view sql);

}  // namespace pgrt

namespace boost::system {
template <>
struct is_error_code_enum<pgrt::client_errc> : std::true_type {};
template <>
struct is_error_condition_enum<pgrt::condition> : std::true_type {};
}  // namespace boost::system
