// Whole processes under the lifecycle manager, against the test cluster: the demo stopped by
// SIGTERM (once, twice) under write load loses no accepted write and logs its shutdown phases in
// order; SIGINT twice exits at once; a stop that hangs is ended by the watchdog; std::exit() from
// a worker closes the pool at exit.
// Start-up hygiene: a crashed predecessor's leftovers are terminated (and nothing else: not names
// that only start like a tag), also while running a statement; a second instance is refused or
// takes over with force, a missing permission is a warning, pgrt-diag.
#include <algorithm>
#include <arpa/inet.h>
#include <array>
#include <atomic>
#include <boost/json/src.hpp>  // header-only Boost.JSON, compiled into this test
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <map>
#include <memory>
#include <netinet/in.h>
#include <optional>
#include <poll.h>
#include <regex>
#include <set>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <sstream>
#include <string>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <system_error>
#include <thread>
#include <unistd.h>
#include <vector>

#include <pgrt/db.hpp>
#include <pgrt/runtime/identity.hpp>
#include <pgrt/service.hpp>

#include "incarnation_squatter.hpp"
#include "pgrt/testing/blocking_sql.hpp"
#include "pgrt/testing/db_test.hpp"
#include "pgrt/testing/eventually.hpp"
#include "pgrt/testing/fault_proxy.hpp"
#include "pgrt/testing/run_coroutine.hpp"
#include "pgrt/testing/temp_pgbouncer.hpp"
#include "process.hpp"

#ifndef PGRT_DEMO_PATH
#error "PGRT_DEMO_PATH must name the pgrt_demo binary"
#endif
#ifndef PGRT_DIAG_PATH
#error "PGRT_DIAG_PATH must name the pgrt-diag binary"
#endif
#ifndef PGRT_PROBE_PATH
#error "PGRT_PROBE_PATH must name the lifecycle_probe binary"
#endif

namespace pgrt {
namespace {

using namespace std::chrono_literals;
using testing::BlockingConnection;
using ::testing::HasSubstr;
using ::testing::Not;
using Clock = std::chrono::steady_clock;
using testing::run_coroutine;
namespace asio = boost::asio;
namespace json = boost::json;

// What a child process wrote to `path` (its stdout and stderr) so far.
std::string file_text(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Whether `text` appears in the file at `path` within `limit` (looked for every 20 ms).
bool wait_for_text(const std::filesystem::path& path, const std::string& text,
                   std::chrono::seconds limit) {
  const auto deadline = Clock::now() + limit;
  while (Clock::now() < deadline) {
    if (file_text(path).find(text) != std::string::npos) return true;
    std::this_thread::sleep_for(20ms);
  }
  return false;
}

// A child process with its output in a file.
class Child {
 public:
  using Environment = std::vector<std::pair<std::string, std::string>>;

  // Starts `argv` with DATABASE_URL, PGRT_APP, PGRT_RUNTIME_DIR (a directory of this test
  // binary's) and `extra` set.
  Child(std::vector<std::string> argv, const std::string& database_url, const std::string& app,
        Environment extra = {})
      : output_(std::filesystem::temp_directory_path() /
                ("pgrt-process-test-" + std::to_string(::getpid()) + "-" +
                 std::to_string(counter_++) + ".out")) {
    extra.emplace_back("DATABASE_URL", database_url);
    extra.emplace_back("PGRT_APP", app);
    if (std::none_of(extra.begin(), extra.end(),
                     [](const auto& entry) { return entry.first == "PGRT_RUNTIME_DIR"; })) {
      extra.emplace_back("PGRT_RUNTIME_DIR", runtime_directory().string());
    }
    for (const auto& [name, value] : extra) ::setenv(name.c_str(), value.c_str(), 1);
    const int fd = ::open(output_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    testing::detail::SpawnOptions options;
    options.argv = std::move(argv);
    options.output_fd = fd;
    options.new_session = true;
    options.parent_death_signal = SIGKILL;
    pid_ = testing::detail::spawn(options);
    ::close(fd);
    for (const auto& [name, value] : extra) ::unsetenv(name.c_str());
  }

  static std::filesystem::path runtime_directory() {
    return std::filesystem::temp_directory_path() /
           ("pgrt-process-test-" + std::to_string(::getpid()) + "-run");
  }

  [[nodiscard]] pid_t pid() const { return pid_; }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  Child(Child&&) = delete;
  Child& operator=(Child&&) = delete;
  ~Child() {
    if (!status_) {
      ::kill(pid_, SIGKILL);
      (void)testing::detail::wait_for_exit(pid_, Clock::now() + 10s);
    }
    std::filesystem::remove(output_);
  }

  void signal(int number) const { ::kill(pid_, number); }

  // "exited with status 1", "killed by signal 11 (...)", or "still running".
  [[nodiscard]] std::string status() const {
    return status_ ? testing::detail::describe_status(*status_) : "still running";
  }

  [[nodiscard]] std::string output() const { return file_text(output_); }

  bool wait_for_output(const std::string& text, std::chrono::seconds limit) const {
    return wait_for_text(output_, text, limit);
  }

  // The exit code, or nullopt if it did not exit in time (or died by a signal).
  std::optional<int> wait_for_exit(std::chrono::seconds limit) {
    status_ = testing::detail::wait_for_exit(pid_, Clock::now() + limit);
    if (!status_ || !WIFEXITED(*status_)) return std::nullopt;
    return WEXITSTATUS(*status_);
  }

 private:
  static inline int counter_ = 0;
  std::filesystem::path output_;
  pid_t pid_ = -1;
  std::optional<int> status_;
};

// How many times `needle` occurs in `text`.
std::size_t occurrences(const std::string& text, const std::string& needle) {
  std::size_t found = 0;
  for (auto at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) {
    ++found;
  }
  return found;
}

std::string json_field(const std::string& json, const std::string& key) {
  const std::regex pattern("\"" + key + "\":\"?([^,\"}]*)");
  std::smatch match;
  if (!std::regex_search(json, match, pattern)) return "";
  return match[1];
}

std::string last_json_line(const std::string& output) {
  std::istringstream lines(output);
  std::string line;
  std::string found;
  while (std::getline(lines, line)) {
    if (line.starts_with("{\"writes_accepted\"")) found = line;
  }
  return found;
}

// Each line's first occurrence comes after the previous line's.
void expect_in_order(const std::string& output, const std::vector<std::string>& lines) {
  std::size_t previous = 0;
  std::string previous_line = "(the start)";
  for (const auto& line : lines) {
    const std::size_t found = output.find(line);
    ASSERT_NE(found, std::string::npos) << "missing: " << line << "\n" << output;
    EXPECT_GE(found, previous) << "'" << line << "' came before '" << previous_line << "'\n"
                               << output;
    previous = found;
    previous_line = line;
  }
}

// The demo's shutdown phases, in the issue's order (1-5 logged during run(), the report after it).
const std::vector<std::string> demo_shutdown_phases = {
    "shutdown phase 1: readiness false",
    "stopping 'intake'",
    "shutdown phase 2: intake stopped",
    "stopped 'intake'",
    "stopping 'pending_writes'",
    "pgrt pending writes pending_writes: stopped: accepted",
    "stopped 'pending_writes'",
    "shutdown phase 3: pending writes stopped,",
    "stopping 'workers'",
    "shutdown phase 4: workers stopped",
    "stopped 'workers'",
    "stopping 'pool'",
    "stopped 'pool'",
    "shutdown phase 5: the pool is closed",
    "{\"writes_accepted\"",
};

class LifecycleProcessTest : public testing::DbTest {
 protected:
  // Runs the demo under write load, stops it with SIGTERM and checks that every accepted write is
  // in demo_events exactly once. With `twice`, the flush is held up (the table locked) so that
  // the second SIGTERM surely arrives during the shutdown.
  void stop_demo_and_check_writes(bool twice, const std::string& app) {
    Child demo({PGRT_DEMO_PATH, "--json", "--workers", "50"}, cluster().dsn(), app);
    ASSERT_TRUE(demo.wait_for_output("serving:", 60s)) << demo.output();
    ASSERT_TRUE(demo.wait_for_output("requests/s", 10s)) << demo.output();  // under load
    std::optional<BlockingConnection> locker;
    if (twice) {
      locker.emplace(cluster().dsn());
      locker->query("BEGIN");
      locker->query("LOCK TABLE demo_events IN ACCESS EXCLUSIVE MODE");
    }
    demo.signal(SIGTERM);
    if (twice) {
      EXPECT_TRUE(demo.wait_for_output("stopping 'pending_writes'", 30s)) << demo.output();
      demo.signal(SIGTERM);
      EXPECT_TRUE(demo.wait_for_output("SIGTERM again: ignored", 10s)) << demo.output();
      locker->query("ROLLBACK");
    }
    const auto code = demo.wait_for_exit(60s);
    const std::string output = demo.output();
    ASSERT_EQ(code, 0) << output;
    const std::string report = last_json_line(output);
    ASSERT_FALSE(report.empty()) << output;
    EXPECT_EQ(json_field(report, "exit_reason"), "sigterm") << report;
    EXPECT_EQ(json_field(report, "writes_failed"), "0") << report;
    EXPECT_EQ(json_field(report, "writes_unconfirmed"), "0") << report;
    const long long accepted = std::stoll(json_field(report, "writes_accepted"));
    EXPECT_GT(accepted, 0);
    EXPECT_EQ(json_field(report, "writes_flushed"), std::to_string(accepted));
    EXPECT_LE(std::stoi(json_field(report, "max_backends_observed")), 3) << report;
    const std::string run = json_field(report, "run");
    ASSERT_FALSE(run.empty()) << report;
    // The set of sequence numbers written is exactly 1..accepted.
    BlockingConnection check(cluster().dsn());
    const std::string where = " FROM demo_events WHERE run = '" + run + "'";
    EXPECT_EQ(check.scalar("SELECT count(*)" + where), std::to_string(accepted));
    EXPECT_EQ(check.scalar("SELECT count(DISTINCT seq)" + where), std::to_string(accepted));
    EXPECT_EQ(check.scalar("SELECT min(seq)" + where), "1");
    EXPECT_EQ(check.scalar("SELECT max(seq)" + where), std::to_string(accepted));
    EXPECT_THAT(output, HasSubstr("SIGTERM: shutting down gracefully"));
    expect_in_order(output, demo_shutdown_phases);
  }

  static int backends_of(const std::string& app) {
    BlockingConnection observer(cluster().dsn());
    return std::stoi(observer.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '" + app + "/%'"));
  }
};

// What curl prints for `url` (status line and headers included), "" when it cannot connect.
std::string curl(const std::string& url) {
  const std::string command = "curl -s -i --max-time 5 '" + url + "' 2>/dev/null";
  std::FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return "";
  std::string output;
  std::array<char, 4096> chunk{};
  while (const std::size_t got = std::fread(chunk.data(), 1, chunk.size(), pipe)) {
    output.append(chunk.data(), got);
  }
  ::pclose(pipe);
  return output;
}

// A TCP port nobody listens on now.
std::uint16_t free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address);
  socklen_t length = sizeof address;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  ::close(fd);
  return ntohs(address.sin_port);
}

// A TCP listener on 127.0.0.1, on a port of its own, closed with the object. The kernel accepts
// up to 4 connections that nobody has taken with accept().
class LoopbackListener {
 public:
  LoopbackListener() : fd_(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof address;
    if (fd_ < 0 || ::bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
        ::listen(fd_, 4) != 0 ||
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
      const int error = errno;
      if (fd_ >= 0) ::close(fd_);
      throw std::system_error(error, std::generic_category(), "a loopback listener");
    }
    port_ = ntohs(address.sin_port);
  }
  LoopbackListener(const LoopbackListener&) = delete;
  LoopbackListener& operator=(const LoopbackListener&) = delete;
  ~LoopbackListener() { ::close(fd_); }
  [[nodiscard]] int fd() const { return fd_; }
  [[nodiscard]] std::uint16_t port() const { return port_; }

 private:
  int fd_;
  std::uint16_t port_ = 0;
};

// pgrt-diag metrics against an endpoint that accepts and never answers gives up after --timeout
// (it hung for good: beast's timeouts do not apply to synchronous reads); a URL with credentials
// is refused without echoing them.
TEST_F(LifecycleProcessTest, DiagMetricsGivesUpOnASilentEndpointAndNeverEchoesCredentials) {
  const LoopbackListener listener;  // the kernel accepts; nobody ever answers
  const std::string url = "http://127.0.0.1:" + std::to_string(listener.port()) + "/metrics";
  {
    const auto started = std::chrono::steady_clock::now();
    Child diag({PGRT_DIAG_PATH, "metrics", url, "--timeout", "1"}, cluster().dsn(), "diag-silent");
    EXPECT_EQ(diag.wait_for_exit(30s), 3) << diag.output();
    EXPECT_LT(std::chrono::steady_clock::now() - started, 10s);
    EXPECT_THAT(diag.output(), HasSubstr("timed out"));
  }
  {
    Child diag({PGRT_DIAG_PATH, "metrics", "http://admin:s3cret@127.0.0.1:1/metrics"},
               cluster().dsn(), "diag-credentials");
    EXPECT_EQ(diag.wait_for_exit(30s), 2) << diag.output();
    EXPECT_THAT(diag.output(), Not(HasSubstr("s3cret")));
    EXPECT_THAT(diag.output(), HasSubstr("credentials"));
  }
  {
    // A password with a '/' reached past the authority: "admin" was taken for the host, and the
    // error echoed the whole URL.
    Child diag({PGRT_DIAG_PATH, "metrics", "http://admin:pa/ss3cret@127.0.0.1:1/metrics"},
               cluster().dsn(), "diag-credentials-slash");
    EXPECT_EQ(diag.wait_for_exit(30s), 2) << diag.output();
    EXPECT_THAT(diag.output(), Not(HasSubstr("ss3cret")));
  }
}

// pgrt-diag metrics with a host name whose lookup hangs (a DNS server that does not answer):
// --timeout bounds the lookup too (it is left behind on a thread of its own, never joined), so
// the command gives up after about --timeout with exit 3, not after the resolver's own timeouts
// (here 20 s). The test runs it in a mount namespace of its own whose /etc/resolv.conf names a
// silent server on 127.0.0.1:53.
TEST_F(LifecycleProcessTest, DiagMetricsGivesUpOnAHostNameWhoseLookupHangs) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root, for a mount namespace of its own";
  const int silent_dns = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(53);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(silent_dns, reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) {
    ::close(silent_dns);
    GTEST_SKIP() << "127.0.0.1:53 is taken";
  }
  const auto resolv_conf = std::filesystem::temp_directory_path() /
                           ("pgrt-process-test-" + std::to_string(::getpid()) + "-resolv.conf");
  std::ofstream(resolv_conf) << "nameserver 127.0.0.1\noptions timeout:20 attempts:1\n";
  const auto started = std::chrono::steady_clock::now();
  Child diag(
      {"/usr/bin/unshare", "--mount", "/bin/sh", "-c",
       "mount --bind " + resolv_conf.string() + " /etc/resolv.conf && exec " + PGRT_DIAG_PATH +
           " metrics http://pgrt-diag-lookup-hangs.invalid:9464/metrics --timeout 1"},
      cluster().dsn(), "diag-lookup-hangs");
  const auto code = diag.wait_for_exit(60s);
  const auto took = std::chrono::steady_clock::now() - started;
  ::close(silent_dns);
  std::filesystem::remove(resolv_conf);
  if (diag.output().find("mount") != std::string::npos && code != 3) {
    GTEST_SKIP() << "no mount namespace here: " << diag.output();
  }
  EXPECT_EQ(code, 3) << diag.output();
  EXPECT_LT(took, 10s) << "--timeout 1 took "
                       << std::chrono::duration_cast<std::chrono::seconds>(took).count() << " s\n"
                       << diag.output();
}

// operations.md: pgrt-diag "never prints a password". A DSN given the way other tools take it
// (GNU-style --dsn=..., or psql's positional conninfo) is an unknown argument, and the refusal
// names it without its password (stderr goes to a terminal, a CI log, a journal).
TEST_F(LifecycleProcessTest, DiagNeverEchoesAPasswordOfAMisspelledDsnArgument) {
  const std::vector<std::vector<std::string>> invocations = {
      {PGRT_DIAG_PATH, "--dsn=postgresql://admin:s3cret@127.0.0.1:1/db"},
      {PGRT_DIAG_PATH, "postgresql://admin:s3cret@127.0.0.1:1/db"},
      {PGRT_DIAG_PATH, "--app", "orders", "host=127.0.0.1 port=1 password=s3cret"},
      {PGRT_DIAG_PATH, "budget", "--dsn=postgresql://admin:s3cret@127.0.0.1:1/db"},
  };
  int run = 0;
  for (const auto& argv : invocations) {
    Child diag(argv, cluster().dsn(), "diag-echo-" + std::to_string(run++));
    EXPECT_EQ(diag.wait_for_exit(30s), 2) << diag.output();
    EXPECT_THAT(diag.output(), Not(HasSubstr("s3cret"))) << "argv[1]: " << argv[1];
  }
  // psql's --password takes no value and holds none: it is named as it is, with the ways to give
  // a password (it was "an argument (not shown: it may hold a password)").
  Child flag({PGRT_DIAG_PATH, "--app", "orders", "--password"}, cluster().dsn(), "diag-echo-flag");
  EXPECT_EQ(flag.wait_for_exit(30s), 2) << flag.output();
  EXPECT_THAT(flag.output(), HasSubstr("unknown or incomplete argument '--password' (pgrt-diag "
                                       "takes no password on its command line: give it through "
                                       "PGPASSWORD"))
      << flag.output();
}

// A password given the way mysql takes it (-ps3cret), or under the name of another secret than a
// password (libpq 18's oauth_client_secret=, MYSQL_PWD=), was echoed in the refusal of the
// unknown argument: only "pass", "://" and '@' were looked for. pgrt-diag metrics echoed every
// argument it did not recognise, a conninfo with its password included.
TEST_F(LifecycleProcessTest, DiagNeverEchoesAPasswordGivenAsAShortOptionOrAnotherSecret) {
  const std::vector<std::vector<std::string>> invocations = {
      {PGRT_DIAG_PATH, "-ps3cret"},
      {PGRT_DIAG_PATH, "--app", "orders", "oauth_client_secret=s3cret"},
      {PGRT_DIAG_PATH, "MYSQL_PWD=s3cret"},
      {PGRT_DIAG_PATH, "budget", "-ps3cret"},
      {PGRT_DIAG_PATH, "metrics", "host=db password=s3cret"},
      {PGRT_DIAG_PATH, "metrics", "-ps3cret"},
  };
  int run = 0;
  for (const auto& argv : invocations) {
    Child diag(argv, cluster().dsn(), "diag-echo-short-" + std::to_string(run++));
    EXPECT_EQ(diag.wait_for_exit(30s), 2) << diag.output();
    EXPECT_THAT(diag.output(), Not(HasSubstr("s3cret"))) << "argv: " << argv.back();
    EXPECT_THAT(diag.output(), HasSubstr("not shown: it may hold a password")) << diag.output();
  }
  // An unknown option without a value is still named as it is.
  Child plain({PGRT_DIAG_PATH, "-x"}, cluster().dsn(), "diag-echo-plain");
  EXPECT_EQ(plain.wait_for_exit(30s), 2) << plain.output();
  EXPECT_THAT(plain.output(), HasSubstr("unknown or incomplete argument '-x'")) << plain.output();
}

// A --dsn that libpq cannot parse may still hold a password (here its unterminated quote is in
// the password): it is overwritten in pgrt-diag's command line (/proc/PID/cmdline, readable by
// every local user) as a parsable one with a password is. The refusal (exit 78) is written into a
// pipe that is already full, so that the process waits, with its command line, for the test to
// read it.
TEST_F(LifecycleProcessTest, DiagScrubsAnUnparsableDsnFromItsCommandLine) {
  int output[2] = {-1, -1};
  ASSERT_EQ(::pipe2(output, O_CLOEXEC | O_NONBLOCK), 0);
  const std::string filler(4096, '.');
  while (::write(output[1], filler.data(), filler.size()) > 0) {
  }
  const int flags = ::fcntl(output[1], F_GETFL);
  ASSERT_EQ(::fcntl(output[1], F_SETFL, flags & ~O_NONBLOCK), 0);  // the child's writes block
  testing::detail::SpawnOptions options;
  options.argv = {PGRT_DIAG_PATH, "--dsn", "host=127.0.0.1 port=1 password='s3cret"};
  options.output_fd = output[1];
  options.new_session = true;
  options.parent_death_signal = SIGKILL;
  const pid_t diag = testing::detail::spawn(options);
  ::close(output[1]);
  const std::string proc = "/proc/" + std::to_string(diag);
  auto read_proc = [&](const std::string& name) {
    std::ifstream in(proc + "/" + name);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  };
  // Blocked writing its refusal: past the parsing of its arguments.
  const auto deadline = Clock::now() + 10s;
  while (read_proc("wchan").find("pipe_write") == std::string::npos && Clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
  }
  const std::string cmdline = read_proc("cmdline");
  EXPECT_TRUE(testing::detail::process_alive(diag)) << "it exited before its command line was read";
  EXPECT_THAT(cmdline, HasSubstr("--dsn"));
  EXPECT_THAT(cmdline, Not(HasSubstr("s3cret"))) << "wchan: " << read_proc("wchan");
  ::close(output[0]);  // its write now fails (EPIPE), and it exits
  if (!testing::detail::wait_for_exit(diag, Clock::now() + 10s)) {
    ::kill(diag, SIGKILL);
    (void)testing::detail::wait_for_exit(diag, Clock::now() + 10s);
  }
}

// PGRT_APP= (set but empty) is refused by the service (invalid_config, exit 78) and by pgrt-diag
// alike, with the same message and exit code (78: a malformed PGRT_* variable, as
// docs/operations.md's table says), not taken as "pgrt" by one of them; --app given, pgrt-diag
// does not read PGRT_APP.
TEST_F(LifecycleProcessTest, AnEmptyPgrtAppIsRefusedByTheServiceAndPgrtDiagAlike) {
  const std::string message = "PGRT_APP='' is not valid";
  Child demo({PGRT_DEMO_PATH, "--duration", "1"}, cluster().dsn(), "");
  EXPECT_EQ(demo.wait_for_exit(60s), lifecycle::exit_code::config) << demo.output();
  EXPECT_THAT(demo.output(), HasSubstr(message));
  Child diag({PGRT_DIAG_PATH}, cluster().dsn(), "");
  EXPECT_EQ(diag.wait_for_exit(30s), lifecycle::exit_code::config)
      << diag.output() << " (a malformed PGRT_* variable: 78, docs/operations.md)";
  EXPECT_THAT(diag.output(), HasSubstr(message));
  Child given({PGRT_DIAG_PATH, "--app", "given"}, cluster().dsn(), "");
  EXPECT_EQ(given.wait_for_exit(30s), 0) << given.output();
}

// DATABASE_URL= (set but empty) is refused naming it, by the service and by pgrt-diag (exit 78,
// as for a malformed DSN), not taken as unset (libpq's PG* variables and the local socket).
TEST_F(LifecycleProcessTest, AnEmptyDatabaseUrlIsRefusedByTheServiceAndPgrtDiagAlike) {
  const std::string message = "DATABASE_URL is set but empty";
  Child demo({PGRT_DEMO_PATH, "--duration", "1"}, "", "empty-url");
  EXPECT_EQ(demo.wait_for_exit(120s), lifecycle::exit_code::config) << demo.output();
  EXPECT_THAT(demo.output(), HasSubstr(message));
  for (const char* command : {"report", "budget"}) {
    std::vector<std::string> argv = {PGRT_DIAG_PATH};
    if (std::string(command) == "budget") argv.emplace_back("budget");
    Child diag(argv, "", "empty-url");
    EXPECT_EQ(diag.wait_for_exit(30s), 78) << command << ": " << diag.output();
    EXPECT_THAT(diag.output(), HasSubstr(message)) << command;
  }
  Child given({PGRT_DIAG_PATH, "--dsn", cluster().dsn(), "--app", "empty-url"}, "", "empty-url");
  EXPECT_EQ(given.wait_for_exit(30s), 0) << "--dsn given: " << given.output();
}

// A DATABASE_URL whose port libpq refuses (99999) was taken for a server that is down: the demo
// waited its whole start wait and exited 1, pgrt-diag exited 3 (unreachable). Both exit 78
// (config) at once, naming the setting.
TEST_F(LifecycleProcessTest, ASettingLibpqRefusesEndsTheServiceAndPgrtDiagAsAConfigError) {
  const std::string url = "postgresql://app@127.0.0.1:99999/db";
  const std::string message = "the setting port is not valid";
  const auto started = Clock::now();
  Child demo({PGRT_DEMO_PATH, "--duration", "1"}, url, "bad-port");
  EXPECT_EQ(demo.wait_for_exit(60s), lifecycle::exit_code::config) << demo.output();
  EXPECT_THAT(demo.output(), HasSubstr(message)) << demo.output();
  EXPECT_LT(Clock::now() - started, 20s);
  Child diag({PGRT_DIAG_PATH, "--app", "bad-port"}, url, "bad-port");
  EXPECT_EQ(diag.wait_for_exit(30s), 78) << diag.output();
  EXPECT_THAT(diag.output(), HasSubstr(message)) << diag.output();
}

// pgrt-diag budget refuses a key the service refuses (a stray space, a CRLF file's \r), saying
// which and naming where it came from (--key: exit 2, PGRT_BUDGET_KEY: exit 78), instead of
// listing an empty budget nobody shares.
TEST_F(LifecycleProcessTest, DiagBudgetRefusesAKeyTheServiceRefuses) {
  Child flag({PGRT_DIAG_PATH, "budget", "--key", "orders ", "--slots", "4"}, cluster().dsn(),
             "diag-key");
  EXPECT_EQ(flag.wait_for_exit(30s), 2) << flag.output();
  EXPECT_THAT(flag.output(), HasSubstr("--key='orders ' is not valid: it starts or ends with a"));
  Child from_env({PGRT_DIAG_PATH, "budget", "--slots", "4"}, cluster().dsn(), "diag-key",
                 {{"PGRT_BUDGET_KEY", "orders\r"}});
  EXPECT_EQ(from_env.wait_for_exit(30s), 78) << from_env.output();
  EXPECT_THAT(from_env.output(),
              HasSubstr("PGRT_BUDGET_KEY='orders\\x0d' is not valid: it holds a control"));
  Child good({PGRT_DIAG_PATH, "budget", "--key", "orders", "--slots", "4"}, cluster().dsn(),
             "diag-key", {{"PGRT_BUDGET_KEY", "orders\r"}});
  EXPECT_EQ(good.wait_for_exit(30s), 0) << "a good --key over a bad variable: " << good.output();
}

// pgrt-diag's SQL (its report and `budget`) names every function, relation, type and operator
// schema-qualified: with a schema put ahead of pg_catalog in its role's search_path (here by the
// DSN's options) holding a pg_locks and a pg_stat_activity of its own that show nothing, it
// reported an empty budget and no backends while a slot and a tagged backend were there.
TEST_F(LifecycleProcessTest, DiagIgnoresASchemaAheadOfPgCatalogInTheSearchPath) {
  BlockingConnection admin(cluster().dsn());
  admin.query("SET client_min_messages = warning");
  admin.query("DROP SCHEMA IF EXISTS diag_hijack CASCADE");
  admin.query("CREATE SCHEMA diag_hijack");
  for (const char* relation : {"pg_locks", "pg_stat_activity"}) {
    admin.query(std::string("CREATE VIEW diag_hijack.") + relation +
                " AS SELECT * FROM pg_catalog." + relation + " WHERE false");
  }
  admin.query("GRANT USAGE ON SCHEMA diag_hijack TO PUBLIC");
  const std::string key = "diag-hijack";
  {
    BlockingConnection holder(cluster().dsn() + " application_name=diaghijack/one/0badcafe");
    holder.query("SELECT pg_advisory_lock(" + std::to_string(budget_lock_key(key)) + ", 1)");
    const std::string hijacked =
        cluster().dsn() + " options='-c search_path=diag_hijack,pg_catalog'";
    Child budget({PGRT_DIAG_PATH, "budget", "--key", key, "--slots", "4"}, hijacked, "diag-hijack");
    EXPECT_EQ(budget.wait_for_exit(30s), 0) << budget.output();
    EXPECT_THAT(budget.output(), HasSubstr("1 slot(s) held of 4, 3 free"));
    EXPECT_THAT(budget.output(), HasSubstr("diaghijack/one/0badcafe"));
    Child report({PGRT_DIAG_PATH, "--app", "diaghijack"}, hijacked, "diag-hijack");
    (void)report.wait_for_exit(30s);
    EXPECT_THAT(report.output(), HasSubstr("diaghijack/one/0badcafe"));
  }
  admin.query("DROP SCHEMA diag_hijack CASCADE");
}

// pgrt-diag's text report shows a server's names (a database's, which its owner chooses) with
// their control bytes replaced: an escape sequence does not reach the operator's terminal.
TEST_F(LifecycleProcessTest, DiagTextReportKeepsControlBytesOfServerNamesOffTheTerminal) {
  const std::string name =
      "diag\x1b[2J\xc2\x9b"
      "31mfake";  // ESC, and CSI as UTF-8's U+009B
  {
    BlockingConnection admin(cluster().dsn());
    admin.query("DROP DATABASE IF EXISTS \"" + name + "\"");
    admin.query("CREATE DATABASE \"" + name + "\"");
  }
  {
    BlockingConnection inside(cluster().dsn() + " dbname='" + name +
                              "' application_name=diagesc/one/0badcafe");
    Child diag({PGRT_DIAG_PATH, "--app", "diagesc"}, cluster().dsn(), "diag-escape");
    (void)diag.wait_for_exit(30s);
    EXPECT_THAT(diag.output(), HasSubstr("diag?[2J?31mfake"));
    EXPECT_EQ(diag.output().find('\x1b'), std::string::npos) << diag.output();
  }
  BlockingConnection(cluster().dsn()).query("DROP DATABASE IF EXISTS \"" + name + "\"");
}

// A name that is not UTF-8 at all (made from a SQL_ASCII database, which takes any bytes: a lone
// 0x9b is CSI to a terminal that reads C1 controls as bytes) reaches pgrt-diag as it is, from a
// UTF8 database too: its text report shows it as valid UTF-8, each invalid sequence as U+FFFD (it
// passed the bytes to the terminal unchanged), and --json stays valid JSON with the same text.
TEST_F(LifecycleProcessTest, DiagReportsShowANameOfInvalidUtf8AsValidUtf8) {
  const std::string name =
      "diag\xff\x9b"
      "31mraw\xe2\x82";  // 0xff, a lone 0x9b, a sequence cut short
  const std::string shown =
      "diag\xef\xbf\xbd\xef\xbf\xbd"
      "31mraw\xef\xbf\xbd";
  const std::string sql_ascii = "diag_sql_ascii";
  const std::string sql_ascii_dsn = cluster().dsn() + " dbname=" + sql_ascii;
  BlockingConnection admin(cluster().dsn());
  admin.query("DROP DATABASE IF EXISTS " + sql_ascii);
  admin.query("CREATE DATABASE " + sql_ascii +
              " ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
  {
    BlockingConnection maker(sql_ascii_dsn);
    maker.query("DROP DATABASE IF EXISTS \"" + name + "\"");
    maker.query("CREATE DATABASE \"" + name + "\"");
    {
      BlockingConnection inside(cluster().dsn() + " dbname='" + name +
                                "' application_name=diagutf/one/0badcafe");
      Child text({PGRT_DIAG_PATH, "--app", "diagutf"}, cluster().dsn(), "diag-utf8");
      (void)text.wait_for_exit(30s);
      EXPECT_THAT(text.output(), HasSubstr("@" + shown + " from")) << text.output();
      EXPECT_EQ(text.output().find('\x9b'), std::string::npos) << text.output();
      Child as_json({PGRT_DIAG_PATH, "--app", "diagutf", "--json"}, cluster().dsn(), "diag-utf8");
      (void)as_json.wait_for_exit(30s);
      const std::size_t start = as_json.output().find('{');
      ASSERT_NE(start, std::string::npos) << as_json.output();
      boost::system::error_code error;
      const std::string line = as_json.output().substr(start);
      const json::value report = json::parse(line, error);
      ASSERT_FALSE(error) << as_json.output();
      const auto& backends = report.at("backends").as_array();
      ASSERT_EQ(backends.size(), 1U) << as_json.output();
      EXPECT_EQ(json::value_to<std::string>(backends[0].at("database")), shown) << as_json.output();
    }
    maker.query("DROP DATABASE \"" + name + "\"");
  }
  admin.query("DROP DATABASE " + sql_ascii);
}

// pgrt-diag metrics (tagged `name`, its PGRT_* from `dsn`'s cluster) against an endpoint on the
// loopback that answers one request with `body`: its exit status and output.
struct DiagMetricsRun {
  std::optional<int> exit;
  std::string output;
};
DiagMetricsRun diag_metrics_against(const std::string& body, const std::string& name,
                                    const std::string& dsn) {
  const LoopbackListener listener;
  std::thread server([&listener, &body] {
    const int client = ::accept(listener.fd(), nullptr, nullptr);
    if (client < 0) return;
    char request[4096];
    (void)::read(client, request, sizeof request);  // one read holds a curl-sized GET
    const std::string answer = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: " +
                               std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
    (void)!::write(client, answer.data(), answer.size());
    ::close(client);
  });
  Child diag({PGRT_DIAG_PATH, "metrics",
              "http://127.0.0.1:" + std::to_string(listener.port()) + "/metrics"},
             dsn, name);
  DiagMetricsRun run{.exit = diag.wait_for_exit(30s), .output = diag.output()};
  server.join();
  return run;
}

// pgrt-diag metrics against an endpoint whose samples carry other label names (an OpenTelemetry
// exporter's db_client_connection_state) and control bytes: a summary, no crash (it aborted on a
// missing label), and no escape sequence reaches the terminal.
TEST_F(LifecycleProcessTest, DiagMetricsSummarizesAnEndpointWithOtherLabelsWithoutCrashing) {
  const DiagMetricsRun diag = diag_metrics_against(
      "db_client_connection_count{db_client_connection_pool_name=\"orders\","
      "db_client_connection_state=\"idle\"} 3\n"
      "pgrt_watchdog_condition{cause=\"x\"} 1\n"
      "pgrt_lifecycle_state{state=\"running\\u001b[2J\"} 1\n"
      "pgrt_pool_discards_total{db_client_connection_pool_name=\"\x1b[31morders\"} 2\n"
      "pgrt_pool_waiting{db_client_connection_pool_name=\"x\\nFAKE: all healthy\"} 0\n",
      "diag-other-labels", cluster().dsn());
  EXPECT_EQ(diag.exit, 0) << diag.output;
  EXPECT_THAT(diag.output, HasSubstr("pool orders"));
  EXPECT_EQ(diag.output.find('\x1b'), std::string::npos) << diag.output;
  EXPECT_EQ(diag.output.find("\nFAKE"), std::string::npos) << diag.output;
}

// Writes given up on after a COMMIT that went out unanswered may be stored: pgrt-diag metrics
// says how many of the failed ones (pgrt_pending_writes_unconfirmed_total), and only when some are.
TEST_F(LifecycleProcessTest, DiagMetricsSaysHowManyFailedWritesMayBeStored) {
  for (const int unconfirmed : {0, 2}) {
    const DiagMetricsRun diag = diag_metrics_against(
        "pgrt_pending_writes_accepted_total{pending_writes=\"audit\"} 10\n"
        "pgrt_pending_writes_flushed_total{pending_writes=\"audit\"} 5\n"
        "pgrt_pending_writes_failed_total{pending_writes=\"audit\"} 5\n"
        "pgrt_pending_writes_unconfirmed_total{pending_writes=\"audit\"} " +
            std::to_string(unconfirmed) +
            "\n"
            "pgrt_pending_writes_queued{pending_writes=\"audit\"} 0\n",
        "diag-unconfirmed", cluster().dsn());
    EXPECT_EQ(diag.exit, 0) << diag.output;
    EXPECT_THAT(diag.output, HasSubstr("pending writes audit: accepted 10, flushed 5, failed 5"));
    if (unconfirmed > 0) {
      EXPECT_THAT(diag.output, HasSubstr("failed 5 (2 may be stored)")) << diag.output;
    } else {
      EXPECT_THAT(diag.output, Not(HasSubstr("may be stored"))) << diag.output;
    }
  }
}

// The exposition format allows NaN and +Inf as values (and any double): pgrt-diag metrics shows
// NaN, an infinity or a value past long long's range (an endpoint on that port that is not
// pgrt's, or a squatter on it while the service is down) as it is, never converting it to a
// whole number (undefined behaviour; x86-64 printed -9223372036854775808 connections).
TEST_F(LifecycleProcessTest, DiagMetricsSummarizesNonFiniteAndHugeValuesWithoutUndefinedBehaviour) {
  const DiagMetricsRun diag = diag_metrics_against(
      "db_client_connection_count{db_client_connection_pool_name=\"orders\",state=\"used\"} NaN\n"
      "db_client_connection_count{db_client_connection_pool_name=\"orders\",state=\"idle\"} "
      "1e300\n"
      "db_client_connection_max{db_client_connection_pool_name=\"orders\"} +Inf\n"
      "pgrt_pool_acquires_total{db_client_connection_pool_name=\"orders\"} -Inf\n",
      "diag-non-finite", cluster().dsn());
  EXPECT_EQ(diag.exit, 0) << diag.output;
  EXPECT_THAT(diag.output, HasSubstr("pool orders"));
  EXPECT_THAT(diag.output, Not(HasSubstr("9223372036854775808"))) << diag.output;
}

// pgrt-diag's snapshot against a server that stops answering (a catalog it reads is locked) gives
// up after --timeout with exit 3; Ctrl+C ends a hanging --watch at once (exit 0, as between
// refreshes).
TEST_F(LifecycleProcessTest, DiagGivesUpOnAHangingSnapshotAndCtrlCEndsItAtOnce) {
  for (const bool interrupt : {false, true}) {
    Child diag({PGRT_DIAG_PATH, "--app", "diag-hang", "--json", "--watch", "1", "--timeout",
                interrupt ? "60" : "2"},
               cluster().dsn(), "diag-hang");
    ASSERT_TRUE(diag.wait_for_output("\"max_connections\"", 30s)) << diag.output();
    BlockingConnection locker(cluster().dsn());
    locker.query("BEGIN");
    locker.query("LOCK TABLE pg_catalog.pg_database IN ACCESS EXCLUSIVE MODE");
    std::this_thread::sleep_for(1500ms);  // the next refresh is stuck behind the lock
    const auto started = std::chrono::steady_clock::now();
    if (interrupt) diag.signal(SIGINT);
    const auto code = diag.wait_for_exit(30s);
    locker.query("ROLLBACK");
    EXPECT_LT(std::chrono::steady_clock::now() - started, interrupt ? 2s : 5s) << diag.output();
    EXPECT_EQ(code, interrupt ? 0 : 3) << diag.output();
    EXPECT_THAT(diag.output(), HasSubstr(interrupt ? "interrupted" : "timed out"));
  }
}

// Whether process `pid` listens for signal `number`: a handler installed (/proc/PID/status,
// SigCgt), or the signal blocked (SigBlk) and read from a signalfd of the process
// (/proc/PID/fdinfo: its sigmask holds the signal). A block alone is not listening (glibc blocks
// every signal for a moment as it starts a thread).
bool listens_for_signal(pid_t pid, int number) {
  const std::string proc = "/proc/" + std::to_string(pid);
  const auto holds = [number](const std::string& hex) {
    return ((std::stoull(hex, nullptr, 16) >> (number - 1)) & 1U) != 0;
  };
  std::ifstream status(proc + "/status");
  bool caught = false;
  bool blocked = false;
  for (std::string line; std::getline(status, line);) {
    if (line.starts_with("SigCgt:")) caught = holds(line.substr(7));
    if (line.starts_with("SigBlk:")) blocked = holds(line.substr(7));
  }
  if (caught || !blocked) return caught;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(proc + "/fd", error)) {
    std::error_code unreadable;
    if (std::filesystem::read_symlink(entry.path(), unreadable) != "anon_inode:[signalfd]") {
      continue;
    }
    std::ifstream info(proc + "/fdinfo/" + entry.path().filename().string());
    for (std::string line; std::getline(info, line);) {
      if (line.starts_with("sigmask:") && holds(line.substr(8))) return true;
    }
  }
  return false;
}

// Whether /proc/PID/status's `field` ("SigCgt:" caught, "SigBlk:" blocked) holds signal `number`.
bool status_holds_signal(pid_t pid, const std::string& field, int number) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(status, line);) {
    if (line.starts_with(field)) {
      return ((std::stoull(line.substr(field.size()), nullptr, 16) >> (number - 1)) & 1U) != 0;
    }
  }
  return false;
}

// Each pgrt-diag command reads its stop signals from a signalfd, no handler installed: under
// ThreadSanitizer's runtime a signal_set's handler now and then never ran for a signal that came
// while the process sat in epoll_wait, and the command waited out its --timeout (metrics was
// changed first; the others kept their signal_set, SIGINT caught). The signals it does not stop
// on keep their default action: SIGTERM ends pgrt-diag without --watch, and pgrt-diag budget, as
// it always did. Each command is held in its connect (or read) by a listener that never answers.
TEST_F(LifecycleProcessTest, DiagCommandsReadTheirStopSignalsFromASignalfdWithoutAHandler) {
  struct Case {
    std::vector<std::string> arguments;  // after pgrt-diag; the DSN and URL name the listener
    std::vector<int> stop_signals;       // read from the signalfd
    int sent;                            // then sent: `expected` its outcome
    std::string expected;
  };
  const std::vector<Case> cases = {
      {{"--app", "diag-mask", "--timeout", "60"}, {SIGINT}, SIGTERM, "killed by signal 15 "},
      {{"--app", "diag-mask", "--timeout", "60"}, {SIGINT}, SIGINT, "exited with status 130"},
      {{"--app", "diag-mask", "--watch", "1", "--timeout", "60"},
       {SIGINT, SIGTERM},
       SIGTERM,
       "exited with status 0"},
      {{"budget", "--key", "diag-mask", "--timeout", "60"},
       {SIGINT},
       SIGTERM,
       "killed by signal 15 "},
      {{"budget", "--key", "diag-mask", "--timeout", "60"},
       {SIGINT},
       SIGINT,
       "exited with status 130"},
      {{"metrics", "URL", "--timeout", "60"}, {SIGINT, SIGTERM}, SIGTERM, "exited with status 143"},
  };
  for (const Case& one : cases) {
    const LoopbackListener listener;  // the kernel accepts; nobody ever answers
    const std::string port = std::to_string(listener.port());
    std::vector<std::string> argv = {PGRT_DIAG_PATH};
    for (const std::string& argument : one.arguments) {
      argv.push_back(argument == "URL" ? "http://127.0.0.1:" + port + "/metrics" : argument);
    }
    Child diag(argv, "host=127.0.0.1 port=" + port + " dbname=nobody user=nobody", "diag-mask");
    std::string what;
    for (const std::string& argument : argv) what += argument + " ";
    const auto deadline = Clock::now() + 20s;
    while (!listens_for_signal(diag.pid(), SIGINT) && testing::detail::process_alive(diag.pid()) &&
           Clock::now() < deadline) {
      std::this_thread::sleep_for(1ms);
    }
    ASSERT_TRUE(listens_for_signal(diag.pid(), SIGINT)) << what << diag.output();
    for (const int number : {SIGINT, SIGTERM}) {
      const bool stops = std::find(one.stop_signals.begin(), one.stop_signals.end(), number) !=
                         one.stop_signals.end();
      const std::string name = what + (number == SIGINT ? "SIGINT" : "SIGTERM");
      EXPECT_FALSE(status_holds_signal(diag.pid(), "SigCgt:", number)) << name << ": a handler";
      EXPECT_EQ(listens_for_signal(diag.pid(), number), stops) << name;
      // Not a stop signal: neither caught nor blocked, its default action stands. (glibc blocks
      // every signal for a moment as it starts a thread.)
      if (!stops) {
        EXPECT_TRUE(testing::eventually(
            [&] { return !status_holds_signal(diag.pid(), "SigBlk:", number); }, 2s))
            << name << ": blocked";
      }
    }
    diag.signal(one.sent);
    (void)diag.wait_for_exit(10s);
    EXPECT_THAT(diag.status(), HasSubstr(one.expected)) << what << "\n" << diag.output();
    if (one.expected.starts_with("exited")) {
      EXPECT_THAT(diag.output(), HasSubstr("interrupted")) << what << "\n" << diag.output();
    }
  }
}

// pgrt-diag --watch ends cleanly (exit 0) on a SIGTERM at any moment once it listens for it:
// during the connect, the SET ROLE, a snapshot, between two of them, or between refreshes.
// Without --watch, Ctrl+C ends it as interrupted (130), or after its report. A signal that came
// as one step completed, before the next one's coroutine first ran, escaped as "co_await:
// Operation canceled" (exit 3); one whose handler ran just after a step completed was dropped,
// and --watch went on refreshing. Each moment is hit only now and then: many runs, each with its
// signal a millisecond later than the one before.
TEST_F(LifecycleProcessTest, DiagEndsCleanlyOnASignalAtAnyMomentOfItsRun) {
  for (const bool watch : {true, false}) {
    const int number = watch ? SIGTERM : SIGINT;
    for (int run = 0; run < (watch ? 60 : 40); ++run) {
      std::vector<std::string> argv = {PGRT_DIAG_PATH, "--app", "diag-signal"};
      if (watch) argv.insert(argv.end(), {"--watch", "1"});
      Child diag(argv, cluster().dsn(), "diag-signal");
      const auto deadline = Clock::now() + 20s;
      while (!listens_for_signal(diag.pid(), number) &&
             testing::detail::process_alive(diag.pid()) && Clock::now() < deadline) {
        std::this_thread::sleep_for(200us);
      }
      ASSERT_TRUE(listens_for_signal(diag.pid(), number) || !watch) << diag.output();
      std::this_thread::sleep_for(std::chrono::milliseconds(run));
      diag.signal(number);
      const auto code = diag.wait_for_exit(5s);
      const std::string output = diag.output();
      const std::string moment = (watch ? "--watch, SIGTERM " : "SIGINT ") + std::to_string(run) +
                                 " ms after its handler was in: " + diag.status() + "\n" + output;
      EXPECT_THAT(output, Not(HasSubstr("Operation canceled"))) << moment;
      if (watch) {
        EXPECT_EQ(code, 0) << moment;
      } else if (code == 130) {
        EXPECT_THAT(output, HasSubstr("pgrt-diag: interrupted")) << moment;
      } else if (code) {
        // Its report was out before the signal came.
        EXPECT_EQ(code, 0) << moment;
        EXPECT_THAT(output, HasSubstr("max_connections")) << moment;
      } else {
        // The signal came as it exited, its handler gone.
        EXPECT_THAT(diag.status(), HasSubstr("killed by signal " + std::to_string(SIGINT) + " "))
            << moment;
      }
      if (HasFailure()) return;
    }
  }
}

// pgrt-diag metrics ends cleanly on Ctrl+C or SIGTERM at any moment once it listens for them
// (it never did: the signal's default action killed it, mid-output too). While it waits for an
// endpoint that accepts and never answers, at once: 130 (SIGINT) or 143 (SIGTERM),
// "interrupted". Against one that answers at once, the signal comes during the read or the
// output: "interrupted" with nothing on stdout, or the whole summary and exit 0.
TEST_F(LifecycleProcessTest, DiagMetricsEndsCleanlyOnASignalAtAnyMomentOfItsRun) {
  const std::string body =
      "db_client_connection_count{db_client_connection_pool_name=\"orders\",state=\"used\"} 1\n"
      "pgrt_lifecycle_state{state=\"running\"} 1\n";
  for (const bool answering : {false, true}) {
    for (const int number : {SIGINT, SIGTERM}) {
      for (int run = 0; run < 20; ++run) {
        const LoopbackListener listener;  // (its own: a backlog of 4 is soon full)
        std::atomic<bool> done{false};
        std::thread server([&] {
          // Answers each request at once, or (not answering) leaves it in the backlog.
          while (answering && !done) {
            pollfd ready{.fd = listener.fd(), .events = POLLIN, .revents = 0};
            if (::poll(&ready, 1, 50) <= 0) continue;
            const int client = ::accept(listener.fd(), nullptr, nullptr);
            if (client < 0) continue;
            char request[4096];
            (void)::read(client, request, sizeof request);
            const std::string answer =
                "HTTP/1.1 200 OK\r\nContent-Length: " + std::to_string(body.size()) +
                "\r\nConnection: close\r\n\r\n" + body;
            (void)!::write(client, answer.data(), answer.size());
            ::close(client);
          }
        });
        Child diag(
            {PGRT_DIAG_PATH, "metrics",
             "http://127.0.0.1:" + std::to_string(listener.port()) + "/metrics", "--timeout", "30"},
            cluster().dsn(), "diag-metrics-signal");
        const auto deadline = Clock::now() + 10s;
        while (!listens_for_signal(diag.pid(), number) &&
               testing::detail::process_alive(diag.pid()) && Clock::now() < deadline) {
          std::this_thread::sleep_for(200us);
        }
        const bool caught = listens_for_signal(diag.pid(), number);
        std::this_thread::sleep_for(std::chrono::milliseconds(answering ? run / 4 : run));
        diag.signal(number);
        const auto code = diag.wait_for_exit(5s);
        done = true;
        server.join();
        const std::string output = diag.output();
        const std::string moment = std::string(answering ? "answering, " : "silent, ") +
                                   (number == SIGINT ? "SIGINT " : "SIGTERM ") +
                                   std::to_string(run) + ": " + diag.status() + "\n" + output;
        if (!answering) {
          EXPECT_TRUE(caught) << moment;
          EXPECT_EQ(code, 128 + number) << moment;
          EXPECT_THAT(output, HasSubstr("pgrt-diag metrics: interrupted")) << moment;
        } else if (code == 128 + number) {
          EXPECT_THAT(output, HasSubstr("pgrt-diag metrics: interrupted")) << moment;
          EXPECT_THAT(output, Not(HasSubstr("pool orders"))) << moment;
        } else if (code == 0) {
          // Its output was out before the signal came (or it exited before), whole.
          EXPECT_THAT(output, HasSubstr("lifecycle: running")) << moment;
        } else if (!code && caught) {
          // The signal came as it exited, its handler gone.
          EXPECT_THAT(diag.status(), HasSubstr("killed by signal " + std::to_string(number) + " "))
              << moment;
        } else {
          ADD_FAILURE() << moment;
        }
        if (HasFailure()) return;
      }
    }
  }
}

// The demo with --metrics-port: curl reads /metrics, /healthz and /readyz; on SIGTERM /readyz
// turns 503 while the drain still runs (held up by a lock on the table it flushes to), and
// /metrics still answers, saying the process is stopping; pgrt-diag metrics reads the endpoint.
TEST_F(LifecycleProcessTest, TheDemoServesMetricsAndReadinessTurnsFalseOnSigtermDuringTheDrain) {
  const std::uint16_t port = free_port();
  const std::string base = "http://127.0.0.1:" + std::to_string(port);
  Child demo({PGRT_DEMO_PATH, "--workers", "20", "--metrics-port", std::to_string(port)},
             cluster().dsn(), "metrics-demo");
  ASSERT_TRUE(demo.wait_for_output("serving:", 60s)) << demo.output();
  ASSERT_TRUE(demo.wait_for_output("requests/s", 10s)) << demo.output();
  const std::string metrics = curl(base + "/metrics");
  EXPECT_THAT(metrics, HasSubstr("HTTP/1.1 200"));
  EXPECT_THAT(metrics, HasSubstr("db_client_connection_max{db_client_connection_pool_name=\""
                                 "metrics-demo/"));
  EXPECT_THAT(metrics, HasSubstr("db_client_connection_wait_time_seconds_bucket{"));
  EXPECT_THAT(metrics, HasSubstr("pgrt_pending_writes_accepted_total{pending_writes=\"demo\"}"));
  EXPECT_THAT(metrics,
              HasSubstr("pgrt_pending_writes_unconfirmed_total{pending_writes=\"demo\"} 0"));
  EXPECT_THAT(metrics, HasSubstr("pgrt_lifecycle_state{state=\"running\"} 1"));
  EXPECT_THAT(curl(base + "/healthz"), HasSubstr("HTTP/1.1 200"));
  EXPECT_THAT(curl(base + "/readyz"), HasSubstr("HTTP/1.1 200"));
  {
    Child diag({PGRT_DIAG_PATH, "metrics", base + "/metrics"}, cluster().dsn(), "metrics-diag");
    EXPECT_EQ(diag.wait_for_exit(30s), 0) << diag.output();
    EXPECT_THAT(diag.output(), HasSubstr("pool metrics-demo/"));
    EXPECT_THAT(diag.output(), HasSubstr("of max 3 in use"));
    EXPECT_THAT(diag.output(), HasSubstr("lifecycle: running, ready"));
  }

  BlockingConnection locker(cluster().dsn());
  locker.query("BEGIN");
  locker.query("LOCK TABLE demo_events IN ACCESS EXCLUSIVE MODE");
  demo.signal(SIGTERM);
  ASSERT_TRUE(demo.wait_for_output("stopping 'pending_writes'", 30s)) << demo.output();
  EXPECT_THAT(curl(base + "/readyz"), HasSubstr("HTTP/1.1 503"));
  const std::string draining = curl(base + "/metrics");
  EXPECT_THAT(draining, HasSubstr("pgrt_lifecycle_state{state=\"stopping\"} 1"));
  EXPECT_THAT(draining, HasSubstr("pgrt_lifecycle_ready 0"));
  EXPECT_THAT(demo.output(), Not(HasSubstr("stopped 'pending_writes'")))
      << "the drain ended before readiness was read";
  locker.query("ROLLBACK");
  EXPECT_EQ(demo.wait_for_exit(60s), 0) << demo.output();
  EXPECT_EQ(curl(base + "/healthz"), "");  // closed with the process
}

// A terminal that closes (or an ssh session that ends) sends SIGHUP, whose default action ends the
// process at once, its accepted writes lost. The manager takes it as a graceful stop: exit 129,
// every accepted write stored, the shutdown phases in order.
TEST_F(LifecycleProcessTest, SighupUnderWriteLoadStopsGracefullyAndEveryAcceptedWriteIsStored) {
  Child demo({PGRT_DEMO_PATH, "--json", "--workers", "50"}, cluster().dsn(), "sighup");
  ASSERT_TRUE(demo.wait_for_output("serving:", 60s)) << demo.output();
  ASSERT_TRUE(demo.wait_for_output("requests/s", 10s)) << demo.output();  // under load
  demo.signal(SIGHUP);
  const auto code = demo.wait_for_exit(60s);
  const std::string output = demo.output();
  ASSERT_EQ(code, lifecycle::exit_code::hangup) << demo.status() << "\n" << output;
  EXPECT_THAT(output, HasSubstr("SIGHUP: shutting down gracefully"));
  const std::string report = last_json_line(output);
  ASSERT_FALSE(report.empty()) << output;
  EXPECT_EQ(json_field(report, "exit_reason"), "sighup") << report;
  EXPECT_EQ(json_field(report, "writes_failed"), "0") << report;
  const long long accepted = std::stoll(json_field(report, "writes_accepted"));
  EXPECT_GT(accepted, 0);
  EXPECT_EQ(json_field(report, "writes_flushed"), std::to_string(accepted));
  BlockingConnection check(cluster().dsn());
  EXPECT_EQ(check.scalar("SELECT count(DISTINCT seq) FROM demo_events WHERE run = '" +
                         json_field(report, "run") + "'"),
            std::to_string(accepted));
  expect_in_order(output, demo_shutdown_phases);
}

TEST_F(LifecycleProcessTest, SigtermUnderWriteLoadExitsZeroAndEveryAcceptedWriteIsStored) {
  stop_demo_and_check_writes(false, "sigterm-once");
}

// The demo through PgBouncer in transaction mode (PGRT_POOLER=transaction): it serves, and a
// SIGTERM under load still stores every accepted write exactly once.
TEST_F(LifecycleProcessTest, TheDemoRunsThroughPgBouncerInTransactionMode) {
  testing::TempPgBouncer bouncer(cluster(), {.pool_size = 3});
  {
    // Not told about the pooler: PgBouncer refuses the startup options, a configuration error.
    Child unconfigured({PGRT_DEMO_PATH, "--duration", "1"}, bouncer.dsn(), "via-pooler");
    EXPECT_EQ(unconfigured.wait_for_exit(60s), lifecycle::exit_code::config)
        << unconfigured.output();
    EXPECT_THAT(unconfigured.output(), HasSubstr("PGRT_POOLER=transaction"));
  }
  Child demo({PGRT_DEMO_PATH, "--json", "--workers", "20"}, bouncer.dsn(), "via-pooler",
             {{"PGRT_POOLER", "transaction"}});
  ASSERT_TRUE(demo.wait_for_output("serving:", 60s)) << demo.output();
  ASSERT_TRUE(demo.wait_for_output("requests/s", 10s)) << demo.output();
  demo.signal(SIGTERM);
  ASSERT_EQ(demo.wait_for_exit(60s), 0) << demo.output();
  const std::string output = demo.output();
  EXPECT_THAT(output, HasSubstr("cleanup skipped: behind a transaction pooler"));
  const std::string report = last_json_line(output);
  ASSERT_FALSE(report.empty()) << output;
  EXPECT_EQ(json_field(report, "writes_failed"), "0") << report;
  const long long accepted = std::stoll(json_field(report, "writes_accepted"));
  EXPECT_GT(accepted, 0);
  EXPECT_EQ(json_field(report, "writes_flushed"), std::to_string(accepted));
  BlockingConnection check(cluster().dsn());
  const std::string where = " FROM demo_events WHERE run = '" + json_field(report, "run") + "'";
  EXPECT_EQ(check.scalar("SELECT count(DISTINCT seq)" + where), std::to_string(accepted));
  EXPECT_EQ(check.scalar("SELECT count(*)" + where), std::to_string(accepted));
}

json::object parse_diag_json(const std::string& output);  // pgrt-diag --json's object

// How many backends hold a slot of the budget `key` (pg_locks), and whether each holds one slot
// below `slots`: "<held> <ok>".
std::string budget_slots_held_sql(const std::string& key, int slots) {
  return "SELECT count(*) || ' ' || (count(DISTINCT pid) = count(*) AND coalesce(max(objid::int8), "
         "-1) < " +
         std::to_string(slots) +
         ") FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
         "AND classid = (" +
         std::to_string(budget_lock_key(key)) + "::int8 & 4294967295)::oid";
}

// The last "served <n>" a budget-load probe printed, or -1.
long long last_served(const std::string& output) {
  const auto at = output.rfind("served ");
  return at == std::string::npos ? -1 : std::stoll(output.substr(at + 7));
}

// Four processes, each a pool of max 10 under load, share a budget of 12 (issue 14's acceptance):
// sampled every 10 ms, no more than 12 backends ever hold a slot and no more than 12 + 4 carry
// the app's tag; every process makes progress (fair shares: one that waits for a slot gets its
// split from the others); and after one is SIGKILLed, the others hold all 12 slots again within
// 1 s.
TEST_F(LifecycleProcessTest, FourProcessesShareABudgetOfTwelveAndTakeAKilledOnesSlotsAtOnce) {
  const std::string key = "four-processes";
  const std::string slots_sql = budget_slots_held_sql(key, 12);
  // Sampled from before the processes start: their first connects are the burst.
  std::atomic<bool> stop{false};
  std::atomic<int> most_slots{0};
  std::atomic<int> most_tagged{0};
  std::atomic<bool> slots_well_held{true};
  // Connected here, not on the sampler's thread: Child sets the environment before it forks, and
  // libpq reads it (getenv) while it connects.
  BlockingConnection observer(cluster().dsn());
  std::thread sampler([&] {
    while (!stop) {
      std::istringstream sample(observer.scalar(slots_sql));
      int held = 0;
      std::string well_held;
      sample >> held >> well_held;
      most_slots = std::max(most_slots.load(), held);
      if (well_held != "true" && held > 0) slots_well_held = false;
      most_tagged =
          std::max(most_tagged.load(),
                   std::stoi(observer.scalar("SELECT count(*) FROM pg_stat_activity WHERE "
                                             "application_name LIKE 'budget-four/%'")));
      std::this_thread::sleep_for(10ms);
    }
  });
  std::vector<std::unique_ptr<Child>> processes;
  for (int i = 0; i < 4; ++i) {
    processes.push_back(std::make_unique<Child>(
        std::vector<std::string>{PGRT_PROBE_PATH, "budget-load"}, cluster().dsn(), "budget-four",
        Child::Environment{{"PGRT_INSTANCE", "p" + std::to_string(i)},
                           {"PGRT_BUDGET_KEY", key},
                           {"PGRT_BUDGET_SLOTS", "12"},
                           {"PGRT_BUDGET_CHECK_MS", "200"}}));
  }
  for (auto& process : processes) {
    ASSERT_TRUE(process->wait_for_output("served", 60s)) << process->output();
  }
  auto served_by_all = [&] {
    long long total = 0;
    for (auto& process : processes) total += std::max(0LL, last_served(process->output()));
    return total;
  };
  const long long before = served_by_all();
  std::vector<long long> each_before;
  for (auto& process : processes) each_before.push_back(last_served(process->output()));
  std::this_thread::sleep_for(3s);
  EXPECT_GT(served_by_all(), before) << "no process made progress";
  // Fair shares: a process that found the budget full waits with its marker, and those holding
  // more than an even split give back the rest, so every one of them makes progress.
  for (std::size_t i = 0; i < processes.size(); ++i) {
    EXPECT_GT(last_served(processes[i]->output()), each_before[i])
        << "process " << i << " made no progress in 3 s";
  }
  // pgrt-diag budget lists the holders: the four processes' backends, one slot each.
  Child listing({PGRT_DIAG_PATH, "budget", "--key", key, "--slots", "12", "--json"},
                cluster().dsn(), "budget-four");
  ASSERT_EQ(listing.wait_for_exit(30s), 0) << listing.output();
  const auto listed = parse_diag_json(listing.output());
  EXPECT_EQ(listed.at("slots").as_int64(), 12);
  EXPECT_LE(listed.at("held").as_int64(), 12);
  EXPECT_GT(listed.at("held").as_int64(), 0);
  std::set<std::int64_t> slots_listed;
  for (const auto& holder : listed.at("holders").as_array()) {
    EXPECT_THAT(std::string(holder.at("tag").as_string()), ::testing::StartsWith("budget-four/p"));
    slots_listed.insert(holder.at("slot").as_int64());
  }
  EXPECT_EQ(slots_listed.size(), static_cast<std::size_t>(listed.at("held").as_int64()))
      << "a slot listed twice";
  EXPECT_EQ(listed.at("past_slots").as_int64(), 0);
  // Asked with a smaller size than the sharers use, it flags the slots held past it.
  const auto past_two = static_cast<std::int64_t>(
      std::count_if(slots_listed.begin(), slots_listed.end(), [](auto slot) { return slot >= 2; }));
  Child smaller({PGRT_DIAG_PATH, "budget", "--key", key, "--slots", "2"}, cluster().dsn(),
                "budget-four");
  ASSERT_EQ(smaller.wait_for_exit(30s), 0) << smaller.output();
  if (past_two > 0) {
    EXPECT_THAT(smaller.output(), HasSubstr("(past --slots)"));
    EXPECT_THAT(smaller.output(), HasSubstr("held past the budget's 2"));
  }

  // After the kill: all 12 slots held by the other three.
  BlockingConnection refill_observer(cluster().dsn());
  const std::string held_by_others =
      "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE "
      "l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = (" +
      std::to_string(budget_lock_key(key)) +
      "::int8 & 4294967295)::oid AND a.application_name NOT LIKE 'budget-four/p0/%'";
  processes[0]->signal(SIGKILL);
  const auto killed_at = std::chrono::steady_clock::now();
  const bool refilled =
      testing::eventually([&] { return refill_observer.scalar(held_by_others) == "12"; }, 5s);
  const auto refill_time = std::chrono::steady_clock::now() - killed_at;
  (void)processes[0]->wait_for_exit(10s);
  stop = true;
  sampler.join();
  EXPECT_TRUE(slots_well_held) << "a backend held two slots, or a slot beyond the budget";
  EXPECT_TRUE(refilled);
  EXPECT_LT(refill_time, 1s) << "the others took the killed process's slots too slowly";
  EXPECT_LE(most_slots, 12) << "more backends held a slot than the budget has";
  EXPECT_EQ(most_slots, 12) << "the load should have used the whole budget";
  EXPECT_LE(most_tagged, 12 + 4) << "more tagged backends than the budget and one probe each";
  for (std::size_t i = 1; i < processes.size(); ++i) processes[i]->signal(SIGKILL);
}

// The same with classes (PGRT_BUDGET_CLASSES=a:4,b:4, the last 4 of 12 shared): sampled every
// 10 ms, no backend ever holds a slot of the other class, each class holds at most its 4 plus the
// 4 shared, the whole budget at most 12, and every process makes progress.
TEST_F(LifecycleProcessTest, FourProcessesInTwoClassesKeepToTheirClassesSlots) {
  const std::string key = "four-classes";
  const std::string sample_sql =
      "SELECT count(*) FILTER (WHERE (l.objid::int8 < 4 AND a.application_name NOT LIKE "
      "'budget-classes/a%') OR (l.objid::int8 BETWEEN 4 AND 7 AND a.application_name NOT LIKE "
      "'budget-classes/b%')) || ' ' || count(*) FILTER (WHERE a.application_name LIKE "
      "'budget-classes/a%') || ' ' || count(*) FILTER (WHERE a.application_name LIKE "
      "'budget-classes/b%') || ' ' || count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
      "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = (" +
      std::to_string(budget_lock_key(key)) + "::int8 & 4294967295)::oid";
  std::atomic<bool> stop{false};
  std::atomic<int> wrong_class{0}, most_a{0}, most_b{0}, most_all{0};
  // Connected here, not on the sampler's thread: Child sets the environment before it forks, and
  // libpq reads it (getenv) while it connects.
  BlockingConnection observer(cluster().dsn());
  std::thread sampler([&] {
    while (!stop) {
      std::istringstream sample(observer.scalar(sample_sql));
      int wrong = 0, in_a = 0, in_b = 0, all = 0;
      sample >> wrong >> in_a >> in_b >> all;
      wrong_class = std::max(wrong_class.load(), wrong);
      most_a = std::max(most_a.load(), in_a);
      most_b = std::max(most_b.load(), in_b);
      most_all = std::max(most_all.load(), all);
      std::this_thread::sleep_for(10ms);
    }
  });
  std::vector<std::unique_ptr<Child>> processes;
  for (const char* instance : {"a0", "a1", "b0", "b1"}) {
    processes.push_back(std::make_unique<Child>(
        std::vector<std::string>{PGRT_PROBE_PATH, "budget-load"}, cluster().dsn(), "budget-classes",
        Child::Environment{{"PGRT_INSTANCE", instance},
                           {"PGRT_BUDGET_KEY", key},
                           {"PGRT_BUDGET_SLOTS", "12"},
                           {"PGRT_BUDGET_CLASSES", "a:4,b:4"},
                           {"PGRT_BUDGET_CLASS", std::string(1, instance[0])},
                           {"PGRT_BUDGET_CHECK_MS", "200"}}));
  }
  for (auto& process : processes) {
    ASSERT_TRUE(process->wait_for_output("served", 60s)) << process->output();
  }
  std::vector<long long> each_before;
  for (auto& process : processes) each_before.push_back(last_served(process->output()));
  std::this_thread::sleep_for(3s);
  for (std::size_t i = 0; i < processes.size(); ++i) {
    EXPECT_GT(last_served(processes[i]->output()), each_before[i])
        << "process " << i << " made no progress in 3 s";
  }
  stop = true;
  sampler.join();
  for (auto& process : processes) process->signal(SIGKILL);
  EXPECT_EQ(wrong_class, 0) << "a backend held a slot of the other class";
  EXPECT_LE(most_a, 8) << "class a held more than its 4 and the 4 shared";
  EXPECT_LE(most_b, 8) << "class b held more than its 4 and the 4 shared";
  EXPECT_LE(most_all, 12) << "more slots held than the budget has";
  EXPECT_GE(most_a, 4) << "class a never used its own slots";
  EXPECT_GE(most_b, 4) << "class b never used its own slots";
}

// Two demos (pool max 3 each) share a budget of 3 through PGRT_BUDGET_* in their environment:
// never more than 3 slots held, both serve (the one that starts second gets a fair share from the
// first), and both stop gracefully with every write stored. With classes (a:1, b:1, one shared),
// neither ever holds the other's slot.
void two_demos_share_a_budget_of_three(const std::string& dsn, bool with_classes) {
  const std::string key = with_classes ? "two-demos-classes" : "two-demos";
  const std::string slots_sql = budget_slots_held_sql(key, 3);
  // Slot 0 is class a's, slot 1 class b's: held by the other demo, it counts here.
  const std::string wrong_class_sql =
      "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.locktype = "
      "'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = (" +
      std::to_string(budget_lock_key(key)) +
      "::int8 & 4294967295)::oid AND ((l.objid::int8 = 0 AND a.application_name NOT LIKE "
      "'budget-demo-a/%') OR (l.objid::int8 = 1 AND a.application_name NOT LIKE "
      "'budget-demo-b/%'))";
  std::vector<std::unique_ptr<Child>> demos;
  for (const char* app : {"budget-demo-a", "budget-demo-b"}) {
    Child::Environment environment{
        {"PGRT_BUDGET_KEY", key}, {"PGRT_BUDGET_SLOTS", "3"}, {"PGRT_BUDGET_CHECK_MS", "200"}};
    if (with_classes) {
      environment.emplace_back("PGRT_BUDGET_CLASSES", "a:1,b:1");
      environment.emplace_back("PGRT_BUDGET_CLASS", std::string(1, app[12]));
    }
    demos.push_back(std::make_unique<Child>(
        std::vector<std::string>{PGRT_DEMO_PATH, "--json", "--workers", "20"}, dsn, app,
        environment));
  }
  std::atomic<bool> stop{false};
  std::atomic<int> most_slots{0};
  std::atomic<int> wrong_class{0};
  std::thread sampler([&] {
    BlockingConnection observer(dsn);
    while (!stop) {
      most_slots = std::max(most_slots.load(), std::stoi(observer.scalar(slots_sql)));
      if (with_classes) {
        wrong_class = std::max(wrong_class.load(), std::stoi(observer.scalar(wrong_class_sql)));
      }
      std::this_thread::sleep_for(10ms);
    }
  });
  for (auto& demo : demos) {
    EXPECT_TRUE(demo->wait_for_output("serving:", 60s)) << demo->output();
  }
  for (auto& demo : demos) {
    EXPECT_TRUE(demo->wait_for_output("requests/s", 10s)) << demo->output();
  }
  for (auto& demo : demos) demo->signal(SIGTERM);
  std::vector<std::optional<int>> exit_codes;
  for (auto& demo : demos) exit_codes.push_back(demo->wait_for_exit(60s));
  stop = true;
  sampler.join();
  for (std::size_t i = 0; i < demos.size(); ++i) {
    EXPECT_EQ(exit_codes[i], 0) << demos[i]->output();
    const std::string report = last_json_line(demos[i]->output());
    EXPECT_FALSE(report.empty()) << demos[i]->output();
    EXPECT_EQ(json_field(report, "writes_failed"), "0") << report;
    EXPECT_EQ(json_field(report, "writes_flushed"), json_field(report, "writes_accepted"))
        << report;
  }
  if (::testing::Test::HasFailure()) {
    for (auto& demo : demos) std::cerr << "---- demo output:\n" << demo->output() << "\n";
  }
  EXPECT_LE(most_slots, 3) << "more slots held than the budget has";
  EXPECT_EQ(wrong_class, 0) << "a demo held the other class's slot";
  EXPECT_GT(most_slots, 0) << "the demos should have held slots of the budget";
}

TEST_F(LifecycleProcessTest, TwoDemosShareABudgetOfThreeAndBothStopGracefully) {
  two_demos_share_a_budget_of_three(cluster().dsn(), false);
}

TEST_F(LifecycleProcessTest, TwoDemosInTwoClassesShareABudgetOfThreeAndBothStopGracefully) {
  two_demos_share_a_budget_of_three(cluster().dsn(), true);
}

TEST_F(LifecycleProcessTest, SigtermTwiceIsStillGraceful) {
  stop_demo_and_check_writes(true, "sigterm-twice");
}

// At-least-once made harmless: the connection is lost while the server commits a batch (a deferred
// trigger holds the COMMIT), so the flusher cannot know the batch was written and sends it again.
// The demo's writes are idempotent: the repeat inserts nothing twice and fails nothing.
TEST_F(LifecycleProcessTest, ABatchRepeatedAfterALostCommitIsNeitherDuplicatedNorFailed) {
  auto own = start_own_cluster();
  {
    BlockingConnection admin(own->dsn());
    // The demo's table (it creates it only if missing), and a trigger that sleeps once, at COMMIT,
    // when armed.
    admin.query(
        "CREATE TABLE demo_events (run text NOT NULL, seq bigint NOT NULL, payload text NOT NULL, "
        "written_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (run, seq))");
    admin.query("CREATE TABLE slow_commit (armed boolean NOT NULL)");
    admin.query("INSERT INTO slow_commit VALUES (false)");
    admin.query(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "UPDATE slow_commit SET armed = false WHERE armed; "
        "IF FOUND THEN PERFORM pg_sleep(3); END IF; RETURN NULL; END $$");
    admin.query(
        "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON demo_events DEFERRABLE INITIALLY "
        "DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()");
  }
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(own->port()));
  Child demo({PGRT_DEMO_PATH, "--json", "--workers", "20"},
             proxy.conninfo_prefix() + " user=postgres dbname=postgres", "lost-commit");
  ASSERT_TRUE(demo.wait_for_output("requests/s", 60s)) << demo.output();
  BlockingConnection observer(own->dsn());
  observer.query("UPDATE slow_commit SET armed = true");
  // The next batch's COMMIT sleeps in the trigger: it was sent, and its answer is not back yet.
  EXPECT_TRUE(testing::eventually(
      [&] {
        return observer.scalar(
                   "SELECT count(*) FROM pg_stat_activity WHERE wait_event = "
                   "'PgSleep' AND application_name LIKE 'lost-commit/%'") == "1";
      },
      10s))
      << demo.output();
  proxy.drop_all();  // the answer to that COMMIT is lost; the server still commits
  EXPECT_TRUE(demo.wait_for_output("failed with a transient error", 10s)) << demo.output();
  // The retried batch waits for the first one's rows, then skips them.
  EXPECT_TRUE(testing::eventually(
      [&] { return observer.scalar("SELECT bool_or(armed)::text FROM slow_commit") == "false"; },
      10s));
  std::this_thread::sleep_for(500ms);  // a few more batches after it
  demo.signal(SIGTERM);
  const auto code = demo.wait_for_exit(60s);
  const std::string output = demo.output();
  ASSERT_EQ(code, 0) << output;
  const std::string report = last_json_line(output);
  ASSERT_FALSE(report.empty()) << output;
  EXPECT_EQ(json_field(report, "writes_failed"), "0") << report;
  const long long accepted = std::stoll(json_field(report, "writes_accepted"));
  EXPECT_EQ(json_field(report, "writes_flushed"), std::to_string(accepted)) << report;
  const std::string where = " FROM demo_events WHERE run = '" + json_field(report, "run") + "'";
  EXPECT_EQ(observer.scalar("SELECT count(*)" + where), std::to_string(accepted));
  EXPECT_EQ(observer.scalar("SELECT count(DISTINCT seq)" + where), std::to_string(accepted));
  EXPECT_EQ(observer.scalar("SELECT max(seq)" + where), std::to_string(accepted));
}

// The demo's status sampler survives the loss of its own connection: it says so once, reconnects,
// and its status lines (with the backend count) go on.
TEST_F(LifecycleProcessTest, TheStatusSamplerReconnectsAfterItsConnectionIsLost) {
  Child demo({PGRT_DEMO_PATH, "--duration", "6"}, cluster().dsn(), "sampler");
  ASSERT_TRUE(demo.wait_for_output("requests/s", 60s)) << demo.output();
  BlockingConnection admin(cluster().dsn());
  // The observer carries the run's tag, like the pool's connections; its query tells it apart.
  EXPECT_EQ(admin.scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                         "WHERE application_name LIKE 'sampler/%' AND query LIKE "
                         "'SELECT count(*) FROM pg_stat_activity%'"),
            "1");
  ASSERT_TRUE(demo.wait_for_output("the status sampler reconnected", 10s)) << demo.output();
  const std::size_t reconnected = demo.output().find("the status sampler reconnected");
  EXPECT_TRUE(testing::eventually([&] {
    const std::string output = demo.output();
    const std::size_t start = output.find("requests/s", reconnected);
    if (start == std::string::npos) return false;
    const std::string line = output.substr(start, output.find('\n', start) - start);
    return line.find("| backends ") != std::string::npos &&
           line.find("backends ?") == std::string::npos;
  })) << demo.output();
  EXPECT_EQ(demo.wait_for_exit(60s), 0) << demo.output();
  const std::string output = demo.output();
  EXPECT_EQ(output.find("the status sampler stopped"), std::string::npos) << output;
  const std::size_t losses = occurrences(output, "lost its connection");
  EXPECT_EQ(losses, 1u) << output;
}

// An outage gives a bounded log: each kind of failed request is said once, then counted ("... and
// N more ..."), in whole lines.
TEST_F(LifecycleProcessTest, AnOutageGivesABoundedLog) {
  testing::TempCluster own;
  // An acquire timeout of 1 s instead of the demo's 5 s: the outage that outlasts it, and the run
  // around it, are 4.5 s shorter each.
  Child demo({PGRT_DEMO_PATH, "--duration", "8", "--workers", "100"}, own.dsn(), "outage",
             {{"PGRT_ACQUIRE_TIMEOUT_MS", "1000"}});
  ASSERT_TRUE(demo.wait_for_output("requests/s", 60s)) << demo.output();
  own.stop(testing::StopMode::immediate);
  std::this_thread::sleep_for(2500ms);  // past the pool's acquire timeout (1 s): every worker fails
  own.start();
  EXPECT_TRUE(demo.wait_for_exit(60s).has_value()) << demo.output();
  const std::string output = demo.output();
  const std::size_t said = occurrences(output, "request failed:");
  EXPECT_GE(said, 1U) << output;
  EXPECT_LE(said, 6U) << "one line per kind of error, not one per request\n" << output;
  EXPECT_THAT(output, ::testing::ContainsRegex("\\.\\.\\. and [0-9]+ more failed requests like it"))
      << output;
}

TEST_F(LifecycleProcessTest, SigintTwiceExitsAtOnceWith130) {
  Child demo({PGRT_DEMO_PATH, "--workers", "50"}, cluster().dsn(), "sigint-twice");
  ASSERT_TRUE(demo.wait_for_output("requests/s", 60s)) << demo.output();
  // The flush is held up by a lock, so the graceful shutdown cannot finish by itself.
  BlockingConnection locker(cluster().dsn());
  locker.query("BEGIN");
  locker.query("LOCK TABLE demo_events IN ACCESS EXCLUSIVE MODE");
  demo.signal(SIGINT);
  ASSERT_TRUE(demo.wait_for_output("stopping 'pending_writes'", 30s)) << demo.output();
  demo.signal(SIGINT);
  const auto sent = Clock::now();
  EXPECT_EQ(demo.wait_for_exit(10s), 130) << demo.output();
  EXPECT_LT(Clock::now() - sent, 3s);
  EXPECT_THAT(demo.output(), HasSubstr("a second SIGINT"));
}

TEST_F(LifecycleProcessTest, AStopThatHangsIsEndedByTheWatchdogAtTheHardDeadline) {
  Child probe({PGRT_PROBE_PATH, "hang-in-stop"}, cluster().dsn(), "hang-probe");
  ASSERT_TRUE(probe.wait_for_output("blocking in stop()", 60s)) << probe.output();
  const auto stopping = Clock::now();
  EXPECT_EQ(probe.wait_for_exit(20s), 2) << probe.output();
  const auto took = Clock::now() - stopping;
  EXPECT_LT(took, 6s) << "hard deadline 2 s";
  EXPECT_THAT(probe.output(), HasSubstr("hard deadline"));
}

TEST_F(LifecycleProcessTest, StdExitFromAWorkerRunsTheExitHandlerAndLeavesNoBackend) {
  Child probe({PGRT_PROBE_PATH, "exit-from-worker"}, cluster().dsn(), "exit-probe");
  EXPECT_EQ(probe.wait_for_exit(60s), 3) << probe.status() << "\n" << probe.output();
  const std::string output = probe.output();
  EXPECT_THAT(output, HasSubstr("calling std::exit(3) with 2 leases out"));
  EXPECT_THAT(output, HasSubstr("running 1 exit handler(s)"));
  EXPECT_THAT(output, HasSubstr("closed at exit"));
  // Without the handler the backend in pg_sleep(30) would stay for 30 s: the server notices a
  // vanished client only when the statement ends. The handler cancels it.
  EXPECT_TRUE(testing::eventually([] { return backends_of("exit-probe") == 0; }, 5s))
      << backends_of("exit-probe") << " backends left";
}

// pending_writes.hpp promises "No write is dropped silently: each accepted write ends up
// flushed, or counted in PendingWritesReport::failed, logged and reported", and lifecycle.md
// handles an exit without a graceful stop ("std::exit called from a worker") with the atexit
// handlers and a flush of the logs. A service whose worker calls std::exit(0) with 5 writes
// accepted by its PendingWrites (a lifecycle component, as the docs wire it) loses them, but not
// without a line: at exit, pgrt says how many accepted writes were not written.
TEST_F(LifecycleProcessTest, StdExitWithAcceptedPendingWritesSaysTheyWereNotWritten) {
  Child probe({PGRT_PROBE_PATH, "exit-with-pending-writes"}, cluster().dsn(), "exit-writes-probe");
  (void)probe.wait_for_exit(60s);
  const std::string output = probe.output();
  ASSERT_THAT(output, HasSubstr("calling std::exit(0) with 5 accepted writes pending")) << output;
  // Some line of pgrt's about these writes at the exit (their count, that they were not written).
  EXPECT_THAT(output, HasSubstr("pgrt pending writes probe_writes")) << output;
  EXPECT_THAT(output, ::testing::ContainsRegex("5 accepted writes.*not written|not written.*5"))
      << output;
}

// ------------------------------------------------------------------------------ start-up hygiene

std::set<int> parse_pids(const std::string& output) {
  // "holding <tag> pids 1,2,3"
  std::set<int> pids;
  const std::regex pattern("holding \\S+ pids ([0-9]+),([0-9]+),([0-9]+)");
  std::smatch match;
  if (std::regex_search(output, match, pattern)) {
    for (int i = 1; i <= 3; ++i) pids.insert(std::stoi(match[i]));
  }
  return pids;
}

class StartupHygieneTest : public testing::DbTest {
 protected:
  // Starts and stops a StartupHygiene; returns what its cleanup did.
  static CleanupReport run_hygiene(const PoolConfig& config, const StartupHygieneOptions& options) {
    CleanupReport report;
    run_coroutine([&]() -> asio::awaitable<void> {
      StartupHygiene hygiene(co_await asio::this_coro::executor, config, options);
      co_await hygiene.start();
      report = hygiene.cleanup_report();
      co_await hygiene.stop();
    });
    return report;
  }

  // A pool of max 3 for `app`/one, and hygiene options that take the cluster-wide lock without
  // the instance lock (as if each instance ran on a host of its own).
  static std::pair<PoolConfig, StartupHygieneOptions> cluster_lock_setup(const std::string& app) {
    PoolConfig config;
    config.conninfo = cluster().dsn();
    config.application = app;
    config.instance = "one";
    config.max_size = 3;
    StartupHygieneOptions options;
    options.instance_lock = false;
    options.cluster_lock = true;
    return {config, options};
  }

  static std::set<int> backend_pids(const std::string& like) {
    BlockingConnection observer(cluster().dsn());
    std::set<int> pids;
    for (const auto& row : observer.query(
             "SELECT pid FROM pg_stat_activity WHERE application_name LIKE '" + like + "'")) {
      pids.insert(std::stoi(*row[0]));
    }
    return pids;
  }

  // A predecessor that held 3 connections of app/instance through a proxy that keeps the server
  // side open, then was SIGKILLed: the server still shows its 3 backends. Returns their pids.
  std::set<int> crashed_predecessor(testing::FaultProxy& proxy, const std::string& app,
                                    const std::string& instance) {
    proxy.keep_upstream(true);
    Child predecessor({PGRT_PROBE_PATH, "hold-connections"},
                      proxy.conninfo_prefix() + " user=postgres dbname=postgres", app,
                      {{"PGRT_INSTANCE", instance}});
    EXPECT_TRUE(predecessor.wait_for_output("holding", 60s)) << predecessor.output();
    const std::set<int> pids = parse_pids(predecessor.output());
    EXPECT_EQ(pids.size(), 3U) << predecessor.output();
    predecessor.signal(SIGKILL);
    (void)predecessor.wait_for_exit(10s);
    std::this_thread::sleep_for(200ms);
    EXPECT_EQ(backend_pids(app + "/" + instance + "/%"), pids)
        << "the proxy should keep the predecessor's backends on the server";
    return pids;
  }
};

TEST_F(StartupHygieneTest, PooledConnectionsCarryTheSessionGuards) {
  PoolConfig config;
  config.conninfo = cluster().dsn();
  config.application = "guards";
  run_coroutine([&]() -> asio::awaitable<void> {
    Pool pool(co_await asio::this_coro::executor, config);
    auto lease = co_await pool.acquire();
    auto rows = co_await lease->query(
        "SELECT current_setting('idle_in_transaction_session_timeout'), "
        "current_setting('client_connection_check_interval')");
    EXPECT_EQ(rows[0].get<std::string>(0), "5min");
    EXPECT_EQ(rows[0].get<std::string>(1), "10s");
  });
  config.guards.idle_in_transaction_timeout = 0ms;
  config.guards.client_connection_check_interval = 0ms;
  run_coroutine([&]() -> asio::awaitable<void> {
    Pool pool(co_await asio::this_coro::executor, config);
    auto lease = co_await pool.acquire();
    auto rows = co_await lease->query(
        "SELECT current_setting('idle_in_transaction_session_timeout'), "
        "current_setting('client_connection_check_interval')");
    EXPECT_EQ(rows[0].get<std::string>(0), "0");
    EXPECT_EQ(rows[0].get<std::string>(1), "0");
  });
}

TEST_F(StartupHygieneTest, ItsConnectOptionsCarryThePoolsSessionGuardsAndTag) {
  PoolConfig config;
  config.conninfo = cluster().dsn();
  config.application = "guards";
  config.instance = "one";
  config.guards.idle_in_transaction_timeout = 7s;
  config.guards.client_connection_check_interval = 3s;
  const StartupHygieneOptions options;  // named: g++ 12 miscompiles temporaries beside co_await
  run_coroutine([&]() -> asio::awaitable<void> {
    StartupHygiene hygiene(co_await asio::this_coro::executor, config, options);
    auto connection = co_await Connection::connect(hygiene.connect_options());
    auto rows = co_await connection.query(
        "SELECT current_setting('idle_in_transaction_session_timeout'), "
        "current_setting('client_connection_check_interval'), "
        "current_setting('application_name')");
    EXPECT_EQ(rows[0].get<std::string>(0), "7s");
    EXPECT_EQ(rows[0].get<std::string>(1), "3s");
    EXPECT_EQ(rows[0].get<std::string>(2), make_connection_tag("guards", "one"));
    EXPECT_TRUE(hygiene.connect_options().keepalives.has_value());
    EXPECT_EQ(hygiene.connect_options().tcp_user_timeout, config.guards.tcp_user_timeout);
  });
}

TEST_F(StartupHygieneTest, ACrashedPredecessorsLeftoversAreTerminatedAndNothingElse) {
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  const std::set<int> leftovers = crashed_predecessor(proxy, "hyg", "one");
  // A sibling instance of the same app, and a foreign application, both alive.
  Child sibling({PGRT_PROBE_PATH, "hold-connections"}, cluster().dsn(), "hyg",
                {{"PGRT_INSTANCE", "two"}});
  ASSERT_TRUE(sibling.wait_for_output("holding", 60s)) << sibling.output();
  const std::set<int> sibling_pids = parse_pids(sibling.output());
  BlockingConnection foreign(cluster().dsn() + " application_name=hyg-foreign");

  PoolConfig config;
  config.conninfo = cluster().dsn();
  config.application = "hyg";
  config.instance = "one";
  StartupHygieneOptions options;
  options.lock_directory = Child::runtime_directory();
  const CleanupReport report = run_hygiene(config, options);
  std::set<int> terminated;
  bool saw_idle_in_transaction = false;
  for (const auto& backend : report.backends) {
    if (backend.terminated) terminated.insert(backend.pid);
    saw_idle_in_transaction |= backend.state == "idle in transaction";
    EXPECT_THAT(backend.reason, HasSubstr("an earlier incarnation of hyg/one"));
  }
  EXPECT_EQ(terminated, leftovers);
  EXPECT_TRUE(saw_idle_in_transaction);
  EXPECT_FALSE(report.permission_denied);
  EXPECT_TRUE(testing::eventually([] { return backend_pids("hyg/one/%").empty(); }));
  EXPECT_EQ(backend_pids("hyg/two/%"), sibling_pids);
  EXPECT_EQ(foreign.scalar("SELECT 1"), "1");
}

TEST_F(StartupHygieneTest, ASecondInstanceIsRefusedNamingTheFirstAndForceTakesOver) {
  const std::string dsn = cluster().dsn();
  Child first({PGRT_PROBE_PATH, "singleton"}, dsn, "dup", {{"PGRT_INSTANCE", "solo"}});
  ASSERT_TRUE(first.wait_for_output("probe: ready", 60s)) << first.output();

  Child second({PGRT_PROBE_PATH, "singleton"}, dsn, "dup", {{"PGRT_INSTANCE", "solo"}});
  EXPECT_EQ(second.wait_for_exit(60s), 1) << second.status() << "\n" << second.output();
  EXPECT_THAT(second.output(),
              HasSubstr("another dup/solo is running as pid " + std::to_string(first.pid())));

  Child third({PGRT_PROBE_PATH, "singleton"}, dsn, "dup",
              {{"PGRT_INSTANCE", "solo"}, {"PGRT_FORCE", "1"}});
  EXPECT_EQ(first.wait_for_exit(60s), 0) << "stopped gracefully by SIGTERM\n" << first.output();
  EXPECT_THAT(first.output(), HasSubstr("SIGTERM: shutting down gracefully"));
  ASSERT_TRUE(third.wait_for_output("probe: ready", 60s)) << third.output();
  EXPECT_THAT(third.output(), HasSubstr("took over"));
  third.signal(SIGTERM);
  EXPECT_EQ(third.wait_for_exit(60s), 0) << third.output();
}

// systemd-tmpfiles (or an operator) removes the lock directory of a running service: a second
// start is still refused, by the running one's guard (an abstract unix socket: nothing in the
// file system removes it), with exit code 1 and a message saying the lock file was removed. The
// first runs on untouched.
TEST_F(StartupHygieneTest, ALockDirectoryRemovedUnderARunningServiceDoesNotLetASecondOneStart) {
  const std::string dsn = cluster().dsn();
  const auto directory = Child::runtime_directory() / "cleaned-by-tmpfiles";
  const Child::Environment environment{{"PGRT_INSTANCE", "solo"},
                                       {"PGRT_RUNTIME_DIR", directory.string()}};
  Child first({PGRT_PROBE_PATH, "singleton"}, dsn, "rmlock", environment);
  ASSERT_TRUE(first.wait_for_output("probe: ready", 60s)) << first.output();
  std::filesystem::remove_all(directory);

  Child second({PGRT_PROBE_PATH, "singleton"}, dsn, "rmlock", environment);
  EXPECT_EQ(second.wait_for_exit(60s), 1) << second.status() << "\n" << second.output();
  EXPECT_THAT(second.output(),
              HasSubstr("the lock file " + (directory / "rmlock.solo.lock").string() +
                        " was removed while another rmlock/solo still holds the instance lock"));
  EXPECT_EQ(::kill(first.pid(), 0), 0) << "the first did not run on\n" << first.output();
  first.signal(SIGTERM);
  EXPECT_EQ(first.wait_for_exit(60s), 0) << first.output();
}

TEST_F(StartupHygieneTest, TheDemoRestartedAfterACrashTerminatesItsPredecessorsLeftovers) {
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  proxy.keep_upstream(true);
  std::set<int> leftovers;
  {
    Child crashed({PGRT_DEMO_PATH, "--workers", "20"},
                  proxy.conninfo_prefix() + " user=postgres dbname=postgres", "demo-crash",
                  {{"PGRT_INSTANCE", "x"}});
    ASSERT_TRUE(crashed.wait_for_output("requests/s", 60s)) << crashed.output();
    crashed.signal(SIGKILL);
    (void)crashed.wait_for_exit(10s);
    std::this_thread::sleep_for(200ms);
    leftovers = backend_pids("demo-crash/x/%");
  }
  ASSERT_FALSE(leftovers.empty()) << "the proxy should keep the crashed demo's backends";
  Child restarted({PGRT_DEMO_PATH, "--duration", "1", "--workers", "20"}, cluster().dsn(),
                  "demo-crash", {{"PGRT_INSTANCE", "x"}});
  EXPECT_EQ(restarted.wait_for_exit(60s), 0) << restarted.output();
  const std::string output = restarted.output();
  for (int pid : leftovers) {
    EXPECT_THAT(output, HasSubstr("terminated backend " + std::to_string(pid) + " (demo-crash/x/"));
  }
  EXPECT_TRUE(testing::eventually([] { return backend_pids("demo-crash/x/%").empty(); }));
}

// The instance lock's directory depends on the environment (PGRT_RUNTIME_DIR, XDG_RUNTIME_DIR):
// the same service started from a systemd unit and from a shell takes two lock files. The second
// must neither take the first's connections for an earlier incarnation's nor run beside it.
TEST_F(StartupHygieneTest, ALiveInstanceWhoseLockIsInAnotherDirectoryIsNeitherTerminatedNorJoined) {
  Child live({PGRT_PROBE_PATH, "hold-connections"}, cluster().dsn(), "twin",
             {{"PGRT_INSTANCE", "one"}});
  ASSERT_TRUE(live.wait_for_output("holding", 60s)) << live.output();
  const std::set<int> live_pids = parse_pids(live.output());
  const std::regex tag_pattern("holding twin/one/([0-9a-f]{8}) ");
  std::smatch match;
  const std::string live_output = live.output();
  ASSERT_TRUE(std::regex_search(live_output, match, tag_pattern)) << live_output;
  const std::string live_incarnation = match[1];
  EXPECT_EQ(incarnation_on_this_host(live_incarnation), HostPresence::running);

  Child second({PGRT_PROBE_PATH, "singleton"}, cluster().dsn(), "twin",
               {{"PGRT_INSTANCE", "one"},
                {"PGRT_RUNTIME_DIR", (Child::runtime_directory() / "from-a-shell").string()}});
  EXPECT_EQ(second.wait_for_exit(60s), 1) << second.status() << "\n" << second.output();
  EXPECT_THAT(second.output(), HasSubstr("another twin/one is running on this host (twin/one/" +
                                         live_incarnation + ")"));
  EXPECT_THAT(second.output(), Not(HasSubstr("terminated backend")));
  // (The live one's: the second's own connection may not have ended on the server yet.)
  EXPECT_EQ(backend_pids("twin/one/" + live_incarnation), live_pids);

  // Once it is gone, its connections are a dead incarnation's: terminated at the next start.
  live.signal(SIGKILL);
  (void)live.wait_for_exit(10s);
  EXPECT_TRUE(testing::eventually(
      [&] { return incarnation_on_this_host(live_incarnation) == HostPresence::not_running; }));
  PoolConfig config;
  config.conninfo = cluster().dsn();
  config.application = "twin";
  config.instance = "one";
  StartupHygieneOptions options;
  options.lock_directory = Child::runtime_directory() / "from-a-shell";
  const CleanupReport report = run_hygiene(config, options);
  EXPECT_TRUE(report.running_duplicates.empty());
  EXPECT_TRUE(testing::eventually([] { return backend_pids("twin/one/%").empty(); }));
}

// A child process whose socket(AF_UNIX, ...) fails with EAFNOSUPPORT, as under systemd's
// RestrictAddressFamilies=AF_INET AF_INET6 (a seccomp filter; the hardening operations.md names):
// `argv` with `environment` added to this process's, its output in a file, killed at the end.
class SandboxedChild {
 public:
  SandboxedChild(std::vector<std::string> argv, const std::vector<std::string>& environment)
      : output_(std::filesystem::temp_directory_path() /
                ("pgrt-process-test-" + std::to_string(::getpid()) + "-sandboxed.out")) {
    // Everything the child needs is made before the fork.
    std::vector<char*> arguments;
    for (auto& argument : argv) arguments.push_back(argument.data());
    arguments.push_back(nullptr);
    std::vector<std::string> variables;
    for (char** variable = environ; *variable != nullptr; ++variable) {
      variables.emplace_back(*variable);
    }
    variables.insert(variables.end(), environment.begin(), environment.end());
    std::vector<char*> envp;
    for (auto& variable : variables) envp.push_back(variable.data());
    envp.push_back(nullptr);
    // socket(AF_UNIX, ...) -> EAFNOSUPPORT; everything else allowed (x86-64).
    constexpr auto load = static_cast<std::uint16_t>(BPF_LD | BPF_W | BPF_ABS);
    constexpr auto equals = static_cast<std::uint16_t>(BPF_JMP | BPF_JEQ | BPF_K);
    constexpr auto give = static_cast<std::uint16_t>(BPF_RET | BPF_K);
    std::array<sock_filter, 9> filter{{
        {load, 0, 0, static_cast<std::uint32_t>(offsetof(seccomp_data, arch))},
        {equals, 1, 0, AUDIT_ARCH_X86_64},
        {give, 0, 0, SECCOMP_RET_ALLOW},
        {load, 0, 0, static_cast<std::uint32_t>(offsetof(seccomp_data, nr))},
        {equals, 0, 3, static_cast<std::uint32_t>(__NR_socket)},
        {load, 0, 0, static_cast<std::uint32_t>(offsetof(seccomp_data, args))},
        {equals, 0, 1, static_cast<std::uint32_t>(AF_UNIX)},
        {give, 0, 0, SECCOMP_RET_ERRNO | static_cast<std::uint32_t>(EAFNOSUPPORT)},
        {give, 0, 0, SECCOMP_RET_ALLOW},
    }};
    const sock_fprog program{static_cast<unsigned short>(filter.size()), filter.data()};
    const int fd = ::open(output_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    const pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ == 0) {
      (void)::setsid();
      (void)::prctl(PR_SET_PDEATHSIG, static_cast<unsigned long>(SIGKILL));
      if (::getppid() != parent) ::_exit(126);
      (void)::dup2(fd, STDOUT_FILENO);
      (void)::dup2(fd, STDERR_FILENO);
      if (::prctl(PR_SET_NO_NEW_PRIVS, 1UL, 0UL, 0UL, 0UL) != 0 ||
          ::prctl(PR_SET_SECCOMP, static_cast<unsigned long>(SECCOMP_MODE_FILTER), &program) != 0) {
        ::_exit(125);
      }
      ::execve(arguments[0], arguments.data(), envp.data());
      ::_exit(127);
    }
    ::close(fd);
  }
  SandboxedChild(const SandboxedChild&) = delete;
  SandboxedChild& operator=(const SandboxedChild&) = delete;
  SandboxedChild(SandboxedChild&&) = delete;
  SandboxedChild& operator=(SandboxedChild&&) = delete;
  ~SandboxedChild() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      (void)testing::detail::wait_for_exit(pid_, Clock::now() + 10s);
    }
    std::filesystem::remove(output_);
  }

  [[nodiscard]] std::string output() const { return file_text(output_); }

  bool wait_for_output(const std::string& text, std::chrono::seconds limit) const {
    return wait_for_text(output_, text, limit);
  }

 private:
  std::filesystem::path output_;
  pid_t pid_ = -1;
};

// operations.md's own example of two lock directories: the service run by a systemd unit and the
// same service started from an SSH session. When the unit is hardened with
// RestrictAddressFamilies=AF_INET AF_INET6, its process cannot announce its incarnation (no unix
// socket) and takes an unannounced one (starting with 'f'); the process started from the shell
// answers "cannot tell" for it (HostPresence::unknown), so it may refuse to start but never
// terminates the live service's connections.
TEST_F(StartupHygieneTest, ALiveInstanceThatCannotAnnounceItselfIsNeverTerminated) {
  const std::string tcp_dsn =
      "host=127.0.0.1 port=" + std::to_string(cluster().port()) + " user=postgres dbname=postgres";
  SandboxedChild live(
      {PGRT_PROBE_PATH, "hold-connections"},
      {"DATABASE_URL=" + tcp_dsn, "PGRT_APP=sandbox", "PGRT_INSTANCE=one",
       "PGRT_RUNTIME_DIR=" + (Child::runtime_directory() / "systemd-unit").string()});
  ASSERT_TRUE(live.wait_for_output("holding", 60s)) << live.output();
  const std::set<int> live_pids = parse_pids(live.output());
  ASSERT_EQ(live_pids.size(), 3U) << live.output();

  PoolConfig config;
  config.conninfo = cluster().dsn();
  config.application = "sandbox";
  config.instance = "one";
  StartupHygieneOptions options;
  options.lock_directory = Child::runtime_directory() / "from-a-shell";
  CleanupReport report;
  std::string refusal;
  run_coroutine([&]() -> asio::awaitable<void> {
    StartupHygiene hygiene(co_await asio::this_coro::executor, config, options);
    try {
      co_await hygiene.start();
    } catch (const Error& error) {
      refusal = error.what();  // refusing to start beside it is fine; terminating it is not
    }
    report = hygiene.cleanup_report();
    co_await hygiene.stop();
  });
  for (const auto& backend : report.backends) {
    EXPECT_FALSE(backend.terminated) << "terminated the live service's backend " << backend.pid
                                     << " (" << backend.application_name << ")";
  }
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(backend_pids("sandbox/one/%"), live_pids) << refusal << "\n" << live.output();
}

// Another user's socket under an incarnation's name (abstract names have no permissions) is a
// squatter, or the same service run as another user: it must not make the start refuse as if a
// duplicate of this user ran, and its backends are not terminated unless the instance lock saw
// that incarnation end (left alone, with a warning naming them).
TEST_F(StartupHygieneTest, AnotherUsersSocketUnderAnIncarnationsNameNeitherBlocksNorIsTerminated) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root, to bind the name as another user";
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  const std::set<int> leftovers = crashed_predecessor(proxy, "squat", "one");
  BlockingConnection observer(cluster().dsn());
  const std::string tag = observer.scalar(
      "SELECT min(application_name) FROM pg_stat_activity WHERE application_name LIKE "
      "'squat/one/%'");
  ASSERT_EQ(tag.size(), std::string("squat/one/").size() + 8) << tag;
  const std::string incarnation = tag.substr(tag.size() - 8);
  const pid_t squatter = test::squat_incarnation_name(incarnation);
  ASSERT_GT(squatter, 0);
  EXPECT_EQ(incarnation_on_this_host(incarnation), HostPresence::other_user);

  PoolConfig config;
  config.conninfo = cluster().dsn();
  config.application = "squat";
  config.instance = "one";
  StartupHygieneOptions options;
  options.lock_directory = Child::runtime_directory() / "squat";  // not the predecessor's
  const CleanupReport report = run_hygiene(config, options);      // started: no refusal
  ::kill(squatter, SIGKILL);
  ::waitpid(squatter, nullptr, 0);
  EXPECT_TRUE(report.running_duplicates.empty());
  EXPECT_EQ(report.unverified_incarnations, std::vector<std::string>{incarnation});
  EXPECT_THAT(report.warning, HasSubstr("another user's process holds the name"));
  for (const auto& backend : report.backends) EXPECT_FALSE(backend.terminated) << backend.pid;
  // (The predecessor's only: the cleanup's own connection may not have ended on the server yet.)
  EXPECT_EQ(backend_pids("squat/one/" + incarnation), leftovers);
  // Once the name is free, the incarnation is dead as far as this host can tell: terminated.
  const CleanupReport again = run_hygiene(config, options);
  std::set<int> terminated;
  for (const auto& backend : again.backends) {
    if (backend.terminated) terminated.insert(backend.pid);
  }
  EXPECT_EQ(terminated, leftovers);
}

// A pid listed a moment ago may be another backend's by the time it is terminated: the
// cleanup, the cluster-wide lock and pgrt-diag terminate only the backend they listed.
TEST_F(StartupHygieneTest, ABackendIsTerminatedOnlyIfItIsStillTheOneThatWasListed) {
  BlockingConnection victim(cluster().dsn() + " application_name=reuse/one/0000abcd");
  const int pid = victim.backend_pid();
  run_coroutine([&]() -> asio::awaitable<void> {
    ConnectOptions options;
    options.conninfo = cluster().dsn();
    auto connection = co_await Connection::connect(options);
    const auto backends = co_await list_app_backends(connection, "reuse");
    EXPECT_EQ(backends.size(), 1U);
    if (backends.size() != 1) co_return;
    const AppBackend listed = backends[0];
    EXPECT_EQ(listed.pid, pid);
    // Another backend with the same pid: another start, or another name.
    EXPECT_FALSE(co_await terminate_backend_if_unchanged(connection, pid, listed.application_name,
                                                         "2000-01-01 00:00:00+00"));
    EXPECT_FALSE(co_await terminate_backend_if_unchanged(connection, pid, "reuse/one/0000abce",
                                                         listed.backend_start));
    EXPECT_TRUE(testing::backend_exists(cluster().dsn(), pid));
    EXPECT_TRUE(co_await terminate_backend_if_unchanged(connection, pid, listed.application_name,
                                                        listed.backend_start, 5s));
    EXPECT_FALSE(testing::backend_exists(cluster().dsn(), pid));
  });
}

TEST_F(StartupHygieneTest, TheIdleRuleAlsoEndsThisAppsLongIdleBackendsButNoOneElses) {
  BlockingConnection other_instance(cluster().dsn() + " application_name=idler/two/0badcafe");
  BlockingConnection foreign(cluster().dsn() + " application_name=idler-foreign");
  const int other_pid = other_instance.backend_pid();
  std::this_thread::sleep_for(1500ms);
  PoolConfig config;
  config.conninfo = cluster().dsn();
  config.application = "idler";
  config.instance = "one";
  StartupHygieneOptions options;
  options.lock_directory = Child::runtime_directory();
  options.idle_threshold = std::chrono::seconds(1);
  const CleanupReport report = run_hygiene(config, options);
  ASSERT_EQ(report.backends.size(), 1U);
  EXPECT_EQ(report.backends[0].pid, other_pid);
  EXPECT_THAT(report.backends[0].reason, ::testing::StartsWith("idle for "));
  EXPECT_TRUE(report.backends[0].terminated);
  EXPECT_EQ(foreign.scalar("SELECT 1"), "1");
}

TEST_F(StartupHygieneTest, TheIdleRuleNeverEndsALiveInstancesClusterLockSession) {
  // A live instance holds the cluster-wide lock on a session that stays idle while it runs.
  PoolConfig holder_config;
  holder_config.conninfo = cluster().dsn();
  holder_config.application = "idlelock";
  holder_config.instance = "one";
  StartupHygieneOptions holder_options;
  holder_options.instance_lock = false;  // as if on another host
  holder_options.cluster_lock = true;
  PoolConfig other_config = holder_config;
  other_config.instance = "two";
  StartupHygieneOptions other_options;
  other_options.lock_directory = Child::runtime_directory();
  other_options.idle_threshold = std::chrono::seconds(1);
  CleanupReport report;
  std::set<int> lock_sessions;
  std::set<int> after_cleanup;
  std::set<int> after_diag;
  std::string diag_output;
  std::optional<int> diag_exit;
  run_coroutine(
      [&]() -> asio::awaitable<void> {
        StartupHygiene holder(co_await asio::this_coro::executor, holder_config, holder_options);
        co_await holder.start();
        lock_sessions = backend_pids("idlelock/one/%");
        std::this_thread::sleep_for(1500ms);  // the lock session idles past the threshold
        // Another instance's start-up cleanup with the idle rule at 1 s...
        StartupHygiene other(co_await asio::this_coro::executor, other_config, other_options);
        co_await other.start();
        report = other.cleanup_report();
        co_await other.stop();
        after_cleanup = backend_pids("idlelock/one/%");
        // ... and pgrt-diag --kill-leaked with the same rule leave the lock session alone.
        Child diag({PGRT_DIAG_PATH, "--app", "idlelock", "--idle-threshold", "1", "--kill-leaked"},
                   cluster().dsn(), "idlelock");
        diag_exit = diag.wait_for_exit(30s);
        diag_output = diag.output();
        after_diag = backend_pids("idlelock/one/%");
        co_await holder.stop();
      },
      90s);
  ASSERT_EQ(lock_sessions.size(), 1U) << "the holder's cluster-wide lock session";
  EXPECT_TRUE(report.backends.empty()) << "the idle rule took a live instance's lock session";
  EXPECT_EQ(after_cleanup, lock_sessions);
  EXPECT_EQ(diag_exit, 0) << diag_output;
  EXPECT_EQ(after_diag, lock_sessions) << "pgrt-diag --kill-leaked took it\n" << diag_output;
  EXPECT_TRUE(testing::eventually([] { return backend_pids("idlelock/one/%").empty(); }))
      << "the lock session ends with the holder's stop";
}

TEST_F(StartupHygieneTest, WithoutAnyLockTheCleanupIsSkippedWithAWarning) {
  BlockingConnection other_incarnation(cluster().dsn() + " application_name=nolock/one/0badcafe");
  const int other_pid = other_incarnation.backend_pid();
  PoolConfig config;
  config.conninfo = cluster().dsn();
  config.application = "nolock";
  config.instance = "one";
  StartupHygieneOptions options;
  options.instance_lock = false;
  options.cluster_lock = false;
  const CleanupReport report = run_hygiene(config, options);
  EXPECT_TRUE(report.skipped);
  EXPECT_TRUE(report.backends.empty());
  EXPECT_THAT(report.warning, HasSubstr("cleanup skipped: no instance lock is held"));
  EXPECT_THAT(report.warning, HasSubstr("nolock/one/"));
  EXPECT_EQ(other_incarnation.scalar("SELECT 1"), "1");
  EXPECT_TRUE(testing::backend_exists(cluster().dsn(), other_pid));
  // With the instance lock, the same backend is an earlier incarnation's and goes.
  options.instance_lock = true;
  options.lock_directory = Child::runtime_directory();
  const CleanupReport locked = run_hygiene(config, options);
  EXPECT_FALSE(locked.skipped);
  ASSERT_EQ(locked.backends.size(), 1U);
  EXPECT_EQ(locked.backends[0].pid, other_pid);
  EXPECT_TRUE(locked.backends[0].terminated);
}

TEST_F(StartupHygieneTest, TheClusterWideLockRefusesASecondInstanceNamingTheHolder) {
  auto [config, options] = cluster_lock_setup("cluster");
  run_coroutine([&]() -> asio::awaitable<void> {
    StartupHygiene first(co_await asio::this_coro::executor, config, options);
    co_await first.start();
    StartupHygiene second(co_await asio::this_coro::executor, config, options);
    try {
      co_await second.start();
      ADD_FAILURE() << "a second holder of the cluster-wide lock";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::instance_locked);
      EXPECT_THAT(error.what(), HasSubstr("holds the cluster-wide instance lock: backend"));
      EXPECT_THAT(error.what(), HasSubstr("cluster/one/"));
    }
    co_await first.stop();  // the session ends: the lock is free again
    StartupHygiene third(co_await asio::this_coro::executor, config, options);
    co_await third.start();
    co_await third.stop();
  });
  // The lock's connection is counted against the pool's max.
  lifecycle::Manager app({.handle_signals = false, .shutdown_logging = false});
  PoolConfig counted = config;
  (void)add_startup_hygiene(app, counted, options);
  EXPECT_EQ(counted.max_size, 2U);
}

// The cluster-wide lock is kept while the process runs: a lock session that ends (a failover, an
// administrator) is replaced at once, and a lock taken by another instance meanwhile stops this
// one, which is no longer the instance, instead of running on beside it.
TEST_F(StartupHygieneTest, ALostClusterLockIsRetakenAndOneTakenByAnotherInstanceStopsTheService) {
  const std::string key_sql = "hashtextextended('pgrt instance keeplock/one/', 0)";
  auto lock_holder = [] {  // pid and application_name of the lock's holder, if any
    BlockingConnection observer(cluster().dsn());
    auto rows = observer.query(
        "SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name LIKE 'keeplock/%'");
    return rows.size() == 1 ? std::pair{std::stoi(*rows[0][0]), *rows[0][1]}
                            : std::pair{0, std::string()};
  };
  std::ostringstream log;
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(std::make_shared<spdlog::logger>(
      "capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(log)));
  lifecycle::Manager app({.threads = 2, .handle_signals = false, .shutdown_logging = false});
  auto [config, options] = cluster_lock_setup("keeplock");
  options.cluster_lock_check_interval = 500ms;
  auto& hygiene = add_startup_hygiene(app, config, options);
  (void)add_pool(app, config, {}, lifecycle::after(hygiene));
  std::atomic<bool> ready = false;
  app.on_ready([&] { ready = true; });
  const std::string own_tag = make_connection_tag("keeplock", "one");
  std::pair<int, std::string> first_holder;
  std::pair<int, std::string> retaken_holder;
  bool stolen = false;
  bool stopped_by_itself = false;
  std::thread operator_thread([&] {
    if (!testing::eventually([&] { return ready.load(); }, 60s)) {
      app.request_stop(lifecycle::exit_code::ok, "never ready");
      return;
    }
    first_holder = lock_holder();
    BlockingConnection admin(cluster().dsn());
    admin.query("SELECT pg_terminate_backend(" + std::to_string(first_holder.first) + ", 5000)");
    (void)testing::eventually([&] {
      retaken_holder = lock_holder();
      return retaken_holder.first != 0 && retaken_holder.first != first_holder.first;
    });
    // Another instance ends the session and takes the lock the moment it is free, before the
    // process can reconnect.
    BlockingConnection other(cluster().dsn() + " application_name=keeplock/one/0badcafe");
    for (int attempt = 0; attempt < 5 && !stolen; ++attempt) {
      other.query(
          "DO $$ DECLARE until timestamptz := clock_timestamp() + interval '2 s'; BEGIN "
          "PERFORM pg_terminate_backend(" +
          std::to_string(lock_holder().first) + "); LOOP EXIT WHEN pg_try_advisory_lock(" +
          key_sql + ") OR clock_timestamp() > until; END LOOP; END $$");
      stolen = other.scalar(
                   "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND "
                   "locktype = 'advisory' AND granted") == "1";
    }
    stopped_by_itself = testing::eventually([&] { return !app.ready(); }, 15s);
    if (!stopped_by_itself) app.request_stop(lifecycle::exit_code::ok, "did not stop by itself");
    (void)testing::eventually([&] { return app.state() == lifecycle::State::stopped; }, 30s);
    EXPECT_EQ(other.scalar("SELECT 1"), "1") << "the new holder is left alone";
  });
  const int exit_code = app.run();
  operator_thread.join();
  spdlog::set_default_logger(previous);
  EXPECT_EQ(first_holder.second, own_tag);
  EXPECT_EQ(retaken_holder.second, own_tag) << "the lock was not retaken\n" << log.str();
  EXPECT_THAT(log.str(), HasSubstr("retook the cluster-wide lock of keeplock/one/"));
  ASSERT_TRUE(stolen);
  EXPECT_TRUE(stopped_by_itself) << log.str();
  EXPECT_EQ(exit_code, lifecycle::exit_code::failure);
  EXPECT_THAT(app.stop_reason(), HasSubstr("the cluster-wide lock of keeplock/one/ was lost"));
  EXPECT_THAT(app.stop_reason(), HasSubstr("keeplock/one/0badcafe"));
  EXPECT_TRUE(testing::eventually(
      [] { return backend_pids(make_connection_tag("keeplock", "one")).empty(); }));
}

// A lock session that stops answering (its backend frozen) is replaced, and while its own
// leftover still holds the lock the retake goes on (it is no other instance's): the service is
// not stopped, and stop() ends the retake at once.
TEST_F(StartupHygieneTest, AFrozenLockSessionIsRetakenWithoutStoppingAndStopEndsTheRetake) {
  auto [config, options] = cluster_lock_setup("frozenlock");
  options.cluster_lock_check_interval = 300ms;
  std::string lost_reason;
  int frozen = 0;
  struct Thaw {  // whatever happens, the backend runs again (and ends) after the test
    int& pid;
    explicit Thaw(int& frozen_pid) : pid(frozen_pid) {}
    Thaw(const Thaw&) = delete;
    Thaw& operator=(const Thaw&) = delete;
    ~Thaw() {
      if (pid != 0) ::kill(pid, SIGCONT);
    }
  } thaw(frozen);
  Clock::duration stop_took{};
  // The watch logs on this thread (the coroutine's io_context has no other).
  std::ostringstream log;
  const struct RestoreLogger {  // (before `log` goes, whatever happens)
    std::shared_ptr<spdlog::logger> previous = spdlog::default_logger();
    ~RestoreLogger() { spdlog::set_default_logger(previous); }
  } restore_logger;
  spdlog::set_default_logger(std::make_shared<spdlog::logger>(
      "capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(log)));
  const std::string terminating = "this process's own earlier lock session: terminating it";
  std::size_t retakes_seen = 0;
  run_coroutine(
      [&]() -> asio::awaitable<void> {
        StartupHygiene hygiene(co_await asio::this_coro::executor, config, options);
        hygiene.on_cluster_lock_lost([&](const std::string& reason) { lost_reason = reason; });
        co_await hygiene.start();
        const std::set<int> sessions = backend_pids("frozenlock/one/%");
        if (sessions.size() == 1 && ::kill(*sessions.begin(), SIGSTOP) == 0) {
          frozen = *sessions.begin();
          // The check times out (5 s), the retake's terminate waits 5 s, then the retake retries
          // every 100 ms for 5 s and gives up on that take; as the holder is its own leftover,
          // it takes again (no on_cluster_lock_lost()), terminating it again. stop() comes in
          // that second take's terminate: waited for (at most 60 s) by its log line.
          for (const auto until = Clock::now() + 60s; Clock::now() < until;) {
            retakes_seen = occurrences(log.str(), terminating);
            if (retakes_seen >= 2 || !lost_reason.empty()) break;
            co_await testing::sleep_for(50ms);
          }
          co_await testing::sleep_for(500ms);  // (its terminate is on the server)
        }
        const auto stopping = Clock::now();
        co_await hygiene.stop();
        stop_took = Clock::now() - stopping;
      },
      120s);
  ASSERT_NE(frozen, 0) << "could not freeze the lock's backend (not root?)";
  EXPECT_GE(retakes_seen, 2U) << "the retake did not go on past its first take\n" << log.str();
  ::kill(frozen, SIGCONT);  // (it ends then: the retake's terminate is pending)
  EXPECT_LT(stop_took, 4s) << "stop() waited for the retake";
  EXPECT_EQ(lost_reason, "") << "its own frozen session was taken for another instance";
  EXPECT_TRUE(testing::eventually([] { return backend_pids("frozenlock/one/%").empty(); }))
      << "sessions left after stop()";
}

// The cluster-wide lock's holder is named from pg_stat_activity, whose backend_start is NULL for
// another role's session (a role without pg_read_all_stats). The same service run under another
// role (per-instance credentials: Vault's dynamic database roles, a credential rotation) holding
// the lock must be refused like any other holder, and must stop this process when it takes the
// lock while this one runs: the start fails with instance_locked naming the holder, and the
// retake calls on_cluster_lock_lost() instead of retrying as if the database could not be
// reached while the service runs on beside the new holder.
TEST_F(StartupHygieneTest, AClusterLockHolderUnderAnotherRoleIsRefusedAndStopsTheService) {
  {
    BlockingConnection admin(cluster().dsn());
    admin.query("CREATE ROLE hyg_blue LOGIN");
    admin.query("CREATE ROLE hyg_green LOGIN");
  }
  const std::string key_sql = "hashtextextended('pgrt instance rolelock/one/', 0)";
  const std::string green_dsn =
      cluster().dsn() + " user=hyg_green application_name=rolelock/one/0badcafe";
  auto [config, options] = cluster_lock_setup("rolelock");
  config.conninfo = cluster().dsn() + " user=hyg_blue";
  options.cluster_lock_check_interval = 300ms;

  // At the start: the instance under the other role holds the lock.
  std::error_code refusal;
  std::string refusal_text;
  {
    BlockingConnection green(green_dsn);
    ASSERT_EQ(green.scalar("SELECT pg_try_advisory_lock(" + key_sql + ")"), "t");
    run_coroutine([&]() -> asio::awaitable<void> {
      StartupHygiene blue(co_await asio::this_coro::executor, config, options);
      try {
        co_await blue.start();
      } catch (const Error& error) {
        refusal = error.code();
        refusal_text = error.what();
      }
      co_await blue.stop();
    });
  }
  EXPECT_EQ(refusal, make_error_code(client_errc::instance_locked)) << refusal_text;
  EXPECT_THAT(refusal_text, HasSubstr("rolelock/one/0badcafe"));

  // While it runs: its lock session ends, and the instance under the other role takes the lock
  // before it can reconnect (all on the coroutine's thread, which the watch needs to run).
  std::string lost_reason;
  bool stolen = false;
  run_coroutine(
      [&]() -> asio::awaitable<void> {
        StartupHygiene blue(co_await asio::this_coro::executor, config, options);
        blue.on_cluster_lock_lost([&](const std::string& reason) { lost_reason = reason; });
        co_await blue.start();
        const std::set<int> sessions = backend_pids("rolelock/one/%");
        BlockingConnection admin(cluster().dsn());
        BlockingConnection green(green_dsn);
        if (sessions.size() == 1) {
          admin.query("SELECT pg_terminate_backend(" + std::to_string(*sessions.begin()) +
                      ", 5000)");
          stolen = green.scalar("SELECT pg_try_advisory_lock(" + key_sql + ")") == "t";
        }
        // The watch sees its session end, cannot retake the lock from green and calls
        // on_cluster_lock_lost() within a check or two: waited for (at most 8 s).
        for (const auto until = Clock::now() + 8s; lost_reason.empty() && Clock::now() < until;) {
          co_await testing::sleep_for(20ms);
        }
        co_await blue.stop();
      },
      60s);
  ASSERT_TRUE(stolen);
  EXPECT_THAT(lost_reason, HasSubstr("rolelock/one/0badcafe"))
      << "the service ran on beside another holder of its cluster-wide lock";
}

TEST_F(StartupHygieneTest, ACrashedPredecessorsClusterLockSessionIsTerminatedAndTheLockTaken) {
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  proxy.keep_upstream(true);
  auto lock_holder = [] {
    BlockingConnection observer(cluster().dsn());
    auto rows = observer.query(
        "SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name LIKE 'clk/one/%'");
    return rows.size() == 1 ? std::pair{std::stoi(*rows[0][0]), *rows[0][1]}
                            : std::pair{static_cast<int>(rows.size()), std::string()};
  };
  std::set<int> leftovers;
  {
    Child predecessor({PGRT_PROBE_PATH, "singleton"},
                      proxy.conninfo_prefix() + " user=postgres dbname=postgres", "clk",
                      {{"PGRT_INSTANCE", "one"}, {"PGRT_CLUSTER_LOCK", "1"}});
    ASSERT_TRUE(predecessor.wait_for_output("probe: ready", 60s)) << predecessor.output();
    predecessor.signal(SIGKILL);
    (void)predecessor.wait_for_exit(10s);
  }
  std::this_thread::sleep_for(200ms);
  const auto [dead_holder, dead_tag] = lock_holder();
  ASSERT_FALSE(dead_tag.empty()) << "the proxy should keep the dead predecessor's lock session";
  leftovers = backend_pids("clk/one/%");
  ASSERT_TRUE(leftovers.contains(dead_holder));

  PoolConfig config;
  config.conninfo = cluster().dsn();
  config.application = "clk";
  config.instance = "one";
  config.max_size = 3;
  StartupHygieneOptions options;
  options.lock_directory = Child::runtime_directory();  // the predecessor's, on this host
  options.cluster_lock = true;
  const std::string own_tag = make_connection_tag("clk", "one");
  run_coroutine([&]() -> asio::awaitable<void> {
    StartupHygiene successor(co_await asio::this_coro::executor, config, options);
    co_await successor.start();  // does not refuse
    EXPECT_EQ(lock_holder().second, own_tag);
    co_await successor.stop();
  });
  // The lock session and the rest of the predecessor's connections (the cleanup) are gone.
  EXPECT_FALSE(testing::backend_exists(cluster().dsn(), dead_holder));
  EXPECT_TRUE(testing::eventually([] { return backend_pids("clk/one/%").empty(); }))
      << backend_pids("clk/one/%").size() << " left";

  // A live holder of another incarnation that never held this host's lock (another host, as
  // far as this one can tell) is refused, named, and left alone.
  Child elsewhere({PGRT_PROBE_PATH, "singleton"}, cluster().dsn(), "clk",
                  {{"PGRT_INSTANCE", "one"},
                   {"PGRT_CLUSTER_LOCK", "1"},
                   {"PGRT_RUNTIME_DIR", (Child::runtime_directory() / "other-host").string()}});
  ASSERT_TRUE(elsewhere.wait_for_output("probe: ready", 60s)) << elsewhere.output();
  const auto [live_holder, live_tag] = lock_holder();
  ASSERT_FALSE(live_tag.empty());
  run_coroutine([&]() -> asio::awaitable<void> {
    StartupHygiene second(co_await asio::this_coro::executor, config, options);
    try {
      co_await second.start();
      ADD_FAILURE() << "a second holder of the cluster-wide lock";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::instance_locked);
      EXPECT_THAT(error.what(), HasSubstr("holds the cluster-wide instance lock: backend " +
                                          std::to_string(live_holder) + " (" + live_tag));
    }
    co_await second.stop();
  });
  EXPECT_TRUE(testing::backend_exists(cluster().dsn(), live_holder));
  elsewhere.signal(SIGTERM);
  EXPECT_EQ(elsewhere.wait_for_exit(60s), 0) << elsewhere.output();
}

TEST_F(StartupHygieneTest, ARoleThatMayNotTerminateGetsAWarningAndStartsAnyway) {
  auto own = start_own_cluster();
  {
    BlockingConnection admin(own->dsn());
    admin.query("CREATE ROLE hyg_limited LOGIN");
    admin.query("REVOKE EXECUTE ON FUNCTION pg_terminate_backend(integer, bigint) FROM PUBLIC");
  }
  const std::string limited = own->dsn() + " user=hyg_limited";
  BlockingConnection leftover(limited + " application_name=perm/one/0123abcd");
  const int leftover_pid = leftover.backend_pid();

  PoolConfig config;
  config.conninfo = limited;
  config.application = "perm";
  config.instance = "one";
  StartupHygieneOptions options;
  options.lock_directory = Child::runtime_directory();
  const CleanupReport report = run_hygiene(config, options);  // does not throw
  EXPECT_TRUE(report.permission_denied);
  EXPECT_EQ(report.terminated(), 0U);
  EXPECT_THAT(report.warning,
              HasSubstr("GRANT EXECUTE ON FUNCTION pg_terminate_backend(integer, bigint) TO "
                        "\"hyg_limited\";"));
  // pg_signal_backend does not restore a revoked EXECUTE: never offered as the fix.
  EXPECT_THAT(report.warning, HasSubstr("membership of pg_signal_backend does not help"));
  EXPECT_TRUE(testing::backend_exists(own->dsn(), leftover_pid));
}

// operations.md: the cleanup terminates the leftovers "in the same database, under the same
// role". A login role whose sessions run as a group role (ALTER ROLE ... SET role, a common way to
// have one owner for a schema's objects) has current_user = the group role in every session of
// the service, while pg_stat_activity.usename is the login role: the cleanup goes back to the
// login role (SET ROLE NONE) and scopes by session_user, so it finds and terminates the
// service's own leftover.
TEST_F(StartupHygieneTest, LeftoversOfALoginRoleWhoseSessionsSetAGroupRoleAreTerminated) {
  {
    BlockingConnection admin(cluster().dsn());
    admin.query("CREATE ROLE hyg_schema_owner NOLOGIN");
    admin.query("CREATE ROLE hyg_setrole LOGIN IN ROLE hyg_schema_owner");
    admin.query("ALTER ROLE hyg_setrole SET role = 'hyg_schema_owner'");
  }
  const std::string login = cluster().dsn() + " user=hyg_setrole";
  // A crashed run's connection (its incarnation runs nowhere), under the service's own login.
  BlockingConnection leftover(login + " application_name=setrole/one/0badcafe");
  const int leftover_pid = leftover.backend_pid();
  ASSERT_EQ(leftover.scalar("SELECT current_user"), "hyg_schema_owner");

  PoolConfig config;
  config.conninfo = login;
  config.application = "setrole";
  config.instance = "one";
  StartupHygieneOptions options;
  options.lock_directory = Child::runtime_directory();
  const CleanupReport report = run_hygiene(config, options);
  EXPECT_FALSE(report.permission_denied) << report.warning;
  ASSERT_EQ(report.backends.size(), 1U)
      << "the service's own leftover was not found: " << report.warning;
  EXPECT_EQ(report.backends[0].pid, leftover_pid);
  EXPECT_TRUE(report.backends[0].terminated) << report.warning;
  EXPECT_TRUE(
      testing::eventually([&] { return !testing::backend_exists(cluster().dsn(), leftover_pid); }));
}

// pgrt-diag --json's output, parsed; fails the test if it is not one JSON object.
json::object parse_diag_json(const std::string& output) {
  boost::system::error_code error;
  json::value value = json::parse(output, error);
  EXPECT_FALSE(error) << error.message() << "\n" << output;
  EXPECT_TRUE(value.is_object()) << output;
  return value.is_object() ? value.as_object() : json::object{};
}

// pid -> the backend's object, for the backends of the app in a diag report.
std::map<int, json::object> diag_backends(const json::object& report) {
  std::map<int, json::object> backends;
  for (const auto& entry : report.at("backends").as_array()) {
    const auto& backend = entry.as_object();
    backends[static_cast<int>(backend.at("pid").as_int64())] = backend;
  }
  return backends;
}

std::set<int> diag_pids_where(const json::object& report, const char* flag) {
  std::set<int> pids;
  for (const auto& [pid, backend] : diag_backends(report)) {
    if (backend.at(flag).as_bool()) pids.insert(pid);
  }
  return pids;
}

// operations.md, the leftover rule: pgrt-diag "never counts an incarnation that a live process
// on the checking host has (running_here), whatever lock it holds". The operator runs pgrt-diag
// as root (sudo) or as themselves, the service runs as its own user: that live process's
// announced incarnation is another user's socket, so running_here is false; judged by backend
// starts alone, --kill-leaked would terminate its backends (active statements included). Like
// the start-up cleanup, pgrt-diag leaves another user's incarnation alone (unverified).
TEST_F(StartupHygieneTest, DiagNeverKillsTheBackendsOfALiveProcessOnThisHostOfAnotherUser) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root, to run a process as another user";
  const std::string live = "1a2b3c4d";  // a service process running here as user nobody
  const pid_t service = test::squat_incarnation_name(live);
  ASSERT_GT(service, 0);
  struct Reaper {
    pid_t pid;
    ~Reaper() {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  } reaper{service};
  ASSERT_EQ(incarnation_on_this_host(live), HostPresence::other_user);
  BlockingConnection live_backend(cluster().dsn() + " application_name=diagusr/one/" + live);
  std::this_thread::sleep_for(100ms);
  // Another incarnation of the instance whose backend started later (a duplicate elsewhere, or a
  // crashed one-shot run of the same binary behind a connection-holding proxy).
  BlockingConnection other(cluster().dsn() + " application_name=diagusr/one/5e6f7a8b");
  const int live_pid = live_backend.backend_pid();
  {
    Child diag({PGRT_DIAG_PATH, "--app", "diagusr", "--json"}, cluster().dsn(), "diagusr");
    (void)diag.wait_for_exit(30s);
    const auto backends = diag_backends(parse_diag_json(diag.output()));
    ASSERT_TRUE(backends.contains(live_pid)) << diag.output();
    EXPECT_FALSE(backends.at(live_pid).at("leaked").as_bool())
        << "a live process on this host counted as leaked: " << backends.at(live_pid);
  }
  {
    Child kill({PGRT_DIAG_PATH, "--app", "diagusr", "--kill-leaked", "--json"}, cluster().dsn(),
               "diagusr");
    (void)kill.wait_for_exit(30s);
    EXPECT_EQ(diag_pids_where(parse_diag_json(kill.output()), "terminated").count(live_pid), 0U)
        << kill.output();
  }
}

TEST_F(StartupHygieneTest, DiagReportsLeakedBackendsAsJsonAndKillsOnlyThose) {
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  const std::set<int> leaked = crashed_predecessor(proxy, "diag", "one");
  Child successor({PGRT_PROBE_PATH, "hold-connections"}, cluster().dsn(), "diag",
                  {{"PGRT_INSTANCE", "one"}});
  ASSERT_TRUE(successor.wait_for_output("holding", 60s)) << successor.output();
  const std::set<int> alive = parse_pids(successor.output());
  BlockingConnection foreign(cluster().dsn() + " application_name=diag-foreign");
  // The same app name in another database: an older incarnation, but not pgrt-diag's to judge.
  {
    BlockingConnection admin(cluster().dsn());
    admin.query("DROP DATABASE IF EXISTS diag_other");
    admin.query("CREATE DATABASE diag_other");
  }
  BlockingConnection elsewhere(cluster().dsn() +
                               " dbname=diag_other application_name=diag/one/00000001");
  const int elsewhere_pid = elsewhere.backend_pid();

  {
    Child diag({PGRT_DIAG_PATH, "--app", "diag", "--json"}, cluster().dsn(), "diag");
    EXPECT_EQ(diag.wait_for_exit(30s), 1) << "leaked backends found\n" << diag.output();
    const json::object report = parse_diag_json(diag.output());
    ASSERT_FALSE(report.empty());
    const auto& server = report.at("server").as_object();
    EXPECT_GT(server.at("max_connections").as_int64(), 0);
    EXPECT_GT(server.at("used").as_int64(), 0);
    EXPECT_EQ(server.at("free").as_int64(), server.at("max_connections").as_int64() -
                                                server.at("reserved").as_int64() -
                                                server.at("used").as_int64());
    EXPECT_EQ(report.at("database").as_string(), "postgres");
    bool saw_foreign = false;
    for (const auto& group : report.at("groups").as_array()) {
      saw_foreign |= group.as_object().at("application").as_string() == "diag-foreign";
    }
    EXPECT_TRUE(saw_foreign);
    EXPECT_EQ(report.at("leaked").as_int64(), 3);
    EXPECT_EQ(diag_pids_where(report, "leaked"), leaked);
    const auto backends = diag_backends(report);
    for (int pid : leaked) {
      EXPECT_THAT(std::string(backends.at(pid).at("reason").as_string()),
                  ::testing::StartsWith("superseded: diag/one/"));
    }
    ASSERT_TRUE(backends.contains(elsewhere_pid));
    EXPECT_FALSE(backends.at(elsewhere_pid).at("in_scope").as_bool());
    EXPECT_EQ(backends.at(elsewhere_pid).at("database").as_string(), "diag_other");
    EXPECT_EQ(diag_pids_where(report, "terminated"), std::set<int>{});
  }
  {
    // The idle rule is the cleanup's: idle, not idle in a transaction.
    std::this_thread::sleep_for(1500ms);
    Child diag({PGRT_DIAG_PATH, "--app", "diag", "--json", "--idle-threshold", "1"},
               cluster().dsn(), "diag");
    EXPECT_EQ(diag.wait_for_exit(30s), 1) << diag.output();
    const auto backends = diag_backends(parse_diag_json(diag.output()));
    int idle = 0;
    for (int pid : alive) {
      ASSERT_TRUE(backends.contains(pid)) << pid;
      const auto& backend = backends.at(pid);
      const bool is_idle = backend.at("state").as_string() == "idle";
      idle += is_idle ? 1 : 0;
      EXPECT_EQ(backend.at("leaked").as_bool(), is_idle) << backend;
      if (is_idle) {
        EXPECT_THAT(std::string(backend.at("reason").as_string()),
                    ::testing::StartsWith("idle for "));
      }
    }
    EXPECT_EQ(idle, 2);  // the third is idle in a transaction
  }
  {
    Child kill({PGRT_DIAG_PATH, "--app", "diag", "--kill-leaked", "--json"}, cluster().dsn(),
               "diag");
    EXPECT_EQ(kill.wait_for_exit(30s), 0) << kill.output();
    EXPECT_EQ(diag_pids_where(parse_diag_json(kill.output()), "terminated"), leaked);
  }
  EXPECT_TRUE(testing::eventually([&] {
    std::set<int> left = backend_pids("diag/one/%");
    left.erase(elsewhere_pid);
    return left == alive;
  }));
  EXPECT_EQ(foreign.scalar("SELECT 1"), "1");
  EXPECT_EQ(elsewhere.scalar("SELECT 1"), "1");
  {
    // --emergency: every backend of the app in this database and role, nothing else.
    Child emergency({PGRT_DIAG_PATH, "--app", "diag", "--emergency", "--json"}, cluster().dsn(),
                    "diag");
    EXPECT_EQ(emergency.wait_for_exit(30s), 0) << emergency.output();
    EXPECT_EQ(diag_pids_where(parse_diag_json(emergency.output()), "terminated"), alive);
  }
  EXPECT_TRUE(testing::eventually(
      [&] { return backend_pids("diag/one/%") == std::set<int>{elsewhere_pid}; }));
  EXPECT_EQ(foreign.scalar("SELECT 1"), "1");
  EXPECT_EQ(elsewhere.scalar("SELECT 1"), "1");
  {
    Child usage({PGRT_DIAG_PATH, "--kill-leaked", "--emergency"}, cluster().dsn(), "diag");
    EXPECT_EQ(usage.wait_for_exit(30s), 2) << usage.output();
  }
}

// A malformed DATABASE_URL is a configuration error (exit 78, never "unreachable"), and its text
// never appears: a password under a misspelled keyword is still a password.
TEST_F(StartupHygieneTest, AMalformedDsnExits78AndNeverShowsItsPassword) {
  for (const std::string keyword : {"PASSWORD", "passwd", "pass", "Password"}) {
    const std::string dsn = cluster().dsn() + " " + keyword + "=hunter2-secret";
    Child demo({PGRT_DEMO_PATH, "--duration", "1"}, dsn, "malformed");
    EXPECT_EQ(demo.wait_for_exit(60s), lifecycle::exit_code::config) << demo.output();
    EXPECT_THAT(demo.output(), Not(HasSubstr("hunter2"))) << demo.output();
    EXPECT_THAT(demo.output(), HasSubstr("\"" + keyword + "\" is not a keyword"));
    Child diag({PGRT_DIAG_PATH, "--app", "malformed"}, dsn, "malformed");
    EXPECT_EQ(diag.wait_for_exit(30s), 78) << diag.output();
    EXPECT_THAT(diag.output(), Not(HasSubstr("hunter2"))) << diag.output();
    EXPECT_THAT(diag.output(), Not(HasSubstr("unreachable")));
  }
  // A value with an unquoted space: its second word may be part of a password.
  Child diag({PGRT_DIAG_PATH, "--dsn", cluster().dsn() + " password=hunter2 secret-part"}, "",
             "malformed");
  EXPECT_EQ(diag.wait_for_exit(30s), 78) << diag.output();
  EXPECT_THAT(diag.output(), Not(HasSubstr("secret-part"))) << diag.output();
  EXPECT_THAT(diag.output(), Not(HasSubstr("hunter2")));
}

// A command line is readable by every local user (/proc/PID/cmdline) for as long as the process
// runs (pgrt-diag --watch runs for good): a --dsn that holds a password is overwritten there, with
// a warning that names the safer ways to give it; the tool still works.
TEST_F(StartupHygieneTest, APasswordGivenToPgrtDiagOnItsCommandLineIsWipedFromIt) {
  Child diag({PGRT_DIAG_PATH, "--dsn", cluster().dsn() + " password=hunter2-argv", "--app", "pw",
              "--watch", "1"},
             "", "pw");
  // Its report is out (SIGTERM before it, while it connects, ends it with another exit code).
  ASSERT_TRUE(testing::eventually(
      [&] { return diag.output().find("max_connections") != std::string::npos; }, 20s))
      << diag.output();
  std::ifstream cmdline("/proc/" + std::to_string(diag.pid()) + "/cmdline");
  const std::string argv_seen((std::istreambuf_iterator<char>(cmdline)),
                              std::istreambuf_iterator<char>());
  EXPECT_THAT(argv_seen, Not(HasSubstr("hunter2"))) << argv_seen;
  EXPECT_THAT(argv_seen, HasSubstr("--watch"));
  EXPECT_THAT(diag.output(), HasSubstr("--dsn holds a password")) << diag.output();
  EXPECT_THAT(diag.output(), Not(HasSubstr("hunter2"))) << diag.output();
  diag.signal(SIGTERM);
  EXPECT_EQ(diag.wait_for_exit(20s), 0) << diag.output();
}

// The same for libpq's other secret: sslpassword, the passphrase of the client's TLS key (libpq
// marks it secret, dispchar "*", and pgrt's own redaction hides it): a --dsn with sslpassword= is
// overwritten in /proc/PID/cmdline as one with password= is, and never printed.
TEST_F(StartupHygieneTest, AnSslPasswordGivenToPgrtDiagOnItsCommandLineIsWipedFromIt) {
  Child diag({PGRT_DIAG_PATH, "--dsn", cluster().dsn() + " sslpassword=hunter3-sslkey", "--app",
              "pwssl", "--watch", "1"},
             "", "pwssl");
  // (Its report is out: its arguments were taken long before.)
  ASSERT_TRUE(testing::eventually(
      [&] { return diag.output().find("max_connections") != std::string::npos; }, 20s))
      << diag.output();
  std::ifstream cmdline("/proc/" + std::to_string(diag.pid()) + "/cmdline");
  const std::string argv_seen((std::istreambuf_iterator<char>(cmdline)),
                              std::istreambuf_iterator<char>());
  EXPECT_THAT(argv_seen, Not(HasSubstr("hunter3"))) << argv_seen;
  EXPECT_THAT(argv_seen, HasSubstr("--watch"));
  EXPECT_THAT(diag.output(), Not(HasSubstr("hunter3"))) << diag.output();
  diag.signal(SIGTERM);
  EXPECT_EQ(diag.wait_for_exit(20s), 0) << diag.output();
}

// Behind a transaction pooler the server's backends are the pooler's: PgBouncer's server
// connections carry the tag of whichever client used them last (here another instance of the
// app, idle past the idle rule's threshold), and neither the start-up cleanup nor pgrt-diag
// terminates them.
TEST_F(StartupHygieneTest, BehindATransactionPoolerThePoolersBackendsAreNeverTerminated) {
  testing::TempPgBouncer bouncer(cluster(), {.pool_size = 2});
  PoolConfig config;
  config.conninfo = bouncer.dsn();
  config.connect.pooler = Pooler::transaction;
  config.application = "pooled";
  config.instance = "two";
  run_coroutine([&]() -> asio::awaitable<void> {
    Pool pool(co_await asio::this_coro::executor, config);
    auto first = co_await pool.acquire();
    auto second = co_await pool.acquire();
    co_await first->begin();  // two transactions at once: both server connections used
    co_await second->begin();
    co_await first->query("SELECT 1");
    co_await second->query("SELECT 1");
    co_await first->commit();
    co_await second->commit();
    first.release();
    second.release();
    (void)co_await pool.close(1s);
  });
  const std::set<int> pooler_backends = backend_pids("pooled/two/%");
  ASSERT_EQ(pooler_backends.size(), 2U) << "PgBouncer should keep its 2 server connections";
  std::this_thread::sleep_for(1500ms);

  config.instance = "one";
  StartupHygieneOptions options;
  options.lock_directory = Child::runtime_directory();
  options.idle_threshold = std::chrono::seconds(1);
  const CleanupReport report = run_hygiene(config, options);
  EXPECT_TRUE(report.skipped);
  EXPECT_THAT(report.warning, HasSubstr("belong to the pooler"));
  EXPECT_TRUE(report.backends.empty());

  Child diag({PGRT_DIAG_PATH, "--app", "pooled", "--idle-threshold", "1", "--kill-leaked"},
             bouncer.dsn(), "pooled", {{"PGRT_POOLER", "transaction"}});
  EXPECT_EQ(diag.wait_for_exit(30s), 2) << diag.output();
  EXPECT_THAT(diag.output(), HasSubstr("terminates none"));
  Child diag_report({PGRT_DIAG_PATH, "--app", "pooled", "--idle-threshold", "1"}, bouncer.dsn(),
                    "pooled", {{"PGRT_POOLER", "transaction"}});
  EXPECT_EQ(diag_report.wait_for_exit(30s), 0) << diag_report.output();
  EXPECT_THAT(diag_report.output(), HasSubstr("these backends are the pooler's"));
  Child misspelled({PGRT_DIAG_PATH, "--app", "pooled"}, bouncer.dsn(), "pooled",
                   {{"PGRT_POOLER", "pgbouncer"}});
  EXPECT_EQ(misspelled.wait_for_exit(30s), 78) << misspelled.output();
  EXPECT_THAT(misspelled.output(), HasSubstr("PGRT_POOLER='pgbouncer' is not valid"));
  // Still alive (pgrt-diag's own queries through PgBouncer may have retagged one of them).
  BlockingConnection observer(cluster().dsn());
  std::string pids;
  for (int pid : pooler_backends) pids += (pids.empty() ? "" : ",") + std::to_string(pid);
  EXPECT_EQ(observer.scalar("SELECT count(*) FROM pg_stat_activity WHERE pid IN (" + pids + ")"),
            "2")
      << "a pooler's backend was terminated";

  // The cluster-wide lock is a session-level advisory lock: refused up front.
  lifecycle::Manager app;
  options.cluster_lock = true;
  EXPECT_THROW(add_startup_hygiene(app, config, options), Error);
}

// --watch into a file: no terminal escape codes, and SIGTERM ends it cleanly.
TEST_F(StartupHygieneTest, DiagWatchIntoAFileWritesNoEscapeCodesAndEndsOnSigterm) {
  Child diag({PGRT_DIAG_PATH, "--app", "watched", "--watch", "1"}, cluster().dsn(), "watched");
  ASSERT_TRUE(diag.wait_for_output("server:", 30s)) << diag.output();
  std::this_thread::sleep_for(1500ms);  // a second refresh
  diag.signal(SIGTERM);
  EXPECT_EQ(diag.wait_for_exit(10s), 0) << diag.status() << "\n" << diag.output();
  EXPECT_EQ(diag.output().find('\033'), std::string::npos) << diag.output();
}

// A report that could not be written is no report: `pgrt-diag --json > report.json` on a full disk
// (or any stdout that fails) must not exit 0 as if the report said "nothing leaked": pgrt-diag
// checks its output after flushing it, for the JSON and the text report alike.
TEST_F(StartupHygieneTest, DiagDoesNotExitZeroWhenItsReportCannotBeWritten) {
  for (const char* format : {"--json", "--idle-threshold 900"}) {  // the JSON, the text report
    const std::string command =
        std::string("exec ") + PGRT_DIAG_PATH + " --app unwritten " + format + " > /dev/full";
    Child diag({"/bin/sh", "-c", command}, cluster().dsn(), "unwritten");
    EXPECT_NE(diag.wait_for_exit(30s), 0) << command << "\n" << diag.output();
  }
}

// A start that waits for the database: a server that comes up late is waited for (the reason
// logged once per change), and one that never does fails the start after start_wait.
TEST_F(StartupHygieneTest, ThePoolsStartWaitsForTheDatabaseUntilItsDeadline) {
  testing::TempCluster own;
  own.stop();
  std::ostringstream log;
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(std::make_shared<spdlog::logger>(
      "capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(log)));
  auto run_app = [&](std::chrono::milliseconds start_wait, const std::string& extra = "") {
    lifecycle::ManagerOptions manager_options;
    manager_options.handle_signals = false;
    manager_options.shutdown_logging = false;
    lifecycle::Manager app(manager_options);
    PoolConfig config;
    config.conninfo = own.dsn() + extra;
    config.application = "waitdb";
    config.connect_backoff_initial = 50ms;
    config.connect_backoff_max = 200ms;
    (void)add_pool(app, config, PoolComponentOptions{.start_wait = start_wait});
    app.on_ready([&] { app.request_stop(lifecycle::exit_code::ok, "up"); });
    return app.run();
  };
  const auto started = Clock::now();
  EXPECT_EQ(run_app(1s), lifecycle::exit_code::failure);  // the server never comes up
  EXPECT_LT(Clock::now() - started, 10s);
  EXPECT_THAT(log.str(), HasSubstr("the database did not answer within 1000 ms of the start"));
  log.str("");
  std::thread late([&] {
    std::this_thread::sleep_for(3s);  // past a few bounded attempts
    own.start();
  });
  EXPECT_EQ(run_app(30s), lifecycle::exit_code::ok) << log.str();
  late.join();
  spdlog::set_default_logger(previous);
  const std::string text = log.str();
  const std::size_t waits = occurrences(text, "waiting for the database");
  EXPECT_GE(waits, 1U) << text;
  EXPECT_LE(waits, 3U) << "once per reason, not once per attempt\n" << text;
  EXPECT_THAT(text, HasSubstr("the database answers, after"));
  // What waiting cannot cure (a database that does not exist) fails the start at once.
  log.str("");
  spdlog::set_default_logger(std::make_shared<spdlog::logger>(
      "capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(log)));
  const auto again = Clock::now();
  EXPECT_EQ(run_app(30s, " dbname=no_such_database"), lifecycle::exit_code::failure);
  spdlog::set_default_logger(previous);
  EXPECT_LT(Clock::now() - again, 10s) << log.str();
  EXPECT_THAT(log.str(), HasSubstr("no_such_database"));

  // A stop requested while the start waits (a container stopped while its database is down):
  // the cancelled start closes the pool and forgets it, before run() returns (it outlived the
  // manager's io_context, and its destruction read the freed timers).
  {
    lifecycle::ManagerOptions manager_options;
    manager_options.handle_signals = false;
    manager_options.shutdown_logging = false;
    lifecycle::Manager app(manager_options);
    PoolConfig config;
    config.conninfo = own.dsn() + " dbname=postgres";
    own.stop();
    config.application = "waitdb";
    config.connect_backoff_max = 200ms;
    (void)add_pool(app, config, PoolComponentOptions{.start_wait = 60s});
    std::thread stopper([&] {
      std::this_thread::sleep_for(1s);
      app.request_stop(lifecycle::exit_code::ok, "stopped while starting");
    });
    const auto asked = Clock::now();
    (void)app.run();
    stopper.join();
    EXPECT_LT(Clock::now() - asked, 10s);
    EXPECT_EQ(configured_pool(), nullptr) << "the cancelled start left the pool open";
  }
}

// A session tagged `application_name` running a long statement (state 'active') until it is
// terminated; the destructor terminates it if nothing else did.
class ActiveSession {
 public:
  ActiveSession(const std::string& dsn, const std::string& application_name)
      : dsn_(dsn), connection_(dsn + " application_name=" + application_name) {
    pid_ = connection_.backend_pid();
    EXPECT_EQ(PQsendQuery(connection_.native(), "SELECT pg_sleep(300)"), 1);
    EXPECT_TRUE(testing::eventually([this] { return state() == "active"; })) << state();
  }
  ActiveSession(const ActiveSession&) = delete;
  ActiveSession& operator=(const ActiveSession&) = delete;
  ActiveSession(ActiveSession&&) = delete;
  ActiveSession& operator=(ActiveSession&&) = delete;
  ~ActiveSession() {
    BlockingConnection(dsn_).query("SELECT pg_terminate_backend(" + std::to_string(pid_) + ")");
  }
  [[nodiscard]] int pid() const { return pid_; }
  // pg_stat_activity.state; "" once the backend is gone.
  [[nodiscard]] std::string state() const {
    auto rows = BlockingConnection(dsn_).query(
        "SELECT coalesce(state, '') FROM pg_stat_activity WHERE pid = " + std::to_string(pid_));
    return rows.empty() ? std::string() : *rows[0][0];
  }

 private:
  std::string dsn_;
  BlockingConnection connection_;
  int pid_ = 0;
};

TEST_F(StartupHygieneTest, NamesThatOnlyStartLikeATagAreNeverLeftovers) {
  const std::string dsn = cluster().dsn();
  // A real leftover: an earlier incarnation of exact/one, as the control.
  BlockingConnection leftover(dsn + " application_name=exact/one/0badcafe");
  // Sessions of other programs that only share the app's (and instance's) prefix.
  BlockingConnection report_job(dsn + " application_name=exact/one/report-job");
  BlockingConnection upper_case(dsn + " application_name=exact/one/0BADCAFE");
  BlockingConnection nine_digits(dsn + " application_name=exact/one/0badcafe1");
  BlockingConnection console(dsn + " application_name=exact/console");
  std::this_thread::sleep_for(1500ms);  // all idle past the idle rule's threshold

  PoolConfig config;
  config.conninfo = dsn;
  config.application = "exact";
  config.instance = "one";
  StartupHygieneOptions options;
  options.lock_directory = Child::runtime_directory();
  options.idle_threshold = std::chrono::seconds(1);
  const CleanupReport report = run_hygiene(config, options);
  std::set<std::string> found;
  for (const auto& backend : report.backends) found.insert(backend.application_name);
  EXPECT_EQ(found, std::set<std::string>{"exact/one/0badcafe"});
  EXPECT_EQ(report.terminated(), 1U);
  EXPECT_THROW(leftover.scalar("SELECT 1"), testing::SqlError);
  for (auto* other : {&report_job, &upper_case, &nine_digits, &console}) {
    EXPECT_EQ(other->scalar("SELECT 1"), "1") << "terminated";
  }
}

// The app's role has no connection left (53300): a superuser connects (a reserved slot) and names
// the app's role with --role. Without it --emergency left every backend alone and said "all
// terminated" (exit 0); with it, the role's backends in this database are terminated.
TEST_F(StartupHygieneTest, DiagEmergencyAsASuperuserActsOnTheRoleItIsGiven) {
  const std::string dsn = cluster().dsn();
  {
    BlockingConnection admin(dsn);
    admin.query("DROP ROLE IF EXISTS diag_app_role");
    admin.query("CREATE ROLE diag_app_role LOGIN");
  }
  BlockingConnection first(dsn + " user=diag_app_role application_name=rolediag/one/0badcafe");
  BlockingConnection second(dsn + " user=diag_app_role application_name=rolediag/one/1badcafe");
  {
    Child unnamed({PGRT_DIAG_PATH, "--app", "rolediag", "--emergency", "--json"}, dsn, "rolediag");
    EXPECT_EQ(unnamed.wait_for_exit(30s), 1) << unnamed.output();
    EXPECT_THAT(unnamed.output(), HasSubstr("--role"));
    EXPECT_EQ(first.scalar("SELECT 1"), "1") << "terminated without --role";
  }
  {
    Child named(
        {PGRT_DIAG_PATH, "--app", "rolediag", "--role", "diag_app_role", "--emergency", "--json"},
        dsn, "rolediag");
    EXPECT_EQ(named.wait_for_exit(30s), 0) << named.output();
    EXPECT_EQ(diag_pids_where(parse_diag_json(named.output()), "terminated"),
              (std::set<int>{first.backend_pid(), second.backend_pid()}))
        << named.output();
  }
  EXPECT_THROW(first.scalar("SELECT 1"), testing::SqlError);
}

// operations.md: "0 nothing leaked (or everything asked for was terminated)", and --role names
// the role whose backends "are the ones classified and terminated". Connected as a role that may
// terminate them (pg_signal_backend: an operator's role, or one with PostgreSQL 16's
// pg_use_reserved_connections for a full server) but cannot read their pg_stat_activity rows
// (no pg_read_all_stats), pgrt-diag sees none of them (their backend_type is hidden, and
// list_app_backends() keeps client backends only): --emergency must then not exit 0 ("all
// terminated") while the app's backends are still there; it says so and exits 1.
TEST_F(StartupHygieneTest, DiagEmergencyForARoleItCannotSeeDoesNotExitZero) {
  const std::string dsn = cluster().dsn();
  {
    BlockingConnection admin(dsn);
    admin.query("DROP ROLE IF EXISTS diag_blind_app");
    admin.query("DROP ROLE IF EXISTS diag_blind_ops");
    admin.query("CREATE ROLE diag_blind_app LOGIN");
    admin.query("CREATE ROLE diag_blind_ops LOGIN IN ROLE pg_signal_backend");
  }
  BlockingConnection first(dsn + " user=diag_blind_app application_name=blind/one/00000001");
  BlockingConnection second(dsn + " user=diag_blind_app application_name=blind/one/ffffffff");
  Child emergency(
      {PGRT_DIAG_PATH, "--app", "blind", "--role", "diag_blind_app", "--emergency", "--json"},
      dsn + " user=diag_blind_ops", "blind");
  const auto code = emergency.wait_for_exit(30s);
  const bool all_terminated = !testing::backend_exists(dsn, first.backend_pid()) &&
                              !testing::backend_exists(dsn, second.backend_pid());
  EXPECT_TRUE(all_terminated || code != 0)
      << "exit 0 (all terminated), and the app's backends are all still there:\n"
      << emergency.output();
}

TEST_F(StartupHygieneTest, DiagKillLeakedLeavesNamesThatOnlyStartLikeATag) {
  const std::string dsn = cluster().dsn();
  // A live instance, then programs that only share the app's prefix, started after it. None is a
  // newer incarnation that would make the instance's own connection look superseded.
  BlockingConnection live(dsn + " application_name=dgx/one/1234abcd");
  std::this_thread::sleep_for(20ms);
  BlockingConnection report_job(dsn + " application_name=dgx/one/report-job");
  ActiveSession console(dsn, "dgx/console");
  std::this_thread::sleep_for(20ms);
  BlockingConnection batch(dsn + " application_name=dgx/batch");

  Child kill({PGRT_DIAG_PATH, "--app", "dgx", "--kill-leaked", "--json"}, dsn, "dgx");
  EXPECT_EQ(kill.wait_for_exit(30s), 0) << kill.output();
  const json::object report = parse_diag_json(kill.output());
  EXPECT_EQ(diag_pids_where(report, "terminated"), std::set<int>{}) << kill.output();
  EXPECT_EQ(diag_pids_where(report, "leaked"), std::set<int>{}) << kill.output();
  // Only exact tags are the app's backends.
  const auto backends = diag_backends(report);
  EXPECT_EQ(backends.size(), 1U) << kill.output();
  EXPECT_TRUE(backends.contains(live.backend_pid())) << kill.output();
  EXPECT_EQ(live.scalar("SELECT 1"), "1");
  EXPECT_EQ(report_job.scalar("SELECT 1"), "1");
  EXPECT_EQ(batch.scalar("SELECT 1"), "1");
  EXPECT_EQ(console.state(), "active");
}

TEST_F(StartupHygieneTest, AnActiveSessionOfADeadIncarnationIsALeftover) {
  const std::string dsn = cluster().dsn();
  // Start-up: an earlier incarnation of busy/one (this process holds the instance lock, so that
  // incarnation's process is gone) still running a statement.
  ActiveSession running(dsn, "busy/one/0badcafe");
  PoolConfig config;
  config.conninfo = dsn;
  config.application = "busy";
  config.instance = "one";
  StartupHygieneOptions options;
  options.lock_directory = Child::runtime_directory();
  const CleanupReport report = run_hygiene(config, options);
  ASSERT_EQ(report.backends.size(), 1U);
  EXPECT_EQ(report.backends[0].pid, running.pid());
  EXPECT_EQ(report.backends[0].state, "active");
  EXPECT_TRUE(report.backends[0].terminated);
  EXPECT_TRUE(testing::eventually([&] { return running.state().empty(); }));

  // pgrt-diag: a superseded incarnation of busy/two running a statement is leaked too.
  ActiveSession superseded(dsn, "busy/two/0badcafe");
  std::this_thread::sleep_for(20ms);
  BlockingConnection newer(dsn + " application_name=busy/two/1234abcd");
  Child kill({PGRT_DIAG_PATH, "--app", "busy", "--kill-leaked", "--json"}, dsn, "busy");
  EXPECT_EQ(kill.wait_for_exit(30s), 0) << kill.output();
  const json::object json_report = parse_diag_json(kill.output());
  EXPECT_EQ(diag_pids_where(json_report, "terminated"), std::set<int>{superseded.pid()})
      << kill.output();
  const auto backends = diag_backends(json_report);
  ASSERT_TRUE(backends.contains(superseded.pid())) << kill.output();
  EXPECT_EQ(backends.at(superseded.pid()).at("state").as_string(), "active");
  EXPECT_THAT(std::string(backends.at(superseded.pid()).at("reason").as_string()),
              ::testing::StartsWith("superseded: busy/two/1234abcd"));
  EXPECT_TRUE(testing::eventually([&] { return superseded.state().empty(); }));
  EXPECT_EQ(newer.scalar("SELECT 1"), "1");
}

}  // namespace
}  // namespace pgrt
