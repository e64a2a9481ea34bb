// Whole processes under the lifecycle manager, against the test cluster: the demo stopped by
// SIGTERM (once, twice) under write load loses no accepted write; SIGINT twice exits at once; a
// stop that hangs is ended by the watchdog; std::exit() from a worker closes the pool at exit.
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "pgrt/testing/blocking_sql.hpp"
#include "pgrt/testing/db_test.hpp"
#include "pgrt/testing/eventually.hpp"
#include "process.hpp"

#ifndef PGRT_DEMO_PATH
#error "PGRT_DEMO_PATH must name the pgrt_demo binary"
#endif
#ifndef PGRT_PROBE_PATH
#error "PGRT_PROBE_PATH must name the lifecycle_probe binary"
#endif

namespace pgrt {
namespace {

using namespace std::chrono_literals;
using testing::BlockingConnection;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

// A child process with its output in a file.
class Child {
 public:
  Child(std::vector<std::string> argv, const std::string& database_url, const std::string& app)
      : output_(std::filesystem::temp_directory_path() /
                ("pgrt-process-test-" + std::to_string(::getpid()) + "-" +
                 std::to_string(counter_++) + ".out")) {
    ::setenv("DATABASE_URL", database_url.c_str(), 1);
    ::setenv("PGRT_APP", app.c_str(), 1);
    const int fd = ::open(output_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    testing::detail::SpawnOptions options;
    options.argv = std::move(argv);
    options.output_fd = fd;
    options.new_session = true;
    options.parent_death_signal = SIGKILL;
    pid_ = testing::detail::spawn(options);
    ::close(fd);
    ::unsetenv("DATABASE_URL");
    ::unsetenv("PGRT_APP");
  }
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

  [[nodiscard]] std::string output() const {
    std::ifstream in(output_);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  }

  bool wait_for_output(const std::string& text, std::chrono::seconds limit) const {
    const auto deadline = Clock::now() + limit;
    while (Clock::now() < deadline) {
      if (output().find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(20ms);
    }
    return false;
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
  }

  static int backends_of(const std::string& app) {
    BlockingConnection observer(cluster().dsn());
    return std::stoi(observer.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '" + app + "/%'"));
  }
};

TEST_F(LifecycleProcessTest, SigtermUnderWriteLoadExitsZeroAndEveryAcceptedWriteIsStored) {
  stop_demo_and_check_writes(false, "sigterm-once");
}

TEST_F(LifecycleProcessTest, SigtermTwiceIsStillGraceful) {
  stop_demo_and_check_writes(true, "sigterm-twice");
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

}  // namespace
}  // namespace pgrt
