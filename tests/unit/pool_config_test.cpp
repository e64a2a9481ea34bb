#include <atomic>
#include <boost/json/src.hpp>  // header-only Boost.JSON, compiled into this test
#include <chrono>
#include <cstdlib>
#include <functional>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <libpq-fe.h>
#include <limits>
#include <memory>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <pgrt/db/pool.hpp>

#include "pool/budget.hpp"

namespace pgrt {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;
using ::testing::Not;

// Sends the default logger to a string for the life of the object.
class LogCapture {
 public:
  LogCapture()
      : previous_(spdlog::default_logger()),
        capture_(std::make_shared<spdlog::logger>(
            "capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(log_))) {
    spdlog::set_default_logger(capture_);
  }
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;
  LogCapture(LogCapture&&) = delete;
  LogCapture& operator=(LogCapture&&) = delete;
  ~LogCapture() { spdlog::set_default_logger(previous_); }
  std::string text() {
    capture_->flush();
    return log_.str();
  }

 private:
  std::ostringstream log_;
  std::shared_ptr<spdlog::logger> previous_;
  std::shared_ptr<spdlog::logger> capture_;
};

// The invalid_config error validate() throws for `config`, or an empty string if it accepts it.
std::string rejection(const PoolConfig& config) {
  try {
    config.validate();
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), client_errc::invalid_config) << error.what();
    return error.what();
  }
  return {};
}

struct DurationField {
  const char* name;
  std::function<void(PoolConfig&)> make_negative;  // sets the field to -7 ms (or -7 s)
  const char* shown;                               // how the message shows the value
  std::function<void(PoolConfig&)> make_zero;      // sets it to 0; null if 0 is rejected too
};

std::vector<DurationField> duration_fields() {
  return {
      {"acquire_timeout", [](PoolConfig& c) { c.acquire_timeout = milliseconds(-7); }, "-7 ms",
       [](PoolConfig& c) { c.acquire_timeout = milliseconds(0); }},
      {"max_lifetime", [](PoolConfig& c) { c.max_lifetime = milliseconds(-7); }, "-7 ms",
       [](PoolConfig& c) { c.max_lifetime = milliseconds(0); }},
      {"idle_timeout", [](PoolConfig& c) { c.idle_timeout = milliseconds(-7); }, "-7 ms",
       [](PoolConfig& c) { c.idle_timeout = milliseconds(0); }},
      {"keepalive_interval", [](PoolConfig& c) { c.keepalive_interval = milliseconds(-7); },
       "-7 ms", [](PoolConfig& c) { c.keepalive_interval = milliseconds(0); }},
      {"validate_after_idle", [](PoolConfig& c) { c.validate_after_idle = milliseconds(-7); },
       "-7 ms", [](PoolConfig& c) { c.validate_after_idle = milliseconds(0); }},
      {"watch_idle_after", [](PoolConfig& c) { c.watch_idle_after = milliseconds(-9); }, "-9 ms",
       [](PoolConfig& c) { c.watch_idle_after = milliseconds(0); }},
      {"leak_threshold", [](PoolConfig& c) { c.leak_threshold = milliseconds(-7); }, "-7 ms",
       [](PoolConfig& c) { c.leak_threshold = milliseconds(0); }},
      {"connect_backoff_initial",
       [](PoolConfig& c) { c.connect_backoff_initial = milliseconds(-7); }, "-7 ms", nullptr},
      {"connect_backoff_max", [](PoolConfig& c) { c.connect_backoff_max = milliseconds(-7); },
       "-7 ms", nullptr},
      {"connect.connect_timeout",
       [](PoolConfig& c) { c.connect.connect_timeout = milliseconds(-7); }, "-7 ms", nullptr},
      {"connect.tcp_user_timeout",
       [](PoolConfig& c) { c.connect.tcp_user_timeout = milliseconds(-7); }, "-7 ms",
       [](PoolConfig& c) { c.connect.tcp_user_timeout = milliseconds(0); }},
      {"connect.cancel_timeout", [](PoolConfig& c) { c.connect.cancel_timeout = milliseconds(-7); },
       "-7 ms", [](PoolConfig& c) { c.connect.cancel_timeout = milliseconds(0); }},
      {"connect.keepalives.idle", [](PoolConfig& c) { c.connect.keepalives->idle = seconds(-7); },
       "-7 s", [](PoolConfig& c) { c.connect.keepalives->idle = seconds(0); }},
      {"connect.keepalives.interval",
       [](PoolConfig& c) { c.connect.keepalives->interval = seconds(-7); }, "-7 s",
       [](PoolConfig& c) { c.connect.keepalives->interval = seconds(0); }},
      {"guards.idle_in_transaction_timeout",
       [](PoolConfig& c) { c.guards.idle_in_transaction_timeout = milliseconds(-7); }, "-7 ms",
       [](PoolConfig& c) { c.guards.idle_in_transaction_timeout = milliseconds(0); }},
      {"guards.client_connection_check_interval",
       [](PoolConfig& c) { c.guards.client_connection_check_interval = milliseconds(-7); }, "-7 ms",
       [](PoolConfig& c) { c.guards.client_connection_check_interval = milliseconds(0); }},
      {"guards.tcp_user_timeout",
       [](PoolConfig& c) { c.guards.tcp_user_timeout = milliseconds(-7); }, "-7 ms",
       [](PoolConfig& c) { c.guards.tcp_user_timeout = milliseconds(0); }},
  };
}

class EnvironmentTest : public ::testing::Test {
 protected:
  void TearDown() override {
    for (const char* name : {"DATABASE_URL",           "PGRT_POOL_MAX",
                             "PGRT_POOL_MIN_IDLE",     "PGRT_ACQUIRE_TIMEOUT_MS",
                             "PGRT_MAX_LIFETIME_S",    "PGRT_IDLE_TIMEOUT_S",
                             "PGRT_LEAK_THRESHOLD_MS", "PGRT_POOL_PRESET",
                             "PGRT_POOL_RESET",        "PGRT_APP",
                             "PGRT_INSTANCE",          "PGRT_POOLER",
                             "PGRT_BUDGET_KEY",        "PGRT_BUDGET_SLOTS",
                             "PGRT_POOL_CONSUMERS",    "PGRT_BUDGET_CHECK_MS",
                             "PGRT_BUDGET_CLASSES",    "PGRT_BUDGET_CLASS",
                             "PGRT_POOL_TIMINGS",      "PGRT_RECHECK_SESSION_ATTRS"}) {
      ::unsetenv(name);
    }
  }
};

TEST_F(EnvironmentTest, ReadsEveryVariable) {
  ::setenv("DATABASE_URL", "postgresql://db/app", 1);
  ::setenv("PGRT_POOL_PRESET", "micro", 1);
  ::setenv("PGRT_POOL_MIN_IDLE", "1", 1);
  ::setenv("PGRT_ACQUIRE_TIMEOUT_MS", "250", 1);
  ::setenv("PGRT_MAX_LIFETIME_S", "600", 1);
  ::setenv("PGRT_IDLE_TIMEOUT_S", "60", 1);
  ::setenv("PGRT_LEAK_THRESHOLD_MS", "5000", 1);
  ::setenv("PGRT_APP", "orders", 1);
  ::setenv("PGRT_INSTANCE", "eu-1", 1);
  const auto config = PoolConfig::from_env();
  EXPECT_EQ(config.conninfo, "postgresql://db/app");
  EXPECT_EQ(config.max_size, 3U) << "micro preset";
  EXPECT_EQ(config.min_idle, 1U);
  EXPECT_EQ(config.acquire_timeout, std::chrono::milliseconds(250));
  EXPECT_EQ(config.max_lifetime, std::chrono::seconds(600));
  EXPECT_EQ(config.idle_timeout, std::chrono::seconds(60));
  EXPECT_EQ(config.leak_threshold, std::chrono::seconds(5));
  EXPECT_EQ(config.application, "orders");
  EXPECT_EQ(config.instance, "eu-1");
  ::setenv("PGRT_POOL_MAX", "7", 1);
  EXPECT_EQ(PoolConfig::from_env().max_size, 7U) << "PGRT_POOL_MAX overrides the preset";
  ::unsetenv("PGRT_POOL_MAX");
  ::setenv("PGRT_POOL_PRESET", "small", 1);
  EXPECT_EQ(PoolConfig::from_env(PoolConfig::micro()).max_size, 10U) << "the preset wins";
  ::unsetenv("PGRT_POOL_PRESET");
  EXPECT_EQ(PoolConfig::from_env(PoolConfig::micro()).max_size, 3U) << "the given defaults";
  EXPECT_EQ(PoolConfig::from_env(PoolConfig::micro()).conninfo, "postgresql://db/app");
}

TEST_F(EnvironmentTest, TimingsAreOnUnlessTurnedOff) {
  EXPECT_TRUE(PoolConfig::from_env().timings);
  ::setenv("PGRT_POOL_TIMINGS", "0", 1);
  EXPECT_FALSE(PoolConfig::from_env().timings);
  ::setenv("PGRT_POOL_TIMINGS", "1", 1);
  EXPECT_TRUE(PoolConfig::from_env().timings);
  ::setenv("PGRT_POOL_TIMINGS", "off", 1);
  try {
    (void)PoolConfig::from_env();
    ADD_FAILURE() << "accepted PGRT_POOL_TIMINGS=off";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), client_errc::invalid_config);
    EXPECT_THAT(error.what(), HasSubstr("PGRT_POOL_TIMINGS='off'"));
  }
}

TEST_F(EnvironmentTest, SessionAttrsAreRecheckedOnlyWhenTurnedOn) {
  EXPECT_FALSE(PoolConfig::from_env().recheck_session_attrs);
  ::setenv("PGRT_RECHECK_SESSION_ATTRS", "1", 1);
  EXPECT_TRUE(PoolConfig::from_env().recheck_session_attrs);
  ::setenv("PGRT_RECHECK_SESSION_ATTRS", "0", 1);
  EXPECT_FALSE(PoolConfig::from_env().recheck_session_attrs);
  ::setenv("PGRT_RECHECK_SESSION_ATTRS", "yes", 1);
  try {
    (void)PoolConfig::from_env();
    ADD_FAILURE() << "accepted PGRT_RECHECK_SESSION_ATTRS=yes";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), client_errc::invalid_config);
    EXPECT_THAT(error.what(), HasSubstr("PGRT_RECHECK_SESSION_ATTRS='yes'"));
  }
}

TEST_F(EnvironmentTest, MalformedValuesNameTheVariableAndTheForm) {
  for (const char* bad : {"abc", "-1", "0", "3x", ""}) {
    ::setenv("PGRT_POOL_MAX", bad, 1);
    try {
      (void)PoolConfig::from_env();
      ADD_FAILURE() << "accepted PGRT_POOL_MAX=" << bad;
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::invalid_config);
      EXPECT_THAT(error.what(), HasSubstr("PGRT_POOL_MAX"));
      EXPECT_THAT(error.what(), HasSubstr("whole number from 1"));
    }
  }
  ::unsetenv("PGRT_POOL_MAX");
  ::setenv("PGRT_POOL_PRESET", "huge", 1);
  EXPECT_THROW((void)PoolConfig::from_env(), Error);
  ::setenv("PGRT_POOL_PRESET", "micro", 1);
  ::setenv("PGRT_POOL_MIN_IDLE", "5", 1);
  try {
    (void)PoolConfig::from_env();
    ADD_FAILURE() << "min_idle above max accepted";
  } catch (const Error& error) {
    EXPECT_THAT(error.what(), HasSubstr("min_idle"));
  }
}

TEST_F(EnvironmentTest, ResetPolicyFromTheEnvironment) {
  EXPECT_EQ(PoolConfig{}.reset, ResetPolicy::rollback) << "the default: no round trip when idle";
  EXPECT_EQ(PoolConfig::from_env().reset, ResetPolicy::rollback);
  ::setenv("PGRT_POOL_RESET", "discard_all", 1);
  EXPECT_EQ(PoolConfig::from_env().reset, ResetPolicy::discard_all);
  ::setenv("PGRT_POOL_RESET", "rollback", 1);
  EXPECT_EQ(PoolConfig::from_env(PoolConfig{.reset = ResetPolicy::discard_all}).reset,
            ResetPolicy::rollback);
  for (const char* bad : {"", "DISCARD ALL", "discard", "none"}) {
    ::setenv("PGRT_POOL_RESET", bad, 1);
    try {
      (void)PoolConfig::from_env();
      ADD_FAILURE() << "accepted PGRT_POOL_RESET=" << bad;
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::invalid_config);
      EXPECT_THAT(error.what(), HasSubstr("PGRT_POOL_RESET"));
      EXPECT_THAT(error.what(), HasSubstr("'rollback' or 'discard_all'"));
    }
  }
  EXPECT_EQ(to_string(ResetPolicy::discard_all), "discard_all");
}

TEST_F(EnvironmentTest, PoolerFromTheEnvironment) {
  EXPECT_EQ(PoolConfig::from_env().connect.pooler, Pooler::none);
  ::setenv("PGRT_POOLER", "transaction", 1);
  EXPECT_EQ(PoolConfig::from_env().connect.pooler, Pooler::transaction);
  // Behind a transaction pooler the server settings of the guards are left out, the TCP ones
  // stay.
  const auto guarded = with_session_guards(PoolConfig::from_env().connect, SessionGuards{});
  EXPECT_TRUE(guarded.session_settings.empty());
  EXPECT_TRUE(guarded.keepalives.has_value());
  EXPECT_GT(guarded.tcp_user_timeout.count(), 0);
  ::setenv("PGRT_POOLER", "session", 1);
  EXPECT_EQ(PoolConfig::from_env().connect.pooler, Pooler::session);
  EXPECT_FALSE(with_session_guards(PoolConfig::from_env().connect, SessionGuards{})
                   .session_settings.empty());
  ::setenv("PGRT_POOLER", "none", 1);
  EXPECT_EQ(PoolConfig::from_env().connect.pooler, Pooler::none);
  for (const char* bad : {"", "Transaction", "pgbouncer", "statement"}) {
    ::setenv("PGRT_POOLER", bad, 1);
    try {
      (void)PoolConfig::from_env();
      ADD_FAILURE() << "accepted PGRT_POOLER=" << bad;
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::invalid_config);
      EXPECT_THAT(error.what(), HasSubstr("PGRT_POOLER"));
    }
  }
  ::setenv("PGRT_POOLER", "transaction", 1);
  ::setenv("PGRT_POOL_RESET", "discard_all", 1);
  EXPECT_THROW((void)PoolConfig::from_env(), Error) << "discard_all behind a transaction pooler";
}

TEST_F(EnvironmentTest, ConsumersFromTheEnvironment) {
  EXPECT_TRUE(PoolConfig::from_env().consumers.empty());
  ::setenv("PGRT_POOL_MAX", "5", 1);
  ::setenv("PGRT_POOL_CONSUMERS", "scraper-a:1:2,scraper-b:2:0", 1);
  const auto config = PoolConfig::from_env();
  ASSERT_EQ(config.consumers.size(), 2U);
  EXPECT_EQ(config.consumers[0].name, "scraper-a");
  EXPECT_EQ(config.consumers[0].min, 1U);
  EXPECT_EQ(config.consumers[0].max, 2U);
  EXPECT_EQ(config.consumers[1].name, "scraper-b");
  EXPECT_EQ(config.consumers[1].max, 0U);  // the pool's max
  for (const char* bad : {"a", "a:1", "a:1:2:3", ":1:2", "a:x:2", "a:1:2,", "a:1:2,a:1:2", "a:3:2",
                          "a:1:6", "a:3:5,b:3:5", "a:1:2, b:1:2"}) {
    ::setenv("PGRT_POOL_CONSUMERS", bad, 1);
    try {
      (void)PoolConfig::from_env();
      ADD_FAILURE() << "accepted PGRT_POOL_CONSUMERS=" << bad;
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::invalid_config) << bad;
    }
  }
  // Minimums beyond what reserved_for_priority leaves are refused with both numbers.
  PoolConfig reserved;
  reserved.max_size = 4;
  reserved.reserved_for_priority = 2;
  reserved.consumers = {{.name = "a", .min = 2}, {.name = "b", .min = 1}};
  try {
    reserved.validate();
    ADD_FAILURE() << "minimums of 3 accepted beside 2 reserved of 4";
  } catch (const Error& error) {
    EXPECT_THAT(error.what(), HasSubstr("add up to 3"));
    EXPECT_THAT(error.what(), HasSubstr("reserved_for_priority 2"));
  }
}

TEST_F(EnvironmentTest, BudgetFromTheEnvironment) {
  EXPECT_TRUE(PoolConfig::from_env().budget.key.empty());
  ::setenv("PGRT_BUDGET_KEY", "orders-db", 1);
  ::setenv("PGRT_BUDGET_SLOTS", "40", 1);
  const auto config = PoolConfig::from_env();
  EXPECT_EQ(config.budget.key, "orders-db");
  EXPECT_EQ(config.budget.slots, 40U);
  EXPECT_EQ(config.budget.check_interval, std::chrono::seconds(10));
  ::setenv("PGRT_BUDGET_CHECK_MS", "250", 1);
  EXPECT_EQ(PoolConfig::from_env().budget.check_interval, std::chrono::milliseconds(250));
  for (const char* bad : {"-1", "50"}) {  // 1-99 ms: a pg_locks query too often
    ::setenv("PGRT_BUDGET_CHECK_MS", bad, 1);
    EXPECT_THROW((void)PoolConfig::from_env(), Error) << bad;
  }
  ::unsetenv("PGRT_BUDGET_CHECK_MS");
  for (const char* bad : {"0", "", "forty", "100001", "-3"}) {
    ::setenv("PGRT_BUDGET_SLOTS", bad, 1);
    try {
      (void)PoolConfig::from_env();
      ADD_FAILURE() << "accepted PGRT_BUDGET_SLOTS=" << bad;
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::invalid_config);
      EXPECT_THAT(error.what(), HasSubstr("PGRT_BUDGET_SLOTS"));
    }
  }
  ::setenv("PGRT_BUDGET_SLOTS", "5", 1);
  for (const char* marker_name : {"orders/waiting", "orders/members"}) {
    ::setenv("PGRT_BUDGET_KEY", marker_name, 1);
    try {
      (void)PoolConfig::from_env();
      ADD_FAILURE() << "accepted the budget key " << marker_name << ", a marker's name";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::invalid_config);
      EXPECT_THAT(error.what(), HasSubstr(marker_name));
    }
  }
  ::setenv("PGRT_BUDGET_KEY", "orders-db", 1);
  ::unsetenv("PGRT_BUDGET_SLOTS");
  try {
    (void)PoolConfig::from_env();
    ADD_FAILURE() << "accepted a budget key without slots";
  } catch (const Error& error) {
    EXPECT_THAT(error.what(), HasSubstr("budget.slots is 0"));
    EXPECT_THAT(error.diagnostics().hint, HasSubstr("PGRT_BUDGET_SLOTS"));
  }
}

TEST_F(EnvironmentTest, BudgetClassesFromTheEnvironment) {
  ::setenv("PGRT_BUDGET_KEY", "orders-db", 1);
  ::setenv("PGRT_BUDGET_SLOTS", "50", 1);
  ::setenv("PGRT_BUDGET_CLASSES", "api:10,batch:30", 1);
  ::setenv("PGRT_BUDGET_CLASS", "batch", 1);
  const auto config = PoolConfig::from_env();
  ASSERT_EQ(config.budget.classes.size(), 2U);
  EXPECT_EQ(config.budget.classes[0].name, "api");
  EXPECT_EQ(config.budget.classes[0].slots, 10U);
  EXPECT_EQ(config.budget.classes[1].slots, 30U);
  EXPECT_EQ(config.budget.class_name, "batch");
  const auto expect_refused = [](const char* classes, const char* class_name, const char* says) {
    ::setenv("PGRT_BUDGET_CLASSES", classes, 1);
    ::setenv("PGRT_BUDGET_CLASS", class_name, 1);
    try {
      (void)PoolConfig::from_env();
      ADD_FAILURE() << "accepted PGRT_BUDGET_CLASSES=" << classes
                    << " PGRT_BUDGET_CLASS=" << class_name;
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::invalid_config);
      EXPECT_THAT(error.what(), HasSubstr(says)) << classes;
    }
  };
  expect_refused("api:10,batch:41", "api", "51 slots in all");
  expect_refused("api:10,api:5", "api", "listed twice");
  expect_refused("api", "api", "not name:slots");
  expect_refused("api:0", "api", "not valid");
  expect_refused("api:10", "web", "'web' (PGRT_BUDGET_CLASS) is not listed");
  expect_refused("api:20,batch:30", "", "the classes leave none");
  expect_refused("a pi:10", "a pi", "printable");
}

TEST(BudgetClassesTest, EachClassTakesItsOwnSlotsThenTheSharedOnes) {
  Budget budget{.key = "k", .slots = 50, .classes = {{"api", 10}, {"batch", 30}}};
  const auto ranges = [&] {
    std::vector<std::pair<std::size_t, std::size_t>> found;
    for (const auto& range : detail::slot_ranges(budget))
      found.emplace_back(range.begin, range.end);
    return found;
  };
  budget.class_name = "api";
  EXPECT_EQ(ranges(), (std::vector<std::pair<std::size_t, std::size_t>>{{0, 10}, {40, 50}}));
  // Its own split among the 2 processes of its class, and the shared among all 4.
  EXPECT_EQ(detail::budget_fair_share(budget, 4, 2, 3, 1), 10U / 2 + 10U / 4);
  // 10 shared over 4: the first two (by rank) get the 2 left over.
  EXPECT_EQ(detail::budget_fair_share(budget, 4, 2, 0, 1), 10U / 2 + 10U / 4 + 1);
  EXPECT_EQ(detail::budget_fair_share(budget, 4, 3, 1, 0), 10U / 3 + 1 + 10U / 4 + 1);
  EXPECT_EQ(detail::budget_class_marker(budget), 1U);
  EXPECT_EQ(detail::budget_class_of_slot(budget, 9), 1U);
  EXPECT_EQ(detail::budget_class_of_slot(budget, 10), 2U);
  EXPECT_EQ(detail::budget_class_of_slot(budget, 45), 0U);  // shared
  budget.class_name = "batch";
  EXPECT_EQ(ranges(), (std::vector<std::pair<std::size_t, std::size_t>>{{10, 40}, {40, 50}}));
  EXPECT_THAT(detail::describe_full_budget(budget, 50),
              HasSubstr("its class 'batch' has 30 slots and 10 are shared"));
  budget.class_name.clear();
  EXPECT_EQ(ranges(), (std::vector<std::pair<std::size_t, std::size_t>>{{40, 50}}));
  EXPECT_EQ(detail::budget_fair_share(budget, 20, 1, 19, 0), 1U);  // never 0
  const Budget plain{.key = "k", .slots = 12};
  EXPECT_EQ(detail::budget_fair_share(plain, 4, 1, 0, 0), 3U);
  // The shares of every process add up to the budget: 6 over 4 are 2, 2, 1, 1.
  const Budget six{.key = "k", .slots = 6};
  std::size_t total = 0;
  for (std::size_t rank = 0; rank < 4; ++rank) {
    total += detail::budget_fair_share(six, 4, 1, rank, 0);
  }
  EXPECT_EQ(total, 6U);
  EXPECT_EQ(detail::budget_fair_share(six, 4, 1, 1, 0), 2U);
  EXPECT_EQ(detail::budget_fair_share(six, 4, 1, 2, 0), 1U);
  EXPECT_THAT(detail::describe_full_budget(plain, 12),
              HasSubstr("is full: all 12 slots are held (12 holders"));
}

TEST(PoolConfigTest, PresetsAndValidation) {
  EXPECT_EQ(PoolConfig::micro().max_size, 3U);
  EXPECT_EQ(PoolConfig::small().max_size, 10U);
  PoolConfig reserved_all = PoolConfig::micro();
  reserved_all.reserved_for_priority = 3;
  EXPECT_THROW(reserved_all.validate(), Error);
  EXPECT_NO_THROW(PoolConfig::micro().validate());
}

// A min_idle above the budget's slots would ask for slots it can never hold, for good (and keep
// every sharer at its fair share): refused, naming both. (Found by review.)
TEST(PoolConfigTest, MinIdleAboveTheBudgetsSlotsIsRefused) {
  PoolConfig config = PoolConfig::small();
  config.budget = {.key = "orders-db", .slots = 2};
  config.min_idle = 3;
  const std::string why = rejection(config);
  EXPECT_THAT(why, HasSubstr("min_idle (3)"));
  EXPECT_THAT(why, HasSubstr("2 slots of the connection budget 'orders-db'"));
  config.min_idle = 2;
  EXPECT_EQ(rejection(config), "");
}

TEST(PoolConfigTest, NegativeDurationsAreRejectedNamingTheFieldAndValue) {
  ASSERT_EQ(rejection(PoolConfig{}), "") << "the defaults are valid";
  for (const auto& field : duration_fields()) {
    SCOPED_TRACE(field.name);
    PoolConfig config;
    field.make_negative(config);
    const std::string message = rejection(config);
    EXPECT_THAT(message, HasSubstr(std::string(field.name) + " "));
    EXPECT_THAT(message, HasSubstr(field.shown));
    EXPECT_THAT(message, HasSubstr("HINT: ")) << "says what to do";
  }
}

TEST(PoolConfigTest, ZeroIsAcceptedWhereItMeansOffAndRejectedElsewhere) {
  for (const auto& field : duration_fields()) {
    SCOPED_TRACE(field.name);
    if (field.make_zero) {
      PoolConfig config;
      field.make_zero(config);
      EXPECT_EQ(rejection(config), "");
    }
  }
  PoolConfig no_connect_timeout;
  no_connect_timeout.connect.connect_timeout = milliseconds(0);
  EXPECT_THAT(rejection(no_connect_timeout), HasSubstr("connect.connect_timeout is 0 ms"))
      << "every connect would time out at once";
  PoolConfig no_backoff;
  no_backoff.connect_backoff_initial = milliseconds(0);
  EXPECT_THAT(rejection(no_backoff), HasSubstr("connect_backoff_initial is 0 ms"));
  PoolConfig backoff_inverted;
  backoff_inverted.connect_backoff_max = milliseconds(50);
  EXPECT_THAT(rejection(backoff_inverted),
              HasSubstr("connect_backoff_max (50 ms) is below connect_backoff_initial (100 ms)"));
}

// "Forever" written as a huge duration would overflow the pool's clock arithmetic (a deadline in
// the past: every acquire failing at once, every connection closed at its first return): more
// than a year is refused, naming the field and saying that 0 means never or off. NaN jitter too.
TEST(PoolConfigTest, DurationsLongerThanAYearAndNanJitterAreRejected) {
  const auto huge = milliseconds::max();
  const std::vector<std::pair<std::string, std::function<void(PoolConfig&)>>> fields{
      {"acquire_timeout", [&](PoolConfig& c) { c.acquire_timeout = huge; }},
      {"max_lifetime", [&](PoolConfig& c) { c.max_lifetime = huge; }},
      {"idle_timeout", [&](PoolConfig& c) { c.idle_timeout = huge; }},
      {"keepalive_interval", [&](PoolConfig& c) { c.keepalive_interval = huge; }},
      {"connect_backoff_max", [&](PoolConfig& c) { c.connect_backoff_max = huge; }},
      {"connect.connect_timeout", [&](PoolConfig& c) { c.connect.connect_timeout = huge; }},
      {"budget.check_interval", [&](PoolConfig& c) { c.budget.check_interval = huge; }},
  };
  for (const auto& [name, set] : fields) {
    SCOPED_TRACE(name);
    PoolConfig config;
    set(config);
    const std::string message = rejection(config);
    EXPECT_THAT(message, HasSubstr(name + " is "));
    EXPECT_THAT(message, HasSubstr("longer than a year"));
    EXPECT_THAT(message, HasSubstr("HINT: give at most 365 days"));
  }
  PoolConfig a_year;
  a_year.max_lifetime = std::chrono::hours(24 * 365);
  a_year.acquire_timeout = std::chrono::hours(24 * 365);
  EXPECT_EQ(rejection(a_year), "");
  PoolConfig nan_jitter;
  nan_jitter.lifetime_jitter = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THAT(rejection(nan_jitter), HasSubstr("lifetime_jitter and connect_backoff_jitter"));
  PoolConfig nan_backoff;
  nan_backoff.connect_backoff_jitter = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THAT(rejection(nan_backoff), HasSubstr("must be in [0, 1)"));
}

// libpq reads tcp_user_timeout, and the server its guard settings, as an int of milliseconds: a
// value above INT_MAX ms, though within a year, would fail every connect (as if the server were
// down). Refused, naming the field.
TEST(PoolConfigTest, SettingsReadAsAnIntOfMillisecondsAreRefusedAboveIt) {
  const milliseconds too_long = std::chrono::hours(24 * 25);  // 2,160,000,000 ms
  const std::vector<std::pair<std::string, std::function<void(PoolConfig&)>>> fields{
      {"connect.tcp_user_timeout", [&](PoolConfig& c) { c.connect.tcp_user_timeout = too_long; }},
      {"guards.tcp_user_timeout", [&](PoolConfig& c) { c.guards.tcp_user_timeout = too_long; }},
      {"guards.idle_in_transaction_timeout",
       [&](PoolConfig& c) { c.guards.idle_in_transaction_timeout = too_long; }},
      {"guards.client_connection_check_interval",
       [&](PoolConfig& c) { c.guards.client_connection_check_interval = too_long; }},
  };
  for (const auto& [name, set] : fields) {
    SCOPED_TRACE(name);
    PoolConfig config;
    set(config);
    const std::string message = rejection(config);
    EXPECT_THAT(message, HasSubstr(name + " is 2160000000 ms"));
    EXPECT_THAT(message, HasSubstr("(2147483647 ms)"));
  }
  PoolConfig at_most;
  at_most.guards.tcp_user_timeout = milliseconds(std::numeric_limits<int>::max());
  EXPECT_EQ(rejection(at_most), "");
}

TEST(PoolConfigTest, NegativeKeepaliveCountAndNoKeepalives) {
  PoolConfig config;
  config.connect.keepalives->count = -2;
  EXPECT_THAT(rejection(config), HasSubstr("connect.keepalives.count is -2"));
  config.connect.keepalives.reset();
  EXPECT_EQ(rejection(config), "") << "no keepalives: nothing to check";
}

TEST(PoolConfigTest, IdleTimeoutNotBelowMaxLifetimeWarnsAndIsAccepted) {
  LogCapture log;
  PoolConfig config;
  config.max_lifetime = std::chrono::minutes(5);  // below the default idle_timeout, 10 min
  EXPECT_EQ(rejection(config), "");
  EXPECT_THAT(log.text(),
              HasSubstr("idle_timeout (600000 ms) is not below max_lifetime (300000 ms)"));
  EXPECT_THAT(log.text(), HasSubstr("[warning]"));

  LogCapture equal;
  config.idle_timeout = config.max_lifetime;
  EXPECT_EQ(rejection(config), "");
  EXPECT_THAT(equal.text(), HasSubstr("is not below max_lifetime"));

  for (const auto& fine :
       {PoolConfig{.max_lifetime = std::chrono::minutes(5),
       .idle_timeout = std::chrono::minutes(4)},
        PoolConfig{.max_lifetime = milliseconds(0)},
        PoolConfig{.max_lifetime = std::chrono::minutes(5), .idle_timeout = milliseconds(0)},
        PoolConfig{}}) {
    LogCapture quiet;
    EXPECT_EQ(rejection(fine), "");
    EXPECT_EQ(quiet.text(), "") << "max_lifetime " << fine.max_lifetime.count()
                                << " ms, idle_timeout " << fine.idle_timeout.count() << " ms";
  }
}

TEST_F(EnvironmentTest, NegativeDurationsAreRejected) {
  for (const char* name : {"PGRT_ACQUIRE_TIMEOUT_MS", "PGRT_MAX_LIFETIME_S", "PGRT_IDLE_TIMEOUT_S",
                           "PGRT_LEAK_THRESHOLD_MS"}) {
    ::setenv(name, "-5", 1);
    try {
      (void)PoolConfig::from_env();
      ADD_FAILURE() << "accepted " << name << "=-5";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::invalid_config);
      EXPECT_THAT(error.what(), HasSubstr(std::string(name) + "='-5' is not valid"));
      EXPECT_THAT(error.what(), HasSubstr("whole number from 0"));
    }
    ::unsetenv(name);
  }
}

// docs/pool.md: "a malformed value is an invalid_config error naming the variable and the
// accepted form". PGRT_APP= (an empty value: a deployment template whose variable was left blank)
// is refused naming PGRT_APP.
TEST_F(EnvironmentTest, AnEmptyPgrtAppIsRefusedNamingTheVariable) {
  ::setenv("PGRT_APP", "", 1);
  try {
    (void)PoolConfig::from_env();
    ADD_FAILURE() << "accepted PGRT_APP=''";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), client_errc::invalid_config);
    EXPECT_THAT(error.what(), HasSubstr("PGRT_APP")) << error.what();
  }
}

// PGRT_BUDGET_CHECK_MS takes 0 or at least 100 (budget.md); 1-99 is malformed, and refused naming
// the variable, as docs/pool.md promises for a malformed value.
TEST_F(EnvironmentTest, ABudgetCheckIntervalBelowItsFloorIsRefusedNamingTheVariable) {
  ::setenv("PGRT_BUDGET_KEY", "orders-db", 1);
  ::setenv("PGRT_BUDGET_SLOTS", "40", 1);
  ::setenv("PGRT_BUDGET_CHECK_MS", "50", 1);
  try {
    (void)PoolConfig::from_env();
    ADD_FAILURE() << "accepted PGRT_BUDGET_CHECK_MS=50";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), client_errc::invalid_config);
    EXPECT_THAT(error.what(), HasSubstr("PGRT_BUDGET_CHECK_MS")) << error.what();
  }
}

// Budget classes without a budget (PGRT_BUDGET_CLASSES and PGRT_BUDGET_CLASS set, PGRT_BUDGET_KEY
// and PGRT_BUDGET_SLOTS forgotten, or set in another container of the pod) are refused saying that
// the budget is missing (naming PGRT_BUDGET_KEY), not that the classes have too many slots.
TEST_F(EnvironmentTest, BudgetClassesWithoutABudgetAreRefusedSayingTheBudgetIsMissing) {
  ::setenv("PGRT_BUDGET_CLASSES", "api:10,batch:30", 1);
  ::setenv("PGRT_BUDGET_CLASS", "api", 1);
  try {
    (void)PoolConfig::from_env();
    ADD_FAILURE() << "accepted budget classes without a budget";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), client_errc::invalid_config);
    EXPECT_THAT(error.what(), HasSubstr("PGRT_BUDGET_KEY")) << error.what();
  }
}

// DATABASE_URL= (set but empty: a deployment template whose secret was not filled in) is refused
// naming DATABASE_URL, not taken as unset: libpq would fall back to the PG* variables and the
// local socket, and the start would wait as for a server that is down.
TEST_F(EnvironmentTest, AnEmptyDatabaseUrlIsRefusedNamingTheVariable) {
  ::setenv("DATABASE_URL", "", 1);
  try {
    const auto config = PoolConfig::from_env();
    ADD_FAILURE() << "accepted DATABASE_URL='' as the conninfo '" << config.conninfo << "'";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), client_errc::invalid_config);
    EXPECT_THAT(error.what(), HasSubstr("DATABASE_URL")) << error.what();
    EXPECT_THAT(error.what(), HasSubstr("set but empty")) << error.what();
    EXPECT_THAT(error.diagnostics().hint, HasSubstr("unset it")) << error.diagnostics().hint;
  }
  ::unsetenv("DATABASE_URL");
  EXPECT_EQ(PoolConfig::from_env().conninfo, "") << "unset: libpq's PG* variables";
}

// DATABASE_URL of blanks only (a template's " ", a secret file's "\n" or "\r\n") is as empty to
// libpq, which falls back to the PG* variables and the local socket just the same: refused too.
TEST_F(EnvironmentTest, ADatabaseUrlOfBlanksOnlyIsRefusedAsAnEmptyOne) {
  for (const char* blank : {" ", "\n", "\r\n", " \t "}) {
    ::setenv("DATABASE_URL", blank, 1);
    try {
      const auto config = PoolConfig::from_env();
      ADD_FAILURE() << "accepted DATABASE_URL of blanks as the conninfo '" << config.conninfo
                    << "'";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::invalid_config);
      EXPECT_THAT(error.what(), HasSubstr("DATABASE_URL")) << error.what();
    }
  }
  ::unsetenv("DATABASE_URL");
}

// A stray space or a control character in PGRT_BUDGET_KEY (a template's "orders-db ", a CRLF
// file's "orders-db\r") would silently make another budget, shared with nobody: refused naming
// the variable. So is such a key given in code (budget.key).
TEST_F(EnvironmentTest, ABudgetKeyWithStraySpacesOrControlCharactersIsRefused) {
  ::setenv("PGRT_BUDGET_SLOTS", "40", 1);
  for (const char* key : {"orders-db ", " orders-db", "orders-db\r", "orders-db\n", "orders\tdb",
                          "\x1b[2Jorders", "orders\x7f"}) {
    ::setenv("PGRT_BUDGET_KEY", key, 1);
    try {
      (void)PoolConfig::from_env();
      ADD_FAILURE() << "accepted PGRT_BUDGET_KEY='" << key << "'";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), client_errc::invalid_config);
      EXPECT_THAT(error.what(), HasSubstr("PGRT_BUDGET_KEY")) << error.what();
    }
    PoolConfig config;
    config.budget = {.key = key, .slots = 40};
    EXPECT_THROW(config.validate(), Error) << "budget.key '" << key << "'";
  }
  ::setenv("PGRT_BUDGET_KEY", "orders db/eu-1", 1);  // (inner spaces are the user's to choose)
  EXPECT_EQ(PoolConfig::from_env().budget.key, "orders db/eu-1");
}

TEST_F(EnvironmentTest, FromEnvLeavesTheIdleTimeoutWarningToThePool) {
  LogCapture log;
  ::setenv("PGRT_MAX_LIFETIME_S", "300", 1);
  const auto config = PoolConfig::from_env();
  EXPECT_EQ(config.max_lifetime, std::chrono::minutes(5));
  EXPECT_EQ(log.text(), "") << "configure(PoolConfig::from_env()) warns once, in the Pool";
  config.validate();
  EXPECT_THAT(log.text(), HasSubstr("idle_timeout"));
}

// A whole conninfo pasted where a name belongs (a connection URL in any case or behind another
// prefix: an upper-case POSTGRESQL://, a JDBC URL; a password's parameter; a key=value string;
// credentials in the host) is never shown, whether
// the rest of the conninfo parses or not: libpq would send it to the server as the name, so every
// error that names the database, the user or the host would carry its password. mask_password()
// and the refusal of a malformed conninfo hide it as they hide password=.
TEST(PoolConfigTest, AConninfoPastedAsANameNeverShowsItsPassword) {
  const std::vector<std::string> pasted_names = {
      "dbname=postgresql://app:hunter2@db/app",
      "dbname=jdbc:postgresql://db/app?user=app&password=hunter2",
      "dbname=POSTGRESQL://app:hunter2@db/app",
      "user=Postgres://app:hunter2@db/app",
      "dbname='user=x password=hunter2'",
      "dbname=app?password=hunter2",
      "host=postgresql://app:hunter2@db",
      "host=app:hunter2@db",
      "hostaddr=postgresql://app:hunter2@db",
      "service=postgresql://app:hunter2@db/app",
      "user=app:hunter2@db",
  };
  for (const std::string& name : pasted_names) {
    const std::string parsable = "port=5432 " + name;
    EXPECT_THAT(mask_password(parsable), Not(HasSubstr("hunter2"))) << parsable;
    // The same with a keyword libpq refuses after it: the conninfo cannot be parsed.
    const std::string unparsable = parsable + " Port=5";
    EXPECT_THAT(mask_password(unparsable), Not(HasSubstr("hunter2"))) << unparsable;
    PoolConfig config;
    config.conninfo = unparsable;
    const std::string refused = rejection(config);
    EXPECT_THAT(refused, HasSubstr("\"Port\" is not a keyword")) << unparsable;
    EXPECT_THAT(refused, Not(HasSubstr("hunter2"))) << refused;
  }
  // A plain name is still shown: the message says which database and user are meant. (So is a
  // name with another "://" in it, which a database or role may have: "tenant://eu-1".)
  EXPECT_THAT(mask_password("dbname='tenant://eu-1' user=password_reset port=5432 Port=5"),
              HasSubstr("dbname=tenant://eu-1 user=password_reset"));
  EXPECT_THAT(mask_password("user=app:eu service=orders hostaddr=10.0.0.7 port=5432"),
              HasSubstr("user=app:eu"));
  EXPECT_THAT(mask_password("user=app:eu service=orders hostaddr=10.0.0.7 port=5432"),
              HasSubstr("service=orders"));
  EXPECT_THAT(mask_password("dbname=orders user=app host=db.internal port=5432 Port=5"),
              HasSubstr("dbname=orders user=app host=db.internal port=5432"));
  for (const char* shown : {"dbname=orders", "user=app", "host=db.internal"}) {
    EXPECT_THAT(mask_password("dbname=orders user=app host=db.internal"), HasSubstr(shown));
  }
}

// A connection URL slipped into a form libpq does not read as one (the quotes an env file kept, a
// blank before it, a JDBC or SQLAlchemy URL) was parsed as key=value words and refused with "a
// word without \"=\"", which says nothing of the slip. The refusal names the slip and the URL to
// give instead, never showing the password.
TEST(PoolConfigTest, AConnectionUrlInTheWrongFormIsNamedAsSuch) {
  struct Case {
    std::string conninfo;
    std::string says;
  };
  const std::vector<Case> cases = {
      {R"("postgresql://app:hunter2@db/app")", "a connection URL in quotes"},
      {"'postgres://app:hunter2@db/app'", "a connection URL in quotes"},
      {" postgresql://app:hunter2@db/app", "a connection URL with a blank before it"},
      {"\tpostgresql://app:hunter2@db/app", "a connection URL with a blank before it"},
      {"jdbc:postgresql://db:5432/app?user=app&password=hunter2", "a JDBC URL"},
      {"postgresql+psycopg2://app:hunter2@db/app", "a SQLAlchemy URL"},
  };
  for (const auto& [conninfo, says] : cases) {
    PoolConfig config;
    config.conninfo = conninfo;
    const std::string error = rejection(config);
    EXPECT_THAT(error, HasSubstr(says)) << conninfo;
    EXPECT_THAT(error, HasSubstr("postgresql://user:password@host:port/dbname")) << conninfo;
    EXPECT_THAT(error, Not(HasSubstr("hunter2"))) << conninfo;
    EXPECT_THAT(error, Not(HasSubstr("a word without"))) << conninfo;
  }
}

// A conninfo libpq cannot parse is refused at configuration time, and no error text ever shows a
// value that might be a password: not under a misspelled keyword, not a word split off by a space.
TEST(PoolConfigTest, AMalformedConninfoIsRefusedWithoutShowingAnySecret) {
  struct Case {
    std::string conninfo;
    std::string says;
  };
  const std::vector<Case> cases = {
      {"host=db.internal PASSWORD=hunter2",
       R"("PASSWORD" is not a keyword (keywords are lower case: "password"))"},
      {"host=db.internal passwd=hunter2",
       R"("passwd" is not a keyword (the password's is "password"))"},
      {"host=db.internal pass=hunter2 port=5432", R"("pass" is not a keyword)"},
      {"host=db.internal password=hunter2 more", "a word without \"=\""},
      {"host=db.internal password='hunter2", "a quoted value is not closed"},
      {"host=db.internal hunter2", "a word without \"=\""},
      {"host=db.internal h%u=hunter2", "a keyword that libpq does not know"},
      {"host='db.internal password=hunter2", "a quoted value is not closed"},
      {"password=hunter2 more=hunter2 host=db.internal", "a keyword that libpq does not know"},
      {"postgresql://app:hunter2@db.internal:5432/x?sslmode=require&bogus=hunter2",
       "the connection URL could not be parsed"},
      // Reserved characters left in a password: libpq would read part of it as the host, the
      // port or the database name, and a connect error would show that part.
      {"postgresql://app:hunter2@more@127.0.0.1/postgres", "percent-encode"},
      {"postgresql://app:hunter2/more@127.0.0.1/postgres", "percent-encode"},
      {"postgresql://app:hunter2/more@127.0.0.1:5432/postgres?sslmode=disable", "percent-encode"},
      {"postgresql://app:hunter2/more", "percent-encode"},
      {"postgresql://db.internal:5432?user=app@more&password=hunter2&sslmode=require",
       "percent-encode"},
      {"postgresql://app:hunter2@more@[::1]:5432/postgres", "percent-encode"},
  };
  for (const auto& [conninfo, says] : cases) {
    PoolConfig config;
    config.conninfo = conninfo;
    const std::string error = rejection(config);
    EXPECT_THAT(error, HasSubstr(says)) << conninfo;
    EXPECT_THAT(error, Not(HasSubstr("hunter2"))) << conninfo;
    EXPECT_THAT(error, Not(HasSubstr("more"))) << conninfo;
    EXPECT_THAT(mask_password(conninfo), Not(HasSubstr("hunter2"))) << conninfo;
  }
  // Known, non-secret keywords keep their values: the message says which server is meant.
  PoolConfig config;
  config.conninfo = "host=db.internal port=5433 PASSWORD=hunter2";
  EXPECT_THAT(rejection(config), HasSubstr("host=db.internal port=5433 PASSWORD=****"));
  config.conninfo = "host=db.internal password=hunter2";
  EXPECT_EQ(rejection(config), "");
  // Percent-encoded, they are fine (and an '@' in a query parameter is a value's).
  for (const char* fine :
       {"postgresql://app:p%40ss%2Fw%3Ard@127.0.0.1:5432/my%40db",
        "postgresql://127.0.0.1/postgres?user=app@tenant&password=hunter2",
        "postgresql://app:p?ss@127.0.0.1/postgres", "postgresql://app:pw@db?application_name=a@b",
        "postgresql://db?sslrootcert=/etc/a@b", "postgresql://?host=/tmp&user=a@b",
        "postgresql://app:pw@[::1]:5432,db2:5433/postgres",
        "postgresql://app@%2Fvar%2Frun%2Fpostgresql/postgres"}) {
    config.conninfo = fine;
    EXPECT_EQ(rejection(config), "") << fine;
  }
  EXPECT_THAT(mask_password("host=db sslpassword=hunter2"), Not(HasSubstr("hunter2")));
  // A keyword only a later libpq knows is named as such, in both forms (its value never shown).
  if (PQlibVersion() < 160000) {
    for (const char* newer :
         {"host=db.internal require_auth=scram-sha-256 password=hunter2",
          "postgresql://app:hunter2@db.internal/x?require_auth=scram-sha-256"}) {
      config.conninfo = newer;
      const std::string error = rejection(config);
      EXPECT_THAT(error, HasSubstr("\"require_auth\" is a keyword of libpq 16 and later")) << newer;
      EXPECT_THAT(error, Not(HasSubstr("hunter2"))) << newer;
      EXPECT_THAT(error, Not(HasSubstr("percent-encode"))) << newer;
    }
  }
  // load_balance_hosts is pgrt's to apply (connect()), whatever its libpq's version: taken in both
  // forms, with disable or random only, and kept in a masked conninfo.
  for (const char* balanced :
       {"host=a.internal,b.internal load_balance_hosts=random password=hunter2",
        "host=a.internal,b.internal load_balance_hosts = 'disable' password=hunter2",
        "postgresql://app:hunter2@a.internal,b.internal/x?load_balance_hosts=random",
        "postgresql://app:hunter2@a.internal,b.internal/"
        "x?sslmode=disable&load_balance_hosts=random"}) {
    config.conninfo = balanced;
    EXPECT_EQ(rejection(config), "") << balanced;
    EXPECT_THAT(mask_password(balanced), HasSubstr("load_balance_hosts=")) << balanced;
    EXPECT_THAT(mask_password(balanced), Not(HasSubstr("hunter2"))) << balanced;
  }
  // A '?' in a URL's password is the password's (libpq ends the credentials at '@' or '/'): the
  // query starts after the hosts. Taken for the query's start, the keyword was left for libpq 15,
  // which refused it as a keyword of libpq 16.
  config.conninfo = "postgresql://app:hun?ter2@a.internal,b.internal/x?load_balance_hosts=random";
  EXPECT_EQ(rejection(config), "");
  EXPECT_THAT(mask_password(config.conninfo), Not(HasSubstr("ter2")));
  for (const char* wrong : {"host=a.internal,b.internal load_balance_hosts=sometimes password=x",
                            "postgresql://a.internal,b.internal/x?load_balance_hosts=Random"}) {
    config.conninfo = wrong;
    const std::string error = rejection(config);
    EXPECT_THAT(error, HasSubstr("load_balance_hosts")) << wrong;
    EXPECT_THAT(error, HasSubstr("disable (the default) or random")) << wrong;
  }
  // The error is a configuration error for the lifecycle manager too (exit code 78).
  EXPECT_TRUE(make_error_code(client_errc::invalid_config) ==
              boost::system::errc::invalid_argument);
}

TEST(PoolStatsTest, JsonHasEveryFieldAndEscapesTheMessage) {
  PoolStats stats;
  stats.max = 3;
  stats.in_use = 2;
  stats.closing = 1;
  stats.wait_p99 = std::chrono::microseconds(1500);
  stats.last_connect_error = "FATAL: \"x\"\nnext";
  stats.consecutive_connect_failures = 4;
  stats.connect_backoff = std::chrono::milliseconds(800);
  stats.consumers = {
      {.name = "", .in_use = 0, .max = 3},
      {.name = "scraper", .in_use = 2, .waiting = 5, .min = 1, .max = 2, .share = 2}};
  const std::string json = stats.to_json();
  EXPECT_THAT(json, HasSubstr("\"consumers\":[{\"name\":\"\",\"in_use\":0,"));
  EXPECT_THAT(json, HasSubstr("{\"name\":\"scraper\",\"in_use\":2,\"waiting\":5,\"min\":1,"
                              "\"max\":2,\"share\":2}]"));
  EXPECT_THAT(json, HasSubstr("\"consecutive_connect_failures\":4"));
  EXPECT_THAT(json, HasSubstr("\"connect_backoff_ms\":800"));
  EXPECT_THAT(json, HasSubstr("\"max\":3"));
  EXPECT_THAT(json, HasSubstr("\"in_use\":2"));
  EXPECT_THAT(json, HasSubstr("\"closing\":1"));
  EXPECT_THAT(json, HasSubstr("\"wait_p99_us\":1500"));
  EXPECT_THAT(json, HasSubstr("\"last_connect_error\":\"FATAL: \\\"x\\\" next\""));
  EXPECT_EQ(json.front(), '{');
  EXPECT_EQ(json.back(), '}');
}

// to_json() is the snapshot "as one JSON object": every stat of PoolStats is in it (the wait that
// is going on now, the leases past the leak threshold, min_idle, the discards by reason, the four
// histograms and the last connect error's code, which budget.md names, were left out), and it
// parses as JSON whatever bytes the last connect error holds (a server's message in LATIN1 is not
// UTF-8).
TEST(PoolStatsTest, JsonHoldsEveryStatAndParsesWhateverTheMessageHolds) {
  PoolStats stats;
  stats.longest_wait = std::chrono::microseconds(2500);
  stats.leases_past_leak_threshold = 2;
  stats.min_idle = 1;
  stats.discarded_by_reason[static_cast<std::size_t>(DiscardReason::rejected)] = 3;
  stats.wait_time.record(std::chrono::microseconds(300));
  stats.use_time.record(std::chrono::milliseconds(20));
  stats.create_time.record(std::chrono::milliseconds(4));
  stats.operation_time.record(std::chrono::seconds(11));
  stats.last_connect_error =
      "FATAL:  Passwort-Authentifizierung f\xfcr Benutzer \xc2\xbb"
      "app\xc2\xab fehlgeschlagen";  // LATIN1 'ü', then UTF-8 quotes
  stats.last_connect_error_code = make_error_code(client_errc::connect_failed);
  const std::string json = stats.to_json();
  boost::system::error_code error;
  const boost::json::value parsed = boost::json::parse(json, error);
  ASSERT_FALSE(error) << error.message() << ": " << json;
  ASSERT_TRUE(parsed.is_object()) << json;
  const boost::json::object& object = parsed.as_object();
  for (const char* key : {"max",
                          "size",
                          "idle",
                          "in_use",
                          "connecting",
                          "closing",
                          "resetting",
                          "pinging",
                          "shared_queued",
                          "shared_in_flight",
                          "shared_connections",
                          "waiting_normal",
                          "waiting_high",
                          "acquired",
                          "timeouts",
                          "cancellations",
                          "connect_attempts",
                          "connect_errors",
                          "discarded",
                          "leaks_suspected",
                          "wait_p50_us",
                          "wait_p99_us",
                          "wait_max_us",
                          "longest_wait_us",
                          "leases_past_leak_threshold",
                          "min_idle",
                          "discarded_by_reason",
                          "wait_time",
                          "use_time",
                          "create_time",
                          "operation_time",
                          "consecutive_connect_failures",
                          "connect_backoff_ms",
                          "last_connect_error",
                          "last_connect_error_code",
                          "budget_probes",
                          "budget_probes_without_slot",
                          "budget_slot_waits",
                          "consumers"}) {
    EXPECT_TRUE(object.contains(key)) << key << " is missing from " << json;
  }
  if (!object.contains("discarded_by_reason") || !object.contains("operation_time") ||
      !object.contains("last_connect_error_code")) {
    return;
  }
  EXPECT_EQ(object.at("longest_wait_us").as_int64(), 2500);
  EXPECT_EQ(object.at("leases_past_leak_threshold").as_int64(), 2);
  EXPECT_EQ(object.at("min_idle").as_int64(), 1);
  const auto& by_reason = object.at("discarded_by_reason").as_object();
  EXPECT_EQ(by_reason.size(), discard_reason_count);
  EXPECT_EQ(by_reason.at("rejected").as_int64(), 3);
  EXPECT_EQ(by_reason.at("broken").as_int64(), 0);
  EXPECT_EQ(object.at("wait_time").at("count").as_int64(), 1);
  EXPECT_EQ(object.at("wait_time").at("sum_ns").as_int64(), 300'000);
  const auto& counts = object.at("operation_time").at("counts").as_array();
  ASSERT_EQ(counts.size(), DurationHistogram{}.counts.size());
  EXPECT_EQ(counts.back().as_int64(), 1) << "11 s is above the last bound";
  EXPECT_EQ(object.at("last_connect_error_code").at("category").as_string(), "pgrt.client");
  EXPECT_EQ(object.at("last_connect_error_code").at("message").as_string(),
            "could not connect to the server");
  EXPECT_EQ(object.at("last_connect_error").as_string(),
            "FATAL:  Passwort-Authentifizierung f\xef\xbf\xbdr Benutzer \xc2\xbb"
            "app\xc2\xab fehlgeschlagen");
  EXPECT_TRUE(boost::json::parse(PoolStats{}.to_json()).at("last_connect_error_code").is_null());
}

// pgrt::query() on one thread while another closes the process-wide pool (whose Pool object goes
// with the close): the call either makes its statement or says the pool is not configured, and
// never reads the Pool object after it was destroyed (TSan and ASan in CI; before, query() took a
// Pool& and used it after the global lock was released).
TEST(ProcessPoolTest, QueryRacingACloseOnAnotherThreadNeverUsesTheDestroyedPool) {
  PoolConfig config;
  config.conninfo = "host=/nonexistent dbname=x";  // no executor yet: nothing connects
  int made = 0;
  int not_configured = 0;
  for (int round = 0; round < 300; ++round) {
    configure(config);
    std::atomic<bool> go{false};
    std::thread caller([&] {
      while (!go) std::this_thread::yield();
      for (int i = 0; i < 20; ++i) {
        try {
          auto statement = query("SELECT 1");  // (not awaited: no I/O)
          ++made;
        } catch (const Error& error) {
          EXPECT_EQ(error.code(), client_errc::pool_not_configured);
          ++not_configured;
        }
      }
    });
    go = true;
    { auto closing = pool().close(milliseconds(0)); }  // the Pool object is destroyed here
    caller.join();
  }
  EXPECT_EQ(made + not_configured, 300 * 20);
}

}  // namespace
}  // namespace pgrt
