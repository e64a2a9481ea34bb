// Process identity, connection tags and the instance lock (no server).
#include "pgrt/runtime/identity.hpp"

#include <chrono>
#include <csignal>
#include <filesystem>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <string>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

#include "pgrt/db/hygiene.hpp"
#include "pgrt/runtime/instance_lock.hpp"

namespace pgrt {
namespace {

using ::testing::HasSubstr;
using ::testing::MatchesRegex;
using namespace std::chrono_literals;

TEST(ProcessIdentity, IsStableAndDescribesTheProcess) {
  const auto& identity = process_identity();
  EXPECT_EQ(&identity, &process_identity());
  EXPECT_EQ(identity.pid, ::getpid());
  EXPECT_FALSE(identity.host.empty());
  EXPECT_THAT(identity.incarnation, MatchesRegex("[0-9a-f]{8}"));
  const std::string text = describe_process_identity();
  EXPECT_THAT(text, HasSubstr("pid " + std::to_string(::getpid())));
  EXPECT_THAT(text, HasSubstr("incarnation " + identity.incarnation));
  EXPECT_THAT(text, HasSubstr("boot id"));
}

TEST(ConnectionTag, IsAppInstanceIncarnationInAsciiWithinSixtyThreeBytes) {
  const std::string incarnation = process_identity().incarnation;
  EXPECT_EQ(make_connection_tag("orders", "eu-1"), "orders/eu-1/" + incarnation);
  EXPECT_EQ(connection_tag_prefix("orders", "eu-1"), "orders/eu-1/");
  EXPECT_EQ(make_connection_tag("or/ders", "é"), "or_ders/__/" + incarnation);
  const std::string tag = make_connection_tag(std::string(100, 'a'), std::string(10, 'i'));
  EXPECT_EQ(tag.size(), 63U);
  EXPECT_EQ(tag, std::string(43, 'a') + "/" + std::string(10, 'i') + "/" + incarnation);
  EXPECT_TRUE(tag.starts_with(connection_tag_prefix(std::string(100, 'a'), std::string(10, 'i'))));
  // No instance: the host name, the same every time.
  EXPECT_EQ(make_connection_tag("app", ""), "app/" + default_instance_name() + "/" + incarnation);
  EXPECT_THAT(default_instance_name(), MatchesRegex("[A-Za-z0-9._-]+"));
}

TEST(LikeLiteral, EscapesTheWildcardsAndTheEscapeCharacter) {
  EXPECT_EQ(like_literal("orders/eu-1/"), "orders/eu-1/");
  EXPECT_EQ(like_literal("a_b%c\\d"), "a\\_b\\%c\\\\d");
}

class InstanceLockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    directory_ =
        std::filesystem::temp_directory_path() / ("pgrt-lock-test-" + std::to_string(::getpid()));
    std::filesystem::remove_all(directory_);
  }
  void TearDown() override { std::filesystem::remove_all(directory_); }
  InstanceLockOptions options(bool force = false) const {
    return {.application = "app",
            .instance = "one",
            .directory = directory_,
            .force = force,
            .takeover_grace = 2s};
  }
  std::filesystem::path directory_;
};

TEST_F(InstanceLockTest, ASecondHolderIsRefusedWithTheFirstsPidUntilItIsReleased) {
  {
    auto first = InstanceLock::acquire(options());
    EXPECT_EQ(first.path(), directory_ / "app.one.lock");
    try {
      (void)InstanceLock::acquire(options());
      FAIL() << "a second lock was granted";
    } catch (const InstanceLockError& error) {
      EXPECT_EQ(error.holder_pid(), ::getpid());
      EXPECT_THAT(error.what(),
                  HasSubstr("another app/one is running as pid " + std::to_string(::getpid())));
      EXPECT_THAT(error.what(), HasSubstr("PGRT_FORCE=1"));
    }
    InstanceLockOptions other = options();
    other.instance = "two";
    EXPECT_NO_THROW((void)InstanceLock::acquire(other));  // another instance is independent
  }
  EXPECT_NO_THROW((void)InstanceLock::acquire(options()));  // released with its holder
}

TEST_F(InstanceLockTest, ForceStopsTheHolderAndTakesOver) {
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t holder = ::fork();
  ASSERT_GE(holder, 0);
  if (holder == 0) {
    auto lock = InstanceLock::acquire(options());
    (void)::write(ready[1], "x", 1);
    for (;;) ::pause();  // until SIGTERM (default disposition: exit)
  }
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1);
  EXPECT_THROW((void)InstanceLock::acquire(options()), InstanceLockError);
  auto lock = InstanceLock::acquire(options(/*force=*/true));
  EXPECT_EQ(lock.took_over_from(), holder);
  int status = 0;
  ASSERT_EQ(::waitpid(holder, &status, 0), holder);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM);
  ::close(ready[0]);
  ::close(ready[1]);
}

}  // namespace
}  // namespace pgrt
