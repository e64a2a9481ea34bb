#include "pgrt/testing/blocking_sql.hpp"

#include <memory>

namespace pgrt::testing {

BlockingConnection::BlockingConnection(const std::string& conninfo)
    : connection_(PQconnectdb(conninfo.c_str())) {
  if (PQstatus(connection_) != CONNECTION_OK) {
    std::string message = connection_ != nullptr ? PQerrorMessage(connection_) : "out of memory";
    // libpq has no result object for a failed connect; its message carries the server's text.
    std::string sqlstate;
    if (message.find("password authentication failed") != std::string::npos) sqlstate = "28P01";
    if (message.find("too many clients") != std::string::npos ||
        message.find("remaining connection slots") != std::string::npos) {
      sqlstate = "53300";
    }
    PQfinish(connection_);
    throw SqlError("connect failed: " + message, sqlstate);
  }
}

BlockingConnection::~BlockingConnection() {
  PQfinish(connection_);
}

Rows BlockingConnection::query(const std::string& sql) {
  std::unique_ptr<PGresult, void (*)(PGresult*)> result(PQexec(connection_, sql.c_str()), PQclear);
  auto status = PQresultStatus(result.get());
  if (status != PGRES_TUPLES_OK && status != PGRES_COMMAND_OK) {
    const char* sqlstate = PQresultErrorField(result.get(), PG_DIAG_SQLSTATE);
    throw SqlError(sql + ": " + PQerrorMessage(connection_), sqlstate != nullptr ? sqlstate : "");
  }
  Rows rows;
  for (int row = 0; row < PQntuples(result.get()); ++row) {
    auto& values = rows.emplace_back();
    for (int column = 0; column < PQnfields(result.get()); ++column) {
      if (PQgetisnull(result.get(), row, column) != 0) {
        values.emplace_back(std::nullopt);
      } else {
        values.emplace_back(PQgetvalue(result.get(), row, column));
      }
    }
  }
  return rows;
}

std::string BlockingConnection::scalar(const std::string& sql) {
  auto rows = query(sql);
  if (rows.empty() || rows.front().empty() || !rows.front().front()) {
    throw SqlError(sql + ": expected a non-NULL value, got none", "");
  }
  return *rows.front().front();
}

int BlockingConnection::backend_pid() const {
  return PQbackendPID(connection_);
}

bool backend_exists(const std::string& conninfo, int pid) {
  BlockingConnection observer(conninfo);
  return observer.scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = " +
                         std::to_string(pid)) != "0";
}

}  // namespace pgrt::testing
