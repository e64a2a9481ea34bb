// The connection budget (PoolConfig::budget) against a real server: pools that share a budget
// never hold more slots than it has, a full budget fails waiters with budget_exhausted, the reset
// policies keep the slot, and a budget behind a transaction pooler is refused.
#include <atomic>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstdint>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <string>
#include <thread>

#include <pgrt/db.hpp>

#include "pgrt/testing/blocking_sql.hpp"
#include "pgrt/testing/db_test.hpp"
#include "pgrt/testing/expect_error.hpp"
#include "pgrt/testing/run_coroutine.hpp"

namespace pgrt {
namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using testing::BlockingConnection;
using ::testing::HasSubstr;
using testing::run_coroutine;
using awaitable_void = asio::awaitable<void>;

using testing::sleep_for;

// The backends holding a slot of `key`, as the server shows them.
std::string slot_holders_sql(const std::string& key) {
  return "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
         "AND classid = (" +
         std::to_string(budget_lock_key(key)) + "::int8 & 4294967295)::oid";
}

class BudgetTest : public testing::DbTest {
 protected:
  static PoolConfig config(const std::string& instance, const std::string& key, std::size_t slots,
                           std::size_t max_size = 3) {
    PoolConfig pool_config;
    pool_config.conninfo = cluster().dsn();
    pool_config.max_size = max_size;
    pool_config.application = "budget-test";
    pool_config.instance = instance;
    pool_config.budget = {.key = key, .slots = slots};
    pool_config.connect_backoff_max = 200ms;
    pool_config.max_waiters = 1000;
    return pool_config;
  }
};

// Two pools of max 3 share a budget of 3 under load: sampled every 10 ms, the server never shows
// more than 3 slots held, nor more than 3 + 1 tagged backends (one connect per process may be
// looking for a slot); both pools make progress.
TEST_F(BudgetTest, TwoPoolsShareABudgetAndNeverHoldMoreThanItsSlots) {
  std::atomic<bool> stop{false};
  std::atomic<int> most_slots{0};
  std::atomic<int> most_tagged{0};
  std::atomic<int> samples{0};
  std::thread sampler([&] {
    BlockingConnection observer(cluster().dsn());
    const std::string slots_sql = slot_holders_sql("shared");
    while (!stop) {
      most_slots = std::max(most_slots.load(), std::stoi(observer.scalar(slots_sql)));
      most_tagged =
          std::max(most_tagged.load(),
                   std::stoi(observer.scalar("SELECT count(*) FROM pg_stat_activity WHERE "
                                             "application_name LIKE 'budget-test/shared-%'")));
      ++samples;
      std::this_thread::sleep_for(10ms);
    }
  });
  std::uint64_t served[2] = {0, 0};
  PoolStats stats[2];
  run_coroutine(
      [&]() -> awaitable_void {
        auto executor = co_await asio::this_coro::executor;
        auto first_config = config("shared-a", "shared", 3);
        auto second_config = config("shared-b", "shared", 3);
        Pool pools[2] = {Pool(executor, first_config), Pool(executor, second_config)};
        const auto until = std::chrono::steady_clock::now() + 3s;
        int finished = 0;
        for (int task = 0; task < 100; ++task) {
          asio::co_spawn(
              executor,
              [&, task]() -> awaitable_void {
                const int which = task % 2;
                while (std::chrono::steady_clock::now() < until) {
                  try {
                    auto lease = co_await pools[which].acquire();
                    co_await lease->query("SELECT pg_sleep(0.002)");
                    ++served[which];
                  } catch (const Error& error) {
                    EXPECT_EQ(error.code(), client_errc::budget_exhausted) << error.what();
                  }
                }
                ++finished;
              },
              [](std::exception_ptr error) {
                if (error) std::rethrow_exception(error);
              });
        }
        while (finished < 100) co_await sleep_for(20ms);
        stats[0] = pools[0].stats();
        stats[1] = pools[1].stats();
        for (auto& pool : pools) (void)co_await pool.close(1s);
      },
      60s);
  stop = true;
  sampler.join();
  EXPECT_GT(samples, 100);
  EXPECT_LE(most_slots, 3) << "more slots held than the budget has";
  EXPECT_EQ(most_slots, 3) << "the load should have used the whole budget";
  EXPECT_LE(most_tagged, 3 + 1) << "more backends than the budget and one probe";
  EXPECT_GT(served[0], 50U);
  EXPECT_GT(served[1], 50U);
  EXPECT_GT(stats[0].budget_probes + stats[1].budget_probes, 3U);
  EXPECT_GT(stats[0].budget_probes_without_slot + stats[1].budget_probes_without_slot, 0U)
      << "6 connections wanted, 3 slots: some connects must have found the budget full";
}

TEST_F(BudgetTest, AFullBudgetFailsWaitersWithBudgetExhaustedNamingIt) {
  run_coroutine([&]() -> awaitable_void {
    auto executor = co_await asio::this_coro::executor;
    Pool holder(executor, config("full-a", "full", 1));
    auto lease = co_await holder.acquire();
    auto waiting_config = config("full-b", "full", 1);
    waiting_config.acquire_timeout = 700ms;
    Pool waiting(executor, waiting_config);
    auto error = co_await testing::expect_error(waiting.acquire());
    EXPECT_EQ(error.code(), client_errc::budget_exhausted) << error.what();
    EXPECT_TRUE(error.code() == condition::too_many_connections);
    EXPECT_THAT(error.what(), HasSubstr("budget 'full' is full: all 1 slots are held (1 holders"));
    EXPECT_THAT(error.diagnostics().hint, HasSubstr("PGRT_BUDGET_KEY"));
    EXPECT_GE(waiting.stats().budget_probes_without_slot, 1U);
    const PoolStats stats = waiting.stats();  // (a retry may be connecting meanwhile)
    EXPECT_EQ(stats.idle + stats.in_use, 0U) << "a connection without a slot must be closed";
    // The holder gives its slot back: a new pool gets it (the waiting one closed first, so that a
    // retry of its own does not take it).
    (void)co_await waiting.close(1s);
    lease.release();
    (void)co_await holder.close(1s);
    waiting_config.acquire_timeout = 5s;
    Pool again(executor, waiting_config);
    auto got = co_await again.acquire();
    EXPECT_EQ((co_await got->query("SELECT 1")).scalar<int>(), 1);
    got.release();
    (void)co_await again.close(1s);
  });
}

// DISCARD ALL releases advisory locks: under a budget the discard_all reset leaves them alone.
TEST_F(BudgetTest, BothResetPoliciesKeepTheSlotAcrossAThousandLeases) {
  for (const ResetPolicy policy : {ResetPolicy::rollback, ResetPolicy::discard_all}) {
    const std::string key = std::string("reset-") + std::string(to_string(policy));
    auto pool_config = config(key, key, 1, 1);
    pool_config.reset = policy;
    int first_pid = 0;
    int last_pid = 0;
    PoolStats end{};
    run_coroutine([&]() -> awaitable_void {
      Pool pool(co_await asio::this_coro::executor, pool_config);
      for (int i = 0; i < 1000; ++i) {
        auto lease = co_await pool.acquire();
        co_await lease->query_prepared("SELECT $1::int", i);
        co_await lease->execute("SET work_mem = '8MB'");  // session state for the reset to clear
        last_pid = lease->backend_pid();
        if (i == 0) first_pid = last_pid;
      }
      {  // the user's own advisory lock: released by discard_all (as DISCARD ALL would)
        auto holder = co_await pool.acquire();
        co_await holder->execute("SELECT pg_advisory_lock(4242)");
      }
      auto lease = co_await pool.acquire();  // (after the reset: the pool has one connection)
      {
        BlockingConnection other(cluster().dsn());
        EXPECT_EQ(other.scalar("SELECT pg_try_advisory_lock(4242)"),
                  policy == ResetPolicy::discard_all ? "t" : "f")
            << to_string(policy);
      }
      EXPECT_EQ((co_await lease->query("SHOW work_mem")).scalar<std::string>() == "8MB",
                policy == ResetPolicy::rollback)
          << "discard_all should have reset the session's settings";
      last_pid = lease->backend_pid();
      lease.release();
      end = pool.stats();
      BlockingConnection observer(cluster().dsn());
      EXPECT_EQ(observer.scalar(slot_holders_sql(key) + " AND pid = " + std::to_string(last_pid)),
                "1")
          << to_string(policy) << ": the connection lost its slot";
      (void)co_await pool.close(1s);
    });
    EXPECT_EQ(first_pid, last_pid) << to_string(policy) << ": the connection was replaced";
    EXPECT_EQ(end.budget_probes, 1U) << to_string(policy);
  }
}

TEST_F(BudgetTest, ABudgetIsRefusedBehindATransactionPoolerAndWhenHalfSet) {
  auto pool_config = config("refused", "refused", 3);
  pool_config.connect.pooler = Pooler::transaction;
  try {
    pool_config.validate();
    ADD_FAILURE() << "a budget was accepted behind a transaction pooler";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), client_errc::invalid_config);
    EXPECT_THAT(error.what(), HasSubstr("advisory lock"));
  }
  pool_config.connect.pooler = Pooler::none;
  pool_config.budget.slots = 0;
  EXPECT_THROW(pool_config.validate(), Error);
  pool_config.budget = {.key = "", .slots = 4};
  EXPECT_THROW(pool_config.validate(), Error);
}

}  // namespace
}  // namespace pgrt
