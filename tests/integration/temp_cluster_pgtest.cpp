// The throwaway cluster itself, against real servers.
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <memory>
#include <string>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

#include "pgrt/testing/blocking_sql.hpp"
#include "pgrt/testing/db_test.hpp"
#include "pgrt/testing/eventually.hpp"

namespace pgrt::testing {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

// Exists and has not exited: a zombie waiting to be reaped by an adoptive parent counts as gone.
bool process_exists(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  auto after_name = line.rfind(')');
  return after_name != std::string::npos && line.size() > after_name + 2 &&
         line[after_name + 2] != 'Z' && line[after_name + 2] != 'X';
}

class TempClusterTest : public DbTest {};

TEST_F(TempClusterTest, AcceptsConnectionsOnUnixSocketAndTcp) {
  BlockingConnection over_socket(cluster().dsn());
  EXPECT_EQ(over_socket.scalar("SELECT 1"), "1");
  EXPECT_EQ(over_socket.scalar("SELECT current_user"), "postgres");
  EXPECT_EQ(over_socket.scalar("SHOW data_directory"), cluster().data_directory().string());

  BlockingConnection over_tcp(cluster().tcp_dsn());
  EXPECT_EQ(over_tcp.scalar("SELECT inet_server_addr()::text"), "127.0.0.1/32");
  EXPECT_EQ(over_tcp.scalar("SELECT inet_server_port()"), std::to_string(cluster().port()));
}

TEST_F(TempClusterTest, AppliesMaxConnectionsAndExtraSettings) {
  auto own = start_own_cluster({.max_connections = 25, .settings = {{"work_mem", "8MB"}}});
  BlockingConnection connection(own->dsn());
  EXPECT_EQ(connection.scalar("SHOW max_connections"), "25");
  EXPECT_EQ(connection.scalar("SHOW work_mem"), "8MB");
}

TEST_F(TempClusterTest, PasswordRoleMustAuthenticate) {
  auto own = start_own_cluster({.password_role = PasswordRole{"app_user", "s3cret'pw"}});
  BlockingConnection connection(own->password_role_dsn());
  EXPECT_EQ(connection.scalar("SELECT current_user"), "app_user");

  const std::string wrong = "host=127.0.0.1 port=" + std::to_string(own->port()) +
                            " user=app_user password=wrong dbname=postgres";
  try {
    BlockingConnection rejected(wrong);
    FAIL() << "a wrong password was accepted";
  } catch (const SqlError& error) {
    EXPECT_EQ(error.sqlstate(), "28P01") << error.what();
  }
  const std::string none =
      "host=127.0.0.1 port=" + std::to_string(own->port()) + " user=app_user dbname=postgres";
  EXPECT_THROW(BlockingConnection{none}, SqlError);
}

TEST_F(TempClusterTest, StopAndStartAgain) {
  auto own = start_own_cluster();
  const pid_t first = own->postmaster_pid();
  BlockingConnection(own->dsn()).query("CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)");

  own->stop();
  EXPECT_FALSE(own->is_running());
  EXPECT_FALSE(process_exists(first));
  EXPECT_EQ(PQping(own->dsn().c_str()), PQPING_NO_RESPONSE);

  own->start();
  EXPECT_TRUE(own->is_running());
  EXPECT_NE(own->postmaster_pid(), first);
  EXPECT_EQ(BlockingConnection(own->dsn()).scalar("SELECT v FROM kept"), "7");
}

TEST_F(TempClusterTest, RestartFastAndImmediateBreakOpenConnections) {
  auto own = start_own_cluster();
  for (StopMode mode : {StopMode::fast, StopMode::immediate}) {
    BlockingConnection before(own->dsn());
    const pid_t old_postmaster = own->postmaster_pid();
    own->restart(mode);
    EXPECT_THROW(before.query("SELECT 1"), SqlError);
    EXPECT_NE(own->postmaster_pid(), old_postmaster);
    EXPECT_EQ(BlockingConnection(own->dsn()).scalar("SELECT 1"), "1");
  }
}

TEST_F(TempClusterTest, KillLeavesNoProcessAndRecoversOnStart) {
  auto own = start_own_cluster();
  BlockingConnection victim(own->dsn());
  const int backend = victim.backend_pid();
  const pid_t postmaster = own->postmaster_pid();

  own->kill();
  EXPECT_FALSE(own->is_running());
  EXPECT_FALSE(process_exists(postmaster));
  EXPECT_FALSE(process_exists(backend)) << "backends exit when their postmaster dies";
  EXPECT_THROW(victim.query("SELECT 1"), SqlError);

  own->start();  // crash recovery
  EXPECT_EQ(BlockingConnection(own->dsn()).scalar("SELECT 1"), "1");
  EXPECT_THAT(own->server_log_tail(), HasSubstr("not properly shut down"));
}

TEST_F(TempClusterTest, TwoClustersRunAtOnce) {
  auto first = start_own_cluster();
  auto second = start_own_cluster();
  EXPECT_NE(first->port(), second->port());
  EXPECT_NE(first->directory(), second->directory());
  BlockingConnection(first->dsn()).query("CREATE TABLE only_in_first (v int)");
  EXPECT_EQ(BlockingConnection(second->dsn())
                .scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_first'"),
            "0");
  EXPECT_EQ(BlockingConnection(first->tcp_dsn()).scalar("SELECT 1"), "1");
  EXPECT_EQ(BlockingConnection(second->tcp_dsn()).scalar("SELECT 1"), "1");
}

TEST_F(TempClusterTest, DestructorStopsServerAndRemovesDirectory) {
  auto own = start_own_cluster();
  const pid_t postmaster = own->postmaster_pid();
  const fs::path directory = own->directory();
  BlockingConnection open_client(own->dsn());  // a fast stop must not wait for it
  own.reset();
  EXPECT_FALSE(process_exists(postmaster));
  EXPECT_FALSE(fs::exists(directory));
}

TEST_F(TempClusterTest, MissingBinariesNameTheFix) {
  try {
    TempCluster cluster({.bin_dir = "/nonexistent/postgresql/bin"});
    FAIL() << "a cluster started without binaries";
  } catch (const ClusterError& error) {
    EXPECT_THAT(error.what(), HasSubstr("/nonexistent/postgresql/bin"));
    EXPECT_THAT(error.what(), HasSubstr("install postgresql-15"));
  }
}

// A bin dir whose initdb fails and says why; the error passes the reason on.
TEST_F(TempClusterTest, FailingInitdbReportsItsOutput) {
  std::string fake = (fs::temp_directory_path() / "pgrt-fake-bin-XXXXXX").string();
  ASSERT_NE(::mkdtemp(fake.data()), nullptr);
  ::chmod(fake.c_str(), 0755);
  for (const char* tool : {"initdb", "postgres"}) {
    const fs::path script = fs::path(fake) / tool;
    std::FILE* file = std::fopen(script.c_str(), "w");
    ASSERT_NE(file, nullptr);
    std::fputs("#!/bin/sh\necho 'disk quota exceeded (simulated)' >&2\nexit 1\n", file);
    std::fclose(file);
    ::chmod(script.c_str(), 0755);
  }
  try {
    TempCluster cluster({.bin_dir = fake});
    FAIL() << "a cluster started with a failing initdb";
  } catch (const ClusterError& error) {
    EXPECT_THAT(error.what(), HasSubstr("initdb failed"));
    EXPECT_THAT(error.what(), HasSubstr("disk quota exceeded (simulated)"));
  }
  fs::remove_all(fake);
}

TEST_F(TempClusterTest, ServerThatCannotStartReportsItsLog) {
  try {
    TempCluster cluster({.settings = {{"shared_buffers", "not-a-size"}}});
    FAIL() << "a server with an invalid setting started";
  } catch (const ClusterError& error) {
    EXPECT_THAT(error.what(), HasSubstr("exited during start-up"));
    EXPECT_THAT(error.what(), HasSubstr("shared_buffers"));
  }
}

TEST_F(TempClusterTest, InterruptedStartCleansUp) {
  std::stop_source stop;
  stop.request_stop();
  EXPECT_THROW(TempCluster({.stop_token = stop.get_token()}), ClusterInterrupted);
}

// The owner is killed with SIGKILL, so no destructor runs: the guardian must remove everything.
TEST_F(TempClusterTest, CrashedOwnerLeavesNothingBehind) {
  std::FILE* holder = ::popen("exec " PGRT_CLUSTER_HOLDER, "r");
  ASSERT_NE(holder, nullptr);
  int holder_pid = 0;
  int postmaster = 0;
  char directory[4096] = {};
  ASSERT_EQ(std::fscanf(holder, "%d %d %4095s", &holder_pid, &postmaster, directory), 3);
  ASSERT_TRUE(process_exists(postmaster));
  ASSERT_TRUE(fs::exists(directory));

  ASSERT_EQ(::kill(holder_pid, SIGKILL), 0);
  ::pclose(holder);

  EXPECT_TRUE(eventually([&] { return !process_exists(postmaster); }, 20s))
      << "the postmaster outlived its crashed owner";
  EXPECT_TRUE(eventually([&] { return !fs::exists(directory); }, 20s))
      << directory << " outlived its crashed owner";
}

}  // namespace
}  // namespace pgrt::testing
