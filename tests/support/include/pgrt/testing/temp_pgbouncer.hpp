#pragma once

/// @file
/// A throwaway PgBouncer in front of a TempCluster, for tests of pgrt behind a pooler.

#include <filesystem>
#include <string>
#include <sys/types.h>
#include <vector>

#include "pgrt/testing/temp_cluster.hpp"

namespace pgrt::testing {

struct TempPgBouncerOptions {
  /// PgBouncer's pool_mode: "transaction" (a server connection per transaction, as Supabase's
  /// pooler port and most managed poolers), "session" or "statement".
  std::string pool_mode = "transaction";
  /// Server connections per database and user (PgBouncer's default_pool_size).
  int pool_size = 3;
  /// Client connections PgBouncer accepts (max_client_conn).
  int max_clients = 200;
  /// Startup parameters PgBouncer drops instead of refusing the client
  /// (ignore_startup_parameters). PgBouncer 1.18 refuses `options`, which pgrt sends unless
  /// ConnectOptions::pooler says there is a transaction pooler.
  std::vector<std::string> ignored_startup_parameters = {"extra_float_digits"};
  /// Where the `pgbouncer` program is; empty: /usr/sbin/pgbouncer, then /usr/bin/pgbouncer.
  std::filesystem::path program;
};

/// PgBouncer (Debian `pgbouncer`, 1.18) listening on a free 127.0.0.1 port, forwarding every
/// database to the cluster's unix socket, with trust authentication for `postgres`.
///
/// Lifetime: the constructor writes its configuration into a fresh directory under the cluster's,
/// starts it and returns once it answers; the destructor stops it (SIGTERM, then SIGKILL after
/// 5 s) and
/// removes the directory. It dies with the process that made it (PR_SET_PDEATHSIG). Run as root,
/// it runs as the cluster's user (PgBouncer refuses to run as root).
///
/// Thread safety: none; one object from one thread. Errors: ClusterError with the cause and the
/// fix ("install pgbouncer").
class TempPgBouncer {
 public:
  explicit TempPgBouncer(const TempCluster& cluster, TempPgBouncerOptions options = {});
  ~TempPgBouncer();
  TempPgBouncer(const TempPgBouncer&) = delete;
  TempPgBouncer& operator=(const TempPgBouncer&) = delete;
  TempPgBouncer(TempPgBouncer&&) = delete;
  TempPgBouncer& operator=(TempPgBouncer&&) = delete;

  /// "host=127.0.0.1 port=<port> user=postgres dbname=postgres".
  [[nodiscard]] std::string dsn() const;
  [[nodiscard]] int port() const noexcept { return port_; }
  [[nodiscard]] pid_t pid() const noexcept { return pid_; }
  /// The last `max_bytes` of PgBouncer's log.
  [[nodiscard]] std::string log_tail(std::size_t max_bytes = 4096) const;

 private:
  void stop() noexcept;

  std::filesystem::path directory_;
  int port_ = 0;
  pid_t pid_ = -1;
};

}  // namespace pgrt::testing
