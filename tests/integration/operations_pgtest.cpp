// Operations (issue 16): the watchdog driven past each threshold against a real pool and server,
// the metrics parsed by a real Prometheus parser, and the HTTP endpoint under hostile clients.
#include <algorithm>
#include <arpa/inet.h>
#include <atomic>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <map>
#include <mutex>
#include <netinet/in.h>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

#include <pgrt/db.hpp>
#include <pgrt/service.hpp>

#include "pgrt/testing/blocking_sql.hpp"
#include "pgrt/testing/db_test.hpp"
#include "pgrt/testing/eventually.hpp"
#include "pgrt/testing/run_coroutine.hpp"

namespace pgrt {
namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using testing::eventually;
using ::testing::HasSubstr;
using testing::sleep_for;

// An io_context run by `threads` threads of its own for the life of the object.
class Running {
 public:
  explicit Running(std::size_t threads = 1) : guard_(io.get_executor()) {
    for (std::size_t i = 0; i < threads; ++i) threads_.emplace_back([this] { io.run(); });
  }
  ~Running() { stop(); }
  Running(const Running&) = delete;
  Running& operator=(const Running&) = delete;
  Running(Running&&) = delete;
  Running& operator=(Running&&) = delete;

  // Runs `operation` on the io_context and waits for it (at most `limit`).
  template <typename T>
  T wait(asio::awaitable<T> operation, std::chrono::seconds limit = 30s) {
    auto future = asio::co_spawn(io, std::move(operation), asio::use_future);
    if (future.wait_for(limit) != std::future_status::ready) {
      throw std::runtime_error("the operation did not finish in time");
    }
    return future.get();
  }
  void stop() {
    guard_.reset();
    io.stop();
    for (auto& thread : threads_) {
      if (thread.joinable()) thread.join();
    }
  }

  asio::io_context io;

 private:
  asio::executor_work_guard<asio::io_context::executor_type> guard_;
  std::vector<std::thread> threads_;
};

// Every change the watchdog reported, in order.
class ChangeLog {
 public:
  explicit ChangeLog(Watchdog& watchdog)
      : connection_(watchdog.events().changed.connect([this](const WatchdogChange& change) {
          std::lock_guard lock(mutex_);
          changes_.push_back(change);
        })) {}
  std::vector<WatchdogChange> of(WatchdogCondition condition) const {
    std::lock_guard lock(mutex_);
    std::vector<WatchdogChange> found;
    for (const auto& change : changes_) {
      if (change.condition == condition) found.push_back(change);
    }
    return found;
  }
  std::size_t total() const {
    std::lock_guard lock(mutex_);
    return changes_.size();
  }

 private:
  mutable std::mutex mutex_;
  std::vector<WatchdogChange> changes_;
  boost::signals2::scoped_connection connection_;
};

class WatchdogTest : public testing::DbTest {
 protected:
  static PoolConfig config(std::string instance, std::size_t max_size) {
    PoolConfig pool_config;
    pool_config.conninfo = cluster().dsn();
    pool_config.max_size = max_size;
    pool_config.application = "pgrt-watchdog-test";
    pool_config.instance = std::move(instance);
    return pool_config;
  }
  static WatchdogOptions fast(bool check_server = false) {
    return {.interval = 50ms, .long_wait = 150ms, .check_server = check_server};
  }
  // Waits until `condition` has started and cleared once, then for a few more checks, and
  // expects exactly those two changes: one warning, one clear.
  static void expect_one_warning_and_one_clear(const ChangeLog& log, Watchdog& watchdog,
                                               WatchdogCondition condition) {
    const auto checks = watchdog.checks();
    ASSERT_TRUE(eventually([&] { return watchdog.checks() >= checks + 4; }));
    const auto changes = log.of(condition);
    ASSERT_EQ(changes.size(), 2U) << "condition " << to_string(condition);
    EXPECT_TRUE(changes[0].holds);
    EXPECT_FALSE(changes[1].holds);
    EXPECT_EQ(watchdog.warnings()[static_cast<std::size_t>(condition)], 1U);
    EXPECT_FALSE(watchdog.conditions()[static_cast<std::size_t>(condition)]);
  }
};

TEST_F(WatchdogTest, PoolBusyWarnsOnceAndClearsOnce) {
  Running running;
  Pool pool(running.io.get_executor(), config("busy", 2));
  Watchdog watchdog(running.io.get_executor(), pool, fast());
  ChangeLog log(watchdog);
  running.wait(watchdog.start());
  {
    auto first = running.wait(pool.acquire());
    auto second = running.wait(pool.acquire());
    // Held across many checks: still one warning.
    ASSERT_TRUE(eventually([&] { return watchdog.conditions()[0]; }));
    const auto checks = watchdog.checks();
    ASSERT_TRUE(eventually([&] { return watchdog.checks() >= checks + 5; }));
    ASSERT_EQ(log.of(WatchdogCondition::pool_busy).size(), 1U);
    EXPECT_THAT(log.of(WatchdogCondition::pool_busy)[0].detail, HasSubstr("2 of max 2"));
  }
  ASSERT_TRUE(eventually([&] { return !watchdog.conditions()[0]; }));
  expect_one_warning_and_one_clear(log, watchdog, WatchdogCondition::pool_busy);
  running.wait(watchdog.stop());
  running.wait(pool.close(1s));
}

// A subscriber of `changed` that throws hides no change from the subscribers connected after it,
// and the watchdog goes on checking. (With a plain signal the throw skipped every subscriber
// after it: the log below saw nothing.)
TEST_F(WatchdogTest, ASubscriberThatThrowsHidesNoChangeFromTheOthers) {
  Running running;
  Pool pool(running.io.get_executor(), config("thrown-at", 1));
  Watchdog watchdog(running.io.get_executor(), pool, fast());
  const boost::signals2::scoped_connection throwing = watchdog.events().changed.connect(
      [](const WatchdogChange&) { throw std::runtime_error("subscriber"); });
  ChangeLog log(watchdog);  // connected after the throwing subscriber
  running.wait(watchdog.start());
  {
    auto only = running.wait(pool.acquire());
    ASSERT_TRUE(eventually([&] { return watchdog.conditions()[0]; }));
  }
  ASSERT_TRUE(eventually([&] { return !watchdog.conditions()[0]; }));
  expect_one_warning_and_one_clear(log, watchdog, WatchdogCondition::pool_busy);
  running.wait(watchdog.stop());
  running.wait(pool.close(1s));
}

TEST_F(WatchdogTest, LongWaitsAndTimeoutsWarnOnceAndClearOnce) {
  Running running;
  auto pool_config = config("waits", 1);
  pool_config.acquire_timeout = 400ms;
  Pool pool(running.io.get_executor(), pool_config);
  Watchdog watchdog(running.io.get_executor(), pool, fast());
  ChangeLog log(watchdog);
  running.wait(watchdog.start());
  {
    auto held = running.wait(pool.acquire());
    // A caller waits 400 ms (past long_wait, 150 ms) and times out.
    EXPECT_THROW(running.wait(pool.acquire()), Error);
  }
  ASSERT_TRUE(eventually([&] {
    return log.of(WatchdogCondition::long_waits).size() == 2 &&
           log.of(WatchdogCondition::acquire_timeouts).size() == 2;
  }));
  expect_one_warning_and_one_clear(log, watchdog, WatchdogCondition::long_waits);
  expect_one_warning_and_one_clear(log, watchdog, WatchdogCondition::acquire_timeouts);
  EXPECT_THAT(log.of(WatchdogCondition::acquire_timeouts)[0].detail,
              HasSubstr("1 acquire(s) timed out"));
  running.wait(watchdog.stop());
  running.wait(pool.close(1s));
}

TEST_F(WatchdogTest, SuspectedLeakWarnsOnceAndClearsOnce) {
  Running running;
  auto pool_config = config("leak", 2);
  pool_config.leak_threshold = 100ms;
  Pool pool(running.io.get_executor(), pool_config);
  Watchdog watchdog(running.io.get_executor(), pool, fast());
  ChangeLog log(watchdog);
  running.wait(watchdog.start());
  {
    auto kept = running.wait(pool.acquire());
    ASSERT_TRUE(eventually([&] {
      return watchdog.conditions()[static_cast<std::size_t>(WatchdogCondition::suspected_leaks)];
    }));
    const auto checks = watchdog.checks();
    ASSERT_TRUE(eventually([&] { return watchdog.checks() >= checks + 4; }));
  }
  ASSERT_TRUE(eventually([&] { return log.of(WatchdogCondition::suspected_leaks).size() == 2; }));
  expect_one_warning_and_one_clear(log, watchdog, WatchdogCondition::suspected_leaks);
  running.wait(watchdog.stop());
  running.wait(pool.close(1s));
}

// The pool's role has no pg_read_all_stats (an application's usual role): the crowd of another
// role's backends still counts.
TEST_F(WatchdogTest, ServerBusyWarnsOnceAndClearsOnce) {
  Running running;
  testing::BlockingConnection observer(cluster().dsn());
  observer.query(
      "DO $$BEGIN CREATE ROLE wd_plain LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$");
  auto pool_config = config("server-busy", 2);
  pool_config.conninfo = cluster().dsn() + " user=wd_plain";
  Pool pool(running.io.get_executor(), pool_config);
  // The server's usable connections and its client backends now (this test's own included).
  const double usable =
      std::stod(observer.scalar("SELECT current_setting('max_connections')::int - "
                                "current_setting('superuser_reserved_connections')::int"));
  const double backends = std::stod(observer.scalar(
      "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"));
  // The threshold sits 5 backends above today's count (+1 for the pool's own): 10 more cross it.
  auto options = fast(true);
  options.server_share = (backends + 1 + 5) / usable;
  Watchdog watchdog(running.io.get_executor(), pool, options);
  ChangeLog log(watchdog);
  running.wait(watchdog.start());
  const auto checks = watchdog.checks();
  ASSERT_TRUE(eventually([&] { return watchdog.checks() >= checks + 3; }));
  EXPECT_TRUE(log.of(WatchdogCondition::server_busy).empty());
  {
    std::vector<std::unique_ptr<testing::BlockingConnection>> crowd;
    for (int i = 0; i < 10; ++i) {
      crowd.push_back(std::make_unique<testing::BlockingConnection>(cluster().dsn()));
    }
    ASSERT_TRUE(eventually([&] {
      return watchdog.conditions()[static_cast<std::size_t>(WatchdogCondition::server_busy)];
    }));
    const auto more = watchdog.checks();
    ASSERT_TRUE(eventually([&] { return watchdog.checks() >= more + 4; }));
  }
  ASSERT_TRUE(eventually([&] { return log.of(WatchdogCondition::server_busy).size() == 2; }));
  expect_one_warning_and_one_clear(log, watchdog, WatchdogCondition::server_busy);
  EXPECT_THAT(log.of(WatchdogCondition::server_busy)[0].detail, HasSubstr("client backends"));
  EXPECT_TRUE(log.of(WatchdogCondition::server_unreachable).empty());
  running.wait(watchdog.stop());
  running.wait(pool.close(1s));
}

// The server check's SQL names every function, relation, type and operator schema-qualified: with
// a schema put ahead of pg_catalog in the pool's search_path (here by the conninfo's options)
// holding a pg_stat_activity of its own that shows 100000 client backends, the check counted
// those, and warned that the server was busy.
TEST_F(WatchdogTest, TheServerCheckIgnoresASchemaAheadOfPgCatalogInTheSearchPath) {
  Running running;
  testing::BlockingConnection admin(cluster().dsn());
  admin.query("SET client_min_messages = warning");
  admin.query("DROP SCHEMA IF EXISTS watchdog_hijack CASCADE");
  admin.query("CREATE SCHEMA watchdog_hijack");
  admin.query(
      "CREATE VIEW watchdog_hijack.pg_stat_activity AS SELECT 'client backend'::pg_catalog.text "
      "AS backend_type, NULL::pg_catalog.oid AS datid FROM pg_catalog.generate_series(1, 100000)");
  admin.query("GRANT USAGE ON SCHEMA watchdog_hijack TO PUBLIC");
  auto pool_config = config("hijacked-search-path", 2);
  pool_config.conninfo = cluster().dsn() + " options='-c search_path=watchdog_hijack,pg_catalog'";
  Pool pool(running.io.get_executor(), pool_config);
  auto options = fast(true);
  options.server_share = 0.9;
  Watchdog watchdog(running.io.get_executor(), pool, options);
  ChangeLog log(watchdog);
  running.wait(watchdog.start());
  const auto checks = watchdog.checks();
  EXPECT_TRUE(eventually([&] { return watchdog.checks() >= checks + 4; }));
  EXPECT_TRUE(log.of(WatchdogCondition::server_busy).empty())
      << log.of(WatchdogCondition::server_busy).front().detail;
  EXPECT_TRUE(log.of(WatchdogCondition::server_unreachable).empty());
  running.wait(watchdog.stop());
  running.wait(pool.close(1s));
  admin.query("DROP SCHEMA watchdog_hijack CASCADE");
}

// A full connection budget (another pool holds its one slot): the server answers, so it is not
// unreachable, and the server check's own failed acquire is no caller's timeout; connect_backoff
// says why connects fail.
TEST_F(WatchdogTest, AFullBudgetIsNeitherAnUnreachableServerNorTheChecksOwnTimeout) {
  Running running;
  auto holder_config = config("budget-holder", 1);
  holder_config.budget.key = "wd-full";
  holder_config.budget.slots = 1;
  holder_config.budget.check_interval = 0ms;
  Pool holder(running.io.get_executor(), holder_config);
  auto held = running.wait(holder.acquire());
  auto pool_config = holder_config;
  pool_config.instance = "budget-full";
  pool_config.acquire_timeout = 100ms;
  pool_config.connect.connect_timeout = 300ms;
  Pool pool(running.io.get_executor(), pool_config);
  Watchdog watchdog(running.io.get_executor(), pool,
                    {.interval = 400ms, .long_wait = 5s, .check_server = true});
  ChangeLog log(watchdog);
  running.wait(watchdog.start());
  ASSERT_TRUE(eventually(
      [&] {
        return watchdog.conditions()[static_cast<std::size_t>(WatchdogCondition::connect_backoff)];
      },
      20s));
  const auto checks = watchdog.checks();
  ASSERT_TRUE(eventually([&] { return watchdog.checks() >= checks + 4; }, 20s));
  EXPECT_GT(pool.stats().timeouts, 0U) << "the server check's acquires did time out";
  EXPECT_TRUE(log.of(WatchdogCondition::server_unreachable).empty());
  EXPECT_TRUE(log.of(WatchdogCondition::acquire_timeouts).empty());
  running.wait(watchdog.stop());
  running.wait(pool.close(1s));
  held.release();
  running.wait(holder.close(1s));
}

// The server goes away and comes back: server_unreachable and connect_backoff each start once and
// clear once.
TEST_F(WatchdogTest, UnreachableServerAndConnectBackoffWarnOnceAndClearOnce) {
  auto own = start_own_cluster();
  Running running;
  PoolConfig pool_config;
  pool_config.conninfo = own->dsn();
  pool_config.max_size = 2;
  pool_config.application = "pgrt-watchdog-test";
  pool_config.instance = "unreachable";
  pool_config.connect.connect_timeout = 1s;
  pool_config.acquire_timeout = 1s;
  Pool pool(running.io.get_executor(), pool_config);
  { auto warm = running.wait(pool.acquire()); }
  Watchdog watchdog(running.io.get_executor(), pool,
                    {.interval = 100ms, .long_wait = 5s, .check_server = true});
  ChangeLog log(watchdog);
  running.wait(watchdog.start());
  const auto checks = watchdog.checks();
  ASSERT_TRUE(eventually([&] { return watchdog.checks() >= checks + 2; }));
  ASSERT_EQ(log.total(), 0U);
  own->stop();
  ASSERT_TRUE(eventually(
      [&] {
        const auto now = watchdog.conditions();
        return now[static_cast<std::size_t>(WatchdogCondition::server_unreachable)] &&
               now[static_cast<std::size_t>(WatchdogCondition::connect_backoff)];
      },
      20s));
  const auto down = watchdog.checks();
  ASSERT_TRUE(eventually([&] { return watchdog.checks() >= down + 5; }, 20s));
  EXPECT_EQ(log.of(WatchdogCondition::server_unreachable).size(), 1U);
  EXPECT_EQ(log.of(WatchdogCondition::connect_backoff).size(), 1U);
  own->start();
  ASSERT_TRUE(eventually(
      [&] {
        return log.of(WatchdogCondition::server_unreachable).size() == 2 &&
               log.of(WatchdogCondition::connect_backoff).size() == 2;
      },
      30s));
  expect_one_warning_and_one_clear(log, watchdog, WatchdogCondition::server_unreachable);
  expect_one_warning_and_one_clear(log, watchdog, WatchdogCondition::connect_backoff);
  running.wait(watchdog.stop());
  running.wait(pool.close(1s));
}

// A pool saturated by normal callers does not hold up the server check when one connection is
// reserved for high priority.
TEST_F(WatchdogTest, TheServerCheckGoesThroughTheReservedPath) {
  Running running;
  auto pool_config = config("reserved", 3);
  pool_config.reserved_for_priority = 1;
  pool_config.acquire_timeout = 10s;
  Pool pool(running.io.get_executor(), pool_config);
  auto first = running.wait(pool.acquire());
  auto second = running.wait(pool.acquire());
  // Normal callers queue behind the two held connections.
  std::atomic<int> served{0};
  for (int i = 0; i < 5; ++i) {
    asio::co_spawn(
        running.io,
        [&]() -> asio::awaitable<void> {
          auto lease = co_await pool.acquire();
          ++served;
        },
        asio::detached);
  }
  ASSERT_TRUE(eventually([&] { return pool.stats().waiting_normal == 5; }));
  auto options = fast(true);
  options.server_share = 1.0;
  Watchdog watchdog(running.io.get_executor(), pool, options);
  ChangeLog log(watchdog);
  running.wait(watchdog.start());
  // Each check ran its query on the reserved connection: no unreachable report, and checks keep
  // coming while the normal callers still wait.
  const auto checks = watchdog.checks();
  ASSERT_TRUE(eventually([&] { return watchdog.checks() >= checks + 4; }));
  EXPECT_TRUE(log.of(WatchdogCondition::server_unreachable).empty());
  EXPECT_EQ(served, 0);
  // The two held, and one per check: the checks get their connection (without the reserve, each
  // would time out behind the held two). (A check may still time out while the reserved
  // connection is being opened, on a slow build: the count is awaited, not read at once.)
  EXPECT_TRUE(eventually([&] { return pool.stats().acquired >= 2 + 4U; }))
      << pool.stats().acquired << " acquired";
  running.wait(watchdog.stop());
  first.release();
  second.release();
  ASSERT_TRUE(eventually([&] { return served == 5; }));
  running.wait(pool.close(1s));
}

// --- metrics ---------------------------------------------------------------------------------

// Runs python3's prometheus_client parser (Debian's python3-prometheus-client) on `text`, and
// returns one line per sample: "name{label=value,...} value", sorted labels.
std::map<std::string, double> parse_with_prometheus_client(const std::string& text) {
  char path[] = "/tmp/pgrt-metrics-XXXXXX";
  const int fd = ::mkstemp(path);
  if (fd < 0) throw std::runtime_error("mkstemp failed");
  ::close(fd);
  { std::ofstream(path) << text; }
  const std::string command =
      "/usr/bin/python3 -c 'import sys\n"
      "from prometheus_client.parser import text_string_to_metric_families\n"
      "for family in text_string_to_metric_families(open(sys.argv[1]).read()):\n"
      "    for s in family.samples:\n"
      "        labels = \",\".join(k + \"=\" + v for k, v in sorted(s.labels.items()))\n"
      "        print(family.type, s.name + \"{\" + labels + \"}\", repr(s.value))\n' " +
      std::string(path) + " 2>&1";
  std::FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) throw std::runtime_error("popen failed");
  std::string output;
  std::array<char, 4096> chunk{};
  while (const std::size_t got = std::fread(chunk.data(), 1, chunk.size(), pipe)) {
    output.append(chunk.data(), got);
  }
  const int status = ::pclose(pipe);
  ::unlink(path);
  if (status != 0) throw std::runtime_error("the Prometheus parser refused the text:\n" + output);
  std::map<std::string, double> samples;
  std::istringstream lines(output);
  std::string type;
  std::string name;
  std::string value;
  while (lines >> type >> name >> value) samples[name] = std::stod(value);
  return samples;
}

TEST_F(WatchdogTest, MetricsParseWithAPrometheusParserAndCountWhatHappened) {
  Running running;
  auto pool_config = config("metrics", 2);
  pool_config.min_idle = 1;
  Pool pool(running.io.get_executor(), pool_config);
  Watchdog watchdog(running.io.get_executor(), pool, fast());
  running.wait(watchdog.start());
  for (int i = 0; i < 25; ++i) {
    running.wait([&]() -> asio::awaitable<void> {
      auto lease = co_await pool.acquire();
      co_await lease->query("SELECT pg_sleep(0.002)");
    }());
  }
  {
    auto broken = running.wait(pool.acquire());
    broken.discard();
  }
  Metrics metrics;
  metrics.add_pool(pool);
  metrics.add_watchdog(watchdog);
  const auto samples = parse_with_prometheus_client(metrics.render());
  const std::string pool_label = "db_client_connection_pool_name=" + pool.application_name();
  const auto at = [&](const std::string& key) {
    const auto found = samples.find(key);
    if (found == samples.end()) {
      ADD_FAILURE() << "no sample " << key;
      return -1.0;
    }
    return found->second;
  };
  EXPECT_EQ(at("db_client_connection_max{" + pool_label + "}"), 2);
  EXPECT_EQ(at("db_client_connection_idle_min{" + pool_label + "}"), 1);
  EXPECT_EQ(at("db_client_connection_count{" + pool_label + ",state=used}"), 0);
  EXPECT_EQ(at("db_client_connection_pending_requests{" + pool_label + "}"), 0);
  EXPECT_EQ(at("db_client_connection_timeouts_total{" + pool_label + "}"), 0);
  EXPECT_EQ(at("pgrt_pool_acquires_total{" + pool_label + "}"), 26);
  EXPECT_EQ(at("pgrt_pool_discards_total{" + pool_label + ",reason=by_user}"), 1);
  EXPECT_EQ(at("db_client_connection_wait_time_seconds_count{" + pool_label + "}"), 26);
  EXPECT_EQ(at("db_client_connection_use_time_seconds_count{" + pool_label + "}"), 26);
  EXPECT_EQ(at("db_client_connection_wait_time_seconds_bucket{" + pool_label + ",le=+Inf}"), 26);
  // Each use held a 2 ms sleep: none is in the buckets up to 1 ms (the discarded lease, held for
  // no statement, may be, or not on a loaded machine), all are by 10 s.
  EXPECT_LE(at("db_client_connection_use_time_seconds_bucket{" + pool_label + ",le=0.001}"), 1);
  EXPECT_GE(at("db_client_connection_use_time_seconds_sum{" + pool_label + "}"), 25 * 0.002);
  // Each statement slept 2 ms: 25 of them, none in the buckets up to 1 ms.
  EXPECT_GE(at("db_client_operation_duration_seconds_count{" + pool_label + "}"), 25);
  EXPECT_EQ(at("db_client_operation_duration_seconds_bucket{" + pool_label + ",le=0.001}"), 0);
  EXPECT_GE(at("db_client_operation_duration_seconds_sum{" + pool_label + "}"), 25 * 0.002);
  EXPECT_GE(at("db_client_connection_create_time_seconds_count{" + pool_label + "}"), 1);
  EXPECT_GT(at("db_client_connection_create_time_seconds_sum{" + pool_label + "}"), 0);
  EXPECT_EQ(at("pgrt_watchdog_condition{condition=pool_busy}"), 0);
  EXPECT_GE(at("pgrt_watchdog_checks_total{}"), 1);
  running.wait(watchdog.stop());
  running.wait(pool.close(1s));
}

// The cluster-wide instance lock's SQL (StartupHygiene) names every function, relation, type and
// operator schema-qualified: with a schema put ahead of pg_catalog in the role's search_path (here
// by the conninfo's options) holding a pg_try_advisory_lock(bigint) that answers true and takes
// nothing, every instance believed it held the lock, and a second one ran beside the first.
class ClusterLockSearchPathTest : public testing::DbTest {};

TEST_F(ClusterLockSearchPathTest, ASchemaAheadOfPgCatalogCannotLetASecondInstanceTakeTheLock) {
  testing::BlockingConnection admin(cluster().dsn());
  admin.query("SET client_min_messages = warning");
  admin.query("DROP SCHEMA IF EXISTS lock_hijack CASCADE");
  admin.query("CREATE SCHEMA lock_hijack");
  admin.query(
      "CREATE FUNCTION lock_hijack.pg_try_advisory_lock(pg_catalog.int8) RETURNS pg_catalog.bool "
      "LANGUAGE sql AS 'SELECT true'");
  admin.query(
      "CREATE FUNCTION lock_hijack.hashtextextended(pg_catalog.text, pg_catalog.int8) RETURNS "
      "pg_catalog.int8 LANGUAGE sql AS 'SELECT 42::pg_catalog.int8'");
  admin.query("CREATE VIEW lock_hijack.pg_locks AS SELECT * FROM pg_catalog.pg_locks WHERE false");
  admin.query("GRANT USAGE ON SCHEMA lock_hijack TO PUBLIC");
  PoolConfig config;
  config.conninfo = cluster().dsn() + " options='-c search_path=lock_hijack,pg_catalog'";
  config.application = "hijacked-lock";
  config.instance = "one";
  config.max_size = 3;
  StartupHygieneOptions options;
  options.instance_lock = false;  // (as if each instance ran on a host of its own)
  options.cluster_lock = true;
  testing::run_coroutine([&]() -> asio::awaitable<void> {
    StartupHygiene first(co_await asio::this_coro::executor, config, options);
    co_await first.start();
    EXPECT_EQ(admin.scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND "
                           "objsubid = 1 AND granted AND (classid::int8 << 32 | objid::int8) = "
                           "hashtextextended('pgrt instance hijacked-lock/one/', 0)"),
              "1")
        << "the first instance holds no cluster-wide lock";
    StartupHygiene second(co_await asio::this_coro::executor, config, options);
    bool refused = false;
    try {
      co_await second.start();
    } catch (const Error& error) {
      refused = error.code() == client_errc::instance_locked;
    }
    EXPECT_TRUE(refused) << "a second holder of the cluster-wide lock";
    if (!refused) co_await second.stop();
    co_await first.stop();
  });
  admin.query("DROP SCHEMA lock_hijack CASCADE");
}

// The service components' environment settings: a malformed value is refused with
// invalid_config, a message that names the variable and its value, and a hint that says what is
// expected; a well-formed one is taken. (PGRT_START_WAIT_S is read by PoolComponent and
// StartupHygiene alike.)
TEST(ServiceEnvironment, MalformedStartWaitAndMetricsPortAreRefusedClearly) {
  struct ScopedEnv {
    ScopedEnv(const char* name, const char* value) : name_(name) { ::setenv(name, value, 1); }
    ScopedEnv(const ScopedEnv&) = delete;
    ScopedEnv& operator=(const ScopedEnv&) = delete;
    ~ScopedEnv() { ::unsetenv(name_); }
    const char* name_;
  };
  const auto expect_refused = [](const auto& read, const std::string& message,
                                 const std::string& hint) {
    try {
      (void)read();
      ADD_FAILURE() << "accepted: " << message;
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), make_error_code(client_errc::invalid_config)) << message;
      EXPECT_THAT(error.diagnostics().message, HasSubstr(message));
      EXPECT_THAT(error.diagnostics().hint, HasSubstr(hint));
    }
  };
  for (const char* value : {"ten", "-1", "86401", "", "5s"}) {
    const ScopedEnv start_wait("PGRT_START_WAIT_S", value);
    const std::string message = std::string("PGRT_START_WAIT_S='") + value + "' is not valid";
    expect_refused([] { return PoolComponentOptions::from_env(); }, message, "0-86400");
    expect_refused([] { return StartupHygieneOptions::from_env(); }, message, "0-86400");
  }
  {
    const ScopedEnv start_wait("PGRT_START_WAIT_S", "7");
    EXPECT_EQ(PoolComponentOptions::from_env().start_wait, 7s);
  }
  for (const char* value : {"http", "65536", "-1", "", "80 "}) {
    const ScopedEnv port("PGRT_METRICS_PORT", value);
    expect_refused([] { return MetricsEndpointOptions::from_env(); },
                   std::string("PGRT_METRICS_PORT='") + value + "' is not valid", "0-65535");
  }
  const ScopedEnv port("PGRT_METRICS_PORT", "9187");
  const ScopedEnv address("PGRT_METRICS_ADDRESS", "0.0.0.0");
  const MetricsEndpointOptions options = MetricsEndpointOptions::from_env();
  EXPECT_EQ(options.port, 9187);
  EXPECT_EQ(options.address, "0.0.0.0");
}

// Whole-number PGRT_* variables refuse white space and a sign (PGRT_METRICS_PORT='80 ',
// PGRT_POOL_MAX=' 5'); PGRT_START_WAIT_S and PGRT_CLEANUP_IDLE_S do too: ' 7', '\n7' and '+7' are
// refused as invalid_config, not taken as 7.
TEST(ServiceEnvironment, StartWaitAndCleanupIdleRefuseWhiteSpaceAndASignAsTheOtherNumbersDo) {
  for (const char* value : {" 7", "\n7", "+7"}) {
    ::setenv("PGRT_START_WAIT_S", value, 1);
    try {
      const auto options = PoolComponentOptions::from_env();
      ADD_FAILURE() << "accepted PGRT_START_WAIT_S='" << value << "' as "
                    << options.start_wait.count() << " ms";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), make_error_code(client_errc::invalid_config));
    }
    ::unsetenv("PGRT_START_WAIT_S");
    ::setenv("PGRT_CLEANUP_IDLE_S", value, 1);
    try {
      const auto options = StartupHygieneOptions::from_env();
      ADD_FAILURE() << "accepted PGRT_CLEANUP_IDLE_S='" << value << "' as "
                    << options.idle_threshold.count() << " s";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), make_error_code(client_errc::invalid_config));
    }
    ::unsetenv("PGRT_CLEANUP_IDLE_S");
  }
}

// docs/operations.md: PGRT_WATCHDOG_INTERVAL_MS takes "10 ms to a year", PGRT_WATCHDOG_LONG_WAIT_MS
// 0 ms to a year. A value outside is refused naming the environment variable the operator set, as
// the other PGRT_* variables are ("PGRT_...='5' is not valid"), not a C++ field.
TEST(ServiceEnvironment, AWatchdogValueOutOfRangeIsRefusedNamingTheVariable) {
  for (const auto& [name, value] : std::vector<std::pair<const char*, const char*>>{
           {"PGRT_WATCHDOG_INTERVAL_MS", "5"}, {"PGRT_WATCHDOG_LONG_WAIT_MS", "40000000000"}}) {
    ::setenv(name, value, 1);
    try {
      (void)WatchdogOptions::from_env();
      ADD_FAILURE() << "accepted " << name << "=" << value;
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), make_error_code(client_errc::invalid_config));
      EXPECT_THAT(error.what(), HasSubstr(name)) << error.what();
    }
    ::unsetenv(name);
  }
}

// PGRT_WATCHDOG_IN_USE_SHARE and PGRT_WATCHDOG_SERVER_SHARE take a plain decimal in (0, 1]
// ("0.8", "1", ".5"), read the same in every locale: white space, a sign, an exponent, a hex
// float, "nan" and "inf" are refused naming the variable, as out-of-range values are, not taken by
// strtod.
TEST(ServiceEnvironment, WatchdogSharesArePlainDecimalsRefusedOtherwiseNamingTheVariable) {
  for (const char* name : {"PGRT_WATCHDOG_IN_USE_SHARE", "PGRT_WATCHDOG_SERVER_SHARE"}) {
    for (const char* value :
         {" 0.5",     "0.5 ", "\n0.5", "+0.5", "0x0.8p0", "0X.8", "8e-1", "nan",   "NAN", "inf",
          "infinity", "0",    "0.0",   "1.5",  "-0.5",    "",     ".",    "0.5.1", "0,5", "1e0"}) {
      ::setenv(name, value, 1);
      try {
        const WatchdogOptions options = WatchdogOptions::from_env();
        ADD_FAILURE() << "accepted " << name << "='" << value << "' as " << options.in_use_share
                      << " / " << options.server_share;
      } catch (const Error& error) {
        EXPECT_EQ(error.code(), make_error_code(client_errc::invalid_config));
        EXPECT_THAT(error.what(), HasSubstr(std::string(name) + "='" + value + "'"))
            << error.what();
      }
    }
    for (const auto& [value, share] : std::vector<std::pair<const char*, double>>{
             {"0.8", 0.8}, {"1", 1.0}, {"1.0", 1.0}, {".5", 0.5}, {"0.05", 0.05}}) {
      ::setenv(name, value, 1);
      const WatchdogOptions options = WatchdogOptions::from_env();
      EXPECT_EQ(std::string(name) == "PGRT_WATCHDOG_IN_USE_SHARE" ? options.in_use_share
                                                                  : options.server_share,
                share)
          << name << "='" << value << "'";
    }
    ::unsetenv(name);
  }
}

// Label values must be valid UTF-8 (the exposition format; Prometheus refuses the whole scrape
// otherwise). A name with an invalid byte (PGRT_APP, a pending-writes queue's or a consumer's
// name) has it replaced with U+FFFD, one per broken sequence; '\\', '"' and a line break are
// escaped.
TEST(MetricsText, NamesWithInvalidUtf8GiveValidLabelValues) {
  Metrics metrics;
  metrics.add_pool("orders\xff\xfe/\xe2\x82/\"q\"\\\n\xc3\xa9", [] { return PoolStats{}; });
  const std::string text = metrics.render();
  EXPECT_THAT(text, HasSubstr("db_client_connection_pool_name=\"orders\xef\xbf\xbd\xef\xbf\xbd/"
                              "\xef\xbf\xbd/\\\"q\\\"\\\\\\n\xc3\xa9\""))
      << text;
  for (const char invalid : {'\xff', '\xfe'}) {
    EXPECT_EQ(text.find(invalid), std::string::npos) << text;
  }
}

// Every sample of a rendered metrics page names its series (name and labels) once: the
// exposition format forbids two samples of one series.
void expect_each_series_once(const std::string& text) {
  std::set<std::string> series;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line.starts_with("#")) continue;
    EXPECT_TRUE(series.insert(line.substr(0, line.rfind(' '))).second) << "twice: " << line;
  }
}

// Two pools with one application name (a primary and a replica) must not give duplicate series:
// Prometheus would keep one of each pair without a word. Bucket bounds read as client libraries
// write them (le="0.0001", not "1e-04"), so that series of several exporters group by le.
TEST(MetricsText, RepeatedPoolNamesGetDistinctSeriesAndBoundsAreWrittenPlainly) {
  Metrics metrics;
  metrics.add_pool("orders/vm/1a2b3c4d", [] { return PoolStats{}; });
  metrics.add_pool("orders/vm/1a2b3c4d", [] { return PoolStats{}; });
  const std::string text = metrics.render();
  expect_each_series_once(text);
  EXPECT_THAT(text, HasSubstr("db_client_connection_pool_name=\"orders/vm/1a2b3c4d#2\""));
  EXPECT_THAT(text, HasSubstr("le=\"0.0001\""));
  EXPECT_THAT(text, ::testing::Not(HasSubstr("e-0")));
}

// --- the HTTP endpoint -------------------------------------------------------------------------

// A blocking HTTP/1.1 client for the tests: one request, the whole response (or "" if the
// connection was refused or closed without an answer).
int connect_to(std::uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
    ::close(fd);
    return -1;
  }
  timeval timeout{.tv_sec = 10, .tv_usec = 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  return fd;
}

std::string read_all(int fd) {
  std::string response;
  std::array<char, 8192> chunk{};
  for (;;) {
    const ssize_t got = ::recv(fd, chunk.data(), chunk.size(), 0);
    if (got <= 0) break;
    response.append(chunk.data(), static_cast<std::size_t>(got));
  }
  return response;
}

std::string http_get(std::uint16_t port, const std::string& path) {
  const int fd = connect_to(port);
  if (fd < 0) return "";
  const std::string request = "GET " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  (void)::send(fd, request.data(), request.size(), MSG_NOSIGNAL);
  std::string response = read_all(fd);
  ::close(fd);
  return response;
}

// request_timeout bounds each request: a value that cannot be one (0 or less: every request cut
// at once; over a day: slow clients held for good; milliseconds::max(): past the clock's range,
// a timeout in the past) is refused when the endpoint starts, naming the option.
TEST_F(WatchdogTest, TheEndpointRefusesARequestTimeoutThatCannotBeABound) {
  Running running(1);
  auto metrics = std::make_shared<Metrics>();
  for (const auto timeout : {0ms, -5ms, std::chrono::milliseconds(std::chrono::hours(25)),
                             std::chrono::milliseconds::max()}) {
    MetricsEndpoint endpoint(running.io.get_executor(), metrics, [] { return true; },
                             {.request_timeout = timeout});
    try {
      running.wait(endpoint.start());
      ADD_FAILURE() << "request_timeout " << timeout.count() << " ms was taken";
    } catch (const Error& error) {
      EXPECT_EQ(error.code(), make_error_code(client_errc::invalid_config)) << error.what();
      EXPECT_THAT(error.what(), HasSubstr("request_timeout"));
    }
  }
  MetricsEndpoint endpoint(running.io.get_executor(), metrics, [] { return true; },
                           {.request_timeout = std::chrono::hours(24)});
  running.wait(endpoint.start());
  EXPECT_THAT(http_get(endpoint.port(), "/healthz"), HasSubstr("200 OK"));
  running.wait(endpoint.stop());
}

TEST_F(WatchdogTest, TheEndpointServesMetricsAndProbes) {
  Running running(2);
  Pool pool(running.io.get_executor(), config("endpoint", 2));
  auto metrics = std::make_shared<Metrics>();
  metrics->add_pool(pool);
  std::atomic<bool> ready{true};
  MetricsEndpoint endpoint(running.io.get_executor(), metrics, [&] { return ready.load(); });
  running.wait(endpoint.start());
  ASSERT_NE(endpoint.port(), 0);
  { auto lease = running.wait(pool.acquire()); }
  const std::string page = http_get(endpoint.port(), "/metrics");
  EXPECT_THAT(page, HasSubstr("HTTP/1.1 200"));
  EXPECT_THAT(page, HasSubstr("text/plain; version=0.0.4"));
  EXPECT_THAT(page, HasSubstr("pgrt_pool_acquires_total{db_client_connection_pool_name=\"" +
                              pool.application_name() + "\"} 1"));
  EXPECT_THAT(http_get(endpoint.port(), "/healthz"), HasSubstr("HTTP/1.1 200"));
  // The absolute form (RFC 9112: a server must accept it), as a proxy sends it.
  EXPECT_THAT(http_get(endpoint.port(), "http://127.0.0.1/healthz"), HasSubstr("HTTP/1.1 200"));
  EXPECT_THAT(http_get(endpoint.port(), "/readyz"), HasSubstr("HTTP/1.1 200"));
  ready = false;
  EXPECT_THAT(http_get(endpoint.port(), "/readyz"), HasSubstr("HTTP/1.1 503"));
  EXPECT_THAT(http_get(endpoint.port(), "/nothing"), HasSubstr("HTTP/1.1 404"));
  // A port already taken fails the start with the address in the message.
  MetricsEndpoint twin(running.io.get_executor(), metrics, [] { return true; },
                       {.port = endpoint.port()});
  try {
    running.wait(twin.start());
    ADD_FAILURE() << "a second endpoint on the same port started";
  } catch (const std::system_error& error) {
    EXPECT_THAT(error.what(), HasSubstr("127.0.0.1:" + std::to_string(endpoint.port())));
  }
  running.wait(endpoint.stop());
  EXPECT_EQ(http_get(endpoint.port(), "/healthz"), "");  // closed
  running.wait(pool.close(1s));
}

// Slowloris, a huge header and 1,000 silent connections at once: the endpoint keeps answering at
// once, and the pool on the same io_context keeps its latency.
// Clients that pipeline requests for /metrics and never read the answers, on every slot: the
// answers back up behind their full windows. A liveness probe still gets in, in place of one of
// them whose answer has not gone out for a while (it waited request_timeout per stalled answer).
TEST_F(WatchdogTest, ClientsThatNeverReadTheirAnswersCannotKeepAProbeOut) {
  Running running(1);
  // Forty pools (never connected): a /metrics page of a few hundred KiB, which the kernel's
  // buffers cannot take many of.
  std::vector<std::unique_ptr<Pool>> pools;
  auto metrics = std::make_shared<Metrics>();
  for (int i = 0; i < 40; ++i) {
    pools.push_back(std::make_unique<Pool>(running.io.get_executor(),
                                           config("non-reader-" + std::to_string(i), 1)));
    metrics->add_pool(*pools.back());
  }
  constexpr std::size_t slots = 4;
  MetricsEndpoint endpoint(running.io.get_executor(), metrics, [] { return true; },
                           {.max_connections = slots, .request_timeout = 30s});
  running.wait(endpoint.start());
  const auto port = endpoint.port();
  std::vector<int> non_readers;
  std::string pipelined;
  for (int i = 0; i < 100; ++i) pipelined += "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  for (std::size_t i = 0; i < slots; ++i) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const int small = 2048;
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);  // before connect: the window
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address), 0);
    (void)::send(fd, pipelined.data(), pipelined.size(), MSG_NOSIGNAL);
    non_readers.push_back(fd);
  }
  // Their answers stall once the kernel's buffers are full (after some renders of the page:
  // seconds under a sanitizer), each for request_timeout (30 s) unless evicted. A probe gets in
  // well within that; until the first stall it may be refused (every slot is being answered).
  std::string probe;
  const auto asked = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - asked < 20s) {
    probe = http_get(port, "/healthz");
    if (probe.find("200 OK") != std::string::npos) break;
    std::this_thread::sleep_for(250ms);
  }
  EXPECT_THAT(probe, HasSubstr("200 OK"));
  EXPECT_GE(endpoint.connections_evicted(), 1U);
  for (const int fd : non_readers) ::close(fd);
  running.wait(endpoint.stop());
  for (auto& pool : pools) running.wait(pool->close(1s));
}

TEST_F(WatchdogTest, HostileClientsNeitherBlockTheEndpointNorSlowThePool) {
  Running running(1);  // one thread: the endpoint and the pool share it, as in a small service
  Pool pool(running.io.get_executor(), config("hostile", 2));
  auto metrics = std::make_shared<Metrics>();
  metrics->add_pool(pool);
  MetricsEndpoint endpoint(running.io.get_executor(), metrics, [] { return true; },
                           {.max_connections = 16, .request_timeout = 1s});
  running.wait(endpoint.start());
  const auto port = endpoint.port();

  // The pool's latency: the median of 200 acquire + SELECT 1, alone and under attack.
  const auto median_query = [&] {
    std::vector<std::chrono::nanoseconds> latencies;
    for (int i = 0; i < 200; ++i) {
      const auto started = std::chrono::steady_clock::now();
      running.wait([&]() -> asio::awaitable<void> {
        auto lease = co_await pool.acquire();
        co_await lease->query("SELECT 1");
      }());
      latencies.push_back(std::chrono::steady_clock::now() - started);
    }
    std::sort(latencies.begin(), latencies.end());
    return latencies[latencies.size() / 2];
  };
  const auto calm = median_query();

  // A huge header: 431, and the connection closed.
  {
    const int fd = connect_to(port);
    ASSERT_GE(fd, 0);
    const std::string request =
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(64 * 1024, 'a') + "\r\n\r\n";
    (void)::send(fd, request.data(), request.size(), MSG_NOSIGNAL);
    EXPECT_THAT(read_all(fd), HasSubstr("431"));
    ::close(fd);
  }

  // Slowloris: a byte every 100 ms, never a whole header. Closed after request_timeout (1 s).
  std::atomic<bool> loris_closed{false};
  std::thread loris([&] {
    const int fd = connect_to(port);
    if (fd < 0) return;
    const std::string start = "GET /metrics HTTP/1.1\r\nX-Slow: ";
    (void)::send(fd, start.data(), start.size(), MSG_NOSIGNAL);
    const auto began = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() - began < 5s) {
      if (::send(fd, "a", 1, MSG_NOSIGNAL) < 0) {
        loris_closed = true;
        break;
      }
      std::this_thread::sleep_for(100ms);
    }
    ::close(fd);
  });

  // 1,000 connections, opened and kept.
  std::vector<int> flood;
  for (int i = 0; i < 1'000; ++i) {
    const int fd = connect_to(port);
    if (fd >= 0) flood.push_back(fd);
  }
  const auto attacked = median_query();
  // The endpoint still answers a real request at once, though every slot is held by silent
  // connections: once they have been silent 100 ms, a new connection takes the place of the
  // oldest of them (a liveness probe never waits out request_timeout, nor gets a 503, for them).
  std::this_thread::sleep_for(150ms);
  EXPECT_THAT(http_get(port, "/healthz"), HasSubstr("200 OK"));
  EXPECT_THAT(http_get(port, "/healthz"), HasSubstr("200 OK"));
  loris.join();
  EXPECT_TRUE(loris_closed) << "the slow client was never cut off";
  for (const int fd : flood) ::close(fd);
  // The flood was refused at once (cheap), or, where the endpoint took it in later than 100 ms
  // after the first of it, cycled through the slots; a silent one made room for the probes.
  EXPECT_GE(endpoint.connections_refused() + endpoint.connections_evicted(), 900U);
  EXPECT_GE(endpoint.connections_refused(), 500U);
  EXPECT_GE(endpoint.connections_evicted(), 1U);
  // Unaffected: within 3x of the calm median and 5 ms (the machine is shared and noisy, and under
  // ThreadSanitizer a query takes ten times as long; an endpoint that held the pool's thread for
  // the flood would take far longer).
  EXPECT_LE(attacked, calm * 3 + 5ms)
      << "calm " << calm.count() << " ns, attacked " << attacked.count() << " ns";
  running.wait(endpoint.stop());
  running.wait(pool.close(1s));
}

// ------------------------------------------------------------------- the exit handler of add_pool

// A worker of the pool (a component after it) that holds a lease in a long statement, and whose
// stop() waits for that statement without honouring its cancellation.
struct LongStatementWorker {
  std::shared_ptr<std::atomic<bool>> running = std::make_shared<std::atomic<bool>>(false);
  [[nodiscard]] std::string name() const { return "long_statement_worker"; }
  asio::awaitable<void> start() {
    asio::co_spawn(co_await asio::this_coro::executor, hold(running), asio::detached);
    for (int i = 0; i < 500 && !*running; ++i) co_await sleep_for(10ms);
  }
  static asio::awaitable<void> hold(std::shared_ptr<std::atomic<bool>> running) {
    Lease lease = co_await pgrt::connection();
    *running = true;
    try {
      co_await lease->query("SELECT pg_sleep(20)");
    } catch (const std::exception&) {  // NOLINT(bugprone-empty-catch): interrupted
    }
  }
  asio::awaitable<void> stop() {  // waits for the statement, whatever the deadline says
    asio::steady_timer timer(co_await asio::this_coro::executor, 1h);
    co_await timer.async_wait(
        asio::bind_cancellation_slot(asio::cancellation_slot(), asio::use_awaitable));
  }
};

std::size_t active_sleeps_of(const std::string& dsn, const std::string& application) {
  testing::BlockingConnection observer(dsn);
  return std::stoul(
      observer.scalar("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE "
                      "'SELECT pg_sleep(20)%' AND application_name LIKE '" +
                      application + "/%'"));
}

class ExitHandlerTest : public testing::DbTest {};

// lifecycle.md: run() runs the exit handlers "when a stop was abandoned (its deadline or the
// shutdown budget passed) or never ran ...: what that component holds, the pool's sockets for one,
// may still be open", and add_pool()'s handler, Pool::close_now(), "interrupts the leased ones: it
// sends each running statement a cancel request". When the shutdown budget runs out before the
// pool's own stop is over (a worker's stop took the budget), the pool's stop began (Pool::close()
// forgets the process-wide pool at once) and is abandoned: the exit handler still reaches the
// pool (its close_now_handle()), so the worker's statement does not run on in the server after
// run() has returned.
TEST_F(ExitHandlerTest, AnAbandonedPoolStopStillHasItsLeasesInterruptedByTheExitHandler) {
  const std::string application = "pgrt-exit-handler";
  PoolConfig pool_config;
  pool_config.conninfo = cluster().dsn();
  pool_config.max_size = 2;
  pool_config.application = application;
  pool_config.instance = "one";
  int code = -1;
  {
    lifecycle::ManagerOptions options;
    options.handle_signals = false;
    options.shutdown_logging = false;
    options.shutdown_budget = 1500ms;
    lifecycle::Manager app(options);
    auto& pool =
        add_pool(app, pool_config, PoolComponentOptions{.close_grace = 500ms, .start_wait = 0ms});
    app.add(LongStatementWorker{}, lifecycle::after(pool),
            lifecycle::ComponentLimits{.stop_timeout = 10s});
    app.on_ready([&] { app.request_stop(); });
    code = app.run();
    EXPECT_EQ(code, lifecycle::exit_code::failure);
    // The exit handlers have run (a stop was abandoned): the statement was sent a cancel.
    EXPECT_TRUE(eventually([&] { return active_sleeps_of(cluster().dsn(), application) == 0; }, 3s))
        << active_sleeps_of(cluster().dsn(), application)
        << " statement(s) still running in the server after run() returned";
  }
  testing::BlockingConnection admin(cluster().dsn());
  (void)admin.query(
      "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
      "application_name LIKE '" +
      application + "/%'");
}

class ShutdownBudgetTest : public testing::DbTest {};

// pending_writes.hpp: "No write is dropped silently: each accepted write ends up flushed, or
// counted in PendingWritesReport::failed, logged and reported through PendingWritesEvents::failed".
// lifecycle.md: a stop still running when the shutdown budget runs out is cancelled and given up
// to 1 s more to wind down, so that a PendingWrites can say what it gave up on. Here its server is
// down, its stop() retries, and the budget (shorter than its stop deadline) ends it; nothing
// stops after it (its pool is the program's own, closed after run()), so nothing else would
// end the retries: the writes it could not commit are counted as failed and reported through
// events().failed.
TEST_F(ShutdownBudgetTest, PendingWritesCutAtTheBudgetsEndAreReportedAsFailed) {
  auto own = start_own_cluster();
  testing::BlockingConnection(own->dsn()).query("CREATE TABLE budget_cut (seq bigint)");
  PoolConfig pool_config;
  pool_config.conninfo = own->dsn();
  pool_config.max_size = 2;
  pool_config.application = "pgrt-budget-cut";
  pool_config.acquire_timeout = 300ms;
  pool_config.connect.connect_timeout = 1s;
  constexpr std::int64_t accepted = 30;
  std::size_t reported = 0;
  PendingWritesReport end{};
  int code = -1;
  {
    lifecycle::ManagerOptions options;
    options.handle_signals = false;
    options.shutdown_logging = false;
    options.shutdown_budget = 1s;  // the stop deadline is 10 s: the budget cuts the flush
    lifecycle::Manager app(options);
    Pool pool(app.executor(), pool_config);
    auto writes = std::make_shared<PendingWrites>(
        pool, app.executor(), PendingWritesConfig{.name = "cut", .flush_interval = 1h});
    boost::signals2::scoped_connection on_failed = writes->events().failed.connect(
        [&](const std::vector<std::string>& lost, const Error& error) {
          reported += lost.size();
          EXPECT_EQ(error.code(), client_errc::cancelled) << error.what();
        });
    app.add(writes);
    app.on_ready([&] {
      asio::co_spawn(
          app.executor(),
          [&]() -> asio::awaitable<void> {
            for (std::int64_t seq = 0; seq < accepted; ++seq) {
              co_await writes->enqueue("INSERT INTO budget_cut VALUES ($1)", seq);
            }
            own->stop(testing::StopMode::fast);
            app.request_stop();
          },
          asio::detached);
    });
    code = app.run();
    end = writes->report();
  }
  EXPECT_EQ(code, lifecycle::exit_code::failure);
  EXPECT_EQ(end.accepted, static_cast<std::uint64_t>(accepted));
  EXPECT_EQ(end.failed, static_cast<std::uint64_t>(accepted));
  EXPECT_EQ(end.pending, 0U);
  EXPECT_EQ(reported, static_cast<std::size_t>(accepted))
      << "writes cut by the shutdown budget were not reported through events().failed";
}

// A consumer named "default" would share the series of the acquires that name no consumer
// (rendered consumer="default"): two samples of each pgrt_pool_consumer_* family with the same
// labels, which the exposition format forbids (Prometheus keeps one of them without a word). The
// name is refused, and the unnamed consumer's series stay one per family beside a named one's.
TEST(MetricsText, AConsumerNamedDefaultDoesNotShareTheUnnamedAcquiresSeries) {
  PoolConfig accepted;
  accepted.conninfo = "host=/nonexistent";
  accepted.max_size = 4;
  accepted.consumers = {ConsumerShare{.name = "default", .min = 1}};
  try {
    accepted.validate();
    ADD_FAILURE() << "a consumer named 'default' was accepted";
  } catch (const Error& refused) {
    EXPECT_EQ(refused.code(), make_error_code(client_errc::invalid_config)) << refused.what();
    EXPECT_THAT(refused.what(), HasSubstr("'default'"));
  }
  Metrics metrics;
  metrics.add_pool("orders/vm/1a2b3c4d", [] {
    PoolStats stats;
    stats.max = 4;
    stats.consumers.push_back({.name = "", .in_use = 2, .max = 4});
    stats.consumers.push_back({.name = "scraper", .in_use = 1, .min = 1, .max = 4});
    return stats;
  });
  const std::string text = metrics.render();
  expect_each_series_once(text);
  EXPECT_THAT(text, HasSubstr("consumer=\"default\"")) << text;
  EXPECT_THAT(text, HasSubstr("consumer=\"scraper\"")) << text;
}

// PGRT_WATCHDOG_INTERVAL_MS takes any whole number of milliseconds. 10^13 ms (317 years: "as good
// as never") would overflow steady_clock's nanoseconds in the timer's expires_after(), the wait
// expiring at once and the watchdog checking in a tight loop: it is refused as invalid_config
// (or, were it taken, waited for good).
TEST_F(WatchdogTest, AnIntervalBeyondTheClocksRangeIsRefusedOrWaitedNotSpun) {
  ::setenv("PGRT_WATCHDOG_INTERVAL_MS", "10000000000000", 1);
  std::optional<WatchdogOptions> options;
  try {
    options = WatchdogOptions::from_env();
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), make_error_code(client_errc::invalid_config));
  }
  ::unsetenv("PGRT_WATCHDOG_INTERVAL_MS");
  if (!options) return;  // refused: fine
  options->check_server = false;
  Running running;
  Pool pool(running.io.get_executor(), config("huge-interval", 2));
  Watchdog watchdog(running.io.get_executor(), pool, *options);
  running.wait(watchdog.start());
  std::this_thread::sleep_for(500ms);
  const auto checks = watchdog.checks();
  running.wait(watchdog.stop());
  running.wait(pool.close(1s));
  EXPECT_LE(checks, 1U) << "checks in 500 ms with an interval of 10^13 ms";
}

}  // namespace
}  // namespace pgrt
