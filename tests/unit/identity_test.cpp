// Process identity, connection tags and the instance lock (no server).
#include "pgrt/runtime/identity.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <optional>
#include <string>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

#include "incarnation_squatter.hpp"
#include "pgrt/db/hygiene.hpp"
#include "pgrt/db/session_guards.hpp"
#include "pgrt/runtime/instance_lock.hpp"
#include "pgrt/service/startup_hygiene.hpp"

namespace pgrt {
namespace {

using ::testing::HasSubstr;
using ::testing::MatchesRegex;
using ::testing::Not;
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
  // Replaced characters: '_' for each, and the name's hash so that it stays distinct.
  EXPECT_EQ(make_connection_tag("or/ders", "é"), "or_ders~" + stable_name_hash("or/ders") + "/__~" +
                                                     stable_name_hash("é") + "/" + incarnation);
  EXPECT_NE(connection_tag_prefix("or/ders", "x"), connection_tag_prefix("or_ders", "x"));
  const std::string tag = make_connection_tag(std::string(100, 'a'), std::string(10, 'i'));
  EXPECT_EQ(tag, std::string(15, 'a') + "~" + stable_name_hash(std::string(100, 'a')) + "/" +
                     std::string(10, 'i') + "/" + incarnation);
  EXPECT_TRUE(tag.starts_with(connection_tag_prefix(std::string(100, 'a'), std::string(10, 'i'))));
  // No instance: the host name, the same every time.
  EXPECT_EQ(make_connection_tag("app", ""),
            "app/" + tag_instance_name("app", default_instance_name()) + "/" + incarnation);
  EXPECT_THAT(default_instance_name(), MatchesRegex("[A-Za-z0-9._-]+"));
}

TEST(ParseConnectionTag, AcceptsEveryTagMakeConnectionTagWrites) {
  const std::string incarnation = process_identity().incarnation;
  const std::string pod = "orders-service-canary-deployment-7d9f8b6c4-x2k9p";
  const std::vector<std::pair<std::string, std::string>> names = {
      {"orders", "eu-1"},
      {"orders", pod},
      {"orders", pod + pod},              // shortened: a prefix, '~' and the hash
      {"orders", "\xc3\xa9t\xc3\xa9"},    // replaced bytes: '_' each, and the hash
      {"or/ders", "a b"},                 // a replaced app; a space is kept
      {std::string(100, 'a'), "one"},     // a shortened app
      {std::string(24, 'a'), pod + pod},  // the longest app that is kept, the rest for the instance
      {"", "one"},                        // an empty app is kept as it is
      {"orders", ""},                     // the default instance, the host name
  };
  for (const auto& [app, instance] : names) {
    const std::string tag = make_connection_tag(app, instance);
    const auto parts = parse_connection_tag(app, tag);
    ASSERT_TRUE(parts.has_value()) << tag;
    EXPECT_EQ(parts->app, tag_app_name(app)) << tag;
    EXPECT_EQ(parts->instance, tag_instance_name(app, instance)) << tag;
    EXPECT_EQ(parts->incarnation, incarnation) << tag;
    EXPECT_EQ(parts->app + "/" + parts->instance + "/" + parts->incarnation, tag);
  }
  const auto parts = parse_connection_tag("orders", "orders/eu-1/0badcafe");
  ASSERT_TRUE(parts.has_value());
  EXPECT_EQ(parts->instance, "eu-1");
  EXPECT_EQ(parts->incarnation, "0badcafe");
  EXPECT_TRUE(parse_connection_tag("orders", "orders/eu_~0123abcd/0badcafe"));
  // The longest instance that fits: 53 bytes less the app's.
  EXPECT_TRUE(parse_connection_tag("orders", "orders/" + std::string(47, 'i') + "/0badcafe"));
}

TEST(ParseConnectionTag, RejectsNamesThatOnlyStartLikeATag) {
  for (const std::string name : {
           "orders/console",               // no incarnation
           "orders/eu-1/report-job",       // not an incarnation
           "orders/eu-1/0BADCAFE",         // upper case: never written
           "orders/eu-1/0badcaf",          // seven digits
           "orders/eu-1/0badcafe0",        // nine digits
           "orders/eu-1/0badcafg",         // not hex
           "orders/eu-1/0badcafe/x",       // something after it
           "orders/eu-1/",                 // nothing after the instance
           "orders//0badcafe",             // no instance
           "orders/eu/1/0badcafe",         // '/' inside the instance
           "orders/eu~1/0badcafe",         // '~' that is not a hash marker
           "orders/~0123abcd/0badcafe",    // a hash with nothing before it
           "orders/eu~0123ABCD/0badcafe",  // a hash in upper case
           "orders/eu~~0123abc/0badcafe",  // two markers
           "orders/e\x01u/0badcafe",       // a control character
           "orders/e\xc3\xa9/0badcafe",    // not ASCII
           "orders-x/eu-1/0badcafe",       // another app that starts the same
           "orders",
           "orders/",
           "pgrt-diag",
           "xorders/eu-1/0badcafe",
           " orders/eu-1/0badcafe",
       }) {
    EXPECT_FALSE(parse_connection_tag("orders", name)) << name;
  }
  // One byte longer than the instance may be.
  EXPECT_FALSE(parse_connection_tag("orders", "orders/" + std::string(48, 'i') + "/0badcafe"));
  // The app is compared as the tags write it.
  EXPECT_FALSE(parse_connection_tag(std::string(100, 'a'), std::string(100, 'a') + "/x/0badcafe"));
}

TEST(StableNameHash, IsThirtyTwoBitFnv1aInHex) {
  // The published FNV-1a test vectors.
  EXPECT_EQ(stable_name_hash(""), "811c9dc5");
  EXPECT_EQ(stable_name_hash("a"), "e40c292c");
  EXPECT_EQ(stable_name_hash("foobar"), "bf9cf968");
}

bool printable_ascii(const std::string& text) {
  return std::all_of(text.begin(), text.end(), [](char c) { return c >= 0x20 && c <= 0x7E; });
}

TEST(ConnectionTag, LongNamesDifferingOnlyAtTheEndGiveDifferentTagsWithinSixtyThreeBytes) {
  const std::string incarnation = process_identity().incarnation;
  // Two Kubernetes-style pod names that differ only in their last characters.
  const std::string pod = "orders-service-canary-deployment-7d9f8b6c4-";
  for (const std::string& app : {std::string("orders"), std::string(80, 'x'), std::string()}) {
    const std::string first = make_connection_tag(app, pod + "x2k9p");
    const std::string second = make_connection_tag(app, pod + "x2k9q");
    EXPECT_NE(first, second) << app;
    EXPECT_NE(connection_tag_prefix(app, pod + "x2k9p"), connection_tag_prefix(app, pod + "x2k9q"));
    for (const auto& one : {first, second}) {
      EXPECT_LE(one.size(), 63U) << one;
      EXPECT_TRUE(printable_ascii(one)) << one;
      EXPECT_TRUE(one.ends_with("/" + incarnation)) << one;
      EXPECT_EQ(std::count(one.begin(), one.end(), '/'), 2) << one;
    }
    EXPECT_EQ(first, make_connection_tag(app, pod + "x2k9p"));  // stable across calls
    EXPECT_TRUE(first.starts_with(connection_tag_prefix(app, pod + "x2k9p")));
  }
  // Long apps differing at the end, too; and the app part does not depend on the instance.
  const std::string long_app = "a-very-long-application-name-for-";
  EXPECT_NE(tag_app_name(long_app + "billing"), tag_app_name(long_app + "bidding"));
  EXPECT_LE(tag_app_name(long_app + "billing").size(), max_tag_app_bytes);
  EXPECT_TRUE(connection_tag_prefix(long_app + "billing", "one")
                  .starts_with(tag_app_name(long_app + "billing") + "/"));
  EXPECT_TRUE(connection_tag_prefix(long_app + "billing", std::string(200, 'i'))
                  .starts_with(tag_app_name(long_app + "billing") + "/"));
  // Names that fit are left alone; a name that only looks like a shortened one does not collide.
  EXPECT_EQ(tag_app_name("orders"), "orders");
  EXPECT_EQ(tag_instance_name("orders", pod), pod);
  const std::string shortened = tag_instance_name("orders", pod + pod);
  EXPECT_NE(tag_instance_name("orders", shortened), shortened);
  // Non-ASCII bytes never reach the tag.
  EXPECT_TRUE(printable_ascii(make_connection_tag("\xff\xfe", std::string(70, '\x80'))));
}

TEST(LikeLiteral, EscapesTheWildcardsAndTheEscapeCharacter) {
  EXPECT_EQ(like_literal("orders/eu-1/"), "orders/eu-1/");
  EXPECT_EQ(like_literal("a_b%c\\d"), "a\\_b\\%c\\\\d");
}

TEST(SessionGuards, BecomeStartupSettingsUnlessZeroOrGivenAndSetTheTcpOptions) {
  using Settings = std::vector<std::pair<std::string, std::string>>;
  const ConnectOptions guarded = with_session_guards(ConnectOptions{}, SessionGuards{});
  EXPECT_EQ(guarded.session_settings,
            (Settings{{"tcp_user_timeout", "30000"},
                      {"tcp_keepalives_count", "3"},
                      {"tcp_keepalives_interval", "10"},
                      {"tcp_keepalives_idle", "30"},
                      {"client_connection_check_interval", "10000"},
                      {"idle_in_transaction_session_timeout", "300000"}}));
  EXPECT_TRUE(guarded.keepalives.has_value());
  EXPECT_EQ(guarded.tcp_user_timeout, 30s);

  ConnectOptions own;
  own.session_settings = {{"idle_in_transaction_session_timeout", "1000"}};
  own.tcp_user_timeout = 5s;
  const ConnectOptions kept = with_session_guards(
      own, SessionGuards{.client_connection_check_interval = 0ms, .keepalives = false});
  EXPECT_EQ(kept.session_settings, (Settings{{"tcp_user_timeout", "5000"},
                                             {"idle_in_transaction_session_timeout", "1000"}}));
  EXPECT_FALSE(kept.keepalives.has_value());
  EXPECT_EQ(kept.tcp_user_timeout, 5s);
}

TEST(SessionGuards, BoundHowLongAClosedBackendCanOutliveItsClose) {
  // Keepalives give up after 30 s + 3 x 10 s; a busy backend checks every 10 s more.
  EXPECT_EQ(backend_end_bound(with_session_guards(ConnectOptions{}, SessionGuards{})), 70s);
  ConnectOptions slow;
  slow.tcp_user_timeout = 120s;
  EXPECT_EQ(backend_end_bound(with_session_guards(slow, SessionGuards{})), 130s);
  EXPECT_EQ(
      backend_end_bound(with_session_guards(ConnectOptions{}, SessionGuards{.keepalives = false})),
      0ms);
}

TEST(IncarnationOnThisHost, ThisProcesssOwnRunsAnotherDoesNotAndAMalformedOneIsUnknown) {
  const std::string own = process_identity().incarnation;
  EXPECT_EQ(incarnation_on_this_host(own), HostPresence::running);
  std::string other = own;
  other[7] = other[7] == '0' ? '1' : '0';  // no live process here has drawn it (1 in 2^32)
  EXPECT_EQ(incarnation_on_this_host(other), HostPresence::not_running);
  EXPECT_EQ(incarnation_on_this_host("0BADCAFE"), HostPresence::unknown);
  EXPECT_EQ(incarnation_on_this_host("abc"), HostPresence::unknown);
  // An announced incarnation never starts with 'f'; one that does is unannounced: unknown.
  EXPECT_NE(own.front(), 'f');
  EXPECT_EQ(incarnation_on_this_host("f0000000"), HostPresence::unknown);
}

// A prefork server's workers: each child forked after the parent used its identity is a process
// of its own (its connections' tags, the budget's fair share), and stops announcing the parent's.
TEST(ProcessIdentity, AForkedChildGetsAnIdentityAndAnIncarnationOfItsOwn) {
  const ProcessIdentity& parent = process_identity();
  const std::string parent_incarnation = parent.incarnation;
  int report[2];
  ASSERT_EQ(::pipe(report), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const ProcessIdentity& own = process_identity();
    const bool ok = own.pid == static_cast<int>(::getpid()) &&
                    own.incarnation != parent_incarnation && own.host == parent.host &&
                    incarnation_on_this_host(own.incarnation) == HostPresence::running &&
                    &process_identity() == &own;
    const std::string line = (ok ? "ok " : "bad ") + own.incarnation;
    (void)::write(report[1], line.data(), line.size());
    ::_exit(0);
  }
  ::close(report[1]);
  char buffer[64] = {};
  const auto size = ::read(report[0], buffer, sizeof buffer - 1);
  ::close(report[0]);
  ::waitpid(child, nullptr, 0);
  const std::string said(buffer, size > 0 ? static_cast<std::size_t>(size) : 0);
  EXPECT_THAT(said, ::testing::StartsWith("ok ")) << said;
  // The parent is unchanged and still announces its own; the child's is gone with it.
  EXPECT_EQ(process_identity().incarnation, parent_incarnation);
  EXPECT_EQ(process_identity().pid, static_cast<int>(::getpid()));
  EXPECT_EQ(incarnation_on_this_host(parent_incarnation), HostPresence::running);
  if (said.size() > 3) {
    EXPECT_EQ(incarnation_on_this_host(said.substr(3)), HostPresence::not_running);
  }
}

// An abstract name has no permissions: another user binding an incarnation's name (to block a
// restart, or keep a leftover alive) is not taken for a live process of this service.
TEST(IncarnationOnThisHost, AnotherUsersSocketUnderTheNameIsNotThisServicesProcess) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root, to bind the name as another user";
  const std::string squatted = "5a5a5a5a";
  ASSERT_EQ(incarnation_on_this_host(squatted), HostPresence::not_running);
  const pid_t squatter = test::squat_incarnation_name(squatted);
  ASSERT_GT(squatter, 0);
  EXPECT_EQ(incarnation_on_this_host(squatted), HostPresence::other_user);
  ::kill(squatter, SIGKILL);
  ::waitpid(squatter, nullptr, 0);
  EXPECT_EQ(incarnation_on_this_host(squatted), HostPresence::not_running);
}

// The abstract unix namespace is per socket type: a stream or seqpacket socket can be bound under
// the very name a live process's datagram socket holds. Another user doing so must not turn that
// live process (this user's) into "other_user": that would hide a live duplicate from the start-up
// cleanup (its start is then not refused) and from pgrt-diag (running_here false). Here this test
// process plays the live service (root counts as this user) for a few incarnations, and user nobody
// binds the same names as stream and seqpacket sockets.
TEST(IncarnationOnThisHost,
     AnotherUsersSocketOfAnotherTypeUnderALiveNameDoesNotHideTheLiveProcess) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root, to bind the names as another user";
  const std::vector<std::string> incarnations = {"1c0ffee1", "2c0ffee2", "3c0ffee3", "4c0ffee4",
                                                 "5c0ffee5", "6c0ffee6", "7c0ffee7", "8c0ffee8"};
  auto address_of = [](const std::string& incarnation) {
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    const std::string name = std::string(1, '\0') + "pgrt/incarnation/" + incarnation;
    std::memcpy(address.sun_path, name.data(), name.size());
    return std::pair{address,
                     static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size())};
  };
  // The live processes' announcements (datagram sockets of this user), as identity.cpp binds them.
  std::vector<int> live;
  for (const auto& incarnation : incarnations) {
    const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    const auto [address, length] = address_of(incarnation);
    ASSERT_EQ(::bind(fd, reinterpret_cast<const sockaddr*>(&address), length), 0) << incarnation;
    live.push_back(fd);
    ASSERT_EQ(incarnation_on_this_host(incarnation), HostPresence::running) << incarnation;
  }
  std::vector<std::pair<sockaddr_un, socklen_t>> addresses;  // (made before the fork)
  for (const auto& incarnation : incarnations) addresses.push_back(address_of(incarnation));
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t squatter = ::fork();
  ASSERT_GE(squatter, 0);
  if (squatter == 0) {
    if (::setuid(65534) != 0) ::_exit(2);
    for (const auto& [address, length] : addresses) {
      for (const int type : {SOCK_STREAM, SOCK_SEQPACKET}) {
        const int fd = ::socket(AF_UNIX, type, 0);
        if (::bind(fd, reinterpret_cast<const sockaddr*>(&address), length) != 0) ::_exit(3);
      }
    }
    (void)::write(ready[1], "x", 1);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char byte = 0;
  const bool bound = ::read(ready[0], &byte, 1) == 1;
  ::close(ready[0]);
  std::string hidden;  // the live incarnations taken for another user's
  if (bound) {
    for (const auto& incarnation : incarnations) {
      const HostPresence presence = incarnation_on_this_host(incarnation);
      if (presence != HostPresence::running) {
        hidden += " " + incarnation +
                  (presence == HostPresence::other_user ? " (other_user)" : " (not running)");
      }
    }
  }
  ::kill(squatter, SIGKILL);
  ::waitpid(squatter, nullptr, 0);
  for (const int fd : live) ::close(fd);
  ASSERT_TRUE(bound) << "the squatter could not bind a stream and a seqpacket socket";
  EXPECT_EQ(hidden, "") << "live incarnations of this user taken for another user's";
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

// A lock file removed under a live holder (systemd-tmpfiles cleaning /tmp/pgrt-<uid> for a service
// without XDG_RUNTIME_DIR, an operator's rm, the whole directory or the file) must not let a
// second instance in: it would create a new file and lock that one, and both would run. The
// holder's guard (an abstract unix socket: nothing in the file system can remove it) keeps it
// out, saying what happened, with force as well (the holder cannot be verified through a file it
// no longer has). A process refused so lets go of the new file and writes nothing into it; the
// lock moves with its owner and is free once that lets go.
TEST_F(InstanceLockTest, ALockFileRemovedUnderALiveHolderDoesNotLetASecondOneIn) {
  const auto path = directory_ / "app.one.lock";
  std::optional<InstanceLock> holder;
  holder.emplace(InstanceLock::acquire(options()));
  for (const bool whole_directory : {false, true}) {
    SCOPED_TRACE(whole_directory ? "the directory removed" : "the file removed");
    if (whole_directory) {
      std::filesystem::remove_all(directory_);
    } else {
      std::filesystem::remove(path);
    }
    for (const bool force : {false, true}) {
      try {
        auto second = InstanceLock::acquire(options(force));
        ADD_FAILURE() << "a second holder of app/one beside the first" << (force ? " (force)" : "");
      } catch (const InstanceLockError& error) {
        EXPECT_EQ(error.holder_pid(), 0);
        EXPECT_THAT(error.what(),
                    HasSubstr("the lock file " + path.string() +
                              " was removed while another app/one still holds the instance lock"));
        EXPECT_THAT(error.what(), HasSubstr("@" + holder->guard_name()));
      }
      const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
      ASSERT_GE(fd, 0);
      EXPECT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0) << "the refused process kept the new file";
      struct stat status {};
      EXPECT_EQ(::fstat(fd, &status), 0);
      EXPECT_EQ(status.st_size, 0) << "the refused process wrote into the new file";
      ::close(fd);
    }
  }
  InstanceLock moved = std::move(*holder);
  holder.reset();
  EXPECT_THROW((void)InstanceLock::acquire(options()), InstanceLockError);
  { const InstanceLock last = std::move(moved); }
  EXPECT_NO_THROW((void)InstanceLock::acquire(options()));
}

// A lock file replaced under its holder (a restored copy, or simply the file the last holder left,
// put back) names a pid that may be alive and yet not hold the lock: that pid must not be named as
// the one holding the guard (holder_pid(), "stop it first"): an operator would stop the wrong
// process.
TEST_F(InstanceLockTest, AGuardHolderIsNotNamedByAReplacedFilesPidThatDoesNotHoldIt) {
  const auto path = directory_ / "app.one.lock";
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const InstanceLockOptions lock_options = options();
  const pid_t holder = ::fork();
  ASSERT_GE(holder, 0);
  if (holder == 0) {
    try {
      auto lock = InstanceLock::acquire(lock_options);
      (void)::write(ready[1], "x", 1);
      for (;;) ::pause();
    } catch (...) {
      ::_exit(2);
    }
  }
  ::close(ready[1]);
  char byte = 0;
  const bool held = ::read(ready[0], &byte, 1) == 1;
  ::close(ready[0]);
  const pid_t bystander = ::fork();  // alive, and holds nothing
  if (bystander == 0) {
    ::execl("/bin/sleep", "sleep", "30", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  std::optional<int> named;
  std::string message;
  if (held && bystander > 0) {
    std::filesystem::remove(path);
    {
      std::ofstream replaced(path);
      replaced << bystander << "\n";
    }
    ::chmod(path.c_str(), 0600);
    try {
      (void)InstanceLock::acquire(options());
      ADD_FAILURE() << "a second holder beside pid " << holder;
    } catch (const InstanceLockError& error) {
      named = error.holder_pid();
      message = error.what();
    }
  }
  ::kill(bystander, SIGKILL);
  ::kill(holder, SIGKILL);
  int status = 0;
  ::waitpid(bystander, &status, 0);
  ::waitpid(holder, &status, 0);
  ASSERT_TRUE(held);
  ASSERT_TRUE(named.has_value());
  EXPECT_NE(*named, bystander) << message;
  EXPECT_THAT(message, Not(HasSubstr("names pid " + std::to_string(bystander))));
}

// The guard is close-on-exec, as the lock file is: a program the holder starts (a hook, a helper)
// is another process and does not keep the lock once the holder lets go.
TEST_F(InstanceLockTest, AProgramTheHolderStartsDoesNotKeepTheLock) {
  int started[2];
  ASSERT_EQ(::pipe2(started, O_CLOEXEC), 0);
  pid_t program = -1;
  {
    auto lock = InstanceLock::acquire(options());
    ASSERT_FALSE(lock.guard_name().empty());
    program = ::fork();
    ASSERT_GE(program, 0);
    if (program == 0) {
      ::execl("/bin/sleep", "sleep", "30", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    ::close(started[1]);
    char byte = 0;
    EXPECT_EQ(::read(started[0], &byte, 1), 0);  // end of file: executed (close-on-exec)
  }
  EXPECT_NO_THROW((void)InstanceLock::acquire(options()));
  ::kill(program, SIGKILL);
  int status = 0;
  ::waitpid(program, &status, 0);
  EXPECT_TRUE(WIFSIGNALED(status)) << "sleep did not run: exit " << WEXITSTATUS(status);
  ::close(started[0]);
}

// An abstract name has no permissions: another user can bind the guard's name first. That must
// neither keep this user's instance from starting (the lock file alone guards it then) nor be
// taken for an instance of this user's.
TEST_F(InstanceLockTest, AnotherUsersSocketUnderTheGuardsNameDoesNotKeepTheInstanceOut) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root, to act as another user";
  std::string name;
  {
    auto lock = InstanceLock::acquire(options());
    name = lock.guard_name();
  }
  ASSERT_FALSE(name.empty());
  ASSERT_LT(name.size(), sizeof(sockaddr_un::sun_path));
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t squatter = ::fork();
  ASSERT_GE(squatter, 0);
  if (squatter == 0) {
    if (::setuid(65534) != 0) ::_exit(2);
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::memcpy(address.sun_path + 1, name.data(), name.size());
    const auto length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
    if (fd < 0 || ::bind(fd, reinterpret_cast<const sockaddr*>(&address), length) != 0) {
      ::_exit(3);
    }
    (void)::write(ready[1], "x", 1);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char byte = 0;
  const bool bound = ::read(ready[0], &byte, 1) == 1;
  if (bound) {
    auto lock = InstanceLock::acquire(options());  // not refused
    EXPECT_EQ(lock.guard_name(), "") << "the squatter's name taken for this lock's guard";
    EXPECT_THROW((void)InstanceLock::acquire(options()), InstanceLockError);  // the file holds
  }
  ::kill(squatter, SIGKILL);
  int status = 0;
  ::waitpid(squatter, &status, 0);
  ::close(ready[0]);
  EXPECT_TRUE(bound) << "the squatter could not bind @" << name << " (status " << status << ")";
}

#if defined(__x86_64__)
// The exit code of `body` run in a child where socket(AF_NETLINK, ...) fails with EAFNOSUPPORT
// (systemd's RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6): the kernel's socket diagnostics
// cannot say whose a unix socket is. -1 if it did not exit; 125 if the filter could not be set.
int exit_code_without_netlink(const InstanceLockOptions& lock_options,
                              int (*body)(const InstanceLockOptions&)) {
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
      {equals, 0, 1, static_cast<std::uint32_t>(AF_NETLINK)},
      {give, 0, 0, SECCOMP_RET_ERRNO | static_cast<std::uint32_t>(EAFNOSUPPORT)},
      {give, 0, 0, SECCOMP_RET_ALLOW},
  }};
  const sock_fprog program{static_cast<unsigned short>(filter.size()), filter.data()};
  const pid_t child = ::fork();
  if (child == 0) {
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1UL, 0UL, 0UL, 0UL) != 0 ||
        ::prctl(PR_SET_SECCOMP, static_cast<unsigned long>(SECCOMP_MODE_FILTER), &program) != 0) {
      ::_exit(125);
    }
    if (::socket(AF_NETLINK, SOCK_DGRAM, 0) >= 0) ::_exit(124);
    ::_exit(body(lock_options));
  }
  int status = 0;
  if (child < 0 || ::waitpid(child, &status, 0) != child || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}
#endif

// systemd's usual hardening, RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6, leaves out
// AF_NETLINK, so the kernel cannot say whose socket holds the guard's name (so too before Linux
// 5.3). operations.md: "another user's socket has taken the guard's name first ... the lock file
// alone guards". A local user who binds the (predictable) name must not keep the service from
// starting there either, with force or without; nor be taken for "another app/one" that "still
// holds the instance lock" (the message sends the operator hunting for an instance that does not
// exist).
TEST_F(InstanceLockTest, AnotherUsersSocketUnderTheGuardsNameDoesNotKeepOutASandboxWithoutNetlink) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root, to act as another user";
#if !defined(__x86_64__)
  GTEST_SKIP() << "the seccomp filter here is for x86-64";
#else
  std::string name;
  {
    auto lock = InstanceLock::acquire(options());
    name = lock.guard_name();
  }
  ASSERT_FALSE(name.empty());
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t squatter = ::fork();
  ASSERT_GE(squatter, 0);
  if (squatter == 0) {
    if (::setuid(65534) != 0) ::_exit(2);
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::memcpy(address.sun_path + 1, name.data(), name.size());
    const auto length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
    if (fd < 0 || ::bind(fd, reinterpret_cast<const sockaddr*>(&address), length) != 0) {
      ::_exit(3);
    }
    (void)::write(ready[1], "x", 1);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char byte = 0;
  const bool bound = ::read(ready[0], &byte, 1) == 1;
  ::close(ready[0]);
  int result = -1;
  if (bound) {
    result = exit_code_without_netlink(options(), [](const InstanceLockOptions& lock_options) {
      try {
        auto lock = InstanceLock::acquire(lock_options);  // not refused
        return lock.guard_name().empty() ? 0 : 3;
      } catch (const InstanceLockError& error) {
        std::fprintf(stderr, "refused: %s\n", error.what());
        return 4;
      } catch (...) {
        return 5;
      }
    });
  }
  ::kill(squatter, SIGKILL);
  int status = 0;
  ::waitpid(squatter, &status, 0);
  ASSERT_TRUE(bound) << "the squatter could not bind @" << name << " (status " << status << ")";
  EXPECT_EQ(result, 0) << "4: refused to start because another user's socket has the guard's name";
#endif
}

// ... and where the kernel cannot say whose the guard's socket is, a live holder of this user's
// whose lock file was removed still keeps a second instance out (/proc tells it is this user's).
TEST_F(InstanceLockTest, ALockFileRemovedUnderALiveHolderKeepsOutASandboxWithoutNetlink) {
#if !defined(__x86_64__)
  GTEST_SKIP() << "the seccomp filter here is for x86-64";
#else
  auto holder = InstanceLock::acquire(options());
  ASSERT_FALSE(holder.guard_name().empty());
  std::filesystem::remove_all(directory_);
  EXPECT_EQ(exit_code_without_netlink(options(),
                                      [](const InstanceLockOptions& lock_options) {
                                        try {
                                          (void)InstanceLock::acquire(lock_options);
                                          return 4;  // a second holder
                                        } catch (const InstanceLockError& error) {
                                          return std::string(error.what()).find("was removed") !=
                                                         std::string::npos
                                                     ? 0
                                                     : 3;
                                        } catch (...) {
                                          return 5;
                                        }
                                      }),
            0);
#endif
}

// A sandbox without unix sockets (systemd's RestrictAddressFamilies=AF_INET AF_INET6) has no
// guard to take: the instance still starts, kept to one at a time by the lock file alone, and is
// kept out by the lock file of a holder that has a guard.
TEST_F(InstanceLockTest, ASandboxWithoutUnixSocketsIsGuardedByTheLockFileAlone) {
#if !defined(__x86_64__)
  GTEST_SKIP() << "the seccomp filter here is for x86-64";
#else
  // socket(AF_UNIX, ...) -> EAFNOSUPPORT; everything else allowed.
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
  // The exit code of `body` run in a sandboxed child.
  auto sandboxed = [&](int (*body)(const InstanceLockOptions&)) {
    const InstanceLockOptions lock_options = options();
    const pid_t child = ::fork();
    if (child == 0) {
      if (::prctl(PR_SET_NO_NEW_PRIVS, 1UL, 0UL, 0UL, 0UL) != 0 ||
          ::prctl(PR_SET_SECCOMP, static_cast<unsigned long>(SECCOMP_MODE_FILTER), &program) != 0) {
        ::_exit(125);
      }
      if (::socket(AF_UNIX, SOCK_STREAM, 0) >= 0) ::_exit(124);
      ::_exit(body(lock_options));
    }
    int status = 0;
    if (child < 0 || ::waitpid(child, &status, 0) != child || !WIFEXITED(status)) return -1;
    return WEXITSTATUS(status);
  };
  EXPECT_EQ(sandboxed([](const InstanceLockOptions& lock_options) {
              try {
                auto lock = InstanceLock::acquire(lock_options);
                if (!lock.guard_name().empty()) return 3;
                try {
                  (void)InstanceLock::acquire(lock_options);
                  return 4;  // a second holder
                } catch (const InstanceLockError&) {
                  return 0;
                }
              } catch (...) {
                return 5;  // refused
              }
            }),
            0);
  auto lock = InstanceLock::acquire(options());
  EXPECT_FALSE(lock.guard_name().empty());
  EXPECT_EQ(sandboxed([](const InstanceLockOptions& lock_options) {
              try {
                (void)InstanceLock::acquire(lock_options);
                return 4;  // a second holder
              } catch (const InstanceLockError&) {
                return 0;
              } catch (...) {
                return 5;
              }
            }),
            0);
#endif
}

// operations.md: in a shared directory (writable by others, sticky) the lock goes into pgrt-<uid>
// inside it, "which the sticky bit keeps others from renaming or removing". The sticky bit does
// not hold against the shared directory's owner: when that is another (non-root) user, they can
// move pgrt-<uid> aside under a live holder, and the next start would make a new one and take a
// lock of its own beside the holder. Such a directory is refused (the test then skips); the lock
// is never split.
TEST_F(InstanceLockTest, ASharedDirectoryOfAnotherUserCannotBeUsedToSplitTheLock) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root, to act as the shared directory's owner";
  const auto shared = directory_ / "shared";
  std::filesystem::create_directories(shared);
  ASSERT_EQ(::chown(shared.c_str(), 65534, 65534), 0);
  ASSERT_EQ(::chmod(shared.c_str(), 01777), 0);
  InstanceLockOptions in_shared = options();
  in_shared.directory = shared;
  std::optional<InstanceLock> first;
  try {
    first.emplace(InstanceLock::acquire(in_shared));
  } catch (const std::system_error& error) {
    GTEST_SKIP() << "refused, as it may be: " << error.what();
  }
  const std::string private_name = "pgrt-" + std::to_string(::geteuid());
  const std::string from = (shared / private_name).string();
  const std::string to = (shared / "moved-aside").string();
  const pid_t owner = ::fork();
  ASSERT_GE(owner, 0);
  if (owner == 0) {
    if (::setuid(65534) != 0) ::_exit(2);
    ::_exit(::rename(from.c_str(), to.c_str()) == 0 ? 0 : 3);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(owner, &status, 0), owner);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "the shared directory's owner could not move " << from;
  try {
    auto second = InstanceLock::acquire(in_shared);
    ADD_FAILURE() << "a second holder of app/one (" << second.path() << ") while the first holds "
                  << first->path();
  } catch (const std::exception&) {  // InstanceLockError, or the directory refused
  }
}

TEST_F(InstanceLockTest, LongInstanceNamesDifferingOnlyAtTheEndGetDifferentLockFiles) {
  const std::string pod = "orders-service-canary-deployment-7d9f8b6c4-long-suffix-";
  InstanceLockOptions first = options();
  first.instance = pod + "x2k9p";
  InstanceLockOptions second = options();
  second.instance = pod + "x2k9q";
  auto one = InstanceLock::acquire(first);
  auto two = InstanceLock::acquire(second);  // not refused: another instance
  EXPECT_NE(one.path(), two.path());
  EXPECT_EQ(one.path(), directory_ / ("app." + tag_instance_name("app", first.instance) + ".lock"));
  // A '.' inside a name cannot make two app/instance pairs share a file.
  InstanceLockOptions dotted_app = options();
  dotted_app.application = "a.b";
  dotted_app.instance = "c";
  InstanceLockOptions dotted_instance = options();
  dotted_instance.application = "a";
  dotted_instance.instance = "b.c";
  auto three = InstanceLock::acquire(dotted_app);
  auto four = InstanceLock::acquire(dotted_instance);
  EXPECT_NE(three.path(), four.path());
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

TEST_F(InstanceLockTest, ForceFailsSayingWhyWhenTheNamedHolderIsGoneButTheLockIsStillHeld) {
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t holder = ::fork();
  ASSERT_GE(holder, 0);
  if (holder == 0) {
    auto lock = InstanceLock::acquire(options());  // writes the holder's pid
    if (::fork() == 0) {                           // inherits the locked descriptor
      const pid_t self = ::getpid();
      (void)::write(ready[1], &self, sizeof self);
      for (;;) ::pause();
    }
    ::_exit(0);
  }
  pid_t descendant = 0;
  ASSERT_EQ(::read(ready[0], &descendant, sizeof descendant),
            static_cast<ssize_t>(sizeof descendant));
  int status = 0;
  ASSERT_EQ(::waitpid(holder, &status, 0), holder);  // reaped: kill() now gives ESRCH
  try {
    (void)InstanceLock::acquire(options(/*force=*/true));
    ADD_FAILURE() << "took over a lock that another process still holds";
  } catch (const InstanceLockError& error) {
    EXPECT_EQ(error.holder_pid(), holder);
    EXPECT_THAT(error.what(),
                HasSubstr("pid " + std::to_string(holder) + " named in the lock file is gone"));
    EXPECT_THAT(error.what(), HasSubstr("still holds"));
  }
  ::kill(descendant, SIGKILL);
  EXPECT_NO_THROW((void)InstanceLock::acquire(options(/*force=*/true)));  // released with it
  ::close(ready[0]);
  ::close(ready[1]);
}

// The directory may have been made by another user before this one ever ran (/tmp/pgrt-<uid>).
TEST_F(InstanceLockTest, TheDirectoryIsMadePrivateAndOneThatIsNotPrivateIsRefused) {
  { auto lock = InstanceLock::acquire(options()); }
  struct stat status {};
  ASSERT_EQ(::stat(directory_.c_str(), &status), 0);
  EXPECT_EQ(status.st_mode & 07777, 0700u);
  EXPECT_EQ(::lstat((directory_ / "app.one.lock").c_str(), &status), 0);
  EXPECT_EQ(status.st_mode & 07777, 0600u);

  auto refused_with = [&](const std::filesystem::path& directory, const std::string& why) {
    InstanceLockOptions elsewhere = options();
    elsewhere.directory = directory;
    try {
      (void)InstanceLock::acquire(elsewhere);
      ADD_FAILURE() << "used " << directory;
    } catch (const std::system_error& error) {
      EXPECT_THAT(error.what(), HasSubstr("refusing the instance lock directory"));
      EXPECT_THAT(error.what(), HasSubstr(why));
    }
  };
  // A symbolic link to a directory of the attacker's choosing (here, our own: still refused).
  const auto planted = directory_ / "planted";
  const auto link = directory_ / "link";
  std::filesystem::create_directory(planted);
  ::chmod(planted.c_str(), 0700);
  std::filesystem::create_directory_symlink(planted, link);
  refused_with(link, "symbolic link");
  EXPECT_FALSE(std::filesystem::exists(planted / "app.one.lock"));

  // This user's own directory made under a loose umask: made private again, then used.
  ::chmod(planted.c_str(), 0777);
  {
    InstanceLockOptions own = options();
    own.directory = planted;
    EXPECT_NO_THROW((void)InstanceLock::acquire(own));
    ASSERT_EQ(::stat(planted.c_str(), &status), 0);
    EXPECT_EQ(status.st_mode & 07777, 0700u);
  }

  if (::geteuid() == 0) {  // only root can give a directory away
    ::chmod(planted.c_str(), 0700);
    ASSERT_EQ(::chown(planted.c_str(), 65534, 65534), 0);
    refused_with(planted, "it belongs to uid 65534, not to this user (uid 0)");
  }
}

// A shared directory (world-writable with the sticky bit: /tmp, /dev/shm, an emptyDir volume) is
// never re-moded, which would lock everyone else out of it: the lock goes into a private
// directory of this user's inside it, where a second instance finds it.
TEST_F(InstanceLockTest, ASharedStickyDirectoryKeepsItsModeAndTheLockGoesIntoAPrivateOneInside) {
  const auto shared = directory_ / "shared";
  std::filesystem::create_directories(shared);
  ASSERT_EQ(::chmod(shared.c_str(), 01777), 0);
  InstanceLockOptions in_shared = options();
  in_shared.directory = shared;
  {
    auto lock = InstanceLock::acquire(in_shared);
    struct stat status {};
    ASSERT_EQ(::stat(shared.c_str(), &status), 0);
    EXPECT_EQ(status.st_mode & 07777, 01777u) << "the shared directory was re-moded";
    const auto own = shared / ("pgrt-" + std::to_string(::geteuid()));
    ASSERT_EQ(::lstat(own.c_str(), &status), 0);
    EXPECT_TRUE(S_ISDIR(status.st_mode));
    EXPECT_EQ(status.st_mode & 07777, 0700u);
    EXPECT_TRUE(std::filesystem::exists(own / "app.one.lock"));
    EXPECT_THROW((void)InstanceLock::acquire(in_shared), InstanceLockError)
        << "a second instance must find the lock";
  }
  // A link planted in its place is refused, never followed.
  const auto own = shared / ("pgrt-" + std::to_string(::geteuid()));
  std::filesystem::remove_all(own);
  const auto elsewhere = directory_ / "elsewhere";
  std::filesystem::create_directories(elsewhere);
  std::filesystem::create_directory_symlink(elsewhere, own);
  try {
    (void)InstanceLock::acquire(in_shared);
    ADD_FAILURE() << "followed a planted link";
  } catch (const std::system_error& error) {
    EXPECT_THAT(error.what(), HasSubstr("symbolic link"));
  }
  EXPECT_FALSE(std::filesystem::exists(elsewhere / "app.one.lock"));
}

// This user's own pgrt-<uid> inside a shared directory, that others may write into (made by hand,
// or by something under a loose umask): made private again and used, as a lock directory of this
// user's own is; only another user's is refused.
TEST_F(InstanceLockTest, ALooseOwnDirectoryInsideASharedOneIsMadePrivateAgainAndUsed) {
  const auto shared = directory_ / "shared";
  std::filesystem::create_directories(shared);
  ASSERT_EQ(::chmod(shared.c_str(), 01777), 0);
  const auto own = shared / ("pgrt-" + std::to_string(::geteuid()));
  std::filesystem::create_directory(own);
  ASSERT_EQ(::chmod(own.c_str(), 0777), 0);
  InstanceLockOptions in_shared = options();
  in_shared.directory = shared;
  EXPECT_NO_THROW((void)InstanceLock::acquire(in_shared));
  struct stat status {};
  ASSERT_EQ(::stat(own.c_str(), &status), 0);
  EXPECT_EQ(status.st_mode & 07777, 0700u);
  EXPECT_TRUE(std::filesystem::exists(own / "app.one.lock"));

  if (::geteuid() == 0) {  // only root can give a directory away
    ASSERT_EQ(::chown(own.c_str(), 65534, 65534), 0);
    try {
      (void)InstanceLock::acquire(in_shared);
      ADD_FAILURE() << "used another user's directory";
    } catch (const std::system_error& error) {
      EXPECT_THAT(error.what(), HasSubstr("it belongs to uid 65534"));
    }
  }
}

// takeover_grace bounds waits of acquire(): a negative one, or one past a day (milliseconds::max()
// would overflow the clock into a wait already over), is refused naming the option, before any
// holder is signalled; max_takeover_time() stays a sum that does not overflow.
TEST_F(InstanceLockTest, ATakeoverGraceThatCannotBeABoundIsRefused) {
  for (const auto grace : {-1ms, max_takeover_grace + 1ms, std::chrono::milliseconds::max()}) {
    InstanceLockOptions forced = options(/*force=*/true);
    forced.takeover_grace = grace;
    try {
      (void)InstanceLock::acquire(forced);
      ADD_FAILURE() << "takeover_grace " << grace.count() << " ms was taken";
    } catch (const std::invalid_argument& error) {
      EXPECT_THAT(error.what(), HasSubstr("takeover_grace"));
    }
    EXPECT_GE(max_takeover_time(forced), 0ms);
    EXPECT_LE(max_takeover_time(forced), max_takeover_grace + takeover_kill_wait + 1s);
  }
  InstanceLockOptions longest = options(/*force=*/true);
  longest.takeover_grace = max_takeover_grace;
  EXPECT_NO_THROW((void)InstanceLock::acquire(longest));
}

TEST_F(InstanceLockTest, ALockFileThatIsALinkIsNeverWrittenThrough) {
  std::filesystem::create_directory(directory_);
  ::chmod(directory_.c_str(), 0700);
  const auto victim = directory_ / "victim";
  { std::ofstream(victim) << "precious\n"; }
  std::filesystem::create_symlink(victim, directory_ / "app.one.lock");
  EXPECT_THROW((void)InstanceLock::acquire(options()), std::system_error);
  std::filesystem::remove(directory_ / "app.one.lock");
  std::filesystem::create_hard_link(victim, directory_ / "app.one.lock");
  EXPECT_THROW((void)InstanceLock::acquire(options()), std::system_error);
  std::ifstream in(victim);
  std::string content;
  std::getline(in, content);
  EXPECT_EQ(content, "precious");
}

TEST_F(InstanceLockTest, ForceNeverSignalsAPidThatDoesNotHoldTheLockFile) {
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t holder = ::fork();
  ASSERT_GE(holder, 0);
  if (holder == 0) {
    auto lock = InstanceLock::acquire(options());
    (void)::write(ready[1], "x", 1);
    for (;;) ::pause();
  }
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1);
  const pid_t bystander = ::fork();
  ASSERT_GE(bystander, 0);
  if (bystander == 0) {
    for (;;) ::pause();
  }
  {  // the file now names the bystander (as a forged or stale pid would)
    std::fstream file(directory_ / "app.one.lock", std::ios::in | std::ios::out);
    file << bystander << "\n\n";
  }
  try {
    (void)InstanceLock::acquire(options(/*force=*/true));
    ADD_FAILURE() << "took over without stopping the holder";
  } catch (const InstanceLockError& error) {
    EXPECT_EQ(error.holder_pid(), bystander);
    EXPECT_THAT(error.what(), HasSubstr("does not have it open, so it is not the holder"));
  }
  int status = 0;
  EXPECT_EQ(::waitpid(bystander, &status, WNOHANG), 0) << "the bystander was signalled";
  EXPECT_EQ(::waitpid(holder, &status, WNOHANG), 0);
  ::kill(bystander, SIGKILL);
  ::kill(holder, SIGKILL);
  ::waitpid(bystander, &status, 0);
  ::waitpid(holder, &status, 0);
  ::close(ready[0]);
  ::close(ready[1]);
}

TEST_F(InstanceLockTest, AHolderThatIgnoresSigtermIsKilledWithinTheTakeoverBound) {
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t holder = ::fork();
  ASSERT_GE(holder, 0);
  if (holder == 0) {
    ::signal(SIGTERM, SIG_IGN);
    auto lock = InstanceLock::acquire(options());
    (void)::write(ready[1], "x", 1);
    for (;;) ::pause();
  }
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1);
  InstanceLockOptions forced = options(/*force=*/true);
  forced.takeover_grace = 500ms;
  EXPECT_EQ(max_takeover_time(forced), 2000ms);
  EXPECT_EQ(max_takeover_time(options()), 0ms);
  const auto started = std::chrono::steady_clock::now();
  auto lock = InstanceLock::acquire(forced);
  EXPECT_LT(std::chrono::steady_clock::now() - started, max_takeover_time(forced));
  EXPECT_EQ(lock.took_over_from(), holder);
  int status = 0;
  ASSERT_EQ(::waitpid(holder, &status, 0), holder);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  ::close(ready[0]);
  ::close(ready[1]);
}

// A process that already holds the lock (a second StartupHygiene of the same app and instance,
// e.g. one per pool of a primary and a replica) and asks again with force (PGRT_FORCE=1) finds
// its own pid in the file, which "holds" the file (through its first descriptor): it is refused,
// saying this process already holds the lock, and never signals itself.
TEST_F(InstanceLockTest, ForceNeverSignalsItsOwnProcess) {
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    InstanceLockOptions forced = options(/*force=*/true);
    forced.takeover_grace = 300ms;
    auto first = InstanceLock::acquire(options());
    try {
      auto second = InstanceLock::acquire(forced);
      ::_exit(1);  // took over from itself
    } catch (const InstanceLockError&) {
      ::_exit(0);  // refused
    } catch (...) {
      ::_exit(2);
    }
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status)) << "the process was killed by signal "
                                 << (WIFSIGNALED(status) ? WTERMSIG(status) : 0)
                                 << " sent by its own second acquire";
  if (WIFEXITED(status)) {
    EXPECT_EQ(WEXITSTATUS(status), 0);
  }
}

// The component's start deadline covers a takeover: a holder that ignores SIGTERM is killed, and
// the new instance starts, even though the takeover outlasts the manager's start_timeout.
TEST_F(InstanceLockTest, AForcedStartOutwaitsAHolderThatIgnoresSigterm) {
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t holder = ::fork();
  ASSERT_GE(holder, 0);
  if (holder == 0) {
    ::signal(SIGTERM, SIG_IGN);
    auto lock = InstanceLock::acquire(options());
    (void)::write(ready[1], "x", 1);
    for (;;) ::pause();
  }
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1);

  lifecycle::ManagerOptions manager_options;
  manager_options.handle_signals = false;
  manager_options.shutdown_logging = false;
  manager_options.start_timeout = 300ms;  // shorter than the takeover (400 ms + SIGKILL)
  lifecycle::Manager app(manager_options);
  PoolConfig pool_config;
  pool_config.application = "app";
  pool_config.instance = "one";
  StartupHygieneOptions hygiene_options;
  hygiene_options.lock_directory = directory_;
  hygiene_options.force = true;
  hygiene_options.takeover_grace = 400ms;
  hygiene_options.cleanup = false;
  (void)add_startup_hygiene(app, pool_config, hygiene_options);
  app.on_ready([&] { app.request_stop(lifecycle::exit_code::ok, "started"); });
  EXPECT_EQ(app.run(), lifecycle::exit_code::ok) << app.stop_reason();
  EXPECT_EQ(app.stop_reason(), "started");
  int status = 0;
  ASSERT_EQ(::waitpid(holder, &status, 0), holder);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  ::close(ready[0]);
  ::close(ready[1]);
}

// The cluster-wide lock (PGRT_CLUSTER_LOCK=1) takes one connection of max_size for itself:
// add_startup_hygiene() lowers the pool's max_size by one (operations.md). A pool configured as
// PGRT_POOL_MAX=5 PGRT_POOL_MIN_IDLE=5, valid as given, is not with max_size 4:
// add_startup_hygiene() refuses it, naming the cluster lock and saying to raise PGRT_POOL_MAX,
// rather than leaving add_pool() to refuse a max_size the operator never set.
TEST(ClusterLockConfig, APoolThatTheLocksConnectionMakesInvalidIsRefusedNamingTheLock) {
  lifecycle::ManagerOptions manager_options;
  manager_options.handle_signals = false;
  manager_options.shutdown_logging = false;
  lifecycle::Manager app(manager_options);
  PoolConfig pool_config;
  pool_config.application = "app";
  pool_config.instance = "one";
  pool_config.max_size = 5;
  pool_config.min_idle = 5;
  ASSERT_NO_THROW(pool_config.validate());
  StartupHygieneOptions hygiene_options;
  hygiene_options.instance_lock = false;
  hygiene_options.cluster_lock = true;
  hygiene_options.cleanup = false;
  std::string refusal;
  try {
    (void)add_startup_hygiene(app, pool_config, hygiene_options);
    pool_config.validate();  // what add_pool(app, pool_config) runs next
  } catch (const Error& error) {
    refusal = error.what();
  }
  EXPECT_THAT(refusal, HasSubstr("PGRT_CLUSTER_LOCK")) << refusal;
  EXPECT_THAT(refusal, HasSubstr("PGRT_POOL_MAX")) << refusal;
  EXPECT_EQ(pool_config.max_size, 5u) << "the refused pool keeps its configured max_size";
}

}  // namespace
}  // namespace pgrt
