// Supervised child processes with real processes (/bin/sh scripts): reaping, exit reports, the
// stop escalation, process groups, death with a SIGKILLed parent, the restart backoff and its cap.
#include <array>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/signals2/connection.hpp>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <memory>
#include <optional>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/wait.h>
#include <system_error>
#include <thread>
#include <unistd.h>
#include <vector>

#include "command_line_log.hpp"
#include "pgrt/lifecycle.hpp"
#include "pgrt/testing/run_coroutine.hpp"

extern char** environ;  // NOLINT(readability-redundant-declaration)

namespace pgrt::lifecycle {
namespace {

namespace asio = boost::asio;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using boost::signals2::scoped_connection;
using std::chrono::milliseconds;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr const char* helper_env = "PGRT_CHILD_PROCESS_HELPER_PID_FILE";

// Runs `body` (a coroutine function) on `io` until it completes, at most `limit`; rethrows. The
// io_context is then stopped (a child's watch may still wait on it): io.restart() to go on.
template <typename Body>
void run_on(asio::io_context& io, Body&& body, std::chrono::seconds limit = 30s) {
  bool done = false;
  std::exception_ptr error;
  asio::co_spawn(io, std::forward<Body>(body), [&](const std::exception_ptr& thrown) {
    done = true;
    error = thrown;
    io.stop();
  });
  io.run_for(limit);
  ASSERT_TRUE(done) << "the test body did not finish within " << limit.count() << " s";
  if (error) std::rethrow_exception(error);
}

using pgrt::testing::sleep_for;

// Polls `done` every 10 ms while the io_context runs; false if `limit` passed first.
asio::awaitable<bool> poll_until(std::function<bool()> done, milliseconds limit) {
  const auto deadline = Clock::now() + limit;
  while (!done()) {
    if (Clock::now() >= deadline) co_return false;
    co_await sleep_for(10ms);
  }
  co_return true;
}

// Polls `done` every 10 ms, blocking (no io_context needed); false if `limit` passed first.
bool wait_until(const std::function<bool()>& done, milliseconds limit) {
  const auto deadline = Clock::now() + limit;
  while (!done()) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(10ms);
  }
  return true;
}

std::optional<std::string> read_file(const fs::path& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// The process no longer runs: /proc has no entry for it, or it is a zombie (dead, waiting for its
// parent, e.g. init, to reap it). A pid reused by another process within the test's few seconds
// would be taken for a live one (a false failure, never a false pass).
bool process_gone(pid_t pid) {
  const auto stat = read_file("/proc/" + std::to_string(pid) + "/stat");
  if (!stat) return true;
  const auto paren = stat->rfind(')');
  if (paren == std::string::npos || paren + 2 >= stat->size()) return true;
  const char state = (*stat)[paren + 2];
  return state == 'Z' || state == 'X';
}

// Reaped by us: waitpid() knows no such child any more.
bool reaped(pid_t pid) {
  int status = 0;
  return ::waitpid(pid, &status, WNOHANG) == -1 && errno == ECHILD;
}

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "pgrt-child-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  TempDir(TempDir&&) = delete;
  TempDir& operator=(TempDir&&) = delete;
  [[nodiscard]] const fs::path& path() const { return path_; }
  [[nodiscard]] fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

// Everything a child reports through the events, in order.
struct Recorder {
  explicit Recorder(ChildProcess& child)
      : on_started(child.events().started.connect([this](pid_t pid) {
          started.push_back(pid);
          started_at.push_back(Clock::now());
        })),
        on_exited(child.events().exited.connect(
            [this](const ChildExit& exit) { exits.push_back(exit); })),
        on_restart(child.events().restart_scheduled.connect(
            [this](const ChildRestart& restart) { restarts.push_back(restart); })),
        on_down(child.events().stayed_down.connect(
            [this](const std::string& reason) { stayed_down.push_back(reason); })) {}

  std::vector<pid_t> started;
  std::vector<Clock::time_point> started_at;
  std::vector<ChildExit> exits;
  std::vector<ChildRestart> restarts;
  std::vector<std::string> stayed_down;
  scoped_connection on_started, on_exited, on_restart, on_down;
};

static_assert(Component<ChildProcess>);

TEST(ChildProcessBackoff, DoublesUpToTheCap) {
  EXPECT_EQ(restart_delay(100ms, 1000ms, 1), 100ms);
  EXPECT_EQ(restart_delay(100ms, 1000ms, 2), 200ms);
  EXPECT_EQ(restart_delay(100ms, 1000ms, 4), 800ms);
  EXPECT_EQ(restart_delay(100ms, 1000ms, 5), 1000ms);
  EXPECT_EQ(restart_delay(100ms, 1000ms, 1000), 1000ms);
  EXPECT_EQ(restart_delay(0ms, 1000ms, 3), 0ms);
  EXPECT_EQ(restart_delay(milliseconds::max() / 2 + 1ms, milliseconds::max(), 70),
            milliseconds::max());
}

// 1. An exit is reaped at once (no zombie) and reported with its pid, code and duration.
TEST(ChildProcessTest, ExitIsReapedAndReported) {
  asio::io_context io;
  ChildProcess child(
      {.argv = {"/bin/sh", "-c", "sleep 0.2; exit 3"}, .restart = RestartPolicy::never});
  EXPECT_EQ(child.name(), "sh");
  Recorder events(child);
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await child.start();
    EXPECT_TRUE(child.supervising());
    EXPECT_EQ(child.pid(), events.started.at(0));
    EXPECT_TRUE(co_await poll_until([&] { return !child.supervising(); }, 10s));
  });
  ASSERT_THAT(events.started, ::testing::SizeIs(1));
  ASSERT_THAT(events.exits, ::testing::SizeIs(1));
  const ChildExit& exit = events.exits[0];
  EXPECT_EQ(exit.pid, events.started[0]);
  EXPECT_EQ(exit.exit_code, 3);
  EXPECT_FALSE(exit.signal);
  EXPECT_FALSE(exit.stop_requested);
  EXPECT_GE(exit.ran_for, 150ms);
  EXPECT_LT(exit.ran_for, 10s);
  EXPECT_EQ(exit.describe(), "exited with code 3");
  EXPECT_TRUE(reaped(exit.pid)) << "pid " << exit.pid << " is still our child (a zombie)";
  EXPECT_TRUE(process_gone(exit.pid));
  EXPECT_FALSE(child.pid());
  EXPECT_THAT(events.stayed_down, ElementsAre("restart policy never"));
}

// What a child started with `argv` logs (the default logger's lines, while it runs to its end).
std::string logged_run(std::vector<std::string> argv) {
  std::ostringstream log;
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(std::make_shared<spdlog::logger>(
      "capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(log)));
  asio::io_context io;
  ChildProcess child(
      {.name = "secretive", .argv = std::move(argv), .restart = RestartPolicy::never});
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await child.start();
    EXPECT_TRUE(co_await poll_until([&] { return !child.supervising(); }, 10s));
  });
  spdlog::set_default_logger(previous);
  return log.str();
}

// What a child started with `arguments` after `/bin/sh -c "exit 0"` logs.
std::string logged_start(const std::vector<std::string>& arguments) {
  std::vector<std::string> argv{"/bin/sh", "-c", "exit 0"};
  argv.insert(argv.end(), arguments.begin(), arguments.end());
  return logged_run(std::move(argv));
}

// The start is logged with its command line, but never a password given in it.
TEST(ChildProcessTest, TheLoggedCommandLineHidesPasswords) {
  const std::string text =
      logged_start({"postgresql://app:s3cret-url@db:5432/x", "host=db password=s3cret-kv dbname=x",
                    "password='s3cret quoted' user=app", "PGPASSWORD=s3cret-env",
                    "postgres://keep@db/x", "host=db password = s3cret-spaced",
                    "password='it\\'s s3cret-escaped' user=app", "password=ab&s3cret-amp user=app",
                    "postgresql://db/x?user=app&password=s3cret-query&sslmode=require"});
  EXPECT_THAT(text, ::testing::HasSubstr("child secretive: started pid"));
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("s3cret"))) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("postgresql://app:***@db:5432/x")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("host=db password=*** dbname=x")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("password=*** user=app")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("PGPASSWORD=***")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("postgres://keep@db/x")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("password = ***")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("password=***&sslmode=require")) << text;
}

// Passwords the logged command line hides besides password=: the argument after an option that
// names a password (`--password s3cret`, as many programs take it), and a URL's password with a
// '?' or '#' in it (libpq ends a URL's credentials at the '@', and only a '/' before it).
TEST(ChildProcessTest, TheLoggedCommandLineHidesAPasswordGivenAsTheNextArgument) {
  const std::string text =
      logged_start({"--password", "s3cret-next", "--DB-Password", "s3cret-named", "--passwd",
                    "s3cret-short", "postgresql://app:s3c?ret-query@db/x",
                    "postgresql://app:s3c#ret-hash@db/x", "--user", "app"});
  EXPECT_THAT(text, ::testing::HasSubstr("child secretive: started pid"));
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("s3c"))) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("--password *** --DB-Password *** --passwd ***")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("postgresql://app:***@db/x")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("--user app")) << text;
}

// libpq ends a URL's password only at the '@' (or a '/' before it): a blank or a quote in it is
// part of it, and the log hid none of a password with one (`postgresql://app:s3cret with
// blanks@db/x` was logged whole, as the hiding stopped at the blank and found no '@' before it).
TEST(ChildProcessTest, TheLoggedCommandLineHidesAUrlsPasswordWithABlankOrAQuoteInIt) {
  const std::string text =
      logged_start({"postgresql://app:s3c ret-blank@db/x", "postgresql://app:s3c\"ret-dq@db/x",
                    "postgres://app:s3c'ret-sq@db", "--dsn=postgresql://app:s3c\tret-tab@db/x",
                    "postgresql://keep@db/x"});
  EXPECT_THAT(text, ::testing::HasSubstr("child secretive: started pid"));
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("ret-"))) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("postgresql://app:***@db/x postgresql://app:***@db/x "
                                         "postgres://app:***@db --dsn=postgresql://app:***@db/x "
                                         "postgresql://keep@db/x"))
      << text;
}

// An unquoted conninfo value takes libpq's backslash escapes (`password=s3c\ ret` is "s3c ret"):
// the log hid the value only up to the escaped blank, and showed the rest of the password.
TEST(ChildProcessTest, TheLoggedCommandLineHidesAnUnquotedConninfoPasswordWithAnEscapedBlank) {
  const std::string text =
      logged_start({"host=db password=s3c\\ ret-escaped user=app", "password=s3c\\\\ user=app2"});
  EXPECT_THAT(text, ::testing::HasSubstr("child secretive: started pid"));
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("ret-"))) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("host=db password=*** user=app password=*** user=app2"))
      << text;
}

// An option that says there is no password (libpq tools' --no-password, -w) takes no value: the
// argument after it is not a password, and the log shows it.
TEST(ChildProcessTest, TheLoggedCommandLineShowsTheArgumentAfterANoPasswordOption) {
  const std::string text = logged_start(
      {"--", "--no-password", "--file", "/backups/app.sql", "--password", "s3cret-next"});
  EXPECT_THAT(text, ::testing::HasSubstr("-- --no-password --file /backups/app.sql --password ***"))
      << text;
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("s3cret"))) << text;
}

// psql's --password (-W), as that of pg_dump and libpq's other client programs, takes no value: it
// makes the program prompt for the password. An option after it is shown (`psql --password
// --dbname orders` was logged as `--password *** orders`); any other word after it is still
// hidden (a password given there by mistake would be one); a password given as --password=, in
// a conninfo or in a URL is still hidden, and so is the argument after another program's
// --password (TheLoggedCommandLineHidesAPasswordGivenAsTheNextArgument).
TEST(ChildProcessTest, TheLoggedCommandLineShowsTheArgumentAfterALibpqToolsPasswordFlag) {
  const auto directory =
      std::filesystem::temp_directory_path() / ("pgrt-child-tools-" + std::to_string(::getpid()));
  std::filesystem::create_directories(directory);
  for (const char* tool : {"psql", "pg_dump"}) {
    std::filesystem::remove(directory / tool);
    std::filesystem::create_symlink("/bin/true", directory / tool);
  }
  const std::string psql =
      logged_run({(directory / "psql").string(), "--password", "--dbname",
                  "host=db password=s3cret-kv dbname=orders", "-W", "--command", "SELECT 1",
                  "--password=s3cret-eq", "postgresql://app:s3cret-url@db/orders"});
  const std::string pg_dump = logged_run(
      {(directory / "pg_dump").string(), "--password", "orders", "--file", "/backups/o.sql"});
  // A value given to it by mistake may be a password: still hidden (as is any word but an option).
  const std::string mistaken =
      logged_run({(directory / "psql").string(), "--password", "s3cret-given", "--dbname", "x"});
  std::filesystem::remove_all(directory);
  EXPECT_THAT(psql, ::testing::HasSubstr("psql --password --dbname host=db password=*** "
                                         "dbname=orders -W --command SELECT 1 --password=*** "
                                         "postgresql://app:***@db/orders"))
      << psql;
  EXPECT_THAT(psql, ::testing::Not(::testing::HasSubstr("s3cret"))) << psql;
  EXPECT_THAT(pg_dump, ::testing::HasSubstr("pg_dump --password *** --file /backups/o.sql"))
      << pg_dump;
  EXPECT_THAT(mistaken, ::testing::HasSubstr("psql --password *** --dbname x")) << mistaken;
  EXPECT_THAT(mistaken, ::testing::Not(::testing::HasSubstr("s3cret"))) << mistaken;
}

// A password in JSON (`{"password": "s3cret"}`, as a sidecar may take its configuration in an
// argument) has a ':' after its quoted key, not a '=': the log showed it.
TEST(ChildProcessTest, TheLoggedCommandLineHidesAPasswordInJson) {
  const std::string text = logged_start(
      {R"({"user": "app", "password": "s3cret-spaced", "db": "x"})",
       R"({"password":"s3c\"ret-escaped","db":"y"})", R"('password' : 's3cret-sq')",
       R"({"DB_Password": 12345678})", "password: s3cret-yaml", R"({:password => "s3cret-ruby"})"});
  EXPECT_THAT(text, ::testing::HasSubstr("child secretive: started pid"));
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("s3c"))) << text;
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("12345678"))) << text;
  EXPECT_THAT(text, ::testing::HasSubstr(R"({"user": "app", "password": ***, "db": "x"})")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr(R"({"password":***,"db":"y"})")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr(R"('password' : ***)")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("password: ***")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("{:password => ***}")) << text;
}

// libpq decodes a URL query parameter's name as well as its value (`?pass%77ord=s3cret` is the
// password) and ends the value only at the next '&' (a blank is part of it): the log showed a
// password under a %-encoded name, and the rest of one after a blank or a quote. A %-encoded
// password in the credentials, and sslpassword, are hidden whole; so is a password with an
// unencoded '/' (which libpq misreads: the '@' is after the '/'), which the log showed.
TEST(ChildProcessTest, TheLoggedCommandLineHidesAUrlsPasswordUnderAPercentEncodedName) {
  const std::string text = logged_start(
      {"postgresql://app:s3%63ret-userinfo@db/x", "postgresql://db/x?pass%77ord=s3cret-key&a=1",
       "postgresql://db/x?%70%61%73%73%77%6F%72%64=s3cret-all&b=2",
       "postgresql://db/x?sslpassword=s3cret-ssl&c=3", "postgresql://db/x?PASSWORD=s3cret-case",
       "postgresql://db/x?password=s3c ret-blank&d=4", "postgres://db?ssl%70assword=s3%63ret&e=5",
       "postgresql://db/x?password='s3c'ret-quote&f=6", "postgresql://app:s3/cret-slash@db/x"});
  EXPECT_THAT(text, ::testing::HasSubstr("child secretive: started pid"));
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("s3c"))) << text;
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("ret-"))) << text;
  EXPECT_THAT(text, ::testing::HasSubstr(
                        "postgresql://app:***@db/x postgresql://db/x?pass%77ord=***&a=1 "
                        "postgresql://db/x?%70%61%73%73%77%6F%72%64=***&b=2 "
                        "postgresql://db/x?sslpassword=***&c=3 postgresql://db/x?PASSWORD=*** "
                        "postgresql://db/x?password=***&d=4 postgres://db?ssl%70assword=***&e=5 "
                        "postgresql://db/x?password=***&f=6 postgresql://app:***@db/x"))
      << text;
}

// getopt_long takes any unambiguous abbreviation of a long option (`--passw=s3cret`, `--passwo
// s3cret`), mysql's and sshpass's -p and redis-cli's -a are a password (`-ps3cret` or, for the
// last two, `-p s3cret`), curl's -u holds user:password, and a `sh -c` script holds whole command
// lines: the log showed all of these, and MYSQL_PWD=, libpq 18's oauth_client_secret= and
// `--password:s3cret`. psql's -p (and any other program's) is a port, and stays shown.
TEST(ChildProcessTest, TheLoggedCommandLineHidesAbbreviatedAndShortPasswordOptions) {
  const auto directory =
      std::filesystem::temp_directory_path() / ("pgrt-child-short-" + std::to_string(::getpid()));
  std::filesystem::create_directories(directory);
  for (const char* tool : {"psql", "mysql", "sshpass", "redis-cli", "curl"}) {
    std::filesystem::remove(directory / tool);
    std::filesystem::create_symlink("/bin/true", directory / tool);
  }
  const std::string generic =
      logged_start({"--passw=s3cret-eq", "--passwo", "s3cret-next", "--Pass", "s3cret-pass",
                    "--db-pass=s3cret-db", "-p", "5433", "--passfile", "/run/pgpass",
                    "MYSQL_PWD=s3cret-pwd", "oauth_client_secret=s3cret-oauth", "--client-secret",
                    "s3cret-next-secret", "--password:s3cret-colon"});
  const std::string psql = logged_run({(directory / "psql").string(), "-p", "5433", "-W",
                                       "s3cret-w", "--passw", "--dbname", "orders", "-p5434"});
  const std::string mysql =
      logged_run({(directory / "mysql").string(), "-uapp", "-ps3cret-attached", "-vps3cret-cluster",
                  "-p", "s3cret-mistaken", "-p", "--host", "db", "--port", "3306"});
  const std::string sshpass = logged_run(
      {(directory / "sshpass").string(), "-p", "s3cret-next", "-ps3cret-attached", "ssh", "db"});
  const std::string redis = logged_run(
      {(directory / "redis-cli").string(), "-h", "db", "-a", "s3cret-next", "-as3cret-attached"});
  const std::string curl = logged_run({(directory / "curl").string(), "-u", "admin:s3cret-next",
                                       "-uadmin:s3cret-attached", "--user=admin:s3cret-eq",
                                       "--user-agent", "x", "-u", "admin", "https://h/"});
  const std::string script = logged_run(
      {"/bin/sh", "-c",
       "exit 0; PGPASSWORD=s3'cr et-quoted' psql -p 5433; exec mysql -uapp -ps3cret-mysql "
       "orders && psql --password s3cret-psql\nredis-cli -a \"s3cret redis\" ping | env "
       "sshpass -p s3cret-sshpass ssh db; sh -c 'mysql -ps3cret-nested'; psql -p 5434"});
  std::filesystem::remove_all(directory);
  for (const std::string* text : {&generic, &psql, &mysql, &sshpass, &redis, &curl, &script}) {
    EXPECT_THAT(*text, ::testing::HasSubstr("child secretive: started pid"));
    EXPECT_THAT(*text, ::testing::Not(::testing::HasSubstr("s3c"))) << *text;
    EXPECT_THAT(*text, ::testing::Not(::testing::HasSubstr("redis\""))) << *text;
  }
  EXPECT_THAT(generic, ::testing::HasSubstr("--passw=*** --passwo *** --Pass *** --db-pass=*** "
                                            "-p 5433 --passfile /run/pgpass MYSQL_PWD=*** "
                                            "oauth_client_secret=*** --client-secret *** "
                                            "--password:***"))
      << generic;
  EXPECT_THAT(psql, ::testing::HasSubstr("psql -p 5433 -W *** --passw --dbname orders -p5434"))
      << psql;
  EXPECT_THAT(mysql,
              ::testing::HasSubstr("mysql -uapp -p*** -vp*** -p *** -p --host db --port 3306"))
      << mysql;
  EXPECT_THAT(sshpass, ::testing::HasSubstr("sshpass -p *** -p*** ssh db")) << sshpass;
  EXPECT_THAT(redis, ::testing::HasSubstr("redis-cli -h db -a *** -a***")) << redis;
  EXPECT_THAT(curl, ::testing::HasSubstr("curl -u admin:*** -uadmin:*** --user=admin:*** "
                                         "--user-agent x -u admin https://h/"))
      << curl;
  EXPECT_THAT(script, ::testing::HasSubstr("psql -p 5433;")) << script;
  EXPECT_THAT(script, ::testing::HasSubstr("psql -p 5434")) << script;
}

// A program behind a wrapper and the wrapper's own options and values (`sudo -u app mysql
// -ps3cret`, `nice -n 10 redis-cli -a ...`, `docker exec db mysql ...`): the wrapper's value was
// taken for the program, whose password options were then not known, and the log showed them.
TEST(ChildProcessTest, TheLoggedCommandLineHidesAPasswordOptionBehindAWrapper) {
  const std::string script = logged_run(
      {"/bin/sh", "-c",
       "exit 0; sudo -u app mysql -ps3cret-sudo; nice -n 10 redis-cli -a s3cret-nice; docker exec "
       "db mysql -ps3cret-docker; timeout 30 sshpass -p s3cret-timeout ssh db; kubectl exec pod "
       "-- mysql -p s3cret-kube; sudo -u app psql -p 5433"});
  EXPECT_THAT(script, ::testing::HasSubstr("child secretive: started pid"));
  EXPECT_THAT(script, ::testing::Not(::testing::HasSubstr("s3c"))) << script;
  EXPECT_THAT(script, ::testing::HasSubstr("sudo -u app psql -p 5433")) << script;
}

// SQL in an argument (`psql --command "ALTER ROLE app PASSWORD 's3cret'"`) gives the password as
// a string constant after the word PASSWORD, with no '=' or ':': the log showed it.
TEST(ChildProcessTest, TheLoggedCommandLineHidesAPasswordInSql) {
  const std::string text =
      logged_start({"ALTER ROLE app PASSWORD 's3cret-plain' LOGIN",
                    "CREATE ROLE b ENCRYPTED password 's3c''ret-doubled'; SELECT 1",
                    "ALTER USER c WITH PASSWORD E's3c\\'ret-escaped' VALID UNTIL 'infinity'",
                    "ALTER ROLE d PASSWORD $pw$s3c'ret-dollar$pw$", "ALTER ROLE e PASSWORD NULL"});
  EXPECT_THAT(text, ::testing::HasSubstr("child secretive: started pid"));
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("ret-"))) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("ALTER ROLE app PASSWORD *** LOGIN")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("CREATE ROLE b ENCRYPTED password ***; SELECT 1")) << text;
  // (The shell's reading of the E'' constant, which the log takes too, runs to the end.)
  EXPECT_THAT(text, ::testing::HasSubstr("ALTER USER c WITH PASSWORD *** ALTER ROLE d")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("ALTER ROLE d PASSWORD ***")) << text;
  EXPECT_THAT(text, ::testing::HasSubstr("ALTER ROLE e PASSWORD NULL")) << text;
}

// Credentials without a scheme (a Go MySQL DSN, `app:s3cret@tcp(db:3306)/x`, or a URL whose
// scheme was left out) were shown whole: only a URL's were hidden. `user@host:path` (scp, git)
// holds no password and is shown.
TEST(ChildProcessTest, TheLoggedCommandLineHidesCredentialsWithoutAScheme) {
  const std::string text =
      logged_start({"app:s3cret-go@tcp(db:3306)/x", "--dsn=app:s3/cret-slash@db/x",
                    R"({"dsn": "app:s3cret-json@db"})", "user@host:/path",
                    "git@github.com:org/repo.git", "--dsn=postgres://keep@db/x"});
  EXPECT_THAT(text, ::testing::HasSubstr("child secretive: started pid"));
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("s3c"))) << text;
  EXPECT_THAT(text, ::testing::HasSubstr(R"(app:***@tcp(db:3306)/x --dsn=app:***@db/x )"
                                         R"({"dsn": "app:***@db"} user@host:/path )"
                                         "git@github.com:org/repo.git --dsn=postgres://keep@db/x"))
      << text;
}

// openssl takes a password as `-passin pass:s3cret` (and -passout), mysqladmin takes a new one
// as the word after its `password` command: the log showed both.
TEST(ChildProcessTest, TheLoggedCommandLineHidesOpensslsAndMysqladminsPasswords) {
  const auto directory =
      std::filesystem::temp_directory_path() / ("pgrt-child-openssl-" + std::to_string(::getpid()));
  std::filesystem::create_directories(directory);
  for (const char* tool : {"openssl", "mysqladmin"}) {
    std::filesystem::remove(directory / tool);
    std::filesystem::create_symlink("/bin/true", directory / tool);
  }
  const std::string openssl =
      logged_run({(directory / "openssl").string(), "pkcs12", "-export", "-passin",
                  "pass:s3cret-in", "-passout", "pass:s3cret-out", "-in", "cert.pem"});
  const std::string mysqladmin = logged_run({(directory / "mysqladmin").string(), "-uroot",
                                             "-ps3cret-old", "password", "s3cret-new", "status"});
  const std::string script = logged_run(
      {"/bin/sh", "-c",
       "exit 0; openssl rsa -passin pass:s3cret-script -in k; mysqladmin password 's3c ret'"});
  std::filesystem::remove_all(directory);
  for (const std::string* text : {&openssl, &mysqladmin, &script}) {
    EXPECT_THAT(*text, ::testing::HasSubstr("child secretive: started pid"));
    EXPECT_THAT(*text, ::testing::Not(::testing::HasSubstr("s3c"))) << *text;
  }
  EXPECT_THAT(openssl,
              ::testing::HasSubstr("openssl pkcs12 -export -passin *** -passout *** -in cert.pem"))
      << openssl;
  EXPECT_THAT(mysqladmin, ::testing::HasSubstr("mysqladmin -uroot -p*** password *** status"))
      << mysqladmin;
  EXPECT_THAT(script,
              ::testing::HasSubstr("openssl rsa -passin *** -in k; mysqladmin password ***"))
      << script;
}

// A password assigned by index or given to a call in a script (python -c "os.environ['PGPASSWORD']
// = 's3cret'", setenv("PGPASSWORD", "s3cret", 1)), and one given as the word after an empty
// `--password=`, were shown: the log looked for a key right before '=' or ':' only.
TEST(ChildProcessTest, TheLoggedCommandLineHidesAPasswordAssignedByIndexOrAfterAnEmptyValue) {
  const std::string text = logged_start(
      {"os.environ['PGPASSWORD']='s3cret-index'; os.environ[\"PGPASSWORD\"] = \"s3cret-dq\"",
       R"(os.environ.setdefault('PGPASSWORD', 's3cret-call'); setenv("PGPASSWORD", "s3c ret", 1))",
       "--password=", "s3cret-next", "--user", "app"});
  EXPECT_THAT(text, ::testing::HasSubstr("child secretive: started pid"));
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("s3c"))) << text;
  EXPECT_THAT(text, ::testing::HasSubstr(R"(os.environ['PGPASSWORD']=***; )"
                                         R"(os.environ["PGPASSWORD"] = *** )"
                                         R"(os.environ.setdefault('PGPASSWORD', ***); )"
                                         R"(setenv("PGPASSWORD", ***, 1) --password=*** *** )"
                                         "--user app"))
      << text;
}

// A password after the word "password" with only a blank between (a .netrc line written by a
// script, `machine db login app password s3cret`) or in XML (`<password>s3cret</password>`) was
// shown. SQL's PASSWORD NULL, and a '=' on its own after it, stay shown.
TEST(ChildProcessTest, TheLoggedCommandLineHidesAPasswordAfterTheWordPasswordOrInXml) {
  const std::string text = logged_start(
      {"<db><password>s3cret-xml</password></db>", "machine db login app password s3cret-netrc",
       "echo 'password\ts3cret-tab' > f", "password", "=", "s3cret-words",
       "ALTER ROLE e PASSWORD NULL", "host=db password = s3cret-spaced"});
  EXPECT_THAT(text, ::testing::HasSubstr("child secretive: started pid"));
  EXPECT_THAT(text, ::testing::Not(::testing::HasSubstr("s3c"))) << text;
  EXPECT_THAT(text,
              ::testing::HasSubstr("<db><password>***</password></db> machine db login app "
                                   "password *** echo 'password\t***' > f password = *** ALTER "
                                   "ROLE e PASSWORD NULL host=db password = ***"))
      << text;
}

// A JSON (or Python, YAML) key may spell its name with escapes: `{"pass\u0077ord": "s3cret"}` is
// the key "password" to any JSON reader. The log read the key as "u0077ord" and showed the value.
TEST(ChildProcessTest, TheLoggedCommandLineHidesAPasswordUnderAnEscapedKey) {
  const std::string text =
      logged_start({R"({"pass\u0077ord": "s3cret-u"})",
                    R"({"\u0070\u0061\u0073\u0073\u0077\u006F\u0072\u0064":"s3cret-all","db":"x"})",
                    R"({"client_s\u0065cret": "s3cret-cs", "user": "app"})",
                    R"({"db_pa\u0073\u0073wd": 12345678})", R"({'pass\x77ord': 's3cret-x'})",
                    R"({"user": "app\u0077", "note": "a\\b"})"});
  EXPECT_THAT(text, HasSubstr("child secretive: started pid"));
  EXPECT_THAT(text, Not(HasSubstr("s3c"))) << text;
  EXPECT_THAT(text, Not(HasSubstr("12345678"))) << text;
  EXPECT_THAT(text,
              HasSubstr(R"({"pass\u0077ord": ***} )"
                        R"({"\u0070\u0061\u0073\u0073\u0077\u006F\u0072\u0064":***,"db":"x"} )"
                        R"({"client_s\u0065cret": ***, "user": "app"} )"
                        R"({"db_pa\u0073\u0073wd": *** {'pass\x77ord': ***} )"
                        R"({"user": "app\u0077", "note": "a\\b"})"))
      << text;
}

// .NET's and Java's configuration give a password as an element's value beside a key that names
// it: `<add key="password" value="s3cret"/>`, `<property name="db.password" value="s3cret"/>`,
// `<entry key="password">s3cret</entry>`. The log showed them (it knew only
// `<password>s3cret</password>`). Another key's value stays shown.
TEST(ChildProcessTest, TheLoggedCommandLineHidesAPasswordInAnXmlKeyAndValue) {
  const std::string text = logged_start(
      {R"(<appSettings><add key="password" value="s3cret-add"/><add key="user" value="app"/></appSettings>)",
       R"(<property name="db.password" value='s3cret-spring' />)",
       R"(<add value="s3cret-before" key="DbPassword"/>)",
       R"(<entry key="password">s3cret-entry</entry><entry key="user">app</entry>)",
       R"(<add key="pass&#119;ord" value="s3cret-entity"/>)",
       R"(<add Key = "ClientSecret" Value = "s3cret-spaced"/>)"});
  EXPECT_THAT(text, HasSubstr("child secretive: started pid"));
  EXPECT_THAT(text, Not(HasSubstr("s3c"))) << text;
  EXPECT_THAT(text, HasSubstr(R"(<appSettings><add key="password" value=***/>)"
                              R"(<add key="user" value="app"/></appSettings> )"
                              R"(<property name="db.password" value=*** /> )"
                              R"(<add value=*** key="DbPassword"/> )"
                              R"(<entry key="password">***</entry><entry key="user">app</entry> )"
                              R"(<add key="pass&#119;ord" value=***/> )"
                              R"(<add Key = "ClientSecret" Value = ***/>)"))
      << text;
}

// Samba's tools take `-U user%password`, and htpasswd with -b takes the password as its last
// argument (`htpasswd -b file user s3cret`): the log showed both. htpasswd without -b prompts
// for the password: its arguments stay shown, and so does a '%' after another option.
TEST(ChildProcessTest, TheLoggedCommandLineHidesSambaAndHtpasswdPasswords) {
  const auto directory =
      std::filesystem::temp_directory_path() / ("pgrt-child-smb-" + std::to_string(::getpid()));
  std::filesystem::create_directories(directory);
  for (const char* tool : {"smbclient", "rpcclient", "htpasswd"}) {
    std::filesystem::remove(directory / tool);
    std::filesystem::create_symlink("/bin/true", directory / tool);
  }
  const std::string smbclient =
      logged_run({(directory / "smbclient").string(), "//srv/share", "-U", "user%s3cret-next",
                  "-Uuser%s3cret-attached", "--user=DOM\\user%s3cret-eq", "--user",
                  "app%s3cret-long", "-W", "dom", "-D", "50%"});
  const std::string rpcclient =
      logged_run({(directory / "rpcclient").string(), "-U", "admin%s3cret-rpc", "srv"});
  const std::string htpasswd = logged_run(
      {(directory / "htpasswd").string(), "-b", "/etc/nginx/htpasswd", "app", "s3cret-b"});
  const std::string combined =
      logged_run({(directory / "htpasswd").string(), "-nbB", "-C", "10", "app", "-s3cret-dash"});
  const std::string prompting =
      logged_run({(directory / "htpasswd").string(), "-c", "/etc/nginx/htpasswd", "app"});
  const std::string script = logged_run(
      {"/bin/sh", "-c",
       "exit 0; htpasswd -bc f app s3cret-script; smbclient -U app%s3cret-smb //s/x; echo 50%"});
  std::filesystem::remove_all(directory);
  for (const std::string* text : {&smbclient, &rpcclient, &htpasswd, &combined, &script}) {
    EXPECT_THAT(*text, HasSubstr("child secretive: started pid"));
    EXPECT_THAT(*text, Not(HasSubstr("s3c"))) << *text;
  }
  EXPECT_THAT(smbclient, HasSubstr("smbclient //srv/share -U user%*** -Uuser%*** "
                                   "--user=DOM\\user%*** --user app%*** -W dom -D 50%"))
      << smbclient;
  EXPECT_THAT(rpcclient, HasSubstr("rpcclient -U admin%*** srv")) << rpcclient;
  EXPECT_THAT(htpasswd, HasSubstr("htpasswd -b /etc/nginx/htpasswd app ***")) << htpasswd;
  EXPECT_THAT(combined, HasSubstr("htpasswd -nbB -C 10 app ***")) << combined;
  EXPECT_THAT(prompting, HasSubstr("htpasswd -c /etc/nginx/htpasswd app")) << prompting;
  EXPECT_THAT(script, HasSubstr("htpasswd -bc f app ***; smbclient -U app%*** //s/x; echo 50%"))
      << script;
}

// openssl enc takes a password as `-k s3cret` (and -K a key), SQL Server's sqlcmd and bcp,
// mosquitto's clients and ipmitool as `-P s3cret`, the LDAP tools as `-w s3cret`; many programs
// take a secret as `--pw`, `--auth` or `--token` (also `--api-token`, and with '='). The log showed
// all of these. Another program's -P (mysql's is a port), initdb's --auth (a method), and options
// that only begin or end alike (--tokenizer, --author, --passfile) stay shown.
// A tool's name standing elsewhere than as the program (a docker network called "net", a path
// ending in /net) does not make it the program: the mysql or redis-cli after it is still read as
// such. htpasswd's password is found by its position, whatever redirection follows it. A generic
// secret option (`--auth`) does not hide an option after it, and ldappasswd's -s and -a hide
// their passwords too.
TEST(ChildProcessRedaction, ToolNamesOutOfPlaceRedirectionsAndValueLessFlagsDoNotMisleadIt) {
  for (const std::vector<std::string>& command : std::vector<std::vector<std::string>>{
           {"docker", "run", "--rm", "--network", "net", "mysql:8", "mysql", "-hdb", "-uroot",
            "-ps3cret"},
           {"docker", "run", "-v", "/sys/class/net:/sys/class/net", "mysql:8", "mysql", "-ps3cret"},
           {"ip", "netns", "exec", "net", "redis-cli", "-a", "s3cret"},
           {"sh", "-c", "htpasswd -nbB admin s3cret > /etc/nginx/.htpasswd"},
           {"sh", "-c", "htpasswd -b /etc/h admin s3cret 2>/dev/null"},
           {"htpasswd", "-b", "/etc/h", "admin", "s3cret", ">>", "/tmp/log"},
           {"ldappasswd", "-x", "-D", "cn=admin", "-w", "s3cret", "-s", "s3cret2", "uid=u"},
           {"ldappasswd", "-x", "-a", "s3cret", "-S", "uid=u"},
       }) {
    const std::string logged = detail::logged_command_line(command);
    EXPECT_EQ(logged.find("s3cret"), std::string::npos) << logged;
  }
  EXPECT_THAT(detail::logged_command_line({"sh", "-c", "htpasswd -nbB admin s3cret > /etc/h"}),
              HasSubstr("> /etc/h"));
  EXPECT_EQ(detail::logged_command_line({"mongod", "--auth", "--bind_ip_all"}),
            "mongod --auth --bind_ip_all");
}

TEST(ChildProcessTest, TheLoggedCommandLineHidesOtherToolsAndGenericSecretOptions) {
  const auto directory =
      std::filesystem::temp_directory_path() / ("pgrt-child-tools2-" + std::to_string(::getpid()));
  std::filesystem::create_directories(directory);
  for (const char* tool :
       {"openssl", "sqlcmd", "mosquitto_pub", "ipmitool", "ldapsearch", "mysql", "initdb"}) {
    std::filesystem::remove(directory / tool);
    std::filesystem::create_symlink("/bin/true", directory / tool);
  }
  const auto run = [&](const char* tool, std::vector<std::string> arguments) {
    arguments.insert(arguments.begin(), (directory / tool).string());
    return logged_run(std::move(arguments));
  };
  const std::string openssl =
      run("openssl", {"enc", "-aes-256-cbc", "-k", "s3cret-k", "-pass", "pass:s3cret-pass", "-K",
                      "5a3c7e", "-in", "f", "-kfile", "/run/key"});
  const std::string sqlcmd = run(
      "sqlcmd", {"-S", "db", "-U", "sa", "-P", "s3cret-P", "-Ps3cret-attached", "-Q", "SELECT 1"});
  const std::string mosquitto =
      run("mosquitto_pub", {"-h", "broker", "-u", "app", "-P", "s3cret-mq", "-t", "t", "-m", "hi"});
  const std::string ipmitool = run("ipmitool", {"-I", "lanplus", "-H", "bmc", "-U", "admin", "-P",
                                                "s3cret-ipmi", "chassis", "status"});
  const std::string ldapsearch =
      run("ldapsearch", {"-x", "-D", "cn=admin", "-w", "s3cret-ldap", "-b", "dc=x"});
  const std::string mysql = run("mysql", {"-h", "db", "-P", "3306", "-uapp"});
  const std::string initdb = run("initdb", {"--auth", "scram-sha-256", "-A", "trust", "--auth=md5",
                                            "--auth-local=peer", "-D", "/data"});
  const std::string generic = logged_start(
      {"--pw", "s3cret-pw", "--pw=s3cret-pw-eq", "--auth", "s3cret-auth", "--token", "s3cret-token",
       "--token=s3cret-token-eq", "--api-token", "s3cret-api", "--auth-token=s3cret-at",
       "--tokenizer", "bert", "--author", "me", "-P", "5432", "--passfile", "/run/pgpass"});
  const std::string script = logged_run(
      {"/bin/sh", "-c",
       "exit 0; openssl enc -d -k s3cret-script -in f; tool --token=s3cret-st --pw s3cret-spw"});
  std::filesystem::remove_all(directory);
  for (const std::string* text :
       {&openssl, &sqlcmd, &mosquitto, &ipmitool, &ldapsearch, &generic, &script}) {
    EXPECT_THAT(*text, HasSubstr("child secretive: started pid"));
    EXPECT_THAT(*text, Not(HasSubstr("s3c"))) << *text;
  }
  EXPECT_THAT(openssl, HasSubstr("openssl enc -aes-256-cbc -k *** -pass *** -K *** -in f "
                                 "-kfile /run/key"))
      << openssl;
  EXPECT_THAT(sqlcmd, HasSubstr("sqlcmd -S db -U sa -P *** -P*** -Q SELECT 1")) << sqlcmd;
  EXPECT_THAT(mosquitto, HasSubstr("mosquitto_pub -h broker -u app -P *** -t t -m hi"))
      << mosquitto;
  EXPECT_THAT(ipmitool, HasSubstr("ipmitool -I lanplus -H bmc -U admin -P *** chassis status"))
      << ipmitool;
  EXPECT_THAT(ldapsearch, HasSubstr("ldapsearch -x -D cn=admin -w *** -b dc=x")) << ldapsearch;
  EXPECT_THAT(mysql, HasSubstr("mysql -h db -P 3306 -uapp")) << mysql;
  EXPECT_THAT(initdb, HasSubstr("initdb --auth scram-sha-256 -A trust --auth=md5 "
                                "--auth-local=peer -D /data"))
      << initdb;
  EXPECT_THAT(generic, HasSubstr("--pw *** --pw=*** --auth *** --token *** --token=*** "
                                 "--api-token *** --auth-token=*** --tokenizer bert --author me "
                                 "-P 5432 --passfile /run/pgpass"))
      << generic;
  EXPECT_THAT(script, HasSubstr("openssl enc -d -k *** -in f; tool --token=*** --pw ***"))
      << script;
}

// The log hides passwords at each start, on the io thread, in time linear in the command line: on
// a long argument full of '@' or "x://" (each a possible end or start of credentials) it looked
// back to the word's start, or on to its end, at each one, and a 128 KB argument (the most the
// kernel takes in one) held the io thread for seconds. Each of these 1 MB arguments (a script may
// build one; the log is built the same way from every argument) now takes well under a second, a
// debug build included (0.2-0.5 s on a loaded 2-core machine).
TEST(ChildProcessRedaction, ALongArgumentIsRedactedInLinearTime) {
  constexpr std::size_t size = 1 << 20;
  // (The old code took a minute on a 128 KB argument, so about an hour on each of these: limits
  // far above the new code's time, a sanitizer's slowdown and a busy machine still tell them
  // apart.)
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
  constexpr auto limit = 60000ms;
#else
  constexpr auto limit = 10000ms;
#endif
  const auto repeated = [](std::string_view unit, std::string_view tail = {}) {
    std::string text;
    while (text.size() + unit.size() <= size) text += unit;
    return text += tail;
  };
  for (const std::string& argument : {repeated("@"), repeated("x://"), repeated("x://", "@h"),
                                      repeated("password="), repeated("<")}) {
    const auto started = Clock::now();
    const std::string logged = detail::logged_command_line({"/usr/bin/tool", argument});
    const auto took = std::chrono::duration_cast<milliseconds>(Clock::now() - started);
    EXPECT_LT(took, limit) << argument.substr(0, 16) << "...: " << took.count() << " ms";
    EXPECT_THAT(logged, ::testing::StartsWith("/usr/bin/tool "));
  }
  // (Nothing hidden where there is nothing to hide.)
  EXPECT_EQ(detail::logged_command_line({"tool", repeated("@")}), "tool " + repeated("@"));
  EXPECT_EQ(detail::logged_command_line({"tool", repeated("x://")}), "tool " + repeated("x://"));
}

TEST(ChildProcessTest, DeathBySignalIsReported) {
  asio::io_context io;
  ChildProcess child({.name = "suicide",
                      .argv = {"/bin/sh", "-c", "kill -KILL $$"},
                      .restart = RestartPolicy::on_failure,
                      .max_restarts = 0});
  Recorder events(child);
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await child.start();
    EXPECT_TRUE(co_await poll_until([&] { return !child.supervising(); }, 10s));
  });
  ASSERT_THAT(events.exits, ::testing::SizeIs(1));
  EXPECT_EQ(events.exits[0].signal, SIGKILL);
  EXPECT_FALSE(events.exits[0].exit_code);
  EXPECT_EQ(events.exits[0].describe(), "killed by signal 9 (SIGKILL)");
  EXPECT_TRUE(reaped(events.exits[0].pid));
  ASSERT_THAT(events.stayed_down, ::testing::SizeIs(1));
  EXPECT_THAT(events.stayed_down[0], HasSubstr("restart limit reached"));
}

TEST(ChildProcessTest, StopEndsAChildThatHonoursSigterm) {
  asio::io_context io;
  ChildProcess child({.name = "sleeper", .argv = {"sleep", "60"}, .stop_grace = 20s});
  Recorder events(child);
  milliseconds stop_took{};
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await child.start();
    const auto began = Clock::now();
    co_await child.stop();
    stop_took = std::chrono::duration_cast<milliseconds>(Clock::now() - began);
    EXPECT_FALSE(child.supervising());
  });
  EXPECT_LT(stop_took, 10s);
  ASSERT_THAT(events.exits, ::testing::SizeIs(1));
  EXPECT_EQ(events.exits[0].signal, SIGTERM);
  EXPECT_TRUE(events.exits[0].stop_requested);
  EXPECT_TRUE(events.restarts.empty());
  EXPECT_TRUE(reaped(events.exits[0].pid));
}

// Durations too long for the clock (steady_clock counts nanoseconds: about 292 years) mean no
// limit, not a deadline that overflowed into the past: a stop_grace of milliseconds::max() still
// lets a child that honours SIGTERM end by it (no SIGKILL at once), and a restart_window of
// milliseconds::max() still counts every restart against max_restarts.
TEST(ChildProcessTest, DurationsTooLongForTheClockMeanNoLimit) {
  asio::io_context io;
  ChildProcess sleeper(
      {.name = "sleeper", .argv = {"sleep", "60"}, .stop_grace = milliseconds::max()});
  Recorder sleeper_events(sleeper);
  ChildProcess failing({.name = "failing",
                        .argv = {"/bin/sh", "-c", "exit 3"},
                        .backoff_initial = 1ms,
                        .backoff_max = 1ms,
                        .max_restarts = 2,
                        .restart_window = milliseconds::max()});
  Recorder failing_events(failing);
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await sleeper.start();
    co_await sleeper.stop();
    co_await failing.start();
    EXPECT_TRUE(co_await poll_until([&] { return !failing.supervising(); }, 10s));
  });
  ASSERT_THAT(sleeper_events.exits, ::testing::SizeIs(1));
  EXPECT_EQ(sleeper_events.exits[0].signal, SIGTERM);
  EXPECT_EQ(failing.restarts(), 2U);
  EXPECT_THAT(failing_events.exits, ::testing::SizeIs(3));
  ASSERT_THAT(failing_events.stayed_down, ::testing::SizeIs(1));
  EXPECT_THAT(failing_events.stayed_down[0], HasSubstr("restart limit reached"));
}

// 2. A child that ignores SIGTERM gets SIGKILL once the grace period is over.
TEST(ChildProcessTest, SigtermIgnoredMeansSigkillAfterTheGrace) {
  TempDir dir;
  const auto ready = dir / "ready";
  asio::io_context io;
  ChildProcess child(
      {.name = "stubborn",
       .argv = {"/bin/sh", "-c", "trap '' TERM; echo ready > '" + ready.string() + "'; sleep 60"},
       .stop_grace = 700ms});
  Recorder events(child);
  milliseconds stop_took{};
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await child.start();
    EXPECT_TRUE(co_await poll_until([&] { return fs::exists(ready); }, 10s));
    const auto began = Clock::now();
    co_await child.stop();
    stop_took = std::chrono::duration_cast<milliseconds>(Clock::now() - began);
  });
  EXPECT_GE(stop_took, 650ms);  // it waited out the grace...
  EXPECT_LT(stop_took, 8s);     // ...and not the 60 s
  ASSERT_THAT(events.exits, ::testing::SizeIs(1));
  EXPECT_EQ(events.exits[0].signal, SIGKILL);
  EXPECT_TRUE(events.exits[0].stop_requested);
  EXPECT_TRUE(reaped(events.exits[0].pid));
  EXPECT_TRUE(process_gone(events.exits[0].pid));
}

// Cancelling stop() (the manager's stop deadline) SIGKILLs at once, without the grace.
TEST(ChildProcessTest, CancelledStopKillsAtOnce) {
  TempDir dir;
  const auto ready = dir / "ready";
  asio::io_context io;
  ChildProcess child(
      {.name = "stubborn",
       .argv = {"/bin/sh", "-c", "trap '' TERM; echo ready > '" + ready.string() + "'; sleep 60"},
       .stop_grace = 30s});
  Recorder events(child);
  milliseconds stop_took{};
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await child.start();
    EXPECT_TRUE(co_await poll_until([&] { return fs::exists(ready); }, 10s));
  });
  io.restart();
  asio::cancellation_signal cancel;
  bool stopped = false;
  const auto began = Clock::now();
  asio::co_spawn(io, child.stop(),
                 asio::bind_cancellation_slot(cancel.slot(), [&](const std::exception_ptr& error) {
                   EXPECT_FALSE(error);
                   stopped = true;
                   stop_took = std::chrono::duration_cast<milliseconds>(Clock::now() - began);
                 }));
  asio::steady_timer deadline(io, 300ms);
  deadline.async_wait([&](auto) { cancel.emit(asio::cancellation_type::terminal); });
  io.run_for(20s);
  ASSERT_TRUE(stopped);
  EXPECT_LT(stop_took, 10s);  // far below the 30 s grace
  ASSERT_THAT(events.exits, ::testing::SizeIs(1));
  EXPECT_EQ(events.exits[0].signal, SIGKILL);
  EXPECT_TRUE(reaped(events.exits[0].pid));
}

// 3. stop() signals the whole process group: a grandchild goes too, and gets the SIGTERM itself
// (not only the SIGKILL that clears the group once the child is gone): the child ignores SIGTERM,
// the grandchild writes a mark when it gets one. The child ignores SIGTERM before it names the
// grandchild (a stop() in between would end the child at once and SIGKILL the group before the
// grandchild's trap ran), and after it started it (a shell cannot trap a signal ignored on entry).
TEST(ChildProcessTest, GrandchildDiesOnStop) {
  TempDir dir;
  const auto grandchild_file = dir / "grandchild";
  const auto ready_file = dir / "ready";
  const auto termed_file = dir / "termed";
  asio::io_context io;
  const std::string grandchild_script = "trap \"echo term > '" + termed_file.string() +
                                        "'; exit 0\" TERM; echo ready > '" + ready_file.string() +
                                        "'; sleep 60 & wait";
  ChildProcess child(
      {.name = "family",
       .argv = {"/bin/sh", "-c",
                "/bin/sh -c \"$GRANDCHILD\" & grandchild=$!; trap '' TERM; echo $grandchild > '" +
                    grandchild_file.string() + ".tmp'; mv '" + grandchild_file.string() +
                    ".tmp' '" + grandchild_file.string() + "'; wait; exec sleep 60"},
       .env = {{"GRANDCHILD", grandchild_script}},
       .stop_grace = 500ms});
  Recorder events(child);
  pid_t grandchild = 0;
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await child.start();
    EXPECT_TRUE(co_await poll_until(
        [&] { return fs::exists(grandchild_file) && fs::exists(ready_file); }, 10s));
    grandchild = static_cast<pid_t>(std::stol(read_file(grandchild_file).value_or("0")));
    EXPECT_GT(grandchild, 0);
    EXPECT_FALSE(process_gone(grandchild)) << "the grandchild should run before stop()";
    co_await child.stop();
  });
  ASSERT_GT(grandchild, 0);
  const bool gone = wait_until([&] { return process_gone(grandchild); }, 5s);
  if (!gone) ::kill(grandchild, SIGKILL);  // leave nothing behind
  EXPECT_TRUE(gone) << "grandchild " << grandchild << " survived stop()";
  EXPECT_TRUE(wait_until([&] { return fs::exists(termed_file); }, 5s))
      << "the grandchild never got stop()'s SIGTERM";
  ASSERT_THAT(events.exits, ::testing::SizeIs(1));
  EXPECT_EQ(events.exits[0].signal, SIGKILL) << "the child ignores SIGTERM";
  EXPECT_TRUE(reaped(events.exits[0].pid));
}

// A `sh -c` wrapper dies on SIGTERM at once; the worker under it traps SIGTERM and needs a
// moment to wind down. stop_grace is for the whole group: the worker gets it too, and is not
// SIGKILLed the moment the wrapper is gone.
TEST(ChildProcessTest, AGrandchildWindingDownGetsTheRestOfTheGrace) {
  TempDir dir;
  const auto ready_file = dir / "ready";
  const auto clean_file = dir / "clean";
  asio::io_context io;
  const std::string worker = "trap \"sleep 0.4; echo clean > '" + clean_file.string() +
                             "'; exit 0\" TERM; echo ready > '" + ready_file.string() +
                             "'; while :; do sleep 0.05; done";
  ChildProcess child({.name = "wrapper",
                      .argv = {"/bin/sh", "-c", "/bin/sh -c \"$WORKER\" & wait"},
                      .env = {{"WORKER", worker}},
                      .stop_grace = 5s});
  Recorder events(child);
  milliseconds stop_took{};
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await child.start();
    EXPECT_TRUE(co_await poll_until([&] { return fs::exists(ready_file); }, 10s));
    const auto began = Clock::now();
    co_await child.stop();
    stop_took = std::chrono::duration_cast<milliseconds>(Clock::now() - began);
  });
  EXPECT_TRUE(fs::exists(clean_file)) << "the worker was killed mid-shutdown";
  EXPECT_GE(stop_took, 350ms);  // it waited for the worker...
  EXPECT_LT(stop_took, 4s);     // ...not for the whole grace
  ASSERT_THAT(events.exits, ::testing::SizeIs(1));
  EXPECT_EQ(events.exits[0].signal, SIGTERM);
}

// The helper of ChildDiesWithASigkilledParent: a parent that starts a child, writes its pid to
// the file named by PGRT_CHILD_PROCESS_HELPER_PID_FILE and waits to be SIGKILLed (30 s at most).
TEST(ChildProcessHelper, DISABLED_RunsAChildUntilKilled) {
  const char* pid_file = std::getenv(helper_env);
  if (pid_file == nullptr) GTEST_SKIP() << "only run by ChildDiesWithASigkilledParent";
  asio::io_context io;
  ChildProcess child({.name = "orphan", .argv = {"sleep", "60"}});
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await child.start();
    const std::string temporary = std::string(pid_file) + ".tmp";
    std::ofstream(temporary) << *child.pid();
    fs::rename(temporary, pid_file);
    co_await sleep_for(20s);
    co_await child.stop();
  });
}

// 4. A SIGKILLed parent leaves no child behind (PR_SET_PDEATHSIG).
TEST(ChildProcessTest, ChildDiesWithASigkilledParent) {
  TempDir dir;
  const auto pid_file = dir / "child_pid";
  // The parent is this test binary, run again with only the helper test: a clean process.
  std::string self = fs::read_symlink("/proc/self/exe").string();
  std::vector<std::string> arguments = {self,
                                        "--gtest_filter=ChildProcessHelper.*RunsAChildUntilKilled",
                                        "--gtest_also_run_disabled_tests"};
  std::vector<std::string> variables;
  for (char** entry = environ; *entry != nullptr; ++entry) variables.emplace_back(*entry);
  variables.push_back(std::string(helper_env) + "=" + pid_file.string());
  std::vector<char*> argv;
  for (auto& argument : arguments) argv.push_back(argument.data());
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (auto& variable : variables) envp.push_back(variable.data());
  envp.push_back(nullptr);

  const pid_t parent = ::fork();
  ASSERT_GE(parent, 0);
  if (parent == 0) {
    ::execve(self.c_str(), argv.data(), envp.data());
    ::_exit(127);
  }
  struct Reaper {  // the helper never outlives the test
    pid_t pid;
    ~Reaper() {
      if (pid <= 0) return;
      ::kill(pid, SIGKILL);
      int status = 0;
      ::waitpid(pid, &status, 0);
    }
  } reaper{parent};

  ASSERT_TRUE(wait_until([&] { return fs::exists(pid_file); }, 30s))
      << "the helper parent did not start its child";
  const auto child = static_cast<pid_t>(std::stol(read_file(pid_file).value_or("0")));
  ASSERT_GT(child, 0);
  ASSERT_FALSE(process_gone(child));

  ASSERT_EQ(::kill(parent, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(parent, &status, 0), parent);
  reaper.pid = 0;  // reaped already
  ASSERT_TRUE(WIFSIGNALED(status));

  const auto killed = Clock::now();
  const bool gone = wait_until([&] { return process_gone(child); }, 5s);
  if (!gone) ::kill(child, SIGKILL);
  EXPECT_TRUE(gone) << "child " << child << " outlived its SIGKILLed parent";
  EXPECT_LT(Clock::now() - killed, 3s);
}

// 5. A crash loop backs off: restarts spaced by doubling delays, capped, then it stays down.
TEST(ChildProcessTest, CrashLoopBacksOffThenStaysDown) {
  asio::io_context io;
  ChildProcess child({.name = "crasher",
                      .argv = {"/bin/sh", "-c", "exit 1"},
                      .restart = RestartPolicy::on_failure,
                      .backoff_initial = 100ms,
                      .backoff_max = 400ms,
                      .max_restarts = 4,
                      .restart_window = 0ms});
  Recorder events(child);
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await child.start();
    EXPECT_TRUE(co_await poll_until([&] { return !child.supervising(); }, 20s));
    co_await sleep_for(300ms);  // nothing more starts
  });
  ASSERT_THAT(events.started, ::testing::SizeIs(5));  // the start and four restarts
  ASSERT_THAT(events.exits, ::testing::SizeIs(5));
  std::vector<milliseconds> delays;
  for (const auto& restart : events.restarts) delays.push_back(restart.delay);
  ASSERT_THAT(delays, ElementsAre(100ms, 200ms, 400ms, 400ms));
  EXPECT_EQ(child.restarts(), 4U);
  for (const auto& exit : events.exits) {
    EXPECT_EQ(exit.exit_code, 1);
    EXPECT_TRUE(reaped(exit.pid));
  }
  ASSERT_THAT(events.stayed_down, ::testing::SizeIs(1));
  EXPECT_THAT(events.stayed_down[0], HasSubstr("restart limit reached: 4 restarts"));

  // The gaps between starts, from the events' timestamps: each at least its delay (which grew:
  // checked above), and not much more (a run of `exit 1` is short; generous for a busy machine).
  for (std::size_t i = 1; i < events.started_at.size(); ++i) {
    const auto gap =
        std::chrono::duration_cast<milliseconds>(events.started_at[i] - events.started_at[i - 1]);
    EXPECT_GE(gap, delays[i - 1]) << "restart " << i;
    EXPECT_LT(gap, delays[i - 1] + 3s) << "restart " << i;
  }
  EXPECT_GE(events.started_at.back() - events.started_at.front(), 1100ms);
}

// A run that lasted backoff_reset_after resets the delay: a child that fails after a long run is
// not punished for the failures before it.
TEST(ChildProcessTest, ALongRunResetsTheBackoff) {
  asio::io_context io;
  ChildProcess child({.name = "slow-crasher",
                      .argv = {"/bin/sh", "-c", "sleep 0.3; exit 1"},
                      .backoff_initial = 50ms,
                      .backoff_max = 5s,
                      .backoff_reset_after = 200ms,
                      .max_restarts = 3});
  Recorder events(child);
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await child.start();
    EXPECT_TRUE(co_await poll_until([&] { return !child.supervising(); }, 20s));
  });
  std::vector<milliseconds> delays;
  for (const auto& restart : events.restarts) delays.push_back(restart.delay);
  EXPECT_THAT(delays, ElementsAre(50ms, 50ms, 50ms));
  EXPECT_THAT(events.stayed_down, ElementsAre(HasSubstr("restart limit reached: 3 restarts")));
}

// A subscriber that throws from any of the events hides it from none of the others and does not
// unwind the supervision: the start succeeds, the child is restarted, the restarts are counted,
// and it stays down at the limit. (With plain signals the throw skipped the subscribers after it
// and escaped into the supervisor: from `started`, start() failed and killed the child; from
// `exited` or `restart_scheduled`, the watch ended and the crashed child was never restarted.)
TEST(ChildProcessTest, ASubscriberThatThrowsHidesNoEventAndStopsNoRestart) {
  const std::vector<std::string> events_thrown_from{"started", "exited", "restart_scheduled",
                                                    "stayed_down"};
  for (const std::string& thrown_from : events_thrown_from) {
    SCOPED_TRACE("a subscriber of " + thrown_from + " throws");
    asio::io_context io;
    ChildProcess child({.name = "thrown-at",
                        .argv = {"/bin/sh", "-c", "exit 1"},
                        .backoff_initial = 10ms,
                        .max_restarts = 2,
                        .restart_window = 0ms});
    scoped_connection throwing;
    if (thrown_from == "started") {
      throwing = child.events().started.connect([](pid_t) { throw std::runtime_error("started"); });
    } else if (thrown_from == "exited") {
      throwing = child.events().exited.connect([](const ChildExit&) { throw 7; });
    } else if (thrown_from == "restart_scheduled") {
      throwing = child.events().restart_scheduled.connect(
          [](const ChildRestart&) { throw std::runtime_error("restart_scheduled"); });
    } else {
      throwing = child.events().stayed_down.connect(
          [](const std::string&) { throw std::runtime_error("stayed_down"); });
    }
    Recorder events(child);  // connected after the throwing subscriber
    EXPECT_NO_THROW(run_on(io, [&]() -> asio::awaitable<void> {
      co_await child.start();
      EXPECT_TRUE(co_await poll_until([&] { return !child.supervising(); }, 20s));
    }));
    EXPECT_THAT(events.started, ::testing::SizeIs(3));  // the start and two restarts
    EXPECT_THAT(events.exits, ::testing::SizeIs(3));
    EXPECT_THAT(events.restarts, ::testing::SizeIs(2));
    EXPECT_EQ(child.restarts(), 2U);
    EXPECT_THAT(events.stayed_down, ElementsAre(HasSubstr("restart limit reached: 2 restarts")));
    for (const auto& exit : events.exits) EXPECT_TRUE(reaped(exit.pid));
  }
}

TEST(ChildProcessTest, RestartsAfterAFailureWithinTheWindow) {
  TempDir dir;
  const auto runs = dir / "runs";
  asio::io_context io;
  // Fails on its first run, then succeeds: on_failure restarts it once, then it stays down.
  ChildProcess child({.name = "flaky",
                      .argv = {"/bin/sh", "-c",
                               "echo run >> '" + runs.string() + "'; [ $(wc -l < '" +
                                   runs.string() + "') -ge 2 ]"},
                      .backoff_initial = 50ms});
  Recorder events(child);
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await child.start();
    EXPECT_TRUE(co_await poll_until([&] { return !child.supervising(); }, 20s));
  });
  ASSERT_THAT(events.exits, ::testing::SizeIs(2));
  EXPECT_EQ(events.exits[0].exit_code, 1);
  EXPECT_EQ(events.exits[1].exit_code, 0);
  EXPECT_THAT(events.stayed_down, ElementsAre("exited with code 0"));
}

TEST(ChildProcessTest, EnvironmentAndWorkingDirectory) {
  TempDir dir;
  ::setenv("PGRT_CHILD_INHERITED", "from-parent", 1);
  asio::io_context io;
  ChildProcess replaced(
      {.name = "replaced",
       .argv = {"/bin/sh", "-c", "printf '%s|%s|%s' \"$VALUE\" \"$(pwd)\" \"${HOME-unset}\" > out"},
       .env = {{"VALUE", "42"}},
       .inherit_environment = false,
       .working_directory = dir.path().string(),
       .restart = RestartPolicy::never});
  ChildProcess added(
      {.name = "added",
       .argv = {"sh", "-c", "printf '%s|%s' \"$PGRT_CHILD_INHERITED\" \"$VALUE\" > out2"},
       .env = {{"VALUE", "7"}},
       .working_directory = dir.path().string(),
       .restart = RestartPolicy::never});
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await replaced.start();
    co_await added.start();
    EXPECT_TRUE(
        co_await poll_until([&] { return !replaced.supervising() && !added.supervising(); }, 10s));
  });
  EXPECT_EQ(read_file(dir / "out"), "42|" + fs::canonical(dir.path()).string() + "|unset");
  EXPECT_EQ(read_file(dir / "out2"), "from-parent|7");
  ::unsetenv("PGRT_CHILD_INHERITED");
}

// Exec of a missing program fails start() with a clear error, and leaves nothing behind.
TEST(ChildProcessTest, MissingProgramFailsStart) {
  asio::io_context io;
  ChildProcess by_path({.argv = {"/nonexistent/pgrt-no-such-program", "--flag"}});
  ChildProcess by_name({.argv = {"pgrt-no-such-program"}, .env = {{"PATH", "/usr/bin:/bin"}}});
  ChildProcess bad_directory(
      {.argv = {"/bin/true"}, .working_directory = "/nonexistent/pgrt-directory"});
  run_on(io, [&]() -> asio::awaitable<void> {
    try {
      co_await by_path.start();
      ADD_FAILURE() << "start() should have thrown";
    } catch (const std::system_error& error) {
      EXPECT_EQ(error.code(), std::error_code(ENOENT, std::system_category()));
      EXPECT_THAT(error.what(), HasSubstr("cannot execute '/nonexistent/pgrt-no-such-program'"));
      EXPECT_THAT(error.what(), HasSubstr("pgrt-no-such-program"));
    }
    EXPECT_FALSE(by_path.supervising());
    try {
      co_await by_name.start();
      ADD_FAILURE() << "start() should have thrown";
    } catch (const std::system_error& error) {
      EXPECT_EQ(error.code(), std::error_code(ENOENT, std::system_category()));
      EXPECT_THAT(error.what(), HasSubstr("'pgrt-no-such-program': not found in PATH"));
    }
    try {
      co_await bad_directory.start();
      ADD_FAILURE() << "start() should have thrown";
    } catch (const std::system_error& error) {
      EXPECT_EQ(error.code(), std::error_code(ENOENT, std::system_category()));
      EXPECT_THAT(error.what(), HasSubstr("'/nonexistent/pgrt-directory'"));
    }
    co_await by_path.stop();  // nothing to stop
  });
  int status = 0;
  EXPECT_LE(::waitpid(-1, &status, WNOHANG), 0) << "a failed start left a zombie behind";
}

TEST(ChildProcessTest, UnworkableOptionsAreRefused) {
  EXPECT_THROW(ChildProcess({.name = "empty"}), std::invalid_argument);
  EXPECT_THROW(ChildProcess({.argv = {""}}), std::invalid_argument);
  EXPECT_THROW(ChildProcess({.argv = {"/bin/true", std::string("a\0b", 3)}}),
               std::invalid_argument);
  EXPECT_THROW(ChildProcess({.argv = {"/bin/true"}, .env = {{"A=B", "c"}}}), std::invalid_argument);
  EXPECT_THROW(ChildProcess({.argv = {"/bin/true"}, .backoff_initial = 2s, .backoff_max = 1s}),
               std::invalid_argument);
}

// Destroyed while its child runs (no stop(), the io_context stopped): the child is killed and
// reaped, by the destructor and the watch's end.
TEST(ChildProcessTest, DestroyedWhileRunningLeavesNothing) {
  pid_t pid = 0;
  {
    asio::io_context io;
    ChildProcess child({.name = "abandoned", .argv = {"sleep", "60"}});
    run_on(io, [&]() -> asio::awaitable<void> {
      co_await child.start();
      pid = child.pid().value_or(0);
    });
  }
  ASSERT_GT(pid, 0);
  EXPECT_TRUE(reaped(pid));
  EXPECT_TRUE(process_gone(pid));
}

// As a component of the manager: started with the others, stopped on request, nothing left.
TEST(ChildProcessTest, RunsUnderTheManager) {
  ManagerOptions options;
  options.handle_signals = false;
  options.shutdown_logging = false;  // later tests still log
  Manager app(options);
  auto& child = app.add(ChildProcess({.name = "worker", .argv = {"sleep", "60"}}));
  pid_t pid = 0;
  app.on_ready([&] {
    pid = child.pid().value_or(0);
    app.request_stop();
  });
  EXPECT_EQ(app.run(), exit_code::ok);
  ASSERT_GT(pid, 0);
  EXPECT_TRUE(reaped(pid));
  EXPECT_FALSE(child.supervising());
}

}  // namespace
}  // namespace pgrt::lifecycle
