#pragma once

/// @file
/// A plain blocking libpq connection for test set-up and assertions (never the code under test).

#include <libpq-fe.h>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace pgrt::testing {

/// A failed connect or statement; `sqlstate` is empty when the server sent none.
class SqlError : public std::runtime_error {
 public:
  SqlError(const std::string& message, std::string sqlstate)
      : std::runtime_error(message), sqlstate_(std::move(sqlstate)) {}
  [[nodiscard]] const std::string& sqlstate() const noexcept { return sqlstate_; }

 private:
  std::string sqlstate_;
};

using Rows = std::vector<std::vector<std::optional<std::string>>>;

/// One libpq connection, opened with PQconnectdb. Not thread-safe.
class BlockingConnection {
 public:
  /// Connects; throws SqlError with libpq's message (and SQLSTATE, e.g. 28P01) on failure.
  explicit BlockingConnection(const std::string& conninfo);
  ~BlockingConnection();
  BlockingConnection(const BlockingConnection&) = delete;
  BlockingConnection& operator=(const BlockingConnection&) = delete;
  BlockingConnection(BlockingConnection&&) = delete;
  BlockingConnection& operator=(BlockingConnection&&) = delete;

  /// Runs one statement in text mode; every value as text, NULL as nullopt. Throws SqlError.
  Rows query(const std::string& sql);
  /// The first column of the first row. Throws SqlError if there is none or it is NULL.
  std::string scalar(const std::string& sql);
  /// The server process serving this connection.
  [[nodiscard]] int backend_pid() const;
  [[nodiscard]] PGconn* native() const noexcept { return connection_; }

 private:
  PGconn* connection_;
};

/// Whether a server process with this pid appears in pg_stat_activity, asked over `conninfo`.
bool backend_exists(const std::string& conninfo, int pid);

}  // namespace pgrt::testing
