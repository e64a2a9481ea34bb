// Pool::query() (statements without a lease) against the pool's close paths, a server that ends
// the shared connection, and callers on threads of their own: every caller is answered (its own
// answer or an error that says what happened), nothing waits without a bound.
#include <algorithm>
#include <atomic>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/this_coro.hpp>
#include <chrono>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <pgrt/db.hpp>

#include "pgrt/testing/db_test.hpp"
#include "pgrt/testing/run_coroutine.hpp"

namespace pgrt {
namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using ::testing::HasSubstr;
using testing::run_coroutine;
using testing::sleep_for;
using awaitable_void = asio::awaitable<void>;

class PoolQueryCloseTest : public testing::DbTest {
 protected:
  static PoolConfig config(std::string instance, std::size_t max_size) {
    PoolConfig pool_config;
    pool_config.conninfo = cluster().dsn();
    pool_config.max_size = max_size;
    pool_config.application = "pgrt-test";
    pool_config.instance = std::move(instance);
    return pool_config;
  }
};

// One caller's outcome: its value, or the error it got.
struct Outcome {
  bool done = false;
  std::optional<int> value;
  std::optional<Error> error;
};

// Waits (polling the caller's io_context) until `done()`, at most `limit`.
template <typename Done>
asio::awaitable<bool> wait_until(Done done, std::chrono::milliseconds limit) {
  const auto give_up_at = std::chrono::steady_clock::now() + limit;
  while (!done() && std::chrono::steady_clock::now() < give_up_at) co_await sleep_for(5ms);
  co_return done();
}

// close_now() (an exit handler) from another thread while statements are in flight on shared
// connections and more are queued: each caller is answered (connection_lost saying the
// connection was interrupted for those in flight, pool_closed for those queued), and nothing of
// the pool keeps the io_context busy. (Before, the statement running when the interrupt's cancel
// request reached the server failed with that 57014, "canceling statement due to user request".)
TEST_F(PoolQueryCloseTest, CloseNowFromAnotherThreadAnswersEveryCaller) {
  asio::io_context io;
  PoolConfig pool_config = config("query-close-now", 2);
  pool_config.max_waiters = 1000;
  Pool pool(io.get_executor(), pool_config);
  constexpr int callers = 200;
  std::vector<Outcome> outcomes(callers);
  for (int caller = 0; caller < callers; ++caller) {
    asio::co_spawn(
        io,
        [&, caller]() -> awaitable_void {
          try {
            outcomes[caller].value =
                (co_await pool.query("SELECT $1::int FROM pg_sleep(0.02)", caller)).scalar<int>();
          } catch (const Error& error) {
            outcomes[caller].error = error;
          }
          outcomes[caller].done = true;
        },
        asio::detached);
  }
  std::thread io_thread([&] { io.run_for(20s); });
  for (int i = 0; i < 500 && pool.stats().shared_in_flight == 0; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  std::this_thread::sleep_for(100ms);
  pool.close_now();
  const auto started = std::chrono::steady_clock::now();
  io_thread.join();
  EXPECT_LT(std::chrono::steady_clock::now() - started, 10s);
  for (int caller = 0; caller < callers; ++caller) {
    const Outcome& outcome = outcomes[caller];
    EXPECT_TRUE(outcome.done) << "caller " << caller << " still waits";
    if (outcome.value) {
      EXPECT_EQ(*outcome.value, caller);
    }
    if (outcome.error) {
      EXPECT_TRUE(outcome.error->code() == client_errc::connection_lost ||
                  outcome.error->code() == client_errc::pool_closed)
          << outcome.error->what();
      if (outcome.error->code() == client_errc::connection_lost) {
        // (Not the server's 57014 for the interrupt's cancel request, "canceling statement due
        // to user request": nobody cancelled the statement.)
        EXPECT_THAT(outcome.error->what(), HasSubstr("interrupted"));
      }
    }
  }
}

}  // namespace
}  // namespace pgrt
