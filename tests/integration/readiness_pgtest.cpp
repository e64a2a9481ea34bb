// The connection's readiness wait (db/src/connection/io.cpp) in each case it has to get right:
// results libpq holds already, a result that arrives in pieces (also after a pause on the
// network), and connections whose coroutines move between the threads running one io_context.
// A wait that missed its bytes would hang: every test runs under a time limit, so a hang fails.
#include <atomic>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <chrono>
#include <future>
#include <gtest/gtest.h>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <pgrt/db.hpp>

#include "pgrt/testing/db_test.hpp"
#include "pgrt/testing/expect_error.hpp"
#include "pgrt/testing/fault_proxy.hpp"
#include "pgrt/testing/run_coroutine.hpp"

namespace pgrt {
namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using testing::run_coroutine;
using awaitable_void = asio::awaitable<void>;

class ReadinessTest : public testing::DbTest {
 protected:
  static asio::awaitable<Connection> open(std::string conninfo) {
    ConnectOptions options{.conninfo = std::move(conninfo)};
    co_return co_await Connection::connect(options);
  }
};

// Many small results sent at once: libpq reads several in one go, and all but the first of them
// are in its buffer, not on the socket. Each must be taken without waiting on the socket (which
// may have nothing more to give).
TEST_F(ReadinessTest, ResultsLibpqHoldsAlreadyAreTakenWithoutAWait) {
  run_coroutine(
      []() -> awaitable_void {
        auto conn = co_await open(cluster().dsn());
        // Single-row mode: many rows per read, each one a result of its own.
        std::int64_t sum = 0;
        const auto rows =
            co_await conn.stream("SELECT generate_series(1, 20000)::int8",
                                 [&](const Row& row) { sum += row.get<std::int64_t>(0); });
        EXPECT_EQ(rows, 20000U);
        EXPECT_EQ(sum, std::int64_t{20000} * 20001 / 2);
        // A pipeline: many results come in one read.
        Pipeline pipeline;
        for (int i = 0; i < 200; ++i) pipeline.add("SELECT $1::int", i);
        const auto outcomes = co_await conn.run(pipeline);
        EXPECT_EQ(outcomes.size(), 200U);
        if (outcomes.size() != 200U) co_return;
        for (int i = 0; i < 200; ++i) {
          EXPECT_EQ(outcomes[static_cast<std::size_t>(i)].result.scalar<int>(), i);
        }
      },
      20s);
}

// One row of 8 MB over the unix socket and over TCP: far more than one read, so the wait runs
// again and again for the rest of a result libpq has only part of.
TEST_F(ReadinessTest, AResultThatArrivesInPiecesIsReadToItsEnd) {
  for (const std::string& conninfo : {cluster().dsn(), cluster().tcp_dsn()}) {
    run_coroutine(
        [&]() -> awaitable_void {
          auto conn = co_await open(conninfo);
          for (int round = 0; round < 3; ++round) {
            auto result = co_await conn.query("SELECT repeat('x', 8000000)");
            EXPECT_EQ(result[0].get<std::string>(0).size(), 8'000'000U);
          }
          auto prepared = co_await conn.query_prepared("SELECT repeat('y', $1)", 3'000'000);
          EXPECT_EQ(prepared[0].get<std::string>(0).size(), 3'000'000U);
        },
        30s);
  }
}

// The network stalls mid-result (a proxy holds the bytes for a while, then delivers them): the
// wait is queued long before they come, and they still end it.
TEST_F(ReadinessTest, BytesThatComeAfterAStallEndTheWait) {
  testing::FaultProxy proxy("127.0.0.1", static_cast<std::uint16_t>(cluster().port()));
  run_coroutine(
      [&]() -> awaitable_void {
        auto conn = co_await open(proxy.conninfo_prefix() + " user=postgres dbname=postgres");
        EXPECT_EQ((co_await conn.query("SELECT 1")).scalar<int>(), 1);
        proxy.pause();
        std::thread resume([&proxy] {
          std::this_thread::sleep_for(300ms);
          proxy.resume();
        });
        const auto started = std::chrono::steady_clock::now();
        std::string text;
        try {
          auto result = co_await conn.query("SELECT repeat('z', 2000000)");
          text = result[0].get<std::string>(0);
        } catch (...) {
          resume.join();
          throw;
        }
        resume.join();
        EXPECT_EQ(text.size(), 2'000'000U);
        EXPECT_GE(std::chrono::steady_clock::now() - started, 250ms) << "the stall did not happen";
      },
      20s);
}

// Four threads run one io_context; each connection's coroutine resumes on whichever thread the
// reactor woke, so a readiness edge can be taken by one thread while another is about to wait.
// Small results, rows libpq holds already, results in pieces and prepared statements, mixed.
// Under the tsan preset this is also the data-race check of the query path.
TEST_F(ReadinessTest, ConnectionsOnAFourThreadIoContextNeverMissTheirBytes) {
  asio::io_context io;
  constexpr int connections = 6;
#if defined(__SANITIZE_THREAD__)
  constexpr int rounds = 40;
#else
  constexpr int rounds = 150;
#endif
  std::atomic<int> finished{0};
  std::atomic<int> failures{0};
  // cluster() starts the shared cluster on first use: not from several threads at once.
  const std::string unix_dsn = cluster().dsn();
  const std::string tcp_dsn = cluster().tcp_dsn();
  for (int c = 0; c < connections; ++c) {
    asio::co_spawn(
        asio::make_strand(io),
        [&, c]() -> awaitable_void {
          try {
            auto conn = co_await open(c % 2 == 0 ? unix_dsn : tcp_dsn);
            for (int round = 0; round < rounds; ++round) {
              if ((co_await conn.query_prepared("SELECT $1::int + 1", round)).scalar<int>() !=
                  round + 1) {
                ++failures;
              }
              std::int64_t sum = 0;
              co_await conn.stream("SELECT generate_series(1, 500)::int8",
                                   [&](const Row& row) { sum += row.get<std::int64_t>(0); });
              if (sum != 500 * 501 / 2) ++failures;
              if (round % 10 == c) {
                auto big = co_await conn.query("SELECT repeat('x', 300000)");
                if (big[0].get<std::string>(0).size() != 300'000U) ++failures;
              }
            }
          } catch (const std::exception& error) {
            ADD_FAILURE() << "connection " << c << ": " << error.what();
            ++failures;
          }
          ++finished;
        },
        asio::detached);
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) threads.emplace_back([&] { io.run_for(120s); });
  io.run_for(120s);
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(finished.load(), connections) << "a connection hung: its wait missed its bytes";
  EXPECT_EQ(failures.load(), 0);
}

// A cancellation that reaches a wait which has just completed (its resumption queued behind other
// work: here a strand held by another handler while the io_context runs on two threads) is only
// recorded in the coroutine's cancellation state; asio cancels no operation for it. The
// connection's next wait must see it there, or the statement runs on to its end and the timeout
// returns long after its deadline. Scripted: the statement sends a NOTICE at 250 ms and then
// sleeps 10 s; the timeout is 200 ms; a handler holds the caller's strand from 150 ms to 600 ms,
// so the timeout's completion and then the NOTICE's readiness queue up behind it, in that order.
// For a query (exchange()) and for a pipeline (next_result()).
TEST_F(ReadinessTest, ACancellationThatReachesACompletedWaitStillEndsTheStatement) {
  const std::string dsn = cluster().dsn();
  const std::string notice_then_sleep =
      "DO $$ BEGIN PERFORM pg_sleep(0.25); RAISE NOTICE 'early'; PERFORM pg_sleep(10); END $$";
  for (const bool pipelined : {false, true}) {
    SCOPED_TRACE(pipelined ? "a pipeline" : "a query");
    asio::io_context io;
    auto work = asio::make_work_guard(io);
    std::vector<std::thread> threads;
    for (int t = 0; t < 2; ++t) threads.emplace_back([&] { io.run(); });
    auto strand = asio::make_strand(io);
    std::promise<void> done;
    asio::co_spawn(
        strand,
        [&]() -> awaitable_void {
          try {
            auto conn = co_await open(dsn);
            auto blocker = std::make_shared<asio::steady_timer>(strand, 150ms);
            blocker->async_wait(asio::bind_executor(strand, [blocker](boost::system::error_code) {
              std::this_thread::sleep_for(450ms);
            }));
            const auto started = std::chrono::steady_clock::now();
            if (pipelined) {
              Pipeline pipeline;
              pipeline.add(notice_then_sleep);
              co_await testing::expect_error(with_timeout(conn.run(pipeline), 200ms));
            } else {
              co_await testing::expect_error(with_timeout(conn.query(notice_then_sleep), 200ms));
            }
            const auto took = std::chrono::steady_clock::now() - started;
            EXPECT_LT(took, 5s) << "the statement ran on to its end: the cancellation was lost";
            // The connection is idle again (the statement cancelled and drained), or closed and
            // reported broken (a pipeline cannot be drained): never busy with the statement.
            if (conn.is_open() && !conn.is_broken()) {
              EXPECT_EQ((co_await conn.query("SELECT 7")).scalar<int>(), 7);
            }
          } catch (const std::exception& error) {
            ADD_FAILURE() << error.what();
          }
          done.set_value();
        },
        asio::detached);
    const bool finished = done.get_future().wait_for(60s) == std::future_status::ready;
    EXPECT_TRUE(finished) << "the timed-out statement never returned";
    work.reset();
    io.stop();
    for (auto& thread : threads) thread.join();
    if (!finished) return;
  }
}

}  // namespace
}  // namespace pgrt
