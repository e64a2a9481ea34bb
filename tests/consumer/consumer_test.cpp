// A service's own tests, built against the installed package with
// find_package(pgrt CONFIG REQUIRED COMPONENTS testing). The blocks of docs/testing.md are taken
// from this file verbatim (pgrt_docs_testing_snippets), so the guide compiles and runs.
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <gtest/gtest.h>
#include <string>

#include <pgrt/db.hpp>
#include <pgrt/testing/db_test.hpp>
#include <pgrt/testing/expect_error.hpp>
#include <pgrt/testing/fault_proxy.hpp>
#include <pgrt/testing/run_coroutine.hpp>
#include <pgrt/testing/temp_pgbouncer.hpp>

namespace {

using namespace std::chrono_literals;
namespace asio = boost::asio;

// Braced option aggregates are built in named variables, never inside a co_await expression:
// g++ 12 miscompiles a braced temporary with std::string members there.

// The service code under test.
asio::awaitable<std::int64_t> count_orders(pgrt::Connection& conn) {
  co_return (co_await conn.query("SELECT count(*) FROM orders")).scalar<std::int64_t>();
}

class OrdersTest : public pgrt::testing::DbTest {};

TEST_F(OrdersTest, CountsWhatIsThere) {
  // cluster(): one throwaway server for the whole test binary, started on first use.
  pgrt::testing::run_coroutine([]() -> asio::awaitable<void> {
    pgrt::ConnectOptions options{.conninfo = cluster().dsn()};
    auto conn = co_await pgrt::Connection::connect(options);
    co_await conn.execute("DROP TABLE IF EXISTS orders");
    co_await conn.execute("CREATE TABLE orders (id bigint)");
    co_await conn.execute("INSERT INTO orders VALUES (1), (2)");
    EXPECT_EQ(co_await count_orders(conn), 2);
  });
}

TEST_F(OrdersTest, WorksOverTlsWithTheServersCertificateChecked) {
  auto server = start_own_cluster({.tls = true});  // ssl=on, a CA made for this test
  pgrt::testing::run_coroutine([&]() -> asio::awaitable<void> {
    // host=localhost hostaddr=127.0.0.1 ... sslmode=verify-full sslrootcert=<the test CA>
    pgrt::ConnectOptions options{.conninfo = server->tls_dsn("verify-full")};
    auto conn = co_await pgrt::Connection::connect(options);
    EXPECT_TRUE((co_await conn.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
                    .scalar<bool>());
  });
}

TEST_F(OrdersTest, WorksBehindPgBouncerInTransactionMode) {
  pgrt::testing::TempPgBouncer bouncer(cluster(), {.pool_mode = "transaction"});
  pgrt::PoolConfig config;
  config.conninfo = bouncer.dsn();
  config.connect.pooler = pgrt::Pooler::transaction;  // or PGRT_POOLER=transaction
  pgrt::testing::run_coroutine([&]() -> asio::awaitable<void> {
    pgrt::Pool pool(co_await asio::this_coro::executor, config);
    auto lease = co_await pool.acquire();
    EXPECT_EQ((co_await lease->query_prepared("SELECT $1::int", 7)).scalar<int>(), 7);
  });
}

TEST_F(OrdersTest, ADroppedConnectionIsReportedAsLost) {
  pgrt::testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  pgrt::testing::run_coroutine([&]() -> asio::awaitable<void> {
    pgrt::ConnectOptions options{.conninfo =
                                     proxy.conninfo_prefix() + " user=postgres dbname=postgres"};
    auto conn = co_await pgrt::Connection::connect(options);
    proxy.drop_all();  // every connection through the proxy is reset
    auto error = co_await pgrt::testing::expect_error(count_orders(conn));
    EXPECT_EQ(error.code(), pgrt::client_errc::connection_lost);
  });
}

}  // namespace
