// The fault-injecting proxy, checked with real PostgreSQL connections through it.
#include <cerrno>
#include <chrono>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <memory>
#include <poll.h>
#include <string>
#include <sys/socket.h>
#include <thread>

#include "pgrt/testing/blocking_sql.hpp"
#include "pgrt/testing/db_test.hpp"
#include "pgrt/testing/eventually.hpp"
#include "pgrt/testing/fault_proxy.hpp"

namespace pgrt::testing {
namespace {

using namespace std::chrono_literals;

bool readable_within(PGconn* connection, std::chrono::milliseconds wait) {
  pollfd socket{.fd = PQsocket(connection), .events = POLLIN, .revents = 0};
  return ::poll(&socket, 1, static_cast<int>(wait.count())) > 0;
}

class FaultProxyTest : public DbTest {
 protected:
  void SetUp() override {
    proxy = std::make_unique<FaultProxy>("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  }
  [[nodiscard]] std::string through_proxy() const {
    return proxy->conninfo_prefix() + " user=postgres dbname=postgres";
  }
  // The client disappears without a Terminate message, as a crashed process would.
  static void vanish(BlockingConnection& client) {
    ::shutdown(PQsocket(client.native()), SHUT_RDWR);
  }

  std::unique_ptr<FaultProxy> proxy;
};

TEST_F(FaultProxyTest, ForwardsQueriesBothWays) {
  BlockingConnection client(through_proxy());
  EXPECT_EQ(client.scalar("SELECT inet_server_port()"), std::to_string(cluster().port()));
  EXPECT_EQ(client.scalar("SELECT repeat('x', 100000)").size(), 100000U);
  EXPECT_EQ(proxy->active_connections(), 1U);
}

// set_latency(): each round trip takes at least twice the one-way delay, and large replies still
// arrive whole.
TEST_F(FaultProxyTest, LatencyDelaysEachDirection) {
  BlockingConnection client(through_proxy());
  proxy->set_latency(20ms);
  const auto started = std::chrono::steady_clock::now();
  EXPECT_EQ(client.scalar("SELECT 1"), "1");
  EXPECT_GE(std::chrono::steady_clock::now() - started, 40ms) << "the round trip was not delayed";
  EXPECT_EQ(client.scalar("SELECT repeat('x', 100000)").size(), 100000U);
  proxy->set_latency(0ms);
  EXPECT_EQ(client.scalar("SELECT 2"), "2");
}

TEST_F(FaultProxyTest, PauseHoldsTrafficWithoutClosingThenResumeDeliversIt) {
  BlockingConnection client(through_proxy());
  const int backend = client.backend_pid();
  ASSERT_EQ(client.scalar("SELECT 1"), "1");

  proxy->pause();
  ASSERT_EQ(PQsendQuery(client.native(), "SELECT 42"), 1);
  EXPECT_FALSE(readable_within(client.native(), 500ms)) << "no reply, no FIN, no RST while paused";
  BlockingConnection observer(cluster().dsn());
  EXPECT_EQ(
      observer.scalar("SELECT query FROM pg_stat_activity WHERE pid = " + std::to_string(backend)),
      "SELECT 1")
      << "the server must not have received the paused query";

  proxy->resume();
  std::unique_ptr<PGresult, void (*)(PGresult*)> result(PQgetResult(client.native()), PQclear);
  ASSERT_EQ(PQresultStatus(result.get()), PGRES_TUPLES_OK) << PQerrorMessage(client.native());
  EXPECT_STREQ(PQgetvalue(result.get(), 0, 0), "42");
  while (PGresult* rest = PQgetResult(client.native())) PQclear(rest);
  EXPECT_EQ(client.scalar("SELECT 2"), "2");
}

TEST_F(FaultProxyTest, DropResetsBothSides) {
  BlockingConnection client(through_proxy());
  const int backend = client.backend_pid();
  ASSERT_TRUE(backend_exists(cluster().dsn(), backend));

  proxy->drop_all();
  EXPECT_EQ(proxy->active_connections(), 0U);
  ASSERT_TRUE(readable_within(client.native(), 5s));
  char byte = 0;
  EXPECT_EQ(::recv(PQsocket(client.native()), &byte, 1, MSG_PEEK), -1);
  EXPECT_EQ(errno, ECONNRESET) << "expected an RST, not a FIN";
  EXPECT_THROW(client.query("SELECT 1"), SqlError);
  EXPECT_EQ(PQstatus(client.native()), CONNECTION_BAD);
  EXPECT_TRUE(eventually([&] { return !backend_exists(cluster().dsn(), backend); }))
      << "the server's side was not reset";
}

TEST_F(FaultProxyTest, WithoutKeepUpstreamAGoneClientFreesItsBackend) {
  BlockingConnection client(through_proxy());
  const int backend = client.backend_pid();
  vanish(client);
  EXPECT_TRUE(eventually([&] { return !backend_exists(cluster().dsn(), backend); }));
  EXPECT_TRUE(eventually([&] { return proxy->active_connections() == 0; }));
  EXPECT_EQ(proxy->held_upstreams(), 0U);
}

TEST_F(FaultProxyTest, KeepUpstreamHoldsTheBackendOfAGoneClient) {
  proxy->keep_upstream(true);
  BlockingConnection client(through_proxy());
  const int backend = client.backend_pid();
  vanish(client);

  ASSERT_TRUE(eventually([&] { return proxy->held_upstreams() == 1; }));
  EXPECT_EQ(proxy->active_connections(), 0U);
  std::this_thread::sleep_for(300ms);
  EXPECT_TRUE(backend_exists(cluster().dsn(), backend))
      << "the proxy should hold the server connection of a client that is gone";

  proxy->release_held();
  EXPECT_EQ(proxy->held_upstreams(), 0U);
  EXPECT_TRUE(eventually([&] { return !backend_exists(cluster().dsn(), backend); }));
}

}  // namespace
}  // namespace pgrt::testing
