// The leftover rule (no server): which backends leftover_reasons() calls leftovers, for the
// start-up cleanup (with its own tag) and pgrt-diag (without).
#include <chrono>
#include <cstdint>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <string>
#include <vector>

#include "pgrt/db/hygiene.hpp"

namespace pgrt {
namespace {

using ::testing::ElementsAre;
using ::testing::StartsWith;
using namespace std::chrono_literals;

// A backend in scope (the checking connection's database and role).
AppBackend backend(int pid, std::string application_name, std::string state,
                   std::int64_t started_us = 0, std::chrono::milliseconds in_state = 0ms) {
  return AppBackend{.pid = pid,
                    .application_name = std::move(application_name),
                    .state = std::move(state),
                    .started_us = started_us,
                    .in_state = in_state,
                    .in_scope = true};
}

TEST(LeftoverReasons, WithAnOwnTagEveryOtherIncarnationOfItsInstanceWhateverItsState) {
  AppBackend elsewhere = backend(7, "orders/eu-1/0badcafe", "idle");
  elsewhere.in_scope = false;  // another database or role
  const std::vector<AppBackend> backends = {
      backend(1, "orders/eu-1/0badcafe", "idle"),
      backend(2, "orders/eu-1/0badcafe", "active"),  // a dead process's query: a leftover too
      backend(3, "orders/eu-1/0badcafe", "idle in transaction"),
      backend(4, "orders/eu-1/1234abcd", "idle"),  // this process
      backend(5, "orders/eu-2/0badcafe", "idle"),  // another instance
      backend(6, "orders/eu-1/report-job", "idle"),
      elsewhere,
      backend(8, "orders/console", "active"),
      backend(9, "orders/eu-1/0BADCAFE", "idle"),
  };
  const auto reasons =
      leftover_reasons(backends, {.application = "orders", .own_tag = "orders/eu-1/1234abcd"});
  const std::string earlier = "an earlier incarnation of orders/eu-1";
  EXPECT_THAT(reasons, ElementsAre(earlier, earlier, earlier, "", "", "", "", "", ""));
  // A tag of another app as its own: no instance of this app is its, so no incarnation goes.
  EXPECT_THAT(
      leftover_reasons(backends, {.application = "orders", .own_tag = "billing/eu-1/1234abcd"}),
      ElementsAre("", "", "", "", "", "", "", "", ""));
}

TEST(LeftoverReasons, TheIdleRuleTakesOnlyIdleTagsOfTheAppHoldingNoAdvisoryLock) {
  AppBackend lock_session = backend(5, "orders/eu-3/0badcafe", "idle", 0, 600s);
  lock_session.holds_advisory_lock = true;
  const std::vector<AppBackend> backends = {
      backend(1, "orders/eu-2/0badcafe", "idle", 0, 61s),
      backend(2, "orders/eu-2/0badcafe", "idle", 0, 59s),
      backend(3, "orders/eu-2/0badcafe", "idle in transaction", 0, 600s),
      backend(4, "orders/eu-2/0badcafe", "active", 0, 600s),
      lock_session,
      backend(6, "orders/eu-1/1234abcd", "idle", 0, 600s),  // this process
      backend(7, "orders/console", "idle", 0, 600s),
      backend(8, "orders/eu-2/report-job", "idle", 0, 600s),
  };
  const LeftoverRule rule{
      .application = "orders", .own_tag = "orders/eu-1/1234abcd", .idle_threshold = 60s};
  EXPECT_THAT(leftover_reasons(backends, rule),
              ElementsAre("idle for 61 s", "", "", "", "", "", "", ""));
  EXPECT_THAT(leftover_reasons(backends, {.application = "orders", .own_tag = rule.own_tag}),
              ElementsAre("", "", "", "", "", "", "", ""))
      << "off at zero";
}

TEST(LeftoverReasons, WithoutAnOwnTagTheIncarnationsBeforeTheNewestOfEachInstance) {
  AppBackend newer_elsewhere = backend(9, "orders/eu-1/2222aaaa", "idle", 900);
  newer_elsewhere.in_scope = false;
  const std::vector<AppBackend> backends = {
      backend(1, "orders/eu-1/0badcafe", "idle", 100),
      backend(2, "orders/eu-1/0badcafe", "active", 150),  // superseded whatever its state
      backend(3, "orders/eu-1/1234abcd", "idle", 200),    // the newest: live
      backend(4, "orders/eu-1/1234abcd", "active", 120),  // an old connection of the live one
      // Names that only start like tags never count, not even as the newest.
      backend(5, "orders/eu-1/report-job", "active", 300),
      backend(6, "orders/console", "active", 310), backend(7, "orders/batch", "idle", 320),
      backend(8, "orders/eu-2/0badcafe", "idle", 50),  // alone in its instance: live
      newer_elsewhere,  // another database's or role's: judges nothing here
  };
  const auto reasons = leftover_reasons(backends, {.application = "orders"});
  EXPECT_THAT(reasons[0], StartsWith("superseded: orders/eu-1/1234abcd started later"));
  EXPECT_EQ(reasons[1], reasons[0]);
  for (std::size_t i = 2; i < reasons.size(); ++i) EXPECT_EQ(reasons[i], "") << i;
}

// An incarnation whose process runs on the checking host is the live one, whatever the others'
// starts: a newer one that does not run here is the leftover (or a duplicate elsewhere).
TEST(LeftoverReasons, AnIncarnationRunningOnThisHostIsTheLiveOneEvenIfOlder) {
  AppBackend older_here = backend(1, "orders/eu-1/0badcafe", "idle", 100);
  older_here.running_here = true;
  older_here.presence = HostPresence::running;
  const std::vector<AppBackend> backends = {
      older_here,
      backend(2, "orders/eu-1/1234abcd", "idle", 200),
      backend(3, "orders/eu-2/5555aaaa", "idle", 50),
  };
  const auto reasons = leftover_reasons(backends, {.application = "orders"});
  EXPECT_EQ(reasons[0], "");
  EXPECT_THAT(reasons[1], StartsWith("superseded: orders/eu-1/0badcafe"));
  EXPECT_EQ(reasons[2], "");
}

}  // namespace
}  // namespace pgrt
