#include <cstdlib>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <pgrt/db/pool.hpp>

namespace pgrt {
namespace {

using ::testing::HasSubstr;

class EnvironmentTest : public ::testing::Test {
 protected:
  void TearDown() override {
    for (const char* name :
         {"DATABASE_URL", "PGRT_POOL_MAX", "PGRT_POOL_MIN_IDLE", "PGRT_ACQUIRE_TIMEOUT_MS",
          "PGRT_MAX_LIFETIME_S", "PGRT_IDLE_TIMEOUT_S", "PGRT_LEAK_THRESHOLD_MS",
          "PGRT_POOL_PRESET", "PGRT_POOL_RESET", "PGRT_APP", "PGRT_INSTANCE"}) {
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

TEST(PoolConfigTest, PresetsAndValidation) {
  EXPECT_EQ(PoolConfig::micro().max_size, 3U);
  EXPECT_EQ(PoolConfig::small().max_size, 10U);
  PoolConfig reserved_all = PoolConfig::micro();
  reserved_all.reserved_for_priority = 3;
  EXPECT_THROW(reserved_all.validate(), Error);
  EXPECT_NO_THROW(PoolConfig::micro().validate());
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
  const std::string json = stats.to_json();
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

}  // namespace
}  // namespace pgrt
