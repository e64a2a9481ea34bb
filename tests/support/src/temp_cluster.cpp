#include "pgrt/testing/temp_cluster.hpp"

#include <algorithm>
#include <arpa/inet.h>
#include <array>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <libpq-fe.h>
#include <memory>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <system_error>
#include <thread>
#include <unistd.h>

#include "process.hpp"

namespace pgrt::testing {

namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

constexpr const char* server_install_hint =
    "Install the server with `apt-get install postgresql-15` (or run scripts/install-deps.sh), "
    "or point PGRT_PG_BINDIR at the directory holding initdb and postgres";

bool has_server_binaries(const fs::path& dir) {
  return ::access((dir / "initdb").c_str(), X_OK) == 0 &&
         ::access((dir / "postgres").c_str(), X_OK) == 0;
}

std::optional<fs::path> pg_config_bindir() {
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(::popen("pg_config --bindir 2>/dev/null", "r"),
                                             ::pclose);
  if (!pipe) return std::nullopt;
  std::array<char, 4096> line{};
  if (std::fgets(line.data(), static_cast<int>(line.size()), pipe.get()) == nullptr) {
    return std::nullopt;
  }
  std::string text(line.data());
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  if (text.empty()) return std::nullopt;
  return fs::path(text);
}

// Quotes a conninfo value: 'value', with ' and \ escaped.
std::string quote_conninfo(const std::string& value) {
  std::string quoted = "'";
  for (char c : value) {
    if (c == '\'' || c == '\\') quoted += '\\';
    quoted += c;
  }
  return quoted + "'";
}

// Runs in the guardian (/bin/sh) once its stdin reaches end of file, which happens when the owner
// closes the pipe or dies. Shuts down a postmaster still running on the directory and removes it.
constexpr const char* guardian_script = R"sh(
trap '' INT TERM HUP QUIT
while read -r _; do :; done
dir=$1
pidfile=$dir/data/postmaster.pid
if [ -f "$pidfile" ]; then
  pid=$(head -n 1 "$pidfile")
  if [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$dir/data"; then
    kill -QUIT "$pid" 2>/dev/null
    tries=0
    while kill -0 "$pid" 2>/dev/null && [ $tries -lt 100 ]; do sleep 0.1; tries=$((tries + 1)); done
    kill -KILL "$pid" 2>/dev/null
  fi
fi
for attempt in 1 2 3 4 5; do
  rm -rf -- "$dir" 2>/dev/null
  [ -e "$dir" ] || exit 0
  sleep 0.2
done
)sh";

// Runs one `openssl` step, its output going to `log`. Throws ClusterError naming the step.
void run_openssl(const std::vector<std::string>& arguments, const fs::path& log_path,
                 const char* step) {
  const fs::path program =
      ::access("/usr/bin/openssl", X_OK) == 0 ? "/usr/bin/openssl" : "/bin/openssl";
  if (::access(program.c_str(), X_OK) != 0) {
    throw ClusterError(
        "the openssl command is missing; it makes the test certificates. Install it with "
        "`apt-get install openssl` (or run scripts/install-deps.sh)");
  }
  std::vector<std::string> argv = {program.string()};
  argv.insert(argv.end(), arguments.begin(), arguments.end());
  int log_fd = detail::open_log(log_path);
  pid_t pid = -1;
  try {
    pid = detail::spawn(
        {.argv = std::move(argv), .output_fd = log_fd, .parent_death_signal = SIGKILL});
  } catch (const std::system_error& error) {
    ::close(log_fd);
    throw ClusterError(std::string("openssl failed to start (") + step + "): " + error.what());
  }
  ::close(log_fd);
  auto status = detail::wait_for_exit(pid, std::chrono::steady_clock::now() + 60s);
  if (!status) {
    ::kill(pid, SIGKILL);
    detail::wait_for_exit(pid, std::chrono::steady_clock::now() + 10s);
    throw ClusterError(std::string("openssl did not finish within 60 s (") + step + ")");
  }
  if (!WIFEXITED(*status) || WEXITSTATUS(*status) != 0) {
    throw ClusterError(std::string("openssl failed to ") + step + " (" +
                       detail::describe_status(*status) + "). Its output ends with:\n" +
                       detail::file_tail(log_path, 2048));
  }
}

}  // namespace

TestCertificates make_test_certificates(const fs::path& directory) {
  std::error_code error;
  fs::create_directories(directory, error);
  if (error) {
    throw ClusterError("cannot create " + directory.string() + ": " + error.message());
  }
  TestCertificates files{.ca_certificate = directory / "ca.crt",
                         .ca_key = directory / "ca.key",
                         .certificate = directory / "server.crt",
                         .key = directory / "server.key"};
  const fs::path request = directory / "server.csr";
  const fs::path extensions = directory / "server.ext";
  const fs::path log = directory / "openssl.log";
  {
    std::ofstream out(extensions, std::ios::trunc);
    out << "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
           "basicConstraints=critical,CA:FALSE\n"
           "keyUsage=critical,digitalSignature,keyEncipherment\n"
           "extendedKeyUsage=serverAuth\n";
    if (!out.flush()) throw ClusterError("cannot write " + extensions.string());
  }
  const std::vector<std::string> ec_key = {"-newkey", "ec", "-pkeyopt",
                                           "ec_paramgen_curve:prime256v1", "-nodes"};
  std::vector<std::string> make_ca = {"req",     "-x509",
                                      "-days",   "2",
                                      "-subj",   "/CN=pgrt test CA",
                                      "-addext", "basicConstraints=critical,CA:TRUE",
                                      "-addext", "keyUsage=critical,keyCertSign,cRLSign"};
  make_ca.insert(make_ca.end(), ec_key.begin(), ec_key.end());
  make_ca.insert(make_ca.end(),
                 {"-keyout", files.ca_key.string(), "-out", files.ca_certificate.string()});
  run_openssl(make_ca, log, "make the test CA");
  std::vector<std::string> make_request = {"req", "-subj", "/CN=localhost"};
  make_request.insert(make_request.end(), ec_key.begin(), ec_key.end());
  make_request.insert(make_request.end(),
                      {"-keyout", files.key.string(), "-out", request.string()});
  run_openssl(make_request, log, "make the server's key");
  run_openssl({"x509", "-req", "-in", request.string(), "-CA", files.ca_certificate.string(),
               "-CAkey", files.ca_key.string(), "-CAcreateserial", "-days", "2", "-extfile",
               extensions.string(), "-out", files.certificate.string()},
              log, "sign the server's certificate");
  ::chmod(files.key.c_str(), 0600);
  ::chmod(files.ca_key.c_str(), 0600);
  return files;
}

fs::path find_server_bin_dir(const fs::path& requested) {
  if (!requested.empty()) {
    if (has_server_binaries(requested)) return requested;
    throw ClusterError("PostgreSQL server binaries not found: " + requested.string() +
                       " has no executable initdb and postgres. " + server_install_hint);
  }
  std::vector<fs::path> searched;
  if (const char* from_env = std::getenv("PGRT_PG_BINDIR"); from_env != nullptr && *from_env) {
    if (has_server_binaries(from_env)) return from_env;
    throw ClusterError(std::string("PostgreSQL server binaries not found: PGRT_PG_BINDIR=") +
                       from_env + " has no executable initdb and postgres. " + server_install_hint);
  }
  if (auto dir = pg_config_bindir()) {
    if (has_server_binaries(*dir)) return *dir;
    searched.push_back(*dir);
  }
  std::vector<std::pair<int, fs::path>> versions;
  std::error_code ignored;
  for (const auto& entry : fs::directory_iterator("/usr/lib/postgresql", ignored)) {
    const auto name = entry.path().filename().string();
    if (!name.empty() && std::all_of(name.begin(), name.end(), ::isdigit)) {
      versions.emplace_back(std::stoi(name), entry.path() / "bin");
    }
  }
  std::sort(versions.begin(), versions.end(), std::greater<>());
  for (const auto& [version, dir] : versions) {
    if (has_server_binaries(dir)) return dir;
    searched.push_back(dir);
  }
  std::string places = "pg_config --bindir, /usr/lib/postgresql/*/bin";
  for (const auto& dir : searched) places += ", " + dir.string();
  throw ClusterError("PostgreSQL server binaries (initdb, postgres) not found; searched " + places +
                     ". " + server_install_hint);
}

TempCluster::TempCluster(TempClusterOptions options) : options_(std::move(options)) {
  bin_dir_ = find_server_bin_dir(options_.bin_dir);
  try {
    run_as_ = detail::unprivileged_user_if_root();
  } catch (const std::runtime_error& error) {
    throw ClusterError(error.what());
  }
  if (!options_.standby_of.empty() && options_.password_role) {
    throw ClusterError(
        "a standby cannot create a password role (it is read-only): create the "
        "role on its primary before the standby is made");
  }
  create_directory();
  try {
    start_guardian();
    make_certificates();
    run_initdb();
    write_hba();
    constexpr int port_attempts = 5;
    for (int attempt = 1;; ++attempt) {
      port_ = detail::pick_free_port();
      launch_server();
      try {
        wait_until_ready();
        break;
      } catch (const ClusterError&) {
        bool lost_port_race =
            server_log_tail(2048).find("Address already in use") != std::string::npos;
        if (!lost_port_race || attempt == port_attempts) throw;
      }
    }
    create_password_role();
  } catch (...) {
    release_everything();
    throw;
  }
}

TempCluster::~TempCluster() {
  release_everything();
}

void TempCluster::release_everything() noexcept {
  try {
    stop(StopMode::fast, 10s);
  } catch (...) {  // NOLINT(bugprone-empty-catch): stop already escalated to SIGKILL
  }
  remove_directory();
  if (guardian_pipe_ >= 0) {
    ::close(guardian_pipe_);
    guardian_pipe_ = -1;
  }
  if (guardian_pid_ > 0) {
    if (!detail::wait_for_exit(guardian_pid_, std::chrono::steady_clock::now() + 5s)) {
      ::kill(guardian_pid_, SIGKILL);
      detail::wait_for_exit(guardian_pid_, std::chrono::steady_clock::now() + 5s);
    }
    guardian_pid_ = -1;
  }
}

void TempCluster::create_directory() {
  fs::path base;
  if (const char* from_env = std::getenv("PGRT_TEMP_DIR"); from_env != nullptr && *from_env) {
    base = from_env;
  } else {
    std::error_code error;
    base = fs::temp_directory_path(error);
    if (error) base = "/tmp";
  }
  std::string pattern = (base / "pgrt-cluster-XXXXXX").string();
  if (::mkdtemp(pattern.data()) == nullptr) {
    throw ClusterError("cannot create a temporary directory under " + base.string() + ": " +
                       std::strerror(errno) +
                       ". Set PGRT_TEMP_DIR (or TMPDIR) to a writable "
                       "directory");
  }
  directory_ = pattern;
  if (run_as_ && ::chown(directory_.c_str(), run_as_->first, run_as_->second) < 0) {
    int chown_errno = errno;
    remove_directory();
    throw ClusterError("cannot hand " + directory_.string() +
                       " to the PostgreSQL user: " + std::strerror(chown_errno));
  }
}

void TempCluster::start_guardian() {
  std::array<int, 2> pipe_ends{};
  if (::pipe2(pipe_ends.data(), O_CLOEXEC) < 0) {
    throw ClusterError(std::string("cannot create the guardian's pipe: ") + std::strerror(errno));
  }
  guardian_pipe_ = pipe_ends[1];
  detail::SpawnOptions spawn{
      .argv = {"/bin/sh", "-c", guardian_script, "pgrt-cluster-guardian", directory_.string()},
      .stdin_fd = pipe_ends[0],
      .new_session = true,
  };
  try {
    guardian_pid_ = detail::spawn(spawn);
  } catch (const std::system_error& error) {
    ::close(pipe_ends[0]);
    throw ClusterError(std::string("cannot start the cluster's guardian (/bin/sh): ") +
                       error.what());
  }
  ::close(pipe_ends[0]);
}

void TempCluster::run_initdb() {
  const fs::path log_path = directory_ / "initdb.log";
  int log_fd = detail::open_log(log_path);
  // A standby's data is a base backup of its primary, with what it needs to follow it (-R).
  const std::string program = options_.standby_of.empty() ? "initdb" : "pg_basebackup";
  std::vector<std::string> argv =
      options_.standby_of.empty() ? std::vector<std::string>{(bin_dir_ / "initdb").string(),
                                                             "--pgdata",
                                                             data_directory().string(),
                                                             "--username",
                                                             "postgres",
                                                             "--auth",
                                                             "trust",
                                                             "--encoding",
                                                             "UTF8",
                                                             "--locale",
                                                             "C",
                                                             "--no-sync",
                                                             "--no-instructions"}
                                  : std::vector<std::string>{(bin_dir_ / "pg_basebackup").string(),
                                                             "--pgdata",
                                                             data_directory().string(),
                                                             "--dbname",
                                                             options_.standby_of,
                                                             "--write-recovery-conf",
                                                             "--checkpoint=fast",
                                                             "--no-sync"};
  detail::SpawnOptions spawn{
      .argv = std::move(argv),
      .run_as = run_as_,
      .output_fd = log_fd,
      // Out of reach of the terminal's Ctrl+C (our process decides), but killed if we die.
      .new_session = true,
      .parent_death_signal = SIGKILL,
      .working_directory = directory_,
  };
  pid_t pid = -1;
  try {
    pid = detail::spawn(spawn);
  } catch (const std::system_error& error) {
    ::close(log_fd);
    throw ClusterError(program + " failed to start: " + error.what() + ". " + server_install_hint);
  }
  ::close(log_fd);
  auto status =
      detail::wait_for_exit(pid, std::chrono::steady_clock::now() + 120s, options_.stop_token);
  if (!status) {
    ::kill(pid, SIGKILL);
    detail::wait_for_exit(pid, std::chrono::steady_clock::now() + 10s);
    if (options_.stop_token.stop_requested()) {
      throw ClusterInterrupted("interrupted while initdb was running");
    }
    throw ClusterError(program + " did not finish within 120 s in " + directory_.string());
  }
  if (!WIFEXITED(*status) || WEXITSTATUS(*status) != 0) {
    throw ClusterError(program + " failed (" + detail::describe_status(*status) + ") in " +
                       data_directory().string() + ". Its output ends with:\n" +
                       detail::file_tail(log_path, 2048) +
                       "\nCheck that the directory is writable by the server's user and that the "
                       "disk has space; set PGRT_TEMP_DIR to use another place");
  }
}

void TempCluster::make_certificates() {
  if (!options_.tls) return;
  certificates_ = make_test_certificates(directory_ / "tls");
  // PostgreSQL wants its key owned by its own user (or root) and not readable by others.
  if (run_as_ && ::chown(certificates_->key.c_str(), run_as_->first, run_as_->second) < 0) {
    throw ClusterError("cannot hand " + certificates_->key.string() +
                       " to the PostgreSQL user: " + std::strerror(errno));
  }
  if (run_as_) {
    ::chown((directory_ / "tls").c_str(), run_as_->first, run_as_->second);
  }
}

void TempCluster::write_hba() {
  // TCP lines: with TLS the port takes only TLS connections and rejects plain ones.
  const bool tls_only = options_.tls && options_.tls_only;
  const std::string tcp = tls_only ? "hostssl" : "host";
  std::string hba;
  if (options_.password_role) {
    // First match wins: the password role must authenticate, everyone else is trusted.
    const auto& role = options_.password_role->name;
    hba += "local all \"" + role + "\" scram-sha-256\n";
    hba += tcp + " all \"" + role + "\" 127.0.0.1/32 scram-sha-256\n";
  }
  hba += "local all all trust\n";
  hba += tcp + " all all 127.0.0.1/32 trust\n";
  hba += "local replication all trust\n";  // (TempClusterOptions::standby_of)
  if (tls_only) hba += "hostnossl all all 127.0.0.1/32 reject\n";
  std::ofstream out(data_directory() / "pg_hba.conf", std::ios::trunc);
  out << hba;
  if (!out.flush()) {
    throw ClusterError("cannot write " + (data_directory() / "pg_hba.conf").string());
  }
}

void TempCluster::launch_server() {
  std::vector<std::string> argv = {
      (bin_dir_ / "postgres").string(), "-D", data_directory().string(), "-p",
      std::to_string(port_), "-c", "listen_addresses=127.0.0.1", "-c",
      "unix_socket_directories=" + directory_.string(), "-c",
      "max_connections=" + std::to_string(options_.max_connections),
      // A throwaway cluster never needs durability.
      "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"};
  if (certificates_) {
    for (std::string setting :
         {std::string("ssl=on"), "ssl_cert_file=" + certificates_->certificate.string(),
          "ssl_key_file=" + certificates_->key.string()}) {
      argv.emplace_back("-c");
      argv.push_back(std::move(setting));
    }
  }
  for (const auto& [name, value] : options_.settings) {
    argv.emplace_back("-c");
    argv.push_back(name + "=" + value);
  }
  int log_fd = detail::open_log(directory_ / "server.log");
  detail::SpawnOptions spawn{
      .argv = std::move(argv),
      .run_as = run_as_,
      .output_fd = log_fd,
      // Its own session: a Ctrl+C on the terminal reaches our process, which shuts the server down
      // in order, not the server directly.
      .new_session = true,
      .working_directory = directory_,
  };
  try {
    postmaster_pid_ = detail::spawn(spawn);
  } catch (const std::system_error& error) {
    ::close(log_fd);
    throw ClusterError(std::string("the PostgreSQL server failed to start: ") + error.what() +
                       ". " + server_install_hint);
  }
  ::close(log_fd);
}

void TempCluster::wait_until_ready() {
  const std::string ping_conninfo = dsn() + " connect_timeout=2";
  const auto deadline = std::chrono::steady_clock::now() + options_.start_timeout;
  auto pause = 5ms;
  for (;;) {
    if (auto status = detail::try_reap(postmaster_pid_)) {
      postmaster_pid_ = -1;
      throw ClusterError(
          "the PostgreSQL server exited during start-up (" + detail::describe_status(*status) +
          "). Its log (" + (directory_ / "server.log").string() + ") ends with:\n" +
          server_log_tail(2048) + "\nFix the setting or condition the log names, then retry");
    }
    if (PQping(ping_conninfo.c_str()) == PQPING_OK) return;
    if (options_.stop_token.stop_requested()) {
      stop(StopMode::immediate, 10s);
      throw ClusterInterrupted("interrupted while waiting for the PostgreSQL server to start");
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      std::string log = server_log_tail(2048);
      stop(StopMode::immediate, 10s);
      throw ClusterError(
          "the PostgreSQL server did not accept connections within " +
          std::to_string(
              std::chrono::duration_cast<std::chrono::seconds>(options_.start_timeout).count()) +
          " s (port " + std::to_string(port_) + "). Its log ends with:\n" + log +
          "\nA loaded machine may need a longer TempClusterOptions::start_timeout");
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(100));
  }
}

void TempCluster::create_password_role() {
  if (!options_.password_role) return;
  std::unique_ptr<PGconn, void (*)(PGconn*)> connection(PQconnectdb(dsn().c_str()), PQfinish);
  if (PQstatus(connection.get()) != CONNECTION_OK) {
    throw ClusterError(std::string("cannot connect to create the password role: ") +
                       PQerrorMessage(connection.get()));
  }
  const auto& role = *options_.password_role;
  std::unique_ptr<char, void (*)(void*)> name(
      PQescapeIdentifier(connection.get(), role.name.c_str(), role.name.size()), PQfreemem);
  std::unique_ptr<char, void (*)(void*)> password(
      PQescapeLiteral(connection.get(), role.password.c_str(), role.password.size()), PQfreemem);
  if (!name || !password) {
    throw ClusterError(std::string("cannot quote the role's name or password: ") +
                       PQerrorMessage(connection.get()));
  }
  std::string sql = "CREATE ROLE " + std::string(name.get()) + " LOGIN PASSWORD " + password.get();
  std::unique_ptr<PGresult, void (*)(PGresult*)> result(PQexec(connection.get(), sql.c_str()),
                                                        PQclear);
  if (PQresultStatus(result.get()) != PGRES_COMMAND_OK) {
    throw ClusterError("cannot create role '" + role.name +
                       "': " + PQresultErrorMessage(result.get()));
  }
}

std::string TempCluster::conninfo(const std::string& host) const {
  return "host=" + quote_conninfo(host) + " port=" + std::to_string(port_) +
         " user=postgres dbname=postgres";
}

std::string TempCluster::dsn() const {
  return conninfo(directory_.string());
}

std::string TempCluster::tcp_dsn() const {
  return conninfo("127.0.0.1") + (certificates_ ? " sslmode=disable" : "");
}

std::string TempCluster::password_role_dsn() const {
  if (!options_.password_role) {
    throw ClusterError(
        "password_role_dsn(): this cluster has no password role; set "
        "TempClusterOptions::password_role");
  }
  return "host=127.0.0.1 port=" + std::to_string(port_) +
         " user=" + quote_conninfo(options_.password_role->name) +
         " password=" + quote_conninfo(options_.password_role->password) + " dbname=postgres";
}

std::string TempCluster::tls_dsn(const std::string& sslmode) const {
  if (!certificates_) {
    throw ClusterError("tls_dsn(): this cluster has no TLS; set TempClusterOptions::tls");
  }
  return "host=localhost hostaddr=127.0.0.1 port=" + std::to_string(port_) +
         " user=postgres dbname=postgres sslmode=" + quote_conninfo(sslmode) +
         " sslrootcert=" + quote_conninfo(certificates_->ca_certificate.string());
}

std::string TempCluster::server_log_tail(std::size_t max_bytes) const {
  return detail::file_tail(directory_ / "server.log", max_bytes);
}

void TempCluster::stop(StopMode mode, std::chrono::milliseconds timeout) {
  if (postmaster_pid_ <= 0) return;
  const pid_t pid = postmaster_pid_;
  const auto backends = detail::child_processes(pid);
  const int first_signal = mode == StopMode::smart  ? SIGTERM
                           : mode == StopMode::fast ? SIGINT
                                                    : SIGQUIT;
  ::kill(pid, first_signal);
  bool exited = detail::wait_for_exit(pid, std::chrono::steady_clock::now() + timeout).has_value();
  if (!exited && first_signal != SIGQUIT) {
    ::kill(pid, SIGQUIT);
    exited = detail::wait_for_exit(pid, std::chrono::steady_clock::now() + 10s).has_value();
  }
  if (!exited) {
    ::kill(pid, SIGKILL);
    detail::wait_for_exit(pid, std::chrono::steady_clock::now() + 10s);
  }
  postmaster_pid_ = -1;
  wait_until_gone(backends, 10s);
}

void TempCluster::start() {
  if (postmaster_pid_ > 0) return;
  launch_server();
  try {
    wait_until_ready();
  } catch (const ClusterError& error) {
    std::string message = error.what();
    if (server_log_tail(2048).find("Address already in use") != std::string::npos) {
      message += "\n(port " + std::to_string(port_) +
                 " was taken by another process while the server was stopped)";
    }
    throw ClusterError(message);
  }
}

void TempCluster::restart(StopMode mode) {
  stop(mode);
  start();
}

void TempCluster::kill() {
  if (postmaster_pid_ <= 0) return;
  const pid_t pid = postmaster_pid_;
  const auto backends = detail::child_processes(pid);
  ::kill(pid, SIGKILL);
  detail::wait_for_exit(pid, std::chrono::steady_clock::now() + 10s);
  postmaster_pid_ = -1;
  wait_until_gone(backends, 10s);
}

void TempCluster::wait_until_gone(const std::vector<pid_t>& processes,
                                  std::chrono::milliseconds patience) {
  auto any_alive = [&] {
    return std::any_of(processes.begin(), processes.end(), detail::process_alive);
  };
  const auto deadline = std::chrono::steady_clock::now() + patience;
  while (any_alive() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(5ms);
  }
  if (!any_alive()) return;
  for (pid_t pid : processes) {
    if (detail::process_alive(pid)) ::kill(pid, SIGKILL);
  }
  const auto last_chance = std::chrono::steady_clock::now() + 5s;
  while (any_alive() && std::chrono::steady_clock::now() < last_chance) {
    std::this_thread::sleep_for(5ms);
  }
}

void TempCluster::remove_directory() noexcept {
  if (directory_.empty()) return;
  std::error_code ignored;
  fs::remove_all(directory_, ignored);
}

}  // namespace pgrt::testing
