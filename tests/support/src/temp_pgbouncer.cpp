#include "pgrt/testing/temp_pgbouncer.hpp"

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <libpq-fe.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>

#include "process.hpp"

namespace pgrt::testing {

namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

constexpr const char* pgbouncer_install_hint =
    "Install it with `apt-get install pgbouncer` (or run scripts/install-deps.sh)";

fs::path find_pgbouncer(const fs::path& requested) {
  if (!requested.empty()) {
    if (::access(requested.c_str(), X_OK) == 0) return requested;
    throw ClusterError(requested.string() + " is not an executable pgbouncer. " +
                       pgbouncer_install_hint);
  }
  for (const char* candidate : {"/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"}) {
    if (::access(candidate, X_OK) == 0) return candidate;
  }
  throw ClusterError(std::string("pgbouncer not found in /usr/sbin or /usr/bin. ") +
                     pgbouncer_install_hint);
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  if (!out.flush()) throw ClusterError("cannot write " + path.string());
}

}  // namespace

TempPgBouncer::TempPgBouncer(const TempCluster& cluster, TempPgBouncerOptions options) {
  const fs::path program = find_pgbouncer(options.program);
  std::optional<std::pair<uid_t, gid_t>> run_as;
  try {
    run_as = detail::unprivileged_user_if_root();
  } catch (const std::runtime_error& error) {
    throw ClusterError(error.what());
  }
  std::string pattern = (cluster.directory() / "pgbouncer-XXXXXX").string();
  if (::mkdtemp(pattern.data()) == nullptr) {
    throw ClusterError("cannot create a directory for PgBouncer under " +
                       cluster.directory().string() + ": " + std::strerror(errno));
  }
  directory_ = pattern;
  try {
    port_ = detail::pick_free_port();
    std::string ignored;
    for (const auto& parameter : options.ignored_startup_parameters) {
      ignored += (ignored.empty() ? "" : ",") + parameter;
    }
    write_file(directory_ / "userlist.txt", "\"postgres\" \"\"\n");
    write_file(directory_ / "pgbouncer.ini",
               "[databases]\n"
               "* = host=" +
                   cluster.directory().string() + " port=" + std::to_string(cluster.port()) +
                   "\n"
                   "[pgbouncer]\n"
                   "listen_addr = 127.0.0.1\n"
                   "listen_port = " +
                   std::to_string(port_) +
                   "\n"
                   "unix_socket_dir =\n"
                   "auth_type = trust\n"
                   "auth_file = " +
                   (directory_ / "userlist.txt").string() +
                   "\n"
                   "admin_users = postgres\n"
                   "pool_mode = " +
                   options.pool_mode +
                   "\n"
                   "default_pool_size = " +
                   std::to_string(options.pool_size) +
                   "\n"
                   "max_client_conn = " +
                   std::to_string(options.max_clients) +
                   "\n"
                   "ignore_startup_parameters = " +
                   ignored +
                   "\n"
                   "logfile = " +
                   (directory_ / "pgbouncer.log").string() +
                   "\n"
                   "pidfile = " +
                   (directory_ / "pgbouncer.pid").string() + "\n");
    if (run_as) {
      for (const char* name : {"", "userlist.txt", "pgbouncer.ini"}) {
        if (::chown((directory_ / name).c_str(), run_as->first, run_as->second) < 0) {
          throw ClusterError("cannot hand " + (directory_ / name).string() +
                             " to the PostgreSQL user: " + std::strerror(errno));
        }
      }
    }
    const int log_fd = detail::open_log(directory_ / "output.log");
    try {
      pid_ = detail::spawn({.argv = {program.string(), (directory_ / "pgbouncer.ini").string()},
                            .run_as = run_as,
                            .output_fd = log_fd,
                            .new_session = true,
                            .parent_death_signal = SIGKILL,
                            .working_directory = directory_});
    } catch (const std::system_error& error) {
      ::close(log_fd);
      throw ClusterError(std::string("pgbouncer failed to start: ") + error.what() + ". " +
                         pgbouncer_install_hint);
    }
    ::close(log_fd);
    const std::string ping = dsn() + " connect_timeout=2";
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    for (auto pause = 5ms;; pause = std::min(pause * 2, std::chrono::milliseconds(100))) {
      if (auto status = detail::try_reap(pid_)) {
        pid_ = -1;
        throw ClusterError("pgbouncer exited during start-up (" + detail::describe_status(*status) +
                           "). Its output ends with:\n" + log_tail(2048));
      }
      if (PQping(ping.c_str()) == PQPING_OK) break;
      if (std::chrono::steady_clock::now() >= deadline) {
        throw ClusterError("pgbouncer did not accept connections within 30 s on port " +
                           std::to_string(port_) + ". Its log ends with:\n" + log_tail(2048));
      }
      std::this_thread::sleep_for(pause);
    }
  } catch (...) {
    stop();
    throw;
  }
}

TempPgBouncer::~TempPgBouncer() {
  stop();
}

void TempPgBouncer::stop() noexcept {
  if (pid_ > 0) {
    ::kill(pid_, SIGTERM);  // PgBouncer's immediate shutdown (SIGINT would wait for clients)
    if (!detail::wait_for_exit(pid_, std::chrono::steady_clock::now() + 5s)) {
      ::kill(pid_, SIGKILL);
      detail::wait_for_exit(pid_, std::chrono::steady_clock::now() + 5s);
    }
    pid_ = -1;
  }
  if (!directory_.empty()) {
    std::error_code ignored;
    fs::remove_all(directory_, ignored);
  }
}

std::string TempPgBouncer::dsn() const {
  return "host=127.0.0.1 port=" + std::to_string(port_) + " user=postgres dbname=postgres";
}

std::string TempPgBouncer::log_tail(std::size_t max_bytes) const {
  std::string tail = detail::file_tail(directory_ / "pgbouncer.log", max_bytes);
  return tail.empty() ? detail::file_tail(directory_ / "output.log", max_bytes) : tail;
}

}  // namespace pgrt::testing
