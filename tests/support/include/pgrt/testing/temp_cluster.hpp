#pragma once

/// @file
/// A throwaway PostgreSQL server for tests, benchmarks and the demo.

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <sys/types.h>
#include <utility>
#include <vector>

namespace pgrt::testing {

/// Any failure to create, start or stop a throwaway cluster. The message names the cause and the
/// fix (for example "install postgresql-15").
class ClusterError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Thrown when the `stop_token` passed in TempClusterOptions is triggered during a blocking step.
/// Everything created so far has been cleaned up when it propagates.
class ClusterInterrupted : public ClusterError {
 public:
  using ClusterError::ClusterError;
};

/// A login role protected by a password (scram-sha-256), for authentication tests.
struct PasswordRole {
  std::string name;
  std::string password;
};

/// The files of a test certificate authority and of one certificate it signed, made with the
/// `openssl` command (Debian `openssl`). The keys are unencrypted.
struct TestCertificates {
  std::filesystem::path ca_certificate;  ///< PEM; give it to clients as `sslrootcert`.
  std::filesystem::path ca_key;
  std::filesystem::path certificate;  ///< Signed by the CA; names `localhost` and 127.0.0.1.
  std::filesystem::path key;          ///< Mode 0600.
};

/// Makes a fresh CA and a server certificate for `localhost` (DNS) and 127.0.0.1 (IP) in
/// `directory` (created if missing), valid for two days. Throws ClusterError naming the failing
/// `openssl` step, and "install openssl" when the command is missing.
TestCertificates make_test_certificates(const std::filesystem::path& directory);

/// How to stop the server. These are PostgreSQL's three shutdown modes.
enum class StopMode {
  smart,      ///< SIGTERM: wait for clients to disconnect.
  fast,       ///< SIGINT: disconnect clients, then a clean shutdown.
  immediate,  ///< SIGQUIT: abort at once; the next start runs crash recovery.
};

struct TempClusterOptions {
  /// The server's `max_connections` (25 emulates a db-f1-micro instance).
  int max_connections = 100;
  /// Further server settings, passed as `-c name=value`.
  std::vector<std::pair<std::string, std::string>> settings;
  /// When set, a role that must authenticate with this password, over TCP and the unix socket.
  std::optional<PasswordRole> password_role;
  /// When set, the server has `ssl=on` with a certificate from a CA made for it
  /// (make_test_certificates()). The unix socket stays plain. See tls_dsn().
  bool tls = false;
  /// With `tls`: the TCP port takes TLS connections only (`hostssl`; pg_hba.conf rejects plain
  /// TCP, as managed servers do). When false it takes both, and tcp_dsn() is plain.
  bool tls_only = true;
  /// When set, the cluster is a hot standby of the server at this conninfo (a TempCluster's
  /// dsn()): its data comes from `pg_basebackup` and it streams from that server, answering
  /// read-only statements (`in_hot_standby` on). Not with password_role.
  std::string standby_of;
  /// Where `initdb` and `postgres` are. Empty: $PGRT_PG_BINDIR, then `pg_config --bindir`, then
  /// the newest /usr/lib/postgresql/<version>/bin.
  std::filesystem::path bin_dir;
  /// How long the server may take to accept connections.
  std::chrono::milliseconds start_timeout = std::chrono::seconds(60);
  /// Checked during the blocking steps (initdb, waiting for the server); when stop is requested
  /// they clean up and throw ClusterInterrupted. Lets a program honour Ctrl+C during start-up.
  std::stop_token stop_token;
};

/// A PostgreSQL server in a fresh temporary directory, listening on a unix socket in that directory
/// and on a free 127.0.0.1 port, with a trusted superuser `postgres`.
///
/// Lifetime: the constructor runs initdb and starts the server, returning once it accepts
/// connections. The destructor stops the server and removes the directory. If the owning process
/// dies without running the destructor (a crash, SIGKILL, an unhandled signal), a guardian process
/// started with the cluster notices (its pipe from the owner closes), shuts the server down
/// immediately and removes the directory.
///
/// Privileges: run as root, the server runs as the unprivileged user `postgres` (or $PGRT_PG_USER),
/// because PostgreSQL refuses to run as root; otherwise it runs as the current user.
///
/// Thread safety: none; use one object from one thread at a time. Distinct objects are independent:
/// any number of clusters may run at once.
///
/// Errors: every operation throws ClusterError with the cause and the fix.
class TempCluster {
 public:
  explicit TempCluster(TempClusterOptions options = {});
  ~TempCluster();
  TempCluster(const TempCluster&) = delete;
  TempCluster& operator=(const TempCluster&) = delete;
  TempCluster(TempCluster&&) = delete;
  TempCluster& operator=(TempCluster&&) = delete;

  /// Conninfo for the superuser over the unix socket, e.g. "host=/tmp/pgrt-x port=5 user=postgres
  /// dbname=postgres".
  [[nodiscard]] std::string dsn() const;
  /// Conninfo for the superuser over plain TCP on 127.0.0.1 (`sslmode=disable` when the cluster
  /// has TLS; with TempClusterOptions::tls_only the server refuses it).
  [[nodiscard]] std::string tcp_dsn() const;
  /// Conninfo for the password role over TCP, password included. Throws if no role was asked for.
  [[nodiscard]] std::string password_role_dsn() const;
  /// Conninfo for the superuser over TLS: `host=localhost hostaddr=127.0.0.1`, the given sslmode
  /// (e.g. "require", "verify-full") and `sslrootcert` set to this cluster's CA. Throws if the
  /// cluster was made without TempClusterOptions::tls.
  [[nodiscard]] std::string tls_dsn(const std::string& sslmode = "verify-full") const;
  /// The certificates the server uses (TempClusterOptions::tls), or nullopt.
  [[nodiscard]] const std::optional<TestCertificates>& certificates() const noexcept {
    return certificates_;
  }

  [[nodiscard]] int port() const noexcept { return port_; }
  [[nodiscard]] const std::filesystem::path& directory() const noexcept { return directory_; }
  [[nodiscard]] std::filesystem::path data_directory() const { return directory_ / "data"; }
  [[nodiscard]] const std::filesystem::path& bin_dir() const noexcept { return bin_dir_; }
  /// The running postmaster's pid, or -1 when the server is not running.
  [[nodiscard]] pid_t postmaster_pid() const noexcept { return postmaster_pid_; }
  [[nodiscard]] bool is_running() const noexcept { return postmaster_pid_ > 0; }
  /// The last `max_bytes` of the server's log.
  [[nodiscard]] std::string server_log_tail(std::size_t max_bytes = 4096) const;

  /// Stops the server and waits until the postmaster and all its backends are gone. Escalates to
  /// immediate, then SIGKILL, when the requested mode takes longer than `timeout`. No-op if
  /// stopped.
  void stop(StopMode mode = StopMode::fast,
            std::chrono::milliseconds timeout = std::chrono::seconds(30));
  /// Starts the stopped server again on the same directory and port. No-op if running.
  void start();
  /// stop(mode), then start().
  void restart(StopMode mode = StopMode::fast);
  /// Sends SIGKILL to the postmaster (a crash), then waits until its backends have exited (they
  /// notice the postmaster's death). start() afterwards runs crash recovery.
  void kill();

 private:
  void create_directory();
  void start_guardian();
  void run_initdb();
  void make_certificates();
  void write_hba();
  void launch_server();
  void wait_until_ready();
  void create_password_role();
  // Waits for the processes to exit; SIGKILLs those still alive after `patience`.
  static void wait_until_gone(const std::vector<pid_t>& processes,
                              std::chrono::milliseconds patience);
  void remove_directory() noexcept;
  void release_everything() noexcept;
  [[nodiscard]] std::string conninfo(const std::string& host) const;

  TempClusterOptions options_;
  std::filesystem::path bin_dir_;
  std::filesystem::path directory_;
  std::optional<std::pair<uid_t, gid_t>> run_as_;  // set when we are root
  std::optional<TestCertificates> certificates_;
  int port_ = 0;
  pid_t postmaster_pid_ = -1;
  pid_t guardian_pid_ = -1;
  int guardian_pipe_ = -1;  // write end; closing it (or our death) wakes the guardian
};

/// Where the PostgreSQL server binaries are, following TempClusterOptions::bin_dir's rules.
/// Throws ClusterError naming the places searched and "install postgresql-15" when none has them.
[[nodiscard]] std::filesystem::path find_server_bin_dir(
    const std::filesystem::path& requested = {});

}  // namespace pgrt::testing
